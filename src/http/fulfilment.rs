//! After-sale routes: the warehouse records shipments (`--fulfilment external`), an operator
//! refunds a fulfilled order (in parts, with returned units restocked).
//!
//! Both need an Idempotency-Key (a warehouse retries after a timeout; a refund must never be
//! given twice): the key is kept on the shipment or refund row with a hash of the body, so a
//! retry answers the first result and creates nothing. Quantities and amounts are checked again
//! by the store under the order's lock ([`crate::store::after_sale`]); what is checked here is
//! only the shape of the request and the defaults (all unshipped units, all refundable money).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::auth::{Admin, Principal};
use super::error::{ApiError, Problem};
use super::extract::{ApiJson, IdempotencyKey, optional_whole_number, path_id, product_quantity};
use super::schema;
use super::{AppState, private};
use crate::clock;
use crate::domain::events::{EventType, NewEvent};
use crate::domain::fulfilment::{self, ItemQuantity, Refund, RefundReason, Shipment};
use crate::domain::{Currency, FieldErrors, Money, OrderId, ProductId, Quantity};
use crate::store::jobs::{CompleteOutcome, RefundDraft, Refusal, ShipmentDraft, StepEffects};
use crate::workflow::steps::step_job;
use crate::workflow::{FULFIL_ORDER, SETTLE_REFUND};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(record_shipment))
        .routes(routes!(request_refund))
}

/// The role a warehouse's (or 3PL's) token carries to record shipments.
pub const FULFILMENT_ROLE: &str = "fulfilment";

/// Units of one product.
#[derive(Serialize, ToSchema)]
#[schema(as = ItemQuantity)]
pub(super) struct ItemView {
    product_id: ProductId,
    quantity: u32,
}

fn item_views(items: &[ItemQuantity]) -> Vec<ItemView> {
    items
        .iter()
        .map(|item| ItemView {
            product_id: item.product_id,
            quantity: item.quantity,
        })
        .collect()
}

/// A shipment the warehouse recorded.
#[derive(Serialize, ToSchema)]
#[schema(as = Shipment)]
pub(super) struct ShipmentView {
    shipment_id: Uuid,
    items: Vec<ItemView>,
    carrier: String,
    tracking_number: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    tracking_url: Option<String>,
    created_at: DateTime<Utc>,
}

impl ShipmentView {
    pub(super) fn new(shipment: &Shipment) -> Self {
        Self {
            shipment_id: shipment.id,
            items: item_views(&shipment.items),
            carrier: shipment.carrier.clone(),
            tracking_number: shipment.tracking_number.clone(),
            tracking_url: shipment.tracking_url.clone(),
            created_at: shipment.created_at,
        }
    }
}

/// A refund of a fulfilled order.
#[derive(Serialize, ToSchema)]
#[schema(as = Refund)]
pub(super) struct RefundView {
    refund_id: Uuid,
    #[schema(schema_with = schema::money_ref)]
    amount: serde_json::Number,
    reason: RefundReason,
    /// `pending` (the refund step is giving it back) or `succeeded`.
    state: String,
    /// The provider's refund id, once it succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    provider_reference: Option<String>,
    /// Units returned to stock with it.
    restock: Vec<ItemView>,
    created_at: DateTime<Utc>,
}

impl RefundView {
    pub(super) fn new(refund: &Refund, currency: Currency) -> Self {
        Self {
            refund_id: refund.id,
            amount: Money::from_minor(refund.amount_minor)
                .unwrap_or_default()
                .to_json_number(currency),
            reason: refund.reason,
            state: refund.state.as_str().to_string(),
            provider_reference: refund.provider_ref.clone(),
            restock: item_views(&refund.restock),
            created_at: refund.created_at,
        }
    }
}

/// Units of one product in a request.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ItemQuantityInput)]
struct ItemBody {
    #[schema(schema_with = schema::product_id_field, required = true)]
    product_id: Option<String>,
    #[serde(default, deserialize_with = "optional_whole_number")]
    #[schema(value_type = Quantity, required = true)]
    quantity: Option<i64>,
}

/// Parses `items` (under `field`), each product once, reporting every bad entry.
fn parse_items(field: &str, items: Vec<ItemBody>, errors: &mut FieldErrors) -> Vec<ItemQuantity> {
    let mut parsed: Vec<ItemQuantity> = Vec::new();
    if items.is_empty() {
        errors.add(field, "must not be empty; leave it out to mean every unit");
    }
    for (index, item) in items.into_iter().enumerate() {
        let Some((product_id, quantity)) = product_quantity(errors, field, index, item.product_id, item.quantity)
        else {
            continue;
        };
        if parsed.iter().any(|seen| seen.product_id == product_id) {
            errors.add(
                format!("{field}/{index}/product_id"),
                "names a product already listed; send one entry per product",
            );
        } else {
            parsed.push(ItemQuantity {
                product_id,
                quantity: quantity.get(),
            });
        }
    }
    parsed
}

/// A hash of the request as understood, so the same key with another body is caught.
fn request_hash(normalized: serde_json::Value) -> String {
    hex::encode(Sha256::digest(normalized.to_string().as_bytes()))
}

/// The error for a refused shipment or refund.
fn refused(refusal: Refusal, currency: Currency) -> ApiError {
    let money = |minor: i64| {
        Money::from_minor(minor.max(0))
            .unwrap_or_default()
            .to_json_number(currency)
    };
    match refusal {
        Refusal::NotReadyToShip(status) => ApiError::conflict(
            "order_not_ready",
            format!(
                "the order is {status}; shipments are recorded once it is paid and its stock committed \
                 (the order.ready_to_ship event)"
            ),
        ),
        Refusal::NothingToShip => ApiError::unprocessable(
            "exceeds_unshipped",
            "Nothing left to ship",
            "every unit of this order has shipped already",
        )
        .with_extra(json!({ "items": [] })),
        Refusal::ExceedsUnshipped(lines) => {
            let mut error = ApiError::unprocessable(
                "exceeds_unshipped",
                "More than is unshipped",
                format!(
                    "{} item(s) ask for more units than are still unshipped; nothing was recorded",
                    lines.len()
                ),
            )
            .with_extra(
                json!({ "items": lines.iter().map(|(product, requested, unshipped)| json!({
                "product_id": product, "requested": requested, "unshipped": unshipped,
            })).collect::<Vec<_>>() }),
            );
            for (product, _, unshipped) in &lines {
                error = error.with_field("/items", format!("product {product}: {unshipped} unit(s) unshipped"));
            }
            error
        }
        Refusal::NotRefundable(status) => ApiError::conflict(
            "order_not_refundable",
            format!("the order is {status}; refunds are for fulfilled orders (cancel an order that has not shipped)"),
        ),
        Refusal::ExceedsRefundable {
            requested_minor,
            refundable_minor,
        } => ApiError::unprocessable(
            "exceeds_refundable",
            "More than is refundable",
            format!(
                "at most {} {currency} can still be refunded (captured, minus refunds given or under way)",
                money(refundable_minor)
            ),
        )
        .with_field("/amount", format!("must be at most {}", money(refundable_minor)))
        .with_extra(json!({ "requested": money(requested_minor), "refundable": money(refundable_minor) })),
        Refusal::ExceedsReturnable(lines) => {
            let mut error = ApiError::unprocessable(
                "exceeds_returnable",
                "More than was sold",
                format!(
                    "{} restock item(s) return more units than were sold and not yet returned",
                    lines.len()
                ),
            )
            .with_extra(
                json!({ "items": lines.iter().map(|(product, requested, returnable)| json!({
                "product_id": product, "requested": requested, "returnable": returnable,
            })).collect::<Vec<_>>() }),
            );
            for (product, _, returnable) in &lines {
                error = error.with_field(
                    "/restock",
                    format!("product {product}: {returnable} unit(s) returnable"),
                );
            }
            error
        }
        Refusal::KeyReused => ApiError::unprocessable(
            "idempotency_key_reused",
            "Idempotency key reused",
            "this Idempotency-Key was already used on this order with a different request; use a new key",
        ),
        Refusal::AlreadyShipped => {
            ApiError::conflict("order_not_cancellable", "some of the order's goods have shipped")
        }
    }
}

fn with_replayed(mut response: Response, replayed: bool) -> Response {
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// What a warehouse reports.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = RecordShipment)]
struct ShipmentBody {
    #[schema(schema_with = carrier, required = true)]
    carrier: Option<String>,
    #[schema(schema_with = tracking_number, required = true)]
    tracking_number: Option<String>,
    #[schema(schema_with = tracking_url)]
    tracking_url: Option<String>,
    /// What left in this parcel; leave it out for every unit not yet shipped.
    #[schema(nullable, min_items = 1)]
    items: Option<Vec<ItemBody>>,
}

fn carrier() -> utoipa::openapi::schema::Object {
    schema::single_line("The carrier, e.g. `DHL Express`.", fulfilment::CARRIER_MAX)
}

fn tracking_number() -> utoipa::openapi::schema::Object {
    schema::single_line("The carrier's tracking number.", fulfilment::TRACKING_NUMBER_MAX)
}

fn tracking_url() -> utoipa::openapi::schema::Object {
    schema::or_null(
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some("Where the customer follows the parcel: an absolute http(s) URL."))
            .min_length(Some(8))
            .max_length(Some(fulfilment::TRACKING_URL_MAX))
            .pattern(Some(
                r"^https?://[^/?#\s\u0000-\u001F\u007F-\u009F]+[^\s\u0000-\u001F\u007F-\u009F]*$",
            ))
            .build(),
    )
}

/// Record a shipment
///
/// Roles `fulfilment` (the warehouse) or `admin`; `--fulfilment external`. The order must be
/// paid with its stock committed (`order.ready_to_ship`). The first shipment captures the
/// payment (`--capture on-shipment`); when every unit has shipped the order becomes
/// `fulfilled`. Emits `order.shipped`.
#[utoipa::path(
    post,
    path = "/orders/{id}/shipments",
    operation_id = "recordShipment",
    tag = "fulfilment",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The order's id."), IdempotencyKey),
    request_body = ShipmentBody,
    responses(
        (status = 201, description = "Recorded (or replayed: the shipment first recorded with this Idempotency-Key).", body = ShipmentView, headers(
            ("Idempotent-Replayed" = String, description = "`true` when this is the shipment of an earlier request with the same key."),
        )),
        (status = 403, description = "Neither the `fulfilment` nor the `admin` role.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`order_not_ready`: not paid, or its stock not committed yet.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`exceeds_unshipped` (with `items`: requested and unshipped per product) or `idempotency_key_reused`.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn record_shipment(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(body): ApiJson<ShipmentBody>,
) -> Result<Response, ApiError> {
    if !principal.is_admin() && !principal.has_role(FULFILMENT_ROLE) {
        return Err(ApiError::forbidden(
            "recording shipments needs the fulfilment or the admin role",
        ));
    }
    let id: OrderId = path_id("id", &id)?;
    let mut errors = FieldErrors::new();
    let required = |errors: &mut FieldErrors, field: &str, value: Option<String>| {
        if value.is_none() {
            errors.add(field, "is required");
        }
        value
    };
    let carrier = required(&mut errors, "/carrier", body.carrier)
        .and_then(|c| errors.check("/carrier", fulfilment::parse_carrier(&c)));
    let tracking_number = required(&mut errors, "/tracking_number", body.tracking_number)
        .and_then(|t| errors.check("/tracking_number", fulfilment::parse_tracking_number(&t)));
    let tracking_url = match body.tracking_url {
        None => Some(None),
        Some(url) => errors
            .check("/tracking_url", fulfilment::parse_tracking_url(&url))
            .map(Some),
    };
    let items = body.items.map(|items| parse_items("/items", items, &mut errors));
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let (Some(carrier), Some(tracking_number), Some(tracking_url)) = (carrier, tracking_number, tracking_url) else {
        unreachable!("every bad field was recorded as an error")
    };
    let order = state
        .store
        .get_order(id)
        .await?
        .ok_or_else(|| ApiError::not_found("order"))?
        .order;
    let hash = request_hash(json!({
        "carrier": carrier, "tracking_number": tracking_number, "tracking_url": tracking_url, "items": items,
    }));
    let items = match items {
        Some(items) => items,
        // Every unit not yet shipped (checked again under the order's lock).
        None => {
            let shipped = state.store.after_sale().shipments(id).await?;
            fulfilment::remaining(
                fulfilment::ordered(&order.lines),
                shipped.iter().flat_map(|s| s.items.iter().copied()),
            )
            .into_iter()
            .filter(|&(_, left)| left > 0)
            .map(|(product_id, quantity)| ItemQuantity { product_id, quantity })
            .collect()
        }
    };
    let now = clock::now();
    let shipment = Shipment {
        id: Uuid::now_v7(),
        carrier,
        tracking_number,
        tracking_url,
        items,
        created_at: now,
    };
    let units: u32 = shipment.items.iter().map(|i| i.quantity).sum();
    let view = ShipmentView::new(&shipment);
    let effects = StepEffects {
        order_id: Some(id),
        events: vec![(
            "shipped".into(),
            Some(format!(
                "{units} unit(s) with {} ({})",
                shipment.carrier, shipment.tracking_number
            )),
        )],
        emit: vec![NewEvent::new(EventType::OrderShipped).with("shipment", json!(view))],
        // Captures with the first shipment; fulfils with the last.
        enqueue: vec![step_job(&state.saga, FULFIL_ORDER, id)],
        shipment: Some(ShipmentDraft {
            id: shipment.id,
            idempotency_key: key,
            request_hash: hash,
            carrier: shipment.carrier.clone(),
            tracking_number: shipment.tracking_number.clone(),
            tracking_url: shipment.tracking_url.clone(),
            items: shipment.items.clone(),
        }),
        ..Default::default()
    };
    let (view, replayed) = match state.store.complete_job(None, &effects, now).await? {
        CompleteOutcome::Completed => {
            state.monitoring.metrics.step_enqueued(FULFIL_ORDER, 1);
            (view, false)
        }
        CompleteOutcome::Replayed(first) => {
            let shipments = state.store.after_sale().shipments(id).await?;
            let first = shipments
                .iter()
                .find(|s| s.id == first)
                .ok_or_else(|| ApiError::internal("the replayed shipment vanished"))?;
            (ShipmentView::new(first), true)
        }
        CompleteOutcome::Refused(refusal) => return Err(refused(refusal, order.currency)),
        other => return Err(ApiError::internal(format!("unexpected outcome {other:?}"))),
    };
    let location = format!("/orders/{id}");
    Ok(with_replayed(
        private((StatusCode::CREATED, [(header::LOCATION, location)], Json(view))),
        replayed,
    ))
}

/// What to give back.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = RequestRefund)]
struct RefundBody {
    /// How much to refund; leave it out for everything still refundable.
    #[schema(schema_with = schema::money_ref)]
    amount: Option<serde_json::Number>,
    #[schema(required = true, value_type = RefundReason)]
    reason: Option<String>,
    /// Units that came back and go back on the shelf now (`return` ledger rows).
    #[schema(nullable, min_items = 1)]
    restock: Option<Vec<ItemBody>>,
}

/// Refund an order
///
/// Admin. For fulfilled orders, in full or in parts, never more than was captured; `restock`
/// puts returned units back in stock at once. Answers 202: the refund runs as a durable step
/// (the provider's idempotency key is the refund's id) and emits `payment.refunded`; the order
/// becomes `refunded` when refunded in full.
#[utoipa::path(
    post,
    path = "/orders/{id}/refunds",
    operation_id = "refundOrder",
    tag = "fulfilment",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The order's id."), IdempotencyKey),
    request_body = RefundBody,
    responses(
        (status = 202, description = "Accepted (or replayed: the refund first accepted with this Idempotency-Key, as it stands now).", body = RefundView, headers(
            ("Idempotent-Replayed" = String, description = "`true` when this is the refund of an earlier request with the same key."),
        )),
        (status = 403, description = "Not an admin.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`order_not_refundable`: the order is not fulfilled.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`exceeds_refundable` (with `requested` and `refundable`), `exceeds_returnable` (with `items`) or `idempotency_key_reused`.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn request_refund(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(body): ApiJson<RefundBody>,
) -> Result<Response, ApiError> {
    let id: OrderId = path_id("id", &id)?;
    let currency = state.checkout.currency;
    let mut errors = FieldErrors::new();
    let amount = body.amount.and_then(|amount| {
        let parsed = Money::parse_decimal(&amount.to_string(), currency).and_then(|m| {
            if m.minor() > 0 {
                Ok(m)
            } else {
                Err("must be more than 0".into())
            }
        });
        errors.check("/amount", parsed)
    });
    let reason = match body.reason {
        None => {
            errors.add("/reason", "is required");
            None
        }
        Some(reason) => errors.check("/reason", RefundReason::parse(&reason)),
    };
    let restock = body.restock.map(|items| parse_items("/restock", items, &mut errors));
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let reason = reason.expect("no errors recorded");
    let order = state
        .store
        .get_order(id)
        .await?
        .ok_or_else(|| ApiError::not_found("order"))?
        .order;
    let hash = request_hash(json!({
        "amount": amount.map(|m| m.minor()), "reason": reason.as_str(), "restock": restock,
    }));
    let amount_minor = match amount {
        Some(amount) => amount.minor(),
        // Everything still refundable (checked again under the order's lock).
        None => {
            let payment = state.store.payment(id).await?;
            let pending: i64 = state
                .store
                .after_sale()
                .refunds(id)
                .await?
                .iter()
                .filter(|r| r.state == fulfilment::RefundState::Pending)
                .map(|r| r.amount_minor)
                .sum();
            payment.map_or(0, |p| p.captured_minor - p.refunded_minor) - pending
        }
    };
    let now = clock::now();
    let refund = Refund {
        id: Uuid::now_v7(),
        amount_minor,
        reason,
        state: fulfilment::RefundState::Pending,
        provider_ref: None,
        restock: restock.unwrap_or_default(),
        created_at: now,
        updated_at: now,
    };
    let mut job = step_job(&state.saga, SETTLE_REFUND, id);
    job.payload["refund_id"] = json!(refund.id);
    let effects = StepEffects {
        order_id: Some(id),
        events: vec![(
            "refund_requested".into(),
            Some(format!(
                "{} {} ({}), {} unit(s) restocked",
                Money::from_minor(amount_minor.max(0))
                    .unwrap_or_default()
                    .to_decimal(order.currency),
                order.currency,
                reason.as_str(),
                refund.restock.iter().map(|i| i.quantity).sum::<u32>()
            )),
        )],
        enqueue: vec![job],
        refund: Some(RefundDraft {
            id: refund.id,
            idempotency_key: key,
            request_hash: hash,
            amount_minor,
            reason,
            restock: refund.restock.clone(),
        }),
        ..Default::default()
    };
    let (view, replayed) = match state.store.complete_job(None, &effects, now).await? {
        CompleteOutcome::Completed => {
            state.monitoring.metrics.step_enqueued(SETTLE_REFUND, 1);
            (RefundView::new(&refund, order.currency), false)
        }
        CompleteOutcome::Replayed(first) => {
            let refunds = state.store.after_sale().refunds(id).await?;
            let first = refunds
                .iter()
                .find(|r| r.id == first)
                .ok_or_else(|| ApiError::internal("the replayed refund vanished"))?;
            (RefundView::new(first, order.currency), true)
        }
        CompleteOutcome::Refused(refusal) => return Err(refused(refusal, order.currency)),
        other => return Err(ApiError::internal(format!("unexpected outcome {other:?}"))),
    };
    Ok(with_replayed(private((StatusCode::ACCEPTED, Json(view))), replayed))
}
