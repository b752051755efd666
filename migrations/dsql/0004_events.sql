-- Events out (distributed-SQL profile; see 0001): every business fact as one event, written in the
-- same transaction as the fact (the outbox), then positioned and delivered by the relay
-- (src/events). `orders.last_event_sequence` is created with its table in 0001.

CREATE TABLE IF NOT EXISTS events (
    id             uuid PRIMARY KEY,           -- the CloudEvent id: the dedup key on every channel
    subject        text NOT NULL,              -- orders/<id> or webhook-endpoints/<id>
    order_id       uuid,
    event_type     text NOT NULL,              -- order.placed, order.paid, …
    sequence       bigint NOT NULL,            -- per subject: 1, 2, 3 … with no gap
    -- Global and gap-free. NULL until the relay stamps the committed event: positions are handed
    -- out in commit order, so a reader that has seen N can never later see a smaller one.
    position       bigint UNIQUE,
    data           text NOT NULL,              -- the CloudEvent `data` JSON
    correlation_id text,
    created_at     timestamptz NOT NULL,       -- the CloudEvent `time`
    UNIQUE (subject, sequence)
);

-- postgres: events_unstamped ON events (id) WHERE position IS NULL.
CREATE INDEX ASYNC IF NOT EXISTS events_unstamped ON events (position, id);
CREATE INDEX ASYNC IF NOT EXISTS events_by_order ON events (order_id, sequence);

-- The last position handed out; its row serializes stamping across processes (a conflicting
-- stamp loses at commit and is run again).
CREATE TABLE IF NOT EXISTS event_counter (
    id            integer PRIMARY KEY CHECK (id = 1),
    last_position bigint NOT NULL
);
INSERT INTO event_counter (id, last_position) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;

-- Channels that take every event in position order (NATS JetStream): how far each has been
-- acknowledged, and which relay holds it (a lease, so one process publishes at a time).
CREATE TABLE IF NOT EXISTS event_channels (
    channel           text PRIMARY KEY,
    published_through bigint NOT NULL,
    lease_token       uuid,
    lease_expires_at  timestamptz,
    updated_at        timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS webhook_endpoints (
    id                         uuid PRIMARY KEY,
    url                        text NOT NULL,
    description                text,
    enabled_events             text NOT NULL,  -- JSON array of types or prefixes (`order.*`, `*`)
    status                     text NOT NULL CHECK (status IN ('enabled', 'disabled')),
    disabled_reason            text,
    secret                     text NOT NULL,
    previous_secret            text,
    previous_secret_expires_at timestamptz,
    failing_since              timestamptz,    -- first failure since the last success
    created_at                 timestamptz NOT NULL,
    updated_at                 timestamptz NOT NULL
);

-- One row per (endpoint, event) to deliver; a replay adds new rows for the same events. Deleted
-- with their endpoint or event by the code (postgres: ON DELETE CASCADE).
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id               uuid PRIMARY KEY,
    endpoint_id      uuid NOT NULL,
    event_id         uuid NOT NULL,
    subject          text NOT NULL,
    sequence         bigint NOT NULL,
    position         bigint NOT NULL,
    state            text NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL,
    lease_token      uuid,
    lease_expires_at timestamptz,
    last_status      integer,
    last_error       text,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    delivered_at     timestamptz
);
-- postgres: partial indexes WHERE state = 'pending'.
CREATE INDEX ASYNC IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (endpoint_id, state, next_attempt_at);
CREATE INDEX ASYNC IF NOT EXISTS webhook_deliveries_pending_subject
    ON webhook_deliveries (endpoint_id, state, subject, sequence);
CREATE INDEX ASYNC IF NOT EXISTS webhook_deliveries_by_endpoint ON webhook_deliveries (endpoint_id, id);
CREATE INDEX ASYNC IF NOT EXISTS webhook_deliveries_by_event ON webhook_deliveries (event_id);

-- Every attempt, for the delivery log (deleted with its delivery by the code).
CREATE TABLE IF NOT EXISTS webhook_attempts (
    id               uuid PRIMARY KEY,
    delivery_id      uuid NOT NULL,
    attempted_at     timestamptz NOT NULL,
    status_code      integer,
    latency_ms       bigint NOT NULL,
    error            text,
    response_excerpt text
);
CREATE INDEX ASYNC IF NOT EXISTS webhook_attempts_by_delivery ON webhook_attempts (delivery_id, attempted_at);
