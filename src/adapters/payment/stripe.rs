//! The Stripe client: [`PaymentProvider`] over Stripe's own API — form-encoded PaymentIntents and
//! Refunds under a pinned [`STRIPE_VERSION`] — for real Stripe (`https://api.stripe.com`), for
//! localstripe, and for the sandbox served over HTTP (`orderflow sandbox-provider`). Also the
//! verifier of Stripe's webhook signatures ([`verify_webhook_signature`]).
//!
//! # Why no Stripe crate
//!
//! `async-stripe`, the maintained Rust client, is generated from Stripe's whole OpenAPI spec. Its
//! current line (1.0.0-rc.10) is a release candidate, needs Rust 1.89 (this crate's MSRV is 1.85),
//! brings its own hyper client, and even with only the `payment_intent`/`refund` features of
//! `async-stripe-core` it compiles `async-stripe-shared`, about 240,000 lines of generated types
//! (plus about 90,000 in `async-stripe-core`): far past the build budget (2 cores) for six calls.
//! So this is a small typed client over `reqwest`, already a dependency: `.form()` (reqwest 0.12
//! encodes with serde_urlencoded behind no feature) for Stripe's `a[b][c]=v` bodies, rustls for
//! TLS. No new crate.
//!
//! # What goes on the wire
//!
//! Every request: `Authorization: Bearer sk_…` (also `rk_…`, a restricted key), `Stripe-Version:`
//! [`STRIPE_VERSION`], `User-Agent: orderflow/<version>`, `X-Correlation-Id` when the job has one,
//! and the W3C trace context. Every POST: the saga's `Idempotency-Key` (the same on every attempt),
//! never empty. Redirects are never followed.
//!
//! | operation | call |
//! |---|---|
//! | [`authorize`](PaymentProvider::authorize) | `POST /v1/payment_intents` `amount`, `currency` (lower case), `payment_method=pm_…` — or, for a `tok_…` token, `payment_method_data[type]=card&payment_method_data[card][token]=tok_…` —, `payment_method_types[]=card`, `confirm=true`, `capture_method=manual\|automatic`, `metadata[order_id]`, `metadata[correlation_id]` |
//! | [`capture`](PaymentProvider::capture) | `POST /v1/payment_intents/{id}/capture` `amount_to_capture` |
//! | [`void`](PaymentProvider::void) | `POST /v1/payment_intents/{id}/cancel` (no parameters) |
//! | [`refund`](PaymentProvider::refund) | `POST /v1/refunds` `payment_intent`, `amount`, `reason` (only Stripe's [`REFUND_REASONS`]; any other goes to `metadata[reason]`), `metadata[idempotency_key]`, `metadata[correlation_id]` |
//! | [`retrieve`](PaymentProvider::retrieve) | `GET /v1/payment_intents/{id}` |
//! | [`list_intents`](PaymentProvider::list_intents) | `GET /v1/payment_intents?limit=100&starting_after=…` until `has_more` is false; keeps those with `metadata[order_id]` |
//!
//! Why `payment_method_types[]=card` rather than `automatic_payment_methods`: since API version
//! 2023-08-16 a PaymentIntent created without `payment_method_types` has automatic payment methods
//! on, and confirming one server-side then needs a `return_url` (or
//! `automatic_payment_methods[allow_redirects]=never`). Naming `card` confirms server-side without
//! redirects on real Stripe — 3-D Secure still answers `requires_action` with the `client_secret`
//! for Stripe.js — and it is the only one of the two that localstripe accepts (it answers 400
//! `Unexpected automatic_payment_methods`). `tok_…` tokens become a PaymentMethod through
//! `payment_method_data[card][token]`, Stripe's documented bridge for legacy tokens.
//!
//! # How answers become [`PaymentError`]s
//!
//! What should the saga do next?
//!
//! | answer | result | why |
//! |---|---|---|
//! | 2xx with a readable object | the [`PaymentIntent`] / [`Refund`] | a `200` intent in `requires_payment_method` is returned as is: the saga reads it as declined |
//! | 402, or `error.type = card_error` | [`PaymentError::Declined`] (`error.decline_code`, else `error.code`, else `card_declined`) | a business outcome: cancel the order, do not retry |
//! | 408, 409, 429, any 5xx; `Stripe-Should-Retry: true`; `error.type = idempotency_error`; `error.code = lock_timeout` | [`PaymentError::Transient`] | busy, rate-limited, another request with the same key still running, or failed: retry later with the same key |
//! | timeout, connection error, broken answer, 2xx we cannot read (no `id`, unknown `status`) | [`PaymentError::Transient`] | the outcome is **unknown** (see below) |
//! | any other 4xx (400 `invalid_request_error`, 401 bad key, 403, 404), a 1xx/3xx | [`PaymentError::Rejected`] with a short message | the request or the configuration is wrong; the same request cannot succeed: parked for an operator |
//!
//! A `Stripe-Should-Retry: false` does not turn a 5xx or 429 into a rejection: the saga's retries
//! are bounded anyway. `idempotency_error` is Transient as the contract asks: for a concurrent
//! request with the same key (409) a retry finds the first result; for a key reused with other
//! parameters (400, a bug) retrying cannot help, but the saga's bounded retries park it all the same.
//!
//! A timeout is ambiguous: Stripe may have authorized, captured or refunded and only the answer
//! was lost. Treating it as a failure would cancel a paid order; as a success, ship an unpaid one.
//! So it is retried with the *same* `Idempotency-Key`, and Stripe answers the retry with the saved
//! first answer instead of acting twice (I4). (Stripe saves the first answer once the endpoint
//! started, 500s included: a retry after a saved 500 gets the 500 again, and the step parks once
//! its retries are spent — the audit then compares books through [`PaymentProvider::list_intents`].)
//!
//! # Secrets
//!
//! The secret key is kept only as a header value marked sensitive; it is never logged, printed by
//! `Debug`, or put in an error. Stripe's own messages mask keys (`sk_test_****1234`), and every
//! provider message is passed through a redaction of `sk_…`/`rk_…`/`whsec_…` tokens anyway before
//! it reaches an error (errors end up in job histories). A live key (`sk_live_…`) is refused over
//! plain `http://`. Client secrets are kept only for `requires_action` (the customer needs it).
//!
//! # What localstripe (1.15.10) lacks, and how this client copes
//!
//! - **No idempotency**: `Idempotency-Key` is ignored (a retry acts twice), so I4 cannot be shown
//!   against it; the sandbox covers it.
//! - **No `amount_received`** on PaymentIntents: the captured amount is then read from the
//!   embedded `latest_charge` (`amount_captured`, else `amount` when `captured`). Real Stripe
//!   always sends `amount_received`, which wins. (After a *partial* capture localstripe reports the
//!   charge's full amount, and it creates a Refund for the released rest — Stripe stopped doing
//!   that in 2025-03-31.basil.)
//! - **Rejects parameters it does not know** (400 `Unexpected …`): `payment_method_data` (so
//!   `tok_…` tokens do not work against it; `pm_card_visa` does), `automatic_payment_methods`,
//!   and a refund's `reason` — send `reason: None` to it. Capture and cancel are sent with no
//!   extra parameters for this reason too.
//! - **Declines**: only `pm_card_chargeCustomerFail` declines a PaymentIntent (402 `card_declined`,
//!   with `type: invalid_request_error` where Stripe says `card_error` — hence the 402 rule);
//!   `pm_card_visa_chargeDeclined` is approved and `pm_card_chargeDeclined` is unknown (404).
//! - **No refund bookkeeping checks**: a refund beyond what is left is accepted (Stripe answers
//!   400 `invalid_request_error`), so "never more than captured" is orderflow's own check, shown
//!   against the sandbox.
//! - **Any `sk_…` key longer than five characters is valid**; others get 401.
//! - Lists run oldest first (Stripe: newest first); `starting_after` paging works the same.

use std::error::Error as _;
use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;
use sha2::Sha256;

use super::PaymentError;
use super::intents::{
    AuthorizeRequest, CaptureMethod, CaptureRequest, IntentStatus, PaymentIntent, PaymentProvider, Refund,
    RefundRequest, VoidRequest,
};

/// Real Stripe.
pub const DEFAULT_API_BASE: &str = "https://api.stripe.com";

/// The API version every request is pinned to (`Stripe-Version`), so a change of the account's
/// default version cannot change what this client sends or reads: the version Stripe's official
/// SDKs pinned in their October 2025 releases. Move it deliberately, after reading Stripe's
/// changelog for PaymentIntents and Refunds (and run these tests against the sandbox again).
pub const STRIPE_VERSION: &str = "2025-10-29.clover";

/// A request timeout for real Stripe: longer than its usual latency, much shorter than a lease.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How old (or how far ahead) a webhook's signed timestamp may be: Stripe's libraries' 5 minutes.
pub const DEFAULT_WEBHOOK_TOLERANCE: Duration = Duration::from_secs(300);

/// The header Stripe signs webhooks in.
pub const SIGNATURE_HEADER: &str = "stripe-signature";

/// The header that carries the saga's idempotency key on every POST.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// The header that pins the API version.
pub const STRIPE_VERSION_HEADER: &str = "stripe-version";
/// The job's correlation id (Stripe ignores it; the sandbox logs it).
pub const CORRELATION_ID_HEADER: &str = "x-correlation-id";

/// The refund `reason`s Stripe accepts.
pub const REFUND_REASONS: [&str; 3] = ["duplicate", "fraudulent", "requested_by_customer"];

/// Stripe's largest page.
const PAGE_SIZE: &str = "100";
/// A bound on paging (a million intents), so a provider that always says `has_more` cannot loop us.
const MAX_PAGES: usize = 10_000;
/// Longest provider message kept in an error.
const MAX_MESSAGE: usize = 300;

/// How to reach Stripe.
#[derive(Clone)]
pub struct StripeSettings {
    /// `https://api.stripe.com` ([`DEFAULT_API_BASE`]), or localstripe's / the sandbox's
    /// `http://host:port` (a path prefix is kept).
    pub api_base: String,
    /// `sk_…` (or a restricted `rk_…`). Never logged, printed or put in errors.
    pub secret_key: String,
    /// For each call: connecting, sending and reading the whole answer.
    pub timeout: Duration,
}

impl StripeSettings {
    /// Real Stripe with `secret_key` and [`DEFAULT_TIMEOUT`].
    pub fn new(secret_key: impl Into<String>) -> Self {
        Self {
            api_base: DEFAULT_API_BASE.to_string(),
            secret_key: secret_key.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl fmt::Debug for StripeSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeSettings")
            .field("api_base", &self.api_base)
            .field("secret_key", &"***")
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The Stripe client (see the module docs).
pub struct StripeClient {
    /// The base URL without a trailing `/`.
    base: String,
    /// `Bearer sk_…`, marked sensitive.
    authorization: HeaderValue,
    timeout: Duration,
    client: reqwest::Client,
}

impl fmt::Debug for StripeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeClient")
            .field("base", &self.base)
            .field("secret_key", &"***")
            .field("stripe_version", &STRIPE_VERSION)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl StripeClient {
    /// Fails on a base URL that is not `http(s)://host[:port][/prefix]`, a zero timeout, a key
    /// that is not `sk_…`/`rk_…` (a publishable `pk_…` key cannot make these calls) or cannot be
    /// sent in a header, or a live key over plain `http://`. No error contains the key.
    pub fn new(settings: StripeSettings) -> anyhow::Result<Self> {
        let StripeSettings {
            api_base,
            secret_key,
            timeout,
        } = settings;
        let url = Url::parse(&api_base).with_context(|| format!("invalid Stripe API base {api_base:?}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!("Stripe API base {api_base:?}: the scheme must be https (or http for a local emulator)");
        }
        if url.host_str().is_none() {
            bail!("Stripe API base {api_base:?} has no host");
        }
        if url.query().is_some() || url.fragment().is_some() {
            bail!("Stripe API base {api_base:?} must not have a query or fragment");
        }
        if !url.username().is_empty() || url.password().is_some() {
            bail!("the Stripe API base must not carry credentials; the key goes in --stripe-secret-key");
        }
        if timeout.is_zero() {
            bail!("the Stripe timeout must be greater than zero");
        }
        let key = secret_key.trim();
        if key.is_empty() {
            bail!("the Stripe secret key is empty");
        }
        if key.starts_with("pk_") {
            bail!("the Stripe key is a publishable key (pk_…); server-side calls need the secret key (sk_…)");
        }
        if !key.starts_with("sk_") && !key.starts_with("rk_") {
            bail!("the Stripe key must be a secret key (sk_…) or a restricted key (rk_…)");
        }
        if url.scheme() == "http" && (key.starts_with("sk_live_") || key.starts_with("rk_live_")) {
            bail!("refusing to send a live Stripe key over plain http ({api_base:?}); use https");
        }
        let mut authorization = HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| anyhow::anyhow!("the Stripe secret key contains characters not allowed in a header"))?;
        authorization.set_sensitive(true);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("orderflow/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the Stripe HTTP client")?;
        Ok(Self {
            base: url.as_str().trim_end_matches('/').to_string(),
            authorization,
            timeout,
            client,
        })
    }

    /// The base URL calls go to (without a trailing `/`).
    pub fn api_base(&self) -> &str {
        &self.base
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// One call; the answer's JSON on a 2xx, else the classified error.
    async fn call(&self, method: Method, path: &str, call: Call<'_>) -> Result<Value, PaymentError> {
        let span = tracing::info_span!("payment.request", otel.name = %format_args!("{method} {path}"),
            otel.kind = "client", provider = "stripe", http.request.method = %method, url.path = %path);
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.base))
            .header(AUTHORIZATION, self.authorization.clone())
            .header(STRIPE_VERSION_HEADER, STRIPE_VERSION);
        if let Some(key) = call.idempotency_key {
            request = request.header(IDEMPOTENCY_KEY_HEADER, key);
        }
        if let Some(id) = call.correlation_id {
            request = request.header(CORRELATION_ID_HEADER, id);
        }
        for (name, value) in span.in_scope(crate::telemetry::current_trace_headers) {
            request = request.header(name, value);
        }
        if !call.query.is_empty() {
            request = request.query(call.query);
        }
        if let Some(form) = call.form {
            request = request.form(form);
        }
        let started = Instant::now();
        let result = tracing::Instrument::instrument(self.exchange(&method, path, request), span.clone()).await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let _entered = span.enter();
        let idempotency_key = call.idempotency_key.unwrap_or("");
        match &result {
            Ok(_) => {
                tracing::debug!(provider = "stripe", %method, %path, idempotency_key, elapsed_ms, "Stripe call succeeded")
            }
            Err(error) => {
                tracing::warn!(provider = "stripe", %method, %path, idempotency_key, elapsed_ms, %error, "Stripe call failed")
            }
        }
        result
    }

    async fn exchange(
        &self,
        method: &Method,
        path: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<Value, PaymentError> {
        let response = request
            .send()
            .await
            .map_err(|e| self.transport_error(method, path, e))?;
        let status = response.status();
        let should_retry = response
            .headers()
            .get("stripe-should-retry")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| match v.trim() {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            });
        let body = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(method, path, e))?;
        if !status.is_success() {
            return Err(classify_failure(status, should_retry, &body));
        }
        // A success we cannot read may still have acted: ambiguous, so retried with the key.
        serde_json::from_slice::<Value>(&body)
            .ok()
            .filter(Value::is_object)
            .ok_or_else(|| {
                PaymentError::Transient(format!(
                    "HTTP {} from {method} {path} with an answer that is not a JSON object (outcome unknown)",
                    status.as_u16()
                ))
            })
    }

    /// No usable answer: timeouts and network failures are ambiguous, hence retried.
    fn transport_error(&self, method: &Method, path: &str, error: reqwest::Error) -> PaymentError {
        if error.is_builder() {
            return PaymentError::Rejected(format!(
                "could not build the request for {method} {path}: {}",
                chain(&error)
            ));
        }
        if error.is_timeout() {
            return PaymentError::Transient(format!(
                "timed out after {} ms waiting for {method} {path} (outcome unknown; retry with the same key)",
                self.timeout.as_millis()
            ));
        }
        if error.is_connect() {
            return PaymentError::Transient(format!("could not connect for {method} {path}: {}", chain(&error)));
        }
        PaymentError::Transient(format!(
            "{method} {path} failed without an answer (outcome unknown): {}",
            chain(&error)
        ))
    }

    async fn post_intent(&self, path: &str, call: Call<'_>) -> Result<PaymentIntent, PaymentError> {
        let value = self.call(Method::POST, path, call).await?;
        parse_payment_intent(&value).map_err(|why| unreadable("POST", path, &why))
    }
}

/// What one call carries besides its method and path.
#[derive(Default)]
struct Call<'a> {
    idempotency_key: Option<&'a str>,
    correlation_id: Option<&'a str>,
    query: &'a [(&'a str, String)],
    form: Option<&'a [(String, String)]>,
}

fn unreadable(method: &str, path: &str, why: &str) -> PaymentError {
    PaymentError::Transient(format!("unreadable answer to {method} {path}: {why} (outcome unknown)"))
}

/// The saga's key, checked before anything is sent: a POST without one could act twice.
fn idempotency_key(key: &str) -> Result<&str, PaymentError> {
    let key = key.trim();
    if key.is_empty() {
        return Err(PaymentError::Rejected("no idempotency key for a Stripe POST".into()));
    }
    if key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(PaymentError::Rejected(
            "the idempotency key must be at most 255 visible ASCII characters".into(),
        ));
    }
    Ok(key)
}

/// `/v1/payment_intents/{id}{suffix}`, refusing ids that could change the path.
fn intent_path(id: &str, suffix: &str) -> Result<String, PaymentError> {
    if id.is_empty() || id.len() > 255 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(PaymentError::Rejected(format!(
            "not a PaymentIntent id: {:?}",
            truncate(&redact_keys(id))
        )));
    }
    Ok(format!("/v1/payment_intents/{id}{suffix}"))
}

fn pair(key: &str, value: impl Into<String>) -> (String, String) {
    (key.to_string(), value.into())
}

/// The form of `POST /v1/payment_intents` (see the module docs).
fn authorize_form(request: &AuthorizeRequest) -> Result<Vec<(String, String)>, PaymentError> {
    let method = request.payment_method.trim();
    if method.is_empty() {
        return Err(PaymentError::Rejected("no payment method to authorize".into()));
    }
    let mut form = vec![
        pair("amount", request.amount_minor.to_string()),
        pair("currency", request.currency.trim().to_ascii_lowercase()),
        pair("confirm", "true"),
        pair(
            "capture_method",
            match request.capture {
                CaptureMethod::Manual => "manual",
                CaptureMethod::Automatic => "automatic",
            },
        ),
        pair("payment_method_types[]", "card"),
    ];
    if method.starts_with("tok_") {
        form.push(pair("payment_method_data[type]", "card"));
        form.push(pair("payment_method_data[card][token]", method));
    } else {
        form.push(pair("payment_method", method));
    }
    form.push(pair("metadata[order_id]", request.order_id.as_str()));
    if let Some(id) = &request.correlation_id {
        form.push(pair("metadata[correlation_id]", id.as_str()));
    }
    Ok(form)
}

/// The form of `POST /v1/refunds`.
fn refund_form(request: &RefundRequest) -> Vec<(String, String)> {
    let mut form = vec![
        pair("payment_intent", request.intent_id.as_str()),
        pair("amount", request.amount_minor.to_string()),
    ];
    match request.reason.as_deref().map(str::trim) {
        Some(reason) if REFUND_REASONS.contains(&reason) => form.push(pair("reason", reason)),
        Some(reason) if !reason.is_empty() => form.push(pair("metadata[reason]", reason)),
        _ => {}
    }
    form.push(pair("metadata[idempotency_key]", request.idempotency_key.trim()));
    if let Some(id) = &request.correlation_id {
        form.push(pair("metadata[correlation_id]", id.as_str()));
    }
    form
}

fn non_empty_str<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// Reads a Stripe PaymentIntent object (an API answer, or a webhook event's `data.object`).
/// `Err` says why it cannot be read (no `id`, no `amount`, a `status` orderflow does not know).
pub fn parse_payment_intent(object: &Value) -> Result<PaymentIntent, String> {
    if let Some(kind) = object.get("object").and_then(Value::as_str)
        && kind != "payment_intent"
    {
        return Err(format!("a {kind:?} object where a payment_intent was expected"));
    }
    let id = non_empty_str(object, "id").ok_or("no PaymentIntent id")?.to_string();
    let status_text = non_empty_str(object, "status").ok_or("no PaymentIntent status")?;
    let status = IntentStatus::parse(status_text)
        .ok_or_else(|| format!("unknown PaymentIntent status {:?}", truncate(status_text)))?;
    let amount = object
        .get("amount")
        .and_then(Value::as_i64)
        .ok_or("no PaymentIntent amount")?;
    let amount_captured = captured_amount(object, &status, amount);
    let amount_refunded = object
        .get("latest_charge")
        .filter(|c| c.is_object())
        .and_then(|charge| charge.get("amount_refunded"))
        .and_then(Value::as_i64);
    let client_secret = match status {
        IntentStatus::RequiresAction => non_empty_str(object, "client_secret").map(str::to_string),
        _ => None,
    };
    let order_id = object
        .get("metadata")
        .and_then(|m| non_empty_str(m, "order_id"))
        .map(str::to_string);
    let last_error = object.get("last_payment_error").and_then(|e| {
        non_empty_str(e, "decline_code")
            .or_else(|| non_empty_str(e, "code"))
            .map(str::to_string)
    });
    Ok(PaymentIntent {
        id,
        status,
        amount_minor: amount,
        amount_captured_minor: amount_captured,
        amount_refunded_minor: amount_refunded,
        client_secret,
        order_id,
        last_error,
    })
}

/// `amount_received` (real Stripe always sends it); localstripe has none, so the embedded
/// `latest_charge` is read instead (see the module docs).
fn captured_amount(object: &Value, status: &IntentStatus, amount: i64) -> i64 {
    if let Some(received) = object.get("amount_received").and_then(Value::as_i64) {
        return received;
    }
    if let Some(charge) = object.get("latest_charge").filter(|c| c.is_object()) {
        if let Some(captured) = charge.get("amount_captured").and_then(Value::as_i64) {
            return captured;
        }
        let captured = charge.get("captured").and_then(Value::as_bool) == Some(true);
        let succeeded = charge.get("status").and_then(Value::as_str) == Some("succeeded");
        return if captured && succeeded {
            charge.get("amount").and_then(Value::as_i64).unwrap_or(amount)
        } else {
            0
        };
    }
    if *status == IntentStatus::Succeeded { amount } else { 0 }
}

/// Reads a Stripe Refund object.
pub fn parse_refund(object: &Value) -> Result<Refund, String> {
    if let Some(kind) = object.get("object").and_then(Value::as_str)
        && kind != "refund"
    {
        return Err(format!("a {kind:?} object where a refund was expected"));
    }
    Ok(Refund {
        id: non_empty_str(object, "id").ok_or("no refund id")?.to_string(),
        amount_minor: object.get("amount").and_then(Value::as_i64).ok_or("no refund amount")?,
        status: non_empty_str(object, "status").ok_or("no refund status")?.to_string(),
    })
}

/// Classifies a non-2xx answer from Stripe (see the module docs). `should_retry` is Stripe's
/// `Stripe-Should-Retry` header; `body` is read for Stripe's `{"error": {type, code,
/// decline_code, message, param}}`. Messages are shortened and keys redacted.
pub fn classify_failure(status: StatusCode, should_retry: Option<bool>, body: &[u8]) -> PaymentError {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let field = |name: &str| {
        error
            .and_then(|e| non_empty_str(e, name))
            .map(|s| truncate(&redact_keys(s)))
    };
    let kind = field("type");
    let code = field("code");
    let decline_code = field("decline_code");
    let message = field("message").or_else(|| {
        let text = String::from_utf8_lossy(body);
        (parsed.is_none() && !text.trim().is_empty()).then(|| truncate(&redact_keys(&text)))
    });
    let describe = || {
        let mut text = format!("HTTP {}", status.as_u16());
        if let Some(reason) = status.canonical_reason() {
            text.push(' ');
            text.push_str(reason);
        }
        for part in [&kind, &code].into_iter().flatten() {
            text.push_str(": ");
            text.push_str(part);
        }
        if let Some(message) = &message {
            text.push_str(": ");
            text.push_str(message);
        }
        if let Some(param) = field("param") {
            text.push_str(&format!(" (param {param})"));
        }
        if status.is_redirection() {
            text.push_str(" (redirects are not followed: check the Stripe API base)");
        }
        text
    };
    if status == StatusCode::PAYMENT_REQUIRED || kind.as_deref() == Some("card_error") {
        return PaymentError::Declined(decline_code.or(code).unwrap_or_else(|| "card_declined".to_string()));
    }
    let transient = should_retry == Some(true)
        || matches!(status.as_u16(), 408 | 409 | 429 | 500..=599)
        || kind.as_deref() == Some("idempotency_error")
        || code.as_deref() == Some("lock_timeout");
    if transient {
        PaymentError::Transient(describe())
    } else {
        PaymentError::Rejected(describe())
    }
}

/// An error and its sources on one line, without the URL.
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
    truncate(&redact_keys(&text))
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

/// Replaces what follows `sk_`, `rk_` and `whsec_` (at a word start) with `***`.
fn redact_keys(text: &str) -> String {
    const PREFIXES: [&str; 3] = ["sk_", "rk_", "whsec_"];
    let is_key_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '*';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut previous: Option<char> = None;
    while let Some(c) = rest.chars().next() {
        let at_word_start = !previous.is_some_and(is_key_char);
        if at_word_start && let Some(prefix) = PREFIXES.iter().find(|p| rest.starts_with(**p)) {
            out.push_str(prefix);
            out.push_str("***");
            let tail = &rest[prefix.len()..];
            let key_len = tail.find(|c: char| !is_key_char(c)).unwrap_or(tail.len());
            rest = &tail[key_len..];
            previous = Some('*');
            continue;
        }
        out.push(c);
        previous = Some(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[async_trait]
impl PaymentProvider for StripeClient {
    fn name(&self) -> &str {
        "stripe"
    }

    async fn authorize(&self, request: &AuthorizeRequest) -> Result<PaymentIntent, PaymentError> {
        let form = authorize_form(request)?;
        let call = Call {
            idempotency_key: Some(idempotency_key(&request.idempotency_key)?),
            correlation_id: request.correlation_id.as_deref(),
            form: Some(form.as_slice()),
            ..Call::default()
        };
        self.post_intent("/v1/payment_intents", call).await
    }

    async fn capture(&self, request: &CaptureRequest) -> Result<PaymentIntent, PaymentError> {
        let path = intent_path(&request.intent_id, "/capture")?;
        let form = [pair("amount_to_capture", request.amount_minor.to_string())];
        let call = Call {
            idempotency_key: Some(idempotency_key(&request.idempotency_key)?),
            correlation_id: request.correlation_id.as_deref(),
            form: Some(form.as_slice()),
            ..Call::default()
        };
        self.post_intent(&path, call).await
    }

    async fn void(&self, request: &VoidRequest) -> Result<PaymentIntent, PaymentError> {
        let path = intent_path(&request.intent_id, "/cancel")?;
        let call = Call {
            idempotency_key: Some(idempotency_key(&request.idempotency_key)?),
            correlation_id: request.correlation_id.as_deref(),
            form: Some(&[][..]),
            ..Call::default()
        };
        self.post_intent(&path, call).await
    }

    async fn refund(&self, request: &RefundRequest) -> Result<Refund, PaymentError> {
        const PATH: &str = "/v1/refunds";
        intent_path(&request.intent_id, "")?;
        let form = refund_form(request);
        let call = Call {
            idempotency_key: Some(idempotency_key(&request.idempotency_key)?),
            correlation_id: request.correlation_id.as_deref(),
            form: Some(form.as_slice()),
            ..Call::default()
        };
        let value = self.call(Method::POST, PATH, call).await?;
        parse_refund(&value).map_err(|why| unreadable("POST", PATH, &why))
    }

    async fn retrieve(&self, intent_id: &str) -> Result<PaymentIntent, PaymentError> {
        let path = intent_path(intent_id, "")?;
        let value = self.call(Method::GET, &path, Call::default()).await?;
        parse_payment_intent(&value).map_err(|why| unreadable("GET", &path, &why))
    }

    async fn list_intents(&self) -> Result<Vec<PaymentIntent>, PaymentError> {
        const PATH: &str = "/v1/payment_intents";
        let mut intents = Vec::new();
        let mut starting_after: Option<String> = None;
        for _ in 0..MAX_PAGES {
            // The charge carries the refunded amount the audit compares.
            let mut query = vec![
                ("limit", PAGE_SIZE.to_string()),
                ("expand[]", "data.latest_charge".to_string()),
            ];
            if let Some(after) = &starting_after {
                query.push(("starting_after", after.clone()));
            }
            let call = Call {
                query: &query,
                ..Call::default()
            };
            let page = self.call(Method::GET, PATH, call).await?;
            let data = page
                .get("data")
                .and_then(Value::as_array)
                .ok_or_else(|| unreadable("GET", PATH, "a list without data"))?;
            for object in data {
                // Intents that are not orderflow's (no order id) are skipped unread.
                let ours = object
                    .get("metadata")
                    .and_then(|m| non_empty_str(m, "order_id"))
                    .is_some();
                if ours {
                    intents.push(parse_payment_intent(object).map_err(|why| unreadable("GET", PATH, &why))?);
                }
            }
            if page.get("has_more").and_then(Value::as_bool) != Some(true) {
                return Ok(intents);
            }
            let last = data
                .last()
                .and_then(|o| non_empty_str(o, "id"))
                .ok_or_else(|| unreadable("GET", PATH, "has_more on a page without a last id"))?;
            starting_after = Some(last.to_string());
        }
        Err(PaymentError::Transient(format!(
            "GET {PATH}: still has_more after {MAX_PAGES} pages; giving up"
        )))
    }
}

/// Why a Stripe webhook was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WebhookSignatureError {
    /// No webhook secret is configured (or it is empty): nothing can be verified.
    #[error("no Stripe webhook secret configured")]
    NoSecret,
    /// The `Stripe-Signature` header is not `t=<unix seconds>,v1=<hex>[,v1=…]`.
    #[error("malformed Stripe-Signature header: {0}")]
    MalformedHeader(&'static str),
    /// The header has a timestamp but no `v1` signature.
    #[error("no v1 signature in the Stripe-Signature header")]
    NoSignature,
    /// No `v1` signature is the HMAC of this payload with this secret.
    #[error("no v1 signature matches the payload")]
    Mismatch,
    /// Correctly signed, but the signed timestamp is further from now than the tolerance
    /// (a replay, or a badly wrong clock).
    #[error("the signed timestamp is {age_seconds} s from now, outside the {tolerance_seconds} s tolerance")]
    OutsideTolerance { age_seconds: i64, tolerance_seconds: u64 },
}

fn webhook_mac(payload: &[u8], secret: &str, timestamp: i64) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; Stripe keys with the whole `whsec_…` string.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    mac
}

/// Verifies Stripe's `Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<payload>">[,v1=…]`
/// over the raw request body: any `v1` that matches passes (Stripe sends several while a secret
/// is being rolled); `v0` and other schemes are ignored; signatures are compared in constant
/// time. Then the timestamp must be within `tolerance` of `now`, in either direction (Stripe's
/// libraries only refuse old ones; one from further ahead than the tolerance is refused too).
/// [`DEFAULT_WEBHOOK_TOLERANCE`] is Stripe's 5 minutes.
pub fn verify_webhook_signature(
    payload: &[u8],
    header: &str,
    secret: &str,
    tolerance: Duration,
    now: DateTime<Utc>,
) -> Result<(), WebhookSignatureError> {
    if secret.is_empty() {
        return Err(WebhookSignatureError::NoSecret);
    }
    let mut timestamp: Option<i64> = None;
    let mut signatures: Vec<&str> = Vec::new();
    for item in header.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let Some((key, value)) = item.split_once('=') else {
            return Err(WebhookSignatureError::MalformedHeader("an item without '='"));
        };
        match key.trim() {
            "t" => {
                if timestamp.is_some() {
                    return Err(WebhookSignatureError::MalformedHeader("more than one timestamp"));
                }
                let value = value.trim();
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(WebhookSignatureError::MalformedHeader(
                        "the timestamp is not unix seconds",
                    ));
                }
                timestamp = Some(
                    value
                        .parse()
                        .map_err(|_| WebhookSignatureError::MalformedHeader("the timestamp is out of range"))?,
                );
            }
            "v1" => signatures.push(value.trim()),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(WebhookSignatureError::MalformedHeader("no timestamp (t=)"))?;
    if signatures.is_empty() {
        return Err(WebhookSignatureError::NoSignature);
    }
    let mac = webhook_mac(payload, secret, timestamp);
    let matched = signatures
        .iter()
        .filter_map(|signature| hex::decode(signature).ok())
        .any(|expected| mac.clone().verify_slice(&expected).is_ok());
    if !matched {
        return Err(WebhookSignatureError::Mismatch);
    }
    let age_seconds = now.timestamp().saturating_sub(timestamp);
    if age_seconds.unsigned_abs() > tolerance.as_secs() {
        return Err(WebhookSignatureError::OutsideTolerance {
            age_seconds,
            tolerance_seconds: tolerance.as_secs(),
        });
    }
    Ok(())
}

/// A `Stripe-Signature` header value for `payload` signed with `secret` at `timestamp`, as Stripe
/// would send it (for tests and for replaying events to ourselves).
pub fn webhook_signature_header(payload: &[u8], secret: &str, timestamp: DateTime<Utc>) -> String {
    let t = timestamp.timestamp();
    let signature = hex::encode(webhook_mac(payload, secret, t).finalize().into_bytes());
    format!("t={t},v1={signature}")
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::json;

    use super::*;

    fn authorize_request(method: &str, capture: CaptureMethod) -> AuthorizeRequest {
        AuthorizeRequest {
            idempotency_key: "orderflow-authorize-o1".into(),
            amount_minor: 4200,
            currency: "EUR".into(),
            payment_method: method.into(),
            capture,
            order_id: "o1".into(),
            correlation_id: Some("corr-1".into()),
        }
    }

    fn get<'a>(form: &'a [(String, String)], key: &str) -> Vec<&'a str> {
        form.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
    }

    #[test]
    fn authorize_form_for_a_payment_method() {
        let form = authorize_form(&authorize_request("pm_card_visa", CaptureMethod::Manual)).unwrap();
        assert_eq!(get(&form, "amount"), ["4200"]);
        assert_eq!(get(&form, "currency"), ["eur"]);
        assert_eq!(get(&form, "confirm"), ["true"]);
        assert_eq!(get(&form, "capture_method"), ["manual"]);
        assert_eq!(get(&form, "payment_method_types[]"), ["card"]);
        assert_eq!(get(&form, "payment_method"), ["pm_card_visa"]);
        assert!(get(&form, "payment_method_data[type]").is_empty());
        assert_eq!(get(&form, "metadata[order_id]"), ["o1"]);
        assert_eq!(get(&form, "metadata[correlation_id]"), ["corr-1"]);
    }

    #[test]
    fn authorize_form_for_a_token() {
        let mut request = authorize_request("tok_visa", CaptureMethod::Automatic);
        request.correlation_id = None;
        let form = authorize_form(&request).unwrap();
        assert_eq!(get(&form, "capture_method"), ["automatic"]);
        assert!(get(&form, "payment_method").is_empty());
        assert_eq!(get(&form, "payment_method_data[type]"), ["card"]);
        assert_eq!(get(&form, "payment_method_data[card][token]"), ["tok_visa"]);
        assert!(get(&form, "metadata[correlation_id]").is_empty());
        assert!(matches!(
            authorize_form(&authorize_request("  ", CaptureMethod::Manual)),
            Err(PaymentError::Rejected(_))
        ));
    }

    #[test]
    fn refund_form_sends_only_stripes_reasons() {
        let mut request = RefundRequest {
            idempotency_key: "orderflow-refund-r1".into(),
            intent_id: "pi_1".into(),
            amount_minor: 500,
            reason: Some("requested_by_customer".into()),
            correlation_id: None,
        };
        let form = refund_form(&request);
        assert_eq!(get(&form, "payment_intent"), ["pi_1"]);
        assert_eq!(get(&form, "amount"), ["500"]);
        assert_eq!(get(&form, "reason"), ["requested_by_customer"]);
        assert_eq!(get(&form, "metadata[idempotency_key]"), ["orderflow-refund-r1"]);
        request.reason = Some("damaged".into());
        let form = refund_form(&request);
        assert!(get(&form, "reason").is_empty());
        assert_eq!(get(&form, "metadata[reason]"), ["damaged"]);
        request.reason = None;
        let form = refund_form(&request);
        assert!(get(&form, "reason").is_empty() && get(&form, "metadata[reason]").is_empty());
    }

    #[test]
    fn keys_and_ids_are_checked_before_sending() {
        assert!(matches!(idempotency_key(""), Err(PaymentError::Rejected(_))));
        assert!(matches!(idempotency_key("a b"), Err(PaymentError::Rejected(_))));
        assert!(matches!(
            idempotency_key(&"k".repeat(256)),
            Err(PaymentError::Rejected(_))
        ));
        assert_eq!(
            idempotency_key(" orderflow-capture-o1 ").unwrap(),
            "orderflow-capture-o1"
        );
        assert_eq!(
            intent_path("pi_123", "/capture").unwrap(),
            "/v1/payment_intents/pi_123/capture"
        );
        for bad in ["", "pi_1/../../v1/refunds", "pi_1?x=1", "pi 1"] {
            assert!(
                matches!(intent_path(bad, ""), Err(PaymentError::Rejected(_))),
                "{bad:?}"
            );
        }
    }

    /// A PaymentIntent as real Stripe answers (abridged).
    fn stripe_intent(status: &str) -> Value {
        json!({
            "id": "pi_3Q", "object": "payment_intent", "amount": 4200, "amount_capturable": 4200,
            "amount_received": 0, "capture_method": "manual", "client_secret": "pi_3Q_secret_abc",
            "currency": "eur", "latest_charge": "ch_3Q", "last_payment_error": null,
            "metadata": {"order_id": "o1", "correlation_id": "corr-1"}, "status": status
        })
    }

    #[test]
    fn parses_real_stripe_intents() {
        let intent = parse_payment_intent(&stripe_intent("requires_capture")).unwrap();
        assert_eq!(intent.id, "pi_3Q");
        assert_eq!(intent.status, IntentStatus::RequiresCapture);
        assert_eq!(intent.amount_minor, 4200);
        assert_eq!(intent.amount_captured_minor, 0);
        assert_eq!(intent.order_id.as_deref(), Some("o1"));
        assert_eq!(
            intent.client_secret, None,
            "the client secret is kept only for requires_action"
        );
        assert_eq!(intent.last_error, None);

        let intent = parse_payment_intent(&stripe_intent("requires_action")).unwrap();
        assert_eq!(intent.client_secret.as_deref(), Some("pi_3Q_secret_abc"));

        let mut succeeded = stripe_intent("succeeded");
        succeeded["amount_received"] = json!(3000);
        assert_eq!(parse_payment_intent(&succeeded).unwrap().amount_captured_minor, 3000);

        let mut failed = stripe_intent("requires_payment_method");
        failed["last_payment_error"] =
            json!({"type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds"});
        let intent = parse_payment_intent(&failed).unwrap();
        assert_eq!(intent.status, IntentStatus::RequiresPaymentMethod);
        assert_eq!(intent.last_error.as_deref(), Some("insufficient_funds"));
        failed["last_payment_error"] = json!({"code": "payment_intent_authentication_failure"});
        assert_eq!(
            parse_payment_intent(&failed).unwrap().last_error.as_deref(),
            Some("payment_intent_authentication_failure")
        );
    }

    #[test]
    fn parses_localstripe_intents_without_amount_received() {
        let charge = |captured: bool| json!({"id": "ch_1", "object": "charge", "amount": 4200, "captured": captured, "status": "succeeded"});
        let mut intent = json!({
            "id": "pi_L", "object": "payment_intent", "amount": 4200, "status": "requires_capture",
            "latest_charge": charge(false), "metadata": {"order_id": "o2"}
        });
        assert_eq!(parse_payment_intent(&intent).unwrap().amount_captured_minor, 0);
        intent["status"] = json!("succeeded");
        intent["latest_charge"] = charge(true);
        assert_eq!(parse_payment_intent(&intent).unwrap().amount_captured_minor, 4200);
        intent["latest_charge"] = json!(null);
        assert_eq!(parse_payment_intent(&intent).unwrap().amount_captured_minor, 4200);
        intent["status"] = json!("canceled");
        assert_eq!(parse_payment_intent(&intent).unwrap().amount_captured_minor, 0);
    }

    #[test]
    fn unreadable_intents_are_refused() {
        let mut no_id = stripe_intent("succeeded");
        no_id.as_object_mut().unwrap().remove("id");
        assert!(parse_payment_intent(&no_id).is_err());
        assert!(parse_payment_intent(&stripe_intent("some_future_status")).is_err());
        let mut no_amount = stripe_intent("succeeded");
        no_amount["amount"] = json!("4200");
        assert!(parse_payment_intent(&no_amount).is_err());
        assert!(parse_payment_intent(&json!({"id": "re_1", "object": "refund", "status": "succeeded"})).is_err());
        // requires_confirmation: the confirm did not go through.
        assert_eq!(
            parse_payment_intent(&stripe_intent("requires_confirmation"))
                .unwrap()
                .status,
            IntentStatus::RequiresPaymentMethod
        );
    }

    #[test]
    fn parses_refunds() {
        let refund = parse_refund(&json!({"id": "re_1", "object": "refund", "amount": 500, "status": "succeeded"}));
        assert_eq!(
            refund.unwrap(),
            Refund {
                id: "re_1".into(),
                amount_minor: 500,
                status: "succeeded".into()
            }
        );
        assert!(parse_refund(&json!({"id": "re_1", "amount": 500})).is_err());
        assert!(parse_refund(&json!({"amount": 500, "status": "pending"})).is_err());
    }

    fn classify(status: u16, should_retry: Option<bool>, body: Value) -> PaymentError {
        classify_failure(
            StatusCode::from_u16(status).unwrap(),
            should_retry,
            body.to_string().as_bytes(),
        )
    }

    #[test]
    fn card_errors_are_declines_with_the_decline_code() {
        let body = json!({"error": {"type": "card_error", "code": "card_declined", "decline_code": "generic_decline",
            "message": "Your card was declined.", "payment_intent": {"id": "pi_1", "status": "requires_payment_method"}}});
        assert_eq!(
            classify(402, None, body),
            PaymentError::Declined("generic_decline".into())
        );
        let body = json!({"error": {"type": "card_error", "code": "expired_card"}});
        assert_eq!(classify(402, None, body), PaymentError::Declined("expired_card".into()));
        // localstripe: a 402 typed invalid_request_error.
        let body = json!({"error": {"type": "invalid_request_error", "code": "card_declined", "charge": "ch_1"}});
        assert_eq!(
            classify(402, None, body),
            PaymentError::Declined("card_declined".into())
        );
        assert_eq!(
            classify_failure(StatusCode::PAYMENT_REQUIRED, None, b""),
            PaymentError::Declined("card_declined".into())
        );
    }

    #[test]
    fn busy_failed_or_concurrent_is_transient() {
        for (status, body) in [
            (
                429,
                json!({"error": {"type": "invalid_request_error", "code": "rate_limit"}}),
            ),
            (
                429,
                json!({"error": {"type": "invalid_request_error", "code": "lock_timeout"}}),
            ),
            (
                409,
                json!({"error": {"type": "idempotency_error", "message": "another request in progress"}}),
            ),
            (
                400,
                json!({"error": {"type": "idempotency_error", "message": "Keys for idempotent requests can only be used with the same parameters"}}),
            ),
            (
                500,
                json!({"error": {"type": "api_error", "message": "Something went wrong"}}),
            ),
            (502, json!(null)),
            (503, json!({})),
            (408, json!({})),
        ] {
            assert!(
                matches!(classify(status, None, body.clone()), PaymentError::Transient(_)),
                "{status} {body}"
            );
        }
        let gateway_page = classify_failure(StatusCode::BAD_GATEWAY, None, b"<html>502 Bad Gateway</html>");
        assert!(matches!(&gateway_page, PaymentError::Transient(m) if m.contains("502") && m.contains("html")));
        // Stripe-Should-Retry: true wins over the status; false does not make a 5xx final.
        let body = json!({"error": {"type": "api_error"}});
        assert!(matches!(
            classify(400, Some(true), body.clone()),
            PaymentError::Transient(_)
        ));
        assert!(matches!(classify(503, Some(false), body), PaymentError::Transient(_)));
    }

    #[test]
    fn other_client_errors_are_rejected_with_a_short_message() {
        let body = json!({"error": {"type": "invalid_request_error", "code": "parameter_unknown",
            "message": "Received unknown parameter: foo", "param": "foo"}});
        let PaymentError::Rejected(message) = classify(400, None, body) else {
            panic!("not rejected")
        };
        assert_eq!(
            message,
            "HTTP 400 Bad Request: invalid_request_error: parameter_unknown: Received unknown parameter: foo (param foo)"
        );
        let body = json!({"error": {"type": "invalid_request_error", "code": "resource_missing"}});
        assert!(matches!(classify(404, None, body), PaymentError::Rejected(_)));
        assert!(matches!(classify(403, None, json!({})), PaymentError::Rejected(_)));
        let redirect = classify_failure(StatusCode::TEMPORARY_REDIRECT, None, b"");
        assert!(matches!(&redirect, PaymentError::Rejected(m) if m.contains("redirects are not followed")));
        let long = classify_failure(StatusCode::BAD_REQUEST, None, "x".repeat(5000).as_bytes());
        assert!(matches!(&long, PaymentError::Rejected(m) if m.len() < MAX_MESSAGE + 100));
    }

    #[test]
    fn keys_never_reach_errors() {
        let body = json!({"error": {"type": "invalid_request_error",
            "message": "Invalid API Key provided: sk_test_51Hxyz****************abcd"}});
        let PaymentError::Rejected(message) = classify(401, None, body) else {
            panic!("not rejected")
        };
        assert!(message.contains("Invalid API Key provided: sk_***"), "{message}");
        assert!(!message.contains("51Hxyz") && !message.contains("abcd"), "{message}");
        assert_eq!(
            redact_keys("keys sk_live_abc, rk_test_def and whsec_ghi; not disk_full or task_1"),
            "keys sk_***, rk_*** and whsec_***; not disk_full or task_1"
        );
        assert_eq!(redact_keys("(sk_test_x)"), "(sk_***)");
    }

    #[test]
    fn settings_are_checked_and_never_show_the_key() {
        let ok = |base: &str, key: &str| {
            StripeClient::new(StripeSettings {
                api_base: base.into(),
                secret_key: key.into(),
                timeout: Duration::from_secs(1),
            })
        };
        let client = ok("https://api.stripe.com/", "sk_test_secretvalue").unwrap();
        assert_eq!(client.api_base(), "https://api.stripe.com");
        assert_eq!(client.name(), "stripe");
        assert!(!format!("{client:?}").contains("secretvalue"));
        assert!(ok("http://127.0.0.1:8420", "rk_test_secretvalue").is_ok());
        let settings = StripeSettings::new("sk_test_secretvalue");
        assert_eq!(settings.api_base, DEFAULT_API_BASE);
        assert!(!format!("{settings:?}").contains("secretvalue"));
        for (base, key) in [
            ("http://stripe.example", "sk_live_secretvalue"),
            ("ftp://api.stripe.com", "sk_test_secretvalue"),
            ("https://api.stripe.com?x=1", "sk_test_secretvalue"),
            ("https://user:pw@api.stripe.com", "sk_test_secretvalue"),
            ("https://api.stripe.com", "pk_test_secretvalue"),
            ("https://api.stripe.com", "secretvalue"),
            ("https://api.stripe.com", "  "),
            ("https://api.stripe.com", "sk_test_secret\nvalue"),
        ] {
            let error = ok(base, key).unwrap_err().to_string();
            assert!(!error.contains("secretvalue"), "{error}");
        }
        let zero = StripeClient::new(StripeSettings {
            timeout: Duration::ZERO,
            ..StripeSettings::new("sk_test_x")
        });
        assert!(zero.is_err());
    }

    // Computed with Python: hmac.new(b"whsec_test_orderflow_0123456789",
    //     b'1767225600.{"id":"evt_1","type":"payment_intent.succeeded"}', hashlib.sha256).hexdigest()
    const SECRET: &str = "whsec_test_orderflow_0123456789";
    const PAYLOAD: &[u8] = br#"{"id":"evt_1","type":"payment_intent.succeeded"}"#;
    const T: i64 = 1767225600;
    const GOOD: &str = "cf514ef5b26b370ff71a99bca057048bd5872e85c671b10c4eb28d7d78c8d3f5";
    /// The same payload and time signed with `whsec_other`.
    const OTHER: &str = "7e833d91eba9e057aa980033101ec6bdc9c5a5c8a01605a83a30942ea7150620";

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(seconds, 0).unwrap()
    }

    fn verify(header: &str, secret: &str, now: i64) -> Result<(), WebhookSignatureError> {
        verify_webhook_signature(PAYLOAD, header, secret, DEFAULT_WEBHOOK_TOLERANCE, at(now))
    }

    #[test]
    fn webhook_signature_known_vector() {
        assert_eq!(verify(&format!("t={T},v1={GOOD}"), SECRET, T + 10), Ok(()));
        assert_eq!(
            webhook_signature_header(PAYLOAD, SECRET, at(T)),
            format!("t={T},v1={GOOD}")
        );
        // Any of several v1 passes (secret rolling); v0 and unknown schemes are ignored.
        assert_eq!(verify(&format!("t={T},v1={OTHER},v1={GOOD}"), SECRET, T), Ok(()));
        assert_eq!(verify(&format!("t={T}, v0={OTHER}, v1={GOOD}, x=1"), SECRET, T), Ok(()));
        assert_eq!(verify(&format!("v1={GOOD},t={T}"), SECRET, T), Ok(()));
        assert_eq!(
            verify(&format!("t={T},v1={OTHER},v1={GOOD}"), "whsec_other", T),
            Ok(()),
            "the other secret matches its own signature"
        );
    }

    #[test]
    fn webhook_signature_failures() {
        use WebhookSignatureError::*;
        assert_eq!(verify(&format!("t={T},v1={GOOD}"), "whsec_wrong", T), Err(Mismatch));
        assert_eq!(verify(&format!("t={T},v1={OTHER}"), SECRET, T), Err(Mismatch));
        assert_eq!(
            verify(&format!("t={},v1={GOOD}", T + 1), SECRET, T),
            Err(Mismatch),
            "t is signed"
        );
        assert_eq!(
            verify_webhook_signature(
                b"{}",
                &format!("t={T},v1={GOOD}"),
                SECRET,
                DEFAULT_WEBHOOK_TOLERANCE,
                at(T)
            ),
            Err(Mismatch),
            "the payload is signed"
        );
        assert_eq!(verify(&format!("t={T},v1=zz{}", &GOOD[2..]), SECRET, T), Err(Mismatch));
        assert_eq!(verify(&format!("t={T},v1="), SECRET, T), Err(Mismatch));
        assert_eq!(verify(&format!("t={T},v0={GOOD}"), SECRET, T), Err(NoSignature));
        assert_eq!(
            verify(&format!("t={T},v1={GOOD}"), SECRET, T + 301),
            Err(OutsideTolerance {
                age_seconds: 301,
                tolerance_seconds: 300
            })
        );
        assert_eq!(verify(&format!("t={T},v1={GOOD}"), SECRET, T + 300), Ok(()));
        assert!(matches!(
            verify(&format!("t={T},v1={GOOD}"), SECRET, T - 301),
            Err(OutsideTolerance { .. })
        ));
        for malformed in [
            "",
            "garbage",
            &format!("v1={GOOD}"),
            &format!("t=abc,v1={GOOD}"),
            &format!("t=-5,v1={GOOD}"),
            &format!("t={T},t={T},v1={GOOD}"),
            &format!("t=99999999999999999999999,v1={GOOD}"),
        ] {
            assert!(
                matches!(verify(malformed, SECRET, T), Err(MalformedHeader(_))),
                "{malformed:?}"
            );
        }
        assert_eq!(verify(&format!("t={T},v1={GOOD}"), "", T), Err(NoSecret));
    }
}
