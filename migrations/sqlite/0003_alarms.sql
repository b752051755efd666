-- (SQLite) Alarm states. One row per alarm; a transition is a conditional UPDATE of its row, so when
-- several processes evaluate the same condition exactly one records (and announces) the change.
CREATE TABLE alarm_state (
    alarm      TEXT PRIMARY KEY,
    firing     INTEGER NOT NULL DEFAULT 0,
    detail     TEXT,
    changed_at TEXT NOT NULL
);
-- "Orders stuck unpaid/unfulfilled" reads only the open orders.
CREATE INDEX orders_open ON orders (status, updated_at) WHERE status IN ('pending_payment', 'paid');
