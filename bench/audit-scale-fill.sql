-- bench/audit-scale-fill.sql: fills a freshly migrated orderflow database with :orders orders as the
-- service leaves them (the rows were copied from a real run: sandbox payments, `--fulfilment auto`,
-- capture on shipment, e-mails sent, the relay having stamped every event), consistent so that
-- `orderflow audit` is clean. Used by bench/audit-scale.sh; psql variables: orders, customers.
--
-- The mix: 2% declined at payment (cancelled, stock released), 1% fulfilled then refunded in
-- full, the newest 0.05% still waiting for payment (stock reserved, their charge_payment job
-- ready), the rest fulfilled. Every order keeps its idempotency record (a retention longer than
-- the whole history: the audit's worst case). Finished jobs are kept for the newest 5% only (the
-- queue prunes finished jobs after --job-retention). Ids are time-ordered like the service's UUID
-- v7s, so an order's rows sit together in every index, as they do in production.
\set ON_ERROR_STOP on
SET synchronous_commit = off;
SET work_mem = '256MB';
-- The rows are consistent by construction: skip the per-row foreign-key triggers while loading.
SET session_replication_role = replica;

-- A v7-shaped id: 12 hex digits of `n` (the "time"), a version nibble, then `tag` and `rest`.
CREATE FUNCTION pg_temp.bench_id(n bigint, tag text, rest bigint) RETURNS uuid IMMUTABLE LANGUAGE sql AS
$$ SELECT (lpad(to_hex(n), 12, '0') || '7' || tag || lpad(to_hex(rest), 15, '0'))::uuid $$;

CREATE TEMP TABLE bench_products AS
SELECT p, pg_temp.bench_id(p, '0001', p) AS id, (500 + (p * 997) % 20000)::bigint AS price
FROM generate_series(0, 199) AS p;

INSERT INTO products (id, sku, name, description, category, price_minor, on_hand, reserved, version, created_at,
    updated_at)
SELECT id, 'BENCH-' || p, 'Product ' || p, 'A product of the audit benchmark.', 'bench', price, 0, 0, 1,
    now() - interval '90 days', now() - interval '90 days'
FROM bench_products;

INSERT INTO customers (id, email, first_name, last_name, created_at)
SELECT pg_temp.bench_id(c, '0002', c), 'customer' || c || '@example.com', 'Jane', 'Doe', now() - interval '90 days'
FROM generate_series(0, :customers - 1) AS c;

-- One row per order: who, what, when, how it ended, and where its events start in the feed.
CREATE TEMP TABLE plan AS
WITH base AS (
    SELECT g,
        pg_temp.bench_id(g, '0003', g) AS id,
        pg_temp.bench_id(g % :customers, '0002', g % :customers) AS customer_id,
        CASE WHEN g > :orders - greatest(:orders / 2000, 1) THEN 'pending_payment'
             WHEN g % 100 < 2 THEN 'cancelled'
             WHEN g % 100 = 2 THEN 'refunded'
             ELSE 'fulfilled' END AS status,
        g % 200 AS pa,
        (g % 200 + 1 + (g / 200) % 199) % 200 AS pb,
        1 + g % 3 AS qa,
        1 + (g / 7) % 2 AS qb,
        now() - interval '60 days' * (1 - g::float8 / :orders) - interval '10 minutes' AS at
    FROM generate_series(1, :orders) AS g
)
SELECT b.*, a.id AS a_id, a.price AS a_price, pb_.id AS b_id, pb_.price AS b_price,
    b.qa * a.price + b.qb * pb_.price AS total,
    CASE b.status WHEN 'pending_payment' THEN 1 WHEN 'cancelled' THEN 2 WHEN 'refunded' THEN 6 ELSE 5 END AS events,
    'pi_' || replace(b.id::text, '-', '') AS intent,
    sum(CASE b.status WHEN 'pending_payment' THEN 1 WHEN 'cancelled' THEN 2 WHEN 'refunded' THEN 6 ELSE 5 END)
        OVER (ORDER BY b.g) AS last_position
FROM base b
JOIN bench_products a ON a.p = b.pa
JOIN bench_products pb_ ON pb_.p = b.pb;
CREATE INDEX ON plan (g);
ANALYZE plan;

INSERT INTO orders (id, customer_id, status, inventory_state, currency, total_minor, payment_token,
    idempotency_principal, idempotency_key, correlation_id, created_at, updated_at, last_event_sequence, shipping)
SELECT id, customer_id, status,
    CASE status WHEN 'pending_payment' THEN 'reserved' WHEN 'cancelled' THEN 'released' ELSE 'committed' END,
    'USD', total, CASE status WHEN 'cancelled' THEN 'tok_chargeDeclined' ELSE 'tok_visa' END,
    customer_id::text, 'bench-' || g, pg_temp.bench_id(g, '0004', g)::text, at, at + interval '2 seconds', events,
    '{"name":"Jane Doe","line1":"1 Main St","line2":null,"city":"Springfield","region":"IL","postal_code":"62701","country":"US"}'
FROM plan ORDER BY g;

INSERT INTO order_items (order_id, product_id, line_no, quantity, unit_price_minor)
SELECT id, a_id, 0, qa, a_price FROM plan
UNION ALL
SELECT id, b_id, 1, qb, b_price FROM plan;

-- The timeline each ending leaves (kind, status after), as the steps write it.
CREATE TEMP TABLE timeline (status text, k int, kind text, after text);
INSERT INTO timeline VALUES
    ('pending_payment', 1, 'order_placed', 'pending_payment'),
    ('cancelled', 1, 'order_placed', 'pending_payment'),
    ('cancelled', 2, 'payment_declined', 'cancelled'),
    ('cancelled', 3, 'notification_sent', 'cancelled');
INSERT INTO timeline
SELECT s, k, kind, after FROM (VALUES ('fulfilled'), ('refunded')) AS e(s), (VALUES
    (1, 'order_placed', 'pending_payment'), (2, 'payment_authorized', 'paid'), (3, 'inventory_committed', 'paid'),
    (4, 'notification_sent', 'paid'), (5, 'payment_captured', 'fulfilled'), (6, 'fulfilled', 'fulfilled'),
    (7, 'notification_sent', 'fulfilled')) AS t(k, kind, after);
INSERT INTO timeline VALUES
    ('refunded', 8, 'refund_requested', 'fulfilled'),
    ('refunded', 9, 'payment_refunded', 'refunded');

INSERT INTO order_events (id, order_id, kind, status, detail, correlation_id, created_at)
SELECT pg_temp.bench_id(p.g, '0005', p.g * 16 + t.k), p.id, t.kind, t.after,
    CASE WHEN t.kind LIKE 'payment_%' THEN 'sandbox payment intent ' || p.intent END,
    pg_temp.bench_id(p.g, '0004', p.g)::text, p.at + (t.k - 1) * interval '100 milliseconds'
FROM plan p JOIN timeline t ON t.status = p.status
ORDER BY p.g, t.k;

-- The events out, numbered 1, 2, 3 … per order and gap-free across the feed.
CREATE TEMP TABLE outbox (status text, seq int, event_type text);
INSERT INTO outbox VALUES
    ('pending_payment', 1, 'order.placed'),
    ('cancelled', 1, 'order.placed'), ('cancelled', 2, 'order.cancelled'),
    ('refunded', 6, 'payment.refunded');
INSERT INTO outbox
SELECT s, seq, event_type FROM (VALUES ('fulfilled'), ('refunded')) AS e(s), (VALUES
    (1, 'order.placed'), (2, 'order.paid'), (3, 'order.ready_to_ship'), (4, 'payment.captured'),
    (5, 'order.fulfilled')) AS t(seq, event_type);

INSERT INTO events (id, subject, order_id, event_type, sequence, position, data, correlation_id, created_at)
SELECT pg_temp.bench_id(p.g, '0006', p.g * 16 + o.seq), 'orders/' || p.id, p.id, o.event_type, o.seq,
    p.last_position - p.events + o.seq,
    '{"order":{"correlation_id":"' || pg_temp.bench_id(p.g, '0004', p.g) || '","created_at":"'
        || to_char(p.at, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') || '","currency":"USD","customer_id":"' || p.customer_id
        || '","items":[{"line_total":' || p.qa * p.a_price / 100.0 || ',"product_id":"' || p.a_id || '","quantity":'
        || p.qa || ',"unit_price":' || p.a_price / 100.0 || '},{"line_total":' || p.qb * p.b_price / 100.0
        || ',"product_id":"' || p.b_id || '","quantity":' || p.qb || ',"unit_price":' || p.b_price / 100.0
        || '}],"order_id":"' || p.id || '","shipping":{"city":"Springfield","country":"US","line1":"1 Main St",'
        || '"line2":null,"name":"Jane Doe","postal_code":"62701","region":"IL"},"status":"' || p.status
        || '","total_amount":' || p.total / 100.0 || '}}',
    pg_temp.bench_id(p.g, '0004', p.g)::text, p.at + (o.seq - 1) * interval '100 milliseconds'
FROM plan p JOIN outbox o ON o.status = p.status
ORDER BY p.g, o.seq;
UPDATE event_counter SET last_position = (SELECT max(last_position) FROM plan);

INSERT INTO payments (order_id, provider, idempotency_key, state, provider_ref, amount_minor, currency, detail,
    created_at, updated_at, captured_minor, refunded_minor, client_secret)
SELECT id, 'sandbox', 'orderflow-charge-' || id,
    CASE status WHEN 'cancelled' THEN 'declined' WHEN 'refunded' THEN 'refunded' ELSE 'captured' END,
    CASE WHEN status <> 'cancelled' THEN intent END, total, 'USD',
    CASE WHEN status = 'cancelled' THEN 'card_declined' END, at, at + interval '1 second',
    CASE WHEN status = 'cancelled' THEN 0 ELSE total END, CASE WHEN status = 'refunded' THEN total ELSE 0 END, NULL
FROM plan WHERE status <> 'pending_payment' ORDER BY g;

INSERT INTO sandbox_intents (id, idempotency_key, payment_method, amount_minor, currency, order_id, capture_method,
    status, captured_minor, refunded_minor, decline_code, client_secret, calls, created_at, updated_at)
SELECT intent, 'orderflow-charge-' || id, CASE WHEN status = 'cancelled' THEN 'tok_chargeDeclined' ELSE 'tok_visa' END,
    total, 'USD', id::text, 'manual',
    CASE WHEN status = 'cancelled' THEN 'requires_payment_method' ELSE 'succeeded' END,
    CASE WHEN status = 'cancelled' THEN 0 ELSE total END, CASE WHEN status = 'refunded' THEN total ELSE 0 END,
    CASE WHEN status = 'cancelled' THEN 'card_declined' END, NULL, 1, at, at + interval '1 second'
FROM plan WHERE status <> 'pending_payment' ORDER BY g;

INSERT INTO refunds (id, order_id, idempotency_key, request_hash, amount_minor, reason, state, provider_ref,
    created_at, updated_at)
SELECT pg_temp.bench_id(g, '0007', g), id, 'refund-' || g, md5(id::text) || md5(g::text), total,
    'requested_by_customer', 'succeeded', 're_' || replace(id::text, '-', ''), at + interval '1 day',
    at + interval '1 day'
FROM plan WHERE status = 'refunded' ORDER BY g;
INSERT INTO sandbox_intent_refunds (id, idempotency_key, intent_id, amount_minor, reason, created_at)
SELECT 're_' || replace(id::text, '-', ''), 'orderflow-refund-' || pg_temp.bench_id(g, '0007', g), intent, total,
    'requested_by_customer', at + interval '1 day'
FROM plan WHERE status = 'refunded' ORDER BY g;

INSERT INTO notifications (order_id, kind, state, recipient, message_id, attempts, created_at, sent_at)
SELECT p.id, n.kind, 'sent', 'customer@example.com', '<' || n.kind || '.' || p.id || '@orderflow>', 1, p.at, p.at
FROM plan p JOIN (VALUES ('fulfilled', 'send_receipt'), ('fulfilled', 'send_confirmation'),
    ('refunded', 'send_receipt'), ('refunded', 'send_confirmation'), ('cancelled', 'send_cancellation'))
    AS n(status, kind) ON n.status = p.status
ORDER BY p.g;

-- Stock: a large initial stock per product, one sale row per line of every order that got its stock
-- committed; on hand follows the ledger, reserved the orders still holding a reservation.
INSERT INTO inventory_ledger (id, product_id, order_id, kind, delta, reason, created_at)
SELECT pg_temp.bench_id(p, '0008', p), id, NULL, 'initial', 1000000000, 'initial stock', now() - interval '90 days'
FROM bench_products;
INSERT INTO inventory_ledger (id, product_id, order_id, kind, delta, reason, created_at)
SELECT pg_temp.bench_id(g, '0009', g * 2 + line), product, id, 'sale', -quantity, 'order ' || id, at
FROM (SELECT g, id, at, status, 0 AS line, a_id AS product, qa AS quantity FROM plan
      UNION ALL SELECT g, id, at, status, 1, b_id, qb FROM plan) AS lines
WHERE status IN ('fulfilled', 'refunded')
ORDER BY g, line;
UPDATE products p SET on_hand = l.total FROM (SELECT product_id, sum(delta) AS total FROM inventory_ledger
    GROUP BY product_id) AS l WHERE l.product_id = p.id;
UPDATE products p SET reserved = r.total FROM (SELECT product, sum(quantity) AS total FROM
    (SELECT a_id AS product, qa AS quantity FROM plan WHERE status = 'pending_payment'
     UNION ALL SELECT b_id, qb FROM plan WHERE status = 'pending_payment') AS held GROUP BY product) AS r
    WHERE r.product = p.id;

-- Every checkout's idempotency record with its response snapshot.
INSERT INTO idempotency_keys (principal, key, fingerprint, state, lock_token, order_id, response_status,
    response_body, created_at, updated_at)
SELECT customer_id::text, 'bench-' || g, md5(g::text) || md5(id::text), 'completed', NULL, id, 202,
    '{"id":"' || id || '","customer_id":"' || customer_id || '","status":"pending_payment","currency":"USD",'
        || '"lines":[{"product_id":"' || a_id || '","quantity":' || qa || ',"unit_price":' || a_price
        || '},{"product_id":"' || b_id || '","quantity":' || qb || ',"unit_price":' || b_price || '}],"total":'
        || total || ',"payment_token":"tok_visa","shipping":{"name":"Jane Doe","line1":"1 Main St","line2":null,'
        || '"city":"Springfield","region":"IL","postal_code":"62701","country":"US"},"correlation_id":"'
        || pg_temp.bench_id(g, '0004', g) || '","created_at":"' || to_char(at, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
        || '","updated_at":"' || to_char(at, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') || '"}',
    at, at
FROM plan ORDER BY g;

-- Jobs: the waiting orders' payment step, and the finished steps of the newest 5% of orders.
INSERT INTO jobs (id, kind, order_id, payload, state, attempts, max_attempts, run_at, lease_token,
    lease_expires_at, last_error, error_history, correlation_id, created_at, updated_at, ready_since)
SELECT pg_temp.bench_id(p.g, '000a', p.g * 16 + j.n), j.kind, p.id, '{"order_id":"' || p.id || '"}',
    CASE WHEN p.status = 'pending_payment' THEN 'ready' ELSE 'succeeded' END,
    CASE WHEN p.status = 'pending_payment' THEN 0 ELSE 1 END, 3, p.at, NULL, NULL, NULL, '[]',
    pg_temp.bench_id(p.g, '0004', p.g)::text, p.at, p.at + interval '1 second', p.at
FROM plan p JOIN (VALUES
    ('pending_payment', 1, 'charge_payment'),
    ('cancelled', 1, 'charge_payment'), ('cancelled', 2, 'send_cancellation'),
    ('fulfilled', 1, 'charge_payment'), ('fulfilled', 2, 'fulfil_order'), ('fulfilled', 3, 'send_receipt'),
    ('fulfilled', 4, 'send_confirmation'),
    ('refunded', 1, 'charge_payment'), ('refunded', 2, 'fulfil_order'), ('refunded', 3, 'send_receipt'),
    ('refunded', 4, 'send_confirmation'), ('refunded', 5, 'settle_refund')) AS j(status, n, kind)
    ON j.status = p.status
WHERE p.g > :orders * 0.95
ORDER BY p.g, j.n;

SET session_replication_role = DEFAULT;
