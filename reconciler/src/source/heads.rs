//! Source heads: the commit each app's branch points at, found by asking the app's git remote for its
//! refs (no objects are fetched). The control plane polls them on an interval (webhooks record them sooner),
//! or, left to webhooks, reads only the heads it has no usable record of; the planner turns a moved head
//! into a release.
//!
//! What it must not do: fetch or build anything (the agent does), pass a manifest's ref or URL to a git
//! command line, or poll a URL that names or resolves to a loopback, link-local or metadata address (or,
//! with `--refuse-private-sources`, a private one), unless an operator rewrite made it: that is trusted
//! configuration. The manifest's host is resolved and every address checked right before the listing;
//! the repository it lists through sees none of the machine's git configuration and follows no
//! redirects ([`super::open_cache`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, ToSocketAddrs};
use std::path::PathBuf;

use cairn_schema::source::Rewrites;
use cairn_schema::{App, Desired, Name};
use gix::ObjectId;

/// Why a head could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("cannot open the scratch repository at {0}")]
    Scratch(PathBuf, #[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("source url of app `{app}` is not allowed: {why}")]
    Refused { app: String, why: String },
    #[error("cannot list the refs of app `{app}`'s source")]
    List {
        app: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Resolves a host name to addresses: the system's resolver, or a test's.
pub type Resolver = fn(&str, u16) -> std::io::Result<Vec<IpAddr>>;

fn system_resolver(host: &str, port: u16) -> std::io::Result<Vec<IpAddr>> {
    Ok((host, port).to_socket_addrs()?.map(|a| a.ip()).collect())
}

/// Asks remotes for branch heads. Cheap to keep: one scratch bare repository whose object database stays
/// empty.
#[derive(Debug)]
pub struct HeadPoller {
    scratch: PathBuf,
    rewrites: Rewrites,
    repo: Option<gix::Repository>,
    resolve: Resolver,
    refuse_private: bool,
    listings: u64,
}

/// A head found for an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub app: Name,
    pub branch: String,
    pub commit: String,
}

impl HeadPoller {
    pub fn new(scratch: impl Into<PathBuf>, rewrites: Rewrites) -> Self {
        HeadPoller {
            scratch: scratch.into(),
            rewrites,
            repo: None,
            resolve: system_resolver,
            refuse_private: false,
            listings: 0,
        }
    }

    /// Also refuses manifest URLs whose host resolves to a private address (RFC 1918, CGNAT, unique-local).
    pub fn refuse_private(mut self, refuse: bool) -> Self {
        self.refuse_private = refuse;
        self
    }

    /// Resolves host names with `resolve` instead of the system's resolver.
    pub fn with_resolver(mut self, resolve: Resolver) -> Self {
        self.resolve = resolve;
        self
    }

    /// The URL an app's source is really fetched from.
    pub fn fetch_url(&self, app: &Name, url: &str) -> Result<String, HeadError> {
        let refused = |why: String| HeadError::Refused {
            app: app.to_string(),
            why,
        };
        match self
            .rewrites
            .apply(url)
            .map_err(|e| refused(e.to_string()))?
        {
            Some(rewritten) => Ok(rewritten),
            None => {
                let checked = cairn_schema::GitUrl::new(url).map_err(refused)?;
                self.check_addresses(&checked).map_err(refused)?;
                Ok(url.to_owned())
            }
        }
    }

    /// Resolves the URL's host and refuses it unless every address passes
    /// [`cairn_schema::source::check_resolved`] (and [`cairn_schema::source::check_public`] when private
    /// addresses are refused): a name that points at this machine or the metadata service is refused
    /// like the address itself.
    fn check_addresses(&self, url: &cairn_schema::GitUrl) -> Result<(), String> {
        let parts = url.parts();
        let host = parts.host.trim_start_matches('[').trim_end_matches(']');
        let port = parts
            .port
            .unwrap_or(if parts.scheme == "https" { 443 } else { 22 });
        let addrs =
            (self.resolve)(host, port).map_err(|e| format!("cannot resolve `{host}`: {e}"))?;
        if addrs.is_empty() {
            return Err(format!("`{host}` resolves to no address"));
        }
        for ip in addrs {
            cairn_schema::source::check_resolved(ip)
                .and_then(|()| match self.refuse_private {
                    true => cairn_schema::source::check_public(ip),
                    false => Ok(()),
                })
                .map_err(|why| format!("`{host}` resolves to {why}"))?;
        }
        Ok(())
    }

    /// The commit `refs/heads/<branch>` of `url` points at, or `None` when the branch does not exist.
    pub fn head(
        &mut self,
        app: &Name,
        url: &str,
        branch: &str,
    ) -> Result<Option<String>, HeadError> {
        let fetch_url = self.fetch_url(app, url)?;
        let mut found = self
            .list(&fetch_url, &[branch])
            .map_err(|e| Self::list_error(app, e))?;
        Ok(found.remove(branch))
    }

    fn list_error(app: &Name, e: ListError) -> HeadError {
        match e {
            ListError::Scratch(path, e) => HeadError::Scratch(path, e),
            ListError::List(e) => HeadError::List {
                app: app.to_string(),
                source: e,
            },
        }
    }

    /// How many ref listings this poller has made (one per remote URL per [`HeadPoller::poll`]).
    pub fn listings(&self) -> u64 {
        self.listings
    }

    /// Lists `fetch_url`'s refs once and returns the commit each of `branches` points at (a branch that
    /// does not exist is absent).
    fn list(
        &mut self,
        fetch_url: &str,
        branches: &[&str],
    ) -> Result<BTreeMap<String, String>, ListError> {
        if self.repo.is_none() {
            let scratch = self.scratch.clone();
            let repo = super::open_cache(&scratch).map_err(|e| ListError::Scratch(scratch, e))?;
            self.repo = Some(repo);
        }
        let repo = self.repo.as_ref().expect("just set");
        let list = |e: Box<dyn std::error::Error + Send + Sync>| ListError::List(e);
        let specs: Vec<String> = branches
            .iter()
            .map(|b| format!("+refs/heads/{b}:refs/cairn-heads/{b}"))
            .collect();
        self.listings += 1;
        let remote = repo
            .remote_at(fetch_url)
            .map_err(|e| list(Box::new(e)))?
            .with_refspecs(
                specs.iter().map(String::as_str),
                gix::remote::Direction::Fetch,
            )
            .map_err(|e| list(Box::new(e)))?
            .with_fetch_tags(gix::remote::fetch::Tags::None);
        let (map, _) = remote
            .connect(gix::remote::Direction::Fetch)
            .map_err(|e| list(Box::new(e)))?
            .ref_map(gix::progress::Discard, Default::default())
            .map_err(|e| list(Box::new(e)))?;
        let mut advertised: BTreeMap<&[u8], &ObjectId> = BTreeMap::new();
        for r in &map.remote_refs {
            let (name, id): (&[u8], &ObjectId) = match r {
                gix::protocol::handshake::Ref::Direct {
                    full_ref_name,
                    object,
                } => (full_ref_name.as_ref(), object),
                gix::protocol::handshake::Ref::Peeled {
                    full_ref_name,
                    object,
                    ..
                } => (full_ref_name.as_ref(), object),
                gix::protocol::handshake::Ref::Symbolic {
                    full_ref_name,
                    object,
                    ..
                } => (full_ref_name.as_ref(), object),
                _ => continue,
            };
            advertised.entry(name).or_insert(id);
        }
        Ok(branches
            .iter()
            .filter_map(|b| {
                let wanted = format!("refs/heads/{b}");
                advertised
                    .get(wanted.as_bytes())
                    .map(|id| ((*b).to_owned(), id.to_string()))
            })
            .collect())
    }

    /// Heads of the apps that follow a branch (a pinned `rev` needs none) and that `wanted` keeps (e.g.
    /// only those whose head is not known). Each remote URL is checked and listed once, however many
    /// apps (and branches) it serves. Apps whose remote cannot be asked are reported in the second list,
    /// the rest still counted.
    pub fn poll(
        &mut self,
        desired: &Desired,
        mut wanted: impl FnMut(&Name, &App) -> bool,
    ) -> (Vec<Head>, Vec<HeadError>) {
        let mut heads = Vec::new();
        let mut errors = Vec::new();
        // By the manifest's URL: the apps that share it, with their branches.
        let mut by_url: BTreeMap<&str, Vec<(&Name, &str)>> = BTreeMap::new();
        for (name, app) in &desired.apps {
            if app.source.rev.is_some() || !wanted(name, app) {
                continue;
            }
            by_url
                .entry(app.source.url.as_str())
                .or_default()
                .push((name, app.source.branch.as_str()));
        }
        for (url, apps) in by_url {
            let (first, _) = apps[0];
            let found = self.fetch_url(first, url).and_then(|fetch_url| {
                let mut branches: Vec<&str> = apps.iter().map(|(_, b)| *b).collect();
                branches.sort_unstable();
                branches.dedup();
                self.list(&fetch_url, &branches)
                    .map_err(|e| Self::list_error(first, e))
            });
            let found = match found {
                Ok(found) => found,
                Err(e) => {
                    // Every app of the URL failed the same way; each is named in its own error.
                    for (name, _) in &apps[1..] {
                        errors.push(e.for_app(name));
                    }
                    errors.push(e);
                    continue;
                }
            };
            for (name, branch) in apps {
                match found.get(branch) {
                    Some(commit) => heads.push(Head {
                        app: name.clone(),
                        branch: branch.to_owned(),
                        commit: commit.clone(),
                    }),
                    None => errors.push(HeadError::List {
                        app: name.to_string(),
                        source: format!("branch `{branch}` does not exist").into(),
                    }),
                }
            }
        }
        (heads, errors)
    }
}

impl HeadError {
    /// The same failure, told of another app of the same remote.
    fn for_app(&self, app: &Name) -> HeadError {
        match self {
            HeadError::Refused { why, .. } => HeadError::Refused {
                app: app.to_string(),
                why: why.clone(),
            },
            HeadError::Scratch(..) => HeadError::List {
                app: app.to_string(),
                source: cairn_schema::error::chain(self).into(),
            },
            HeadError::List { source, .. } => HeadError::List {
                app: app.to_string(),
                source: cairn_schema::error::chain(source.as_ref()).into(),
            },
        }
    }
}

/// Why one listing failed, before it is told which app asked.
enum ListError {
    Scratch(PathBuf, Box<dyn std::error::Error + Send + Sync>),
    List(Box<dyn std::error::Error + Send + Sync>),
}
