//! The events outbox at the store level, written once and run on SQLite, PostgreSQL and the
//! emulated DSQL (conflicts injected into every table the events store writes): positions
//! stay gap-free and in order for a reader polling while many writers commit and several stampers
//! (relays) race; webhook deliveries keep each order's events in sequence without holding back
//! other orders; leases fence the relay; 410 disables an endpoint with its own event; replay and
//! pruning work on exact ranges; deleting an endpoint and pruning stay within DSQL's 3,000 rows
//! per transaction; the audit catches a missing event.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::{Backend, TestDb};
use orderflow::domain::events::{EventType, NewEvent, TypePattern};
use orderflow::domain::{Cart, CartLine, Currency, CustomerId, OrderId, PaymentToken, ProductId, Quantity};
use orderflow::store::events::{
    AttemptRecord, AttemptRecorded, AttemptVerdict, EndpointStatus, EventQuery, NewEndpoint, ReplayRange,
};
use orderflow::store::jobs::StepEffects;
use orderflow::store::{NewJob, PlaceOrder, PlaceOrderOutcome, Store};
use serde_json::json;
use uuid::Uuid;

on_every_backend!(
    positions_are_gap_free_for_a_concurrent_reader,
    deliveries_keep_each_order_in_sequence,
    gone_disables_the_endpoint_with_an_event,
    replay_and_pruning_take_exact_ranges,
    deleting_and_pruning_stay_within_the_row_limit,
    audit_catches_missing_and_gapped_events,
);

async fn place(store: &dyn Store, product: ProductId, customer: CustomerId) -> OrderId {
    let order_id = OrderId::new();
    let request = PlaceOrder {
        principal: customer.to_string(),
        idempotency_key: Uuid::now_v7().to_string(),
        fingerprint: "f".into(),
        order_id,
        customer_id: customer,
        cart: Cart::new(vec![CartLine {
            product_id: product,
            quantity: Quantity::parse(1).unwrap(),
        }])
        .unwrap(),
        payment_token: PaymentToken::default_sandbox(),
        shipping: None,
        currency: Currency::USD,
        correlation_id: Some("corr-1".into()),
        region: None,
        first_job: NewJob {
            kind: "charge_payment",
            payload: json!({ "order_id": order_id }),
            run_at: orderflow::clock::now(),
            max_attempts: 3,
        },
        now: orderflow::clock::now(),
    };
    match store.place_order(&request).await.unwrap() {
        PlaceOrderOutcome::Created(order) => order.id,
        other => panic!("expected a new order, got {other:?}"),
    }
}

/// Appends one `payment.captured` event to `order` through the store's real path (a step's
/// effects without a status change).
async fn emit(store: &dyn Store, order: OrderId) {
    let effects = StepEffects {
        order_id: Some(order),
        emit: vec![NewEvent::new(EventType::PaymentCaptured)],
        ..Default::default()
    };
    store
        .complete_job(None, &effects, orderflow::clock::now())
        .await
        .unwrap();
}

async fn orders(store: &dyn Store, count: usize) -> Vec<OrderId> {
    let (product, customer) = common::seed_lamp_and_buyer(store, &format!("{}@example.com", Uuid::now_v7())).await;
    store
        .adjust_stock(
            product,
            &orderflow::domain::StockAdjustment {
                delta: 100_000,
                reason: "test stock".into(),
            },
            orderflow::clock::now(),
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..count {
        ids.push(place(store, product, customer).await);
    }
    ids
}

/// Stamps until nothing is left.
async fn stamp_all(store: &dyn Store) -> usize {
    let mut total = 0;
    loop {
        let stamped = store
            .events()
            .stamp_events(1000, orderflow::clock::now())
            .await
            .unwrap();
        if stamped == 0 {
            return total;
        }
        total += stamped;
    }
}

/// 8 writers commit events (in transactions of varying length) while 3 stampers race to position
/// them and a reader polls "everything after the last position I saw". The reader must see every
/// position exactly once, in increasing order, and each order's events in sequence order — which a
/// position taken inside the writers' transactions would break (late committers get skipped).
async fn positions_are_gap_free_for_a_concurrent_reader(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let (order_count, per_writer) = match backend {
        Backend::Postgres | Backend::Dsql => (200, 2_500),
        Backend::Sqlite => (40, 250),
    };
    let ids = Arc::new(orders(store.as_ref(), order_count).await);
    let writers = 8;
    let expected = order_count + writers * per_writer;

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..writers {
        let (store, ids) = (store.clone(), ids.clone());
        tasks.spawn(async move {
            for n in 0..per_writer {
                // Each writer has its own orders, so the order row lock never serializes writers.
                let order = ids[(writer + n * writers) % ids.len()];
                emit(store.as_ref(), order).await;
            }
        });
    }
    let mut stampers = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let (store, done) = (store.clone(), done.clone());
        stampers.spawn(async move {
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                let stamped = match store.events().stamp_events(100, orderflow::clock::now()).await {
                    Ok(stamped) => stamped,
                    // Lost every race for the counter within the retry budget (snapshot
                    // isolation: the emulated DSQL), to stampers that did the work meanwhile; a
                    // relay meets it the same way and stamps again.
                    Err(error) if error.is_contention() => continue,
                    Err(error) => panic!("stamping failed: {error}"),
                };
                if finished && stamped == 0 {
                    return;
                }
                if stamped == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        });
    }
    let reader = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut seen: Vec<(i64, Option<Uuid>, i64)> = Vec::with_capacity(expected);
            let deadline = Instant::now() + Duration::from_secs(300);
            while seen.len() < expected {
                assert!(
                    Instant::now() < deadline,
                    "the reader saw only {} of {expected} events",
                    seen.len()
                );
                let after = seen.last().map(|e| e.0).unwrap_or(0);
                let page = store
                    .events()
                    .events_after(&EventQuery {
                        after,
                        limit: 1000,
                        types: None,
                    })
                    .await
                    .unwrap();
                if page.is_empty() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                seen.extend(page.into_iter().map(|e| (e.position, e.order_id, e.sequence)));
            }
            seen
        })
    };
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    while let Some(result) = stampers.join_next().await {
        result.unwrap();
    }
    let seen = reader.await.unwrap();
    assert_eq!(seen.len(), expected);
    for (index, (position, _, _)) in seen.iter().enumerate() {
        assert_eq!(*position, index as i64 + 1, "the reader skipped or repeated a position");
    }
    let mut last_sequence: HashMap<Uuid, i64> = HashMap::new();
    for (_, order, sequence) in &seen {
        let last = last_sequence.entry(order.unwrap()).or_insert(0);
        assert_eq!(*sequence, *last + 1, "an order's events out of sequence order");
        *last = *sequence;
    }
    let bounds = store.events().event_bounds().await.unwrap();
    assert_eq!((bounds.oldest, bounds.last), (Some(1), expected as i64));
    let report = store.audit().await.unwrap();
    assert!(report.is_clean(), "{report}");
}

async fn endpoint(store: &dyn Store, patterns: &[&str]) -> Uuid {
    let endpoint = NewEndpoint {
        id: Uuid::now_v7(),
        url: "http://127.0.0.1:9/hooks".into(),
        description: None,
        enabled_events: patterns.iter().map(|p| TypePattern::parse(p).unwrap()).collect(),
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
    };
    store.events().create_endpoint(&endpoint, Utc::now()).await.unwrap().id
}

fn record(claim: &orderflow::store::events::DeliveryClaim, endpoint: Uuid, verdict: AttemptVerdict) -> AttemptRecord {
    AttemptRecord {
        delivery_id: claim.delivery_id,
        lease_token: claim.lease_token,
        endpoint_id: endpoint,
        verdict,
        status_code: Some(500),
        latency: Duration::from_millis(3),
        error: Some("HTTP 500".into()),
        response_excerpt: "oops".into(),
        disable_after: Duration::from_secs(3600),
    }
}

/// Each order's deliveries go out one at a time in sequence; a failing order holds back only its
/// own later events; the per-endpoint cap bounds what is in flight; a lost lease records nothing.
async fn deliveries_keep_each_order_in_sequence(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let events = store.events();
    let hook = endpoint(store.as_ref(), &["order.*", "payment.*"]).await;
    let only_placed = endpoint(store.as_ref(), &["order.placed"]).await;
    let ids = orders(store.as_ref(), 3).await;
    for order in &ids {
        emit(store.as_ref(), *order).await;
        emit(store.as_ref(), *order).await;
    }
    assert_eq!(stamp_all(store.as_ref()).await, 9);
    let lease = Duration::from_secs(60);

    // The filter: `order.placed` only gets the three placed events.
    let placed = events
        .claim_deliveries(only_placed, 10, lease, Utc::now())
        .await
        .unwrap();
    assert_eq!(placed.len(), 3);
    assert!(placed.iter().all(|c| c.event.event_type == "order.placed"));

    // Heads of each order only, capped at 2 in flight.
    let first = events.claim_deliveries(hook, 2, lease, Utc::now()).await.unwrap();
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|c| c.event.sequence == 1));
    assert!(
        events
            .claim_deliveries(hook, 2, lease, Utc::now())
            .await
            .unwrap()
            .is_empty(),
        "cap of 2 in flight"
    );
    let third = events.claim_deliveries(hook, 3, lease, Utc::now()).await.unwrap();
    assert_eq!(third.len(), 1, "the third order's head");
    assert!(
        events
            .claim_deliveries(hook, 10, lease, Utc::now())
            .await
            .unwrap()
            .is_empty(),
        "later events wait for their order's head"
    );

    // Order A fails (retry later); B and C succeed: their next events become due, A's do not.
    let (a, b) = (&first[0], &first[1]);
    let later = Utc::now() + chrono::Duration::hours(1);
    assert_eq!(
        events
            .record_attempt(&record(a, hook, AttemptVerdict::RetryAt(later)), Utc::now())
            .await
            .unwrap(),
        AttemptRecorded::Recorded
    );
    for claim in [b, &third[0]] {
        events
            .record_attempt(&record(claim, hook, AttemptVerdict::Delivered), Utc::now())
            .await
            .unwrap();
    }
    let next = events.claim_deliveries(hook, 10, lease, Utc::now()).await.unwrap();
    let subjects: Vec<&str> = next.iter().map(|c| c.event.subject.as_str()).collect();
    assert_eq!(next.len(), 2, "B's and C's second events: {subjects:?}");
    assert!(
        next.iter()
            .all(|c| c.event.sequence == 2 && c.event.subject != a.event.subject)
    );

    // A stale token records nothing.
    let mut stale = record(&next[0], hook, AttemptVerdict::Delivered);
    stale.lease_token = Uuid::now_v7();
    assert_eq!(
        events.record_attempt(&stale, Utc::now()).await.unwrap(),
        AttemptRecorded::LeaseLost
    );

    for claim in &next {
        events
            .record_attempt(&record(claim, hook, AttemptVerdict::Delivered), Utc::now())
            .await
            .unwrap();
    }

    // When A's retry falls due, A's head goes again (and only it, for A) beside B's and C's last.
    let retry = events
        .claim_deliveries(hook, 10, lease, later + chrono::Duration::seconds(1))
        .await
        .unwrap();
    let for_a: Vec<_> = retry.iter().filter(|c| c.event.subject == a.event.subject).collect();
    assert_eq!(for_a.len(), 1);
    assert_eq!((for_a[0].event.sequence, for_a[0].attempts), (1, 1));
    assert_eq!(retry.len(), 3);
    assert!(
        retry
            .iter()
            .filter(|c| c.event.subject != a.event.subject)
            .all(|c| c.event.sequence == 3)
    );

    // The log shows the failed attempt with its answer.
    let log = events.list_deliveries(hook, Some("pending"), None, 50).await.unwrap();
    let failed = log
        .items
        .iter()
        .find(|d| d.delivery_id == a.delivery_id)
        .expect("A's head in the log");
    assert_eq!(failed.attempts, 1);
    assert_eq!(failed.attempt_log.len(), 1);
    assert_eq!(failed.attempt_log[0].status_code, Some(500));
    assert_eq!(failed.attempt_log[0].response_excerpt.as_deref(), Some("oops"));
    let failing = events.list_deliveries(hook, Some("failing"), None, 50).await.unwrap();
    let failing: Vec<Uuid> = failing.items.iter().map(|d| d.delivery_id).collect();
    assert_eq!(
        failing,
        [a.delivery_id],
        "pending after a failed attempt: only A's head"
    );
    let health = events.endpoint_health(Utc::now()).await.unwrap();
    let hook_health = health.iter().find(|h| h.endpoint_id == hook).unwrap();
    assert!(hook_health.failing >= 1 && hook_health.pending >= 1);
}

/// A 410 disables the endpoint once, with a `webhook_endpoint.disabled` event; failing past the
/// limit does too; an operator re-enabling it clears the failure clock.
async fn gone_disables_the_endpoint_with_an_event(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let events = store.events();
    let hook = endpoint(store.as_ref(), &["*"]).await;
    orders(store.as_ref(), 2).await;
    stamp_all(store.as_ref()).await;
    let claims = events
        .claim_deliveries(hook, 10, Duration::from_secs(60), Utc::now())
        .await
        .unwrap();
    assert_eq!(claims.len(), 2);
    let gone = events
        .record_attempt(&record(&claims[0], hook, AttemptVerdict::Gone), Utc::now())
        .await
        .unwrap();
    assert!(
        matches!(gone, AttemptRecorded::EndpointDisabled(ref reason) if reason.contains("410")),
        "{gone:?}"
    );
    let again = events
        .record_attempt(&record(&claims[1], hook, AttemptVerdict::Gone), Utc::now())
        .await
        .unwrap();
    assert_eq!(again, AttemptRecorded::Recorded, "disabled once");
    let endpoint = events.get_endpoint(hook).await.unwrap().unwrap();
    assert_eq!(endpoint.status, EndpointStatus::Disabled);
    stamp_all(store.as_ref()).await;
    let disabled = events
        .events_after(&EventQuery {
            after: 0,
            limit: 100,
            types: Some(TypePattern::parse("webhook_endpoint.disabled").unwrap()),
        })
        .await
        .unwrap();
    assert_eq!(disabled.len(), 1);
    assert_eq!(disabled[0].subject, format!("webhook-endpoints/{hook}"));
    assert_eq!(disabled[0].data["endpoint"]["status"], "disabled");
    // Disabled endpoints are not claimed from and get no new deliveries.
    assert!(
        events
            .claim_deliveries(hook, 10, Duration::from_secs(60), Utc::now())
            .await
            .unwrap()
            .len()
            <= 2
    );

    // Failing continuously past the limit disables too.
    let slow = self::endpoint(store.as_ref(), &["*"]).await;
    orders(store.as_ref(), 1).await;
    stamp_all(store.as_ref()).await;
    let claim = events
        .claim_deliveries(slow, 1, Duration::from_secs(60), Utc::now())
        .await
        .unwrap()
        .remove(0);
    let mut first = record(&claim, slow, AttemptVerdict::RetryAt(Utc::now()));
    first.disable_after = Duration::from_secs(3600);
    assert_eq!(
        events.record_attempt(&first, Utc::now()).await.unwrap(),
        AttemptRecorded::Recorded
    );
    let claim = events
        .claim_deliveries(
            slow,
            1,
            Duration::from_secs(60),
            Utc::now() + chrono::Duration::seconds(1),
        )
        .await
        .unwrap()
        .remove(0);
    let late = Utc::now() + chrono::Duration::hours(2);
    let outcome = events
        .record_attempt(&record(&claim, slow, AttemptVerdict::RetryAt(late)), late)
        .await
        .unwrap();
    assert!(
        matches!(outcome, AttemptRecorded::EndpointDisabled(ref r) if r.contains("1 h")),
        "{outcome:?}"
    );
    let patch = orderflow::store::events::EndpointPatch {
        status: Some(EndpointStatus::Enabled),
        ..Default::default()
    };
    let enabled = events.update_endpoint(slow, &patch, Utc::now()).await.unwrap().unwrap();
    assert_eq!(
        (enabled.status, enabled.failing_since, enabled.disabled_reason),
        (EndpointStatus::Enabled, None, None)
    );
}

/// Replay queues exactly the events of a position range (same event ids); pruning deletes in
/// bounded batches and never what NATS has yet to publish.
async fn replay_and_pruning_take_exact_ranges(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let events = store.events();
    let ids = orders(store.as_ref(), 10).await;
    stamp_all(store.as_ref()).await;
    let hook = endpoint(store.as_ref(), &["*"]).await;
    let queued = events
        .replay_deliveries(hook, ReplayRange::Positions { from: 3, to: 6 }, Utc::now())
        .await
        .unwrap();
    assert_eq!(queued, 4);
    let claims = events
        .claim_deliveries(hook, 100, Duration::from_secs(60), Utc::now())
        .await
        .unwrap();
    let positions: Vec<i64> = claims.iter().map(|c| c.event.position).collect();
    assert_eq!(positions, vec![3, 4, 5, 6]);
    let by_time = events
        .replay_deliveries(
            hook,
            ReplayRange::Time {
                since: Utc::now() - chrono::Duration::hours(1),
                until: Utc::now() + chrono::Duration::hours(1),
            },
            Utc::now(),
        )
        .await
        .unwrap();
    assert_eq!(by_time, 10);

    // NATS has published through 4: only 1..=4 may go, three per batch.
    let token = Uuid::now_v7();
    assert_eq!(
        events
            .claim_channel("nats", token, Duration::from_secs(30), Utc::now())
            .await
            .unwrap(),
        Some(0)
    );
    assert_eq!(
        events
            .claim_channel("nats", Uuid::now_v7(), Duration::from_secs(30), Utc::now())
            .await
            .unwrap(),
        None,
        "held by the first relay"
    );
    assert!(events.advance_channel("nats", token, 4, Utc::now()).await.unwrap());
    assert!(
        !events
            .advance_channel("nats", Uuid::now_v7(), 9, Utc::now())
            .await
            .unwrap(),
        "fenced"
    );
    let future = Utc::now() + chrono::Duration::days(1);
    assert_eq!(events.prune_events(future, 3).await.unwrap(), 3);
    assert_eq!(events.prune_events(future, 3).await.unwrap(), 1);
    assert_eq!(events.prune_events(future, 3).await.unwrap(), 0);
    let bounds = events.event_bounds().await.unwrap();
    assert_eq!((bounds.oldest, bounds.last), (Some(5), 10));
    let backlog = events.channel_backlog("nats", Utc::now()).await.unwrap().unwrap();
    assert_eq!((backlog.published_through, backlog.unpublished), (4, 6));
    let report = store.audit().await.unwrap();
    assert!(report.is_clean(), "pruned events are not a gap: {report}");

    // An order whose events were pruned goes on numbering where it was.
    emit(store.as_ref(), ids[0]).await;
    stamp_all(store.as_ref()).await;
    let latest = events
        .events_after(&EventQuery {
            after: 10,
            limit: 10,
            types: None,
        })
        .await
        .unwrap();
    assert_eq!(
        (latest[0].subject.clone(), latest[0].sequence),
        (format!("orders/{}", ids[0]), 2)
    );
}

/// An endpoint with 3,500 deliveries (some with failed attempts) is deleted and 3,510 events with
/// their other 3,510 deliveries are pruned, each in transactions of at most 3,000 changed rows:
/// on the emulated DSQL a transaction over the limit fails (checked first), so completing is the
/// proof. Nothing is left behind, and the other endpoint keeps its deliveries until pruning.
async fn deleting_and_pruning_stay_within_the_row_limit(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let events = store.events();
    let ids = orders(store.as_ref(), 10).await;
    assert_eq!(
        stamp_all(store.as_ref()).await,
        10,
        "the orders' own events, before any endpoint"
    );
    let (doomed, kept) = (
        endpoint(store.as_ref(), &["*"]).await,
        endpoint(store.as_ref(), &["*"]).await,
    );
    for order in &ids {
        // 350 events in one step's transaction.
        let effects = StepEffects {
            order_id: Some(*order),
            emit: (0..350).map(|_| NewEvent::new(EventType::PaymentCaptured)).collect(),
            ..Default::default()
        };
        store.complete_job(None, &effects, Utc::now()).await.unwrap();
    }
    assert_eq!(stamp_all(store.as_ref()).await, 3_500);
    assert_eq!(db.count("SELECT count(*) FROM webhook_deliveries").await, 7_000);
    // Three rounds of failed attempts on each endpoint (one delivery per order at a time).
    for hook in [doomed, kept] {
        for _ in 0..3 {
            let claims = events
                .claim_deliveries(hook, 100, Duration::from_secs(60), Utc::now())
                .await
                .unwrap();
            assert_eq!(claims.len(), ids.len());
            for claim in &claims {
                let retry = AttemptVerdict::RetryAt(Utc::now() - chrono::Duration::seconds(1));
                let recorded = events.record_attempt(&record(claim, hook, retry), Utc::now()).await;
                assert_eq!(recorded.unwrap(), AttemptRecorded::Recorded);
            }
        }
    }
    assert_eq!(db.count("SELECT count(*) FROM webhook_attempts").await, 60);
    if backend == Backend::Dsql {
        // The emulation's limit bites: one statement over it fails.
        let mut conn = db.pg_connection().await;
        sqlx::query(&format!("SET orderflow_test.row_limit = '{}'", common::ROW_LIMIT))
            .execute(&mut conn)
            .await
            .unwrap();
        let over = sqlx::query("UPDATE webhook_deliveries SET updated_at = updated_at WHERE endpoint_id = $1")
            .bind(doomed)
            .execute(&mut conn)
            .await
            .expect_err("3,500 changed rows are over DSQL's limit");
        assert!(over.to_string().contains("row limit exceeded"), "{over}");
    }

    assert!(events.delete_endpoint(doomed).await.unwrap());
    assert!(events.get_endpoint(doomed).await.unwrap().is_none());
    assert!(!events.delete_endpoint(doomed).await.unwrap(), "gone already");
    assert_eq!(db.count("SELECT count(*) FROM webhook_deliveries").await, 3_500);
    assert_eq!(db.count("SELECT count(*) FROM webhook_attempts").await, 30);

    let future = Utc::now() + chrono::Duration::days(1);
    let mut pruned = 0;
    loop {
        let deleted = events.prune_events(future, 1000).await.unwrap();
        if deleted == 0 {
            break;
        }
        pruned += deleted;
    }
    assert_eq!(pruned, 3_510);
    for table in ["events", "webhook_deliveries", "webhook_attempts"] {
        assert_eq!(db.count(&format!("SELECT count(*) FROM {table}")).await, 0, "{table}");
    }
    assert!(events.get_endpoint(kept).await.unwrap().is_some());
    let report = store.audit().await.unwrap();
    assert!(report.is_clean(), "{report}");
}

/// The audit's events checks: a deleted event and a renumbered position are both caught.
async fn audit_catches_missing_and_gapped_events(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let ids = orders(store.as_ref(), 3).await;
    emit(store.as_ref(), ids[0]).await;
    emit(store.as_ref(), ids[0]).await;
    stamp_all(store.as_ref()).await;
    let report = store.audit().await.unwrap();
    assert!(report.is_clean(), "{report}");
    db.tamper(&format!(
        "DELETE FROM events WHERE event_type = 'order.placed' AND subject = 'orders/{}'",
        ids[1]
    ))
    .await;
    db.tamper("UPDATE events SET position = position + 100 WHERE sequence = 3")
        .await;
    let report = store.audit().await.unwrap();
    let broken: Vec<&str> = report.violations.iter().map(|v| v.check).collect();
    assert!(broken.contains(&"order_changes_have_events"), "{report}");
    assert!(broken.contains(&"events_positions_gap_free"), "{report}");
    let _ = ids;
}
