-- The webhook claim walks an endpoint's due deliveries in position order, and counts its leased
-- ones, without reading every pending row (a backlog of 50,000 fell to ~1 delivery/s without them).
CREATE INDEX webhook_deliveries_pending_position ON webhook_deliveries (endpoint_id, position, id) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_pending_lease ON webhook_deliveries (endpoint_id, lease_expires_at) WHERE state = 'pending';
