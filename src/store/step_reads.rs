//! Steps' order reads, coalesced. Every step starts by reading its order with its customer,
//! payment and lines; under load many steps start at once, and each read alone costs PostgreSQL
//! a statement (parse, bind, execute, a round trip). Here the reads waiting at the same time
//! share one statement ([`reads::step_orders`]), through the queue in front of a few workers
//! that group commit uses ([`Batcher`]): a read that arrives while a reader is idle is sent at
//! once, alone, so a quiet pipeline waits for nothing.
//!
//! PostgreSQL only: SQLite is embedded, where a statement costs no round trip and little CPU.

use async_trait::async_trait;
use sqlx::Postgres;

use super::batcher::{Batcher, GroupWriter};
use super::jobs::StepOrder;
use super::jobs_common::reads;
use super::{DbPool, StoreError, StoreResult};
use crate::domain::OrderId;

/// Most reads in one statement.
const MAX_GROUP: usize = 32;
/// Statements in flight at once.
const READERS: usize = 2;

/// Reads steps' orders, many per statement when many wait.
pub(super) struct StepReads {
    batcher: Batcher<Reader>,
}

impl StepReads {
    pub(super) fn start(pool: DbPool<Postgres>) -> Self {
        Self {
            batcher: Batcher::start(Reader { pool }, MAX_GROUP, READERS),
        }
    }

    /// The step's order; `None` when it does not exist.
    pub(super) async fn read(&self, order: OrderId) -> StoreResult<Option<StepOrder>> {
        self.batcher
            .submit(order)
            .await
            .unwrap_or_else(|| Err(StoreError::Unavailable("the step reader has stopped".into())))
    }
}

struct Reader {
    pool: DbPool<Postgres>,
}

#[async_trait]
impl GroupWriter for Reader {
    type Item = OrderId;
    type Answer = StoreResult<Option<StepOrder>>;

    async fn write(&self, group: Vec<OrderId>) -> Vec<Self::Answer> {
        match reads::step_orders(&self.pool, &group).await {
            Ok(found) => found.into_iter().map(Ok).collect(),
            Err(error) if group.len() == 1 => vec![Err(error)],
            // One failed statement answers every read in it: an outage for each (their steps
            // try again later).
            Err(error) => group.iter().map(|_| Err(error.outage_copy())).collect(),
        }
    }
}
