//! Where the applied commit declares each app and node (`path:line`), for the dashboard's link to the
//! file and line in git: what a user changes instead of editing on the page.
//!
//! The controller publishes the origins of each commit it applies (it holds them from validation); the
//! dashboard reads them only for the commit the database says is applied, so a page never links to a
//! line of another commit. A control plane that has not applied anything since it started (or a
//! directory source, which has no commit to link) shows the declaration without a line.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use cairn_schema::model::Origin;
use cairn_schema::{Kind, Name};

/// The origins of the last commit this control plane applied; cheap to clone (one shared cell).
#[derive(Debug, Clone, Default)]
pub struct Declarations(Arc<RwLock<Option<Arc<Published>>>>);

#[derive(Debug)]
struct Published {
    commit: String,
    origins: BTreeMap<(Kind, Name), Origin>,
}

/// Where a resource is declared, and the web address of that line when the repository has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    /// `apps/web.toml:3`.
    pub at: String,
    /// `https://github.com/acme/platform/blob/<commit>/apps/web.toml#L3`.
    pub href: Option<String>,
}

impl Declarations {
    /// Records the apps' and nodes' origins of `commit` (the other kinds have no page). Does nothing
    /// when `commit` is already published: an idle tick copies nothing.
    pub fn publish(&self, commit: &str, origins: &BTreeMap<(Kind, Name), Origin>) {
        if self.read().is_some_and(|p| p.commit == commit) {
            return;
        }
        let origins = origins
            .iter()
            .filter(|((kind, _), _)| matches!(kind, Kind::App | Kind::Node))
            .map(|(k, o)| (k.clone(), o.clone()))
            .collect();
        let published = Arc::new(Published {
            commit: commit.to_owned(),
            origins,
        });
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(published);
    }

    /// Where `applied` (the commit the database says is applied) declares `name`; `browse` is the
    /// repository's web address (`https://github.com/acme/platform`), when it has one.
    pub fn lookup(
        &self,
        applied: Option<&str>,
        kind: Kind,
        name: &Name,
        browse: Option<&str>,
    ) -> Option<Declared> {
        let p = self.read()?;
        let applied = applied?;
        if p.commit != applied {
            return None;
        }
        let o = p.origins.get(&(kind, name.clone()))?;
        Some(Declared {
            at: format!("{}:{}", o.path, o.line),
            href: browse.map(|base| {
                format!(
                    "{}/blob/{applied}/{}#L{}",
                    base.trim_end_matches('/'),
                    url_path(&o.path),
                    o.line
                )
            }),
        })
    }

    fn read(&self) -> Option<Arc<Published>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The web address of a git remote on a forge that serves `<repo>/blob/<commit>/<path>` (GitHub, and
/// Gitea/Forgejo alike): `https://github.com/acme/platform.git` and `git@github.com:acme/platform.git`
/// both give `https://github.com/acme/platform`. `None` for anything else (a directory, a host we
/// cannot tell serves such pages): `cairn serve --config-browse-url` says it then.
pub fn browse_url(repo: &str) -> Option<String> {
    let rest = repo
        .strip_prefix("https://github.com/")
        .or_else(|| repo.strip_prefix("ssh://git@github.com/"))
        .or_else(|| repo.strip_prefix("git@github.com:"))?;
    let rest = rest.trim_end_matches('/');
    let rest = rest.strip_suffix(".git").unwrap_or(rest);
    let mut parts = rest.split('/');
    let (owner, name) = (parts.next()?, parts.next()?);
    let fine = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    (parts.next().is_none() && fine(owner) && fine(name))
        .then(|| format!("https://github.com/{owner}/{name}"))
}

/// A repository path as a URL path: each segment percent-encoded except unreserved characters.
fn url_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browse_urls_of_github_remotes_only() {
        for repo in [
            "https://github.com/acme/platform",
            "https://github.com/acme/platform.git",
            "git@github.com:acme/platform.git",
            "ssh://git@github.com/acme/platform.git",
        ] {
            assert_eq!(
                browse_url(repo).as_deref(),
                Some("https://github.com/acme/platform"),
                "{repo}"
            );
        }
        for repo in [
            "/srv/config",
            "https://gitlab.com/acme/platform",
            "https://github.com/acme",
            "https://github.com/acme/platform/tree/main",
            "https://github.com/acme/plat\"form",
        ] {
            assert_eq!(browse_url(repo), None, "{repo}");
        }
    }

    #[test]
    fn a_line_is_shown_only_for_the_applied_commit() {
        let d = Declarations::default();
        let name = Name::new("web").unwrap();
        let origin = |path: &str, line| Origin {
            path: path.to_owned(),
            line,
            col: 1,
        };
        let origins = BTreeMap::from([
            ((Kind::App, name.clone()), origin("apps/my web.toml", 2)),
            ((Kind::Plan, name.clone()), origin("plans.toml", 9)),
        ]);
        assert_eq!(d.lookup(Some("c1"), Kind::App, &name, None), None);
        d.publish("c1", &origins);
        assert_eq!(
            d.lookup(Some("c1"), Kind::Plan, &name, None),
            None,
            "plans have no page"
        );
        let got = d
            .lookup(
                Some("c1"),
                Kind::App,
                &name,
                Some("https://github.com/acme/platform"),
            )
            .unwrap();
        assert_eq!(got.at, "apps/my web.toml:2");
        assert_eq!(
            got.href.as_deref(),
            Some("https://github.com/acme/platform/blob/c1/apps/my%20web.toml#L2")
        );
        assert_eq!(d.lookup(Some("c2"), Kind::App, &name, None), None);
        assert_eq!(d.lookup(None, Kind::App, &name, None), None);
    }
}
