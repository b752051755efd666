//! Shared checkout commits: checkouts arriving together are written in one transaction with
//! one commit, each still answered on its own (202, or 422 for the one that is short of stock).
//!
//! A checkout's cost on both backends is its commit — an fsync on SQLite's single writer, and on
//! PostgreSQL a WAL flush plus the time its product rows stay locked until then. In a flash sale
//! every checkout wants the same product row, so one at a time they queue behind each other's
//! commits. Here a writer takes all checkouts waiting (up to `--checkout-batch`), prices each
//! against the stock the ones before it left (exactly what they would have seen one after
//! another), and writes all the accepted orders with one reservation per product. SQLite reads
//! the stock inside its write transaction; PostgreSQL reads it with each checkout's idempotency
//! claim (one round trip) and writes the group in one more, checking on each product row as it
//! is written that the stock and price still allow what was decided ([`stock_checks`]; the
//! write statement is in `postgres/mod.rs`, `PgCheckouts`). No savepoints: when one checkout's write would fail the others (an unknown
//! customer's foreign key, an idempotency claim taken over), the group is rolled back and each
//! checkout is written alone, so it fails alone. A group of one is the plain single checkout:
//! the same code.
//!
//! Every answer is sent only after its group committed, so a 202 still means the order is
//! durable.
//!
//! Losing the database ([`super::outage`]) answers 503, never 500. A group whose connection broke
//! before COMMIT wrote nothing, so it is run once more on a fresh connection (the usual case: a
//! pooled connection the server closed when it restarted). A connection lost *during* COMMIT
//! leaves the outcome unknown: that is not re-run but answered 503, and the client's retry with
//! the same Idempotency-Key replays the order (it committed) or places it (it did not).

use std::collections::HashMap;

use uuid::Uuid;

use super::batcher::GroupWriter;
use super::common::new_order;
use super::{PlaceOrder, PlaceOrderOutcome, StoreError, StoreResult};
use super::{outage, retry};
use crate::domain::order::{StockLevel, price_lines};
use crate::domain::{CartRejection, Order, ProductId};

/// One checkout waiting for its transaction: the request, its idempotency claim's token
/// (PostgreSQL claims the key before; SQLite ignores it) and the stock of its cart's products as
/// read with the claim (PostgreSQL, in the same round trip; empty on SQLite, which reads stock
/// inside its write transaction).
#[derive(Clone)]
pub(super) struct Checkout {
    pub request: PlaceOrder,
    pub lock_token: Uuid,
    pub stock: Vec<StockLevel>,
}

/// Why a group transaction wrote nothing.
pub(super) enum GroupFailure {
    /// One checkout's write would fail the others: roll back and write each alone.
    Split,
    /// The whole transaction may simply be run again (serialization failure, deadlock): it is,
    /// for up to [`retry::BUDGET`], then answered [`StoreError::Contended`] (503).
    Retry(sqlx::Error),
    /// The connection broke before COMMIT: nothing was written; run again on a fresh connection.
    ConnectionLost(sqlx::Error),
    /// Failed for every checkout in it.
    Failed(StoreError),
}

/// A statement before COMMIT failed.
impl From<sqlx::Error> for GroupFailure {
    fn from(error: sqlx::Error) -> Self {
        if outage::connection_lost(&error) {
            GroupFailure::ConnectionLost(error)
        } else {
            GroupFailure::Failed(error.into())
        }
    }
}

impl GroupFailure {
    /// COMMIT itself failed. A connection lost now leaves the outcome unknown, so it is never
    /// [`GroupFailure::ConnectionLost`] (if it did commit, a re-run would collide with its own
    /// orders): it fails, a lost connection as [`StoreError::Unavailable`] (503) like any outage.
    pub(super) fn at_commit(error: sqlx::Error) -> Self {
        GroupFailure::Failed(error.into())
    }

    /// The database is unavailable or refuses writes ([`StoreError::is_outage`]), or the group
    /// kept losing races for the whole retry budget: the same answer for every checkout in the
    /// group (writing each alone would only spend the budget again per checkout).
    fn is_outage(&self) -> bool {
        match self {
            GroupFailure::ConnectionLost(_) | GroupFailure::Retry(_) => true,
            GroupFailure::Failed(error) => error.is_outage(),
            GroupFailure::Split => false,
        }
    }
}

/// How checkouts are grouped; `None` takes the backend's default.
#[derive(Clone, Copy, Debug, Default)]
pub struct CheckoutBatchSettings {
    /// Most checkouts in one transaction; 1 writes each alone.
    pub max_batch: Option<usize>,
    /// Group transactions written at once.
    pub writers: Option<usize>,
}

impl CheckoutBatchSettings {
    /// (largest group, writers). One writer on both backends by default: SQLite has one
    /// anyway, and on PostgreSQL more writers only contend for the same product rows (measured,
    /// docs/BENCHMARKS.md "Shared checkout commits": 1 writer 1,984 orders/s, 2: 1,756, 4: 1,017
    /// at 16 clients on 20 products). Each process has its own writer.
    pub fn resolve(self) -> (usize, usize) {
        let writers = 1;
        (
            self.max_batch.unwrap_or(64).max(1),
            self.writers.unwrap_or(writers).max(1),
        )
    }
}

/// One dialect's group transaction.
#[async_trait::async_trait]
pub(super) trait CheckoutTransaction: Send + Sync + 'static {
    /// Writes the group in one transaction and commits it; one outcome per checkout, in order.
    /// With one checkout, never [`GroupFailure::Split`]: its own outcome instead.
    async fn write_group(&self, group: &[Checkout]) -> Result<Vec<PlaceOrderOutcome>, GroupFailure>;
}

/// The batcher's writer: a dialect's transaction, retried when it lost a race, split when one
/// checkout would fail the rest, and cut into parts that each change at most `max_changed_rows`
/// rows (`None`: no limit; the distributed-SQL profile's transactions change at most
/// [`super::MAX_CHANGED_ROWS`]).
pub(super) struct Checkouts<T> {
    pub transaction: T,
    pub max_changed_rows: Option<usize>,
}

#[async_trait::async_trait]
impl<T: CheckoutTransaction> GroupWriter for Checkouts<T> {
    type Item = Checkout;
    type Answer = StoreResult<PlaceOrderOutcome>;

    async fn write(&self, group: Vec<Checkout>) -> Vec<Self::Answer> {
        let mut answers = Vec::with_capacity(group.len());
        for part in within_row_limit(group, self.max_changed_rows) {
            answers.extend(self.write_part(part).await);
        }
        answers
    }
}

/// `group` cut, in order, into consecutive parts whose transactions each change at most `limit`
/// rows: per checkout its order, timeline entry, outbox event, first job and idempotency key, and
/// its lines; once per product its stock row. One part without a limit. A checkout alone always
/// fits (at most [`crate::domain::order::MAX_LINES`] lines, each of another product).
fn within_row_limit(group: Vec<Checkout>, limit: Option<usize>) -> Vec<Vec<Checkout>> {
    let Some(limit) = limit else {
        return vec![group];
    };
    let mut parts: Vec<Vec<Checkout>> = Vec::new();
    let (mut part, mut products, mut rows) = (Vec::new(), std::collections::HashSet::new(), 0);
    for checkout in group {
        let cart = checkout.request.cart.lines();
        let new_products = cart.iter().filter(|line| !products.contains(&line.product_id)).count();
        if !part.is_empty() && rows + 5 + cart.len() + new_products > limit {
            parts.push(std::mem::take(&mut part));
            (products, rows) = (std::collections::HashSet::new(), 0);
        }
        for line in cart {
            if products.insert(line.product_id) {
                rows += 1;
            }
        }
        rows += 5 + cart.len();
        part.push(checkout);
    }
    if !part.is_empty() {
        parts.push(part);
    }
    parts
}

impl<T: CheckoutTransaction> Checkouts<T> {
    /// Writes one part of a group in one transaction, or each of its checkouts alone when one
    /// would fail the rest.
    async fn write_part(&self, group: Vec<Checkout>) -> Vec<StoreResult<PlaceOrderOutcome>> {
        match self.retrying(&group).await {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
            Err(failure) if group.len() == 1 => vec![Err(alone(failure))],
            // The database is gone for all of them: writing each alone would only wait for it
            // once per checkout.
            Err(failure) if failure.is_outage() => {
                let why = alone(failure);
                group.iter().map(|_| Err(why.outage_copy())).collect()
            }
            Err(_) => {
                let mut answers = Vec::with_capacity(group.len());
                for checkout in &group {
                    answers.push(match self.retrying(std::slice::from_ref(checkout)).await {
                        Ok(mut outcome) => Ok(outcome.pop().expect("one outcome per checkout")),
                        Err(failure) => Err(alone(failure)),
                    });
                }
                answers
            }
        }
    }

    async fn retrying(&self, group: &[Checkout]) -> Result<Vec<PlaceOrderOutcome>, GroupFailure> {
        let (mut backoff, mut reconnected) = (retry::Backoff::new(), false);
        loop {
            match self.transaction.write_group(group).await {
                Err(GroupFailure::Retry(error)) => {
                    if !backoff.wait().await {
                        tracing::warn!(%error, size = group.len(), "checkout transaction kept losing races; giving up");
                        return Err(GroupFailure::Retry(error));
                    }
                }
                Err(GroupFailure::ConnectionLost(error)) if !reconnected => {
                    tracing::warn!(%error, "checkout transaction lost its connection before COMMIT; running it again");
                    reconnected = true;
                }
                other => return other,
            }
        }
    }
}

fn alone(failure: GroupFailure) -> StoreError {
    match failure {
        GroupFailure::Failed(error) => error,
        GroupFailure::Retry(error) | GroupFailure::ConnectionLost(error) => error.into(),
        GroupFailure::Split => StoreError::Corrupt("a checkout alone asked to be split".into()),
    }
}

/// Every product the group's carts name, sorted (the lock order) and without repeats.
pub(super) fn products_of<'a>(group: impl IntoIterator<Item = &'a PlaceOrder>) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = group
        .into_iter()
        .flat_map(|request| request.cart.lines().iter().map(|line| line.product_id.as_uuid()))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Prices each checkout against the stock the ones before it in the group left, as if they had
/// run one after another in this order: `Ok(order)` to write, or why its cart cannot be filled.
pub(super) fn allocate<'a>(
    group: impl IntoIterator<Item = &'a PlaceOrder>,
    levels: Vec<StockLevel>,
) -> Vec<Result<Order, CartRejection>> {
    let mut levels = levels;
    let mut index: HashMap<ProductId, usize> = HashMap::new();
    for (at, level) in levels.iter().enumerate() {
        index.insert(level.product_id, at);
    }
    group
        .into_iter()
        .map(|request| {
            let (lines, total) = price_lines(&request.cart, &levels)?;
            for line in &lines {
                levels[index[&line.product_id]].available -= i64::from(line.quantity.get());
            }
            Ok(new_order(request, lines, total))
        })
        .collect()
}

/// The stock a group is priced against before its write: per product, the latest of the
/// members' reads (members are in the order their claims, which read the stock, returned).
pub(super) fn latest_levels(group: &[Checkout]) -> Vec<StockLevel> {
    let mut latest: HashMap<ProductId, StockLevel> = HashMap::new();
    for level in group.iter().flat_map(|checkout| &checkout.stock) {
        latest.insert(level.product_id, *level);
    }
    let mut levels: Vec<StockLevel> = latest.into_values().collect();
    levels.sort_by_key(|level| level.product_id.as_uuid());
    levels
}

/// What a group's write must find on one product row for the allocation it was priced with to
/// still hold, checked on the newest row version as it is written (the conditional write of a
/// checkout priced from stock read before its transaction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct StockCheck {
    pub product: Uuid,
    /// Units the accepted orders reserve together (0 when only a rejected order names it).
    pub units: i64,
    /// The unit price the accepted orders were charged: the row must still have it.
    pub price: Option<i64>,
    /// A checkout was refused as short of this product against this availability: it must not
    /// have grown since, or the refusal might no longer be true.
    pub at_most: Option<i64>,
}

/// The checks a group's write makes, one per product its accepted orders reserve or its
/// refusals were short of, in product-id order. With these all true at write time, the outcome
/// is exactly what [`allocate`] would give against the stock as it is then: an accepted order
/// still fits (there is at least what it reserves), a refused one still does not (there is no
/// more than there was), and each was charged the current price.
pub(super) fn stock_checks(levels: &[StockLevel], allocated: &[Result<Order, CartRejection>]) -> Vec<StockCheck> {
    let mut checks: HashMap<Uuid, StockCheck> = HashMap::new();
    let level_of = |product: ProductId| levels.iter().find(|level| level.product_id == product);
    for outcome in allocated {
        match outcome {
            Ok(order) => {
                for line in &order.lines {
                    let product = line.product_id.as_uuid();
                    let check = checks.entry(product).or_insert(StockCheck {
                        product,
                        units: 0,
                        price: None,
                        at_most: None,
                    });
                    check.units += i64::from(line.quantity.get());
                    check.price = Some(line.unit_price.minor());
                }
            }
            Err(CartRejection::InsufficientStock(shortages)) => {
                for shortage in shortages {
                    let Some(level) = level_of(shortage.product_id) else {
                        continue;
                    };
                    let product = shortage.product_id.as_uuid();
                    checks
                        .entry(product)
                        .or_insert(StockCheck {
                            product,
                            units: 0,
                            price: None,
                            at_most: None,
                        })
                        .at_most = Some(level.available);
                }
            }
            Err(_) => {}
        }
    }
    let mut checks: Vec<StockCheck> = checks.into_values().collect();
    checks.sort_by_key(|check| check.product);
    checks
}

/// Per product, the units the accepted orders reserve together (one write per product).
pub(super) fn reservations<'a>(orders: impl IntoIterator<Item = &'a Order>) -> Vec<(Uuid, i64)> {
    let mut units: HashMap<Uuid, i64> = HashMap::new();
    for order in orders {
        for line in &order.lines {
            *units.entry(line.product_id.as_uuid()).or_default() += i64::from(line.quantity.get());
        }
    }
    let mut units: Vec<(Uuid, i64)> = units.into_iter().collect();
    units.sort();
    units
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::order::{Cart, CartLine, Quantity};
    use crate::domain::{Currency, CustomerId, Money, OrderId, PaymentToken};
    use crate::store::NewJob;

    fn request(product: ProductId, quantity: u32) -> PlaceOrder {
        let now = crate::clock::now();
        PlaceOrder {
            principal: "p".into(),
            idempotency_key: Uuid::now_v7().to_string(),
            fingerprint: "f".into(),
            order_id: OrderId::new(),
            customer_id: CustomerId::new(),
            cart: Cart::new(vec![CartLine {
                product_id: product,
                quantity: Quantity::parse(i64::from(quantity)).unwrap(),
            }])
            .unwrap(),
            payment_token: PaymentToken::parse("tok_visa").unwrap(),
            shipping: None,
            currency: Currency::USD,
            correlation_id: None,
            region: None,
            first_job: NewJob {
                kind: "charge_payment",
                payload: serde_json::json!({}),
                run_at: now,
                max_attempts: 1,
            },
            now,
        }
    }

    fn big_checkout(products: &[ProductId]) -> Checkout {
        let mut request = request(products[0], 1);
        request.cart = Cart::new(
            products
                .iter()
                .map(|&product_id| CartLine {
                    product_id,
                    quantity: Quantity::parse(1).unwrap(),
                })
                .collect(),
        )
        .unwrap();
        Checkout {
            request,
            lock_token: Uuid::now_v7(),
            stock: Vec::new(),
        }
    }

    #[test]
    fn groups_are_cut_to_the_row_limit_in_order() {
        let shared: Vec<ProductId> = (0..100).map(|_| ProductId::new()).collect();
        let group: Vec<Checkout> = (0..40).map(|_| big_checkout(&shared)).collect();
        let keys: Vec<String> = group.iter().map(|c| c.request.idempotency_key.clone()).collect();
        assert_eq!(within_row_limit(group.clone(), None).len(), 1, "no limit: one part");
        // The 100 shared stock rows once, then 105 rows per checkout: 27 fit in 3,000.
        let parts = within_row_limit(group, Some(3000));
        assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), vec![27, 13]);
        let order: Vec<String> = parts
            .iter()
            .flatten()
            .map(|c| c.request.idempotency_key.clone())
            .collect();
        assert_eq!(order, keys, "in the order they came");
        // Products of their own: 205 rows per checkout, 14 fit; a checkout alone always fits.
        let own: Vec<Checkout> = (0..20)
            .map(|_| big_checkout(&(0..100).map(|_| ProductId::new()).collect::<Vec<_>>()))
            .collect();
        let parts = within_row_limit(own, Some(3000));
        assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), vec![14, 6]);
        assert_eq!(within_row_limit(vec![big_checkout(&shared)], Some(10)).len(), 1);
    }

    #[test]
    fn each_checkout_sees_what_the_ones_before_it_left() {
        let product = ProductId::new();
        let level = StockLevel {
            product_id: product,
            price: Money::from_minor(250).unwrap(),
            available: 5,
        };
        let group = [request(product, 3), request(product, 3), request(product, 2)];
        let outcomes = allocate(&group, vec![level]);
        assert!(outcomes[0].is_ok());
        // 2 left: the second (3) is short, the third (2) still fits.
        assert!(matches!(&outcomes[1], Err(CartRejection::InsufficientStock(s)) if s[0].available == 2));
        let third = outcomes[2].as_ref().unwrap();
        assert_eq!(third.total.minor(), 500);
        let accepted: Vec<&Order> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        assert_eq!(reservations(accepted), vec![(product.as_uuid(), 5)]);
        // The write must still find 5 units (3 + 2), the price charged, and no more than 5
        // available (or the second checkout's refusal would no longer hold).
        assert_eq!(
            stock_checks(&[level], &outcomes),
            vec![StockCheck {
                product: product.as_uuid(),
                units: 5,
                price: Some(250),
                at_most: Some(5),
            }]
        );
    }

    #[test]
    fn a_group_is_priced_against_each_products_latest_read() {
        let (lamp, desk) = (ProductId::new(), ProductId::new());
        let level = |product, available| StockLevel {
            product_id: product,
            price: Money::from_minor(100).unwrap(),
            available,
        };
        let checkout = |stock| Checkout {
            request: request(lamp, 1),
            lock_token: Uuid::nil(),
            stock,
        };
        let group = [
            checkout(vec![level(lamp, 9), level(desk, 4)]),
            checkout(vec![level(lamp, 7)]),
        ];
        let mut levels = latest_levels(&group);
        levels.sort_by_key(|l| l.available);
        assert_eq!(levels, vec![level(desk, 4), level(lamp, 7)]);
    }
}
