//! Usage metering's arithmetic (issue 20): replica-slot intervals and versioned plan prices in, exact
//! charges per hour out.
//!
//! Usage is wall-clock time a replica slot is desired and placed, prorated to the second (Heroku's rule):
//! a slot is charged for every second at least one of its intervals covers, once, however many replicas
//! overlapped in it (the old and the new one of a zero-downtime release) and however often an agent
//! reported the same interval. A second is charged at the price of the plan of the interval that started
//! last among those covering it, as that plan's price stood at that second; the per-second rate is the
//! monthly price over the seconds of that calendar month (UTC), so a slot covered for a whole month costs
//! exactly the list price.
//!
//! Amounts stay exact: a charge is an integer numerator over the seconds of its month (minor units of the
//! currency × seconds), summed exactly and rounded once, when shown ([`Charge::amount_minor`]). An hour's
//! rollup is a pure function of the intervals and prices, so recomputing it gives the same rows.
//!
//! What it must not do: IO, clocks (the open intervals' end is the caller's `now`), floating point.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Duration, TimeZone, Timelike, Utc};
use serde::{Deserialize, Serialize};

/// One replica slot's time on one node under one plan: opened when the desired, placed replica started,
/// closed when it stopped or was removed (or at the node's last heartbeat when it went offline). `end`
/// is `None` while open.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Interval {
    pub app: String,
    pub slot: u32,
    pub plan: String,
    pub node: String,
    pub start: DateTime<Utc>,
    pub end: Option<DateTime<Utc>>,
}

/// A plan's monthly price (minor units: cents) from `from` on, as the config commit applied then set it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PriceChange {
    pub plan: String,
    pub from: DateTime<Utc>,
    pub monthly_minor: i64,
}

/// Every plan's price history.
#[derive(Debug, Clone, Default)]
pub struct Prices {
    by_plan: BTreeMap<String, Vec<(DateTime<Utc>, i64)>>,
}

impl Prices {
    pub fn new(changes: impl IntoIterator<Item = PriceChange>) -> Prices {
        let mut by_plan: BTreeMap<String, Vec<(DateTime<Utc>, i64)>> = BTreeMap::new();
        for c in changes {
            by_plan
                .entry(c.plan)
                .or_default()
                .push((c.from, c.monthly_minor));
        }
        for v in by_plan.values_mut() {
            v.sort();
            // Two prices for one instant (two commits applied within a second): the higher one.
            v.dedup_by(|later, earlier| {
                if later.0 == earlier.0 {
                    earlier.1 = earlier.1.max(later.1);
                    true
                } else {
                    false
                }
            });
        }
        Prices { by_plan }
    }

    /// The monthly price of `plan` at `t`; `None` before its first price (such seconds are free, and the
    /// caller flags them).
    pub fn at(&self, plan: &str, t: DateTime<Utc>) -> Option<i64> {
        let v = self.by_plan.get(plan)?;
        let i = v.partition_point(|(from, _)| *from <= t);
        (i > 0).then(|| v[i - 1].1)
    }

    /// The instants in `[from, to)` where `plan`'s price changes.
    fn changes_within(
        &self,
        plan: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Vec<DateTime<Utc>> {
        self.by_plan
            .get(plan)
            .map(|v| {
                v.iter()
                    .map(|(t, _)| *t)
                    .filter(|t| *t > from && *t < to)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// What one slot cost in one hour at one (plan, node, price): `seconds` charged, and the exact amount as
/// `numerator / month_seconds` minor units.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Charge {
    pub hour: DateTime<Utc>,
    pub app: String,
    pub slot: u32,
    pub plan: String,
    pub node: String,
    pub monthly_minor: i64,
    pub seconds: i64,
    /// `monthly_minor × seconds`: the amount times the seconds of the month.
    pub numerator: i128,
    /// The seconds of the calendar month `hour` is in.
    pub month_seconds: i64,
}

impl Charge {
    /// The amount in minor units, rounded half to even (exact sums first: see [`sum_minor`]).
    pub fn amount_minor(&self) -> i128 {
        round_div(self.numerator, i128::from(self.month_seconds))
    }
}

/// The exact total of charges that may span months, rounded half to even once: the sum of each month's
/// numerators over that month's seconds, as one fraction.
pub fn sum_minor<'a>(charges: impl IntoIterator<Item = &'a Charge>) -> i128 {
    let mut by_month: BTreeMap<i64, i128> = BTreeMap::new();
    for c in charges {
        *by_month.entry(c.month_seconds).or_default() += c.numerator;
    }
    // Months of different lengths: bring every fraction to the product of the distinct denominators
    // (at most four lengths: 28, 29, 30, 31 days), exact in i128 for any realistic sum.
    let denominators: Vec<i128> = by_month.keys().map(|d| i128::from(*d)).collect();
    let common: i128 = denominators.iter().product::<i128>().max(1);
    let numerator: i128 = by_month
        .iter()
        .map(|(d, n)| n * (common / i128::from(*d)))
        .sum();
    round_div(numerator, common)
}

/// `n / d` rounded half to even (`d > 0`).
pub fn round_div(n: i128, d: i128) -> i128 {
    let q = n.div_euclid(d);
    let r = n.rem_euclid(d);
    match (2 * r).cmp(&d) {
        std::cmp::Ordering::Less => q,
        std::cmp::Ordering::Greater => q + 1,
        std::cmp::Ordering::Equal => q + (q & 1),
    }
}

/// The start of the hour `t` is in.
pub fn hour_of(t: DateTime<Utc>) -> DateTime<Utc> {
    t.with_nanosecond(0)
        .and_then(|t| t.with_second(0))
        .and_then(|t| t.with_minute(0))
        .expect("an hour start exists")
}

/// The seconds of the calendar month (UTC) `t` is in.
pub fn month_seconds(t: DateTime<Utc>) -> i64 {
    let first = Utc
        .with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
        .single()
        .expect("the first of a month exists");
    let (y, m) = if t.month() == 12 {
        (t.year() + 1, 1)
    } else {
        (t.year(), t.month() + 1)
    };
    let next = Utc
        .with_ymd_and_hms(y, m, 1, 0, 0, 0)
        .single()
        .expect("the first of a month exists");
    (next - first).num_seconds()
}

/// An interval clipped to an hour: start, end, the interval.
type Span<'a> = (DateTime<Utc>, DateTime<Utc>, &'a Interval);
/// What a charge row is grouped by: app, slot, plan, node, monthly price.
type ChargeKey = (String, u32, String, String, i64);

/// The charges of the hour starting at `hour` (an hour start, see [`hour_of`]): every slot's covered
/// seconds in `[hour, hour + 1h)`, split where the charged plan or its price changes. Open intervals end
/// at `now`. The same intervals in any order, repeated or not, give the same rows, sorted.
pub fn rollup_hour(
    hour: DateTime<Utc>,
    intervals: &[Interval],
    prices: &Prices,
    now: DateTime<Utc>,
) -> Vec<Charge> {
    let end_of_hour = hour + Duration::hours(1);
    let month = month_seconds(hour);
    // The intervals of each slot that touch this hour, clipped to it.
    let mut slots: BTreeMap<(&str, u32), Vec<Span<'_>>> = BTreeMap::new();
    for i in intervals {
        let start = i.start.max(hour);
        let end = i.end.unwrap_or(now).min(end_of_hour);
        if start < end {
            slots
                .entry((i.app.as_str(), i.slot))
                .or_default()
                .push((start, end, i));
        }
    }
    // (app, slot, plan, node, price) -> (seconds, numerator)
    let mut out: BTreeMap<ChargeKey, (i64, i128)> = BTreeMap::new();
    for ((app, slot), spans) in slots {
        // Cut the hour at every instant where the set of covering intervals or a price can change.
        let mut cuts: Vec<DateTime<Utc>> = spans.iter().flat_map(|s| [s.0, s.1]).collect();
        for s in &spans {
            cuts.extend(prices.changes_within(&s.2.plan, s.0, s.1));
        }
        cuts.sort();
        cuts.dedup();
        for w in cuts.windows(2) {
            let (a, b) = (w[0], w[1]);
            // The interval that started last among those covering [a, b) decides the plan and node
            // (ties: the greatest by its fields, so the choice does not depend on input order).
            let Some(chosen) = spans
                .iter()
                .filter(|s| s.0 <= a && s.1 >= b)
                .map(|s| s.2)
                .max_by(|x, y| x.start.cmp(&y.start).then_with(|| x.cmp(y)))
            else {
                continue;
            };
            let Some(price) = prices.at(&chosen.plan, a) else {
                continue;
            };
            let seconds = (b - a).num_seconds();
            let e = out
                .entry((
                    app.to_owned(),
                    slot,
                    chosen.plan.clone(),
                    chosen.node.clone(),
                    price,
                ))
                .or_default();
            e.0 += seconds;
            e.1 += i128::from(price) * i128::from(seconds);
        }
    }
    out.into_iter()
        .map(
            |((app, slot, plan, node, monthly_minor), (seconds, numerator))| Charge {
                hour,
                app,
                slot,
                plan,
                node,
                monthly_minor,
                seconds,
                numerator,
                month_seconds: month,
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: i64) -> DateTime<Utc> {
        // 2026-11-30 22:00:00 UTC: two hours before a month boundary (30-day November, 31-day December).
        Utc.timestamp_opt(1_796_076_000 + s, 0).unwrap()
    }

    fn iv(app: &str, slot: u32, plan: &str, start: i64, end: Option<i64>) -> Interval {
        Interval {
            app: app.into(),
            slot,
            plan: plan.into(),
            node: "n1".into(),
            start: t(start),
            end: end.map(t),
        }
    }

    #[test]
    fn the_base_instant_is_where_the_tests_think() {
        assert_eq!(t(0).to_rfc3339(), "2026-11-30T22:00:00+00:00");
        assert_eq!(month_seconds(t(0)), 30 * 86_400);
        assert_eq!(month_seconds(t(7200)), 31 * 86_400);
    }

    #[test]
    fn a_slot_running_a_whole_month_costs_the_list_price() {
        let start = Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap();
        let end = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
        let i = vec![Interval {
            app: "web".into(),
            slot: 0,
            plan: "small".into(),
            node: "n1".into(),
            start,
            end: Some(end),
        }];
        let prices = Prices::new([PriceChange {
            plan: "small".into(),
            from: start - Duration::days(30),
            monthly_minor: 700,
        }]);
        let mut charges = Vec::new();
        let mut h = start;
        while h < end {
            charges.extend(rollup_hour(h, &i, &prices, end));
            h += Duration::hours(1);
        }
        assert_eq!(sum_minor(&charges), 700);
    }

    #[test]
    fn an_overlap_in_one_slot_counts_once_and_duplicates_do_not_count_again() {
        let prices = Prices::new([PriceChange {
            plan: "small".into(),
            from: t(-86_400),
            monthly_minor: 2_592_000, // one minor unit per second in a 30-day month
        }]);
        let old = iv("web", 0, "small", 0, Some(1_800));
        let new = iv("web", 0, "small", 1_700, None);
        let charges = rollup_hour(
            t(0),
            &[old.clone(), new.clone(), old, new],
            &prices,
            t(3_000),
        );
        assert_eq!(charges.iter().map(|c| c.seconds).sum::<i64>(), 3_000);
        assert_eq!(sum_minor(&charges), 3_000);
    }

    #[test]
    fn a_price_change_mid_hour_splits_exactly() {
        let prices = Prices::new([
            PriceChange {
                plan: "small".into(),
                from: t(-86_400),
                monthly_minor: 2_592_000,
            },
            PriceChange {
                plan: "small".into(),
                from: t(600),
                monthly_minor: 2 * 2_592_000,
            },
        ]);
        let charges = rollup_hour(t(0), &[iv("web", 0, "small", 0, None)], &prices, t(3_600));
        assert_eq!(sum_minor(&charges), 600 + 2 * 3_000);
        assert_eq!(charges.len(), 2, "{charges:?}");
    }

    #[test]
    fn rounding_is_half_to_even() {
        assert_eq!(round_div(5, 2), 2);
        assert_eq!(round_div(7, 2), 4);
        assert_eq!(round_div(-5, 2), -2);
        assert_eq!(round_div(10, 4), 2);
        assert_eq!(round_div(11, 4), 3);
    }

    /// The oracle: every second, every slot, by brute force.
    fn oracle(intervals: &[Interval], prices: &Prices, from: i64, to: i64, now: i64) -> i128 {
        let mut by_month: Vec<Charge> = Vec::new();
        let mut slots: BTreeMap<(String, u32), Vec<&Interval>> = BTreeMap::new();
        for i in intervals {
            slots.entry((i.app.clone(), i.slot)).or_default().push(i);
        }
        for s in from..to {
            let at = t(s);
            for ((app, slot), v) in &slots {
                let chosen = v
                    .iter()
                    .filter(|i| i.start <= at && at < i.end.unwrap_or(t(now)))
                    .max_by(|x, y| x.start.cmp(&y.start).then_with(|| x.cmp(y)));
                let Some(i) = chosen else { continue };
                let Some(p) = prices.at(&i.plan, at) else {
                    continue;
                };
                by_month.push(Charge {
                    hour: hour_of(at),
                    app: app.clone(),
                    slot: *slot,
                    plan: i.plan.clone(),
                    node: i.node.clone(),
                    monthly_minor: p,
                    seconds: 1,
                    numerator: i128::from(p),
                    month_seconds: month_seconds(at),
                });
            }
        }
        sum_minor(&by_month)
    }

    fn arb_intervals() -> impl Strategy<Value = Vec<Interval>> {
        let one = (
            prop::sample::select(vec!["web", "api"]),
            0u32..2,
            prop::sample::select(vec!["small", "large", "unpriced"]),
            prop::sample::select(vec!["n1", "n2"]),
            0i64..14_400,
            prop::option::weighted(0.8, 1i64..7_200),
        )
            .prop_map(|(app, slot, plan, node, start, len)| Interval {
                app: app.into(),
                slot,
                plan: plan.into(),
                node: node.into(),
                start: t(start),
                end: len.map(|l| t(start + l)),
            });
        prop::collection::vec(one, 0..8).prop_flat_map(|v| {
            // Duplicated reports (an agent retrying) and any order.
            let n = v.len();
            (Just(v), prop::collection::vec(0..n.max(1), 0..4)).prop_map(|(mut v, dups)| {
                if !v.is_empty() {
                    for d in dups {
                        v.push(v[d % v.len()].clone());
                    }
                }
                v.reverse();
                v
            })
        })
    }

    fn arb_prices() -> impl Strategy<Value = Vec<PriceChange>> {
        prop::collection::vec(
            (
                prop::sample::select(vec!["small", "large"]),
                -3_600i64..14_400,
                1i64..100_000,
            )
                .prop_map(|(plan, from, p)| PriceChange {
                    plan: plan.into(),
                    from: t(from),
                    monthly_minor: p,
                }),
            0..6,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// Four hours across a month boundary, rolled up hour by hour, equal the per-second oracle to the
        /// minor unit, and rolling up twice gives the same rows.
        #[test]
        fn hourly_rollups_equal_the_per_second_oracle(
            intervals in arb_intervals(),
            prices in arb_prices(),
            now in 7_200i64..14_400,
        ) {
            let p = Prices::new(prices);
            let mut charges = Vec::new();
            for h in 0..4 {
                let rows = rollup_hour(t(h * 3_600), &intervals, &p, t(now));
                let mut shuffled = intervals.clone();
                shuffled.rotate_left(intervals.len() / 2);
                prop_assert_eq!(&rows, &rollup_hour(t(h * 3_600), &shuffled, &p, t(now)));
                charges.extend(rows);
            }
            prop_assert_eq!(sum_minor(&charges), oracle(&intervals, &p, 0, 14_400, now));
        }
    }
}
