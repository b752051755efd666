//! The relay: takes committed events out of the outbox to every channel.
//!
//! Four loops, each safe to run in many processes at once (on PostgreSQL), each bounded and
//! asleep when idle:
//! - **stamping** gives committed events their global positions (see `store::events`) and fans
//!   them out to webhook endpoints;
//! - **NATS** publishes in position order under a channel lease (one relay at a time; a relay that
//!   dies mid-batch is replaced after the lease and re-sends — JetStream drops the duplicates by
//!   `Nats-Msg-Id` within its duplicate window, which is longer than the lease);
//! - **webhooks** claims due deliveries per endpoint (each the head of its order's queue, at most
//!   the endpoint's concurrency cap at once), posts them signed and records every attempt;
//! - **pruning** deletes events past their retention in bounded batches.
//!
//! Nothing here is in a request's path: a broker or endpoint that is down only makes events wait.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::adapters::events::OutgoingEvent;
use crate::adapters::events::nats::{JetStreamSink, NatsSettings};
use crate::adapters::events::webhook::{self, DeliveryOutcome, WebhookClient, WebhookSecret};
use crate::clock;
use crate::domain::events::StoredEvent;
use crate::monitoring::metrics::Metrics;
use crate::store::Store;
use crate::store::events::{AttemptRecord, AttemptRecorded, AttemptVerdict, DeliveryClaim, EndpointStatus};

/// The ordered channel name of NATS JetStream in `event_channels`.
pub const NATS_CHANNEL: &str = "nats";

/// Webhook delivery settings.
#[derive(Clone, Debug)]
pub struct WebhookSettings {
    /// How long one delivery may take (connect + answer).
    pub timeout: Duration,
    /// Delays between attempts (the first is normally 0: at once); exhausted = failed.
    pub schedule: Vec<Duration>,
    /// Deliveries in flight at once per endpoint (across processes).
    pub max_in_flight: u32,
    /// An endpoint failing continuously this long is disabled.
    pub disable_after: Duration,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(15),
            schedule: webhook::DEFAULT_RETRY_SCHEDULE.to_vec(),
            max_in_flight: 8,
            disable_after: Duration::from_secs(5 * 24 * 3600),
        }
    }
}

/// Everything about events out.
#[derive(Clone, Debug)]
pub struct EventSettings {
    /// The CloudEvent `source`.
    pub source: String,
    /// NATS JetStream, when configured.
    pub nats: Option<NatsSettings>,
    pub webhooks: WebhookSettings,
    /// Events older than this are pruned (once every channel has them).
    pub retention: Duration,
    /// Longest sleep of an idle loop.
    pub poll_interval: Duration,
    /// How long a relay holds the NATS channel without renewing it.
    pub channel_lease: Duration,
    /// Events stamped or published per round.
    pub batch: u32,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            source: "orderflow".into(),
            nats: None,
            webhooks: WebhookSettings::default(),
            retention: Duration::from_secs(30 * 24 * 3600),
            poll_interval: Duration::from_secs(1),
            channel_lease: Duration::from_secs(15),
            batch: 500,
        }
    }
}

impl EventSettings {
    /// An event as every channel sends it.
    pub fn outgoing(&self, event: &StoredEvent) -> OutgoingEvent {
        OutgoingEvent {
            id: event.id,
            event_type: event.event_type.clone(),
            order_id: event.order_id,
            sequence: event.sequence,
            position: event.position,
            body: bytes::Bytes::from(event.to_json(&self.source)),
        }
    }
}

/// Runs the relay's loops until `stop`.
pub async fn run(store: Arc<dyn Store>, settings: EventSettings, metrics: Metrics, stop: watch::Receiver<bool>) {
    let settings = Arc::new(settings);
    let stamped = Arc::new(Notify::new());
    let mut loops = JoinSet::new();
    loops.spawn(stamp_loop(
        store.clone(),
        settings.clone(),
        stamped.clone(),
        stop.clone(),
    ));
    if let Some(nats) = settings.nats.clone() {
        loops.spawn(nats_loop(
            store.clone(),
            settings.clone(),
            nats,
            stamped.clone(),
            metrics.clone(),
            stop.clone(),
        ));
    }
    loops.spawn(webhook_loop(
        store.clone(),
        settings.clone(),
        stamped.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    loops.spawn(prune_loop(store, settings, stop));
    while loops.join_next().await.is_some() {}
}

/// Sleeps until `signal`, the poll interval, or stop. Returns false on stop.
async fn idle(signal: &Notify, poll: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = signal.notified() => true,
        _ = tokio::time::sleep(poll) => true,
        _ = stop.wait_for(|stop| *stop) => false,
    }
}

fn stopped(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow()
}

async fn stamp_loop(
    store: Arc<dyn Store>,
    settings: Arc<EventSettings>,
    stamped: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    // New events come with new jobs (checkout, steps): the job wake-up is the event wake-up.
    let committed = store.job_signal();
    let mut failures = 0u32;
    while !stopped(&stop) {
        let wake = committed.any().notified();
        match store.events().stamp_events(settings.batch, clock::now()).await {
            Ok(0) => {
                failures = 0;
                tokio::pin!(wake);
                tokio::select! {
                    _ = &mut wake => {}
                    _ = tokio::time::sleep(settings.poll_interval) => {}
                    _ = stop.wait_for(|stop| *stop) => return,
                }
            }
            Ok(_) => {
                failures = 0;
                stamped.notify_waiters();
            }
            Err(error) => {
                failures += 1;
                tracing::warn!(%error, "stamping event positions failed; retrying");
                if !idle(&Notify::new(), backoff(failures), &mut stop).await {
                    return;
                }
            }
        }
    }
}

/// Backoff after `failures` consecutive failures: 100 ms doubling to 10 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(7))).min(Duration::from_secs(10))
}

async fn nats_loop(
    store: Arc<dyn Store>,
    settings: Arc<EventSettings>,
    nats: NatsSettings,
    stamped: Arc<Notify>,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    let sink = loop {
        match JetStreamSink::connect(nats.clone()).await {
            Ok(sink) => break sink,
            Err(error) => {
                tracing::warn!(%error, url = %nats.url, "cannot set up NATS JetStream; retrying");
                if !idle(&Notify::new(), Duration::from_secs(2), &mut stop).await {
                    return;
                }
            }
        }
    };
    let token = Uuid::now_v7();
    let mut failures = 0u32;
    // How far the channel was published when this relay last looked: while the last stamped
    // position is still there, there is nothing to do and no lease to take.
    let mut known_through: Option<i64> = None;
    while !stopped(&stop) {
        let wake = stamped.notified();
        let up_to_date = match (known_through, store.events().last_position().await) {
            (Some(through), Ok(last)) => last <= through,
            _ => false,
        };
        let round: anyhow::Result<Round> = if up_to_date {
            Ok(Round::Idle)
        } else {
            publish_round(store.as_ref(), &settings, &sink, token, &metrics).await
        };
        match round {
            Ok(Round::Published) => {
                failures = 0;
                known_through = None;
            }
            Ok(Round::CaughtUp(_) | Round::Idle) => {
                failures = 0;
                if let Ok(Round::CaughtUp(through)) = round {
                    known_through = Some(through);
                }
                tokio::pin!(wake);
                tokio::select! {
                    _ = &mut wake => {}
                    _ = tokio::time::sleep(settings.poll_interval) => {}
                    _ = stop.wait_for(|stop| *stop) => return,
                }
            }
            // Another process holds the channel: look again soon after its lease could run out.
            Ok(Round::HeldElsewhere) => {
                if !idle(&Notify::new(), settings.channel_lease / 5, &mut stop).await {
                    return;
                }
            }
            Err(error) => {
                failures += 1;
                tracing::warn!(%error, "publishing events to NATS failed; they wait and will be re-sent");
                if !idle(&Notify::new(), backoff(failures), &mut stop).await {
                    return;
                }
            }
        }
    }
}

enum Round {
    Published,
    /// Everything up to this position is published.
    CaughtUp(i64),
    Idle,
    HeldElsewhere,
}

/// One batch to NATS: claim the channel, publish what follows its cursor, record the acknowledged
/// prefix in one statement.
async fn publish_round(
    store: &dyn Store,
    settings: &EventSettings,
    sink: &JetStreamSink,
    token: Uuid,
    metrics: &Metrics,
) -> anyhow::Result<Round> {
    let events = store.events();
    let Some(through) = events
        .claim_channel(NATS_CHANNEL, token, settings.channel_lease, clock::now())
        .await?
    else {
        return Ok(Round::HeldElsewhere);
    };
    let batch = events
        .events_after(&crate::store::events::EventQuery {
            after: through,
            limit: settings.batch,
            types: None,
        })
        .await?;
    if batch.is_empty() {
        return Ok(Round::CaughtUp(through));
    }
    let outgoing: Vec<OutgoingEvent> = batch.iter().map(|event| settings.outgoing(event)).collect();
    let results = sink.publish(&outgoing).await;
    let acked = results.iter().take_while(|result| result.is_ok()).count();
    let failed = results.len() - acked;
    if acked > 0 {
        let last = outgoing[acked - 1].position;
        events.advance_channel(NATS_CHANNEL, token, last, clock::now()).await?;
        metrics.events_published("nats", acked as u64);
    }
    if failed > 0 {
        metrics.events_failed("nats", failed as u64);
        let error = results
            .into_iter()
            .find_map(Result::err)
            .map(|e| e.to_string())
            .unwrap_or_default();
        anyhow::bail!("{failed} of {} events not acknowledged: {error}", outgoing.len());
    }
    Ok(Round::Published)
}

async fn webhook_loop(
    store: Arc<dyn Store>,
    settings: Arc<EventSettings>,
    stamped: Arc<Notify>,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    let client = WebhookClient::new(settings.webhooks.timeout);
    // Deliveries in flight in this process, across endpoints.
    let permits = Arc::new(Semaphore::new(256));
    let finished = Arc::new(Notify::new());
    let mut running: JoinSet<()> = JoinSet::new();
    let lease = settings.webhooks.timeout * 2 + Duration::from_secs(5);
    while !stopped(&stop) {
        let wake = stamped.notified();
        let done = finished.notified();
        while running.try_join_next().is_some() {}
        let mut claimed_any = false;
        // Until the earliest retry falls due, or the poll fallback (other processes' work).
        let mut sleep = settings.poll_interval;
        match store.events().list_endpoints().await {
            Ok(endpoints) => {
                for endpoint in endpoints.into_iter().filter(|e| e.status == EndpointStatus::Enabled) {
                    // A read first: nothing due means no claiming transaction.
                    match store.events().next_delivery_due(endpoint.id).await {
                        Ok(None) => continue,
                        Ok(Some(due)) if due > clock::now() => {
                            sleep = sleep.min((due - clock::now()).to_std().unwrap_or_default());
                            continue;
                        }
                        Ok(Some(_)) => {}
                        Err(error) => {
                            tracing::warn!(%error, "reading webhook deliveries failed");
                            continue;
                        }
                    }
                    let claims = match store
                        .events()
                        .claim_deliveries(endpoint.id, settings.webhooks.max_in_flight, lease, clock::now())
                        .await
                    {
                        Ok(claims) => claims,
                        Err(error) => {
                            tracing::warn!(%error, "claiming webhook deliveries failed");
                            continue;
                        }
                    };
                    claimed_any |= !claims.is_empty();
                    let endpoint = Arc::new(endpoint);
                    for claim in claims {
                        let Ok(permit) = permits.clone().acquire_owned().await else {
                            return;
                        };
                        let (store, settings, client, metrics, endpoint, finished) = (
                            store.clone(),
                            settings.clone(),
                            client.clone(),
                            metrics.clone(),
                            endpoint.clone(),
                            finished.clone(),
                        );
                        running.spawn(async move {
                            deliver(store.as_ref(), &settings, &client, &metrics, &endpoint, claim).await;
                            drop(permit);
                            finished.notify_waiters();
                        });
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "listing webhook endpoints failed"),
        }
        if claimed_any {
            continue;
        }
        tokio::pin!(wake);
        tokio::pin!(done);
        tokio::select! {
            _ = &mut wake => {}
            _ = &mut done => {}
            _ = tokio::time::sleep(sleep.max(Duration::from_millis(5))) => {}
            _ = stop.wait_for(|stop| *stop) => break,
        }
    }
    // Let deliveries under way record their outcome (bounded by the client timeout).
    while running.join_next().await.is_some() {}
}

/// Sends one delivery and records the attempt.
async fn deliver(
    store: &dyn Store,
    settings: &EventSettings,
    client: &WebhookClient,
    metrics: &Metrics,
    endpoint: &crate::store::events::WebhookEndpoint,
    claim: DeliveryClaim,
) {
    let now = clock::now();
    let secrets: Vec<WebhookSecret> = endpoint
        .signing_secrets(now)
        .into_iter()
        .filter_map(|secret| WebhookSecret::parse(secret).ok())
        .collect();
    let secrets: Vec<&WebhookSecret> = secrets.iter().collect();
    let outgoing = settings.outgoing(&claim.event);
    let result = client.deliver(&endpoint.url, &outgoing, &secrets, now).await;
    let failed_attempts = claim.attempts + 1;
    let retry_at = |delay: Duration| -> AttemptVerdict {
        AttemptVerdict::RetryAt(clock::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::zero()))
    };
    let verdict = match &result.outcome {
        DeliveryOutcome::Delivered => AttemptVerdict::Delivered,
        DeliveryOutcome::Gone => AttemptVerdict::Gone,
        DeliveryOutcome::RetryAfter(after) => {
            match webhook::retry_delay(&settings.webhooks.schedule, failed_attempts) {
                Some(scheduled) => retry_at((*after).max(scheduled)),
                None => AttemptVerdict::GiveUp,
            }
        }
        DeliveryOutcome::Failed => match webhook::retry_delay(&settings.webhooks.schedule, failed_attempts) {
            Some(delay) => retry_at(delay),
            None => AttemptVerdict::GiveUp,
        },
    };
    if verdict == AttemptVerdict::Delivered {
        metrics.events_published("webhook", 1);
    } else {
        metrics.events_failed("webhook", 1);
        metrics.webhook_failure(&endpoint.id.to_string());
        tracing::info!(
            endpoint = %endpoint.id, event = %claim.event.id, status = ?result.status, error = ?result.error,
            "webhook delivery failed"
        );
    }
    let record = AttemptRecord {
        delivery_id: claim.delivery_id,
        lease_token: claim.lease_token,
        endpoint_id: endpoint.id,
        verdict,
        status_code: result.status,
        latency: result.latency,
        error: result.error.clone(),
        response_excerpt: result.response_excerpt.clone(),
        disable_after: settings.webhooks.disable_after,
    };
    match store.events().record_attempt(&record, clock::now()).await {
        Ok(AttemptRecorded::EndpointDisabled(reason)) => {
            tracing::warn!(endpoint = %endpoint.id, url = %endpoint.url, %reason, "webhook endpoint disabled");
        }
        Ok(_) => {}
        // The lease runs out and the delivery is sent again: at least once, same webhook-id.
        Err(error) => tracing::warn!(%error, "recording a webhook attempt failed; it will be re-sent"),
    }
}

async fn prune_loop(store: Arc<dyn Store>, settings: Arc<EventSettings>, mut stop: watch::Receiver<bool>) {
    let every = (settings.retention / 24).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    loop {
        if let Err(error) = prune(store.as_ref(), settings.retention, clock::now()).await {
            tracing::warn!(%error, "pruning old events failed");
        }
        if !idle(&Notify::new(), every, &mut stop).await {
            return;
        }
    }
}

/// Deletes events older than `retention`, in bounded batches. Returns how many.
pub async fn prune(store: &dyn Store, retention: Duration, now: DateTime<Utc>) -> crate::store::StoreResult<u64> {
    let before = now - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::days(30));
    let mut pruned = 0;
    loop {
        let deleted = store.events().prune_events(before, 1000).await?;
        pruned += deleted;
        if deleted == 0 {
            return Ok(pruned);
        }
    }
}
