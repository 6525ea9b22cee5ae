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
//! metadata address). The exception is an operator's [`Rewrite`] (`--git-rewrite FROM=TO`, like git's
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
        let rewritten =
            self.inner
                .rewrites
                .apply(url.as_str())
                .map_err(|e| SourceError::Refused {
                    url: redact_url(url.as_str()),
                    why: e.to_string(),
                })?;
        if let Some(rewritten) = rewritten {
            return Ok(Target::Rewritten(rewritten));
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
        for ip in addrs {
            cairn_schema::source::check_resolved(ip).map_err(|why| SourceError::Refused {
                url: shown.clone(),
                why: format!("`{host}` resolves to {why}"),
            })?;
        }
        Ok(Target::Checked(url.as_str().to_owned()))
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
            let target = self.target(&source.url)?;
            let shown = match &target {
                Target::Rewritten(to) => format!(
                    "{} (rewritten to {})",
                    redact_url(source.url.as_str()),
                    redact_url(to)
                ),
                Target::Checked(u) => redact_url(u),
            };
            let kind = fetch_commit(&repo, target.url(), commit, interrupt).map_err(|source| {
                SourceError::Fetch {
                    url: shown.clone(),
                    commit: commit.to_string(),
                    source,
                }
            })?;
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

fn fetch_commit(
    repo: &gix::Repository,
    url: &str,
    commit: ObjectId,
    interrupt: &AtomicBool,
) -> Result<FetchKind, BoxError> {
    let by_id = format!("{commit}:refs/cairn/commits/{commit}");
    let shallow =
        gix::remote::fetch::Shallow::DepthAtRemote(std::num::NonZeroU32::new(1).expect("1 > 0"));
    let first = match fetch_specs(repo, url, &[by_id.as_str()], shallow, interrupt) {
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
    let deepen = if repo.is_shallow() {
        gix::remote::fetch::Shallow::undo()
    } else {
        gix::remote::fetch::Shallow::NoChange
    };
    fetch_specs(
        repo,
        url,
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
    specs: &[&str],
    shallow: gix::remote::fetch::Shallow,
    interrupt: &AtomicBool,
) -> Result<(), BoxError> {
    let remote = repo
        .remote_at(url)?
        .with_refspecs(specs.iter().copied(), gix::remote::Direction::Fetch)?
        .with_fetch_tags(gix::remote::fetch::Tags::None);
    let connection = remote.connect(gix::remote::Direction::Fetch)?;
    connection
        .prepare_fetch(gix::progress::Discard, Default::default())?
        .with_shallow(shallow)
        .receive(gix::progress::Discard, interrupt)?;
    Ok(())
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
