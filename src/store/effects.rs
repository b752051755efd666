//! Committing a step's effects — written once, run by both backends inside their own transaction.
//!
//! The SQL uses numbered parameters (`$1`…) in first-use order, which SQLite accepts as well as
//! PostgreSQL; the only dialect difference, row locking of the order, is passed in.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::jobs::{CompleteOutcome, JobLease, PaymentState, Refusal, StepEffects};
use super::jobs_common::{inventory_plan, next_status};
use super::rows::{ORDER_COLUMNS, OrderItemRow, OrderRow};
use super::writes::{Write, Writes};

use super::{StoreError, StoreResult};
use super::{after_sale, events};
use crate::domain::OrderStatus;
use crate::domain::events::{PaymentFacts, order_subject};

/// Applies `effects` (and completes the leased job) in `tx`. The caller commits; on any outcome
/// other than `Completed` it must not (dropping the transaction rolls it back).
///
/// `stock_locked`: the caller has locked the product rows the effects may write (a group does, for
/// all its completions at once); otherwise they are locked here when the order has several.
pub(super) async fn apply<DB>(
    tx: &mut sqlx::Transaction<'_, DB>,
    lock_order_row: &str,
    lease: Option<&JobLease>,
    stock_locked: bool,
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
    // Everything below the decisions is described here and sent at the end (one round trip on
    // PostgreSQL).
    let mut described = Described::default();
    if let Some(order_id) = effects.order_id {
        let order = order_id.as_uuid();
        let locked = lock_orders(tx, lock_order_row, &[order])
            .await?
            .pop()
            .ok_or_else(|| StoreError::Corrupt(format!("job for missing order {order_id}")))?;
        // Product rows are locked in id order, as checkout locks them: the stock writes sent at
        // the end run in an order PostgreSQL does not promise (data-modifying CTEs), and two
        // transactions locking two products in opposite orders deadlock.
        if !stock_locked && effects.inventory.is_some() && locked.products() > 1 {
            lock_stock(tx, lock_order_row, &[order]).await?;
        }
        let status = locked.status()?;
        correlation_id = correlation_id.or(locked.row.correlation_id().map(str::to_string));
        // Requests that carry their own idempotency answer before the status is looked at: a
        // retried shipment replays even after the order has moved on.
        if let Some(draft) = &effects.shipment {
            let inventory_state = &locked.inventory_state;
            if let Some(stop) = after_sale::record_shipment(tx, order, status, inventory_state, draft, now).await? {
                return Ok(stop);
            }
        }
        if let Some(draft) = &effects.refund {
            if let Some(stop) = after_sale::record_refund(tx, order, status, draft, now).await? {
                return Ok(stop);
            }
        }
        if let Some(unexpected) = unexpected_status(effects, status) {
            return Ok(unexpected);
        }
        if effects.unless_shipped && after_sale::has_shipments(tx, order).await? {
            return Ok(CompleteOutcome::Refused(Refusal::AlreadyShipped));
        }
        if !effects.expect_payment.is_empty() {
            // Read under the order's lock, which every payment write takes first.
            let stored: Option<(String,)> = sqlx::query_as("SELECT state FROM payments WHERE order_id = $1")
                .bind(order)
                .fetch_optional(&mut **tx)
                .await?;
            let state = stored.and_then(|(state,)| PaymentState::parse(&state));
            if !state.is_some_and(|state| effects.expect_payment.contains(&state)) {
                return Ok(CompleteOutcome::UnexpectedPayment(state));
            }
        }
        let mut new_status = effects.new_status;
        if let Some(settlement) = &effects.refund_settled {
            match after_sale::settle_refund(tx, order, status, settlement, now).await? {
                // Settled by an earlier run: the job completes and nothing else is written.
                after_sale::Settled::Already => return Ok(CompleteOutcome::Completed),
                after_sale::Settled::Now(refunded) => new_status = refunded.or(new_status),
            }
        }
        // The payment as this transaction leaves it, when events need it and this completion
        // does not write it: the stored row (which a refund's settlement may have just moved).
        let stored_payment = if needs_stored_payment(effects) {
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
        } else {
            None
        };
        let decided = Decided {
            status,
            new_status,
            correlation_id: correlation_id.as_deref(),
            stored_payment,
        };
        described.order(locked, effects, decided, now)?;
    }
    described.next_jobs(effects, correlation_id.as_deref(), now);
    let mut writes = Writes::default();
    described.write_into(&mut writes, now);
    writes.send(tx).await?;
    Ok(CompleteOutcome::Completed)
}

/// Whether a completion's events must be rendered with the payment row as stored: it emits
/// events but does not write the payment itself (or a refund's settlement moves it).
fn needs_stored_payment(effects: &StepEffects) -> bool {
    !effects.emit.is_empty() && !(effects.payment.is_some() && effects.refund_settled.is_none())
}

/// The outcome when the order is not in a status the effects expect.
fn unexpected_status(effects: &StepEffects, status: OrderStatus) -> Option<CompleteOutcome> {
    (!effects.expect_status.is_empty() && !effects.expect_status.contains(&status))
        .then_some(CompleteOutcome::UnexpectedStatus(status))
}

/// Whether a completion can be written together with others in [`apply_merged`]: it is fenced
/// by a lease, belongs to an order, and needs no read or write beyond the order row, its lines
/// and the job row (no shipment, refund, settlement, shipment or payment check, or stored payment).
pub(super) fn mergeable(lease: Option<&JobLease>, effects: &StepEffects) -> bool {
    lease.is_some()
        && effects.order_id.is_some()
        && effects.shipment.is_none()
        && effects.refund.is_none()
        && effects.refund_settled.is_none()
        && !effects.unless_shipped
        && effects.expect_payment.is_empty()
        && !needs_stored_payment(effects)
}

/// Completes many leased jobs (each [`mergeable`], of different orders) in `tx` with a fixed
/// number of statements however many there are: one locks the jobs whose lease still holds, one
/// locks their orders with their lines, one writes every completion's effects (PostgreSQL; on
/// SQLite one statement per table write). Each completion is still decided alone — a lost lease,
/// an unexpected status or an illegal transition answers that completion and writes nothing of
/// it — and the stock changes of orders sharing a product are summed into one write per product
/// (one statement may not write a row twice). An `Err` means the shared write failed: `tx` is
/// then unusable and the caller writes each completion on its own.
pub(super) async fn apply_merged<DB>(
    tx: &mut sqlx::Transaction<'_, DB>,
    lock_rows: &str,
    completions: &[(JobLease, &StepEffects, DateTime<Utc>)],
    more_orders: &[Uuid],
    more_stock: &[Uuid],
) -> StoreResult<Vec<StoreResult<CompleteOutcome>>>
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
    // The jobs whose lease still holds, locked in id order (as a single completion's fence
    // locks its job row before its order's), so no other worker can take them over before the
    // commit.
    let mut leases = String::new();
    for i in 0..completions.len() {
        if i > 0 {
            leases.push_str(", ");
        }
        leases.push_str(&format!("(${}, ${})", 2 * i + 1, 2 * i + 2));
    }
    let sql = format!(
        "SELECT id, correlation_id FROM jobs WHERE state = 'running' AND (id, lease_token) IN (VALUES {leases}) \
         ORDER BY id {lock_rows}"
    );
    let mut held = sqlx::query_as::<DB, (Uuid, Option<String>)>(&sql);
    for (lease, _, _) in completions {
        held = held.bind(lease.job_id).bind(lease.token);
    }
    let held: std::collections::HashMap<Uuid, Option<String>> = held.fetch_all(&mut **tx).await?.into_iter().collect();
    // Every order the group's transaction will touch is locked here, in one statement in id
    // order, before any stock is written: the orders of the completions written after these
    // (`more_orders`) too. A transaction that locked an order after writing stock could wait for
    // another group that holds that order and waits for the same stock (a deadlock).
    let mut orders: Vec<Uuid> = completions
        .iter()
        .filter(|(lease, _, _)| held.contains_key(&lease.job_id))
        .filter_map(|(_, effects, _)| effects.order_id.map(|id| id.as_uuid()))
        .chain(more_orders.iter().copied())
        .collect();
    orders.sort();
    orders.dedup();
    let mut locked: std::collections::HashMap<Uuid, LockedOrder> = if orders.is_empty() {
        Default::default()
    } else {
        lock_orders(tx, lock_rows, &orders)
            .await?
            .into_iter()
            .map(|order| (order.row.id, order))
            .collect()
    };
    // Then the product rows of every order whose stock may change, in id order (see [`apply`]):
    // skipped when the group's merged orders share one product and no other order writes stock.
    let mut stock_of: Vec<Uuid> = completions
        .iter()
        .filter(|(_, effects, _)| effects.inventory.is_some())
        .filter_map(|(_, effects, _)| effects.order_id.map(|id| id.as_uuid()))
        .filter(|order| locked.contains_key(order))
        .collect();
    let merged_products: std::collections::BTreeSet<Uuid> = stock_of
        .iter()
        .flat_map(|order| locked[order].lines.iter().map(|line| line.product_id))
        .collect();
    if !more_stock.is_empty() || merged_products.len() > 1 {
        stock_of.extend_from_slice(more_stock);
        stock_of.sort();
        stock_of.dedup();
        lock_stock(tx, lock_rows, &stock_of).await?;
    }
    let mut described = Described::default();
    let mut fenced = Vec::new();
    let mut answers = Vec::with_capacity(completions.len());
    for (lease, effects, now) in completions {
        let Some(correlation_id) = held.get(&lease.job_id) else {
            answers.push(Ok(CompleteOutcome::LeaseLost));
            continue;
        };
        let order_id = effects.order_id.expect("mergeable completions belong to an order");
        let Some(order) = locked.remove(&order_id.as_uuid()) else {
            answers.push(Err(StoreError::Corrupt(format!("job for missing order {order_id}"))));
            continue;
        };
        let answer: StoreResult<CompleteOutcome> = (|| {
            let status = order.status()?;
            if let Some(unexpected) = unexpected_status(effects, status) {
                return Ok(unexpected);
            }
            let correlation_id = correlation_id
                .clone()
                .or(order.row.correlation_id().map(str::to_string));
            // Described apart first, so a completion that fails half-way leaves nothing behind.
            let mut own = Described::default();
            let decided = Decided {
                status,
                new_status: effects.new_status,
                correlation_id: correlation_id.as_deref(),
                stored_payment: None,
            };
            own.order(order, effects, decided, *now)?;
            own.next_jobs(effects, correlation_id.as_deref(), *now);
            described.absorb(own);
            fenced.push(lease.job_id);
            Ok(CompleteOutcome::Completed)
        })();
        answers.push(answer);
    }
    if !fenced.is_empty() {
        let latest = completions.iter().map(|(_, _, now)| *now).max().expect("not empty");
        let mut writes = Writes::default();
        let mut done = Write::new(
            "UPDATE jobs SET state = 'succeeded', lease_token = NULL, lease_expires_at = NULL, updated_at = ",
        );
        done.bind(latest).sql(" WHERE id IN ");
        done.row(fenced.iter().map(|&id| id.into()));
        writes.push(done);
        described.write_into(&mut writes, latest);
        writes.send(tx).await?;
    }
    Ok(answers)
}

/// An order row read with its lock, its inventory state and event counter, and its lines.
pub(super) struct LockedOrder {
    row: OrderRow,
    inventory_state: String,
    last_event_sequence: i64,
    lines: Vec<OrderItemRow>,
}

impl LockedOrder {
    fn status(&self) -> StoreResult<OrderStatus> {
        self.row.status().parse().map_err(StoreError::Corrupt)
    }

    /// How many different products its lines hold.
    fn products(&self) -> usize {
        let mut products: Vec<Uuid> = self.lines.iter().map(|line| line.product_id).collect();
        products.sort();
        products.dedup();
        products.len()
    }
}

/// `$1, $2, …, $n`: the placeholders of an `IN (…)` list of `n` values.
pub(super) fn placeholders(n: usize) -> String {
    (1..=n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

/// Locks the order rows of a group's completions in id order, then the product rows of the
/// orders in `stock_of` (those whose stock may change), before any of them writes stock (see
/// [`apply_merged`]); nothing on SQLite, whose single writer holds the database.
pub(super) async fn lock_group_orders<DB>(
    tx: &mut sqlx::Transaction<'_, DB>,
    lock_rows: &str,
    orders: &[Uuid],
    stock_of: &[Uuid],
) -> StoreResult<()>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    if lock_rows.is_empty() {
        return Ok(());
    }
    if orders.len() > 1 {
        let sql = format!(
            "SELECT id FROM orders WHERE id IN ({}) ORDER BY id {lock_rows}",
            placeholders(orders.len())
        );
        let mut query = sqlx::query::<DB>(&sql);
        for order in orders {
            query = query.bind(*order);
        }
        query.execute(&mut **tx).await?;
    }
    lock_stock(tx, lock_rows, stock_of).await
}

/// Locks the product rows of the orders' lines in id order — the order checkout locks them in —
/// so that stock writes sent together (in an order the database chooses) cannot deadlock with
/// another transaction's; nothing on SQLite or for no orders.
async fn lock_stock<DB>(tx: &mut sqlx::Transaction<'_, DB>, lock_rows: &str, orders: &[Uuid]) -> StoreResult<()>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    if lock_rows.is_empty() || orders.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "SELECT id FROM products WHERE id IN (SELECT product_id FROM order_items WHERE order_id IN ({})) \
         ORDER BY id {lock_rows}",
        placeholders(orders.len())
    );
    let mut query = sqlx::query::<DB>(&sql);
    for order in orders {
        query = query.bind(*order);
    }
    query.execute(&mut **tx).await?;
    Ok(())
}

/// Locks the order rows (in id order) and reads them with their lines, which never change after
/// checkout, in one statement: the status decides, and the row is the snapshot events are
/// rendered from (with the status the transaction gives it), so it is read once.
async fn lock_orders<DB>(
    tx: &mut sqlx::Transaction<'_, DB>,
    lock_rows: &str,
    orders: &[Uuid],
) -> StoreResult<Vec<LockedOrder>>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    LockedOrderLine: for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let ids = placeholders(orders.len());
    let sql = format!(
        "SELECT o.*, i.order_id, i.product_id, i.quantity, i.unit_price_minor FROM \
         (SELECT {ORDER_COLUMNS}, inventory_state, last_event_sequence FROM orders WHERE id IN ({ids}) \
          ORDER BY id {lock_rows}) o \
         JOIN order_items i ON i.order_id = o.id ORDER BY o.id, i.line_no"
    );
    let mut query = sqlx::query_as::<DB, LockedOrderLine>(&sql);
    for order in orders {
        query = query.bind(*order);
    }
    let mut locked: Vec<LockedOrder> = Vec::with_capacity(orders.len());
    for line in query.fetch_all(&mut **tx).await? {
        match locked.last_mut() {
            Some(order) if order.row.id == line.order.order.id => order.lines.push(line.item),
            _ => locked.push(LockedOrder {
                row: line.order.order,
                inventory_state: line.order.inventory_state,
                last_event_sequence: line.order.last_event_sequence,
                lines: vec![line.item],
            }),
        }
    }
    Ok(locked)
}

/// What the decisions about one order left to write.
struct Decided<'a> {
    /// The status the order was found in, under its lock.
    status: OrderStatus,
    /// The status the effects move it to (a refund's settlement may have chosen it).
    new_status: Option<OrderStatus>,
    correlation_id: Option<&'a str>,
    /// The payment row as stored, when [`needs_stored_payment`].
    stored_payment: Option<PaymentFacts>,
}

/// The writes of one or more completions, described and not yet sent. Stock changes are kept
/// per product and summed, so completions of orders sharing a product write its row once.
#[derive(Default)]
struct Described {
    writes: Vec<Write>,
    /// product → (on_hand change, reserved change).
    stock: std::collections::BTreeMap<Uuid, (i64, i64)>,
}

impl Described {
    /// The order's effects: its row (once, every changed column), stock, ledger, payment,
    /// e-mail slot, timeline and outbox.
    fn order(
        &mut self,
        locked: LockedOrder,
        effects: &StepEffects,
        decided: Decided<'_>,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let LockedOrder {
            row,
            inventory_state,
            last_event_sequence,
            lines,
        } = locked;
        let order = row.id;
        let order_id = crate::domain::OrderId::from_uuid(order);
        let Decided {
            status,
            new_status,
            correlation_id,
            stored_payment,
        } = decided;
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
            for item in &lines {
                let quantity = i64::from(item.quantity);
                let change = self.stock.entry(item.product_id).or_default();
                change.0 += plan.on_hand_sign * quantity;
                change.1 += plan.reserved_sign * quantity;
            }
            if let Some(kind) = plan.ledger_kind {
                let mut ledger = Write::new(
                    "INSERT INTO inventory_ledger (id, product_id, order_id, kind, delta, reason, created_at) VALUES ",
                );
                for (i, item) in lines.iter().enumerate() {
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
                self.writes.push(ledger);
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
            self.writes.push(upsert);
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
            self.writes.push(slot);
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
                    correlation_id.map(str::to_string).into(),
                    now.into(),
                ]);
            }
            self.writes.push(timeline);
        }
        if !effects.emit.is_empty() {
            // The payment as this transaction leaves it: the change it writes, or the stored row.
            let payment = match (&effects.payment, &effects.refund_settled) {
                (Some(change), None) => Some(PaymentFacts {
                    state: change.state.as_str().to_string(),
                    provider: change.provider.clone(),
                    authorized_minor: change.amount_minor,
                    captured_minor: change.captured_minor,
                    refunded_minor: change.refunded_minor,
                }),
                _ => stored_payment,
            };
            let mut snapshot = row.into_order(&lines)?;
            if final_status != status {
                snapshot.status = final_status;
                snapshot.updated_at = now;
            }
            let rendered = events::render(&snapshot, payment.as_ref(), &effects.emit);
            // The order keeps its event counter on its row, read under the lock.
            if !rendered.is_empty() {
                order_update.set("last_event_sequence", last_event_sequence + rendered.len() as i64);
                self.writes.push(events::outbox_write(
                    &order_subject(order_id),
                    Some(order),
                    last_event_sequence,
                    &rendered,
                    correlation_id,
                    now,
                ));
            }
        }
        if let Some(update) = order_update.write(order) {
            self.writes.push(update);
        }
        Ok(())
    }

    /// The jobs the effects enqueue.
    fn next_jobs(&mut self, effects: &StepEffects, correlation_id: Option<&str>, now: DateTime<Utc>) {
        if effects.enqueue.is_empty() {
            return;
        }
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
                correlation_id.map(str::to_string).into(),
                now.into(),
                now.into(),
            ]);
        }
        self.writes.push(jobs);
    }

    /// Takes another completion's writes into this batch.
    fn absorb(&mut self, other: Described) {
        self.writes.extend(other.writes);
        for (product, (on_hand, reserved)) in other.stock {
            let change = self.stock.entry(product).or_default();
            change.0 += on_hand;
            change.1 += reserved;
        }
    }

    /// Adds everything to `writes`: one update per product (in id order), then the rest.
    fn write_into(self, writes: &mut Writes, now: DateTime<Utc>) {
        for (product, (on_hand, reserved)) in self.stock {
            let mut stock = Write::new("UPDATE products SET on_hand = on_hand + ");
            stock
                .bind(on_hand)
                .sql(", reserved = reserved + ")
                .bind(reserved)
                .sql(", version = version + 1, updated_at = ")
                .bind(now)
                .sql(" WHERE id = ")
                .bind(product);
            writes.push(stock);
        }
        for write in self.writes {
            writes.push(write);
        }
    }
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
