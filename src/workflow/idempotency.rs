//! How long checkout idempotency keys are remembered, and the background pruner that forgets
//! older ones.
//!
//! Without it `idempotency_keys` grows by one row — the full response snapshot — per checkout,
//! forever. A key is remembered for `--idempotency-retention` (default 24 h, Stripe's figure)
//! after its outcome was recorded; then it is forgotten ([`Store::forget_idempotency_keys`]: its
//! record deleted, its order's key cleared, the order kept whole) and a request bearing it is a
//! *new* request: it places a new order. So the retention must be at least the longest window in
//! which any client retries a checkout, and it may not be set below [`MIN_RETENTION`].
//!
//! Forgetting runs in bounded batches with a pause between them, so a large backlog (the first
//! run after an upgrade, or after a long stop) never holds a long transaction, or SQLite's single
//! writer, away from checkouts. Every worker process runs it; on PostgreSQL several may at once,
//! harmlessly: each batch deletes the rows it finds, and a row another process just deleted is
//! simply not found.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::clock;
use crate::store::idempotency::MAX_BATCH;
use crate::store::{Store, StoreResult};

/// The shortest retention accepted. A key forgotten sooner could be forgotten while its client
/// still retries (or, on PostgreSQL, while a stale claim's request might still be finishing).
pub const MIN_RETENTION: Duration = Duration::from_secs(3600);

/// Settings of the pruner.
#[derive(Clone, Debug)]
pub struct IdempotencySettings {
    /// How long a key is remembered after its outcome was recorded.
    pub retention: Duration,
    /// Keys forgotten per transaction (at most [`MAX_BATCH`]).
    pub batch: u32,
    /// Rest between two batches, leaving the database to checkouts.
    pub pause: Duration,
}

impl IdempotencySettings {
    /// The default batch and pause with this retention.
    pub fn with_retention(retention: Duration) -> Self {
        Self {
            retention,
            ..Self::default()
        }
    }
}

impl Default for IdempotencySettings {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(24 * 3600),
            batch: 500,
            pause: Duration::from_millis(50),
        }
    }
}

/// Forgets every key older than the retention at `now`, batch after batch, pausing between
/// them; returns early (between batches) once `stop` turns true. Returns how many were forgotten.
pub async fn forget_expired(
    store: &dyn Store,
    settings: &IdempotencySettings,
    now: DateTime<Utc>,
    stop: &mut watch::Receiver<bool>,
) -> StoreResult<u64> {
    let retention = chrono::Duration::from_std(settings.retention).unwrap_or(chrono::Duration::MAX);
    let before = now.checked_sub_signed(retention).unwrap_or(DateTime::<Utc>::MIN_UTC);
    let batch = settings.batch.clamp(1, MAX_BATCH);
    let mut forgotten = 0;
    loop {
        let done = store.forget_idempotency_keys(before, batch).await?;
        forgotten += done;
        // A short batch took the last of them.
        if done < u64::from(batch) {
            return Ok(forgotten);
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.pause) => {}
            Ok(_) = stop.wait_for(|stop| *stop) => return Ok(forgotten),
        }
    }
}

/// Runs the pruner until `stop` turns true: a pass every 24th of the retention (at most hourly),
/// so a key is forgotten within that long after its retention ran out.
pub async fn run(store: Arc<dyn Store>, settings: IdempotencySettings, mut stop: watch::Receiver<bool>) {
    let every = (settings.retention / 24).clamp(Duration::from_secs(60), Duration::from_secs(3600));
    loop {
        match forget_expired(store.as_ref(), &settings, clock::now(), &mut stop).await {
            Ok(0) => {}
            Ok(forgotten) => tracing::info!(forgotten, "forgot idempotency keys past their retention"),
            Err(error) => tracing::warn!(%error, "forgetting old idempotency keys failed; trying again later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}
