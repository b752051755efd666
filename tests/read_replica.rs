//! The read replica (`--read-database-url`) against a real streaming standby this test starts
//! (`pg_basebackup -R` of a private primary, `pg_ctl start` on another port): order listings
//! and the sales report are read from the standby — shown by pausing its replay, when they lack
//! an order the primary has, while checkout and the order itself stay on the primary — a standby
//! lagging past `--read-replica-max-lag` is bypassed (the listing has the order again) and used
//! again once it catches up, and a stopped standby leaves checkout untouched while listings
//! fall back to the primary and still answer 200. SQLite refuses a replica at start-up.

mod common;
#[path = "support/private_postgres.rs"]
mod private_postgres;

use std::time::{Duration, Instant};

use common::{Backend, TestApp, TestDb, connect_options};
use orderflow::store::{ConnectOptions, ReadReplicaSettings, ReplicaStatus};
use private_postgres::{PrivatePostgres, StopMode};
use serde_json::{Value, json};

const MAX_LAG: Duration = Duration::from_secs(5);
const WAIT: Duration = Duration::from_secs(30);

async fn json_of(response: reqwest::Response, status: u16) -> Value {
    let actual = response.status().as_u16();
    let body: Value = response.json().await.expect("json");
    assert_eq!(actual, status, "{body}");
    body
}

fn replica(app: &TestApp) -> ReplicaStatus {
    app.store.read_replica().expect("a replica is configured")
}

/// Polls `/health/ready` until the replica's state is `state`.
async fn wait_for_state(app: &TestApp, state: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let ready = json_of(app.get("/health/ready", None).await, 200).await;
        if ready["components"]["read_replica"]["state"] == state {
            return ready;
        }
        assert!(Instant::now() < deadline, "the replica never became {state}: {ready}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The ids `/admin/orders` lists, and whether the replica served that read.
async fn listed(app: &TestApp) -> (Vec<String>, bool) {
    let before = replica(app).reads_served_by_replica;
    let page = json_of(app.get("/admin/orders?limit=100", Some(&app.admin)).await, 200).await;
    let ids = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["order_id"].as_str().unwrap().to_string())
        .collect();
    (ids, replica(app).reads_served_by_replica > before)
}

async fn place(app: &TestApp, product: &str, token: &str) -> String {
    let body = json!({ "items": [{ "product_id": product, "quantity": 1 }] });
    let placed = json_of(
        app.place_order(token, &uuid::Uuid::now_v7().to_string(), &body).await,
        202,
    )
    .await;
    placed["order_id"].as_str().unwrap().to_string()
}

/// Paid orders today, as the sales report counts them.
async fn sold_today(app: &TestApp) -> i64 {
    let report = json_of(
        app.get("/admin/reports/sales?granularity=day", Some(&app.admin)).await,
        200,
    )
    .await;
    report["totals"]["orders"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listings_and_reports_come_from_a_streaming_standby_and_fall_back_when_it_stops() {
    let primary = PrivatePostgres::start();
    let standby = primary.start_standby();
    let db = TestDb::postgres_on(&primary.url()).await;
    let replica_url = db
        .url()
        .replacen(&format!(":{}/", primary.port), &format!(":{}/", standby.port), 1);
    let options = ConnectOptions {
        read_replica: Some(ReadReplicaSettings {
            url: replica_url,
            max_lag: MAX_LAG,
        }),
        ..connect_options()
    };
    let app = TestApp::spawn_on(db, Backend::Postgres, options, |_| {}).await;
    let ready = wait_for_state(&app, "in_use").await;
    assert_eq!(ready["components"]["read_replica"]["max_lag_seconds"], 5.0);
    let product = app.product("10.00", 100).await;
    let (customer, token) = app.customer().await;

    // An order placed on the primary shows in the listing served by the standby once replicated.
    let first = place(&app, &product, &token).await;
    app.drain().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let (ids, from_replica) = listed(&app).await;
        if ids.contains(&first) {
            assert!(from_replica, "the listing came from the replica");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the order never reached the standby's listing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // With the standby's replay paused, a new order is on the primary only: checkout and the
    // order's own page (the primary) have it, the listings (the standby, still within the lag
    // limit) do not.
    standby.psql("SELECT pg_wal_replay_pause()");
    let second = place(&app, &product, &token).await;
    json_of(app.get(&format!("/orders/{second}"), Some(&app.admin)).await, 200).await;
    let (ids, from_replica) = listed(&app).await;
    assert!(
        from_replica && ids.contains(&first) && !ids.contains(&second),
        "{ids:?}"
    );
    let mine = json_of(
        app.get(&format!("/customers/{customer}/orders"), Some(&token)).await,
        200,
    )
    .await;
    assert_eq!(mine["data"].as_array().unwrap().len(), 1, "{mine}");
    app.drain().await;
    assert_eq!(
        sold_today(&app).await,
        1,
        "the report is the standby's: the second sale is not there yet"
    );

    // Paused for longer than the limit, it is bypassed: the primary answers, with both orders.
    let lagging = wait_for_state(&app, "lagging").await;
    assert!(
        lagging["components"]["read_replica"]["lag_seconds"].as_f64().unwrap() > 5.0,
        "{lagging}"
    );
    let served_by_primary = replica(&app).reads_served_by_primary;
    let (ids, from_replica) = listed(&app).await;
    assert!(!from_replica && ids.contains(&second), "{ids:?}");
    assert_eq!(sold_today(&app).await, 2);
    assert!(replica(&app).reads_served_by_primary >= served_by_primary + 2);
    let metrics = app.get("/metrics", None).await.text().await.unwrap();
    assert!(metrics.contains("orderflow_db_replica_in_use 0"), "{metrics}");

    // Caught up again, it serves again.
    standby.psql("SELECT pg_wal_replay_resume()");
    wait_for_state(&app, "in_use").await;
    let (ids, from_replica) = listed(&app).await;
    assert!(from_replica && ids.contains(&second), "{ids:?}");
    let metrics = app.get("/metrics", None).await.text().await.unwrap();
    assert!(metrics.contains("orderflow_db_replica_in_use 1"), "{metrics}");
    assert!(
        metrics.contains("orderflow_db_replica_reads_total{served_by=\"replica\"}"),
        "{metrics}"
    );

    // The standby stops: checkout does not notice; listings and the report fall back to the
    // primary and answer 200 with everything.
    standby.stop(StopMode::Immediate);
    let third = place(&app, &product, &token).await;
    let (ids, from_replica) = listed(&app).await;
    assert!(!from_replica && ids.contains(&third), "{ids:?}");
    app.drain().await;
    assert_eq!(sold_today(&app).await, 3);
    let down = wait_for_state(&app, "down").await;
    assert_eq!(
        down["status"], "ok",
        "a replica that is down never makes the instance unready"
    );
    let (ids, _) = listed(&app).await;
    assert_eq!(ids.len(), 3);
    let status = replica(&app);
    assert!(status.reads_served_by_replica >= 3, "{status:?}");
    app.assert_audit_clean().await;
}

/// The embedded SQLite database has no replicas: asking for one is refused at start-up, by name.
#[tokio::test]
async fn sqlite_refuses_a_read_replica() {
    let db = TestDb::new(Backend::Sqlite).await;
    let options = ConnectOptions {
        read_replica: Some(ReadReplicaSettings {
            url: "postgres://postgres@127.0.0.1:5432/replica".into(),
            max_lag: MAX_LAG,
        }),
        ..connect_options()
    };
    let refused = match orderflow::store::connect(db.url(), &options).await {
        Ok(_) => panic!("SQLite accepted a read replica"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        refused.contains("--read-database-url") && refused.contains("PostgreSQL"),
        "{refused}"
    );
}
