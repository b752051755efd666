//! `/metrics`: Prometheus text that parses, with exact values after a scripted scenario, the age
//! of the oldest ready job surviving retries, and access control when configured.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Backend, TestApp, TestDb};
use orderflow::monitoring::alarms::{AlarmSettings, evaluate_once};
use orderflow::monitoring::{MetricsAccess, ScrapeToken};
use reqwest::StatusCode;
use serde_json::{Value, json};

on_both_backends!(
    scenario_counts_are_exact,
    oldest_ready_age_is_kept_across_retries,
    restricted_metrics_need_admin_or_the_scrape_token,
    worker_process_serves_its_step_metrics_on_metrics_listen,
);

/// A parsed exposition: `(name, sorted labels) → value`, plus the declared types.
#[derive(Debug, Default)]
struct Exposition {
    samples: BTreeMap<(String, Vec<(String, String)>), f64>,
    types: BTreeMap<String, String>,
}

impl Exposition {
    /// Parses the text format strictly: every line is a comment, a `# HELP`/`# TYPE`, or a sample
    /// `name{label="value",…} number`; every sample's family has a declared type.
    fn parse(text: &str) -> Self {
        let mut out = Exposition::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "{line}"
                );
                out.types.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').expect("labels close"))),
                None => (series, Vec::new()),
            };
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad name in {line}"
            );
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix).filter(|f| out.types.contains_key(*f)))
                .unwrap_or(name);
            assert!(out.types.contains_key(family), "{name} has no # TYPE");
            out.samples.insert((name.to_string(), labels), value);
        }
        out
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut labels: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        labels.sort();
        self.samples.get(&(name.to_string(), labels)).copied()
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?}; have:\n{:#?}", self.names()))
    }

    fn names(&self) -> Vec<String> {
        self.samples
            .keys()
            .map(|(name, labels)| format!("{name}{labels:?}"))
            .collect()
    }
}

fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut chars = text.chars().peekable();
    while chars.peek().is_some() {
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert_eq!(chars.next(), Some('"'), "label {name} is not quoted");
        let mut value = String::new();
        loop {
            match chars.next().expect("label value closes") {
                '\\' => match chars.next().expect("escape") {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.push((name.trim_start_matches(',').to_string(), value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    labels.sort();
    labels
}

async fn scrape(app: &TestApp, token: Option<&str>) -> Exposition {
    let response = app.get("/metrics", token).await;
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    Exposition::parse(&response.text().await.unwrap())
}

async fn order(app: &TestApp, buyer: &str, product: &str, token: &str) -> String {
    let response = app
        .place_order(
            buyer,
            &uuid::Uuid::now_v7().to_string(),
            &json!({"items": [{"product_id": product, "quantity": 1}], "payment": {"token": token}}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    body["order_id"].as_str().unwrap().to_string()
}

/// 3 fulfilled, 1 declined, 1 dead (provider unavailable through every attempt).
async fn scenario_counts_are_exact(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let product = app.product("10.00", 50).await;
    let (_, buyer) = app.customer().await;
    for _ in 0..3 {
        order(&app, &buyer, &product, "tok_visa").await;
    }
    order(&app, &buyer, &product, "tok_chargeDeclined").await;
    order(&app, &buyer, &product, "tok_unavailable").await;
    app.drain().await;
    evaluate_once(app.store.as_ref(), &AlarmSettings::default())
        .await
        .unwrap();

    let m = scrape(&app, None).await;
    let step = |name: &str, kind: &str| m.value(name, &[("step", kind)]);
    assert_eq!(m.value("orderflow_orders_placed_total", &[]), 5.0);
    assert_eq!(m.value("orderflow_orders_fulfilled_total", &[]), 3.0);
    assert_eq!(
        m.value("orderflow_orders_cancelled_total", &[("reason", "payment_declined")]),
        1.0
    );
    // charge_payment: 3 approved + 1 declined commit; the unavailable one fails 3 times and dies.
    assert_eq!(step("orderflow_step_enqueued_total", "charge_payment"), 5.0);
    assert_eq!(step("orderflow_step_succeeded_total", "charge_payment"), 4.0);
    assert_eq!(step("orderflow_step_failed_total", "charge_payment"), 3.0);
    assert_eq!(step("orderflow_step_dead_total", "charge_payment"), 1.0);
    assert_eq!(step("orderflow_step_duration_seconds_count", "charge_payment"), 7.0);
    // Payment commits the stock in its own transaction: no commit_inventory step any more.
    assert_eq!(step("orderflow_step_enqueued_total", "commit_inventory"), 0.0);
    for kind in ["fulfil_order", "send_receipt", "send_confirmation"] {
        assert_eq!(step("orderflow_step_enqueued_total", kind), 3.0, "{kind}");
        assert_eq!(step("orderflow_step_succeeded_total", kind), 3.0, "{kind}");
        assert_eq!(step("orderflow_step_failed_total", kind), 0.0, "{kind}");
    }
    assert_eq!(step("orderflow_step_enqueued_total", "send_cancellation"), 1.0);
    assert_eq!(step("orderflow_step_succeeded_total", "send_cancellation"), 1.0);
    assert_eq!(step("orderflow_step_enqueued_total", "refund_payment"), 0.0);
    // Database gauges: the dead job is the only job left that is not finished.
    assert_eq!(step("orderflow_step_dead_jobs", "charge_payment"), 1.0);
    assert_eq!(step("orderflow_step_ready_jobs", "charge_payment"), 0.0);
    assert_eq!(step("orderflow_step_running_jobs", "charge_payment"), 0.0);
    assert_eq!(
        step("orderflow_step_oldest_ready_job_age_seconds", "charge_payment"),
        0.0
    );
    assert_eq!(step("orderflow_step_dead_jobs", "fulfil_order"), 0.0);
    // Payments.
    let payments = |operation, outcome| {
        m.value(
            "orderflow_payments_total",
            &[("operation", operation), ("outcome", outcome)],
        )
    };
    assert_eq!(payments("authorize", "succeeded"), 3.0);
    assert_eq!(payments("authorize", "declined"), 1.0);
    assert_eq!(payments("authorize", "unavailable"), 3.0);
    assert_eq!(payments("capture", "succeeded"), 3.0, "captured as each order shipped");
    assert_eq!(
        m.value(
            "orderflow_payment_provider_duration_seconds_count",
            &[("operation", "authorize")]
        ),
        7.0
    );
    // HTTP, by route template (never the raw path).
    let post_orders = [("method", "POST"), ("route", "/orders"), ("status", "202")];
    assert_eq!(m.value("orderflow_http_requests_total", &post_orders), 5.0);
    assert_eq!(
        m.value(
            "orderflow_http_request_duration_seconds_count",
            &[("method", "POST"), ("route", "/orders")]
        ),
        5.0
    );
    assert_eq!(
        m.types["orderflow_http_request_duration_seconds"], "histogram",
        "latencies are histograms"
    );
    assert!(m.samples.keys().all(|(name, labels)| {
        name != "orderflow_http_requests_total" || labels.iter().all(|(k, v)| k != "route" || !v.contains('-'))
    }));
    // Stuck orders (none past the default limits), pools, alarms.
    assert_eq!(m.value("orderflow_orders_stuck", &[("status", "unpaid")]), 0.0);
    assert_eq!(m.value("orderflow_orders_stuck", &[("status", "unfulfilled")]), 0.0);
    // SQLite writes through exactly one connection; PostgreSQL has one pool of the configured size.
    let (pool, max) = if backend == Backend::Sqlite {
        ("writer", 1.0)
    } else {
        ("main", 10.0)
    };
    assert_eq!(m.value("orderflow_db_pool_max_connections", &[("pool", pool)]), max);
    assert!(m.value("orderflow_db_pool_connections", &[("pool", pool), ("state", "idle")]) >= 0.0);
    // An alarm appears once it has fired; one that never did reads as absent (0).
    let firing = |alarm, step| {
        m.get("orderflow_alarm_firing", &[("alarm", alarm), ("step", step)])
            .or_else(|| m.get("orderflow_alarm_firing", &[("alarm", alarm)]))
    };
    assert_eq!(firing("dead_jobs", ""), Some(1.0));
    assert_eq!(firing("oldest_job_age", "charge_payment").unwrap_or(0.0), 0.0);

    // A second scrape counts the first one.
    let again = scrape(&app, None).await;
    assert_eq!(
        again.value(
            "orderflow_http_requests_total",
            &[("method", "GET"), ("route", "/metrics"), ("status", "200")]
        ),
        1.0
    );
}

/// The age of the oldest ready job is measured from when it became ready: failed attempts that
/// put it back for a retry do not reset it.
async fn oldest_ready_age_is_kept_across_retries(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let product = app.product("10.00", 50).await;
    let (_, buyer) = app.customer().await;
    let placed = Instant::now();
    order(&app, &buyer, &product, "tok_unavailable").await;
    let age = |m: &Exposition| {
        m.value(
            "orderflow_step_oldest_ready_job_age_seconds",
            &[("step", "charge_payment")],
        )
    };
    // Wait (on the condition, with a deadline) until the ready job is 0.3 s old.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(&app, None).await;
        let after = placed.elapsed().as_secs_f64();
        assert_eq!(m.value("orderflow_step_ready_jobs", &[("step", "charge_payment")]), 1.0);
        assert!(
            age(&m) <= after + 0.01,
            "age {} is more than the {after}s since checkout",
            age(&m)
        );
        if age(&m) >= 0.3 {
            break;
        }
        assert!(Instant::now() < deadline, "the age never reached 0.3s: {}", age(&m));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // One failed attempt puts it back, waiting for its retry: still ready, and just as old.
    assert_eq!(app.runner.run_batch("charge_payment", 1).await.unwrap(), 1);
    let m = scrape(&app, None).await;
    assert_eq!(
        m.value("orderflow_step_failed_total", &[("step", "charge_payment")]),
        1.0
    );
    assert_eq!(m.value("orderflow_step_ready_jobs", &[("step", "charge_payment")]), 1.0);
    assert!(age(&m) >= 0.3, "a retry reset the age to {}", age(&m));
    assert!(age(&m) <= placed.elapsed().as_secs_f64() + 0.01);
}

async fn restricted_metrics_need_admin_or_the_scrape_token(backend: Backend) {
    let app = TestApp::spawn_with(backend, |state| {
        state.monitoring.access = Arc::new(MetricsAccess::Restricted {
            scrape_token: Some(ScrapeToken("scrape-me-please".into())),
        });
    })
    .await;
    assert_eq!(app.get("/metrics", None).await.status(), StatusCode::UNAUTHORIZED);
    let customer = app.token(&uuid::Uuid::now_v7().to_string());
    assert_eq!(
        app.get("/metrics", Some(&customer)).await.status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        app.get("/metrics", Some("wrong-token")).await.status(),
        StatusCode::UNAUTHORIZED
    );
    scrape(&app, Some(&app.admin)).await;
    scrape(&app, Some("scrape-me-please")).await;
}

/// A `--mode worker` process serves no API, but with `--metrics-listen` its step counters can be
/// scraped; the order placed by another "process" (this test) shows up in them.
async fn worker_process_serves_its_step_metrics_on_metrics_listen(backend: Backend) {
    use orderflow::domain::{Cart, CartLine, PaymentToken, Quantity};
    use orderflow::workflow::checkout::{self, CheckoutRequest, CheckoutSettings};
    use tokio::io::AsyncBufReadExt;

    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let (product, customer) = common::seed_lamp_and_buyer(store.as_ref(), "worker@example.com").await;
    let data = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .arg("--data-dir")
        .arg(data.path())
        .args(["--jwt-secret", "metrics-test-secret-metrics-test-secret"])
        .args([
            "--database-url",
            db.url(),
            "--mode",
            "worker",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--job-poll", "50ms", "--no-seed"])
        .env("ORDERFLOW_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start orderflow");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.strip_prefix("metrics at ") {
                return rest.trim().to_string();
            }
        }
        panic!("orderflow exited before listening")
    })
    .await
    .expect("the metrics listener did not start");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let client = reqwest::Client::new();
    let scrape = async || {
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        Exposition::parse(&response.text().await.unwrap())
    };
    // Registered at 0 before anything ran, so rates work from the first scrape.
    let first = scrape().await;
    assert_eq!(
        first.value("orderflow_step_succeeded_total", &[("step", "fulfil_order")]),
        0.0
    );
    let api = client.get(url.replace("/metrics", "/orders")).send().await.unwrap();
    assert_eq!(api.status(), StatusCode::NOT_FOUND, "only /metrics is served there");

    let request = CheckoutRequest {
        principal: customer.to_string(),
        idempotency_key: "worker-metrics".into(),
        customer_id: customer,
        cart: Cart::new(vec![CartLine {
            product_id: product,
            quantity: Quantity::parse(1).unwrap(),
        }])
        .unwrap(),
        payment_token: PaymentToken::parse("tok_visa").unwrap(),
        shipping: None,
        correlation_id: None,
    };
    checkout::place_order(store.clone(), &CheckoutSettings::default(), request)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = scrape().await;
        if m.value("orderflow_step_succeeded_total", &[("step", "send_confirmation")]) == 1.0 {
            assert_eq!(m.value("orderflow_orders_fulfilled_total", &[]), 1.0);
            assert_eq!(
                m.value("orderflow_step_succeeded_total", &[("step", "charge_payment")]),
                1.0
            );
            break;
        }
        assert!(Instant::now() < deadline, "the worker never fulfilled the order");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}
