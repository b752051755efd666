//! Payment providers. Every call carries an idempotency key derived from the order, so a retry
//! after an ambiguous failure (a timeout after the provider charged) finds the first charge
//! instead of making a second one (invariant I4).

pub mod http;
pub mod intents;
pub mod sandbox;
pub mod sandbox_server;
pub mod stripe;

use async_trait::async_trait;

/// A request to charge a payment method.
#[derive(Clone, Debug)]
pub struct ChargeRequest {
    /// The same for every attempt at this order's payment.
    pub idempotency_key: String,
    pub amount_minor: i64,
    pub currency: String,
    /// The payment-method token the buyer gave (e.g. `tok_visa`).
    pub token: String,
    /// The shop's reference (the order id), shown in the provider's books.
    pub reference: String,
    pub correlation_id: Option<String>,
}

/// A request to refund a charge in full.
#[derive(Clone, Debug)]
pub struct RefundRequest {
    pub idempotency_key: String,
    pub charge_id: String,
    pub amount_minor: i64,
    pub correlation_id: Option<String>,
}

/// Why a provider call did not succeed, classified by what the caller should do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    /// The provider refused the payment (a business outcome): do not retry.
    #[error("declined: {0}")]
    Declined(String),
    /// Timeout, connection failure or 5xx: the outcome is unknown or temporary; retry with the
    /// same idempotency key.
    #[error("provider unavailable: {0}")]
    Transient(String),
    /// The provider rejected the request itself (4xx other than a decline): retrying will not help.
    #[error("rejected by the provider: {0}")]
    Rejected(String),
}

/// A payment provider: the built-in sandbox, or a Stripe-like HTTP API.
#[async_trait]
pub trait PaymentProvider: Send + Sync {
    /// Short name recorded with payments (e.g. `sandbox`).
    fn name(&self) -> &str;
    /// Charges and returns the provider's charge id.
    async fn charge(&self, request: &ChargeRequest) -> Result<String, PaymentError>;
    /// Refunds a charge and returns the provider's refund id.
    async fn refund(&self, request: &RefundRequest) -> Result<String, PaymentError>;
}
