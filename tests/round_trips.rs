//! A checkout costs PostgreSQL two round trips (issue 12.2): the idempotency claim with the
//! cart's stock, then one autocommitted statement that writes the order. Counted on the wire by
//! a proxy between the store and the server (tests/support/latency_proxy.rs), which also holds
//! the write back while another process changes the price or the stock in between: the order
//! written then charges the price it was written with, never oversells, and a checkout refused
//! against the first read is accepted when stock came back before the write.
//!
//! The writes a step's completion sends together lock their product rows in id order first, as
//! checkout does (no deadlock between them).
//!
//! PostgreSQL only: SQLite is embedded, no round trips, one writer.

mod common;
#[path = "support/latency_proxy.rs"]
mod latency_proxy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use common::{Backend, TestDb};
use latency_proxy::{Hold, LatencyProxy, PING, PREPARE};
use orderflow::domain::order::{Cart, CartLine, Quantity};
use orderflow::domain::{
    CartRejection, Currency, CustomerId, Email, Money, NewCustomer, NewProduct, OrderId, PaymentToken, ProductId,
    ProductPatch, StockAdjustment,
};
use orderflow::store::{self, AdjustOutcome, NewJob, PlaceOrder, PlaceOrderOutcome, Store};
use serde_json::json;

/// The server the test database lives on, as a socket address for the proxy.
fn server_addr(_db: &TestDb) -> SocketAddr {
    let server = common::pg_server_url();
    let host_port = server
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("ORDERFLOW_TEST_DATABASE_URL looks like postgres://user@host:port/db");
    let host_port = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:5432")
    };
    host_port
        .replace("localhost", "127.0.0.1")
        .parse()
        .expect("a numeric host:port in ORDERFLOW_TEST_DATABASE_URL")
}

async fn through(proxy: &LatencyProxy, db: &TestDb) -> Arc<dyn Store> {
    store::connect(&proxy.url(db.url()), &common::connect_options())
        .await
        .expect("connect to the test database through the proxy")
}

async fn product(store: &dyn Store, price: i64, stock: i64) -> ProductId {
    let new = NewProduct {
        id: ProductId::new(),
        sku: None,
        name: "Lamp".into(),
        description: None,
        category: None,
        price: Money::from_minor(price).unwrap(),
        stock,
    };
    store.create_product(&new, Utc::now()).await.unwrap().id
}

async fn customer(store: &dyn Store) -> CustomerId {
    let id = CustomerId::new();
    let new = NewCustomer {
        id,
        email: Email::parse(&format!("{id}@example.com")).unwrap(),
        first_name: "A".into(),
        last_name: "B".into(),
    };
    store.create_customer(&new, Utc::now()).await.unwrap();
    id
}

fn request(customer: CustomerId, product: ProductId, quantity: i64) -> PlaceOrder {
    request_cart(customer, &[(product, quantity)])
}

fn request_cart(customer: CustomerId, lines: &[(ProductId, i64)]) -> PlaceOrder {
    let now = orderflow::clock::now();
    let order_id = OrderId::new();
    PlaceOrder {
        principal: customer.to_string(),
        idempotency_key: uuid::Uuid::now_v7().to_string(),
        fingerprint: format!("{lines:?}"),
        order_id,
        customer_id: customer,
        cart: Cart::new(
            lines
                .iter()
                .map(|&(product_id, quantity)| CartLine {
                    product_id,
                    quantity: Quantity::parse(quantity).unwrap(),
                })
                .collect(),
        )
        .unwrap(),
        payment_token: PaymentToken::default_sandbox(),
        shipping: None,
        region: None,
        currency: Currency::USD,
        correlation_id: None,
        first_job: NewJob {
            kind: "charge_payment",
            payload: json!({"order_id": order_id}),
            run_at: now,
            max_attempts: 3,
        },
        now,
    }
}

/// The checkout's own round trips among `trips`: not the coalesced NOTIFY that wakes other
/// processes' workers after a commit (sent by a background task, never waited on by the
/// request), nor pings (see below) and statements prepared on a connection's first use
/// (counted apart).
fn checkout_trips(trips: &[String]) -> Vec<String> {
    trips
        .iter()
        .filter(|trip| !trip.contains("pg_notify") && !trip.contains("LISTEN") && trip.as_str() != PING)
        .filter(|trip| !trip.starts_with(PREPARE))
        .map(|trip| trip.chars().take(60).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkout_takes_two_round_trips() {
    let db = TestDb::new(Backend::Postgres).await;
    let proxy = LatencyProxy::start(server_addr(&db), Duration::ZERO).await;
    let store = through(&proxy, &db).await;
    let (lamp, buyer) = (product(&*store, 250, 1000).await, customer(&*store).await);
    // Warm-up: each pooled connection prepares the statements once.
    for _ in 0..5 {
        let outcome = store.place_order(&request(buyer, lamp, 1)).await.unwrap();
        assert!(matches!(outcome, PlaceOrderOutcome::Created(_)), "{outcome:?}");
    }
    const CHECKOUTS: usize = 20;
    let before = proxy.count();
    for _ in 0..CHECKOUTS {
        let outcome = store.place_order(&request(buyer, lamp, 2)).await.unwrap();
        assert!(matches!(outcome, PlaceOrderOutcome::Created(_)), "{outcome:?}");
    }
    let trips = proxy.round_trips()[before..].to_vec();
    let checkout = checkout_trips(&trips);
    assert!(
        checkout.len() <= 2 * CHECKOUTS,
        "{} checkouts took {} round trips (at most 2 each): {checkout:#?}",
        CHECKOUTS,
        checkout.len()
    );
    // Not counted: sqlx pings each connection as it goes back to the pool, from a background
    // task after the statement's answer was delivered (the request does not wait on it; the
    // pool only lends another connection meanwhile), and a connection idle for a second before
    // it is lent. Each statement is prepared once per pooled connection.
    let prepared = trips
        .iter()
        .filter(|trip| trip.starts_with(PREPARE) && !trip.contains("pg_notify"))
        .count();
    assert!(
        prepared <= 2 * 3,
        "{prepared} statements prepared again after the warm-up"
    );
    // A refusal costs the claim and giving the key back.
    let before = proxy.count();
    let outcome = store.place_order(&request(buyer, lamp, 1000)).await.unwrap();
    assert!(matches!(
        outcome,
        PlaceOrderOutcome::Rejected(CartRejection::InsufficientStock(_))
    ));
    let refused = proxy.round_trips()[before..].to_vec();
    assert!(checkout_trips(&refused).len() <= 2, "{refused:#?}");
    assert_eq!(
        store.get_product(lamp).await.unwrap().unwrap().reserved,
        5 + 2 * CHECKOUTS as i64
    );
    assert!(store.audit().await.unwrap().is_clean());
}

/// Behind a transaction pooler (`--database-pooler transaction`) every statement is prepared
/// anew and runs in a transaction of its own: the claim is BEGIN, prepare, execute, COMMIT; the
/// write the same. Counted here with the proxy in place of the pooler (docs/scale-out.md
/// "PgBouncer and transaction poolers").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn behind_a_transaction_pooler_a_checkout_takes_eight_round_trips() {
    let db = TestDb::new(Backend::Postgres).await;
    let proxy = LatencyProxy::start(server_addr(&db), Duration::ZERO).await;
    let options = store::ConnectOptions {
        pooler: store::DatabasePooler::Transaction,
        ..common::connect_options()
    };
    let store = store::connect(&proxy.url(db.url()), &options)
        .await
        .expect("connect to the test database through the proxy");
    let (lamp, buyer) = (product(&*store, 250, 1000).await, customer(&*store).await);
    for _ in 0..5 {
        let outcome = store.place_order(&request(buyer, lamp, 1)).await.unwrap();
        assert!(matches!(outcome, PlaceOrderOutcome::Created(_)), "{outcome:?}");
    }
    const CHECKOUTS: usize = 20;
    let before = proxy.count();
    for _ in 0..CHECKOUTS {
        let outcome = store.place_order(&request(buyer, lamp, 2)).await.unwrap();
        assert!(matches!(outcome, PlaceOrderOutcome::Created(_)), "{outcome:?}");
    }
    let trips: Vec<String> = proxy.round_trips()[before..]
        .iter()
        .filter(|trip| trip.as_str() != PING)
        .map(|trip| trip.chars().take(60).collect())
        .collect();
    assert!(
        !trips
            .iter()
            .any(|trip| trip.contains("pg_notify") || trip.contains("LISTEN")),
        "{trips:#?}"
    );
    assert_eq!(
        trips.len(),
        8 * CHECKOUTS,
        "{} checkouts took {} round trips (8 each expected): {trips:#?}",
        CHECKOUTS,
        trips.len()
    );
    assert!(store.audit().await.unwrap().is_clean());
}

/// A proxy that, the first time the checkout's write statement is about to be forwarded, runs
/// `change` (on a store connected directly) and only then lets the write through.
async fn proxy_changing_before_the_write(
    db: &TestDb,
    direct: Arc<dyn Store>,
    change: impl Fn(Arc<dyn Store>) -> latency_proxy::Wait + Send + Sync + 'static,
) -> LatencyProxy {
    let done = Arc::new(AtomicBool::new(false));
    let change = Arc::new(change);
    let hold: Hold = Arc::new(move |sql: &str| {
        if !sql.contains("INSERT INTO orders") || done.swap(true, Ordering::SeqCst) {
            return None;
        }
        let change = change(direct.clone());
        Some(Box::pin(async move {
            // The old checkout held the product's row lock across its round trips: a change
            // waiting here would wait for the write this proxy holds back.
            tokio::time::timeout(Duration::from_secs(10), change)
                .await
                .expect("the change between the round trips waited 10 s for a lock the checkout holds");
        }) as latency_proxy::Wait)
    });
    LatencyProxy::start_with(server_addr(db), Duration::ZERO, Some(hold)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_price_changed_between_the_round_trips_is_the_price_charged() {
    let db = TestDb::new(Backend::Postgres).await;
    let direct = db.connect().await;
    let (lamp, buyer) = (product(&*direct, 250, 10).await, customer(&*direct).await);
    let proxy = proxy_changing_before_the_write(&db, direct.clone(), move |store| {
        Box::pin(async move {
            let patch = ProductPatch {
                name: None,
                description: None,
                category: None,
                price: Some(Money::from_minor(300).unwrap()),
            };
            store.update_product(lamp, &patch, Utc::now()).await.unwrap().unwrap();
        })
    })
    .await;
    let store = through(&proxy, &db).await;
    let outcome = store.place_order(&request(buyer, lamp, 2)).await.unwrap();
    let PlaceOrderOutcome::Created(order) = outcome else {
        panic!("{outcome:?}")
    };
    // Priced from the claim's read at 2.50, written after the price became 3.00: the write
    // noticed and priced it again.
    assert_eq!(order.lines[0].unit_price.minor(), 300);
    assert_eq!(order.total.minor(), 600);
    let stored = direct.get_order(order.id).await.unwrap().unwrap();
    assert_eq!(stored.order.total.minor(), 600);
    assert_eq!(stored.order.lines[0].unit_price.minor(), 300);
    assert!(direct.audit().await.unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stock_sold_between_the_round_trips_is_never_oversold() {
    let db = TestDb::new(Backend::Postgres).await;
    let direct = db.connect().await;
    let (lamp, buyer) = (product(&*direct, 250, 3).await, customer(&*direct).await);
    // Another process sells 2 of the 3 units while this checkout of 2 is between its trips.
    let rival = request(buyer, lamp, 2);
    let proxy = proxy_changing_before_the_write(&db, direct.clone(), move |store| {
        let rival = rival.clone();
        Box::pin(async move {
            let outcome = store.place_order(&rival).await.unwrap();
            assert!(matches!(outcome, PlaceOrderOutcome::Created(_)), "{outcome:?}");
        })
    })
    .await;
    let store = through(&proxy, &db).await;
    let outcome = store.place_order(&request(buyer, lamp, 2)).await.unwrap();
    let PlaceOrderOutcome::Rejected(CartRejection::InsufficientStock(short)) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!((short[0].requested, short[0].available), (2, 1));
    let lamp_now = direct.get_product(lamp).await.unwrap().unwrap();
    assert_eq!((lamp_now.on_hand, lamp_now.reserved), (3, 2));
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 1);
    assert!(direct.audit().await.unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refusal_is_rechecked_when_stock_came_back_before_the_write() {
    let db = TestDb::new(Backend::Postgres).await;
    let direct = db.connect().await;
    let (lamp, buyer) = (product(&*direct, 250, 3).await, customer(&*direct).await);
    // Restocked while the group (2 fits, the next 2 does not) is between its trips.
    let proxy = proxy_changing_before_the_write(&db, direct.clone(), move |store| {
        Box::pin(async move {
            let restock = StockAdjustment {
                delta: 5,
                reason: "restock".into(),
            };
            let outcome = store.adjust_stock(lamp, &restock, Utc::now()).await.unwrap();
            assert!(matches!(outcome, AdjustOutcome::Adjusted(_)));
        })
    })
    .await;
    let store = through(&proxy, &db).await;
    let outcomes = store
        .place_orders(&[request(buyer, lamp, 2), request(buyer, lamp, 2)])
        .await;
    for outcome in &outcomes {
        assert!(matches!(outcome, Ok(PlaceOrderOutcome::Created(_))), "{outcomes:?}");
    }
    let lamp_now = direct.get_product(lamp).await.unwrap().unwrap();
    assert_eq!((lamp_now.on_hand, lamp_now.reserved), (8, 4));
    assert!(direct.audit().await.unwrap().is_clean());
}

/// Step completions that meet at the committer are written together (issue 11): a group costs
/// five round trips however many completions it holds — BEGIN, the jobs' lock, the orders' lock
/// with their lines, one statement with every completion's writes, COMMIT — where each written
/// alone in a savepoint cost five of its own. Eight orders of one product, paid together: the
/// product's stock is written once with all eight units (two writes of one row in one statement
/// would keep only one), and every order's events are numbered on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_of_step_completions_takes_five_round_trips() {
    use orderflow::domain::OrderStatus;
    use orderflow::store::jobs::CompleteOutcome;

    let db = TestDb::new(Backend::Postgres).await;
    let proxy = LatencyProxy::start(server_addr(&db), Duration::ZERO).await;
    let store = through(&proxy, &db).await;
    let (lamp, buyer) = (product(&*store, 250, 1000).await, customer(&*store).await);
    const GROUP: usize = 8;
    for _ in 0..GROUP {
        let outcome = store.place_order(&request(buyer, lamp, 1)).await.unwrap();
        assert!(matches!(outcome, PlaceOrderOutcome::Created(_)), "{outcome:?}");
    }
    let jobs = store
        .claim_jobs("charge_payment", GROUP as u32, Duration::from_secs(60), Utc::now())
        .await
        .unwrap();
    assert_eq!(jobs.len(), GROUP);
    let completions: Vec<_> = jobs.iter().map(|job| (Some(job.lease), paid(job.order_id))).collect();
    let before = proxy.count();
    let answers = store.complete_jobs(&completions, Utc::now()).await;
    let trips = checkout_trips(&proxy.round_trips()[before..]);
    assert!(
        answers
            .iter()
            .all(|answer| matches!(answer, Ok(CompleteOutcome::Completed))),
        "{answers:?}"
    );
    assert!(
        trips.len() <= 5,
        "{GROUP} completions took {} round trips (at most 5 together): {trips:#?}",
        trips.len()
    );
    let stock = store.get_product(lamp).await.unwrap().unwrap();
    assert_eq!(
        (stock.on_hand, stock.reserved),
        (1000 - GROUP as i64, 0),
        "every unit sold once"
    );
    for job in &jobs {
        let details = store.get_order(job.order_id.unwrap()).await.unwrap().unwrap();
        assert_eq!(details.order.status, OrderStatus::Paid);
    }
    let receipts = store
        .claim_jobs("send_receipt", 100, Duration::from_secs(60), Utc::now())
        .await
        .unwrap();
    assert_eq!(receipts.len(), GROUP, "each completion enqueued its next job");
    let audit = store.audit().await.unwrap();
    assert!(audit.is_clean(), "{audit:#?}");
}

/// What the payment step's completion writes: the order paid, its stock committed (sold), its
/// payment recorded (not the sandbox's, whose own books the audit holds payments against), its
/// event and its next job.
fn paid(order: Option<OrderId>) -> orderflow::store::jobs::StepEffects {
    use orderflow::domain::OrderStatus;
    use orderflow::domain::events::{EventType, NewEvent};
    use orderflow::store::jobs::{InventoryAction, PaymentChange, PaymentState, StepEffects};
    StepEffects {
        order_id: order,
        expect_status: vec![OrderStatus::PendingPayment],
        new_status: Some(OrderStatus::Paid),
        events: vec![
            ("payment_authorized".into(), None),
            ("inventory_committed".into(), None),
        ],
        inventory: Some(InventoryAction::Commit),
        payment: Some(PaymentChange {
            provider: "outside".into(),
            idempotency_key: format!("charge-{}", order.unwrap()),
            state: PaymentState::Authorized,
            provider_ref: Some(format!("pi_{}", order.unwrap().as_uuid().simple())),
            amount_minor: 250,
            captured_minor: 0,
            refunded_minor: 0,
            currency: "USD".into(),
            detail: None,
            client_secret: None,
        }),
        emit: vec![NewEvent::new(EventType::OrderPaid)],
        enqueue: vec![NewJob {
            kind: "send_receipt",
            payload: json!({ "order_id": order }),
            run_at: Utc::now(),
            max_attempts: 3,
        }],
        ..Default::default()
    }
}

/// A completion's writes are sent together, and PostgreSQL runs the statements of one batch in
/// an order it does not promise; checkout locks product rows in id order. A completion writing
/// two products must lock them in that order first, or it deadlocks with a checkout that holds
/// the first and wants the second (found only after `deadlock_timeout`). Here a transaction
/// stands in for that checkout: it holds the lower product while the payment step of an order of
/// both products (alone, then in a group with an order of the higher one) is written, and must
/// still find the higher one free. Without the lock the completion held it, waiting for the lower.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completions_lock_their_products_in_id_order_before_writing_stock() {
    use orderflow::store::jobs::CompleteOutcome;
    use sqlx::Connection;

    let db = TestDb::new(Backend::Postgres).await;
    let store = db.connect().await;
    let buyer = customer(&*store).await;
    let mut products = [product(&*store, 250, 100).await, product(&*store, 250, 100).await];
    products.sort_by_key(|product| product.as_uuid());
    let [low, high] = products;
    for group in [
        vec![vec![(low, 1), (high, 1)]],
        vec![vec![(low, 1), (high, 1)], vec![(high, 2)]],
    ] {
        for cart in &group {
            let outcome = store.place_order(&request_cart(buyer, cart)).await.unwrap();
            assert!(matches!(outcome, PlaceOrderOutcome::Created(_)), "{outcome:?}");
        }
        let jobs = store
            .claim_jobs("charge_payment", 10, Duration::from_secs(60), Utc::now())
            .await
            .unwrap();
        assert_eq!(jobs.len(), group.len());

        let mut checkout = sqlx::PgConnection::connect(db.url()).await.unwrap();
        sqlx::query("BEGIN").execute(&mut checkout).await.unwrap();
        sqlx::query("SELECT id FROM products WHERE id = $1 FOR UPDATE")
            .bind(low.as_uuid())
            .execute(&mut checkout)
            .await
            .unwrap();
        let completing = {
            let store = store.clone();
            let completions: Vec<_> = jobs.iter().map(|job| (Some(job.lease), paid(job.order_id))).collect();
            tokio::spawn(async move { store.complete_jobs(&completions, Utc::now()).await })
        };
        // The completion now waits for the lower product's lock.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while db
            .count(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .await
            == 0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the completion never waited for the lock"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let second = sqlx::query("SELECT id FROM products WHERE id = $1 FOR UPDATE NOWAIT")
            .bind(high.as_uuid())
            .execute(&mut checkout)
            .await;
        assert!(
            second.is_ok(),
            "a group of {}: the completion took the higher product before the lower: {second:?}",
            group.len()
        );
        sqlx::query("COMMIT").execute(&mut checkout).await.unwrap();
        let answers = completing.await.unwrap();
        assert!(
            answers
                .iter()
                .all(|answer| matches!(answer, Ok(CompleteOutcome::Completed))),
            "{answers:?}"
        );
    }
    let (low_now, high_now) = (
        store.get_product(low).await.unwrap().unwrap(),
        store.get_product(high).await.unwrap().unwrap(),
    );
    assert_eq!((low_now.on_hand, low_now.reserved), (98, 0));
    assert_eq!((high_now.on_hand, high_now.reserved), (96, 0));
    let audit = store.audit().await.unwrap();
    assert!(audit.is_clean(), "{audit:#?}");
}
