//! A config repository in a local directory.

use std::path::{Path, PathBuf};

use cairn_schema::{Diagnostic, Severity, is_manifest_path};

/// How deep directories may nest under the repository root.
const MAX_DIR_DEPTH: usize = 32;

/// Every manifest file under `root` as `(repository-relative path, bytes)`, plus findings about files that
/// cannot be read safely: symlinks that leave the repository, unreadable files, loops.
#[derive(Debug, Default)]
pub struct DirSnapshot {
    pub files: Vec<(String, Vec<u8>)>,
    pub diagnostics: Vec<Diagnostic>,
}

/// Reads a directory tree. Hidden directories (`.git`, `.github`) are skipped; a symlink is followed only
/// when its target stays inside the repository.
pub fn read_dir(root: &Path) -> std::io::Result<DirSnapshot> {
    let canon_root = root.canonicalize()?;
    let mut snap = DirSnapshot::default();
    let mut stack: Vec<(PathBuf, String, usize)> = vec![(canon_root.clone(), String::new(), 0)];
    while let Some((dir, rel, depth)) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                snap.diagnostics.push(Diagnostic::file(
                    Severity::Warning,
                    &format!("{rel}{}", name.to_string_lossy()),
                    "file name is not UTF-8; skipped",
                ));
                continue;
            };
            let rel_path = format!("{rel}{name}");
            let ft = entry.file_type()?;
            let mut path = entry.path();
            if name.starts_with('.') {
                continue;
            }
            let is_dir;
            if ft.is_symlink() {
                match path.canonicalize() {
                    Ok(target) if target.starts_with(&canon_root) => {
                        is_dir = target.is_dir();
                        path = target;
                    }
                    Ok(_) => {
                        snap.diagnostics.push(
                            Diagnostic::file(
                                Severity::Error,
                                &rel_path,
                                "symlink points outside the repository",
                            )
                            .with_hint(
                                "copy the file into the repository instead of linking to it",
                            ),
                        );
                        continue;
                    }
                    Err(e) => {
                        if is_manifest_path(&rel_path) {
                            snap.diagnostics.push(Diagnostic::file(
                                Severity::Error,
                                &rel_path,
                                format!("broken symlink: {e}"),
                            ));
                        }
                        continue;
                    }
                }
            } else {
                is_dir = ft.is_dir();
            }
            if is_dir {
                if depth + 1 > MAX_DIR_DEPTH {
                    snap.diagnostics.push(Diagnostic::file(
                        Severity::Error,
                        &rel_path,
                        format!(
                            "directories nest deeper than {MAX_DIR_DEPTH} levels (a symlink loop?)"
                        ),
                    ));
                    continue;
                }
                stack.push((path, format!("{rel_path}/"), depth + 1));
            } else if is_manifest_path(&rel_path) {
                match std::fs::read(&path) {
                    Ok(bytes) => snap.files.push((rel_path, bytes)),
                    Err(e) => snap.diagnostics.push(Diagnostic::file(
                        Severity::Error,
                        &rel_path,
                        format!("cannot read: {e}"),
                    )),
                }
            }
        }
    }
    snap.files.sort();
    Ok(snap)
}
