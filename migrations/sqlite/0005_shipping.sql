-- (SQLite) Where an order ships: the domain ShippingAddress as one JSON object, NULL when the
-- order was placed without an address (every order before this migration). See the PostgreSQL
-- migration of the same number.
ALTER TABLE orders ADD COLUMN shipping TEXT
    CONSTRAINT orders_shipping_is_an_object CHECK (shipping IS NULL OR json_type(shipping) = 'object');
