//! Committing a step's effects — written once, run by both backends inside their own transaction.
//!
//! The SQL uses numbered parameters (`$1`…) in first-use order, which SQLite accepts as well as
//! PostgreSQL; the only dialect difference, row locking of the order, is passed in.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::jobs::{CompleteOutcome, JobLease, Refusal, StepEffects};
use super::jobs_common::{inventory_plan, next_status};
use super::rows::{ORDER_COLUMNS, OrderItemRow, OrderRow};

use super::{StoreError, StoreResult};
use super::{after_sale, events};
use crate::domain::OrderStatus;
use crate::domain::events::{PaymentFacts, order_subject};

/// Applies `effects` (and completes the leased job) in `tx`. The caller commits; on any outcome
/// other than `Completed` it must not (dropping the transaction rolls it back).
pub(super) async fn apply<DB>(
    tx: &mut sqlx::Transaction<'_, DB>,
    lock_order_row: &str,
    lease: Option<&JobLease>,
    effects: &StepEffects,
    now: DateTime<Utc>,
) -> StoreResult<CompleteOutcome>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> i32: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<String>: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<Uuid>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
    LockedOrderRow: for<'r> sqlx::FromRow<'r, DB::Row>,
    OrderItemRow: for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let mut correlation_id: Option<String> = None;
    if let Some(lease) = lease {
        let done: Option<(Option<String>,)> = sqlx::query_as(
            "UPDATE jobs SET state = 'succeeded', lease_token = NULL, lease_expires_at = NULL, updated_at = $1 \
             WHERE id = $2 AND lease_token = $3 AND state = 'running' RETURNING correlation_id",
        )
        .bind(now)
        .bind(lease.job_id)
        .bind(lease.token)
        .fetch_optional(&mut **tx)
        .await?;
        match done {
            Some((correlation,)) => correlation_id = correlation,
            None => return Ok(CompleteOutcome::LeaseLost),
        }
    }
    if let Some(order_id) = effects.order_id {
        let order = order_id.as_uuid();
        // The whole row, locked: its status decides, and it is the snapshot events are rendered
        // from (with the status this transaction gives it), so it is read once.
        let locked: Option<LockedOrderRow> = sqlx::query_as(&format!(
            "SELECT {ORDER_COLUMNS}, inventory_state FROM orders WHERE id = $1 {lock_order_row}"
        ))
        .bind(order)
        .fetch_optional(&mut **tx)
        .await?;
        let LockedOrderRow {
            order: row,
            inventory_state,
        } = locked.ok_or_else(|| StoreError::Corrupt(format!("job for missing order {order_id}")))?;
        let status: OrderStatus = row.status().parse().map_err(StoreError::Corrupt)?;
        correlation_id = correlation_id.or(row.correlation_id().map(str::to_string));
        // The order's lines, read when the stock moves or events are rendered (once for both).
        let mut lines: Option<Vec<OrderItemRow>> = None;
        // Requests that carry their own idempotency answer before the status is looked at: a
        // retried shipment replays even after the order has moved on.
        if let Some(draft) = &effects.shipment {
            if let Some(stop) = after_sale::record_shipment(tx, order, status, &inventory_state, draft, now).await? {
                return Ok(stop);
            }
        }
        if let Some(draft) = &effects.refund {
            if let Some(stop) = after_sale::record_refund(tx, order, status, draft, now).await? {
                return Ok(stop);
            }
        }
        if !effects.expect_status.is_empty() && !effects.expect_status.contains(&status) {
            return Ok(CompleteOutcome::UnexpectedStatus(status));
        }
        if effects.unless_shipped && after_sale::has_shipments(tx, order).await? {
            return Ok(CompleteOutcome::Refused(Refusal::AlreadyShipped));
        }
        let mut new_status = effects.new_status;
        if let Some(settlement) = &effects.refund_settled {
            match after_sale::settle_refund(tx, order, status, settlement, now).await? {
                // Settled by an earlier run: the job completes and nothing else is written.
                after_sale::Settled::Already => return Ok(CompleteOutcome::Completed),
                after_sale::Settled::Now(refunded) => new_status = refunded.or(new_status),
            }
        }
        let final_status = next_status(status, new_status)?;
        if final_status != status {
            sqlx::query("UPDATE orders SET status = $1, updated_at = $2 WHERE id = $3")
                .bind(final_status.as_str().to_string())
                .bind(now)
                .bind(order)
                .execute(&mut **tx)
                .await?;
        }
        if let Some(plan) = effects
            .inventory
            .map(|action| inventory_plan(&inventory_state, action))
            .transpose()?
            .flatten()
        {
            let items = order_items(tx, order, &mut lines).await?;
            // Product rows in id order: the global lock order.
            let mut by_product: Vec<(Uuid, i64)> = items
                .iter()
                .map(|item| (item.product_id, i64::from(item.quantity)))
                .collect();
            by_product.sort_unstable();
            for (product, quantity) in by_product {
                sqlx::query(
                    "UPDATE products SET on_hand = on_hand + $1, reserved = reserved + $2, version = version + 1, \
                     updated_at = $3 WHERE id = $4",
                )
                .bind(plan.on_hand_sign * quantity)
                .bind(plan.reserved_sign * quantity)
                .bind(now)
                .bind(product)
                .execute(&mut **tx)
                .await?;
                if let Some(kind) = plan.ledger_kind {
                    sqlx::query(
                        "INSERT INTO inventory_ledger (id, product_id, order_id, kind, delta, reason, created_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    )
                    .bind(Uuid::now_v7())
                    .bind(product)
                    .bind(order)
                    .bind(kind.to_string())
                    .bind(plan.on_hand_sign * quantity)
                    .bind(format!("order {order_id}"))
                    .bind(now)
                    .execute(&mut **tx)
                    .await?;
                }
            }
            sqlx::query("UPDATE orders SET inventory_state = $1 WHERE id = $2")
                .bind(plan.next_state.to_string())
                .bind(order)
                .execute(&mut **tx)
                .await?;
        }
        if let Some(payment) = &effects.payment {
            sqlx::query(
                "INSERT INTO payments (order_id, provider, idempotency_key, state, provider_ref, amount_minor, \
                 captured_minor, refunded_minor, currency, detail, client_secret, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12) \
                 ON CONFLICT (order_id) DO UPDATE SET state = excluded.state, \
                 provider_ref = coalesce(excluded.provider_ref, payments.provider_ref), \
                 amount_minor = excluded.amount_minor, captured_minor = excluded.captured_minor, \
                 refunded_minor = excluded.refunded_minor, client_secret = excluded.client_secret, \
                 detail = excluded.detail, updated_at = excluded.updated_at",
            )
            .bind(order)
            .bind(payment.provider.clone())
            .bind(payment.idempotency_key.clone())
            .bind(payment.state.as_str().to_string())
            .bind(payment.provider_ref.clone())
            .bind(payment.amount_minor)
            .bind(payment.captured_minor)
            .bind(payment.refunded_minor)
            .bind(payment.currency.clone())
            .bind(payment.detail.clone())
            .bind(payment.client_secret.clone())
            .bind(now)
            .execute(&mut **tx)
            .await?;
        }
        if let Some(sent) = &effects.notification_sent {
            sqlx::query(
                "UPDATE notifications SET state = 'sent', message_id = $1, sent_at = $2 WHERE order_id = $3 AND kind = $4",
            )
            .bind(sent.message_id.clone())
            .bind(now)
            .bind(order)
            .bind(sent.kind.clone())
            .execute(&mut **tx)
            .await?;
        }
        for (kind, detail) in &effects.events {
            sqlx::query(
                "INSERT INTO order_events (id, order_id, kind, status, detail, correlation_id, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(Uuid::now_v7())
            .bind(order)
            .bind(kind.clone())
            .bind(final_status.as_str().to_string())
            .bind(detail.clone())
            .bind(correlation_id.clone())
            .bind(now)
            .execute(&mut **tx)
            .await?;
        }
        if !effects.emit.is_empty() {
            // The payment as this transaction left it: the change it wrote, or the stored row
            // (which a refund's settlement may have just moved).
            let payment = match (&effects.payment, &effects.refund_settled) {
                (Some(change), None) => Some(PaymentFacts {
                    state: change.state.as_str().to_string(),
                    provider: change.provider.clone(),
                    authorized_minor: change.amount_minor,
                    captured_minor: change.captured_minor,
                    refunded_minor: change.refunded_minor,
                }),
                _ => {
                    let stored: Option<(String, String, i64, i64, i64)> = sqlx::query_as(
                        "SELECT state, provider, amount_minor, captured_minor, refunded_minor FROM payments \
                         WHERE order_id = $1",
                    )
                    .bind(order)
                    .fetch_optional(&mut **tx)
                    .await?;
                    stored.map(
                        |(state, provider, authorized_minor, captured_minor, refunded_minor)| PaymentFacts {
                            state,
                            provider,
                            authorized_minor,
                            captured_minor,
                            refunded_minor,
                        },
                    )
                }
            };
            let items = order_items(tx, order, &mut lines).await?;
            let mut snapshot = row.into_order(items)?;
            if final_status != status {
                snapshot.status = final_status;
                snapshot.updated_at = now;
            }
            let rendered = events::render(&snapshot, payment.as_ref(), &effects.emit);
            events::append(
                tx,
                &order_subject(order_id),
                Some(order),
                &rendered,
                correlation_id.as_deref(),
                now,
            )
            .await?;
        }
    }
    for job in &effects.enqueue {
        sqlx::query(
            "INSERT INTO jobs (id, kind, order_id, payload, state, attempts, max_attempts, run_at, ready_since, \
             correlation_id, created_at, updated_at) VALUES ($1, $2, $3, $4, 'ready', 0, $5, $6, $6, $7, $8, $8)",
        )
        .bind(Uuid::now_v7())
        .bind(job.kind.to_string())
        .bind(effects.order_id.map(|id| id.as_uuid()))
        .bind(job.payload.to_string())
        .bind(job.max_attempts as i32)
        .bind(job.run_at)
        .bind(correlation_id.clone())
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    Ok(CompleteOutcome::Completed)
}

/// An order row read with its lock, and its inventory state.
#[derive(sqlx::FromRow)]
pub(super) struct LockedOrderRow {
    #[sqlx(flatten)]
    order: OrderRow,
    inventory_state: String,
}

/// The order's lines in line order, read on first use within the transaction.
async fn order_items<'l, DB>(
    tx: &mut sqlx::Transaction<'_, DB>,
    order: Uuid,
    lines: &'l mut Option<Vec<OrderItemRow>>,
) -> StoreResult<&'l [OrderItemRow]>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    OrderItemRow: for<'r> sqlx::FromRow<'r, DB::Row>,
{
    if lines.is_none() {
        let items: Vec<OrderItemRow> = sqlx::query_as(
            "SELECT order_id, product_id, quantity, unit_price_minor FROM order_items WHERE order_id = $1 \
             ORDER BY line_no",
        )
        .bind(order)
        .fetch_all(&mut **tx)
        .await?;
        *lines = Some(items);
    }
    Ok(lines.as_deref().unwrap_or_default())
}
