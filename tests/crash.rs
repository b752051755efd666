//! Chaos: 300 orders with every kind of payment token while the processes are killed with
//! SIGKILL several times. Afterwards every accepted order is finished (or visibly parked with a
//! dead job), no order was charged twice or got two receipts (the audit checks the provider's
//! books and the notification records), no effect was applied twice (each timeline entry appears
//! once), and `orderflow audit` is clean.
//! On PostgreSQL a second process drains the same queue throughout.
//!
//! The same run proves events out (DESIGN.md/API.md "Events out") across the crashes: every
//! process publishes to a private NATS JetStream and delivers to one webhook endpoint (a receiver
//! that verifies with the official Standard Webhooks library), and every kill lands while the relay
//! is publishing (orders are flowing and the NATS relay of the processes being killed has published
//! since they started). Afterwards: every event is positioned, positions are exactly 1..=N and each
//! order's sequences 1..=k in position order; every order has the events its outcome implies; the
//! stream holds every event exactly once (`Nats-Msg-Id` = event id, dropped re-sends included);
//! and the endpoint got every event at least once, verified, with the same id and the same bytes
//! on every arrival, each order's events first arriving in sequence order.

mod common;
#[path = "support/nats.rs"]
mod nats_server;
#[path = "support/webhook_receiver.rs"]
mod webhook_receiver;

use common::SendJson;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use common::{Backend, TestDb};
use nats_server::{NatsServer, stream_messages};
use orderflow::adapters::events::webhook::WebhookSecret;
use orderflow::domain::events::{StoredEvent, TypePattern};
use orderflow::events::NATS_CHANNEL;
use orderflow::store::Store;
use orderflow::store::events::{ChannelBacklog, EventQuery, NewEndpoint};
use serde_json::{Value, json};
use sqlx::Connection;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;
use webhook_receiver::WebhookReceiver;

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");
const SECRET: &str = "crash-test-secret-crash-test-secret-xx";
const ORDERS: usize = 300;
const TOKENS: [&str; 5] = [
    "tok_visa",
    "tok_timeout",
    "tok_flaky",
    "tok_chargeDeclined",
    "tok_unavailable",
];
const NATS_STREAM: &str = "ORDERFLOW_EVENTS";
/// The CloudEvent `source` (the default of `--events-source`).
const EVENTS_SOURCE: &str = "orderflow";
/// Orders the clients may run ahead of the next kill's target, so orders keep flowing at each kill.
const SLACK: usize = 20;
/// An order's events, in sequence order, when it goes all the way.
/// Authorized at checkout (`order.paid`), captured as it ships (with `order.fulfilled`).
const LIFECYCLE: [&str; 5] = [
    "order.placed",
    "order.paid",
    "order.ready_to_ship",
    "payment.captured",
    "order.fulfilled",
];

on_both_backends!(kill_nine_during_300_orders);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Cluster {
    db_url: String,
    data_dir: std::path::PathBuf,
    port: u16,
    /// API + workers; on PostgreSQL also a worker-only process.
    children: Vec<Child>,
    extra_worker: bool,
    /// The test's private NATS server.
    nats_url: String,
}

impl Cluster {
    fn command(&self) -> Command {
        let mut command = Command::new(BIN);
        command
            .arg("--database-url")
            .arg(&self.db_url)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--jwt-secret",
                SECRET,
                "--job-lease",
                "1s",
                "--job-backoff",
                "20ms",
                "--job-backoff-max",
                "200ms",
            ])
            .args(["--job-poll", "200ms", "--no-seed"])
            // The subject here is crash safety; twelve clients on a few buyers would otherwise
            // meet the per-principal limits (tests/edge.rs covers limits).
            .args(["--rate-limit-writes", "off", "--rate-limit-reads", "off"])
            // Events out: every process relays to the private NATS server and the webhook
            // endpoint, retrying fast. A delivery leased by a killed process is taken over when its
            // lease (2 x timeout + 5 s) runs out, so the timeout is kept short too.
            .args(["--nats-url", &self.nats_url, "--nats-stream", NATS_STREAM])
            .args([
                "--events-poll",
                "100ms",
                "--events-channel-lease",
                "3s",
                "--webhook-timeout",
                "3s",
            ])
            .args(["--webhook-retry-schedule", "0s,100ms,200ms,500ms,1s,1s,1s,1s,1s,1s"])
            .env("ORDERFLOW_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        command
    }

    async fn start(&mut self) {
        let mut api = self.command();
        api.args(["serve", "--listen", &format!("127.0.0.1:{}", self.port)]);
        self.children.push(api.spawn().expect("start orderflow"));
        if self.extra_worker {
            let mut worker = self.command();
            worker.args(["serve", "--mode", "worker"]);
            self.children.push(worker.spawn().expect("start worker"));
        }
        let url = format!("http://127.0.0.1:{}/health/ready", self.port);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while reqwest::get(&url).await.map(|r| r.status() != 200).unwrap_or(true) {
            assert!(tokio::time::Instant::now() < deadline, "orderflow did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn kill9(&mut self) {
        for mut child in self.children.drain(..) {
            child.start_kill().expect("SIGKILL");
            child.wait().await.expect("reap");
        }
    }
}

async fn kill_nine_during_300_orders(backend: Backend) {
    let started = tokio::time::Instant::now();
    let db = TestDb::new(backend).await;
    let data = tempfile::tempdir().unwrap();

    // Events out: a private NATS server, a verifying webhook receiver, and one endpoint for every
    // event, created before any process starts (so every event is fanned out to it).
    let nats = NatsServer::start();
    let tap = WireTap::start(nats.port()).await;
    let receiver = WebhookReceiver::start().await;
    let secret = WebhookSecret::generate();
    receiver.set_secrets(&[secret.as_str()]).await;
    let store = orderflow::store::connect(db.url(), &common::connect_options())
        .await
        .expect("open the test database");
    let endpoint = store
        .events()
        .create_endpoint(
            &NewEndpoint {
                id: Uuid::now_v7(),
                url: receiver.url(),
                description: Some("crash test".into()),
                enabled_events: vec![TypePattern::parse("*").unwrap()],
                secret: secret.as_str().to_string(),
            },
            Utc::now(),
        )
        .await
        .expect("create the webhook endpoint");

    let mut cluster = Cluster {
        db_url: db.url().to_string(),
        data_dir: data.path().to_path_buf(),
        port: free_port(),
        children: Vec::new(),
        extra_worker: backend == Backend::Postgres,
        nats_url: nats.url(),
    };
    cluster.start().await;
    let base = format!("http://127.0.0.1:{}", cluster.port);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let auth = orderflow::http::Authenticator::hs256(&orderflow::http::Secret::new(SECRET.as_bytes().to_vec()));
    let admin = auth.issue("ops", &["admin".into()], Duration::from_secs(3600)).unwrap();

    let mut products = Vec::new();
    for n in 0..3 {
        let body: Value = http
            .post(format!("{base}/products"))
            .bearer_auth(&admin)
            .json(&json!({"name": format!("P{n}"), "price": 5, "stock_quantity": 100000}))
            .send_json()
            .await;
        products.push(body["product_id"].as_str().unwrap().to_string());
    }
    let mut buyers = Vec::new();
    for n in 0..10 {
        let body: Value = http
            .post(format!("{base}/customers"))
            .bearer_auth(&admin)
            .json(&json!({"email": format!("c{n}@example.com"), "first_name": "C", "last_name": "N"}))
            .send_json()
            .await;
        let id = body["customer_id"].as_str().unwrap().to_string();
        buyers.push(auth.issue(&id, &[], Duration::from_secs(3600)).unwrap());
    }

    // Clients: each order is retried with its own key until it gets a definitive answer, as a
    // real client would across the outages. They may not run more than SLACK orders ahead of the
    // next kill (`cap`), so orders are still being placed and processed when it comes.
    let answered = Arc::new(AtomicUsize::new(0));
    let cap = Arc::new(AtomicUsize::new(SLACK));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, &'static str)>();
    let next = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..12)
        .map(|_| {
            let (http, base, buyers, products, answered, tx, next, cap) = (
                http.clone(),
                base.clone(),
                buyers.clone(),
                products.clone(),
                answered.clone(),
                tx.clone(),
                next.clone(),
                cap.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let n = next.load(Ordering::SeqCst);
                    if n >= ORDERS {
                        return;
                    }
                    if n >= cap.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    if next.compare_exchange(n, n + 1, Ordering::SeqCst, Ordering::SeqCst).is_err() {
                        continue;
                    }
                    let token = TOKENS[n % TOKENS.len()];
                    let body = json!({"items": [{"product_id": products[n % 3], "quantity": 1 + n % 2}], "payment": {"token": token}});
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                    loop {
                        assert!(tokio::time::Instant::now() < deadline, "order {n} never got an answer");
                        let sent = http
                            .post(format!("{base}/orders"))
                            .bearer_auth(&buyers[n % buyers.len()])
                            .header("idempotency-key", format!("chaos-{n}"))
                            .json(&body)
                            .send()
                            .await;
                        match sent {
                            Ok(response) if response.status() == 202 => {
                                let order: Value = response.json().await.unwrap();
                                tx.send((order["order_id"].as_str().unwrap().to_string(), token)).unwrap();
                                answered.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                            // In flight elsewhere, or the restarting server sheds load: retry.
                            Ok(response) if response.status() == 409 || response.status() == 503 => {}
                            Ok(response) => panic!("order {n}: unexpected {}", response.status()),
                            Err(_) => {} // the server is down: retry
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        })
        .collect();
    drop(tx);

    // Chaos: kill everything three times while orders are being placed and processed and the
    // relay is publishing. A killed relay holds the NATS channel lease until it runs out (`--events-channel-lease`, 3 s here),
    // so before each kill wait until the running processes' relay has published to NATS (the
    // channel's cursor moved since they started): each kill then interrupts a live publisher.
    let mut kills = Vec::new();
    let mut nats_cursor_at_start = 0;
    for round in 1..=3 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let backlog = nats_backlog(store.as_ref()).await;
            if backlog.is_some_and(|b| b.published_through > nats_cursor_at_start) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: the relay did not publish to NATS within 90 s of starting: {backlog:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let resumed_after = started.elapsed();
        let target = round * ORDERS / 4;
        cap.store(target + SLACK, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while answered.load(Ordering::SeqCst) < target {
            assert!(tokio::time::Instant::now() < deadline, "orders stopped being accepted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let nats_before = nats_backlog(store.as_ref()).await.unwrap();
        let webhook_pending = endpoint_pending(store.as_ref(), endpoint.id).await;
        cluster.kill9().await;
        // Nobody runs now: the cursor is what the killed relay got acknowledged.
        let nats_after = nats_backlog(store.as_ref()).await.unwrap();
        nats_cursor_at_start = nats_after.published_through;
        kills.push(format!(
            "kill {round} at {:.1}s (NATS relay live since {:.1}s): {} orders answered, NATS cursor {} with {} \
             unpublished, {webhook_pending} webhook deliveries pending",
            started.elapsed().as_secs_f64(),
            resumed_after.as_secs_f64(),
            answered.load(Ordering::SeqCst),
            nats_after.published_through,
            nats_before.unpublished,
        ));
        cluster.start().await;
    }
    cap.store(ORDERS, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }
    let load_done = started.elapsed();
    let mut accepted = HashMap::new();
    while let Some((order, token)) = rx.recv().await {
        accepted.insert(order, token);
    }
    assert_eq!(accepted.len(), ORDERS, "every order was accepted exactly once");

    // Let the pipeline finish (a killed worker's jobs come back when their leases run out).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let queues: Value = http
            .get(format!("{base}/admin/queues"))
            .bearer_auth(&admin)
            .send_json()
            .await;
        let busy: i64 = queues["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["ready"].as_i64().unwrap() + q["running"].as_i64().unwrap())
            .sum();
        if busy == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pipeline did not finish: {queues}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pipeline_done = started.elapsed();

    let mut statuses: HashMap<String, String> = HashMap::new();
    for (order, token) in &accepted {
        let body: Value = http
            .get(format!("{base}/orders/{order}"))
            .bearer_auth(&admin)
            .send_json()
            .await;
        let status = body["status"].as_str().unwrap();
        statuses.insert(order.clone(), status.to_string());
        // Finished, or parked visibly: a kill can cost a step an attempt, so even a good card
        // may end dead-lettered, but never silently waiting.
        let parked = body["pending_steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|step| step["state"] == "dead");
        match *token {
            "tok_chargeDeclined" => assert_eq!(status, "cancelled", "{body}"),
            "tok_unavailable" => assert!(status == "pending_payment" && parked, "{body}"),
            _ => assert!(status == "fulfilled" || parked, "{token}: {body}"),
        }
        // Effects ran once per order even though jobs were re-run after kills.
        let mut seen: HashMap<String, usize> = HashMap::new();
        for event in body["timeline"].as_array().unwrap() {
            let kind = event["kind"].as_str().unwrap().to_string();
            let key = if kind == "notification_sent" {
                format!("{kind}:{}", event["detail"])
            } else {
                kind
            };
            *seen.entry(key).or_default() += 1;
        }
        assert!(
            seen.values().all(|count| *count == 1),
            "an effect was applied twice: {body}"
        );
        // Money follows the order: taken when it was fulfilled; held (authorized, captured when
        // it ships — `--capture on-shipment`) while it is paid, which a parked fulfilment leaves
        // it; not taken when it was cancelled.
        let payment_state = body["payment"]["state"].as_str().unwrap_or("none");
        match status {
            "fulfilled" => assert_eq!(payment_state, "captured", "{body}"),
            "paid" => assert!(matches!(payment_state, "authorized" | "captured"), "{body}"),
            _ => assert!(!matches!(payment_state, "captured" | "authorized"), "{body}"),
        }
    }

    // Events out: wait (polling, with a deadline) until the relay has stamped every event and NATS
    // and the endpoint have caught up. After the last kill the NATS channel waits for the killed
    // relay's lease (3 s here) to run out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (rows, unstamped) = event_rows(&db).await;
        let bounds = store.events().event_bounds().await.unwrap();
        let backlog = nats_backlog(store.as_ref()).await;
        let pending = endpoint_pending(store.as_ref(), endpoint.id).await;
        let caught_up = unstamped == 0
            && bounds.last == rows
            && backlog.is_some_and(|b| b.unpublished == 0 && b.published_through == rows)
            && pending == 0;
        if caught_up {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay did not catch up within 120 s: {rows} event rows ({unstamped} unstamped), {bounds:?}, \
             NATS {backlog:?}, {pending} webhook deliveries pending"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let events_done = started.elapsed();
    cluster.kill9().await;

    let audit = Command::new(BIN)
        .arg("--database-url")
        .arg(db.url())
        .arg("audit")
        .output()
        .await
        .unwrap();
    assert!(
        audit.status.success(),
        "audit after the chaos:\n{}",
        String::from_utf8_lossy(&audit.stdout)
    );

    // 1. The feed: every row positioned, positions exactly 1..=N, each order's events numbered
    // 1..=k in position order.
    let (rows, unstamped) = event_rows(&db).await;
    assert_eq!(unstamped, 0, "every event row has a position");
    let mut feed: Vec<StoredEvent> = Vec::new();
    loop {
        let page = store
            .events()
            .events_after(&EventQuery {
                after: feed.last().map_or(0, |e| e.position),
                limit: 1000,
                types: None,
            })
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        feed.extend(page);
    }
    assert_eq!(feed.len() as i64, rows, "the feed holds every event row");
    for (index, event) in feed.iter().enumerate() {
        assert_eq!(event.position, index as i64 + 1, "the feed has a gap before {event:?}");
    }
    let bounds = store.events().event_bounds().await.unwrap();
    assert_eq!((bounds.oldest, bounds.last), (Some(1), rows), "{bounds:?}");
    let mut by_order: BTreeMap<String, Vec<&StoredEvent>> = BTreeMap::new();
    for event in &feed {
        let order = event
            .order_id
            .unwrap_or_else(|| panic!("an event about no order: {event:?}"))
            .to_string();
        assert_eq!(event.subject, format!("orders/{order}"), "{event:?}");
        by_order.entry(order).or_default().push(event);
    }
    for (order, events) in &by_order {
        let sequences: Vec<i64> = events.iter().map(|e| e.sequence).collect();
        let expected: Vec<i64> = (1..=events.len() as i64).collect();
        assert_eq!(sequences, expected, "order {order}: sequences in position order");
    }

    // 2. Every accepted order has the events its outcome implies, and nothing else.
    let orders: HashSet<&String> = by_order.keys().collect();
    assert_eq!(
        orders,
        accepted.keys().collect(),
        "events are about exactly the accepted orders"
    );
    for (order, status) in &statuses {
        let events = &by_order[order];
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let expected = match status.as_str() {
            "fulfilled" => types == LIFECYCLE,
            "cancelled" => types == ["order.placed", "order.cancelled"],
            "pending_payment" => types == ["order.placed"],
            // Parked after payment (a kill cost a later step its attempts).
            "paid" => types == LIFECYCLE[..2] || types == LIFECYCLE[..3],
            _ => false,
        };
        assert!(expected, "order {order} ({status}) has events {types:?}");
        let last = events.last().unwrap();
        assert_eq!(
            last.data["order"]["status"].as_str(),
            Some(status.as_str()),
            "order {order}: its latest event shows its current status: {last:?}"
        );
        if status == "cancelled" {
            assert_eq!(last.data["reason"], "payment_declined", "{last:?}");
        }
    }

    // The CloudEvent every channel must carry for each event, byte for byte.
    let rendered: HashMap<String, (&StoredEvent, Vec<u8>)> = feed
        .iter()
        .map(|event| (event.id.to_string(), (event, event.to_json(EVENTS_SOURCE))))
        .collect();

    // 3. JetStream holds every event exactly once.
    let messages = stream_messages(&nats.url(), NATS_STREAM).await;
    let mut stored: HashMap<&str, usize> = HashMap::new();
    for message in &messages {
        *stored.entry(message.msg_id.as_str()).or_default() += 1;
        assert_eq!(
            message.body["id"].as_str(),
            Some(message.msg_id.as_str()),
            "{message:?}"
        );
        let (event, body) = rendered
            .get(&message.msg_id)
            .unwrap_or_else(|| panic!("a message for no event in the database: {message:?}"));
        assert_eq!(message.subject, format!("orderflow.events.{}", event.event_type));
        assert_eq!(
            message.body,
            serde_json::from_slice::<Value>(body).unwrap(),
            "the stream's body of {}",
            message.msg_id
        );
    }
    let twice: Vec<_> = stored.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "events stored twice in the stream: {twice:?}");
    let missing: Vec<&String> = rendered.keys().filter(|id| !stored.contains_key(id.as_str())).collect();
    assert!(missing.is_empty(), "events missing from the stream: {missing:?}");
    assert_eq!(messages.len(), feed.len());
    // Per order, the stream has the events in sequence order.
    let mut last_sequence: HashMap<String, i64> = HashMap::new();
    for message in &messages {
        let (event, _) = &rendered[&message.msg_id];
        let previous = last_sequence.insert(event.subject.clone(), event.sequence).unwrap_or(0);
        assert!(
            previous < event.sequence,
            "{} out of sequence order in the stream",
            event.subject
        );
    }
    let stream_in_position_order = messages
        .windows(2)
        .all(|pair| pair[0].body["position"].as_i64() < pair[1].body["position"].as_i64());
    // What the relay put on the wire, re-sends included (JetStream dropped the duplicates).
    let published = tap.wait_for_all(&rendered, Duration::from_secs(20)).await;
    let mut resent_nats = 0;
    for (id, bodies) in &published {
        resent_nats += bodies.len() - 1;
        let (_, body) = &rendered[id];
        assert!(
            bodies.iter().all(|sent| sent == body),
            "event {id} went to NATS with another body"
        );
    }

    // 4. The endpoint got every event at least once: verified, the event id as `webhook-id`, the
    // same bytes on every arrival; each order's events first arrived in sequence order.
    let arrivals = receiver.received().await;
    let mut arrived: HashMap<String, usize> = HashMap::new();
    let mut first_arrival_sequence: HashMap<String, i64> = HashMap::new();
    for arrival in &arrivals {
        assert!(arrival.verified, "a delivery did not verify: {arrival:#?}");
        assert_eq!(arrival.answered_status, 200, "{arrival:#?}");
        let id = arrival.webhook_id.clone().expect("a webhook-id header");
        assert_eq!(arrival.event_id(), Some(id.as_str()), "webhook-id is the event id");
        let (event, body) = rendered
            .get(&id)
            .unwrap_or_else(|| panic!("a delivery of no event in the database: {arrival:#?}"));
        assert_eq!(
            arrival.raw_body.as_bytes(),
            body.as_slice(),
            "event {id} arrived with another body"
        );
        let count = arrived.entry(id.clone()).or_default();
        *count += 1;
        if *count == 1 {
            let previous = first_arrival_sequence
                .insert(event.subject.clone(), event.sequence)
                .unwrap_or(0);
            assert_eq!(
                previous + 1,
                event.sequence,
                "{}: sequence {} arrived before sequence {}",
                event.subject,
                event.sequence,
                previous + 1
            );
        }
    }
    let missing: Vec<&String> = rendered.keys().filter(|id| !arrived.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "events never delivered to the endpoint: {missing:?}"
    );
    let health = store.events().endpoint_health(Utc::now()).await.unwrap();
    assert!(
        health.iter().all(|h| h.pending == 0 && h.failed == 0 && h.failing == 0),
        "{health:?}"
    );

    // 5. Summary.
    eprintln!(
        "{backend:?}: {} events for {} orders; NATS: {} stored, {} published ({resent_nats} re-sends dropped as \
         duplicates), stream in position order: {stream_in_position_order}; webhooks: {} arrivals ({} re-sent); \
         load done {:.1}s, pipeline {:.1}s, events caught up {:.1}s, total {:.1}s\n  {}",
        feed.len(),
        by_order.len(),
        messages.len(),
        published.values().map(Vec::len).sum::<usize>(),
        arrivals.len(),
        arrivals.len() - arrived.len(),
        load_done.as_secs_f64(),
        pipeline_done.as_secs_f64(),
        events_done.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        kills.join("\n  "),
    );
}

async fn nats_backlog(store: &dyn Store) -> Option<ChannelBacklog> {
    store
        .events()
        .channel_backlog(NATS_CHANNEL, Utc::now())
        .await
        .expect("NATS channel backlog")
}

/// Deliveries to the endpoint not yet made.
async fn endpoint_pending(store: &dyn Store, endpoint: Uuid) -> i64 {
    let health = store
        .events()
        .endpoint_health(Utc::now())
        .await
        .expect("endpoint health");
    health
        .iter()
        .find(|h| h.endpoint_id == endpoint)
        .expect("the endpoint exists")
        .pending
}

/// Every event row in the database, counted with plain SQL: (rows, rows without a position).
async fn event_rows(db: &TestDb) -> (i64, i64) {
    const SQL: &str = "SELECT count(*), CAST(coalesce(sum(CASE WHEN position IS NULL THEN 1 ELSE 0 END), 0) \
                       AS BIGINT) FROM events";
    match db {
        TestDb::Sqlite { url, .. } => {
            let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
            sqlx::query_as(SQL).fetch_one(&mut conn).await.unwrap()
        }
        TestDb::Postgres { url, .. } => {
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::query_as(SQL).fetch_one(&mut conn).await.unwrap()
        }
    }
}

/// A plain NATS subscriber on `orderflow.events.>`: sees every message the relay publishes,
/// including re-sends that JetStream then drops as duplicates. (Speaks the client protocol itself:
/// async-nats' subscriber is a `futures` stream, and `futures` is no dependency of this crate.)
struct WireTap {
    /// (Nats-Msg-Id, body) of each message, in arrival order.
    seen: Arc<Mutex<Vec<(String, Vec<u8>)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl WireTap {
    async fn start(port: u16) -> WireTap {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to NATS");
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        let mut line = String::new();
        read.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("INFO "), "NATS greeted with {line:?}");
        write
            .write_all(
                b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1,\
                  \"lang\":\"crash-test\",\"version\":\"1\"}\r\nSUB orderflow.events.> 1\r\nPING\r\n",
            )
            .await
            .unwrap();
        // The PONG comes after the SUB was processed: from here on nothing published is missed.
        loop {
            line.clear();
            assert!(read.read_line(&mut line).await.unwrap() > 0, "NATS closed the tap");
            assert!(!line.starts_with("-ERR"), "NATS refused the tap: {line}");
            if line == "PONG\r\n" {
                break;
            }
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            let mut line = String::new();
            loop {
                line.clear();
                if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.first().copied() {
                    Some("PING") => write.write_all(b"PONG\r\n").await.unwrap(),
                    // HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>
                    Some("HMSG") => {
                        let total: usize = words[words.len() - 1].parse().unwrap();
                        let headers: usize = words[words.len() - 2].parse().unwrap();
                        let mut message = vec![0; total + 2];
                        read.read_exact(&mut message).await.unwrap();
                        let msg_id = String::from_utf8_lossy(&message[..headers])
                            .split("\r\n")
                            .filter_map(|header| header.split_once(':'))
                            .find(|(name, _)| name.trim().eq_ignore_ascii_case("Nats-Msg-Id"))
                            .map(|(_, value)| value.trim().to_string())
                            .unwrap_or_default();
                        sink.lock().unwrap().push((msg_id, message[headers..total].to_vec()));
                    }
                    // MSG <subject> <sid> [reply-to] <#bytes>: no headers, so no id.
                    Some("MSG") => {
                        let total: usize = words[words.len() - 1].parse().unwrap();
                        let mut message = vec![0; total + 2];
                        read.read_exact(&mut message).await.unwrap();
                        sink.lock().unwrap().push((String::new(), message[..total].to_vec()));
                    }
                    Some("-ERR") => panic!("NATS: {line}"),
                    _ => {} // +OK, PONG, INFO
                }
            }
        });
        WireTap { seen, task }
    }

    /// Waits (with a deadline) until every event in `events` went by, then returns each event id's
    /// bodies in the order they went by. Panics on a message for no event or without an id.
    async fn wait_for_all<T>(&self, events: &HashMap<String, T>, deadline: Duration) -> HashMap<String, Vec<Vec<u8>>> {
        let give_up = tokio::time::Instant::now() + deadline;
        loop {
            let mut published: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
            for (id, body) in self.seen.lock().unwrap().iter() {
                assert!(
                    events.contains_key(id),
                    "published to NATS: a message for no event ({id:?})"
                );
                published.entry(id.clone()).or_default().push(body.clone());
            }
            if published.len() == events.len() {
                return published;
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "the NATS tap saw {} of {} events",
                published.len(),
                events.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for WireTap {
    fn drop(&mut self) {
        self.task.abort();
    }
}
