//! The shipping address of POST /orders (API.md "Payments, fulfilment, refunds"): validated field
//! by field, part of the order everywhere it is shown (the 202, GET, replays, listings, every
//! event's `data.order`) and of the idempotency fingerprint; on every backend.

mod common;

use common::{Backend, TestApp, error_fields, expect_problem};
use orderflow::domain::shipping::{ADDRESS_LINE_MAX, CITY_MAX, POSTAL_CODE_MAX, RECIPIENT_MAX, REGION_MAX};
use orderflow::store::events::EventQuery;
use serde_json::{Value, json};

on_every_backend!(
    an_address_round_trips_through_every_view_and_event,
    every_bad_field_is_refused_by_name_and_nothing_is_written,
    another_address_under_the_same_key_is_key_reuse,
    an_order_without_an_address_shows_none,
);

/// A complete address as a client sends it (with white space to trim).
fn address() -> Value {
    json!({
        "name": "  Jane Doe ",
        "line1": "1 Main St",
        "line2": "Apt 4B",
        "city": "Springfield",
        "region": "IL",
        "postal_code": " 62701 ",
        "country": "US",
    })
}

/// The same address as the order shows it.
fn shown() -> Value {
    json!({
        "name": "Jane Doe",
        "line1": "1 Main St",
        "line2": "Apt 4B",
        "city": "Springfield",
        "region": "IL",
        "postal_code": "62701",
        "country": "US",
    })
}

fn with(changes: Value) -> Value {
    let mut address = address();
    for (field, value) in changes.as_object().unwrap() {
        address[field] = value.clone();
    }
    address
}

fn without(field: &str) -> Value {
    let mut address = address();
    address.as_object_mut().unwrap().remove(field);
    address
}

async fn json_of(response: reqwest::Response) -> Value {
    response.json().await.expect("a JSON body")
}

/// Every positioned event of `order`, oldest first.
async fn events_of(app: &TestApp, order: &str) -> Vec<Value> {
    app.store
        .events()
        .stamp_events(1000, orderflow::clock::now())
        .await
        .unwrap();
    let stored = app
        .store
        .events()
        .events_after(&EventQuery {
            after: 0,
            limit: 1000,
            types: None,
        })
        .await
        .unwrap();
    stored
        .into_iter()
        .filter(|event| event.subject == format!("orders/{order}"))
        .map(|event| serde_json::from_slice(&event.to_json("orderflow")).unwrap())
        .collect()
}

async fn admin_orders(app: &TestApp) -> Vec<Value> {
    let list = json_of(app.get("/admin/orders", Some(&app.admin)).await).await;
    list["data"].as_array().unwrap().clone()
}

async fn an_address_round_trips_through_every_view_and_event(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let product = app.product("12.50", 10).await;
    let (customer, token) = app.customer().await;
    let body = json!({"items": [{"product_id": product, "quantity": 2}], "shipping": address()});

    let first = app.place_order(&token, "ship-1", &body).await;
    assert_eq!(first.status(), 202);
    let first_body = first.text().await.unwrap();
    let placed: Value = serde_json::from_str(&first_body).unwrap();
    assert_eq!(placed["shipping"], shown(), "trimmed, line2 and region kept");
    let order_id = placed["order_id"].as_str().unwrap().to_string();

    // A replay is the first answer, byte for byte, address included.
    let replay = app.place_order(&token, "ship-1", &body).await;
    assert_eq!(replay.status(), 202);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.text().await.unwrap(), first_body);
    assert_eq!(app.available(&product).await, 8, "one order, one reservation");

    let read = json_of(app.get(&format!("/orders/{order_id}"), Some(&token)).await).await;
    assert_eq!(read["shipping"], shown());
    let listed = admin_orders(&app).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["order_id"], order_id.as_str());
    assert_eq!(listed[0]["shipping"], shown());
    let own = json_of(app.get(&format!("/customers/{customer}/orders"), Some(&token)).await).await;
    assert_eq!(own["data"][0]["shipping"], shown());

    let events = events_of(&app, &order_id).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "order.placed");
    assert_eq!(events[0]["data"]["order"]["shipping"], shown());
    assert_eq!(
        events[0]["data"]["order"]["order_id"], placed["order_id"],
        "the event's order is the answer's order"
    );

    // Every later fact's snapshot carries it too.
    app.drain().await;
    let events = events_of(&app, &order_id).await;
    assert!(events.len() > 1, "the pipeline emitted more events");
    for event in &events {
        assert_eq!(event["data"]["order"]["shipping"], shown(), "{}", event["type"]);
    }

    // Absent optional members are shown as null; null is the same as leaving them out.
    let mut sparse = without("line2");
    sparse["region"] = Value::Null;
    let sparse_body = json!({"items": [{"product_id": product, "quantity": 1}], "shipping": sparse});
    let placed = json_of(app.place_order(&token, "ship-2", &sparse_body).await).await;
    let mut expected = shown();
    expected["line2"] = Value::Null;
    expected["region"] = Value::Null;
    assert_eq!(placed["shipping"], expected);
    let read = json_of(
        app.get(
            &format!("/orders/{}", placed["order_id"].as_str().unwrap()),
            Some(&token),
        )
        .await,
    )
    .await;
    assert_eq!(read["shipping"], expected);

    // The largest published lengths are accepted.
    let longest = with(json!({
        "name": "é".repeat(RECIPIENT_MAX),
        "line1": "l".repeat(ADDRESS_LINE_MAX),
        "line2": "m".repeat(ADDRESS_LINE_MAX),
        "city": "c".repeat(CITY_MAX),
        "region": "r".repeat(REGION_MAX),
        "postal_code": "9".repeat(POSTAL_CODE_MAX),
        "country": "ZW",
    }));
    let at_max = app
        .place_order(
            &token,
            "ship-3",
            &json!({"items": [{"product_id": product, "quantity": 1}], "shipping": longest}),
        )
        .await;
    assert_eq!(at_max.status(), 202, "{}", at_max.text().await.unwrap());
    app.assert_audit_clean().await;
}

async fn every_bad_field_is_refused_by_name_and_nothing_is_written(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let product = app.product("1.00", 5).await;
    let (_, token) = app.customer().await;
    let item = json!([{"product_id": product, "quantity": 1}]);

    let cases: Vec<(Value, Vec<&str>)> = vec![
        // Required members, missing or null.
        (
            json!({}),
            vec![
                "/shipping/city",
                "/shipping/country",
                "/shipping/line1",
                "/shipping/name",
                "/shipping/postal_code",
            ],
        ),
        (without("name"), vec!["/shipping/name"]),
        (without("line1"), vec!["/shipping/line1"]),
        (without("city"), vec!["/shipping/city"]),
        (without("postal_code"), vec!["/shipping/postal_code"]),
        (without("country"), vec!["/shipping/country"]),
        (with(json!({"name": null})), vec!["/shipping/name"]),
        // Text: not blank, one line, no control characters, within its length.
        (with(json!({"name": ""})), vec!["/shipping/name"]),
        (with(json!({"name": "   "})), vec!["/shipping/name"]),
        (
            with(json!({"name": "é".repeat(RECIPIENT_MAX + 1)})),
            vec!["/shipping/name"],
        ),
        (with(json!({"name": "Jane\nDoe"})), vec!["/shipping/name"]),
        (with(json!({"line1": "1 Main\tSt"})), vec!["/shipping/line1"]),
        (with(json!({"line1": "1 Main St\u{7}"})), vec!["/shipping/line1"]),
        (
            with(json!({"line1": "x".repeat(ADDRESS_LINE_MAX + 1)})),
            vec!["/shipping/line1"],
        ),
        (with(json!({"line2": ""})), vec!["/shipping/line2"]),
        (
            with(json!({"line2": "x".repeat(ADDRESS_LINE_MAX + 1)})),
            vec!["/shipping/line2"],
        ),
        (with(json!({"line2": "Apt\r4B"})), vec!["/shipping/line2"]),
        (with(json!({"city": " "})), vec!["/shipping/city"]),
        (with(json!({"city": "x".repeat(CITY_MAX + 1)})), vec!["/shipping/city"]),
        (with(json!({"region": ""})), vec!["/shipping/region"]),
        (
            with(json!({"region": "x".repeat(REGION_MAX + 1)})),
            vec!["/shipping/region"],
        ),
        (with(json!({"region": "I\u{0}L"})), vec!["/shipping/region"]),
        // Postal codes: 1–16 letters, digits, spaces and hyphens.
        (with(json!({"postal_code": ""})), vec!["/shipping/postal_code"]),
        (with(json!({"postal_code": "  "})), vec!["/shipping/postal_code"]),
        (with(json!({"postal_code": "--"})), vec!["/shipping/postal_code"]),
        (
            with(json!({"postal_code": "1".repeat(POSTAL_CODE_MAX + 1)})),
            vec!["/shipping/postal_code"],
        ),
        (with(json!({"postal_code": "627_01"})), vec!["/shipping/postal_code"]),
        (with(json!({"postal_code": "62701é"})), vec!["/shipping/postal_code"]),
        // Countries: an assigned ISO 3166-1 alpha-2 code, upper case.
        (with(json!({"country": "us"})), vec!["/shipping/country"]),
        (with(json!({"country": "USA"})), vec!["/shipping/country"]),
        (with(json!({"country": ""})), vec!["/shipping/country"]),
        (with(json!({"country": " US"})), vec!["/shipping/country"]),
        (with(json!({"country": "ZZ"})), vec!["/shipping/country"]),
        (with(json!({"country": "UK"})), vec!["/shipping/country"]),
        (with(json!({"country": "EU"})), vec!["/shipping/country"]),
        // Unknown members and wrong types.
        (with(json!({"phone": "555-0100"})), vec!["/shipping/phone"]),
        (with(json!({"name": 5})), vec!["/shipping/name"]),
        (with(json!({"country": ["US"]})), vec!["/shipping/country"]),
        (json!("1 Main St, Springfield"), vec!["/shipping"]),
        // Every bad field at once.
        (
            json!({
                "name": "",
                "line1": "x".repeat(ADDRESS_LINE_MAX + 1),
                "line2": "a\nb",
                "city": "",
                "region": "\u{1b}[31m",
                "postal_code": "!",
                "country": "xx",
            }),
            vec![
                "/shipping/city",
                "/shipping/country",
                "/shipping/line1",
                "/shipping/line2",
                "/shipping/name",
                "/shipping/postal_code",
                "/shipping/region",
            ],
        ),
    ];
    for (n, (shipping, fields)) in cases.into_iter().enumerate() {
        let body = json!({"items": item, "shipping": shipping});
        let problem = expect_problem(
            app.place_order(&token, &format!("bad-{n}"), &body).await,
            400,
            "validation_failed",
        )
        .await;
        let mut got = error_fields(&problem);
        got.sort();
        assert_eq!(got, fields, "shipping {shipping}");
    }
    // Reported together with the other fields' errors.
    let mixed = app
        .place_order(
            &token,
            "mixed",
            &json!({"items": [{"product_id": product, "quantity": 0}], "shipping": with(json!({"country": "XX"}))}),
        )
        .await;
    let problem = expect_problem(mixed, 400, "validation_failed").await;
    assert_eq!(error_fields(&problem), ["/items/0/quantity", "/shipping/country"]);
    let message = &problem["errors"][1]["message"];
    assert!(message.as_str().unwrap().contains("ISO 3166-1"), "{message}");

    // Nothing was written: no order, nothing reserved, and a refused key is still free.
    assert!(admin_orders(&app).await.is_empty());
    assert_eq!(app.available(&product).await, 5);
    app.assert_audit_clean().await;
    let fixed = app
        .place_order(&token, "bad-0", &json!({"items": item, "shipping": address()}))
        .await;
    assert_eq!(fixed.status(), 202);
    assert_eq!(app.available(&product).await, 4);
}

async fn another_address_under_the_same_key_is_key_reuse(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let product = app.product("2.00", 10).await;
    let (_, token) = app.customer().await;
    let order = |shipping: Value| json!({"items": [{"product_id": product, "quantity": 1}], "shipping": shipping});

    assert_eq!(app.place_order(&token, "key", &order(address())).await.status(), 202);
    for other in [
        with(json!({"line1": "2 Main St"})),
        with(json!({"line2": null})),
        with(json!({"country": "CA"})),
        Value::Null,
    ] {
        expect_problem(
            app.place_order(&token, "key", &order(other)).await,
            422,
            "idempotency_key_reused",
        )
        .await;
    }
    // The address as stored (trimmed) is what counts: the same address spelled with other white
    // space is the same request.
    let respaced = with(json!({"name": "Jane Doe", "postal_code": "62701"}));
    let replay = app.place_order(&token, "key", &order(respaced)).await;
    assert_eq!(replay.status(), 202);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");

    // And the other way round: a key first used without an address.
    let plain = json!({"items": [{"product_id": product, "quantity": 1}]});
    assert_eq!(app.place_order(&token, "plain", &plain).await.status(), 202);
    expect_problem(
        app.place_order(&token, "plain", &order(address())).await,
        422,
        "idempotency_key_reused",
    )
    .await;
    assert_eq!(app.available(&product).await, 8);
}

async fn an_order_without_an_address_shows_none(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let product = app.product("3.00", 10).await;
    let (_, token) = app.customer().await;
    let body = json!({"items": [{"product_id": product, "quantity": 1}]});

    let first = app.place_order(&token, "none", &body).await;
    assert_eq!(first.status(), 202);
    let first_body = first.text().await.unwrap();
    let placed: Value = serde_json::from_str(&first_body).unwrap();
    assert!(placed.get("shipping").is_none(), "{placed}");
    let order_id = placed["order_id"].as_str().unwrap().to_string();

    // `"shipping": null` is the same request as leaving it out: a replay.
    let null = json!({"items": [{"product_id": product, "quantity": 1}], "shipping": null});
    let replay = app.place_order(&token, "none", &null).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.text().await.unwrap(), first_body);

    let read = json_of(app.get(&format!("/orders/{order_id}"), Some(&token)).await).await;
    assert!(read.get("shipping").is_none(), "{read}");
    assert_eq!(read["status"], "pending_payment");
    let listed = admin_orders(&app).await;
    assert!(listed[0].get("shipping").is_none());
    let events = events_of(&app, &order_id).await;
    assert_eq!(events.len(), 1);
    assert!(events[0]["data"]["order"].get("shipping").is_none());

    // The pipeline runs for it as for any order, and its later facts show none either.
    app.drain().await;
    let read = json_of(app.get(&format!("/orders/{order_id}"), Some(&token)).await).await;
    assert_ne!(read["status"], "pending_payment");
    assert!(read.get("shipping").is_none());
    let events = events_of(&app, &order_id).await;
    assert!(events.len() > 1);
    assert!(
        events
            .iter()
            .all(|event| event["data"]["order"].get("shipping").is_none())
    );
    app.assert_audit_clean().await;
}
