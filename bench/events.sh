#!/usr/bin/env bash
# Events out benchmark (docs/BENCHMARKS.md, "Events out"), in one sitting, on PostgreSQL:
#
#   relay     (a) how fast the relay empties a backlog of committed events: the outbox is filled
#                 with RELAY_ORDERS orders placed by a `--mode api` server (nothing is relayed in
#                 that mode; each checkout writes one `order.placed` event), their jobs are deleted,
#                 then a `--mode worker` process (the relay, with no jobs to run) is started:
#                 a1 stamping alone (no NATS, no endpoint): positions assigned per second
#                    (`event_counter.last_position`);
#                 a2 NATS alone (every event already stamped): events acknowledged by JetStream
#                    per second (`event_channels.published_through`);
#                 a3 stamping + NATS from an unstamped outbox (positions reset, fresh NATS store);
#                 a4 as a3 plus one webhook endpoint (the sink): deliveries per second (counted by
#                    the sink), for at most WEBHOOK_SECONDS;
#                 a5 if a4 did not finish: the rest, by a new worker after ANALYZE webhook_deliveries.
#   checkout  (b) `--mode all` checkout at CLIENTS clients, CHECKOUT_ORDERS orders: events off (no
#                 NATS, no endpoint) and on (NATS + one endpoint), REPEAT times alternately; the
#                 backlog left when the loadgen finishes; the on/off ratio.
#   e2e       (c) loadgen `--end-to-end` (placed → fulfilled) with events off and on, at each of
#                 E2E_CLIENTS, E2E_ORDERS orders; then how long the events took to drain.
#
# Usage: bench/events.sh [relay] [checkout] [e2e]      (default: all three, in that order)
# Environment: PGHOST (127.0.0.1), PGPORT (5432), PGUSER (postgres), BENCH_DB (orderflow_bench_events),
#   RELAY_ORDERS (50000), WEBHOOK_SECONDS (30), CLIENTS (16), CHECKOUT_ORDERS (20000), REPEAT (1),
#   CHECKOUT_VARIANTS ("off on"; also `nats`: NATS without a webhook endpoint),
#   E2E_CLIENTS ("1 8"), E2E_ORDERS (2000), DRAIN_TIMEOUT (300: longest wait, in seconds, for the
#   events to drain after an end-to-end run), IDLE_WAIT (1800: longest wait, in seconds, for the
#   machine to be idle before a run), NATS_SERVER (/usr/sbin/nats-server), ORDERFLOW / LOADGEN,
#   ANALYZE_EVERY=<seconds> to ANALYZE the scratch database that often during each (b)/(c) run (as
#   autovacuum would; it is off on the machine this was written on), PROFILE=1 to sample the
#   database's active statements 10 times a second during a1–a3 and each (b)/(c) run (not for
#   timing), PROPOSED_INDEXES=1 to add, right after the schema is created, the two
#   webhook_deliveries indexes of the claim proposed in docs/BENCHMARKS.md ("Events out") — an
#   ablation, not the shipped schema (alone they do not change the claim's plan).
#
# Every run waits for the machine to be idle first (no `cargo`/`rustc` running, < 15% busy), and
# afterwards prints the CPU it used by owner (PostgreSQL, orderflow, loadgen, nats-server, sink,
# everything else); a run in which everything else used more than 8% of the machine is marked
# DISTURBED. A private nats-server (`-js`, a free port, a temporary store) and the webhook sink
# (bench/webhook-sink.py) are started here; the shared NATS on 4222 is never touched.
# Run from the repository root after `cargo build --release --bins`.
set -Eeuo pipefail

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(relay checkout e2e)
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
db=${BENCH_DB:-orderflow_bench_events}
url="postgres://${PGUSER}@${PGHOST}:${PGPORT}/${db}"
relay_orders=${RELAY_ORDERS:-50000}
webhook_seconds=${WEBHOOK_SECONDS:-30}
clients=${CLIENTS:-16}
checkout_orders=${CHECKOUT_ORDERS:-20000}
repeat=${REPEAT:-1}
checkout_variants=${CHECKOUT_VARIANTS:-off on}
e2e_clients=${E2E_CLIENTS:-1 8}
e2e_orders=${E2E_ORDERS:-2000}
idle_wait=${IDLE_WAIT:-1800}
drain_timeout=${DRAIN_TIMEOUT:-300}
nats_server=${NATS_SERVER:-/usr/sbin/nats-server}
orderflow=${ORDERFLOW:-target/release/orderflow}
loadgen=${LOADGEN:-target/release/orderflow-loadgen}
here=$(cd "$(dirname "$0")" && pwd)
secret=orderflow-bench-secret-0123456789abcdef
hz=$(getconf CLK_TCK)
cores=$(nproc)

work=$(mktemp -d /tmp/orderflow-bench-events.XXXXXX)
server_pid=
nats_pid=
sink_pid=
cleanup() {
    stop_server
    if [ -n "$nats_pid" ]; then kill "$nats_pid" 2>/dev/null; wait "$nats_pid" 2>/dev/null || true; fi
    if [ -n "$sink_pid" ]; then kill "$sink_pid" 2>/dev/null; wait "$sink_pid" 2>/dev/null || true; fi
    dropdb --if-exists --force "$db" 2>/dev/null || true
    echo "(logs kept in $work)"
}
trap cleanup EXIT
trap 'echo "bench/events.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
now() { printf %s "$EPOCHREALTIME"; }   # no fork: polling must stay cheap
q() { psql -X -At -q -c "$1" "$db"; }
say() { printf '%s\n' "$*"; }

listen=127.0.0.1:$(free_port)
metrics=127.0.0.1:$(free_port)
nats_port=$(free_port)
nats_monitor=$(free_port)
sink_port=$(free_port)
nats_url="nats://127.0.0.1:${nats_port}"
sink_url="http://127.0.0.1:${sink_port}/hook"

# ---- the machine, and what else runs on it ----

machine_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
proc_ticks() { # utime + stime of one process (0 once it is gone)
    if [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ]; then
        awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0
    else echo 0; fi
}
postgres_ticks() { # every postgres process, plus what the postmaster reaped from exited backends
    { cat /proc/[0-9]*/stat 2>/dev/null || true; } |
        awk '/^[0-9]+ \(postgres\) / { sub(/^[^)]*\) /, ""); s += $12 + $13 + $14 + $15 } END { print s + 0 }'
}
busy_percent() { # machine busy over one second, % of all cores
    local a b t1 t2
    read -r a t1 < <(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)
    sleep 1
    read -r b t2 < <(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)
    echo $(((b - a) * 100 / (t2 - t1 > 0 ? t2 - t1 : 1)))
}
others_running() { pgrep -a -f '(^|/)(cargo|rustc)( |$)' | grep -v "^$$ " | cut -c1-100 || true; }

wait_idle() { # before each timed run: no build or test suite running, machine < 15% busy
    local deadline=$((SECONDS + idle_wait)) busy running
    while :; do
        running=$(others_running)
        busy=$(busy_percent)
        if [ -z "$running" ] && [ "$busy" -lt 15 ]; then return 0; fi
        if [ $SECONDS -ge $deadline ]; then
            say "WARNING: machine not idle after ${idle_wait}s (busy ${busy}%; running: ${running:-nothing we know}); running anyway"
            return 0
        fi
        sleep 10
    done
}

cpu_begin() {
    cpu_t0=$(now)
    cpu_m0=$(machine_ticks)
    cpu_pg0=$(postgres_ticks)
    cpu_srv0=$(proc_ticks "$server_pid")
    cpu_nats0=$(proc_ticks "$nats_pid")
    cpu_sink0=$(proc_ticks "$sink_pid")
}
# cpu_end LABEL [loadgen-ticks]: prints the CPU of the run by owner.
cpu_end() {
    local label=$1 lg=${2:-0} t1 m1 pg1 srv1 nats1 sink1
    t1=$(now)
    m1=$(machine_ticks)
    pg1=$(postgres_ticks)
    srv1=$(proc_ticks "$server_pid")
    nats1=$(proc_ticks "$nats_pid")
    sink1=$(proc_ticks "$sink_pid")
    awk -v label="$label" -v hz="$hz" -v cores="$cores" -v t="$(awk -v a="$cpu_t0" -v b="$t1" 'BEGIN { print b - a }')" \
        -v m=$((m1 - cpu_m0)) -v pg=$((pg1 - cpu_pg0)) -v srv=$((srv1 - cpu_srv0)) -v nats=$((nats1 - cpu_nats0)) \
        -v sink=$((sink1 - cpu_sink0)) -v lg="$lg" 'BEGIN {
            other = m - pg - srv - nats - sink - lg; if (other < 0) other = 0
            share = 100 * other / hz / (t * cores)
            printf "  cpu [%s] over %.1fs: machine %.0f%% busy of %d cores; postgres %.1fs, orderflow %.1fs, loadgen %.1fs, nats-server %.1fs, sink %.1fs, everything else %.1fs (%.1f%% of the machine)%s\n",
                label, t, 100 * m / hz / (t * cores), cores, pg / hz, srv / hz, lg / hz, nats / hz, sink / hz, other / hz, share,
                (share > 8 ? "  DISTURBED" : "")
        }'
}

# ---- NATS, the sink, the server ----

start_nats() { # a fresh private JetStream server with an empty store
    if [ -n "$nats_pid" ]; then kill "$nats_pid" 2>/dev/null && wait "$nats_pid" 2>/dev/null || true; fi
    rm -rf "$work/nats"
    mkdir -p "$work/nats"
    "$nats_server" -a 127.0.0.1 -p "$nats_port" -m "$nats_monitor" -js -sd "$work/nats" >>"$work/nats.log" 2>&1 &
    nats_pid=$!
    for _ in $(seq 100); do
        curl -fs "http://127.0.0.1:${nats_monitor}/healthz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    say "nats-server did not start (see $work/nats.log)" >&2
    exit 2
}
nats_messages() { curl -fs "http://127.0.0.1:${nats_monitor}/jsz" | jq -r '.messages // 0'; }

start_sink() {
    python3 "$here/webhook-sink.py" "$sink_port" >>"$work/sink.log" 2>&1 &
    sink_pid=$!
    for _ in $(seq 100); do
        curl -fs "http://127.0.0.1:${sink_port}/stats" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    say "the webhook sink did not start (see $work/sink.log)" >&2
    exit 2
}
sink_posts() { curl -fs "http://127.0.0.1:${sink_port}/stats" | jq -r '.posts'; }
sink_stats() { curl -fs "http://127.0.0.1:${sink_port}/stats"; }

fresh_db() {
    dropdb --if-exists --force "$db"
    createdb "$db"
}

# start_server MODE [extra args…]: waits until it answers (API, or /metrics for a worker);
# with NO_WAIT=1 it returns at once (the relay runs from the first moment: sample it from there).
start_server() {
    local mode=$1
    shift
    server_log="$work/server-$(date +%H%M%S)-$mode.log"
    "$orderflow" --database-url "$url" --jwt-secret "$secret" --listen "$listen" --no-seed --mode "$mode" \
        --metrics-listen "$metrics" \
        --rate-limit-writes off --rate-limit-reads off --rate-limit-admin off --rate-limit-catalog off \
        "$@" >"$server_log" 2>&1 &
    server_pid=$!
    server_started=$(now)
    [ "${NO_WAIT:-0}" = 1 ] && return 0
    local probe="http://${listen}/health/ready"
    [ "$mode" = worker ] && probe="http://${metrics}/metrics"
    for _ in $(seq 300); do
        if curl -fs "$probe" >/dev/null 2>&1; then return 0; fi
        if ! kill -0 "$server_pid" 2>/dev/null; then break; fi
        sleep 0.1
    done
    say "orderflow did not start (see $server_log)" >&2
    cat "$server_log" >&2
    exit 2
}
stop_server() {
    if [ -n "${server_pid:-}" ]; then
        kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
        server_pid=
        # A statement still running for the stopped server goes on until it tries to answer:
        # end it, so that it does not load the next run.
        psql -X -At -q -c "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '${db}'
                           AND pid <> pg_backend_pid() AND state = 'active'" postgres 2>/dev/null |
            awk '$1 > 0 { print "  (ended " $1 " statement(s) still running for the stopped server)" }' || true
    fi
}

# The longest-running statements of the server right now (evidence of what the database is doing).
active_statements() {
    psql -X -At -F ' | ' -q -c "SELECT round(extract(epoch FROM now() - query_start)::numeric, 1) || ' s', wait_event_type,
        left(regexp_replace(query, '\s+', ' ', 'g'), 140) FROM pg_stat_activity
        WHERE datname = '${db}' AND pid <> pg_backend_pid() AND state = 'active' ORDER BY query_start LIMIT 3" postgres |
        sed 's/^/    /'
}

# A persistent psql session for sampling (one backend, no process per sample).
poll_open() {
    coproc POLL { psql -X -At -q "$db" 2>&1; }
}
pq() {
    printf '%s;\n' "$1" >&"${POLL[1]}"
    local line
    IFS= read -r -t 30 line <&"${POLL[0]}" || line=
    printf '%s\n' "$line"
}
poll_close() {
    if [ -n "${POLL_PID:-}" ]; then
        exec {POLL[1]}>&-
        wait "$POLL_PID" 2>/dev/null || true
    fi
}

# The ablation of PROPOSED_INDEXES=1: the claim of due deliveries walks pending deliveries in
# position order and counts leased ones without reading every pending row.
proposed_indexes() {
    [ "${PROPOSED_INDEXES:-0}" = 1 ] || return 0
    q "CREATE INDEX IF NOT EXISTS bench_webhook_deliveries_pending_position ON webhook_deliveries (endpoint_id, position) WHERE state = 'pending';
       CREATE INDEX IF NOT EXISTS bench_webhook_deliveries_pending_lease ON webhook_deliveries (endpoint_id, lease_expires_at) WHERE state = 'pending'"
    say "  (PROPOSED_INDEXES=1: added bench_webhook_deliveries_pending_position and bench_webhook_deliveries_pending_lease)"
}

add_endpoint() { # one enabled endpoint taking every event type, pointing at the sink
    local key
    key=$(python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')
    q "INSERT INTO webhook_endpoints (id, url, description, enabled_events, status, secret, created_at, updated_at)
       VALUES (gen_random_uuid(), '${sink_url}', 'bench/events.sh sink', '[\"*\"]', 'enabled', 'whsec_${key}', now(), now())"
}

# run_loadgen LABEL ARGS…: the loadgen under /usr/bin/time; its output is kept in $work and
# printed; sets loadgen_ticks.
run_loadgen() {
    local label=$1
    shift
    local out="$work/loadgen-$label.txt" cpu="$work/loadgen-$label.cpu"
    say "  \$ $loadgen --url http://${listen} --database-url $url --jwt-secret $secret $*"
    /usr/bin/time -o "$cpu" -f '%U %S' "$loadgen" --url "http://${listen}" --database-url "$url" \
        --jwt-secret "$secret" "$@" >"$out" 2>"$work/loadgen-$label.err" || say "  (loadgen exited with status $?)"
    sed 's/^/  | /' "$out"
    loadgen_ticks=$(awk -v hz="$hz" 'END { printf "%d", ($1 + $2) * hz }' "$cpu")
}

# watch_rate VALUE-COMMAND TARGET TIMEOUT LABEL: samples the command every 0.2 s until it reaches
# TARGET or TIMEOUT seconds pass; prints the rate between the last sample before progress and the
# last sample. Sampling costs one query on a persistent session (or one HTTP GET to the sink).
watch_rate() {
    local cmd=$1 target=$2 timeout=$3 label=$4 samples="$work/watch-${EPOCHSECONDS}-$RANDOM.txt"
    local value deadline=$((${EPOCHREALTIME/./} + timeout * 1000000))
    while :; do
        value=$(eval "$cmd" 2>/dev/null || echo 0)
        [[ "$value" =~ ^[0-9]+$ ]] || value=0
        printf '%s %s\n' "$EPOCHREALTIME" "$value" >>"$samples"
        if [ "$value" -ge "$target" ] || [ "${EPOCHREALTIME/./}" -gt "$deadline" ]; then break; fi
        sleep 0.2
    done
    awk -v target="$target" -v label="$label" -v started="$server_started" '
        NR == 1 { v0 = $2 }
        { t[NR] = $1; v[NR] = $2 }
        $2 == v0 { i0 = NR }
        END {
            n = NR; if (v[n] < target) note = sprintf(" (stopped at %d of %d: timeout)", v[n], target)
            dt = t[n] - t[i0]; if (dt <= 0) dt = 1e-9
            printf "  %s: %d in %.2fs = %.0f/s%s (%.2fs after the process started; first progress %.2fs after start)\n",
                label, v[n] - v[i0], dt, (v[n] - v[i0]) / dt, note, t[n] - started, t[i0] - started
        }' "$samples"
}

# ---- report header ----

say "== bench/events.sh ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))"
say "machine: nproc=$(nproc), $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo), $(free -m | awk '/Mem:/ { print $2 " MiB" }'), kernel $(uname -r)"
say "PostgreSQL: $(q 'SELECT version()' 2>/dev/null || psql -X -At -c 'SELECT version()' postgres)"
say "nats-server: $("$nats_server" --version)"
say "orderflow: $orderflow ($("$orderflow" --version 2>/dev/null || echo '?'), built $(date -u -r "$orderflow" '+%Y-%m-%d %H:%M UTC')); loadgen: $loadgen"
say "this checkout: $(git rev-parse --short HEAD 2>/dev/null || echo '?') with $(git status --short 2>/dev/null | wc -l) changed/new files"
say "ports: api $listen, metrics $metrics, nats $nats_url (monitor $nats_monitor), sink $sink_url"
say "also running now: $(others_running | tr '\n' ';' | sed 's/;$//')"
say "load: $(uptime)"
say "PostgreSQL settings: $(psql -X -At -c "SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) FROM pg_settings WHERE name IN ('autovacuum', 'fsync', 'synchronous_commit', 'shared_buffers', 'max_connections')" postgres)"
[ -n "${ANALYZE_EVERY:-}" ] && say "ANALYZE_EVERY=${ANALYZE_EVERY}: the scratch database is analyzed that often during (b) and (c) runs"
[ "${PROFILE:-0}" = 1 ] && say "PROFILE=1: active statements are sampled during (b) and (c) runs (a profiling run, not for timing)"
[ "${PROPOSED_INDEXES:-0}" = 1 ] && say "PROPOSED_INDEXES=1: an ablation with two extra webhook_deliveries indexes"

start_sink
start_nats

# PROFILE=1: what the database is busy with — the server's active statements, ten times a second,
# on one psql session (a profiling run, not for timing).
profile_start() {
    profile_pid=
    [ "${PROFILE:-0}" = 1 ] || return 0
    profile_file="$work/profile-$1.txt"
    printf '%s\n' "SELECT coalesce(wait_event_type, 'CPU') || ' | ' || left(regexp_replace(query, '\s+', ' ', 'g'), 90)
        FROM pg_stat_activity WHERE datname = '${db}' AND pid <> pg_backend_pid() AND state = 'active'
        AND query NOT LIKE 'ANALYZE%'" '\watch 0.1' | psql -X -At -q "$db" >"$profile_file" 2>/dev/null &
    profile_pid=$!
}
profile_stop() {
    [ -n "${profile_pid:-}" ] || return 0
    kill "$profile_pid" 2>/dev/null
    wait "$profile_pid" 2>/dev/null || true
    profile_pid=
    local n
    n=$(grep -c . "$profile_file" || true)
    say "  database profile ($n samples of an active statement, 10 looks a second):"
    sort "$profile_file" | uniq -c | sort -rn | head -8 |
        awk -v n="$n" '{ c = $1; $1 = ""; printf "    %5.1f%% %s\n", 100 * c / n, $0 }'
}

# ---- (a) relay ----

relay_reset() { # every event unstamped again, no channel, a fresh NATS store
    q "UPDATE events SET position = NULL; UPDATE event_counter SET last_position = 0; DELETE FROM event_channels;
       DELETE FROM webhook_deliveries; DELETE FROM webhook_endpoints"
    psql -X -q -c "VACUUM ANALYZE events" -c "VACUUM ANALYZE webhook_deliveries" -c CHECKPOINT "$db"
    start_nats
}

part_relay() {
    say ""
    say "== (a) relay throughput: an outbox of ${relay_orders} committed order.placed events"
    fresh_db
    say "  filling the outbox: --mode api server (no relay), loadgen at ${clients} clients"
    wait_idle
    start_server api
    run_loadgen relay-fill --concurrency "$clients" --orders "$relay_orders" --no-audit
    stop_server
    local events unstamped
    events=$(q "SELECT count(*) FROM events")
    unstamped=$(q "SELECT count(*) FROM events WHERE position IS NULL")
    say "  outbox: ${events} events, ${unstamped} unstamped; $(q "SELECT count(*) FROM jobs") jobs deleted (the worker runs the relay only)"
    say "  event size: $(q "SELECT round(avg(length(data))) || ' bytes of data on average'  FROM events")"
    q "DELETE FROM jobs"
    proposed_indexes
    psql -X -q -c "VACUUM ANALYZE" -c CHECKPOINT "$db"
    local nats_through="pq \"SELECT coalesce((SELECT published_through FROM event_channels WHERE channel = 'nats'), 0)\""

    say ""
    say "-- a1: stamping alone (worker, no --nats-url, no endpoint)"
    say "  \$ $orderflow --database-url $url --mode worker --metrics-listen $metrics"
    wait_idle
    poll_open
    profile_start a1
    cpu_begin
    NO_WAIT=1 start_server worker
    watch_rate "pq 'SELECT last_position FROM event_counter'" "$events" 300 "positions stamped"
    cpu_end a1
    profile_stop
    poll_close
    stop_server

    say ""
    say "-- a2: NATS alone (every event already stamped)"
    psql -X -q -c CHECKPOINT "$db"
    say "  \$ $orderflow --database-url $url --mode worker --metrics-listen $metrics --nats-url $nats_url"
    wait_idle
    poll_open
    profile_start a2
    cpu_begin
    NO_WAIT=1 start_server worker --nats-url "$nats_url"
    watch_rate "$nats_through" "$events" 300 "events acknowledged by JetStream"
    cpu_end a2
    profile_stop
    poll_close
    say "  /metrics: $(curl -fs "http://${metrics}/metrics" | grep -E '^orderflow_events_(unpublished|published_total)' | tr '\n' ' ')"
    say "  JetStream stream holds $(nats_messages) messages"
    stop_server

    say ""
    say "-- a3: stamping + NATS, from an unstamped outbox (positions reset, fresh NATS store)"
    relay_reset
    say "  \$ $orderflow --database-url $url --mode worker --metrics-listen $metrics --nats-url $nats_url"
    wait_idle
    poll_open
    profile_start a3
    cpu_begin
    NO_WAIT=1 start_server worker --nats-url "$nats_url"
    watch_rate "$nats_through" "$events" 300 "events stamped and acknowledged by JetStream"
    cpu_end a3
    profile_stop
    poll_close
    say "  JetStream stream holds $(nats_messages) messages"
    stop_server

    say ""
    say "-- a4: stamping + NATS + one webhook endpoint (the sink), from an unstamped outbox; at most ${webhook_seconds}s"
    relay_reset
    add_endpoint
    say "  \$ $orderflow --database-url $url --mode worker --metrics-listen $metrics --nats-url $nats_url   (+ endpoint $sink_url)"
    local posts0
    posts0=$(sink_posts)
    wait_idle
    poll_open
    cpu_begin
    NO_WAIT=1 start_server worker --nats-url "$nats_url"
    watch_rate "echo \$((\$(sink_posts) - $posts0))" "$events" "$webhook_seconds" "webhook deliveries received by the sink"
    cpu_end a4
    say "  NATS meanwhile: published_through $(pq "SELECT published_through FROM event_channels WHERE channel = 'nats'") of ${events}"
    say "  deliveries: $(pq "SELECT string_agg(state || ' ' || n, ', ') FROM (SELECT state, count(*) n FROM webhook_deliveries GROUP BY state) s")"
    say "  statistics the planner has for webhook_deliveries: $(pq "SELECT 'reltuples ' || reltuples || ', last analyzed ' || coalesce(greatest(last_analyze, last_autoanalyze)::text, 'never') FROM pg_class c JOIN pg_stat_user_tables t ON t.relid = c.oid WHERE c.relname = 'webhook_deliveries'")"
    say "  the server's longest-running statements now:"
    active_statements
    poll_close
    stop_server

    if [ "$(($(sink_posts) - posts0))" -lt "$events" ]; then
        # Every delivery was inserted after the last ANALYZE (of an empty table). Again, once the
        # planner's statistics have caught up with the table.
        say ""
        say "-- a5: as a4, continuing with what a4 left, after ANALYZE webhook_deliveries (a new worker); at most ${webhook_seconds}s"
        psql -X -q -c "ANALYZE webhook_deliveries" -c CHECKPOINT "$db"
        local posts1 pending
        posts1=$(sink_posts)
        pending=$(q "SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'")
        say "  pending deliveries at the start: ${pending}"
        wait_idle
        poll_open
        cpu_begin
        NO_WAIT=1 start_server worker --nats-url "$nats_url"
        watch_rate "echo \$((\$(sink_posts) - $posts1))" "$pending" "$webhook_seconds" "webhook deliveries received by the sink"
        cpu_end a5
        say "  the server's longest-running statements now:"
        active_statements
        poll_close
        stop_server
    fi
    say "  deliveries at the end: $(q "SELECT string_agg(state || ' ' || n, ', ') FROM (SELECT state, count(*) n FROM webhook_deliveries GROUP BY state) s"); sink: $(sink_stats)"
    dropdb --if-exists --force "$db"
}

# ---- (b) checkout with events off / on ----

# events_snapshot: the backlog right now (server still running).
events_snapshot() {
    q "SELECT 'events ' || (SELECT count(*) FROM events) || ', unstamped ' || (SELECT count(*) FROM events WHERE position IS NULL)
       || ', NATS published through ' || coalesce((SELECT published_through::text FROM event_channels WHERE channel = 'nats'), '-')
       || ' of ' || (SELECT last_position FROM event_counter)
       || ', webhook deliveries pending ' || (SELECT count(*) FROM webhook_deliveries WHERE state = 'pending')
       || ' delivered ' || (SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered')
       || ' failed ' || (SELECT count(*) FROM webhook_deliveries WHERE state = 'failed')
       || ', jobs ready/running ' || (SELECT count(*) FROM jobs WHERE state IN ('ready', 'running'))"
}

# events_drained: 0 when every event is stamped, NATS (if on) has everything and nothing is pending.
events_drained() {
    [ "$(q "SELECT (SELECT count(*) FROM events WHERE position IS NULL)
             + (SELECT count(*) FROM webhook_deliveries WHERE state = 'pending')
             + coalesce((SELECT (SELECT last_position FROM event_counter) - published_through FROM event_channels WHERE channel = 'nats'), 0)
             + (SELECT count(*) FROM jobs WHERE state IN ('ready', 'running'))")" = 0 ]
}

# one_run LABEL on|off LOADGEN-ARGS…
one_run() {
    local label=$1 events=$2
    shift 2
    fresh_db
    local extra=()
    if [ "$events" != off ]; then # on: NATS + one endpoint; nats: NATS only
        start_nats
        extra=(--nats-url "$nats_url")
    fi
    say ""
    say "-- ${label}: events ${events}"
    say "  \$ $orderflow --database-url $url --listen $listen --no-seed --mode all --rate-limit-*=off ${extra[*]:-}$([ "$events" = on ] && echo "   (+ endpoint $sink_url)")"
    start_server all "${extra[@]}"
    proposed_indexes
    if [ "$events" = on ]; then add_endpoint; fi
    psql -X -q -c CHECKPOINT "$db"
    local posts0 analyzer=
    posts0=$(sink_posts)
    wait_idle
    if [ -n "${ANALYZE_EVERY:-}" ]; then
        # What autovacuum (off on this machine, see the header) would do, at most this often.
        (while sleep "$ANALYZE_EVERY"; do psql -X -q -c ANALYZE "$db" 2>/dev/null || true; done) &
        analyzer=$!
    fi
    profile_start "$label"
    cpu_begin
    run_loadgen "$label" "$@"
    cpu_end "$label" "$loadgen_ticks"
    if [ -n "$analyzer" ]; then kill "$analyzer" 2>/dev/null; wait "$analyzer" 2>/dev/null || true; fi
    profile_stop
    say "  when the loadgen finished: $(events_snapshot); sink got $(($(sink_posts) - posts0)) posts"
}

part_checkout() {
    say ""
    say "== (b) checkout, --mode all, ${clients} clients, ${checkout_orders} orders: events off vs on (NATS + one endpoint)"
    local r
    local r v
    for r in $(seq "$repeat"); do
        for v in $checkout_variants; do
            one_run "b-$v-$r" "$v" --concurrency "$clients" --orders "$checkout_orders"
            stop_server
        done
    done
    say ""
    say "  orders/s (202 per second), and the ratio to events off in the same round:"
    for r in $(seq "$repeat"); do
        local line="  round $r:" off rate
        off=$(awk '/^throughput:/ { print $2 }' "$work/loadgen-b-off-$r.txt" 2>/dev/null || true)
        for v in $checkout_variants; do
            rate=$(awk '/^throughput:/ { print $2 }' "$work/loadgen-b-$v-$r.txt")
            line+=$(awk -v v="$v" -v rate="$rate" -v off="${off:-0}" 'BEGIN {
                printf " %s %.1f", v, rate; if (v != "off" && off > 0) printf " (%.2fx)", rate / off; printf ";" }')
        done
        say "$line"
    done
    dropdb --if-exists --force "$db"
}

# ---- (c) end to end ----

part_e2e() {
    say ""
    say "== (c) end to end (placed -> fulfilled), --mode all, ${e2e_orders} orders, loadgen --end-to-end"
    local c events
    for c in $e2e_clients; do
        for events in off on; do
            one_run "c-${events}-${c}" "$events" --concurrency "$c" --orders "$e2e_orders" --end-to-end
            # The loadgen waited for the jobs; now the events (stamped, on NATS, at the endpoint).
            local t0 waited drained=drained
            t0=$(now)
            until events_drained; do
                if awk -v a="$t0" -v b="$(now)" -v limit="$drain_timeout" 'BEGIN { exit !(b - a > limit) }'; then
                    drained="NOT drained (DRAIN_TIMEOUT)"
                    break
                fi
                sleep 0.25
            done
            waited=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
            say "  events ${drained} ${waited}s after the loadgen finished (incl. its audit): $(events_snapshot)"
            if [ "$events" = on ]; then
                say "  event committed -> webhook delivered: $(q "SELECT 'p50 ' || round(1000 * extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY d.delivered_at - e.created_at))) || ' ms, p99 '
                     || round(1000 * extract(epoch FROM percentile_cont(0.99) WITHIN GROUP (ORDER BY d.delivered_at - e.created_at))) || ' ms, max '
                     || round(1000 * extract(epoch FROM max(d.delivered_at - e.created_at))) || ' ms (n = ' || count(*) || ')'
                     FROM webhook_deliveries d JOIN events e ON e.id = d.event_id WHERE d.state = 'delivered'")"
                say "  JetStream stream holds $(nats_messages) messages; events: $(q "SELECT count(*) FROM events")"
                say "  per-order order at the endpoint: $(q "SELECT count(*) FROM webhook_deliveries a JOIN webhook_deliveries b
                     ON b.endpoint_id = a.endpoint_id AND b.subject = a.subject AND b.sequence > a.sequence
                     WHERE a.state = 'delivered' AND b.state = 'delivered' AND b.delivered_at < a.delivered_at") deliveries recorded before an earlier event of their order (must be 0)"
            fi
            stop_server
        done
    done
    dropdb --if-exists --force "$db"
}

for part in "${parts[@]}"; do
    case "$part" in
        relay) part_relay ;;
        checkout) part_checkout ;;
        e2e) part_e2e ;;
        *)
            say "unknown part: $part (relay, checkout, e2e)" >&2
            exit 2
            ;;
    esac
done
say ""
say "== done $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
