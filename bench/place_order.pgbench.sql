-- One checkout, exactly as the service commits it on PostgreSQL (src/store/postgres/mod.rs:
-- `claim_key`, then `PgCheckouts::write_orders`), as a pgbench script: the same two round trips,
-- the same statements against the same schema, minus HTTP, JSON parsing, JWT checks and the Rust
-- code.
--
--   1. claim the idempotency key and, in the same statement, read an earlier use of the key and
--      the cart's price and stock (its own transaction, synchronous_commit off for it only)
--   2. one autocommitted statement of data-modifying CTEs: lock the product row, reserve the
--      stock if it still fits at the price read in 1, insert the order, its line, its timeline
--      entry, its `order.placed` outbox event and its first job, complete the idempotency record,
--      and abort itself if a check failed (the service then re-prices under FOR UPDATE; with
--      10,000,000 units per product that never happens here). Its commit is the only WAL flush
--      the client waits for. The statement's self-checks are the service's: a failed one aborts
--      it (a marker cast to an integer), which pgbench reports. (The markers have no colon here:
--      pgbench would take `:name` inside a literal for a variable.)
--
-- Not included: the service's wake-up for job workers in other processes, a `pg_notify` it sends
-- after the commit from its own connection, coalesced (at most one in flight per process); and
-- the sharing of one write statement by checkouts waiting at the same time (the service's
-- `--checkout-batch`), which pgbench's one-transaction-per-client model cannot express.
--
-- One line per order (the loadgen's default `--lines 1`). Where the service binds values it
-- computed in Rust (ids, timestamps, total, the stored response snapshot, the event's data), this
-- script computes them in SQL: ids with gen_random_uuid() (v4; the service uses v7), `now()` for
-- timestamps, the snapshot and the event data with json_build_object() (the same shapes and about
-- the same sizes as the service's).
--
-- Needs the variables `customers` and `products` (pgbench -D customers=50 -D products=20) and the
-- seed of bench/pgbench-setup.sql. Run with -M prepared (sqlx prepares and caches its
-- statements too). Driver: bench/raw-postgres.sh.

\set c random(1, :customers)
\set p random(1, :products)
\set k random(1, 1000000000000000)

WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true)),
 claimed AS (
    INSERT INTO idempotency_keys (principal, key, fingerprint, state, lock_token, created_at, updated_at)
    SELECT md5('orderflow-bench-customer-' || :c::int)::uuid::text,
           'pgbench-' || :k::bigint,
           md5('fingerprint-a' || :k::bigint) || md5('fingerprint-b' || :k::bigint),
           'in_flight',
           md5('lock-' || :k::bigint)::uuid,
           now(), now()
    FROM relaxed
    ON CONFLICT (principal, key) DO NOTHING RETURNING 1),
 earlier AS (
    SELECT fingerprint, state, response_body, lock_token, updated_at FROM idempotency_keys
    WHERE principal = md5('orderflow-bench-customer-' || :c::int)::uuid::text AND key = 'pgbench-' || :k::bigint),
 stock AS (
    SELECT array_agg(id ORDER BY id) AS ids, array_agg(price_minor ORDER BY id) AS prices,
        array_agg(on_hand - reserved ORDER BY id) AS available
    FROM products WHERE id = ANY (ARRAY[md5('orderflow-bench-product-' || :p::int)::uuid]))
SELECT EXISTS (SELECT 1 FROM claimed) AS claimed, e.fingerprint, e.state, e.response_body, e.lock_token,
    e.updated_at, s.ids, s.prices[1] AS price, s.available[1] AS available
FROM stock s LEFT JOIN earlier e ON true
\gset

WITH ids AS MATERIALIZED (
    SELECT gen_random_uuid() AS order_id,
           gen_random_uuid() AS event_id,
           md5('orderflow-bench-customer-' || :c::int)::uuid AS customer_id,
           md5('orderflow-bench-product-' || :p::int)::uuid AS product_id,
           gen_random_uuid()::text AS correlation_id,
           now() AS at),
 locked AS MATERIALIZED (
    SELECT id FROM products WHERE id = ANY (ARRAY[(SELECT product_id FROM ids)]) ORDER BY id FOR UPDATE),
 reserve AS (
    UPDATE products p SET reserved = p.reserved + v.units, version = p.version + 1, updated_at = ids.at
    FROM ids, unnest(ARRAY[ids.product_id], ARRAY[1::bigint], ARRAY[:price::bigint]) AS v(id, units, price)
    WHERE p.id = v.id AND p.id IN (SELECT id FROM locked) AND p.on_hand - p.reserved >= v.units
        AND p.price_minor = v.price
    RETURNING p.id),
 new_order AS (
    INSERT INTO orders (id, customer_id, status, inventory_state, currency, total_minor, payment_token,
        idempotency_principal, idempotency_key, correlation_id, created_at, updated_at, last_event_sequence,
        shipping, region)
    SELECT order_id, customer_id, 'pending_payment', 'reserved', 'USD', :price::bigint, 'tok_visa',
        customer_id::text, 'pgbench-' || :k::bigint, correlation_id, at, at, 1, NULL, NULL
    FROM ids),
 lines AS (
    INSERT INTO order_items (order_id, product_id, line_no, quantity, unit_price_minor)
    SELECT ids.order_id, v.id, v.line_no, v.quantity, v.price
    FROM ids, unnest(ARRAY[ids.product_id], ARRAY[0], ARRAY[1::bigint], ARRAY[:price::bigint])
        AS v(id, line_no, quantity, price)),
 timeline AS (
    INSERT INTO order_events (id, order_id, kind, status, detail, correlation_id, created_at)
    SELECT gen_random_uuid(), order_id, 'order_placed', 'pending_payment', NULL, correlation_id, at
    FROM ids),
 outbox AS (
    INSERT INTO events (id, subject, order_id, event_type, sequence, data, correlation_id, created_at)
    SELECT event_id, 'orders/' || order_id, order_id, 'order.placed', 1,
        json_build_object(
            'order', json_build_object(
                'id', order_id, 'customer_id', customer_id, 'status', 'pending_payment', 'currency', 'USD',
                'lines', json_build_array(json_build_object(
                    'product_id', product_id, 'quantity', 1, 'unit_price', :price::bigint)),
                'total', :price::bigint, 'created_at', at, 'updated_at', at, 'region', NULL),
            'status', 'pending_payment')::text,
        correlation_id, at
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
SELECT CASE
    WHEN (SELECT count(*) FROM reserve) <> 1
        THEN ('orderflow stock_moved ' || (SELECT count(*) FROM reserve))::int
    WHEN (SELECT count(*) FROM completed) <> 1
        THEN ('orderflow claim_lost ' || (SELECT count(*) FROM completed))::int
    WHEN (SELECT count(*) FROM customers WHERE id = (SELECT customer_id FROM ids)) <> 1
        THEN ('orderflow unknown_customer ' || (SELECT count(*) FROM ids))::int
    ELSE 0 END;
