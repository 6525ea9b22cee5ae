-- The lease statement now finds the expired leases of last attempts in its one ordered walk of
-- `tasks_ready` (they are due rows like the others, met in `(run_after, id)` order and ended dead in
-- place of being leased), so `tasks_leased` (20261126155318) answers no query any more. Every lease
-- inserted an entry in it (a lease changes `run_after` and `status`, so it is never a HOT update):
-- one index fewer to write per lease.
--
-- An older control plane running beside this one during a rolling upgrade still sweeps expired last
-- attempts with a statement of its own, which without this index walks the node's due backlog through
-- `tasks_ready`: its leases are slower until it is replaced, never wrong.
DROP INDEX IF EXISTS tasks_leased;
