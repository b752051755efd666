//! `orderflow audit`: the invariants of DESIGN.md checked against the stored data.
//!
//! Each check is one query that returns the rows breaking it, written in the SQL both dialects
//! share, and run by one generic function, so SQLite and PostgreSQL are audited identically.
//!
//! The audit must stay usable on millions of orders (issue 13: 1,000,000 orders within 30 s,
//! docs/BENCHMARKS.md "The audit at scale"), so every check is a join, an anti-join (`NOT
//! EXISTS`) or a `GROUP BY` the database runs as one pass — never a scalar subquery evaluated
//! once per order. The one per-order lookup left (an order's latest timeline entry) and the
//! per-order event aggregates read covering indexes only, never the tables (migration 0012).
//! Checks run two at a time, each on its own connection, and only violating rows come back, so
//! the audit's own memory does not grow with the database.

use std::fmt;

use serde::Serialize;
use uuid::Uuid;

use super::StoreResult;

/// One check: its name, the invariant it guards, and a query returning `(subject, found, expected)`
/// for every violating row.
struct Check {
    name: &'static str,
    invariant: &'static str,
    sql: &'static str,
}

const CHECKS: &[Check] = &[
    Check {
        name: "references_resolve",
        invariant: "every order's customer, every line's order and product, every delivery's endpoint and event and \
                    every attempt's delivery exists (foreign keys on PostgreSQL; held by the code in the dsql profile)",
        sql: "SELECT o.id AS subject, CAST(0 AS BIGINT) AS found, CAST(1 AS BIGINT) AS expected FROM orders o \
              LEFT JOIN customers c ON c.id = o.customer_id WHERE c.id IS NULL \
              UNION ALL SELECT i.order_id, CAST(0 AS BIGINT), CAST(1 AS BIGINT) FROM order_items i \
              LEFT JOIN orders o ON o.id = i.order_id LEFT JOIN products p ON p.id = i.product_id \
              WHERE o.id IS NULL OR p.id IS NULL \
              UNION ALL SELECT d.id, CAST(0 AS BIGINT), CAST(1 AS BIGINT) FROM webhook_deliveries d \
              LEFT JOIN webhook_endpoints w ON w.id = d.endpoint_id LEFT JOIN events e ON e.id = d.event_id \
              WHERE w.id IS NULL OR e.id IS NULL \
              UNION ALL SELECT a.id, CAST(0 AS BIGINT), CAST(1 AS BIGINT) FROM webhook_attempts a \
              LEFT JOIN webhook_deliveries d ON d.id = a.delivery_id WHERE d.id IS NULL",
    },
    Check {
        name: "no_oversell",
        invariant: "I1: 0 <= reserved <= on_hand for every product",
        sql: "SELECT id AS subject, reserved AS found, on_hand AS expected FROM products \
              WHERE reserved < 0 OR on_hand < 0 OR reserved > on_hand",
    },
    Check {
        name: "stock_conservation",
        invariant: "I2: on_hand equals the sum of the product's inventory ledger",
        sql: "SELECT p.id AS subject, p.on_hand AS found, coalesce(l.total, CAST(0 AS BIGINT)) AS expected \
              FROM products p LEFT JOIN (SELECT product_id, CAST(sum(delta) AS BIGINT) AS total \
              FROM inventory_ledger GROUP BY product_id) l ON l.product_id = p.id \
              WHERE p.on_hand <> coalesce(l.total, CAST(0 AS BIGINT))",
    },
    Check {
        name: "reservations_explained",
        invariant: "I1/I2: reserved equals the units of orders still holding a reservation",
        sql: "SELECT p.id AS subject, p.reserved AS found, coalesce(r.total, CAST(0 AS BIGINT)) AS expected \
              FROM products p LEFT JOIN (SELECT i.product_id, CAST(sum(i.quantity) AS BIGINT) AS total \
              FROM order_items i JOIN orders o ON o.id = i.order_id \
              WHERE o.inventory_state = 'reserved' GROUP BY i.product_id) r ON r.product_id = p.id \
              WHERE p.reserved <> coalesce(r.total, CAST(0 AS BIGINT))",
    },
    Check {
        name: "one_order_per_key",
        invariant: "I3: one idempotency key (per principal) never yields two orders",
        sql: "SELECT o.id AS subject, d.orders AS found, CAST(1 AS BIGINT) AS expected FROM orders o \
              JOIN (SELECT idempotency_principal, idempotency_key, count(*) AS orders FROM orders \
              WHERE idempotency_key IS NOT NULL GROUP BY idempotency_principal, idempotency_key \
              HAVING count(*) > 1) d ON d.idempotency_principal = o.idempotency_principal \
              AND d.idempotency_key = o.idempotency_key",
    },
    Check {
        name: "key_records_match_orders",
        invariant: "I3: a remembered key's record and order agree: a completed record points at the order made \
                    with its key, and an order's key keeps its record until both are forgotten together",
        sql: "SELECT coalesce(k.order_id, o.id) AS subject, CAST(0 AS BIGINT) AS found, CAST(1 AS BIGINT) AS expected \
              FROM idempotency_keys k FULL JOIN orders o \
              ON o.idempotency_principal = k.principal AND o.idempotency_key = k.key \
              WHERE (k.state = 'completed' AND k.order_id IS NOT NULL AND (o.id IS NULL OR o.id <> k.order_id)) \
              OR (k.key IS NULL AND o.idempotency_key IS NOT NULL)",
    },
    Check {
        name: "order_totals",
        invariant: "an order's total is the sum of its lines",
        sql: "SELECT o.id AS subject, o.total_minor AS found, coalesce(s.total, CAST(0 AS BIGINT)) AS expected \
              FROM orders o LEFT JOIN (SELECT order_id, CAST(sum(quantity * unit_price_minor) AS BIGINT) AS total \
              FROM order_items GROUP BY order_id) s ON s.order_id = o.id \
              WHERE o.total_minor <> coalesce(s.total, CAST(0 AS BIGINT))",
    },
    Check {
        name: "status_has_event",
        invariant: "I7: an order's latest event records its current status",
        sql: "SELECT o.id AS subject, CAST(0 AS BIGINT) AS found, CAST(1 AS BIGINT) AS expected FROM orders o \
              WHERE coalesce((SELECT e.status FROM order_events e WHERE e.order_id = o.id \
              ORDER BY e.id DESC LIMIT 1), '') <> o.status",
    },
    Check {
        name: "nothing_silently_stuck",
        invariant: "I6: an unfinished order has a step queued, running, or dead-lettered (visible), or waits \
                    for the warehouse's shipments with its stock committed (watched by orders_stuck_unfulfilled)",
        sql: "SELECT o.id AS subject, CAST(0 AS BIGINT) AS found, CAST(1 AS BIGINT) AS expected FROM orders o \
              WHERE o.status IN ('pending_payment', 'paid') AND NOT (o.status = 'paid' AND o.inventory_state = 'committed') \
              AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.order_id = o.id AND j.state IN ('ready', 'running', 'dead'))",
    },
    Check {
        name: "captured_payment_has_order",
        invariant: "I4: an authorized or captured payment belongs to a paid or fulfilled order, or its \
                    void/refund is under way",
        sql: "SELECT o.id AS subject, CAST(0 AS BIGINT) AS found, CAST(1 AS BIGINT) AS expected \
              FROM payments p JOIN orders o ON o.id = p.order_id WHERE p.state IN ('authorized', 'captured') \
              AND o.status NOT IN ('paid', 'fulfilled') AND NOT EXISTS (SELECT 1 FROM jobs j \
              WHERE j.order_id = o.id AND j.kind = 'refund_payment' AND j.state IN ('ready', 'running'))",
    },
    Check {
        name: "refunds_within_capture",
        invariant: "I4: no order is refunded more than was captured, nor captured more than authorized",
        sql: "SELECT order_id AS subject, refunded_minor AS found, captured_minor AS expected FROM payments \
              WHERE refunded_minor > captured_minor OR captured_minor > amount_minor",
    },
    Check {
        name: "one_charge_per_order",
        invariant: "I4: the payment provider's books hold at most one payment intent per order",
        sql: "SELECT CAST(NULL AS uuid) AS subject, count(*) AS found, CAST(1 AS BIGINT) AS expected \
              FROM sandbox_intents WHERE order_id IS NOT NULL GROUP BY order_id HAVING count(*) > 1",
    },
    Check {
        name: "payment_in_provider_books",
        invariant: "I4: the provider's books agree with ours: every payment the shop recorded is the \
                    provider's intent, in the matching state, with the same captured and refunded amounts \
                    (or a step that calls the provider is queued or running for it)",
        // A step that calls the provider commits its record after the provider's answer, so on a
        // live system the provider is briefly ahead of the shop; the step (or its retry) records
        // what the provider did. A dead-lettered step leaves the difference visible here.
        sql: "SELECT p.order_id AS subject, CAST(0 AS BIGINT) AS found, CAST(1 AS BIGINT) AS expected \
              FROM payments p WHERE p.provider = 'sandbox' AND p.state NOT IN ('declined', 'requires_action') \
              AND NOT EXISTS (SELECT 1 FROM sandbox_intents i WHERE i.id = p.provider_ref \
              AND i.captured_minor = p.captured_minor AND i.refunded_minor = p.refunded_minor \
              AND i.status = CASE p.state WHEN 'authorized' THEN 'requires_capture' WHEN 'voided' THEN 'canceled' \
              ELSE 'succeeded' END) \
              AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.order_id = p.order_id AND j.state IN ('ready', 'running') \
              AND j.kind IN ('charge_payment', 'fulfil_order', 'refund_payment', 'settle_refund'))",
    },
    Check {
        name: "receipt_sent_or_pending",
        invariant: "I8: a paid order's receipt was sent, or its sending step is queued or parked",
        sql: "SELECT o.id AS subject, CAST(0 AS BIGINT) AS found, CAST(1 AS BIGINT) AS expected FROM orders o \
              WHERE o.status IN ('paid', 'fulfilled', 'refunded') AND NOT EXISTS (SELECT 1 FROM notifications n \
              WHERE n.order_id = o.id AND n.kind = 'send_receipt' AND n.state = 'sent') \
              AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.order_id = o.id AND j.kind = 'send_receipt' \
              AND j.state IN ('ready', 'running', 'dead'))",
    },
    Check {
        name: "events_positions_gap_free",
        invariant: "events out: positioned events are numbered without a gap (found = count, expected = span)",
        sql: "SELECT CAST(NULL AS uuid) AS subject, count(*) AS found, \
              CAST(max(position) - min(position) + 1 AS BIGINT) AS expected FROM events \
              WHERE position IS NOT NULL HAVING count(*) <> max(position) - min(position) + 1",
    },
    Check {
        name: "events_sequences_gap_free",
        invariant: "events out: each order's events are numbered 1, 2, 3 … without a gap",
        sql: "SELECT order_id AS subject, count(*) AS found, CAST(max(sequence) - min(sequence) + 1 AS BIGINT) \
              AS expected FROM events WHERE order_id IS NOT NULL GROUP BY order_id \
              HAVING count(*) <> max(sequence) - min(sequence) + 1",
    },
    Check {
        name: "order_changes_have_events",
        invariant: "I7/events out: every order has the events its status implies (placed; paid; fulfilled; \
                    cancelled; refunded orders were paid and fulfilled)",
        // Orders older than the oldest event kept are skipped: their events may have been pruned
        // (in position order; unstamped events are the newest).
        sql: "SELECT subject, found, expected FROM (SELECT o.id AS subject, CAST(coalesce(e.placed, 0) \
                + CASE WHEN o.status IN ('paid', 'fulfilled', 'refunded') THEN coalesce(e.paid, 0) ELSE 0 END \
                + CASE WHEN o.status IN ('fulfilled', 'refunded') THEN coalesce(e.fulfilled, 0) ELSE 0 END \
                + CASE WHEN o.status = 'cancelled' THEN coalesce(e.cancelled, 0) ELSE 0 END AS BIGINT) AS found, \
              CAST(CASE o.status WHEN 'pending_payment' THEN 1 WHEN 'fulfilled' THEN 3 WHEN 'refunded' THEN 3 ELSE 2 END \
              AS BIGINT) AS expected \
              FROM orders o LEFT JOIN (SELECT order_id, \
                max(CASE WHEN event_type = 'order.placed' THEN 1 ELSE 0 END) AS placed, \
                max(CASE WHEN event_type = 'order.paid' THEN 1 ELSE 0 END) AS paid, \
                max(CASE WHEN event_type = 'order.fulfilled' THEN 1 ELSE 0 END) AS fulfilled, \
                max(CASE WHEN event_type = 'order.cancelled' THEN 1 ELSE 0 END) AS cancelled \
                FROM events WHERE order_id IS NOT NULL GROUP BY order_id) e ON e.order_id = o.id \
              WHERE o.created_at >= (SELECT min(created_at) FROM ( \
                SELECT created_at FROM (SELECT created_at FROM events WHERE order_id IS NOT NULL \
                  AND position IS NOT NULL ORDER BY position LIMIT 1) oldest \
                UNION ALL SELECT created_at FROM events WHERE position IS NULL AND order_id IS NOT NULL) kept)) t \
              WHERE found <> expected",
    },
    Check {
        name: "shipped_within_ordered",
        invariant: "I1/fulfilment: no order ships more units of a product than it ordered",
        sql: "SELECT s.order_id AS subject, CAST(sum(i.quantity) AS BIGINT) AS found, \
              CAST(coalesce(max(oi.quantity), 0) AS BIGINT) AS expected FROM shipment_items i \
              JOIN shipments s ON s.id = i.shipment_id LEFT JOIN order_items oi ON oi.order_id = s.order_id \
              AND oi.product_id = i.product_id GROUP BY s.order_id, i.product_id \
              HAVING sum(i.quantity) > coalesce(max(oi.quantity), 0)",
    },
    Check {
        name: "restocked_within_sold",
        invariant: "I2/refunds: no refund restocks more units of a product than the order bought",
        sql: "SELECT r.order_id AS subject, CAST(sum(i.quantity) AS BIGINT) AS found, \
              CAST(coalesce(max(oi.quantity), 0) AS BIGINT) AS expected FROM refund_items i \
              JOIN refunds r ON r.id = i.refund_id LEFT JOIN order_items oi ON oi.order_id = r.order_id \
              AND oi.product_id = i.product_id GROUP BY r.order_id, i.product_id \
              HAVING sum(i.quantity) > coalesce(max(oi.quantity), 0)",
    },
    Check {
        name: "refunds_within_capture_all",
        invariant: "I4/refunds: refunds given and under way never exceed what was captured",
        sql: "SELECT p.order_id AS subject, r.total AS found, p.captured_minor AS expected FROM payments p \
              JOIN (SELECT order_id, CAST(sum(amount_minor) AS BIGINT) AS total FROM refunds GROUP BY order_id) r \
              ON r.order_id = p.order_id WHERE r.total > p.captured_minor",
    },
    Check {
        name: "refunds_match_payment",
        invariant: "I4/refunds: a refunded order's payment says exactly what its settled refunds gave back",
        sql: "SELECT p.order_id AS subject, p.refunded_minor AS found, r.total AS expected FROM payments p \
              JOIN (SELECT order_id, CAST(sum(amount_minor) AS BIGINT) AS total FROM refunds \
              WHERE state = 'succeeded' GROUP BY order_id) r ON r.order_id = p.order_id \
              WHERE p.refunded_minor <> r.total",
    },
    Check {
        name: "refunded_orders_refunded",
        invariant: "lifecycle: an order is `refunded` only when its payment was refunded in full",
        sql: "SELECT o.id AS subject, CAST(0 AS BIGINT) AS found, CAST(1 AS BIGINT) AS expected FROM orders o \
              WHERE o.status = 'refunded' AND NOT EXISTS (SELECT 1 FROM payments p WHERE p.order_id = o.id \
              AND p.state = 'refunded' AND p.refunded_minor = p.captured_minor)",
    },
    Check {
        name: "pending_refunds_have_a_step",
        invariant: "no order silently stuck: a pending refund's settle_refund step is queued, running or parked",
        sql: "SELECT r.order_id AS subject, CAST(0 AS BIGINT) AS found, CAST(1 AS BIGINT) AS expected \
              FROM refunds r WHERE r.state = 'pending' AND NOT EXISTS (SELECT 1 FROM jobs j \
              WHERE j.order_id = r.order_id AND j.kind = 'settle_refund' AND j.state IN ('ready', 'running', 'dead'))",
    },
];

#[derive(sqlx::FromRow)]
pub(super) struct CheckRow {
    subject: Option<Uuid>,
    found: i64,
    expected: i64,
}

/// One row that breaks an invariant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub check: &'static str,
    pub invariant: &'static str,
    /// The product or order at fault.
    pub subject: String,
    pub found: i64,
    pub expected: i64,
}

impl Violation {
    /// A violation of a check run outside this module's SQL (added with
    /// [`AuditReport::add_check`]).
    pub fn new(
        check: &'static str,
        invariant: &'static str,
        subject: impl Into<String>,
        found: i64,
        expected: i64,
    ) -> Self {
        Self {
            check,
            invariant,
            subject: subject.into(),
            found,
            expected,
        }
    }
}

/// The outcome of an audit: which checks ran and what they found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AuditReport {
    pub checks: Vec<&'static str>,
    pub violations: Vec<Violation>,
    /// The checks added with [`add_check`](Self::add_check) (name, invariant), for printing.
    #[serde(skip)]
    external: Vec<(&'static str, &'static str)>,
}

impl AuditReport {
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }

    /// Adds a check run outside the database (the payment provider's books:
    /// `workflow::reconcile`), listed and printed like the SQL checks; its violations go in
    /// [`violations`](Self::violations).
    pub fn add_check(&mut self, name: &'static str, invariant: &'static str) {
        self.checks.push(name);
        self.external.push((name, invariant));
    }
}

impl fmt::Display for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sql = CHECKS.iter().map(|check| (check.name, check.invariant));
        let external = self.external.iter().copied();
        for (name, invariant) in sql.chain(external) {
            let broken: Vec<_> = self.violations.iter().filter(|v| v.check == name).collect();
            let verdict = if broken.is_empty() { "ok  " } else { "FAIL" };
            writeln!(f, "{verdict} {name:<26} {invariant}")?;
            for violation in broken {
                writeln!(
                    f,
                    "       {}: found {}, expected {}",
                    violation.subject, violation.found, violation.expected
                )?;
            }
        }
        let summary = if self.is_clean() {
            "all invariants hold".to_string()
        } else {
            format!("{} violation(s)", self.violations.len())
        };
        write!(f, "{summary}")
    }
}

/// Runs every check on `pool`, two at a time when the pool allows (each lane on a connection of
/// its own for the whole audit), so one lane's single-threaded index scan overlaps the other's;
/// the report lists the checks in [`CHECKS`] order.
pub(super) async fn run<DB>(pool: &crate::store::DbPool<DB>) -> StoreResult<AuditReport>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    CheckRow: for<'r> sqlx::FromRow<'r, DB::Row>,
{
    // Each lane takes the next check not yet taken, so a slow check does not hold up the others.
    let next = std::sync::atomic::AtomicUsize::new(0);
    // Behind a transaction pooler a held connection would not keep its server between checks:
    // each check is run on the pool, in a transaction of its own.
    let lane = || async {
        let mut conn = if pool.behind_transaction_pooler() {
            None
        } else {
            Some(pool.acquire().await?)
        };
        let mut found = Vec::new();
        loop {
            let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(check) = CHECKS.get(index) else {
                return StoreResult::Ok(found);
            };
            let check_rows = sqlx::query_as::<DB, CheckRow>(check.sql);
            let rows: Vec<CheckRow> = match conn.as_mut() {
                Some(conn) => check_rows.fetch_all(&mut **conn).await?,
                None => check_rows.fetch_all(pool).await?,
            };
            found.push((index, rows));
        }
    };
    let (first, second) = if pool.options().get_max_connections() >= 2 {
        tokio::join!(lane(), lane())
    } else {
        (lane().await, Ok(Vec::new()))
    };
    let mut results = first?;
    results.extend(second?);
    results.sort_by_key(|(index, _)| *index);
    let mut report = AuditReport::default();
    for (index, rows) in results {
        let check = &CHECKS[index];
        report.checks.push(check.name);
        report.violations.extend(rows.into_iter().map(|row| Violation {
            check: check.name,
            invariant: check.invariant,
            subject: row.subject.map(|id| id.to_string()).unwrap_or_else(|| "-".into()),
            found: row.found,
            expected: row.expected,
        }));
    }
    Ok(report)
}
