-- Where an order ships (API.md "Payments, fulfilment, refunds": the optional `shipping` of
-- POST /orders). One column holding the domain ShippingAddress as a JSON object — the form the
-- order view, the events and the idempotency snapshot already carry — NULL when the order was
-- placed without an address (every order before this migration). The address is read and written
-- whole with its order and never queried by field; `shipping::jsonb ->> 'country'` serves ad-hoc
-- reports. Adding a nullable column without a default rewrites nothing.
ALTER TABLE orders ADD COLUMN shipping text
    CONSTRAINT orders_shipping_is_an_object CHECK (shipping IS NULL OR jsonb_typeof(shipping::jsonb) = 'object');
