//! The order lifecycle over HTTP on every backend (SQLite, PostgreSQL, the emulated DSQL): progress
//! visible on GET /orders/{id} (payment, notifications, pending steps, timeline), long-polling,
//! cancellation with compensation, and the admin queue/dead-letter routes.

mod common;

use std::time::Duration;

use common::{Backend, TestApp, error_fields, expect_problem};
use serde_json::{Value, json};

on_every_backend!(
    progress_is_visible_on_the_order,
    long_poll_answers_when_the_status_moves,
    cancellation_over_http,
    admin_sees_and_replays_dead_jobs,
);

async fn place(app: &TestApp, token: &str, product: &str, payment: &str) -> String {
    let response = app
        .place_order(
            token,
            &uuid::Uuid::now_v7().to_string(),
            &json!({"items": [{"product_id": product, "quantity": 2}], "payment": {"token": payment}}),
        )
        .await;
    assert_eq!(response.status(), 202);
    response.json::<Value>().await.unwrap()["order_id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn progress_is_visible_on_the_order(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let product = app.product("10.00", 10).await;
    let (_, token) = app.customer().await;
    let order = place(&app, &token, &product, "tok_flaky").await;

    let before: Value = app
        .get(&format!("/orders/{order}"), Some(&token))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        before["pending_steps"],
        json!([{"step": "charge_payment", "state": "ready", "attempts": 0}])
    );
    assert_eq!(before["payment"], Value::Null);

    app.drain().await;
    let after: Value = app
        .get(&format!("/orders/{order}"), Some(&token))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(after["status"], "fulfilled");
    assert_eq!(after["pending_steps"], json!([]));
    assert_eq!(after["payment"]["state"], "captured");
    assert_eq!(after["payment"]["provider"], "sandbox");
    assert_eq!(after["payment"]["attempts"], 3, "two transient failures are visible");
    assert_eq!(after["payment"]["amount"].to_string(), "20.00");
    assert_eq!(after["payment"]["authorized_amount"].to_string(), "20.00");
    assert_eq!(after["payment"]["captured_amount"].to_string(), "20.00");
    assert_eq!(after["payment"]["refunded_amount"].to_string(), "0.00");
    assert!(
        after["payment"]["provider_reference"]
            .as_str()
            .unwrap()
            .starts_with("pi_")
    );
    let mut sent: Vec<String> = after["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| format!("{}:{}", n["kind"], n["state"]))
        .collect();
    sent.sort();
    assert_eq!(sent, ["\"send_confirmation\":\"sent\"", "\"send_receipt\":\"sent\""]);
    let timeline: Vec<&str> = after["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for step in ["order_placed", "payment_captured", "inventory_committed", "fulfilled"] {
        assert!(timeline.contains(&step), "{step} missing from {timeline:?}");
    }
    assert_eq!(timeline.last(), Some(&"notification_sent"));
    let product_after: Value = app
        .get(&format!("/products/{product}"), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(product_after["stock_quantity"], 8);
    app.assert_audit_clean().await;
}

async fn long_poll_answers_when_the_status_moves(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let product = app.product("10.00", 10).await;
    let (_, token) = app.customer().await;
    let order = place(&app, &token, &product, "tok_visa").await;

    let poll = {
        let (client, url, token, order) = (app.client.clone(), app.url.clone(), token.clone(), order.clone());
        tokio::spawn(async move {
            client
                .get(format!("{url}/orders/{order}"))
                .bearer_auth(token)
                .header("prefer", "wait=20")
                .send()
                .await
                .unwrap()
        })
    };
    app.drain().await;
    let answered = tokio::time::timeout(Duration::from_secs(15), poll)
        .await
        .expect("long poll answered")
        .unwrap();
    assert_eq!(answered.headers()["preference-applied"], "wait=20");
    let body: Value = answered.json().await.unwrap();
    assert_ne!(body["status"], "pending_payment");

    let bad = app
        .client
        .get(format!("{}/orders/{order}", app.url))
        .bearer_auth(&token)
        .header("prefer", "wait=soon")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_fields(&expect_problem(bad, 400, "validation_failed").await),
        ["Prefer"]
    );
}

async fn cancellation_over_http(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let product = app.product("10.00", 10).await;
    let (_, token) = app.customer().await;
    let (_, stranger) = app.customer().await;

    // Before payment: cancelled at once, stock back, no charge ever made.
    let pending = place(&app, &token, &product, "tok_visa").await;
    expect_problem(
        app.post(&format!("/orders/{pending}/cancel"), Some(&stranger), &json!({}))
            .await,
        404,
        "not_found",
    )
    .await;
    expect_problem(
        app.post(&format!("/orders/{pending}/cancel"), None, &json!({})).await,
        401,
        "unauthorized",
    )
    .await;
    let cancelled = app
        .post(&format!("/orders/{pending}/cancel"), Some(&token), &json!({}))
        .await;
    assert_eq!(cancelled.status(), 202);
    assert_eq!(cancelled.json::<Value>().await.unwrap()["status"], "cancelled");
    assert_eq!(app.available(&product).await, 10);
    app.drain().await;
    assert!(app.sandbox.books().intents_for(&pending).await.unwrap().is_empty());
    let again = app
        .post(&format!("/orders/{pending}/cancel"), Some(&token), &json!({}))
        .await;
    assert_eq!(again.status(), 202, "cancelling twice is harmless");

    // After fulfilment: too late.
    let fulfilled = place(&app, &token, &product, "tok_visa").await;
    app.drain().await;
    let late = app
        .post(&format!("/orders/{fulfilled}/cancel"), Some(&token), &json!({}))
        .await;
    expect_problem(late, 409, "order_not_cancellable").await;

    // After payment, before fulfilment (an operator): refunded and released.
    let paid = place(&app, &token, &product, "tok_visa").await;
    app.runner
        .run_batch(orderflow::workflow::CHARGE_PAYMENT, 10)
        .await
        .unwrap();
    let body: Value = app
        .get(&format!("/orders/{paid}"), Some(&token))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["status"], "paid");
    assert_eq!(
        app.post(&format!("/orders/{paid}/cancel"), Some(&app.admin), &json!({}))
            .await
            .status(),
        202
    );
    app.drain().await;
    let body: Value = app
        .get(&format!("/orders/{paid}"), Some(&token))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["status"], "cancelled");
    assert_eq!(
        body["payment"]["state"], "voided",
        "cancelled before shipping: the authorization is released, nothing was captured"
    );
    assert_eq!(body["payment"]["captured_amount"].to_string(), "0.00");
    assert_eq!(
        app.available(&product).await,
        8,
        "only the fulfilled order keeps its stock"
    );
    app.assert_audit_clean().await;
}

async fn admin_sees_and_replays_dead_jobs(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let product = app.product("10.00", 10).await;
    let (_, token) = app.customer().await;
    let order = place(&app, &token, &product, "tok_unavailable").await;
    app.drain().await;

    let queues: Value = app.get("/admin/queues", Some(&app.admin)).await.json().await.unwrap();
    let charge = queues["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["kind"] == "charge_payment")
        .unwrap()
        .clone();
    assert_eq!(
        (
            charge["dead"].as_i64(),
            charge["ready"].as_i64(),
            charge["running"].as_i64()
        ),
        (Some(1), Some(0), Some(0))
    );
    assert_eq!(
        queues["data"].as_array().unwrap().len(),
        orderflow::workflow::ALL_STEPS.len(),
        "every step is listed"
    );
    expect_problem(app.get("/admin/queues", Some(&token)).await, 403, "forbidden").await;

    let dead: Value = app
        .get("/admin/jobs?state=dead", Some(&app.admin))
        .await
        .json()
        .await
        .unwrap();
    let jobs = dead["data"].as_array().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["order_id"], order.as_str());
    assert_eq!(jobs[0]["attempts"], 3);
    assert_eq!(jobs[0]["errors"].as_array().unwrap().len(), 3);
    let job_id = jobs[0]["job_id"].as_str().unwrap().to_string();
    let parked: Value = app
        .get(&format!("/orders/{order}"), Some(&token))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(parked["status"], "pending_payment");
    assert_eq!(
        parked["pending_steps"],
        json!([{"step": "charge_payment", "state": "dead", "attempts": 3}])
    );
    for (query, field) in [("state=zombie", "query.state"), ("kind=nope", "query.kind")] {
        let problem = expect_problem(
            app.get(&format!("/admin/jobs?{query}"), Some(&app.admin)).await,
            400,
            "validation_failed",
        )
        .await;
        assert_eq!(error_fields(&problem), [field]);
    }

    app.sandbox.set_outage(false);
    let replay = app
        .post(&format!("/admin/jobs/{job_id}/replay"), Some(&app.admin), &json!({}))
        .await;
    assert_eq!(replay.json::<Value>().await.unwrap()["replayed"], 1);
    expect_problem(
        app.post(&format!("/admin/jobs/{job_id}/replay"), Some(&app.admin), &json!({}))
            .await,
        404,
        "not_found",
    )
    .await;
    app.drain().await;
    let done: Value = app
        .get(&format!("/orders/{order}"), Some(&token))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(done["status"], "fulfilled");
    // Finished jobs are counted on demand (the cheap statistics the alarms and /metrics read
    // leave them out).
    let queues: Value = app.get("/admin/queues", Some(&app.admin)).await.json().await.unwrap();
    let counts = |kind: &str| {
        let queue = queues["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["kind"] == kind)
            .unwrap();
        (queue["dead"].as_i64(), queue["succeeded"].as_i64())
    };
    assert_eq!(counts("charge_payment"), (Some(0), Some(1)));
    assert_eq!(counts("send_confirmation"), (Some(0), Some(1)));
    assert_eq!(counts("refund_payment"), (Some(0), Some(0)));
    let none: Value = app
        .post("/admin/jobs/replay?kind=charge_payment", Some(&app.admin), &json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(none["replayed"], 0);
    app.assert_audit_clean().await;
}
