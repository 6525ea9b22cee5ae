-- Issue 17: notification sinks declared in git (`[notify.NAME]`) and the outbox that delivers events to
-- them.
--
-- `notify_sinks` is applied state like `apps`: written by the apply that creates, changes or deletes a
-- sink. Its URL and signing secret are the manifest's age ciphertexts (sealed to the repository's
-- recipients, the control plane's among them): a dump of the database holds no sink URL in plaintext.
-- `spec` is the sink as the planner compares it (digests of the ciphertexts, never a plaintext).
CREATE TABLE notify_sinks (
    name            text PRIMARY KEY CHECK (name ~ '^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$'),
    kind            text NOT NULL CHECK (kind IN ('webhook', 'slack', 'discord')),
    url_sealed      text NOT NULL CHECK (url_sealed LIKE '%-----BEGIN AGE ENCRYPTED FILE-----%'),
    signing_sealed  text CHECK (signing_sealed LIKE '%-----BEGIN AGE ENCRYPTED FILE-----%'),
    spec            jsonb NOT NULL,
    generation      bigint NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- One row per (event, sink) the sink wants, inserted in the event's transaction: the outbox of
-- notifications and, kept after delivery, the ledger `cairn notify deliveries` reads. Its life is the
-- GitHub outbox's (`github_outbox`, and the same statements in webhook/src/store.rs run on both):
--   pending --claimed: attempts + 1, next_attempt_at = lease expiry--> POST --> done (status code, latency)
--           |--failure--> pending, next_attempt_at = now + backoff with jitter
--           '--refused for good (4xx but 408/429), or retried past the window--> dead (with last_error)
-- and one more end: `suppressed`, written at insert time, for an event the sink wanted but will not get
-- (its hourly limit reached, a flapping node summarised): `last_error` says why, so every event that was
-- not sent has a reason.
--
-- `webhook_id` is the Standard Webhooks `webhook-id`, the same on every retry so receivers de-duplicate.
-- `version` is always 1 here (notifications never coalesce); it exists for the shared statements.
CREATE TABLE notify_outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        bigint NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    sink            text NOT NULL,
    webhook_id      text NOT NULL UNIQUE,
    version         integer NOT NULL DEFAULT 1 CHECK (version >= 1),
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'done', 'dead', 'suppressed')),
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    -- The receiver's last answer and how long it took.
    status_code     integer,
    latency_ms      integer,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    CONSTRAINT notify_outbox_finished CHECK ((status = 'pending') = (finished_at IS NULL)),
    UNIQUE (event_id, sink)
);

CREATE INDEX notify_outbox_due ON notify_outbox (next_attempt_at, id) WHERE status = 'pending';
CREATE INDEX notify_outbox_finished_at ON notify_outbox (finished_at) WHERE status <> 'pending';
-- The hourly limit counts a sink's recent rows.
CREATE INDEX notify_outbox_sink_created ON notify_outbox (sink, created_at);

-- Wakes the delivery worker at commit (NOTIFY is transactional: a rolled-back event wakes nobody).
CREATE FUNCTION notify_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cairn_notify_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER notify_outbox_notify
    AFTER INSERT ON notify_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION notify_outbox_notify();
