//! `cairn secret`: age identities and the encrypted env values of manifests.
//!
//! `keygen` writes an identity in age-keygen's format, `encrypt` turns stdin into an armored ciphertext,
//! `set` writes one encrypted env value into a manifest, and `rotate` re-encrypts every secret of the
//! repository to the recipients listed in `cairn.toml`.
//!
//! What it must not do: print a plaintext or put one into an error (only ciphertexts, recipients and
//! `path:line:col` locations are ever shown); edit a manifest's text itself (`cairn_schema::edit` does,
//! changing nothing but the secret values, so comments, order and layout stay byte for byte; this module
//! reads, validates and writes); leave a file half written or a repository half rotated (new contents are
//! validated first, written to temporary files, then renamed over the originals).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use cairn_schema::edit::{self, Previous};
use cairn_schema::{
    Ciphertext, EnvName, Identity, Kind, Name, ParsedFile, Recipient, SETTINGS_FILE, Severity,
};
use clap::Subcommand;
use zeroize::Zeroizing;

use super::repo::{Repo, load_files};
use super::{EXIT_USAGE, read_identity};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Generate an age identity (private key) and print its recipient (public key)
    ///
    /// The identity is written in age-keygen's format, so the age CLI reads it with `age -d -i FILE`.
    Keygen(KeygenArgs),
    /// Encrypt a value from stdin and print it as an ASCII-armored age ciphertext
    ///
    /// The value is encrypted to the recipients in `[secrets] recipients` of the repository's cairn.toml
    /// and to every `-r`. One trailing newline (`\n` or `\r\n`) is removed from stdin, so
    /// `echo "$VALUE" | cairn secret encrypt` encrypts exactly `$VALUE`. Paste the output into a manifest
    /// as `KEY = { secret = """<ciphertext>""" }`, or let `cairn secret set` do it.
    Encrypt(EncryptArgs),
    /// Encrypt a value from stdin and write it into a manifest as an app's env var
    ///
    /// One trailing newline (`\n` or `\r\n`) is removed from stdin, so `echo "$VALUE" | cairn secret set
    /// ...` stores exactly `$VALUE`; from a terminal, type the value and end it with Ctrl-D. The value is
    /// encrypted to the recipients in cairn.toml and written into `[app.APP.env]` of FILE (created if
    /// missing) as
    ///
    ///     KEY = { secret = """
    ///     -----BEGIN AGE ENCRYPTED FILE-----
    ///     ...
    ///     -----END AGE ENCRYPTED FILE-----
    ///     """ }
    ///
    /// replacing any value KEY had. Nothing else in the file changes. The file is written only if the
    /// repository validates afterwards.
    Set(SetArgs),
    /// Re-encrypt every secret of the repository to the recipients in cairn.toml
    ///
    /// Run it after adding a recipient to `[secrets] recipients` (so the new key can read every secret) or
    /// removing one (so the removed key cannot read the new ciphertexts; the old ones stay in the git
    /// history, so rotate the values themselves if that key leaked). Every secret must decrypt with the
    /// identity given; if one does not, nothing is written.
    Rotate(RotateArgs),
}

#[derive(Debug, clap::Args)]
struct KeygenArgs {
    /// Write the identity to FILE (created with mode 0600, never overwritten) and print the recipient on
    /// stdout; without it the identity goes to stdout and the recipient to stderr, like age-keygen
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct EncryptArgs {
    /// The config repository whose cairn.toml lists the recipients [default: ., if it has a cairn.toml]
    #[arg(long, value_name = "DIR")]
    repo: Option<PathBuf>,
    /// Also encrypt to this age recipient (age1...); may be repeated
    #[arg(short = 'r', long = "recipient", value_name = "RECIPIENT", value_parser = parse_recipient)]
    recipients: Vec<Recipient>,
}

#[derive(Debug, clap::Args)]
struct SetArgs {
    /// The manifest to write into; it must declare `[app.APP]`
    file: PathBuf,
    /// The app whose env var to set
    #[arg(value_parser = parse_name)]
    app: Name,
    /// The env var's name (POSIX: letters, digits and `_`, not starting with a digit)
    #[arg(value_parser = parse_env_name)]
    key: EnvName,
    /// The config repository FILE belongs to [default: the nearest directory above FILE with a cairn.toml]
    #[arg(long, value_name = "DIR")]
    repo: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct RotateArgs {
    /// An age identity file that decrypts every current secret (or set CAIRN_IDENTITY)
    #[arg(long, value_name = "FILE")]
    identity: Option<PathBuf>,
    /// The config repository
    #[arg(long, value_name = "DIR", default_value = ".")]
    repo: PathBuf,
}

fn parse_recipient(s: &str) -> Result<Recipient, String> {
    Recipient::new(s).map_err(|e| e.to_string())
}
fn parse_name(s: &str) -> Result<Name, String> {
    Name::new(s)
}
fn parse_env_name(s: &str) -> Result<EnvName, String> {
    EnvName::new(s)
}

pub fn run(args: Args) -> Result<ExitCode> {
    match args.command {
        Cmd::Keygen(a) => keygen(a),
        Cmd::Encrypt(a) => encrypt(a),
        Cmd::Set(a) => set(a),
        Cmd::Rotate(a) => rotate(a),
    }
}

fn keygen(a: KeygenArgs) -> Result<ExitCode> {
    let id = Identity::generate();
    let text = id.to_file_text(&rfc3339_utc(SystemTime::now()));
    match a.output.filter(|p| p.as_os_str() != "-") {
        Some(path) => {
            write_new_private_file(&path, text.as_bytes())?;
            println!("{}", id.recipient());
        }
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .context("cannot write to stdout")?;
            eprintln!("Public key: {}", id.recipient());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Creates `path` with mode 0600 and writes `bytes`; an existing file (or symlink) is never replaced.
fn write_new_private_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!(
                "{} already exists; refusing to overwrite it (an identity file may hold the only copy of a key)",
                path.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
    };
    if let Err(e) = f.write_all(bytes).and_then(|()| f.sync_all()) {
        drop(f);
        let _ = std::fs::remove_file(path);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SSZ`, the `# created:` line of an identity file.
fn rfc3339_utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant, "chrono-Compatible Low-Level Date Algorithms").
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn encrypt(a: EncryptArgs) -> Result<ExitCode> {
    let dir = a.repo.clone().unwrap_or_else(|| PathBuf::from("."));
    let settings_path = dir.join(SETTINGS_FILE);
    let mut recipients = a.recipients;
    match std::fs::read(&settings_path) {
        Ok(bytes) => recipients.extend(settings_recipients(&settings_path, &bytes)?),
        // Outside a config repository `-r` alone is enough.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && a.repo.is_none() => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read {}", settings_path.display()));
        }
    }
    let recipients = dedup(recipients);
    if recipients.is_empty() {
        bail!(
            "no recipients to encrypt to: list age public keys in `[secrets] recipients` of {}, or pass `-r age1...`",
            settings_path.display()
        );
    }
    let value = read_value("the value to encrypt")?;
    let ct = cairn_schema::secret::encrypt(&value, &recipients)?;
    let mut out = std::io::stdout().lock();
    out.write_all(ct.as_str().as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to stdout")?;
    Ok(ExitCode::SUCCESS)
}

/// The recipients of a cairn.toml read on its own (`encrypt` needs nothing else of the repository).
fn settings_recipients(path: &Path, bytes: &[u8]) -> Result<Vec<Recipient>> {
    let parsed = cairn_schema::parse_file(SETTINGS_FILE, bytes);
    if parsed.has_errors() {
        print_errors(parsed.diagnostics.iter());
        bail!("{} has errors", path.display());
    }
    Ok(parsed
        .settings
        .map(|s| s.value.secrets.recipients)
        .unwrap_or_default())
}

fn dedup(recipients: Vec<Recipient>) -> Vec<Recipient> {
    let mut out: Vec<Recipient> = Vec::with_capacity(recipients.len());
    for r in recipients {
        if !out.contains(&r) {
            out.push(r);
        }
    }
    out
}

/// Reads a value from stdin and removes one trailing newline (`\n` or `\r\n`). It must be non-empty UTF-8
/// without NUL bytes, since it becomes an env var. Errors never quote it.
fn read_value(what: &str) -> Result<Zeroizing<Vec<u8>>> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("Type {what}, then press Enter and Ctrl-D:");
    }
    // Reserved up front so that typical values never reallocate and leave unzeroed copies behind.
    let mut buf = Zeroizing::new(Vec::with_capacity(16 * 1024));
    stdin
        .lock()
        .read_to_end(&mut buf)
        .context("cannot read the value from stdin")?;
    strip_one_newline(&mut buf);
    if buf.is_empty() {
        bail!("the value read from stdin is empty");
    }
    if std::str::from_utf8(&buf).is_err() {
        bail!("the value read from stdin is not UTF-8; env values must be text");
    }
    if buf.contains(&0) {
        bail!("the value read from stdin contains a NUL byte, which an env var cannot hold");
    }
    Ok(buf)
}

fn strip_one_newline(buf: &mut Vec<u8>) {
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    }
}

fn print_errors<'a>(diags: impl IntoIterator<Item = &'a cairn_schema::Diagnostic>) {
    for d in diags.into_iter().filter(|d| d.is_error()) {
        eprintln!("{d}\n");
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A config repository read from disk, ready to be re-validated with some files replaced.
struct RepoFiles {
    root: PathBuf,
    files: Vec<(String, Vec<u8>)>,
    read_errors: Vec<cairn_schema::Diagnostic>,
}

impl RepoFiles {
    fn read(dir: &Path) -> Result<Self> {
        let root = dir
            .canonicalize()
            .with_context(|| format!("cannot open config repository {}", dir.display()))?;
        let snap = cairn_reconciler::source::dir::read_dir(&root)
            .with_context(|| format!("cannot read config repository {}", dir.display()))?;
        Ok(RepoFiles {
            root,
            files: snap.files,
            read_errors: snap.diagnostics,
        })
    }

    fn load(&self) -> Repo {
        load_files(self.files.clone(), self.read_errors.clone())
    }

    /// Loads the repository as it would be with `changed` (path → new contents) written.
    fn load_with(&self, changed: &BTreeMap<String, String>) -> Repo {
        let files = self
            .files
            .iter()
            .map(|(p, b)| {
                (
                    p.clone(),
                    changed
                        .get(p)
                        .map_or_else(|| b.clone(), |s| s.as_bytes().to_vec()),
                )
            })
            .collect();
        load_files(files, self.read_errors.clone())
    }

    fn original(&self, rel: &str) -> &[u8] {
        self.files
            .iter()
            .find(|(p, _)| p == rel)
            .map_or(&[], |(_, b)| b)
    }
}

fn set(a: SetArgs) -> Result<ExitCode> {
    let file = a.file.canonicalize().with_context(|| {
        format!(
            "cannot open {} (FILE is relative to the current directory)",
            a.file.display()
        )
    })?;
    let dir = match &a.repo {
        Some(d) => d.clone(),
        None => repo_root_above(&file)?,
    };
    let repo = RepoFiles::read(&dir)?;
    let rel = repo_relative(&repo.root, &file).ok_or_else(|| {
        anyhow!(
            "{} is not inside the config repository {}",
            a.file.display(),
            dir.display()
        )
    })?;
    if rel == SETTINGS_FILE {
        bail!("{SETTINGS_FILE} holds the repository settings; apps are declared in other files");
    }
    if !repo.files.iter().any(|(p, _)| *p == rel) {
        bail!(
            "{rel} is not a manifest of {} (manifests are `.toml` files outside hidden directories)",
            dir.display()
        );
    }

    let before = repo.load();
    let recipients = repo_recipients(&before)?;
    check_declares_app(&before.parsed, &rel, &a.app)?;

    let value = read_value(&format!("the value of `{}` for app `{}`", a.key, a.app))?;
    let ct = cairn_schema::secret::encrypt(&value, &recipients)?;
    drop(value);
    let src =
        std::str::from_utf8(repo.original(&rel)).with_context(|| format!("{rel} is not UTF-8"))?;
    let (new_src, was) = match edit::set_secret(src, a.app.as_str(), a.key.as_str(), &ct) {
        Ok(r) => r,
        Err(e) => {
            // The schema's diagnostics say what is wrong without quoting a value that may be a secret.
            if let Some(f) = before.parsed.iter().find(|f| f.path == rel) {
                print_errors(&f.diagnostics);
            }
            return Err(
                anyhow::Error::new(e).context(format!("cannot edit {rel}; nothing was written"))
            );
        }
    };

    let changed = BTreeMap::from([(rel.clone(), new_src)]);
    let after = repo.load_with(&changed);
    if after.loaded.diagnostics.has_errors() || after.loaded.desired.is_none() {
        print_errors(&after.loaded.diagnostics.0);
        bail!(
            "the repository would not validate with this change, so nothing was written; fix the errors above and run this again"
        );
    }
    let landed = after.loaded.secrets.iter().any(|s| {
        s.app == a.app && s.key == a.key && after.parsed.get(s.file).is_some_and(|f| f.path == rel)
    });
    if !landed {
        bail!(
            "internal error: the new secret is not where it was written in {rel}; nothing was written"
        );
    }
    write_all_or_nothing(&repo, &changed)?;
    let (app, key, to) = (
        &a.app,
        &a.key,
        plural(recipients.len(), "recipient", "recipients"),
    );
    match was {
        Previous::None => println!("{rel}: added secret `{key}` to app `{app}`, encrypted to {to}"),
        Previous::Secret => {
            println!("{rel}: replaced secret `{key}` of app `{app}`, encrypted to {to}")
        }
        Previous::Plain => {
            println!(
                "{rel}: replaced plain `{key}` of app `{app}` with a secret, encrypted to {to}"
            )
        }
    }
    if was == Previous::Plain {
        eprintln!(
            "note: the old plain value stays in the git history of any commit that held it; if it mattered, change the value itself"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The nearest directory above `file` that holds a cairn.toml.
fn repo_root_above(file: &Path) -> Result<PathBuf> {
    let mut dir = file.parent();
    while let Some(d) = dir {
        if d.join(SETTINGS_FILE).is_file() {
            return Ok(d.to_path_buf());
        }
        dir = d.parent();
    }
    bail!(
        "no {SETTINGS_FILE} in any directory above {}; pass --repo DIR",
        file.display()
    )
}

/// `file`'s repository-relative path with `/` separators, if it is inside `root` (both canonical).
fn repo_relative(root: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(root).ok()?;
    let parts: Option<Vec<&str>> = rel.components().map(|c| c.as_os_str().to_str()).collect();
    Some(parts?.join("/")).filter(|s| !s.is_empty())
}

/// The recipients in cairn.toml; an error when there are none or cairn.toml is broken.
fn repo_recipients(repo: &Repo) -> Result<Vec<Recipient>> {
    let Some(settings_file) = repo.parsed.iter().find(|p| p.path == SETTINGS_FILE) else {
        bail!("the repository has no {SETTINGS_FILE}, so there are no recipients to encrypt to");
    };
    let Some(settings) = &settings_file.settings else {
        print_errors(&settings_file.diagnostics);
        bail!("{SETTINGS_FILE} has errors");
    };
    let recipients = dedup(settings.value.secrets.recipients.clone());
    if recipients.is_empty() {
        bail!(
            "no recipients to encrypt to: list age public keys in `[secrets] recipients` of {SETTINGS_FILE}"
        );
    }
    Ok(recipients)
}

/// Errors unless `rel` declares `[app.APP]`, saying where the app is declared instead.
fn check_declares_app(parsed: &[ParsedFile], rel: &str, app: &Name) -> Result<()> {
    let mut elsewhere = None;
    for f in parsed {
        for d in f
            .declared
            .iter()
            .filter(|d| d.kind == Kind::App && d.name == *app)
        {
            if f.path == rel {
                return Ok(());
            }
            elsewhere.get_or_insert_with(|| f.diag(Severity::Error, d.span.clone(), "").location());
        }
    }
    if let Some(file) = parsed.iter().find(|f| f.path == rel)
        && file.has_errors()
        && file.declared.is_empty()
    {
        print_errors(&file.diagnostics);
        bail!("{rel} has errors");
    }
    match elsewhere {
        Some(at) => bail!("{rel} does not declare `[app.{app}]`; it is declared at {at}"),
        None => bail!("no file of the repository declares `[app.{app}]`"),
    }
}

fn rotate(a: RotateArgs) -> Result<ExitCode> {
    let Some(identity) = read_identity(a.identity.as_ref())? else {
        eprintln!(
            "error: `cairn secret rotate` needs an identity that decrypts the current secrets: --identity FILE or CAIRN_IDENTITY"
        );
        return Ok(ExitCode::from(EXIT_USAGE));
    };
    let repo = RepoFiles::read(&a.repo)?;
    let before = repo.load();
    let Some(desired) = before
        .loaded
        .desired
        .as_ref()
        .filter(|_| !before.loaded.diagnostics.has_errors())
    else {
        print_errors(&before.loaded.diagnostics.0);
        bail!(
            "the repository does not validate; fix the errors above before rotating (nothing was written)"
        );
    };
    let recipients = dedup(desired.settings.secrets.recipients.clone());
    if recipients.is_empty() {
        bail!(
            "no recipients to encrypt to: list age public keys in `[secrets] recipients` of {SETTINGS_FILE}"
        );
    }

    let mut failures = Vec::new();
    let mut changed = BTreeMap::new();
    let mut per_file = Vec::new();
    for f in before.parsed.iter().filter(|f| f.path != SETTINGS_FILE) {
        let sites = edit::secret_sites(&f.src).map_err(|e| anyhow!("{}: {e}", f.path))?;
        if sites.is_empty() {
            continue;
        }
        let mut new = BTreeMap::new();
        for s in sites {
            let plain = Ciphertext::new(&s.armored).and_then(|c| identity.decrypt(&c));
            match plain {
                Ok(p) => {
                    let ct = cairn_schema::secret::encrypt(p.expose(), &recipients)?;
                    new.insert((s.app, s.key), ct);
                }
                Err(e) => failures.push(
                    f.diag(
                        Severity::Error,
                        s.span,
                        format!("secret `{}` of app `{}` does not decrypt with {}: {e}", s.key, s.app, identity.recipient()),
                    )
                    .with_hint("rotate with an identity that can read every secret, or set this one again with `cairn secret set`"),
                ),
            }
        }
        if !failures.is_empty() {
            continue;
        }
        let (new_src, n) =
            edit::replace_secrets(&f.src, &new).map_err(|e| anyhow!("{}: {e}", f.path))?;
        if n != new.len() {
            bail!(
                "internal error: {} of {} secrets in {} were found again for rewriting; nothing was written",
                n,
                new.len(),
                f.path
            );
        }
        per_file.push((f.path.clone(), n));
        changed.insert(f.path.clone(), new_src);
    }
    if !failures.is_empty() {
        print_errors(&failures);
        bail!(
            "{} {} not decrypt with this identity, so nothing was written",
            plural(failures.len(), "secret", "secrets"),
            if failures.len() == 1 { "does" } else { "do" }
        );
    }
    let total: usize = per_file.iter().map(|(_, n)| n).sum();
    if total == 0 {
        println!("no secrets to re-encrypt");
        return Ok(ExitCode::SUCCESS);
    }

    let after = repo.load_with(&changed);
    let mut problems = after
        .loaded
        .diagnostics
        .errors()
        .cloned()
        .collect::<Vec<_>>();
    if recipients.contains(&identity.recipient()) {
        problems.extend(cairn_schema::check_secrets(
            &after.loaded,
            &after.parsed,
            &identity,
        ));
    }
    if !problems.is_empty()
        || after.loaded.desired.is_none()
        || after.loaded.secrets.len() != before.loaded.secrets.len()
    {
        print_errors(&problems);
        bail!(
            "internal error: the re-encrypted repository does not check out; nothing was written"
        );
    }
    write_all_or_nothing(&repo, &changed)?;
    println!(
        "re-encrypted {} in {} to {}",
        plural(total, "secret", "secrets"),
        plural(per_file.len(), "file", "files"),
        plural(recipients.len(), "recipient", "recipients")
    );
    for (path, n) in &per_file {
        println!("  {path}: {n}");
    }
    if !recipients.contains(&identity.recipient()) {
        eprintln!(
            "note: {} is not among the recipients, so it cannot decrypt the new ciphertexts",
            identity.recipient()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes every changed file, or none: each new text goes to a hidden temporary file beside its target
/// (hidden, so a watcher reading the repository skips it) with the target's permissions, and only when all
/// are on disk are they renamed over their targets. A target that changed since it was read stops it all.
fn write_all_or_nothing(repo: &RepoFiles, changed: &BTreeMap<String, String>) -> Result<()> {
    struct Staged {
        tmp: PathBuf,
        target: PathBuf,
        rel: String,
    }
    fn cleanup(staged: &[Staged]) {
        for s in staged {
            let _ = std::fs::remove_file(&s.tmp);
        }
    }
    let mut staged: Vec<Staged> = Vec::new();
    for (i, (rel, text)) in changed.iter().enumerate() {
        let r = (|| -> Result<Staged> {
            // Write through symlinks to the file they name, which stays inside the repository.
            let target = repo
                .root
                .join(rel)
                .canonicalize()
                .with_context(|| format!("cannot open {rel}"))?;
            let dir = target
                .parent()
                .ok_or_else(|| anyhow!("{rel} has no directory"))?;
            let name = target
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("manifest");
            let tmp = dir.join(format!(".{name}.cairn-{}-{i}.tmp", std::process::id()));
            let perms = std::fs::metadata(&target)
                .with_context(|| format!("cannot stat {rel}"))?
                .permissions();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .with_context(|| format!("cannot create a temporary file beside {rel}"))?;
            let s = Staged {
                tmp,
                target,
                rel: rel.clone(),
            };
            let written = f
                .write_all(text.as_bytes())
                .and_then(|()| f.set_permissions(perms))
                .and_then(|()| f.sync_all());
            if let Err(e) = written {
                cleanup(std::slice::from_ref(&s));
                return Err(e)
                    .with_context(|| format!("cannot write a temporary file beside {rel}"));
            }
            Ok(s)
        })();
        match r {
            Ok(s) => staged.push(s),
            Err(e) => {
                cleanup(&staged);
                return Err(e.context("nothing was written"));
            }
        }
    }
    for s in &staged {
        let now = std::fs::read(&s.target).unwrap_or_default();
        if now != repo.original(&s.rel) {
            cleanup(&staged);
            bail!(
                "{} changed while Cairn was working on it; nothing was written, run the command again",
                s.rel
            );
        }
    }
    for (i, s) in staged.iter().enumerate() {
        if let Err(e) = std::fs::rename(&s.tmp, &s.target) {
            cleanup(&staged[i..]);
            let done: Vec<&str> = staged[..i].iter().map(|s| s.rel.as_str()).collect();
            return Err(e).with_context(|| {
                format!(
                    "cannot replace {}; {} already updated: {}",
                    s.rel,
                    plural(done.len(), "file was", "files were"),
                    if done.is_empty() {
                        "none".to_owned()
                    } else {
                        done.join(", ")
                    }
                )
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let at = |s: u64| rfc3339_utc(UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn strips_exactly_one_newline() {
        for (input, want) in [
            ("v", "v"),
            ("v\n", "v"),
            ("v\r\n", "v"),
            ("v\n\n", "v\n"),
            ("v\r", "v\r"),
            ("\n", ""),
        ] {
            let mut b = input.as_bytes().to_vec();
            strip_one_newline(&mut b);
            assert_eq!(b, want.as_bytes(), "{input:?}");
        }
    }
}
