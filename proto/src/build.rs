//! The build key: what decides an app image's bytes, so an image is built once per build input and not
//! once per release. Releases that differ only in env, replicas, plan, domains, health check, port or
//! start command share their key and run the same image; a new source commit or a new recipe (base
//! image, build commands, the app's own Dockerfile or a generated one) makes a new key.
//!
//! The control plane records each release's key (`releases.build_key`) to hand a node an image another
//! release of the same key pushed; the agent names its images by it (`cairn/<installation>/<app>:<key>`)
//! and finds them by it. Both compute it here, so they agree.
//!
//! What it must not do: hash anything that does not reach the image (a release number, the env, the
//! start command: the Docker driver gives the start command to the container, not the image), or
//! anything secret.

use sha2::{Digest, Sha256};

/// Bumped whenever the image an agent builds from the same inputs changes (the generated Dockerfile's
/// shape, the labels), so an image of the old shape is never taken for one of the new.
const VERSION: &str = "cairn build v3";

/// The build inputs of an image, besides its source commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recipe<'a> {
    /// Built with the app's own `Dockerfile` (else a generated one, or the process driver's commands).
    pub dockerfile: bool,
    /// The generated Dockerfile's base image.
    pub base_image: Option<&'a str>,
    /// Build commands, in order.
    pub commands: &'a [String],
}

/// The build key of `source_commit` built with `recipe`: 32 lowercase hex digits (a valid Docker tag).
pub fn build_key(source_commit: &str, recipe: Recipe<'_>) -> String {
    let mut h = Sha256::new();
    // Length-prefixed fields: no two different inputs write the same bytes.
    let mut field = |b: &[u8]| {
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    };
    field(VERSION.as_bytes());
    field(source_commit.as_bytes());
    field(if recipe.dockerfile {
        b"dockerfile"
    } else {
        b"generated"
    });
    match recipe.base_image {
        Some(base) => field(format!("base {base}").as_bytes()),
        None => field(b"no base"),
    }
    field(&(recipe.commands.len() as u64).to_be_bytes());
    for c in recipe.commands {
        field(c.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    const C1: &str = "0123456789abcdef0123456789abcdef01234567";
    const C2: &str = "89abcdef0123456789abcdef0123456789abcdef";

    fn key(commit: &str, dockerfile: bool, base: Option<&str>, commands: &[&str]) -> String {
        let commands: Vec<String> = commands.iter().map(|c| c.to_string()).collect();
        build_key(
            commit,
            Recipe {
                dockerfile,
                base_image: base,
                commands: &commands,
            },
        )
    }

    #[test]
    fn a_key_is_a_docker_tag_and_stable() {
        let k = key(C1, false, Some("debian:12"), &["make"]);
        assert_eq!(k.len(), 32);
        assert!(
            k.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_eq!(k, key(C1, false, Some("debian:12"), &["make"]));
    }

    #[test]
    fn every_build_input_changes_the_key() {
        let base = key(C1, false, Some("debian:12"), &["make", "make install"]);
        for (what, other) in [
            (
                "source commit",
                key(C2, false, Some("debian:12"), &["make", "make install"]),
            ),
            (
                "dockerfile",
                key(C1, true, Some("debian:12"), &["make", "make install"]),
            ),
            (
                "base image",
                key(C1, false, Some("debian:13"), &["make", "make install"]),
            ),
            (
                "no base image",
                key(C1, false, None, &["make", "make install"]),
            ),
            (
                "a command",
                key(C1, false, Some("debian:12"), &["make", "make check"]),
            ),
            (
                "command order",
                key(C1, false, Some("debian:12"), &["make install", "make"]),
            ),
            (
                "one command fewer",
                key(C1, false, Some("debian:12"), &["make"]),
            ),
            // Joining two commands into one is another recipe, whatever the bytes concatenate to.
            (
                "commands joined",
                key(C1, false, Some("debian:12"), &["makemake install"]),
            ),
            (
                "a command split",
                key(C1, false, Some("debian:12"), &["make", "make", "install"]),
            ),
        ] {
            assert_ne!(base, other, "{what} must change the key");
        }
    }
}
