//! The generated repository the reconciler benchmarks share (`git_plan`, `scale`, `dashboard`): 10 plans, 4
//! runtimes, 100 nodes in 3 regions (large enough for every replica), apps at 100 per file, committed with
//! the `git` CLI and pushed to a local bare repository.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use cairn_reconciler::source::git::GitSource;

/// The app `a` as its file declares it; `level` is its LOG_LEVEL (what an incremental commit changes).
pub fn app(a: usize, level: &str) -> String {
    format!(
        "[app.app-{a}]\nplan = \"p{}\"\nruntime = \"{}\"\nreplicas = {}\ndomains = [\"app-{a}.example.org\"]\n\n\
         [app.app-{a}.source]\nurl = \"https://github.com/acme/app-{a}.git\"\nbranch = \"main\"\n\n\
         [app.app-{a}.placement]\nregion = \"r{}\"\n\n[app.app-{a}.env]\nLOG_LEVEL = \"{level}\"\nWORKERS = \"4\"\n\n",
        a % 10,
        ["node", "python", "php", "docker"][a % 4],
        1 + a % 3,
        a % 3
    )
}

/// The repository shape of the `plan` and schema `load` benchmarks: 10 plans, 4 runtimes, 100 nodes in
/// 3 regions (large enough for every replica), `apps` apps at 100 per file.
pub fn generate(apps: usize) -> Vec<(String, String)> {
    let mut files = vec![(
        "cairn.toml".to_owned(),
        "base_domain = \"apps.example.com\"\ncurrency = \"EUR\"\n".to_owned(),
    )];
    let mut infra = String::new();
    for p in 0..10 {
        infra += &format!(
            "[plan.p{p}]\ncpu = 0.{}\nmemory = \"{}MiB\"\ndisk = \"5GiB\"\nprice = \"{p}.50\"\nmax_replicas = 10\n\n",
            p + 1,
            256 * (p + 1)
        );
    }
    for r in ["node", "python", "php"] {
        infra += &format!(
            "[runtime.{r}]\nimage = \"{r}:latest\"\nbuild = [\"make\"]\nstart = \"run\"\nport = 8080\n\n"
        );
    }
    infra += "[runtime.docker]\ndockerfile = true\nport = 8080\n\n";
    for n in 0..100 {
        infra += &format!(
            "[node.n{n}]\ncpu = 2048\nmemory = \"8TiB\"\ndisk = \"1PiB\"\nregion = \"r{}\"\nlabels = {{ disk = \"ssd\" }}\n\n",
            n % 3
        );
    }
    files.push(("infra.toml".to_owned(), infra));
    for chunk in 0..apps.div_ceil(100) {
        let text: String = (chunk * 100..((chunk + 1) * 100).min(apps))
            .map(|a| app(a, "info"))
            .collect();
        files.push((format!("apps/{chunk:05}.toml"), text));
    }
    files
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=Cairn Bench",
            "-c",
            "user.email=bench@cairn.invalid",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("git prints UTF-8")
        .trim()
        .to_owned()
}

/// A work tree pushing to a bare repository, both in a temporary directory.
pub struct Remote {
    pub tmp: tempfile::TempDir,
    pub work: PathBuf,
    pub url: String,
}

impl Remote {
    pub fn new(files: &[(String, String)]) -> Remote {
        let tmp = tempfile::tempdir().expect("a temporary directory");
        let bare = tmp.path().join("config.git");
        let work = tmp.path().join("work");
        for d in [&bare, &work] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        git(&bare, &["init", "--bare", "-q"]);
        git(&work, &["init", "-q"]);
        git(
            &work,
            &[
                "remote",
                "add",
                "origin",
                bare.to_str().expect("UTF-8 path"),
            ],
        );
        let r = Remote {
            url: format!("file://{}", bare.display()),
            tmp,
            work,
        };
        for (path, text) in files {
            r.write(path, text);
        }
        r.commit("generated");
        r
    }

    pub fn write(&self, path: &str, text: &str) {
        let p = self.work.join(path);
        std::fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    }

    pub fn commit(&self, msg: &str) -> String {
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "-m", msg]);
        git(&self.work, &["push", "-q", "origin", "HEAD:main"]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    /// Commits and pushes a change of one app's `LOG_LEVEL` in its file, for run `run` of a series: a
    /// different file each run, from file `first` on, round the files again when there are more runs
    /// than files (the same app of a file each time, with a level it has not had), and a file never
    /// committed before (a new blob). Returns the app's number.
    pub fn commit_one_change(&self, apps: usize, run: usize, first: usize) -> usize {
        let chunks = apps.div_ceil(100);
        let (chunk, lap) = ((first + run) % chunks, (first + run) / chunks);
        // One app per file, its level new on every lap through the files: each commit changes exactly
        // one app, however many runs there are.
        let a = chunk * 100 + (chunk * 37) % (apps - chunk * 100).min(100);
        let level = format!("debug-{lap}");
        let text: String = (chunk * 100..((chunk + 1) * 100).min(apps))
            .map(|i| app(i, if i == a { &level } else { "info" }))
            .collect::<String>()
            + &format!("# run {run}\n");
        self.write(&format!("apps/{chunk:05}.toml"), &text);
        self.commit(&format!("app-{a}: debug"));
        a
    }

    pub fn source(&self, cache: &str) -> GitSource {
        GitSource::new(self.url.clone(), "main", self.tmp.path().join(cache))
    }
}

/// The branch head every generated app's source is recorded at (no source repository is read).
pub const HEAD: &str = "fedcba9876543210fedcba9876543210fedcba98";

/// Records `main` at [`HEAD`] as the branch head of apps `app-0` to `app-{apps - 1}`.
pub async fn record_heads(pool: &sqlx::PgPool, apps: usize) {
    let heads: Vec<_> = (0..apps)
        .map(|a| {
            (
                format!("app-{a}").parse().expect("a name"),
                "main".to_owned(),
                cairn_plan::observed::CommitId::new(HEAD),
            )
        })
        .collect();
    cairn_reconciler::store::state::record_source_heads(pool, &heads)
        .await
        .expect("heads recorded");
}
