//! `cairn secret` end to end: the real binary, the real `age` CLI, repositories in temporary directories.
//!
//! Every run of `cairn` goes through [`cairn`], which fails the test if the canary value (the plaintext all
//! these tests encrypt) shows up on stdout or stderr.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cairn_testkit::fixtures;

/// The plaintext of the secrets in these tests; no command may ever print it.
const CANARY: &str = "canary-5e1f0c-never-print-me";
const BEGIN: &str = "-----BEGIN AGE ENCRYPTED FILE-----";
const END: &str = "-----END AGE ENCRYPTED FILE-----";

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(cmd: &mut Command, stdin: &[u8]) -> Out {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    // A command that fails before reading its input closes the pipe early; that is not the test's concern.
    match child.stdin.take().expect("piped").write_all(stdin) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("write stdin: {e}"),
        _ => {}
    }
    let out = child.wait_with_output().expect("wait");
    Out {
        code: out.status.code().expect("exited"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs the real `cairn` in `dir` and checks that the canary is in none of its output.
fn cairn(dir: &Path, args: &[&str], stdin: &[u8]) -> Out {
    let out = run(
        Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(args)
            .current_dir(dir)
            .env_remove("CAIRN_IDENTITY"),
        stdin,
    );
    for (name, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        assert!(
            !text.contains(CANARY),
            "`cairn {}` printed the secret on {name}:\n{text}",
            args.join(" ")
        );
    }
    out
}

fn ok(out: Out) -> Out {
    assert_eq!(
        out.code, 0,
        "stdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
    out
}

/// `age -d -i key`: the plaintext, or age's error.
fn age_decrypt(key: &Path, ciphertext: &str) -> Result<String, String> {
    let out = run(
        Command::new("age").arg("-d").arg("-i").arg(key),
        ciphertext.as_bytes(),
    );
    if out.code == 0 {
        Ok(out.stdout)
    } else {
        Err(out.stderr)
    }
}

/// `age -a -r recipient`.
fn age_encrypt(recipient: &str, plaintext: &str) -> String {
    let out = run(
        Command::new("age").args(["-a", "-r", recipient]),
        plaintext.as_bytes(),
    );
    assert_eq!(out.code, 0, "age -a: {}", out.stderr);
    out.stdout
}

/// An identity made by `cairn secret keygen -o`, and its recipient.
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let out = ok(cairn(dir, &["secret", "keygen", "-o", name], b""));
    (dir.join(name), out.stdout.trim().to_owned())
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path.as_ref())
        .unwrap_or_else(|e| panic!("{}: {e}", path.as_ref().display()))
}

fn write(path: impl AsRef<Path>, text: &str) {
    let path = path.as_ref();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn settings(recipients: &[&str]) -> String {
    fixtures::settings().recipients(recipients).to_string()
}

fn plans() -> String {
    let plan = fixtures::plan("small").cpu("1").price("5").max_replicas(3);
    format!("{plan}\n{}", fixtures::node_runtime())
}

/// A valid repository with `apps/web.toml` (app `web`, with an env table) and `apps/api.toml` (app `api`,
/// without one), encrypting to `recipients`.
fn repo(recipients: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path().join("cairn.toml"), &settings(recipients));
    write(dir.path().join("plans.toml"), &plans());
    write(
        dir.path().join("apps/web.toml"),
        "[app.web]\nplan = \"small\"\nruntime = \"node\"\nsource = { url = \"https://github.com/acme/web\" }\n\n[app.web.env]\nLOG_LEVEL = \"info\"\n",
    );
    write(
        dir.path().join("apps/api.toml"),
        "[app.api]\nplan = \"small\"\nruntime = \"node\"\nsource = { url = \"https://github.com/acme/api\" }\n",
    );
    dir
}

/// The `secret` string of `[app.APP.env.KEY]` in a manifest.
fn ciphertext_of(path: &Path, app: &str, key: &str) -> String {
    let doc: toml_edit::DocumentMut = read(path).parse().unwrap();
    doc["app"][app]["env"][key]["secret"]
        .as_str()
        .unwrap_or_else(|| panic!("no secret app.{app}.env.{key} in {}", path.display()))
        .to_owned()
}

/// The text with every armored ciphertext replaced by `<ciphertext>`, for snapshots and comparisons.
fn redact(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let end = rest[start..].find(END).expect("armor ends") + start + END.len();
        out.push_str(&rest[..start]);
        out.push_str("<ciphertext>");
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Paths and contents of every file under `dir`, hidden ones included.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn keygen_writes_an_identity_age_reads_and_never_overwrites_one() {
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = keygen(dir.path(), "key.txt");
    assert!(
        recipient.starts_with("age1") && !recipient.contains('\n'),
        "{recipient}"
    );
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let derived = run(Command::new("age-keygen").arg("-y").arg(&key), b"");
    assert_eq!(
        derived.stdout.trim(),
        recipient,
        "age-keygen -y: {}",
        derived.stderr
    );

    let before = read(&key);
    let again = cairn(dir.path(), &["secret", "keygen", "-o", "key.txt"], b"");
    assert_eq!(again.code, 1);
    assert!(again.stderr.contains("already exists"), "{}", again.stderr);
    assert_eq!(read(&key), before);

    // To stdout: the identity file on stdout, the recipient on stderr, as age-keygen does.
    let out = ok(cairn(dir.path(), &["secret", "keygen"], b""));
    assert!(out.stdout.starts_with("# created: "), "{}", out.stdout);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("AGE-SECRET-KEY-1"))
    );
    let stdout_recipient = out
        .stderr
        .trim()
        .strip_prefix("Public key: ")
        .expect("recipient on stderr");
    write(dir.path().join("stdout-key.txt"), &out.stdout);
    let derived = run(
        Command::new("age-keygen")
            .arg("-y")
            .arg(dir.path().join("stdout-key.txt")),
        b"",
    );
    assert_eq!(derived.stdout.trim(), stdout_recipient);
    assert_ne!(stdout_recipient, recipient);
}

#[test]
fn cairn_ciphertext_decrypts_with_the_age_cli() {
    let dir = tempfile::tempdir().unwrap();
    // An identity made by age-keygen, so Cairn's recipients and age's identity files meet.
    let key = dir.path().join("age-key.txt");
    let made = run(Command::new("age-keygen").arg("-o").arg(&key), b"");
    assert_eq!(made.code, 0, "{}", made.stderr);
    let recipient = run(Command::new("age-keygen").arg("-y").arg(&key), b"")
        .stdout
        .trim()
        .to_owned();
    let (other_key, other) = keygen(dir.path(), "other.txt");

    let repo = repo(&[&recipient]);
    let out = ok(cairn(
        repo.path(),
        &["secret", "encrypt"],
        format!("{CANARY}\n").as_bytes(),
    ));
    assert!(
        out.stdout.starts_with(BEGIN) && out.stdout.trim_end().ends_with(END),
        "{}",
        out.stdout
    );
    assert_eq!(
        age_decrypt(&key, &out.stdout).unwrap(),
        CANARY,
        "one trailing newline is removed"
    );
    assert!(age_decrypt(&other_key, &out.stdout).is_err());

    // `-r` adds to the repository's recipients, and works alone outside a repository.
    let out = ok(cairn(
        dir.path(),
        &[
            "secret",
            "encrypt",
            "--repo",
            repo.path().to_str().unwrap(),
            "-r",
            &other,
        ],
        CANARY.as_bytes(),
    ));
    assert_eq!(age_decrypt(&key, &out.stdout).unwrap(), CANARY);
    assert_eq!(age_decrypt(&other_key, &out.stdout).unwrap(), CANARY);
    let out = ok(cairn(
        dir.path(),
        &["secret", "encrypt", "-r", &other],
        CANARY.as_bytes(),
    ));
    assert_eq!(age_decrypt(&other_key, &out.stdout).unwrap(), CANARY);
    assert!(age_decrypt(&key, &out.stdout).is_err());

    // What `secret set` writes into a manifest decrypts too. (Run from outside the repository: FILE's
    // repository is the nearest directory above it with a cairn.toml.)
    let web = repo.path().join("apps/web.toml");
    ok(cairn(
        dir.path(),
        &[
            "secret",
            "set",
            web.to_str().unwrap(),
            "web",
            "DATABASE_URL",
        ],
        format!("{CANARY}\n").as_bytes(),
    ));
    let ct = ciphertext_of(&repo.path().join("apps/web.toml"), "web", "DATABASE_URL");
    assert_eq!(age_decrypt(&key, &ct).unwrap(), CANARY);
}

#[test]
fn age_cli_ciphertext_decrypts_with_cairn() {
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = keygen(dir.path(), "key.txt");
    let (other_key, _) = keygen(dir.path(), "other.txt");
    let repo = repo(&[&recipient]);
    let armored = age_encrypt(&recipient, CANARY);
    let web = repo.path().join("apps/web.toml");
    let mut text = read(&web);
    text.push_str(&format!(
        "DATABASE_URL = {{ secret = \"\"\"\n{armored}\"\"\" }}\n"
    ));
    write(&web, &text);
    let line = text
        .lines()
        .position(|l| l.starts_with("DATABASE_URL"))
        .unwrap()
        + 1;

    let out = ok(cairn(
        repo.path(),
        &["validate", "--identity", key.to_str().unwrap()],
        b"",
    ));
    assert!(
        out.stdout.contains("every secret decrypts"),
        "{}",
        out.stdout
    );
    let out = cairn(
        repo.path(),
        &["validate", "--identity", other_key.to_str().unwrap()],
        b"",
    );
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains(&format!(
            "apps/web.toml:{line}:27: error: secret `DATABASE_URL` of app `web` does not decrypt"
        )),
        "{}",
        out.stderr
    );

    // Rotating decrypts age's ciphertext with Cairn and encrypts it again; age still reads the result.
    let out = ok(cairn(
        repo.path(),
        &["secret", "rotate", "--identity", key.to_str().unwrap()],
        b"",
    ));
    assert!(
        out.stdout
            .starts_with("re-encrypted 1 secret in 1 file to 1 recipient"),
        "{}",
        out.stdout
    );
    let ct = ciphertext_of(&web, "web", "DATABASE_URL");
    assert_ne!(ct, armored);
    assert_eq!(age_decrypt(&key, &ct).unwrap(), CANARY);
}

/// A manifest written by hand, with comments and alignment everywhere `set` might disturb them.
const HAND_WRITTEN: &str = r#"# Storefront apps. Owned by the web team.

[app.web]
plan    = "small"        # aligned on purpose
runtime = "node"
replicas = 2

    # an indented comment before a table
[app.web.source]
url = "https://github.com/acme/web"
branch = "main"

[app.web.env]
# Log verbosity.
LOG_LEVEL = "info"   # keep in sync with api
'QUOTED' = 'literal'
DB_PASSWORD = "canary-5e1f0c-never-print-me"   # plain for now
# a comment at the end of the env table

[app.web.health]
path = "/healthz"

# The worker has no env yet.
[app.worker]
plan = "small"
runtime = "node"
source = { url = "https://github.com/acme/worker", branch = "main" }

[app.tiny]
plan = "small"
runtime = "node"
source.url = "https://github.com/acme/tiny"
env = { MODE = "x" }  # inline env
"#;

#[test]
fn set_keeps_comments_and_layout() {
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = keygen(dir.path(), "key.txt");
    let repo = repo(&[&recipient]);
    std::fs::remove_file(repo.path().join("apps/web.toml")).unwrap();
    let file = repo.path().join("apps/store.toml");
    write(&file, HAND_WRITTEN);
    let set = |app: &str, name: &str, value: &str| {
        ok(cairn(
            repo.path(),
            &["secret", "set", "apps/store.toml", app, name],
            value.as_bytes(),
        ))
        .stdout
    };
    assert_eq!(
        set("web", "API_TOKEN", &format!("{CANARY}-1\n")),
        "apps/store.toml: added secret `API_TOKEN` to app `web`, encrypted to 1 recipient\n"
    );
    assert!(
        set("web", "DB_PASSWORD", &format!("{CANARY}-2\n"))
            .contains("replaced plain `DB_PASSWORD` of app `web` with a secret")
    );
    set("worker", "QUEUE_URL", &format!("{CANARY}-3\n"));
    set("tiny", "TOKEN", &format!("{CANARY}-4\n"));
    // Setting a secret again replaces its ciphertext in place.
    assert!(
        set("web", "API_TOKEN", &format!("{CANARY}-5\n")).contains("replaced secret `API_TOKEN`")
    );

    let text = read(&file);
    insta::assert_snapshot!("set_keeps_comments_and_layout", redact(&text));
    ok(cairn(
        repo.path(),
        &["validate", "--identity", key.to_str().unwrap()],
        b"",
    ));
    for (app, name, want) in [
        ("web", "API_TOKEN", 5),
        ("web", "DB_PASSWORD", 2),
        ("worker", "QUEUE_URL", 3),
        ("tiny", "TOKEN", 4),
    ] {
        assert_eq!(
            age_decrypt(&key, &ciphertext_of(&file, app, name)).unwrap(),
            format!("{CANARY}-{want}")
        );
    }
}

#[test]
fn set_strips_exactly_one_trailing_newline() {
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = keygen(dir.path(), "key.txt");
    let repo = repo(&[&recipient]);
    let web = repo.path().join("apps/web.toml");
    for (name, stdin, want) in [
        ("NONE", CANARY.to_owned(), CANARY.to_owned()),
        ("ONE", format!("{CANARY}\n"), CANARY.to_owned()),
        ("TWO", format!("{CANARY}\n\n"), format!("{CANARY}\n")),
        ("CRLF", format!("{CANARY}\r\n"), CANARY.to_owned()),
        (
            "INNER",
            format!("{CANARY}\nline 2\n"),
            format!("{CANARY}\nline 2"),
        ),
    ] {
        ok(cairn(
            repo.path(),
            &["secret", "set", "apps/web.toml", "web", name],
            stdin.as_bytes(),
        ));
        assert_eq!(
            age_decrypt(&key, &ciphertext_of(&web, "web", name)).unwrap(),
            want,
            "{name}"
        );
    }
}

#[test]
fn set_refuses_a_file_that_does_not_declare_the_app() {
    let dir = tempfile::tempdir().unwrap();
    let (_, recipient) = keygen(dir.path(), "key.txt");
    let repo = repo(&[&recipient]);
    let before = tree(repo.path());

    let out = cairn(
        repo.path(),
        &["secret", "set", "apps/web.toml", "api", "TOKEN"],
        CANARY.as_bytes(),
    );
    assert_eq!(out.code, 1);
    assert_eq!(
        out.stderr,
        "error: apps/web.toml does not declare `[app.api]`; it is declared at apps/api.toml:1:6\n"
    );
    let out = cairn(
        repo.path(),
        &["secret", "set", "apps/web.toml", "nope", "TOKEN"],
        CANARY.as_bytes(),
    );
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("no file of the repository declares `[app.nope]`"),
        "{}",
        out.stderr
    );
    // cairn.toml is no place for apps, wherever the command runs from.
    let out = cairn(
        dir.path(),
        &[
            "secret",
            "set",
            repo.path().join("cairn.toml").to_str().unwrap(),
            "web",
            "TOKEN",
        ],
        b"",
    );
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("cairn.toml holds the repository settings"),
        "{}",
        out.stderr
    );
    // Names that could never be valid are usage errors.
    let out = cairn(
        repo.path(),
        &["secret", "set", "apps/web.toml", "web", "not-posix"],
        CANARY.as_bytes(),
    );
    assert_eq!(out.code, 64, "{}", out.stderr);
    assert_eq!(tree(repo.path()), before);
}

#[test]
fn set_writes_nothing_when_the_repository_would_not_validate() {
    let dir = tempfile::tempdir().unwrap();
    let (_, recipient) = keygen(dir.path(), "key.txt");
    let repo = repo(&[&recipient]);
    write(
        repo.path().join("apps/broken.toml"),
        "[app.broken]\nplan = \"smal\"\nruntime = \"node\"\nsource = { url = \"https://github.com/acme/b\" }\n",
    );
    let before = tree(repo.path());
    let out = cairn(
        repo.path(),
        &["secret", "set", "apps/web.toml", "web", "TOKEN"],
        CANARY.as_bytes(),
    );
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("apps/broken.toml:2:8: error: unknown plan `smal`"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("nothing was written"), "{}", out.stderr);
    assert_eq!(tree(repo.path()), before);
}

#[test]
fn rotate_after_adding_a_recipient_lets_the_new_identity_decrypt() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, a) = keygen(dir.path(), "alice.txt");
    let (bob, b) = keygen(dir.path(), "bob.txt");
    let repo = repo(&[&a]);
    let (web, api) = (
        repo.path().join("apps/web.toml"),
        repo.path().join("apps/api.toml"),
    );
    ok(cairn(
        repo.path(),
        &["secret", "set", "apps/web.toml", "web", "X"],
        format!("{CANARY}-x").as_bytes(),
    ));
    ok(cairn(
        repo.path(),
        &["secret", "set", "apps/api.toml", "api", "Y"],
        format!("{CANARY}-y").as_bytes(),
    ));
    assert!(age_decrypt(&bob, &ciphertext_of(&web, "web", "X")).is_err());
    let layout = (redact(&read(&web)), redact(&read(&api)));

    write(repo.path().join("cairn.toml"), &settings(&[&a, &b]));
    let out = ok(cairn(
        repo.path(),
        &["secret", "rotate", "--identity", alice.to_str().unwrap()],
        b"",
    ));
    assert_eq!(
        out.stdout,
        "re-encrypted 2 secrets in 2 files to 2 recipients\n  apps/api.toml: 1\n  apps/web.toml: 1\n"
    );
    for key in [&alice, &bob] {
        assert_eq!(
            age_decrypt(key, &ciphertext_of(&web, "web", "X")).unwrap(),
            format!("{CANARY}-x")
        );
        assert_eq!(
            age_decrypt(key, &ciphertext_of(&api, "api", "Y")).unwrap(),
            format!("{CANARY}-y")
        );
    }
    assert_eq!(
        (redact(&read(&web)), redact(&read(&api))),
        layout,
        "only the ciphertexts change"
    );
}

#[test]
fn rotate_after_removing_a_recipient_locks_it_out() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, a) = keygen(dir.path(), "alice.txt");
    let (bob, b) = keygen(dir.path(), "bob.txt");
    let repo = repo(&[&a, &b]);
    let web = repo.path().join("apps/web.toml");
    ok(cairn(
        repo.path(),
        &["secret", "set", "apps/web.toml", "web", "X"],
        CANARY.as_bytes(),
    ));
    assert_eq!(
        age_decrypt(&alice, &ciphertext_of(&web, "web", "X")).unwrap(),
        CANARY
    );

    // Alice removes herself and rotates with her own key (given through CAIRN_IDENTITY this time).
    write(repo.path().join("cairn.toml"), &settings(&[&b]));
    let out = run(
        Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(["secret", "rotate"])
            .current_dir(repo.path())
            .env("CAIRN_IDENTITY", &alice),
        b"",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(!out.stdout.contains(CANARY) && !out.stderr.contains(CANARY));
    assert_eq!(
        out.stdout,
        "re-encrypted 1 secret in 1 file to 1 recipient\n  apps/web.toml: 1\n"
    );
    assert!(
        out.stderr
            .contains(&format!("note: {a} is not among the recipients")),
        "{}",
        out.stderr
    );
    let ct = ciphertext_of(&web, "web", "X");
    assert_eq!(age_decrypt(&bob, &ct).unwrap(), CANARY);
    assert!(
        age_decrypt(&alice, &ct)
            .unwrap_err()
            .contains("no identity matched")
    );
    assert_eq!(
        cairn(
            repo.path(),
            &["validate", "--identity", alice.to_str().unwrap()],
            b""
        )
        .code,
        1
    );
    ok(cairn(
        repo.path(),
        &["validate", "--identity", bob.to_str().unwrap()],
        b"",
    ));
    // Now only Bob can rotate.
    assert_eq!(
        cairn(
            repo.path(),
            &["secret", "rotate", "--identity", alice.to_str().unwrap()],
            b""
        )
        .code,
        1
    );
    let out = ok(cairn(
        repo.path(),
        &["secret", "rotate", "--identity", bob.to_str().unwrap()],
        b"",
    ));
    assert_eq!(out.stderr, "");
}

#[test]
fn rotate_writes_nothing_when_a_secret_does_not_decrypt() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, a) = keygen(dir.path(), "alice.txt");
    let (_, stranger) = keygen(dir.path(), "stranger.txt");
    let repo = repo(&[&a]);
    ok(cairn(
        repo.path(),
        &["secret", "set", "apps/web.toml", "web", "X"],
        CANARY.as_bytes(),
    ));
    // One secret nobody in the repository can read, in the single-line form.
    let foreign = age_encrypt(&stranger, CANARY).replace('\n', "\\n");
    let api = repo.path().join("apps/api.toml");
    write(
        &api,
        &format!(
            "{}\n[app.api.env]\nA = \"1\"\nTOKEN = {{ secret = \"{foreign}\" }}\n",
            read(&api)
        ),
    );
    write(repo.path().join("cairn.toml"), &settings(&[&a, &stranger]));
    let before = tree(repo.path());

    let out = cairn(
        repo.path(),
        &["secret", "rotate", "--identity", alice.to_str().unwrap()],
        b"",
    );
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.stderr.starts_with(&format!(
            "apps/api.toml:8:20: error: secret `TOKEN` of app `api` does not decrypt with {a}: the ciphertext does not decrypt with the given identity\n"
        )),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.ends_with(
            "error: 1 secret does not decrypt with this identity, so nothing was written\n"
        ),
        "{}",
        out.stderr
    );
    assert_eq!(out.stdout, "");
    assert_eq!(
        tree(repo.path()),
        before,
        "no file changed and no temporary file is left"
    );
}

#[test]
fn missing_recipients_and_identities_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(&[]);
    let out = cairn(repo.path(), &["secret", "encrypt"], CANARY.as_bytes());
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("no recipients to encrypt to: list age public keys in `[secrets] recipients` of ./cairn.toml, or pass `-r age1...`"), "{}", out.stderr);
    let out = cairn(dir.path(), &["secret", "encrypt"], CANARY.as_bytes());
    assert_eq!(out.code, 1, "no cairn.toml and no -r");
    let out = cairn(
        repo.path(),
        &["secret", "set", "apps/web.toml", "web", "X"],
        CANARY.as_bytes(),
    );
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("no recipients to encrypt to"),
        "{}",
        out.stderr
    );

    assert_eq!(cairn(repo.path(), &["secret", "rotate"], b"").code, 64);
    assert_eq!(
        cairn(
            repo.path(),
            &["secret", "encrypt", "-r", "age1nope"],
            CANARY.as_bytes()
        )
        .code,
        64
    );
}

#[test]
fn the_value_never_reaches_any_output() {
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = keygen(dir.path(), "key.txt");
    let (other, other_recipient) = keygen(dir.path(), "other.txt");
    let repo = repo(&[&recipient]);
    let r = repo.path();
    // Values Cairn refuses after reading them: the refusal must not quote them.
    for bad in [format!("{CANARY}\0"), String::new()] {
        assert_eq!(cairn(r, &["secret", "encrypt"], bad.as_bytes()).code, 1);
        assert_eq!(
            cairn(
                r,
                &["secret", "set", "apps/web.toml", "web", "X"],
                bad.as_bytes()
            )
            .code,
            1
        );
    }
    let mut not_utf8 = CANARY.as_bytes().to_vec();
    not_utf8.push(0xff);
    assert_eq!(
        cairn(
            r,
            &["secret", "set", "apps/web.toml", "web", "X"],
            &not_utf8
        )
        .code,
        1
    );
    // The plain value a secret replaces is not shown either (it is in the file already, but not in logs).
    write(
        r.join("apps/web.toml"),
        &format!("{}X = \"{CANARY}\"\n", read(r.join("apps/web.toml"))),
    );
    ok(cairn(
        r,
        &["secret", "set", "apps/web.toml", "web", "X"],
        CANARY.as_bytes(),
    ));
    ok(cairn(
        r,
        &["secret", "set", "apps/api.toml", "api", "Y"],
        CANARY.as_bytes(),
    ));
    ok(cairn(
        r,
        &["validate", "--identity", key.to_str().unwrap()],
        b"",
    ));
    ok(cairn(
        r,
        &["validate", "--identity", key.to_str().unwrap(), "--json"],
        b"",
    ));
    assert_eq!(
        cairn(
            r,
            &["validate", "--identity", other.to_str().unwrap(), "--json"],
            b""
        )
        .code,
        1
    );
    ok(cairn(
        r,
        &["secret", "rotate", "--identity", key.to_str().unwrap()],
        b"",
    ));
    assert_eq!(
        cairn(
            r,
            &["secret", "rotate", "--identity", other.to_str().unwrap()],
            b""
        )
        .code,
        1
    );
    // Rotating a repository where one secret decrypts (its plaintext is in memory) and another does not.
    let foreign = age_encrypt(&other_recipient, CANARY);
    write(
        r.join("apps/api.toml"),
        &format!(
            "{}Z = {{ secret = \"\"\"\n{foreign}\"\"\" }}\n",
            read(r.join("apps/api.toml"))
        ),
    );
    assert_eq!(
        cairn(
            r,
            &["secret", "rotate", "--identity", key.to_str().unwrap()],
            b""
        )
        .code,
        1
    );
}

#[test]
fn rotate_and_set_keep_each_secret_in_the_form_it_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = keygen(dir.path(), "key.txt");
    let repo = repo(&[&recipient]);
    let web = repo.path().join("apps/web.toml");
    // Four spellings of a secret, all encrypted by the age CLI: Cairn's own form, one escaped line, a
    // sub-table holding a literal multi-line string, and a dotted key.
    let ct = |n: u32| age_encrypt(&recipient, &format!("{CANARY}-{n}"));
    let text = format!(
        "{}A = {{ secret = \"\"\"\n{}\"\"\" }}\nB = {{ secret = \"{}\" }} # one line\nD.secret = \"{}\"\n\n[app.web.env.C]\nsecret = '''\n{}'''\n",
        read(&web),
        ct(1),
        ct(2).replace('\n', "\\n"),
        ct(4).replace('\n', "\\n"),
        ct(3),
    );
    write(&web, &text);
    ok(cairn(
        repo.path(),
        &["validate", "--identity", key.to_str().unwrap()],
        b"",
    ));

    let out = ok(cairn(
        repo.path(),
        &["secret", "rotate", "--identity", key.to_str().unwrap()],
        b"",
    ));
    assert!(
        out.stdout.starts_with("re-encrypted 4 secrets in 1 file"),
        "{}",
        out.stdout
    );
    ok(cairn(
        repo.path(),
        &["secret", "set", "apps/web.toml", "web", "C"],
        format!("{CANARY}-5").as_bytes(),
    ));
    let after = read(&web);
    assert_eq!(redact(&after), redact(&text));
    // (age's random grease stanza varies a ciphertext's length, so compare forms, not line counts.)
    let b = after
        .lines()
        .find(|l| l.starts_with("B = { secret = \"-----BEGIN"))
        .expect("B on one line");
    assert!(
        b.ends_with("-----END AGE ENCRYPTED FILE-----\\n\" } # one line"),
        "{b}"
    );
    let d = after
        .lines()
        .find(|l| l.starts_with("D.secret = \"-----BEGIN"))
        .expect("D on one line");
    assert!(d.ends_with("-----END AGE ENCRYPTED FILE-----\\n\""), "{d}");
    for (name, n) in [("A", 1), ("B", 2), ("C", 5), ("D", 4)] {
        let ct = ciphertext_of(&web, "web", name);
        assert!(
            !text.contains(&ct) && !text.contains(&ct.replace('\n', "\\n")),
            "{name} was re-encrypted"
        );
        assert_eq!(
            age_decrypt(&key, &ct).unwrap(),
            format!("{CANARY}-{n}"),
            "{name}"
        );
    }
}

/// An app's own certificate key is a secret like any other: `rotate` re-encrypts it too.
#[test]
fn rotate_re_encrypts_an_own_certificate_key() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, a) = keygen(dir.path(), "alice.txt");
    let (bob, b) = keygen(dir.path(), "bob.txt");
    let repo = repo(&[&a]);
    let key = format!("-----BEGIN PRIVATE KEY-----\n{CANARY}\n-----END PRIVATE KEY-----\n");
    let ct = ok(cairn(repo.path(), &["secret", "encrypt"], key.as_bytes())).stdout;
    write(
        repo.path().join("certs/web.pem"),
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    );
    let web = repo.path().join("apps/web.toml");
    write(
        &web,
        &format!(
            "{}\n[app.web.tls]\ncert = \"certs/web.pem\"\nkey = {{ secret = \"\"\"\n{}\"\"\" }}\n",
            read(&web),
            ct.trim_end()
        ),
    );
    ok(cairn(
        repo.path(),
        &["validate", "--identity", alice.to_str().unwrap()],
        b"",
    ));
    write(repo.path().join("cairn.toml"), &settings(&[&a, &b]));
    let out = ok(cairn(
        repo.path(),
        &["secret", "rotate", "--identity", alice.to_str().unwrap()],
        b"",
    ));
    assert!(
        out.stdout.starts_with("re-encrypted 1 secret in 1 file"),
        "{}",
        out.stdout
    );
    let text = read(&web);
    let start = text.find("-----BEGIN AGE").unwrap();
    let end = text.find("-----END AGE ENCRYPTED FILE-----").unwrap() + 32;
    assert_eq!(
        age_decrypt(&bob, &text[start..end]).unwrap().trim_end(),
        key.trim_end()
    );
    ok(cairn(
        repo.path(),
        &["validate", "--identity", bob.to_str().unwrap()],
        b"",
    ));
}
