//! A real localstripe (PyPI `localstripe`, a third-party stateful Stripe emulator) for one test:
//! `python3 -m localstripe --port <free port> --from-scratch`, waited for (polled with a
//! deadline), killed on drop. Use it from a test crate with
//!
//! ```ignore
//! #[path = "support/localstripe.rs"]
//! mod localstripe;
//! ```
//!
//! Needs `python3` with `localstripe` (`python3 -m pip install localstripe==1.15.10`; `.ci/run`
//! installs it); `ORDERFLOW_TEST_PYTHON` picks another interpreter. Self-contained on purpose: it
//! depends on nothing in `tests/common`.
//!
//! Each instance is its own state (`--from-scratch`: nothing is loaded) on its own port, so tests
//! may run in parallel. localstripe also writes its whole store to `/tmp/localstripe.pickle` after
//! every change (a fixed path); with `--from-scratch` that file is never read, so instances running
//! side by side do not see each other.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The version `.ci/run` installs and these tests were written against.
pub const LOCALSTRIPE_VERSION: &str = "1.15.10";

/// A secret key localstripe accepts (it accepts any `sk_…` longer than five characters).
pub const SECRET_KEY: &str = "sk_test_orderflow_localstripe";

/// How long localstripe may take to answer after it is started.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How often start-up is polled.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// Ports tried before giving up (another process may take the free port first).
const START_ATTEMPTS: u32 = 3;

enum StartFailure {
    /// The process ended (e.g. the port was taken): another port may work.
    Exited(String),
    /// Still running but not answering in time.
    TooSlow(String),
}
use StartFailure::{Exited, TooSlow};

const INSTALL_HINT: &str = "The Stripe tests need localstripe (PyPI `localstripe`, a stateful Stripe emulator) \
     on python3. Install it with `python3 -m pip install localstripe==1.15.10` (.ci/run does), or point \
     ORDERFLOW_TEST_PYTHON at an interpreter that has it.";

fn python() -> String {
    std::env::var("ORDERFLOW_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A port nothing listens on right now (bound and released; localstripe binds it next).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// localstripe running for one test; killed on drop.
pub struct Localstripe {
    child: Child,
    port: u16,
    log: PathBuf,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Localstripe {
    /// Starts localstripe on a free port and waits until it answers an authenticated request.
    /// Panics, saying how to install it, when python3 or the package is missing, and with its
    /// output when it does not come up.
    pub async fn start() -> Self {
        let python = python();
        let importable = tokio::process::Command::new(&python)
            .args(["-c", "import localstripe"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|status| status.success());
        if !importable {
            panic!("`{python}` cannot import `localstripe`. {INSTALL_HINT}");
        }
        let dir = tempfile::tempdir().expect("localstripe dir");
        let log = dir.path().join("localstripe.log");
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("localstripe client");
        // The free port is released before localstripe binds it; if something else took it in
        // between, localstripe exits at once and another port is tried.
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port();
            let output = std::fs::File::create(&log).expect("localstripe log");
            let mut child = Command::new(&python)
                .args(["-m", "localstripe", "--port", &port.to_string(), "--from-scratch"])
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(output.try_clone().expect("log handle"))
                .stderr(output)
                .spawn()
                .unwrap_or_else(|error| panic!("could not run `{python} -m localstripe` ({error}). {INSTALL_HINT}"));
            match wait_until_up(&mut child, port, &http, &log).await {
                Ok(()) => {
                    return Localstripe {
                        child,
                        port,
                        log,
                        http,
                        _dir: dir,
                    };
                }
                Err(failure) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    match failure {
                        Exited(why) if attempt < START_ATTEMPTS => {
                            eprintln!("localstripe on port {port} {why}; trying another port")
                        }
                        Exited(why) => panic!("localstripe {why}\n{INSTALL_HINT}"),
                        TooSlow(why) => panic!("localstripe {why}"),
                    }
                }
            }
        }
        unreachable!("the last attempt panics")
    }

    /// `http://127.0.0.1:<port>`: the API base to give the Stripe client.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// What localstripe printed so far (its access log).
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A plain authenticated `GET` of localstripe's own state (e.g. `/v1/payment_intents/pi_…`),
    /// bypassing the client under test. Panics unless it answers 200 with JSON.
    pub async fn get(&self, path_and_query: &str) -> Value {
        let response = self
            .http
            .get(format!("{}{path_and_query}", self.base_url()))
            .bearer_auth(SECRET_KEY)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path_and_query} from localstripe: {e}"));
        let status = response.status();
        let body = response.text().await.expect("localstripe answer");
        assert!(status.is_success(), "GET {path_and_query}: {status} {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path_and_query}: not JSON ({e}): {body}"))
    }

    /// A plain authenticated form `POST` (e.g. to make objects the client under test did not).
    /// Panics unless it answers 200 with JSON.
    pub async fn post(&self, path: &str, form: &[(&str, &str)]) -> Value {
        let response = self
            .http
            .post(format!("{}{path}", self.base_url()))
            .bearer_auth(SECRET_KEY)
            .form(form)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path} to localstripe: {e}"));
        let status = response.status();
        let body = response.text().await.expect("localstripe answer");
        assert!(status.is_success(), "POST {path}: {status} {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("POST {path}: not JSON ({e}): {body}"))
    }
}

/// Polls (with a deadline) until localstripe answers an authenticated request.
async fn wait_until_up(child: &mut Child, port: u16, http: &reqwest::Client, log: &Path) -> Result<(), StartFailure> {
    let started = Instant::now();
    let url = format!("http://127.0.0.1:{port}/v1/payment_intents?limit=1");
    let output = || std::fs::read_to_string(log).unwrap_or_default();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Exited(format!(
                "exited ({status}) before answering on port {port}; its output:\n{}",
                output()
            )));
        }
        let answer = http
            .get(&url)
            .bearer_auth(SECRET_KEY)
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if answer.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        if started.elapsed() > START_DEADLINE {
            return Err(TooSlow(format!(
                "did not answer on port {port} within {START_DEADLINE:?}; its output:\n{}",
                output()
            )));
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

impl Drop for Localstripe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
