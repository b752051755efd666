//! The operators' views: the `/ops` page driven in headless Chromium (it loads under its strict
//! CSP, shows the numbers the admin API gives, replays a dead job from its button and picks up
//! changes on its own refresh; its Integrations section shows a failing webhook endpoint and its
//! delivery log, disables it and replays a position range to it), the admin list of every order
//! behind it on both backends, and the Grafana dashboard in `ops/grafana/` (valid JSON that
//! queries only series `/metrics` exposes).

mod common;
#[path = "support/webdriver.rs"]
mod webdriver;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Backend, TestApp, expect_problem};
use orderflow::events::{EventSettings, WebhookSettings};
use orderflow::monitoring::alarms::{AlarmSettings, evaluate_once};
use orderflow::store::jobs::JobFilter;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    // The sales chart: one bar per hour of the report, the fulfilled order's in the current
    // hour (the parked one is not paid, so not a sale), drawn from the same report the API gives.
    let report = admin_json(&app, "/admin/reports/sales?granularity=hour").await;
    let periods = report["data"].as_array().unwrap().len();
    let chart = browser
        .wait_for(
            "the sales chart to draw the report",
            WAIT,
            "const bars = [...document.querySelectorAll('#sales-chart rect.gross')];
             return {
               bars: bars.length,
               sold: bars.filter((b) => b.dataset.orders !== '0')
                 .map((b) => [b.dataset.period, b.dataset.orders, b.dataset.gross, Number(b.getAttribute('height')) > 0]),
               empty: bars.filter((b) => b.dataset.orders === '0').every((b) => Number(b.getAttribute('height')) === 0),
               summary: document.getElementById('sales-summary').textContent,
             };",
            |v| v["bars"].as_u64().is_some_and(|n| n > 0),
        )
        .await;
    assert_eq!(chart["bars"], periods, "{chart}");
    let placed_at = admin_json(&app, &format!("/orders/{fulfilled}")).await["created_at"]
        .as_str()
        .unwrap()
        .to_string();
    let hour = format!("{}:00:00Z", &placed_at[..13]);
    // (JavaScript reads the amount 10.00 as the number 10.)
    assert_eq!(chart["sold"], json!([[hour, "1", "10", true]]), "{chart}");
    assert_eq!(chart["empty"], true, "{chart}");
    assert!(
        chart["summary"].as_str().unwrap().starts_with("1 order(s) · 1 unit(s)"),
        "{chart}"
    );

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

/// What the failing webhook receiver answers: a 500 whose body is markup, which the page must
/// show as text.
const SINK_ANSWER: &str = "<img src=x id=sink-markup><b>sink is down</b>";

/// A webhook receiver that is down: it reads each request and answers 500 with [`SINK_ANSWER`].
/// Returns its URL and how many requests it has answered.
async fn failing_sink() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks", listener.local_addr().unwrap());
    let answered = Arc::new(AtomicUsize::new(0));
    let counter = answered.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                // The whole request (head, then Content-Length bytes) before answering.
                let mut request = Vec::new();
                let mut buffer = [0u8; 8192];
                loop {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                    let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
                    let length = head
                        .lines()
                        .find_map(|line| line.strip_prefix("content-length:"))
                        .and_then(|value| value.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if request.len() >= end + 4 + length {
                        break;
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let answer = format!(
                    "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n{SINK_ANSWER}",
                    SINK_ANSWER.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (url, answered)
}

/// The relay running in the background until dropped.
struct Relay {
    stop: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    /// Polls fast; a failed delivery is retried only after a minute, so a test sees it failing.
    fn start(app: &TestApp) -> Relay {
        let settings = EventSettings {
            webhooks: WebhookSettings {
                timeout: Duration::from_secs(5),
                schedule: vec![Duration::ZERO, Duration::from_secs(60)],
                ..WebhookSettings::default()
            },
            poll_interval: Duration::from_millis(50),
            ..EventSettings::default()
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(orderflow::events::run(
            app.store.clone(),
            settings,
            app.metrics.clone(),
            stopped,
        ));
        Relay { stop }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Polls an admin GET until `accept` takes its body, or fails after [`WAIT`] with the last one.
async fn admin_until(app: &TestApp, path: &str, what: &str, accept: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body = admin_json(app, path).await;
        if accept(&body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}: last {path} answered {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The Integrations section against a real relay and a receiver that answers 500: the endpoint
/// shows as failing with its counts, its delivery log shows the failing attempt (status, error,
/// the receiver's answer as text), the toggle disables it, the replay form queues a position
/// range (and shows the problem detail of a bad one), and the feed's last position is shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn integrations_show_a_failing_endpoint_disable_it_and_replay() {
    let browser = Browser::launch().await;
    let (sink, sink_answered) = failing_sink().await;
    let app = TestApp::spawn(Backend::Sqlite).await;

    // Created before the order, so the order's events fan out to it.
    let created = app
        .post(
            "/admin/webhook-endpoints",
            Some(&app.admin),
            &json!({ "url": sink, "enabled_events": ["order.*"], "description": "warehouse <b>bridge</b>" }),
        )
        .await;
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    let endpoint = created["endpoint_id"].as_str().unwrap().to_string();
    let endpoint_path = format!("/admin/webhook-endpoints/{endpoint}");
    let product = app.product("10.00", 100).await;
    let (_, alice) = app.customer().await;
    let placed = order(&app, &alice, &product, None).await;
    app.drain().await;
    let _relay = Relay::start(&app);

    // The relay positions the order's events and fails the first delivery; the order's later
    // events wait behind it.
    let feed = admin_until(&app, "/events?after=0&limit=1000", "the order's events", |feed| {
        feed["data"]
            .as_array()
            .is_some_and(|events| events.iter().any(|e| e["type"] == "order.fulfilled"))
    })
    .await;
    let last_position = feed["last_position"].as_i64().unwrap();
    let order_events: Vec<&Value> = feed["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_str().unwrap().starts_with("order."))
        .collect();
    assert!(order_events.len() >= 2, "{feed}");
    assert!(order_events.iter().all(|e| e["subject"] == format!("orders/{placed}")));
    let shown = admin_until(&app, &endpoint_path, "a failing delivery", |e| {
        e["health"]["failing"] == 1 && e["health"]["pending"] == order_events.len()
    })
    .await;
    assert_eq!(shown["health"]["failed"], 0);
    assert!(sink_answered.load(Ordering::SeqCst) >= 1);
    let pending = admin_json(&app, &format!("{endpoint_path}/deliveries?state=pending")).await;
    let failing: Vec<&Value> = pending["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["attempts"].as_i64() > Some(0))
        .collect();
    assert_eq!(failing.len(), 1, "{pending}");
    let failing = failing[0].clone();
    assert_eq!(failing["event_type"], "order.placed");
    assert_eq!(failing["last_status"], 500);
    let attempt = &failing["attempt_log"][0];
    assert_eq!(attempt["response_excerpt"], SINK_ANSWER);
    let error = attempt["error"].as_str().unwrap().to_string();
    assert!(error.contains("500"), "{error}");

    // The section: the endpoint with its counts, the feed's last position, no NATS.
    browser
        .goto(&format!("{}/ops#token={}&refresh=2", app.url, app.admin))
        .await;
    let row = format!("document.querySelector(\"#webhook-endpoints tr[data-endpoint-id='{endpoint}']\")");
    let cells = format!(
        "const row = {row};
         if (!row) return null;
         const cell = (field) => row.querySelector('[data-field=\"' + field + '\"]').textContent;
         return {{
           status: row.dataset.status, statusText: cell('status'), url: cell('url'), events: cell('events'),
           pending: cell('pending'), failing: cell('failing'), failed: cell('failed'), oldest: cell('oldest'),
           failingSince: cell('failing-since'),
           toggle: row.querySelector('button[data-action=toggle]').textContent,
           feed: document.getElementById('feed-position').textContent,
           nats: document.getElementById('nats-backlog').textContent,
           tile: document.getElementById('webhook-failures').textContent,
           latest: [...document.querySelectorAll('#latest-events tbody tr')].map((r) => Number(r.dataset.position)),
         }};"
    );
    let page = browser
        .wait_for("the failing endpoint", WAIT, &cells, |v| {
            v["failing"] == "1" && v["feed"] == last_position.to_string()
        })
        .await;
    assert_eq!(page["status"], "enabled");
    assert_eq!(page["statusText"], "enabled");
    assert_eq!(
        page["url"],
        format!("{sink}warehouse <b>bridge</b>"),
        "the description, as text"
    );
    assert_eq!(page["events"], "order.*");
    assert_eq!(page["pending"], order_events.len().to_string());
    assert_eq!(page["failed"], "0");
    assert_ne!(page["oldest"], "–");
    assert_ne!(page["failingSince"], "–");
    assert_eq!(page["toggle"], "Disable");
    assert_eq!(page["nats"], "not configured");
    assert_eq!(page["tile"], "1");
    let newest: Vec<i64> = (1..=last_position).rev().take(5).collect();
    assert_eq!(page["latest"], json!(newest));

    // The delivery log: the failing delivery with its last attempt; the receiver's markup is text.
    browser
        .click(&format!(
            "#webhook-endpoints button[data-action=deliveries][data-endpoint-id='{endpoint}']"
        ))
        .await;
    let delivery_id = failing["delivery_id"].as_str().unwrap();
    let deliveries = browser
        .wait_for(
            "the failing delivery",
            WAIT,
            "if (document.getElementById('endpoint-detail').hidden) return null;
             return [...document.querySelectorAll('#webhook-deliveries tbody tr[data-delivery-id]')].map((row) => {
               const cell = (field) => row.querySelector('[data-field=\"' + field + '\"]').textContent;
               return { id: row.dataset.deliveryId, event: row.dataset.eventId, state: cell('state'),
                        position: cell('position'), attempts: cell('attempts'), status: cell('status'),
                        error: cell('error'), excerpt: cell('excerpt'), next: cell('next'),
                        attempted: cell('attempted') };
             });",
            |v| v.as_array().is_some_and(|rows| !rows.is_empty()),
        )
        .await;
    let shown = &deliveries[0];
    assert_eq!(
        deliveries.as_array().unwrap().len(),
        1,
        "only the failing one: {deliveries}"
    );
    assert_eq!(shown["id"], delivery_id);
    assert_eq!(shown["event"], failing["event_id"]);
    assert_eq!(shown["state"], "failing");
    assert_eq!(shown["position"], failing["position"].to_string());
    assert_eq!(shown["attempts"], "1");
    assert_eq!(shown["status"], "500");
    assert_eq!(shown["error"], error.as_str());
    assert_eq!(shown["excerpt"], SINK_ANSWER);
    assert_ne!(shown["next"], "–");
    assert_ne!(shown["attempted"], "–");
    assert_eq!(
        browser
            .script(
                "return document.querySelectorAll('#integrations img, #integrations b').length
                        + (document.getElementById('sink-markup') ? 1 : 0)"
            )
            .await,
        0,
        "server strings are shown as text, never as markup"
    );

    // The toggle disables it (in the store, through the API) and the page says so.
    browser
        .click(&format!(
            "#webhook-endpoints button[data-action=toggle][data-endpoint-id='{endpoint}']"
        ))
        .await;
    let page = browser
        .wait_for("the endpoint to be disabled", WAIT, &cells, |v| {
            v["status"] == "disabled" && v["toggle"] == "Enable"
        })
        .await;
    assert_eq!(page["statusText"], "disableddisabled by an operator");
    let disabled = admin_json(&app, &endpoint_path).await;
    assert_eq!(disabled["status"], "disabled");
    assert_eq!(disabled["disabled_reason"], "disabled by an operator");
    let note = browser
        .script("return document.getElementById('endpoint-result').textContent")
        .await;
    assert!(note.as_str().unwrap().contains("disabled"), "{note}");
    browser
        .wait_for(
            "the delivery log to say deliveries wait",
            WAIT,
            "const next = document.querySelector('#webhook-deliveries tbody tr[data-delivery-id] [data-field=\"next\"]');
             return next && next.textContent;",
            |v| *v == "waits (endpoint disabled)",
        )
        .await;

    // A bad range: the problem's detail is shown.
    let result = "const node = document.getElementById('webhook-replay-result');
                  return [node.className, node.textContent, node.dataset.queued || null];";
    browser.type_into("#replay-from", &last_position.to_string()).await;
    browser.type_into("#replay-to", "1").await;
    browser.click("#webhook-replay button[type=submit]").await;
    let refused = browser
        .wait_for("the refused replay", WAIT, result, |v| v[0] == "error")
        .await;
    let text = refused[1].as_str().unwrap();
    assert!(
        text.contains("422") && text.contains("from_position must not be after to_position"),
        "{refused}"
    );

    // The whole feed again: every order event is queued once more, with its original id (the
    // endpoint is disabled, so they wait).
    browser
        .script("document.getElementById('replay-from').value = ''; document.getElementById('replay-to').value = '';")
        .await;
    browser.type_into("#replay-from", "1").await;
    browser.type_into("#replay-to", &last_position.to_string()).await;
    browser.click("#webhook-replay button[type=submit]").await;
    let queued = browser
        .wait_for("the replay to be queued", WAIT, result, |v| {
            v[0] == "note" && v[2] != Value::Null
        })
        .await;
    let n = order_events.len();
    assert_eq!(queued[2], n.to_string());
    assert!(
        queued[1].as_str().unwrap().contains(&format!("queued {n} deliveries")),
        "{queued}"
    );
    let all = admin_json(&app, &format!("{endpoint_path}/deliveries?limit=200")).await;
    let all = all["data"].as_array().unwrap();
    assert_eq!(all.len(), 2 * n, "{all:?}");
    // Newest first: the replayed ones, not yet attempted.
    let (replayed, original) = all.split_at(n);
    assert!(replayed.iter().all(|d| d["state"] == "pending" && d["attempts"] == 0));
    let ids = |deliveries: &[Value]| -> BTreeSet<String> {
        deliveries
            .iter()
            .map(|d| d["event_id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(replayed), ids(original));
    let expected: BTreeSet<String> = order_events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids(replayed), expected);
    let page = browser
        .wait_for("the pending count to include the replay", WAIT, &cells, |v| {
            v["pending"] == (2 * n).to_string()
        })
        .await;
    assert_eq!(page["failing"], "1");

    let console = browser.console().await;
    let problems: Vec<&Value> = console
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter(|entry| {
                    let message = entry["message"].as_str().unwrap_or_default();
                    message.contains("Content Security Policy") || message.contains("Uncaught")
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(problems.is_empty(), "{problems:?}");

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
