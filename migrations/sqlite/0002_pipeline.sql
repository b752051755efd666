-- (SQLite) The order pipeline: job leases, payments, notifications, and the sandbox provider's own ledger.

-- When a job last became ready (enqueue or replay): the basis of "age of the oldest ready job",
-- which retries must not reset.
ALTER TABLE jobs ADD COLUMN ready_since TEXT NOT NULL DEFAULT '';
UPDATE jobs SET ready_since = created_at;
-- Leases that run out are claimed again (a crashed worker's job).
CREATE INDEX jobs_leased ON jobs (kind, lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_by_state ON jobs (state, kind);

-- One payment per order (invariant I4): every provider call for it uses `idempotency_key`.
CREATE TABLE payments (
    order_id        BLOB PRIMARY KEY REFERENCES orders (id),
    provider        TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    state           TEXT NOT NULL CHECK (state IN ('captured', 'declined', 'refunded')),
    provider_ref    TEXT,
    amount_minor    INTEGER NOT NULL,
    currency        TEXT NOT NULL,
    detail          TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);

-- At most one message per order per kind (invariant I8): recorded before sending, marked after.
CREATE TABLE notifications (
    order_id   BLOB NOT NULL REFERENCES orders (id),
    kind       TEXT NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('sending', 'sent')),
    recipient  TEXT NOT NULL,
    message_id TEXT,
    attempts   INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL,
    sent_at    TEXT,
    PRIMARY KEY (order_id, kind)
);

-- The built-in sandbox provider's own books, kept apart from the shop's: it is "the other side".
CREATE TABLE sandbox_charges (
    id              TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    token           TEXT NOT NULL,
    amount_minor    INTEGER NOT NULL,
    currency        TEXT NOT NULL,
    reference       TEXT,
    state           TEXT NOT NULL CHECK (state IN ('succeeded', 'refunded')),
    calls           INTEGER NOT NULL DEFAULT 1,
    created_at      TEXT NOT NULL
);
CREATE TABLE sandbox_refunds (
    id              TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    charge_id       TEXT NOT NULL REFERENCES sandbox_charges (id),
    amount_minor    INTEGER NOT NULL,
    created_at      TEXT NOT NULL
);
-- Calls per idempotency key for tokens that misbehave a set number of times (tok_flaky).
CREATE TABLE sandbox_attempts (
    idempotency_key TEXT PRIMARY KEY,
    calls           INTEGER NOT NULL
);
