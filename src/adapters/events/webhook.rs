//! The Standard Webhooks wire side of event delivery: how one event is signed and POSTed to one
//! endpoint, how the endpoint's answer is read, and when the next attempt is due.
//!
//! Integrators verify deliveries with any Standard Webhooks library (<https://www.standardwebhooks.com>),
//! so everything here follows that spec to the byte: `whsec_` secrets, the `webhook-id`,
//! `webhook-timestamp` and `webhook-signature` headers, and `v1,<base64 HMAC-SHA256>` signatures,
//! space-separated while a rotated secret is still valid. What to send and what an outcome means for
//! the endpoint (retry, hold the order's later events, disable) is the relay's business
//! (`crate::events`); this module only speaks HTTP and classifies the answer, and it never panics or
//! waits past its timeout whatever the endpoint does.

use std::fmt;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use chrono::{DateTime, NaiveDateTime, Utc};
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, LOCATION, RETRY_AFTER};
use sha2::Sha256;

use super::OutgoingEvent;

/// The `webhook-id` header: the event id, the receiver's dedup key.
pub const ID_HEADER: &str = "webhook-id";
/// The `webhook-timestamp` header: Unix seconds when the attempt was signed.
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
/// The `webhook-signature` header: `v1,<base64>` per valid secret, space-separated.
pub const SIGNATURE_HEADER: &str = "webhook-signature";

/// The prefix Standard Webhooks libraries expect (and strip) on a secret.
const SECRET_PREFIX: &str = "whsec_";
/// Random bytes in a generated secret.
const GENERATED_SECRET_BYTES: usize = 32;
/// The accepted decoded secret sizes: the spec asks for 24–64 bytes.
const SECRET_BYTES: std::ops::RangeInclusive<usize> = 24..=64;
/// Longest endpoint URL accepted.
pub const MAX_URL_LEN: usize = 2048;
/// How much of an endpoint's answer is kept for the delivery log.
const EXCERPT_BYTES: usize = 256;
/// The longest `Retry-After` honoured; anything longer is cut to this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);
/// Jitter applied to the retry schedule: ± this fraction of each delay.
const JITTER: f64 = 0.10;

/// Standard base64 that accepts secrets with or without `=` padding (the libraries write both).
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

// ---------------------------------------------------------------------------------------------
// Secrets and signatures

/// An endpoint's signing secret, `whsec_<base64 of 24–64 bytes>`. It never prints: `Debug` shows
/// `whsec_***` and there is no `Display`; [`WebhookSecret::as_str`] is for storing it and for
/// showing it to the admin once.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret {
    text: String,
    key: Vec<u8>,
}

/// Why a string is not a webhook secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WebhookSecretError {
    /// It does not start with `whsec_`.
    #[error("a webhook secret starts with `whsec_`")]
    MissingPrefix,
    /// What follows `whsec_` is not standard base64.
    #[error("a webhook secret is `whsec_` followed by base64")]
    InvalidBase64,
    /// It decodes to fewer than 24 or more than 64 bytes.
    #[error("a webhook secret holds 24 to 64 bytes, this one {0}")]
    WrongLength(usize),
}

impl WebhookSecret {
    /// A fresh secret: `whsec_` and the base64 of 32 bytes from a cryptographically secure RNG.
    pub fn generate() -> Self {
        let key: [u8; GENERATED_SECRET_BYTES] = rand::random();
        Self {
            text: format!("{SECRET_PREFIX}{}", STANDARD.encode(key)),
            key: key.to_vec(),
        }
    }

    /// Reads a stored or configured secret.
    pub fn parse(text: &str) -> Result<Self, WebhookSecretError> {
        let encoded = text
            .strip_prefix(SECRET_PREFIX)
            .ok_or(WebhookSecretError::MissingPrefix)?;
        let key = LENIENT_BASE64
            .decode(encoded)
            .map_err(|_| WebhookSecretError::InvalidBase64)?;
        if !SECRET_BYTES.contains(&key.len()) {
            return Err(WebhookSecretError::WrongLength(key.len()));
        }
        Ok(Self {
            text: text.to_owned(),
            key,
        })
    }

    /// The secret as it is stored and shown: `whsec_…`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// `v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">` with this secret's key bytes.
    fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("whsec_***")
    }
}

/// The `webhook-signature` header value: one `v1,<signature>` per secret, space-separated, so that
/// during a rotation a receiver that knows either the old or the new secret verifies. Empty when
/// `secrets` is.
pub fn signature_header(secrets: &[&WebhookSecret], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|secret| secret.sign(msg_id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// Endpoint URLs

/// Checks an endpoint URL an admin entered: absolute `http` or `https` with a host, no user name or
/// password (credentials in a URL end up in logs), at most 2048 characters. Returns it normalized as
/// it will be requested.
pub fn validate_endpoint_url(url: &str) -> Result<String, &'static str> {
    if url.len() > MAX_URL_LEN {
        return Err("the URL is longer than 2048 characters");
    }
    let parsed = reqwest::Url::parse(url).map_err(|_| "not a valid absolute URL")?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("the URL must start with http:// or https://");
    }
    // The URL parser is forgiving (`https:///x` and `https:x` become `https://x/`): insist on the
    // literal `scheme://host` form so what the admin typed is what gets called.
    let authority = url
        .trim_start()
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    if authority.is_empty() || authority.starts_with(['/', '\\']) || parsed.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host");
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("the URL must not contain a user name or password");
    }
    let normalized = parsed.to_string();
    if normalized.len() > MAX_URL_LEN {
        return Err("the URL is longer than 2048 characters");
    }
    Ok(normalized)
}

// ---------------------------------------------------------------------------------------------
// Delivery

/// What one delivery attempt means for the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// A 2xx: the endpoint has the event.
    Delivered,
    /// A 410 Gone: the endpoint asks to be disabled.
    Gone,
    /// A 429 or 503 with a usable `Retry-After` (seconds or an HTTP date), capped at 24 h: try
    /// again after this long instead of the schedule's next delay.
    RetryAfter(Duration),
    /// Anything else: another status (3xx included: redirects are not followed), a 429/503 without
    /// a usable `Retry-After`, a timeout, a refused connection, a TLS failure.
    Failed,
}

/// One attempt as the delivery log records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryResult {
    /// What the answer means.
    pub outcome: DeliveryOutcome,
    /// The HTTP status, when an answer arrived.
    pub status: Option<u16>,
    /// From sending the request until the answer's status (or the failure).
    pub latency: Duration,
    /// Why the attempt did not count, in words; `Some` exactly when the outcome is not
    /// [`DeliveryOutcome::Delivered`].
    pub error: Option<String>,
    /// The first 256 bytes of the answer's body, lossy UTF-8 (empty when there was no answer).
    pub response_excerpt: String,
}

/// The HTTP client that delivers webhooks: no redirects followed (a 3xx is a failure, so a
/// delivery never lands somewhere the admin did not configure), a total timeout per attempt that
/// also covers a slow answer body, and `User-Agent: orderflow-webhooks/<version>`.
#[derive(Clone, Debug)]
pub struct WebhookClient {
    http: reqwest::Client,
    timeout: Duration,
}

impl WebhookClient {
    /// A client whose every attempt gives up after `timeout` (production uses 15 s).
    ///
    /// # Panics
    /// If the TLS backend cannot be initialised, as [`reqwest::Client::new`] does.
    pub fn new(timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("orderflow-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the webhook HTTP client (TLS backend) could not be initialised");
        Self { http, timeout }
    }

    /// The per-attempt timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// POSTs `event` to `url`, signed with every secret in `secrets` at `now`, and classifies the
    /// answer. Never panics and returns within the timeout. With no secret nothing is sent (an
    /// unsigned delivery would only teach receivers to skip verification).
    pub async fn deliver(
        &self,
        url: &str,
        event: &OutgoingEvent,
        secrets: &[&WebhookSecret],
        now: DateTime<Utc>,
    ) -> DeliveryResult {
        let started = Instant::now();
        if secrets.is_empty() {
            return failure(started, "no signing secret: not sent".to_owned());
        }
        let deadline = tokio::time::Instant::from_std(started + self.timeout);
        let msg_id = event.id.to_string();
        let timestamp = now.timestamp();
        let signature = signature_header(secrets, &msg_id, timestamp, &event.body);
        let request = self
            .http
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .header(ID_HEADER, msg_id)
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, signature)
            .body(event.body.clone());

        // reqwest's own timeout covers connect, head and body; the outer one is a backstop.
        let mut response = match tokio::time::timeout_at(deadline, request.send()).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return failure(started, describe(&error, self.timeout)),
            Err(_) => return failure(started, timed_out(self.timeout)),
        };
        let latency = started.elapsed();
        let status = response.status();
        let headers = response.headers().clone();

        let mut excerpt = Vec::with_capacity(EXCERPT_BYTES);
        let mut body_error = None;
        while excerpt.len() < EXCERPT_BYTES {
            match tokio::time::timeout_at(deadline, response.chunk()).await {
                Ok(Ok(Some(chunk))) => {
                    let room = EXCERPT_BYTES - excerpt.len();
                    excerpt.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(Ok(None)) => break,
                Ok(Err(error)) => {
                    body_error = Some(describe(&error, self.timeout));
                    break;
                }
                Err(_) => {
                    body_error = Some(timed_out(self.timeout));
                    break;
                }
            }
        }
        // The rest of the answer is not wanted: dropping the response closes the connection.
        drop(response);

        // An HTTP-date Retry-After counts from when the answer came, on the caller's clock.
        let answered_at = now + chrono::Duration::from_std(latency).unwrap_or_default();
        let (outcome, error) = classify(status, &headers, answered_at);
        let error = error.map(|error| match body_error {
            Some(body_error) => format!("{error}; reading the answer: {body_error}"),
            None => error,
        });
        DeliveryResult {
            outcome,
            status: Some(status.as_u16()),
            latency,
            error,
            response_excerpt: String::from_utf8_lossy(&excerpt).into_owned(),
        }
    }
}

/// An attempt that got no HTTP answer.
fn failure(started: Instant, error: String) -> DeliveryResult {
    DeliveryResult {
        outcome: DeliveryOutcome::Failed,
        status: None,
        latency: started.elapsed(),
        error: Some(error),
        response_excerpt: String::new(),
    }
}

fn timed_out(timeout: Duration) -> String {
    format!("timed out after {timeout:?}")
}

/// A transport error in words, with its causes (reqwest's own text is only "error sending request
/// for url (…)"); without the URL, which the delivery log already has.
fn describe(error: &reqwest::Error, timeout: Duration) -> String {
    if error.is_timeout() {
        return timed_out(timeout);
    }
    let what = if error.is_connect() {
        "could not connect"
    } else if error.is_body() || error.is_decode() {
        "the answer broke off"
    } else if error.is_builder() {
        "the request could not be built"
    } else {
        "the request failed"
    };
    let mut parts = vec![what.to_owned()];
    let mut cause = std::error::Error::source(error);
    while let Some(error) = cause {
        let text = error.to_string();
        if !text.is_empty() && !parts.contains(&text) {
            parts.push(text);
        }
        cause = error.source();
    }
    parts.join(": ")
}

/// What a status means, and why it does not count when it does not.
fn classify(status: StatusCode, headers: &HeaderMap, now: DateTime<Utc>) -> (DeliveryOutcome, Option<String>) {
    if status.is_success() {
        return (DeliveryOutcome::Delivered, None);
    }
    let answered = format!("the endpoint answered {status}");
    if status == StatusCode::GONE {
        return (
            DeliveryOutcome::Gone,
            Some(format!("{answered}: it asks to be disabled")),
        );
    }
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        let retry_after = headers.get(RETRY_AFTER).and_then(|value| value.to_str().ok());
        return match retry_after.and_then(|value| parse_retry_after(value, now)) {
            Some(delay) => (
                DeliveryOutcome::RetryAfter(delay),
                Some(format!("{answered}, Retry-After {}s", delay.as_secs())),
            ),
            None => (
                DeliveryOutcome::Failed,
                Some(format!("{answered} without a usable Retry-After")),
            ),
        };
    }
    if status.is_redirection() {
        let location = headers.get(LOCATION).map(|value| {
            String::from_utf8_lossy(value.as_bytes())
                .chars()
                .take(EXCERPT_BYTES)
                .collect::<String>()
        });
        let error = match location {
            Some(location) => format!("{answered}, a redirect to {location:?}: redirects are not followed"),
            None => format!("{answered}: redirects are not followed"),
        };
        return (DeliveryOutcome::Failed, Some(error));
    }
    (DeliveryOutcome::Failed, Some(answered))
}

/// A `Retry-After` value (RFC 9110 §10.2.3): delay-seconds or an HTTP date, relative to `now`;
/// a date in the past is 0, anything past 24 h is 24 h.
fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits: too many of them for a u64 is still "a very long time".
        let seconds = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER));
    }
    let at = parse_http_date(value)?;
    let delay = (at - now).to_std().unwrap_or(Duration::ZERO);
    Some(delay.min(MAX_RETRY_AFTER))
}

/// An HTTP date: IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), or the obsolete RFC 850
/// (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime (`Sun Nov  6 08:49:37 1994`) forms that
/// recipients must still accept.
fn parse_http_date(value: &str) -> Option<DateTime<Utc>> {
    if let Ok(date) = DateTime::parse_from_rfc2822(value) {
        return Some(date.with_timezone(&Utc));
    }
    ["%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(value, format).ok())
        .map(|naive| naive.and_utc())
}

// ---------------------------------------------------------------------------------------------
// Retry schedule

/// The default delays between attempts: the first attempt at once, then after each failure 5 s,
/// 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h and 24 h (ten attempts over about 3 days 3 hours).
pub const DEFAULT_RETRY_SCHEDULE: [Duration; 10] = [
    Duration::ZERO,
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(14 * 3600),
    Duration::from_secs(20 * 3600),
    Duration::from_secs(24 * 3600),
];

/// How long to wait before the next attempt once `failed_attempts` attempts have failed:
/// `schedule[failed_attempts]` with up to ±10 % random jitter (so endpoints that failed together
/// are not retried in lockstep); `0` stays `0`. `None` once the schedule is exhausted.
pub fn retry_delay(schedule: &[Duration], failed_attempts: u32) -> Option<Duration> {
    let base = *schedule.get(usize::try_from(failed_attempts).ok()?)?;
    if base.is_zero() {
        return Some(Duration::ZERO);
    }
    let factor = 1.0 + rand::random_range(-JITTER..=JITTER);
    Some(Duration::try_from_secs_f64(base.as_secs_f64() * factor).unwrap_or(base))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn signature_matches_the_standard_webhooks_test_vector() {
        // The spec's own example, also what the python `standardwebhooks` 1.1.0 package signs.
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            signature_header(
                &[&secret],
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn signature_matches_python_standardwebhooks_for_a_cloudevent() {
        // Computed with `standardwebhooks` 1.1.0:
        // Webhook(secret).sign(id, datetime.fromtimestamp(1700000000, tz=timezone.utc), body)
        let secret = WebhookSecret::parse("whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
        let id = "01890a5d-ac96-774b-bcce-b302099a8057";
        let body = br#"{"specversion":"1.0","id":"01890a5d-ac96-774b-bcce-b302099a8057","type":"order.paid"}"#;
        assert_eq!(
            signature_header(&[&secret], id, 1700000000, body),
            "v1,L6C5nTM9MFRlGE8OXPbNVtVLvXZgp03wcl8jeKVFH0k="
        );
    }

    #[test]
    fn two_secrets_give_two_space_separated_signatures() {
        let old = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let new = WebhookSecret::generate();
        let body = br#"{"test": 2432232314}"#;
        let header = signature_header(&[&new, &old], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2, "{header}");
        assert_eq!(
            parts[0],
            signature_header(&[&new], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
        );
        assert_eq!(parts[1], "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert_eq!(signature_header(&[], "id", 1, b""), "");
    }

    #[test]
    fn generated_secrets_parse_back_and_never_print() {
        let secret = WebhookSecret::generate();
        assert!(secret.as_str().starts_with("whsec_"));
        assert_eq!(secret.as_str().len(), "whsec_".len() + 44);
        let parsed = WebhookSecret::parse(secret.as_str()).unwrap();
        assert_eq!(parsed, secret);
        assert_eq!(format!("{secret:?}"), "whsec_***");
        assert_ne!(WebhookSecret::generate(), secret);
    }

    #[test]
    fn secret_parse_errors() {
        use WebhookSecretError::*;
        let b64 = |n: usize| STANDARD.encode(vec![7u8; n]);
        assert_eq!(WebhookSecret::parse(&b64(32)), Err(MissingPrefix));
        assert_eq!(WebhookSecret::parse(&format!("WHSEC_{}", b64(32))), Err(MissingPrefix));
        assert_eq!(WebhookSecret::parse("whsec_not base64!"), Err(InvalidBase64));
        assert_eq!(WebhookSecret::parse("whsec_"), Err(WrongLength(0)));
        assert_eq!(
            WebhookSecret::parse(&format!("whsec_{}", b64(23))),
            Err(WrongLength(23))
        );
        assert_eq!(
            WebhookSecret::parse(&format!("whsec_{}", b64(65))),
            Err(WrongLength(65))
        );
        assert!(WebhookSecret::parse(&format!("whsec_{}", b64(24))).is_ok());
        assert!(WebhookSecret::parse(&format!("whsec_{}", b64(64))).is_ok());
        // Unpadded base64, as some libraries write it, is accepted.
        let unpadded = format!("whsec_{}", b64(32).trim_end_matches('='));
        assert!(WebhookSecret::parse(&unpadded).is_ok());
        let error = WebhookSecret::parse("whsec_").unwrap_err().to_string();
        assert!(error.contains("24 to 64 bytes"), "{error}");
    }

    #[test]
    fn endpoint_urls() {
        assert_eq!(
            validate_endpoint_url("https://hooks.example.com/orderflow?x=1").as_deref(),
            Ok("https://hooks.example.com/orderflow?x=1")
        );
        assert_eq!(
            validate_endpoint_url("http://127.0.0.1:8080").as_deref(),
            Ok("http://127.0.0.1:8080/")
        );
        assert_eq!(
            validate_endpoint_url("HTTPS://Example.COM/a").as_deref(),
            Ok("https://example.com/a")
        );
        for bad in [
            "",
            "example.com/hook",
            "/hooks",
            "ftp://example.com/hook",
            "file:///etc/passwd",
            "mailto:ops@example.com",
            "https://user:pass@example.com/hook",
            "https://user@example.com/hook",
            "http://",
            "https:///path",
            "https:example.com/hook",
            "http:\\\\example.com/hook",
        ] {
            assert!(validate_endpoint_url(bad).is_err(), "{bad:?} was accepted");
        }
        let long = format!("https://example.com/{}", "a".repeat(2048));
        assert_eq!(
            validate_endpoint_url(&long),
            Err("the URL is longer than 2048 characters")
        );
        let just_fits = format!(
            "https://example.com/{}",
            "a".repeat(2048 - "https://example.com/".len())
        );
        assert!(validate_endpoint_url(&just_fits).is_ok());
    }

    #[test]
    fn retry_delay_follows_the_schedule_with_bounded_jitter() {
        assert_eq!(DEFAULT_RETRY_SCHEDULE[0], Duration::ZERO);
        assert_eq!(DEFAULT_RETRY_SCHEDULE[9], Duration::from_secs(86_400));
        for _ in 0..200 {
            assert_eq!(retry_delay(&DEFAULT_RETRY_SCHEDULE, 0), Some(Duration::ZERO));
            for (failed, base) in DEFAULT_RETRY_SCHEDULE.iter().enumerate().skip(1) {
                let delay = retry_delay(&DEFAULT_RETRY_SCHEDULE, failed as u32).unwrap();
                assert!(
                    delay >= base.mul_f64(0.9) && delay <= base.mul_f64(1.1),
                    "{failed}: {delay:?} vs {base:?}"
                );
            }
        }
        // Jitter really varies.
        let delays: std::collections::HashSet<Duration> = (0..50)
            .map(|_| retry_delay(&DEFAULT_RETRY_SCHEDULE, 9).unwrap())
            .collect();
        assert!(delays.len() > 1);
    }

    #[test]
    fn retry_delay_ends_with_the_schedule() {
        assert_eq!(retry_delay(&DEFAULT_RETRY_SCHEDULE, 10), None);
        assert_eq!(retry_delay(&DEFAULT_RETRY_SCHEDULE, u32::MAX), None);
        assert_eq!(retry_delay(&[], 0), None);
        let short = [Duration::from_secs(1)];
        assert!(retry_delay(&short, 0).is_some());
        assert_eq!(retry_delay(&short, 1), None);
        // A silly schedule does not panic.
        assert!(retry_delay(&[Duration::MAX], 0).is_some());
    }

    #[test]
    fn retry_after_in_seconds() {
        let now = Utc::now();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("0", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("172800", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("99999999999999999999999", now), Some(MAX_RETRY_AFTER));
        for bad in ["", "-5", "1.5", "soon", "7s"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_as_an_http_date() {
        let now = Utc.with_ymd_and_hms(1994, 11, 6, 8, 49, 0).unwrap();
        let in_37s = Some(Duration::from_secs(37));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now), in_37s);
        assert_eq!(parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", now), in_37s);
        assert_eq!(parse_retry_after("Sun Nov  6 08:49:37 1994", now), in_37s);
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("Tue, 08 Nov 1994 08:49:37 GMT", now),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 25:49:37 GMT", now), None);
    }

    #[test]
    fn statuses_are_classified() {
        let now = Utc::now();
        let mut headers = HeaderMap::new();
        let outcome = |status: u16, headers: &HeaderMap| classify(StatusCode::from_u16(status).unwrap(), headers, now);
        assert_eq!(outcome(200, &headers), (DeliveryOutcome::Delivered, None));
        assert_eq!(outcome(204, &headers).0, DeliveryOutcome::Delivered);
        assert_eq!(outcome(410, &headers).0, DeliveryOutcome::Gone);
        assert_eq!(outcome(429, &headers).0, DeliveryOutcome::Failed);
        assert_eq!(outcome(500, &headers).0, DeliveryOutcome::Failed);
        assert_eq!(outcome(301, &headers).0, DeliveryOutcome::Failed);
        headers.insert(RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(
            outcome(429, &headers).0,
            DeliveryOutcome::RetryAfter(Duration::from_secs(3))
        );
        assert_eq!(
            outcome(503, &headers).0,
            DeliveryOutcome::RetryAfter(Duration::from_secs(3))
        );
        assert_eq!(outcome(500, &headers).0, DeliveryOutcome::Failed);
        for status in [302, 400, 404, 410, 429, 500, 503] {
            assert!(outcome(status, &HeaderMap::new()).1.is_some(), "{status}");
        }
    }
}
