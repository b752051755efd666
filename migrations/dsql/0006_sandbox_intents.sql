-- The sandbox provider's books in Stripe's PaymentIntents model (distributed-SQL profile; see
-- 0001): authorize, capture, void, refund in parts. Written in the sandbox's own transactions (it
-- is "the other side").
CREATE TABLE IF NOT EXISTS sandbox_intents (
    id              text PRIMARY KEY,             -- pi_…
    idempotency_key text NOT NULL UNIQUE,
    payment_method  text NOT NULL,
    amount_minor    bigint NOT NULL CHECK (amount_minor > 0),
    currency        text NOT NULL,
    order_id        text,                          -- metadata[order_id]
    capture_method  text NOT NULL CHECK (capture_method IN ('manual', 'automatic')),
    status          text NOT NULL CHECK (status IN ('requires_action', 'requires_capture', 'succeeded', 'canceled',
                                                   'requires_payment_method')),
    captured_minor  bigint NOT NULL DEFAULT 0,
    refunded_minor  bigint NOT NULL DEFAULT 0,
    decline_code    text,
    client_secret   text,
    calls           integer NOT NULL DEFAULT 1,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    CHECK (captured_minor <= amount_minor AND refunded_minor <= captured_minor)
);
CREATE INDEX ASYNC IF NOT EXISTS sandbox_intents_by_order ON sandbox_intents (order_id);
CREATE TABLE IF NOT EXISTS sandbox_intent_refunds (
    id              text PRIMARY KEY,             -- re_…
    idempotency_key text NOT NULL UNIQUE,
    intent_id       text NOT NULL,
    amount_minor    bigint NOT NULL CHECK (amount_minor > 0),
    reason          text,
    created_at      timestamptz NOT NULL
);
CREATE INDEX ASYNC IF NOT EXISTS sandbox_intent_refunds_by_intent ON sandbox_intent_refunds (intent_id);
