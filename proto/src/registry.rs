//! Image distribution through a registry: where release images go (`cairn serve --registry`), and the
//! pinned image a node pulls instead of building.

use std::fmt;
use std::str::FromStr;

use cairn_schema::Name;
use serde::{Deserialize, Serialize};

/// A registry and repository prefix, `HOST[:PORT][/PREFIX]` (e.g. `127.0.0.1:5000/cairn`): release `N` of
/// app `web` is pushed as `HOST:PORT/PREFIX/web:N` and pulled by digest.
///
/// Only what Docker's reference grammar accepts as a registry host and repository path: a host name or
/// IPv4 address, an optional port, and lowercase path components. No scheme, tag, digest or credentials.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Registry(String);

impl Registry {
    pub fn new(s: &str) -> Result<Registry, String> {
        let s = s.trim_end_matches('/');
        let bad = |why: &str| Err(format!("registry `{s}`: {why} (use HOST[:PORT][/PREFIX])"));
        // A repository name is at most 255 characters: room for `/` and a 63-character app name.
        if s.is_empty() || s.len() > 191 {
            return bad("use 1 to 191 characters");
        }
        if s.contains("://") {
            return bad("give no scheme");
        }
        let (host_port, prefix) = s.split_once('/').unwrap_or((s, ""));
        let (host, port) = match host_port.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        };
        let label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !host.split('.').all(label) {
            return bad(&format!("`{host}` is not a host name or IPv4 address"));
        }
        // Docker takes a first component without a dot or a port for a repository path, not a host.
        if port.is_none() && !host.contains('.') && host != "localhost" {
            return bad(&format!(
                "`{host}` would be read as a path on Docker Hub; give a port or a dotted host"
            ));
        }
        if let Some(p) = port
            && !(p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok_and(|p| p > 0))
        {
            return bad(&format!("`{p}` is not a port"));
        }
        // The engine names Docker Hub images in short form, so a pushed image's digest would not be found.
        if ["docker.io", "index.docker.io", "registry-1.docker.io"]
            .contains(&host.to_ascii_lowercase().as_str())
        {
            return bad("Docker Hub is not supported; use a registry of your own");
        }
        if !prefix.is_empty() && !prefix.split('/').all(path_component) {
            return bad(&format!(
                "`{prefix}` is not a repository path (lowercase letters, digits, and `.`, `_`, `-` between them)"
            ));
        }
        Ok(Registry(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The repository an app's release images go to: `<registry>/<app>`.
    pub fn repository(&self, app: &Name) -> String {
        format!("{}/{app}", self.0)
    }
}

/// A path component of a repository name, as Docker's reference grammar has it: lowercase letters and
/// digits, separated by one `.`, one `_`, `__`, or a run of `-`.
fn path_component(c: &str) -> bool {
    let alnum = |x: &u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let b = c.as_bytes();
    if b.is_empty() || !b.first().is_some_and(alnum) || !b.last().is_some_and(alnum) {
        return false;
    }
    // Every run of separators between two alphanumerics must be one Docker allows.
    c.split(|x: char| x.is_ascii_lowercase() || x.is_ascii_digit())
        .all(|sep| {
            sep.is_empty()
                || sep == "."
                || sep == "_"
                || sep == "__"
                || sep.bytes().all(|x| x == b'-')
        })
        && b.iter().all(|x| alnum(x) || b"._-".contains(x))
}

impl FromStr for Registry {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Registry::new(s)
    }
}

impl TryFrom<String> for Registry {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Registry::new(&s)
    }
}

impl From<Registry> for String {
    fn from(r: Registry) -> String {
        r.0
    }
}

impl fmt::Display for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A release image in a registry, pinned by digest: what a node pulls instead of building.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryImage {
    /// `host:port/prefix/app` (no tag, no digest).
    pub reference: String,
    /// `sha256:<64 hex>`.
    pub digest: String,
}

impl RegistryImage {
    /// `reference@digest`, the only way a node names a registry image.
    pub fn pinned(&self) -> String {
        format!("{}@{}", self.reference, self.digest)
    }
}

/// Whether `d` is a `sha256:` digest as registries and engines write it (64 lowercase hex digits).
pub fn is_sha256_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_docker_reads_as_a_registry() {
        for ok in [
            "127.0.0.1:5000/cairn",
            "127.0.0.1:5000",
            "registry.example.com/team/cairn",
            "registry.example.com:443/a.b_c-d",
            "localhost/cairn",
            "localhost:5000/",
        ] {
            let r = Registry::new(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert!(!r.as_str().ends_with('/'));
        }
    }

    #[test]
    fn refuses_what_is_not_a_registry_prefix_with_the_reason() {
        for (bad, says) in [
            ("", "1 to 191"),
            ("r.example.com:+5000/x", "not a port"),
            ("r.example.com/a..b", "repository path"),
            ("r.example.com/a._b", "repository path"),
            ("r.example.com/a___b", "repository path"),
            ("docker.io/acme", "Docker Hub"),
            ("https://r.example.com/x", "no scheme"),
            ("cairn/apps", "Docker Hub"),
            ("r.example.com:0/x", "not a port"),
            ("r.example.com:http/x", "not a port"),
            ("r.example.com/Upper", "repository path"),
            ("r.example.com/a//b", "repository path"),
            ("r.example.com/x:tag", "repository path"),
            ("r.example.com/x@sha256:00", "repository path"),
            ("-r.example.com/x", "host name"),
            ("user@r.example.com/x", "host name"),
        ] {
            let e = Registry::new(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn names_an_apps_repository() {
        let r = Registry::new("127.0.0.1:5000/cairn/").unwrap();
        let web = Name::new("web").unwrap();
        assert_eq!(r.repository(&web), "127.0.0.1:5000/cairn/web");
        assert!(Registry::new(&"r".repeat(188)).is_err(), "no dot or port");
        assert!(Registry::new(&format!("r.io/{}", "a".repeat(186))).is_ok());
        assert!(Registry::new(&format!("r.io/{}", "a".repeat(187))).is_err());
        assert!(Registry::new("r.io/a__b/c-d/e---f/g.h").is_ok());
    }

    #[test]
    fn serde_validates() {
        let r: Registry = serde_json::from_str("\"127.0.0.1:5000/cairn\"").unwrap();
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            "\"127.0.0.1:5000/cairn\""
        );
        assert!(serde_json::from_str::<Registry>("\"http://x\"").is_err());
    }
}
