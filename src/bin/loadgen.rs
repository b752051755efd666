//! `orderflow-loadgen`: the checkout benchmark.
//!
//! It measures how many orders per second a *running* orderflow server commits through its real
//! HTTP API (`POST /orders`: JSON, JWT, idempotency claim, stock reservation, order, event and
//! first job), and how long each checkout takes as seen by a client:
//!
//! 1. Setup (not timed): with an admin token it creates `--products` products and `--customers`
//!    customers over HTTP and mints one token per customer with the server's signing secret.
//! 2. Timed phase: `--concurrency` workers place `--orders` orders in total, each with a fresh
//!    `Idempotency-Key`, a random customer and `--lines` distinct random products. Every request's
//!    latency (send to last body byte) and status are recorded.
//! 3. It prints orders/s (202 answers per second of wall time), latency p50/p90/p99/max, the
//!    status breakdown, then opens the server's database directly, runs the invariant audit
//!    (`orderflow audit`) and checks that every accepted order is stored (and shows how far the
//!    job pipeline has taken them).
//!
//! What the number means depends on what the server runs: `--mode api` measures the checkout
//! commitment alone (what `bench/raw-postgres.sh` measures without HTTP); the default `--mode all`
//! also runs the payment/fulfilment/e-mail workers in the same process, which compete with
//! checkout for the same CPUs and database.
//!
//! Exit status: 0 when everything held; 1 when the audit failed, an accepted order is missing,
//! or any request got a 5xx or no HTTP answer at all; 2 when the run could not be set up.
//!
//! The loadgen needs the server's token secret and database, configured the same way as the
//! server (`--jwt-secret` or the secret kept in `--data-dir`; `--database-url` or the embedded
//! SQLite file in `--data-dir`). Run it on the same host as the server, for example:
//!
//! ```text
//! cargo build --release --bins
//! # embedded SQLite (the secret is generated in the data dir by the server):
//! target/release/orderflow --data-dir /tmp/of --no-seed --listen 127.0.0.1:18081 &
//! target/release/orderflow-loadgen --url http://127.0.0.1:18081 --data-dir /tmp/of --concurrency 32
//! # PostgreSQL:
//! export ORDERFLOW_JWT_SECRET=0123456789abcdef0123456789abcdef
//! target/release/orderflow --database-url postgres://postgres@127.0.0.1/of --listen 127.0.0.1:18081 \
//!     --no-seed --mode api &
//! target/release/orderflow-loadgen --url http://127.0.0.1:18081 \
//!     --database-url postgres://postgres@127.0.0.1/of --jwt-secret "$ORDERFLOW_JWT_SECRET"
//! ```
//!
//! See `docs/BENCHMARKS.md` for measured results and the raw-PostgreSQL comparison
//! (`bench/raw-postgres.sh`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use serde_json::{Value, json};

use orderflow::config::{GlobalArgs, LogFormat};
use orderflow::domain::{Currency, CustomerId, OrderId};
use orderflow::http::Authenticator;
use orderflow::store::{self, SqliteDurability, Store};

#[derive(Debug, Parser)]
#[command(
    name = "orderflow-loadgen",
    version,
    about = "Checkout benchmark: places orders over HTTP at a chosen concurrency, reports orders/s \
             and latency, then audits the database"
)]
struct Args {
    /// Base URL of the running orderflow server.
    #[arg(long, env = "ORDERFLOW_LOADGEN_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The server's database, opened after the run for the audit: `postgres://user@host/db` or
    /// `sqlite://path`. Default: the embedded SQLite file in `--data-dir` (as for the server).
    #[arg(long, env = "ORDERFLOW_LOADGEN_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The server's data directory (its embedded database and generated token secret).
    #[arg(long, env = "ORDERFLOW_LOADGEN_DATA_DIR", default_value = "orderflow-data")]
    data_dir: PathBuf,
    /// The server's HS256 token secret (at least 32 bytes). Default: the secret kept in
    /// `<data-dir>/jwt-secret`, as for the server.
    #[arg(long, env = "ORDERFLOW_LOADGEN_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Requests in flight at once (one worker per slot, each on its own keep-alive connection).
    #[arg(long, env = "ORDERFLOW_LOADGEN_CONCURRENCY", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    concurrency: u32,
    /// Orders to place in the timed phase, in total.
    #[arg(long, env = "ORDERFLOW_LOADGEN_ORDERS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..))]
    orders: u64,
    /// Customers to create; each order goes to a random one.
    #[arg(long, env = "ORDERFLOW_LOADGEN_CUSTOMERS", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    customers: u32,
    /// Products to create; each order picks `--lines` distinct random ones.
    #[arg(long, env = "ORDERFLOW_LOADGEN_PRODUCTS", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    products: u32,
    /// Items (distinct products, quantity 1 each) per order.
    #[arg(long, env = "ORDERFLOW_LOADGEN_LINES", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    lines: u32,
    /// Initial stock of every created product (large, so that nothing sells out).
    #[arg(long, env = "ORDERFLOW_LOADGEN_STOCK", default_value_t = 10_000_000,
          value_parser = clap::value_parser!(i64).range(1..=1_000_000_000))]
    stock: i64,
    /// Longest wait for one HTTP answer, in seconds; a request that takes longer counts as a
    /// transport error.
    #[arg(long, env = "ORDERFLOW_LOADGEN_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout_secs: u64,
    /// Runtime threads of the load generator itself (default: one per core). On a small machine
    /// shared with the server, fewer threads leave more CPU to the system under test.
    #[arg(long, env = "ORDERFLOW_LOADGEN_THREADS",
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    threads: Option<u32>,
    /// Also measure end to end: wait until the pipeline has finished every accepted order, then
    /// report orders/s from placed to `fulfilled` and the p50/p99/max of that time (from the
    /// orders' timelines). The server must run its workers (`--mode all` or worker processes).
    #[arg(long, env = "ORDERFLOW_LOADGEN_END_TO_END")]
    end_to_end: bool,
    /// Longest wait for the pipeline to finish in `--end-to-end` mode.
    #[arg(long, env = "ORDERFLOW_LOADGEN_DRAIN_TIMEOUT_SECS", default_value_t = 900)]
    drain_timeout_secs: u64,
    /// Skip the audit (when the server's database cannot be reached from here).
    #[arg(long, env = "ORDERFLOW_LOADGEN_NO_AUDIT")]
    no_audit: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads as usize);
    }
    let runtime = match runtime.build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("orderflow-loadgen: starting the runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("orderflow-loadgen: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// The server's settings as the server itself would read them, so the secret and database are
/// resolved by the same code (`GlobalArgs::jwt_secret`, `GlobalArgs::database_url`).
fn server_settings(args: &Args) -> GlobalArgs {
    GlobalArgs {
        database_url: args.database_url.clone(),
        read_database_url: None,
        read_replica_max_lag: Duration::from_secs(5),
        database_profile: Default::default(),
        database_pooler: Default::default(),
        dsql_region: None,
        dsql_token_ttl: orderflow::store::dsql_auth::DEFAULT_TOKEN_TTL,
        data_dir: args.data_dir.clone(),
        jwt_secret: args.jwt_secret.clone(),
        db_max_connections: 2,
        commit_batch: None,
        commit_writers: None,
        checkout_batch: None,
        checkout_writers: None,
        db_acquire_timeout: Duration::from_secs(30),
        sqlite_durability: SqliteDurability::Full,
        currency: Currency::USD,
        log_format: LogFormat::Text,
        telemetry: Default::default(),
    }
}

/// A customer of this run and its bearer token.
struct Buyer {
    id: CustomerId,
    token: String,
}

/// Everything the workers share.
struct Plan {
    client: reqwest::Client,
    orders_url: String,
    run_id: String,
    buyers: Vec<Buyer>,
    products: Vec<String>,
    lines: usize,
    total: u64,
    next: AtomicU64,
    done: AtomicU64,
}

/// What one worker saw.
#[derive(Default)]
struct Tally {
    /// Latency in microseconds of every 202 answer.
    accepted: Vec<u64>,
    /// Latency in microseconds of every other HTTP answer.
    other: Vec<u64>,
    statuses: BTreeMap<u16, u64>,
    /// 202 answers flagged `Idempotent-Replayed` (never expected: every key is fresh).
    replayed: u64,
    transport_errors: u64,
    /// The first few non-202 answers and transport errors, for the report.
    samples: Vec<String>,
}

const SAMPLES_KEPT: usize = 5;

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.accepted.extend(other.accepted);
        self.other.extend(other.other);
        for (status, count) in other.statuses {
            *self.statuses.entry(status).or_default() += count;
        }
        self.replayed += other.replayed;
        self.transport_errors += other.transport_errors;
        for sample in other.samples {
            if self.samples.len() < SAMPLES_KEPT {
                self.samples.push(sample);
            }
        }
    }

    fn sample(&mut self, text: String) {
        if self.samples.len() < SAMPLES_KEPT {
            self.samples.push(text);
        }
    }

    fn count(&self, statuses: impl Fn(u16) -> bool) -> u64 {
        self.statuses
            .iter()
            .filter(|(status, _)| statuses(**status))
            .map(|(_, count)| count)
            .sum()
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let settings = server_settings(&args);
    let secret = settings.jwt_secret()?;
    let auth = Authenticator::hs256(&secret);
    let base = args.url.trim_end_matches('/').to_string();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency as usize)
        .timeout(Duration::from_secs(args.timeout_secs))
        .tcp_nodelay(true)
        .build()
        .context("building the HTTP client")?;
    if args.lines > args.products {
        bail!(
            "--lines ({}) cannot exceed --products ({}): an order holds each product at most once",
            args.lines,
            args.products
        );
    }

    // Which backend is the server on? (A hint for the report; /health/ready names it.)
    let ready: Value = client
        .get(format!("{base}/health/ready"))
        .send()
        .await
        .with_context(|| format!("reaching the server at {base}"))?
        .json()
        .await
        .context("reading /health/ready")?;
    let backend = ready["components"]["database"]["backend"]
        .as_str()
        .unwrap_or("unknown")
        .to_string();

    // ---- Setup (not timed) ----
    let run_id = uuid::Uuid::now_v7().simple().to_string()[..12].to_string();
    let admin = auth.issue("orderflow-loadgen", &["admin".into()], Duration::from_secs(86_400))?;
    let setup_started = Instant::now();
    let mut products = Vec::with_capacity(args.products as usize);
    for index in 0..args.products {
        let body = json!({
            "name": format!("Loadgen product {index}"),
            "sku": format!("LG-{run_id}-{index}"),
            "category": "loadgen",
            "price": format!("{}.{:02}", 1 + index % 50, index % 100).parse::<serde_json::Number>()?,
            "stock_quantity": args.stock,
        });
        let created = post_created(&client, &format!("{base}/products"), &admin, &body).await?;
        products.push(
            created["product_id"]
                .as_str()
                .context("POST /products answered without product_id")?
                .to_string(),
        );
    }
    let mut buyers = Vec::with_capacity(args.customers as usize);
    for index in 0..args.customers {
        let body = json!({
            "email": format!("loadgen-{run_id}-{index}@example.com"),
            "first_name": "Load",
            "last_name": format!("Generator{index}"),
        });
        let created = post_created(&client, &format!("{base}/customers"), &admin, &body).await?;
        let id: CustomerId = created["customer_id"]
            .as_str()
            .context("POST /customers answered without customer_id")?
            .parse()
            .context("POST /customers answered a customer_id that is not a UUID")?;
        let token = auth.issue(&id.to_string(), &[], Duration::from_secs(86_400))?;
        buyers.push(Buyer { id, token });
    }
    let worst_case_units = args.orders.saturating_mul(u64::from(args.lines));
    if (args.stock as u64).saturating_mul(u64::from(args.products)) < worst_case_units {
        eprintln!(
            "warning: {} products x {} stock may not cover {} order lines; expect 422 insufficient_stock",
            args.products, args.stock, worst_case_units
        );
    }
    println!(
        "setup: {} products, {} customers created in {:.1}s (run {run_id})",
        args.products,
        args.customers,
        setup_started.elapsed().as_secs_f64()
    );

    // ---- Timed phase ----
    let plan = Arc::new(Plan {
        client,
        orders_url: format!("{base}/orders"),
        run_id: run_id.clone(),
        buyers,
        products,
        lines: args.lines as usize,
        total: args.orders,
        next: AtomicU64::new(0),
        done: AtomicU64::new(0),
    });
    let progress = tokio::spawn(report_progress(plan.clone()));
    let started = Instant::now();
    let mut workers = Vec::with_capacity(args.concurrency as usize);
    for worker_index in 0..args.concurrency {
        let plan = plan.clone();
        let seed = rand::rng().random::<u64>() ^ u64::from(worker_index);
        workers.push(tokio::spawn(place_orders(plan, seed)));
    }
    let mut tally = Tally::default();
    for worker in workers {
        tally.merge(worker.await.context("a worker panicked")?);
    }
    let elapsed = started.elapsed();
    progress.abort();

    // ---- Report ----
    let accepted = tally.accepted.len() as u64;
    let server_errors = tally.count(|s| s >= 500);
    let client_errors = tally.count(|s| (400..500).contains(&s));
    let seconds = elapsed.as_secs_f64();
    println!();
    println!("target:        {base} (backend: {backend})");
    println!(
        "workload:      {} orders, {} line(s) each, {} customers, {} products",
        args.orders, args.lines, args.customers, args.products
    );
    println!("concurrency:   {}", args.concurrency);
    println!("elapsed:       {seconds:.2}s");
    println!(
        "throughput:    {:.1} orders/s (202 Accepted per second)",
        accepted as f64 / seconds
    );
    println!(
        "               {:.1} requests/s (all answers)",
        (accepted + tally.other.len() as u64) as f64 / seconds
    );
    println!(
        "latency (202): {}",
        latency_line(&mut tally.accepted).unwrap_or_else(|| "no accepted orders".into())
    );
    if let Some(line) = latency_line(&mut tally.other) {
        println!("latency (rest): {line}");
    }
    let breakdown: Vec<String> = tally
        .statuses
        .iter()
        .map(|(status, count)| format!("{status}: {count}"))
        .collect();
    println!(
        "statuses:      {}; transport errors: {}",
        if breakdown.is_empty() {
            "none".to_string()
        } else {
            breakdown.join(", ")
        },
        tally.transport_errors
    );
    println!(
        "               202: {accepted}, 4xx: {client_errors}, 5xx: {server_errors}, replayed: {}",
        tally.replayed
    );
    for sample in &tally.samples {
        println!("  e.g. {sample}");
    }

    let mut healthy = server_errors == 0 && tally.transport_errors == 0;
    if !healthy {
        println!(
            "FAIL: {server_errors} 5xx answer(s), {} transport error(s)",
            tally.transport_errors
        );
    }

    // ---- End to end ----
    if args.end_to_end {
        let drained = drain_pipeline(
            &plan.client,
            &base,
            &admin,
            Duration::from_secs(args.drain_timeout_secs),
        )
        .await?;
        let database_url = settings.database_url();
        let store = store::connect(&database_url, &settings.connect_options()?)
            .await
            .with_context(|| format!("opening {} to read the timelines", store::redact_url(&database_url)))?;
        let mut spans = Vec::new();
        let (mut first_placed, mut last_fulfilled) = (None, None);
        let mut unfinished = 0u64;
        for buyer in &plan.buyers {
            let mut before = None;
            loop {
                let page = store.list_customer_orders(buyer.id, before, 200).await?;
                for order in &page.items {
                    let details = store.get_order(order.id).await?.context("an order vanished")?;
                    let fulfilled = details.events.iter().find(|e| e.kind == "fulfilled").map(|e| e.at);
                    let Some(fulfilled) = fulfilled else {
                        unfinished += 1;
                        continue;
                    };
                    let placed = details.order.created_at;
                    spans.push((fulfilled - placed).num_microseconds().unwrap_or(i64::MAX).max(0) as u64);
                    first_placed = first_placed.min(Some(placed)).or(Some(placed));
                    last_fulfilled = last_fulfilled.max(Some(fulfilled));
                }
                match page.next_after {
                    Some(last) => before = Some(orderflow::domain::OrderId::from_uuid(last)),
                    None => break,
                }
            }
        }
        println!();
        println!("end to end (placed → fulfilled, from the orders' timelines):");
        println!(
            "  pipeline drained {:.1}s after the last order was placed",
            drained.as_secs_f64()
        );
        if let (Some(first), Some(last)) = (first_placed, last_fulfilled) {
            let window = (last - first).num_milliseconds().max(1) as f64 / 1000.0;
            println!(
                "  throughput:  {:.1} orders/s fulfilled ({} orders between the first placement and the last fulfilment, {window:.1}s)",
                spans.len() as f64 / window,
                spans.len()
            );
        }
        println!(
            "  latency:     {}",
            latency_line(&mut spans).unwrap_or_else(|| "no fulfilled orders".into())
        );
        if unfinished > 0 {
            println!("  FAIL: {unfinished} order(s) of this run are not fulfilled");
            healthy = false;
        }
    }

    // ---- Audit ----
    if args.no_audit {
        println!("\naudit: skipped (--no-audit)");
        return Ok(healthy);
    }
    let database_url = settings.database_url();
    println!("\naudit of {}:", store::redact_url(&database_url));
    let store = store::connect(&database_url, &settings.connect_options()?)
        .await
        .with_context(|| format!("opening {} for the audit", store::redact_url(&database_url)))?;
    let report = store.audit().await.context("running the audit")?;
    println!("{report}");
    if !report.is_clean() {
        healthy = false;
    }
    let statuses = stored_orders(store.as_ref(), &plan.buyers).await?;
    let stored: u64 = statuses.values().sum();
    let by_status: Vec<String> = statuses
        .iter()
        .map(|(status, count)| format!("{status}: {count}"))
        .collect();
    if stored < accepted {
        println!(
            "FAIL: {accepted} orders were accepted (202) but only {stored} are stored for this run's customers \
             (is --database-url the server's database?)"
        );
        healthy = false;
    } else {
        println!(
            "stored orders: {stored} for this run's customers ({accepted} accepted with 202); now {}",
            by_status.join(", ")
        );
    }
    Ok(healthy)
}

/// Polls `/admin/queues` until no job is ready or running; returns how long that took.
async fn drain_pipeline(
    client: &reqwest::Client,
    base: &str,
    admin: &str,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let queues: Value = client
            .get(format!("{base}/admin/queues"))
            .bearer_auth(admin)
            .send()
            .await
            .context("GET /admin/queues")?
            .json()
            .await
            .context("reading /admin/queues")?;
        let busy: i64 = queues["data"]
            .as_array()
            .context("/admin/queues answered without data")?
            .iter()
            .map(|q| q["ready"].as_i64().unwrap_or(0) + q["running"].as_i64().unwrap_or(0))
            .sum();
        if busy == 0 {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("the pipeline still had {busy} job(s) to do after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// POSTs `body` and expects 201 Created; returns the answer's JSON.
async fn post_created(client: &reqwest::Client, url: &str, token: &str, body: &Value) -> anyhow::Result<Value> {
    let response = client
        .post(url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let text = response.text().await.with_context(|| format!("POST {url}"))?;
    if status != StatusCode::CREATED {
        bail!("POST {url} answered {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("POST {url} answered invalid JSON"))
}

/// One worker: takes order numbers until the total is reached, placing one order each.
async fn place_orders(plan: Arc<Plan>, seed: u64) -> Tally {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut tally = Tally::default();
    let json_type = HeaderValue::from_static("application/json");
    loop {
        let number = plan.next.fetch_add(1, Ordering::Relaxed);
        if number >= plan.total {
            break;
        }
        let buyer = &plan.buyers[rng.random_range(0..plan.buyers.len())];
        let items: Vec<Value> = rand::seq::index::sample(&mut rng, plan.products.len(), plan.lines)
            .iter()
            .map(|index| json!({ "product_id": plan.products[index], "quantity": 1 }))
            .collect();
        let body = serde_json::to_vec(&json!({ "items": items, "payment": { "token": "tok_visa" } }))
            .expect("JSON values serialize");
        let key = format!("loadgen-{}-{number}", plan.run_id);

        let started = Instant::now();
        let sent = plan
            .client
            .post(&plan.orders_url)
            .bearer_auth(&buyer.token)
            .header("Idempotency-Key", &key)
            .header(CONTENT_TYPE, json_type.clone())
            .body(body)
            .send()
            .await;
        let outcome = match sent {
            Ok(response) => {
                let status = response.status();
                let replayed = response.headers().contains_key("idempotent-replayed");
                response.bytes().await.map(|body| (status, replayed, body))
            }
            Err(error) => Err(error),
        };
        let micros = started.elapsed().as_micros() as u64;
        plan.done.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok((status, replayed, body)) => {
                *tally.statuses.entry(status.as_u16()).or_default() += 1;
                if status == StatusCode::ACCEPTED {
                    tally.accepted.push(micros);
                    if replayed {
                        tally.replayed += 1;
                        tally.sample(format!("key {key}: 202 replayed although the key was fresh"));
                    }
                } else {
                    tally.other.push(micros);
                    let text = String::from_utf8_lossy(&body);
                    tally.sample(format!(
                        "{status} after {:.1} ms: {}",
                        micros as f64 / 1000.0,
                        text.chars().take(300).collect::<String>()
                    ));
                }
            }
            Err(error) => {
                tally.transport_errors += 1;
                tally.sample(format!(
                    "transport error after {:.1} ms: {error}",
                    micros as f64 / 1000.0
                ));
            }
        }
    }
    tally
}

/// Prints progress to stderr every five seconds while the timed phase runs.
async fn report_progress(plan: Arc<Plan>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    let mut last = 0;
    loop {
        tick.tick().await;
        let done = plan.done.load(Ordering::Relaxed);
        eprintln!(
            "  ... {done}/{} requests answered ({:.0}/s over the last 5s)",
            plan.total,
            (done - last) as f64 / 5.0
        );
        last = done;
    }
}

/// `p50 … p90 … p99 … max …` in milliseconds, by the nearest-rank method; sorts `micros`.
fn latency_line(micros: &mut [u64]) -> Option<String> {
    if micros.is_empty() {
        return None;
    }
    micros.sort_unstable();
    let rank = |p: f64| {
        let index = ((p * micros.len() as f64).ceil() as usize).clamp(1, micros.len()) - 1;
        micros[index] as f64 / 1000.0
    };
    Some(format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n = {})",
        rank(0.50),
        rank(0.90),
        rank(0.99),
        micros[micros.len() - 1] as f64 / 1000.0,
        micros.len()
    ))
}

/// Counts the orders stored for the run's customers by status, so an accepted order that did not
/// reach the database (or an audit of the wrong database) is noticed, and so a server that also
/// runs the job workers shows how far the pipeline got.
async fn stored_orders(store: &dyn Store, buyers: &[Buyer]) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    let mut statuses = BTreeMap::new();
    for buyer in buyers {
        let mut before: Option<OrderId> = None;
        loop {
            let page = store
                .list_customer_orders(buyer.id, before, 200)
                .await
                .context("counting the stored orders")?;
            for order in &page.items {
                *statuses.entry(order.status.as_str()).or_default() += 1;
            }
            match page.next_after {
                Some(last) => before = Some(OrderId::from_uuid(last)),
                None => break,
            }
        }
    }
    Ok(statuses)
}
