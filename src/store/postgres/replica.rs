//! The read replica (`--read-database-url`): a second pool, to a streaming standby, for the
//! reads that may be a little behind — order listings, the sales report, the audit — so they do
//! not compete with checkout on the primary. Checkout, steps and every read that feeds a write
//! decision never come here (they use the primary pool directly).
//!
//! The bypass rule (docs/scale-out.md "Read replica"): the replica serves a read only while its
//! last check found it reachable and its replay no more than `--read-replica-max-lag` behind the
//! primary; otherwise the primary serves it, and a read that fails on the replica is run again on
//! the primary. A background task checks about once a second: it samples the primary's WAL
//! position (`pg_current_wal_lsn()`) and the standby's replayed position
//! (`pg_last_wal_replay_lsn()`); the lag is the age of the oldest primary sample the standby has
//! not replayed yet — zero when it has replayed everything the primary had written, however long
//! ago that was, so an idle shop's replica is never "lagging". A server that is not in recovery
//! (the primary itself given as the replica) counts as caught up.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sqlx::Postgres;

use crate::store::{DbPool, ReplicaState, ReplicaStatus, StoreResult};

/// How often the replica's reachability and lag are checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);

pub(super) struct Replica {
    pool: DbPool<Postgres>,
    max_lag: Duration,
    health: Mutex<Health>,
    served_by_replica: AtomicU64,
    served_by_primary: AtomicU64,
    fallbacks: AtomicU64,
}

struct Health {
    state: ReplicaState,
    lag: Option<Duration>,
    /// Primary WAL positions not yet replayed by the standby, oldest first, with when each was
    /// seen.
    unreplayed: VecDeque<(Instant, u64)>,
}

impl Replica {
    /// The replica's pool (connected lazily: a standby that is down at start-up only means the
    /// primary serves everything until it answers) and its checker, which stops with the store.
    pub(super) fn start(pool: DbPool<Postgres>, primary: DbPool<Postgres>, max_lag: Duration) -> Arc<Self> {
        let replica = Arc::new(Replica {
            pool,
            max_lag,
            health: Mutex::new(Health {
                state: ReplicaState::Starting,
                lag: None,
                unreplayed: VecDeque::new(),
            }),
            served_by_replica: AtomicU64::new(0),
            served_by_primary: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        });
        tokio::spawn(check_periodically(Arc::downgrade(&replica), primary));
        replica
    }

    fn in_use(&self) -> bool {
        self.health.lock().expect("replica health").state == ReplicaState::InUse
    }

    /// Runs `read` on the replica when it is in use, else (or when it fails there) on `primary`.
    pub(super) async fn read<T, F, Fut>(&self, primary: &DbPool<Postgres>, read: F) -> StoreResult<T>
    where
        F: Fn(DbPool<Postgres>) -> Fut,
        Fut: Future<Output = StoreResult<T>>,
    {
        if self.in_use() {
            match read(self.pool.clone()).await {
                Ok(value) => {
                    self.served_by_replica.fetch_add(1, Ordering::Relaxed);
                    return Ok(value);
                }
                Err(error) => {
                    tracing::warn!(%error, "a read failed on the replica; the primary serves it");
                    self.fallbacks.fetch_add(1, Ordering::Relaxed);
                    // Until the next check says otherwise, the primary serves every read.
                    self.health.lock().expect("replica health").state = ReplicaState::Down;
                }
            }
        }
        self.served_by_primary.fetch_add(1, Ordering::Relaxed);
        read(primary.clone()).await
    }

    pub(super) fn status(&self) -> ReplicaStatus {
        let health = self.health.lock().expect("replica health");
        ReplicaStatus {
            state: health.state,
            lag_seconds: health.lag.map(|lag| lag.as_secs_f64()),
            max_lag_seconds: self.max_lag.as_secs_f64(),
            reads_served_by_replica: self.served_by_replica.load(Ordering::Relaxed),
            reads_served_by_primary: self.served_by_primary.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
        }
    }

    pub(super) fn pool(&self) -> &DbPool<Postgres> {
        &self.pool
    }

    /// One check: the primary's position, then what the standby replayed.
    async fn check(&self, primary: &DbPool<Postgres>) {
        let now = Instant::now();
        let primary_lsn: Result<(String,), sqlx::Error> = sqlx::query_as("SELECT pg_current_wal_lsn()::text")
            .fetch_one(primary)
            .await;
        let standby: Result<(bool, Option<String>), sqlx::Error> =
            sqlx::query_as("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text")
                .fetch_one(&self.pool)
                .await;
        let mut health = self.health.lock().expect("replica health");
        let (in_recovery, replayed) = match standby {
            Ok(answer) => answer,
            Err(error) => {
                if health.state != ReplicaState::Down {
                    tracing::warn!(%error, "the read replica does not answer; the primary serves its reads");
                }
                health.state = ReplicaState::Down;
                health.lag = None;
                return;
            }
        };
        // Without the primary's position the lag is unknown: keep the last verdict (reads that
        // fall back to an unreachable primary fail there anyway).
        let Ok((primary_lsn,)) = primary_lsn else { return };
        let Some(primary_lsn) = parse_lsn(&primary_lsn) else {
            return;
        };
        health.unreplayed.push_back((now, primary_lsn));
        let lag = match replayed.as_deref().map(parse_lsn) {
            Some(Some(replayed)) if in_recovery => {
                while health.unreplayed.front().is_some_and(|(_, lsn)| *lsn <= replayed) {
                    health.unreplayed.pop_front();
                }
                health
                    .unreplayed
                    .front()
                    .map(|(seen, _)| now - *seen)
                    .unwrap_or_default()
            }
            _ => {
                health.unreplayed.clear();
                Duration::ZERO
            }
        };
        let state = if lag <= self.max_lag {
            ReplicaState::InUse
        } else {
            ReplicaState::Lagging
        };
        if state != health.state {
            match state {
                ReplicaState::InUse => tracing::info!(lag_ms = lag.as_millis() as u64, "the read replica serves reads"),
                _ => tracing::warn!(
                    lag_ms = lag.as_millis() as u64,
                    "the read replica lags past --read-replica-max-lag; the primary serves its reads"
                ),
            }
        }
        health.state = state;
        health.lag = Some(lag);
    }
}

async fn check_periodically(replica: Weak<Replica>, primary: DbPool<Postgres>) {
    let mut every = tokio::time::interval(CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(replica) = replica.upgrade() else { return };
        if primary.is_closed() {
            return;
        }
        // A check never outlives the interval by much: an unreachable host counts as down.
        if tokio::time::timeout(CHECK_EVERY * 2, replica.check(&primary))
            .await
            .is_err()
        {
            let mut health = replica.health.lock().expect("replica health");
            health.state = ReplicaState::Down;
            health.lag = None;
        }
    }
}

/// A WAL position as PostgreSQL prints it (`16/B374D848`) as one number.
fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_lsns_in_order() {
        assert_eq!(super::parse_lsn("0/0"), Some(0));
        assert_eq!(super::parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert!(super::parse_lsn("1/FFFFFFFF") < super::parse_lsn("2/0"));
        assert_eq!(super::parse_lsn("nope"), None);
    }
}
