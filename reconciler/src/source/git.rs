//! A config repository in a git remote: fetched with gix into a bare cache, read from a commit's tree
//! without a checkout.
//!
//! Parsed files are cached by blob id and whole subtrees by tree id, so a new commit re-reads only the
//! subtrees whose id changed and re-parses only the blobs that changed: a tree diff, done as a walk that
//! stops wherever the ids match.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use cairn_schema::{Diagnostic, ParsedFile, Severity, is_manifest_path, parse_files};
use gix::ObjectId;
use gix::objs::tree::EntryKind;

use super::Snapshot;

/// What can go wrong reading a git source. The URL is shown as configured; it must not carry credentials
/// (they come from the environment or a credential helper).
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot open or create the git cache at {path}")]
    Cache {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot fetch `{refname}` from {url}")]
    Fetch {
        url: String,
        refname: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("`{refname}` does not exist in {url}")]
    NoSuchRef { url: String, refname: String },
    #[error("cannot read commit {commit}")]
    Read {
        commit: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Removes `*.lock` files under `dir` (ref directories nest a few levels; deeper is not ours).
fn remove_lock_files(dir: &Path, depth: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() && depth < 16 => remove_lock_files(&path, depth + 1),
            Ok(t) if t.is_file() && path.extension().is_some_and(|e| e == "lock") => {
                let _ = std::fs::remove_file(&path);
            }
            _ => {}
        }
    }
}

fn boxed<E: std::error::Error + Send + Sync + 'static>(
    e: E,
) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

/// One entry of a flattened tree: a manifest path and the blob it points at.
#[derive(Debug, Clone)]
struct Entry {
    path: String,
    id: ObjectId,
    link: bool,
}

/// A git remote and branch (or full ref) to read desired state from.
#[derive(Debug)]
pub struct GitSource {
    url: String,
    refname: String,
    cache: PathBuf,
    repo: Option<gix::Repository>,
    /// Fetches made through `repo` since it was opened (it is opened again after
    /// [`super::FETCHES_PER_OPEN`]).
    fetches: u32,
    /// Packs in the cache past which a fetch repacks it: [`super::pack::REPACK_AT`], or further after a
    /// repack failed (not tried again at every fetch).
    repack_past: usize,
    /// Flattened manifest entries of every subtree seen, keyed by (tree id, path prefix).
    trees: HashMap<(ObjectId, String), Arc<Vec<Entry>>>,
    /// Parsed manifests keyed by (blob id, path): a path is part of every diagnostic.
    parsed: HashMap<(ObjectId, String), Arc<ParsedFile>>,
    parses: u64,
    /// The last commit read whole ([`super::ConfigSource::read`]) and its validated snapshot: a fetch
    /// that finds the ref where it was costs no tree walk, assembly or validation.
    pub(crate) last: Option<(ObjectId, Arc<Snapshot>)>,
    /// The assembled state of the last commit loaded, so the next one re-checks only what changed.
    assembler: cairn_schema::Assembler,
    /// The last snapshot's desired state, handed back by a caller done with it ([`GitSource::give_back`]).
    returned: Option<cairn_schema::Desired>,
}

impl GitSource {
    /// `refname` is a branch name (`main`) or a full ref (`refs/pull/7/head`). `cache` is a directory this
    /// source owns; it is created as a bare repository on first use.
    pub fn new(
        url: impl Into<String>,
        refname: impl Into<String>,
        cache: impl Into<PathBuf>,
    ) -> Self {
        GitSource {
            url: url.into(),
            refname: refname.into(),
            cache: cache.into(),
            repo: None,
            fetches: 0,
            repack_past: super::pack::REPACK_AT,
            trees: HashMap::new(),
            parsed: HashMap::new(),
            parses: 0,
            last: None,
            assembler: cairn_schema::Assembler::new(),
            returned: None,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn refname(&self) -> &str {
        &self.refname
    }

    /// How many files this source has parsed since it was created (for tests and metrics).
    pub fn parse_count(&self) -> u64 {
        self.parses
    }

    fn full_ref(&self) -> String {
        if self.refname.starts_with("refs/") {
            self.refname.clone()
        } else {
            format!("refs/heads/{}", self.refname)
        }
    }

    fn tracking_ref(&self) -> String {
        format!("refs/cairn/{}", self.full_ref().trim_start_matches("refs/"))
    }

    fn repo(&mut self) -> Result<&gix::Repository, GitError> {
        if self.repo.is_none() {
            let cache_err = |e| GitError::Cache {
                path: self.cache.clone(),
                source: e,
            };
            let repo = super::open_cache(&self.cache).map_err(cache_err)?;
            self.repo = Some(repo);
            self.fetches = 0;
        }
        Ok(self.repo.as_ref().expect("just set"))
    }

    /// Fetches the ref from the remote and returns the commit it points at.
    pub fn fetch(&mut self) -> Result<ObjectId, GitError> {
        if self.fetches >= super::FETCHES_PER_OPEN {
            // Its pack slots may be used up by the packs fetched since it was opened.
            self.repo = None;
        }
        let _held = self.hold_cache()?;
        self.fetches += 1;
        let (url, full, tracking) = (self.url.clone(), self.full_ref(), self.tracking_ref());
        let refname = self.refname.clone();
        let fetch_err = |e| GitError::Fetch {
            url: url.clone(),
            refname: full.clone(),
            source: e,
        };
        let repo = self.repo()?;
        let spec = format!("+{full}:{tracking}");
        let remote = repo
            .remote_at(url.as_str())
            .map_err(|e| fetch_err(boxed(e)))?
            .with_refspecs([spec.as_str()], gix::remote::Direction::Fetch)
            .map_err(|e| fetch_err(boxed(e)))?
            .with_fetch_tags(gix::remote::fetch::Tags::None);
        let connection = remote
            .connect(gix::remote::Direction::Fetch)
            .map_err(|e| fetch_err(boxed(e)))?;
        let prepared = connection
            .prepare_fetch(gix::progress::Discard, Default::default())
            .map_err(|e| fetch_err(boxed(e)))?;
        if prepared.ref_map().is_missing_required_mapping() {
            return Err(GitError::NoSuchRef { url, refname });
        }
        let outcome = prepared
            .receive(gix::progress::Discard, &AtomicBool::new(false))
            .map_err(|e| fetch_err(boxed(e)))?;
        let advertised = outcome
            .ref_map
            .mappings
            .iter()
            .any(|m| m.remote.as_name().is_some_and(|n| n == full.as_bytes()));
        if !advertised {
            return Err(GitError::NoSuchRef { url, refname });
        }
        // Only a fetch that wrote a pack can have made too many (an idle tick reads no directory).
        if matches!(outcome.status, gix::remote::fetch::Status::Change { .. }) {
            self.repack_if_many();
        }
        self.resolve_cached()?.ok_or_else(|| GitError::NoSuchRef {
            url: self.url.clone(),
            refname: self.refname.clone(),
        })
    }

    /// Repacks the cache when its fetches have left more than [`super::pack::REPACK_AT`] packs (the caller
    /// holds the cache's lock). A failure leaves the packs as they were: fetches go on, a little slower.
    fn repack_if_many(&mut self) {
        let Some(repo) = self.repo.as_ref() else {
            return;
        };
        let packs = match super::pack::packs(repo) {
            Ok(p) if p.len() > self.repack_past => p,
            _ => return,
        };
        let count = packs.len();
        // gix's pack writer expects well-formed objects (a commit without a tree panics it): what a remote
        // sent must not end the process, only this repack.
        let started = std::time::Instant::now();
        let repacked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            super::pack::repack(repo, packs)
        }))
        .unwrap_or_else(|p| {
            let why = crate::panics::panic_message(&*p);
            Err(format!("the pack writer panicked: {why}").into())
        });
        match repacked {
            Ok(r) => {
                self.repack_past = super::pack::REPACK_AT;
                tracing::info!(
                    cache = %self.cache.display(),
                    packs = r.packs_before,
                    objects = r.objects,
                    ms = started.elapsed().as_millis() as u64,
                    "repacked the git cache into one pack"
                );
            }
            Err(e) => {
                self.repack_past = count + super::pack::REPACK_AT;
                tracing::warn!(
                    cache = %self.cache.display(),
                    error = %e,
                    "could not repack the git cache; its packs are left as they were, tried again \
                     after as many fetches more"
                );
            }
        }
        // Its view of the packs is stale either way.
        self.repo = None;
    }

    /// Holds the cache for this fetch (`flock` on `<cache>/cairn.lock`, which the kernel releases when
    /// the holder dies) and then removes the ref locks a killed fetch left behind: with the flock held no
    /// other fetch of this cache runs, so every `*.lock` under `refs/` and `packed-refs.lock` is stale.
    /// Without this, a SIGKILL during a fetch left `refs/cairn/heads/main.lock`, and every later fetch
    /// failed until someone deleted it.
    fn hold_cache(&mut self) -> Result<std::fs::File, GitError> {
        self.repo()?;
        let cache_err = |e: std::io::Error| GitError::Cache {
            path: self.cache.clone(),
            source: boxed(e),
        };
        let file = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.cache.join("cairn.lock"))
            .map_err(cache_err)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| cache_err(e.into()))?;
        remove_lock_files(&self.cache.join("refs"), 0);
        let _ = std::fs::remove_file(self.cache.join("packed-refs.lock"));
        Ok(file)
    }

    /// The commit the ref pointed at after the last fetch, if any.
    pub fn resolve_cached(&mut self) -> Result<Option<ObjectId>, GitError> {
        let tracking = self.tracking_ref();
        let repo = self.repo()?;
        match repo.try_find_reference(tracking.as_str()) {
            Ok(Some(mut r)) => {
                r.peel_to_id()
                    .map(|id| Some(id.detach()))
                    .map_err(|e| GitError::Read {
                        commit: tracking.clone(),
                        source: boxed(e),
                    })
            }
            Ok(None) => Ok(None),
            Err(e) => Err(GitError::Read {
                commit: tracking,
                source: boxed(e),
            }),
        }
    }

    /// Whether the cache holds `commit` (a cold cache after a force-push may not).
    pub fn has_commit(&mut self, commit: &str) -> bool {
        let Ok(id) = ObjectId::from_hex(commit.as_bytes()) else {
            return false;
        };
        self.repo()
            .map(|r| r.find_object(id).is_ok())
            .unwrap_or(false)
    }

    /// Whether commit `older` is an ancestor of (or equal to) commit `newer`; bounded to 100,000 commits of
    /// history. Unknown commits are not ancestors.
    pub fn is_ancestor(&mut self, older: &str, newer: &str) -> Result<bool, GitError> {
        let read_err = |e| GitError::Read {
            commit: newer.to_owned(),
            source: e,
        };
        let (Ok(older), Ok(newer)) = (
            ObjectId::from_hex(older.as_bytes()),
            ObjectId::from_hex(newer.as_bytes()),
        ) else {
            return Ok(false);
        };
        if older == newer {
            return Ok(true);
        }
        let repo = self.repo()?;
        if repo.find_object(newer).is_err() || repo.find_object(older).is_err() {
            return Ok(false);
        }
        let walk = repo
            .rev_walk([newer])
            .all()
            .map_err(|e| read_err(boxed(e)))?;
        for info in walk.take(100_000) {
            if info.map_err(|e| read_err(boxed(e)))?.id == older {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// How many loads assembled the whole repository afresh (for tests and benchmarks): the first, and
    /// any whose previous desired state was not handed back.
    pub fn fresh_assemblies(&self) -> u64 {
        self.assembler.fresh_starts()
    }

    /// The apps whose manifest may differ between two desired states this source loaded
    /// ([`cairn_schema::Assembler::apps_changed`]).
    pub fn apps_changed(
        &self,
        since: cairn_schema::Revision,
        to: cairn_schema::Revision,
    ) -> Option<std::collections::BTreeSet<cairn_schema::Name>> {
        self.assembler.apps_changed(since, to)
    }

    /// Hands back a snapshot this source loaded, once its caller is done with it: the next
    /// [`GitSource::load`] then updates its desired state in place instead of assembling afresh. (The
    /// snapshot [`super::ConfigSource::read`] keeps comes back by itself when no one else holds it.)
    pub fn give_back(&mut self, snap: Snapshot) {
        self.returned = snap.loaded.desired;
    }

    /// Reads and validates the manifests at `commit`, re-parsing only blobs not seen before and
    /// re-checking only what the changed files touch ([`cairn_schema::Assembler`]).
    pub fn load(&mut self, commit: ObjectId) -> Result<Snapshot, GitError> {
        let read_err = |e| GitError::Read {
            commit: commit.to_string(),
            source: e,
        };
        let repo = self.repo()?.clone();
        let tree_id = repo
            .find_object(commit)
            .map_err(|e| read_err(boxed(e)))?
            .peel_to_commit()
            .map_err(|e| read_err(boxed(e)))?
            .tree_id()
            .map_err(|e| read_err(boxed(e)))?
            .detach();
        let entries = self
            .walk(&repo, tree_id, String::new(), 0)
            .map_err(read_err)?;
        let by_path: HashMap<&str, &Entry> = entries.iter().map(|e| (e.path.as_str(), e)).collect();
        // Each manifest's parse from the cache, or its blob to parse (all of them together below).
        let mut files: Vec<Option<Arc<ParsedFile>>> = Vec::new();
        let mut unparsed: Vec<(String, Vec<u8>)> = Vec::new();
        let mut unparsed_at: Vec<(usize, ObjectId)> = Vec::new();
        // The cache keys this commit uses: what the parse cache keeps when it is trimmed below.
        let mut live: std::collections::HashSet<(ObjectId, String)> =
            std::collections::HashSet::new();
        let mut diagnostics = Vec::new();
        for e in entries.iter() {
            if !is_manifest_path(&e.path) {
                continue;
            }
            let mut target = e;
            if e.link {
                match resolve_link(&repo, e, &by_path) {
                    Ok(t) => target = t,
                    Err(why) => {
                        diagnostics.push(Diagnostic::file(Severity::Error, &e.path, why));
                        continue;
                    }
                }
            }
            let key = (target.id, e.path.clone());
            let cached = self.parsed.get(&key).cloned();
            live.insert(key);
            if let Some(p) = cached {
                files.push(Some(p));
                continue;
            }
            let blob = repo
                .find_object(target.id)
                .map_err(|e| read_err(boxed(e)))?;
            unparsed_at.push((files.len(), target.id));
            unparsed.push((e.path.clone(), blob.detach().data));
            files.push(None);
        }
        for (((at, id), (path, _)), parsed) in unparsed_at
            .into_iter()
            .zip(&unparsed)
            .zip(parse_files(&unparsed))
        {
            let parsed = Arc::new(parsed);
            self.parses += 1;
            self.parsed.insert((id, path.clone()), parsed.clone());
            files[at] = Some(parsed);
        }
        let files: Vec<Arc<ParsedFile>> = files.into_iter().flatten().collect();
        // Keep the caches to what the latest commit uses, so they do not grow without bound.
        if self.parsed.len() > 2 * live.len() + 64 {
            self.parsed.retain(|k, _| live.contains(k));
            self.trees.clear();
        }
        // The last snapshot's desired state is the assembler's to update, if no one holds it any more.
        let returned = self.returned.take().or_else(|| {
            self.last
                .take()
                .and_then(|(_, s)| Arc::try_unwrap(s).ok())
                .and_then(|s| s.loaded.desired)
        });
        let loaded = self.assembler.assemble(&files, returned);
        let mut snap = Snapshot::assembled(Some(commit.to_string()), files, diagnostics, loaded);
        snap.read_referenced(|rel| {
            let Some(e) = by_path.get(rel) else {
                return Err("is not in the repository at this commit".into());
            };
            let target = if e.link {
                resolve_link(&repo, e, &by_path)?
            } else {
                e
            };
            // Sized before it is read: a huge blob is refused without loading it.
            let size = repo
                .find_header(target.id)
                .map_err(|e| format!("cannot be read: {e}"))?
                .size();
            if size > cairn_schema::validate::MAX_REFERENCED_BYTES as u64 {
                return Err(format!(
                    "is {size} bytes; at most {} are read",
                    cairn_schema::validate::MAX_REFERENCED_BYTES
                ));
            }
            let blob = repo
                .find_object(target.id)
                .map_err(|e| format!("cannot be read: {e}"))?;
            Ok(blob.data.clone())
        });
        Ok(snap)
    }

    /// Flattens a tree into manifest-relevant entries, reusing subtrees whose id did not change.
    fn walk(
        &mut self,
        repo: &gix::Repository,
        tree: ObjectId,
        prefix: String,
        depth: usize,
    ) -> Result<Arc<Vec<Entry>>, Box<dyn std::error::Error + Send + Sync>> {
        if let Some(hit) = self.trees.get(&(tree, prefix.clone())) {
            return Ok(hit.clone());
        }
        if depth > 32 {
            return Err(format!("directories under `{prefix}` nest deeper than 32 levels").into());
        }
        let obj = repo.find_object(tree)?.try_into_tree()?;
        let mut out = Vec::new();
        let mut subtrees = Vec::new();
        for entry in obj.iter() {
            let entry = entry?;
            let Ok(name) = std::str::from_utf8(entry.filename()) else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let path = format!("{prefix}{name}");
            match entry.mode().kind() {
                EntryKind::Tree => subtrees.push((entry.oid().to_owned(), format!("{path}/"))),
                EntryKind::Blob | EntryKind::BlobExecutable => out.push(Entry {
                    path,
                    id: entry.oid().to_owned(),
                    link: false,
                }),
                EntryKind::Link => out.push(Entry {
                    path,
                    id: entry.oid().to_owned(),
                    link: true,
                }),
                EntryKind::Commit => {}
            }
        }
        for (id, p) in subtrees {
            let sub = self.walk(repo, id, p, depth + 1)?;
            out.extend(sub.iter().cloned());
        }
        let out = Arc::new(out);
        self.trees.insert((tree, prefix), out.clone());
        Ok(out)
    }
}

/// Follows a symlink inside the tree; refuses targets that leave the repository.
fn resolve_link<'a>(
    repo: &gix::Repository,
    link: &Entry,
    by_path: &HashMap<&str, &'a Entry>,
) -> Result<&'a Entry, String> {
    let blob = repo
        .find_object(link.id)
        .map_err(|e| format!("cannot read symlink: {e}"))?;
    let target =
        std::str::from_utf8(&blob.data).map_err(|_| "symlink target is not UTF-8".to_owned())?;
    if target.starts_with('/') {
        return Err("symlink points outside the repository".into());
    }
    let mut parts: Vec<&str> = link.path.split('/').collect();
    parts.pop();
    for comp in target.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err("symlink points outside the repository".into());
                }
            }
            c => parts.push(c),
        }
    }
    let resolved = parts.join("/");
    match by_path.get(resolved.as_str()) {
        Some(e) if !e.link => Ok(e),
        Some(_) => Err("symlink points at another symlink; not followed".into()),
        None => Err(format!(
            "symlink target `{resolved}` does not exist in this commit"
        )),
    }
}

/// The cache directory a source with this URL and ref uses under `root`.
pub fn cache_dir(root: &Path, url: &str) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    url.hash(&mut h);
    root.join(format!("{:016x}.git", h.finish()))
}
