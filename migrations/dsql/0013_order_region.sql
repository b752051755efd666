-- The region (`--region`) of the process that accepted each order; NULL when it had none and for
-- orders placed before regions were recorded. Nullable, no default, no constraint (as
-- migrations/postgres/0013_order_region.sql); IF NOT EXISTS, like every statement here, so a
-- migration taken over from a process that died half-way can run it again.
ALTER TABLE orders ADD COLUMN IF NOT EXISTS region text;
