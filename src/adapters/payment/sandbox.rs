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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;

use super::{ChargeRequest, PaymentError, PaymentProvider, RefundRequest};
use crate::store::sandbox::SandboxBooks;

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
