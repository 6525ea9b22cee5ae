//! Python virtual environments under `target/pyenv/` for the tests that drive an implementation that is
//! not Cairn's (the notification receiver's `standardwebhooks`, the dashboard's browser through
//! `selenium`): made once with pip from the Python package index, shared by later runs.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `target/pyenv/NAME/bin/python` with `packages` installed, made if `import` fails in it; `None` (after
/// [`cairn_testkit::skip::missing`] says why, which fails under CI) when it cannot be made.
pub fn venv(test: &str, name: &str, packages: &[&str], import: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/pyenv")
        .join(name);
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
    // Made beside and renamed into place, so tests starting together never use a half-made venv.
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&tmp)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(tmp.join("bin/pip"))
            .args(["install", "-q"])
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
        cairn_testkit::skip::missing(
            test,
            &format!("python3 with venv and pip, and {}", packages.join(", ")),
            format!("cannot make {}", dir.display()),
        );
        None
    }
}
