//! Losing the database answers only 503, never 500 (issue 13): the real binary serves an
//! 8-client checkout load on a private PostgreSQL cluster (started by the test on a free port,
//! never the shared server) that is taken away three times in the middle of the load — a fast
//! shutdown (every session gets "terminating connection due to administrator command") and an
//! immediate one (a crash: recovery on the next start), each held down until the readiness probe
//! and a client have seen the outage, then a plain `pg_ctl restart -m fast`.
//!
//! Throughout: every answer is 202, 503 with `Retry-After`, or 409 `idempotency_key_in_use` (the
//! key of a request the outage interrupted is still claimed); clients retry with the same
//! Idempotency-Key until 202. `/health/ready` answered 503 while the database was down and 200
//! again after. Afterwards: every accepted order reaches `fulfilled` (the workers, the relay and
//! LISTEN came back by themselves), each key made exactly one order (an ambiguous COMMIT was
//! replayed, never duplicated), nothing was logged at ERROR, and `orderflow audit` is clean.

mod common;
#[path = "support/private_postgres.rs"]
mod private_postgres;
#[path = "support/server_process.rs"]
mod server_process;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::SendJson;
use private_postgres::{PrivatePostgres, StopMode};
use serde_json::{Value, json};
use server_process::{Server, cli, token};
use sqlx::Connection;
use tokio::time::Instant;

const SECRET: &str = "db-restart-secret-db-restart-secret-xx";
const CLIENTS: usize = 8;
const ORDERS: usize = 360;
/// Orders the clients may start beyond the next outage's target, so orders are in flight when it
/// comes.
const SLACK: usize = 40;

/// What the clients saw, shared with the test.
#[derive(Default)]
struct Observed {
    /// Idempotency key → the order its 202 named.
    accepted: Mutex<HashMap<String, String>>,
    /// 202s that replayed an earlier outcome of the same key (after a 503).
    replayed_after_503: AtomicUsize,
    unavailable: AtomicUsize,
    key_in_use: AtomicUsize,
    /// Answers that break the contract: a 500, a 503 without `Retry-After`, anything unexpected.
    violations: Mutex<Vec<String>>,
}

impl Observed {
    fn accepted_count(&self) -> usize {
        self.accepted.lock().unwrap().len()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_restarts_under_checkout_load_answer_only_503() {
    let postgres = PrivatePostgres::start();
    let db_url = postgres.url();
    let data = tempfile::tempdir().unwrap();
    let (server, log) = Server::start_keeping_log(
        &db_url,
        SECRET,
        &[
            "--no-seed",
            "--data-dir",
            data.path().to_str().unwrap(),
            "--db-acquire-timeout",
            "1s",
            "--job-lease",
            "3s",
            "--job-backoff",
            "50ms",
            "--job-backoff-max",
            "500ms",
            "--job-poll",
            "200ms",
            "--events-poll",
            "200ms",
            "--rate-limit-writes",
            "off",
            "--rate-limit-reads",
            "off",
        ],
    )
    .await;
    let base = server.url.clone();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let admin = token(&db_url, SECRET, &["--sub", "ops", "--role", "admin"]).await;
    let mut products = Vec::new();
    for n in 0..3 {
        let product: Value = http
            .post(format!("{base}/products"))
            .bearer_auth(&admin)
            .json(&json!({"name": format!("P{n}"), "price": 5, "stock_quantity": 100000}))
            .send_json()
            .await;
        products.push(product["product_id"].as_str().unwrap().to_string());
    }
    let mut buyers = Vec::new();
    for n in 0..CLIENTS {
        let customer: Value = http
            .post(format!("{base}/customers"))
            .bearer_auth(&admin)
            .json(&json!({"email": format!("c{n}@example.com"), "first_name": "C", "last_name": "N"}))
            .send_json()
            .await;
        buyers.push(token(&db_url, SECRET, &["--sub", customer["customer_id"].as_str().unwrap()]).await);
    }

    // Readiness, sampled throughout.
    let readiness: Arc<Mutex<Vec<(Instant, u16)>>> = Arc::default();
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (http, url, readiness, sampling) = (
            http.clone(),
            format!("{base}/health/ready"),
            readiness.clone(),
            sampling.clone(),
        );
        tokio::spawn(async move {
            while sampling.load(Ordering::SeqCst) {
                let status = http.get(&url).send().await.expect("orderflow answers /health/ready");
                readiness
                    .lock()
                    .unwrap()
                    .push((Instant::now(), status.status().as_u16()));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let observed = Arc::new(Observed::default());
    let (next, cap) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(SLACK)));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (http, base, buyer, products, observed, next, cap) = (
                http.clone(),
                base.clone(),
                buyers[client].clone(),
                products.clone(),
                observed.clone(),
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
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    if next
                        .compare_exchange(n, n + 1, Ordering::SeqCst, Ordering::SeqCst)
                        .is_err()
                    {
                        continue;
                    }
                    place_until_accepted(&http, &base, &buyer, &products[n % 3], n, &observed).await;
                }
            })
        })
        .collect();

    // Three outages, each once the load has run a while since the last one.
    let mut outages = Vec::new();
    let rounds = [
        ("pg_ctl stop -m fast, held down", Some(StopMode::Fast)),
        ("pg_ctl stop -m immediate (crash), held down", Some(StopMode::Immediate)),
        ("pg_ctl restart -m fast", None),
    ];
    for (round, (what, hold)) in rounds.into_iter().enumerate() {
        let target = (round + 1) * ORDERS / 4;
        cap.store(target + SLACK, Ordering::SeqCst);
        wait_until(
            Duration::from_secs(90),
            "orders to be accepted before the next outage",
            || observed.accepted_count() >= target,
        )
        .await;
        let before = (
            observed.unavailable.load(Ordering::SeqCst),
            readiness.lock().unwrap().len(),
        );
        let down_at = Instant::now();
        match hold {
            Some(mode) => {
                postgres.stop(mode);
                // Down until the probe reports it and the load has met it.
                wait_until(Duration::from_secs(30), "a 503 from /health/ready while down", || {
                    readiness.lock().unwrap()[before.1..]
                        .iter()
                        .any(|(at, status)| *at > down_at && *status == 503)
                })
                .await;
                wait_until(Duration::from_secs(30), "a client to get 503 while down", || {
                    observed.unavailable.load(Ordering::SeqCst) > before.0
                })
                .await;
                postgres.start_server();
            }
            None => postgres.restart(StopMode::Fast),
        }
        let up_at = Instant::now();
        wait_until(Duration::from_secs(30), "/health/ready to answer 200 again", || {
            readiness
                .lock()
                .unwrap()
                .iter()
                .any(|(at, status)| *at > up_at && *status == 200)
        })
        .await;
        outages.push(format!(
            "{what}: down {:.1}s with {} orders accepted",
            (up_at - down_at).as_secs_f64(),
            observed.accepted_count()
        ));
    }
    cap.store(ORDERS, Ordering::SeqCst);
    for client in clients {
        client.await.expect("a client panicked");
    }
    sampling.store(false, Ordering::SeqCst);
    sampler.await.unwrap();

    let violations = observed.violations.lock().unwrap().clone();
    assert!(
        violations.is_empty(),
        "answers that break the contract: {violations:#?}\n{outages:#?}"
    );
    assert!(
        observed.unavailable.load(Ordering::SeqCst) > 0,
        "the outages never reached a client"
    );
    let accepted = observed.accepted.lock().unwrap().clone();
    assert_eq!(accepted.len(), ORDERS, "every order was accepted in the end");
    let distinct: HashSet<&String> = accepted.values().collect();
    assert_eq!(distinct.len(), ORDERS, "each key made its own order");

    // Every accepted order finishes, by itself.
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut unfinished: BTreeMap<String, Value> = BTreeMap::new();
    for order in accepted.values() {
        loop {
            let body: Value = http
                .get(format!("{base}/orders/{order}"))
                .bearer_auth(&admin)
                .send_json()
                .await;
            if body["status"] == "fulfilled" {
                break;
            }
            if Instant::now() > deadline {
                unfinished.insert(order.clone(), body);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(
        unfinished.is_empty(),
        "orders that did not reach fulfilled: {unfinished:#?}"
    );
    server.kill9().await;
    // Warnings only: an outage is no bug (a 500 is logged at ERROR, and so is a step failure
    // that could not be recorded for any other reason).
    let errors: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.contains("ERROR"))
        .cloned()
        .collect();
    assert!(errors.is_empty(), "orderflow logged errors: {errors:#?}");

    // Nothing behind the clients' backs: the database holds exactly the accepted orders (a
    // COMMIT whose answer was lost was replayed to its key, never made twice).
    let mut conn = sqlx::PgConnection::connect(&db_url)
        .await
        .expect("the private PostgreSQL");
    let (orders,): (i64,) = sqlx::query_as("SELECT count(*) FROM orders")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(orders as usize, ORDERS, "one stored order per accepted key");
    conn.close().await.unwrap();
    let audit = cli(&db_url, SECRET, &["audit"]).await;
    assert!(
        audit.status.success(),
        "audit after the restarts:\n{}",
        String::from_utf8_lossy(&audit.stdout)
    );
    eprintln!(
        "{outages:#?}\n503s: {}, 409 key in use: {}, replayed after a 503: {}",
        observed.unavailable.load(Ordering::SeqCst),
        observed.key_in_use.load(Ordering::SeqCst),
        observed.replayed_after_503.load(Ordering::SeqCst)
    );
}

/// The error of the measured 500 itself: a session the server terminates answers its next
/// statement with SQLSTATE 57P01 "terminating connection due to administrator command", which
/// the store reports as unavailable (503), not as a bug.
#[tokio::test]
async fn a_terminated_session_is_unavailable_not_a_bug() {
    let postgres = PrivatePostgres::start();
    let mut victim = sqlx::PgConnection::connect(&postgres.url())
        .await
        .expect("the private PostgreSQL");
    let (pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
        .fetch_one(&mut victim)
        .await
        .unwrap();
    let mut admin = sqlx::PgConnection::connect(&postgres.url()).await.unwrap();
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&mut admin)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (alive,): (bool,) = sqlx::query_as("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
            .bind(pid)
            .fetch_one(&mut admin)
            .await
            .unwrap();
        if !alive {
            break;
        }
        assert!(Instant::now() < deadline, "backend {pid} was not terminated");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let error = sqlx::query("SELECT 1")
        .execute(&mut victim)
        .await
        .expect_err("the session was terminated");
    match &error {
        sqlx::Error::Database(db) => assert_eq!(db.code().as_deref(), Some("57P01"), "{error}"),
        other => panic!("expected the server's 57P01, got {other:?}"),
    }
    let classified = orderflow::store::StoreError::from(error);
    assert!(
        matches!(classified, orderflow::store::StoreError::Unavailable(_)),
        "{classified:?}"
    );
}

/// Places order `n` with its own Idempotency-Key, retrying with the same key until 202 as a
/// client must across an outage, and records every answer.
async fn place_until_accepted(
    http: &reqwest::Client,
    base: &str,
    buyer: &str,
    product: &str,
    n: usize,
    observed: &Observed,
) {
    let key = format!("restart-{n}");
    let body = json!({"items": [{"product_id": product, "quantity": 1 + n % 2}], "payment": {"token": "tok_visa"}});
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut refused = false;
    loop {
        assert!(Instant::now() < deadline, "order {n} was never accepted");
        let response = http
            .post(format!("{base}/orders"))
            .bearer_auth(buyer)
            .header("idempotency-key", &key)
            .json(&body)
            .send()
            .await
            .expect("orderflow itself stays up and answers");
        let status = response.status().as_u16();
        let retry_after = response.headers().contains_key("retry-after");
        let replayed = response.headers().contains_key("idempotent-replayed");
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        match (status, answer["code"].as_str()) {
            (202, _) => {
                if replayed && refused {
                    observed.replayed_after_503.fetch_add(1, Ordering::SeqCst);
                }
                let order = answer["order_id"].as_str().expect("an order id").to_string();
                observed.accepted.lock().unwrap().insert(key, order);
                return;
            }
            (503, _) if retry_after => {
                refused = true;
                observed.unavailable.fetch_add(1, Ordering::SeqCst);
            }
            // The claim of an attempt the outage interrupted, until it is released.
            (409, Some("idempotency_key_in_use")) => {
                observed.key_in_use.fetch_add(1, Ordering::SeqCst);
            }
            _ => {
                observed
                    .violations
                    .lock()
                    .unwrap()
                    .push(format!("order {n}: {status} (Retry-After: {retry_after}) {answer}"));
                refused = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `done` until it holds, failing the test with `what` after `limit`.
async fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "waited {limit:?} for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
