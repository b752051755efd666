-- The webhook claim walks an endpoint's due deliveries in position order, and counts its leased
-- ones, without reading every pending row (distributed-SQL profile; see 0001; postgres: partial
-- indexes WHERE state = 'pending').
CREATE INDEX ASYNC IF NOT EXISTS webhook_deliveries_pending_position
    ON webhook_deliveries (endpoint_id, state, position, id);
CREATE INDEX ASYNC IF NOT EXISTS webhook_deliveries_pending_lease
    ON webhook_deliveries (endpoint_id, state, lease_expires_at);
