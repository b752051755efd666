//! A private NATS server with JetStream for one test, and a reader of what a stream holds.
//!
//! Use it with `#[path = "support/nats.rs"] mod nats_server;`. [`NatsServer::start`] runs
//! `nats-server -js` on a free localhost port with its store in a fresh temporary directory (log:
//! `nats-server.log` there) and returns once the port accepts connections; [`NatsServer::stop`]
//! and [`NatsServer::restart`] simulate an outage on the same port and store,
//! [`NatsServer::freeze`] and [`NatsServer::thaw`] a hung server; dropping it kills the server. [`stream_messages`] reads every message a stream holds, in stream order.
//!
//! Needs `nats-server` (v2.9 or later): `/usr/sbin/nats-server`, or on `PATH`.
//!
//! `src/bin/chaos.rs` (`orderflow-chaos`) includes this file too, for its own server.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::stream::RawMessageErrorKind;

const SERVER_BINARY: &str = "/usr/sbin/nats-server";
const READY_WITHIN: Duration = Duration::from_secs(10);

/// A `nats-server -js` process owned by one test.
pub struct NatsServer {
    port: u16,
    binary: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on a free localhost port with a fresh store; returns when it accepts TCP
    /// connections. Panics (saying how to get one) if there is no `nats-server`.
    pub fn start() -> NatsServer {
        let binary = find_binary();
        let dir = tempfile::Builder::new()
            .prefix("orderflow-nats-")
            .tempdir()
            .expect("create a temporary directory for nats-server");
        let port = free_port();
        let mut server = NatsServer {
            port,
            binary,
            dir,
            child: None,
        };
        server.spawn();
        server
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (kept across [`NatsServer::restart`]).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("jetstream")
    }

    /// The server's log (stdout and stderr of every run).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// Kills the server (SIGKILL, like a crash) and waits for it to exit. The port and the store
    /// stay reserved for [`NatsServer::restart`]. Does nothing if it is not running.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server if it runs, then starts it again on the same port with the same store;
    /// returns when it accepts TCP connections.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Freezes the server (SIGSTOP): its connections stay open but nothing is answered, like a
    /// hung server or a network black hole. [`NatsServer::thaw`] lets it go on.
    pub fn freeze(&mut self) {
        self.signal("STOP");
    }

    /// Resumes a frozen server (SIGCONT).
    pub fn thaw(&mut self) {
        self.signal("CONT");
    }

    fn signal(&mut self, signal: &str) {
        let pid = self.child.as_ref().expect("nats-server is not running").id();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap_or_else(|err| panic!("run kill -{signal} {pid}: {err}"));
        assert!(status.success(), "kill -{signal} {pid}: {status}");
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the nats-server log file");
        let stderr = log.try_clone().expect("clone the nats-server log file handle");
        let mut child = Command::new(&self.binary)
            .arg("-js")
            .args(["-a", "127.0.0.1"])
            .args(["-p", &self.port.to_string()])
            .arg("-sd")
            .arg(self.store_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap_or_else(|err| panic!("could not run {}: {err}\n{}", self.binary.display(), install_hint()));

        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nats-server exited ({status}) before accepting connections on port {}; its log:\n{}",
                    self.port,
                    read_log(&self.log_path())
                );
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "nats-server did not accept connections on port {} within {READY_WITHIN:?}; its log:\n{}",
                    self.port,
                    read_log(&self.log_path())
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn find_binary() -> PathBuf {
    if Path::new(SERVER_BINARY).is_file() {
        return PathBuf::from(SERVER_BINARY);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "nats-server not found at {SERVER_BINARY} nor on PATH.\n{}",
        install_hint()
    );
}

fn install_hint() -> String {
    "These tests start their own NATS server with JetStream (`nats-server -js`, v2.9 or later). Install it \
     (`apt-get install nats-server`, or a release binary from https://github.com/nats-io/nats-server/releases \
     put on PATH); the tests start and stop it themselves."
        .to_owned()
}

fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free localhost port");
    listener.local_addr().expect("local address").port()
}

fn read_log(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        use std::io::Read;
        let _ = file.read_to_string(&mut text);
    }
    text
}

/// The first value of header `name`, compared case-insensitively. (`HeaderMap::get` with a `&str`
/// misses the headers async-nats knows by name, such as `Nats-Msg-Id`, when they were parsed
/// from the wire.)
pub fn header(headers: &async_nats::HeaderMap, name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(key, _)| key.to_string().eq_ignore_ascii_case(name))
        .and_then(|(_, values)| values.first())
        .map(|value| value.as_str().to_owned())
}

/// One message as the stream stores it.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamMessage {
    /// The `Nats-Msg-Id` header ("" if absent).
    pub msg_id: String,
    pub subject: String,
    /// The payload, parsed as JSON.
    pub body: serde_json::Value,
    pub stream_sequence: u64,
}

/// Every message stream `stream` holds right now, in stream order (read one by one by sequence
/// with the JetStream message-get API, so nothing is consumed or acknowledged).
pub async fn stream_messages(url: &str, stream: &str) -> Vec<StreamMessage> {
    let client = async_nats::connect(url)
        .await
        .unwrap_or_else(|err| panic!("connect to {url} to read stream {stream}: {err}"));
    let context = jetstream::new(client);
    let mut handle = context
        .get_stream(stream)
        .await
        .unwrap_or_else(|err| panic!("stream {stream} on {url}: {err}"));
    let state = handle.info().await.expect("stream info").state.clone();
    let mut messages = Vec::with_capacity(state.messages as usize);
    if state.messages == 0 {
        return messages;
    }
    for sequence in state.first_sequence..=state.last_sequence {
        let message = match handle.get_raw_message(sequence).await {
            Ok(message) => message,
            // A deleted message leaves a gap in the sequence.
            Err(err) if matches!(err.kind(), RawMessageErrorKind::NoMessageFound) => continue,
            Err(err) => panic!("read message {sequence} of stream {stream}: {err}"),
        };
        let msg_id = header(&message.headers, "Nats-Msg-Id").unwrap_or_default();
        let body = serde_json::from_slice(&message.payload).unwrap_or_else(|err| {
            panic!(
                "message {sequence} of stream {stream} is not JSON ({err}): {:?}",
                String::from_utf8_lossy(&message.payload)
            )
        });
        messages.push(StreamMessage {
            msg_id,
            subject: message.subject.to_string(),
            body,
            stream_sequence: message.sequence,
        });
    }
    messages
}
