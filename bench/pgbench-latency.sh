#!/usr/bin/env bash
# p50/p90/p99/max of pgbench per-transaction logs (`pgbench -l`; field 3: latency in µs).
# Usage: bench/pgbench-latency.sh LOGFILE...
set -euo pipefail
cat "$@" | awk '{ print $3 }' | sort -n | awk '
    { v[NR] = $1 }
    END {
        if (NR == 0) { print "no transactions logged"; exit 1 }
        p50 = v[int(NR * 0.50 + 0.999999)]; p90 = v[int(NR * 0.90 + 0.999999)]
        p99 = v[int(NR * 0.99 + 0.999999)]
        printf "latency: p50 %.2f ms, p90 %.2f ms, p99 %.2f ms, max %.2f ms (n = %d)\n",
            p50 / 1000, p90 / 1000, p99 / 1000, v[NR] / 1000, NR
    }'
