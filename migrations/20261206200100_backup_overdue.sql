-- A database whose backups are overdue (none good within two of its schedule's intervals, counted from
-- the last good one, or from when the schedule was declared while none succeeded) is a
-- `database.backup_overdue` event once per recovery point (reconciler/src/databases.rs,
-- `announce_overdue`).
ALTER TABLE database_schedules
    ADD COLUMN since timestamptz NOT NULL DEFAULT now(),
    -- The recovery point last announced as overdue: the last good backup's finish, '' for none yet.
    ADD COLUMN overdue_announced text;
