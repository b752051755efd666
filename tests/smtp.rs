//! E-mail through a real SMTP server: `tests/support/smtp_sink.py` (Python, `aiosmtpd`) is
//! started per test on a free port and writes every message it accepts into a directory. The saga
//! sends through [`SmtpNotifier`]; the tests read what the server received: one receipt and one
//! confirmation per paid order, one cancellation per declined order, each with its `To`,
//! `Subject`, `Message-ID` and `X-Correlation-Id`; never a second message of a kind; an SMTP
//! outage retried, dead-lettered and replayed into exactly one delivery.
//!
//! The sink needs `python3` with `aiosmtpd` (`python3 -m pip install aiosmtpd`; `.ci/run` installs
//! it). Without them these tests fail and say so; set `ORDERFLOW_TEST_PYTHON` to use another
//! interpreter.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Backend, TestDb};
use orderflow::adapters::notify::smtp::{SmtpNotifier, SmtpPassword, SmtpSettings, SmtpTls};
use orderflow::adapters::notify::{Message, Notifier};
use orderflow::adapters::payment::sandbox::Sandbox;
use orderflow::clock;
use orderflow::domain::{Cart, CartLine, CustomerId, OrderId, OrderStatus, PaymentToken, ProductId, Quantity};
use orderflow::queue::Runner;
use orderflow::store::jobs::{JobFilter, NotificationSlot, ReplaySelector, StepEffects};
use orderflow::store::sandbox::SandboxBooks;
use orderflow::store::{NewJob, PlaceOrderOutcome, Store};
use orderflow::workflow::checkout::{self, CheckoutRequest, CheckoutSettings};
use orderflow::workflow::{SEND_CANCELLATION, SEND_CONFIRMATION, SEND_RECEIPT};
use serde_json::{Value, json};

on_both_backends!(
    paid_order_gets_one_receipt_and_one_confirmation,
    declined_order_gets_one_cancellation,
    smtp_outage_is_retried_then_replayed_into_one_delivery,
);

const FROM: &str = "Example Shop <shop@example.com>";
const BUYER: &str = "buyer@example.com";
const SINK_DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// The SMTP sink

/// `tests/support/smtp_sink.py`, running for one test.
struct SmtpSink {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

/// One message as the server received it.
#[derive(Debug)]
struct Received {
    mail_from: String,
    rcpt_tos: Vec<String>,
    auth: Option<String>,
    headers: Vec<(String, String)>,
    body: String,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn headers_named(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    }

    /// The body, decoded from its transfer encoding (7-bit, or quoted-printable for long lines).
    fn text(&self) -> String {
        match self.header("Content-Transfer-Encoding").unwrap_or("7bit") {
            "7bit" | "8bit" => self.body.clone(),
            "quoted-printable" => decode_quoted_printable(&self.body),
            other => panic!("unexpected transfer encoding {other}"),
        }
    }

    fn message_id(&self) -> &str {
        self.header("Message-ID").unwrap_or_default()
    }
}

fn python() -> String {
    std::env::var("ORDERFLOW_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

const INSTALL_HINT: &str = "The SMTP tests need a real SMTP server: tests/support/smtp_sink.py, which runs on \
     python3 with the `aiosmtpd` package. Install it with `python3 -m pip install aiosmtpd` (.ci/run does), or \
     point ORDERFLOW_TEST_PYTHON at an interpreter that has it.";

impl SmtpSink {
    async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts the sink on a free loopback port and waits (with a deadline) for `ready <port>`.
    async fn start_with(extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        match tokio::task::spawn_blocking(move || Self::spawn(&extra)).await {
            Ok(sink) => sink,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => panic!("SMTP sink start-up: {error}"),
        }
    }

    fn spawn(extra: &[String]) -> Self {
        let dir = tempfile::tempdir().expect("sink dir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/smtp_sink.py");
        let python = python();
        let mut child = Command::new(&python)
            .arg(&script)
            .args(["--host", "127.0.0.1", "--port", "0", "--exit-on-stdin-eof", "--dir"])
            .arg(dir.path().join("mail"))
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("sink.log")).expect("sink log"))
            .spawn()
            .unwrap_or_else(|error| panic!("could not run `{python}` for the SMTP sink ({error}). {INSTALL_HINT}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(SINK_DEADLINE).unwrap_or_default();
        let port = line.strip_prefix("ready ").and_then(|p| p.trim().parse::<u16>().ok());
        let Some(port) = port else {
            // An empty line is end of output: give the process a moment to be reaped.
            for _ in 0..40 {
                if !line.is_empty() || !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            let what = match child.try_wait() {
                Ok(Some(status)) => format!("exited ({status})"),
                _ => format!("did not report `ready <port>` within {SINK_DEADLINE:?}"),
            };
            let _ = child.kill();
            let _ = child.wait();
            let stderr = std::fs::read_to_string(dir.path().join("sink.log")).unwrap_or_default();
            panic!(
                "the SMTP sink ({python} {}) {what}; stdout: {line:?}; stderr:\n{stderr}\n{INSTALL_HINT}",
                script.display()
            );
        };
        SmtpSink { child, port, dir }
    }

    /// Settings for a notifier that delivers here: plain text on loopback.
    fn settings(&self) -> SmtpSettings {
        SmtpSettings {
            port: self.port,
            tls: SmtpTls::None,
            timeout: Duration::from_secs(10),
            ..SmtpSettings::new("127.0.0.1", FROM)
        }
    }

    fn notifier(&self) -> Arc<SmtpNotifier> {
        Arc::new(SmtpNotifier::new(self.settings()).expect("valid SMTP settings"))
    }

    fn mail_dir(&self) -> PathBuf {
        self.dir.path().join("mail")
    }

    /// Everything received so far, in arrival order.
    fn received(&self) -> Vec<Received> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.mail_dir())
            .map(|dir| {
                dir.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "eml"))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names.iter().map(|path| parse_received(path)).collect()
    }

    /// The messages whose `Message-ID` names this order.
    fn for_order(&self, order: OrderId) -> Vec<Received> {
        let order = order.to_string();
        self.received()
            .into_iter()
            .filter(|m| m.message_id().contains(&order))
            .collect()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("sink.log")).unwrap_or_default();
            eprintln!(
                "--- SMTP sink log (port {}) ---\n{log}--- end of SMTP sink log ---",
                self.port
            );
        }
    }
}

fn parse_received(eml: &Path) -> Received {
    let raw = std::fs::read(eml).expect("read message");
    let raw = String::from_utf8(raw).expect("the message is UTF-8 (7-bit even)");
    let envelope: Value =
        serde_json::from_slice(&std::fs::read(eml.with_extension("json")).expect("read envelope")).expect("json");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header/body separator in {raw:?}"));
    // Unfold (RFC 5322 §2.2.3), then split into fields.
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            let last = headers.last_mut().expect("continuation after a field");
            last.1.push_str(line);
        } else {
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line {line:?}"));
            headers.push((name.to_string(), value.trim_start().to_string()));
        }
    }
    Received {
        mail_from: envelope["mail_from"].as_str().unwrap_or_default().to_string(),
        rcpt_tos: envelope["rcpt_tos"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default(),
        auth: envelope["auth"].as_str().map(String::from),
        headers,
        body: body.to_string(),
    }
}

fn decode_quoted_printable(text: &str) -> String {
    let bytes = text.replace("=\r\n", "").into_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes.as_slice();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'=' && tail.len() >= 2 {
            let hex = std::str::from_utf8(&tail[..2]).expect("ASCII escape");
            out.push(u8::from_str_radix(hex, 16).expect("quoted-printable escape"));
            rest = &tail[2..];
        } else {
            out.push(byte);
            rest = tail;
        }
    }
    String::from_utf8(out).expect("UTF-8 text")
}

/// A loopback port nobody listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

// ---------------------------------------------------------------------------------------------
// The shop

struct Shop {
    store: Arc<dyn Store>,
    runner: Arc<Runner>,
    product: ProductId,
    customer: CustomerId,
    _db: TestDb,
}

/// A job runner whose saga sends with `notifier`.
fn runner(store: &Arc<dyn Store>, notifier: Arc<dyn Notifier>) -> Arc<Runner> {
    let books: Arc<dyn SandboxBooks> = store.clone();
    common::saga_runner(store, Arc::new(Sandbox::new(books)), notifier)
}

impl Shop {
    async fn new(backend: Backend, notifier: Arc<dyn Notifier>) -> Self {
        let db = TestDb::new(backend).await;
        let store = db.connect().await;
        let (product, customer) = common::seed_lamp_and_buyer(store.as_ref(), BUYER).await;
        Shop {
            runner: runner(&store, notifier),
            store,
            product,
            customer,
            _db: db,
        }
    }

    async fn place(&self, token: &str, correlation_id: &str) -> OrderId {
        let request = CheckoutRequest {
            principal: self.customer.to_string(),
            idempotency_key: uuid::Uuid::now_v7().to_string(),
            customer_id: self.customer,
            cart: Cart::new(vec![CartLine {
                product_id: self.product,
                quantity: Quantity::parse(3).unwrap(),
            }])
            .unwrap(),
            payment_token: PaymentToken::parse(token).unwrap(),
            shipping: None,
            correlation_id: Some(correlation_id.to_string()),
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
        drain(&self.runner).await
    }

    async fn status(&self, order: OrderId) -> OrderStatus {
        self.store.get_order(order).await.unwrap().unwrap().order.status
    }

    /// (kind, state, attempts) of the order's notification records, sorted.
    async fn notifications(&self, order: OrderId) -> Vec<(String, String, i32)> {
        let mut records: Vec<_> = self
            .store
            .notifications(order)
            .await
            .unwrap()
            .into_iter()
            .map(|n| (n.kind, n.state, n.attempts))
            .collect();
        records.sort();
        records
    }

    /// Queues another `kind` job for the order, as a duplicate delivery or a replay would.
    async fn enqueue_again(&self, order: OrderId, kind: &'static str) {
        let effects = StepEffects {
            order_id: Some(order),
            enqueue: vec![NewJob {
                kind,
                payload: json!({ "order_id": order }),
                run_at: clock::now(),
                max_attempts: 3,
            }],
            ..Default::default()
        };
        self.store.complete_job(None, &effects, clock::now()).await.unwrap();
    }

    async fn assert_audit_clean(&self) {
        let report = self.store.audit().await.unwrap();
        assert!(report.is_clean(), "{report}");
    }
}

async fn drain(runner: &Arc<Runner>) {
    runner.drain(Duration::from_secs(60)).await.expect("queue drains");
}

/// The one message of `kind` (`receipt`, `confirmation`, `cancellation`) the sink received for
/// the order, checked field by field.
fn assert_one(messages: &[Received], order: OrderId, kind: &str, subject: &str, correlation: &str) {
    let message_id = format!("<{kind}.{order}@orderflow>");
    let matching: Vec<&Received> = messages.iter().filter(|m| m.message_id() == message_id).collect();
    assert_eq!(
        matching.len(),
        1,
        "exactly one {kind} for {order}; received: {messages:#?}"
    );
    let m = matching[0];
    assert_eq!(m.header("To"), Some(BUYER), "{m:#?}");
    assert_eq!(m.header("From"), Some("\"Example Shop\" <shop@example.com>"), "{m:#?}");
    assert_eq!(m.header("Subject"), Some(subject), "{m:#?}");
    assert_eq!(m.header("X-Correlation-Id"), Some(correlation), "{m:#?}");
    assert_eq!(m.header("Content-Type"), Some("text/plain; charset=utf-8"), "{m:#?}");
    for unique in ["Message-ID", "X-Correlation-Id", "To", "From", "Subject", "Date"] {
        assert_eq!(m.headers_named(unique), 1, "{unique} once: {m:#?}");
    }
    assert_eq!(
        (m.mail_from.as_str(), m.rcpt_tos.as_slice()),
        ("shop@example.com", [BUYER.to_string()].as_slice())
    );
    assert!(m.text().starts_with("Hello Bea,\r\n"), "{m:#?}");
}

// ---------------------------------------------------------------------------------------------
// Through the saga, on both backends

async fn paid_order_gets_one_receipt_and_one_confirmation(backend: Backend) {
    let sink = SmtpSink::start().await;
    let shop = Shop::new(backend, sink.notifier()).await;
    let order = shop.place("tok_visa", "corr-smtp-visa").await;
    shop.drain().await;
    assert_eq!(shop.status(order).await, OrderStatus::Fulfilled);

    let received = sink.for_order(order);
    assert_eq!(received.len(), 2, "{received:#?}");
    assert_one(
        &received,
        order,
        "receipt",
        &format!("Payment received for order {order}"),
        "corr-smtp-visa",
    );
    assert_one(
        &received,
        order,
        "confirmation",
        &format!("Your order {order} is on its way"),
        "corr-smtp-visa",
    );
    let receipt = received
        .iter()
        .find(|m| m.message_id().starts_with("<receipt."))
        .unwrap();
    assert!(
        receipt
            .text()
            .contains(&format!("we received your payment of 75.00 USD for order {order}.")),
        "{receipt:#?}"
    );
    assert_eq!(
        shop.notifications(order).await,
        [
            ("send_confirmation".to_string(), "sent".to_string(), 1),
            ("send_receipt".to_string(), "sent".to_string(), 1)
        ]
    );

    // At most one per kind: draining again, or a duplicate job for each kind, sends nothing new…
    shop.drain().await;
    shop.enqueue_again(order, SEND_RECEIPT).await;
    shop.enqueue_again(order, SEND_CONFIRMATION).await;
    shop.drain().await;
    assert_eq!(sink.for_order(order).len(), 2, "{:#?}", sink.received());
    let jobs = shop.store.jobs_for_order(order).await.unwrap();
    assert_eq!(jobs.iter().filter(|j| j.kind == SEND_RECEIPT).count(), 2);
    assert!(jobs.iter().all(|j| j.state == "succeeded"), "{jobs:?}");
    // …because the store refuses the slot for a kind already sent.
    for kind in [SEND_RECEIPT, SEND_CONFIRMATION] {
        assert_eq!(
            shop.store
                .prepare_notification(order, kind, BUYER, clock::now())
                .await
                .unwrap(),
            NotificationSlot::AlreadySent,
            "{kind}"
        );
    }
    assert_eq!(sink.received().len(), 2);
    shop.assert_audit_clean().await;
}

async fn declined_order_gets_one_cancellation(backend: Backend) {
    let sink = SmtpSink::start().await;
    let shop = Shop::new(backend, sink.notifier()).await;
    let declined = shop.place("tok_chargeDeclined", "corr-smtp-declined").await;
    let paid = shop.place("tok_visa", "corr-smtp-paid").await;
    shop.drain().await;
    assert_eq!(shop.status(declined).await, OrderStatus::Cancelled);

    let received = sink.for_order(declined);
    assert_eq!(received.len(), 1, "{received:#?}");
    assert_one(
        &received,
        declined,
        "cancellation",
        &format!("Your order {declined} was cancelled"),
        "corr-smtp-declined",
    );
    // Each order's messages carry that order's correlation id.
    let other = sink.for_order(paid);
    assert_eq!(other.len(), 2);
    assert!(
        other
            .iter()
            .all(|m| m.header("X-Correlation-Id") == Some("corr-smtp-paid"))
    );

    shop.enqueue_again(declined, SEND_CANCELLATION).await;
    shop.drain().await;
    assert_eq!(sink.for_order(declined).len(), 1);
    assert_eq!(
        shop.store
            .prepare_notification(declined, SEND_CANCELLATION, BUYER, clock::now())
            .await
            .unwrap(),
        NotificationSlot::AlreadySent
    );
    assert_eq!(
        shop.notifications(declined).await,
        [("send_cancellation".to_string(), "sent".to_string(), 1)]
    );
    shop.assert_audit_clean().await;
}

async fn smtp_outage_is_retried_then_replayed_into_one_delivery(backend: Backend) {
    let sink = SmtpSink::start().await;
    let down_port = closed_port();
    let down = SmtpNotifier::new(SmtpSettings {
        port: down_port,
        ..sink.settings()
    })
    .unwrap();
    let shop = Shop::new(backend, Arc::new(down)).await;
    let order = shop.place("tok_visa", "corr-smtp-outage").await;
    shop.drain().await;

    // The order itself went through; only the e-mails are parked, with every attempt's error.
    assert_eq!(shop.status(order).await, OrderStatus::Fulfilled);
    let dead = shop
        .store
        .list_jobs(&JobFilter {
            state: Some("dead".into()),
            kind: None,
            after: None,
            limit: 50,
        })
        .await
        .unwrap()
        .items;
    let mut kinds: Vec<&str> = dead.iter().map(|j| j.kind.as_str()).collect();
    kinds.sort();
    assert_eq!(kinds, [SEND_CONFIRMATION, SEND_RECEIPT]);
    for job in &dead {
        assert_eq!((job.attempts, job.errors.len()), (3, 3), "{job:?}");
        let error = job.last_error.as_deref().unwrap_or_default();
        assert!(
            error.contains(&format!("SMTP 127.0.0.1:{down_port}"))
                && error.contains("transient, no SMTP reply")
                && error.contains("refused"),
            "{error}"
        );
    }
    assert_eq!(
        shop.notifications(order).await,
        [
            ("send_confirmation".to_string(), "sending".to_string(), 3),
            ("send_receipt".to_string(), "sending".to_string(), 3)
        ],
        "prepared three times, never recorded as sent"
    );
    assert!(sink.received().is_empty());

    // The server is fixed (here: the notifier pointed at the live one) and the operator replays.
    let fixed = runner(&shop.store, sink.notifier());
    let replayed = shop
        .store
        .replay_jobs(&ReplaySelector::AllDead { kind: None }, clock::now())
        .await
        .unwrap();
    assert_eq!(replayed, 2);
    drain(&fixed).await;

    let received = sink.for_order(order);
    assert_eq!(received.len(), 2, "{received:#?}");
    assert_one(
        &received,
        order,
        "receipt",
        &format!("Payment received for order {order}"),
        "corr-smtp-outage",
    );
    assert_one(
        &received,
        order,
        "confirmation",
        &format!("Your order {order} is on its way"),
        "corr-smtp-outage",
    );
    assert_eq!(
        shop.notifications(order).await,
        [
            ("send_confirmation".to_string(), "sent".to_string(), 4),
            ("send_receipt".to_string(), "sent".to_string(), 4)
        ]
    );
    let jobs = shop.store.jobs_for_order(order).await.unwrap();
    assert!(jobs.iter().all(|j| j.state == "succeeded"), "{jobs:?}");
    // Replaying again finds nothing; draining again sends nothing.
    assert_eq!(
        shop.store
            .replay_jobs(&ReplaySelector::AllDead { kind: None }, clock::now())
            .await
            .unwrap(),
        0
    );
    drain(&fixed).await;
    assert_eq!(sink.received().len(), 2);
    shop.assert_audit_clean().await;
}

// ---------------------------------------------------------------------------------------------
// The notifier against the server directly (no database)

fn message(to: &str, id: &str) -> Message {
    Message {
        to: to.into(),
        subject: "Grüße aus dem Laden".into(),
        body: "Hallo Zoë,\n\nLieferung unterwegs: 3 × Lampe.\n".into(),
        message_id: format!("<{id}@orderflow>"),
        correlation_id: Some(format!("corr-{id}")),
    }
}

#[tokio::test]
async fn smtp_reply_codes_are_in_the_error() {
    let sink = SmtpSink::start_with(&[
        "--reject-rcpt",
        "bounce@example.com=550 5.1.1 mailbox unavailable",
        "--reject-rcpt",
        "busy@example.com=451 4.3.0 try again later",
    ])
    .await;
    let notifier = sink.notifier();

    let permanent = notifier
        .send(&message("bounce@example.com", "p1"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        permanent.contains("permanent error (550): 5.1.1 mailbox unavailable")
            && permanent.contains("mailbox unavailable"),
        "{permanent}"
    );
    let transient = notifier
        .send(&message("busy@example.com", "t1"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        transient.contains("transient error (451): 4.3.0 try again later") && transient.contains("try again later"),
        "{transient}"
    );
    assert!(sink.received().is_empty());

    // Non-ASCII subject and body arrive intact (encoded by lettre, decoded here by Python's
    // standard library to be independent of our own parsing).
    notifier.send(&message(BUYER, "utf8")).await.unwrap();
    let received = sink.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].header("X-Correlation-Id"), Some("corr-utf8"));
    let eml = std::fs::read_dir(sink.mail_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "eml"))
        .unwrap();
    let decoded = Command::new(python())
        .args([
            "-c",
            "import sys, email, email.policy\n\
             m = email.message_from_binary_file(open(sys.argv[1], 'rb'), policy=email.policy.default)\n\
             sys.stdout.buffer.write((m['Subject'] + '\\n' + m.get_content()).encode())",
        ])
        .arg(&eml)
        .output()
        .expect("python decodes the message");
    assert!(decoded.status.success(), "{}", String::from_utf8_lossy(&decoded.stderr));
    assert_eq!(
        String::from_utf8(decoded.stdout).unwrap().trim_end(),
        "Grüße aus dem Laden\nHallo Zoë,\n\nLieferung unterwegs: 3 × Lampe."
    );
}

#[tokio::test]
async fn credentials_are_used_and_wrong_ones_refused() {
    let sink = SmtpSink::start_with(&["--auth", "shop:s3cret"]).await;
    let with = |password: &str| {
        SmtpNotifier::new(SmtpSettings {
            username: Some("shop".into()),
            password: Some(SmtpPassword::new(password)),
            ..sink.settings()
        })
        .unwrap()
    };

    let refused = with("wrong").send(&message(BUYER, "a1")).await.unwrap_err().to_string();
    assert!(refused.contains("(535)"), "{refused}");
    assert!(
        !refused.contains("wrong"),
        "the password is not in the error: {refused}"
    );
    let anonymous = sink
        .notifier()
        .send(&message(BUYER, "a2"))
        .await
        .unwrap_err()
        .to_string();
    assert!(anonymous.contains("(530)"), "{anonymous}");
    assert!(sink.received().is_empty());

    with("s3cret").send(&message(BUYER, "a3")).await.unwrap();
    let received = sink.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].auth.as_deref(), Some("shop"));
}

#[tokio::test]
async fn starttls_required_means_no_plain_text_fallback() {
    // The sink offers no STARTTLS: a notifier that requires it must not send in the clear.
    let sink = SmtpSink::start().await;
    let notifier = SmtpNotifier::new(SmtpSettings {
        tls: SmtpTls::StartTls,
        ..sink.settings()
    })
    .unwrap();
    let error = notifier.send(&message(BUYER, "tls1")).await.unwrap_err().to_string();
    assert!(
        error.contains(&format!("SMTP 127.0.0.1:{}", sink.port)) && error.contains("STARTTLS is not supported"),
        "{error}"
    );
    assert!(sink.received().is_empty());
}

#[tokio::test]
async fn a_stalled_server_is_cut_off_by_the_timeout() {
    // Accepts connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let notifier = SmtpNotifier::new(SmtpSettings {
        port,
        tls: SmtpTls::None,
        timeout: Duration::from_millis(500),
        ..SmtpSettings::new("127.0.0.1", FROM)
    })
    .unwrap();
    let started = std::time::Instant::now();
    let error = notifier.send(&message(BUYER, "slow1")).await.unwrap_err().to_string();
    assert!(error.contains("timed out after 500ms"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    silent.abort();
}
