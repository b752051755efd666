//! Order routes: the checkout commitment (POST /orders, answered 202) and reading an order back.

use axum::extract::{Extension, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::auth::Principal;
use super::correlation::CorrelationId;
use super::error::ApiError;
use super::extract::{ApiJson, IdempotencyKey, path_id};
use super::{AppState, private};
use crate::domain::{
    Cart, CartLine, CartRejection, Currency, CustomerId, FieldErrors, Order, OrderEvent, OrderId,
    OrderStatus, PaymentToken, ProductId, Quantity,
};
use crate::store::PlaceOrderOutcome;
use crate::workflow::checkout::{self, CheckoutRequest};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/orders", post(place))
        .route("/orders/{id}", get(show))
}

#[derive(Serialize)]
struct LineView {
    product_id: ProductId,
    quantity: Quantity,
    unit_price: serde_json::Number,
    line_total: serde_json::Number,
}

#[derive(Serialize)]
struct EventView {
    kind: String,
    status: OrderStatus,
    detail: Option<String>,
    at: DateTime<Utc>,
}

/// How an order is shown. The POST answer and its idempotent replays are rendered from the same
/// stored snapshot by this one function, so they are byte-for-byte equal.
#[derive(Serialize)]
pub struct OrderView {
    order_id: OrderId,
    customer_id: CustomerId,
    status: OrderStatus,
    items: Vec<LineView>,
    total_amount: serde_json::Number,
    currency: Currency,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeline: Option<Vec<EventView>>,
}

impl OrderView {
    pub fn new(order: Order, events: Option<Vec<OrderEvent>>) -> Self {
        let currency = order.currency;
        Self {
            order_id: order.id,
            customer_id: order.customer_id,
            status: order.status,
            items: order
                .lines
                .iter()
                .map(|line| LineView {
                    product_id: line.product_id,
                    quantity: line.quantity,
                    unit_price: line.unit_price.to_json_number(currency),
                    line_total: line
                        .unit_price
                        .checked_mul(line.quantity.get())
                        .expect("bounded by field limits")
                        .to_json_number(currency),
                })
                .collect(),
            total_amount: order.total.to_json_number(currency),
            currency,
            created_at: order.created_at,
            updated_at: order.updated_at,
            timeline: events.map(|events| {
                events
                    .into_iter()
                    .map(|e| EventView {
                        kind: e.kind,
                        status: e.status,
                        detail: e.detail,
                        at: e.at,
                    })
                    .collect()
            }),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlaceOrderBody {
    customer_id: Option<String>,
    items: Option<Vec<ItemBody>>,
    payment: Option<PaymentBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemBody {
    product_id: Option<String>,
    quantity: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PaymentBody {
    token: Option<String>,
}

/// Validates the body into a cart and payment token, reporting every bad field at once.
fn parse_body(body: PlaceOrderBody) -> Result<(Option<CustomerId>, Cart, PaymentToken), ApiError> {
    let mut errors = FieldErrors::new();
    let customer_id = body.customer_id.and_then(|id| {
        errors.check(
            "/customer_id",
            id.parse().map_err(|_| "must be a UUID".to_string()),
        )
    });
    let mut lines = Vec::new();
    match body.items {
        None => errors.add("/items", "is required"),
        Some(items) => {
            for (index, item) in items.into_iter().enumerate() {
                let product_id = match item.product_id {
                    None => {
                        errors.add(format!("/items/{index}/product_id"), "is required");
                        None
                    }
                    Some(id) => errors.check(
                        &format!("/items/{index}/product_id"),
                        id.parse::<ProductId>()
                            .map_err(|_| "must be a UUID".to_string()),
                    ),
                };
                let quantity = match item.quantity {
                    None => {
                        errors.add(format!("/items/{index}/quantity"), "is required");
                        None
                    }
                    Some(quantity) => errors.check(
                        &format!("/items/{index}/quantity"),
                        Quantity::parse(quantity),
                    ),
                };
                if let (Some(product_id), Some(quantity)) = (product_id, quantity) {
                    lines.push(CartLine {
                        product_id,
                        quantity,
                    });
                }
            }
        }
    }
    let payment_token = match body.payment {
        None => Some(PaymentToken::default_sandbox()),
        Some(PaymentBody { token: None }) => {
            errors.add("/payment/token", "is required when payment is given");
            None
        }
        Some(PaymentBody { token: Some(token) }) => {
            errors.check("/payment/token", PaymentToken::parse(&token))
        }
    };
    let cart = if errors.is_empty() {
        Cart::new(lines).map_err(ApiError::validation)?
    } else {
        // Size and duplicate checks only make sense once every line parsed.
        return Err(ApiError::validation(errors));
    };
    Ok((
        customer_id,
        cart,
        payment_token.expect("no errors recorded"),
    ))
}

async fn place(
    State(state): State<AppState>,
    principal: Principal,
    Extension(correlation): Extension<CorrelationId>,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(body): ApiJson<PlaceOrderBody>,
) -> Result<Response, ApiError> {
    let (requested_customer, cart, payment_token) = parse_body(body)?;
    let customer_id = match (
        principal.is_admin(),
        requested_customer,
        principal.customer_id(),
    ) {
        (true, Some(customer), _) => customer,
        (true, None, _) => {
            return Err(ApiError::invalid_field(
                "/customer_id",
                "is required when an admin places an order",
            ));
        }
        (false, None, Some(own)) => own,
        (false, Some(customer), Some(own)) if customer == own => own,
        (false, Some(_), _) => {
            return Err(
                ApiError::forbidden("customers may only place orders for themselves")
                    .with_field("/customer_id", "must be your own customer id"),
            );
        }
        (false, None, None) => {
            return Err(ApiError::forbidden(
                "this token's subject is not a customer id (UUID), so it cannot place orders",
            ));
        }
    };
    let request = CheckoutRequest {
        principal: principal.subject,
        idempotency_key: key,
        customer_id,
        cart,
        payment_token,
        correlation_id: Some(correlation.0),
    };
    match checkout::place_order(state.store.clone(), &state.checkout, request).await? {
        PlaceOrderOutcome::Created(order) => Ok(accepted(order, false)),
        PlaceOrderOutcome::Replayed(order) => Ok(accepted(order, true)),
        PlaceOrderOutcome::KeyReused => Err(ApiError::unprocessable(
            "idempotency_key_reused",
            "Idempotency key reused",
            "this Idempotency-Key was already used with a different request; use a new key for a new checkout",
        )),
        PlaceOrderOutcome::KeyInUse => Err(ApiError::conflict(
            "idempotency_key_in_use",
            "a request with this Idempotency-Key is still being processed; retry after it finishes",
        )),
        PlaceOrderOutcome::Rejected(rejection) => Err(rejected(rejection)),
    }
}

fn accepted(order: Order, replayed: bool) -> Response {
    let location = format!("/orders/{}", order.id);
    let mut response = private((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(OrderView::new(order, None)),
    ));
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

fn rejected(rejection: CartRejection) -> ApiError {
    match rejection {
        CartRejection::UnknownProducts(ids) => {
            let mut error = ApiError::unprocessable(
                "unknown_product",
                "Unknown product",
                format!(
                    "no such product: {}",
                    ids.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
            .with_extra(json!({ "product_ids": ids }));
            for id in &ids {
                error = error.with_field("/items", format!("unknown product {id}"));
            }
            error
        }
        CartRejection::InsufficientStock(shortages) => ApiError::unprocessable(
            "insufficient_stock",
            "Insufficient stock",
            format!(
                "{} item(s) cannot be filled; nothing was reserved",
                shortages.len()
            ),
        )
        .with_extra(json!({ "items": shortages })),
        CartRejection::UnknownCustomer(id) => ApiError::unprocessable(
            "unknown_customer",
            "Unknown customer",
            format!("customer {id} does not exist; create it with POST /customers first"),
        )
        .with_field("/customer_id", "no such customer"),
    }
}

async fn show(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: OrderId = path_id("id", &id)?;
    let details = state
        .store
        .get_order(id)
        .await?
        .ok_or_else(|| ApiError::not_found("order"))?;
    if !principal.may_access(details.order.customer_id) {
        return Err(ApiError::not_found("order"));
    }
    Ok(private(Json(OrderView::new(
        details.order,
        Some(details.events),
    ))))
}
