-- Issue 16 (metrics and rollups at 100,000 apps): the month-to-date usage gauge summed every hourly row of
-- the month on each `/metrics` scrape (about 100,000 rows per hour at 100,000 single-replica apps: 72
-- million at a month's end), and every rollup pass found the months to close by reading every hourly
-- row ever written. Each hour's total is now kept beside its rows, by triggers on `usage_hours` (so any
-- writer keeps it true, an older control plane's rollup during a rolling upgrade too): one row per hour
-- instead of one per replica slot.
CREATE TABLE usage_hour_totals (
    hour       timestamptz PRIMARY KEY CHECK (date_trunc('hour', hour) = hour),
    -- The sum of the hour's `usage_hours.numerator`, and how many rows it sums (a total of no rows is
    -- removed).
    numerator  numeric NOT NULL,
    rows       bigint NOT NULL CHECK (rows > 0)
);

-- Statement-level, over the transition tables: a rollup's insert of 100,000 rows updates its hour's total
-- once, not 100,000 times.
CREATE FUNCTION usage_hour_totals_track() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        -- An hour whose every row went has no total; the others lose what went.
        DELETE FROM usage_hour_totals t
        USING (SELECT hour, count(*) AS rows FROM gone GROUP BY hour) d
        WHERE t.hour = d.hour AND t.rows <= d.rows;
        UPDATE usage_hour_totals t
        SET numerator = t.numerator - d.numerator, rows = t.rows - d.rows
        FROM (SELECT hour, sum(numerator) AS numerator, count(*) AS rows FROM gone GROUP BY hour) d
        WHERE t.hour = d.hour;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO usage_hour_totals AS t (hour, numerator, rows)
        SELECT hour, sum(numerator), count(*) FROM added GROUP BY hour
        ON CONFLICT (hour) DO UPDATE
        SET numerator = t.numerator + EXCLUDED.numerator, rows = t.rows + EXCLUDED.rows;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER usage_hours_inserted AFTER INSERT ON usage_hours
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION usage_hour_totals_track();
CREATE TRIGGER usage_hours_deleted AFTER DELETE ON usage_hours
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION usage_hour_totals_track();
CREATE TRIGGER usage_hours_updated AFTER UPDATE ON usage_hours
    REFERENCING OLD TABLE AS gone NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION usage_hour_totals_track();

-- The hours already rolled up (this migration's transaction holds the table, so none is missed).
LOCK TABLE usage_hours IN SHARE MODE;
INSERT INTO usage_hour_totals (hour, numerator, rows)
SELECT hour, sum(numerator), count(*) FROM usage_hours GROUP BY hour;
