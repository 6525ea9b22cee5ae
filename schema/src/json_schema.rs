//! The JSON Schema of the manifest format, generated from the model types, for editors (Taplo / Even
//! Better TOML) and for checking the examples.

use crate::model::{ManifestFile, Settings};

/// The schema of a manifest file (`[plan.NAME]`, `[runtime.NAME]`, `[node.NAME]`, `[app.NAME]`).
pub fn manifest() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(ManifestFile)).expect("schema serializes")
}

/// The schema of `cairn.toml`.
pub fn settings() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Settings)).expect("schema serializes")
}
