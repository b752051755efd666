//! The payment contract the saga speaks: Stripe's PaymentIntents model, which every serious
//! provider shares — **authorize** at checkout, **capture** when the goods leave (or at once),
//! **void** an authorization that will not be captured, **refund** captured money (in parts).
//!
//! Every call carries an idempotency key derived from the order and the operation (the same on
//! every attempt), so a retry after an ambiguous failure — a timeout after the provider acted —
//! finds the first result instead of acting twice (invariant I4). Errors are classified by what
//! the saga should do next ([`PaymentError`]).
//!
//! Implementations: the in-process sandbox (`sandbox.rs`, the zero-set-up default) and the Stripe
//! client (`stripe.rs`), which speaks Stripe's own API to real Stripe, to localstripe, and to the
//! sandbox served over HTTP (`orderflow sandbox-provider`).

use async_trait::async_trait;

pub use super::PaymentError;

/// When the money is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureMethod {
    /// Authorize only; [`PaymentProvider::capture`] takes the money later (`capture_method=manual`).
    Manual,
    /// Authorize and capture in one step.
    Automatic,
}

/// Authorize (and with [`CaptureMethod::Automatic`] capture) an order's payment: Stripe's
/// "create a PaymentIntent with `confirm=true`".
#[derive(Clone, Debug)]
pub struct AuthorizeRequest {
    /// The same on every attempt for this order (`orderflow-authorize-<order>`).
    pub idempotency_key: String,
    /// Exact, in the currency's minor units.
    pub amount_minor: i64,
    /// ISO 4217, upper case as the shop stores it (adapters lower-case it for Stripe).
    pub currency: String,
    /// What the buyer pays with: a sandbox test token (`tok_visa`) or a Stripe PaymentMethod
    /// (`pm_card_visa`, `pm_…`).
    pub payment_method: String,
    pub capture: CaptureMethod,
    /// The order id, kept by the provider as `metadata[order_id]` (how books are matched).
    pub order_id: String,
    pub correlation_id: Option<String>,
}

/// Capture an authorized PaymentIntent (all of it, or less: the rest is released).
#[derive(Clone, Debug)]
pub struct CaptureRequest {
    pub idempotency_key: String,
    pub intent_id: String,
    pub amount_minor: i64,
    pub correlation_id: Option<String>,
}

/// Cancel (void) an authorized PaymentIntent that was not captured: the hold is released.
#[derive(Clone, Debug)]
pub struct VoidRequest {
    pub idempotency_key: String,
    pub intent_id: String,
    pub correlation_id: Option<String>,
}

/// Refund captured money, in full or in part.
#[derive(Clone, Debug)]
pub struct RefundRequest {
    /// The same on every attempt for this refund (`orderflow-refund-<refund id>`).
    pub idempotency_key: String,
    pub intent_id: String,
    pub amount_minor: i64,
    /// Stripe's `reason`: `requested_by_customer`, `duplicate` or `fraudulent`; `None` otherwise.
    pub reason: Option<String>,
    pub correlation_id: Option<String>,
}

/// Where a PaymentIntent stands (Stripe's `status`, the ones orderflow acts on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IntentStatus {
    /// The customer must act (3-D Secure): the order waits; Stripe's webhook tells how it ended.
    RequiresAction,
    /// Authorized, not captured.
    RequiresCapture,
    /// Captured.
    Succeeded,
    /// Voided (or never completed).
    Canceled,
    /// The payment method failed (`requires_payment_method` after a confirm): declined.
    RequiresPaymentMethod,
    /// The provider is still working on it (`processing`).
    Processing,
}

impl IntentStatus {
    /// Stripe's name for it.
    pub fn as_str(&self) -> &'static str {
        match self {
            IntentStatus::RequiresAction => "requires_action",
            IntentStatus::RequiresCapture => "requires_capture",
            IntentStatus::Succeeded => "succeeded",
            IntentStatus::Canceled => "canceled",
            IntentStatus::RequiresPaymentMethod => "requires_payment_method",
            IntentStatus::Processing => "processing",
        }
    }

    /// Parses Stripe's `status` (`requires_confirmation` counts as `requires_payment_method`:
    /// the confirm did not go through).
    pub fn parse(status: &str) -> Option<Self> {
        Some(match status {
            "requires_action" => IntentStatus::RequiresAction,
            "requires_capture" => IntentStatus::RequiresCapture,
            "succeeded" => IntentStatus::Succeeded,
            "canceled" => IntentStatus::Canceled,
            "requires_payment_method" | "requires_confirmation" => IntentStatus::RequiresPaymentMethod,
            "processing" => IntentStatus::Processing,
            _ => return None,
        })
    }
}

/// A PaymentIntent as the provider reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentIntent {
    /// The provider's id (`pi_…`).
    pub id: String,
    pub status: IntentStatus,
    pub amount_minor: i64,
    /// Captured so far (Stripe's `amount_received`).
    pub amount_captured_minor: i64,
    /// Refunded so far, when the provider's answer says (Stripe: the expanded `latest_charge`'s
    /// `amount_refunded`, which `list_intents` asks for).
    pub amount_refunded_minor: Option<i64>,
    /// For [`IntentStatus::RequiresAction`]: what the customer's browser needs to finish.
    pub client_secret: Option<String>,
    /// The order it belongs to (`metadata[order_id]`).
    pub order_id: Option<String>,
    /// Why it failed, when it did (the decline code).
    pub last_error: Option<String>,
}

/// A refund as the provider reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refund {
    /// The provider's id (`re_…`).
    pub id: String,
    pub amount_minor: i64,
    /// `succeeded`, `pending` or `failed`.
    pub status: String,
}

/// A payment provider speaking the PaymentIntents model.
#[async_trait]
pub trait PaymentProvider: Send + Sync {
    /// Short name recorded with payments (`sandbox`, `stripe`).
    fn name(&self) -> &str;
    /// Creates and confirms the order's PaymentIntent. A card decline is
    /// [`PaymentError::Declined`] with the decline code; 3-D Secure answers an intent in
    /// [`IntentStatus::RequiresAction`].
    async fn authorize(&self, request: &AuthorizeRequest) -> Result<PaymentIntent, PaymentError>;
    async fn capture(&self, request: &CaptureRequest) -> Result<PaymentIntent, PaymentError>;
    async fn void(&self, request: &VoidRequest) -> Result<PaymentIntent, PaymentError>;
    async fn refund(&self, request: &RefundRequest) -> Result<Refund, PaymentError>;
    /// Reads a PaymentIntent (after a webhook; for the audit).
    async fn retrieve(&self, intent_id: &str) -> Result<PaymentIntent, PaymentError>;
    /// Every PaymentIntent the provider holds for orderflow's orders (`metadata[order_id]` set),
    /// for the audit's comparison of books. Implementations page through everything.
    async fn list_intents(&self) -> Result<Vec<PaymentIntent>, PaymentError>;
}
