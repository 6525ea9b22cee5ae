-- History of reconcile runs: what was read, what happened, how long it took. Written for every run,
-- including failed ones (whose errors say why, as path:line:col: message) and no-ops.
CREATE TABLE reconciliations (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The config source: a git URL or a directory.
    source       text NOT NULL,
    -- The commit read; NULL when the source could not be read at all.
    commit       text,
    -- What woke the reconciler: timer, webhook, file, manual, node.
    trigger      text NOT NULL,
    status       text NOT NULL CHECK (status IN ('applied', 'failed', 'noop')),
    -- The config generation after the run (applied: the new one).
    generation   bigint,
    -- "Plan: 2 to add, 1 to change, 0 to destroy." or the first error.
    summary      text NOT NULL,
    -- [{"path": ..., "line": ..., "col": ..., "message": ...}] for a failed run.
    errors       jsonb NOT NULL DEFAULT '[]'::jsonb CHECK (jsonb_typeof(errors) = 'array'),
    duration_ms  bigint NOT NULL CHECK (duration_ms >= 0),
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL CHECK (finished_at >= started_at),
    CHECK (status <> 'failed' OR errors <> '[]'::jsonb)
);
CREATE INDEX reconciliations_recent ON reconciliations (finished_at DESC);
