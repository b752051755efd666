//! The webhook wire, end to end over real HTTP: [`WebhookClient`] delivers to
//! `tests/support/webhook_receiver.py`, which verifies every delivery with the official Standard
//! Webhooks library (python `standardwebhooks`). Checks that what we sign verifies (also while two
//! secrets are valid), that what should not verify does not (another body, a stale timestamp), and
//! that each kind of answer — or no answer at all — becomes the right [`DeliveryOutcome`] within the
//! timeout, without following redirects.

#[path = "support/webhook_receiver.rs"]
mod webhook_receiver;

use std::time::{Duration, Instant};

use chrono::Utc;
use orderflow::adapters::events::OutgoingEvent;
use orderflow::adapters::events::webhook::{
    DeliveryOutcome, WebhookClient, WebhookSecret, signature_header, validate_endpoint_url,
};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;
use webhook_receiver::WebhookReceiver;

const TIMEOUT: Duration = Duration::from_secs(10);

fn event(event_type: &str) -> OutgoingEvent {
    let id = Uuid::now_v7();
    let order_id = Uuid::now_v7();
    let body = json!({
        "specversion": "1.0",
        "id": id,
        "source": "orderflow",
        "type": event_type,
        "subject": format!("orders/{order_id}"),
        "time": Utc::now().to_rfc3339(),
        "datacontenttype": "application/json",
        "sequence": 1,
        "position": 42,
        "data": {"order": {"order_id": order_id, "status": "paid", "note": "héllo ✓"}},
    });
    OutgoingEvent {
        id,
        event_type: event_type.to_owned(),
        order_id: Some(order_id),
        sequence: 1,
        position: 42,
        body: serde_json::to_vec(&body).unwrap().into(),
    }
}

/// A receiver that knows these secrets.
async fn receiver_with(secrets: &[&WebhookSecret]) -> WebhookReceiver {
    let receiver = WebhookReceiver::start().await;
    let secrets: Vec<&str> = secrets.iter().map(|s| s.as_str()).collect();
    receiver.set_secrets(&secrets).await;
    receiver
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_delivery_verifies_with_the_official_library() {
    let secret = WebhookSecret::generate();
    let receiver = receiver_with(&[&secret]).await;
    let event = event("order.paid");
    let now = Utc::now();
    let url = validate_endpoint_url(&receiver.url()).unwrap();

    let result = WebhookClient::new(TIMEOUT).deliver(&url, &event, &[&secret], now).await;

    assert_eq!(result.outcome, DeliveryOutcome::Delivered, "{result:?}");
    assert_eq!(result.status, Some(200));
    assert_eq!(result.error, None);
    assert_eq!(result.response_excerpt, r#"{"ok":true}"#);
    let received = receiver.received().await;
    assert_eq!(received.len(), 1, "{received:#?}");
    let got = &received[0];
    assert!(got.verified, "{got:#?}");
    assert_eq!(got.verified_with, [0]);
    assert_eq!(got.method, "POST");
    assert_eq!(got.path, "/hooks");
    assert_eq!(got.webhook_id.as_deref(), Some(event.id.to_string().as_str()));
    assert_eq!(
        got.webhook_timestamp.as_deref(),
        Some(now.timestamp().to_string().as_str())
    );
    assert_eq!(got.raw_body.as_bytes(), &event.body[..]);
    assert_eq!(got.event_id(), Some(event.id.to_string().as_str()));
    assert_eq!(got.order_id(), event.order_id.map(|id| id.to_string()));
    assert_eq!(got.header("content-type"), Some("application/json"));
    let agent = got.header("user-agent").unwrap_or_default();
    assert!(agent.starts_with("orderflow-webhooks/"), "{agent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_rotation_either_secret_verifies() {
    let old = WebhookSecret::generate();
    let new = WebhookSecret::generate();
    let unrelated = WebhookSecret::generate();
    let receiver = receiver_with(&[&old, &new, &unrelated]).await;
    let client = WebhookClient::new(TIMEOUT);
    let signing = [&new, &old];

    let result = client
        .deliver(&receiver.url(), &event("order.paid"), &signing, Utc::now())
        .await;
    assert_eq!(result.outcome, DeliveryOutcome::Delivered, "{result:?}");
    let received = receiver.received().await;
    assert_eq!(received[0].verified_with, [0, 1], "{:#?}", received[0]);
    assert_eq!(
        received[0]
            .signature_header
            .as_deref()
            .unwrap_or_default()
            .split(' ')
            .count(),
        2
    );

    // An integrator that has only the old secret, or only the new one, verifies all the same.
    for (only, verifies) in [(&old, true), (&new, true), (&unrelated, false)] {
        receiver.reset().await;
        receiver.set_secrets(&[only.as_str()]).await;
        client
            .deliver(&receiver.url(), &event("order.paid"), &signing, Utc::now())
            .await;
        let received = receiver.received().await;
        assert_eq!(received.len(), 1);
        assert_eq!(received[0].verified, verifies, "{:#?}", received[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_body_does_not_verify() {
    let secret = WebhookSecret::generate();
    let receiver = receiver_with(&[&secret]).await;
    let signed = event("order.paid");
    let other = event("order.cancelled");
    let timestamp = Utc::now().timestamp();
    let signature = signature_header(&[&secret], &signed.id.to_string(), timestamp, &signed.body);

    let response = reqwest::Client::new()
        .post(receiver.url())
        .header("content-type", "application/json")
        .header("webhook-id", signed.id.to_string())
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(other.body.clone())
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());

    let received = receiver.received().await;
    assert!(!received[0].verified, "{:#?}", received[0]);
    let error = received[0].error.as_deref().unwrap_or_default();
    assert!(error.contains("No matching signature"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_minute_old_timestamp_does_not_verify() {
    let secret = WebhookSecret::generate();
    let receiver = receiver_with(&[&secret]).await;
    let then = Utc::now() - chrono::Duration::minutes(10);

    WebhookClient::new(TIMEOUT)
        .deliver(&receiver.url(), &event("order.paid"), &[&secret], then)
        .await;

    let received = receiver.received().await;
    assert!(!received[0].verified, "{:#?}", received[0]);
    let error = received[0].error.as_deref().unwrap_or_default();
    assert!(error.contains("too old"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_fails_with_its_status_and_the_first_bytes_of_the_answer() {
    let secret = WebhookSecret::generate();
    let receiver = receiver_with(&[&secret]).await;
    let answer = format!("database on fire: {}", "x".repeat(400));
    receiver
        .set_rules(json!([{"match": {"type": "order.paid"}, "status": 500, "body": answer}]))
        .await;

    let result = WebhookClient::new(TIMEOUT)
        .deliver(&receiver.url(), &event("order.paid"), &[&secret], Utc::now())
        .await;

    assert_eq!(result.outcome, DeliveryOutcome::Failed, "{result:?}");
    assert_eq!(result.status, Some(500));
    assert_eq!(result.response_excerpt, answer[..256]);
    let error = result.error.unwrap_or_default();
    assert!(error.contains("500"), "{error}");
    // Recorded (and verified) even though it was refused.
    let received = receiver.received().await;
    assert_eq!(received[0].answered_status, 500);
    assert!(received[0].verified);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_means_gone() {
    let secret = WebhookSecret::generate();
    let receiver = receiver_with(&[&secret]).await;
    let event = event("order.paid");
    let order_id = event.order_id.unwrap().to_string();
    // Matched by order: only this order's first delivery is refused.
    receiver
        .set_rules(json!([{"match": {"order_id": order_id}, "status": 410, "times": 1}]))
        .await;
    let client = WebhookClient::new(TIMEOUT);

    let result = client.deliver(&receiver.url(), &event, &[&secret], Utc::now()).await;
    assert_eq!(result.outcome, DeliveryOutcome::Gone, "{result:?}");
    assert_eq!(result.status, Some(410));
    assert!(result.error.is_some());

    let again = client.deliver(&receiver.url(), &event, &[&secret], Utc::now()).await;
    assert_eq!(
        again.outcome,
        DeliveryOutcome::Delivered,
        "the rule was spent: {again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let secret = WebhookSecret::generate();
    let receiver = receiver_with(&[&secret]).await;
    let in_two_minutes = (Utc::now() + chrono::Duration::seconds(120))
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    receiver
        .set_rules(json!([
            {"match": {"type": "order.paid"}, "status": 429, "retry_after": "7"},
            {"match": {"type": "order.shipped"}, "status": 503, "retry_after": in_two_minutes},
            {"match": {"type": "order.placed"}, "status": 429},
        ]))
        .await;
    let client = WebhookClient::new(TIMEOUT);

    let result = client
        .deliver(&receiver.url(), &event("order.paid"), &[&secret], Utc::now())
        .await;
    assert_eq!(
        result.outcome,
        DeliveryOutcome::RetryAfter(Duration::from_secs(7)),
        "{result:?}"
    );
    assert_eq!(result.status, Some(429));

    let result = client
        .deliver(&receiver.url(), &event("order.shipped"), &[&secret], Utc::now())
        .await;
    assert_eq!(result.status, Some(503));
    match result.outcome {
        DeliveryOutcome::RetryAfter(delay) => {
            assert!(
                delay > Duration::from_secs(100) && delay <= Duration::from_secs(120),
                "{delay:?}"
            )
        }
        other => panic!("503 with an HTTP-date Retry-After: {other:?} ({result:?})"),
    }

    // No Retry-After: an ordinary failure, the schedule decides.
    let result = client
        .deliver(&receiver.url(), &event("order.placed"), &[&secret], Utc::now())
        .await;
    assert_eq!(result.outcome, DeliveryOutcome::Failed, "{result:?}");
    assert_eq!(result.status, Some(429));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_a_failure_and_is_not_followed() {
    let secret = WebhookSecret::generate();
    let receiver = receiver_with(&[&secret]).await;
    let target = format!("{}/redirected", receiver.base_url());
    receiver.set_rules(json!([{"status": 302, "location": target}])).await;

    let result = WebhookClient::new(TIMEOUT)
        .deliver(&receiver.url(), &event("order.paid"), &[&secret], Utc::now())
        .await;

    assert_eq!(result.outcome, DeliveryOutcome::Failed, "{result:?}");
    assert_eq!(result.status, Some(302));
    let error = result.error.unwrap_or_default();
    assert!(error.contains("redirect") && error.contains("/redirected"), "{error}");
    // Give a (wrongly) followed redirect time to arrive before concluding it did not.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = receiver.received().await;
    assert_eq!(received.len(), 1, "{received:#?}");
    assert_eq!(received[0].path, "/hooks");
    assert!(received.iter().all(|r| r.path != "/redirected"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_endpoint_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks", listener.local_addr().unwrap());
    // Accepts, reads nothing, answers nothing, keeps the connections open.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });

    let started = Instant::now();
    let result = WebhookClient::new(Duration::from_secs(1))
        .deliver(&url, &event("order.paid"), &[&WebhookSecret::generate()], Utc::now())
        .await;
    let took = started.elapsed();

    assert_eq!(result.outcome, DeliveryOutcome::Failed, "{result:?}");
    assert_eq!(result.status, None);
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(result.latency >= Duration::from_millis(900), "{result:?}");
    let error = result.error.unwrap_or_default();
    assert!(error.contains("timed out"), "{error}");
    silent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_answer_body_does_not_hold_the_delivery() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks", listener.local_addr().unwrap());
    // Answers 200 at once, then trickles nothing more of the promised body.
    let slow = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = vec![0u8; 64 * 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await;
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\naccepted")
                .await;
            held.push(socket);
        }
    });

    let started = Instant::now();
    let result = WebhookClient::new(Duration::from_secs(1))
        .deliver(&url, &event("order.paid"), &[&WebhookSecret::generate()], Utc::now())
        .await;

    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        result.outcome,
        DeliveryOutcome::Delivered,
        "the 2xx head is the acknowledgement: {result:?}"
    );
    assert_eq!(result.status, Some(200));
    assert_eq!(result.response_excerpt, "accepted");
    slow.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_fails_at_once() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let result = WebhookClient::new(TIMEOUT)
        .deliver(
            &format!("http://127.0.0.1:{port}/hooks"),
            &event("order.paid"),
            &[&WebhookSecret::generate()],
            Utc::now(),
        )
        .await;
    assert_eq!(result.outcome, DeliveryOutcome::Failed, "{result:?}");
    assert_eq!(result.status, None);
    assert!(result.latency < Duration::from_secs(5), "{result:?}");
    let error = result.error.unwrap_or_default();
    assert!(error.contains("connect"), "{error}");
}
