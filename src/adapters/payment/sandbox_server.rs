//! The sandbox provider served over HTTP. It speaks **Stripe's own API** (the PaymentIntents and
//! Refunds subset orderflow uses, form-encoded, answers and errors in Stripe's JSON shapes), so one
//! adapter — [`super::stripe::StripeClient`] — serves the sandbox over HTTP, localstripe and real
//! Stripe, and the Stripe client and the fault tests cross a real network hop. It is a thin
//! protocol layer over the in-process [`Sandbox`]'s [`PaymentProvider`] implementation: the same
//! test payment methods, the same behaviours, the same books (`sandbox_intents`), one copy of the
//! behaviour.
//!
//! # Stripe's API (the subset)
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/payment_intents` | create and confirm: `amount`, `currency`, `payment_method=pm_…` or `payment_method_data[type]=card&payment_method_data[card][token]=tok_…`, `confirm=true`, `capture_method=manual\|automatic` (default automatic), `payment_method_types[]=card`, `metadata[order_id]` → a `payment_intent` |
//! | `GET /v1/payment_intents/{id}` | a `payment_intent` |
//! | `GET /v1/payment_intents?limit=&starting_after=` | `{object: "list", data, has_more, url}`; `limit` 1–100 (default 10); oldest first (Stripe: newest first; paging with `starting_after` works the same) |
//! | `POST /v1/payment_intents/{id}/capture` | `amount_to_capture` (default: all of it) → the `payment_intent`, `succeeded` |
//! | `POST /v1/payment_intents/{id}/cancel` | `cancellation_reason` (optional) → the `payment_intent`, `canceled` |
//! | `POST /v1/refunds` (form-encoded) | `payment_intent`, `amount` (default: what is left), `reason`, `metadata[…]` → a `refund` (`status: "succeeded"`) |
//! | `GET /v1/refunds?payment_intent=pi_…` | the intent's refunds, `{object: "list", …}` |
//! | `POST /v1/payment_intents/{id}/_authenticate?success=true\|false` | localstripe's 3-D Secure step (see below) → the `payment_intent` |
//!
//! A `payment_intent` carries `id`, `object`, `status`, `amount`, `amount_capturable`,
//! `amount_received`, `capture_method`, `currency` (lower case), `client_secret` and `next_action:
//! {type: "use_stripe_sdk"}` (only when it `requires_action`), `metadata` (`order_id`, the one
//! metadata key the books keep), `last_payment_error` and `payment_method`. Parameters outside the
//! subset are refused (400 `parameter_unknown`, as Stripe refuses unknown ones), so a client cannot
//! come to rely on something the sandbox silently ignores.
//!
//! **Idempotency.** Every POST must carry an `Idempotency-Key` (Stripe makes it optional; the
//! sandbox insists, since a POST without one could act twice on a retry — orderflow always sends
//! one). A create retried with its key answers the intent the first call made (a decline: the same
//! decline); a refund retried with its key answers the same refund; a capture or cancel retried
//! after it succeeded answers the same success (the books move intents with conditional writes, and
//! an intent already in the target state is answered as it is).
//!
//! **Errors** are Stripe's `{"error": {"type", "code", "decline_code", "message", "param"}}`:
//!
//! | answer | when | [`StripeClient`](super::stripe::StripeClient) reads it as |
//! |---|---|---|
//! | 402 `card_error`, `code: card_declined`, `decline_code`, the intent in `error.payment_intent` | a decline ([`PaymentError::Declined`]; the intent is booked `requires_payment_method`) | declined |
//! | 503 `api_error` (`Stripe-Should-Retry: true`) | `tok_flaky`, the `tok_unavailable` outage, the books failing ([`PaymentError::Transient`]) | transient |
//! | 504 `api_error` after [`SandboxServerSettings::timeout_answer_delay`] | the first call of a `tok_timeout` intent (see below) | transient (the client has usually timed out first) |
//! | 404 `invalid_request_error` `resource_missing` | an unknown intent | rejected |
//! | 400 `invalid_request_error` `payment_intent_unexpected_state` | capture, cancel or authenticate in the wrong state | rejected |
//! | 400 `invalid_request_error` `amount_too_large` / `charge_not_captured` / `charge_already_refunded` | a refund beyond what is left, of nothing captured; a capture beyond the amount | rejected |
//! | 400 `invalid_request_error` `parameter_missing` / `parameter_invalid_integer` / `parameter_unknown` / `parameters_exclusive`, with `param` | a missing or bad parameter, or a POST without an `Idempotency-Key` | rejected |
//! | 401 `invalid_request_error` | a missing or wrong API key (`Authorization: Bearer sk_…`, when one is configured); for `_authenticate`, a wrong `client_secret` | rejected |
//!
//! # 3-D Secure: `_authenticate`
//!
//! An intent confirmed with a 3-D Secure method (`tok_threeDSecure`, `pm_card_threeDSecure2Required`)
//! waits in `requires_action` with a `client_secret`. On real Stripe the customer's browser finishes
//! it through Stripe.js; localstripe — and so the sandbox, which mirrors it — stands in for that
//! with `POST /v1/payment_intents/{id}/_authenticate?success=true|false`, the call localstripe's
//! Stripe.js makes when the customer clicks "Complete" or "Fail authentication":
//!
//! - parameters, from the body (JSON, as localstripe's script sends it, or a form) and the query
//!   string (which wins): `client_secret` (required: the intent's, else 401), `success` (`true` or
//!   `false`, any case; **absent means `false`**, as in localstripe), and the browser's `key`
//!   (`pk_…`), `payment_user_agent`, `referrer`, which are ignored; anything else is 400
//!   `parameter_unknown`;
//! - authorized by the API key, or — it is the customer's browser calling — by a publishable key
//!   `key=pk_…` in the body, as localstripe accepts; no `Idempotency-Key` is needed (a repeat is
//!   refused: the intent is no longer `requires_action`);
//! - the intent must be `requires_action` (else 400 `payment_intent_unexpected_state`);
//! - success: the card is charged — `requires_capture` (manual capture) or `succeeded` (automatic,
//!   `amount_received` the whole amount); failure: `requires_payment_method`, `payment_method:
//!   null`, `last_payment_error: {type: card_error, code: payment_intent_authentication_failure,
//!   message}` — what a new confirmation would have to fix.
//!
//! Like localstripe, the sandbox sends no webhook itself: whoever drives the test posts the
//! event Stripe would send (`payment_intent.amount_capturable_updated`, `.succeeded`,
//! `.payment_failed`) to `POST /webhooks/stripe`.
//!
//! # Also served
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/sandbox/outage` | `{"active": bool}`: starts or ends the `tok_unavailable` outage |
//! | `GET /health` | `{"status": "ok"}` (never needs the API key) |
//!
//! # Timeouts and hang-ups
//!
//! `tok_timeout` is a *real* timeout here: the intent is booked, then the
//! answer is held for [`SandboxServerSettings::timeout_answer_delay`] before a 504, so a client
//! whose timeout is shorter genuinely times out while the payment is on the books. Its retry with
//! the same key finds it and gets it at once.
//!
//! Each provider call runs in its own task, so a client that hangs up (as a timing-out client
//! does) cannot cancel a booking halfway through.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::PaymentError;
use super::intents::{AuthorizeRequest, CaptureMethod, CaptureRequest, PaymentProvider, RefundRequest, VoidRequest};
use super::sandbox::{AUTHENTICATION_FAILURE, Sandbox};
use super::stripe::{CORRELATION_ID_HEADER, IDEMPOTENCY_KEY_HEADER, REFUND_REASONS};
use crate::store::sandbox::{SandboxIntent, SandboxIntentRefund};

/// The default delay before a `tok_timeout` first call is answered (with a 504): longer than
/// [`super::stripe::DEFAULT_TIMEOUT`], so a default-configured client really times out.
pub const DEFAULT_TIMEOUT_ANSWER_DELAY: Duration = Duration::from_secs(15);

/// Longest idempotency key accepted (Stripe's limit).
const MAX_KEY_LEN: usize = 255;

/// Stripe's page sizes: at most 100, 10 when not asked.
const MAX_PAGE: u32 = 100;
const DEFAULT_PAGE: u32 = 10;

/// How the sandbox server behaves.
#[derive(Clone)]
pub struct SandboxServerSettings {
    /// How long the first call of a `tok_timeout` charge is held before it is answered with a
    /// 504. Make it longer than the client's timeout for a genuine client-side timeout.
    pub timeout_answer_delay: Duration,
    /// When set, every `/v1/` request must carry `Authorization: Bearer <api_key>`.
    pub api_key: Option<String>,
}

impl Default for SandboxServerSettings {
    fn default() -> Self {
        Self {
            timeout_answer_delay: DEFAULT_TIMEOUT_ANSWER_DELAY,
            api_key: None,
        }
    }
}

impl std::fmt::Debug for SandboxServerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxServerSettings")
            .field("timeout_answer_delay", &self.timeout_answer_delay)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .finish()
    }
}

/// A SHA-256 digest of an API key (keys are compared by digest: no early exit on the first
/// differing byte).
type KeyDigest = sha2::digest::Output<Sha256>;

#[derive(Clone)]
struct ServerState {
    sandbox: Arc<Sandbox>,
    /// The API key's digest, when one is required.
    api_key: Option<KeyDigest>,
    timeout_answer_delay: Duration,
    /// Flipped to `true` on shutdown: held `tok_timeout` answers are released at once.
    stopping: Arc<watch::Sender<bool>>,
}

/// The sandbox API as a router (see the module docs).
pub fn router(sandbox: Arc<Sandbox>, settings: SandboxServerSettings) -> Router {
    router_with_stop(sandbox, settings).0
}

fn router_with_stop(sandbox: Arc<Sandbox>, settings: SandboxServerSettings) -> (Router, Arc<watch::Sender<bool>>) {
    let stopping = Arc::new(watch::Sender::new(false));
    let key_digest = settings
        .api_key
        .as_deref()
        .map(|key| Sha256::digest(key.trim().as_bytes()));
    let state = ServerState {
        sandbox,
        api_key: key_digest,
        timeout_answer_delay: settings.timeout_answer_delay,
        stopping: stopping.clone(),
    };
    let v1 = Router::new()
        .route(
            "/v1/payment_intents",
            post(create_payment_intent).get(list_payment_intents),
        )
        .route("/v1/payment_intents/{id}", get(retrieve_payment_intent))
        .route("/v1/payment_intents/{id}/capture", post(capture_payment_intent))
        .route("/v1/payment_intents/{id}/cancel", post(cancel_payment_intent))
        .route(
            "/v1/payment_intents/{id}/_authenticate",
            post(authenticate_payment_intent),
        )
        .route("/v1/refunds", post(post_refund).get(list_refunds))
        .route("/v1/sandbox/outage", post(set_outage))
        .layer(middleware::from_fn(move |request: Request, next: Next| async move {
            // `_authenticate` is the customer's browser calling: it may show a publishable key in
            // its body instead, which only the handler can read.
            let browser = request.method() == Method::POST && request.uri().path().ends_with("/_authenticate");
            if let Some(expected) = &key_digest
                && !browser
                && !bearer_matches(expected, request.headers())
            {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "missing or wrong API key (Authorization: Bearer <key>)",
                );
            }
            next.run(request).await
        }));
    let router = Router::new()
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .merge(v1)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .with_state(state);
    (router, stopping)
}

/// Serves [`router`] on `listener` until `shutdown` resolves; held `tok_timeout` answers are
/// released (504) at once then, and in-flight requests finish.
pub async fn serve_sandbox(
    listener: TcpListener,
    sandbox: Arc<Sandbox>,
    settings: SandboxServerSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (router, stopping) = router_with_stop(sandbox, settings);
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown.await;
            stopping.send_replace(true);
        })
        .await
}

/// Stripe's error `type` for an answer's status.
fn error_type(status: StatusCode) -> &'static str {
    match status {
        StatusCode::PAYMENT_REQUIRED => "card_error",
        status if status.is_server_error() => "api_error",
        _ => "invalid_request_error",
    }
}

/// Whether the request carries `Authorization: Bearer <the API key>`.
fn bearer_matches(expected: &KeyDigest, headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|key| Sha256::digest(key.trim().as_bytes()))
        .is_some_and(|presented| presented == *expected)
}

/// A Stripe-shaped error answer outside Stripe's API proper (the API key, unknown routes, the
/// outage switch): a short `code` with Stripe's `type`.
fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({ "error": { "type": error_type(status), "code": code, "message": message } });
    (status, Json(body)).into_response()
}

fn bad_request(message: impl std::fmt::Display) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request", &message.to_string())
}

/// The request's idempotency key: required, like a real provider that guarantees at most one
/// charge per key. The error is the message of a 400.
fn idempotency_key(headers: &HeaderMap) -> Result<String, String> {
    let key = headers
        .get(IDEMPOTENCY_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or_default();
    if key.is_empty() {
        return Err("an Idempotency-Key header is required".into());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!("the Idempotency-Key is longer than {MAX_KEY_LEN} characters"));
    }
    Ok(key.to_string())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn correlation_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get(CORRELATION_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
}

/// Runs a provider call in its own task, so a client hanging up cannot cancel it halfway.
async fn detached<T: Send + 'static>(
    call: impl Future<Output = Result<T, PaymentError>> + Send + 'static,
) -> Result<T, PaymentError> {
    tokio::spawn(call)
        .await
        .unwrap_or_else(|join| Err(PaymentError::Transient(format!("sandbox call failed: {join}"))))
}

/// Holds a lost answer past the client's patience (or until shutdown).
async fn hold_answer(state: &ServerState) {
    let mut stopping = state.stopping.subscribe();
    tokio::select! {
        () = tokio::time::sleep(state.timeout_answer_delay) => {}
        _ = stopping.wait_for(|stop| *stop) => {}
    }
}

#[derive(Deserialize)]
struct OutageBody {
    active: bool,
}

async fn set_outage(State(state): State<ServerState>, body: Result<Json<OutageBody>, JsonRejection>) -> Response {
    match body {
        Ok(Json(OutageBody { active })) => {
            state.sandbox.set_outage(active);
            tracing::info!(active, "sandbox outage changed");
            Json(json!({ "active": active })).into_response()
        }
        Err(rejection) => bad_request(rejection.body_text()),
    }
}

// ---------------------------------------------------------------------------------------------
// Stripe's PaymentIntents API (see the module docs).

/// An error answer in Stripe's shape.
struct StripeError {
    status: StatusCode,
    code: Option<String>,
    message: String,
    param: Option<String>,
    /// For a decline (boxed: errors stay small).
    decline: Option<Box<Decline>>,
}

/// A decline's `decline_code` and the intent it left (Stripe's `error.payment_intent`).
struct Decline {
    decline_code: String,
    payment_intent: Option<Value>,
}

impl StripeError {
    fn new(status: StatusCode, code: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.map(str::to_string),
            message: message.into(),
            param: None,
            decline: None,
        }
    }

    /// A 400 `invalid_request_error`.
    fn invalid(code: Option<&str>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    fn missing(param: &str) -> Self {
        Self::invalid(Some("parameter_missing"), format!("Missing required param: {param}.")).param(param)
    }

    fn not_found(id: &str, param: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            Some("resource_missing"),
            format!("No such payment_intent: '{id}'"),
        )
        .param(param)
    }

    /// A 503 `api_error` (or the books failing).
    fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, None, message)
    }
}

impl IntoResponse for StripeError {
    fn into_response(self) -> Response {
        let mut error = Map::new();
        error.insert("type".into(), json!(error_type(self.status)));
        if let Some(code) = self.code {
            error.insert("code".into(), json!(code));
        }
        let decline = self.decline.map(|decline| *decline);
        if let Some(decline) = &decline {
            error.insert("decline_code".into(), json!(decline.decline_code));
        }
        error.insert("message".into(), json!(self.message));
        if let Some(param) = self.param {
            error.insert("param".into(), json!(param));
        }
        if let Some(intent) = decline.and_then(|decline| decline.payment_intent) {
            error.insert("payment_intent".into(), intent);
        }
        let retry = self.status.is_server_error();
        let mut response = (self.status, Json(json!({ "error": error }))).into_response();
        if retry {
            response
                .headers_mut()
                .insert("stripe-should-retry", HeaderValue::from_static("true"));
        }
        response
    }
}

type Answer<T> = Result<T, StripeError>;

fn books_failed(error: crate::store::StoreError) -> StripeError {
    StripeError::unavailable(format!("sandbox books: {error}"))
}

/// A [`PaymentError`] from the in-process gateway in Stripe's words. The sandbox's rejections
/// start with Stripe's error code where one fits (`amount_too_large: …`).
fn gateway_error(failure: PaymentError) -> StripeError {
    match failure {
        PaymentError::Declined(code) => card_error(&code, None),
        PaymentError::Transient(message) => StripeError::unavailable(message),
        PaymentError::Rejected(message) => rejection(&message),
    }
}

fn rejection(message: &str) -> StripeError {
    if let Some(id) = message.strip_prefix("no such payment_intent: ") {
        return StripeError::not_found(id, "intent");
    }
    if let Some(detail) = message.strip_prefix("unauthorized: ") {
        return StripeError::new(StatusCode::UNAUTHORIZED, None, detail).param("client_secret");
    }
    if message.starts_with("amount_to_capture") {
        return StripeError::invalid(Some("amount_too_large"), message).param("amount_to_capture");
    }
    if message.starts_with("amount must be") {
        return StripeError::invalid(Some("parameter_invalid_integer"), message).param("amount");
    }
    let code = message
        .split_once(':')
        .map(|(code, _)| code)
        .filter(|code| !code.is_empty() && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
    let error = StripeError::invalid(code, message);
    match code {
        Some("amount_too_large") => error.param("amount"),
        _ => error,
    }
}

/// A decline: 402 `card_error`, `code: card_declined`, the sandbox's code as `decline_code`.
fn card_error(decline_code: &str, intent: Option<&SandboxIntent>) -> StripeError {
    let mut error = StripeError::new(
        StatusCode::PAYMENT_REQUIRED,
        Some("card_declined"),
        "Your card was declined.",
    );
    error.decline = Some(Box::new(Decline {
        decline_code: decline_code.to_string(),
        payment_intent: intent.map(intent_json),
    }));
    error
}

/// Stripe's PaymentIntent object for an intent on the books.
fn intent_json(intent: &SandboxIntent) -> Value {
    let requires_action = intent.status == "requires_action";
    // A failed 3-D Secure leaves no payment method on the intent (localstripe and Stripe alike).
    let authentication_failed = intent.decline_code.as_deref() == Some(AUTHENTICATION_FAILURE);
    let mut metadata = Map::new();
    if let Some(order) = intent.order_id.as_deref().filter(|order| !order.is_empty()) {
        metadata.insert("order_id".into(), json!(order));
    }
    json!({
        "id": intent.id,
        "object": "payment_intent",
        "amount": intent.amount_minor,
        "amount_capturable": if intent.status == "requires_capture" { intent.amount_minor } else { 0 },
        "amount_received": intent.captured_minor,
        // Stripe sends the charge's id unless asked to expand it; the sandbox always embeds it
        // (clients read either), with what was captured and refunded.
        "latest_charge": (intent.captured_minor > 0).then(|| json!({
            "id": format!("ch_{}", intent.id.trim_start_matches("pi_")),
            "object": "charge",
            "amount": intent.amount_minor,
            "amount_captured": intent.captured_minor,
            "amount_refunded": intent.refunded_minor,
            "captured": true,
            "status": "succeeded",
        })),
        "capture_method": intent.capture_method,
        "client_secret": if requires_action { intent.client_secret.clone() } else { None },
        "confirmation_method": "automatic",
        "currency": intent.currency.to_ascii_lowercase(),
        "last_payment_error": intent.decline_code.as_ref().map(|code| if authentication_failed {
            json!({
                "type": "card_error",
                "code": AUTHENTICATION_FAILURE,
                "message": "The provided PaymentMethod has failed authentication.",
            })
        } else {
            json!({
                "type": "card_error",
                "code": "card_declined",
                "decline_code": code,
                "message": "Your card was declined.",
            })
        }),
        "livemode": false,
        "metadata": metadata,
        "next_action": requires_action.then(|| json!({ "type": "use_stripe_sdk", "use_stripe_sdk": {} })),
        "payment_method": if authentication_failed { None } else { Some(&intent.payment_method) },
        "payment_method_types": ["card"],
        "status": intent.status,
    })
}

/// Stripe's Refund object. `reason` is Stripe's only for its own reasons; any other is kept as
/// `metadata[reason]` (as [`super::stripe::StripeClient`] sends it).
fn refund_json(
    id: &str,
    amount_minor: i64,
    intent_id: &str,
    currency: &str,
    reason: Option<&str>,
    mut metadata: Map<String, Value>,
) -> Value {
    let stripe_reason = reason.filter(|reason| REFUND_REASONS.contains(reason));
    if let Some(other) = reason.filter(|reason| !REFUND_REASONS.contains(reason)) {
        metadata.entry("reason").or_insert_with(|| json!(other));
    }
    json!({
        "id": id,
        "object": "refund",
        "amount": amount_minor,
        "currency": currency.to_ascii_lowercase(),
        "metadata": metadata,
        "payment_intent": intent_id,
        "reason": stripe_reason,
        "status": "succeeded",
    })
}

fn list_json(url: &str, data: Vec<Value>, has_more: bool) -> Json<Value> {
    Json(json!({ "object": "list", "data": data, "has_more": has_more, "url": url }))
}

/// `application/x-www-form-urlencoded` parameters (a body or a query string), in order.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(text: &[u8]) -> Answer<Self> {
        let text = std::str::from_utf8(text)
            .map_err(|_| StripeError::invalid(None, "the request body is not UTF-8 form data"))?;
        let mut pairs = Vec::new();
        for item in text.split('&').filter(|item| !item.is_empty()) {
            let (name, value) = item.split_once('=').unwrap_or((item, ""));
            pairs.push((decode_component(name)?, decode_component(value)?));
        }
        Ok(Params(pairs))
    }

    /// A JSON object of parameters (as localstripe's Stripe.js sends them), else a form.
    fn json_or_form(body: &[u8]) -> Answer<Self> {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(object)) => Ok(Params(
                object
                    .into_iter()
                    .map(|(name, value)| match value {
                        Value::String(text) => (name, text),
                        other => (name, other.to_string()),
                    })
                    .collect(),
            )),
            _ => Self::parse(body),
        }
    }

    fn query(uri: &Uri) -> Answer<Self> {
        Self::parse(uri.query().unwrap_or_default().as_bytes())
    }

    /// The first value of `name`.
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.0.iter().filter(move |(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// `metadata[key]=value` pairs.
    fn metadata(&self) -> Map<String, Value> {
        self.0
            .iter()
            .filter_map(|(name, value)| {
                let key = name.strip_prefix("metadata[")?.strip_suffix(']')?;
                Some((key.to_string(), json!(value)))
            })
            .collect()
    }

    /// Refuses a parameter that is neither in `known` nor starts with one of `families`.
    fn only(&self, known: &[&str], families: &[&str]) -> Answer<()> {
        match self
            .0
            .iter()
            .map(|(name, _)| name.as_str())
            .find(|name| !known.contains(name) && !families.iter().any(|family| name.starts_with(family)))
        {
            Some(unknown) => Err(StripeError::invalid(
                Some("parameter_unknown"),
                format!("Received unknown parameter: {unknown} (the sandbox serves a subset of Stripe's API)"),
            )
            .param(unknown)),
            None => Ok(()),
        }
    }

    /// A positive integer (Stripe's amounts), `None` when absent.
    fn positive_integer(&self, name: &str) -> Answer<Option<i64>> {
        match self.get(name) {
            None => Ok(None),
            Some(text) => match text.trim().parse::<i64>() {
                Ok(value) if value > 0 => Ok(Some(value)),
                _ => Err(StripeError::invalid(
                    Some("parameter_invalid_integer"),
                    format!("Invalid integer: {text:?}; {name} must be a positive integer"),
                )
                .param(name)),
            },
        }
    }
}

fn decode_component(text: &str) -> Answer<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| StripeError::invalid(None, "malformed percent-encoding in the form data"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| StripeError::invalid(None, "the form data is not UTF-8"))
}

/// Every POST's `Idempotency-Key` (see the module docs: required here).
fn stripe_idempotency_key(headers: &HeaderMap) -> Answer<String> {
    idempotency_key(headers).map_err(|message| {
        StripeError::invalid(
            Some("parameter_missing"),
            format!("{message} (the sandbox requires one on every POST: without it a retry could act twice)"),
        )
        .param("Idempotency-Key")
    })
}

/// The request's correlation id: the header, else `metadata[correlation_id]`.
fn stripe_correlation_id(headers: &HeaderMap, params: &Params) -> Option<String> {
    correlation_id(headers).or_else(|| {
        params
            .get("metadata[correlation_id]")
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map(str::to_string)
    })
}

/// The intent as the books hold it.
async fn booked_intent(state: &ServerState, id: &str) -> Answer<SandboxIntent> {
    state
        .sandbox
        .books()
        .intent(id)
        .await
        .map_err(books_failed)?
        .ok_or_else(|| StripeError::not_found(id, "intent"))
}

/// Answers the intent `id` as the books hold it now.
async fn answer_intent(state: &ServerState, id: &str) -> Answer<Json<Value>> {
    Ok(Json(intent_json(&booked_intent(state, id).await?)))
}

const CREATE_PARAMS: [&str; 11] = [
    "amount",
    "currency",
    "payment_method",
    "payment_method_types[]",
    "confirm",
    "capture_method",
    "description",
    "statement_descriptor",
    "statement_descriptor_suffix",
    "receipt_email",
    "expand[]",
];

/// `POST /v1/payment_intents`: create and confirm.
async fn create_payment_intent(State(state): State<ServerState>, headers: HeaderMap, body: Bytes) -> Response {
    into_response(create_payment_intent_inner(&state, &headers, &body).await)
}

async fn create_payment_intent_inner(state: &ServerState, headers: &HeaderMap, body: &[u8]) -> Answer<Response> {
    let key = stripe_idempotency_key(headers)?;
    let params = Params::parse(body)?;
    params.only(&CREATE_PARAMS, &["metadata[", "payment_method_data["])?;
    let amount = params
        .positive_integer("amount")?
        .ok_or_else(|| StripeError::missing("amount"))?;
    let currency = params.get("currency").ok_or_else(|| StripeError::missing("currency"))?;
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(StripeError::invalid(None, format!("Invalid currency: {currency}")).param("currency"));
    }
    let token = params.get("payment_method_data[card][token]");
    let payment_method = match (params.get("payment_method"), token) {
        (Some(_), Some(_)) => {
            return Err(StripeError::invalid(
                Some("parameters_exclusive"),
                "You may only specify one of these parameters: payment_method, payment_method_data.",
            )
            .param("payment_method_data"));
        }
        (Some(method), None) => method,
        (None, Some(token)) => {
            if params.get("payment_method_data[type]").unwrap_or("card") != "card" {
                return Err(StripeError::invalid(
                    Some("payment_intent_invalid_parameter"),
                    "the sandbox takes cards only: payment_method_data[type]=card",
                )
                .param("payment_method_data[type]"));
            }
            token
        }
        (None, None) => return Err(StripeError::missing("payment_method")),
    };
    if payment_method.trim().is_empty() {
        return Err(StripeError::invalid(
            Some("parameter_invalid_empty"),
            "You passed an empty string for 'payment_method'.",
        )
        .param("payment_method"));
    }
    if params.get("confirm") != Some("true") {
        return Err(StripeError::invalid(
            Some("payment_intent_invalid_parameter"),
            "the sandbox creates and confirms in one call: send confirm=true",
        )
        .param("confirm"));
    }
    let capture = match params.get("capture_method").unwrap_or("automatic") {
        "manual" => CaptureMethod::Manual,
        "automatic" | "automatic_async" => CaptureMethod::Automatic,
        other => {
            return Err(StripeError::invalid(
                None,
                format!("Invalid capture_method: {other:?}; must be one of automatic, automatic_async, or manual"),
            )
            .param("capture_method"));
        }
    };
    if let Some(other) = params.all("payment_method_types[]").find(|t| *t != "card") {
        return Err(StripeError::invalid(
            Some("payment_intent_invalid_parameter"),
            format!("the sandbox takes cards only, not payment method type {other:?}"),
        )
        .param("payment_method_types"));
    }
    let request = AuthorizeRequest {
        idempotency_key: key,
        amount_minor: amount,
        // The shop's form (upper case), so the books read the same whichever transport booked.
        currency: currency.to_ascii_uppercase(),
        payment_method: payment_method.to_string(),
        capture,
        order_id: params.get("metadata[order_id]").unwrap_or_default().to_string(),
        correlation_id: stripe_correlation_id(headers, &params),
    };
    let sandbox = state.sandbox.clone();
    let call = request.clone();
    let result = detached(async move { PaymentProvider::authorize(&*sandbox, &call).await }).await;
    // Never the payment method: it is the customer's payment credential.
    tracing::info!(
        idempotency_key = %request.idempotency_key,
        order_id = %request.order_id,
        correlation_id = request.correlation_id.as_deref(),
        traceparent = header(headers, "traceparent"),
        outcome = ?result,
        "sandbox payment_intent create"
    );
    match result {
        Ok(intent) => Ok(answer_intent(state, &intent.id).await?.into_response()),
        Err(PaymentError::Transient(_)) if request.payment_method == "tok_timeout" => {
            // Booked, but the answer is lost: hold it past the client's patience.
            hold_answer(state).await;
            Err(StripeError::new(
                StatusCode::GATEWAY_TIMEOUT,
                None,
                "timed out waiting for the card network (the outcome is unknown; retry with the same Idempotency-Key)",
            ))
        }
        Err(PaymentError::Declined(code)) => {
            // Stripe books a declined confirm as an intent in requires_payment_method and puts it
            // in the error.
            let booked = state
                .sandbox
                .books()
                .intents_for(&request.order_id)
                .await
                .map_err(books_failed)?
                .into_iter()
                .find(|intent| intent.idempotency_key == request.idempotency_key);
            Err(card_error(&code, booked.as_ref()))
        }
        Err(failure) => Err(gateway_error(failure)),
    }
}

fn into_response<T: IntoResponse>(answer: Answer<T>) -> Response {
    match answer {
        Ok(answer) => answer.into_response(),
        Err(error) => error.into_response(),
    }
}

/// `GET /v1/payment_intents/{id}`.
async fn retrieve_payment_intent(State(state): State<ServerState>, Path(id): Path<String>) -> Response {
    into_response(answer_intent(&state, &id).await)
}

/// `GET /v1/payment_intents?limit=&starting_after=`.
async fn list_payment_intents(State(state): State<ServerState>, uri: Uri) -> Response {
    into_response(list_payment_intents_inner(&state, &uri).await)
}

async fn list_payment_intents_inner(state: &ServerState, uri: &Uri) -> Answer<Json<Value>> {
    let params = Params::query(uri)?;
    params.only(&["limit", "starting_after", "expand[]"], &[])?;
    let limit = match params.positive_integer("limit")? {
        None => DEFAULT_PAGE,
        Some(limit) if limit <= i64::from(MAX_PAGE) => limit as u32,
        Some(_) => {
            return Err(StripeError::invalid(
                Some("parameter_invalid_integer"),
                format!("This value must be less than or equal to {MAX_PAGE}."),
            )
            .param("limit"));
        }
    };
    let after = params.get("starting_after").filter(|after| !after.is_empty());
    if let Some(after) = after {
        booked_intent(state, after).await.map_err(|error| match error.status {
            StatusCode::NOT_FOUND => StripeError::not_found(after, "starting_after"),
            _ => error,
        })?;
    }
    let mut page = state
        .sandbox
        .books()
        .intents(after, limit + 1)
        .await
        .map_err(books_failed)?;
    let has_more = page.len() > limit as usize;
    page.truncate(limit as usize);
    Ok(list_json(
        "/v1/payment_intents",
        page.iter().map(intent_json).collect(),
        has_more,
    ))
}

/// `POST /v1/payment_intents/{id}/capture`.
async fn capture_payment_intent(
    State(state): State<ServerState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    into_response(capture_inner(&state, id, &headers, &body).await)
}

async fn capture_inner(state: &ServerState, id: String, headers: &HeaderMap, body: &[u8]) -> Answer<Json<Value>> {
    let key = stripe_idempotency_key(headers)?;
    let params = Params::parse(body)?;
    params.only(&["amount_to_capture", "expand[]"], &["metadata["])?;
    let amount = match params.positive_integer("amount_to_capture")? {
        Some(amount) => amount,
        // Stripe's default: all that is capturable.
        None => booked_intent(state, &id).await?.amount_minor,
    };
    let request = CaptureRequest {
        idempotency_key: key,
        intent_id: id,
        amount_minor: amount,
        correlation_id: stripe_correlation_id(headers, &params),
    };
    let sandbox = state.sandbox.clone();
    let call = request.clone();
    let result = detached(async move { PaymentProvider::capture(&*sandbox, &call).await }).await;
    tracing::info!(
        idempotency_key = %request.idempotency_key,
        intent = %request.intent_id,
        amount_minor = request.amount_minor,
        correlation_id = request.correlation_id.as_deref(),
        traceparent = header(headers, "traceparent"),
        outcome = ?result,
        "sandbox payment_intent capture"
    );
    let intent = result.map_err(gateway_error)?;
    answer_intent(state, &intent.id).await
}

/// `POST /v1/payment_intents/{id}/cancel`.
async fn cancel_payment_intent(
    State(state): State<ServerState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    into_response(cancel_inner(&state, id, &headers, &body).await)
}

async fn cancel_inner(state: &ServerState, id: String, headers: &HeaderMap, body: &[u8]) -> Answer<Json<Value>> {
    let key = stripe_idempotency_key(headers)?;
    let params = Params::parse(body)?;
    params.only(&["cancellation_reason", "expand[]"], &[])?;
    if let Some(reason) = params.get("cancellation_reason")
        && !["duplicate", "fraudulent", "requested_by_customer", "abandoned"].contains(&reason)
    {
        return Err(StripeError::invalid(
            None,
            format!(
                "Invalid cancellation_reason: {reason:?}; must be one of duplicate, fraudulent, requested_by_customer, or abandoned"
            ),
        )
        .param("cancellation_reason"));
    }
    let request = VoidRequest {
        idempotency_key: key,
        intent_id: id,
        correlation_id: correlation_id(headers),
    };
    let sandbox = state.sandbox.clone();
    let call = request.clone();
    let result = detached(async move { PaymentProvider::void(&*sandbox, &call).await }).await;
    tracing::info!(
        idempotency_key = %request.idempotency_key,
        intent = %request.intent_id,
        correlation_id = request.correlation_id.as_deref(),
        traceparent = header(headers, "traceparent"),
        outcome = ?result,
        "sandbox payment_intent cancel"
    );
    let intent = result.map_err(gateway_error)?;
    answer_intent(state, &intent.id).await
}

/// `POST /v1/payment_intents/{id}/_authenticate?success=true|false`: localstripe's stand-in for
/// the customer finishing 3-D Secure in Stripe.js (see the module docs).
async fn authenticate_payment_intent(
    State(state): State<ServerState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    into_response(authenticate_inner(&state, id, &headers, &uri, &body).await)
}

async fn authenticate_inner(
    state: &ServerState,
    id: String,
    headers: &HeaderMap,
    uri: &Uri,
    body: &[u8],
) -> Answer<Json<Value>> {
    // The query string first: `get` answers the first value, and localstripe lets the query win.
    let mut params = Params::query(uri)?;
    params.0.extend(Params::json_or_form(body)?.0);
    if let Some(expected) = &state.api_key
        && !bearer_matches(expected, headers)
        && !params.get("key").is_some_and(|key| key.starts_with("pk_"))
    {
        return Err(StripeError::new(
            StatusCode::UNAUTHORIZED,
            None,
            "missing or wrong API key (Authorization: Bearer <key>, or the browser's key=pk_… in the body)",
        ));
    }
    params.only(
        &[
            "client_secret",
            "success",
            "key",
            "payment_user_agent",
            "referrer",
            "expand[]",
        ],
        &[],
    )?;
    if !id.starts_with("pi_") {
        return Err(StripeError::invalid(None, format!("Invalid payment_intent id: {id:?}")).param("intent"));
    }
    let client_secret = params
        .get("client_secret")
        .ok_or_else(|| StripeError::missing("client_secret"))?
        .to_string();
    // localstripe's rule: `true`/`false` in any case, and no `success` at all is a failure.
    let success = match params.get("success").map(str::to_ascii_lowercase).as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(StripeError::invalid(
                Some("parameter_invalid_boolean"),
                format!("Invalid boolean: {other:?}; success must be true or false"),
            )
            .param("success"));
        }
    };
    let sandbox = state.sandbox.clone();
    let intent_id = id.clone();
    let result = detached(async move { sandbox.authenticate(&intent_id, &client_secret, success).await }).await;
    // Never the client secret: it lets whoever holds it finish the payment.
    tracing::info!(
        intent = %id,
        success,
        traceparent = header(headers, "traceparent"),
        outcome = ?result.as_ref().map(|intent| intent.status.as_str()),
        "sandbox payment_intent authenticate"
    );
    let intent = result.map_err(gateway_error)?;
    answer_intent(state, &intent.id).await
}

/// `POST /v1/refunds`: Stripe's form-encoded refund of a PaymentIntent.
async fn post_refund(State(state): State<ServerState>, headers: HeaderMap, body: Bytes) -> Response {
    into_response(create_intent_refund(&state, &headers, &body).await)
}

async fn create_intent_refund(state: &ServerState, headers: &HeaderMap, body: &[u8]) -> Answer<Json<Value>> {
    let key = stripe_idempotency_key(headers)?;
    let params = Params::parse(body)?;
    if params.get("charge").is_some() && params.get("payment_intent").is_none() {
        return Err(StripeError::invalid(
            Some("parameter_unknown"),
            "the sandbox refunds PaymentIntents: send payment_intent, not charge",
        )
        .param("charge"));
    }
    params.only(&["payment_intent", "amount", "reason", "expand[]"], &["metadata["])?;
    let intent_id = params
        .get("payment_intent")
        .filter(|id| !id.is_empty())
        .ok_or_else(|| StripeError::missing("payment_intent"))?;
    let reason = match params.get("reason") {
        Some(reason) if !REFUND_REASONS.contains(&reason) => {
            return Err(StripeError::invalid(
                None,
                format!("Invalid reason: {reason:?}; must be one of duplicate, fraudulent, or requested_by_customer"),
            )
            .param("reason"));
        }
        // Orderflow's own reasons travel as metadata[reason]; the books keep either.
        reason => reason.or_else(|| params.get("metadata[reason]")).map(str::to_string),
    };
    let intent = booked_intent(state, intent_id)
        .await
        .map_err(|error| match error.status {
            StatusCode::NOT_FOUND => StripeError::not_found(intent_id, "payment_intent"),
            _ => error,
        })?;
    let amount = match params.positive_integer("amount")? {
        Some(amount) => amount,
        // Stripe's default: all that is left. Nothing left of captured money is Stripe's
        // charge_already_refunded (with nothing captured, the gateway says charge_not_captured).
        None if intent.status == "succeeded" && intent.captured_minor <= intent.refunded_minor => {
            return Err(StripeError::invalid(
                Some("charge_already_refunded"),
                format!("PaymentIntent {intent_id} has already been refunded in full."),
            ));
        }
        None if intent.status == "succeeded" => intent.captured_minor - intent.refunded_minor,
        None => intent.amount_minor,
    };
    let request = RefundRequest {
        idempotency_key: key,
        intent_id: intent_id.to_string(),
        amount_minor: amount,
        reason,
        correlation_id: stripe_correlation_id(headers, &params),
    };
    let sandbox = state.sandbox.clone();
    let call = request.clone();
    let result = detached(async move { PaymentProvider::refund(&*sandbox, &call).await }).await;
    tracing::info!(
        idempotency_key = %request.idempotency_key,
        intent = %request.intent_id,
        amount_minor = request.amount_minor,
        correlation_id = request.correlation_id.as_deref(),
        traceparent = header(headers, "traceparent"),
        outcome = ?result,
        "sandbox refund"
    );
    let refund = result.map_err(gateway_error)?;
    let mut metadata = params.metadata();
    metadata.remove("reason");
    Ok(Json(refund_json(
        &refund.id,
        refund.amount_minor,
        &request.intent_id,
        &intent.currency,
        request.reason.as_deref(),
        metadata,
    )))
}

/// `GET /v1/refunds?payment_intent=pi_…`.
async fn list_refunds(State(state): State<ServerState>, uri: Uri) -> Response {
    into_response(list_refunds_inner(&state, &uri).await)
}

async fn list_refunds_inner(state: &ServerState, uri: &Uri) -> Answer<Json<Value>> {
    let params = Params::query(uri)?;
    params.only(&["payment_intent", "limit", "expand[]"], &[])?;
    let intent_id = params
        .get("payment_intent")
        .filter(|id| !id.is_empty())
        .ok_or_else(|| StripeError::missing("payment_intent"))?;
    let limit = params
        .positive_integer("limit")?
        .unwrap_or(i64::from(MAX_PAGE))
        .min(i64::from(MAX_PAGE)) as usize;
    let intent = booked_intent(state, intent_id)
        .await
        .map_err(|error| match error.status {
            StatusCode::NOT_FOUND => StripeError::not_found(intent_id, "payment_intent"),
            _ => error,
        })?;
    let refunds: Vec<SandboxIntentRefund> = state
        .sandbox
        .books()
        .intent_refunds(&intent.id)
        .await
        .map_err(books_failed)?;
    let has_more = refunds.len() > limit;
    let data = refunds
        .iter()
        .take(limit)
        .map(|refund| {
            refund_json(
                &refund.id,
                refund.amount_minor,
                &refund.intent_id,
                &intent.currency,
                refund.reason.as_deref(),
                Map::new(),
            )
        })
        .collect();
    Ok(list_json("/v1/refunds", data, has_more))
}
