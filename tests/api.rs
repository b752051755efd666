//! The HTTP contract of API.md over a real socket, on every backend (SQLite, PostgreSQL, the
//! emulated DSQL).

mod common;

use common::SendJson;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Backend, TestApp, error_fields, expect_problem};
use rand::Rng;
use rand::seq::SliceRandom;
use serde_json::{Value, json};
use sqlx::Connection;

on_every_backend!(
    catalog_admin_crud_and_stock_ledger,
    catalog_list_filters_and_paginates,
    catalog_etag_round_trip,
    catalog_rejects_bad_input,
    customers_create_read_and_conflict,
    customer_orders_newest_first,
    order_is_accepted_reserved_and_readable,
    order_validation_errors_name_the_field,
    order_business_rejections_reserve_nothing,
    auth_rules,
    idempotency_replay_reuse_and_scope,
    idempotency_key_in_flight_gets_409,
    idempotency_key_past_retention_places_a_new_order,
    concurrent_single_unit_orders_never_oversell,
    concurrent_mixed_carts_no_deadlock_no_oversell,
    concurrent_identical_requests_make_one_order,
    responses_carry_correlation_ids,
);

async fn catalog_admin_crud_and_stock_ledger(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let response = app
        .post(
            "/products",
            Some(&app.admin),
            &json!({"name": "Desk lamp", "price": 24.5, "stock_quantity": 10, "category": "home", "sku": "LAMP-1"}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let created: Value = response.json().await.unwrap();
    let id = created["product_id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/products/{id}"));
    assert_eq!(created["price"].to_string(), "24.50");
    assert_eq!(created["currency"], "USD");
    assert_eq!(created["stock_quantity"], 10);

    // Duplicate SKU → 409 naming the field.
    let duplicate = app
        .post(
            "/products",
            Some(&app.admin),
            &json!({"name": "Other", "price": 1, "stock_quantity": 1, "sku": "LAMP-1"}),
        )
        .await;
    let problem = expect_problem(duplicate, 409, "already_exists").await;
    assert_eq!(error_fields(&problem), ["/sku"]);

    // PATCH descriptive fields; explicit null clears an optional field.
    let patched: Value = app
        .client
        .patch(format!("{}/products/{id}", app.url))
        .bearer_auth(&app.admin)
        .json(&json!({"name": "Desk lamp II", "price": 19.99, "category": null}))
        .send_json()
        .await;
    assert_eq!(patched["name"], "Desk lamp II");
    assert_eq!(patched["price"].to_string(), "19.99");
    assert_eq!(patched["category"], Value::Null);
    assert_eq!(patched["sku"], "LAMP-1");

    // Reserve 4 units with an order, then adjust stock around the reservation.
    let (_, buyer) = app.customer().await;
    let placed = app
        .place_order(&buyer, "lamp-1", &json!({"items": [{"product_id": id, "quantity": 4}]}))
        .await;
    assert_eq!(placed.status(), 202);
    assert_eq!(app.available(&id).await, 6);

    let restock = app
        .post(
            &format!("/products/{id}/stock"),
            Some(&app.admin),
            &json!({"delta": 5, "reason": "delivery"}),
        )
        .await;
    assert_eq!(restock.status(), 200);
    assert_eq!(restock.json::<Value>().await.unwrap()["stock_quantity"], 11);
    // on hand 15, reserved 4: taking 12 would leave 3 < 4 reserved.
    let too_much = app
        .post(
            &format!("/products/{id}/stock"),
            Some(&app.admin),
            &json!({"delta": -12, "reason": "count"}),
        )
        .await;
    let problem = expect_problem(too_much, 409, "stock_below_reserved").await;
    assert_eq!(error_fields(&problem), ["/delta"]);
    let shrink = app
        .post(
            &format!("/products/{id}/stock"),
            Some(&app.admin),
            &json!({"delta": -11, "reason": "count"}),
        )
        .await;
    assert_eq!(shrink.status(), 200);
    assert_eq!(app.available(&id).await, 0);

    let missing = app
        .post(
            &format!("/products/{}/stock", uuid::Uuid::now_v7()),
            Some(&app.admin),
            &json!({"delta": 1, "reason": "x"}),
        )
        .await;
    expect_problem(missing, 404, "not_found").await;

    // Every movement is in the ledger: the audit reconciles on_hand with it.
    app.assert_audit_clean().await;
}

async fn catalog_list_filters_and_paginates(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for index in 0..5 {
        let category = if index % 2 == 0 { "even" } else { "odd" };
        let response = app
            .post(
                "/products",
                Some(&app.admin),
                &json!({"name": format!("P{index}"), "price": 1, "stock_quantity": 1, "category": category}),
            )
            .await;
        assert_eq!(response.status(), 201);
    }
    let mut seen = Vec::new();
    let mut path = "/products?category=even&limit=2".to_string();
    loop {
        let page: Value = app.get(&path, None).await.json().await.unwrap();
        for product in page["data"].as_array().unwrap() {
            assert_eq!(product["category"], "even");
            seen.push(product["name"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/products?category=even&limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, ["P0", "P2", "P4"]);
    let all: Value = app.get("/products", None).await.json().await.unwrap();
    assert_eq!(all["data"].as_array().unwrap().len(), 5);
    assert_eq!(all["next_cursor"], Value::Null);

    for (query, field) in [
        ("limit=0", "query.limit"),
        ("limit=201", "query.limit"),
        ("cursor=zzz", "query.cursor"),
        ("colour=red", "query.colour"),
    ] {
        let problem = expect_problem(
            app.get(&format!("/products?{query}"), None).await,
            400,
            "validation_failed",
        )
        .await;
        assert_eq!(error_fields(&problem), [field], "{query}");
    }
    let problem = expect_problem(app.get("/products/not-a-uuid", None).await, 400, "validation_failed").await;
    assert_eq!(error_fields(&problem), ["path.id"]);
    expect_problem(
        app.get(&format!("/products/{}", uuid::Uuid::now_v7()), None).await,
        404,
        "not_found",
    )
    .await;
}

async fn catalog_etag_round_trip(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let id = app.product("5.00", 3).await;
    let first = app.get(&format!("/products/{id}"), None).await;
    assert_eq!(first.status(), 200);
    let etag = first.headers()["etag"].to_str().unwrap().to_string();
    assert!(first.headers()["cache-control"].to_str().unwrap().starts_with("public"));

    let cached = app
        .client
        .get(format!("{}/products/{id}", app.url))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), 304);
    assert!(cached.bytes().await.unwrap().is_empty());

    // A change to the product (here its available stock, via an order) changes the ETag.
    let (_, buyer) = app.customer().await;
    assert_eq!(
        app.place_order(&buyer, "etag", &json!({"items": [{"product_id": id, "quantity": 1}]}))
            .await
            .status(),
        202
    );
    let changed = app
        .client
        .get(format!("{}/products/{id}", app.url))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), 200);
    assert_ne!(changed.headers()["etag"].to_str().unwrap(), etag);

    let list = app.get("/products", None).await;
    let list_etag = list.headers()["etag"].to_str().unwrap().to_string();
    let list_cached = app
        .client
        .get(format!("{}/products", app.url))
        .header("if-none-match", list_etag)
        .send()
        .await
        .unwrap();
    assert_eq!(list_cached.status(), 304);
}

async fn catalog_rejects_bad_input(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let cases = [
        (json!({"price": 1, "stock_quantity": 1}), vec!["/name"]),
        (
            json!({"name": "x", "price": 1.999, "stock_quantity": 1}),
            vec!["/price"],
        ),
        (json!({"name": "x", "price": -1, "stock_quantity": 1}), vec!["/price"]),
        (
            json!({"name": "x", "price": "12.00", "stock_quantity": 1}),
            vec!["/price"],
        ),
        (
            json!({"name": "x", "price": 1, "stock_quantity": -5}),
            vec!["/stock_quantity"],
        ),
        (
            json!({"name": "", "price": 1e3, "stock_quantity": 1.5}),
            vec!["/stock_quantity"],
        ),
        (
            json!({"name": "", "sku": "has space", "stock_quantity": 1}),
            vec!["/name", "/price", "/sku"],
        ),
        (
            json!({"name": "x", "price": 1, "stock_quantity": 1, "on_hand": 5}),
            vec!["/on_hand"],
        ),
    ];
    for (body, fields) in cases {
        let problem = expect_problem(
            app.post("/products", Some(&app.admin), &body).await,
            400,
            "validation_failed",
        )
        .await;
        let mut got = error_fields(&problem);
        got.sort();
        assert_eq!(got, fields, "body {body}");
    }
    let products: Value = app.get("/products", None).await.json().await.unwrap();
    assert!(
        products["data"].as_array().unwrap().is_empty(),
        "bad input created nothing"
    );
    let id = app.product("1", 1).await;
    let empty_patch = app
        .client
        .patch(format!("{}/products/{id}", app.url))
        .bearer_auth(&app.admin)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    expect_problem(empty_patch, 400, "validation_failed").await;
    let zero = app
        .post(
            &format!("/products/{id}/stock"),
            Some(&app.admin),
            &json!({"delta": 0, "reason": "x"}),
        )
        .await;
    assert_eq!(
        error_fields(&expect_problem(zero, 400, "validation_failed").await),
        ["/delta"]
    );
}

async fn customers_create_read_and_conflict(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let created = app
        .post(
            "/customers",
            Some(&app.admin),
            &json!({"email": "Ann@Example.com", "first_name": "Ann", "last_name": "Lee"}),
        )
        .await;
    assert_eq!(created.status(), 201);
    assert_eq!(created.headers()["cache-control"], "private, no-store");
    let body: Value = created.json().await.unwrap();
    assert_eq!(body["email"], "ann@example.com");
    let ann = body["customer_id"].as_str().unwrap().to_string();

    let duplicate = app
        .post(
            "/customers",
            Some(&app.admin),
            &json!({"email": "ann@example.com", "first_name": "A", "last_name": "L"}),
        )
        .await;
    assert_eq!(
        error_fields(&expect_problem(duplicate, 409, "already_exists").await),
        ["/email"]
    );

    // A customer creates its own record: the id is its token subject.
    let bob = uuid::Uuid::now_v7().to_string();
    let bob_token = app.token(&bob);
    let own = app
        .post(
            "/customers",
            Some(&bob_token),
            &json!({"email": "bob@example.com", "first_name": "Bob", "last_name": "Ng"}),
        )
        .await;
    assert_eq!(own.status(), 201);
    assert_eq!(own.json::<Value>().await.unwrap()["customer_id"], bob.as_str());
    let again = app
        .post(
            "/customers",
            Some(&bob_token),
            &json!({"email": "bob2@example.com", "first_name": "Bob", "last_name": "Ng"}),
        )
        .await;
    expect_problem(again, 409, "already_exists").await;
    let for_other = app
        .post(
            "/customers",
            Some(&app.token(&uuid::Uuid::now_v7().to_string())),
            &json!({"customer_id": ann, "email": "x@example.com", "first_name": "X", "last_name": "Y"}),
        )
        .await;
    assert_eq!(
        error_fields(&expect_problem(for_other, 403, "forbidden").await),
        ["/customer_id"]
    );
    let not_uuid = app
        .post(
            "/customers",
            Some(&app.token("operator-joe")),
            &json!({"email": "j@example.com", "first_name": "J", "last_name": "O"}),
        )
        .await;
    expect_problem(not_uuid, 403, "forbidden").await;

    let invalid = app
        .post(
            "/customers",
            Some(&app.admin),
            &json!({"email": "nope", "first_name": "", "extra": 1}),
        )
        .await;
    assert_eq!(
        error_fields(&expect_problem(invalid, 400, "validation_failed").await),
        ["/extra"]
    );
    let invalid = app
        .post(
            "/customers",
            Some(&app.admin),
            &json!({"email": "nope", "first_name": ""}),
        )
        .await;
    let mut fields = error_fields(&expect_problem(invalid, 400, "validation_failed").await);
    fields.sort();
    assert_eq!(fields, ["/email", "/first_name", "/last_name"]);

    assert_eq!(
        app.get(&format!("/customers/{bob}"), Some(&bob_token)).await.status(),
        200
    );
    assert_eq!(
        app.get(&format!("/customers/{ann}"), Some(&app.admin)).await.status(),
        200
    );
    expect_problem(
        app.get(&format!("/customers/{ann}"), Some(&bob_token)).await,
        404,
        "not_found",
    )
    .await;
    expect_problem(app.get(&format!("/customers/{ann}"), None).await, 401, "unauthorized").await;
}

async fn customer_orders_newest_first(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let product = app.product("2.00", 100).await;
    let (customer, token) = app.customer().await;
    let mut placed = Vec::new();
    for n in 0..5 {
        let response = app
            .place_order(
                &token,
                &format!("k{n}"),
                &json!({"items": [{"product_id": product, "quantity": n + 1}]}),
            )
            .await;
        assert_eq!(response.status(), 202);
        placed.push(
            response.json::<Value>().await.unwrap()["order_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let mut listed = Vec::new();
    let mut path = format!("/customers/{customer}/orders?limit=2");
    loop {
        let page: Value = app.get(&path, Some(&token)).await.json().await.unwrap();
        listed.extend(
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["order_id"].as_str().unwrap().to_string()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/customers/{customer}/orders?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    placed.reverse();
    assert_eq!(listed, placed, "newest first, every order once");
    let (_, stranger) = app.customer().await;
    expect_problem(
        app.get(&format!("/customers/{customer}/orders"), Some(&stranger)).await,
        404,
        "not_found",
    )
    .await;
    assert_eq!(
        app.get(&format!("/customers/{customer}/orders"), Some(&app.admin))
            .await
            .status(),
        200
    );
}

async fn order_is_accepted_reserved_and_readable(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let keyboard = app.product("129.99", 10).await;
    let cable = app.product("0.10", 100).await;
    let (customer, token) = app.customer().await;
    let response = app
        .place_order(
            &token,
            "checkout-1",
            &json!({
                "items": [{"product_id": keyboard, "quantity": 2}, {"product_id": cable, "quantity": 3}],
                "payment": {"token": "tok_visa"}
            }),
        )
        .await;
    assert_eq!(response.status(), 202);
    assert!(response.headers().get("idempotent-replayed").is_none());
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let order: Value = response.json().await.unwrap();
    let order_id = order["order_id"].as_str().unwrap();
    assert_eq!(location, format!("/orders/{order_id}"));
    assert_eq!(order["status"], "pending_payment");
    assert_eq!(order["customer_id"], customer.as_str());
    assert_eq!(order["currency"], "USD");
    // Exact money: 2 × 129.99 + 3 × 0.10 = 260.28 (no float drift).
    assert_eq!(order["total_amount"].to_string(), "260.28");
    assert_eq!(order["items"][0]["unit_price"].to_string(), "129.99");
    assert_eq!(order["items"][1]["line_total"].to_string(), "0.30");
    assert!(order["created_at"].as_str().unwrap().ends_with('Z'));

    assert_eq!(app.available(&keyboard).await, 8);
    assert_eq!(app.available(&cable).await, 97);

    let read: Value = app.get(&location, Some(&token)).await.json().await.unwrap();
    assert_eq!(read["order_id"], order_id);
    assert_eq!(read["total_amount"].to_string(), "260.28");
    assert_eq!(
        read["created_at"], order["created_at"],
        "a read shows exactly what the answer showed"
    );
    let timeline = read["timeline"].as_array().unwrap();
    assert_eq!(timeline.len(), 1);
    assert_eq!(timeline[0]["kind"], "order_placed");
    assert_eq!(timeline[0]["status"], "pending_payment");

    // The first follow-up job was written with the order and waits for the pipeline.
    let jobs = app.store.jobs_for_order(order_id.parse().unwrap()).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        (jobs[0].kind.as_str(), jobs[0].state.as_str(), jobs[0].attempts),
        ("charge_payment", "ready", 0)
    );
    app.assert_audit_clean().await;
}

async fn order_validation_errors_name_the_field(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let product = app.product("1.00", 5).await;
    let other = app.product("1.00", 5).await;
    let (_, token) = app.customer().await;
    let line = |quantity: i64| json!({"product_id": product, "quantity": quantity});

    // Missing Idempotency-Key says how to fix it.
    let missing = app
        .client
        .post(format!("{}/orders", app.url))
        .bearer_auth(&token)
        .json(&json!({"items": [line(1)]}))
        .send()
        .await
        .unwrap();
    let problem = expect_problem(missing, 400, "idempotency_key_missing").await;
    assert!(problem["detail"].as_str().unwrap().contains("Idempotency-Key"));
    let long_key = "k".repeat(256);
    let problem = expect_problem(
        app.place_order(&token, &long_key, &json!({"items": [line(1)]})).await,
        400,
        "validation_failed",
    )
    .await;
    assert_eq!(error_fields(&problem), ["Idempotency-Key"]);

    let many: Vec<Value> = (0..101)
        .map(|_| json!({"product_id": uuid::Uuid::now_v7(), "quantity": 1}))
        .collect();
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (json!({}), vec!["/items"]),
        (json!({"items": []}), vec!["/items"]),
        (json!({"items": many}), vec!["/items"]),
        (json!({"items": [line(0)]}), vec!["/items/0/quantity"]),
        (json!({"items": [line(1001)]}), vec!["/items/0/quantity"]),
        (
            json!({"items": [line(1), {"product_id": other, "quantity": -1}]}),
            vec!["/items/1/quantity"],
        ),
        (
            json!({"items": [{"product_id": "nope", "quantity": 1}, {"quantity": 1}]}),
            vec!["/items/0/product_id", "/items/1/product_id"],
        ),
        (
            json!({"items": [{"product_id": product, "quantity": 1, "unit_price": 0.01}]}),
            vec!["/items/0/unit_price"],
        ),
        (json!({"items": [line(1)], "total_amount": 0}), vec!["/total_amount"]),
        (
            json!({"items": [{"product_id": product, "quantity": 1.5}]}),
            vec!["/items/0/quantity"],
        ),
        (
            json!({"items": [line(1)], "payment": {"token": ""}}),
            vec!["/payment/token"],
        ),
        (json!({"items": [line(1)], "payment": {}}), vec!["/payment/token"]),
        (
            json!({"items": [line(1)], "customer_id": "someone"}),
            vec!["/customer_id"],
        ),
        (json!({"items": "all of them"}), vec!["/items"]),
    ];
    for (n, (body, fields)) in cases.into_iter().enumerate() {
        let response = app.place_order(&token, &format!("bad-{n}"), &body).await;
        let problem = expect_problem(response, 400, "validation_failed").await;
        let mut got = error_fields(&problem);
        got.sort();
        assert_eq!(got, fields, "body {body}");
    }
    // The same product on two lines is well-formed (no schema can rule it out) but breaks a cart
    // rule: 422, naming the repeated line.
    let twice = app
        .place_order(&token, "twice", &json!({"items": [line(1), line(2)]}))
        .await;
    let problem = expect_problem(twice, 422, "duplicate_product").await;
    assert_eq!(error_fields(&problem), ["/items/1/product_id"]);

    let send_raw = |body: &'static str, content_type: &'static str| {
        app.client
            .post(format!("{}/orders", app.url))
            .bearer_auth(&token)
            .header("idempotency-key", "raw")
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    expect_problem(
        send_raw("{\"items\": [", "application/json").await.unwrap(),
        400,
        "malformed_json",
    )
    .await;
    expect_problem(
        send_raw("items=1", "application/x-www-form-urlencoded").await.unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;
    let huge = format!("{{\"items\": [], \"pad\": \"{}\"}}", "x".repeat(70 * 1024));
    let too_large = app
        .client
        .post(format!("{}/orders", app.url))
        .bearer_auth(&token)
        .header("idempotency-key", "huge")
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    expect_problem(too_large, 413, "payload_too_large").await;

    // Nothing above reserved anything or made an order.
    assert_eq!(app.available(&product).await, 5);
    assert_eq!(app.available(&other).await, 5);
    app.assert_audit_clean().await;
}

async fn order_business_rejections_reserve_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let a = app.product("1.00", 5).await;
    let b = app.product("1.00", 2).await;
    let c = app.product("1.00", 1).await;
    let (_, token) = app.customer().await;

    let ghost = uuid::Uuid::now_v7().to_string();
    let unknown = app
        .place_order(
            &token,
            "u1",
            &json!({"items": [{"product_id": a, "quantity": 1}, {"product_id": ghost, "quantity": 1}]}),
        )
        .await;
    let problem = expect_problem(unknown, 422, "unknown_product").await;
    assert_eq!(problem["product_ids"], json!([ghost]));
    assert!(problem["detail"].as_str().unwrap().contains(&ghost));

    // Two of three lines are short: both are listed with requested and available; the good
    // line is not reserved either.
    let short = app
        .place_order(
            &token,
            "s1",
            &json!({"items": [
                {"product_id": a, "quantity": 5}, {"product_id": b, "quantity": 3}, {"product_id": c, "quantity": 2}
            ]}),
        )
        .await;
    let problem = expect_problem(short, 422, "insufficient_stock").await;
    let items = problem["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0], json!({"product_id": b, "requested": 3, "available": 2}));
    assert_eq!(items[1], json!({"product_id": c, "requested": 2, "available": 1}));
    assert_eq!(app.available(&a).await, 5);
    assert_eq!(app.available(&b).await, 2);

    // An admin must name an existing customer.
    let nobody = uuid::Uuid::now_v7();
    let no_customer = app
        .place_order(
            &app.admin,
            "adm-1",
            &json!({"customer_id": nobody, "items": [{"product_id": a, "quantity": 1}]}),
        )
        .await;
    assert_eq!(
        error_fields(&expect_problem(no_customer, 422, "unknown_customer").await),
        ["/customer_id"]
    );
    let no_id = app
        .place_order(
            &app.admin,
            "adm-2",
            &json!({"items": [{"product_id": a, "quantity": 1}]}),
        )
        .await;
    assert_eq!(
        error_fields(&expect_problem(no_id, 400, "validation_failed").await),
        ["/customer_id"]
    );
    // A customer token whose customer record does not exist yet.
    let unregistered = app.token(&uuid::Uuid::now_v7().to_string());
    expect_problem(
        app.place_order(
            &unregistered,
            "u2",
            &json!({"items": [{"product_id": a, "quantity": 1}]}),
        )
        .await,
        422,
        "unknown_customer",
    )
    .await;

    assert_eq!(app.available(&a).await, 5);
    app.assert_audit_clean().await;
}

fn hs256(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

async fn auth_rules(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let product = app.product("1.00", 10).await;
    let (alice, alice_token) = app.customer().await;
    let (_, bob_token) = app.customer().await;
    let order: Value = app
        .place_order(
            &alice_token,
            "a1",
            &json!({"items": [{"product_id": product, "quantity": 1}]}),
        )
        .await
        .json()
        .await
        .unwrap();
    let order_path = format!("/orders/{}", order["order_id"].as_str().unwrap());

    // 401 with a Bearer challenge for missing, garbage, forged, expired, future and foreign tokens.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let claims = |extra: Value| {
        let mut base = json!({"sub": alice, "exp": now + 600, "iss": "orderflow", "aud": "orderflow"});
        base.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        base
    };
    let bad_tokens = [
        ("garbage", "not.a.jwt".to_string()),
        (
            "forged",
            hs256(&claims(json!({})), b"some-other-secret-some-other-secret"),
        ),
        ("expired", hs256(&claims(json!({"exp": now - 3600})), common::SECRET)),
        (
            "not yet valid",
            hs256(&claims(json!({"nbf": now + 3600})), common::SECRET),
        ),
        ("wrong issuer", hs256(&claims(json!({"iss": "evil"})), common::SECRET)),
        (
            "wrong audience",
            hs256(&claims(json!({"aud": "other"})), common::SECRET),
        ),
        ("empty subject", hs256(&claims(json!({"sub": ""})), common::SECRET)),
    ];
    let missing = app.get(&order_path, None).await;
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    expect_problem(missing, 401, "unauthorized").await;
    for (what, token) in bad_tokens {
        let response = app.get(&order_path, Some(&token)).await;
        assert!(
            response.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer"),
            "{what}"
        );
        expect_problem(response, 401, "unauthorized").await;
    }
    let no_sub = json!({"exp": now + 600, "iss": "orderflow", "aud": "orderflow"});
    expect_problem(
        app.get(&order_path, Some(&hs256(&no_sub, common::SECRET))).await,
        401,
        "unauthorized",
    )
    .await;
    let basic = app
        .client
        .get(format!("{}{order_path}", app.url))
        .header("authorization", "Basic YTpi")
        .send()
        .await
        .unwrap();
    expect_problem(basic, 401, "unauthorized").await;

    // Owners and admins see the order; another customer gets 404, not 403.
    assert_eq!(app.get(&order_path, Some(&alice_token)).await.status(), 200);
    assert_eq!(app.get(&order_path, Some(&app.admin)).await.status(), 200);
    expect_problem(app.get(&order_path, Some(&bob_token)).await, 404, "not_found").await;
    // Roles also come from Cognito groups.
    let cognito_admin = hs256(
        &claims(json!({"sub": "ops", "cognito:groups": ["admin"]})),
        common::SECRET,
    );
    assert_eq!(app.get(&order_path, Some(&cognito_admin)).await.status(), 200);

    // Admin-only routes: 401 anonymous, 403 customers.
    let new_product = json!({"name": "x", "price": 1, "stock_quantity": 1});
    expect_problem(app.post("/products", None, &new_product).await, 401, "unauthorized").await;
    expect_problem(
        app.post("/products", Some(&alice_token), &new_product).await,
        403,
        "forbidden",
    )
    .await;
    expect_problem(
        app.post(
            &format!("/products/{product}/stock"),
            Some(&alice_token),
            &json!({"delta": 1, "reason": "x"}),
        )
        .await,
        403,
        "forbidden",
    )
    .await;
    let patch = app
        .client
        .patch(format!("{}/products/{product}", app.url))
        .bearer_auth(&alice_token)
        .json(&json!({"name": "y"}))
        .send()
        .await
        .unwrap();
    expect_problem(patch, 403, "forbidden").await;
    // Customers order only for themselves; anonymous may not order.
    let for_bob = app
        .place_order(
            &alice_token,
            "a2",
            &json!({"customer_id": uuid::Uuid::now_v7(), "items": [{"product_id": product, "quantity": 1}]}),
        )
        .await;
    assert_eq!(
        error_fields(&expect_problem(for_bob, 403, "forbidden").await),
        ["/customer_id"]
    );
    let anonymous = app
        .client
        .post(format!("{}/orders", app.url))
        .header("idempotency-key", "x")
        .json(&json!({"items": []}))
        .send()
        .await
        .unwrap();
    expect_problem(anonymous, 401, "unauthorized").await;
    // Catalog reads are public.
    assert_eq!(app.get("/products", None).await.status(), 200);
    assert_eq!(app.available(&product).await, 9);
}

async fn idempotency_replay_reuse_and_scope(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let product = app.product("3.00", 10).await;
    let (_, token) = app.customer().await;
    let body = json!({"items": [{"product_id": product, "quantity": 2}]});

    let first = app.place_order(&token, "retry-me", &body).await;
    assert_eq!(first.status(), 202);
    let first_location = first.headers()["location"].clone();
    let first_body = first.text().await.unwrap();

    let replay = app.place_order(&token, "retry-me", &body).await;
    assert_eq!(replay.status(), 202);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.headers()["location"], first_location);
    assert_eq!(
        replay.text().await.unwrap(),
        first_body,
        "the replay is the first response"
    );
    assert_eq!(app.available(&product).await, 8, "a replay reserves nothing");

    let changed = app
        .place_order(
            &token,
            "retry-me",
            &json!({"items": [{"product_id": product, "quantity": 3}]}),
        )
        .await;
    expect_problem(changed, 422, "idempotency_key_reused").await;

    // Keys are scoped to the principal: another customer's identical key is a new order.
    let (_, other) = app.customer().await;
    let theirs = app.place_order(&other, "retry-me", &body).await;
    assert_eq!(theirs.status(), 202);
    assert!(theirs.headers().get("idempotent-replayed").is_none());
    assert_eq!(app.available(&product).await, 6);

    // A refused request does not consume its key: after a restock the same key succeeds.
    let big = json!({"items": [{"product_id": product, "quantity": 10}]});
    expect_problem(
        app.place_order(&token, "after-restock", &big).await,
        422,
        "insufficient_stock",
    )
    .await;
    let restock = app
        .post(
            &format!("/products/{product}/stock"),
            Some(&app.admin),
            &json!({"delta": 4, "reason": "delivery"}),
        )
        .await;
    assert_eq!(restock.status(), 200);
    assert_eq!(app.place_order(&token, "after-restock", &big).await.status(), 202);
    app.assert_audit_clean().await;
}

/// API.md: checkout keys are remembered for `--idempotency-retention`. Within it a retry replays
/// (202, `Idempotent-Replayed: true`); once the pruner has forgotten the key, the same request is a
/// new checkout (202, a new order), and the audit stays clean.
async fn idempotency_key_past_retention_places_a_new_order(backend: Backend) {
    use orderflow::workflow::idempotency::{IdempotencySettings, forget_expired};
    let app = TestApp::spawn(backend).await;
    let product = app.product("3.00", 10).await;
    let (_, token) = app.customer().await;
    let body = json!({"items": [{"product_id": product, "quantity": 1}]});
    let first = app.place_order(&token, "kept-a-day", &body).await;
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();

    let settings = IdempotencySettings::with_retention(Duration::from_secs(24 * 3600));
    let (_stop_tx, mut stop) = tokio::sync::watch::channel(false);
    let in_hours = |hours: i64| orderflow::clock::now() + chrono::Duration::hours(hours);
    let forgotten = forget_expired(app.store.as_ref(), &settings, in_hours(23), &mut stop).await;
    assert_eq!(forgotten.unwrap(), 0, "within the retention the key is kept");
    let replay = app.place_order(&token, "kept-a-day", &body).await;
    assert_eq!(replay.status(), 202);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.json::<Value>().await.unwrap()["order_id"], first["order_id"]);

    let forgotten = forget_expired(app.store.as_ref(), &settings, in_hours(25), &mut stop).await;
    assert_eq!(forgotten.unwrap(), 1);
    let late = app.place_order(&token, "kept-a-day", &body).await;
    assert_eq!(late.status(), 202);
    assert!(late.headers().get("idempotent-replayed").is_none());
    let late: Value = late.json().await.unwrap();
    assert_ne!(late["order_id"], first["order_id"], "a new order");
    assert_eq!(app.available(&product).await, 8);
    let earlier = app
        .get(
            &format!("/orders/{}", first["order_id"].as_str().unwrap()),
            Some(&app.admin),
        )
        .await;
    assert_eq!(earlier.status(), 200, "the first order is kept");
    app.assert_audit_clean().await;
}

/// Holds the product's stock (SQLite: the database write lock; PostgreSQL: the product row
/// lock) so that a placing request is provably in flight while we probe.
async fn hold_stock(app: &TestApp, product: &str) -> Box<dyn std::any::Any + Send> {
    match app.backend {
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(app.db.url()).await.unwrap();
            sqlx::query("BEGIN IMMEDIATE").execute(&mut conn).await.unwrap();
            Box::new(conn)
        }
        Backend::Postgres | Backend::Dsql => {
            let mut conn = sqlx::PgConnection::connect(app.db.url()).await.unwrap();
            sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
            sqlx::query("SELECT 1 FROM products WHERE id = $1 FOR UPDATE")
                .bind(product.parse::<uuid::Uuid>().unwrap())
                .execute(&mut conn)
                .await
                .unwrap();
            Box::new(conn)
        }
    }
}

async fn idempotency_key_in_flight_gets_409(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let product = app.product("3.00", 10).await;
    let (customer, token) = app.customer().await;
    let body = json!({"items": [{"product_id": product, "quantity": 1}]});
    let send = |timeout: Duration| {
        app.client
            .post(format!("{}/orders", app.url))
            .bearer_auth(&token)
            .header("idempotency-key", "slow")
            .timeout(timeout)
            .json(&body)
            .send()
    };

    // While the stock is held, whichever request claims the key first cannot finish; every other
    // request with the key must get 409 at once. (A probe that happens to claim the key first
    // times out on our side; the server still finishes it after the hold is released.)
    let lock = hold_stock(&app, &product).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw 409 while a request with the key was in flight"
        );
        match send(Duration::from_millis(500)).await {
            Ok(response) if response.status() == 409 => {
                expect_problem(response, 409, "idempotency_key_in_use").await;
                break;
            }
            Ok(response) => panic!("unexpected {} while the stock is held", response.status()),
            Err(error) => assert!(error.is_timeout(), "{error}"),
        }
    }
    drop(lock);

    // Once the in-flight request has finished, the key replays its order.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let replay = loop {
        let response = send(Duration::from_secs(10)).await.unwrap();
        if response.status() == 202 {
            break response;
        }
        assert_eq!(response.status(), 409);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the in-flight request never finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let orders: Value = app
        .get(&format!("/customers/{customer}/orders"), Some(&token))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(orders["data"].as_array().unwrap().len(), 1);
    assert_eq!(app.available(&product).await, 9);
}

async fn concurrent_single_unit_orders_never_oversell(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let product = app.product("10.00", 50).await;
    let mut buyers = Vec::new();
    for _ in 0..20 {
        buyers.push(app.customer().await.1);
    }
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(200));
    let tasks: Vec<_> = (0..200)
        .map(|n| {
            let (client, url, token, product, start) = (
                app.client.clone(),
                app.url.clone(),
                buyers[n % 20].clone(),
                product.clone(),
                start.clone(),
            );
            tokio::spawn(async move {
                start.wait().await;
                let response = client
                    .post(format!("{url}/orders"))
                    .bearer_auth(token)
                    .header("idempotency-key", format!("burst-{n}"))
                    .json(&json!({"items": [{"product_id": product, "quantity": 1}]}))
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                let body: Value = response.json().await.unwrap();
                (status, body["code"].as_str().map(String::from))
            })
        })
        .collect();
    let mut counts: HashMap<(u16, Option<String>), usize> = HashMap::new();
    for task in tasks {
        *counts.entry(task.await.unwrap()).or_default() += 1;
    }
    assert_eq!(counts.get(&(202, None)), Some(&50), "{counts:?}");
    assert_eq!(
        counts.get(&(422, Some("insufficient_stock".into()))),
        Some(&150),
        "{counts:?}"
    );
    assert_eq!(app.available(&product).await, 0);
    app.assert_audit_clean().await;
}

async fn concurrent_mixed_carts_no_deadlock_no_oversell(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut products = Vec::new();
    for _ in 0..5 {
        products.push(app.product("1.00", 60).await);
    }
    let (_, token) = app.customer().await;
    let carts: Vec<Vec<(String, i64)>> = {
        let mut rng = rand::rng();
        (0..100)
            .map(|_| {
                let mut chosen = products.clone();
                chosen.shuffle(&mut rng);
                let lines = rng.random_range(2..=4);
                chosen
                    .into_iter()
                    .take(lines)
                    .map(|p| (p, rng.random_range(1..=3)))
                    .collect()
            })
            .collect()
    };
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(carts.len()));
    let tasks: Vec<_> = carts
        .iter()
        .enumerate()
        .map(|(n, cart)| {
            let (client, url, token, start) = (app.client.clone(), app.url.clone(), token.clone(), start.clone());
            let items: Vec<Value> = cart
                .iter()
                .map(|(p, q)| json!({"product_id": p, "quantity": q}))
                .collect();
            tokio::spawn(async move {
                start.wait().await;
                let response = client
                    .post(format!("{url}/orders"))
                    .bearer_auth(token)
                    .header("idempotency-key", format!("mixed-{n}"))
                    .json(&json!({ "items": items }))
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                (status, response.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut sold: HashMap<String, i64> = HashMap::new();
    let mut accepted = 0;
    for (task, cart) in tasks.into_iter().zip(&carts) {
        let (status, body) = task.await.unwrap();
        match status {
            202 => {
                accepted += 1;
                for (product, quantity) in cart {
                    *sold.entry(product.clone()).or_default() += quantity;
                }
            }
            422 => assert_eq!(body["code"], "insufficient_stock", "{body}"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(accepted > 0);
    for product in &products {
        let available = app.available(product).await;
        assert!(available >= 0);
        assert_eq!(
            available,
            60 - sold.get(product).copied().unwrap_or(0),
            "stock of {product} matches accepted orders"
        );
    }
    app.assert_audit_clean().await;
}

async fn concurrent_identical_requests_make_one_order(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let product = app.product("7.00", 100).await;
    let (customer, token) = app.customer().await;
    let body = json!({"items": [{"product_id": product, "quantity": 2}]});
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (client, url, token, body, start) = (
                app.client.clone(),
                app.url.clone(),
                token.clone(),
                body.clone(),
                start.clone(),
            );
            tokio::spawn(async move {
                start.wait().await;
                let response = client
                    .post(format!("{url}/orders"))
                    .bearer_auth(token)
                    .header("idempotency-key", "same")
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                (
                    response.status().as_u16(),
                    response.headers().contains_key("idempotent-replayed"),
                    response.json::<Value>().await.unwrap(),
                )
            })
        })
        .collect();
    let mut order_ids = std::collections::HashSet::new();
    let (mut fresh, mut replayed, mut in_use) = (0, 0, 0);
    for task in tasks {
        let (status, was_replayed, body) = task.await.unwrap();
        match (status, was_replayed) {
            (202, false) => fresh += 1,
            (202, true) => replayed += 1,
            (409, _) => {
                assert_eq!(body["code"], "idempotency_key_in_use");
                in_use += 1;
                continue;
            }
            other => panic!("unexpected {other:?}: {body}"),
        }
        order_ids.insert(body["order_id"].as_str().unwrap().to_string());
    }
    assert_eq!(
        fresh, 1,
        "exactly one request created the order ({replayed} replayed, {in_use} in use)"
    );
    assert_eq!(order_ids.len(), 1);
    let orders: Value = app
        .get(&format!("/customers/{customer}/orders"), Some(&token))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(orders["data"].as_array().unwrap().len(), 1);
    assert_eq!(app.available(&product).await, 98);
    let later = app.place_order(&token, "same", &body).await;
    assert_eq!(later.headers()["idempotent-replayed"], "true");
    assert_eq!(
        later.json::<Value>().await.unwrap()["order_id"].as_str().unwrap(),
        order_ids.iter().next().unwrap()
    );
    app.assert_audit_clean().await;
}

async fn responses_carry_correlation_ids(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let echoed = app
        .client
        .get(format!("{}/products", app.url))
        .header("x-correlation-id", "trace-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-correlation-id"], "trace-abc-123");
    let invalid = app
        .client
        .get(format!("{}/products", app.url))
        .header("x-correlation-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    let generated = invalid.headers()["x-correlation-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(generated).is_ok());
    let not_found = app.get("/no/such/route", None).await;
    assert!(not_found.headers().contains_key("x-correlation-id"));
    expect_problem(not_found, 404, "not_found").await;
    let wrong_method = app.client.delete(format!("{}/products", app.url)).send().await.unwrap();
    expect_problem(wrong_method, 405, "method_not_allowed").await;
    let ready: Value = app.get("/health/ready", None).await.json().await.unwrap();
    assert_eq!(ready["status"], "ok");
    assert_eq!(app.get("/health/live", None).await.status(), 200);

    // An order keeps the id of the request that placed it: reading it back names the key to its
    // story, and a retry under another id is still the first request's order.
    let product = app.product("5.00", 10).await;
    let (_, token) = app.customer().await;
    let place = |correlation_id: &'static str| {
        app.client
            .post(format!("{}/orders", app.url))
            .bearer_auth(&token)
            .header("idempotency-key", "correlated")
            .header("x-correlation-id", correlation_id)
            .json(&json!({ "items": [{ "product_id": product, "quantity": 1 }] }))
            .send()
    };
    let placed: Value = place("checkout-42").await.unwrap().json().await.unwrap();
    assert_eq!(placed["correlation_id"], "checkout-42");
    let retried = place("checkout-42-retry").await.unwrap();
    assert_eq!(retried.headers()["x-correlation-id"], "checkout-42-retry");
    assert_eq!(retried.json::<Value>().await.unwrap()["correlation_id"], "checkout-42");
    let order_path = format!("/orders/{}", placed["order_id"].as_str().unwrap());
    let read: Value = app.get(&order_path, Some(&token)).await.json().await.unwrap();
    assert_eq!(read["correlation_id"], "checkout-42");
}
