//! Orders, carts and the order state machine.
//!
//! A cart is what the client asks for (product + quantity); prices never come from the client.
//! The store prices it from the catalog inside the placing transaction, using [`price_lines`].

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ids::{CustomerId, OrderId, ProductId};
use super::money::{Currency, Money};
use super::shipping::ShippingAddress;
use super::validation::FieldErrors;

pub const MAX_LINES: usize = 100;
pub const MAX_QUANTITY: u32 = 1000;
pub const PAYMENT_TOKEN_MAX: usize = 255;
/// [`PaymentToken::parse`]'s character rule as the regular expression the API schema publishes.
pub const PAYMENT_TOKEN_PATTERN: &str = "^[!-~]+$";

/// Where an order is in its life. Every legal move is listed in [`OrderStatus::can_become`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Accepted, stock reserved, payment not yet taken.
    PendingPayment,
    /// Payment authorized (or captured): stock is committed next, then the goods ship.
    Paid,
    /// Every unit has shipped (or, with `--fulfilment auto`, handed to fulfilment). Partial
    /// refunds leave it here.
    Fulfilled,
    /// Declined, expired, cancelled by the customer or refunded; terminal.
    Cancelled,
    /// A fulfilled order whose captured payment was refunded in full; terminal.
    Refunded,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 5] = [
        OrderStatus::PendingPayment,
        OrderStatus::Paid,
        OrderStatus::Fulfilled,
        OrderStatus::Cancelled,
        OrderStatus::Refunded,
    ];

    /// The one place that says which transitions are legal.
    pub fn can_become(self, next: OrderStatus) -> bool {
        use OrderStatus::*;
        matches!(
            (self, next),
            (PendingPayment, Paid)
                | (PendingPayment, Cancelled)
                | (Paid, Fulfilled)
                | (Paid, Cancelled)
                | (Fulfilled, Refunded)
        )
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            OrderStatus::Fulfilled | OrderStatus::Cancelled | OrderStatus::Refunded
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::PendingPayment => "pending_payment",
            OrderStatus::Paid => "paid",
            OrderStatus::Fulfilled => "fulfilled",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Refunded => "refunded",
        }
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OrderStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OrderStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| format!("unknown order status `{s}`"))
    }
}

/// A line quantity: 1 to [`MAX_QUANTITY`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Quantity(u32);

impl Quantity {
    pub fn parse(value: i64) -> Result<Self, String> {
        if !(1..=i64::from(MAX_QUANTITY)).contains(&value) {
            return Err(format!("must be a whole number from 1 to {MAX_QUANTITY}"));
        }
        Ok(Quantity(value as u32))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

/// An opaque payment-method token (a sandbox test token or a provider's token). Never card data.
/// A credential all the same: `Debug` does not show it, so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PaymentToken(String);

impl std::fmt::Debug for PaymentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PaymentToken(***)")
    }
}

impl PaymentToken {
    /// The token used when an order names no payment: the sandbox's approving card.
    pub fn default_sandbox() -> Self {
        PaymentToken("tok_visa".into())
    }

    pub fn parse(value: &str) -> Result<Self, String> {
        if value.is_empty() || value.len() > PAYMENT_TOKEN_MAX {
            return Err(format!("must be 1 to {PAYMENT_TOKEN_MAX} characters"));
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be printable ASCII without spaces".into());
        }
        Ok(PaymentToken(value.to_string()))
    }

    /// A Stripe PaymentMethod id: `pm_` and letters, digits or underscores.
    pub fn parse_method(value: &str) -> Result<Self, String> {
        let token = Self::parse(value)?;
        let rest = value.strip_prefix("pm_").unwrap_or_default();
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err("must be a Stripe PaymentMethod id: pm_ followed by letters, digits or _".into());
        }
        Ok(token)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CartLine {
    pub product_id: ProductId,
    pub quantity: Quantity,
}

/// A validated cart: 1 to [`MAX_LINES`] lines, each product at most once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cart {
    lines: Vec<CartLine>,
}

impl Cart {
    /// Builds a cart from already-parsed lines, reporting size and duplicate problems under
    /// `/items`. Duplicates are rejected rather than merged, so a client bug is not silently
    /// turned into a larger order.
    pub fn new(lines: Vec<CartLine>) -> Result<Self, FieldErrors> {
        let mut errors = FieldErrors::new();
        if lines.is_empty() || lines.len() > MAX_LINES {
            errors.add("/items", format!("must contain 1 to {MAX_LINES} items"));
        }
        for error in Self::duplicates(&lines).into_vec() {
            errors.add(error.field, error.message);
        }
        errors.finish(|| Cart { lines })
    }

    /// Every line naming a product an earlier line already named.
    pub fn duplicates(lines: &[CartLine]) -> FieldErrors {
        let mut errors = FieldErrors::new();
        let mut seen = HashSet::new();
        for (index, line) in lines.iter().enumerate() {
            if !seen.insert(line.product_id) {
                errors.add(
                    format!("/items/{index}/product_id"),
                    "appears more than once; send one line per product with the total quantity",
                );
            }
        }
        errors
    }

    pub fn lines(&self) -> &[CartLine] {
        &self.lines
    }

    /// Lines ordered by product id: the global lock order that keeps multi-item orders from
    /// deadlocking each other.
    pub fn lines_in_lock_order(&self) -> Vec<CartLine> {
        let mut lines = self.lines.clone();
        lines.sort_by_key(|line| line.product_id);
        lines
    }
}

/// What the catalog says about one product at the moment of reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StockLevel {
    pub product_id: ProductId,
    pub price: Money,
    pub available: i64,
}

/// A line the catalog cannot fill.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shortage {
    pub product_id: ProductId,
    pub requested: u32,
    pub available: i64,
}

/// Why a cart cannot become an order. Nothing is reserved when any line fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CartRejection {
    UnknownProducts(Vec<ProductId>),
    InsufficientStock(Vec<Shortage>),
    UnknownCustomer(CustomerId),
}

/// Prices a cart against current stock levels (in cart order). Every unknown product and every
/// short line is reported, not just the first.
pub fn price_lines(cart: &Cart, levels: &[StockLevel]) -> Result<(Vec<OrderLine>, Money), CartRejection> {
    let find = |id| levels.iter().find(|level| level.product_id == id);
    let unknown: Vec<_> = cart
        .lines()
        .iter()
        .filter(|line| find(line.product_id).is_none())
        .map(|line| line.product_id)
        .collect();
    if !unknown.is_empty() {
        return Err(CartRejection::UnknownProducts(unknown));
    }
    let mut shortages = Vec::new();
    let mut lines = Vec::with_capacity(cart.lines().len());
    let mut total = Money::ZERO;
    for line in cart.lines() {
        let level = find(line.product_id).expect("checked above");
        let requested = line.quantity.get();
        if level.available < i64::from(requested) {
            shortages.push(Shortage {
                product_id: line.product_id,
                requested,
                available: level.available.max(0),
            });
            continue;
        }
        // Bounded: price <= MAX_MINOR (1e13), quantity <= 1000, lines <= 100 → < 1e18 < i64::MAX.
        let line_total = level.price.checked_mul(requested).expect("bounded by field limits");
        total = total.checked_add(line_total).expect("bounded by field limits");
        lines.push(OrderLine {
            product_id: line.product_id,
            quantity: line.quantity,
            unit_price: level.price,
        });
    }
    if !shortages.is_empty() {
        return Err(CartRejection::InsufficientStock(shortages));
    }
    Ok((lines, total))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub product_id: ProductId,
    pub quantity: Quantity,
    pub unit_price: Money,
}

/// An order as stored. Its JSON form (serde) is also the idempotency snapshot, so a replayed
/// response is rendered from exactly what the first response was rendered from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: OrderId,
    pub customer_id: CustomerId,
    pub status: OrderStatus,
    pub currency: Currency,
    pub lines: Vec<OrderLine>,
    pub total: Money,
    pub payment_token: PaymentToken,
    /// Where the order ships, as given at checkout; `None` for an order placed without one.
    /// Absent from the JSON when `None`, so snapshots stored before addresses existed decode,
    /// and replay, exactly as they were first answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipping: Option<ShippingAddress>,
    /// The id of the request that placed the order, carried by its events, jobs, provider calls,
    /// e-mails and log lines: the key to the order's whole story.
    pub correlation_id: Option<String>,
    /// The `--region` of the process that accepted the order; `None` when it had none. Absent
    /// from the JSON when `None`, so snapshots stored before regions existed replay unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One entry of an order's timeline (I7: appended in the same transaction as the change).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderEvent {
    pub kind: String,
    pub status: OrderStatus,
    pub detail: Option<String>,
    pub at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: ProductId, quantity: i64) -> CartLine {
        CartLine {
            product_id: id,
            quantity: Quantity::parse(quantity).unwrap(),
        }
    }

    #[test]
    fn transitions_are_explicit() {
        use OrderStatus::*;
        let legal: Vec<_> = OrderStatus::ALL
            .iter()
            .flat_map(|from| OrderStatus::ALL.iter().map(move |to| (*from, *to)))
            .filter(|(from, to)| from.can_become(*to))
            .collect();
        assert_eq!(
            legal,
            [
                (PendingPayment, Paid),
                (PendingPayment, Cancelled),
                (Paid, Fulfilled),
                (Paid, Cancelled),
                (Fulfilled, Refunded)
            ]
        );
        assert!(Fulfilled.is_terminal() && Cancelled.is_terminal() && Refunded.is_terminal());
        assert_eq!("paid".parse::<OrderStatus>(), Ok(Paid));
    }

    #[test]
    fn cart_rejects_duplicates_and_sizes() {
        let id = ProductId::new();
        let errors = Cart::new(vec![line(id, 1), line(id, 2)]).unwrap_err();
        assert_eq!(errors.as_slice()[0].field, "/items/1/product_id");
        assert!(Cart::new(vec![]).is_err());
        let many = (0..=MAX_LINES).map(|_| line(ProductId::new(), 1)).collect();
        assert!(Cart::new(many).is_err());
        assert!(Quantity::parse(0).is_err() && Quantity::parse(1001).is_err());
    }

    /// The idempotency snapshot of an order placed before addresses existed has no `shipping`
    /// member: it decodes as an order without one, and such an order encodes exactly as before.
    #[test]
    fn snapshots_without_an_address_decode_and_encode_as_before() {
        let order = Order {
            id: OrderId::new(),
            customer_id: CustomerId::new(),
            status: OrderStatus::PendingPayment,
            currency: Currency::USD,
            lines: vec![OrderLine {
                product_id: ProductId::new(),
                quantity: Quantity::parse(2).unwrap(),
                unit_price: Money::from_minor(1999).unwrap(),
            }],
            total: Money::from_minor(3998).unwrap(),
            payment_token: PaymentToken::default_sandbox(),
            shipping: None,
            correlation_id: Some("c-1".into()),
            region: None,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        };
        let encoded = serde_json::to_value(&order).unwrap();
        let members: Vec<&str> = encoded.as_object().unwrap().keys().map(String::as_str).collect();
        assert!(
            !members.contains(&"shipping") && !members.contains(&"region"),
            "{members:?}"
        );
        assert_eq!(serde_json::from_value::<Order>(encoded).unwrap(), order);

        let shipped = Order {
            shipping: Some(ShippingAddress {
                name: "Jane Doe".into(),
                line1: "1 Main St".into(),
                line2: None,
                city: "Springfield".into(),
                region: None,
                postal_code: "62701".into(),
                country: super::super::shipping::CountryCode::parse("US").unwrap(),
            }),
            ..order.clone()
        };
        let text = serde_json::to_string(&shipped).unwrap();
        assert_eq!(serde_json::from_str::<Order>(&text).unwrap(), shipped);
    }

    #[test]
    fn pricing_reports_every_problem() {
        let (a, b, c) = (ProductId::new(), ProductId::new(), ProductId::new());
        let cart = Cart::new(vec![line(a, 2), line(b, 5), line(c, 1)]).unwrap();
        let level = |id, price, available| StockLevel {
            product_id: id,
            price: Money::from_minor(price).unwrap(),
            available,
        };

        let unknown = price_lines(&cart, &[level(a, 100, 10)]).unwrap_err();
        assert_eq!(unknown, CartRejection::UnknownProducts(vec![b, c]));

        let short = price_lines(&cart, &[level(a, 100, 1), level(b, 100, 4), level(c, 100, 1)]).unwrap_err();
        let CartRejection::InsufficientStock(shortages) = short else {
            panic!("expected shortages")
        };
        assert_eq!(shortages.len(), 2);
        assert_eq!((shortages[1].requested, shortages[1].available), (5, 4));

        let (lines, total) = price_lines(&cart, &[level(a, 1999, 10), level(b, 1, 5), level(c, 0, 1)]).unwrap();
        assert_eq!(total.minor(), 2 * 1999 + 5);
        assert_eq!(lines[0].unit_price.minor(), 1999);
    }
}
