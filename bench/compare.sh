#!/usr/bin/env bash
# Issue 11's comparison in one sitting: raw PostgreSQL, raw SQLite, the service for each target,
# graphile-worker; prints the machine facts, every command it runs, and a table of ratios.
#
#   checkout  (target 2) raw PostgreSQL checkout tx/s (bench/raw-postgres.sh) vs the service's
#             checkout, --mode api (bench/service.sh postgres): goal >= 0.9x; raw SQLite FULL
#             tx/s (bench/raw-sqlite.py) vs bench/service.sh sqlite-full api: goal >= 1.0x
#   e2e       (target 1) placed -> fulfilled orders/s of one --mode all process (service.sh ... all)
#             vs the same raw rates: goal >= 0.5x on PostgreSQL and on SQLite FULL
#   flash     (target 3) FLASH_CLIENTS clients on ONE product with FLASH_UNITS units: the service's
#             orders/s (--mode api) vs pgbench's naive conditional UPDATE of that one row
#             (bench/flash-sale.pgbench.sql): goal >= 2x, service p99 <= 100 ms, sold out exactly
#   queue     (target 4) no-op jobs through the real runner (orderflow-queuebench) vs
#             graphile-worker 0.16 with its defaults (bench/graphile-worker/run.sh default): goal
#             >= 1.0x; also vs graphile-worker at the concurrency of its performance page
#             (`concurrent`, 0.16) and with its batching (`batched`, 0.17: the first release with it)
#
# Usage: bench/compare.sh [all|checkout|e2e|flash|queue]...   (default: all)
# Sizes (environment; defaults are the full run, e.g. `RAW_SECONDS=5 ORDERS=2000 E2E_ORDERS=500
# FLASH_UNITS=2000 QUEUE_JOBS=2000 bench/compare.sh` is a quick one):
#   CLIENTS (16)         clients of the checkout and end-to-end runs, raw and service
#   RAW_SECONDS (20)     length of each raw run (pgbench -T, raw-sqlite.py --seconds)
#   ORDERS (25000)       orders of each service checkout run
#   E2E_ORDERS (10000)   orders of each end-to-end run
#   FLASH_CLIENTS (64), FLASH_UNITS (20000)
#   QUEUE_JOBS (20000)   jobs of orderflow-queuebench and of every graphile-worker mode
#   QUEUE_ARGS ("")      more orderflow-queuebench flags, e.g. "--concurrency 32 --commit-batch 64"
#   GRAPHILE_MODES ("default concurrent batched")
#   SERVER_ARGS          more server flags for every service run (see bench/service.sh)
#   DB_PREFIX (orderflow_compare) scratch databases <prefix>_raw, _svc, _flash, _queue, _graphile
#   LISTEN (127.0.0.1:18181)      the service's address
# Also PGHOST (127.0.0.1), PGPORT (5432), PGUSER (postgres). Each tool's full output is kept in a
# log directory named at the start and at the end.
# Run from the repository root after `cargo build --release --bins`, on an otherwise idle machine.
set -uo pipefail

cd "$(dirname "$0")/.."
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
clients=${CLIENTS:-16}
raw_seconds=${RAW_SECONDS:-20}
orders=${ORDERS:-25000}
e2e_orders=${E2E_ORDERS:-10000}
flash_clients=${FLASH_CLIENTS:-64}
flash_units=${FLASH_UNITS:-20000}
queue_jobs=${QUEUE_JOBS:-20000}
queue_args=${QUEUE_ARGS:-}
graphile_modes=${GRAPHILE_MODES:-default concurrent batched}
orderflow=${ORDERFLOW:-target/release/orderflow}
loadgen=${LOADGEN:-target/release/orderflow-loadgen}
queuebench=${QUEUEBENCH:-target/release/orderflow-queuebench}
# Scratch databases (<prefix>_raw, _svc, _flash, _queue, _graphile) and the service's address: not
# the scripts' defaults, so that a bench script someone runs by hand meanwhile does not collide.
prefix=${DB_PREFIX:-orderflow_compare}
listen=${LISTEN:-127.0.0.1:18181}
export ORDERFLOW=$orderflow LOADGEN=$loadgen

sections=("$@")
if [ ${#sections[@]} -eq 0 ]; then sections=(all); fi
wants() {
    local section
    for section in "${sections[@]}"; do
        if [ "$section" = all ] || [ "$section" = "$1" ]; then return 0; fi
    done
    return 1
}
for section in "${sections[@]}"; do
    case "$section" in
        all | checkout | e2e | flash | queue) ;;
        *)
            echo "usage: $0 [all|checkout|e2e|flash|queue]..." >&2
            exit 2
            ;;
    esac
done
for binary in "$orderflow" "$loadgen" "$queuebench"; do
    if [ ! -x "$binary" ]; then
        echo "$binary is missing: run \`cargo build --release --bins\` first" >&2
        exit 2
    fi
done

logs=$(mktemp -d /tmp/orderflow-compare.XXXXXX)
rows=()    # "what|orderflow|baseline|ratio|goal|verdict"
notes=()

# ---- Machine facts ----
echo "== machine"
echo "date:        $(date -Is)"
echo "commit:      $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
echo "host:        $(uname -srm); $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'))"
echo "memory:      $(free -m | awk '/^Mem:/ { print $2 " MiB total, " $7 " MiB available" }')"
echo "postgresql:  $(psql -X -At -c 'SHOW server_version' postgres 2>&1) (fsync $(psql -X -At -c 'SHOW fsync' postgres 2>&1), synchronous_commit $(psql -X -At -c 'SHOW synchronous_commit' postgres 2>&1), shared_buffers $(psql -X -At -c 'SHOW shared_buffers' postgres 2>&1)); $(pgbench --version)"
echo "sqlite:      $(python3 -c 'import sqlite3; print(sqlite3.sqlite_version)') (raw-sqlite.py, Python $(python3 -c 'import platform; print(platform.python_version())')); the service: the SQLite bundled with the libsqlite3-sys crate $(awk '/^name = "libsqlite3-sys"/ { getline; gsub(/[^0-9.]/, ""); print }' Cargo.lock)"
echo "node:        $(node --version 2>&1); graphile-worker $(cd bench/graphile-worker && node -p "require('graphile-worker/package.json').version + ' (default, concurrent), ' + require('graphile-worker-batched/package.json').version + ' (batched)'" 2>/dev/null || echo "not installed yet (run.sh installs it)")"
echo "rustc:       $(rustc --version 2>&1)"
echo "load:        $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min)"
echo "logs:        $logs"
others=$(pgrep -x 'orderflow(-.*)?|pgbench|cargo|rustc' | wc -l)
if [ "$others" -gt 0 ]; then
    echo "WARNING: $others other orderflow/pgbench/cargo process(es) are running: these numbers will not be from a quiet machine"
    notes+=("$others other orderflow/pgbench/cargo process(es) were running at the start")
fi
echo

# Runs a command, logging its output to $logs/<name>.log and echoing the command first.
run() {
    local name=$1
    shift
    echo "+ $*"
    local started=$SECONDS
    "$@" >"$logs/$name.log" 2>&1
    local status=$?
    echo "  -> exit $status in $((SECONDS - started))s, log $logs/$name.log"
    return $status
}
# Same, with environment assignments in front (`run_env NAME VAR=value... -- command...`).
run_env() {
    local name=$1
    shift
    local assignments=()
    while [ "$1" != -- ]; do
        assignments+=("$1")
        shift
    done
    shift
    echo "+ ${assignments[*]} $*"
    local started=$SECONDS
    env "${assignments[@]}" "$@" >"$logs/$name.log" 2>&1
    local status=$?
    echo "  -> exit $status in $((SECONDS - started))s, log $logs/$name.log"
    return $status
}
# First number after a pattern in a log: `grab LOG 'sed -E regex with one group'`.
grab() {
    sed -nE "s/$2/\1/p" "$logs/$1.log" | head -n 1
}
# a / b with two decimals, or "?" when either is missing.
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b + 0 == 0) print "?"; else printf "%.2f", a / b }'
}
# "ok" when ratio >= goal, else "BELOW".
verdict() {
    awk -v r="$1" -v g="$2" 'BEGIN { if (r == "?") print "?"; else if (r + 0 >= g + 0) print "ok"; else print "BELOW" }'
}
# A number with one decimal, or "?".
one() { awk -v n="$1" 'BEGIN { if (n == "") print "?"; else printf "%.1f", n }'; }
row() { # what, orderflow, baseline, goal
    local r
    r=$(ratio "$2" "$3")
    rows+=("$1|$(one "$2")|$(one "$3")|${r}x|>= ${4}x|$(verdict "$r" "$4")")
}
pgbench_latency() { bench/pgbench-latency.sh "$@"; }

# ---- The raw baselines, run once and shared by the sections that compare with them ----
raw_pg_tps=
raw_pg_done=0
raw_postgres() {
    if [ $raw_pg_done = 1 ]; then return; fi
    raw_pg_done=1
    run_env raw-postgres BENCH_DB="${prefix}_raw" -- bench/raw-postgres.sh "$clients" "$raw_seconds"
    raw_pg_tps=$(grab raw-postgres '^tps = ([0-9.]+).*')
    echo "  raw PostgreSQL checkout: ${raw_pg_tps:-?} tx/s ($(grep -m1 '^latency: p50' "$logs/raw-postgres.log"))"
}
raw_sqlite_tps=
raw_sqlite_done=0
raw_sqlite() {
    if [ $raw_sqlite_done = 1 ]; then return; fi
    raw_sqlite_done=1
    run raw-sqlite bench/raw-sqlite.py --seconds "$raw_seconds" --synchronous full
    raw_sqlite_tps=$(grab raw-sqlite '^tps = ([0-9.]+).*')
    echo "  raw SQLite FULL checkout: ${raw_sqlite_tps:-?} tx/s ($(grep -m1 '^latency: p50' "$logs/raw-sqlite.log"))"
}
# The service's numbers from a loadgen log.
orders_per_s() { grab "$1" '^throughput: +([0-9.]+) orders\/s.*'; }
fulfilled_per_s() { grab "$1" '^ +throughput: +([0-9.]+) orders\/s fulfilled.*'; }
p99_202() { grab "$1" '^latency \(202\):.* p99 ([0-9.]+) ms.*'; }
service() { # name backend clients orders mode [VAR=value...]
    local name=$1 backend=$2 n=$3 count=$4 mode=$5
    shift 5
    run_env "$name" BENCH_DB="${prefix}_svc" LISTEN="$listen" "$@" -- bench/service.sh "$backend" "$n" "$count" "$mode"
    local status=$?
    if [ $status != 0 ]; then notes+=("$name: exit $status (audit failed, an order missing, or 5xx/transport errors; see its log)"); fi
    echo "  $(grep -m1 '^throughput' "$logs/$name.log")"
    echo "  $(grep -m1 '^latency (202)' "$logs/$name.log")"
    if [ "$mode" = all ]; then
        echo "  $(grep -m1 'orders/s fulfilled' "$logs/$name.log")"
        echo "  $(grep -m1 -A1 'orders/s fulfilled' "$logs/$name.log" | tail -n 1)"
    fi
}

# ---- Sections ----
if wants checkout; then
    echo "== checkout (target 2): ${clients} clients"
    raw_postgres
    service svc-pg-api postgres "$clients" "$orders" api
    row "checkout PostgreSQL, api vs raw (orders/s : tx/s)" "$(orders_per_s svc-pg-api)" "$raw_pg_tps" 0.9
    raw_sqlite
    service svc-sqlite-api sqlite-full "$clients" "$orders" api
    row "checkout SQLite full, api vs raw (orders/s : tx/s)" "$(orders_per_s svc-sqlite-api)" "$raw_sqlite_tps" 1.0
    echo
fi

if wants e2e; then
    echo "== end to end (target 1): ${clients} clients, --mode all, placed -> fulfilled"
    raw_postgres
    service svc-pg-all postgres "$clients" "$e2e_orders" all
    row "e2e PostgreSQL, fulfilled/s vs raw checkout tx/s" "$(fulfilled_per_s svc-pg-all)" "$raw_pg_tps" 0.5
    raw_sqlite
    service svc-sqlite-all sqlite-full "$clients" "$e2e_orders" all
    row "e2e SQLite full, fulfilled/s vs raw checkout tx/s" "$(fulfilled_per_s svc-sqlite-all)" "$raw_sqlite_tps" 0.5
    notes+=("e2e p99 target (<= 250 ms) applies at half the load: run bench/service.sh ... all with fewer clients")
    echo
fi

if wants flash; then
    echo "== flash sale (target 3): ${flash_clients} clients, 1 product, ${flash_units} units"
    flash_db=${prefix}_flash
    per_client=$(((flash_units + flash_clients - 1) / flash_clients))
    dropdb --if-exists "$flash_db" 2>/dev/null
    createdb "$flash_db" &&
        "$orderflow" migrate --database-url "postgres://${PGUSER}@${PGHOST}:${PGPORT}/${flash_db}" >/dev/null &&
        psql -q -X -v customers=1 -v products=1 -v stock="$flash_units" -f bench/pgbench-setup.sql "$flash_db" &&
        psql -q -X -c CHECKPOINT "$flash_db"
    pid=$(psql -X -At -c 'SELECT id FROM products' "$flash_db")
    mkdir -p "$logs/flash-tx"
    (
        cd "$logs/flash-tx" &&
            run flash-pgbench pgbench -n -M prepared -c "$flash_clients" -j 2 -t "$per_client" -D pid="$pid" \
                -l --log-prefix=tx -f "$OLDPWD/bench/flash-sale.pgbench.sql" "$flash_db"
    )
    flash_naive=$(grab flash-pgbench '^tps = ([0-9.]+).*')
    flash_naive_latency=$(pgbench_latency "$logs"/flash-tx/tx.*)
    flash_left=$(psql -X -At -c 'SELECT on_hand - reserved FROM products' "$flash_db")
    echo "  naive conditional UPDATE: ${flash_naive:-?} tx/s, $flash_naive_latency, units left: $flash_left"
    dropdb --if-exists "$flash_db"
    service svc-flash postgres "$flash_clients" "$flash_units" api \
        ORDERFLOW_LOADGEN_PRODUCTS=1 ORDERFLOW_LOADGEN_STOCK="$flash_units"
    flash_accepted=$(grab svc-flash '^ +202: ([0-9]+),.*')
    flash_p99=$(p99_202 svc-flash)
    row "flash sale, api orders/s vs naive UPDATE tx/s" "$(orders_per_s svc-flash)" "$flash_naive" 2
    rows+=("flash sale p99 (ms), service|${flash_p99:-?}|$(echo "$flash_naive_latency" | sed -nE 's/.* p99 ([0-9.]+) ms.*/\1/p')|-|<= 100 ms|$(awk -v p="$flash_p99" 'BEGIN { if (p == "") print "?"; else if (p + 0 <= 100) print "ok"; else print "ABOVE" }')")
    rows+=("flash sale, orders accepted of ${flash_units} units|${flash_accepted:-?}|${flash_units}|-|= ${flash_units}|$([ "${flash_accepted:-}" = "$flash_units" ] && echo ok || echo "NOT SOLD OUT")")
    echo
fi

if wants queue; then
    echo "== queue (target 4): ${queue_jobs} no-op jobs on PostgreSQL"
    queue_db=${prefix}_queue
    dropdb --if-exists "$queue_db" 2>/dev/null
    createdb "$queue_db"
    # shellcheck disable=SC2086 # QUEUE_ARGS is a list of flags
    run queuebench "$queuebench" --database-url "postgres://${PGUSER}@${PGHOST}:${PGPORT}/${queue_db}" \
        --jobs "$queue_jobs" $queue_args
    status=$?
    if [ $status != 0 ]; then notes+=("queuebench: exit $status (see its log)"); fi
    dropdb --if-exists "$queue_db"
    queue_rate=$(grab queuebench '^queuebench: .* = ([0-9.]+) jobs\/s.*')
    echo "  $(grep -m1 '^queuebench:' "$logs/queuebench.log")"
    for mode in $graphile_modes; do
        run_env "graphile-$mode" BENCH_DB="${prefix}_graphile" -- bench/graphile-worker/run.sh "$mode" "$queue_jobs"
        status=$?
        if [ $status != 0 ]; then notes+=("graphile-worker $mode: exit $status (see its log)"); fi
        echo "  $(grep -m1 '^graphile-worker (' "$logs/graphile-$mode.log")"
        graphile_rate=$(grab "graphile-$mode" '^graphile-worker \(.*\): .* = ([0-9.]+) jobs\/s.*')
        case "$mode" in
            default) row "queue, orderflow vs graphile-worker 0.16 defaults (jobs/s)" "$queue_rate" "$graphile_rate" 1.0 ;;
            concurrent) row "queue, orderflow vs graphile-worker 0.16 concurrent (info)" "$queue_rate" "$graphile_rate" 1.0 ;;
            batched) row "queue, orderflow vs graphile-worker 0.17 batched (info)" "$queue_rate" "$graphile_rate" 1.0 ;;
            *) row "queue, orderflow vs graphile-worker $mode" "$queue_rate" "$graphile_rate" 1.0 ;;
        esac
    done
    echo
fi

# ---- The table ----
echo "== ratios (orderflow : baseline, same sitting)"
{
    echo "what|orderflow|baseline|ratio|goal|"
    for line in "${rows[@]}"; do echo "$line"; done
} | column -t -s '|'
for note in "${notes[@]}"; do echo "note: $note"; done
echo "logs: $logs"
