//! Regions over a WAN (issue 12): two real `orderflow serve` processes on one PostgreSQL
//! database — "local" connected directly, "remote" through a proxy that puts a one-way latency on
//! every chunk in each direction (tests/support/latency_proxy.rs; 35 ms each way by default, a
//! 70 ms round trip; the remote one takes checkouts only, `--mode api`) — take checkouts from
//! clients at the same time. Every order through either
//! must be accepted (202) and the audit clean afterwards; the checkout latency per region is
//! printed (p50/p99), never asserted: it is a measurement (bench/wan.sh runs this with more
//! orders; docs/BENCHMARKS.md "Regions over a WAN"). The target is remote p50 ≤ 2 × RTT +
//! local p50: a checkout pays two database round trips.
//!
//! Environment: ORDERFLOW_WAN_ORDERS (orders per region, default 40), ORDERFLOW_WAN_CLIENTS
//! (concurrent clients per region, default 4), ORDERFLOW_WAN_ONE_WAY_MS (default 35).

mod common;
#[path = "support/latency_proxy.rs"]
mod latency_proxy;
#[path = "support/server_process.rs"]
mod server_process;

use std::time::Duration;

use common::{Backend, SendJson, TestDb};
use latency_proxy::LatencyProxy;
use serde_json::{Value, json};
use server_process::{Server, cli, token};
use tokio::time::Instant;

const SECRET: &str = "wan-test-secret-wan-test-secret-wan-xx";

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|value| value.parse().unwrap_or_else(|_| panic!("{name} must be a number")))
        .unwrap_or(default)
}

fn server_args(data: &std::path::Path) -> Vec<String> {
    [
        "--no-seed",
        "--data-dir",
        data.to_str().unwrap(),
        "--rate-limit-writes",
        "off",
        "--rate-limit-reads",
        "off",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect()
}

async fn start(db_url: &str, data: &std::path::Path, extra: &[&str]) -> Server {
    let mut args = server_args(data);
    args.extend(extra.iter().map(|arg| arg.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(db_url, SECRET, &args).await
}

/// Places `orders` orders at `base` from `clients` concurrent clients, each with its own key;
/// returns every checkout's latency. Panics on anything but 202.
async fn drive(base: &str, buyer: &str, product: &str, orders: usize, clients: usize, region: &str) -> Vec<Duration> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (http, base, buyer, product, region) = (
            http.clone(),
            base.to_string(),
            buyer.to_string(),
            product.to_string(),
            region.to_string(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for n in (client..orders).step_by(clients) {
                let body = json!({"items": [{"product_id": product, "quantity": 1}], "payment": {"token": "tok_visa"}});
                let started = Instant::now();
                let response = http
                    .post(format!("{base}/orders"))
                    .bearer_auth(&buyer)
                    .header("idempotency-key", format!("{region}-{n}"))
                    .json(&body)
                    .send()
                    .await
                    .expect("orderflow answers");
                let status = response.status().as_u16();
                let answer: Value = response.json().await.unwrap_or(Value::Null);
                assert_eq!(status, 202, "{region} order {n}: {answer}");
                latencies.push(started.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort();
    all
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checkouts_through_a_wan_proxy_are_accepted_and_measured() {
    let (orders, clients) = (
        env_number("ORDERFLOW_WAN_ORDERS", 40) as usize,
        env_number("ORDERFLOW_WAN_CLIENTS", 4) as usize,
    );
    let one_way = Duration::from_millis(env_number("ORDERFLOW_WAN_ONE_WAY_MS", 35));
    let db = TestDb::new(Backend::Postgres).await;
    let target = common::pg_server_url()
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .map(|host_port| host_port.replace("localhost", "127.0.0.1"))
        .and_then(|host_port| host_port.parse().ok())
        .expect("a numeric host:port in ORDERFLOW_TEST_DATABASE_URL");
    let proxy = LatencyProxy::start(target, one_way).await;
    let (local_data, remote_data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The local process migrates the database (the remote one finds it done) and runs the
    // pipeline after checkout; the remote one takes checkouts only (`--mode api`), as workers
    // belong next to the database: a step's transaction would hold its rows' locks (a hot
    // product's among them) across WAN round trips, and every checkout of that product, local
    // or remote, would wait behind it.
    let local = start(db.url(), local_data.path(), &[]).await;
    let remote = start(&proxy.url(db.url()), remote_data.path(), &["--mode", "api"]).await;

    let http = reqwest::Client::new();
    let admin = token(db.url(), SECRET, &["--sub", "ops", "--role", "admin"]).await;
    let product: Value = http
        .post(format!("{}/products", local.url))
        .bearer_auth(&admin)
        .json(&json!({"name": "Lamp", "price": 5, "stock_quantity": 1_000_000}))
        .send_json()
        .await;
    let product = product["product_id"].as_str().unwrap().to_string();
    let customer: Value = http
        .post(format!("{}/customers", local.url))
        .bearer_auth(&admin)
        .json(&json!({"email": "wan@example.com", "first_name": "W", "last_name": "N"}))
        .send_json()
        .await;
    let buyer = token(db.url(), SECRET, &["--sub", customer["customer_id"].as_str().unwrap()]).await;

    // Warm-up: each process opens and prepares its connections.
    drive(&local.url, &buyer, &product, clients * 2, clients, "warm-local").await;
    drive(&remote.url, &buyer, &product, clients * 2, clients, "warm-remote").await;
    let (local_latency, remote_latency) = tokio::join!(
        drive(&local.url, &buyer, &product, orders, clients, "local"),
        drive(&remote.url, &buyer, &product, orders, clients, "remote"),
    );

    let rtt = one_way * 2;
    let (local_p50, remote_p50) = (percentile(&local_latency, 0.5), percentile(&remote_latency, 0.5));
    // One write, so the servers' log lines on the same terminal cannot split it.
    // (A fresh line: with one test thread, libtest has printed "test … ... " without one.)
    let mut summary = String::from("\n");
    for (region, latency) in [("local", &local_latency), ("remote", &remote_latency)] {
        summary += &format!(
            "wan: region={region} orders={} clients={clients} checkout_p50_ms={:.1} checkout_p99_ms={:.1}\n",
            latency.len(),
            percentile(latency, 0.5).as_secs_f64() * 1e3,
            percentile(latency, 0.99).as_secs_f64() * 1e3,
        );
    }
    let bound = rtt * 2 + local_p50;
    summary += &format!(
        "wan: rtt_ms={} target remote_p50 <= 2 x rtt + local_p50 = {:.1} ms: {}\n",
        rtt.as_millis(),
        bound.as_secs_f64() * 1e3,
        if remote_p50 <= bound { "met" } else { "NOT met" }
    );
    print!("{summary}");

    let audit = cli(db.url(), SECRET, &["audit"]).await;
    assert!(
        audit.status.success(),
        "audit: {}{}",
        String::from_utf8_lossy(&audit.stdout),
        String::from_utf8_lossy(&audit.stderr)
    );
    let accepted = db.count("SELECT count(*) FROM orders").await;
    assert_eq!(
        accepted as usize,
        2 * (orders + clients * 2),
        "every checkout made one order"
    );
    drop((local, remote));
}
