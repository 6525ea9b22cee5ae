//! The examples against the JSON Schema editors use (Taplo / Even Better TOML): the committed schemas are
//! exactly what `cairn schema` prints, every file of `examples/config` and `examples/local` points at them
//! and validates against them, and the `examples/invalid` cases about keys and types fail them, in the file
//! the validator names.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::validate::{case_dirs, root};

/// `(cairn schema arguments, committed file)`.
const SCHEMAS: [(&[&str], &str); 2] = [
    (&["schema"], "schema/manifest.schema.json"),
    (&["schema", "settings"], "schema/settings.schema.json"),
];

/// Cases whose mistake is an unknown, missing or forbidden key or a wrong type: the JSON Schema must refuse
/// them too.
const KEY_AND_TYPE_CASES: [&str; 16] = [
    "tls-unknown-key",
    "unknown-key",
    "privileged-key",
    "unknown-kind",
    "settings-unknown-key",
    "settings-in-manifest",
    "secret-unknown-key",
    "name-not-dns-label",
    "wrong-type",
    "kind-not-a-table",
    "domains-not-an-array",
    "env-value-not-string",
    "size-without-unit",
    "settings-missing-base-domain",
    "missing-key",
    "missing-source",
];

/// Cases whose mistake is a value the schema's patterns and ranges describe: it refuses them as well.
const VALUE_CASES: [&str; 22] = [
    "tls-http-directory",
    "tls-dns-not-supported",
    "size-decimal-unit",
    "cpu-zero",
    "price-negative",
    "price-too-precise",
    "max-replicas-zero",
    "port-zero",
    "bad-duration",
    "runtime-unknown-driver",
    "bad-label-name",
    "bad-env-var-name",
    "invalid-domain",
    "settings-bad-currency",
    "settings-bad-recipient",
    "node-bad-recipient",
    "secret-not-armored",
    "http-source-url",
    "file-source-url",
    "ext-source-url",
    "local-path-source-url",
    "scp-without-user",
];

/// Cases that only the cross-file checks catch: each file on its own is fine, so the schema must accept
/// them (a schema stricter than Cairn would flag correct files in editors).
const CROSS_FILE_CASES: [&str; 7] = [
    "unknown-plan",
    "unknown-runtime",
    "replicas-above-plan-max",
    "duplicate-name",
    "duplicate-domain",
    "region-no-node",
    "label-no-node",
];

struct Schemas {
    manifest: jsonschema::Validator,
    settings: jsonschema::Validator,
}

impl Schemas {
    fn load() -> Self {
        let read = |p: &str| -> Value {
            let text =
                std::fs::read_to_string(root().join(p)).unwrap_or_else(|e| panic!("read {p}: {e}"));
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{p} is not JSON: {e}"))
        };
        let compile = |p: &str| {
            jsonschema::validator_for(&read(p))
                .unwrap_or_else(|e| panic!("{p} is not a valid JSON Schema: {e}"))
        };
        Schemas {
            manifest: compile(SCHEMAS[0].1),
            settings: compile(SCHEMAS[1].1),
        }
    }

    /// The schema errors of one file (`rel` is its path inside its repository), as `path: at: message`.
    fn errors(&self, repo: &Path, rel: &str) -> Vec<String> {
        let src =
            std::fs::read_to_string(repo.join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"));
        let toml: toml::Value =
            toml::from_str(&src).unwrap_or_else(|e| panic!("{rel} is not TOML: {e}"));
        let json = serde_json::to_value(toml).expect("TOML converts to JSON");
        let schema = if rel == "cairn.toml" {
            &self.settings
        } else {
            &self.manifest
        };
        schema
            .iter_errors(&json)
            .map(|e| format!("{rel}: {}: {e}", e.instance_path()))
            .collect()
    }
}

/// Every `.toml` file under `dir`, as sorted repository-relative paths.
fn toml_files(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else if p.extension().is_some_and(|x| x == "toml") {
                out.push(
                    p.strip_prefix(base)
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .replace('\\', "/"),
                );
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn committed_schemas_are_what_cairn_schema_prints() {
    for (args, file) in SCHEMAS {
        let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(args)
            .output()
            .expect("run cairn schema");
        assert!(out.status.success(), "cairn {args:?} failed");
        let committed =
            std::fs::read(root().join(file)).unwrap_or_else(|e| panic!("read {file}: {e}"));
        assert!(
            committed == out.stdout,
            "{file} differs from `cairn {}`: the model changed. Regenerate it with\n    cargo run --bin cairn -- {} > {file}",
            args.join(" "),
            args.join(" ")
        );
    }
}

#[test]
fn every_example_file_points_at_and_validates_against_the_schema() {
    check_against_the_schema("examples/config", 13);
}

/// `examples/local`, what `cairn dev` runs first (tests/it/dev.rs runs it): valid, and every file points at
/// and matches the JSON Schema like `examples/config`.
#[test]
fn the_local_example_is_valid_and_validates_against_the_schema() {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["validate", "examples/local"])
        .current_dir(root())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "valid: 1 plan, 1 runtime, 2 nodes, 2 apps (0 warnings)\n"
    );
    assert_eq!(out.status.code(), Some(0));
    check_against_the_schema("examples/local", 5);
}

fn check_against_the_schema(dir: &str, at_least: usize) {
    let schemas = Schemas::load();
    let repo = root().join(dir);
    let files = toml_files(&repo);
    assert!(
        files.len() >= at_least,
        "{dir} should hold at least {at_least} files, found {files:?}"
    );
    assert!(files.contains(&"cairn.toml".to_owned()));
    let mut errors = Vec::new();
    for rel in &files {
        let src = std::fs::read_to_string(repo.join(rel)).unwrap();
        let first = src.lines().next().unwrap_or("");
        let target = first.strip_prefix("#:schema ").unwrap_or_else(|| {
            panic!("{dir}/{rel} must start with a Taplo `#:schema` directive, found {first:?}")
        });
        let schema_file = if rel == "cairn.toml" {
            SCHEMAS[1].1
        } else {
            SCHEMAS[0].1
        };
        let resolved: PathBuf = repo.join(rel).parent().unwrap().join(target);
        assert_eq!(
            resolved.canonicalize().unwrap_or_else(|e| panic!(
                "{dir}/{rel}: `#:schema {target}` does not resolve: {e}"
            )),
            root().join(schema_file).canonicalize().unwrap(),
            "{dir}/{rel}'s `#:schema` must point at {schema_file}"
        );
        errors.extend(schemas.errors(&repo, rel));
    }
    assert!(
        errors.is_empty(),
        "{dir} does not match the JSON Schema:\n{}",
        errors.join("\n")
    );
}

/// The file a case's `expected.txt` names first: where its one mistake is.
fn broken_file(case: &Path) -> String {
    let expected = std::fs::read_to_string(case.join("expected.txt")).unwrap();
    let loc = expected.split(": ").next().unwrap();
    loc.split(':').next().unwrap().to_owned()
}

fn case_dir(name: &str) -> PathBuf {
    let dir = root().join("examples/invalid").join(name);
    assert!(
        case_dirs().contains(&dir),
        "case `{name}` is missing from examples/invalid"
    );
    dir
}

#[test]
fn key_type_and_value_cases_fail_the_schema_in_the_file_cairn_names() {
    let schemas = Schemas::load();
    let mut failures = Vec::new();
    for name in KEY_AND_TYPE_CASES.iter().chain(&VALUE_CASES) {
        let dir = case_dir(name);
        let broken = broken_file(&dir);
        for rel in toml_files(&dir) {
            let errors = schemas.errors(&dir, &rel);
            if rel == broken && errors.is_empty() {
                failures.push(format!(
                    "{name}: the schema accepts {rel}, which cairn validate refuses"
                ));
            }
            if rel != broken && !errors.is_empty() {
                failures.push(format!(
                    "{name}: the schema refuses {rel}, which has no mistake:\n{}",
                    errors.join("\n")
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn cross_file_cases_pass_the_schema() {
    let schemas = Schemas::load();
    for name in CROSS_FILE_CASES {
        let dir = case_dir(name);
        for rel in toml_files(&dir) {
            let errors = schemas.errors(&dir, &rel);
            assert!(
                errors.is_empty(),
                "{name}: the schema refuses {rel}:\n{}",
                errors.join("\n")
            );
        }
    }
}
