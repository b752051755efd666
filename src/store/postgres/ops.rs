//! Operational reads and alarm transitions on PostgreSQL.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::PgStore;
use crate::store::ops::{self, AlarmRecord, AlarmTransition, OpsStore, PoolStats, StepOutcomes, StuckOrders};
use crate::store::{StoreResult, retry};

#[async_trait]
impl OpsStore for PgStore {
    async fn stuck_orders(
        &self,
        unpaid_before: DateTime<Utc>,
        unfulfilled_before: DateTime<Utc>,
    ) -> StoreResult<StuckOrders> {
        ops::reads::stuck_orders(&self.pool, unpaid_before, unfulfilled_before).await
    }

    async fn step_outcomes(&self, since: DateTime<Utc>) -> StoreResult<Vec<StepOutcomes>> {
        ops::reads::step_outcomes(&self.pool, since).await
    }

    fn pool_stats(&self) -> Vec<PoolStats> {
        let mut pools = vec![ops::pool_stats("main", self.pool.sqlx())];
        pools.extend(self.replica_pool().map(|pool| ops::pool_stats("replica", pool.sqlx())));
        pools
    }

    async fn alarm_states(&self) -> StoreResult<Vec<AlarmRecord>> {
        ops::reads::alarm_states(&self.pool).await
    }

    async fn transition_alarm(&self, transition: &AlarmTransition) -> StoreResult<bool> {
        let changed = retry::transaction(|| async {
            let mut tx = self.pool.begin().await?;
            let changed = ops::transition(&mut tx, transition).await?;
            tx.commit().await?;
            Ok(changed)
        })
        .await?;
        if changed && !transition.deliveries.is_empty() {
            self.jobs_enqueued();
        }
        Ok(changed)
    }
}
