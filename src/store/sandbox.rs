//! The sandbox payment provider's own books. They live in the same database file or server for
//! convenience, but are written in their own transactions, never inside the shop's: to the shop
//! they are a remote provider's ledger. The SQL is shared by both backends (numbered parameters in
//! first-use order work in both dialects), and [`impl_sandbox_books`] implements the trait on each.
//! Each write is one transaction, retried whole when it lost a race (`store::retry`).

use async_trait::async_trait;
use serde::Serialize;

use super::StoreResult;

/// A PaymentIntent as the sandbox recorded it (Stripe's model: see
/// `adapters::payment::intents`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct SandboxIntent {
    pub id: String,
    pub idempotency_key: String,
    pub payment_method: String,
    pub amount_minor: i64,
    pub currency: String,
    pub order_id: Option<String>,
    /// `manual` or `automatic`.
    pub capture_method: String,
    /// `requires_action`, `requires_capture`, `succeeded`, `canceled`, `requires_payment_method`.
    pub status: String,
    pub captured_minor: i64,
    pub refunded_minor: i64,
    pub decline_code: Option<String>,
    pub client_secret: Option<String>,
    /// How many create calls carried this intent's idempotency key.
    pub calls: i32,
}

/// A new intent, created once per idempotency key.
#[derive(Clone, Debug)]
pub struct NewSandboxIntent {
    pub idempotency_key: String,
    pub payment_method: String,
    pub amount_minor: i64,
    pub currency: String,
    pub order_id: Option<String>,
    pub capture_method: &'static str,
    /// Its status once confirmed (decided by the payment method).
    pub status: &'static str,
    pub decline_code: Option<String>,
}

/// A refund of a PaymentIntent as the sandbox recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct SandboxIntentRefund {
    pub id: String,
    pub idempotency_key: String,
    pub intent_id: String,
    pub amount_minor: i64,
    pub reason: Option<String>,
}

/// What a refund call did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SandboxRefundOutcome {
    /// Refunded (or found: the same key was used before): the refund's id and amount.
    Refunded {
        id: String,
        amount_minor: i64,
    },
    NoSuchIntent,
    /// The intent holds no captured money to refund.
    NotCaptured,
    /// More than what is left to refund (captured − refunded).
    Exceeds {
        refundable_minor: i64,
    },
}

#[async_trait]
pub trait SandboxBooks: Send + Sync {
    /// Counts a call with this idempotency key; returns how many there have been.
    async fn count_call(&self, idempotency_key: &str) -> StoreResult<i64>;
    /// Creates the intent once per idempotency key; later calls count and return the first one.
    /// The `bool` is true for the call that created it.
    async fn create_intent(&self, intent: &NewSandboxIntent) -> StoreResult<(SandboxIntent, bool)>;
    async fn intent(&self, id: &str) -> StoreResult<Option<SandboxIntent>>;
    /// Moves an intent from `from` to `to` (one conditional write), setting `captured_minor` when
    /// given. Returns the intent as it is afterwards (unchanged when it was not in `from`).
    async fn transition_intent(
        &self,
        id: &str,
        from: &str,
        to: &str,
        captured_minor: Option<i64>,
    ) -> StoreResult<Option<SandboxIntent>>;
    /// Ends a `requires_action` intent's 3-D Secure authentication (one conditional write): moves
    /// it to `to` with `captured_minor`, and `decline_code` as its last error when the
    /// authentication failed. `Some(intent as it is now)` when this call moved it; `None` when
    /// it does not exist or no longer `requires_action`.
    async fn authenticate_intent(
        &self,
        id: &str,
        to: &str,
        captured_minor: i64,
        decline_code: Option<&str>,
    ) -> StoreResult<Option<SandboxIntent>>;
    /// Refunds part of an intent's captured money, once per idempotency key.
    async fn refund_intent(
        &self,
        idempotency_key: &str,
        intent_id: &str,
        amount_minor: i64,
        reason: Option<&str>,
    ) -> StoreResult<SandboxRefundOutcome>;
    /// Intents in creation order after `after` (an intent id), at most `limit`.
    async fn intents(&self, after: Option<&str>, limit: u32) -> StoreResult<Vec<SandboxIntent>>;
    /// The intents made for an order (`metadata[order_id]`), oldest first.
    async fn intents_for(&self, order_id: &str) -> StoreResult<Vec<SandboxIntent>>;
    /// The refunds of an intent, oldest first.
    async fn intent_refunds(&self, intent_id: &str) -> StoreResult<Vec<SandboxIntentRefund>>;
}

pub(super) const INTENT_COLUMNS: &str = "id, idempotency_key, payment_method, amount_minor, currency, order_id, \
     capture_method, status, captured_minor, refunded_minor, decline_code, client_secret, calls";
pub(super) const CREATE_INTENT: &str = "INSERT INTO sandbox_intents (id, idempotency_key, payment_method, amount_minor, \
     currency, order_id, capture_method, status, captured_minor, decline_code, client_secret, calls, created_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 1, $12, $12) \
     ON CONFLICT (idempotency_key) DO UPDATE SET calls = sandbox_intents.calls + 1 RETURNING ";
pub(super) const TRANSITION_INTENT: &str = "UPDATE sandbox_intents SET status = $1, \
     captured_minor = coalesce($2, captured_minor), updated_at = $3 WHERE id = $4 AND status = $5 RETURNING ";
pub(super) const AUTHENTICATE_INTENT: &str = "UPDATE sandbox_intents SET status = $1, captured_minor = $2, \
     decline_code = $3, updated_at = $4 WHERE id = $5 AND status = 'requires_action'";
pub(super) const FIND_INTENT_REFUND: &str =
    "SELECT id, amount_minor FROM sandbox_intent_refunds WHERE idempotency_key = $1";
pub(super) const TAKE_REFUND: &str = "UPDATE sandbox_intents SET refunded_minor = refunded_minor + $1, updated_at = $2 \
     WHERE id = $3 AND status = 'succeeded' AND refunded_minor + $1 <= captured_minor";
pub(super) const INTENT_REFUNDS: &str = "SELECT id, idempotency_key, intent_id, amount_minor, reason \
     FROM sandbox_intent_refunds WHERE intent_id = $1 ORDER BY id";
pub(super) const RECORD_INTENT_REFUND: &str = "INSERT INTO sandbox_intent_refunds (id, idempotency_key, intent_id, \
     amount_minor, reason, created_at) VALUES ($1, $2, $3, $4, $5, $6)";

pub(super) const COUNT_CALL: &str = "INSERT INTO sandbox_attempts (idempotency_key, calls) VALUES ($1, 1) \
     ON CONFLICT (idempotency_key) DO UPDATE SET calls = sandbox_attempts.calls + 1 RETURNING CAST(calls AS BIGINT)";

/// Implements [`SandboxBooks`] for a store type whose `$writer` pool takes writes and `$reader`
/// pool takes reads.
///
/// A write with `RETURNING` outside a transaction is read with `fetch_all`, never `fetch_one` or
/// `fetch_optional`: on SQLite its autocommit happens when the statement finishes, and sqlx stops
/// those after the first row and resets the statement, dropping the reset's error — on a full
/// disk the provider answered "captured" for a capture it never booked (seen in
/// tests/disk_full.rs; pinned by tests/sandbox_stripe.rs
/// `a_capture_whose_commit_fails_is_not_answered_as_captured`).
macro_rules! impl_sandbox_books {
    ($store:ty, $writer:ident, $reader:ident) => {
        #[async_trait::async_trait]
        impl $crate::store::sandbox::SandboxBooks for $store {
            async fn count_call(&self, idempotency_key: &str) -> $crate::store::StoreResult<i64> {
                $crate::store::retry::transaction(|| async {
                    let counted: Vec<(i64,)> = sqlx::query_as($crate::store::sandbox::COUNT_CALL)
                        .bind(idempotency_key)
                        .fetch_all(&self.$writer)
                        .await?;
                    let (calls,) = counted.into_iter().next().ok_or(sqlx::Error::RowNotFound)?;
                    Ok(calls)
                })
                .await
            }

            async fn create_intent(
                &self,
                intent: &$crate::store::sandbox::NewSandboxIntent,
            ) -> $crate::store::StoreResult<($crate::store::sandbox::SandboxIntent, bool)> {
                let now = $crate::clock::now();
                let id = format!("pi_{}", uuid::Uuid::now_v7().simple());
                let captured = if intent.status == "succeeded" {
                    intent.amount_minor
                } else {
                    0
                };
                let secret = (intent.status == "requires_action")
                    .then(|| format!("{id}_secret_{}", uuid::Uuid::now_v7().simple()));
                // The intent as stored (new, or the first call's with its count), in the same
                // statement.
                let found: $crate::store::sandbox::SandboxIntent = $crate::store::retry::transaction(|| async {
                    let stored: Vec<$crate::store::sandbox::SandboxIntent> = sqlx::query_as(&format!(
                        "{}{}",
                        $crate::store::sandbox::CREATE_INTENT,
                        $crate::store::sandbox::INTENT_COLUMNS
                    ))
                    .bind(&id)
                    .bind(&intent.idempotency_key)
                    .bind(&intent.payment_method)
                    .bind(intent.amount_minor)
                    .bind(&intent.currency)
                    .bind(&intent.order_id)
                    .bind(intent.capture_method)
                    .bind(intent.status)
                    .bind(captured)
                    .bind(&intent.decline_code)
                    .bind(&secret)
                    .bind(now)
                    .fetch_all(&self.$writer)
                    .await?;
                    Ok(stored.into_iter().next().ok_or(sqlx::Error::RowNotFound)?)
                })
                .await?;
                let first = found.calls == 1;
                Ok((found, first))
            }

            async fn intent(
                &self,
                id: &str,
            ) -> $crate::store::StoreResult<Option<$crate::store::sandbox::SandboxIntent>> {
                Ok(sqlx::query_as(&format!(
                    "SELECT {} FROM sandbox_intents WHERE id = $1",
                    $crate::store::sandbox::INTENT_COLUMNS
                ))
                .bind(id)
                .fetch_optional(&self.$writer)
                .await?)
            }

            async fn transition_intent(
                &self,
                id: &str,
                from: &str,
                to: &str,
                captured_minor: Option<i64>,
            ) -> $crate::store::StoreResult<Option<$crate::store::sandbox::SandboxIntent>> {
                let moved: Option<$crate::store::sandbox::SandboxIntent> =
                    $crate::store::retry::transaction(|| async {
                        let moved: Vec<$crate::store::sandbox::SandboxIntent> = sqlx::query_as(&format!(
                            "{}{}",
                            $crate::store::sandbox::TRANSITION_INTENT,
                            $crate::store::sandbox::INTENT_COLUMNS
                        ))
                        .bind(to)
                        .bind(captured_minor)
                        .bind($crate::clock::now())
                        .bind(id)
                        .bind(from)
                        .fetch_all(&self.$writer)
                        .await?;
                        Ok(moved.into_iter().next())
                    })
                    .await?;
                match moved {
                    Some(intent) => Ok(Some(intent)),
                    // Not in `from` (or unknown): as it is.
                    None => self.intent(id).await,
                }
            }

            async fn authenticate_intent(
                &self,
                id: &str,
                to: &str,
                captured_minor: i64,
                decline_code: Option<&str>,
            ) -> $crate::store::StoreResult<Option<$crate::store::sandbox::SandboxIntent>> {
                let moved = $crate::store::retry::transaction(|| async {
                    Ok(sqlx::query($crate::store::sandbox::AUTHENTICATE_INTENT)
                        .bind(to)
                        .bind(captured_minor)
                        .bind(decline_code)
                        .bind($crate::clock::now())
                        .bind(id)
                        .execute(&self.$writer)
                        .await?
                        .rows_affected())
                })
                .await?;
                if moved != 1 {
                    return Ok(None);
                }
                self.intent(id).await
            }

            async fn refund_intent(
                &self,
                idempotency_key: &str,
                intent_id: &str,
                amount_minor: i64,
                reason: Option<&str>,
            ) -> $crate::store::StoreResult<$crate::store::sandbox::SandboxRefundOutcome> {
                use $crate::store::sandbox::SandboxRefundOutcome;
                $crate::store::retry::transaction(|| async {
                    let mut tx = self.$writer.begin().await?;
                    let earlier: Option<(String, i64)> = sqlx::query_as($crate::store::sandbox::FIND_INTENT_REFUND)
                        .bind(idempotency_key)
                        .fetch_optional(&mut *tx)
                        .await?;
                    if let Some((id, amount_minor)) = earlier {
                        return Ok(SandboxRefundOutcome::Refunded { id, amount_minor });
                    }
                    let now = $crate::clock::now();
                    let taken = sqlx::query($crate::store::sandbox::TAKE_REFUND)
                        .bind(amount_minor)
                        .bind(now)
                        .bind(intent_id)
                        .execute(&mut *tx)
                        .await?;
                    if taken.rows_affected() != 1 {
                        drop(tx);
                        // A concurrent call with this key may have refunded while this one waited
                        // for the intent's row: its refund is the answer, as a retry would find it.
                        let earlier: Option<(String, i64)> = sqlx::query_as($crate::store::sandbox::FIND_INTENT_REFUND)
                            .bind(idempotency_key)
                            .fetch_optional(&self.$writer)
                            .await?;
                        if let Some((id, amount_minor)) = earlier {
                            return Ok(SandboxRefundOutcome::Refunded { id, amount_minor });
                        }
                        return Ok(match self.intent(intent_id).await? {
                            None => SandboxRefundOutcome::NoSuchIntent,
                            Some(intent) if intent.status != "succeeded" => SandboxRefundOutcome::NotCaptured,
                            Some(intent) => SandboxRefundOutcome::Exceeds {
                                refundable_minor: intent.captured_minor - intent.refunded_minor,
                            },
                        });
                    }
                    let id = format!("re_{}", uuid::Uuid::now_v7().simple());
                    sqlx::query($crate::store::sandbox::RECORD_INTENT_REFUND)
                        .bind(&id)
                        .bind(idempotency_key)
                        .bind(intent_id)
                        .bind(amount_minor)
                        .bind(reason)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    Ok(SandboxRefundOutcome::Refunded { id, amount_minor })
                })
                .await
            }

            async fn intents(
                &self,
                after: Option<&str>,
                limit: u32,
            ) -> $crate::store::StoreResult<Vec<$crate::store::sandbox::SandboxIntent>> {
                Ok(sqlx::query_as(&format!(
                    "SELECT {} FROM sandbox_intents WHERE ($1 IS NULL OR id > $1) ORDER BY id LIMIT $2",
                    $crate::store::sandbox::INTENT_COLUMNS
                ))
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(&self.$reader)
                .await?)
            }

            async fn intents_for(
                &self,
                order_id: &str,
            ) -> $crate::store::StoreResult<Vec<$crate::store::sandbox::SandboxIntent>> {
                Ok(sqlx::query_as(&format!(
                    "SELECT {} FROM sandbox_intents WHERE order_id = $1 ORDER BY id",
                    $crate::store::sandbox::INTENT_COLUMNS
                ))
                .bind(order_id)
                .fetch_all(&self.$reader)
                .await?)
            }

            async fn intent_refunds(
                &self,
                intent_id: &str,
            ) -> $crate::store::StoreResult<Vec<$crate::store::sandbox::SandboxIntentRefund>> {
                Ok(sqlx::query_as($crate::store::sandbox::INTENT_REFUNDS)
                    .bind(intent_id)
                    .fetch_all(&self.$reader)
                    .await?)
            }
        }
    };
}
pub(super) use impl_sandbox_books;
