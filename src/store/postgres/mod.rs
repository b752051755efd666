//! The scaled-out store: PostgreSQL (or a PostgreSQL-compatible distributed SQL engine) shared by
//! many orderflow processes.
//!
//! Nothing here assumes one process. Stock rows are locked in product-id order
//! (`SELECT … ORDER BY id FOR UPDATE`) so multi-item orders cannot deadlock one another, and every
//! write transaction is re-run with backoff on SQLSTATE 40001/40P01 (which serializable and
//! optimistic engines raise in normal operation). The place-order path costs two round trips:
//! claim the idempotency key and read the cart's stock in one statement, then — shared by the
//! checkouts waiting at the same time ([`checkout_batch`]) — one autocommitted statement of
//! data-modifying CTEs whose conditional reservation aborts it, writing nothing, when another
//! process moved the stock or the price in between (then the group is written again under
//! `SELECT … FOR UPDATE` in a transaction). See [`PgCheckouts`].
//! Listings, the sales report and the audit may be served by a read replica ([`replica`]);
//! nothing that decides a write reads there.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

mod dsql_migrate;
mod jobs;
mod ops;
mod pooled_migrate;
mod replica;

use super::after_sale::{AfterSaleReads, AfterSaleSql};
use super::audit::{self, AuditReport};
use super::batcher::Batcher;
use super::checkout_batch::{self, Checkout, CheckoutTransaction, Checkouts, GroupFailure};
use super::common::{is_foreign_key_violation, placed_data, replay_or_refuse, stock_levels, unique_is_conflict};
use super::dsql_auth::{self, DsqlAuth, DsqlTokenSource, PoolAuth, TokenRefresher};
use super::events::{EventStore, EventsSql};
use super::group_commit::GroupCommit;
use super::idempotency;
use super::pool::DbPool;
use super::reads;
use super::retry;
use super::rows::{self, CUSTOMER_COLUMNS, CustomerRow, OrderItemRow, OrderRow, PRODUCT_COLUMNS, ProductRow};
use super::signal::{self, JobSignal};
use super::step_reads::StepReads;
use super::{
    AdjustOutcome, Backend, ConnectOptions, DatabasePooler, DatabaseProfile, JobSummary, OrderDetails, OrderQuery,
    Page, PlaceOrder, PlaceOrderOutcome, ProductQuery, Store, StoreError, StoreResult,
};
use crate::domain::events::order_subject;
use crate::domain::order::StockLevel;
use crate::domain::{
    CartRejection, Customer, CustomerId, NewCustomer, NewProduct, Order, OrderId, Product, ProductId, ProductPatch,
    StockAdjustment,
};

/// An in-flight idempotency claim older than this belongs to a request that died (its process
/// was killed mid-request); a retry may take it over. Safe even if the first request is merely
/// slow: its completion is fenced by the claim's lock token, and orders are unique per key.
const IN_FLIGHT_STALE_AFTER: chrono::Duration = chrono::Duration::seconds(15);

/// A pooled connection idle this long is pinged before it is used ([`PgStore::connect`]).
const PING_IDLE_AFTER: Duration = Duration::from_secs(1);
/// Connections are closed and replaced after this long: Aurora DSQL ends a connection after an
/// hour, and PostgreSQL behind a proxy or failover is better served by fresh ones too.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30 * 60);

pub struct PgStore {
    pool: DbPool<Postgres>,
    profile: DatabaseProfile,
    /// Wakes job workers of the kinds our commits enqueued, here and in other processes.
    wakeups: Wakeups,
    events: EventsSql<Postgres>,
    committer: GroupCommit,
    /// Groups concurrent checkouts into shared transactions ([`checkout_batch`]).
    checkouts: Batcher<Checkouts<PgCheckouts>>,
    after_sale: AfterSaleSql<Postgres>,
    /// The read replica for listings, reports and the audit (`--read-database-url`), if any.
    replica: Option<Arc<replica::Replica>>,
    /// Steps' order reads, coalesced when many wait ([`StepReads`]).
    step_reads: StepReads,
    /// Renew the pools' authentication tokens (`--dsql-region`); stopped on drop.
    _token_refreshers: Vec<TokenRefresher>,
}

/// The channel every enqueue notifies, in the enqueuing transaction (delivered on commit).
const JOBS_CHANNEL: &str = "orderflow_jobs";

/// Sends `NOTIFY` after jobs were committed, coalescing bursts into one notification.
///
/// The wake-up is deliberately *not* sent inside the enqueuing transaction: PostgreSQL serializes
/// the commits of transactions that issued `NOTIFY` (a database-wide lock held through the WAL
/// flush), which cost about 30% of the checkout rate (docs/BENCHMARKS.md). A wake-up lost in a
/// crash only delays other processes' workers until their poll; this process's own workers are
/// woken in-process anyway.
fn spawn_job_waker(pool: PgPool) -> Arc<OtherProcesses> {
    let (trigger, mut triggered) = tokio::sync::mpsc::channel::<()>(1);
    let others = Arc::new(OtherProcesses {
        pending: std::sync::Mutex::new(PendingWakeups::default()),
        trigger,
    });
    let waker = others.clone();
    tokio::spawn(async move {
        while triggered.recv().await.is_some() {
            let pending = std::mem::take(&mut *waker.pending.lock().expect("wake-up lock"));
            // An empty payload wakes every kind.
            let payload = if pending.all {
                String::new()
            } else {
                signal::payload(pending.kinds.iter().map(String::as_str))
            };
            if let Err(error) = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(JOBS_CHANNEL)
                .bind(payload)
                .execute(&pool)
                .await
            {
                if pool.is_closed() {
                    return;
                }
                tracing::debug!(%error, "could not send the jobs wake-up; other processes will poll");
            }
        }
    });
    others
}

/// The wake-ups waiting for the waker task to NOTIFY other processes.
struct OtherProcesses {
    pending: std::sync::Mutex<PendingWakeups>,
    /// Full means a NOTIFY is already due: what was added to `pending` rides along with it.
    trigger: tokio::sync::mpsc::Sender<()>,
}

#[derive(Default)]
struct PendingWakeups {
    /// Every kind (a replay): sent as an empty payload.
    all: bool,
    kinds: std::collections::BTreeSet<String>,
}

/// Wakes the workers of the kinds a commit enqueued: in this process at once, in the others by
/// a coalesced NOTIFY after the commit.
///
/// In the distributed-SQL profile there is no NOTIFY (`others` is `None`): other processes'
/// workers find the jobs by polling, which backs off while they find nothing
/// ([`crate::queue`], [`JobSignal::polled`]).
#[derive(Clone)]
struct Wakeups {
    local: Arc<JobSignal>,
    others: Option<Arc<OtherProcesses>>,
}

impl Wakeups {
    fn enqueued(&self, kinds: &[&str]) {
        self.local.wake(kinds.iter().copied());
        let Some(others) = &self.others else { return };
        let mut pending = others.pending.lock().expect("wake-up lock");
        pending.kinds.extend(kinds.iter().map(|kind| kind.to_string()));
        drop(pending);
        let _ = others.trigger.try_send(());
    }

    /// Jobs of unknown kinds became ready (a replay): every worker looks.
    fn all(&self) {
        self.local.wake_all();
        let Some(others) = &self.others else { return };
        others.pending.lock().expect("wake-up lock").all = true;
        let _ = others.trigger.try_send(());
    }
}

/// Forwards NOTIFYs on [`JOBS_CHANNEL`] to the in-process signal until the store is dropped.
///
/// When the database goes away (restart, failover) the listener is rebuilt from scratch — a new
/// connection and a new LISTEN — with backoff until it answers again, and the workers are woken
/// on every loss and every reconnection, since a notification sent meanwhile was missed. A failed
/// `PgListener` is never reused: after some errors (a reset connection) it keeps its dead socket.
fn spawn_job_listener(pool: PgPool, signal: std::sync::Weak<JobSignal>) {
    // Wakes the kinds a notification names (every kind for `None`: a notification may have been
    // missed); false once the store is gone.
    let wake = move |payload: Option<&str>| match signal.upgrade() {
        Some(signal) => {
            match payload {
                Some(payload) => signal.wake_payload(payload),
                None => signal.wake_all(),
            }
            true
        }
        None => false,
    };
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            let listening = async {
                let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
                listener.listen(JOBS_CHANNEL).await?;
                Ok::<_, sqlx::Error>(listener)
            };
            let error = match listening.await {
                Ok(mut listener) => {
                    if failures > 0 {
                        tracing::info!("job listener listening again");
                    }
                    failures = 0;
                    if !wake(None) {
                        return;
                    }
                    loop {
                        match listener.try_recv().await {
                            Ok(Some(notification)) if wake(Some(notification.payload())) => {}
                            // The connection dropped; a notification may have been missed.
                            Ok(None) if wake(None) => break None,
                            Ok(_) => return,
                            Err(error) => break Some(error),
                        }
                    }
                }
                Err(error) => Some(error),
            };
            if pool.is_closed() || !wake(None) {
                return;
            }
            failures += 1;
            match error {
                Some(error) if failures == 1 => {
                    tracing::warn!(%error, "job listener lost the database; workers poll until it is back")
                }
                Some(error) => tracing::debug!(%error, "job listener still cannot LISTEN"),
                None => tracing::warn!("job listener lost its connection; listening again"),
            }
            tokio::time::sleep(Duration::from_millis(100 << failures.min(5))).await;
        }
    });
}

/// The result of trying to claim an idempotency key for a new request.
enum Claim {
    /// Ours, with the stock of the cart's products read in the same round trip.
    Acquired(Vec<StockLevel>),
    Finished(PlaceOrderOutcome),
}

impl PgStore {
    pub async fn connect(url: &str, options: &ConnectOptions) -> anyhow::Result<Self> {
        let profile = options.profile;
        let behind_pooler = options.pooler == DatabasePooler::Transaction;
        anyhow::ensure!(
            !behind_pooler || profile == DatabaseProfile::Postgres,
            "--database-pooler transaction is for PostgreSQL (--database-profile postgres), not --database-profile {}",
            profile.name()
        );
        let mut connect: PgConnectOptions = url.parse().context("parsing the PostgreSQL URL")?;
        if behind_pooler {
            // A cached statement outlives its transaction, and so its server connection.
            connect = connect.statement_cache_capacity(0);
        }
        // Token authentication (Aurora DSQL IAM): the first token now, a refresher per pool below.
        let aws = match &options.dsql_auth {
            Some(auth) => {
                anyhow::ensure!(
                    profile == DatabaseProfile::Dsql,
                    "--dsql-region (IAM authentication tokens) needs --database-profile dsql"
                );
                match auth {
                    DsqlAuth::Iam(settings) => Some(DsqlTokenSource::aws_config(&settings.region).await),
                    DsqlAuth::Source(_) => None,
                }
            }
            None => None,
        };
        let (connect, primary_auth) = match &options.dsql_auth {
            Some(auth) => {
                let (connect, pool_auth) = PoolAuth::start(auth, aws.as_ref(), url, connect)
                    .await
                    .context("preparing the database authentication token")?;
                (connect, Some(pool_auth))
            }
            None => (dsql_auth::plain_unless_asked(url, connect), None),
        };
        let mut token_refreshers = Vec::new();
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            .max_lifetime(CONNECTION_LIFETIME)
            // sqlx pings every connection it hands out by default: one more round trip per
            // statement outside a transaction. Only a connection that sat idle is pinged (the
            // one a restart or a cut may have broken); a busy pool's are not.
            .test_before_acquire(false)
            .before_acquire(|connection, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IDLE_AFTER {
                        sqlx::Connection::ping(connection).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(connect.clone().application_name("orderflow"))
            .await
            .with_context(|| match &options.dsql_auth {
                Some(auth) => format!(
                    "connecting to PostgreSQL at {} {}",
                    super::redact_url(url),
                    PoolAuth::describe(auth, &connect)
                ),
                None => format!("connecting to PostgreSQL at {}", super::redact_url(url)),
            })?;
        if let Some(auth) = primary_auth {
            token_refreshers.push(TokenRefresher::spawn(pool.clone(), auth.source, auth.first.valid_for));
        }
        let pool = DbPool::postgres(pool, behind_pooler);
        let wakeups = match profile {
            // LISTEN needs its session for good, which a transaction pooler hands to other
            // clients between transactions: workers poll, as in the dsql profile.
            DatabaseProfile::Postgres if behind_pooler => {
                pooled_migrate::run(&pool)
                    .await
                    .context("applying PostgreSQL migrations (behind a transaction pooler)")?;
                Wakeups {
                    local: JobSignal::polled(),
                    others: None,
                }
            }
            DatabaseProfile::Postgres => {
                sqlx::migrate!("migrations/postgres")
                    .run(pool.sqlx())
                    .await
                    .context("applying PostgreSQL migrations")?;
                // LISTEN holds its connection for good: it gets one of its own, so it never takes
                // a slot of the pool that requests wait on (`--db-max-connections` means what it
                // says).
                let listener_pool = PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(options.acquire_timeout)
                    .max_lifetime(CONNECTION_LIFETIME)
                    .connect_lazy_with(connect.application_name("orderflow-listener"));
                let local = JobSignal::new();
                spawn_job_listener(listener_pool, Arc::downgrade(&local));
                Wakeups {
                    local,
                    others: Some(spawn_job_waker(pool.sqlx().clone())),
                }
            }
            DatabaseProfile::Dsql => {
                dsql_migrate::run(pool.sqlx())
                    .await
                    .context("applying the distributed-SQL migrations (migrations/dsql)")?;
                Wakeups {
                    local: JobSignal::polled(),
                    others: None,
                }
            }
        };
        let replica = match &options.read_replica {
            Some(settings) => {
                let mut connect: PgConnectOptions = settings.url.parse().context("parsing the read replica's URL")?;
                if behind_pooler {
                    connect = connect.statement_cache_capacity(0);
                }
                // Its own tokens: its endpoint (and maybe user) is its own.
                let (connect, replica_auth) = match &options.dsql_auth {
                    Some(auth) => {
                        let (connect, pool_auth) = PoolAuth::start(auth, aws.as_ref(), &settings.url, connect)
                            .await
                            .context("preparing the read replica's authentication token")?;
                        (connect, Some(pool_auth))
                    }
                    None => (dsql_auth::plain_unless_asked(&settings.url, connect), None),
                };
                // Short waits: a replica that does not answer is bypassed, not waited for.
                let replica_pool = PgPoolOptions::new()
                    .max_connections(options.max_connections.max(1))
                    .acquire_timeout(options.acquire_timeout.min(Duration::from_secs(1)))
                    .max_lifetime(CONNECTION_LIFETIME)
                    .connect_lazy_with(connect.application_name("orderflow-replica"));
                if let Some(auth) = replica_auth {
                    token_refreshers.push(TokenRefresher::spawn(
                        replica_pool.clone(),
                        auth.source,
                        auth.first.valid_for,
                    ));
                }
                Some(replica::Replica::start(
                    DbPool::postgres(replica_pool, behind_pooler),
                    pool.clone(),
                    settings.max_lag,
                ))
            }
            None => None,
        };
        let committer = {
            let wakeups = wakeups.clone();
            let (mut max_batch, committers) = options.group_commit.resolve(false, options.max_connections);
            if !profile.has_postgres_extras() && max_batch > 1 {
                // A group shares one transaction through savepoints, which this profile lacks.
                if options.group_commit.max_batch.is_some_and(|asked| asked > 1) {
                    tracing::warn!(
                        max_batch,
                        "--commit-batch is 1 in the dsql profile (group commit needs SAVEPOINT)"
                    );
                }
                max_batch = 1;
            }
            GroupCommit::start(
                pool.clone(),
                "BEGIN",
                "FOR UPDATE",
                (max_batch, committers),
                Arc::new(move |kinds| wakeups.enqueued(kinds)),
            )
            .with_savepoints(profile.has_postgres_extras())
        };
        let checkouts = {
            let (max_batch, writers) = options.checkout_batch.resolve();
            let writer = Checkouts {
                transaction: PgCheckouts {
                    pool: pool.clone(),
                    wakeups: wakeups.clone(),
                },
                max_changed_rows: (!profile.has_postgres_extras()).then_some(super::MAX_CHANGED_ROWS),
            };
            Batcher::start(writer, max_batch, writers)
        };
        let events = EventsSql {
            write: pool.clone(),
            read: pool.clone(),
            begin: "BEGIN",
            lock_rows: "FOR UPDATE",
        };
        Ok(Self {
            after_sale: AfterSaleSql { read: pool.clone() },
            step_reads: StepReads::start(pool.clone()),
            committer,
            checkouts,
            pool,
            profile,
            wakeups,
            events,
            replica,
            _token_refreshers: token_refreshers,
        })
    }

    /// Runs a read that may be a little behind on the replica when it is in use (see
    /// [`replica`]), else on the primary.
    async fn replica_read<T, F, Fut>(&self, read: F) -> StoreResult<T>
    where
        F: Fn(DbPool<Postgres>) -> Fut,
        Fut: std::future::Future<Output = StoreResult<T>>,
    {
        match &self.replica {
            Some(replica) => replica.read(&self.pool, read).await,
            None => read(self.pool.clone()).await,
        }
    }

    /// The replica's pool, for the pool gauges.
    fn replica_pool(&self) -> Option<&DbPool<Postgres>> {
        self.replica.as_ref().map(|replica| replica.pool())
    }

    /// Wakes every job worker here and (coalesced, after commit) in other processes: jobs of
    /// any kind became ready (a replay).
    fn jobs_enqueued(&self) {
        self.wakeups.all();
    }

    async fn create_product_once(&self, product: &NewProduct, now: DateTime<Utc>) -> StoreResult<Product> {
        let mut tx = self.pool.begin().await?;
        let row: ProductRow = sqlx::query_as(&format!(
            "INSERT INTO products (id, sku, name, description, category, price_minor, on_hand, \
             reserved, version, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 0, 1, $8, $8) \
             RETURNING {PRODUCT_COLUMNS}"
        ))
        .bind(product.id.as_uuid())
        .bind(&product.sku)
        .bind(&product.name)
        .bind(&product.description)
        .bind(&product.category)
        .bind(product.price.minor())
        .bind(product.stock)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(unique_is_conflict("sku"))?;
        if product.stock != 0 {
            insert_ledger(&mut tx, product.id, "initial", product.stock, "initial stock", now).await?;
        }
        tx.commit().await?;
        row.try_into()
    }

    async fn update_product_once(
        &self,
        id: ProductId,
        patch: &ProductPatch,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Product>> {
        let row: Option<ProductRow> = sqlx::query_as(&format!(
            "UPDATE products SET name = coalesce($1, name), \
             description = CASE WHEN $2 THEN $3 ELSE description END, \
             category = CASE WHEN $4 THEN $5 ELSE category END, \
             price_minor = coalesce($6, price_minor), version = version + 1, updated_at = $7 \
             WHERE id = $8 RETURNING {PRODUCT_COLUMNS}"
        ))
        .bind(&patch.name)
        .bind(patch.description.is_some())
        .bind(patch.description.clone().flatten())
        .bind(patch.category.is_some())
        .bind(patch.category.clone().flatten())
        .bind(patch.price.map(|p| p.minor()))
        .bind(now)
        .bind(id.as_uuid())
        .fetch_optional(&self.pool)
        .await?;
        row.map(Product::try_from).transpose()
    }

    async fn create_customer_once(&self, customer: &NewCustomer, now: DateTime<Utc>) -> StoreResult<Customer> {
        let row: Option<CustomerRow> = sqlx::query_as(&format!(
            "INSERT INTO customers (id, email, first_name, last_name, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING RETURNING {CUSTOMER_COLUMNS}"
        ))
        .bind(customer.id.as_uuid())
        .bind(customer.email.as_str())
        .bind(&customer.first_name)
        .bind(&customer.last_name)
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(unique_is_conflict("email"))?;
        row.ok_or(StoreError::Conflict("customer_id"))?.try_into()
    }

    /// Phase 1 of placing an order, round trip 1 of 2: record that a request with this key is
    /// in flight, so a concurrent duplicate gets 409 instead of waiting and a later one replays
    /// the result, and — in the same statement — read an earlier use of the key and the price and
    /// stock of the cart's products, which phase 2 prices the order with.
    /// The claim is committed without waiting for the WAL flush: if it is lost in a crash, so is
    /// everything after it (the order's commit flushes the WAL up to and including the claim).
    /// Only taking over a stale claim costs one more round trip.
    async fn claim_key(&self, request: &PlaceOrder, lock_token: Uuid) -> StoreResult<Claim> {
        let products = checkout_batch::products_of(std::iter::once(request));
        for _ in 0..3 {
            // The sibling CTE `earlier` reads the statement's snapshot: the row the INSERT
            // collided with when it was committed before the statement began (else nothing, and
            // the claim is tried again).
            #[allow(clippy::type_complexity)]
            let (claimed, fingerprint, state, body, old_token, updated_at, ids, prices, available): (
                bool,
                Option<String>,
                Option<String>,
                Option<String>,
                Option<Uuid>,
                Option<DateTime<Utc>>,
                Option<Vec<Uuid>>,
                Option<Vec<i64>>,
                Option<Vec<i64>>,
            ) = sqlx::query_as(
                "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true)), \
                 claimed AS ( \
                    INSERT INTO idempotency_keys (principal, key, fingerprint, state, lock_token, created_at, updated_at) \
                    SELECT $1, $2, $3, 'in_flight', $4, $5, $5 FROM relaxed \
                    ON CONFLICT (principal, key) DO NOTHING RETURNING 1), \
                 earlier AS ( \
                    SELECT fingerprint, state, response_body, lock_token, updated_at FROM idempotency_keys \
                    WHERE principal = $1 AND key = $2), \
                 stock AS ( \
                    SELECT array_agg(id ORDER BY id) AS ids, array_agg(price_minor ORDER BY id) AS prices, \
                        array_agg(on_hand - reserved ORDER BY id) AS available \
                    FROM products WHERE id = ANY($6)) \
                 SELECT EXISTS (SELECT 1 FROM claimed), e.fingerprint, e.state, e.response_body, e.lock_token, \
                    e.updated_at, s.ids, s.prices, s.available \
                 FROM stock s LEFT JOIN earlier e ON true",
            )
            .bind(&request.principal)
            .bind(&request.idempotency_key)
            .bind(&request.fingerprint)
            .bind(lock_token)
            .bind(request.now)
            .bind(&products)
            .fetch_one(&self.pool)
            .await?;
            let levels = || {
                let rows = ids.clone().unwrap_or_default().into_iter();
                let rows = rows
                    .zip(prices.clone().unwrap_or_default())
                    .zip(available.clone().unwrap_or_default());
                stock_levels(rows.map(|((id, price), available)| (id, price, available)).collect())
            };
            if claimed {
                return Ok(Claim::Acquired(levels()?));
            }
            let (Some(fingerprint), Some(state), Some(updated_at)) = (fingerprint, state, updated_at) else {
                continue; // committed after our snapshot, or released since: try to claim again
            };
            if state == "completed" {
                return replay_or_refuse(request, &fingerprint, body.as_deref()).map(Claim::Finished);
            }
            if fingerprint != request.fingerprint {
                return Ok(Claim::Finished(PlaceOrderOutcome::KeyReused));
            }
            if request.now - updated_at < IN_FLIGHT_STALE_AFTER {
                return Ok(Claim::Finished(PlaceOrderOutcome::KeyInUse));
            }
            let taken = sqlx::query(
                "UPDATE idempotency_keys SET lock_token = $3, updated_at = $4 \
                 WHERE principal = $1 AND key = $2 AND state = 'in_flight' AND lock_token IS NOT DISTINCT FROM $5",
            )
            .bind(&request.principal)
            .bind(&request.idempotency_key)
            .bind(lock_token)
            .bind(request.now)
            .bind(old_token)
            .execute(&self.pool)
            .await?;
            return Ok(if taken.rows_affected() == 1 {
                Claim::Acquired(levels()?)
            } else {
                Claim::Finished(PlaceOrderOutcome::KeyInUse)
            });
        }
        Ok(Claim::Finished(PlaceOrderOutcome::KeyInUse))
    }

    /// Gives the key back after a request that created nothing (and whose key no other request
    /// took over), so the client may retry it.
    ///
    /// After an outage (the claim or the checkout answered [`StoreError::is_outage`]) the
    /// database is likely still away: the release is retried in the background until it lands
    /// or the claim would have gone stale anyway, so the client's retry is refused as in use no
    /// longer than the outage lasts — without making this 503 wait for it. Releasing is safe even
    /// when the outcome is unknown (a connection lost during COMMIT): a committed checkout's key
    /// is `completed`, which the release leaves alone.
    async fn release_unless_created(
        &self,
        request: &PlaceOrder,
        lock_token: Uuid,
        result: &StoreResult<PlaceOrderOutcome>,
    ) {
        if matches!(
            result,
            Ok(PlaceOrderOutcome::Created(_)) | Ok(PlaceOrderOutcome::KeyInUse)
        ) {
            return;
        }
        // Contention is no outage of the database: the key is given back now, so the client's
        // retry after `Retry-After` finds it free.
        let database_away = matches!(result, Err(error) if error.is_outage() && !error.is_contention());
        self.release(request, lock_token, database_away).await;
    }

    /// [`Self::claim_key`]; when the database went away under it, the claim may have been
    /// committed even so (its connection lost on the way back), so it is released as after a
    /// checkout that failed for the outage.
    async fn claim(&self, request: &PlaceOrder, lock_token: Uuid) -> StoreResult<Claim> {
        // Each statement of the claim commits alone; one that lost a race (two requests with the
        // same key under snapshot isolation) wrote nothing, and the claim is looked at afresh.
        let claimed = retry::transaction(|| self.claim_key(request, lock_token)).await;
        if matches!(&claimed, Err(error) if error.is_outage()) {
            self.release(request, lock_token, true).await;
        }
        claimed
    }

    /// Deletes our in-flight claim: now, once; or after an outage in the background, until it
    /// lands (see [`Self::release_unless_created`]).
    async fn release(&self, request: &PlaceOrder, lock_token: Uuid, after_outage: bool) {
        let (pool, principal, key) = (
            self.pool.clone(),
            request.principal.clone(),
            request.idempotency_key.clone(),
        );
        let release = async move {
            let give_up = tokio::time::Instant::now() + IN_FLIGHT_STALE_AFTER.to_std().unwrap_or_default();
            let mut wait = Duration::from_millis(100);
            loop {
                match retry::transaction(|| release_key(&pool, &principal, &key, lock_token)).await {
                    Ok(()) => return,
                    Err(error) if error.is_outage() && after_outage && tokio::time::Instant::now() + wait < give_up => {
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(2));
                    }
                    // The claim simply goes stale.
                    Err(error) => return tracing::warn!(%error, "could not release an idempotency claim"),
                }
            }
        };
        if after_outage {
            tokio::spawn(release);
        } else {
            release.await;
        }
    }
}

async fn release_key(pool: &DbPool<Postgres>, principal: &str, key: &str, lock_token: Uuid) -> StoreResult<()> {
    sqlx::query(
        "DELETE FROM idempotency_keys WHERE principal = $1 AND key = $2 AND lock_token = $3 \
         AND state = 'in_flight'",
    )
    .bind(principal)
    .bind(key)
    .bind(lock_token)
    .execute(pool)
    .await?;
    Ok(())
}

/// Phase 2 of placing orders, round trip 2 of 2 ([`checkout_batch`]): a group of claimed
/// checkouts is priced against the stock their claims read, and ONE autocommitted statement of
/// data-modifying CTEs writes every accepted order — the stock reservations (one per product),
/// the orders, lines, timeline entries, `order.placed` events, first jobs and completed
/// idempotency records.
///
/// The stock was read in another round trip, so the reservation is conditional and checked on
/// the newest row version as it is written, under the row's lock (taken in product-id order, so
/// two groups never deadlock): the row still has what the accepted orders reserve, still the
/// price they were charged, and — for a product a refused checkout was short of — no more than
/// it had ([`checkout_batch::stock_checks`]). When any check fails the statement aborts itself
/// (a cast of a marker text to an integer, [`STOCK_MOVED`]) and writes nothing; the group is
/// then priced again against freshly locked stock and written in a transaction (BEGIN, `SELECT …
/// FOR UPDATE`, the same statement, COMMIT): another process changed the stock or the price in
/// between, which is rare next to the checkouts that pass. A claim that went stale and was taken
/// over by another request aborts it the same way ([`CLAIM_LOST`]). A group whose every
/// checkout is refused writes nothing at all: its answers come from the stock read with the
/// claims. A group of one is a single checkout.
struct PgCheckouts {
    pool: DbPool<Postgres>,
    wakeups: Wakeups,
}

/// Marker texts of the errors the write statement raises to abort itself. Each is cast with a
/// subquery in it (a count), never with parameters alone: the planner folds constant
/// expressions, so a cast of parameters would fail at planning, whatever its CASE branch says.
const STOCK_MOVED: &str = "orderflow:stock_moved";
const CLAIM_LOST: &str = "orderflow:claim_lost";
/// A customer of the group does not exist: the foreign key's answer, in the dsql profile's
/// schema, which has no foreign keys (customers are never deleted, so reading them suffices).
const UNKNOWN_CUSTOMER: &str = "orderflow:unknown_customer";

/// What the write statement did.
enum Written {
    /// Everything, committed (autocommit) or ready to commit (in a transaction).
    Orders,
    /// Nothing: a product's stock or price is no longer what the group was priced with.
    StockMoved,
    /// Nothing, and this is the answer (a group of one whose write failed for its own reason).
    Refused(Vec<PlaceOrderOutcome>),
}

#[async_trait]
impl CheckoutTransaction for PgCheckouts {
    async fn write_group(&self, group: &[Checkout]) -> Result<Vec<PlaceOrderOutcome>, GroupFailure> {
        let mut connection = self.pool.acquire().await?;
        let written = self.write_group_on(&mut connection, group).await;
        if matches!(written, Err(GroupFailure::ConnectionLost(_))) {
            // Broken: never back into the pool, so the re-run gets a fresh one.
            connection.close_on_drop();
        }
        written
    }
}

impl PgCheckouts {
    async fn write_group_on(
        &self,
        connection: &mut sqlx::pool::PoolConnection<Postgres>,
        group: &[Checkout],
    ) -> Result<Vec<PlaceOrderOutcome>, GroupFailure> {
        let levels = checkout_batch::latest_levels(group);
        let allocated = checkout_batch::allocate(group.iter().map(|c| &c.request), levels.clone());
        if allocated.iter().all(Result::is_err) {
            return Ok(outcomes(allocated));
        }
        // Autocommit: the statement is its own transaction, so a connection lost while it runs
        // leaves its outcome unknown, as during a COMMIT. Behind a transaction pooler it is
        // given an explicit one (its two exchanges must reach the same server).
        let written = if self.pool.behind_transaction_pooler() {
            self.write_orders_in_transaction(connection, group, &levels, &allocated)
                .await
        } else {
            self.write_orders(connection, group, &levels, &allocated).await
        };
        match written {
            Ok(Written::Orders) => {
                self.enqueued(group);
                return Ok(outcomes(allocated));
            }
            Ok(Written::StockMoved) => {}
            Ok(Written::Refused(answers)) => return Ok(answers),
            Err(GroupFailure::ConnectionLost(error)) => return Err(GroupFailure::at_commit(error)),
            Err(failure) => return Err(failure),
        }
        let mut tx = self.pool.begin_on(connection).await?;
        let product_ids = checkout_batch::products_of(group.iter().map(|c| &c.request));
        let levels = sqlx::query_as::<_, (Uuid, i64, i64)>(
            "SELECT id, price_minor, on_hand - reserved FROM products WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        )
        .bind(&product_ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(retryable)?;
        let levels = stock_levels(levels).map_err(GroupFailure::Failed)?;
        let allocated = checkout_batch::allocate(group.iter().map(|c| &c.request), levels.clone());
        if allocated.iter().any(Result::is_ok) {
            match self.write_orders(&mut tx, group, &levels, &allocated).await? {
                Written::Orders => {}
                Written::Refused(answers) => return Ok(answers),
                Written::StockMoved => {
                    return Err(GroupFailure::Failed(StoreError::Corrupt(
                        "locked stock changed inside the transaction".into(),
                    )));
                }
            }
            tx.commit().await.map_err(|error| {
                if is_retryable(&error) {
                    GroupFailure::Retry(error)
                } else {
                    GroupFailure::at_commit(error)
                }
            })?;
            self.enqueued(group);
        }
        Ok(outcomes(allocated))
    }

    /// [`Self::write_orders`] in a transaction of its own, committed when it wrote the orders.
    async fn write_orders_in_transaction(
        &self,
        connection: &mut sqlx::pool::PoolConnection<Postgres>,
        group: &[Checkout],
        levels: &[StockLevel],
        allocated: &[Result<Order, CartRejection>],
    ) -> Result<Written, GroupFailure> {
        let mut tx = self.pool.begin_on(connection).await?;
        let written = self.write_orders(&mut tx, group, levels, allocated).await?;
        if matches!(written, Written::Orders) {
            tx.commit().await.map_err(|error| {
                if is_retryable(&error) {
                    GroupFailure::Retry(error)
                } else {
                    GroupFailure::at_commit(error)
                }
            })?;
        }
        Ok(written)
    }

    fn enqueued(&self, group: &[Checkout]) {
        let kinds: Vec<&str> = group.iter().map(|checkout| checkout.request.first_job.kind).collect();
        self.wakeups.enqueued(&kinds);
    }

    /// The one statement that writes a group's accepted orders, its checks made on the product
    /// rows as they are written (see [`PgCheckouts`]).
    async fn write_orders(
        &self,
        connection: &mut sqlx::PgConnection,
        group: &[Checkout],
        levels: &[StockLevel],
        allocated: &[Result<Order, CartRejection>],
    ) -> Result<Written, GroupFailure> {
        let accepted: Vec<(&Checkout, &Order)> = group
            .iter()
            .zip(allocated)
            .filter_map(|(checkout, outcome)| outcome.as_ref().ok().map(|order| (checkout, order)))
            .collect();
        let rows = BulkOrders::of(&accepted);
        let checks = checkout_batch::stock_checks(levels, allocated);
        let check_ids: Vec<Uuid> = checks.iter().map(|check| check.product).collect();
        let check_units: Vec<i64> = checks.iter().map(|check| check.units).collect();
        let check_prices: Vec<Option<i64>> = checks.iter().map(|check| check.price).collect();
        let check_at_most: Vec<Option<i64>> = checks.iter().map(|check| check.at_most).collect();
        let written = sqlx::query(
                "WITH locked AS MATERIALIZED ( \
                    SELECT id FROM products WHERE id = ANY($2) ORDER BY id FOR UPDATE), \
                 reserve AS ( \
                    UPDATE products p SET reserved = p.reserved + v.units, \
                        version = p.version + CASE WHEN v.units > 0 THEN 1 ELSE 0 END, \
                        updated_at = CASE WHEN v.units > 0 THEN $1 ELSE p.updated_at END \
                    FROM unnest($2::uuid[], $3::bigint[], $30::bigint[], $31::bigint[]) AS v(id, units, price, at_most) \
                    WHERE p.id = v.id AND p.id IN (SELECT id FROM locked) AND p.on_hand - p.reserved >= v.units \
                        AND (v.price IS NULL OR p.price_minor = v.price) \
                        AND (v.at_most IS NULL OR p.on_hand - p.reserved <= v.at_most) \
                    RETURNING p.id), \
                 new_orders AS ( \
                    INSERT INTO orders (id, customer_id, status, inventory_state, currency, total_minor, payment_token, \
                        idempotency_principal, idempotency_key, correlation_id, created_at, updated_at, \
                        last_event_sequence, shipping, region) \
                    SELECT v.id, v.customer_id, 'pending_payment', 'reserved', v.currency, v.total, v.token, \
                        v.principal, v.key, v.correlation_id, v.at, v.at, 1, v.shipping, v.region \
                    FROM unnest($4::uuid[], $5::uuid[], $6::text[], $7::bigint[], $8::text[], $9::text[], $10::text[], \
                        $11::text[], $12::timestamptz[], $13::text[], $32::text[]) \
                        AS v(id, customer_id, currency, total, token, principal, key, correlation_id, at, shipping, region)), \
                 lines AS ( \
                    INSERT INTO order_items (order_id, product_id, line_no, quantity, unit_price_minor) \
                    SELECT * FROM unnest($14::uuid[], $15::uuid[], $16::int[], $17::bigint[], $18::bigint[])), \
                 timeline AS ( \
                    INSERT INTO order_events (id, order_id, kind, status, detail, correlation_id, created_at) \
                    SELECT v.id, v.order_id, 'order_placed', 'pending_payment', NULL, v.correlation_id, v.at \
                    FROM unnest($19::uuid[], $4::uuid[], $11::text[], $12::timestamptz[]) \
                        AS v(id, order_id, correlation_id, at)), \
                 outbox AS ( \
                    INSERT INTO events (id, subject, order_id, event_type, sequence, data, correlation_id, created_at) \
                    SELECT v.id, v.subject, v.order_id, 'order.placed', 1, v.data, v.correlation_id, v.at \
                    FROM unnest($20::uuid[], $21::text[], $4::uuid[], $22::text[], $11::text[], $12::timestamptz[]) \
                        AS v(id, subject, order_id, data, correlation_id, at)), \
                 first_jobs AS ( \
                    INSERT INTO jobs (id, kind, order_id, payload, state, attempts, max_attempts, run_at, \
                        ready_since, correlation_id, created_at, updated_at) \
                    SELECT v.id, v.kind, v.order_id, v.payload, 'ready', 0, v.max_attempts, v.run_at, v.run_at, \
                        v.correlation_id, v.at, v.at \
                    FROM unnest($23::uuid[], $24::text[], $4::uuid[], $25::text[], $26::int[], $27::timestamptz[], \
                        $11::text[], $12::timestamptz[]) \
                        AS v(id, kind, order_id, payload, max_attempts, run_at, correlation_id, at)), \
                 completed AS ( \
                    UPDATE idempotency_keys k SET state = 'completed', order_id = v.order_id, response_status = 202, \
                        response_body = v.body, lock_token = NULL, updated_at = v.at \
                    FROM unnest($9::text[], $10::text[], $28::uuid[], $4::uuid[], $29::text[], $12::timestamptz[]) \
                        AS v(principal, key, lock_token, order_id, body, at) \
                    WHERE k.principal = v.principal AND k.key = v.key AND k.lock_token = v.lock_token \
                        AND k.state = 'in_flight' RETURNING 1) \
                 SELECT CASE \
                    WHEN (SELECT count(*) FROM reserve) <> cardinality($2::uuid[]) \
                        THEN ('orderflow:stock_moved:' || (SELECT count(*) FROM reserve))::int \
                    WHEN (SELECT count(*) FROM completed) <> cardinality($4::uuid[]) \
                        THEN ('orderflow:claim_lost:' || (SELECT count(*) FROM completed))::int \
                    WHEN (SELECT count(*) FROM customers WHERE id = ANY($5::uuid[])) \
                        <> (SELECT count(DISTINCT c) FROM unnest($5::uuid[]) AS c) \
                        THEN ('orderflow:unknown_customer:' || (SELECT count(*) FROM customers \
                            WHERE id = ANY($5::uuid[])))::int \
                    ELSE 0 END",
            )
            .bind(crate::clock::now()) // $1
            .bind(&check_ids) // $2
            .bind(&check_units) // $3
            .bind(&rows.ids) // $4
            .bind(&rows.customer_ids) // $5
            .bind(&rows.currencies) // $6
            .bind(&rows.totals) // $7
            .bind(&rows.tokens) // $8
            .bind(&rows.principals) // $9
            .bind(&rows.keys) // $10
            .bind(&rows.correlation_ids) // $11
            .bind(&rows.created_at) // $12
            .bind(&rows.shipping) // $13
            .bind(&rows.line_orders) // $14
            .bind(&rows.line_products) // $15
            .bind(&rows.line_numbers) // $16
            .bind(&rows.line_quantities) // $17
            .bind(&rows.line_prices) // $18
            .bind(&rows.timeline_ids) // $19
            .bind(&rows.event_ids) // $20
            .bind(&rows.subjects) // $21
            .bind(&rows.placed_data) // $22
            .bind(&rows.job_ids) // $23
            .bind(&rows.job_kinds) // $24
            .bind(&rows.job_payloads) // $25
            .bind(&rows.job_attempts) // $26
            .bind(&rows.job_run_at) // $27
            .bind(&rows.lock_tokens) // $28
            .bind(&rows.snapshots) // $29
            .bind(&check_prices) // $30
            .bind(&check_at_most) // $31
            .bind(&rows.regions) // $32
            .execute(&mut *connection)
            .await;
        match written {
            Ok(_) => Ok(Written::Orders),
            Err(error) if aborted_by(&error, STOCK_MOVED) => Ok(Written::StockMoved),
            // A claim went stale and another request took its key over: that request owns the
            // outcome. Alone, say so; in a group, find out which one, each alone.
            Err(error) if aborted_by(&error, CLAIM_LOST) && group.len() == 1 => {
                Ok(Written::Refused(vec![PlaceOrderOutcome::KeyInUse]))
            }
            Err(error) if aborted_by(&error, CLAIM_LOST) => Err(GroupFailure::Split),
            // An unknown customer: alone, that checkout's answer; in a group, each alone.
            Err(error) if unknown_customer(&error) && group.len() == 1 => {
                Ok(Written::Refused(vec![PlaceOrderOutcome::Rejected(
                    CartRejection::UnknownCustomer(group[0].request.customer_id),
                )]))
            }
            Err(error) if unknown_customer(&error) => Err(GroupFailure::Split),
            Err(error) => Err(retryable(error)),
        }
    }
}

/// The statement raised its own abort, `marker` ([`STOCK_MOVED`], [`CLAIM_LOST`]): the marker
/// text cast to an integer fails with SQLSTATE 22P02 and quotes it.
fn aborted_by(error: &sqlx::Error, marker: &str) -> bool {
    matches!(error, sqlx::Error::Database(db)
        if db.code().as_deref() == Some("22P02") && db.message().contains(marker))
}

/// The foreign key to customers (postgres profile) or the statement's own check (dsql).
fn unknown_customer(error: &sqlx::Error) -> bool {
    is_foreign_key_violation(error) || aborted_by(error, UNKNOWN_CUSTOMER)
}

/// A statement before COMMIT failed: a serialization failure or deadlock is run again whole.
fn retryable(error: sqlx::Error) -> GroupFailure {
    if is_retryable(&error) {
        GroupFailure::Retry(error)
    } else {
        GroupFailure::from(error)
    }
}

/// Each checkout's answer from its allocation.
fn outcomes(allocated: Vec<Result<Order, CartRejection>>) -> Vec<PlaceOrderOutcome> {
    allocated
        .into_iter()
        .map(|outcome| match outcome {
            Ok(order) => PlaceOrderOutcome::Created(order),
            Err(rejection) => PlaceOrderOutcome::Rejected(rejection),
        })
        .collect()
}

/// The accepted orders of a group as the column arrays the bulk insert unnests.
#[derive(Default)]
struct BulkOrders {
    ids: Vec<Uuid>,
    customer_ids: Vec<Uuid>,
    currencies: Vec<String>,
    totals: Vec<i64>,
    tokens: Vec<String>,
    principals: Vec<String>,
    keys: Vec<String>,
    correlation_ids: Vec<Option<String>>,
    created_at: Vec<DateTime<Utc>>,
    shipping: Vec<Option<String>>,
    regions: Vec<Option<String>>,
    line_orders: Vec<Uuid>,
    line_products: Vec<Uuid>,
    line_numbers: Vec<i32>,
    line_quantities: Vec<i64>,
    line_prices: Vec<i64>,
    timeline_ids: Vec<Uuid>,
    event_ids: Vec<Uuid>,
    subjects: Vec<String>,
    placed_data: Vec<String>,
    job_ids: Vec<Uuid>,
    job_kinds: Vec<String>,
    job_payloads: Vec<String>,
    job_attempts: Vec<i32>,
    job_run_at: Vec<DateTime<Utc>>,
    lock_tokens: Vec<Uuid>,
    snapshots: Vec<String>,
}

impl BulkOrders {
    fn of(accepted: &[(&Checkout, &Order)]) -> Self {
        let mut rows = BulkOrders::default();
        for (checkout, order) in accepted {
            let request = &checkout.request;
            rows.ids.push(order.id.as_uuid());
            rows.customer_ids.push(order.customer_id.as_uuid());
            rows.currencies.push(order.currency.code().to_string());
            rows.totals.push(order.total.minor());
            rows.tokens.push(order.payment_token.as_str().to_string());
            rows.principals.push(request.principal.clone());
            rows.keys.push(request.idempotency_key.clone());
            rows.correlation_ids.push(request.correlation_id.clone());
            rows.created_at.push(request.now);
            rows.shipping.push(rows::encode_shipping(order.shipping.as_ref()));
            rows.regions.push(order.region.clone());
            for (line_no, line) in order.lines.iter().enumerate() {
                rows.line_orders.push(order.id.as_uuid());
                rows.line_products.push(line.product_id.as_uuid());
                rows.line_numbers.push(line_no as i32);
                rows.line_quantities.push(i64::from(line.quantity.get()));
                rows.line_prices.push(line.unit_price.minor());
            }
            rows.timeline_ids.push(Uuid::now_v7());
            rows.event_ids.push(Uuid::now_v7());
            rows.subjects.push(order_subject(order.id));
            rows.placed_data.push(placed_data(order));
            rows.job_ids.push(Uuid::now_v7());
            rows.job_kinds.push(request.first_job.kind.to_string());
            rows.job_payloads.push(request.first_job.payload.to_string());
            rows.job_attempts.push(request.first_job.max_attempts as i32);
            rows.job_run_at.push(request.first_job.run_at);
            rows.lock_tokens.push(checkout.lock_token);
            rows.snapshots.push(rows::encode_snapshot(order));
        }
        rows
    }
}

/// Serialization failures (DSQL's OC000/OC001 among them) and deadlocks: the whole transaction
/// may simply be run again.
fn is_retryable(error: &sqlx::Error) -> bool {
    retry::is_conflict(error)
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    fn events(&self) -> &dyn EventStore {
        &self.events
    }

    fn after_sale(&self) -> &dyn AfterSaleReads {
        &self.after_sale
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn is_empty(&self) -> StoreResult<bool> {
        let (exists,): (bool,) = sqlx::query_as("SELECT EXISTS (SELECT 1 FROM products)")
            .fetch_one(&self.pool)
            .await?;
        Ok(!exists)
    }

    async fn create_product(&self, product: &NewProduct, now: DateTime<Utc>) -> StoreResult<Product> {
        retry::transaction(|| self.create_product_once(product, now)).await
    }

    async fn list_products(&self, query: &ProductQuery) -> StoreResult<Page<Product>> {
        let mut sql = QueryBuilder::<Postgres>::new(format!("SELECT {PRODUCT_COLUMNS} FROM products WHERE true"));
        if let Some(category) = &query.category {
            sql.push(" AND category = ").push_bind(category.clone());
        }
        if let Some(after) = query.after {
            sql.push(" AND id > ").push_bind(after.as_uuid());
        }
        sql.push(" ORDER BY id LIMIT ").push_bind(i64::from(query.limit) + 1);
        let rows: Vec<ProductRow> = sql.build_query_as().fetch_all(&self.pool).await?;
        let products = rows
            .into_iter()
            .map(Product::try_from)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(Page::from_rows(products, query.limit, |p| p.id.as_uuid()))
    }

    async fn update_product(
        &self,
        id: ProductId,
        patch: &ProductPatch,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Product>> {
        retry::transaction(|| self.update_product_once(id, patch, now)).await
    }

    async fn adjust_stock(
        &self,
        id: ProductId,
        adjustment: &StockAdjustment,
        now: DateTime<Utc>,
    ) -> StoreResult<AdjustOutcome> {
        retry::transaction(|| async {
            let result: Result<AdjustOutcome, sqlx::Error> = async {
                let mut tx = self.pool.begin().await?;
                let current: Option<(i64, i64)> =
                    sqlx::query_as("SELECT on_hand, reserved FROM products WHERE id = $1 FOR UPDATE")
                        .bind(id.as_uuid())
                        .fetch_optional(&mut *tx)
                        .await?;
                let Some((on_hand, reserved)) = current else {
                    return Ok(AdjustOutcome::NotFound);
                };
                if !adjustment.allowed_for(on_hand, reserved) {
                    return Ok(AdjustOutcome::WouldBreakReservations { on_hand, reserved });
                }
                let row: ProductRow = sqlx::query_as(&format!(
                    "UPDATE products SET on_hand = on_hand + $1, version = version + 1, updated_at = $2 \
                     WHERE id = $3 RETURNING {PRODUCT_COLUMNS}"
                ))
                .bind(adjustment.delta)
                .bind(now)
                .bind(id.as_uuid())
                .fetch_one(&mut *tx)
                .await?;
                insert_ledger(&mut tx, id, "adjustment", adjustment.delta, &adjustment.reason, now).await?;
                tx.commit().await?;
                let product = Product::try_from(row).map_err(|e| sqlx::Error::Decode(e.to_string().into()))?;
                Ok(AdjustOutcome::Adjusted(product))
            }
            .await;
            Ok(result?)
        })
        .await
    }

    async fn create_customer(&self, customer: &NewCustomer, now: DateTime<Utc>) -> StoreResult<Customer> {
        retry::transaction(|| self.create_customer_once(customer, now)).await
    }

    async fn list_orders(&self, query: &OrderQuery) -> StoreResult<Page<Order>> {
        self.replica_read(|pool| list_orders_on(pool, query)).await
    }

    async fn place_order(&self, request: &PlaceOrder) -> StoreResult<PlaceOrderOutcome> {
        let lock_token = Uuid::now_v7();
        let stock = match self.claim(request, lock_token).await? {
            Claim::Acquired(stock) => stock,
            Claim::Finished(outcome) => return Ok(outcome),
        };
        let checkout = Checkout {
            request: request.clone(),
            lock_token,
            stock,
        };
        let result = self
            .checkouts
            .submit(checkout)
            .await
            .unwrap_or_else(|| Err(StoreError::Unavailable("the checkout writers have stopped".into())));
        self.release_unless_created(request, lock_token, &result).await;
        result
    }

    async fn place_orders(&self, requests: &[PlaceOrder]) -> Vec<StoreResult<PlaceOrderOutcome>> {
        let mut answers: Vec<Option<StoreResult<PlaceOrderOutcome>>> = Vec::with_capacity(requests.len());
        let mut claimed = Vec::new();
        for request in requests {
            let lock_token = Uuid::now_v7();
            answers.push(match self.claim(request, lock_token).await {
                Ok(Claim::Acquired(stock)) => {
                    claimed.push(Checkout {
                        request: request.clone(),
                        lock_token,
                        stock,
                    });
                    None
                }
                Ok(Claim::Finished(outcome)) => Some(Ok(outcome)),
                Err(error) => Some(Err(error)),
            });
        }
        let written = self.checkouts.write_now(claimed.clone()).await;
        for (checkout, result) in claimed.iter().zip(&written) {
            self.release_unless_created(&checkout.request, checkout.lock_token, result)
                .await;
        }
        let mut written = written.into_iter();
        answers
            .into_iter()
            .map(|answer| answer.unwrap_or_else(|| written.next().expect("one answer per claimed checkout")))
            .collect()
    }

    fn job_signal(&self) -> Arc<JobSignal> {
        self.wakeups.local.clone()
    }

    async fn get_product(&self, id: ProductId) -> StoreResult<Option<Product>> {
        reads::get_product(&self.pool, id).await
    }

    async fn get_customer(&self, id: CustomerId) -> StoreResult<Option<Customer>> {
        reads::get_customer(&self.pool, id).await
    }

    async fn get_order(&self, id: OrderId) -> StoreResult<Option<OrderDetails>> {
        reads::get_order(&self.pool, id).await
    }

    async fn jobs_for_order(&self, id: OrderId) -> StoreResult<Vec<JobSummary>> {
        let rows: Vec<(String, String, i32)> =
            sqlx::query_as("SELECT kind, state, attempts FROM jobs WHERE order_id = $1 ORDER BY id")
                .bind(id.as_uuid())
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(kind, state, attempts)| JobSummary { kind, state, attempts })
            .collect())
    }

    async fn audit(&self) -> StoreResult<AuditReport> {
        self.replica_read(|pool| async move { audit::run(&pool).await }).await
    }

    async fn sales_report(
        &self,
        range: &crate::domain::report::SalesRange,
        currency: crate::domain::Currency,
    ) -> StoreResult<Vec<super::reports::SalesPeriod>> {
        self.replica_read(|pool| async move {
            super::reports::sales(&pool, super::reports::postgres_period, range, currency).await
        })
        .await
    }

    fn read_replica(&self) -> Option<super::ReplicaStatus> {
        self.replica.as_ref().map(|replica| replica.status())
    }

    async fn forget_idempotency_keys(&self, before: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
        retry::transaction(|| idempotency::forget_keys(&self.pool, "BEGIN", before, batch)).await
    }
}

/// An order listing's page: the orders, then all their lines, on one pool (the replica's or
/// the primary's).
async fn list_orders_on(pool: DbPool<Postgres>, query: &OrderQuery) -> StoreResult<Page<Order>> {
    let rows: Vec<OrderRow> = reads::list_orders_query::<Postgres>(query)
        .build_query_as()
        .fetch_all(&pool)
        .await?;
    let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
    let items: Vec<OrderItemRow> = sqlx::query_as(
        "SELECT order_id, product_id, quantity, unit_price_minor FROM order_items \
         WHERE order_id = ANY($1) ORDER BY order_id, line_no",
    )
    .bind(&ids)
    .fetch_all(&pool)
    .await?;
    let orders = rows::assemble_orders(rows, &items)?;
    Ok(Page::from_rows(orders, query.limit, |o| o.id.as_uuid()))
}

async fn insert_ledger(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    product: ProductId,
    kind: &str,
    delta: i64,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO inventory_ledger (id, product_id, order_id, kind, delta, reason, created_at) \
         VALUES ($1, $2, NULL, $3, $4, $5, $6)",
    )
    .bind(Uuid::now_v7())
    .bind(product.as_uuid())
    .bind(kind)
    .bind(delta)
    .bind(reason)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

super::sandbox::impl_sandbox_books!(PgStore, pool, pool);
