//! What a deploy task carries to its agent ([`cairn_proto::DeployPayload`]): the release's wire form, the
//! hostnames the node proxy routes, and the release's secrets sealed to the one node that runs it.
//!
//! Secrets are sealed where a task is made (the executor, when the node's recipient is known) or, for a
//! task made before the node joined (`secrets_pending`) or for a node that joined again with a new key,
//! when the node leases it ([`seal`], called by the agent API). Sealing decrypts the app's stored
//! ciphertexts with the control plane's identity, checks each plaintext against the fingerprint the release
//! was planned with, and encrypts them, as one JSON object, to the node's recipient only.
//!
//! What it must not do: keep a plaintext past the call that seals it, put one into an error, or seal a
//! value other than the one the release was planned with (a secret changed since means a newer release).

use std::collections::BTreeMap;

use cairn_plan::ReleaseSpec;
use cairn_proto::{DeployPayload, ReleaseEnv};
use cairn_schema::{Ciphertext, Identity, Name, Recipient, SecretError};
use sqlx::PgConnection;
use zeroize::Zeroize as _;

use crate::store::state::StoredEnv;
use crate::store::{StoreError, releases, state};

/// The wire form of a release spec: the same JSON, field for field.
pub fn wire_spec(spec: &ReleaseSpec) -> cairn_proto::ReleaseSpec {
    cairn_proto::ReleaseSpec {
        app: spec.app.clone(),
        source_url: spec.source_url.clone(),
        port: spec.port,
        health: spec.health.clone(),
        cpu_millis: spec.cpu_millis,
        memory_bytes: spec.memory_bytes,
        disk_bytes: spec.disk_bytes,
        drivers: spec.drivers.clone(),
        dockerfile: spec.dockerfile,
        image: spec.image.clone(),
        build: spec.build.clone(),
        start: spec.start.clone(),
        env: spec
            .env
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    cairn_plan::ReleaseEnv::Plain { value } => ReleaseEnv::Plain {
                        value: value.clone(),
                    },
                    // On the wire an attached database's URL is one more secret: the agent gets it in
                    // the sealed env like the others.
                    cairn_plan::ReleaseEnv::Secret { fingerprint }
                    | cairn_plan::ReleaseEnv::Database { fingerprint, .. } => ReleaseEnv::Secret {
                        fingerprint: fingerprint.clone(),
                    },
                };
                (k.clone(), v)
            })
            .collect(),
    }
}

/// Whether a release runs with any secret.
pub fn has_secrets(spec: &cairn_proto::ReleaseSpec) -> bool {
    spec.env
        .values()
        .any(|v| matches!(v, ReleaseEnv::Secret { .. }))
}

/// Why a release's secrets could not be sealed to a node. Never carries a value.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error(
        "the control plane has no identity (`cairn serve --identity FILE` or CAIRN_IDENTITY), so it \
         cannot encrypt app `{app}`'s secrets to its node"
    )]
    NoIdentity { app: Name },
    #[error(
        "secret `{key}` of app `{app}` is no longer in the applied configuration; a newer release \
         replaces this one"
    )]
    Missing { app: Name, key: String },
    #[error(
        "secret `{key}` of app `{app}` has changed since this release was made; a newer release \
         replaces this one"
    )]
    Changed { app: Name, key: String },
    #[error("secret `{key}` of app `{app}` does not decrypt with the control plane's identity")]
    Decrypt {
        app: Name,
        key: String,
        #[source]
        source: SecretError,
    },
    #[error("cannot make app `{app}`'s database URLs: {reason}")]
    Database { app: Name, reason: String },
    #[error("cannot encrypt app `{app}`'s secrets to its node")]
    Encrypt {
        app: Name,
        #[source]
        source: SecretError,
    },
}

impl SealError {
    /// Whether trying again later can help (an identity given to a restarted control plane can; a changed
    /// secret cannot).
    pub fn is_permanent(&self) -> bool {
        !matches!(
            self,
            SealError::NoIdentity { .. } | SealError::Database { .. }
        )
    }
}

/// Seals the secrets a release was planned with (`spec.env`'s fingerprints) to `recipient`, from the
/// app's stored env (the repository's ciphertexts).
pub fn seal(
    identity: Option<&Identity>,
    stored: &[StoredEnv],
    spec: &cairn_proto::ReleaseSpec,
    recipient: &Recipient,
) -> Result<Ciphertext, SealError> {
    seal_with(identity, stored, &BTreeMap::new(), spec, recipient)
}

/// [`seal`], with the attached databases' URLs by env var, each with the binding fingerprint it stands
/// for (`store::databases::app_urls`): a URL whose binding is not the one the release was planned with
/// is refused as changed (a newer release replaces this one).
pub fn seal_with(
    identity: Option<&Identity>,
    stored: &[StoredEnv],
    databases: &BTreeMap<String, (String, cairn_schema::Secret)>,
    spec: &cairn_proto::ReleaseSpec,
    recipient: &Recipient,
) -> Result<Ciphertext, SealError> {
    let app = &spec.app;
    let identity = identity.ok_or_else(|| SealError::NoIdentity { app: app.clone() })?;
    let mut map: BTreeMap<&str, String> = BTreeMap::new();
    let result = (|| {
        for (key, v) in &spec.env {
            let ReleaseEnv::Secret { fingerprint } = v else {
                continue;
            };
            if let Some((binding, url)) = databases.get(key.as_str()) {
                if binding != fingerprint {
                    return Err(SealError::Changed {
                        app: app.clone(),
                        key: key.to_string(),
                    });
                }
                let s = url.expose_str().map_err(|source| SealError::Decrypt {
                    app: app.clone(),
                    key: key.to_string(),
                    source,
                })?;
                map.insert(key.as_str(), s.to_owned());
                continue;
            }
            let missing = || SealError::Missing {
                app: app.clone(),
                key: key.to_string(),
            };
            let row = stored
                .iter()
                .find(|e| e.key == key.as_str() && e.fingerprint.is_some())
                .ok_or_else(missing)?;
            let ct = Ciphertext::new(&row.value).map_err(|source| SealError::Decrypt {
                app: app.clone(),
                key: key.to_string(),
                source,
            })?;
            let plain = identity.decrypt(&ct).map_err(|source| SealError::Decrypt {
                app: app.clone(),
                key: key.to_string(),
                source,
            })?;
            if &identity.fingerprint(&plain) != fingerprint {
                return Err(SealError::Changed {
                    app: app.clone(),
                    key: key.to_string(),
                });
            }
            let s = plain.expose_str().map_err(|source| SealError::Decrypt {
                app: app.clone(),
                key: key.to_string(),
                source,
            })?;
            map.insert(key.as_str(), s.to_owned());
        }
        let json = zeroize::Zeroizing::new(serde_json::to_vec(&map).expect("a map serializes"));
        cairn_schema::secret::encrypt(&json, std::slice::from_ref(recipient)).map_err(|source| {
            SealError::Encrypt {
                app: app.clone(),
                source,
            }
        })
    })();
    for v in map.values_mut() {
        v.zeroize();
    }
    result
}

/// Seals `payload`'s secrets to `recipient` in place, reading the app's stored env through `conn`.
/// Does nothing for a release without secrets.
pub async fn seal_payload(
    conn: &mut PgConnection,
    identity: Option<&Identity>,
    payload: &mut DeployPayload,
    node: &Name,
    recipient: &Recipient,
) -> Result<Result<(), SealError>, StoreError> {
    if !has_secrets(&payload.spec) {
        payload.secret_env = None;
        payload.secret_recipient = None;
        payload.secrets_pending = false;
        return Ok(Ok(()));
    }
    let stored = state::app_env(conn, &payload.spec.app).await?;
    let databases =
        match crate::store::databases::app_urls(conn, identity, &payload.spec.app, node).await {
            Ok(d) => d,
            Err(crate::store::databases::CredentialError::Store(e)) => return Err(e),
            Err(crate::store::databases::CredentialError::NoIdentity) => {
                return Ok(Err(SealError::NoIdentity {
                    app: payload.spec.app.clone(),
                }));
            }
            Err(e) => {
                return Ok(Err(SealError::Database {
                    app: payload.spec.app.clone(),
                    reason: cairn_schema::error::chain(&e),
                }));
            }
        };
    Ok(
        seal_with(identity, &stored, &databases, &payload.spec, recipient).map(|ct| {
            payload.secret_env = Some(ct.as_str().to_owned());
            payload.secret_recipient = Some(recipient.clone());
            payload.secrets_pending = false;
        }),
    )
}

/// The payload of a task that runs a recorded release again (a drift repair): the release as recorded,
/// the app's hostnames as applied, and its secrets left for the lease to seal. `None` when the release or
/// the app is gone.
pub async fn recorded_release(
    conn: &mut PgConnection,
    app: &Name,
    release: u64,
) -> Result<Option<DeployPayload>, StoreError> {
    let Some(row) = releases::deployed(&mut *conn, app, release).await? else {
        return Ok(None);
    };
    let Some(applied) = state::applied_app(&mut *conn, app).await? else {
        return Ok(None);
    };
    // Stored in the planner's form (an attached database's URL is its own kind there): the wire form
    // is made from it, as for a release the executor seals.
    let spec: ReleaseSpec = serde_json::from_value(row.spec).map_err(|e| StoreError::Corrupt {
        table: "releases",
        column: "spec",
        detail: e.to_string(),
    })?;
    let spec = wire_spec(&spec);
    let settings = state::config_state(&mut *conn).await?.settings;
    let mut hostnames = Vec::new();
    if let Some(s) = settings {
        hostnames.push(format!("{app}.{}", s.base_domain));
    }
    hostnames.extend(applied.domains.iter().map(|d| d.to_string()));
    let pending = has_secrets(&spec);
    Ok(Some(DeployPayload {
        config_commit: row.config_commit,
        source_commit: row.source_commit,
        spec,
        hostnames,
        secret_env: None,
        secret_recipient: None,
        secrets_pending: pending,
        push_to: None,
        image: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_plan::ReleaseEnv as PlanEnv;

    fn spec(env: BTreeMap<cairn_schema::EnvName, PlanEnv>) -> ReleaseSpec {
        serde_json::from_value(serde_json::json!({
            "app": "web", "source_url": "https://example.com/web.git", "port": 8080,
            "health": {"path": "/healthz", "timeout": "2s"}, "cpu_millis": 250,
            "memory_bytes": 268435456, "disk_bytes": 0, "drivers": ["docker", "process"],
            "dockerfile": false, "image": "debian:12", "build": ["make"], "start": "./web",
            "env": env,
        }))
        .unwrap()
    }

    fn key(s: &str) -> cairn_schema::EnvName {
        cairn_schema::EnvName::new(s).unwrap()
    }

    #[test]
    fn the_wire_spec_is_the_planner_spec_field_for_field() {
        let s = spec(BTreeMap::from([
            (key("A"), PlanEnv::Plain { value: "1".into() }),
            (
                key("B"),
                PlanEnv::Secret {
                    fingerprint: "f".into(),
                },
            ),
        ]));
        assert_eq!(
            serde_json::to_value(wire_spec(&s)).unwrap(),
            serde_json::to_value(&s).unwrap()
        );
        assert!(has_secrets(&wire_spec(&s)));
    }

    #[test]
    fn sealing_checks_fingerprints_and_reaches_only_the_node() {
        let cp = Identity::generate();
        let node = Identity::generate();
        let other = Identity::generate();
        let canary = "canary-7d1e0b";
        let ct = cairn_schema::secret::encrypt(canary.as_bytes(), &[cp.recipient()]).unwrap();
        let print = cp.fingerprint(&cp.decrypt(&ct).unwrap());
        let stored = vec![
            StoredEnv {
                key: "DB".into(),
                value: ct.as_str().into(),
                fingerprint: Some(print.clone()),
            },
            StoredEnv {
                key: "PLAIN".into(),
                value: "x".into(),
                fingerprint: None,
            },
        ];
        let s = wire_spec(&spec(BTreeMap::from([(
            key("DB"),
            PlanEnv::Secret { fingerprint: print },
        )])));
        let sealed = seal(Some(&cp), &stored, &s, &node.recipient()).unwrap();
        let opened = node.decrypt(&sealed).unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(opened.expose()).unwrap(),
            serde_json::json!({"DB": canary})
        );
        assert!(other.decrypt(&sealed).is_err());
        assert!(cp.decrypt(&sealed).is_err(), "sealed to the node alone");

        let changed = wire_spec(&spec(BTreeMap::from([(
            key("DB"),
            PlanEnv::Secret {
                fingerprint: "an older value's".into(),
            },
        )])));
        let e = seal(Some(&cp), &stored, &changed, &node.recipient()).unwrap_err();
        assert!(matches!(e, SealError::Changed { .. }) && e.is_permanent());
        assert!(!format!("{e} {e:?}").contains(canary));
        let e = seal(None, &stored, &s, &node.recipient()).unwrap_err();
        assert!(matches!(e, SealError::NoIdentity { .. }) && !e.is_permanent());
        let e = seal(Some(&cp), &stored[1..], &s, &node.recipient()).unwrap_err();
        assert!(matches!(e, SealError::Missing { .. }));
    }
}
