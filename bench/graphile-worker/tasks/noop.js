// The no-op task of the queue benchmark (bench/graphile-worker/run.sh): does nothing, so what is
// measured is graphile-worker itself (fetch, run, complete), as orderflow-queuebench's no-op step
// measures orderflow's runner.
module.exports = async () => {};
