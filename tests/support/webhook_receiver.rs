//! A real webhook receiver for tests: `tests/support/webhook_receiver.py` started on a free
//! loopback port, verifying every delivery with the official Standard Webhooks library, answering
//! as told and recording what arrived. Use it from a test crate with
//!
//! ```ignore
//! #[path = "support/webhook_receiver.rs"]
//! mod webhook_receiver;
//! ```
//!
//! Needs `python3` with `standardwebhooks` (`python3 -m pip install standardwebhooks`; `.ci/run`
//! installs it); `ORDERFLOW_TEST_PYTHON` picks another interpreter. Self-contained on purpose: it
//! depends on nothing in `tests/common`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

/// How long the receiver may take to start.
const START_DEADLINE: Duration = Duration::from_secs(20);
/// How often [`WebhookReceiver::wait_for`] asks the receiver.
const POLL_EVERY: Duration = Duration::from_millis(50);

const INSTALL_HINT: &str = "The webhook tests need a real receiver: tests/support/webhook_receiver.py, which runs \
     on python3 with the `standardwebhooks` package. Install it with `python3 -m pip install standardwebhooks` \
     (.ci/run does), or point ORDERFLOW_TEST_PYTHON at an interpreter that has it.";

fn python() -> String {
    std::env::var("ORDERFLOW_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// One request the receiver got, as it recorded it.
#[derive(Clone, Debug, Deserialize)]
pub struct Received {
    /// The `webhook-id` header.
    pub webhook_id: Option<String>,
    /// The `webhook-timestamp` header.
    pub webhook_timestamp: Option<String>,
    /// The `webhook-signature` header.
    pub signature_header: Option<String>,
    /// Whether any configured secret verified it with the official library.
    pub verified: bool,
    /// The indexes (into the last `set_secrets`) of the secrets that verified it.
    pub verified_with: Vec<usize>,
    /// Why it did not verify.
    pub error: Option<String>,
    /// The status the receiver answered.
    pub answered_status: u16,
    /// The body parsed as JSON, if it was JSON.
    pub body: Option<Value>,
    /// The body as text.
    pub raw_body: String,
    /// The HTTP method.
    pub method: String,
    /// The request path (with query).
    pub path: String,
    /// Every request header, names lower-cased.
    pub headers: BTreeMap<String, String>,
}

impl Received {
    /// A request header by (any-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }

    /// The CloudEvent `type`.
    pub fn event_type(&self) -> Option<&str> {
        self.body.as_ref()?.get("type")?.as_str()
    }

    /// The CloudEvent `id`.
    pub fn event_id(&self) -> Option<&str> {
        self.body.as_ref()?.get("id")?.as_str()
    }

    /// The order the event is about: `data.order.order_id`, else the `orders/<id>` subject.
    pub fn order_id(&self) -> Option<String> {
        let body = self.body.as_ref()?;
        if let Some(id) = body.pointer("/data/order/order_id").and_then(Value::as_str) {
            return Some(id.to_owned());
        }
        body.get("subject")?
            .as_str()?
            .strip_prefix("orders/")
            .map(str::to_owned)
    }

    /// The CloudEvent `sequence`.
    pub fn sequence(&self) -> Option<i64> {
        self.body.as_ref()?.get("sequence")?.as_i64()
    }

    /// The CloudEvent `position`.
    pub fn position(&self) -> Option<i64> {
        self.body.as_ref()?.get("position")?.as_i64()
    }
}

/// `tests/support/webhook_receiver.py`, running for one test; killed on drop.
pub struct WebhookReceiver {
    child: Child,
    port: u16,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl WebhookReceiver {
    /// Starts the receiver and waits (with a deadline) for it to listen. Panics, saying how to
    /// install it, when python3 or `standardwebhooks` is missing.
    pub async fn start() -> Self {
        match tokio::task::spawn_blocking(Self::spawn).await {
            Ok(receiver) => receiver,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => panic!("webhook receiver start-up: {error}"),
        }
    }

    fn spawn() -> Self {
        let python = python();
        let importable = Command::new(&python)
            .args(["-c", "import standardwebhooks.webhooks"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !importable {
            panic!(
                "`{python}` cannot import `standardwebhooks`: run `python3 -m pip install standardwebhooks`. {INSTALL_HINT}"
            );
        }
        let dir = tempfile::tempdir().expect("receiver dir");
        let log = dir.path().join("receiver.log");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/webhook_receiver.py");
        let mut child = Command::new(&python)
            .arg(&script)
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("receiver log"))
            .spawn()
            .unwrap_or_else(|error| {
                panic!("could not run `{python}` for the webhook receiver ({error}). {INSTALL_HINT}")
            });
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(START_DEADLINE).unwrap_or_default();
        let port = line
            .strip_prefix("listening on ")
            .and_then(|p| p.trim().parse::<u16>().ok());
        let Some(port) = port else {
            for _ in 0..40 {
                if !line.is_empty() || !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            let what = match child.try_wait() {
                Ok(Some(status)) => format!("exited ({status})"),
                _ => format!("did not report `listening on <port>` within {START_DEADLINE:?}"),
            };
            let _ = child.kill();
            let _ = child.wait();
            let stderr = std::fs::read_to_string(&log).unwrap_or_default();
            panic!(
                "the webhook receiver ({python} {}) {what}; stdout: {line:?}; stderr:\n{stderr}\n{INSTALL_HINT}",
                script.display()
            );
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("control client");
        WebhookReceiver {
            child,
            port,
            http,
            _dir: dir,
        }
    }

    /// The receiver's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`: the receiver's root, for other paths.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The URL deliveries go to: `http://127.0.0.1:<port>/hooks`.
    pub fn url(&self) -> String {
        format!("{}/hooks", self.base_url())
    }

    async fn control(&self, path: &str, body: Value) {
        let url = format!("{}{path}", self.base_url());
        let response = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|error| panic!("webhook receiver {path}: {error}"));
        let status = response.status();
        assert!(
            status.is_success(),
            "webhook receiver {path}: {status}: {:?}",
            response.text().await
        );
    }

    /// The secrets a delivery may verify with (any of them).
    pub async fn set_secrets(&self, secrets: &[&str]) {
        self.control("/_control/secrets", json!({ "secrets": secrets })).await;
    }

    /// How to answer: a JSON list of rules, first match wins (see the script's docstring), e.g.
    /// `json!([{"match": {"type": "order.paid"}, "status": 500, "times": 1}])`.
    pub async fn set_rules(&self, rules: Value) {
        self.control("/_control/rules", json!({ "rules": rules })).await;
    }

    /// Forgets secrets, rules and deliveries.
    pub async fn reset(&self) {
        self.control("/_control/reset", json!({})).await;
    }

    /// Everything received so far, in arrival order.
    pub async fn received(&self) -> Vec<Received> {
        let url = format!("{}/_received", self.base_url());
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|error| panic!("webhook receiver /_received: {error}"));
        let text = response.text().await.expect("/_received body");
        serde_json::from_str(&text).unwrap_or_else(|error| panic!("webhook receiver /_received: {error}: {text}"))
    }

    /// Polls until `done` holds for what was received, and returns it; panics with what it saw
    /// once `deadline` has passed.
    pub async fn wait_for(&self, done: impl Fn(&[Received]) -> bool, deadline: Duration) -> Vec<Received> {
        let give_up = tokio::time::Instant::now() + deadline;
        loop {
            let received = self.received().await;
            if done(&received) {
                return received;
            }
            if tokio::time::Instant::now() >= give_up {
                panic!(
                    "the webhook receiver did not see what was expected within {deadline:?}; it received {} \
                     request(s):\n{received:#?}",
                    received.len()
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
