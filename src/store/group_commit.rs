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
    /// Most completions in one transaction. Default [`DEFAULT_SQLITE_MAX_BATCH`] on SQLite and 1
    /// on PostgreSQL, where every completion commits alone in its caller's task. With more, the
    /// completions that wait while a group is written share the next transaction, and those that need only their order and job rows are written
    /// together in a fixed number of statements ([`effects::apply_merged`]); a completion that
    /// arrives while a committer is idle is written at once, alone. Measured in
    /// docs/BENCHMARKS.md ("Completions written together"): on PostgreSQL groups cut statements
    /// per order by 40 %, and their product rows are locked in id order first (without it a group
    /// writing two products deadlocked with a checkout, found only after 1 s), yet they carry
    /// fewer orders per second and cost the database more CPU per order; on SQLite's single
    /// writer groups carry 16–30 % more and cost its process 10–19 % less CPU per order.
    pub max_batch: Option<usize>,
    /// Group transactions written at once (when grouping). SQLite: 1 (one writer). PostgreSQL:
    /// [`DEFAULT_PG_COMMITTERS`] — more committers mean smaller groups, so more statements per
    /// completion.
    pub committers: Option<usize>,
}

/// The default largest group on PostgreSQL: 1, no grouping (see [`GroupCommitSettings::max_batch`]).
pub const DEFAULT_MAX_BATCH: usize = 1;
/// The default largest group on SQLite's single writer.
pub const DEFAULT_SQLITE_MAX_BATCH: usize = 32;
/// The default number of PostgreSQL committers when grouping.
pub const DEFAULT_PG_COMMITTERS: usize = 2;

impl GroupCommitSettings {
    /// (largest group, committers) on SQLite (`single_writer`) or PostgreSQL with `pool` connections.
    pub fn resolve(self, single_writer: bool, pool: u32) -> (usize, usize) {
        let (max_batch, committers) = if single_writer {
            (DEFAULT_SQLITE_MAX_BATCH, 1)
        } else {
            (DEFAULT_MAX_BATCH, DEFAULT_PG_COMMITTERS.min(pool.max(1) as usize))
        };
        (
            self.max_batch.unwrap_or(max_batch).max(1),
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

/// The completions of `group` that [`effects::apply_merged`] can write together: those
/// [`effects::mergeable`], the first of each order (a later one of the same order goes after,
/// in its own savepoint, and sees the first's writes).
fn mergeable(group: &[Pending]) -> Vec<usize> {
    let mut orders = std::collections::HashSet::new();
    group
        .iter()
        .enumerate()
        .filter(|(_, pending)| effects::mergeable(pending.lease.as_ref(), &pending.effects))
        .filter(|(_, pending)| orders.insert(pending.effects.order_id))
        .map(|(at, _)| at)
        .collect()
}

/// The orders of `pendings`, sorted, once each.
fn order_ids<'a>(pendings: impl Iterator<Item = &'a Pending>) -> Vec<uuid::Uuid> {
    let mut ids: Vec<uuid::Uuid> = pendings
        .filter_map(|pending| pending.effects.order_id.map(|id| id.as_uuid()))
        .collect();
    ids.sort();
    ids.dedup();
    ids
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
                let mut answers: Vec<Option<StoreResult<CompleteOutcome>>> = group.iter().map(|_| None).collect();
                // Completions that need nothing but their order and job rows are written together,
                // in a fixed number of statements ([`effects::apply_merged`]); the others each in
                // a savepoint after them.
                let merged = if alone { Vec::new() } else { mergeable(&group) };
                // The orders of the completions written one by one after the merged ones: locked
                // with them, before any stock is written (see `effects::apply_merged`).
                let unmerged: Vec<&Pending> = group
                    .iter()
                    .enumerate()
                    .filter(|(at, _)| merged.len() < 2 || !merged.contains(at))
                    .map(|(_, pending)| pending)
                    .collect();
                let others = order_ids(unmerged.iter().copied());
                // Those of them whose stock may change: their product rows are locked with the
                // group's, in id order, before any stock is written.
                let others_stock =
                    order_ids(unmerged.iter().copied().filter(|pending| pending.effects.inventory.is_some()));
                if merged.len() < 2 && !alone {
                    let locked =
                        effects::lock_group_orders(&mut tx, self.lock_order_row, &others, &others_stock).await;
                    if let Err(error) = locked {
                        let answers = group.iter().map(|_| Err(error.outage_copy())).collect();
                        return (answers, Vec::new());
                    }
                }
                if merged.len() > 1 {
                    let completions: Vec<_> = merged
                        .iter()
                        .map(|&at| {
                            let pending = &group[at];
                            (pending.lease.expect("mergeable completions are leased"), &pending.effects, pending.now)
                        })
                        .collect();
                    match effects::apply_merged(&mut tx, self.lock_order_row, &completions, &others, &others_stock).await {
                        Ok(written) => {
                            for (&at, answer) in merged.iter().zip(written) {
                                answers[at] = Some(answer);
                            }
                        }
                        Err(error) => {
                            // The shared write failed and took the transaction with it: each
                            // completion is written on its own, so only the one at fault fails.
                            tracing::debug!(%error, size = group.len(), "merged completions failed; writing each alone");
                            drop(tx);
                            return self.each_alone(group).await;
                        }
                    }
                }
                let mut broken: Option<String> = None;
                for (pending, answer) in group.iter().zip(answers.iter_mut()) {
                    if answer.is_some() {
                        continue;
                    }
                    if let Some(why) = &broken {
                        *answer = Some(Err(StoreError::Unavailable(why.clone())));
                        continue;
                    }
                    let lease = pending.lease.as_ref();
                    *answer = Some(if alone {
                        effects::apply(&mut tx, self.lock_order_row, lease, false, &pending.effects, pending.now).await
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
                                    true,
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
                    });
                }
                let answers: Vec<StoreResult<CompleteOutcome>> =
                    answers.into_iter().map(|answer| answer.expect("every completion answered")).collect();
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

        impl Batch<$db> {
            /// Writes each completion in a transaction of its own.
            async fn each_alone(&self, group: Vec<Pending>) -> (Vec<StoreResult<CompleteOutcome>>, Vec<&'static str>) {
                let (mut answers, mut enqueued) = (Vec::with_capacity(group.len()), Vec::new());
                for pending in group {
                    let (answer, kinds) = CommitBatch::write(self, vec![pending]).await;
                    answers.extend(answer);
                    enqueued.extend(kinds);
                }
                (answers, enqueued)
            }
        }
    };
}

commit_batch_for!(sqlx::Postgres);
commit_batch_for!(sqlx::Sqlite);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_groups_completions_by_default_and_postgres_does_not() {
        let defaults = GroupCommitSettings::default();
        assert_eq!(defaults.resolve(true, 1), (DEFAULT_SQLITE_MAX_BATCH, 1));
        assert_eq!(defaults.resolve(false, 16), (1, DEFAULT_PG_COMMITTERS));
        let chosen = GroupCommitSettings {
            max_batch: Some(8),
            committers: Some(3),
        };
        assert_eq!(chosen.resolve(true, 1), (8, 3));
        assert_eq!(chosen.resolve(false, 1), (8, 3));
    }
}
