//! App sources served as local git remotes: each subdirectory of an `--app-sources FROM=DIR` directory is
//! committed, as it is on disk, to a bare repository `<state>/git/<name>.git` (branch `main`), and the
//! URL rewrite `FROM=file://<state>/git/` makes the manifests' `FROM<name>.git` fetch from it. Nothing is
//! written into the source directory (the index lives in the bare repository); a commit is made only
//! when the tree differs from the branch's head, so calling [`Sources::publish`] again is how an edit to
//! an app's files becomes a new head, and so a new release.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use cairn_schema::source::Rewrite;

/// One `FROM=DIR` mapping.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub from: String,
    pub dir: PathBuf,
}

impl Mapping {
    pub fn parse(arg: &str) -> Result<Mapping> {
        let Some((from, dir)) = arg.split_once('=') else {
            bail!(
                "--app-sources `{arg}`: expected FROM=DIR, e.g. https://github.com/acme/=../apps"
            );
        };
        if from.is_empty() || !from.ends_with('/') {
            bail!(
                "--app-sources `{arg}`: FROM must be a URL prefix ending in `/` (the app's name and \
                 `.git` follow it)"
            );
        }
        let dir = Path::new(dir)
            .canonicalize()
            .with_context(|| format!("--app-sources `{arg}`: cannot open the directory {dir}"))?;
        if !dir.is_dir() {
            bail!(
                "--app-sources `{arg}`: {} is not a directory",
                dir.display()
            );
        }
        Ok(Mapping {
            from: from.to_owned(),
            dir,
        })
    }
}

/// The bare repositories of every mapped app source, and the rewrites that point at them.
#[derive(Debug)]
pub struct Sources {
    root: PathBuf,
    mappings: Vec<Mapping>,
    /// The bare repository and source directory of each app source, by repository name.
    repos: BTreeMap<String, (PathBuf, PathBuf)>,
}

impl Sources {
    /// `root` is where the bare repositories go (`<state>/git`).
    pub fn new(root: PathBuf, mappings: Vec<Mapping>) -> Result<Sources> {
        std::fs::create_dir_all(&root)
            .with_context(|| format!("cannot create {}", root.display()))?;
        let mut repos = BTreeMap::new();
        for m in &mappings {
            let entries = std::fs::read_dir(&m.dir)
                .with_context(|| format!("cannot list {}", m.dir.display()))?;
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !entry.file_type()?.is_dir() || name.starts_with('.') {
                    continue;
                }
                let bare = root.join(format!("{name}.git"));
                if let Some((_, other)) = repos.insert(name.clone(), (bare, entry.path())) {
                    bail!(
                        "two app sources are named `{name}`: {} and {}",
                        other.display(),
                        entry.path().display()
                    );
                }
            }
        }
        Ok(Sources {
            root,
            mappings,
            repos,
        })
    }

    /// `FROM=file://<root>/` for each mapping, for `--git-rewrite`.
    pub fn rewrites(&self) -> Vec<Rewrite> {
        self.mappings
            .iter()
            .map(|m| Rewrite {
                from: m.from.clone(),
                to: format!("file://{}/", self.root.display()),
            })
            .collect()
    }

    /// The names of the app sources.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.repos.keys().map(String::as_str)
    }

    /// Commits every source directory whose files changed since its last commit. Returns the names of
    /// the sources that got a new commit.
    pub fn publish(&self) -> Result<Vec<String>> {
        let mut changed = Vec::new();
        for (name, (bare, dir)) in &self.repos {
            if publish_one(bare, dir).with_context(|| {
                format!(
                    "cannot commit the app source {} to {}",
                    dir.display(),
                    bare.display()
                )
            })? {
                changed.push(name.clone());
            }
        }
        Ok(changed)
    }
}

/// Commits `dir`'s files to `bare`'s `main` unless its tree is already there. Plumbing only (no hooks,
/// no signing, no user configuration of author or editor), with the index kept inside `bare`.
fn publish_one(bare: &Path, dir: &Path) -> Result<bool> {
    if !bare.join("HEAD").is_file() {
        run(Command::new("git")
            .args(["init", "--quiet", "--bare"])
            .arg(bare))?;
        run(git(bare, dir).args(["symbolic-ref", "HEAD", "refs/heads/main"]))?;
    }
    run(git(bare, dir).args(["add", "--all", "."]))?;
    let tree = run(git(bare, dir).arg("write-tree"))?;
    let parent = git(bare, dir)
        .args(["rev-parse", "--quiet", "--verify", "refs/heads/main^{tree}"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if parent.as_deref() == Some(tree.as_str()) {
        return Ok(false);
    }
    let mut commit = git(bare, dir);
    commit.args(["commit-tree", "--no-gpg-sign", &tree, "-m"]);
    commit.arg(format!("cairn dev: {}", dir.display()));
    if parent.is_some() {
        commit.args(["-p", "refs/heads/main"]);
    }
    let id = run(&mut commit)?;
    run(git(bare, dir).args(["update-ref", "refs/heads/main", &id]))?;
    Ok(true)
}

fn git(bare: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.env("GIT_DIR", bare)
        .env("GIT_WORK_TREE", dir)
        .env("GIT_INDEX_FILE", bare.join("cairn-dev-index"))
        .env("GIT_AUTHOR_NAME", "cairn dev")
        .env("GIT_AUTHOR_EMAIL", "dev@cairn.invalid")
        .env("GIT_COMMITTER_NAME", "cairn dev")
        .env("GIT_COMMITTER_EMAIL", "dev@cairn.invalid")
        .current_dir(dir);
    cmd
}

/// Runs a git command; its trimmed stdout, or an error with its stderr.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().context("cannot run git (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_committed_once_per_change() {
        let tmp = tempfile::tempdir().unwrap();
        let apps = tmp.path().join("apps");
        std::fs::create_dir_all(apps.join("hello/www")).unwrap();
        std::fs::write(apps.join("hello/www/index.html"), "hi").unwrap();
        let m = Mapping::parse(&format!("https://github.com/acme/={}", apps.display())).unwrap();
        let s = Sources::new(tmp.path().join("git"), vec![m]).unwrap();
        assert_eq!(s.names().collect::<Vec<_>>(), ["hello"]);
        // As the `--git-rewrite` argument serve and the agents are given.
        assert_eq!(
            s.rewrites()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            [format!(
                "https://github.com/acme/=file://{}/",
                tmp.path().join("git").display()
            )]
        );
        assert_eq!(s.publish().unwrap(), ["hello"]);
        assert!(s.publish().unwrap().is_empty(), "nothing changed");
        std::fs::write(apps.join("hello/www/index.html"), "hello").unwrap();
        assert_eq!(s.publish().unwrap(), ["hello"]);
        let bare = tmp.path().join("git/hello.git");
        let log = run(Command::new("git").arg("--git-dir").arg(&bare).args([
            "log",
            "--format=%s",
            "main",
        ]))
        .unwrap();
        assert_eq!(log.lines().count(), 2, "{log}");
        let show = run(Command::new("git")
            .arg("--git-dir")
            .arg(&bare)
            .args(["show", "main:www/index.html"]))
        .unwrap();
        assert_eq!(show, "hello");
        assert!(
            !apps.join("hello/.git").exists(),
            "nothing is written into the source"
        );
    }

    #[test]
    fn bad_mappings_say_what_is_expected() {
        let e = Mapping::parse("https://github.com/acme")
            .unwrap_err()
            .to_string();
        assert!(e.contains("FROM=DIR"), "{e}");
        let e = Mapping::parse("https://github.com/acme=/tmp")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ending in `/`"), "{e}");
        let e = Mapping::parse("https://github.com/acme/=/nonexistent/dir")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/dir"), "{e}");
    }
}
