//! Plans generated repositories of 1,000 / 10,000 / 100,000 apps on 100 nodes (large enough for every
//! replica): cold (empty database, everything created and scheduled), steady (the applied commit again:
//! an empty plan, the common reconcile), and one app's env changed. Time is `plan()` alone; loading the
//! repository is the schema benchmark's.
//!
//! `cargo bench -p cairn-plan --bench plan` (release). Sizes as arguments:
//! `cargo bench -p cairn-plan --bench plan -- 1000 10000`.

use std::time::{Duration, Instant};

use cairn_plan::observed::{CommitId, Fingerprints, NodeState, NodeStatus, Observed};
use cairn_plan::{DEFAULT_OFFLINE_AFTER, DesiredAt, Plan, PlanInput, next_observed, plan};
use cairn_schema::{Desired, Driver, EnvName, EnvValue};
use chrono::{DateTime, Utc};

/// A repository of `apps` apps, 100 per file, with 10 plans, 4 runtimes and 100 nodes in 3 regions.
fn generate(apps: usize) -> Vec<(String, Vec<u8>)> {
    let mut files = vec![(
        "cairn.toml".to_owned(),
        b"base_domain = \"apps.example.com\"\ncurrency = \"EUR\"\n".to_vec(),
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
    files.push(("infra.toml".to_owned(), infra.into_bytes()));
    let mut chunk = String::new();
    for a in 0..apps {
        chunk += &format!(
            "[app.app-{a}]\nplan = \"p{}\"\nruntime = \"{}\"\nreplicas = {}\ndomains = [\"app-{a}.example.org\"]\n\n\
             [app.app-{a}.source]\nurl = \"https://github.com/acme/app-{a}.git\"\nbranch = \"main\"\n\n\
             [app.app-{a}.placement]\nregion = \"r{}\"\n\n[app.app-{a}.env]\nLOG_LEVEL = \"info\"\nWORKERS = \"4\"\n\n",
            a % 10,
            ["node", "python", "php", "docker"][a % 4],
            1 + a % 3,
            a % 3
        );
        if a % 100 == 99 || a + 1 == apps {
            files.push((
                format!("apps/{:05}.toml", a / 100),
                std::mem::take(&mut chunk).into_bytes(),
            ));
        }
    }
    files
}

fn input<'a>(
    commit: &'a CommitId,
    d: &'a Desired,
    fps: &'a Fingerprints,
    o: &'a Observed,
) -> PlanInput<'a> {
    PlanInput {
        desired: Some(DesiredAt { commit, state: d }),
        fingerprints: Some(fps),
        observed: o,
        seed: 1,
        now: DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap(),
        offline_after: DEFAULT_OFFLINE_AFTER,
    }
}

/// The median time of `runs` calls, and the last plan.
fn time(runs: usize, mut f: impl FnMut() -> Plan) -> (Duration, Plan) {
    let mut last = None;
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            let p = f();
            let d = t.elapsed();
            last = Some(p);
            d
        })
        .collect();
    times.sort();
    (times[runs / 2], last.expect("runs > 0"))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if args.is_empty() {
        vec![1_000, 10_000, 100_000]
    } else {
        args
    };
    println!(
        "| apps | replicas | cold plan | steady plan (no change) | one app's env changed | runs |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for n in sizes {
        let files = generate(n);
        let (_, loaded) = cairn_schema::load(files.iter().map(|(p, b)| (p.as_str(), b.as_slice())));
        let desired = loaded.desired.expect("generated repo is valid");
        let fps = Fingerprints::new();
        let commit = CommitId::new("0123456789abcdef0123456789abcdef01234567");
        let mut empty = Observed::default();
        for app in desired.apps.keys() {
            empty.source_heads.insert(
                app.clone(),
                CommitId::new("fedcba9876543210fedcba9876543210fedcba98"),
            );
        }
        let runs = if n >= 100_000 { 3 } else { 7 };

        let (cold, p) = time(runs, || plan(&input(&commit, &desired, &fps, &empty)));
        let replicas = p.placements.len();
        let mut applied =
            next_observed(&input(&commit, &desired, &fps, &empty), &p).expect("applicable");
        for node in applied.nodes.keys() {
            applied.node_status.insert(
                node.clone(),
                NodeStatus {
                    state: NodeState::Online,
                    last_heartbeat: Some(
                        DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap(),
                    ),
                    drivers: vec![Driver::Docker],
                    recipient: None,
                },
            );
        }

        let (steady, p) = time(runs, || plan(&input(&commit, &desired, &fps, &applied)));
        assert!(p.is_empty(), "{}", p.summary());

        let mut changed = desired.clone();
        let first = changed.apps.keys().next().expect("apps").clone();
        changed.apps.get_mut(&first).expect("app").env.insert(
            EnvName::new("LOG_LEVEL").expect("name"),
            EnvValue::Plain("debug".into()),
        );
        let next = CommitId::new("1123456789abcdef0123456789abcdef01234567");
        let (one, p) = time(runs, || plan(&input(&next, &changed, &fps, &applied)));
        assert_eq!(p.summary(), "Plan: 0 to add, 1 to change, 0 to destroy.");

        println!(
            "| {n} | {replicas} | {} | {} | {} | {runs} |",
            ms(cold),
            ms(steady),
            ms(one)
        );
    }
}
