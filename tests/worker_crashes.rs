//! Crashes are not failures (issue 13): a worker process killed with SIGKILL while it runs steps
//! costs those jobs no attempt — their leases run out and the next worker runs them again — and
//! a job whose every run kills its worker is dead-lettered after `--max-lease-expiries` with that
//! reason, instead of crash-looping the fleet forever.
//!
//! The worker is the real binary (`orderflow serve --mode worker`); orders are placed through the
//! store, as the API process would.

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::{Backend, TestDb};
use orderflow::domain::{Cart, CartLine, CustomerId, OrderId, PaymentToken, ProductId, Quantity};
use orderflow::store::jobs::{JobFilter, JobRecord};
use orderflow::store::{PlaceOrderOutcome, Store};
use orderflow::workflow::CHARGE_PAYMENT;
use orderflow::workflow::checkout::{self, CheckoutRequest, CheckoutSettings};
use tokio::process::{Child, Command};

on_every_backend!(
    ten_kills_of_the_worker_dead_letter_nothing,
    a_step_that_kills_its_worker_is_dead_lettered_after_the_lease_expiry_limit
);

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");

struct Shop {
    db: TestDb,
    store: Arc<dyn Store>,
    product: ProductId,
    customer: CustomerId,
    mail: tempfile::TempDir,
}

impl Shop {
    async fn new(backend: Backend) -> Self {
        let db = TestDb::new(backend).await;
        let store = db.connect().await;
        let (product, customer) = common::seed_lamp_and_buyer(store.as_ref(), "crash@example.com").await;
        Shop {
            db,
            store,
            product,
            customer,
            mail: tempfile::tempdir().unwrap(),
        }
    }

    async fn place(&self) -> OrderId {
        let request = CheckoutRequest {
            principal: self.customer.to_string(),
            idempotency_key: uuid::Uuid::now_v7().to_string(),
            customer_id: self.customer,
            cart: Cart::new(vec![CartLine {
                product_id: self.product,
                quantity: Quantity::parse(1).unwrap(),
            }])
            .unwrap(),
            payment_token: PaymentToken::parse("tok_visa").unwrap(),
            shipping: None,
            correlation_id: None,
        };
        match checkout::place_order(self.store.clone(), &CheckoutSettings::default(), request)
            .await
            .unwrap()
        {
            PlaceOrderOutcome::Created(order) => order.id,
            other => panic!("not placed: {other:?}"),
        }
    }

    /// `orderflow serve --mode worker` with a one-second lease, plus `args`.
    fn worker(&self, args: &[&str]) -> Child {
        Command::new(BIN)
            .envs(common::profile_env(self.db.url()))
            .arg("--database-url")
            .arg(self.db.url())
            .arg("--mail-dir")
            .arg(self.mail.path())
            .args(["--jwt-secret", "worker-crash-test-secret-0123456789abcdef"])
            .args(["--job-lease", "1s", "--job-poll", "100ms", "--job-backoff", "20ms"])
            .args(["serve", "--mode", "worker"])
            .args(args)
            .env("ORDERFLOW_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the orderflow worker")
    }

    async fn count(&self, sql: &str) -> i64 {
        self.db.count(sql).await
    }

    async fn jobs(&self, state: &str, kind: Option<&str>) -> Vec<JobRecord> {
        self.store
            .list_jobs(&JobFilter {
                state: Some(state.into()),
                kind: kind.map(str::to_string),
                after: None,
                limit: 1000,
            })
            .await
            .unwrap()
            .items
    }
}

async fn kill9(mut child: Child) {
    child.start_kill().expect("SIGKILL");
    child.wait().await.expect("reap");
}

/// Polls `check` until it holds; fails naming `what` after `deadline`.
async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + deadline;
    while !check().await {
        assert!(tokio::time::Instant::now() < until, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn ten_kills_of_the_worker_dead_letter_nothing(backend: Backend) {
    let shop = Shop::new(backend).await;
    const ORDERS: usize = 90; // of the 100 lamps in stock
    for _ in 0..ORDERS {
        shop.place().await;
    }
    // One attempt per step: before crashes stopped spending attempts, a single kill during a
    // step dead-lettered its job.
    let args = ["--max-attempts", "1"];
    let mut caught_running = 0;
    for kill in 0..10 {
        let worker = shop.worker(&args);
        let fulfilled = shop
            .count("SELECT count(*) FROM orders WHERE status = 'fulfilled'")
            .await;
        // Kill it once it made progress and while it is running steps.
        wait_until(
            &format!("kill {kill} finds the worker busy"),
            Duration::from_secs(30),
            || async {
                shop.count("SELECT count(*) FROM orders WHERE status = 'fulfilled'")
                    .await
                    > fulfilled
                    && shop.count("SELECT count(*) FROM jobs WHERE state = 'running'").await > 0
            },
        )
        .await;
        kill9(worker).await;
        caught_running += shop.count("SELECT count(*) FROM jobs WHERE state = 'running'").await;
    }
    assert!(
        caught_running >= 10,
        "the kills must land while steps run ({caught_running} jobs were left running)"
    );
    let worker = shop.worker(&args);
    wait_until("every order is fulfilled", Duration::from_secs(60), || async {
        shop.count("SELECT count(*) FROM orders WHERE status = 'fulfilled'")
            .await
            == ORDERS as i64
            || !shop.jobs("dead", None).await.is_empty()
    })
    .await;
    let dead = shop.jobs("dead", None).await;
    assert!(dead.is_empty(), "crashes dead-lettered jobs: {dead:#?}");
    assert!(
        shop.count("SELECT count(*) FROM jobs WHERE lease_expiries > 0").await > 0,
        "the kills left expired leases behind"
    );
    kill9(worker).await;
    let report = shop.store.audit().await.unwrap();
    assert!(report.is_clean(), "{report}");
}

async fn a_step_that_kills_its_worker_is_dead_lettered_after_the_lease_expiry_limit(backend: Backend) {
    let shop = Shop::new(backend).await;
    // A payment provider that accepts connections and never answers: the payment step hangs
    // until the test kills the worker running it, every time (as a step that crashes its
    // process would).
    let provider = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let provider_url = format!("http://{}", provider.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = provider.accept().await {
            held.push(socket);
        }
    });
    let order = shop.place().await;
    let args = [
        "--payment-provider",
        "stripe",
        "--stripe-api-base",
        provider_url.as_str(),
        "--stripe-secret-key",
        "sk_test_worker_crashes",
        "--max-lease-expiries",
        "3",
    ];
    // Three runs die with their worker: each is this worker's claim, made after `kill` expiries
    // (a killed run stays `running` until its lease runs out).
    for kill in 0..3 {
        let worker = shop.worker(&args);
        let running = format!(
            "SELECT count(*) FROM jobs WHERE kind = 'charge_payment' AND state = 'running' AND lease_expiries = {kill}"
        );
        wait_until(
            &format!("run {} of the payment step", kill + 1),
            Duration::from_secs(30),
            || async { shop.count(&running).await > 0 },
        )
        .await;
        kill9(worker).await;
        assert!(
            shop.jobs("dead", Some(CHARGE_PAYMENT)).await.is_empty(),
            "parked too early"
        );
    }
    // The next claim finds the limit reached and parks the job without running it.
    let worker = shop.worker(&args);
    wait_until("the poison job is parked", Duration::from_secs(30), || async {
        !shop.jobs("dead", Some(CHARGE_PAYMENT)).await.is_empty()
    })
    .await;
    kill9(worker).await;
    let dead = shop.jobs("dead", Some(CHARGE_PAYMENT)).await;
    assert_eq!(dead[0].order_id, Some(order.as_uuid()));
    let error = dead[0].last_error.clone().unwrap_or_default();
    assert!(
        error.contains("lease expired 3 times") && error.contains("--max-lease-expiries 3"),
        "{error}"
    );
    assert_eq!(dead[0].attempts, 1, "the crashes spent no attempt");
}
