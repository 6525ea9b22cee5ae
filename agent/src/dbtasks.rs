//! The database tasks (`db_ensure`, `db_stop`, `db_backup`, `db_restore`, `db_verify`, `db_upgrade`,
//! `db_drop`): what the agent loop runs for them. It opens what the control plane sealed to this node
//! (the login's password, S3 keys), builds the contract's values and calls [`crate::database`]; it
//! decides nothing.
//!
//! What it must not do: put a password or a key into a result, an error or a log line.

use std::path::PathBuf;
use std::sync::Arc;

use cairn_proto::{BackupReport, DatabasePayload, Outcome, Task, TaskKind};
use cairn_schema::{Ciphertext, Identity, Secret};

use crate::database::{self, DbError, Instance, Login, S3Access, Target};

/// Where this node keeps its databases, and the identity that opens what is sealed to it.
#[derive(Debug, Clone)]
pub struct DatabaseHost {
    /// Where instances live, `<dir>/<instance>` (`--databases-dir`): outside the agent's own data
    /// directory, which no other account may enter, while each engine's account must reach its own.
    pub dir: PathBuf,
    pub identity: Arc<Identity>,
    /// Servers in containers (the Docker driver's way) rather than the engines' binaries here.
    pub containers: Option<Containers>,
}

/// How this node runs database servers in containers.
#[derive(Debug, Clone)]
pub struct Containers {
    /// Names and labels carry it, so an installation's containers and volumes are its own.
    pub installation: String,
    pub node: String,
    /// The image per engine, `{version}` replaced by the database's version.
    pub images: std::collections::BTreeMap<cairn_schema::database::Engine, String>,
}

impl Containers {
    /// The official images: `postgres:<version>` and the like.
    pub fn official_images() -> std::collections::BTreeMap<cairn_schema::database::Engine, String> {
        use cairn_schema::database::Engine;
        [
            (Engine::Postgres, "postgres:{version}"),
            (Engine::Redis, "redis:{version}"),
            (Engine::Mariadb, "mariadb:{version}"),
        ]
        .into_iter()
        .map(|(e, i)| (e, i.to_owned()))
        .collect()
    }

    fn runtime(
        &self,
        engine: cairn_schema::database::Engine,
        version: &str,
        instance: &cairn_schema::Name,
    ) -> database::Runtime {
        let image = self
            .images
            .get(&engine)
            .map(|i| i.replace("{version}", version))
            .unwrap_or_default();
        database::Runtime::Container(database::Container {
            image,
            name: format!("cairn-db-{}-{instance}", self.installation),
            labels: vec![
                ("cairn.installation".to_owned(), self.installation.clone()),
                ("cairn.node".to_owned(), self.node.clone()),
                ("cairn.database".to_owned(), instance.to_string()),
            ],
        })
    }
}

impl DatabaseHost {
    /// Creates the instances' directory: engines' accounts pass through it to their own (0711), and
    /// nobody else lists it.
    fn make_root(&self) -> Result<(), DbError> {
        use std::os::unix::fs::PermissionsExt as _;
        let failed =
            |e: std::io::Error| DbError::Failed(format!("cannot make {}: {e}", self.dir.display()));
        std::fs::create_dir_all(&self.dir).map_err(failed)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o711)).map_err(failed)
    }

    fn instance(&self, p: &DatabasePayload) -> Instance {
        Instance {
            name: p.instance.clone(),
            engine: p.engine,
            version: p.version.clone(),
            dir: self.dir.join(p.instance.as_str()),
            port: p.port,
            runtime: self.runtime(p.engine, &p.version, &p.instance),
        }
    }

    /// Where instance `instance` of `engine` `version` runs on this node.
    fn runtime(
        &self,
        engine: cairn_schema::database::Engine,
        version: &str,
        instance: &cairn_schema::Name,
    ) -> database::Runtime {
        self.containers
            .as_ref()
            .map_or(database::Runtime::Process, |c| {
                c.runtime(engine, version, instance)
            })
    }

    /// Opens a JSON object of strings sealed to this node and takes `field` out of it.
    fn open(&self, sealed: &str, field: &str, what: &str) -> Result<Secret, DbError> {
        let refused = || {
            DbError::Unsupported(format!(
                "the {what} does not open with this node's identity"
            ))
        };
        let ct = Ciphertext::new(sealed).map_err(|_| refused())?;
        let plain = self.identity.decrypt(&ct).map_err(|_| refused())?;
        let v: serde_json::Value = serde_json::from_slice(plain.expose()).map_err(|_| refused())?;
        v.get(field)
            .and_then(|s| s.as_str())
            .map(|s| Secret::new(s.as_bytes().to_vec()))
            .ok_or_else(refused)
    }

    fn login(&self, p: &DatabasePayload) -> Result<Login, DbError> {
        let sealed = p.login_sealed.as_deref().ok_or_else(|| {
            DbError::Failed(
                "the task carries no login yet (the control plane seals it at lease)".into(),
            )
        })?;
        Ok(Login {
            user: p.user.clone(),
            password: self.open(sealed, "password", "database login")?,
            database: p.db.clone(),
        })
    }

    fn target(&self, p: &DatabasePayload) -> Result<Target, DbError> {
        let t = p
            .target
            .as_ref()
            .ok_or_else(|| DbError::Unsupported("the task names no backup target".into()))?;
        let s3 = match &t.keys_sealed {
            Some(sealed) => Some(S3Access {
                endpoint: t.endpoint.clone(),
                region: t.region.clone().unwrap_or_else(|| "us-east-1".to_owned()),
                access_key_id: self.open(sealed, "access_key_id", "storage key")?,
                secret_access_key: self.open(sealed, "secret_access_key", "storage key")?,
            }),
            None => None,
        };
        Ok(Target {
            to: t.to.clone(),
            s3,
        })
    }
}

/// Runs one database task to its outcome.
pub async fn run(host: Option<&DatabaseHost>, task: &Task) -> Outcome {
    match run_inner(host, task).await {
        Ok((detail, backup)) => Outcome::Done {
            detail: Some(detail),
            timings: Default::default(),
            image: None,
            backup,
        },
        Err(e) => Outcome::Failed {
            retry: matches!(e, DbError::Failed(_)),
            error: e.to_string(),
        },
    }
}

async fn run_inner(
    host: Option<&DatabaseHost>,
    task: &Task,
) -> Result<(String, Option<BackupReport>), DbError> {
    let host = host.ok_or_else(|| DbError::Unsupported("this agent keeps no databases".into()))?;
    host.make_root()?;
    let p = task.database.as_ref().ok_or_else(|| {
        DbError::Unsupported(format!(
            "a {} task needs its database payload",
            task.kind.as_str()
        ))
    })?;
    let instance = host.instance(p);
    match task.kind {
        TaskKind::DbEnsure => {
            database::ensure(&instance, &host.login(p)?).await?;
            for user in &p.retire_users {
                // A retired login keeps existing with a password nobody knows: the old one is refused.
                let lock = Login {
                    user: user.clone(),
                    password: Secret::new(random_password()),
                    database: p.db.clone(),
                };
                database::ensure(&instance, &lock).await?;
            }
            Ok((
                format!("database {} ready on port {}", p.instance, p.port),
                None,
            ))
        }
        TaskKind::DbStop => {
            database::stop(&instance).await?;
            Ok((format!("database {} stopped, data kept", p.instance), None))
        }
        TaskKind::DbBackup => {
            let object = p
                .object
                .as_deref()
                .ok_or_else(|| DbError::Unsupported("a backup task names no object".into()))?;
            let b = database::backup(&instance, &host.login(p)?, &host.target(p)?, object).await?;
            let report = BackupReport {
                object: b.object.clone(),
                bytes: b.bytes,
                sha256: b.sha256.clone(),
                duration_ms: u64::try_from(b.duration.as_millis()).unwrap_or(u64::MAX),
                counts: b.counts.clone(),
            };
            Ok((
                format!("backup {} ({} bytes)", b.object, b.bytes),
                Some(report),
            ))
        }
        TaskKind::DbRestore => {
            let (object, sha256) = match (&p.object, &p.sha256) {
                (Some(o), Some(s)) => (o, s),
                _ => {
                    return Err(DbError::Unsupported(
                        "a restore task names no object or checksum".into(),
                    ));
                }
            };
            let login = host.login(p)?;
            database::ensure(&instance, &login).await?;
            database::restore(&instance, &login, &host.target(p)?, object, sha256).await?;
            Ok((format!("restored {object} into {}", p.instance), None))
        }
        TaskKind::DbUpgrade => {
            let from = p.upgrade_from.as_ref().ok_or_else(|| {
                DbError::Unsupported("an upgrade task names no instance to upgrade from".into())
            })?;
            let old = Instance {
                name: from.instance.clone(),
                engine: p.engine,
                version: from.version.clone(),
                dir: host.dir.join(from.instance.as_str()),
                port: from.port,
                runtime: host.runtime(p.engine, &from.version, &from.instance),
            };
            let done = database::upgrade(&old, &instance, &host.login(p)?).await?;
            Ok((
                format!(
                    "upgraded {} ({}) into {} ({}) on port {}: {}",
                    from.instance,
                    from.version,
                    p.instance,
                    p.version,
                    p.port,
                    done.summary()
                ),
                None,
            ))
        }
        TaskKind::DbDrop => {
            database::destroy(&instance).await?;
            Ok((
                format!("database instance {} dropped, its data deleted", p.instance),
                None,
            ))
        }
        TaskKind::DbVerify => {
            let (object, sha256) = match (&p.object, &p.sha256) {
                (Some(o), Some(s)) => (o, s),
                _ => {
                    return Err(DbError::Unsupported(
                        "a verification names no object or checksum".into(),
                    ));
                }
            };
            // A scratch server of the same engine and version beside the instance: its own
            // directory (no instance name has a dot), a port free now, a login made for it alone.
            let runtime = match instance.runtime.clone() {
                database::Runtime::Container(c) => {
                    database::Runtime::Container(database::Container {
                        name: format!("{}.verify", c.name),
                        ..c
                    })
                }
                process => process,
            };
            let scratch = Instance {
                dir: host.dir.join(format!("{}.verify", p.database)),
                port: free_port()?,
                runtime,
                ..instance
            };
            let login = Login {
                user: p.user.clone(),
                password: Secret::new(random_password()),
                database: p.db.clone(),
            };
            let v = database::verify(
                &scratch,
                &login,
                &host.target(p)?,
                object,
                sha256,
                p.expected_counts.as_ref(),
            )
            .await?;
            let rows: u64 = v.counts.values().sum();
            let report = BackupReport {
                object: object.clone(),
                bytes: v.bytes,
                sha256: sha256.clone(),
                duration_ms: u64::try_from(v.duration.as_millis()).unwrap_or(u64::MAX),
                counts: Some(v.counts),
            };
            let against = if p.expected_counts.is_some() {
                "equal to the dump's"
            } else {
                "the dump recorded none to compare"
            };
            Ok((
                format!("verified {object}: restored {rows} rows, {against}"),
                Some(report),
            ))
        }
        other => Err(DbError::Unsupported(format!(
            "`{}` is not a database task",
            other.as_str()
        ))),
    }
}

/// A TCP port nothing listens on now.
fn free_port() -> Result<u16, DbError> {
    std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| DbError::Failed(format!("cannot find a free port for a scratch server: {e}")))
}

fn random_password() -> Vec<u8> {
    use rand::Rng as _;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    (0..32)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())])
        .collect()
}
