//! The audit's second half of I4 with `--payment-provider stripe`: our payment records compared
//! with Stripe's books through Stripe's API (`workflow::reconcile`), against a real localstripe,
//! on SQLite and PostgreSQL. Orders run through the saga with the Stripe client (authorized,
//! captured at fulfilment, captured at once, voided by a cancellation, declined); the books agree;
//! then each rule is broken — money at Stripe for an order we never charged, our captured amount
//! edited in the database, intents captured and cancelled behind our back — and the exact
//! violation is asserted, through the library and through `orderflow audit`. A Stripe outage fails
//! the audit instead of passing it.
//!
//! localstripe ignores idempotency keys, so a retried charge makes a second intent there where
//! Stripe would answer the first one; the test uses that to show the charge-step exception ends
//! when the step does. It refuses a refund `reason`, so refunds are not run through the saga here.

mod common;
#[path = "support/localstripe.rs"]
mod localstripe;

use std::sync::Arc;
use std::time::Duration;

use common::{Backend, TestDb};
use localstripe::Localstripe;
use orderflow::adapters::notify::FileNotifier;
use orderflow::adapters::payment::stripe::{StripeClient, StripeSettings};
use orderflow::domain::events::CancelReason;
use orderflow::domain::{Cart, CartLine, CustomerId, OrderId, OrderStatus, PaymentToken, ProductId, Quantity};
use orderflow::queue::Runner;
use orderflow::store::jobs::PaymentRecord;
use orderflow::store::{PlaceOrderOutcome, Store, Violation};
use orderflow::workflow::checkout::{self, CheckoutRequest, CheckoutSettings};
use orderflow::workflow::reconcile::{
    self, AMOUNTS_AGREE, CHECKS, INTENT_HAS_PAYMENT, INTENT_STATE, REFUNDS_AGREE, ReconcileError,
};
use orderflow::workflow::steps::{CancelOutcome, CaptureMode, Saga, SagaSettings, cancel_order};
use orderflow::workflow::{CHARGE_PAYMENT, FULFIL_ORDER};

on_every_backend!(stripe_books_are_reconciled, audit_command_reads_stripe_books);

/// The price of the seeded lamp (one per order).
const PRICE: i64 = 2500;

fn stripe_client(base: &str) -> Arc<StripeClient> {
    Arc::new(
        StripeClient::new(StripeSettings {
            api_base: base.to_string(),
            secret_key: localstripe::SECRET_KEY.into(),
            timeout: Duration::from_secs(10),
        })
        .expect("Stripe client"),
    )
}

/// A saga calling Stripe, with the given capture mode (common's runner has the default settings).
fn runner(
    store: &Arc<dyn Store>,
    stripe: Arc<StripeClient>,
    capture: CaptureMode,
    mail: &tempfile::TempDir,
) -> Arc<Runner> {
    let notifier = Arc::new(FileNotifier::new(mail.path().to_path_buf(), "shop@example.com".into()));
    let saga = Arc::new(Saga {
        store: store.clone(),
        payments: stripe,
        notifier,
        settings: SagaSettings {
            capture,
            ..SagaSettings::default()
        },
        metrics: Default::default(),
    });
    let mut runner = Runner::new(store.clone(), common::fast_queue_settings());
    saga.register(&mut runner);
    Arc::new(runner)
}

/// A shop whose pipeline pays through localstripe.
struct Shop {
    store: Arc<dyn Store>,
    stripe: Arc<StripeClient>,
    /// Authorize at checkout, capture at fulfilment.
    on_shipment: Arc<Runner>,
    /// Capture at once.
    on_payment: Arc<Runner>,
    product: ProductId,
    customer: CustomerId,
    _mail: tempfile::TempDir,
    ls: Localstripe,
    // Dropped last.
    db: TestDb,
}

impl Shop {
    async fn new(backend: Backend) -> Self {
        let (db, ls) = tokio::join!(TestDb::new(backend), Localstripe::start());
        let store = db.connect().await;
        let stripe = stripe_client(&ls.base_url());
        let mail = tempfile::tempdir().unwrap();
        let on_shipment = runner(&store, stripe.clone(), CaptureMode::OnShipment, &mail);
        let on_payment = runner(&store, stripe.clone(), CaptureMode::OnPayment, &mail);
        let (product, customer) = common::seed_lamp_and_buyer(store.as_ref(), "buyer@example.com").await;
        Shop {
            store,
            stripe,
            on_shipment,
            on_payment,
            product,
            customer,
            _mail: mail,
            ls,
            db,
        }
    }

    async fn place(&self, payment_method: &str) -> OrderId {
        let request = CheckoutRequest {
            principal: self.customer.to_string(),
            idempotency_key: uuid::Uuid::now_v7().to_string(),
            customer_id: self.customer,
            cart: Cart::new(vec![CartLine {
                product_id: self.product,
                quantity: Quantity::parse(1).unwrap(),
            }])
            .unwrap(),
            payment_token: PaymentToken::parse(payment_method).unwrap(),
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

    async fn status(&self, order: OrderId) -> OrderStatus {
        self.store.get_order(order).await.unwrap().unwrap().order.status
    }

    async fn payment(&self, order: OrderId) -> PaymentRecord {
        self.store.payment(order).await.unwrap().expect("a payment record")
    }

    /// The order's PaymentIntent id as we recorded it.
    async fn intent(&self, order: OrderId) -> String {
        self.payment(order).await.provider_ref.expect("a PaymentIntent id")
    }

    /// The state of the order's job of `kind`.
    async fn job_state(&self, order: OrderId, kind: &str) -> String {
        let jobs = self.store.jobs_for_order(order).await.unwrap();
        jobs.into_iter()
            .find(|job| job.kind == kind)
            .expect("a job of that kind")
            .state
    }

    /// Runs every ready job of one kind (only those: the rest stay queued).
    async fn run(&self, kind: &'static str) {
        self.on_shipment.run_batch(kind, 100).await.unwrap();
    }

    /// The reconciliation's violations as (check, subject, found, expected), sorted — the same
    /// when our side is read one record per page.
    async fn violations(&self) -> Vec<(&'static str, String, i64, i64)> {
        let all = reconcile::reconcile(self.store.as_ref(), self.stripe.as_ref())
            .await
            .expect("reconcile");
        let paged = reconcile::reconcile_paged(self.store.as_ref(), self.stripe.as_ref(), 1)
            .await
            .expect("reconcile one record at a time");
        let (all, paged) = (tuples(&all), tuples(&paged));
        assert_eq!(all, paged, "paging changed the result");
        all
    }

    /// A PaymentIntent made straight in localstripe, as a charge nobody recorded, holding money.
    async fn plant_intent(&self, order: &str) -> String {
        let intent = self
            .ls
            .post(
                "/v1/payment_intents",
                &[
                    ("amount", "999"),
                    ("currency", "usd"),
                    ("payment_method", "pm_card_visa"),
                    ("payment_method_types[]", "card"),
                    ("confirm", "true"),
                    ("capture_method", "manual"),
                    ("metadata[order_id]", order),
                ],
            )
            .await;
        assert_eq!(intent["status"], "requires_capture", "{intent}");
        intent["id"].as_str().unwrap().to_string()
    }

    async fn cancel_at_stripe(&self, intent: &str) {
        let answer = self.ls.post(&format!("/v1/payment_intents/{intent}/cancel"), &[]).await;
        assert_eq!(answer["status"], "canceled", "{answer}");
    }

    async fn capture_at_stripe(&self, intent: &str) {
        let answer = self
            .ls
            .post(&format!("/v1/payment_intents/{intent}/capture"), &[])
            .await;
        assert_eq!(answer["status"], "succeeded", "{answer}");
    }

    /// Orders in every payment state the reconciliation checks. Returns (fulfilled with capture at
    /// fulfilment, fulfilled with capture at once, voided, declined, authorized, authorized).
    async fn orders_in_every_state(&self) -> [OrderId; 6] {
        let shipped = self.place("pm_card_visa").await;
        self.on_shipment.drain(Duration::from_secs(30)).await.unwrap();
        let paid_at_once = self.place("pm_card_visa").await;
        self.on_payment.drain(Duration::from_secs(30)).await.unwrap();
        let voided = self.place("pm_card_visa").await;
        self.run(CHARGE_PAYMENT).await;
        let outcome = cancel_order(
            self.store.as_ref(),
            &SagaSettings::default(),
            voided,
            CancelReason::CustomerRequest,
        )
        .await
        .unwrap();
        assert_eq!(outcome, CancelOutcome::RefundQueued);
        // localstripe declines a PaymentIntent only for this card; it keeps the failed intent.
        let declined = self.place("pm_card_chargeCustomerFail").await;
        self.on_shipment.drain(Duration::from_secs(30)).await.unwrap();
        let first = self.place("pm_card_visa").await;
        let second = self.place("pm_card_visa").await;
        self.run(CHARGE_PAYMENT).await;

        for (order, status, state, captured) in [
            (shipped, OrderStatus::Fulfilled, "captured", PRICE),
            (paid_at_once, OrderStatus::Fulfilled, "captured", PRICE),
            (voided, OrderStatus::Cancelled, "voided", 0),
            (declined, OrderStatus::Cancelled, "declined", 0),
            (first, OrderStatus::Paid, "authorized", 0),
            (second, OrderStatus::Paid, "authorized", 0),
        ] {
            assert_eq!(self.status(order).await, status, "{order}");
            let payment = self.payment(order).await;
            assert_eq!(
                (
                    payment.provider.as_str(),
                    payment.state.as_str(),
                    payment.captured_minor
                ),
                ("stripe", state, captured),
                "{order}: {payment:?}"
            );
        }
        let voided_intent = self
            .ls
            .get(&format!("/v1/payment_intents/{}", self.intent(voided).await))
            .await;
        assert_eq!(voided_intent["status"], "canceled");
        [shipped, paid_at_once, voided, declined, first, second]
    }

    /// `orderflow audit --payment-provider stripe` at `api_base`.
    async fn audit_cli(&self, api_base: &str, json: bool) -> std::process::Output {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_orderflow"));
        command
            .envs(common::profile_env(self.db.url()))
            .args(["--database-url", self.db.url(), "audit", "--payment-provider", "stripe"])
            .args([
                "--stripe-api-base",
                api_base,
                "--stripe-secret-key",
                localstripe::SECRET_KEY,
            ])
            .args(["--payment-timeout", "5s"])
            .env("ORDERFLOW_LOG", "warn")
            .kill_on_drop(true);
        if json {
            command.arg("--json");
        }
        command.output().await.expect("run orderflow audit")
    }
}

fn tuples(violations: &[Violation]) -> Vec<(&'static str, String, i64, i64)> {
    let mut all: Vec<_> = violations
        .iter()
        .map(|v| (v.check, v.subject.clone(), v.found, v.expected))
        .collect();
    all.sort();
    all
}

fn violation(
    check: &reconcile::Check,
    subject: impl ToString,
    found: i64,
    expected: i64,
) -> (&'static str, String, i64, i64) {
    (check.name, subject.to_string(), found, expected)
}

async fn stripe_books_are_reconciled(backend: Backend) {
    let shop = Shop::new(backend).await;
    let [shipped, _paid_at_once, _voided, _declined, first, second] = shop.orders_in_every_state().await;
    assert_eq!(shop.violations().await, []);
    let report = shop.store.audit().await.unwrap();
    assert!(report.is_clean(), "{report}");

    // Money at Stripe for an order we never charged.
    let stranger = OrderId::new();
    let planted = shop.plant_intent(&stranger.to_string()).await;
    assert_eq!(
        shop.violations().await,
        [violation(&INTENT_HAS_PAYMENT, stranger, 1, 0)]
    );
    // A cancelled intent holds no money.
    shop.cancel_at_stripe(&planted).await;
    assert_eq!(shop.violations().await, []);

    // A charge at Stripe whose commit has not happened yet (a crash between the provider's answer
    // and our transaction): not flagged while the charge step is still queued; its retry heals it.
    let pending = shop.place("pm_card_visa").await;
    let early = shop.plant_intent(&pending.to_string()).await;
    assert_eq!(shop.violations().await, []);
    // Real Stripe would answer the retry with that intent (same idempotency key); localstripe
    // makes a second one, so once the step is done the first is money nobody recorded.
    shop.run(CHARGE_PAYMENT).await;
    assert_eq!(shop.payment(pending).await.state, "authorized");
    assert_ne!(shop.intent(pending).await, early);
    assert_eq!(shop.violations().await, [violation(&INTENT_HAS_PAYMENT, pending, 1, 0)]);
    shop.cancel_at_stripe(&early).await;
    assert_eq!(shop.violations().await, []);

    // Our captured amount edited in the database.
    let shipped_intent = shop.intent(shipped).await;
    shop.db
        .tamper(&format!(
            "UPDATE payments SET captured_minor = 2400 WHERE provider_ref = '{shipped_intent}'"
        ))
        .await;
    assert_eq!(
        shop.violations().await,
        [violation(&AMOUNTS_AGREE, shipped, PRICE, 2400)]
    );
    // The store's own checks cannot see it: only Stripe knows what it took.
    assert!(shop.store.audit().await.unwrap().is_clean());
    shop.db
        .tamper(&format!(
            "UPDATE payments SET captured_minor = {PRICE} WHERE provider_ref = '{shipped_intent}'"
        ))
        .await;
    assert_eq!(shop.violations().await, []);

    // A refund given at Stripe that our books do not know of.
    let refund = shop
        .ls
        .post(
            "/v1/refunds",
            &[("payment_intent", shipped_intent.as_str()), ("amount", "500")],
        )
        .await;
    assert_eq!(refund["amount"], 500, "{refund}");
    assert_eq!(shop.violations().await, [violation(&REFUNDS_AGREE, shipped, 500, 0)]);
    shop.db
        .tamper(&format!(
            "UPDATE payments SET refunded_minor = 500, state = 'partially_refunded' WHERE provider_ref = '{shipped_intent}'"
        ))
        .await;
    assert_eq!(shop.violations().await, []);

    // An authorization captured, another cancelled, behind our back.
    shop.capture_at_stripe(&shop.intent(first).await).await;
    shop.cancel_at_stripe(&shop.intent(second).await).await;
    let mut expected = vec![
        violation(&INTENT_STATE, first, 0, 1),
        violation(&INTENT_STATE, second, 0, 1),
    ];
    expected.sort();
    // While their capture step is queued the difference may be that step's own doing (a crash
    // after Stripe captured, before our commit): not flagged. Once the step is dead, it is.
    assert_eq!(shop.violations().await, []);
    shop.run(FULFIL_ORDER).await;
    // Capturing a captured intent is refused (400): the step is dead.
    assert_eq!(shop.job_state(first, FULFIL_ORDER).await, "dead");
    // localstripe answers a capture of a cancelled intent with 200 and the intent still
    // `canceled` (real Stripe: 400): the step sees no money moved and parks; our books still
    // say authorized while Stripe says cancelled — still flagged.
    assert_eq!(shop.job_state(second, FULFIL_ORDER).await, "dead");
    assert_eq!(shop.payment(second).await.state, "authorized");
    assert_eq!(shop.job_state(pending, FULFIL_ORDER).await, "succeeded");
    assert_eq!(shop.status(pending).await, OrderStatus::Fulfilled);
    assert_eq!(shop.violations().await, expected);

    // Stripe unreachable: the reconciliation fails; it does not pass.
    let closed = stripe_client(&format!("http://127.0.0.1:{}", localstripe::free_port()));
    let error = reconcile::reconcile(shop.store.as_ref(), closed.as_ref())
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ReconcileError::Provider { provider, .. } if provider == "stripe"),
        "{error:?}"
    );
    assert!(error.to_string().contains("stripe"), "{error}");
}

async fn audit_command_reads_stripe_books(backend: Backend) {
    let shop = Shop::new(backend).await;
    let [_shipped, _paid_at_once, _voided, _declined, first, _second] = shop.orders_in_every_state().await;

    let clean = shop.audit_cli(&shop.ls.base_url(), false).await;
    let stdout = String::from_utf8_lossy(&clean.stdout);
    let stderr = String::from_utf8_lossy(&clean.stderr);
    assert_eq!(clean.status.code(), Some(0), "{stdout}\n{stderr}");
    for check in CHECKS {
        assert!(
            stdout.contains(&format!("ok   {:<26} {}", check.name, check.invariant)),
            "{}: {stdout}",
            check.name
        );
    }
    assert!(stdout.contains("ok   payment_in_provider_books"), "{stdout}");
    assert!(stdout.ends_with("all invariants hold\n"), "{stdout}");

    // Without the Stripe flags the audit does not ask Stripe.
    let plain = tokio::process::Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .envs(common::profile_env(shop.db.url()))
        .args(["--database-url", shop.db.url(), "audit"])
        .env("ORDERFLOW_LOG", "warn")
        .env_remove("ORDERFLOW_PAYMENT_PROVIDER")
        .output()
        .await
        .unwrap();
    assert_eq!(plain.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&plain.stdout).contains(INTENT_STATE.name));

    // Broken: an authorization captured behind our back, and money for an order we never charged.
    shop.capture_at_stripe(&shop.intent(first).await).await;
    // (Flagged once its own capture step has run and parked: while it is queued, the difference
    // may be that step's doing.)
    shop.run(FULFIL_ORDER).await;
    let stranger = OrderId::new();
    shop.plant_intent(&stranger.to_string()).await;
    let broken = shop.audit_cli(&shop.ls.base_url(), false).await;
    let stdout = String::from_utf8_lossy(&broken.stdout);
    assert_eq!(broken.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains(&format!("FAIL {:<26}", INTENT_STATE.name)), "{stdout}");
    assert!(
        stdout.contains(&format!("       {first}: found 0, expected 1")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("FAIL {:<26}", INTENT_HAS_PAYMENT.name)),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("       {stranger}: found 1, expected 0")),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("ok   {:<26}", AMOUNTS_AGREE.name)), "{stdout}");
    assert!(stdout.ends_with("2 violation(s)\n"), "{stdout}");

    let json = shop.audit_cli(&shop.ls.base_url(), true).await;
    assert_eq!(json.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).expect("a JSON report");
    let checks: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for check in CHECKS {
        assert!(checks.contains(&check.name), "{checks:?}");
    }
    let mut broken: Vec<(String, String)> = report["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["check"].as_str().unwrap().to_string(),
                v["subject"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    broken.sort();
    let mut expected = vec![
        (INTENT_STATE.name.to_string(), first.to_string()),
        (INTENT_HAS_PAYMENT.name.to_string(), stranger.to_string()),
    ];
    expected.sort();
    assert_eq!(broken, expected);

    // Stripe unreachable: exit 2 with the reason, and no verdict.
    let closed = format!("http://127.0.0.1:{}", localstripe::free_port());
    let outage = shop.audit_cli(&closed, false).await;
    let stdout = String::from_utf8_lossy(&outage.stdout);
    let stderr = String::from_utf8_lossy(&outage.stderr);
    assert_eq!(outage.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("Stripe"), "{stderr}");
    assert!(stderr.contains("provider unavailable"), "{stderr}");
    assert!(!stdout.contains("all invariants hold"), "{stdout}");

    // No key: a configuration error, exit 2.
    let keyless = tokio::process::Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .envs(common::profile_env(shop.db.url()))
        .args(["--database-url", shop.db.url(), "audit", "--payment-provider", "stripe"])
        .args(["--stripe-api-base", &shop.ls.base_url()])
        .env("ORDERFLOW_LOG", "warn")
        .env_remove("ORDERFLOW_STRIPE_SECRET_KEY")
        .output()
        .await
        .unwrap();
    assert_eq!(keyless.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&keyless.stderr).contains("--stripe-secret-key"));
}
