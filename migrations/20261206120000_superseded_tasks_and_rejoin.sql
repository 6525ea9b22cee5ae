-- Issue 12: the truth about releases, and nodes that cannot poison each other.
--
-- A task can end `superseded`: it was never run, and never counts as done. Either the agent skipped it
-- (its slot already holds a newer generation) or the control plane retired it (the slot moved to another
-- node, so the old node must not start it when it comes back; its lease token is refused from then on).
-- A release is live only through deploys that are `done`, so a superseded deploy never makes one live.
--
-- Expand only: an older control plane never writes `superseded`, and reads a task in that state only to
-- answer an agent that holds a lease the newer one retired (it then answers 409, as for any stale lease).
ALTER TABLE tasks DROP CONSTRAINT tasks_status_check;
ALTER TABLE tasks ADD CONSTRAINT tasks_status_check
    CHECK (status IN ('queued', 'leased', 'done', 'failed', 'dead', 'superseded'));
ALTER TABLE tasks DROP CONSTRAINT finished_when_final;
ALTER TABLE tasks ADD CONSTRAINT finished_when_final
    CHECK ((status IN ('done', 'dead', 'superseded')) = (finished_at IS NOT NULL));

-- A join token that may replace a node's live credential (`cairn node join-token NODE --replace`): the
-- join revokes the old credential. Without it, a node that holds a live credential cannot be joined
-- again (a leaked or guessed token cannot take over a running node unnoticed).
ALTER TABLE node_join_tokens ADD COLUMN replace_credential boolean NOT NULL DEFAULT false;

-- Completing a task looks for a newer generation its node already finished for the same slot (such a
-- "done" is recorded superseded): this keeps that look-up to the slot's finished tasks on the node.
CREATE INDEX tasks_slot_done ON tasks (node, app, slot, generation) WHERE status = 'done';
