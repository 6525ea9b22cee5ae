//! A PostgreSQL image made offline from this machine's own Debian packages, for the tests of databases
//! in containers: no registry is reachable, so the official `postgres` image cannot be pulled. It holds
//! what the official image offers the agent: the server and client binaries on `PATH`
//! (`/usr/lib/postgresql/<major>/bin`), their shared libraries (found with `ldd`), the share directory
//! and time zones, an account `postgres` owning `/var/lib/postgresql`, and a static busybox for `rm`.
//! LLVM's JIT is left out (90 MiB instead of 240).
//!
//! The image is tagged `cairn-test/postgres:<major>-<label>` and labelled `cairn.test=<label>`; the
//! caller removes it ([`remove`]).

use std::process::Command;

use crate::skip::missing;

/// The script that assembles the root filesystem in `$1` from the host's PostgreSQL `$2` (a major).
const ASSEMBLE: &str = r#"set -eu
root=$1; major=$2
pg=/usr/lib/postgresql/$major
bins="$pg/bin/postgres $pg/bin/initdb $pg/bin/psql $pg/bin/pg_dump $pg/bin/pg_restore /bin/busybox"
sos=$(ls $pg/lib/*.so | grep -v llvmjit || true)
libs=$( (for b in $bins $sos; do ldd "$b" 2>/dev/null | awk '/=>/ {print $3} /^\t\/lib/ {print $1}'; done) | grep '^/' | sort -u)
tar -cf - --dereference --exclude=bitcode --exclude='llvmjit*' \
  $pg /usr/share/postgresql/$major /usr/share/zoneinfo /bin/busybox $libs 2>/dev/null | tar -xf - -C "$root"
mkdir -p "$root/etc" "$root/tmp" "$root/var/lib/postgresql"
chmod 1777 "$root/tmp"
printf 'root:x:0:0:root:/root:/bin/sh\npostgres:x:999:999:PostgreSQL:/var/lib/postgresql:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\npostgres:x:999:\n' > "$root/etc/group"
chown 999:999 "$root/var/lib/postgresql"
for t in sh rm cat ls; do ln -sf busybox "$root/bin/$t"; done
"#;

/// Builds the image from the host's newest PostgreSQL major; its tag, or `None` (after
/// [`missing`] says why, which fails under CI) when PostgreSQL, busybox or Docker is not usable.
pub fn build(test: &str, label: &str) -> Option<String> {
    let mut majors: Vec<String> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("bin/postgres").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    majors.sort();
    let Some(major) = majors.pop() else {
        missing(
            test,
            "Debian's PostgreSQL server binaries",
            "none in /usr/lib/postgresql",
        );
        return None;
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("the image's root");
    let assembled = Command::new("bash")
        .args(["-c", ASSEMBLE, "assemble"])
        .arg(&root)
        .arg(&major)
        .output();
    match assembled {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            missing(
                test,
                "PostgreSQL's files, ldd and tar for a test image",
                String::from_utf8_lossy(&o.stderr),
            );
            return None;
        }
        Err(e) => {
            missing(test, "bash", e);
            return None;
        }
    }
    let tag = format!("cairn-test/postgres:{major}-{label}");
    let script = format!(
        "tar -C '{}' -cf - . | docker import --change 'ENV PATH=/usr/lib/postgresql/{major}/bin:/bin' \
         --change 'LABEL cairn.test={label}' - '{tag}'",
        root.display()
    );
    match Command::new("bash").args(["-c", &script]).output() {
        Ok(o) if o.status.success() => Some(tag),
        Ok(o) => {
            missing(
                test,
                "a Docker engine to import a test image into",
                String::from_utf8_lossy(&o.stderr),
            );
            None
        }
        Err(e) => {
            missing(test, "bash", e);
            None
        }
    }
}

/// Removes the image and whatever `label` marks: containers of the image (they carry its
/// `cairn.test` label) and containers and volumes an agent of installation `label` made
/// (`cairn.installation`).
pub fn remove(tag: &str, label: &str) {
    let run = |args: &[&str]| Command::new("docker").args(args).output();
    for key in ["cairn.test", "cairn.installation"] {
        let filter = format!("label={key}={label}");
        if let Ok(o) = run(&["ps", "-aq", "--filter", &filter]) {
            for id in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = run(&["rm", "-f", "-v", id]);
            }
        }
        if let Ok(o) = run(&["volume", "ls", "-q", "--filter", &filter]) {
            for v in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = run(&["volume", "rm", "-f", v]);
            }
        }
    }
    let _ = run(&["rmi", "-f", tag]);
}
