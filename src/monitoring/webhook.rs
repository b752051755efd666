//! Delivering alerts to webhooks: a durable `deliver_alert` job per webhook and transition,
//! POSTed with an HMAC-SHA256 signature, retried with the queue's backoff, dead-lettered (and
//! replayable) when the receiver stays down.
//!
//! Signature scheme (what a receiver checks):
//! `X-Orderflow-Timestamp: <unix seconds>` and
//! `X-Orderflow-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
//! Signing the timestamp with the body lets a receiver refuse old replays. The message `id` is the
//! same on every retry, so a receiver can drop duplicates.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::metrics::Metrics;
use crate::clock;
use crate::queue::{Step, StepError};
use crate::store::Store;
use crate::store::jobs::{ClaimedJob, CompleteOutcome, StepEffects};

/// The job kind of an alert delivery.
pub const DELIVER_ALERT: &str = "deliver_alert";
pub const SIGNATURE_HEADER: &str = "x-orderflow-signature";
pub const TIMESTAMP_HEADER: &str = "x-orderflow-timestamp";

/// The shared secret of alert signatures; never printed.
#[derive(Clone)]
pub struct WebhookSecret(String);

impl WebhookSecret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(***)")
    }
}

/// `sha256=<hex>` over `"<timestamp>.<body>"`.
pub fn sign(secret: &WebhookSecret, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.0.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks a signature in constant time (for receivers and tests).
pub fn verify(secret: &WebhookSecret, timestamp: i64, body: &[u8], signature: &str) -> bool {
    let Some(hex_mac) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_mac) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.0.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

/// The `deliver_alert` step.
pub struct WebhookStep {
    store: std::sync::Arc<dyn Store>,
    client: reqwest::Client,
    secret: WebhookSecret,
    metrics: Metrics,
}

impl WebhookStep {
    pub fn new(
        store: std::sync::Arc<dyn Store>,
        secret: WebhookSecret,
        timeout: Duration,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            store,
            client,
            secret,
            metrics,
        })
    }
}

#[async_trait]
impl Step for WebhookStep {
    async fn run(&self, job: &ClaimedJob) -> Result<(), StepError> {
        let url = job.payload["url"]
            .as_str()
            .ok_or_else(|| StepError::Fatal("alert job without a url".into()))?;
        let body = job.payload["body"]
            .as_str()
            .ok_or_else(|| StepError::Fatal("alert job without a body".into()))?
            .to_string();
        let timestamp = clock::now().timestamp();
        let signature = sign(&self.secret, timestamp, body.as_bytes());
        let started = Instant::now();
        let sent = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await;
        let status = match sent {
            Ok(response) => response.status(),
            Err(error) => {
                self.metrics.alert_delivery("unreachable");
                return Err(StepError::Retry(format!("alert webhook unreachable: {error}")));
            }
        };
        if !status.is_success() {
            self.metrics.alert_delivery("refused");
            return Err(StepError::Retry(format!("alert webhook answered {status}")));
        }
        self.metrics.alert_delivery("delivered");
        tracing::debug!(%status, elapsed_ms = started.elapsed().as_millis() as u64, "alert delivered");
        match self
            .store
            .complete_job(Some(&job.lease), &StepEffects::default(), clock::now())
            .await
            .map_err(StepError::from)?
        {
            CompleteOutcome::LeaseLost => Err(StepError::LeaseLost),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_bind_the_timestamp() {
        let secret = WebhookSecret::new("s3cret");
        let signature = sign(&secret, 1_700_000_000, b"{\"a\":1}");
        assert!(signature.starts_with("sha256=") && signature.len() == 7 + 64);
        assert!(verify(&secret, 1_700_000_000, b"{\"a\":1}", &signature));
        assert!(!verify(&secret, 1_700_000_001, b"{\"a\":1}", &signature));
        assert!(!verify(&secret, 1_700_000_000, b"{\"a\":2}", &signature));
        assert!(!verify(
            &WebhookSecret::new("other"),
            1_700_000_000,
            b"{\"a\":1}",
            &signature
        ));
        assert_eq!(format!("{secret:?}"), "WebhookSecret(***)");
    }
}
