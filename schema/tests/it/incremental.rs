//! The incremental assembler against the full one: random commit sequences (resources added, edited,
//! moved between files and removed; duplicates, unknown references, clashing domains and addresses,
//! broken TOML, a missing or changed `cairn.toml`) applied both ways must give the same desired state,
//! the same diagnostics in the same order and the same secret sites, at every commit.

use std::collections::BTreeMap;
use std::sync::Arc;

use cairn_schema::validate::{Loaded, assemble_refs};
use cairn_schema::{Assembler, Desired, ParsedFile, parse_file};
use proptest::prelude::*;

const CIPHERTEXT: &str = "{ secret = \"\"\"
-----BEGIN AGE ENCRYPTED FILE-----
YWdlLWVuY3J5cHRpb24ub3JnL3YxCi0+IFgyNTUxOSBQdTlITU1GTUJTNHZZY2lO
SGtpRE03L2RxSDdObmtlYkZacGduYnlDclRRClFsaVRlZHUxT0lTMVZmN1ZpK2hZ
MVZNdm9hR3dSV0FOUU9mdU9xQ255WFkKLS0tIHIrK3kwV21mNHFmK1p6d0lHMlhI
WkNIV3VBbXdCVENsdUJSRzBmSXhjTUUKBb9LmBBRAM34pRcQvaRRlQBz+CCZPDUo
OGnlE1WLA1BsIIi/zQQ3paJBXQXW2cjYrudcXhd+bzowx9ueEcgp26AsgYFzxors
gGlFCZwRBXan9TO7nLHozu/hG7Vymh7B1tiYWomxn24=
-----END AGE ENCRYPTED FILE-----
\"\"\" }";

const PATHS: [&str; 7] = [
    "cairn.toml",
    "infra.toml",
    "nodes.toml",
    "apps/a.toml",
    "apps/b.toml",
    "more.toml",
    "z/deep/c.toml",
];
const PLANS: [&str; 3] = ["small", "large", "smal"];
const RUNTIMES: [&str; 3] = ["node", "python", "nod"];
const NODES: [&str; 3] = ["n1", "n2", "n3"];
const APPS: [&str; 5] = ["a", "b", "c", "shop", "shoop"];
const DATABASES: [&str; 3] = ["main", "cache", "mian"];
const REGIONS: [&str; 2] = ["eu", "us"];
const DISKS: [&str; 2] = ["ssd", "hdd"];
const DOMAINS: [&str; 4] = [
    "x.example.com",
    "shop.apps.example.com",
    "a.example.org",
    "b.apps.example.com",
];

/// One `[kind.name]` table (or something broken), as a commit writes it.
#[derive(Debug, Clone)]
enum Block {
    Plan {
        name: usize,
        max: u32,
        cpu: u8,
    },
    Runtime {
        name: usize,
        port: u16,
    },
    Node {
        name: usize,
        region: Option<usize>,
        disk: Option<usize>,
        address: Option<u8>,
    },
    App {
        name: usize,
        plan: usize,
        runtime: usize,
        replicas: Option<u32>,
        domains: Vec<usize>,
        region: Option<usize>,
        disk: Option<usize>,
        level: u8,
        secret: bool,
        tls_auto: bool,
        databases: Vec<usize>,
    },
    Sink {
        name: usize,
        apps: Vec<usize>,
    },
    Database {
        name: usize,
        plan: usize,
        node: Option<usize>,
    },
    /// An app table with a wrong type: declared, no resource.
    BrokenApp {
        name: usize,
        plan: usize,
    },
    /// Not TOML at all.
    Garbage,
}

/// A name index, mostly of the declared ones (0 and 1), sometimes the misspelt one (2).
fn mostly_known() -> impl Strategy<Value = usize> {
    prop_oneof![14 => 0..2usize, 1 => Just(2usize)]
}

fn block() -> impl Strategy<Value = Block> {
    prop_oneof![
        2 => (0..3usize, 2..6u32, 1..4u8).prop_map(|(name, max, cpu)| Block::Plan { name, max, cpu }),
        1 => (0..3usize, 3000..3002u16).prop_map(|(name, port)| Block::Runtime { name, port }),
        2 => (
            0..3usize,
            proptest::option::of(0..2usize),
            proptest::option::of(0..2usize),
            proptest::option::of(1..3u8)
        )
            .prop_map(|(name, region, disk, address)| Block::Node {
                name,
                region,
                disk,
                address
            }),
        8 => (
            0..5usize,
            mostly_known(),
            mostly_known(),
            proptest::option::of(0..5u32),
            proptest::collection::vec(0..4usize, 0..2),
            proptest::option::of(0..2usize),
            proptest::option::of(0..2usize),
            0..3u8,
            any::<bool>(),
            prop::bool::weighted(0.08),
            prop_oneof![4 => Just(Vec::new()), 1 => proptest::collection::vec(mostly_known(), 1..2)],
        )
            .prop_map(
                |(name, plan, runtime, replicas, domains, region, disk, level, secret, tls_auto, databases)| {
                    Block::App {
                        name,
                        plan,
                        runtime,
                        replicas,
                        domains,
                        region,
                        disk,
                        level,
                        secret,
                        tls_auto,
                        databases,
                    }
                }
            ),
        1 => (1..3usize, mostly_known(), proptest::option::of(0..3usize))
            .prop_map(|(name, plan, node)| Block::Database { name, plan, node }),
        1 => (0..2usize, proptest::collection::vec(0..5usize, 0..3))
            .prop_map(|(name, apps)| Block::Sink { name, apps }),
        1 => (0..5usize, 0..3usize).prop_map(|(name, plan)| Block::BrokenApp { name, plan }),
        1 => Just(Block::Garbage),
    ]
}

fn render(b: &Block) -> String {
    match b {
        Block::Plan { name, max, cpu } => format!(
            "[plan.{}]\ncpu = 0.{cpu}\nmemory = \"256MiB\"\ndisk = \"1GiB\"\nprice = \"1.00\"\nmax_replicas = {max}\n\n",
            PLANS[*name]
        ),
        Block::Runtime { name, port } => format!(
            "[runtime.{}]\nimage = \"node:22\"\nbuild = [\"make\"]\nstart = \"run\"\nport = {port}\n\n",
            RUNTIMES[*name]
        ),
        Block::Node {
            name,
            region,
            disk,
            address,
        } => {
            let mut s = format!(
                "[node.{}]\ncpu = 4\nmemory = \"8GiB\"\ndisk = \"100GiB\"\n",
                NODES[*name]
            );
            if let Some(r) = region {
                s += &format!("region = \"{}\"\n", REGIONS[*r]);
            }
            if let Some(d) = disk {
                s += &format!("labels = {{ disk = \"{}\" }}\n", DISKS[*d]);
            }
            if let Some(a) = address {
                s += &format!("address = \"10.0.0.{a}\"\n");
            }
            s + "\n"
        }
        Block::App {
            name,
            plan,
            runtime,
            replicas,
            domains,
            region,
            disk,
            level,
            secret,
            tls_auto,
            databases,
        } => {
            let n = APPS[*name];
            let mut s = format!(
                "[app.{n}]\nplan = \"{}\"\nruntime = \"{}\"\n",
                PLANS[*plan], RUNTIMES[*runtime]
            );
            if let Some(r) = replicas {
                s += &format!("replicas = {r}\n");
            }
            if !domains.is_empty() {
                let d: Vec<String> = domains
                    .iter()
                    .map(|d| format!("\"{}\"", DOMAINS[*d]))
                    .collect();
                s += &format!("domains = [{}]\n", d.join(", "));
            }
            if *tls_auto {
                s += "tls = \"auto\"\n";
            }
            if !databases.is_empty() {
                let d: Vec<String> = databases
                    .iter()
                    .map(|d| format!("{} = \"DB_{d}_URL\"", DATABASES[*d]))
                    .collect();
                s += &format!("databases = {{ {} }}\n", d.join(", "));
            }
            s += &format!(
                "\n[app.{n}.source]\nurl = \"https://github.com/acme/{n}.git\"\nbranch = \"main\"\n\n"
            );
            if region.is_some() || disk.is_some() {
                s += &format!("[app.{n}.placement]\n");
                if let Some(r) = region {
                    s += &format!("region = \"{}\"\n", REGIONS[*r]);
                }
                if let Some(d) = disk {
                    s += &format!("labels = {{ disk = \"{}\" }}\n", DISKS[*d]);
                }
                s += "\n";
            }
            s += &format!("[app.{n}.env]\nLEVEL = \"{level}\"\n");
            if *secret {
                s += &format!("TOKEN = {CIPHERTEXT}\n");
            }
            s + "\n"
        }
        Block::Sink { name, apps } => {
            let a: Vec<String> = apps.iter().map(|a| format!("\"{}\"", APPS[*a])).collect();
            format!(
                "[notify.s{name}]\nkind = \"slack\"\nurl = {CIPHERTEXT}\napps = [{}]\n\n",
                a.join(", ")
            )
        }
        Block::Database { name, plan, node } => {
            let mut s = format!(
                "[database.{}]\nengine = \"postgres\"\nversion = \"15\"\nplan = \"{}\"\n",
                DATABASES[*name], PLANS[*plan]
            );
            if let Some(n) = node {
                s += &format!("node = \"{}\"\n", NODES[*n]);
            }
            s + "backup = { schedule = \"0 3 * * *\", to = \"dir:/var/backups\" }\n\n"
        }
        Block::BrokenApp { name, plan } => format!(
            "[app.{}]\nplan = \"{}\"\nruntime = \"node\"\nreplicas = \"many\"\n\n",
            APPS[*name], PLANS[*plan]
        ),
        Block::Garbage => "this is [[ not toml\n".to_owned(),
    }
}

/// What a commit does to one file.
#[derive(Debug, Clone)]
enum Edit {
    Remove(usize),
    /// The same text parsed again (a new `Arc`, as a source without a parse cache gives).
    Touch(usize),
    /// A file's blocks; a table declared twice in one file (a TOML error) only when the flag says so.
    Write(usize, Vec<Block>, bool),
    /// `cairn.toml`: a base domain, with or without `[tls]`.
    Settings {
        base: usize,
        tls: bool,
    },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        1 => (0..PATHS.len()).prop_map(Edit::Remove),
        1 => (0..PATHS.len()).prop_map(Edit::Touch),
        2 => (proptest::collection::vec(block(), 0..4), prop::bool::weighted(0.1), prop::bool::weighted(0.7))
            .prop_map(|(b, twice, keep)| {
                let mut blocks = if keep { infra() } else { Vec::new() };
                blocks.extend(b);
                Edit::Write(1, blocks, twice)
            }),
        2 => (proptest::collection::vec(block(), 0..3), prop::bool::weighted(0.1), prop::bool::weighted(0.6))
            .prop_map(|(b, twice, keep)| {
                let mut blocks = if keep { nodes() } else { Vec::new() };
                blocks.extend(b);
                Edit::Write(2, blocks, twice)
            }),
        8 => (3..PATHS.len(), proptest::collection::vec(block(), 0..4), prop::bool::weighted(0.1))
            .prop_map(|(p, b, twice)| Edit::Write(p, b, twice)),
        1 => (0..2usize, any::<bool>()).prop_map(|(base, tls)| Edit::Settings { base, tls }),
    ]
}

/// A commit: one or more edits, and whether the caller hands the last desired state back.
fn commit() -> impl Strategy<Value = (Vec<Edit>, bool)> {
    (
        proptest::collection::vec(edit(), 1..3),
        prop::bool::weighted(0.85),
    )
}

fn settings(base: usize, tls: bool) -> String {
    let mut s = format!(
        "base_domain = \"{}\"\n",
        ["apps.example.com", "example.com"][base]
    );
    if tls {
        s += "\n[tls]\ncontact = \"ops@example.com\"\n";
    }
    s
}

/// The repository as files; unchanged files keep their parsed `Arc`, as the git source's cache does.
struct Repo {
    text: BTreeMap<&'static str, String>,
    parsed: BTreeMap<&'static str, Arc<ParsedFile>>,
}

impl Repo {
    fn apply(&mut self, e: &Edit) {
        let (path, text) = match e {
            Edit::Remove(p) => {
                self.text.remove(PATHS[*p]);
                self.parsed.remove(PATHS[*p]);
                return;
            }
            Edit::Write(p, blocks, twice) => {
                let mut seen = std::collections::BTreeSet::new();
                let text = blocks
                    .iter()
                    .map(render)
                    .filter(|t| *twice || seen.insert(t.lines().next().unwrap_or("").to_owned()))
                    .collect::<String>();
                (PATHS[*p], text)
            }
            Edit::Settings { base, tls } => (PATHS[0], settings(*base, *tls)),
            Edit::Touch(p) => {
                if let Some(text) = self.text.get(PATHS[*p]) {
                    self.parsed
                        .insert(PATHS[*p], Arc::new(parse_file(PATHS[*p], text.as_bytes())));
                }
                return;
            }
        };
        if self.text.get(path) == Some(&text) && self.parsed.contains_key(path) {
            return;
        }
        self.parsed
            .insert(path, Arc::new(parse_file(path, text.as_bytes())));
        self.text.insert(path, text);
    }

    fn files(&self, reversed: bool) -> Vec<Arc<ParsedFile>> {
        let mut v: Vec<_> = self.parsed.values().cloned().collect();
        if reversed {
            v.reverse();
        }
        v
    }
}

/// The plans and runtimes of the valid start.
fn infra() -> Vec<Block> {
    vec![
        Block::Plan {
            name: 0,
            max: 3,
            cpu: 1,
        },
        Block::Plan {
            name: 1,
            max: 5,
            cpu: 2,
        },
        Block::Runtime {
            name: 0,
            port: 3000,
        },
        Block::Runtime {
            name: 1,
            port: 3001,
        },
        Block::Database {
            name: 0,
            plan: 0,
            node: None,
        },
    ]
}

/// The nodes of the valid start, in two regions.
fn nodes() -> Vec<Block> {
    vec![
        Block::Node {
            name: 0,
            region: Some(0),
            disk: Some(0),
            address: Some(1),
        },
        Block::Node {
            name: 1,
            region: Some(1),
            disk: Some(1),
            address: None,
        },
    ]
}

/// A valid start: `cairn.toml`, two plans and two runtimes in one file, two nodes in another.
fn base() -> Repo {
    let mut repo = Repo {
        text: BTreeMap::new(),
        parsed: BTreeMap::new(),
    };
    repo.apply(&Edit::Settings {
        base: 0,
        tls: false,
    });
    repo.apply(&Edit::Write(1, infra(), false));
    repo.apply(&Edit::Write(2, nodes(), false));
    repo
}

fn compare(step: usize, inc: &Loaded, full: &Loaded) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        &inc.diagnostics.0,
        &full.diagnostics.0,
        "diagnostics differ at commit {}",
        step
    );
    prop_assert_eq!(
        &inc.desired,
        &full.desired,
        "desired differs at commit {}",
        step
    );
    prop_assert_eq!(
        format!("{:?}", inc.secrets),
        format!("{:?}", full.secrets),
        "secret sites differ at commit {}",
        step
    );
    prop_assert_eq!(
        format!("{:?}", inc.tls_keys),
        format!("{:?}", full.tls_keys),
        "key sites differ at commit {}",
        step
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn incremental_assembly_equals_full_assembly(
        first in proptest::collection::vec(edit(), 0..6),
        commits in proptest::collection::vec(commit(), 1..12),
        reversed in any::<bool>(),
    ) {
        let mut repo = base();
        for e in &first {
            repo.apply(e);
        }
        let mut asm = Assembler::new();
        let mut last: Option<Desired> = None;
        let mut fresh = 1;
        // The last valid desired state and its revision: the apps changed since are all named.
        let mut valid: Option<(cairn_schema::Revision, Desired)> = None;
        for (step, (edits, give_back)) in std::iter::once((Vec::new(), true)).chain(commits).enumerate() {
            for e in &edits {
                repo.apply(e);
            }
            let files = repo.files(reversed);
            let refs: Vec<&ParsedFile> = files.iter().map(|f| f.as_ref()).collect();
            let full = assemble_refs(&refs);
            // A desired state not handed back costs a fresh start; anything else is incremental.
            if last.is_some() && !give_back {
                fresh += 1;
            }
            let inc = asm.assemble(&files, if give_back { last.take() } else { None });
            compare(step, &inc, &full)?;
            prop_assert_eq!(asm.fresh_starts(), fresh, "fresh starts at commit {}", step);
            let revision = inc.revision.expect("an assembler's output has a revision");
            if let Some(d) = &full.desired {
                if let Some((since, before)) = &valid {
                    let named = asm.apps_changed(*since, revision);
                    prop_assert_eq!(named.is_some(), since.lineage == revision.lineage, "commit {}", step);
                    for a in before.apps.keys().chain(d.apps.keys()) {
                        if let Some(named) = &named {
                            prop_assert!(
                                before.apps.get(a) == d.apps.get(a) || named.contains(a),
                                "commit {}: app {} changed, not named in {:?}", step, a, named
                            );
                        }
                    }
                }
                valid = Some((revision, d.clone()));
            }
            last = inc.desired;
        }
    }
}

/// The generator reaches both sides: valid commits with apps, and every cross-file finding.
#[test]
fn the_generator_reaches_valid_and_invalid_commits() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut valid_with_apps, mut messages) = (0, std::collections::BTreeSet::new());
    for _ in 0..400 {
        let edits = proptest::collection::vec(edit(), 1..4)
            .new_tree(&mut runner)
            .expect("a value")
            .current();
        let mut repo = base();
        for e in &edits {
            repo.apply(e);
        }
        let files = repo.files(false);
        let loaded = Assembler::new().assemble(&files, None);
        if loaded.desired.as_ref().is_some_and(|d| !d.apps.is_empty()) {
            valid_with_apps += 1;
        }
        for d in &loaded.diagnostics.0 {
            let m = &d.message;
            if std::env::var_os("HIST").is_some() && d.is_error() {
                eprintln!("ERR {m}");
            }
            for what in [
                "duplicate",
                "unknown plan",
                "unknown runtime",
                "replicas exceed",
                "is also used by app",
                "generated domain",
                "is also node",
                "no node is in region",
                "no node has label",
                "lists unknown app",
                "has no `[tls]`",
                "unknown database",
                "unknown node",
            ] {
                if m.contains(what) {
                    messages.insert(what);
                }
            }
        }
    }
    eprintln!("valid commits with apps: {valid_with_apps}");
    assert!(
        valid_with_apps >= 40,
        "only {valid_with_apps} valid commits with apps"
    );
    assert_eq!(messages.len(), 13, "findings reached: {messages:?}");
}

/// Checks one commit sequence both ways (for the named regressions below).
fn both_ways(commits: &[Vec<Edit>]) {
    let mut repo = base();
    let mut asm = Assembler::new();
    let mut last = None;
    for (step, edits) in std::iter::once(&Vec::new()).chain(commits).enumerate() {
        for e in edits {
            repo.apply(e);
        }
        let files = repo.files(false);
        let refs: Vec<&ParsedFile> = files.iter().map(|f| f.as_ref()).collect();
        let full = assemble_refs(&refs);
        let inc = asm.assemble(&files, last.take());
        if std::env::var_os("SHOW").is_some() {
            eprintln!("step {step}: {}", full.diagnostics);
        }
        compare(step, &inc, &full).unwrap_or_else(|e| panic!("{e}"));
        last = inc.desired;
    }
}

fn app_block(
    name: usize,
    region: Option<usize>,
    disk: Option<usize>,
    domains: Vec<usize>,
) -> Block {
    Block::App {
        name,
        plan: 0,
        runtime: 0,
        replicas: Some(1),
        domains,
        region,
        disk,
        level: 0,
        secret: false,
        tls_auto: false,
        databases: Vec::new(),
    }
}

#[test]
fn an_app_attaching_a_database_is_rechecked_when_the_database_comes_and_goes() {
    let mut app = app_block(0, None, None, vec![]);
    if let Block::App { databases, .. } = &mut app {
        databases.push(0);
    }
    let db = Block::Database {
        name: 0,
        plan: 0,
        node: Some(0),
    };
    both_ways(&[
        vec![Edit::Write(3, vec![app], false)],
        vec![Edit::Write(5, vec![db.clone()], false)],
        vec![Edit::Write(2, Vec::new(), false)],
        vec![Edit::Write(2, nodes(), false)],
        vec![Edit::Remove(5)],
    ]);
}

#[test]
fn an_app_is_warned_when_the_last_node_with_its_label_goes() {
    both_ways(&[
        vec![Edit::Write(
            3,
            vec![app_block(0, None, Some(0), vec![])],
            false,
        )],
        vec![Edit::Write(2, vec![nodes()[1].clone()], false)],
        vec![Edit::Write(2, nodes(), false)],
    ]);
}

/// A first load parses its files on several threads (`parse_files`): the same parses, in the same
/// order, as one by one, good files and broken ones alike.
#[test]
fn parsing_many_files_together_gives_each_files_own_parse_in_order() {
    let files: Vec<(String, Vec<u8>)> = (0..300)
        .map(|i| {
            let text = match i % 3 {
                0 => format!("[plan.p{i}]\ncpu = 0.5\nmemory = \"256MiB\"\ndisk = \"1GiB\"\nprice = \"1.00\"\nmax_replicas = 3\n"),
                1 => format!("[app.a{i}]\nplan = \"p\"\nruntime = \"r\"\nbogus = 1\n"),
                _ => format!("[node.n{i}\naddress = "),
            };
            (format!("dir{}/f{i:03}.toml", i % 7), text.into_bytes())
        })
        .collect();
    let together = cairn_schema::parse_files(&files);
    assert_eq!(together.len(), files.len());
    for ((path, bytes), parsed) in files.iter().zip(&together) {
        assert_eq!(&parsed.path, path);
        assert_eq!(
            format!("{parsed:?}"),
            format!("{:?}", parse_file(path, bytes)),
            "{path}"
        );
    }
    assert!(
        together.iter().any(|f| f.diagnostics.is_empty())
            && together.iter().any(|f| !f.diagnostics.is_empty()),
        "both good and broken files"
    );
}
