//! NATS JetStream event sink: publishes committed events to the stream `ORDERFLOW_EVENTS` on
//! `orderflow.events.<type>`, one message per event.
//!
//! Why it is shaped so:
//! - **Delivered means stored.** An event counts as published only when its JetStream `PublishAck`
//!   arrived, never when it was written to the socket. Every message carries `Nats-Msg-Id: <event
//!   id>`, so a re-send (after a timeout, a crash, a replay) within the stream's duplicate window is
//!   absorbed by the server and acknowledged as a duplicate, which counts as published too: the
//!   relay may re-send freely.
//! - **A window of acknowledgements, one connection, input order.** Waiting for each ack before
//!   the next send costs a round trip per event; sending everything and collecting acks later
//!   costs unbounded memory. So [`JetStreamSink::publish`] sends in input order on the one
//!   connection (JetStream stores one connection's messages in the order sent), keeps at most
//!   `max_in_flight` ack futures, awaits the oldest, and refills.
//! - **Never blocks start-up, never hangs.** The client connects and reconnects forever in the
//!   background, so a NATS server that is down at start does not stop orderflow. Left alone,
//!   async-nats accepts publishes while disconnected into its command queue and writes them after
//!   it reconnects, long after the caller was told they failed; so `publish` first waits (at most
//!   `ack_timeout`) for a live connection and sends nothing without one, and every ack is bounded
//!   by `ack_timeout` from the moment its message was sent. A batch stops sending at the first
//!   sign that the server is gone, so a large batch fails in about `ack_timeout`, not in one
//!   timeout per window.
//! - **The stream is ensured, not assumed.** It is created if missing and updated if it exists
//!   with other settings (subjects, duplicate window). The update edits only those fields in the
//!   server's own JSON of the stream configuration, so settings an operator added (limits,
//!   replicas, metadata) and fields newer than this client survive it. When the server is down at
//!   start, ensuring happens on the first publish that reaches it, and again after the stream was
//!   found missing.

use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::{
    ContextBuilder, PublishAckFuture, PublishError, PublishErrorKind, RequestError, RequestErrorKind,
};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::jetstream::{self, publish::PublishAck};
use async_nats::{ConnectErrorKind, ConnectOptions, Event, ServerAddr};
use serde_json::{Value, json};
use tokio::sync::{Mutex, watch};
use tokio::time::{Instant, sleep_until, timeout_at};

use super::OutgoingEvent;

/// Every event subject starts with this; the stream captures `orderflow.events.>`.
pub const SUBJECT_PREFIX: &str = "orderflow.events";
/// The subjects the stream is bound to.
pub const STREAM_SUBJECTS: &str = "orderflow.events.>";
/// The `Content-Type` header of every message: a structured-mode CloudEvent.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// JetStream API error code: stream not found.
const ERR_STREAM_NOT_FOUND: u64 = 10059;
/// JetStream API error code: stream name already in use (someone created it first).
const ERR_STREAM_NAME_IN_USE: u64 = 10058;
/// How often a wait for the connection re-checks the client's state, in case a wake-up was missed.
const LINK_RECHECK: Duration = Duration::from_millis(50);

/// The subject an event of type `event_type` is published to: `orderflow.events.<type>`,
/// e.g. `orderflow.events.order.paid`.
pub fn subject_for(event_type: &str) -> String {
    format!("{SUBJECT_PREFIX}.{event_type}")
}

/// Where and how to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsSettings {
    /// Server URL, e.g. `nats://127.0.0.1:4222`; several may be given separated by commas.
    pub url: String,
    /// The JetStream stream name.
    pub stream: String,
    /// The stream's duplicate window: a re-send with the same event id within it is dropped by the
    /// server (and acknowledged as a duplicate).
    pub duplicate_window: Duration,
    /// At most this many publish acknowledgements outstanding at once (sink-wide).
    pub max_in_flight: usize,
    /// Bound on every wait: for the connection, for one acknowledgement, for one JetStream API call.
    pub ack_timeout: Duration,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            stream: "ORDERFLOW_EVENTS".to_owned(),
            duplicate_window: Duration::from_secs(120),
            max_in_flight: 256,
            ack_timeout: Duration::from_secs(5),
        }
    }
}

/// Why an event (or the stream) did not make it, by what the caller should do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// No live connection to a NATS server within the ack timeout (down, unreachable,
    /// reconnecting); the event was not sent. Retry later.
    #[error("NATS server unreachable: {0}")]
    Unreachable(String),
    /// Sent, but no acknowledgement within the ack timeout: the outcome is unknown (it may be
    /// stored). Retry with the same event id; the server drops the duplicate.
    #[error("no JetStream acknowledgement within {0:?}")]
    Timeout(Duration),
    /// JetStream answered with an error: no stream for the subject, the stream configuration
    /// refused, an invalid subject, JetStream not enabled. Retrying will not help until the cause
    /// is fixed.
    #[error("rejected by JetStream: {0}")]
    Rejected(String),
    /// The settings cannot work (an unparsable URL, an invalid stream name, `max_in_flight` 0).
    #[error("invalid NATS settings: {0}")]
    InvalidSettings(String),
}

impl SinkError {
    /// Unreachable or timed out: a sign that the server is gone, so a batch stops sending.
    fn means_server_gone(&self) -> bool {
        matches!(self, Self::Unreachable(_) | Self::Timeout(_))
    }
}

/// What the connection last reported (fed by the client's event callback; only a wake-up, the
/// client's own connection state is the truth).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    /// No connection attempt has finished yet.
    Pending,
    Up,
    Down,
}

type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, PublishError>> + Send>>;

/// Publishes [`OutgoingEvent`]s to a JetStream stream over one NATS connection.
pub struct JetStreamSink {
    settings: NatsSettings,
    client: async_nats::Client,
    jetstream: jetstream::Context,
    link: watch::Receiver<Link>,
    /// Whether the stream is known to exist with our settings.
    ensured: AtomicBool,
    /// Held while ensuring, so concurrent publishes ensure once.
    ensuring: Mutex<()>,
}

impl std::fmt::Debug for JetStreamSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamSink")
            .field("url", &redacted(&self.settings.url))
            .field("stream", &self.settings.stream)
            .field("state", &self.client.connection_state())
            .field("ensured", &self.ensured.load(Ordering::Relaxed))
            .finish()
    }
}

impl JetStreamSink {
    /// Connects (in the background if the server is not there yet: a server that is down does not
    /// fail this call; the client reconnects forever) and ensures the stream if the server
    /// answered. Fails only on unusable settings, or when the server answered and refused the
    /// stream (e.g. JetStream disabled, a stream of that name with memory storage).
    pub async fn connect(settings: NatsSettings) -> Result<Self, SinkError> {
        validate(&settings)?;
        let (link_tx, link) = watch::channel(Link::Pending);
        let options = ConnectOptions::new()
            .name("orderflow")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .request_timeout(Some(settings.ack_timeout))
            .event_callback(move |event| {
                match event {
                    Event::Connected => {
                        link_tx.send_replace(Link::Up);
                    }
                    Event::Disconnected | Event::ClientError(_) => {
                        link_tx.send_replace(Link::Down);
                    }
                    _ => {}
                }
                async {}
            });
        let urls: Vec<String> = settings.url.split(',').map(|url| url.trim().to_owned()).collect();
        let client = options.connect(urls).await.map_err(|err| match err.kind() {
            ConnectErrorKind::ServerParse => {
                SinkError::InvalidSettings(format!("NATS URL {:?}: {err}", redacted(&settings.url)))
            }
            _ => SinkError::Unreachable(format!("{}: {err}", redacted(&settings.url))),
        })?;
        let jetstream = ContextBuilder::new()
            .timeout(settings.ack_timeout)
            .ack_timeout(settings.ack_timeout)
            .max_ack_inflight(settings.max_in_flight)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let sink = Self {
            settings,
            client,
            jetstream,
            link,
            ensured: AtomicBool::new(false),
            ensuring: Mutex::new(()),
        };

        // Wait for the first connection attempt to finish (connection refused is immediate), not
        // for the server to come up.
        let deadline = Instant::now() + sink.settings.ack_timeout;
        let mut link = sink.link.clone();
        loop {
            let seen = *link.borrow_and_update();
            if sink.is_connected() || seen == Link::Down || Instant::now() >= deadline {
                break;
            }
            wait_for_change(&mut link, deadline).await;
        }
        if !sink.is_connected() {
            tracing::warn!(
                url = %redacted(&sink.settings.url),
                stream = %sink.settings.stream,
                "NATS server not reachable yet; connecting in the background, the stream is ensured on the first publish that reaches it"
            );
            return Ok(sink);
        }
        match sink.ensure_once().await {
            Ok(()) => Ok(sink),
            Err(err) if err.means_server_gone() => {
                tracing::warn!(stream = %sink.settings.stream, error = %err, "could not ensure the JetStream stream yet; retrying on the first publish");
                Ok(sink)
            }
            Err(err) => Err(err),
        }
    }

    /// Makes sure stream `settings.stream` exists on `orderflow.events.>` with file storage and
    /// `settings.duplicate_window`: creates it if missing, updates it if it differs (only those
    /// fields; anything else an operator set is kept).
    pub async fn ensure_stream(&self) -> Result<(), SinkError> {
        self.wait_connected(Instant::now() + self.settings.ack_timeout).await?;
        let name = self.settings.stream.as_str();
        // Twice at most: a create that loses a race to another instance goes round once more.
        for _ in 0..2 {
            let info: Value = self.api(&format!("STREAM.INFO.{name}"), &()).await?;
            if let Some(error) = info.get("error") {
                if error_code(error) != Some(ERR_STREAM_NOT_FOUND) {
                    return Err(rejected("reading the stream", name, error));
                }
                let config = StreamConfig {
                    name: name.to_owned(),
                    subjects: vec![STREAM_SUBJECTS.to_owned()],
                    storage: StorageType::File,
                    duplicate_window: self.settings.duplicate_window,
                    ..Default::default()
                };
                let created: Value = self.api(&format!("STREAM.CREATE.{name}"), &config).await?;
                match created.get("error") {
                    None => {
                        tracing::info!(
                            stream = name,
                            subjects = STREAM_SUBJECTS,
                            "created the JetStream stream"
                        );
                        self.ensured.store(true, Ordering::Release);
                        return Ok(());
                    }
                    Some(error) if error_code(error) == Some(ERR_STREAM_NAME_IN_USE) => continue,
                    Some(error) => return Err(rejected("creating the stream", name, error)),
                }
            }
            let current = info.get("config").cloned().unwrap_or(Value::Null);
            let Some(wanted) = updated_config(&current, &self.settings)? else {
                self.ensured.store(true, Ordering::Release);
                return Ok(());
            };
            let updated: Value = self.api(&format!("STREAM.UPDATE.{name}"), &wanted).await?;
            if let Some(error) = updated.get("error") {
                return Err(rejected("updating the stream", name, error));
            }
            tracing::info!(
                stream = name,
                duplicate_window = ?self.settings.duplicate_window,
                "updated the JetStream stream's settings"
            );
            self.ensured.store(true, Ordering::Release);
            return Ok(());
        }
        Err(SinkError::Rejected(format!(
            "stream {name}: created and deleted concurrently by someone else; try again"
        )))
    }

    /// Publishes `events` to `orderflow.events.<type>` with `Nats-Msg-Id: <event id>`, sending
    /// in input order with at most `max_in_flight` acknowledgements outstanding. Returns one
    /// result per event, in input order: `Ok` when JetStream acknowledged storing it (a duplicate
    /// counts). Returns within about `ack_timeout` when the server is unreachable.
    pub async fn publish(&self, events: &[OutgoingEvent]) -> Vec<Result<(), SinkError>> {
        if events.is_empty() {
            return Vec::new();
        }
        let ready = self.wait_connected(Instant::now() + self.settings.ack_timeout).await;
        let ready = match ready {
            Ok(()) => self.ensure_once().await,
            Err(err) => Err(err),
        };
        if let Err(err) = ready {
            return vec![Err(err); events.len()];
        }

        let ack_timeout = self.settings.ack_timeout;
        let mut results: Vec<Option<Result<(), SinkError>>> = vec![None; events.len()];
        let mut in_flight: VecDeque<(usize, Instant, AckFuture)> =
            VecDeque::with_capacity(self.settings.max_in_flight.min(events.len()));
        let mut next = 0;
        // Set at the first sign that the server is gone: nothing more is sent.
        let mut halted: Option<SinkError> = None;
        loop {
            while halted.is_none() && next < events.len() && in_flight.len() < self.settings.max_in_flight {
                let index = next;
                next += 1;
                let event = &events[index];
                if !is_valid_event_type(&event.event_type) {
                    results[index] = Some(Err(SinkError::Rejected(format!(
                        "event type {:?} does not make a valid NATS subject",
                        event.event_type
                    ))));
                    continue;
                }
                if !self.is_connected() {
                    halted = Some(SinkError::Unreachable(
                        "the connection to the NATS server was lost".to_owned(),
                    ));
                    next = index;
                    break;
                }
                let message = PublishMessage::build()
                    .payload(event.body.clone())
                    .message_id(event.id.to_string())
                    .header("Content-Type", CONTENT_TYPE);
                let deadline = Instant::now() + ack_timeout;
                let sent = timeout_at(
                    deadline,
                    self.jetstream.send_publish(subject_for(&event.event_type), message),
                )
                .await;
                match sent {
                    Ok(Ok(ack)) => in_flight.push_back((index, deadline, PublishAckFuture::into_future(ack))),
                    Ok(Err(err)) => {
                        // Sending only queues the message for the connection: failing that means
                        // the client is overloaded or closed.
                        let err = match err.kind() {
                            PublishErrorKind::TimedOut => SinkError::Timeout(ack_timeout),
                            _ => SinkError::Unreachable(format!("publish: {err}")),
                        };
                        halted = Some(err.clone());
                        results[index] = Some(Err(err));
                    }
                    Err(_elapsed) => {
                        halted = Some(SinkError::Timeout(ack_timeout));
                        results[index] = Some(Err(SinkError::Timeout(ack_timeout)));
                    }
                }
            }
            let Some((index, deadline, ack)) = in_flight.pop_front() else {
                break;
            };
            let result = match timeout_at(deadline, ack).await {
                Ok(Ok(_ack)) => Ok(()),
                Ok(Err(err)) => Err(self.publish_error(err)),
                Err(_elapsed) => Err(SinkError::Timeout(ack_timeout)),
            };
            if let Err(err) = &result {
                if err.means_server_gone() && halted.is_none() {
                    halted = Some(err.clone());
                }
            }
            results[index] = Some(result);
        }

        let unsent = halted
            .map(|cause| SinkError::Unreachable(format!("not sent after an earlier failure in this batch ({cause})")))
            .unwrap_or_else(|| SinkError::Unreachable("not sent".to_owned()));
        results
            .into_iter()
            .map(|result| result.unwrap_or_else(|| Err(unsent.clone())))
            .collect()
    }

    /// Ensures the stream unless that already succeeded since start or since it went missing.
    async fn ensure_once(&self) -> Result<(), SinkError> {
        if self.ensured.load(Ordering::Acquire) {
            return Ok(());
        }
        let _guard = self.ensuring.lock().await;
        if self.ensured.load(Ordering::Acquire) {
            return Ok(());
        }
        self.ensure_stream().await
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Waits until the client is connected, or `deadline`.
    async fn wait_connected(&self, deadline: Instant) -> Result<(), SinkError> {
        let mut link = self.link.clone();
        loop {
            link.borrow_and_update();
            if self.is_connected() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(SinkError::Unreachable(format!(
                    "not connected to {} within {:?}; reconnecting in the background",
                    redacted(&self.settings.url),
                    self.settings.ack_timeout
                )));
            }
            wait_for_change(&mut link, deadline).await;
        }
    }

    /// One JetStream API request, answered as raw JSON (`{"error": …}` or the response).
    async fn api<T: serde::Serialize + ?Sized>(&self, subject: &str, payload: &T) -> Result<Value, SinkError> {
        self.jetstream
            .request(subject.to_owned(), payload)
            .await
            .map_err(|err: RequestError| match err.kind() {
                RequestErrorKind::TimedOut => SinkError::Timeout(self.settings.ack_timeout),
                RequestErrorKind::NoResponders => SinkError::Rejected(
                    "no JetStream on the NATS server (no responder for the JetStream API; start it with -js)"
                        .to_owned(),
                ),
                RequestErrorKind::Other => SinkError::Unreachable(format!("JetStream API request {subject}: {err}")),
            })
    }

    fn publish_error(&self, err: PublishError) -> SinkError {
        match err.kind() {
            PublishErrorKind::TimedOut => SinkError::Timeout(self.settings.ack_timeout),
            PublishErrorKind::BrokenPipe => SinkError::Unreachable(format!("publish: {err}")),
            PublishErrorKind::StreamNotFound => {
                // The stream went away (deleted by someone): create it again on the next publish.
                self.ensured.store(false, Ordering::Release);
                SinkError::Rejected(format!(
                    "no stream captures the subject (stream {} missing?)",
                    self.settings.stream
                ))
            }
            _ => SinkError::Rejected(err.to_string()),
        }
    }
}

/// Waits for the next connection event, at most [`LINK_RECHECK`] and never past `deadline`.
async fn wait_for_change(link: &mut watch::Receiver<Link>, deadline: Instant) {
    let until = deadline.min(Instant::now() + LINK_RECHECK);
    tokio::select! {
        _ = link.changed() => {}
        _ = sleep_until(until) => {}
    }
}

fn validate(settings: &NatsSettings) -> Result<(), SinkError> {
    for url in settings.url.split(',').map(str::trim) {
        // Parsed here too: with connecting in the background, a URL without a host would
        // otherwise be retried forever instead of failing start-up.
        let parsed = url.parse::<ServerAddr>();
        if !parsed.as_ref().is_ok_and(|address| !address.host().is_empty()) {
            return Err(SinkError::InvalidSettings(format!(
                "NATS URL {:?}: expected nats://host:port",
                redacted(url)
            )));
        }
    }
    let name = settings.stream.as_str();
    let bad_char = |c: char| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\');
    if name.is_empty() || name.chars().any(bad_char) {
        return Err(SinkError::InvalidSettings(format!(
            "stream name {name:?}: must be non-empty, without whitespace, '.', '*', '>', '/' or '\\'"
        )));
    }
    if settings.max_in_flight == 0 {
        return Err(SinkError::InvalidSettings(
            "max_in_flight must be at least 1".to_owned(),
        ));
    }
    if settings.ack_timeout.is_zero() {
        return Err(SinkError::InvalidSettings("ack_timeout must be positive".to_owned()));
    }
    if settings.duplicate_window.is_zero() {
        return Err(SinkError::InvalidSettings(
            "duplicate_window must be positive (it is what makes re-sends safe)".to_owned(),
        ));
    }
    Ok(())
}

/// Whether `orderflow.events.<event_type>` is a valid subject to publish to: dot-separated,
/// non-empty tokens, no wildcards, no whitespace.
fn is_valid_event_type(event_type: &str) -> bool {
    !event_type.is_empty()
        && event_type.split('.').all(|token| {
            !token.is_empty()
                && token != "*"
                && token != ">"
                && !token.chars().any(|c| c.is_whitespace() || c.is_control())
        })
}

/// The server's stream configuration with our fields set, or `None` if it already has them:
/// our subject present (other subjects kept), the duplicate window ours. File storage cannot be
/// changed in place, so another storage is an error.
fn updated_config(current: &Value, settings: &NatsSettings) -> Result<Option<Value>, SinkError> {
    let Some(object) = current.as_object() else {
        return Err(SinkError::Rejected(format!(
            "stream {}: the server's stream info has no configuration",
            settings.stream
        )));
    };
    let storage = object.get("storage").and_then(Value::as_str).unwrap_or("file");
    if storage != "file" {
        return Err(SinkError::Rejected(format!(
            "stream {} exists with {storage} storage; it must use file storage, which cannot be changed in place \
             (delete or rename that stream)",
            settings.stream
        )));
    }
    let mut wanted = object.clone();
    let mut changed = false;

    let mut subjects: Vec<Value> = object
        .get("subjects")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if !subjects.iter().any(|subject| subject.as_str() == Some(STREAM_SUBJECTS)) {
        subjects.push(json!(STREAM_SUBJECTS));
        wanted.insert("subjects".to_owned(), Value::Array(subjects));
        changed = true;
    }

    let window = u64::try_from(settings.duplicate_window.as_nanos()).unwrap_or(u64::MAX);
    if object.get("duplicate_window").and_then(Value::as_u64) != Some(window) {
        wanted.insert("duplicate_window".to_owned(), json!(window));
        changed = true;
    }

    Ok(changed.then_some(Value::Object(wanted)))
}

fn error_code(error: &Value) -> Option<u64> {
    error.get("err_code").and_then(Value::as_u64)
}

fn rejected(doing: &str, stream: &str, error: &Value) -> SinkError {
    let description = error
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or("unknown error");
    let code = error_code(error)
        .map(|code| format!(" (err_code {code})"))
        .unwrap_or_default();
    SinkError::Rejected(format!("{doing} {stream}: {description}{code}"))
}

/// The URL(s) without user info, for logs and errors.
fn redacted(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            let (scheme, rest) = url.split_once("://").map_or(("", url), |(scheme, rest)| (scheme, rest));
            let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
            if scheme.is_empty() {
                rest.to_owned()
            } else {
                format!("{scheme}://{rest}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_the_prefix_and_the_event_type() {
        assert_eq!(subject_for("order.paid"), "orderflow.events.order.paid");
        assert_eq!(
            subject_for("webhook_endpoint.disabled"),
            "orderflow.events.webhook_endpoint.disabled"
        );
        assert!(subject_for("order.ready_to_ship").starts_with(&format!("{SUBJECT_PREFIX}.")));
        // Every event subject is captured by the stream's subject filter.
        assert_eq!(STREAM_SUBJECTS, format!("{SUBJECT_PREFIX}.>"));
    }

    #[test]
    fn event_types_that_would_break_the_subject_are_refused() {
        for good in ["order.paid", "payment.refunded", "webhook_endpoint.disabled", "x"] {
            assert!(is_valid_event_type(good), "{good}");
        }
        for bad in [
            "",
            "order..paid",
            ".order",
            "order.",
            "order.*",
            "order.>",
            "order paid",
            "order.\tpaid",
        ] {
            assert!(!is_valid_event_type(bad), "{bad:?}");
        }
    }

    #[test]
    fn default_settings() {
        let settings = NatsSettings::default();
        assert_eq!(settings.url, "nats://127.0.0.1:4222");
        assert_eq!(settings.stream, "ORDERFLOW_EVENTS");
        assert_eq!(settings.duplicate_window, Duration::from_secs(120));
        assert_eq!(settings.max_in_flight, 256);
        assert_eq!(settings.ack_timeout, Duration::from_secs(5));
        assert_eq!(validate(&settings), Ok(()));
        let several = NatsSettings {
            url: "nats://a:4222, b:4223,user:pw@c".into(),
            ..settings
        };
        assert_eq!(validate(&several), Ok(()));
    }

    #[test]
    fn unusable_settings_are_refused() {
        let base = NatsSettings::default();
        for settings in [
            NatsSettings {
                stream: "".into(),
                ..base.clone()
            },
            NatsSettings {
                stream: "ORDER.EVENTS".into(),
                ..base.clone()
            },
            NatsSettings {
                stream: "a b".into(),
                ..base.clone()
            },
            NatsSettings {
                max_in_flight: 0,
                ..base.clone()
            },
            NatsSettings {
                ack_timeout: Duration::ZERO,
                ..base.clone()
            },
            NatsSettings {
                duplicate_window: Duration::ZERO,
                ..base.clone()
            },
            NatsSettings {
                url: " ".into(),
                ..base.clone()
            },
            NatsSettings {
                url: "nats://".into(),
                ..base.clone()
            },
            NatsSettings {
                url: "nats://a:4222,".into(),
                ..base.clone()
            },
        ] {
            assert!(
                matches!(validate(&settings), Err(SinkError::InvalidSettings(_))),
                "{settings:?}"
            );
        }
    }

    fn server_config(window_nanos: u64) -> Value {
        json!({
            "name": "ORDERFLOW_EVENTS",
            "subjects": ["orderflow.events.>"],
            "storage": "file",
            "duplicate_window": window_nanos,
            "max_msgs": 1_000_000,
            "num_replicas": 1,
            "metadata": {"owner": "ops"},
        })
    }

    #[test]
    fn a_stream_with_our_settings_is_left_alone() {
        let settings = NatsSettings::default();
        assert_eq!(updated_config(&server_config(120_000_000_000), &settings), Ok(None));
    }

    #[test]
    fn another_duplicate_window_is_updated_and_everything_else_kept() {
        let settings = NatsSettings {
            duplicate_window: Duration::from_secs(30),
            ..NatsSettings::default()
        };
        let wanted = updated_config(&server_config(120_000_000_000), &settings)
            .unwrap()
            .unwrap();
        assert_eq!(wanted["duplicate_window"], json!(30_000_000_000u64));
        assert_eq!(wanted["max_msgs"], json!(1_000_000));
        assert_eq!(wanted["metadata"], json!({"owner": "ops"}));
        assert_eq!(wanted["subjects"], json!(["orderflow.events.>"]));
    }

    #[test]
    fn a_missing_subject_is_added_and_others_kept() {
        let mut current = server_config(120_000_000_000);
        current["subjects"] = json!(["legacy.events.>"]);
        let wanted = updated_config(&current, &NatsSettings::default()).unwrap().unwrap();
        assert_eq!(wanted["subjects"], json!(["legacy.events.>", "orderflow.events.>"]));
    }

    #[test]
    fn memory_storage_cannot_be_fixed_in_place() {
        let mut current = server_config(120_000_000_000);
        current["storage"] = json!("memory");
        let err = updated_config(&current, &NatsSettings::default()).unwrap_err();
        assert!(
            matches!(&err, SinkError::Rejected(message) if message.contains("memory storage")),
            "{err}"
        );
    }

    #[test]
    fn urls_are_redacted_for_logs() {
        assert_eq!(redacted("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(
            redacted("nats://user:secret@nats.internal:4222"),
            "nats://nats.internal:4222"
        );
        assert_eq!(redacted("a:4222, nats://u:p@b:4222"), "a:4222,nats://b:4222");
    }

    #[test]
    fn errors_say_what_happened() {
        assert_eq!(
            SinkError::Timeout(Duration::from_secs(5)).to_string(),
            "no JetStream acknowledgement within 5s"
        );
        assert!(
            SinkError::Unreachable("x".into())
                .to_string()
                .starts_with("NATS server unreachable")
        );
        assert!(
            SinkError::Rejected("x".into())
                .to_string()
                .starts_with("rejected by JetStream")
        );
        assert!(SinkError::Timeout(Duration::from_secs(1)).means_server_gone());
        assert!(!SinkError::Rejected("x".into()).means_server_gone());
    }
}
