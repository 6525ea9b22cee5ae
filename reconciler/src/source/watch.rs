//! Watches a directory source for changes (debounced) and only wakes the reconciler: the change itself is
//! never passed on; the reconciler re-reads the whole directory.
//!
//! Only events that can change what a file holds count (create, write, rename, remove, metadata). The
//! reconciler's own reads open and close every file, and inotify reports those too (`IN_OPEN`,
//! `IN_CLOSE_NOWRITE`): counting them would wake the reconciler after each of its reads, forever.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecursiveMode, Watcher as _};

/// Keeps the watch alive; dropping it stops watching (and ends the debounce thread).
pub struct DirWatcher {
    _watcher: notify::RecommendedWatcher,
}

impl std::fmt::Debug for DirWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirWatcher")
    }
}

/// Calls `wake` (from a watcher thread) at most once per `debounce` window after files under `dir`
/// change. Reads, changes under hidden directories (`.git`) and under any of `ignore` (such as a
/// database's data directory kept inside the tree) do not count.
pub fn watch(
    dir: &Path,
    debounce: Duration,
    ignore: Vec<PathBuf>,
    wake: impl Fn() + Send + 'static,
) -> notify::Result<DirWatcher> {
    let root = dir.canonicalize().map_err(notify::Error::io)?;
    let ignore: Vec<PathBuf> = ignore
        .into_iter()
        .map(|p| p.canonicalize().unwrap_or(p))
        .collect();
    let base = root.clone();
    let (tx, rx) = mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if !changes_content(&event.kind) {
            return;
        }
        let relevant = event.paths.iter().any(|path| {
            let rel = path.strip_prefix(&base).unwrap_or(path);
            let hidden = rel
                .components()
                .any(|c| c.as_os_str().to_string_lossy().starts_with('.'));
            !hidden && !ignore.iter().any(|i| path.starts_with(i))
        });
        if relevant {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&root, RecursiveMode::Recursive)?;
    // The debounce: the first event of a burst opens a window; whatever else arrives within it is
    // folded into the one wake-up at its end. Ends when the watcher (and so the sender) is dropped.
    std::thread::Builder::new()
        .name("cairn-dir-watch".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                std::thread::sleep(debounce);
                while rx.try_recv().is_ok() {}
                wake();
            }
        })
        .map_err(notify::Error::io)?;
    Ok(DirWatcher { _watcher: watcher })
}

/// Whether an event can mean that a file's content, name or presence changed. Opening, reading and
/// closing a file without writing do not.
fn changes_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    #[test]
    fn a_file_change_wakes_once_and_hidden_or_ignored_changes_do_not() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".git")).unwrap();
        std::fs::create_dir_all(dir.path().join("pgdata")).unwrap();
        let (tx, rx) = mpsc::channel();
        let _w = watch(
            dir.path(),
            Duration::from_millis(100),
            vec![dir.path().join("pgdata")],
            move || {
                let _ = tx.send(());
            },
        )
        .unwrap();
        std::fs::write(dir.path().join(".git/index"), "x").unwrap();
        std::fs::write(dir.path().join("pgdata/wal"), "x").unwrap();
        assert!(
            rx.recv_timeout(Duration::from_millis(600)).is_err(),
            "hidden and ignored paths must not wake"
        );
        for i in 0..5 {
            std::fs::write(dir.path().join("apps.toml"), format!("# {i}")).unwrap();
        }
        rx.recv_timeout(Duration::from_secs(5))
            .expect("a change wakes the reconciler");
        // The burst of five writes is folded into (at most) one more wake-up, not five.
        let extra = std::iter::from_fn(|| rx.recv_timeout(Duration::from_millis(400)).ok()).count();
        assert!(extra <= 1, "{extra} extra wake-ups");
    }

    /// Regression: reading the directory (as every reconcile does) opened and closed its files, which
    /// inotify reports, and each read woke the reconciler for another read: a busy loop.
    #[test]
    fn reading_the_files_does_not_wake() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("apps")).unwrap();
        std::fs::write(dir.path().join("apps/shop.toml"), "[app.shop]").unwrap();
        std::fs::write(dir.path().join("cairn.toml"), "base_domain = 'x'").unwrap();
        let (tx, rx) = mpsc::channel();
        let _w = watch(
            dir.path(),
            Duration::from_millis(100),
            Vec::new(),
            move || {
                let _ = tx.send(());
            },
        )
        .unwrap();
        for _ in 0..3 {
            let snap = crate::source::dir::read_dir(dir.path()).unwrap();
            assert_eq!(snap.files.len(), 2);
        }
        assert!(
            rx.recv_timeout(Duration::from_millis(600)).is_err(),
            "reading the files must not wake the reconciler"
        );
        std::fs::write(dir.path().join("apps/shop.toml"), "[app.shop]\n").unwrap();
        rx.recv_timeout(Duration::from_secs(5))
            .expect("a write still wakes the reconciler");
    }
}
