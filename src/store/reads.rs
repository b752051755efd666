//! Single-record reads, and order listings, written once for both backends
//! (numbered parameters work in SQLite too).

use uuid::Uuid;

use super::rows::{
    CUSTOMER_COLUMNS, CustomerRow, ORDER_COLUMNS, OrderEventRow, OrderItemRow, OrderRow, PRODUCT_COLUMNS, ProductRow,
};
use super::{OrderDetails, OrderQuery, StoreResult};
use crate::domain::{Customer, CustomerId, OrderEvent, OrderId, Product, ProductId};

pub(super) async fn get_product<DB>(pool: &crate::store::DbPool<DB>, id: ProductId) -> StoreResult<Option<Product>>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    ProductRow: for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let row: Option<ProductRow> = sqlx::query_as(&format!("SELECT {PRODUCT_COLUMNS} FROM products WHERE id = $1"))
        .bind(id.as_uuid())
        .fetch_optional(pool)
        .await?;
    row.map(Product::try_from).transpose()
}

pub(super) async fn get_customer<DB>(pool: &crate::store::DbPool<DB>, id: CustomerId) -> StoreResult<Option<Customer>>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    CustomerRow: for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let row: Option<CustomerRow> = sqlx::query_as(&format!("SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id = $1"))
        .bind(id.as_uuid())
        .fetch_optional(pool)
        .await?;
    row.map(Customer::try_from).transpose()
}

/// An order with its lines and timeline.
pub(super) async fn get_order<DB>(pool: &crate::store::DbPool<DB>, id: OrderId) -> StoreResult<Option<OrderDetails>>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    OrderRow: for<'r> sqlx::FromRow<'r, DB::Row>,
    OrderItemRow: for<'r> sqlx::FromRow<'r, DB::Row>,
    OrderEventRow: for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let row: Option<OrderRow> = sqlx::query_as(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1"))
        .bind(id.as_uuid())
        .fetch_optional(pool)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let items: Vec<OrderItemRow> = sqlx::query_as(
        "SELECT order_id, product_id, quantity, unit_price_minor FROM order_items WHERE order_id = $1 ORDER BY line_no",
    )
    .bind(id.as_uuid())
    .fetch_all(pool)
    .await?;
    let events: Vec<OrderEventRow> =
        sqlx::query_as("SELECT kind, status, detail, created_at FROM order_events WHERE order_id = $1 ORDER BY id")
            .bind(id.as_uuid())
            .fetch_all(pool)
            .await?;
    Ok(Some(OrderDetails {
        order: row.into_order(&items)?,
        events: events
            .into_iter()
            .map(OrderEvent::try_from)
            .collect::<StoreResult<_>>()?,
    }))
}

/// The SELECT of an order listing (a customer's, or the operators' list of every order), newest first (ids are UUIDv7, so id order is
/// creation order), one row more than the page to tell whether another follows. Each backend
/// runs it on its read pool and attaches the lines.
pub(super) fn list_orders_query<'a, DB>(query: &OrderQuery) -> sqlx::QueryBuilder<'a, DB>
where
    DB: sqlx::Database,
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut sql = sqlx::QueryBuilder::new(format!("SELECT {ORDER_COLUMNS} FROM orders WHERE 1 = 1"));
    if let Some(customer) = query.customer {
        sql.push(" AND customer_id = ").push_bind(customer.as_uuid());
    }
    if let Some(status) = query.status {
        sql.push(" AND status = ").push_bind(status.as_str().to_string());
    }
    if let Some(before) = query.before {
        sql.push(" AND id < ").push_bind(before.as_uuid());
    }
    sql.push(" ORDER BY id DESC LIMIT ")
        .push_bind(i64::from(query.limit) + 1);
    sql
}
