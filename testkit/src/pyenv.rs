//! Python virtual environments under the workspace's `target/pyenv/` for the tests that drive an
//! implementation that is not Cairn's (the notification receiver's `standardwebhooks`, the dashboard's
//! browser through `selenium`, an S3 server through `moto`): made once with pip from the Python
//! package index, shared by later runs and by every crate's tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace's `target/pyenv/`.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives in the workspace")
        .join("target/pyenv")
}

/// `target/pyenv/NAME/bin/python` with `packages` installed, made if `import` fails in it; `None` (after
/// [`crate::skip::missing`] says why, which fails under CI) when it cannot be made.
pub fn venv(test: &str, name: &str, packages: &[&str], import: &str) -> Option<PathBuf> {
    let dir = root().join(name);
    let py = dir.join("bin/python");
    let ready = |py: &Path| {
        Command::new(py)
            .args(["-c", &format!("import {import}")])
            .status()
            .is_ok_and(|s| s.success())
    };
    if ready(&py) {
        return Some(py);
    }
    // One maker at a time across test processes (an exclusive lock on `NAME.lock`, released when the
    // file closes): a second maker finishing later would otherwise replace the venv under a server
    // already running from it. Whoever gets the lock second finds it made.
    let _ = std::fs::create_dir_all(root());
    let lock = std::fs::File::create(dir.with_extension("lock"));
    let _held = lock
        .as_ref()
        .ok()
        .map(|f| rustix::fs::flock(f, rustix::fs::FlockOperation::LockExclusive));
    if ready(&py) {
        return Some(py);
    }
    // Made beside and renamed into place, so a crash never leaves a half-made venv where a later run
    // would look (its users run `python -m ...`, never the console scripts whose first line names the
    // temporary path).
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&tmp)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(tmp.join("bin/python"))
            .args(["-m", "pip", "install", "-q"])
            .args(packages)
            .status()
            .is_ok_and(|s| s.success());
    if made {
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::rename(&tmp, &dir);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    if ready(&py) {
        Some(py)
    } else {
        crate::skip::missing(
            test,
            &format!("python3 with venv and pip, and {}", packages.join(", ")),
            format!("cannot make {}", dir.display()),
        );
        None
    }
}
