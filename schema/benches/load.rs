//! Loads and validates generated repositories of 1,000 / 10,000 / 100,000 apps.
//!
//! `cargo bench -p cairn-schema --bench load` (release). Pass sizes as arguments to choose:
//! `cargo bench -p cairn-schema --bench load -- 1000 10000`.

use std::time::{Duration, Instant};

/// A repository of `apps` apps, 100 per file, with 10 plans, 4 runtimes and 100 nodes.
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
            "[node.n{n}]\ncpu = 64\nmemory = \"256GiB\"\ndisk = \"2TiB\"\nregion = \"r{}\"\nlabels = {{ disk = \"ssd\" }}\n\n",
            n % 3
        );
    }
    files.push(("infra.toml".to_owned(), infra.into_bytes()));
    let mut chunk = String::new();
    for a in 0..apps {
        chunk += &format!(
            "[app.app-{a}]\nplan = \"p{}\"\nruntime = \"node\"\nreplicas = {}\ndomains = [\"app-{a}.example.org\"]\n\n\
             [app.app-{a}.source]\nurl = \"https://github.com/acme/app-{a}.git\"\nbranch = \"main\"\n\n\
             [app.app-{a}.placement]\nregion = \"r{}\"\n\n[app.app-{a}.env]\nLOG_LEVEL = \"info\"\nWORKERS = \"4\"\n\n",
            a % 10,
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
    println!("| apps | files | bytes | load + validate (median of runs) | runs |");
    println!("|---:|---:|---:|---:|---:|");
    for n in sizes {
        let files = generate(n);
        let bytes: usize = files.iter().map(|(_, b)| b.len()).sum();
        let runs = if n >= 100_000 { 3 } else { 7 };
        let mut times: Vec<Duration> = (0..runs)
            .map(|_| {
                let t = Instant::now();
                let (_, loaded) =
                    cairn_schema::load(files.iter().map(|(p, b)| (p.as_str(), b.as_slice())));
                let d = t.elapsed();
                let desired = loaded.desired.expect("generated repo is valid");
                if std::env::var_os("SPLIT").is_some() {
                    let t = Instant::now();
                    for (_, b) in &files {
                        let _ = toml::de::DeTable::parse(std::str::from_utf8(b).unwrap()).unwrap();
                    }
                    eprintln!("toml parse alone: {:?} of {:?}", t.elapsed(), d);
                }
                assert_eq!(desired.apps.len(), n);
                d
            })
            .collect();
        times.sort();
        println!(
            "| {n} | {} | {bytes} | {:.1} ms | {runs} |",
            files.len(),
            times[runs / 2].as_secs_f64() * 1000.0
        );
        one_file_commits(n, &files);
    }
}

/// A one-file commit (one app's `LOG_LEVEL` changed, a new file each run): that file parsed, then the
/// repository assembled and validated afresh (`assemble_refs`, as every load did before) and
/// incrementally (`Assembler`, the last desired state handed back), asserted equal.
fn one_file_commits(n: usize, files: &[(String, Vec<u8>)]) {
    use std::sync::Arc;
    let mut parsed: Vec<Arc<cairn_schema::ParsedFile>> = files
        .iter()
        .map(|(p, b)| Arc::new(cairn_schema::parse_file(p, b)))
        .collect();
    let mut asm = cairn_schema::Assembler::new();
    let mut last = asm.assemble(&parsed, None).desired;
    let (mut full, mut incremental) = (Vec::new(), Vec::new());
    let runs = 7;
    for run in 0..runs {
        let a = (run * 7_919) % n;
        let i = 2 + a / 100;
        let text = String::from_utf8(files[i].1.clone()).unwrap().replace(
            &format!("[app.app-{a}.env]\nLOG_LEVEL = \"info\""),
            &format!("[app.app-{a}.env]\nLOG_LEVEL = \"debug-{run}\""),
        );
        parsed[i] = Arc::new(cairn_schema::parse_file(&files[i].0, text.as_bytes()));
        // Incremental first: timed after the full assembly, it paid for the allocator consolidating
        // that one's garbage (46 ms instead of 2 ms at 100,000 apps), which a control plane that never
        // assembles afresh does not do.
        let t = Instant::now();
        let loaded = asm.assemble(&parsed, last.take());
        incremental.push(t.elapsed());
        let t = Instant::now();
        let refs: Vec<&cairn_schema::ParsedFile> = parsed.iter().map(|f| f.as_ref()).collect();
        let afresh = cairn_schema::validate::assemble_refs(&refs);
        full.push(t.elapsed());
        let d = loaded.desired.expect("valid");
        assert_eq!(Some(&d), afresh.desired.as_ref(), "incremental equals full");
        assert!(
            format!("{:?}", d.apps[format!("app-{a}").as_str()].env)
                .contains(&format!("debug-{run}")),
            "the commit changed the app"
        );
        last = Some(d);
    }
    assert_eq!(
        asm.fresh_starts(),
        1,
        "every commit after the first was incremental"
    );
    full.sort();
    incremental.sort();
    println!(
        "| {n}: one-file commit, assembly + validation afresh / incremental | | | {:.2} ms / {:.3} ms | {runs} |",
        full[runs / 2].as_secs_f64() * 1000.0,
        incremental[runs / 2].as_secs_f64() * 1000.0
    );
}
