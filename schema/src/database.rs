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

/// The URL an attached app receives for a login: `postgres://USER:PW@HOST:PORT/DB`,
/// `redis://USER:PW@HOST:PORT/N` (an ACL user) or `mysql://USER:PW@HOST:PORT/DB`, the user, password and
/// database percent-encoded and an IPv6 host in brackets. A secret.
pub fn url(
    engine: Engine,
    user: &str,
    password: &[u8],
    host: &str,
    port: u16,
    db: &str,
) -> crate::Secret {
    let scheme = match engine {
        Engine::Postgres => "postgres",
        Engine::Redis => "redis",
        Engine::Mariadb => "mysql",
    };
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let mut out = format!("{scheme}://{}:", percent_encode(user.as_bytes()));
    out.push_str(&percent_encode(password));
    out.push_str(&format!("@{host}:{port}/{}", percent_encode(db.as_bytes())));
    crate::Secret::new(out.into_bytes())
}

/// Percent-encodes all but RFC 3986's unreserved characters.
pub fn percent_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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
