//! The HTTP payment adapter against the sandbox served over real HTTP, on SQLite and PostgreSQL:
//! the saga's outcomes for the sandbox tokens across a network hop (a genuine client-side timeout
//! for `tok_timeout`, still exactly one charge), the outage and its replay, the headers the adapter
//! sends, and how answers are classified.

mod common;

use common::SendJson;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{Backend, TestDb};
use orderflow::adapters::notify::FileNotifier;
use orderflow::adapters::payment::http::{HttpProvider, classify_failure};
use orderflow::adapters::payment::sandbox::Sandbox;
use orderflow::adapters::payment::sandbox_server::{SandboxServerSettings, serve_sandbox};
use orderflow::adapters::payment::{ChargeRequest, PaymentError, PaymentProvider, RefundRequest};
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

on_both_backends!(
    visa_over_http_is_fulfilled_with_one_charge,
    timeout_over_http_charges_exactly_once,
    decline_over_http_cancels_without_a_charge,
    outage_over_http_dead_letters_then_replay_fulfils,
    adapter_sends_idempotency_key_and_api_key,
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
    provider: Arc<HttpProvider>,
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

        let provider = Arc::new(HttpProvider::new(&url, Some(API_KEY.into()), CLIENT_TIMEOUT).unwrap());
        let mail = tempfile::tempdir().unwrap();
        let notifier = Arc::new(FileNotifier::new(mail.path().to_path_buf(), "shop@example.com".into()));
        let runner = common::saga_runner(&store, provider.clone(), notifier);

        let (product, customer) = common::seed_lamp_and_buyer(store.as_ref(), "buyer@example.com").await;
        HttpPipeline {
            store,
            provider,
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

    /// The provider's ledger for an order, read over HTTP.
    async fn charges(&self, reference: &str) -> Vec<Value> {
        let response = self
            .client
            .get(format!("{}/v1/charges", self.url))
            .query(&[("reference", reference)])
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["object"], "list");
        body["data"].as_array().unwrap().clone()
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
    let charges = p.charges(&order.to_string()).await;
    assert_eq!(charges.len(), 1, "{charges:?}");
    assert_eq!(charges[0]["amount_minor"], 7500);
    assert_eq!(charges[0]["calls"], 1);
    assert_eq!(charges[0]["state"], "succeeded");
    assert_eq!(
        charges[0]["idempotency_key"],
        orderflow::workflow::steps::charge_key(order)
    );
    let payment = p.store.payment(order).await.unwrap().unwrap();
    assert_eq!(
        (
            payment.provider.as_str(),
            payment.state.as_str(),
            payment.provider_ref.as_deref()
        ),
        ("http", "captured", charges[0]["id"].as_str())
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
    let charges = p.charges(&order.to_string()).await;
    assert_eq!(charges.len(), 1, "the retry found the first charge");
    assert_eq!(charges[0]["calls"], 2, "two calls, one charge");
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
    let client_timeout = format!("timed out after {} ms", CLIENT_TIMEOUT.as_millis());
    assert!(
        first.contains(&client_timeout) && !first.contains("504"),
        "the first attempt failed with a client-side timeout: {first}"
    );
    let payment = p.store.payment(order).await.unwrap().unwrap();
    assert_eq!(payment.provider_ref.as_deref(), charges[0]["id"].as_str());
    p.assert_audit_clean().await;
}

async fn decline_over_http_cancels_without_a_charge(backend: Backend) {
    let p = HttpPipeline::new(backend).await;
    let order = p.place("tok_chargeDeclined", 4).await;
    p.drain().await;
    assert_eq!(p.status(order).await, OrderStatus::Cancelled);
    assert_eq!(p.stock().await, (100, 0), "stock available again");
    assert!(p.charges(&order.to_string()).await.is_empty());
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
    assert!(p.charges(&order.to_string()).await.is_empty());

    p.set_outage(false).await;
    let replayed = p
        .store
        .replay_jobs(&ReplaySelector::One(dead.items[0].job_id), clock::now())
        .await
        .unwrap();
    assert_eq!(replayed, 1);
    p.drain().await;
    assert_eq!(p.status(order).await, OrderStatus::Fulfilled);
    let charges = p.charges(&order.to_string()).await;
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0]["calls"], 1, "the outage charged nothing");
    p.assert_audit_clean().await;
}

async fn adapter_sends_idempotency_key_and_api_key(backend: Backend) {
    let p = HttpPipeline::new(backend).await;
    let reference = format!("direct-{}", uuid::Uuid::now_v7().simple());
    let request = ChargeRequest {
        idempotency_key: format!("key-{reference}"),
        amount_minor: 1234,
        currency: "USD".into(),
        token: "tok_visa".into(),
        reference: reference.clone(),
        correlation_id: Some("corr-direct".into()),
    };
    let first = p.provider.charge(&request).await.unwrap();
    let second = p.provider.charge(&request).await.unwrap();
    assert!(first.starts_with("ch_"), "{first}");
    assert_eq!(first, second, "the same Idempotency-Key finds the same charge");
    let other = p
        .provider
        .charge(&ChargeRequest {
            idempotency_key: format!("other-{reference}"),
            ..request.clone()
        })
        .await
        .unwrap();
    assert_ne!(other, first, "a new key is a new charge");
    let charges = p.charges(&reference).await;
    assert_eq!(charges.len(), 2);
    let by_key = charges
        .iter()
        .find(|c| c["idempotency_key"] == request.idempotency_key.as_str())
        .unwrap();
    assert_eq!(
        (by_key["id"].as_str(), &by_key["calls"]),
        (Some(first.as_str()), &json!(2))
    );

    // Refunds: idempotent too, and unknown charges are rejected.
    let refund = RefundRequest {
        idempotency_key: format!("refund-{reference}"),
        charge_id: first.clone(),
        amount_minor: 1234,
        correlation_id: None,
    };
    let refunded = p.provider.refund(&refund).await.unwrap();
    assert!(refunded.starts_with("re_"), "{refunded}");
    assert_eq!(p.provider.refund(&refund).await.unwrap(), refunded);
    let charges = p.charges(&reference).await;
    let by_key = charges.iter().find(|c| c["id"] == first.as_str()).unwrap();
    assert_eq!(by_key["state"], "refunded");
    let missing = p
        .provider
        .refund(&RefundRequest {
            idempotency_key: format!("refund-missing-{reference}"),
            charge_id: "ch_missing".into(),
            ..refund.clone()
        })
        .await;
    assert!(matches!(missing, Err(PaymentError::Rejected(_))), "{missing:?}");

    // Declines and bad requests over the wire.
    let declined = p
        .provider
        .charge(&ChargeRequest {
            idempotency_key: format!("declined-{reference}"),
            token: "tok_chargeDeclined".into(),
            ..request.clone()
        })
        .await;
    assert_eq!(declined, Err(PaymentError::Declined("card_declined".into())));
    let zero = p
        .provider
        .charge(&ChargeRequest {
            idempotency_key: format!("zero-{reference}"),
            amount_minor: 0,
            ..request.clone()
        })
        .await;
    assert!(matches!(zero, Err(PaymentError::Rejected(_))), "{zero:?}");

    // Without the header, the server refuses: so the adapter's calls above did send it.
    let raw = p
        .client
        .post(format!("{}/v1/charges", p.url))
        .bearer_auth(API_KEY)
        .json(&json!({ "amount": 100, "currency": "USD", "source": "tok_visa", "reference": reference }))
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), StatusCode::BAD_REQUEST);
    let body: Value = raw.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_idempotency_key");

    // The API key is required and checked; a wrong one is a configuration error, not retried.
    let wrong = HttpProvider::new(&p.url, Some("sk_wrong".into()), CLIENT_TIMEOUT).unwrap();
    let refused = wrong
        .charge(&ChargeRequest {
            idempotency_key: format!("wrong-key-{reference}"),
            ..request.clone()
        })
        .await;
    match refused {
        Err(PaymentError::Rejected(message)) => {
            assert!(message.contains("401"), "{message}");
            assert!(!message.contains("sk_wrong"), "the key never shows: {message}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(!format!("{wrong:?}").contains("sk_wrong"));
    let anonymous = p
        .client
        .get(format!("{}/v1/charges?reference={reference}", p.url))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(p.charges(&reference).await.len(), 2, "refused calls charged nothing");
}

#[tokio::test]
async fn connection_failures_are_transient() {
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let provider = HttpProvider::new(&url, None, Duration::from_secs(2)).unwrap();
    let result = provider
        .charge(&ChargeRequest {
            idempotency_key: "k".into(),
            amount_minor: 100,
            currency: "USD".into(),
            token: "tok_visa".into(),
            reference: "r".into(),
            correlation_id: None,
        })
        .await;
    assert!(matches!(result, Err(PaymentError::Transient(_))), "{result:?}");
}

#[tokio::test]
async fn a_silent_provider_times_out_as_transient() {
    // Accepts connections but never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            sockets.push(socket);
        }
    });
    let provider = HttpProvider::new(&url, None, Duration::from_millis(200)).unwrap();
    let result = provider
        .refund(&RefundRequest {
            idempotency_key: "k".into(),
            charge_id: "ch_1".into(),
            amount_minor: 100,
            correlation_id: None,
        })
        .await;
    match result {
        Err(PaymentError::Transient(message)) => assert!(message.contains("timed out"), "{message}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    held.abort();
}

#[test]
fn status_codes_map_to_payment_errors() {
    let error = |code: &str| json!({ "error": { "code": code, "message": "m" } }).to_string();
    let classify = |status: u16, body: &str| classify_failure(StatusCode::from_u16(status).unwrap(), body.as_bytes());
    assert_eq!(
        classify(402, &error("card_declined")),
        PaymentError::Declined("card_declined".into())
    );
    assert_eq!(
        classify(402, &error("insufficient_funds")),
        PaymentError::Declined("insufficient_funds".into())
    );
    assert_eq!(
        classify(402, "not json"),
        PaymentError::Declined("card_declined".into())
    );
    assert_eq!(
        classify(
            402,
            &json!({ "error": { "code": "card_declined", "decline_code": "stolen_card" } }).to_string()
        ),
        PaymentError::Declined("stolen_card".into())
    );
    for status in [408, 409, 429, 500, 502, 503, 504, 599] {
        match classify(status, &error("x")) {
            PaymentError::Transient(message) => {
                assert!(message.contains(&status.to_string()), "{message}")
            }
            other => panic!("{status}: {other:?}"),
        }
    }
    for status in [400, 401, 403, 404, 405, 410, 422, 301, 302] {
        match classify(status, &error("bad")) {
            PaymentError::Rejected(message) => {
                assert!(message.contains(&status.to_string()), "{message}");
                assert!(message.contains("bad"), "{message}");
            }
            other => panic!("{status}: {other:?}"),
        }
    }
    // Unstructured bodies are kept, shortened.
    match classify(503, &"x".repeat(5000)) {
        PaymentError::Transient(message) => assert!(message.len() < 400, "{}", message.len()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn constructor_validates_configuration() {
    let ok = HttpProvider::new("http://127.0.0.1:9/", Some("sk_secret".into()), Duration::from_secs(1)).unwrap();
    assert_eq!(ok.name(), "http");
    assert_eq!(ok.base_url(), "http://127.0.0.1:9");
    assert!(!format!("{ok:?}").contains("sk_secret"));
    assert_eq!(ok.with_name("acmepay").name(), "acmepay");
    let prefixed = HttpProvider::new("http://127.0.0.1:9/psp/", None, Duration::from_secs(1)).unwrap();
    assert_eq!(prefixed.base_url(), "http://127.0.0.1:9/psp");
    for bad in ["https://example.com", "ftp://x", "not a url", "http://h/?q=1"] {
        assert!(HttpProvider::new(bad, None, Duration::from_secs(1)).is_err(), "{bad}");
    }
    assert!(HttpProvider::new("http://h", None, Duration::ZERO).is_err());
    assert!(HttpProvider::new("http://h", Some(" ".into()), Duration::from_secs(1)).is_err());
    let bad_key = HttpProvider::new("http://h", Some("sk\nsecret".into()), Duration::from_secs(1))
        .unwrap_err()
        .to_string();
    assert!(!bad_key.contains("secret"), "{bad_key}");
}
