//! A config repository in a local directory.
//!
//! What it must not do: read anything under a hidden directory (`.git` holds credentials in its config),
//! directly or through a symlink; follow a symlink out of the repository; or open anything but a regular
//! file (a FIFO named `x.toml` would block the reconciler forever, a device could be endless).

use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::{Component, Path, PathBuf};

use cairn_schema::parse::MAX_FILE_BYTES;
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
/// when its target stays inside the repository and outside its hidden directories. Only regular files
/// are read; anything else named `*.toml` is an error (never opened in a way that blocks).
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
                    Ok(target)
                        if target.starts_with(&canon_root) && hidden(&canon_root, &target) =>
                    {
                        // Never the target's name or content: `.git/config` may hold a credential.
                        snap.diagnostics.push(
                            Diagnostic::file(
                                Severity::Error,
                                &rel_path,
                                "symlink points into a hidden file or directory (such as `.git`), which is never read",
                            )
                            .with_hint("copy the file into the repository instead of linking to it"),
                        );
                        continue;
                    }
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
                match read_regular(&path) {
                    Ok(bytes) => snap.files.push((rel_path, bytes)),
                    Err(why) => {
                        snap.diagnostics
                            .push(Diagnostic::file(Severity::Error, &rel_path, why));
                    }
                }
            }
        }
    }
    snap.files.sort();
    Ok(snap)
}

/// A file the manifests name (`rel`, repository-relative, already free of `..` and hidden components), read
/// as safely as the manifests: a symlink is followed only inside the repository and never into a hidden
/// directory; only a regular file is read, bounded. The error says why, without the file's content.
pub fn read_referenced(root: &Path, rel: &str) -> Result<Vec<u8>, String> {
    let canon_root = root
        .canonicalize()
        .map_err(|e| format!("cannot be read: {e}"))?;
    let target = match root.join(rel).canonicalize() {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err("is not in the repository".into());
        }
        Err(e) => return Err(format!("cannot be read: {e}")),
    };
    if !target.starts_with(&canon_root) {
        return Err("is a symlink that points outside the repository".into());
    }
    if hidden(&canon_root, &target) {
        return Err("is a symlink into a hidden file or directory, which is never read".into());
    }
    read_regular(&target)
}

/// Whether `target` (canonical, under `root`) is or lies under a hidden file or directory of the repository.
fn hidden(root: &Path, target: &Path) -> bool {
    target.strip_prefix(root).is_ok_and(|rel| {
        rel.components().any(|c| match c {
            Component::Normal(name) => name.as_encoded_bytes().starts_with(b"."),
            _ => false,
        })
    })
}

/// A manifest's bytes, if `path` is a regular file of at most [`MAX_FILE_BYTES`]. Opened without blocking
/// and without following a symlink swapped in since the directory was listed; the type is checked on the
/// opened file, so a FIFO, socket or device put there in between is refused, never read.
fn read_regular(path: &Path) -> Result<Vec<u8>, String> {
    use rustix::fs::OFlags;
    let flags = OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::NOCTTY;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)
        .map_err(|e| format!("cannot read: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot read: {e}"))?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let what = if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_block_device() || ft.is_char_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(format!(
            "is {what}, not a regular file; only regular files are read"
        ));
    }
    if meta.len() > MAX_FILE_BYTES as u64 {
        return Err(format!(
            "file is {} bytes; manifests may be at most {MAX_FILE_BYTES} bytes",
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // Bounded even if the file grows while it is read.
    file.take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_file_is_read_only_inside_the_repository() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("certs")).unwrap();
        std::fs::write(dir.path().join("certs/ca.pem"), "pem").unwrap();
        std::fs::write(outside.path().join("secret.pem"), "outside").unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("secret.pem"),
            dir.path().join("certs/out.pem"),
        )
        .unwrap();
        std::os::unix::fs::symlink("ca.pem", dir.path().join("certs/link.pem")).unwrap();
        assert_eq!(read_referenced(dir.path(), "certs/ca.pem").unwrap(), b"pem");
        assert_eq!(
            read_referenced(dir.path(), "certs/link.pem").unwrap(),
            b"pem"
        );
        let why = read_referenced(dir.path(), "certs/out.pem").unwrap_err();
        assert!(why.contains("outside the repository"), "{why}");
        assert!(!why.contains("outside\""), "never the content");
        let why = read_referenced(dir.path(), "certs/none.pem").unwrap_err();
        assert_eq!(why, "is not in the repository");
        std::fs::create_dir_all(dir.path().join("certs/dir.pem")).unwrap();
        let why = read_referenced(dir.path(), "certs/dir.pem").unwrap_err();
        assert!(
            why.contains("not a regular file") || why.contains("directory"),
            "{why}"
        );
    }

    fn repo() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cairn.toml"), "base_domain = \"a.com\"\n").unwrap();
        std::fs::create_dir_all(dir.path().join(".git")).unwrap();
        std::fs::write(
            dir.path().join(".git/config"),
            "[remote \"origin\"]\n\turl = https://user:hunter2@example.com/x.git\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn symlink_into_dot_git_is_refused_without_its_content() {
        let dir = repo();
        std::os::unix::fs::symlink(".git/config", dir.path().join("leak.toml")).unwrap();
        std::fs::create_dir(dir.path().join("apps")).unwrap();
        std::os::unix::fs::symlink("../.git", dir.path().join("apps/git")).unwrap();
        let snap = read_dir(dir.path()).unwrap();
        let paths: Vec<&str> = snap.files.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["cairn.toml"]);
        let text: String = snap.diagnostics.iter().map(|d| format!("{d}\n")).collect();
        assert!(
            text.contains("leak.toml: error: symlink points into a hidden file or directory"),
            "{text}"
        );
        assert!(
            text.contains("apps/git: error: symlink points into a hidden"),
            "{text}"
        );
        assert!(
            !text.contains("hunter2") && !text.contains("remote"),
            "{text}"
        );
    }

    #[test]
    fn fifo_named_toml_is_an_error_not_a_hang() {
        let dir = repo();
        let fifo = dir.path().join("blocks.toml");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        std::os::unix::fs::symlink("blocks.toml", dir.path().join("via-link.toml")).unwrap();
        // Before, `std::fs::read` of the FIFO blocked forever: run it on a thread with a bound.
        let (tx, rx) = std::sync::mpsc::channel();
        let root = dir.path().to_path_buf();
        std::thread::spawn(move || tx.send(read_dir(&root).unwrap()).unwrap());
        let snap = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("reading a directory with a FIFO returns");
        let text: String = snap.diagnostics.iter().map(|d| format!("{d}\n")).collect();
        assert!(
            text.contains("blocks.toml: error: is a FIFO, not a regular file"),
            "{text}"
        );
        assert!(
            text.contains("via-link.toml: error: is a FIFO, not a regular file"),
            "{text}"
        );
        assert_eq!(snap.files.len(), 1);
    }
}
