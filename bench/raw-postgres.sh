#!/usr/bin/env bash
# Raw-PostgreSQL baseline for the checkout benchmark: pgbench runs bench/place_order.pgbench.sql,
# the exact statements the service commits per order, against the service's schema in a scratch
# database, with the same client count as the loadgen. Prints pgbench's report plus p50/p99/max
# transaction latency, then runs `orderflow audit` on the result and drops the database.
#
# Usage: bench/raw-postgres.sh [clients=32] [seconds=20]
# Environment: PGHOST (127.0.0.1), PGPORT (5432), PGUSER (postgres), BENCH_DB (orderflow_bench_raw),
#   CUSTOMERS (50), PRODUCTS (20), STOCK (10000000), THREADS (pgbench -j, 2),
#   ORDERFLOW (target/release/orderflow), KEEP_DB=1 to keep the scratch database,
#   SCRIPT (bench/place_order.pgbench.sql) to time a variant of the transaction.
# Run from the repository root after `cargo build --release --bins`.
set -euo pipefail

clients=${1:-32}
duration=${2:-20}
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
db=${BENCH_DB:-orderflow_bench_raw}
customers=${CUSTOMERS:-50}
products=${PRODUCTS:-20}
stock=${STOCK:-10000000}
threads=${THREADS:-2}
orderflow=${ORDERFLOW:-target/release/orderflow}
here=$(cd "$(dirname "$0")" && pwd)
script=$(realpath "${SCRIPT:-$here/place_order.pgbench.sql}")
url="postgres://${PGUSER}@${PGHOST}:${PGPORT}/${db}"

logs=$(mktemp -d)
cleanup() {
    rm -rf "$logs"
    if [ "${KEEP_DB:-0}" != 1 ]; then dropdb --if-exists "$db"; fi
}
trap cleanup EXIT

dropdb --if-exists "$db"
createdb "$db"
# The service's own schema, applied the way the service applies it.
"$orderflow" migrate --database-url "$url" >/dev/null
psql -q -X -v customers="$customers" -v products="$products" -v stock="$stock" \
    -f "$here/pgbench-setup.sql" "$db"
psql -q -X -c CHECKPOINT "$db"

echo "== pgbench: ${clients} clients, ${threads} threads, ${duration}s, ${customers} customers, ${products} products"
(cd "$logs" && pgbench -n -M prepared -c "$clients" -j "$threads" -T "$duration" -P 5 \
    -D customers="$customers" -D products="$products" \
    -l --log-prefix=tx -f "$script" "$db")

"$here/pgbench-latency.sh" "$logs"/tx.*

psql -X -At -c "SELECT 'orders stored: ' || count(*) FROM orders" "$db"
echo "== orderflow audit of the raw run"
"$orderflow" audit --database-url "$url"
