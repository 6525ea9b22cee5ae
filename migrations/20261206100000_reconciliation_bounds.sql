-- A failed reconcile stores a bounded summary, once: the first errors (`errors`, at most a few dozen)
-- and how many there were (`errors_total`); the same commit failing the same way again (every interval
-- while it is the head) bumps `repeats` and `last_at` on that row instead of adding one. `errors_digest`
-- (sha256 of every error, not only those stored) tells "the same way". Old rows: NULL total (all stored),
-- one repeat. Failed and no-op rows older than the log retention are pruned by `cairn serve`; applied rows
-- are kept (the controller asks them whether a commit was applied before).
ALTER TABLE reconciliations
    ADD COLUMN errors_total  integer CHECK (errors_total >= 0),
    ADD COLUMN errors_digest text,
    ADD COLUMN repeats       integer NOT NULL DEFAULT 1 CHECK (repeats >= 1),
    ADD COLUMN last_at       timestamptz;
CREATE INDEX reconciliations_prunable ON reconciliations (finished_at) WHERE status <> 'applied';
