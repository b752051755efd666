//! After the payment, over the real API on every backend (SQLite, PostgreSQL, the emulated DSQL):
//! external fulfilment (partial shipments, the first one capturing, the last one fulfilling;
//! idempotent; refused beyond what is unshipped) and refunds after delivery (partial, bounded by
//! the capture, restocking, idempotent, settled by a durable step at the provider).

mod common;

use std::time::Duration;

use common::{Backend, TestApp, expect_problem};
use orderflow::workflow::steps::{FulfilmentMode, SagaSettings};
use reqwest::Response;
use serde_json::{Value, json};

on_every_backend!(
    partial_shipments_capture_first_and_fulfil_last,
    shipments_are_refused_when_not_ready_or_too_many,
    refunds_in_parts_up_to_the_capture_with_restock,
    refunds_are_refused_for_bad_requests_and_unfulfilled_orders,
);

async fn external(backend: Backend) -> TestApp {
    TestApp::spawn_with(backend, |state| {
        state.saga = std::sync::Arc::new(SagaSettings {
            fulfilment: FulfilmentMode::External,
            ..SagaSettings::default()
        });
    })
    .await
}

fn warehouse(app: &TestApp) -> String {
    app.auth
        .issue("warehouse-1", &["fulfilment".into()], Duration::from_secs(3600))
        .expect("token")
}

async fn send(app: &TestApp, path: &str, token: &str, key: Option<&str>, body: &Value) -> Response {
    let mut request = app
        .client
        .post(format!("{}{path}", app.url))
        .bearer_auth(token)
        .json(body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.send().await.expect("POST")
}

/// A money amount of the API (a JSON number with the currency's digits, e.g. `12.50`).
fn amount(value: &Value) -> f64 {
    value.as_f64().unwrap_or_else(|| panic!("not an amount: {value}"))
}

async fn json_of(response: Response, status: u16) -> Value {
    let actual = response.status().as_u16();
    let body: Value = response.json().await.expect("json");
    assert_eq!(actual, status, "{body}");
    body
}

async fn order(app: &TestApp, id: &str) -> Value {
    json_of(app.get(&format!("/orders/{id}"), Some(&app.admin)).await, 200).await
}

/// An order of 3 × `a` (10.00) and 2 × `b` (5.00), paid; returns its id.
async fn paid_order(app: &TestApp, a: &str, b: &str) -> String {
    let (_, buyer) = app.customer().await;
    let body = json!({ "items": [{ "product_id": a, "quantity": 3 }, { "product_id": b, "quantity": 2 }] });
    let placed = json_of(
        app.place_order(&buyer, &uuid::Uuid::now_v7().to_string(), &body).await,
        202,
    )
    .await;
    let id = placed["order_id"].as_str().unwrap().to_string();
    app.drain().await;
    id
}

async fn event_types(app: &TestApp, order_id: &str) -> Vec<String> {
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
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect()
}

async fn partial_shipments_capture_first_and_fulfil_last(backend: Backend) {
    let app = external(backend).await;
    let (a, b) = (app.product("10.00", 10).await, app.product("5.00", 10).await);
    let id = paid_order(&app, &a, &b).await;
    let view = order(&app, &id).await;
    assert_eq!(
        view["status"], "paid",
        "external fulfilment waits for the warehouse: {view}"
    );
    assert_eq!(view["payment"]["state"], "authorized");
    assert_eq!(amount(&view["payment"]["captured_amount"]), 0.0);
    assert_eq!(
        view["pending_steps"],
        json!([]),
        "nothing runs until a shipment arrives"
    );

    let path = format!("/orders/{id}/shipments");
    let (_, customer) = app.customer().await;
    let body = json!({ "carrier": "DHL", "tracking_number": "JD0001", "items": [{ "product_id": a, "quantity": 2 }] });
    expect_problem(send(&app, &path, &customer, Some("s-1"), &body).await, 403, "forbidden").await;
    expect_problem(
        send(&app, &path, &warehouse(&app), None, &body).await,
        400,
        "idempotency_key_missing",
    )
    .await;

    let first = json_of(send(&app, &path, &warehouse(&app), Some("s-1"), &body).await, 201).await;
    assert_eq!(first["carrier"], "DHL");
    assert_eq!(first["items"], json!([{ "product_id": a, "quantity": 2 }]));
    // The same request again: the first shipment, nothing new.
    let again = send(&app, &path, &warehouse(&app), Some("s-1"), &body).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again = json_of(again, 201).await;
    assert_eq!(again["shipment_id"], first["shipment_id"]);
    // The same key with another body is refused.
    let other = json!({ "carrier": "UPS", "tracking_number": "1Z", "items": [{ "product_id": a, "quantity": 1 }] });
    expect_problem(
        send(&app, &path, &warehouse(&app), Some("s-1"), &other).await,
        422,
        "idempotency_key_reused",
    )
    .await;

    app.drain().await;
    let view = order(&app, &id).await;
    assert_eq!(view["status"], "paid", "units are still to ship: {view}");
    assert_eq!(view["payment"]["state"], "captured", "the first shipment captures");
    assert_eq!(amount(&view["payment"]["captured_amount"]), 40.0);
    assert_eq!(view["shipments"].as_array().unwrap().len(), 1, "{view}");
    // Goods left: too late to cancel.
    expect_problem(
        app.post(&format!("/orders/{id}/cancel"), Some(&app.admin), &json!({}))
            .await,
        409,
        "order_not_cancellable",
    )
    .await;

    // More of `a` than is left (1) is refused, naming the line.
    let too_many =
        json!({ "carrier": "DHL", "tracking_number": "JD0002", "items": [{ "product_id": a, "quantity": 2 }] });
    let problem = expect_problem(
        send(&app, &path, &warehouse(&app), Some("s-2"), &too_many).await,
        422,
        "exceeds_unshipped",
    )
    .await;
    assert_eq!(
        problem["items"],
        json!([{ "product_id": a, "requested": 2, "unshipped": 1 }])
    );

    // Everything left (no items): 1 × a, 2 × b; the order is fulfilled after it.
    let rest = json!({ "carrier": "DHL", "tracking_number": "JD0003", "tracking_url": "https://dhl.example/t/JD0003" });
    let last = json_of(send(&app, &path, &warehouse(&app), Some("s-3"), &rest).await, 201).await;
    let mut items: Vec<Value> = last["items"].as_array().unwrap().clone();
    items.sort_by_key(|i| i["product_id"].as_str().unwrap().to_string());
    let mut expected = vec![
        json!({ "product_id": a, "quantity": 1 }),
        json!({ "product_id": b, "quantity": 2 }),
    ];
    expected.sort_by_key(|i| i["product_id"].as_str().unwrap().to_string());
    assert_eq!(items, expected);
    app.drain().await;
    let view = order(&app, &id).await;
    assert_eq!(view["status"], "fulfilled", "{view}");
    assert_eq!(
        amount(&view["payment"]["captured_amount"]),
        40.0,
        "captured once, in full"
    );
    assert_eq!(view["shipments"].as_array().unwrap().len(), 2);
    assert!(
        view["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["kind"] == "send_confirmation")
    );
    expect_problem(
        send(&app, &path, &warehouse(&app), Some("s-4"), &rest).await,
        409,
        "order_not_ready",
    )
    .await;

    let types = event_types(&app, &id).await;
    assert_eq!(types.iter().filter(|t| *t == "order.shipped").count(), 2, "{types:?}");
    assert_eq!(
        types.iter().filter(|t| *t == "payment.captured").count(),
        1,
        "{types:?}"
    );
    assert_eq!(types.last().map(String::as_str), Some("order.fulfilled"), "{types:?}");
    // One capture at the provider, of the whole amount.
    let intents = app.store.intents_for(&id).await.unwrap();
    assert_eq!(intents.len(), 1);
    assert_eq!(
        (intents[0].status.as_str(), intents[0].captured_minor),
        ("succeeded", 4000)
    );
    app.assert_audit_clean().await;
}

async fn shipments_are_refused_when_not_ready_or_too_many(backend: Backend) {
    let app = external(backend).await;
    let (a, b) = (app.product("10.00", 10).await, app.product("5.00", 10).await);
    let (_, buyer) = app.customer().await;
    let placed = json_of(
        app.place_order(&buyer, "k-1", &json!({ "items": [{ "product_id": a, "quantity": 1 }] }))
            .await,
        202,
    )
    .await;
    let id = placed["order_id"].as_str().unwrap();
    let path = format!("/orders/{id}/shipments");
    let body = json!({ "carrier": "DHL", "tracking_number": "X1" });
    // Not paid yet: not ready.
    expect_problem(
        send(&app, &path, &app.admin, Some("s-1"), &body).await,
        409,
        "order_not_ready",
    )
    .await;
    app.drain().await;
    // A product the order does not have, and bad fields.
    let stranger = json!({ "carrier": "DHL", "tracking_number": "X1", "items": [{ "product_id": b, "quantity": 1 }] });
    let problem = expect_problem(
        send(&app, &path, &app.admin, Some("s-2"), &stranger).await,
        422,
        "exceeds_unshipped",
    )
    .await;
    assert_eq!(
        problem["items"],
        json!([{ "product_id": b, "requested": 1, "unshipped": 0 }])
    );
    let bad = json!({ "carrier": "", "tracking_url": "ftp://x", "items": [] });
    let problem = expect_problem(
        send(&app, &path, &app.admin, Some("s-3"), &bad).await,
        400,
        "validation_failed",
    )
    .await;
    let mut fields = common::error_fields(&problem);
    fields.sort();
    assert_eq!(fields, ["/carrier", "/items", "/tracking_number", "/tracking_url"]);
    expect_problem(
        send(
            &app,
            &format!("/orders/{}/shipments", uuid::Uuid::now_v7()),
            &app.admin,
            Some("s-4"),
            &body,
        )
        .await,
        404,
        "not_found",
    )
    .await;
    assert_eq!(order(&app, id).await["shipments"], json!([]), "nothing was recorded");
    app.assert_audit_clean().await;
}

async fn refunds_in_parts_up_to_the_capture_with_restock(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (a, b) = (app.product("10.00", 10).await, app.product("5.00", 10).await);
    let id = paid_order(&app, &a, &b).await;
    assert_eq!(order(&app, &id).await["status"], "fulfilled");
    let path = format!("/orders/{id}/refunds");

    let first = json_of(
        send(
            &app,
            &path,
            &app.admin,
            Some("r-1"),
            &json!({ "amount": 12.5, "reason": "damaged" }),
        )
        .await,
        202,
    )
    .await;
    assert_eq!(
        (first["state"].as_str(), amount(&first["amount"])),
        (Some("pending"), 12.5)
    );
    let replay = send(
        &app,
        &path,
        &app.admin,
        Some("r-1"),
        &json!({ "amount": 12.5, "reason": "damaged" }),
    )
    .await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(json_of(replay, 202).await["refund_id"], first["refund_id"]);

    // The rest, with one unit of `a` back on the shelf.
    let before = app.available(&a).await;
    let second = json_of(
        send(
            &app,
            &path,
            &app.admin,
            Some("r-2"),
            &json!({ "amount": 27.5, "reason": "returned", "restock": [{ "product_id": a, "quantity": 1 }] }),
        )
        .await,
        202,
    )
    .await;
    assert_eq!(second["restock"], json!([{ "product_id": a, "quantity": 1 }]));
    assert_eq!(app.available(&a).await, before + 1, "restocked at once");
    // Nothing is left to refund (both are pending, and count).
    let problem = expect_problem(
        send(
            &app,
            &path,
            &app.admin,
            Some("r-3"),
            &json!({ "amount": 0.01, "reason": "other" }),
        )
        .await,
        422,
        "exceeds_refundable",
    )
    .await;
    assert_eq!(
        (amount(&problem["requested"]), amount(&problem["refundable"])),
        (0.01, 0.0)
    );

    app.drain().await;
    let view = order(&app, &id).await;
    assert_eq!(view["status"], "refunded", "{view}");
    assert_eq!(view["payment"]["state"], "refunded");
    assert_eq!(amount(&view["payment"]["refunded_amount"]), 40.0);
    let refunds = view["refunds"].as_array().unwrap();
    assert_eq!(refunds.len(), 2);
    assert!(
        refunds
            .iter()
            .all(|r| r["state"] == "succeeded" && r["provider_reference"].is_string()),
        "{view}"
    );
    // Exactly two refunds at the provider, of the two amounts.
    let intent = &app.store.intents_for(&id).await.unwrap()[0];
    let mut at_provider: Vec<i64> = app
        .store
        .intent_refunds(&intent.id)
        .await
        .unwrap()
        .iter()
        .map(|r| r.amount_minor)
        .collect();
    at_provider.sort();
    assert_eq!(at_provider, [1250, 2750]);
    assert_eq!(intent.refunded_minor, 4000);
    // Still beyond, now that the order is refunded.
    expect_problem(
        send(&app, &path, &app.admin, Some("r-4"), &json!({ "reason": "other" })).await,
        422,
        "exceeds_refundable",
    )
    .await;
    let types = event_types(&app, &id).await;
    assert_eq!(
        types.iter().filter(|t| *t == "payment.refunded").count(),
        2,
        "{types:?}"
    );
    app.assert_audit_clean().await;
}

async fn refunds_are_refused_for_bad_requests_and_unfulfilled_orders(backend: Backend) {
    let app = external(backend).await;
    let (a, b) = (app.product("10.00", 10).await, app.product("5.00", 10).await);
    let id = paid_order(&app, &a, &b).await;
    let path = format!("/orders/{id}/refunds");
    // Paid, not fulfilled: cancel it instead.
    expect_problem(
        send(&app, &path, &app.admin, Some("r-1"), &json!({ "reason": "other" })).await,
        409,
        "order_not_refundable",
    )
    .await;
    let (_, customer) = app.customer().await;
    expect_problem(
        send(&app, &path, &customer, Some("r-2"), &json!({ "reason": "other" })).await,
        403,
        "forbidden",
    )
    .await;
    expect_problem(
        send(&app, &path, &app.admin, None, &json!({ "reason": "other" })).await,
        400,
        "idempotency_key_missing",
    )
    .await;
    let problem = expect_problem(
        send(
            &app,
            &path,
            &app.admin,
            Some("r-3"),
            &json!({ "amount": -1, "reason": "fraud", "restock": [{ "product_id": a }] }),
        )
        .await,
        400,
        "validation_failed",
    )
    .await;
    let mut fields = common::error_fields(&problem);
    fields.sort();
    assert_eq!(fields, ["/amount", "/reason", "/restock/0/quantity"]);

    // Ship everything, then restocking more than was bought is refused.
    json_of(
        send(
            &app,
            &format!("/orders/{id}/shipments"),
            &app.admin,
            Some("s-1"),
            &json!({ "carrier": "DHL", "tracking_number": "1" }),
        )
        .await,
        201,
    )
    .await;
    app.drain().await;
    assert_eq!(order(&app, &id).await["status"], "fulfilled");
    let problem = expect_problem(
        send(
            &app,
            &path,
            &app.admin,
            Some("r-4"),
            &json!({ "reason": "returned", "restock": [{ "product_id": b, "quantity": 3 }] }),
        )
        .await,
        422,
        "exceeds_returnable",
    )
    .await;
    assert_eq!(
        problem["items"],
        json!([{ "product_id": b, "requested": 3, "returnable": 2 }])
    );
    assert_eq!(order(&app, &id).await["refunds"], json!([]), "nothing was recorded");
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn payment_is_a_token_or_a_payment_method() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let product = app.product("10.00", 10).await;
    let (_, buyer) = app.customer().await;
    let order = |payment: Value| json!({ "items": [{ "product_id": product, "quantity": 1 }], "payment": payment });
    json_of(
        app.place_order(&buyer, "m-1", &order(json!({ "method": "pm_card_visa" })))
            .await,
        202,
    )
    .await;
    for (key, payment, field) in [
        ("m-2", json!({ "method": "tok_visa" }), "/payment/method"),
        (
            "m-3",
            json!({ "token": "tok_visa", "method": "pm_card_visa" }),
            "/payment/method",
        ),
        ("m-4", json!({}), "/payment/token"),
    ] {
        let problem = expect_problem(
            app.place_order(&buyer, key, &order(payment)).await,
            400,
            "validation_failed",
        )
        .await;
        assert_eq!(common::error_fields(&problem), [field]);
    }
    app.drain().await;
    assert_eq!(
        app.available(&product).await,
        9,
        "only the order paid with pm_card_visa took stock"
    );
}
