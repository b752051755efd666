//! Checkouts' idempotency claims, coalesced. A checkout on PostgreSQL starts by claiming its key
//! and reading its cart's stock in one statement (docs/scale-out.md, "Checkout round trips"); in a
//! flash sale hundreds arrive at once, and each claim alone costs the database a statement (parse,
//! bind, execute, a snapshot, a round trip). Here the claims waiting at the same time share one
//! statement over `unnest`ed arrays, through the queue in front of a few workers that group commit
//! uses ([`Batcher`]): a claim that arrives while a claimer is idle is sent at once, alone (the
//! single-claim statement), so a quiet shop waits for nothing.
//!
//! Each claim is still decided alone: it is ours only when the row inserted carries our lock
//! token (two requests with one key in the same statement: the first inserts, the second finds
//! nothing committed before the statement and looks again, as when they race in two statements).
//! What the key held before, and the stock, are read from the statement's snapshot as before.
//!
//! Plain PostgreSQL profile only: SQLite claims inside its writer's transaction, and the
//! distributed-SQL profile keeps one claim per statement (a conflict there fails the statement).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Postgres;
use uuid::Uuid;

use super::batcher::{Batcher, GroupWriter};
use super::{DbPool, StoreResult};

/// Most claims in one statement.
const MAX_GROUP: usize = 64;
/// Statements in flight at once.
const CLAIMERS: usize = 2;

/// One key to claim, with the products whose stock the checkout needs.
pub(super) struct KeyClaim {
    pub principal: String,
    pub key: String,
    pub fingerprint: String,
    pub lock_token: Uuid,
    pub at: DateTime<Utc>,
    pub products: Vec<Uuid>,
}

/// What the claim's statement found: whether it inserted the key, the key's row as it was before
/// (when it existed), and the stock of the claim's products.
#[derive(Debug, Default)]
pub(super) struct ClaimRead {
    pub claimed: bool,
    pub fingerprint: Option<String>,
    pub state: Option<String>,
    pub body: Option<String>,
    pub old_token: Option<Uuid>,
    pub updated_at: Option<DateTime<Utc>>,
    /// `(id, price_minor, available)` of the claim's products, in id order.
    pub stock: Vec<(Uuid, i64, i64)>,
}

/// Claims keys, many per statement when many wait (or one per statement: `coalesce` off).
pub(super) struct KeyClaims {
    batcher: Batcher<Claimer>,
}

impl KeyClaims {
    pub(super) fn start(pool: DbPool<Postgres>, coalesce: bool) -> Self {
        let max_group = if coalesce { MAX_GROUP } else { 1 };
        Self {
            batcher: Batcher::start(Claimer { pool }, max_group, CLAIMERS),
        }
    }

    pub(super) async fn claim(&self, claim: KeyClaim) -> StoreResult<ClaimRead> {
        self.batcher
            .submit(claim)
            .await
            .unwrap_or_else(|| Err(super::StoreError::Unavailable("the key claimer has stopped".into())))
    }
}

struct Claimer {
    pool: DbPool<Postgres>,
}

#[async_trait]
impl GroupWriter for Claimer {
    type Item = KeyClaim;
    type Answer = StoreResult<ClaimRead>;

    async fn write(&self, group: Vec<KeyClaim>) -> Vec<Self::Answer> {
        if group.len() == 1 {
            return vec![claim_one(&self.pool, &group[0]).await];
        }
        match claim_many(&self.pool, &group).await {
            Ok(reads) => reads.into_iter().map(Ok).collect(),
            // Lost a race, or the database is away: the same for each (each claim retries).
            Err(error) if error.is_outage() => group.iter().map(|_| Err(error.outage_copy())).collect(),
            // One claim's own failure: each alone, so it fails alone.
            Err(_) => {
                let mut answers = Vec::with_capacity(group.len());
                for claim in &group {
                    answers.push(claim_one(&self.pool, claim).await);
                }
                answers
            }
        }
    }
}

/// One claim. The sibling CTE `earlier` reads the statement's snapshot: the row the INSERT
/// collided with when it was committed before the statement began (else nothing, and the caller
/// tries again). The claim itself need not be flushed before the answer (`synchronous_commit`
/// off for this statement): a claim lost in a crash leaves the key free, as if never tried.
async fn claim_one(pool: &DbPool<Postgres>, claim: &KeyClaim) -> StoreResult<ClaimRead> {
    #[allow(clippy::type_complexity)]
    let (claimed, fingerprint, state, body, old_token, updated_at, ids, prices, available): (
        bool,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<Uuid>,
        Option<DateTime<Utc>>,
        Option<Vec<Uuid>>,
        Option<Vec<i64>>,
        Option<Vec<i64>>,
    ) = sqlx::query_as(
        "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true)), \
         claimed AS ( \
            INSERT INTO idempotency_keys (principal, key, fingerprint, state, lock_token, created_at, updated_at) \
            SELECT $1, $2, $3, 'in_flight', $4, $5, $5 FROM relaxed \
            ON CONFLICT (principal, key) DO NOTHING RETURNING 1), \
         earlier AS ( \
            SELECT fingerprint, state, response_body, lock_token, updated_at FROM idempotency_keys \
            WHERE principal = $1 AND key = $2), \
         stock AS ( \
            SELECT array_agg(id ORDER BY id) AS ids, array_agg(price_minor ORDER BY id) AS prices, \
                array_agg(on_hand - reserved ORDER BY id) AS available \
            FROM products WHERE id = ANY($6)) \
         SELECT EXISTS (SELECT 1 FROM claimed), e.fingerprint, e.state, e.response_body, e.lock_token, \
            e.updated_at, s.ids, s.prices, s.available \
         FROM stock s LEFT JOIN earlier e ON true",
    )
    .bind(&claim.principal)
    .bind(&claim.key)
    .bind(&claim.fingerprint)
    .bind(claim.lock_token)
    .bind(claim.at)
    .bind(&claim.products)
    .fetch_one(pool)
    .await?;
    Ok(ClaimRead {
        claimed,
        fingerprint,
        state,
        body,
        old_token,
        updated_at,
        stock: zip_stock(ids, prices, available),
    })
}

/// Many claims in one statement: each row of `v` is a claim, numbered in arrival order; it is ours
/// when the row inserted for its key carries its lock token. The stock of every claim's products
/// is read once and comes back on the first row.
async fn claim_many(pool: &DbPool<Postgres>, group: &[KeyClaim]) -> StoreResult<Vec<ClaimRead>> {
    let mut products: Vec<Uuid> = group.iter().flat_map(|claim| claim.products.iter().copied()).collect();
    products.sort();
    products.dedup();
    let numbers: Vec<i32> = (0..group.len() as i32).collect();
    let principals: Vec<&str> = group.iter().map(|claim| claim.principal.as_str()).collect();
    let keys: Vec<&str> = group.iter().map(|claim| claim.key.as_str()).collect();
    let fingerprints: Vec<&str> = group.iter().map(|claim| claim.fingerprint.as_str()).collect();
    let tokens: Vec<Uuid> = group.iter().map(|claim| claim.lock_token).collect();
    let times: Vec<DateTime<Utc>> = group.iter().map(|claim| claim.at).collect();
    type Row = (
        i32,
        bool,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<Uuid>,
        Option<DateTime<Utc>>,
        Option<Vec<Uuid>>,
        Option<Vec<i64>>,
        Option<Vec<i64>>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true)), \
         v AS (SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::text[], $5::uuid[], $6::timestamptz[]) \
            AS v(n, principal, key, fingerprint, lock_token, at)), \
         claimed AS ( \
            INSERT INTO idempotency_keys (principal, key, fingerprint, state, lock_token, created_at, updated_at) \
            SELECT v.principal, v.key, v.fingerprint, 'in_flight', v.lock_token, v.at, v.at \
            FROM v CROSS JOIN relaxed ORDER BY v.n \
            ON CONFLICT (principal, key) DO NOTHING RETURNING lock_token), \
         earlier AS ( \
            SELECT k.principal, k.key, k.fingerprint, k.state, k.response_body, k.lock_token, k.updated_at \
            FROM idempotency_keys k WHERE (k.principal, k.key) IN (SELECT principal, key FROM v)), \
         stock AS ( \
            SELECT array_agg(id ORDER BY id) AS ids, array_agg(price_minor ORDER BY id) AS prices, \
                array_agg(on_hand - reserved ORDER BY id) AS available \
            FROM products WHERE id = ANY($7)) \
         SELECT v.n, EXISTS (SELECT 1 FROM claimed c WHERE c.lock_token = v.lock_token), e.fingerprint, e.state, \
            e.response_body, e.lock_token, e.updated_at, \
            CASE WHEN v.n = 0 THEN s.ids END, CASE WHEN v.n = 0 THEN s.prices END, \
            CASE WHEN v.n = 0 THEN s.available END \
         FROM v CROSS JOIN stock s LEFT JOIN earlier e ON e.principal = v.principal AND e.key = v.key \
         ORDER BY v.n",
    )
    .bind(&numbers)
    .bind(&principals)
    .bind(&keys)
    .bind(&fingerprints)
    .bind(&tokens)
    .bind(&times)
    .bind(&products)
    .fetch_all(pool)
    .await?;
    if rows.len() != group.len() {
        return Err(super::StoreError::Corrupt(format!(
            "a claim statement of {} keys answered {} rows",
            group.len(),
            rows.len()
        )));
    }
    let mut stock = Vec::new();
    let mut reads = Vec::with_capacity(rows.len());
    for (n, claimed, fingerprint, state, body, old_token, updated_at, ids, prices, available) in rows {
        if n == 0 {
            stock = zip_stock(ids, prices, available);
        }
        reads.push(ClaimRead {
            claimed,
            fingerprint,
            state,
            body,
            old_token,
            updated_at,
            stock: Vec::new(),
        });
    }
    // Each claim gets the stock of its own products only.
    for (read, claim) in reads.iter_mut().zip(group) {
        read.stock = stock
            .iter()
            .filter(|(id, _, _)| claim.products.binary_search(id).is_ok())
            .copied()
            .collect();
    }
    Ok(reads)
}

fn zip_stock(ids: Option<Vec<Uuid>>, prices: Option<Vec<i64>>, available: Option<Vec<i64>>) -> Vec<(Uuid, i64, i64)> {
    ids.unwrap_or_default()
        .into_iter()
        .zip(prices.unwrap_or_default())
        .zip(available.unwrap_or_default())
        .map(|((id, price), available)| (id, price, available))
        .collect()
}
