//! The argument groups several commands share, declared once: where the database is ([`DbArgs`]), where
//! the desired state is and how sources are reached ([`SourceArgs`]), and where an operator command goes
//! ([`TargetArgs`]). Each flag is parsed here, once, into the value the commands use: `--git-rewrite`
//! becomes [`Rewrite`]s when the arguments are parsed, so a bad one is a usage error before anything runs.
//!
//! What it must not do: connect to anything or read files (`remote.rs` resolves a [`TargetArgs`],
//! `control.rs` opens what a [`SourceArgs`] names), or declare a flag one command alone has.

use std::path::PathBuf;

use cairn_reconciler::controller::{HeadPolling, SourceSettings};
use cairn_schema::source::{Rewrite, Rewrites};

/// Where the database is.
#[derive(Debug, Clone, clap::Args)]
pub struct DbArgs {
    /// PostgreSQL URL (or DATABASE_URL). For a replicated database name every host, as libpq does
    /// (postgres://user:pw@host1:5432,host2:5432/cairn) or as URLs separated by commas: the writable
    /// primary is used, and `cairn serve` follows it when it moves
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    pub database_url: String,
}

/// Where the desired state is, and the key to its secrets.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// The config repository: a directory, or a git URL
    #[arg(long, value_name = "DIR|GIT_URL", default_value = ".")]
    pub repo: String,
    /// The branch (or full ref) of a git repository
    #[arg(long = "ref", value_name = "REF", default_value = "main")]
    pub git_ref: String,
    /// Where git sources are cached
    #[arg(long, value_name = "DIR", env = "CAIRN_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// The control plane's age identity (or CAIRN_IDENTITY): fingerprints secrets, re-encrypts them per node
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Fetch app sources whose URL starts with FROM from TO instead (like git's url.<base>.insteadOf);
    /// repeatable. Rewritten URLs are trusted operator configuration
    #[arg(long = "git-rewrite", value_name = "FROM=TO")]
    pub git_rewrite: Vec<Rewrite>,
    /// Refuse app sources whose host resolves to a private address (RFC 1918, CGNAT, IPv6 unique-local),
    /// as loopback, link-local and metadata addresses always are
    #[arg(long)]
    pub refuse_private_sources: bool,
    /// Do not poll app branch heads (leave pushes to webhooks); a head never read, or read from another
    /// branch than the app now follows, is still read once, so a new app or branch deploys at once
    #[arg(long)]
    pub no_poll_heads: bool,
    /// Seed for the scheduler's tie-breaks (the same seed gives the same plan)
    #[arg(long, default_value_t = 0, hide = true)]
    pub seed: u64,
}

impl SourceArgs {
    pub fn cache_root(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(std::env::temp_dir)
                .join("cairn")
        })
    }

    /// The `--git-rewrite`s, for everything that reaches a source: the head pollers, the webhook
    /// workers, the config repository's fetch.
    pub fn rewrites(&self) -> Rewrites {
        Rewrites::new(self.git_rewrite.iter().cloned())
    }

    /// What the controller (and `cairn serve`) make of these flags. Every head is polled on the
    /// interval, or with --no-poll-heads only those with no usable record (pushes to known branches
    /// are the webhooks' to record).
    pub fn settings(&self) -> SourceSettings {
        SourceSettings {
            repo: self.repo.clone(),
            git_ref: self.git_ref.clone(),
            cache_root: self.cache_root(),
            rewrites: self.rewrites(),
            refuse_private_sources: self.refuse_private_sources,
            head_polling: if self.no_poll_heads {
                HeadPolling::Unknown
            } else {
                HeadPolling::All
            },
            seed: self.seed,
        }
    }
}

/// Where to send an operator command (resolved by `remote.rs`).
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// The control plane's URL (or CAIRN_SERVER); with an admin token, use its API instead of the
    /// database. Several control planes: repeat it or separate the URLs with commas (the next is tried
    /// when one cannot be reached)
    #[arg(long, env = "CAIRN_SERVER", value_name = "URL", value_delimiter = ',')]
    pub server: Vec<String>,
    /// A file holding the admin API token (else CAIRN_TOKEN)
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// PostgreSQL URL (or DATABASE_URL), when not going through --server
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    pub database_url: Option<String>,
}
