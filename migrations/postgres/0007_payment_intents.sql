-- Payments in the PaymentIntents model: authorized at checkout, captured when the goods leave (or
-- at once), voided when cancelled before capture, refunded in parts. Amounts kept exact per stage.
ALTER TABLE payments DROP CONSTRAINT payments_state_check;
ALTER TABLE payments ADD CONSTRAINT payments_state_check CHECK (state IN ('requires_action', 'authorized',
    'captured', 'voided', 'declined', 'partially_refunded', 'refunded'));
ALTER TABLE payments ADD COLUMN captured_minor bigint NOT NULL DEFAULT 0;
ALTER TABLE payments ADD COLUMN refunded_minor bigint NOT NULL DEFAULT 0;
-- What a customer's browser needs to finish 3-D Secure (`requires_action`).
ALTER TABLE payments ADD COLUMN client_secret text;
UPDATE payments SET captured_minor = amount_minor WHERE state IN ('captured', 'refunded');
UPDATE payments SET refunded_minor = amount_minor WHERE state = 'refunded';
ALTER TABLE payments ADD CONSTRAINT payments_refunds_within_capture CHECK (refunded_minor <= captured_minor);
