//! The sales report's query, written once for both backends: only the expression that truncates
//! a time to its hour or day differs (PostgreSQL's `date_trunc`, SQLite's `strftime`), so each
//! backend passes its own [`PeriodSql`] and runs the query on its read pool (a PostgreSQL
//! replica when configured).
//!
//! Which orders count (docs/api.md "Sales report"): accepted in the period (`created_at`) and
//! paid — `paid`, `fulfilled` or `refunded` — in the store currency. Cancelled orders never were
//! sales (their money was voided or given back) and `pending_payment` ones are not yet. A
//! period's `refunded` is the refunds accepted for its orders (pending or settled), whenever they
//! were made, so `net` says what the period's orders brought in.

use chrono::{DateTime, Utc};

use super::StoreResult;
use crate::domain::Currency;
use crate::domain::report::{Granularity, SalesRange, SalesTotals};

/// A dialect's expression turning `o.created_at` into its period's start as RFC 3339 text
/// (`2026-12-01T10:00:00Z`).
pub(super) type PeriodSql = fn(Granularity) -> &'static str;

pub(super) fn postgres_period(granularity: Granularity) -> &'static str {
    match granularity {
        Granularity::Hour => {
            "to_char(date_trunc('hour', o.created_at AT TIME ZONE 'UTC'), 'YYYY-MM-DD\"T\"HH24\":00:00Z\"')"
        }
        Granularity::Day => "to_char(date_trunc('day', o.created_at AT TIME ZONE 'UTC'), 'YYYY-MM-DD\"T00:00:00Z\"')",
    }
}

pub(super) fn sqlite_period(granularity: Granularity) -> &'static str {
    match granularity {
        Granularity::Hour => "strftime('%Y-%m-%dT%H:00:00Z', o.created_at)",
        Granularity::Day => "strftime('%Y-%m-%dT00:00:00Z', o.created_at)",
    }
}

/// One period of the report: its start and what it adds up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SalesPeriod {
    pub start: DateTime<Utc>,
    pub totals: SalesTotals,
}

/// Every period of `range`, oldest first (zeros where nothing sold).
pub(super) async fn sales<DB>(
    pool: &crate::store::DbPool<DB>,
    period: PeriodSql,
    range: &SalesRange,
    currency: Currency,
) -> StoreResult<Vec<SalesPeriod>>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'r> (String, i64, i64, i64, i64): sqlx::FromRow<'r, DB::Row>,
{
    let sql = format!(
        "SELECT period, CAST(count(*) AS BIGINT), CAST(sum(units) AS BIGINT), CAST(sum(total_minor) AS BIGINT), \
            CAST(sum(refunded) AS BIGINT) \
         FROM (SELECT {period} AS period, o.total_minor, \
                 (SELECT coalesce(sum(i.quantity), 0) FROM order_items i WHERE i.order_id = o.id) AS units, \
                 (SELECT coalesce(sum(r.amount_minor), 0) FROM refunds r WHERE r.order_id = o.id) AS refunded \
               FROM orders o \
               WHERE o.created_at >= $1 AND o.created_at < $2 AND o.currency = $3 \
                 AND o.status IN ('paid', 'fulfilled', 'refunded')) AS sold \
         GROUP BY period ORDER BY period",
        period = period(range.granularity)
    );
    let rows: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(&sql)
        .bind(range.start)
        .bind(range.end)
        .bind(currency.code().to_string())
        .fetch_all(pool)
        .await?;
    let mut sold = std::collections::HashMap::with_capacity(rows.len());
    for (start, orders, units, gross_minor, refunded_minor) in rows {
        let start = DateTime::parse_from_rfc3339(&start)
            .map_err(|e| super::StoreError::Corrupt(format!("orders.created_at as a period ({start}): {e}")))?
            .with_timezone(&Utc);
        let totals = SalesTotals {
            orders,
            units,
            gross_minor,
            refunded_minor,
        };
        sold.insert(start, totals);
    }
    Ok(range
        .periods()
        .map(|start| SalesPeriod {
            start,
            totals: sold.get(&start).copied().unwrap_or_default(),
        })
        .collect())
}
