#!/usr/bin/env python3
"""A real webhook receiver for the tests: an HTTP server that verifies every delivery with the
official Standard Webhooks library (the `standardwebhooks` package), answers as the test told it,
and records what arrived.

    python3 tests/support/webhook_receiver.py [--exit-on-stdin-eof]

It binds 127.0.0.1 on a free port and prints `listening on <port>` as its first stdout line, then
serves until killed (or, with `--exit-on-stdin-eof`, until its stdin closes, so a crashed test
leaves no server behind). Deliveries go to any path outside `/_control/` and `/_received`.

Control API (JSON bodies):
    POST /_control/secrets {"secrets": ["whsec_...", ...]}
        A delivery is `verified` when any of these verifies it; `verified_with` lists the indexes
        of those that did.
    POST /_control/rules {"rules": [{"match": {...}?, "status": 500, "times": 2?,
                                      "retry_after": "7"?, "location": "http://..."?, "body": "..."?}]}
        Evaluated in order for each delivery, the first match wins. `match` may hold
        `"order_id": "<uuid>"` (the CloudEvent's `data.order.order_id`, or its `subject`
        `orders/<id>`) and/or `"type": "order.paid"`; without `match` a rule matches everything.
        `times` limits a rule to its first N matching deliveries. No match: 200.
    GET  /_received
        The deliveries in arrival order: {webhook_id, webhook_timestamp, signature_header,
        verified, verified_with, error, answered_status, body (parsed JSON or null), raw_body,
        method, path, headers}. Deliveries answered with a non-2xx are recorded too.
    POST /_control/reset
        Forgets secrets, rules and deliveries.

Needs `standardwebhooks`: python3 -m pip install standardwebhooks
"""

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:
    from standardwebhooks.webhooks import Webhook
except ImportError:
    sys.stderr.write(
        "webhook_receiver.py: the Python package `standardwebhooks` is missing; "
        "install it with `python3 -m pip install standardwebhooks`\n"
    )
    sys.exit(3)


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.secrets = []
        self.rules = []
        self.received = []


STATE = State()


def order_id_of(body):
    if not isinstance(body, dict):
        return None
    data = body.get("data")
    if isinstance(data, dict) and isinstance(data.get("order"), dict):
        order_id = data["order"].get("order_id")
        if order_id is not None:
            return str(order_id)
    subject = body.get("subject")
    if isinstance(subject, str) and subject.startswith("orders/"):
        return subject[len("orders/") :]
    return None


def rule_matches(rule, body):
    match = rule.get("match") or {}
    if "order_id" in match and order_id_of(body) != str(match["order_id"]):
        return False
    if "type" in match and (not isinstance(body, dict) or body.get("type") != match["type"]):
        return False
    return True


def verify(secrets, raw, headers):
    """(verified_with, error): the indexes of the secrets that verify, else the first error."""
    verified_with, errors = [], []
    for index, secret in enumerate(secrets):
        try:
            Webhook(secret).verify(raw, headers, json_parse=False)
            verified_with.append(index)
        except Exception as error:  # the library's errors, and e.g. a body that is not UTF-8
            errors.append(f"secret {index}: {type(error).__name__}: {error}")
    if not secrets:
        errors.append("no secrets configured")
    return verified_with, (None if verified_with else "; ".join(errors))


class Handler(BaseHTTPRequestHandler):
    server_version = "webhook-receiver/1"
    protocol_version = "HTTP/1.0"

    def log_message(self, format, *args):
        pass

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def answer(self, status, body=b"", content_type="application/json", extra_headers=()):
        if isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra_headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def answer_json(self, status, value):
        self.answer(status, json.dumps(value))

    def control(self, raw):
        try:
            payload = json.loads(raw or b"{}")
        except ValueError as error:
            return self.answer_json(400, {"error": f"not JSON: {error}"})
        with STATE.lock:
            if self.path == "/_control/secrets":
                STATE.secrets = [str(secret) for secret in payload.get("secrets", [])]
            elif self.path == "/_control/rules":
                STATE.rules = [dict(rule, used=0) for rule in payload.get("rules", [])]
            elif self.path == "/_control/reset":
                STATE.reset()
            else:
                return self.answer_json(404, {"error": f"no control {self.path}"})
        self.answer_json(200, {"ok": True})

    def delivery(self, raw):
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        with STATE.lock:
            secrets = list(STATE.secrets)
            rule = None
            for candidate in STATE.rules:
                times = candidate.get("times")
                if times is not None and candidate["used"] >= times:
                    continue
                if rule_matches(candidate, body):
                    candidate["used"] += 1
                    rule = candidate
                    break
        verified_with, error = verify(secrets, raw, headers)
        if rule is None:
            status, answer, extra = 200, '{"ok":true}', []
        else:
            status = int(rule.get("status", 200))
            answer = rule.get("body", json.dumps({"answered": status}))
            extra = []
            if rule.get("retry_after") is not None:
                extra.append(("Retry-After", str(rule["retry_after"])))
            if rule.get("location") is not None:
                extra.append(("Location", str(rule["location"])))
        record = {
            "webhook_id": headers.get("webhook-id"),
            "webhook_timestamp": headers.get("webhook-timestamp"),
            "signature_header": headers.get("webhook-signature"),
            "verified": bool(verified_with),
            "verified_with": verified_with,
            "error": error,
            "answered_status": status,
            "body": body,
            "raw_body": raw.decode("utf-8", errors="replace"),
            "method": self.command,
            "path": self.path,
            "headers": headers,
        }
        # Recorded before answering, so a test that saw the answer also sees the record.
        with STATE.lock:
            STATE.received.append(record)
        self.answer(status, answer, extra_headers=extra)

    def do_GET(self):
        if self.path == "/_received":
            with STATE.lock:
                received = list(STATE.received)
            return self.answer_json(200, received)
        self.delivery(b"")

    def do_POST(self):
        raw = self.read_body()
        if self.path.startswith("/_control/"):
            return self.control(raw)
        self.delivery(raw)

    do_PUT = do_POST
    do_PATCH = do_POST
    do_DELETE = do_GET


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exit-on-stdin-eof", action="store_true")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"listening on {server.server_address[1]}", flush=True)
    if args.exit_on_stdin_eof:

        def watch_stdin():
            sys.stdin.read()
            server.shutdown()

        threading.Thread(target=watch_stdin, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
