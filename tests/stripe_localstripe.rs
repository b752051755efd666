//! The Stripe client (`adapters::payment::stripe`) against a real localstripe — the PaymentIntent
//! lifecycle (authorize with manual capture, capture, partial refund, void, automatic capture,
//! listing), read back both through the client and straight from localstripe's own state — plus,
//! against a recording server, the exact wire format (headers, form bodies, paging) and how
//! answers and transport failures are classified. localstripe ignores idempotency keys, so I4 is
//! shown against the sandbox, not here.

#[path = "support/localstripe.rs"]
mod localstripe;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use localstripe::Localstripe;
use orderflow::adapters::payment::PaymentError;
use orderflow::adapters::payment::intents::{
    AuthorizeRequest, CaptureMethod, CaptureRequest, IntentStatus, PaymentProvider, RefundRequest, VoidRequest,
};
use orderflow::adapters::payment::stripe::{STRIPE_VERSION, StripeClient, StripeSettings};
use serde_json::{Value, json};

fn client(base: &str, key: &str) -> StripeClient {
    StripeClient::new(StripeSettings {
        api_base: base.to_string(),
        secret_key: key.to_string(),
        timeout: Duration::from_secs(10),
    })
    .expect("Stripe client")
}

fn authorize(order: &str, method: &str, capture: CaptureMethod, amount: i64) -> AuthorizeRequest {
    AuthorizeRequest {
        idempotency_key: format!("orderflow-authorize-{order}"),
        amount_minor: amount,
        currency: "EUR".into(),
        payment_method: method.into(),
        capture,
        order_id: order.into(),
        correlation_id: Some(format!("corr-{order}")),
    }
}

fn capture(intent: &str, amount: i64) -> CaptureRequest {
    CaptureRequest {
        idempotency_key: format!("orderflow-capture-{intent}"),
        intent_id: intent.into(),
        amount_minor: amount,
        correlation_id: None,
    }
}

fn void(intent: &str) -> VoidRequest {
    VoidRequest {
        idempotency_key: format!("orderflow-void-{intent}"),
        intent_id: intent.into(),
        correlation_id: None,
    }
}

fn refund(intent: &str, amount: i64, reason: Option<&str>) -> RefundRequest {
    RefundRequest {
        idempotency_key: format!("orderflow-refund-{intent}-{amount}"),
        intent_id: intent.into(),
        amount_minor: amount,
        reason: reason.map(str::to_string),
        correlation_id: Some("corr-refund".into()),
    }
}

// ---------------------------------------------------------------------------------------------
// Against localstripe.

#[tokio::test]
async fn manual_capture_then_partial_refund() {
    let ls = Localstripe::start().await;
    let stripe = client(&ls.base_url(), localstripe::SECRET_KEY);

    let intent = stripe
        .authorize(&authorize("order-1", "pm_card_visa", CaptureMethod::Manual, 4200))
        .await
        .expect("authorize");
    assert_eq!(intent.status, IntentStatus::RequiresCapture, "{intent:?}");
    assert!(intent.id.starts_with("pi_"), "{intent:?}");
    assert_eq!(intent.amount_minor, 4200);
    assert_eq!(intent.amount_captured_minor, 0);
    assert_eq!(intent.order_id.as_deref(), Some("order-1"));
    assert_eq!(intent.client_secret, None);
    assert_eq!(stripe.retrieve(&intent.id).await.expect("retrieve"), intent);

    // localstripe's own state, bypassing the client.
    let raw = ls.get(&format!("/v1/payment_intents/{}", intent.id)).await;
    assert_eq!(raw["status"], "requires_capture", "{raw}");
    assert_eq!(raw["amount"], 4200);
    assert_eq!(raw["currency"], "eur");
    assert_eq!(raw["capture_method"], "manual");
    assert_eq!(raw["metadata"]["order_id"], "order-1");
    assert_eq!(raw["metadata"]["correlation_id"], "corr-order-1");
    assert_eq!(raw["latest_charge"]["captured"], false);

    let captured = stripe.capture(&capture(&intent.id, 4200)).await.expect("capture");
    assert_eq!(captured.id, intent.id);
    assert_eq!(captured.status, IntentStatus::Succeeded);
    assert_eq!(captured.amount_captured_minor, 4200);
    let raw = ls.get(&format!("/v1/payment_intents/{}", intent.id)).await;
    assert_eq!(raw["status"], "succeeded", "{raw}");
    assert_eq!(raw["latest_charge"]["captured"], true);
    assert_eq!(raw["latest_charge"]["amount"], 4200);
    let read = stripe.retrieve(&intent.id).await.expect("retrieve");
    assert_eq!(
        (read.status, read.amount_captured_minor),
        (IntentStatus::Succeeded, 4200)
    );

    // localstripe refuses a refund `reason` (400 "Unexpected reason"); real Stripe takes it.
    let refunded = stripe.refund(&refund(&intent.id, 1500, None)).await.expect("refund");
    assert!(refunded.id.starts_with("re_"), "{refunded:?}");
    assert_eq!(refunded.amount_minor, 1500);
    assert_eq!(refunded.status, "succeeded");
    let refunds = ls.get(&format!("/v1/refunds?payment_intent={}", intent.id)).await;
    let refunds = refunds["data"].as_array().expect("refund list");
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_eq!(refunds[0]["id"], refunded.id.as_str());
    assert_eq!(refunds[0]["amount"], 1500);
    assert_eq!(refunds[0]["payment_intent"], intent.id.as_str());
    assert_eq!(
        refunds[0]["metadata"]["idempotency_key"],
        format!("orderflow-refund-{}-1500", intent.id)
    );
    let charge = ls
        .get(&format!("/v1/charges/{}", raw["latest_charge"]["id"].as_str().unwrap()))
        .await;
    assert_eq!(charge["amount_refunded"], 1500, "{charge}");

    // What localstripe does not know it refuses (400 "Unexpected reason"): the request's fault.
    let error = stripe
        .refund(&refund(&intent.id, 1500, Some("requested_by_customer")))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, PaymentError::Rejected(m) if m.contains("reason")),
        "{error:?}"
    );
}

#[tokio::test]
async fn void_cancels_an_authorization() {
    let ls = Localstripe::start().await;
    let stripe = client(&ls.base_url(), localstripe::SECRET_KEY);
    let intent = stripe
        .authorize(&authorize("order-2", "pm_card_visa", CaptureMethod::Manual, 1999))
        .await
        .expect("authorize");
    assert_eq!(intent.status, IntentStatus::RequiresCapture);

    let voided = stripe.void(&void(&intent.id)).await.expect("void");
    assert_eq!(voided.id, intent.id);
    assert_eq!(voided.status, IntentStatus::Canceled);
    assert_eq!(voided.amount_captured_minor, 0);
    let raw = ls.get(&format!("/v1/payment_intents/{}", intent.id)).await;
    assert_eq!(raw["status"], "canceled", "{raw}");
    assert_eq!(
        stripe.retrieve(&intent.id).await.expect("retrieve").status,
        IntentStatus::Canceled
    );

    // Cancelling again is refused by the provider (Stripe: payment_intent_unexpected_state).
    let mut again = void(&intent.id);
    again.idempotency_key.push_str("-again");
    assert!(matches!(stripe.void(&again).await, Err(PaymentError::Rejected(_))));
}

#[tokio::test]
async fn automatic_capture_succeeds_at_once() {
    let ls = Localstripe::start().await;
    let stripe = client(&ls.base_url(), localstripe::SECRET_KEY);
    let intent = stripe
        .authorize(&authorize("order-3", "pm_card_visa", CaptureMethod::Automatic, 750))
        .await
        .expect("authorize");
    assert_eq!(intent.status, IntentStatus::Succeeded, "{intent:?}");
    assert_eq!(intent.amount_captured_minor, 750);
    let raw = ls.get(&format!("/v1/payment_intents/{}", intent.id)).await;
    assert_eq!(raw["status"], "succeeded");
    assert_eq!(raw["capture_method"], "automatic");
    // Nothing left to void.
    assert!(matches!(
        stripe.void(&void(&intent.id)).await,
        Err(PaymentError::Rejected(_))
    ));
}

#[tokio::test]
async fn list_intents_pages_through_everything_and_keeps_orders() {
    let ls = Localstripe::start().await;
    let stripe = client(&ls.base_url(), localstripe::SECRET_KEY);
    let authorized = stripe
        .authorize(&authorize("order-a", "pm_card_visa", CaptureMethod::Manual, 100))
        .await
        .unwrap();
    let paid = stripe
        .authorize(&authorize("order-b", "pm_card_visa", CaptureMethod::Automatic, 200))
        .await
        .unwrap();
    let voided = stripe
        .authorize(&authorize("order-c", "pm_card_visa", CaptureMethod::Manual, 300))
        .await
        .unwrap();
    stripe.void(&void(&voided.id)).await.unwrap();
    // Not orderflow's: no metadata[order_id].
    let foreign = ls
        .post(
            "/v1/payment_intents",
            &[
                ("amount", "999"),
                ("currency", "eur"),
                ("payment_method", "pm_card_visa"),
                ("confirm", "true"),
            ],
        )
        .await;
    // More than one page (Stripe's pages hold 100).
    for i in 0..101 {
        let order = format!("bulk-{i}");
        ls.post(
            "/v1/payment_intents",
            &[
                ("amount", "1000"),
                ("currency", "eur"),
                ("payment_method", "pm_card_visa"),
                ("confirm", "true"),
                ("capture_method", "manual"),
                ("metadata[order_id]", &order),
            ],
        )
        .await;
    }

    let listed = stripe.list_intents().await.expect("list");
    assert_eq!(listed.len(), 104, "3 of ours + 101 bulk, not the foreign one");
    let find = |order: &str| {
        listed
            .iter()
            .find(|i| i.order_id.as_deref() == Some(order))
            .unwrap_or_else(|| panic!("{order} not listed"))
    };
    let a = find("order-a");
    assert_eq!(
        (a.id.as_str(), &a.status, a.amount_minor),
        (authorized.id.as_str(), &IntentStatus::RequiresCapture, 100)
    );
    let b = find("order-b");
    assert_eq!(
        (b.id.as_str(), &b.status, b.amount_captured_minor),
        (paid.id.as_str(), &IntentStatus::Succeeded, 200)
    );
    assert_eq!(find("order-c").status, IntentStatus::Canceled);
    assert_eq!(find("bulk-0").status, IntentStatus::RequiresCapture);
    assert_eq!(find("bulk-100").amount_minor, 1000);
    assert!(listed.iter().all(|i| i.id != foreign["id"].as_str().unwrap()));
    let mut ids: Vec<&str> = listed.iter().map(|i| i.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 104, "no intent listed twice");
}

#[tokio::test]
async fn declined_card_is_declined() {
    // localstripe declines a PaymentIntent only for this test card (4000000000000341).
    let ls = Localstripe::start().await;
    let stripe = client(&ls.base_url(), localstripe::SECRET_KEY);
    let error = stripe
        .authorize(&authorize(
            "order-d",
            "pm_card_chargeCustomerFail",
            CaptureMethod::Manual,
            500,
        ))
        .await
        .unwrap_err();
    assert_eq!(error, PaymentError::Declined("card_declined".into()));
}

#[tokio::test]
async fn bad_key_unknown_intent_and_unknown_method_are_rejected() {
    let ls = Localstripe::start().await;
    // localstripe accepts only sk_… keys; a revoked or wrong key is 401 on real Stripe too.
    let bad_key = "rk_test_not_accepted_here";
    let stripe = client(&ls.base_url(), bad_key);
    let error = stripe
        .authorize(&authorize("order-e", "pm_card_visa", CaptureMethod::Manual, 500))
        .await
        .unwrap_err();
    let PaymentError::Rejected(message) = &error else {
        panic!("a bad key must be rejected: {error:?}")
    };
    assert!(message.contains("401"), "{message}");
    assert!(
        !message.contains("not_accepted"),
        "the key must not be in the error: {message}"
    );
    assert!(matches!(stripe.list_intents().await, Err(PaymentError::Rejected(_))));

    let stripe = client(&ls.base_url(), localstripe::SECRET_KEY);
    let error = stripe.retrieve("pi_doesnotexist").await.unwrap_err();
    assert!(
        matches!(&error, PaymentError::Rejected(m) if m.contains("404")),
        "{error:?}"
    );
    let error = stripe.capture(&capture("pi_doesnotexist", 100)).await.unwrap_err();
    assert!(
        matches!(&error, PaymentError::Rejected(m) if m.contains("404")),
        "{error:?}"
    );
    // localstripe does not take `payment_method_data`, so `tok_…` tokens are refused there
    // (real Stripe and the sandbox take them).
    let error = stripe
        .authorize(&authorize("order-f", "tok_visa", CaptureMethod::Manual, 500))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, PaymentError::Rejected(m) if m.contains("payment_method_data")),
        "{error:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Transport failures: ambiguous, hence Transient.

#[tokio::test]
async fn closed_port_is_transient() {
    let port = localstripe::free_port();
    let stripe = client(&format!("http://127.0.0.1:{port}"), "sk_test_closed");
    let error = stripe
        .authorize(&authorize("order-g", "pm_card_visa", CaptureMethod::Manual, 500))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, PaymentError::Transient(m) if m.contains("connect")),
        "{error:?}"
    );
    assert!(matches!(stripe.retrieve("pi_1").await, Err(PaymentError::Transient(_))));
    assert!(matches!(stripe.list_intents().await, Err(PaymentError::Transient(_))));
}

#[tokio::test]
async fn silent_provider_times_out_as_transient() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accepts and reads, never answers.
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let stripe = StripeClient::new(StripeSettings {
        api_base: format!("http://127.0.0.1:{port}"),
        secret_key: "sk_test_silent".into(),
        timeout: Duration::from_millis(300),
    })
    .unwrap();
    let started = std::time::Instant::now();
    let error = stripe.capture(&capture("pi_1", 100)).await.unwrap_err();
    assert!(
        matches!(&error, PaymentError::Transient(m) if m.contains("timed out")),
        "{error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    server.abort();
}

// ---------------------------------------------------------------------------------------------
// The wire format, against a server that records what it gets and answers as scripted.

#[derive(Clone, Debug)]
struct Recorded {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    headers: HeaderMap,
    form: Vec<(String, String)>,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn field(&self, name: &str) -> Vec<&str> {
        self.form
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

type Answer = (u16, Vec<(&'static str, String)>, String);

#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Recorded>>>,
    answers: Arc<Mutex<VecDeque<Answer>>>,
}

impl Recorder {
    fn answer(&self, status: u16, headers: Vec<(&'static str, String)>, body: Value) {
        let body = if body.is_string() {
            body.as_str().unwrap().to_string()
        } else {
            body.to_string()
        };
        self.answers.lock().unwrap().push_back((status, headers, body));
    }

    fn take(&self) -> Vec<Recorded> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// `application/x-www-form-urlencoded` decoding (for the recorded bodies and queries).
fn decode_form(text: &str) -> Vec<(String, String)> {
    fn decode(part: &str) -> String {
        let bytes = part.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).unwrap()
    }
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

async fn record(
    State(recorder): State<Recorder>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    recorder.seen.lock().unwrap().push(Recorded {
        method,
        path: uri.path().to_string(),
        query: decode_form(uri.query().unwrap_or("")),
        headers,
        form: decode_form(std::str::from_utf8(&body).unwrap()),
    });
    let (status, headers, body) =
        recorder
            .answers
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or((500, vec![], "no answer scripted".into()));
    let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    for (name, value) in headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

async fn recording_server() -> (Recorder, String) {
    let recorder = Recorder::default();
    let app = axum::Router::new().fallback(record).with_state(recorder.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (recorder, base)
}

fn intent_json(id: &str, status: &str, received: i64, order: Option<&str>) -> Value {
    json!({
        "id": id, "object": "payment_intent", "amount": 4200, "amount_received": received,
        "currency": "eur", "status": status, "client_secret": format!("{id}_secret_x"),
        "metadata": order.map(|o| json!({"order_id": o})).unwrap_or(json!({})),
        "last_payment_error": null, "latest_charge": "ch_1"
    })
}

const WIRE_KEY: &str = "sk_test_wire_0123456789";

#[tokio::test]
async fn wire_format_of_every_call() {
    let (recorder, base) = recording_server().await;
    let stripe = client(&base, WIRE_KEY);

    // authorize with a token → payment_method_data.
    recorder.answer(
        200,
        vec![],
        intent_json("pi_wire", "requires_action", 0, Some("order-w")),
    );
    let intent = stripe
        .authorize(&authorize("order-w", "tok_visa", CaptureMethod::Manual, 4200))
        .await
        .unwrap();
    assert_eq!(intent.status, IntentStatus::RequiresAction);
    assert_eq!(intent.client_secret.as_deref(), Some("pi_wire_secret_x"));
    let [sent] = recorder.take().try_into().unwrap();
    assert_eq!(
        (sent.method.as_str(), sent.path.as_str()),
        ("POST", "/v1/payment_intents")
    );
    assert_eq!(
        sent.header("authorization"),
        Some(format!("Bearer {WIRE_KEY}").as_str())
    );
    assert_eq!(sent.header("stripe-version"), Some(STRIPE_VERSION));
    assert_eq!(sent.header("idempotency-key"), Some("orderflow-authorize-order-w"));
    assert_eq!(sent.header("x-correlation-id"), Some("corr-order-w"));
    assert_eq!(sent.header("content-type"), Some("application/x-www-form-urlencoded"));
    assert!(sent.header("user-agent").unwrap().starts_with("orderflow/"));
    assert_eq!(sent.field("amount"), ["4200"]);
    assert_eq!(sent.field("currency"), ["eur"]);
    assert_eq!(sent.field("confirm"), ["true"]);
    assert_eq!(sent.field("capture_method"), ["manual"]);
    assert_eq!(sent.field("payment_method_types[]"), ["card"]);
    assert_eq!(sent.field("payment_method_data[type]"), ["card"]);
    assert_eq!(sent.field("payment_method_data[card][token]"), ["tok_visa"]);
    assert!(sent.field("payment_method").is_empty());
    assert_eq!(sent.field("metadata[order_id]"), ["order-w"]);
    assert_eq!(sent.field("metadata[correlation_id]"), ["corr-order-w"]);

    // authorize with a PaymentMethod, automatic capture.
    recorder.answer(200, vec![], intent_json("pi_auto", "succeeded", 4200, Some("order-x")));
    let mut request = authorize("order-x", "pm_card_visa", CaptureMethod::Automatic, 4200);
    request.correlation_id = None;
    let intent = stripe.authorize(&request).await.unwrap();
    assert_eq!(
        (intent.status, intent.amount_captured_minor),
        (IntentStatus::Succeeded, 4200)
    );
    assert_eq!(intent.client_secret, None);
    let [sent] = recorder.take().try_into().unwrap();
    assert_eq!(sent.field("payment_method"), ["pm_card_visa"]);
    assert_eq!(sent.field("capture_method"), ["automatic"]);
    assert!(sent.field("payment_method_data[type]").is_empty());
    assert!(sent.header("x-correlation-id").is_none());

    // capture, void, refund.
    recorder.answer(200, vec![], intent_json("pi_wire", "succeeded", 4000, Some("order-w")));
    let captured = stripe.capture(&capture("pi_wire", 4000)).await.unwrap();
    assert_eq!(captured.amount_captured_minor, 4000);
    let [sent] = recorder.take().try_into().unwrap();
    assert_eq!(
        (sent.method.as_str(), sent.path.as_str()),
        ("POST", "/v1/payment_intents/pi_wire/capture")
    );
    assert_eq!(sent.header("idempotency-key"), Some("orderflow-capture-pi_wire"));
    assert_eq!(sent.form, [("amount_to_capture".to_string(), "4000".to_string())]);

    recorder.answer(200, vec![], intent_json("pi_v", "canceled", 0, Some("order-v")));
    assert_eq!(stripe.void(&void("pi_v")).await.unwrap().status, IntentStatus::Canceled);
    let [sent] = recorder.take().try_into().unwrap();
    assert_eq!(
        (sent.method.as_str(), sent.path.as_str()),
        ("POST", "/v1/payment_intents/pi_v/cancel")
    );
    assert_eq!(sent.header("idempotency-key"), Some("orderflow-void-pi_v"));
    assert!(sent.form.is_empty(), "{:?}", sent.form);

    recorder.answer(
        200,
        vec![],
        json!({"id": "re_1", "object": "refund", "amount": 1000, "status": "pending"}),
    );
    let done = stripe
        .refund(&refund("pi_wire", 1000, Some("requested_by_customer")))
        .await
        .unwrap();
    assert_eq!(
        (done.id.as_str(), done.amount_minor, done.status.as_str()),
        ("re_1", 1000, "pending")
    );
    let [sent] = recorder.take().try_into().unwrap();
    assert_eq!((sent.method.as_str(), sent.path.as_str()), ("POST", "/v1/refunds"));
    assert_eq!(sent.header("idempotency-key"), Some("orderflow-refund-pi_wire-1000"));
    assert_eq!(sent.field("payment_intent"), ["pi_wire"]);
    assert_eq!(sent.field("amount"), ["1000"]);
    assert_eq!(sent.field("reason"), ["requested_by_customer"]);
    assert_eq!(
        sent.field("metadata[idempotency_key]"),
        ["orderflow-refund-pi_wire-1000"]
    );
    assert_eq!(sent.field("metadata[correlation_id]"), ["corr-refund"]);

    // retrieve: a GET without an idempotency key or body.
    recorder.answer(200, vec![], intent_json("pi_wire", "succeeded", 4000, Some("order-w")));
    stripe.retrieve("pi_wire").await.unwrap();
    let [sent] = recorder.take().try_into().unwrap();
    assert_eq!(
        (sent.method.as_str(), sent.path.as_str()),
        ("GET", "/v1/payment_intents/pi_wire")
    );
    assert_eq!(sent.header("stripe-version"), Some(STRIPE_VERSION));
    assert!(sent.header("idempotency-key").is_none());

    // list: pages with starting_after = the last id of the page before; foreign intents skipped.
    recorder.answer(
        200,
        vec![],
        json!({"object": "list", "has_more": true, "url": "/v1/payment_intents", "data": [
            intent_json("pi_a", "requires_capture", 0, Some("order-a")),
            intent_json("pi_foreign", "weird_status_nobody_reads", 0, None),
        ]}),
    );
    recorder.answer(
        200,
        vec![],
        json!({"object": "list", "has_more": false, "data": [intent_json("pi_b", "succeeded", 4200, Some("order-b"))]}),
    );
    let listed = stripe.list_intents().await.unwrap();
    let ids: Vec<&str> = listed.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["pi_a", "pi_b"]);
    let [first, second] = recorder.take().try_into().unwrap();
    assert_eq!(
        (first.method.as_str(), first.path.as_str()),
        ("GET", "/v1/payment_intents")
    );
    assert_eq!(
        first.query,
        [
            ("limit".to_string(), "100".to_string()),
            ("expand[]".to_string(), "data.latest_charge".to_string())
        ]
    );
    assert_eq!(
        second.query,
        [
            ("limit".to_string(), "100".to_string()),
            ("expand[]".to_string(), "data.latest_charge".to_string()),
            ("starting_after".to_string(), "pi_foreign".to_string())
        ]
    );
}

#[tokio::test]
async fn answers_are_classified() {
    let (recorder, base) = recording_server().await;
    let stripe = client(&base, WIRE_KEY);
    let request = authorize("order-z", "pm_card_visa", CaptureMethod::Manual, 4200);

    // Real Stripe's decline: 402 card_error with the decline code and the failed intent.
    recorder.answer(
        402,
        vec![("request-id", "req_1".into())],
        json!({"error": {"type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds",
            "message": "Your card has insufficient funds.",
            "payment_intent": intent_json("pi_z", "requires_payment_method", 0, Some("order-z"))}}),
    );
    assert_eq!(
        stripe.authorize(&request).await,
        Err(PaymentError::Declined("insufficient_funds".into()))
    );

    recorder.answer(
        500,
        vec![("stripe-should-retry", "true".into())],
        json!({"error": {"type": "api_error"}}),
    );
    assert!(matches!(
        stripe.authorize(&request).await,
        Err(PaymentError::Transient(_))
    ));
    recorder.answer(
        429,
        vec![],
        json!({"error": {"type": "invalid_request_error", "code": "lock_timeout"}}),
    );
    assert!(matches!(
        stripe.authorize(&request).await,
        Err(PaymentError::Transient(_))
    ));
    recorder.answer(409, vec![], json!({"error": {"type": "idempotency_error"}}));
    assert!(matches!(
        stripe.authorize(&request).await,
        Err(PaymentError::Transient(_))
    ));

    recorder.answer(
        401,
        vec![],
        json!({"error": {"type": "invalid_request_error", "message": format!("Invalid API Key provided: {WIRE_KEY}")}}),
    );
    let error = stripe.authorize(&request).await.unwrap_err();
    assert!(
        matches!(&error, PaymentError::Rejected(m) if m.contains("401") && !m.contains("0123456789")),
        "{error:?}"
    );

    // A 2xx that cannot be read may have acted: ambiguous.
    recorder.answer(200, vec![], json!("<html>ok</html>"));
    assert!(matches!(
        stripe.authorize(&request).await,
        Err(PaymentError::Transient(_))
    ));
    recorder.answer(200, vec![], json!({"object": "payment_intent", "status": "succeeded"}));
    assert!(matches!(
        stripe.authorize(&request).await,
        Err(PaymentError::Transient(_))
    ));
    recorder.take();

    // Redirects are not followed (a POST must not turn into a GET elsewhere).
    recorder.answer(307, vec![("location", format!("{base}/elsewhere"))], json!(""));
    let error = stripe.authorize(&request).await.unwrap_err();
    assert!(
        matches!(&error, PaymentError::Rejected(m) if m.contains("307")),
        "{error:?}"
    );
    let seen = recorder.take();
    assert_eq!(seen.len(), 1, "the redirect was followed: {seen:?}");

    // Nothing is sent without an idempotency key.
    let mut keyless = request.clone();
    keyless.idempotency_key = " ".into();
    assert!(matches!(
        stripe.authorize(&keyless).await,
        Err(PaymentError::Rejected(_))
    ));
    assert!(recorder.take().is_empty());
}
