//! Alarms end to end: with the payment provider down, the oldest-job-age and dead-job alarms fire;
//! a real webhook receiver gets exactly one signed "firing" message per alarm even with two
//! evaluators (two "processes") sharing the database; after the provider is back and the dead
//! job is replayed, exactly one "resolved" message each. The alarm states also show in `/metrics`
//! and `/health/ready` (which stays 200). With `--fulfilment external`, a paid, ready-to-ship
//! order the warehouse has not shipped raises `orders_stuck_unfulfilled` past the limit, and its
//! shipments (fulfilling it) clear it.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::{Backend, TestApp};
use hmac::{Hmac, Mac};
use orderflow::monitoring::alarms::{self, AlarmSettings};
use orderflow::monitoring::webhook::{DELIVER_ALERT, WebhookSecret, WebhookStep};
use orderflow::queue::Runner;
use orderflow::store::jobs::ReplaySelector;
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::net::TcpListener;

on_every_backend!(
    provider_outage_fires_and_replay_resolves_each_alarm_once,
    error_rate_and_stuck_orders_are_read_from_the_database,
    refused_deliveries_are_retried_and_counted,
    external_fulfilment_waits_are_stuck_past_the_limit_until_shipped,
);

const SECRET: &str = "alert-signing-secret-0123456789";

/// What the receiver saw.
#[derive(Default)]
struct Inbox {
    messages: Vec<Value>,
    /// Requests whose signature did not verify (answered 401).
    forged: usize,
    /// Answer 503 to this many more well-signed requests (a receiver having a bad moment).
    refuse: usize,
    refused: usize,
}

/// A webhook receiver on a real socket that checks the HMAC like a customer's would.
async fn receiver(refuse_first: usize) -> (String, Arc<Mutex<Inbox>>) {
    let inbox = Arc::new(Mutex::new(Inbox {
        refuse: refuse_first,
        ..Inbox::default()
    }));
    async fn receive(State(inbox): State<Arc<Mutex<Inbox>>>, headers: HeaderMap, body: Bytes) -> StatusCode {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let timestamp = header("x-orderflow-timestamp");
        let signature = header("x-orderflow-signature");
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(&body);
        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        let fresh = timestamp
            .parse::<i64>()
            .is_ok_and(|t| (chrono::Utc::now().timestamp() - t).abs() < 300);
        let mut inbox = inbox.lock().unwrap();
        if signature != expected || !fresh || header("content-type") != "application/json" {
            inbox.forged += 1;
            return StatusCode::UNAUTHORIZED;
        }
        if inbox.refuse > 0 {
            inbox.refuse -= 1;
            inbox.refused += 1;
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        inbox
            .messages
            .push(serde_json::from_slice(&body).expect("alert body is JSON"));
        StatusCode::NO_CONTENT
    }
    let app = Router::new().route("/alerts", post(receive)).with_state(inbox.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/alerts", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, inbox)
}

/// `(alarm, step, status)` of every message received.
fn received(inbox: &Mutex<Inbox>) -> Vec<(String, Option<String>, String)> {
    let inbox = inbox.lock().unwrap();
    assert_eq!(inbox.forged, 0, "some alerts were not signed correctly");
    inbox
        .messages
        .iter()
        .map(|m| {
            (
                m["alarm"].as_str().unwrap().to_string(),
                m["step"].as_str().map(str::to_string),
                m["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn count(messages: &[(String, Option<String>, String)], alarm: &str, status: &str) -> usize {
    messages.iter().filter(|(a, _, s)| a == alarm && s == status).count()
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn place(app: &TestApp, buyer: &str, product: &str) {
    let response = app
        .place_order(
            buyer,
            &uuid::Uuid::now_v7().to_string(),
            &json!({"items": [{"product_id": product, "quantity": 1}], "payment": {"token": "tok_unavailable"}}),
        )
        .await;
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
}

async fn provider_outage_fires_and_replay_resolves_each_alarm_once(backend: Backend) {
    let (url, inbox) = receiver(0).await;
    let settings = AlarmSettings {
        interval: Duration::from_millis(25),
        oldest_job_age: Some(Duration::from_millis(300)),
        dead_jobs: Some(1),
        // Error rate and stuck orders are not what this test is about.
        error_rate: None,
        stuck_unpaid: Duration::from_secs(3600),
        stuck_unfulfilled: Duration::from_secs(3600),
        webhook_urls: vec![url],
        delivery_attempts: 5,
        ..AlarmSettings::default()
    };
    let app = TestApp::spawn_with(backend, |state| {
        state.monitoring.alarms = Arc::new(settings.clone());
    })
    .await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // Two evaluators, each with its own connection pool, as two processes would have.
    let other_process = app.db.connect().await;
    tokio::spawn(alarms::run(app.store.clone(), settings.clone(), stopped.clone()));
    tokio::spawn(alarms::run(other_process.clone(), settings.clone(), stopped.clone()));
    // The workers that deliver alerts (the saga's steps are run by the test, below).
    let mut deliveries = Runner::new(app.store.clone(), common::fast_queue_settings());
    let step = WebhookStep::new(
        app.store.clone(),
        WebhookSecret::new(SECRET),
        Duration::from_secs(5),
        Default::default(),
    )
    .unwrap();
    deliveries.register(DELIVER_ALERT, Arc::new(step));
    tokio::spawn(Arc::new(deliveries).run(stopped.clone()));

    let product = app.product("10.00", 50).await;
    let (_, buyer) = app.customer().await;
    // The provider is down: the first order's payment fails every attempt and is dead-lettered…
    place(&app, &buyer, &product).await;
    app.drain().await;
    // …and the second one's waits, growing old.
    place(&app, &buyer, &product).await;
    wait_for("both alarms to fire", async || {
        let messages = received(&inbox);
        count(&messages, "dead_jobs", "firing") >= 1 && count(&messages, "oldest_job_age", "firing") >= 1
    })
    .await;
    let messages = received(&inbox);
    assert!(
        messages.contains(&("oldest_job_age".into(), Some("charge_payment".into()), "firing".into())),
        "{messages:?}"
    );
    let firing = inbox.lock().unwrap().messages.clone();
    let dead = firing.iter().find(|m| m["alarm"] == "dead_jobs").unwrap();
    assert_eq!(dead["source"], "orderflow");
    assert_eq!(dead["detail"]["by_step"]["charge_payment"], 1);
    assert!(dead["id"].as_str().is_some() && dead["at"].as_str().is_some() && dead["summary"].as_str().is_some());

    // Visible in /metrics and /health/ready, which stays ready.
    let metrics = app.get("/metrics", None).await.text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("orderflow_alarm_firing{alarm=\"oldest_job_age\",step=\"charge_payment\"} 1")),
        "{metrics}"
    );
    let ready = app.get("/health/ready", None).await;
    assert_eq!(ready.status(), reqwest::StatusCode::OK);
    let ready: Value = ready.json().await.unwrap();
    let firing_now: Vec<&str> = ready["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["alarm"].as_str().unwrap())
        .collect();
    assert!(
        firing_now.contains(&"dead_jobs") && firing_now.contains(&"oldest_job_age"),
        "{ready}"
    );

    // The provider is back; the operator replays the dead job and the pipeline catches up.
    app.sandbox.set_outage(false);
    let replayed = app
        .store
        .replay_jobs(&ReplaySelector::AllDead { kind: None }, orderflow::clock::now())
        .await
        .unwrap();
    assert_eq!(replayed, 1);
    app.drain().await;
    wait_for("both alarms to resolve", async || {
        let messages = received(&inbox);
        count(&messages, "dead_jobs", "resolved") >= 1 && count(&messages, "oldest_job_age", "resolved") >= 1
    })
    .await;

    // Settled: more evaluations (from either "process") change nothing, and every delivery is done.
    for store in [&app.store, &other_process] {
        assert!(
            alarms::evaluate_once(store.as_ref(), &settings)
                .await
                .unwrap()
                .is_empty()
        );
    }
    wait_for("deliveries to finish", async || {
        !app.store.has_pending_work().await.unwrap()
    })
    .await;
    let messages = received(&inbox);
    for alarm in ["dead_jobs", "oldest_job_age"] {
        assert_eq!(count(&messages, alarm, "firing"), 1, "{alarm}: {messages:?}");
        assert_eq!(count(&messages, alarm, "resolved"), 1, "{alarm}: {messages:?}");
    }
    assert_eq!(messages.len(), 4, "only these alarms changed: {messages:?}");
    let ready: Value = app.get("/health/ready", None).await.json().await.unwrap();
    assert_eq!(ready["alarms"], json!([]));
    let _ = stop.send(true);
}

fn condition<'a>(conditions: &'a [alarms::Condition], alarm: &str) -> &'a alarms::Condition {
    conditions
        .iter()
        .find(|c| c.alarm == alarm)
        .unwrap_or_else(|| panic!("no {alarm} in {conditions:?}"))
}

/// The error-rate and stuck-order alarms, evaluated straight from the database.
async fn error_rate_and_stuck_orders_are_read_from_the_database(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let settings = AlarmSettings {
        oldest_job_age: None,
        dead_jobs: None,
        error_rate: Some(0.5),
        error_rate_window: Duration::from_secs(60),
        error_rate_min_jobs: 1,
        // Any unpaid order counts as stuck; no paid order stays unfulfilled for an hour here.
        stuck_unpaid: Duration::ZERO,
        stuck_unfulfilled: Duration::from_secs(3600),
        ..AlarmSettings::default()
    };
    let product = app.product("10.00", 50).await;
    let (_, buyer) = app.customer().await;
    place(&app, &buyer, &product).await;
    // One failed attempt: the only charge_payment job of the window is failing.
    assert_eq!(app.runner.run_batch("charge_payment", 1).await.unwrap(), 1);
    let now = orderflow::clock::now();
    let conditions = alarms::evaluate(app.store.as_ref(), &settings, now).await.unwrap();
    let rate = condition(&conditions, "step_error_rate:charge_payment");
    assert!(rate.firing, "{rate:?}");
    assert_eq!(rate.detail["failing"], 1);
    assert_eq!(rate.detail["succeeded"], 0);
    let unpaid = condition(&conditions, "orders_stuck_unpaid");
    assert!(unpaid.firing && unpaid.detail["orders"] == 1, "{unpaid:?}");
    assert!(!condition(&conditions, "orders_stuck_unfulfilled").firing);
    assert!(
        conditions
            .iter()
            .all(|c| !c.alarm.starts_with("oldest_job_age") && c.alarm != "dead_jobs")
    );
    // Below the minimum number of jobs the rate does not count.
    let strict = AlarmSettings {
        error_rate_min_jobs: 2,
        ..settings.clone()
    };
    let conditions = alarms::evaluate(app.store.as_ref(), &strict, now).await.unwrap();
    assert!(!condition(&conditions, "step_error_rate:charge_payment").firing);

    // The provider recovers: the job succeeds, the order is paid and fulfilled.
    app.sandbox.set_outage(false);
    app.drain().await;
    let conditions = alarms::evaluate(app.store.as_ref(), &settings, orderflow::clock::now())
        .await
        .unwrap();
    let rate = condition(&conditions, "step_error_rate:charge_payment");
    assert!(!rate.firing && rate.detail["succeeded"] == 1, "{rate:?}");
    assert!(!condition(&conditions, "orders_stuck_unpaid").firing);
}

/// A receiver that refuses twice gets the alert on the third try; the queue's retries do it.
async fn refused_deliveries_are_retried_and_counted(backend: Backend) {
    let (url, inbox) = receiver(2).await;
    let settings = AlarmSettings {
        oldest_job_age: None,
        error_rate: None,
        webhook_urls: vec![url],
        delivery_attempts: 5,
        ..AlarmSettings::default()
    };
    let app = TestApp::spawn(backend).await;
    let metrics = app.metrics.clone();
    let product = app.product("10.00", 50).await;
    let (_, buyer) = app.customer().await;
    place(&app, &buyer, &product).await;
    app.drain().await;
    let made = alarms::evaluate_once(app.store.as_ref(), &settings).await.unwrap();
    assert_eq!(made.iter().map(|c| c.alarm.as_str()).collect::<Vec<_>>(), ["dead_jobs"]);
    let mut deliveries = Runner::new(app.store.clone(), common::fast_queue_settings());
    deliveries.set_metrics(metrics.clone());
    let step = WebhookStep::new(
        app.store.clone(),
        WebhookSecret::new(SECRET),
        Duration::from_secs(5),
        metrics,
    )
    .unwrap();
    deliveries.register(DELIVER_ALERT, Arc::new(step));
    Arc::new(deliveries).drain(Duration::from_secs(20)).await.unwrap();
    assert_eq!(inbox.lock().unwrap().refused, 2);
    let messages = received(&inbox);
    assert_eq!(messages, [("dead_jobs".to_string(), None, "firing".to_string())]);
    let text = app.get("/metrics", None).await.text().await.unwrap();
    for line in [
        "orderflow_alert_deliveries_total{outcome=\"refused\"} 2",
        "orderflow_alert_deliveries_total{outcome=\"delivered\"} 1",
        "orderflow_step_failed_total{step=\"deliver_alert\"} 2",
        "orderflow_step_succeeded_total{step=\"deliver_alert\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
    }
}

/// `--fulfilment external`: a paid order whose stock is committed waits for the warehouse. Past
/// `--alarm-stuck-unfulfilled` without a shipment it is stuck; a partial shipment does not make it
/// fulfilled (still stuck once the limit passes again); the last shipment fulfils it and clears
/// the alarm, for any clock. The evaluation is read at chosen times (no sleeping past the limit),
/// then once through the recording evaluator, whose state `/health/ready` shows.
async fn external_fulfilment_waits_are_stuck_past_the_limit_until_shipped(backend: Backend) {
    use orderflow::workflow::steps::{FulfilmentMode, SagaSettings};
    let app = TestApp::spawn_with(backend, |state| {
        state.saga = Arc::new(SagaSettings {
            fulfilment: FulfilmentMode::External,
            ..SagaSettings::default()
        });
    })
    .await;
    let limit = Duration::from_secs(48 * 3600);
    let settings = AlarmSettings {
        oldest_job_age: None,
        dead_jobs: None,
        error_rate: None,
        stuck_unpaid: Duration::from_secs(3600),
        stuck_unfulfilled: limit,
        ..AlarmSettings::default()
    };
    let stuck = async |at: chrono::DateTime<chrono::Utc>| -> alarms::Condition {
        let conditions = alarms::evaluate(app.store.as_ref(), &settings, at).await.unwrap();
        let unpaid = condition(&conditions, "orders_stuck_unpaid");
        assert!(!unpaid.firing, "{unpaid:?}");
        condition(&conditions, "orders_stuck_unfulfilled").clone()
    };
    let just_past = |from: chrono::DateTime<chrono::Utc>| from + limit + Duration::from_secs(1);

    let (a, b) = (app.product("10.00", 10).await, app.product("5.00", 10).await);
    let (_, buyer) = app.customer().await;
    let placed = app
        .place_order(
            &buyer,
            "stuck-1",
            &json!({"items": [{"product_id": a, "quantity": 2}, {"product_id": b, "quantity": 1}]}),
        )
        .await;
    assert_eq!(placed.status(), reqwest::StatusCode::ACCEPTED);
    let id = placed.json::<Value>().await.unwrap()["order_id"]
        .as_str()
        .unwrap()
        .to_string();
    app.drain().await;
    let paid_at = orderflow::clock::now();
    let view: Value = app
        .get(&format!("/orders/{id}"), Some(&app.admin))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(view["status"], "paid", "{view}");
    assert_eq!(
        view["pending_steps"],
        json!([]),
        "ready to ship, nothing queued: {view}"
    );
    assert!(
        view["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "inventory_committed"),
        "{view}"
    );

    // Within the limit: not stuck. Past it with no shipment: stuck, naming one order.
    let within = stuck(paid_at).await;
    assert!(!within.firing && within.detail["orders"] == 0, "{within:?}");
    let past = stuck(just_past(paid_at)).await;
    assert!(past.firing, "{past:?}");
    assert_eq!(past.detail["orders"], 1, "{past:?}");
    assert_eq!(past.detail["limit_seconds"], limit.as_secs(), "{past:?}");

    // The recording evaluator agrees once the limit is zero (any paid order is past it), and
    // readiness shows the alarm.
    let now_limit = AlarmSettings {
        stuck_unfulfilled: Duration::ZERO,
        ..settings.clone()
    };
    let made = alarms::evaluate_once(app.store.as_ref(), &now_limit).await.unwrap();
    assert_eq!(
        made.iter().map(|c| (c.alarm.as_str(), c.firing)).collect::<Vec<_>>(),
        [("orders_stuck_unfulfilled", true)]
    );
    let ready: Value = app.get("/health/ready", None).await.json().await.unwrap();
    assert!(
        ready["alarms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["alarm"] == "orders_stuck_unfulfilled"),
        "{ready}"
    );

    // A first, partial shipment: captured, still paid, still unfulfilled — stuck again once the
    // limit passes.
    let warehouse = app
        .auth
        .issue("warehouse-1", &["fulfilment".into()], Duration::from_secs(3600))
        .unwrap();
    let ship = async |key: &str, body: Value| {
        let response = app
            .client
            .post(format!("{}/orders/{id}/shipments", app.url))
            .bearer_auth(&warehouse)
            .header("idempotency-key", key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::CREATED);
    };
    ship(
        "s-1",
        json!({"carrier": "DHL", "tracking_number": "JD1", "items": [{"product_id": a, "quantity": 2}]}),
    )
    .await;
    app.drain().await;
    let view: Value = app
        .get(&format!("/orders/{id}"), Some(&app.admin))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (view["status"].as_str(), view["payment"]["state"].as_str()),
        (Some("paid"), Some("captured"))
    );
    let shipped_at = orderflow::clock::now();
    let past = stuck(just_past(shipped_at)).await;
    assert!(
        past.firing && past.detail["orders"] == 1,
        "a partial shipment is not fulfilment: {past:?}"
    );

    // The rest ships: fulfilled, and the alarm clears at any time from now on.
    ship("s-2", json!({"carrier": "DHL", "tracking_number": "JD2"})).await;
    app.drain().await;
    let view: Value = app
        .get(&format!("/orders/{id}"), Some(&app.admin))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(view["status"], "fulfilled", "{view}");
    let cleared = stuck(just_past(orderflow::clock::now())).await;
    assert!(!cleared.firing && cleared.detail["orders"] == 0, "{cleared:?}");
    let made = alarms::evaluate_once(app.store.as_ref(), &now_limit).await.unwrap();
    assert_eq!(
        made.iter().map(|c| (c.alarm.as_str(), c.firing)).collect::<Vec<_>>(),
        [("orders_stuck_unfulfilled", false)]
    );
    let ready: Value = app.get("/health/ready", None).await.json().await.unwrap();
    assert_eq!(ready["alarms"], json!([]), "{ready}");
    app.assert_audit_clean().await;
}
