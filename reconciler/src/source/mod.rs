//! Where desired state comes from: a working directory (watched for local use) or a git remote (fetched
//! into a cache, read from the commit's tree without a checkout).
//!
//! Both hand `cairn-schema` `(path, bytes)` pairs; neither interprets manifests. `config.rs` is the
//! [`ConfigSource`] the controller reads: either of them, parsed and validated by `cairn-schema`.

pub mod config;
pub mod dir;
pub mod git;
pub mod heads;
mod pack;
pub mod watch;

use std::path::Path;
use std::sync::Arc;

use std::collections::BTreeMap;

use cairn_schema::validate::{Loaded, assemble_refs, check_referenced};
use cairn_schema::{Diagnostic, ParsedFile};

pub use config::{ConfigSource, ReadError};

/// The desired state read from a source at one point: a commit for git, a moment for a directory.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The commit id, for git sources.
    pub commit: Option<String>,
    pub files: Vec<Arc<ParsedFile>>,
    /// Parsed, validated and assembled; `loaded.desired` is `Some` only when valid.
    pub loaded: Loaded,
    /// The files the manifests name (`[tls] ca_roots`, apps' own certificates), by path, as read
    /// with the manifests ([`Snapshot::read_referenced`]).
    pub referenced: BTreeMap<String, Arc<[u8]>>,
}

impl Snapshot {
    /// Assembles parsed files, folding in findings from reading them (symlinks and the like).
    pub fn new(
        commit: Option<String>,
        files: Vec<Arc<ParsedFile>>,
        read_errors: Vec<Diagnostic>,
    ) -> Self {
        let refs: Vec<&ParsedFile> = files.iter().map(|f| f.as_ref()).collect();
        let loaded = assemble_refs(&refs);
        Snapshot::assembled(commit, files, read_errors, loaded)
    }

    /// As [`Snapshot::new`], with the files already assembled (`loaded`, from `assemble_refs` or an
    /// [`cairn_schema::Assembler`] given the same files).
    pub fn assembled(
        commit: Option<String>,
        files: Vec<Arc<ParsedFile>>,
        read_errors: Vec<Diagnostic>,
        mut loaded: Loaded,
    ) -> Self {
        if !read_errors.is_empty() {
            loaded.diagnostics.0.extend(read_errors);
            loaded
                .diagnostics
                .0
                .sort_by(|a, b| (&a.path, a.line, a.col).cmp(&(&b.path, b.line, b.col)));
            if loaded.diagnostics.has_errors() {
                loaded.desired = None;
            }
        }
        Snapshot {
            commit,
            files,
            loaded,
            referenced: BTreeMap::new(),
        }
    }

    /// Reads the files the manifests name through `read` (bytes, or why not) and checks them
    /// ([`cairn_schema::validate::check_referenced`]): a missing or wrong one is an error at its name,
    /// and the snapshot is then invalid.
    pub fn read_referenced(&mut self, read: impl FnMut(&str) -> Result<Vec<u8>, String>) {
        let refs: Vec<&ParsedFile> = self.files.iter().map(|f| f.as_ref()).collect();
        self.referenced = check_referenced(&mut self.loaded, &refs, read);
    }

    /// The files as a slice of plain references, as `cairn_schema::check_secrets` wants them.
    pub fn parsed(&self) -> Vec<ParsedFile> {
        self.files.iter().map(|f| (**f).clone()).collect()
    }
}

/// The pack index slots of a cache opened by [`open_cache`], fixed while it is open: twice the packs on
/// disk at the open, at least 64. Every fetch that brings objects adds a pack (until [`pack::REPACK_AT`]
/// of them are repacked), so a handle kept open takes at least [`FETCHES_PER_OPEN`] fetches before it
/// must be opened again.
const CACHE_SLOTS: gix::odb::store::init::Slots =
    gix::odb::store::init::Slots::AsNeededByDiskState {
        multiplier: 2.0,
        minimum: 64,
    };

/// Fetches a kept cache handle may make before it is opened again (see [`CACHE_SLOTS`]): with gix's
/// default slots, the 33rd fetch into a handle kept open failed (`InsufficientSlots`).
pub(crate) const FETCHES_PER_OPEN: u32 = 32;

/// Opens the bare repository at `path`, creating it when missing, so that nothing of the machine's git
/// setup applies to what the control plane fetches: no system, global or user configuration (no
/// `url.<base>.insteadOf`, proxies, credential helpers or hooks an operator's shell happens to have), no
/// `GIT_*` environment, and no HTTP redirects (gix never follows one to another host; we follow none, so
/// a remote cannot send the fetch elsewhere after its address was checked). Private repositories are
/// reached over ssh (the service user's keys) or through an operator's `--git-rewrite`.
pub(crate) fn open_cache(
    path: &Path,
) -> Result<gix::Repository, Box<dyn std::error::Error + Send + Sync>> {
    if !path.join("HEAD").exists() {
        std::fs::create_dir_all(path)?;
        gix::init_bare(path)?;
    }
    let options = gix::open::Options::isolated()
        .config_overrides(["http.followRedirects=false"])
        .object_store_slots(CACHE_SLOTS);
    Ok(gix::open_opts(path, options)?)
}
