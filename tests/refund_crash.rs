//! kill -9 inside a refund step: exactly one refund at the provider.
//!
//! The real binary, as operators run it, on SQLite and PostgreSQL: an API process (`--mode api`)
//! and a worker (`--mode worker`) share the shop's database; the worker pays through the Stripe
//! client (`--payment-provider stripe`) at a small HTTP proxy in this test, which forwards to a
//! real `orderflow sandbox-provider` process (the sandbox in Stripe's protocol, which — unlike
//! localstripe — honours idempotency keys). An order is placed, paid and fulfilled (auto
//! fulfilment) through the API, then an admin asks for a partial refund. When the proxy sees the
//! provider's answer to the worker's `POST /v1/refunds` it SIGKILLs the worker *before* relaying
//! it: the provider has refunded, the shop's database has not recorded it (the refund is still
//! `pending`, its `settle_refund` job still leased by the dead worker). A new worker takes the job
//! over once the lease runs out and asks again with the same idempotency key; the provider answers
//! the first refund. Afterwards the provider's books hold exactly ONE refund of that amount, the
//! order view shows it `succeeded` with the provider's refund id and the payment's refunded amount
//! equal to it, and `orderflow audit` (with the provider's books) is clean.

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use common::{Backend, SendJson, TestDb};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");
const JWT_SECRET: &str = "refund-crash-secret-refund-crash-secret";
/// The provider's API key (`--api-key` of the sandbox provider, `--stripe-secret-key` of the shop).
const API_KEY: &str = "sk_test_orderflow_refund_crash";
/// How long a claimed job stays leased without a heartbeat: the dead worker's refund job is taken
/// over after this.
const JOB_LEASE: &str = "1s";
/// The deadline of every wait on the processes.
const PATIENCE: Duration = Duration::from_secs(60);

on_every_backend!(kill_nine_during_refund_refunds_exactly_once);

/// One `POST /v1/refunds` the proxy forwarded.
#[derive(Clone, Debug)]
struct RefundCall {
    idempotency_key: Option<String>,
    status: u16,
    answer: Value,
    /// The worker was killed with this answer in hand, before it was relayed.
    killed_before_relay: bool,
}

/// A forwarding proxy between the shop's worker and the provider. Armed, it SIGKILLs `victim` at
/// the provider's first answer to `POST /v1/refunds`, before relaying it.
struct Proxy {
    upstream: String,
    http: reqwest::Client,
    armed: AtomicBool,
    victim: tokio::sync::Mutex<Option<Child>>,
    killed: tokio::sync::Notify,
    refunds: std::sync::Mutex<Vec<RefundCall>>,
}

impl Proxy {
    async fn start(upstream: String) -> (String, Arc<Proxy>) {
        let proxy = Arc::new(Proxy {
            upstream,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            armed: AtomicBool::new(false),
            victim: tokio::sync::Mutex::new(None),
            killed: tokio::sync::Notify::new(),
            refunds: std::sync::Mutex::new(Vec::new()),
        });
        let app = Router::new().fallback(forward).with_state(proxy.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, proxy)
    }

    fn refunds(&self) -> Vec<RefundCall> {
        self.refunds.lock().unwrap().clone()
    }
}

async fn forward(
    State(proxy): State<Arc<Proxy>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // On a task of its own: once the worker is killed its connection closes, and the server drops
    // this handler's future — the kill must still be waited for and recorded.
    tokio::spawn(relay(proxy, method, uri, headers, body))
        .await
        .unwrap_or_else(|error| (StatusCode::BAD_GATEWAY, error.to_string()).into_response())
}

async fn relay(proxy: Arc<Proxy>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut request = proxy.http.request(method.clone(), format!("{}{path}", proxy.upstream));
    for (name, value) in &headers {
        if name != header::HOST && name != header::CONTENT_LENGTH {
            request = request.header(name, value);
        }
    }
    let answer = match request.body(body).send().await {
        Ok(answer) => answer,
        Err(error) => return (StatusCode::BAD_GATEWAY, error.to_string()).into_response(),
    };
    let status = answer.status();
    let answer_headers = answer.headers().clone();
    let answer_body = answer.bytes().await.unwrap_or_default();
    if method == Method::POST && uri.path() == "/v1/refunds" {
        // The provider has answered; the worker has not heard it yet.
        let mut killed = false;
        if proxy.armed.swap(false, Ordering::SeqCst)
            && let Some(mut worker) = proxy.victim.lock().await.take()
        {
            worker.start_kill().expect("SIGKILL the worker");
            worker.wait().await.expect("reap the worker");
            killed = true;
        }
        proxy.refunds.lock().unwrap().push(RefundCall {
            idempotency_key: headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            status: status.as_u16(),
            answer: serde_json::from_slice(&answer_body).unwrap_or(Value::Null),
            killed_before_relay: killed,
        });
        if killed {
            proxy.killed.notify_one();
            // Nobody is listening any more.
            return StatusCode::BAD_GATEWAY.into_response();
        }
    }
    let mut response = (status, answer_body).into_response();
    for (name, value) in &answer_headers {
        if name != header::TRANSFER_ENCODING && name != header::CONTENT_LENGTH && name != header::CONNECTION {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}

/// Reads a child's stdout until a line starts with `prefix` (within the deadline), then keeps
/// draining it so the child never blocks on a full pipe. Returns that line.
async fn wait_for_line(child: &mut Child, prefix: &str) -> String {
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let line = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if line.starts_with(prefix) {
                return line;
            }
        }
        panic!("the process exited before printing {prefix:?}")
    })
    .await
    .unwrap_or_else(|_| panic!("no {prefix:?} within {PATIENCE:?}"));
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    line
}

/// The URL in a "… listening on http://…" line.
fn listening_url(line: &str) -> String {
    line.split_whitespace()
        .find(|word| word.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_string()
}

/// The shop's processes: the same database, secret and data directory.
struct Shop<'a> {
    db: &'a TestDb,
    data_dir: &'a std::path::Path,
    proxy_url: String,
}

impl Shop<'_> {
    fn command(&self) -> Command {
        let mut command = Command::new(BIN);
        command
            .envs(common::profile_env(self.db.url()))
            .arg("--database-url")
            .arg(self.db.url())
            .arg("--data-dir")
            .arg(self.data_dir)
            .args(["--jwt-secret", JWT_SECRET])
            .env("ORDERFLOW_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        command
    }

    async fn api(&self) -> (Child, String) {
        let mut command = self.command();
        command.args(["serve", "--mode", "api", "--listen", "127.0.0.1:0", "--no-seed"]);
        command.args(["--rate-limit-writes", "off", "--rate-limit-reads", "off"]);
        let mut child = command.spawn().expect("start the API");
        let line = wait_for_line(&mut child, "orderflow listening on ").await;
        (child, listening_url(&line))
    }

    async fn worker(&self) -> Child {
        let mut command = self.command();
        command.args([
            "serve",
            "--mode",
            "worker",
            "--fulfilment",
            "auto",
            "--capture",
            "on-shipment",
        ]);
        command.args([
            "--job-lease",
            JOB_LEASE,
            "--job-backoff",
            "50ms",
            "--job-backoff-max",
            "200ms",
        ]);
        command.args(["--job-poll", "100ms"]);
        command.args([
            "--payment-provider",
            "stripe",
            "--stripe-api-base",
            &self.proxy_url,
            "--stripe-secret-key",
            API_KEY,
            "--payment-timeout",
            "5s",
        ]);
        let mut child = command.spawn().expect("start a worker");
        wait_for_line(&mut child, "orderflow worker running").await;
        child
    }
}

async fn order_view(http: &reqwest::Client, api: &str, admin: &str, id: &str) -> Value {
    http.get(format!("{api}/orders/{id}"))
        .bearer_auth(admin)
        .send_json()
        .await
}

/// Polls the order view until `done` holds (with the deadline); returns that view.
async fn wait_for_order(
    http: &reqwest::Client,
    api: &str,
    admin: &str,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let view = order_view(http, api, admin, id).await;
        if done(&view) {
            return view;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {PATIENCE:?}: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn kill_nine_during_refund_refunds_exactly_once(backend: Backend) {
    let started = std::time::Instant::now();
    let (db, provider_db) = tokio::join!(TestDb::new(backend), TestDb::new(backend));
    let data = tempfile::tempdir().unwrap();

    // The provider: `orderflow sandbox-provider` over its own database.
    let mut provider = Command::new(BIN)
        .envs(common::profile_env(provider_db.url()))
        .arg("--database-url")
        .arg(provider_db.url())
        .args([
            "sandbox-provider",
            "--provider-listen",
            "127.0.0.1:0",
            "--api-key",
            API_KEY,
        ])
        .env("ORDERFLOW_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the sandbox provider");
    let provider_url = listening_url(&wait_for_line(&mut provider, "sandbox payment provider listening").await);
    let (proxy_url, proxy) = Proxy::start(provider_url.clone()).await;

    let shop = Shop {
        db: &db,
        data_dir: data.path(),
        proxy_url,
    };
    let (_api, api) = shop.api().await;
    let first_worker = shop.worker().await;
    *proxy.victim.lock().await = Some(first_worker);

    // An order through the API: paid (authorized), fulfilled (captured) by the first worker.
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let auth = orderflow::http::Authenticator::hs256(&orderflow::http::Secret::new(JWT_SECRET.as_bytes().to_vec()));
    let admin = auth.issue("ops", &["admin".into()], Duration::from_secs(3600)).unwrap();
    let product = http
        .post(format!("{api}/products"))
        .bearer_auth(&admin)
        .json(&json!({"name": "Kettle", "price": 20, "stock_quantity": 10}))
        .send_json()
        .await;
    let product = product["product_id"].as_str().expect("product_id").to_string();
    let customer = http
        .post(format!("{api}/customers"))
        .bearer_auth(&admin)
        .json(&json!({"email": "refund-crash@example.com", "first_name": "R", "last_name": "C"}))
        .send_json()
        .await;
    let customer = customer["customer_id"].as_str().expect("customer_id").to_string();
    let buyer = auth.issue(&customer, &[], Duration::from_secs(3600)).unwrap();
    let placed = http
        .post(format!("{api}/orders"))
        .bearer_auth(&buyer)
        .header("idempotency-key", "refund-crash-order")
        .json(&json!({"items": [{"product_id": product, "quantity": 2}], "payment": {"token": "tok_visa"}}))
        .send_json()
        .await;
    let id = placed["order_id"]
        .as_str()
        .unwrap_or_else(|| panic!("not placed: {placed}"))
        .to_string();
    let fulfilled = wait_for_order(&http, &api, &admin, &id, "fulfilled", |v| v["status"] == "fulfilled").await;
    assert_eq!(fulfilled["payment"]["provider"], "stripe", "{fulfilled}");
    assert_eq!(fulfilled["payment"]["state"], "captured", "{fulfilled}");
    assert_eq!(fulfilled["payment"]["captured_amount"].to_string(), "40.00");
    let intent = fulfilled["payment"]["provider_reference"]
        .as_str()
        .expect("a PaymentIntent")
        .to_string();
    let books = provider_db.connect().await;
    assert_eq!(books.intent_refunds(&intent).await.unwrap().len(), 0);

    // The refund: the worker is killed with the provider's answer in hand.
    proxy.armed.store(true, Ordering::SeqCst);
    let refund = http
        .post(format!("{api}/orders/{id}/refunds"))
        .bearer_auth(&admin)
        .header("idempotency-key", "refund-crash-refund")
        .json(&json!({"amount": 15, "reason": "damaged"}))
        .send_json()
        .await;
    assert_eq!(refund["state"], "pending", "{refund}");
    assert_eq!(refund["amount"].to_string(), "15.00", "{refund}");
    let refund_id: uuid::Uuid = refund["refund_id"].as_str().expect("refund_id").parse().unwrap();
    let key = orderflow::workflow::steps::settle_refund_key(refund_id);
    let store = db.connect().await;
    let order_id: orderflow::domain::OrderId = id.parse().unwrap();
    if tokio::time::timeout(PATIENCE, proxy.killed.notified()).await.is_err() {
        panic!(
            "the worker did not call the provider's refund within {PATIENCE:?}; the order's jobs: {:?}; refunds \
             seen: {:?}",
            store.jobs_for_order(order_id).await.unwrap(),
            proxy.refunds()
        );
    }
    let killed_at = started.elapsed();

    // The crash window: the provider refunded, our database did not record it.
    let calls = proxy.refunds();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].killed_before_relay, "{calls:?}");
    assert_eq!(calls[0].status, 200, "{calls:?}");
    assert_eq!(calls[0].idempotency_key.as_deref(), Some(key.as_str()), "{calls:?}");
    let provider_refund = calls[0].answer["id"].as_str().expect("a refund id").to_string();
    assert!(provider_refund.starts_with("re_"), "{calls:?}");
    let at_provider = books.intent_refunds(&intent).await.unwrap();
    assert_eq!(at_provider.len(), 1, "{at_provider:?}");
    let ours = store.after_sale().refunds(order_id).await.unwrap();
    assert_eq!(ours.len(), 1);
    assert_eq!(
        (ours[0].state.as_str(), ours[0].provider_ref.as_deref()),
        ("pending", None),
        "the refund must not be recorded yet: {ours:?}"
    );
    let view = order_view(&http, &api, &admin, &id).await;
    assert_eq!(view["payment"]["refunded_amount"].to_string(), "0.00", "{view}");
    let settle = |jobs: &[orderflow::store::JobSummary]| {
        jobs.iter()
            .find(|j| j.kind == orderflow::workflow::SETTLE_REFUND)
            .cloned()
            .expect("a settle_refund job")
    };
    let job = settle(&store.jobs_for_order(order_id).await.unwrap());
    assert_eq!((job.state.as_str(), job.attempts), ("running", 1), "{job:?}");

    // A new worker takes the job over and settles the refund: the same key, the first refund.
    let _second_worker = shop.worker().await;
    // The view is read in parts (jobs, then payment, then refunds), so it is only taken as settled
    // once the step is done too: a refund already `succeeded` can show with the step still running.
    let settled = wait_for_order(&http, &api, &admin, &id, "the refund settled", |v| {
        v["refunds"][0]["state"] == "succeeded" && v["pending_steps"] == json!([])
    })
    .await;
    let recovered_at = started.elapsed();
    let refunds = settled["refunds"].as_array().unwrap();
    assert_eq!(refunds.len(), 1, "{settled}");
    assert_eq!(refunds[0]["refund_id"], refund_id.to_string());
    assert_eq!(refunds[0]["provider_reference"], provider_refund.as_str(), "{settled}");
    assert_eq!(refunds[0]["amount"].to_string(), "15.00");
    assert_eq!(settled["status"], "fulfilled", "a partial refund: {settled}");
    assert_eq!(settled["payment"]["state"], "partially_refunded", "{settled}");
    assert_eq!(settled["payment"]["refunded_amount"].to_string(), "15.00", "{settled}");
    assert_eq!(settled["payment"]["captured_amount"].to_string(), "40.00");

    // Exactly one refund at the provider, of that amount.
    let at_provider = books.intent_refunds(&intent).await.unwrap();
    assert_eq!(
        at_provider.len(),
        1,
        "one refund in the provider's books: {at_provider:?}"
    );
    assert_eq!(at_provider[0].id, provider_refund);
    assert_eq!(at_provider[0].amount_minor, 1500);
    assert_eq!(at_provider[0].idempotency_key, key);
    let booked = books.intent(&intent).await.unwrap().expect("the intent");
    assert_eq!(
        (booked.captured_minor, booked.refunded_minor),
        (4000, 1500),
        "{booked:?}"
    );
    let listed = http
        .get(format!("{provider_url}/v1/refunds?payment_intent={intent}"))
        .bearer_auth(API_KEY)
        .send_json()
        .await;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed["data"][0]["amount"], 1500, "{listed}");
    // The retry asked with the same key and was answered the same refund.
    let calls = proxy.refunds();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(!calls[1].killed_before_relay);
    assert_eq!(calls[1].idempotency_key.as_deref(), Some(key.as_str()), "{calls:?}");
    assert_eq!(
        (calls[1].status, calls[1].answer["id"].as_str()),
        (200, Some(provider_refund.as_str()))
    );
    let job = settle(&store.jobs_for_order(order_id).await.unwrap());
    // The run killed mid-call gave its attempt back (a crash is not a failure): one attempt.
    assert_eq!((job.state.as_str(), job.attempts), ("succeeded", 1), "{job:?}");

    // The audit, with the provider's books, is clean.
    let audit = Command::new(BIN)
        .envs(common::profile_env(db.url()))
        .arg("--database-url")
        .arg(db.url())
        .args([
            "audit",
            "--payment-provider",
            "stripe",
            "--stripe-api-base",
            &provider_url,
        ])
        .args(["--stripe-secret-key", API_KEY, "--payment-timeout", "5s"])
        .env("ORDERFLOW_LOG", "warn")
        .output()
        .await
        .expect("run orderflow audit");
    let stdout = String::from_utf8_lossy(&audit.stdout);
    assert_eq!(
        audit.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&audit.stderr)
    );
    assert!(stdout.ends_with("all invariants hold\n"), "{stdout}");
    eprintln!(
        "{backend:?}: worker killed at {:.1}s, refund settled by the next worker at {:.1}s, done at {:.1}s",
        killed_at.as_secs_f64(),
        recovered_at.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let _ = provider.start_kill();
}
