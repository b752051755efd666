//! Operational reads and alarm transitions on SQLite (writes through the single writer).

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::SqliteStore;
use crate::store::StoreResult;
use crate::store::ops::{self, AlarmRecord, AlarmTransition, OpsStore, PoolStats, StepOutcomes, StuckOrders};

#[async_trait]
impl OpsStore for SqliteStore {
    async fn stuck_orders(
        &self,
        unpaid_before: DateTime<Utc>,
        unfulfilled_before: DateTime<Utc>,
    ) -> StoreResult<StuckOrders> {
        ops::reads::stuck_orders(&self.reader, unpaid_before, unfulfilled_before).await
    }

    async fn step_outcomes(&self, since: DateTime<Utc>) -> StoreResult<Vec<StepOutcomes>> {
        ops::reads::step_outcomes(&self.reader, since).await
    }

    fn pool_stats(&self) -> Vec<PoolStats> {
        vec![
            ops::pool_stats("writer", self.writer.sqlx()),
            ops::pool_stats("reader", self.reader.sqlx()),
        ]
    }

    async fn alarm_states(&self) -> StoreResult<Vec<AlarmRecord>> {
        ops::reads::alarm_states(&self.reader).await
    }

    async fn transition_alarm(&self, transition: &AlarmTransition) -> StoreResult<bool> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let changed = ops::transition(&mut tx, transition).await?;
        tx.commit().await?;
        if changed && !transition.deliveries.is_empty() {
            self.jobs_ready.wake_all();
        }
        Ok(changed)
    }
}
