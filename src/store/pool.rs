//! The connection pool the store runs its SQL on: sqlx's pool, plus what a transaction pooler in
//! front of PostgreSQL (PgBouncer in `pool_mode = transaction`, `--database-pooler transaction`)
//! needs of every statement.
//!
//! A transaction pooler lends a client a server connection until the server reports it idle
//! (`ReadyForQuery` 'I'), which happens at every `Sync` outside a transaction. sqlx 0.8 sends a
//! statement with parameters in two exchanges, each ending with a `Sync` (`Parse` + `Describe`,
//! then `Bind` + `Execute`), so an autocommitted statement's halves may reach two servers: its
//! `Bind` then runs whatever unnamed statement another client prepared there
//! (`bench/pgbouncer-unnamed-probe.py`). Behind such a pooler, [`DbPool`] therefore
//!
//! - runs every statement given to it directly (`.fetch_one(&pool)`) in a transaction of its own
//!   (BEGIN, the statement, COMMIT: the server stays pinned from BEGIN to COMMIT), as the unnamed
//!   statement ([`Unnamed`]), so nothing is left behind on the server;
//! - starts every transaction with `DEALLOCATE ALL` in the same simple query as its `BEGIN`
//!   ([`DbPool::begin_with`]): with the statement cache off (which pooler mode sets), sqlx 0.8
//!   still names each statement (`sqlx_s_1`, `sqlx_s_2`, … counted per client connection) and
//!   never closes it, so without this a server would keep one client's `sqlx_s_1` and refuse
//!   another client's with "prepared statement already exists". Within one transaction the
//!   server is ours, so our names are unique there.
//!
//! Without a pooler it is a plain pass-through to sqlx's pool: no extra statement, no extra
//! allocation beyond what sqlx's own `&Pool` executor does.

use std::borrow::Cow;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use sqlx::pool::PoolConnection;
use sqlx::{Database, Describe, Either, Error, Execute, Executor, Postgres, Transaction};

/// Sent with a transaction's BEGIN behind a transaction pooler: the server connection we were
/// lent may hold the named statements of another client's transactions.
const FORGET_STATEMENTS: &str = "DEALLOCATE ALL; ";

/// sqlx's pool, knowing whether a transaction pooler stands between it and the database.
pub struct DbPool<DB: Database> {
    pool: sqlx::Pool<DB>,
    /// Behind a transaction pooler: statements given directly run in transactions of their
    /// own, and transactions begin by forgetting the server's named statements.
    transaction_pooler: bool,
}

impl<DB: Database> Clone for DbPool<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            transaction_pooler: self.transaction_pooler,
        }
    }
}

impl<DB: Database> std::fmt::Debug for DbPool<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbPool")
            .field("transaction_pooler", &self.transaction_pooler)
            .finish_non_exhaustive()
    }
}

impl<DB: Database> From<sqlx::Pool<DB>> for DbPool<DB> {
    /// A pool connected straight to its database.
    fn from(pool: sqlx::Pool<DB>) -> Self {
        Self {
            pool,
            transaction_pooler: false,
        }
    }
}

impl DbPool<Postgres> {
    /// A pool whose connections reach PostgreSQL through a transaction pooler when
    /// `transaction_pooler` is set (its connections must not cache statements).
    pub fn postgres(pool: sqlx::PgPool, transaction_pooler: bool) -> Self {
        Self {
            pool,
            transaction_pooler,
        }
    }
}

impl<DB: Database> DbPool<DB> {
    /// Whether a transaction pooler stands in front of the database.
    pub fn behind_transaction_pooler(&self) -> bool {
        self.transaction_pooler
    }

    /// sqlx's pool itself, for its statistics. Statements run on it directly bypass what a
    /// transaction pooler needs: run them on the [`DbPool`].
    pub fn sqlx(&self) -> &sqlx::Pool<DB> {
        &self.pool
    }

    /// A transaction begun with the database's default `BEGIN`.
    pub async fn begin(&self) -> Result<Transaction<'static, DB>, Error> {
        if self.transaction_pooler {
            self.pool.begin_with(format!("{FORGET_STATEMENTS}BEGIN")).await
        } else {
            self.pool.begin().await
        }
    }

    /// A transaction begun with `statement` (`BEGIN IMMEDIATE`, `BEGIN ISOLATION LEVEL …`).
    pub async fn begin_with(&self, statement: impl Into<Cow<'static, str>>) -> Result<Transaction<'static, DB>, Error> {
        let statement = statement.into();
        if self.transaction_pooler {
            self.pool.begin_with(format!("{FORGET_STATEMENTS}{statement}")).await
        } else {
            self.pool.begin_with(statement).await
        }
    }

    /// A transaction on a connection the caller holds (checked out with [`Self::acquire`]).
    pub async fn begin_on<'c>(&self, connection: &'c mut PoolConnection<DB>) -> Result<Transaction<'c, DB>, Error> {
        if self.transaction_pooler {
            sqlx::Connection::begin_with(&mut **connection, format!("{FORGET_STATEMENTS}BEGIN")).await
        } else {
            sqlx::Connection::begin(&mut **connection).await
        }
    }

    /// A connection of the pool. Behind a transaction pooler, statements run on it must be
    /// inside a transaction begun with [`Self::begin_on`].
    pub async fn acquire(&self) -> Result<PoolConnection<DB>, Error> {
        self.pool.acquire().await
    }

    pub fn is_closed(&self) -> bool {
        self.pool.is_closed()
    }

    pub fn options(&self) -> &sqlx::pool::PoolOptions<DB> {
        self.pool.options()
    }
}

/// A statement sent as the unnamed statement (`persistent(false)`), whatever its builder said.
struct Unnamed<E>(E);

impl<'q, DB: Database, E: Execute<'q, DB>> Execute<'q, DB> for Unnamed<E> {
    fn sql(&self) -> &'q str {
        self.0.sql()
    }

    fn statement(&self) -> Option<&DB::Statement<'q>> {
        self.0.statement()
    }

    fn take_arguments(&mut self) -> Result<Option<DB::Arguments<'q>>, sqlx::error::BoxDynError> {
        self.0.take_arguments()
    }

    fn persistent(&self) -> bool {
        false
    }
}

/// Modelled on sqlx's `impl Executor for &Pool` (sqlx-core `pool/executor.rs`): a statement
/// takes a connection for itself. Behind a transaction pooler it also takes a transaction for
/// itself, and its rows are collected before COMMIT (every caller collects them anyway).
impl<'p, DB: Database> Executor<'p> for &'_ DbPool<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    type Database = DB;

    fn fetch_many<'e, 'q: 'e, E>(self, query: E) -> BoxStream<'e, Result<Either<DB::QueryResult, DB::Row>, Error>>
    where
        E: 'q + Execute<'q, DB>,
    {
        if !self.transaction_pooler {
            return self.pool.fetch_many(query);
        }
        let pool = self.pool.clone();
        let results = async move {
            let mut tx = pool.begin().await?;
            let results: Vec<_> = tx.fetch_many(Unnamed(query)).try_collect().await?;
            tx.commit().await?;
            Ok::<_, Error>(results)
        };
        futures_util::stream::once(results)
            .map(|results| {
                let items: Vec<Result<_, Error>> = match results {
                    Ok(results) => results.into_iter().map(Ok).collect(),
                    Err(error) => vec![Err(error)],
                };
                futures_util::stream::iter(items)
            })
            .flatten()
            .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<Option<DB::Row>, Error>>
    where
        E: 'q + Execute<'q, DB>,
    {
        if !self.transaction_pooler {
            return self.pool.fetch_optional(query);
        }
        let pool = self.pool.clone();
        Box::pin(async move {
            let mut tx = pool.begin().await?;
            let row = tx.fetch_optional(Unnamed(query)).await?;
            tx.commit().await?;
            Ok(row)
        })
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [DB::TypeInfo],
    ) -> BoxFuture<'e, Result<DB::Statement<'q>, Error>> {
        // A prepared statement outlives its transaction, which a transaction pooler does not
        // allow; orderflow prepares none.
        self.pool.prepare_with(sql, parameters)
    }

    fn describe<'e, 'q: 'e>(self, sql: &'q str) -> BoxFuture<'e, Result<Describe<DB>, Error>> {
        self.pool.describe(sql)
    }
}
