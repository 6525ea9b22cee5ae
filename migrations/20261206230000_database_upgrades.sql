-- Issue 18: version upgrades of managed databases, and explicit drops.
--
-- A `version` change is a dump and restore into a new instance beside the old one on the database's
-- node: a row per upgrade, written with its `db_upgrade` task in the apply's transaction and filled by
-- the task's result. On success the database points at `to_instance` and `from_instance` is stopped,
-- its data kept: the pre-upgrade instance, until `cairn db finish-upgrade` drops it (`finished`).
-- `detail` is what the agent compared (row counts); `error` one line without secrets.
CREATE TABLE database_upgrades (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    database       text NOT NULL,
    node           text NOT NULL,
    from_instance  text NOT NULL,
    from_version   text NOT NULL,
    to_instance    text NOT NULL,
    to_version     text NOT NULL,
    state          text NOT NULL DEFAULT 'queued'
                   CHECK (state IN ('queued', 'running', 'ok', 'failed', 'finished')),
    detail         text,
    error          text,
    task           bigint,
    queued_at      timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);
CREATE INDEX database_upgrades_by_database ON database_upgrades (database, id DESC);
CREATE INDEX database_upgrades_by_task ON database_upgrades (task);
