//! The config source `cairn serve`, `cairn plan` and `cairn apply` read desired state from: a working
//! directory or a git remote, and the parse and validation of what it holds, with a panic in them
//! caught and turned into that commit's error.
//!
//! What it must not do: interpret manifests beyond `cairn-schema`'s parse and validation, or touch the
//! database (whether a commit was applied is the controller's question).

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;

use cairn_schema::Diagnostic;
use sha2::{Digest, Sha256};

use super::Snapshot;
use super::git::{GitError, GitSource};
use crate::panics::{PANIC_REASON, inject_panic, panic_message};

/// Where desired state is read from.
#[derive(Debug)]
pub enum ConfigSource {
    /// A working tree; its "commit" is a hash of the manifests' paths and bytes.
    Dir(PathBuf),
    Git(GitSource),
}

/// Why the config source could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read config directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Git(#[from] GitError),
}

impl ConfigSource {
    /// A directory if `repo` is one, else a git remote (cached under `cache_root`).
    pub fn open(repo: &str, refname: &str, cache_root: &std::path::Path) -> ConfigSource {
        let path = std::path::Path::new(repo);
        if path.is_dir() {
            ConfigSource::Dir(path.to_path_buf())
        } else {
            let cache = crate::source::git::cache_dir(cache_root, repo);
            ConfigSource::Git(GitSource::new(repo, refname, cache))
        }
    }

    /// The apps whose manifest may differ between two desired states this source loaded, when it
    /// knows (a git source assembles each commit from the last; a directory is read afresh).
    pub fn apps_changed(
        &self,
        since: cairn_schema::Revision,
        to: cairn_schema::Revision,
    ) -> Option<std::collections::BTreeSet<cairn_schema::Name>> {
        match self {
            ConfigSource::Git(g) => g.apps_changed(since, to),
            ConfigSource::Dir(_) => None,
        }
    }

    /// What the history names as the source.
    pub fn label(&self) -> String {
        match self {
            ConfigSource::Dir(p) => p.display().to_string(),
            ConfigSource::Git(g) => format!("{}#{}", g.url(), g.refname()),
        }
    }

    /// Reads the newest desired state: fetches a git ref, or re-reads a directory. A panic while the
    /// commit's files are parsed and validated is caught: the snapshot is then that commit, invalid, with
    /// the panic as its error. A git ref still at the commit read last gives that commit's snapshot again
    /// (shared, not re-validated): an idle source costs a fetch.
    pub fn read(&mut self) -> Result<Arc<Snapshot>, ReadError> {
        match self {
            ConfigSource::Dir(dir) => {
                let snap = crate::source::dir::read_dir(dir).map_err(|source| ReadError::Dir {
                    path: dir.clone(),
                    source,
                })?;
                let mut h = Sha256::new();
                for (p, b) in &snap.files {
                    h.update((p.len() as u64).to_le_bytes());
                    h.update(p.as_bytes());
                    h.update((b.len() as u64).to_le_bytes());
                    h.update(b);
                }
                let commit = format!("dir-{}", &hex::encode(h.finalize())[..16]);
                Ok(Arc::new(validated(&commit, || {
                    let files = cairn_schema::parse_files(&snap.files)
                        .into_iter()
                        .map(Arc::new)
                        .collect();
                    let mut s = Snapshot::new(Some(commit.clone()), files, snap.diagnostics);
                    s.read_referenced(|rel| crate::source::dir::read_referenced(dir, rel));
                    s
                })))
            }
            ConfigSource::Git(g) => {
                let head = g.fetch()?;
                if let Some((id, snap)) = &g.last
                    && *id == head
                {
                    return Ok(snap.clone());
                }
                let commit = head.to_string();
                let mut failed = None;
                let snap = validated(&commit, || match g.load(head) {
                    Ok(s) => s,
                    Err(e) => {
                        failed = Some(e);
                        Snapshot::new(Some(commit.clone()), Vec::new(), Vec::new())
                    }
                });
                match failed {
                    Some(e) => Err(e.into()),
                    None => {
                        let snap = Arc::new(snap);
                        g.last = Some((head, snap.clone()));
                        Ok(snap)
                    }
                }
            }
        }
    }

    /// Whether `candidate` is an ancestor of `applied` (so applying it would go backwards), or `None`
    /// when the source cannot tell because it does not hold `applied` (a cold cache after a force-push).
    /// Directories have no history: never behind.
    pub fn is_behind(&mut self, candidate: &str, applied: &str) -> Option<bool> {
        match self {
            ConfigSource::Dir(_) => Some(false),
            ConfigSource::Git(g) => g
                .has_commit(applied)
                .then(|| g.is_ancestor(candidate, applied).unwrap_or(false)),
        }
    }
}

/// Runs the synchronous parse and validation of `commit`, turning a panic into that commit's error: a
/// snapshot without desired state whose one diagnostic says what panicked. Whatever the manifest holds,
/// the caller records a failed commit instead of unwinding through the control plane.
fn validated(commit: &str, parse: impl FnOnce() -> Snapshot) -> Snapshot {
    let run = || {
        let snap = parse();
        inject_panic("validate", &snap.files);
        snap
    };
    match std::panic::catch_unwind(AssertUnwindSafe(run)) {
        Ok(snap) => snap,
        Err(payload) => {
            let why = panic_message(&*payload);
            tracing::error!(%commit, panic = %why, "validating a commit panicked: recorded as failed");
            let mut snap = Snapshot::new(Some(commit.to_owned()), Vec::new(), Vec::new());
            snap.loaded.desired = None;
            snap.loaded.diagnostics = cairn_schema::Diagnostics(vec![Diagnostic::file(
                cairn_schema::Severity::Error,
                "",
                format!("{PANIC_REASON} while validating this commit: {why}"),
            )]);
            snap
        }
    }
}
