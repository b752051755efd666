//! Events out over HTTP, on every backend (SQLite, PostgreSQL, the emulated DSQL): webhook endpoint
//! management (create, list, get, patch, delete, secret rotation, the delivery log, replays) with
//! every validation error, and the event feed (`GET /events`): CloudEvents in position order, its
//! filters and `last_position`, long-polling, who may read it, and 410 once events were pruned.
//!
//! No relay runs here: the tests stamp positions themselves with `stamp_events`, as the relay's
//! stamping loop does, so they decide when an event becomes visible.

mod common;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::{Backend, TestApp, error_fields, expect_problem};
use orderflow::store::events::{AttemptRecord, AttemptVerdict};
use reqwest::{Method, Response};
use serde_json::{Value, json};
use uuid::Uuid;

on_every_backend!(
    endpoints_are_created_listed_read_updated_and_deleted,
    secrets_rotate_with_a_grace_period,
    endpoint_validation_errors_name_the_field_and_change_nothing,
    unknown_and_malformed_endpoint_ids,
    deliveries_are_logged_with_their_attempts_and_replayed,
    replay_body_errors_name_the_fields,
    feed_serves_stamped_events_as_cloudevents,
    feed_filters_and_last_position,
    feed_rejects_bad_parameters,
    feed_long_polls_for_new_events,
    feed_is_for_admins_and_integrations,
    feed_answers_410_once_events_were_pruned,
);

const HOOK: &str = "https://hooks.example.com/orderflow";

async fn send(app: &TestApp, method: Method, path: &str, body: Option<&Value>) -> Response {
    let mut request = app
        .client
        .request(method, format!("{}{path}", app.url))
        .bearer_auth(&app.admin);
    if let Some(body) = body {
        request = request.json(body);
    }
    request.send().await.expect("request sent")
}

async fn json_of(response: Response, status: u16) -> Value {
    let actual = response.status().as_u16();
    let text = response.text().await.unwrap();
    assert_eq!(actual, status, "unexpected status; body: {text}");
    serde_json::from_str(&text).expect("a JSON body")
}

async fn create_endpoint(app: &TestApp, body: &Value) -> Value {
    json_of(app.post("/admin/webhook-endpoints", Some(&app.admin), body).await, 201).await
}

async fn list_endpoints(app: &TestApp) -> Value {
    json_of(app.get("/admin/webhook-endpoints", Some(&app.admin)).await, 200).await
}

fn id_of(body: &Value) -> String {
    body["endpoint_id"].as_str().expect("endpoint_id").to_string()
}

fn time(value: &Value) -> DateTime<Utc> {
    value.as_str().expect("a timestamp").parse().expect("RFC 3339")
}

/// Places one order of a fresh product for a fresh customer; returns its id.
async fn place_order(app: &TestApp) -> String {
    let product = app.product("10.00", 100).await;
    let (_, token) = app.customer().await;
    let placed = app
        .place_order(
            &token,
            &Uuid::now_v7().to_string(),
            &json!({ "items": [{ "product_id": product, "quantity": 1 }] }),
        )
        .await;
    json_of(placed, 202).await["order_id"].as_str().unwrap().to_string()
}

/// What the relay's stamping loop does: position the committed events.
async fn stamp(app: &TestApp) -> usize {
    app.store
        .events()
        .stamp_events(1000, orderflow::clock::now())
        .await
        .expect("stamp events")
}

async fn feed(app: &TestApp, query: &str) -> Value {
    let response = app.get(&format!("/events{query}"), Some(&app.admin)).await;
    assert_eq!(
        response.headers().get("cache-control").and_then(|v| v.to_str().ok()),
        Some("private, no-store")
    );
    json_of(response, 200).await
}

fn positions(page: &Value) -> Vec<i64> {
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect()
}

async fn endpoints_are_created_listed_read_updated_and_deleted(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let before = orderflow::clock::now();
    let response = app
        .post(
            "/admin/webhook-endpoints",
            Some(&app.admin),
            &json!({ "url": HOOK, "enabled_events": ["order.*", "payment.refunded"], "description": "  Warehouse  " }),
        )
        .await;
    assert_eq!(
        response.headers().get("cache-control").and_then(|v| v.to_str().ok()),
        Some("private, no-store")
    );
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let created = json_of(response, 201).await;
    let id = id_of(&created);
    assert_eq!(location, format!("/admin/webhook-endpoints/{id}"));
    assert_eq!(created["url"], HOOK);
    assert_eq!(created["enabled_events"], json!(["order.*", "payment.refunded"]));
    assert_eq!(created["description"], "Warehouse");
    assert_eq!(created["status"], "enabled");
    assert_eq!(created["disabled_reason"], Value::Null);
    let secret = created["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_"), "{secret}");
    orderflow::adapters::events::webhook::WebhookSecret::parse(secret).expect("a valid Standard Webhooks secret");
    assert!(time(&created["created_at"]) >= before - chrono::Duration::seconds(1));
    assert_eq!(created["created_at"], created["updated_at"]);
    assert!(created.get("health").is_none());

    // Defaults: every event, no description.
    let second = create_endpoint(&app, &json!({ "url": "http://127.0.0.1:9/hook" })).await;
    assert_eq!(second["enabled_events"], json!(["*"]));
    assert_eq!(second["description"], Value::Null);
    assert_ne!(second["secret"], created["secret"]);

    // Reads never show the secret; they show health.
    let shown = json_of(
        send(&app, Method::GET, &format!("/admin/webhook-endpoints/{id}"), None).await,
        200,
    )
    .await;
    assert!(shown.get("secret").is_none(), "{shown}");
    assert_eq!(shown["url"], HOOK);
    assert_eq!(shown["health"]["pending"], 0);
    assert_eq!(shown["health"]["failing"], 0);
    assert_eq!(shown["health"]["failed"], 0);
    assert_eq!(shown["health"]["oldest_pending_age_seconds"], Value::Null);
    assert_eq!(shown["health"]["failing_since"], Value::Null);
    let list = list_endpoints(&app).await;
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["endpoint_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str(), id_of(&second).as_str()], "creation order");
    assert_eq!(list["next_cursor"], Value::Null);
    for endpoint in list["data"].as_array().unwrap() {
        assert!(endpoint.get("secret").is_none(), "{endpoint}");
        assert_eq!(endpoint["health"]["pending"], 0);
    }
    // Keyset pages.
    let first_page = json_of(app.get("/admin/webhook-endpoints?limit=1", Some(&app.admin)).await, 200).await;
    assert_eq!(first_page["data"].as_array().unwrap().len(), 1);
    let cursor = first_page["next_cursor"].as_str().expect("a next page");
    let next = json_of(
        app.get(
            &format!("/admin/webhook-endpoints?limit=1&cursor={cursor}"),
            Some(&app.admin),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(next["data"][0]["endpoint_id"], second["endpoint_id"]);
    assert_eq!(next["next_cursor"], Value::Null);

    // PATCH: each field, answered without the secret.
    let path = format!("/admin/webhook-endpoints/{id}");
    let patched = json_of(
        send(
            &app,
            Method::PATCH,
            &path,
            Some(&json!({ "url": "https://other.example.com/in", "enabled_events": ["*"], "description": null })),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(patched["url"], "https://other.example.com/in");
    assert_eq!(patched["enabled_events"], json!(["*"]));
    assert_eq!(patched["description"], Value::Null);
    assert!(patched.get("secret").is_none());
    assert!(time(&patched["updated_at"]) >= time(&patched["created_at"]));
    let disabled = json_of(
        send(&app, Method::PATCH, &path, Some(&json!({ "status": "disabled" }))).await,
        200,
    )
    .await;
    assert_eq!(disabled["status"], "disabled");
    assert!(disabled["disabled_reason"].as_str().is_some_and(|r| !r.is_empty()));
    assert_eq!(disabled["url"], "https://other.example.com/in", "other fields are kept");
    let enabled = json_of(
        send(
            &app,
            Method::PATCH,
            &path,
            Some(&json!({ "status": "enabled", "description": "back" })),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(enabled["status"], "enabled");
    assert_eq!(enabled["disabled_reason"], Value::Null);
    assert_eq!(enabled["description"], "back");

    // DELETE: 204, then gone.
    let deleted = send(&app, Method::DELETE, &path, None).await;
    assert_eq!(deleted.status(), 204);
    assert!(deleted.text().await.unwrap().is_empty());
    expect_problem(send(&app, Method::GET, &path, None).await, 404, "not_found").await;
    expect_problem(send(&app, Method::DELETE, &path, None).await, 404, "not_found").await;
    assert_eq!(list_endpoints(&app).await["data"].as_array().unwrap().len(), 1);
}

async fn secrets_rotate_with_a_grace_period(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let created = create_endpoint(&app, &json!({ "url": HOOK })).await;
    let id = id_of(&created);
    let uuid: Uuid = id.parse().unwrap();
    let path = format!("/admin/webhook-endpoints/{id}/rotate-secret");

    // No body at all: the default grace of 24 h.
    let before = orderflow::clock::now();
    let rotated = json_of(send(&app, Method::POST, &path, None).await, 200).await;
    let secret = rotated["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    assert_ne!(rotated["secret"], created["secret"]);
    let expires = time(&rotated["previous_secret_expires_at"]);
    let day = chrono::Duration::hours(24);
    assert!(
        expires >= before + day && expires <= orderflow::clock::now() + day,
        "{expires}"
    );
    let stored = app.store.events().get_endpoint(uuid).await.unwrap().unwrap();
    assert_eq!(stored.secret, secret);
    assert_eq!(stored.previous_secret.as_deref(), created["secret"].as_str());
    assert_eq!(
        stored.signing_secrets(orderflow::clock::now()),
        [secret.as_str(), created["secret"].as_str().unwrap()],
        "both secrets sign during the grace period"
    );
    // GET shows when the grace ends, never a secret.
    let shown = json_of(
        send(&app, Method::GET, &format!("/admin/webhook-endpoints/{id}"), None).await,
        200,
    )
    .await;
    assert_eq!(time(&shown["previous_secret_expires_at"]), expires);
    assert!(!shown.to_string().contains("whsec_"), "{shown}");

    // `null` is an empty body.
    let null_body = app
        .client
        .post(format!("{}{path}", app.url))
        .bearer_auth(&app.admin)
        .header("content-type", "application/json")
        .body("null")
        .send()
        .await
        .unwrap();
    assert_eq!(null_body.status(), 200);

    // An explicit grace.
    let before = orderflow::clock::now();
    let hour = json_of(
        send(&app, Method::POST, &path, Some(&json!({ "previous_valid_for": "90m" }))).await,
        200,
    )
    .await;
    let expires = time(&hour["previous_secret_expires_at"]);
    assert!(expires >= before + chrono::Duration::minutes(90));
    assert!(expires <= orderflow::clock::now() + chrono::Duration::minutes(90));

    // 0: the old secret is invalid at once.
    let at_once = json_of(
        send(&app, Method::POST, &path, Some(&json!({ "previous_valid_for": "0" }))).await,
        200,
    )
    .await;
    let stored = app.store.events().get_endpoint(uuid).await.unwrap().unwrap();
    assert_eq!(stored.secret, at_once["secret"].as_str().unwrap());
    assert_eq!(
        stored.signing_secrets(orderflow::clock::now() + chrono::Duration::milliseconds(1)),
        [at_once["secret"].as_str().unwrap()]
    );
    assert!(time(&at_once["previous_secret_expires_at"]) <= orderflow::clock::now());

    // The longest grace is 7 days, in any unit; longer or malformed is 400 and rotates nothing.
    for ok in ["7d", "168h", "604800s", "604800"] {
        let response = send(&app, Method::POST, &path, Some(&json!({ "previous_valid_for": ok }))).await;
        assert_eq!(response.status(), 200, "{ok}");
    }
    let current = app.store.events().get_endpoint(uuid).await.unwrap().unwrap().secret;
    for bad in [
        json!({ "previous_valid_for": "8d" }),
        json!({ "previous_valid_for": "169h" }),
        json!({ "previous_valid_for": "1w" }),
        json!({ "previous_valid_for": "soon" }),
        json!({ "previous_valid_for": " 1h" }),
        json!({ "previous_valid_for": "-1h" }),
        json!({ "previous_valid_for": "99999999999999999999999d" }),
        json!({ "previous_valid_for": 3600 }),
        json!({ "previous_valid_for": null }),
    ] {
        let problem = expect_problem(
            send(&app, Method::POST, &path, Some(&bad)).await,
            400,
            "validation_failed",
        )
        .await;
        assert_eq!(error_fields(&problem), ["/previous_valid_for"], "{bad}");
    }
    let problem = expect_problem(
        send(&app, Method::POST, &path, Some(&json!({ "grace": "1h" }))).await,
        400,
        "validation_failed",
    )
    .await;
    assert_eq!(error_fields(&problem), ["/grace"]);
    let unchanged = app.store.events().get_endpoint(uuid).await.unwrap().unwrap().secret;
    assert_eq!(unchanged, current);
}

async fn endpoint_validation_errors_name_the_field_and_change_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let existing = create_endpoint(
        &app,
        &json!({ "url": HOOK, "enabled_events": ["order.paid"], "description": "kept" }),
    )
    .await;
    let id = id_of(&existing);
    let snapshot = list_endpoints(&app).await;

    let long_url = |len: usize| format!("https://hooks.example.com/{}", "a".repeat(len - 26));
    assert_eq!(long_url(2048).len(), 2048);
    let many: Vec<&str> = vec!["order.*"; 33];
    let cases: Vec<(Value, u16, &str, Vec<&str>)> = vec![
        (json!({}), 400, "validation_failed", vec!["/url"]),
        (json!({ "url": null }), 400, "validation_failed", vec!["/url"]),
        (json!({ "url": 42 }), 400, "validation_failed", vec!["/url"]),
        (json!({ "url": long_url(2049) }), 400, "validation_failed", vec!["/url"]),
        (
            json!({ "url": "ftp://hooks.example.com/x" }),
            422,
            "invalid_url",
            vec!["/url"],
        ),
        (
            json!({ "url": "https://user:pw@hooks.example.com/x" }),
            422,
            "invalid_url",
            vec!["/url"],
        ),
        (json!({ "url": "not a url" }), 422, "invalid_url", vec!["/url"]),
        (json!({ "url": "https:///nohost" }), 422, "invalid_url", vec!["/url"]),
        (json!({ "url": "" }), 422, "invalid_url", vec!["/url"]),
        (
            json!({ "url": HOOK, "enabled_events": [] }),
            400,
            "validation_failed",
            vec!["/enabled_events"],
        ),
        (
            json!({ "url": HOOK, "enabled_events": many }),
            400,
            "validation_failed",
            vec!["/enabled_events"],
        ),
        (
            json!({ "url": HOOK, "enabled_events": null }),
            400,
            "validation_failed",
            vec!["/enabled_events"],
        ),
        (
            json!({ "url": HOOK, "enabled_events": ["order.*", "order.teleported"] }),
            400,
            "validation_failed",
            vec!["/enabled_events/1"],
        ),
        (
            json!({ "url": HOOK, "enabled_events": ["nope.*"] }),
            400,
            "validation_failed",
            vec!["/enabled_events/0"],
        ),
        (
            json!({ "url": HOOK, "enabled_events": [7] }),
            400,
            "validation_failed",
            vec!["/enabled_events/0"],
        ),
        (
            json!({ "url": HOOK, "description": "d".repeat(501) }),
            400,
            "validation_failed",
            vec!["/description"],
        ),
        (
            json!({ "url": HOOK, "description": "bell\u{7}" }),
            400,
            "validation_failed",
            vec!["/description"],
        ),
        (
            json!({ "url": HOOK, "colour": "red" }),
            400,
            "validation_failed",
            vec!["/colour"],
        ),
        (
            json!({ "secret": "whsec_chosen", "url": HOOK }),
            400,
            "validation_failed",
            vec!["/secret"],
        ),
        // Every bad field at once.
        (
            json!({ "enabled_events": ["bogus"], "description": "d".repeat(501) }),
            400,
            "validation_failed",
            vec!["/url", "/enabled_events/0", "/description"],
        ),
    ];
    for (body, status, code, fields) in cases {
        let problem = expect_problem(
            app.post("/admin/webhook-endpoints", Some(&app.admin), &body).await,
            status,
            code,
        )
        .await;
        assert_eq!(error_fields(&problem), fields, "{body}");
    }
    assert_eq!(list_endpoints(&app).await, snapshot, "refused requests change nothing");

    // The limits themselves are accepted.
    let at_limits = create_endpoint(
        &app,
        &json!({
            "url": long_url(2048),
            "enabled_events": vec!["order.*"; 32],
            "description": "é".repeat(500),
        }),
    )
    .await;
    assert_eq!(at_limits["description"].as_str().unwrap().chars().count(), 500);
    send(
        &app,
        Method::DELETE,
        &format!("/admin/webhook-endpoints/{}", id_of(&at_limits)),
        None,
    )
    .await;

    // PATCH.
    let path = format!("/admin/webhook-endpoints/{id}");
    let cases: Vec<(Value, u16, &str, Vec<&str>)> = vec![
        (json!({}), 400, "validation_failed", vec!["/"]),
        (json!({ "url": null }), 400, "validation_failed", vec!["/url"]),
        (
            json!({ "enabled_events": null }),
            400,
            "validation_failed",
            vec!["/enabled_events"],
        ),
        (json!({ "status": null }), 400, "validation_failed", vec!["/status"]),
        (json!({ "status": "paused" }), 400, "validation_failed", vec!["/status"]),
        (
            json!({ "enabled_events": ["bad"] }),
            400,
            "validation_failed",
            vec!["/enabled_events/0"],
        ),
        (
            json!({ "enabled_events": [] }),
            400,
            "validation_failed",
            vec!["/enabled_events"],
        ),
        (
            json!({ "description": "d".repeat(501) }),
            400,
            "validation_failed",
            vec!["/description"],
        ),
        (
            json!({ "url": "ftp://x.example.com" }),
            422,
            "invalid_url",
            vec!["/url"],
        ),
        // A valid change beside an invalid one is not applied either.
        (
            json!({ "description": "changed", "url": "mailto:a@b.c" }),
            422,
            "invalid_url",
            vec!["/url"],
        ),
        (
            json!({ "description": "changed", "status": "off" }),
            400,
            "validation_failed",
            vec!["/status"],
        ),
        (
            json!({ "secret": "whsec_x" }),
            400,
            "validation_failed",
            vec!["/secret"],
        ),
    ];
    for (body, status, code, fields) in cases {
        let problem = expect_problem(send(&app, Method::PATCH, &path, Some(&body)).await, status, code).await;
        assert_eq!(error_fields(&problem), fields, "PATCH {body}");
    }
    let not_json = app
        .client
        .patch(format!("{}{path}", app.url))
        .bearer_auth(&app.admin)
        .body("description=x")
        .send()
        .await
        .unwrap();
    expect_problem(not_json, 415, "unsupported_media_type").await;
    assert_eq!(list_endpoints(&app).await, snapshot, "refused changes change nothing");
}

async fn unknown_and_malformed_endpoint_ids(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let unknown = Uuid::now_v7();
    let replay = json!({ "from_position": 1, "to_position": 2 });
    let patch = json!({ "description": "x" });
    for (method, suffix, body) in [
        (Method::GET, "", None),
        (Method::PATCH, "", Some(&patch)),
        (Method::DELETE, "", None),
        (Method::POST, "/rotate-secret", None),
        (Method::GET, "/deliveries", None),
        (Method::POST, "/replay", Some(&replay)),
    ] {
        let path = format!("/admin/webhook-endpoints/{unknown}{suffix}");
        expect_problem(send(&app, method.clone(), &path, body).await, 404, "not_found").await;
        let path = format!("/admin/webhook-endpoints/not-a-uuid{suffix}");
        let problem = expect_problem(send(&app, method.clone(), &path, body).await, 400, "validation_failed").await;
        assert_eq!(error_fields(&problem), ["path.id"], "{method} {path}");
    }
}

async fn deliveries_are_logged_with_their_attempts_and_replayed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let all = create_endpoint(&app, &json!({ "url": HOOK })).await;
    let refunds = create_endpoint(&app, &json!({ "url": HOOK, "enabled_events": ["payment.refunded"] })).await;
    let (all_id, refunds_id) = (id_of(&all), id_of(&refunds));
    let deliveries = |id: &str, query: &str| format!("/admin/webhook-endpoints/{id}/deliveries{query}");

    let empty = json_of(app.get(&deliveries(&all_id, ""), Some(&app.admin)).await, 200).await;
    assert_eq!(empty, json!({ "data": [], "next_cursor": null }));

    let first = place_order(&app).await;
    let second = place_order(&app).await;
    assert_eq!(stamp(&app).await, 2);
    // Stamping fans each event out to the endpoints whose filters match.
    let log = json_of(app.get(&deliveries(&all_id, ""), Some(&app.admin)).await, 200).await;
    let data = log["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    // Newest first.
    assert_eq!(data[0]["subject"], format!("orders/{second}"));
    assert_eq!(data[1]["subject"], format!("orders/{first}"));
    for delivery in data {
        assert_eq!(delivery["state"], "pending");
        assert_eq!(delivery["event_type"], "order.placed");
        assert_eq!(delivery["sequence"], 1);
        assert_eq!(delivery["attempts"], 0);
        assert_eq!(delivery["attempt_log"], json!([]));
        assert!(delivery["next_attempt_at"].is_string());
        assert_eq!(delivery["delivered_at"], Value::Null);
    }
    let none = json_of(app.get(&deliveries(&refunds_id, ""), Some(&app.admin)).await, 200).await;
    assert_eq!(none["data"], json!([]));

    // One failed attempt, recorded as the relay records it.
    let claims = app
        .store
        .events()
        .claim_deliveries(
            all_id.parse().unwrap(),
            1,
            Duration::from_secs(60),
            orderflow::clock::now(),
        )
        .await
        .unwrap();
    assert_eq!(claims.len(), 1);
    let claim = &claims[0];
    app.store
        .events()
        .record_attempt(
            &AttemptRecord {
                delivery_id: claim.delivery_id,
                lease_token: claim.lease_token,
                endpoint_id: all_id.parse().unwrap(),
                verdict: AttemptVerdict::RetryAt(orderflow::clock::now() + chrono::Duration::hours(1)),
                status_code: Some(503),
                latency: Duration::from_millis(42),
                error: Some("the endpoint answered 503".into()),
                response_excerpt: "upstream busy".into(),
                disable_after: Duration::from_secs(5 * 86_400),
            },
            orderflow::clock::now(),
        )
        .await
        .unwrap();
    let log = json_of(app.get(&deliveries(&all_id, ""), Some(&app.admin)).await, 200).await;
    let attempted = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["delivery_id"] == json!(claim.delivery_id))
        .expect("the attempted delivery");
    assert_eq!(attempted["state"], "pending");
    assert_eq!(attempted["attempts"], 1);
    assert_eq!(attempted["last_status"], 503);
    assert_eq!(attempted["event_id"], json!(claim.event.id));
    let attempt = &attempted["attempt_log"][0];
    assert_eq!(attempt["status_code"], 503);
    assert_eq!(attempt["latency_ms"], 42);
    assert_eq!(attempt["error"], "the endpoint answered 503");
    assert_eq!(attempt["response_excerpt"], "upstream busy");
    assert!(attempt["attempted_at"].is_string());

    // Health in the list and on the endpoint.
    let list = list_endpoints(&app).await;
    let health = &list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["endpoint_id"] == all["endpoint_id"])
        .unwrap()["health"];
    assert_eq!(health["pending"], 2);
    assert_eq!(health["failing"], 1);
    assert_eq!(health["failed"], 0);
    assert!(health["oldest_pending_age_seconds"].as_f64().unwrap() >= 0.0);
    assert!(health["failing_since"].is_string());
    let shown = json_of(
        app.get(&format!("/admin/webhook-endpoints/{all_id}"), Some(&app.admin))
            .await,
        200,
    )
    .await;
    for member in ["pending", "failing", "failed", "failing_since"] {
        assert_eq!(shown["health"][member], health[member], "{member}");
    }

    // Filters and pages.
    let delivered = json_of(
        app.get(&deliveries(&all_id, "?state=delivered"), Some(&app.admin))
            .await,
        200,
    )
    .await;
    assert_eq!(delivered["data"], json!([]));
    let pending = json_of(
        app.get(&deliveries(&all_id, "?state=pending"), Some(&app.admin)).await,
        200,
    )
    .await;
    assert_eq!(pending["data"].as_array().unwrap().len(), 2);
    let page = json_of(app.get(&deliveries(&all_id, "?limit=1"), Some(&app.admin)).await, 200).await;
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    let cursor = page["next_cursor"].as_str().expect("a next page");
    let rest = json_of(
        app.get(
            &deliveries(&all_id, &format!("?limit=1&cursor={cursor}")),
            Some(&app.admin),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(rest["data"].as_array().unwrap().len(), 1);
    assert_ne!(rest["data"][0]["delivery_id"], page["data"][0]["delivery_id"]);
    assert_eq!(rest["next_cursor"], Value::Null);
    for (query, field) in [
        ("?state=lost", "query.state"),
        ("?limit=0", "query.limit"),
        ("?cursor=zz", "query.cursor"),
        ("?colour=red", "query.colour"),
    ] {
        let problem = expect_problem(
            app.get(&deliveries(&all_id, query), Some(&app.admin)).await,
            400,
            "validation_failed",
        )
        .await;
        assert_eq!(error_fields(&problem), [field], "{query}");
    }

    // Replays: the same events again (same ids), filtered by the endpoint's events.
    let replay = |id: &str| format!("/admin/webhook-endpoints/{id}/replay");
    let response = app
        .post(
            &replay(&all_id),
            Some(&app.admin),
            &json!({ "from_position": 1, "to_position": 2 }),
        )
        .await;
    assert_eq!(
        response.headers().get("cache-control").and_then(|v| v.to_str().ok()),
        Some("private, no-store")
    );
    assert_eq!(json_of(response, 202).await, json!({ "queued": 2 }));
    let only_first = json_of(
        app.post(
            &replay(&all_id),
            Some(&app.admin),
            &json!({ "from_position": 1, "to_position": 1 }),
        )
        .await,
        202,
    )
    .await;
    assert_eq!(only_first["queued"], 1);
    let by_time = json_of(
        app.post(
            &replay(&all_id),
            Some(&app.admin),
            &json!({ "since": "2000-01-01T00:00:00Z", "until": "2100-01-01T00:00:00+02:00" }),
        )
        .await,
        202,
    )
    .await;
    assert_eq!(by_time["queued"], 2);
    let empty_window = json_of(
        app.post(
            &replay(&all_id),
            Some(&app.admin),
            &json!({ "since": "2000-01-01T00:00:00Z", "until": "2000-01-02T00:00:00Z" }),
        )
        .await,
        202,
    )
    .await;
    assert_eq!(empty_window["queued"], 0);
    let filtered = json_of(
        app.post(
            &replay(&refunds_id),
            Some(&app.admin),
            &json!({ "from_position": 0, "to_position": 100 }),
        )
        .await,
        202,
    )
    .await;
    assert_eq!(filtered["queued"], 0, "refunds only: no order.placed");
    let log = json_of(app.get(&deliveries(&all_id, "?limit=200"), Some(&app.admin)).await, 200).await;
    let data = log["data"].as_array().unwrap();
    assert_eq!(data.len(), 2 + 2 + 1 + 2);
    let event_ids: std::collections::BTreeSet<&str> = data.iter().map(|d| d["event_id"].as_str().unwrap()).collect();
    assert_eq!(event_ids.len(), 2, "replays carry the same event ids");

    // Deleting an endpoint takes its deliveries and their attempts with it.
    let deleted = send(
        &app,
        Method::DELETE,
        &format!("/admin/webhook-endpoints/{all_id}"),
        None,
    )
    .await;
    assert_eq!(deleted.status(), 204);
    expect_problem(
        app.get(&deliveries(&all_id, ""), Some(&app.admin)).await,
        404,
        "not_found",
    )
    .await;
    let health = app
        .store
        .events()
        .endpoint_health(orderflow::clock::now())
        .await
        .unwrap();
    assert_eq!(health.len(), 1);
}

async fn replay_body_errors_name_the_fields(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let endpoint = create_endpoint(&app, &json!({ "url": HOOK })).await;
    place_order(&app).await;
    stamp(&app).await;
    let path = format!("/admin/webhook-endpoints/{}/replay", id_of(&endpoint));
    let t0 = "2026-01-01T00:00:00Z";
    let t1 = "2026-01-02T00:00:00Z";
    let cases: Vec<(Value, u16, &str, Vec<&str>)> = vec![
        (
            json!({}),
            422,
            "invalid_replay_range",
            vec!["/since", "/until", "/from_position", "/to_position"],
        ),
        (json!({ "since": t0 }), 422, "invalid_replay_range", vec!["/until"]),
        (json!({ "until": t1 }), 422, "invalid_replay_range", vec!["/since"]),
        (
            json!({ "from_position": 1 }),
            422,
            "invalid_replay_range",
            vec!["/to_position"],
        ),
        (
            json!({ "to_position": 1 }),
            422,
            "invalid_replay_range",
            vec!["/from_position"],
        ),
        (
            json!({ "since": t0, "until": t1, "from_position": 1, "to_position": 2 }),
            422,
            "invalid_replay_range",
            vec!["/since", "/until", "/from_position", "/to_position"],
        ),
        (
            json!({ "since": t0, "to_position": 2 }),
            422,
            "invalid_replay_range",
            vec!["/since", "/to_position"],
        ),
        (
            json!({ "since": t1, "until": t0 }),
            422,
            "invalid_replay_range",
            vec!["/until"],
        ),
        (
            json!({ "since": t0, "until": t0 }),
            422,
            "invalid_replay_range",
            vec!["/until"],
        ),
        (
            json!({ "from_position": 5, "to_position": 4 }),
            422,
            "invalid_replay_range",
            vec!["/to_position"],
        ),
        (
            json!({ "since": "yesterday", "until": t1 }),
            400,
            "validation_failed",
            vec!["/since"],
        ),
        (
            json!({ "since": t0, "until": "2026-13-01T00:00:00Z" }),
            400,
            "validation_failed",
            vec!["/until"],
        ),
        (
            json!({ "from_position": -1, "to_position": 2 }),
            400,
            "validation_failed",
            vec!["/from_position"],
        ),
        (
            json!({ "from_position": 1.5, "to_position": 2 }),
            400,
            "validation_failed",
            vec!["/from_position"],
        ),
        (
            json!({ "from_position": "1", "to_position": 2 }),
            400,
            "validation_failed",
            vec!["/from_position"],
        ),
        (
            json!({ "from_position": 1, "to_position": 2, "dry_run": true }),
            400,
            "validation_failed",
            vec!["/dry_run"],
        ),
    ];
    for (body, status, code, fields) in cases {
        let problem = expect_problem(app.post(&path, Some(&app.admin), &body).await, status, code).await;
        assert_eq!(error_fields(&problem), fields, "{body}");
    }
    // Nothing was queued by the refusals: the one delivery from stamping is all there is.
    let log = json_of(
        app.get(
            &format!("/admin/webhook-endpoints/{}/deliveries", id_of(&endpoint)),
            Some(&app.admin),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(log["data"].as_array().unwrap().len(), 1);
    // Whole numbers in any JSON spelling, like every integer of the API.
    let spelled = app
        .client
        .post(format!("{}{path}", app.url))
        .bearer_auth(&app.admin)
        .header("content-type", "application/json")
        .body(r#"{"from_position": 1.0, "to_position": 1e1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(spelled, 202).await["queued"], 1);
}

/// The `last_position` of a page that must hold no events.
fn empty_page(page: Value) -> i64 {
    assert_eq!(page["data"], json!([]), "{page}");
    page["last_position"].as_i64().expect("last_position")
}

async fn feed_serves_stamped_events_as_cloudevents(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let nothing = feed(&app, "").await;
    assert_eq!(nothing, json!({ "data": [], "last_position": 0, "head_position": 0 }));

    let first = place_order(&app).await;
    let second = place_order(&app).await;
    // Committed but not yet positioned: not in the feed.
    assert_eq!(
        feed(&app, "").await,
        json!({ "data": [], "last_position": 0, "head_position": 0 })
    );
    assert_eq!(stamp(&app).await, 2);

    let page = feed(&app, "").await;
    assert_eq!(positions(&page), [1, 2]);
    assert_eq!(page["last_position"], 2);
    assert_eq!(page["head_position"], 2);
    let limited = feed(&app, "?limit=1").await;
    assert_eq!(
        (limited["last_position"].as_i64(), limited["head_position"].as_i64()),
        (Some(1), Some(2))
    );
    let events = page["data"].as_array().unwrap();
    for (event, order) in events.iter().zip([&first, &second]) {
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["type"], "order.placed");
        assert_eq!(event["source"], "orderflow");
        assert_eq!(event["subject"], format!("orders/{order}"));
        assert_eq!(event["sequence"], 1);
        assert_eq!(event["datacontenttype"], "application/json");
        assert_eq!(event["data"]["order"]["order_id"], order.as_str());
        assert_eq!(event["data"]["order"]["status"], "pending_payment");
        assert!(event["id"].as_str().unwrap().parse::<Uuid>().is_ok());
        time(&event["time"]);
    }
    assert_ne!(events[0]["id"], events[1]["id"]);
    // Exactly the CloudEvent every channel sends.
    let stored = app
        .store
        .events()
        .events_after(&orderflow::store::events::EventQuery {
            after: 0,
            limit: 10,
            types: None,
        })
        .await
        .unwrap();
    for (event, stored) in events.iter().zip(&stored) {
        let rendered: Value = serde_json::from_slice(&stored.to_json("orderflow")).unwrap();
        assert_eq!(event, &rendered);
    }

    // The pipeline's later facts follow, each order's in sequence, positions gap-free.
    app.drain().await;
    stamp(&app).await;
    let all = feed(&app, "?limit=1000").await;
    let positions = positions(&all);
    assert!(positions.len() > 2, "the pipeline emitted more events");
    assert_eq!(positions, (1..=positions.len() as i64).collect::<Vec<_>>());
    assert_eq!(all["last_position"], positions.len() as i64);
    for order in [&first, &second] {
        let sequences: Vec<i64> = all["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["subject"] == format!("orders/{order}"))
            .map(|e| e["sequence"].as_i64().unwrap())
            .collect();
        assert_eq!(sequences, (1..=sequences.len() as i64).collect::<Vec<_>>());
        assert!(sequences.len() >= 2, "{order}: {sequences:?}");
    }
    let types: Vec<&str> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert!(types.contains(&"order.paid"), "{types:?}");
}

async fn feed_filters_and_last_position(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    place_order(&app).await;
    place_order(&app).await;
    stamp(&app).await;

    // `after`.
    let after_one = feed(&app, "?after=1").await;
    assert_eq!(positions(&after_one), [2]);
    assert_eq!(after_one["last_position"], 2);
    // `limit`: a full page continues from its last event.
    let one = feed(&app, "?limit=1").await;
    assert_eq!(positions(&one), [1]);
    assert_eq!(one["last_position"], 1);
    let next = feed(&app, "?after=1&limit=1").await;
    assert_eq!(positions(&next), [2]);
    assert_eq!(next["last_position"], 2);
    let end = feed(&app, "?after=2&limit=1").await;
    assert_eq!(positions(&end), Vec::<i64>::new());
    assert_eq!(end["last_position"], 2);
    // A reader ahead of the feed keeps its place.
    let ahead = feed(&app, "?after=1000").await;
    assert_eq!(empty_page(ahead), 1000);

    // `type`: one type, a prefix, everything. A filter that skips events still advances.
    for (filter, expected) in [
        ("order.placed", vec![1, 2]),
        ("order.*", vec![1, 2]),
        ("*", vec![1, 2]),
        ("order.paid", vec![]),
        ("payment.*", vec![]),
    ] {
        let page = feed(&app, &format!("?type={filter}")).await;
        assert_eq!(positions(&page), expected, "type={filter}");
        assert_eq!(page["last_position"], 2, "type={filter}");
    }
    // The pipeline adds order.paid events: the filter finds them, after or not.
    app.drain().await;
    stamp(&app).await;
    let paid = feed(&app, "?type=order.paid").await;
    let data = paid["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert!(data.iter().all(|e| e["type"] == "order.paid"));
    let total = feed(&app, "?limit=1000").await["last_position"].as_i64().unwrap();
    assert_eq!(paid["last_position"], total);
    let later = feed(&app, &format!("?type=order.paid&after={}", positions(&paid)[0])).await;
    assert_eq!(positions(&later), [positions(&paid)[1]]);
    // A full filtered page ends at its last event, not at the feed's end.
    let full = feed(&app, "?type=order.paid&limit=1").await;
    assert_eq!(full["last_position"], positions(&paid)[0]);
    // `limit` is whole numbers in any spelling, up to 1000.
    assert_eq!(positions(&feed(&app, "?limit=2.0").await), [1, 2]);
    assert_eq!(
        feed(&app, "?limit=1000").await["data"].as_array().unwrap().len() as i64,
        total
    );
}

async fn feed_rejects_bad_parameters(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for (query, field) in [
        ("?after=-1", "query.after"),
        ("?after=x", "query.after"),
        ("?after=1.5", "query.after"),
        ("?after=", "query.after"),
        ("?after=99999999999999999999", "query.after"),
        ("?limit=0", "query.limit"),
        ("?limit=1001", "query.limit"),
        ("?limit=ten", "query.limit"),
        ("?type=order.teleported", "query.type"),
        ("?type=nope.*", "query.type"),
        ("?type=", "query.type"),
        ("?cursor=abc", "query.cursor"),
        ("?after=1&after=2", "query.after"),
    ] {
        let problem = expect_problem(
            app.get(&format!("/events{query}"), Some(&app.admin)).await,
            400,
            "validation_failed",
        )
        .await;
        assert_eq!(error_fields(&problem), [field], "{query}");
    }
    for prefer in ["wait=soon", "wait", "wait=1234567890"] {
        let response = app
            .client
            .get(format!("{}/events", app.url))
            .bearer_auth(&app.admin)
            .header("prefer", prefer)
            .send()
            .await
            .unwrap();
        let problem = expect_problem(response, 400, "validation_failed").await;
        assert_eq!(error_fields(&problem), ["Prefer"], "{prefer}");
    }
}

async fn feed_long_polls_for_new_events(backend: Backend) {
    let app = std::sync::Arc::new(TestApp::spawn(backend).await);
    place_order(&app).await;
    let long_poll = |app: &TestApp, query: &str, wait: u64| {
        app.client
            .get(format!("{}/events{query}", app.url))
            .bearer_auth(&app.admin)
            .header("prefer", format!("wait={wait}"))
            .send()
    };

    // Nothing positioned yet: the request waits until the stamp lands, then answers with it.
    let stamper = {
        let app = app.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            stamp(&app).await
        })
    };
    let started = Instant::now();
    let response = long_poll(&app, "", 20).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(response.headers()["preference-applied"], "wait=20");
    let page = json_of(response, 200).await;
    assert_eq!(stamper.await.unwrap(), 1);
    assert_eq!(positions(&page), [1]);
    assert_eq!(page["last_position"], 1);
    assert!(
        elapsed < Duration::from_secs(20),
        "answered when the event arrived, not after the wait"
    );

    // Nothing new: empty after the wait, at the same place.
    let started = Instant::now();
    let response = long_poll(&app, "?after=1", 1).await.unwrap();
    assert_eq!(response.headers()["preference-applied"], "wait=1");
    let page = json_of(response, 200).await;
    assert!(started.elapsed() >= Duration::from_millis(900), "it waited");
    assert_eq!(empty_page(page), 1);

    // Events the filter skips do not end the wait, but move `last_position` past them.
    place_order(&app).await;
    let stamper = {
        let app = app.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            stamp(&app).await
        })
    };
    let page = json_of(long_poll(&app, "?after=1&type=payment.refunded", 2).await.unwrap(), 200).await;
    assert_eq!(stamper.await.unwrap(), 1);
    assert_eq!(empty_page(page), 2);

    // Events already there: no wait at all.
    let page = json_of(long_poll(&app, "", 20).await.unwrap(), 200).await;
    assert_eq!(positions(&page), [1, 2]);
}

async fn feed_is_for_admins_and_integrations(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    place_order(&app).await;
    stamp(&app).await;
    let integrations = app
        .auth
        .issue("warehouse-bridge", &["integrations".into()], Duration::from_secs(3600))
        .unwrap();
    let page = json_of(app.get("/events", Some(&integrations)).await, 200).await;
    assert_eq!(positions(&page), [1]);
    let (_, customer) = app.customer().await;
    expect_problem(app.get("/events", Some(&customer)).await, 403, "forbidden").await;
    let reader = app
        .auth
        .issue("someone", &["reader".into()], Duration::from_secs(3600))
        .unwrap();
    expect_problem(app.get("/events", Some(&reader)).await, 403, "forbidden").await;
    let anonymous = app.get("/events", None).await;
    assert!(anonymous.headers().contains_key("www-authenticate"));
    expect_problem(anonymous, 401, "unauthorized").await;
    // The integrations role is for the feed only.
    expect_problem(
        app.get("/admin/webhook-endpoints", Some(&integrations)).await,
        403,
        "forbidden",
    )
    .await;
}

async fn feed_answers_410_once_events_were_pruned(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    place_order(&app).await;
    place_order(&app).await;
    stamp(&app).await;
    let far_future = orderflow::clock::now() + chrono::Duration::days(365);
    // No ordered channel (NATS) is configured: every positioned event may go.
    assert_eq!(app.store.events().prune_events(far_future, 1000).await.unwrap(), 2);

    // Everything up to 2 is gone: a reader from 0 or 1 missed events.
    for after in [0, 1] {
        let response = app.get(&format!("/events?after={after}"), Some(&app.admin)).await;
        assert_eq!(
            response.headers().get("cache-control").and_then(|v| v.to_str().ok()),
            Some("no-store"),
            "never cached, like every error"
        );
        let problem = expect_problem(response, 410, "events_pruned").await;
        assert_eq!(problem["oldest_position"], 3, "{problem}");
        assert_eq!(problem["type"], "/problems/events_pruned");
    }
    // A reader that had seen 2 has missed nothing.
    assert_eq!(empty_page(feed(&app, "?after=2").await), 2);

    // New events continue the positions; older readers still get 410.
    place_order(&app).await;
    stamp(&app).await;
    let page = feed(&app, "?after=2").await;
    assert_eq!(positions(&page), [3]);
    let problem = expect_problem(app.get("/events", Some(&app.admin)).await, 410, "events_pruned").await;
    assert_eq!(problem["oldest_position"], 3);
    // Long-polling does not hide the 410.
    let response = app
        .client
        .get(format!("{}/events?after=1", app.url))
        .bearer_auth(&app.admin)
        .header("prefer", "wait=5")
        .send()
        .await
        .unwrap();
    expect_problem(response, 410, "events_pruned").await;
}
