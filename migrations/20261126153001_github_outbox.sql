-- The outbox of GitHub API calls (webhook/src/outbox.rs). A call is enqueued in the same transaction as
-- the state change that needs it (the apply that makes a commit status, the plan that makes a PR
-- comment), so it is never lost nor made for a change that rolled back; a worker delivers it later.
--
-- Life of a call:
--   pending --claimed: attempts + 1, next_attempt_at = now + lease--> (HTTP call) --> done
--           |--retryable failure--> pending, next_attempt_at = now + backoff with jitter
--           |--rate limited--> pending until the limit resets (the attempt is given back)
--           '--permanent failure, or attempts used up--> dead (kept, with last_error)
--
-- While a call is in flight its `next_attempt_at` is its lease expiry, so nobody else claims it; a
-- worker killed mid-call leaves it to be claimed again when the lease ends (GitHub calls are made
-- idempotent by the client: a PR comment is found by its marker before one is created).
--
-- Coalescing: at most one *pending* row per `coalesce_key`. Enqueueing with the key of a pending row
-- replaces its payload and bumps `version` (a later plan supersedes an undelivered earlier one; a
-- later commit status for the same sha and context replaces the earlier one). A worker that delivered
-- an older version leaves the row pending for the newer one.

CREATE TABLE github_outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind            text NOT NULL CHECK (kind IN ('create_status', 'upsert_pr_comment')),
    -- owner/name
    repo            text NOT NULL CHECK (repo ~ '^[^/\s]+/[^/\s]+$'),
    payload         jsonb NOT NULL,
    -- e.g. "comment:owner/name#12", "status:owner/name@<sha>:cairn/apply"; NULL never coalesces.
    coalesce_key    text CHECK (coalesce_key <> ''),
    version         integer NOT NULL DEFAULT 1 CHECK (version >= 1),
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'dead')),
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    CONSTRAINT github_outbox_finished CHECK ((status = 'pending') = (finished_at IS NULL))
);

CREATE UNIQUE INDEX github_outbox_coalesce ON github_outbox (coalesce_key) WHERE status = 'pending';
CREATE INDEX github_outbox_due ON github_outbox (next_attempt_at, id) WHERE status = 'pending';
CREATE INDEX github_outbox_finished_at ON github_outbox (finished_at) WHERE status <> 'pending';

-- The one plan comment Cairn keeps on each pull request, once its id is known: later plans update it
-- in place without listing the PR's comments.
CREATE TABLE github_pr_comments (
    repo        text NOT NULL,
    pr          bigint NOT NULL CHECK (pr > 0),
    comment_id  bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (repo, pr)
);

-- Wakes the outbox worker at commit (NOTIFY is transactional: a rolled-back enqueue wakes nobody).
CREATE FUNCTION github_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cairn_github_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER github_outbox_notify
    AFTER INSERT ON github_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION github_outbox_notify();
