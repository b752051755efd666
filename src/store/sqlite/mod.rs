//! The embedded store: one SQLite file in WAL mode, for the zero-set-up single-process default.
//!
//! SQLite allows one writer at a time. Rather than let concurrent transactions collide and surface
//! `database is locked`, all writes go through a pool of exactly ONE connection (callers queue for
//! it in the pool, bounded by the acquire timeout), and every write transaction starts with
//! `BEGIN IMMEDIATE` so another process (e.g. `orderflow seed`) waits on `busy_timeout` instead
//! of failing mid-transaction. Reads use a separate pool of read-only connections, which WAL lets
//! run beside the writer.
//!
//! Because the embedded store is single-process, "a request with this idempotency key is in
//! flight" is tracked in memory ([`InFlight`]); the completed record is in the database.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite};
use uuid::Uuid;

mod jobs;
mod ops;

use super::after_sale::{AfterSaleReads, AfterSaleSql};
use super::audit::{self, AuditReport};
use super::batcher::Batcher;
use super::checkout_batch::{self, Checkout, CheckoutTransaction, Checkouts, GroupFailure};
use super::common::{is_foreign_key_violation, placed_data, replay_or_refuse, stock_levels, unique_is_conflict};
use super::events::{EventStore, EventsSql};
use super::group_commit::GroupCommit;
use super::idempotency;
use super::pool::DbPool;
use super::reads;
use super::rows::{self, CUSTOMER_COLUMNS, CustomerRow, OrderItemRow, OrderRow, PRODUCT_COLUMNS, ProductRow};
use super::signal::JobSignal;
use super::{
    AdjustOutcome, Backend, ConnectOptions, JobSummary, OrderDetails, OrderQuery, Page, PlaceOrder, PlaceOrderOutcome,
    ProductQuery, Store, StoreError, StoreResult,
};
use crate::domain::events::order_subject;
use crate::domain::{
    CartRejection, Customer, CustomerId, NewCustomer, NewProduct, Order, OrderId, Product, ProductId, ProductPatch,
    StockAdjustment,
};

/// How hard SQLite works to make a commit survive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SqliteDurability {
    /// `synchronous=FULL`: every commit is fsynced; an accepted order survives power loss.
    Full,
    /// `synchronous=NORMAL`: survives a process crash (kill -9) but the last commits may be lost
    /// on power failure. Faster; for development.
    Normal,
}

pub struct SqliteStore {
    /// The single writer connection (see module docs).
    writer: DbPool<Sqlite>,
    /// Read-only connections for queries.
    reader: DbPool<Sqlite>,
    in_flight: InFlight,
    /// Wakes this process's job workers after jobs are enqueued or replayed.
    jobs_ready: Arc<JobSignal>,
    events: EventsSql<Sqlite>,
    committer: GroupCommit,
    /// Groups concurrent checkouts into shared transactions ([`checkout_batch`]).
    checkouts: Batcher<Checkouts<SqliteCheckouts>>,
    after_sale: AfterSaleSql<Sqlite>,
    /// Commits are fsynced (`--sqlite-durability full`).
    fsync_commits: bool,
}

impl SqliteStore {
    pub async fn open(path: &Path, options: &ConnectOptions) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating the data directory {}", dir.display()))?;
        }
        let synchronous = match options.sqlite_durability {
            SqliteDurability::Full => SqliteSynchronous::Full,
            SqliteDurability::Normal => SqliteSynchronous::Normal,
        };
        let connect = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(options.acquire_timeout.max(Duration::from_secs(10)))
            .after_release(|conn, _| Box::pin(writer_is_sound(conn)))
            .connect_with(connect.clone())
            .await
            .with_context(|| format!("opening SQLite database {}", path.display()))?;
        // SQLite's migrator takes no lock: serialize processes that start at once (say `serve`
        // and `audit`) with an exclusive lock on a file beside the database.
        let lock_path = path.with_extension("migrate-lock");
        let lock = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)?;
            file.lock()?;
            Ok(file)
        })
        .await?
        .context("locking the database for migration")?;
        sqlx::migrate!("migrations/sqlite")
            .run(&writer)
            .await
            .context("applying SQLite migrations")?;
        drop(lock);
        let reader = SqlitePoolOptions::new()
            .max_connections(options.max_connections.clamp(1, 8))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect.read_only(true))
            .await?;
        let (writer, reader) = (DbPool::from(writer), DbPool::from(reader));
        let events = EventsSql {
            write: writer.clone(),
            read: reader.clone(),
            begin: "BEGIN IMMEDIATE",
            lock_rows: "",
        };
        let jobs_ready = JobSignal::new();
        let committer = {
            let local = jobs_ready.clone();
            GroupCommit::start(
                writer.clone(),
                "BEGIN IMMEDIATE",
                "",
                options.group_commit.resolve(true, 1),
                Arc::new(move |kinds| local.wake(kinds.iter().copied())),
            )
        };
        let checkouts = {
            let (max_batch, writers) = options.checkout_batch.resolve();
            let writer = Checkouts {
                transaction: SqliteCheckouts {
                    writer: writer.clone(),
                    enqueued: jobs_ready.clone(),
                },
                max_changed_rows: None,
            };
            Batcher::start(writer, max_batch, writers)
        };
        Ok(Self {
            events,
            committer,
            checkouts,
            after_sale: AfterSaleSql { read: reader.clone() },
            writer,
            reader,
            in_flight: InFlight::default(),
            jobs_ready,
            fsync_commits: options.sqlite_durability == SqliteDurability::Full,
        })
    }

    /// Runs `write` in its own writer transaction whose commit is not fsynced, for records a
    /// crash may lose (in WAL mode the next fsynced commit makes it durable too, and nothing
    /// committed after it can survive without it).
    async fn write_unsynced<T, F>(&self, write: F) -> StoreResult<T>
    where
        F: for<'t> FnOnce(
            &'t mut sqlx::Transaction<'_, Sqlite>,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, sqlx::Error>> + Send + 't>>,
    {
        let mut connection = self.writer.acquire().await?;
        if self.fsync_commits {
            sqlx::query("PRAGMA synchronous = NORMAL")
                .execute(&mut *connection)
                .await?;
        }
        let written = async {
            let mut tx = sqlx::Connection::begin_with(&mut *connection, "BEGIN IMMEDIATE").await?;
            let value = write(&mut tx).await?;
            tx.commit().await?;
            Ok::<T, sqlx::Error>(value)
        }
        .await;
        if self.fsync_commits
            && sqlx::query("PRAGMA synchronous = FULL")
                .execute(&mut *connection)
                .await
                .is_err()
        {
            // Never back into the pool with commits that skip the fsync.
            connection.close_on_drop();
        }
        Ok(written?)
    }

    async fn order_items(&self, order_ids: &[Uuid]) -> StoreResult<Vec<OrderItemRow>> {
        if order_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT order_id, product_id, quantity, unit_price_minor FROM order_items WHERE order_id IN (",
        );
        let mut list = query.separated(", ");
        for id in order_ids {
            list.push_bind(*id);
        }
        query.push(") ORDER BY order_id, line_no");
        Ok(query.build_query_as().fetch_all(&self.reader).await?)
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    fn events(&self) -> &dyn EventStore {
        &self.events
    }

    fn after_sale(&self) -> &dyn AfterSaleReads {
        &self.after_sale
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn is_empty(&self) -> StoreResult<bool> {
        let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM (SELECT 1 FROM products LIMIT 1)")
            .fetch_one(&self.reader)
            .await?;
        Ok(count == 0)
    }

    async fn create_product(&self, product: &NewProduct, now: DateTime<Utc>) -> StoreResult<Product> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let row: ProductRow = sqlx::query_as(&format!(
            "INSERT INTO products (id, sku, name, description, category, price_minor, on_hand, \
             reserved, version, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, 0, 1, ?, ?) \
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
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(unique_is_conflict("sku"))?;
        if product.stock != 0 {
            insert_ledger(
                &mut tx,
                product.id,
                None,
                "initial",
                product.stock,
                "initial stock",
                now,
            )
            .await?;
        }
        tx.commit().await?;
        row.try_into()
    }

    async fn list_products(&self, query: &ProductQuery) -> StoreResult<Page<Product>> {
        let mut sql = QueryBuilder::<Sqlite>::new(format!("SELECT {PRODUCT_COLUMNS} FROM products WHERE 1 = 1"));
        if let Some(category) = &query.category {
            sql.push(" AND category = ").push_bind(category.clone());
        }
        if let Some(after) = query.after {
            sql.push(" AND id > ").push_bind(after.as_uuid());
        }
        sql.push(" ORDER BY id LIMIT ").push_bind(i64::from(query.limit) + 1);
        let rows: Vec<ProductRow> = sql.build_query_as().fetch_all(&self.reader).await?;
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
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let row: Option<ProductRow> = sqlx::query_as(&format!(
            "UPDATE products SET name = coalesce(?, name), \
             description = CASE WHEN ? THEN ? ELSE description END, \
             category = CASE WHEN ? THEN ? ELSE category END, \
             price_minor = coalesce(?, price_minor), version = version + 1, updated_at = ? \
             WHERE id = ? RETURNING {PRODUCT_COLUMNS}"
        ))
        .bind(&patch.name)
        .bind(patch.description.is_some())
        .bind(patch.description.clone().flatten())
        .bind(patch.category.is_some())
        .bind(patch.category.clone().flatten())
        .bind(patch.price.map(|p| p.minor()))
        .bind(now)
        .bind(id.as_uuid())
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        row.map(Product::try_from).transpose()
    }

    async fn adjust_stock(
        &self,
        id: ProductId,
        adjustment: &StockAdjustment,
        now: DateTime<Utc>,
    ) -> StoreResult<AdjustOutcome> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let current: Option<(i64, i64)> = sqlx::query_as("SELECT on_hand, reserved FROM products WHERE id = ?")
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
            "UPDATE products SET on_hand = on_hand + ?, version = version + 1, updated_at = ? \
             WHERE id = ? RETURNING {PRODUCT_COLUMNS}"
        ))
        .bind(adjustment.delta)
        .bind(now)
        .bind(id.as_uuid())
        .fetch_one(&mut *tx)
        .await?;
        insert_ledger(
            &mut tx,
            id,
            None,
            "adjustment",
            adjustment.delta,
            &adjustment.reason,
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(AdjustOutcome::Adjusted(row.try_into()?))
    }

    async fn create_customer(&self, customer: &NewCustomer, now: DateTime<Utc>) -> StoreResult<Customer> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let row: Option<CustomerRow> = sqlx::query_as(&format!(
            "INSERT INTO customers (id, email, first_name, last_name, created_at) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING RETURNING {CUSTOMER_COLUMNS}"
        ))
        .bind(customer.id.as_uuid())
        .bind(customer.email.as_str())
        .bind(&customer.first_name)
        .bind(&customer.last_name)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unique_is_conflict("email"))?;
        let row = row.ok_or(StoreError::Conflict("customer_id"))?;
        tx.commit().await?;
        row.try_into()
    }

    async fn list_orders(&self, query: &OrderQuery) -> StoreResult<Page<Order>> {
        let rows: Vec<OrderRow> = reads::list_orders_query::<Sqlite>(query)
            .build_query_as()
            .fetch_all(&self.reader)
            .await?;
        let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
        let items = self.order_items(&ids).await?;
        let orders = rows::assemble_orders(rows, &items)?;
        Ok(Page::from_rows(orders, query.limit, |o| o.id.as_uuid()))
    }

    async fn place_order(&self, request: &PlaceOrder) -> StoreResult<PlaceOrderOutcome> {
        let _claim = match self.in_flight.claim(request) {
            Ok(claim) => claim,
            Err(busy) => return Ok(busy),
        };
        let checkout = Checkout {
            request: request.clone(),
            lock_token: Uuid::nil(),
            stock: Vec::new(),
        };
        self.checkouts
            .submit(checkout)
            .await
            .unwrap_or_else(|| Err(StoreError::Unavailable("the checkout writer has stopped".into())))
    }

    async fn place_orders(&self, requests: &[PlaceOrder]) -> Vec<StoreResult<PlaceOrderOutcome>> {
        let mut answers: Vec<Option<StoreResult<PlaceOrderOutcome>>> = Vec::with_capacity(requests.len());
        let (mut claims, mut claimed) = (Vec::new(), Vec::new());
        for request in requests {
            answers.push(match self.in_flight.claim(request) {
                Ok(claim) => {
                    claims.push(claim);
                    claimed.push(Checkout {
                        request: request.clone(),
                        lock_token: Uuid::nil(),
                        stock: Vec::new(),
                    });
                    None
                }
                Err(busy) => Some(Ok(busy)),
            });
        }
        let mut written = self.checkouts.write_now(claimed).await.into_iter();
        drop(claims);
        answers
            .into_iter()
            .map(|answer| answer.unwrap_or_else(|| written.next().expect("one answer per claimed checkout")))
            .collect()
    }

    fn job_signal(&self) -> Arc<JobSignal> {
        self.jobs_ready.clone()
    }

    async fn get_product(&self, id: ProductId) -> StoreResult<Option<Product>> {
        reads::get_product(&self.reader, id).await
    }

    async fn get_customer(&self, id: CustomerId) -> StoreResult<Option<Customer>> {
        reads::get_customer(&self.reader, id).await
    }

    async fn get_order(&self, id: OrderId) -> StoreResult<Option<OrderDetails>> {
        reads::get_order(&self.reader, id).await
    }

    async fn jobs_for_order(&self, id: OrderId) -> StoreResult<Vec<JobSummary>> {
        let rows: Vec<(String, String, i32)> =
            sqlx::query_as("SELECT kind, state, attempts FROM jobs WHERE order_id = ? ORDER BY id")
                .bind(id.as_uuid())
                .fetch_all(&self.reader)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(kind, state, attempts)| JobSummary { kind, state, attempts })
            .collect())
    }

    async fn audit(&self) -> StoreResult<AuditReport> {
        audit::run(&self.reader).await
    }

    async fn sales_report(
        &self,
        range: &crate::domain::report::SalesRange,
        currency: crate::domain::Currency,
    ) -> StoreResult<Vec<super::reports::SalesPeriod>> {
        super::reports::sales(&self.reader, super::reports::sqlite_period, range, currency).await
    }

    async fn forget_idempotency_keys(&self, before: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
        idempotency::forget_keys(&self.writer, "BEGIN IMMEDIATE", before, batch).await
    }
}

/// Whether the writer connection may serve the next transaction, checked each time it goes back
/// to the pool.
///
/// A write that fails for a full disk or an I/O error may make SQLite roll the whole
/// transaction back by itself. The ROLLBACK sqlx then sends fails ("no transaction is active")
/// and sqlx goes on counting the transaction as open, so it would refuse every later
/// `BEGIN IMMEDIATE` on this connection, long after space came back. Such a connection is
/// closed instead, and the pool opens a fresh one for the next write.
async fn writer_is_sound(conn: &mut sqlx::SqliteConnection) -> Result<bool, sqlx::Error> {
    use sqlx::Connection;
    // Queued behind the ROLLBACK of the transaction just dropped, so the count is settled.
    conn.ping().await?;
    let sound = !conn.is_in_transaction();
    if !sound {
        tracing::debug!("the database rolled back a failed write by itself; reopening the writer connection");
    }
    Ok(sound)
}

async fn insert_ledger(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    product: ProductId,
    order: Option<OrderId>,
    kind: &str,
    delta: i64,
    reason: &str,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO inventory_ledger (id, product_id, order_id, kind, delta, reason, created_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(Uuid::now_v7())
    .bind(product.as_uuid())
    .bind(order.map(|o| o.as_uuid()))
    .bind(kind)
    .bind(delta)
    .bind(reason)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Keys of place-order requests currently being processed by this process.
#[derive(Default)]
struct InFlight(Arc<Mutex<HashMap<(String, String), String>>>);

/// Releases an in-flight key when the request finishes, however it finishes.
struct InFlightClaim {
    map: Arc<Mutex<HashMap<(String, String), String>>>,
    key: (String, String),
}

impl InFlight {
    /// Claims the request's key, or says why not (another request with it is running).
    fn claim(&self, request: &PlaceOrder) -> Result<InFlightClaim, PlaceOrderOutcome> {
        let key = (request.principal.clone(), request.idempotency_key.clone());
        let mut map = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(fingerprint) = map.get(&key) {
            return Err(if *fingerprint == request.fingerprint {
                PlaceOrderOutcome::KeyInUse
            } else {
                PlaceOrderOutcome::KeyReused
            });
        }
        map.insert(key.clone(), request.fingerprint.clone());
        Ok(InFlightClaim {
            map: self.0.clone(),
            key,
        })
    }
}

impl Drop for InFlightClaim {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        map.remove(&self.key);
    }
}

/// One write transaction for a group of checkouts ([`checkout_batch`]) on the single writer:
/// replays of completed keys answered from their records, the rest priced against the stock the
/// ones before them left, one conditional stock write per product, then each accepted order's
/// rows; one commit (one fsync) for all.
struct SqliteCheckouts {
    writer: DbPool<Sqlite>,
    enqueued: Arc<JobSignal>,
}

#[async_trait]
impl CheckoutTransaction for SqliteCheckouts {
    async fn write_group(&self, group: &[Checkout]) -> Result<Vec<PlaceOrderOutcome>, GroupFailure> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let mut outcomes: Vec<Option<PlaceOrderOutcome>> = Vec::with_capacity(group.len());
        for checkout in group {
            let request = &checkout.request;
            let earlier: Option<(String, Option<String>)> = sqlx::query_as(
                "SELECT fingerprint, response_body FROM idempotency_keys WHERE principal = ? AND key = ?",
            )
            .bind(&request.principal)
            .bind(&request.idempotency_key)
            .fetch_optional(&mut *tx)
            .await?;
            outcomes.push(match earlier {
                Some((fingerprint, body)) => {
                    Some(replay_or_refuse(request, &fingerprint, body.as_deref()).map_err(GroupFailure::Failed)?)
                }
                None => None,
            });
        }
        let fresh: Vec<&PlaceOrder> = group
            .iter()
            .zip(&outcomes)
            .filter(|(_, outcome)| outcome.is_none())
            .map(|(checkout, _)| &checkout.request)
            .collect();
        if fresh.is_empty() {
            return Ok(outcomes.into_iter().flatten().collect());
        }
        let product_ids = checkout_batch::products_of(fresh.iter().copied());
        let mut levels_sql =
            QueryBuilder::<Sqlite>::new("SELECT id, price_minor, on_hand - reserved FROM products WHERE id IN (");
        let mut list = levels_sql.separated(", ");
        for id in &product_ids {
            list.push_bind(*id);
        }
        levels_sql.push(")");
        let levels: Vec<(Uuid, i64, i64)> = levels_sql.build_query_as().fetch_all(&mut *tx).await?;
        let levels = stock_levels(levels).map_err(GroupFailure::Failed)?;
        let allocated = checkout_batch::allocate(fresh.iter().copied(), levels);
        let accepted: Vec<(&PlaceOrder, &Order)> = fresh
            .iter()
            .zip(&allocated)
            .filter_map(|(request, outcome)| outcome.as_ref().ok().map(|order| (*request, order)))
            .collect();
        if !accepted.is_empty() {
            let now = crate::clock::now();
            for (product, units) in checkout_batch::reservations(accepted.iter().map(|(_, order)| *order)) {
                // Conditional: even if a bug let two writers in, this can never oversell (I1).
                let reserved = sqlx::query(
                    "UPDATE products SET reserved = reserved + ?1, version = version + 1, updated_at = ?2 \
                     WHERE id = ?3 AND on_hand - reserved >= ?1",
                )
                .bind(units)
                .bind(now)
                .bind(product)
                .execute(&mut *tx)
                .await?;
                if reserved.rows_affected() != 1 {
                    return Err(GroupFailure::Failed(StoreError::Corrupt(format!(
                        "stock of {product} changed inside the write transaction"
                    ))));
                }
            }
            for (request, order) in &accepted {
                match insert_order(&mut tx, request, order).await {
                    Ok(()) => {}
                    // An unknown customer: alone, that checkout's answer (nothing committed); in
                    // a group, each alone.
                    Err(error) if is_foreign_key_violation(&error) && group.len() == 1 => {
                        return Ok(vec![PlaceOrderOutcome::Rejected(CartRejection::UnknownCustomer(
                            request.customer_id,
                        ))]);
                    }
                    Err(error) if is_foreign_key_violation(&error) => return Err(GroupFailure::Split),
                    Err(error) => return Err(error.into()),
                }
            }
            tx.commit().await.map_err(GroupFailure::at_commit)?;
            self.enqueued
                .wake(group.iter().map(|checkout| checkout.request.first_job.kind));
        }
        let mut allocated = allocated.into_iter();
        Ok(outcomes
            .into_iter()
            .map(|earlier| {
                earlier.unwrap_or_else(|| match allocated.next().expect("one allocation per fresh checkout") {
                    Ok(order) => PlaceOrderOutcome::Created(order),
                    Err(rejection) => PlaceOrderOutcome::Rejected(rejection),
                })
            })
            .collect())
    }
}

/// An accepted order's rows: the order, its lines, its timeline's first entry, its
/// `order.placed` event, its first job and its completed idempotency record.
async fn insert_order(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    request: &PlaceOrder,
    order: &Order,
) -> Result<(), sqlx::Error> {
    let now = request.now;
    sqlx::query(
        "INSERT INTO orders (id, customer_id, status, inventory_state, currency, total_minor, \
         payment_token, shipping, idempotency_principal, idempotency_key, correlation_id, created_at, \
         updated_at, last_event_sequence, region) VALUES (?, ?, ?, 'reserved', ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?)",
    )
    .bind(order.id.as_uuid())
    .bind(order.customer_id.as_uuid())
    .bind(order.status.as_str())
    .bind(order.currency.code())
    .bind(order.total.minor())
    .bind(order.payment_token.as_str())
    .bind(rows::encode_shipping(order.shipping.as_ref()))
    .bind(&request.principal)
    .bind(&request.idempotency_key)
    .bind(&request.correlation_id)
    .bind(now)
    .bind(now)
    .bind(&order.region)
    .execute(&mut **tx)
    .await?;
    for (line_no, line) in order.lines.iter().enumerate() {
        sqlx::query(
            "INSERT INTO order_items (order_id, product_id, line_no, quantity, unit_price_minor) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(order.id.as_uuid())
        .bind(line.product_id.as_uuid())
        .bind(line_no as i64)
        .bind(i64::from(line.quantity.get()))
        .bind(line.unit_price.minor())
        .execute(&mut **tx)
        .await?;
    }
    sqlx::query(
        "INSERT INTO order_events (id, order_id, kind, status, detail, correlation_id, created_at) \
         VALUES (?, ?, 'order_placed', ?, NULL, ?, ?)",
    )
    .bind(Uuid::now_v7())
    .bind(order.id.as_uuid())
    .bind(order.status.as_str())
    .bind(&request.correlation_id)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO events (id, subject, order_id, event_type, sequence, data, correlation_id, created_at) \
         VALUES (?, ?, ?, 'order.placed', 1, ?, ?, ?)",
    )
    .bind(Uuid::now_v7())
    .bind(order_subject(order.id))
    .bind(order.id.as_uuid())
    .bind(placed_data(order))
    .bind(&request.correlation_id)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    let job = &request.first_job;
    sqlx::query(
        "INSERT INTO jobs (id, kind, order_id, payload, state, attempts, max_attempts, run_at, \
         ready_since, correlation_id, created_at, updated_at) VALUES (?, ?, ?, ?, 'ready', 0, ?, ?, ?, ?, ?, ?)",
    )
    .bind(Uuid::now_v7())
    .bind(job.kind)
    .bind(order.id.as_uuid())
    .bind(job.payload.to_string())
    .bind(i64::from(job.max_attempts))
    .bind(job.run_at)
    .bind(job.run_at)
    .bind(&request.correlation_id)
    .bind(now)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO idempotency_keys (principal, key, fingerprint, state, order_id, \
         response_status, response_body, created_at, updated_at) \
         VALUES (?, ?, ?, 'completed', ?, 202, ?, ?, ?)",
    )
    .bind(&request.principal)
    .bind(&request.idempotency_key)
    .bind(&request.fingerprint)
    .bind(order.id.as_uuid())
    .bind(rows::encode_snapshot(order))
    .bind(now)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

super::sandbox::impl_sandbox_books!(SqliteStore, writer, reader);

#[cfg(test)]
mod tests {
    use super::*;

    async fn writer_synchronous(store: &SqliteStore) -> i64 {
        let mut connection = store.writer.acquire().await.unwrap();
        let (level,): (i64,) = sqlx::query_as("PRAGMA synchronous")
            .fetch_one(&mut *connection)
            .await
            .unwrap();
        level
    }

    /// An unsynced write leaves the writer fsyncing commits again, whether it succeeded or failed.
    #[tokio::test]
    async fn unsynced_writes_restore_full_durability() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("orderflow.db"), &ConnectOptions::default())
            .await
            .unwrap();
        const FULL: i64 = 2;
        assert_eq!(writer_synchronous(&store).await, FULL);
        let level: i64 = store
            .write_unsynced(|tx| {
                Box::pin(async move {
                    let (level,): (i64,) = sqlx::query_as("PRAGMA synchronous").fetch_one(&mut **tx).await?;
                    Ok(level)
                })
            })
            .await
            .unwrap();
        assert_eq!(level, 1, "NORMAL inside the unsynced write");
        assert_eq!(writer_synchronous(&store).await, FULL);
        let failed = store
            .write_unsynced(|tx| {
                Box::pin(async move { sqlx::query("SELECT * FROM no_such_table").execute(&mut **tx).await })
            })
            .await;
        assert!(failed.is_err());
        assert_eq!(writer_synchronous(&store).await, FULL);
    }
}
