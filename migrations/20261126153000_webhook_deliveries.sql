-- GitHub webhook deliveries (webhook/src/receiver.rs writes them, webhook/src/deliveries.rs
-- processes them).
-- One row per `X-GitHub-Delivery` id, written only once the `X-Hub-Signature-256` verified: a row is
-- proof that GitHub sent it. The receiver only records and wakes the worker; the worker classifies the
-- stored payload and calls the reconciler from this durable record, so a crash between answering GitHub
-- and acting loses nothing.
--
-- Life of a delivery:
--   received --worker--> handled (what it caused, in `outcome`)
--            |--------> ignored  (why, in `outcome`: a tag push, a branch nobody follows, ...)
--            '--handler fails--> received again after a backoff --...--> failed (attempts used up)
--
-- A redelivery of the same id (GitHub's "Redeliver" button, or a retry after a timeout) hits the primary
-- key and has no second effect. Finished rows are pruned after the retention period.

CREATE TABLE webhook_deliveries (
    delivery_id     text PRIMARY KEY CHECK (length(delivery_id) BETWEEN 1 AND 100),
    -- `X-GitHub-Event` (push, pull_request, ping, ...) and the payload's `action`, if any.
    event           text NOT NULL CHECK (event <> ''),
    action          text,
    received_at     timestamptz NOT NULL DEFAULT now(),
    -- The signature-verified body as GitHub sent it (NUL characters, which jsonb cannot hold, replaced
    -- by U+FFFD). Webhook payloads carry no secrets.
    payload         jsonb NOT NULL,
    status          text NOT NULL DEFAULT 'received'
                    CHECK (status IN ('received', 'handled', 'ignored', 'failed')),
    -- What the delivery caused, or why it was ignored, or the last error: shown by `cairn webhooks`.
    outcome         text,
    -- Times the worker tried it and failed; it is not tried before `next_attempt_at`.
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    handled_at      timestamptz,
    CONSTRAINT webhook_deliveries_finished CHECK ((status = 'received') = (handled_at IS NULL))
);

-- "What is there to do, oldest first" for the worker (which skips those waiting for a retry).
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (received_at, delivery_id)
    WHERE status = 'received';
-- Recent deliveries for `cairn webhooks`, and retention.
CREATE INDEX webhook_deliveries_received_at ON webhook_deliveries (received_at);
