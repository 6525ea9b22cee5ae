//! Operator tooling (issue 12): `cairn-agent` refuses a plain-http control plane on another host unless
//! told the network is trusted; `scripts/install-agent` refuses plain-http binaries and checks
//! `--sha256` before the binary runs or is installed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const AGENT: &str = env!("CARGO_BIN_EXE_cairn-agent");

fn run_agent(args: &[&str], data: &Path) -> (i32, String) {
    let out = Command::new(AGENT)
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .env_remove("CAIRN_JOIN_TOKEN")
        .env_remove("CAIRN_SERVER")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_agent_refuses_a_plain_http_server_on_another_host_unless_told_the_network_is_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (code, err) = run_agent(&["--server", "http://10.1.2.3:8080"], &data);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("plain http") && err.contains("--insecure-http-server"),
        "{err}"
    );
    assert!(!data.exists(), "refused before anything was written");

    // Told so, it goes on (and stops at the next thing it lacks: a join token).
    let (code, err) = run_agent(
        &["--server", "http://10.1.2.3:8080", "--insecure-http-server"],
        &data,
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no credential") && !err.contains("plain http"),
        "{err}"
    );

    // Loopback never leaves the host; https is always fine.
    for ok in [
        "http://127.0.0.1:9",
        "http://localhost:9",
        "https://10.1.2.3",
    ] {
        let (code, err) = run_agent(&["--server", ok], &data);
        assert_eq!(code, 1, "{ok}: {err}");
        assert!(err.contains("no credential"), "{ok}: {err}");
    }
    let (code, err) = run_agent(&["--server", "ftp://10.1.2.3"], &data);
    assert_eq!(code, 1);
    assert!(err.contains("https"), "{err}");
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-agent")
}

fn install(args: &[&str]) -> (i32, String) {
    let out = Command::new("sh")
        .arg(script())
        .args(args)
        .env_remove("CAIRN_JOIN_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn sha256(path: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

#[test]
fn install_agent_refuses_http_binaries_and_installs_only_a_binary_matching_sha256() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    let installed = root.path().join("usr/local/bin/cairn-agent");
    let server = ["--server", "https://cairn.example.com", "--root", r];

    // Plain http: refused before any fetch (the host does not exist; curl would fail otherwise).
    for url in [
        "http://cairn.invalid/cairn-agent",
        "HTTP://cairn.invalid/x",
        "ftp://x/y",
    ] {
        let (code, out) = install(&[&["--binary", url], &server[..]].concat());
        assert_eq!(code, 64, "{url}: {out}");
        assert!(out.contains("https"), "{url}: {out}");
    }
    assert!(!installed.exists());

    // A wrong checksum: not installed, and the mismatch is said.
    let wrong = "0".repeat(64);
    let (code, out) = install(&[&["--binary", AGENT, "--sha256", &wrong], &server[..]].concat());
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("SHA-256") && out.contains("not installed"),
        "{out}"
    );
    assert!(!installed.exists(), "{out}");
    let (code, out) = install(&[&["--binary", AGENT, "--sha256", "xyz"], &server[..]].concat());
    assert_eq!(code, 64, "{out}");

    // The right one (upper case accepted): installed.
    let right = sha256(AGENT).to_uppercase();
    let (code, out) = install(&[&["--binary", AGENT, "--sha256", &right], &server[..]].concat());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("verified"), "{out}");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(AGENT).unwrap()
    );

    // A plain-http control plane on another host needs the agent's explicit flag.
    let (code, out) = install(&[
        "--binary",
        AGENT,
        "--server",
        "http://10.1.2.3:8080",
        "--root",
        r,
    ]);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("--insecure-http-server"), "{out}");
    let (code, out) = install(&[
        "--binary",
        AGENT,
        "--server",
        "http://10.1.2.3:8080",
        "--agent-args",
        "--insecure-http-server",
        "--root",
        r,
    ]);
    assert_eq!(code, 0, "{out}");

    // The process driver: the agent runs as root with a small capability set (to run apps as another
    // user), and the apps' directory is there, passable but not listable.
    let (code, out) = install(&[
        "--binary",
        AGENT,
        "--server",
        "https://cairn.example.com",
        "--driver",
        "process",
        "--root",
        r,
    ]);
    assert_eq!(code, 0, "{out}");
    let dropin = std::fs::read_to_string(
        root.path()
            .join("etc/systemd/system/cairn-agent.service.d/no-docker.conf"),
    )
    .unwrap();
    for line in [
        "User=root",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID",
        "ReadWritePaths=/var/lib/cairn-agent-apps",
    ] {
        assert!(dropin.contains(line), "{line}: {dropin}");
    }
    use std::os::unix::fs::PermissionsExt as _;
    let apps = std::fs::metadata(root.path().join("var/lib/cairn-agent-apps")).unwrap();
    assert_eq!(apps.permissions().mode() & 0o777, 0o711);
    let unit = std::fs::read_to_string(root.path().join("etc/systemd/system/cairn-agent.service"))
        .unwrap();
    for line in [
        "KillMode=process",
        "CAIRN_AGENT_KEEP_REPLICAS_ON_EXIT=1",
        "-i cairn-+ -d 169.254.0.0/16 -j DROP",
    ] {
        assert!(unit.contains(line), "{line}");
    }
}
