-- (SQLite) Checkout idempotency keys are kept for --idempotency-retention (default 24 h), then
-- forgotten (src/workflow/idempotency.rs). Forgetting a key deletes its record (fingerprint and
-- response snapshot: the bulk of the storage) and clears the key on its order, in one transaction,
-- so the order itself is kept whole and `UNIQUE (idempotency_principal, idempotency_key)` keeps
-- holding I3 for every key still remembered: NULLs are distinct, so forgotten keys never collide,
-- and a retry after the retention may place a new order under the same key.
--
-- SQLite cannot drop a NOT NULL in place: the table is rebuilt under its own name. The migration
-- runs in a transaction, where `PRAGMA foreign_keys` cannot change; `defer_foreign_keys` instead
-- lets the rows referencing orders (lines, timeline, payments, …) be orphaned by the DROP and
-- re-adopted by the INSERT before the check at COMMIT, which still refuses any that were not.
PRAGMA defer_foreign_keys = ON;

CREATE TABLE orders_before_0011 AS SELECT * FROM orders;
DROP TABLE orders;

CREATE TABLE orders (
    id                    BLOB PRIMARY KEY,
    customer_id           BLOB NOT NULL REFERENCES customers (id),
    status                TEXT NOT NULL,
    -- reserved: counted in products.reserved; committed: sold (ledger rows); released: given back
    inventory_state       TEXT NOT NULL CHECK (inventory_state IN ('reserved', 'committed', 'released')),
    currency              TEXT NOT NULL,
    total_minor           INTEGER NOT NULL CHECK (total_minor >= 0),
    payment_token         TEXT NOT NULL,
    idempotency_principal TEXT NOT NULL,
    -- NULL once the key was forgotten (past --idempotency-retention)
    idempotency_key       TEXT,
    correlation_id        TEXT,
    created_at            TEXT NOT NULL,
    updated_at            TEXT NOT NULL,
    last_event_sequence   INTEGER NOT NULL DEFAULT 0,
    shipping              TEXT
        CONSTRAINT orders_shipping_is_an_object CHECK (shipping IS NULL OR json_type(shipping) = 'object'),
    -- invariant I3 held by the database itself
    UNIQUE (idempotency_principal, idempotency_key)
);
INSERT INTO orders (id, customer_id, status, inventory_state, currency, total_minor, payment_token,
    idempotency_principal, idempotency_key, correlation_id, created_at, updated_at, last_event_sequence, shipping)
SELECT id, customer_id, status, inventory_state, currency, total_minor, payment_token,
    idempotency_principal, idempotency_key, correlation_id, created_at, updated_at, last_event_sequence, shipping
FROM orders_before_0011;
DROP TABLE orders_before_0011;

CREATE INDEX orders_by_customer ON orders (customer_id, id DESC);
CREATE INDEX orders_open ON orders (status, updated_at) WHERE status IN ('pending_payment', 'paid');

-- The pruner takes the oldest records first, a bounded batch at a time.
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (updated_at);
