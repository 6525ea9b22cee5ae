-- What is known about the world besides the repository: agents, source branches, releases and where
-- each replica is meant to run.

-- What a node's agent reports. A declared node without a row is pending (never joined); the agent API
-- writes the row when the agent joins and on every heartbeat, and a node silent for 90 s is offline.
-- Removing the node from the repository removes its row (the agent must join again).
CREATE TABLE node_status (
    node             text PRIMARY KEY REFERENCES nodes (name) ON DELETE CASCADE,
    state            text NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'online', 'offline')),
    last_heartbeat   timestamptz,
    -- Drivers the agent found on the host (docker, process).
    drivers          text[] NOT NULL DEFAULT '{}'
                     CHECK (drivers <@ ARRAY['docker', 'process']),
    -- The age recipient the agent joined with: apps placed here get their secrets encrypted to it.
    recipient        text CHECK (recipient LIKE 'age1%'),
    -- Hash of the agent's bearer credential; the credential itself is never stored.
    credential_hash  text,
    joined_at        timestamptz,
    agent_version    text,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (state = 'pending' OR joined_at IS NOT NULL)
);

-- The commit each app's branch points at, as last observed (by polling now, by webhooks later). Not
-- tied to apps: a head is recorded for an app about to be applied, and the executor deletes the heads
-- of the apps it prunes.
CREATE TABLE source_heads (
    app          text PRIMARY KEY CHECK (app ~ '^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$'),
    -- The branch the commit was read from; a head for another branch than the app follows is stale.
    branch       text NOT NULL CHECK (branch <> ''),
    commit       text NOT NULL CHECK (commit ~ '^([0-9a-f]{40}|[0-9a-f]{64})$'),
    observed_at  timestamptz NOT NULL DEFAULT now()
);

-- Every deploy is a numbered release (per app, from 1). Releases are history: they outlive the app (no
-- foreign key), so an app deleted and declared again continues its numbering and never reuses an image
-- tag.
CREATE TABLE releases (
    app                text NOT NULL CHECK (app ~ '^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$'),
    number             bigint NOT NULL CHECK (number > 0),
    config_commit      text NOT NULL,
    config_generation  bigint NOT NULL,
    -- Usually a commit id; a tag when the app pins `rev` to one.
    source_commit      text NOT NULL CHECK (source_commit <> ''),
    -- What it runs with besides the source (`plan::ReleaseSpec`: secrets as fingerprints only), and
    -- that value's hash: a different hash means a new release.
    spec               jsonb NOT NULL,
    spec_hash          text NOT NULL,
    -- Set once built and pushed to the registry.
    image              text,
    image_digest       text CHECK (image_digest ~ '^sha256:[0-9a-f]{64}$'),
    status             text NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'building', 'built', 'deploying', 'live', 'failed',
                                         'superseded')),
    -- Milliseconds per stage of push-to-running, e.g. {"clone": 800, "build": 41000, "start": 2100}.
    stage_timings      jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(stage_timings) = 'object'),
    error              text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz,
    PRIMARY KEY (app, number)
);

ALTER TABLE apps
    ADD CONSTRAINT apps_pinned_release_fkey FOREIGN KEY (name, pinned_release)
    REFERENCES releases (app, number) DEFERRABLE INITIALLY DEFERRED;

-- Where each replica slot (1..replicas) of an app runs, at which release, and whether it should be
-- running or kept stopped (a suspended app): the scheduler's decision as applied. What the agents
-- actually run is reported separately.
CREATE TABLE placements (
    app         text NOT NULL REFERENCES apps (name) ON DELETE CASCADE,
    slot        integer NOT NULL CHECK (slot >= 1),
    -- A placement never points at an undeclared node at commit time: removing a node means moving or
    -- dropping its placements in the same transaction.
    node        text NOT NULL REFERENCES nodes (name) DEFERRABLE INITIALLY DEFERRED,
    release     bigint NOT NULL,
    state       text NOT NULL CHECK (state IN ('running', 'stopped')),
    -- The config generation that last wrote the row.
    generation  bigint NOT NULL,
    -- The app's restart_requests this replica last (re)started at.
    restart     bigint NOT NULL DEFAULT 0 CHECK (restart >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app, slot),
    FOREIGN KEY (app, release) REFERENCES releases (app, number) DEFERRABLE INITIALLY DEFERRED
);
CREATE INDEX placements_node ON placements (node);

-- `cairn restart APP` increments the app's counter; a running replica whose placements.restart is
-- lower gets a restart task. Operator state: applying a commit leaves it alone, even for a removed app.
CREATE TABLE restart_requests (
    app           text PRIMARY KEY CHECK (app ~ '^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$'),
    count         bigint NOT NULL CHECK (count > 0),
    requested_at  timestamptz NOT NULL DEFAULT now()
);
