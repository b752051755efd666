-- Alarm states (distributed-SQL profile; see 0001). One row per alarm; a transition is a
-- conditional UPDATE of its row, so when several processes evaluate the same condition exactly one
-- records (and announces) the change.
CREATE TABLE IF NOT EXISTS alarm_state (
    alarm      text PRIMARY KEY,
    firing     boolean NOT NULL DEFAULT false,
    detail     text,
    changed_at timestamptz NOT NULL
);
-- "Orders stuck unpaid/unfulfilled" reads only the open orders (postgres: a partial index on them).
CREATE INDEX ASYNC IF NOT EXISTS orders_open ON orders (status, updated_at);
