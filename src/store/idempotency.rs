//! Forgetting checkout idempotency keys past their retention, one bounded batch at a time.
//!
//! A key lives in two places: its record in `idempotency_keys` (fingerprint and response
//! snapshot: what a retry is answered from, and the bulk of the storage) and the key column of
//! the order it made, under `UNIQUE (idempotency_principal, idempotency_key)` — the database's own
//! hold on I3. Both go in ONE transaction. A record deleted alone would let a late retry claim the
//! key again and then collide with the order's unique key; a key cleared alone would leave a
//! record replaying an order no longer tied to it. The order keeps every other column (it is
//! never deleted), and its cleared key is NULL, which the unique constraint treats as distinct
//! from everything: so the same key may make a new order once forgotten, and no two orders share
//! a remembered one.
//!
//! Written once for both dialects: the statements are the same SQL; only how a write transaction
//! begins differs (SQLite: `BEGIN IMMEDIATE`, to take the write lock at once).

use chrono::{DateTime, Utc};

use super::StoreResult;
use super::events::tuples;

/// The most keys one call forgets (two bound parameters each in one statement; a transaction
/// within the distributed-SQL profile's 3,000 changed rows).
pub const MAX_BATCH: u32 = 1000;

/// Forgets up to `batch` keys whose record was last written before `before`, oldest first:
/// deletes the records and clears the keys on their orders, atomically. Returns how many were
/// forgotten (0: none is that old).
pub(super) async fn forget_keys<DB>(
    pool: &crate::store::DbPool<DB>,
    begin: &'static str,
    before: DateTime<Utc>,
    batch: u32,
) -> StoreResult<u64>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let mut tx = pool.begin_with(begin).await?;
    // `updated_at < $1` is checked again on the deleted row itself: a record touched since the
    // subquery chose it (a stale claim taken over) is not forgotten.
    let forgotten: Vec<(String, String)> = sqlx::query_as(
        "DELETE FROM idempotency_keys WHERE updated_at < $1 AND (principal, key) IN \
         (SELECT principal, key FROM idempotency_keys WHERE updated_at < $1 ORDER BY updated_at LIMIT $2) \
         RETURNING principal, key",
    )
    .bind(before)
    .bind(i64::from(batch.clamp(1, MAX_BATCH)))
    .fetch_all(&mut *tx)
    .await?;
    if !forgotten.is_empty() {
        // An in-flight claim (PostgreSQL) has no order: it matches nothing here. (`IN (SELECT …
        // FROM (VALUES …))` rather than `IN (VALUES …)`: SQLite uses the unique index only then.)
        let sql = format!(
            "UPDATE orders SET idempotency_key = NULL WHERE (idempotency_principal, idempotency_key) IN \
             (SELECT * FROM (VALUES {}) AS forgotten)",
            tuples(1, 2, forgotten.len())
        );
        let mut clear = sqlx::query::<DB>(&sql);
        for (principal, key) in &forgotten {
            clear = clear.bind(principal.clone()).bind(key.clone());
        }
        clear.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(forgotten.len() as u64)
}
