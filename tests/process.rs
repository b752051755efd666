//! The real `orderflow` binary as operators run it: accepted orders survive kill -9 (I5) and their
//! pipeline resumes after a restart, the
//! CLI's tokens are accepted by the server, `audit` exits non-zero on a broken invariant,
//! SIGTERM shuts down cleanly, and bad configuration is refused with a clear message.

mod common;
#[path = "support/server_process.rs"]
mod server_process;

use common::SendJson;

use std::process::Stdio;
use std::time::Duration;

use common::{Backend, TestDb};
use serde_json::{Value, json};
use sqlx::Connection;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");
const SECRET: &str = "process-test-secret-process-test-secret";

on_every_backend!(
    accepted_orders_survive_sigkill,
    audit_command_reports_and_exits_nonzero,
    jobs_command_lists_and_replays_dead_jobs,
);

fn command(db: &TestDb) -> Command {
    server_process::command(db.url(), SECRET)
}

/// `orderflow serve` on the test database, as these tests run it.
struct Server;

impl Server {
    async fn start(db: &TestDb) -> server_process::Server {
        server_process::Server::start(db.url(), SECRET, &["--job-lease", "2s", "--job-backoff", "50ms"]).await
    }
}

async fn cli(db: &TestDb, args: &[&str]) -> std::process::Output {
    server_process::cli(db.url(), SECRET, args).await
}

async fn token(db: &TestDb, args: &[&str]) -> String {
    server_process::token(db.url(), SECRET, args).await
}

async fn accepted_orders_survive_sigkill(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db).await;
    let http = reqwest::Client::new();
    let admin = token(&db, &["--sub", "ops", "--role", "admin"]).await;

    // The first start loaded the sample catalog.
    let catalog: Value = http.get(format!("{}/products", server.url)).send_json().await;
    let product = catalog["data"][4].clone();
    let product_id = product["product_id"].as_str().unwrap().to_string();
    let stock_before = product["stock_quantity"].as_i64().unwrap();
    let customer: Value = http
        .post(format!("{}/customers", server.url))
        .bearer_auth(&admin)
        .json(&json!({"email": "kill@example.com", "first_name": "K", "last_name": "Nine"}))
        .send_json()
        .await;
    let buyer = token(&db, &["--sub", customer["customer_id"].as_str().unwrap()]).await;

    // A burst of orders; the process is killed while it is still answering them.
    let (accepted_tx, mut accepted_rx) = tokio::sync::mpsc::unbounded_channel::<(String, i64)>();
    let burst: Vec<_> = (0..60)
        .map(|n| {
            let (http, url, buyer, product_id, accepted) = (
                http.clone(),
                server.url.clone(),
                buyer.clone(),
                product_id.clone(),
                accepted_tx.clone(),
            );
            tokio::spawn(async move {
                let quantity = n % 3 + 1;
                let response = http
                    .post(format!("{url}/orders"))
                    .bearer_auth(buyer)
                    .header("idempotency-key", format!("burst-{n}"))
                    .json(&json!({"items": [{"product_id": product_id, "quantity": quantity}]}))
                    .send()
                    .await;
                if let Ok(response) = response {
                    if response.status() == 202 {
                        if let Ok(body) = response.json::<Value>().await {
                            let _ = accepted.send((body["order_id"].as_str().unwrap().to_string(), quantity));
                        }
                    }
                }
            })
        })
        .collect();
    drop(accepted_tx);
    let mut accepted = Vec::new();
    while accepted.len() < 10 {
        accepted.push(
            tokio::time::timeout(Duration::from_secs(30), accepted_rx.recv())
                .await
                .unwrap()
                .expect("orders accepted"),
        );
    }
    server.kill9().await;
    for task in burst {
        task.await.unwrap();
    }
    while let Some(order) = accepted_rx.recv().await {
        accepted.push(order);
    }

    let server = Server::start(&db).await;
    let mut reserved = 0;
    for (order_id, quantity) in &accepted {
        let response = http
            .get(format!("{}/orders/{order_id}", server.url))
            .bearer_auth(&buyer)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "accepted order {order_id} was lost");
        let order: Value = response.json().await.unwrap();
        assert!(
            ["pending_payment", "paid", "fulfilled"].contains(&order["status"].as_str().unwrap()),
            "{order}"
        );
        assert_eq!(order["items"][0]["quantity"], *quantity);
        reserved += quantity;
    }
    // The pipeline picks up where the killed process left off: every accepted order finishes.
    for (order_id, _) in &accepted {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let order: Value = http
                .get(format!("{}/orders/{order_id}", server.url))
                .bearer_auth(&buyer)
                .header("prefer", "wait=5")
                .send_json()
                .await;
            if order["status"] == "fulfilled" {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "order {order_id} stuck: {order}"
            );
        }
    }
    // Orders whose answer the kill swallowed may exist too; none is half-written.
    let orders: Value = http
        .get(format!(
            "{}/customers/{}/orders?limit=200",
            server.url,
            customer["customer_id"].as_str().unwrap()
        ))
        .bearer_auth(&buyer)
        .send_json()
        .await;
    let stored: i64 = orders["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["items"][0]["quantity"].as_i64().unwrap())
        .sum();
    assert!(stored >= reserved);
    let after: Value = http
        .get(format!("{}/products/{product_id}", server.url))
        .send_json()
        .await;
    assert_eq!(
        after["stock_quantity"].as_i64().unwrap(),
        stock_before - stored,
        "reservations survived with their orders"
    );
    let audit = cli(&db, &["audit"]).await;
    assert!(
        audit.status.success(),
        "audit after kill -9:\n{}",
        String::from_utf8_lossy(&audit.stdout)
    );
    server.kill9().await;
}

async fn audit_command_reports_and_exits_nonzero(backend: Backend) {
    let db = TestDb::new(backend).await;
    let migrate = cli(&db, &["migrate"]).await;
    assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));
    let seed = cli(&db, &["seed"]).await;
    assert!(String::from_utf8_lossy(&seed.stdout).contains("6 product(s) added"));
    let clean = cli(&db, &["audit"]).await;
    assert_eq!(clean.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&clean.stdout).contains("all invariants hold"));

    let sql = "UPDATE products SET on_hand = on_hand + 7 WHERE sku = 'KB-001'";
    match backend {
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(db.url()).await.unwrap();
            sqlx::query(sql).execute(&mut conn).await.unwrap();
        }
        Backend::Postgres | Backend::Dsql => {
            let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
            sqlx::query(sql).execute(&mut conn).await.unwrap();
        }
    }
    let broken = cli(&db, &["audit"]).await;
    assert_eq!(broken.status.code(), Some(1));
    let report = String::from_utf8_lossy(&broken.stdout);
    assert!(report.contains("FAIL stock_conservation"), "{report}");
    assert!(report.contains("found 47, expected 40"), "{report}");
    let json_report: Value = serde_json::from_slice(&cli(&db, &["audit", "--json"]).await.stdout).unwrap();
    assert_eq!(json_report["violations"][0]["check"], "stock_conservation");
}

#[tokio::test]
async fn sigterm_stops_the_server_cleanly() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut server = Server::start(&db).await;
    let health = reqwest::get(format!("{}/health/ready", server.url)).await.unwrap();
    assert_eq!(health.status(), 200);
    let pid = server.child.id().expect("pid").to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(signalled.success());
    let status = tokio::time::timeout(Duration::from_secs(15), server.child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(
        reqwest::get(format!("{}/health/live", server.url)).await.is_err(),
        "no longer listening"
    );
}

#[tokio::test]
async fn bad_configuration_is_refused_clearly() {
    let run = |args: &[&str]| {
        let output = std::process::Command::new(BIN).args(args).output().expect("run");
        (
            output.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        )
    };
    let (code, text) = run(&["--database-url", "mysql://root@localhost/x", "migrate"]);
    assert_eq!(code, Some(2));
    assert!(text.contains("unsupported database URL"), "{text}");
    let (code, text) = run(&["--jwt-secret", "short", "token", "--sub", "x"]);
    assert_ne!(code, Some(0));
    assert!(text.contains("at least 32 bytes"), "{text}");
    let (code, text) = run(&["--currency", "DOLLARS", "migrate"]);
    assert_eq!(code, Some(2));
    assert!(text.contains("ISO 4217"), "{text}");
    let (code, text) = run(&[
        "--database-url",
        "postgres://postgres:pw@127.0.0.1:1/none",
        "--db-acquire-timeout",
        "2s",
        "migrate",
    ]);
    assert_eq!(code, Some(2));
    assert!(
        text.contains("connecting to PostgreSQL at postgres://postgres:***@127.0.0.1:1/none"),
        "{text}"
    );
    assert!(!text.contains(":pw@"), "the password is never printed: {text}");

    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap();
    let (code, text) = run(&["--data-dir", data_dir, "--notifier", "smtp", "--listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(2));
    assert!(text.contains("--notifier smtp needs --smtp-host"), "{text}");
    let (code, text) = run(&[
        "--data-dir",
        data_dir,
        "--notifier",
        "smtp",
        "--smtp-host",
        "mail.example.com",
        "--mail-from",
        "nobody",
    ]);
    assert_eq!(code, Some(2));
    assert!(text.contains("SMTP configuration"), "{text}");
    let (code, text) = run(&[
        "--data-dir",
        data_dir,
        "--payment-provider",
        "stripe",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, Some(2));
    assert!(text.contains("needs --stripe-secret-key"), "{text}");
    let (code, text) = run(&["--smtp-tls", "sometimes", "migrate"]);
    assert_eq!(code, Some(2));
    assert!(text.contains("--smtp-tls"), "{text}");
}

/// The Stripe adapter against `orderflow sandbox-provider` (the sandbox in Stripe's protocol),
/// both as operators run them: an ambiguous timeout over a real network hop still ends in exactly
/// one PaymentIntent, authorized then captured.
#[tokio::test]
async fn http_payment_provider_across_processes() {
    let shop = TestDb::new(Backend::Sqlite).await;
    let provider_db = TestDb::new(Backend::Sqlite).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut provider = Command::new(BIN)
        .envs(common::profile_env(provider_db.url()))
        .arg("--database-url")
        .arg(provider_db.url())
        .args([
            "sandbox-provider",
            "--provider-listen",
            &format!("127.0.0.1:{port}"),
            "--timeout-answer-delay",
            "2s",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the sandbox provider");
    let mut lines = BufReader::new(provider.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(ready.contains("sandbox payment provider listening"), "{ready}");

    let mut server = command(&shop);
    server
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--job-backoff",
            "50ms",
            "--payment-provider",
            "stripe",
        ])
        .args([
            "--stripe-api-base",
            &format!("http://127.0.0.1:{port}"),
            "--stripe-secret-key",
            "sk_test_process_provider",
            "--payment-timeout",
            "500ms",
        ])
        .stdout(Stdio::piped());
    let mut child = server.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), out.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let url = line
        .strip_prefix("orderflow listening on ")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });

    let http = reqwest::Client::new();
    let admin = token(&shop, &["--sub", "ops", "--role", "admin"]).await;
    let catalog: Value = http.get(format!("{url}/products")).send_json().await;
    let product = catalog["data"][0]["product_id"].as_str().unwrap().to_string();
    let customer: Value = http
        .post(format!("{url}/customers"))
        .bearer_auth(&admin)
        .json(&json!({"email": "net@example.com", "first_name": "N", "last_name": "Et"}))
        .send_json()
        .await;
    let buyer = token(&shop, &["--sub", customer["customer_id"].as_str().unwrap()]).await;
    let order: Value = http
        .post(format!("{url}/orders"))
        .bearer_auth(&buyer)
        .header("idempotency-key", "over-the-network")
        .json(&json!({"items": [{"product_id": product, "quantity": 1}], "payment": {"token": "tok_timeout"}}))
        .send_json()
        .await;
    let order_id = order["order_id"].as_str().unwrap().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let done = loop {
        let body: Value = http
            .get(format!("{url}/orders/{order_id}"))
            .bearer_auth(&buyer)
            .header("prefer", "wait=5")
            .send_json()
            .await;
        if body["status"] == "fulfilled" {
            break body;
        }
        assert!(tokio::time::Instant::now() < deadline, "not fulfilled: {body}");
    };
    assert_eq!(done["payment"]["provider"], "stripe");
    assert_eq!(done["payment"]["attempts"], 2, "the first call timed out");
    assert_eq!(done["payment"]["state"], "captured");
    let intents: Value = http
        .get(format!("http://127.0.0.1:{port}/v1/payment_intents?limit=100"))
        .bearer_auth("sk_test_process_provider")
        .send_json()
        .await;
    let intents: Vec<&Value> = intents["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|intent| intent["metadata"]["order_id"] == order_id.as_str())
        .collect();
    assert_eq!(
        intents.len(),
        1,
        "one PaymentIntent in the provider's books: {intents:?}"
    );
    assert_eq!(intents[0]["id"], done["payment"]["provider_reference"]);
    assert_eq!(intents[0]["status"], "succeeded");
    assert_eq!(intents[0]["amount_received"], intents[0]["amount"]);
    child.start_kill().unwrap();
    provider.start_kill().unwrap();
}

/// `orderflow jobs list|replay` against a parked order, as an operator would.
async fn jobs_command_lists_and_replays_dead_jobs(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db).await;
    let http = reqwest::Client::new();
    let admin = token(&db, &["--sub", "ops", "--role", "admin"]).await;
    let catalog: Value = http.get(format!("{}/products", server.url)).send_json().await;
    let product = catalog["data"][0]["product_id"].as_str().unwrap().to_string();
    let customer: Value = http
        .post(format!("{}/customers", server.url))
        .bearer_auth(&admin)
        .json(&json!({"email": "ops@example.com", "first_name": "O", "last_name": "P"}))
        .send_json()
        .await;
    let buyer = token(&db, &["--sub", customer["customer_id"].as_str().unwrap()]).await;
    let order: Value = http
        .post(format!("{}/orders", server.url))
        .bearer_auth(&buyer)
        .header("idempotency-key", "parked")
        .json(&json!({"items": [{"product_id": product, "quantity": 1}], "payment": {"token": "tok_unavailable"}}))
        .send_json()
        .await;
    let order_id = order["order_id"].as_str().unwrap().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let listing = loop {
        let output = cli(&db, &["jobs", "list", "--state", "dead"]).await;
        assert!(output.status.success());
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        if text.contains(&order_id) {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the payment never dead-lettered: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        listing.contains("charge_payment") && listing.contains("attempts 3/3") && listing.contains("503"),
        "{listing}"
    );
    let replay = cli(&db, &["jobs", "replay", "--all", "--kind", "charge_payment"]).await;
    assert!(String::from_utf8_lossy(&replay.stdout).contains("replayed 1 job(s)"));
    let unknown = cli(&db, &["jobs", "replay", &uuid::Uuid::now_v7().to_string()]).await;
    assert_eq!(unknown.status.code(), Some(2), "replaying a job that is not dead fails");
    server.kill9().await;
}
