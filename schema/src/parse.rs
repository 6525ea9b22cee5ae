//! Per-file parsing: one manifest file's bytes to the resources it declares, with every error found in it.
//!
//! Each file is parsed on its own so callers can cache the result by blob id and re-parse only the files
//! a commit changed; cross-file checks (duplicates, references) live in `validate`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::database::Engine;
use crate::diag::{Diagnostic, LineIndex, Position, Severity, did_you_mean};
use crate::model::{
    App, AppTls, Challenge, Database, DatabaseBackup, Driver, EnvValue, Health, Http, Kind, Node,
    OwnCertificate, Placement, Plan, Runtime, SecretRef, SecretSettings, Settings, Sink, SinkKind,
    SinkSeverity, Source, TlsMode, TlsSettings, default_acme_directory, default_branch,
    default_currency, default_drivers, default_health_path, default_health_timeout,
};
use crate::secret::Ciphertext;
use crate::source::check_ref_name;
use crate::units::{ByteSize, EnvName, Name};

/// The repository settings file, at the repository root.
pub const SETTINGS_FILE: &str = "cairn.toml";
/// Files larger than this are refused before parsing.
pub const MAX_FILE_BYTES: usize = 4 << 20;
/// Deeper nesting of arrays, inline tables or dotted keys is refused before parsing.
pub const MAX_DEPTH: usize = 32;

/// Keys that would weaken isolation; a manifest can never ask for them.
const FORBIDDEN_KEYS: [&str; 12] = [
    "privileged",
    "network_mode",
    "host_network",
    "network",
    "pid",
    "pid_mode",
    "devices",
    "volumes",
    "mounts",
    "binds",
    "cap_add",
    "security_opt",
];

/// One manifest file, parsed. Cheap to keep: callers cache it by blob id.
#[derive(Debug, Clone)]
pub struct ParsedFile {
    pub path: String,
    pub src: Arc<str>,
    pub lines: LineIndex,
    pub settings: Option<Located<Settings>>,
    pub declared: Vec<Declared>,
    /// Other files of the repository this one names (`[tls] ca_roots`, an app's own `tls.cert`): the
    /// source reads them and [`crate::validate::check_referenced`] checks them.
    pub file_refs: Vec<FileRef>,
    pub diagnostics: Vec<Diagnostic>,
}

/// A value and where it is.
#[derive(Debug, Clone)]
pub struct Located<T> {
    pub value: T,
    pub span: Range<usize>,
}

/// One `[kind.name]` table. `resource` is `None` when the table has errors (they are in the file's
/// diagnostics); the name still counts as declared so references to it do not cascade into more errors.
#[derive(Debug, Clone)]
pub struct Declared {
    pub kind: Kind,
    pub name: Name,
    pub span: Range<usize>,
    pub resource: Option<Resource>,
    /// An app's references, read even when other fields of the app are broken, so that an unknown plan is
    /// reported together with the app's other errors.
    pub refs: Option<AppRefs>,
    /// Where a node's `address` is, for the check that no two nodes share one.
    pub address: Option<Range<usize>>,
    /// The app names a notification sink lists (not `*`), with where, for the check that each is
    /// declared.
    pub sink_apps: Vec<Located<Name>>,
    /// A database's plan and node, with where, for the checks that they are declared.
    pub db_refs: Option<DbRefs>,
}

/// A database's cross-referencing fields and where they are.
#[derive(Debug, Clone, Default)]
pub struct DbRefs {
    pub plan: Option<Located<Name>>,
    pub node: Option<Located<Name>>,
}

#[derive(Debug, Clone)]
pub enum Resource {
    Plan(Plan),
    Runtime(Runtime),
    Node(Node),
    App(Box<App>),
    Sink(Box<Sink>),
    Database(Box<Database>),
}

/// An app's cross-referencing fields and where they are, for errors found after all files are read.
#[derive(Debug, Clone, Default)]
pub struct AppRefs {
    pub plan: Option<Located<Name>>,
    pub runtime: Option<Located<Name>>,
    pub replicas: Option<Located<u32>>,
    pub region: Option<Range<usize>>,
    pub labels: BTreeMap<Name, Range<usize>>,
    pub domains: Vec<Range<usize>>,
    pub secrets: BTreeMap<EnvName, Range<usize>>,
    /// Where an explicit `tls = "auto"` is, for the check that cairn.toml has `[tls]`.
    pub tls_auto: Option<Range<usize>>,
    /// Where an own certificate's key (its ciphertext) is, for the check that it decrypts.
    pub tls_key: Option<Range<usize>>,
    /// The databases the app attaches (`databases = { NAME = "ENV" }`), each at its key.
    pub databases: Vec<Located<Name>>,
}

impl ParsedFile {
    /// A diagnostic at a span of this file.
    pub fn diag(
        &self,
        severity: Severity,
        span: Range<usize>,
        message: impl Into<String>,
    ) -> Diagnostic {
        let pos = self.position(span.start);
        Diagnostic::at_position(severity, &self.path, &self.src, pos, span, message)
    }

    /// Line and column of a byte offset.
    pub fn position(&self, offset: usize) -> Position {
        self.lines.position(&self.src, offset)
    }

    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// Whether a repository path holds a manifest: a `.toml` file outside hidden directories.
pub fn is_manifest_path(path: &str) -> bool {
    path.ends_with(".toml")
        && !path
            .split('/')
            .any(|c| c.starts_with('.') && c != "." && c != "..")
}

/// Parses one file. `path` is repository-relative with `/` separators; `cairn.toml` at the root is the
/// settings file, any other `.toml` file holds resources.
pub fn parse_file(path: &str, bytes: &[u8]) -> ParsedFile {
    let mut file = ParsedFile {
        path: path.to_owned(),
        src: Arc::from(""),
        lines: LineIndex::default(),
        settings: None,
        declared: Vec::new(),
        file_refs: Vec::new(),
        diagnostics: Vec::new(),
    };
    if let Err(why) = check_path(path) {
        file.diagnostics
            .push(Diagnostic::file(Severity::Error, path, why));
        return file;
    }
    if bytes.len() > MAX_FILE_BYTES {
        file.diagnostics.push(Diagnostic::file(
            Severity::Error,
            path,
            format!(
                "file is {} bytes; manifests may be at most {MAX_FILE_BYTES} bytes",
                bytes.len()
            ),
        ));
        return file;
    }
    let src = match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => {
            let valid = &bytes[..e.valid_up_to()];
            let prefix = std::str::from_utf8(valid).unwrap_or("");
            file.src = Arc::from(prefix);
            let at = prefix.len();
            file.diagnostics.push(
                Diagnostic::error(path, prefix, at..at, "file is not valid UTF-8").with_hint(
                    "TOML files are UTF-8; re-save this one as UTF-8 (it may be Latin-1 or UTF-16)",
                ),
            );
            return file;
        }
    };
    file.src = Arc::from(src);
    file.lines = LineIndex::new(src);
    if let Some(at) = too_deep(src, MAX_DEPTH) {
        file.diagnostics.push(
            Diagnostic::error(
                path,
                src,
                at..at + 1,
                format!("nesting deeper than {MAX_DEPTH} levels"),
            )
            .with_hint("manifests never need this much nesting; is the file generated by mistake?"),
        );
        return file;
    }
    let src = file.src.clone();
    let (root, syntax) = DeTable::parse_recoverable(&src);
    let mut cx = Cx {
        path,
        src: &src,
        lines: &file.lines,
        diags: Vec::new(),
        file_refs: Vec::new(),
    };
    for e in &syntax {
        let span = e.span().unwrap_or(0..0);
        cx.error(span, format!("TOML syntax: {}", e.message().trim()));
    }
    // Checked even after a syntax error: the values the parser recovered are reported too.
    let no_nul = cx.no_nul(root.get_ref());
    let syntax_ok = syntax.is_empty() && no_nul;
    if path == SETTINGS_FILE {
        if syntax_ok {
            file.settings = cx.settings(root.get_ref(), root.span());
        }
    } else {
        file.declared = cx.resources(root.get_ref(), syntax_ok);
    }
    file.diagnostics = cx.diags;
    file.file_refs = cx.file_refs;
    file
}

/// Files each parsing thread takes at least: below this, one thread parses them all.
const FILES_PER_THREAD: usize = 64;

/// Parses `files` (as [`parse_file`] would, one by one, and in their order), on as many threads as the
/// machine has cores when there are enough files to share: a repository's first load parses every file.
pub fn parse_files<P, B>(files: &[(P, B)]) -> Vec<ParsedFile>
where
    P: AsRef<str> + Sync,
    B: AsRef<[u8]> + Sync,
{
    let one = |(p, b): &(P, B)| parse_file(p.as_ref(), b.as_ref());
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(files.len() / FILES_PER_THREAD)
        .max(1);
    if threads == 1 {
        return files.iter().map(one).collect();
    }
    std::thread::scope(|s| {
        let parts: Vec<_> = files
            .chunks(files.len().div_ceil(threads))
            .map(|part| s.spawn(move || part.iter().map(one).collect::<Vec<_>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

fn check_path(path: &str) -> Result<(), String> {
    if path.starts_with('/') || path.contains('\\') || path.contains('\0') {
        return Err("path must be relative to the repository root, with `/` separators".into());
    }
    if path.split('/').any(|c| c == "..") {
        return Err("path leaves the repository (`..`)".into());
    }
    Ok(())
}

/// The offset of the first place where arrays, inline tables or dotted keys nest deeper than `max`, found
/// without recursion so no input can exhaust the stack here or in the parser after it.
pub fn too_deep(src: &str, max: usize) -> Option<usize> {
    let b = src.as_bytes();
    let mut stack: Vec<u8> = Vec::new();
    let mut i = 0;
    let mut key_mode = true; // at the start of a line (outside brackets) we read a key
    let mut in_header = false;
    let mut dots = 0usize;
    while i < b.len() {
        let c = b[i];
        match c {
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' | b'\'' => {
                let triple = b.len() >= i + 3 && b[i + 1] == c && b[i + 2] == c;
                let close: &[u8] = if triple { &b[i..i + 3] } else { &b[i..i + 1] };
                i += close.len();
                while i < b.len() {
                    if c == b'"' && b[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if b[i..].starts_with(close) {
                        i += close.len();
                        break;
                    }
                    if !triple && b[i] == b'\n' {
                        break;
                    }
                    i += 1;
                }
                continue;
            }
            b'\n' if stack.is_empty() => {
                key_mode = true;
                in_header = false;
                dots = 0;
            }
            b'[' | b'{' => {
                if c == b'[' && stack.is_empty() && key_mode && !in_header {
                    in_header = true;
                    dots = 0;
                } else {
                    stack.push(c);
                    if stack.len() > max {
                        return Some(i);
                    }
                    key_mode = c == b'{';
                    dots = 0;
                }
            }
            b']' | b'}' => {
                if in_header && stack.is_empty() {
                    key_mode = false;
                } else {
                    stack.pop();
                }
            }
            b',' => key_mode = stack.last() == Some(&b'{'),
            b'=' => {
                key_mode = false;
                dots = 0;
            }
            b'.' if key_mode || in_header => {
                dots += 1;
                if dots + stack.len() > max {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

struct Cx<'a> {
    path: &'a str,
    src: &'a str,
    /// Every diagnostic's position comes from here: scanning from the file's start for each one made a
    /// file with 50,000 unknown keys take 46 s.
    lines: &'a LineIndex,
    diags: Vec<Diagnostic>,
    file_refs: Vec<FileRef>,
}

/// A file of the repository a manifest names, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    pub path: crate::units::RepoPath,
    /// What the file is for, for messages ("`ca_roots`", "app `shop`'s `tls.cert`").
    pub what: String,
    pub span: Range<usize>,
    /// Its diagnostics never show the line (an own certificate's line may hold its key).
    pub hide_line: bool,
}

type Table<'i> = DeTable<'i>;
type Val<'i> = Spanned<DeValue<'i>>;

/// Reads one table's keys, remembering which it used so the rest can be reported as unknown.
struct Fields<'t, 'i> {
    table: &'t Table<'i>,
    /// The table's header (or key) span: where "missing key" errors point.
    at: Range<usize>,
    what: String,
    used: Vec<&'t str>,
    ok: bool,
}

impl<'t, 'i> Fields<'t, 'i> {
    fn new(table: &'t Table<'i>, at: Range<usize>, what: impl Into<String>) -> Self {
        Fields {
            table,
            at,
            what: what.into(),
            used: Vec::new(),
            ok: true,
        }
    }

    fn get(&mut self, key: &str) -> Option<&'t Val<'i>> {
        let (k, v) = self.table.iter().find(|(k, _)| k.get_ref() == key)?;
        self.used.push(k.get_ref().as_ref());
        Some(v)
    }
}

impl Cx<'_> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) -> &mut Diagnostic {
        let pos = self.lines.position(self.src, span.start);
        let d = Diagnostic::at_position(Severity::Error, self.path, self.src, pos, span, message);
        self.diags.push(d);
        let last = self.diags.len() - 1;
        &mut self.diags[last]
    }

    /// Refuses NUL in every key and string of the file (PostgreSQL text cannot hold it, and no name, command
    /// or env value needs it): an error at each, and `false` if there was one. TOML allows it as `\u0000`.
    fn no_nul<'t, 'i>(&mut self, root: &'t Table<'i>) -> bool {
        const WHY: &str = "PostgreSQL cannot store it, and no name, command or value needs it";
        let before = self.diags.len();
        // Iterative: nesting is bounded by `too_deep`, but a stack keeps this total anyway.
        let mut tables: Vec<&'t Table<'i>> = vec![root];
        let mut values: Vec<&'t Val<'i>> = Vec::new();
        loop {
            while let Some(t) = tables.pop() {
                for (k, v) in t.iter() {
                    if k.get_ref().contains('\0') {
                        let msg = format!("the key `{}` holds a NUL character", k.get_ref());
                        self.error(k.span(), msg).hint = Some(WHY.into());
                    }
                    values.push(v);
                }
            }
            let Some(v) = values.pop() else { break };
            match v.get_ref() {
                DeValue::String(s) if s.contains('\0') => {
                    self.error(v.span(), "this string holds a NUL character")
                        .hint = Some(WHY.into());
                }
                DeValue::Array(items) => values.extend(items.iter()),
                DeValue::Table(t) => tables.push(t),
                _ => {}
            }
        }
        self.diags.len() == before
    }

    /// Deserializes one value with its span; wrong types and invalid values become errors at the value.
    fn value<T: DeserializeOwned>(&mut self, key: &str, v: &Val<'_>) -> Option<T> {
        match T::deserialize(ValueDeserializer::from(v.clone())) {
            Ok(t) => Some(t),
            Err(e) => {
                let span = e.span().unwrap_or_else(|| v.span());
                let msg = e.message().trim().to_owned();
                let msg = match msg.strip_prefix("invalid type: ") {
                    Some(rest) => {
                        let expected = rest.split_once(", expected ").map_or(rest, |(_, x)| x);
                        let expected = match expected {
                            "u8" | "u16" | "u32" | "u64" => "a non-negative integer",
                            "i32" | "i64" => "an integer",
                            "f64" => "a number",
                            other => other,
                        };
                        format!(
                            "wrong type for `{key}`: expected {expected}, found {}",
                            v.get_ref().type_str()
                        )
                    }
                    None if msg.starts_with("invalid value")
                        || msg.starts_with("unknown variant") =>
                    {
                        format!("invalid value for `{key}`: {msg}")
                    }
                    None => msg,
                };
                self.error(span, msg);
                None
            }
        }
    }

    fn req<T: DeserializeOwned>(
        &mut self,
        f: &mut Fields<'_, '_>,
        key: &str,
    ) -> Option<Located<T>> {
        let Some(v) = f.get(key) else {
            let what = f.what.clone();
            self.error(f.at.clone(), format!("{what} is missing `{key}`"));
            f.ok = false;
            return None;
        };
        let r = self.value(key, v).map(|value| Located {
            value,
            span: v.span(),
        });
        f.ok &= r.is_some();
        r
    }

    fn opt<T: DeserializeOwned>(
        &mut self,
        f: &mut Fields<'_, '_>,
        key: &str,
    ) -> Option<Located<T>> {
        let v = f.get(key)?;
        let r = self.value(key, v).map(|value| Located {
            value,
            span: v.span(),
        });
        f.ok &= r.is_some();
        r
    }

    fn opt_or<T: DeserializeOwned>(&mut self, f: &mut Fields<'_, '_>, key: &str, default: T) -> T {
        self.opt(f, key).map_or(default, |l| l.value)
    }

    fn table<'t, 'i>(&mut self, f: &mut Fields<'t, 'i>, key: &str) -> Option<Fields<'t, 'i>> {
        let v = f.get(key)?;
        match v.get_ref() {
            DeValue::Table(t) => Some(Fields::new(t, v.span(), format!("`{key}` of {}", f.what))),
            other => {
                self.error(
                    v.span(),
                    format!(
                        "wrong type for `{key}`: expected a table, found {}",
                        other.type_str()
                    ),
                );
                f.ok = false;
                None
            }
        }
    }

    /// Reports every key of the table that was not read.
    fn finish(&mut self, f: &Fields<'_, '_>, known: &[&str]) -> bool {
        let mut ok = f.ok;
        for (k, _) in f.table.iter() {
            let key: &str = k.get_ref();
            if f.used.contains(&key) {
                continue;
            }
            ok = false;
            if FORBIDDEN_KEYS.contains(&key) {
                self.error(k.span(), format!("`{key}` cannot be set in {}", f.what)).hint = Some(
                    "Cairn never runs apps privileged, with host networking or PID, devices, or host mounts"
                        .into(),
                );
                continue;
            }
            let msg = format!("unknown key `{key}` in {}", f.what);
            let hint = match did_you_mean(key, known.iter().copied()) {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!("known keys: {}", known.join(", ")),
            };
            self.error(k.span(), msg).hint = Some(hint);
        }
        ok
    }

    fn settings(&mut self, root: &Table<'_>, span: Range<usize>) -> Option<Located<Settings>> {
        let at = 0..span.end.min(self.src.find('\n').unwrap_or(self.src.len()));
        let mut f = Fields::new(root, at, "cairn.toml");
        // A missing key is the whole file's problem: pointing at its first line (often a comment) would mislead.
        let base_domain = if root.iter().any(|(k, _)| k.get_ref() == "base_domain") {
            self.req(&mut f, "base_domain")
        } else {
            self.diags.push(
                Diagnostic::file(Severity::Error, self.path, "cairn.toml is missing `base_domain`")
                    .with_hint("add `base_domain = \"apps.example.com\"`: every app answers at `<app>.<base_domain>`"),
            );
            None
        };
        let currency =
            self.opt(&mut f, "currency")
                .map_or_else(default_currency, |c: Located<String>| {
                    if c.value.len() == 3 && c.value.bytes().all(|b| b.is_ascii_uppercase()) {
                        c.value
                    } else {
                        self.error(
                            c.span,
                            format!("`{}` is not an ISO 4217 currency code", c.value),
                        )
                        .hint = Some("write three capital letters, such as `EUR` or `USD`".into());
                        f.ok = false;
                        String::new()
                    }
                });
        let mut secrets = SecretSettings::default();
        if let Some(mut s) = self.table(&mut f, "secrets") {
            secrets.recipients = self.opt_or(&mut s, "recipients", Vec::new());
            f.ok &= self.finish(&s, &["recipients"]);
        }
        let tls = match self.table(&mut f, "tls") {
            Some(t) => {
                let tls = self.tls_settings(t);
                f.ok &= tls.is_some();
                tls
            }
            None => None,
        };
        let ok = self.finish(&f, &["base_domain", "currency", "secrets", "tls"]);
        let settings = Settings {
            base_domain: base_domain?.value,
            currency,
            secrets,
            tls,
        };
        ok.then_some(Located {
            value: settings,
            span: 0..0,
        })
    }

    /// `cairn.toml [tls]`.
    fn tls_settings(&mut self, mut t: Fields<'_, '_>) -> Option<TlsSettings> {
        let acme_directory = self
            .opt(&mut t, "acme_directory")
            .map_or_else(default_acme_directory, |d| d.value);
        let contact = self.opt(&mut t, "contact").map(|c| c.value);
        let ca_roots = self
            .opt(&mut t, "ca_roots")
            .map(|c: Located<crate::units::RepoPath>| {
                self.file_refs.push(FileRef {
                    path: c.value.clone(),
                    what: "`ca_roots`".into(),
                    span: c.span,
                    hide_line: false,
                });
                c.value
            });
        let challenge = match self.opt::<String>(&mut t, "challenge") {
            None => Challenge::default(),
            Some(c) => match c.value.as_str() {
                "http-01" => Challenge::Http01,
                "tls-alpn-01" => Challenge::TlsAlpn01,
                "dns-01" => {
                    self.error(
                        c.span,
                        format!("challenge `{}` is not supported yet", c.value),
                    )
                    .hint = Some(
                        "use `challenge = \"http-01\"` (the default) or `\"tls-alpn-01\"`".into(),
                    );
                    t.ok = false;
                    Challenge::default()
                }
                other => {
                    self.error(c.span, format!("unknown challenge `{other}`"))
                        .hint = Some(
                        "use `challenge = \"http-01\"` (the default) or `\"tls-alpn-01\"`".into(),
                    );
                    t.ok = false;
                    Challenge::default()
                }
            },
        };
        let redirect_http = self.opt_or(&mut t, "redirect_http", true);
        let hsts = self.opt_or(&mut t, "hsts", false);
        let ok = self.finish(
            &t,
            &[
                "acme_directory",
                "contact",
                "ca_roots",
                "challenge",
                "redirect_http",
                "hsts",
            ],
        );
        ok.then_some(TlsSettings {
            acme_directory,
            contact,
            ca_roots,
            challenge,
            redirect_http,
            hsts,
        })
    }

    /// An app's `tls`: `"auto"`, `"off"` or `{ cert = "...", key = { secret = "..." } }`. `None` (with an
    /// error) when it is broken; `Some(None)` when it is absent.
    fn app_tls(
        &mut self,
        f: &mut Fields<'_, '_>,
        key_span: &mut Option<Range<usize>>,
    ) -> Option<AppTls> {
        const HINT: &str = "write `tls = \"auto\"`, `tls = \"off\"` or `tls = { cert = \"certs/NAME.pem\", key = { secret = \"...\" } }`";
        let v = f.get("tls")?;
        match v.get_ref() {
            DeValue::String(s) => match s.as_ref() {
                "auto" => Some(AppTls::Mode(TlsMode::Auto)),
                "off" => Some(AppTls::Mode(TlsMode::Off)),
                other => {
                    self.error(v.span(), format!("invalid value for `tls`: `{other}`"))
                        .hint = Some(HINT.into());
                    f.ok = false;
                    None
                }
            },
            DeValue::Table(t) => {
                // The key may be the plaintext pasted by mistake, on the same line as anything else
                // of the table: no diagnostic about the table shows its lines.
                let before_all = self.diags.len();
                let mut own = Fields::new(t, v.span(), format!("`tls` of {}", f.what));
                let cert: Option<Located<crate::units::RepoPath>> = self.req(&mut own, "cert");
                if let Some(c) = &cert {
                    self.file_refs.push(FileRef {
                        path: c.value.clone(),
                        what: format!("the `tls.cert` of {}", f.what),
                        span: c.span.clone(),
                        hide_line: true,
                    });
                }
                let mut key = None;
                match own.get("key") {
                    None => {
                        let what = own.what.clone();
                        self.error(own.at.clone(), format!("{what} is missing `key`"))
                            .hint = Some(
                            "add `key = { secret = \"...\" }`: the key encrypted with `cairn secret encrypt`"
                                .into(),
                        );
                        own.ok = false;
                    }
                    Some(kv) => {
                        let before = self.diags.len();
                        match kv.get_ref() {
                            DeValue::Table(kt) => {
                                let mut st = Fields::new(kt, kv.span(), "the `tls` key".to_owned());
                                let ct: Option<Located<String>> = self.req(&mut st, "secret");
                                if let Some(c) = ct {
                                    match Ciphertext::new(&c.value) {
                                        Ok(secret) => {
                                            *key_span = Some(c.span.clone());
                                            key = Some(SecretRef { secret });
                                        }
                                        Err(err) => {
                                            self.error(c.span, format!("the `tls` key: {err}"))
                                                .hint = Some(
                                                "encrypt the key with `cairn secret encrypt`; if the value was the \
                                                 plaintext key, it is in the git history now: replace the certificate"
                                                    .into(),
                                            );
                                        }
                                    }
                                }
                                if !self.finish(&st, &["secret"]) {
                                    key = None;
                                }
                            }
                            other => {
                                self.error(
                                    kv.span(),
                                    format!(
                                        "wrong type for the `tls` key: expected `{{ secret = \"...\" }}`, found {}",
                                        other.type_str()
                                    ),
                                )
                                .hint = Some(
                                    "the key is an age secret: never put the plaintext key in the repository".into(),
                                );
                            }
                        }
                        // A broken key may be the plaintext key pasted by mistake: never show its lines.
                        for d in &mut self.diags[before..] {
                            d.source_line = None;
                        }
                        own.ok &= key.is_some();
                    }
                }
                let ok = self.finish(&own, &["cert", "key"]);
                for d in &mut self.diags[before_all..] {
                    d.source_line = None;
                }
                f.ok &= ok;
                match (cert, key) {
                    (Some(cert), Some(key)) if ok => Some(AppTls::Own(OwnCertificate {
                        cert: cert.value,
                        key,
                    })),
                    _ => None,
                }
            }
            other => {
                self.error(
                    v.span(),
                    format!(
                        "wrong type for `tls`: expected a string or a table, found {}",
                        other.type_str()
                    ),
                )
                .hint = Some(HINT.into());
                f.ok = false;
                None
            }
        }
    }

    fn resources(&mut self, root: &Table<'_>, syntax_ok: bool) -> Vec<Declared> {
        let mut out = Vec::new();
        for (kind_key, kind_val) in root.iter() {
            let Some(kind) = Kind::parse(kind_key.get_ref()) else {
                if !syntax_ok {
                    continue;
                }
                let key: &str = kind_key.get_ref();
                let hint = match did_you_mean(key, Kind::ALL.map(Kind::as_str)) {
                    Some(s) => format!("did you mean `[{s}.NAME]`?"),
                    None if matches!(key, "base_domain" | "secrets" | "currency" | "tls") => {
                        "repository settings belong in cairn.toml at the repository root".to_owned()
                    }
                    None => "a manifest declares `[plan.NAME]`, `[runtime.NAME]`, `[node.NAME]`, `[app.NAME]`, `[notify.NAME]` or `[database.NAME]` tables"
                        .to_owned(),
                };
                self.error(kind_key.span(), format!("unknown key `{key}`"))
                    .hint = Some(hint);
                continue;
            };
            let DeValue::Table(items) = kind_val.get_ref() else {
                if syntax_ok {
                    self.error(
                        kind_val.span(),
                        format!(
                            "wrong type for `{kind}`: expected tables such as `[{kind}.NAME]`",
                            kind = kind.as_str()
                        ),
                    );
                }
                continue;
            };
            for (name_key, val) in items.iter() {
                let name = match Name::new(name_key.get_ref()) {
                    Ok(n) => n,
                    Err(e) => {
                        if syntax_ok {
                            self.error(name_key.span(), e);
                        }
                        continue;
                    }
                };
                let span = name_key.span();
                let mut refs = None;
                let mut address = None;
                let mut sink_apps = Vec::new();
                let mut db_refs = None;
                let resource = if !syntax_ok {
                    None
                } else if let DeValue::Table(t) = val.get_ref() {
                    let what = format!("{} `{name}`", kind.as_str());
                    let f = Fields::new(t, span.clone(), what);
                    match kind {
                        Kind::Plan => self.plan(f).map(Resource::Plan),
                        Kind::Runtime => self.runtime(f).map(Resource::Runtime),
                        Kind::Node => {
                            let (node, at) = self.node(f);
                            address = at;
                            node.map(Resource::Node)
                        }
                        Kind::App => {
                            let (app, r) = self.app(f);
                            refs = Some(r);
                            app.map(|a| Resource::App(Box::new(a)))
                        }
                        Kind::Notify => {
                            let (sink, apps) = self.sink(f);
                            sink_apps = apps;
                            sink.map(|s| Resource::Sink(Box::new(s)))
                        }
                        Kind::Database => {
                            let (db, r) = self.database(f);
                            db_refs = Some(r);
                            db.map(|d| Resource::Database(Box::new(d)))
                        }
                    }
                } else {
                    self.error(
                        val.span(),
                        format!(
                            "wrong type for {} `{name}`: expected a table, found {}",
                            kind.as_str(),
                            val.get_ref().type_str()
                        ),
                    );
                    None
                };
                out.push(Declared {
                    kind,
                    name,
                    span,
                    resource,
                    refs,
                    address,
                    sink_apps,
                    db_refs,
                });
            }
        }
        out
    }

    /// The diagnostics from `before` on are about age secrets: never show their lines (a value there may
    /// be the plaintext pasted by mistake), name the expected shape, and give `hint` where there is none.
    fn hide_secret_lines(&mut self, before: usize, hint: &str) {
        for d in &mut self.diags[before..] {
            d.source_line = None;
            d.message = d
                .message
                .replace("struct SecretRef", "`{ secret = \"...\" }` (an age secret)");
            if d.hint.is_none() {
                d.hint = Some(hint.into());
            }
        }
    }

    /// A notification sink, and the app names it lists (checked against the declared apps later). The
    /// URL and the signing secret are age secrets: an error about either never shows its line (it may be
    /// the plaintext pasted by mistake).
    fn sink(&mut self, mut f: Fields<'_, '_>) -> (Option<Sink>, Vec<Located<Name>>) {
        const SECRET_HINT: &str = "encrypt it with `cairn secret encrypt`: a webhook URL is a credential; \
             if the plaintext was committed, it is in the git history now: make a new one";
        let kind: Option<Located<SinkKind>> = self.req(&mut f, "kind");
        let before = self.diags.len();
        let url: Option<Located<SecretRef>> = self.req(&mut f, "url");
        let signing: Option<Located<SecretRef>> = self.opt(&mut f, "signing_secret");
        self.hide_secret_lines(before, SECRET_HINT);
        let events: Option<Located<Vec<String>>> = self.opt(&mut f, "events");
        let apps: Option<Located<Vec<String>>> = self.opt(&mut f, "apps");
        let severity = self.opt_or(&mut f, "severity", SinkSeverity::default());
        let max_per_hour: Option<Located<u32>> = self.opt(&mut f, "max_per_hour");
        match (&kind, &signing) {
            (Some(k), None) if k.value == SinkKind::Webhook => {
                let what = f.what.clone();
                self.error(f.at.clone(), format!("{what} is missing `signing_secret`"))
                    .hint = Some(
                    "a webhook sink signs what it sends: add `signing_secret = { secret = \"...\" }`, a \
                     `whsec_` secret encrypted with `cairn secret encrypt`"
                        .into(),
                );
                f.ok = false;
            }
            (Some(k), Some(s)) if k.value != SinkKind::Webhook => {
                self.error(
                    s.span.clone(),
                    format!(
                        "`signing_secret` is only for `kind = \"webhook\"`, not `{}`",
                        k.value.as_str()
                    ),
                )
                .hint = Some("Slack and Discord do not check signatures: remove it".into());
                f.ok = false;
            }
            _ => {}
        }
        if let Some(ev) = &events {
            if ev.value.is_empty() {
                self.error(ev.span.clone(), "`events` lists no event").hint = Some(
                    "name events or globs, such as `[\"deploy.failed\", \"node.*\"]`, or `[\"*\"]`"
                        .into(),
                );
                f.ok = false;
            }
            for p in &ev.value {
                if !crate::model::EVENT_KINDS.iter().any(|k| Sink::glob(p, k)) {
                    let hint = match did_you_mean(p, crate::model::EVENT_KINDS) {
                        Some(s) => format!("did you mean `{s}`?"),
                        None => format!("events: {}", crate::model::EVENT_KINDS.join(", ")),
                    };
                    self.error(ev.span.clone(), format!("`{p}` matches no event"))
                        .hint = Some(hint);
                    f.ok = false;
                }
            }
        }
        let mut listed = Vec::new();
        if let Some(a) = &apps {
            if a.value.is_empty() {
                self.error(a.span.clone(), "`apps` lists no app").hint =
                    Some("name apps, or `[\"*\"]` for every app".into());
                f.ok = false;
            }
            for name in a.value.iter().filter(|n| n.as_str() != "*") {
                match Name::new(name) {
                    Ok(n) => listed.push(Located {
                        value: n,
                        span: a.span.clone(),
                    }),
                    Err(e) => {
                        self.error(a.span.clone(), format!("`apps`: {e}")).hint =
                            Some("app names, or `*` for every app".into());
                        f.ok = false;
                    }
                }
            }
        }
        if let Some(m) = &max_per_hour
            && m.value == 0
        {
            self.error(m.span.clone(), "`max_per_hour` must be at least 1");
            f.ok = false;
        }
        let ok = self.finish(
            &f,
            &[
                "kind",
                "url",
                "signing_secret",
                "events",
                "apps",
                "severity",
                "max_per_hour",
            ],
        );
        let sink = (|| {
            Some(Sink {
                kind: kind?.value,
                url: url?.value,
                signing_secret: signing.map(|s| s.value),
                events: events.map_or_else(crate::model::default_sink_patterns, |e| e.value),
                apps: apps.map_or_else(crate::model::default_sink_patterns, |a| a.value),
                severity,
                max_per_hour: max_per_hour
                    .map_or_else(crate::model::default_max_per_hour, |m| m.value),
            })
        })();
        (sink.filter(|_| ok), listed)
    }

    /// A managed database, and its plan and node (checked against the declared ones later). Its S3
    /// keys are age secrets: an error about either never shows its line.
    fn database(&mut self, mut f: Fields<'_, '_>) -> (Option<Database>, DbRefs) {
        let engine: Option<Located<Engine>> = self.req(&mut f, "engine");
        let version: Option<Located<String>> = self.req(&mut f, "version");
        let plan: Option<Located<Name>> = self.req(&mut f, "plan");
        let node: Option<Located<Name>> = self.opt(&mut f, "node");
        let verify = self.opt_or(&mut f, "verify", crate::model::default_verify());
        if let (Some(e), Some(v)) = (&engine, &version) {
            let known = crate::model::engine_versions(e.value);
            if !crate::model::engine_version_known(e.value, &v.value) {
                let hint = match did_you_mean(&v.value, known.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("{} versions: {}", e.value, known.join(", ")),
                };
                self.error(
                    v.span.clone(),
                    format!("{} has no version `{}` here", e.value, v.value),
                )
                .hint = Some(hint);
                f.ok = false;
            }
        }
        let backup = match self.table(&mut f, "backup") {
            Some(b) => {
                let r = self.database_backup(b);
                f.ok &= r.is_some();
                r
            }
            None => None,
        };
        let ok = self.finish(
            &f,
            &["engine", "version", "plan", "node", "backup", "verify"],
        );
        let refs = DbRefs {
            plan: plan.clone(),
            node: node.clone(),
        };
        let db = (|| {
            Some(Database {
                engine: engine?.value,
                version: version?.value,
                plan: plan?.value,
                node: node.map(|n| n.value),
                backup,
                verify,
            })
        })();
        (db.filter(|_| ok), refs)
    }

    fn database_backup(&mut self, mut b: Fields<'_, '_>) -> Option<DatabaseBackup> {
        const SECRET_HINT: &str = "encrypt it with `cairn secret encrypt`: a storage key is a credential; \
             if the plaintext was committed, it is in the git history now: make a new one";
        let schedule: Option<Located<crate::units::Schedule>> = self.req(&mut b, "schedule");
        let keep: Option<Located<u32>> = self.opt(&mut b, "keep");
        let to: Option<Located<crate::units::BackupLocation>> = self.req(&mut b, "to");
        let endpoint: Option<Located<String>> = self.opt(&mut b, "endpoint");
        let region: Option<Located<String>> = self.opt(&mut b, "region");
        let before = self.diags.len();
        let key_id: Option<Located<SecretRef>> = self.opt(&mut b, "access_key_id");
        let secret_key: Option<Located<SecretRef>> = self.opt(&mut b, "secret_access_key");
        self.hide_secret_lines(before, SECRET_HINT);
        if let Some(k) = &keep
            && k.value == 0
        {
            self.error(k.span.clone(), "`keep` must be at least 1");
            b.ok = false;
        }
        if let Some(e) = &endpoint
            && !(e.value.starts_with("http://") || e.value.starts_with("https://"))
        {
            self.error(
                e.span.clone(),
                format!("`endpoint` `{}` is not an http(s) URL", e.value),
            )
            .hint = Some("the S3-compatible store's URL, such as `http://127.0.0.1:9000`".into());
            b.ok = false;
        }
        if let Some(to) = &to {
            let s3 = matches!(to.value.to(), crate::database::BackupTo::S3 { .. });
            if s3 {
                if key_id.is_none() != secret_key.is_none() {
                    let what = b.what.clone();
                    self.error(
                        b.at.clone(),
                        format!(
                            "{what} needs both `access_key_id` and `secret_access_key`, or neither"
                        ),
                    );
                    b.ok = false;
                }
            } else {
                let s3_only: [(&str, Option<Range<usize>>); 4] = [
                    ("endpoint", endpoint.as_ref().map(|x| x.span.clone())),
                    ("region", region.as_ref().map(|x| x.span.clone())),
                    ("access_key_id", key_id.as_ref().map(|x| x.span.clone())),
                    (
                        "secret_access_key",
                        secret_key.as_ref().map(|x| x.span.clone()),
                    ),
                ];
                for (key, span) in s3_only {
                    if let Some(span) = span {
                        self.error(span, format!("`{key}` is only for `to = \"s3://...\"`"))
                            .source_line = None;
                        b.ok = false;
                    }
                }
            }
        }
        let ok = self.finish(
            &b,
            &[
                "schedule",
                "keep",
                "to",
                "endpoint",
                "region",
                "access_key_id",
                "secret_access_key",
            ],
        );
        let backup = DatabaseBackup {
            schedule: schedule?.value,
            keep: keep.map_or_else(crate::model::default_keep, |k| k.value),
            to: to?.value,
            endpoint: endpoint.map(|e| e.value),
            region: region.map(|r| r.value),
            access_key_id: key_id.map(|k| k.value),
            secret_access_key: secret_key.map(|k| k.value),
        };
        ok.then_some(backup)
    }

    fn plan(&mut self, mut f: Fields<'_, '_>) -> Option<Plan> {
        let cpu = self.req(&mut f, "cpu");
        let memory = self.req(&mut f, "memory");
        let disk = self.req(&mut f, "disk");
        let price = self.req(&mut f, "price");
        let max_replicas: Option<Located<u32>> = self.req(&mut f, "max_replicas");
        if let Some(m) = &max_replicas
            && m.value == 0
        {
            self.error(m.span.clone(), "`max_replicas` must be at least 1");
            f.ok = false;
        }
        let ok = self.finish(&f, &["cpu", "memory", "disk", "price", "max_replicas"]);
        let plan = Plan {
            cpu: cpu?.value,
            memory: memory?.value,
            disk: disk?.value,
            price: price?.value,
            max_replicas: max_replicas?.value,
        };
        ok.then_some(plan)
    }

    fn runtime(&mut self, mut f: Fields<'_, '_>) -> Option<Runtime> {
        let drivers: Vec<Driver> = self
            .opt(&mut f, "drivers")
            .map_or_else(default_drivers, |d| d.value);
        let dockerfile = self.opt(&mut f, "dockerfile");
        let image: Option<Located<String>> = self.opt(&mut f, "image");
        let build = self.opt_or(&mut f, "build", Vec::<String>::new());
        let start: Option<Located<String>> = self.opt(&mut f, "start");
        let port: Option<Located<u16>> = self.req(&mut f, "port");
        let dockerfile_on = dockerfile.as_ref().is_some_and(|d: &Located<bool>| d.value);
        if drivers.is_empty() {
            self.error(f.at.clone(), format!("{} lists no `drivers`", f.what));
            f.ok = false;
        }
        if dockerfile_on {
            if let Some(i) = &image {
                self.error(i.span.clone(), "`image` has no effect with `dockerfile = true`: the app's Dockerfile names its base image");
                f.ok = false;
            }
            if drivers.contains(&Driver::Process) {
                self.error(
                    f.at.clone(),
                    format!(
                        "{} uses the app's Dockerfile, which the `process` driver cannot run",
                        f.what
                    ),
                );
                f.ok = false;
            }
        } else {
            if image.is_none() && drivers.contains(&Driver::Docker) {
                self.error(f.at.clone(), format!("{} is missing `image`", f.what)).hint =
                    Some("name a base image, or set `dockerfile = true` to build with the app's own Dockerfile".into());
                f.ok = false;
            }
            if start.is_none() {
                self.error(f.at.clone(), format!("{} is missing `start`", f.what))
                    .hint =
                    Some("give the command that starts the app, or set `dockerfile = true`".into());
                f.ok = false;
            }
        }
        if let Some(p) = &port
            && p.value == 0
        {
            self.error(p.span.clone(), "`port` must be between 1 and 65535");
            f.ok = false;
        }
        let ok = self.finish(
            &f,
            &["drivers", "dockerfile", "image", "build", "start", "port"],
        );
        let rt = Runtime {
            drivers,
            dockerfile: dockerfile_on,
            image: image.map(|i| i.value),
            build,
            start: start.map(|s| s.value),
            port: port?.value,
        };
        ok.then_some(rt)
    }

    fn node(&mut self, mut f: Fields<'_, '_>) -> (Option<Node>, Option<Range<usize>>) {
        let cpu = self.req(&mut f, "cpu");
        let memory = self.req(&mut f, "memory");
        let disk = self.req(&mut f, "disk");
        let region = self.opt(&mut f, "region").map(|r| r.value);
        let labels = self
            .labels(&mut f)
            .into_iter()
            .map(|(k, (v, _))| (k, v))
            .collect();
        let drain = self.opt_or(&mut f, "drain", false);
        let recipient = self.opt(&mut f, "recipient").map(|r| r.value);
        let address = self.opt(&mut f, "address");
        let ingress = self.opt_or(&mut f, "ingress", true);
        let ok = self.finish(
            &f,
            &[
                "cpu",
                "memory",
                "disk",
                "region",
                "labels",
                "drain",
                "recipient",
                "address",
                "ingress",
            ],
        );
        let at = address.as_ref().map(|a| a.span.clone());
        let (Some(cpu), Some(memory), Some(disk)) = (cpu, memory, disk) else {
            return (None, at);
        };
        let node = Node {
            cpu: cpu.value,
            memory: memory.value,
            disk: disk.value,
            region,
            labels,
            drain,
            recipient,
            address: address.map(|a| a.value),
            ingress,
        };
        (ok.then_some(node), at)
    }

    fn labels(&mut self, f: &mut Fields<'_, '_>) -> BTreeMap<Name, (String, Range<usize>)> {
        let mut out = BTreeMap::new();
        let Some(mut t) = self.table(f, "labels") else {
            return out;
        };
        for (k, v) in t.table.iter() {
            t.used.push(k.get_ref());
            let name = match Name::new(k.get_ref()) {
                Ok(n) => n,
                Err(e) => {
                    self.error(k.span(), format!("label {e}"));
                    f.ok = false;
                    continue;
                }
            };
            match self.value::<String>(k.get_ref(), v) {
                Some(s) => {
                    out.insert(name, (s, k.span().start..v.span().end));
                }
                None => f.ok = false,
            }
        }
        out
    }

    fn app(&mut self, mut f: Fields<'_, '_>) -> (Option<App>, AppRefs) {
        let mut spans = AppRefs::default();
        let plan: Option<Located<Name>> = self.req(&mut f, "plan");
        let runtime: Option<Located<Name>> = self.req(&mut f, "runtime");
        let replicas: Option<Located<u32>> = self.opt(&mut f, "replicas");
        let port: Option<Located<u16>> = self.opt(&mut f, "port");
        if let Some(p) = &port
            && p.value == 0
        {
            self.error(p.span.clone(), "`port` must be between 1 and 65535");
            f.ok = false;
        }
        let suspended = self.opt_or(&mut f, "suspended", false);
        let domains = match f.get("domains") {
            None => Vec::new(),
            Some(v) => match v.get_ref() {
                DeValue::Array(items) => {
                    let mut out = Vec::new();
                    for item in items.iter() {
                        match self.value("domains", item) {
                            Some(d) => {
                                out.push(d);
                                spans.domains.push(item.span());
                            }
                            None => f.ok = false,
                        }
                    }
                    out
                }
                other => {
                    self.error(
                        v.span(),
                        format!(
                            "wrong type for `domains`: expected an array of strings, found {}",
                            other.type_str()
                        ),
                    );
                    f.ok = false;
                    Vec::new()
                }
            },
        };
        let source = match self.table(&mut f, "source") {
            Some(mut s) => {
                let url = self.req(&mut s, "url");
                let branch =
                    self.opt(&mut s, "branch")
                        .map_or_else(default_branch, |b: Located<String>| {
                            if let Err(e) = check_ref_name(&b.value) {
                                self.error(b.span.clone(), e);
                                s.ok = false;
                            }
                            b.value
                        });
                let rev = self.opt(&mut s, "rev").map(|r: Located<String>| {
                    if let Err(e) = check_ref_name(&r.value) {
                        self.error(r.span.clone(), e);
                        s.ok = false;
                    }
                    r.value
                });
                f.ok &= self.finish(&s, &["url", "branch", "rev"]);
                url.map(|u| Source {
                    url: u.value,
                    branch,
                    rev,
                })
            }
            None => {
                if f.table.iter().all(|(k, _)| k.get_ref() != "source") {
                    let what = f.what.clone();
                    self.error(f.at.clone(), format!("{what} is missing `source`"))
                        .hint = Some("add `[app.NAME.source]` with `url` and `branch`".to_owned());
                }
                f.ok = false;
                None
            }
        };
        let mut health = Health::default();
        if let Some(mut h) = self.table(&mut f, "health") {
            health.path =
                self.opt(&mut h, "path")
                    .map_or_else(default_health_path, |p: Located<String>| {
                        if !p.value.starts_with('/')
                            || p.value.chars().any(|c| c.is_whitespace() || c.is_control())
                        {
                            self.error(
                                p.span.clone(),
                                format!(
                                    "health path `{}` must start with `/` and hold no spaces",
                                    p.value
                                ),
                            );
                            h.ok = false;
                        }
                        p.value
                    });
            health.timeout = self
                .opt(&mut h, "timeout")
                .map_or_else(default_health_timeout, |t| t.value);
            f.ok &= self.finish(&h, &["path", "timeout"]);
        }
        let mut placement = Placement::default();
        if let Some(mut p) = self.table(&mut f, "placement") {
            if let Some(r) = self.opt(&mut p, "region") {
                placement.region = Some(r.value);
                spans.region = Some(r.span);
            }
            for (k, (v, span)) in self.labels(&mut p) {
                spans.labels.insert(k.clone(), span);
                placement.labels.insert(k, v);
            }
            f.ok &= self.finish(&p, &["region", "labels"]);
        }
        let mut http = Http::default();
        if let Some(mut h) = self.table(&mut f, "http") {
            http.max_body = self
                .opt(&mut h, "max_body")
                .map(|b: Located<ByteSize>| b.value);
            f.ok &= self.finish(&h, &["max_body"]);
        }
        let tls = self.app_tls(&mut f, &mut spans.tls_key);
        if tls
            .as_ref()
            .is_some_and(|t| matches!(t, AppTls::Mode(TlsMode::Auto)))
        {
            spans.tls_auto = f
                .table
                .iter()
                .find(|(k, _)| k.get_ref() == "tls")
                .map(|(_, v)| v.span());
        }
        let mut env = BTreeMap::new();
        if let Some(mut e) = self.table(&mut f, "env") {
            for (k, v) in e.table.iter() {
                e.used.push(k.get_ref());
                let name = match EnvName::new(k.get_ref()) {
                    Ok(n) => n,
                    Err(msg) => {
                        self.error(k.span(), msg);
                        f.ok = false;
                        continue;
                    }
                };
                let value = match v.get_ref() {
                    DeValue::String(s) => Some(EnvValue::Plain(s.to_string())),
                    DeValue::Table(t) => {
                        let mut st = Fields::new(t, v.span(), format!("env var `{name}`"));
                        let before = self.diags.len();
                        let ct: Option<Located<String>> = self.req(&mut st, "secret");
                        let result = ct.map(|c| (Ciphertext::new(&c.value), c.span));
                        if let Some((Err(err), span)) = &result {
                            self.error(span.clone(), format!("env var `{name}`: {err}")).hint = Some(
                                "create it with `cairn secret set FILE APP KEY` or `cairn secret encrypt`; if the value \
                                 was the plaintext, it is in the git history now: change it"
                                    .into(),
                            );
                        }
                        let ok = self.finish(&st, &["secret"]);
                        // A broken secret may hold the plaintext pasted by mistake, and diagnostics reach logs,
                        // commit statuses and PR comments: never show its lines.
                        for d in &mut self.diags[before..] {
                            d.source_line = None;
                        }
                        match result {
                            Some((Ok(c), span)) if ok => {
                                spans.secrets.insert(name.clone(), span);
                                Some(EnvValue::Secret { secret: c })
                            }
                            _ => None,
                        }
                    }
                    other => {
                        self.error(
                            v.span(),
                            format!(
                                "wrong type for env var `{name}`: expected a string or `{{ secret = \"...\" }}`, found {}",
                                other.type_str()
                            ),
                        )
                        .hint = Some("quote numbers and booleans: env values are strings".into());
                        None
                    }
                };
                match value {
                    Some(v) => {
                        env.insert(name, v);
                    }
                    None => f.ok = false,
                }
            }
        }
        let mut databases = BTreeMap::new();
        if let Some(mut t) = self.table(&mut f, "databases") {
            let mut by_env: BTreeMap<EnvName, Name> = BTreeMap::new();
            for (k, v) in t.table.iter() {
                t.used.push(k.get_ref());
                let name = match Name::new(k.get_ref()) {
                    Ok(n) => n,
                    Err(e) => {
                        self.error(k.span(), format!("database {e}"));
                        f.ok = false;
                        continue;
                    }
                };
                let Some(var) = self.value::<EnvName>(k.get_ref(), v) else {
                    f.ok = false;
                    continue;
                };
                if env.contains_key(&var) {
                    self.error(
                        v.span(),
                        format!("`{var}` is also in the app's `env`: database `{name}`'s URL would replace it"),
                    )
                    .hint = Some("give the database's URL another variable, or remove it from `env`".into());
                    f.ok = false;
                } else if var.as_str() == "PORT" {
                    self.error(v.span(), "`PORT` is the port the app listens on")
                        .hint = Some("name another variable, such as `DATABASE_URL`".into());
                    f.ok = false;
                } else if let Some(other) = by_env.get(&var) {
                    self.error(
                        v.span(),
                        format!("`{var}` already carries database `{other}`'s URL"),
                    )
                    .hint = Some("give each database its own variable".into());
                    f.ok = false;
                } else {
                    by_env.insert(var.clone(), name.clone());
                }
                spans.databases.push(Located {
                    value: name.clone(),
                    span: k.span(),
                });
                databases.insert(name, var);
            }
        }
        let ok = self.finish(
            &f,
            &[
                "plan",
                "runtime",
                "source",
                "replicas",
                "port",
                "domains",
                "health",
                "placement",
                "http",
                "suspended",
                "env",
                "tls",
                "databases",
            ],
        );
        spans.plan = plan.clone();
        spans.runtime = runtime.clone();
        spans.replicas = replicas.clone();
        let (Some(plan), Some(runtime), Some(source)) = (plan, runtime, source) else {
            return (None, spans);
        };
        let app = App {
            plan: plan.value,
            runtime: runtime.value,
            source,
            replicas: replicas.map_or(1, |r| r.value),
            port: port.map(|p| p.value),
            domains,
            health,
            placement,
            http,
            suspended,
            env,
            tls,
            databases,
        };
        (ok.then_some(app), spans)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_scan_ignores_strings_and_floats() {
        assert_eq!(
            too_deep("a = \"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\"", 4),
            None
        );
        assert_eq!(too_deep("a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]", 2), None);
        assert!(too_deep("a = [[[[[1]]]]]", 4).is_some());
        assert!(too_deep("[a.b.c.d.e.f]", 4).is_some());
        assert!(too_deep("a.b.c.d.e.f = 1", 4).is_some());
        assert!(too_deep("x = { a.b.c.d.e = 1 }", 4).is_some());
        assert_eq!(too_deep("[app.web.env]\nA = \"1.2.3.4.5.6\"", 4), None);
    }

    #[test]
    fn manifest_paths() {
        assert!(is_manifest_path("apps/web.toml"));
        assert!(!is_manifest_path(".github/x.toml"));
        assert!(!is_manifest_path("README.md"));
    }
}
