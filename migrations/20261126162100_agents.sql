-- Agents and operators: join tokens, what heartbeats report, admin API tokens, and what agents say
-- about a task while they work on it (reconciler/src/store/agents.rs).
--
-- Every token and credential is stored as `sha256:<hex>` of the token: the tokens are 256 random bits,
-- so an unsalted hash is as good as a slow one and lets a request be authenticated with one indexed
-- lookup. The tokens themselves are shown once, when made, and never stored.

-- One-time join tokens (`cairn node join-token NODE`). A join consumes its token in the transaction that
-- gives the node its credential, so a token joins once; an expired or used token is refused like an
-- unknown one. Removing the node from the repository removes its tokens.
CREATE TABLE node_join_tokens (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    node        text NOT NULL REFERENCES nodes (name) ON DELETE CASCADE,
    token_hash  text NOT NULL UNIQUE CHECK (token_hash ~ '^sha256:[0-9a-f]{64}$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    CHECK (expires_at > created_at)
);
CREATE INDEX node_join_tokens_node ON node_join_tokens (node, created_at DESC);

-- The agent's credential is node_status.credential_hash (NULL before the join and after a revoke); a
-- request is authenticated by looking the hash up. What the last heartbeat reported is kept next to it:
-- what the node's replicas use and which replicas run there (`cairn_proto::ActualReplica` as JSON).
ALTER TABLE node_status
    ADD COLUMN resources    jsonb CHECK (resources IS NULL OR jsonb_typeof(resources) = 'object'),
    ADD COLUMN replicas     jsonb NOT NULL DEFAULT '[]'::jsonb CHECK (jsonb_typeof(replicas) = 'array'),
    ADD COLUMN reported_at  timestamptz,
    ADD CONSTRAINT node_status_credential_hash_format
        CHECK (credential_hash IS NULL OR credential_hash ~ '^sha256:[0-9a-f]{64}$');
CREATE UNIQUE INDEX node_status_credential ON node_status (credential_hash)
    WHERE credential_hash IS NOT NULL;

-- Admin API tokens (`cairn token create` prints one). Revoked tokens stay, for the record.
CREATE TABLE admin_tokens (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$'),
    token_hash    text NOT NULL UNIQUE CHECK (token_hash ~ '^sha256:[0-9a-f]{64}$'),
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);

-- What the agent last said it is doing with a leased task (a progress call also extends the lease).
ALTER TABLE tasks
    ADD COLUMN progress     text,
    ADD COLUMN progress_at  timestamptz;

-- Output of a task while an agent works on it (a build's, say), in order, bounded per task by the agent
-- API. Goes with its task.
CREATE TABLE task_logs (
    task    bigint NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq     integer NOT NULL CHECK (seq >= 0),
    stream  text NOT NULL CHECK (stream IN ('stdout', 'stderr', 'build', 'agent')),
    line    text NOT NULL,
    at      timestamptz NOT NULL,
    PRIMARY KEY (task, seq)
);

-- Drift checks ask for the latest task of a node's replica slot: is one still open, did the last one
-- for this release die?
CREATE INDEX tasks_slot ON tasks (node, app, slot, id);
