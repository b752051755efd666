#!/usr/bin/env bash
# Regions over a WAN (issue 12): checkout p50/p99 of a "local" orderflow process on PostgreSQL and
# of a "remote" one whose every database chunk crosses a proxy adding ONE_WAY_MS each way
# (tests/wan.rs, tests/support/latency_proxy.rs), both taking checkouts at the same time.
# Target: remote p50 <= 2 x RTT + local p50 (a checkout is two database round trips).
#
# Usage: bench/wan.sh            (environment: ORDERS (400 per region), CLIENTS (4 per region),
#                                 ONE_WAY_MS (35), PROFILE (release | dev))
# Needs PostgreSQL at ORDERFLOW_TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres);
# creates and drops a scratch database. Prints the machine, the command and one line per region.
set -euo pipefail
cd "$(dirname "$0")/.."
ORDERS=${ORDERS:-400} CLIENTS=${CLIENTS:-4} ONE_WAY_MS=${ONE_WAY_MS:-35} PROFILE=${PROFILE:-release}
profile_flag=(); [ "$PROFILE" = release ] && profile_flag=(--release)
echo "# $(date -u '+%Y-%m-%d %H:%M UTC') $(nproc) cores, $(uname -sr), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo '+changes')"
set -x
ORDERFLOW_WAN_ORDERS=$ORDERS ORDERFLOW_WAN_CLIENTS=$CLIENTS ORDERFLOW_WAN_ONE_WAY_MS=$ONE_WAY_MS \
  cargo test "${profile_flag[@]}" --test wan -- --nocapture --test-threads 1 2>&1 | grep -E '^wan:|test result'
