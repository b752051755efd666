//! The sandbox provider served over HTTP with the Stripe-like API [`super::http::HttpProvider`]
//! speaks, so the HTTP adapter and the fault tests cross a real network hop. It is backed by the
//! in-process [`Sandbox`]: the same tokens, the same behaviours, the same books.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/charges` | `{amount, currency, source, reference}` + `Idempotency-Key` → `{id, object: "charge", …}` |
//! | `POST /v1/refunds` | `{charge, amount}` + `Idempotency-Key` → `{id, object: "refund", …}` |
//! | `GET /v1/charges?reference=<order id>` | `{object: "list", data: [charges]}` from the books (audits, tests) |
//! | `POST /v1/sandbox/outage` | `{"active": bool}`: starts or ends the `tok_unavailable` outage |
//! | `GET /health` | `{"status": "ok"}` (never needs the API key) |
//!
//! Errors are `{"error": {"code", "message"}}`: 402 for declines, 503 for transient failures,
//! 400 for rejected requests, 401 for a missing or wrong API key (when one is configured), 404 for
//! unknown routes.
//!
//! `tok_timeout` is a *real* timeout here: the charge is recorded, then the answer is held for
//! [`SandboxServerSettings::timeout_answer_delay`] before a 504, so a client whose timeout is
//! shorter genuinely times out while the charge is on the books. Its retry with the same key
//! finds the charge and gets it at once.
//!
//! Each provider call runs in its own task, so a client that hangs up (as a timing-out client
//! does) cannot cancel a charge halfway through being booked.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::http::{CORRELATION_ID_HEADER, IDEMPOTENCY_KEY_HEADER};
use super::sandbox::Sandbox;
use super::{ChargeRequest, PaymentError, PaymentProvider, RefundRequest};

/// The default delay before a `tok_timeout` first call is answered (with a 504): longer than
/// [`super::http::DEFAULT_TIMEOUT`], so a default-configured client really times out.
pub const DEFAULT_TIMEOUT_ANSWER_DELAY: Duration = Duration::from_secs(15);

/// Longest idempotency key accepted (Stripe's limit).
const MAX_KEY_LEN: usize = 255;

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

#[derive(Clone)]
struct ServerState {
    sandbox: Arc<Sandbox>,
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
    let state = ServerState {
        sandbox,
        timeout_answer_delay: settings.timeout_answer_delay,
        stopping: stopping.clone(),
    };
    let key_digest = settings
        .api_key
        .as_deref()
        .map(|key| Sha256::digest(key.trim().as_bytes()));
    let v1 = Router::new()
        .route("/v1/charges", post(create_charge).get(list_charges))
        .route("/v1/refunds", post(create_refund))
        .route("/v1/sandbox/outage", post(set_outage))
        .layer(middleware::from_fn(move |request: Request, next: Next| async move {
            if let Some(expected) = key_digest {
                let presented = request
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(|key| Sha256::digest(key.trim().as_bytes()));
                // Comparing digests: no early exit on the first differing byte of the key.
                if presented != Some(expected) {
                    return error(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "missing or wrong API key (Authorization: Bearer <key>)",
                    );
                }
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

/// A JSON error answer.
fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "error": { "code": code, "message": message } }))).into_response()
}

fn payment_error(failure: &PaymentError) -> Response {
    match failure {
        PaymentError::Declined(code) => error(StatusCode::PAYMENT_REQUIRED, code, "the payment was declined"),
        PaymentError::Transient(message) => error(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", message),
        PaymentError::Rejected(message) => error(StatusCode::BAD_REQUEST, "invalid_request", message),
    }
}

fn bad_request(message: impl std::fmt::Display) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request", &message.to_string())
}

/// The request's idempotency key: required, like a real provider that guarantees at most one
/// charge per key. The error is the `(code, message)` of a 400.
fn idempotency_key(headers: &HeaderMap) -> Result<String, (&'static str, String)> {
    let key = headers
        .get(IDEMPOTENCY_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or_default();
    if key.is_empty() {
        return Err((
            "missing_idempotency_key",
            "an Idempotency-Key header is required".into(),
        ));
    }
    if key.len() > MAX_KEY_LEN {
        return Err((
            "invalid_request",
            format!("the Idempotency-Key is longer than {MAX_KEY_LEN} characters"),
        ));
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

#[derive(Deserialize)]
struct ChargeBody {
    amount: i64,
    currency: String,
    source: String,
    #[serde(default)]
    reference: String,
}

async fn create_charge(
    State(state): State<ServerState>,
    headers: HeaderMap,
    body: Result<Json<ChargeBody>, JsonRejection>,
) -> Response {
    let key = match idempotency_key(&headers) {
        Ok(key) => key,
        Err((code, message)) => return error(StatusCode::BAD_REQUEST, code, &message),
    };
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return bad_request(rejection.body_text()),
    };
    let request = ChargeRequest {
        idempotency_key: key,
        amount_minor: body.amount,
        currency: body.currency,
        token: body.source,
        reference: body.reference,
        correlation_id: correlation_id(&headers),
    };
    let sandbox = state.sandbox.clone();
    let call = request.clone();
    let result = detached(async move { sandbox.charge(&call).await }).await;
    // Never the payment token: it is the customer's payment credential.
    tracing::info!(
        idempotency_key = %request.idempotency_key,
        reference = %request.reference,
        correlation_id = request.correlation_id.as_deref(),
        traceparent = header(&headers, "traceparent"),
        outcome = ?result,
        "sandbox charge"
    );
    match result {
        Ok(id) => (
            StatusCode::OK,
            Json(json!({
                "id": id,
                "object": "charge",
                "amount": request.amount_minor,
                "currency": request.currency,
                "source": request.token,
                "reference": request.reference,
                "status": "succeeded",
            })),
        )
            .into_response(),
        Err(PaymentError::Transient(_)) if request.token == "tok_timeout" => {
            // Charged, but the answer is lost: hold it past the client's patience.
            let mut stopping = state.stopping.subscribe();
            tokio::select! {
                () = tokio::time::sleep(state.timeout_answer_delay) => {}
                _ = stopping.wait_for(|stop| *stop) => {}
            }
            error(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "timed out waiting for the card network (the outcome is unknown; retry with the same Idempotency-Key)",
            )
        }
        Err(e) => payment_error(&e),
    }
}

#[derive(Deserialize)]
struct RefundBody {
    charge: String,
    amount: i64,
}

async fn create_refund(
    State(state): State<ServerState>,
    headers: HeaderMap,
    body: Result<Json<RefundBody>, JsonRejection>,
) -> Response {
    let key = match idempotency_key(&headers) {
        Ok(key) => key,
        Err((code, message)) => return error(StatusCode::BAD_REQUEST, code, &message),
    };
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return bad_request(rejection.body_text()),
    };
    if body.amount <= 0 {
        return bad_request("amount must be positive");
    }
    let request = RefundRequest {
        idempotency_key: key,
        charge_id: body.charge,
        amount_minor: body.amount,
        correlation_id: correlation_id(&headers),
    };
    let sandbox = state.sandbox.clone();
    let call = request.clone();
    let result = detached(async move { sandbox.refund(&call).await }).await;
    tracing::info!(
        idempotency_key = %request.idempotency_key,
        charge = %request.charge_id,
        correlation_id = request.correlation_id.as_deref(),
        traceparent = header(&headers, "traceparent"),
        outcome = ?result,
        "sandbox refund"
    );
    match result {
        Ok(id) => (
            StatusCode::OK,
            Json(json!({
                "id": id,
                "object": "refund",
                "charge": request.charge_id,
                "amount": request.amount_minor,
                "status": "succeeded",
            })),
        )
            .into_response(),
        Err(e) => payment_error(&e),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    reference: Option<String>,
}

async fn list_charges(State(state): State<ServerState>, query: Result<Query<ListQuery>, QueryRejection>) -> Response {
    let reference = match query {
        Ok(Query(ListQuery {
            reference: Some(reference),
        })) if !reference.is_empty() => reference,
        Ok(_) => return bad_request("the reference query parameter is required"),
        Err(rejection) => return bad_request(rejection.body_text()),
    };
    match state.sandbox.books().charges_for(&reference).await {
        Ok(charges) => Json(json!({
            "object": "list",
            "reference": reference,
            "data": charges,
        }))
        .into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            &format!("sandbox books: {e}"),
        ),
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
