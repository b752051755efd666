//! A PostgreSQL cluster of the test's own — `initdb` into a temp dir, `pg_ctl` on a free port —
//! for tests that stop, crash and restart the database (the shared server on 5432 must never be
//! touched). PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres`
//! user and every command runs as it (`runuser`). The cluster is stopped and its directory removed
//! on drop.
//!
//! The binaries come from `ORDERFLOW_TEST_PG_BIN` (default `/usr/lib/postgresql/15/bin`); a test
//! that cannot find or start them fails, naming them.
//!
//! `src/bin/chaos.rs` (`orderflow-chaos`) includes this file too, for its own cluster.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// How `pg_ctl stop` (or `restart`) ends the running server.
#[derive(Clone, Copy, Debug)]
pub enum StopMode {
    /// Disconnects every session ("terminating connection due to administrator command") and
    /// shuts down cleanly.
    Fast,
    /// Kills every process at once, like a crash: the next start runs crash recovery.
    Immediate,
}

impl StopMode {
    fn flag(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

pub struct PrivatePostgres {
    bin: PathBuf,
    /// Removed on drop; holds the data directory, the socket and the log.
    dir: tempfile::TempDir,
    /// As root: the user the server runs as.
    run_as: Option<&'static str>,
    pub port: u16,
}

impl PrivatePostgres {
    /// `initdb` and start a cluster (trust authentication, user `postgres`) on a free port. It
    /// can stream to standbys ([`start_standby`](Self::start_standby)): `wal_level = replica`,
    /// WAL senders, and initdb's `replication` entries in pg_hba.conf, trusted like the rest.
    pub fn start() -> Self {
        let bin = PathBuf::from(
            std::env::var("ORDERFLOW_TEST_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".to_string()),
        );
        assert!(
            bin.join("initdb").exists() && bin.join("pg_ctl").exists(),
            "PostgreSQL's initdb and pg_ctl are not in {} (install postgresql-15, or point \
             ORDERFLOW_TEST_PG_BIN at the directory that has them)",
            bin.display()
        );
        let cluster = Self::empty(bin);
        let data = cluster.data_dir();
        cluster.run(
            "initdb",
            &[
                "-D",
                path(&data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        cluster.start_server();
        cluster
    }

    /// A cluster of its own directory and port, with nothing in it yet.
    fn empty(bin: PathBuf) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("orderflow-private-pg-")
            .tempdir()
            .expect("temp dir");
        let run_as = is_root().then_some("postgres");
        if let Some(user) = run_as {
            let chowned = Command::new("chown")
                .arg(format!("{user}:"))
                .arg(dir.path())
                .status()
                .expect("run chown");
            assert!(chowned.success(), "could not give {} to {user}", dir.path().display());
        }
        PrivatePostgres {
            bin,
            dir,
            run_as,
            port: free_port(),
        }
    }

    /// A hot standby of this cluster, streaming from it: `pg_basebackup -R` (which writes
    /// `standby.signal` and `primary_conninfo`) into a new directory, started on another free
    /// port. Databases created on the primary later reach it too (their creation is in the WAL).
    pub fn start_standby(&self) -> PrivatePostgres {
        let standby = Self::empty(self.bin.clone());
        let data = standby.data_dir();
        standby.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-D",
                path(&data),
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ],
        );
        standby.start_server();
        standby
    }

    /// Runs one SQL statement with `psql` on this server's `postgres` database (e.g.
    /// `SELECT pg_wal_replay_pause()` on a standby, where nothing can be written).
    pub fn psql(&self, sql: &str) {
        self.run(
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
        );
    }

    /// Makes `role` log in over TCP with its password (`scram-sha-256`) instead of being trusted:
    /// the line goes before initdb's, so it is the one that matches; the server reloads its
    /// configuration.
    pub fn require_password_for(&self, role: &str) {
        let hba = self.data_dir().join("pg_hba.conf");
        let existing = std::fs::read_to_string(&hba).expect("pg_hba.conf");
        // Rewritten in place, so the file keeps its owner.
        std::fs::write(&hba, format!("host all {role} 127.0.0.1/32 scram-sha-256\n{existing}")).expect("pg_hba.conf");
        let data = self.data_dir();
        self.pg_ctl(&["reload", "-D", path(&data)]);
    }

    /// The server's log (`pg_ctl -l`): its stderr, every statement when `log_statement` is `all`.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the stopped server and waits until it accepts connections.
    pub fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100 -c wal_level=replica \
             -c max_wal_senders=5",
            self.port,
            path(self.dir.path())
        );
        let (data, log) = (self.data_dir(), self.dir.path().join("server.log"));
        self.pg_ctl(&[
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            path(&data),
            "-l",
            path(&log),
            "-o",
            &options,
        ]);
    }

    /// Stops the server and waits until it is down.
    pub fn stop(&self, mode: StopMode) {
        let data = self.data_dir();
        self.pg_ctl(&["stop", "-w", "-t", "60", "-D", path(&data), "-m", mode.flag()]);
    }

    /// `pg_ctl restart`: stops it and starts it again (with the same options) at once.
    pub fn restart(&self, mode: StopMode) {
        let (data, log) = (self.data_dir(), self.dir.path().join("server.log"));
        self.pg_ctl(&[
            "restart",
            "-w",
            "-t",
            "60",
            "-D",
            path(&data),
            "-l",
            path(&log),
            "-m",
            mode.flag(),
        ]);
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn pg_ctl(&self, args: &[&str]) {
        self.run("pg_ctl", args);
    }

    /// One of the PostgreSQL programs, run as the cluster's owner.
    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        match self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(program);
                command
            }
            None => Command::new(program),
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let output = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|error| panic!("could not run {program} from {} ({error})", self.bin.display()));
        assert!(
            output.status.success(),
            "{program} {} failed: {}{}\nserver log:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.data_dir();
        if data.join("postmaster.pid").exists() {
            let _ = self
                .command("pg_ctl")
                .args(["stop", "-w", "-m", "immediate", "-D"])
                .arg(&data)
                .output();
        }
    }
}

fn path(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temp path")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
