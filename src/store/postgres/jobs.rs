//! The job queue on PostgreSQL, shared by many processes. Claims use `FOR UPDATE SKIP LOCKED`, so
//! concurrent workers (in any process) take disjoint jobs without waiting on each other; commits
//! that enqueued jobs are followed by a `NOTIFY orderflow_jobs`, so idle workers everywhere wake
//! instead of polling.
//!
//! The distributed-SQL profile has neither: a claim there is a conditional write
//! ([`DSQL_CLAIM_SQL`]) that loses cleanly to a concurrent claimer, and idle workers poll with a
//! backoff ([`crate::store::signal::IdlePoll`]). Every write here is retried whole when it lost a
//! race ([`crate::store::retry`]).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Postgres;
use uuid::Uuid;

use super::PgStore;
use crate::domain::OrderId;
use crate::store::common::CHUNK;
use crate::store::jobs::{
    ClaimedJob, CompleteOutcome, FailOutcome, JobFilter, JobLease, JobRecord, JobStore, NotificationRecord,
    NotificationSlot, PaymentRecord, QueueStats, ReplaySelector, StepEffects, StepOrder,
};
use crate::store::jobs::{PAYMENTS_AFTER_SQL, PAYMENTS_FIRST_SQL, PaymentRow};
use crate::store::jobs_common::{self, ClaimedRow, JobRow, StatsRow};
use crate::store::{Page, StoreResult, retry};

/// The claim of the distributed-SQL profile (no `SKIP LOCKED`): up to $5 jobs picked at random
/// among the oldest few times as many claimable ones — ready and due, or running with a lease that
/// ran out (its worker died: the attempt given back, the expiry counted, as in the PostgreSQL
/// claim) — then claimed by an UPDATE that repeats the claimable condition on each row. A job
/// another worker claimed first no longer matches and is left out (PostgreSQL at read
/// committed), or the claim fails with 40001 at snapshot isolation and is run again; picking
/// at random keeps concurrent claimers mostly off each other's rows.
/// Binds: token, lease until, now, kind, limit.
const DSQL_CLAIM_SQL: &str = "UPDATE jobs SET state = 'running', lease_token = $1, lease_expires_at = $2, \
     attempts = CASE WHEN state = 'running' THEN attempts ELSE attempts + 1 END, \
     lease_expiries = CASE WHEN state = 'running' THEN lease_expiries + 1 ELSE lease_expiries END, updated_at = $3 \
     WHERE id IN (SELECT id FROM ( \
        (SELECT id FROM jobs WHERE kind = $4 AND state = 'ready' AND run_at <= $3 ORDER BY run_at LIMIT $5 * 4) \
        UNION ALL \
        (SELECT id FROM jobs WHERE kind = $4 AND state = 'running' AND lease_expires_at < $3 LIMIT $5)) AS candidates \
        ORDER BY random() LIMIT $5) \
     AND kind = $4 AND ((state = 'ready' AND run_at <= $3) OR (state = 'running' AND lease_expires_at < $3)) \
     RETURNING id, kind, order_id, payload, attempts, max_attempts, lease_expiries, correlation_id, \
     CASE WHEN error_history <> '[]' THEN 1 ELSE 0 END AS failed_before";

impl PgStore {
    /// [`JobStore::claim_jobs`] by a conditional write ([`DSQL_CLAIM_SQL`]).
    async fn claim_jobs_conditionally(
        &self,
        kind: &str,
        limit: u32,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<ClaimedJob>> {
        let token = Uuid::now_v7();
        let rows: Vec<ClaimedRow> = sqlx::query_as(DSQL_CLAIM_SQL)
            .bind(token)
            .bind(now + lease)
            .bind(now)
            .bind(kind)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(|row| row.into_claimed(token)).collect()
    }
}

#[async_trait]
impl JobStore for PgStore {
    async fn claim_jobs(
        &self,
        kind: &str,
        limit: u32,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<ClaimedJob>> {
        if !self.profile.has_postgres_extras() {
            return retry::transaction(|| self.claim_jobs_conditionally(kind, limit, lease, now)).await;
        }
        let token = Uuid::now_v7();
        let until = now + lease;
        // Two plain, index-ordered statements in one round trip: jobs whose lease ran out (their
        // worker died) go back to ready, with the attempt that died given back and the expiry
        // counted instead (a crash is not a failure) — visible to the next claim, as this statement's snapshot
        // predates the reset — and up to `limit` ready jobs are claimed in run_at order straight
        // off the `jobs_ready` partial index. (One query with `ready OR expired` cannot use the
        // index and sorted the whole backlog on every claim.)
        //
        // The claim commits without waiting for the WAL flush (`synchronous_commit` off for this
        // transaction only): a claim lost in a database crash only makes its job ready again, and
        // the job's completion — a flushed commit later in the WAL — can never survive without it.
        // That takes one of the two flushes per job off the pipeline.
        let rows: Vec<ClaimedRow> = sqlx::query_as(
            "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true)), \
             expired AS ( \
                UPDATE jobs SET state = 'ready', lease_token = NULL, lease_expires_at = NULL, updated_at = $3, \
                attempts = attempts - 1, lease_expiries = lease_expiries + 1 \
                WHERE kind = $4 AND state = 'running' AND lease_expires_at < $3) \
             UPDATE jobs SET state = 'running', lease_token = $1, lease_expires_at = $2, attempts = attempts + 1, \
             updated_at = $3 FROM relaxed WHERE id IN (SELECT id FROM jobs WHERE kind = $4 AND state = 'ready' \
             AND run_at <= $3 ORDER BY run_at LIMIT $5 FOR UPDATE SKIP LOCKED) \
             RETURNING id, kind, order_id, payload, attempts, max_attempts, lease_expiries, correlation_id, \
             CASE WHEN error_history <> '[]' THEN 1 ELSE 0 END AS failed_before",
        )
        .bind(token)
        .bind(until)
        .bind(now)
        .bind(kind)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(|row| row.into_claimed(token)).collect()
    }

    async fn extend_lease(&self, lease: &JobLease, until: DateTime<Utc>) -> StoreResult<bool> {
        retry::transaction(|| jobs_common::leases::extend(&self.pool, "BEGIN", lease, until)).await
    }

    async fn fail_job(
        &self,
        lease: &JobLease,
        error: &str,
        retry_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> StoreResult<FailOutcome> {
        retry::transaction(|| {
            jobs_common::leases::fail(&self.pool, ("BEGIN", "FOR UPDATE"), lease, error, retry_at, now)
        })
        .await
    }

    async fn postpone_job(
        &self,
        lease: &JobLease,
        error: &str,
        run_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        retry::transaction(|| jobs_common::leases::postpone(&self.pool, lease, error, run_at, now)).await
    }

    async fn complete_job(
        &self,
        lease: Option<&JobLease>,
        effects: &StepEffects,
        now: DateTime<Utc>,
    ) -> StoreResult<CompleteOutcome> {
        // Shares a transaction with the completions waiting at the same time (group commit).
        self.committer.complete(lease, effects, now).await
    }

    async fn complete_jobs(
        &self,
        completions: &[(Option<JobLease>, StepEffects)],
        now: DateTime<Utc>,
    ) -> Vec<StoreResult<CompleteOutcome>> {
        self.committer.complete_all(completions, now).await
    }

    async fn prepare_notification(
        &self,
        order: OrderId,
        kind: &str,
        recipient: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<NotificationSlot> {
        // One autocommitted statement (one round trip), retried whole on a conflict.
        let slot: Option<(String,)> = retry::transaction(|| async {
            Ok(sqlx::query_as(jobs_common::PREPARE_NOTIFICATION_POSTGRES)
                .bind(order.as_uuid())
                .bind(kind)
                .bind(recipient)
                .bind(now)
                .fetch_optional(&self.pool)
                .await?)
        })
        .await?;
        Ok(if slot.is_some() {
            NotificationSlot::Send
        } else {
            NotificationSlot::AlreadySent
        })
    }

    async fn queue_stats(&self, now: DateTime<Utc>) -> StoreResult<Vec<QueueStats>> {
        let rows: Vec<StatsRow> = sqlx::query_as(jobs_common::STATS_SQL).fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(|row| row.into_stats(now)).collect())
    }

    async fn succeeded_jobs(&self) -> StoreResult<Vec<(String, i64)>> {
        Ok(sqlx::query_as(jobs_common::SUCCEEDED_SQL).fetch_all(&self.pool).await?)
    }

    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Page<JobRecord>> {
        let rows: Vec<JobRow> = jobs_common::list_jobs_query::<Postgres>(filter)
            .build_query_as()
            .fetch_all(&self.pool)
            .await?;
        jobs_common::jobs_page(rows, filter.limit)
    }

    async fn replay_jobs(&self, selector: &ReplaySelector, now: DateTime<Utc>) -> StoreResult<u64> {
        // A chunk per transaction (a distributed-SQL transaction changes at most 3,000 rows): each
        // moves up to CHUNK dead jobs, until none is left.
        let mut replayed = 0;
        loop {
            let chunk = retry::transaction(|| async {
                let mut sql = jobs_common::replay_query::<Postgres>(selector, now);
                if let ReplaySelector::AllDead { kind } = selector {
                    sql.push(" AND id IN (SELECT id FROM jobs WHERE state = 'dead'");
                    if let Some(kind) = kind {
                        sql.push(" AND kind = ").push_bind(kind.clone());
                    }
                    sql.push(" ORDER BY id LIMIT ").push_bind(CHUNK).push(")");
                }
                let mut tx = self.pool.begin().await?;
                let moved = sql.build().execute(&mut *tx).await?.rows_affected();
                tx.commit().await?;
                Ok(moved)
            })
            .await?;
            replayed += chunk;
            if chunk < CHUNK as u64 {
                break;
            }
        }
        if replayed > 0 {
            self.jobs_enqueued();
        }
        Ok(replayed)
    }

    async fn prune_jobs(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        // A chunk per transaction (at most 3,000 changed rows in the distributed-SQL profile).
        let mut pruned = 0;
        loop {
            let chunk = retry::transaction(|| async {
                let mut tx = self.pool.begin().await?;
                let deleted = sqlx::query(
                    "DELETE FROM jobs WHERE state = 'succeeded' AND updated_at < $1 AND id IN \
                     (SELECT id FROM jobs WHERE state = 'succeeded' AND updated_at < $1 ORDER BY id LIMIT $2)",
                )
                .bind(before)
                .bind(CHUNK)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                tx.commit().await?;
                Ok(deleted)
            })
            .await?;
            pruned += chunk;
            if chunk < CHUNK as u64 {
                return Ok(pruned);
            }
        }
    }

    async fn has_pending_work(&self) -> StoreResult<bool> {
        jobs_common::reads::has_pending_work(&self.pool).await
    }

    async fn payment(&self, order: OrderId) -> StoreResult<Option<PaymentRecord>> {
        jobs_common::reads::payment(&self.pool, order).await
    }

    async fn step_order(&self, order: OrderId) -> StoreResult<Option<StepOrder>> {
        self.step_reads.read(order).await
    }

    async fn payments_after(&self, after: Option<OrderId>, limit: u32) -> StoreResult<Vec<(OrderId, PaymentRecord)>> {
        let query = match after {
            None => sqlx::query_as::<_, PaymentRow>(PAYMENTS_FIRST_SQL).bind(i64::from(limit)),
            Some(after) => sqlx::query_as::<_, PaymentRow>(PAYMENTS_AFTER_SQL)
                .bind(after.as_uuid())
                .bind(i64::from(limit)),
        };
        let rows = query.fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(PaymentRow::into_pair).collect())
    }

    async fn notifications(&self, order: OrderId) -> StoreResult<Vec<NotificationRecord>> {
        jobs_common::reads::notifications(&self.pool, order).await
    }

    async fn expired_orders(&self, before: DateTime<Utc>, limit: u32) -> StoreResult<Vec<OrderId>> {
        jobs_common::reads::expired_orders(&self.pool, before, limit).await
    }
}
