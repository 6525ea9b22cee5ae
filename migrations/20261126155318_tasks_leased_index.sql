-- The lease statement also retires tasks whose last allowed attempt's lease expired
-- (`status = 'leased' AND run_after <= now() AND attempts >= max_attempts`). Through `tasks_ready` that
-- condition visits every queued task of the node, so each lease cost grew with the backlog (the queue
-- benchmark fell from ~1,200 to ~600 single leases per second between 1,000 and 10,000 tasks). This
-- index holds only the leases in flight.
CREATE INDEX tasks_leased ON tasks (node, run_after) WHERE status = 'leased';
