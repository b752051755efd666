//! The events outbox: writing events with the facts they record, positioning committed events,
//! the feed, ordered channels (NATS) and webhook endpoints with their deliveries.
//!
//! Written once for both backends ([`EventsSql`] is generic over the database); the only dialect
//! differences — how a write transaction begins and how the position counter row is locked — are
//! passed in.
//!
//! **Positions.** An event is written with `position = NULL` in the transaction of its fact. The
//! relay later *stamps* committed events ([`EventStore::stamp_events`]): under the lock of the one
//! counter row it numbers the unstamped events it can see and commits. Stampers are serialized by
//! that lock and each commits a contiguous block above the previous one, so positions become
//! visible in increasing order with no hole: a reader that has seen N never later finds a smaller
//! one. (Positions taken inside the writing transactions would commit out of order and make a
//! poller skip the late committer.) An event is stamped only after its subject's previous event,
//! so positions respect every order's `sequence`. The stamping transaction also fans each event
//! out to the webhook endpoints whose filters match (one delivery row each).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::common::CHUNK;
use super::{Page, StoreError, StoreResult, retry};
use crate::domain::events::{EventType, NewEvent, StoredEvent, TypePattern};

/// The most events one feed page, one stamping round or one replay chunk handles.
pub const MAX_BATCH: u32 = 1000;

/// Filters and position of a feed read.
#[derive(Clone, Debug, Default)]
pub struct EventQuery {
    /// Events strictly after this position.
    pub after: i64,
    pub limit: u32,
    /// One type or a prefix (`order.*`); none = every type.
    pub types: Option<TypePattern>,
}

/// The positions currently kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FeedBounds {
    /// The smallest kept position (older ones were pruned), if any event is kept.
    pub oldest: Option<i64>,
    /// The largest position handed out so far (0 before the first).
    pub last: i64,
}

/// What an ordered channel (NATS) has left to publish.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ChannelBacklog {
    pub published_through: i64,
    /// Events not yet acknowledged by the channel (stamped or not).
    pub unpublished: i64,
    /// Age of the oldest of them.
    pub oldest_age_seconds: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointStatus {
    Enabled,
    Disabled,
}

impl EndpointStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointStatus::Enabled => "enabled",
            EndpointStatus::Disabled => "disabled",
        }
    }
}

/// A webhook endpoint as stored (its secrets included: the relay signs with them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookEndpoint {
    pub id: Uuid,
    pub url: String,
    pub description: Option<String>,
    pub enabled_events: Vec<String>,
    pub status: EndpointStatus,
    pub disabled_reason: Option<String>,
    pub secret: String,
    pub previous_secret: Option<String>,
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    pub failing_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl WebhookEndpoint {
    /// The secrets deliveries are signed with at `now` (two while a rotation's grace lasts).
    pub fn signing_secrets(&self, now: DateTime<Utc>) -> Vec<&str> {
        let mut secrets = vec![self.secret.as_str()];
        if let (Some(previous), Some(until)) = (&self.previous_secret, self.previous_secret_expires_at)
            && until > now
        {
            secrets.push(previous.as_str());
        }
        secrets
    }

    pub fn patterns(&self) -> Vec<TypePattern> {
        self.enabled_events
            .iter()
            .filter_map(|p| TypePattern::parse(p).ok())
            .collect()
    }
}

/// A new endpoint (validated by the caller).
#[derive(Clone, Debug)]
pub struct NewEndpoint {
    pub id: Uuid,
    pub url: String,
    pub description: Option<String>,
    pub enabled_events: Vec<TypePattern>,
    pub secret: String,
}

/// A change to an endpoint; `None` leaves a field alone.
#[derive(Clone, Debug, Default)]
pub struct EndpointPatch {
    pub url: Option<String>,
    pub description: Option<Option<String>>,
    pub enabled_events: Option<Vec<TypePattern>>,
    pub status: Option<EndpointStatus>,
}

/// A delivery handed to the relay: the event, the endpoint and the claim's token.
#[derive(Clone, Debug)]
pub struct DeliveryClaim {
    pub delivery_id: Uuid,
    pub lease_token: Uuid,
    /// Failed attempts so far.
    pub attempts: u32,
    pub event: StoredEvent,
}

/// What one attempt decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptVerdict {
    Delivered,
    /// Try again at this time.
    RetryAt(DateTime<Utc>),
    /// The retry schedule is exhausted: the delivery failed for good (replayable).
    GiveUp,
    /// The endpoint said 410 Gone: it is disabled and the delivery waits for it to be re-enabled.
    Gone,
}

/// One attempt to record.
#[derive(Clone, Debug)]
pub struct AttemptRecord {
    pub delivery_id: Uuid,
    pub lease_token: Uuid,
    pub endpoint_id: Uuid,
    pub verdict: AttemptVerdict,
    pub status_code: Option<u16>,
    pub latency: Duration,
    pub error: Option<String>,
    pub response_excerpt: String,
    /// Failing continuously for longer than this disables the endpoint.
    pub disable_after: Duration,
}

/// What recording an attempt did to the endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptRecorded {
    /// The lease was lost (another relay took the delivery): nothing was written.
    LeaseLost,
    Recorded,
    /// Recorded, and the endpoint was disabled (reason), with its `webhook_endpoint.disabled` event.
    EndpointDisabled(String),
}

/// One attempt in the delivery log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AttemptLog {
    pub attempted_at: DateTime<Utc>,
    pub status_code: Option<i32>,
    pub latency_ms: i64,
    pub error: Option<String>,
    pub response_excerpt: Option<String>,
}

/// A delivery as the log shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeliveryLog {
    pub delivery_id: Uuid,
    pub event_id: Uuid,
    pub event_type: String,
    pub subject: String,
    pub sequence: i64,
    pub position: i64,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
    pub attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub attempt_log: Vec<AttemptLog>,
}

/// Which events a replay sends again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayRange {
    Positions { from: i64, to: i64 },
    Time { since: DateTime<Utc>, until: DateTime<Utc> },
}

/// Per endpoint: what is waiting and what is failing.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EndpointHealth {
    pub endpoint_id: Uuid,
    pub url: String,
    pub status: EndpointStatus,
    pub pending: i64,
    /// Pending deliveries that have failed at least once.
    pub failing: i64,
    pub failed: i64,
    pub oldest_pending_age_seconds: Option<f64>,
    pub failing_since: Option<DateTime<Utc>>,
}

/// The events contract. One implementation ([`EventsSql`]) serves both backends.
#[async_trait]
pub trait EventStore: Send + Sync {
    /// Positions up to `limit` committed events (in commit order, respecting each subject's
    /// sequence) and fans them out to matching webhook endpoints. Returns how many it stamped.
    async fn stamp_events(&self, limit: u32, now: DateTime<Utc>) -> StoreResult<usize>;
    /// Positioned events after `query.after`, in position order.
    async fn events_after(&self, query: &EventQuery) -> StoreResult<Vec<StoredEvent>>;
    async fn event_bounds(&self) -> StoreResult<FeedBounds>;
    /// The largest position handed out so far: one row read (what pollers watch).
    async fn last_position(&self) -> StoreResult<i64>;
    /// The event ids of positioned events created in `[since, until)`, oldest first.
    async fn events_by_time(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<StoredEvent>>;

    /// Takes (or renews) the lease of an ordered channel; returns how far it is published, or
    /// `None` while another relay holds it.
    async fn claim_channel(
        &self,
        channel: &str,
        token: Uuid,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<i64>>;
    /// Records that the channel acknowledged everything up to `through` (fenced by the lease).
    async fn advance_channel(&self, channel: &str, token: Uuid, through: i64, now: DateTime<Utc>) -> StoreResult<bool>;
    /// `None` when the channel was never claimed (not configured).
    async fn channel_backlog(&self, channel: &str, now: DateTime<Utc>) -> StoreResult<Option<ChannelBacklog>>;

    async fn create_endpoint(&self, endpoint: &NewEndpoint, now: DateTime<Utc>) -> StoreResult<WebhookEndpoint>;
    async fn list_endpoints(&self) -> StoreResult<Vec<WebhookEndpoint>>;
    async fn get_endpoint(&self, id: Uuid) -> StoreResult<Option<WebhookEndpoint>>;
    async fn update_endpoint(
        &self,
        id: Uuid,
        patch: &EndpointPatch,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<WebhookEndpoint>>;
    /// Makes `secret` current; the current one stays valid until `previous_valid_until`.
    async fn rotate_secret(
        &self,
        id: Uuid,
        secret: &str,
        previous_valid_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<WebhookEndpoint>>;
    async fn delete_endpoint(&self, id: Uuid) -> StoreResult<bool>;

    /// Claims due deliveries of one endpoint: each the earliest pending one of its subject (so an
    /// order's events go out in sequence), at most `max_in_flight` leased at once per endpoint.
    async fn claim_deliveries(
        &self,
        endpoint: Uuid,
        max_in_flight: u32,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<DeliveryClaim>>;
    async fn record_attempt(&self, record: &AttemptRecord, now: DateTime<Utc>) -> StoreResult<AttemptRecorded>;
    /// When the endpoint's earliest pending delivery falls due (a read: the relay looks before it
    /// claims), or `None` when nothing is pending.
    async fn next_delivery_due(&self, endpoint: Uuid) -> StoreResult<Option<DateTime<Utc>>>;
    /// The delivery log, newest first; `state` is `pending`, `delivered`, `failed`, or `failing`
    /// (pending after at least one failed attempt).
    async fn list_deliveries(
        &self,
        endpoint: Uuid,
        state: Option<&str>,
        before: Option<Uuid>,
        limit: u32,
    ) -> StoreResult<Page<DeliveryLog>>;
    /// Queues the endpoint's events in `range` again (same event ids). Returns how many.
    async fn replay_deliveries(&self, endpoint: Uuid, range: ReplayRange, now: DateTime<Utc>) -> StoreResult<u64>;
    async fn endpoint_health(&self, now: DateTime<Utc>) -> StoreResult<Vec<EndpointHealth>>;

    /// Deletes up to `batch` events created before `before` that every ordered channel has
    /// published (with their deliveries). Returns how many; call again until 0.
    async fn prune_events(&self, before: DateTime<Utc>, batch: u32) -> StoreResult<u64>;
}

const EVENT_COLUMNS: &str = "id, subject, order_id, event_type, sequence, position, data, correlation_id, created_at";
const ENDPOINT_COLUMNS: &str = "id, url, description, enabled_events, status, disabled_reason, secret, \
     previous_secret, previous_secret_expires_at, failing_since, created_at, updated_at";

#[derive(sqlx::FromRow)]
pub(super) struct EventRow {
    id: Uuid,
    subject: String,
    order_id: Option<Uuid>,
    event_type: String,
    sequence: i64,
    position: Option<i64>,
    data: String,
    correlation_id: Option<String>,
    created_at: DateTime<Utc>,
}

impl TryFrom<EventRow> for StoredEvent {
    type Error = StoreError;
    fn try_from(row: EventRow) -> StoreResult<Self> {
        Ok(StoredEvent {
            id: row.id,
            subject: row.subject,
            order_id: row.order_id,
            event_type: row.event_type,
            sequence: row.sequence,
            position: row
                .position
                .ok_or_else(|| StoreError::Corrupt("events.position: not stamped".into()))?,
            time: row.created_at,
            data: serde_json::from_str(&row.data).map_err(|e| StoreError::Corrupt(format!("events.data: {e}")))?,
            correlation_id: row.correlation_id,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct EndpointRow {
    id: Uuid,
    url: String,
    description: Option<String>,
    enabled_events: String,
    status: String,
    disabled_reason: Option<String>,
    secret: String,
    previous_secret: Option<String>,
    previous_secret_expires_at: Option<DateTime<Utc>>,
    failing_since: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<EndpointRow> for WebhookEndpoint {
    type Error = StoreError;
    fn try_from(row: EndpointRow) -> StoreResult<Self> {
        Ok(WebhookEndpoint {
            id: row.id,
            url: row.url,
            description: row.description,
            enabled_events: serde_json::from_str(&row.enabled_events)
                .map_err(|e| StoreError::Corrupt(format!("webhook_endpoints.enabled_events: {e}")))?,
            status: match row.status.as_str() {
                "enabled" => EndpointStatus::Enabled,
                "disabled" => EndpointStatus::Disabled,
                other => return Err(StoreError::Corrupt(format!("webhook_endpoints.status: {other}"))),
            },
            disabled_reason: row.disabled_reason,
            secret: row.secret,
            previous_secret: row.previous_secret,
            previous_secret_expires_at: row.previous_secret_expires_at,
            failing_since: row.failing_since,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct DeliveryRow {
    id: Uuid,
    event_id: Uuid,
    event_type: String,
    subject: String,
    sequence: i64,
    position: i64,
    state: String,
    attempts: i32,
    next_attempt_at: DateTime<Utc>,
    last_status: Option<i32>,
    last_error: Option<String>,
    created_at: DateTime<Utc>,
    delivered_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
pub(super) struct AttemptRow {
    delivery_id: Uuid,
    attempted_at: DateTime<Utc>,
    status_code: Option<i32>,
    latency_ms: i64,
    error: Option<String>,
    response_excerpt: Option<String>,
}

/// Writes `events` for `subject` in the caller's transaction, numbered after the subject's last
/// sequence. The caller holds whatever serializes writers of the subject (the order row's lock on
/// PostgreSQL, the single writer on SQLite); `UNIQUE (subject, sequence)` backs that up.
/// `order.placed` is written by `place_order` itself (sequence 1, counter set to 1).
pub(super) async fn append<DB>(
    tx: &mut sqlx::Transaction<'_, DB>,
    subject: &str,
    order_id: Option<Uuid>,
    events: &[(EventType, Value)],
    correlation_id: Option<&str>,
    now: DateTime<Utc>,
) -> StoreResult<()>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<Uuid>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<String>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    if events.is_empty() {
        return Ok(());
    }
    let count = events.len() as i64;
    // An order keeps its counter on its row (pruning old events never restarts the numbering);
    // other subjects (endpoints) have few events, all kept with the endpoint.
    let last = match order_id {
        Some(order) => {
            let (next,): (i64,) = sqlx::query_as(
                "UPDATE orders SET last_event_sequence = last_event_sequence + $1 WHERE id = $2 \
                 RETURNING last_event_sequence",
            )
            .bind(count)
            .bind(order)
            .fetch_one(&mut **tx)
            .await?;
            next - count
        }
        None => {
            let (last,): (i64,) =
                sqlx::query_as("SELECT CAST(coalesce(max(sequence), 0) AS BIGINT) FROM events WHERE subject = $1")
                    .bind(subject.to_string())
                    .fetch_one(&mut **tx)
                    .await?;
            last
        }
    };
    for (offset, (event_type, data)) in events.iter().enumerate() {
        sqlx::query(
            "INSERT INTO events (id, subject, order_id, event_type, sequence, data, correlation_id, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(Uuid::now_v7())
        .bind(subject.to_string())
        .bind(order_id)
        .bind(event_type.as_str().to_string())
        .bind(last + 1 + offset as i64)
        .bind(data.to_string())
        .bind(correlation_id.map(str::to_string))
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// The outbox rows of `events` (numbered after `last`, the subject's sequence so far) as one
/// write of a [`Writes`](super::writes::Writes) batch: [`append`] for a caller that already
/// holds the counter (a step's completion reads it with the order's row lock).
pub(super) fn outbox_write(
    subject: &str,
    order_id: Option<Uuid>,
    last: i64,
    events: &[(EventType, Value)],
    correlation_id: Option<&str>,
    now: DateTime<Utc>,
) -> super::writes::Write {
    let mut write = super::writes::Write::new(
        "INSERT INTO events (id, subject, order_id, event_type, sequence, data, correlation_id, created_at) VALUES ",
    );
    for (offset, (event_type, data)) in events.iter().enumerate() {
        if offset > 0 {
            write.sql(", ");
        }
        write.row([
            Uuid::now_v7().into(),
            subject.into(),
            order_id.into(),
            event_type.as_str().into(),
            (last + 1 + offset as i64).into(),
            data.to_string().into(),
            correlation_id.map(str::to_string).into(),
            now.into(),
        ]);
    }
    write
}

/// The data of an order's events beside the order: see [`crate::domain::events::order_data`].
pub(super) fn render<'a>(
    order: &crate::domain::Order,
    payment: Option<&crate::domain::events::PaymentFacts>,
    events: impl IntoIterator<Item = &'a NewEvent>,
) -> Vec<(EventType, Value)> {
    events
        .into_iter()
        .map(|event| {
            (
                event.event_type,
                crate::domain::events::order_data(order, payment, event),
            )
        })
        .collect()
}

/// The event store over one database: `write` takes every write (SQLite's single writer), `read`
/// serves reads (SQLite's read-only pool; the same pool on PostgreSQL).
pub struct EventsSql<DB: sqlx::Database> {
    pub(super) write: crate::store::DbPool<DB>,
    pub(super) read: crate::store::DbPool<DB>,
    /// `BEGIN IMMEDIATE` (SQLite: take the write lock at once) or `BEGIN`.
    pub(super) begin: &'static str,
    /// `FOR UPDATE` where row locks exist; empty on SQLite (the writer lock covers it).
    pub(super) lock_rows: &'static str,
}

/// The rows a stamping round looks at: id, subject, sequence, and 1 when the subject's previous
/// event exists unstamped (0 when it is stamped, or pruned long ago).
type Candidate = (Uuid, String, i64, i64);

/// Which candidates (in id order) may be stamped now, and in which order: an event goes only
/// after its subject's previous one (already stamped, or earlier in this batch); within a subject
/// the batch's slots are refilled in sequence order.
fn stamping_order(candidates: Vec<Candidate>) -> Vec<Uuid> {
    let mut by_subject: HashMap<&str, Vec<&Candidate>> = HashMap::new();
    for candidate in &candidates {
        by_subject.entry(candidate.1.as_str()).or_default().push(candidate);
    }
    let mut kept: HashSet<Uuid> = HashSet::new();
    for events in by_subject.values_mut() {
        events.sort_by_key(|c| c.2);
        let mut previous_ok: Option<i64> = None;
        for (id, sequence, predecessor_waiting) in events.iter().map(|c| (c.0, c.2, c.3)) {
            let ok = predecessor_waiting == 0 || previous_ok == Some(sequence - 1);
            if !ok {
                break;
            }
            kept.insert(id);
            previous_ok = Some(sequence);
        }
    }
    // Slots in id (≈ commit) order; each subject's slots get its events in sequence order.
    let slots: Vec<&Candidate> = candidates.iter().filter(|c| kept.contains(&c.0)).collect();
    let mut queues: HashMap<&str, std::vec::IntoIter<Uuid>> = HashMap::new();
    for (subject, events) in &by_subject {
        let ids: Vec<Uuid> = events.iter().filter(|c| kept.contains(&c.0)).map(|c| c.0).collect();
        queues.insert(subject, ids.into_iter());
    }
    slots
        .iter()
        .map(|slot| {
            queues
                .get_mut(slot.1.as_str())
                .and_then(Iterator::next)
                .expect("one queued event per slot")
        })
        .collect()
}

macro_rules! events_sql_bounds {
    ($($item:item)*) => {
        #[async_trait]
        impl<DB> EventStore for EventsSql<DB>
        where
            DB: sqlx::Database,
            for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
            for<'c> &'c crate::store::DbPool<DB>: sqlx::Executor<'c, Database = DB>,
            for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
            for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
            for<'q> Option<Uuid>: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
            for<'q> String: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
            for<'q> Option<String>: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
            for<'q> DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
            for<'q> Option<DateTime<Utc>>: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
            for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
            for<'q> Option<i64>: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
            for<'q> i32: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
            for<'q> Option<i32>: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
            usize: sqlx::ColumnIndex<DB::Row>,
            EventRow: for<'r> sqlx::FromRow<'r, DB::Row>,
            EndpointRow: for<'r> sqlx::FromRow<'r, DB::Row>,
            DeliveryRow: for<'r> sqlx::FromRow<'r, DB::Row>,
            AttemptRow: for<'r> sqlx::FromRow<'r, DB::Row>,
        {
            $($item)*
        }
    };
}

events_sql_bounds! {
    async fn stamp_events(&self, limit: u32, now: DateTime<Utc>) -> StoreResult<usize> {
        // A read first: an idle relay must not take the write lock (SQLite) or the counter's row
        // lock (PostgreSQL) every time it looks.
        let waiting: Option<(Uuid,)> = sqlx::query_as("SELECT id FROM events WHERE position IS NULL LIMIT 1")
            .fetch_optional(&self.read)
            .await?;
        if waiting.is_none() {
            return Ok(0);
        }
        retry::transaction(|| async {
            let mut tx = self.write.begin_with(self.begin).await?;
            // The counter's row lock serializes stampers; every statement after it sees what the
            // previous stamper committed.
            let (last,): (i64,) = sqlx::query_as(&format!(
                "SELECT last_position FROM event_counter WHERE id = 1 {}",
                self.lock_rows
            ))
            .fetch_one(&mut *tx)
            .await?;
            // The enabled endpoints whose filters match get one delivery each.
            let endpoints: Vec<(Uuid, String)> =
                sqlx::query_as("SELECT id, enabled_events FROM webhook_endpoints WHERE status = 'enabled'")
                    .fetch_all(&mut *tx)
                    .await?;
            let endpoints: Vec<(Uuid, Vec<TypePattern>)> = endpoints
                .into_iter()
                .map(|(id, patterns)| {
                    let patterns: Vec<String> = serde_json::from_str(&patterns).unwrap_or_default();
                    (id, patterns.iter().filter_map(|p| TypePattern::parse(p).ok()).collect())
                })
                .collect();
            let rows: Vec<(Uuid, String, i64, i64, String)> = sqlx::query_as(
                "SELECT e.id, e.subject, e.sequence, \
                 CAST(CASE WHEN p.id IS NOT NULL AND p.position IS NULL THEN 1 ELSE 0 END AS BIGINT), e.event_type \
                 FROM events e LEFT JOIN events p ON p.subject = e.subject AND p.sequence = e.sequence - 1 \
                 WHERE e.position IS NULL ORDER BY e.id LIMIT $1",
            )
            .bind(i64::from(limit.clamp(1, MAX_BATCH)))
            .fetch_all(&mut *tx)
            .await?;
            let fan_out: HashMap<Uuid, usize> = rows
                .iter()
                .map(|row| {
                    let matching = endpoints
                        .iter()
                        .filter(|(_, patterns)| TypePattern::any_matches(patterns, &row.4))
                        .count();
                    (row.0, matching)
                })
                .collect();
            let mut order = stamping_order(rows.into_iter().map(|(id, subject, sequence, waiting, _)| (id, subject, sequence, waiting)).collect());
            // A round changes each event, its deliveries and the counter: at most CHUNK rows (the
            // distributed-SQL profile's limit), however many endpoints match. A prefix of the order
            // still respects every subject's sequence; the rest waits for the next round.
            let mut changed = 1;
            let within = order
                .iter()
                .take_while(|id| {
                    changed += 1 + fan_out[id];
                    changed <= CHUNK as usize
                })
                .count();
            order.truncate(within.max(1));
            if order.is_empty() {
                return Ok(0);
            }
            let positions: Vec<(Uuid, i64)> =
                order.iter().enumerate().map(|(i, id)| (*id, last + 1 + i as i64)).collect();
            for chunk in positions.chunks(200) {
                let sql = format!(
                    "WITH v (id, pos) AS (VALUES {}) UPDATE events SET position = (SELECT v.pos FROM v WHERE v.id = events.id) \
                     WHERE id IN (SELECT v.id FROM v) AND position IS NULL RETURNING id",
                    tuples(1, 2, chunk.len())
                );
                let mut update = sqlx::query_as::<DB, (Uuid,)>(&sql);
                for (id, position) in chunk {
                    update = update.bind(*id).bind(*position);
                }
                let updated = update.fetch_all(&mut *tx).await?;
                if updated.len() != chunk.len() {
                    return Err(StoreError::Corrupt("events were stamped by two stampers at once".into()));
                }
            }
            let new_last = last + positions.len() as i64;
            sqlx::query("UPDATE event_counter SET last_position = $1 WHERE id = 1")
                .bind(new_last)
                .execute(&mut *tx)
                .await?;
            if !endpoints.is_empty() {
                let stamped: Vec<(Uuid, String, String, i64, i64)> = sqlx::query_as(
                    "SELECT id, subject, event_type, sequence, position FROM events WHERE position > $1 \
                     AND position <= $2 ORDER BY position",
                )
                .bind(last)
                .bind(new_last)
                .fetch_all(&mut *tx)
                .await?;
                let deliveries: Vec<(Uuid, &(Uuid, String, String, i64, i64))> = stamped
                    .iter()
                    .flat_map(|event| {
                        endpoints
                            .iter()
                            .filter(|(_, patterns)| TypePattern::any_matches(patterns, &event.2))
                            .map(move |(endpoint, _)| (*endpoint, event))
                    })
                    .collect();
                insert_deliveries(&mut tx, &deliveries, now).await?;
            }
            tx.commit().await?;
            Ok(positions.len())
        })
        .await
    }

    async fn events_after(&self, query: &EventQuery) -> StoreResult<Vec<StoredEvent>> {
        let limit = i64::from(query.limit.clamp(1, MAX_BATCH));
        // ($2, $3, $4) = (prefix length, prefix or type, exact?); a length of 0 means every type.
        // (Parameters are numbered in first-use order, as SQLite needs.)
        let (length, value, exact) = match query.types.as_ref().map(|p| (p, p.as_str().strip_suffix('*'))) {
            None | Some((_, Some(""))) => (0i32, String::new(), 0i32),
            Some((_, Some(prefix))) => (prefix.len() as i32, prefix.to_string(), 0),
            Some((pattern, None)) => (pattern.as_str().len() as i32, pattern.as_str().to_string(), 1),
        };
        let rows: Vec<EventRow> = sqlx::query_as(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE position > $1 \
             AND ($2 = 0 OR substr(event_type, 1, $2) = $3) AND ($4 = 0 OR event_type = $3) \
             ORDER BY position LIMIT $5"
        ))
        .bind(query.after)
        .bind(length)
        .bind(value)
        .bind(exact)
        .bind(limit)
        .fetch_all(&self.read)
        .await?;
        rows.into_iter().map(StoredEvent::try_from).collect()
    }

    async fn last_position(&self) -> StoreResult<i64> {
        let (last,): (i64,) = sqlx::query_as("SELECT last_position FROM event_counter WHERE id = 1")
            .fetch_one(&self.read)
            .await?;
        Ok(last)
    }

    async fn event_bounds(&self) -> StoreResult<FeedBounds> {
        let last = self.last_position().await?;
        let (oldest,): (Option<i64>,) =
            sqlx::query_as("SELECT min(position) FROM events WHERE position IS NOT NULL")
                .fetch_one(&self.read)
                .await?;
        Ok(FeedBounds { oldest, last })
    }

    async fn events_by_time(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<StoredEvent>> {
        let rows: Vec<EventRow> = sqlx::query_as(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE position > $1 AND created_at >= $2 AND created_at < $3 \
             ORDER BY position LIMIT $4"
        ))
        .bind(after)
        .bind(since)
        .bind(until)
        .bind(i64::from(limit.clamp(1, MAX_BATCH)))
        .fetch_all(&self.read)
        .await?;
        rows.into_iter().map(StoredEvent::try_from).collect()
    }

    async fn claim_channel(
        &self,
        channel: &str,
        token: Uuid,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<i64>> {
        let until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(30));
        retry::transaction(|| async {
        let mut tx = self.write.begin_with(self.begin).await?;
        sqlx::query(
            "INSERT INTO event_channels (channel, published_through, updated_at) VALUES ($1, 0, $2) \
             ON CONFLICT (channel) DO NOTHING",
        )
        .bind(channel.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let claimed: Option<(i64,)> = sqlx::query_as(
            "UPDATE event_channels SET lease_token = $1, lease_expires_at = $2, updated_at = $3 \
             WHERE channel = $4 AND (lease_token = $1 OR lease_token IS NULL OR lease_expires_at <= $3) \
             RETURNING published_through",
        )
        .bind(token)
        .bind(until)
        .bind(now)
        .bind(channel.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(claimed.map(|(through,)| through))
        })
        .await
    }

    async fn advance_channel(&self, channel: &str, token: Uuid, through: i64, now: DateTime<Utc>) -> StoreResult<bool> {
        retry::transaction(|| async {
        let mut tx = self.write.begin_with(self.begin).await?;
        let advanced: Vec<(i64,)> = sqlx::query_as(
            "UPDATE event_channels SET published_through = $1, updated_at = $2 \
             WHERE channel = $3 AND lease_token = $4 AND published_through <= $1 RETURNING published_through",
        )
        .bind(through)
        .bind(now)
        .bind(channel.to_string())
        .bind(token)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(advanced.len() == 1)
        })
        .await
    }

    async fn channel_backlog(&self, channel: &str, now: DateTime<Utc>) -> StoreResult<Option<ChannelBacklog>> {
        let through: Option<(i64,)> =
            sqlx::query_as("SELECT published_through FROM event_channels WHERE channel = $1")
                .bind(channel.to_string())
                .fetch_optional(&self.read)
                .await?;
        let Some((through,)) = through else { return Ok(None) };
        let (stamped, oldest_stamped): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
            "SELECT count(*), min(created_at) FROM events WHERE position > $1",
        )
        .bind(through)
        .fetch_one(&self.read)
        .await?;
        let (unstamped, oldest_unstamped): (i64, Option<DateTime<Utc>>) =
            sqlx::query_as("SELECT count(*), min(created_at) FROM events WHERE position IS NULL")
                .fetch_one(&self.read)
                .await?;
        let oldest = match (oldest_stamped, oldest_unstamped) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(Some(ChannelBacklog {
            published_through: through,
            unpublished: stamped + unstamped,
            oldest_age_seconds: oldest.map(|at| (now - at).num_milliseconds().max(0) as f64 / 1000.0),
        }))
    }

    async fn create_endpoint(&self, endpoint: &NewEndpoint, now: DateTime<Utc>) -> StoreResult<WebhookEndpoint> {
        let patterns: Vec<&str> = endpoint.enabled_events.iter().map(TypePattern::as_str).collect();
        retry::transaction(|| async {
        let mut tx = self.write.begin_with(self.begin).await?;
        let row: EndpointRow = sqlx::query_as(&format!(
            "INSERT INTO webhook_endpoints (id, url, description, enabled_events, status, secret, created_at, \
             updated_at) VALUES ($1, $2, $3, $4, 'enabled', $5, $6, $6) RETURNING {ENDPOINT_COLUMNS}"
        ))
        .bind(endpoint.id)
        .bind(endpoint.url.clone())
        .bind(endpoint.description.clone())
        .bind(json!(patterns).to_string())
        .bind(endpoint.secret.clone())
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        row.try_into()
        })
        .await
    }

    async fn list_endpoints(&self) -> StoreResult<Vec<WebhookEndpoint>> {
        let rows: Vec<EndpointRow> =
            sqlx::query_as(&format!("SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints ORDER BY id"))
                .fetch_all(&self.read)
                .await?;
        rows.into_iter().map(WebhookEndpoint::try_from).collect()
    }

    async fn get_endpoint(&self, id: Uuid) -> StoreResult<Option<WebhookEndpoint>> {
        let row: Option<EndpointRow> =
            sqlx::query_as(&format!("SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.read)
                .await?;
        row.map(WebhookEndpoint::try_from).transpose()
    }

    async fn update_endpoint(
        &self,
        id: Uuid,
        patch: &EndpointPatch,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<WebhookEndpoint>> {
        let patterns = patch.enabled_events.as_ref().map(|patterns| {
            let patterns: Vec<&str> = patterns.iter().map(TypePattern::as_str).collect();
            json!(patterns).to_string()
        });
        let (status, reason) = match patch.status {
            Some(EndpointStatus::Enabled) => (Some("enabled"), None),
            Some(EndpointStatus::Disabled) => (Some("disabled"), Some("disabled by an operator")),
            None => (None, None),
        };
        // $n IS NULL: "leave it". Re-enabling clears the failure clock.
        retry::transaction(|| async {
        let mut tx = self.write.begin_with(self.begin).await?;
        let row: Option<EndpointRow> = sqlx::query_as(&format!(
            "UPDATE webhook_endpoints SET updated_at = $1, url = coalesce($2, url), \
             description = CASE WHEN $3 = 1 THEN $4 ELSE description END, \
             enabled_events = coalesce($5, enabled_events), status = coalesce($6, status), \
             disabled_reason = CASE WHEN $6 IS NULL THEN disabled_reason ELSE $7 END, \
             failing_since = CASE WHEN $6 = 'enabled' THEN NULL ELSE failing_since END \
             WHERE id = $8 RETURNING {ENDPOINT_COLUMNS}"
        ))
        .bind(now)
        .bind(patch.url.clone())
        .bind(i64::from(patch.description.is_some()))
        .bind(patch.description.clone().flatten())
        .bind(patterns.clone())
        .bind(status.map(str::to_string))
        .bind(reason.map(str::to_string))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        row.map(WebhookEndpoint::try_from).transpose()
        })
        .await
    }

    async fn rotate_secret(
        &self,
        id: Uuid,
        secret: &str,
        previous_valid_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<WebhookEndpoint>> {
        retry::transaction(|| async {
        let mut tx = self.write.begin_with(self.begin).await?;
        let row: Option<EndpointRow> = sqlx::query_as(&format!(
            "UPDATE webhook_endpoints SET previous_secret = secret, previous_secret_expires_at = $1, secret = $2, \
             updated_at = $3 WHERE id = $4 RETURNING {ENDPOINT_COLUMNS}"
        ))
        .bind(previous_valid_until)
        .bind(secret.to_string())
        .bind(now)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        row.map(WebhookEndpoint::try_from).transpose()
        })
        .await
    }

    async fn delete_endpoint(&self, id: Uuid) -> StoreResult<bool> {
        // Its deliveries and their attempts go first — deleted here rather than by the foreign
        // keys' ON DELETE CASCADE, which the distributed-SQL schema has not (migrations/dsql) —
        // in transactions of at most CHUNK changed rows, however many it has; the endpoint goes in
        // the one that finds none left. An answer lost half-way leaves the endpoint for the retry.
        loop {
            let deleted = retry::transaction(|| async {
                let mut tx = self.write.begin_with(self.begin).await?;
                if !delete_deliveries(&mut tx, Deliveries::OfEndpoint(id), CHUNK as usize - 1).await? {
                    tx.commit().await?;
                    return Ok(None);
                }
                let deleted: Vec<(Uuid,)> = sqlx::query_as("DELETE FROM webhook_endpoints WHERE id = $1 RETURNING id")
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Some(deleted.len() == 1))
            })
            .await?;
            if let Some(deleted) = deleted {
                return Ok(deleted);
            }
        }
    }

    async fn claim_deliveries(
        &self,
        endpoint: Uuid,
        max_in_flight: u32,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<DeliveryClaim>> {
        let until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(60));
        let token = Uuid::now_v7();
        let claimed: Vec<(Uuid, Uuid, i32)> = retry::transaction(|| async {
        let mut tx = self.write.begin_with(self.begin).await?;
        let (in_flight,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = $1 AND state = 'pending' \
             AND lease_expires_at > $2",
        )
        .bind(endpoint)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let room = i64::from(max_in_flight) - in_flight;
        if room <= 0 {
            return Ok(Vec::new());
        }
        let claimed: Vec<(Uuid, Uuid, i32)> = sqlx::query_as(
            "UPDATE webhook_deliveries SET lease_token = $1, lease_expires_at = $2, updated_at = $3 \
             WHERE id IN (SELECT d.id FROM webhook_deliveries d \
                WHERE d.endpoint_id = $4 AND d.state = 'pending' AND d.next_attempt_at <= $3 \
                AND (d.lease_expires_at IS NULL OR d.lease_expires_at <= $3) \
                AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e WHERE e.endpoint_id = d.endpoint_id \
                    AND e.subject = d.subject AND e.state = 'pending' \
                    AND (e.sequence < d.sequence OR (e.sequence = d.sequence AND e.id < d.id))) \
                ORDER BY d.position, d.id LIMIT $5) \
             AND state = 'pending' AND (lease_expires_at IS NULL OR lease_expires_at <= $3) \
             RETURNING id, event_id, attempts",
        )
        .bind(token)
        .bind(until)
        .bind(now)
        .bind(endpoint)
        .bind(room)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(claimed)
        })
        .await?;
        if claimed.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE id IN ({})",
            tuples(1, 1, claimed.len()).replace(['(', ')'], "")
        );
        let mut select = sqlx::query_as::<DB, EventRow>(&sql);
        for (_, event_id, _) in &claimed {
            select = select.bind(*event_id);
        }
        let events: Vec<EventRow> = select.fetch_all(&self.write).await?;
        let mut events: HashMap<Uuid, StoredEvent> = events
            .into_iter()
            .map(|row| StoredEvent::try_from(row).map(|event| (event.id, event)))
            .collect::<StoreResult<_>>()?;
        let mut claims: Vec<DeliveryClaim> = claimed
            .into_iter()
            .filter_map(|(delivery_id, event_id, attempts)| {
                events.remove(&event_id).map(|event| DeliveryClaim {
                    delivery_id,
                    lease_token: token,
                    attempts: attempts.max(0) as u32,
                    event,
                })
            })
            .collect();
        claims.sort_by_key(|claim| claim.event.position);
        Ok(claims)
    }

    async fn record_attempt(&self, record: &AttemptRecord, now: DateTime<Utc>) -> StoreResult<AttemptRecorded> {
        let (state, next_attempt_at, delivered_at) = match &record.verdict {
            AttemptVerdict::Delivered => ("delivered", now, Some(now)),
            AttemptVerdict::RetryAt(at) => ("pending", *at, None),
            AttemptVerdict::GiveUp => ("failed", now, None),
            AttemptVerdict::Gone => ("pending", now, None),
        };
        let status_code = record.status_code.map(i32::from);
        retry::transaction(|| async {
        let mut tx = self.write.begin_with(self.begin).await?;
        let updated: Vec<(Uuid,)> = sqlx::query_as(
            "UPDATE webhook_deliveries SET state = $1, attempts = attempts + 1, next_attempt_at = $2, \
             lease_token = NULL, lease_expires_at = NULL, last_status = $3, last_error = $4, updated_at = $5, \
             delivered_at = $6 WHERE id = $7 AND lease_token = $8 RETURNING id",
        )
        .bind(state.to_string())
        .bind(next_attempt_at)
        .bind(status_code)
        .bind(record.error.clone())
        .bind(now)
        .bind(delivered_at)
        .bind(record.delivery_id)
        .bind(record.lease_token)
        .fetch_all(&mut *tx)
        .await?;
        if updated.len() != 1 {
            return Ok(AttemptRecorded::LeaseLost);
        }
        sqlx::query(
            "INSERT INTO webhook_attempts (id, delivery_id, attempted_at, status_code, latency_ms, error, \
             response_excerpt) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(Uuid::now_v7())
        .bind(record.delivery_id)
        .bind(now)
        .bind(status_code)
        .bind(record.latency.as_millis() as i64)
        .bind(record.error.clone())
        .bind(Some(record.response_excerpt.clone()).filter(|s| !s.is_empty()))
        .execute(&mut *tx)
        .await?;
        let mut outcome = AttemptRecorded::Recorded;
        if record.verdict == AttemptVerdict::Delivered {
            sqlx::query(
                "UPDATE webhook_endpoints SET failing_since = NULL WHERE id = $1 AND failing_since IS NOT NULL",
            )
            .bind(record.endpoint_id)
            .execute(&mut *tx)
            .await?;
        } else {
            let failing: Option<(DateTime<Utc>,)> = sqlx::query_as(
                "UPDATE webhook_endpoints SET failing_since = coalesce(failing_since, $1) WHERE id = $2 \
                 RETURNING failing_since",
            )
            .bind(now)
            .bind(record.endpoint_id)
            .fetch_optional(&mut *tx)
            .await?;
            let too_long = failing.is_some_and(|(since,)| {
                (now - since).to_std().unwrap_or_default() >= record.disable_after
            });
            let reason = if record.verdict == AttemptVerdict::Gone {
                Some("the endpoint answered 410 Gone".to_string())
            } else if too_long {
                Some(format!(
                    "failing continuously for more than {}",
                    humanize(record.disable_after)
                ))
            } else {
                None
            };
            if let Some(reason) = reason
                && disable_endpoint(&mut tx, record.endpoint_id, &reason, now).await?
            {
                outcome = AttemptRecorded::EndpointDisabled(reason);
            }
        }
        tx.commit().await?;
        Ok(outcome)
        })
        .await
    }

    async fn next_delivery_due(&self, endpoint: Uuid) -> StoreResult<Option<DateTime<Utc>>> {
        let (due,): (Option<DateTime<Utc>>,) = sqlx::query_as(
            "SELECT min(CASE WHEN lease_expires_at IS NOT NULL AND lease_expires_at > next_attempt_at \
             THEN lease_expires_at ELSE next_attempt_at END) FROM webhook_deliveries \
             WHERE endpoint_id = $1 AND state = 'pending'",
        )
        .bind(endpoint)
        .fetch_one(&self.read)
        .await?;
        Ok(due)
    }

    async fn list_deliveries(
        &self,
        endpoint: Uuid,
        state: Option<&str>,
        before: Option<Uuid>,
        limit: u32,
    ) -> StoreResult<Page<DeliveryLog>> {
        let rows: Vec<DeliveryRow> = sqlx::query_as(
            "SELECT d.id, d.event_id, e.event_type, d.subject, d.sequence, d.position, d.state, d.attempts, \
             d.next_attempt_at, d.last_status, d.last_error, d.created_at, d.delivered_at \
             FROM webhook_deliveries d JOIN events e ON e.id = d.event_id WHERE d.endpoint_id = $1 \
             AND ($2 IS NULL OR d.state = $2 OR ($2 = 'failing' AND d.state = 'pending' AND d.attempts > 0)) \
             AND ($3 IS NULL OR d.id < $3) ORDER BY d.id DESC LIMIT $4",
        )
        .bind(endpoint)
        .bind(state.map(str::to_string))
        .bind(before)
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.read)
        .await?;
        let mut attempts: HashMap<Uuid, Vec<AttemptLog>> = HashMap::new();
        if !rows.is_empty() {
            let sql = format!(
                "SELECT delivery_id, attempted_at, status_code, latency_ms, error, response_excerpt \
                 FROM webhook_attempts WHERE delivery_id IN ({}) ORDER BY attempted_at, id",
                tuples(1, 1, rows.len()).replace(['(', ')'], "")
            );
            let mut select = sqlx::query_as::<DB, AttemptRow>(&sql);
            for row in &rows {
                select = select.bind(row.id);
            }
            let logged: Vec<AttemptRow> = select.fetch_all(&self.read).await?;
            for attempt in logged {
                attempts.entry(attempt.delivery_id).or_default().push(AttemptLog {
                    attempted_at: attempt.attempted_at,
                    status_code: attempt.status_code,
                    latency_ms: attempt.latency_ms,
                    error: attempt.error,
                    response_excerpt: attempt.response_excerpt,
                });
            }
        }
        let items = rows
            .into_iter()
            .map(|row| DeliveryLog {
                attempt_log: attempts.remove(&row.id).unwrap_or_default(),
                delivery_id: row.id,
                event_id: row.event_id,
                event_type: row.event_type,
                subject: row.subject,
                sequence: row.sequence,
                position: row.position,
                next_attempt_at: (row.state == "pending").then_some(row.next_attempt_at),
                state: row.state,
                attempts: row.attempts,
                last_status: row.last_status,
                last_error: row.last_error,
                created_at: row.created_at,
                delivered_at: row.delivered_at,
            })
            .collect();
        Ok(Page::from_rows(items, limit, |d| d.delivery_id))
    }

    async fn replay_deliveries(&self, endpoint: Uuid, range: ReplayRange, now: DateTime<Utc>) -> StoreResult<u64> {
        let Some(target) = self.get_endpoint(endpoint).await? else {
            return Ok(0);
        };
        let patterns = target.patterns();
        let mut after = 0i64;
        let mut queued = 0u64;
        loop {
            // Chunked: each chunk is its own short transaction.
            let events: Vec<(Uuid, String, String, i64, i64)> = match range {
                ReplayRange::Positions { from, to } => sqlx::query_as(
                    "SELECT id, subject, event_type, sequence, position FROM events \
                     WHERE position >= $1 AND position <= $2 AND position > $3 ORDER BY position LIMIT $4",
                )
                .bind(from)
                .bind(to)
                .bind(after)
                .bind(i64::from(MAX_BATCH / 2)),
                ReplayRange::Time { since, until } => sqlx::query_as(
                    "SELECT id, subject, event_type, sequence, position FROM events \
                     WHERE created_at >= $1 AND created_at < $2 AND position > $3 ORDER BY position LIMIT $4",
                )
                .bind(since)
                .bind(until)
                .bind(after)
                .bind(i64::from(MAX_BATCH / 2)),
            }
            .fetch_all(&self.write)
            .await?;
            let Some(last) = events.last() else { break };
            after = last.4;
            let deliveries: Vec<(Uuid, &(Uuid, String, String, i64, i64))> = events
                .iter()
                .filter(|event| TypePattern::any_matches(&patterns, &event.2))
                .map(|event| (endpoint, event))
                .collect();
            let endpoint_kept = retry::transaction(|| async {
                let mut tx = self.write.begin_with(self.begin).await?;
                // Checked under the endpoint row's lock (a conflict with its deletion where
                // there is no foreign key to catch it: the distributed-SQL schema).
                let kept: Option<(Uuid,)> = sqlx::query_as(&format!(
                    "SELECT id FROM webhook_endpoints WHERE id = $1 {}",
                    self.lock_rows
                ))
                .bind(endpoint)
                .fetch_optional(&mut *tx)
                .await?;
                if kept.is_none() {
                    return Ok(false);
                }
                match insert_deliveries(&mut tx, &deliveries, now).await {
                    Ok(()) => {}
                    Err(StoreError::Database(error)) if super::common::is_foreign_key_violation(&error) => {
                        return Ok(false);
                    }
                    Err(error) => return Err(error),
                }
                tx.commit().await?;
                Ok(true)
            })
            .await?;
            if !endpoint_kept {
                // The endpoint was deleted meanwhile: nothing more to queue for it.
                return Ok(queued);
            }
            queued += deliveries.len() as u64;
        }
        Ok(queued)
    }

    async fn endpoint_health(&self, now: DateTime<Utc>) -> StoreResult<Vec<EndpointHealth>> {
        let endpoints = self.list_endpoints().await?;
        let counts: Vec<(Uuid, i64, i64, i64, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT endpoint_id, \
             CAST(sum(CASE WHEN state = 'pending' THEN 1 ELSE 0 END) AS BIGINT), \
             CAST(sum(CASE WHEN state = 'pending' AND attempts > 0 THEN 1 ELSE 0 END) AS BIGINT), \
             CAST(sum(CASE WHEN state = 'failed' THEN 1 ELSE 0 END) AS BIGINT), \
             min(CASE WHEN state = 'pending' THEN created_at END) \
             FROM webhook_deliveries WHERE state IN ('pending', 'failed') GROUP BY endpoint_id",
        )
        .fetch_all(&self.read)
        .await?;
        let mut counts: HashMap<Uuid, (i64, i64, i64, Option<DateTime<Utc>>)> =
            counts.into_iter().map(|(id, a, b, c, d)| (id, (a, b, c, d))).collect();
        Ok(endpoints
            .into_iter()
            .map(|endpoint| {
                let (pending, failing, failed, oldest) = counts.remove(&endpoint.id).unwrap_or_default();
                EndpointHealth {
                    endpoint_id: endpoint.id,
                    url: endpoint.url,
                    status: endpoint.status,
                    pending,
                    failing,
                    failed,
                    oldest_pending_age_seconds: oldest
                        .map(|at| (now - at).num_milliseconds().max(0) as f64 / 1000.0),
                    failing_since: endpoint.failing_since,
                }
            })
            .collect())
    }

    async fn prune_events(&self, before: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
        // The events' deliveries and their attempts go with them, deleted here rather than by
        // ON DELETE CASCADE, which the distributed-SQL schema has not (migrations/dsql). A
        // transaction changes at most CHUNK rows: the events (at most half of it) and as many of
        // their deliveries as fit; the events go in the one that finds none of theirs left.
        loop {
            let pruned = retry::transaction(|| async {
                let mut tx = self.write.begin_with(self.begin).await?;
                // Never prune what an ordered channel has yet to publish.
                let (published,): (Option<i64>,) =
                    sqlx::query_as("SELECT min(published_through) FROM event_channels")
                        .fetch_one(&mut *tx)
                        .await?;
                let doomed: Vec<(Uuid,)> = sqlx::query_as(
                    "SELECT id FROM events WHERE position IS NOT NULL AND position <= $1 AND created_at < $2 \
                     ORDER BY position LIMIT $3",
                )
                .bind(published.unwrap_or(i64::MAX))
                .bind(before)
                .bind(i64::from(batch.clamp(1, MAX_BATCH)).min(CHUNK / 2))
                .fetch_all(&mut *tx)
                .await?;
                if doomed.is_empty() {
                    return Ok(Some(0));
                }
                let doomed: Vec<Uuid> = doomed.into_iter().map(|(id,)| id).collect();
                let budget = CHUNK as usize - doomed.len();
                if !delete_deliveries(&mut tx, Deliveries::OfEvents(&doomed), budget).await? {
                    tx.commit().await?;
                    return Ok(None);
                }
                let sql = format!(
                    "DELETE FROM events WHERE id IN ({}) RETURNING id",
                    tuples(1, 1, doomed.len()).replace(['(', ')'], "")
                );
                let mut delete = sqlx::query_as::<DB, (Uuid,)>(&sql);
                for id in &doomed {
                    delete = delete.bind(*id);
                }
                let deleted = delete.fetch_all(&mut *tx).await?;
                tx.commit().await?;
                Ok(Some(deleted.len() as u64))
            })
            .await?;
            if let Some(pruned) = pruned {
                return Ok(pruned);
            }
        }
    }
}

/// `($start, $start+1), ($start+2, …)…`: `rows` tuples of `width` numbered parameters.
pub(super) fn tuples(start: usize, width: usize, rows: usize) -> String {
    (0..rows)
        .map(|row| {
            let first = start + row * width;
            let params: Vec<String> = (first..first + width).map(|n| format!("${n}")).collect();
            format!("({})", params.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Inserts one pending delivery per (endpoint, event), due now.
async fn insert_deliveries<DB>(
    tx: &mut sqlx::Transaction<'_, DB>,
    deliveries: &[(Uuid, &(Uuid, String, String, i64, i64))],
    now: DateTime<Utc>,
) -> StoreResult<()>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    for chunk in deliveries.chunks(200) {
        let sql = format!(
            "INSERT INTO webhook_deliveries (id, endpoint_id, event_id, subject, sequence, position, state, \
             attempts, next_attempt_at, created_at, updated_at) VALUES {}",
            tuples(1, 11, chunk.len())
        );
        let mut insert = sqlx::query::<DB>(&sql);
        for (endpoint, event) in chunk {
            insert = insert
                .bind(Uuid::now_v7())
                .bind(*endpoint)
                .bind(event.0)
                .bind(event.1.clone())
                .bind(event.3)
                .bind(event.4)
                .bind("pending".to_string())
                .bind(0i64)
                .bind(now)
                .bind(now)
                .bind(now);
        }
        insert.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Whose deliveries [`delete_deliveries`] deletes.
#[derive(Clone, Copy)]
enum Deliveries<'a> {
    OfEndpoint(Uuid),
    OfEvents(&'a [Uuid]),
}

/// Deletes, in `tx`, whole deliveries of `owner` with their attempts, oldest first, changing at
/// most `budget` (≥ 1) rows. True when none of `owner`'s is left; otherwise the caller commits
/// and calls again. (A delivery with more attempts than the budget loses its oldest attempts
/// first, so every call makes progress.)
async fn delete_deliveries<DB>(
    tx: &mut sqlx::Transaction<'_, DB>,
    owner: Deliveries<'_>,
    budget: usize,
) -> StoreResult<bool>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let budget = budget.max(1);
    let (filter, keys): (String, Vec<Uuid>) = match owner {
        Deliveries::OfEndpoint(endpoint) => ("d.endpoint_id = $1".into(), vec![endpoint]),
        Deliveries::OfEvents(events) => (
            format!("d.event_id IN ({})", tuples(1, 1, events.len()).replace(['(', ')'], "")),
            events.to_vec(),
        ),
    };
    // One more than can fit says whether more are left.
    let sql = format!(
        "SELECT d.id, CAST((SELECT count(*) FROM webhook_attempts a WHERE a.delivery_id = d.id) AS BIGINT) \
         FROM webhook_deliveries d WHERE {filter} ORDER BY d.id LIMIT {}",
        budget + 1
    );
    let mut select = sqlx::query_as::<DB, (Uuid, i64)>(&sql);
    for key in &keys {
        select = select.bind(*key);
    }
    let found: Vec<(Uuid, i64)> = select.fetch_all(&mut **tx).await?;
    let Some(&(first, _)) = found.first() else {
        return Ok(true);
    };
    let mut changed = 0;
    let chosen: Vec<Uuid> = found
        .iter()
        .take_while(|(_, attempts)| {
            changed += 1 + (*attempts).max(0) as usize;
            changed <= budget
        })
        .map(|(id, _)| *id)
        .collect();
    if chosen.is_empty() {
        let sql = format!(
            "DELETE FROM webhook_attempts WHERE id IN \
             (SELECT id FROM webhook_attempts WHERE delivery_id = $1 ORDER BY id LIMIT {budget})"
        );
        sqlx::query::<DB>(&sql).bind(first).execute(&mut **tx).await?;
        return Ok(false);
    }
    let ids = tuples(1, 1, chosen.len()).replace(['(', ')'], "");
    for sql in [
        format!("DELETE FROM webhook_attempts WHERE delivery_id IN ({ids})"),
        format!("DELETE FROM webhook_deliveries WHERE id IN ({ids})"),
    ] {
        let mut delete = sqlx::query::<DB>(&sql);
        for id in &chosen {
            delete = delete.bind(*id);
        }
        delete.execute(&mut **tx).await?;
    }
    Ok(chosen.len() == found.len())
}

/// Disables an enabled endpoint and records its `webhook_endpoint.disabled` event. False when it
/// was not enabled (another relay got there first).
async fn disable_endpoint<DB>(
    tx: &mut sqlx::Transaction<'_, DB>,
    endpoint: Uuid,
    reason: &str,
    now: DateTime<Utc>,
) -> StoreResult<bool>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<Uuid>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<String>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let disabled: Option<(String,)> = sqlx::query_as(
        "UPDATE webhook_endpoints SET status = 'disabled', disabled_reason = $1, updated_at = $2 \
         WHERE id = $3 AND status = 'enabled' RETURNING url",
    )
    .bind(reason.to_string())
    .bind(now)
    .bind(endpoint)
    .fetch_optional(&mut **tx)
    .await?;
    let Some((url,)) = disabled else { return Ok(false) };
    let data = json!({
        "endpoint": { "endpoint_id": endpoint, "url": url, "status": "disabled", "disabled_reason": reason },
    });
    append(
        tx,
        &format!("webhook-endpoints/{endpoint}"),
        None,
        &[(EventType::WebhookEndpointDisabled, data)],
        None,
        now,
    )
    .await?;
    Ok(true)
}

fn humanize(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        s if s % 86_400 == 0 && s > 0 => format!("{} d", s / 86_400),
        s if s % 3600 == 0 && s > 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 && s > 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn stamping_keeps_each_subject_in_sequence() {
        // Ids out of sequence order for subject a (a clock step backwards between processes).
        let candidates = vec![
            (id(1), "a".to_string(), 2, 1),
            (id(2), "b".to_string(), 1, 0),
            (id(3), "a".to_string(), 1, 0),
            (id(4), "c".to_string(), 5, 1), // predecessor not stamped, not here: waits
            (id(5), "d".to_string(), 3, 0), // predecessor stamped (or pruned)
        ];
        assert_eq!(stamping_order(candidates), vec![id(3), id(2), id(1), id(5)]);
    }
}
