//! Small pieces both backends share: interpreting an earlier use of an idempotency key, turning
//! stock rows into domain values, building the new order, and classifying database errors.

use uuid::Uuid;

use super::rows;
use super::{PlaceOrder, PlaceOrderOutcome, StoreError, StoreResult};
use crate::domain::order::StockLevel;
use crate::domain::{Money, Order, OrderLine, OrderStatus, ProductId};

/// The most rows one pruning, replay or deletion transaction changes: within the distributed-SQL
/// profile's 3,000 rows per transaction, with room to spare.
pub(super) const CHUNK: i64 = 1000;

/// Decides what an earlier, completed use of the key means for this request.
pub(super) fn replay_or_refuse(
    request: &PlaceOrder,
    fingerprint: &str,
    body: Option<&str>,
) -> StoreResult<PlaceOrderOutcome> {
    if fingerprint != request.fingerprint {
        return Ok(PlaceOrderOutcome::KeyReused);
    }
    match body {
        Some(body) => Ok(PlaceOrderOutcome::Replayed(rows::decode_snapshot(body)?)),
        None => Ok(PlaceOrderOutcome::KeyInUse),
    }
}

/// Turns `(id, price_minor, available)` rows into domain stock levels.
pub(super) fn stock_levels(rows: Vec<(Uuid, i64, i64)>) -> StoreResult<Vec<StockLevel>> {
    rows.into_iter()
        .map(|(id, price, available)| {
            Ok(StockLevel {
                product_id: ProductId::from_uuid(id),
                price: Money::from_minor(price)
                    .map_err(|e| StoreError::Corrupt(format!("products.price_minor: {e}")))?,
                available,
            })
        })
        .collect()
}

/// The order a successful placement creates.
pub(super) fn new_order(request: &PlaceOrder, lines: Vec<OrderLine>, total: Money) -> Order {
    Order {
        id: request.order_id,
        customer_id: request.customer_id,
        status: OrderStatus::PendingPayment,
        currency: request.currency,
        lines,
        total,
        payment_token: request.payment_token.clone(),
        shipping: request.shipping.clone(),
        correlation_id: request.correlation_id.clone(),
        region: request.region.clone(),
        created_at: request.now,
        updated_at: request.now,
    }
}

/// The `data` of a new order's `order.placed` event.
pub(super) fn placed_data(order: &Order) -> String {
    let placed = crate::domain::events::NewEvent::new(crate::domain::events::EventType::OrderPlaced);
    crate::domain::events::order_data(order, None, &placed).to_string()
}

/// Maps a unique-constraint violation to [`StoreError::Conflict`] naming `field`.
pub(super) fn unique_is_conflict(field: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
    move |error| match &error {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(field),
        _ => error.into(),
    }
}

pub(super) fn is_foreign_key_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_foreign_key_violation())
}
