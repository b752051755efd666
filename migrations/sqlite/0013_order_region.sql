-- (SQLite) The region (`--region`) of the process that accepted each order; NULL when it had none
-- and for orders placed before regions were recorded.
ALTER TABLE orders ADD COLUMN region TEXT;
