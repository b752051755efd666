//! `orderflow-chaos`: runs a small orderflow deployment on PostgreSQL, breaks it on purpose for a
//! chosen time while customers, a warehouse and an operator use it, then checks that nothing was
//! lost, done twice or answered with a 500 (issue 13, "A chaos program"; docs/reliability.md).
//!
//! Why: the tests prove each failure alone (a database restart, ten kills, a provider outage);
//! real incidents overlap. This program overlaps them at random, over real processes and real
//! HTTP, for as long as you let it run (`--duration 2m` in CI, `15m` or more by hand).
//!
//! How:
//!
//! 1. **Its own deployment**, never the shared servers: a private PostgreSQL cluster (`initdb` and
//!    `pg_ctl` on a free port, as the `postgres` user when run as root), a private NATS JetStream
//!    server, the sandbox payment provider served over HTTP (`orderflow sandbox-provider`, so it
//!    can go down and its `tok_unavailable` outage can be switched at run time), two `orderflow
//!    serve` processes (API + workers) and one `--mode worker`, with `--fulfilment external`,
//!    short leases and backoffs, and rate limits off. A webhook receiver in this process verifies
//!    every delivery's Standard Webhooks signature and records what arrived.
//! 2. **Load**: `--clients` customers place orders with every sandbox payment method, each
//!    request sent to a random API process and retried with the same `Idempotency-Key` on 503,
//!    on 409 `idempotency_key_in_use` and on transport errors, as a real client would. Each
//!    order follows a plan: shipped at once or in two parcels by the warehouse, refunded in full
//!    or in part after delivery, cancelled before or after payment; 3-D Secure payments are
//!    authenticated at the provider (then Stripe's signed event is posted to
//!    `/webhooks/stripe`), failed, or abandoned until the reservation expires.
//! 3. **Chaos**, every `--chaos-min`..`--chaos-max`: SIGKILL of a random orderflow process (then
//!    restarted), PostgreSQL restarted (`pg_ctl restart -m fast`, or stopped `-m immediate` and
//!    held down for a few seconds), NATS killed and restarted, a `tok_unavailable` outage window,
//!    or the provider process stopped for a window; after each provider window the operator
//!    replays the dead jobs (`orderflow jobs replay --all`, docs/operations.md). Processes that
//!    exit by themselves are restarted and reported.
//! 4. **Settle**: the chaos stops, everything is started healthy, unfinished orders are driven on,
//!    dead jobs are replayed, and the program waits (with `--settle-timeout`) until no job is
//!    ready or running, every order is finished or parked, and NATS and the webhook endpoint have
//!    every event.
//! 5. **Verdicts**: `orderflow audit` clean (with the provider's books); every accepted order
//!    terminal (`fulfilled`, `cancelled`, `refunded`) or parked with a reason (a dead job with an
//!    error) and as its plan implies, its money where its status says, no receipt twice; the
//!    stream holds every event exactly once; the webhook endpoint got every event, every
//!    re-delivery byte for byte the same; no 5xx other than 503, every 503 with `Retry-After`;
//!    no request abandoned; no process died by itself. A summary table is printed; the exit
//!    status is 0 when every verdict holds, 1 otherwise, 2 when the run could not be set up.
//!
//! Build the binaries first (`cargo build --bins`); `--orderflow-bin` defaults to the `orderflow`
//! next to this program.

#[path = "../../tests/support/nats.rs"]
mod nats_server;
#[path = "../../tests/support/private_postgres.rs"]
mod private_postgres;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::body::Bytes;
use axum::http::HeaderMap;
use base64::Engine as _;
use clap::Parser;
use hmac::{Hmac, Mac};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use nats_server::{NatsServer, stream_messages};
use orderflow::config::parse_duration;
use orderflow::events::NATS_CHANNEL;
use orderflow::http::{Authenticator, Secret};
use orderflow::store::Store;
use private_postgres::{PrivatePostgres, StopMode};

const JWT_SECRET: &str = "chaos-program-secret-chaos-program-secret";
const PROVIDER_KEY: &str = "sk_test_orderflow_chaos";
const STRIPE_WEBHOOK_SECRET: &str = "whsec_orderflow_chaos_stripe_events";
const NATS_STREAM: &str = "ORDERFLOW_EVENTS";
/// How long an unpaid order holds its stock: abandoned 3-D Secure payments end this way.
const RESERVATION_TTL: &str = "45s";
/// A client gives a request up (and the run fails) after retrying it this long.
const GIVE_UP_AFTER: Duration = Duration::from_secs(120);
/// How long a client follows one order before it moves on (the settle phase finishes it).
const FOLLOW_AT_MOST: Duration = Duration::from_secs(40);
/// A process that exits this soon after being started failed to start (the database was down).
const START_GRACE: Duration = Duration::from_secs(20);
/// Rounds of `orderflow jobs replay --all` in the settle phase before dead jobs count as parked.
const SETTLE_REPLAYS: u32 = 3;
const PRODUCTS: usize = 5;

/// Every payment method the sandbox knows, weighted by repetition (`tok_visa` most).
const PAYMENT_METHODS: [&str; 11] = [
    "tok_visa",
    "tok_visa",
    "pm_card_visa",
    "tok_timeout",
    "tok_flaky",
    "tok_unavailable",
    "tok_unavailable",
    "tok_chargeDeclined",
    "pm_card_chargeDeclined",
    "tok_threeDSecure",
    "pm_card_threeDSecure2Required",
];

#[derive(Debug, Parser)]
#[command(
    name = "orderflow-chaos",
    version,
    about = "Runs orderflow on a private PostgreSQL and NATS, kills and restarts its parts at random under \
             mixed load, then checks the books, the events and every answer"
)]
struct Args {
    /// How long the chaos lasts (the settle phase and the checks come on top), e.g. 2m, 15m.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    duration: Duration,
    /// Customers placing and following orders at once.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=200))]
    clients: u32,
    /// Shortest pause between two chaos actions.
    #[arg(long, default_value = "4s", value_parser = parse_duration)]
    chaos_min: Duration,
    /// Longest pause between two chaos actions.
    #[arg(long, default_value = "12s", value_parser = parse_duration)]
    chaos_max: Duration,
    /// Longest wait, after the chaos, for the deployment to finish every order.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    settle_timeout: Duration,
    /// Seed of the random choices (printed; a run is not fully repeatable, timing differs).
    #[arg(long)]
    seed: Option<u64>,
    /// The `orderflow` binary. Default: the one next to this program.
    #[arg(long)]
    orderflow_bin: Option<PathBuf>,
    /// Where the processes' logs go (kept). Default: a new directory under the temp dir.
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("orderflow-chaos: starting the runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("orderflow-chaos: {error:#}");
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The deployment: orderflow processes, supervised
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// `orderflow serve` (API and workers) on this port.
    Api(u16),
    /// `orderflow serve --mode worker`.
    Worker,
    /// `orderflow sandbox-provider` on this port.
    Provider(u16),
}

struct Process {
    name: String,
    role: Role,
    child: Option<Child>,
    started: Instant,
}

/// Every orderflow process of the run, how to start each, and what happened to them.
struct Fleet {
    bin: PathBuf,
    logs: PathBuf,
    database_url: String,
    nats_url: String,
    /// Where `orderflow sandbox-provider` listens (the others' `--stripe-api-base`).
    provider_port: u16,
    processes: Vec<Process>,
    /// Processes that exited by themselves after running a while: (name, exit status).
    crashes: Vec<(String, String)>,
    /// Processes that exited within [`START_GRACE`] (a start while the database was down).
    failed_starts: u64,
}

impl Fleet {
    /// The settings every `orderflow` process of the run shares: this run's database, secret and
    /// provider, fast retries and leases, events to NATS, rate limits off (the subject is
    /// recovery, not admission).
    fn orderflow(&self) -> Command {
        let mut command = Command::new(&self.bin);
        command
            .args(["--database-url", &self.database_url])
            .arg("--data-dir")
            .arg(self.logs.join("data"))
            .args(["--jwt-secret", JWT_SECRET, "--no-seed", "--db-max-connections", "8"])
            .args(["--payment-provider", "stripe", "--stripe-secret-key", PROVIDER_KEY])
            .args(["--stripe-api-base", &format!("http://127.0.0.1:{}", self.provider_port)])
            .args([
                "--payment-timeout",
                "3s",
                "--stripe-webhook-secret",
                STRIPE_WEBHOOK_SECRET,
            ])
            .args(["--fulfilment", "external", "--reservation-ttl", RESERVATION_TTL])
            .args(["--max-attempts", "5", "--job-lease", "2s", "--job-poll", "500ms"])
            .args([
                "--job-backoff",
                "200ms",
                "--job-backoff-max",
                "2s",
                "--shutdown-timeout",
                "5s",
            ])
            .args(["--nats-url", &self.nats_url, "--nats-stream", NATS_STREAM])
            .args([
                "--events-poll",
                "100ms",
                "--events-channel-lease",
                "3s",
                "--webhook-timeout",
                "3s",
            ])
            .args(["--webhook-retry-schedule", "0s,100ms,500ms,1s,2s,2s,2s,2s,2s,2s"])
            .args(["--rate-limit-writes", "off", "--rate-limit-reads", "off"])
            .args(["--rate-limit-admin", "off", "--rate-limit-catalog", "off"])
            .env("ORDERFLOW_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    fn api_ports(&self) -> Vec<u16> {
        self.processes
            .iter()
            .filter_map(|process| match process.role {
                Role::Api(port) => Some(port),
                _ => None,
            })
            .collect()
    }

    fn spawn(&mut self, index: usize) -> anyhow::Result<()> {
        let mut command = self.orderflow();
        let process = &self.processes[index];
        match process.role {
            Role::Api(port) => command.args(["serve", "--listen", &format!("127.0.0.1:{port}")]),
            Role::Worker => command.args(["serve", "--mode", "worker"]),
            Role::Provider(port) => command.args([
                "sandbox-provider",
                "--provider-listen",
                &format!("127.0.0.1:{port}"),
                "--api-key",
                PROVIDER_KEY,
                "--timeout-answer-delay",
                "5s",
                "--no-outage",
            ]),
        };
        let log_path = self.logs.join(format!("{}.log", process.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        command.stdout(log.try_clone()?).stderr(log);
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let process = &mut self.processes[index];
        process.child = Some(child);
        process.started = Instant::now();
        Ok(())
    }

    fn start_all(&mut self) -> anyhow::Result<()> {
        for index in 0..self.processes.len() {
            if self.processes[index].child.is_none() {
                self.spawn(index)?;
            }
        }
        Ok(())
    }

    /// SIGKILL, like a crash (or the OOM killer); waits until it is gone.
    async fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.processes[index].child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Restarts every process that exited by itself, noting whether it failed to start or died
    /// while running.
    fn restart_exited(&mut self) -> anyhow::Result<()> {
        for index in 0..self.processes.len() {
            let process = &mut self.processes[index];
            let Some(child) = process.child.as_mut() else {
                continue;
            };
            if let Ok(Some(status)) = child.try_wait() {
                process.child = None;
                if process.started.elapsed() < START_GRACE {
                    self.failed_starts += 1;
                } else {
                    self.crashes.push((process.name.clone(), status.to_string()));
                }
                self.spawn(index)?;
            }
        }
        Ok(())
    }

    /// Waits until every API process answers `/health/ready` with 200 and the provider its
    /// `/health`, restarting whatever exits meanwhile.
    async fn wait_healthy(&mut self, http: &reqwest::Client, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            self.restart_exited()?;
            let mut healthy = true;
            for process in &self.processes {
                let url = match process.role {
                    Role::Api(port) => format!("http://127.0.0.1:{port}/health/ready"),
                    Role::Provider(port) => format!("http://127.0.0.1:{port}/health"),
                    Role::Worker => continue,
                };
                let ok = http
                    .get(&url)
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|response| response.status() == 200);
                healthy &= ok;
            }
            if healthy {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the processes were not healthy within {within:?} (logs in {})",
                    self.logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs a one-shot `orderflow` command (audit, jobs replay) against the run's database.
    async fn run_command(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let mut command = self.orderflow();
        command.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        command
            .output()
            .await
            .with_context(|| format!("running orderflow {}", args.join(" ")))
    }

    /// ERROR lines in the processes' logs (shown in the summary; the verdicts come from answers
    /// and books).
    fn error_log_lines(&self) -> usize {
        self.processes
            .iter()
            .map(|process| {
                std::fs::read_to_string(self.logs.join(format!("{}.log", process.name)))
                    .map(|text| text.lines().filter(|line| line.contains(" ERROR ")).count())
                    .unwrap_or(0)
            })
            .sum()
    }
}

// ---------------------------------------------------------------------------------------------
// What the clients saw
// ---------------------------------------------------------------------------------------------

/// Every answer orderflow gave, and the requests it never answered.
#[derive(Default)]
struct Answers {
    statuses: Mutex<BTreeMap<u16, u64>>,
    /// `(status, code)` of 4xx answers, for the summary.
    client_errors: Mutex<BTreeMap<(u16, String), u64>>,
    transport_errors: AtomicU64,
    unavailable_without_retry_after: AtomicU64,
    /// Requests still unanswered (only 503s or transport errors) after [`GIVE_UP_AFTER`].
    abandoned: AtomicU64,
    /// The first answers that break a verdict.
    samples: Mutex<Vec<String>>,
}

impl Answers {
    fn sample(&self, text: String) {
        let mut samples = self.samples.lock().unwrap();
        if samples.len() < 10 {
            samples.push(text);
        }
    }

    fn server_errors(&self) -> u64 {
        let statuses = self.statuses.lock().unwrap();
        statuses
            .iter()
            .filter(|(s, _)| **s >= 500 && **s != 503)
            .map(|(_, n)| n)
            .sum()
    }
}

/// The chaos counters for the summary.
#[derive(Default)]
struct ChaosTally {
    kills: u64,
    postgres_fast_restarts: u64,
    postgres_crash_restarts: u64,
    nats_restarts: u64,
    outage_windows: u64,
    provider_down_windows: u64,
    replays: u64,
    replayed_jobs: u64,
}

/// A definitive answer: the status and the JSON body (`Null` when there is none).
struct Answer {
    status: u16,
    body: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
}

/// The service as a client sees it: a random API process per request, retried the way a real
/// client retries.
struct Api {
    http: reqwest::Client,
    bases: Vec<String>,
    provider: String,
    answers: Answers,
}

impl Api {
    fn base(&self) -> &str {
        &self.bases[rand::rng().random_range(0..self.bases.len())]
    }

    /// Sends until a definitive answer: 503, 409 `idempotency_key_in_use` and transport errors are
    /// retried (with the same key) for up to [`GIVE_UP_AFTER`]. Every answer is counted.
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: &str,
        key: Option<&str>,
        body: Option<&Value>,
        prefer_wait: Option<u32>,
    ) -> Option<Answer> {
        let deadline = Instant::now() + GIVE_UP_AFTER;
        loop {
            let mut request = self
                .http
                .request(method.clone(), format!("{}{path}", self.base()))
                .bearer_auth(token);
            if let Some(key) = key {
                request = request.header("Idempotency-Key", key);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            if let Some(wait) = prefer_wait {
                request = request.header("Prefer", format!("wait={wait}"));
            }
            let mut pause = Duration::from_millis(200);
            match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    *self.answers.statuses.lock().unwrap().entry(status).or_default() += 1;
                    let retry_after = response.headers().get("retry-after").cloned();
                    let text = response.text().await.unwrap_or_default();
                    let answer = Answer {
                        status,
                        body: serde_json::from_str(&text).unwrap_or(Value::Null),
                    };
                    if (400..500).contains(&status) {
                        *self
                            .answers
                            .client_errors
                            .lock()
                            .unwrap()
                            .entry((status, answer.code().to_string()))
                            .or_default() += 1;
                    }
                    match status {
                        503 => {
                            let seconds = retry_after
                                .as_ref()
                                .and_then(|value| value.to_str().ok()?.trim().parse::<u64>().ok());
                            match seconds {
                                Some(seconds) => pause = Duration::from_secs(seconds.min(2)),
                                None => {
                                    self.answers
                                        .unavailable_without_retry_after
                                        .fetch_add(1, Ordering::Relaxed);
                                    self.answers
                                        .sample(format!("503 without Retry-After: {method} {path}: {text:.300}"));
                                }
                            }
                        }
                        409 if answer.code() == "idempotency_key_in_use" => {}
                        500.. => {
                            self.answers.sample(format!("{status} on {method} {path}: {text:.300}"));
                            return Some(answer);
                        }
                        _ => return Some(answer),
                    }
                }
                Err(_) => {
                    self.answers.transport_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            if Instant::now() > deadline {
                self.answers.abandoned.fetch_add(1, Ordering::Relaxed);
                self.answers.sample(format!(
                    "{method} {path}: no definitive answer within {GIVE_UP_AFTER:?}"
                ));
                return None;
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// A call to the payment provider as the customer's browser makes it (not counted: it is not
    /// orderflow answering). Retried while the provider is down.
    async fn provider_post(&self, path: &str, body: &Value) -> Option<u16> {
        let deadline = Instant::now() + GIVE_UP_AFTER;
        loop {
            let sent = self
                .http
                .post(format!("{}{path}", self.provider))
                .json(body)
                .send()
                .await;
            match sent {
                Ok(response) if response.status() != 503 => return Some(response.status().as_u16()),
                _ if Instant::now() > deadline => return None,
                _ => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    }

    /// Posts Stripe's signed event about a PaymentIntent to `/webhooks/stripe`, retried like
    /// Stripe retries (any non-2xx).
    async fn stripe_event(&self, kind: &str, intent: &str, order: &str, status: &str) -> bool {
        let payload = json!({
            "id": format!("evt_{}", uuid::Uuid::now_v7().simple()),
            "object": "event",
            "api_version": "2025-10-29.clover",
            "created": chrono::Utc::now().timestamp(),
            "livemode": false,
            "type": kind,
            "data": { "object": {
                "id": intent, "object": "payment_intent", "status": status, "capture_method": "manual",
                "metadata": { "order_id": order },
            } },
        })
        .to_string();
        let deadline = Instant::now() + GIVE_UP_AFTER;
        loop {
            let t = chrono::Utc::now().timestamp();
            let mut mac = Hmac::<Sha256>::new_from_slice(STRIPE_WEBHOOK_SECRET.as_bytes()).expect("any key length");
            mac.update(format!("{t}.{payload}").as_bytes());
            let signature = format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()));
            let sent = self
                .http
                .post(format!("{}/webhooks/stripe", self.base()))
                .header("content-type", "application/json")
                .header("stripe-signature", signature)
                .body(payload.clone())
                .send()
                .await;
            match sent {
                Ok(response) => {
                    let status = response.status().as_u16();
                    *self.answers.statuses.lock().unwrap().entry(status).or_default() += 1;
                    if status == 200 {
                        return true;
                    }
                    if status >= 500 && status != 503 {
                        let text = response.text().await.unwrap_or_default();
                        self.answers
                            .sample(format!("{status} on POST /webhooks/stripe: {text:.300}"));
                    }
                }
                Err(_) => {
                    self.answers.transport_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            if Instant::now() > deadline {
                self.answers.abandoned.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Orders and what their customers, the warehouse and the operator do with them
// ---------------------------------------------------------------------------------------------

/// What happens to an order after it is placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// The warehouse ships everything in one parcel.
    Ship,
    /// Two parcels: one unit first, the rest after.
    ShipInTwoParcels,
    /// Shipped, then refunded in full.
    ShipThenRefundAll,
    /// Shipped, then 1.00 refunded.
    ShipThenRefundPart,
    /// The customer cancels at once (usually before payment).
    CancelAtOnce,
    /// The customer cancels once it is paid, before anything shipped.
    CancelWhenPaid,
}

const PLANS: [(Plan, u32); 6] = [
    (Plan::Ship, 35),
    (Plan::ShipInTwoParcels, 15),
    (Plan::ShipThenRefundAll, 10),
    (Plan::ShipThenRefundPart, 10),
    (Plan::CancelAtOnce, 15),
    (Plan::CancelWhenPaid, 15),
];

/// What the customer does when the bank asks for 3-D Secure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Authentication {
    Succeed,
    Fail,
    /// Never comes back: the reservation expires.
    Abandon,
}

/// One accepted order and what was done with it.
#[derive(Clone, Debug)]
struct Tracked {
    id: String,
    method: &'static str,
    plan: Plan,
    authentication: Authentication,
    customer: usize,
    /// 3-D Secure answered (or abandoned).
    authenticated: bool,
    cancelled: bool,
    refund_requested: bool,
    /// The status the actions answered so far imply.
    expected: Option<&'static str>,
    /// Finished, as far as the customer, warehouse and operator are concerned.
    done: bool,
    /// Waiting on a dead job (the settle phase replays those).
    parked: bool,
}

/// The world the clients act in.
struct Shop {
    api: Api,
    admin: String,
    warehouse: String,
    customers: Vec<(String, String)>,
    products: Vec<String>,
    placed: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    stop: AtomicBool,
}

fn is_declined(method: &str) -> bool {
    matches!(method, "tok_chargeDeclined" | "pm_card_chargeDeclined")
}

impl Shop {
    /// Places one order (retried with its key until answered); `None` when it was refused.
    async fn place(&self, rng: &mut SmallRng, key: &str) -> Option<Tracked> {
        let method = PAYMENT_METHODS[rng.random_range(0..PAYMENT_METHODS.len())];
        let plan = pick_plan(rng);
        let authentication = match rng.random_range(0..4) {
            0 | 1 => Authentication::Succeed,
            2 => Authentication::Fail,
            _ => Authentication::Abandon,
        };
        let customer = rng.random_range(0..self.customers.len());
        let lines = rng.random_range(1..=2);
        let items: Vec<Value> = rand::seq::index::sample(rng, self.products.len(), lines)
            .iter()
            .map(|index| json!({ "product_id": self.products[index], "quantity": rng.random_range(1..=3) }))
            .collect();
        let payment = if method.starts_with("pm_") {
            json!({ "method": method })
        } else {
            json!({ "token": method })
        };
        let body = json!({ "items": items, "payment": payment });
        self.placed.fetch_add(1, Ordering::Relaxed);
        let answer = self
            .api
            .send(
                Method::POST,
                "/orders",
                &self.customers[customer].1,
                Some(key),
                Some(&body),
                None,
            )
            .await?;
        if answer.status != 202 {
            self.refused.fetch_add(1, Ordering::Relaxed);
            self.api
                .answers
                .sample(format!("POST /orders refused: {} {}", answer.status, answer.body));
            return None;
        }
        self.accepted.fetch_add(1, Ordering::Relaxed);
        Some(Tracked {
            id: answer.body["order_id"].as_str()?.to_string(),
            method,
            plan,
            authentication,
            customer,
            authenticated: false,
            cancelled: false,
            refund_requested: false,
            expected: is_declined(method).then_some("cancelled"),
            done: false,
            parked: false,
        })
    }

    async fn view(&self, order: &Tracked, prefer_wait: Option<u32>) -> Option<Value> {
        let path = format!("/orders/{}", order.id);
        let answer = self
            .api
            .send(Method::GET, &path, &self.admin, None, None, prefer_wait)
            .await?;
        (answer.status == 200).then_some(answer.body)
    }

    /// Looks at the order as it stands and does the next thing its plan calls for (at most one
    /// request); marks it done or parked.
    async fn advance(&self, order: &mut Tracked, view: &Value) {
        let status = view["status"].as_str().unwrap_or("");
        let pending_steps = view["pending_steps"].as_array().cloned().unwrap_or_default();
        order.parked = pending_steps.iter().any(|step| step["state"] == "dead");
        let has_timeline = |kind: &str| {
            view["timeline"]
                .as_array()
                .is_some_and(|timeline| timeline.iter().any(|entry| entry["kind"] == kind))
        };
        let path = |tail: &str| format!("/orders/{}/{tail}", order.id);
        match status {
            "cancelled" | "refunded" => order.done = pending_steps.is_empty(),
            "fulfilled" => {
                let refund = match order.plan {
                    Plan::ShipThenRefundAll => Some((json!({ "reason": "returned" }), "refunded")),
                    Plan::ShipThenRefundPart => Some((
                        json!({ "amount": "1.00".parse::<serde_json::Number>().expect("a number"),
                                "reason": "damaged" }),
                        "fulfilled",
                    )),
                    _ => None,
                };
                match refund {
                    Some((body, then)) if !order.refund_requested => {
                        let key = format!("refund-{}", order.id);
                        let answer = self
                            .api
                            .send(
                                Method::POST,
                                &path("refunds"),
                                &self.admin,
                                Some(&key),
                                Some(&body),
                                None,
                            )
                            .await;
                        if let Some(answer) = answer {
                            if answer.status == 202 {
                                order.refund_requested = true;
                                order.expected = Some(then);
                            } else {
                                self.api.answers.sample(format!(
                                    "refund of {} answered {} {}",
                                    order.id, answer.status, answer.body
                                ));
                                order.refund_requested = true;
                            }
                        }
                    }
                    _ => {
                        let settling = view["refunds"]
                            .as_array()
                            .is_some_and(|refunds| refunds.iter().any(|refund| refund["state"] == "pending"));
                        order.done = !settling && pending_steps.is_empty();
                    }
                }
            }
            "paid" if order.plan == Plan::CancelWhenPaid && !order.cancelled => {
                self.cancel(order).await;
            }
            "paid" if has_timeline("inventory_committed") && !order.cancelled => {
                let parcels = view["shipments"].as_array().map_or(0, Vec::len);
                let units: u64 = view["items"]
                    .as_array()
                    .map(|items| items.iter().filter_map(|item| item["quantity"].as_u64()).sum())
                    .unwrap_or(0);
                let shipped: u64 = view["shipments"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|shipment| shipment["items"].as_array().cloned().unwrap_or_default())
                    .filter_map(|item| item["quantity"].as_u64())
                    .sum();
                if shipped >= units {
                    // Everything left; the fulfilment step has yet to mark it fulfilled.
                    return;
                }
                let mut body =
                    json!({ "carrier": "chaos-post", "tracking_number": format!("CP{}-{parcels}", order.id) });
                if order.plan == Plan::ShipInTwoParcels && parcels == 0 && units > 1 {
                    body["items"] = json!([{ "product_id": view["items"][0]["product_id"], "quantity": 1 }]);
                }
                let key = format!("ship-{}-{parcels}", order.id);
                let answer = self
                    .api
                    .send(
                        Method::POST,
                        &path("shipments"),
                        &self.warehouse,
                        Some(&key),
                        Some(&body),
                        None,
                    )
                    .await;
                if let Some(answer) = answer
                    && answer.status == 201
                    && body.get("items").is_none()
                    && order.expected.is_none()
                {
                    order.expected = Some("fulfilled");
                }
            }
            "pending_payment" if order.plan == Plan::CancelAtOnce && !order.cancelled => {
                self.cancel(order).await;
            }
            "pending_payment"
                if view["payment"]["state"] == "requires_action" && !order.authenticated && !order.cancelled =>
            {
                self.authenticate(order, &view["payment"]).await;
            }
            _ => {}
        }
    }

    async fn cancel(&self, order: &mut Tracked) {
        let path = format!("/orders/{}/cancel", order.id);
        let token = self.customers[order.customer].1.clone();
        if let Some(answer) = self.api.send(Method::POST, &path, &token, None, None, None).await {
            order.cancelled = true;
            if answer.status == 202 {
                order.expected = Some("cancelled");
            }
        }
    }

    /// The customer at the bank's 3-D Secure page, then Stripe's event to the shop.
    async fn authenticate(&self, order: &mut Tracked, payment: &Value) {
        order.authenticated = true;
        let success = match order.authentication {
            Authentication::Abandon => {
                order.expected = Some("cancelled");
                return;
            }
            Authentication::Succeed => true,
            Authentication::Fail => false,
        };
        let (Some(intent), Some(client_secret)) = (
            payment["provider_reference"].as_str(),
            payment["client_secret"].as_str(),
        ) else {
            self.api.answers.sample(format!(
                "order {} requires action without intent or client secret: {payment}",
                order.id
            ));
            return;
        };
        let body = json!({ "key": "pk_test_orderflow_chaos", "client_secret": client_secret });
        let path = format!("/v1/payment_intents/{intent}/_authenticate?success={success}");
        if self.api.provider_post(&path, &body).await.is_none() {
            return;
        }
        let (kind, status) = if success {
            ("payment_intent.amount_capturable_updated", "requires_capture")
        } else {
            ("payment_intent.payment_failed", "requires_payment_method")
        };
        if self.api.stripe_event(kind, intent, &order.id, status).await && !success {
            order.expected = Some("cancelled");
        }
    }

    /// Follows an order (long-polling its view) until it is done or parked, or for at most
    /// [`FOLLOW_AT_MOST`].
    async fn follow(&self, order: &mut Tracked) {
        let started = Instant::now();
        while !order.done && started.elapsed() < FOLLOW_AT_MOST && !self.stop.load(Ordering::Relaxed) {
            let Some(view) = self.view(order, Some(2)).await else {
                return;
            };
            self.advance(order, &view).await;
            if order.parked {
                return;
            }
        }
    }
}

fn pick_plan(rng: &mut SmallRng) -> Plan {
    let total: u32 = PLANS.iter().map(|(_, weight)| weight).sum();
    let mut ticket = rng.random_range(0..total);
    for (plan, weight) in PLANS {
        if ticket < weight {
            return plan;
        }
        ticket -= weight;
    }
    Plan::Ship
}

/// One customer: places an order, follows it, and again, until the chaos ends.
async fn client(shop: Arc<Shop>, index: u32, seed: u64, run_id: String) -> Vec<Tracked> {
    let mut rng = SmallRng::seed_from_u64(seed ^ (u64::from(index) << 32));
    let mut orders = Vec::new();
    let mut number = 0u64;
    while !shop.stop.load(Ordering::Relaxed) {
        number += 1;
        let key = format!("chaos-{run_id}-{index}-{number}");
        if let Some(mut order) = shop.place(&mut rng, &key).await {
            shop.follow(&mut order).await;
            orders.push(order);
        }
    }
    orders
}

// ---------------------------------------------------------------------------------------------
// The webhook endpoint
// ---------------------------------------------------------------------------------------------

/// How often one event (`webhook-id`) arrived, and whether always with the same bytes.
struct Arrival {
    count: u64,
    first_body_sha256: [u8; 32],
    later_body_differed: bool,
}

/// What arrived at the webhook endpoint, per `webhook-id`.
#[derive(Default)]
struct Deliveries {
    secret: Mutex<Vec<u8>>,
    arrivals: Mutex<HashMap<String, Arrival>>,
    bad_signatures: AtomicU64,
}

async fn receive_webhook(
    axum::extract::State(deliveries): axum::extract::State<Arc<Deliveries>>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::http::StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (id, timestamp, signatures) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(&deliveries.secret.lock().unwrap()).expect("any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(&body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let verified = signatures
        .split(' ')
        .any(|signature| signature.strip_prefix("v1,") == Some(expected.as_str()));
    if !verified {
        deliveries.bad_signatures.fetch_add(1, Ordering::Relaxed);
        return axum::http::StatusCode::UNAUTHORIZED;
    }
    let digest: [u8; 32] = Sha256::digest(&body).into();
    let mut arrivals = deliveries.arrivals.lock().unwrap();
    let arrival = arrivals.entry(id).or_insert(Arrival {
        count: 0,
        first_body_sha256: digest,
        later_body_differed: false,
    });
    arrival.count += 1;
    arrival.later_body_differed |= arrival.first_body_sha256 != digest;
    axum::http::StatusCode::NO_CONTENT
}

async fn start_webhook_receiver(deliveries: Arc<Deliveries>) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hooks/orderflow", listener.local_addr()?);
    let app = axum::Router::new()
        .route("/hooks/orderflow", axum::routing::post(receive_webhook))
        .with_state(deliveries);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(url)
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free localhost port")
}

async fn run(args: Args) -> anyhow::Result<bool> {
    if args.chaos_min > args.chaos_max {
        bail!("--chaos-min must not exceed --chaos-max");
    }
    let bin = match &args.orderflow_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?.with_file_name("orderflow"),
    };
    if !bin.is_file() {
        bail!(
            "{} not found: build it (cargo build --bins) or pass --orderflow-bin",
            bin.display()
        );
    }
    let seed = args.seed.unwrap_or_else(|| rand::rng().random());
    let run_id = uuid::Uuid::now_v7().simple().to_string()[20..].to_string();
    let logs = match &args.work_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("orderflow-chaos-{run_id}")),
    };
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    println!(
        "orderflow-chaos: {:?} of chaos, {} clients, seed {seed}; logs in {}",
        args.duration,
        args.clients,
        logs.display()
    );

    // ---- The deployment ----
    let postgres = Arc::new(tokio::task::spawn_blocking(PrivatePostgres::start).await?);
    let mut nats = tokio::task::spawn_blocking(NatsServer::start).await?;
    let mut fleet = Fleet {
        bin,
        logs: logs.clone(),
        database_url: postgres.url(),
        nats_url: nats.url(),
        provider_port: free_port(),
        processes: Vec::new(),
        crashes: Vec::new(),
        failed_starts: 0,
    };
    let migrated = fleet.run_command(&["migrate"]).await?;
    if !migrated.status.success() {
        bail!(
            "orderflow migrate failed: {}",
            String::from_utf8_lossy(&migrated.stderr)
        );
    }
    let roles = [
        ("provider", Role::Provider(fleet.provider_port)),
        ("api-1", Role::Api(free_port())),
        ("api-2", Role::Api(free_port())),
        ("worker", Role::Worker),
    ];
    for (name, role) in roles {
        fleet.processes.push(Process {
            name: name.to_string(),
            role,
            child: None,
            started: Instant::now(),
        });
    }
    fleet.start_all()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .pool_max_idle_per_host(64)
        .build()?;
    fleet.wait_healthy(&http, Duration::from_secs(60)).await?;

    let auth = Authenticator::hs256(&Secret::new(JWT_SECRET.as_bytes().to_vec()));
    let day = Duration::from_secs(86_400);
    let admin = auth.issue("chaos-operator", &["admin".into()], day)?;
    let warehouse = auth.issue("chaos-warehouse", &["fulfilment".into()], day)?;
    let bases: Vec<String> = fleet
        .api_ports()
        .iter()
        .map(|port| format!("http://127.0.0.1:{port}"))
        .collect();
    let api = Api {
        http: http.clone(),
        bases: bases.clone(),
        provider: format!("http://127.0.0.1:{}", fleet.provider_port),
        answers: Answers::default(),
    };

    // Catalog, customers and the webhook endpoint (set-up answers are not part of the tally).
    let setup = |path: &str, body: Value| {
        let request = http.post(format!("{}{path}", bases[0])).bearer_auth(&admin).json(&body);
        async move {
            let response = request.send().await?;
            let status = response.status();
            let body: Value = response.json().await?;
            if status != 201 {
                bail!("set-up POST answered {status}: {body}");
            }
            Ok::<Value, anyhow::Error>(body)
        }
    };
    let mut products = Vec::new();
    for index in 0..PRODUCTS {
        let body = json!({ "name": format!("Chaos product {index}"), "price": 5 + index as u64 * 3,
                           "stock_quantity": 10_000_000 });
        products.push(
            setup("/products", body).await?["product_id"]
                .as_str()
                .context("product_id")?
                .to_string(),
        );
    }
    let mut customers = Vec::new();
    for index in 0..args.clients.max(4) {
        let body = json!({ "email": format!("chaos-{run_id}-{index}@example.com"), "first_name": "Chaos",
                           "last_name": format!("Customer{index}") });
        let id = setup("/customers", body).await?["customer_id"]
            .as_str()
            .context("customer_id")?
            .to_string();
        let token = auth.issue(&id, &[], day)?;
        customers.push((id, token));
    }
    let deliveries = Arc::new(Deliveries::default());
    let receiver_url = start_webhook_receiver(deliveries.clone()).await?;
    let endpoint = setup(
        "/admin/webhook-endpoints",
        json!({ "url": receiver_url, "description": "chaos receiver", "enabled_events": ["*"] }),
    )
    .await?;
    let endpoint_id: uuid::Uuid = endpoint["endpoint_id"].as_str().context("endpoint_id")?.parse()?;
    let endpoint_secret = endpoint["secret"].as_str().context("secret")?;
    *deliveries.secret.lock().unwrap() = base64::engine::general_purpose::STANDARD
        .decode(endpoint_secret.trim_start_matches("whsec_"))
        .context("the endpoint secret is whsec_ + base64")?;

    let shop = Arc::new(Shop {
        api,
        admin,
        warehouse,
        customers,
        products,
        placed: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });

    // ---- Load and chaos ----
    let started = Instant::now();
    let clients: Vec<_> = (0..args.clients)
        .map(|index| tokio::spawn(client(shop.clone(), index, seed, run_id.clone())))
        .collect();
    let mut tally = ChaosTally::default();
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut journal = String::new();
    let chaos_ends = started + args.duration;
    while Instant::now() < chaos_ends {
        let pause = rng.random_range(args.chaos_min..=args.chaos_max);
        let wake = (Instant::now() + pause).min(chaos_ends);
        while Instant::now() < wake {
            fleet.restart_exited()?;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if Instant::now() >= chaos_ends {
            break;
        }
        let action = chaos_action(&mut fleet, &postgres, &mut nats, &http, &mut tally, &mut rng).await?;
        let _ = writeln!(journal, "{:>7.1}s  {action}", started.elapsed().as_secs_f64());
        eprintln!(
            "  {:>7.1}s  {action} ({} orders accepted)",
            started.elapsed().as_secs_f64(),
            shop.accepted.load(Ordering::Relaxed)
        );
    }
    let chaos_lasted = started.elapsed();
    shop.stop.store(true, Ordering::Relaxed);
    let mut orders = Vec::new();
    for client in clients {
        orders.extend(client.await.context("a client panicked")?);
    }

    // ---- Settle ----
    eprintln!("chaos over after {chaos_lasted:.0?}: settling {} orders", orders.len());
    let settle_started = Instant::now();
    fleet.wait_healthy(&http, Duration::from_secs(60)).await?;
    let _ = http
        .post(format!("http://127.0.0.1:{}/v1/sandbox/outage", fleet.provider_port))
        .bearer_auth(PROVIDER_KEY)
        .json(&json!({ "active": false }))
        .send()
        .await;
    let store = orderflow::store::connect(&postgres.url(), &Default::default())
        .await
        .context("opening the run's database")?;
    let settled = settle(
        &shop,
        &mut fleet,
        store.as_ref(),
        endpoint_id,
        &mut orders,
        &mut tally,
        &args,
    )
    .await?;
    let settle_lasted = settle_started.elapsed();

    // ---- Verdicts ----
    let mut verdicts: Vec<(String, bool, String)> = Vec::new();
    verdicts.push((
        "settled".into(),
        settled.is_ok(),
        settled
            .err()
            .unwrap_or_else(|| format!("quiescent {settle_lasted:.0?} after the chaos")),
    ));
    let audit = fleet.run_command(&["audit", "--json"]).await?;
    let report: Value = serde_json::from_slice(&audit.stdout).unwrap_or(Value::Null);
    let violations = report["violations"].as_array().cloned().unwrap_or_default();
    verdicts.push((
        "orderflow audit".into(),
        audit.status.success(),
        if audit.status.success() {
            let checks = report["checks"].as_array().map_or(0, Vec::len);
            format!("{checks} checks clean (the provider's books included)")
        } else if violations.is_empty() {
            format!("could not run: {}", String::from_utf8_lossy(&audit.stderr).trim())
        } else {
            violations
                .iter()
                .map(|v| {
                    format!(
                        "{} {}: found {}, expected {}",
                        v["check"], v["subject"], v["found"], v["expected"]
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        },
    ));
    let mut explanations = Vec::new();
    for violation in violations.iter().take(5) {
        if let Some(order) = violation["subject"].as_str() {
            explanations.push(explain_order(&shop, &postgres.url(), order).await);
        }
    }

    let outcomes = check_orders(&shop, &orders, &postgres.url()).await?;
    verdicts.extend(outcomes.verdicts.clone());

    let event_ids: HashSet<String> = {
        let mut connection = sqlx_connect(&postgres.url()).await?;
        sqlx::query_scalar::<_, String>("SELECT id::text FROM events")
            .fetch_all(&mut connection)
            .await?
            .into_iter()
            .collect()
    };
    // The reader panics when the stream cannot be read (e.g. it is gone): a failed verdict here.
    let nats_url = nats.url();
    let stream = tokio::spawn(async move { stream_messages(&nats_url, NATS_STREAM).await })
        .await
        .unwrap_or_default();
    let stream_ids: Vec<&str> = stream.iter().map(|message| message.msg_id.as_str()).collect();
    let distinct: HashSet<&str> = stream_ids.iter().copied().collect();
    let mismatched_ids = stream
        .iter()
        .filter(|m| m.body["id"].as_str() != Some(m.msg_id.as_str()))
        .count();
    let missing_on_nats = event_ids.iter().filter(|id| !distinct.contains(id.as_str())).count();
    verdicts.push((
        "NATS: each event exactly once".into(),
        distinct.len() == stream_ids.len() && missing_on_nats == 0 && mismatched_ids == 0,
        format!(
            "{} messages, {} distinct ids, {} events in the database, {missing_on_nats} missing, {mismatched_ids} \
             with a body id other than Nats-Msg-Id",
            stream_ids.len(),
            distinct.len(),
            event_ids.len()
        ),
    ));
    let (received, redelivered, differing) = {
        let arrivals = deliveries.arrivals.lock().unwrap();
        let redelivered: u64 = arrivals.values().map(|arrival| arrival.count - 1).sum();
        let differing = arrivals.values().filter(|arrival| arrival.later_body_differed).count();
        let received: HashSet<String> = arrivals.keys().cloned().collect();
        (received, redelivered, differing)
    };
    let missing_on_webhook = event_ids.difference(&received).count();
    let bad_signatures = deliveries.bad_signatures.load(Ordering::Relaxed);
    verdicts.push((
        "webhook: every event, re-sends identical".into(),
        missing_on_webhook == 0 && differing == 0 && bad_signatures == 0,
        format!(
            "{} event ids received, {missing_on_webhook} missing, {redelivered} re-deliveries (at least once, \
             docs/events.md), {differing} re-sent with other bytes, {bad_signatures} bad signatures",
            received.len()
        ),
    ));

    let answers = &shop.api.answers;
    let server_errors = answers.server_errors();
    let without_retry_after = answers.unavailable_without_retry_after.load(Ordering::Relaxed);
    verdicts.push((
        "no 5xx but 503, 503 with Retry-After".into(),
        server_errors == 0 && without_retry_after == 0,
        format!("{server_errors} other 5xx, {without_retry_after} 503 without Retry-After"),
    ));
    let abandoned = answers.abandoned.load(Ordering::Relaxed);
    verdicts.push((
        "every request answered in time".into(),
        abandoned == 0,
        format!("{abandoned} given up after {GIVE_UP_AFTER:?} of retries"),
    ));
    verdicts.push((
        "no process died by itself".into(),
        fleet.crashes.is_empty(),
        if fleet.crashes.is_empty() {
            format!(
                "{} starts failed while the database was down (restarted)",
                fleet.failed_starts
            )
        } else {
            fleet
                .crashes
                .iter()
                .map(|(name, status)| format!("{name}: {status}"))
                .collect::<Vec<_>>()
                .join(", ")
        },
    ));

    // ---- Summary ----
    let error_lines = fleet.error_log_lines();
    for index in 0..fleet.processes.len() {
        fleet.kill(index).await;
    }
    let row = |name: &str, value: String| println!("| {name:<38} | {value} |");
    println!("\nJournal of the chaos:\n{journal}");
    row("orderflow-chaos", format!("seed {seed}"));
    println!("|{:-<40}|{:-<50}|", "", "");
    row(
        "chaos duration",
        format!("{:.0?} (+ {settle_lasted:.0?} settling)", chaos_lasted),
    );
    row(
        "processes",
        "2 × serve (API + workers), 1 × worker, 1 × sandbox-provider".into(),
    );
    row("SIGKILLs (then restarted)", tally.kills.to_string());
    row(
        "PostgreSQL restarts",
        format!(
            "{} ({} fast, {} immediate and held down)",
            tally.postgres_fast_restarts + tally.postgres_crash_restarts,
            tally.postgres_fast_restarts,
            tally.postgres_crash_restarts
        ),
    );
    row("NATS restarts", tally.nats_restarts.to_string());
    row(
        "provider outage windows",
        format!(
            "{} ({} tok_unavailable outages, {} provider down)",
            tally.outage_windows + tally.provider_down_windows,
            tally.outage_windows,
            tally.provider_down_windows
        ),
    );
    row(
        "dead jobs replayed",
        format!("{} jobs in {} replays", tally.replayed_jobs, tally.replays),
    );
    row("failed starts (database down)", fleet.failed_starts.to_string());
    row(
        "orders placed / accepted / refused",
        format!(
            "{} / {} / {}",
            shop.placed.load(Ordering::Relaxed),
            shop.accepted.load(Ordering::Relaxed),
            shop.refused.load(Ordering::Relaxed)
        ),
    );
    for (status, count) in &outcomes.by_status {
        row(&format!("orders ended {status}"), count.to_string());
    }
    row(
        "orders refunded in part (still fulfilled)",
        outcomes.partially_refunded.to_string(),
    );
    row("orders parked (dead job with error)", outcomes.parked.to_string());
    row(
        "HTTP statuses",
        answers
            .statuses
            .lock()
            .unwrap()
            .iter()
            .map(|(status, count)| format!("{status}: {count}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    row(
        "4xx codes",
        answers
            .client_errors
            .lock()
            .unwrap()
            .iter()
            .map(|((status, code), count)| format!("{status} {code}: {count}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    row(
        "transport errors (retried)",
        answers.transport_errors.load(Ordering::Relaxed).to_string(),
    );
    row("ERROR log lines (informational)", error_lines.to_string());
    let mut healthy = true;
    for (name, ok, detail) in &verdicts {
        healthy &= ok;
        row(&format!("{} {name}", if *ok { "PASS" } else { "FAIL" }), detail.clone());
    }
    let samples = answers.samples.lock().unwrap();
    if !samples.is_empty() || !outcomes.samples.is_empty() {
        println!("\nexamples:");
        for sample in samples.iter().chain(&outcomes.samples) {
            println!("  {sample}");
        }
    }
    for explanation in &explanations {
        println!("\n{explanation}");
    }
    println!(
        "\n{}: logs in {}",
        if healthy { "every verdict holds" } else { "FAILED" },
        logs.display()
    );
    drop(nats);
    Ok(healthy)
}

async fn sqlx_connect(url: &str) -> anyhow::Result<sqlx::PgConnection> {
    use sqlx::Connection;
    sqlx::PgConnection::connect(url)
        .await
        .context("connecting to the run's database")
}

/// One chaos action, picked at random; returns what it did.
async fn chaos_action(
    fleet: &mut Fleet,
    postgres: &Arc<PrivatePostgres>,
    nats: &mut NatsServer,
    http: &reqwest::Client,
    tally: &mut ChaosTally,
    rng: &mut SmallRng,
) -> anyhow::Result<String> {
    let roll = rng.random_range(0..100);
    Ok(match roll {
        0..40 => {
            let candidates: Vec<usize> = (0..fleet.processes.len())
                .filter(|index| !matches!(fleet.processes[*index].role, Role::Provider(_)))
                .collect();
            let index = candidates[rng.random_range(0..candidates.len())];
            fleet.kill(index).await;
            tally.kills += 1;
            let down = Duration::from_millis(rng.random_range(0..2000));
            tokio::time::sleep(down).await;
            fleet.spawn(index)?;
            format!("SIGKILL {} (down {down:.1?})", fleet.processes[index].name)
        }
        40..55 => {
            let postgres = postgres.clone();
            tokio::task::spawn_blocking(move || postgres.restart(StopMode::Fast)).await?;
            tally.postgres_fast_restarts += 1;
            "PostgreSQL pg_ctl restart -m fast".into()
        }
        55..65 => {
            let down = Duration::from_millis(rng.random_range(500..5000));
            let postgres = postgres.clone();
            tokio::task::spawn_blocking(move || {
                postgres.stop(StopMode::Immediate);
                std::thread::sleep(down);
                postgres.start_server();
            })
            .await?;
            tally.postgres_crash_restarts += 1;
            format!("PostgreSQL stopped -m immediate, down {down:.1?}")
        }
        65..80 => {
            let down = Duration::from_millis(rng.random_range(0..3000));
            nats.stop();
            tokio::time::sleep(down).await;
            nats.restart();
            tally.nats_restarts += 1;
            format!("NATS killed, down {down:.1?}")
        }
        80..90 => {
            let window = Duration::from_millis(rng.random_range(2000..10_000));
            let switch = |active: bool| {
                http.post(format!("http://127.0.0.1:{}/v1/sandbox/outage", fleet.provider_port))
                    .bearer_auth(PROVIDER_KEY)
                    .json(&json!({ "active": active }))
                    .send()
            };
            let opened = switch(true).await.is_ok_and(|r| r.status().is_success());
            tokio::time::sleep(window).await;
            let closed = switch(false).await.is_ok_and(|r| r.status().is_success());
            if !closed {
                bail!("could not end the provider outage");
            }
            tally.outage_windows += 1;
            let replayed = replay_dead_jobs(fleet, tally).await;
            format!("tok_unavailable outage for {window:.1?} (opened: {opened}); {replayed}")
        }
        _ => {
            let window = Duration::from_millis(rng.random_range(2000..10_000));
            let provider = fleet
                .processes
                .iter()
                .position(|process| matches!(process.role, Role::Provider(_)))
                .expect("a provider");
            fleet.kill(provider).await;
            tokio::time::sleep(window).await;
            fleet.spawn(provider)?;
            fleet.wait_healthy(http, Duration::from_secs(60)).await?;
            tally.provider_down_windows += 1;
            let replayed = replay_dead_jobs(fleet, tally).await;
            format!("provider down for {window:.1?}; {replayed}")
        }
    })
}

/// The operator's procedure once the provider is back (docs/operations.md, "Dead letters and
/// replay"): `orderflow jobs replay --all`.
async fn replay_dead_jobs(fleet: &Fleet, tally: &mut ChaosTally) -> String {
    match fleet.run_command(&["jobs", "replay", "--all"]).await {
        Ok(output) if output.status.success() => {
            let text = String::from_utf8_lossy(&output.stdout);
            let count: u64 = text.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
            tally.replays += 1;
            tally.replayed_jobs += count;
            format!("replayed {count} dead job(s)")
        }
        Ok(output) => format!("replay failed: {}", String::from_utf8_lossy(&output.stderr).trim()),
        Err(error) => format!("replay failed: {error:#}"),
    }
}

/// After the chaos: drives every unfinished order on, replays dead jobs, and waits until the
/// deployment is quiescent. `Err` says what was still busy at the deadline.
async fn settle(
    shop: &Shop,
    fleet: &mut Fleet,
    store: &dyn Store,
    endpoint: uuid::Uuid,
    orders: &mut [Tracked],
    tally: &mut ChaosTally,
    args: &Args,
) -> anyhow::Result<Result<(), String>> {
    let deadline = Instant::now() + args.settle_timeout;
    let database_url = fleet.database_url.clone();
    let mut replays = 0;
    loop {
        fleet.restart_exited()?;
        let mut connection = sqlx_connect(&database_url).await?;
        let (busy, dead): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state IN ('ready', 'running')), count(*) FILTER (WHERE state = 'dead') \
             FROM jobs",
        )
        .fetch_one(&mut connection)
        .await?;
        if busy == 0 && dead > 0 && replays < SETTLE_REPLAYS {
            replays += 1;
            let replayed = replay_dead_jobs(fleet, tally).await;
            eprintln!("  settle: {replayed}");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let mut unfinished = 0;
        for order in orders.iter_mut().filter(|order| !order.done) {
            let Some(view) = shop.view(order, None).await else {
                continue;
            };
            shop.advance(order, &view).await;
            let parked_for_good = order.parked && replays >= SETTLE_REPLAYS;
            if !order.done && !parked_for_good {
                unfinished += 1;
            }
        }
        let unstamped: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE position IS NULL")
            .fetch_one(&mut connection)
            .await?;
        let now = chrono::Utc::now();
        let nats_unpublished = store
            .events()
            .channel_backlog(NATS_CHANNEL, now)
            .await?
            .map_or(0, |backlog| backlog.unpublished);
        let webhook_pending = store
            .events()
            .endpoint_health(now)
            .await?
            .iter()
            .find(|health| health.endpoint_id == endpoint)
            .map_or(0, |health| health.pending);
        if busy == 0 && unfinished == 0 && unstamped == 0 && nats_unpublished == 0 && webhook_pending == 0 {
            return Ok(Ok(()));
        }
        let state = format!(
            "{busy} jobs ready or running, {dead} dead, {unfinished} orders unfinished, {unstamped} events \
             unpositioned, {nats_unpublished} not on NATS, {webhook_pending} webhook deliveries pending"
        );
        if Instant::now() > deadline {
            return Ok(Err(format!("after {:?}: {state}", args.settle_timeout)));
        }
        eprintln!("  settle: {state}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// An order's story for a bug report: its view, its jobs and the provider's intents for it.
async fn explain_order(shop: &Shop, database_url: &str, order: &str) -> String {
    let mut text = format!("order {order}:");
    let answer = shop
        .api
        .send(Method::GET, &format!("/orders/{order}"), &shop.admin, None, None, None)
        .await;
    if let Some(answer) = answer {
        let view = &answer.body;
        let timeline: Vec<String> = view["timeline"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|entry| format!("{} {} {}", entry["at"], entry["kind"], entry["detail"]))
            .collect();
        let _ = write!(
            text,
            "\n  status {}, payment {}, pending steps {}\n  timeline:\n    {}",
            view["status"],
            view["payment"],
            view["pending_steps"],
            timeline.join("\n    ")
        );
    }
    let Ok(mut connection) = sqlx_connect(database_url).await else {
        return text;
    };
    let jobs: Vec<(String, String, i32, Option<String>, String)> = sqlx::query_as(
        "SELECT kind, state, attempts, last_error, error_history FROM jobs WHERE order_id::text = $1 ORDER BY created_at",
    )
    .bind(order)
    .fetch_all(&mut connection)
    .await
    .unwrap_or_default();
    for (kind, state, attempts, last_error, history) in jobs {
        let _ = write!(
            text,
            "\n  job {kind} {state} after {attempts} attempts: {last_error:?} {history}"
        );
    }
    let intents: Vec<(String, String, String, i64, i64, i32, String)> = sqlx::query_as(
        "SELECT id, idempotency_key, status, amount_minor, captured_minor, calls, created_at::text \
         FROM sandbox_intents WHERE order_id = $1 ORDER BY created_at",
    )
    .bind(order)
    .fetch_all(&mut connection)
    .await
    .unwrap_or_default();
    for (id, key, status, amount, captured, calls, created) in intents {
        let _ = write!(
            text,
            "\n  provider intent {id} (key {key}) {status}, amount {amount}, captured {captured}, {calls} calls, created {created}"
        );
    }
    text
}

/// What the accepted orders ended as.
struct Outcomes {
    by_status: BTreeMap<String, u64>,
    partially_refunded: u64,
    parked: u64,
    verdicts: Vec<(String, bool, String)>,
    samples: Vec<String>,
}

async fn check_orders(shop: &Shop, orders: &[Tracked], database_url: &str) -> anyhow::Result<Outcomes> {
    let mut by_status = BTreeMap::new();
    let (mut parked, mut partially_refunded) = (0, 0);
    let (mut unfinished, mut unexpected, mut money, mut receipts, mut unexplained) = (0, 0, 0, 0, 0);
    let mut samples = Vec::new();
    let note = |samples: &mut Vec<String>, text: String| {
        if samples.len() < 10 {
            samples.push(text);
        }
    };
    let mut connection = sqlx_connect(database_url).await?;
    let dead_jobs: HashMap<String, String> = sqlx::query_as::<_, (String, Option<String>)>(
        "SELECT order_id::text, last_error FROM jobs WHERE state = 'dead' AND order_id IS NOT NULL",
    )
    .fetch_all(&mut connection)
    .await?
    .into_iter()
    .map(|(order, error)| (order, error.unwrap_or_default()))
    .collect();
    for order in orders {
        let Some(view) = shop.view(order, None).await else {
            unfinished += 1;
            continue;
        };
        let status = view["status"].as_str().unwrap_or("?").to_string();
        let payment = view["payment"]["state"].as_str().unwrap_or("none");
        *by_status.entry(status.clone()).or_default() += 1;
        if payment == "partially_refunded" {
            partially_refunded += 1;
        }
        let is_parked = view["pending_steps"]
            .as_array()
            .is_some_and(|steps| steps.iter().any(|step| step["state"] == "dead"));
        if is_parked {
            parked += 1;
            if dead_jobs.get(&order.id).is_none_or(|error| error.trim().is_empty()) {
                unexplained += 1;
                note(
                    &mut samples,
                    format!("order {} parked without an error: {view}", order.id),
                );
            }
        } else if !matches!(status.as_str(), "fulfilled" | "cancelled" | "refunded") {
            unfinished += 1;
            note(
                &mut samples,
                format!(
                    "order {} ({}, {:?}) left {status}: {view}",
                    order.id, order.method, order.plan
                ),
            );
        }
        if let Some(expected) = order.expected
            && expected != status
            && !is_parked
        {
            unexpected += 1;
            note(
                &mut samples,
                format!(
                    "order {} ({}, {:?}) is {status}, its actions imply {expected}",
                    order.id, order.method, order.plan
                ),
            );
        }
        let money_ok = match status.as_str() {
            "fulfilled" => matches!(payment, "captured" | "partially_refunded"),
            "refunded" => payment == "refunded",
            "paid" => matches!(payment, "authorized" | "captured"),
            "cancelled" => !matches!(payment, "authorized" | "captured" | "partially_refunded"),
            _ => payment != "captured",
        };
        if !money_ok {
            money += 1;
            note(
                &mut samples,
                format!("order {} is {status} with payment {payment}", order.id),
            );
        }
        let mut sent: HashMap<String, u32> = HashMap::new();
        for notification in view["notifications"].as_array().into_iter().flatten() {
            if notification["state"] == "sent" {
                *sent.entry(notification["kind"].to_string()).or_default() += 1;
            }
        }
        if sent.values().any(|count| *count > 1) {
            receipts += 1;
            note(
                &mut samples,
                format!("order {} got a notification twice: {view}", order.id),
            );
        }
    }
    let verdicts = vec![
        (
            "every order terminal or parked".to_string(),
            unfinished == 0 && unexplained == 0,
            format!(
                "{} orders: {unfinished} neither terminal nor parked, {parked} parked ({unexplained} without an error)",
                orders.len()
            ),
        ),
        (
            "orders end as their actions imply".to_string(),
            unexpected == 0,
            format!("{unexpected} differ (declined, cancelled, shipped, refunded, 3-D Secure failed or abandoned)"),
        ),
        (
            "money follows the order, one receipt".to_string(),
            money == 0 && receipts == 0,
            format!("{money} with the payment in the wrong state, {receipts} with a notification twice"),
        ),
    ];
    Ok(Outcomes {
        by_status,
        partially_refunded,
        parked,
        verdicts,
        samples,
    })
}
