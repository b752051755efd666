//! A minimal W3C WebDriver client for the browser tests: it starts Debian's `chromedriver`, which
//! drives headless `chromium`, and speaks the WebDriver JSON protocol to it with `reqwest` (no
//! Selenium, no extra crates). Only what the tests use: open a URL, find, click, type, run a
//! script, read the browser's console log.
//!
//! When `chromium` or `chromedriver` is missing the test fails, naming the packages to install:
//! a browser test that silently skips would hide a broken dashboard.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The key of a web element reference in the WebDriver protocol.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
const INSTALL: &str = "the dashboard browser test needs Debian's Chromium and its WebDriver: \
                       `apt-get install -y chromium chromium-driver` (or point ORDERFLOW_CHROMIUM and \
                       ORDERFLOW_CHROMEDRIVER at them)";

fn binary(variable: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(variable)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    assert!(path.exists(), "{} not found: {INSTALL}", path.display());
    path
}

/// One headless Chromium session. Dropping it ends the session and stops the driver.
pub struct Browser {
    http: reqwest::Client,
    session: String,
    driver: Child,
    /// Whether the session was ended already.
    closed: bool,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn launch() -> Self {
        let chromium = binary("ORDERFLOW_CHROMIUM", "/usr/bin/chromium");
        let chromedriver = binary("ORDERFLOW_CHROMEDRIVER", "/usr/bin/chromedriver");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}; {INSTALL}", chromedriver.display()));
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = match http.get(format!("{base}/status")).send().await {
                Ok(response) => response
                    .json::<Value>()
                    .await
                    .is_ok_and(|status| status["value"]["ready"] == true),
                Err(_) => false,
            };
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not come up on port {port}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().expect("a browser profile dir");
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": { "browser": "ALL" },
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    // Root in a container has no user namespace for the sandbox.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        } } });
        let response: Value = http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await
            .expect("chromedriver answers")
            .json()
            .await
            .expect("a JSON answer");
        let session = response["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromedriver could not start chromium: {response}; {INSTALL}"))
            .to_string();
        Browser {
            http,
            session: format!("{base}/session/{session}"),
            driver,
            closed: false,
            _profile: profile,
        }
    }

    /// One command; the `value` of its answer, or the WebDriver error.
    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value, Value> {
        let mut request = self.http.request(method, format!("{}{path}", self.session));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("chromedriver answers");
        let ok = response.status().is_success();
        let body: Value = response.json().await.expect("a JSON answer");
        if ok {
            Ok(body["value"].clone())
        } else {
            Err(body["value"].clone())
        }
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.command(reqwest::Method::POST, path, Some(body))
            .await
            .unwrap_or_else(|error| panic!("POST {path}: {error}"))
    }

    pub async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    /// The first element matching a CSS selector, if any.
    pub async fn find(&self, css: &str) -> Option<String> {
        let found = self
            .command(
                reqwest::Method::POST,
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await;
        match found {
            Ok(element) => Some(
                element[ELEMENT]
                    .as_str()
                    .unwrap_or_else(|| panic!("an element reference, not {element}"))
                    .to_string(),
            ),
            Err(error) if error["error"] == "no such element" => None,
            Err(error) => panic!("find {css}: {error}"),
        }
    }

    async fn element(&self, css: &str) -> String {
        self.find(css)
            .await
            .unwrap_or_else(|| panic!("no element matches {css}"))
    }

    /// A real click (the browser's own hit testing), not a script's `click()`.
    pub async fn click(&self, css: &str) {
        let element = self.element(css).await;
        self.post(&format!("/element/{element}/click"), json!({})).await;
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let element = self.element(css).await;
        self.post(&format!("/element/{element}/value"), json!({ "text": text }))
            .await;
    }

    /// Runs a script in the page (`return …` gives its value).
    pub async fn script(&self, source: &str) -> Value {
        self.post("/execute/sync", json!({ "script": source, "args": [] }))
            .await
    }

    /// Waits until `check` (a script returning a value) gives something `accept` takes, or fails
    /// after `timeout` with the last value, the page's status line and its console log.
    pub async fn wait_for(&self, what: &str, timeout: Duration, check: &str, accept: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.script(check).await;
            if accept(&value) {
                return value;
            }
            if Instant::now() > deadline {
                let status = self
                    .script("return (document.getElementById('status') || {}).textContent")
                    .await;
                panic!(
                    "timed out after {timeout:?} waiting for {what}: last value {value}; page status {status}; \
                     console: {}",
                    self.console().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The browser console so far (CSP violations and script errors show up here).
    pub async fn console(&self) -> Value {
        self.command(reqwest::Method::POST, "/se/log", Some(json!({ "type": "browser" })))
            .await
            .unwrap_or_else(|error| error)
    }

    /// Ends the session (closing Chromium) and stops the driver.
    pub async fn quit(mut self) {
        let _ = self.command(reqwest::Method::DELETE, "", None).await;
        self.closed = true;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.closed {
            // After a failed assertion (no runtime to await on): end the session with a plain
            // blocking request, so Chromium does not outlive its driver.
            end_session_blocking(&self.session);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn end_session_blocking(session_url: &str) {
    use std::io::{Read, Write};
    let Some(rest) = session_url.strip_prefix("http://") else {
        return;
    };
    let Some((host, path)) = rest.split_once('/') else {
        return;
    };
    let Ok(mut stream) = std::net::TcpStream::connect(host) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let request = format!("DELETE /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_ok() {
        let _ = stream.read_to_end(&mut Vec::new());
    }
}
