#!/usr/bin/env python3
"""A minimal, fast webhook receiver for bench/events.sh: answers every POST with 200 and an
empty body (so the relay's HTTP client keeps the connection alive), and counts what it got.

    bench/webhook-sink.py PORT

GET /stats answers {"posts": n, "distinct_ids": n, "duplicates": n, "bytes": n}: how many
deliveries arrived, how many distinct `webhook-id`s (event ids) they carried, and how many were
re-sends of an id seen before. It does not verify signatures (the relay's signing cost is still
paid: it signs every delivery). Standard library only; HTTP/1.1 keep-alive; one thread per
connection.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

lock = threading.Lock()
seen = set()
stats = {"posts": 0, "distinct_ids": 0, "duplicates": 0, "bytes": 0}


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        event_id = self.headers.get("webhook-id", "")
        with lock:
            stats["posts"] += 1
            stats["bytes"] += len(body)
            if event_id in seen:
                stats["duplicates"] += 1
            else:
                seen.add(event_id)
                stats["distinct_ids"] += 1
        self.send_response_only(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        with lock:
            body = json.dumps(stats).encode()
        self.send_response_only(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1])
    server = ThreadingHTTPServer(("127.0.0.1", port), Sink)
    server.daemon_threads = True
    print(f"webhook sink on http://127.0.0.1:{port}/hook", flush=True)
    server.serve_forever()
