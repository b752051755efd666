#!/usr/bin/env python3
"""Shows why orderflow (sqlx 0.8) must not run through PgBouncer < 1.21 in transaction mode
(docs/scale-out.md, "PgBouncer and transaction poolers").

Two clients do what sqlx 0.8 does for a statement with parameters and its statement cache off
(the unnamed statement): Parse + Describe + Sync, then Bind + Execute + Sync. Between the two
Syncs PgBouncer hands the server connection to the other client, so client A's Bind runs the
statement client B prepared.

Usage: start a PgBouncer with pool_mode = transaction and default_pool_size = 1 in front of
PostgreSQL (trust auth), then
    bench/pgbouncer-unnamed-probe.py [port] [database]        (default 6432 postgres)
Prints what each client's Bind returned and exits 1 when a client ran the other's statement.
"""
import socket
import struct
import sys

PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 6432
DATABASE = sys.argv[2] if len(sys.argv) > 2 else "postgres"


def message(kind, body):
    return kind + struct.pack("!I", len(body) + 4) + body


def until_ready(sock):
    out, buffer = [], b""
    while True:
        while len(buffer) < 5:
            buffer += sock.recv(65536)
        kind, length = buffer[0:1], struct.unpack("!I", buffer[1:5])[0]
        while len(buffer) < 1 + length:
            buffer += sock.recv(65536)
        out.append((kind, buffer[5 : 1 + length]))
        buffer = buffer[1 + length :]
        if kind == b"Z":
            return out


def connect():
    sock = socket.create_connection(("127.0.0.1", PORT))
    body = struct.pack("!I", 196608) + b"user\0postgres\0database\0" + DATABASE.encode() + b"\0\0"
    sock.sendall(struct.pack("!I", len(body) + 4) + body)
    until_ready(sock)
    return sock


def prepare_unnamed(sock, sql):
    sock.sendall(
        message(b"P", b"\0" + sql.encode() + b"\0" + struct.pack("!H", 0))
        + message(b"D", b"S\0")
        + message(b"S", b"")
    )
    until_ready(sock)


def bind_and_execute(sock, parameter):
    body = b"\0\0" + struct.pack("!HH", 0, 1) + struct.pack("!I", len(parameter)) + parameter.encode()
    body += struct.pack("!H", 0)
    sock.sendall(message(b"B", body) + message(b"E", b"\0" + struct.pack("!I", 0)) + message(b"S", b""))
    for kind, body in until_ready(sock):
        if kind == b"D":
            return body[6:].decode()
        if kind == b"E":
            return "error: " + body.decode(errors="replace")
    return None


a, b = connect(), connect()
prepare_unnamed(a, "SELECT 'statement of A: ' || $1::text")
prepare_unnamed(b, "SELECT 'statement of B: ' || $1::text")
got_a, got_b = bind_and_execute(a, "a-param"), bind_and_execute(b, "b-param")
print(f"client A bound its parameter and got: {got_a}")
print(f"client B bound its parameter and got: {got_b}")
sys.exit(1 if "statement of B" in (got_a or "") or "statement of A" in (got_b or "") else 0)
