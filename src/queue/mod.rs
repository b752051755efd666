//! The job runner: claims jobs with a lease, runs each step, heartbeats long steps, retries
//! failures with exponential backoff and full jitter, dead-letters what runs out of attempts, and
//! sleeps when idle until a wake-up (in-process for SQLite, LISTEN/NOTIFY for PostgreSQL) or the
//! poll fallback (in the dsql profile, which has no NOTIFY: a poll that backs off while idle,
//! [`crate::store::signal::IdlePoll`]). One failing job never blocks others: each runs in its own task, bounded per
//! step kind by a semaphore.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::field::Empty;

use crate::clock;
use crate::monitoring::metrics::{Metrics, StepOutcome};
use crate::store::jobs::{ClaimedJob, FailOutcome};
use crate::store::{Store, StoreError, StoreResult};

/// How a step ended, when it did not commit its effects.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Worth trying again later (provider down, timeout, database busy).
    #[error("{0}")]
    Retry(String),
    /// Trying again will not help: dead-letter now.
    #[error("{0}")]
    Fatal(String),
    /// The lease was taken over by another worker; it owns the job now.
    #[error("lease lost")]
    LeaseLost,
    /// The database could not be reached (restart, failover) or takes no writes (disk full,
    /// read-only): try again later without spending an attempt, since an outage says nothing
    /// about the job and must not dead-letter good work.
    #[error("{0}")]
    Unavailable(String),
}

/// A store call a step depends on failed: worth trying again, an outage without spending an
/// attempt.
impl From<StoreError> for StepError {
    fn from(error: StoreError) -> Self {
        if error.is_outage() {
            StepError::Unavailable(error.to_string())
        } else {
            StepError::Retry(error.to_string())
        }
    }
}

/// One kind of step. Implementations commit their effects and complete the job in one store
/// call; returning `Ok` means that happened.
#[async_trait]
pub trait Step: Send + Sync {
    async fn run(&self, job: &ClaimedJob) -> Result<(), StepError>;
}

/// Queue settings; tests shrink them.
#[derive(Clone, Debug)]
pub struct QueueSettings {
    /// How long a claim lasts without a heartbeat (the visibility timeout).
    pub lease: Duration,
    /// First retry delay; doubles per attempt up to `backoff_max`, with full jitter.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Longest sleep when idle and no wake-up arrives.
    pub poll_interval: Duration,
    /// Jobs of one kind running at once in this process.
    pub concurrency: usize,
    /// Succeeded jobs older than this are deleted.
    pub retention: Duration,
    /// Runs of one job that may die with their worker (the lease ran out) before it is
    /// dead-lettered as a poison job. Such runs do not spend attempts.
    pub max_lease_expiries: u32,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            poll_interval: Duration::from_secs(5),
            concurrency: 8,
            retention: Duration::from_secs(7 * 24 * 3600),
            max_lease_expiries: 10,
        }
    }
}

/// The delay before retry number `attempt` (1-based): exponential from `base`, capped at `max`,
/// with jitter (between half and all of it) so retries of many jobs do not arrive together.
pub fn backoff(settings: &QueueSettings, attempt: u32) -> Duration {
    let cap = settings
        .backoff_base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(settings.backoff_max);
    let millis = cap.as_millis().max(1) as u64;
    Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
}

/// How many free slots a busy worker loop waits for before it claims again: half of them (at
/// least one), so a backlog is claimed a window at a time rather than a job at a time.
fn claim_window(concurrency: usize) -> usize {
    (concurrency / 2).max(1)
}

/// Runs registered steps against the store's queue.
pub struct Runner {
    store: Arc<dyn Store>,
    steps: BTreeMap<&'static str, Arc<dyn Step>>,
    settings: QueueSettings,
    /// Where step outcomes and run times are counted.
    metrics: Metrics,
}

impl Runner {
    pub fn new(store: Arc<dyn Store>, settings: QueueSettings) -> Self {
        Self {
            store,
            steps: BTreeMap::new(),
            settings,
            metrics: Metrics::default(),
        }
    }

    /// Counts step outcomes in `metrics` (the app's registry) instead of a private one.
    pub fn set_metrics(&mut self, metrics: Metrics) {
        for kind in self.steps.keys() {
            metrics.step_registered(kind);
        }
        self.metrics = metrics;
    }

    pub fn register(&mut self, kind: &'static str, step: Arc<dyn Step>) {
        self.metrics.step_registered(kind);
        self.steps.insert(kind, step);
    }

    pub fn kinds(&self) -> Vec<&'static str> {
        self.steps.keys().copied().collect()
    }

    /// Runs one claimed job to its end: the step, heartbeats while it runs, and the bookkeeping
    /// of a failure.
    async fn execute(self: &Arc<Self>, step: Arc<dyn Step>, job: ClaimedJob) {
        // The fields every line logged while the step runs carries; as a trace span, a child of
        // the span that enqueued the job (the checkout request, or the step before).
        let span = tracing::info_span!("job", job_id = %job.lease.job_id, step = %job.kind, attempt = job.attempt,
            order_id = Empty, correlation_id = Empty, otel.name = %format_args!("step {}", job.kind));
        if let Some(order) = job.order_id {
            span.record("order_id", tracing::field::display(order));
        }
        if let Some(correlation) = &job.correlation_id {
            span.record("correlation_id", correlation.as_str());
        }
        crate::telemetry::continue_job_trace(&span, &job.payload);
        let (result, elapsed) = if job.lease_expiries >= self.settings.max_lease_expiries {
            // A crash costs no attempt, but a job whose runs keep dying with their worker is
            // probably what kills it: stop running it.
            let poison = format!(
                "lease expired {} times: every worker running it died (--max-lease-expiries {})",
                job.lease_expiries, self.settings.max_lease_expiries
            );
            (Err(StepError::Fatal(poison)), Duration::ZERO)
        } else {
            let started = std::time::Instant::now();
            let heartbeat = self.heartbeat(&job, &span);
            let outcome = tracing::Instrument::instrument(step.run(&job), span.clone()).await;
            heartbeat.abort();
            (outcome, started.elapsed())
        };
        let now = clock::now();
        let recorded = match &result {
            Ok(()) => {
                tracing::info!(parent: &span, "step succeeded");
                self.metrics.step_finished(&job.kind, StepOutcome::Succeeded, elapsed);
                return;
            }
            Err(StepError::LeaseLost) => {
                tracing::warn!(parent: &span, "lease lost; another worker owns the job");
                self.metrics.step_finished(&job.kind, StepOutcome::LeaseLost, elapsed);
                return;
            }
            Err(StepError::Retry(error)) => {
                let delay = backoff(&self.settings, job.attempt);
                let recorded = self.store.fail_job(&job.lease, error, Some(now + delay), now).await;
                self.wake_when_due(&job.kind, &recorded, delay);
                recorded
            }
            Err(StepError::Unavailable(error)) => {
                let delay = backoff(&self.settings, job.attempt);
                let recorded = self
                    .store
                    .postpone_job(&job.lease, error, now + delay, now)
                    .await
                    .map(|kept| {
                        if kept {
                            FailOutcome::Retrying
                        } else {
                            FailOutcome::LeaseLost
                        }
                    });
                self.wake_when_due(&job.kind, &recorded, delay);
                recorded
            }
            Err(StepError::Fatal(error)) => self.store.fail_job(&job.lease, error, None, now).await,
        };
        let postponed = matches!(result, Err(StepError::Unavailable(_)));
        let error = result.err().map(|e| e.to_string()).unwrap_or_default();
        let outcome = match recorded {
            Ok(FailOutcome::Retrying) => StepOutcome::Retrying,
            Ok(FailOutcome::Dead) => StepOutcome::Dead,
            Ok(FailOutcome::LeaseLost) | Err(_) => StepOutcome::LeaseLost,
        };
        self.metrics.step_finished(&job.kind, outcome, elapsed);
        match recorded {
            Ok(FailOutcome::Retrying) if postponed => {
                tracing::warn!(parent: &span, %error, "database unavailable; step postponed without spending an attempt")
            }
            Ok(FailOutcome::Retrying) => {
                tracing::warn!(parent: &span, %error, "step failed; will retry")
            }
            Ok(FailOutcome::Dead) => tracing::error!(parent: &span, %error, "step dead-lettered"),
            Ok(FailOutcome::LeaseLost) => {
                tracing::warn!(parent: &span, %error, "step failed after its lease was lost")
            }
            // The lease runs out and the job is claimed again: nothing is lost.
            Err(store_error) if store_error.is_outage() => {
                tracing::warn!(parent: &span, %error, %store_error, "could not record a step failure")
            }
            Err(store_error) => {
                tracing::error!(parent: &span, %error, %store_error, "could not record a step failure")
            }
        }
    }

    /// Wakes the workers when a job given back for later is due, instead of at the next poll.
    fn wake_when_due(&self, kind: &str, recorded: &StoreResult<FailOutcome>, delay: Duration) {
        if matches!(recorded, Ok(FailOutcome::Retrying)) {
            let signal = self.store.job_signal().kind(kind);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                signal.notify_waiters();
            });
        }
    }

    /// Extends the job's lease every third of its length while the step runs.
    fn heartbeat(self: &Arc<Self>, job: &ClaimedJob, span: &tracing::Span) -> tokio::task::JoinHandle<()> {
        let (runner, lease) = (self.clone(), job.lease);
        // Its warnings belong to the job: same span, same fields.
        let span = span.clone();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let every = runner.settings.lease / 3;
                loop {
                    tokio::time::sleep(every).await;
                    let until = clock::now() + runner.settings.lease;
                    match runner.store.extend_lease(&lease, until).await {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(error) => tracing::warn!(%error, "heartbeat failed"),
                    }
                }
            },
            span,
        ))
    }

    /// Claims and runs up to `limit` jobs of `kind`, waiting for them; returns how many ran.
    pub async fn run_batch(self: &Arc<Self>, kind: &'static str, limit: u32) -> anyhow::Result<usize> {
        let step = self
            .steps
            .get(kind)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no step for {kind}"))?;
        let jobs = self
            .store
            .claim_jobs(kind, limit, self.settings.lease, clock::now())
            .await?;
        let count = jobs.len();
        let mut running = JoinSet::new();
        for job in jobs {
            let (runner, step) = (self.clone(), step.clone());
            running.spawn(async move { runner.execute(step, job).await });
        }
        while running.join_next().await.is_some() {}
        Ok(count)
    }

    /// Runs jobs until none is ready or running, sleeping through retry back-offs; gives up at
    /// `deadline`. Tests use it instead of sleeping.
    pub async fn drain(self: &Arc<Self>, deadline: Duration) -> anyhow::Result<()> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let mut ran = 0;
            for kind in self.kinds() {
                ran += self.run_batch(kind, self.settings.concurrency as u32).await?;
            }
            if ran == 0 {
                if !self.store.has_pending_work().await? {
                    return Ok(());
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < until,
                    "the queue did not drain in {deadline:?}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    /// Runs the workers until `shutdown` turns true: one claiming loop per step kind, plus the
    /// pruning of old finished jobs. In-flight steps finish before this returns.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let mut loops = JoinSet::new();
        for kind in self.kinds() {
            let (runner, shutdown) = (self.clone(), shutdown.clone());
            loops.spawn(async move { runner.work(kind, shutdown).await });
        }
        let (runner, mut stop) = (self.clone(), shutdown.clone());
        loops.spawn(async move {
            loop {
                let before = clock::now() - runner.settings.retention;
                match runner.store.prune_jobs(before).await {
                    Ok(pruned) if pruned > 0 => tracing::info!(pruned, "pruned finished jobs"),
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "pruning jobs failed"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
                    _ = stop.wait_for(|stop| *stop) => return,
                }
            }
        });
        while loops.join_next().await.is_some() {}
    }

    async fn work(self: Arc<Self>, kind: &'static str, mut shutdown: watch::Receiver<bool>) {
        let Some(step) = self.steps.get(kind).cloned() else {
            return;
        };
        let slots = Arc::new(Semaphore::new(self.settings.concurrency.max(1)));
        // This kind's own wake-up: commits that enqueued other kinds do not make it claim.
        let signal = self.store.job_signal().kind(kind);
        // Without cross-process wake-ups (the dsql profile) idle looks back off ([`IdlePoll`]).
        let mut idle_poll = self.store.job_signal().idle_poll(self.settings.poll_interval);
        let mut running = JoinSet::new();
        loop {
            // Register for the wake-up before looking, so one sent while we look is not missed.
            let woken = signal.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if *shutdown.borrow() {
                break;
            }
            let free = slots.available_permits();
            let claimed = if free == 0 {
                Vec::new()
            } else {
                match self
                    .store
                    .claim_jobs(kind, free as u32, self.settings.lease, clock::now())
                    .await
                {
                    Ok(jobs) => jobs,
                    Err(error) => {
                        tracing::warn!(%error, kind, "claiming jobs failed");
                        Vec::new()
                    }
                }
            };
            // A full claim (or no room to claim) means more jobs are probably waiting: the next
            // look is when a window of slots is free — half of them, so a backlog is claimed a
            // window at a time rather than one claim transaction per finished job (and not at the
            // next poll, which would stall a full backlog). Otherwise the queue is empty for now:
            // wait for a wake-up (or the poll).
            let backlog = claimed.len() == free;
            let idle_sleep = idle_poll.after(claimed.len());
            for job in claimed {
                let permit = slots.clone().acquire_owned().await.expect("semaphore never closes");
                let (runner, step) = (self.clone(), step.clone());
                running.spawn(async move {
                    runner.execute(step, job).await;
                    drop(permit);
                });
            }
            while running.try_join_next().is_some() {}
            if backlog {
                let window = claim_window(self.settings.concurrency) as u32;
                tokio::select! {
                    _ = slots.acquire_many(window) => {}
                    _ = shutdown.changed() => {}
                }
            } else {
                tokio::select! {
                    _ = &mut woken => {}
                    _ = tokio::time::sleep(idle_sleep) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
        while running.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step whose write meets a full disk or a read-only database is postponed like any
    /// outage (no attempt spent); other store failures are retried as failures.
    #[test]
    fn outages_postpone_and_failures_retry() {
        use crate::store::WriteRefusal;
        for refusal in [WriteRefusal::StorageFull, WriteRefusal::ReadOnly] {
            let error = StoreError::WritesRefused(refusal, "database or disk is full".into());
            assert!(matches!(StepError::from(error), StepError::Unavailable(_)), "{refusal}");
        }
        assert!(matches!(
            StepError::from(StoreError::Unavailable("restarting".into())),
            StepError::Unavailable(_)
        ));
        assert!(matches!(
            StepError::from(StoreError::Corrupt("bad row".into())),
            StepError::Retry(_)
        ));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let settings = QueueSettings {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            ..Default::default()
        };
        for _ in 0..50 {
            let first = backoff(&settings, 1);
            assert!(
                first >= Duration::from_millis(50) && first <= Duration::from_millis(100),
                "{first:?}"
            );
            let third = backoff(&settings, 3);
            assert!(
                third >= Duration::from_millis(200) && third <= Duration::from_millis(400),
                "{third:?}"
            );
            let late = backoff(&settings, 30);
            assert!(
                late >= Duration::from_millis(500) && late <= Duration::from_secs(1),
                "{late:?}"
            );
        }
    }
}
