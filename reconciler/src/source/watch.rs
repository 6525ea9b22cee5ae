//! Watches a directory source for changes (debounced) and only wakes the reconciler: the change itself is
//! never passed on; the reconciler re-reads the whole directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer};

/// Keeps the watch alive; dropping it stops watching.
pub struct DirWatcher {
    _debouncer: Debouncer<notify::RecommendedWatcher>,
}

impl std::fmt::Debug for DirWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirWatcher")
    }
}

/// Calls `wake` (from a watcher thread) at most once per `debounce` window after files under `dir`
/// change. Changes under hidden directories (`.git`) and under any of `ignore` (such as a database's data
/// directory kept inside the tree) do not count.
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
    let mut debouncer = new_debouncer(debounce, move |res: DebounceEventResult| {
        let Ok(events) = res else { return };
        let relevant = events.iter().any(|e| {
            let rel = e.path.strip_prefix(&base).unwrap_or(&e.path);
            let hidden = rel
                .components()
                .any(|c| c.as_os_str().to_string_lossy().starts_with('.'));
            !hidden && !ignore.iter().any(|i| e.path.starts_with(i))
        });
        if relevant {
            wake();
        }
    })?;
    debouncer.watcher().watch(&root, RecursiveMode::Recursive)?;
    Ok(DirWatcher {
        _debouncer: debouncer,
    })
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
}
