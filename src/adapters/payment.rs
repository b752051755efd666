//! Payment providers, in Stripe's PaymentIntents model ([`intents`]: the provider trait and its
//! requests): the built-in [`sandbox`] (in process, or served over HTTP in Stripe's protocol by
//! [`sandbox_server`]) and the [`stripe`] client (real Stripe, localstripe, the served sandbox).
//! Every call carries an idempotency key derived from the order, so a retry after an ambiguous
//! failure (a timeout after the provider acted) finds the first result instead of acting twice
//! (invariant I4).

pub mod intents;
pub mod sandbox;
pub mod sandbox_server;
pub mod stripe;

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
