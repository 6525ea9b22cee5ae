-- What the replicas print (stdout, stderr), shipped by their agents (`POST /agent/v1/replica-logs`), for
-- `cairn logs APP [--follow]`: a recent window per app, not an archive. The agent API stores a line only
-- for a replica slot placed on the node that sends it; `cairn serve --log-retention` prunes lines older
-- than the retention and trims each app to its newest lines (reconciler/src/store/releases.rs).
CREATE TABLE replica_logs (
    -- Also the follow cursor: a client asks for the lines after the last id it saw.
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    app          text NOT NULL CHECK (app ~ '^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$'),
    slot         integer NOT NULL CHECK (slot >= 1),
    release      bigint NOT NULL CHECK (release > 0),
    node         text NOT NULL,
    stream       text NOT NULL CHECK (stream IN ('stdout', 'stderr', 'agent')),
    line         text NOT NULL,
    -- When the replica printed it (the agent's clock), and when the control plane got it (the retention
    -- goes by this one).
    at           timestamptz NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX replica_logs_app ON replica_logs (app, id);
CREATE INDEX replica_logs_received_at ON replica_logs (received_at);

-- Build output (task_logs) is pruned by age too.
CREATE INDEX task_logs_at ON task_logs (at);
