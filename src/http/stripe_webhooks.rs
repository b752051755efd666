//! `POST /webhooks/stripe`: Stripe's events about PaymentIntents, the wake-up for orders whose
//! payment waits for the customer (3-D Secure, payment `requires_action`).
//!
//! The event is a **wake-up, not the truth**. An order waiting for its customer whose intent an
//! event is about gets a `charge_payment` job, committed with a timeline entry in one
//! transaction; that step then *retrieves* the intent from the provider and moves the order on
//! (`requires_capture`/`succeeded` → `paid`; `requires_payment_method`/`canceled` → declined,
//! order cancelled, stock released; still `requires_action` → nothing). So the event's own copy
//! of the intent is never trusted for money, a forged or stale event can at worst make the step
//! ask the provider once more, and events arriving late or out of order cannot move an order the
//! wrong way.
//!
//! # Verification
//!
//! The raw body must be signed: `Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">`
//! ([`verify_webhook_signature`]), with the timestamp within [`DEFAULT_WEBHOOK_TOLERANCE`] (5
//! minutes, either way) of now. Any of several `v1` signatures may match (Stripe signs with both
//! secrets while one is rolled), and several secrets may be configured (`--stripe-webhook-secret
//! whsec_new,whsec_old`) for the other side of a roll. Refusals are 400 problems that change
//! nothing: `stripe_signature_missing`, `stripe_signature_malformed`, `stripe_signature_mismatch`,
//! `stripe_signature_expired`.
//!
//! Without a configured secret the route answers **404** `stripe_webhooks_not_configured`: this
//! deployment takes no Stripe events, and an event that cannot be verified must never be acted
//! on. 404 rather than 503 because nothing here is temporarily broken — it is a configuration
//! choice, and a 5xx would count against the service's error-rate alarm and read as an outage.
//! Stripe retries any non-2xx (for up to three days), so events sent before a forgotten secret
//! is configured are still delivered once it is.
//!
//! # Which events
//!
//! `payment_intent.amount_capturable_updated` (authorized, manual capture),
//! `payment_intent.succeeded` (captured), `payment_intent.payment_failed` (authentication or the
//! card failed) and `payment_intent.canceled`. The order is the intent's `metadata[order_id]`,
//! which orderflow sets on every intent it creates (an intent without it is not orderflow's: the
//! audit's comparison of books skips those too); it must still wait for payment, its payment must
//! be `requires_action`, and on *this* intent (`provider_ref`).
//!
//! Everything else — other event types, other objects, unknown orders, orders that moved on,
//! intents that are not the order's — is answered **200** and changes nothing: Stripe retries a
//! non-2xx answer for days and then disables the endpoint, and no retry could ever make those
//! events useful. The answer's body says what was done, for Stripe's dashboard.
//!
//! **Idempotent under redelivery.** Stripe delivers at least once and may send an event again
//! (or two events about one authentication): while a `charge_payment` job of the order is ready
//! or running no second one is enqueued, and once the step has moved the order on, the order no
//! longer waits, so a repeat is ignored.

use std::fmt;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, Problem};
use crate::adapters::payment::stripe::{
    DEFAULT_WEBHOOK_TOLERANCE, SIGNATURE_HEADER, WebhookSignatureError, verify_webhook_signature,
};
use crate::clock;
use crate::domain::{OrderId, OrderStatus};
use crate::store::jobs::{CompleteOutcome, PaymentState, StepEffects};
use crate::store::{NewJob, StoreError};
use crate::workflow::CHARGE_PAYMENT;

/// The event types that can move an order waiting for its customer.
pub const HANDLED_EVENTS: [&str; 4] = [
    "payment_intent.amount_capturable_updated",
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "payment_intent.canceled",
];

/// How `POST /webhooks/stripe` verifies what it receives. `Default`: no secret, the route off.
#[derive(Clone)]
pub struct StripeWebhookSettings {
    /// The endpoint's signing secrets (`whsec_…`): one, or two while a secret is rolled.
    secrets: Vec<String>,
    /// How far from now a signed timestamp may be.
    tolerance: Duration,
}

impl Default for StripeWebhookSettings {
    fn default() -> Self {
        Self {
            secrets: Vec::new(),
            tolerance: DEFAULT_WEBHOOK_TOLERANCE,
        }
    }
}

impl fmt::Debug for StripeWebhookSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeWebhookSettings")
            .field("secrets", &format_args!("[{} × ***]", self.secrets.len()))
            .field("tolerance", &self.tolerance)
            .finish()
    }
}

impl StripeWebhookSettings {
    /// Verifies with `secrets` (none: the route is off; empty ones are skipped, so an empty
    /// `ORDERFLOW_STRIPE_WEBHOOK_SECRET` means none) and Stripe's 5 minutes of tolerance.
    /// Refuses one that is not a Stripe signing secret ([`parse_signing_secret`]).
    pub fn new(secrets: impl IntoIterator<Item = String>) -> anyhow::Result<Self> {
        let mut kept = Vec::new();
        for secret in secrets {
            let secret = parse_signing_secret(&secret).map_err(|error| anyhow::anyhow!("{error}"))?;
            if !secret.is_empty() {
                kept.push(secret);
            }
        }
        Ok(Self {
            secrets: kept,
            ..Self::default()
        })
    }

    /// The same, accepting timestamps within `tolerance` of now.
    pub fn with_tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Whether a secret is configured (the route is on).
    pub fn is_configured(&self) -> bool {
        !self.secrets.is_empty()
    }

    /// Checks `header` over `payload` with each secret; the first success wins, else the most
    /// telling failure (a correct signature with a stale timestamp says more than a mismatch).
    fn verify(&self, payload: &[u8], header: &str) -> Result<(), WebhookSignatureError> {
        let now = clock::now();
        let mut failures = Vec::new();
        for secret in &self.secrets {
            match verify_webhook_signature(payload, header, secret, self.tolerance, now) {
                Ok(()) => return Ok(()),
                Err(error) => failures.push(error),
            }
        }
        let stale = failures
            .iter()
            .position(|error| matches!(error, WebhookSignatureError::OutsideTolerance { .. }));
        Err(match stale {
            Some(at) => failures.swap_remove(at),
            None => failures.into_iter().next().unwrap_or(WebhookSignatureError::NoSecret),
        })
    }
}

/// Checks one `--stripe-webhook-secret` value (trimmed; empty is "none"): it must be a Stripe
/// signing secret, `whsec_…`. The error names the flag, never the value.
pub fn parse_signing_secret(value: &str) -> Result<String, String> {
    let secret = value.trim();
    if !secret.is_empty() && (!secret.starts_with("whsec_") || secret.len() <= "whsec_".len()) {
        return Err(
            "--stripe-webhook-secret (ORDERFLOW_STRIPE_WEBHOOK_SECRET) must be the endpoint's signing \
                    secret (whsec_…, shown with the endpoint in Stripe's dashboard)"
                .into(),
        );
    }
    Ok(secret.to_string())
}

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default().routes(routes!(receive))
}

/// A Stripe Event, as far as orderflow reads it (every other member is accepted and ignored).
#[derive(Deserialize, ToSchema)]
struct StripeEvent {
    /// `evt_…`.
    id: String,
    /// e.g. `payment_intent.succeeded`.
    #[serde(rename = "type")]
    kind: String,
    data: EventData,
}

#[derive(Deserialize, ToSchema)]
struct EventData {
    /// The object the event is about: for `payment_intent.*` a PaymentIntent (`object`, `id`,
    /// `status`, `metadata.order_id`, …).
    #[schema(value_type = Object)]
    object: serde_json::Map<String, Value>,
}

/// What the event did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum Action {
    /// A `charge_payment` step was enqueued: it asks the provider where the intent stands.
    PaymentCheckScheduled,
    /// Nothing changed (see `reason`).
    Ignored,
}

/// The answer Stripe records for a delivery.
#[derive(Serialize, ToSchema)]
struct Received {
    /// Always `true`: the event was verified and taken.
    received: bool,
    action: Action,
    /// Why nothing changed, when nothing did.
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    /// The order the event woke up.
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    order_id: Option<OrderId>,
}

impl Received {
    fn ignored(reason: &'static str) -> Self {
        Self {
            received: true,
            action: Action::Ignored,
            reason: Some(reason),
            order_id: None,
        }
    }
}

/// A 4xx problem with its own code, in the API's problem+json shape.
fn problem(status: StatusCode, code: &'static str, title: &'static str, detail: String) -> Response {
    let body = json!({
        "type": format!("/problems/{code}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
        "code": code,
    });
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

fn signature_problem(error: &WebhookSignatureError) -> Response {
    let code = match error {
        WebhookSignatureError::MalformedHeader(_) | WebhookSignatureError::NoSignature => "stripe_signature_malformed",
        WebhookSignatureError::OutsideTolerance { .. } => "stripe_signature_expired",
        WebhookSignatureError::Mismatch | WebhookSignatureError::NoSecret => "stripe_signature_mismatch",
    };
    problem(
        StatusCode::BAD_REQUEST,
        code,
        "Invalid Stripe signature",
        format!("{error}; the event was not acted on"),
    )
}

/// Receive a Stripe event
///
/// Stripe's webhook endpoint. Register this server's `/webhooks/stripe` URL in Stripe's dashboard
/// (Developers → Webhooks) for `payment_intent.amount_capturable_updated`,
/// `payment_intent.succeeded`, `payment_intent.payment_failed` and `payment_intent.canceled`, and
/// start orderflow with its signing secret (`--stripe-webhook-secret whsec_…`). The body must be
/// signed in the `Stripe-Signature` header (`t=<unix seconds>,v1=<hex HMAC-SHA256 of
/// "<t>.<body>">`, within 5 minutes of now; any of several `v1`s may match). An event about an
/// order whose payment waits for the customer (3-D Secure) makes the payment step ask the
/// provider where the PaymentIntent stands; every other verified event is answered 200 and
/// changes nothing.
#[utoipa::path(
    post,
    path = "/webhooks/stripe",
    operation_id = "receiveStripeEvent",
    tag = "stripe",
    request_body(content = StripeEvent, content_type = "application/json", description = "A Stripe Event, exactly as Stripe sent it (the signature covers these bytes)."),
    responses(
        (status = 200, description = "Verified and taken: `action` says whether it woke an order up (`payment_check_scheduled`) or changed nothing (`ignored`, with the `reason`).", body = Received),
        (status = 400, description = "Nothing was done: `stripe_signature_missing`, `stripe_signature_malformed`, `stripe_signature_mismatch` (not signed with the configured secret), `stripe_signature_expired` (signed more than 5 minutes from now), `malformed_json` or `invalid_event` (verified, but not a Stripe Event).", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`stripe_webhooks_not_configured`: this deployment has no Stripe webhook secret (`--stripe-webhook-secret`), so it takes no Stripe events.", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn receive(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let settings = &state.stripe_webhooks;
    if !settings.is_configured() {
        return problem(
            StatusCode::NOT_FOUND,
            "stripe_webhooks_not_configured",
            "Stripe webhooks are not configured",
            "this deployment has no Stripe webhook signing secret (--stripe-webhook-secret, \
             ORDERFLOW_STRIPE_WEBHOOK_SECRET), so it cannot verify Stripe's events and takes none"
                .into(),
        );
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return ApiError::unsupported_media_type().into_response();
    }
    let Some(signature) = headers.get(SIGNATURE_HEADER) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "stripe_signature_missing",
            "Missing Stripe signature",
            "a Stripe event must carry its Stripe-Signature header; the event was not acted on".into(),
        );
    };
    let Some(signature) = signature.to_str().ok() else {
        return signature_problem(&WebhookSignatureError::MalformedHeader("not visible ASCII"));
    };
    if let Err(error) = settings.verify(&body, signature) {
        tracing::warn!(%error, "refused a Stripe webhook whose signature does not verify");
        return signature_problem(&error);
    }
    let event: StripeEvent = match serde_json::from_slice::<Value>(&body) {
        Err(error) => return ApiError::malformed_json(format!("the event is not JSON: {error}")).into_response(),
        Ok(value) => match serde_json::from_value(value) {
            Ok(event) => event,
            Err(error) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "invalid_event",
                    "Not a Stripe event",
                    format!("the body is not a Stripe Event ({error})"),
                );
            }
        },
    };
    match handle(&state, &event).await {
        Ok(received) => {
            tracing::info!(
                event_id = %event.id,
                event_type = %event.kind,
                action = ?received.action,
                reason = received.reason,
                order_id = received.order_id.map(tracing::field::display),
                "Stripe webhook"
            );
            Json(received).into_response()
        }
        // A 5xx (or 503 with Retry-After): Stripe retries later, which is what an outage needs.
        Err(error) => ApiError::from(error).into_response(),
    }
}

/// Wakes up the order the event is about, when it is waiting for its customer (module docs).
async fn handle(state: &AppState, event: &StripeEvent) -> Result<Received, StoreError> {
    if !HANDLED_EVENTS.contains(&event.kind.as_str()) {
        return Ok(Received::ignored("event_type_not_handled"));
    }
    let intent = &event.data.object;
    if intent.get("object").and_then(Value::as_str) != Some("payment_intent") {
        return Ok(Received::ignored("not_a_payment_intent"));
    }
    let Some(intent_id) = intent.get("id").and_then(Value::as_str) else {
        return Ok(Received::ignored("not_a_payment_intent"));
    };
    let Some(order_id) = intent
        .get("metadata")
        .and_then(|m| m.get("order_id"))
        .and_then(Value::as_str)
        .and_then(|id| id.parse::<OrderId>().ok())
    else {
        return Ok(Received::ignored("not_an_orderflow_payment"));
    };
    let Some(details) = state.store.get_order(order_id).await? else {
        return Ok(Received::ignored("unknown_order"));
    };
    if details.order.status != OrderStatus::PendingPayment {
        return Ok(Received::ignored("order_not_waiting_for_payment"));
    }
    let Some(payment) = state.store.payment(order_id).await? else {
        return Ok(Received::ignored("payment_not_waiting_for_customer"));
    };
    if payment.state() != Some(PaymentState::RequiresAction) {
        return Ok(Received::ignored("payment_not_waiting_for_customer"));
    }
    if payment.provider_ref.as_deref() != Some(intent_id) {
        return Ok(Received::ignored("not_the_orders_payment_intent"));
    }
    // Redelivered (or a second event about the same authentication) before the step ran.
    let scheduled = state
        .store
        .jobs_for_order(order_id)
        .await?
        .iter()
        .any(|job| job.kind == CHARGE_PAYMENT && matches!(job.state.as_str(), "ready" | "running"));
    if scheduled {
        return Ok(Received {
            order_id: Some(order_id),
            ..Received::ignored("payment_check_already_scheduled")
        });
    }
    let now = clock::now();
    let effects = StepEffects {
        order_id: Some(order_id),
        expect_status: vec![OrderStatus::PendingPayment],
        events: vec![("stripe_webhook".into(), Some(format!("{} {}", event.kind, event.id)))],
        enqueue: vec![NewJob {
            kind: CHARGE_PAYMENT,
            payload: crate::telemetry::with_trace_context(json!({ "order_id": order_id })),
            run_at: now,
            max_attempts: state.saga.max_attempts,
        }],
        ..Default::default()
    };
    Ok(match state.store.complete_job(None, &effects, now).await? {
        CompleteOutcome::Completed => {
            state.monitoring.metrics.step_enqueued(CHARGE_PAYMENT, 1);
            Received {
                received: true,
                action: Action::PaymentCheckScheduled,
                reason: None,
                order_id: Some(order_id),
            }
        }
        // Cancelled or expired meanwhile.
        _ => Received::ignored("order_not_waiting_for_payment"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_refuse_what_is_not_a_signing_secret() {
        assert!(!StripeWebhookSettings::default().is_configured());
        assert!(!StripeWebhookSettings::new(Vec::new()).unwrap().is_configured());
        let settings = StripeWebhookSettings::new(["whsec_a".to_string(), " whsec_b ".to_string()]).unwrap();
        assert!(settings.is_configured());
        assert_eq!(settings.secrets, ["whsec_a", "whsec_b"]);
        assert!(!format!("{settings:?}").contains("whsec_"), "{settings:?}");
        assert!(
            !StripeWebhookSettings::new(["".to_string(), " ".to_string()])
                .unwrap()
                .is_configured()
        );
        for bad in ["sk_test_123", "whsec_", "whsec"] {
            let error = StripeWebhookSettings::new([bad.to_string()]).unwrap_err().to_string();
            assert!(error.contains("--stripe-webhook-secret"), "{error}");
            assert!(!error.contains("sk_test"), "the value never shows: {error}");
        }
    }

    #[test]
    fn any_configured_secret_verifies_and_a_stale_signature_says_so() {
        use crate::adapters::payment::stripe::webhook_signature_header;
        let payload = br#"{"id":"evt_1"}"#;
        let settings = StripeWebhookSettings::new(["whsec_new".to_string(), "whsec_old".to_string()]).unwrap();
        let now = clock::now();
        for secret in ["whsec_new", "whsec_old"] {
            assert_eq!(
                settings.verify(payload, &webhook_signature_header(payload, secret, now)),
                Ok(())
            );
        }
        assert_eq!(
            settings.verify(payload, &webhook_signature_header(payload, "whsec_other", now)),
            Err(WebhookSignatureError::Mismatch)
        );
        let stale = webhook_signature_header(payload, "whsec_old", now - chrono::TimeDelta::minutes(10));
        assert!(matches!(
            settings.verify(payload, &stale),
            Err(WebhookSignatureError::OutsideTolerance { .. })
        ));
    }
}
