//! Row shapes shared by both backends (sqlx's `FromRow` derive is generic over the database) and
//! their conversion into domain values, written once. Column lists are shared too, so the two
//! dialects' queries select the same things.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{StoreError, StoreResult};
use crate::domain::{
    Customer, CustomerId, Email, Money, Order, OrderEvent, OrderId, OrderLine, PaymentToken, Product, ProductId,
    Quantity, ShippingAddress,
};

pub const PRODUCT_COLUMNS: &str = "id, sku, name, description, category, price_minor, on_hand, \
     reserved, version, created_at, updated_at";
pub const CUSTOMER_COLUMNS: &str = "id, email, first_name, last_name, created_at";
pub const ORDER_COLUMNS: &str = "id, customer_id, status, currency, total_minor, payment_token, shipping, \
     correlation_id, region, created_at, updated_at";

#[derive(sqlx::FromRow)]
pub struct ProductRow {
    id: Uuid,
    sku: Option<String>,
    name: String,
    description: Option<String>,
    category: Option<String>,
    price_minor: i64,
    on_hand: i64,
    reserved: i64,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<ProductRow> for Product {
    type Error = StoreError;
    fn try_from(row: ProductRow) -> StoreResult<Self> {
        Ok(Product {
            id: ProductId::from_uuid(row.id),
            sku: row.sku,
            name: row.name,
            description: row.description,
            category: row.category,
            price: Money::from_minor(row.price_minor).map_err(corrupt("products.price_minor"))?,
            on_hand: row.on_hand,
            reserved: row.reserved,
            version: row.version,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub struct CustomerRow {
    id: Uuid,
    email: String,
    first_name: String,
    last_name: String,
    created_at: DateTime<Utc>,
}

impl TryFrom<CustomerRow> for Customer {
    type Error = StoreError;
    fn try_from(row: CustomerRow) -> StoreResult<Self> {
        Ok(Customer {
            id: CustomerId::from_uuid(row.id),
            email: Email::parse(&row.email).map_err(corrupt("customers.email"))?,
            first_name: row.first_name,
            last_name: row.last_name,
            created_at: row.created_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub struct OrderRow {
    pub id: Uuid,
    customer_id: Uuid,
    status: String,
    currency: String,
    total_minor: i64,
    payment_token: String,
    /// The [`ShippingAddress`] as JSON (migration 0005), NULL when the order has none.
    shipping: Option<String>,
    correlation_id: Option<String>,
    /// The accepting process's region (migration 0013), NULL when it had none.
    region: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
pub struct OrderItemRow {
    pub order_id: Uuid,
    pub product_id: Uuid,
    pub quantity: i32,
    unit_price_minor: i64,
}

#[derive(sqlx::FromRow)]
pub struct OrderEventRow {
    kind: String,
    status: String,
    detail: Option<String>,
    created_at: DateTime<Utc>,
}

impl OrderRow {
    pub fn status(&self) -> &str {
        &self.status
    }

    pub fn correlation_id(&self) -> Option<&str> {
        self.correlation_id.as_deref()
    }

    /// Assembles the order from its row and its item rows (items of other orders are ignored).
    pub fn into_order(self, items: &[OrderItemRow]) -> StoreResult<Order> {
        let lines = items
            .iter()
            .filter(|item| item.order_id == self.id)
            .map(|item| {
                Ok(OrderLine {
                    product_id: ProductId::from_uuid(item.product_id),
                    quantity: Quantity::parse(i64::from(item.quantity)).map_err(corrupt("order_items.quantity"))?,
                    unit_price: Money::from_minor(item.unit_price_minor)
                        .map_err(corrupt("order_items.unit_price_minor"))?,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(Order {
            id: OrderId::from_uuid(self.id),
            customer_id: CustomerId::from_uuid(self.customer_id),
            status: self.status.parse().map_err(corrupt("orders.status"))?,
            currency: self.currency.parse().map_err(corrupt("orders.currency"))?,
            lines,
            total: Money::from_minor(self.total_minor).map_err(corrupt("orders.total_minor"))?,
            payment_token: PaymentToken::parse(&self.payment_token).map_err(corrupt("orders.payment_token"))?,
            shipping: self
                .shipping
                .map(|json| serde_json::from_str(&json).map_err(|e| corrupt("orders.shipping")(e.to_string())))
                .transpose()?,
            correlation_id: self.correlation_id,
            region: self.region,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

impl TryFrom<OrderEventRow> for OrderEvent {
    type Error = StoreError;
    fn try_from(row: OrderEventRow) -> StoreResult<Self> {
        Ok(OrderEvent {
            kind: row.kind,
            status: row.status.parse().map_err(corrupt("order_events.status"))?,
            detail: row.detail,
            at: row.created_at,
        })
    }
}

/// Assembles several orders from one query of orders and one of all their items.
pub fn assemble_orders(rows: Vec<OrderRow>, items: &[OrderItemRow]) -> StoreResult<Vec<Order>> {
    rows.into_iter().map(|row| row.into_order(items)).collect()
}

/// The stored idempotency snapshot of the first response.
pub fn decode_snapshot(body: &str) -> StoreResult<Order> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt(format!("idempotency_keys.response_body: {e}")))
}

/// The `orders.shipping` column: the address as JSON, NULL for none.
pub fn encode_shipping(shipping: Option<&ShippingAddress>) -> Option<String> {
    shipping.map(|address| serde_json::to_string(address).expect("addresses always serialize"))
}

pub fn encode_snapshot(order: &Order) -> String {
    serde_json::to_string(order).expect("orders always serialize")
}

fn corrupt(column: &'static str) -> impl Fn(String) -> StoreError {
    move |message| StoreError::Corrupt(format!("{column}: {message}"))
}
