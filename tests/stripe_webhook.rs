//! `POST /webhooks/stripe` on the real router over a socket, on SQLite and PostgreSQL: an order
//! paid with 3-D Secure waits (`requires_action`, the client secret in its view); the customer
//! authenticates at the sandbox; Stripe's signed event wakes the payment step, which asks the
//! provider and moves the order on — `paid` after a successful authentication, cancelled with its
//! stock released after a failed one. An early event, a redelivered one, an event about another
//! order or of another type change nothing; a bad signature, a stale timestamp or a missing
//! header are 400 and change nothing; without a secret the route is 404.
//!
//! Events are signed here the way Stripe signs them (`t=<unix>,v1=<hex HMAC-SHA256 of
//! "<t>.<body>">`), by a helper independent of the server's verifier.

mod common;

use std::sync::Arc;

use common::{Backend, TestApp, expect_problem};
use hmac::{Hmac, Mac};
use orderflow::adapters::payment::sandbox::AUTHENTICATION_FAILURE;
use orderflow::http::stripe_webhooks::StripeWebhookSettings;
use orderflow::workflow::CHARGE_PAYMENT;
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};
use sha2::Sha256;

on_every_backend!(
    a_successful_authentication_and_its_event_pay_the_order,
    a_failed_authentication_and_its_event_cancel_the_order,
    unverified_events_change_nothing,
    events_that_concern_no_waiting_order_change_nothing,
    without_a_secret_the_route_is_off,
    cancelling_a_waiting_order_voids_its_intent,
);

const SECRET: &str = "whsec_test_orderflow_stripe_webhooks";
/// The secret being rolled out (both verify while it is).
const NEXT_SECRET: &str = "whsec_test_orderflow_stripe_webhooks_next";

/// Stripe's signature: `t=<unix seconds>,v1=<hex HMAC-SHA256 over "<t>.<payload>">`.
fn sign(payload: &str, secret: &str, t: i64) -> String {
    format!("t={t},v1={}", v1(payload, secret, t))
}

fn v1(payload: &str, secret: &str, t: i64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{payload}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A Stripe Event about a PaymentIntent, as Stripe sends it (trimmed of what nobody reads).
fn event(kind: &str, intent: &str, order: &str, status: &str) -> String {
    json!({
        "id": format!("evt_{}", uuid::Uuid::now_v7().simple()),
        "object": "event",
        "api_version": "2025-10-29.clover",
        "created": now(),
        "livemode": false,
        "pending_webhooks": 1,
        "request": { "id": null, "idempotency_key": null },
        "type": kind,
        "data": { "object": {
            "id": intent,
            "object": "payment_intent",
            "amount": 2000,
            "currency": "usd",
            "capture_method": "manual",
            "status": status,
            "metadata": { "order_id": order },
        } },
    })
    .to_string()
}

/// The app with the webhook secrets configured (the next one too: a roll in progress).
async fn app(backend: Backend) -> TestApp {
    TestApp::spawn_with(backend, |state| {
        state.stripe_webhooks =
            Arc::new(StripeWebhookSettings::new([SECRET.to_string(), NEXT_SECRET.to_string()]).unwrap());
    })
    .await
}

async fn deliver(app: &TestApp, payload: &str, signature: Option<&str>) -> Response {
    let mut request = app
        .client
        .post(format!("{}/webhooks/stripe", app.url))
        .header("content-type", "application/json; charset=utf-8")
        .header("user-agent", "Stripe/1.0 (+https://stripe.com/docs/webhooks)")
        .body(payload.to_string());
    if let Some(signature) = signature {
        request = request.header("stripe-signature", signature);
    }
    request.send().await.expect("POST /webhooks/stripe")
}

/// Delivers a correctly signed event and returns its 200 answer.
async fn deliver_signed(app: &TestApp, payload: &str) -> Value {
    let response = deliver(app, payload, Some(&sign(payload, SECRET, now()))).await;
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

/// An order for 2 × 10.00 paid with a 3-D Secure card, its payment step run: it waits.
struct Waiting {
    order: String,
    product: String,
    token: String,
    intent: String,
    client_secret: String,
}

async fn waiting_order(app: &TestApp) -> Waiting {
    let product = app.product("10.00", 10).await;
    let (_, token) = app.customer().await;
    let response = app
        .place_order(
            &token,
            &uuid::Uuid::now_v7().to_string(),
            &json!({ "items": [{ "product_id": product, "quantity": 2 }], "payment": { "token": "tok_threeDSecure" } }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let order = response.json::<Value>().await.unwrap()["order_id"]
        .as_str()
        .unwrap()
        .to_string();
    app.drain().await;
    let view = view(app, &order, &token).await;
    assert_eq!(view["status"], "pending_payment", "{view}");
    let payment = &view["payment"];
    assert_eq!(payment["state"], "requires_action", "{view}");
    let intent = payment["provider_reference"].as_str().expect("the intent").to_string();
    let client_secret = payment["client_secret"].as_str().expect("a client secret").to_string();
    assert!(
        client_secret.starts_with(&format!("{intent}_secret_")),
        "{client_secret}"
    );
    assert_eq!(app.available(&product).await, 8, "the stock is held while it waits");
    Waiting {
        order,
        product,
        token,
        intent,
        client_secret,
    }
}

async fn view(app: &TestApp, order: &str, token: &str) -> Value {
    let response = app.get(&format!("/orders/{order}"), Some(token)).await;
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

fn timeline_kinds(view: &Value) -> Vec<String> {
    view["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["kind"].as_str().unwrap().to_string())
        .collect()
}

/// The states of the order's `charge_payment` jobs, oldest first.
async fn charge_jobs(app: &TestApp, order: &str) -> Vec<String> {
    app.store
        .jobs_for_order(order.parse().unwrap())
        .await
        .unwrap()
        .into_iter()
        .filter(|job| job.kind == CHARGE_PAYMENT)
        .map(|job| job.state)
        .collect()
}

async fn a_successful_authentication_and_its_event_pay_the_order(backend: Backend) {
    let app = app(backend).await;
    let w = waiting_order(&app).await;
    let capturable = event(
        "payment_intent.amount_capturable_updated",
        &w.intent,
        &w.order,
        "requires_capture",
    );

    // An event before the customer authenticated (forged, or out of order): the step asks the
    // provider, which says the intent still waits — nothing moves.
    let early = deliver_signed(&app, &capturable).await;
    assert_eq!(early["action"], "payment_check_scheduled", "{early}");
    assert_eq!(early["order_id"], w.order.as_str());
    app.drain().await;
    let still = view(&app, &w.order, &w.token).await;
    assert_eq!(
        (&still["status"], &still["payment"]["state"]),
        (&json!("pending_payment"), &json!("requires_action"))
    );

    // The customer authenticates at the sandbox (what Stripe.js does in the browser).
    let authenticated = app
        .sandbox
        .authenticate(&w.intent, &w.client_secret, true)
        .await
        .unwrap();
    assert_eq!(authenticated.status.as_str(), "requires_capture");

    // Stripe's event, signed while the secret is being rolled: one v1 per secret, the old one's
    // first; the order gets one payment check.
    let t = now();
    let rolled = format!(
        "t={t},v1={},v1={}",
        v1(&capturable, "whsec_retired", t),
        v1(&capturable, NEXT_SECRET, t)
    );
    let response = deliver(&app, &capturable, Some(&rolled)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["received"], true);
    assert_eq!(answer["action"], "payment_check_scheduled", "{answer}");
    // Redelivered (Stripe delivers at least once) before the step ran: no second check.
    let again = deliver_signed(&app, &capturable).await;
    assert_eq!(
        (&again["action"], &again["reason"]),
        (&json!("ignored"), &json!("payment_check_already_scheduled"))
    );
    assert_eq!(charge_jobs(&app, &w.order).await, ["succeeded", "succeeded", "ready"]);

    // The step retrieves the intent: paid.
    assert_eq!(app.runner.run_batch(CHARGE_PAYMENT, 10).await.unwrap(), 1);
    let paid = view(&app, &w.order, &w.token).await;
    assert_eq!(paid["status"], "paid", "{paid}");
    assert_eq!(paid["payment"]["state"], "authorized");
    assert_eq!(paid["payment"]["provider_reference"], w.intent.as_str());
    assert!(paid["payment"].get("client_secret").is_none(), "{paid}");
    let kinds = timeline_kinds(&paid);
    assert_eq!(
        kinds.iter().filter(|kind| *kind == "stripe_webhook").count(),
        2,
        "one entry per check scheduled: {kinds:?}"
    );
    assert!(kinds.contains(&"payment_authorized".to_string()), "{kinds:?}");

    // The rest of the pipeline as usual; a late redelivery changes nothing.
    app.drain().await;
    let done = view(&app, &w.order, &w.token).await;
    assert_eq!(done["status"], "fulfilled", "{done}");
    assert_eq!(done["payment"]["state"], "captured");
    let late = deliver_signed(&app, &capturable).await;
    assert_eq!(
        (&late["action"], &late["reason"]),
        (&json!("ignored"), &json!("order_not_waiting_for_payment"))
    );
    let succeeded = deliver_signed(
        &app,
        &event("payment_intent.succeeded", &w.intent, &w.order, "succeeded"),
    )
    .await;
    assert_eq!(succeeded["action"], "ignored");
    assert!(!app.store.has_pending_work().await.unwrap(), "nothing enqueued");
    assert_eq!(app.available(&w.product).await, 8);
    app.assert_audit_clean().await;
}

async fn a_failed_authentication_and_its_event_cancel_the_order(backend: Backend) {
    let app = app(backend).await;
    let w = waiting_order(&app).await;
    app.sandbox
        .authenticate(&w.intent, &w.client_secret, false)
        .await
        .unwrap();
    let failed = event(
        "payment_intent.payment_failed",
        &w.intent,
        &w.order,
        "requires_payment_method",
    );
    let answer = deliver_signed(&app, &failed).await;
    assert_eq!(answer["action"], "payment_check_scheduled", "{answer}");
    app.drain().await;
    let cancelled = view(&app, &w.order, &w.token).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert_eq!(cancelled["payment"]["state"], "declined");
    assert_eq!(app.available(&w.product).await, 10, "the stock is released");
    let payment = app.store.payment(w.order.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(payment.detail.as_deref(), Some(AUTHENTICATION_FAILURE));
    assert!(timeline_kinds(&cancelled).contains(&"stripe_webhook".to_string()));
    // Redelivered: the order no longer waits.
    let again = deliver_signed(&app, &failed).await;
    assert_eq!(again["reason"], "order_not_waiting_for_payment");
    assert!(!app.store.has_pending_work().await.unwrap());
    app.assert_audit_clean().await;
}

async fn unverified_events_change_nothing(backend: Backend) {
    let app = app(backend).await;
    let w = waiting_order(&app).await;
    app.sandbox
        .authenticate(&w.intent, &w.client_secret, true)
        .await
        .unwrap();
    let payload = event("payment_intent.succeeded", &w.intent, &w.order, "requires_capture");
    let t = now();

    for (signature, code) in [
        (
            Some(sign(&payload, "whsec_someone_else", t)),
            "stripe_signature_mismatch",
        ),
        // Correctly signed, but six minutes old (a replay) or from six minutes ahead.
        (Some(sign(&payload, SECRET, t - 360)), "stripe_signature_expired"),
        (Some(sign(&payload, SECRET, t + 360)), "stripe_signature_expired"),
        // Signed over another body.
        (
            Some(sign(&payload.replace("2000", "1"), SECRET, t)),
            "stripe_signature_mismatch",
        ),
        (Some(format!("t={t}")), "stripe_signature_malformed"),
        (Some("v1=deadbeef".to_string()), "stripe_signature_malformed"),
        (None, "stripe_signature_missing"),
    ] {
        let response = deliver(&app, &payload, signature.as_deref()).await;
        let problem = expect_problem(response, 400, code).await;
        assert!(problem["detail"].as_str().unwrap().contains("not"), "{problem}");
    }
    // Not JSON: refused before anything is read.
    let response = app
        .client
        .post(format!("{}/webhooks/stripe", app.url))
        .header("content-type", "text/plain")
        .header("stripe-signature", sign(&payload, SECRET, t))
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    expect_problem(response, 415, "unsupported_media_type").await;
    // Signed, but not an event.
    let junk = r#"{"hello":"world"}"#;
    expect_problem(
        deliver(&app, junk, Some(&sign(junk, SECRET, t))).await,
        400,
        "invalid_event",
    )
    .await;

    // Nothing changed: the order still waits, no check was scheduled, no timeline entry.
    let view = view(&app, &w.order, &w.token).await;
    assert_eq!(
        (&view["status"], &view["payment"]["state"]),
        (&json!("pending_payment"), &json!("requires_action"))
    );
    assert!(!timeline_kinds(&view).contains(&"stripe_webhook".to_string()));
    assert_eq!(charge_jobs(&app, &w.order).await, ["succeeded"]);
    assert!(!app.store.has_pending_work().await.unwrap(), "no job enqueued");
    assert_eq!(app.available(&w.product).await, 8);
}

async fn events_that_concern_no_waiting_order_change_nothing(backend: Backend) {
    let app = app(backend).await;
    let w = waiting_order(&app).await;
    let unknown_order = uuid::Uuid::now_v7().to_string();
    for (payload, reason) in [
        (
            event("charge.succeeded", &w.intent, &w.order, "succeeded"),
            "event_type_not_handled",
        ),
        (
            event("payment_intent.created", &w.intent, &w.order, "requires_action"),
            "event_type_not_handled",
        ),
        (
            event("payment_intent.succeeded", &w.intent, &unknown_order, "succeeded"),
            "unknown_order",
        ),
        (
            event("payment_intent.succeeded", &w.intent, "not-a-uuid", "succeeded"),
            "not_an_orderflow_payment",
        ),
        (
            event("payment_intent.succeeded", "pi_someone_elses", &w.order, "succeeded"),
            "not_the_orders_payment_intent",
        ),
        (
            event("payment_intent.succeeded", &w.intent, &w.order, "succeeded")
                .replace(r#""object":"payment_intent""#, r#""object":"charge""#),
            "not_a_payment_intent",
        ),
    ] {
        let answer = deliver_signed(&app, &payload).await;
        assert_eq!(
            (&answer["action"], &answer["reason"]),
            (&json!("ignored"), &json!(reason)),
            "{payload}"
        );
    }
    // An order that does not wait for its customer (a card without 3-D Secure, paid at once).
    let (_, token) = app.customer().await;
    let response = app
        .place_order(
            &token,
            "plain-visa",
            &json!({ "items": [{ "product_id": w.product, "quantity": 1 }], "payment": { "token": "tok_visa" } }),
        )
        .await;
    let plain = response.json::<Value>().await.unwrap()["order_id"]
        .as_str()
        .unwrap()
        .to_string();
    app.drain().await;
    let payment = app.store.payment(plain.parse().unwrap()).await.unwrap().unwrap();
    let answer = deliver_signed(
        &app,
        &event(
            "payment_intent.succeeded",
            payment.provider_ref.as_deref().unwrap(),
            &plain,
            "succeeded",
        ),
    )
    .await;
    assert_eq!(answer["reason"], "order_not_waiting_for_payment");

    assert_eq!(charge_jobs(&app, &w.order).await, ["succeeded"]);
    assert!(!app.store.has_pending_work().await.unwrap());
    let view = view(&app, &w.order, &w.token).await;
    assert_eq!(view["payment"]["state"], "requires_action");
}

async fn without_a_secret_the_route_is_off(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let payload = event(
        "payment_intent.succeeded",
        "pi_x",
        &uuid::Uuid::now_v7().to_string(),
        "succeeded",
    );
    let problem = expect_problem(
        deliver(&app, &payload, Some(&sign(&payload, SECRET, now()))).await,
        404,
        "stripe_webhooks_not_configured",
    )
    .await;
    assert!(
        problem["detail"].as_str().unwrap().contains("--stripe-webhook-secret"),
        "{problem}"
    );
    let response = app.get("/webhooks/stripe", None).await;
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
}

async fn cancelling_a_waiting_order_voids_its_intent(backend: Backend) {
    let app = app(backend).await;
    let w = waiting_order(&app).await;
    let response = app
        .post(&format!("/orders/{}/cancel", w.order), Some(&w.token), &json!({}))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(app.available(&w.product).await, 10, "the stock is back at once");
    app.drain().await;
    let cancelled = view(&app, &w.order, &w.token).await;
    assert_eq!(
        (&cancelled["status"], &cancelled["payment"]["state"]),
        (&json!("cancelled"), &json!("voided")),
        "{cancelled}"
    );
    // The hold is gone at the provider: a late authentication finds nothing to authorize.
    let intent = app.store.intent(&w.intent).await.unwrap().expect("the intent");
    assert_eq!(intent.status, "canceled");
    assert!(
        app.sandbox
            .authenticate(&w.intent, &w.client_secret, true)
            .await
            .is_err()
    );
    let notifications = cancelled["notifications"].as_array().unwrap();
    assert_eq!(
        notifications
            .iter()
            .filter(|n| n["kind"] == "send_cancellation")
            .count(),
        1,
        "{cancelled}"
    );
    app.assert_audit_clean().await;
}
