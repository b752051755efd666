#!/usr/bin/env bash
# Measures the CPU an idle orderflow server (API + workers) uses over a period: it should be near
# zero — workers sleep until a wake-up (in-process on SQLite, LISTEN/NOTIFY on PostgreSQL) with
# only a slow poll fallback.
#
#   bench/idle-cpu.sh [seconds] [database-url]
#   e.g. bench/idle-cpu.sh 60
#        bench/idle-cpu.sh 60 postgres://postgres@127.0.0.1:5432/orderflow_idle
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
database_url=${2:-}
bin=target/release/orderflow
[ -x "$bin" ] || cargo build --release --bin orderflow
data=$(mktemp -d)
args=(--data-dir "$data" --listen 127.0.0.1:0)
[ -n "$database_url" ] && args+=(--database-url "$database_url")
ORDERFLOW_LOG=warn "$bin" "${args[@]}" >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$data"' EXIT
sleep 3 # start-up (migrations, seeding) is not idle time
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
hz=$(getconf CLK_TCK)
before=$(ticks)
sleep "$seconds"
after=$(ticks)
awk -v t=$((after - before)) -v hz="$hz" -v s="$seconds" -v db="${database_url:-embedded SQLite}" \
  'BEGIN { printf "idle for %ds on %s: %.2f s of CPU (%.3f%% of one core)\n", s, db, t / hz, 100 * t / hz / s }'
