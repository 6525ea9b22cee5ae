-- Several `cairn serve` on one database (issue 21): the lease that makes one of them the leader, and the
-- registry of the replicas that run.
--
-- The lease is one row. A replica takes it when it has expired (by the database's clock, so replicas'
-- clocks need not agree) and renews it while it holds it; each new holder raises `epoch`. The leader's
-- transactions lock the row and check that they still hold it with their epoch (`fenced_epoch` records
-- the last such write), so a deposed leader's transaction fails rather than writes.
CREATE TABLE control_plane_lease (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    holder text,
    epoch bigint NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    acquired_at timestamptz,
    renewed_at timestamptz,
    expires_at timestamptz NOT NULL DEFAULT '-infinity',
    fenced_epoch bigint NOT NULL DEFAULT 0
);
INSERT INTO control_plane_lease (id) VALUES (true);

-- Every `cairn serve` that ran: it inserts itself when it starts and moves `last_seen` with each lease
-- attempt; `cairn status` lists those seen recently. Rows of replicas gone for a day are deleted by the
-- leader.
CREATE TABLE control_plane_replicas (
    id text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 100),
    address text NOT NULL DEFAULT '' CHECK (length(address) <= 300),
    version text NOT NULL CHECK (length(version) <= 100),
    started_at timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz NOT NULL DEFAULT now()
);
