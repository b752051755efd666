//! The operators' views: the `/ops` page driven in headless Chromium (it loads under its strict
//! CSP, shows the numbers the admin API gives, replays a dead job from its button and picks up
//! changes on its own refresh), the admin list of every order behind it on both backends, and the
//! Grafana dashboard in `ops/grafana/` (valid JSON that queries only series `/metrics` exposes).

mod common;
#[path = "support/webdriver.rs"]
mod webdriver;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Backend, TestApp, expect_problem};
use orderflow::monitoring::alarms::{AlarmSettings, evaluate_once};
use orderflow::store::jobs::JobFilter;
use serde_json::{Value, json};
use uuid::Uuid;
use webdriver::Browser;

on_both_backends!(admin_orders_are_newest_first_filtered_and_paged);

const WAIT: Duration = Duration::from_secs(15);

/// Places an order for `token`'s customer; `payment` is the sandbox token (`tok_unavailable`
/// parks the charge step after its retries). Returns the order id.
async fn order(app: &TestApp, token: &str, product: &str, payment: Option<&str>) -> String {
    let mut body = json!({ "items": [{ "product_id": product, "quantity": 1 }] });
    if let Some(payment) = payment {
        body["payment"] = json!({ "token": payment });
    }
    let placed = app.place_order(token, &Uuid::now_v7().to_string(), &body).await;
    assert_eq!(placed.status(), 202);
    placed.json::<Value>().await.unwrap()["order_id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn admin_json(app: &TestApp, path: &str) -> Value {
    let response = app.get(path, Some(&app.admin)).await;
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.unwrap()
}

/// Sum of one column of `/admin/queues`.
fn total(queues: &Value, column: &str) -> i64 {
    queues["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q[column].as_i64().unwrap())
        .sum()
}

async fn admin_orders_are_newest_first_filtered_and_paged(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let product = app.product("10.00", 100).await;
    let (_, alice) = app.customer().await;
    let (_, bob) = app.customer().await;
    let first = order(&app, &alice, &product, None).await;
    let parked = order(&app, &bob, &product, Some("tok_unavailable")).await;
    app.drain().await;
    let third = order(&app, &alice, &product, None).await;

    // Every customer's orders, newest first.
    let all = admin_json(&app, "/admin/orders").await;
    let ids: Vec<&str> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["order_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [third.as_str(), parked.as_str(), first.as_str()]);
    assert_eq!(all["next_cursor"], Value::Null);
    assert_eq!(all["data"][0]["status"], "pending_payment");
    assert_eq!(all["data"][2]["status"], "fulfilled");
    assert_eq!(all["data"][2]["total_amount"].to_string(), "10.00");
    assert!(all["data"][0].get("timeline").is_none(), "lists do not carry timelines");

    // Pages: the cursor continues after the previous page's last order.
    let page = admin_json(&app, "/admin/orders?limit=2").await;
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    let cursor = page["next_cursor"].as_str().expect("a second page").to_string();
    let rest = admin_json(&app, &format!("/admin/orders?limit=2&cursor={cursor}")).await;
    assert_eq!(rest["data"][0]["order_id"], first.as_str());
    assert_eq!(rest["next_cursor"], Value::Null);

    // By status.
    let pending = admin_json(&app, "/admin/orders?status=pending_payment").await;
    let pending: BTreeSet<&str> = pending["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["order_id"].as_str().unwrap())
        .collect();
    assert_eq!(pending, BTreeSet::from([parked.as_str(), third.as_str()]));
    let fulfilled = admin_json(&app, "/admin/orders?status=fulfilled").await;
    assert_eq!(fulfilled["data"].as_array().unwrap().len(), 1);
    assert_eq!(
        admin_json(&app, "/admin/orders?status=cancelled").await["data"],
        json!([])
    );

    // Admins only; bad filters are named.
    assert_eq!(app.get("/admin/orders", Some(&alice)).await.status(), 403);
    assert_eq!(app.get("/admin/orders", None).await.status(), 401);
    let problem = expect_problem(
        app.get("/admin/orders?status=lost", Some(&app.admin)).await,
        400,
        "validation_failed",
    )
    .await;
    assert_eq!(common::error_fields(&problem), ["query.status"]);
}

/// The "must show" of the dashboard: in a real browser the page loads under its CSP, asks for a
/// token (refusing a bad one), shows the live numbers the API gives, replays the dead job from its
/// button, and picks up changes made elsewhere on its next automatic refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_in_headless_chromium_shows_live_numbers_and_replays_a_dead_job() {
    let browser = Browser::launch().await;
    let app = TestApp::spawn(Backend::Sqlite).await;
    let product = app.product("10.00", 100).await;
    let (_, alice) = app.customer().await;
    let fulfilled = order(&app, &alice, &product, None).await;
    let parked = order(&app, &alice, &product, Some("tok_unavailable")).await;
    app.drain().await;
    // The dead job sets off the dead-jobs alarm, which the page shows.
    evaluate_once(app.store.as_ref(), &AlarmSettings::default())
        .await
        .unwrap();

    let dead = admin_json(&app, "/admin/jobs?state=dead").await;
    assert_eq!(dead["data"].as_array().unwrap().len(), 1);
    let dead_job = dead["data"][0]["job_id"].as_str().unwrap().to_string();
    let queues = admin_json(&app, "/admin/queues").await;
    assert_eq!(total(&queues, "dead"), 1);

    // The shell: public, no data in it, its own CSP with no inline code or other origins.
    let shell = app.get("/ops", None).await;
    assert_eq!(shell.status(), 200);
    let csp = shell.headers()["content-security-policy"].to_str().unwrap().to_string();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{csp} lacks {directive}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    let html = shell.text().await.unwrap();
    assert!(
        !html.contains(&parked) && !html.contains("<script>"),
        "the shell carries no data or inline script"
    );
    for asset in ["/ops/app.js", "/ops/app.css"] {
        assert_eq!(app.get(asset, None).await.status(), 200, "{asset}");
    }

    // Without a token the page asks for one; a bad one is refused and asked for again.
    browser.goto(&format!("{}/ops", app.url)).await;
    browser
        .wait_for(
            "the token form",
            WAIT,
            "return !document.getElementById('login').hidden && document.getElementById('dashboard').hidden",
            |v| *v == true,
        )
        .await;
    browser.type_into("#token", "not-a-token").await;
    browser.click("#login button[type=submit]").await;
    browser
        .wait_for(
            "the bad token to be refused",
            WAIT,
            "return document.getElementById('status').textContent",
            |v| v.as_str().is_some_and(|s| s.contains("401")),
        )
        .await;
    assert_eq!(
        browser.script("return document.getElementById('login').hidden").await,
        false
    );

    // With `#token=…` (as a bookmark would): the token is kept for the tab and taken out of the
    // address bar, and the live numbers appear.
    browser.goto("about:blank").await;
    browser
        .goto(&format!("{}/ops#token={}&refresh=2", app.url, app.admin))
        .await;
    browser
        .wait_for(
            "the dashboard to show one dead job",
            WAIT,
            "return document.getElementById('total-dead').textContent",
            |v| *v == "1",
        )
        .await;
    assert_eq!(browser.script("return location.hash").await, "");
    assert_eq!(browser.script("return location.href").await, format!("{}/ops", app.url));
    assert_eq!(
        browser
            .script("return sessionStorage.getItem('orderflow.ops.token')")
            .await,
        app.admin.as_str()
    );
    let page = browser
        .script(
            "const text = (id) => document.getElementById(id).textContent;
             const rows = (id) => [...document.querySelectorAll('#' + id + ' tbody tr')];
             return {
               status: text('status'), statusClass: document.getElementById('status').className,
               ready: text('total-ready'), running: text('total-running'), dead: text('total-dead'),
               alarms: text('alarm-count'),
               firing: [...document.querySelectorAll('#alarms li.firing')].map((li) => li.dataset.alarm),
               steps: rows('queues').map((r) => [r.dataset.step, r.cells[3].textContent]),
               deadJobs: rows('dead-jobs').map((r) => r.dataset.jobId),
               orders: rows('orders').map((r) => [r.dataset.orderId, r.dataset.status]),
               replayButtons: document.querySelectorAll('#dead-jobs button.replay').length,
             };",
        )
        .await;
    assert!(page["status"].as_str().unwrap().starts_with("Updated"), "{page}");
    assert_eq!(page["statusClass"], "status ok");
    assert_eq!(page["ready"], total(&queues, "ready").to_string());
    assert_eq!(page["running"], total(&queues, "running").to_string());
    assert_eq!(page["deadJobs"], json!([dead_job]));
    assert_eq!(page["replayButtons"], 1);
    let steps: Vec<(String, String)> = queues["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| (q["kind"].as_str().unwrap().to_string(), q["dead"].to_string()))
        .collect();
    assert_eq!(page["steps"], json!(steps));
    assert_eq!(
        page["orders"],
        json!([[parked, "pending_payment"], [fulfilled, "fulfilled"]])
    );
    let ready: Value = app.get("/health/ready", None).await.json().await.unwrap();
    let firing: Vec<&str> = ready["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["alarm"].as_str().unwrap())
        .collect();
    assert!(firing.contains(&"dead_jobs"), "{ready}");
    assert_eq!(page["alarms"], firing.len().to_string());
    assert_eq!(page["firing"], json!(firing));

    // The Replay button puts the dead job back to ready (checked in the store, not the page).
    browser
        .click(&format!("#dead-jobs button.replay[data-job-id='{dead_job}']"))
        .await;
    browser
        .wait_for(
            "the replay to be reported",
            WAIT,
            "return document.getElementById('replay-result').textContent",
            |v| v.as_str().is_some_and(|s| s.contains("replayed")),
        )
        .await;
    let job = app
        .store
        .list_jobs(&JobFilter {
            state: None,
            kind: None,
            after: None,
            limit: 100,
        })
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|job| job.job_id.to_string() == dead_job)
        .expect("the replayed job");
    assert_eq!(job.state, "ready");
    assert_eq!(job.attempts, 0);
    assert_eq!(admin_json(&app, "/admin/jobs?state=dead").await["data"], json!([]));
    browser
        .wait_for(
            "the dead count to drop",
            WAIT,
            "return [document.getElementById('total-dead').textContent,
                     document.querySelectorAll('#dead-jobs button.replay').length]",
            |v| *v == json!(["0", 0]),
        )
        .await;

    // A change made elsewhere shows on the page's own next refresh, with no click.
    let refreshes = browser.script("return Number(document.body.dataset.refreshes)").await;
    let newest = order(&app, &alice, &product, None).await;
    let expected_ready = total(&admin_json(&app, "/admin/queues").await, "ready").to_string();
    let seen = browser
        .wait_for(
            "the next automatic refresh to show the new order",
            WAIT,
            "return [Number(document.body.dataset.refreshes),
                     document.querySelector('#orders tbody tr').dataset.orderId,
                     document.getElementById('total-ready').textContent]",
            |v| v[1] == newest.as_str(),
        )
        .await;
    assert!(seen[0].as_u64() > refreshes.as_u64(), "{seen} after {refreshes}");
    assert_eq!(seen[2], expected_ready.as_str());

    browser.quit().await;
}

/// Every metric the Grafana dashboard queries is one `/metrics` exposes (after a scenario that
/// touches every series), and each panel has a query.
#[tokio::test]
async fn grafana_dashboard_queries_only_exposed_metrics() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/ops/grafana/orderflow.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("ops/grafana/orderflow.json")).expect("valid JSON");
    assert_eq!(dashboard["uid"], "orderflow");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queried = BTreeSet::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{} has no targets", panel["title"]));
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            queried.extend(metric_names(expr));
        }
    }

    // A scenario that touches every series: fulfilled, declined and parked orders, a cancellation.
    let app = TestApp::spawn(Backend::Sqlite).await;
    let product = app.product("10.00", 100).await;
    let (_, alice) = app.customer().await;
    order(&app, &alice, &product, None).await;
    order(&app, &alice, &product, Some("tok_chargeDeclined")).await;
    order(&app, &alice, &product, Some("tok_unavailable")).await;
    let cancelled = order(&app, &alice, &product, None).await;
    let cancel = app
        .client
        .post(format!("{}/orders/{cancelled}/cancel", app.url))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 202);
    app.drain().await;
    evaluate_once(app.store.as_ref(), &AlarmSettings::default())
        .await
        .unwrap();
    let text = app.get("/metrics", None).await.text().await.unwrap();
    let exposed: BTreeSet<String> = text
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    // Only exported when an alert webhook is configured and an alarm fires (tests/alarms.rs).
    let eventual = BTreeSet::from(["orderflow_alert_deliveries_total".to_string()]);
    let missing: Vec<&String> = queried
        .iter()
        .filter(|name| !exposed.contains(*name) && !eventual.contains(*name))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries series /metrics does not expose: {missing:?}"
    );
    for family in [
        "orderflow_http_requests_total",
        "orderflow_orders_placed_total",
        "orderflow_step_ready_jobs",
        "orderflow_step_oldest_ready_job_age_seconds",
        "orderflow_step_dead_jobs",
        "orderflow_payments_total",
        "orderflow_db_pool_connections",
        "orderflow_alarm_firing",
    ] {
        assert!(queried.contains(family), "the dashboard does not chart {family}");
    }
}

/// The `orderflow_…` names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("orderflow_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}
