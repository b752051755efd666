//! The job queue on SQLite. Every write goes through the single writer connection, so a claim
//! is a plain `UPDATE … RETURNING`: no two workers can take the same job.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Sqlite;
use uuid::Uuid;

use super::SqliteStore;
use crate::domain::OrderId;
use crate::store::jobs::{
    ClaimedJob, CompleteOutcome, FailOutcome, JobFilter, JobLease, JobRecord, JobStore, NotificationRecord,
    NotificationSlot, PaymentRecord, QueueStats, ReplaySelector, StepEffects, StepOrder,
};
use crate::store::jobs::{PAYMENTS_AFTER_SQL, PAYMENTS_FIRST_SQL, PaymentRow};
use crate::store::jobs_common::{self, ClaimedRow, JobRow, StatsRow};
use crate::store::{Page, StoreResult};

#[async_trait]
impl JobStore for SqliteStore {
    async fn claim_jobs(
        &self,
        kind: &str,
        limit: u32,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<ClaimedJob>> {
        let token = Uuid::now_v7();
        let until = now + lease;
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        // Jobs whose lease ran out (their worker died) go back to ready first, with the attempt that
        // died given back and the expiry counted instead (a crash is not a failure); then ready jobs are
        // claimed in run_at order straight off the `jobs_ready` partial index.
        sqlx::query(
            "UPDATE jobs SET state = 'ready', lease_token = NULL, lease_expires_at = NULL, updated_at = ?1, \
             attempts = attempts - 1, lease_expiries = lease_expiries + 1 \
             WHERE kind = ?2 AND state = 'running' AND lease_expires_at < ?1",
        )
        .bind(now)
        .bind(kind)
        .execute(&mut *tx)
        .await?;
        let rows: Vec<ClaimedRow> = sqlx::query_as(
            "UPDATE jobs SET state = 'running', lease_token = ?1, lease_expires_at = ?2, attempts = attempts + 1, \
             updated_at = ?3 WHERE id IN (SELECT id FROM jobs WHERE kind = ?4 AND state = 'ready' AND run_at <= ?3 \
             ORDER BY run_at LIMIT ?5) \
             RETURNING id, kind, order_id, payload, attempts, max_attempts, lease_expiries, correlation_id, \
             CASE WHEN error_history <> '[]' THEN 1 ELSE 0 END AS failed_before",
        )
        .bind(token)
        .bind(until)
        .bind(now)
        .bind(kind)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.into_iter().map(|row| row.into_claimed(token)).collect()
    }

    async fn extend_lease(&self, lease: &JobLease, until: DateTime<Utc>) -> StoreResult<bool> {
        jobs_common::leases::extend(&self.writer, "BEGIN IMMEDIATE", lease, until).await
    }

    async fn fail_job(
        &self,
        lease: &JobLease,
        error: &str,
        retry_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> StoreResult<FailOutcome> {
        jobs_common::leases::fail(&self.writer, ("BEGIN IMMEDIATE", ""), lease, error, retry_at, now).await
    }

    async fn postpone_job(
        &self,
        lease: &JobLease,
        error: &str,
        run_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        jobs_common::leases::postpone(&self.writer, lease, error, run_at, now).await
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
        // Not fsynced: see PREPARE_NOTIFICATION_POSTGRES.
        let (order, kind, recipient) = (order.as_uuid(), kind.to_string(), recipient.to_string());
        let slot: Option<(String,)> = self
            .write_unsynced(move |tx| {
                Box::pin(async move {
                    sqlx::query_as(jobs_common::PREPARE_NOTIFICATION_SQLITE)
                        .bind(order)
                        .bind(kind)
                        .bind(recipient)
                        .bind(now)
                        .fetch_optional(&mut **tx)
                        .await
                })
            })
            .await?;
        Ok(if slot.is_some() {
            NotificationSlot::Send
        } else {
            NotificationSlot::AlreadySent
        })
    }

    async fn queue_stats(&self, now: DateTime<Utc>) -> StoreResult<Vec<QueueStats>> {
        let rows: Vec<StatsRow> = sqlx::query_as(jobs_common::STATS_SQL).fetch_all(&self.reader).await?;
        Ok(rows.into_iter().map(|row| row.into_stats(now)).collect())
    }

    async fn succeeded_jobs(&self) -> StoreResult<Vec<(String, i64)>> {
        Ok(sqlx::query_as(jobs_common::SUCCEEDED_SQL)
            .fetch_all(&self.reader)
            .await?)
    }

    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Page<JobRecord>> {
        let rows: Vec<JobRow> = jobs_common::list_jobs_query::<Sqlite>(filter)
            .build_query_as()
            .fetch_all(&self.reader)
            .await?;
        jobs_common::jobs_page(rows, filter.limit)
    }

    async fn replay_jobs(&self, selector: &ReplaySelector, now: DateTime<Utc>) -> StoreResult<u64> {
        let mut sql = jobs_common::replay_query::<Sqlite>(selector, now);
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let replayed = sql.build().execute(&mut *tx).await?.rows_affected();
        tx.commit().await?;
        if replayed > 0 {
            self.jobs_ready.wake_all();
        }
        Ok(replayed)
    }

    async fn prune_jobs(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let pruned = sqlx::query("DELETE FROM jobs WHERE state = 'succeeded' AND updated_at < ?")
            .bind(before)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(pruned)
    }

    async fn has_pending_work(&self) -> StoreResult<bool> {
        jobs_common::reads::has_pending_work(&self.reader).await
    }

    async fn payment(&self, order: OrderId) -> StoreResult<Option<PaymentRecord>> {
        jobs_common::reads::payment(&self.reader, order).await
    }

    async fn step_order(&self, order: OrderId) -> StoreResult<Option<StepOrder>> {
        jobs_common::reads::step_order(&self.reader, order).await
    }

    async fn payments_after(&self, after: Option<OrderId>, limit: u32) -> StoreResult<Vec<(OrderId, PaymentRecord)>> {
        let query = match after {
            None => sqlx::query_as::<_, PaymentRow>(PAYMENTS_FIRST_SQL).bind(i64::from(limit)),
            Some(after) => sqlx::query_as::<_, PaymentRow>(PAYMENTS_AFTER_SQL)
                .bind(after.as_uuid())
                .bind(i64::from(limit)),
        };
        let rows = query.fetch_all(&self.reader).await?;
        Ok(rows.into_iter().map(PaymentRow::into_pair).collect())
    }

    async fn notifications(&self, order: OrderId) -> StoreResult<Vec<NotificationRecord>> {
        jobs_common::reads::notifications(&self.reader, order).await
    }

    async fn expired_orders(&self, before: DateTime<Utc>, limit: u32) -> StoreResult<Vec<OrderId>> {
        jobs_common::reads::expired_orders(&self.reader, before, limit).await
    }
}
