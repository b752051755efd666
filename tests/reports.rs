//! The sales report (`GET /admin/reports/sales`): per UTC hour or day, the orders accepted in
//! the period whose payment was taken, their units, gross, refunded (accepted refunds, settled
//! or not) and net — cancelled and unpaid orders left out, empty periods listed as zeros — on
//! every backend (their period SQL differs); and bad input answered 400 naming the parameter.

mod common;

use common::{Backend, TestApp, error_fields, expect_problem};
use serde_json::{Value, json};

on_every_backend!(
    periods_add_up_paid_orders_and_their_refunds,
    bad_report_queries_name_the_parameter
);

async fn json_of(response: reqwest::Response, status: u16) -> Value {
    let actual = response.status().as_u16();
    let body: Value = response.json().await.expect("json");
    assert_eq!(actual, status, "{body}");
    body
}

/// Places an order of `items` ((product, quantity)) as a new customer; its id.
async fn place(app: &TestApp, items: &[(&str, u32)]) -> String {
    let (_, buyer) = app.customer().await;
    let items: Vec<Value> = items
        .iter()
        .map(|(product, quantity)| json!({ "product_id": product, "quantity": quantity }))
        .collect();
    let placed = json_of(
        app.place_order(&buyer, &uuid::Uuid::now_v7().to_string(), &json!({ "items": items }))
            .await,
        202,
    )
    .await;
    placed["order_id"].as_str().unwrap().to_string()
}

async fn refund(app: &TestApp, order: &str, amount: f64) {
    let response = app
        .client
        .post(format!("{}/orders/{order}/refunds", app.url))
        .bearer_auth(&app.admin)
        .header("idempotency-key", uuid::Uuid::now_v7().to_string())
        .json(&json!({ "amount": amount, "reason": "damaged" }))
        .send()
        .await
        .unwrap();
    json_of(response, 202).await;
}

/// Moves an order's acceptance time, as if it had been placed at `at` (RFC 3339, UTC).
async fn backdate(app: &TestApp, order: &str, at: &str) {
    let id = uuid::Uuid::parse_str(order).unwrap();
    let sql = match app.backend {
        Backend::Postgres | Backend::Dsql => format!("UPDATE orders SET created_at = '{at}' WHERE id = '{id}'"),
        // The text form sqlx stores: RFC 3339 with an explicit offset.
        Backend::Sqlite => format!(
            "UPDATE orders SET created_at = '{}' WHERE id = X'{}'",
            at.replace('Z', "+00:00"),
            id.simple()
        ),
    };
    app.db.tamper(&sql).await;
}

async fn report(app: &TestApp, query: &str) -> Value {
    let response = app
        .get(&format!("/admin/reports/sales?{query}"), Some(&app.admin))
        .await;
    assert!(
        response.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("no-store")
    );
    json_of(response, 200).await
}

/// The numbers of each period: (start, orders, units, gross, refunded, net).
fn rows(report: &Value) -> Vec<(String, i64, i64, f64, f64, f64)> {
    report["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["period_start"].as_str().unwrap().to_string(),
                p["orders"].as_i64().unwrap(),
                p["units"].as_i64().unwrap(),
                p["gross"].as_f64().unwrap(),
                p["refunded"].as_f64().unwrap(),
                p["net"].as_f64().unwrap(),
            )
        })
        .collect()
}

async fn periods_add_up_paid_orders_and_their_refunds(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (a, b) = (app.product("10.00", 50).await, app.product("5.00", 50).await);

    // Paid and fulfilled (auto fulfilment), then partly and fully refunded.
    let big = place(&app, &[(&a, 3), (&b, 2)]).await; // 40.00, 5 units
    let single = place(&app, &[(&a, 1)]).await; // 10.00
    let later = place(&app, &[(&b, 2)]).await; // 10.00
    let next_day = place(&app, &[(&b, 1)]).await; // 5.00
    // Cancelled before payment: never a sale.
    let cancelled = place(&app, &[(&a, 4)]).await;
    let cancel = app
        .post(&format!("/orders/{cancelled}/cancel"), Some(&app.admin), &json!({}))
        .await;
    assert_eq!(cancel.status(), 202);
    app.drain().await;
    refund(&app, &big, 12.5).await;
    refund(&app, &next_day, 5.0).await;
    app.drain().await;
    let status = |order: String| {
        let app = &app;
        async move { json_of(app.get(&format!("/orders/{order}"), Some(&app.admin)).await, 200).await["status"].clone() }
    };
    assert_eq!(status(big.clone()).await, "fulfilled");
    assert_eq!(status(next_day.clone()).await, "refunded");
    assert_eq!(status(cancelled.clone()).await, "cancelled");
    // Accepted but not paid yet: not a sale (yet).
    let unpaid = place(&app, &[(&a, 2)]).await;

    backdate(&app, &big, "2026-11-01T10:15:00Z").await;
    backdate(&app, &single, "2026-11-01T10:59:59.999999Z").await;
    backdate(&app, &later, "2026-11-01T11:00:00Z").await;
    backdate(&app, &next_day, "2026-11-02T09:00:00Z").await;
    backdate(&app, &cancelled, "2026-11-01T10:30:00Z").await;
    backdate(&app, &unpaid, "2026-11-01T10:20:00Z").await;

    let hours = report(
        &app,
        "from=2026-11-01T10:30:00Z&to=2026-11-01T12:00:00Z&granularity=hour",
    )
    .await;
    assert_eq!(
        (&hours["granularity"], &hours["from"], &hours["to"], &hours["currency"]),
        (
            &json!("hour"),
            &json!("2026-11-01T10:00:00Z"),
            &json!("2026-11-01T12:00:00Z"),
            &json!("USD")
        ),
        "{hours}"
    );
    assert_eq!(
        rows(&hours),
        [
            ("2026-11-01T10:00:00Z".into(), 2, 6, 50.0, 12.5, 37.5),
            ("2026-11-01T11:00:00Z".into(), 1, 2, 10.0, 0.0, 10.0),
        ],
        "{hours}"
    );
    assert_eq!(hours["data"][0]["period_end"], "2026-11-01T11:00:00Z");
    // Money as the API writes it everywhere: exact decimals with the currency's digits.
    let text = serde_json::to_string(&hours["data"][0]).unwrap();
    assert!(
        text.contains(r#""gross":50.00"#) && text.contains(r#""net":37.50"#),
        "{text}"
    );

    let days = report(&app, "from=2026-11-01&to=2026-11-04").await;
    assert_eq!(days["granularity"], "day");
    assert_eq!(
        rows(&days),
        [
            ("2026-11-01T00:00:00Z".into(), 3, 8, 60.0, 12.5, 47.5),
            ("2026-11-02T00:00:00Z".into(), 1, 1, 5.0, 5.0, 0.0),
            ("2026-11-03T00:00:00Z".into(), 0, 0, 0.0, 0.0, 0.0),
        ],
        "{days}"
    );
    assert_eq!(
        serde_json::to_string(&days["totals"]).unwrap(),
        r#"{"gross":65.00,"net":47.50,"orders":4,"refunded":17.50,"units":9}"#
    );

    // The default range ends now: today's orders were all backdated, so it is all zeros.
    let recent = report(&app, "granularity=hour").await;
    assert_eq!(recent["data"].as_array().unwrap().len(), 25);
    assert_eq!(recent["totals"]["orders"], 0);
}

async fn bad_report_queries_name_the_parameter(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for (query, fields) in [
        ("from=2026-11-03&to=2026-11-02", vec!["query.from"]),
        ("from=2026-11-02&to=2026-11-02", vec!["query.from"]),
        ("granularity=week", vec!["query.granularity"]),
        ("granularity=", vec!["query.granularity"]),
        ("from=yesterday&to=2026-13-01", vec!["query.from", "query.to"]),
        ("from=2026-01-01&to=2026-03-01&granularity=hour", vec!["query.from"]),
        ("since=2026-01-01", vec!["query.since"]),
    ] {
        let response = app
            .get(&format!("/admin/reports/sales?{query}"), Some(&app.admin))
            .await;
        let problem = expect_problem(response, 400, "validation_failed").await;
        assert_eq!(error_fields(&problem), fields, "{query}: {problem}");
    }
    // An empty bound is the bound left out.
    let defaulted = report(&app, "from=&to=").await;
    assert_eq!(defaulted["granularity"], "day");
    // Sixty days are too many hours but fine as days.
    let days = report(&app, "from=2026-01-01&to=2026-03-01&granularity=day").await;
    assert_eq!(days["data"].as_array().unwrap().len(), 59);

    let (_, customer) = app.customer().await;
    let response = app.get("/admin/reports/sales", Some(&customer)).await;
    expect_problem(response, 403, "forbidden").await;
}

#[tokio::test]
async fn the_report_is_documented() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let doc = json_of(app.get("/openapi.json", None).await, 200).await;
    let operation = &doc["paths"]["/admin/reports/sales"]["get"];
    let names: Vec<&str> = operation["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["from", "to", "granularity"]);
    let period = &doc["components"]["schemas"]["SalesPeriod"]["properties"];
    for member in [
        "period_start",
        "period_end",
        "orders",
        "units",
        "gross",
        "refunded",
        "net",
    ] {
        assert!(period.get(member).is_some(), "SalesPeriod lacks {member}");
    }
    assert_eq!(period["gross"]["$ref"], "#/components/schemas/Money");
}
