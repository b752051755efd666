//! Group commit of step completions, on both backends: completions committed in one
//! transaction still succeed, are refused or fail one by one — a completion whose lease was lost
//! and one whose effects fail are rolled back alone, and only the others' effects are kept.

mod common;

use std::time::Duration;

use common::{Backend, TestApp};
use orderflow::domain::OrderStatus;
use orderflow::store::group_commit::GroupCommitSettings;
use orderflow::store::jobs::{CompleteOutcome, JobLease, StepEffects};
use orderflow::workflow::CHARGE_PAYMENT;
use serde_json::json;
use uuid::Uuid;

on_every_backend!(
    one_transaction_keeps_only_the_completions_that_succeed,
    grouped_completions_run_the_whole_pipeline,
);

async fn one_transaction_keeps_only_the_completions_that_succeed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let product = app.product("10.00", 10).await;
    let (_, buyer) = app.customer().await;
    for n in 0..5 {
        let body = json!({ "items": [{ "product_id": product, "quantity": 1 }] });
        let placed = app.place_order(&buyer, &format!("g-{n}"), &body).await;
        assert_eq!(placed.status(), 202);
    }
    let jobs = app
        .store
        .claim_jobs(CHARGE_PAYMENT, 10, Duration::from_secs(60), orderflow::clock::now())
        .await
        .unwrap();
    assert_eq!(jobs.len(), 5);
    let mark = |n: usize| StepEffects {
        order_id: jobs[n].order_id,
        events: vec![("grouped".into(), Some(n.to_string()))],
        ..Default::default()
    };
    let completions = vec![
        (Some(jobs[0].lease), mark(0)),
        // Taken over by another worker: its token no longer matches.
        (
            Some(JobLease {
                job_id: jobs[1].lease.job_id,
                token: Uuid::now_v7(),
            }),
            mark(1),
        ),
        // Effects that fail after the job's completion was written: pending_payment cannot
        // become fulfilled.
        (
            Some(jobs[2].lease),
            StepEffects {
                new_status: Some(OrderStatus::Fulfilled),
                ..mark(2)
            },
        ),
        (Some(jobs[3].lease), mark(3)),
        (Some(jobs[4].lease), mark(4)),
    ];
    let answers = app.store.complete_jobs(&completions, orderflow::clock::now()).await;
    assert!(matches!(answers[0], Ok(CompleteOutcome::Completed)), "{answers:?}");
    assert!(matches!(answers[1], Ok(CompleteOutcome::LeaseLost)), "{answers:?}");
    assert!(answers[2].is_err(), "{answers:?}");
    assert!(matches!(answers[3], Ok(CompleteOutcome::Completed)), "{answers:?}");
    assert!(matches!(answers[4], Ok(CompleteOutcome::Completed)), "{answers:?}");

    for (n, job) in jobs.iter().enumerate() {
        let order = job.order_id.unwrap();
        let details = app.store.get_order(order).await.unwrap().unwrap();
        let marked = details.events.iter().any(|e| e.kind == "grouped");
        let state = app
            .store
            .jobs_for_order(order)
            .await
            .unwrap()
            .into_iter()
            .find(|j| j.kind == CHARGE_PAYMENT)
            .unwrap()
            .state;
        let kept = [0, 3, 4].contains(&n);
        assert_eq!(marked, kept, "order {n}: its timeline entry");
        // Job 2's completion was written before its effects failed: only its savepoint's
        // rollback keeps the others' commit from making it `succeeded`.
        assert_eq!(state, if kept { "succeeded" } else { "running" }, "order {n}: its job");
        assert_eq!(details.order.status, OrderStatus::PendingPayment, "order {n}");
    }
    // The refused and the failed jobs are still theirs to finish: their leases run and they
    // complete normally.
    let alone = app
        .store
        .complete_jobs(&[(Some(jobs[2].lease), mark(2))], orderflow::clock::now())
        .await;
    assert!(matches!(alone[0], Ok(CompleteOutcome::Completed)), "{alone:?}");
}

/// With `--commit-batch 64` every step completion goes through the committers: 40 orders (their
/// steps run 8 at a time, so completions share transactions) are all fulfilled and the audit is
/// clean.
async fn grouped_completions_run_the_whole_pipeline(backend: Backend) {
    let mut options = common::connect_options();
    options.group_commit = GroupCommitSettings {
        max_batch: Some(64),
        committers: Some(2),
    };
    let app = TestApp::spawn_with_pool(backend, options, |_| {}).await;
    let product = app.product("10.00", 100).await;
    let (_, buyer) = app.customer().await;
    let mut ids = Vec::new();
    for n in 0..40 {
        let body = json!({ "items": [{ "product_id": product, "quantity": 1 }] });
        let placed = app.place_order(&buyer, &format!("p-{n}"), &body).await;
        assert_eq!(placed.status(), 202);
        ids.push(
            placed.json::<serde_json::Value>().await.unwrap()["order_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // The drain runs each kind's ready jobs together, so their completions meet at the committers.
    app.drain().await;
    for id in &ids {
        let order = app.store.get_order(id.parse().unwrap()).await.unwrap().unwrap().order;
        assert_eq!(order.status, OrderStatus::Fulfilled, "{id}");
    }
    assert_eq!(app.available(&product).await, 60);
    app.assert_audit_clean().await;
}
