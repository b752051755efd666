//! The saga end to end over the real API with the Stripe client as the pipeline's provider,
//! against a real localstripe, on SQLite and PostgreSQL, with `--fulfilment external` and
//! `--capture on-shipment`: an order paid with `pm_card_visa` is only authorized (its
//! PaymentIntent `requires_capture` for the order's total), the warehouse's first (partial)
//! shipment captures it, the second fulfils the order, and a partial refund (reason `returned`)
//! is one refund of exactly that amount in localstripe's books and `succeeded` on the order. A
//! cancelled authorized order's PaymentIntent is `canceled` and its stock back; a declined card
//! cancels the order and releases its stock.
//!
//! Every claim is read twice: through the API (the order view) and straight from localstripe's
//! own state (`GET /v1/payment_intents/{id}`, `/v1/refunds?payment_intent=`, `/v1/charges/{id}`),
//! bypassing the client under test.
//!
//! localstripe (1.15.10) quirks shaping this file: it refuses any refund `reason` parameter,
//! so refunds here use `returned` (which the client sends as `metadata[reason]`); it does not know
//! Stripe's test method `pm_card_chargeDeclined` (it answers 404, which the client rightly reads as
//! a rejected request, not a decline), and declines a PaymentIntent only for
//! `pm_card_chargeCustomerFail` (card 4000000000000341, "declined when charged") — that is the
//! declining card used here.

mod common;
#[path = "support/localstripe.rs"]
mod localstripe;

use std::sync::Arc;
use std::time::Duration;

use common::{Backend, TestApp, expect_problem};
use localstripe::Localstripe;
use orderflow::adapters::notify::FileNotifier;
use orderflow::adapters::payment::stripe::{StripeClient, StripeSettings};
use orderflow::queue::Runner;
use orderflow::workflow::reconcile;
use orderflow::workflow::steps::{CaptureMode, FulfilmentMode, SagaSettings};
use reqwest::Response;
use serde_json::{Value, json};

on_every_backend!(
    authorize_ship_in_parts_capture_once_then_refund_part,
    cancelling_an_authorized_order_voids_it_and_restocks,
    a_declined_card_cancels_the_order_and_releases_stock,
);

/// localstripe's declining test method (see the module docs).
const DECLINING_METHOD: &str = "pm_card_chargeCustomerFail";

/// The API served over a fresh database, its pipeline paying through localstripe.
struct StripeShop {
    app: TestApp,
    /// The saga with the Stripe client (the app's own runner, with the in-process sandbox, is
    /// never drained here).
    runner: Arc<Runner>,
    stripe: Arc<StripeClient>,
    ls: Localstripe,
    _mail: tempfile::TempDir,
}

impl StripeShop {
    async fn start(backend: Backend) -> Self {
        let settings = SagaSettings {
            capture: CaptureMode::OnShipment,
            fulfilment: FulfilmentMode::External,
            ..SagaSettings::default()
        };
        let api_settings = settings.clone();
        let (app, ls) = tokio::join!(
            TestApp::spawn_with(backend, move |state| state.saga = Arc::new(api_settings)),
            Localstripe::start()
        );
        let stripe = Arc::new(
            StripeClient::new(StripeSettings {
                api_base: ls.base_url(),
                secret_key: localstripe::SECRET_KEY.into(),
                timeout: Duration::from_secs(10),
            })
            .expect("Stripe client"),
        );
        let mail = tempfile::tempdir().expect("mail dir");
        let notifier = Arc::new(FileNotifier::new(mail.path().to_path_buf(), "shop@example.com".into()));
        let runner =
            common::saga_runner_with_settings(&app.store, stripe.clone(), notifier, app.metrics.clone(), settings);
        StripeShop {
            app,
            runner,
            stripe,
            ls,
            _mail: mail,
        }
    }

    /// Runs the Stripe pipeline until no job is ready or running.
    async fn drain(&self) {
        self.runner
            .drain(Duration::from_secs(60))
            .await
            .expect("the queue drains");
    }

    /// Places an order of `items` (product, quantity) paid with a Stripe PaymentMethod; returns
    /// its id.
    async fn place(&self, items: &[(&str, u32)], method: &str) -> String {
        let (_, buyer) = self.app.customer().await;
        let items: Vec<Value> = items
            .iter()
            .map(|(product, quantity)| json!({ "product_id": product, "quantity": quantity }))
            .collect();
        // A PaymentMethod id goes in `method` (API.md); `token` is for `tok_…` card tokens.
        let body = json!({ "items": items, "payment": { "method": method } });
        let placed = json_of(
            self.app
                .place_order(&buyer, &uuid::Uuid::now_v7().to_string(), &body)
                .await,
            202,
        )
        .await;
        assert_eq!(placed["status"], "pending_payment", "{placed}");
        placed["order_id"].as_str().expect("order_id").to_string()
    }

    async fn order(&self, id: &str) -> Value {
        json_of(self.app.get(&format!("/orders/{id}"), Some(&self.app.admin)).await, 200).await
    }

    async fn post(&self, path: &str, token: &str, key: &str, body: &Value) -> Response {
        self.app
            .client
            .post(format!("{}{path}", self.app.url))
            .bearer_auth(token)
            .header("idempotency-key", key)
            .json(body)
            .send()
            .await
            .expect("POST")
    }

    /// A warehouse's token (role `fulfilment`).
    fn warehouse(&self) -> String {
        self.app
            .auth
            .issue("warehouse-1", &["fulfilment".into()], Duration::from_secs(3600))
            .expect("token")
    }

    /// localstripe's own record of a PaymentIntent.
    async fn intent(&self, id: &str) -> Value {
        self.ls.get(&format!("/v1/payment_intents/{id}")).await
    }

    /// Every PaymentIntent localstripe holds for the order (`metadata[order_id]`).
    async fn intents_for(&self, order: &str) -> Vec<Value> {
        let page = self.ls.get("/v1/payment_intents?limit=100").await;
        assert_eq!(page["has_more"], false, "more than one page: {page}");
        page["data"]
            .as_array()
            .expect("a list")
            .iter()
            .filter(|i| i["metadata"]["order_id"] == order)
            .cloned()
            .collect()
    }

    /// The refunds localstripe holds for a PaymentIntent.
    async fn refunds_of(&self, intent: &str) -> Vec<Value> {
        let list = self.ls.get(&format!("/v1/refunds?payment_intent={intent}")).await;
        list["data"].as_array().expect("a refund list").clone()
    }

    /// Our books and localstripe's agree (the audit's Stripe half), and the store's audit is clean.
    async fn assert_books_agree(&self) {
        let violations = reconcile::reconcile(self.app.store.as_ref(), self.stripe.as_ref())
            .await
            .expect("reconcile with localstripe");
        assert!(violations.is_empty(), "{violations:?}");
        self.app.assert_audit_clean().await;
    }
}

/// What localstripe took on a PaymentIntent: Stripe's `amount_received`, which localstripe does
/// not serve, so its charge's amount once captured and succeeded.
fn received(intent: &Value) -> i64 {
    if let Some(received) = intent["amount_received"].as_i64() {
        return received;
    }
    let charge = &intent["latest_charge"];
    assert!(charge.is_object(), "no charge on {intent}");
    if charge["captured"] == true && charge["status"] == "succeeded" {
        charge["amount"].as_i64().expect("a charge amount")
    } else {
        0
    }
}

async fn json_of(response: Response, status: u16) -> Value {
    let actual = response.status().as_u16();
    let body: Value = response.json().await.expect("json");
    assert_eq!(actual, status, "{body}");
    body
}

/// An API money amount as text, exactly as sent (`"40.00"`).
fn money(value: &Value) -> String {
    assert!(value.is_number(), "not an amount: {value}");
    value.to_string()
}

/// The order's events on the feed, in position order.
async fn events(app: &TestApp, order_id: &str) -> Vec<Value> {
    app.store
        .events()
        .stamp_events(1000, orderflow::clock::now())
        .await
        .expect("stamp");
    let feed = json_of(app.get("/events?limit=1000", Some(&app.admin)).await, 200).await;
    feed["data"]
        .as_array()
        .unwrap_or_else(|| panic!("a feed page: {feed}"))
        .iter()
        .filter(|e| e["data"]["order"]["order_id"] == order_id)
        .cloned()
        .collect()
}

async fn event_types(app: &TestApp, order_id: &str) -> Vec<String> {
    events(app, order_id)
        .await
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect()
}

async fn authorize_ship_in_parts_capture_once_then_refund_part(backend: Backend) {
    let shop = StripeShop::start(backend).await;
    let (a, b) = (shop.app.product("10.00", 10).await, shop.app.product("5.00", 10).await);
    // 3 × 10.00 + 2 × 5.00
    let id = shop.place(&[(&a, 3), (&b, 2)], "pm_card_visa").await;
    shop.drain().await;

    // Authorized only, for the total, and ready to ship: waiting for the warehouse.
    let view = shop.order(&id).await;
    assert_eq!(view["status"], "paid", "{view}");
    assert_eq!(money(&view["total_amount"]), "40.00");
    let payment = &view["payment"];
    assert_eq!(payment["provider"], "stripe", "{view}");
    assert_eq!(payment["state"], "authorized", "{view}");
    assert_eq!(money(&payment["authorized_amount"]), "40.00");
    assert_eq!(money(&payment["captured_amount"]), "0.00");
    assert_eq!(
        view["pending_steps"],
        json!([]),
        "nothing runs until a shipment: {view}"
    );
    let intent_id = payment["provider_reference"]
        .as_str()
        .expect("a PaymentIntent")
        .to_string();
    assert!(intent_id.starts_with("pi_"), "{intent_id}");
    let intent = shop.intent(&intent_id).await;
    assert_eq!(intent["status"], "requires_capture", "{intent}");
    assert_eq!(intent["amount"], 4000, "{intent}");
    assert_eq!(intent["currency"], "usd");
    assert_eq!(intent["capture_method"], "manual");
    assert_eq!(intent["metadata"]["order_id"], id.as_str());
    assert_eq!(intent["latest_charge"]["captured"], false, "{intent}");
    assert_eq!(received(&intent), 0, "{intent}");
    // Stock is committed (the goods are set aside for the warehouse).
    assert_eq!((shop.app.available(&a).await, shop.app.available(&b).await), (7, 8));
    shop.assert_books_agree().await;

    // The first, partial shipment captures the whole authorization.
    let path = format!("/orders/{id}/shipments");
    let first = json!({ "carrier": "DHL", "tracking_number": "JD0001", "items": [{ "product_id": a, "quantity": 2 }] });
    let shipment = json_of(shop.post(&path, &shop.warehouse(), "ship-1", &first).await, 201).await;
    assert_eq!(shipment["items"], json!([{ "product_id": a, "quantity": 2 }]));
    shop.drain().await;
    let view = shop.order(&id).await;
    assert_eq!(view["status"], "paid", "units are still to ship: {view}");
    assert_eq!(view["payment"]["state"], "captured", "{view}");
    assert_eq!(money(&view["payment"]["captured_amount"]), "40.00");
    let intent = shop.intent(&intent_id).await;
    assert_eq!(intent["status"], "succeeded", "{intent}");
    assert_eq!(received(&intent), 4000, "{intent}");
    assert_eq!(intent["latest_charge"]["captured"], true, "{intent}");
    assert_eq!(intent["latest_charge"]["amount"], 4000);
    shop.assert_books_agree().await;

    // The second ships the rest and fulfils the order; nothing more is taken.
    let rest = json!({ "carrier": "DHL", "tracking_number": "JD0002" });
    json_of(shop.post(&path, &shop.warehouse(), "ship-2", &rest).await, 201).await;
    shop.drain().await;
    let view = shop.order(&id).await;
    assert_eq!(view["status"], "fulfilled", "{view}");
    assert_eq!(view["shipments"].as_array().map(Vec::len), Some(2), "{view}");
    assert_eq!(money(&view["payment"]["captured_amount"]), "40.00");
    let intents = shop.intents_for(&id).await;
    assert_eq!(intents.len(), 1, "one PaymentIntent for the order: {intents:?}");
    assert_eq!(intents[0]["id"], intent_id.as_str());
    assert_eq!(intents[0]["status"], "succeeded");
    assert_eq!(received(&intents[0]), 4000, "{intents:?}");
    assert_eq!(
        shop.refunds_of(&intent_id).await,
        Vec::<Value>::new(),
        "nothing refunded yet"
    );

    // A partial refund of 12.50 for returned goods: one refund of exactly that at Stripe.
    let refund = json_of(
        shop.post(
            &format!("/orders/{id}/refunds"),
            &shop.app.admin,
            "refund-1",
            &json!({ "amount": 12.5, "reason": "returned" }),
        )
        .await,
        202,
    )
    .await;
    assert_eq!(refund["state"], "pending", "{refund}");
    assert_eq!(money(&refund["amount"]), "12.50");
    let refund_id = refund["refund_id"].as_str().expect("refund_id").to_string();
    shop.drain().await;
    let view = shop.order(&id).await;
    assert_eq!(
        view["status"], "fulfilled",
        "a partial refund keeps the order fulfilled: {view}"
    );
    assert_eq!(view["payment"]["state"], "partially_refunded", "{view}");
    assert_eq!(money(&view["payment"]["refunded_amount"]), "12.50");
    assert_eq!(money(&view["payment"]["captured_amount"]), "40.00");
    let refunds = view["refunds"].as_array().expect("refunds");
    assert_eq!(refunds.len(), 1, "{view}");
    assert_eq!(refunds[0]["refund_id"], refund_id.as_str());
    assert_eq!(refunds[0]["state"], "succeeded", "{view}");
    assert_eq!(refunds[0]["reason"], "returned");
    assert_eq!(money(&refunds[0]["amount"]), "12.50");
    let provider_refund = refunds[0]["provider_reference"].as_str().expect("the Stripe refund id");
    assert!(provider_refund.starts_with("re_"), "{provider_refund}");

    let at_stripe = shop.refunds_of(&intent_id).await;
    assert_eq!(at_stripe.len(), 1, "exactly one refund at Stripe: {at_stripe:?}");
    assert_eq!(at_stripe[0]["id"], provider_refund);
    assert_eq!(at_stripe[0]["amount"], 1250, "{at_stripe:?}");
    assert_eq!(at_stripe[0]["payment_intent"], intent_id.as_str());
    assert_eq!(at_stripe[0]["metadata"]["reason"], "returned", "{at_stripe:?}");
    assert_eq!(
        at_stripe[0]["metadata"]["idempotency_key"],
        orderflow::workflow::steps::settle_refund_key(refund_id.parse().unwrap()).as_str(),
        "{at_stripe:?}"
    );
    let charge = intents[0]["latest_charge"]["id"].as_str().expect("a charge id");
    let charge = shop.ls.get(&format!("/v1/charges/{charge}")).await;
    assert_eq!(charge["amount_refunded"], 1250, "{charge}");
    assert_eq!(charge["amount"], 4000);

    let types = event_types(&shop.app, &id).await;
    for (kind, times) in [
        ("order.paid", 1),
        ("order.ready_to_ship", 1),
        ("order.shipped", 2),
        ("payment.captured", 1),
        ("order.fulfilled", 1),
        ("payment.refunded", 1),
    ] {
        assert_eq!(types.iter().filter(|t| *t == kind).count(), times, "{kind}: {types:?}");
    }
    shop.assert_books_agree().await;
}

async fn cancelling_an_authorized_order_voids_it_and_restocks(backend: Backend) {
    let shop = StripeShop::start(backend).await;
    let product = shop.app.product("10.00", 10).await;
    let id = shop.place(&[(&product, 2)], "pm_card_visa").await;
    shop.drain().await;
    let view = shop.order(&id).await;
    assert_eq!(
        (view["status"].as_str(), view["payment"]["state"].as_str()),
        (Some("paid"), Some("authorized")),
        "{view}"
    );
    assert_eq!(shop.app.available(&product).await, 8);
    let intent_id = view["payment"]["provider_reference"].as_str().unwrap().to_string();
    assert_eq!(shop.intent(&intent_id).await["status"], "requires_capture");

    let cancelled = shop
        .app
        .post(&format!("/orders/{id}/cancel"), Some(&shop.app.admin), &json!({}))
        .await;
    assert_eq!(cancelled.status(), 202);
    shop.drain().await;
    let view = shop.order(&id).await;
    assert_eq!(view["status"], "cancelled", "{view}");
    assert_eq!(view["payment"]["state"], "voided", "{view}");
    assert_eq!(money(&view["payment"]["captured_amount"]), "0.00");
    assert_eq!(view["pending_steps"], json!([]), "{view}");
    let intent = shop.intent(&intent_id).await;
    assert_eq!(intent["status"], "canceled", "the authorization is released: {intent}");
    assert_eq!(received(&intent), 0, "{intent}");
    assert_eq!(
        shop.refunds_of(&intent_id).await,
        Vec::<Value>::new(),
        "a void, no refund"
    );
    assert_eq!(shop.app.available(&product).await, 10, "the stock is back");
    // Nothing left to ship.
    expect_problem(
        shop.post(
            &format!("/orders/{id}/shipments"),
            &shop.warehouse(),
            "ship-1",
            &json!({ "carrier": "DHL", "tracking_number": "JD0001" }),
        )
        .await,
        409,
        "order_not_ready",
    )
    .await;
    let types = event_types(&shop.app, &id).await;
    assert!(types.contains(&"order.cancelled".to_string()), "{types:?}");
    assert!(!types.contains(&"payment.captured".to_string()), "{types:?}");
    shop.assert_books_agree().await;
}

async fn a_declined_card_cancels_the_order_and_releases_stock(backend: Backend) {
    let shop = StripeShop::start(backend).await;
    let product = shop.app.product("10.00", 10).await;
    let id = shop.place(&[(&product, 3)], DECLINING_METHOD).await;
    assert_eq!(shop.app.available(&product).await, 7, "reserved at checkout");
    shop.drain().await;
    let view = shop.order(&id).await;
    assert_eq!(view["status"], "cancelled", "{view}");
    assert_eq!(view["payment"]["state"], "declined", "{view}");
    assert_eq!(view["payment"]["provider"], "stripe");
    assert_eq!(money(&view["payment"]["captured_amount"]), "0.00");
    assert_eq!(view["pending_steps"], json!([]), "nothing parked: {view}");
    assert_eq!(shop.app.available(&product).await, 10, "the reservation is released");
    // localstripe took nothing: no intent for the order holds money.
    for intent in shop.intents_for(&id).await {
        assert_eq!(received(&intent), 0, "{intent}");
        assert_ne!(intent["status"], "requires_capture", "{intent}");
        assert_ne!(intent["status"], "succeeded", "{intent}");
    }
    let events = events(&shop.app, &id).await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["order.placed", "order.cancelled"], "{events:?}");
    assert_eq!(events[1]["data"]["reason"], "payment_declined", "{events:?}");
    shop.assert_books_agree().await;
}
