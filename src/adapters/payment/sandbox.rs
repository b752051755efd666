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
//! | `tok_threeDSecure`, `pm_card_threeDSecure2Required` | the intent `requires_action` (3-D Secure) |
//!
//! It speaks two contracts while the saga moves to the second: [`PaymentProvider`] (one-step
//! charges, `sandbox_charges`) and [`PaymentGateway`] (Stripe's PaymentIntents: authorize, capture,
//! void, partial refunds; `sandbox_intents`, never refunding more than was captured).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;

use super::intents::{
    AuthorizeRequest, CaptureMethod, CaptureRequest, IntentStatus, PaymentGateway, PaymentIntent, Refund,
    RefundRequest as IntentRefundRequest, VoidRequest,
};
use super::{ChargeRequest, PaymentError, PaymentProvider, RefundRequest};
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

#[async_trait]
impl PaymentProvider for Sandbox {
    fn name(&self) -> &str {
        "sandbox"
    }

    async fn charge(&self, request: &ChargeRequest) -> Result<String, PaymentError> {
        let store_error = |e: crate::store::StoreError| PaymentError::Transient(format!("sandbox books: {e}"));
        if request.amount_minor <= 0 {
            return Err(PaymentError::Rejected("amount must be positive".into()));
        }
        match request.token.as_str() {
            "tok_chargeDeclined" => return Err(PaymentError::Declined("card_declined".into())),
            "tok_unavailable" if self.outage.load(Ordering::SeqCst) => return Err(unavailable()),
            "tok_flaky" => {
                let calls = self
                    .books
                    .count_call(&request.idempotency_key)
                    .await
                    .map_err(store_error)?;
                if calls <= FLAKY_FAILURES {
                    return Err(PaymentError::Transient(format!(
                        "503 service unavailable (flaky call {calls})"
                    )));
                }
            }
            token if !token.starts_with("tok_") => {
                return Err(PaymentError::Declined("invalid_payment_token".into()));
            }
            _ => {}
        }
        let charge = self
            .books
            .record_charge(
                &request.idempotency_key,
                &request.token,
                request.amount_minor,
                &request.currency,
                &request.reference,
            )
            .await
            .map_err(store_error)?;
        if request.token == "tok_timeout" && charge.first_call {
            // The charge is on the books, but the caller never hears back.
            return Err(PaymentError::Transient("timed out waiting for the provider".into()));
        }
        Ok(charge.id)
    }

    async fn refund(&self, request: &RefundRequest) -> Result<String, PaymentError> {
        match self
            .books
            .record_refund(&request.idempotency_key, &request.charge_id, request.amount_minor)
            .await
        {
            Ok(Some(id)) => Ok(id),
            Ok(None) => Err(PaymentError::Rejected(format!("no such charge {}", request.charge_id))),
            Err(e) => Err(PaymentError::Transient(format!("sandbox books: {e}"))),
        }
    }
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
    PaymentIntent {
        status: IntentStatus::parse(&intent.status).unwrap_or(IntentStatus::RequiresPaymentMethod),
        id: intent.id,
        amount_minor: intent.amount_minor,
        amount_captured_minor: intent.captured_minor,
        client_secret: intent.client_secret,
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
}

/// The sandbox in Stripe's PaymentIntents model: the same books and test methods, served
/// in-process (the zero-set-up default) and over HTTP in Stripe's own protocol
/// (`sandbox_server`). Declines are booked as intents in `requires_payment_method`, as Stripe does.
#[async_trait]
impl PaymentGateway for Sandbox {
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

    async fn refund(&self, request: &IntentRefundRequest) -> Result<Refund, PaymentError> {
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
