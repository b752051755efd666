-- One checkout, exactly as the service commits it on PostgreSQL (src/store/postgres/mod.rs:
-- `claim_key` then `place_order_tx`), as a pgbench script: the same five round trips, the same
-- statements against the same schema, minus HTTP, JSON parsing, JWT checks and the Rust code.
--
--   1. claim the idempotency key (own transaction, synchronous_commit off for it only)
--   2. BEGIN
--   3. lock and read the stock row(s): SELECT ... ORDER BY id FOR UPDATE
--   4. one statement of data-modifying CTEs: reserve stock, insert the order, its line, its
--      event, its first job, and complete the idempotency record
--   5. COMMIT (the only WAL flush the client waits for)
--
-- Not included: the service's wake-up for job workers in other processes, a `pg_notify` it sends
-- after the commit from its own connection, coalesced (at most one in flight per process).
--
-- One line per order (the loadgen's default `--lines 1`). Where the service binds values it
-- computed in Rust (ids, timestamps, total, the stored response snapshot), this script computes
-- them in SQL: ids with gen_random_uuid() (v4; the service uses v7), `now()` for timestamps, the
-- response snapshot with json_build_object() (same shape and ~360 bytes as the service's).
--
-- Needs the variables `customers` and `products` (pgbench -D customers=50 -D products=20) and the
-- seed of bench/pgbench-setup.sql. Run with -M prepared (sqlx prepares and caches its
-- statements too). Driver: bench/raw-postgres.sh.

\set c random(1, :customers)
\set p random(1, :products)
\set k random(1, 1000000000000000)

WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true))
INSERT INTO idempotency_keys (principal, key, fingerprint, state, lock_token, created_at, updated_at)
SELECT md5('orderflow-bench-customer-' || :c::int)::uuid::text,
       'pgbench-' || :k::bigint,
       md5('fingerprint-a' || :k::bigint) || md5('fingerprint-b' || :k::bigint),
       'in_flight',
       md5('lock-' || :k::bigint)::uuid,
       now(), now()
FROM relaxed
ON CONFLICT (principal, key) DO NOTHING;

BEGIN;

SELECT id, price_minor AS price, on_hand - reserved AS available
FROM products
WHERE id = ANY (ARRAY[md5('orderflow-bench-product-' || :p::int)::uuid])
ORDER BY id FOR UPDATE
\gset

WITH ids AS MATERIALIZED (
    SELECT gen_random_uuid() AS order_id,
           md5('orderflow-bench-customer-' || :c::int)::uuid AS customer_id,
           md5('orderflow-bench-product-' || :p::int)::uuid AS product_id,
           gen_random_uuid()::text AS correlation_id,
           now() AS at),
 reserve AS (
    UPDATE products p SET reserved = p.reserved + v.quantity, version = p.version + 1, updated_at = ids.at
    FROM ids, unnest(ARRAY[ids.product_id], ARRAY[1::bigint]) AS v(id, quantity)
    WHERE p.id = v.id AND p.on_hand - p.reserved >= v.quantity RETURNING p.id),
 new_order AS (
    INSERT INTO orders (id, customer_id, status, inventory_state, currency, total_minor, payment_token,
        idempotency_principal, idempotency_key, correlation_id, created_at, updated_at)
    SELECT order_id, customer_id, 'pending_payment', 'reserved', 'USD', :price::bigint, 'tok_visa',
        customer_id::text, 'pgbench-' || :k::bigint, correlation_id, at, at
    FROM ids),
 lines AS (
    INSERT INTO order_items (order_id, product_id, line_no, quantity, unit_price_minor)
    SELECT ids.order_id, v.id, v.line_no, v.quantity, v.price
    FROM ids, unnest(ARRAY[ids.product_id], ARRAY[0], ARRAY[1::bigint], ARRAY[:price::bigint])
        AS v(id, line_no, quantity, price)),
 event AS (
    INSERT INTO order_events (id, order_id, kind, status, detail, correlation_id, created_at)
    SELECT gen_random_uuid(), order_id, 'order_placed', 'pending_payment', NULL, correlation_id, at
    FROM ids),
 job AS (
    INSERT INTO jobs (id, kind, order_id, payload, state, attempts, max_attempts, run_at,
        ready_since, correlation_id, created_at, updated_at)
    SELECT gen_random_uuid(), 'charge_payment', order_id, json_build_object('order_id', order_id)::text,
        'ready', 0, 3, at, at, correlation_id, at, at
    FROM ids),
 completed AS (
    UPDATE idempotency_keys k SET state = 'completed', order_id = ids.order_id, response_status = 202,
        response_body = json_build_object(
            'id', ids.order_id, 'customer_id', ids.customer_id, 'status', 'pending_payment',
            'currency', 'USD',
            'lines', json_build_array(json_build_object(
                'product_id', ids.product_id, 'quantity', 1, 'unit_price', :price::bigint)),
            'total', :price::bigint, 'payment_token', 'tok_visa',
            'created_at', ids.at, 'updated_at', ids.at)::text,
        lock_token = NULL, updated_at = ids.at
    FROM ids
    WHERE k.principal = ids.customer_id::text AND k.key = 'pgbench-' || :k::bigint
      AND k.lock_token = md5('lock-' || :k::bigint)::uuid AND k.state = 'in_flight'
    RETURNING 1)
SELECT (SELECT count(*) FROM reserve) AS reserved_lines, (SELECT count(*) FROM completed) AS completed
\gset

-- The service's own checks on those counts; a failed check aborts the client (pgbench reports it).
\if :reserved_lines != 1 or :completed != 1
SELECT 'bench check failed: stock not reserved or key not completed'::int;
\endif

COMMIT;
