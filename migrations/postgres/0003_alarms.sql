-- Alarm states. One row per alarm; a transition is a conditional UPDATE of its row, so when several
-- processes evaluate the same condition exactly one records (and announces) the change.
CREATE TABLE alarm_state (
    alarm      text PRIMARY KEY,
    firing     boolean NOT NULL DEFAULT false,
    detail     text,
    changed_at timestamptz NOT NULL
);
-- "Orders stuck unpaid/unfulfilled" reads only the open orders.
CREATE INDEX orders_open ON orders (status, updated_at) WHERE status IN ('pending_payment', 'paid');
