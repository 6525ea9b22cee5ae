//! `cairn token create|list|revoke`: admin API tokens. These are bootstrap commands: they talk to the
//! database directly (a token is what the API would need to be asked). The token is printed once, on
//! stdout alone, so `cairn token create > token` captures exactly it; only its hash is stored.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use cairn_reconciler::api::auth;
use cairn_reconciler::store::tokens;

use super::args::DbArgs;
use super::control::runtime;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Make an admin API token and print it (once; only its hash is kept)
    Create {
        #[command(flatten)]
        db: DbArgs,
        /// What the token is for, shown by `cairn token list`
        #[arg(long, default_value = "admin")]
        name: String,
        /// `viewer` may only read (the API's GET endpoints, the dashboard without actions);
        /// `operator` may also act (rollback, unpin, restart, deploy, join tokens)
        #[arg(long, default_value = "operator", value_parser = ["viewer", "operator"])]
        role: String,
    },
    /// List admin tokens (never the tokens themselves)
    List {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Revoke admin tokens by id, or every token with that name
    Revoke {
        #[command(flatten)]
        db: DbArgs,
        /// A token's id or name
        token: String,
    },
}

pub fn run(args: Args) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        let db = match &args.command {
            Command::Create { db, .. } | Command::List { db } | Command::Revoke { db, .. } => db,
        };
        let pool = cairn_reconciler::store::connect(&db.database_url, 2)
            .await
            .context("cannot connect to the database")?;
        cairn_reconciler::store::migrate(&pool)
            .await
            .context("cannot migrate the database")?;
        match &args.command {
            Command::Create { name, role, .. } => {
                let role = tokens::Role::parse(role).context("unknown role")?;
                let (id, token) = auth::issue_admin_token(&pool, name, role).await?;
                println!("{token}");
                eprintln!(
                    "admin token {id} ({name}, {}) created; it is shown only now. Use it as CAIRN_TOKEN \
                     (or --token-file) with --server",
                    role.as_str()
                );
            }
            Command::List { .. } => {
                let rows = tokens::admin_tokens(&pool).await?;
                println!(
                    "{:>6}  {:<24} {:<8} {:<20} {:<20} STATE",
                    "ID", "NAME", "ROLE", "CREATED", "LAST USED"
                );
                let t = |d: Option<chrono::DateTime<chrono::Utc>>| {
                    d.map_or("never".to_owned(), |d| d.format("%Y-%m-%d %H:%M:%S").to_string())
                };
                for r in rows {
                    println!(
                        "{:>6}  {:<24} {:<8} {:<20} {:<20} {}",
                        r.id,
                        r.name,
                        r.role.as_str(),
                        t(Some(r.created_at)),
                        t(r.last_used_at),
                        r.revoked_at.map_or("active".to_owned(), |d| format!(
                            "revoked {}",
                            d.format("%Y-%m-%d %H:%M:%S")
                        ))
                    );
                }
            }
            Command::Revoke { token, .. } => {
                let n = tokens::revoke_admin_token(&pool, token).await?;
                if n == 0 {
                    bail!("no active admin token has the id or name `{token}`");
                }
                println!("revoked {n} admin token(s)");
            }
        }
        pool.close().await;
        Ok(ExitCode::SUCCESS)
    })
}
