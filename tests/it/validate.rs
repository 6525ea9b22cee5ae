//! `cairn validate` end to end, through the real binary: every broken repository in `examples/invalid`
//! prints exactly its `expected.txt` on stderr, the example repository is valid, `--json` has a stable
//! shape, usage errors exit 64, and `--identity` names the secrets that do not decrypt without ever
//! printing a value.
//!
//! `CAIRN_BLESS=1 cargo test --test it validate` rewrites the `expected.txt` files from the current output;
//! review the diff before committing it.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// At least this many cases exist, so a path or listing mistake cannot make the case test pass vacuously.
const MIN_CASES: usize = 70;

/// Cases whose only finding is a warning: the repository is still valid and `cairn validate` exits 0.
const WARNING_CASES: [&str; 2] = ["label-no-node", "region-no-node"];

const VALID_SUMMARY: &str = "valid: 3 plans, 4 runtimes, 3 nodes, 5 apps (0 warnings)\n";
const DEMO_IDENTITY: &str = "examples/keys/demo-only-identity.txt";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the `cairn` binary from the repository root, without any identity from the environment.
fn cairn<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    cairn_in(&root(), args)
}

fn cairn_in<I, S>(cwd: &Path, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .current_dir(cwd)
        .env_remove("CAIRN_IDENTITY")
        .output()
        .expect("run the cairn binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("cairn prints UTF-8")
}

/// Every case directory under `examples/invalid`, sorted.
pub fn case_dirs() -> Vec<PathBuf> {
    let dir = root().join("examples/invalid");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    cases
}

fn case_name(dir: &Path) -> &str {
    dir.file_name()
        .and_then(OsStr::to_str)
        .expect("case names are UTF-8")
}

#[test]
fn every_invalid_case_prints_exactly_its_expected_stderr() {
    let bless = std::env::var_os("CAIRN_BLESS").is_some();
    let cases = case_dirs();
    assert!(
        cases.len() >= MIN_CASES,
        "found {} cases under examples/invalid, expected at least {MIN_CASES}",
        cases.len()
    );
    let names: Vec<&str> = cases.iter().map(|d| case_name(d)).collect();
    for w in WARNING_CASES {
        assert!(
            names.contains(&w),
            "warning case `{w}` is missing from examples/invalid"
        );
    }

    let mut failures = Vec::new();
    for dir in &cases {
        let name = case_name(dir);
        let expected_path = dir.join("expected.txt");
        let out = cairn([OsStr::new("validate"), dir.as_os_str()]);
        let stderr = text(&out.stderr);
        let stdout = text(&out.stdout);
        if bless {
            std::fs::write(&expected_path, &stderr).expect("write expected.txt");
            continue;
        }
        let Ok(expected) = std::fs::read_to_string(&expected_path) else {
            failures.push(format!(
                "{name}: no expected.txt (run with CAIRN_BLESS=1 to create it, then review it)"
            ));
            continue;
        };
        let mut problems = Vec::new();
        if stderr != expected {
            problems.push(format!(
                "stderr differs.\n--- expected\n{expected}--- actual\n{stderr}---"
            ));
        }
        if WARNING_CASES.contains(&name) {
            if out.status.code() != Some(0) {
                problems.push(format!(
                    "exit code {:?}, expected 0 (a warning does not make a repo invalid)",
                    out.status.code()
                ));
            }
            if stdout != "valid: 1 plan, 1 runtime, 1 node, 1 app (1 warning)\n" {
                problems.push(format!(
                    "stdout is {stdout:?}, expected the valid summary with 1 warning"
                ));
            }
            if !stderr.contains(": warning: ") || stderr.contains(": error: ") {
                problems.push("stderr should hold one warning and no error".to_owned());
            }
        } else {
            if out.status.code() != Some(1) {
                problems.push(format!("exit code {:?}, expected 1", out.status.code()));
            }
            if !stdout.is_empty() {
                problems.push(format!("stdout should be empty, got {stdout:?}"));
            }
            // One mistake per case, so exactly one error: a second one means the case is not minimal or
            // the validator cascades.
            if !stderr.ends_with("\ninvalid: 1 error, 0 warnings\n") {
                problems.push("stderr should end with `invalid: 1 error, 0 warnings`".to_owned());
            }
        }
        if !problems.is_empty() {
            failures.push(format!("case `{name}`:\n{}", problems.join("\n")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed (CAIRN_BLESS=1 rewrites expected.txt; review the diff):\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

#[test]
fn symlink_case_is_checked_out_as_a_symlink() {
    let link = root().join("examples/invalid/symlink-leaves-repo/apps/shop.toml");
    let meta = std::fs::symlink_metadata(&link).expect("the symlink case exists");
    assert!(
        meta.file_type().is_symlink(),
        "{} must be a symlink (was the repository checked out with core.symlinks=false?)",
        link.display()
    );
    assert!(
        link.canonicalize()
            .expect("its target exists")
            .starts_with(root().join("examples/config"))
    );
}

/// A value in `{ secret = ... }` that is not a ciphertext may be the plaintext itself; diagnostics reach
/// logs and PR comments, so its line must not be echoed.
#[test]
fn broken_secret_value_is_never_echoed() {
    let out = cairn(["validate", "examples/invalid/secret-not-armored"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(
        "apps/web.toml:10:26: error: env var `DB_PASSWORD`: not an ASCII-armored age ciphertext"
    ));
    assert!(
        !stderr.contains("hunter2"),
        "the would-be secret leaked:\n{stderr}"
    );
    let json = cairn(["validate", "examples/invalid/secret-not-armored", "--json"]);
    assert!(!text(&json.stdout).contains("hunter2"));
}

#[test]
fn the_example_repository_is_valid() {
    let out = cairn(["validate", "examples/config"]);
    assert_eq!(text(&out.stderr), "");
    assert_eq!(text(&out.stdout), VALID_SUMMARY);
    assert_eq!(out.status.code(), Some(0));

    // The same through --repo, and from inside the repository with no argument.
    let out = cairn(["validate", "--repo", "examples/config"]);
    assert_eq!(
        (text(&out.stdout).as_str(), out.status.code()),
        (VALID_SUMMARY, Some(0))
    );
    let out = cairn_in(&root().join("examples/config"), ["validate"]);
    assert_eq!(
        (text(&out.stdout).as_str(), out.status.code()),
        (VALID_SUMMARY, Some(0))
    );

    let out = cairn(["validate", "examples/config", "--identity", DEMO_IDENTITY]);
    assert_eq!(text(&out.stderr), "");
    assert_eq!(
        text(&out.stdout),
        "valid: 3 plans, 4 runtimes, 3 nodes, 5 apps, every secret decrypts (0 warnings)\n"
    );
    assert_eq!(out.status.code(), Some(0));
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("--json prints JSON ({e}):\n{}", text(&out.stdout)))
}

#[test]
fn json_output_shape() {
    // Invalid: every diagnostic with its location, and the same rendering as the text output.
    let out = cairn(["validate", "examples/invalid/unknown-plan", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), "", "--json prints nothing on stderr");
    let v = json_of(&out);
    assert_eq!(v["valid"], false);
    assert_eq!(v["counts"], Value::Null);
    assert_eq!(v["errors"], 1);
    assert_eq!(v["warnings"], 0);
    let diags = v["diagnostics"]
        .as_array()
        .expect("diagnostics is an array");
    assert_eq!(diags.len(), 1);
    let d = &diags[0];
    assert_eq!(d["severity"], "error");
    assert_eq!(d["path"], "apps/web.toml");
    assert_eq!(d["line"], 3);
    assert_eq!(d["col"], 8);
    assert_eq!(d["location"], "apps/web.toml:3:8");
    assert_eq!(d["message"], "unknown plan `smal`");
    assert_eq!(d["hint"], "did you mean `small`?");
    let expected =
        std::fs::read_to_string(root().join("examples/invalid/unknown-plan/expected.txt")).unwrap();
    let first_block = expected.split("\n\n").next().unwrap();
    assert_eq!(
        d["rendered"], first_block,
        "`rendered` is the text output's block"
    );

    // Valid: counts per kind, no diagnostics.
    let out = cairn(["validate", "examples/config", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v = json_of(&out);
    assert_eq!(
        v,
        serde_json::json!({
            "valid": true,
            "counts": { "plans": 3, "runtimes": 4, "nodes": 3, "apps": 5 },
            "errors": 0,
            "warnings": 0,
            "diagnostics": [],
        })
    );

    // A warning keeps the repository valid and is listed with its severity.
    let out = cairn(["validate", "examples/invalid/region-no-node", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v = json_of(&out);
    assert_eq!(
        (
            v["valid"].clone(),
            v["errors"].clone(),
            v["warnings"].clone()
        ),
        (true.into(), 0.into(), 1.into())
    );
    assert_eq!(v["diagnostics"][0]["severity"], "warning");
    assert_eq!(v["diagnostics"][0]["location"], "apps/web.toml:10:10");
    // A whole-file finding has no line to point at.
    let v = json_of(&cairn([
        "validate",
        "examples/invalid/missing-cairn-toml",
        "--json",
    ]));
    assert_eq!(v["diagnostics"][0]["location"], "cairn.toml");
    assert_eq!(v["diagnostics"][0]["line"], 0);
}

#[test]
fn usage_errors_exit_64() {
    for args in [
        &["validate", "--no-such-flag"][..],
        &["validate", "examples/config", "examples/config"],
        &["validate", "--ref", "main"],
        &["validate", "examples/config", "--repo", "examples/config"],
        &["validate", "--identity"],
        &["no-such-command"],
        &[],
        &["schema", "no-such-schema"],
    ] {
        let out = cairn(args);
        assert_eq!(
            out.status.code(),
            Some(64),
            "cairn {args:?} should be a usage error; stderr:\n{}",
            text(&out.stderr)
        );
        assert!(!out.stderr.is_empty(), "cairn {args:?} says what is wrong");
    }
    // Help is not an error.
    let out = cairn(["validate", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("--identity"));
}

/// Where each secret of the example repository is: `(path, line, col, app, key)`, found by reading the
/// files, as a second opinion on the validator's spans.
fn example_secret_sites() -> Vec<(String, usize, usize, String, String)> {
    let apps = root().join("examples/config/apps");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&apps)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut sites = Vec::new();
    for f in files {
        let rel = format!("apps/{}", f.file_name().unwrap().to_str().unwrap());
        let src = std::fs::read_to_string(&f).unwrap();
        let mut app = String::new();
        for (i, line) in src.lines().enumerate() {
            if let Some(rest) = line.strip_prefix("[app.") {
                app = rest.split(['.', ']']).next().unwrap().to_owned();
            }
            if let Some(at) = line.find("{ secret = \"\"\"") {
                let key = line.split(" = ").next().unwrap().trim().to_owned();
                let col = line[..at + "{ secret = ".len()].chars().count() + 1;
                sites.push((rel.clone(), i + 1, col, app.clone(), key));
            }
        }
    }
    sites
}

/// The plaintexts of the example's secrets, decrypted with the real `age` CLI.
fn example_plaintexts() -> Vec<String> {
    let mut out = Vec::new();
    for (path, line, ..) in example_secret_sites() {
        let src = std::fs::read_to_string(root().join("examples/config").join(&path)).unwrap();
        let ct: String = src
            .lines()
            .skip(line)
            .take_while(|l| !l.starts_with("\"\"\""))
            .map(|l| format!("{l}\n"))
            .collect();
        out.push(age_decrypt(&ct, &root().join(DEMO_IDENTITY)));
    }
    out
}

fn age_decrypt(ciphertext: &str, identity: &Path) -> String {
    use std::io::Write;
    let mut child = Command::new("age")
        .args([OsStr::new("-d"), OsStr::new("-i"), identity.as_os_str()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the `age` CLI is installed (apt-get install age)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(ciphertext.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "age -d failed");
    text(&out.stdout)
}

fn age_encrypt(plaintext: &str, recipient: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("age")
        .args(["-a", "-r", recipient])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the `age` CLI is installed (apt-get install age)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(plaintext.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "age -a -r failed");
    text(&out.stdout)
}

/// Copies a directory tree (`fs::copy` keeps permissions: an executable stays executable).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn wrong_identity_names_every_secret_and_prints_no_value() {
    let sites = example_secret_sites();
    assert_eq!(sites.len(), 4, "the example repository holds four secrets");
    let plaintexts = example_plaintexts();

    let tmp = tempfile::tempdir().unwrap();
    let wrong = tmp.path().join("wrong.key");
    let id = cairn_schema::Identity::generate();
    std::fs::write(&wrong, id.to_file_text("2026-01-01T00:00:00Z").as_bytes()).unwrap();

    let out = cairn([
        OsStr::new("validate"),
        OsStr::new("examples/config"),
        OsStr::new("--identity"),
        wrong.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    for (path, line, col, app, key) in &sites {
        let want =
            format!("{path}:{line}:{col}: error: secret `{key}` of app `{app}` does not decrypt");
        assert!(stderr.contains(&want), "missing `{want}` in:\n{stderr}");
    }
    assert!(
        stderr.ends_with("\ninvalid: 4 errors, 0 warnings\n"),
        "{stderr}"
    );
    assert!(text(&out.stdout).is_empty());
    for p in &plaintexts {
        assert!(!stderr.contains(p.as_str()));
    }
}

/// With the right identity most secrets decrypt, so their plaintexts are in the process: one that does not
/// decrypt is reported by location, and no value reaches the output, text or JSON.
#[test]
fn one_secret_for_another_key_is_located_without_printing_any_value() {
    let plaintexts = example_plaintexts();
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("config");
    copy_dir(&root().join("examples/config"), &repo);

    // Re-encrypt shop's STRIPE_SECRET_KEY to someone else's key with the real age CLI.
    let other = cairn_schema::Identity::generate().recipient();
    let file = repo.join("apps/shop.toml");
    let src = std::fs::read_to_string(&file).unwrap();
    let start = src
        .find("STRIPE_SECRET_KEY = { secret = \"\"\"\n")
        .expect("the example has STRIPE_SECRET_KEY");
    let body = start + "STRIPE_SECRET_KEY = { secret = \"\"\"\n".len();
    let end = body + src[body..].find("\"\"\"").unwrap();
    let replaced = format!(
        "{}{}{}",
        &src[..body],
        age_encrypt("sk_live_canary_51f0", other.as_str()),
        &src[end..]
    );
    std::fs::write(&file, replaced).unwrap();

    let site = example_secret_sites()
        .into_iter()
        .find(|s| s.4 == "STRIPE_SECRET_KEY")
        .expect("STRIPE_SECRET_KEY is a secret");
    let (path, line, col) = (&site.0, site.1, site.2);
    let identity = root().join(DEMO_IDENTITY);

    let out = cairn([
        OsStr::new("validate"),
        repo.as_os_str(),
        OsStr::new("--identity"),
        identity.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let want = format!(
        "{path}:{line}:{col}: error: secret `STRIPE_SECRET_KEY` of app `shop` does not decrypt"
    );
    assert!(
        stderr.starts_with(&want),
        "expected `{want}` first in:\n{stderr}"
    );
    assert!(
        stderr.ends_with("\ninvalid: 1 error, 0 warnings\n"),
        "{stderr}"
    );

    let json = cairn([
        OsStr::new("validate"),
        repo.as_os_str(),
        OsStr::new("--identity"),
        identity.as_os_str(),
        OsStr::new("--json"),
    ]);
    assert_eq!(json.status.code(), Some(1));
    let json_out = text(&json.stdout);
    assert_eq!(
        json_of(&json)["diagnostics"][0]["location"],
        format!("{path}:{line}:{col}")
    );

    for p in plaintexts
        .iter()
        .map(String::as_str)
        .chain(["sk_live_canary_51f0"])
    {
        for (what, s) in [
            ("stderr", &stderr),
            ("stdout", &text(&out.stdout)),
            ("--json output", &json_out),
        ] {
            assert!(!s.contains(p), "a secret value reached {what}:\n{s}");
        }
    }
}

/// Input past the size limit is refused before parsing, with an error rather than a long wait or a crash.
#[test]
fn huge_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("cairn.toml"),
        "base_domain = \"apps.example.com\"\n",
    )
    .unwrap();
    let mut big = String::from("[app.web.env]\n");
    while big.len() <= 5 << 20 {
        big.push_str(
            "# padding padding padding padding padding padding padding padding padding padding\n",
        );
    }
    std::fs::write(tmp.path().join("big.toml"), &big).unwrap();
    let out = cairn([OsStr::new("validate"), tmp.path().as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "big.toml: error: file is {} bytes; manifests may be at most 4194304 bytes\n",
            big.len()
        )),
        "{stderr}"
    );
}
