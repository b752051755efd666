//! The relay against the real components, on SQLite, PostgreSQL and the emulated DSQL: a private
//! `nats-server -js` started by each test, and a real webhook receiver that verifies every
//! delivery with the official Standard Webhooks library. A fulfilled order's events reach JetStream, the endpoint and the
//! feed with the same ids and sequences 1..n; a declined order's are placed + cancelled; a failing
//! endpoint is retried with its attempts logged while other orders flow, and an order's next
//! event waits for the failing one; 410 disables; replay re-sends exactly a position range; NATS
//! going away loses nothing and fires then resolves the alarm; deliveries during a secret rotation
//! verify with either secret.

mod common;
#[path = "support/nats.rs"]
mod nats_server;
#[path = "support/webhook_receiver.rs"]
mod webhook_receiver;

use std::time::Duration;

use chrono::Utc;
use common::{Backend, TestApp};
use nats_server::NatsServer;
use orderflow::adapters::events::nats::NatsSettings;
use orderflow::adapters::events::webhook::WebhookSecret;
use orderflow::domain::events::{StoredEvent, TypePattern};
use orderflow::events::{EventSettings, WebhookSettings};
use orderflow::monitoring::AlarmSettings;
use orderflow::store::Store;
use orderflow::store::events::{EndpointStatus, EventQuery, NewEndpoint, ReplayRange};
use serde_json::{Value, json};
use uuid::Uuid;
use webhook_receiver::{Received, WebhookReceiver};

on_every_backend!(
    a_fulfilled_order_reaches_every_channel,
    a_failing_endpoint_holds_back_only_its_order,
    replay_resends_exactly_a_position_range,
    nats_outage_loses_nothing_and_alarms,
);

const DEADLINE: Duration = Duration::from_secs(30);
const STREAM: &str = "ORDERFLOW_EVENTS";

/// Fast retries so a test sees several attempts in well under a second.
fn settings(nats: Option<&NatsServer>) -> EventSettings {
    EventSettings {
        nats: nats.map(|server| NatsSettings {
            url: server.url(),
            stream: STREAM.into(),
            ack_timeout: Duration::from_secs(2),
            ..NatsSettings::default()
        }),
        webhooks: WebhookSettings {
            timeout: Duration::from_secs(5),
            schedule: [0, 200, 200, 200, 200, 200, 200, 200]
                .map(Duration::from_millis)
                .to_vec(),
            max_in_flight: 8,
            disable_after: Duration::from_secs(3600),
        },
        poll_interval: Duration::from_millis(50),
        channel_lease: Duration::from_secs(5),
        ..EventSettings::default()
    }
}

/// The relay running in the background until dropped.
struct Relay {
    stop: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    fn start(app: &TestApp, settings: EventSettings) -> Relay {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(orderflow::events::run(
            app.store.clone(),
            settings,
            app.metrics.clone(),
            stopped,
        ));
        Relay { stop }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn endpoint(store: &dyn Store, url: &str, patterns: &[&str]) -> (Uuid, String) {
    let secret = WebhookSecret::generate();
    let endpoint = NewEndpoint {
        id: Uuid::now_v7(),
        url: url.to_string(),
        description: Some("test receiver".into()),
        enabled_events: patterns.iter().map(|p| TypePattern::parse(p).unwrap()).collect(),
        secret: secret.as_str().to_string(),
    };
    let created = store.events().create_endpoint(&endpoint, Utc::now()).await.unwrap();
    (created.id, secret.as_str().to_string())
}

/// Places an order for one unit; returns its id.
async fn order(app: &TestApp, product: &str, token: &str, payment: &str) -> String {
    let response = app
        .place_order(
            token,
            &Uuid::now_v7().to_string(),
            &json!({ "items": [{ "product_id": product, "quantity": 1 }], "payment": { "token": payment } }),
        )
        .await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    body["order_id"].as_str().unwrap().to_string()
}

/// Every positioned event, in position order.
async fn feed(store: &dyn Store) -> Vec<StoredEvent> {
    let mut all = Vec::new();
    loop {
        let after = all.last().map(|e: &StoredEvent| e.position).unwrap_or(0);
        let page = store
            .events()
            .events_after(&EventQuery {
                after,
                limit: 1000,
                types: None,
            })
            .await
            .unwrap();
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

/// Waits (polling, with a deadline) until the feed holds `count` events.
async fn feed_with(store: &dyn Store, count: usize) -> Vec<StoredEvent> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let events = feed(store).await;
        if events.len() >= count {
            return events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "feed has {} of {count} events",
            events.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stream_with(server: &NatsServer, count: usize) -> Vec<nats_server::StreamMessage> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let messages = nats_server::stream_messages(&server.url(), STREAM).await;
        if messages.len() >= count {
            return messages;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stream has {} of {count}",
            messages.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn of_order<'a>(events: &'a [StoredEvent], order: &str) -> Vec<&'a StoredEvent> {
    events
        .iter()
        .filter(|e| e.subject == format!("orders/{order}"))
        .collect()
}

/// Deliveries the receiver answered with a 2xx.
fn delivered(received: &[Received]) -> Vec<&Received> {
    received
        .iter()
        .filter(|r| (200..300).contains(&r.answered_status))
        .collect()
}

async fn a_fulfilled_order_reaches_every_channel(backend: Backend) {
    let nats = NatsServer::start();
    let receiver = WebhookReceiver::start().await;
    let app = TestApp::spawn(backend).await;
    let (hook, secret) = endpoint(app.store.as_ref(), &receiver.url(), &["*"]).await;
    receiver.set_secrets(&[&secret]).await;
    let _relay = Relay::start(&app, settings(Some(&nats)));
    let product = app.product("12.50", 10).await;
    let (_, token) = app.customer().await;
    let paid = order(&app, &product, &token, "tok_visa").await;
    let declined = order(&app, &product, &token, "tok_chargeDeclined").await;
    app.drain().await;

    let events = feed_with(app.store.as_ref(), 7).await;
    let fulfilled = of_order(&events, &paid);
    let types: Vec<&str> = fulfilled.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "order.placed",
            "order.paid",
            "order.ready_to_ship",
            "payment.captured",
            "order.fulfilled"
        ],
        "authorized at checkout, captured when it ships"
    );
    let sequences: Vec<i64> = fulfilled.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, [1, 2, 3, 4, 5]);
    assert_eq!(fulfilled[4].data["order"]["status"], "fulfilled");
    assert_eq!(fulfilled[1].data["order"]["payment"]["state"], "authorized");
    assert_eq!(fulfilled[3].data["order"]["payment"]["state"], "captured");
    assert_eq!(
        fulfilled[3].data["order"]["payment"]["captured_amount"].to_string(),
        "12.50"
    );
    assert_eq!(fulfilled[0].data["order"]["total_amount"].to_string(), "12.50");
    let cancelled = of_order(&events, &declined);
    let types: Vec<&str> = cancelled.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["order.placed", "order.cancelled"]);
    assert_eq!(cancelled[1].data["reason"], "payment_declined");
    let positions: Vec<i64> = events.iter().map(|e| e.position).collect();
    assert_eq!(positions, (1..=7).collect::<Vec<i64>>(), "gap-free");

    // JetStream: each event once, with its id as Nats-Msg-Id, on orderflow.events.<type>.
    let messages = stream_with(&nats, 7).await;
    assert_eq!(messages.len(), 7);
    for (message, event) in messages.iter().zip(&events) {
        assert_eq!(message.msg_id, event.id.to_string());
        assert_eq!(message.subject, format!("orderflow.events.{}", event.event_type));
        assert_eq!(message.body["id"], event.id.to_string());
        assert_eq!(message.body["specversion"], "1.0");
        assert_eq!(message.body["position"], event.position);
        assert_eq!(message.body["sequence"], event.sequence);
    }

    // The endpoint: each event, verified by the official library, webhook-id = event id.
    let received = receiver.wait_for(|r| delivered(r).len() >= 7, DEADLINE).await;
    let arrivals = delivered(&received);
    for event in &events {
        let arrival = arrivals
            .iter()
            .find(|r| r.webhook_id.as_deref() == Some(&event.id.to_string()))
            .unwrap_or_else(|| panic!("event {} never arrived", event.id));
        assert!(arrival.verified, "signature did not verify: {:?}", arrival.error);
        assert_eq!(arrival.body.as_ref().unwrap()["id"], event.id.to_string());
        assert_eq!(arrival.header("content-type"), Some("application/json"));
    }
    // The receiver answers before the relay records the delivery: wait for the records.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let log = app
            .store
            .events()
            .list_deliveries(hook, Some("delivered"), None, 50)
            .await
            .unwrap();
        if log.items.len() == 7 {
            break;
        }
        assert!(
            log.items.len() < 7 && tokio::time::Instant::now() < deadline,
            "{} deliveries recorded as delivered, expected 7",
            log.items.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = metrics(&app).await;
    for line in [
        "orderflow_events_published_total{channel=\"nats\"} 7",
        "orderflow_events_published_total{channel=\"webhook\"} 7",
        "orderflow_events_unpublished{channel=\"nats\"} 0",
        &format!("orderflow_webhook_pending_deliveries{{endpoint=\"{hook}\"}} 0"),
        &format!("orderflow_webhook_endpoint_enabled{{endpoint=\"{hook}\"}} 1"),
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing `{line}` in:\n{metrics}");
    }

    // The same bytes everywhere: the feed's rendering is what NATS and the endpoint got.
    let body = String::from_utf8(events[0].to_json("orderflow")).unwrap();
    let arrival = arrivals
        .iter()
        .find(|r| r.webhook_id.as_deref() == Some(&events[0].id.to_string()))
        .unwrap();
    assert_eq!(arrival.raw_body, body);

    // Rotation: deliveries carry both signatures while the old secret is valid.
    let rotated = WebhookSecret::generate();
    app.store
        .events()
        .rotate_secret(
            hook,
            rotated.as_str(),
            Utc::now() + chrono::Duration::hours(1),
            Utc::now(),
        )
        .await
        .unwrap();
    receiver.set_secrets(&[&secret, rotated.as_str()]).await;
    app.store
        .events()
        .replay_deliveries(hook, ReplayRange::Positions { from: 1, to: 1 }, Utc::now())
        .await
        .unwrap();
    let received = receiver.wait_for(|r| delivered(r).len() >= 8, DEADLINE).await;
    let last = delivered(&received).last().copied().cloned().unwrap();
    assert_eq!(
        last.verified_with,
        vec![0, 1],
        "verifies with the old and with the new secret"
    );
    assert_eq!(last.signature_header.unwrap().split(' ').count(), 2);
}

async fn a_failing_endpoint_holds_back_only_its_order(backend: Backend) {
    let receiver = WebhookReceiver::start().await;
    let gone_receiver = WebhookReceiver::start().await;
    let app = TestApp::spawn(backend).await;
    let product = app.product("5.00", 10).await;
    let (_, token) = app.customer().await;
    // Orders exist (and their events) before the relay starts, so both are queued at once.
    let failing = order(&app, &product, &token, "tok_visa").await;
    let healthy = order(&app, &product, &token, "tok_visa").await;
    app.drain().await;
    receiver
        .set_rules(json!([{ "match": { "order_id": failing, "type": "order.placed" }, "status": 500, "times": 3 }]))
        .await;
    gone_receiver.set_rules(json!([{ "status": 410 }])).await;
    let (hook, secret) = endpoint(app.store.as_ref(), &receiver.url(), &["order.*", "payment.*"]).await;
    let (gone, _) = endpoint(app.store.as_ref(), &gone_receiver.url(), &["*"]).await;
    receiver.set_secrets(&[&secret]).await;
    let _relay = Relay::start(&app, settings(None));

    let received = receiver.wait_for(|r| delivered(r).len() >= 10, DEADLINE).await;
    let of = |order: &str| -> Vec<&Received> {
        received
            .iter()
            .filter(|r| r.order_id().as_deref() == Some(order))
            .collect()
    };
    let failing_arrivals = of(&failing);
    // Three 500s for the head, then it and the rest in sequence order.
    let answered: Vec<(i64, u16)> = failing_arrivals
        .iter()
        .map(|r| (r.sequence().unwrap(), r.answered_status))
        .collect();
    assert_eq!(
        answered,
        [
            (1, 500),
            (1, 500),
            (1, 500),
            (1, 200),
            (2, 200),
            (3, 200),
            (4, 200),
            (5, 200)
        ],
        "the failing order's later events wait for its first"
    );
    // The healthy order flowed meanwhile: all of it arrived before the failing head succeeded.
    let index = |r: &Received| received.iter().position(|x| std::ptr::eq(x, r)).unwrap();
    let head_ok = index(failing_arrivals[3]);
    let healthy_arrivals = of(&healthy);
    assert_eq!(healthy_arrivals.len(), 5);
    assert!(
        healthy_arrivals.iter().all(|r| index(r) < head_ok),
        "other orders' events are not held back by a failing one"
    );
    // The attempts are visible in the delivery log.
    let log = app.store.events().list_deliveries(hook, None, None, 50).await.unwrap();
    let head = log
        .items
        .iter()
        .find(|d| d.subject == format!("orders/{failing}") && d.sequence == 1)
        .unwrap();
    assert_eq!((head.state.as_str(), head.attempts), ("delivered", 4));
    assert_eq!(head.attempt_log.len(), 4);
    assert_eq!(head.attempt_log[0].status_code, Some(500));
    let metrics = metrics(&app).await;
    let line = format!("orderflow_webhook_failures_total{{endpoint=\"{hook}\"}} 3");
    assert!(metrics.lines().any(|l| l == line), "missing `{line}` in:\n{metrics}");

    // 410: disabled once, with its own event; nothing more is sent to it.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while app.store.events().get_endpoint(gone).await.unwrap().unwrap().status != EndpointStatus::Disabled {
        assert!(tokio::time::Instant::now() < deadline, "a 410 disables the endpoint");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let events = feed_with(app.store.as_ref(), 11).await;
    let disabled: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == "webhook_endpoint.disabled")
        .collect();
    assert_eq!(disabled.len(), 1);
    assert_eq!(disabled[0].data["endpoint"]["endpoint_id"], gone.to_string());
    let alarms = orderflow::monitoring::alarms::evaluate(app.store.as_ref(), &AlarmSettings::default(), Utc::now())
        .await
        .unwrap();
    let alarm = alarms
        .iter()
        .find(|a| a.alarm == format!("webhook_endpoint_disabled:{gone}"))
        .unwrap();
    assert!(alarm.firing, "{alarm:?}");
    let sent = gone_receiver.received().await.len();
    assert!(
        sent <= 8,
        "at most one round of in-flight deliveries reached the 410 endpoint: {sent}"
    );
}

async fn replay_resends_exactly_a_position_range(backend: Backend) {
    let receiver = WebhookReceiver::start().await;
    let app = TestApp::spawn(backend).await;
    let (hook, secret) = endpoint(app.store.as_ref(), &receiver.url(), &["*"]).await;
    receiver.set_secrets(&[&secret]).await;
    let _relay = Relay::start(&app, settings(None));
    let product = app.product("1.00", 10).await;
    let (_, token) = app.customer().await;
    order(&app, &product, &token, "tok_visa").await;
    order(&app, &product, &token, "tok_visa").await;
    app.drain().await;
    let events = feed_with(app.store.as_ref(), 10).await;
    receiver.wait_for(|r| delivered(r).len() >= 10, DEADLINE).await;
    receiver.reset().await;
    receiver.set_secrets(&[&secret]).await;

    let queued = app
        .store
        .events()
        .replay_deliveries(hook, ReplayRange::Positions { from: 4, to: 7 }, Utc::now())
        .await
        .unwrap();
    assert_eq!(queued, 4);
    let received = receiver.wait_for(|r| delivered(r).len() >= 4, DEADLINE).await;
    let mut ids: Vec<String> = received.iter().filter_map(|r| r.webhook_id.clone()).collect();
    ids.sort();
    let mut expected: Vec<String> = events[3..7].iter().map(|e| e.id.to_string()).collect();
    expected.sort();
    assert_eq!(ids, expected, "exactly positions 4..=7, with their original ids");
    assert!(received.iter().all(|r| r.verified));

    // The same from the command line, and the feed as operators read it.
    receiver.reset().await;
    receiver.set_secrets(&[&secret]).await;
    let replayed = cli(
        &app,
        &[
            "events",
            "replay",
            "--endpoint",
            &hook.to_string(),
            "--from-position",
            "9",
            "--to-position",
            "10",
        ],
    )
    .await;
    assert!(replayed.contains("queued 2 event(s)"), "{replayed}");
    let received = receiver.wait_for(|r| delivered(r).len() >= 2, DEADLINE).await;
    let mut ids: Vec<String> = received.iter().filter_map(|r| r.webhook_id.clone()).collect();
    ids.sort();
    let mut expected: Vec<String> = events[8..10].iter().map(|e| e.id.to_string()).collect();
    expected.sort();
    assert_eq!(ids, expected);
    let listed = cli(&app, &["events", "list", "--after", "2", "--limit", "3", "--json"]).await;
    let lines: Vec<Value> = listed.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    let positions: Vec<i64> = lines.iter().map(|e| e["position"].as_i64().unwrap()).collect();
    assert_eq!(positions, [3, 4, 5]);
    assert_eq!(lines[0]["id"], events[2].id.to_string());
    let bad = tokio::process::Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(app.backend.server_args())
        .args([
            "--database-url",
            app.db.url(),
            "events",
            "replay",
            "--endpoint",
            &hook.to_string(),
        ])
        .args(["--from-position", "5", "--to-position", "4"])
        .output()
        .await
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--from-position"));
}

/// Runs the `orderflow` binary on the app's database, in its profile; returns its standard output.
async fn cli(app: &TestApp, args: &[&str]) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(app.backend.server_args())
        .args(["--database-url", app.db.url()])
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "orderflow {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

async fn nats_outage_loses_nothing_and_alarms(backend: Backend) {
    let mut nats = NatsServer::start();
    let app = TestApp::spawn(backend).await;
    let _relay = Relay::start(&app, settings(Some(&nats)));
    let product = app.product("2.00", 100).await;
    let (_, token) = app.customer().await;
    for _ in 0..3 {
        order(&app, &product, &token, "tok_visa").await;
    }
    app.drain().await;
    stream_with(&nats, 15).await;

    nats.stop();
    // Checkout and the pipeline carry on without NATS.
    for _ in 0..4 {
        order(&app, &product, &token, "tok_visa").await;
    }
    app.drain().await;
    feed_with(app.store.as_ref(), 35).await;
    let alarms = AlarmSettings {
        events_unpublished_age: Some(Duration::from_millis(300)),
        ..AlarmSettings::default()
    };
    let fired = wait_for_alarm(app.store.as_ref(), &alarms, true).await;
    assert!(fired.summary.contains("wait for NATS"), "{}", fired.summary);

    // The relay's attempts while NATS is away are counted as failures.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !metrics(&app)
        .await
        .lines()
        .any(|l| l.starts_with("orderflow_events_failed_total{channel=\"nats\"}"))
    {
        assert!(tokio::time::Instant::now() < deadline, "NATS failures are counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    nats.restart();
    let messages = stream_with(&nats, 35).await;
    let events = feed(app.store.as_ref()).await;
    assert_eq!(messages.len(), events.len(), "every event once, none twice");
    for (message, event) in messages.iter().zip(&events) {
        assert_eq!(message.msg_id, event.id.to_string(), "in position order");
    }
    wait_for_alarm(app.store.as_ref(), &alarms, false).await;
    let backlog = app
        .store
        .events()
        .channel_backlog("nats", Utc::now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((backlog.unpublished, backlog.published_through), (0, 35));
}

async fn metrics(app: &TestApp) -> String {
    let response = app.get("/metrics", Some(&app.admin)).await;
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

/// Evaluates the alarms until `events_unpublished:nats` is recorded in state `firing`.
async fn wait_for_alarm(
    store: &dyn Store,
    settings: &AlarmSettings,
    firing: bool,
) -> orderflow::monitoring::alarms::Condition {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let made = orderflow::monitoring::alarms::evaluate_once(store, settings)
            .await
            .unwrap();
        if let Some(condition) = made
            .into_iter()
            .find(|c| c.alarm == "events_unpublished:nats" && c.firing == firing)
        {
            return condition;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "events_unpublished:nats never became firing={firing}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
