//! `cairn usage`: a month's metered usage (issue 20) by app, slot, plan or node, as a table, CSV or
//! JSON, from the admin API or the database; `--recompute` rolls the month's hours up again first
//! (idempotent), `--statement` prints a closed month's statement (its canonical bytes).

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use cairn_proto::admin::{UsageBy, UsageRecomputed, UsageReport};
use cairn_reconciler::store::usage;

use super::control::runtime;
use super::remote::Target;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum By {
    App,
    Slot,
    Plan,
    Node,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The admin API (--server, CAIRN_SERVER and CAIRN_TOKEN) or else the database
    #[command(flatten)]
    target: super::args::TargetArgs,
    /// The month, e.g. 2026-11 (default: this month, UTC, to date)
    #[arg(long, value_name = "YYYY-MM", value_parser = parse_month)]
    month: Option<chrono::NaiveDate>,
    /// What the rows are
    #[arg(long, value_enum, default_value = "app")]
    by: By,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Roll the month's hours up again from the recorded intervals first (gives the same rows)
    #[arg(long)]
    recompute: bool,
    /// Print the closed month's statement (its canonical CSV, whose SHA-256 the report shows)
    #[arg(long, conflicts_with_all = ["recompute", "by", "format"])]
    statement: bool,
}

fn parse_month(s: &str) -> Result<chrono::NaiveDate, String> {
    usage::parse_month(s).ok_or_else(|| format!("`{s}` is not a month such as 2026-11"))
}

pub fn run(args: Args) -> Result<ExitCode> {
    let by = match args.by {
        By::App => UsageBy::App,
        By::Slot => UsageBy::Slot,
        By::Plan => UsageBy::Plan,
        By::Node => UsageBy::Node,
    };
    runtime()?.block_on(async {
        let month = args.month.map(usage::month_label);
        let mq = month
            .as_deref()
            .map(|m| format!("month={m}&"))
            .unwrap_or_default();
        let report: UsageReport = match args.target.resolve()? {
            Target::Api(api) => {
                if args.statement {
                    let Some(m) = &month else {
                        bail!("--statement needs --month");
                    };
                    let body = api.get_bytes(&format!("/usage/statements/{m}")).await?;
                    print!("{}", String::from_utf8_lossy(&body));
                    return Ok(ExitCode::SUCCESS);
                }
                if args.recompute {
                    let _: UsageRecomputed = api
                        .post(&format!("/usage/recompute?{mq}"), &serde_json::json!({}))
                        .await?;
                }
                api.get(&format!("/usage?{mq}by={}", by.as_str())).await?
            }
            Target::Db(url) => {
                let pool = super::remote::connect_db(&url).await?;
                let now = usage::db_now(&pool).await?;
                let m = args.month.unwrap_or_else(|| now.date_naive());
                if args.statement {
                    let Some((body, _)) = usage::statement(&pool, m).await? else {
                        bail!(
                            "month {} is not closed: it closes 48 hours after its end",
                            usage::month_label(m)
                        );
                    };
                    print!("{}", String::from_utf8_lossy(&body));
                    return Ok(ExitCode::SUCCESS);
                }
                if args.recompute {
                    usage::recompute_month(&pool, m, now)
                        .await
                        .context("cannot recompute the month's usage")?;
                }
                usage::report(&pool, m, by).await?
            }
        };
        match args.format {
            Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            Format::Csv => print!("{}", csv(&report)),
            Format::Table => print!("{}", table(&report)),
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The key columns of a grouping.
fn key_columns(by: UsageBy) -> &'static [&'static str] {
    match by {
        UsageBy::App => &["app"],
        UsageBy::Slot => &["app", "slot"],
        UsageBy::Plan => &["plan"],
        UsageBy::Node => &["node"],
    }
}

fn keys(r: &cairn_proto::admin::UsageRow, by: UsageBy) -> Vec<String> {
    let s = |o: &Option<String>| o.clone().unwrap_or_default();
    match by {
        UsageBy::App => vec![s(&r.app)],
        UsageBy::Slot => vec![s(&r.app), r.slot.map(|n| n.to_string()).unwrap_or_default()],
        UsageBy::Plan => vec![s(&r.plan)],
        UsageBy::Node => vec![s(&r.node)],
    }
}

/// CSV: the key columns, `seconds`, `amount` (a decimal in the currency), a `total` line last.
pub fn csv(r: &UsageReport) -> String {
    let cols = key_columns(r.by);
    let mut out = format!("{},seconds,amount\n", cols.join(","));
    for row in &r.rows {
        let _ = writeln!(
            out,
            "{},{},{}",
            keys(row, r.by).join(","),
            row.seconds,
            usage::decimal(row.amount_minor)
        );
    }
    let _ = writeln!(
        out,
        "total{},{},{}",
        ",".repeat(cols.len() - 1),
        r.total_seconds,
        usage::decimal(r.total_minor)
    );
    out
}

/// Aligned columns, hours of use, the total, and the statement when the month is closed.
pub fn table(r: &UsageReport) -> String {
    let cols = key_columns(r.by);
    let currency = r.currency.as_deref().unwrap_or("");
    let mut lines: Vec<Vec<String>> = vec![
        cols.iter()
            .map(|c| c.to_uppercase())
            .chain([
                "HOURS".into(),
                format!("AMOUNT {currency}").trim().to_owned(),
            ])
            .collect(),
    ];
    for row in &r.rows {
        let mut l = keys(row, r.by);
        l.push(format!("{:.2}", row.seconds as f64 / 3600.0));
        l.push(usage::decimal(row.amount_minor));
        lines.push(l);
    }
    let mut total = vec!["total".to_owned()];
    total.extend(std::iter::repeat_n(String::new(), cols.len() - 1));
    total.push(format!("{:.2}", r.total_seconds as f64 / 3600.0));
    total.push(usage::decimal(r.total_minor));
    lines.push(total);
    let widths: Vec<usize> = (0..lines[0].len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = match &r.statement {
        Some(s) => format!(
            "Usage of {} (closed {}, statement {})\n",
            r.month,
            s.closed_at.format("%Y-%m-%d %H:%M UTC"),
            s.sha256
        ),
        None => format!("Usage of {} to date (hours rolled up so far)\n", r.month),
    };
    for l in &lines {
        let cells: Vec<String> = l
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i >= cols.len() {
                    format!("{c:>w$}")
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    if r.late_intervals > 0 {
        let _ = writeln!(
            out,
            "{} interval(s) closed by a report older than 48 hours: applied from that edge, flagged",
            r.late_intervals
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_proto::admin::UsageRow;

    fn report() -> UsageReport {
        UsageReport {
            month: "2026-11".into(),
            by: UsageBy::Slot,
            currency: Some("EUR".into()),
            rows: vec![
                UsageRow {
                    app: Some("web".into()),
                    slot: Some(0),
                    plan: None,
                    node: None,
                    seconds: 7200,
                    amount_minor: 1234,
                },
                UsageRow {
                    app: Some("web".into()),
                    slot: Some(1),
                    plan: None,
                    node: None,
                    seconds: 60,
                    amount_minor: 5,
                },
            ],
            total_seconds: 7260,
            total_minor: 1239,
            late_intervals: 0,
            statement: None,
        }
    }

    #[test]
    fn csv_has_the_key_columns_seconds_amount_and_a_total() {
        assert_eq!(
            csv(&report()),
            "app,slot,seconds,amount\nweb,0,7200,12.34\nweb,1,60,0.05\ntotal,,7260,12.39\n"
        );
    }

    #[test]
    fn the_table_is_aligned() {
        assert_eq!(
            table(&report()),
            "Usage of 2026-11 to date (hours rolled up so far)\n\
             APP    SLOT  HOURS  AMOUNT EUR\n\
             web    0      2.00       12.34\n\
             web    1      0.02        0.05\n\
             total         2.02       12.39\n"
        );
    }
}
