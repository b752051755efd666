-- The order pipeline: job leases, payments, notifications, and the sandbox provider's own ledger.

-- When a job last became ready (enqueue or replay): the basis of "age of the oldest ready job",
-- which retries must not reset.
ALTER TABLE jobs ADD COLUMN ready_since timestamptz;
UPDATE jobs SET ready_since = created_at;
ALTER TABLE jobs ALTER COLUMN ready_since SET NOT NULL;
-- Leases that run out are claimed again (a crashed worker's job).
CREATE INDEX jobs_leased ON jobs (kind, lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_by_state ON jobs (state, kind);

-- One payment per order (invariant I4): every provider call for it uses `idempotency_key`.
CREATE TABLE payments (
    order_id        uuid PRIMARY KEY REFERENCES orders (id),
    provider        text NOT NULL,
    idempotency_key text NOT NULL UNIQUE,
    state           text NOT NULL CHECK (state IN ('captured', 'declined', 'refunded')),
    provider_ref    text,
    amount_minor    bigint NOT NULL,
    currency        text NOT NULL,
    detail          text,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);

-- At most one message per order per kind (invariant I8): recorded before sending, marked after.
CREATE TABLE notifications (
    order_id   uuid NOT NULL REFERENCES orders (id),
    kind       text NOT NULL,
    state      text NOT NULL CHECK (state IN ('sending', 'sent')),
    recipient  text NOT NULL,
    message_id text,
    attempts   integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL,
    sent_at    timestamptz,
    PRIMARY KEY (order_id, kind)
);

-- The built-in sandbox provider's own books, kept apart from the shop's: it is "the other side".
CREATE TABLE sandbox_charges (
    id              text PRIMARY KEY,
    idempotency_key text NOT NULL UNIQUE,
    token           text NOT NULL,
    amount_minor    bigint NOT NULL,
    currency        text NOT NULL,
    reference       text,
    state           text NOT NULL CHECK (state IN ('succeeded', 'refunded')),
    calls           integer NOT NULL DEFAULT 1,
    created_at      timestamptz NOT NULL
);
CREATE TABLE sandbox_refunds (
    id              text PRIMARY KEY,
    idempotency_key text NOT NULL UNIQUE,
    charge_id       text NOT NULL REFERENCES sandbox_charges (id),
    amount_minor    bigint NOT NULL,
    created_at      timestamptz NOT NULL
);
-- Calls per idempotency key for tokens that misbehave a set number of times (tok_flaky).
CREATE TABLE sandbox_attempts (
    idempotency_key text PRIMARY KEY,
    calls           integer NOT NULL
);
