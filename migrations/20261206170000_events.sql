-- Issue 17: one table of what happened, written in the same transaction as its cause (an apply, a
-- release's outcome, a node going offline or coming back), so an event exists if and only if what it
-- reports committed. `cairn events` and `GET /api/v1/events` read it; it is pruned with serve's
-- `--log-retention`.
--
-- `message` is one line a person reads; `detail` holds the fields a machine reads (reason, commits,
-- diagnostics, push-to-running time). Neither ever holds a secret: the writers put in names, numbers,
-- commit ids and error text that already went to the logs and the commit statuses.
CREATE TABLE events (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    -- `deploy.failed`, `node.offline`, ...: a fixed set in code (`cairn_reconciler::events::EventKind`).
    kind      text NOT NULL CHECK (kind ~ '^[a-z]+\.[a-z_]+$'),
    severity  text NOT NULL CHECK (severity IN ('info', 'warning', 'error')),
    app       text,
    node      text,
    release   bigint CHECK (release >= 1),
    -- The source commit of a deploy, the config commit of an apply.
    commit    text,
    message   text NOT NULL CHECK (message <> ''),
    detail    jsonb NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX events_at ON events (at);
CREATE INDEX events_app ON events (app, id) WHERE app IS NOT NULL;
CREATE INDEX events_node_kind ON events (node, kind, at) WHERE node IS NOT NULL;
