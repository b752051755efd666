//! A full disk under the embedded database (issue 13): the real binary runs with its data
//! directory on a small tmpfs, which the test fills with a filler file right after a burst of
//! orders. While it is full, every write answers 503 `storage_full` with `Retry-After` (never
//! 500), reads keep answering 200, and the jobs of the orders in flight are postponed without
//! spending attempts (`--max-attempts 1`: one spent attempt would dead-letter its order). Once
//! the filler is deleted the service takes writes again by itself — the client's retry with the
//! same Idempotency-Key places its order — every accepted order is fulfilled, nothing was logged
//! at ERROR, `orderflow audit` is clean and `PRAGMA integrity_check` says ok.
//!
//! It mounts the tmpfs itself, so it needs root (CAP_SYS_ADMIN); without it, it fails saying so.
//!
//! A read-only file system is not exercised here: Linux refuses to remount a file system
//! read-only while a process holds files on it open for writing (as the database's are), and a
//! file system the kernel forces read-only after an error answers writes with EROFS, which SQLite
//! reports as an I/O error (503 `service_unavailable`). `SQLITE_READONLY` itself (503
//! `database_read_only`) is covered by the classification's unit tests in `src/store/outage.rs`.

mod common;
#[path = "support/server_process.rs"]
mod server_process;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::SendJson;
use serde_json::{Value, json};
use server_process::{Server, cli, token};
use sqlx::Connection;
use tokio::time::Instant;

const SECRET: &str = "disk-full-secret-disk-full-secret-xx";

/// A size-limited tmpfs mounted on a fresh temporary directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount(8)");
        assert!(
            mounted.status.success(),
            "this test mounts a size-limited tmpfs to fill the database's disk, which needs root \
             (CAP_SYS_ADMIN); mount said: {}",
            String::from_utf8_lossy(&mounted.stderr).trim()
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a server killed a moment ago may not have let go of its files yet.
        let _ = Command::new("umount").arg("--lazy").arg(self.dir.path()).status();
    }
}

/// Writes `path` until the file system has no byte left; returns how many it took.
fn fill(path: &Path) -> usize {
    let mut file = std::fs::File::create(path).expect("create the filler file");
    let chunk = vec![0xa5u8; 64 * 1024];
    let mut written = 0;
    loop {
        match file.write(&chunk) {
            Ok(0) => return written,
            Ok(n) => written += n,
            Err(error) if error.kind() == std::io::ErrorKind::StorageFull => return written,
            Err(error) => panic!("writing the filler file: {error}"),
        }
    }
}

async fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "waited {limit:?} for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    base: String,
    buyer: String,
    admin: String,
    product: String,
}

impl Client {
    async fn place(&self, key: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/orders", self.base))
            .bearer_auth(&self.buyer)
            .header("idempotency-key", key)
            .json(&json!({"items": [{"product_id": self.product, "quantity": 1}], "payment": {"token": "tok_visa"}}))
            .send()
            .await
            .expect("orderflow answers")
    }

    async fn create_customer(&self, n: usize) -> reqwest::Response {
        self.http
            .post(format!("{}/customers", self.base))
            .bearer_auth(&self.admin)
            .json(&json!({"email": format!("late{n}@example.com"), "first_name": "L", "last_name": "N"}))
            .send()
            .await
            .expect("orderflow answers")
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.admin)
            .send()
            .await
            .expect("orderflow answers")
    }

    /// Places the order, retrying its key while the answer is a 503; its order id.
    async fn place_until_accepted(&self, key: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let response = self.place(key).await;
            let status = response.status().as_u16();
            let retry_after = response.headers().contains_key("retry-after");
            let body: Value = response.json().await.unwrap_or(Value::Null);
            match status {
                202 => return body["order_id"].as_str().expect("an order id").to_string(),
                503 if retry_after && Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                _ => panic!("order {key}: {status} {body}"),
            }
        }
    }
}

/// A refused write: 503 with `Retry-After` and the given code.
async fn assert_refused(response: reqwest::Response, code: &str, what: &str) {
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").cloned();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!((status, body["code"].as_str()), (503, Some(code)), "{what}: {body}");
    assert!(retry_after.is_some(), "{what}: 503 without Retry-After");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_refuses_writes_with_503_and_recovers_by_itself() {
    let disk = Tmpfs::mount("16m");
    let mail = tempfile::tempdir().unwrap();
    let db_path: PathBuf = disk.path().join("orderflow.db");
    let db_url = format!("sqlite://{}", db_path.display());
    let (server, log) = Server::start_keeping_log(
        &db_url,
        SECRET,
        &[
            "--no-seed",
            "--data-dir",
            disk.path().to_str().unwrap(),
            // E-mails go elsewhere: this test is about the database's disk.
            "--mail-dir",
            mail.path().to_str().unwrap(),
            "--max-attempts",
            "1",
            "--job-lease",
            "3s",
            "--job-backoff",
            "50ms",
            "--job-backoff-max",
            "300ms",
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
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let admin = token(&db_url, SECRET, &["--sub", "ops", "--role", "admin"]).await;
    let base = server.url.clone();
    let product: Value = http
        .post(format!("{base}/products"))
        .bearer_auth(&admin)
        .json(&json!({"name": "Lamp", "price": 5, "stock_quantity": 100000}))
        .send_json()
        .await;
    let customer: Value = http
        .post(format!("{base}/customers"))
        .bearer_auth(&admin)
        .json(&json!({"email": "buyer@example.com", "first_name": "B", "last_name": "Y"}))
        .send_json()
        .await;
    let buyer = token(&db_url, SECRET, &["--sub", customer["customer_id"].as_str().unwrap()]).await;
    let client = Client {
        http,
        base: base.clone(),
        buyer,
        admin,
        product: product["product_id"].as_str().unwrap().to_string(),
    };

    // A burst of orders, then the disk fills while their pipelines run.
    let burst = place_burst(&client, 8).await;
    let filler = disk.path().join("filler");
    let filled = fill(&filler);
    eprintln!("filled the last {} KiB of the tmpfs", filled / 1024);

    // Writes: 503 storage_full with Retry-After, never 500.
    assert_refused(client.place("while-full").await, "storage_full", "POST /orders").await;
    assert_refused(client.create_customer(1).await, "storage_full", "POST /customers").await;
    // Reads keep working.
    let products = client.get("/products").await;
    assert_eq!(products.status().as_u16(), 200, "GET /products while full");
    let earlier = client.get(&format!("/orders/{}", burst[0])).await;
    assert_eq!(earlier.status().as_u16(), 200, "GET /orders/{{id}} while full");
    // Readiness is about reads (see src/http/health.rs): still ready.
    let ready = client.get("/health/ready").await;
    assert_eq!(ready.status().as_u16(), 200, "GET /health/ready while full");
    // The pipeline meets the full disk: a claim is a write, so a job waits unclaimed, and one
    // whose step was running when the disk filled is put back without spending its attempt.
    wait_until(Duration::from_secs(30), "the workers to meet the full disk", || {
        log.lock().unwrap().iter().any(|line| {
            line.contains("step postponed without spending an attempt")
                || (line.contains("claiming jobs failed") && line.contains("storage full"))
        })
    })
    .await;
    assert_refused(client.place("while-full").await, "storage_full", "POST /orders, again").await;

    // Space returns: writes are taken again without a restart.
    std::fs::remove_file(&filler).expect("delete the filler file");
    let mut accepted = burst;
    accepted.push(client.place_until_accepted("while-full").await);
    let created = client.create_customer(1).await;
    assert_eq!(created.status().as_u16(), 201, "POST /customers after space returned");
    for n in 0..4 {
        accepted.push(client.place_until_accepted(&format!("after-{n}")).await);
    }

    // Every accepted order is fulfilled by itself.
    let deadline = Instant::now() + Duration::from_secs(60);
    for order in &accepted {
        loop {
            let body: Value = client.get(&format!("/orders/{order}")).await.json().await.unwrap();
            if body["status"] == "fulfilled" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "order {order} did not reach fulfilled: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    server.kill9().await;
    let lines = log.lock().unwrap().clone();
    let errors: Vec<&String> = lines.iter().filter(|line| line.contains("ERROR")).collect();
    assert!(errors.is_empty(), "orderflow logged errors: {errors:#?}");
    eprintln!(
        "steps postponed: {}, claims refused: {}",
        lines.iter().filter(|l| l.contains("step postponed")).count(),
        lines.iter().filter(|l| l.contains("claiming jobs failed")).count()
    );

    let audit = cli(&db_url, SECRET, &["audit"]).await;
    let mut db = sqlx::SqliteConnection::connect(&db_url)
        .await
        .expect("open the database");
    if !audit.status.success() {
        // The books of both sides, to tell which write the full disk took.
        let books: Vec<(String, String, i64, Option<String>, Option<i64>, Option<String>)> = sqlx::query_as(
            "SELECT p.order_id, p.state, p.captured_minor, i.status, i.captured_minor, \
             (SELECT group_concat(j.kind || ':' || j.state || ':' || j.attempts, ' ') FROM jobs j WHERE j.order_id = p.order_id) \
             FROM payments p LEFT JOIN sandbox_intents i ON i.id = p.provider_ref ORDER BY p.order_id",
        )
        .fetch_all(&mut db)
        .await
        .unwrap();
        panic!(
            "audit after the full disk:\n{}\npayments and intents:\n{books:#?}\nthe server's log:\n{}",
            String::from_utf8_lossy(&audit.stdout),
            log.lock().unwrap().join("\n")
        );
    }
    let (integrity,): (String,) = sqlx::query_as("PRAGMA integrity_check")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(integrity, "ok");
    let (dead,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs WHERE state = 'dead'")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(dead, 0, "no job spent its attempt on the full disk");
    let (orders,): (i64,) = sqlx::query_as("SELECT count(*) FROM orders")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(
        orders as usize,
        accepted.len(),
        "one order per accepted key, none for a refused write"
    );
    db.close().await.unwrap();
}

/// Places `n` orders at once; their ids.
async fn place_burst(client: &Client, n: usize) -> Vec<String> {
    let tasks: Vec<_> = (0..n)
        .map(|k| {
            let client = client.clone();
            tokio::spawn(async move { client.place_until_accepted(&format!("burst-{k}")).await })
        })
        .collect();
    let mut ids = Vec::with_capacity(n);
    for task in tasks {
        ids.push(task.await.expect("a burst order panicked"));
    }
    ids
}
