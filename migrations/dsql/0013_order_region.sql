-- The region (`--region`) of the process that accepted each order; NULL when it had none and for
-- orders placed before regions were recorded. Nullable, no default, no constraint: the same
-- statement is valid on Aurora DSQL (migrations/dsql/0013_order_region.sql).
ALTER TABLE orders ADD COLUMN region text;
