//! Integration tests of the schema crate: rules with their rendered errors, round trips, hostile input.

mod hostile;
mod incremental;
mod roundtrip;
mod rules;
mod tls;

/// Loads a repository given as `(path, text)` pairs, with a default `cairn.toml` unless one is given.
pub fn load(files: &[(&str, &str)]) -> cairn_schema::Loaded {
    let mut all: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|(p, t)| (p.to_string(), t.as_bytes().to_vec()))
        .collect();
    if !files.iter().any(|(p, _)| *p == "cairn.toml") {
        all.push((
            "cairn.toml".into(),
            b"base_domain = \"apps.example.com\"\ncurrency = \"EUR\"\n".to_vec(),
        ));
    }
    cairn_schema::load(all).1
}

/// Every diagnostic rendered, as `cairn validate` prints them.
pub fn rendered(files: &[(&str, &str)]) -> String {
    load(files).diagnostics.to_string()
}

pub const BASE: &str = r#"
[plan.small]
cpu = 0.5
memory = "512MiB"
disk = "5GiB"
price = "5.00"
max_replicas = 3

[runtime.node]
image = "node:22-alpine"
build = ["npm ci"]
start = "node server.js"
port = 3000

[node.worker-1]
cpu = 4
memory = "8GiB"
disk = "100GiB"
region = "eu-west"
labels = { disk = "ssd" }
"#;
