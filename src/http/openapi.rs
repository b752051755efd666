//! The OpenAPI 3.1 document, generated from the code: every route is registered through
//! `utoipa_axum`'s `routes!`, which adds the handler to the router and its `#[utoipa::path]`
//! operation to the document in one step, so a route cannot be served without being documented.
//! [`routes`] merges every resource module that way and serves the result at `/openapi.json`
//! and, rendered as HTML ([`super::docs`]), at `/docs`.
//!
//! What every operation shares is added here once, from the same facts the middleware acts on:
//! `X-Correlation-Id` on every response, 429 and 503 with `Retry-After` everywhere (rate limits
//! and overload shedding), 401 wherever a bearer token is required, 400 wherever a parameter or
//! body is parsed, 413/415 wherever a body is read.

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::Extension;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::Problem;
use super::{
    AppState, admin, correlation, customers, docs, events, fulfilment, health, metrics, ops, orders, products, reports,
    schema, stripe_webhooks, webhooks,
};
use crate::domain::{Currency, FieldError};

/// How one operation's answer leads to the next (OpenAPI links): the id a create returns is the
/// `id` of the operations on that resource. `(from operation, status, to operation, id source)`.
const LINKS: [(&str, &str, &str, &str); 17] = [
    ("createProduct", "201", "getProduct", "$response.body#/product_id"),
    ("createProduct", "201", "updateProduct", "$response.body#/product_id"),
    ("createProduct", "201", "adjustStock", "$response.body#/product_id"),
    ("createCustomer", "201", "getCustomer", "$response.body#/customer_id"),
    (
        "createCustomer",
        "201",
        "listCustomerOrders",
        "$response.body#/customer_id",
    ),
    ("placeOrder", "202", "getOrder", "$response.body#/order_id"),
    ("placeOrder", "202", "cancelOrder", "$response.body#/order_id"),
    ("getOrder", "200", "cancelOrder", "$response.body#/order_id"),
    ("listProducts", "200", "getProduct", "$response.body#/data/0/product_id"),
    ("listJobs", "200", "replayJob", "$response.body#/data/0/job_id"),
    (
        "createWebhookEndpoint",
        "201",
        "getWebhookEndpoint",
        "$response.body#/endpoint_id",
    ),
    (
        "createWebhookEndpoint",
        "201",
        "updateWebhookEndpoint",
        "$response.body#/endpoint_id",
    ),
    (
        "createWebhookEndpoint",
        "201",
        "rotateWebhookEndpointSecret",
        "$response.body#/endpoint_id",
    ),
    (
        "createWebhookEndpoint",
        "201",
        "listWebhookDeliveries",
        "$response.body#/endpoint_id",
    ),
    (
        "createWebhookEndpoint",
        "201",
        "replayWebhookDeliveries",
        "$response.body#/endpoint_id",
    ),
    (
        "createWebhookEndpoint",
        "201",
        "deleteWebhookEndpoint",
        "$response.body#/endpoint_id",
    ),
    (
        "listWebhookEndpoints",
        "200",
        "getWebhookEndpoint",
        "$response.body#/data/0/endpoint_id",
    ),
];

/// Links whose target takes the id in its body: a product just created or listed can be ordered.
const BODY_LINKS: [(&str, &str, &str, &str); 2] = [
    ("createProduct", "201", "placeOrder", "$response.body#/product_id"),
    ("listProducts", "200", "placeOrder", "$response.body#/data/0/product_id"),
];

/// The document's fixed parts; paths and schemas come from the registered handlers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "orderflow",
        description = "Order-processing and checkout API: catalog, customers, orders and the pipeline that \
                       takes an order from placed to fulfilled.\n\nJSON in and out (UTF-8). Errors are RFC 9457 \
                       problem details (`application/problem+json`) with a stable `code`. Money is an exact \
                       decimal JSON number in the store currency. Ids are UUIDs, timestamps RFC 3339 UTC. Lists \
                       take `limit` and `cursor` and answer `{data, next_cursor}`. Every response carries \
                       `X-Correlation-Id`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    tags(
        (name = "catalog", description = "Products and stock. Reads are public and cacheable; writes need the admin role."),
        (name = "customers", description = "Customer records; a customer sees only its own."),
        (name = "orders", description = "Checkout and order tracking."),
        (name = "fulfilment", description = "After the payment: shipments reported by the warehouse (roles `fulfilment` or `admin`) and refunds of fulfilled orders (admin)."),
        (name = "admin", description = "The order pipeline's queues and dead-lettered jobs (admin role)."),
        (name = "webhooks", description = "Webhook endpoints that receive every event they subscribe to as a signed POST (Standard Webhooks), their delivery log and replays (admin role)."),
        (name = "events", description = "The event feed: every business fact as a CloudEvent, in position order, for integrators that pull (roles `admin` or `integrations`)."),
        (name = "stripe", description = "Stripe's signed webhook events, which move orders waiting for 3-D Secure on."),
        (name = "health", description = "Probes for orchestrators and load balancers."),
        (name = "ops", description = "The operators' dashboard page (its data comes from the admin API)."),
        (name = "meta", description = "This document and its HTML rendering."),
    ),
    components(schemas(Problem, FieldError)),
)]
struct ApiDoc;

/// The limits the extractors and handlers enforce, published here for tools and tests that
/// compare them with the document.
pub use super::events::{FEED_LIMIT_DEFAULT, FEED_LIMIT_MAX, FEED_LIMIT_MIN};
pub use super::extract::{CURSOR_LEN, IDEMPOTENCY_KEY_MAX, LIMIT_DEFAULT, LIMIT_MAX, LIMIT_MIN};
pub use super::orders::MAX_WAIT_SECS;
pub use super::webhooks::{
    DESCRIPTION_MAX as WEBHOOK_DESCRIPTION_MAX, ENABLED_EVENTS_MAX, ENABLED_EVENTS_MIN, PREVIOUS_VALID_FOR_MAX,
    URL_MAX as WEBHOOK_URL_MAX,
};

/// The correlation header every response carries.
const CORRELATION_HEADER: &str = "X-Correlation-Id";
/// Name of the bearer-token security scheme.
pub const BEARER: &str = "bearer";
/// The media type of error bodies.
pub const PROBLEM_JSON: &str = "application/problem+json";
/// What `/docs` may load: nothing but its own inline styles.
pub const DOCS_CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'";

/// The document, serialized once, and its HTML rendering.
pub struct Published {
    pub json: Vec<u8>,
    pub html: String,
}

/// Every documented route of the API plus `/openapi.json` and `/docs`.
pub fn routes(currency: Currency) -> Router<AppState> {
    let published: Arc<OnceLock<Published>> = Arc::new(OnceLock::new());
    let meta = OpenApiRouter::default()
        .routes(routes!(openapi_json))
        .routes(routes!(docs_page))
        .layer(Extension(published.clone()));
    let (router, doc) = api().merge(meta).split_for_parts();
    let document = finish(
        serde_json::to_value(&doc).expect("the OpenAPI document serializes"),
        currency,
    );
    let html = docs::render(&document);
    let json = serde_json::to_vec(&document).expect("the OpenAPI document serializes");
    let _ = published.set(Published { json, html });
    router
}

/// The API's routes with their documentation (without `/openapi.json` and `/docs`).
fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(health::routes())
        .merge(metrics::routes())
        .merge(products::routes())
        .merge(customers::routes())
        .merge(orders::routes())
        .merge(fulfilment::routes())
        .merge(admin::routes())
        .merge(reports::routes())
        .merge(webhooks::routes())
        .merge(stripe_webhooks::routes())
        .merge(events::routes())
        .merge(ops::routes())
}

/// The document as `/openapi.json` serves it, for tools and tests that want it without a server.
pub fn document(currency: Currency) -> Value {
    let meta = OpenApiRouter::<AppState>::default()
        .routes(routes!(openapi_json))
        .routes(routes!(docs_page));
    let doc = api().merge(meta).into_openapi();
    finish(
        serde_json::to_value(&doc).expect("the OpenAPI document serializes"),
        currency,
    )
}

/// The OpenAPI document
///
/// This API's OpenAPI 3.1 description, generated from the code.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "getOpenApi",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI document.", content_type = "application/json", body = serde_json::Value)),
)]
async fn openapi_json(Extension(published): Extension<Arc<OnceLock<Published>>>) -> Response {
    match published.get() {
        Some(published) => ([(header::CONTENT_TYPE, "application/json")], published.json.clone()).into_response(),
        None => super::error::ApiError::unavailable("the API description is not ready yet").into_response(),
    }
}

/// The API reference
///
/// This document rendered as one self-contained HTML page (no scripts, no external assets).
#[utoipa::path(
    get,
    path = "/docs",
    operation_id = "getDocs",
    tag = "meta",
    responses((status = 200, description = "The reference page.", content_type = "text/html", body = String, headers(
        ("Content-Security-Policy" = String, description = "Nothing may load but the page's inline styles."),
    ))),
)]
async fn docs_page(Extension(published): Extension<Arc<OnceLock<Published>>>) -> Response {
    match published.get() {
        Some(published) => {
            let mut response = (
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                published.html.clone(),
            )
                .into_response();
            response
                .headers_mut()
                .insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(DOCS_CSP));
            response
        }
        None => super::error::ApiError::unavailable("the API description is not ready yet").into_response(),
    }
}

fn header_object(description: &str, schema: Value) -> Value {
    json!({ "description": description, "schema": schema })
}

fn problem_content() -> Value {
    json!({ PROBLEM_JSON: { "schema": { "$ref": "#/components/schemas/Problem" } } })
}

fn retry_after() -> Value {
    header_object(
        "Seconds to wait before retrying.",
        json!({ "type": "integer", "minimum": 0 }),
    )
}

/// A generic error response, shared by every operation it applies to.
fn problem_response(description: &str, headers: Value) -> Value {
    let mut response = json!({ "description": description, "content": problem_content() });
    if headers.as_object().is_some_and(|h| !h.is_empty()) {
        response["headers"] = headers;
    }
    response
}

/// The shared responses, as components.
fn shared_responses() -> Map<String, Value> {
    let mut responses = Map::new();
    responses.insert(
        "BadRequest".into(),
        problem_response(
            "The request is invalid: `validation_failed` names every bad field in `errors` (a JSON pointer into \
             the body, `path.<name>`, `query.<name>` or a header name); `malformed_json` when the body is not \
             JSON; unknown body fields and unknown query parameters are refused.",
            json!({}),
        ),
    );
    responses.insert(
        "Unauthorized".into(),
        problem_response(
            "`unauthorized`: the bearer token is missing, malformed, expired, not yet valid, or not signed by a \
             trusted key for this issuer and audience.",
            json!({ "WWW-Authenticate": header_object(
                "`Bearer`, with `error=\"invalid_token\"` when a token was sent.",
                json!({ "type": "string" }),
            ) }),
        ),
    );
    responses.insert(
        "PayloadTooLarge".into(),
        problem_response(
            "`payload_too_large`: the body is over the configured limit (64 KiB by default).",
            json!({}),
        ),
    );
    responses.insert(
        "RequestTimeout".into(),
        problem_response(
            "`body_timeout`: the request body did not arrive in time (`--body-timeout`).",
            json!({}),
        ),
    );
    responses.insert(
        "UnsupportedMediaType".into(),
        problem_response(
            "`unsupported_media_type`: send the body as `Content-Type: application/json`.",
            json!({}),
        ),
    );
    responses.insert(
        "TooManyRequests".into(),
        problem_response(
            "`rate_limited`: this principal (or client address, when anonymous) has used up its rate for this \
             kind of route.",
            json!({
                "Retry-After": retry_after(),
                "RateLimit-Limit": header_object("Requests allowed per window.", json!({ "type": "integer" })),
                "RateLimit-Remaining": header_object("Requests left in this window.", json!({ "type": "integer" })),
                "RateLimit-Reset": header_object("Seconds until the window resets.", json!({ "type": "integer" })),
                "RateLimit-Policy": header_object("The limit that applies, e.g. `100;w=60`.", json!({ "type": "string" })),
            }),
        ),
    );
    responses.insert(
        "ServiceUnavailable".into(),
        problem_response(
            "`overloaded` (too many requests in flight), `timed_out` (the handler ran past its deadline), \
             `service_unavailable` (no database connection free in time, or the database went away), \
             `storage_full` (the database's disk is full: writes refused, reads still work) or \
             `database_read_only` (the database is read-only: writes refused, reads still work): shed quickly \
             rather than queued. Retry after the given delay.",
            json!({ "Retry-After": retry_after() }),
        ),
    );
    responses
}

/// Completes the generated document with what every operation shares.
fn finish(mut doc: Value, currency: Currency) -> Value {
    doc["openapi"] = json!("3.1.0");
    doc["info"]["version"] = json!(env!("CARGO_PKG_VERSION"));
    let components = doc["components"].as_object_mut().expect("components were generated");
    components
        .entry("schemas")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("schemas is an object")
        .insert(
            schema::MONEY.into(),
            serde_json::to_value(schema::money(currency)).expect("schemas serialize"),
        );
    components.insert(
        "securitySchemes".into(),
        json!({ BEARER: {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "`Authorization: Bearer <JWT>`. The subject (`sub`) of a customer's token is its customer \
                            id; roles come from `roles` or `cognito:groups` (`admin` is the operator role). \
                            `orderflow token --sub <id> [--role admin]` mints a development token."
        } }),
    );
    components.insert("responses".into(), Value::Object(shared_responses()));
    // utoipa-gen 5.5 writes `#[schema(min_properties = …)]` as `maxProperties`; state the rule
    // the PATCH handler enforces (at least one member) here instead.
    for name in ["UpdateProduct", "UpdateWebhookEndpoint"] {
        if let Some(update) = components["schemas"][name].as_object_mut() {
            update.remove("maxProperties");
            update.insert("minProperties".into(), json!(1));
        }
    }
    // A payment is a token or a PaymentMethod id: exactly one member.
    if let Some(payment) = components["schemas"]["PlaceOrderPayment"].as_object_mut() {
        payment.insert("minProperties".into(), json!(1));
        payment.insert("maxProperties".into(), json!(1));
    }
    // A refund gives back more than nothing.
    if let Some(amount) = components["schemas"]["RequestRefund"]["properties"]["amount"].as_object_mut() {
        let money = std::mem::take(amount);
        amount.insert("allOf".into(), json!([money, { "exclusiveMinimum": 0 }]));
    }

    let correlation = header_object(
        &format!(
            "The caller's correlation id when it sent a valid one (1–{} of `A-Z a-z 0-9 - _ . :`), else a new UUID.",
            correlation::MAX_LEN
        ),
        json!({ "type": "string", "minLength": 1, "maxLength": correlation::MAX_LEN, "pattern": correlation::PATTERN }),
    );
    let paths = doc["paths"].as_object_mut().expect("paths were generated");
    for item in paths.values_mut() {
        let Some(item) = item.as_object_mut() else { continue };
        for operation in item.values_mut() {
            let Some(operation) = operation.as_object_mut() else {
                continue;
            };
            complete_operation(operation);
            for response in operation["responses"]
                .as_object_mut()
                .into_iter()
                .flat_map(|r| r.values_mut())
            {
                if response.get("$ref").is_some() {
                    continue;
                }
                let headers = response
                    .as_object_mut()
                    .expect("responses are objects")
                    .entry("headers")
                    .or_insert_with(|| json!({}));
                headers[CORRELATION_HEADER] = correlation.clone();
            }
        }
    }
    add_links(&mut doc);
    // Shared responses carry it too.
    for response in doc["components"]["responses"]
        .as_object_mut()
        .into_iter()
        .flat_map(|r| r.values_mut())
    {
        let headers = response
            .as_object_mut()
            .expect("responses are objects")
            .entry("headers")
            .or_insert_with(|| json!({}));
        headers[CORRELATION_HEADER] = correlation.clone();
    }
    doc
}

/// Adds [`LINKS`] to the responses they start from.
fn add_links(doc: &mut Value) {
    let by_id = LINKS.map(|(from, status, to, source)| (from, status, to, json!({ "parameters": { "id": source } })));
    let by_body = BODY_LINKS.map(|(from, status, to, source)| {
        (
            from,
            status,
            to,
            json!({ "requestBody": { "items": [{ "product_id": source, "quantity": 1 }] } }),
        )
    });
    for (from, status, to, mut link) in by_id.into_iter().chain(by_body) {
        let response = doc["paths"]
            .as_object_mut()
            .into_iter()
            .flat_map(|paths| paths.values_mut())
            .filter_map(Value::as_object_mut)
            .flat_map(|item| item.values_mut())
            .find(|operation| operation["operationId"] == from)
            .and_then(|operation| operation["responses"].get_mut(status))
            .unwrap_or_else(|| panic!("link from {from} {status}: no such operation or response"));
        let links = response
            .as_object_mut()
            .expect("responses are objects")
            .entry("links")
            .or_insert_with(|| json!({}));
        link["operationId"] = json!(to);
        links[to] = link;
    }
}

/// Adds the responses an operation can give because of what it takes (see the module docs).
fn complete_operation(operation: &mut Map<String, Value>) {
    let has_params = operation
        .get("parameters")
        .and_then(Value::as_array)
        .is_some_and(|p| !p.is_empty());
    let has_body = operation.contains_key("requestBody");
    let secured = operation
        .get("security")
        .and_then(Value::as_array)
        .is_some_and(|s| s.iter().any(|req| req.get(BEARER).is_some()));
    let responses = operation
        .entry("responses")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("responses is an object");
    let mut add = |status: &str, component: &str| {
        let reference = json!({ "$ref": format!("#/components/responses/{component}") });
        match responses.get_mut(status) {
            None => {
                responses.insert(status.into(), reference);
            }
            // An operation that documents its own answer for this status (e.g. readiness' 503)
            // can still get the shared problem too.
            Some(existing) => {
                if let Some(content) = existing.get_mut("content").and_then(Value::as_object_mut) {
                    content
                        .entry(PROBLEM_JSON)
                        .or_insert_with(|| json!({ "schema": { "$ref": "#/components/schemas/Problem" } }));
                }
                if matches!(status, "429" | "503") {
                    existing
                        .as_object_mut()
                        .expect("responses are objects")
                        .entry("headers")
                        .or_insert_with(|| json!({}))["Retry-After"] = retry_after();
                }
            }
        }
    };
    if has_params || has_body {
        add("400", "BadRequest");
    }
    if secured {
        add("401", "Unauthorized");
    }
    if has_body {
        add("408", "RequestTimeout");
        add("413", "PayloadTooLarge");
        add("415", "UnsupportedMediaType");
    }
    add("429", "TooManyRequests");
    add("503", "ServiceUnavailable");
    // Numeric order reads best.
    let mut sorted: Vec<(String, Value)> = std::mem::take(responses).into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    responses.extend(sorted);
}
