//! The sandbox speaks Stripe's protocol: one set of behaviour checks — authorize (manual and
//! automatic), capture (full, partial, retried), void, partial refunds never beyond what was
//! captured, declines booked as `requires_payment_method`, `tok_timeout` / `tok_flaky` /
//! `tok_unavailable` ending with exactly one intent, 3-D Secure, listing — written once against
//! `&dyn PaymentProvider` and run over two transports, on SQLite and PostgreSQL: the in-process
//! [`Sandbox`], and [`StripeClient`] (the adapter for real Stripe and localstripe) talking to the
//! sandbox served over real HTTP. Then what only the wire shows: Stripe's JSON shapes and errors,
//! paging, the API key; and 3-D Secure completed the way localstripe does it (`_authenticate`),
//! in process and over HTTP.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Backend, TestDb};
use orderflow::adapters::payment::PaymentError;
use orderflow::adapters::payment::intents::{
    AuthorizeRequest, CaptureMethod, CaptureRequest, IntentStatus, PaymentProvider, RefundRequest, VoidRequest,
};
use orderflow::adapters::payment::sandbox::AUTHENTICATION_FAILURE;
use orderflow::adapters::payment::sandbox::Sandbox;
use orderflow::adapters::payment::sandbox_server::{SandboxServerSettings, serve_sandbox};
use orderflow::adapters::payment::stripe::{StripeClient, StripeSettings};
use orderflow::store::sandbox::{SandboxBooks, SandboxIntent};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;

on_every_backend!(
    in_process_sandbox_behaves,
    stripe_client_over_http_behaves,
    intents_are_listed_in_pages,
    the_wire_speaks_stripes_shapes,
    a_wrong_api_key_is_rejected,
    three_d_secure_is_authenticated_in_process,
    three_d_secure_is_authenticated_over_http,
    a_capture_whose_commit_fails_is_not_answered_as_captured,
);

const API_KEY: &str = "sk_test_orderflow_sandbox_stripe";
/// The client's patience over HTTP: far above a sandbox call, far below the held answer.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long the server holds a `tok_timeout` first answer.
const TIMEOUT_ANSWER_DELAY: Duration = Duration::from_secs(8);

/// The sandbox served on a real socket over a test database's books.
struct Server {
    url: String,
    sandbox: Arc<Sandbox>,
    client: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
    _db: TestDb,
}

impl Server {
    async fn start(backend: Backend) -> Self {
        let db = TestDb::new(backend).await;
        let store = db.connect().await;
        let books: Arc<dyn SandboxBooks> = store;
        let sandbox = Arc::new(Sandbox::new(books));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve_sandbox(
            listener,
            sandbox.clone(),
            SandboxServerSettings {
                timeout_answer_delay: TIMEOUT_ANSWER_DELAY,
                api_key: Some(API_KEY.into()),
            },
            async move {
                let _ = stopped.await;
            },
        ));
        Server {
            url,
            sandbox,
            client: reqwest::Client::new(),
            _stop: stop,
            _db: db,
        }
    }

    /// The Stripe adapter pointed at this server (`--stripe-api-base`).
    fn stripe(&self, key: &str) -> StripeClient {
        StripeClient::new(StripeSettings {
            api_base: self.url.clone(),
            secret_key: key.into(),
            timeout: CLIENT_TIMEOUT,
        })
        .expect("Stripe client")
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
        assert_eq!(response.json::<Value>().await.unwrap()["active"], active);
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .get(format!("{}{path}", self.url))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        (response.status(), response.json().await.unwrap())
    }

    /// A form POST as Stripe takes it; `key` is the `Idempotency-Key`.
    async fn post(&self, path: &str, key: Option<&str>, form: &[(&str, &str)]) -> reqwest::Response {
        let mut request = self
            .client
            .post(format!("{}{path}", self.url))
            .bearer_auth(API_KEY)
            .form(form);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.send().await.unwrap()
    }

    async fn post_json(&self, path: &str, key: Option<&str>, form: &[(&str, &str)]) -> (StatusCode, Value) {
        let response = self.post(path, key, form).await;
        (response.status(), response.json().await.unwrap())
    }
}

/// How a behaviour check ends or starts the `tok_unavailable` outage on its transport.
enum Transport<'a> {
    InProcess,
    Http(&'a Server),
}

impl Transport<'_> {
    async fn set_outage(&self, sandbox: &Sandbox, active: bool) {
        match self {
            Transport::InProcess => sandbox.set_outage(active),
            Transport::Http(server) => server.set_outage(active).await,
        }
    }
}

fn new_order() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn authorize(order: &str, method: &str, capture: CaptureMethod, amount: i64) -> AuthorizeRequest {
    AuthorizeRequest {
        idempotency_key: format!("orderflow-authorize-{order}"),
        amount_minor: amount,
        currency: "EUR".into(),
        payment_method: method.into(),
        capture,
        order_id: order.into(),
        correlation_id: Some(format!("corr-{order}")),
    }
}

fn capture(intent: &str, amount: i64) -> CaptureRequest {
    CaptureRequest {
        idempotency_key: format!("orderflow-capture-{intent}"),
        intent_id: intent.into(),
        amount_minor: amount,
        correlation_id: None,
    }
}

fn void(intent: &str) -> VoidRequest {
    VoidRequest {
        idempotency_key: format!("orderflow-void-{intent}"),
        intent_id: intent.into(),
        correlation_id: None,
    }
}

fn refund(intent: &str, key: &str, amount: i64, reason: Option<&str>) -> RefundRequest {
    RefundRequest {
        idempotency_key: format!("orderflow-refund-{intent}-{key}"),
        intent_id: intent.into(),
        amount_minor: amount,
        reason: reason.map(str::to_string),
        correlation_id: Some("corr-refund".into()),
    }
}

#[track_caller]
fn assert_rejected<T: std::fmt::Debug>(result: Result<T, PaymentError>, needle: &str) {
    match result {
        Err(PaymentError::Rejected(message)) => assert!(message.contains(needle), "{needle:?} not in {message:?}"),
        other => panic!("expected a rejection mentioning {needle:?}, got {other:?}"),
    }
}

#[track_caller]
fn assert_transient<T: std::fmt::Debug>(result: Result<T, PaymentError>) {
    assert!(
        matches!(result, Err(PaymentError::Transient(_))),
        "expected transient: {result:?}"
    );
}

async fn booked(sandbox: &Sandbox, order: &str) -> Vec<SandboxIntent> {
    sandbox.books().intents_for(order).await.unwrap()
}

/// The behaviour, once, whatever the transport.
async fn behaves(gateway: &dyn PaymentProvider, sandbox: &Sandbox, transport: Transport<'_>) {
    let mut ours: Vec<String> = Vec::new();

    // Manual authorize with Stripe's test PaymentMethod, full capture, retried capture.
    let order = new_order();
    let intent = gateway
        .authorize(&authorize(&order, "pm_card_visa", CaptureMethod::Manual, 5000))
        .await
        .unwrap();
    ours.push(intent.id.clone());
    assert!(intent.id.starts_with("pi_"), "{intent:?}");
    assert_eq!(intent.status, IntentStatus::RequiresCapture);
    assert_eq!((intent.amount_minor, intent.amount_captured_minor), (5000, 0));
    assert_eq!(intent.order_id.as_deref(), Some(order.as_str()));
    assert_eq!(
        (intent.client_secret.as_deref(), intent.last_error.as_deref()),
        (None, None)
    );
    assert_eq!(gateway.retrieve(&intent.id).await.unwrap(), intent);
    let captured = gateway.capture(&capture(&intent.id, 5000)).await.unwrap();
    assert_eq!(captured.status, IntentStatus::Succeeded);
    assert_eq!(captured.amount_captured_minor, 5000);
    assert_eq!(
        gateway.capture(&capture(&intent.id, 5000)).await.unwrap(),
        captured,
        "a capture retried with its key answers the same success"
    );
    assert_rejected(gateway.void(&void(&intent.id)).await, "payment_intent_unexpected_state");
    assert_eq!(booked(sandbox, &order).await[0].currency, "EUR");

    // A token, a partial capture, partial refunds up to what was captured and not beyond.
    let order = new_order();
    let intent = gateway
        .authorize(&authorize(&order, "tok_visa", CaptureMethod::Manual, 5000))
        .await
        .unwrap();
    ours.push(intent.id.clone());
    assert_eq!(intent.status, IntentStatus::RequiresCapture);
    assert_rejected(gateway.capture(&capture(&intent.id, 5001)).await, "amount_to_capture");
    assert_rejected(
        gateway.refund(&refund(&intent.id, "early", 100, None)).await,
        "charge_not_captured",
    );
    let captured = gateway.capture(&capture(&intent.id, 3000)).await.unwrap();
    assert_eq!(
        (
            captured.status.clone(),
            captured.amount_minor,
            captured.amount_captured_minor
        ),
        (IntentStatus::Succeeded, 5000, 3000)
    );
    let first = gateway
        .refund(&refund(&intent.id, "r1", 1000, Some("requested_by_customer")))
        .await
        .unwrap();
    assert!(first.id.starts_with("re_"), "{first:?}");
    assert_eq!((first.amount_minor, first.status.as_str()), (1000, "succeeded"));
    let second = gateway
        .refund(&refund(&intent.id, "r2", 2000, Some("damaged")))
        .await
        .unwrap();
    assert_eq!(second.amount_minor, 2000);
    assert_ne!(second.id, first.id);
    assert_rejected(
        gateway.refund(&refund(&intent.id, "r3", 1, None)).await,
        "amount_too_large",
    );
    assert_eq!(
        gateway
            .refund(&refund(&intent.id, "r1", 1000, Some("requested_by_customer")))
            .await
            .unwrap(),
        first,
        "a refund retried with its key is the same refund"
    );
    let refunds = sandbox.books().intent_refunds(&intent.id).await.unwrap();
    assert_eq!(refunds.len(), 2, "{refunds:?}");
    assert_eq!(
        refunds.iter().map(|r| r.reason.as_deref()).collect::<Vec<_>>(),
        [Some("requested_by_customer"), Some("damaged")],
        "the books keep either reason, whichever transport"
    );
    let books = &booked(sandbox, &order).await[0];
    assert_eq!((books.captured_minor, books.refunded_minor), (3000, 3000));

    // Void, retried; nothing to capture or refund afterwards.
    let order = new_order();
    let intent = gateway
        .authorize(&authorize(&order, "pm_card_visa", CaptureMethod::Manual, 1200))
        .await
        .unwrap();
    ours.push(intent.id.clone());
    let voided = gateway.void(&void(&intent.id)).await.unwrap();
    assert_eq!(
        (voided.status.clone(), voided.amount_captured_minor),
        (IntentStatus::Canceled, 0)
    );
    assert_eq!(gateway.void(&void(&intent.id)).await.unwrap(), voided);
    assert_rejected(
        gateway.capture(&capture(&intent.id, 1200)).await,
        "payment_intent_unexpected_state",
    );
    assert_rejected(
        gateway.refund(&refund(&intent.id, "after-void", 100, None)).await,
        "charge_not_captured",
    );

    // Automatic capture.
    let order = new_order();
    let intent = gateway
        .authorize(&authorize(&order, "tok_visa", CaptureMethod::Automatic, 4200))
        .await
        .unwrap();
    ours.push(intent.id.clone());
    assert_eq!(
        (intent.status.clone(), intent.amount_captured_minor),
        (IntentStatus::Succeeded, 4200)
    );
    assert_eq!(booked(sandbox, &order).await[0].capture_method, "automatic");

    // Declines: the decline code, the intent booked in requires_payment_method; a retry with the
    // key is the same decline and no second intent.
    for method in ["tok_chargeDeclined", "pm_card_chargeDeclined"] {
        let order = new_order();
        let request = authorize(&order, method, CaptureMethod::Manual, 2500);
        assert_eq!(
            gateway.authorize(&request).await,
            Err(PaymentError::Declined("card_declined".into())),
            "{method}"
        );
        assert_eq!(
            gateway.authorize(&request).await,
            Err(PaymentError::Declined("card_declined".into()))
        );
        let books = booked(sandbox, &order).await;
        assert_eq!(books.len(), 1, "{method}: {books:?}");
        assert_eq!(books[0].status, "requires_payment_method");
        assert_eq!(books[0].decline_code.as_deref(), Some("card_declined"));
        assert_eq!(books[0].calls, 2);
        let retrieved = gateway.retrieve(&books[0].id).await.unwrap();
        assert_eq!(retrieved.status, IntentStatus::RequiresPaymentMethod);
        assert_eq!(retrieved.last_error.as_deref(), Some("card_declined"));
        ours.push(books[0].id.clone());
    }

    // tok_timeout: booked, the answer lost (over HTTP a real client-side timeout); the retry with
    // the same key finds the same intent — exactly one in the books.
    let order = new_order();
    let request = authorize(&order, "tok_timeout", CaptureMethod::Manual, 7500);
    let started = Instant::now();
    match gateway.authorize(&request).await {
        Err(PaymentError::Transient(message)) => assert!(message.contains("timed out"), "{message}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    if matches!(transport, Transport::Http(_)) {
        let waited = started.elapsed();
        assert!(
            waited >= CLIENT_TIMEOUT && waited < TIMEOUT_ANSWER_DELAY,
            "the client gave up on the held answer after {waited:?}"
        );
    }
    let retried = gateway.authorize(&request).await.unwrap();
    assert_eq!(retried.status, IntentStatus::RequiresCapture);
    let books = booked(sandbox, &order).await;
    assert_eq!(books.len(), 1, "{books:?}");
    assert_eq!((books[0].id.as_str(), books[0].calls), (retried.id.as_str(), 2));
    let with_key: Vec<_> = sandbox
        .books()
        .intents(None, 10_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.idempotency_key == request.idempotency_key)
        .collect();
    assert_eq!(with_key.len(), 1, "exactly one intent for the key: {with_key:?}");
    assert_eq!(gateway.authorize(&request).await.unwrap().id, retried.id);
    ours.push(retried.id.clone());

    // tok_flaky: two 503s, then approved; one intent.
    let order = new_order();
    let request = authorize(&order, "tok_flaky", CaptureMethod::Manual, 900);
    assert_transient(gateway.authorize(&request).await);
    assert_transient(gateway.authorize(&request).await);
    assert!(booked(sandbox, &order).await.is_empty(), "the failures booked nothing");
    let intent = gateway.authorize(&request).await.unwrap();
    assert_eq!(intent.status, IntentStatus::RequiresCapture);
    assert_eq!(booked(sandbox, &order).await.len(), 1);
    ours.push(intent.id.clone());

    // tok_unavailable: transient while the outage lasts, approved once it ends; one intent.
    transport.set_outage(sandbox, true).await;
    let order = new_order();
    let request = authorize(&order, "tok_unavailable", CaptureMethod::Manual, 800);
    for _ in 0..3 {
        assert_transient(gateway.authorize(&request).await);
    }
    assert!(booked(sandbox, &order).await.is_empty());
    transport.set_outage(sandbox, false).await;
    let intent = gateway.authorize(&request).await.unwrap();
    assert_eq!(intent.status, IntentStatus::RequiresCapture);
    assert_eq!(gateway.authorize(&request).await.unwrap().id, intent.id);
    assert_eq!(booked(sandbox, &order).await.len(), 1);
    transport.set_outage(sandbox, true).await;
    ours.push(intent.id.clone());

    // 3-D Secure: the intent waits for the customer, with the client secret for Stripe.js.
    let order = new_order();
    let intent = gateway
        .authorize(&authorize(
            &order,
            "pm_card_threeDSecure2Required",
            CaptureMethod::Manual,
            3300,
        ))
        .await
        .unwrap();
    assert_eq!(intent.status, IntentStatus::RequiresAction);
    let secret = intent.client_secret.clone().expect("a client secret");
    assert!(secret.starts_with(&format!("{}_secret_", intent.id)), "{secret}");
    ours.push(intent.id.clone());

    // Unknown intents and bad requests are rejections, not retries.
    assert_rejected(gateway.retrieve("pi_doesnotexist").await, "");
    assert_rejected(gateway.capture(&capture("pi_doesnotexist", 100)).await, "");
    assert_rejected(gateway.void(&void("pi_doesnotexist")).await, "");
    assert_rejected(gateway.refund(&refund("pi_doesnotexist", "x", 100, None)).await, "");
    let order = new_order();
    assert_rejected(
        gateway
            .authorize(&authorize(&order, "pm_card_visa", CaptureMethod::Manual, 0))
            .await,
        "amount",
    );
    assert!(booked(sandbox, &order).await.is_empty());

    // The books, listed: every intent made here, declines included.
    let listed: Vec<String> = gateway
        .list_intents()
        .await
        .unwrap()
        .into_iter()
        .map(|intent| intent.id)
        .collect();
    for id in &ours {
        assert!(listed.contains(id), "{id} not listed");
    }
}

async fn in_process_sandbox_behaves(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let books: Arc<dyn SandboxBooks> = store;
    let sandbox = Sandbox::new(books);
    behaves(&sandbox, &sandbox, Transport::InProcess).await;
}

/// The provider answers only for what its books hold: a capture whose commit fails (here refused
/// at commit by the test database — SQLite: a deferred foreign key, PostgreSQL: a deferred
/// constraint trigger; in production a full disk) is answered with an error, never "captured"
/// for a capture that was rolled back. (On SQLite sqlx drops the error of a `RETURNING` write's
/// autocommit when only its first row is fetched.)
async fn a_capture_whose_commit_fails_is_not_answered_as_captured(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let books: Arc<dyn SandboxBooks> = store;
    let sandbox = Sandbox::new(books.clone());
    let order = new_order();
    let intent = sandbox
        .authorize(&authorize(&order, "tok_visa", CaptureMethod::Manual, 500))
        .await
        .unwrap();
    let refuse_captures_at_commit: &[&str] = match backend {
        Backend::Sqlite => &[
            "CREATE TABLE commit_guard (id TEXT PRIMARY KEY)",
            "ALTER TABLE sandbox_intents ADD COLUMN guard TEXT REFERENCES commit_guard (id) DEFERRABLE INITIALLY DEFERRED",
            "CREATE TRIGGER refuse_captures AFTER UPDATE OF status ON sandbox_intents WHEN NEW.status = 'succeeded' \
             BEGIN UPDATE sandbox_intents SET guard = 'missing' WHERE id = NEW.id; END",
        ],
        Backend::Postgres | Backend::Dsql => &[
            "CREATE FUNCTION refuse_capture() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN RAISE EXCEPTION 'refused at commit' USING ERRCODE = '23514'; END $$",
            "CREATE CONSTRAINT TRIGGER refuse_captures AFTER UPDATE ON sandbox_intents \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.status = 'succeeded') \
             EXECUTE FUNCTION refuse_capture()",
        ],
    };
    for sql in refuse_captures_at_commit {
        db.tamper(sql).await;
    }
    let answer = sandbox.capture(&capture(&intent.id, 500)).await;
    let booked = books.intent(&intent.id).await.unwrap().unwrap();
    assert_eq!(booked.status, "requires_capture", "the capture was rolled back");
    assert!(
        answer.is_err(),
        "answered {answer:?} for a capture the books do not hold"
    );
}

async fn stripe_client_over_http_behaves(backend: Backend) {
    let server = Server::start(backend).await;
    let stripe = server.stripe(API_KEY);
    behaves(&stripe, &server.sandbox, Transport::Http(&server)).await;
}

async fn intents_are_listed_in_pages(backend: Backend) {
    let server = Server::start(backend).await;
    let stripe = server.stripe(API_KEY);
    let mut made = Vec::new();
    for n in 0..105 {
        let order = format!("page-{n:03}-{}", new_order());
        let intent = stripe
            .authorize(&authorize(&order, "tok_visa", CaptureMethod::Manual, 100 + n))
            .await
            .unwrap();
        made.push(intent.id);
    }
    // An intent that is not orderflow's (no metadata[order_id]) is booked but not listed.
    let response = server
        .post(
            "/v1/payment_intents",
            Some("not-ours"),
            &[
                ("amount", "100"),
                ("currency", "eur"),
                ("payment_method", "pm_card_visa"),
                ("confirm", "true"),
            ],
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let stranger = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    let mut over_http: Vec<String> = stripe.list_intents().await.unwrap().into_iter().map(|i| i.id).collect();
    let mut in_process: Vec<String> = server
        .sandbox
        .list_intents()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    over_http.sort();
    in_process.sort();
    made.sort();
    assert_eq!(over_http, made, "every page, and only orderflow's intents");
    assert_eq!(in_process, made, "the in-process sandbox lists the same");

    // The pages themselves: Stripe's list shape.
    let (status, page) = server.get("/v1/payment_intents?limit=100").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["object"], "list");
    assert_eq!(page["url"], "/v1/payment_intents");
    assert_eq!(page["has_more"], true);
    let data = page["data"].as_array().unwrap();
    assert_eq!(data.len(), 100);
    let last = data[99]["id"].as_str().unwrap();
    let (_, rest) = server
        .get(&format!("/v1/payment_intents?limit=100&starting_after={last}"))
        .await;
    assert_eq!(rest["has_more"], false);
    assert_eq!(rest["data"].as_array().unwrap().len(), 6, "five more, and the stranger");
    let (_, default) = server.get("/v1/payment_intents").await;
    assert_eq!(default["data"].as_array().unwrap().len(), 10, "Stripe's default page");
    assert!(
        rest["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["id"] == stranger.as_str() && i["metadata"] == json!({})),
        "{rest}"
    );
    for bad in ["limit=0", "limit=101", "limit=ten"] {
        let (status, body) = server.get(&format!("/v1/payment_intents?{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(body["error"]["code"], "parameter_invalid_integer", "{bad}");
        assert_eq!(body["error"]["param"], "limit");
    }
    let (status, body) = server.get("/v1/payment_intents?starting_after=pi_nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "resource_missing");
}

/// `POST /v1/payment_intents` with the form [`StripeClient`] sends.
async fn create_intent(server: &Server, key: &str, method: &str, capture: &str, order: String) -> (StatusCode, Value) {
    let mut form = vec![
        ("amount", "5000"),
        ("currency", "eur"),
        ("confirm", "true"),
        ("capture_method", capture),
        ("payment_method_types[]", "card"),
        ("metadata[order_id]", order.as_str()),
    ];
    if method.starts_with("tok_") {
        form.push(("payment_method_data[type]", "card"));
        form.push(("payment_method_data[card][token]", method));
    } else {
        form.push(("payment_method", method));
    }
    server.post_json("/v1/payment_intents", Some(key), &form).await
}

async fn the_wire_speaks_stripes_shapes(backend: Backend) {
    let server = Server::start(backend).await;
    let order = new_order();
    let create = |key: &'static str, method: &'static str, capture: &'static str| {
        create_intent(&server, key, method, capture, order.clone())
    };

    // An authorization, as Stripe answers it.
    let (status, intent) = create("k-visa", "tok_visa", "manual").await;
    assert_eq!(status, StatusCode::OK, "{intent}");
    assert_eq!(intent["object"], "payment_intent");
    assert_eq!(intent["status"], "requires_capture");
    assert_eq!(intent["amount"], 5000);
    assert_eq!(intent["amount_capturable"], 5000);
    assert_eq!(intent["amount_received"], 0);
    assert_eq!(intent["capture_method"], "manual");
    assert_eq!(intent["currency"], "eur");
    assert_eq!(intent["metadata"], json!({ "order_id": order }));
    assert_eq!(intent["client_secret"], Value::Null);
    assert_eq!(intent["next_action"], Value::Null);
    assert_eq!(intent["last_payment_error"], Value::Null);
    let id = intent["id"].as_str().unwrap().to_string();
    let (status, again) = server.get(&format!("/v1/payment_intents/{id}")).await;
    assert_eq!((status, &again), (StatusCode::OK, &intent));
    let (status, replay) = create("k-visa", "tok_visa", "manual").await;
    assert_eq!(
        (status, &replay),
        (StatusCode::OK, &intent),
        "the key finds the first intent"
    );

    // Capture part of it (a form, as Stripe takes it), then refund in parts.
    let (status, captured) = server
        .post_json(
            &format!("/v1/payment_intents/{id}/capture"),
            Some("k-capture"),
            &[("amount_to_capture", "4000")],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{captured}");
    assert_eq!(
        (
            &captured["status"],
            &captured["amount_received"],
            &captured["amount_capturable"]
        ),
        (&json!("succeeded"), &json!(4000), &json!(0))
    );
    let (status, refund) = server
        .post_json(
            "/v1/refunds",
            Some("k-refund-1"),
            &[
                ("payment_intent", id.as_str()),
                ("amount", "1500"),
                ("reason", "requested_by_customer"),
                ("metadata[idempotency_key]", "k-refund-1"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{refund}");
    assert_eq!(refund["object"], "refund");
    assert_eq!(refund["status"], "succeeded");
    assert_eq!(refund["amount"], 1500);
    assert_eq!(refund["currency"], "eur");
    assert_eq!(refund["payment_intent"], id.as_str());
    assert_eq!(refund["reason"], "requested_by_customer");
    assert_eq!(refund["metadata"]["idempotency_key"], "k-refund-1");
    let (status, too_much) = server
        .post_json(
            "/v1/refunds",
            Some("k-refund-2"),
            &[("payment_intent", id.as_str()), ("amount", "2501")],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(too_much["error"]["type"], "invalid_request_error");
    assert_eq!(too_much["error"]["code"], "amount_too_large");
    // Without an amount: all that is left; then nothing is.
    let (status, rest) = server
        .post_json("/v1/refunds", Some("k-refund-3"), &[("payment_intent", id.as_str())])
        .await;
    assert_eq!((status, &rest["amount"]), (StatusCode::OK, &json!(2500)));
    let (status, none_left) = server
        .post_json("/v1/refunds", Some("k-refund-4"), &[("payment_intent", id.as_str())])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(none_left["error"]["code"], "charge_already_refunded");
    let (status, refunds) = server.get(&format!("/v1/refunds?payment_intent={id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(refunds["object"], "list");
    assert_eq!(refunds["url"], "/v1/refunds");
    assert_eq!(refunds["has_more"], false);
    let amounts: Vec<&Value> = refunds["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["amount"])
        .collect();
    assert_eq!(amounts, [&json!(1500), &json!(2500)]);
    assert_eq!(refunds["data"][0]["id"], refund["id"]);

    // Wrong states.
    let (status, cancel) = server
        .post_json(&format!("/v1/payment_intents/{id}/cancel"), Some("k-cancel"), &[])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(cancel["error"]["code"], "payment_intent_unexpected_state");
    let (_, held) = create("k-held", "pm_card_visa", "manual").await;
    let held = held["id"].as_str().unwrap().to_string();
    let (status, canceled) = server
        .post_json(
            &format!("/v1/payment_intents/{held}/cancel"),
            Some("k-cancel-held"),
            &[("cancellation_reason", "requested_by_customer")],
        )
        .await;
    assert_eq!((status, &canceled["status"]), (StatusCode::OK, &json!("canceled")));
    assert_eq!(canceled["amount_capturable"], 0);
    let (status, capture) = server
        .post_json(
            &format!("/v1/payment_intents/{held}/capture"),
            Some("k-capture-held"),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(capture["error"]["code"], "payment_intent_unexpected_state");

    // A decline: 402 card_error, with the booked intent in the error.
    let (status, declined) = create("k-declined", "tok_chargeDeclined", "manual").await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    let error = &declined["error"];
    assert_eq!(error["type"], "card_error");
    assert_eq!(error["code"], "card_declined");
    assert_eq!(error["decline_code"], "card_declined");
    assert_eq!(error["payment_intent"]["object"], "payment_intent");
    assert_eq!(error["payment_intent"]["status"], "requires_payment_method");
    assert_eq!(
        error["payment_intent"]["last_payment_error"]["decline_code"],
        "card_declined"
    );

    // 3-D Secure: the client secret and next_action.
    let (status, action) = create("k-3ds", "pm_card_threeDSecure2Required", "manual").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(action["status"], "requires_action");
    assert_eq!(action["next_action"]["type"], "use_stripe_sdk");
    assert!(
        action["client_secret"].as_str().unwrap().contains("_secret_"),
        "{action}"
    );

    // The outage: 503 api_error, retry advised.
    let response = server
        .post(
            "/v1/payment_intents",
            Some("k-outage"),
            &[
                ("amount", "100"),
                ("currency", "eur"),
                ("confirm", "true"),
                ("payment_method_data[type]", "card"),
                ("payment_method_data[card][token]", "tok_unavailable"),
            ],
        )
        .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers().get("stripe-should-retry").unwrap(), "true");
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["type"], "api_error");

    // Unknown intents.
    for (status, body) in [
        server.get("/v1/payment_intents/pi_missing").await,
        server
            .post_json(
                "/v1/payment_intents/pi_missing/capture",
                Some("k-m1"),
                &[("amount_to_capture", "1")],
            )
            .await,
        server
            .post_json("/v1/payment_intents/pi_missing/cancel", Some("k-m2"), &[])
            .await,
        server
            .post_json(
                "/v1/refunds",
                Some("k-m3"),
                &[("payment_intent", "pi_missing"), ("amount", "1")],
            )
            .await,
        server.get("/v1/refunds?payment_intent=pi_missing").await,
    ] {
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "resource_missing");
    }

    // Missing and invalid parameters, named.
    for (form, code, param) in [
        (
            vec![
                ("currency", "eur"),
                ("payment_method", "pm_card_visa"),
                ("confirm", "true"),
            ],
            "parameter_missing",
            "amount",
        ),
        (
            vec![
                ("amount", "12.5"),
                ("currency", "eur"),
                ("payment_method", "pm_card_visa"),
                ("confirm", "true"),
            ],
            "parameter_invalid_integer",
            "amount",
        ),
        (
            vec![
                ("amount", "-1"),
                ("currency", "eur"),
                ("payment_method", "pm_card_visa"),
                ("confirm", "true"),
            ],
            "parameter_invalid_integer",
            "amount",
        ),
        (
            vec![
                ("amount", "100"),
                ("payment_method", "pm_card_visa"),
                ("confirm", "true"),
            ],
            "parameter_missing",
            "currency",
        ),
        (
            vec![("amount", "100"), ("currency", "eur"), ("confirm", "true")],
            "parameter_missing",
            "payment_method",
        ),
        (
            vec![
                ("amount", "100"),
                ("currency", "eur"),
                ("payment_method", "pm_card_visa"),
                ("confirm", "true"),
                ("colour", "red"),
            ],
            "parameter_unknown",
            "colour",
        ),
        (
            vec![
                ("amount", "100"),
                ("currency", "eur"),
                ("payment_method", "pm_card_visa"),
                ("payment_method_data[card][token]", "tok_visa"),
                ("confirm", "true"),
            ],
            "parameters_exclusive",
            "payment_method_data",
        ),
    ] {
        let (status, body) = server.post_json("/v1/payment_intents", Some("k-bad"), &form).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{form:?}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(
            (&body["error"]["code"], &body["error"]["param"]),
            (&json!(code), &json!(param)),
            "{form:?}"
        );
    }
    let (status, body) = server
        .post_json(
            &format!("/v1/payment_intents/{id}/capture"),
            Some("k-bad-capture"),
            &[("amount_to_capture", "x")],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["param"], "amount_to_capture");
    let (status, body) = server
        .post_json("/v1/refunds", Some("k-bad-refund"), &[("amount", "100")])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        (&body["error"]["code"], &body["error"]["param"]),
        (&json!("parameter_missing"), &json!("payment_intent"))
    );
    let (status, body) = server
        .post_json(
            "/v1/refunds",
            Some("k-bad-reason"),
            &[("payment_intent", id.as_str()), ("reason", "damaged")],
        )
        .await;
    assert_eq!(
        (status, &body["error"]["param"]),
        (StatusCode::BAD_REQUEST, &json!("reason"))
    );
    // Every POST needs its Idempotency-Key.
    let (status, body) = server
        .post_json(
            "/v1/payment_intents",
            None,
            &[
                ("amount", "100"),
                ("currency", "eur"),
                ("payment_method", "pm_card_visa"),
                ("confirm", "true"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["param"], "Idempotency-Key");
    let (status, _) = server
        .post_json(&format!("/v1/payment_intents/{held}/cancel"), None, &[])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = server.get("/v1/nothing_here").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["type"], "invalid_request_error");

    // The invented JSON charge protocol is gone: no charges, and a JSON refund is not a refund.
    let (status, _) = server.get(&format!("/v1/charges?reference={order}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = server
        .post_json("/v1/charges", Some("k-charge"), &[("amount", "100")])
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let response = server
        .client
        .post(format!("{}/v1/refunds", server.url))
        .bearer_auth(API_KEY)
        .header("Idempotency-Key", "k-json-refund")
        .json(&json!({ "charge": "ch_1", "amount": 100 }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

async fn a_wrong_api_key_is_rejected(backend: Backend) {
    let server = Server::start(backend).await;
    let wrong = server.stripe("sk_test_wrong_key_value");
    let order = new_order();
    match wrong
        .authorize(&authorize(&order, "pm_card_visa", CaptureMethod::Manual, 100))
        .await
    {
        Err(PaymentError::Rejected(message)) => {
            assert!(message.contains("401"), "{message}");
            assert!(!message.contains("wrong_key_value"), "the key never shows: {message}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(matches!(wrong.list_intents().await, Err(PaymentError::Rejected(_))));
    assert!(booked(&server.sandbox, &order).await.is_empty(), "nothing booked");
    let anonymous = server
        .client
        .get(format!("{}/v1/payment_intents", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let body: Value = anonymous.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    // The right key works.
    let intent = server
        .stripe(API_KEY)
        .authorize(&authorize(&order, "pm_card_visa", CaptureMethod::Manual, 100))
        .await
        .unwrap();
    assert_eq!(intent.status, IntentStatus::RequiresCapture);
}

async fn three_d_secure_is_authenticated_in_process(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let books: Arc<dyn SandboxBooks> = store;
    let sandbox = Sandbox::new(books);
    let wait = |order: &str, method: &str, capture: CaptureMethod| authorize(order, method, capture, 3300);

    // Success with manual capture: authorized, then captured as usual.
    let order = new_order();
    let intent = sandbox
        .authorize(&wait(&order, "tok_threeDSecure", CaptureMethod::Manual))
        .await
        .unwrap();
    assert_eq!(intent.status, IntentStatus::RequiresAction);
    let secret = intent.client_secret.clone().expect("a client secret");
    assert_rejected(
        sandbox.authenticate(&intent.id, "pi_other_secret_x", true).await,
        "unauthorized",
    );
    assert_rejected(sandbox.authenticate(&intent.id, "", true).await, "unauthorized");
    assert_eq!(
        sandbox.retrieve(&intent.id).await.unwrap().status,
        IntentStatus::RequiresAction,
        "a wrong secret changes nothing"
    );
    let authenticated = sandbox.authenticate(&intent.id, &secret, true).await.unwrap();
    assert_eq!(authenticated.status, IntentStatus::RequiresCapture);
    assert_eq!(
        (
            authenticated.amount_captured_minor,
            authenticated.client_secret.as_deref()
        ),
        (0, None)
    );
    assert_eq!(authenticated.last_error, None);
    assert_eq!(sandbox.retrieve(&intent.id).await.unwrap(), authenticated, "durable");
    assert_rejected(
        sandbox.authenticate(&intent.id, &secret, true).await,
        "payment_intent_unexpected_state",
    );
    assert_rejected(
        sandbox.authenticate(&intent.id, &secret, false).await,
        "payment_intent_unexpected_state",
    );
    let captured = sandbox.capture(&capture(&intent.id, 3300)).await.unwrap();
    assert_eq!(
        (captured.status, captured.amount_captured_minor),
        (IntentStatus::Succeeded, 3300)
    );

    // Success with automatic capture: captured in full at once.
    let order = new_order();
    let intent = sandbox
        .authorize(&wait(&order, "pm_card_threeDSecure2Required", CaptureMethod::Automatic))
        .await
        .unwrap();
    let secret = intent.client_secret.clone().unwrap();
    let authenticated = sandbox.authenticate(&intent.id, &secret, true).await.unwrap();
    assert_eq!(
        (authenticated.status, authenticated.amount_captured_minor),
        (IntentStatus::Succeeded, 3300)
    );
    let books = &booked(&sandbox, &order).await[0];
    assert_eq!((books.status.as_str(), books.captured_minor), ("succeeded", 3300));

    // Failure: requires_payment_method with the authentication failure; nothing to capture.
    let order = new_order();
    let intent = sandbox
        .authorize(&wait(&order, "tok_threeDSecure", CaptureMethod::Manual))
        .await
        .unwrap();
    let secret = intent.client_secret.clone().unwrap();
    let failed = sandbox.authenticate(&intent.id, &secret, false).await.unwrap();
    assert_eq!(failed.status, IntentStatus::RequiresPaymentMethod);
    assert_eq!(failed.last_error.as_deref(), Some(AUTHENTICATION_FAILURE));
    assert_eq!(failed.amount_captured_minor, 0);
    let books = &booked(&sandbox, &order).await[0];
    assert_eq!(
        (books.status.as_str(), books.decline_code.as_deref()),
        ("requires_payment_method", Some(AUTHENTICATION_FAILURE))
    );
    assert_rejected(
        sandbox.capture(&capture(&intent.id, 3300)).await,
        "payment_intent_unexpected_state",
    );
    assert_rejected(
        sandbox.authenticate(&intent.id, &secret, true).await,
        "payment_intent_unexpected_state",
    );
    // Voiding what failed still works (the saga's compensation may do it).
    assert_eq!(
        sandbox.void(&void(&intent.id)).await.unwrap().status,
        IntentStatus::Canceled
    );

    // Only an intent waiting for the customer can be authenticated.
    let order = new_order();
    let plain = sandbox
        .authorize(&wait(&order, "pm_card_visa", CaptureMethod::Manual))
        .await
        .unwrap();
    let plain_secret = booked(&sandbox, &order).await[0].client_secret.clone();
    assert_eq!(plain_secret, None, "no client secret without 3-D Secure");
    assert_rejected(sandbox.authenticate(&plain.id, "anything", true).await, "unauthorized");
    assert_rejected(sandbox.authenticate("pi_doesnotexist", "x", true).await, "no such");
}

/// `POST /v1/payment_intents/{id}/_authenticate` as localstripe's Stripe.js sends it: the query's
/// `success`, a JSON body with the browser's publishable key and the client secret.
async fn authenticate_over_http(
    server: &Server,
    id: &str,
    query: &str,
    body: &Value,
    bearer: bool,
) -> (StatusCode, Value) {
    let mut request = server
        .client
        .post(format!("{}/v1/payment_intents/{id}/_authenticate{query}", server.url))
        .body(body.to_string());
    if bearer {
        request = request.bearer_auth(API_KEY);
    }
    let response = request.send().await.unwrap();
    (response.status(), response.json().await.unwrap())
}

async fn three_d_secure_is_authenticated_over_http(backend: Backend) {
    let server = Server::start(backend).await;
    let stripe = server.stripe(API_KEY);
    let browser = |secret: &str| json!({ "key": "pk_test_orderflow", "client_secret": secret });

    // Success from the browser (a publishable key, no API key): authorized, as Stripe answers it.
    let order = new_order();
    let (status, intent) = create_intent(&server, "k-3ds-ok", "tok_threeDSecure", "manual", order.clone()).await;
    assert_eq!((status, &intent["status"]), (StatusCode::OK, &json!("requires_action")));
    let id = intent["id"].as_str().unwrap().to_string();
    let secret = intent["client_secret"].as_str().unwrap().to_string();
    let (status, body) =
        authenticate_over_http(&server, &id, "?success=true", &browser("pi_x_secret_wrong"), false).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = authenticate_over_http(
        &server,
        &id,
        "?success=true",
        &json!({ "client_secret": secret }),
        false,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "neither API key nor publishable key: {body}"
    );
    let (status, body) = authenticate_over_http(&server, &id, "?success=true", &json!({ "key": "pk_x" }), false).await;
    assert_eq!(
        (status, &body["error"]["code"], &body["error"]["param"]),
        (
            StatusCode::BAD_REQUEST,
            &json!("parameter_missing"),
            &json!("client_secret")
        )
    );
    let (status, body) = authenticate_over_http(&server, &id, "?success=maybe", &browser(&secret), false).await;
    assert_eq!(
        (status, &body["error"]["param"]),
        (StatusCode::BAD_REQUEST, &json!("success"))
    );
    let (status, body) =
        authenticate_over_http(&server, &id, "?success=true&colour=red", &browser(&secret), false).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::BAD_REQUEST, &json!("parameter_unknown"))
    );
    assert_eq!(
        stripe.retrieve(&id).await.unwrap().status,
        IntentStatus::RequiresAction,
        "refusals change nothing"
    );
    let (status, authenticated) = authenticate_over_http(&server, &id, "?success=true", &browser(&secret), false).await;
    assert_eq!(status, StatusCode::OK, "{authenticated}");
    assert_eq!(authenticated["object"], "payment_intent");
    assert_eq!(authenticated["status"], "requires_capture");
    assert_eq!(authenticated["amount_capturable"], 5000);
    assert_eq!(authenticated["next_action"], Value::Null);
    assert_eq!(authenticated["client_secret"], Value::Null);
    assert_eq!(authenticated["last_payment_error"], Value::Null);
    let (_, again) = server.get(&format!("/v1/payment_intents/{id}")).await;
    assert_eq!(again, authenticated, "durable");
    let retrieved = stripe.retrieve(&id).await.unwrap();
    assert_eq!(
        (retrieved.status, retrieved.order_id.as_deref()),
        (IntentStatus::RequiresCapture, Some(order.as_str()))
    );
    let (status, body) = authenticate_over_http(&server, &id, "?success=true", &browser(&secret), false).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::BAD_REQUEST, &json!("payment_intent_unexpected_state")),
        "a repeat is refused, as localstripe refuses it"
    );

    // Success with automatic capture, by the server with its API key and a form body.
    let (_, intent) = create_intent(
        &server,
        "k-3ds-auto",
        "pm_card_threeDSecure2Required",
        "automatic",
        new_order(),
    )
    .await;
    let id = intent["id"].as_str().unwrap();
    let response = server
        .post(
            &format!("/v1/payment_intents/{id}/_authenticate"),
            None,
            &[
                ("client_secret", intent["client_secret"].as_str().unwrap()),
                ("success", "TRUE"),
            ],
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let captured: Value = response.json().await.unwrap();
    assert_eq!(
        (&captured["status"], &captured["amount_received"]),
        (&json!("succeeded"), &json!(5000))
    );

    // Failure: requires_payment_method, no payment method, Stripe's authentication failure; the
    // Stripe client reads it as the decline the saga acts on.
    let order = new_order();
    let (_, intent) = create_intent(&server, "k-3ds-fail", "tok_threeDSecure", "manual", order.clone()).await;
    let id = intent["id"].as_str().unwrap().to_string();
    let secret = intent["client_secret"].as_str().unwrap().to_string();
    let (status, failed) = authenticate_over_http(&server, &id, "?success=false", &browser(&secret), false).await;
    assert_eq!(status, StatusCode::OK, "{failed}");
    assert_eq!(failed["status"], "requires_payment_method");
    assert_eq!(failed["payment_method"], Value::Null);
    assert_eq!(failed["last_payment_error"]["code"], AUTHENTICATION_FAILURE);
    assert_eq!(failed["last_payment_error"]["type"], "card_error");
    assert_eq!(failed["next_action"], Value::Null);
    let retrieved = stripe.retrieve(&id).await.unwrap();
    assert_eq!(retrieved.status, IntentStatus::RequiresPaymentMethod);
    assert_eq!(retrieved.last_error.as_deref(), Some(AUTHENTICATION_FAILURE));
    assert_eq!(
        booked(&server.sandbox, &order).await[0].status,
        "requires_payment_method"
    );

    // No `success` at all is a failure, as in localstripe.
    let (_, intent) = create_intent(&server, "k-3ds-none", "tok_threeDSecure", "manual", new_order()).await;
    let id = intent["id"].as_str().unwrap();
    let (status, failed) = authenticate_over_http(
        &server,
        id,
        "",
        &browser(intent["client_secret"].as_str().unwrap()),
        true,
    )
    .await;
    assert_eq!(
        (status, &failed["status"]),
        (StatusCode::OK, &json!("requires_payment_method"))
    );

    // Unknown intents; intents not waiting for the customer.
    let (status, body) = authenticate_over_http(&server, "pi_missing", "?success=true", &browser("x"), false).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::NOT_FOUND, &json!("resource_missing"))
    );
    let (status, _) = authenticate_over_http(&server, "ch_missing", "?success=true", &browser("x"), false).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, plain) = create_intent(&server, "k-plain", "pm_card_visa", "manual", new_order()).await;
    let (status, _) = authenticate_over_http(
        &server,
        plain["id"].as_str().unwrap(),
        "?success=true",
        &browser("x"),
        false,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "it has no client secret to match");
}
