-- (SQLite) Real goods and money back: shipments recorded by the warehouse (external fulfilment, in parts)
-- and refunds after delivery (in parts, with returned units restocked). Each request row carries
-- its Idempotency-Key and a hash of its body, so a retried request finds the first answer.
CREATE TABLE shipments (
    id               BLOB PRIMARY KEY,
    order_id         BLOB NOT NULL REFERENCES orders (id),
    idempotency_key  TEXT NOT NULL,
    request_hash     TEXT NOT NULL,
    carrier          TEXT NOT NULL,
    tracking_number  TEXT NOT NULL,
    tracking_url     TEXT,
    created_at       TEXT NOT NULL,
    UNIQUE (order_id, idempotency_key)
);

CREATE TABLE shipment_items (
    shipment_id BLOB NOT NULL REFERENCES shipments (id),
    product_id  BLOB NOT NULL REFERENCES products (id),
    quantity    INTEGER NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (shipment_id, product_id)
);

CREATE TABLE refunds (
    id               BLOB PRIMARY KEY,
    order_id         BLOB NOT NULL REFERENCES orders (id),
    idempotency_key  TEXT NOT NULL,
    request_hash     TEXT NOT NULL,
    amount_minor     INTEGER NOT NULL CHECK (amount_minor > 0),
    reason           TEXT NOT NULL CHECK (reason IN ('requested_by_customer', 'returned', 'damaged', 'other')),
    -- pending: the refund step has not settled it yet; succeeded: the provider refunded it.
    state            TEXT NOT NULL CHECK (state IN ('pending', 'succeeded')),
    provider_ref     TEXT,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    UNIQUE (order_id, idempotency_key)
);

-- Units that came back with a refund and went back on the shelf (`return` ledger rows).
CREATE TABLE refund_items (
    refund_id  BLOB NOT NULL REFERENCES refunds (id),
    product_id BLOB NOT NULL REFERENCES products (id),
    quantity   INTEGER NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (refund_id, product_id)
);

-- The built-in sandbox's one-step charges (the invented protocol) are gone: PaymentIntents only.
DROP TABLE IF EXISTS sandbox_refunds;
DROP TABLE IF EXISTS sandbox_charges;
