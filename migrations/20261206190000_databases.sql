-- Issue 18: managed databases declared in git (`[database.NAME]`), their server instances, their
-- credentials and the backups ledger.
--
-- `databases` is applied state like `apps`: written by the apply that creates, moves or deletes one.
-- `spec` is the database as the planner compares it (`cairn_plan::observed::AppliedDatabase`: S3 keys
-- as digests of their ciphertexts); `backup_sealed` is the manifest's `backup` with its keys as the
-- repository's age ciphertexts. `node` and `port` are where its current instance runs (placed once, then
-- sticky); `instance` is the one attached apps are pointed at (a `cairn db swap` changes it);
-- `credential` counts rotations. Together they are what an attached app's URL stands for.
CREATE TABLE databases (
    name            text PRIMARY KEY CHECK (name ~ '^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$'),
    spec            jsonb NOT NULL,
    backup_sealed   jsonb,
    node            text NOT NULL,
    port            integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    instance        text NOT NULL,
    credential      bigint NOT NULL DEFAULT 0 CHECK (credential >= 0),
    generation      bigint NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Every server instance a database has had: its own (named like it), each restore's `--into NEW`, and
-- the one a move started on another node. A row outlives its database's manifest: data is dropped only
-- explicitly. The login's password is stored only as age ciphertext to the control plane's recipient
-- (like certificate keys); the previous one (a rotation's) until the attached apps have redeployed.
CREATE TABLE database_instances (
    name             text PRIMARY KEY CHECK (name ~ '^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$'),
    database         text NOT NULL,
    engine           text NOT NULL CHECK (engine IN ('postgres', 'redis', 'mariadb')),
    version          text NOT NULL,
    node             text NOT NULL,
    port             integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    state            text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'stopped', 'dropped')),
    login_user       text NOT NULL,
    login_db         text NOT NULL,
    password_sealed  text CHECK (password_sealed LIKE '%-----BEGIN AGE ENCRYPTED FILE-----%'),
    retired_users    text[] NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (node, port)
);
CREATE INDEX database_instances_database ON database_instances (database);

-- The backups ledger: a row per run, written when it is queued and filled by its task's result. A
-- scheduled run is claimed by one control plane (`FOR UPDATE SKIP LOCKED` on `database_schedules`), so
-- several never run one twice. `error` is one line without secrets (the agent's contract).
CREATE TABLE database_backups (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    database     text NOT NULL,
    instance     text NOT NULL,
    node         text NOT NULL,
    trigger      text NOT NULL CHECK (trigger IN ('schedule', 'manual', 'verify')),
    state        text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'ok', 'failed')),
    target       text NOT NULL,
    object       text NOT NULL,
    bytes        bigint CHECK (bytes >= 0),
    sha256       text CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    duration_ms  bigint CHECK (duration_ms >= 0),
    error        text,
    task         bigint,
    queued_at    timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    CONSTRAINT ok_has_checksum CHECK (state <> 'ok' OR (sha256 IS NOT NULL AND bytes IS NOT NULL))
);
CREATE INDEX database_backups_by_database ON database_backups (database, id DESC);

-- When each database's next scheduled backup is due: the backup worker claims due rows with
-- `FOR UPDATE SKIP LOCKED`, queues the run and moves `next_at` on in the same transaction.
CREATE TABLE database_schedules (
    database  text PRIMARY KEY,
    schedule  text NOT NULL,
    next_at   timestamptz NOT NULL
);

ALTER TABLE tasks DROP CONSTRAINT tasks_kind_check;
ALTER TABLE tasks ADD CONSTRAINT tasks_kind_check CHECK (kind IN (
    'deploy', 'stop', 'start', 'restart', 'remove', 'db_ensure', 'db_stop', 'db_backup', 'db_restore'
));

-- The planner reads `databases` (and the last good backup): a change there is a change mark, as for
-- the other planner tables (`observed_changes`).
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['databases', 'database_backups']
    LOOP
        EXECUTE format('CREATE TRIGGER %I AFTER INSERT ON %I REFERENCING NEW TABLE AS changed
                        FOR EACH STATEMENT EXECUTE FUNCTION cairn_mark_observed_statement()',
                       t || '_observed_insert', t);
        EXECUTE format('CREATE TRIGGER %I AFTER UPDATE ON %I REFERENCING NEW TABLE AS changed
                        FOR EACH STATEMENT EXECUTE FUNCTION cairn_mark_observed_statement()',
                       t || '_observed_update', t);
        EXECUTE format('CREATE TRIGGER %I AFTER DELETE ON %I REFERENCING OLD TABLE AS changed
                        FOR EACH STATEMENT EXECUTE FUNCTION cairn_mark_observed_statement()',
                       t || '_observed_delete', t);
    END LOOP;
END $$;
