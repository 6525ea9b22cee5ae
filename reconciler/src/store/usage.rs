//! Usage metering in PostgreSQL (issue 20): replica-slot intervals, plan price history, hourly rollups and
//! monthly statements. The arithmetic is `cairn_plan::usage` (pure); this module records what it needs
//! and stores what it computes.
//!
//! - **Intervals** ([`open`], [`close`], [`close_node`]): opened when a slot's deploy (start, restart) is
//!   reported done (or, as a safety net, by a heartbeat reporting a placed replica running without an
//!   open interval: [`open_reported`]), closed when its stop or remove is, or at the node's last heartbeat when the node goes
//!   offline. Times are this control plane's clock when the report arrived (an agent's clock is never
//!   trusted). One open interval per (app, slot, node): a repeated report opens or closes nothing more.
//! - **Late reports**: a close reaching back more than [`LATE_WINDOW`] (48 h) is recorded and flagged
//!   (`late`, its claimed instant kept) and applied from the window's edge: hours older than the window
//!   are final, so recomputing any of them gives the same rows. A close reaching into past hours marks
//!   them dirty; the rollup recomputes them.
//! - **Prices** ([`record_prices`]): a row per plan whose price the apply created or changed, with the
//!   config commit and generation, in the apply's transaction.
//! - **Rollups** ([`rollup_hour`]): an hour's rows replaced in one transaction from the intervals and
//!   prices (idempotent); [`roll_up`] is the worker's pass (every hour since the last final one, the dirty
//!   ones, the current one provisionally), and closes months whose late window has passed.
//! - **Statements** ([`close_month`]): the canonical CSV of a month's charges by slot and its SHA-256,
//!   written once (a trigger refuses changes); [`statement_bytes`] computes the same bytes again.
//!
//! Amounts: prices are in ten-thousandths of the currency (`monthly_e4`, exact for a manifest price); a
//! row's numerator is `monthly_e4 × seconds`; an amount in minor units (hundredths) is the exact sum over
//! `month_seconds × 100`, rounded half to even once.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use cairn_plan::usage::{self as arith, Interval, PriceChange, Prices};
use cairn_proto::admin::{UsageBy, UsageReport, UsageRow, UsageStatement};
use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use sqlx::{PgConnection, PgPool, Row as _};

use super::{Op as _, StoreError};

/// How far back a report may still change usage: older hours are final.
pub const LATE_WINDOW: Duration = Duration::hours(48);

/// Records the current price of every plan whose price is new or changed since its last row, as set by
/// the applied commit and generation (`config_state`, already written by this transaction).
pub async fn record_prices(conn: &mut PgConnection) -> Result<u64, StoreError> {
    let done = sqlx::query(
        r#"INSERT INTO plan_prices (plan, from_at, monthly_e4, commit, generation)
           SELECT p.name, now(), (p.price * 10000)::bigint, c.commit, c.generation
           FROM plans p CROSS JOIN config_state c
           WHERE (p.price * 10000)::bigint IS DISTINCT FROM (
               SELECT pp.monthly_e4 FROM plan_prices pp WHERE pp.plan = p.name
               ORDER BY pp.from_at DESC LIMIT 1)
           ON CONFLICT (plan, from_at) DO UPDATE SET monthly_e4 = EXCLUDED.monthly_e4,
               commit = EXCLUDED.commit, generation = EXCLUDED.generation"#,
    )
    .execute(conn)
    .await
    .op("record plan prices")?;
    Ok(done.rows_affected())
}

/// Opens the usage interval of `app`'s `slot` on `node` now, under the app's current plan, unless one is
/// open there under that plan already (a repeated report, or a release replacing the replica in place:
/// the slot goes on). One open under another plan is closed now first. An app that is not (or no longer)
/// declared opens nothing. `by` says which report opened it (a task).
pub async fn open(
    pool: &PgPool,
    app: &str,
    slot: u32,
    node: &str,
    by: &str,
) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await.op("begin opening a usage interval")?;
    let plan: Option<String> = sqlx::query_scalar("SELECT plan FROM apps WHERE name = $1")
        .bind(app)
        .fetch_optional(&mut *tx)
        .await
        .op("read an app's plan")?;
    let Some(plan) = plan else {
        return Ok(false);
    };
    sqlx::query(
        r#"UPDATE usage_intervals SET ended_at = greatest(now(), started_at), closed_by = $5
           WHERE app = $1 AND slot = $2 AND node = $3 AND ended_at IS NULL AND plan <> $4"#,
    )
    .bind(app)
    .bind(slot_i32(slot)?)
    .bind(node)
    .bind(&plan)
    .bind(format!("{by}: the plan changed"))
    .execute(&mut *tx)
    .await
    .op("close a usage interval of another plan")?;
    let opened = sqlx::query(
        r#"INSERT INTO usage_intervals (app, slot, plan, node, started_at, opened_by)
           VALUES ($1, $2, $3, $4, now(), $5)
           ON CONFLICT (app, slot, node) WHERE ended_at IS NULL DO NOTHING"#,
    )
    .bind(app)
    .bind(slot_i32(slot)?)
    .bind(&plan)
    .bind(node)
    .bind(by)
    .execute(&mut *tx)
    .await
    .op("open a usage interval")?
    .rows_affected()
        > 0;
    tx.commit().await.op("commit opening a usage interval")?;
    Ok(opened)
}

/// Opens, in the caller's (heartbeat) transaction, an interval now for every replica `node` reports
/// running whose slot is placed on it to run and has none open there: the safety net for a deploy's
/// result that never reached the store, and what meters again the replicas of a node back from offline
/// that still hold their slots. Only opens: closes come from tasks and liveness, so a stale report
/// never ends an interval. Returns how many it opened.
pub async fn open_reported(
    conn: &mut PgConnection,
    node: &str,
    replicas: &[cairn_proto::ActualReplica],
) -> Result<u64, StoreError> {
    let (apps, slots): (Vec<&str>, Vec<i32>) = replicas
        .iter()
        .filter(|r| r.state == cairn_proto::RunState::Running)
        .filter_map(|r| Some((r.app.as_str(), i32::try_from(r.slot).ok()?)))
        .unzip();
    if apps.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query(
        r#"INSERT INTO usage_intervals (app, slot, plan, node, started_at, opened_by)
           SELECT DISTINCT r.app, r.slot, a.plan, $1, now(), 'heartbeat'
           FROM unnest($2::text[], $3::int[]) AS r(app, slot)
           JOIN placements p ON p.app = r.app AND p.slot = r.slot AND p.node = $1
                            AND p.state = 'running'
           JOIN apps a ON a.name = r.app
           ON CONFLICT (app, slot, node) WHERE ended_at IS NULL DO NOTHING"#,
    )
    .bind(node)
    .bind(&apps)
    .bind(&slots)
    .execute(conn)
    .await
    .op("open usage intervals of reported replicas")?;
    Ok(done.rows_affected())
}

/// Closes the open interval of `app`'s `slot` (every slot when `None`) on `node` at `at` (now when
/// `None`); nothing when none is open (a repeated report). See [`LATE_WINDOW`] for an `at` long past.
pub async fn close(
    pool: &PgPool,
    app: &str,
    slot: Option<u32>,
    node: &str,
    at: Option<DateTime<Utc>>,
    by: &str,
) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await.op("begin closing a usage interval")?;
    let n = close_where(
        &mut tx,
        "app = $3 AND ($4::int IS NULL OR slot = $4) AND node = $5",
        at,
        by,
        Some((app, slot)),
        node,
    )
    .await?;
    tx.commit().await.op("commit closing a usage interval")?;
    Ok(n)
}

/// Closes every open interval on `node` at `at` (its last heartbeat, when it is marked offline), in the
/// caller's transaction.
pub async fn close_node(
    conn: &mut PgConnection,
    node: &str,
    at: Option<DateTime<Utc>>,
    by: &str,
) -> Result<u64, StoreError> {
    close_where(conn, "node = $5", at, by, None, node).await
}

/// Closes every open interval of a node just marked offline at its last heartbeat, in the caller's
/// transaction.
pub async fn close_offline_node(conn: &mut PgConnection, node: &str) -> Result<u64, StoreError> {
    let last: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT last_heartbeat FROM node_status WHERE node = $1")
            .bind(node)
            .fetch_optional(&mut *conn)
            .await
            .op("read a node's last heartbeat")?
            .flatten();
    close_node(
        conn,
        node,
        last,
        "node offline: closed at its last heartbeat",
    )
    .await
}

async fn close_where(
    conn: &mut PgConnection,
    which: &str,
    at: Option<DateTime<Utc>>,
    by: &str,
    slot: Option<(&str, Option<u32>)>,
    node: &str,
) -> Result<u64, StoreError> {
    // The end: the claimed instant, but not before the late window's edge (flagged then), nor before
    // the interval's start, nor after now.
    let sql = format!(
        r#"WITH closed AS (
               UPDATE usage_intervals SET
                   ended_at = least(now(), greatest(started_at,
                       coalesce($1, now()), now() - $2 * interval '1 second')),
                   closed_by = $6,
                   late = coalesce($1 < now() - $2 * interval '1 second', false),
                   claimed_end = CASE WHEN $1 < now() - $2 * interval '1 second' THEN $1 END
               WHERE ended_at IS NULL AND {which}
               RETURNING ended_at)
           , dirty AS (
               INSERT INTO usage_dirty_hours (hour)
               SELECT DISTINCT h FROM closed,
                   generate_series(date_trunc('hour', ended_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
                                   now(), interval '1 hour') AS h
               WHERE ended_at < date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
               ON CONFLICT DO NOTHING)
           SELECT count(*) FROM closed"#
    );
    let (app, slot) = slot.unwrap_or(("", None));
    let n: i64 = sqlx::query_scalar(&sql)
        .bind(at)
        .bind(LATE_WINDOW.num_seconds() as f64)
        .bind(app)
        .bind(slot.map(slot_i32).transpose()?)
        .bind(node)
        .bind(by)
        .fetch_one(conn)
        .await
        .op("close usage intervals")?;
    Ok(u64::try_from(n).unwrap_or(0))
}

fn slot_i32(slot: u32) -> Result<i32, StoreError> {
    i32::try_from(slot).map_err(|_| StoreError::OutOfRange {
        what: "slot",
        value: u64::from(slot),
    })
}

/// `t` without its fraction of a second: usage is metered in whole seconds (an instant counts from the
/// second it falls in), so splitting an interval never loses a fraction to truncation.
pub fn whole_second(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t)
}

/// The database's clock: every instant of metering is the control plane's, through one clock.
pub async fn db_now(pool: &PgPool) -> Result<DateTime<Utc>, StoreError> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(pool)
        .await
        .op("read the database clock")
}

/// Every plan's price history.
pub async fn prices(conn: &mut PgConnection) -> Result<Prices, StoreError> {
    let rows = sqlx::query("SELECT plan, from_at, monthly_e4 FROM plan_prices")
        .fetch_all(conn)
        .await
        .op("read plan prices")?;
    Ok(Prices::new(rows.iter().map(|r| PriceChange {
        plan: r.get("plan"),
        from: r.get("from_at"),
        monthly_minor: r.get("monthly_e4"),
    })))
}

/// The intervals that cover part of `[from, to)`.
pub async fn intervals_between(
    conn: &mut PgConnection,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<Interval>, StoreError> {
    let rows = sqlx::query(
        r#"SELECT app, slot, plan, node, started_at, ended_at FROM usage_intervals
           WHERE coalesce(ended_at, 'infinity'::timestamptz) > $1 AND started_at < $2"#,
    )
    .bind(from)
    .bind(to)
    .fetch_all(conn)
    .await
    .op("read usage intervals")?;
    Ok(rows
        .iter()
        .map(|r| Interval {
            app: r.get("app"),
            slot: u32::try_from(r.get::<i32, _>("slot")).unwrap_or(0),
            plan: r.get("plan"),
            node: r.get("node"),
            start: whole_second(r.get("started_at")),
            end: r
                .get::<Option<DateTime<Utc>>, _>("ended_at")
                .map(whole_second),
        })
        .collect())
}

/// Recomputes the hour starting at `hour` from the intervals and prices (open intervals end at `now`),
/// replacing its rows in one transaction; returns how many rows it has.
pub async fn rollup_hour(
    pool: &PgPool,
    hour: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<usize, StoreError> {
    let hour = arith::hour_of(hour);
    let mut tx = pool.begin().await.op("begin rolling up an hour")?;
    // One rollup of an hour at a time (the leader's loop, an operator's recompute through any control
    // plane): a second would insert the same rows beside the first's uncommitted ones and fail.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('cairn usage hour', $1))")
        .bind(hour.timestamp())
        .execute(&mut *tx)
        .await
        .op("wait for an hour's rollup")?;
    // First: a close committed after this reads the intervals marks the hour dirty again.
    sqlx::query("DELETE FROM usage_dirty_hours WHERE hour = $1")
        .bind(hour)
        .execute(&mut *tx)
        .await
        .op("clear a dirty hour")?;
    let prices = prices(&mut tx).await?;
    let intervals = intervals_between(&mut tx, hour, hour + Duration::hours(1)).await?;
    let charges = arith::rollup_hour(hour, &intervals, &prices, whole_second(now));
    sqlx::query("DELETE FROM usage_hours WHERE hour = $1")
        .bind(hour)
        .execute(&mut *tx)
        .await
        .op("clear an hour's usage")?;
    if !charges.is_empty() {
        let mut apps = Vec::with_capacity(charges.len());
        let mut slots = Vec::with_capacity(charges.len());
        let mut plans = Vec::with_capacity(charges.len());
        let mut nodes = Vec::with_capacity(charges.len());
        let mut monthly = Vec::with_capacity(charges.len());
        let mut seconds = Vec::with_capacity(charges.len());
        let mut numerators = Vec::with_capacity(charges.len());
        for c in &charges {
            apps.push(c.app.as_str());
            slots.push(slot_i32(c.slot)?);
            plans.push(c.plan.as_str());
            nodes.push(c.node.as_str());
            monthly.push(c.monthly_minor);
            seconds.push(i32::try_from(c.seconds).unwrap_or(i32::MAX));
            numerators.push(
                i64::try_from(c.numerator).map_err(|_| StoreError::OutOfRange {
                    what: "usage numerator",
                    value: u64::MAX,
                })?,
            );
        }
        sqlx::query(
            r#"INSERT INTO usage_hours
                   (hour, app, slot, plan, node, monthly_e4, seconds, numerator, month_seconds)
               SELECT $1, a, s, p, n, m, sec, num, $9
               FROM unnest($2::text[], $3::int[], $4::text[], $5::text[], $6::bigint[], $7::int[],
                           $8::bigint[]) AS u(a, s, p, n, m, sec, num)"#,
        )
        .bind(hour)
        .bind(&apps)
        .bind(&slots)
        .bind(&plans)
        .bind(&nodes)
        .bind(&monthly)
        .bind(&seconds)
        .bind(&numerators)
        .bind(i32::try_from(arith::month_seconds(hour)).unwrap_or(i32::MAX))
        .execute(&mut *tx)
        .await
        .op("write an hour's usage")?;
    }
    tx.commit().await.op("commit an hour's usage")?;
    Ok(charges.len())
}

/// What one rollup pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pass {
    pub hours: u64,
    pub months_closed: Vec<String>,
}

/// The rollup worker's pass at `now`: every hour from the last final one to the current one (which stays
/// provisional until it ends), the dirty ones, then the months whose late window has passed are closed.
pub async fn roll_up(pool: &PgPool, now: DateTime<Utc>) -> Result<Pass, StoreError> {
    let current = arith::hour_of(now);
    let final_through: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT final_through FROM usage_rollup_state")
            .fetch_one(pool)
            .await
            .op("read the rollup state")?;
    let first = match final_through {
        Some(f) => Some(f),
        None => sqlx::query_scalar::<_, Option<DateTime<Utc>>>(
            "SELECT min(started_at) FROM usage_intervals",
        )
        .fetch_one(pool)
        .await
        .op("read the first usage interval")?
        .map(arith::hour_of),
    };
    let dirty: Vec<DateTime<Utc>> =
        sqlx::query_scalar("SELECT hour FROM usage_dirty_hours WHERE hour <= $1 ORDER BY hour")
            .bind(current)
            .fetch_all(pool)
            .await
            .op("read dirty hours")?;
    let mut hours: Vec<DateTime<Utc>> = dirty;
    if let Some(mut h) = first {
        while h <= current {
            hours.push(h);
            h += Duration::hours(1);
        }
    }
    hours.sort();
    hours.dedup();
    let mut pass = Pass::default();
    for h in hours {
        rollup_hour(pool, h, now).await?;
        pass.hours += 1;
    }
    if first.is_some() {
        sqlx::query("UPDATE usage_rollup_state SET final_through = $1")
            .bind(current)
            .execute(pool)
            .await
            .op("record the rollup state")?;
    }
    // Months wholly final: ended before the late window's edge, and rolled up after they ended. (Read
    // from the hours' totals: one row an hour, not one per replica slot.)
    let open_months: Vec<DateTime<Utc>> = sqlx::query_scalar(
        r#"SELECT DISTINCT date_trunc('month', hour AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS m
           FROM usage_hour_totals
           WHERE hour < $1
             AND NOT EXISTS (SELECT 1 FROM usage_statements s
                             WHERE s.month = (date_trunc('month', hour AT TIME ZONE 'UTC'))::date)
           ORDER BY m"#,
    )
    .bind(month_start(now - LATE_WINDOW - Duration::hours(1)))
    .fetch_all(pool)
    .await
    .op("find months to close")?;
    for m in open_months {
        let month = m.date_naive();
        if close_month(pool, month, now).await?.is_some() {
            pass.months_closed.push(month_label(month));
        }
    }
    Ok(pass)
}

/// Recomputes every hour of `month` up to `now` (an operator's `cairn usage --recompute`); returns how
/// many hours.
pub async fn recompute_month(
    pool: &PgPool,
    month: NaiveDate,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let (from, to) = month_bounds(month);
    let to = to.min(arith::hour_of(now) + Duration::hours(1));
    let mut h = from;
    let mut n = 0;
    while h < to {
        rollup_hour(pool, h, now).await?;
        h += Duration::hours(1);
        n += 1;
    }
    Ok(n)
}

/// The first instant of the month `t` is in (UTC).
pub fn month_start(t: DateTime<Utc>) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
        .single()
        .expect("the first of a month exists")
}

/// `[first instant, first instant of the next month)` of `month` (any day of it).
pub fn month_bounds(month: NaiveDate) -> (DateTime<Utc>, DateTime<Utc>) {
    let from = Utc
        .with_ymd_and_hms(month.year(), month.month(), 1, 0, 0, 0)
        .single()
        .expect("the first of a month exists");
    let to = from + Duration::seconds(arith::month_seconds(from));
    (from, to)
}

/// `YYYY-MM`.
pub fn month_label(month: NaiveDate) -> String {
    format!("{:04}-{:02}", month.year(), month.month())
}

/// Parses `YYYY-MM` into the first of that month.
pub fn parse_month(s: &str) -> Option<NaiveDate> {
    let (y, m) = s.split_once('-')?;
    if y.len() != 4 || m.len() != 2 {
        return None;
    }
    NaiveDate::from_ymd_opt(y.parse().ok()?, m.parse().ok()?, 1)
}

/// One month's stored rows: (app, slot, plan, node, monthly_e4) → (seconds, numerator), and the month's
/// seconds.
type MonthRows = BTreeMap<(String, u32, String, String, i64), (i64, i128)>;

async fn month_rows(pool: &PgPool, month: NaiveDate) -> Result<(MonthRows, i64), StoreError> {
    let (from, to) = month_bounds(month);
    let rows = sqlx::query(
        r#"SELECT app, slot, plan, node, monthly_e4, sum(seconds)::bigint AS seconds,
                  sum(numerator)::text AS numerator
           FROM usage_hours WHERE hour >= $1 AND hour < $2
           GROUP BY app, slot, plan, node, monthly_e4"#,
    )
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await
    .op("read a month's usage")?;
    let mut out = MonthRows::new();
    for r in rows {
        let numerator: String = r.get("numerator");
        let numerator = numerator.parse::<i128>().map_err(|e| StoreError::Corrupt {
            table: "usage_hours",
            column: "numerator",
            detail: e.to_string(),
        })?;
        out.insert(
            (
                r.get("app"),
                u32::try_from(r.get::<i32, _>("slot")).unwrap_or(0),
                r.get("plan"),
                r.get("node"),
                r.get("monthly_e4"),
            ),
            (r.get("seconds"), numerator),
        );
    }
    Ok((out, arith::month_seconds(from)))
}

/// Minor units (hundredths) of an exact sum of numerators (ten-thousandths × seconds) in a month of
/// `month_seconds`, rounded half to even once.
pub fn minor(numerator: i128, month_seconds: i64) -> i64 {
    i64::try_from(arith::round_div(numerator, i128::from(month_seconds) * 100)).unwrap_or(i64::MAX)
}

/// The currency cairn.toml names for plan prices, if any.
pub async fn currency(pool: &PgPool) -> Result<Option<String>, StoreError> {
    sqlx::query_scalar("SELECT settings->>'currency' FROM config_state")
        .fetch_one(pool)
        .await
        .op("read the currency")
}

/// `12.34` from 1234 minor units.
pub fn decimal(minor: i64) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let m = minor.unsigned_abs();
    format!("{sign}{}.{:02}", m / 100, m % 100)
}

/// The canonical bytes of `month`'s statement, from its stored hourly rows: a CSV of its charges by
/// slot, plan, node and price, sorted, and a total line. The same rows give the same bytes.
pub async fn statement_bytes(pool: &PgPool, month: NaiveDate) -> Result<Vec<u8>, StoreError> {
    let (rows, month_seconds) = month_rows(pool, month).await?;
    let mut out = format!(
        "# cairn usage statement {}\napp,slot,plan,node,monthly_price,seconds,amount\n",
        month_label(month)
    );
    let (mut seconds, mut numerator) = (0i64, 0i128);
    for ((app, slot, plan, node, monthly_e4), (s, n)) in &rows {
        let _ = writeln!(
            out,
            "{app},{slot},{plan},{node},{},{s},{}",
            price_e4(*monthly_e4),
            decimal(minor(*n, month_seconds))
        );
        seconds += s;
        numerator += n;
    }
    let _ = writeln!(
        out,
        "total,,,,,{seconds},{}",
        decimal(minor(numerator, month_seconds))
    );
    Ok(out.into_bytes())
}

/// `12.5000` from 125000 ten-thousandths.
fn price_e4(e4: i64) -> String {
    let sign = if e4 < 0 { "-" } else { "" };
    let m = e4.unsigned_abs();
    format!("{sign}{}.{:04}", m / 10_000, m % 10_000)
}

/// Closes `month`: writes its statement (canonical bytes and their SHA-256) unless it exists. Refused
/// (`None`) before the month's late window has passed at `now`. Returns the statement's hash.
pub async fn close_month(
    pool: &PgPool,
    month: NaiveDate,
    now: DateTime<Utc>,
) -> Result<Option<String>, StoreError> {
    let (_, end) = month_bounds(month);
    if now < end + LATE_WINDOW {
        return Ok(None);
    }
    let body = statement_bytes(pool, month).await?;
    let sha = super::sha256_tagged(&body);
    let inserted = sqlx::query(
        r#"INSERT INTO usage_statements (month, body, sha256) VALUES ($1, $2, $3)
           ON CONFLICT (month) DO NOTHING"#,
    )
    .bind(month_bounds(month).0.date_naive())
    .bind(&body)
    .bind(&sha)
    .execute(pool)
    .await
    .op("write a usage statement")?
    .rows_affected();
    Ok((inserted > 0).then_some(sha))
}

/// A closed month's statement: its bytes and record.
pub async fn statement(
    pool: &PgPool,
    month: NaiveDate,
) -> Result<Option<(Vec<u8>, UsageStatement)>, StoreError> {
    let row = sqlx::query("SELECT body, sha256, closed_at FROM usage_statements WHERE month = $1")
        .bind(month_bounds(month).0.date_naive())
        .fetch_optional(pool)
        .await
        .op("read a usage statement")?;
    Ok(row.map(|r| {
        (
            r.get("body"),
            UsageStatement {
                closed_at: r.get("closed_at"),
                sha256: r.get("sha256"),
            },
        )
    }))
}

/// A report row's key: app, slot, plan, node (those of the grouping set).
type GroupKey = (Option<String>, Option<u32>, Option<String>, Option<String>);

/// `month`'s usage grouped `by`, from the stored hourly rows (month to date: the current hour as last
/// rolled up).
pub async fn report(
    pool: &PgPool,
    month: NaiveDate,
    by: UsageBy,
) -> Result<UsageReport, StoreError> {
    let (rows, month_seconds) = month_rows(pool, month).await?;
    let mut groups: BTreeMap<GroupKey, (i64, i128)> = BTreeMap::new();
    let (mut total_seconds, mut total) = (0i64, 0i128);
    for ((app, slot, plan, node, _), (s, n)) in rows {
        let key = match by {
            UsageBy::App => (Some(app), None, None, None),
            UsageBy::Slot => (Some(app), Some(slot), None, None),
            UsageBy::Plan => (None, None, Some(plan), None),
            UsageBy::Node => (None, None, None, Some(node)),
        };
        let e = groups.entry(key).or_default();
        e.0 += s;
        e.1 += n;
        total_seconds += s;
        total += n;
    }
    let (from, to) = month_bounds(month);
    let late: i64 = sqlx::query_scalar(
        r#"SELECT count(*) FROM usage_intervals
           WHERE late AND started_at < $2 AND coalesce(ended_at, 'infinity'::timestamptz) > $1"#,
    )
    .bind(from)
    .bind(to)
    .fetch_one(pool)
    .await
    .op("count late usage reports")?;
    let currency = currency(pool).await?;
    Ok(UsageReport {
        month: month_label(month),
        by,
        currency,
        rows: groups
            .into_iter()
            .map(|((app, slot, plan, node), (seconds, n))| UsageRow {
                app,
                slot,
                plan,
                node,
                seconds,
                amount_minor: minor(n, month_seconds),
            })
            .collect(),
        total_seconds,
        total_minor: minor(total, month_seconds),
        late_intervals: late,
        statement: statement(pool, month).await?.map(|(_, s)| s),
    })
}

/// The month-to-date total in minor units at `now` (the metric).
pub async fn month_to_date_minor(pool: &PgPool, now: DateTime<Utc>) -> Result<i64, StoreError> {
    month_to_date(pool, None, now).await
}

/// One app's month-to-date charge in minor units at `now` (the dashboard's app page): the hours rolled
/// up so far.
pub async fn app_month_to_date_minor(
    pool: &PgPool,
    app: &str,
    now: DateTime<Utc>,
) -> Result<i64, StoreError> {
    month_to_date(pool, Some(app), now).await
}

async fn month_to_date(
    pool: &PgPool,
    app: Option<&str>,
    now: DateTime<Utc>,
) -> Result<i64, StoreError> {
    let (from, to) = month_bounds(now.date_naive());
    // The whole installation's from the hours' totals (one row an hour, kept by triggers), one app's
    // from its rows.
    let query = match app {
        None => sqlx::query_scalar(
            "SELECT sum(numerator)::text FROM usage_hour_totals WHERE hour >= $1 AND hour < $2",
        )
        .bind(from)
        .bind(to),
        Some(app) => sqlx::query_scalar(
            "SELECT sum(numerator)::text FROM usage_hours
             WHERE hour >= $1 AND hour < $2 AND app = $3",
        )
        .bind(from)
        .bind(to)
        .bind(app),
    };
    let n: Option<String> = query.fetch_one(pool).await.op("sum the month's usage")?;
    let n = n
        .map(|n| n.parse::<i128>())
        .transpose()
        .map_err(|e| StoreError::Corrupt {
            table: "usage_hours",
            column: "numerator",
            detail: e.to_string(),
        })?;
    Ok(minor(n.unwrap_or(0), arith::month_seconds(from)))
}
