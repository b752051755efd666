//! Chaos: 300 orders with every kind of payment token while the processes are killed with
//! SIGKILL several times. Afterwards every accepted order is finished (or visibly parked with a
//! dead job), no order was charged twice or got two receipts (the audit checks the provider's
//! books and the notification records), no effect was applied twice (each timeline entry appears
//! once), and `orderflow audit` is clean.
//! On PostgreSQL a second process drains the same queue throughout.

mod common;

use common::SendJson;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Backend, TestDb};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

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
    let db = TestDb::new(backend).await;
    let data = tempfile::tempdir().unwrap();
    let mut cluster = Cluster {
        db_url: db.url().to_string(),
        data_dir: data.path().to_path_buf(),
        port: free_port(),
        children: Vec::new(),
        extra_worker: backend == Backend::Postgres,
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
    // real client would across the outages.
    let answered = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, &'static str)>();
    let next = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..12)
        .map(|_| {
            let (http, base, buyers, products, answered, tx, next) =
                (http.clone(), base.clone(), buyers.clone(), products.clone(), answered.clone(), tx.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= ORDERS {
                        return;
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

    // Chaos: kill everything three times while orders are being placed and processed.
    for round in 1..=3 {
        let target = round * ORDERS / 4;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while answered.load(Ordering::SeqCst) < target {
            assert!(tokio::time::Instant::now() < deadline, "orders stopped being accepted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cluster.kill9().await;
        cluster.start().await;
    }
    for client in clients {
        client.await.unwrap();
    }
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

    for (order, token) in &accepted {
        let body: Value = http
            .get(format!("{base}/orders/{order}"))
            .bearer_auth(&admin)
            .send_json()
            .await;
        let status = body["status"].as_str().unwrap();
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
        let payment_state = body["payment"]["state"].as_str().unwrap_or("none");
        assert_eq!(
            payment_state == "captured",
            status == "fulfilled" || status == "paid",
            "{body}"
        );
    }
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
}
