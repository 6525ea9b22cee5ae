-- Issue 18: verification restores, version upgrades and explicit drops of managed databases.
--
-- A backup records the row counts of the database it dumped (`counts`: table or key space -> rows,
-- taken before and after the dump; NULL when they differed, the database changing under the dump).
-- A verification restores a backup into a scratch server on the database's node and compares its
-- counts with those: a row per run in `database_verifications`, queued on the database's `verify`
-- schedule (`database_schedules.verify`, `verify_next_at`) or by `cairn db verify NAME`.
ALTER TABLE database_backups ADD COLUMN counts jsonb;

CREATE TABLE database_verifications (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    database     text NOT NULL,
    backup       bigint NOT NULL,
    node         text NOT NULL,
    trigger      text NOT NULL CHECK (trigger IN ('schedule', 'manual')),
    state        text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'ok', 'failed')),
    -- What the scratch restore held (table -> rows), when it got that far.
    counts       jsonb,
    duration_ms  bigint CHECK (duration_ms >= 0),
    error        text,
    task         bigint,
    queued_at    timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX database_verifications_by_database ON database_verifications (database, id DESC);

ALTER TABLE database_schedules
    ADD COLUMN verify text,
    ADD COLUMN verify_next_at timestamptz;

ALTER TABLE tasks DROP CONSTRAINT tasks_kind_check;
ALTER TABLE tasks ADD CONSTRAINT tasks_kind_check CHECK (kind IN (
    'deploy', 'stop', 'start', 'restart', 'remove', 'db_ensure', 'db_stop', 'db_backup', 'db_restore',
    'db_verify', 'db_upgrade', 'db_drop'
));
