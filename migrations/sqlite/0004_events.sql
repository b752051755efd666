-- (SQLite) Events out: every business fact as one event, written in the same transaction as the fact
-- (the outbox), then positioned and delivered by the relay (src/events).

CREATE TABLE events (
    id             BLOB PRIMARY KEY,           -- the CloudEvent id: the dedup key on every channel
    subject        TEXT NOT NULL,              -- orders/<id> or webhook-endpoints/<id>
    order_id       BLOB,
    event_type     TEXT NOT NULL,              -- order.placed, order.paid, …
    sequence       INTEGER NOT NULL,            -- per subject: 1, 2, 3 … with no gap
    -- Global and gap-free. NULL until the relay stamps the committed event: positions are handed
    -- out in commit order, so a reader that has seen N can never later see a smaller one.
    position       INTEGER UNIQUE,
    data           TEXT NOT NULL,              -- the CloudEvent `data` JSON
    correlation_id TEXT,
    created_at     TEXT NOT NULL,       -- the CloudEvent `time`
    UNIQUE (subject, sequence)
);
-- The last sequence handed out per order (kept when old events are pruned, so an order's
-- numbering never restarts).
ALTER TABLE orders ADD COLUMN last_event_sequence INTEGER NOT NULL DEFAULT 0;

CREATE INDEX events_unstamped ON events (id) WHERE position IS NULL;
CREATE INDEX events_by_order ON events (order_id, sequence);

-- The last position handed out; its row lock serializes stamping across processes.
CREATE TABLE event_counter (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    last_position INTEGER NOT NULL
);
INSERT INTO event_counter (id, last_position) VALUES (1, 0);

-- Channels that take every event in position order (NATS JetStream): how far each has been
-- acknowledged, and which relay holds it (a lease, so one process publishes at a time).
CREATE TABLE event_channels (
    channel           TEXT PRIMARY KEY,
    published_through INTEGER NOT NULL,
    lease_token       BLOB,
    lease_expires_at  TEXT,
    updated_at        TEXT NOT NULL
);

CREATE TABLE webhook_endpoints (
    id                         BLOB PRIMARY KEY,
    url                        TEXT NOT NULL,
    description                TEXT,
    enabled_events             TEXT NOT NULL,  -- JSON array of types or prefixes (`order.*`, `*`)
    status                     TEXT NOT NULL CHECK (status IN ('enabled', 'disabled')),
    disabled_reason            TEXT,
    secret                     TEXT NOT NULL,
    previous_secret            TEXT,
    previous_secret_expires_at TEXT,
    failing_since              TEXT,    -- first failure since the last success
    created_at                 TEXT NOT NULL,
    updated_at                 TEXT NOT NULL
);

-- One row per (endpoint, event) to deliver; a replay adds new rows for the same events.
CREATE TABLE webhook_deliveries (
    id               BLOB PRIMARY KEY,
    endpoint_id      BLOB NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id         BLOB NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    subject          TEXT NOT NULL,
    sequence         INTEGER NOT NULL,
    position         INTEGER NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT NOT NULL,
    lease_token      BLOB,
    lease_expires_at TEXT,
    last_status      INTEGER,
    last_error       TEXT,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    delivered_at     TEXT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (endpoint_id, next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_pending_subject ON webhook_deliveries (endpoint_id, subject, sequence)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (endpoint_id, id);
CREATE INDEX webhook_deliveries_by_event ON webhook_deliveries (event_id);

-- Every attempt, for the delivery log.
CREATE TABLE webhook_attempts (
    id               BLOB PRIMARY KEY,
    delivery_id      BLOB NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempted_at     TEXT NOT NULL,
    status_code      INTEGER,
    latency_ms       INTEGER NOT NULL,
    error            TEXT,
    response_excerpt TEXT
);
CREATE INDEX webhook_attempts_by_delivery ON webhook_attempts (delivery_id, attempted_at);
