//! `orderflow-queuebench`: the job queue alone (issue 11, target 4).
//!
//! It measures how many jobs per second the REAL runner ([`orderflow::queue::Runner`], as the
//! server runs it) takes through claim → step → completion when the step does nothing: each job
//! is claimed with a lease, run by a no-op step that commits its (empty) effects and its
//! completion through [`JobStore::complete_job`] fenced by the lease, exactly as every real step
//! ends, and counted once that commit returned.
//!
//! 1. Setup (not timed): opens the store the way the server does (`store::connect` with the
//!    options of the same global flags: `--database-url` / `--data-dir`, `--db-max-connections`,
//!    `--commit-batch`, `--commit-writers`, `--sqlite-durability`), which applies the migrations.
//!    The database must hold no jobs at all (a fresh one: `createdb` a scratch PostgreSQL
//!    database, or give an empty `--data-dir`); the program refuses to run otherwise, and it
//!    neither creates nor drops databases (`bench/compare.sh queue` does). Then it enqueues
//!    `--jobs` no-op jobs, `--enqueue-chunk` per transaction (an API-style completion without a
//!    lease whose effects only enqueue: the outbox path every step uses).
//! 2. Timed phase: starts `Runner::run` with the server's queue settings (`--concurrency`, the
//!    server's `--job-concurrency`; `--job-lease`; `--job-poll`) and stops the clock when the
//!    step has completed every job; then checks that the store reports no pending work.
//! 3. Prints one line: jobs, seconds, jobs/s and the settings.
//!
//! Logging is set up as in the server (`ORDERFLOW_LOG`, default `info`): the runner logs one line
//! per finished step on stderr, as the server does. Run from the repository root, e.g.
//!
//! ```text
//! cargo build --release --bin orderflow-queuebench
//! createdb -h 127.0.0.1 -U postgres orderflow_bench_queue
//! target/release/orderflow-queuebench --database-url postgres://postgres@127.0.0.1/orderflow_bench_queue \
//!     --jobs 20000 2>/dev/null
//! dropdb -h 127.0.0.1 -U postgres orderflow_bench_queue
//! target/release/orderflow-queuebench --data-dir "$(mktemp -d)" --jobs 20000 2>/dev/null
//! ```

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_trait::async_trait;
use clap::Parser;
use tokio::sync::Notify;

use orderflow::clock;
use orderflow::config::{GlobalArgs, parse_duration};
use orderflow::queue::{QueueSettings, Runner, Step, StepError};
use orderflow::store::jobs::{ClaimedJob, CompleteOutcome, StepEffects};
use orderflow::store::{self, NewJob, Store};

/// The step kind of the benchmark's jobs.
const NOOP: &str = "noop";
/// Pause between the setup and the timed phase.
const SETTLE: Duration = Duration::from_millis(250);

#[derive(Debug, Parser)]
#[command(
    name = "orderflow-queuebench",
    version,
    about = "Queue benchmark: no-op jobs through the real job runner (claim, step, completion), reports jobs/s"
)]
struct Args {
    /// The server's global settings: database, pool size, group commit, SQLite durability.
    #[command(flatten)]
    global: GlobalArgs,
    /// Jobs to enqueue before the timed phase, and to run in it.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    jobs: u64,
    /// Jobs running at once (the server's `--job-concurrency`). Default: the server's default.
    #[arg(long, alias = "job-concurrency", value_parser = clap::value_parser!(u32).range(1..=1000))]
    concurrency: Option<u32>,
    /// How long a claimed job stays invisible to other workers without a heartbeat (the
    /// server's `--job-lease`). Default: the server's default.
    #[arg(long, value_parser = parse_duration)]
    job_lease: Option<Duration>,
    /// Longest idle sleep of a worker when no wake-up arrives (the server's `--job-poll`).
    /// Default: the server's default.
    #[arg(long, value_parser = parse_duration)]
    job_poll: Option<Duration>,
    /// Jobs enqueued per transaction in the setup.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    enqueue_chunk: u32,
    /// Longest timed phase before giving up.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    timeout: Duration,
}

/// The no-op step: commits empty effects with the job's completion, as a real step ends.
struct NoopStep {
    store: Arc<dyn Store>,
    /// Jobs completed so far.
    done: AtomicU64,
    total: u64,
    /// Signalled when the last job completed.
    finished: Notify,
}

#[async_trait]
impl Step for NoopStep {
    async fn run(&self, job: &ClaimedJob) -> Result<(), StepError> {
        // Outcomes mapped as the workflow's steps map them (`Saga::complete`).
        match self
            .store
            .complete_job(Some(&job.lease), &StepEffects::default(), clock::now())
            .await
        {
            Ok(CompleteOutcome::Completed) => {
                if self.done.fetch_add(1, Ordering::AcqRel) + 1 == self.total {
                    self.finished.notify_one();
                }
                Ok(())
            }
            Ok(CompleteOutcome::LeaseLost) => Err(StepError::LeaseLost),
            Ok(other) => Err(StepError::Fatal(format!("unexpected outcome {other:?}"))),
            Err(error) => Err(StepError::from(error)),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let telemetry = match orderflow::telemetry::init(&args.global.telemetry_settings()) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("orderflow-queuebench: {error:#}");
            return ExitCode::from(2);
        }
    };
    let result = run(args).await;
    telemetry.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("orderflow-queuebench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // ---- Setup ----
    let url = args.global.database_url();
    let store = store::connect(&url, &args.global.connect_options()?)
        .await
        .with_context(|| format!("opening the database {}", store::redact_url(&url)))?;
    let unfinished: i64 = store
        .queue_stats(clock::now())
        .await?
        .iter()
        .map(|stats| stats.ready + stats.running + stats.dead)
        .sum();
    let finished: i64 = store.succeeded_jobs().await?.iter().map(|(_, n)| n).sum();
    let existing = unfinished + finished;
    if existing > 0 {
        bail!(
            "{} already holds {existing} job(s): the benchmark needs a fresh database (a scratch PostgreSQL \
             database, or an empty --data-dir)",
            store::redact_url(&url)
        );
    }

    let defaults = QueueSettings::default();
    let settings = QueueSettings {
        concurrency: args.concurrency.map_or(defaults.concurrency, |n| n as usize),
        lease: args.job_lease.unwrap_or(defaults.lease),
        poll_interval: args.job_poll.unwrap_or(defaults.poll_interval),
        ..defaults
    };

    let enqueue_started = Instant::now();
    let mut enqueued = 0u64;
    while enqueued < args.jobs {
        let chunk = u64::from(args.enqueue_chunk).min(args.jobs - enqueued);
        let now = clock::now();
        let effects = StepEffects {
            enqueue: (0..chunk)
                .map(|_| NewJob {
                    kind: NOOP,
                    payload: serde_json::json!({}),
                    run_at: now,
                    max_attempts: 3,
                })
                .collect(),
            ..Default::default()
        };
        match store.complete_job(None, &effects, now).await? {
            CompleteOutcome::Completed => enqueued += chunk,
            other => bail!("enqueueing failed: {other:?}"),
        }
    }
    let enqueue_seconds = enqueue_started.elapsed().as_secs_f64();
    // The enqueues' own wake-up (on PostgreSQL a NOTIFY that comes back through the store's
    // LISTEN connection a moment after the commit) belongs to the setup: let it arrive, unheard,
    // before the runner starts. Landing in the timed phase while every slot is busy, it would
    // stall the run: `Runner::work` (src/queue/mod.rs) then claims nothing because no slot is
    // free, takes that for "no job ready", and sleeps a whole `--job-poll` interval.
    tokio::time::sleep(SETTLE).await;

    // ---- Timed phase ----
    let step = Arc::new(NoopStep {
        store: store.clone(),
        done: AtomicU64::new(0),
        total: args.jobs,
        finished: Notify::new(),
    });
    let mut runner = Runner::new(store.clone(), settings.clone());
    runner.register(NOOP, step.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let workers = tokio::spawn(Arc::new(runner).run(stop_rx));
    let elapsed = loop {
        tokio::select! {
            _ = step.finished.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        if step.done.load(Ordering::Acquire) >= args.jobs {
            break started.elapsed();
        }
        // Every job completes unless some failed: then stop when none is left to run.
        if !store.has_pending_work().await? {
            break started.elapsed();
        }
        if started.elapsed() > args.timeout {
            bail!(
                "timed out after {:?}: {} of {} jobs completed",
                args.timeout,
                step.done.load(Ordering::Acquire),
                args.jobs
            );
        }
    };
    let _ = stop_tx.send(true);
    workers.await.context("the runner panicked")?;

    // ---- Report ----
    let done = step.done.load(Ordering::Acquire);
    let pending = store.has_pending_work().await?;
    let stats = store.queue_stats(clock::now()).await?;
    let noop = stats.iter().find(|stats| stats.kind == NOOP);
    let dead = noop.map_or(0, |stats| stats.dead);
    let succeeded = store
        .succeeded_jobs()
        .await?
        .into_iter()
        .find(|(kind, _)| kind == NOOP)
        .map_or(0, |(_, n)| n);
    let seconds = elapsed.as_secs_f64();
    let optional = |value: Option<u32>| value.map_or_else(|| "default".to_string(), |n| n.to_string());
    println!(
        "enqueued {} jobs in {enqueue_seconds:.2}s ({} per transaction), not timed",
        args.jobs, args.enqueue_chunk
    );
    println!(
        "queuebench: {done} jobs in {seconds:.3} s = {:.1} jobs/s (backend {:?}, concurrency {}, db-max-connections {}, \
         commit-batch {}, commit-writers {}, sqlite-durability {:?}, lease {:?}, poll {:?})",
        done as f64 / seconds,
        store.backend(),
        settings.concurrency,
        args.global.db_max_connections,
        optional(args.global.commit_batch),
        optional(args.global.commit_writers),
        args.global.sqlite_durability,
        settings.lease,
        settings.poll_interval,
    );
    if done != args.jobs || succeeded != args.jobs as i64 || dead != 0 || pending {
        bail!(
            "not every job succeeded: {done} completed by the step, {succeeded} succeeded and {dead} dead in the \
             store, pending work left: {pending}"
        );
    }
    Ok(())
}
