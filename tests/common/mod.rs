//! Shared test helpers: a fresh database per test (a temp SQLite file, or a new PostgreSQL
//! database created for the test and dropped after it), the real router served on a real socket,
//! and a small client for the API.
//!
//! PostgreSQL tests use `ORDERFLOW_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) as the server to create databases on. When it
//! cannot be reached they fail, naming the service and how to start it.
//!
//! [`Backend::Dsql`] emulates Aurora DSQL on that server: the store runs in the dsql profile
//! (`--database-profile dsql`, schema from `migrations/dsql`), on a database whose transactions
//! default to `repeatable read` (snapshot isolation, as DSQL's), where a deferred constraint
//! trigger — created here, never by the migrations — fails a share of the commits that change
//! the tables it watches ([`CONFLICT_TABLES`]) with DSQL's own conflict error (SQLSTATE 40001,
//! "(OC000)"), so the store must retry whole transactions ([`CONFLICT_RATE`],
//! [`TestDb::new_with_conflicts`]); and a row trigger on every table fails a transaction that
//! changes more than DSQL's [`ROW_LIMIT`] rows.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use orderflow::http::{AppState, Authenticator, Secret};
use orderflow::store::{self, ConnectOptions, SqliteDurability, Store};
use orderflow::workflow::checkout::CheckoutSettings;
use orderflow::workflow::steps::SagaSettings;
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};
use sqlx::Connection;
use tokio::net::TcpListener;
use uuid::Uuid;

pub const SECRET: &[u8] = b"test-secret-test-secret-test-secret!";

/// Runs each named `async fn name(backend: Backend)` on every backend: SQLite, PostgreSQL and
/// the emulated distributed SQL, as `sqlite::name`, `postgres::name` and `dsql::name`.
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        $crate::on_both_backends!($($name),*);
        mod dsql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::common::Backend::Dsql).await
                }
            )*
        }
    };
}

/// Marks the name of a test database in the distributed-SQL profile.
const DSQL_NAME_MARK: &str = "dsql_";

/// The environment that gives an `orderflow` process started by a test on `db_url` the profile of
/// that database (none for SQLite and plain PostgreSQL): `.envs(common::profile_env(url))`.
pub fn profile_env(db_url: &str) -> Option<(&'static str, &'static str)> {
    let name = db_url.rsplit('/').next().unwrap_or_default();
    name.starts_with(&format!("orderflow_test_{DSQL_NAME_MARK}"))
        .then_some(("ORDERFLOW_DATABASE_PROFILE", "dsql"))
}

/// Runs each named `async fn name(backend: Backend)` once per backend, as `sqlite::name` and
/// `postgres::name`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    /// PostgreSQL in the dsql profile, emulating Aurora DSQL (see the module comment).
    Dsql,
}

impl Backend {
    /// A PostgreSQL server underneath (either profile).
    pub fn is_postgres(self) -> bool {
        matches!(self, Backend::Postgres | Backend::Dsql)
    }

    /// The store's profile for this backend.
    pub fn profile(self) -> store::DatabaseProfile {
        match self {
            Backend::Dsql => store::DatabaseProfile::Dsql,
            _ => store::DatabaseProfile::Postgres,
        }
    }

    /// The flags that give a process started by a test this backend's profile.
    pub fn server_args(self) -> Vec<&'static str> {
        match self {
            Backend::Dsql => vec!["--database-profile", "dsql"],
            _ => Vec::new(),
        }
    }
}

/// The share of commits changing a hot table that the emulated DSQL fails with a conflict.
pub const CONFLICT_RATE: f64 = 0.1;

/// The tables of the emulation's conflict injector: the rows concurrent transactions fight over
/// (stock, the queue, orders, idempotency claims), and every table the store writes outside
/// those transactions — the events outbox and its counter, ordered channels, webhook endpoints,
/// deliveries and attempts, alarm states, the sandbox provider's books — so each of the store's
/// own transactions meets the conflicts DSQL would raise.
const CONFLICT_TABLES: [&str; 14] = [
    "products",
    "jobs",
    "orders",
    "idempotency_keys",
    "events",
    "event_counter",
    "event_channels",
    "webhook_endpoints",
    "webhook_deliveries",
    "webhook_attempts",
    "alarm_state",
    "sandbox_intents",
    "sandbox_attempts",
    "sandbox_intent_refunds",
];

/// The most rows one transaction may change on the emulated DSQL, as on Aurora DSQL.
pub const ROW_LIMIT: i64 = 3000;

/// A database that exists for one test.
pub enum TestDb {
    Sqlite {
        _dir: tempfile::TempDir,
        url: String,
    },
    Postgres {
        server_url: String,
        name: String,
        url: String,
        backend: Backend,
    },
}

pub fn pg_server_url() -> String {
    std::env::var("ORDERFLOW_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        Self::new_with_conflicts(backend, CONFLICT_RATE).await
    }

    /// A fresh database; for [`Backend::Dsql`], migrated with `migrations/dsql` and failing
    /// `conflict_rate` of the commits that change a hot table (see the module comment).
    pub async fn new_with_conflicts(backend: Backend, conflict_rate: f64) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("orderflow.db").display());
                TestDb::Sqlite { _dir: dir, url }
            }
            Backend::Postgres | Backend::Dsql => {
                let db = Self::create_on(&pg_server_url(), backend).await;
                if backend == Backend::Dsql {
                    let TestDb::Postgres { server_url, name, .. } = &db else {
                        unreachable!()
                    };
                    let mut server = sqlx::PgConnection::connect(server_url).await.unwrap();
                    db.emulate_dsql(&mut server, name, conflict_rate).await;
                }
                db
            }
        }
    }

    /// A new database on the PostgreSQL server at `server_url` (a private one, say), dropped
    /// after the test.
    pub async fn postgres_on(server_url: &str) -> Self {
        Self::create_on(server_url, Backend::Postgres).await
    }

    async fn create_on(server_url: &str, backend: Backend) -> Self {
        let server_url = server_url.to_string();
        let mut conn = sqlx::PgConnection::connect(&server_url).await.unwrap_or_else(|error| {
            panic!(
                "PostgreSQL is not reachable at {server_url} ({error}). Start it with \
                 `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, \
                 or point ORDERFLOW_TEST_DATABASE_URL at a server where this user may create databases."
            )
        });
        // A distributed-SQL profile database says so in its name: processes a test starts on it
        // take the profile from there (`profile_env`).
        let kind = if backend == Backend::Dsql { DSQL_NAME_MARK } else { "" };
        let name = format!("orderflow_test_{kind}{}", Uuid::now_v7().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let url = match server_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("ORDERFLOW_TEST_DATABASE_URL must end with /<database>"),
        };
        TestDb::Postgres {
            server_url,
            name,
            url,
            backend,
        }
    }

    /// Snapshot isolation by default, the schema of the dsql profile (migrated by the store
    /// itself), then the conflict injector on the hot tables.
    async fn emulate_dsql(&self, server: &mut sqlx::PgConnection, name: &str, conflict_rate: f64) {
        for setting in [
            "default_transaction_isolation = 'repeatable read'".to_string(),
            format!("orderflow_test.conflict_rate = '{conflict_rate}'"),
            format!("orderflow_test.row_limit = '{ROW_LIMIT}'"),
        ] {
            sqlx::query(&format!("ALTER DATABASE {name} SET {setting}"))
                .execute(&mut *server)
                .await
                .expect("configure the emulated DSQL database");
        }
        drop(self.connect().await);
        let mut conn = sqlx::PgConnection::connect(self.url()).await.unwrap();
        // Once per transaction (the first hot row it changes draws), at COMMIT: the error DSQL
        // raises when optimistic concurrency control finds a conflicting commit.
        sqlx::raw_sql(
            "CREATE OR REPLACE FUNCTION orderflow_test_inject_conflict() RETURNS trigger LANGUAGE plpgsql AS $$              BEGIN                IF current_setting('orderflow_test.conflict_drawn', true) = 'yes' THEN RETURN NULL; END IF;                PERFORM set_config('orderflow_test.conflict_drawn', 'yes', true);                IF random() < coalesce(nullif(current_setting('orderflow_test.conflict_rate', true), '')::float8, 0) THEN                  RAISE EXCEPTION 'change conflicts with another transaction, please retry: (OC000)'                    USING ERRCODE = '40001';                END IF;                RETURN NULL;              END $$",
        )
        .execute(&mut conn)
        .await
        .expect("create the conflict injector");
        for table in CONFLICT_TABLES {
            sqlx::raw_sql(&format!(
                "CREATE CONSTRAINT TRIGGER orderflow_test_conflicts AFTER INSERT OR UPDATE OR DELETE ON {table}                  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION orderflow_test_inject_conflict()"
            ))
            .execute(&mut conn)
            .await
            .expect("install the conflict injector");
        }
        // DSQL refuses a transaction that changes more than ROW_LIMIT rows: each changed row of
        // any table counts (a setting local to the transaction), the one over fails it.
        sqlx::raw_sql(
            "CREATE OR REPLACE FUNCTION orderflow_test_count_rows() RETURNS trigger LANGUAGE plpgsql AS $$ \
             DECLARE \
               lim bigint := coalesce(nullif(current_setting('orderflow_test.row_limit', true), '')::bigint, 0); \
               n bigint; \
             BEGIN \
               IF lim <= 0 THEN RETURN NULL; END IF; \
               n := coalesce(nullif(current_setting('orderflow_test.changed_rows', true), '')::bigint, 0) + 1; \
               PERFORM set_config('orderflow_test.changed_rows', n::text, true); \
               IF n > lim THEN \
                 RAISE EXCEPTION 'transaction row limit exceeded: more than % changed rows', lim \
                   USING ERRCODE = '54000'; \
               END IF; \
               RETURN NULL; \
             END $$",
        )
        .execute(&mut conn)
        .await
        .expect("create the row counter");
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' \
             AND table_type = 'BASE TABLE' AND table_name NOT LIKE '\\_%'",
        )
        .fetch_all(&mut conn)
        .await
        .expect("list the tables");
        for table in tables {
            sqlx::raw_sql(&format!(
                "CREATE TRIGGER orderflow_test_row_limit AFTER INSERT OR UPDATE OR DELETE ON {table} \
                 FOR EACH ROW EXECUTE FUNCTION orderflow_test_count_rows()"
            ))
            .execute(&mut conn)
            .await
            .expect("install the row counter");
        }
    }

    /// `ALTER DATABASE <this one> SET <setting>`: for the sessions opened from now on.
    pub async fn alter_database(&self, setting: &str) {
        let TestDb::Postgres { server_url, name, .. } = self else {
            panic!("ALTER DATABASE on SQLite")
        };
        let mut server = sqlx::PgConnection::connect(server_url).await.unwrap();
        sqlx::query(&format!("ALTER DATABASE {name} SET {setting}"))
            .execute(&mut server)
            .await
            .expect("ALTER DATABASE");
    }

    pub fn backend(&self) -> Backend {
        match self {
            TestDb::Sqlite { .. } => Backend::Sqlite,
            TestDb::Postgres { backend, .. } => *backend,
        }
    }

    /// A direct connection outside the store (never failed by the conflict injector, nor by the
    /// row limit).
    pub async fn pg_connection(&self) -> sqlx::PgConnection {
        let mut conn = sqlx::PgConnection::connect(self.url()).await.unwrap();
        sqlx::raw_sql("SET orderflow_test.conflict_rate = '0'; SET orderflow_test.row_limit = '0'")
            .execute(&mut conn)
            .await
            .unwrap();
        conn
    }

    pub fn url(&self) -> &str {
        match self {
            TestDb::Sqlite { url, .. } | TestDb::Postgres { url, .. } => url,
        }
    }

    /// Runs SQL directly on the test database, outside the store (SQLite with its CHECK
    /// constraints off, so a test can plant any broken state).
    pub async fn tamper(&self, sql: &str) {
        match self {
            TestDb::Sqlite { url, .. } => {
                let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
                sqlx::query("PRAGMA ignore_check_constraints = ON")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                sqlx::query(sql).execute(&mut conn).await.unwrap();
            }
            TestDb::Postgres { .. } => {
                let mut conn = self.pg_connection().await;
                sqlx::query(sql).execute(&mut conn).await.unwrap();
            }
        }
    }

    /// One number read directly from the test database (`SELECT count(*) …`), outside the store.
    pub async fn count(&self, sql: &str) -> i64 {
        match self {
            TestDb::Sqlite { url, .. } => {
                let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
                sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap()
            }
            TestDb::Postgres { .. } => {
                let mut conn = self.pg_connection().await;
                sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap()
            }
        }
    }

    pub async fn connect(&self) -> Arc<dyn Store> {
        self.connect_with(&connect_options()).await
    }

    /// A store on this database, in its backend's profile.
    pub async fn connect_with(&self, options: &ConnectOptions) -> Arc<dyn Store> {
        let options = ConnectOptions {
            profile: self.backend().profile(),
            ..options.clone()
        };
        store::connect(self.url(), &options)
            .await
            .expect("connect to the test database")
    }
}

/// Queue settings for tests: millisecond back-offs so retries do not slow the suite.
pub fn fast_queue_settings() -> orderflow::queue::QueueSettings {
    orderflow::queue::QueueSettings {
        lease: Duration::from_secs(5),
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        poll_interval: Duration::from_millis(50),
        concurrency: 8,
        retention: Duration::from_secs(3600),
        max_lease_expiries: 10,
    }
}

pub fn connect_options() -> ConnectOptions {
    ConnectOptions {
        profile: Default::default(),
        pooler: Default::default(),
        max_connections: 10,
        acquire_timeout: Duration::from_secs(30),
        // Tests that need power-loss durability say so; kill -9 is survived by both settings.
        sqlite_durability: SqliteDurability::Normal,
        group_commit: Default::default(),
        checkout_batch: Default::default(),
        read_replica: None,
        dsql_auth: None,
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let TestDb::Postgres { server_url, name, .. } = self {
            let (server_url, name) = (server_url.clone(), name.clone());
            // Drop runs inside the test's runtime: use a thread with its own.
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async move {
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&server_url).await {
                        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .execute(&mut conn)
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

/// The API served on a real socket over a fresh database.
pub struct TestApp {
    pub url: String,
    pub client: reqwest::Client,
    pub store: Arc<dyn Store>,
    pub auth: Arc<Authenticator>,
    pub admin: String,
    pub backend: Backend,
    /// The payment provider the test's job runner uses.
    pub sandbox: Arc<orderflow::adapters::payment::sandbox::Sandbox>,
    /// Runs the order pipeline when a test drains it (no background workers: tests decide).
    pub runner: Arc<orderflow::queue::Runner>,
    /// The app's metric registry (what its `/metrics` renders; the runner counts into it too).
    pub metrics: orderflow::monitoring::Metrics,
    _mail: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    // Dropped last: the database outlives the server.
    pub db: TestDb,
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(backend, |_| {}).await
    }

    pub async fn spawn_with(backend: Backend, configure: impl FnOnce(&mut AppState)) -> Self {
        Self::spawn_with_pool(backend, connect_options(), configure).await
    }

    /// Like [`spawn_with`](Self::spawn_with), with the API's database pool sized by `options`.
    pub async fn spawn_with_pool(
        backend: Backend,
        options: ConnectOptions,
        configure: impl FnOnce(&mut AppState),
    ) -> Self {
        Self::spawn_on(TestDb::new(backend).await, backend, options, configure).await
    }

    /// Like [`spawn_with_pool`](Self::spawn_with_pool), on a database the test made itself
    /// (e.g. [`TestDb::postgres_on`] a private server).
    pub async fn spawn_on(
        db: TestDb,
        backend: Backend,
        options: ConnectOptions,
        configure: impl FnOnce(&mut AppState),
    ) -> Self {
        let store = db.connect_with(&options).await;
        let auth = Arc::new(Authenticator::hs256(&Secret::new(SECRET.to_vec())));
        let mut state = AppState {
            store: store.clone(),
            auth: auth.clone(),
            checkout: Arc::new(CheckoutSettings::default()),
            saga: Arc::new(SagaSettings::default()),
            body_limit: orderflow::http::DEFAULT_BODY_LIMIT,
            // Rate limits are the edge tests' business; elsewhere they would only make set-up
            // bursts (many customers created by one admin) flaky.
            edge: Arc::new(orderflow::http::edge::Edge::new(orderflow::http::edge::EdgeSettings {
                rate_limits: orderflow::http::edge::RateLimits::off(),
                ..Default::default()
            })),
            monitoring: Default::default(),
            events: Default::default(),
            stripe_webhooks: Default::default(),
        };
        configure(&mut state);
        let metrics = state.monitoring.metrics.clone();
        let saga_settings = (*state.saga).clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(orderflow::http::serve(listener, state, async move {
            let _ = stop.await;
        }));
        let admin = auth
            .issue("test-admin", &["admin".into()], Duration::from_secs(3600))
            .expect("token");
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .expect("client");
        let books: Arc<dyn orderflow::store::sandbox::SandboxBooks> = store.clone();
        let sandbox = Arc::new(orderflow::adapters::payment::sandbox::Sandbox::new(books));
        let mail = tempfile::tempdir().expect("mail dir");
        let notifier = Arc::new(orderflow::adapters::notify::FileNotifier::new(
            mail.path().to_path_buf(),
            "shop@example.com".into(),
        ));
        let runner = saga_runner_with_settings(&store, sandbox.clone(), notifier, metrics.clone(), saga_settings);
        TestApp {
            url,
            client,
            store,
            auth,
            admin,
            backend,
            sandbox,
            runner,
            metrics,
            _mail: mail,
            shutdown: Some(shutdown),
            db,
        }
    }

    pub fn token(&self, subject: &str) -> String {
        self.auth.issue(subject, &[], Duration::from_secs(3600)).expect("token")
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Response {
        let mut request = self.client.get(format!("{}{path}", self.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("GET")
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Response {
        let mut request = self.client.post(format!("{}{path}", self.url)).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("POST")
    }

    /// Creates a product as admin; returns its id.
    pub async fn product(&self, price: &str, stock: i64) -> String {
        let response = self
            .client
            .post(format!("{}/products", self.url))
            .bearer_auth(&self.admin)
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"name":"Widget","price":{price},"stock_quantity":{stock},"category":"test"}}"#
            ))
            .send()
            .await
            .expect("create product");
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.expect("json");
        body["product_id"].as_str().expect("product_id").to_string()
    }

    /// Creates a customer as admin; returns (customer id, a customer token for it).
    pub async fn customer(&self) -> (String, String) {
        let email = format!("{}@example.com", Uuid::now_v7().simple());
        let response = self
            .post(
                "/customers",
                Some(&self.admin),
                &json!({ "email": email, "first_name": "Test", "last_name": "Buyer" }),
            )
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.expect("json");
        let id = body["customer_id"].as_str().expect("customer_id").to_string();
        let token = self.token(&id);
        (id, token)
    }

    pub async fn place_order(&self, token: &str, key: &str, body: &Value) -> Response {
        self.client
            .post(format!("{}/orders", self.url))
            .bearer_auth(token)
            .header("idempotency-key", key)
            .json(body)
            .send()
            .await
            .expect("POST /orders")
    }

    /// Available stock of a product as the public API reports it.
    pub async fn available(&self, product: &str) -> i64 {
        let body: Value = self
            .get(&format!("/products/{product}"), None)
            .await
            .json()
            .await
            .expect("json");
        body["stock_quantity"].as_i64().expect("stock_quantity")
    }

    /// Runs the pipeline until no job is ready or running.
    pub async fn drain(&self) {
        self.runner
            .drain(Duration::from_secs(30))
            .await
            .expect("the queue drains");
    }

    pub async fn assert_audit_clean(&self) {
        let report = self.store.audit().await.expect("audit");
        assert!(report.is_clean(), "audit found violations:\n{report}");
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// Reads a problem+json body and checks its status and code.
pub async fn expect_problem(response: Response, status: u16, code: &str) -> Value {
    let actual = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body: Value = response.json().await.expect("problem body is JSON");
    assert_eq!(actual, status, "unexpected status; body: {body}");
    assert_eq!(content_type, "application/problem+json");
    assert_eq!(body["code"], code, "unexpected code; body: {body}");
    assert_eq!(body["status"], status);
    body
}

/// The `field` names in a problem's `errors`.
pub fn error_fields(problem: &Value) -> Vec<String> {
    problem["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .filter_map(|e| e["field"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// A job runner for the checkout saga with the given payment provider and notifier, and test-speed
/// queue settings (no background workers: tests drain it).
pub fn saga_runner(
    store: &Arc<dyn Store>,
    payments: Arc<dyn orderflow::adapters::payment::intents::PaymentProvider>,
    notifier: Arc<dyn orderflow::adapters::notify::Notifier>,
) -> Arc<orderflow::queue::Runner> {
    saga_runner_with_metrics(store, payments, notifier, Default::default())
}

/// [`saga_runner`] counting into `metrics` (an app's registry, so its `/metrics` shows the steps).
pub fn saga_runner_with_metrics(
    store: &Arc<dyn Store>,
    payments: Arc<dyn orderflow::adapters::payment::intents::PaymentProvider>,
    notifier: Arc<dyn orderflow::adapters::notify::Notifier>,
    metrics: orderflow::monitoring::Metrics,
) -> Arc<orderflow::queue::Runner> {
    saga_runner_with_settings(store, payments, notifier, metrics, SagaSettings::default())
}

/// [`saga_runner_with_metrics`] with the saga's settings (capture and fulfilment modes, attempts)
/// — the same the app's state was given, so API and pipeline agree.
pub fn saga_runner_with_settings(
    store: &Arc<dyn Store>,
    payments: Arc<dyn orderflow::adapters::payment::intents::PaymentProvider>,
    notifier: Arc<dyn orderflow::adapters::notify::Notifier>,
    metrics: orderflow::monitoring::Metrics,
    settings: SagaSettings,
) -> Arc<orderflow::queue::Runner> {
    let saga = Arc::new(orderflow::workflow::steps::Saga {
        store: store.clone(),
        payments,
        notifier,
        settings,
        metrics: metrics.clone(),
    });
    let mut runner = orderflow::queue::Runner::new(store.clone(), fast_queue_settings());
    runner.set_metrics(metrics);
    saga.register(&mut runner);
    Arc::new(runner)
}

/// Seeds a 25.00 product with 100 in stock and a customer with `email`.
pub async fn seed_lamp_and_buyer(
    store: &dyn Store,
    email: &str,
) -> (orderflow::domain::ProductId, orderflow::domain::CustomerId) {
    use orderflow::domain::{CustomerId, Email, Money, NewCustomer, NewProduct, ProductId};
    let product = NewProduct {
        id: ProductId::new(),
        sku: None,
        name: "Lamp".into(),
        description: None,
        category: None,
        price: Money::from_minor(2500).expect("price"),
        stock: 100,
    };
    let product = store
        .create_product(&product, orderflow::clock::now())
        .await
        .expect("product")
        .id;
    let customer = NewCustomer {
        id: CustomerId::new(),
        email: Email::parse(email).expect("email"),
        first_name: "Bea".into(),
        last_name: "Buyer".into(),
    };
    let customer = store
        .create_customer(&customer, orderflow::clock::now())
        .await
        .expect("customer")
        .id;
    (product, customer)
}

/// Sends a request and reads its JSON body: the set-up steps of process-level tests, where any
/// failure is the test's failure.
pub trait SendJson {
    fn send_json(self) -> impl std::future::Future<Output = Value> + Send;
}

impl SendJson for reqwest::RequestBuilder {
    async fn send_json(self) -> Value {
        self.send()
            .await
            .expect("request sent")
            .json()
            .await
            .expect("a JSON body")
    }
}
