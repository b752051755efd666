//! The saga over HTTP in Stripe's protocol: the Stripe client against the sandbox served by
//! `sandbox_server`, on SQLite and PostgreSQL. The sandbox tokens' outcomes across a network hop
//! (a genuine client-side timeout for `tok_timeout`, still exactly one PaymentIntent), authorize at
//! checkout and capture on fulfilment, declines, the outage and its replay. (The client's headers
//! and error classification: tests/stripe_localstripe.rs; the server's protocol:
//! tests/sandbox_stripe.rs.)

mod common;

use common::SendJson;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{Backend, TestDb};
use orderflow::adapters::notify::FileNotifier;
use orderflow::adapters::payment::sandbox::Sandbox;
use orderflow::adapters::payment::sandbox_server::{SandboxServerSettings, serve_sandbox};
use orderflow::adapters::payment::stripe::{StripeClient, StripeSettings};
use orderflow::clock;
use orderflow::domain::{Cart, CartLine, CustomerId, OrderId, OrderStatus, PaymentToken, ProductId, Quantity};
use orderflow::queue::Runner;
use orderflow::store::jobs::{JobFilter, ReplaySelector};
use orderflow::store::sandbox::SandboxBooks;
use orderflow::store::{PlaceOrderOutcome, Store};
use orderflow::workflow::CHARGE_PAYMENT;
use orderflow::workflow::checkout::{self, CheckoutRequest, CheckoutSettings};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;

on_every_backend!(
    visa_over_http_is_fulfilled_with_one_charge,
    timeout_over_http_charges_exactly_once,
    decline_over_http_cancels_without_a_charge,
    outage_over_http_dead_letters_then_replay_fulfils,
);

const API_KEY: &str = "sk_test_orderflow_http";
/// The adapter's patience in these tests.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(300);
/// How long the server holds a `tok_timeout` answer: well past the client's patience.
const TIMEOUT_ANSWER_DELAY: Duration = Duration::from_secs(2);

/// The sandbox served on a real socket over a test database's books, and a saga that reaches it
/// through the HTTP adapter.
struct HttpPipeline {
    store: Arc<dyn Store>,
    runner: Arc<Runner>,
    /// The sandbox server's base URL.
    url: String,
    client: reqwest::Client,
    mail_dir: PathBuf,
    product: ProductId,
    customer: CustomerId,
    _stop: tokio::sync::oneshot::Sender<()>,
    _mail: tempfile::TempDir,
    _db: TestDb,
}

impl HttpPipeline {
    async fn new(backend: Backend) -> Self {
        let db = TestDb::new(backend).await;
        let store = db.connect().await;
        let books: Arc<dyn SandboxBooks> = store.clone();
        let sandbox = Arc::new(Sandbox::new(books));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve_sandbox(
            listener,
            sandbox,
            SandboxServerSettings {
                timeout_answer_delay: TIMEOUT_ANSWER_DELAY,
                api_key: Some(API_KEY.into()),
            },
            async move {
                let _ = stopped.await;
            },
        ));

        let provider = Arc::new(
            StripeClient::new(StripeSettings {
                api_base: url.clone(),
                secret_key: API_KEY.into(),
                timeout: CLIENT_TIMEOUT,
            })
            .unwrap(),
        );
        let mail = tempfile::tempdir().unwrap();
        let notifier = Arc::new(FileNotifier::new(mail.path().to_path_buf(), "shop@example.com".into()));
        let runner = common::saga_runner(&store, provider, notifier);

        let (product, customer) = common::seed_lamp_and_buyer(store.as_ref(), "buyer@example.com").await;
        HttpPipeline {
            store,
            runner,
            url,
            client: reqwest::Client::new(),
            mail_dir: mail.path().to_path_buf(),
            product,
            customer,
            _stop: stop,
            _mail: mail,
            _db: db,
        }
    }

    async fn place(&self, token: &str, quantity: i64) -> OrderId {
        let request = CheckoutRequest {
            principal: self.customer.to_string(),
            idempotency_key: uuid::Uuid::now_v7().to_string(),
            customer_id: self.customer,
            cart: Cart::new(vec![CartLine {
                product_id: self.product,
                quantity: Quantity::parse(quantity).unwrap(),
            }])
            .unwrap(),
            payment_token: PaymentToken::parse(token).unwrap(),
            shipping: None,
            correlation_id: Some(format!("corr-{token}")),
        };
        match checkout::place_order(self.store.clone(), &CheckoutSettings::default(), request)
            .await
            .unwrap()
        {
            PlaceOrderOutcome::Created(order) => order.id,
            other => panic!("not placed: {other:?}"),
        }
    }

    async fn drain(&self) {
        self.runner.drain(Duration::from_secs(30)).await.expect("queue drains");
    }

    async fn status(&self, order: OrderId) -> OrderStatus {
        self.store.get_order(order).await.unwrap().unwrap().order.status
    }

    async fn stock(&self) -> (i64, i64) {
        let product = self.store.get_product(self.product).await.unwrap().unwrap();
        (product.on_hand, product.reserved)
    }

    /// The provider's PaymentIntents for an order, read over HTTP in Stripe's protocol.
    async fn intents(&self, order: &str) -> Vec<Value> {
        let response = self
            .client
            .get(format!("{}/v1/payment_intents", self.url))
            .query(&[("limit", "100")])
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["object"], "list");
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|intent| intent["metadata"]["order_id"] == order)
            .cloned()
            .collect()
    }

    /// Create calls the sandbox counted for an intent (its books).
    async fn calls(&self, order: OrderId) -> Vec<i32> {
        let books: &dyn SandboxBooks = self.store.as_ref();
        books
            .intents_for(&order.to_string())
            .await
            .unwrap()
            .iter()
            .map(|i| i.calls)
            .collect()
    }

    async fn set_outage(&self, active: bool) {
        let response = self
            .client
            .post(format!("{}/v1/sandbox/outage", self.url))
            .bearer_auth(API_KEY)
            .json(&json!({ "active": active }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["active"], active);
    }

    async fn charge_job(&self, order: OrderId) -> orderflow::store::JobSummary {
        self.store
            .jobs_for_order(order)
            .await
            .unwrap()
            .into_iter()
            .find(|j| j.kind == CHARGE_PAYMENT)
            .unwrap()
    }

    fn mails(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.mail_dir)
            .map(|dir| {
                dir.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    async fn assert_audit_clean(&self) {
        let report = self.store.audit().await.unwrap();
        assert!(report.is_clean(), "{report}");
    }
}

async fn visa_over_http_is_fulfilled_with_one_charge(backend: Backend) {
    let p = HttpPipeline::new(backend).await;
    let health: Value = p.client.get(format!("{}/health", p.url)).send_json().await;
    assert_eq!(health["status"], "ok");

    let order = p.place("tok_visa", 3).await;
    p.drain().await;
    assert_eq!(p.status(order).await, OrderStatus::Fulfilled);
    assert_eq!(p.stock().await, (97, 0));
    let intents = p.intents(&order.to_string()).await;
    assert_eq!(intents.len(), 1, "{intents:?}");
    assert_eq!(intents[0]["amount"], 7500);
    assert_eq!(intents[0]["amount_received"], 7500, "captured when fulfilled");
    assert_eq!(intents[0]["capture_method"], "manual", "authorized at checkout");
    assert_eq!(intents[0]["status"], "succeeded");
    assert_eq!(p.calls(order).await, [1]);
    let payment = p.store.payment(order).await.unwrap().unwrap();
    assert_eq!(payment.idempotency_key, orderflow::workflow::steps::charge_key(order));
    assert_eq!(
        (
            payment.provider.as_str(),
            payment.state.as_str(),
            payment.provider_ref.as_deref(),
            payment.captured_minor
        ),
        ("stripe", "captured", intents[0]["id"].as_str(), 7500)
    );
    assert_eq!(p.charge_job(order).await.attempts, 1);
    assert_eq!(
        p.mails(),
        [format!("confirmation.{order}.eml"), format!("receipt.{order}.eml")]
    );
    p.assert_audit_clean().await;
}

async fn timeout_over_http_charges_exactly_once(backend: Backend) {
    let p = HttpPipeline::new(backend).await;
    let order = p.place("tok_timeout", 1).await;
    let started = tokio::time::Instant::now();
    p.drain().await;
    let elapsed = started.elapsed();
    assert_eq!(p.status(order).await, OrderStatus::Fulfilled);
    let intents = p.intents(&order.to_string()).await;
    assert_eq!(intents.len(), 1, "the retry found the first intent");
    assert_eq!(p.calls(order).await, [2], "two calls, one intent");
    let job = p.charge_job(order).await;
    assert_eq!(job.attempts, 2);
    assert!(elapsed >= CLIENT_TIMEOUT, "{elapsed:?}");
    let record = p
        .store
        .list_jobs(&JobFilter {
            state: None,
            kind: Some(CHARGE_PAYMENT.into()),
            after: None,
            limit: 50,
        })
        .await
        .unwrap()
        .items
        .remove(0);
    assert_eq!(record.errors.len(), 1, "{:?}", record.errors);
    // A client-side timeout, not the server's (late) 504: the client really gave up.
    let first = &record.errors[0].error;
    assert!(
        first.contains("timed out") && !first.contains("504"),
        "the first attempt failed with a client-side timeout: {first}"
    );
    let payment = p.store.payment(order).await.unwrap().unwrap();
    assert_eq!(payment.provider_ref.as_deref(), intents[0]["id"].as_str());
    p.assert_audit_clean().await;
}

async fn decline_over_http_cancels_without_a_charge(backend: Backend) {
    let p = HttpPipeline::new(backend).await;
    let order = p.place("tok_chargeDeclined", 4).await;
    p.drain().await;
    assert_eq!(p.status(order).await, OrderStatus::Cancelled);
    assert_eq!(p.stock().await, (100, 0), "stock available again");
    let intents = p.intents(&order.to_string()).await;
    assert_eq!(intents.len(), 1);
    assert_eq!(
        (&intents[0]["status"], &intents[0]["amount_received"]),
        (&json!("requires_payment_method"), &json!(0)),
        "the declined intent, nothing taken"
    );
    let payment = p.store.payment(order).await.unwrap().unwrap();
    assert_eq!(payment.state, "declined");
    assert_eq!(payment.detail.as_deref(), Some("card_declined"));
    assert_eq!(p.charge_job(order).await.attempts, 1, "a decline is not retried");
    assert_eq!(p.mails(), [format!("cancellation.{order}.eml")]);
    p.assert_audit_clean().await;
}

async fn outage_over_http_dead_letters_then_replay_fulfils(backend: Backend) {
    let p = HttpPipeline::new(backend).await;
    let order = p.place("tok_unavailable", 2).await;
    p.drain().await;
    assert_eq!(p.status(order).await, OrderStatus::PendingPayment);
    assert_eq!(p.stock().await, (100, 2), "the reservation is held while parked");
    let dead = p
        .store
        .list_jobs(&JobFilter {
            state: Some("dead".into()),
            kind: Some(CHARGE_PAYMENT.into()),
            after: None,
            limit: 50,
        })
        .await
        .unwrap();
    assert_eq!(dead.items.len(), 1);
    assert_eq!(dead.items[0].attempts, 3);
    let last_error = dead.items[0].last_error.as_deref().unwrap();
    assert!(last_error.contains("503"), "{last_error}");
    assert!(
        p.intents(&order.to_string()).await.is_empty(),
        "the outage booked nothing"
    );

    p.set_outage(false).await;
    let replayed = p
        .store
        .replay_jobs(&ReplaySelector::One(dead.items[0].job_id), clock::now())
        .await
        .unwrap();
    assert_eq!(replayed, 1);
    p.drain().await;
    assert_eq!(p.status(order).await, OrderStatus::Fulfilled);
    assert_eq!(p.intents(&order.to_string()).await.len(), 1);
    assert_eq!(p.calls(order).await, [1], "the outage booked nothing");
    p.assert_audit_clean().await;
}
