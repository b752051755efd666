//! Group commit of step completions: the effects of many jobs (of any kind, of different orders)
//! committed in one transaction, each still succeeding, being refused or failing on its own.
//!
//! Every finished step ends in [`JobStore::complete_job`](super::jobs::JobStore::complete_job):
//! its effects and its job's completion in one transaction. One commit per step made the
//! pipeline commit-bound (about seven commits per order after the checkout; on SQLite each one an
//! fsync by the single writer). Here completions queue up while a transaction is being written
//! and the next transaction takes all that are waiting (up to `max_batch`): each is applied in its
//! own savepoint, so a completion whose lease was lost, whose order moved on, or whose statement
//! failed is rolled back alone and answered alone; the others commit together. Nobody waits for a
//! batch to fill: a completion that arrives when the committer is idle is written at once.
//!
//! Each caller's answer is sent only after the transaction holding its effects committed (or
//! failed: then every completion in it is answered with the error and its job is retried, as if
//! it had failed alone). A completion that lost a race with a concurrent transaction (SQLSTATE
//! 40001, in its statements or at COMMIT) is written again, whole, for up to the retry budget
//! ([`super::retry`]).
//!
//! The distributed-SQL profile has no savepoints: there every group is of one (`--commit-batch`
//! is forced to 1, and [`GroupCommit::complete_all`] writes its completions one after another),
//! and a group of one never issues SAVEPOINT.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::batcher::{Batcher, GroupWriter};
use super::effects;
use super::jobs::{CompleteOutcome, JobLease, StepEffects};
use super::{StoreError, StoreResult};

/// One completion waiting for its transaction.
#[derive(Clone)]
pub(super) struct Pending {
    lease: Option<JobLease>,
    effects: StepEffects,
    now: DateTime<Utc>,
}

/// The queue in front of the committers.
pub(super) struct GroupCommit {
    batcher: Batcher<Completions>,
    /// Whether a group of several may share a transaction (through savepoints).
    savepoints: bool,
}

/// How completions are grouped; `None` takes the backend's default.
#[derive(Clone, Copy, Debug, Default)]
pub struct GroupCommitSettings {
    /// Most completions in one transaction. Default 1 on both backends: every completion commits
    /// alone in its caller's task, as without group commit. Measured (docs/BENCHMARKS.md, "Group
    /// commit"): on SQLite groups of up to 64 carry 1.3–1.8× the fulfilled orders/s under load but
    /// slow a lightly loaded pipeline (one client: p50 180 → 264 ms); on PostgreSQL grouping is
    /// slower (a group holds the order and product rows it touched until it commits, so
    /// checkouts of the same products wait; PostgreSQL already shares WAL flushes).
    pub max_batch: Option<usize>,
    /// Group transactions written at once (when grouping). SQLite: 1 (one writer). PostgreSQL:
    /// the pool's size.
    pub committers: Option<usize>,
}

impl GroupCommitSettings {
    /// (largest group, committers) on SQLite (`single_writer`) or PostgreSQL with `pool` connections.
    pub fn resolve(self, single_writer: bool, pool: u32) -> (usize, usize) {
        let committers = if single_writer { 1 } else { pool.max(1) as usize };
        let batch = 1;
        (
            self.max_batch.unwrap_or(batch).max(1),
            self.committers.unwrap_or(committers).max(1),
        )
    }
}

impl GroupCommit {
    /// Starts `settings.committers` committers writing through `pool` (`begin`: the statement
    /// that opens a write transaction; `lock_order_row`: the dialect's row lock). `enqueued` is
    /// called after a commit that enqueued jobs, with their kinds (to wake those workers).
    pub(super) fn start<DB>(
        pool: crate::store::DbPool<DB>,
        begin: &'static str,
        lock_order_row: &'static str,
        (max_batch, committers): (usize, usize),
        enqueued: Arc<dyn Fn(&[&'static str]) + Send + Sync>,
    ) -> Self
    where
        DB: sqlx::Database,
        Batch<DB>: CommitBatch,
    {
        let writer = Completions {
            batch: Arc::new(Batch {
                pool,
                begin,
                lock_order_row,
            }),
            enqueued,
        };
        Self {
            batcher: Batcher::start(writer, max_batch, committers),
            savepoints: true,
        }
    }

    /// Without savepoints (the dsql profile) explicit groups are written one completion at a
    /// time; the batcher must then have been started with groups of one.
    pub(super) fn with_savepoints(mut self, savepoints: bool) -> Self {
        self.savepoints = savepoints;
        self
    }

    /// Commits these completions in one transaction now, each in its own savepoint; answers in
    /// the same order.
    pub(super) async fn complete_all(
        &self,
        completions: &[(Option<JobLease>, StepEffects)],
        now: DateTime<Utc>,
    ) -> Vec<StoreResult<CompleteOutcome>> {
        let group: Vec<Pending> = completions
            .iter()
            .map(|(lease, effects)| Pending {
                lease: *lease,
                effects: effects.clone(),
                now,
            })
            .collect();
        if self.savepoints {
            return self.batcher.write_now(group).await;
        }
        let mut answers = Vec::with_capacity(group.len());
        for pending in group {
            answers.extend(self.batcher.write_now(vec![pending]).await);
        }
        answers
    }

    /// Commits `effects` (and the job's completion) in the next group transaction.
    pub(super) async fn complete(
        &self,
        lease: Option<&JobLease>,
        effects: &StepEffects,
        now: DateTime<Utc>,
    ) -> StoreResult<CompleteOutcome> {
        let pending = Pending {
            lease: lease.copied(),
            effects: effects.clone(),
            now,
        };
        self.batcher
            .submit(pending)
            .await
            .unwrap_or_else(|| Err(StoreError::Unavailable("the committer has stopped".into())))
    }
}

/// The batcher's writer: a group of completions through the backend's [`Batch`].
pub(super) struct Completions {
    batch: Arc<dyn CommitBatch>,
    enqueued: Arc<dyn Fn(&[&'static str]) + Send + Sync>,
}

#[async_trait::async_trait]
impl GroupWriter for Completions {
    type Item = Pending;
    type Answer = StoreResult<CompleteOutcome>;

    async fn write(&self, group: Vec<Pending>) -> Vec<Self::Answer> {
        let mut answers: Vec<Option<Self::Answer>> = group.iter().map(|_| None).collect();
        // Indexes into `group` still to write: all, then those that lost a race.
        let mut todo: Vec<usize> = (0..group.len()).collect();
        let mut backoff = super::retry::Backoff::new();
        loop {
            let batch: Vec<Pending> = todo.iter().map(|&at| group[at].clone()).collect();
            let (written, enqueued) = self.batch.write(batch).await;
            if !enqueued.is_empty() {
                (self.enqueued)(&enqueued);
            }
            let mut lost = Vec::new();
            for (at, answer) in todo.iter().copied().zip(written) {
                if matches!(answer, Err(StoreError::Contended(_))) {
                    lost.push(at);
                }
                answers[at] = Some(answer);
            }
            if lost.is_empty() || !backoff.wait().await {
                break;
            }
            todo = lost;
        }
        answers
            .into_iter()
            .map(|answer| answer.expect("every completion answered"))
            .collect()
    }
}

/// What a committer writes with.
pub(super) struct Batch<DB: sqlx::Database> {
    pool: crate::store::DbPool<DB>,
    begin: &'static str,
    lock_order_row: &'static str,
}

/// Writing one group: implemented for each backend's [`Batch`] (where the future is `Send`).
#[async_trait::async_trait]
pub(super) trait CommitBatch: Send + Sync + 'static {
    /// Applies every completion, each in its own savepoint (a group of one: none), commits, and
    /// answers each. Also returns the kinds of the jobs the committed completions enqueued.
    async fn write(&self, batch: Vec<Pending>) -> (Vec<StoreResult<CompleteOutcome>>, Vec<&'static str>);
}

macro_rules! commit_batch_for {
    ($db:ty) => {
        #[async_trait::async_trait]
        impl CommitBatch for Batch<$db> {
            async fn write(&self, group: Vec<Pending>) -> (Vec<StoreResult<CompleteOutcome>>, Vec<&'static str>) {
                let mut tx = match self.pool.begin_with(self.begin).await {
                    Ok(tx) => tx,
                    Err(error) => {
                        let message = error.to_string();
                        let answers = group
                            .iter()
                            .map(|_| Err(StoreError::Unavailable(message.clone())))
                            .collect();
                        return (answers, Vec::new());
                    }
                };
                let alone = group.len() == 1;
                let mut answers: Vec<StoreResult<CompleteOutcome>> = Vec::with_capacity(group.len());
                let mut broken: Option<String> = None;
                for pending in &group {
                    if let Some(why) = &broken {
                        answers.push(Err(StoreError::Unavailable(why.clone())));
                        continue;
                    }
                    let lease = pending.lease.as_ref();
                    let answer = if alone {
                        effects::apply(&mut tx, self.lock_order_row, lease, &pending.effects, pending.now).await
                    } else {
                        match sqlx::Acquire::begin(&mut tx).await {
                            Err(error) => {
                                broken = Some(error.to_string());
                                Err(StoreError::from(error))
                            }
                            Ok(mut savepoint) => {
                                let answer = effects::apply(
                                    &mut savepoint,
                                    self.lock_order_row,
                                    lease,
                                    &pending.effects,
                                    pending.now,
                                )
                                .await;
                                let kept = if matches!(answer, Ok(CompleteOutcome::Completed)) {
                                    savepoint.commit().await
                                } else {
                                    savepoint.rollback().await
                                };
                                match kept {
                                    Ok(()) => answer,
                                    Err(error) => {
                                        broken = Some(error.to_string());
                                        Err(StoreError::from(error))
                                    }
                                }
                            }
                        }
                    };
                    answers.push(answer);
                }
                let committed = if let Some(why) = broken {
                    drop(tx);
                    Err(StoreError::Unavailable(format!(
                        "the group transaction broke: {why}"
                    )))
                } else if alone && !matches!(answers[0], Ok(CompleteOutcome::Completed)) {
                    // Nothing to keep: roll back (dropping does).
                    drop(tx);
                    Ok(())
                } else {
                    // A lost race at COMMIT stays `Contended`, so the completion is written again.
                    tx.commit().await.map_err(StoreError::from)
                };
                let mut enqueued: Vec<&'static str> = Vec::new();
                let answers = group
                    .iter()
                    .zip(answers)
                    .map(|(pending, answer)| match (&committed, answer) {
                        (Ok(()), Ok(CompleteOutcome::Completed)) => {
                            enqueued.extend(pending.effects.enqueue.iter().map(|job| job.kind));
                            Ok(CompleteOutcome::Completed)
                        }
                        (Err(why), Ok(CompleteOutcome::Completed)) => Err(why.outage_copy()),
                        (_, other) => other,
                    })
                    .collect();
                (answers, enqueued)
            }
        }
    };
}

commit_batch_for!(sqlx::Postgres);
commit_batch_for!(sqlx::Sqlite);
