//! The real `orderflow` binary as a test peer: `orderflow serve` started on a free port (its URL
//! read from the line it prints when listening), and the CLI run against the same database.
#![allow(dead_code)]

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_orderflow");

/// `orderflow` with the database and token secret set, logging warnings only.
pub fn command(db_url: &str, secret: &str) -> Command {
    let mut command = Command::new(BIN);
    command
        .arg("--database-url")
        .arg(db_url)
        .arg("--jwt-secret")
        .arg(secret)
        .env("ORDERFLOW_LOG", "warn")
        .envs(crate::common::profile_env(db_url))
        .kill_on_drop(true);
    command
}

/// A running `orderflow serve` on a free port.
pub struct Server {
    pub child: Child,
    pub url: String,
}

impl Server {
    /// Starts `orderflow serve --listen 127.0.0.1:0 <args>` and waits until it listens.
    pub async fn start(db_url: &str, secret: &str, args: &[&str]) -> Server {
        Self::spawn(db_url, secret, args, Stdio::inherit()).await
    }

    /// Like [`Server::start`], keeping the server's log (its stderr) for the test to read
    /// instead of showing it.
    pub async fn start_keeping_log(
        db_url: &str,
        secret: &str,
        args: &[&str],
    ) -> (Server, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        let mut server = Self::spawn(db_url, secret, args, Stdio::piped()).await;
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut lines = BufReader::new(server.child.stderr.take().expect("stderr")).lines();
        let kept = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                kept.lock().unwrap().push(line);
            }
        });
        (server, log)
    }

    async fn spawn(db_url: &str, secret: &str, args: &[&str], stderr: Stdio) -> Server {
        let mut child = command(db_url, secret)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start orderflow");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                if let Some(rest) = line.strip_prefix("orderflow listening on ") {
                    return rest.split_whitespace().next().expect("url").to_string();
                }
            }
            panic!("orderflow exited before listening")
        })
        .await
        .expect("orderflow did not start listening within 30 s");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Server { child, url }
    }

    pub async fn kill9(mut self) {
        self.child.start_kill().expect("SIGKILL");
        self.child.wait().await.expect("reap");
    }
}

/// Runs the CLI (`orderflow <args>`) against the database and waits for it.
pub async fn cli(db_url: &str, secret: &str, args: &[&str]) -> std::process::Output {
    command(db_url, secret)
        .args(args)
        .output()
        .await
        .expect("run orderflow")
}

/// A token minted by `orderflow token <args>`.
pub async fn token(db_url: &str, secret: &str, args: &[&str]) -> String {
    let mut all = vec!["token"];
    all.extend_from_slice(args);
    let output = cli(db_url, secret, &all).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}
