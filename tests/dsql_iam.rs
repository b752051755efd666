//! Token authentication (`--dsql-region`'s machinery) against a real PostgreSQL that checks
//! passwords: a private cluster whose role `app` logs in with `scram-sha-256`, standing in for
//! Aurora DSQL, with each token put in force by `ALTER ROLE app PASSWORD … VALID UNTIL` its expiry
//! — which also kills the token before, harsher than DSQL, where a token works until it expires.
//! The pool keeps opening new connections across several renewals, long after the first token
//! stopped working, because the refresher installed each new token before the old one expired;
//! a failed renewal is retried in time while open connections keep working; the store renews its
//! token and reconnects with it; a start with a bad token fails naming the token. The AWS side (a
//! real token's shape, missing credentials, forced TLS) is shown by unit tests in
//! src/store/dsql_auth.rs and, through the binary, at the end of this file.

#[path = "support/private_postgres.rs"]
mod private_postgres;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use orderflow::store::dsql_auth::{DsqlAuth, Token, TokenRefresher, TokenSource};
use orderflow::store::{ConnectOptions, DatabaseProfile};
use private_postgres::PrivatePostgres;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

const ROLE: &str = "app";
const WAIT: Duration = Duration::from_secs(60);

/// Issues passwords for `app`: each call sets a new one, valid for `lifetime`.
struct RotatingPasswords {
    /// The cluster as its (trusted) superuser.
    admin: PgConnectOptions,
    lifetime: Duration,
    issued: AtomicU32,
    /// Calls to fail before issuing again.
    failures_due: AtomicU32,
    failed: AtomicU32,
}

impl RotatingPasswords {
    fn new(cluster: &PrivatePostgres, lifetime: Duration) -> Arc<Self> {
        Arc::new(Self {
            admin: cluster.url().parse().unwrap(),
            lifetime,
            issued: AtomicU32::new(0),
            failures_due: AtomicU32::new(0),
            failed: AtomicU32::new(0),
        })
    }

    fn issued(&self) -> u32 {
        self.issued.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl TokenSource for RotatingPasswords {
    async fn token(&self) -> anyhow::Result<Token> {
        if self
            .failures_due
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |due| due.checked_sub(1))
            .is_ok()
        {
            self.failed.fetch_add(1, Ordering::SeqCst);
            anyhow::bail!("the token service is down (injected)");
        }
        let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let secret = format!("token-{n}-{}", uuid::Uuid::now_v7().simple());
        let mut admin = PgConnection::connect_with(&self.admin).await?;
        // The role's one password: the previous token stops working now.
        sqlx::query(&format!(
            "ALTER ROLE {ROLE} PASSWORD '{secret}' VALID UNTIL '{}'",
            (chrono::Utc::now() + self.lifetime).to_rfc3339()
        ))
        .execute(&mut admin)
        .await?;
        admin.close().await?;
        Ok(Token {
            secret,
            valid_for: self.lifetime,
        })
    }
}

/// A private cluster where `app` needs its password, and the database the store uses.
async fn cluster() -> PrivatePostgres {
    let cluster = PrivatePostgres::start();
    cluster.psql(&format!("CREATE ROLE {ROLE} LOGIN PASSWORD 'not-a-token'"));
    cluster.psql(&format!("CREATE DATABASE shop OWNER {ROLE}"));
    cluster.require_password_for(ROLE);
    // The reload is asynchronous: wait until `app` is really asked for its password.
    let deadline = Instant::now() + WAIT;
    while PgConnection::connect_with(&role_options(&cluster)).await.is_ok() {
        assert!(Instant::now() < deadline, "pg_hba.conf was not reloaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster
}

/// `app` on the cluster's `shop` database, without a password.
fn role_options(cluster: &PrivatePostgres) -> PgConnectOptions {
    PgConnectOptions::new()
        .host("127.0.0.1")
        .port(cluster.port)
        .username(ROLE)
        .database("shop")
}

fn role_url(cluster: &PrivatePostgres) -> String {
    format!("postgres://{ROLE}@127.0.0.1:{}/shop", cluster.port)
}

/// Waits until `done` holds.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A connection the pool opens now (the one it had is closed first), with its backend's pid.
async fn fresh_connection(pool: &PgPool) -> sqlx::Result<i32> {
    let mut connection = pool.acquire().await?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *connection)
        .await?;
    // Closed rather than returned: the next acquire must open a connection.
    connection.close().await?;
    Ok(pid)
}

fn refused(error: &sqlx::Error) -> bool {
    error.to_string().contains("password authentication failed")
}

/// Passwords for `app` that the test, not the source, puts in force.
struct IssuedPasswords {
    issued: std::sync::Mutex<Vec<String>>,
    failures_due: AtomicU32,
    failed: AtomicU32,
    lifetime: Duration,
}

#[async_trait]
impl TokenSource for IssuedPasswords {
    async fn token(&self) -> anyhow::Result<Token> {
        if self
            .failures_due
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |due| due.checked_sub(1))
            .is_ok()
        {
            self.failed.fetch_add(1, Ordering::SeqCst);
            anyhow::bail!("the token service is down (injected)");
        }
        let secret = format!("token-{}", uuid::Uuid::now_v7().simple());
        self.issued.lock().unwrap().push(secret.clone());
        Ok(Token {
            secret,
            valid_for: self.lifetime,
        })
    }
}

/// Makes `password` the role's one password, refused after `lifetime` (a token's expiry): the
/// previous one stops working at once.
async fn put_in_force(cluster: &PrivatePostgres, password: &str, lifetime: Duration) {
    let mut admin = PgConnection::connect(&cluster.url()).await.unwrap();
    sqlx::query(&format!(
        "ALTER ROLE {ROLE} PASSWORD '{password}' VALID UNTIL '{}'",
        (chrono::Utc::now() + lifetime).to_rfc3339()
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    admin.close().await.unwrap();
}

/// The token in force still opens a connection: the one that replaces it was installed before
/// it expired.
async fn still_opens(cluster: &PrivatePostgres, token: &str) {
    PgConnection::connect_with(&role_options(cluster).password(token))
        .await
        .expect("the token in force expired before its successor was installed")
        .close()
        .await
        .unwrap();
}

/// Whether the pool opens its next connections with `password` (test only: sqlx's Debug of the
/// options shows it).
fn installed(pool: &PgPool, password: &str) -> bool {
    format!("{:?}", pool.connect_options()).contains(password)
}

/// The refresher under a server that enforces each token's expiry: every token is put in force
/// (`VALID UNTIL` its expiry) as soon as the refresher has installed it, which kills the one
/// before — so each new connection succeeds only if the token in the pool is the newest one and
/// was installed before the previous one expired.
#[tokio::test]
async fn new_connections_keep_working_while_the_token_rotates() {
    let cluster = cluster().await;
    let lifetime = Duration::from_secs(4);
    let source = Arc::new(IssuedPasswords {
        issued: Default::default(),
        failures_due: AtomicU32::new(0),
        failed: AtomicU32::new(0),
        lifetime,
    });
    let first = source.token().await.unwrap();
    put_in_force(&cluster, &first.secret, lifetime).await;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(role_options(&cluster).password(&first.secret))
        .await
        .unwrap();
    // Held open from the start: a connection outlives the token it opened with.
    let mut held = pool.acquire().await.unwrap().detach();
    let refresher = TokenRefresher::spawn(pool.clone(), source.clone(), first.valid_for);
    let newest = || source.issued.lock().unwrap().last().cloned().unwrap();

    // Four renewals; between them the pool opens new connections again and again.
    let started = Instant::now();
    let mut in_force = first.secret.clone();
    let mut renewals = 0;
    let mut pids = std::collections::HashSet::new();
    while renewals < 4 {
        let latest = newest();
        if latest != in_force && installed(&pool, &latest) {
            still_opens(&cluster, &in_force).await;
            put_in_force(&cluster, &latest, lifetime).await;
            in_force = latest;
            renewals += 1;
        }
        let pid = fresh_connection(&pool)
            .await
            .unwrap_or_else(|error| panic!("a new connection failed after {renewals} renewals: {error}"));
        pids.insert(pid);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(started.elapsed() < WAIT, "only {renewals} renewals");
    }
    assert!(pids.len() > 10, "only {} connections were opened", pids.len());
    // At about half the lifetime, not more often: four renewals take about 4 × 2 s.
    assert!(started.elapsed() >= lifetime * 3 / 2, "{:?}", started.elapsed());
    // The first token opens nothing any more: only the refresher's installs kept the pool going.
    let error = PgConnection::connect_with(&role_options(&cluster).password(&first.secret))
        .await
        .expect_err("the first token still works");
    assert!(refused(&error), "{error}");

    // The token service fails twice: the refresher warns and retries with backoff (0.5 s, then
    // 1 s), and still installs a token before the current one expires (2 s after the first try).
    source.failures_due.store(2, Ordering::SeqCst);
    let deadline = Instant::now() + WAIT;
    while !(source.failed.load(Ordering::SeqCst) == 2 && installed(&pool, &newest()) && newest() != in_force) {
        assert!(Instant::now() < deadline, "no renewal after the failures");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    still_opens(&cluster, &in_force).await;
    put_in_force(&cluster, &newest(), lifetime).await;
    fresh_connection(&pool)
        .await
        .expect("a new connection with the renewed token");
    // The connection opened with the first token, long dead, still answers.
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut held).await.unwrap();
    assert_eq!(one, 1);

    // Closing the pool stops the refresher.
    pool.close().await;
    wait_until("the refresher stopped", || refresher.is_finished()).await;
    held.close().await.unwrap();
}

fn options_with(source: Arc<dyn TokenSource>) -> ConnectOptions {
    ConnectOptions {
        profile: DatabaseProfile::Dsql,
        max_connections: 4,
        acquire_timeout: Duration::from_secs(10),
        dsql_auth: Some(DsqlAuth::Source(source)),
        ..ConnectOptions::default()
    }
}

/// The backends `app` has open now, as the superuser sees them.
async fn app_backends(cluster: &PrivatePostgres) -> Vec<i32> {
    let mut admin = PgConnection::connect(&cluster.url()).await.unwrap();
    sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE usename = $1 ORDER BY pid")
        .bind(ROLE)
        .fetch_all(&mut admin)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_store_renews_its_token_and_a_bad_token_stops_the_start() {
    let cluster = cluster().await;

    // A token the server does not know: the start fails, saying who connected with what.
    struct Wrong;
    #[async_trait]
    impl TokenSource for Wrong {
        async fn token(&self) -> anyhow::Result<Token> {
            Ok(Token {
                secret: "expired-or-forged".into(),
                valid_for: Duration::from_secs(900),
            })
        }
    }
    let error = orderflow::store::connect(&role_url(&cluster), &options_with(Arc::new(Wrong)))
        .await
        .err()
        .expect("a bad token was accepted");
    let message = format!("{error:#}");
    assert!(
        message.contains("password authentication failed for user \"app\"")
            && message.contains("as `app` with a token from the token source")
            && !message.contains("expired-or-forged"),
        "{message}"
    );

    // A token source that cannot give a token stops the start too.
    let source = RotatingPasswords::new(&cluster, Duration::from_secs(4));
    source.failures_due.store(1, Ordering::SeqCst);
    let error = orderflow::store::connect(&role_url(&cluster), &options_with(source.clone()))
        .await
        .err()
        .expect("started without a token");
    let message = format!("{error:#}");
    assert!(
        message.contains("preparing the database authentication token")
            && message.contains("the token service is down"),
        "{message}"
    );

    // The store migrates (dsql profile) and serves with the first token, renews it, and opens new
    // connections with the renewed one after every one it had is cut.
    let store = orderflow::store::connect(&role_url(&cluster), &options_with(source.clone()))
        .await
        .unwrap();
    store.ping().await.unwrap();
    wait_until("the store renewed its token twice", || source.issued() >= 3).await;
    let before = app_backends(&cluster).await;
    assert!(!before.is_empty());
    let mut admin = PgConnection::connect(&cluster.url()).await.unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1")
        .bind(ROLE)
        .execute(&mut admin)
        .await
        .unwrap();
    // The cut connections fail a request or two, then the pool opens new ones.
    let deadline = Instant::now() + WAIT;
    loop {
        let ok = store.ping().await.is_ok() && store.list_products(&Default::default()).await.is_ok();
        let now = app_backends(&cluster).await;
        if ok && now.iter().any(|pid| !before.contains(pid)) {
            break;
        }
        assert!(Instant::now() < deadline, "the store never reconnected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(source.issued() >= 3);
}

/// `orderflow <args> migrate` in an empty environment: no AWS variables, a `HOME` without
/// `~/.aws`, no instance metadata — only what `env` adds.
fn orderflow_migrate(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("ORDERFLOW_LOG", "warn")
        .envs(env.iter().copied())
        .current_dir(dir)
        .args(args)
        .arg("migrate")
        .output()
        .expect("run orderflow");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_binary_names_what_iam_authentication_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint_url = "postgres://admin@abcdefghijklmnopqrst1234.dsql.us-east-1.on.aws/postgres";
    let iam = ["--database-profile", "dsql", "--dsql-region", "us-east-1"];

    // No credentials anywhere: refused before any connection, naming where they could come from.
    let (ok, stderr) = orderflow_migrate(dir.path(), &[&["--database-url", endpoint_url], &iam[..]].concat(), &[]);
    assert!(!ok);
    assert!(
        stderr.contains("no AWS credentials") && stderr.contains("AWS_ACCESS_KEY_ID") && stderr.contains("AWS_PROFILE"),
        "{stderr}"
    );

    // Without the dsql profile, --dsql-region is refused.
    let (ok, stderr) = orderflow_migrate(
        dir.path(),
        &["--database-url", endpoint_url, "--dsql-region", "us-east-1"],
        &[],
    );
    assert!(!ok);
    assert!(stderr.contains("needs --database-profile dsql"), "{stderr}");

    // Credentials from the environment make a token; the connection then insists on TLS, which
    // this private server does not offer, so the token is never sent.
    let cluster = PrivatePostgres::start();
    let local = format!("postgres://admin@127.0.0.1:{}/postgres", cluster.port);
    let credentials = [
        ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
        ("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
    ];
    let (ok, stderr) = orderflow_migrate(
        dir.path(),
        &[&["--database-url", &local], &iam[..]].concat(),
        &credentials,
    );
    assert!(!ok);
    assert!(
        stderr.contains("TLS")
            && stderr.contains("as `admin` with an IAM authentication token")
            && stderr.contains("dsql:DbConnectAdmin"),
        "{stderr}"
    );
    // An explicit sslmode that would let the token travel in the clear is refused as such.
    let (ok, stderr) = orderflow_migrate(
        dir.path(),
        &[&["--database-url", &format!("{local}?sslmode=prefer")], &iam[..]].concat(),
        &credentials,
    );
    assert!(!ok);
    assert!(stderr.contains("sslmode=prefer"), "{stderr}");
}
