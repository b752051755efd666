#!/usr/bin/env bash
# Fuzzes the live API against its own OpenAPI document with schemathesis: the real binary on a
# fresh data directory with the sample catalog, a customer and its orders (one waiting for the
# warehouse, one shipped and partly refunded), every operation, with an admin bearer token (and
# Stripe's signature on POST /webhooks/stripe). Fails on any finding: a 5xx, a status code,
# content type, header or body the document does not declare, schema-valid input refused or
# schema-invalid input accepted.
#
# Usage: .ci/schemathesis.sh [extra `st run` arguments]
# Env:   ST_MAX_EXAMPLES (default 100) test cases per operation and phase; ST_WORKERS (default 1);
#        ST_SEED (fixed by default, so a CI failure reproduces locally).
# Checks: all of them (`--checks all`); .ci/schemathesis.toml says where an expectation is widened
# and why.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
MAX_EXAMPLES=${ST_MAX_EXAMPLES:-100}
# One worker: CPython 3.11 can fail with "AST constructor recursion depth mismatch" when
# hypothesis parses sources from several threads at once.
WORKERS=${ST_WORKERS:-1}

if [[ "$(python3 -c 'import schemathesis; print(schemathesis.__version__)' 2>/dev/null)" != "$SCHEMATHESIS_VERSION" ]]; then
  python3 -m pip install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
fi
echo "schemathesis $(python3 -c 'import schemathesis; print(schemathesis.__version__)')"

cargo build --quiet --bin orderflow
bin=${CARGO_TARGET_DIR:-target}/debug/orderflow

work=$(mktemp -d)
server_pid=
cleanup() {
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid"
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
export ORDERFLOW_DATA_DIR="$work/data"
# Rate limits off: schemathesis sends hundreds of requests a second from one principal, and
# every 429 would be a request that tested nothing. (429 is still documented on every
# operation and checked against the document when it happens.)
# External fulfilment: a paid order waits for the warehouse, so POST /orders/{id}/shipments has
# an order to ship (and POST /orders/{id}/refunds one that shipped). A Stripe webhook secret, so
# POST /webhooks/stripe verifies what it gets: the hook below signs every request schemathesis
# sends it, which takes the fuzzed events past the signature into the handler.
export ORDERFLOW_FUZZ_STRIPE_SECRET="whsec_schemathesis_$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
"$bin" --log-format json serve --listen "127.0.0.1:$port" --sqlite-durability normal \
  --rate-limit-catalog off --rate-limit-reads off --rate-limit-writes off --rate-limit-admin off \
  --fulfilment external --stripe-webhook-secret "$ORDERFLOW_FUZZ_STRIPE_SECRET" \
  >"$work/server.log" 2>&1 &
server_pid=$!

for _ in $(seq 1 100); do
  curl -fsS "$base/health/ready" >/dev/null 2>&1 && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log"; exit 1; }
  sleep 0.2
done
curl -fsS "$base/health/ready" >/dev/null

# The admin is also a customer, so that paths naming "its" records find something.
admin_id=$(python3 -c 'import uuid; print(uuid.uuid4())')
token=$("$bin" token --sub "$admin_id" --role admin --ttl 1h)
auth="Authorization: Bearer $token"
product=$(curl -fsS "$base/products?limit=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["product_id"])')
curl -fsS -o /dev/null -H "$auth" -H 'Content-Type: application/json' "$base/customers" \
  -d "{\"customer_id\":\"$admin_id\",\"email\":\"fuzz@example.com\",\"first_name\":\"Fuzz\",\"last_name\":\"Tester\"}"

# POSTs a JSON body as the admin with an Idempotency-Key; prints the answer.
post() { # path, idempotency key, body
  curl -fsS -H "$auth" -H 'Content-Type: application/json' -H "Idempotency-Key: $2" "$base$1" -d "$3"
}
place_order() { # idempotency key, units → the order's id
  post /orders "$1" "{\"customer_id\":\"$admin_id\",\"items\":[{\"product_id\":\"$product\",\"quantity\":$2}]}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["order_id"])'
}
# Waits (up to 30 s) until the order's view satisfies a Python expression over it (`o`).
wait_for_order() { # order id, condition, what is awaited
  local deadline=$((SECONDS + 30))
  until curl -fsS -H "$auth" "$base/orders/$1" |
    python3 -c "import json,sys; o = json.load(sys.stdin); sys.exit(0 if ($2) else 1)"; do
    if (( SECONDS > deadline )); then
      echo "order $1: $3 did not happen in time" >&2
      curl -sS -H "$auth" "$base/orders/$1" >&2
      exit 1
    fi
    sleep 0.2
  done
}
committed='any(e["kind"] == "inventory_committed" for e in o["timeline"])'

# POST /orders/{id}/shipments ships this order (schemathesis.toml): paid, its stock committed,
# waiting for the warehouse (order.ready_to_ship). Random ids would only ever be 404.
export ORDERFLOW_FUZZ_SHIP_ORDER_ID
ORDERFLOW_FUZZ_SHIP_ORDER_ID=$(place_order seed-ship 2)
wait_for_order "$ORDERFLOW_FUZZ_SHIP_ORDER_ID" "o['status'] == 'paid' and $committed" "ready to ship"

# GET /orders/{id} reads, and POST /orders/{id}/refunds refunds, this order: shipped in two parts
# (the first captured the payment, the second fulfilled it) and refunded in part with a unit
# restocked, so its full answer (timeline, payment, notifications, pending steps, shipments,
# refunds) is checked against the schema.
export ORDERFLOW_FUZZ_ORDER_ID
ORDERFLOW_FUZZ_ORDER_ID=$(place_order seed-1 2)
wait_for_order "$ORDERFLOW_FUZZ_ORDER_ID" "o['status'] == 'paid' and $committed" "ready to ship"
post "/orders/$ORDERFLOW_FUZZ_ORDER_ID/shipments" seed-shipment-1 \
  "{\"carrier\":\"DHL\",\"tracking_number\":\"SEED1\",\"items\":[{\"product_id\":\"$product\",\"quantity\":1}]}" >/dev/null
post "/orders/$ORDERFLOW_FUZZ_ORDER_ID/shipments" seed-shipment-2 \
  '{"carrier":"DHL","tracking_number":"SEED2","tracking_url":"https://tracking.example/SEED2"}' >/dev/null
wait_for_order "$ORDERFLOW_FUZZ_ORDER_ID" "o['status'] == 'fulfilled'" "fulfilment"
post "/orders/$ORDERFLOW_FUZZ_ORDER_ID/refunds" seed-refund-1 \
  "{\"amount\":1,\"reason\":\"returned\",\"restock\":[{\"product_id\":\"$product\",\"quantity\":1}]}" >/dev/null
wait_for_order "$ORDERFLOW_FUZZ_ORDER_ID" "o['payment']['state'] == 'partially_refunded'" "the refund"

# A webhook endpoint that stays failing: nothing listens on the discard port, so the relay's
# attempts fail and the endpoint list (and, through its link, GET of the first endpoint) answers
# with real health and attempts. The other endpoint operations get ids through the links from
# POST /admin/webhook-endpoints (a fixed id would turn a fuzzed DELETE of it into failures).
curl -fsS -o /dev/null -H "$auth" -H 'Content-Type: application/json' "$base/admin/webhook-endpoints" \
  -d '{"url":"http://127.0.0.1:9/fuzz","description":"schemathesis"}'

# Signs requests to POST /webhooks/stripe as Stripe does (Stripe-Signature: t=<unix>,v1=<hex
# HMAC-SHA256 of "<t>.<body>"> keyed with the endpoint's secret), over the bytes that will be sent:
# a JSON body goes out as `requests` writes `json=` (json.dumps with its default separators).
# Unsigned and badly signed events are tests/stripe_webhook.rs's business.
export SCHEMATHESIS_HOOKS="$work/hooks.py"
cat >"$SCHEMATHESIS_HOOKS" <<'PY'
import hashlib
import hmac
import json
import os
import time

import schemathesis

SECRET = os.environ["ORDERFLOW_FUZZ_STRIPE_SECRET"].encode()


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.operation.path != "/webhooks/stripe":
        return
    body = case.body
    if isinstance(body, (bytes, bytearray)):
        payload = bytes(body)
    else:
        try:
            payload = json.dumps(body, allow_nan=False).encode()
        except (TypeError, ValueError):
            return  # not JSON: sent unsigned, refused either way
    t = int(time.time())
    signature = hmac.new(SECRET, f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    case.headers = {**(case.headers or {}), "Stripe-Signature": f"t={t},v1={signature}"}
PY

status=0
started=$SECONDS
python3 -m schemathesis.cli --config-file .ci/schemathesis.toml run "$base/openapi.json" \
  --header "$auth" \
  --checks all \
  --max-examples "$MAX_EXAMPLES" \
  --workers "$WORKERS" \
  --seed "${ST_SEED:-20260101}" \
  --generation-database none \
  --report junit --report-dir "$work/report" \
  "$@" || status=$?
echo "schemathesis took $((SECONDS - started)) s"

# What the run exercised, from the server's side: responses per documented route and status.
curl -fsS "$base/openapi.json" >"$work/openapi.json"
python3 - "$work/server.log" "$work/openapi.json" <<'PY'
import collections, json, re, sys
templates = [(t, re.compile("^" + re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(t)) + "$"))
             for t in json.load(open(sys.argv[2]))["paths"]]
counts = collections.Counter()
for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
    try:
        event = json.loads(line)
    except ValueError:
        continue
    # Request fields sit on the event itself, or on its span in older log layouts.
    fields = event["span"] if isinstance(event.get("span"), dict) else event
    status = event.get("status", event.get("fields", {}).get("status"))
    if status is None or "path" not in fields:
        continue
    path = next((t for t, pattern in templates if pattern.match(fields["path"])), "(undocumented path)")
    # Methods a route does not have (schemathesis tries them all) are one line per route.
    counts[(path, "(other methods)" if status == 405 else fields.get("method"), status)] += 1
print("== responses by route and status (server log)")
for (path, method, status), n in sorted(counts.items()):
    print(f"{n:6d}  {status}  {method} {path}")
PY

if [[ $status -ne 0 ]]; then
  echo "== server log (last 60 lines)"
  tail -n 60 "$work/server.log"
fi
if grep -q 'panicked' "$work/server.log"; then
  echo "the server panicked during the run:" >&2
  grep -A5 'panicked' "$work/server.log" >&2
  status=1
fi
# One closing line in the plain "N passed, N failed" form: operations, from the JUnit report.
python3 - "$work/report" "$status" <<'PY'
import glob, sys
import xml.etree.ElementTree as ET
tests = failed = 0
for path in glob.glob(sys.argv[1] + "/*.xml"):
    for suite in ET.parse(path).getroot().iter("testsuite"):
        tests += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
if sys.argv[2] != "0" and failed == 0:
    failed = 1  # the run failed outside any operation (e.g. a server panic)
print(f"schemathesis: {tests - failed} passed, {failed} failed")
PY
exit $status
