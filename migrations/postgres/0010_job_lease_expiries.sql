-- Crashes are not failures: a job whose lease ran out because its worker died gets its attempt
-- back and counts the expiry here instead; a separate, larger limit (`--max-lease-expiries`)
-- dead-letters a poison job that kills every worker that runs it.
ALTER TABLE jobs ADD COLUMN lease_expiries integer NOT NULL DEFAULT 0;
