#!/usr/bin/env bash
# graphile-worker's side of the queue benchmark (issue 11, target 4): no-op jobs (tasks/noop.js)
# through graphile-worker on the same PostgreSQL as `orderflow-queuebench`, in a scratch database.
#
# 1. Installs the pinned packages (package.json) with npm when node_modules/ is missing.
# 2. Creates the scratch database, installs graphile-worker's schema with its own CLI
#    (`graphile-worker -c URL --schema-only`), and enqueues JOBS jobs in ONE statement
#    (`graphile_worker.add_jobs` over a generate_series) — not timed.
# 3. Timed: runs the worker through graphile-worker's library entry point `run()` (what its CLI
#    calls) and stops the clock when the last job is gone from `graphile_worker._private_jobs`
#    (graphile-worker deletes a job when it completes it; its `job:complete` events are counted
#    first, then the table is polled every 2 ms until it is empty). The clock starts at the
#    worker pool's `pool:create` event, after its start-up (connect, schema check, task loading),
#    as orderflow-queuebench's clock starts with its runner, after the store is open.
#    Not `graphile-worker --once`: that always runs ONE job at a time whatever `--jobs` says, and
#    its wall time would include Node's start-up.
# 4. Prints one line: `graphile-worker (<mode>): N jobs in S s = R jobs/s (settings)`.
#
# Modes:
#   default    graphile-worker 0.16 (the version issue 11 names) with its default settings:
#              concurrentJobs 1, maxPoolSize 10, pollInterval 2000, prepared statements on.
#   concurrent graphile-worker 0.16 with CONCURRENCY (24) jobs at once and a pool of
#              CONCURRENCY + 1: the configuration of graphile-worker's performance page without its
#              batching options, which 0.16 does not have.
#   batched    graphile-worker 0.17 (package.json's `graphile-worker-batched`: batching first
#              shipped in 0.17.0; 0.16 has no getJobBatchSize / completeJobBatchDelay /
#              failJobBatchDelay / localQueue) with the configuration of its performance page
#              (https://worker.graphile.org/docs/performance, "Quick stats"; the options are
#              documented in node_modules/graphile-worker-batched/dist/index.d.ts):
#                concurrentJobs: CONCURRENCY (24), maxPoolSize: CONCURRENCY + 1 (25),
#                localQueue: { size: LOCAL_QUEUE (500) }   -- fetch and lock jobs in batches
#                completeJobBatchDelay: 0, failJobBatchDelay: 0 -- complete/fail in batches
#
# Usage: bench/graphile-worker/run.sh [default|concurrent|batched] [jobs=20000]
# Environment: PGHOST (127.0.0.1), PGPORT (5432), PGUSER (postgres), BENCH_DB
#   (orderflow_bench_graphile), CONCURRENCY (24), LOCAL_QUEUE (500), KEEP_DB=1 to keep the
#   scratch database, LOG (a file for graphile-worker's own log; default a temporary file, removed).
# graphile-worker logs one line per job at its default level (as orderflow does); it goes to LOG.
set -euo pipefail

mode=${1:-default}
jobs=${2:-20000}
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
db=${BENCH_DB:-orderflow_bench_graphile}
concurrency=${CONCURRENCY:-24}
local_queue=${LOCAL_QUEUE:-500}
here=$(cd "$(dirname "$0")" && pwd)
url="postgres://${PGUSER}@${PGHOST}:${PGPORT}/${db}"

case "$mode" in
    default | concurrent) package=graphile-worker ;;
    batched) package=graphile-worker-batched ;;
    *)
        echo "usage: $0 [default|concurrent|batched] [jobs]" >&2
        exit 2
        ;;
esac

cd "$here"
if [ ! -d node_modules ]; then
    npm install --no-audit --no-fund >&2
fi
version=$(node -p "require('$package/package.json').version")

log=${LOG:-}
remove_log=0
if [ -z "$log" ]; then
    log=$(mktemp /tmp/orderflow-bench-graphile.XXXXXX.log)
    remove_log=1
fi
cleanup() {
    if [ "$remove_log" = 1 ]; then rm -f "$log"; fi
    if [ "${KEEP_DB:-0}" != 1 ]; then dropdb --if-exists "$db"; fi
}
trap cleanup EXIT

dropdb --if-exists "$db"
createdb "$db"
node "node_modules/$package/dist/cli.js" -c "$url" --schema-only >>"$log" 2>&1
psql -q -X -v ON_ERROR_STOP=1 -v jobs="$jobs" "$db" <<'SQL'
SELECT count(*) AS enqueued FROM graphile_worker.add_jobs(ARRAY(
    SELECT ROW('noop', '{}'::json, NULL, NULL, NULL, NULL, NULL, NULL)::graphile_worker.job_spec
    FROM generate_series(1, :jobs)))
\gset
SELECT :enqueued = :jobs AS enqueued_all
\gset
\if :enqueued_all
\else
SELECT 'enqueueing failed'::int;
\endif
CHECKPOINT;
SQL

MODE=$mode PACKAGE=$package VERSION=$version JOBS=$jobs CONCURRENCY=$concurrency LOCAL_QUEUE=$local_queue \
    DATABASE_URL=$url node - 3>&1 >>"$log" 2>&1 <<'JS'
const { EventEmitter } = require("events");
const fs = require("fs");
const path = require("path");
const env = process.env;
const { run } = require(env.PACKAGE);
// graphile-worker's own PostgreSQL client library, for polling the jobs table.
const { Client } = require(require.resolve("pg", { paths: [path.dirname(require.resolve(env.PACKAGE))] }));
const total = Number(env.JOBS);
const concurrency = Number(env.CONCURRENCY);

const worker = { connectionString: env.DATABASE_URL, taskDirectory: path.join(process.cwd(), "tasks") };
let settings = "defaults: concurrentJobs 1, maxPoolSize 10";
if (env.MODE === "concurrent") {
  Object.assign(worker, { concurrentJobs: concurrency, maxPoolSize: concurrency + 1 });
  settings = `concurrentJobs ${concurrency}, maxPoolSize ${concurrency + 1}`;
} else if (env.MODE === "batched") {
  Object.assign(worker, {
    concurrentJobs: concurrency,
    maxPoolSize: concurrency + 1,
    localQueue: { size: Number(env.LOCAL_QUEUE) },
    completeJobBatchDelay: 0,
    failJobBatchDelay: 0,
  });
  settings =
    `concurrentJobs ${concurrency}, maxPoolSize ${concurrency + 1}, localQueue.size ${env.LOCAL_QUEUE}, ` +
    "completeJobBatchDelay 0, failJobBatchDelay 0";
}

const report = (line) => fs.writeSync(3, line + "\n");

(async () => {
  const events = new EventEmitter();
  let started = null;
  let completed = 0;
  let failed = 0;
  let allCompleted;
  const completion = new Promise((resolve) => (allCompleted = resolve));
  events.on("pool:create", () => (started ??= process.hrtime.bigint()));
  events.on("job:complete", ({ error }) => {
    if (error) failed += 1;
    if (++completed === total) allCompleted();
  });
  const poll = new Client({ connectionString: env.DATABASE_URL });
  await poll.connect();
  const remaining = async () =>
    Number((await poll.query("SELECT count(*) AS n FROM graphile_worker._private_jobs")).rows[0].n);

  const called = process.hrtime.bigint();
  const runner = await run({ preset: { worker: { ...worker, events } } });
  await completion;
  // Completions may still be waiting for their batch (completeJobBatchDelay): wait until the
  // database has them all.
  while ((await remaining()) > 0) await new Promise((resolve) => setTimeout(resolve, 2));
  const finished = process.hrtime.bigint();
  const seconds = Number(finished - (started ?? called)) / 1e9;
  await runner.stop();
  await poll.end();
  report(
    `graphile-worker (${env.MODE}): ${completed} jobs in ${seconds.toFixed(3)} s = ` +
      `${(completed / seconds).toFixed(1)} jobs/s (graphile-worker ${env.VERSION}, ${settings}, ` +
      `failed ${failed}, start-up before the clock ${(Number((started ?? called) - called) / 1e6).toFixed(0)} ms)`,
  );
  if (failed > 0) process.exit(1);
})().catch((error) => {
  report(`graphile-worker (${env.MODE}): FAILED: ${error.stack || error}`);
  process.exit(2);
});
JS
