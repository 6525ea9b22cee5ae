//! `cairn db`: managed databases through the admin API or the database: `list`, `backup NAME` (now),
//! `backups NAME`, `verify NAME` (restore the latest good backup into a scratch server and compare its
//! rows), `restore NAME --backup ID | --latest --into NEW` (beside the original, never in place),
//! `swap NAME NEW` (attached apps point at NEW: a release), `rotate NAME` (a new login), `upgrades NAME`
//! (version upgrades), `finish-upgrade NAME` (drop the pre-upgrade instance), `drop NAME INSTANCE`
//! (drop an instance the database does not use). Never a password.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use cairn_reconciler::api::databases::{
    DatabaseInfo, Queued, RestoreRequest, Restoring, SwapRequest, Verifying,
};
use cairn_reconciler::api::databases::{DropRequest, Dropping};
use cairn_reconciler::store::databases::{BackupRow, UpgradeRow};
use cairn_schema::Name;

use super::control::runtime;
use super::remote::Target;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
    /// The admin API (--server, CAIRN_SERVER and CAIRN_TOKEN) or else the database
    #[command(flatten)]
    target: super::args::TargetArgs,
    /// Print JSON
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Every database: where it runs, whether it is available, its last good backup
    List,
    /// Back a database up now
    Backup { name: String },
    /// A database's backups, newest first (size, SHA-256, duration, ok or the error, verification)
    Backups { name: String },
    /// Restore the latest good backup into a scratch server on the database's node now and compare
    /// its rows with the backup's (also run on the database's `verify` schedule, weekly by default)
    Verify { name: String },
    /// Restore a backup into a new instance beside the original (never in place)
    Restore {
        name: String,
        /// The backup's id (`cairn db backups NAME`)
        #[arg(long, conflicts_with = "latest", required_unless_present = "latest")]
        backup: Option<i64>,
        /// The latest good backup
        #[arg(long)]
        latest: bool,
        /// The new instance's name; with --latest it defaults to the database's own (its fresh
        /// instance after a move to another node)
        #[arg(long)]
        into: Option<String>,
    },
    /// Point the attached apps at another instance (a restore's): each gets a new release
    Swap { name: String, instance: String },
    /// A new password (a new login); the attached apps get a new release with it
    Rotate { name: String },
    /// A database's version upgrades, newest first (from and to, state, what was compared or the error)
    Upgrades { name: String },
    /// Drop the pre-upgrade instance a successful upgrade left stopped: its data is deleted
    FinishUpgrade { name: String },
    /// Drop an instance that is not the database's current one (a restore's, a pre-upgrade one):
    /// its server stopped and its data deleted
    Drop { name: String, instance: String },
}

fn name(s: &str) -> Result<Name> {
    Name::new(s).map_err(|e| anyhow::anyhow!("`{s}` is not a database name: {e}"))
}

pub fn run(args: Args) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let target = args.target.resolve()?;
        let pool = match &target {
            Target::Db(url) => {
                let pool = cairn_reconciler::store::connect(url, 2)
                    .await
                    .context("cannot connect to the database")?;
                cairn_reconciler::store::migrate(&pool)
                    .await
                    .context("cannot migrate the database")?;
                Some(pool)
            }
            Target::Api(_) => None,
        };
        let api = match &target {
            Target::Api(a) => Some(a),
            Target::Db(_) => None,
        };
        let out: serde_json::Value;
        let text: String;
        match args.command {
            Command::List => {
                let dbs: Vec<DatabaseInfo> = match (api, &pool) {
                    (Some(a), _) => a.get("/databases").await?,
                    (_, Some(p)) => cairn_reconciler::api::databases::list_databases(p).await?,
                    _ => unreachable!("a target"),
                };
                text = render_list(&dbs);
                out = serde_json::to_value(&dbs)?;
            }
            Command::Backup { name: n } => {
                let db = name(&n)?;
                let q: Queued = match (api, &pool) {
                    (Some(a), _) => a.post(&format!("/databases/{db}/backup"), &()).await?,
                    (_, Some(p)) => Queued {
                        backup: cairn_reconciler::databases::backup_now(p, &db, "manual").await?,
                    },
                    _ => unreachable!("a target"),
                };
                text = format!("backup {} of {db} queued: `cairn db backups {db}` shows it\n", q.backup);
                out = serde_json::to_value(&q)?;
            }
            Command::Verify { name: n } => {
                let db = name(&n)?;
                let v: Verifying = match (api, &pool) {
                    (Some(a), _) => a.post(&format!("/databases/{db}/verify"), &()).await?,
                    (_, Some(p)) => Verifying {
                        verification: cairn_reconciler::databases::verify_now(p, &db).await?,
                    },
                    _ => unreachable!("a target"),
                };
                text = format!(
                    "verification {} of {db}'s latest good backup queued: `cairn db backups {db}` shows its result\n",
                    v.verification
                );
                out = serde_json::to_value(&v)?;
            }
            Command::Backups { name: n } => {
                let db = name(&n)?;
                let rows: Vec<BackupRow> = match (api, &pool) {
                    (Some(a), _) => a.get(&format!("/databases/{db}/backups")).await?,
                    (_, Some(p)) => {
                        let mut c = p.acquire().await?;
                        cairn_reconciler::store::databases::backups(&mut c, &db, 200).await?
                    }
                    _ => unreachable!("a target"),
                };
                text = render_backups(&rows);
                out = serde_json::to_value(&rows)?;
            }
            Command::Restore {
                name: n,
                backup,
                latest,
                into,
            } => {
                let db = name(&n)?;
                let into = match (into, latest) {
                    (Some(i), _) => name(&i)?,
                    (None, true) => db.clone(),
                    (None, false) => bail!("name the new instance with --into NEW: a restore never overwrites the original"),
                };
                let r: Restoring = match (api, &pool) {
                    (Some(a), _) => {
                        a.post(
                            &format!("/databases/{db}/restore"),
                            &RestoreRequest {
                                backup,
                                into: into.to_string(),
                            },
                        )
                        .await?
                    }
                    (_, Some(p)) => {
                        let node = cairn_reconciler::databases::restore(p, &db, backup, &into).await?;
                        Restoring {
                            instance: into.to_string(),
                            node: node.to_string(),
                        }
                    }
                    _ => unreachable!("a target"),
                };
                text = format!(
                    "restore into {} on {} queued{}\n",
                    r.instance,
                    r.node,
                    if r.instance == db.as_str() {
                        String::new()
                    } else {
                        format!("; `cairn db swap {db} {}` points the attached apps at it", r.instance)
                    }
                );
                out = serde_json::to_value(&r)?;
            }
            Command::Swap { name: n, instance } => {
                let db = name(&n)?;
                let inst = name(&instance)?;
                match (api, &pool) {
                    (Some(a), _) => {
                        let _: serde_json::Value = a
                            .post(
                                &format!("/databases/{db}/swap"),
                                &SwapRequest {
                                    instance: inst.to_string(),
                                },
                            )
                            .await?;
                    }
                    (_, Some(p)) => cairn_reconciler::databases::swap(p, &db, &inst).await?,
                    _ => unreachable!("a target"),
                }
                text = format!("{db}'s attached apps now use {inst}: the next reconcile releases them\n");
                out = serde_json::json!({ "database": db.as_str(), "instance": inst.as_str() });
            }
            Command::Rotate { name: n } => {
                let db = name(&n)?;
                match (api, &pool) {
                    (Some(a), _) => {
                        let _: serde_json::Value =
                            a.post(&format!("/databases/{db}/rotate"), &()).await?;
                    }
                    (_, Some(p)) => cairn_reconciler::databases::rotate(p, &db).await?,
                    _ => unreachable!("a target"),
                }
                text = format!("{db} has a new login: the next reconcile releases its attached apps\n");
                out = serde_json::json!({ "database": db.as_str(), "rotated": true });
            }
            Command::Upgrades { name: n } => {
                let db = name(&n)?;
                let rows: Vec<UpgradeRow> = match (api, &pool) {
                    (Some(a), _) => a.get(&format!("/databases/{db}/upgrades")).await?,
                    (_, Some(p)) => {
                        let mut c = p.acquire().await?;
                        cairn_reconciler::store::databases::upgrades(&mut c, &db, 200).await?
                    }
                    _ => unreachable!("a target"),
                };
                text = render_upgrades(&rows);
                out = serde_json::to_value(&rows)?;
            }
            Command::FinishUpgrade { name: n } => {
                let db = name(&n)?;
                let d: Dropping = match (api, &pool) {
                    (Some(a), _) => a.post(&format!("/databases/{db}/finish-upgrade"), &()).await?,
                    (_, Some(p)) => Dropping {
                        database: db.to_string(),
                        instance: cairn_reconciler::databases::finish_upgrade(p, &db).await?.to_string(),
                        node: None,
                    },
                    _ => unreachable!("a target"),
                };
                text = format!(
                    "{db}'s upgrade is finished: its pre-upgrade instance {} is being dropped (its data deleted)\n",
                    d.instance
                );
                out = serde_json::to_value(&d)?;
            }
            Command::Drop { name: n, instance } => {
                let db = name(&n)?;
                let inst = name(&instance)?;
                let d: Dropping = match (api, &pool) {
                    (Some(a), _) => {
                        a.post(
                            &format!("/databases/{db}/drop"),
                            &DropRequest {
                                instance: inst.to_string(),
                            },
                        )
                        .await?
                    }
                    (_, Some(p)) => Dropping {
                        database: db.to_string(),
                        instance: inst.to_string(),
                        node: Some(cairn_reconciler::databases::drop_instance(p, &db, &inst).await?.to_string()),
                    },
                    _ => unreachable!("a target"),
                };
                text = format!(
                    "instance {inst} of {db} is being dropped on {}: its server stops and its data is deleted\n",
                    d.node.as_deref().unwrap_or("its node")
                );
                out = serde_json::to_value(&d)?;
            }
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            print!("{text}");
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn render_list(dbs: &[DatabaseInfo]) -> String {
    let mut o = String::new();
    if dbs.is_empty() {
        o.push_str("No databases: declare one with `[database.NAME]`.\n");
        return o;
    }
    for d in dbs {
        let state = if d.available {
            "available"
        } else {
            "UNAVAILABLE (its node is not online)"
        };
        let recovery = d.last_good_backup.map_or_else(
            || "no good backup yet".to_owned(),
            |t| format!("recovery point {}", t.format("%Y-%m-%d %H:%M:%S UTC")),
        );
        let overdue = if d.backup_overdue {
            "  BACKUPS FAILING OR OVERDUE"
        } else {
            ""
        };
        let _ = writeln!(
            o,
            "{} ({} {}) on {}:{} instance {}: {state}; {recovery}{overdue}",
            d.name, d.engine, d.version, d.node, d.port, d.instance
        );
        match &d.upgrade {
            Some(u) if u.state == "ok" && u.from_instance == d.instance => {
                let _ = writeln!(
                    o,
                    "  upgrade {} -> {} swapped back: {} serves again, {} is not used",
                    u.from_version, u.to_version, u.from_instance, u.to_instance
                );
            }
            Some(u) => {
                let _ = writeln!(o, "  {}", upgrade_line(u));
            }
            None => {}
        }
    }
    o
}

fn render_backups(rows: &[BackupRow]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:>6}  {:<8}  {:<8}  {:>12}  {:<12}  {:>9}  {:<19}  OBJECT",
        "ID", "STATE", "TRIGGER", "BYTES", "SHA256", "SECONDS", "QUEUED"
    );
    for b in rows {
        let _ = writeln!(
            o,
            "{:>6}  {:<8}  {:<8}  {:>12}  {:<12}  {:>9}  {:<19}  {}",
            b.id,
            b.state,
            b.trigger,
            b.bytes.map_or("-".to_owned(), |x| x.to_string()),
            b.sha256.as_deref().map_or("-", |s| &s[..12.min(s.len())]),
            b.duration_ms
                .map_or("-".to_owned(), |x| format!("{:.1}", x as f64 / 1000.0)),
            b.queued_at.format("%Y-%m-%d %H:%M:%S"),
            b.object
        );
        if let Some(e) = &b.error {
            let _ = writeln!(o, "        error: {e}");
        }
        if let Some(c) = &b.counts {
            let rows: u64 = c.values().sum();
            let _ = writeln!(o, "        rows at the dump: {rows} in {} tables", c.len());
        }
        match (b.verified.as_deref(), &b.verify_error) {
            (Some("failed"), Some(e)) => {
                let _ = writeln!(o, "        verification FAILED: {e}");
            }
            (Some(v), _) => {
                let _ = writeln!(o, "        verification: {v}");
            }
            (None, _) => {}
        }
    }
    if rows.is_empty() {
        o.push_str("(no backups yet)\n");
    }
    o
}

/// What a database's last upgrade means for its operator.
fn upgrade_line(u: &UpgradeRow) -> String {
    let what = format!("upgrade {} -> {}", u.from_version, u.to_version);
    match u.state.as_str() {
        "queued" | "running" => format!(
            "{what} {}: {} keeps serving until {} has its data",
            u.state, u.from_instance, u.to_instance
        ),
        "ok" => format!(
            "{what} done ({}); pre-upgrade instance {} stopped, its data kept: `cairn db finish-upgrade {}` drops it",
            u.detail.as_deref().unwrap_or("counts equal"),
            u.from_instance,
            u.database
        ),
        "failed" => format!(
            "{what} FAILED: {}; {} keeps serving",
            u.error.as_deref().unwrap_or("no error recorded"),
            u.from_instance
        ),
        other => format!("{what} {other}"),
    }
}

fn render_upgrades(rows: &[UpgradeRow]) -> String {
    let mut o = String::new();
    for u in rows {
        let _ = writeln!(
            o,
            "{:>4}  {:<19}  {} -> {} ({} -> {}) on {}: {}",
            u.id,
            u.queued_at.format("%Y-%m-%d %H:%M:%S"),
            u.from_version,
            u.to_version,
            u.from_instance,
            u.to_instance,
            u.node,
            u.state
        );
        let _ = writeln!(o, "      {}", upgrade_line(u));
    }
    if rows.is_empty() {
        o.push_str("(no upgrades: a new `version` in the manifest makes one)\n");
    }
    o
}
