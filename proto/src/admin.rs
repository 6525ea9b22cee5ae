//! Request and response bodies of the admin API (`/api/v1`) besides the status, which is the
//! reconciler's own `Status` value.

use cairn_schema::{Driver, Name, Recipient};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{ActualReplica, Resources};

/// `POST /api/v1/nodes/{node}/join-tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenRequest {
    /// How long the token may be used; the server caps it.
    pub ttl_secs: u64,
}

/// A new join token. Shown once: only its hash is stored.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub id: i64,
    pub node: Name,
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("node", &self.node)
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A join token as listed: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenInfo {
    pub id: i64,
    pub node: Name,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub used_at: Option<DateTime<Utc>>,
}

/// A node as the agent side knows it (`GET /api/v1/nodes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: Name,
    /// `pending`, `online` or `offline`.
    pub state: String,
    pub joined_at: Option<DateTime<Utc>>,
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// Whether the node holds a credential (false before it joins and after a revoke).
    pub has_credential: bool,
    pub recipient: Option<Recipient>,
    pub drivers: Vec<Driver>,
    pub agent_version: Option<String>,
    /// What its replicas use, as its last heartbeat said.
    pub resources: Option<Resources>,
    /// What runs on it, as its last heartbeat said.
    pub replicas: Vec<ActualReplica>,
}

/// `DELETE /api/v1/nodes/{node}/credential`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    /// False when the node had no credential.
    pub revoked: bool,
}
