//! The buyer cancels a paid order while fulfilment is capturing its payment: whichever of
//! fulfil_order and the cancellation's refund_payment records first, the capture is recorded and
//! the money goes back exactly once, no job is left dead, and the audit is clean (I4).
//!
//! Made deterministic by a provider wrapped around the real sandbox whose `capture` first lets
//! the buyer cancel through the HTTP API (and, in two of the interleavings, runs the refund the
//! cancellation enqueued) before or after delegating to the sandbox.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use common::{Backend, TestApp};
use orderflow::adapters::notify::FileNotifier;
use orderflow::adapters::payment::PaymentError;
use orderflow::adapters::payment::intents::{
    AuthorizeRequest, CaptureRequest, PaymentIntent, PaymentProvider, Refund, RefundRequest, VoidRequest,
};
use orderflow::adapters::payment::sandbox::Sandbox;
use orderflow::domain::OrderId;
use orderflow::queue::Runner;
use orderflow::workflow::steps::refund_key;
use orderflow::workflow::{CHARGE_PAYMENT, REFUND_PAYMENT};
use serde_json::{Value, json};

on_every_backend!(
    cancel_while_capturing_refunds_the_capture,
    refund_before_the_capture_is_recorded_refunds_once,
    void_before_the_capture_leaves_nothing_dead,
);

/// What happens while fulfil_order's capture is on the wire, besides the buyer's cancellation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Meanwhile {
    /// Nothing: fulfil_order's completion is the first to see the cancellation.
    Nothing,
    /// The cancellation's refund_payment runs after the provider captured and before
    /// fulfil_order records anything: its void comes too late.
    RefundAfterCapture,
    /// The cancellation's refund_payment runs before the capture reaches the provider: it voids.
    RefundBeforeCapture,
}

/// The sandbox, with the buyer cancelling the order during the first capture.
struct CancelDuringCapture {
    sandbox: Arc<Sandbox>,
    client: reqwest::Client,
    api: String,
    buyer: String,
    meanwhile: Meanwhile,
    armed: AtomicBool,
    /// The runner this provider serves (to run the refund job from inside the capture).
    runner: OnceLock<Weak<Runner>>,
}

impl CancelDuringCapture {
    async fn run_refund(&self) {
        let runner = self.runner.get().and_then(Weak::upgrade).expect("the runner");
        assert_eq!(
            runner.run_batch(REFUND_PAYMENT, 10).await.expect("refund batch"),
            1,
            "the cancellation enqueued one refund_payment"
        );
    }
}

#[async_trait]
impl PaymentProvider for CancelDuringCapture {
    fn name(&self) -> &str {
        self.sandbox.name()
    }

    async fn authorize(&self, request: &AuthorizeRequest) -> Result<PaymentIntent, PaymentError> {
        self.sandbox.authorize(request).await
    }

    async fn capture(&self, request: &CaptureRequest) -> Result<PaymentIntent, PaymentError> {
        if !self.armed.swap(false, Ordering::SeqCst) {
            return self.sandbox.capture(request).await;
        }
        let intent = self.sandbox.retrieve(&request.intent_id).await?;
        let order = intent.order_id.expect("the intent names its order");
        let cancelled = self
            .client
            .post(format!("{}/orders/{order}/cancel", self.api))
            .bearer_auth(&self.buyer)
            .json(&json!({}))
            .send()
            .await
            .expect("POST cancel");
        assert_eq!(cancelled.status(), 202, "a paid, unshipped order can be cancelled");
        if self.meanwhile == Meanwhile::RefundBeforeCapture {
            self.run_refund().await;
        }
        let captured = self.sandbox.capture(request).await;
        if self.meanwhile == Meanwhile::RefundAfterCapture {
            assert!(captured.is_ok(), "{captured:?}");
            self.run_refund().await;
        }
        captured
    }

    async fn void(&self, request: &VoidRequest) -> Result<PaymentIntent, PaymentError> {
        self.sandbox.void(request).await
    }

    async fn refund(&self, request: &RefundRequest) -> Result<Refund, PaymentError> {
        self.sandbox.refund(request).await
    }

    async fn retrieve(&self, intent_id: &str) -> Result<PaymentIntent, PaymentError> {
        self.sandbox.retrieve(intent_id).await
    }

    async fn list_intents(&self) -> Result<Vec<PaymentIntent>, PaymentError> {
        self.sandbox.list_intents().await
    }
}

/// A paid order (2 × 10.00) whose fulfilment meets the buyer's cancellation, run to the end.
struct Race {
    app: TestApp,
    order: String,
    product: String,
    _mail: tempfile::TempDir,
}

async fn race(backend: Backend, meanwhile: Meanwhile) -> Race {
    let app = TestApp::spawn(backend).await;
    let product = app.product("10.00", 10).await;
    let (_, buyer) = app.customer().await;
    let provider = Arc::new(CancelDuringCapture {
        sandbox: app.sandbox.clone(),
        client: app.client.clone(),
        api: app.url.clone(),
        buyer: buyer.clone(),
        meanwhile,
        armed: AtomicBool::new(false),
        runner: OnceLock::new(),
    });
    let mail = tempfile::tempdir().expect("mail dir");
    let notifier = Arc::new(FileNotifier::new(mail.path().to_path_buf(), "shop@example.com".into()));
    let runner = common::saga_runner(&app.store, provider.clone(), notifier);
    provider.runner.set(Arc::downgrade(&runner)).ok().expect("set once");

    let placed = app
        .place_order(
            &buyer,
            &uuid::Uuid::now_v7().to_string(),
            &json!({"items": [{"product_id": product, "quantity": 2}], "payment": {"token": "tok_visa"}}),
        )
        .await;
    assert_eq!(placed.status(), 202);
    let order = placed.json::<Value>().await.unwrap()["order_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(runner.run_batch(CHARGE_PAYMENT, 10).await.unwrap(), 1);
    assert_eq!(status(&app, &order).await, "paid");

    provider.armed.store(true, Ordering::SeqCst);
    runner.drain(Duration::from_secs(30)).await.expect("the queue drains");
    assert!(!provider.armed.load(Ordering::SeqCst), "fulfilment captured");
    Race {
        app,
        order,
        product,
        _mail: mail,
    }
}

async fn status(app: &TestApp, order: &str) -> String {
    let view: Value = app
        .get(&format!("/orders/{order}"), Some(&app.admin))
        .await
        .json()
        .await
        .unwrap();
    view["status"].as_str().unwrap_or_else(|| panic!("{view}")).to_string()
}

/// The order's timeline entry kinds.
async fn timeline(app: &TestApp, order: &str) -> Vec<String> {
    let details = app.store.get_order(id(order)).await.unwrap().unwrap();
    details.events.into_iter().map(|e| e.kind).collect()
}

/// The order's events out (`payment.captured`, …), in order.
async fn event_types(app: &TestApp, order: &str) -> Vec<String> {
    app.store
        .events()
        .stamp_events(1000, orderflow::clock::now())
        .await
        .expect("stamp");
    let feed: Value = app
        .get("/events?limit=1000", Some(&app.admin))
        .await
        .json()
        .await
        .unwrap();
    feed["data"]
        .as_array()
        .unwrap_or_else(|| panic!("a feed page: {feed}"))
        .iter()
        .filter(|e| e["data"]["order"]["order_id"] == order)
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect()
}

/// Every job of the order finished well: none is dead, none is waiting.
async fn assert_no_job_left(app: &TestApp, order: &str) {
    let jobs = app.store.jobs_for_order(id(order)).await.unwrap();
    assert!(jobs.iter().all(|j| j.state == "succeeded"), "{jobs:?}");
}

/// The capture met the cancellation: recorded, refunded in full once, at the shop and the provider.
async fn assert_refunded_once(race: &Race) {
    let Race { app, order, .. } = race;
    assert_eq!(status(app, order).await, "cancelled");
    let payment = app.store.payment(id(order)).await.unwrap().unwrap();
    assert_eq!(
        (payment.state.as_str(), payment.captured_minor, payment.refunded_minor),
        ("refunded", 2000, 2000),
        "the capture is recorded and refunded in full"
    );
    let intents = app.sandbox.books().intents_for(order).await.unwrap();
    assert_eq!(intents.len(), 1, "{intents:?}");
    assert_eq!(
        (
            intents[0].status.as_str(),
            intents[0].captured_minor,
            intents[0].refunded_minor
        ),
        ("succeeded", 2000, 2000),
        "the provider's books agree"
    );
    let refunds = app.sandbox.books().intent_refunds(&intents[0].id).await.unwrap();
    assert_eq!(refunds.len(), 1, "one refund: {refunds:?}");
    assert_eq!(
        (refunds[0].amount_minor, refunds[0].idempotency_key.as_str()),
        (2000, refund_key(id(order)).as_str())
    );
    let kinds = timeline(app, order).await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "payment_refunded").count(),
        1,
        "{kinds:?}"
    );
    let types = event_types(app, order).await;
    for kind in ["payment.captured", "payment.refunded", "order.cancelled"] {
        assert_eq!(types.iter().filter(|t| *t == kind).count(), 1, "{kind} once: {types:?}");
    }
    let captured = types.iter().position(|t| t == "payment.captured");
    assert!(
        captured < types.iter().position(|t| t == "payment.refunded"),
        "captured, then refunded: {types:?}"
    );
    assert_no_job_left(app, order).await;
    assert_eq!(app.available(&race.product).await, 10, "the stock is back");
    app.assert_audit_clean().await;
}

/// fulfil_order's completion is the first to see the cancellation: it records the capture
/// (`payment_after_cancel`) and the refund follows.
async fn cancel_while_capturing_refunds_the_capture(backend: Backend) {
    let race = race(backend, Meanwhile::Nothing).await;
    assert!(
        timeline(&race.app, &race.order)
            .await
            .contains(&"payment_after_cancel".to_string())
    );
    assert_refunded_once(&race).await;
}

/// The cancellation's refund_payment runs between the capture and fulfil_order's completion:
/// its void is refused (the intent is captured), so it refunds the capture instead; fulfil_order
/// then finds the payment recorded and leaves it.
async fn refund_before_the_capture_is_recorded_refunds_once(backend: Backend) {
    let race = race(backend, Meanwhile::RefundAfterCapture).await;
    let kinds = timeline(&race.app, &race.order).await;
    assert!(!kinds.contains(&"payment_after_cancel".to_string()), "{kinds:?}");
    assert_refunded_once(&race).await;
}

/// The cancellation's refund_payment voids the authorization before the capture reaches the
/// provider: the capture is refused, nothing was taken, and fulfil_order is not left dead.
async fn void_before_the_capture_leaves_nothing_dead(backend: Backend) {
    let race = race(backend, Meanwhile::RefundBeforeCapture).await;
    let Race { app, order, .. } = &race;
    assert_eq!(status(app, order).await, "cancelled");
    let payment = app.store.payment(id(order)).await.unwrap().unwrap();
    assert_eq!((payment.state.as_str(), payment.captured_minor), ("voided", 0));
    let intents = app.sandbox.books().intents_for(order).await.unwrap();
    assert_eq!(
        (intents.len(), intents[0].status.as_str(), intents[0].captured_minor),
        (1, "canceled", 0)
    );
    assert_no_job_left(app, order).await;
    assert_eq!(app.available(&race.product).await, 10);
    app.assert_audit_clean().await;
}

fn id(order: &str) -> OrderId {
    OrderId::from_uuid(order.parse().expect("an order id"))
}
