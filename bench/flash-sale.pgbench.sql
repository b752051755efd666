-- The naive flash-sale baseline (issue 11, target 3): every client sells one unit of the SAME
-- product row with a conditional single-row UPDATE, one statement per transaction (pgbench's
-- autocommit), so each sale holds the row lock until its own commit is flushed and all clients
-- queue on that one row. Nothing else of a checkout (no order, no idempotency record): the rate
-- of the hot row alone, which the service's flash sale is compared with.
--
-- Needs the variable `pid`, the product's id (pgbench -D pid=<uuid>), in a scratch database with
-- the service's schema (`orderflow migrate`) and one product seeded by bench/pgbench-setup.sql
-- (-v products=1 -v stock=<units>). Driver: bench/compare.sh flash, e.g.
--   pgbench -n -M prepared -c 64 -j 2 -t 313 -D pid=$(psql -Atc 'SELECT id FROM products' DB) \
--       -f bench/flash-sale.pgbench.sql DB
-- With -t, clients x transactions >= units: the run sells out exactly (the last few find no stock
-- and update nothing).

UPDATE products SET reserved = reserved + 1 WHERE id = :pid AND on_hand - reserved >= 1;
