//! The NATS JetStream event sink against a real `nats-server -js` started per test
//! (`tests/support/nats.rs`): what the stream holds after a publish (every event once, in input
//! order, on its subject, with its `Nats-Msg-Id` and body), re-sends absorbed by the duplicate
//! window, a server that is down at start or goes away (errors within about the ack timeout,
//! nothing queued behind the caller's back, recovery after it returns), and the stream's settings
//! created, updated and re-created.
//!
//! Needs `nats-server` (v2.9 or later) at `/usr/sbin/nats-server` or on `PATH`.

#[path = "support/nats.rs"]
mod nats_server;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nats_server::{NatsServer, stream_messages};
use orderflow::adapters::events::OutgoingEvent;
use orderflow::adapters::events::nats::{JetStreamSink, NatsSettings, SinkError, subject_for};
use serde_json::json;
use uuid::Uuid;

const STREAM: &str = "ORDERFLOW_EVENTS";
const TYPES: [&str; 5] = [
    "order.placed",
    "order.paid",
    "order.ready_to_ship",
    "order.shipped",
    "payment.captured",
];

fn settings(server: &NatsServer) -> NatsSettings {
    NatsSettings {
        url: server.url(),
        ..NatsSettings::default()
    }
}

/// `count` events with fresh v7 ids, cycling through a few types, each body a small CloudEvent.
fn events(count: usize, first_position: i64) -> Vec<OutgoingEvent> {
    (0..count)
        .map(|i| {
            let id = Uuid::now_v7();
            let order_id = Uuid::now_v7();
            let event_type = TYPES[i % TYPES.len()].to_owned();
            let position = first_position + i as i64;
            let body = json!({
                "specversion": "1.0",
                "id": id.to_string(),
                "source": "orderflow",
                "type": event_type,
                "subject": format!("orders/{order_id}"),
                "datacontenttype": "application/json",
                "sequence": 1,
                "position": position,
                "data": {"order": {"order_id": order_id.to_string()}, "i": i},
            });
            OutgoingEvent {
                id,
                event_type,
                order_id: Some(order_id),
                sequence: 1,
                position,
                body: Bytes::from(serde_json::to_vec(&body).unwrap()),
            }
        })
        .collect()
}

fn assert_all_ok(results: &[Result<(), SinkError>], what: &str) {
    let failed: Vec<_> = results
        .iter()
        .enumerate()
        .filter(|(_, result)| result.is_err())
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} failed, first: {:?}",
        failed.len(),
        results.len(),
        failed.first()
    );
}

/// The stream holds exactly `events`, in this order, each on its subject with its id and body.
fn assert_stream_holds(messages: &[nats_server::StreamMessage], events: &[OutgoingEvent]) {
    assert_eq!(messages.len(), events.len(), "messages in the stream");
    for (i, (message, event)) in messages.iter().zip(events).enumerate() {
        assert_eq!(message.msg_id, event.id.to_string(), "Nats-Msg-Id of message {i}");
        assert_eq!(
            message.subject,
            subject_for(&event.event_type),
            "subject of message {i}"
        );
        let body: serde_json::Value = serde_json::from_slice(&event.body).unwrap();
        assert_eq!(message.body, body, "body of message {i}");
    }
    let sequences: Vec<u64> = messages.iter().map(|message| message.stream_sequence).collect();
    assert!(sequences.windows(2).all(|pair| pair[0] < pair[1]), "stream order");
}

/// The `Content-Type` header of the message at `sequence`.
async fn content_type(url: &str, sequence: u64) -> Option<String> {
    let client = async_nats::connect(url).await.unwrap();
    let stream = async_nats::jetstream::new(client).get_stream(STREAM).await.unwrap();
    let message = stream.get_raw_message(sequence).await.unwrap();
    nats_server::header(&message.headers, "Content-Type")
}

async fn stream_duplicate_window(url: &str) -> Duration {
    let client = async_nats::connect(url).await.unwrap();
    let mut stream = async_nats::jetstream::new(client).get_stream(STREAM).await.unwrap();
    stream.info().await.unwrap().config.duplicate_window
}

/// Publishes until every result is Ok, for at most `within`; returns how long it took.
async fn publish_until_ok(sink: &JetStreamSink, events: &[OutgoingEvent], within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let results = sink.publish(events).await;
        if results.iter().all(Result::is_ok) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "still failing after {within:?}: {:?}",
            results.iter().find(|result| result.is_err())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_every_event_once_in_order_and_absorbs_re_sends() {
    let server = NatsServer::start();
    let sink = JetStreamSink::connect(settings(&server)).await.expect("connect");
    let batch = events(2_000, 1);

    let started = Instant::now();
    let results = sink.publish(&batch).await;
    let elapsed = started.elapsed();
    eprintln!(
        "published {} events in {elapsed:?}: {:.0} events/s (max_in_flight {}, informative only)",
        batch.len(),
        batch.len() as f64 / elapsed.as_secs_f64(),
        NatsSettings::default().max_in_flight
    );
    assert_eq!(results.len(), batch.len());
    assert_all_ok(&results, "first publish");
    assert_stream_holds(&stream_messages(&server.url(), STREAM).await, &batch);
    for sequence in [1, 1_000, 2_000] {
        assert_eq!(
            content_type(&server.url(), sequence).await.as_deref(),
            Some("application/cloudevents+json"),
            "Content-Type of message {sequence}"
        );
    }

    // The same events again, within the duplicate window: acknowledged as duplicates, not stored.
    let results = sink.publish(&batch).await;
    assert_all_ok(&results, "re-send");
    assert_stream_holds(&stream_messages(&server.url(), STREAM).await, &batch);

    // A re-send of a part, mixed with new events: only the new ones are added, in order.
    let fresh = events(10, 2_001);
    let mut mixed: Vec<OutgoingEvent> = batch[1_990..].to_vec();
    mixed.extend(fresh.iter().cloned());
    assert_all_ok(&sink.publish(&mixed).await, "mixed re-send");
    let mut expected = batch.clone();
    expected.extend(fresh);
    assert_stream_holds(&stream_messages(&server.url(), STREAM).await, &expected);

    assert!(sink.publish(&[]).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_window_keeps_order() {
    let server = NatsServer::start();
    let sink = JetStreamSink::connect(NatsSettings {
        max_in_flight: 3,
        ..settings(&server)
    })
    .await
    .expect("connect");
    let batch = events(50, 1);
    assert_all_ok(&sink.publish(&batch).await, "publish");
    assert_stream_holds(&stream_messages(&server.url(), STREAM).await, &batch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_down_at_start_fails_publishes_quickly_and_recovers() {
    let mut server = NatsServer::start();
    server.stop();
    let ack_timeout = Duration::from_secs(2);
    let settings = NatsSettings {
        ack_timeout,
        ..settings(&server)
    };

    let started = Instant::now();
    let sink = JetStreamSink::connect(settings)
        .await
        .expect("connect succeeds while the server is down");
    assert!(started.elapsed() < ack_timeout, "connect took {:?}", started.elapsed());

    // Down: every event fails, within about the ack timeout.
    let lost = events(300, 1);
    let started = Instant::now();
    let results = sink.publish(&lost).await;
    let elapsed = started.elapsed();
    assert_eq!(results.len(), lost.len());
    assert!(
        results
            .iter()
            .all(|result| matches!(result, Err(SinkError::Unreachable(_)))),
        "{:?}",
        results[0]
    );
    assert!(
        elapsed < ack_timeout + Duration::from_secs(2),
        "publish while down took {elapsed:?}"
    );
    eprintln!(
        "publish while down failed after {elapsed:?}: {}",
        results[0].as_ref().unwrap_err()
    );

    // Back: the stream is created on the first publish that reaches the server.
    server.restart();
    let after = events(20, 301);
    let took = publish_until_ok(&sink, &after, Duration::from_secs(30)).await;
    eprintln!("publish succeeded {took:?} after the restart");
    // Nothing from the failed publish was queued and written after the reconnect.
    assert_stream_holds(&stream_messages(&server.url(), STREAM).await, &after);

    // Gone again after having been connected: errors within about the ack timeout, then recovery.
    server.stop();
    let later = events(300, 321);
    let started = Instant::now();
    let results = sink.publish(&later).await;
    let elapsed = started.elapsed();
    assert!(results.iter().all(Result::is_err), "published with the server down");
    assert!(
        elapsed < ack_timeout + Duration::from_secs(2),
        "publish after the server went away took {elapsed:?}"
    );
    eprintln!(
        "publish after the server went away failed after {elapsed:?}: {}",
        results[0].as_ref().unwrap_err()
    );

    server.restart();
    publish_until_ok(&sink, &later, Duration::from_secs(30)).await;
    let held: HashSet<String> = stream_messages(&server.url(), STREAM)
        .await
        .into_iter()
        .map(|m| m.msg_id)
        .collect();
    assert!(
        later.iter().all(|event| held.contains(&event.id.to_string())),
        "events published after the second restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_fails_a_large_batch_within_about_the_ack_timeout() {
    let mut server = NatsServer::start();
    let ack_timeout = Duration::from_secs(2);
    let max_in_flight = 256;
    let settings = NatsSettings {
        ack_timeout,
        max_in_flight,
        ..settings(&server)
    };
    let sink = JetStreamSink::connect(settings).await.expect("connect");
    let first = events(5, 1);
    assert_all_ok(&sink.publish(&first).await, "publish");

    // Connected, but nothing answers: acknowledgements time out, and the batch stops sending
    // instead of waiting one timeout per window.
    server.freeze();
    let batch = events(2_000, 6);
    let started = Instant::now();
    let results = sink.publish(&batch).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < ack_timeout + Duration::from_secs(2),
        "publish to a hung server took {elapsed:?}"
    );
    assert!(results.iter().all(Result::is_err), "published to a frozen server");
    let timed_out = results
        .iter()
        .filter(|result| matches!(result, Err(SinkError::Timeout(_))))
        .count();
    assert!(
        (1..=max_in_flight).contains(&timed_out),
        "{timed_out} sent and timed out"
    );
    assert!(
        results[timed_out..]
            .iter()
            .all(|result| matches!(result, Err(SinkError::Unreachable(_))))
    );
    eprintln!(
        "publish to a hung server failed after {elapsed:?}: {timed_out} timed out ({}), {} not sent ({})",
        results[0].as_ref().unwrap_err(),
        results.len() - timed_out,
        results[results.len() - 1].as_ref().unwrap_err()
    );

    // Thawed, the server stores what was sent before; re-sending everything adds only the rest.
    server.thaw();
    publish_until_ok(&sink, &batch, Duration::from_secs(30)).await;
    let mut expected = first;
    expected.extend(batch);
    assert_stream_holds(&stream_messages(&server.url(), STREAM).await, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_stream_updates_the_duplicate_window_and_keeps_other_settings() {
    let server = NatsServer::start();
    let first = JetStreamSink::connect(settings(&server)).await.expect("connect");
    assert_eq!(stream_duplicate_window(&server.url()).await, Duration::from_secs(120));
    assert_all_ok(&first.publish(&events(5, 1)).await, "publish");

    // An operator sets a limit of their own.
    let client = async_nats::connect(server.url()).await.unwrap();
    let context = async_nats::jetstream::new(client);
    let mut config = context
        .get_stream(STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    config.max_messages = 1_000_000;
    config.description = Some("orderflow events (ops)".to_owned());
    context.update_stream(&config).await.expect("operator update");

    // Another duplicate window: connecting again updates the stream.
    let second = JetStreamSink::connect(NatsSettings {
        duplicate_window: Duration::from_secs(30),
        ..settings(&server)
    })
    .await
    .expect("connect with another window");
    let info = context.get_stream(STREAM).await.unwrap().info().await.unwrap().clone();
    assert_eq!(info.config.duplicate_window, Duration::from_secs(30));
    assert_eq!(info.config.subjects, vec!["orderflow.events.>".to_owned()]);
    assert_eq!(
        info.config.max_messages, 1_000_000,
        "the operator's limit survives the update"
    );
    assert_eq!(info.config.description.as_deref(), Some("orderflow events (ops)"));
    assert_eq!(info.state.messages, 5, "the update keeps the messages");

    // Explicitly, and idempotently.
    second.ensure_stream().await.expect("ensure again");
    assert_eq!(stream_duplicate_window(&server.url()).await, Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_stream_is_created_again() {
    let server = NatsServer::start();
    let sink = JetStreamSink::connect(settings(&server)).await.expect("connect");
    assert_all_ok(&sink.publish(&events(3, 1)).await, "publish");

    let client = async_nats::connect(server.url()).await.unwrap();
    async_nats::jetstream::new(client)
        .delete_stream(STREAM)
        .await
        .expect("delete the stream");

    let batch = events(3, 4);
    let results = sink.publish(&batch).await;
    assert!(
        results
            .iter()
            .all(|result| matches!(result, Err(SinkError::Rejected(_)))),
        "{results:?}"
    );
    assert_all_ok(&sink.publish(&batch).await, "publish after the stream was re-created");
    assert_stream_holds(&stream_messages(&server.url(), STREAM).await, &batch);
}

#[tokio::test]
async fn unusable_settings_fail_connect() {
    for settings in [
        NatsSettings {
            stream: "ORDERFLOW.EVENTS".to_owned(),
            ..NatsSettings::default()
        },
        NatsSettings {
            max_in_flight: 0,
            ..NatsSettings::default()
        },
        NatsSettings {
            url: "nats://".to_owned(),
            ..NatsSettings::default()
        },
    ] {
        let result = JetStreamSink::connect(settings.clone()).await;
        assert!(
            matches!(result, Err(SinkError::InvalidSettings(_))),
            "{settings:?}: {result:?}"
        );
    }
}
