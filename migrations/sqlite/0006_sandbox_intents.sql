-- (SQLite) The sandbox provider's books in Stripe's PaymentIntents model: authorize, capture, void,
-- refund in parts. Written in the sandbox's own transactions (it is "the other side").
CREATE TABLE sandbox_intents (
    id              TEXT PRIMARY KEY,             -- pi_…
    idempotency_key TEXT NOT NULL UNIQUE,
    payment_method  TEXT NOT NULL,
    amount_minor    INTEGER NOT NULL CHECK (amount_minor > 0),
    currency        TEXT NOT NULL,
    order_id        TEXT,                          -- metadata[order_id]
    capture_method  TEXT NOT NULL CHECK (capture_method IN ('manual', 'automatic')),
    status          TEXT NOT NULL CHECK (status IN ('requires_action', 'requires_capture', 'succeeded', 'canceled',
                                                   'requires_payment_method')),
    captured_minor  INTEGER NOT NULL DEFAULT 0,
    refunded_minor  INTEGER NOT NULL DEFAULT 0,
    decline_code    TEXT,
    client_secret   TEXT,
    calls           INTEGER NOT NULL DEFAULT 1,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    CHECK (captured_minor <= amount_minor AND refunded_minor <= captured_minor)
);
CREATE INDEX sandbox_intents_by_order ON sandbox_intents (order_id);
CREATE TABLE sandbox_intent_refunds (
    id              TEXT PRIMARY KEY,             -- re_…
    idempotency_key TEXT NOT NULL UNIQUE,
    intent_id       TEXT NOT NULL REFERENCES sandbox_intents (id),
    amount_minor    INTEGER NOT NULL CHECK (amount_minor > 0),
    reason          TEXT,
    created_at      TEXT NOT NULL
);
CREATE INDEX sandbox_intent_refunds_by_intent ON sandbox_intent_refunds (intent_id);
