//! What operators watch, read from the database so every process (API or worker) reports the same
//! numbers: stuck orders, recent step outcomes, connection pools, and the alarms' recorded states.
//!
//! An alarm's state is one row of `alarm_state`. A transition is a conditional `UPDATE … WHERE
//! firing <> $new`, so when several processes evaluate the same condition at once exactly one of
//! them changes the row — and only that one enqueues the alert deliveries, in the same transaction.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::{NewJob, StoreResult};

/// Open orders that have waited too long in one status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StuckOrders {
    /// `pending_payment` orders placed before the unpaid limit.
    pub unpaid: i64,
    /// `paid` orders whose status has not moved since before the unfulfilled limit.
    pub unfulfilled: i64,
}

/// Per step kind: the jobs whose latest attempt ended inside a window, by how it ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StepOutcomes {
    pub kind: String,
    pub succeeded: i64,
    /// Waiting for a retry or dead-lettered after a failure.
    pub failing: i64,
}

/// One connection pool of this process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PoolStats {
    /// `main` (PostgreSQL), or `writer` / `reader` (SQLite).
    pub pool: &'static str,
    pub size: u32,
    pub idle: u32,
    pub max: u32,
}

/// An alarm's recorded state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AlarmRecord {
    /// `name` or `name:step`, e.g. `oldest_job_age:charge_payment`.
    pub alarm: String,
    pub firing: bool,
    /// What the evaluator saw at the transition (JSON text).
    pub detail: Option<String>,
    pub changed_at: DateTime<Utc>,
}

/// A change of an alarm's state, with the alert deliveries it causes.
#[derive(Clone, Debug)]
pub struct AlarmTransition {
    pub alarm: String,
    pub firing: bool,
    pub detail: String,
    pub at: DateTime<Utc>,
    /// Written only if this call makes the transition.
    pub deliveries: Vec<NewJob>,
}

/// The operational reads and the alarm bookkeeping.
#[async_trait]
pub trait OpsStore: Send + Sync {
    async fn stuck_orders(
        &self,
        unpaid_before: DateTime<Utc>,
        unfulfilled_before: DateTime<Utc>,
    ) -> StoreResult<StuckOrders>;
    /// Outcomes of jobs whose latest attempt ended at or after `since`.
    async fn step_outcomes(&self, since: DateTime<Utc>) -> StoreResult<Vec<StepOutcomes>>;
    /// This process's connection pools.
    fn pool_stats(&self) -> Vec<PoolStats>;
    async fn alarm_states(&self) -> StoreResult<Vec<AlarmRecord>>;
    /// Records the transition unless the alarm is already in that state (an alarm never seen is
    /// not firing). True when this call changed it (and enqueued its deliveries).
    async fn transition_alarm(&self, transition: &AlarmTransition) -> StoreResult<bool>;
}

const STUCK_SQL: &str = "SELECT \
     CAST(sum(CASE WHEN status = 'pending_payment' AND created_at < $1 THEN 1 ELSE 0 END) AS BIGINT), \
     CAST(sum(CASE WHEN status = 'paid' AND updated_at < $2 THEN 1 ELSE 0 END) AS BIGINT) \
     FROM orders WHERE status IN ('pending_payment', 'paid')";

const OUTCOMES_SQL: &str = "SELECT kind, \
     CAST(sum(CASE WHEN state = 'succeeded' THEN 1 ELSE 0 END) AS BIGINT) AS succeeded, \
     CAST(sum(CASE WHEN state IN ('ready', 'dead') AND last_error IS NOT NULL THEN 1 ELSE 0 END) AS BIGINT) AS failing \
     FROM jobs WHERE updated_at >= $1 AND state <> 'running' GROUP BY kind ORDER BY kind";

const ALARMS_SQL: &str = "SELECT alarm, firing, detail, changed_at FROM alarm_state ORDER BY alarm";

/// The reads, the same SQL on both backends.
pub(super) mod reads {
    use super::*;

    pub async fn stuck_orders<DB>(
        pool: &crate::store::DbPool<DB>,
        unpaid_before: DateTime<Utc>,
        unfulfilled_before: DateTime<Utc>,
    ) -> StoreResult<StuckOrders>
    where
        DB: sqlx::Database,
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
        for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
        for<'q> DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'r> (Option<i64>, Option<i64>): sqlx::FromRow<'r, DB::Row>,
    {
        let (unpaid, unfulfilled): (Option<i64>, Option<i64>) = sqlx::query_as(STUCK_SQL)
            .bind(unpaid_before)
            .bind(unfulfilled_before)
            .fetch_one(pool)
            .await?;
        Ok(StuckOrders {
            unpaid: unpaid.unwrap_or(0),
            unfulfilled: unfulfilled.unwrap_or(0),
        })
    }

    pub async fn step_outcomes<DB>(
        pool: &crate::store::DbPool<DB>,
        since: DateTime<Utc>,
    ) -> StoreResult<Vec<StepOutcomes>>
    where
        DB: sqlx::Database,
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
        for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
        for<'q> DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'r> (String, i64, i64): sqlx::FromRow<'r, DB::Row>,
    {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(OUTCOMES_SQL).bind(since).fetch_all(pool).await?;
        Ok(rows
            .into_iter()
            .map(|(kind, succeeded, failing)| StepOutcomes {
                kind,
                succeeded,
                failing,
            })
            .collect())
    }

    pub async fn alarm_states<DB>(pool: &crate::store::DbPool<DB>) -> StoreResult<Vec<AlarmRecord>>
    where
        DB: sqlx::Database,
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
        for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
        for<'r> (String, bool, Option<String>, DateTime<Utc>): sqlx::FromRow<'r, DB::Row>,
    {
        let rows: Vec<(String, bool, Option<String>, DateTime<Utc>)> =
            sqlx::query_as(ALARMS_SQL).fetch_all(pool).await?;
        Ok(rows
            .into_iter()
            .map(|(alarm, firing, detail, changed_at)| AlarmRecord {
                alarm,
                firing,
                detail,
                changed_at,
            })
            .collect())
    }
}

/// Makes the transition in `tx` (the caller commits). True when the row changed.
pub(super) async fn transition<DB>(
    tx: &mut sqlx::Transaction<'_, DB>,
    transition: &AlarmTransition,
) -> StoreResult<bool>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> bool: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i32: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'r> (String,): sqlx::FromRow<'r, DB::Row>,
{
    sqlx::query("INSERT INTO alarm_state (alarm, firing, detail, changed_at) VALUES ($1, $2, NULL, $3) ON CONFLICT (alarm) DO NOTHING")
        .bind(transition.alarm.clone())
        .bind(false)
        .bind(transition.at)
        .execute(&mut **tx)
        .await?;
    let changed: Option<(String,)> = sqlx::query_as(
        "UPDATE alarm_state SET firing = $1, detail = $2, changed_at = $3 WHERE alarm = $4 AND firing <> $1 \
         RETURNING alarm",
    )
    .bind(transition.firing)
    .bind(transition.detail.clone())
    .bind(transition.at)
    .bind(transition.alarm.clone())
    .fetch_optional(&mut **tx)
    .await?;
    let changed = changed.is_some();
    if changed {
        for job in &transition.deliveries {
            sqlx::query(
                "INSERT INTO jobs (id, kind, order_id, payload, state, attempts, max_attempts, run_at, ready_since, \
                 correlation_id, created_at, updated_at) VALUES ($1, $2, NULL, $3, 'ready', 0, $4, $5, $5, NULL, $6, $6)",
            )
            .bind(Uuid::now_v7())
            .bind(job.kind.to_string())
            .bind(job.payload.to_string())
            .bind(job.max_attempts as i32)
            .bind(job.run_at)
            .bind(transition.at)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(changed)
}

/// A pool's numbers.
pub(super) fn pool_stats<DB: sqlx::Database>(name: &'static str, pool: &sqlx::Pool<DB>) -> PoolStats {
    PoolStats {
        pool: name,
        size: pool.size(),
        idle: pool.num_idle() as u32,
        max: pool.options().get_max_connections(),
    }
}
