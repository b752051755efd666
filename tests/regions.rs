//! Regions (`--region`, API.md "Scale-out settings"): every order records the region of the
//! process that accepted it — in the order view (GET /orders/{id}, the admin and customer
//! listings), in its events (the CloudEvent `region` extension and `data.order.region`) and in
//! the metrics (a `region` label on every series) — while a process without a region records
//! `null`. Orders written together in one shared checkout transaction each carry it, and any
//! process's workers can run the steps of any region's orders.

mod common;

use common::{Backend, TestApp};
use orderflow::monitoring::Metrics;
use orderflow::workflow::checkout::CheckoutSettings;
use serde_json::{Value, json};
use std::sync::Arc;

on_every_backend!(orders_record_the_accepting_region, orders_without_a_region_say_null);

const REGION: &str = "eu-test-1";

async fn spawn_in(backend: Backend, region: Option<&str>) -> TestApp {
    let region = region.map(str::to_string);
    TestApp::spawn_with(backend, move |state| {
        state.checkout = Arc::new(CheckoutSettings {
            region: region.clone(),
            ..CheckoutSettings::default()
        });
        state.monitoring.metrics = Metrics::for_region(region.as_deref());
    })
    .await
}

async fn json_of(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status);
    response.json().await.expect("json")
}

/// Places `count` orders at once (so PostgreSQL writes several in one shared transaction):
/// (their customer's id, their ids).
async fn place_orders(app: &TestApp, count: usize) -> (String, Vec<String>) {
    let product = app.product("4.50", 100).await;
    let (customer, token) = app.customer().await;
    let mut placing = tokio::task::JoinSet::new();
    for n in 0..count {
        let (client, url, token) = (app.client.clone(), app.url.clone(), token.clone());
        let body = json!({ "items": [{ "product_id": product, "quantity": 1 }] });
        placing.spawn(async move {
            let response = client
                .post(format!("{url}/orders"))
                .bearer_auth(token)
                .header("idempotency-key", format!("region-{n}"))
                .json(&body)
                .send()
                .await
                .expect("POST /orders");
            json_of(response, 202).await
        });
    }
    let placed = placing.join_all().await;
    let ids = placed
        .iter()
        .map(|o| o["order_id"].as_str().unwrap().to_string())
        .collect();
    (customer, ids)
}

/// Every order the three order views show, by id: the order itself, the operators' listing and
/// its customer's listing.
async fn regions_shown(app: &TestApp, customer: &str, orders: &[String]) -> Vec<Value> {
    let mut shown = Vec::new();
    for id in orders {
        let order = json_of(app.get(&format!("/orders/{id}"), Some(&app.admin)).await, 200).await;
        assert!(order.as_object().unwrap().contains_key("region"), "{order}");
        shown.push(order["region"].clone());
    }
    let listings = [
        json_of(app.get("/admin/orders?limit=100", Some(&app.admin)).await, 200).await,
        json_of(
            app.get(&format!("/customers/{customer}/orders?limit=100"), Some(&app.admin))
                .await,
            200,
        )
        .await,
    ];
    for listing in listings {
        let data = listing["data"].as_array().unwrap();
        assert_eq!(data.len(), orders.len(), "{listing}");
        for order in data {
            assert!(order.as_object().unwrap().contains_key("region"), "{order}");
            shown.push(order["region"].clone());
        }
    }
    shown
}

/// The feed's events after stamping them (no relay runs in these tests).
async fn events(app: &TestApp) -> Vec<Value> {
    app.store
        .events()
        .stamp_events(1000, orderflow::clock::now())
        .await
        .expect("stamp events");
    let feed = json_of(app.get("/events?limit=1000", Some(&app.admin)).await, 200).await;
    feed["data"].as_array().unwrap().clone()
}

async fn orders_record_the_accepting_region(backend: Backend) {
    let app = spawn_in(backend, Some(REGION)).await;
    let (customer, orders) = place_orders(&app, 12).await;
    // A worker of any region runs the steps: the order keeps the region that accepted it.
    app.drain().await;
    let shown = regions_shown(&app, &customer, &orders).await;
    assert_eq!(shown.len(), 3 * orders.len());
    assert!(shown.iter().all(|region| region == REGION), "{shown:?}");
    for id in &orders {
        let order = json_of(app.get(&format!("/orders/{id}"), Some(&app.admin)).await, 200).await;
        assert_eq!(order["status"], "fulfilled", "{order}");
    }

    let events = events(&app).await;
    assert!(
        events.len() >= orders.len() * 3,
        "placed, paid, fulfilled …: {}",
        events.len()
    );
    for event in &events {
        assert_eq!(event["region"], REGION, "the CloudEvent extension: {event}");
        assert_eq!(event["data"]["order"]["region"], REGION, "{event}");
    }

    let metrics = app.get("/metrics", None).await.text().await.unwrap();
    let placed = format!("orderflow_orders_placed_total{{region=\"{REGION}\"}} {}", orders.len());
    assert!(metrics.contains(&placed), "no `{placed}` in:\n{metrics}");
    let series: Vec<&str> = metrics
        .lines()
        .filter(|line| line.starts_with("orderflow_") && !line.starts_with('#'))
        .collect();
    assert!(!series.is_empty());
    let unlabelled: Vec<&&str> = series
        .iter()
        .filter(|line| !line.contains(&format!("region=\"{REGION}\"")))
        .collect();
    assert!(unlabelled.is_empty(), "series without the region label: {unlabelled:?}");
    app.assert_audit_clean().await;
}

async fn orders_without_a_region_say_null(backend: Backend) {
    let app = spawn_in(backend, None).await;
    let (customer, orders) = place_orders(&app, 3).await;
    let shown = regions_shown(&app, &customer, &orders).await;
    assert!(shown.iter().all(Value::is_null), "{shown:?}");
    for event in events(&app).await {
        let envelope = event.as_object().unwrap();
        assert!(!envelope.contains_key("region"), "{event}");
        assert!(event["data"]["order"].get("region").is_none(), "{event}");
    }
    let metrics = app.get("/metrics", None).await.text().await.unwrap();
    assert!(!metrics.contains("region="), "{metrics}");
}

/// The published Order schema has `region`, always present and nullable; the CloudEvent has the
/// `region` extension.
#[tokio::test]
async fn the_order_schema_publishes_region() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let doc = json_of(app.get("/openapi.json", None).await, 200).await;
    let order = &doc["components"]["schemas"]["Order"];
    let region = &order["properties"]["region"];
    assert!(region.is_object(), "{order}");
    let types = region["type"].as_array().expect("a type list with null");
    assert!(
        types.contains(&json!("string")) && types.contains(&json!("null")),
        "{region}"
    );
    assert!(
        order["required"].as_array().unwrap().contains(&json!("region")),
        "{order}"
    );
    assert!(doc["components"]["schemas"]["CloudEvent"]["properties"]["region"].is_object());
}
