//! `cairn node join-token NODE` and `cairn node revoke NODE`: through the admin API when given
//! `--server` and a token, else against the database. A join token is printed once, on stdout alone;
//! only its hash is stored.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use cairn_proto::admin::{JoinToken, JoinTokenRequest, Revoked};
use cairn_reconciler::api::auth;
use cairn_reconciler::store::nodes;
use cairn_schema::Name;

use super::args::TargetArgs;
use super::control::runtime;
use super::remote::{Target, connect_db};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Make a one-time token an agent joins NODE with, and print it (once)
    JoinToken {
        #[command(flatten)]
        target: TargetArgs,
        /// The node, as declared in the config repository and applied
        node: Name,
        /// How long the token may be used
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        ttl: Duration,
        /// Let the token join NODE although it holds a live credential (a reinstalled agent, a lost
        /// data directory): the join revokes that credential. Without this, such a join is refused
        #[arg(long)]
        replace: bool,
    },
    /// Revoke NODE's agent credential: its agent is refused until it joins again with a new token
    Revoke {
        #[command(flatten)]
        target: TargetArgs,
        node: Name,
    },
}

pub fn run(args: Args) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        match args.command {
            Command::JoinToken {
                target,
                node,
                ttl,
                replace,
            } => {
                let token: JoinToken = match target.resolve()? {
                    Target::Api(api) => {
                        api.post(
                            &format!("/nodes/{node}/join-tokens"),
                            &JoinTokenRequest {
                                ttl_secs: ttl.as_secs(),
                                replace,
                            },
                        )
                        .await?
                    }
                    Target::Db(url) => {
                        let pool = connect_db(&url).await?;
                        let t = auth::issue_join_token(&pool, &node, ttl, replace).await?;
                        pool.close().await;
                        t
                    }
                };
                println!("{}", token.token);
                eprintln!(
                    "join token for node {} (valid until {}, once{}); give it to the agent as \
                     CAIRN_JOIN_TOKEN",
                    token.node,
                    token.expires_at.format("%Y-%m-%d %H:%M:%S UTC"),
                    if token.replace {
                        "; the join revokes the node's current credential"
                    } else {
                        ""
                    }
                );
            }
            Command::Revoke { target, node } => {
                let revoked = match target.resolve()? {
                    Target::Api(api) => {
                        api.delete::<Revoked>(&format!("/nodes/{node}/credential"))
                            .await?
                            .revoked
                    }
                    Target::Db(url) => {
                        let pool = connect_db(&url).await?;
                        if !nodes::node_declared(&pool, &node).await? {
                            anyhow::bail!("node `{node}` is not in the applied configuration");
                        }
                        let r = nodes::revoke_credential(&pool, &node).await?;
                        pool.close().await;
                        r
                    }
                };
                if revoked {
                    println!("revoked node {node}'s credential");
                } else {
                    println!("node {node} had no credential");
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
