//! Which database errors mean "the database is not there right now" rather than "this request
//! went wrong".
//!
//! A restart, a failover or a cut connection is an everyday event: every request it interrupts
//! must answer 503 with `Retry-After` (the client retries, a checkout with the same
//! Idempotency-Key), never 500, and a worker must put its job back without spending an attempt.
//! sqlx reports an outage in several shapes: an I/O or TLS error on the socket, a protocol error
//! when a connection breaks mid-message, an error the server sends on its way down (SQLSTATE
//! 57P01 "terminating connection due to administrator command", 57P02, 57P05), a connection
//! exception (class 08), a refusal to connect while it starts or stops (57P03) or for lack of
//! resources (class 53), and from the pool, no connection within the acquire timeout. On SQLite
//! the equivalents are I/O errors of the file layer, a file that cannot be opened and a lock held
//! past `busy_timeout`.
//!
//! Two questions are told apart: [`is_unavailable`] (answer 503, retry later) and
//! [`connection_lost`] (the connection itself broke: a transaction that had not reached COMMIT
//! wrote nothing and may be run again at once on a fresh connection, whereas a wait for the pool
//! that already timed out is not worth repeating).
//!
//! A third, [`write_refusal`], names the outages that stop writes only: a full disk (SQLite
//! `SQLITE_FULL`, PostgreSQL 53100 `disk_full`) or a database that became read-only (SQLite
//! `SQLITE_READONLY` and its extended codes, PostgreSQL 25006 `read_only_sql_transaction`, as on
//! a standby after a failover went the wrong way). Reads still work, nothing was written (SQLite
//! rolls the statement or the transaction back), and the condition lasts until an operator frees
//! space or makes the file system writable — so the client and the operator are told which it
//! is (`storage_full`, `database_read_only`) rather than a generic 503, and workers wait for it
//! without spending attempts, exactly as for any outage.

use sqlx::error::DatabaseError;

/// SQLite primary result codes (the low byte of an extended code).
const SQLITE_BUSY: i32 = 5;
const SQLITE_READONLY: i32 = 8;
const SQLITE_IOERR: i32 = 10;
const SQLITE_FULL: i32 = 13;
const SQLITE_CANTOPEN: i32 = 14;

/// Why the database takes no writes now, though it still answers reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteRefusal {
    /// The disk (or the file system holding the database) is full.
    StorageFull,
    /// The database or its file system is read-only.
    ReadOnly,
}

impl std::fmt::Display for WriteRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WriteRefusal::StorageFull => "storage full",
            WriteRefusal::ReadOnly => "read-only",
        })
    }
}

/// The database refused a write for lack of space or because it is read-only.
pub(super) fn write_refusal(error: &sqlx::Error) -> Option<WriteRefusal> {
    let sqlx::Error::Database(db) = error else {
        return None;
    };
    match code_of(db.as_ref()) {
        Code::Postgres(sqlstate) => sqlstate_write_refusal(sqlstate),
        Code::Sqlite(code) => sqlite_write_refusal(code),
        Code::Other => None,
    }
}

/// The database cannot serve this request now; the same request later may well succeed.
pub(super) fn is_unavailable(error: &sqlx::Error) -> bool {
    if write_refusal(error).is_some() {
        return true;
    }
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => match code_of(db.as_ref()) {
            Code::Postgres(sqlstate) => sqlstate_unavailable(sqlstate),
            Code::Sqlite(code) => sqlite_unavailable(code),
            Code::Other => false,
        },
        other => connection_lost(other),
    }
}

/// The connection broke under the statement: whatever had not been committed was rolled back,
/// and a fresh connection may work at once.
pub(super) fn connection_lost(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => match code_of(db.as_ref()) {
            Code::Postgres(sqlstate) => sqlstate_connection_lost(sqlstate),
            Code::Sqlite(code) => matches!(code & 0xff, SQLITE_IOERR | SQLITE_CANTOPEN),
            Code::Other => false,
        },
        _ => false,
    }
}

enum Code<'a> {
    Postgres(&'a str),
    Sqlite(i32),
    Other,
}

fn code_of(db: &dyn DatabaseError) -> Code<'_> {
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        Code::Postgres(pg.code())
    } else if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // SQLite's code is the extended result code as a number.
        db.code()
            .and_then(|code| code.parse().ok())
            .map_or(Code::Other, Code::Sqlite)
    } else {
        Code::Other
    }
}

/// The server closed or broke this connection: class 08 (connection exception), 57P01
/// (admin shutdown), 57P02 (crash shutdown), 57P05 (idle session timeout).
fn sqlstate_connection_lost(sqlstate: &str) -> bool {
    sqlstate.starts_with("08") || matches!(sqlstate, "57P01" | "57P02" | "57P05")
}

/// Besides a lost connection: 57P03 (cannot connect now: starting up or shutting down) and
/// class 53 (insufficient resources: too many connections, disk full, out of memory).
fn sqlstate_unavailable(sqlstate: &str) -> bool {
    sqlstate_connection_lost(sqlstate) || sqlstate == "57P03" || sqlstate.starts_with("53")
}

/// 53100 `disk_full`, 25006 `read_only_sql_transaction`.
fn sqlstate_write_refusal(sqlstate: &str) -> Option<WriteRefusal> {
    match sqlstate {
        "53100" => Some(WriteRefusal::StorageFull),
        "25006" => Some(WriteRefusal::ReadOnly),
        _ => None,
    }
}

/// I/O errors of the file layer, a file that cannot be opened, a lock held past `busy_timeout`.
fn sqlite_unavailable(code: i32) -> bool {
    matches!(code & 0xff, SQLITE_BUSY | SQLITE_IOERR | SQLITE_CANTOPEN)
}

/// `SQLITE_FULL`; `SQLITE_READONLY` with its extended codes (`_RECOVERY`, `_CANTLOCK`,
/// `_ROLLBACK`, `_DBMOVED`, `_CANTINIT`, `_DIRECTORY`).
fn sqlite_write_refusal(code: i32) -> Option<WriteRefusal> {
    match code & 0xff {
        SQLITE_FULL => Some(WriteRefusal::StorageFull),
        SQLITE_READONLY => Some(WriteRefusal::ReadOnly),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_connections_and_shutdowns_are_unavailable() {
        for sqlstate in [
            "57P01", "57P02", "57P05", "08000", "08003", "08006", "08001", "08004", "08P01",
        ] {
            assert!(sqlstate_connection_lost(sqlstate), "{sqlstate} is a lost connection");
            assert!(sqlstate_unavailable(sqlstate), "{sqlstate} is unavailable");
        }
        for sqlstate in ["57P03", "53300", "53100", "53200"] {
            assert!(sqlstate_unavailable(sqlstate), "{sqlstate} is unavailable");
            assert!(!sqlstate_connection_lost(sqlstate), "{sqlstate} is no lost connection");
        }
    }

    #[test]
    fn request_errors_stay_errors() {
        // Unique and foreign-key violations, serialization failure, deadlock, syntax error,
        // query cancelled, database dropped.
        for sqlstate in ["23505", "23503", "40001", "40P01", "42601", "57014", "57P04", "XX000"] {
            assert!(!sqlstate_unavailable(sqlstate), "{sqlstate} is not an outage");
        }
    }

    #[test]
    fn sqlite_file_layer_failures_are_unavailable() {
        // SQLITE_IOERR, SQLITE_IOERR_WRITE (778), SQLITE_IOERR_FSYNC (1034), SQLITE_CANTOPEN,
        // SQLITE_BUSY.
        for code in [10, 778, 1034, 14, 5] {
            assert!(sqlite_unavailable(code), "SQLite code {code}");
        }
        // SQLITE_CONSTRAINT_UNIQUE (2067), SQLITE_CONSTRAINT_FOREIGNKEY (787), SQLITE_ERROR.
        for code in [2067, 787, 1] {
            assert!(!sqlite_unavailable(code), "SQLite code {code}");
        }
    }

    #[test]
    fn a_full_disk_and_a_read_only_database_refuse_writes() {
        // SQLITE_FULL; SQLITE_READONLY, _RECOVERY (264), _CANTLOCK (520), _ROLLBACK (776),
        // _DBMOVED (1032), _CANTINIT (1288), _DIRECTORY (1544).
        assert_eq!(sqlite_write_refusal(13), Some(WriteRefusal::StorageFull));
        for code in [8, 264, 520, 776, 1032, 1288, 1544] {
            assert_eq!(
                sqlite_write_refusal(code),
                Some(WriteRefusal::ReadOnly),
                "SQLite code {code}"
            );
        }
        // Busy, I/O errors (778: SQLITE_IOERR_WRITE), constraints: other answers.
        for code in [5, 10, 778, 14, 2067, 787, 1] {
            assert_eq!(sqlite_write_refusal(code), None, "SQLite code {code}");
        }
        assert_eq!(sqlstate_write_refusal("53100"), Some(WriteRefusal::StorageFull));
        assert_eq!(sqlstate_write_refusal("25006"), Some(WriteRefusal::ReadOnly));
        for sqlstate in ["53200", "53300", "57P01", "23505", "40001"] {
            assert_eq!(sqlstate_write_refusal(sqlstate), None, "{sqlstate}");
        }
    }

    #[test]
    fn socket_and_pool_failures() {
        let reset = || sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(connection_lost(&reset()) && is_unavailable(&reset()));
        let broken = || sqlx::Error::Protocol("expected ReadyForQuery".into());
        assert!(connection_lost(&broken()) && is_unavailable(&broken()));
        // A wait for the pool that timed out is an outage, but not worth repeating at once.
        assert!(is_unavailable(&sqlx::Error::PoolTimedOut) && !connection_lost(&sqlx::Error::PoolTimedOut));
        assert!(is_unavailable(&sqlx::Error::PoolClosed));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
        assert!(!is_unavailable(&sqlx::Error::Decode("bad row".into())));
        assert!(matches!(
            super::super::StoreError::from(reset()),
            super::super::StoreError::Unavailable(_)
        ));
    }
}
