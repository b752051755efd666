//! A flash sale through the real binary: many buyers race for one product at once and it sells
//! out exactly — every unit sold once, every other buyer told 422 `insufficient_stock`, no other
//! answer, the audit clean. On PostgreSQL three processes take the orders (each groups its
//! concurrent checkouts into shared commits, and the groups of different processes race for the
//! same product row), each started with a `--region` of its own that every order it accepts
//! records; on SQLite the one embedded process does. In the emulated distributed SQL
//! (tests/common: snapshot isolation, 20% of the hot commits failed with "(OC000)") and on plain
//! PostgreSQL at `repeatable read`, every lost race is retried whole: still no other answer.

mod common;
#[path = "support/server_process.rs"]
mod server_process;

use std::collections::BTreeMap;

use common::{Backend, SendJson, TestDb};
use serde_json::{Value, json};
use server_process::{Server, cli, token};

const SECRET: &str = "flash-sale-secret-flash-sale-secret-xx";
const UNITS: i64 = 150;
const BUYERS: usize = 12;
const ORDERS: usize = 240;
const AT_ONCE: usize = 48;

on_every_backend!(flash_sale_sells_out_exactly);

/// The share of commits the emulated DSQL fails with a conflict during the sale (issue 12: 20%).
const SALE_CONFLICT_RATE: f64 = 0.2;

async fn flash_sale_sells_out_exactly(backend: Backend) {
    let db = TestDb::new_with_conflicts(backend, SALE_CONFLICT_RATE).await;
    sell_out(backend, db).await;
}

/// The plain PostgreSQL profile on a database whose transactions default to `repeatable read`
/// (the isolation DSQL gives): serialization failures are retried whole, never a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flash_sale_on_postgres_at_snapshot_isolation() {
    let db = TestDb::new(Backend::Postgres).await;
    db.alter_database("default_transaction_isolation = 'repeatable read'")
        .await;
    sell_out(Backend::Postgres, db).await;
}

async fn sell_out(backend: Backend, db: TestDb) {
    let processes = if backend.is_postgres() { 3 } else { 1 };
    // Checkout only (`--mode api`): the subject is the race for stock; the audit then checks a
    // database at rest, not a pipeline between a provider call and its commit.
    let mut args = backend.server_args();
    // Pools of 8: three PostgreSQL races run at once, each with three processes, on a server
    // that takes 100 connections.
    args.extend([
        "--db-max-connections",
        "8",
        "--no-seed",
        "--mode",
        "api",
        "--rate-limit-writes",
        "off",
        "--rate-limit-reads",
        "off",
    ]);
    // Each process in a region of its own, which every order it accepts records.
    let regions = ["eu-west-1", "us-east-1", "ap-southeast-2"];
    let mut servers = Vec::new();
    for region in regions.iter().take(processes) {
        let mut args = args.clone();
        args.extend(["--region", *region]);
        servers.push(Server::start(db.url(), SECRET, &args).await);
    }
    let http = reqwest::Client::new();
    let admin = token(db.url(), SECRET, &["--sub", "ops", "--role", "admin"]).await;
    let product: Value = http
        .post(format!("{}/products", servers[0].url))
        .bearer_auth(&admin)
        .json(&json!({"name": "Limited edition", "price": 49.5, "stock_quantity": UNITS}))
        .send_json()
        .await;
    let product_id = product["product_id"].as_str().unwrap().to_string();
    let mut buyers = Vec::new();
    for n in 0..BUYERS {
        let customer: Value = http
            .post(format!("{}/customers", servers[0].url))
            .bearer_auth(&admin)
            .json(&json!({"email": format!("buyer{n}@example.com"), "first_name": "B", "last_name": "{n}"}))
            .send_json()
            .await;
        let id = customer["customer_id"].as_str().unwrap().to_string();
        buyers.push(token(db.url(), SECRET, &["--sub", &id]).await);
    }

    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut racers = tokio::task::JoinSet::new();
    for _ in 0..AT_ONCE {
        let (http, urls, buyers, product_id, next) = (
            http.clone(),
            urls.clone(),
            buyers.clone(),
            product_id.clone(),
            next.clone(),
        );
        racers.spawn(async move {
            let mut answers = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if n >= ORDERS {
                    return answers;
                }
                let response = http
                    .post(format!("{}/orders", urls[n % urls.len()]))
                    .bearer_auth(&buyers[n % buyers.len()])
                    .header("idempotency-key", format!("flash-{n}"))
                    .json(&json!({"items": [{"product_id": product_id, "quantity": 1}]}))
                    .send()
                    .await
                    .expect("the server answers");
                let status = response.status().as_u16();
                let body: Value = response.json().await.expect("a JSON answer");
                answers.push((status, body, n % urls.len()));
            }
        });
    }
    let mut statuses = BTreeMap::new();
    let mut accepted = Vec::new();
    while let Some(answers) = racers.join_next().await {
        for (status, body, server) in answers.unwrap() {
            *statuses.entry(status).or_insert(0usize) += 1;
            match status {
                202 => {
                    assert_eq!(
                        body["region"], regions[server],
                        "the accepting process's region: {body}"
                    );
                    accepted.push(body["order_id"].as_str().unwrap().to_string())
                }
                422 => assert_eq!(body["code"], "insufficient_stock", "{body}"),
                _ => panic!("unexpected answer {status}: {body}"),
            }
        }
    }
    assert_eq!(
        statuses,
        BTreeMap::from([(202, UNITS as usize), (422, ORDERS - UNITS as usize)]),
        "every unit sold once, every other buyer refused"
    );
    let unique: std::collections::HashSet<&String> = accepted.iter().collect();
    assert_eq!(unique.len(), accepted.len(), "one order per accepted checkout");

    let after: Value = http
        .get(format!("{}/products/{product_id}", servers[0].url))
        .send_json()
        .await;
    assert_eq!(after["stock_quantity"], 0, "sold out exactly: {after}");
    let mut audit_args = backend.server_args();
    audit_args.push("audit");
    let audit = cli(db.url(), SECRET, &audit_args).await;
    assert!(
        audit.status.success(),
        "audit after the flash sale:\n{}{}",
        String::from_utf8_lossy(&audit.stdout),
        String::from_utf8_lossy(&audit.stderr)
    );
    for server in servers {
        server.kill9().await;
    }
}
