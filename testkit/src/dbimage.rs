//! Database engine images made offline from this machine's own Debian packages, for the tests of
//! databases in containers: no registry is reachable, so the official `postgres` and `redis` images
//! cannot be pulled. Each holds what the official image offers the agent: the engine's server and client
//! binaries on `PATH`, their shared libraries (found with `ldd`), the engine's account owning the
//! volume's mount point (`postgres`: `/var/lib/postgresql`; `redis`: `/data`), and a static busybox
//! (`sh`, `rm`, `tee`). PostgreSQL's also has its share directory and time zones, without LLVM's JIT
//! (90 MiB instead of 240).
//!
//! An image is tagged `cairn-test/<engine>:<version>-<label>` and labelled `cairn.test=<label>`; the
//! caller removes it ([`remove`]).

use std::process::Command;

use crate::skip::missing;

/// What every image has: the files of `$bins` (and `$extra`) with their libraries, busybox, an account
/// `$user` (uid 999) owning `$home`, under the root `$root`.
const ASSEMBLE: &str = r#"set -eu
libs=$( (for b in $bins $sos; do ldd "$b" 2>/dev/null | awk '/=>/ {print $3} /^\t\/lib/ {print $1}'; done) | grep '^/' | sort -u)
tar -cf - --dereference --exclude=bitcode --exclude='llvmjit*' \
  $bins $extra /bin/busybox $libs 2>/dev/null | tar -xf - -C "$root"
mkdir -p "$root/etc" "$root/tmp" "$root$home"
chmod 1777 "$root/tmp"
printf 'root:x:0:0:root:/root:/bin/sh\n%s:x:999:999::%s:/bin/sh\n' "$user" "$home" > "$root/etc/passwd"
printf 'root:x:0:\n%s:x:999:\n' "$user" > "$root/etc/group"
chown 999:999 "$root$home"
for t in $(/bin/busybox --list); do
  [ -e "$root/bin/$t" ] || [ -e "$root/usr/bin/$t" ] || [ -e "$root/usr/sbin/$t" ] || ln -s busybox "$root/bin/$t"
done
"#;

/// A PostgreSQL image of the host's newest major; its tag, or `None` (after [`missing`] says why,
/// which fails under CI) when PostgreSQL, busybox or Docker is not usable.
pub fn postgres(test: &str, label: &str) -> Option<String> {
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
    let pg = format!("/usr/lib/postgresql/{major}");
    let bins = ["postgres", "initdb", "psql", "pg_dump", "pg_restore"]
        .map(|b| format!("{pg}/bin/{b}"))
        .join(" ");
    let env = [
        ("bins", bins),
        ("sos", format!("$(ls {pg}/lib/*.so | grep -v llvmjit)")),
        (
            "extra",
            format!("{pg} /usr/share/postgresql/{major} /usr/share/zoneinfo"),
        ),
        ("user", "postgres".to_owned()),
        ("home", "/var/lib/postgresql".to_owned()),
    ];
    image(
        test,
        label,
        "postgres",
        &major,
        &env,
        &format!("{pg}/bin:/bin"),
    )
}

/// A Redis image of the host's `redis-server` (version "7" when it is 7.x); its tag, or `None` as for
/// [`postgres`].
pub fn redis(test: &str, label: &str) -> Option<String> {
    let env = [
        (
            "bins",
            "/usr/bin/redis-server /usr/bin/redis-cli".to_owned(),
        ),
        ("sos", String::new()),
        ("extra", String::new()),
        ("user", "redis".to_owned()),
        ("home", "/data".to_owned()),
    ];
    image(test, label, "redis", "7", &env, "/usr/bin:/bin")
}

/// A MariaDB image of the host's `mariadb-server` and clients (their packages' files, listed by
/// `dpkg -L`: `mariadb-install-db` needs its SQL scripts, character sets and error messages); its
/// tag, or `None` as for [`postgres`].
pub fn mariadb(test: &str, label: &str) -> Option<String> {
    let env = [
        (
            "bins",
            "/usr/sbin/mariadbd /usr/bin/mariadb /usr/bin/mariadb-dump /usr/bin/my_print_defaults \
             /usr/bin/resolveip"
                .to_owned(),
        ),
        ("sos", String::new()),
        (
            "extra",
            "$(dpkg -L mariadb-server-core mariadb-client-core | grep -v '/doc/\\|/man/\\|lintian' \
             | while read -r f; do [ -f \"$f\" ] && echo \"$f\"; done)"
                .to_owned(),
        ),
        ("user", "mysql".to_owned()),
        ("home", "/var/lib/mysql".to_owned()),
    ];
    image(
        test,
        label,
        "mariadb",
        "10.11",
        &env,
        "/usr/sbin:/usr/bin:/bin",
    )
}

fn image(
    test: &str,
    label: &str,
    engine: &str,
    version: &str,
    env: &[(&str, String)],
    path: &str,
) -> Option<String> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("the image's root");
    // `sos` may be a command substitution: the variables are evaluated by the shell first.
    let mut script = String::new();
    for (k, v) in env {
        script.push_str(&format!("{k}=\"{v}\"\n"));
    }
    script.push_str(&format!("root='{}'\n", root.display()));
    script.push_str(ASSEMBLE);
    match Command::new("bash").args(["-c", &script]).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            missing(
                test,
                &format!("{engine}'s files, ldd and tar for a test image"),
                String::from_utf8_lossy(&o.stderr),
            );
            return None;
        }
        Err(e) => {
            missing(test, "bash", e);
            return None;
        }
    }
    let tag = format!("cairn-test/{engine}:{version}-{label}");
    let import = format!(
        "tar -C '{}' -cf - . | docker import --change 'ENV PATH={path}' \
         --change 'LABEL cairn.test={label}' - '{tag}'",
        root.display()
    );
    match Command::new("bash").args(["-c", &import]).output() {
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
