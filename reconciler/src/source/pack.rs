//! Keeping a git cache to a few packs. gix writes every fetch that brings objects as a pack of its own and
//! nothing repacks: a control plane that has fetched thousands of commits holds thousands of packs, and
//! each fetch's negotiation and each object lookup looks through more of them (about 0.04 ms a pack per
//! fetch, BENCHMARKS.md). Past [`REPACK_AT`] packs, [`repack`] writes every object reachable from the
//! cache's refs into one new pack and removes the others, as `git gc` would.
//!
//! The caller holds the cache's lock (no fetch into it runs meanwhile). The new pack is written and
//! indexed before any old one is removed, so a failure leaves the cache as it was, with one more pack at
//! worst. A reader of the same cache holding an old pack keeps its mapping; one that looks for an object
//! afterwards finds the new pack when gix reads the directory again.
//!
//! What it must not do: drop an object a ref reaches, or remove a pack before its objects are in the new
//! one.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use gix_pack as pack;

/// Packs in a cache past which the next fetch repacks it (git's `gc.autoPackLimit` is 50).
pub(crate) const REPACK_AT: usize = 50;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The `pack-*.pack` files in `repo`'s object directory.
pub(crate) fn packs(repo: &gix::Repository) -> std::io::Result<Vec<PathBuf>> {
    let dir = repo.objects.store_ref().path().join("pack");
    let mut packs = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if is_pack_file(&path, "pack") {
            packs.push(path);
        }
    }
    Ok(packs)
}

fn is_pack_file(path: &Path, ext: &str) -> bool {
    path.extension().is_some_and(|e| e == ext)
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("pack-"))
}

/// What [`repack`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Repacked {
    /// Packs before, and objects written into the one after.
    pub packs_before: usize,
    pub objects: usize,
}

/// Writes every object reachable from `repo`'s refs into one pack and removes `before`, the packs
/// [`packs`] found. The caller holds the cache's lock and opens the repository again afterwards (the
/// handle's view of the packs is stale).
pub(crate) fn repack(repo: &gix::Repository, before: Vec<PathBuf>) -> Result<Repacked, BoxError> {
    let interrupt = AtomicBool::new(false);
    let mut tips = Vec::new();
    for r in repo.references()?.all()? {
        let mut r = r?;
        if let Ok(id) = r.peel_to_id() {
            tips.push(id.detach());
        }
    }
    // Every commit of the refs' history, each with its tree and what the tree holds.
    let mut commits = Vec::new();
    if !tips.is_empty() {
        for info in repo.rev_walk(tips).all()? {
            commits.push(info?.id);
        }
    }
    // Pack generation reads entries by their location in the packs, which must stay mapped meanwhile.
    let mut db = repo.objects.clone().into_inner();
    db.prevent_pack_unload();
    db.ignore_replacements = true;
    let (counts, _) = pack::data::output::count::objects(
        db.clone(),
        Box::new(commits.into_iter().map(Ok)),
        &gix::progress::Discard,
        &interrupt,
        pack::data::output::count::objects::Options {
            thread_limit: Some(1),
            input_object_expansion:
                pack::data::output::count::objects::ObjectExpansion::TreeContents,
            ..Default::default()
        },
    )?;
    let objects = counts.len();
    let entries = pack::data::output::entry::iter_from_counts(
        counts,
        db,
        Box::new(gix::progress::Discard),
        pack::data::output::entry::iter_from_counts::Options {
            thread_limit: Some(1),
            allow_thin_pack: false,
            ..Default::default()
        },
    )?;
    let mut data = Vec::new();
    {
        let mut write = pack::data::output::bytes::FromEntriesIter::new(
            entries.map(|r| r.map(|(_, entries)| entries)),
            &mut data,
            u32::try_from(objects)?,
            pack::data::Version::V2,
            repo.object_hash(),
        );
        for written in &mut write {
            written?;
        }
    }
    let dir = repo.objects.store_ref().path().join("pack");
    let outcome = pack::Bundle::write_to_directory(
        &mut std::io::Cursor::new(data),
        Some(&dir),
        &mut gix::progress::Discard,
        &interrupt,
        None::<gix::odb::Handle>,
        repo.object_hash(),
        pack::bundle::write::Options::default(),
    )?;
    let kept = outcome
        .data_path
        .as_deref()
        .and_then(Path::file_stem)
        .ok_or("the new pack has no path")?
        .to_owned();
    // Only now, with every object in the new pack, the old ones go (index first: a pack without its
    // index is never read).
    for pack in &before {
        if pack.file_stem() == Some(kept.as_os_str()) {
            continue;
        }
        for ext in ["keep", "idx", "rev", "bitmap", "pack"] {
            let file = pack.with_extension(ext);
            if let Err(e) = std::fs::remove_file(&file)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(e.into());
            }
        }
    }
    Ok(Repacked {
        packs_before: before.len(),
        objects,
    })
}
