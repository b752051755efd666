//! The built-in sandbox provider: a real provider's behaviour with test tokens, keeping its own
//! books (`sandbox_*` tables, written in their own transactions — it is "the other side", not
//! part of the shop's transactions).
//!
//! | token | behaviour |
//! |---|---|
//! | `tok_visa` (and any other `tok_…` not below) | approved |
//! | `tok_chargeDeclined` | declined (`card_declined`), nothing charged |
//! | `tok_timeout` | charged, but the first call for a key answers with a timeout (ambiguous); retries with the key find the charge |
//! | `tok_flaky` | the first [`FLAKY_FAILURES`] calls for a key fail with a 503, then approved |
//! | `tok_unavailable` | every call fails with a 503 while the outage lasts ([`Sandbox::set_outage`]) |
//! | `pm_card_visa` (and any other `pm_card_…` not below) | approved (Stripe's test PaymentMethods) |
//! | `pm_card_chargeDeclined` | declined (`card_declined`) |
//! | `tok_threeDSecure`, `pm_card_threeDSecure2Required`, `pm_card_authenticationRequired` | the intent `requires_action` (3-D Secure) until the customer authenticates ([`Sandbox::authenticate`]) |
//!
//! It speaks Stripe's PaymentIntents model ([`PaymentProvider`]: authorize, capture, void, partial
//! refunds never beyond what was captured), booked in `sandbox_intents`. A 3-D Secure intent
//! waits in `requires_action` until the customer authenticates ([`Sandbox::authenticate`], served
//! over HTTP as localstripe's `POST /v1/payment_intents/{id}/_authenticate`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;

use super::PaymentError;
use super::intents::{
    AuthorizeRequest, CaptureMethod, CaptureRequest, IntentStatus, PaymentIntent, PaymentProvider, Refund,
    RefundRequest, VoidRequest,
};
use crate::store::sandbox::{NewSandboxIntent, SandboxBooks, SandboxRefundOutcome};

/// How many calls per key `tok_flaky` fails before it approves.
pub const FLAKY_FAILURES: i64 = 2;

pub struct Sandbox {
    books: Arc<dyn SandboxBooks>,
    /// The `tok_unavailable` outage; on until an operator (or test) ends it.
    outage: AtomicBool,
}

impl Sandbox {
    pub fn new(books: Arc<dyn SandboxBooks>) -> Self {
        Self {
            books,
            outage: AtomicBool::new(true),
        }
    }

    /// Starts or ends the outage that `tok_unavailable` payments hit.
    pub fn set_outage(&self, active: bool) {
        self.outage.store(active, Ordering::SeqCst);
    }

    pub fn books(&self) -> &Arc<dyn SandboxBooks> {
        &self.books
    }
}

fn unavailable() -> PaymentError {
    PaymentError::Transient("503 service unavailable (sandbox outage)".into())
}

/// What a payment method does when an intent is confirmed with it.
enum MethodBehaviour {
    Approve,
    Decline(&'static str),
    /// 3-D Secure: the customer must act.
    RequiresAction,
    /// The first call for a key is booked but its answer is lost (ambiguous timeout).
    TimeOutFirst,
    /// The first [`FLAKY_FAILURES`] calls for a key fail with a 503.
    Flaky,
    /// Fails with a 503 while the outage lasts.
    Outage,
}

/// The sandbox's test payment methods: its own `tok_…` tokens and Stripe's test PaymentMethods.
fn behaviour(method: &str) -> Option<MethodBehaviour> {
    Some(match method {
        "tok_chargeDeclined" | "pm_card_chargeDeclined" | "pm_card_visa_chargeDeclined" => {
            MethodBehaviour::Decline("card_declined")
        }
        "tok_threeDSecure" | "pm_card_threeDSecure2Required" | "pm_card_authenticationRequired" => {
            MethodBehaviour::RequiresAction
        }
        "tok_timeout" => MethodBehaviour::TimeOutFirst,
        "tok_flaky" => MethodBehaviour::Flaky,
        "tok_unavailable" => MethodBehaviour::Outage,
        method if method.starts_with("tok_") || method.starts_with("pm_card_") => MethodBehaviour::Approve,
        _ => return None,
    })
}

fn intent_of(intent: crate::store::sandbox::SandboxIntent) -> PaymentIntent {
    let status = IntentStatus::parse(&intent.status).unwrap_or(IntentStatus::RequiresPaymentMethod);
    PaymentIntent {
        // Only while the customer needs it, as the Stripe client reports it.
        client_secret: intent.client_secret.filter(|_| status == IntentStatus::RequiresAction),
        status,
        id: intent.id,
        amount_minor: intent.amount_minor,
        amount_captured_minor: intent.captured_minor,
        amount_refunded_minor: Some(intent.refunded_minor),
        order_id: intent.order_id,
        last_error: intent.decline_code,
    }
}

fn books_error(error: crate::store::StoreError) -> PaymentError {
    PaymentError::Transient(format!("sandbox books: {error}"))
}

impl Sandbox {
    async fn existing(&self, id: &str) -> Result<crate::store::sandbox::SandboxIntent, PaymentError> {
        self.books
            .intent(id)
            .await
            .map_err(books_error)?
            .ok_or_else(|| PaymentError::Rejected(format!("no such payment_intent: {id}")))
    }

    /// The customer finishes (or fails) 3-D Secure on a `requires_action` intent, as
    /// localstripe's `POST /v1/payment_intents/{id}/_authenticate` does (what its Stripe.js
    /// stand-in calls from the customer's browser): `client_secret` must be the intent's.
    /// Success charges the card — `requires_capture` with manual capture, `succeeded` (all of it
    /// captured) with automatic —; failure leaves the intent `requires_payment_method` with
    /// [`AUTHENTICATION_FAILURE`] as its last error (and, on the wire, no payment method), so a
    /// new confirmation would be needed. One conditional write in the books.
    ///
    /// Rejections, with Stripe's words first: `no such payment_intent: …`, `unauthorized: …` (a
    /// client secret that is not the intent's; localstripe answers 401) and
    /// `payment_intent_unexpected_state: …` (not waiting for authentication, e.g. already
    /// authenticated: localstripe answers 400 to a repeat too).
    pub async fn authenticate(
        &self,
        intent_id: &str,
        client_secret: &str,
        success: bool,
    ) -> Result<PaymentIntent, PaymentError> {
        let intent = self.existing(intent_id).await?;
        if intent.client_secret.as_deref() != Some(client_secret) || client_secret.is_empty() {
            return Err(PaymentError::Rejected(format!(
                "unauthorized: that is not the client_secret of payment_intent {intent_id}"
            )));
        }
        let unexpected = |status: &str| {
            PaymentError::Rejected(format!(
                "payment_intent_unexpected_state: the intent is {status}, it is not waiting for authentication"
            ))
        };
        if intent.status != "requires_action" {
            return Err(unexpected(&intent.status));
        }
        let (to, captured, last_error) = match (success, intent.capture_method.as_str()) {
            (true, "manual") => ("requires_capture", 0, None),
            (true, _) => ("succeeded", intent.amount_minor, None),
            (false, _) => ("requires_payment_method", 0, Some(AUTHENTICATION_FAILURE)),
        };
        match self
            .books
            .authenticate_intent(&intent.id, to, captured, last_error)
            .await
            .map_err(books_error)?
        {
            Some(after) => Ok(intent_of(after)),
            // Another authentication got there first.
            None => Err(unexpected(&self.existing(intent_id).await?.status)),
        }
    }
}

/// The last error of an intent whose 3-D Secure authentication failed (Stripe's code).
pub const AUTHENTICATION_FAILURE: &str = "payment_intent_authentication_failure";

/// The sandbox in Stripe's PaymentIntents model: the same books and test methods, served
/// in-process (the zero-set-up default) and over HTTP in Stripe's own protocol
/// (`sandbox_server`). Declines are booked as intents in `requires_payment_method`, as Stripe does.
#[async_trait]
impl PaymentProvider for Sandbox {
    fn name(&self) -> &str {
        "sandbox"
    }

    async fn authorize(&self, request: &AuthorizeRequest) -> Result<PaymentIntent, PaymentError> {
        if request.amount_minor <= 0 {
            return Err(PaymentError::Rejected("amount must be a positive integer".into()));
        }
        let Some(behaviour) = behaviour(&request.payment_method) else {
            return Err(PaymentError::Declined("invalid_payment_method".into()));
        };
        match behaviour {
            MethodBehaviour::Outage if self.outage.load(Ordering::SeqCst) => return Err(unavailable()),
            MethodBehaviour::Flaky => {
                let calls = self
                    .books
                    .count_call(&request.idempotency_key)
                    .await
                    .map_err(books_error)?;
                if calls <= FLAKY_FAILURES {
                    return Err(PaymentError::Transient(format!(
                        "503 service unavailable (flaky call {calls})"
                    )));
                }
            }
            _ => {}
        }
        let (status, decline) = match (&behaviour, request.capture) {
            (MethodBehaviour::Decline(code), _) => ("requires_payment_method", Some(code.to_string())),
            (MethodBehaviour::RequiresAction, _) => ("requires_action", None),
            (_, CaptureMethod::Manual) => ("requires_capture", None),
            (_, CaptureMethod::Automatic) => ("succeeded", None),
        };
        let (intent, first_call) = self
            .books
            .create_intent(&NewSandboxIntent {
                idempotency_key: request.idempotency_key.clone(),
                payment_method: request.payment_method.clone(),
                amount_minor: request.amount_minor,
                currency: request.currency.clone(),
                // An intent without an order id is not orderflow's (Stripe: no metadata[order_id]).
                order_id: Some(request.order_id.clone()).filter(|order| !order.is_empty()),
                capture_method: match request.capture {
                    CaptureMethod::Manual => "manual",
                    CaptureMethod::Automatic => "automatic",
                },
                status,
                decline_code: decline,
            })
            .await
            .map_err(books_error)?;
        if matches!(behaviour, MethodBehaviour::TimeOutFirst) && first_call {
            // Booked, but the caller never hears back.
            return Err(PaymentError::Transient("timed out waiting for the provider".into()));
        }
        match intent.decline_code.clone() {
            Some(code) => Err(PaymentError::Declined(code)),
            None => Ok(intent_of(intent)),
        }
    }

    async fn capture(&self, request: &CaptureRequest) -> Result<PaymentIntent, PaymentError> {
        let intent = self.existing(&request.intent_id).await?;
        if request.amount_minor <= 0 || request.amount_minor > intent.amount_minor {
            return Err(PaymentError::Rejected(format!(
                "amount_to_capture must be between 1 and {}",
                intent.amount_minor
            )));
        }
        let after = self
            .books
            .transition_intent(&intent.id, "requires_capture", "succeeded", Some(request.amount_minor))
            .await
            .map_err(books_error)?
            .ok_or_else(|| PaymentError::Rejected(format!("no such payment_intent: {}", intent.id)))?;
        match after.status.as_str() {
            // Captured now, or by an earlier attempt with this key (a retry after a lost answer).
            "succeeded" => Ok(intent_of(after)),
            status => Err(PaymentError::Rejected(format!(
                "payment_intent_unexpected_state: the intent is {status}, it cannot be captured"
            ))),
        }
    }

    async fn void(&self, request: &VoidRequest) -> Result<PaymentIntent, PaymentError> {
        let intent = self.existing(&request.intent_id).await?;
        let mut after = intent.clone();
        for from in ["requires_capture", "requires_action", "requires_payment_method"] {
            if after.status == from {
                after = self
                    .books
                    .transition_intent(&intent.id, from, "canceled", None)
                    .await
                    .map_err(books_error)?
                    .unwrap_or(after);
            }
        }
        match after.status.as_str() {
            "canceled" => Ok(intent_of(after)),
            status => Err(PaymentError::Rejected(format!(
                "payment_intent_unexpected_state: the intent is {status}, it cannot be canceled"
            ))),
        }
    }

    async fn refund(&self, request: &RefundRequest) -> Result<Refund, PaymentError> {
        if request.amount_minor <= 0 {
            return Err(PaymentError::Rejected("amount must be a positive integer".into()));
        }
        match self
            .books
            .refund_intent(
                &request.idempotency_key,
                &request.intent_id,
                request.amount_minor,
                request.reason.as_deref(),
            )
            .await
            .map_err(books_error)?
        {
            SandboxRefundOutcome::Refunded { id, amount_minor } => Ok(Refund {
                id,
                amount_minor,
                status: "succeeded".into(),
            }),
            SandboxRefundOutcome::NoSuchIntent => Err(PaymentError::Rejected(format!(
                "no such payment_intent: {}",
                request.intent_id
            ))),
            SandboxRefundOutcome::NotCaptured => Err(PaymentError::Rejected(
                "charge_not_captured: the payment has nothing captured to refund".into(),
            )),
            SandboxRefundOutcome::Exceeds { refundable_minor } => Err(PaymentError::Rejected(format!(
                "amount_too_large: at most {refundable_minor} can be refunded"
            ))),
        }
    }

    async fn retrieve(&self, intent_id: &str) -> Result<PaymentIntent, PaymentError> {
        self.existing(intent_id).await.map(intent_of)
    }

    async fn list_intents(&self) -> Result<Vec<PaymentIntent>, PaymentError> {
        // Only orderflow's (with an order id), as the Stripe client keeps them; the cursor is the
        // last intent of the page, kept or not.
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.books.intents(after.as_deref(), 100).await.map_err(books_error)?;
            let Some(last) = page.last() else {
                return Ok(all);
            };
            after = Some(last.id.clone());
            all.extend(
                page.into_iter()
                    .filter(|intent| intent.order_id.as_deref().is_some_and(|order| !order.is_empty()))
                    .map(intent_of),
            );
        }
    }
}
