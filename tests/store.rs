//! Store-level behaviour written once and run against SQLite and PostgreSQL: atomic placement,
//! idempotency outcomes, stock adjustments racing orders, conflicts, and the audit catching each
//! kind of broken invariant.

mod common;

use std::sync::Arc;

use chrono::Utc;
use common::{Backend, TestDb};
use orderflow::domain::{
    Cart, CartLine, CartRejection, Currency, CustomerId, Email, Money, NewCustomer, NewProduct, OrderId, PaymentToken,
    ProductId, Quantity, StockAdjustment,
};
use orderflow::store::{AdjustOutcome, NewJob, PlaceOrder, PlaceOrderOutcome, Store, StoreError};
use serde_json::json;
use sqlx::Connection;

on_every_backend!(
    placement_is_all_or_nothing,
    shared_checkout_commit_answers_each_alone,
    a_shared_commit_of_large_carts_stays_within_the_row_limit,
    idempotency_outcomes,
    adjustments_race_orders_without_breaking_invariants,
    customer_conflicts_are_classified,
    audit_catches_each_broken_invariant,
    migrations_are_safe_to_rerun_concurrently,
    old_idempotency_keys_are_forgotten_in_bounded_batches,
    audit_sees_keys_forgotten_by_halves,
    steps_reading_orders_at_once_each_get_theirs,
);

async fn product(store: &dyn Store, price: i64, stock: i64) -> ProductId {
    let new = NewProduct {
        id: ProductId::new(),
        sku: None,
        name: "Thing".into(),
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

fn request(customer: CustomerId, key: &str, lines: &[(ProductId, i64)]) -> PlaceOrder {
    let now = orderflow::clock::now();
    let order_id = OrderId::new();
    let cart = Cart::new(
        lines
            .iter()
            .map(|(id, q)| CartLine {
                product_id: *id,
                quantity: Quantity::parse(*q).unwrap(),
            })
            .collect(),
    )
    .unwrap();
    PlaceOrder {
        principal: customer.to_string(),
        idempotency_key: key.into(),
        fingerprint: format!("{lines:?}"),
        order_id,
        customer_id: customer,
        cart,
        payment_token: PaymentToken::default_sandbox(),
        shipping: None,
        currency: Currency::USD,
        correlation_id: Some("test".into()),
        region: None,
        first_job: NewJob {
            kind: "charge_payment",
            payload: json!({"order_id": order_id}),
            run_at: now,
            max_attempts: 3,
        },
        now,
    }
}

async fn available(store: &dyn Store, id: ProductId) -> i64 {
    store.get_product(id).await.unwrap().unwrap().available()
}

async fn placement_is_all_or_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let (a, b) = (
        product(store.as_ref(), 100, 5).await,
        product(store.as_ref(), 250, 1).await,
    );
    let buyer = customer(store.as_ref()).await;

    let short = store
        .place_order(&request(buyer, "k", &[(a, 2), (b, 2)]))
        .await
        .unwrap();
    let PlaceOrderOutcome::Rejected(CartRejection::InsufficientStock(shortages)) = short else {
        panic!("expected a shortage, got {short:?}")
    };
    assert_eq!(
        (shortages.len(), shortages[0].product_id, shortages[0].available),
        (1, b, 1)
    );
    assert_eq!(available(store.as_ref(), a).await, 5, "the good line was not reserved");

    let ghost = ProductId::new();
    let unknown = store
        .place_order(&request(buyer, "k", &[(a, 1), (ghost, 1)]))
        .await
        .unwrap();
    assert_eq!(
        unknown,
        PlaceOrderOutcome::Rejected(CartRejection::UnknownProducts(vec![ghost]))
    );
    let nobody = CustomerId::new();
    let mut no_customer = request(nobody, "k", &[(a, 1)]);
    no_customer.principal = buyer.to_string();
    assert_eq!(
        store.place_order(&no_customer).await.unwrap(),
        PlaceOrderOutcome::Rejected(CartRejection::UnknownCustomer(nobody))
    );
    assert_eq!(available(store.as_ref(), a).await, 5);

    // The refused attempts left the key free: the same key now places the order.
    let placed = store
        .place_order(&request(buyer, "k", &[(a, 2), (b, 1)]))
        .await
        .unwrap();
    let PlaceOrderOutcome::Created(order) = placed else {
        panic!("expected an order, got {placed:?}")
    };
    assert_eq!(order.total.minor(), 2 * 100 + 250);
    assert_eq!(
        (available(store.as_ref(), a).await, available(store.as_ref(), b).await),
        (3, 0)
    );
    let details = store.get_order(order.id).await.unwrap().unwrap();
    assert_eq!(details.order, order);
    assert_eq!(details.events.len(), 1);
    let jobs = store.jobs_for_order(order.id).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].kind, "charge_payment");
    assert!(store.audit().await.unwrap().is_clean());
}

/// Checkouts sharing one transaction (as concurrent ones do): each is priced against the stock
/// the ones before it left and answered on its own — the one short of stock is refused alone,
/// the others are committed together; an unknown customer (whose foreign key would fail the
/// whole statement) makes the group be written one by one, with the same answers.
/// Forty checkouts of 100 lines each arrive together: about 4,300 changed rows. PostgreSQL and
/// SQLite write them in one transaction; the distributed-SQL profile, whose transactions change
/// at most 3,000 rows (the emulated database refuses the one over), in as few as fit — two —
/// not one refused and then forty alone.
async fn a_shared_commit_of_large_carts_stays_within_the_row_limit(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let buyer = customer(store.as_ref()).await;
    let mut products = Vec::new();
    for _ in 0..100 {
        products.push(product(store.as_ref(), 10, 40).await);
    }
    let lines: Vec<(ProductId, i64)> = products.iter().map(|&product| (product, 1)).collect();
    let group: Vec<PlaceOrder> = (0..40).map(|i| request(buyer, &format!("big-{i}"), &lines)).collect();
    for answer in store.place_orders(&group).await {
        assert!(matches!(answer, Ok(PlaceOrderOutcome::Created(_))), "{answer:?}");
    }
    for &product in &products {
        assert_eq!(available(store.as_ref(), product).await, 0, "every unit sold once");
    }
    if backend.is_postgres() {
        let transactions = db.count("SELECT count(DISTINCT xmin::text) FROM orders").await;
        let expected = if backend == Backend::Dsql { 2 } else { 1 };
        assert_eq!(transactions, expected, "transactions that wrote the 40 orders");
    }
    assert!(store.audit().await.unwrap().is_clean());
}

async fn shared_checkout_commit_answers_each_alone(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let item = product(store.as_ref(), 250, 5).await;
    let (first, second, third) = (
        customer(store.as_ref()).await,
        customer(store.as_ref()).await,
        customer(store.as_ref()).await,
    );
    let group = [
        request(first, "a", &[(item, 2)]),
        // 3 left: short.
        request(second, "b", &[(item, 4)]),
        request(third, "c", &[(item, 3)]),
    ];
    let answers = store.place_orders(&group).await;
    let answers: Vec<PlaceOrderOutcome> = answers.into_iter().map(Result::unwrap).collect();
    let PlaceOrderOutcome::Created(a) = &answers[0] else {
        panic!("{answers:?}")
    };
    let PlaceOrderOutcome::Rejected(CartRejection::InsufficientStock(short)) = &answers[1] else {
        panic!("{answers:?}")
    };
    assert_eq!((short[0].requested, short[0].available), (4, 3));
    let PlaceOrderOutcome::Created(c) = &answers[2] else {
        panic!("{answers:?}")
    };
    assert_eq!((a.total.minor(), c.total.minor()), (500, 750));
    assert_eq!(
        available(store.as_ref(), item).await,
        0,
        "2 + 3 reserved, nothing oversold"
    );
    for order in [a, c] {
        let details = store.get_order(order.id).await.unwrap().unwrap();
        assert_eq!(&details.order, order);
        assert_eq!(store.jobs_for_order(order.id).await.unwrap().len(), 1);
    }
    if backend.is_postgres() {
        // One transaction wrote both orders (and only one commit was paid for them).
        let mut conn = db.pg_connection().await;
        let (transactions,): (i64,) = sqlx::query_as("SELECT count(DISTINCT xmin::text) FROM orders")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(transactions, 1);
    }
    // Each key's outcome stands alone: the accepted replay, the refused one's key is free.
    assert_eq!(
        store.place_order(&group[0]).await.unwrap(),
        PlaceOrderOutcome::Replayed(a.clone())
    );
    let refused_again = store.place_order(&request(second, "b", &[(item, 1)])).await.unwrap();
    assert!(
        matches!(
            refused_again,
            PlaceOrderOutcome::Rejected(CartRejection::InsufficientStock(_))
        ),
        "{refused_again:?}"
    );

    // An unknown customer in the middle of a group, and a key sent twice in it.
    let more = product(store.as_ref(), 100, 10).await;
    let nobody = CustomerId::new();
    let mut ghost = request(nobody, "g", &[(more, 1)]);
    ghost.principal = first.to_string();
    let group = [
        request(first, "d", &[(more, 4)]),
        ghost,
        request(second, "e", &[(more, 5)]),
        request(first, "d", &[(more, 4)]),
    ];
    let answers: Vec<PlaceOrderOutcome> = store
        .place_orders(&group)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(matches!(answers[0], PlaceOrderOutcome::Created(_)), "{answers:?}");
    assert_eq!(
        answers[1],
        PlaceOrderOutcome::Rejected(CartRejection::UnknownCustomer(nobody))
    );
    assert!(matches!(answers[2], PlaceOrderOutcome::Created(_)), "{answers:?}");
    assert_eq!(answers[3], PlaceOrderOutcome::KeyInUse, "the same key twice at once");
    assert_eq!(available(store.as_ref(), more).await, 1);
    assert!(store.audit().await.unwrap().is_clean());
}

async fn idempotency_outcomes(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let item = product(store.as_ref(), 100, 10).await;
    let buyer = customer(store.as_ref()).await;
    let first = request(buyer, "same", &[(item, 1)]);
    let PlaceOrderOutcome::Created(order) = store.place_order(&first).await.unwrap() else {
        panic!("not created")
    };

    // A retry (new order id, new clock) replays the first order exactly.
    let retry = request(buyer, "same", &[(item, 1)]);
    assert_eq!(
        store.place_order(&retry).await.unwrap(),
        PlaceOrderOutcome::Replayed(order.clone())
    );
    let different = request(buyer, "same", &[(item, 2)]);
    assert_eq!(
        store.place_order(&different).await.unwrap(),
        PlaceOrderOutcome::KeyReused
    );
    assert_eq!(available(store.as_ref(), item).await, 9);

    // The same key from another principal is another order.
    let other = customer(store.as_ref()).await;
    assert!(matches!(
        store.place_order(&request(other, "same", &[(item, 1)])).await.unwrap(),
        PlaceOrderOutcome::Created(_)
    ));
    assert!(store.audit().await.unwrap().is_clean());
}

async fn adjustments_race_orders_without_breaking_invariants(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let item = product(store.as_ref(), 100, 60).await;
    let buyer = customer(store.as_ref()).await;
    let mut tasks = Vec::new();
    for n in 0..50 {
        let adjuster: Arc<dyn Store> = store.clone();
        tasks.push(tokio::spawn(async move {
            let adjustment = StockAdjustment {
                delta: -1,
                reason: format!("shrinkage {n}"),
            };
            match adjuster.adjust_stock(item, &adjustment, Utc::now()).await.unwrap() {
                AdjustOutcome::Adjusted(_) => 1,
                AdjustOutcome::WouldBreakReservations { .. } => 0,
                AdjustOutcome::NotFound => panic!("product vanished"),
            }
        }));
        let buyer_store: Arc<dyn Store> = store.clone();
        tasks.push(tokio::spawn(async move {
            match buyer_store
                .place_order(&request(buyer, &format!("race-{n}"), &[(item, 1)]))
                .await
                .unwrap()
            {
                PlaceOrderOutcome::Created(_) => 100,
                PlaceOrderOutcome::Rejected(CartRejection::InsufficientStock(_)) => 0,
                other => panic!("unexpected {other:?}"),
            }
        }));
    }
    let mut adjusted = 0;
    let mut ordered = 0;
    for task in tasks {
        match task.await.unwrap() {
            1 => adjusted += 1,
            100 => ordered += 1,
            _ => {}
        }
    }
    let product = store.get_product(item).await.unwrap().unwrap();
    assert_eq!(product.on_hand, 60 - adjusted);
    assert_eq!(product.reserved, ordered);
    assert!(product.reserved <= product.on_hand);
    assert_eq!(adjusted + ordered, 60, "every unit went to exactly one of the racers");
    let report = store.audit().await.unwrap();
    assert!(report.is_clean(), "{report}");
}

async fn customer_conflicts_are_classified(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let id = customer(store.as_ref()).await;
    let same_email = NewCustomer {
        id: CustomerId::new(),
        email: Email::parse(&format!("{}@EXAMPLE.com", id)).unwrap(),
        first_name: "C".into(),
        last_name: "D".into(),
    };
    assert!(matches!(
        store.create_customer(&same_email, Utc::now()).await,
        Err(StoreError::Conflict("email"))
    ));
    let same_id = NewCustomer {
        id,
        email: Email::parse("fresh@example.com").unwrap(),
        first_name: "C".into(),
        last_name: "D".into(),
    };
    assert!(matches!(
        store.create_customer(&same_id, Utc::now()).await,
        Err(StoreError::Conflict("customer_id"))
    ));
}

async fn audit_catches_each_broken_invariant(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let item = product(store.as_ref(), 100, 10).await;
    let buyer = customer(store.as_ref()).await;
    store.place_order(&request(buyer, "a", &[(item, 2)])).await.unwrap();
    assert!(store.audit().await.unwrap().is_clean());

    if backend.is_postgres() {
        // The table refuses oversell outright; drop that guard to prove the audit sees it too.
        db.tamper("ALTER TABLE products DROP CONSTRAINT products_no_oversell")
            .await;
    }
    let cases = [
        (
            "UPDATE products SET on_hand = on_hand + 1",
            "UPDATE products SET on_hand = on_hand - 1",
            "stock_conservation",
        ),
        (
            "UPDATE products SET reserved = reserved + 1",
            "UPDATE products SET reserved = reserved - 1",
            "reservations_explained",
        ),
        (
            "UPDATE products SET reserved = on_hand + 5",
            "UPDATE products SET reserved = 2",
            "no_oversell",
        ),
        (
            "UPDATE orders SET total_minor = total_minor + 1",
            "UPDATE orders SET total_minor = total_minor - 1",
            "order_totals",
        ),
        (
            "UPDATE orders SET status = 'paid'",
            "UPDATE orders SET status = 'pending_payment'",
            "status_has_event",
        ),
        (
            "UPDATE idempotency_keys SET key = 'b'",
            "UPDATE idempotency_keys SET key = 'a'",
            "key_records_match_orders",
        ),
    ];
    for (break_it, mend_it, check) in cases {
        db.tamper(break_it).await;
        let report = store.audit().await.unwrap();
        assert!(
            report.violations.iter().any(|v| v.check == check),
            "{check} not caught:\n{report}"
        );
        assert!(report.to_string().contains(&format!("FAIL {check}")));
        db.tamper(mend_it).await;
        assert!(
            store.audit().await.unwrap().is_clean(),
            "mending {check} restored a clean audit"
        );
    }
}

async fn migrations_are_safe_to_rerun_concurrently(backend: Backend) {
    let db = TestDb::new(backend).await;
    let opens: Vec<_> = (0..3)
        .map(|_| {
            let url = db.url().to_string();
            tokio::spawn(async move {
                let options = orderflow::store::ConnectOptions {
                    profile: backend.profile(),
                    ..common::connect_options()
                };
                orderflow::store::connect(&url, &options).await.map(|_| ())
            })
        })
        .collect();
    for open in opens {
        open.await
            .unwrap()
            .expect("several processes starting at once all migrate cleanly");
    }
    let store = db.connect().await;
    assert!(store.is_empty().await.unwrap());
}

/// Keys past the retention are forgotten a bounded batch per call, oldest first, their orders
/// kept whole; newer keys still replay; a forgotten key places a new order.
async fn old_idempotency_keys_are_forgotten_in_bounded_batches(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let item = product(store.as_ref(), 100, 20).await;
    let buyer = customer(store.as_ref()).await;
    let now = orderflow::clock::now();
    let mut old = Vec::new();
    for n in 0..5 {
        let mut placed = request(buyer, &format!("old-{n}"), &[(item, 1)]);
        placed.now = now - chrono::Duration::hours(48) + chrono::Duration::seconds(n);
        let PlaceOrderOutcome::Created(order) = store.place_order(&placed).await.unwrap() else {
            panic!("not created")
        };
        old.push(order);
    }
    let fresh = request(buyer, "fresh", &[(item, 1)]);
    let PlaceOrderOutcome::Created(fresh_order) = store.place_order(&fresh).await.unwrap() else {
        panic!("not created")
    };
    let remembered = "SELECT count(*) FROM idempotency_keys";
    let keyless = "SELECT count(*) FROM orders WHERE idempotency_key IS NULL";
    assert_eq!((db.count(remembered).await, db.count(keyless).await), (6, 0));

    let before = now - chrono::Duration::hours(24);
    let mut batches = Vec::new();
    loop {
        let forgotten = store.forget_idempotency_keys(before, 2).await.unwrap();
        batches.push(forgotten);
        // After each call, the records and the orders' keys went together.
        assert_eq!(db.count(remembered).await + db.count(keyless).await, 6);
        if forgotten == 0 {
            break;
        }
    }
    assert_eq!(batches, [2, 2, 1, 0], "at most a batch per call, until none is left");
    assert_eq!(db.count(remembered).await, 1, "the fresh key is kept");
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 6, "no order was deleted");
    for order in &old {
        assert_eq!(&store.get_order(order.id).await.unwrap().unwrap().order, order);
    }
    assert!(store.audit().await.unwrap().is_clean());

    // The fresh key still replays its order; a forgotten one is a new checkout.
    assert_eq!(
        store.place_order(&request(buyer, "fresh", &[(item, 1)])).await.unwrap(),
        PlaceOrderOutcome::Replayed(fresh_order)
    );
    let again = request(buyer, "old-0", &[(item, 1)]);
    let PlaceOrderOutcome::Created(second) = store.place_order(&again).await.unwrap() else {
        panic!("a forgotten key places a new order")
    };
    assert_ne!(second.id, old[0].id);
    assert_eq!(
        store.place_order(&request(buyer, "old-0", &[(item, 1)])).await.unwrap(),
        PlaceOrderOutcome::Replayed(second),
        "and is remembered again from then on"
    );
    assert_eq!(available(store.as_ref(), item).await, 20 - 7);
    assert!(store.audit().await.unwrap().is_clean());
}

/// The I3 checks after the pruner's two halves were split (a record deleted without its order's
/// key cleared, or the reverse) and when the database's own guard is gone (two orders under one
/// remembered key).
async fn audit_sees_keys_forgotten_by_halves(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let item = product(store.as_ref(), 100, 10).await;
    let buyer = customer(store.as_ref()).await;
    store.place_order(&request(buyer, "a", &[(item, 1)])).await.unwrap();
    store.place_order(&request(buyer, "b", &[(item, 1)])).await.unwrap();
    let caught = |check: &'static str| {
        let store = store.clone();
        async move {
            let report = store.audit().await.unwrap();
            assert!(
                report.violations.iter().any(|v| v.check == check),
                "{check} not caught:\n{report}"
            );
        }
    };
    db.tamper("UPDATE orders SET idempotency_key = NULL WHERE idempotency_key = 'a'")
        .await;
    caught("key_records_match_orders").await;
    db.tamper("UPDATE orders SET idempotency_key = 'a' WHERE idempotency_key IS NULL")
        .await;
    assert!(store.audit().await.unwrap().is_clean());
    db.tamper("DELETE FROM idempotency_keys WHERE key = 'b'").await;
    caught("key_records_match_orders").await;

    // Without the unique constraint (SQLite's cannot be dropped), two orders under one key are
    // the audit's to find.
    if backend.is_postgres() {
        db.tamper("ALTER TABLE orders DROP CONSTRAINT orders_idempotency_principal_idempotency_key_key")
            .await;
        db.tamper("UPDATE orders SET idempotency_key = 'a'").await;
        caught("one_order_per_key").await;
    }
}

mod postgres_only {
    use super::*;

    async fn insert_claim(db: &TestDb, principal: &str, fingerprint: &str, age_secs: i64) {
        let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
        let at = Utc::now() - chrono::Duration::seconds(age_secs);
        sqlx::query(
            "INSERT INTO idempotency_keys (principal, key, fingerprint, state, lock_token, created_at, updated_at) \
             VALUES ($1, 'k', $2, 'in_flight', $3, $4, $4)",
        )
        .bind(principal)
        .bind(fingerprint)
        .bind(uuid::Uuid::now_v7())
        .bind(at)
        .execute(&mut conn)
        .await
        .unwrap();
    }

    /// A claim left by a process that died mid-request is taken over once stale; a fresh one
    /// answers "in use"; a different request under the key is refused either way.
    #[tokio::test]
    async fn stale_in_flight_claims_are_taken_over() {
        let db = TestDb::new(Backend::Postgres).await;
        let store = db.connect().await;
        let item = product(store.as_ref(), 100, 10).await;
        let (fresh, stale) = (customer(store.as_ref()).await, customer(store.as_ref()).await);
        let fresh_request = request(fresh, "k", &[(item, 1)]);
        let stale_request = request(stale, "k", &[(item, 1)]);
        insert_claim(&db, &fresh.to_string(), &fresh_request.fingerprint, 1).await;
        insert_claim(&db, &stale.to_string(), &stale_request.fingerprint, 600).await;

        assert_eq!(
            store.place_order(&fresh_request).await.unwrap(),
            PlaceOrderOutcome::KeyInUse
        );
        assert_eq!(
            store.place_order(&request(fresh, "k", &[(item, 2)])).await.unwrap(),
            PlaceOrderOutcome::KeyReused
        );
        assert!(matches!(
            store.place_order(&stale_request).await.unwrap(),
            PlaceOrderOutcome::Created(_)
        ));
        assert!(store.audit().await.unwrap().is_clean());
    }
}

/// The distributed-SQL profile's own guarantees, on the shared PostgreSQL server.
mod dsql_profile {
    use super::*;

    /// The emulation is real: the database runs at snapshot isolation, a commit that changes a
    /// hot table fails with DSQL's conflict error when the injector draws it, and the store
    /// carries its writes through such failures.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn injected_conflicts_fail_commits_and_the_store_retries_them() {
        let db = TestDb::new_with_conflicts(Backend::Dsql, 0.5).await;
        let store = db.connect().await;
        let item = product(store.as_ref(), 100, 10).await;
        let mut conn = db.pg_connection().await;
        let (isolation,): (String,) = sqlx::query_as("SHOW transaction_isolation")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(isolation, "repeatable read", "snapshot isolation, as DSQL's");
        sqlx::query("SET orderflow_test.conflict_rate = '1'")
            .execute(&mut conn)
            .await
            .unwrap();
        let failed = sqlx::query("UPDATE products SET name = 'x' WHERE id = $1")
            .bind(item.as_uuid())
            .execute(&mut conn)
            .await
            .expect_err("the injector fails the commit");
        let sqlx::Error::Database(failed) = failed else {
            panic!("{failed}")
        };
        assert_eq!(failed.code().as_deref(), Some("40001"));
        assert!(failed.message().contains("(OC000)"), "{}", failed.message());
        // Half of the commits fail; every one of these writes still lands.
        for _ in 0..20 {
            product(store.as_ref(), 100, 10).await;
        }
        assert_eq!(db.count("SELECT count(*) FROM products").await, 21);
        assert!(store.audit().await.unwrap().is_clean());
    }

    /// Without foreign keys the audit still finds a row whose parent is missing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_audit_checks_the_references_the_schema_cannot() {
        let db = TestDb::new(Backend::Dsql).await;
        let store = db.connect().await;
        assert!(store.audit().await.unwrap().is_clean());
        db.tamper(
            "INSERT INTO webhook_attempts (id, delivery_id, attempted_at, latency_ms) \
             VALUES (gen_random_uuid(), gen_random_uuid(), now(), 1)",
        )
        .await;
        let report = store.audit().await.unwrap();
        assert!(
            report.violations.iter().any(|v| v.check == "references_resolve"),
            "{report}"
        );
    }

    /// Tables, columns and their types, defaults and checks (everything but indexes and foreign
    /// keys, which the profiles lay out differently on purpose).
    async fn schema(db: &TestDb) -> Vec<(String, String, String)> {
        let mut conn = db.pg_connection().await;
        sqlx::query_as(
            "SELECT table_name::text, column_name::text, \
                    data_type || ' ' || is_nullable || ' ' || coalesce(column_default, '') \
             FROM information_schema.columns WHERE table_schema = 'public' \
               AND table_name NOT IN ('_sqlx_migrations', '_orderflow_migrations') \
             UNION ALL \
             SELECT conrelid::regclass::text, conname::text, pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE connamespace = 'public'::regnamespace AND contype IN ('c', 'u', 'p') \
               AND conrelid::regclass::text NOT IN ('_sqlx_migrations', '_orderflow_migrations') \
             ORDER BY 1, 2, 3",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap()
    }

    /// Several processes migrating one fresh database at once with `migrations/dsql` (no advisory
    /// lock: each version claimed by a conditional insert) all succeed, each version is applied
    /// once, and the schema is the one `migrations/postgres` gives.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn dsql_migrations_run_concurrently_and_match_the_postgres_schema() {
        let (postgres, dsql) = (
            TestDb::new(Backend::Postgres).await,
            TestDb::new(Backend::Postgres).await,
        );
        drop(postgres.connect().await);
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let url = dsql.url().to_string();
                tokio::spawn(async move {
                    let options = orderflow::store::ConnectOptions {
                        profile: Backend::Dsql.profile(),
                        ..common::connect_options()
                    };
                    orderflow::store::connect(&url, &options).await.map(|_| ())
                })
            })
            .collect();
        for open in opens {
            open.await.unwrap().expect("every process migrates cleanly");
        }
        let files = std::fs::read_dir("migrations/dsql").unwrap().count() as i64;
        assert_eq!(
            dsql.count("SELECT count(*) FROM _orderflow_migrations WHERE applied_at IS NOT NULL")
                .await,
            files
        );
        assert_eq!(
            dsql.count("SELECT count(*) FROM pg_constraint WHERE contype = 'f'")
                .await,
            0
        );
        let (expected, found) = (schema(&postgres).await, schema(&dsql).await);
        let missing: Vec<_> = expected.iter().filter(|row| !found.contains(row)).collect();
        let extra: Vec<_> = found.iter().filter(|row| !expected.contains(row)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "the dsql schema differs from the postgres one:\nmissing {missing:#?}\nextra {extra:#?}"
        );
    }
}

/// Steps that read their orders at the same time (on PostgreSQL coalesced into shared
/// statements) each get their own order, the same order asked for twice (two steps of one order
/// starting together) included, and nothing for an order that does not exist.
async fn steps_reading_orders_at_once_each_get_theirs(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let lamp = product(store.as_ref(), 100, 100).await;
    let buyer = customer(store.as_ref()).await;
    let mut orders = Vec::new();
    for n in 0..6 {
        let placed = store
            .place_order(&request(buyer, &format!("read-{n}"), &[(lamp, n + 1)]))
            .await
            .unwrap();
        let PlaceOrderOutcome::Created(order) = placed else {
            panic!("expected an order, got {placed:?}")
        };
        orders.push(order);
    }
    let ghost = OrderId::new();
    // Each order asked for by eight steps at once, the ghost by two.
    let asked: Vec<OrderId> = (0..8)
        .flat_map(|_| orders.iter().map(|order| order.id))
        .chain([ghost, ghost])
        .collect();
    let mut reads = tokio::task::JoinSet::new();
    for &id in &asked {
        let store = store.clone();
        reads.spawn(async move { (id, store.step_order(id).await) });
    }
    while let Some(joined) = reads.join_next().await {
        let (id, read) = joined.unwrap();
        let id = &id;
        let read = read.unwrap();
        if *id == ghost {
            assert!(read.is_none(), "{read:?}");
            continue;
        }
        let read = read.unwrap_or_else(|| panic!("order {id} not found"));
        let placed = orders.iter().find(|order| order.id == *id).unwrap();
        assert_eq!(read.order.id, placed.id);
        assert_eq!(read.order.lines, placed.lines, "{id}: its own lines");
    }
}
