//! Planner behaviour and rendered snapshots, over desired states loaded from inline TOML with
//! `cairn_schema::load` and observed states produced by applying earlier plans ([`next_observed`]).

use std::collections::BTreeMap;

use cairn_schema::secret::encrypt;
use cairn_schema::{Desired, EnvValue, Identity, Name};
use chrono::{DateTime, Duration, Utc};

use super::render::{MarkdownOptions, json, markdown, text};
use super::*;
use crate::observed::{NodeStatus, ReleaseRecord, ReplicaState};

const DEMO_IDENTITY: &str = include_str!("../../examples/keys/demo-only-identity.txt");

fn identity() -> Identity {
    Identity::parse(DEMO_IDENTITY).unwrap()
}

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn commit(c: &str) -> CommitId {
    CommitId::new(c)
}

/// A secret env value encrypted to the demo identity (and `extra` recipients), as TOML.
fn secret(plaintext: &str, extra: &[&Identity]) -> String {
    let mut rcpts = vec![identity().recipient()];
    rcpts.extend(extra.iter().map(|i| i.recipient()));
    let ct = encrypt(plaintext.as_bytes(), &rcpts).unwrap();
    format!("{{ secret = \"\"\"\n{}\"\"\" }}", ct.as_str())
}

const SETTINGS: &str = r#"
base_domain = "apps.example.com"
currency = "EUR"
[secrets]
recipients = ["age169yga2phn8fzeqx5t4cqqvlamskqa5qyprap3l80j6u2lpz90c4qaxv56m"]
"#;

const PLANS: &str = r#"
[plan.small]
cpu = 0.5
memory = "512MiB"
disk = "5GiB"
price = "5.00"
max_replicas = 4

[plan.medium]
cpu = 1
memory = "1GiB"
disk = "10GiB"
price = "12.50"
max_replicas = 6
"#;

const RUNTIMES: &str = r#"
[runtime.node]
drivers = ["docker", "process"]
image = "node:22-slim"
build = ["npm ci", "npm run build"]
start = "npm start"
port = 3000

[runtime.static]
dockerfile = true
port = 8080
"#;

const NODES: &str = r#"
[node.n1]
cpu = 2
memory = "4GiB"
disk = "100GiB"
region = "eu-west"
address = "10.0.0.1"

[node.n2]
cpu = 2
memory = "4GiB"
disk = "100GiB"
region = "eu-west"
address = "10.0.0.2"

[node.n3]
cpu = 4
memory = "8GiB"
disk = "200GiB"
region = "us-east"
labels = { disk = "ssd" }
address = "10.0.0.3:8000"
"#;

const APPS_A: &str = r#"
[app.web]
plan = "medium"
runtime = "node"
replicas = 2
domains = ["www.example.com"]
source = { url = "https://github.com/acme/web.git" }
placement = { region = "eu-west" }

[app.api]
plan = "small"
runtime = "node"
replicas = 2
source = { url = "https://github.com/acme/api.git", branch = "main" }

[app.docs]
plan = "small"
runtime = "static"
source = { url = "https://github.com/acme/docs.git" }

[app.worker]
plan = "small"
runtime = "node"
source = { url = "https://github.com/acme/worker.git" }
placement = { labels = { disk = "ssd" } }
"#;

/// The apps of commit A; `db_url` is web's DB_URL secret as TOML. Env tables come last: age adds a
/// random-length stanza to each ciphertext, and resources declared after one would move between runs.
fn apps_a(db_url: &str) -> String {
    format!("{APPS_A}\n[app.web.env]\nNODE_ENV = \"production\"\nDB_URL = {db_url}\n")
}

/// Commit B's apps: web scaled to 3, api follows `release` and gains a domain, docs deleted, worker
/// suspended, shop added.
const APPS_B: &str = r#"
[app.web]
plan = "medium"
runtime = "node"
replicas = 3
domains = ["www.example.com"]
source = { url = "https://github.com/acme/web.git" }
placement = { region = "eu-west" }

[app.api]
plan = "small"
runtime = "node"
replicas = 2
domains = ["api.example.com"]
source = { url = "https://github.com/acme/api.git", branch = "release" }

[app.worker]
plan = "small"
runtime = "node"
suspended = true
source = { url = "https://github.com/acme/worker.git" }
placement = { labels = { disk = "ssd" } }

[app.shop]
plan = "small"
runtime = "node"
replicas = 2
source = { url = "https://github.com/acme/shop.git" }
placement = { region = "us-east" }
"#;

fn load(files: &[(&str, &str)]) -> Desired {
    let (_, loaded) = cairn_schema::load(files.iter().copied());
    assert!(!loaded.diagnostics.has_errors(), "{:?}", loaded.diagnostics);
    loaded.desired.expect("valid")
}

fn repo(apps: &str) -> Desired {
    load(&[
        ("cairn.toml", SETTINGS),
        ("plans/plans.toml", PLANS),
        ("runtimes/runtimes.toml", RUNTIMES),
        ("nodes/nodes.toml", NODES),
        ("apps/apps.toml", apps),
    ])
}

/// Fingerprints of every secret in `d`, as the control plane computes them with its identity.
fn fingerprints(d: &Desired) -> Fingerprints {
    let id = identity();
    let mut out = BTreeMap::new();
    for (app, a) in &d.apps {
        for (k, v) in &a.env {
            if let EnvValue::Secret { secret } = v {
                out.insert(
                    (app.clone(), k.clone()),
                    id.fingerprint(&id.decrypt(secret).unwrap()),
                );
            }
        }
    }
    out
}

fn input<'a>(
    desired: Option<(&'a CommitId, &'a Desired)>,
    fps: Option<&'a Fingerprints>,
    observed: &'a Observed,
) -> PlanInput<'a> {
    PlanInput {
        desired: desired.map(|(commit, state)| DesiredAt { commit, state }),
        fingerprints: fps,
        observed,
        seed: 42,
        now: now(),
        offline_after: DEFAULT_OFFLINE_AFTER,
    }
}

/// Plans `d` at `c` against `o` (with fingerprints) and applies the plan.
fn apply(o: &Observed, c: &CommitId, d: &Desired) -> (Plan, Observed) {
    let fps = fingerprints(d);
    let i = input(Some((c, d)), Some(&fps), o);
    let p = plan(&i);
    let next = next_observed(&i, &p).unwrap();
    assert_delta_is_complete(o, &p);
    (p, next)
}

/// A store that writes only the difference (rows of the plan's generation, deletes from placement
/// changes without a destination) ends with exactly the plan's placements.
fn assert_delta_is_complete(o: &Observed, p: &Plan) {
    let mut rows: BTreeMap<(Name, u32), crate::observed::ReplicaPlacement> = o
        .placements
        .iter()
        .map(|x| ((x.app.clone(), x.slot), x.clone()))
        .collect();
    for c in p.placement_changes.iter().filter(|c| c.to.is_none()) {
        rows.remove(&(c.app.clone(), c.slot));
    }
    for x in p.placements.iter().filter(|x| x.generation == p.generation) {
        rows.insert((x.app.clone(), x.slot), x.clone());
    }
    let expected: Vec<_> = rows.into_values().collect();
    if !p.is_empty() {
        assert_eq!(expected, *p.placements);
    }
}

/// Every declared node online, heard from a second ago, offering docker.
fn all_online(o: &mut Observed) {
    for n in o.nodes.keys() {
        o.node_status.insert(
            n.clone(),
            NodeStatus {
                state: NodeState::Online,
                last_heartbeat: Some(now() - Duration::seconds(1)),
                drivers: vec![cairn_schema::Driver::Docker],
                recipient: None,
            },
        );
    }
}

fn heads(o: &mut Observed, apps: &[(&str, &str)]) {
    for (a, c) in apps {
        o.source_heads.insert(name(a), commit(c));
    }
}

/// Commit A applied on an empty database, nodes online.
fn world_a(db_url: &str) -> (Desired, Observed) {
    let d = repo(&apps_a(db_url));
    let mut o = Observed::default();
    heads(
        &mut o,
        &[
            ("web", "1a2b3c4d5e6f7a8b"),
            ("api", "2b3c4d5e6f7a8b9c"),
            ("docs", "3c4d5e6f7a8b9c0d"),
            ("worker", "4d5e6f7a8b9c0d1e"),
        ],
    );
    let (p, mut o) = apply(&o, &commit("a0a0a0a0a0a0a0a0"), &d);
    assert!(
        p.warnings
            .iter()
            .all(|w| w.kind == WarningKind::NodeWaiting),
        "{:?}",
        p.warnings
    );
    all_online(&mut o);
    (d, o)
}

fn tasks_of(p: &Plan) -> Vec<(TaskAction, String, u32)> {
    p.tasks
        .iter()
        .map(|t| (t.action, t.app.to_string(), t.slot))
        .collect()
}

#[test]
fn first_plan_creates_everything_and_tasks_wait_for_pending_nodes() {
    let d = repo(&apps_a(&secret("postgres://a", &[])));
    let mut o = Observed::default();
    heads(
        &mut o,
        &[
            ("web", "1a2b3c4d5e6f7a8b"),
            ("api", "2b3c4d5e6f7a8b9c"),
            ("docs", "3c4d5e6f7a8b9c0d"),
            ("worker", "4d5e6f7a8b9c0d1e"),
        ],
    );
    let fps = fingerprints(&d);
    let c = commit("a0a0a0a0a0a0a0a0");
    let p = plan(&input(Some((&c, &d)), Some(&fps), &o));
    assert_eq!(p.summary(), "Plan: 11 to add, 0 to change, 0 to destroy.");
    assert_eq!((p.generation, p.based_on), (1, 0));
    assert_eq!(p.releases.len(), 4);
    assert!(
        p.releases
            .iter()
            .all(|r| r.number == 1 && r.previous.is_none())
    );
    assert_eq!(p.tasks.len(), 6);
    assert!(
        p.tasks
            .iter()
            .all(|t| t.action == TaskAction::Deploy && t.waits_for == Some(NodeState::Pending))
    );
    assert!(p.warnings.iter().any(|w| w.kind == WarningKind::NodeWaiting && w.message.contains("has not joined yet")));
    // web spreads over both eu-west nodes; worker lands on the only ssd node.
    let on = |a: &str| -> Vec<String> {
        p.placements
            .iter()
            .filter(|x| x.app.as_str() == a)
            .map(|x| x.node.to_string())
            .collect()
    };
    let mut web = on("web");
    web.sort();
    assert_eq!(web, ["n1", "n2"]);
    assert_eq!(on("worker"), ["n3"]);
    assert_eq!(p.cost.before.to_string(), "0.00");
    assert_eq!(p.cost.after.to_string(), "45.00");
}

#[test]
fn same_commit_twice_is_an_empty_plan() {
    let (d, o) = world_a(&secret("postgres://a", &[]));
    let fps = fingerprints(&d);
    let c = commit("a0a0a0a0a0a0a0a0");
    let p = plan(&input(Some((&c, &d)), Some(&fps), &o));
    assert!(p.is_empty(), "{}", text(&p, false));
    assert!(p.tasks.is_empty() && p.releases.is_empty() && p.changes.is_empty());
    assert_eq!(p.summary(), "Plan: 0 to add, 0 to change, 0 to destroy.");
    assert_eq!(
        next_observed(&input(Some((&c, &d)), Some(&fps), &o), &p).unwrap(),
        o
    );
    // Planning from the applied configuration alone is empty too.
    assert!(plan(&input(None, None, &o)).is_empty());
}

#[test]
fn a_new_commit_without_resource_changes_only_moves_the_commit() {
    let (d, o) = world_a(&secret("postgres://a", &[]));
    let (p, o2) = apply(&o, &commit("b1b1b1b1b1b1b1b1"), &d);
    assert!(!p.is_empty());
    assert!(p.changes.is_empty() && p.tasks.is_empty() && p.releases.is_empty());
    assert_eq!(o2.applied_commit, Some(commit("b1b1b1b1b1b1b1b1")));
    assert_eq!(o2.generation, o.generation + 1);
}

#[test]
fn changing_one_apps_env_deploys_exactly_its_replicas() {
    let (_, o) = world_a(&secret("postgres://a", &[]));
    let apps = apps_a(&secret("postgres://a", &[]))
        .replace("NODE_ENV = \"production\"", "NODE_ENV = \"staging\"");
    let d = repo(&apps);
    let (p, o2) = apply(&o, &commit("b1b1b1b1b1b1b1b1"), &d);
    assert_eq!(p.summary(), "Plan: 0 to add, 1 to change, 0 to destroy.");
    assert_eq!(
        tasks_of(&p),
        [
            (TaskAction::Deploy, "web".into(), 1),
            (TaskAction::Deploy, "web".into(), 2)
        ]
    );
    // Each deploy goes where the replica already runs.
    for t in &p.tasks {
        assert!(
            o.placements
                .iter()
                .any(|x| x.app == t.app && x.slot == t.slot && x.node == t.node)
        );
    }
    assert_eq!(p.releases.len(), 1);
    let r = &p.releases[0];
    assert_eq!(
        (r.app.as_str(), r.number, r.previous, r.config_changed),
        ("web", 2, Some(1), true)
    );
    assert_eq!(r.source_was, None);
    let f = &p.changes[0].fields;
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].path, "env.NODE_ENV");
    // Applying it, then planning again, gives nothing.
    let fps = fingerprints(&d);
    let c = commit("b1b1b1b1b1b1b1b1");
    assert!(plan(&input(Some((&c, &d)), Some(&fps), &o2)).is_empty());
}

#[test]
fn deleting_an_app_removes_its_replicas() {
    let (_, o) = world_a(&secret("postgres://a", &[]));
    let apps = apps_a(&secret("postgres://a", &[]));
    let cut = apps.find("[app.api]").unwrap();
    let end = apps.find("[app.docs]").unwrap();
    let d = repo(&format!("{}{}", &apps[..cut], &apps[end..]));
    let (p, o2) = apply(&o, &commit("b1b1b1b1b1b1b1b1"), &d);
    assert_eq!(p.summary(), "Plan: 0 to add, 0 to change, 1 to destroy.");
    assert_eq!(
        tasks_of(&p),
        [
            (TaskAction::Remove, "api".into(), 1),
            (TaskAction::Remove, "api".into(), 2)
        ]
    );
    assert!(
        p.placement_changes
            .iter()
            .all(|c| c.reason == PlacementReason::AppDeleted)
    );
    assert!(o2.placements.iter().all(|x| x.app.as_str() != "api"));
    assert_eq!(
        p.cost.after.amount(),
        p.cost.before.amount() - rust_decimal::Decimal::from(10)
    );
}

#[test]
fn a_secret_re_encrypted_to_new_recipients_is_no_change() {
    let (_, o) = world_a(&secret("postgres://a", &[]));
    let admin = Identity::generate();
    let d = repo(&apps_a(&secret("postgres://a", &[&admin])));
    let fps = fingerprints(&d);
    let c = commit("a0a0a0a0a0a0a0a0");
    let p = plan(&input(Some((&c, &d)), Some(&fps), &o));
    assert!(p.is_empty(), "{}", text(&p, false));

    // Without the identity (a fork's pull request) it cannot be told from a rewrite.
    let p = plan(&input(Some((&c, &d)), None, &o));
    assert!(!p.secrets_verified);
    let f = &p.changes[0].fields[0];
    assert_eq!((f.path.as_str(), f.unverified), ("env.DB_URL", true));
    assert!(text(&p, false).contains("~ env.DB_URL: (secret) changed (unverified)"));
    assert!(matches!(
        next_observed(&input(Some((&c, &d)), None, &o), &p),
        Err(NotApplicable::SecretsUnverified { count: 1 })
    ));
    // An untouched ciphertext needs no identity.
    let (d0, o0) = world_a(&secret("postgres://a", &[]));
    assert!(plan(&input(Some((&c, &d0)), None, &o0)).is_empty());
}

#[test]
fn a_changed_secret_is_shown_changed_never_its_value() {
    let (_, o) = world_a(&secret("postgres://old-password", &[]));
    let new_secret = secret("postgres://new-password", &[]);
    let d = repo(&apps_a(&new_secret));
    let fps = fingerprints(&d);
    let c = commit("b1b1b1b1b1b1b1b1");
    let p = plan(&input(Some((&c, &d)), Some(&fps), &o));
    assert_eq!(p.changes.len(), 1);
    let f = &p.changes[0].fields;
    assert_eq!(f.len(), 1);
    assert_eq!((f[0].path.as_str(), f[0].unverified), ("env.DB_URL", false));
    assert_eq!(
        tasks_of(&p),
        [
            (TaskAction::Deploy, "web".into(), 1),
            (TaskAction::Deploy, "web".into(), 2)
        ]
    );
    let out = [
        text(&p, false),
        text(&p, true),
        json(&p),
        markdown(&p, &MarkdownOptions::default()),
    ];
    let body = new_secret.lines().nth(2).unwrap();
    for o in &out {
        assert!(o.contains("env.DB_URL"), "{o}");
        for leak in [
            "new-password",
            "old-password",
            body,
            "AGE ENCRYPTED",
            fps.values().next().unwrap(),
        ] {
            assert!(!o.contains(leak), "{leak} leaked into\n{o}");
        }
    }
    assert!(
        out[0].contains("~ env.DB_URL: (secret) changed\n"),
        "{}",
        out[0]
    );
}

#[test]
fn a_push_makes_a_release_unless_pinned() {
    let (d, mut o) = world_a(&secret("postgres://a", &[]));
    let c = commit("a0a0a0a0a0a0a0a0");
    heads(&mut o, &[("api", "9f8e7d6c5b4a3921")]);
    let fps = fingerprints(&d);
    let p = plan(&input(Some((&c, &d)), Some(&fps), &o));
    assert_eq!(p.summary(), "Plan: 0 to add, 0 to change, 0 to destroy.");
    assert_eq!(p.releases.len(), 1);
    let r = &p.releases[0];
    assert_eq!(
        (r.app.as_str(), r.number, r.source_commit.as_str()),
        ("api", 2, "9f8e7d6c5b4a3921")
    );
    assert_eq!(r.source_was, Some(commit("2b3c4d5e6f7a8b9c")));
    assert!(!r.config_changed);
    assert_eq!(
        tasks_of(&p),
        [
            (TaskAction::Deploy, "api".into(), 1),
            (TaskAction::Deploy, "api".into(), 2)
        ]
    );
    assert!(text(&p, false).contains("1 new release, 2 tasks (2 deploy)."));

    // A rollback pin holds the release.
    let mut pinned = o.clone();
    pinned.rollback_pins.insert(name("api"), 1);
    let p = plan(&input(Some((&c, &d)), Some(&fps), &pinned));
    assert!(p.is_empty());
    assert_eq!(
        p.pins,
        [Pin {
            app: name("api"),
            release: 1,
            holding_back: true,
            lifted: false
        }]
    );
    assert!(text(&p, false).contains("api stays on release #1"));

    // A pinned rev wins over the branch head.
    let apps = apps_a(&secret("postgres://a", &[])).replace(
        "branch = \"main\" }",
        "branch = \"main\", rev = \"v2.0.0\" }",
    );
    let d = repo(&apps);
    let (p, _) = apply(&o, &commit("b1b1b1b1b1b1b1b1"), &d);
    assert_eq!(p.releases[0].source_commit.as_str(), "v2.0.0");
    assert_eq!(p.changes[0].fields[0].path, "source.rev");
}

#[test]
fn a_rollback_pin_deploys_the_pinned_release() {
    let (d, mut o) = world_a(&secret("postgres://a", &[]));
    heads(&mut o, &[("api", "9f8e7d6c5b4a3921")]);
    let (_, mut o) = apply(&o, &commit("a0a0a0a0a0a0a0a0"), &d);
    assert_eq!(o.releases[&name("api")].number, 2);
    o.rollback_pins.insert(name("api"), 1);
    let (p, o) = apply(&o, &commit("a0a0a0a0a0a0a0a0"), &d);
    assert!(p.releases.is_empty());
    assert!(
        p.tasks
            .iter()
            .all(|t| t.action == TaskAction::Deploy && t.release == 1 && t.app.as_str() == "api")
    );
    assert_eq!(p.tasks.len(), 2);
    // Unpinned, it returns to the latest release without making a new one.
    let mut o = o;
    o.rollback_pins.clear();
    let (p, _) = apply(&o, &commit("a0a0a0a0a0a0a0a0"), &d);
    assert!(p.releases.is_empty());
    assert!(p.tasks.iter().all(|t| t.release == 2));
    assert_eq!(p.tasks.len(), 2);
}

#[test]
fn a_failed_release_goes_back_to_the_live_one_and_is_not_deployed_again() {
    let (d, mut o) = world_a(&secret("postgres://a", &[]));
    heads(&mut o, &[("api", "9f8e7d6c5b4a3921")]);
    let c = commit("a0a0a0a0a0a0a0a0");
    let (_, mut o) = apply(&o, &c, &d);
    assert_eq!(o.releases[&name("api")].number, 2);
    // Release 2 failed its health check on the node; release 1 is still live.
    let latest = o.releases.get_mut(&name("api")).unwrap();
    latest.failed = true;
    latest.fallback = Some(1);
    let (p, o) = apply(&o, &c, &d);
    assert!(p.releases.is_empty(), "a failed release is not made again");
    assert_eq!(p.tasks.len(), 2);
    assert!(
        p.tasks
            .iter()
            .all(|t| t.action == TaskAction::Deploy && t.release == 1),
        "the placements go back to the live release: {:?}",
        p.tasks
    );
    assert!(o.placements.iter().all(|pl| pl.release == 1));
    // Nothing more while the source stays where it is...
    let mut still = o.clone();
    still.releases.get_mut(&name("api")).unwrap().failed = true;
    still.releases.get_mut(&name("api")).unwrap().fallback = Some(1);
    assert!(plan(&input(Some((&c, &d)), Some(&fingerprints(&d)), &still)).is_empty());
    // ...and a new push makes release 3.
    heads(&mut still, &[("api", "0123456789abcdef")]);
    let (p, _) = apply(&still, &c, &d);
    assert_eq!(p.releases.len(), 1);
    assert_eq!(p.releases[0].number, 3);
    assert!(p.tasks.iter().all(|t| t.release == 3));
    // A failed first release has nothing to go back to: it stays.
    let first = ReleaseRecord {
        number: 1,
        config_commit: c.clone(),
        source_commit: commit("0123456789abcdef"),
        spec_hash: String::new(),
        failed: true,
        fallback: None,
    };
    assert_eq!(first.serving(), 1);
}

#[test]
fn a_change_to_a_pinned_apps_manifest_lifts_the_pin() {
    let (d, mut o) = world_a(&secret("postgres://a", &[]));
    heads(&mut o, &[("api", "9f8e7d6c5b4a3921")]);
    let (_, mut o) = apply(&o, &commit("a0a0a0a0a0a0a0a0"), &d);
    assert_eq!(o.releases[&name("api")].number, 2);
    o.rollback_pins.insert(name("api"), 1);
    let (_, o) = apply(&o, &commit("a0a0a0a0a0a0a0a0"), &d);

    // A change elsewhere (web's replicas) keeps api on its pin.
    let other =
        repo(&apps_a(&secret("postgres://a", &[])).replacen("replicas = 2", "replicas = 1", 1));
    let (p, o2) = apply(&o, &commit("b0b0b0b0b0b0b0b0"), &other);
    assert!(p.changes.iter().all(|c| c.name.as_str() != "api"));
    assert!(matches!(
        &p.pins[..],
        [Pin {
            lifted: false,
            release: 1,
            ..
        }]
    ));
    assert_eq!(o2.rollback_pins.get(&name("api")), Some(&1));
    assert!(p.tasks.iter().all(|t| t.app.as_str() != "api"));

    // A change to api's own manifest is a deploy: the pin goes and api runs its latest release again.
    let changed = repo(&apps_a(&secret("postgres://a", &[])).replace(
        "replicas = 2\nsource = { url = \"https://github.com/acme/api.git\"",
        "replicas = 3\nsource = { url = \"https://github.com/acme/api.git\"",
    ));
    let (p, next) = apply(&o, &commit("c0c0c0c0c0c0c0c0"), &changed);
    assert!(p.changes.iter().any(|c| c.name.as_str() == "api"));
    assert!(matches!(
        &p.pins[..],
        [Pin {
            lifted: true,
            holding_back: false,
            release: 1,
            ..
        }]
    ));
    assert!(p.releases.is_empty(), "{:?}", p.releases);
    let api: Vec<_> = p.tasks.iter().filter(|t| t.app.as_str() == "api").collect();
    assert_eq!(api.len(), 3, "{:?}", p.tasks);
    assert!(
        api.iter()
            .all(|t| t.action == TaskAction::Deploy && t.release == 2)
    );
    assert!(next.rollback_pins.is_empty());
    assert!(text(&p, false).contains("its manifest changed, so the pin is lifted"));
}

#[test]
fn suspending_stops_and_resuming_starts() {
    let (_, o) = world_a(&secret("postgres://a", &[]));
    let apps = apps_a(&secret("postgres://a", &[]));
    let suspended = apps.replace(
        "replicas = 2\ndomains",
        "replicas = 2\nsuspended = true\ndomains",
    );
    let d = repo(&suspended);
    let (p, o2) = apply(&o, &commit("b1b1b1b1b1b1b1b1"), &d);
    assert_eq!(
        tasks_of(&p),
        [
            (TaskAction::Stop, "web".into(), 1),
            (TaskAction::Stop, "web".into(), 2)
        ]
    );
    assert!(
        o2.placements
            .iter()
            .filter(|x| x.app.as_str() == "web")
            .all(|x| x.state == ReplicaState::Stopped)
    );
    assert_eq!(
        p.cost.before.amount() - p.cost.after.amount(),
        rust_decimal::Decimal::from(25)
    );
    let d = repo(&apps);
    let (p, _) = apply(&o2, &commit("c2c2c2c2c2c2c2c2"), &d);
    assert_eq!(
        tasks_of(&p),
        [
            (TaskAction::Start, "web".into(), 1),
            (TaskAction::Start, "web".into(), 2)
        ]
    );
}

#[test]
fn an_offline_node_loses_its_replicas_and_gets_none_back() {
    let (d, mut o) = world_a(&secret("postgres://a", &[]));
    let on_n3: Vec<_> = o
        .placements
        .iter()
        .filter(|x| x.node.as_str() == "n3")
        .cloned()
        .collect();
    assert!(!on_n3.is_empty());
    o.node_status.get_mut(&name("n3")).unwrap().last_heartbeat =
        Some(now() - Duration::seconds(91));
    // No new commit: the node's silence alone wakes the planner.
    let p = plan(&input(None, None, &o));
    assert!(p.changes.is_empty());
    // worker needs an ssd node and n3 is the only one: it stays there and says so.
    assert!(p.warnings.iter().any(|w| w.kind == WarningKind::Stranded
        && w.app.as_ref().is_some_and(|a| a.as_str() == "worker")));
    for x in on_n3.iter().filter(|x| x.app.as_str() != "worker") {
        assert!(p.placement_changes.iter().any(|c| c.app == x.app
            && c.slot == x.slot
            && c.reason
                == PlacementReason::Moved {
                    why: crate::scheduler::MoveReason::NodeOffline
                }));
        assert!(p.tasks.iter().any(|t| t.action == TaskAction::Remove
            && t.app == x.app
            && t.node.as_str() == "n3"
            && t.waits_for == Some(NodeState::Offline)));
    }
    let i = input(None, None, &o);
    let mut o2 = next_observed(&i, &p).unwrap();
    // The node comes back: nothing moves back.
    o2.node_status.get_mut(&name("n3")).unwrap().last_heartbeat = Some(now());
    let c = commit("a0a0a0a0a0a0a0a0");
    let fps = fingerprints(&d);
    assert!(plan(&input(Some((&c, &d)), Some(&fps), &o2)).is_empty());
}

#[test]
fn restart_requests_restart_running_replicas_once() {
    let (d, mut o) = world_a(&secret("postgres://a", &[]));
    o.restart_requests.insert(name("api"), 1);
    let (p, o2) = apply(&o, &commit("a0a0a0a0a0a0a0a0"), &d);
    assert_eq!(
        tasks_of(&p),
        [
            (TaskAction::Restart, "api".into(), 1),
            (TaskAction::Restart, "api".into(), 2)
        ]
    );
    let (p, _) = apply(&o2, &commit("a0a0a0a0a0a0a0a0"), &d);
    assert!(p.is_empty());
}

#[test]
fn a_stale_plan_is_refused() {
    let (d, o) = world_a(&secret("postgres://a", &[]));
    let fps = fingerprints(&d);
    let c = commit("a0a0a0a0a0a0a0a0");
    let p = plan(&input(Some((&c, &d)), Some(&fps), &o));
    let mut newer = o.clone();
    newer.generation += 1;
    assert_eq!(
        next_observed(&input(Some((&c, &d)), Some(&fps), &newer), &p),
        Err(NotApplicable::Stale {
            planned_from: o.generation,
            current: o.generation + 1
        })
    );
}

#[test]
fn the_same_seed_gives_the_same_plan() {
    let d = repo(&apps_a(&secret("postgres://a", &[])));
    let o = Observed::default();
    let fps = fingerprints(&d);
    let c = commit("a0a0a0a0a0a0a0a0");
    let a = plan(&input(Some((&c, &d)), Some(&fps), &o));
    let b = plan(&input(Some((&c, &d)), Some(&fps), &o));
    assert_eq!(json(&a), json(&b));
}

/// Commit B against the applied commit A, with n2 gone silent and n4 added as an ingress node in place
/// of n3: the realistic review scenario.
fn scenario() -> Plan {
    let (_, mut o) = world_a(&secret("postgres://old", &[]));
    o.node_status.get_mut(&name("n2")).unwrap().last_heartbeat = Some(now() - Duration::minutes(5));
    heads(
        &mut o,
        &[("api", "8e7d6c5b4a392110"), ("shop", "5e6f7a8b9c0d1e2f")],
    );
    let plans = PLANS.replace("price = \"12.50\"", "price = \"15.00\"");
    // n3 stops taking public traffic, n4 (new) takes it.
    let nodes = format!(
        "{}\n[node.n4]\ncpu = 4\nmemory = \"8GiB\"\ndisk = \"200GiB\"\nregion = \"us-east\"\nlabels = {{ disk = \"ssd\" }}\naddress = \"10.0.0.4\"\n",
        NODES.replace(
            "address = \"10.0.0.3:8000\"",
            "address = \"10.0.0.3:8000\"\ningress = false"
        )
    );
    let apps = format!(
        "{APPS_B}\n[app.web.env]\nNODE_ENV = \"production\"\nDB_URL = {}\n\n[app.shop.env]\nSTRIPE_KEY = {}\n",
        secret("postgres://new", &[]),
        secret("sk_live_123", &[])
    );
    let d = load(&[
        ("cairn.toml", SETTINGS),
        ("plans/plans.toml", &plans),
        ("runtimes/runtimes.toml", RUNTIMES),
        ("nodes/nodes.toml", &nodes),
        ("apps/apps.toml", &apps),
    ]);
    let fps = fingerprints(&d);
    let c = commit("b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1");
    plan(&input(Some((&c, &d)), Some(&fps), &o))
}

#[test]
fn scenario_text() {
    let p = scenario();
    insta::assert_snapshot!("scenario_text", text(&p, false));
}

#[test]
fn scenario_text_coloured() {
    let p = scenario();
    let t = text(&p, true);
    assert!(t.contains("\x1b[32m+ app shop\x1b[0m"), "{t}");
    assert_eq!(strip_ansi(&t), text(&p, false));
}

#[test]
fn scenario_json() {
    let p = scenario();
    insta::assert_snapshot!("scenario_json", json(&p));
}

#[test]
fn scenario_markdown() {
    let p = scenario();
    let opts = MarkdownOptions {
        blob_url: Some("https://github.com/acme/config/blob/b1b1b1b/".into()),
        ..MarkdownOptions::default()
    };
    insta::assert_snapshot!("scenario_markdown", markdown(&p, &opts));
}

#[test]
fn scenario_facts() {
    let p = scenario();
    // web asks for 3 replicas in eu-west: n1 has room for 2 of the 1-cpu plan, n2 is offline.
    let warn: Vec<&str> = p.warnings.iter().map(|w| w.message.as_str()).collect();
    assert!(
        warn.contains(&"node n4 has not joined yet: 2 tasks wait for it"),
        "{warn:#?}"
    );
    assert!(
        p.warnings
            .iter()
            .any(|w| w.kind == WarningKind::Unplaced || w.kind == WarningKind::Stranded),
        "{warn:#?}"
    );
    assert_eq!(p.cost.currency, "EUR");
    assert!(
        p.tasks
            .iter()
            .any(|t| t.action == TaskAction::Stop && t.app.as_str() == "worker")
    );
    assert!(
        p.tasks
            .iter()
            .any(|t| t.action == TaskAction::Remove && t.app.as_str() == "docs")
    );
    assert!(
        !p.tasks
            .iter()
            .any(|t| t.action == TaskAction::Remove && t.app.as_str() == "worker")
    );
}

#[test]
fn new_hosts_are_served_by_every_ingress_node_with_an_address() {
    let p = scenario();
    let names = |v: &[Name]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    assert_eq!(names(&p.ingress.nodes_before), ["n1", "n2", "n3"]);
    assert_eq!(names(&p.ingress.nodes), ["n1", "n2", "n4"]);
    let new: Vec<(&str, Vec<&str>)> = p
        .ingress
        .new_hosts
        .iter()
        .map(|h| (h.app.as_str(), h.hosts.iter().map(|x| x.as_str()).collect()))
        .collect();
    assert_eq!(
        new,
        [
            ("api", vec!["api.example.com"]),
            ("shop", vec!["shop.apps.example.com"])
        ]
    );
    assert!(
        !p.warnings
            .iter()
            .any(|w| w.kind == WarningKind::Unreachable),
        "{:?}",
        p.warnings
    );
    // The node diff shows both fields like any other; a created node's default `ingress = true` is
    // left out like other defaults.
    let fields = |node: &str| -> Vec<String> {
        let c = p
            .changes
            .iter()
            .find(|c| c.kind == cairn_schema::Kind::Node && c.name.as_str() == node)
            .unwrap();
        c.fields
            .iter()
            .map(|f| {
                let (m, line) = super::render::field_line(f);
                format!("{m} {line}")
            })
            .collect()
    };
    assert_eq!(fields("n3"), ["~ ingress: true → false"]);
    assert!(fields("n4").contains(&"+ address: \"10.0.0.4\"".to_owned()));
    assert!(!fields("n4").iter().any(|f| f.contains("ingress")));
    let t = text(&p, false);
    assert!(
        t.contains("  ~ ingress nodes: n1, n2, n3 → n1, n2, n4 (each serves every app)\n"),
        "{t}"
    );
    assert!(
        t.contains(
            "  + app shop answers shop.apps.example.com: served by ingress nodes n1, n2, n4\n"
        ),
        "{t}"
    );
}

/// World A's repository with `nodes` for its nodes, `settings` for cairn.toml and web gaining a domain.
fn world_a_with(nodes: &str, settings: &str) -> (Plan, Observed) {
    let (_, o) = world_a(&secret("postgres://a", &[]));
    let apps = apps_a(&secret("postgres://a", &[])).replace(
        "domains = [\"www.example.com\"]",
        "domains = [\"www.example.com\", \"example.com\"]",
    );
    let d = load(&[
        ("cairn.toml", settings),
        ("plans/plans.toml", PLANS),
        ("runtimes/runtimes.toml", RUNTIMES),
        ("nodes/nodes.toml", nodes),
        ("apps/apps.toml", &apps),
    ]);
    let (p, o2) = apply(&o, &commit("b1b1b1b1b1b1b1b1"), &d);
    (p, o2)
}

#[test]
fn a_new_domain_without_an_ingress_node_with_an_address_is_a_warning() {
    // Every node takes traffic, none has an address: only a node with a replica serves web.
    let no_address: String = NODES
        .lines()
        .filter(|l| !l.starts_with("address"))
        .collect::<Vec<_>>()
        .join("\n");
    let (p, _) = world_a_with(&no_address, SETTINGS);
    assert!(p.ingress.nodes.is_empty());
    let warned: Vec<_> = p
        .warnings
        .iter()
        .filter(|w| w.kind == WarningKind::Unreachable)
        .map(|w| (w.app.as_ref().map(|a| a.to_string()), w.message.as_str()))
        .collect();
    assert_eq!(
        warned,
        [
            (
                Some("web".to_owned()),
                "app web answers example.com, but no ingress node has an `address`: only an ingress node that runs one of its replicas serves it (give the ingress nodes an `address` so each serves every app)"
            ),
            (
                None,
                "no node has `ingress = true` and an `address` any more (before: n1, n2, n3): an app is served only by the ingress nodes that run one of its replicas"
            )
        ]
    );
    let t = text(&p, false);
    assert!(
        t.contains("  - ingress nodes: n1, n2, n3 (none left) (each serves every app)\n"),
        "{t}"
    );
    assert!(
        t.contains(
            "  + app web answers example.com: no ingress node serves every app (see the warnings)\n"
        ),
        "{t}"
    );

    // The only node of a cluster serves every app without an address: no warning.
    let alone = "[node.n1]\ncpu = 8\nmemory = \"16GiB\"\ndisk = \"400GiB\"\nregion = \"eu-west\"\n";
    let (p, _) = world_a_with(alone, SETTINGS);
    assert_eq!(p.ingress.nodes, [name("n1")]);
    assert!(
        !p.warnings
            .iter()
            .any(|w| w.kind == WarningKind::Unreachable),
        "{:?}",
        p.warnings
    );

    // No node takes traffic at all: not reachable.
    let internal: String = NODES.replace("address = ", "ingress = false\naddress = ");
    let (p, _) = world_a_with(&internal, SETTINGS);
    let web = p
        .warnings
        .iter()
        .find(|w| w.kind == WarningKind::Unreachable && w.app == Some(name("web")))
        .unwrap();
    assert_eq!(
        web.message,
        "app web answers example.com, but no node has `ingress = true`: it would not be reachable"
    );
    let md = markdown(&p, &MarkdownOptions::default());
    assert!(
        md.contains(
            "- `web` answers `example.com`: no ingress node serves every app (see the warnings)\n"
        ),
        "{md}"
    );
    assert!(
        md.contains("> - app web answers example.com, but no node has"),
        "{md}"
    );
}

#[test]
fn a_new_base_domain_gives_every_app_a_new_host() {
    let (p, o2) = world_a_with(
        NODES,
        &SETTINGS.replace("apps.example.com", "apps.example.net"),
    );
    let new: Vec<(&str, &[String])> = p
        .ingress
        .new_hosts
        .iter()
        .map(|h| (h.app.as_str(), h.hosts.as_slice()))
        .collect();
    assert_eq!(
        new,
        [
            ("api", &["api.apps.example.net".to_owned()][..]),
            ("docs", &["docs.apps.example.net".to_owned()][..]),
            (
                "web",
                &["example.com".to_owned(), "web.apps.example.net".to_owned()][..]
            ),
            ("worker", &["worker.apps.example.net".to_owned()][..]),
        ]
    );
    assert_eq!(p.ingress.nodes, p.ingress.nodes_before);
    assert_eq!(
        o2.base_domain.as_ref().map(|d| d.as_str()),
        Some("apps.example.net")
    );
    let md = markdown(&p, &MarkdownOptions::default());
    assert!(
        md.contains("- `web` answers `example.com`, `web.apps.example.net`: served by ingress nodes `n1`, `n2`, `n3`\n"),
        "{md}"
    );
    assert!(
        !md.contains("Ingress nodes ("),
        "the nodes did not change: {md}"
    );
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn the_example_repository_plans_from_scratch() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/config");
    let mut files = Vec::new();
    let mut stack = vec![std::path::PathBuf::from(root)];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                files.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    let (_, loaded) = cairn_schema::load(files.iter().map(|(p, b)| (p.as_str(), b.as_slice())));
    let d = loaded.desired.expect("examples/config is valid");
    let fps = fingerprints(&d);
    let mut o = Observed::default();
    for app in d.apps.keys() {
        o.source_heads.insert(
            app.clone(),
            commit("abcdefabcdefabcdefabcdefabcdefabcdefabcd"),
        );
    }
    let c = commit("0123456789012345678901234567890123456789");
    let i = input(Some((&c, &d)), Some(&fps), &o);
    let p = plan(&i);
    // fra-2 has `ingress = false`: the other two serve every app.
    let ingress: Vec<&str> = p.ingress.nodes.iter().map(|n| n.as_str()).collect();
    assert_eq!(ingress, ["fra-1", "nyc-1"]);
    assert_eq!(p.ingress.new_hosts.len(), d.apps.len());
    assert_eq!(
        p.counts().0,
        d.plans.len()
            + d.runtimes.len()
            + d.nodes.len()
            + d.apps.len()
            + d.notify.len()
            + d.databases.len()
    );
    let o2 = next_observed(&i, &p).unwrap();
    assert!(plan(&input(Some((&c, &d)), Some(&fps), &o2)).is_empty());
}

#[test]
fn a_removed_node_gets_no_tasks_and_its_replicas_move() {
    let (_, o) = world_a(&secret("postgres://a", &[]));
    let on_n1: Vec<_> = o
        .placements
        .iter()
        .filter(|x| x.node.as_str() == "n1")
        .cloned()
        .collect();
    assert!(!on_n1.is_empty());
    let nodes = NODES.replace(
        "[node.n1]\ncpu = 2\nmemory = \"4GiB\"\ndisk = \"100GiB\"\nregion = \"eu-west\"\naddress = \"10.0.0.1\"\n",
        "",
    );
    let d = load(&[
        ("cairn.toml", SETTINGS),
        ("plans/plans.toml", PLANS),
        ("runtimes/runtimes.toml", RUNTIMES),
        ("nodes/nodes.toml", &nodes),
        ("apps/apps.toml", &apps_a(&secret("postgres://a", &[]))),
    ]);
    let (p, o2) = apply(&o, &commit("b1b1b1b1b1b1b1b1"), &d);
    assert_eq!(p.summary(), "Plan: 0 to add, 0 to change, 1 to destroy.");
    assert!(
        p.tasks.iter().all(|t| t.node.as_str() != "n1"),
        "{:?}",
        p.tasks
    );
    for x in &on_n1 {
        let c = p
            .placement_changes
            .iter()
            .find(|c| c.app == x.app && c.slot == x.slot)
            .unwrap();
        assert_eq!(c.from.as_ref().map(|n| n.as_str()), Some("n1"));
        if c.to.is_some() {
            assert_eq!(
                c.reason,
                PlacementReason::Moved {
                    why: crate::scheduler::MoveReason::NodeRemoved
                }
            );
        }
    }
    assert!(!o2.node_status.contains_key(&name("n1")));
    assert!(o2.placements.iter().all(|x| x.node.as_str() != "n1"));
}

#[test]
fn a_node_that_joined_with_another_key_gets_nothing_new() {
    let (_, mut o) = world_a(&secret("postgres://a", &[]));
    let pinned = Identity::generate();
    let other = Identity::generate();
    o.node_status.get_mut(&name("n3")).unwrap().recipient = Some(other.recipient());
    let nodes = NODES.replace(
        "labels = { disk = \"ssd\" }",
        &format!(
            "labels = {{ disk = \"ssd\" }}\nrecipient = \"{}\"",
            pinned.recipient()
        ),
    );
    let d = load(&[
        ("cairn.toml", SETTINGS),
        ("plans/plans.toml", PLANS),
        ("runtimes/runtimes.toml", RUNTIMES),
        ("nodes/nodes.toml", &nodes),
        ("apps/apps.toml", &apps_a(&secret("postgres://a", &[]))),
    ]);
    let fps = fingerprints(&d);
    let c = commit("b1b1b1b1b1b1b1b1");
    let p = plan(&input(Some((&c, &d)), Some(&fps), &o));
    assert!(
        p.warnings
            .iter()
            .any(|w| w.kind == WarningKind::RecipientMismatch && w.node == Some(name("n3")))
    );
    let n3 = p.nodes.iter().find(|n| n.node.as_str() == "n3").unwrap();
    assert_eq!(n3.condition, Some(crate::scheduler::Condition::Unusable));
    // worker can run nowhere else: it is reported, not silently kept or dropped.
    assert!(
        p.warnings
            .iter()
            .any(|w| w.kind == WarningKind::Unplaced && w.app == Some(name("worker")))
    );
    assert!(p.placements.iter().all(|x| x.node.as_str() != "n3"));
}

#[test]
fn an_app_without_a_known_head_waits_for_its_source() {
    let d = repo(&apps_a(&secret("postgres://a", &[])));
    let o = Observed::default();
    let fps = fingerprints(&d);
    let c = commit("a0a0a0a0a0a0a0a0");
    let p = plan(&input(Some((&c, &d)), Some(&fps), &o));
    assert!(p.releases.is_empty() && p.tasks.is_empty());
    let w: Vec<&str> = p
        .warnings
        .iter()
        .filter(|w| w.kind == WarningKind::NoSourceHead)
        .map(|w| w.message.as_str())
        .collect();
    assert_eq!(w.len(), 4);
    assert!(w.contains(
        &"app api: the head of branch `main` of https://github.com/acme/api.git is not known yet; it deploys once the source is polled"
    ));
}

mod properties {
    //! Random desired and observed states: applying a plan and planning again gives an empty plan, and no
    //! plan reserves more than a node has.

    use std::collections::{BTreeMap, BTreeSet};

    use cairn_schema::model::{Health, Placement, SecretSettings, Settings, Source};
    use cairn_schema::{
        App, ByteSize, Ciphertext, Cpu, Desired, Domain, Driver, EnvName, EnvValue, GitUrl, Name,
        Node, Price, Runtime,
    };
    use proptest::prelude::*;

    use super::{commit, name, now};
    use crate::observed::{Fingerprints, NodeState, NodeStatus, Observed};
    use crate::{DEFAULT_OFFLINE_AFTER, DesiredAt, PlanInput, next_observed, plan};

    const CT: &str =
        "-----BEGIN AGE ENCRYPTED FILE-----\nYWJjZGVm\n-----END AGE ENCRYPTED FILE-----";

    #[derive(Debug, Clone)]
    struct World {
        desired: Desired,
        fingerprints: Fingerprints,
        status: BTreeMap<String, NodeState>,
        heads: BTreeMap<String, String>,
    }

    fn arb_node() -> impl Strategy<Value = Node> {
        (
            1u32..8,
            1u64..16,
            prop::option::of(prop::sample::select(vec!["eu", "us"])),
            any::<bool>(),
            prop::bool::weighted(0.15),
        )
            .prop_map(|(cpu, mem, region, ssd, drain)| Node {
                cpu: Cpu::from_millis(cpu * 500),
                memory: ByteSize(mem << 29),
                disk: ByteSize(100 << 30),
                region: region.map(name),
                labels: if ssd {
                    [(name("disk"), "ssd".to_owned())].into()
                } else {
                    BTreeMap::new()
                },
                drain,
                recipient: None,
                address: None,
                ingress: true,
            })
    }

    fn arb_app() -> impl Strategy<
        Value = (
            usize,
            usize,
            u32,
            Option<&'static str>,
            bool,
            bool,
            u8,
            Option<u8>,
        ),
    > {
        (
            0usize..3,
            0usize..2,
            0u32..4,
            prop::option::of(prop::sample::select(vec!["eu", "us"])),
            prop::bool::weighted(0.2),
            prop::bool::weighted(0.15),
            0u8..3,
            prop::option::of(0u8..3),
        )
    }

    fn arb_world() -> impl Strategy<Value = World> {
        (
            prop::collection::vec(prop::option::of(arb_node()), 5),
            prop::collection::vec(prop::option::of(arb_app()), 6),
            prop::collection::vec(
                prop::sample::select(vec![
                    NodeState::Pending,
                    NodeState::Online,
                    NodeState::Online,
                    NodeState::Offline,
                ]),
                5,
            ),
            prop::collection::vec(prop::option::of(0u8..3), 6),
            1u32..4,
        )
            .prop_map(|(nodes, apps, status, heads, plan_scale)| {
                let mut d = Desired {
                    settings: Settings {
                        base_domain: Domain::new("apps.example.com").unwrap(),
                        currency: "EUR".into(),
                        secrets: SecretSettings::default(),
                        tls: None,
                    },
                    plans: BTreeMap::new(),
                    runtimes: BTreeMap::new(),
                    nodes: BTreeMap::new(),
                    apps: BTreeMap::new(),
                    notify: BTreeMap::new(),
                    databases: BTreeMap::new(),
                    origins: BTreeMap::new(),
                };
                for p in 0..3u32 {
                    d.plans.insert(
                        name(&format!("p{p}")),
                        cairn_schema::Plan {
                            cpu: Cpu::from_millis(250 * plan_scale * (p + 1)),
                            memory: ByteSize((256 << 20) * u64::from(p + 1)),
                            disk: ByteSize(1 << 30),
                            price: Price::new(rust_decimal::Decimal::from(5 * (p + 1))).unwrap(),
                            max_replicas: 4,
                        },
                    );
                }
                for (r, drivers) in [
                    ("r0", vec![Driver::Docker]),
                    ("r1", vec![Driver::Docker, Driver::Process]),
                ] {
                    d.runtimes.insert(
                        name(r),
                        Runtime {
                            drivers,
                            dockerfile: false,
                            image: Some("img".into()),
                            build: vec![],
                            start: Some("run".into()),
                            port: 8080,
                        },
                    );
                }
                for (i, n) in nodes.into_iter().enumerate() {
                    if let Some(n) = n {
                        d.nodes.insert(name(&format!("n{i}")), n);
                    }
                }
                let mut fingerprints = Fingerprints::new();
                for (i, a) in apps.into_iter().enumerate() {
                    let Some((plan, runtime, replicas, region, ssd, suspended, env, secret)) = a
                    else {
                        continue;
                    };
                    let app = name(&format!("a{i}"));
                    let mut envs = BTreeMap::new();
                    envs.insert(
                        EnvName::new("MODE").unwrap(),
                        EnvValue::Plain(format!("m{env}")),
                    );
                    if let Some(s) = secret {
                        let key = EnvName::new("TOKEN").unwrap();
                        envs.insert(
                            key.clone(),
                            EnvValue::Secret {
                                secret: Ciphertext::new(CT).unwrap(),
                            },
                        );
                        fingerprints.insert((app.clone(), key), format!("fp{s}"));
                    }
                    d.apps.insert(
                        app,
                        App {
                            plan: name(&format!("p{plan}")),
                            runtime: name(&format!("r{runtime}")),
                            source: Source {
                                url: GitUrl::new(&format!("https://github.com/acme/a{i}.git"))
                                    .unwrap(),
                                branch: "main".into(),
                                rev: None,
                            },
                            databases: BTreeMap::new(),
                            replicas,
                            port: None,
                            domains: vec![],
                            health: Health::default(),
                            placement: Placement {
                                region: region.map(name),
                                labels: if ssd {
                                    [(name("disk"), "ssd".to_owned())].into()
                                } else {
                                    BTreeMap::new()
                                },
                            },
                            http: Default::default(),
                            suspended,
                            env: envs,
                            tls: None,
                        },
                    );
                }
                let status = status
                    .into_iter()
                    .enumerate()
                    .map(|(i, s)| (format!("n{i}"), s))
                    .collect();
                let heads = heads
                    .into_iter()
                    .enumerate()
                    .filter_map(|(i, h)| {
                        h.map(|h| {
                            (
                                format!("a{i}"),
                                format!("{h}{h}{h}{h}{h}{h}{h}{h}{h}{h}{h}{h}"),
                            )
                        })
                    })
                    .collect();
                World {
                    desired: d,
                    fingerprints,
                    status,
                    heads,
                }
            })
    }

    /// The observed state as the world's nodes and source heads make it, on top of what is applied.
    fn observe(mut o: Observed, w: &World) -> Observed {
        o.node_status.clear();
        for (n, s) in &w.status {
            if *s == NodeState::Pending {
                continue;
            }
            let hb = if *s == NodeState::Online {
                now()
            } else {
                now() - chrono::Duration::minutes(10)
            };
            o.node_status.insert(
                name(n),
                NodeStatus {
                    state: NodeState::Online,
                    last_heartbeat: Some(hb),
                    drivers: vec![Driver::Docker],
                    recipient: None,
                },
            );
        }
        o.source_heads = w.heads.iter().map(|(a, c)| (name(a), commit(c))).collect();
        o
    }

    fn input<'a>(
        c: &'a crate::observed::CommitId,
        w: &'a World,
        o: &'a Observed,
        seed: u64,
    ) -> PlanInput<'a> {
        PlanInput {
            desired: Some(DesiredAt {
                commit: c,
                state: &w.desired,
            }),
            fingerprints: Some(&w.fingerprints),
            observed: o,
            seed,
            now: now(),
            offline_after: DEFAULT_OFFLINE_AFTER,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn applying_then_planning_again_is_empty(first in arb_world(), second in arb_world(), seed in any::<u64>()) {
            let mut o = Observed::default();
            for (step, w) in [&first, &second].into_iter().enumerate() {
                let c = commit(&format!("c{step}c{step}c{step}c{step}c{step}c{step}"));
                o = observe(o, w);
                let i = input(&c, w, &o, seed);
                let p = plan(&i);
                for n in &p.nodes {
                    if let Some(a) = &n.after {
                        prop_assert!(a.used.fits_in(&a.capacity), "{} over capacity: {:?}", n.node, a);
                    }
                }
                prop_assert_eq!(&p, &plan(&i));
                let next = next_observed(&i, &p).unwrap();
                let again = plan(&input(&c, w, &next, seed));
                prop_assert!(again.is_empty(), "step {}: planning again gave\n{}", step, super::text(&again, false));
                o = next;
            }
        }

        /// A [`crate::Planner`] gives the plan of every app, whatever changed in between: commits that
        /// touch some apps, nodes, plans or source heads, agents' reports (a replica stopped or gone, a
        /// release failed), restart requests and rollback pins, plans shown but not applied, and plans
        /// from the applied configuration alone.
        #[test]
        fn a_planner_gives_the_plan_of_every_app(
            first in arb_world(),
            steps in prop::collection::vec((arb_world(), (any::<u16>(), any::<u16>(), any::<u16>()), prop::collection::vec((0u8..6, 0usize..16), 2), any::<bool>(), prop::bool::weighted(0.1)), 1..12),
            seed in any::<u64>(),
        ) {
            let mut planner = crate::Planner::new();
            // Told which apps changed, as the controller tells it; sometimes from the wrong inputs.
            let mut named = crate::Planner::new();
            let mut last: Option<(crate::Basis, BTreeMap<Name, String>)> = None;
            let mut o = Observed::default();
            // Every app's source head known: more apps end quiet, so more plans keep some.
            let with_heads = |mut w: World| {
                for i in 0..6 {
                    w.heads.entry(format!("a{i}")).or_insert_with(|| "0".repeat(12));
                }
                w
            };
            let mut w = with_heads(first);
            for (step, (other, (m1, m2, m3), pokes, apply, applied_only)) in steps.into_iter().enumerate() {
                let other = with_heads(other);
                // Each app changes with a chance of one in four, each node and the plans (which every app
                // reads) of one in eight.
                let mask = m1 & m2 & (m3 | 0x3f);
                let c = commit(&format!("c{step}c{step}c{step}c{step}c{step}c{step}"));
                o = observe(o, &w);
                let i = PlanInput {
                    desired: if applied_only { None } else { Some(DesiredAt { commit: &c, state: &w.desired }) },
                    ..input(&c, &w, &o, seed)
                };
                let full = plan(&i);
                let got = planner.plan(&i);
                prop_assert_eq!(&got, &full, "step {}: {:?}", step, planner.reuse());
                // The same input again: what the last plan left quiet is kept.
                prop_assert_eq!(&planner.plan(&i), &full, "step {} again: {:?}", step, planner.reuse());

                let inputs = app_inputs(&i);
                let now = crate::Basis {
                    desired: cairn_schema::Revision { lineage: 1, number: step as u64 },
                    observed: step as u64,
                };
                let changed: BTreeSet<Name> = match &last {
                    Some((_, before)) => before
                        .keys()
                        .chain(inputs.keys())
                        .filter(|a| before.get(*a) != inputs.get(*a))
                        .cloned()
                        .collect(),
                    None => BTreeSet::new(),
                };
                // One step in eight names inputs the planner did not plan last.
                let since = last.as_ref().map(|(b, _)| match m3 % 8 {
                    0 => crate::Basis { observed: b.observed + 100, ..*b },
                    _ => *b,
                });
                let got = named.plan_with(&i, Some(crate::Changes { now, since: since.map(|b| (b, &changed)) }));
                prop_assert_eq!(&got, &full, "step {} named {:?}: {:?}", step, changed, named.reuse());
                let none = BTreeSet::new();
                let again = named.plan_with(&i, Some(crate::Changes { now, since: Some((now, &none)) }));
                prop_assert_eq!(&again, &full, "step {} named again: {:?}", step, named.reuse());
                last = Some((now, inputs));
                if apply {
                    o = next_observed(&i, &full).unwrap();
                }
                for (poke, at) in pokes {
                    poke_observed(&mut o, poke, at);
                }
                w = mix(&w, &other, mask);
            }
        }
    }

    /// Every app's own inputs to a plan, as text: two plans' apps whose text differs changed.
    fn app_inputs(i: &PlanInput<'_>) -> BTreeMap<Name, String> {
        let o = i.observed;
        let mut names: BTreeSet<&Name> = o.apps.keys().collect();
        names.extend(o.placements.iter().map(|p| &p.app));
        if let Some(d) = i.desired {
            names.extend(d.state.apps.keys());
        }
        names
            .into_iter()
            .map(|a| {
                let mut replicas: Vec<_> = o.placements.iter().filter(|p| p.app == *a).collect();
                replicas.sort_by(|x, y| {
                    (x.slot, &x.node, x.generation).cmp(&(y.slot, &y.node, y.generation))
                });
                let fps: Vec<_> = i
                    .fingerprints
                    .into_iter()
                    .flatten()
                    .filter(|((n, _), _)| n == a)
                    .collect();
                let text = format!(
                    "{:?}",
                    (
                        i.desired.and_then(|d| d.state.apps.get(a)),
                        fps,
                        o.apps.get(a),
                        o.releases.get(a),
                        o.source_heads.get(a),
                        o.rollback_pins.get(a),
                        o.restart_requests.get(a),
                        replicas,
                    )
                );
                (a.clone(), text)
            })
            .collect()
    }

    /// An agent's report or an operator's request between two plans.
    fn poke_observed(o: &mut Observed, poke: u8, at: usize) {
        let app = name(&format!("a{}", at % 6));
        match poke {
            1 => *o.restart_requests.entry(app).or_default() += 1,
            2 => {
                let n = o.placements.len().max(1);
                if let Some(p) = o.placements.get_mut(at % n) {
                    p.state = crate::observed::ReplicaState::Stopped;
                }
            }
            3 if at < o.placements.len() => {
                o.placements.remove(at);
            }
            4 => {
                if let Some(r) = o.releases.get_mut(&app) {
                    r.failed = true;
                }
            }
            5 => {
                if let Some(r) = o.releases.get(&app) {
                    o.rollback_pins.insert(app, r.number);
                }
            }
            _ => {}
        }
    }

    /// `w` with what `mask` picks taken from `other`: bits 0-5 an app (with its secret's fingerprint and
    /// source head), 6-10 a node (with its state), 11 the plans.
    fn mix(w: &World, other: &World, mask: u16) -> World {
        let mut out = w.clone();
        for i in 0..6 {
            if mask & (1 << i) == 0 {
                continue;
            }
            let (a, k) = (format!("a{i}"), name(&format!("a{i}")));
            match other.desired.apps.get(&k) {
                Some(app) => out.desired.apps.insert(k.clone(), app.clone()),
                None => out.desired.apps.remove(&k),
            };
            out.fingerprints.retain(|(n, _), _| *n != k);
            out.fingerprints.extend(
                other
                    .fingerprints
                    .iter()
                    .filter(|((n, _), _)| *n == k)
                    .map(|(key, v)| (key.clone(), v.clone())),
            );
            match other.heads.get(&a) {
                Some(h) => out.heads.insert(a, h.clone()),
                None => out.heads.remove(&a),
            };
        }
        for i in 0..5 {
            if mask & (1 << (6 + i)) == 0 {
                continue;
            }
            let (n, k) = (format!("n{i}"), name(&format!("n{i}")));
            match other.desired.nodes.get(&k) {
                Some(node) => out.desired.nodes.insert(k, node.clone()),
                None => out.desired.nodes.remove(&k),
            };
            match other.status.get(&n) {
                Some(s) => out.status.insert(n, *s),
                None => out.status.remove(&n),
            };
        }
        if mask & (1 << 11) != 0 {
            out.desired.plans = other.desired.plans.clone();
        }
        out
    }
}

/// Commit A with every app's source head known, nothing applied yet.
fn world_a_with_heads() -> (Desired, Fingerprints, Observed, CommitId) {
    let d = repo(&apps_a(&secret("postgres://a", &[])));
    let fps = fingerprints(&d);
    let mut o = Observed::default();
    for a in d.apps.keys() {
        o.source_heads
            .insert(a.clone(), commit("abcdefabcdefabcdef"));
    }
    (d, fps, o, commit("a0a0a0a0a0a0a0a0"))
}

#[test]
fn a_planner_plans_again_only_the_apps_that_changed() {
    let (d, fps, o, c) = world_a_with_heads();
    let mut planner = Planner::new();
    let i = input(Some((&c, &d)), Some(&fps), &o);
    let first = planner.plan(&i);
    assert_eq!(first, plan(&i));
    assert_eq!(planner.reuse().kept, 0);
    let o = next_observed(&i, &first).unwrap();

    // Applied: the applied plans, runtimes and nodes changed, which every app reads, so every app is
    // planned once more; from then on every app is quiet and nothing is planned again.
    let i = input(Some((&c, &d)), Some(&fps), &o);
    assert!(planner.plan(&i).is_empty());
    assert_eq!(planner.reuse().kept, 0);
    let steady = planner.plan(&i);
    assert!(steady.is_empty(), "{}", text(&steady, false));
    assert_eq!(steady, plan(&i));
    let apps = d.apps.len();
    assert_eq!(
        planner.reuse(),
        Reuse {
            planned: 0,
            kept: apps,
            fell_back: false,
            named: false,
        }
    );

    // One app's source moves: only it is planned, and the plan is the whole one.
    let mut o2 = o.clone();
    o2.source_heads
        .insert(name("web"), commit("fedcbafedcbafedcba"));
    let i = input(Some((&c, &d)), Some(&fps), &o2);
    let moved = planner.plan(&i);
    assert_eq!(moved, plan(&i));
    assert_eq!(moved.releases.len(), 1);
    assert_eq!(
        planner.reuse(),
        Reuse {
            planned: 1,
            kept: apps - 1,
            fell_back: false,
            named: false,
        }
    );
    assert_eq!(moved.placements.len(), first.placements.len());

    // web moves to a plan so large that n1 and n2 cannot keep both their replicas and the others': the
    // scheduler keeps replicas in name order then, which only a plan of every app gets right.
    let huge = format!(
        "{PLANS}\n[plan.huge]\ncpu = 2\nmemory = \"1GiB\"\ndisk = \"10GiB\"\nprice = \"40\"\nmax_replicas = 4\n"
    );
    let with_huge = |apps: &str| {
        load(&[
            ("cairn.toml", SETTINGS),
            ("plans/plans.toml", &huge),
            ("runtimes/runtimes.toml", RUNTIMES),
            ("nodes/nodes.toml", NODES),
            ("apps/apps.toml", apps),
        ])
    };
    let d = with_huge(&apps_a(&secret("postgres://a", &[])));
    let fps = fingerprints(&d);
    let i = input(Some((&c, &d)), Some(&fps), &o);
    let p = planner.plan(&i);
    let o = next_observed(&i, &p).unwrap();
    let i = input(Some((&c, &d)), Some(&fps), &o);
    assert!(planner.plan(&i).is_empty());
    assert!(planner.plan(&i).is_empty());
    assert_eq!(planner.reuse().kept, apps);
    let d = with_huge(&apps_a(&secret("postgres://a", &[])).replacen(
        "plan = \"medium\"",
        "plan = \"huge\"",
        1,
    ));
    let fps = fingerprints(&d);
    let c = commit("a1a1a1a1a1a1a1a1");
    let i = input(Some((&c, &d)), Some(&fps), &o);
    let p = planner.plan(&i);
    assert_eq!(p, plan(&i), "{}", text(&p, false));
    assert!(
        planner.reuse().fell_back,
        "{:?}\n{}",
        planner.reuse(),
        text(&p, false)
    );
}

#[test]
fn a_planner_whose_plan_panicked_starts_afresh() {
    let (d, fps, o, c) = world_a_with_heads();
    let i = input(Some((&c, &d)), Some(&fps), &o);
    let mut planner = Planner::new();
    let first = planner.plan(&i);
    let o = next_observed(&i, &first).unwrap();
    let i = input(Some((&c, &d)), Some(&fps), &o);
    planner.plan(&i);
    planner.plan(&i);
    assert_eq!(planner.reuse().kept, d.apps.len());
    // A plan that unwinds half-way leaves the planner busy (and its memo half-updated): the next plan
    // forgets what it kept.
    let shared = std::sync::Mutex::new(planner);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut p = shared.lock().unwrap();
        p.busy_for_test();
        panic!("the planner panicked");
    }));
    assert!(caught.is_err());
    let mut planner = shared.into_inner().unwrap_or_else(|e| e.into_inner());
    assert_eq!(planner.plan(&i), plan(&i));
    assert_eq!(planner.reuse().kept, 0, "{:?}", planner.reuse());
}

#[test]
fn manifest_values_cannot_break_out_of_their_context() {
    let (_, o) = world_a(&secret("postgres://a", &[]));
    let hostile = r#"NODE_ENV = "```\n</details><img src=x> @everyone \u001b[2J""#;
    let apps = apps_a(&secret("postgres://a", &[])).replace("NODE_ENV = \"production\"", hostile);
    let d = repo(&apps);
    let fps = fingerprints(&d);
    let c = commit("b1b1b1b1b1b1b1b1");
    let p = plan(&input(Some((&c, &d)), Some(&fps), &o));
    let md = markdown(&p, &MarkdownOptions::default());
    // The diff block's fence is longer than the value's backtick run, and the value stays on one line.
    assert!(md.contains("````diff\n"), "{md}");
    assert!(
        md.contains(
            r#"!     env.NODE_ENV: "production" → "```\n</details><img src=x> @everyone \u001b[2J""#
        ),
        "{md}"
    );
    assert!(!md.contains('\u{1b}') && !text(&p, false).contains('\u{1b}'));
    assert!(!text(&p, true).contains("\u{1b}[2J"));
}

#[test]
fn a_large_plan_keeps_its_pr_comment_short() {
    let apps: String = (0..400)
        .map(|i| format!("[app.app{i}]\nplan = \"small\"\nruntime = \"node\"\nsource = {{ url = \"https://github.com/acme/a{i}.git\" }}\n\n"))
        .collect();
    let d = repo(&apps);
    let mut o = Observed::default();
    for a in d.apps.keys() {
        o.source_heads
            .insert(a.clone(), commit("abcdefabcdefabcdef"));
    }
    let c = commit("a0a0a0a0a0a0a0a0");
    let fps = fingerprints(&d);
    let p = plan(&input(Some((&c, &d)), Some(&fps), &o));
    let md = markdown(&p, &MarkdownOptions::default());
    assert!(md.len() < 65_536, "{} characters", md.len());
    assert!(
        md.contains("more lines; run `cairn plan` for the whole plan."),
        "{md}"
    );
    assert!(md.contains("more replicas; run `cairn plan` for the whole plan."));
    assert!(md.contains("more warnings; run `cairn plan` for the whole plan."));
}

#[test]
fn the_plan_says_which_hosts_get_a_certificate_and_why_one_waits() {
    let (_, mut o) = world_a(&secret("postgres://old", &[]));
    let d = repo(&apps_a(&secret("postgres://old", &[])));
    let names = |app: &str| {
        let mut v = d.hostnames(&name(app));
        v.sort();
        v
    };
    let (web, docs, api) = (names("web"), names("docs"), names("api"));
    o.certificates = vec![
        crate::observed::ObservedCert {
            names: web.clone(),
            state: crate::observed::CertState::WaitingDns,
            not_after: None,
            last_error: Some("www.example.com resolves to 203.0.113.9, not an ingress node".into()),
        },
        crate::observed::ObservedCert {
            names: docs,
            state: crate::observed::CertState::Issued,
            not_after: Some(now() + Duration::days(60)),
            last_error: None,
        },
    ];
    // Without `[tls]` no app is served over HTTPS: nothing to say.
    let c = commit("b0b0b0b0b0b0b0b0");
    let p = plan(&input(Some((&c, &d)), Some(&fingerprints(&d)), &o));
    assert!(
        p.ingress.certificates.is_empty(),
        "{:?}",
        p.ingress.certificates
    );

    // With it, api gains a domain (its certificate is ordered once applied) and web's names wait for
    // DNS (reported on every plan until issued); docs has its certificate and changes nothing.
    let settings = format!("{SETTINGS}\n[tls]\ncontact = \"ops@example.com\"\n");
    let apps = apps_a(&secret("postgres://old", &[])).replace(
        "source = { url = \"https://github.com/acme/api.git\", branch = \"main\" }",
        "source = { url = \"https://github.com/acme/api.git\", branch = \"main\" }\ndomains = [\"api.example.com\"]",
    );
    let d = load(&[
        ("cairn.toml", &settings),
        ("plans/plans.toml", PLANS),
        ("runtimes/runtimes.toml", RUNTIMES),
        ("nodes/nodes.toml", NODES),
        ("apps/apps.toml", &apps),
    ]);
    let p = plan(&input(Some((&c, &d)), Some(&fingerprints(&d)), &o));
    let got: Vec<(&str, &crate::Https)> = p
        .ingress
        .certificates
        .iter()
        .map(|c| (c.app.as_str(), &c.https))
        .collect();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].0, "api");
    assert_eq!(
        *got[0].1,
        crate::Https::Auto {
            state: None,
            not_after: None,
            last_error: None
        }
    );
    let mut api_now = api.clone();
    api_now.push("api.example.com".into());
    api_now.sort();
    assert_eq!(p.ingress.certificates[0].names, api_now);
    assert_eq!(got[1].0, "web");
    assert!(got[1].1.needs_attention());

    let t = text(&p, false);
    assert!(t.contains("Certificates:"), "{t}");
    assert!(
        t.contains(
            "waiting for DNS, nothing asked of the CA: www.example.com resolves to 203.0.113.9"
        ),
        "{t}"
    );
    assert!(t.contains("certificate ordered once applied"), "{t}");
    let m = markdown(&p, &MarkdownOptions::default());
    assert!(m.contains("#### Certificates"), "{m}");
    assert!(m.contains("⚠️ `web`"), "{m}");
}

const DATABASES: &str = r#"
[database.main]
engine = "postgres"
version = "15"
plan = "medium"
backup = { schedule = "0 3 * * *", keep = 7, to = "dir:/var/backups/cairn" }
"#;

/// Commit A with database `main` (no `node`: the scheduler places it) attached to web as
/// DATABASE_URL; `extra` is appended to the database's table.
fn repo_with_db(extra: &str) -> Desired {
    let apps = format!(
        "{}\n[app.web.env]\nNODE_ENV = \"production\"\n",
        APPS_A.replace(
            "placement = { region = \"eu-west\" }",
            "placement = { region = \"eu-west\" }\ndatabases = { main = \"DATABASE_URL\" }",
        )
    );
    load(&[
        ("cairn.toml", SETTINGS),
        ("plans/plans.toml", PLANS),
        ("runtimes/runtimes.toml", RUNTIMES),
        ("nodes/nodes.toml", NODES),
        ("apps/apps.toml", &apps),
        ("databases.toml", &format!("{DATABASES}{extra}")),
    ])
}

fn world_db() -> (Desired, Observed, Plan) {
    let d = repo_with_db("");
    let mut o = Observed::default();
    heads(
        &mut o,
        &[
            ("web", "1a2b3c4d5e6f7a8b"),
            ("api", "2b3c4d5e6f7a8b9c"),
            ("docs", "3c4d5e6f7a8b9c0d"),
            ("worker", "4d5e6f7a8b9c0d1e"),
        ],
    );
    let (p, mut o) = apply(&o, &commit("a0a0a0a0a0a0a0a0"), &d);
    all_online(&mut o);
    (d, o, p)
}

fn web_db_env(p: &Plan) -> Option<ReleaseEnv> {
    p.releases
        .iter()
        .find(|r| r.app.as_str() == "web")
        .and_then(|r| r.spec.env.get("DATABASE_URL").cloned())
}

#[test]
fn a_database_is_placed_once_on_the_node_with_most_free_disk_and_stays() {
    let (d, mut o, p) = world_db();
    let db = &p.databases[0];
    assert_eq!(db.change, DatabaseChange::Create);
    assert_eq!(db.node, Some(name("n3")), "n3 has the most disk");
    assert_eq!(db.port, Some(crate::databases::FIRST_PORT));
    assert_eq!(db.task, Some(DatabaseTask::Ensure));
    assert!(
        p.changes
            .iter()
            .any(|c| c.kind == Kind::Database && c.action == Action::Create)
    );
    assert!(matches!(
        web_db_env(&p),
        Some(ReleaseEnv::Database { database, .. }) if database.as_str() == "main"
    ));
    assert_eq!(o.databases[&name("main")].node, name("n3"));
    // The cost counts the database's plan.
    assert_eq!(p.cost.after.to_string(), "57.50");
    // The same commit again: nothing to do.
    let c = commit("a0a0a0a0a0a0a0a0");
    let fps = fingerprints(&d);
    assert!(plan(&input(Some((&c, &d)), Some(&fps), &o)).is_empty());
    // Its node goes offline: reported unavailable with its recovery point, never moved, no task.
    o.databases.get_mut(&name("main")).unwrap().last_good_backup = Some(now() - Duration::hours(9));
    o.node_status.get_mut(&name("n3")).unwrap().last_heartbeat =
        Some(now() - Duration::seconds(91));
    let p = plan(&input(None, None, &o));
    let db = &p.databases[0];
    assert!(matches!(&db.change, DatabaseChange::Unavailable { why } if why.contains("offline")));
    assert_eq!(db.node, Some(name("n3")));
    assert_eq!(db.task, None);
    let w = p
        .warnings
        .iter()
        .find(|w| w.kind == WarningKind::DatabaseUnavailable)
        .expect("a warning");
    assert!(
        w.message.contains("recovery point 2026-03-01 03:00 UTC"),
        "{}",
        w.message
    );
    assert!(
        web_db_env(&p).is_none(),
        "web is not redeployed: {:?}",
        p.releases
    );
    let next = next_observed(&input(None, None, &o), &p).unwrap();
    assert_eq!(next.databases[&name("main")].node, name("n3"));
}

#[test]
fn naming_another_node_is_a_planned_move_that_needs_a_restore() {
    let (_, o, first) = world_db();
    let before = web_db_env(&first).expect("web attached");
    let d = repo_with_db("node = \"n1\"\n");
    let (p, next) = apply(&o, &commit("b0b0b0b0b0b0b0b0"), &d);
    let db = &p.databases[0];
    assert_eq!(db.change, DatabaseChange::Move { from: name("n3") });
    assert_eq!(db.node, Some(name("n1")));
    assert_eq!(db.task, Some(DatabaseTask::Ensure));
    assert!(
        p.warnings
            .iter()
            .any(|w| w.kind == WarningKind::DatabaseMove
                && w.message.contains("cairn db restore main --latest"))
    );
    let after = web_db_env(&p).expect("web gets a new release: its URL points elsewhere");
    assert_ne!(before, after);
    assert_eq!(next.databases[&name("main")].node, name("n1"));
    let t = text(&p, false);
    assert!(t.contains("MOVE from n3"), "{t}");
}

#[test]
fn a_rotation_or_a_swap_redeploys_the_attached_apps_only() {
    let (d, mut o, _) = world_db();
    let c = commit("a0a0a0a0a0a0a0a0");
    let fps = fingerprints(&d);
    o.databases.get_mut(&name("main")).unwrap().credential += 1;
    let p = plan(&input(Some((&c, &d)), Some(&fps), &o));
    let apps: Vec<&str> = p.releases.iter().map(|r| r.app.as_str()).collect();
    assert_eq!(apps, ["web"]);
    assert!(p.databases.iter().all(|d| d.task.is_none()));
    let mut o2 = next_observed(&input(Some((&c, &d)), Some(&fps), &o), &p).unwrap();
    o2.databases.get_mut(&name("main")).unwrap().instance = name("main-restored");
    let p = plan(&input(Some((&c, &d)), Some(&fps), &o2));
    let apps: Vec<&str> = p.releases.iter().map(|r| r.app.as_str()).collect();
    assert_eq!(apps, ["web"]);
}

#[test]
fn an_undeclared_database_is_stopped_and_its_data_kept() {
    let (_, o, _) = world_db();
    let d = repo(&apps_a(&secret("postgres://a", &[])));
    let (p, next) = apply(&o, &commit("c0c0c0c0c0c0c0c0"), &d);
    assert_eq!(p.databases[0].change, DatabaseChange::Delete);
    assert_eq!(p.databases[0].task, Some(DatabaseTask::Stop));
    assert!(next.databases.is_empty());
}

#[test]
fn database_plan_snapshots() {
    let (_, mut o, first) = world_db();
    insta::assert_snapshot!("database_create_text", text(&first, false));
    o.databases.get_mut(&name("main")).unwrap().last_good_backup = Some(now() - Duration::hours(9));
    let d = repo_with_db("node = \"n1\"\n");
    let c = commit("b0b0b0b0b0b0b0b0");
    let fps = fingerprints(&d);
    let p = plan(&input(Some((&c, &d)), Some(&fps), &o));
    insta::assert_snapshot!(
        "database_move_markdown",
        markdown(&p, &MarkdownOptions::default())
    );
}

/// The database repository with `from` replaced by `to` in its `[database.main]`.
fn repo_with_db_changed(from: &str, to: &str) -> Desired {
    let apps = format!(
        "{}\n[app.web.env]\nNODE_ENV = \"production\"\n",
        APPS_A.replace(
            "placement = { region = \"eu-west\" }",
            "placement = { region = \"eu-west\" }\ndatabases = { main = \"DATABASE_URL\" }",
        )
    );
    assert!(DATABASES.contains(from));
    load(&[
        ("cairn.toml", SETTINGS),
        ("plans/plans.toml", PLANS),
        ("runtimes/runtimes.toml", RUNTIMES),
        ("nodes/nodes.toml", NODES),
        ("apps/apps.toml", &apps),
        ("databases.toml", &DATABASES.replace(from, to)),
    ])
}

#[test]
fn a_version_change_is_an_upgrade_beside_the_old_instance() {
    let (_, o, _) = world_db();
    let d = repo_with_db_changed("version = \"15\"", "version = \"15.13\"");
    let (p, next) = apply(&o, &commit("d0d0d0d0d0d0d0d0"), &d);
    let db = &p.databases[0];
    assert_eq!(
        db.change,
        DatabaseChange::Upgrade {
            from: "15".to_owned()
        }
    );
    assert_eq!(db.task, Some(DatabaseTask::Upgrade));
    assert_eq!(db.node, Some(name("n3")), "on its node");
    assert_eq!(
        db.port,
        Some(crate::databases::FIRST_PORT),
        "the old port until it succeeds"
    );
    assert!(
        web_db_env(&p).is_none(),
        "the attached app keeps the old instance until the upgrade succeeds: {:?}",
        p.releases
    );
    let t = text(&p, false);
    assert!(
        t.contains(
            "upgrade postgres 15 -> 15.13: dump and restore into a new instance beside the old one"
        ),
        "{t}"
    );
    let md = markdown(&p, &MarkdownOptions::default());
    // The PR comment escapes `>` (rendered as `->`).
    assert!(
        md.contains("upgrade postgres 15 -\\> 15.13: dump and restore into a new instance"),
        "{md}"
    );
    // Applied: the database records the new version and still uses its instance; the same commit
    // again plans nothing (the upgrade is queued once).
    let main = &next.databases[&name("main")];
    assert_eq!(main.spec.version, "15.13");
    assert_eq!(main.instance, name("main"));
    let c = commit("d0d0d0d0d0d0d0d0");
    let fps = fingerprints(&d);
    let again = plan(&input(Some((&c, &d)), Some(&fps), &next));
    assert!(again.databases.iter().all(|d| d.task.is_none()));
    assert_eq!(again.databases[0].change, DatabaseChange::Keep);
}

#[test]
fn an_upgrade_waits_for_its_offline_node() {
    let (_, mut o, _) = world_db();
    o.node_status.get_mut(&name("n3")).unwrap().last_heartbeat =
        Some(now() - Duration::seconds(91));
    let d = repo_with_db_changed("version = \"15\"", "version = \"16\"");
    let (p, next) = apply(&o, &commit("e0e0e0e0e0e0e0e0"), &d);
    assert!(matches!(
        p.databases[0].change,
        DatabaseChange::Unavailable { .. }
    ));
    assert_eq!(p.databases[0].task, None);
    assert_eq!(
        next.databases[&name("main")].spec.version,
        "15",
        "the running version is kept, so the upgrade is planned when the node is back"
    );
    let mut back = next.clone();
    all_online(&mut back);
    let c = commit("e0e0e0e0e0e0e0e0");
    let fps = fingerprints(&d);
    let p = plan(&input(Some((&c, &d)), Some(&fps), &back));
    assert_eq!(
        p.databases[0].change,
        DatabaseChange::Upgrade {
            from: "15".to_owned()
        }
    );
    assert_eq!(p.databases[0].task, Some(DatabaseTask::Upgrade));
}

#[test]
fn an_engine_change_is_refused_and_the_database_kept() {
    let (_, o, _) = world_db();
    let d = repo_with_db_changed(
        "engine = \"postgres\"\nversion = \"15\"",
        "engine = \"mariadb\"\nversion = \"10.11\"",
    );
    let (p, next) = apply(&o, &commit("f0f0f0f0f0f0f0f0"), &d);
    let db = &p.databases[0];
    assert!(
        matches!(&db.change, DatabaseChange::Refused { why } if why.contains("cannot change from postgres to mariadb")),
        "{:?}",
        db.change
    );
    assert_eq!(db.task, None);
    assert!(
        p.warnings
            .iter()
            .any(|w| w.kind == WarningKind::DatabaseRefused && w.message.contains("main"))
    );
    assert!(web_db_env(&p).is_none(), "nothing about it changes");
    let main = &next.databases[&name("main")];
    assert_eq!(
        (main.spec.engine.as_str(), main.spec.version.as_str()),
        ("postgres", "15")
    );
    let t = text(&p, false);
    assert!(t.contains("REFUSED (its engine cannot change"), "{t}");
    // Nor with a move to another node: it stays where and as it is.
    let d = repo_with_db_changed(
        "engine = \"postgres\"\nversion = \"15\"",
        "engine = \"mariadb\"\nversion = \"10.11\"\nnode = \"n1\"",
    );
    let (p, next) = apply(&o, &commit("f1f1f1f1f1f1f1f1"), &d);
    let db = &p.databases[0];
    assert!(
        matches!(&db.change, DatabaseChange::Refused { .. }),
        "{:?}",
        db.change
    );
    assert_eq!((db.node.as_ref(), db.task), (Some(&name("n3")), None));
    let main = &next.databases[&name("main")];
    assert_eq!(
        (main.node.as_str(), main.spec.engine.as_str()),
        ("n3", "postgres")
    );
}
