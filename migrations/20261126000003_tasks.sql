-- The agent task queue. Enqueued in the same transaction as the state change that implies the task;
-- leased by a node's agent with an expiring lease and a fencing token; delivered at least once.
--
-- Life of a task:
--   queued --lease--> leased --complete--> done
--                        |--fail--> failed (retried after a backoff) --lease--> leased ...
--                        |--fail, attempts used up--> dead
--                        '--lease expires--> leased again by whoever asks next, with a new token
--
-- `run_after` is the earliest time the task may be handed out: its backoff after a failure or, while
-- it is leased, the lease expiry (equal to `lease_expires_at`). One ordered index then answers "what may
-- this node take now", whichever of the two it is.

-- Fencing tokens: a fresh value for every lease, increasing, never reused.
CREATE SEQUENCE task_lease_tokens AS bigint;

CREATE TABLE tasks (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    node              text NOT NULL,
    kind              text NOT NULL CHECK (kind IN ('deploy', 'stop', 'start', 'restart', 'remove')),
    app               text NOT NULL,
    -- The replica slot it acts on, and the release it deploys or runs.
    slot              integer CHECK (slot >= 1),
    release           bigint,
    -- The config generation that emitted the task: an agent never lets an older one undo a newer one.
    generation        bigint,
    -- What the agent needs to do it. Secrets only as age ciphertexts to this node's recipient.
    payload           jsonb NOT NULL DEFAULT '{}'::jsonb,
    status            text NOT NULL DEFAULT 'queued'
                      CHECK (status IN ('queued', 'leased', 'done', 'failed', 'dead')),
    -- Leases handed out so far (including the current one).
    attempts          integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts      integer NOT NULL DEFAULT 5 CHECK (max_attempts > 0),
    -- The current (or last) lease's token; complete, fail and extend must present it.
    lease_token       bigint,
    lease_expires_at  timestamptz,
    run_after         timestamptz NOT NULL DEFAULT now(),
    last_error        text,
    -- Who emitted it and for what, e.g. "deploy:shop:0:g42": the same task is never enqueued twice.
    dedup_key         text NOT NULL UNIQUE CHECK (dedup_key <> ''),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    CONSTRAINT leased_has_lease CHECK (
        status <> 'leased'
        OR (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL AND run_after = lease_expires_at)
    ),
    CONSTRAINT finished_when_final CHECK ((status IN ('done', 'dead')) = (finished_at IS NOT NULL))
);

-- "What may node N take now, oldest first": the lease query walks this in order and stops at LIMIT.
CREATE INDEX tasks_ready ON tasks (node, run_after, id) WHERE status IN ('queued', 'failed', 'leased');
CREATE INDEX tasks_app ON tasks (app, created_at);

-- Wakes the agent API's listeners once per node per inserting statement, at commit (NOTIFY is
-- transactional: a rolled-back enqueue wakes nobody).
CREATE FUNCTION tasks_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cairn_tasks', node) FROM (SELECT DISTINCT node FROM new_tasks) AS n;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_notify
    AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS new_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION tasks_notify();
