//! Shipments and refunds in the database — written once for both backends.
//!
//! The writes run inside [`effects::apply`](super::effects::apply), under the order's row lock
//! (PostgreSQL `FOR UPDATE`; SQLite's single writer), so the rules of
//! [`crate::domain::fulfilment`] are checked against what is committed: two warehouses racing
//! for the last unit, or two refunds for the last cent, cannot both win. Each request row keeps
//! its Idempotency-Key (unique per order) and a hash of its body, so a retry finds the first
//! answer and a reused key with another body is refused.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::jobs::{CompleteOutcome, RefundDraft, RefundSettlement, Refusal, ShipmentDraft};
use super::{StoreError, StoreResult};
use crate::domain::fulfilment::{self, ItemQuantity, Refund, RefundReason, RefundState, Shipment};
use crate::domain::{OrderId, OrderStatus, ProductId};

/// Reading an order's shipments and refunds back.
#[async_trait]
pub trait AfterSaleReads: Send + Sync {
    /// Oldest first.
    async fn shipments(&self, order: OrderId) -> StoreResult<Vec<Shipment>>;
    /// Oldest first.
    async fn refunds(&self, order: OrderId) -> StoreResult<Vec<Refund>>;
}

/// [`AfterSaleReads`] over one database's read pool.
pub struct AfterSaleSql<DB: sqlx::Database> {
    pub(super) read: crate::store::DbPool<DB>,
}

type ShipmentRow = (Uuid, String, String, Option<String>, DateTime<Utc>);
type RefundRow = (Uuid, i64, String, String, Option<String>, DateTime<Utc>, DateTime<Utc>);
type ItemRow = (Uuid, Uuid, i64);

fn items_of(owner: Uuid, rows: &[ItemRow]) -> StoreResult<Vec<ItemQuantity>> {
    rows.iter()
        .filter(|row| row.0 == owner)
        .map(|&(_, product, quantity)| {
            Ok(ItemQuantity {
                product_id: ProductId::from_uuid(product),
                quantity: u32::try_from(quantity).map_err(|_| StoreError::Corrupt("negative quantity".into()))?,
            })
        })
        .collect()
}

#[async_trait]
impl<DB> AfterSaleReads for AfterSaleSql<DB>
where
    DB: sqlx::Database,
    for<'c> &'c crate::store::DbPool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<String>: sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> DateTime<Utc>: sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    async fn shipments(&self, order: OrderId) -> StoreResult<Vec<Shipment>> {
        let rows: Vec<ShipmentRow> = sqlx::query_as(
            "SELECT id, carrier, tracking_number, tracking_url, created_at FROM shipments WHERE order_id = $1 \
             ORDER BY created_at, id",
        )
        .bind(order.as_uuid())
        .fetch_all(&self.read)
        .await?;
        let items: Vec<ItemRow> = sqlx::query_as(
            "SELECT i.shipment_id, i.product_id, CAST(i.quantity AS BIGINT) FROM shipment_items i \
             JOIN shipments s ON s.id = i.shipment_id WHERE s.order_id = $1 ORDER BY i.product_id",
        )
        .bind(order.as_uuid())
        .fetch_all(&self.read)
        .await?;
        rows.into_iter()
            .map(|(id, carrier, tracking_number, tracking_url, created_at)| {
                Ok(Shipment {
                    id,
                    carrier,
                    tracking_number,
                    tracking_url,
                    items: items_of(id, &items)?,
                    created_at,
                })
            })
            .collect()
    }

    async fn refunds(&self, order: OrderId) -> StoreResult<Vec<Refund>> {
        let rows: Vec<RefundRow> = sqlx::query_as(
            "SELECT id, amount_minor, reason, state, provider_ref, created_at, updated_at FROM refunds \
             WHERE order_id = $1 ORDER BY created_at, id",
        )
        .bind(order.as_uuid())
        .fetch_all(&self.read)
        .await?;
        let items: Vec<ItemRow> = sqlx::query_as(
            "SELECT i.refund_id, i.product_id, CAST(i.quantity AS BIGINT) FROM refund_items i \
             JOIN refunds r ON r.id = i.refund_id WHERE r.order_id = $1 ORDER BY i.product_id",
        )
        .bind(order.as_uuid())
        .fetch_all(&self.read)
        .await?;
        rows.into_iter()
            .map(
                |(id, amount_minor, reason, state, provider_ref, created_at, updated_at)| {
                    Ok(Refund {
                        id,
                        amount_minor,
                        reason: RefundReason::parse(&reason).map_err(StoreError::Corrupt)?,
                        state: RefundState::parse(&state).map_err(StoreError::Corrupt)?,
                        provider_ref,
                        restock: items_of(id, &items)?,
                        created_at,
                        updated_at,
                    })
                },
            )
            .collect()
    }
}

/// What settling a refund did.
pub(super) enum Settled {
    /// Another run settled it first: nothing to write but the job's completion.
    Already,
    /// The payment's refunded amount grew; `Some(Refunded)` when a fulfilled order is now
    /// refunded in full.
    Now(Option<OrderStatus>),
}

/// Per product, the quantities `sql` (a `product_id, CAST(sum(quantity) AS BIGINT)` grouped
/// query with the order id as `$1`) adds up.
async fn quantities<DB>(tx: &mut sqlx::Transaction<'_, DB>, sql: &str, order: Uuid) -> StoreResult<Vec<ItemQuantity>>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(sql).bind(order).fetch_all(&mut **tx).await?;
    rows.into_iter()
        .map(|(product, quantity)| {
            Ok(ItemQuantity {
                product_id: ProductId::from_uuid(product),
                quantity: u32::try_from(quantity).map_err(|_| StoreError::Corrupt("negative quantity".into()))?,
            })
        })
        .collect()
}

const ORDERED: &str =
    "SELECT product_id, CAST(quantity AS BIGINT) FROM order_items WHERE order_id = $1 ORDER BY product_id";
const SHIPPED: &str = "SELECT i.product_id, CAST(sum(i.quantity) AS BIGINT) FROM shipment_items i \
     JOIN shipments s ON s.id = i.shipment_id WHERE s.order_id = $1 GROUP BY i.product_id";
const RESTOCKED: &str = "SELECT i.product_id, CAST(sum(i.quantity) AS BIGINT) FROM refund_items i \
     JOIN refunds r ON r.id = i.refund_id WHERE r.order_id = $1 GROUP BY i.product_id";

/// The earlier request with this key on this order (`table`: shipments or refunds): replayed
/// (same body) or refused (another).
async fn earlier<DB>(
    tx: &mut sqlx::Transaction<'_, DB>,
    table: &str,
    order: Uuid,
    key: &str,
    request_hash: &str,
) -> StoreResult<Option<CompleteOutcome>>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let found: Option<(Uuid, String)> = sqlx::query_as(&format!(
        "SELECT id, request_hash FROM {table} WHERE order_id = $1 AND idempotency_key = $2"
    ))
    .bind(order)
    .bind(key.to_string())
    .fetch_optional(&mut **tx)
    .await?;
    Ok(found.map(|(id, hash)| {
        if hash == request_hash {
            CompleteOutcome::Replayed(id)
        } else {
            CompleteOutcome::Refused(Refusal::KeyReused)
        }
    }))
}

/// Records a shipment, or says why not (`Some`): a replay, a reused key, an order not ready,
/// or more units than are unshipped.
pub(super) async fn record_shipment<DB>(
    tx: &mut sqlx::Transaction<'_, DB>,
    order: Uuid,
    status: OrderStatus,
    inventory_state: &str,
    draft: &ShipmentDraft,
    now: DateTime<Utc>,
) -> StoreResult<Option<CompleteOutcome>>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<String>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    if let Some(outcome) = earlier(tx, "shipments", order, &draft.idempotency_key, &draft.request_hash).await? {
        return Ok(Some(outcome));
    }
    if status != OrderStatus::Paid || inventory_state != "committed" {
        return Ok(Some(CompleteOutcome::Refused(Refusal::NotReadyToShip(status))));
    }
    let left = fulfilment::remaining(
        quantities(tx, ORDERED, order).await?,
        quantities(tx, SHIPPED, order).await?,
    );
    if draft.items.is_empty() || left.values().all(|&units| units == 0) {
        return Ok(Some(CompleteOutcome::Refused(Refusal::NothingToShip)));
    }
    let excess = fulfilment::excess(&draft.items, &left);
    if !excess.is_empty() {
        return Ok(Some(CompleteOutcome::Refused(Refusal::ExceedsUnshipped(excess))));
    }
    sqlx::query(
        "INSERT INTO shipments (id, order_id, idempotency_key, request_hash, carrier, tracking_number, \
         tracking_url, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(draft.id)
    .bind(order)
    .bind(draft.idempotency_key.clone())
    .bind(draft.request_hash.clone())
    .bind(draft.carrier.clone())
    .bind(draft.tracking_number.clone())
    .bind(draft.tracking_url.clone())
    .bind(now)
    .execute(&mut **tx)
    .await?;
    for item in &draft.items {
        sqlx::query("INSERT INTO shipment_items (shipment_id, product_id, quantity) VALUES ($1, $2, $3)")
            .bind(draft.id)
            .bind(item.product_id.as_uuid())
            .bind(i64::from(item.quantity))
            .execute(&mut **tx)
            .await?;
    }
    Ok(None)
}

/// Accepts a refund (pending) and puts its returned units back on the shelf, or says why not.
pub(super) async fn record_refund<DB>(
    tx: &mut sqlx::Transaction<'_, DB>,
    order: Uuid,
    status: OrderStatus,
    draft: &RefundDraft,
    now: DateTime<Utc>,
) -> StoreResult<Option<CompleteOutcome>>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    if let Some(outcome) = earlier(tx, "refunds", order, &draft.idempotency_key, &draft.request_hash).await? {
        return Ok(Some(outcome));
    }
    if !matches!(status, OrderStatus::Fulfilled | OrderStatus::Refunded) {
        return Ok(Some(CompleteOutcome::Refused(Refusal::NotRefundable(status))));
    }
    let (captured, refunded): (i64, i64) =
        sqlx::query_as("SELECT captured_minor, refunded_minor FROM payments WHERE order_id = $1")
            .bind(order)
            .fetch_optional(&mut **tx)
            .await?
            .unwrap_or((0, 0));
    let (pending,): (i64,) = sqlx::query_as(
        "SELECT CAST(coalesce(sum(amount_minor), 0) AS BIGINT) FROM refunds WHERE order_id = $1 AND state = 'pending'",
    )
    .bind(order)
    .fetch_one(&mut **tx)
    .await?;
    let refundable = captured - refunded - pending;
    if draft.amount_minor <= 0 || draft.amount_minor > refundable {
        return Ok(Some(CompleteOutcome::Refused(Refusal::ExceedsRefundable {
            requested_minor: draft.amount_minor,
            refundable_minor: refundable.max(0),
        })));
    }
    let returnable = fulfilment::remaining(
        quantities(tx, ORDERED, order).await?,
        quantities(tx, RESTOCKED, order).await?,
    );
    let excess = fulfilment::excess(&draft.restock, &returnable);
    if !excess.is_empty() {
        return Ok(Some(CompleteOutcome::Refused(Refusal::ExceedsReturnable(excess))));
    }
    sqlx::query(
        "INSERT INTO refunds (id, order_id, idempotency_key, request_hash, amount_minor, reason, state, \
         created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $7)",
    )
    .bind(draft.id)
    .bind(order)
    .bind(draft.idempotency_key.clone())
    .bind(draft.request_hash.clone())
    .bind(draft.amount_minor)
    .bind(draft.reason.as_str().to_string())
    .bind(now)
    .execute(&mut **tx)
    .await?;
    let mut restock = draft.restock.clone();
    // Product rows in id order: the global lock order.
    restock.sort_by_key(|item| item.product_id);
    for item in &restock {
        let units = i64::from(item.quantity);
        sqlx::query("INSERT INTO refund_items (refund_id, product_id, quantity) VALUES ($1, $2, $3)")
            .bind(draft.id)
            .bind(item.product_id.as_uuid())
            .bind(units)
            .execute(&mut **tx)
            .await?;
        sqlx::query("UPDATE products SET on_hand = on_hand + $1, version = version + 1, updated_at = $2 WHERE id = $3")
            .bind(units)
            .bind(now)
            .bind(item.product_id.as_uuid())
            .execute(&mut **tx)
            .await?;
        sqlx::query(
            "INSERT INTO inventory_ledger (id, product_id, order_id, kind, delta, reason, created_at) \
             VALUES ($1, $2, $3, 'return', $4, $5, $6)",
        )
        .bind(Uuid::now_v7())
        .bind(item.product_id.as_uuid())
        .bind(order)
        .bind(units)
        .bind(format!("refund {} of order {}", draft.id, OrderId::from_uuid(order)))
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    Ok(None)
}

/// Marks a pending refund succeeded and adds it to the payment's refunded amount.
pub(super) async fn settle_refund<DB>(
    tx: &mut sqlx::Transaction<'_, DB>,
    order: Uuid,
    status: OrderStatus,
    settlement: &RefundSettlement,
    now: DateTime<Utc>,
) -> StoreResult<Settled>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let settled: Option<(i64,)> = sqlx::query_as(
        "UPDATE refunds SET state = 'succeeded', provider_ref = $1, updated_at = $2 \
         WHERE id = $3 AND order_id = $4 AND state = 'pending' RETURNING amount_minor",
    )
    .bind(settlement.provider_ref.clone())
    .bind(now)
    .bind(settlement.refund_id)
    .bind(order)
    .fetch_optional(&mut **tx)
    .await?;
    let Some((amount,)) = settled else {
        return Ok(Settled::Already);
    };
    let payment: Option<(String,)> = sqlx::query_as(
        "UPDATE payments SET refunded_minor = refunded_minor + $1, \
         state = CASE WHEN refunded_minor + $1 >= captured_minor THEN 'refunded' ELSE 'partially_refunded' END, \
         updated_at = $2 WHERE order_id = $3 RETURNING state",
    )
    .bind(amount)
    .bind(now)
    .bind(order)
    .fetch_optional(&mut **tx)
    .await?;
    let (state,) = payment.ok_or_else(|| StoreError::Corrupt(format!("refund of order {order} without a payment")))?;
    Ok(Settled::Now(
        (state == "refunded" && status == OrderStatus::Fulfilled).then_some(OrderStatus::Refunded),
    ))
}

/// Whether any shipment of the order was recorded.
pub(super) async fn has_shipments<DB>(tx: &mut sqlx::Transaction<'_, DB>, order: Uuid) -> StoreResult<bool>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let found: Option<(Uuid,)> = sqlx::query_as("SELECT id FROM shipments WHERE order_id = $1 LIMIT 1")
        .bind(order)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(found.is_some())
}
