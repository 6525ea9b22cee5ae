//! The git source against a real bare repository that the real `git` CLI commits and pushes to.

use cairn_reconciler::source::git::{GitError, GitSource};

use cairn_testkit::{fixtures, git};

/// A bare "remote" and a work tree that pushes to it.
struct Remote {
    _tmp: tempfile::TempDir,
    bare: std::path::PathBuf,
    work: std::path::PathBuf,
    cache: std::path::PathBuf,
}

impl Remote {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let bare = tmp.path().join("config.git");
        let work = tmp.path().join("work");
        std::fs::create_dir_all(&bare).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        git(&bare, &["init", "--bare", "-q"]);
        git(&work, &["init", "-q"]);
        git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
        let cache = tmp.path().join("cache");
        Remote {
            _tmp: tmp,
            bare,
            work,
            cache,
        }
    }

    fn write(&self, path: &str, text: &str) {
        let p = self.work.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn commit(&self, msg: &str) -> String {
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "-m", msg]);
        git(&self.work, &["push", "-q", "origin", "HEAD:main"]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    fn url(&self) -> String {
        format!("file://{}", self.bare.display())
    }
}

fn app(name: &str, replicas: u32) -> String {
    format!(
        "[app.{name}]\nplan = \"small\"\nruntime = \"node\"\nreplicas = {replicas}\n[app.{name}.source]\nurl = \"https://github.com/acme/{name}.git\"\n"
    )
}

fn infra() -> String {
    let plan = fixtures::plan("small").price("5").max_replicas(3);
    format!("{plan}\n{}", fixtures::node_runtime().start("node ."))
}

fn seeded() -> Remote {
    let r = Remote::new();
    r.write("cairn.toml", &fixtures::settings().to_string());
    r.write("infra.toml", &infra());
    for i in 0..5 {
        r.write(&format!("apps/app{i}.toml"), &app(&format!("app{i}"), 1));
    }
    r.write("README.md", "not a manifest\n");
    r
}

#[test]
fn a_new_commit_is_picked_up_and_one_changed_file_is_parsed_once() {
    let r = seeded();
    let first = r.commit("initial");
    let mut src = GitSource::new(r.url(), "main", &r.cache);
    let head = src.fetch().expect("fetch");
    assert_eq!(head.to_string(), first);
    let snap = src.load(head).unwrap();
    assert_eq!(snap.commit.as_deref(), Some(first.as_str()));
    let desired = snap
        .loaded
        .desired
        .as_ref()
        .unwrap_or_else(|| panic!("{}", snap.loaded.diagnostics));
    assert_eq!(desired.apps.len(), 5);
    assert_eq!(src.parse_count(), 7, "cairn.toml, infra.toml and five apps");

    // Loading the same commit again parses nothing.
    src.load(head).unwrap();
    assert_eq!(src.parse_count(), 7);

    r.write("apps/app3.toml", &app("app3", 3));
    let second = r.commit("scale app3");
    let head2 = src.fetch().unwrap();
    assert_eq!(head2.to_string(), second);
    let snap2 = src.load(head2).unwrap();
    assert_eq!(src.parse_count(), 8, "only apps/app3.toml is parsed again");
    let d2 = snap2.loaded.desired.unwrap();
    assert_eq!(d2.apps["app3"].replicas, 3);
    assert_eq!(d2.apps["app1"].replicas, 1);
}

#[test]
fn an_invalid_commit_is_reported_with_locations() {
    let r = seeded();
    r.commit("initial");
    r.write("apps/app1.toml", &app("app1", 1).replace("small", "smal"));
    r.commit("typo");
    let mut src = GitSource::new(r.url(), "main", &r.cache);
    let head = src.fetch().unwrap();
    let snap = src.load(head).unwrap();
    assert!(snap.loaded.desired.is_none());
    let text = snap.loaded.diagnostics.to_string();
    assert!(
        text.contains("apps/app1.toml:2:8: error: unknown plan `smal`"),
        "{text}"
    );
}

#[test]
fn symlinks_leaving_the_repository_are_refused() {
    let r = seeded();
    std::os::unix::fs::symlink("../../etc/passwd.toml", r.work.join("apps/escape.toml")).unwrap();
    std::os::unix::fs::symlink("app1.toml", r.work.join("apps/alias.toml")).unwrap();
    r.commit("links");
    let mut src = GitSource::new(r.url(), "main", &r.cache);
    let head = src.fetch().unwrap();
    let text = src.load(head).unwrap().loaded.diagnostics.to_string();
    assert!(
        text.contains("apps/escape.toml: error: symlink points outside the repository"),
        "{text}"
    );
    // A link inside the repository is followed: app1 is then declared twice.
    assert!(
        text.contains("apps/app1.toml:1:6: error: duplicate app `app1`")
            || text.contains("apps/alias.toml:1:6: error: duplicate app `app1`"),
        "{text}"
    );
}

/// A source kept for a hundred commits, each fetched and loaded, as `cairn serve` keeps one:
/// - every fetch succeeds (a cache handle kept open ran out of pack slots at the 33rd fetch, each fetch
///   adding a pack: `InsufficientSlots`);
/// - the parse cache, trimmed to what the latest commit uses once it has grown, keeps a manifest reached
///   through a link by the blob it reads, like any other (it was dropped, and parsed again, when the trim
///   looked at the link's own blob).
#[test]
fn trimming_the_parse_cache_keeps_every_file_of_the_latest_commit_links_included() {
    let r = seeded();
    r.write("extra.txt", &app("extra", 1));
    std::os::unix::fs::symlink("../extra.txt", r.work.join("apps/alias.toml")).unwrap();
    r.commit("a manifest through a link");
    let mut src = GitSource::new(r.url(), "main", &r.cache);
    let head = src.fetch().unwrap();
    let snap = src.load(head).unwrap();
    let d = snap
        .loaded
        .desired
        .as_ref()
        .unwrap_or_else(|| panic!("{}", snap.loaded.diagnostics));
    assert!(d.apps.contains_key("extra"), "the link is followed");
    drop(snap);
    // One-file commits, each loaded: the cache (8 files live) grows by one parse a commit until it is
    // trimmed, and every load parses that one file only, before the trim and after it.
    for n in 2..=100 {
        let parsed = src.parse_count();
        r.write("apps/app0.toml", &format!("{}# {n}\n", app("app0", 1)));
        r.commit(&format!("commit {n}"));
        let head = src.fetch().unwrap();
        src.load(head).unwrap();
        assert_eq!(
            src.parse_count(),
            parsed + 1,
            "commit {n}: only apps/app0.toml is parsed"
        );
    }
}

/// The `pack-*.pack` files in a cache.
fn packs(cache: &std::path::Path) -> usize {
    std::fs::read_dir(cache.join("objects/pack"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_str().unwrap();
            name.starts_with("pack-") && name.ends_with(".pack")
        })
        .count()
}

/// gix writes every fetch that brings objects as a pack of its own, and each pack made every later fetch
/// and lookup of a long-lived cache a little slower. Once fetches have left more than 50
/// (`source::pack::REPACK_AT`), the cache is repacked into one: after 60 one-commit fetches it holds a
/// few packs, and every commit fetched before, the first included, still reads whole, through the kept
/// source and through a new one on the same cache (what a restart sees).
#[test]
fn a_cache_that_fetches_leave_many_packs_is_repacked_and_every_commit_still_reads() {
    let r = seeded();
    let mut commits = vec![r.commit("initial")];
    let mut src = GitSource::new(r.url(), "main", &r.cache);
    src.fetch().unwrap();
    let mut most = 0;
    for n in 1..=60 {
        r.write("apps/app0.toml", &format!("{}# {n}\n", app("app0", 1)));
        commits.push(r.commit(&format!("commit {n}")));
        let head = src.fetch().unwrap();
        assert_eq!(Some(&head.to_string()), commits.last(), "commit {n}");
        most = most.max(packs(&r.cache));
    }
    assert!(most >= 45, "each fetch wrote a pack (at most {most} seen)");
    let left = packs(&r.cache);
    assert!(
        (1..=11).contains(&left),
        "{left} packs after 61 fetches: repacked once past 50"
    );
    let mut restarted = GitSource::new(r.url(), "main", &r.cache);
    for (i, commit) in commits.iter().enumerate() {
        let id = gix::ObjectId::from_hex(commit.as_bytes()).unwrap();
        for source in [&mut src, &mut restarted] {
            assert!(source.has_commit(commit), "commit {i} is in the cache");
            let snap = source.load(id).unwrap();
            let d = snap
                .loaded
                .desired
                .as_ref()
                .unwrap_or_else(|| panic!("commit {i}: {}", snap.loaded.diagnostics));
            assert!(d.apps.contains_key("app0"), "commit {i}");
        }
    }
}

#[test]
fn a_missing_branch_is_a_clear_error() {
    let r = seeded();
    r.commit("initial");
    let mut src = GitSource::new(r.url(), "does-not-exist", &r.cache);
    match src.fetch() {
        Err(GitError::NoSuchRef { refname, .. }) => assert_eq!(refname, "does-not-exist"),
        other => panic!("expected NoSuchRef, got {other:?}"),
    }
}

#[test]
fn a_cache_survives_a_restart() {
    let r = seeded();
    let first = r.commit("initial");
    GitSource::new(r.url(), "main", &r.cache).fetch().unwrap();
    let mut again = GitSource::new(r.url(), "main", &r.cache);
    assert_eq!(
        again.resolve_cached().unwrap().map(|c| c.to_string()),
        Some(first)
    );
}

#[test]
fn branch_heads_are_read_through_rewrites_without_fetching() {
    use cairn_reconciler::source::heads::{HeadError, HeadPoller};
    use cairn_schema::source::Rewrites;
    let r = seeded();
    let first = r.commit("initial");
    let tmp = tempfile::tempdir().unwrap();
    let rewrites = Rewrites::parse([format!(
        "https://github.com/acme/=file://{}/",
        r.bare.parent().unwrap().display()
    )])
    .unwrap();
    let mut poller = HeadPoller::new(tmp.path().join("scratch.git"), rewrites);
    let app: cairn_schema::Name = "web".parse().unwrap();
    // https://github.com/acme/config.git is rewritten to the local bare repository.
    assert_eq!(
        poller
            .head(&app, "https://github.com/acme/config.git", "main")
            .unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        poller
            .head(&app, "https://github.com/acme/config.git", "nope")
            .unwrap(),
        None
    );
    r.write("x.toml", "");
    let second = r.commit("second");
    assert_eq!(
        poller
            .head(&app, "https://github.com/acme/config.git", "main")
            .unwrap(),
        Some(second)
    );
    // Without a rewrite, a loopback URL from a manifest is refused before any connection.
    match poller.head(&app, "https://127.0.0.1/x.git", "main") {
        Err(HeadError::Refused { .. }) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A host name from a manifest that resolves to this machine is refused like the address itself: the
/// control plane used to check only the literal host, so `https://<its own host name>:PORT/...` passed
/// validation and was polled over loopback. Also the metadata service, and private addresses when the
/// operator refuses them.
#[test]
fn a_head_poller_refuses_names_that_resolve_to_loopback_metadata_or_private_addresses() {
    use cairn_reconciler::source::heads::{HeadError, HeadPoller};
    use cairn_schema::source::Rewrites;
    use std::net::IpAddr;
    fn fake(host: &str, _: u16) -> std::io::Result<Vec<IpAddr>> {
        Ok(match host {
            "this-host.example.com" => {
                vec!["203.0.113.7".parse().unwrap(), "127.0.1.1".parse().unwrap()]
            }
            "metadata.example.com" => vec!["169.254.169.254".parse().unwrap()],
            "intranet.example.com" => vec!["10.1.2.3".parse().unwrap()],
            _ => vec![],
        })
    }
    let tmp = tempfile::tempdir().unwrap();
    let app: cairn_schema::Name = "web".parse().unwrap();
    let mut poller =
        HeadPoller::new(tmp.path().join("scratch.git"), Rewrites::default()).with_resolver(fake);
    let refusal = |r: Result<Option<String>, HeadError>| match r {
        Err(HeadError::Refused { why, .. }) => why,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let why = refusal(poller.head(&app, "https://this-host.example.com:8443/x.git", "main"));
    assert!(why.contains("127.0.1.1 is a loopback address"), "{why}");
    let why = refusal(poller.head(&app, "ssh://git@metadata.example.com/x.git", "main"));
    assert!(why.contains("link-local"), "{why}");
    let why = refusal(poller.head(&app, "https://nowhere.example.com/x.git", "main"));
    assert!(why.contains("resolves to no address"), "{why}");
    // Private addresses are allowed by default (a Gitea on the LAN), refused when asked.
    match poller.head(&app, "https://intranet.example.com/x.git", "main") {
        Err(HeadError::List { .. }) => {} // checked, then the connection fails: nothing listens there
        other => panic!("expected the listing to be tried, got {other:?}"),
    }
    let mut strict = HeadPoller::new(tmp.path().join("strict.git"), Rewrites::default())
        .with_resolver(fake)
        .refuse_private(true);
    let why = refusal(strict.head(&app, "https://intranet.example.com/x.git", "main"));
    assert!(why.contains("10.1.2.3 is a private address"), "{why}");

    // The real resolver: this machine's own host name, when it resolves to loopback (as /etc/hosts has it
    // on Debian), is refused too.
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let name = name.trim();
    let resolved: Vec<std::net::IpAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(name, 443))
        .map(|a| a.map(|s| s.ip()).collect())
        .unwrap_or_default();
    let mut real = HeadPoller::new(tmp.path().join("real.git"), Rewrites::default());
    let result = real.head(&app, &format!("https://{name}:1/x.git"), "main");
    if resolved.iter().any(|ip| ip.is_loopback()) {
        let why = refusal(result);
        assert!(why.contains("loopback"), "{why}");
    }
}

/// The control plane's git reads see none of the machine's git configuration: a global
/// `url.<base>.insteadOf` that would send the config fetch elsewhere is not applied.
#[test]
fn the_config_fetch_ignores_the_machines_git_configuration() {
    let r = seeded();
    let first = r.commit("initial");
    let tmp = tempfile::tempdir().unwrap();
    let global = tmp.path().join("gitconfig");
    std::fs::write(
        &global,
        format!(
            "[url \"file:///nonexistent/elsewhere.git\"]\n\tinsteadOf = {}\n[http]\n\tproxy = http://127.0.0.1:9\n",
            r.url()
        ),
    )
    .unwrap();
    // The environment is the child's alone (setting it here would reach the other tests' threads).
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "git_source::config_fetch_child",
            "--nocapture",
            "--include-ignored",
        ])
        .env("GIT_CONFIG_GLOBAL", &global)
        .env("GIT_CONFIG_SYSTEM", &global)
        .env("CAIRN_TEST_FETCH_URL", r.url())
        .env("CAIRN_TEST_FETCH_CACHE", tmp.path().join("cache"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("fetched {first}")), "{stdout}");
}

/// Run by [`the_config_fetch_ignores_the_machines_git_configuration`] in an environment whose global git
/// configuration rewrites the URL away; fetches and prints the commit.
#[test]
#[ignore = "run by the_config_fetch_ignores_the_machines_git_configuration"]
fn config_fetch_child() {
    let url = std::env::var("CAIRN_TEST_FETCH_URL").unwrap();
    let cache = std::env::var("CAIRN_TEST_FETCH_CACHE").unwrap();
    // The git CLI honours the rewrite: proof that the configuration would apply if read.
    let probe = std::process::Command::new("git")
        .args(["ls-remote", &url])
        .output()
        .unwrap();
    assert!(
        !probe.status.success(),
        "the global config should break the git CLI's fetch"
    );
    let mut src = GitSource::new(url, "main", cache);
    let id = src.fetch().unwrap();
    println!("fetched {id}");
}

/// A fetch killed while it held a ref lock left `refs/cairn/heads/main.lock` in the cache, and every later
/// fetch failed ("A lock could not be obtained") until someone deleted it: the next fetch removes it.
#[test]
fn a_ref_lock_left_by_a_killed_fetch_does_not_stop_the_next_one() {
    let r = seeded();
    r.commit("initial");
    let mut src = GitSource::new(r.url(), "main", &r.cache);
    src.fetch().unwrap();
    let heads = r.cache.join("refs/cairn/heads");
    std::fs::create_dir_all(&heads).unwrap();
    std::fs::write(heads.join("main.lock"), b"").unwrap();
    std::fs::write(r.cache.join("packed-refs.lock"), b"").unwrap();
    r.write("x.toml", "");
    let second = r.commit("second");
    let mut restarted = GitSource::new(r.url(), "main", &r.cache);
    assert_eq!(restarted.fetch().unwrap().to_string(), second);
    assert!(!heads.join("main.lock").exists());
}

/// `[tls] ca_roots` names a PEM file of the repository: the snapshot carries its bytes; a commit that
/// drops it is invalid with the error at the name.
#[test]
fn files_the_manifests_name_are_read_from_the_commit() {
    let r = seeded();
    let settings = format!(
        "{}\n[tls]\nacme_directory = \"https://ca.example.test/dir\"\nca_roots = \"certs/ca.pem\"\n",
        fixtures::settings()
    );
    r.write("cairn.toml", &settings);
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    r.write("certs/ca.pem", pem);
    r.commit("tls with a private CA");
    let mut src = GitSource::new(r.url(), "main", &r.cache);
    let head = src.fetch().unwrap();
    let snap = src.load(head).unwrap();
    assert!(snap.loaded.desired.is_some(), "{}", snap.loaded.diagnostics);
    assert_eq!(
        snap.referenced.get("certs/ca.pem").map(|b| &b[..]),
        Some(pem.as_bytes())
    );

    git(&r.work, &["rm", "-q", "certs/ca.pem"]);
    r.commit("drop the CA");
    let head = src.fetch().unwrap();
    let snap = src.load(head).unwrap();
    assert!(snap.loaded.desired.is_none());
    let text = snap.loaded.diagnostics.to_string();
    assert!(
        text.contains("cairn.toml:")
            && text.contains(
                "`ca_roots` names `certs/ca.pem`, which is not in the repository at this commit"
            ),
        "{text}"
    );
}

/// The certificate worker's settings come from the snapshot: the directory, the contact and the
/// `ca_roots` file's contents.
#[test]
fn certificate_settings_come_from_the_snapshot() {
    let r = seeded();
    r.write(
        "cairn.toml",
        &format!(
            "{}\n[tls]\nacme_directory = \"https://ca.example.test/dir\"\ncontact = \"ops@example.test\"\nca_roots = \"ca.pem\"\n",
            fixtures::settings()
        ),
    );
    r.write(
        "ca.pem",
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    );
    r.commit("tls");
    let mut src = GitSource::new(r.url(), "main", &r.cache);
    let head = src.fetch().unwrap();
    let snap = src.load(head).unwrap();
    let s = cairn_reconciler::certs::CertSettings::from_snapshot(&snap).expect("[tls]");
    assert_eq!(s.directory, "https://ca.example.test/dir");
    assert_eq!(s.contact.as_deref(), Some("ops@example.test"));
    assert!(
        s.ca_roots_pem
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
}

/// Each commit read through the source (incrementally: the last snapshot's state updated in place)
/// against the same files assembled afresh: the same desired state and diagnostics, through a valid
/// start, a broken commit, its fix, a removed file, a moved app and a changed `cairn.toml`.
#[test]
fn incremental_loads_equal_full_assembly_across_commits() {
    use cairn_reconciler::source::{ConfigSource, Snapshot};
    let r = seeded();
    r.commit("initial");
    let mut src = ConfigSource::Git(GitSource::new(r.url(), "main", &r.cache));
    let check = |src: &mut ConfigSource, what: &str| -> bool {
        let snap = src.read().expect("read");
        let full = Snapshot::new(snap.commit.clone(), snap.files.clone(), Vec::new());
        assert_eq!(
            snap.loaded.diagnostics.0, full.loaded.diagnostics.0,
            "{what}: diagnostics"
        );
        assert_eq!(snap.loaded.desired, full.loaded.desired, "{what}: desired");
        snap.loaded.desired.is_some()
    };
    assert!(check(&mut src, "initial"));
    /// A commit: its message, the change, whether the result is valid.
    type Step = (&'static str, Box<dyn Fn(&Remote)>, bool);
    let steps: Vec<Step> = vec![
        (
            "scale app3",
            Box::new(|r| r.write("apps/app3.toml", &app("app3", 3))),
            true,
        ),
        (
            "typo",
            Box::new(|r| r.write("apps/app1.toml", &app("app1", 1).replace("small", "smal"))),
            false,
        ),
        (
            "fix",
            Box::new(|r| r.write("apps/app1.toml", &app("app1", 2))),
            true,
        ),
        (
            "too many",
            Box::new(|r| r.write("apps/app2.toml", &app("app2", 9))),
            false,
        ),
        (
            "remove",
            Box::new(|r| std::fs::remove_file(r.work.join("apps/app2.toml")).unwrap()),
            true,
        ),
        (
            "duplicate",
            Box::new(|r| r.write("apps/more.toml", &app("app4", 1))),
            false,
        ),
        (
            "move",
            Box::new(|r| std::fs::remove_file(r.work.join("apps/app4.toml")).unwrap()),
            true,
        ),
        (
            "settings",
            Box::new(|r| r.write("cairn.toml", "base_domain = \"other.example.com\"\n")),
            true,
        ),
        ("no plans", Box::new(|r| r.write("infra.toml", "")), false),
        (
            "plans back",
            Box::new(|r| r.write("infra.toml", &infra())),
            true,
        ),
    ];
    for (what, change, valid) in steps {
        change(&r);
        r.commit(what);
        assert_eq!(check(&mut src, what), valid, "{what}");
    }
    let ConfigSource::Git(g) = &src else {
        unreachable!()
    };
    assert_eq!(
        g.fresh_assemblies(),
        1,
        "every commit after the first was incremental"
    );
}

/// A caller that holds the snapshot by value hands it back; the next load is then incremental, and
/// equal to a full assembly.
#[test]
fn a_snapshot_handed_back_is_updated_in_place() {
    use cairn_reconciler::source::Snapshot;
    let r = seeded();
    r.commit("initial");
    let mut src = GitSource::new(r.url(), "main", &r.cache);
    let head = src.fetch().unwrap();
    let snap = src.load(head).unwrap();
    assert!(snap.loaded.desired.is_some());
    src.give_back(snap);
    r.write("apps/app0.toml", &app("app0", 2));
    r.commit("scale app0");
    let head = src.fetch().unwrap();
    let snap = src.load(head).unwrap();
    let full = Snapshot::new(snap.commit.clone(), snap.files.clone(), Vec::new());
    let d = snap.loaded.desired.as_ref().expect("valid");
    assert_eq!(d.apps["app0"].replicas, 2);
    assert_eq!(Some(d), full.loaded.desired.as_ref());
    assert_eq!(src.fresh_assemblies(), 1);
    // Not handed back: the next load starts afresh, with the same result.
    drop(snap);
    r.write("apps/app0.toml", &app("app0", 3));
    r.commit("scale app0 again");
    let head = src.fetch().unwrap();
    let snap = src.load(head).unwrap();
    assert_eq!(src.fresh_assemblies(), 2);
    assert_eq!(snap.loaded.desired.expect("valid").apps["app0"].replicas, 3);
}
