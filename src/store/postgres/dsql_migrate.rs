//! The migrator of the distributed-SQL profile: `migrations/dsql`, applied without an advisory
//! lock.
//!
//! sqlx's PostgreSQL migrator serializes processes with `pg_advisory_lock` and runs each file in
//! one transaction; Aurora DSQL has no advisory locks and takes one DDL statement per transaction.
//! Here each version is claimed in our own table, `_orderflow_migrations`, by a conditional insert
//! (`ON CONFLICT DO NOTHING`): the process whose insert landed runs the file, one statement per
//! transaction, refreshing its claim's heartbeat after each, then marks the version applied. The
//! others wait for that (polling the row), and take a claim over whose heartbeat went stale (its
//! process died mid-file) with a conditional update naming the old claimer. The statements are
//! written to be run twice (`IF NOT EXISTS`, `ON CONFLICT DO NOTHING`), so a file cut short and
//! taken over is simply run again from its start. An applied file whose text changed since is
//! refused, like sqlx's checksum check.
//!
//! `CREATE INDEX ASYNC` is DSQL's: the index is built by a background job whose id the statement
//! returns, waited for with `sys.wait_for_job` so the next version sees it. A PostgreSQL server
//! (the test suite's emulation of the profile) rejects the keyword as a syntax error: then the
//! statement runs without it, a plain `CREATE INDEX` on an empty table.

use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::store::retry;

/// A claim whose heartbeat is older than this belongs to a process that died mid-file.
const CLAIM_STALE_AFTER: Duration = Duration::from_secs(30);

/// How often a waiting process looks at another's claim.
const WAIT_POLL: Duration = Duration::from_millis(100);

/// The files of `migrations/dsql`, embedded at build time.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/dsql");

/// Applies every `migrations/dsql` version not applied yet; safe when several processes start at
/// once.
pub(super) async fn run(pool: &PgPool) -> anyhow::Result<()> {
    create_table(pool).await?;
    let me = Uuid::now_v7();
    let mut without_async = false;
    for migration in MIGRATOR.iter() {
        let checksum = hex(&migration.checksum);
        loop {
            let row: Option<(Uuid, bool, Option<bool>, String)> = sqlx::query_as(
                "SELECT claimed_by, applied_at IS NOT NULL, heartbeat_at < now() - make_interval(secs => $2), checksum \
                 FROM _orderflow_migrations WHERE version = $1",
            )
            .bind(migration.version)
            .bind(CLAIM_STALE_AFTER.as_secs_f64())
            .fetch_optional(pool)
            .await?;
            let claimed = match row {
                Some((_, true, _, applied)) if applied != checksum => bail!(
                    "migration {} ({}) was applied with different text: migrations/dsql must not change once applied",
                    migration.version,
                    migration.description
                ),
                Some((_, true, _, _)) => break,
                Some((other, false, Some(true), _)) => {
                    let taken = retry_conflicts(|| {
                        sqlx::query(
                            "UPDATE _orderflow_migrations SET claimed_by = $2, heartbeat_at = now() \
                             WHERE version = $1 AND claimed_by = $3 AND applied_at IS NULL",
                        )
                        .bind(migration.version)
                        .bind(me)
                        .bind(other)
                        .execute(pool)
                    })
                    .await?;
                    if taken.rows_affected() == 1 {
                        tracing::warn!(
                            version = migration.version,
                            "took over a migration whose process stopped"
                        );
                    }
                    taken.rows_affected() == 1
                }
                Some(_) => false,
                None => {
                    let inserted = retry_conflicts(|| {
                        sqlx::query(
                            "INSERT INTO _orderflow_migrations (version, description, checksum, claimed_by, heartbeat_at) \
                             VALUES ($1, $2, $3, $4, now()) ON CONFLICT (version) DO NOTHING",
                        )
                        .bind(migration.version)
                        .bind(migration.description.as_ref())
                        .bind(&checksum)
                        .bind(me)
                        .execute(pool)
                    })
                    .await?;
                    inserted.rows_affected() == 1
                }
            };
            if !claimed {
                tokio::time::sleep(WAIT_POLL).await;
                continue;
            }
            if apply(pool, migration, me, &mut without_async).await? {
                break;
            }
        }
    }
    Ok(())
}

/// Runs one file, a statement per transaction, and marks it applied. False when another process
/// took the claim over meanwhile (this one was too slow): the caller waits for that one.
async fn apply(
    pool: &PgPool,
    migration: &sqlx::migrate::Migration,
    me: Uuid,
    without_async: &mut bool,
) -> anyhow::Result<bool> {
    for statement in statements(&migration.sql) {
        run_statement(pool, &statement, without_async).await.with_context(|| {
            format!(
                "migration {} ({}): {statement}",
                migration.version, migration.description
            )
        })?;
        let still_mine = retry_conflicts(|| {
            sqlx::query(
                "UPDATE _orderflow_migrations SET heartbeat_at = now() WHERE version = $1 AND claimed_by = $2 \
                 AND applied_at IS NULL",
            )
            .bind(migration.version)
            .bind(me)
            .execute(pool)
        })
        .await?;
        if still_mine.rows_affected() == 0 {
            return Ok(false);
        }
    }
    let applied = retry_conflicts(|| {
        sqlx::query(
            "UPDATE _orderflow_migrations SET applied_at = now() WHERE version = $1 AND claimed_by = $2 \
             AND applied_at IS NULL",
        )
        .bind(migration.version)
        .bind(me)
        .execute(pool)
    })
    .await?;
    Ok(applied.rows_affected() == 1)
}

/// One statement in a transaction of its own; an index built asynchronously is waited for.
async fn run_statement(pool: &PgPool, statement: &str, without_async: &mut bool) -> anyhow::Result<()> {
    let is_async_index = statement.contains(" INDEX ASYNC ");
    let plain = statement.replacen(" INDEX ASYNC ", " INDEX ", 1);
    if is_async_index && !*without_async {
        match retry_conflicts(|| sqlx::query(statement).fetch_optional(pool)).await {
            Ok(Some(row)) => {
                if let Ok(job) = row.try_get::<String, _>("job_id") {
                    retry_conflicts(|| sqlx::query("CALL sys.wait_for_job($1)").bind(&job).execute(pool)).await?;
                }
                return Ok(());
            }
            Ok(None) => return Ok(()),
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42601") => {
                tracing::info!("the database has no CREATE INDEX ASYNC (plain PostgreSQL): building indexes at once");
                *without_async = true;
            }
            Err(error) => return Err(error.into()),
        }
    }
    let sql = if is_async_index { plain.as_str() } else { statement };
    retry_conflicts(|| sqlx::query(sql).execute(pool)).await?;
    Ok(())
}

/// The claims table, created by whichever process gets there first (two at once may race on the
/// catalog: the loser finds it there).
async fn create_table(pool: &PgPool) -> anyhow::Result<()> {
    let mut backoff = retry::Backoff::new();
    loop {
        let created = sqlx::query(
            "CREATE TABLE IF NOT EXISTS _orderflow_migrations (version bigint PRIMARY KEY, \
             description text NOT NULL, checksum text NOT NULL, claimed_by uuid NOT NULL, \
             heartbeat_at timestamptz NOT NULL, applied_at timestamptz)",
        )
        .execute(pool)
        .await;
        match created {
            Ok(_) => return Ok(()),
            // 23505/42P07/42710 (the table's row type): a concurrent CREATE won the catalog race;
            // 40001 (OC001): a schema change conflict. Looked at again.
            Err(sqlx::Error::Database(db))
                if matches!(
                    db.code().as_deref(),
                    Some("23505") | Some("42P07") | Some("42710") | Some("40001")
                ) && backoff.wait().await => {}
            Err(error) => return Err(error).context("creating _orderflow_migrations"),
        }
    }
}

/// Runs a one-statement transaction again while it loses races (SQLSTATE 40001: OC000/OC001).
async fn retry_conflicts<T, F, Fut>(mut attempt: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut backoff = retry::Backoff::new();
    loop {
        match attempt().await {
            Err(error) if retry::is_conflict(&error) && backoff.wait().await => {}
            other => return other,
        }
    }
}

/// The statements of a migration file: split at `;` outside comments and quotes, comments kept
/// out, empty ones dropped. (`CREATE INDEX ASYNC` is written with single spaces in the files.)
fn statements(sql: &str) -> Vec<String> {
    let (mut statements, mut current) = (Vec::new(), String::new());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '-' if chars.peek() == Some(&'-') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        current.push('\n');
                        break;
                    }
                }
            }
            '\'' | '"' => {
                current.push(c);
                for inner in chars.by_ref() {
                    current.push(inner);
                    if inner == c {
                        break;
                    }
                }
            }
            ';' => statements.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    statements.push(current);
    statements
        .into_iter()
        .map(|statement| statement.trim().to_string())
        .filter(|statement| !statement.is_empty())
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_split_into_statements() {
        let sql = "-- a comment; with a semicolon\nCREATE TABLE t (a text DEFAULT 'x;y'); -- trailing\n\n\
                   CREATE INDEX ASYNC IF NOT EXISTS t_a\n    ON t (a);\n-- only a comment\n";
        assert_eq!(
            statements(sql),
            [
                "CREATE TABLE t (a text DEFAULT 'x;y')",
                "CREATE INDEX ASYNC IF NOT EXISTS t_a\n    ON t (a)"
            ]
        );
        assert!(statements("-- nothing at this version\n").is_empty());
    }

    #[test]
    fn every_dsql_file_is_a_postgres_version() {
        let versions: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
        assert_eq!(versions[..12], (1..=12).collect::<Vec<i64>>()[..]);
    }
}
