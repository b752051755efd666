//! The published API description: `/openapi.json` is OpenAPI 3.1 and covers every route the
//! service answers, with the errors each can give; its limits are the ones the validators
//! enforce (checked both against the constants and at the boundaries over HTTP); `/docs` is a
//! self-contained HTML rendering; bad path and query parameters get 400 naming the parameter.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Backend, TestApp, error_fields, expect_problem};
use orderflow::domain::customer::{EMAIL_MAX, PERSON_NAME_MAX};
use orderflow::domain::fulfilment::{CARRIER_MAX, RefundReason, TRACKING_NUMBER_MAX, TRACKING_URL_MAX};
use orderflow::domain::order::{MAX_LINES, MAX_QUANTITY, PAYMENT_TOKEN_MAX};
use orderflow::domain::product::{CATEGORY_MAX, DESCRIPTION_MAX, NAME_MAX, REASON_MAX, SKU_MAX, STOCK_MAX};
use orderflow::domain::shipping::{
    ADDRESS_LINE_MAX, CITY_MAX, COUNTRY_CODES, POSTAL_CODE_MAX, POSTAL_CODE_PATTERN, RECIPIENT_MAX, REGION_MAX,
};
use orderflow::http::openapi::{
    CURSOR_LEN, ENABLED_EVENTS_MAX, ENABLED_EVENTS_MIN, FEED_LIMIT_DEFAULT, FEED_LIMIT_MAX, FEED_LIMIT_MIN,
    IDEMPOTENCY_KEY_MAX, LIMIT_DEFAULT, LIMIT_MAX, LIMIT_MIN, WEBHOOK_DESCRIPTION_MAX, WEBHOOK_URL_MAX,
};
use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

on_both_backends!(
    bad_query_parameters_are_400_naming_the_parameter,
    bad_path_parameters_are_400_naming_the_parameter,
    published_limits_are_the_enforced_limits,
);

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

async fn document(app: &TestApp) -> Value {
    let response = app.get("/openapi.json", None).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    response.json().await.expect("the document is JSON")
}

/// Every (method, path template) the document lists.
fn documented_operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut operations = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(method).is_some() {
                operations.insert((method.to_string(), path.clone()));
            }
        }
    }
    operations
}

/// Follows a local `$ref`.
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => doc
            .pointer(reference.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling $ref {reference}")),
        None => value,
    }
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["components"]["schemas"]
        .get(name)
        .unwrap_or_else(|| panic!("no component schema {name}"))
}

fn parameter<'a>(doc: &'a Value, method: &str, path: &str, name: &str) -> &'a Value {
    doc["paths"][path][method]["parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{method} {path} does not document the parameter {name}"))
}

#[tokio::test]
async fn the_document_is_openapi_3_1_with_security_and_the_problem_schema() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let doc = document(&app).await;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "{}",
        doc["openapi"]
    );
    assert_eq!(doc["info"]["title"], "orderflow");
    let bearer = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(bearer["type"], "http");
    assert_eq!(bearer["scheme"], "bearer");
    assert_eq!(bearer["bearerFormat"], "JWT");

    let problem = schema(&doc, "Problem");
    for member in ["type", "title", "status", "detail", "code", "errors"] {
        assert!(problem["properties"].get(member).is_some(), "Problem lacks {member}");
    }
    let required: BTreeSet<&str> = problem["required"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(required, BTreeSet::from(["type", "title", "status", "detail", "code"]));
    let field_error = resolve(&doc, &problem["properties"]["errors"]["items"]);
    assert!(field_error["properties"].get("field").is_some() && field_error["properties"].get("message").is_some());

    // The same document is available without a server, for tools.
    let offline = orderflow::http::openapi::document(orderflow::domain::Currency::USD);
    assert_eq!(documented_operations(&offline), documented_operations(&doc));
}

/// A route added without documentation fails here twice over: the sources may only register
/// routes through `routes!` (which documents them), and every documented path answers exactly
/// the documented methods (405 for the others).
#[tokio::test]
async fn every_route_served_is_documented_and_every_documented_route_is_served() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let doc = document(&app).await;
    let documented = documented_operations(&doc);

    // Every path template the handlers are annotated with is in the document.
    let sources = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/src/http")).expect("src/http");
    let mut annotated = BTreeSet::new();
    for entry in sources {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let source = std::fs::read_to_string(&path).unwrap();
        for bypass in [".route(\"", ".route_service(\"", ".nest(\"", ".nest_service(\""] {
            assert!(
                !source.contains(bypass),
                "{} registers a route with `{bypass}…`, which leaves it out of the OpenAPI document; \
                 annotate the handler with #[utoipa::path] and register it with routes!",
                path.display()
            );
        }
        for (at, _) in source.match_indices("#[utoipa::path(") {
            let block = &source[at..];
            let path_at = block.find("path = \"").expect("an annotated handler names its path") + 8;
            let end = block[path_at..].find('"').unwrap();
            annotated.insert(block[path_at..path_at + end].to_string());
        }
    }
    let paths: BTreeSet<String> = documented.iter().map(|(_, p)| p.clone()).collect();
    assert_eq!(annotated, paths, "annotated handler paths and documented paths differ");
    for expected in [
        "/openapi.json",
        "/docs",
        "/health/live",
        "/products/{id}/stock",
        "/admin/jobs/{id}/replay",
    ] {
        assert!(paths.contains(expected), "{expected} is not documented");
    }

    // Every documented path answers exactly its documented methods.
    for path in &paths {
        let concrete = path.replace("{id}", &Uuid::now_v7().to_string());
        for method in METHODS {
            let response = app
                .client
                .request(
                    Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                    format!("{}{concrete}", app.url),
                )
                .bearer_auth(&app.admin)
                .header("idempotency-key", Uuid::now_v7().to_string())
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            let is_documented = documented.contains(&(method.to_string(), path.clone()));
            if is_documented {
                assert_ne!(status, 405, "{method} {path} is documented but not served");
                assert!(
                    !(status == 404 && body["detail"] == "no such route"),
                    "{method} {path} is documented but not routed"
                );
            } else {
                assert_eq!(status, 405, "{method} {path} is served ({status}) but not documented");
            }
        }
    }
    // And a path that is not documented is not served.
    assert_eq!(app.get("/undocumented", None).await.status(), 404);
}

#[tokio::test]
async fn every_operation_documents_its_errors_and_headers() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let doc = document(&app).await;
    let declared_tags: BTreeSet<&str> = doc["tags"]
        .as_array()
        .expect("the document declares its tags")
        .iter()
        .filter_map(|tag| tag["name"].as_str())
        .collect();
    for tag in ["catalog", "customers", "orders", "fulfilment", "admin", "stripe"] {
        assert!(declared_tags.contains(tag), "the tag {tag} is not declared");
    }
    for (method, path) in documented_operations(&doc) {
        let operation = &doc["paths"][&path][&method];
        let name = format!("{method} {path}");
        assert!(
            operation["summary"].as_str().is_some_and(|s| !s.is_empty()),
            "{name} has no summary"
        );
        assert!(
            operation["tags"].as_array().is_some_and(|t| !t.is_empty()),
            "{name} has no tag"
        );
        for tag in operation["tags"].as_array().unwrap() {
            assert!(
                declared_tags.contains(tag.as_str().unwrap_or_default()),
                "{name} has the tag {tag}, which the document does not declare"
            );
        }
        let responses: BTreeMap<&str, &Value> = operation["responses"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(status, response)| (status.as_str(), resolve(&doc, response)))
            .collect();
        assert!(
            responses.keys().any(|s| s.starts_with('2')),
            "{name} has no success response"
        );
        let secured = operation["security"]
            .as_array()
            .is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
        let has_body = operation.get("requestBody").is_some();
        let has_params = operation["parameters"].as_array().is_some_and(|p| !p.is_empty());
        let mut expected = vec!["429", "503"];
        if secured {
            expected.push("401");
        }
        if has_body || has_params {
            expected.push("400");
        }
        if has_body {
            expected.extend(["413", "415"]);
        }
        if path.contains("{id}") {
            expected.push("404");
        }
        for status in expected {
            assert!(responses.contains_key(status), "{name} does not document {status}");
        }
        for (status, response) in &responses {
            assert!(
                response["headers"].get("X-Correlation-Id").is_some(),
                "{name} {status} does not document X-Correlation-Id"
            );
            if status.starts_with('4') || status.starts_with('5') {
                let problem = &response["content"]["application/problem+json"]["schema"]["$ref"];
                assert_eq!(
                    problem, "#/components/schemas/Problem",
                    "{name} {status} is not a problem"
                );
            }
            if *status == "429" || *status == "503" {
                assert!(
                    response["headers"].get("Retry-After").is_some(),
                    "{name} {status} lacks Retry-After"
                );
            }
            if *status == "401" {
                assert!(
                    response["headers"].get("WWW-Authenticate").is_some(),
                    "{name} 401 lacks WWW-Authenticate"
                );
            }
        }
    }

    // Route-specific headers.
    let place = &doc["paths"]["/orders"]["post"];
    let key = parameter(&doc, "post", "/orders", "Idempotency-Key");
    assert_eq!(
        (key["in"].as_str(), key["required"].as_bool()),
        (Some("header"), Some(true))
    );
    assert_eq!(key["schema"]["minLength"], 1);
    assert_eq!(key["schema"]["maxLength"], IDEMPOTENCY_KEY_MAX);
    let accepted = &place["responses"]["202"]["headers"];
    assert!(accepted.get("Location").is_some() && accepted.get("Idempotent-Replayed").is_some());
    for status in ["403", "409", "422"] {
        assert!(place["responses"].get(status).is_some(), "POST /orders lacks {status}");
    }
    assert_eq!(parameter(&doc, "get", "/orders/{id}", "Prefer")["in"], "header");
    assert_eq!(parameter(&doc, "get", "/products", "If-None-Match")["in"], "header");
    assert!(
        doc["paths"]["/products"]["get"]["responses"]["200"]["headers"]
            .get("ETag")
            .is_some()
    );
    assert!(doc["paths"]["/products"]["get"]["responses"].get("304").is_some());
    assert!(
        doc["paths"]["/products"]["post"]["responses"]["201"]["headers"]
            .get("Location")
            .is_some()
    );
    for path in ["/products", "/products/{id}", "/health/live", "/openapi.json", "/docs"] {
        assert!(
            doc["paths"][path]["get"].get("security").is_none(),
            "{path} should be public"
        );
    }
    for (method, path) in [
        ("post", "/products"),
        ("get", "/admin/queues"),
        ("post", "/orders"),
        ("post", "/orders/{id}/shipments"),
        ("post", "/orders/{id}/refunds"),
    ] {
        assert!(
            doc["paths"][path][method].get("security").is_some(),
            "{method} {path} should need a token"
        );
    }

    // After the sale: a warehouse retries after a timeout and a refund must never be given twice,
    // so both take a required Idempotency-Key and say when an answer is a replay.
    for (path, operation_id, created) in [
        ("/orders/{id}/shipments", "recordShipment", "201"),
        ("/orders/{id}/refunds", "refundOrder", "202"),
    ] {
        let operation = &doc["paths"][path]["post"];
        assert_eq!(operation["operationId"], operation_id);
        assert_eq!(operation["tags"], json!(["fulfilment"]), "{path}");
        let key = parameter(&doc, "post", path, "Idempotency-Key");
        assert_eq!(
            (key["in"].as_str(), key["required"].as_bool()),
            (Some("header"), Some(true)),
            "{path}"
        );
        assert!(
            operation["responses"][created]["headers"]
                .get("Idempotent-Replayed")
                .is_some(),
            "{path} {created} lacks Idempotent-Replayed"
        );
        for status in ["403", "404", "409", "422"] {
            assert!(operation["responses"].get(status).is_some(), "{path} lacks {status}");
        }
    }
    // Stripe's events carry a signature, not a bearer token; without a secret the route is off.
    let stripe = &doc["paths"]["/webhooks/stripe"]["post"];
    assert!(stripe.get("security").is_none(), "Stripe cannot send a bearer token");
    assert_eq!(stripe["tags"], json!(["stripe"]));
    for status in ["200", "400", "404"] {
        assert!(
            stripe["responses"].get(status).is_some(),
            "POST /webhooks/stripe lacks {status}"
        );
    }
}

/// The document states the same limits the validators enforce: both come from one constant.
#[tokio::test]
async fn limits_in_the_schema_are_the_constants_the_validators_use() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let doc = document(&app).await;
    let create = schema(&doc, "CreateProduct");
    let field = |name: &str| &create["properties"][name];
    assert_eq!(field("name")["maxLength"], NAME_MAX);
    assert_eq!(field("name")["minLength"], 1);
    assert_eq!(field("description")["maxLength"], DESCRIPTION_MAX);
    assert_eq!(field("category")["maxLength"], CATEGORY_MAX);
    assert_eq!(field("sku")["maxLength"], SKU_MAX);
    assert_eq!(field("stock_quantity")["minimum"], 0);
    assert_eq!(field("stock_quantity")["maximum"], STOCK_MAX);
    assert_eq!(create["additionalProperties"], false);
    let required: BTreeSet<&str> = create["required"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(required, BTreeSet::from(["name", "price", "stock_quantity"]));

    let money = schema(&doc, "Money");
    assert_eq!(money["type"], "number");
    assert_eq!(money["multipleOf"], 0.01);
    assert_eq!(money["minimum"], 0);

    let adjust = schema(&doc, "AdjustStock");
    assert_eq!(adjust["properties"]["reason"]["maxLength"], REASON_MAX);
    let ranges = adjust["properties"]["delta"]["anyOf"]
        .as_array()
        .expect("delta is two ranges around zero");
    assert_eq!(
        (&ranges[0]["minimum"], &ranges[0]["maximum"]),
        (&json!(-STOCK_MAX), &json!(-1))
    );
    assert_eq!(
        (&ranges[1]["minimum"], &ranges[1]["maximum"]),
        (&json!(1), &json!(STOCK_MAX))
    );

    let customer = schema(&doc, "CreateCustomer");
    assert_eq!(customer["properties"]["email"]["maxLength"], EMAIL_MAX);
    assert_eq!(customer["properties"]["email"]["format"], "email");
    assert_eq!(customer["properties"]["first_name"]["maxLength"], PERSON_NAME_MAX);

    let order = schema(&doc, "PlaceOrder");
    let items = &order["properties"]["items"];
    assert_eq!((&items["minItems"], &items["maxItems"]), (&json!(1), &json!(MAX_LINES)));
    let quantity = resolve(&doc, &items["items"]["properties"]["quantity"]);
    assert_eq!(
        (&quantity["minimum"], &quantity["maximum"]),
        (&json!(1), &json!(MAX_QUANTITY))
    );
    let payment = resolve(&doc, &order["properties"]["payment"]["oneOf"][1]);
    assert_eq!(payment["properties"]["token"]["maxLength"], PAYMENT_TOKEN_MAX);
    assert_eq!(items["items"]["properties"]["product_id"]["format"], "uuid");
    let shipping = resolve(&doc, &order["properties"]["shipping"]["oneOf"][1]);
    assert_eq!(shipping["additionalProperties"], false);
    let required: BTreeSet<&str> = shipping["required"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        required,
        BTreeSet::from(["name", "line1", "city", "postal_code", "country"])
    );
    for (member, max) in [
        ("name", RECIPIENT_MAX),
        ("line1", ADDRESS_LINE_MAX),
        ("line2", ADDRESS_LINE_MAX),
        ("city", CITY_MAX),
        ("region", REGION_MAX),
        ("postal_code", POSTAL_CODE_MAX),
    ] {
        let field = &shipping["properties"][member];
        assert_eq!(
            (&field["minLength"], &field["maxLength"]),
            (&json!(1), &json!(max)),
            "{member}"
        );
    }
    assert_eq!(shipping["properties"]["postal_code"]["pattern"], POSTAL_CODE_PATTERN);
    let country = resolve(&doc, &shipping["properties"]["country"]);
    assert_eq!(country["enum"], json!(COUNTRY_CODES.as_slice()));
    // The order shows the address it was given, with the same country codes.
    let shown = resolve(&doc, &schema(&doc, "Order")["properties"]["shipping"]);
    assert_eq!(resolve(&doc, &shown["properties"]["country"]), country);

    let limit = &parameter(&doc, "get", "/products", "limit")["schema"];
    assert_eq!(
        (&limit["minimum"], &limit["maximum"], &limit["default"]),
        (&json!(LIMIT_MIN), &json!(LIMIT_MAX), &json!(LIMIT_DEFAULT))
    );
    let cursor = &parameter(&doc, "get", "/admin/jobs", "cursor")["schema"];
    assert_eq!(
        (&cursor["minLength"], &cursor["maxLength"]),
        (&json!(CURSOR_LEN), &json!(CURSOR_LEN))
    );
    let state = &parameter(&doc, "get", "/admin/jobs", "state")["schema"];
    assert_eq!(state["enum"], json!(["ready", "running", "succeeded", "dead"]));
    let kind = &parameter(&doc, "post", "/admin/jobs/replay", "kind")["schema"];
    assert_eq!(kind["enum"], json!(orderflow::workflow::ALL_STEPS));
    let status = schema(&doc, "OrderStatus");
    assert_eq!(
        status["enum"],
        json!(["pending_payment", "paid", "fulfilled", "cancelled", "refunded"])
    );

    let shipment = schema(&doc, "RecordShipment");
    assert_eq!(shipment["additionalProperties"], false);
    assert_eq!(shipment["required"], json!(["carrier", "tracking_number"]));
    assert_eq!(shipment["properties"]["carrier"]["maxLength"], CARRIER_MAX);
    assert_eq!(
        shipment["properties"]["tracking_number"]["maxLength"],
        TRACKING_NUMBER_MAX
    );
    assert_eq!(shipment["properties"]["tracking_url"]["maxLength"], TRACKING_URL_MAX);
    // An empty list is refused ("leave it out to mean every unit"); the schema says so.
    assert_eq!(shipment["properties"]["items"]["minItems"], 1);
    let item = resolve(&doc, &shipment["properties"]["items"]["items"]);
    assert_eq!(item["required"], json!(["product_id", "quantity"]));
    let quantity = resolve(&doc, &item["properties"]["quantity"]);
    assert_eq!(
        (&quantity["minimum"], &quantity["maximum"]),
        (&json!(1), &json!(MAX_QUANTITY))
    );
    let refund = schema(&doc, "RequestRefund");
    assert_eq!(refund["additionalProperties"], false);
    assert_eq!(refund["required"], json!(["reason"]));
    let reason = resolve(&doc, &refund["properties"]["reason"]);
    assert_eq!(reason["enum"], json!(RefundReason::ALL.map(RefundReason::as_str)));
    assert_eq!(refund["properties"]["restock"]["minItems"], 1);
    // A money amount, and more than nothing.
    let amount = &refund["properties"]["amount"]["allOf"];
    assert_eq!(resolve(&doc, &amount[0])["type"], "number", "a money amount: {amount}");
    assert_eq!(amount[1], json!({ "exclusiveMinimum": 0 }));
    let refund_view = schema(&doc, "Refund");
    assert_eq!(resolve(&doc, &refund_view["properties"]["reason"]), reason);
    for member in ["shipments", "refunds"] {
        assert!(
            schema(&doc, "Order")["properties"].get(member).is_some(),
            "the order view lacks {member}"
        );
    }

    let endpoint = schema(&doc, "CreateWebhookEndpoint");
    assert_eq!(endpoint["properties"]["url"]["maxLength"], WEBHOOK_URL_MAX);
    assert_eq!(
        endpoint["properties"]["description"]["maxLength"],
        WEBHOOK_DESCRIPTION_MAX
    );
    let events = &endpoint["properties"]["enabled_events"];
    assert_eq!(
        (&events["minItems"], &events["maxItems"]),
        (&json!(ENABLED_EVENTS_MIN), &json!(ENABLED_EVENTS_MAX))
    );
    assert_eq!(events["default"], json!(["*"]));
    let patterns = events["items"]["enum"].as_array().unwrap();
    for pattern in ["*", "order.*", "order.paid", "webhook_endpoint.disabled"] {
        assert!(patterns.contains(&json!(pattern)), "{pattern}");
    }
    assert_eq!(endpoint["additionalProperties"], false);
    assert_eq!(schema(&doc, "UpdateWebhookEndpoint")["minProperties"], 1);
    let feed_limit = &parameter(&doc, "get", "/events", "limit")["schema"];
    assert_eq!(
        (&feed_limit["minimum"], &feed_limit["maximum"], &feed_limit["default"]),
        (
            &json!(FEED_LIMIT_MIN),
            &json!(FEED_LIMIT_MAX),
            &json!(FEED_LIMIT_DEFAULT)
        )
    );
    assert_eq!(
        parameter(&doc, "get", "/events", "type")["schema"]["enum"].as_array(),
        Some(patterns)
    );
    assert_eq!(parameter(&doc, "get", "/events", "Prefer")["in"], "header");
    let replay = schema(&doc, "ReplayWebhookDeliveries");
    let ranges = replay["oneOf"].as_array().expect("a time range or a position range");
    assert_eq!(ranges[0]["required"], json!(["since", "until"]));
    assert_eq!(ranges[1]["required"], json!(["from_position", "to_position"]));
}

/// The limits the document publishes hold over HTTP at their boundaries: the largest allowed
/// value is accepted, one past it is refused naming the field.
async fn published_limits_are_the_enforced_limits(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let doc = document(&app).await;
    let create = schema(&doc, "CreateProduct");
    let name_max = create["properties"]["name"]["maxLength"].as_u64().unwrap() as usize;
    let stock_max = create["properties"]["stock_quantity"]["maximum"].as_i64().unwrap();
    let product = |name: String, stock: i64| json!({ "name": name, "price": 1.5, "stock_quantity": stock });
    let created = app
        .post("/products", Some(&app.admin), &product("é".repeat(name_max), stock_max))
        .await;
    assert_eq!(created.status(), 201, "{}", created.text().await.unwrap());
    let too_long = app
        .post("/products", Some(&app.admin), &product("é".repeat(name_max + 1), 1))
        .await;
    assert_eq!(
        error_fields(&expect_problem(too_long, 400, "validation_failed").await),
        ["/name"]
    );
    let too_many = app
        .post("/products", Some(&app.admin), &product("x".into(), stock_max + 1))
        .await;
    assert_eq!(
        error_fields(&expect_problem(too_many, 400, "validation_failed").await),
        ["/stock_quantity"]
    );
    // JSON Schema's integers include 2.0; so does the API.
    assert_eq!(
        app.post("/products", Some(&app.admin), &product("x".into(), 2))
            .await
            .status(),
        201
    );
    let whole = app
        .client
        .post(format!("{}/products", app.url))
        .bearer_auth(&app.admin)
        .header("content-type", "application/json")
        .body(r#"{"name":"x","price":1.5,"stock_quantity":2.0}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(whole.status(), 201);

    let order = schema(&doc, "PlaceOrder");
    let max_lines = order["properties"]["items"]["maxItems"].as_u64().unwrap() as usize;
    let quantity = schema(&doc, "Quantity");
    let max_quantity = quantity["maximum"].as_i64().unwrap();
    let (customer, token) = app.customer().await;
    let product_id = app.product("1.00", max_quantity + 10).await;
    let at_max = app
        .place_order(
            &token,
            "max-quantity",
            &json!({ "items": [{ "product_id": product_id, "quantity": max_quantity }] }),
        )
        .await;
    assert_eq!(at_max.status(), 202, "{}", at_max.text().await.unwrap());
    let over = app
        .place_order(
            &token,
            "over-quantity",
            &json!({ "items": [{ "product_id": product_id, "quantity": max_quantity + 1 }] }),
        )
        .await;
    assert_eq!(
        error_fields(&expect_problem(over, 400, "validation_failed").await),
        ["/items/0/quantity"]
    );
    let lines: Vec<Value> = (0..=max_lines)
        .map(|_| json!({ "product_id": Uuid::now_v7(), "quantity": 1 }))
        .collect();
    let too_many_lines = app
        .place_order(&token, "too-many-lines", &json!({ "items": lines }))
        .await;
    assert_eq!(
        error_fields(&expect_problem(too_many_lines, 400, "validation_failed").await),
        ["/items"]
    );
    let twice = app
        .place_order(
            &token,
            "twice",
            &json!({ "customer_id": customer, "items": [
                { "product_id": product_id, "quantity": 1 }, { "product_id": product_id, "quantity": 2 }
            ] }),
        )
        .await;
    assert_eq!(
        error_fields(&expect_problem(twice, 422, "duplicate_product").await),
        ["/items/1/product_id"]
    );

    let limit = &parameter(&doc, "get", "/products", "limit")["schema"];
    let max = limit["maximum"].as_u64().unwrap();
    assert_eq!(app.get(&format!("/products?limit={max}"), None).await.status(), 200);
    let over = app.get(&format!("/products?limit={}", max + 1), None).await;
    assert_eq!(
        error_fields(&expect_problem(over, 400, "validation_failed").await),
        ["query.limit"]
    );
    // A shipment's fields are checked before the order is looked up: at the limit the request
    // gets as far as the (unknown) order, one past it is refused naming the field.
    let shipment = schema(&doc, "RecordShipment");
    for field in ["carrier", "tracking_number"] {
        let max = shipment["properties"][field]["maxLength"].as_u64().unwrap() as usize;
        let path = format!("/orders/{}/shipments", Uuid::now_v7());
        let send = |value: String| {
            let mut body = json!({ "carrier": "DHL", "tracking_number": "T1" });
            body[field] = json!(value);
            app.client
                .post(format!("{}{path}", app.url))
                .bearer_auth(&app.admin)
                .header("idempotency-key", Uuid::now_v7().to_string())
                .json(&body)
                .send()
        };
        let at_max = send("é".repeat(max)).await.unwrap();
        expect_problem(at_max, 404, "not_found").await;
        let over = send("é".repeat(max + 1)).await.unwrap();
        assert_eq!(
            error_fields(&expect_problem(over, 400, "validation_failed").await),
            [format!("/{field}")]
        );
    }

    let key = app
        .place_order(&token, &"k".repeat(IDEMPOTENCY_KEY_MAX + 1), &json!({ "items": [] }))
        .await;
    assert_eq!(
        error_fields(&expect_problem(key, 400, "validation_failed").await),
        ["Idempotency-Key"]
    );
}

async fn bad_query_parameters_are_400_naming_the_parameter(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (customer, token) = app.customer().await;
    let cases: Vec<(String, bool, &str)> = vec![
        ("/products?limit=0".into(), false, "query.limit"),
        ("/products?limit=201".into(), false, "query.limit"),
        ("/products?limit=ten".into(), false, "query.limit"),
        ("/products?limit=1.5".into(), false, "query.limit"),
        ("/products?limit=".into(), false, "query.limit"),
        ("/products?cursor=not-a-cursor".into(), false, "query.cursor"),
        // A UUID in another spelling is not a cursor this API hands out.
        (format!("/products?cursor={}", Uuid::now_v7()), false, "query.cursor"),
        ("/products?category=".into(), false, "query.category"),
        (
            format!("/products?category={}", "c".repeat(CATEGORY_MAX + 1)),
            false,
            "query.category",
        ),
        ("/products?colour=red".into(), false, "query.colour"),
        ("/products?limit=5&limit=6".into(), false, "query.limit"),
        (format!("/customers/{customer}/orders?limit=0"), true, "query.limit"),
        (format!("/customers/{customer}/orders?cursor=zz"), true, "query.cursor"),
        ("/admin/jobs?state=zombie".into(), true, "query.state"),
        ("/admin/jobs?kind=teleport".into(), true, "query.kind"),
        ("/admin/jobs?limit=-1".into(), true, "query.limit"),
        ("/admin/webhook-endpoints?limit=0".into(), true, "query.limit"),
        ("/admin/webhook-endpoints?cursor=zz".into(), true, "query.cursor"),
        (
            format!("/admin/webhook-endpoints/{}/deliveries?state=lost", Uuid::now_v7()),
            true,
            "query.state",
        ),
        ("/events?after=-1".into(), true, "query.after"),
        ("/events?limit=1001".into(), true, "query.limit"),
        ("/events?type=order.teleported".into(), true, "query.type"),
        ("/events?colour=red".into(), true, "query.colour"),
    ];
    for (path, authenticated, field) in cases {
        let token = if path.starts_with("/admin") || path.starts_with("/events") {
            Some(app.admin.as_str())
        } else {
            authenticated.then_some(token.as_str())
        };
        let problem = expect_problem(app.get(&path, token).await, 400, "validation_failed").await;
        assert_eq!(error_fields(&problem), [field], "GET {path}: {problem}");
    }
    let replay = app
        .client
        .post(format!("{}/admin/jobs/replay?kind=teleport", app.url))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_fields(&expect_problem(replay, 400, "validation_failed").await),
        ["query.kind"]
    );

    // In range, and a whole number spelled with a fraction, are fine.
    for path in [
        "/products?limit=1",
        "/products?limit=200",
        "/products?limit=2.0",
        "/admin/jobs?state=dead&kind=charge_payment",
    ] {
        let response = app.get(path, Some(&app.admin)).await;
        assert_eq!(response.status(), 200, "GET {path}");
    }
    // A cursor this API handed out is accepted.
    let page: Value = app.get("/products?limit=1", None).await.json().await.unwrap();
    if let Some(cursor) = page["next_cursor"].as_str() {
        assert_eq!(app.get(&format!("/products?cursor={cursor}"), None).await.status(), 200);
    }
}

async fn bad_path_parameters_are_400_naming_the_parameter(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (_, token) = app.customer().await;
    let admin = app.admin.as_str();
    let none = json!(null);
    let rename = json!({ "name": "x" });
    let restock = json!({ "delta": 1, "reason": "count" });
    let describe = json!({ "description": "x" });
    let positions = json!({ "from_position": 1, "to_position": 2 });
    let ship = json!({ "carrier": "DHL", "tracking_number": "T1" });
    let refund = json!({ "reason": "other" });
    for (method, path, token, body) in [
        ("GET", "/products/not-a-uuid", None, &none),
        ("PATCH", "/products/123", Some(admin), &rename),
        ("POST", "/products/x/stock", Some(admin), &restock),
        ("GET", "/customers/nope", Some(token.as_str()), &none),
        ("GET", "/customers/nope/orders", Some(token.as_str()), &none),
        (
            "GET",
            "/orders/12345678-1234-1234-1234-12345678901",
            Some(token.as_str()),
            &none,
        ),
        ("POST", "/orders/x/cancel", Some(token.as_str()), &none),
        ("POST", "/orders/x/shipments", Some(admin), &ship),
        ("POST", "/orders/x/refunds", Some(admin), &refund),
        ("POST", "/admin/jobs/x/replay", Some(admin), &none),
        ("GET", "/admin/webhook-endpoints/x", Some(admin), &none),
        ("PATCH", "/admin/webhook-endpoints/x", Some(admin), &describe),
        ("DELETE", "/admin/webhook-endpoints/x", Some(admin), &none),
        ("POST", "/admin/webhook-endpoints/x/rotate-secret", Some(admin), &none),
        ("GET", "/admin/webhook-endpoints/x/deliveries", Some(admin), &none),
        ("POST", "/admin/webhook-endpoints/x/replay", Some(admin), &positions),
    ] {
        // Routes that require an Idempotency-Key get one, so the id is the only thing wrong.
        let mut request = app
            .client
            .request(
                Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}{path}", app.url),
            )
            .header("idempotency-key", Uuid::now_v7().to_string());
        if !body.is_null() {
            request = request.json(body);
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let problem = expect_problem(request.send().await.unwrap(), 400, "validation_failed").await;
        assert_eq!(error_fields(&problem), ["path.id"], "{method} {path}: {problem}");
    }
}

#[tokio::test]
async fn docs_page_is_self_contained_html_naming_every_operation() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let doc = document(&app).await;
    let response = app.get("/docs", None).await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/html"));
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(!csp.contains("script-src"), "{csp}");
    let html = response.text().await.unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    for forbidden in ["http://", "https://", "<script", "<link", " src=", "@import", "url("] {
        assert!(!html.contains(forbidden), "/docs contains {forbidden:?}");
    }
    for (method, path) in documented_operations(&doc) {
        let operation = &doc["paths"][&path][&method];
        assert!(html.contains(&path), "/docs does not name {path}");
        assert!(
            html.contains(&format!("id=\"op-{method}")),
            "/docs has no anchor for {method} operations"
        );
        assert!(
            html.contains(operation["summary"].as_str().unwrap()),
            "/docs lacks the summary of {method} {path}"
        );
    }
    // Limits and schemas are shown, not just names.
    assert!(html.contains(&format!("1–{LIMIT_MAX}")), "the limit range is not shown");
    assert!(html.contains("id=\"schema-Problem\""));
    assert!(html.contains("Idempotency-Key"));
    assert!(html.contains("Requires a bearer token"));
}
