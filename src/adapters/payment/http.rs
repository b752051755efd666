//! A Stripe-like REST payment provider over HTTP (plain HTTP: this build has no TLS; put a
//! TLS-terminating proxy in front of a provider that needs it).
//!
//! - `POST {base}/v1/charges` with JSON `{amount, currency, source, reference}`
//! - `POST {base}/v1/refunds` with JSON `{charge, amount}`
//!
//! Every call carries the saga's `Idempotency-Key` (the same on every attempt for one order's
//! charge or refund), `X-Correlation-Id` when the job has one, and `Authorization: Bearer <key>`
//! when an API key is configured. The key is never logged, printed by `Debug`, or put in errors.
//!
//! # How answers become [`PaymentError`]s
//!
//! The classification answers one question: *what should the saga do next?*
//!
//! | answer | error | why |
//! |---|---|---|
//! | 2xx with an `id` | — (the charge or refund id) | |
//! | 402 | [`PaymentError::Declined`] (the provider's `error.code`) | a business outcome: cancel the order, do not retry |
//! | 408, 409, 429, any 5xx | [`PaymentError::Transient`] | the provider is busy, overloaded, still working on the same key (409), or failed: retry with the same key later |
//! | timeout, connection error, broken or unreadable answer (also a 2xx without an `id`) | [`PaymentError::Transient`] | the outcome is **unknown** (see below) |
//! | any other 4xx (400, 401, 403, 404, …), or a 1xx/3xx | [`PaymentError::Rejected`] | the request itself is wrong (or the configuration: bad key, bad URL); retrying the same request cannot help, so the job is dead-lettered for an operator |
//!
//! # Why a timeout is Transient, not a failure
//!
//! A timeout is ambiguous: the provider may have charged the card and only the answer was lost
//! (the sandbox's `tok_timeout`). Treating it as a failure would cancel an order whose money was
//! taken; treating it as a success would fulfil an order that was never paid. So it is retried,
//! and because the retry carries the *same* `Idempotency-Key`, a provider that did charge answers
//! with the first charge instead of making a second one: exactly one charge either way (I4).
//! Redirects are not followed for the same reason: a POST silently turned into a GET would
//! lose the charge.

use std::error::Error as _;
use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_trait::async_trait;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{RequestBuilder, StatusCode, Url};
use serde_json::{Value, json};

use super::{ChargeRequest, PaymentError, PaymentProvider, RefundRequest};

/// A sensible request timeout for a real provider: longer than its usual latency, much shorter
/// than a job's lease.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The header that carries the saga's idempotency key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// The header that carries the job's correlation id.
pub const CORRELATION_ID_HEADER: &str = "x-correlation-id";

/// Longest provider message kept in an error (they end up in job histories).
const MAX_MESSAGE: usize = 300;

/// A payment provider reached over HTTP.
pub struct HttpProvider {
    name: String,
    /// The base URL without a trailing `/`.
    base: String,
    /// `Bearer <key>`, marked sensitive so it is never shown.
    authorization: Option<HeaderValue>,
    timeout: Duration,
    client: reqwest::Client,
}

impl fmt::Debug for HttpProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpProvider")
            .field("name", &self.name)
            .field("base", &self.base)
            .field("api_key", &self.authorization.as_ref().map(|_| "***"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl HttpProvider {
    /// A provider at `base_url` (e.g. `http://127.0.0.1:8099`; a path prefix is kept), sending
    /// `api_key` as `Authorization: Bearer` when given, giving up on a call after `timeout`
    /// (connecting, sending and reading the whole answer).
    ///
    /// Fails on a URL that is not plain `http://`, an empty or zero timeout, or an API key that
    /// cannot be sent in a header (the error never contains the key).
    pub fn new(base_url: &str, api_key: Option<String>, timeout: Duration) -> anyhow::Result<Self> {
        let url = Url::parse(base_url).with_context(|| format!("invalid payment provider URL {base_url:?}"))?;
        match url.scheme() {
            "http" => {}
            "https" => bail!(
                "payment provider URL {base_url:?}: https is not supported by this build; \
                 use http:// (e.g. through a TLS-terminating proxy)"
            ),
            other => bail!("payment provider URL {base_url:?}: unsupported scheme {other:?}"),
        }
        if url.host_str().is_none() {
            bail!("payment provider URL {base_url:?} has no host");
        }
        if url.query().is_some() || url.fragment().is_some() {
            bail!("payment provider URL {base_url:?} must not have a query or fragment");
        }
        if timeout.is_zero() {
            bail!("the payment provider timeout must be greater than zero");
        }
        let authorization = match api_key {
            None => None,
            Some(key) if key.trim().is_empty() => bail!("the payment provider API key is empty"),
            Some(key) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {}", key.trim())).map_err(|_| {
                    anyhow::anyhow!("the payment provider API key contains characters not allowed in a header")
                })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("orderflow/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the payment provider HTTP client")?;
        Ok(Self {
            name: "http".to_string(),
            base: url.as_str().trim_end_matches('/').to_string(),
            authorization,
            timeout,
            client,
        })
    }

    /// Records payments under `name` instead of `http` (e.g. the provider's brand).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The base URL calls go to (without a trailing `/`).
    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn post(&self, path: &str, idempotency_key: &str, correlation_id: Option<&str>) -> RequestBuilder {
        let mut request = self
            .client
            .post(format!("{}{path}", self.base))
            .header(IDEMPOTENCY_KEY_HEADER, idempotency_key);
        if let Some(id) = correlation_id {
            request = request.header(CORRELATION_ID_HEADER, id);
        }
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        request
    }

    /// Sends a call and returns the `id` of what it created.
    async fn call(&self, path: &str, idempotency_key: &str, request: RequestBuilder) -> Result<String, PaymentError> {
        // The outgoing call's span (a child of the step's) and its W3C trace context on the wire,
        // so a traced provider continues the order's trace.
        let span = tracing::info_span!("payment.request", otel.name = %format_args!("POST {path}"),
            otel.kind = "client", provider = %self.name, http.request.method = "POST", url.path = %path);
        let mut request = request;
        for (name, value) in span.in_scope(crate::telemetry::current_trace_headers) {
            request = request.header(name, value);
        }
        let started = Instant::now();
        let result = tracing::Instrument::instrument(self.exchange(path, request), span.clone()).await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let _entered = span.enter();
        match &result {
            Ok(id) => {
                tracing::debug!(provider = %self.name, %path, idempotency_key, elapsed_ms, id = %id, "payment provider call succeeded")
            }
            Err(error) => {
                tracing::warn!(provider = %self.name, %path, idempotency_key, elapsed_ms, %error, "payment provider call failed")
            }
        }
        result
    }

    async fn exchange(&self, path: &str, request: RequestBuilder) -> Result<String, PaymentError> {
        let response = request.send().await.map_err(|e| self.transport_error(path, e))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| self.transport_error(path, e))?;
        if !status.is_success() {
            return Err(classify_failure(status, &body));
        }
        // A success we cannot read may still have charged: ambiguous, so retry with the key.
        serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_string))
            .filter(|id| !id.is_empty())
            .ok_or_else(|| {
                PaymentError::Transient(format!(
                    "HTTP {} from POST {path} without an id in the answer (outcome unknown)",
                    status.as_u16()
                ))
            })
    }

    /// No usable answer: timeouts and network failures are ambiguous, hence retried.
    fn transport_error(&self, path: &str, error: reqwest::Error) -> PaymentError {
        if error.is_builder() {
            return PaymentError::Rejected(format!(
                "could not build the request for POST {path}: {}",
                chain(&error)
            ));
        }
        if error.is_timeout() {
            return PaymentError::Transient(format!(
                "timed out after {} ms waiting for POST {path} (outcome unknown; retry with the same key)",
                self.timeout.as_millis()
            ));
        }
        if error.is_connect() {
            return PaymentError::Transient(format!("could not connect for POST {path}: {}", chain(&error)));
        }
        PaymentError::Transient(format!(
            "POST {path} failed without an answer (outcome unknown): {}",
            chain(&error)
        ))
    }
}

/// An error and its sources on one line, without the URL (which could carry credentials).
fn chain(error: &reqwest::Error) -> String {
    let mut text = String::new();
    let mut current: Option<&dyn std::error::Error> = error.source();
    while let Some(e) = current {
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&e.to_string());
        current = e.source();
    }
    if text.is_empty() {
        text = if error.is_timeout() {
            "timed out".into()
        } else {
            "request failed".into()
        };
    }
    text
}

fn truncate(text: &str) -> String {
    let text = text.trim();
    if text.len() <= MAX_MESSAGE {
        return text.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Classifies a non-2xx answer (see the module docs). `body` is read for a Stripe-style
/// `{"error": {"code", "message"}}`; anything else is kept (shortened) as the message.
pub fn classify_failure(status: StatusCode, body: &[u8]) -> PaymentError {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let field = |name: &str| {
        error
            .and_then(|e| e.get(name))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(truncate)
    };
    let code = field("decline_code").or_else(|| field("code"));
    let message = field("message").or_else(|| {
        let text = String::from_utf8_lossy(body);
        (!text.trim().is_empty() && parsed.is_none()).then(|| truncate(&text))
    });
    let describe = || {
        let mut text = format!("HTTP {}", status.as_u16());
        if let Some(reason) = status.canonical_reason() {
            text.push(' ');
            text.push_str(reason);
        }
        if let Some(code) = &code {
            text.push_str(": ");
            text.push_str(code);
        }
        if let Some(message) = &message {
            text.push_str(": ");
            text.push_str(message);
        }
        text
    };
    match status.as_u16() {
        402 => PaymentError::Declined(code.unwrap_or_else(|| "card_declined".to_string())),
        408 | 409 | 429 | 500..=599 => PaymentError::Transient(describe()),
        _ => PaymentError::Rejected(describe()),
    }
}

#[async_trait]
impl PaymentProvider for HttpProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn charge(&self, request: &ChargeRequest) -> Result<String, PaymentError> {
        const PATH: &str = "/v1/charges";
        let body = json!({
            "amount": request.amount_minor,
            "currency": request.currency,
            "source": request.token,
            "reference": request.reference,
        });
        let http = self
            .post(PATH, &request.idempotency_key, request.correlation_id.as_deref())
            .json(&body);
        self.call(PATH, &request.idempotency_key, http).await
    }

    async fn refund(&self, request: &RefundRequest) -> Result<String, PaymentError> {
        const PATH: &str = "/v1/refunds";
        let body = json!({
            "charge": request.charge_id,
            "amount": request.amount_minor,
        });
        let http = self
            .post(PATH, &request.idempotency_key, request.correlation_id.as_deref())
            .json(&body);
        self.call(PATH, &request.idempotency_key, http).await
    }
}
