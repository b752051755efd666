//! Order routes: the checkout commitment (POST /orders, answered 202) and reading an order back.

use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
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
    Cart, CartLine, CartRejection, Currency, CustomerId, FieldErrors, Order, OrderEvent, OrderId, OrderStatus,
    PaymentToken, ProductId, Quantity,
};
use crate::store::PlaceOrderOutcome;
use crate::workflow::CHARGE_PAYMENT;
use crate::workflow::checkout::{self, CheckoutRequest};
use crate::workflow::steps::{CancelOutcome, cancel_order};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/orders", post(place))
        .route("/orders/{id}", get(show))
        .route("/orders/{id}/cancel", post(cancel))
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
    #[serde(skip_serializing_if = "Option::is_none")]
    payment: Option<PaymentView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notifications: Option<Vec<NotificationView>>,
    /// The steps still to run (or parked), when the order is read back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pending_steps: Option<Vec<StepView>>,
}

#[derive(Serialize)]
struct PaymentView {
    state: String,
    provider: String,
    provider_reference: Option<String>,
    amount: serde_json::Number,
    /// Attempts of the payment step so far.
    attempts: i32,
    detail: Option<String>,
}

#[derive(Serialize)]
struct NotificationView {
    kind: String,
    state: String,
    sent_at: Option<DateTime<Utc>>,
}

#[derive(Serialize)]
struct StepView {
    step: String,
    /// `ready` (waiting to run or for a retry), `running`, or `dead` (parked until replayed).
    state: String,
    attempts: i32,
}

/// The pipeline's view of an order, for GET /orders/{id}.
struct Progress {
    payment: Option<crate::store::jobs::PaymentRecord>,
    payment_attempts: i32,
    notifications: Vec<crate::store::jobs::NotificationRecord>,
    steps: Vec<crate::store::JobSummary>,
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
            payment: None,
            notifications: None,
            pending_steps: None,
        }
    }

    fn with_progress(mut self, progress: Progress) -> Self {
        let currency = self.currency;
        self.payment = progress.payment.map(|p| PaymentView {
            amount: crate::domain::Money::from_minor(p.amount_minor)
                .unwrap_or_default()
                .to_json_number(currency),
            state: p.state,
            provider: p.provider,
            provider_reference: p.provider_ref,
            attempts: progress.payment_attempts,
            detail: p.detail,
        });
        self.notifications = Some(
            progress
                .notifications
                .into_iter()
                .map(|n| NotificationView {
                    kind: n.kind,
                    state: n.state,
                    sent_at: n.sent_at,
                })
                .collect(),
        );
        self.pending_steps = Some(
            progress
                .steps
                .into_iter()
                .filter(|job| job.state != "succeeded")
                .map(|job| StepView {
                    step: job.kind,
                    state: job.state,
                    attempts: job.attempts,
                })
                .collect(),
        );
        self
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
    let customer_id = body
        .customer_id
        .and_then(|id| errors.check("/customer_id", id.parse().map_err(|_| "must be a UUID".to_string())));
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
                        id.parse::<ProductId>().map_err(|_| "must be a UUID".to_string()),
                    ),
                };
                let quantity = match item.quantity {
                    None => {
                        errors.add(format!("/items/{index}/quantity"), "is required");
                        None
                    }
                    Some(quantity) => errors.check(&format!("/items/{index}/quantity"), Quantity::parse(quantity)),
                };
                if let (Some(product_id), Some(quantity)) = (product_id, quantity) {
                    lines.push(CartLine { product_id, quantity });
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
        Some(PaymentBody { token: Some(token) }) => errors.check("/payment/token", PaymentToken::parse(&token)),
    };
    let cart = if errors.is_empty() {
        Cart::new(lines).map_err(ApiError::validation)?
    } else {
        // Size and duplicate checks only make sense once every line parsed.
        return Err(ApiError::validation(errors));
    };
    Ok((customer_id, cart, payment_token.expect("no errors recorded")))
}

async fn place(
    State(state): State<AppState>,
    principal: Principal,
    Extension(correlation): Extension<CorrelationId>,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(body): ApiJson<PlaceOrderBody>,
) -> Result<Response, ApiError> {
    let (requested_customer, cart, payment_token) = parse_body(body)?;
    let customer_id = match (principal.is_admin(), requested_customer, principal.customer_id()) {
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
            return Err(ApiError::forbidden("customers may only place orders for themselves")
                .with_field("/customer_id", "must be your own customer id"));
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
                    ids.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
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
            format!("{} item(s) cannot be filled; nothing was reserved", shortages.len()),
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

/// Longest `Prefer: wait=N` honoured, in seconds.
const MAX_WAIT_SECS: u64 = 30;

/// `Prefer: wait=N` (RFC 7240): how long the client is willing to wait for a change.
fn preferred_wait(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    for value in headers.get_all("prefer").iter() {
        let Ok(text) = value.to_str() else { continue };
        for preference in text.split(',') {
            if let Some(seconds) = preference.trim().strip_prefix("wait=") {
                let seconds: u64 = seconds
                    .trim()
                    .parse()
                    .map_err(|_| ApiError::invalid_field("Prefer", "wait must be a whole number of seconds"))?;
                return Ok(Some(seconds.min(MAX_WAIT_SECS)));
            }
        }
    }
    Ok(None)
}

async fn show(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id: OrderId = path_id("id", &id)?;
    let wait = preferred_wait(&headers)?;
    let mut details = state
        .store
        .get_order(id)
        .await?
        .ok_or_else(|| ApiError::not_found("order"))?;
    if !principal.may_access(details.order.customer_id) {
        return Err(ApiError::not_found("order"));
    }
    if let Some(seconds) = wait {
        // Long-poll: answer as soon as the status moves from the one the client has now.
        let seen = details.order.status;
        let until = tokio::time::Instant::now() + std::time::Duration::from_secs(seconds);
        while details.order.status == seen && !seen.is_terminal() && tokio::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            details = state
                .store
                .get_order(id)
                .await?
                .ok_or_else(|| ApiError::not_found("order"))?;
        }
    }
    let steps = state.store.jobs_for_order(id).await?;
    let progress = Progress {
        payment: state.store.payment(id).await?,
        payment_attempts: steps
            .iter()
            .filter(|j| j.kind == CHARGE_PAYMENT)
            .map(|j| j.attempts)
            .sum(),
        notifications: state.store.notifications(id).await?,
        steps,
    };
    let view = OrderView::new(details.order, Some(details.events)).with_progress(progress);
    let mut response = private(Json(view));
    if let Some(seconds) = wait {
        if let Ok(value) = HeaderValue::from_str(&format!("wait={seconds}")) {
            response.headers_mut().insert("preference-applied", value);
        }
    }
    Ok(response)
}

/// POST /orders/{id}/cancel: owners until fulfilment, admins. 202 with the order; compensation
/// (refund if paid, stock released) runs as durable steps.
async fn cancel(
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
    let reason = if principal.is_admin() {
        "cancelled by an operator"
    } else {
        "cancelled by the customer"
    };
    if cancel_order(state.store.as_ref(), &state.saga, id, reason).await? == CancelOutcome::TooLate {
        return Err(ApiError::conflict(
            "order_not_cancellable",
            "the order has been fulfilled and can no longer be cancelled",
        ));
    }
    let details = state
        .store
        .get_order(id)
        .await?
        .ok_or_else(|| ApiError::not_found("order"))?;
    Ok(private((
        StatusCode::ACCEPTED,
        Json(OrderView::new(details.order, Some(details.events))),
    )))
}
