//! The job runner on both backends, with test steps: bounded concurrency per kind, failures
//! isolated, heartbeats keeping long steps leased, wake-ups without polling (LISTEN/NOTIFY across
//! store instances on PostgreSQL), and pruning of finished jobs.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::{Backend, TestDb};
use orderflow::clock;
use orderflow::queue::{QueueSettings, Runner, Step, StepError};
use orderflow::store::jobs::{ClaimedJob, CompleteOutcome, JobFilter, StepEffects};
use orderflow::store::{NewJob, Store};
use serde_json::json;

on_every_backend!(
    concurrency_is_bounded_and_failures_are_isolated,
    heartbeats_keep_long_steps_leased,
    idle_workers_wake_on_enqueue,
    a_wake_up_while_every_slot_is_busy_does_not_stall_the_backlog,
    finished_jobs_are_pruned,
);

const KIND: &str = "test_step";

/// A step that counts how many run at once, takes `duration`, and fails for payload `fail: true`.
struct Probe {
    store: Arc<dyn Store>,
    running: AtomicUsize,
    peak: AtomicUsize,
    runs: AtomicUsize,
    duration: Duration,
}

#[async_trait]
impl Step for Probe {
    async fn run(&self, job: &ClaimedJob) -> Result<(), StepError> {
        let now_running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now_running, Ordering::SeqCst);
        self.runs.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.duration).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        if job.payload["fail"] == true {
            return Err(StepError::Retry("this one always fails".into()));
        }
        match self
            .store
            .complete_job(Some(&job.lease), &StepEffects::default(), clock::now())
            .await
        {
            Ok(CompleteOutcome::Completed) => Ok(()),
            Ok(_) => Err(StepError::LeaseLost),
            Err(error) => Err(StepError::Retry(error.to_string())),
        }
    }
}

fn settings(concurrency: usize, lease: Duration, poll: Duration) -> QueueSettings {
    QueueSettings {
        lease,
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(10),
        poll_interval: poll,
        concurrency,
        retention: Duration::from_secs(3600),
        max_lease_expiries: 10,
    }
}

async fn enqueue(store: &dyn Store, payloads: Vec<serde_json::Value>) {
    let effects = StepEffects {
        enqueue: payloads
            .into_iter()
            .map(|payload| NewJob {
                kind: KIND,
                payload,
                run_at: clock::now(),
                max_attempts: 3,
            })
            .collect(),
        ..Default::default()
    };
    assert_eq!(
        store.complete_job(None, &effects, clock::now()).await.unwrap(),
        CompleteOutcome::Completed
    );
}

fn runner_with(store: Arc<dyn Store>, probe: Arc<Probe>, settings: QueueSettings) -> Arc<Runner> {
    let mut runner = Runner::new(store, settings);
    runner.register(KIND, probe);
    Arc::new(runner)
}

fn probe(store: &Arc<dyn Store>, duration: Duration) -> Arc<Probe> {
    Arc::new(Probe {
        store: store.clone(),
        running: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
        runs: AtomicUsize::new(0),
        duration,
    })
}

async fn wait_until(what: &str, deadline: Duration, mut done: impl AsyncFnMut() -> bool) {
    let until = tokio::time::Instant::now() + deadline;
    while !done().await {
        assert!(tokio::time::Instant::now() < until, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn count(store: &dyn Store, state: &str) -> usize {
    let filter = JobFilter {
        state: Some(state.into()),
        kind: Some(KIND.into()),
        after: None,
        limit: 200,
    };
    store.list_jobs(&filter).await.unwrap().items.len()
}

async fn concurrency_is_bounded_and_failures_are_isolated(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let probe = probe(&store, Duration::from_millis(30));
    let mut payloads: Vec<_> = (0..12).map(|n| json!({ "n": n })).collect();
    payloads.insert(0, json!({ "fail": true }));
    enqueue(store.as_ref(), payloads).await;

    let runner = runner_with(
        store.clone(),
        probe.clone(),
        settings(3, Duration::from_secs(10), Duration::from_millis(50)),
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let workers = tokio::spawn(runner.clone().run(stopped));
    wait_until("every job finished", Duration::from_secs(30), async || {
        count(store.as_ref(), "succeeded").await == 12 && count(store.as_ref(), "dead").await == 1
    })
    .await;
    stop.send(true).unwrap();
    workers.await.unwrap();
    assert!(
        probe.peak.load(Ordering::SeqCst) <= 3,
        "at most 3 at once, saw {}",
        probe.peak.load(Ordering::SeqCst)
    );
    assert!(
        probe.peak.load(Ordering::SeqCst) >= 2,
        "jobs of one kind do run side by side"
    );
    assert_eq!(
        probe.runs.load(Ordering::SeqCst),
        12 + 3,
        "the failing job ran its 3 attempts, the rest once"
    );
}

async fn heartbeats_keep_long_steps_leased(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    // Each step takes three leases' worth of time; heartbeats (every third of a lease) must keep
    // the others off it. The lease leaves room for a heartbeat whose write is retried after a
    // conflict (the dsql profile's injector) on a busy machine.
    let probe = probe(&store, Duration::from_millis(3000));
    enqueue(store.as_ref(), vec![json!({ "n": 1 }), json!({ "n": 2 })]).await;
    let lease = Duration::from_millis(1000);
    let first = runner_with(
        store.clone(),
        probe.clone(),
        settings(4, lease, Duration::from_millis(20)),
    );
    let second = runner_with(
        store.clone(),
        probe.clone(),
        settings(4, lease, Duration::from_millis(20)),
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let a = tokio::spawn(first.run(stopped.clone()));
    let b = tokio::spawn(second.run(stopped));
    wait_until("both jobs finished", Duration::from_secs(30), async || {
        count(store.as_ref(), "succeeded").await == 2
    })
    .await;
    stop.send(true).unwrap();
    a.await.unwrap();
    b.await.unwrap();
    assert_eq!(
        probe.runs.load(Ordering::SeqCst),
        2,
        "no job was taken over while its worker was alive"
    );
}

async fn idle_workers_wake_on_enqueue(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let probe = probe(&store, Duration::ZERO);
    // A poll interval far longer than the test: only a wake-up can make the job run in time.
    let runner = runner_with(
        store.clone(),
        probe.clone(),
        settings(2, Duration::from_secs(10), Duration::from_secs(600)),
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let workers = tokio::spawn(runner.run(stopped));
    // Let the worker go idle first (its first claim finds nothing).
    tokio::task::yield_now().await;
    let enqueuer = match backend {
        // Another store instance: on PostgreSQL the wake-up crosses connections (LISTEN/NOTIFY),
        // as it would between processes.
        // In the dsql profile (no NOTIFY) the other store's enqueue is found by the poll.
        Backend::Postgres | Backend::Dsql => db.connect().await,
        Backend::Sqlite => store.clone(),
    };
    for round in 1..=3 {
        enqueue(enqueuer.as_ref(), vec![json!({ "round": round })]).await;
        wait_until("the idle worker ran the new job", Duration::from_secs(10), async || {
            probe.runs.load(Ordering::SeqCst) == round
        })
        .await;
    }
    stop.send(true).unwrap();
    workers.await.unwrap();
}

/// A wake-up that arrives while every slot is busy must not send the worker to sleep until the
/// next poll: the backlog runs on as soon as a slot frees.
async fn a_wake_up_while_every_slot_is_busy_does_not_stall_the_backlog(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let probe = probe(&store, Duration::from_millis(300));
    // One slot, and a poll interval far longer than the test.
    let runner = runner_with(
        store.clone(),
        probe.clone(),
        settings(1, Duration::from_secs(10), Duration::from_secs(600)),
    );
    enqueue(store.as_ref(), (0..3).map(|n| json!({ "n": n })).collect()).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let workers = tokio::spawn(runner.run(stopped));
    wait_until("the first job runs", Duration::from_secs(10), async || {
        probe.running.load(Ordering::SeqCst) == 1
    })
    .await;
    store.job_signal().wake_all();
    wait_until(
        "the backlog ran without waiting for a poll",
        Duration::from_secs(10),
        async || count(store.as_ref(), "succeeded").await == 3,
    )
    .await;
    stop.send(true).unwrap();
    workers.await.unwrap();
}

async fn finished_jobs_are_pruned(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let probe = probe(&store, Duration::ZERO);
    enqueue(
        store.as_ref(),
        vec![json!({ "n": 1 }), json!({ "n": 2 }), json!({ "fail": true })],
    )
    .await;
    let runner = runner_with(
        store.clone(),
        probe,
        settings(4, Duration::from_secs(10), Duration::from_millis(50)),
    );
    runner.drain(Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        (
            count(store.as_ref(), "succeeded").await,
            count(store.as_ref(), "dead").await
        ),
        (2, 1)
    );
    assert_eq!(
        store
            .prune_jobs(clock::now() - Duration::from_secs(3600))
            .await
            .unwrap(),
        0,
        "recent jobs are kept"
    );
    assert_eq!(
        store.prune_jobs(clock::now() + Duration::from_secs(1)).await.unwrap(),
        2
    );
    assert_eq!(count(store.as_ref(), "succeeded").await, 0);
    assert_eq!(count(store.as_ref(), "dead").await, 1, "dead jobs are never pruned");
}
