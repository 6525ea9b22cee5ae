-- One index of tasks by app instead of two. `tasks_app (app, created_at)` answered "this app's tasks"
-- (by release, kind, status) and `tasks_slot (node, app, slot, id)` "this slot's tasks on this node";
-- no query orders by `created_at` or looks tasks up by node without the app. `tasks_app_slot (app,
-- slot, node, id)` answers both: every such query names the app, and the slot's queries name app,
-- slot and node.
--
-- A lease and a completion change `status` (and a lease `run_after`), so neither is a HOT update and
-- each wrote an entry in every index of `tasks`: one fewer now, per enqueue, lease and completion
-- (BENCHMARKS.md "Task queue").
--
-- The index is built in the migration's transaction, which holds off writes to `tasks` while it
-- builds (seconds for a million tasks); the old ones go in the same transaction.
CREATE INDEX tasks_app_slot ON tasks (app, slot, node, id);
DROP INDEX tasks_app;
DROP INDEX tasks_slot;
