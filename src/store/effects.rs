//! Committing a step's effects — written once, run by both backends inside their own transaction.
//!
//! The SQL uses numbered parameters (`$1`…) in first-use order, which SQLite accepts as well as
//! PostgreSQL; the only dialect difference, row locking of the order, is passed in.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::jobs::{CompleteOutcome, JobLease, Refusal, StepEffects};
use super::jobs_common::{inventory_plan, next_status};
use super::rows::{ORDER_COLUMNS, OrderItemRow, OrderRow};
use super::writes::{Write, Writes};

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
    LockedOrderLine: for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let mut correlation_id: Option<String> = None;
    // Everything below the decisions is described here and sent at the end (one round trip on
    // PostgreSQL).
    let mut writes = Writes::default();
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
        // The whole row, locked, with its lines (which never change after checkout), in one
        // statement: its status decides, and it is the snapshot events are rendered from (with
        // the status this transaction gives it), so it is read once.
        let locked: Vec<LockedOrderLine> = sqlx::query_as(&format!(
            "SELECT o.*, i.order_id, i.product_id, i.quantity, i.unit_price_minor FROM \
             (SELECT {ORDER_COLUMNS}, inventory_state, last_event_sequence FROM orders WHERE id = $1 {lock_order_row}) o \
             JOIN order_items i ON i.order_id = o.id ORDER BY i.line_no"
        ))
        .bind(order)
        .fetch_all(&mut **tx)
        .await?;
        let mut locked = locked.into_iter();
        let first = locked
            .next()
            .ok_or_else(|| StoreError::Corrupt(format!("job for missing order {order_id}")))?;
        let mut lines = vec![first.item];
        lines.extend(locked.map(|line| line.item));
        let LockedOrderRow {
            order: row,
            inventory_state,
            last_event_sequence,
        } = first.order;
        let status: OrderStatus = row.status().parse().map_err(StoreError::Corrupt)?;
        correlation_id = correlation_id.or(row.correlation_id().map(str::to_string));
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
        let plan = effects
            .inventory
            .map(|action| inventory_plan(&inventory_state, action))
            .transpose()?
            .flatten();
        // The order row is written once, with every column this completion changes.
        let mut order_update = OrderUpdate::default();
        if final_status != status {
            order_update.set("status", final_status.as_str()).set("updated_at", now);
        }
        if let Some(plan) = &plan {
            order_update.set("inventory_state", plan.next_state);
            let items = &lines;
            // One update per product (lines of one product summed), in id order.
            let mut by_product: std::collections::BTreeMap<Uuid, i64> = std::collections::BTreeMap::new();
            for item in items {
                *by_product.entry(item.product_id).or_default() += i64::from(item.quantity);
            }
            for (product, quantity) in &by_product {
                let mut stock = Write::new("UPDATE products SET on_hand = on_hand + ");
                stock
                    .bind(plan.on_hand_sign * quantity)
                    .sql(", reserved = reserved + ")
                    .bind(plan.reserved_sign * quantity)
                    .sql(", version = version + 1, updated_at = ")
                    .bind(now)
                    .sql(" WHERE id = ")
                    .bind(*product);
                writes.push(stock);
            }
            if let Some(kind) = plan.ledger_kind {
                let mut ledger = Write::new(
                    "INSERT INTO inventory_ledger (id, product_id, order_id, kind, delta, reason, created_at) VALUES ",
                );
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        ledger.sql(", ");
                    }
                    ledger.row([
                        Uuid::now_v7().into(),
                        item.product_id.into(),
                        order.into(),
                        kind.into(),
                        (plan.on_hand_sign * i64::from(item.quantity)).into(),
                        format!("order {order_id}").into(),
                        now.into(),
                    ]);
                }
                writes.push(ledger);
            }
        }
        if let Some(payment) = &effects.payment {
            let mut upsert = Write::new(
                "INSERT INTO payments (order_id, provider, idempotency_key, state, provider_ref, amount_minor, \
                 captured_minor, refunded_minor, currency, detail, client_secret, created_at, updated_at) VALUES ",
            );
            upsert
                .row([
                    order.into(),
                    payment.provider.clone().into(),
                    payment.idempotency_key.clone().into(),
                    payment.state.as_str().into(),
                    payment.provider_ref.clone().into(),
                    payment.amount_minor.into(),
                    payment.captured_minor.into(),
                    payment.refunded_minor.into(),
                    payment.currency.clone().into(),
                    payment.detail.clone().into(),
                    payment.client_secret.clone().into(),
                    now.into(),
                    now.into(),
                ])
                .sql(
                    " ON CONFLICT (order_id) DO UPDATE SET state = excluded.state, \
                     provider_ref = coalesce(excluded.provider_ref, payments.provider_ref), \
                     amount_minor = excluded.amount_minor, captured_minor = excluded.captured_minor, \
                     refunded_minor = excluded.refunded_minor, client_secret = excluded.client_secret, \
                     detail = excluded.detail, updated_at = excluded.updated_at",
                );
            writes.push(upsert);
        }
        if let Some(sent) = &effects.notification_sent {
            let mut slot = Write::new("UPDATE notifications SET state = 'sent', message_id = ");
            slot.bind(sent.message_id.clone())
                .sql(", sent_at = ")
                .bind(now)
                .sql(" WHERE order_id = ")
                .bind(order)
                .sql(" AND kind = ")
                .bind(sent.kind.clone());
            writes.push(slot);
        }
        if !effects.events.is_empty() {
            let mut timeline = Write::new(
                "INSERT INTO order_events (id, order_id, kind, status, detail, correlation_id, created_at) VALUES ",
            );
            for (i, (kind, detail)) in effects.events.iter().enumerate() {
                if i > 0 {
                    timeline.sql(", ");
                }
                timeline.row([
                    Uuid::now_v7().into(),
                    order.into(),
                    kind.clone().into(),
                    final_status.as_str().into(),
                    detail.clone().into(),
                    correlation_id.clone().into(),
                    now.into(),
                ]);
            }
            writes.push(timeline);
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
                    // Reads what the writes so far leave: send them first.
                    writes.send(tx).await?;
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
            let mut snapshot = row.into_order(&lines)?;
            if final_status != status {
                snapshot.status = final_status;
                snapshot.updated_at = now;
            }
            let rendered = events::render(&snapshot, payment.as_ref(), &effects.emit);
            // The order keeps its event counter on its row, read under the lock above.
            if !rendered.is_empty() {
                order_update.set("last_event_sequence", last_event_sequence + rendered.len() as i64);
                writes.push(events::outbox_write(
                    &order_subject(order_id),
                    Some(order),
                    last_event_sequence,
                    &rendered,
                    correlation_id.as_deref(),
                    now,
                ));
            }
        }
        if let Some(update) = order_update.write(order) {
            writes.push(update);
        }
    }
    if !effects.enqueue.is_empty() {
        let mut jobs = Write::new(
            "INSERT INTO jobs (id, kind, order_id, payload, state, attempts, max_attempts, run_at, ready_since, \
             correlation_id, created_at, updated_at) VALUES ",
        );
        for (i, job) in effects.enqueue.iter().enumerate() {
            if i > 0 {
                jobs.sql(", ");
            }
            jobs.row([
                Uuid::now_v7().into(),
                job.kind.into(),
                effects.order_id.map(|id| id.as_uuid()).into(),
                job.payload.to_string().into(),
                "ready".into(),
                0i32.into(),
                (job.max_attempts as i32).into(),
                job.run_at.into(),
                job.run_at.into(),
                correlation_id.clone().into(),
                now.into(),
                now.into(),
            ]);
        }
        writes.push(jobs);
    }
    writes.send(tx).await?;
    Ok(CompleteOutcome::Completed)
}

/// The columns of the order row a completion changes, written in one UPDATE (a batch of
/// [`Writes`] may not write a row twice).
#[derive(Default)]
struct OrderUpdate {
    write: Option<Write>,
}

impl OrderUpdate {
    fn set(&mut self, column: &str, value: impl Into<super::writes::Value>) -> &mut Self {
        let write = match &mut self.write {
            Some(write) => write.sql(format!(", {column} = ")),
            None => self.write.insert(Write::new(format!("UPDATE orders SET {column} = "))),
        };
        write.bind(value);
        self
    }

    /// The UPDATE, when anything changes.
    fn write(self, order: Uuid) -> Option<Write> {
        let mut write = self.write?;
        write.sql(" WHERE id = ").bind(order);
        Some(write)
    }
}

/// An order row read with its lock, and its inventory state and event counter.
#[derive(sqlx::FromRow)]
pub(super) struct LockedOrderRow {
    #[sqlx(flatten)]
    order: OrderRow,
    inventory_state: String,
    last_event_sequence: i64,
}

/// One line of the locked order, beside the order's row.
#[derive(sqlx::FromRow)]
pub(super) struct LockedOrderLine {
    #[sqlx(flatten)]
    order: LockedOrderRow,
    #[sqlx(flatten)]
    item: OrderItemRow,
}
