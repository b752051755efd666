#!/usr/bin/env bash
# Fuzzes the live API against its own OpenAPI document with schemathesis: the real binary on a
# fresh data directory with the sample catalog, a customer and an order, every operation, with
# an admin bearer token. Fails on any finding: a 5xx, a status code, content type, header or body
# the document does not declare, schema-valid input refused or schema-invalid input accepted.
#
# Usage: .ci/schemathesis.sh [extra `st run` arguments]
# Env:   ST_MAX_EXAMPLES (default 40) test cases per operation and phase; ST_WORKERS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
MAX_EXAMPLES=${ST_MAX_EXAMPLES:-40}
# One worker: CPython 3.11 can fail with "AST constructor recursion depth mismatch" when
# hypothesis parses sources from several threads at once.
WORKERS=${ST_WORKERS:-1}

if [[ "$(python3 -c 'import schemathesis; print(schemathesis.__version__)' 2>/dev/null)" != "$SCHEMATHESIS_VERSION" ]]; then
  python3 -m pip install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
fi
echo "schemathesis $(python3 -c 'import schemathesis; print(schemathesis.__version__)')"

cargo build --quiet --bin orderflow
bin=target/debug/orderflow

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
"$bin" serve --listen "127.0.0.1:$port" --sqlite-durability normal \
  --rate-limit-catalog off --rate-limit-reads off --rate-limit-writes off --rate-limit-admin off \
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
curl -fsS -o /dev/null -H "$auth" -H 'Content-Type: application/json' -H 'Idempotency-Key: seed-1' "$base/orders" \
  -d "{\"customer_id\":\"$admin_id\",\"items\":[{\"product_id\":\"$product\",\"quantity\":1}]}"

status=0
started=$SECONDS
st --config-file .ci/schemathesis.toml run "$base/openapi.json" \
  --header "$auth" \
  --max-examples "$MAX_EXAMPLES" \
  --workers "$WORKERS" \
  --seed "${ST_SEED:-20260101}" \
  --generation-database none \
  --report junit --report-dir "$work/report" \
  "$@" || status=$?
echo "schemathesis took $((SECONDS - started)) s"

if [[ $status -ne 0 ]]; then
  echo "== server log (last 60 lines)"
  tail -n 60 "$work/server.log"
fi
if grep -q 'panicked' "$work/server.log"; then
  echo "the server panicked during the run:" >&2
  grep -A5 'panicked' "$work/server.log" >&2
  status=1
fi
exit $status
