#!/usr/bin/env bash
# The service side of the checkout benchmark: starts a fresh orderflow server (a scratch
# PostgreSQL database, or a fresh embedded SQLite data directory), runs orderflow-loadgen against
# it (which prints orders/s, latency and the audit), then stops the server and removes the
# scratch database or directory.
#
# Usage: bench/service.sh postgres|sqlite-full|sqlite-normal [concurrency=32] [orders=25000] [mode=api]
#   mode: `api` (checkout only; what bench/raw-postgres.sh compares with) or `all` (the server
#   also runs the payment/fulfilment/e-mail workers, and the loadgen waits for every order to be
#   fulfilled: `--end-to-end`, fulfilled orders/s and placed → fulfilled latency).
# Environment: PGHOST (127.0.0.1), PGPORT (5432), PGUSER (postgres), BENCH_DB (orderflow_bench_svc),
#   LISTEN (127.0.0.1:18081), ORDERFLOW / LOADGEN (the release binaries), and any
#   ORDERFLOW_LOADGEN_* setting (e.g. ORDERFLOW_LOADGEN_LINES=3), SERVER_ARGS (more server flags,
#   e.g. "--commit-batch 1"), CPU_REPORT=1 (after the run, print the CPU seconds the server and,
#   on PostgreSQL, its database backends spent per order: a measure that other load on the machine
#   disturbs far less than orders/s).
# Run from the repository root after `cargo build --release --bins`.
set -euo pipefail

backend=${1:?usage: bench/service.sh postgres|sqlite-full|sqlite-normal [concurrency] [orders] [mode]}
concurrency=${2:-32}
orders=${3:-25000}
mode=${4:-api}
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
listen=${LISTEN:-127.0.0.1:18081}
orderflow=${ORDERFLOW:-target/release/orderflow}
loadgen=${LOADGEN:-target/release/orderflow-loadgen}
secret=orderflow-bench-secret-0123456789abcdef

server_pid=
data_dir=
db=
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true; fi
    if [ -n "$db" ]; then dropdb --if-exists "$db"; fi
    if [ -n "$data_dir" ]; then rm -rf "$data_dir"; fi
}
trap cleanup EXIT

case "$backend" in
    postgres)
        db=${BENCH_DB:-orderflow_bench_svc}
        dropdb --if-exists "$db"
        createdb "$db"
        url="postgres://${PGUSER}@${PGHOST}:${PGPORT}/${db}"
        server_args=(--database-url "$url")
        ;;
    sqlite-full | sqlite-normal)
        data_dir=$(mktemp -d /tmp/orderflow-bench-sqlite.XXXXXX)
        url="sqlite://${data_dir}/orderflow.db"
        server_args=(--data-dir "$data_dir" --sqlite-durability "${backend#sqlite-}")
        ;;
    *)
        echo "unknown backend: $backend" >&2
        exit 2
        ;;
esac

server_log=$(mktemp /tmp/orderflow-bench-server.XXXXXX.log)
# Rate limits off: the benchmark measures capacity, and its few customers each place far more
# orders per second than the per-customer default allows.
"$orderflow" "${server_args[@]}" --jwt-secret "$secret" --listen "$listen" --no-seed --mode "$mode" \
    --rate-limit-writes off --rate-limit-reads off --rate-limit-admin off --rate-limit-catalog off \
    ${SERVER_ARGS:-} >"$server_log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do
    if curl -fs "http://${listen}/health/ready" >/dev/null; then break; fi
    sleep 0.1
done
if [ "$backend" = postgres ]; then psql -q -X -c CHECKPOINT "$db"; fi

echo "== orderflow ($backend, --mode $mode): ${concurrency} concurrent clients, ${orders} orders (server log: $server_log)"
loadgen_args=()
if [ "$mode" = all ]; then loadgen_args+=(--end-to-end); fi
"$loadgen" --url "http://${listen}" --database-url "$url" --jwt-secret "$secret" \
    --concurrency "$concurrency" --orders "$orders" "${loadgen_args[@]}"

# CPU seconds (user + system) of a process, from /proc (fields 14 and 15, in clock ticks).
cpu_seconds() {
    awk -v hz="$(getconf CLK_TCK)" '{ split($0, a, ") "); split(a[2], f, " "); printf "%.2f", (f[12] + f[13]) / hz }' \
        "/proc/$1/stat" 2>/dev/null || echo 0
}
if [ "${CPU_REPORT:-}" = 1 ]; then
    server_cpu=$(cpu_seconds "$server_pid")
    backend_cpu=0
    if [ "$backend" = postgres ]; then
        for pid in $(psql -At -X -c "SELECT pid FROM pg_stat_activity WHERE datname = '$db' \
                AND application_name LIKE 'orderflow%'" "$db"); do
            backend_cpu=$(echo "$backend_cpu + $(cpu_seconds "$pid")" | bc)
        done
    fi
    echo "cpu: server ${server_cpu} s, database backends ${backend_cpu} s;" \
        "per order: server $(echo "scale=3; 1000 * $server_cpu / $orders" | bc) ms," \
        "database $(echo "scale=3; 1000 * $backend_cpu / $orders" | bc) ms"
fi
