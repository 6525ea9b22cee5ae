//! Managed databases' shared vocabulary: the engine a `[database.NAME]` runs and where its backups go.
//! The manifest's `[database.NAME]` resource itself lives in `model.rs`; these types are shared by the
//! manifest, the wire (`cairn-proto`) and the agent's engines (`cairn_agent::database`).

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The database server a `[database.NAME]` runs, from the node's own packages (process driver) or an
/// image (Docker driver).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Postgres,
    Redis,
    Mariadb,
}

impl Engine {
    pub const ALL: [Engine; 3] = [Engine::Postgres, Engine::Redis, Engine::Mariadb];

    pub const fn as_str(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::Redis => "redis",
            Engine::Mariadb => "mariadb",
        }
    }

    pub fn parse(s: &str) -> Option<Engine> {
        Engine::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a database's backups are written: `dir:/absolute/path` on the database's node, or
/// `s3://bucket/prefix` on an S3-compatible store (its endpoint and credentials are age secrets beside it
/// in the manifest, never part of this value). Every object is named below it by the database and the
/// backup's id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BackupTo {
    Dir { path: String },
    S3 { bucket: String, prefix: String },
}
