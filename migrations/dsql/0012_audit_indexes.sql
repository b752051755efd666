-- `orderflow audit` at scale (distributed-SQL profile; see 0001): covering indexes for the two
-- checks that look at each order's own rows, replacing the indexes they widen.
DROP INDEX IF EXISTS order_events_by_order;
CREATE INDEX ASYNC IF NOT EXISTS order_events_by_order ON order_events (order_id, id, status);
DROP INDEX IF EXISTS events_by_order;
CREATE INDEX ASYNC IF NOT EXISTS events_by_order ON events (order_id, sequence, event_type);
