//! Queue pieces both backends share: row shapes, the statistics query (the same SQL in both
//! dialects), failure bookkeeping, legal status moves and the stock movements of an order.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::jobs::{
    ClaimedJob, FailOutcome, InventoryAction, JobError, JobFilter, JobLease, JobRecord, QueueStats, ReplaySelector,
};
use super::{StoreError, StoreResult};
use crate::domain::{OrderId, OrderStatus};

pub const JOB_COLUMNS: &str = "id, kind, order_id, state, attempts, max_attempts, last_error, error_history, \
     run_at, correlation_id, created_at, updated_at";

/// Per kind: counts by state and when the oldest ready job became ready.
/// The numbers operators watch per kind, from the jobs not yet finished only: succeeded jobs are
/// kept for `--job-retention` (a week by default, millions of rows under load), and the alarms and
/// `/metrics` read this every few seconds, so it must not scan them (`jobs_by_state` serves it).
pub const STATS_SQL: &str = "SELECT kind, \
     CAST(sum(CASE WHEN state = 'ready' THEN 1 ELSE 0 END) AS BIGINT) AS ready, \
     CAST(sum(CASE WHEN state = 'running' THEN 1 ELSE 0 END) AS BIGINT) AS running, \
     CAST(sum(CASE WHEN state = 'dead' THEN 1 ELSE 0 END) AS BIGINT) AS dead, \
     min(CASE WHEN state = 'ready' THEN ready_since END) AS oldest_ready \
     FROM jobs WHERE state IN ('ready', 'running', 'dead') GROUP BY kind ORDER BY kind";

/// Succeeded jobs per kind (still kept): for the admin API only, which is read on demand.
pub const SUCCEEDED_SQL: &str = "SELECT kind, count(*) FROM jobs WHERE state = 'succeeded' GROUP BY kind ORDER BY kind";

/// Records "sending" unless the message was already sent; returns a row only when it should be
/// sent (first time, or an earlier attempt died between sending and recording).
pub const PREPARE_NOTIFICATION_SQLITE: &str = "INSERT INTO notifications (order_id, kind, state, recipient, attempts, created_at) \
     VALUES (?1, ?2, 'sending', ?3, 1, ?4) ON CONFLICT (order_id, kind) DO UPDATE \
     SET attempts = notifications.attempts + 1 WHERE notifications.state = 'sending' RETURNING state";
///
/// On PostgreSQL it commits without waiting for the WAL flush (`synchronous_commit` off for this
/// statement's transaction only): the record only counts attempts and says a send may have
/// happened, and a lost one changes nothing a retry does (a `sending` slot and no slot both
/// send). The step's completion, a flushed commit later in the WAL, cannot survive without it.
/// That takes one of the two flushed commits per e-mail off the pipeline.
pub const PREPARE_NOTIFICATION_POSTGRES: &str = "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true)) \
     INSERT INTO notifications (order_id, kind, state, recipient, attempts, created_at) \
     SELECT $1, $2, 'sending', $3, 1, $4 FROM relaxed ON CONFLICT (order_id, kind) DO UPDATE \
     SET attempts = notifications.attempts + 1 WHERE notifications.state = 'sending' RETURNING state";

/// The SELECT of a job listing; each backend runs it (same SQL, its own placeholders).
pub fn list_jobs_query<'a, DB>(filter: &JobFilter) -> sqlx::QueryBuilder<'a, DB>
where
    DB: sqlx::Database,
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut sql = sqlx::QueryBuilder::new(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE 1 = 1"));
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
    sql
}

/// The UPDATE that moves dead jobs back to ready with fresh attempts and lease expiries (history
/// kept).
pub fn replay_query<'a, DB>(selector: &ReplaySelector, now: DateTime<Utc>) -> sqlx::QueryBuilder<'a, DB>
where
    DB: sqlx::Database,
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    DateTime<Utc>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut sql = sqlx::QueryBuilder::new(
        "UPDATE jobs SET state = 'ready', attempts = 0, lease_expiries = 0, lease_token = NULL, \
         lease_expires_at = NULL, run_at = ",
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
    sql
}

/// A job's lease bookkeeping — heartbeat, failure, postponement — written once for both
/// backends. The dialects differ only in how a write transaction begins (`BEGIN IMMEDIATE` on
/// SQLite's single writer) and how the job's row is locked (`FOR UPDATE`, nothing on SQLite).
pub mod leases {
    use chrono::{DateTime, Utc};
    use uuid::Uuid;

    use super::{POSTPONE_SQL, record_failure};
    use crate::store::StoreResult;
    use crate::store::jobs::{FailOutcome, JobLease};

    /// [`JobStore::extend_lease`](crate::store::jobs::JobStore::extend_lease).
    pub async fn extend<DB>(
        pool: &crate::store::DbPool<DB>,
        begin: &str,
        lease: &JobLease,
        until: DateTime<Utc>,
    ) -> StoreResult<bool>
    where
        DB: sqlx::Database,
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
        for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
        for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'r> (Uuid,): sqlx::FromRow<'r, DB::Row>,
    {
        let mut tx = pool.begin_with(begin.to_string()).await?;
        let updated: Option<(Uuid,)> = sqlx::query_as(
            "UPDATE jobs SET lease_expires_at = $1 WHERE id = $2 AND lease_token = $3 AND state = 'running' \
             RETURNING id",
        )
        .bind(until)
        .bind(lease.job_id)
        .bind(lease.token)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(updated.is_some())
    }

    /// [`JobStore::fail_job`](crate::store::jobs::JobStore::fail_job): the failure appended to the
    /// job's history, then retried at `retry_at` or dead.
    pub async fn fail<DB>(
        pool: &crate::store::DbPool<DB>,
        (begin, lock_row): (&str, &str),
        lease: &JobLease,
        error: &str,
        retry_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> StoreResult<FailOutcome>
    where
        DB: sqlx::Database,
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
        for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
        for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'r> (i32, i32, String): sqlx::FromRow<'r, DB::Row>,
    {
        let mut tx = pool.begin_with(begin.to_string()).await?;
        let current: Option<(i32, i32, String)> = sqlx::query_as(&format!(
            "SELECT attempts, max_attempts, error_history FROM jobs WHERE id = $1 AND lease_token = $2 \
             AND state = 'running' {lock_row}"
        ))
        .bind(lease.job_id)
        .bind(lease.token)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((attempts, max_attempts, history)) = current else {
            return Ok(FailOutcome::LeaseLost);
        };
        let failure = record_failure(attempts, max_attempts, &history, error, retry_at, now);
        sqlx::query(
            "UPDATE jobs SET state = $1, run_at = $2, last_error = $3, error_history = $4, lease_token = NULL, \
             lease_expires_at = NULL, updated_at = $5 WHERE id = $6",
        )
        .bind(failure.state)
        .bind(failure.run_at)
        .bind(error.to_string())
        .bind(failure.history)
        .bind(now)
        .bind(lease.job_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(failure.outcome)
    }

    /// [`JobStore::postpone_job`](crate::store::jobs::JobStore::postpone_job).
    pub async fn postpone<DB>(
        pool: &crate::store::DbPool<DB>,
        lease: &JobLease,
        error: &str,
        run_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool>
    where
        DB: sqlx::Database,
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
        for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
        for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'r> (Uuid,): sqlx::FromRow<'r, DB::Row>,
    {
        let postponed: Option<(Uuid,)> = sqlx::query_as(POSTPONE_SQL)
            .bind(run_at)
            .bind(error.to_string())
            .bind(now)
            .bind(lease.job_id)
            .bind(lease.token)
            .fetch_optional(pool)
            .await?;
        Ok(postponed.is_some())
    }
}

/// The pipeline's read-only queries, the same SQL on both backends (run against their read pool).
pub mod reads {
    use chrono::{DateTime, Utc};
    use uuid::Uuid;

    use crate::domain::OrderId;
    use crate::store::StoreResult;
    use crate::store::jobs::{
        EXPIRED_SQL, NOTIFICATIONS_SQL, NotificationRecord, PAYMENT_SQL, PaymentRecord, StepOrder,
    };
    use crate::store::rows::{OrderItemRow, OrderRow};

    pub async fn has_pending_work<DB>(pool: &crate::store::DbPool<DB>) -> StoreResult<bool>
    where
        DB: sqlx::Database,
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
        for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
        for<'r> (bool,): sqlx::FromRow<'r, DB::Row>,
    {
        let (pending,): (bool,) =
            sqlx::query_as("SELECT EXISTS (SELECT 1 FROM jobs WHERE state IN ('ready', 'running'))")
                .fetch_one(pool)
                .await?;
        Ok(pending)
    }

    pub async fn payment<DB>(pool: &crate::store::DbPool<DB>, order: OrderId) -> StoreResult<Option<PaymentRecord>>
    where
        DB: sqlx::Database,
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
        for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
        for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        PaymentRecord: for<'r> sqlx::FromRow<'r, DB::Row>,
    {
        Ok(sqlx::query_as(PAYMENT_SQL)
            .bind(order.as_uuid())
            .fetch_optional(pool)
            .await?)
    }

    /// [`JobStore::step_order`](crate::store::jobs::JobStore::step_order), for both backends.
    pub async fn step_order<DB>(pool: &crate::store::DbPool<DB>, order: OrderId) -> StoreResult<Option<StepOrder>>
    where
        DB: sqlx::Database,
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
        for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
        for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        StepOrderLine: for<'r> sqlx::FromRow<'r, DB::Row>,
    {
        Ok(step_orders(pool, &[order]).await?.pop().flatten())
    }

    /// Several steps' orders in one statement (each with its customer and payment, once per
    /// line), answered in the order asked; `None` for an order that does not exist.
    pub async fn step_orders<DB>(
        pool: &crate::store::DbPool<DB>,
        orders: &[OrderId],
    ) -> StoreResult<Vec<Option<StepOrder>>>
    where
        DB: sqlx::Database,
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
        for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
        for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        StepOrderLine: for<'r> sqlx::FromRow<'r, DB::Row>,
    {
        let sql = if orders.len() == 1 {
            format!("{STEP_ORDER_SQL} WHERE o.id = $1 ORDER BY i.line_no")
        } else {
            let ids = crate::store::effects::placeholders(orders.len());
            format!("{STEP_ORDER_SQL} WHERE o.id IN ({ids}) ORDER BY o.id, i.line_no")
        };
        let mut query = sqlx::query_as::<DB, StepOrderLine>(&sql);
        for order in orders {
            query = query.bind(order.as_uuid());
        }
        let mut found: std::collections::HashMap<Uuid, (StepOrderRow, Vec<OrderItemRow>)> =
            std::collections::HashMap::with_capacity(orders.len());
        for line in query.fetch_all(pool).await? {
            match found.entry(line.order.order.id) {
                std::collections::hash_map::Entry::Occupied(mut entry) => entry.get_mut().1.push(line.item),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    entry.insert((line.order, vec![line.item]));
                }
            }
        }
        let found: std::collections::HashMap<Uuid, StepOrder> = found
            .into_iter()
            .map(|(id, (row, items))| row.into_step_order(&items).map(|order| (id, order)))
            .collect::<StoreResult<_>>()?;
        // An order may be asked for twice (two steps of one order starting together).
        Ok(orders
            .iter()
            .map(|order| found.get(&order.as_uuid()).cloned())
            .collect())
    }

    const STEP_ORDER_SQL: &str = "SELECT o.id, o.customer_id, o.status, o.currency, o.total_minor, o.payment_token, \
         o.shipping, o.correlation_id, o.region, o.created_at, o.updated_at, c.email AS customer_email, \
         c.first_name AS customer_first_name, p.provider AS pay_provider, p.idempotency_key AS pay_idempotency_key, \
         p.state AS pay_state, p.provider_ref AS pay_provider_ref, p.amount_minor AS pay_amount_minor, \
         p.captured_minor AS pay_captured_minor, p.refunded_minor AS pay_refunded_minor, p.currency AS pay_currency, \
         p.detail AS pay_detail, p.client_secret AS pay_client_secret, p.updated_at AS pay_updated_at, \
         i.order_id, i.product_id, i.quantity, i.unit_price_minor \
         FROM orders o JOIN order_items i ON i.order_id = o.id LEFT JOIN customers c ON c.id = o.customer_id \
         LEFT JOIN payments p ON p.order_id = o.id";

    /// A row of [`STEP_ORDER_SQL`]: the order, its customer and payment, and one of its lines.
    #[derive(sqlx::FromRow)]
    pub struct StepOrderLine {
        #[sqlx(flatten)]
        order: StepOrderRow,
        #[sqlx(flatten)]
        item: OrderItemRow,
    }

    /// The order's columns, then its customer's and its payment's (NULL when there is none).
    #[derive(sqlx::FromRow)]
    pub struct StepOrderRow {
        #[sqlx(flatten)]
        order: OrderRow,
        customer_email: Option<String>,
        customer_first_name: Option<String>,
        pay_provider: Option<String>,
        pay_idempotency_key: Option<String>,
        pay_state: Option<String>,
        pay_provider_ref: Option<String>,
        pay_amount_minor: Option<i64>,
        pay_captured_minor: Option<i64>,
        pay_refunded_minor: Option<i64>,
        pay_currency: Option<String>,
        pay_detail: Option<String>,
        pay_client_secret: Option<String>,
        pay_updated_at: Option<DateTime<Utc>>,
    }

    impl StepOrderRow {
        fn into_step_order(self, items: &[OrderItemRow]) -> StoreResult<StepOrder> {
            let payment = match (self.pay_provider, self.pay_state, self.pay_updated_at) {
                (Some(provider), Some(state), Some(updated_at)) => Some(PaymentRecord {
                    provider,
                    idempotency_key: self.pay_idempotency_key.unwrap_or_default(),
                    state,
                    provider_ref: self.pay_provider_ref,
                    amount_minor: self.pay_amount_minor.unwrap_or_default(),
                    captured_minor: self.pay_captured_minor.unwrap_or_default(),
                    refunded_minor: self.pay_refunded_minor.unwrap_or_default(),
                    currency: self.pay_currency.unwrap_or_default(),
                    detail: self.pay_detail,
                    client_secret: self.pay_client_secret,
                    updated_at,
                }),
                _ => None,
            };
            Ok(StepOrder {
                order: self.order.into_order(items)?,
                recipient: self.customer_email.zip(self.customer_first_name),
                payment,
            })
        }
    }

    pub async fn notifications<DB>(
        pool: &crate::store::DbPool<DB>,
        order: OrderId,
    ) -> StoreResult<Vec<NotificationRecord>>
    where
        DB: sqlx::Database,
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
        for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
        for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        NotificationRecord: for<'r> sqlx::FromRow<'r, DB::Row>,
    {
        Ok(sqlx::query_as(NOTIFICATIONS_SQL)
            .bind(order.as_uuid())
            .fetch_all(pool)
            .await?)
    }

    pub async fn expired_orders<DB>(
        pool: &crate::store::DbPool<DB>,
        before: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<OrderId>>
    where
        DB: sqlx::Database,
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
        for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
        for<'q> DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'r> (Uuid,): sqlx::FromRow<'r, DB::Row>,
    {
        let rows: Vec<(Uuid,)> = sqlx::query_as(EXPIRED_SQL)
            .bind(before)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?;
        Ok(rows.into_iter().map(|(id,)| OrderId::from_uuid(id)).collect())
    }
}

/// Rows of a listing (up to `limit + 1`) as a page.
pub fn jobs_page(rows: Vec<JobRow>, limit: u32) -> StoreResult<super::Page<JobRecord>> {
    let jobs = rows
        .into_iter()
        .map(JobRow::into_record)
        .collect::<StoreResult<Vec<_>>>()?;
    Ok(super::Page::from_rows(jobs, limit, |job| job.job_id))
}

#[derive(sqlx::FromRow)]
pub struct ClaimedRow {
    id: Uuid,
    kind: String,
    order_id: Option<Uuid>,
    payload: String,
    attempts: i32,
    max_attempts: i32,
    lease_expiries: i32,
    correlation_id: Option<String>,
    /// 1 when the job's error history is not empty.
    failed_before: i32,
}

impl ClaimedRow {
    pub fn into_claimed(self, token: Uuid) -> StoreResult<ClaimedJob> {
        Ok(ClaimedJob {
            lease: JobLease { job_id: self.id, token },
            kind: self.kind,
            order_id: self.order_id.map(OrderId::from_uuid),
            payload: serde_json::from_str(&self.payload)
                .map_err(|e| StoreError::Corrupt(format!("jobs.payload: {e}")))?,
            attempt: self.attempts.max(0) as u32,
            max_attempts: self.max_attempts.max(0) as u32,
            lease_expiries: self.lease_expiries.max(0) as u32,
            failed_before: self.failed_before != 0,
            correlation_id: self.correlation_id,
        })
    }
}

#[derive(sqlx::FromRow)]
pub struct JobRow {
    id: Uuid,
    kind: String,
    order_id: Option<Uuid>,
    state: String,
    attempts: i32,
    max_attempts: i32,
    last_error: Option<String>,
    error_history: String,
    run_at: DateTime<Utc>,
    correlation_id: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl JobRow {
    pub fn into_record(self) -> StoreResult<JobRecord> {
        Ok(JobRecord {
            job_id: self.id,
            kind: self.kind,
            order_id: self.order_id,
            state: self.state,
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            last_error: self.last_error,
            errors: parse_history(&self.error_history)?,
            run_at: self.run_at,
            correlation_id: self.correlation_id,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub struct StatsRow {
    kind: String,
    ready: i64,
    running: i64,
    dead: i64,
    oldest_ready: Option<DateTime<Utc>>,
}

impl StatsRow {
    pub fn into_stats(self, now: DateTime<Utc>) -> QueueStats {
        QueueStats {
            kind: self.kind,
            ready: self.ready,
            running: self.running,
            dead: self.dead,
            oldest_ready_age_seconds: self
                .oldest_ready
                .map(|since| ((now - since).num_milliseconds().max(0) as f64) / 1000.0),
        }
    }
}

fn parse_history(history: &str) -> StoreResult<Vec<JobError>> {
    serde_json::from_str(history).map_err(|e| StoreError::Corrupt(format!("jobs.error_history: {e}")))
}

/// The row values a failed attempt leaves behind.
pub struct Failure {
    pub state: &'static str,
    pub run_at: DateTime<Utc>,
    pub history: String,
    pub outcome: FailOutcome,
}

/// [`JobStore::postpone_job`](super::jobs::JobStore::postpone_job): back to ready, the attempt
/// given back. Binds: run_at, error, now, job id, lease token.
pub(crate) const POSTPONE_SQL: &str = "UPDATE jobs SET state = 'ready', run_at = $1, attempts = attempts - 1, \
     last_error = $2, lease_token = NULL, lease_expires_at = NULL, updated_at = $3 \
     WHERE id = $4 AND lease_token = $5 AND state = 'running' RETURNING id";

/// Appends the error to the history and decides between retry and dead-letter.
pub fn record_failure(
    attempts: i32,
    max_attempts: i32,
    history: &str,
    error: &str,
    retry_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Failure {
    let mut entries = parse_history(history).unwrap_or_default();
    entries.push(JobError {
        attempt: attempts.max(0) as u32,
        error: error.to_string(),
        at: now,
    });
    let history = serde_json::to_string(&entries).expect("history serializes");
    match retry_at {
        Some(at) if attempts < max_attempts => Failure {
            state: "ready",
            run_at: at,
            history,
            outcome: FailOutcome::Retrying,
        },
        _ => Failure {
            state: "dead",
            run_at: now,
            history,
            outcome: FailOutcome::Dead,
        },
    }
}

/// The status an order ends in; refuses moves the state machine does not allow.
pub fn next_status(current: OrderStatus, requested: Option<OrderStatus>) -> StoreResult<OrderStatus> {
    match requested {
        None => Ok(current),
        Some(next) if next == current => Ok(current),
        Some(next) if current.can_become(next) => Ok(next),
        Some(next) => Err(StoreError::Corrupt(format!(
            "illegal order transition {current} → {next}"
        ))),
    }
}

/// How each line's stock moves for an inventory action.
pub struct InventoryPlan {
    /// Multiplier of the line quantity added to on_hand (and written to the ledger).
    pub on_hand_sign: i64,
    /// Multiplier of the line quantity added to reserved.
    pub reserved_sign: i64,
    pub ledger_kind: Option<&'static str>,
    pub next_state: &'static str,
}

/// `None` when there is nothing to do (the action already happened).
pub fn inventory_plan(state: &str, action: InventoryAction) -> StoreResult<Option<InventoryPlan>> {
    let plan = |on_hand_sign, reserved_sign, ledger_kind, next_state| {
        Ok(Some(InventoryPlan {
            on_hand_sign,
            reserved_sign,
            ledger_kind,
            next_state,
        }))
    };
    match (state, action) {
        ("reserved", InventoryAction::Commit) => plan(-1, -1, Some("sale"), "committed"),
        ("reserved", InventoryAction::Release) => plan(0, -1, None, "released"),
        ("committed", InventoryAction::Release) => plan(1, 0, Some("return"), "released"),
        ("committed", InventoryAction::Commit) | ("released", InventoryAction::Release) => Ok(None),
        (state, action) => Err(StoreError::Corrupt(format!(
            "cannot {action:?} stock of an order whose stock is {state}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_retry_until_out_of_attempts() {
        let now = Utc::now();
        let later = now + chrono::Duration::seconds(5);
        let first = record_failure(1, 3, "[]", "boom", Some(later), now);
        assert_eq!(
            (first.state, first.outcome, first.run_at),
            ("ready", FailOutcome::Retrying, later)
        );
        let last = record_failure(3, 3, &first.history, "boom again", Some(later), now);
        assert_eq!((last.state, last.outcome), ("dead", FailOutcome::Dead));
        let history = parse_history(&last.history).unwrap();
        assert_eq!(history.iter().map(|e| e.attempt).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(
            record_failure(1, 3, "[]", "fatal", None, now).outcome,
            FailOutcome::Dead
        );
    }

    #[test]
    fn stock_moves_once() {
        assert!(inventory_plan("committed", InventoryAction::Commit).unwrap().is_none());
        assert!(inventory_plan("released", InventoryAction::Release).unwrap().is_none());
        assert!(inventory_plan("released", InventoryAction::Commit).is_err());
        let give_back = inventory_plan("committed", InventoryAction::Release).unwrap().unwrap();
        assert_eq!((give_back.on_hand_sign, give_back.ledger_kind), (1, Some("return")));
    }

    #[test]
    fn illegal_moves_are_refused() {
        assert!(next_status(OrderStatus::Fulfilled, Some(OrderStatus::Cancelled)).is_err());
        assert_eq!(
            next_status(OrderStatus::Paid, Some(OrderStatus::Fulfilled)).unwrap(),
            OrderStatus::Fulfilled
        );
    }
}
