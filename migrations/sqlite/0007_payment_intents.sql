-- (SQLite) Payments in the PaymentIntents model: authorized at checkout, captured when the goods
-- leave (or at once), voided when cancelled before capture, refunded in parts. SQLite cannot alter
-- a CHECK constraint, so the table is rebuilt with its rows.
CREATE TABLE payments_v7 (
    order_id        BLOB PRIMARY KEY REFERENCES orders (id),
    provider        TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    state           TEXT NOT NULL CHECK (state IN ('requires_action', 'authorized', 'captured', 'voided',
                                                   'declined', 'partially_refunded', 'refunded')),
    provider_ref    TEXT,
    amount_minor    INTEGER NOT NULL,
    captured_minor  INTEGER NOT NULL DEFAULT 0,
    refunded_minor  INTEGER NOT NULL DEFAULT 0,
    currency        TEXT NOT NULL,
    detail          TEXT,
    -- What a customer's browser needs to finish 3-D Secure (`requires_action`).
    client_secret   TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    CHECK (refunded_minor <= captured_minor)
);
INSERT INTO payments_v7 (order_id, provider, idempotency_key, state, provider_ref, amount_minor, captured_minor,
    refunded_minor, currency, detail, created_at, updated_at)
SELECT order_id, provider, idempotency_key, state, provider_ref, amount_minor,
    CASE WHEN state IN ('captured', 'refunded') THEN amount_minor ELSE 0 END,
    CASE WHEN state = 'refunded' THEN amount_minor ELSE 0 END,
    currency, detail, created_at, updated_at FROM payments;
DROP TABLE payments;
ALTER TABLE payments_v7 RENAME TO payments;
