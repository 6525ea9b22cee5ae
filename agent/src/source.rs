//! An app's source at an exact commit: fetched with gix into a per-repository bare cache, then the tree of
//! that commit written into a build directory.
//!
//! A fetch asks the remote for the commit itself, one commit deep (protocol v2 servers, GitHub's among
//! them, serve any reachable commit by id); a remote that refuses is fetched whole (all branches and
//! tags). A commit already in the cache is not fetched again.
//!
//! URLs come from manifests, so they are data: only `https://` and ssh remotes reach here (the spec's
//! [`GitUrl`] refuses the rest), and right before connecting the host is resolved and every address it
//! resolves to is checked with [`cairn_schema::source::check_resolved`] (no loopback, link-local or
//! metadata address). The fetch then connects to those checked addresses and nothing resolves the name
//! again (no DNS-rebinding window): https through `source/pinned.rs` (reqwest with the name pinned, no redirect,
//! no proxy, https only), ssh by handing the ssh client the checked address and
//! `-o HostKeyAlias=<name>` (so `known_hosts` is still checked under the name). The exception is an operator's [`Rewrite`] (`--git-rewrite FROM=TO`, like git's
//! `url.<base>.insteadOf`): a rewritten URL is trusted operator config, which is how mirrors, GitHub
//! Enterprise and local test remotes (`file://`) work.
//!
//! What it must not do: run `git` with anything taken from a manifest, follow HTTP redirects, read the
//! user's or system's git config (a global `insteadOf` would bypass the address check), or write outside
//! the build directory (tree paths are checked; symlinks are created last, so no write goes through one).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::io::Write;
use std::net::{IpAddr, ToSocketAddrs};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_schema::GitUrl;
use gix::ObjectId;
use gix::objs::tree::EntryKind;
use sha2::{Digest, Sha256};

use crate::spec::SourceSpec;

mod pinned;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What can go wrong getting a source. URLs are shown as the manifest wrote them, with any password in
/// them replaced by `***`.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    BadRewrite(#[from] RewriteError),
    #[error("source url `{url}` is not allowed: {why}")]
    Refused { url: String, why: String },
    #[error("cannot resolve the host of {url}")]
    Resolve {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{0}` is not a full commit id")]
    BadCommit(String),
    #[error("cannot open or create the source cache at {path}")]
    Cache {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
    #[error("cannot fetch commit {commit} from {url}")]
    Fetch {
        url: String,
        commit: String,
        #[source]
        source: BoxError,
    },
    #[error(
        "commit {commit} is not in {url} (asked for by id, then looked for in all branches and tags)"
    )]
    CommitMissing { url: String, commit: String },
    #[error("fetching {url} took longer than {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("cannot read commit {commit} from the source cache")]
    Read {
        commit: String,
        #[source]
        source: BoxError,
    },
    #[error("commit {commit} has a path the agent will not write: `{path}`")]
    UnsafePath { commit: String, path: String },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the fetch thread failed")]
    Join(#[source] tokio::task::JoinError),
}

pub use cairn_schema::source::{Rewrite, RewriteError, Rewrites};

/// Resolves host names to addresses (a seam so tests can make a name resolve to loopback).
pub trait Resolve: Send + Sync + fmt::Debug {
    fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<IpAddr>>;
}

/// The system resolver (`getaddrinfo`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<IpAddr>> {
        Ok((host, port).to_socket_addrs()?.map(|a| a.ip()).collect())
    }
}

/// Where a fetch will actually go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An operator rewrite matched: trusted as is.
    Rewritten(String),
    /// The manifest's URL, whose host resolved only to allowed addresses.
    Checked(String),
}

impl Target {
    pub fn url(&self) -> &str {
        match self {
            Target::Rewritten(u) | Target::Checked(u) => u,
        }
    }
}

/// How a checkout got its commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FetchKind {
    /// The commit was in the cache already.
    Cached,
    /// Fetched by id, one commit deep.
    ShallowById,
    /// The remote refused a fetch by id; all branches and tags were fetched.
    Full,
}

/// What a checkout did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Checkout {
    pub commit: String,
    pub fetch: FetchKind,
    pub files: u64,
    pub bytes: u64,
    /// Submodule paths, which are not fetched.
    pub skipped_submodules: Vec<String>,
}

/// The per-repository source caches of one agent. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Sources {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    rewrites: Rewrites,
    resolver: Arc<dyn Resolve>,
    locks: Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>,
}

impl Sources {
    /// `cache_root` is a directory this agent owns; each repository gets a bare cache under it.
    pub fn new(cache_root: impl Into<PathBuf>, rewrites: Rewrites) -> Self {
        Sources::with_resolver(cache_root, rewrites, Arc::new(SystemResolver))
    }

    pub fn with_resolver(
        cache_root: impl Into<PathBuf>,
        rewrites: Rewrites,
        resolver: Arc<dyn Resolve>,
    ) -> Self {
        Sources {
            inner: Arc::new(Inner {
                root: cache_root.into(),
                rewrites,
                resolver,
                locks: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Decides where a fetch of `url` goes: a rewrite's target, or the URL itself once every address its
    /// host resolves to passes [`cairn_schema::source::check_resolved`]. Blocking (it resolves).
    pub fn target(&self, url: &GitUrl) -> Result<Target, SourceError> {
        self.checked_target(url).map(|(t, _)| t)
    }

    /// [`Sources::target`], and for a checked URL the addresses that passed the check: the fetch
    /// connects to those and nowhere else (the name is not resolved again).
    fn checked_target(&self, url: &GitUrl) -> Result<(Target, Option<Pin>), SourceError> {
        let rewritten =
            self.inner
                .rewrites
                .apply(url.as_str())
                .map_err(|e| SourceError::Refused {
                    url: redact_url(url.as_str()),
                    why: e.to_string(),
                })?;
        if let Some(rewritten) = rewritten {
            return Ok((Target::Rewritten(rewritten), None));
        }
        let parts = url.parts();
        let host = parts
            .host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = parts
            .port
            .unwrap_or(if parts.scheme == "https" { 443 } else { 22 });
        let shown = redact_url(url.as_str());
        let addrs =
            self.inner
                .resolver
                .resolve(&host, port)
                .map_err(|source| SourceError::Resolve {
                    url: shown.clone(),
                    source,
                })?;
        if addrs.is_empty() {
            return Err(SourceError::Resolve {
                url: shown,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
            });
        }
        for ip in &addrs {
            cairn_schema::source::check_resolved(*ip).map_err(|why| SourceError::Refused {
                url: shown.clone(),
                why: format!("`{host}` resolves to {why}"),
            })?;
        }
        let pin = Pin {
            host,
            addrs: addrs
                .into_iter()
                .map(|ip| std::net::SocketAddr::new(ip, port))
                .collect(),
            https_only: true,
            ssh: "ssh".into(),
        };
        Ok((Target::Checked(url.as_str().to_owned()), Some(pin)))
    }

    /// The cache directory of a repository (keyed by the manifest's URL, not the rewritten one, so changing
    /// a mirror does not orphan caches).
    pub fn cache_dir(&self, url: &GitUrl) -> PathBuf {
        let digest = Sha256::digest(url.as_str().as_bytes());
        self.inner
            .root
            .join(format!("{}.git", hex::encode(&digest[..12])))
    }

    /// Fetches `source.commit` (unless cached) and writes its tree into `dest`, which must not exist or be
    /// empty. Gives up after `timeout` (the fetch is interrupted).
    pub async fn checkout(
        &self,
        source: &SourceSpec,
        dest: &Path,
        timeout: Duration,
    ) -> Result<Checkout, SourceError> {
        let this = self.clone();
        let (source, dest) = (source.clone(), dest.to_owned());
        let interrupt = Arc::new(AtomicBool::new(false));
        let flag = interrupt.clone();
        let url = redact_url(source.url.as_str());
        let job =
            tokio::task::spawn_blocking(move || this.checkout_blocking(&source, &dest, &flag));
        match tokio::time::timeout(timeout, job).await {
            Ok(joined) => joined.map_err(SourceError::Join)?,
            Err(_) => {
                interrupt.store(true, Ordering::Relaxed);
                Err(SourceError::Timeout {
                    url,
                    after: timeout,
                })
            }
        }
    }

    /// The blocking body of [`Sources::checkout`].
    pub fn checkout_blocking(
        &self,
        source: &SourceSpec,
        dest: &Path,
        interrupt: &AtomicBool,
    ) -> Result<Checkout, SourceError> {
        let commit = ObjectId::from_hex(source.commit.as_bytes())
            .map_err(|_| SourceError::BadCommit(source.commit.clone()))?;
        let cache = self.cache_dir(&source.url);
        let lock = {
            let mut locks = self.inner.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(cache.clone()).or_default().clone()
        };
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        let repo = open_cache(&cache)?;
        let fetch = if has_commit(&repo, commit) {
            FetchKind::Cached
        } else {
            let (target, pin) = self.checked_target(&source.url)?;
            let shown = match &target {
                Target::Rewritten(to) => format!(
                    "{} (rewritten to {})",
                    redact_url(source.url.as_str()),
                    redact_url(to)
                ),
                Target::Checked(u) => redact_url(u),
            };
            let kind = fetch_commit(&repo, target.url(), pin.as_ref(), commit, interrupt).map_err(
                |source| SourceError::Fetch {
                    url: shown.clone(),
                    commit: commit.to_string(),
                    source,
                },
            )?;
            // Another handle sees new packs only after a refresh; a fresh open is the simple way.
            let repo = open_cache(&cache)?;
            if !has_commit(&repo, commit) {
                return Err(SourceError::CommitMissing {
                    url: shown,
                    commit: commit.to_string(),
                });
            }
            kind
        };
        let repo = open_cache(&cache)?;
        let mut out = Checkout {
            commit: commit.to_string(),
            fetch,
            files: 0,
            bytes: 0,
            skipped_submodules: Vec::new(),
        };
        materialize(&repo, commit, dest, &mut out)?;
        Ok(out)
    }
}

fn open_cache(path: &Path) -> Result<gix::Repository, SourceError> {
    let err = |e: BoxError| SourceError::Cache {
        path: path.to_owned(),
        source: e,
    };
    if !path.join("HEAD").exists() {
        std::fs::create_dir_all(path).map_err(|e| err(Box::new(e)))?;
        gix::init_bare(path).map_err(|e| err(Box::new(e)))?;
    }
    let mut repo =
        gix::open_opts(path, gix::open::Options::isolated()).map_err(|e| err(Box::new(e)))?;
    // A redirect could point an allowed host at a forbidden address after the check.
    let mut cfg = repo.config_snapshot_mut();
    cfg.set_value(&gix::config::tree::Http::FOLLOW_REDIRECTS, "false")
        .map_err(|e| err(Box::new(e)))?;
    cfg.commit().map_err(|e| err(Box::new(e)))?;
    Ok(repo)
}

fn has_commit(repo: &gix::Repository, id: ObjectId) -> bool {
    matches!(repo.try_find_object(id), Ok(Some(o)) if o.kind == gix::object::Kind::Commit)
}

/// Where a checked fetch may connect: the host's checked addresses.
#[derive(Debug, Clone)]
pub(crate) struct Pin {
    pub(crate) host: String,
    pub(crate) addrs: Vec<std::net::SocketAddr>,
    /// Refuse anything but https (a manifest's URL); off only in tests of the pinning itself.
    pub(crate) https_only: bool,
    /// The ssh client (`ssh`; a stand-in in tests).
    pub(crate) ssh: std::ffi::OsString,
}

fn fetch_commit(
    repo: &gix::Repository,
    url: &str,
    pin: Option<&Pin>,
    commit: ObjectId,
    interrupt: &AtomicBool,
) -> Result<FetchKind, BoxError> {
    let by_id = format!("{commit}:refs/cairn/commits/{commit}");
    let shallow =
        gix::remote::fetch::Shallow::DepthAtRemote(std::num::NonZeroU32::new(1).expect("1 > 0"));
    let first = match fetch_specs(repo, url, pin, &[by_id.as_str()], shallow, interrupt) {
        Ok(()) => {
            if has_commit(
                &gix::open_opts(repo.path(), gix::open::Options::isolated())?,
                commit,
            ) {
                return Ok(FetchKind::ShallowById);
            }
            None
        }
        Err(e) => Some(e),
    };
    if interrupt.load(Ordering::Relaxed) {
        return Err(first.unwrap_or_else(|| "interrupted".into()));
    }
    // The remote refused to serve an unadvertised commit: fetch every branch and tag, with full history
    // (the commit may be anywhere in it).
    let deepen = if repo.is_shallow()? {
        gix::remote::fetch::Shallow::undo()
    } else {
        gix::remote::fetch::Shallow::NoChange
    };
    fetch_specs(
        repo,
        url,
        pin,
        &[
            "+refs/heads/*:refs/cairn/heads/*",
            "+refs/tags/*:refs/cairn/tags/*",
        ],
        deepen,
        interrupt,
    )
    .map_err(|e| match first {
        Some(first) => format!("{e} (and by id: {first})").into(),
        None => e,
    })?;
    Ok(FetchKind::Full)
}

fn fetch_specs(
    repo: &gix::Repository,
    url: &str,
    pin: Option<&Pin>,
    specs: &[&str],
    shallow: gix::remote::fetch::Shallow,
    interrupt: &AtomicBool,
) -> Result<(), BoxError> {
    let remote = repo
        .remote_at(url)?
        .with_refspecs(specs.iter().copied(), gix::remote::Direction::Fetch)?
        .with_fetch_tags(gix::remote::fetch::Tags::None);
    match pin {
        // http(s): connect to the checked addresses only.
        Some(pin)
            if url.starts_with("https://") || (!pin.https_only && url.starts_with("http://")) =>
        {
            let http = pinned::PinnedHttp::new(&pin.host, &pin.addrs, pin.https_only)?;
            let parsed = gix::url::parse(url.as_bytes())?;
            let transport = gix::protocol::transport::client::blocking_io::http::connect_http(
                http,
                parsed,
                gix::protocol::transport::Protocol::V2,
                false,
            );
            remote
                .to_connection_with_transport(transport)
                .prepare_fetch(gix::progress::Discard, Default::default())?
                .with_shallow(shallow)
                .receive(gix::progress::Discard, interrupt)?;
        }
        // ssh: the client is given the checked address, and checks the host key under the name.
        Some(pin) if !url.contains("://") || url.starts_with("ssh://") => {
            let wrapper = ssh_wrapper(pin)?;
            let mut last = None;
            for addr in &pin.addrs {
                let mut parsed = gix::url::parse(url.as_bytes())?;
                parsed.host = Some(addr.ip().to_string());
                use gix::protocol::transport::client::blocking_io::ssh;
                let options = ssh::connect::Options {
                    command: Some(wrapper.path().join("ssh").into_os_string()),
                    disallow_shell: true,
                    kind: Some(ssh::ProgramKind::Ssh),
                };
                let transport = ssh::connect(
                    parsed,
                    gix::protocol::transport::Protocol::V2,
                    options,
                    false,
                )?;
                let fetched = remote
                    .to_connection_with_transport(transport)
                    .prepare_fetch(gix::progress::Discard, Default::default())
                    .map_err(BoxError::from)
                    .and_then(|p| {
                        p.with_shallow(shallow.clone())
                            .receive(gix::progress::Discard, interrupt)
                            .map(|_| ())
                            .map_err(BoxError::from)
                    });
                match fetched {
                    Ok(()) => return Ok(()),
                    Err(e) => last = Some(e),
                }
            }
            return Err(last.unwrap_or_else(|| "no checked address".into()));
        }
        // Operator rewrites (trusted as configured).
        _ => {
            remote
                .connect(gix::remote::Direction::Fetch)?
                .prepare_fetch(gix::progress::Discard, Default::default())?
                .with_shallow(shallow)
                .receive(gix::progress::Discard, interrupt)?;
        }
    }
    Ok(())
}

/// An ssh command for gix that connects to the checked address it is given while checking the host
/// key under the manifest's host name (`HostKeyAlias`), so `known_hosts` works as for the name.
fn ssh_wrapper(pin: &Pin) -> Result<tempfile::TempDir, BoxError> {
    // The name goes into a script: only host-name characters (GitUrl accepted it already).
    if pin.host.is_empty()
        || !pin
            .host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        || pin.host.starts_with('-')
    {
        return Err(format!("`{}` is not a host name ssh can check a key for", pin.host).into());
    }
    let dir = tempfile::tempdir()?;
    let ssh = pin.ssh.to_string_lossy();
    if ssh.contains('\'') {
        return Err("the ssh program's path holds a quote".into());
    }
    let script = format!(
        "#!/bin/sh\nexec '{ssh}' -o HostKeyAlias={host} -o CheckHostIP=no \"$@\"\n",
        host = pin.host
    );
    let path = dir.path().join("ssh");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .open(&path)?;
    f.write_all(script.as_bytes())?;
    Ok(dir)
}

/// Writes the tree of `commit` into `dest`: files with their executable bit, directories, and symlinks
/// last. Submodules are skipped (and listed).
fn materialize(
    repo: &gix::Repository,
    commit: ObjectId,
    dest: &Path,
    out: &mut Checkout,
) -> Result<(), SourceError> {
    let read = |e: BoxError| SourceError::Read {
        commit: commit.to_string(),
        source: e,
    };
    let tree = repo
        .find_commit(commit)
        .map_err(|e| read(Box::new(e)))?
        .tree_id()
        .map_err(|e| read(Box::new(e)))?
        .detach();
    std::fs::create_dir_all(dest).map_err(|source| SourceError::Write {
        path: dest.to_owned(),
        source,
    })?;
    let mut links = Vec::new();
    write_tree(repo, commit, tree, dest, "", 0, &mut links, out)?;
    for (path, target) in links {
        std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
            .map_err(|source| SourceError::Write { path, source })?;
        out.files += 1;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn write_tree(
    repo: &gix::Repository,
    commit: ObjectId,
    tree: ObjectId,
    dir: &Path,
    prefix: &str,
    depth: usize,
    links: &mut Vec<(PathBuf, Vec<u8>)>,
    out: &mut Checkout,
) -> Result<(), SourceError> {
    let read = |e: BoxError| SourceError::Read {
        commit: commit.to_string(),
        source: e,
    };
    if depth > 128 {
        return Err(SourceError::UnsafePath {
            commit: commit.to_string(),
            path: format!("{prefix} (nested deeper than 128 directories)"),
        });
    }
    let obj = repo
        .find_object(tree)
        .map_err(|e| read(Box::new(e)))?
        .try_into_tree()
        .map_err(|e| read(Box::new(e)))?;
    let mut entries = Vec::new();
    for entry in obj.iter() {
        let entry = entry.map_err(|e| read(Box::new(e)))?;
        entries.push((
            entry.filename().to_vec(),
            entry.mode().kind(),
            entry.oid().to_owned(),
        ));
    }
    for (name, kind, id) in entries {
        let shown = format!("{prefix}{}", String::from_utf8_lossy(&name));
        if name.is_empty()
            || name == b"."
            || name == b".."
            || name.eq_ignore_ascii_case(b".git")
            || name.contains(&b'/')
            || name.contains(&0)
        {
            return Err(SourceError::UnsafePath {
                commit: commit.to_string(),
                path: shown,
            });
        }
        let path = dir.join(OsStr::from_bytes(&name));
        let write_err = |source| SourceError::Write {
            path: path.clone(),
            source,
        };
        match kind {
            EntryKind::Tree => {
                std::fs::create_dir(&path).map_err(write_err)?;
                write_tree(
                    repo,
                    commit,
                    id,
                    &path,
                    &format!("{shown}/"),
                    depth + 1,
                    links,
                    out,
                )?;
            }
            EntryKind::Blob | EntryKind::BlobExecutable => {
                let blob = repo.find_object(id).map_err(|e| read(Box::new(e)))?;
                let mode = if kind == EntryKind::BlobExecutable {
                    0o755
                } else {
                    0o644
                };
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&path)
                    .map_err(write_err)?;
                f.write_all(&blob.data).map_err(write_err)?;
                out.files += 1;
                out.bytes += blob.data.len() as u64;
            }
            EntryKind::Link => {
                let blob = repo.find_object(id).map_err(|e| read(Box::new(e)))?;
                links.push((path, blob.data.clone()));
            }
            EntryKind::Commit => out.skipped_submodules.push(shown),
        }
    }
    Ok(())
}

/// A URL with the password of its userinfo (if any) replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..auth_end];
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!(
                "{}://{user}:***@{host}{}",
                &url[..scheme_end],
                &rest[auth_end..]
            )
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed(Vec<IpAddr>);
    impl Resolve for Fixed {
        fn resolve(&self, _: &str, _: u16) -> std::io::Result<Vec<IpAddr>> {
            Ok(self.0.clone())
        }
    }

    fn url(s: &str) -> GitUrl {
        GitUrl::new(s).unwrap()
    }

    #[test]
    fn longest_rewrite_wins_and_cannot_be_climbed_out_of() {
        let rw = Rewrites::parse([
            "https://github.com/=file:///srv/mirror/",
            "https://github.com/acme/=file:///srv/acme/",
        ])
        .unwrap();
        assert_eq!(
            rw.apply("https://github.com/acme/web.git")
                .unwrap()
                .as_deref(),
            Some("file:///srv/acme/web.git")
        );
        assert_eq!(
            rw.apply("https://github.com/other/x.git")
                .unwrap()
                .as_deref(),
            Some("file:///srv/mirror/other/x.git")
        );
        assert_eq!(rw.apply("https://gitlab.com/a/b.git").unwrap(), None);
        assert!(rw.apply("https://github.com/acme/../../etc/x.git").is_err());
        assert!("nonsense".parse::<Rewrite>().is_err());
        assert!("=x".parse::<Rewrite>().is_err());
    }

    #[test]
    fn resolved_addresses_are_checked_unless_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            "127.0.0.1",
            "169.254.169.254",
            "::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            let s = Sources::with_resolver(
                dir.path(),
                Rewrites::default(),
                Arc::new(Fixed(vec![
                    "93.184.216.34".parse().unwrap(),
                    bad.parse().unwrap(),
                ])),
            );
            let err = s
                .target(&url("https://git.example.com/acme/web.git"))
                .unwrap_err();
            assert!(
                matches!(&err, SourceError::Refused { why, .. } if why.contains("git.example.com")),
                "{bad}: {err}"
            );
        }
        let ok = Sources::with_resolver(
            dir.path(),
            Rewrites::default(),
            Arc::new(Fixed(vec!["93.184.216.34".parse().unwrap()])),
        );
        assert_eq!(
            ok.target(&url("git@git.example.com:acme/web.git")).unwrap(),
            Target::Checked("git@git.example.com:acme/web.git".into())
        );
        let rewritten = Sources::with_resolver(
            dir.path(),
            Rewrites::parse(["https://git.example.com/=file:///srv/git/"]).unwrap(),
            Arc::new(Fixed(vec!["127.0.0.1".parse().unwrap()])),
        );
        assert_eq!(
            rewritten
                .target(&url("https://git.example.com/acme/web.git"))
                .unwrap(),
            Target::Rewritten("file:///srv/git/acme/web.git".into())
        );
    }

    /// A smart-HTTP git remote (busybox httpd running `git http-backend` as CGI) on 127.0.0.1.
    struct HttpRemote {
        _dir: tempfile::TempDir,
        server: std::process::Child,
        port: u16,
        commit: ObjectId,
    }

    impl Drop for HttpRemote {
        fn drop(&mut self) {
            let _ = self.server.kill();
            let _ = self.server.wait();
        }
    }

    fn http_remote() -> Option<HttpRemote> {
        const BUSYBOX: &str = "/bin/busybox";
        if !Path::new(BUSYBOX).is_file() {
            cairn_testkit::missing("pinned_fetch", BUSYBOX, "not installed (busybox-static)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let (remotes, work, www) = (
            dir.path().join("remotes"),
            dir.path().join("work"),
            dir.path().join("www"),
        );
        for d in [&remotes, &work, &www.join("cgi-bin")] {
            std::fs::create_dir_all(d).unwrap();
        }
        let bare = remotes.join("web.git");
        cairn_testkit::git(&remotes, &["init", "--bare", "-q", "web.git"]);
        cairn_testkit::git(&work, &["init", "-q"]);
        std::fs::write(work.join("README"), "pinned\n").unwrap();
        cairn_testkit::git(&work, &["add", "-A"]);
        cairn_testkit::git(&work, &["commit", "-q", "-m", "one"]);
        cairn_testkit::git(
            &work,
            &["push", "-q", bare.to_str().unwrap(), "HEAD:refs/heads/main"],
        );
        let commit = cairn_testkit::git(&work, &["rev-parse", "HEAD"]);
        let cgi = www.join("cgi-bin/git");
        std::fs::write(
            &cgi,
            format!(
                "#!/bin/sh\nexport GIT_PROJECT_ROOT={} GIT_HTTP_EXPORT_ALL=1 GIT_CONFIG_NOSYSTEM=1 HOME=/nonexistent\nexec git http-backend\n",
                remotes.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&cgi, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = std::process::Command::new(BUSYBOX)
            .args(["httpd", "-f", "-p", &format!("127.0.0.1:{port}"), "-h"])
            .arg(&www)
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(HttpRemote {
            _dir: dir,
            server,
            port,
            commit: ObjectId::from_hex(commit.trim().as_bytes()).unwrap(),
        })
    }

    #[test]
    fn pinned_fetch_connects_to_the_checked_address_and_never_resolves_the_name_again() {
        let Some(remote) = http_remote() else { return };
        // A name no resolver knows: only the pin (what the check saw) can take the fetch anywhere.
        let url = format!(
            "http://rebind.cairn.invalid:{}/cgi-bin/git/web.git",
            remote.port
        );
        let cache = tempfile::tempdir().unwrap();

        // Unpinned (what the agent did before: the git client resolves the name itself): no address.
        let repo = open_cache(&cache.path().join("unpinned.git")).unwrap();
        let unpinned = fetch_commit(&repo, &url, None, remote.commit, &AtomicBool::new(false));
        assert!(unpinned.is_err(), "the name resolved on its own");

        // Pinned to the checked address: fetched from there.
        let pin = Pin {
            host: "rebind.cairn.invalid".into(),
            addrs: vec![std::net::SocketAddr::from(([127, 0, 0, 1], remote.port))],
            https_only: false,
            ssh: "ssh".into(),
        };
        let repo = open_cache(&cache.path().join("pinned.git")).unwrap();
        fetch_commit(
            &repo,
            &url,
            Some(&pin),
            remote.commit,
            &AtomicBool::new(false),
        )
        .unwrap_or_else(|e| panic!("pinned fetch: {e}"));
        let repo = open_cache(&cache.path().join("pinned.git")).unwrap();
        assert!(has_commit(&repo, remote.commit));

        // Pinned elsewhere (a closed port): the fetch fails; nothing falls back to DNS or to the
        // address the server really has.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let elsewhere = Pin {
            addrs: vec![closed],
            ..pin.clone()
        };
        let repo = open_cache(&cache.path().join("elsewhere.git")).unwrap();
        let url_closed = format!(
            "http://rebind.cairn.invalid:{}/cgi-bin/git/web.git",
            closed.port()
        );
        assert!(
            fetch_commit(
                &repo,
                &url_closed,
                Some(&elsewhere),
                remote.commit,
                &AtomicBool::new(false)
            )
            .is_err()
        );
    }

    #[test]
    fn a_manifest_url_is_fetched_only_over_https_through_the_pin() {
        let Some(remote) = http_remote() else { return };
        let url = format!(
            "http://rebind.cairn.invalid:{}/cgi-bin/git/web.git",
            remote.port
        );
        let pin = Pin {
            host: "rebind.cairn.invalid".into(),
            addrs: vec![std::net::SocketAddr::from(([127, 0, 0, 1], remote.port))],
            https_only: true,
            ssh: "ssh".into(),
        };
        let cache = tempfile::tempdir().unwrap();
        let repo = open_cache(&cache.path().join("c.git")).unwrap();
        assert!(
            fetch_commit(
                &repo,
                &url,
                Some(&pin),
                remote.commit,
                &AtomicBool::new(false)
            )
            .is_err(),
            "plain http through an https-only pin"
        );
    }

    #[test]
    fn a_pinned_ssh_fetch_gives_ssh_the_checked_address_and_checks_the_key_under_the_name() {
        let Some(remote) = http_remote() else { return };
        let bare = remote._dir.path().join("remotes/web.git");
        // A stand-in for ssh: says how it was called, then runs the remote command (the words after
        // user@host, joined, as ssh does) here.
        let dir = tempfile::tempdir().unwrap();
        let (fake, log) = (dir.path().join("fake-ssh"), dir.path().join("ssh.log"));
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\necho \"$@\" >> {}\nwhile [ $# -gt 0 ]; do case $1 in *@*) shift; break;; *) shift;; esac; done\nexec sh -c \"$*\"\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let url = format!("ssh://git@rebind.cairn.invalid{}", bare.display());
        let pin = Pin {
            host: "rebind.cairn.invalid".into(),
            addrs: vec!["203.0.113.9:22".parse().unwrap()],
            https_only: true,
            ssh: fake.into_os_string(),
        };
        let cache = tempfile::tempdir().unwrap();
        let repo = open_cache(&cache.path().join("ssh.git")).unwrap();
        fetch_commit(
            &repo,
            &url,
            Some(&pin),
            remote.commit,
            &AtomicBool::new(false),
        )
        .unwrap_or_else(|e| {
            panic!(
                "pinned ssh fetch: {e}; ssh was called as: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        let repo = open_cache(&cache.path().join("ssh.git")).unwrap();
        assert!(has_commit(&repo, remote.commit));
        let called = std::fs::read_to_string(&log).unwrap();
        assert!(called.contains("git@203.0.113.9 "), "{called}");
        assert!(
            called.contains("HostKeyAlias=rebind.cairn.invalid"),
            "{called}"
        );
        assert!(
            !called
                .replace("HostKeyAlias=rebind.cairn.invalid", "")
                .contains("rebind"),
            "ssh never gets the name to resolve: {called}"
        );

        // A host name that is no host name never reaches a script.
        let bad = Pin {
            host: "x;reboot".into(),
            ..pin
        };
        assert!(ssh_wrapper(&bad).is_err());
    }

    #[test]
    fn passwords_in_urls_are_not_shown() {
        assert_eq!(
            redact_url("https://bot:tok3n@github.com/a/b.git"),
            "https://bot:***@github.com/a/b.git"
        );
        assert_eq!(
            redact_url("git@github.com:a/b.git"),
            "git@github.com:a/b.git"
        );
    }
}
