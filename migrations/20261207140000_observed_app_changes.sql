-- Which apps a change touched, so that a reconcile reads again only those apps' rows of the observed
-- state (`store::state::KeptObserved`) instead of all of it: at 100,000 apps the whole read is seconds.
--
-- The tables keyed by app (`apps`, `placements`, `releases`, `source_heads`, `restart_requests`) now
-- mark the apps a statement touched here, one row per app and transaction, instead of the table-wide
-- mark in `observed_changes`; a statement that touched more than 1,000 rows leaves the mark `*` (every
-- app) instead: after a cold apply, reading every app again is cheaper than 100,000 marks. The other
-- planner tables keep their table-wide marks in `observed_changes`, and a reconcile that plans reads
-- them whole every time (they grow with the nodes, not the apps).
--
-- `observed_consumptions` counts the apply transactions that consumed the marks. A control plane that
-- keeps the observed state between reconciles knows the count it consumed last; any other count means
-- somebody else (another replica, `cairn apply`) consumed marks it never saw, and it reads everything.
CREATE TABLE observed_app_changes (
    app  text NOT NULL,
    xid  xid8 NOT NULL,
    PRIMARY KEY (app, xid)
);

CREATE TABLE observed_consumptions (
    id     boolean PRIMARY KEY DEFAULT true CHECK (id),
    count  bigint NOT NULL
);
INSERT INTO observed_consumptions (count) VALUES (0);

-- Statement level: marks each app the statement touched (`TG_ARGV[0]` names the table's app column), or
-- `*` (not an app name) when it touched more than 1,000 rows.
CREATE FUNCTION cairn_mark_observed_apps() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT count(*) FROM (SELECT 1 FROM changed LIMIT 1001) AS c) > 1000 THEN
        INSERT INTO observed_app_changes (app, xid) VALUES ('*', pg_current_xact_id())
            ON CONFLICT DO NOTHING;
    ELSE
        EXECUTE format('INSERT INTO observed_app_changes (app, xid)
                        SELECT DISTINCT %I, pg_current_xact_id() FROM changed
                        ON CONFLICT DO NOTHING', TG_ARGV[0]);
    END IF;
    RETURN NULL;
END $$;

-- Row level, for `releases` updates whose WHEN already decided that the planner reads the change.
CREATE FUNCTION cairn_mark_observed_app_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO observed_app_changes (app, xid) VALUES (NEW.app, pg_current_xact_id())
        ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;

DO $$
DECLARE
    t text;
    col text;
BEGIN
    FOREACH t IN ARRAY ARRAY['apps', 'placements', 'releases', 'source_heads', 'restart_requests']
    LOOP
        col := CASE t WHEN 'apps' THEN 'name' ELSE 'app' END;
        EXECUTE format('DROP TRIGGER %I ON %I', t || '_observed_insert', t);
        EXECUTE format('DROP TRIGGER %I ON %I', t || '_observed_delete', t);
        EXECUTE format('CREATE TRIGGER %I AFTER INSERT ON %I REFERENCING NEW TABLE AS changed
                        FOR EACH STATEMENT EXECUTE FUNCTION cairn_mark_observed_apps(%L)',
                       t || '_observed_insert', t, col);
        EXECUTE format('CREATE TRIGGER %I AFTER DELETE ON %I REFERENCING OLD TABLE AS changed
                        FOR EACH STATEMENT EXECUTE FUNCTION cairn_mark_observed_apps(%L)',
                       t || '_observed_delete', t, col);
        IF t <> 'releases' THEN
            EXECUTE format('DROP TRIGGER %I ON %I', t || '_observed_update', t);
            EXECUTE format('CREATE TRIGGER %I AFTER UPDATE ON %I REFERENCING NEW TABLE AS changed
                            FOR EACH STATEMENT EXECUTE FUNCTION cairn_mark_observed_apps(%L)',
                           t || '_observed_update', t, col);
        END IF;
    END LOOP;
END $$;

DROP TRIGGER releases_observed_update ON releases;
CREATE TRIGGER releases_observed_update AFTER UPDATE ON releases FOR EACH ROW
    WHEN ((OLD.app, OLD.number, OLD.config_commit, OLD.source_commit, OLD.spec_hash, OLD.status)
          IS DISTINCT FROM
          (NEW.app, NEW.number, NEW.config_commit, NEW.source_commit, NEW.spec_hash, NEW.status))
    EXECUTE FUNCTION cairn_mark_observed_app_row();
