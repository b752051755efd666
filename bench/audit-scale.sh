#!/usr/bin/env bash
# The audit at scale (issue 13): creates a scratch PostgreSQL database, migrates it with the
# service's own migrations (`orderflow migrate`), fills it with N realistic orders and everything
# the audit reads — lines, timeline, events, payments, the sandbox's intents, e-mails, stock ledger,
# idempotency records, jobs, refunds — with SQL generate_series (bench/audit-scale-fill.sql),
# consistent so that the audit is clean, then times `orderflow audit` under /usr/bin/time -v and
# prints its wall-clock seconds and peak RSS. Fails if the audit is not clean.
#
# Usage: bench/audit-scale.sh [orders=1000000]
# Environment: PGHOST (127.0.0.1), PGPORT (5432), PGUSER (postgres), BENCH_DB (orderflow_audit_scale),
#   CUSTOMERS (orders / 20), ORDERFLOW (target/release/orderflow), RUNS (1: audits timed one after
#   another on the same data), KEEP_DB=1 to keep the scratch database (then REUSE_DB=1 skips the fill).
# Run from the repository root after `cargo build --release --bin orderflow`.
set -euo pipefail

orders=${1:-1000000}
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
db=${BENCH_DB:-orderflow_audit_scale}
customers=${CUSTOMERS:-$(( orders / 20 > 0 ? orders / 20 : 1 ))}
orderflow=${ORDERFLOW:-target/release/orderflow}
runs=${RUNS:-1}
here=$(cd "$(dirname "$0")" && pwd)
url="postgres://${PGUSER}@${PGHOST}:${PGPORT}/${db}"

logs=$(mktemp -d)
cleanup() {
    rm -rf "$logs"
    if [ "${KEEP_DB:-0}" != 1 ]; then dropdb --if-exists "$db"; fi
}
trap cleanup EXIT

if [ "${REUSE_DB:-0}" != 1 ]; then
    dropdb --if-exists "$db"
    createdb "$db"
    "$orderflow" migrate --database-url "$url" >/dev/null
    echo "== filling ${db} with ${orders} orders (${customers} customers)"
    start=$(date +%s.%N)
    psql -q -X -v orders="$orders" -v customers="$customers" -f "$here/audit-scale-fill.sql" "$db"
    # What autovacuum would have done on a live database: statistics and the visibility map.
    psql -q -X -c "VACUUM (ANALYZE)" "$db"
    psql -q -X -c CHECKPOINT "$db"
    echo "filled in $(echo "$(date +%s.%N) - $start" | bc | xargs printf '%.0f') s;" \
        "database size $(psql -X -At -c "SELECT pg_size_pretty(pg_database_size(current_database()))" "$db")"
    psql -X -At -F ' ' -c "SELECT 'rows:', (SELECT count(*) FROM orders) || ' orders,',
        (SELECT count(*) FROM order_items) || ' lines,', (SELECT count(*) FROM order_events) || ' timeline entries,',
        (SELECT count(*) FROM events) || ' events,', (SELECT count(*) FROM payments) || ' payments,',
        (SELECT count(*) FROM notifications) || ' e-mails,', (SELECT count(*) FROM inventory_ledger) || ' ledger rows,',
        (SELECT count(*) FROM jobs) || ' jobs'" "$db"
fi

for run in $(seq 1 "$runs"); do
    echo "== orderflow audit, run ${run}/${runs}"
    status=0
    /usr/bin/time -v -o "$logs/time" "$orderflow" audit --database-url "$url" >"$logs/report" 2>&1 || status=$?
    if [ "$status" != 0 ]; then
        cat "$logs/report"
        echo "the audit exited with ${status}: the benchmark data should be clean" >&2
        exit 1
    fi
    tail -n 1 "$logs/report"
    wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$logs/time")
    seconds=$(echo "$wall" | awk -F: '{ if (NF == 3) print $1 * 3600 + $2 * 60 + $3; else print $1 * 60 + $2 }')
    rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$logs/time")
    echo "audit of ${orders} orders: ${seconds} s wall clock, peak RSS $(( rss / 1024 )) MiB"
done
