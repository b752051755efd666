//! One order's story, found by one id: the real `orderflow` binary with JSON logs, the HTTP
//! payment adapter against `orderflow sandbox-provider` (another process), the file notifier,
//! and a test OTLP collector (a real HTTP server here) receiving the traces.
//!
//! An order placed with a given `X-Correlation-Id` must leave that id on the request's log lines,
//! on every step's lines (with `order_id`, `job_id`, `step`, `attempt`, `region`), on the call the
//! provider received, and in every e-mail's headers; its spans must reach the collector in one
//! trace, each carrying the id. No line may hold the provider key, the JWT secret, a bearer token
//! or the payment token.

mod common;

use common::SendJson;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Backend, TestDb};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");
const SECRET: &str = "observability-secret-observability-secret";
const PROVIDER_KEY: &str = "sk_test_observability_provider_key";
const REGION: &str = "test-region-1";
const STEPS: [&str; 4] = ["charge_payment", "send_receipt", "fulfil_order", "send_confirmation"];

/// Lines a child process wrote, collected as they come.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn collect(&self, stream: impl AsyncRead + Unpin + Send + 'static) {
        let lines = self.0.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                lines.lock().unwrap().push(line);
            }
        });
    }

    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// The lines that are JSON objects.
    fn json(&self) -> Vec<Value> {
        self.all()
            .iter()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(Value::is_object)
            .collect()
    }
}

/// A child process, its stderr (the logs) and stdout collected, and the URL it announced.
struct Process {
    _child: Child,
    url: String,
    logs: Lines,
    stdout: Lines,
}

async fn start(mut command: Command, announcement: &str) -> Process {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start orderflow");
    let (logs, stdout) = (Lines::default(), Lines::default());
    logs.collect(child.stderr.take().unwrap());
    stdout.collect(child.stdout.take().unwrap());
    let url = wait_for("the announcement on stdout", Duration::from_secs(30), || {
        stdout.all().iter().find_map(|line| {
            line.strip_prefix(announcement)
                .map(|rest| rest.split_whitespace().next().unwrap().to_string())
        })
    })
    .await;
    Process {
        _child: child,
        url,
        logs,
        stdout,
    }
}

/// Polls `check` until it answers, panicking after `deadline`.
async fn wait_for<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(tokio::time::Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A test OTLP/HTTP collector: keeps the spans POSTed to `/v1/traces` (JSON encoding).
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[derive(Clone, Debug)]
struct Span {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    attributes: BTreeMap<String, Value>,
    service: Option<String>,
}

impl Span {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).and_then(Value::as_str)
    }
}

/// An OTLP `AnyValue` as plain JSON.
fn any_value(value: &Value) -> Value {
    if let Some(text) = value.get("stringValue") {
        return text.clone();
    }
    for key in ["intValue", "doubleValue", "boolValue"] {
        if let Some(v) = value.get(key) {
            return v.clone();
        }
    }
    value.clone()
}

fn attributes(list: &Value) -> BTreeMap<String, Value> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|kv| Some((kv["key"].as_str()?.to_string(), any_value(&kv["value"]))))
        .collect()
}

impl Collector {
    async fn start() -> (Self, String) {
        let collector = Collector::default();
        let state = collector.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    let export: Value = serde_json::from_slice(&body).expect("OTLP JSON");
                    state.receive(&export);
                    axum::Json(json!({}))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (collector, url)
    }

    fn receive(&self, export: &Value) {
        let mut spans = self.spans.lock().unwrap();
        for resource in export["resourceSpans"].as_array().into_iter().flatten() {
            let service = attributes(&resource["resource"]["attributes"])
                .get("service.name")
                .and_then(Value::as_str)
                .map(str::to_string);
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                for span in scope["spans"].as_array().into_iter().flatten() {
                    spans.push(Span {
                        trace_id: span["traceId"].as_str().unwrap_or_default().to_lowercase(),
                        span_id: span["spanId"].as_str().unwrap_or_default().to_lowercase(),
                        parent_span_id: span["parentSpanId"].as_str().unwrap_or_default().to_lowercase(),
                        name: span["name"].as_str().unwrap_or_default().to_string(),
                        attributes: attributes(&span["attributes"]),
                        service: service.clone(),
                    });
                }
            }
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

fn orderflow(db: &TestDb) -> Command {
    let mut command = Command::new(BIN);
    command
        .arg("--database-url")
        .arg(db.url())
        .arg("--jwt-secret")
        .arg(SECRET)
        .args(["--log-format", "json"])
        .env_remove("ORDERFLOW_LOG")
        .env_remove("RUST_LOG")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    command
}

async fn token(db: &TestDb, args: &[&str]) -> String {
    let output = orderflow(db).arg("token").args(args).output().await.unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

fn text(line: &Value, key: &str) -> Option<String> {
    line.get(key).and_then(|v| match v {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    })
}

fn read_mail(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name)).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_correlation_id_finds_the_whole_story_of_an_order() {
    let shop = TestDb::new(Backend::Sqlite).await;
    let provider_db = TestDb::new(Backend::Sqlite).await;
    let mail = tempfile::tempdir().unwrap();
    let (collector, collector_url) = Collector::start().await;

    let mut command = orderflow(&provider_db);
    command.args([
        "sandbox-provider",
        "--provider-listen",
        "127.0.0.1:0",
        "--api-key",
        PROVIDER_KEY,
    ]);
    let provider = start(command, "sandbox payment provider listening on ").await;

    let mut command = orderflow(&shop);
    command
        .args(["--region", REGION, "--otlp-endpoint", &collector_url])
        .args(["serve", "--listen", "127.0.0.1:0", "--job-backoff", "50ms"])
        .args(["--payment-provider", "stripe", "--stripe-api-base", &provider.url])
        .args(["--stripe-secret-key", PROVIDER_KEY, "--notifier", "file", "--mail-dir"])
        .arg(mail.path())
        // Export spans every 100 ms instead of every 5 s.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    let server = start(command, "orderflow listening on ").await;

    let http = reqwest::Client::new();
    let admin = token(&shop, &["--sub", "ops", "--role", "admin"]).await;
    let catalog: Value = http.get(format!("{}/products", server.url)).send_json().await;
    let product = catalog["data"][0]["product_id"].as_str().unwrap().to_string();
    let customer: Value = http
        .post(format!("{}/customers", server.url))
        .bearer_auth(&admin)
        .json(&json!({"email": "story@example.com", "first_name": "Story", "last_name": "Teller"}))
        .send_json()
        .await;
    let buyer = token(&shop, &["--sub", customer["customer_id"].as_str().unwrap()]).await;

    // The order, placed with our id.
    let correlation_id = format!("obs-{}", uuid::Uuid::now_v7().simple());
    let response = http
        .post(format!("{}/orders", server.url))
        .bearer_auth(&buyer)
        .header("x-correlation-id", &correlation_id)
        .header("idempotency-key", "observability-1")
        .json(&json!({"items": [{"product_id": product, "quantity": 1}], "payment": {"token": "tok_visa"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(response.headers()["x-correlation-id"], correlation_id.as_str());
    let order: Value = response.json().await.unwrap();
    let order_id = order["order_id"].as_str().unwrap().to_string();

    // Its pipeline runs to the end: fulfilled and both e-mails written.
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let order: Value = http
            .get(format!("{}/orders/{order_id}", server.url))
            .bearer_auth(&buyer)
            .header("prefer", "wait=2")
            .send_json()
            .await;
        if order["status"] == "fulfilled" {
            break;
        }
        assert!(tokio::time::Instant::now() < until, "not fulfilled: {order}");
    }
    let receipt = format!("receipt.{order_id}.eml");
    let confirmation = format!("confirmation.{order_id}.eml");
    let mails = wait_for("both e-mails", Duration::from_secs(30), || {
        Some((
            read_mail(mail.path(), &receipt)?,
            read_mail(mail.path(), &confirmation)?,
        ))
    })
    .await;
    // Every step has logged its end.
    wait_for("every step's last line", Duration::from_secs(30), || {
        let lines = server.logs.json();
        STEPS
            .iter()
            .all(|step| {
                lines.iter().any(|l| {
                    text(l, "step").as_deref() == Some(step) && text(l, "message").as_deref() == Some("step succeeded")
                })
            })
            .then_some(())
    })
    .await;

    let lines = server.logs.json();
    let ours: Vec<&Value> = lines
        .iter()
        .filter(|l| text(l, "correlation_id").as_deref() == Some(correlation_id.as_str()))
        .collect();

    // The request: its lines carry the id, the route template and the status.
    let finished = ours
        .iter()
        .find(|l| {
            text(l, "message").as_deref() == Some("request finished") && text(l, "method").as_deref() == Some("POST")
        })
        .unwrap_or_else(|| panic!("no request line with the id in {lines:#?}"));
    assert_eq!(text(finished, "route").as_deref(), Some("/orders"), "{finished}");
    assert_eq!(text(finished, "status").as_deref(), Some("202"), "{finished}");
    assert_eq!(text(finished, "region").as_deref(), Some(REGION), "{finished}");
    let trace_id = text(finished, "trace_id").expect("a traced request's lines name the trace");
    assert_eq!(trace_id.len(), 32, "{finished}");

    // Each step: the id, the order, the job, the step, the attempt and the region on its lines.
    let mut job_ids = HashMap::new();
    for step in STEPS {
        let line = ours
            .iter()
            .find(|l| text(l, "step").as_deref() == Some(step))
            .unwrap_or_else(|| panic!("no {step} line with the correlation id in {lines:#?}"));
        assert_eq!(text(line, "order_id").as_deref(), Some(order_id.as_str()), "{line}");
        assert_eq!(text(line, "attempt").as_deref(), Some("1"), "{line}");
        assert_eq!(text(line, "region").as_deref(), Some(REGION), "{line}");
        assert_eq!(text(line, "trace_id").as_deref(), Some(trace_id.as_str()), "{line}");
        let job_id = text(line, "job_id").unwrap_or_else(|| panic!("no job_id: {line}"));
        job_ids.insert(step, job_id);
    }
    assert_eq!(
        job_ids.values().collect::<std::collections::HashSet<_>>().len(),
        STEPS.len()
    );
    // Every line about this order, whatever logged it, carries the id.
    for line in &lines {
        if text(line, "order_id").as_deref() == Some(order_id.as_str()) {
            assert_eq!(
                text(line, "correlation_id").as_deref(),
                Some(correlation_id.as_str()),
                "{line}"
            );
        }
    }

    // The provider received the id (and the trace context) on the authorize call.
    let provider_lines = provider.logs.json();
    let charge = provider_lines
        .iter()
        .find(|l| text(l, "message").as_deref() == Some("sandbox payment_intent create"))
        .unwrap_or_else(|| panic!("the provider logged no charge: {provider_lines:#?}"));
    assert_eq!(
        text(charge, "correlation_id").as_deref(),
        Some(correlation_id.as_str()),
        "{charge}"
    );
    assert_eq!(text(charge, "order_id").as_deref(), Some(order_id.as_str()), "{charge}");
    let traceparent = text(charge, "traceparent").expect("the provider call carries traceparent");
    assert!(
        traceparent.starts_with(&format!("00-{trace_id}-")),
        "{traceparent} vs {trace_id}"
    );

    // Both e-mails carry the id in their headers.
    for mail in [&mails.0, &mails.1] {
        let headers = mail.split("\r\n\r\n").next().unwrap();
        assert!(
            headers
                .lines()
                .any(|h| h == format!("X-Correlation-Id: {correlation_id}")),
            "{headers}"
        );
    }

    // No secret, token or payment credential in any line either process wrote.
    let everything: Vec<String> = [
        server.logs.all(),
        server.stdout.all(),
        provider.logs.all(),
        provider.stdout.all(),
    ]
    .concat();
    for secret in [PROVIDER_KEY, SECRET, admin.as_str(), buyer.as_str(), "tok_visa"] {
        for line in &everything {
            assert!(!line.contains(secret), "a log line holds a secret: {line}");
        }
    }

    // The traces: the request and every step reach the collector in the one trace, each span
    // carrying the correlation id; the checkout and step transactions are spans in it too.
    let spans = wait_for("the order's spans at the collector", Duration::from_secs(30), || {
        let spans = collector.spans();
        let names: Vec<String> = spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .map(|s| s.name.clone())
            .collect();
        let complete = names.iter().any(|n| n == "POST /orders")
            && STEPS
                .iter()
                .all(|step| names.iter().any(|n| *n == format!("step {step}")))
            && names.iter().any(|n| n == "store.place_order")
            && names.iter().filter(|n| *n == "store.complete_job").count() >= STEPS.len()
            && names.iter().any(|n| n == "POST /v1/payment_intents");
        complete.then_some(spans)
    })
    .await;
    let trace: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let by_id: HashMap<&str, &Span> = trace.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    let request = trace.iter().find(|s| s.name == "POST /orders").unwrap();
    assert_eq!(request.attribute("correlation_id"), Some(correlation_id.as_str()));
    assert_eq!(request.attribute("http.route"), Some("/orders"));
    // OTLP/JSON writes 64-bit integers as strings.
    assert_eq!(
        request
            .attributes
            .get("status")
            .map(|v| v.to_string().trim_matches('"').to_string()),
        Some("202".to_string()),
        "{request:?}"
    );
    assert_eq!(request.service.as_deref(), Some("orderflow"));
    for step in STEPS {
        let span = trace.iter().find(|s| s.name == format!("step {step}")).unwrap();
        assert_eq!(
            span.attribute("correlation_id"),
            Some(correlation_id.as_str()),
            "{span:?}"
        );
        assert_eq!(span.attribute("order_id"), Some(order_id.as_str()), "{span:?}");
        assert_eq!(span.attribute("job_id"), Some(job_ids[step].as_str()), "{span:?}");
        // Each step descends from the request through the spans that enqueued it.
        let mut current = *span;
        let mut hops = 0;
        while current.span_id != request.span_id {
            current = by_id
                .get(current.parent_span_id.as_str())
                .unwrap_or_else(|| panic!("{step}: broken parent chain at {current:?}"));
            hops += 1;
            assert!(hops < 20, "{step}: parent cycle");
        }
    }
}

/// A caller's W3C `traceparent` is continued, and its trace id becomes the correlation id when no
/// `X-Correlation-Id` is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn traceparent_is_continued_and_names_the_correlation_id() {
    let shop = TestDb::new(Backend::Sqlite).await;
    let (collector, collector_url) = Collector::start().await;
    let mut command = orderflow(&shop);
    command
        .args(["--otlp-endpoint", &collector_url, "serve", "--listen", "127.0.0.1:0"])
        .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    let server = start(command, "orderflow listening on ").await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let response = reqwest::Client::new()
        .get(format!("{}/products", server.url))
        .header("traceparent", format!("00-{trace_id}-{parent}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-correlation-id"], trace_id);

    let span = wait_for("the request's span", Duration::from_secs(30), || {
        collector.spans().into_iter().find(|s| s.trace_id == trace_id)
    })
    .await;
    assert_eq!(span.name, "GET /products");
    assert_eq!(span.parent_span_id, parent);
    assert_eq!(span.attribute("correlation_id"), Some(trace_id));
    wait_for("the request's log line", Duration::from_secs(10), || {
        server
            .logs
            .json()
            .into_iter()
            .find(|l| text(l, "message").as_deref() == Some("request finished"))
            .filter(|l| text(l, "correlation_id").as_deref() == Some(trace_id))
            .filter(|l| text(l, "trace_id").as_deref() == Some(trace_id))
    })
    .await;
}

/// Without an endpoint nothing is traced: the lines name no trace (and without `--region`, no
/// region), while the correlation id is there as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_an_endpoint_there_is_no_tracing() {
    let shop = TestDb::new(Backend::Sqlite).await;
    let mut command = orderflow(&shop);
    command.args(["serve", "--listen", "127.0.0.1:0"]);
    let server = start(command, "orderflow listening on ").await;
    let response = reqwest::Client::new()
        .get(format!("{}/products", server.url))
        .header("x-correlation-id", "no-trace-1")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-correlation-id"], "no-trace-1");
    let line = wait_for("the request's log line", Duration::from_secs(10), || {
        server
            .logs
            .json()
            .into_iter()
            .find(|l| text(l, "correlation_id").as_deref() == Some("no-trace-1"))
    })
    .await;
    assert_eq!(line.get("trace_id"), None, "{line}");
    assert_eq!(line.get("region"), None, "{line}");
}
