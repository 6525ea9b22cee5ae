//! Where the config repository declares each app and node (`path:line`), for the dashboard's link to
//! the file and line in git: what a user changes instead of editing on the page.
//!
//! After each apply the controller writes the rows whose place moved (`declarations`, each with the
//! commit whose file has it there), comparing with what it wrote last, kept in memory: a commit that
//! touches one file writes at most that file's resources, and an idle pass writes nothing. The first
//! write after a start reads the stored rows once instead. Every control plane's pages read the table,
//! so all of them show the same line.

use std::collections::BTreeMap;
use std::sync::Arc;

use cairn_schema::model::Origin;
use cairn_schema::{Kind, Name};
use sqlx::PgPool;

use crate::store::StoreError;
use crate::store::declarations as store;

/// The kinds with a page of their own, so a declaration worth storing.
const KINDS: [Kind; 2] = [Kind::App, Kind::Node];

/// What this control plane last wrote; cheap to clone (one shared cell).
#[derive(Debug, Clone, Default)]
pub struct Declarations(Arc<tokio::sync::Mutex<Option<Written>>>);

/// Each resource's file and line.
type Places = BTreeMap<(Kind, Name), (String, u32)>;

/// Declarations that moved, with where they are now.
type Moved<'a> = Vec<(&'a (Kind, Name), &'a Origin)>;

#[derive(Debug)]
struct Written {
    commit: String,
    at: Places,
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
    /// Stores where `commit` declares its apps and nodes: the rows that moved since the last call
    /// (all of them after a start, against what the table holds), and deletes those gone.
    pub async fn record(
        &self,
        pool: &PgPool,
        commit: &str,
        origins: &BTreeMap<(Kind, Name), Origin>,
    ) -> Result<(), StoreError> {
        let mut last = self.0.lock().await;
        if last.as_ref().is_some_and(|w| w.commit == commit) || commit.is_empty() {
            return Ok(());
        }
        let mut at = match last.take() {
            Some(w) => w.at,
            None => stored(pool).await?,
        };
        let (moved, gone) = changes(origins, &at);
        if !moved.is_empty() || !gone.is_empty() {
            let gone_rows: Vec<(&str, &str)> =
                gone.iter().map(|(k, n)| (k.as_str(), n.as_str())).collect();
            let moved_rows: Vec<(&str, &str, &str, i32)> = moved
                .iter()
                .map(|((k, n), o)| {
                    (
                        k.as_str(),
                        n.as_str(),
                        o.path.as_str(),
                        i32::try_from(line(o)).unwrap_or(i32::MAX),
                    )
                })
                .collect();
            store::write(pool, commit, &gone_rows, &moved_rows).await?;
        }
        for k in &gone {
            at.remove(k);
        }
        for (k, o) in moved {
            at.insert(k.clone(), (o.path.clone(), line(o)));
        }
        *last = Some(Written {
            commit: commit.to_owned(),
            at,
        });
        Ok(())
    }
}

/// A declaration's line as stored (1 at least).
fn line(o: &Origin) -> u32 {
    u32::try_from(o.line).unwrap_or(u32::MAX).max(1)
}

/// The declarations of `origins` that moved (or are new) since `at`, and those gone from it: one walk of
/// both in key order, so a commit of one file among 1,000 copies that file's resources, not 100,000.
fn changes<'a>(
    origins: &'a BTreeMap<(Kind, Name), Origin>,
    at: &Places,
) -> (Moved<'a>, Vec<(Kind, Name)>) {
    let mut now = origins
        .iter()
        .filter(|((kind, _), _)| KINDS.contains(kind))
        .peekable();
    let mut was = at.iter().peekable();
    let (mut moved, mut gone) = (Vec::new(), Vec::new());
    loop {
        match (now.peek(), was.peek()) {
            (Some((k, o)), Some((w, (path, l)))) => match (*k).cmp(*w) {
                std::cmp::Ordering::Less => {
                    moved.push((*k, *o));
                    now.next();
                }
                std::cmp::Ordering::Greater => {
                    gone.push((*w).clone());
                    was.next();
                }
                std::cmp::Ordering::Equal => {
                    if o.path != *path || line(o) != *l {
                        moved.push((*k, *o));
                    }
                    now.next();
                    was.next();
                }
            },
            (Some((k, o)), None) => {
                moved.push((*k, *o));
                now.next();
            }
            (None, Some((w, _))) => {
                gone.push((*w).clone());
                was.next();
            }
            (None, None) => break,
        }
    }
    (moved, gone)
}

/// Every stored declaration.
async fn stored(pool: &PgPool) -> Result<Places, StoreError> {
    let rows = store::all(pool).await?;
    Ok(rows
        .into_iter()
        .filter_map(|(kind, name, path, line)| {
            let kind = KINDS.into_iter().find(|k| k.as_str() == kind)?;
            Some((
                (kind, Name::new(&name).ok()?),
                (path, u32::try_from(line).ok()?),
            ))
        })
        .collect())
}

/// Where `name` is declared, with a link to that line when `browse` (the repository's web address,
/// `https://github.com/acme/platform`) is known; `None` before any apply recorded it.
pub async fn lookup(
    pool: &PgPool,
    kind: Kind,
    name: &Name,
    browse: Option<&str>,
) -> Result<Option<Declared>, StoreError> {
    let row = store::one(pool, kind.as_str(), name.as_str()).await?;
    Ok(row.map(|(commit, path, line)| Declared {
        at: format!("{path}:{line}"),
        href: browse.map(|base| {
            format!(
                "{}/blob/{}/{}#L{line}",
                base.trim_end_matches('/'),
                url_path(&commit),
                url_path(&path)
            )
        }),
    }))
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

/// A repository path as a URL path: each byte percent-encoded except unreserved characters and `/`.
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
    fn paths_are_percent_encoded() {
        assert_eq!(url_path("apps/my web#1.toml"), "apps/my%20web%231.toml");
    }
}
