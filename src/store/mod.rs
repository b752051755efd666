//! The persistence contract and its two implementations.
//!
//! Every business operation that must be atomic is ONE method here, taking and returning domain
//! types (e.g. [`Store::place_order`]: idempotency record + stock reservation + order + event +
//! first job in a single transaction). SQL lives in this module tree and nowhere else.
//! `sqlite` serves the embedded single-process default; `postgres` serves many processes sharing
//! one database (and PostgreSQL-compatible distributed SQL, hence retries on SQLSTATE 40001).

pub mod after_sale;
mod audit;
mod batcher;
mod checkout_batch;
mod common;
pub mod dsql_auth;
mod effects;
pub mod events;
pub mod group_commit;
pub mod idempotency;
pub mod jobs;
mod jobs_common;
pub mod ops;
mod outage;
mod pool;
mod postgres;
mod reads;
pub mod reports;
mod retry;
mod rows;
pub mod sandbox;
pub mod signal;
mod sqlite;
mod step_reads;
mod writes;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::domain::{
    Cart, CartRejection, Currency, Customer, CustomerId, NewCustomer, NewProduct, Order, OrderEvent, OrderId,
    PaymentToken, Product, ProductId, ProductPatch, ShippingAddress, StockAdjustment,
};

pub use audit::{AuditReport, Violation};
pub use checkout_batch::CheckoutBatchSettings;
pub use outage::WriteRefusal;
pub(crate) use pool::DbPool;
pub use postgres::PgStore;
pub use reports::SalesPeriod;
pub use sqlite::{SqliteDurability, SqliteStore};

pub type StoreResult<T> = Result<T, StoreError>;

/// Failures of the persistence layer, classified by what the caller should do about them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness rule was broken (duplicate e-mail, duplicate SKU). The payload names it.
    #[error("conflict: {0}")]
    Conflict(&'static str),
    /// The database could not be reached, went away (restart, failover, cut connection) or no
    /// connection became free in time; retry later ([`outage`]).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database answers reads but takes no writes: its disk is full or it is read-only
    /// ([`outage`]). An outage like [`StoreError::Unavailable`] (retry later), which ends when
    /// an operator frees space or makes the file system writable again.
    #[error("database takes no writes ({0}): {1}")]
    WritesRefused(WriteRefusal, String),
    /// The transaction kept losing races with concurrent ones (SQLSTATE 40001 — DSQL's
    /// OC000/OC001 — or 40P01) for the whole retry budget ([`retry`]): an outage-like answer
    /// (503 with `Retry-After`; a worker postpones its job without spending an attempt).
    #[error("too much contention: {0}")]
    Contended(String),
    /// A row that cannot be turned back into a domain value: a bug or a hand-edited database.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Database(sqlx::Error),
}

impl StoreError {
    /// The database is away or refuses writes: answer 503, and a worker postpones its job
    /// without spending an attempt.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_) | StoreError::WritesRefused(..) | StoreError::Contended(_)
        )
    }

    /// Lost to concurrent transactions: the database is there, so a claim can be released now.
    pub fn is_contention(&self) -> bool {
        matches!(self, StoreError::Contended(_))
    }

    /// The same outage again, for each of several requests that one failure answers.
    fn outage_copy(&self) -> StoreError {
        match self {
            StoreError::WritesRefused(reason, cause) => StoreError::WritesRefused(*reason, cause.clone()),
            StoreError::Unavailable(cause) => StoreError::Unavailable(cause.clone()),
            StoreError::Contended(cause) => StoreError::Contended(cause.clone()),
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        if let Some(reason) = outage::write_refusal(&error) {
            StoreError::WritesRefused(reason, error.to_string())
        } else if retry::is_conflict(&error) {
            StoreError::Contended(error.to_string())
        } else if outage::is_unavailable(&error) {
            StoreError::Unavailable(error.to_string())
        } else {
            StoreError::Database(error)
        }
    }
}

/// Which engine a store runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A page of a keyset-paginated list.
#[derive(Clone, Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// The last item's id when more items follow.
    pub next_after: Option<uuid::Uuid>,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` fetched rows: the extra row only says "there is more".
    fn from_rows(mut items: Vec<T>, limit: u32, id_of: impl Fn(&T) -> uuid::Uuid) -> Self {
        let more = items.len() > limit as usize;
        items.truncate(limit as usize);
        let next_after = if more { items.last().map(&id_of) } else { None };
        Page { items, next_after }
    }
}

/// Filters and position of a catalog listing.
#[derive(Clone, Debug, Default)]
pub struct ProductQuery {
    pub category: Option<String>,
    pub after: Option<ProductId>,
    pub limit: u32,
}

/// Filters and position of an order listing (newest first): a customer's, or every order.
#[derive(Clone, Debug, Default)]
pub struct OrderQuery {
    /// One customer's orders only.
    pub customer: Option<CustomerId>,
    pub status: Option<crate::domain::OrderStatus>,
    /// Orders older than this one (the previous page's last).
    pub before: Option<OrderId>,
    pub limit: u32,
}

/// Result of a stock adjustment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdjustOutcome {
    Adjusted(Product),
    NotFound,
    /// The adjustment would take on-hand stock below what is reserved (or below zero).
    WouldBreakReservations {
        on_hand: i64,
        reserved: i64,
    },
}

/// A job row to write in the same transaction as the business change that needs it
/// (the transactional outbox).
#[derive(Clone, Debug)]
pub struct NewJob {
    /// The step that will run it, e.g. `charge_payment`.
    pub kind: &'static str,
    pub payload: serde_json::Value,
    pub run_at: DateTime<Utc>,
    pub max_attempts: u32,
}

/// Everything [`Store::place_order`] commits in one transaction.
#[derive(Clone, Debug)]
pub struct PlaceOrder {
    /// The authenticated principal (token `sub`); idempotency keys are scoped to it.
    pub principal: String,
    pub idempotency_key: String,
    /// Hash of the normalized request: the same key with a different body is refused.
    pub fingerprint: String,
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    pub cart: Cart,
    pub payment_token: PaymentToken,
    /// Where the order ships (stored as `orders.shipping`, JSON), when given.
    pub shipping: Option<ShippingAddress>,
    pub currency: Currency,
    pub correlation_id: Option<String>,
    /// The accepting process's `--region` (stored as `orders.region`), when it has one.
    pub region: Option<String>,
    pub first_job: NewJob,
    /// The order's creation time, at storage precision ([`crate::clock::now`]).
    pub now: DateTime<Utc>,
}

/// What happened to a place-order request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlaceOrderOutcome {
    /// A new order was committed.
    Created(Order),
    /// The key was used before with the same request: the first response's order, as it was then.
    Replayed(Order),
    /// The key was used before with a different request.
    KeyReused,
    /// Another request with this key is being processed right now.
    KeyInUse,
    /// The cart cannot be filled; nothing was written (the key stays free).
    Rejected(CartRejection),
}

/// A job as seen from its order: which step, in what state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSummary {
    pub kind: String,
    pub state: String,
    pub attempts: i32,
}

/// An order with its timeline, as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderDetails {
    pub order: Order,
    pub events: Vec<OrderEvent>,
}

/// The persistence contract. Implementations must give identical observable behaviour.
#[async_trait]
pub trait Store: jobs::JobStore + ops::OpsStore + sandbox::SandboxBooks + Send + Sync + 'static {
    fn backend(&self) -> Backend;

    /// The events outbox, feed, ordered channels and webhook endpoints.
    fn events(&self) -> &dyn events::EventStore;
    /// Orders' shipments and refunds, read back.
    fn after_sale(&self) -> &dyn after_sale::AfterSaleReads;

    /// Cheap liveness check of the database (readiness probe).
    async fn ping(&self) -> StoreResult<()>;

    /// True when the catalog has no products yet (first start: load the sample catalog).
    async fn is_empty(&self) -> StoreResult<bool>;

    async fn create_product(&self, product: &NewProduct, now: DateTime<Utc>) -> StoreResult<Product>;
    async fn get_product(&self, id: ProductId) -> StoreResult<Option<Product>>;
    async fn list_products(&self, query: &ProductQuery) -> StoreResult<Page<Product>>;
    async fn update_product(
        &self,
        id: ProductId,
        patch: &ProductPatch,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Product>>;
    /// Changes on-hand stock and writes the ledger row, atomically; never below reserved.
    async fn adjust_stock(
        &self,
        id: ProductId,
        adjustment: &StockAdjustment,
        now: DateTime<Utc>,
    ) -> StoreResult<AdjustOutcome>;

    /// Fails with [`StoreError::Conflict`] on a duplicate e-mail or id.
    async fn create_customer(&self, customer: &NewCustomer, now: DateTime<Utc>) -> StoreResult<Customer>;
    async fn get_customer(&self, id: CustomerId) -> StoreResult<Option<Customer>>;
    /// A customer's orders, newest first.
    async fn list_customer_orders(
        &self,
        id: CustomerId,
        before: Option<OrderId>,
        limit: u32,
    ) -> StoreResult<Page<Order>> {
        self.list_orders(&OrderQuery {
            customer: Some(id),
            status: None,
            before,
            limit,
        })
        .await
    }
    /// Orders, newest first: every customer's (the operators' view) or one's.
    async fn list_orders(&self, query: &OrderQuery) -> StoreResult<Page<Order>>;

    /// The checkout commitment: see [`PlaceOrder`] and [`PlaceOrderOutcome`]. Checkouts that
    /// arrive together share a transaction and its commit ([`checkout_batch`]).
    async fn place_order(&self, request: &PlaceOrder) -> StoreResult<PlaceOrderOutcome>;
    /// These checkouts in one shared transaction, as the checkout writers group concurrent
    /// ones: each priced against the stock the ones before it left, each answered on its own
    /// (one in the order given), one commit for all that were accepted.
    async fn place_orders(&self, requests: &[PlaceOrder]) -> Vec<StoreResult<PlaceOrderOutcome>>;
    async fn get_order(&self, id: OrderId) -> StoreResult<Option<OrderDetails>>;
    /// Wakes job workers in this process when jobs become ready (in-process for SQLite; fed by
    /// LISTEN/NOTIFY across processes for PostgreSQL).
    fn job_signal(&self) -> Arc<signal::JobSignal>;

    /// The jobs of an order, oldest first.
    async fn jobs_for_order(&self, id: OrderId) -> StoreResult<Vec<JobSummary>>;

    /// Checks the invariants of DESIGN.md against the stored data.
    async fn audit(&self) -> StoreResult<AuditReport>;

    /// The sales report: every period of `range`, oldest first, in `currency`
    /// ([`reports`] says which orders count). Read from the replica when one is configured.
    async fn sales_report(
        &self,
        range: &crate::domain::report::SalesRange,
        currency: Currency,
    ) -> StoreResult<Vec<reports::SalesPeriod>>;

    /// Forgets up to `batch` (at most [`idempotency::MAX_BATCH`]) checkout idempotency keys last
    /// written before `before`, oldest first: their records are deleted and their orders' keys
    /// cleared in one transaction, so a later request with such a key places a new order. Returns
    /// how many were forgotten; one call is one bounded transaction (the caller repeats it).
    async fn forget_idempotency_keys(&self, before: DateTime<Utc>, batch: u32) -> StoreResult<u64>;

    /// The read replica's state and who served the reads it could take, when one is configured.
    fn read_replica(&self) -> Option<ReplicaStatus> {
        None
    }
}

/// A read replica (`--read-database-url`, PostgreSQL only) and how far behind it may be.
#[derive(Clone, Debug)]
pub struct ReadReplicaSettings {
    pub url: String,
    /// Longer behind the primary than this, it is bypassed (`--read-replica-max-lag`).
    pub max_lag: Duration,
}

/// Whether the read replica serves reads now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// Not checked yet: the primary serves its reads.
    Starting,
    /// Reachable and caught up within the limit: it serves listings, reports and the audit.
    InUse,
    /// Reachable but further behind than the limit: bypassed.
    Lagging,
    /// Unreachable (or a read failed there): bypassed until a check finds it again.
    Down,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Starting => "starting",
            ReplicaState::InUse => "in_use",
            ReplicaState::Lagging => "lagging",
            ReplicaState::Down => "down",
        }
    }
}

/// The read replica as this process sees it (metrics and readiness).
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaStatus {
    pub state: ReplicaState,
    /// How far behind the primary its last check found it; unknown while down.
    pub lag_seconds: Option<f64>,
    pub max_lag_seconds: f64,
    /// Reads it could take, by who served them (the primary while it was bypassed or failed).
    pub reads_served_by_replica: u64,
    pub reads_served_by_primary: u64,
    /// Reads that failed on the replica and were run again on the primary.
    pub fallbacks: u64,
}

/// The most rows one transaction may change in the distributed-SQL profile (Aurora DSQL's limit).
pub(crate) const MAX_CHANGED_ROWS: usize = 3000;

/// Which engine family a `postgres://` URL points at (`--database-profile`).
///
/// `Dsql` is PostgreSQL-compatible distributed SQL with Aurora DSQL's limits (DESIGN.md
/// "Distributed SQL profile"): the schema comes from `migrations/dsql` through a migrator that
/// needs no advisory lock, workers poll (backing off when idle) instead of LISTEN/NOTIFY, claims
/// are conditional writes instead of `SKIP LOCKED`, nothing uses SAVEPOINT, and every transaction
/// is retried whole on a serialization failure. One store implements both; the branches sit only
/// where the engines differ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseProfile {
    #[default]
    Postgres,
    Dsql,
}

impl DatabaseProfile {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DatabaseProfile::Postgres => "postgres",
            DatabaseProfile::Dsql => "dsql",
        }
    }

    /// Whether LISTEN/NOTIFY, advisory locks, SAVEPOINT and `SKIP LOCKED` may be used.
    pub fn has_postgres_extras(self) -> bool {
        self == DatabaseProfile::Postgres
    }
}

/// What stands between orderflow and PostgreSQL (`--database-pooler`).
///
/// `Transaction` is a pooler that lends a server connection for one transaction at a time
/// (PgBouncer's `pool_mode = transaction`): no statement may rely on the server connection
/// outliving its transaction (docs/scale-out.md "PgBouncer and transaction poolers"). Then the
/// statement cache is off and every statement runs inside an explicit transaction
/// ([`pool`]), job wake-ups are polled instead of LISTEN/NOTIFY, and migrations serialize on a
/// transaction-scoped advisory lock instead of a session one. Session mode, or a pooler that
/// keeps prepared statements per client, needs nothing: `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DatabasePooler {
    /// Connected straight to the database, or through a session pooler.
    #[default]
    None,
    /// Through a transaction pooler (PgBouncer `pool_mode = transaction`).
    Transaction,
}

impl DatabasePooler {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DatabasePooler::None => "none",
            DatabasePooler::Transaction => "transaction",
        }
    }
}

/// Connection settings shared by both backends.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// The engine family behind a PostgreSQL URL; only `postgres` is valid for SQLite.
    pub profile: DatabaseProfile,
    /// A pooler in front of PostgreSQL whose limits to respect; only `none` for SQLite.
    pub pooler: DatabasePooler,
    /// Largest number of connections this process holds (PostgreSQL) or readers (SQLite).
    pub max_connections: u32,
    /// How long a request waits for a free connection before getting 503.
    pub acquire_timeout: Duration,
    pub sqlite_durability: SqliteDurability,
    /// How step completions share transactions ([`group_commit`]).
    pub group_commit: group_commit::GroupCommitSettings,
    /// How concurrent checkouts share transactions ([`checkout_batch`]).
    pub checkout_batch: CheckoutBatchSettings,
    /// A read replica for listings, reports and the audit (PostgreSQL only).
    pub read_replica: Option<ReadReplicaSettings>,
    /// Passwords that are short-lived tokens, renewed before they expire: Aurora DSQL's IAM
    /// authentication (`--dsql-region`; the dsql profile only).
    pub dsql_auth: Option<dsql_auth::DsqlAuth>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            profile: DatabaseProfile::Postgres,
            pooler: DatabasePooler::None,
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            sqlite_durability: SqliteDurability::Full,
            group_commit: Default::default(),
            checkout_batch: Default::default(),
            read_replica: None,
            dsql_auth: None,
        }
    }
}

/// Opens the store named by `url` (`postgres://…` or `sqlite://path`) and applies migrations.
pub async fn connect(url: &str, options: &ConnectOptions) -> anyhow::Result<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::connect(url, options).await?))
    } else if let Some(path) = url.strip_prefix("sqlite://") {
        if options.read_replica.is_some() {
            anyhow::bail!(
                "--read-database-url needs PostgreSQL: the embedded SQLite database has no replicas (its readers \
                 already never wait for the writer); leave it unset or use a postgres:// --database-url"
            );
        }
        anyhow::ensure!(
            options.dsql_auth.is_none(),
            "--dsql-region needs a postgres:// database URL: the cluster's endpoint"
        );
        anyhow::ensure!(
            options.profile == DatabaseProfile::Postgres,
            "--database-profile {} needs a postgres:// database URL, not `{}` (SQLite has one profile)",
            options.profile.name(),
            redact_url(url)
        );
        anyhow::ensure!(
            options.pooler == DatabasePooler::None,
            "--database-pooler {} needs a postgres:// database URL, not `{}` (SQLite is embedded)",
            options.pooler.name(),
            redact_url(url)
        );
        Ok(Arc::new(SqliteStore::open(Path::new(path), options).await?))
    } else {
        anyhow::bail!(
            "unsupported database URL `{}`: use postgres://user@host/db or sqlite://path/to/file.db",
            redact_url(url)
        )
    }
}

/// The URL without its password, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..scheme_end + 3], user, &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(super::redact_url("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(super::redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(super::redact_url("sqlite://x.db"), "sqlite://x.db");
    }
}
