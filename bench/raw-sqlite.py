#!/usr/bin/env python3
"""Raw-SQLite baseline for the checkout benchmark: the SQLite side of bench/raw-postgres.sh.

One checkout, exactly as the service commits it on SQLite (src/store/sqlite/mod.rs, `place_order`:
one `BEGIN IMMEDIATE` write transaction on the single writer connection), issued from ONE
connection, back to back, for a fixed time, against the service's own schema in a fresh data
directory (created with `orderflow migrate --data-dir DIR`, i.e. from migrations/sqlite). SQLite
has one writer, so one connection is the most it can do; what it measures is the commit rate
(with synchronous=FULL an fsync of the WAL per commit). Per transaction, the same statements:

  BEGIN IMMEDIATE
  SELECT the idempotency record (fingerprint, response_body)
  SELECT the stock levels (id, price_minor, on_hand - reserved) of the cart's products
  UPDATE products: the conditional reservation (on_hand - reserved >= quantity)
  INSERT orders, INSERT order_items (one line), INSERT order_events ('order_placed'),
  INSERT events ('order.placed', with the order's JSON), INSERT jobs ('charge_payment'),
  INSERT idempotency_keys (completed, with the 202 response snapshot)
  COMMIT

Connection settings as the service's (sqlx): WAL, synchronous FULL (or NORMAL), foreign keys on,
busy timeout 10 s, statements prepared once and cached. Values the service computes in Rust (ids:
UUIDv7 as 16-byte BLOBs; RFC 3339 timestamps; the order JSON of the event and of the response
snapshot, same shape and about the same size) are computed here in Python. Not included: HTTP,
JSON parsing, JWT checks, the in-process idempotency claim (a memory lock, no SQL).

The seed is bench/pgbench-setup.sql's: PRODUCTS products with STOCK units each (plus their
'initial' ledger rows) and CUSTOMERS customers, ids derived with md5 from the row number.

Prints the transaction rate (`tps = N`), p50/p90/p99/max latency, then runs `orderflow audit` on
the result and removes the data directory (unless --keep).

Usage: bench/raw-sqlite.py [--seconds 20] [--synchronous full|normal] [--customers 50]
       [--products 20] [--stock 10000000] [--orderflow target/release/orderflow] [--keep]
Run from the repository root after `cargo build --release --bins`.
"""

import argparse
import datetime
import hashlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid


def md5_uuid(text: str) -> bytes:
    """The id pgbench-setup.sql derives: md5(text)::uuid, as the 16 bytes SQLite stores."""
    return hashlib.md5(text.encode()).digest()


def uuid7() -> bytes:
    """A UUIDv7 (what the service's `Uuid::now_v7()` makes): 48-bit milliseconds, then random."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((rand >> 68) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))
    return value.to_bytes(16, "big")


def text(id_bytes: bytes) -> str:
    return str(uuid.UUID(bytes=id_bytes))


def now() -> str:
    """RFC 3339 in UTC with microseconds, as sqlx stores a `DateTime<Utc>` in SQLite."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def price(n: int) -> int:
    """The loadgen's prices (and pgbench-setup.sql's): 1.00, 2.01, 3.02, ..."""
    return (1 + (n - 1) % 50) * 100 + (n - 1) % 100


def seed(db: sqlite3.Connection, customers: int, products: int, stock: int) -> None:
    at = now()
    db.execute("BEGIN IMMEDIATE")
    for n in range(1, products + 1):
        pid = md5_uuid(f"orderflow-bench-product-{n}")
        db.execute(
            "INSERT INTO products (id, sku, name, description, category, price_minor, on_hand, reserved, "
            "version, created_at, updated_at) VALUES (?, ?, ?, NULL, 'loadgen', ?, ?, 0, 1, ?, ?)",
            (pid, f"BENCH-{n}", f"Bench product {n}", price(n), stock, at, at),
        )
        db.execute(
            "INSERT INTO inventory_ledger (id, product_id, order_id, kind, delta, reason, created_at) "
            "VALUES (?, ?, NULL, 'initial', ?, 'initial stock', ?)",
            (uuid7(), pid, stock, at),
        )
    for n in range(1, customers + 1):
        db.execute(
            "INSERT INTO customers (id, email, first_name, last_name, created_at) VALUES (?, ?, 'Load', ?, ?)",
            (md5_uuid(f"orderflow-bench-customer-{n}"), f"bench-{n}@example.com", f"Generator{n}", at),
        )
    db.execute("COMMIT")


# The statements of `SqliteStore::place_order`, verbatim.
IDEMPOTENCY_SQL = "SELECT fingerprint, response_body FROM idempotency_keys WHERE principal = ? AND key = ?"
LEVELS_SQL = "SELECT id, price_minor, on_hand - reserved FROM products WHERE id IN (?)"
RESERVE_SQL = (
    "UPDATE products SET reserved = reserved + ?1, version = version + 1, updated_at = ?2 "
    "WHERE id = ?3 AND on_hand - reserved >= ?1"
)
ORDER_SQL = (
    "INSERT INTO orders (id, customer_id, status, inventory_state, currency, total_minor, "
    "payment_token, shipping, idempotency_principal, idempotency_key, correlation_id, created_at, "
    "updated_at, last_event_sequence) VALUES (?, ?, ?, 'reserved', ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)"
)
ITEM_SQL = (
    "INSERT INTO order_items (order_id, product_id, line_no, quantity, unit_price_minor) VALUES (?, ?, ?, ?, ?)"
)
ORDER_EVENT_SQL = (
    "INSERT INTO order_events (id, order_id, kind, status, detail, correlation_id, created_at) "
    "VALUES (?, ?, 'order_placed', ?, NULL, ?, ?)"
)
EVENT_SQL = (
    "INSERT INTO events (id, subject, order_id, event_type, sequence, data, correlation_id, created_at) "
    "VALUES (?, ?, ?, 'order.placed', 1, ?, ?, ?)"
)
JOB_SQL = (
    "INSERT INTO jobs (id, kind, order_id, payload, state, attempts, max_attempts, run_at, "
    "ready_since, correlation_id, created_at, updated_at) VALUES (?, ?, ?, ?, 'ready', 0, ?, ?, ?, ?, ?, ?)"
)
KEY_SQL = (
    "INSERT INTO idempotency_keys (principal, key, fingerprint, state, order_id, "
    "response_status, response_body, created_at, updated_at) "
    "VALUES (?, ?, ?, 'completed', ?, 202, ?, ?, ?)"
)


def place_order(db: sqlite3.Connection, customers: int, products: int, run: str, serial: int) -> None:
    c = random.randint(1, customers)
    p = random.randint(1, products)
    customer = md5_uuid(f"orderflow-bench-customer-{c}")
    product = md5_uuid(f"orderflow-bench-product-{p}")
    principal = text(customer)
    key = f"raw-sqlite-{run}-{serial}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()
    correlation = str(uuid.uuid4())
    order = uuid7()
    at = now()

    db.execute("BEGIN IMMEDIATE")
    try:
        if db.execute(IDEMPOTENCY_SQL, (principal, key)).fetchone() is not None:
            raise RuntimeError(f"idempotency key {key} reused")
        levels = db.execute(LEVELS_SQL, (product,)).fetchall()
        if len(levels) != 1 or levels[0][2] < 1:
            raise RuntimeError("product missing or out of stock")
        unit = levels[0][1]
        if db.execute(RESERVE_SQL, (1, at, product)).rowcount != 1:
            raise RuntimeError("stock changed inside the write transaction")
        order_text, customer_text, product_text = text(order), principal, text(product)
        amount = f"{unit // 100}.{unit % 100:02d}"
        db.execute(
            ORDER_SQL,
            (order, customer, "pending_payment", "USD", unit, "tok_visa", None, principal, key, correlation, at, at),
        )
        db.execute(ITEM_SQL, (order, product, 0, 1, unit))
        db.execute(ORDER_EVENT_SQL, (uuid7(), order, "pending_payment", correlation, at))
        # `order_data` of the placed order (src/domain/events.rs), as the service renders it.
        data = (
            f'{{"order_id":"{order_text}","customer_id":"{customer_text}","status":"pending_payment",'
            f'"items":[{{"product_id":"{product_text}","quantity":1,"unit_price":{amount},"line_total":{amount}}}],'
            f'"total_amount":{amount},"currency":"USD","created_at":"{at}","updated_at":"{at}",'
            f'"correlation_id":"{correlation}"}}'
        )
        db.execute(EVENT_SQL, (uuid7(), f"orders/{order_text}", order, data, correlation, at))
        db.execute(
            JOB_SQL,
            (uuid7(), "charge_payment", order, json.dumps({"order_id": order_text}), 3, at, at, correlation, at, at),
        )
        # The response snapshot: the order as `serde_json` serializes `Order` (src/store/rows.rs).
        snapshot = (
            f'{{"id":"{order_text}","customer_id":"{customer_text}","status":"pending_payment","currency":"USD",'
            f'"lines":[{{"product_id":"{product_text}","quantity":1,"unit_price":{unit}}}],"total":{unit},'
            f'"payment_token":"tok_visa","correlation_id":"{correlation}","created_at":"{at}","updated_at":"{at}"}}'
        )
        db.execute(KEY_SQL, (principal, key, fingerprint, order, snapshot, at, at))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def latency_line(micros: list) -> str:
    micros.sort()
    n = len(micros)

    def rank(q: float) -> float:
        return micros[max(1, min(n, int(q * n + 0.999999))) - 1] / 1000

    return (
        f"latency: p50 {rank(0.50):.2f} ms, p90 {rank(0.90):.2f} ms, p99 {rank(0.99):.2f} ms, "
        f"max {micros[-1] / 1000:.2f} ms (n = {n})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--synchronous", choices=["full", "normal"], default="full")
    parser.add_argument("--customers", type=int, default=int(os.environ.get("CUSTOMERS", 50)))
    parser.add_argument("--products", type=int, default=int(os.environ.get("PRODUCTS", 20)))
    parser.add_argument("--stock", type=int, default=int(os.environ.get("STOCK", 10_000_000)))
    parser.add_argument("--orderflow", default=os.environ.get("ORDERFLOW", "target/release/orderflow"))
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    args = parser.parse_args()

    data_dir = tempfile.mkdtemp(prefix="orderflow-bench-raw-sqlite.")
    path = os.path.join(data_dir, "orderflow.db")
    try:
        # The service's own schema, applied the way the service applies it.
        subprocess.run([args.orderflow, "migrate", "--data-dir", data_dir], check=True, stdout=subprocess.DEVNULL)
        db = sqlite3.connect(path, isolation_level=None, cached_statements=64)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {args.synchronous.upper()}")
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA busy_timeout = 10000")
        seed(db, args.customers, args.products, args.stock)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        print(
            f"== raw SQLite {sqlite3.sqlite_version}: synchronous {args.synchronous.upper()}, WAL, 1 connection, "
            f"{args.seconds:g}s, {args.customers} customers, {args.products} products ({path})",
            flush=True,
        )
        run = uuid.uuid4().hex[:8]
        latencies = []
        started = time.perf_counter()
        deadline = started + args.seconds
        last_report, last_count = started, 0
        while True:
            begun = time.perf_counter()
            if begun >= deadline:
                break
            place_order(db, args.customers, args.products, run, len(latencies))
            finished = time.perf_counter()
            latencies.append(int((finished - begun) * 1_000_000))
            if finished - last_report >= 5:
                print(
                    f"progress: {finished - started:.1f} s, {(len(latencies) - last_count) / (finished - last_report):.1f} tps",
                    flush=True,
                )
                last_report, last_count = finished, len(latencies)
        elapsed = time.perf_counter() - started
        print(f"number of transactions actually processed: {len(latencies)}")
        print(f"tps = {len(latencies) / elapsed:.6f} (one connection, {elapsed:.2f} s)")
        print(latency_line(latencies))
        stored = db.execute("SELECT count(*) FROM orders").fetchone()[0]
        db.close()
        print(f"orders stored: {stored}")
        print("== orderflow audit of the raw run", flush=True)
        audit = subprocess.run([args.orderflow, "audit", "--data-dir", data_dir])
        return 0 if audit.returncode == 0 and stored == len(latencies) else 1
    finally:
        if args.keep:
            print(f"kept {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
