//! Order routes: the checkout commitment (POST /orders, answered 202) and reading an order back.

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::openapi::path::{Parameter, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Principal;
use super::correlation::CorrelationId;
use super::error::{ApiError, Problem};
use super::extract::{ApiJson, IdempotencyKey, optional_whole_number, parameter, path_id, product_quantity};
use super::fulfilment::{RefundView, ShipmentView};
use super::schema;
use super::{AppState, private};
use crate::domain::events::CancelReason;
use crate::domain::order::MAX_LINES;
use crate::domain::shipping;
use crate::domain::{
    Cart, CartLine, CartRejection, CountryCode, Currency, CustomerId, FieldErrors, Order, OrderEvent, OrderId,
    OrderStatus, PaymentToken, ProductId, Quantity, ShippingAddress,
};
use crate::store::PlaceOrderOutcome;
use crate::workflow::CHARGE_PAYMENT;
use crate::workflow::checkout::{self, CheckoutRequest};
use crate::workflow::steps::{CancelOutcome, cancel_order};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(place))
        .routes(routes!(show))
        .routes(routes!(cancel))
}

/// One line of an order, priced from the catalog when the order was placed.
#[derive(Serialize, ToSchema)]
#[schema(as = OrderLine)]
struct LineView {
    product_id: ProductId,
    quantity: Quantity,
    #[schema(schema_with = schema::money_ref)]
    unit_price: serde_json::Number,
    /// `unit_price × quantity`.
    #[schema(schema_with = schema::money_ref)]
    line_total: serde_json::Number,
}

/// One entry of the order's timeline.
#[derive(Serialize, ToSchema)]
#[schema(as = OrderEvent)]
struct EventView {
    /// What happened, e.g. `placed`, `payment_captured`, `cancelled`.
    kind: String,
    /// The order's status after it.
    status: OrderStatus,
    detail: Option<String>,
    at: DateTime<Utc>,
}

/// How an order is shown. The POST answer and its idempotent replays are rendered from the same
/// stored snapshot by this one function, so they are byte-for-byte equal.
#[derive(Serialize, ToSchema)]
#[schema(as = Order)]
pub struct OrderView {
    order_id: OrderId,
    customer_id: CustomerId,
    status: OrderStatus,
    items: Vec<LineView>,
    /// Sum of the line totals.
    #[schema(schema_with = schema::money_ref)]
    total_amount: serde_json::Number,
    currency: Currency,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    /// The `X-Correlation-Id` of the request that placed the order. Its events, pipeline steps,
    /// provider calls, e-mails and log lines carry the same id.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    correlation_id: Option<String>,
    /// The `--region` of the orderflow process that accepted the order; `null` when it was started
    /// without one.
    #[schema(required = true)]
    region: Option<String>,
    /// Where the order ships, as given at checkout; absent when the order was placed without an
    /// address.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    shipping: Option<ShippingAddress>,
    /// Every change, oldest first (GET /orders/{id} and cancellation answers).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    timeline: Option<Vec<EventView>>,
    /// The payment, once the payment step has recorded one (GET /orders/{id}).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    payment: Option<PaymentView>,
    /// E-mails about the order (GET /orders/{id}).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    notifications: Option<Vec<NotificationView>>,
    /// The steps still to run (or parked), when the order is read back.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pending_steps: Option<Vec<StepView>>,
    /// Shipments the warehouse recorded, oldest first (GET /orders/{id}).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    shipments: Option<Vec<ShipmentView>>,
    /// Refunds after delivery, oldest first (GET /orders/{id}).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    refunds: Option<Vec<RefundView>>,
}

/// The order's payment as the payment step recorded it.
#[derive(Serialize, ToSchema)]
#[schema(as = Payment)]
struct PaymentView {
    /// `requires_action`, `authorized`, `captured`, `voided`, `declined`, `partially_refunded` or
    /// `refunded`.
    state: String,
    provider: String,
    /// The provider's PaymentIntent id.
    provider_reference: Option<String>,
    /// The amount authorized (the order's total).
    #[schema(schema_with = schema::money_ref)]
    amount: serde_json::Number,
    #[schema(schema_with = schema::money_ref)]
    authorized_amount: serde_json::Number,
    /// Taken so far: 0 until the goods leave with `--capture on-shipment`.
    #[schema(schema_with = schema::money_ref)]
    captured_amount: serde_json::Number,
    #[schema(schema_with = schema::money_ref)]
    refunded_amount: serde_json::Number,
    /// For `requires_action`: what the customer's browser needs to finish 3-D Secure.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    client_secret: Option<String>,
    /// Attempts of the payment step so far.
    attempts: i32,
    detail: Option<String>,
}

/// An e-mail about the order.
#[derive(Serialize, ToSchema)]
#[schema(as = Notification)]
struct NotificationView {
    /// e.g. `order_confirmation`, `receipt`, `cancellation`.
    kind: String,
    state: String,
    sent_at: Option<DateTime<Utc>>,
}

/// A pipeline step of the order that has not succeeded yet.
#[derive(Serialize, ToSchema)]
#[schema(as = PendingStep)]
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
    shipments: Vec<crate::domain::fulfilment::Shipment>,
    refunds: Vec<crate::domain::fulfilment::Refund>,
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
            correlation_id: order.correlation_id,
            region: order.region,
            shipping: order.shipping,
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
            shipments: None,
            refunds: None,
        }
    }

    fn with_progress(mut self, progress: Progress) -> Self {
        let currency = self.currency;
        let money = |minor: i64| {
            crate::domain::Money::from_minor(minor)
                .unwrap_or_default()
                .to_json_number(currency)
        };
        self.payment = progress.payment.map(|p| PaymentView {
            amount: money(p.amount_minor),
            authorized_amount: money(p.amount_minor),
            captured_amount: money(p.captured_minor),
            refunded_amount: money(p.refunded_minor),
            client_secret: p.client_secret.filter(|_| p.state == "requires_action"),
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
        self.shipments = Some(progress.shipments.iter().map(ShipmentView::new).collect());
        self.refunds = Some(progress.refunds.iter().map(|r| RefundView::new(r, currency)).collect());
        self
    }
}

/// A checkout: what to buy, how to pay and where to ship it. Prices come from the catalog, never
/// from the client.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = PlaceOrder)]
struct PlaceOrderBody {
    /// Defaults to the token's customer (its `sub`, when that is a customer id); customers may
    /// only name themselves. An admin whose subject is not a customer id must give it.
    #[schema(schema_with = schema::optional_customer_id)]
    customer_id: Option<String>,
    /// One line per product (a product may not appear twice; send the total quantity).
    #[schema(schema_with = order_items, required = true)]
    items: Option<Vec<ItemBody>>,
    /// Defaults to the sandbox's approving `tok_visa`.
    #[schema(nullable)]
    payment: Option<PaymentBody>,
    /// Where to ship the order; leave it out (or `null`) for an order that ships nowhere.
    #[schema(nullable)]
    shipping: Option<ShippingBody>,
}

fn order_items() -> utoipa::openapi::schema::Array {
    schema::order_items(<ItemBody as utoipa::PartialSchema>::schema()).build()
}

/// One line of a checkout.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = PlaceOrderItem)]
struct ItemBody {
    #[schema(schema_with = schema::product_id_field, required = true)]
    product_id: Option<String>,
    #[serde(default, deserialize_with = "optional_whole_number")]
    #[schema(value_type = Quantity, required = true)]
    quantity: Option<i64>,
}

/// How to pay.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = PlaceOrderPayment)]
struct PaymentBody {
    /// A sandbox or Stripe card token (`tok_…`). Give this or `method`.
    #[schema(schema_with = schema::payment_token)]
    token: Option<String>,
    /// A Stripe PaymentMethod id (`pm_…`), e.g. from Stripe.js. Give this or `token`.
    #[schema(schema_with = schema::payment_method)]
    method: Option<String>,
}

/// A postal address to ship the order to. Every field is checked and every bad one reported,
/// under `/shipping/<field>`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = PlaceOrderShipping)]
struct ShippingBody {
    #[schema(schema_with = schema::shipping_name, required = true)]
    name: Option<String>,
    #[schema(schema_with = schema::address_line1, required = true)]
    line1: Option<String>,
    #[schema(schema_with = schema::address_line2)]
    line2: Option<String>,
    #[schema(schema_with = schema::city, required = true)]
    city: Option<String>,
    #[schema(schema_with = schema::region)]
    region: Option<String>,
    #[schema(schema_with = schema::postal_code, required = true)]
    postal_code: Option<String>,
    #[schema(value_type = CountryCode, required = true)]
    country: Option<String>,
}

/// Validates a shipping address field by field, recording each bad one in `errors` under
/// `/shipping/<field>` (in the order of the schema).
fn parse_shipping(body: ShippingBody, errors: &mut FieldErrors) -> Option<ShippingAddress> {
    fn required<T>(
        errors: &mut FieldErrors,
        name: &str,
        value: Option<String>,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let field = format!("/shipping/{name}");
        match value {
            None => {
                errors.add(field, "is required");
                None
            }
            Some(value) => errors.check(&field, parse(&value)),
        }
    }
    /// `Some(None)` when left out (or `null`), `None` when given and bad.
    fn optional(
        errors: &mut FieldErrors,
        name: &str,
        value: Option<String>,
        parse: impl Fn(&str) -> Result<String, String>,
    ) -> Option<Option<String>> {
        match value {
            None => Some(None),
            Some(value) => errors.check(&format!("/shipping/{name}"), parse(&value)).map(Some),
        }
    }
    let name = required(errors, "name", body.name, shipping::parse_recipient);
    let line1 = required(errors, "line1", body.line1, shipping::parse_address_line);
    let line2 = optional(errors, "line2", body.line2, shipping::parse_address_line);
    let city = required(errors, "city", body.city, shipping::parse_city);
    let region = optional(errors, "region", body.region, shipping::parse_region);
    let postal_code = required(errors, "postal_code", body.postal_code, shipping::parse_postal_code);
    let country = required(errors, "country", body.country, CountryCode::parse);
    Some(ShippingAddress {
        name: name?,
        line1: line1?,
        line2: line2?,
        city: city?,
        region: region?,
        postal_code: postal_code?,
        country: country?,
    })
}

/// Validates the body into a cart, payment token and shipping address, reporting every bad
/// field at once.
fn parse_body(
    body: PlaceOrderBody,
) -> Result<(Option<CustomerId>, Cart, PaymentToken, Option<ShippingAddress>), ApiError> {
    let mut errors = FieldErrors::new();
    let customer_id = body
        .customer_id
        .and_then(|id| errors.check("/customer_id", id.parse().map_err(|_| "must be a UUID".to_string())));
    let mut lines = Vec::new();
    match body.items {
        None => errors.add("/items", "is required"),
        Some(items) => {
            for (index, item) in items.into_iter().enumerate() {
                if let Some((product_id, quantity)) =
                    product_quantity(&mut errors, "/items", index, item.product_id, item.quantity)
                {
                    lines.push(CartLine { product_id, quantity });
                }
            }
        }
    }
    let payment_token = match body.payment {
        None => Some(PaymentToken::default_sandbox()),
        Some(PaymentBody {
            token: Some(token),
            method: None,
        }) => errors.check("/payment/token", PaymentToken::parse(&token)),
        Some(PaymentBody {
            token: None,
            method: Some(method),
        }) => errors.check("/payment/method", PaymentToken::parse_method(&method)),
        Some(PaymentBody {
            token: None,
            method: None,
        }) => {
            errors.add("/payment/token", "is required when payment is given (or give method)");
            None
        }
        Some(PaymentBody { .. }) => {
            errors.add("/payment/method", "give either token or method, not both");
            None
        }
    };
    let shipping = body.shipping.and_then(|shipping| parse_shipping(shipping, &mut errors));
    // A product named twice is well-formed JSON the schema cannot rule out (JSON Schema has no
    // uniqueness by member), so it is refused like the other cart rules, with 422.
    let duplicates = Cart::duplicates(&lines);
    if errors.is_empty() && !duplicates.is_empty() && (1..=MAX_LINES).contains(&lines.len()) {
        let mut error = ApiError::unprocessable(
            "duplicate_product",
            "Duplicate product",
            "a product appears on more than one line; send one line per product with the total quantity",
        );
        for duplicate in duplicates.into_vec() {
            error = error.with_field(duplicate.field, duplicate.message);
        }
        return Err(error);
    }
    let cart = if errors.is_empty() {
        Cart::new(lines).map_err(ApiError::validation)?
    } else {
        // Size and duplicate checks only make sense once every line parsed.
        return Err(ApiError::validation(errors));
    };
    Ok((customer_id, cart, payment_token.expect("no errors recorded"), shipping))
}

/// Place an order
///
/// Customers and admins. Reserves stock and records the order in one transaction, then answers
/// 202: payment, inventory commit, fulfilment and e-mails follow as durable steps (watch the
/// order with GET /orders/{id}). Nothing is reserved when any line fails.
#[utoipa::path(
    post,
    path = "/orders",
    operation_id = "placeOrder",
    tag = "orders",
    security(("bearer" = [])),
    params(IdempotencyKey),
    request_body = PlaceOrderBody,
    responses(
        (status = 202, description = "Accepted (or replayed: the first answer to this Idempotency-Key).", body = OrderView, headers(
            ("Location" = String, description = "`/orders/{id}` of the order."),
            ("Idempotent-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same key."),
            ("Cache-Control" = String, description = "`private, no-store`."),
        )),
        (status = 403, description = "A customer naming another customer, or a token whose subject is not a customer.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`idempotency_key_in_use`: the first request with this key is still running.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`unknown_product` (with `product_ids`), `insufficient_stock` (with `items`: requested and available per short line), `duplicate_product` (a product on two lines), `unknown_customer`, or `idempotency_key_reused` (same key, different body).", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn place(
    State(state): State<AppState>,
    principal: Principal,
    Extension(correlation): Extension<CorrelationId>,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(body): ApiJson<PlaceOrderBody>,
) -> Result<Response, ApiError> {
    let (requested_customer, cart, payment_token, shipping) = parse_body(body)?;
    let customer_id = match (principal.is_admin(), requested_customer, principal.customer_id()) {
        (true, Some(customer), _) => customer,
        // An operator who is also a customer (its subject is a customer id) orders for itself
        // by default, like any customer.
        (true, None, Some(own)) => own,
        (true, None, None) => {
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
        shipping,
        correlation_id: Some(correlation.0),
    };
    match checkout::place_order(state.store.clone(), &state.checkout, request).await? {
        PlaceOrderOutcome::Created(order) => {
            state.monitoring.metrics.order_placed(crate::workflow::CHARGE_PAYMENT);
            Ok(accepted(order, false))
        }
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
pub const MAX_WAIT_SECS: u64 = 30;

/// `Prefer: wait=N` on GET /orders/{id}.
struct LongPoll;

impl IntoParams for LongPoll {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![parameter(
            "Prefer",
            ParameterIn::Header,
            false,
            &format!(
                "`wait=N` (RFC 7240): answer as soon as the order's status changes from the one it has now, or \
                 after N seconds (at most {MAX_WAIT_SECS}; larger values are capped). Applied waits are echoed in \
                 `Preference-Applied`."
            ),
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(prefer_pattern()))
                .examples(["wait=10"]),
        )]
    }
}

/// Most digits of a `wait=N` preference.
const WAIT_DIGITS_MAX: usize = 9;

/// The characters of an HTTP token (RFC 9110 `tchar`).
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+.^_`|~-".contains(&b))
}

/// The `Prefer` header [`preferred_wait`] accepts, as the schema publishes it: comma-separated
/// preferences, each `wait=N` or another `token[=token|"quoted"]` (ignored, as RFC 7240 asks).
/// JSON Schema patterns have no look-ahead, so "a token other than `wait`" is spelled out: any
/// length but four, or four characters differing from `wait` in one place.
pub(super) fn prefer_pattern() -> String {
    let t = r"[!#$%&'*+.^_`|~0-9A-Za-z-]";
    let lowercase_except = |c: char| -> String {
        match c {
            'a' => "b-z".into(),
            'z' => "a-y".into(),
            c => format!("a-{}{}-z", (c as u8 - 1) as char, (c as u8 + 1) as char),
        }
    };
    let not = |c: char| format!(r"[!#$%&'*+.^_`|~0-9A-Z{}-]", lowercase_except(c));
    let other = format!(
        "({t}{{1,3}}|{t}{{5,}}|{w}{t}{{3}}|w{a}{t}{{2}}|wa{i}{t}|wai{z})",
        w = not('w'),
        a = not('a'),
        i = not('i'),
        z = not('t'),
    );
    let element = format!(r#"[ \t]*(wait=[0-9]{{1,{WAIT_DIGITS_MAX}}}|{other}(=({t}+|"[^",]*"))?)[ \t]*"#);
    format!("^{element}(,{element})*$")
}

/// `Prefer: wait=N` (RFC 7240): how long the client is willing to wait for a change. Other
/// preferences are ignored; a malformed header or `wait` is refused so the client learns its
/// wait was not understood.
pub(super) fn preferred_wait(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let invalid = || {
        ApiError::invalid_field(
            "Prefer",
            format!(
                "must be preferences such as `wait=N` (N a whole number of seconds, at most {WAIT_DIGITS_MAX} digits)"
            ),
        )
    };
    let mut wait = None;
    for value in headers.get_all("prefer").iter() {
        let text = value.to_str().map_err(|_| invalid())?;
        for preference in text.split(',') {
            let preference = preference.trim_matches([' ', '\t']);
            let (name, value) = match preference.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (preference, None),
            };
            if name == "wait" {
                let seconds = value
                    .filter(|v| (1..=WAIT_DIGITS_MAX).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(invalid)?;
                wait.get_or_insert(seconds.min(MAX_WAIT_SECS));
            } else {
                let quoted = |v: &str| {
                    v.len() >= 2 && v.starts_with('"') && v.ends_with('"') && !v[1..v.len() - 1].contains('"')
                };
                if !is_token(name) || !value.is_none_or(|v| is_token(v) || quoted(v)) {
                    return Err(invalid());
                }
            }
        }
    }
    Ok(wait)
}

/// Get an order
///
/// Owner or admin; another customer's order is 404. With items, totals, status, timeline,
/// payment, notifications and the steps still pending. `Prefer: wait=N` long-polls for a status
/// change.
#[utoipa::path(
    get,
    path = "/orders/{id}",
    operation_id = "getOrder",
    tag = "orders",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The order's id."), LongPoll),
    responses(
        (status = 200, description = "The order.", body = OrderView, headers(
            ("Preference-Applied" = String, description = "`wait=N` when a wait was honoured."),
            ("Cache-Control" = String, description = "`private, no-store`."),
        )),
        (status = 404, description = "No such order (or not yours).", body = Problem, content_type = "application/problem+json"),
    ),
)]
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
        shipments: state.store.after_sale().shipments(id).await?,
        refunds: state.store.after_sale().refunds(id).await?,
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

/// Cancel an order
///
/// Owner or admin, until the order is fulfilled. Answers 202 with the order; compensation
/// (refund if paid, stock released) runs as durable steps. Cancelling twice is harmless.
#[utoipa::path(
    post,
    path = "/orders/{id}/cancel",
    operation_id = "cancelOrder",
    tag = "orders",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The order's id.")),
    responses(
        (status = 202, description = "Cancelled (compensation under way).", body = OrderView, headers(
            ("Cache-Control" = String, description = "`private, no-store`."),
        )),
        (status = 404, description = "No such order (or not yours).", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`order_not_cancellable`: the order has been fulfilled, or some of its goods have shipped.", body = Problem, content_type = "application/problem+json"),
    ),
)]
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
        CancelReason::OperatorRequest
    } else {
        CancelReason::CustomerRequest
    };
    let outcome = cancel_order(state.store.as_ref(), &state.saga, id, reason).await?;
    state.monitoring.metrics.cancellation(outcome, principal.is_admin());
    if outcome == CancelOutcome::TooLate {
        return Err(ApiError::conflict(
            "order_not_cancellable",
            "the order has been fulfilled (or some of its goods have shipped) and can no longer be cancelled; \
             refund it instead",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(value: &str) -> Result<Option<u64>, u16> {
        let mut headers = HeaderMap::new();
        headers.insert("prefer", value.parse().unwrap());
        preferred_wait(&headers).map_err(|error| error.status().as_u16())
    }

    #[test]
    fn prefer_wait_is_read_and_other_preferences_ignored() {
        assert_eq!(wait("wait=10"), Ok(Some(10)));
        assert_eq!(wait(" respond-async , wait=5"), Ok(Some(5)));
        assert_eq!(wait("wait=999"), Ok(Some(MAX_WAIT_SECS)));
        assert_eq!(wait("handling=lenient"), Ok(None));
        assert_eq!(wait(r#"foo="a b""#), Ok(None));
        assert_eq!(wait("waits=x"), Ok(None));
        for bad in [
            "wait=soon",
            "wait",
            "wait=",
            "{}",
            "wait=1234567890",
            "a,,b",
            "wait = 5",
            r#"x="a,b""#,
        ] {
            assert_eq!(wait(bad), Err(400), "{bad}");
        }
    }

    #[test]
    fn prefer_pattern_spells_out_the_wait_rule() {
        let pattern = prefer_pattern();
        assert!(
            pattern.starts_with("^[ \\t]*(wait=[0-9]{1,9}|") && pattern.ends_with(")*$"),
            "{pattern}"
        );
        // "A token other than wait": four characters differing from `wait` in one place.
        assert!(pattern.contains("|w[!#$%&'*+.^_`|~0-9A-Zb-z-]"), "{pattern}");
    }
}
