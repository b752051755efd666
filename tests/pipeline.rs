//! The order pipeline on SQLite and PostgreSQL: the saga's outcomes for every sandbox token,
//! compensation on cancel, dead letters and replay, lease fencing, and concurrent runners.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{Backend, TestDb};
use orderflow::adapters::notify::FileNotifier;
use orderflow::adapters::payment::sandbox::Sandbox;
use orderflow::clock;
use orderflow::domain::{Cart, CartLine, CustomerId, OrderId, OrderStatus, PaymentToken, ProductId, Quantity};
use orderflow::queue::Runner;
use orderflow::store::jobs::{CompleteOutcome, FailOutcome, JobFilter, ReplaySelector, StepEffects};
use orderflow::store::sandbox::SandboxBooks;
use orderflow::store::{PlaceOrderOutcome, Store};
use orderflow::workflow::checkout::{self, CheckoutRequest, CheckoutSettings};
use orderflow::workflow::steps::{CancelOutcome, SagaSettings, cancel_order, expire_reservations};
use orderflow::workflow::{CHARGE_PAYMENT, SEND_RECEIPT};

on_every_backend!(
    visa_order_is_fulfilled_exactly_once,
    declined_payment_cancels_and_releases_stock,
    ambiguous_timeout_charges_once,
    cancel_after_an_ambiguous_charge_voids_the_hold,
    flaky_provider_succeeds_after_retries,
    outage_dead_letters_then_replay_fulfils,
    cancel_before_payment_releases_stock,
    cancel_after_payment_refunds_and_releases,
    expired_lease_is_taken_over_and_late_completion_refused,
    a_job_whose_workers_keep_dying_is_dead_lettered_as_poison,
    concurrent_runners_never_repeat_effects,
    audit_catches_pipeline_violations,
    a_provider_call_not_yet_recorded_is_not_a_violation_while_its_step_is_queued,
    unpaid_orders_expire_and_release_stock,
);

struct Pipeline {
    store: Arc<dyn Store>,
    sandbox: Arc<Sandbox>,
    runner: Arc<Runner>,
    mail_dir: PathBuf,
    product: ProductId,
    customer: CustomerId,
    _mail: tempfile::TempDir,
    _db: TestDb,
}

impl Pipeline {
    async fn new(backend: Backend) -> Self {
        let db = TestDb::new(backend).await;
        let store = db.connect().await;
        let books: Arc<dyn SandboxBooks> = store.clone();
        let sandbox = Arc::new(Sandbox::new(books));
        let mail = tempfile::tempdir().unwrap();
        let notifier = Arc::new(FileNotifier::new(mail.path().to_path_buf(), "shop@example.com".into()));
        let runner = common::saga_runner(&store, sandbox.clone(), notifier);
        let (product, customer) = common::seed_lamp_and_buyer(store.as_ref(), "buyer@example.com").await;
        Pipeline {
            store,
            sandbox,
            runner,
            mail_dir: mail.path().to_path_buf(),
            product,
            customer,
            _mail: mail,
            _db: db,
        }
    }

    async fn place(&self, token: &str, quantity: i64) -> OrderId {
        let request = CheckoutRequest {
            principal: self.customer.to_string(),
            idempotency_key: uuid::Uuid::now_v7().to_string(),
            customer_id: self.customer,
            cart: Cart::new(vec![CartLine {
                product_id: self.product,
                quantity: Quantity::parse(quantity).unwrap(),
            }])
            .unwrap(),
            payment_token: PaymentToken::parse(token).unwrap(),
            shipping: None,
            correlation_id: Some(format!("corr-{token}")),
        };
        match checkout::place_order(self.store.clone(), &CheckoutSettings::default(), request)
            .await
            .unwrap()
        {
            PlaceOrderOutcome::Created(order) => order.id,
            other => panic!("not placed: {other:?}"),
        }
    }

    async fn drain(&self) {
        self.runner.drain(Duration::from_secs(30)).await.expect("queue drains");
    }

    async fn status(&self, order: OrderId) -> OrderStatus {
        self.store.get_order(order).await.unwrap().unwrap().order.status
    }

    async fn stock(&self) -> (i64, i64) {
        let product = self.store.get_product(self.product).await.unwrap().unwrap();
        (product.on_hand, product.reserved)
    }

    async fn events(&self, order: OrderId) -> Vec<String> {
        self.store
            .get_order(order)
            .await
            .unwrap()
            .unwrap()
            .events
            .into_iter()
            .map(|e| e.kind)
            .collect()
    }

    fn mails(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.mail_dir)
            .map(|dir| {
                dir.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    async fn assert_audit_clean(&self) {
        let report = self.store.audit().await.unwrap();
        assert!(report.is_clean(), "{report}");
    }
}

async fn visa_order_is_fulfilled_exactly_once(backend: Backend) {
    let p = Pipeline::new(backend).await;
    let order = p.place("tok_visa", 3).await;
    assert_eq!(p.stock().await, (100, 3));
    p.drain().await;

    assert_eq!(p.status(order).await, OrderStatus::Fulfilled);
    assert_eq!(p.stock().await, (97, 0), "reserved stock became sold stock");
    let intents = p.sandbox.books().intents_for(&order.to_string()).await.unwrap();
    assert_eq!(intents.len(), 1);
    assert_eq!(
        (intents[0].amount_minor, intents[0].captured_minor, intents[0].calls),
        (7500, 7500, 1),
        "authorized at checkout, captured in full when fulfilled, one call"
    );
    assert_eq!(
        (intents[0].capture_method.as_str(), intents[0].status.as_str()),
        ("manual", "succeeded")
    );
    let payment = p.store.payment(order).await.unwrap().unwrap();
    assert_eq!(
        (
            payment.state.as_str(),
            payment.provider_ref.as_deref(),
            payment.captured_minor
        ),
        ("captured", Some(intents[0].id.as_str()), 7500)
    );
    let events = p.events(order).await;
    for kind in [
        "order_placed",
        "payment_authorized",
        "inventory_committed",
        "payment_captured",
        "fulfilled",
    ] {
        assert_eq!(
            events.iter().filter(|e| *e == kind).count(),
            1,
            "{kind} once in {events:?}"
        );
    }
    assert_eq!(events.iter().filter(|e| *e == "notification_sent").count(), 2);
    let notifications = p.store.notifications(order).await.unwrap();
    let mut sent: Vec<_> = notifications
        .iter()
        .map(|n| (n.kind.as_str(), n.state.as_str(), n.attempts))
        .collect();
    sent.sort();
    assert_eq!(sent, [("send_confirmation", "sent", 1), ("send_receipt", "sent", 1)]);
    assert_eq!(notifications.len(), 2);
    assert_eq!(
        p.mails(),
        [format!("confirmation.{order}.eml"), format!("receipt.{order}.eml")]
    );
    let receipt = std::fs::read_to_string(p.mail_dir.join(format!("receipt.{order}.eml"))).unwrap();
    assert!(
        receipt.contains("To: buyer@example.com") && receipt.contains("75.00 USD"),
        "{receipt}"
    );
    assert!(receipt.contains("X-Correlation-Id: corr-tok_visa"));
    let jobs = p.store.jobs_for_order(order).await.unwrap();
    assert!(jobs.iter().all(|j| j.state == "succeeded"), "{jobs:?}");
    p.assert_audit_clean().await;
}

async fn declined_payment_cancels_and_releases_stock(backend: Backend) {
    let p = Pipeline::new(backend).await;
    let order = p.place("tok_chargeDeclined", 4).await;
    p.drain().await;
    assert_eq!(p.status(order).await, OrderStatus::Cancelled);
    assert_eq!(p.stock().await, (100, 0), "stock available again");
    let intents = p.sandbox.books().intents_for(&order.to_string()).await.unwrap();
    assert_eq!(
        intents
            .iter()
            .map(|i| (i.status.as_str(), i.captured_minor))
            .collect::<Vec<_>>(),
        [("requires_payment_method", 0)],
        "the declined intent, nothing taken"
    );
    assert_eq!(p.store.payment(order).await.unwrap().unwrap().state, "declined");
    assert!(p.events(order).await.contains(&"payment_declined".to_string()));
    assert_eq!(p.mails(), [format!("cancellation.{order}.eml")]);
    p.assert_audit_clean().await;
}

async fn ambiguous_timeout_charges_once(backend: Backend) {
    let p = Pipeline::new(backend).await;
    let order = p.place("tok_timeout", 1).await;
    p.drain().await;
    assert_eq!(p.status(order).await, OrderStatus::Fulfilled);
    let intents = p.sandbox.books().intents_for(&order.to_string()).await.unwrap();
    assert_eq!(intents.len(), 1, "the retry found the first intent");
    assert_eq!(intents[0].calls, 2, "two calls, one intent");
    let charge_job = p
        .store
        .jobs_for_order(order)
        .await
        .unwrap()
        .into_iter()
        .find(|j| j.kind == CHARGE_PAYMENT)
        .unwrap();
    assert_eq!(charge_job.attempts, 2);
    p.assert_audit_clean().await;
}

/// Found by orderflow-chaos: the provider authorized but its answer was lost, then the customer
/// cancelled before the retry. The retry must still ask the provider (same key) and void the
/// hold, not finish with "nothing to take" and leave money held on the card.
async fn cancel_after_an_ambiguous_charge_voids_the_hold(backend: Backend) {
    let p = Pipeline::new(backend).await;
    let order = p.place("tok_timeout", 1).await;
    assert_eq!(
        p.runner.run_batch(CHARGE_PAYMENT, 1).await.unwrap(),
        1,
        "the first try ran"
    );
    let intents = p.sandbox.books().intents_for(&order.to_string()).await.unwrap();
    assert_eq!(intents.len(), 1, "the provider authorized although the answer was lost");
    let outcome = cancel_order(
        p.store.as_ref(),
        &SagaSettings::default(),
        order,
        orderflow::domain::events::CancelReason::CustomerRequest,
    )
    .await
    .unwrap();
    assert_eq!(outcome, CancelOutcome::Cancelled);
    p.drain().await;
    assert_eq!(p.status(order).await, OrderStatus::Cancelled);
    let intents = p.sandbox.books().intents_for(&order.to_string()).await.unwrap();
    assert_eq!(intents.len(), 1, "the retry found the first intent");
    assert_eq!(intents[0].status, "canceled", "the hold was voided: {intents:?}");
    p.assert_audit_clean().await;
}

async fn flaky_provider_succeeds_after_retries(backend: Backend) {
    let p = Pipeline::new(backend).await;
    let order = p.place("tok_flaky", 1).await;
    p.drain().await;
    assert_eq!(p.status(order).await, OrderStatus::Fulfilled);
    let charge_job = p
        .store
        .jobs_for_order(order)
        .await
        .unwrap()
        .into_iter()
        .find(|j| j.kind == CHARGE_PAYMENT)
        .unwrap();
    assert_eq!(charge_job.attempts, 3, "two transient failures, then success");
    assert_eq!(
        p.sandbox.books().intents_for(&order.to_string()).await.unwrap().len(),
        1
    );
    p.assert_audit_clean().await;
}

async fn outage_dead_letters_then_replay_fulfils(backend: Backend) {
    let p = Pipeline::new(backend).await;
    let order = p.place("tok_unavailable", 2).await;
    p.drain().await;

    // Parked visibly: the order waits, its job is dead with every error kept.
    assert_eq!(p.status(order).await, OrderStatus::PendingPayment);
    assert_eq!(p.stock().await, (100, 2), "the reservation is held while parked");
    let stats = p.store.queue_stats(clock::now()).await.unwrap();
    let charge = stats.iter().find(|s| s.kind == CHARGE_PAYMENT).unwrap();
    assert_eq!((charge.dead, charge.ready, charge.running), (1, 0, 0));
    let dead = p
        .store
        .list_jobs(&JobFilter {
            state: Some("dead".into()),
            kind: None,
            after: None,
            limit: 50,
        })
        .await
        .unwrap();
    assert_eq!(dead.items.len(), 1);
    assert_eq!(dead.items[0].attempts, 3);
    assert_eq!(dead.items[0].errors.len(), 3);
    assert!(dead.items[0].last_error.as_deref().unwrap().contains("503"));

    p.sandbox.set_outage(false);
    let replayed = p
        .store
        .replay_jobs(&ReplaySelector::One(dead.items[0].job_id), clock::now())
        .await
        .unwrap();
    assert_eq!(replayed, 1);
    p.drain().await;
    assert_eq!(p.status(order).await, OrderStatus::Fulfilled);
    let jobs = p
        .store
        .list_jobs(&JobFilter {
            state: None,
            kind: Some(CHARGE_PAYMENT.into()),
            after: None,
            limit: 50,
        })
        .await
        .unwrap();
    assert_eq!(jobs.items[0].errors.len(), 3, "replay keeps the history");
    assert_eq!(
        p.store
            .replay_jobs(&ReplaySelector::AllDead { kind: None }, clock::now())
            .await
            .unwrap(),
        0
    );
    p.assert_audit_clean().await;
}

async fn cancel_before_payment_releases_stock(backend: Backend) {
    let p = Pipeline::new(backend).await;
    let order = p.place("tok_visa", 5).await;
    let outcome = cancel_order(
        p.store.as_ref(),
        &SagaSettings::default(),
        order,
        orderflow::domain::events::CancelReason::CustomerRequest,
    )
    .await
    .unwrap();
    assert_eq!(outcome, CancelOutcome::Cancelled);
    assert_eq!(p.stock().await, (100, 0));
    p.drain().await;
    assert_eq!(p.status(order).await, OrderStatus::Cancelled);
    assert!(
        p.sandbox
            .books()
            .intents_for(&order.to_string())
            .await
            .unwrap()
            .is_empty(),
        "the payment step saw the cancel"
    );
    assert_eq!(p.mails(), [format!("cancellation.{order}.eml")]);
    assert_eq!(
        cancel_order(
            p.store.as_ref(),
            &SagaSettings::default(),
            order,
            orderflow::domain::events::CancelReason::CustomerRequest
        )
        .await
        .unwrap(),
        CancelOutcome::AlreadyCancelled
    );
    p.assert_audit_clean().await;
}

async fn cancel_after_payment_refunds_and_releases(backend: Backend) {
    let p = Pipeline::new(backend).await;
    let order = p.place("tok_visa", 5).await;
    assert_eq!(p.runner.run_batch(CHARGE_PAYMENT, 10).await.unwrap(), 1);
    assert_eq!(p.status(order).await, OrderStatus::Paid);
    let outcome = cancel_order(
        p.store.as_ref(),
        &SagaSettings::default(),
        order,
        orderflow::domain::events::CancelReason::CustomerRequest,
    )
    .await
    .unwrap();
    assert_eq!(outcome, CancelOutcome::RefundQueued);
    p.drain().await;
    assert_eq!(p.status(order).await, OrderStatus::Cancelled);
    assert_eq!(
        p.stock().await,
        (100, 0),
        "stock back whether or not it had been committed"
    );
    let intents = p.sandbox.books().intents_for(&order.to_string()).await.unwrap();
    assert_eq!(
        (intents.len(), intents[0].status.as_str(), intents[0].captured_minor),
        (1, "canceled", 0),
        "cancelled before it shipped: the authorization is voided, no money moved"
    );
    assert_eq!(p.store.payment(order).await.unwrap().unwrap().state, "voided");
    assert!(p.events(order).await.contains(&"payment_voided".to_string()));
    assert!(p.mails().contains(&format!("cancellation.{order}.eml")));
    p.assert_audit_clean().await;
}

async fn expired_lease_is_taken_over_and_late_completion_refused(backend: Backend) {
    let p = Pipeline::new(backend).await;
    let order = p.place("tok_visa", 1).await;
    let lease = Duration::from_millis(200);
    let stalled = p
        .store
        .claim_jobs(CHARGE_PAYMENT, 1, lease, clock::now())
        .await
        .unwrap()
        .remove(0);
    assert!(
        p.store
            .claim_jobs(CHARGE_PAYMENT, 1, lease, clock::now())
            .await
            .unwrap()
            .is_empty(),
        "leased jobs are invisible"
    );

    // Once the lease runs out, another worker takes the job over.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let taken = loop {
        let claimed = p
            .store
            .claim_jobs(CHARGE_PAYMENT, 1, Duration::from_secs(30), clock::now())
            .await
            .unwrap();
        if let Some(job) = claimed.into_iter().next() {
            break job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expired lease was never taken over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(taken.lease.job_id, stalled.lease.job_id);
    assert_eq!(
        (taken.attempt, taken.lease_expiries),
        (1, 1),
        "the run that died gave its attempt back: a crash is not a failure"
    );

    // The stalled worker wakes up: its completion and its failure are both refused.
    let effects = StepEffects {
        order_id: Some(order),
        events: vec![("late".into(), None)],
        ..Default::default()
    };
    assert_eq!(
        p.store
            .complete_job(Some(&stalled.lease), &effects, clock::now())
            .await
            .unwrap(),
        CompleteOutcome::LeaseLost
    );
    assert_eq!(
        p.store
            .fail_job(&stalled.lease, "late", None, clock::now())
            .await
            .unwrap(),
        FailOutcome::LeaseLost
    );
    assert!(!p.store.extend_lease(&stalled.lease, clock::now()).await.unwrap());
    assert!(
        !p.events(order).await.contains(&"late".to_string()),
        "nothing of the late completion was written"
    );
    assert_eq!(
        p.store
            .complete_job(Some(&taken.lease), &StepEffects::default(), clock::now())
            .await
            .unwrap(),
        CompleteOutcome::Completed
    );
}

async fn a_job_whose_workers_keep_dying_is_dead_lettered_as_poison(backend: Backend) {
    let p = Pipeline::new(backend).await;
    let order = p.place("tok_visa", 1).await;
    // Nine runs of the payment died with their worker already; the tests' runner allows ten.
    tamper(
        &p,
        backend,
        "UPDATE jobs SET lease_expiries = 9 WHERE kind = 'charge_payment'",
    )
    .await;
    let lease = Duration::from_millis(100);
    let dying = p
        .store
        .claim_jobs(CHARGE_PAYMENT, 1, lease, clock::now())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        (dying.attempt, dying.lease_expiries),
        (1, 9),
        "the crashes spent no attempt"
    );
    // The tenth run dies too: its lease runs out (waiting for the clock, not for background work).
    tokio::time::sleep(lease * 2).await;
    p.drain().await;

    let dead = p
        .store
        .list_jobs(&JobFilter {
            state: Some("dead".into()),
            kind: Some(CHARGE_PAYMENT.into()),
            after: None,
            limit: 10,
        })
        .await
        .unwrap()
        .items;
    assert_eq!(dead.len(), 1, "the poison job is parked");
    let error = dead[0].last_error.clone().unwrap_or_default();
    assert!(error.contains("lease expired 10 times"), "{error}");
    assert_eq!(dead[0].attempts, 1, "only the claim that found it poisoned counted");
    assert!(
        p.sandbox
            .books()
            .intents_for(&order.to_string())
            .await
            .unwrap()
            .is_empty(),
        "a poison job is not run again"
    );
    assert_eq!(p.status(order).await, OrderStatus::PendingPayment);
}

async fn concurrent_runners_never_repeat_effects(backend: Backend) {
    let p = Pipeline::new(backend).await;
    let mut orders = Vec::new();
    for n in 0..30 {
        let token = ["tok_visa", "tok_timeout", "tok_flaky", "tok_chargeDeclined"][n % 4];
        orders.push((p.place(token, 1).await, token));
    }
    // Several runners (as several processes would) drain the same queue at once.
    let drains: Vec<_> = (0..3)
        .map(|_| {
            let runner = p.runner.clone();
            tokio::spawn(async move { runner.drain(Duration::from_secs(60)).await })
        })
        .collect();
    for drain in drains {
        drain.await.unwrap().unwrap();
    }
    for (order, token) in orders {
        let expected = if token == "tok_chargeDeclined" {
            OrderStatus::Cancelled
        } else {
            OrderStatus::Fulfilled
        };
        assert_eq!(p.status(order).await, expected, "{token}");
        let intents = p.sandbox.books().intents_for(&order.to_string()).await.unwrap();
        assert_eq!(intents.len(), 1, "{token}: one intent");
        assert_eq!(
            intents[0].captured_minor > 0,
            expected == OrderStatus::Fulfilled,
            "{token}: captured exactly when fulfilled"
        );
        let events = p.events(order).await;
        assert!(
            events.iter().filter(|e| *e == "payment_captured").count() <= 1,
            "{events:?}"
        );
        let receipts = p
            .store
            .notifications(order)
            .await
            .unwrap()
            .into_iter()
            .filter(|n| n.kind == SEND_RECEIPT)
            .count();
        assert!(receipts <= 1);
    }
    assert_eq!(p.stock().await.1, 0);
    p.assert_audit_clean().await;
}

/// Runs SQL directly on the test database, outside the store.
async fn tamper(p: &Pipeline, backend: Backend, sql: &str) {
    use sqlx::Connection;
    match backend {
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(p._db.url()).await.unwrap();
            sqlx::query(sql).execute(&mut conn).await.unwrap();
        }
        Backend::Postgres | Backend::Dsql => p._db.tamper(sql).await,
    }
}

async fn audit_catches_pipeline_violations(backend: Backend) {
    let p = Pipeline::new(backend).await;
    p.place("tok_visa", 1).await;
    let parked = p.place("tok_unavailable", 1).await;
    p.drain().await;
    assert_eq!(p.status(parked).await, OrderStatus::PendingPayment);
    p.assert_audit_clean().await;

    let cases = [
        (
            "INSERT INTO sandbox_intents (id, idempotency_key, payment_method, amount_minor, currency, order_id, \
             capture_method, status, captured_minor, refunded_minor, calls, created_at, updated_at) \
             SELECT 'pi_double', 'double', payment_method, amount_minor, currency, order_id, capture_method, status, \
             captured_minor, refunded_minor, calls, created_at, updated_at FROM sandbox_intents WHERE status = 'succeeded'",
            "DELETE FROM sandbox_intents WHERE id = 'pi_double'",
            "one_charge_per_order",
        ),
        (
            "UPDATE sandbox_intents SET captured_minor = captured_minor - 1 WHERE status = 'succeeded'",
            "UPDATE sandbox_intents SET captured_minor = captured_minor + 1 WHERE status = 'succeeded'",
            "payment_in_provider_books",
        ),
        (
            "UPDATE notifications SET state = 'sending' WHERE kind = 'send_receipt'",
            "UPDATE notifications SET state = 'sent' WHERE kind = 'send_receipt'",
            "receipt_sent_or_pending",
        ),
        (
            "UPDATE jobs SET state = 'succeeded' WHERE state = 'dead'",
            "UPDATE jobs SET state = 'dead' WHERE kind = 'charge_payment' AND last_error IS NOT NULL",
            "nothing_silently_stuck",
        ),
    ];
    for (break_it, mend_it, check) in cases {
        tamper(&p, backend, break_it).await;
        let report = p.store.audit().await.unwrap();
        assert!(
            report.violations.iter().any(|v| v.check == check),
            "{check} not caught:\n{report}"
        );
        tamper(&p, backend, mend_it).await;
        p.assert_audit_clean().await;
    }
    // A cancelled order whose captured payment is not being refunded: money held for nothing.
    tamper(
        &p,
        backend,
        "UPDATE orders SET status = 'cancelled' WHERE status = 'fulfilled'",
    )
    .await;
    let report = p.store.audit().await.unwrap();
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.check == "captured_payment_has_order"),
        "{report}"
    );
}

/// A step's provider call commits at the provider before the step records it: on a live system
/// the provider's books are briefly ahead of ours. The audit accepts that while the step is queued
/// or running (its retry records what the provider did), and flags it once the step is dead.
async fn a_provider_call_not_yet_recorded_is_not_a_violation_while_its_step_is_queued(backend: Backend) {
    use orderflow::adapters::payment::intents::{CaptureRequest, PaymentProvider};
    use orderflow::workflow::steps::capture_key;
    let p = Pipeline::new(backend).await;
    let order = p.place("tok_visa", 1).await;
    assert_eq!(p.runner.run_batch(CHARGE_PAYMENT, 10).await.unwrap(), 1);
    let intent = p
        .sandbox
        .books()
        .intents_for(&order.to_string())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(intent.status, "requires_capture");
    // What fulfil_order's capture does at the provider, before its completion commits.
    p.sandbox
        .capture(&CaptureRequest {
            idempotency_key: capture_key(order),
            intent_id: intent.id.clone(),
            amount_minor: intent.amount_minor,
            correlation_id: None,
        })
        .await
        .unwrap();
    p.assert_audit_clean().await;

    tamper(
        &p,
        backend,
        "UPDATE jobs SET state = 'dead' WHERE kind = 'fulfil_order'",
    )
    .await;
    let report = p.store.audit().await.unwrap();
    assert!(
        report.violations.iter().any(|v| v.check == "payment_in_provider_books"),
        "a dead step's unrecorded capture is caught:\n{report}"
    );
    tamper(
        &p,
        backend,
        "UPDATE jobs SET state = 'ready' WHERE kind = 'fulfil_order'",
    )
    .await;
    // The step's capture (same key) finds the provider's answer and records it.
    p.drain().await;
    assert_eq!(p.status(order).await, OrderStatus::Fulfilled);
    p.assert_audit_clean().await;
}

async fn unpaid_orders_expire_and_release_stock(backend: Backend) {
    let p = Pipeline::new(backend).await;
    let paid = p.place("tok_visa", 1).await;
    assert_eq!(p.runner.run_batch(CHARGE_PAYMENT, 10).await.unwrap(), 1);
    let parked = p.place("tok_visa", 2).await;
    let settings = SagaSettings::default();
    assert_eq!(
        expire_reservations(p.store.as_ref(), &settings, Duration::from_secs(3600))
            .await
            .unwrap(),
        0,
        "nothing is old enough yet"
    );
    // The paid order's unit is sold (committed with its payment); the unpaid one's 2 are held.
    assert_eq!(p.stock().await, (99, 2));

    let expired = expire_reservations(p.store.as_ref(), &settings, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(expired, 1, "only the unpaid order expires");
    assert_eq!(p.status(parked).await, OrderStatus::Cancelled);
    assert_eq!(p.status(paid).await, OrderStatus::Paid);
    assert_eq!(p.stock().await, (99, 0), "the expired reservation was released");
    let events = p.events(parked).await;
    assert!(events.contains(&"cancelled".to_string()), "{events:?}");
    p.drain().await;
    assert!(
        p.sandbox
            .books()
            .intents_for(&parked.to_string())
            .await
            .unwrap()
            .is_empty(),
        "an expired order is never charged"
    );
    assert_eq!(p.status(paid).await, OrderStatus::Fulfilled);
    p.assert_audit_clean().await;
}
