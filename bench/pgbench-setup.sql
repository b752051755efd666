-- Seed data for bench/place_order.pgbench.sql, loaded into a scratch database that already has the
-- service's own schema (bench/raw-postgres.sh creates it with `orderflow migrate`, i.e. from
-- migrations/postgres/0001_foundation.sql).
--
-- The same catalog the loadgen creates over HTTP (src/bin/loadgen.rs): `:products` products with
-- `:stock` units each (plus their 'initial' inventory-ledger rows, so `orderflow audit` holds) and
-- `:customers` customers. Ids are derived from the row number with md5() so the pgbench script
-- can address product n / customer n without a lookup.
--
-- psql variables: customers, products, stock. Example:
--   psql -v customers=50 -v products=20 -v stock=10000000 -f bench/pgbench-setup.sql orderflow_bench_raw

\set ON_ERROR_STOP on

BEGIN;

INSERT INTO products (id, sku, name, description, category, price_minor, on_hand, reserved,
                      version, created_at, updated_at)
SELECT md5('orderflow-bench-product-' || n)::uuid,
       'BENCH-' || n,
       'Bench product ' || n,
       NULL,
       'loadgen',
       (1 + (n - 1) % 50) * 100 + (n - 1) % 100,   -- the loadgen's prices: 1.00, 2.01, 3.02, ...
       :stock, 0, 1, now(), now()
FROM generate_series(1, :products) AS n;

INSERT INTO inventory_ledger (id, product_id, order_id, kind, delta, reason, created_at)
SELECT gen_random_uuid(), id, NULL, 'initial', on_hand, 'initial stock', now()
FROM products;

INSERT INTO customers (id, email, first_name, last_name, created_at)
SELECT md5('orderflow-bench-customer-' || n)::uuid,
       'bench-' || n || '@example.com',
       'Load',
       'Generator' || n,
       now()
FROM generate_series(1, :customers) AS n;

COMMIT;

-- No ANALYZE, on purpose: the service's database gets none either (the tables are new and
-- never analyzed, so the planner assumes they are non-trivial and picks index scans). An ANALYZE
-- here would record the order tables as empty, the planner would then choose sequential scans
-- on idempotency_keys/orders, and the raw rate would sink as those tables grow during the run,
-- until autovacuum's next ANALYZE (up to a minute later).
