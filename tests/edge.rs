//! The front door over real HTTP: rate limits (429 + Retry-After + RateLimit-*), overload
//! shedding (503 quickly, healthy afterwards), handler timeouts, catalog caching and
//! compression, CORS preflights, and the headers every response carries.

mod common;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Backend, TestApp, connect_options, expect_problem};
use orderflow::http::edge::{CorsSettings, Edge, EdgeSettings, Rate, RateLimits};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn per_minute(count: u32) -> Option<Rate> {
    Some(Rate {
        count: NonZeroU32::new(count).unwrap(),
        period: Duration::from_secs(60),
    })
}

fn edge(settings: EdgeSettings) -> Arc<Edge> {
    Arc::new(Edge::new(settings))
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_past_the_limit_gets_429_and_other_principals_are_unaffected() {
    let app = TestApp::spawn_with(Backend::Sqlite, |state| {
        state.edge = edge(EdgeSettings {
            rate_limits: RateLimits {
                reads: per_minute(5),
                ..RateLimits::off()
            },
            ..Default::default()
        })
    })
    .await;
    let (alice, alice_token) = app.customer().await;
    let (bob, bob_token) = app.customer().await;

    for remaining in (0..5).rev() {
        let response = app.get(&format!("/customers/{alice}"), Some(&alice_token)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header(&response, "ratelimit-limit"), Some("5"));
        assert_eq!(
            header(&response, "ratelimit-remaining"),
            Some(remaining.to_string().as_str())
        );
        assert_eq!(header(&response, "ratelimit-policy"), Some("5;w=60"));
    }
    let refused = app.get(&format!("/customers/{alice}"), Some(&alice_token)).await;
    assert_eq!(header(&refused, "ratelimit-remaining"), Some("0"));
    let retry_after: u64 = header(&refused, "retry-after").expect("Retry-After").parse().unwrap();
    assert!(
        (1..=12).contains(&retry_after),
        "one request frees up every 12 s, got {retry_after}"
    );
    assert!(header(&refused, "x-correlation-id").is_some());
    let problem = expect_problem(refused, 429, "rate_limited").await;
    assert!(problem["detail"].as_str().unwrap().contains("reads"), "{problem}");

    // Bob has his own budget; Alice's other classes are not touched.
    let response = app.get(&format!("/customers/{bob}"), Some(&bob_token)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "ratelimit-remaining"), Some("4"));
    let response = app.get("/products", Some(&alice_token)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "ratelimit-limit"),
        None,
        "catalog reads are unlimited here"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anonymous_clients_are_limited_by_ip_and_tokens_do_not_escape_it() {
    let app = TestApp::spawn_with(Backend::Sqlite, |state| {
        state.edge = edge(EdgeSettings {
            rate_limits: RateLimits {
                catalog: per_minute(3),
                ..RateLimits::off()
            },
            trusted_proxy_hops: 1,
            ..Default::default()
        })
    })
    .await;
    let get = |forwarded_for: &'static str, token: Option<&'static str>| {
        let mut request = app
            .client
            .get(format!("{}/products", app.url))
            .header("x-forwarded-for", forwarded_for);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    for _ in 0..3 {
        assert_eq!(get("203.0.113.7", None).await.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(
        get("203.0.113.7", None).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // A made-up token does not buy a fresh budget: it is not a principal, so the IP counts.
    assert_eq!(
        get("203.0.113.7", Some("garbage.token.here")).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another client behind the same proxy is unaffected.
    assert_eq!(get("198.51.100.9", None).await.unwrap().status(), StatusCode::OK);
    // With one trusted hop, only the last X-Forwarded-For entry counts: a client cannot prepend
    // addresses to escape its budget.
    assert_eq!(
        get("192.0.2.1, 203.0.113.7", None).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Health probes are never limited.
    for _ in 0..5 {
        let response = app.get("/health/live", None).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
}

/// An order for `customer` of one lamp, placed through the API.
async fn place_one(app: &TestApp, token: &str, product: &str, key: &str) -> reqwest::Response {
    app.place_order(
        token,
        key,
        &json!({ "items": [{ "product_id": product, "quantity": 1 }] }),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_in_flight_bound_requests_get_503_at_once_and_the_service_recovers() {
    let app = TestApp::spawn_with(Backend::Sqlite, |state| {
        state.edge = edge(EdgeSettings {
            rate_limits: RateLimits::off(),
            max_in_flight: 3,
            ..Default::default()
        })
    })
    .await;
    let product = app.product("10.00", 10).await;
    let (_, token) = app.customer().await;
    let order: Value = place_one(&app, &token, &product, "k1").await.json().await.unwrap();
    let order_path = format!("/orders/{}", order["order_id"].as_str().unwrap());

    // Six slow requests at once: long-polls for a change that will not come (no workers run).
    // Three take the permits and hold them for 3 s; the other three must be shed at once.
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..6 {
        let request = app
            .client
            .get(format!("{}{order_path}", app.url))
            .bearer_auth(&token)
            .header("prefer", "wait=3");
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let response = request.send().await.unwrap();
            let _ = done_tx.send((started.elapsed(), response));
        });
    }
    for _ in 0..3 {
        let (took, response) = done.recv().await.unwrap();
        assert!(
            took < Duration::from_millis(500),
            "shedding must be quick, took {took:?}"
        );
        assert_eq!(header(&response, "retry-after"), Some("1"));
        expect_problem(response, 503, "overloaded").await;
    }
    // The permits are still held: other API requests are shed too, but liveness and readiness
    // answer (an orchestrator must not restart a busy, healthy process).
    let started = Instant::now();
    expect_problem(app.get("/products", None).await, 503, "overloaded").await;
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(app.get("/health/live", None).await.status(), StatusCode::OK);
    assert_eq!(app.get("/health/ready", None).await.status(), StatusCode::OK);

    // The held requests finish normally, and the service takes work again.
    for _ in 0..3 {
        let (took, response) = done.recv().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(took >= Duration::from_secs(2), "a long-poll answered early: {took:?}");
    }
    assert_eq!(app.get("/products", None).await.status(), StatusCode::OK);
    assert_eq!(app.get(&order_path, Some(&token)).await.status(), StatusCode::OK);
}

/// A tiny connection pool held by requests blocked on a row lock: the others get 503 within the
/// acquire timeout (never a pile-up); a handler that runs past its limit gets 503 `timed_out`
/// while its checkout still commits, and a retry with the same key returns that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_pool_exhausted_clients_get_503_quickly_and_the_service_stays_healthy() {
    let mut options = connect_options();
    options.max_connections = 1;
    options.acquire_timeout = Duration::from_millis(200);
    let app = TestApp::spawn_with_pool(Backend::Postgres, options, |state| {
        state.edge = edge(EdgeSettings {
            rate_limits: RateLimits::off(),
            handler_timeout: Duration::from_millis(700),
            ..Default::default()
        })
    })
    .await;
    let product = app.product("10.00", 100).await;
    let (_, token) = app.customer().await;

    // Another session locks the product row, as a long-running transaction would.
    use sqlx::Connection;
    let mut locker = sqlx::PgConnection::connect(app.db.url()).await.unwrap();
    let mut lock = locker.begin().await.unwrap();
    let product_id = uuid::Uuid::parse_str(&product).unwrap();
    sqlx::query("SELECT 1 FROM products WHERE id = $1 FOR UPDATE")
        .bind(product_id)
        .execute(&mut *lock)
        .await
        .unwrap();

    // The first checkout takes the only connection and waits on the lock.
    let first = {
        let client = app.client.clone();
        let url = format!("{}/orders", app.url);
        let token = token.clone();
        let body = json!({ "items": [{ "product_id": product, "quantity": 1 }] });
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .header("idempotency-key", "blocked")
                .json(&body)
                .send()
                .await
                .unwrap()
        })
    };
    // Everyone else is refused within the acquire timeout, not queued behind it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let started = Instant::now();
        let response = app.get(&format!("/products/{product}"), None).await;
        let took = started.elapsed();
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            assert!(took < Duration::from_secs(2), "503 must come quickly, took {took:?}");
            assert_eq!(header(&response, "retry-after"), Some("1"));
            expect_problem(response, 503, "service_unavailable").await;
            break;
        }
        assert!(Instant::now() < deadline, "the pool was never exhausted");
    }
    let placed_meanwhile = place_one(&app, &token, &product, "meanwhile").await;
    assert_eq!(placed_meanwhile.status(), StatusCode::SERVICE_UNAVAILABLE);

    // The blocked checkout's handler gives up at its time limit …
    let first = first.await.unwrap();
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    expect_problem(first, 503, "timed_out").await;
    // … but the checkout itself commits once the lock is gone.
    lock.rollback().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let replay = loop {
        let response = place_one(&app, &token, &product, "blocked").await;
        match response.status() {
            StatusCode::ACCEPTED => break response,
            StatusCode::CONFLICT | StatusCode::SERVICE_UNAVAILABLE if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("unexpected {other}: {}", response.text().await.unwrap()),
        }
    };
    assert_eq!(header(&replay, "idempotent-replayed"), Some("true"));
    // A refused request did not use up its key, and the service is healthy again.
    assert_eq!(
        place_one(&app, &token, &product, "meanwhile").await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(app.get("/health/ready", None).await.status(), StatusCode::OK);
    assert_eq!(app.available(&product).await, 98);
    app.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catalog_reads_are_cacheable_with_strong_etags_and_compressed_on_request() {
    let app = TestApp::spawn_with(Backend::Sqlite, |state| {
        state.edge = edge(EdgeSettings {
            catalog_cache_control: "public, max-age=60, stale-while-revalidate=120".into(),
            ..Default::default()
        })
    })
    .await;
    let product = app.product("10.00", 10).await;
    let path = format!("{}/products/{product}", app.url);

    let first = app.client.get(&path).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(
        header(&first, "cache-control"),
        Some("public, max-age=60, stale-while-revalidate=120")
    );
    let etag = header(&first, "etag").unwrap().to_string();
    assert!(etag.starts_with('"') && !etag.starts_with("W/"), "strong ETag: {etag}");

    let revalidated = app
        .client
        .get(&path)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(revalidated.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(header(&revalidated, "etag"), Some(etag.as_str()));
    assert!(revalidated.bytes().await.unwrap().is_empty());

    // A change to the product changes its ETag, so the old one no longer matches.
    let patched = app
        .client
        .patch(&path)
        .bearer_auth(&app.admin)
        .json(&json!({ "price": 12.5 }))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), StatusCode::OK);
    assert_eq!(
        header(&patched, "cache-control"),
        Some("no-store"),
        "writes are never cacheable"
    );
    let changed = app
        .client
        .get(&path)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), StatusCode::OK);
    assert_ne!(header(&changed, "etag"), Some(etag.as_str()));

    // Compression is negotiated; the compressed representation has its own validator.
    for _ in 0..30 {
        app.product("1.00", 1).await;
    }
    let list = format!("{}/products?limit=50", app.url);
    let plain = app.client.get(&list).send().await.unwrap();
    assert_eq!(header(&plain, "content-encoding"), None);
    let plain_etag = header(&plain, "etag").unwrap().to_string();
    let plain_body = plain.bytes().await.unwrap();
    for (encoding, magic) in [("gzip", &[0x1f_u8, 0x8b][..]), ("br", &[][..])] {
        let compressed = app
            .client
            .get(&list)
            .header("accept-encoding", encoding)
            .send()
            .await
            .unwrap();
        assert_eq!(header(&compressed, "content-encoding"), Some(encoding));
        let vary = header(&compressed, "vary").unwrap_or_default().to_ascii_lowercase();
        assert!(vary.contains("accept-encoding"), "Vary: {vary}");
        let tagged = header(&compressed, "etag").unwrap().to_string();
        assert_eq!(tagged, format!("{}-{encoding}\"", plain_etag.trim_end_matches('"')));
        let body = compressed.bytes().await.unwrap();
        assert!(body.starts_with(magic) && body.len() < plain_body.len() / 2);
        let again = app
            .client
            .get(&list)
            .header("accept-encoding", encoding)
            .header("if-none-match", &tagged)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(header(&again, "etag"), Some(tagged.as_str()));
    }
    let gzip = app
        .client
        .get(&list)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    let mut decoded = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(&gzip.bytes().await.unwrap()[..]),
        &mut decoded,
    )
    .unwrap();
    assert_eq!(decoded, plain_body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn personal_and_error_responses_are_never_cacheable_and_carry_security_headers() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (customer, token) = app.customer().await;
    for (path, token, status) in [
        (format!("/customers/{customer}"), Some(token.as_str()), 200),
        (format!("/customers/{customer}"), None, 401),
        ("/no/such/route".to_string(), None, 404),
        ("/products".to_string(), None, 200),
    ] {
        let response = app.get(&path, token).await;
        assert_eq!(response.status().as_u16(), status, "{path}");
        for (name, value) in [
            ("x-content-type-options", "nosniff"),
            ("x-frame-options", "DENY"),
            ("referrer-policy", "no-referrer"),
            ("content-security-policy", "default-src 'none'; frame-ancestors 'none'"),
            ("strict-transport-security", "max-age=63072000; includeSubDomains"),
        ] {
            assert_eq!(header(&response, name), Some(value), "{name} on {path}");
        }
        let cache = header(&response, "cache-control").unwrap();
        if path == "/products" {
            assert!(cache.starts_with("public"), "{cache}");
        } else {
            assert!(cache.contains("no-store"), "{path}: {cache}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cors_preflights_are_answered_for_allowed_origins_only() {
    let app = TestApp::spawn_with(Backend::Sqlite, |state| {
        state.edge = edge(EdgeSettings {
            cors: CorsSettings {
                allowed_origins: vec!["https://shop.example".into()],
                max_age: Duration::from_secs(900),
                ..CorsSettings::default()
            },
            ..Default::default()
        })
    })
    .await;
    let preflight = |origin: &'static str, method: &'static str| {
        app.client
            .request(reqwest::Method::OPTIONS, format!("{}/orders", app.url))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header(
                "access-control-request-headers",
                "authorization, content-type, idempotency-key",
            )
            .send()
    };
    let allowed = preflight("https://shop.example", "POST").await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_eq!(
        header(&allowed, "access-control-allow-origin"),
        Some("https://shop.example")
    );
    let methods = header(&allowed, "access-control-allow-methods")
        .unwrap()
        .to_ascii_uppercase();
    assert!(methods.contains("POST") && !methods.contains("DELETE"), "{methods}");
    let headers = header(&allowed, "access-control-allow-headers")
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        headers.contains("idempotency-key") && headers.contains("authorization"),
        "{headers}"
    );
    assert_eq!(header(&allowed, "access-control-max-age"), Some("900"));
    assert!(
        header(&allowed, "vary")
            .unwrap_or_default()
            .to_ascii_lowercase()
            .contains("origin"),
        "preflight answers vary by origin"
    );

    // Another origin gets no grant: the browser refuses to send the request.
    let refused = preflight("https://evil.example", "POST").await.unwrap();
    assert_eq!(header(&refused, "access-control-allow-origin"), None);

    // An actual cross-origin read gets the grant and the headers a client may read.
    let read = app
        .client
        .get(format!("{}/products", app.url))
        .header("origin", "https://shop.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&read, "access-control-allow-origin"),
        Some("https://shop.example")
    );
    let exposed = header(&read, "access-control-expose-headers")
        .unwrap()
        .to_ascii_lowercase();
    for name in [
        "etag",
        "location",
        "x-correlation-id",
        "retry-after",
        "ratelimit-remaining",
    ] {
        assert!(exposed.contains(name), "{name} not exposed: {exposed}");
    }
    let other = app
        .client
        .get(format!("{}/products", app.url))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&other, "access-control-allow-origin"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_configured_origins_no_cors_grant_is_ever_sent() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let response = app
        .client
        .request(reqwest::Method::OPTIONS, format!("{}/products", app.url))
        .header("origin", "https://shop.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&response, "access-control-allow-origin"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_body_sent_too_slowly_gets_408_and_changes_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_with(Backend::Sqlite, |state| {
        state.edge = edge(EdgeSettings {
            rate_limits: RateLimits::off(),
            body_timeout: Duration::from_millis(300),
            ..Default::default()
        })
    })
    .await;
    let address = app.url.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let body = r#"{"name":"Slow","price":1.00,"stock_quantity":1}"#;
    let head = format!(
        "POST /products HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        app.admin,
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body.as_bytes()[..10]).await.unwrap(); // … and the rest never comes
    let started = Instant::now();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer))
        .await
        .expect("an answer, not a hang")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json") && answer.contains("\"code\":\"body_timeout\""));
    let products: Value = app.get("/products?limit=200", None).await.json().await.unwrap();
    assert!(products["data"].as_array().unwrap().iter().all(|p| p["name"] != "Slow"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_trickling_headers_is_disconnected_at_the_header_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_with(Backend::Sqlite, |state| {
        state.edge = edge(EdgeSettings {
            header_timeout: Duration::from_millis(300),
            ..Default::default()
        })
    })
    .await;
    let address = app.url.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    stream
        .write_all(b"GET /products HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap(); // … never finished
    let started = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection instead of waiting forever")
        .ok();
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    // The server still serves everyone else.
    assert_eq!(app.get("/products", None).await.status(), StatusCode::OK);
}
