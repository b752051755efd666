//! A PgBouncer of the test's own in `pool_mode = transaction`, on a free port in front of a
//! PostgreSQL server, with few server connections so that clients really share them. Its
//! configuration, user list and log live in a temp dir; it is stopped on drop.
//!
//! The binary comes from `ORDERFLOW_TEST_PGBOUNCER` (default `/usr/sbin/pgbouncer`, Debian's
//! package); a test that cannot find it fails, saying how to install it. PgBouncer refuses to run
//! as root: as root it is started with `-u postgres`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct PgBouncer {
    child: Child,
    dir: tempfile::TempDir,
    pub port: u16,
    /// Server connections per database and user (`default_pool_size`).
    pub pool_size: u32,
}

impl PgBouncer {
    /// Starts PgBouncer in transaction mode in front of the server at `127.0.0.1:server_port`,
    /// every database name mapped to the same name there, `pool_size` server connections per
    /// database (trust authentication, user `postgres`).
    pub fn start(server_port: u16, pool_size: u32) -> Self {
        let bin = PathBuf::from(
            std::env::var("ORDERFLOW_TEST_PGBOUNCER").unwrap_or_else(|_| "/usr/sbin/pgbouncer".to_string()),
        );
        assert!(
            bin.exists(),
            "PgBouncer is not installed ({} is missing): install it with `apt-get install -y pgbouncer`, or point \
             ORDERFLOW_TEST_PGBOUNCER at its binary",
            bin.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("orderflow-pgbouncer-")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let path = |name: &str| dir.path().join(name).display().to_string();
        std::fs::write(path("userlist.txt"), "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            path("pgbouncer.ini"),
            format!(
                "[databases]\n\
                 * = host=127.0.0.1 port={server_port}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {userlist}\n\
                 admin_users = postgres\n\
                 pool_mode = transaction\n\
                 default_pool_size = {pool_size}\n\
                 min_pool_size = 0\n\
                 reserve_pool_size = 0\n\
                 max_client_conn = 500\n\
                 max_db_connections = {pool_size}\n\
                 ignore_startup_parameters = extra_float_digits,options\n\
                 logfile = {log}\n\
                 pidfile = {pid}\n",
                userlist = path("userlist.txt"),
                log = path("pgbouncer.log"),
                pid = path("pgbouncer.pid"),
            ),
        )
        .unwrap();
        let as_root = is_root();
        if as_root {
            let chowned = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path())
                .status()
                .expect("run chown");
            assert!(chowned.success(), "could not give {} to postgres", dir.path().display());
        }
        let mut command = Command::new(&bin);
        if as_root {
            command.args(["-u", "postgres"]);
        }
        let child = command
            .arg(path("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("could not start {}: {error}", bin.display()));
        let mut bouncer = PgBouncer {
            child,
            dir,
            port,
            pool_size,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = bouncer.child.try_wait() {
                panic!("PgBouncer exited ({status}) before listening:\n{}", bouncer.log());
            }
            assert!(
                Instant::now() < deadline,
                "PgBouncer did not listen on port {port} within 10 s:\n{}",
                bouncer.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        bouncer
    }

    /// `database_url` (a database on the server behind) as reached through this PgBouncer.
    pub fn url_for(&self, database_url: &str) -> String {
        let (_, database) = database_url.rsplit_once('/').expect("a URL ending with /<database>");
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The admin console (`SHOW CLIENTS`, `SHOW SERVERS`, …).
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/pgbouncer", self.port)
    }

    /// What PgBouncer logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}
