//! Cron schedules (`backup.schedule`, `verify`): the five classic fields (minute, hour, day of month,
//! month, day of week) with `*`, `*/n`, ranges `a-b`, steps `a-b/n` and lists, or `@hourly`, `@daily`,
//! `@weekly`, `@monthly`. Times are UTC. When both day fields are restricted a day matching either runs
//! (as in Vixie cron).
//!
//! Pure: no clock. [`Cron::next_after`] takes and returns Unix seconds, so the planner and the backup
//! worker decide the same way from the same instant.

use std::fmt;

/// A parsed schedule: for each field the set of values it runs at, as a bit set.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    /// Whether the day-of-month and day-of-week fields were `*` (unrestricted).
    any_day: bool,
    any_weekday: bool,
}

impl fmt::Debug for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cron")
            .field("minutes", &format_args!("{:#x}", self.minutes))
            .field("hours", &format_args!("{:#x}", self.hours))
            .field("days", &format_args!("{:#x}", self.days))
            .field("months", &format_args!("{:#x}", self.months))
            .field("weekdays", &format_args!("{:#x}", self.weekdays))
            .finish()
    }
}

const FIELDS: [(&str, u32, u32); 5] = [
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
];

impl Cron {
    /// Parses a schedule; the error says which field is wrong and why.
    pub fn parse(s: &str) -> Result<Cron, String> {
        let s = s.trim();
        let expanded = match s {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            other if other.starts_with('@') => {
                return Err(format!(
                    "unknown schedule `{other}`: use @hourly, @daily, @weekly, @monthly or five fields"
                ));
            }
            other => other,
        };
        let parts: Vec<&str> = expanded.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(format!(
                "a schedule has five fields (minute hour day-of-month month day-of-week), found {}",
                parts.len()
            ));
        }
        let mut sets = [0u64; 5];
        for (i, (part, (what, lo, hi))) in parts.iter().zip(FIELDS).enumerate() {
            sets[i] = field(part, lo, hi).map_err(|e| format!("{what} `{part}`: {e}"))?;
        }
        // Day of week 7 is Sunday, as 0.
        let mut weekdays = sets[4];
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & 0x7f;
        }
        Ok(Cron {
            minutes: sets[0],
            hours: sets[1] as u32,
            days: sets[2] as u32,
            months: sets[3] as u16,
            weekdays: weekdays as u8,
            any_day: parts[2] == "*",
            any_weekday: parts[4] == "*",
        })
    }

    fn day_matches(&self, day: u32, weekday: u32) -> bool {
        let d = self.days & (1 << day) != 0;
        let w = self.weekdays & (1 << weekday) != 0;
        match (self.any_day, self.any_weekday) {
            (false, false) => d || w,
            _ => d && w,
        }
    }

    /// The first run strictly after `t` (Unix seconds, UTC), or `None` if none comes within eight years
    /// (a schedule such as `0 0 31 2 *` never runs).
    pub fn next_after(&self, t: i64) -> Option<i64> {
        // The next whole minute after t.
        let mut m = t.div_euclid(60) + 1;
        let limit = m + 8 * 366 * 24 * 60;
        while m < limit {
            let days = m.div_euclid(24 * 60);
            let (y, mo, d) = civil_from_days(days);
            if self.months & (1 << mo) == 0 {
                // The first minute of the next month.
                let (ny, nm) = if mo == 12 { (y + 1, 1) } else { (y, mo + 1) };
                m = days_from_civil(ny, nm, 1) * 24 * 60;
                continue;
            }
            let weekday = (days + 4).rem_euclid(7) as u32; // 1970-01-01 was a Thursday.
            if !self.day_matches(d, weekday) {
                m = (days + 1) * 24 * 60;
                continue;
            }
            let minute_of_day = m.rem_euclid(24 * 60);
            let (h, mi) = ((minute_of_day / 60) as u32, (minute_of_day % 60) as u32);
            if self.hours & (1 << h) == 0 {
                m = days * 24 * 60 + (i64::from(h) + 1) * 60;
                continue;
            }
            if self.minutes & (1 << mi) == 0 {
                m += 1;
                continue;
            }
            return Some(m * 60);
        }
        None
    }

    /// The longest gap between two runs, in seconds, measured over the 400 years' cycle's first eight:
    /// what "two intervals without a good backup" counts with. `None` when it never runs.
    pub fn interval_upper_bound(&self, from: i64) -> Option<i64> {
        let mut prev = self.next_after(from)?;
        let mut longest = 0;
        // Enough runs to see a whole year of a monthly schedule; more for frequent ones is wasted.
        for _ in 0..64 {
            let next = self.next_after(prev)?;
            longest = longest.max(next - prev);
            prev = next;
        }
        Some(longest)
    }
}

fn field(s: &str, lo: u32, hi: u32) -> Result<u64, String> {
    let mut set = 0u64;
    for item in s.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, st)) => {
                let step: u32 = st
                    .parse()
                    .map_err(|_| format!("step `{st}` is not a number"))?;
                if step == 0 {
                    return Err("a step must be at least 1".into());
                }
                (r, step)
            }
            None => (item, 1),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            (num(a, lo, hi)?, num(b, lo, hi)?)
        } else {
            let a = num(range, lo, hi)?;
            (a, if item.contains('/') { hi } else { a })
        };
        if a > b {
            return Err(format!("range `{range}` runs backwards"));
        }
        let mut v = a;
        while v <= b {
            set |= 1 << v;
            v += step;
        }
    }
    Ok(set)
}

fn num(s: &str, lo: u32, hi: u32) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number (names such as `mon` are not supported)"))?;
    if n < lo || n > hi {
        return Err(format!("{n} is outside {lo}-{hi}"));
    }
    Ok(n)
}

/// Days since 1970-01-01 to (year, month 1-12, day 1-31) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month 1-12, day 1-31) to days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-06T17:30:00Z, a Sunday.
    const NOW: i64 = 1_796_578_200;

    #[test]
    fn civil_round_trips() {
        for days in [-800_000, -1, 0, 1, 59, 365, 20_000, 20_793, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(NOW / 86_400), (2026, 12, 6));
    }

    #[test]
    fn next_runs() {
        let daily = Cron::parse("@daily").unwrap();
        assert_eq!(daily.next_after(NOW), Some(NOW + 6 * 3600 + 30 * 60));
        let every15 = Cron::parse("*/15 * * * *").unwrap();
        assert_eq!(every15.next_after(NOW), Some(NOW + 15 * 60));
        assert_eq!(every15.next_after(NOW - 1), Some(NOW));
        let weekly = Cron::parse("@weekly").unwrap(); // Sundays at midnight; NOW is a Sunday evening.
        assert_eq!(
            weekly.next_after(NOW),
            Some(NOW + 6 * 86_400 + 6 * 3600 + 30 * 60)
        );
        let sunday7 = Cron::parse("0 0 * * 7").unwrap();
        assert_eq!(sunday7.next_after(NOW), weekly.next_after(NOW));
        let feb29 = Cron::parse("0 3 29 2 *").unwrap();
        let next = feb29.next_after(NOW).unwrap();
        assert_eq!(civil_from_days(next / 86_400), (2028, 2, 29));
        assert_eq!(Cron::parse("0 0 31 2 *").unwrap().next_after(NOW), None);
        // Either day field matches when both are restricted.
        let either = Cron::parse("0 0 1 * 1").unwrap();
        assert_eq!(
            civil_from_days(either.next_after(NOW).unwrap() / 86_400),
            (2026, 12, 7)
        );
        assert_eq!(daily.interval_upper_bound(NOW), Some(86_400));
    }

    #[test]
    fn errors_name_the_field() {
        for (s, want) in [
            ("* * *", "five fields"),
            ("61 * * * *", "minute `61`: 61 is outside 0-59"),
            ("0 24 * * *", "hour `24`"),
            ("0 0 0 * *", "day of month `0`"),
            ("*/0 * * * *", "at least 1"),
            ("0 0 * * mon", "not a number"),
            ("5-1 * * * *", "backwards"),
            ("@yearlyish", "unknown schedule"),
        ] {
            let e = Cron::parse(s).unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
