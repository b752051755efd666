//! A transaction's writes collected and sent together.
//!
//! A step's completion writes to half a dozen tables (the order, its stock, the ledger, the
//! payment, the timeline, the outbox, the next jobs). Sent one statement at a time that is a
//! dozen round trips, each paid by the database's CPU and, from a remote region, by the WAN. Here
//! the writes are described first and sent at the end: on PostgreSQL as ONE statement of
//! data-modifying CTEs (one round trip however many tables), on SQLite — embedded, no round
//! trips, and without data-modifying CTEs — one statement each, in order.
//!
//! The writes of one batch run against the same snapshot and cannot see each other, so a batch
//! must never write one row twice (the order row is updated once, with every column that
//! changes; stock once per product) nor read what another write of the batch writes: a read
//! that depends on earlier writes sends them first ([`Writes::send`] empties the batch).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::StoreResult;

/// A bound value of a write.
#[derive(Clone, Debug)]
pub(super) enum Value {
    Uuid(Uuid),
    OptUuid(Option<Uuid>),
    Text(String),
    OptText(Option<String>),
    Int(i64),
    Int4(i32),
    Time(DateTime<Utc>),
}

impl From<Uuid> for Value {
    fn from(value: Uuid) -> Self {
        Value::Uuid(value)
    }
}
impl From<Option<Uuid>> for Value {
    fn from(value: Option<Uuid>) -> Self {
        Value::OptUuid(value)
    }
}
impl From<String> for Value {
    fn from(value: String) -> Self {
        Value::Text(value)
    }
}
impl From<&str> for Value {
    fn from(value: &str) -> Self {
        Value::Text(value.to_string())
    }
}
impl From<Option<String>> for Value {
    fn from(value: Option<String>) -> Self {
        Value::OptText(value)
    }
}
impl From<i64> for Value {
    fn from(value: i64) -> Self {
        Value::Int(value)
    }
}
impl From<i32> for Value {
    fn from(value: i32) -> Self {
        Value::Int4(value)
    }
}
impl From<DateTime<Utc>> for Value {
    fn from(value: DateTime<Utc>) -> Self {
        Value::Time(value)
    }
}

enum Piece {
    Sql(String),
    Bind(Value),
}

/// One INSERT or UPDATE (no RETURNING), as SQL text with its values in place.
#[derive(Default)]
pub(super) struct Write {
    pieces: Vec<Piece>,
}

impl Write {
    pub fn new(sql: impl Into<String>) -> Self {
        Self {
            pieces: vec![Piece::Sql(sql.into())],
        }
    }

    /// Appends SQL text.
    pub fn sql(&mut self, sql: impl Into<String>) -> &mut Self {
        self.pieces.push(Piece::Sql(sql.into()));
        self
    }

    /// Appends a placeholder bound to `value`.
    pub fn bind(&mut self, value: impl Into<Value>) -> &mut Self {
        self.pieces.push(Piece::Bind(value.into()));
        self
    }

    /// Appends `(v1, v2, …)`: one row of a VALUES list.
    pub fn row(&mut self, values: impl IntoIterator<Item = Value>) -> &mut Self {
        self.sql("(");
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                self.sql(", ");
            }
            self.bind(value);
        }
        self.sql(")")
    }

    /// Appends this write's SQL to `sql`, numbering its placeholders after those already in
    /// `values` (`$1`…, which SQLite reads as positional too), and its values to `values`.
    fn render_into(self, sql: &mut String, values: &mut Vec<Value>) {
        for piece in self.pieces {
            match piece {
                Piece::Sql(text) => sql.push_str(&text),
                Piece::Bind(value) => {
                    values.push(value);
                    sql.push('$');
                    sql.push_str(&values.len().to_string());
                }
            }
        }
    }
}

/// Writes waiting to be sent, in the order they were described.
#[derive(Default)]
pub(super) struct Writes {
    pending: Vec<Write>,
}

impl Writes {
    pub fn push(&mut self, write: Write) {
        self.pending.push(write);
    }

    /// Sends every pending write in `tx` (PostgreSQL: one statement; SQLite: one each) and
    /// empties the batch.
    pub async fn send<DB>(&mut self, tx: &mut sqlx::Transaction<'_, DB>) -> StoreResult<()>
    where
        DB: sqlx::Database,
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
        for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
        for<'q> Uuid: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> Option<Uuid>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> Option<String>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> i32: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        for<'q> DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    {
        let pending = std::mem::take(&mut self.pending);
        if pending.is_empty() {
            return Ok(());
        }
        // The one dialect difference: only PostgreSQL has data-modifying CTEs.
        let statements: Vec<Vec<Write>> = if DB::NAME == "PostgreSQL" {
            vec![pending]
        } else {
            pending.into_iter().map(|write| vec![write]).collect()
        };
        for writes in statements {
            let (mut sql, mut values) = (String::new(), Vec::new());
            let last = writes.len() - 1;
            for (i, write) in writes.into_iter().enumerate() {
                if i < last {
                    sql.push_str(if i == 0 { "WITH " } else { ", " });
                    sql.push_str(&format!("w{i} AS ("));
                    write.render_into(&mut sql, &mut values);
                    sql.push_str(") ");
                } else {
                    write.render_into(&mut sql, &mut values);
                }
            }
            let mut query = sqlx::query::<DB>(&sql);
            for value in values {
                query = match value {
                    Value::Uuid(v) => query.bind(v),
                    Value::OptUuid(v) => query.bind(v),
                    Value::Text(v) => query.bind(v),
                    Value::OptText(v) => query.bind(v),
                    Value::Int(v) => query.bind(v),
                    Value::Int4(v) => query.bind(v),
                    Value::Time(v) => query.bind(v),
                };
            }
            query.execute(&mut **tx).await?;
        }
        Ok(())
    }
}
