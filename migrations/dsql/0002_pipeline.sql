-- The order pipeline: job leases, payments, notifications (distributed-SQL profile; see 0001).
-- `jobs.ready_since` is created with its table in 0001 (ALTER COLUMN … SET NOT NULL cannot be run
-- here); the one-step sandbox charges and refunds that postgres 0002 creates and 0009 drops are
-- never created.

-- postgres: jobs_leased ON jobs (kind, lease_expires_at) WHERE state = 'running'.
CREATE INDEX ASYNC IF NOT EXISTS jobs_leased ON jobs (kind, state, lease_expires_at);
CREATE INDEX ASYNC IF NOT EXISTS jobs_by_state ON jobs (state, kind);

-- One payment per order (invariant I4): every provider call for it uses `idempotency_key`. In its
-- PaymentIntents form of postgres 0007 from the start.
CREATE TABLE IF NOT EXISTS payments (
    order_id        uuid PRIMARY KEY,
    provider        text NOT NULL,
    idempotency_key text NOT NULL UNIQUE,
    state           text NOT NULL CONSTRAINT payments_state_check CHECK (state IN ('requires_action', 'authorized',
        'captured', 'voided', 'declined', 'partially_refunded', 'refunded')),
    provider_ref    text,
    amount_minor    bigint NOT NULL,
    currency        text NOT NULL,
    detail          text,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    captured_minor  bigint NOT NULL DEFAULT 0,
    refunded_minor  bigint NOT NULL DEFAULT 0,
    -- What a customer's browser needs to finish 3-D Secure (`requires_action`).
    client_secret   text,
    CONSTRAINT payments_refunds_within_capture CHECK (refunded_minor <= captured_minor)
);

-- At most one message per order per kind (invariant I8): recorded before sending, marked after.
CREATE TABLE IF NOT EXISTS notifications (
    order_id   uuid NOT NULL,
    kind       text NOT NULL,
    state      text NOT NULL CHECK (state IN ('sending', 'sent')),
    recipient  text NOT NULL,
    message_id text,
    attempts   integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL,
    sent_at    timestamptz,
    PRIMARY KEY (order_id, kind)
);

-- Calls per idempotency key for tokens that misbehave a set number of times (tok_flaky).
CREATE TABLE IF NOT EXISTS sandbox_attempts (
    idempotency_key text PRIMARY KEY,
    calls           integer NOT NULL
);
