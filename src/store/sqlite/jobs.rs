//! The job queue on SQLite. Every write goes through the single writer connection, so a claim
//! is a plain `UPDATE … RETURNING`: no two workers can take the same job.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{QueryBuilder, Sqlite, Transaction};
use uuid::Uuid;

use super::SqliteStore;
use crate::domain::{OrderId, OrderStatus};
use crate::store::jobs::{
    ClaimedJob, CompleteOutcome, EXPIRED_SQL, FailOutcome, InventoryAction, JobFilter, JobLease, JobRecord, JobStore,
    NOTIFICATIONS_SQL, NotificationRecord, NotificationSlot, PAYMENT_SQL, PaymentRecord, QueueStats, ReplaySelector,
    StepEffects,
};
use crate::store::jobs_common::{self, ClaimedRow, JobRow, StatsRow};
use crate::store::{Page, StoreError, StoreResult};

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
        let rows: Vec<ClaimedRow> = sqlx::query_as(
            "UPDATE jobs SET state = 'running', lease_token = ?1, lease_expires_at = ?2, attempts = attempts + 1, \
             updated_at = ?3 WHERE id IN (SELECT id FROM jobs WHERE kind = ?4 AND \
             ((state = 'ready' AND run_at <= ?3) OR (state = 'running' AND lease_expires_at < ?3)) \
             ORDER BY run_at LIMIT ?5) \
             RETURNING id, kind, order_id, payload, attempts, max_attempts, correlation_id",
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
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let updated =
            sqlx::query("UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND lease_token = ? AND state = 'running'")
                .bind(until)
                .bind(lease.job_id)
                .bind(lease.token)
                .execute(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(updated.rows_affected() == 1)
    }

    async fn fail_job(
        &self,
        lease: &JobLease,
        error: &str,
        retry_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> StoreResult<FailOutcome> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let current: Option<(i32, i32, String)> = sqlx::query_as(
            "SELECT attempts, max_attempts, error_history FROM jobs WHERE id = ? AND lease_token = ? AND state = 'running'",
        )
        .bind(lease.job_id)
        .bind(lease.token)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((attempts, max_attempts, history)) = current else {
            return Ok(FailOutcome::LeaseLost);
        };
        let failure = jobs_common::record_failure(attempts, max_attempts, &history, error, retry_at, now);
        sqlx::query(
            "UPDATE jobs SET state = ?, run_at = ?, last_error = ?, error_history = ?, lease_token = NULL, \
             lease_expires_at = NULL, updated_at = ? WHERE id = ?",
        )
        .bind(failure.state)
        .bind(failure.run_at)
        .bind(error)
        .bind(&failure.history)
        .bind(now)
        .bind(lease.job_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(failure.outcome)
    }

    async fn complete_job(
        &self,
        lease: Option<&JobLease>,
        effects: &StepEffects,
        now: DateTime<Utc>,
    ) -> StoreResult<CompleteOutcome> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let mut correlation_id: Option<String> = None;
        if let Some(lease) = lease {
            let done: Option<(Option<String>,)> = sqlx::query_as(
                "UPDATE jobs SET state = 'succeeded', lease_token = NULL, lease_expires_at = NULL, updated_at = ? \
                 WHERE id = ? AND lease_token = ? AND state = 'running' RETURNING correlation_id",
            )
            .bind(now)
            .bind(lease.job_id)
            .bind(lease.token)
            .fetch_optional(&mut *tx)
            .await?;
            match done {
                Some((correlation,)) => correlation_id = correlation,
                None => return Ok(CompleteOutcome::LeaseLost),
            }
        }
        if let Some(order_id) = effects.order_id {
            let current: Option<(String, String, Option<String>)> =
                sqlx::query_as("SELECT status, inventory_state, correlation_id FROM orders WHERE id = ?")
                    .bind(order_id.as_uuid())
                    .fetch_optional(&mut *tx)
                    .await?;
            let (status, inventory_state, order_correlation) =
                current.ok_or_else(|| StoreError::Corrupt(format!("job for missing order {order_id}")))?;
            let status: OrderStatus = status.parse().map_err(StoreError::Corrupt)?;
            correlation_id = correlation_id.or(order_correlation);
            if !effects.expect_status.is_empty() && !effects.expect_status.contains(&status) {
                return Ok(CompleteOutcome::UnexpectedStatus(status));
            }
            let final_status = jobs_common::next_status(status, effects.new_status)?;
            if final_status != status {
                sqlx::query("UPDATE orders SET status = ?, updated_at = ? WHERE id = ?")
                    .bind(final_status.as_str())
                    .bind(now)
                    .bind(order_id.as_uuid())
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(action) = effects.inventory {
                apply_inventory(&mut tx, order_id.as_uuid(), &inventory_state, action, now).await?;
            }
            if let Some(payment) = &effects.payment {
                sqlx::query(
                    "INSERT INTO payments (order_id, provider, idempotency_key, state, provider_ref, amount_minor, \
                     currency, detail, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9) \
                     ON CONFLICT (order_id) DO UPDATE SET state = excluded.state, \
                     provider_ref = coalesce(excluded.provider_ref, payments.provider_ref), \
                     detail = excluded.detail, updated_at = excluded.updated_at",
                )
                .bind(order_id.as_uuid())
                .bind(&payment.provider)
                .bind(&payment.idempotency_key)
                .bind(payment.state.as_str())
                .bind(&payment.provider_ref)
                .bind(payment.amount_minor)
                .bind(&payment.currency)
                .bind(&payment.detail)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            if let Some(sent) = &effects.notification_sent {
                sqlx::query("UPDATE notifications SET state = 'sent', message_id = ?, sent_at = ? WHERE order_id = ? AND kind = ?")
                    .bind(&sent.message_id)
                    .bind(now)
                    .bind(order_id.as_uuid())
                    .bind(&sent.kind)
                    .execute(&mut *tx)
                    .await?;
            }
            for (kind, detail) in &effects.events {
                sqlx::query(
                    "INSERT INTO order_events (id, order_id, kind, status, detail, correlation_id, created_at) \
                     VALUES (?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(Uuid::now_v7())
                .bind(order_id.as_uuid())
                .bind(kind)
                .bind(final_status.as_str())
                .bind(detail)
                .bind(&correlation_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
        }
        for job in &effects.enqueue {
            sqlx::query(
                "INSERT INTO jobs (id, kind, order_id, payload, state, attempts, max_attempts, run_at, ready_since, \
                 correlation_id, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, 'ready', 0, ?5, ?6, ?6, ?7, ?8, ?8)",
            )
            .bind(Uuid::now_v7())
            .bind(job.kind)
            .bind(effects.order_id.map(|id| id.as_uuid()))
            .bind(job.payload.to_string())
            .bind(i64::from(job.max_attempts))
            .bind(job.run_at)
            .bind(&correlation_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        if !effects.enqueue.is_empty() {
            self.jobs_ready.notify_waiters();
        }
        Ok(CompleteOutcome::Completed)
    }

    async fn prepare_notification(
        &self,
        order: OrderId,
        kind: &str,
        recipient: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<NotificationSlot> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let slot: Option<(String,)> = sqlx::query_as(jobs_common::PREPARE_NOTIFICATION_SQLITE)
            .bind(order.as_uuid())
            .bind(kind)
            .bind(recipient)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
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

    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Page<JobRecord>> {
        let mut sql = QueryBuilder::<Sqlite>::new(format!("SELECT {} FROM jobs WHERE 1 = 1", jobs_common::JOB_COLUMNS));
        if let Some(state) = &filter.state {
            sql.push(" AND state = ").push_bind(state.clone());
        }
        if let Some(kind) = &filter.kind {
            sql.push(" AND kind = ").push_bind(kind.clone());
        }
        if let Some(after) = filter.after {
            sql.push(" AND id > ").push_bind(after);
        }
        sql.push(" ORDER BY id LIMIT ").push_bind(i64::from(filter.limit) + 1);
        let rows: Vec<JobRow> = sql.build_query_as().fetch_all(&self.reader).await?;
        let jobs = rows
            .into_iter()
            .map(JobRow::into_record)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(Page::from_rows(jobs, filter.limit, |job| job.job_id))
    }

    async fn replay_jobs(&self, selector: &ReplaySelector, now: DateTime<Utc>) -> StoreResult<u64> {
        let mut sql = QueryBuilder::<Sqlite>::new(
            "UPDATE jobs SET state = 'ready', attempts = 0, lease_token = NULL, lease_expires_at = NULL, run_at = ",
        );
        sql.push_bind(now)
            .push(", ready_since = ")
            .push_bind(now)
            .push(", updated_at = ")
            .push_bind(now);
        sql.push(" WHERE state = 'dead'");
        match selector {
            ReplaySelector::One(id) => {
                sql.push(" AND id = ").push_bind(*id);
            }
            ReplaySelector::AllDead { kind: Some(kind) } => {
                sql.push(" AND kind = ").push_bind(kind.clone());
            }
            ReplaySelector::AllDead { kind: None } => {}
        }
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let replayed = sql.build().execute(&mut *tx).await?.rows_affected();
        tx.commit().await?;
        if replayed > 0 {
            self.jobs_ready.notify_waiters();
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
        let (pending,): (bool,) =
            sqlx::query_as("SELECT EXISTS (SELECT 1 FROM jobs WHERE state IN ('ready', 'running'))")
                .fetch_one(&self.reader)
                .await?;
        Ok(pending)
    }

    async fn payment(&self, order: OrderId) -> StoreResult<Option<PaymentRecord>> {
        Ok(sqlx::query_as(PAYMENT_SQL)
            .bind(order.as_uuid())
            .fetch_optional(&self.reader)
            .await?)
    }

    async fn notifications(&self, order: OrderId) -> StoreResult<Vec<NotificationRecord>> {
        Ok(sqlx::query_as(NOTIFICATIONS_SQL)
            .bind(order.as_uuid())
            .fetch_all(&self.reader)
            .await?)
    }

    async fn expired_orders(&self, before: DateTime<Utc>, limit: u32) -> StoreResult<Vec<OrderId>> {
        let rows: Vec<(Uuid,)> = sqlx::query_as(EXPIRED_SQL)
            .bind(before)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        Ok(rows.into_iter().map(|(id,)| OrderId::from_uuid(id)).collect())
    }
}

/// Moves an order's stock as `action` says, locking products in id order.
async fn apply_inventory(
    tx: &mut Transaction<'_, Sqlite>,
    order_id: Uuid,
    inventory_state: &str,
    action: InventoryAction,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let Some(plan) = jobs_common::inventory_plan(inventory_state, action)? else {
        return Ok(());
    };
    let lines: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT product_id, quantity FROM order_items WHERE order_id = ? ORDER BY product_id")
            .bind(order_id)
            .fetch_all(&mut **tx)
            .await?;
    for (product_id, quantity) in lines {
        sqlx::query(
            "UPDATE products SET on_hand = on_hand + ?1, reserved = reserved + ?2, version = version + 1, \
             updated_at = ?3 WHERE id = ?4",
        )
        .bind(plan.on_hand_sign * quantity)
        .bind(plan.reserved_sign * quantity)
        .bind(now)
        .bind(product_id)
        .execute(&mut **tx)
        .await?;
        if let Some(kind) = plan.ledger_kind {
            sqlx::query(
                "INSERT INTO inventory_ledger (id, product_id, order_id, kind, delta, reason, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(Uuid::now_v7())
            .bind(product_id)
            .bind(order_id)
            .bind(kind)
            .bind(plan.on_hand_sign * quantity)
            .bind(format!("order {order_id}"))
            .bind(now)
            .execute(&mut **tx)
            .await?;
        }
    }
    sqlx::query("UPDATE orders SET inventory_state = ? WHERE id = ?")
        .bind(plan.next_state)
        .bind(order_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
