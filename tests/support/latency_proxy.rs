//! A TCP proxy between orderflow and PostgreSQL, for the tests that need to see or shape the
//! wire: it puts a one-way latency on every chunk in each direction (a region across a WAN; the
//! order of chunks kept, and chunks in flight overlap as on a real link), and it reads the
//! client's side of the PostgreSQL protocol to count round trips.
//!
//! A round trip is one batch of frontend messages the client then waits on: everything up to a
//! `Sync` (extended protocol) or a `Query` (simple protocol). Each is recorded with the SQL it
//! carries — a `Bind` is named by the statement its `Parse` prepared on that connection — so a
//! test can tell a checkout's statements from a background wake-up; a batch that prepares a
//! statement begins with [`PREPARE`] and a bare `Sync` is recorded as [`PING`]. A test may also hold a batch before it is forwarded ([`Hold`]) to change the
//! database between two of the client's round trips.
//!
//! The client must not negotiate TLS (`sslmode=disable`): the proxy reads plain protocol.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The label of a round trip that carried no statement (sqlx's ping).
pub const PING: &str = "<ping>";

/// How the label of a round trip that prepares a statement (`Parse`, and sqlx's `Describe`)
/// begins: sqlx prepares each statement once per connection and caches it.
pub const PREPARE: &str = "prepare: ";

/// Called with each round trip's SQL before it is forwarded; a returned future is awaited
/// first (the batch is held until it completes).
pub type Hold = Arc<dyn Fn(&str) -> Option<Wait> + Send + Sync>;

/// What a [`Hold`] waits for.
pub type Wait = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

pub struct LatencyProxy {
    pub addr: SocketAddr,
    round_trips: Arc<Mutex<Vec<String>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl LatencyProxy {
    /// Forwards a free local port to `target`, each direction delayed by `one_way`.
    pub async fn start(target: SocketAddr, one_way: Duration) -> Self {
        Self::start_with(target, one_way, None).await
    }

    pub async fn start_with(target: SocketAddr, one_way: Duration, hold: Option<Hold>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy port");
        let addr = listener.local_addr().expect("proxy address");
        let round_trips = Arc::new(Mutex::new(Vec::new()));
        let log = round_trips.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (log, hold) = (log.clone(), hold.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return; // the client sees its connection closed
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let upstream = pipe(client_read, server_write, one_way, Some((log, hold)));
                    let downstream = pipe(server_read, client_write, one_way, None);
                    tokio::join!(upstream, downstream);
                });
            }
        });
        Self {
            addr,
            round_trips,
            accept,
        }
    }

    /// The `postgres://` URL of `database` on the proxied server, through the proxy.
    pub fn url(&self, database_url: &str) -> String {
        let database = database_url.rsplit('/').next().unwrap_or("postgres");
        let database = database.split('?').next().unwrap_or(database);
        format!("postgres://postgres@{}/{database}?sslmode=disable", self.addr)
    }

    /// Every round trip so far, in the order they were sent (across connections), by its SQL.
    pub fn round_trips(&self) -> Vec<String> {
        self.round_trips.lock().unwrap().clone()
    }

    /// How many round trips have been sent.
    pub fn count(&self) -> usize {
        self.round_trips.lock().unwrap().len()
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read, in order. On the
/// client's side (`log`), chunks are cut at message boundaries and round trips recorded.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    log: Option<(Arc<Mutex<Vec<String>>>, Option<Hold>)>,
) {
    let (send, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut frontend = Frontend::default();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let read = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            let chunk = match &log {
                None => buffer[..read].to_vec(),
                Some((log, hold)) => {
                    let (chunk, trips) = frontend.feed(&buffer[..read]);
                    for trip in trips {
                        if let Some(wait) = hold.as_ref().and_then(|hold| hold(&trip)) {
                            wait.await;
                        }
                        log.lock().unwrap().push(trip);
                    }
                    chunk
                }
            };
            if !chunk.is_empty() && send.send((Instant::now() + delay, chunk)).is_err() {
                break;
            }
        }
    };
    tokio::join!(reader, writer);
}

/// The client's side of one connection, parsed just enough to name its round trips.
#[derive(Default)]
struct Frontend {
    pending: Vec<u8>,
    /// Past the startup packet (and any SSL/GSS request before it).
    started: bool,
    /// Statement name → SQL, from this connection's `Parse` messages ("" is the unnamed one).
    statements: HashMap<String, String>,
    /// The SQL of the batch being sent, until its `Sync`.
    batch: Vec<String>,
}

impl Frontend {
    /// Takes bytes read from the client; returns the complete messages among them (to forward)
    /// and the round trips they completed.
    fn feed(&mut self, bytes: &[u8]) -> (Vec<u8>, Vec<String>) {
        self.pending.extend_from_slice(bytes);
        let (mut at, mut trips) = (0, Vec::new());
        loop {
            let rest = &self.pending[at..];
            if !self.started {
                // Untyped: length (4 bytes, itself included), then the body.
                let Some(length) = rest
                    .get(..4)
                    .map(|b| u32::from_be_bytes(b.try_into().unwrap()) as usize)
                else {
                    break;
                };
                if rest.len() < length {
                    break;
                }
                let code = rest.get(4..8).map(|b| u32::from_be_bytes(b.try_into().unwrap()));
                // 80877103: SSLRequest, 80877104: GSSENCRequest; the startup packet follows.
                if !matches!(code, Some(80877103) | Some(80877104)) {
                    self.started = true;
                }
                at += length;
                continue;
            }
            let Some(length) = rest
                .get(1..5)
                .map(|b| u32::from_be_bytes(b.try_into().unwrap()) as usize)
            else {
                break;
            };
            if rest.len() < 1 + length {
                break;
            }
            let (kind, body) = (rest[0], &rest[5..1 + length]);
            let strings = |body: &[u8]| -> Vec<String> {
                body.split(|b| *b == 0)
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            };
            match kind {
                b'P' => {
                    let parts = strings(body);
                    let (name, sql) = (parts[0].clone(), parts.get(1).cloned().unwrap_or_default());
                    self.statements.insert(name, sql.clone());
                    self.batch.push(format!("{PREPARE}{sql}"));
                }
                b'B' => {
                    let parts = strings(body);
                    let statement = parts.get(1).cloned().unwrap_or_default();
                    let sql = self.statements.get(&statement).cloned().unwrap_or_default();
                    self.batch.push(sql);
                }
                b'S' => {
                    let batch = std::mem::take(&mut self.batch);
                    trips.push(if batch.is_empty() {
                        PING.to_string()
                    } else {
                        batch.join("; ")
                    });
                }
                b'Q' => {
                    self.batch.clear();
                    trips.push(strings(body).into_iter().next().unwrap_or_default());
                }
                _ => {}
            }
            at += 1 + length;
        }
        let complete = self.pending.drain(..at).collect();
        (complete, trips)
    }
}
