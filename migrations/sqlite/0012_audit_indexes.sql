-- (SQLite) `orderflow audit` at scale (src/store/audit.rs): the two checks that look at each order's own rows
-- read them from covering indexes, never from the tables' heap — an order's latest timeline entry
-- (and its status) for I7, and an order's event types beside its sequence numbers for the events
-- checks. They replace the indexes they widen, so writes keep the same number of indexes; lookups
-- by (order_id, id) and (order_id, sequence) use them as before. With them the audit of 1,000,000
-- orders fits in 30 s (docs/BENCHMARKS.md, "The audit at scale").
DROP INDEX order_events_by_order;
CREATE INDEX order_events_by_order ON order_events (order_id, id, status);
DROP INDEX events_by_order;
CREATE INDEX events_by_order ON events (order_id, sequence, event_type);
