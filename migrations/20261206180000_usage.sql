-- Issue 20: usage metering. Intervals per replica slot, versioned plan prices, hourly rollups recomputed
-- from them, and immutable monthly statements (reconciler/src/store/usage.rs).

-- Every plan's price as applied: a row when an apply created a plan or changed its price, with the config
-- commit and generation that did it. `monthly_e4` is the monthly price of one replica in ten-thousandths of
-- the currency (a manifest price has at most four decimals, so this is exact).
CREATE TABLE plan_prices (
    plan        text NOT NULL,
    from_at     timestamptz NOT NULL,
    monthly_e4  bigint NOT NULL CHECK (monthly_e4 >= 0),
    commit      text,
    generation  bigint NOT NULL,
    PRIMARY KEY (plan, from_at)
);
-- The plans already applied are priced from now on (usage before this migration is not metered).
INSERT INTO plan_prices (plan, from_at, monthly_e4, commit, generation)
SELECT p.name, now(), (p.price * 10000)::bigint, c.commit, c.generation
FROM plans p CROSS JOIN config_state c;

-- One replica slot's time on one node under one plan: opened when a deploy (start, restart) of the slot is
-- reported done, closed when its stop or remove is reported done, or at the node's last heartbeat when
-- the node is marked offline. Times are the control plane's clock when the report arrived.
-- A close whose instant is older than the late window (48 h) closes at the window's edge instead (hours
-- older than that are final) and is flagged: `late`, with the instant it claimed in `claimed_end`.
CREATE TABLE usage_intervals (
    id           bigserial PRIMARY KEY,
    app          text NOT NULL,
    slot         integer NOT NULL CHECK (slot >= 0),
    plan         text NOT NULL,
    node         text NOT NULL,
    started_at   timestamptz NOT NULL,
    ended_at     timestamptz CHECK (ended_at >= started_at),
    opened_by    text NOT NULL,
    closed_by    text,
    claimed_end  timestamptz,
    late         boolean NOT NULL DEFAULT false,
    CHECK ((ended_at IS NULL) = (closed_by IS NULL))
);
-- One open interval per slot and node: a repeated report opens nothing.
CREATE UNIQUE INDEX usage_intervals_open ON usage_intervals (app, slot, node) WHERE ended_at IS NULL;
-- An hour's rollup reads the intervals that end after its start.
CREATE INDEX usage_intervals_end ON usage_intervals ((coalesce(ended_at, 'infinity'::timestamptz)), started_at);

-- Hourly charges, recomputed whole per hour from the intervals and prices (cairn_plan::usage::rollup_hour):
-- an hour's rows are replaced in one transaction. `numerator` is `monthly_e4 * seconds`: the amount in
-- ten-thousandths times the seconds of the month.
CREATE TABLE usage_hours (
    hour           timestamptz NOT NULL CHECK (date_trunc('hour', hour) = hour),
    app            text NOT NULL,
    slot           integer NOT NULL,
    plan           text NOT NULL,
    node           text NOT NULL,
    monthly_e4     bigint NOT NULL,
    seconds        integer NOT NULL CHECK (seconds > 0 AND seconds <= 3600),
    numerator      bigint NOT NULL,
    month_seconds  integer NOT NULL,
    PRIMARY KEY (hour, app, slot, plan, node, monthly_e4)
);

-- Hours a change reached back into (a close at a past instant): the rollup worker recomputes them.
CREATE TABLE usage_dirty_hours (
    hour  timestamptz PRIMARY KEY
);

-- One row: hours before `final_through` were rolled up after they ended.
CREATE TABLE usage_rollup_state (
    id             boolean PRIMARY KEY DEFAULT true CHECK (id),
    final_through  timestamptz
);
INSERT INTO usage_rollup_state (id) VALUES (true);

-- A closed month's statement: the canonical CSV of its charges by slot, and the SHA-256 of those bytes.
-- Written once, never changed.
CREATE TABLE usage_statements (
    month      date PRIMARY KEY CHECK (extract(day FROM month) = 1),
    body       bytea NOT NULL,
    sha256     text NOT NULL,
    closed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE FUNCTION usage_statements_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'usage statements are immutable (month %)', OLD.month;
END $$;
CREATE TRIGGER usage_statements_immutable BEFORE UPDATE OR DELETE ON usage_statements
    FOR EACH ROW EXECUTE FUNCTION usage_statements_immutable();
