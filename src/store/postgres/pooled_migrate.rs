//! `migrations/postgres` applied through a transaction pooler (`--database-pooler transaction`).
//!
//! sqlx's migrator holds a session-level `pg_advisory_lock` from the first migration to the last
//! and runs its bookkeeping statements outside a transaction; behind a transaction pooler the
//! session holding the lock is lent to other clients between transactions (and may never see
//! the unlock), and those statements' two exchanges may reach two servers. Here every version is
//! applied in one transaction of its own that first takes the same lock transaction-scoped
//! (`pg_advisory_xact_lock`, released by COMMIT or ROLLBACK whichever server runs it), then —
//! serialized with every other migrator, pooled or not, since both lock sqlx's key — looks the
//! version up, runs the file and records it. The bookkeeping is sqlx's own `_sqlx_migrations`
//! table, with its checksums, so a database migrated either way is the same to the other.

use anyhow::{Context, bail};
use sqlx::migrate::Migrator;
use sqlx::{Executor, Postgres};

use crate::store::DbPool;

/// The files of `migrations/postgres`, embedded at build time.
static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// sqlx's table, as `sqlx-postgres` 0.8 creates it.
const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS _sqlx_migrations ( \
    version BIGINT PRIMARY KEY, \
    description TEXT NOT NULL, \
    installed_on TIMESTAMPTZ NOT NULL DEFAULT now(), \
    success BOOLEAN NOT NULL, \
    checksum BYTEA NOT NULL, \
    execution_time BIGINT NOT NULL)";

/// Applies every version not applied yet; safe when several processes start at once.
pub(super) async fn run(pool: &DbPool<Postgres>) -> anyhow::Result<()> {
    let (database,): (String,) = sqlx::query_as("SELECT current_database()").fetch_one(pool).await?;
    let lock = lock_id(&database);
    let mut known = Vec::new();
    for migration in MIGRATOR.iter().filter(|m| !m.migration_type.is_down_migration()) {
        known.push(migration.version);
        if migration.no_tx {
            bail!(
                "migration {} ({}) must run outside a transaction, which a transaction pooler cannot do: \
                 run `orderflow migrate` once with a direct database URL",
                migration.version,
                migration.description
            );
        }
        let started = std::time::Instant::now();
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(lock)
            .execute(&mut *tx)
            .await?;
        sqlx::query(CREATE_TABLE).execute(&mut *tx).await?;
        let applied: Option<(bool, Vec<u8>)> =
            sqlx::query_as("SELECT success, checksum FROM _sqlx_migrations WHERE version = $1")
                .bind(migration.version)
                .fetch_optional(&mut *tx)
                .await?;
        match applied {
            Some((false, _)) => bail!(
                "migration {} ({}) is partially applied (sqlx marked it failed); fix the database and delete its \
                 _sqlx_migrations row",
                migration.version,
                migration.description
            ),
            Some((true, checksum)) if checksum != *migration.checksum => bail!(
                "migration {} ({}) was applied with different text: migrations/postgres must not change once applied",
                migration.version,
                migration.description
            ),
            Some(_) => {
                tx.commit().await?;
                continue;
            }
            None => {}
        }
        // One simple query: the file may hold several statements.
        (&mut *tx)
            .execute(&*migration.sql)
            .await
            .with_context(|| format!("applying migration {} ({})", migration.version, migration.description))?;
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES ($1, $2, TRUE, $3, $4)",
        )
        .bind(migration.version)
        .bind(migration.description.as_ref())
        .bind(migration.checksum.as_ref())
        .bind(i64::try_from(started.elapsed().as_nanos()).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(version = migration.version, description = %migration.description, "applied migration");
    }
    // As sqlx refuses to: a database migrated by a newer orderflow.
    let applied: Vec<(i64,)> = sqlx::query_as("SELECT version FROM _sqlx_migrations ORDER BY version")
        .fetch_all(pool)
        .await?;
    if let Some((version,)) = applied.iter().find(|(version,)| !known.contains(version)) {
        bail!("migration {version} was applied but is missing from migrations/postgres (a newer orderflow's?)");
    }
    Ok(())
}

/// The advisory lock key sqlx's PostgreSQL migrator takes for `database` (`sqlx-postgres` 0.8,
/// `migrate.rs`, `generate_lock_id`), so pooled and direct migrators exclude one another.
fn lock_id(database: &str) -> i64 {
    0x3d32ad9e * i64::from(crc32fast::hash(database.as_bytes()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_lock_is_sqlx_s() {
        // sqlx-postgres 0.8.6 takes this key for a database named "postgres" (CRC-32/ISO-HDLC).
        assert_eq!(super::lock_id("postgres"), 0x3d32ad9e * 0x156a_8775_i64);
    }
}
