//! The authorization matrix: every route × (anonymous, customer A, customer B, a warehouse with
//! the `fulfilment` role, admin) → the status the contract promises, from one table. The table is
//! checked against the published OpenAPI document (which the router is built from), so a route
//! added without a row here fails this test instead of going unchecked.
//!
//! Each cell runs against fresh fixtures (customer A's order — paid and waiting for the warehouse,
//! or fulfilled, when the row needs it —, a dead job, …), so a cell that mutates (cancel, replay,
//! ship, refund) cannot change what the next one sees. Requests carry valid bodies: the statuses
//! are about who may do what, not about validation. The service runs with `--fulfilment external`
//! (a paid order waits for shipments) and a Stripe webhook secret (`POST /webhooks/stripe` is then
//! guarded by its signature, not by a bearer token).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::{Backend, TestApp};
use orderflow::http::stripe_webhooks::StripeWebhookSettings;
use orderflow::workflow::steps::{FulfilmentMode, SagaSettings};
use serde_json::{Value, json};
use uuid::Uuid;

#[derive(Clone, Copy, Debug)]
enum Who {
    Anonymous,
    CustomerA,
    CustomerB,
    /// A warehouse's token: the `fulfilment` role, a subject that is no customer id.
    Fulfilment,
    Admin,
}

const EVERYONE: [Who; 5] = [
    Who::Anonymous,
    Who::CustomerA,
    Who::CustomerB,
    Who::Fulfilment,
    Who::Admin,
];

/// What a cell's request works on.
struct Fixture {
    product: String,
    customer_a: String,
    token_a: String,
    token_b: String,
    order_a: String,
    dead_job: Option<String>,
    webhook_endpoint: Option<String>,
}

type Body = fn(&Fixture) -> Option<Value>;

/// One route: method, path template, body, and the status for anonymous, A, B, the warehouse,
/// admin.
struct Row {
    method: &'static str,
    path: &'static str,
    body: Body,
    expect: [u16; 5],
}

const fn row(method: &'static str, path: &'static str, body: Body, expect: [u16; 5]) -> Row {
    Row {
        method,
        path,
        body,
        expect,
    }
}

fn none(_: &Fixture) -> Option<Value> {
    None
}

const PUBLIC: [u16; 5] = [200, 200, 200, 200, 200];
const ADMIN_ONLY_200: [u16; 5] = [401, 403, 403, 403, 200];
/// Customer A's own resources: B (and the warehouse, which is no customer) is told they do not
/// exist.
const OWNER_OR_ADMIN: [u16; 5] = [401, 200, 404, 404, 200];
/// The warehouse's route: the `fulfilment` role or an admin; customers, even the order's own, may not.
const FULFILMENT_OR_ADMIN_201: [u16; 5] = [401, 403, 403, 201, 201];

const TABLE: &[Row] = &[
    row("GET", "/health/live", none, PUBLIC),
    row("GET", "/health/ready", none, PUBLIC),
    // Public by default (`--metrics-access admin` restricts it; tests/metrics.rs covers that).
    row("GET", "/metrics", none, PUBLIC),
    row("GET", "/openapi.json", none, PUBLIC),
    row("GET", "/docs", none, PUBLIC),
    row("GET", "/products", none, PUBLIC),
    row("GET", "/products/{id}", none, PUBLIC),
    row(
        "POST",
        "/products",
        |_| Some(json!({ "name": "Matrix lamp", "price": 10.00, "stock_quantity": 5 })),
        [401, 403, 403, 403, 201],
    ),
    row(
        "PATCH",
        "/products/{id}",
        |_| Some(json!({ "price": 12.50 })),
        ADMIN_ONLY_200,
    ),
    row(
        "POST",
        "/products/{id}/stock",
        |_| Some(json!({ "delta": 5, "reason": "restock" })),
        ADMIN_ONLY_200,
    ),
    // A and B may only create their own record, and theirs exist already: 409, not 403. The
    // warehouse's subject is no customer id, so it cannot own one.
    row(
        "POST",
        "/customers",
        |_| {
            let email = format!("{}@example.com", Uuid::now_v7().simple());
            Some(json!({ "email": email, "first_name": "Mat", "last_name": "Rix" }))
        },
        [401, 409, 409, 403, 201],
    ),
    row("GET", "/customers/{id}", none, OWNER_OR_ADMIN),
    row("GET", "/customers/{id}/orders", none, OWNER_OR_ADMIN),
    // An order for customer A: A and an admin may place it; B (or the warehouse) may not order for A.
    row(
        "POST",
        "/orders",
        |f| Some(json!({ "customer_id": f.customer_a, "items": [{ "product_id": f.product, "quantity": 1 }] })),
        [401, 202, 403, 403, 202],
    ),
    row("GET", "/orders/{id}", none, OWNER_OR_ADMIN),
    row("POST", "/orders/{id}/cancel", none, [401, 202, 404, 404, 202]),
    // On an order paid and waiting for the warehouse: every unit ships (201).
    row(
        "POST",
        "/orders/{id}/shipments",
        |_| Some(json!({ "carrier": "DHL", "tracking_number": "MATRIX-1" })),
        FULFILMENT_OR_ADMIN_201,
    ),
    // On a fulfilled order: refunded in full, the unit restocked (202). Admins only.
    row(
        "POST",
        "/orders/{id}/refunds",
        |f| Some(json!({ "reason": "returned", "restock": [{ "product_id": f.product, "quantity": 1 }] })),
        [401, 403, 403, 403, 202],
    ),
    row("GET", "/admin/queues", none, ADMIN_ONLY_200),
    row("GET", "/admin/jobs", none, ADMIN_ONLY_200),
    row("POST", "/admin/jobs/replay", none, ADMIN_ONLY_200),
    row("POST", "/admin/jobs/{id}/replay", none, ADMIN_ONLY_200),
    row("GET", "/admin/orders", none, ADMIN_ONLY_200),
    row("GET", "/admin/reports/sales", none, ADMIN_ONLY_200),
    row(
        "POST",
        "/admin/webhook-endpoints",
        |_| Some(json!({ "url": "https://hooks.example.com/orderflow" })),
        [401, 403, 403, 403, 201],
    ),
    row("GET", "/admin/webhook-endpoints", none, ADMIN_ONLY_200),
    row("GET", "/admin/webhook-endpoints/{id}", none, ADMIN_ONLY_200),
    row(
        "PATCH",
        "/admin/webhook-endpoints/{id}",
        |_| Some(json!({ "description": "matrix" })),
        ADMIN_ONLY_200,
    ),
    row(
        "DELETE",
        "/admin/webhook-endpoints/{id}",
        none,
        [401, 403, 403, 403, 204],
    ),
    row(
        "POST",
        "/admin/webhook-endpoints/{id}/rotate-secret",
        |_| Some(json!({ "previous_valid_for": "1h" })),
        ADMIN_ONLY_200,
    ),
    row("GET", "/admin/webhook-endpoints/{id}/deliveries", none, ADMIN_ONLY_200),
    row(
        "POST",
        "/admin/webhook-endpoints/{id}/replay",
        |_| Some(json!({ "from_position": 1, "to_position": 100 })),
        [401, 403, 403, 403, 202],
    ),
    // The feed: admins and the `integrations` role (tests/events_api.rs checks the latter).
    row("GET", "/events", none, ADMIN_ONLY_200),
    // Stripe's events: no bearer token is asked for or honoured, only the Stripe-Signature over the
    // body; an unsigned event is 400 `stripe_signature_missing` whoever sends it (signed events:
    // tests/stripe_webhook.rs).
    row(
        "POST",
        "/webhooks/stripe",
        |_| {
            Some(json!({
                "id": "evt_matrix", "type": "payment_intent.succeeded",
                "data": { "object": { "object": "payment_intent", "id": "pi_matrix" } },
            }))
        },
        [400, 400, 400, 400, 400],
    ),
    // The dashboard's shell and assets carry no data: its script reads the admin API with a token.
    row("GET", "/ops", none, PUBLIC),
    row("GET", "/ops/app.js", none, PUBLIC),
    row("GET", "/ops/app.css", none, PUBLIC),
];

impl Row {
    /// The path with its `{id}` filled from the fixture.
    fn concrete_path(&self, fixture: &Fixture) -> String {
        let id = if self.path.starts_with("/products/") {
            fixture.product.clone()
        } else if self.path.starts_with("/customers/") {
            fixture.customer_a.clone()
        } else if self.path.starts_with("/orders/") {
            fixture.order_a.clone()
        } else if self.path.starts_with("/admin/jobs/{id}") {
            fixture.dead_job.clone().expect("a dead job for this row")
        } else if self.path.starts_with("/admin/webhook-endpoints/{id}") {
            fixture
                .webhook_endpoint
                .clone()
                .expect("a webhook endpoint for this row")
        } else {
            return self.path.to_string();
        };
        self.path.replace("{id}", &id)
    }
}

async fn fixture(app: &TestApp, row: &Row) -> Fixture {
    let needs_dead_job = row.path.contains("/admin/jobs/{id}");
    let needs_paid_order = row.path == "/orders/{id}/shipments";
    let needs_fulfilled_order = row.path == "/orders/{id}/refunds";
    let product = app.product("10.00", 100).await;
    let (customer_a, token_a) = app.customer().await;
    let (_, token_b) = app.customer().await;
    let placed = app
        .place_order(
            &token_a,
            &Uuid::now_v7().to_string(),
            &json!({ "items": [{ "product_id": product, "quantity": 1 }] }),
        )
        .await;
    assert_eq!(placed.status(), 202);
    let order_a = placed.json::<Value>().await.unwrap()["order_id"]
        .as_str()
        .unwrap()
        .to_string();
    if needs_paid_order || needs_fulfilled_order {
        // Paid, its stock committed: with external fulfilment it waits for the warehouse.
        app.drain().await;
    }
    if needs_fulfilled_order {
        let shipped = app
            .client
            .post(format!("{}/orders/{order_a}/shipments", app.url))
            .bearer_auth(&app.admin)
            .header("idempotency-key", Uuid::now_v7().to_string())
            .json(&json!({ "carrier": "DHL", "tracking_number": "MATRIX-0" }))
            .send()
            .await
            .unwrap();
        assert_eq!(shipped.status(), 201, "{}", shipped.text().await.unwrap_or_default());
        // The shipment's step captures the payment and fulfils the order.
        app.drain().await;
        let order: Value = app
            .get(&format!("/orders/{order_a}"), Some(&app.admin))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(order["status"], "fulfilled", "{order}");
    }
    let dead_job = if needs_dead_job {
        // A payment the provider never answers: the charge step exhausts its attempts.
        let parked = app
            .place_order(
                &token_a,
                &Uuid::now_v7().to_string(),
                &json!({ "items": [{ "product_id": product, "quantity": 1 }], "payment": { "token": "tok_unavailable" } }),
            )
            .await;
        assert_eq!(parked.status(), 202);
        app.drain().await;
        let dead: Value = app
            .get("/admin/jobs?state=dead", Some(&app.admin))
            .await
            .json()
            .await
            .unwrap();
        Some(dead["data"][0]["job_id"].as_str().expect("a dead job").to_string())
    } else {
        None
    };
    let webhook_endpoint = if row.path.contains("/admin/webhook-endpoints/{id}") {
        let created = app
            .post(
                "/admin/webhook-endpoints",
                Some(&app.admin),
                &json!({ "url": "https://hooks.example.com/matrix" }),
            )
            .await;
        assert_eq!(created.status(), 201);
        let body: Value = created.json().await.unwrap();
        Some(body["endpoint_id"].as_str().expect("endpoint_id").to_string())
    } else {
        None
    };
    Fixture {
        product,
        customer_a,
        token_a,
        token_b,
        order_a,
        dead_job,
        webhook_endpoint,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_route_answers_each_principal_as_the_contract_says() {
    let app = TestApp::spawn_with(Backend::Sqlite, |state| {
        state.saga = Arc::new(SagaSettings {
            fulfilment: FulfilmentMode::External,
            ..SagaSettings::default()
        });
        state.stripe_webhooks = Arc::new(StripeWebhookSettings::new(["whsec_matrix".to_string()]).unwrap());
    })
    .await;
    let warehouse = app
        .auth
        .issue("warehouse-matrix", &["fulfilment".into()], Duration::from_secs(3600))
        .unwrap();

    // The table covers exactly the operations the service publishes.
    let document: Value = app.get("/openapi.json", None).await.json().await.unwrap();
    let published: BTreeSet<(String, String)> = document["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, operations)| {
            operations
                .as_object()
                .unwrap()
                .keys()
                .filter(|method| ["get", "post", "put", "patch", "delete"].contains(&method.as_str()))
                .map(move |method| (method.to_uppercase(), path.clone()))
        })
        .collect();
    let tabled: BTreeSet<(String, String)> = TABLE
        .iter()
        .map(|row| (row.method.to_string(), row.path.to_string()))
        .collect();
    assert_eq!(tabled.len(), TABLE.len(), "a route appears twice in the table");
    assert_eq!(
        published.difference(&tabled).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "published routes missing from the authorization table"
    );
    assert_eq!(
        tabled.difference(&published).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "table rows for routes the service does not publish"
    );

    let mut mismatches = Vec::new();
    for row in TABLE {
        for (who, expected) in EVERYONE.into_iter().zip(row.expect) {
            let fixture = fixture(&app, row).await;
            let token = match who {
                Who::Anonymous => None,
                Who::CustomerA => Some(fixture.token_a.as_str()),
                Who::CustomerB => Some(fixture.token_b.as_str()),
                Who::Fulfilment => Some(warehouse.as_str()),
                Who::Admin => Some(app.admin.as_str()),
            };
            let method = reqwest::Method::from_bytes(row.method.as_bytes()).unwrap();
            let mut request = app
                .client
                .request(method, format!("{}{}", app.url, row.concrete_path(&fixture)))
                .header("idempotency-key", Uuid::now_v7().to_string());
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            if let Some(body) = (row.body)(&fixture) {
                request = request.json(&body);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            if status != expected {
                let body = response.text().await.unwrap_or_default();
                mismatches.push(format!(
                    "{} {} as {who:?}: {status}, expected {expected}: {body}",
                    row.method, row.path
                ));
            } else if status == 401 {
                assert!(
                    response.headers().contains_key("www-authenticate"),
                    "{} {}",
                    row.method,
                    row.path
                );
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "authorization matrix mismatches:\n{}",
        mismatches.join("\n")
    );
}
