-- Marks of changes to what the planner reads (`store::state::load_observed`), so that a reconcile whose
-- config commit, source heads and observed state did not change can skip planning (`store::changes`).
-- Triggers write them, so no writer can forget one: a statement that changed a row of a planner table
-- leaves one mark per transaction (its `xid`). A heartbeat that only moves `last_heartbeat` (or reports
-- replicas, resources, a version) leaves none: the planner sees heartbeats only through a node's
-- liveness, which the controller re-judges itself; a release whose image or timings are recorded
-- leaves none either.
--
-- The apply transaction deletes the marks it can see before it reads the observed state (and its own
-- before it commits): a mark committed later stays for the next reconcile, so nothing is missed.
CREATE TABLE observed_changes (
    xid  xid8 PRIMARY KEY,
    at   timestamptz NOT NULL DEFAULT now()
);

-- For statement-level triggers: marks when the statement touched a row (its transition table, named
-- `changed` by every trigger below, is not empty).
CREATE FUNCTION cairn_mark_observed_statement() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM changed) THEN
        INSERT INTO observed_changes (xid) VALUES (pg_current_xact_id()) ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END $$;

-- For row-level triggers whose WHEN already decided that the row changed what the planner reads.
CREATE FUNCTION cairn_mark_observed_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO observed_changes (xid) VALUES (pg_current_xact_id()) ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;

-- The tables the planner reads whole, written mostly in bulk by the apply: statement-level triggers
-- (one check per statement, not per row; transition tables allow one event per trigger).
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['config_state', 'plans', 'runtimes', 'nodes', 'apps', 'placements',
                             'source_heads', 'restart_requests']
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

-- Releases: inserted and deleted in bulk by the apply; updated one at a time by deploys, and only a
-- status change is something the planner reads (failed, the last live one).
CREATE TRIGGER releases_observed_insert AFTER INSERT ON releases REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION cairn_mark_observed_statement();
CREATE TRIGGER releases_observed_delete AFTER DELETE ON releases REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION cairn_mark_observed_statement();
CREATE TRIGGER releases_observed_update AFTER UPDATE ON releases FOR EACH ROW
    WHEN ((OLD.app, OLD.number, OLD.config_commit, OLD.source_commit, OLD.spec_hash, OLD.status)
          IS DISTINCT FROM
          (NEW.app, NEW.number, NEW.config_commit, NEW.source_commit, NEW.spec_hash, NEW.status))
    EXECUTE FUNCTION cairn_mark_observed_row();

-- Node status: every heartbeat updates its row; only a change of state, drivers or recipient is
-- something the planner reads (the heartbeat's time counts through liveness, judged by the controller).
CREATE TRIGGER node_status_observed_insert AFTER INSERT ON node_status REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION cairn_mark_observed_statement();
CREATE TRIGGER node_status_observed_delete AFTER DELETE ON node_status REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION cairn_mark_observed_statement();
CREATE TRIGGER node_status_observed_update AFTER UPDATE ON node_status FOR EACH ROW
    WHEN ((OLD.node, OLD.state, OLD.drivers, OLD.recipient)
          IS DISTINCT FROM (NEW.node, NEW.state, NEW.drivers, NEW.recipient))
    EXECUTE FUNCTION cairn_mark_observed_row();
