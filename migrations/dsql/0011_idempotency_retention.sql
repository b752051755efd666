-- Checkout idempotency keys are kept for --idempotency-retention, then forgotten
-- (distributed-SQL profile; see 0001). `orders.idempotency_key` is nullable from 0001 on.
-- The pruner takes the oldest records first, a bounded batch at a time.
CREATE INDEX ASYNC IF NOT EXISTS idempotency_keys_by_age ON idempotency_keys (updated_at);
