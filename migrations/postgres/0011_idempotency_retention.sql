-- Checkout idempotency keys are kept for --idempotency-retention (default 24 h), then forgotten
-- (src/workflow/idempotency.rs). Forgetting a key deletes its record (fingerprint and response
-- snapshot: the bulk of the storage) and clears the key on its order, in one transaction, so the
-- order itself is kept whole and `UNIQUE (idempotency_principal, idempotency_key)` keeps holding I3
-- for every key still remembered: NULLs are distinct, so forgotten keys never collide, and a
-- retry after the retention may place a new order under the same key.
ALTER TABLE orders ALTER COLUMN idempotency_key DROP NOT NULL;
-- The pruner takes the oldest records first, a bounded batch at a time.
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (updated_at);
