-- Real goods and money back (distributed-SQL profile; see 0001): shipments recorded by the
-- warehouse (external fulfilment, in parts) and refunds after delivery (in parts, with returned
-- units restocked). Each request row carries its Idempotency-Key and a hash of its body, so a
-- retried request finds the first answer. (The sandbox tables postgres 0009 drops never existed in
-- this profile.)
CREATE TABLE IF NOT EXISTS shipments (
    id               uuid PRIMARY KEY,
    order_id         uuid NOT NULL,
    idempotency_key  text NOT NULL,
    request_hash     text NOT NULL,
    carrier          text NOT NULL,
    tracking_number  text NOT NULL,
    tracking_url     text,
    created_at       timestamptz NOT NULL,
    UNIQUE (order_id, idempotency_key)
);

CREATE TABLE IF NOT EXISTS shipment_items (
    shipment_id uuid NOT NULL,
    product_id  uuid NOT NULL,
    quantity    integer NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (shipment_id, product_id)
);

CREATE TABLE IF NOT EXISTS refunds (
    id               uuid PRIMARY KEY,
    order_id         uuid NOT NULL,
    idempotency_key  text NOT NULL,
    request_hash     text NOT NULL,
    amount_minor     bigint NOT NULL CHECK (amount_minor > 0),
    reason           text NOT NULL CHECK (reason IN ('requested_by_customer', 'returned', 'damaged', 'other')),
    -- pending: the refund step has not settled it yet; succeeded: the provider refunded it.
    state            text NOT NULL CHECK (state IN ('pending', 'succeeded')),
    provider_ref     text,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    UNIQUE (order_id, idempotency_key)
);

-- Units that came back with a refund and went back on the shelf (`return` ledger rows).
CREATE TABLE IF NOT EXISTS refund_items (
    refund_id  uuid NOT NULL,
    product_id uuid NOT NULL,
    quantity   integer NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (refund_id, product_id)
);
