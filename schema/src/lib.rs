//! Cairn's desired-state schema: the types of the config repository's TOML manifests (`[plan.NAME]`,
//! `[runtime.NAME]`, `[node.NAME]`, `[app.NAME]`, `[notify.NAME]`, `[database.NAME]` and the settings file `cairn.toml`), their parsing and
//! validation with `path:line:col` diagnostics, age secrets, and the JSON Schema editors use.
//!
//! What it must not do: any IO. It takes `(path, bytes)` pairs from whatever source the caller has (a
//! directory, a git tree, a pull request head) and returns values and diagnostics. It never logs and never
//! puts a secret's plaintext into an error.

pub mod cron;
pub mod database;
pub mod diag;
pub mod edit;
pub mod error;
pub mod incremental;
pub mod json_schema;
pub mod model;
pub mod parse;
pub mod secret;
pub mod source;
pub mod units;
pub mod validate;

pub use diag::{Diagnostic, Diagnostics, Severity};
pub use incremental::Assembler;
pub use model::{
    App, AppTls, Challenge, Database, DatabaseBackup, Desired, Driver, EnvValue, Health, Http,
    Kind, ManifestFile, Node, OwnCertificate, Placement, Plan, Runtime, SecretRef, Settings, Sink,
    SinkKind, SinkSeverity, Source, TlsMode, TlsSettings,
};
pub use parse::{ParsedFile, SETTINGS_FILE, is_manifest_path, parse_file, parse_files};
pub use secret::{Ciphertext, Identity, Recipient, Secret, SecretError};
pub use source::GitUrl;
pub use units::{
    AcmeDirectory, BackupLocation, ByteSize, Cpu, Domain, Email, EnvName, Name, NodeAddress, Price,
    RepoPath, Schedule, Span,
};
pub use validate::{Loaded, Revision, assemble, check_secrets};

/// Parses and validates a whole repository given as `(path, bytes)` pairs.
pub fn load<P: AsRef<str> + Sync, B: AsRef<[u8]> + Sync>(
    files: impl IntoIterator<Item = (P, B)>,
) -> (Vec<ParsedFile>, Loaded) {
    let manifests: Vec<(P, B)> = files
        .into_iter()
        .filter(|(p, _)| is_manifest_path(p.as_ref()))
        .collect();
    let parsed = parse_files(&manifests);
    let loaded = assemble(&parsed);
    (parsed, loaded)
}
