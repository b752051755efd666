//! The dsql profile never asks the database for what Aurora DSQL lacks: a full pipeline run —
//! catalog, customer, checkout over HTTP, every step to fulfilment, the audit — against a private
//! PostgreSQL logging every statement (`log_statement = all`), whose log then holds no LISTEN,
//! NOTIFY, `pg_advisory_*`, `SKIP LOCKED` or SAVEPOINT (and the plain postgres profile's run on
//! the same server shows that the scan would see them).
//!
//! Its own test binary: the test databases are created on the private server through
//! `ORDERFLOW_TEST_DATABASE_URL`, which is process-wide.

mod common;
#[path = "support/private_postgres.rs"]
mod private_postgres;

use common::{Backend, TestApp};
use private_postgres::PrivatePostgres;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Connection;

/// What the dsql profile must never send.
const FORBIDDEN: [&str; 5] = ["LISTEN", "NOTIFY", "PG_ADVISORY", "SKIP LOCKED", "SAVEPOINT"];

/// The forbidden words found in the statements the server logged.
fn forbidden_statements(log: &str) -> Vec<String> {
    log.lines()
        .filter(|line| line.contains("statement: ") || line.contains("execute "))
        .filter(|line| {
            let upper = line.to_uppercase();
            FORBIDDEN.iter().any(|word| upper.contains(word))
        })
        .map(str::to_string)
        .collect()
}

async fn run_pipeline(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let product = app.product("12.50", 5).await;
    let (_, token) = app.customer().await;
    let response = app
        .place_order(
            &token,
            "statements-1",
            &json!({"items": [{"product_id": product, "quantity": 2}]}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let order: Value = response.json().await.unwrap();
    app.drain().await;
    let order_id = order["order_id"].as_str().unwrap();
    let details: Value = app
        .get(&format!("/orders/{order_id}"), Some(&token))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(details["status"], "fulfilled", "{details}");
    assert_eq!(app.available(&product).await, 3);
    app.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dsql_pipeline_issues_no_statement_dsql_lacks() {
    let server = PrivatePostgres::start();
    let mut admin = sqlx::PgConnection::connect(&server.url()).await.unwrap();
    for statement in ["ALTER SYSTEM SET log_statement = 'all'", "SELECT pg_reload_conf()"] {
        sqlx::raw_sql(statement).execute(&mut admin).await.unwrap();
    }
    // SAFETY: set before any test database exists, in this binary's only test.
    unsafe { std::env::set_var("ORDERFLOW_TEST_DATABASE_URL", server.url()) };

    run_pipeline(Backend::Dsql).await;
    let log = server.log();
    assert!(
        log.contains("UPDATE jobs SET state = 'running'"),
        "the server logged the run's statements"
    );
    let found = forbidden_statements(&log);
    assert!(found.is_empty(), "the dsql profile sent:\n{}", found.join("\n"));

    // The scan is not blind: the postgres profile's run does LISTEN and NOTIFY.
    run_pipeline(Backend::Postgres).await;
    let found = forbidden_statements(&server.log());
    assert!(found.iter().any(|line| line.contains("LISTEN")), "{found:?}");
}
