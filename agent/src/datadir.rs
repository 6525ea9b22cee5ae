//! The agent's data directory (`--data-dir`): its age identity, its credential, and its book of replica
//! slots.
//!
//! - `identity.txt`: the node's age identity, generated on first start, in `age-keygen`'s format (so the
//!   `age` CLI can use it); mode 0600. Its recipient is what the agent joins with: the control plane
//!   encrypts this node's secrets to it, and nobody else can read them.
//! - `credential.json`: what the join returned (server, node, credential, installation); mode 0600. With
//!   it, a restarted agent needs no new join token.
//! - `join.json`: a join asked and not yet answered (its token and the credential the agent chose);
//!   mode 0600. An agent killed before the answer came asks again with both and gets the same answer.
//! - `book.json`: per replica slot, the release and config generation the agent last put there (see
//!   [`Book`]).
//!
//! Files are written whole (a temporary file, then a rename), so a crash never leaves half of one.
//!
//! What it must not do: write a secret anywhere but `identity.txt`, `credential.json` and `join.json`, or
//! make any of them readable by anyone but the agent's own user.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cairn_proto::Resources;
use cairn_schema::{Identity, Name};
use serde::{Deserialize, Serialize};

/// What can go wrong with the data directory.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid age identity file")]
    Identity { path: PathBuf },
    #[error("{path} is damaged")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} is readable by other users (mode {mode:o}); make it 0600")]
    Permissions { path: PathBuf, mode: u32 },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DataError {
    let path = path.to_owned();
    move |source| DataError::Io { op, path, source }
}

/// What a join gave this node.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joined {
    pub server: String,
    pub node: Name,
    pub credential: String,
    pub installation: Name,
}

impl std::fmt::Debug for Joined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joined")
            .field("server", &self.server)
            .field("node", &self.node)
            .field("credential", &"<redacted>")
            .field("installation", &self.installation)
            .finish()
    }
}

/// A join asked and not answered yet.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingJoin {
    pub token: String,
    pub credential: String,
}

impl std::fmt::Debug for PendingJoin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingJoin(<redacted>)")
    }
}

/// The data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Opens (creating, mode 0700) the directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, DataError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io("create", &root))?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
            .map_err(io("restrict", &root))?;
        Ok(DataDir { root })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn identity_path(&self) -> PathBuf {
        self.root.join("identity.txt")
    }

    fn credential_path(&self) -> PathBuf {
        self.root.join("credential.json")
    }

    pub fn book_path(&self) -> PathBuf {
        self.root.join("book.json")
    }

    /// The node's identity, generated and saved (0600) on first use.
    pub fn identity(&self) -> Result<Identity, DataError> {
        let path = self.identity_path();
        match fs::read_to_string(&path) {
            Ok(text) => {
                check_private(&path)?;
                let text = zeroize::Zeroizing::new(text);
                Identity::parse(&text).map_err(|_| DataError::Identity { path })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Identity::generate();
                let created = format!("{:?}", std::time::SystemTime::now());
                write_private(&path, id.to_file_text(&created).as_bytes())?;
                tracing::info!(path = %path.display(), recipient = %id.recipient(), "generated this node's age identity");
                Ok(id)
            }
            Err(e) => Err(io("read", &path)(e)),
        }
    }

    /// The credential of an earlier join, if any.
    pub fn credential(&self) -> Result<Option<Joined>, DataError> {
        read_private_json(self.credential_path())
    }

    pub fn save_credential(&self, joined: &Joined) -> Result<(), DataError> {
        let json = zeroize::Zeroizing::new(serde_json::to_vec_pretty(joined).expect("serializes"));
        write_private(&self.credential_path(), &json)
    }

    /// Forgets the credential (it was refused: revoked, or the node was removed).
    pub fn forget_credential(&self) -> Result<(), DataError> {
        remove(&self.credential_path())
    }

    /// The join asked and not answered, if any.
    pub fn pending_join(&self) -> Result<Option<PendingJoin>, DataError> {
        read_private_json(self.root.join("join.json"))
    }

    /// Records a join about to be asked (before the request leaves).
    pub fn save_pending_join(&self, pending: &PendingJoin) -> Result<(), DataError> {
        let json = zeroize::Zeroizing::new(serde_json::to_vec(pending).expect("serializes"));
        write_private(&self.root.join("join.json"), &json)
    }

    /// The join was answered (its credential saved) or refused for good.
    pub fn forget_pending_join(&self) -> Result<(), DataError> {
        remove(&self.root.join("join.json"))
    }
}

/// A JSON file only the agent may read, if it exists.
fn read_private_json<T: serde::de::DeserializeOwned>(
    path: PathBuf,
) -> Result<Option<T>, DataError> {
    match fs::read(&path) {
        Ok(bytes) => {
            check_private(&path)?;
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| DataError::Json { path, source })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", &path)(e)),
    }
}

fn remove(path: &Path) -> Result<(), DataError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", path)(e)),
        _ => Ok(()),
    }
}

fn check_private(path: &Path) -> Result<(), DataError> {
    let mode = fs::metadata(path)
        .map_err(io("stat", path))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(DataError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Writes `bytes` to `path` whole, readable by the owner only.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    f.write_all(bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io("rename into place", path))
}

/// Whether a slot's replica runs, is kept stopped, or was removed (a tombstone that remembers the
/// generation that removed it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    Running,
    Stopped,
    Removed,
}

/// What the agent last put in one replica slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    pub release: u64,
    /// The config generation of the task (or stop order) that put it so; a task of an older generation
    /// must not undo it.
    pub generation: Option<u64>,
    pub state: SlotState,
    /// The replica's limits, for what the node reports it uses.
    pub limits: Resources,
}

/// Per replica slot `(app, slot)`, what the agent last did there: the agent's memory of generations
/// across restarts.
#[derive(Debug)]
pub struct Book {
    path: PathBuf,
    slots: Mutex<BTreeMap<String, SlotRecord>>,
}

fn key(app: &Name, slot: u32) -> String {
    format!("{app}/{slot}")
}

impl Book {
    pub fn open(path: PathBuf) -> Result<Self, DataError> {
        let slots = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| DataError::Json {
                path: path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io("read", &path)(e)),
        };
        Ok(Book {
            path,
            slots: Mutex::new(slots),
        })
    }

    pub fn get(&self, app: &Name, slot: u32) -> Option<SlotRecord> {
        self.lock().get(&key(app, slot)).cloned()
    }

    /// Whether a task of `generation` is older than what the slot holds (then it must not run).
    pub fn supersedes(&self, app: &Name, slot: u32, generation: Option<u64>) -> Option<u64> {
        let have = self.get(app, slot)?.generation?;
        match generation {
            Some(g) if g < have => Some(have),
            _ => None,
        }
    }

    /// Records what a slot now holds; its generation never goes backwards.
    pub fn record(&self, app: &Name, slot: u32, mut rec: SlotRecord) -> Result<(), DataError> {
        let mut slots = self.lock();
        let k = key(app, slot);
        if let Some(old) = slots.get(&k) {
            rec.generation = match (old.generation, rec.generation) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => b.or(a),
            };
        }
        slots.insert(k, rec);
        let json = serde_json::to_vec_pretty(&*slots).expect("serializes");
        write_private(&self.path, &json)
    }

    /// Every slot with a replica (running or stopped): `(app, slot, record)`.
    pub fn live(&self) -> Vec<(Name, u32, SlotRecord)> {
        self.lock()
            .iter()
            .filter(|(_, r)| r.state != SlotState::Removed)
            .filter_map(|(k, r)| {
                let (app, slot) = k.rsplit_once('/')?;
                Some((Name::new(app).ok()?, slot.parse().ok()?, r.clone()))
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SlotRecord>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_is_generated_once_and_kept_private() {
        let tmp = tempfile::tempdir().unwrap();
        let d = DataDir::open(tmp.path().join("agent")).unwrap();
        let a = d.identity().unwrap();
        let b = d.identity().unwrap();
        assert_eq!(a.recipient(), b.recipient());
        let mode = fs::metadata(d.identity_path())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        fs::set_permissions(d.identity_path(), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(d.identity(), Err(DataError::Permissions { .. })));
    }

    #[test]
    fn the_book_never_moves_a_generation_backwards() {
        let tmp = tempfile::tempdir().unwrap();
        let book = Book::open(tmp.path().join("book.json")).unwrap();
        let web = Name::new("web").unwrap();
        let rec = |g, state| SlotRecord {
            release: 1,
            generation: g,
            state,
            limits: Resources::default(),
        };
        book.record(&web, 1, rec(Some(5), SlotState::Running))
            .unwrap();
        assert_eq!(book.supersedes(&web, 1, Some(4)), Some(5));
        assert_eq!(book.supersedes(&web, 1, Some(5)), None);
        assert_eq!(book.supersedes(&web, 1, None), None);
        book.record(&web, 1, rec(Some(3), SlotState::Removed))
            .unwrap();
        assert_eq!(book.get(&web, 1).unwrap().generation, Some(5));
        assert!(book.live().is_empty());
        let again = Book::open(tmp.path().join("book.json")).unwrap();
        assert_eq!(again.get(&web, 1).unwrap().state, SlotState::Removed);
    }
}
