//! The sandbox payment provider's own books. They live in the same database file or server for
//! convenience, but are written in their own transactions, never inside the shop's: to the shop
//! they are a remote provider's ledger. The SQL is shared by both backends (numbered parameters in
//! first-use order work in both dialects), and [`impl_sandbox_books`] implements the trait on each.

use async_trait::async_trait;
use serde::Serialize;

use super::StoreResult;

/// A charge as the sandbox recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct SandboxCharge {
    pub id: String,
    pub idempotency_key: String,
    pub amount_minor: i64,
    pub state: String,
    /// How many calls carried this charge's idempotency key.
    pub calls: i32,
}

/// The result of a charge call: the charge, and whether this call created it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedCharge {
    pub id: String,
    pub first_call: bool,
}

#[async_trait]
pub trait SandboxBooks: Send + Sync {
    /// Counts a call with this idempotency key; returns how many there have been.
    async fn count_call(&self, idempotency_key: &str) -> StoreResult<i64>;
    /// Records a charge once per idempotency key; later calls return the same charge.
    async fn record_charge(
        &self,
        idempotency_key: &str,
        token: &str,
        amount_minor: i64,
        currency: &str,
        reference: &str,
    ) -> StoreResult<RecordedCharge>;
    /// Refunds a charge once per idempotency key; `None` when the charge does not exist.
    async fn record_refund(
        &self,
        idempotency_key: &str,
        charge_id: &str,
        amount_minor: i64,
    ) -> StoreResult<Option<String>>;
    /// The charges made for a shop reference (an order id).
    async fn charges_for(&self, reference: &str) -> StoreResult<Vec<SandboxCharge>>;
}

pub(super) const COUNT_CALL: &str = "INSERT INTO sandbox_attempts (idempotency_key, calls) VALUES ($1, 1) \
     ON CONFLICT (idempotency_key) DO UPDATE SET calls = sandbox_attempts.calls + 1 RETURNING CAST(calls AS BIGINT)";
pub(super) const RECORD_CHARGE: &str = "INSERT INTO sandbox_charges (id, idempotency_key, token, amount_minor, currency, \
     reference, state, calls, created_at) VALUES ($1, $2, $3, $4, $5, $6, 'succeeded', 1, $7) \
     ON CONFLICT (idempotency_key) DO UPDATE SET calls = sandbox_charges.calls + 1 RETURNING id, calls";
pub(super) const FIND_CHARGE: &str = "SELECT id FROM sandbox_charges WHERE id = $1";
pub(super) const RECORD_REFUND: &str = "INSERT INTO sandbox_refunds (id, idempotency_key, charge_id, amount_minor, created_at) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (idempotency_key) DO UPDATE SET charge_id = sandbox_refunds.charge_id \
     RETURNING id";
pub(super) const MARK_REFUNDED: &str = "UPDATE sandbox_charges SET state = 'refunded' WHERE id = $1";
pub(super) const CHARGES_FOR: &str = "SELECT id, idempotency_key, amount_minor, state, calls FROM sandbox_charges WHERE reference = $1 ORDER BY created_at";

/// Implements [`SandboxBooks`] for a store type whose `$writer` pool takes writes and `$reader`
/// pool takes reads.
macro_rules! impl_sandbox_books {
    ($store:ty, $writer:ident, $reader:ident) => {
        #[async_trait::async_trait]
        impl $crate::store::sandbox::SandboxBooks for $store {
            async fn count_call(&self, idempotency_key: &str) -> $crate::store::StoreResult<i64> {
                let (calls,): (i64,) = sqlx::query_as($crate::store::sandbox::COUNT_CALL)
                    .bind(idempotency_key)
                    .fetch_one(&self.$writer)
                    .await?;
                Ok(calls)
            }

            async fn record_charge(
                &self,
                idempotency_key: &str,
                token: &str,
                amount_minor: i64,
                currency: &str,
                reference: &str,
            ) -> $crate::store::StoreResult<$crate::store::sandbox::RecordedCharge> {
                let (id, calls): (String, i32) = sqlx::query_as($crate::store::sandbox::RECORD_CHARGE)
                    .bind(format!("ch_{}", uuid::Uuid::now_v7().simple()))
                    .bind(idempotency_key)
                    .bind(token)
                    .bind(amount_minor)
                    .bind(currency)
                    .bind(reference)
                    .bind($crate::clock::now())
                    .fetch_one(&self.$writer)
                    .await?;
                Ok($crate::store::sandbox::RecordedCharge {
                    id,
                    first_call: calls == 1,
                })
            }

            async fn record_refund(
                &self,
                idempotency_key: &str,
                charge_id: &str,
                amount_minor: i64,
            ) -> $crate::store::StoreResult<Option<String>> {
                let mut tx = self.$writer.begin().await?;
                let charge: Option<(String,)> = sqlx::query_as($crate::store::sandbox::FIND_CHARGE)
                    .bind(charge_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                if charge.is_none() {
                    return Ok(None);
                }
                let (id,): (String,) = sqlx::query_as($crate::store::sandbox::RECORD_REFUND)
                    .bind(format!("re_{}", uuid::Uuid::now_v7().simple()))
                    .bind(idempotency_key)
                    .bind(charge_id)
                    .bind(amount_minor)
                    .bind($crate::clock::now())
                    .fetch_one(&mut *tx)
                    .await?;
                sqlx::query($crate::store::sandbox::MARK_REFUNDED)
                    .bind(charge_id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Some(id))
            }

            async fn charges_for(
                &self,
                reference: &str,
            ) -> $crate::store::StoreResult<Vec<$crate::store::sandbox::SandboxCharge>> {
                Ok(sqlx::query_as($crate::store::sandbox::CHARGES_FOR)
                    .bind(reference)
                    .fetch_all(&self.$reader)
                    .await?)
            }
        }
    };
}
pub(super) use impl_sandbox_books;
