//! Loading a config repository for the CLI: from a directory, or from a git remote at a ref.

use std::path::Path;

use anyhow::{Context, Result};
use cairn_schema::validate::Loaded;
use cairn_schema::{Diagnostic, ParsedFile};

/// A loaded repository with the findings of reading it.
pub struct Repo {
    pub parsed: Vec<ParsedFile>,
    pub loaded: Loaded,
}

/// Loads a directory, folding read problems (symlinks leaving the repo) into the diagnostics.
pub fn load_dir(dir: &Path) -> Result<Repo> {
    let snap = cairn_reconciler::source::dir::read_dir(dir)
        .with_context(|| format!("cannot read config repository {}", dir.display()))?;
    let mut repo = load_files(snap.files, snap.diagnostics);
    // The files the manifests name (`ca_roots`, own certificates), read and checked as serve does.
    let refs: Vec<&ParsedFile> = repo.parsed.iter().collect();
    cairn_schema::validate::check_referenced(&mut repo.loaded, &refs, |rel| {
        cairn_reconciler::source::dir::read_referenced(dir, rel)
    });
    Ok(repo)
}

pub fn load_files(files: Vec<(String, Vec<u8>)>, read_errors: Vec<Diagnostic>) -> Repo {
    let (parsed, mut loaded) = cairn_schema::load(files);
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
    Repo { parsed, loaded }
}

/// Fetches `refname` of a git remote into a throwaway cache and loads the commit it points at.
pub fn load_git(url: &str, refname: &str) -> Result<Repo> {
    let cache = tempfile::tempdir().context("cannot create a temporary git cache")?;
    let mut source =
        cairn_reconciler::source::git::GitSource::new(url, refname, cache.path().join("repo.git"));
    let commit = source.fetch()?;
    let snap = source.load(commit)?;
    let parsed = snap.parsed();
    Ok(Repo {
        parsed,
        loaded: snap.loaded,
    })
}
