//! Measures the Docker driver against the local engine: the first deploy of a release (fetch, build, start,
//! healthy), container create+start latency, a deploy with a cached image until its replica is healthy, and
//! 20 replicas deployed at once.
//!
//! ```text
//! cargo run --release -p cairn-agent --example docker_latency -- [ROUNDS]
//! ```
//!
//! It needs a Docker engine, `git` and `/bin/busybox` (Debian's busybox-static); it builds its own images
//! (no pull), publishes only on 127.0.0.1, and removes every container and image it labelled on the way out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::query_parameters::BuildImageOptionsBuilder;
use cairn_agent::driver::label;
use cairn_agent::logs::Discard;
use cairn_agent::proxy::ProxyConfig;
use cairn_agent::spec::IsolationRequest;
use cairn_agent::{
    BuildSpec, Deployer, DeployerConfig, DockerConfig, DockerDriver, HealthSpec, Limits, Proxy,
    ReplicaSpec, Rewrites, SourceSpec, Sources,
};
use cairn_schema::{Domain, GitUrl, Identity, Name};
use futures_util::StreamExt;
use rand::Rng;

use cairn_testkit::git;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn clean_up(docker: &Docker, id: &str) {
    let installation = Name::new(id).expect("an installation id is a name");
    let gone = cairn_agent::dev::remove_containers(docker, &installation, Duration::ZERO).await;
    if let Err(e) = gone.and(cairn_agent::dev::remove_images(docker, &installation).await) {
        eprintln!("clean-up of {id} incomplete: {e}");
    }
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let docker = Docker::connect_with_socket_defaults()
        .expect("a Docker socket")
        .negotiate_version()
        .await
        .expect("a Docker engine");
    let id = format!("bench{:08x}", rand::thread_rng().r#gen::<u32>());
    let inst = Name::new(&id).unwrap();
    let tmp = tempfile::tempdir().unwrap();

    // The base image: busybox from scratch, classic builder, no pull.
    let t = Instant::now();
    let base = format!("cairn-bench/busybox:{id}");
    let mut tar = tar::Builder::new(Vec::new());
    let df = format!(
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nLABEL {}={id}\n",
        label::INSTALLATION
    );
    for (name, data, mode) in [
        ("Dockerfile", df.into_bytes(), 0o644),
        (
            "busybox",
            std::fs::read("/bin/busybox").expect("/bin/busybox"),
            0o755,
        ),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        tar.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    let labels = HashMap::from([(label::INSTALLATION.to_owned(), id.clone())]);
    let opts = BuildImageOptionsBuilder::default()
        .t(&base)
        .rm(true)
        .labels(&labels)
        .build();
    let mut s = docker.build_image(
        opts,
        None,
        Some(bollard::body_full(tar.into_inner().unwrap().into())),
    );
    while let Some(i) = s.next().await {
        assert!(i.expect("base image builds").error_detail.is_none());
    }
    println!(
        "base image build (busybox from scratch): {}",
        ms(t.elapsed())
    );

    // The app's source: a local bare repo, reached through a rewrite as a manifest's https URL would be.
    let (bare, work) = (tmp.path().join("app.git"), tmp.path().join("work"));
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::create_dir_all(work.join("www")).unwrap();
    git(&bare, &["init", "--bare", "-q"]);
    git(&work, &["init", "-q"]);
    std::fs::write(work.join("www/index.html"), "v1\n").unwrap();
    std::fs::write(work.join("www/healthz"), "ok\n").unwrap();
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "v1"]);
    git(
        &work,
        &["push", "-q", bare.to_str().unwrap(), "HEAD:refs/heads/main"],
    );
    let commit = git(&work, &["rev-parse", "HEAD"]);
    let url = GitUrl::new("https://github.com/acme/bench.git").unwrap();
    let rewrites = Rewrites::parse([format!("{url}=file://{}", bare.display())]).unwrap();

    let driver = Arc::new(DockerDriver::with_client(
        docker.clone(),
        DockerConfig::new(inst.clone(), Name::new("bench-node").unwrap()),
    ));
    let proxy = Proxy::new(ProxyConfig::default());
    let mut cfg = DeployerConfig::new(tmp.path().join("work-dir"));
    cfg.drain_grace = Duration::from_millis(0);
    let deployer = Arc::new(Deployer::new(
        driver.clone(),
        proxy,
        Sources::new(tmp.path().join("sources"), rewrites),
        Arc::new(Identity::generate()),
        cfg,
    ));
    let app = Name::new(&format!("b{:08x}", rand::thread_rng().r#gen::<u32>())).unwrap();
    let spec = |slot: u32| ReplicaSpec {
        installation: inst.clone(),
        app: app.clone(),
        release: 1,
        slot,
        config_commit: "bench".into(),
        source: SourceSpec {
            url: url.clone(),
            commit: commit.clone(),
        },
        build: BuildSpec {
            dockerfile: false,
            base_image: Some(base.clone()),
            commands: vec!["echo built > www/build.txt".into()],
            start: Some("exec httpd -f -p $PORT -h /app/www".into()),
            port: 8080,
        },
        image: None,
        push_to: None,
        limits: Limits {
            cpu_millis: 250,
            memory_bytes: 64 << 20,
        },
        env: Default::default(),
        secret_env: None,
        health: HealthSpec {
            path: "/healthz".into(),
            timeout_ms: 1000,
            attempts: 100,
        },
        hostnames: vec![Domain::new(&format!("{app}.bench.test")).unwrap()],
        isolation: IsolationRequest::default(),
    };

    let run = async {
        let first = deployer
            .deploy(&spec(0), &Discard)
            .await
            .map_err(|e| e.reason())?;
        let t = &first.timings;
        println!(
            "first deploy of a release: fetch {}, build {}, create+start {}, healthy {}, total {}",
            ms(t.fetch.unwrap_or_default()),
            ms(t.build.unwrap_or_default()),
            ms(t.start.unwrap_or_default()),
            ms(t.healthy.unwrap_or_default()),
            ms(t.total)
        );

        let (mut starts, mut totals) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let slot = 1 + round as u32;
            let r = deployer
                .deploy(&spec(slot), &Discard)
                .await
                .map_err(|e| e.reason())?;
            assert!(r.timings.build.is_none(), "the image is cached");
            starts.push(r.timings.start.unwrap_or_default());
            totals.push(r.timings.total);
            deployer
                .remove_slot(&app, slot)
                .await
                .map_err(|e| e.to_string())?;
        }
        println!(
            "container create+start through the driver ({rounds} rounds): p50 {}, p95 {}, max {}",
            ms(pct(&mut starts, 0.5)),
            ms(pct(&mut starts, 0.95)),
            ms(pct(&mut starts, 1.0))
        );
        println!(
            "deploy task to healthy replica, cached image ({rounds} rounds): p50 {}, p95 {}, max {}",
            ms(pct(&mut totals, 0.5)),
            ms(pct(&mut totals, 0.95)),
            ms(pct(&mut totals, 1.0))
        );

        let t = Instant::now();
        let all: Vec<_> = (100..120)
            .map(|slot| {
                let (d, s) = (deployer.clone(), spec(slot));
                tokio::spawn(async move { d.deploy(&s, &Discard).await.map_err(|e| e.reason()) })
            })
            .collect();
        let mut healthy = Vec::new();
        for h in all {
            let r = h.await.map_err(|e| e.to_string())??;
            healthy.push(r.timings.total);
        }
        println!(
            "20 replicas deployed at once, cached image: all healthy after {} (slowest deploy {}, fastest {})",
            ms(t.elapsed()),
            ms(pct(&mut healthy, 1.0)),
            ms(pct(&mut healthy, 0.0))
        );
        println!("image builds run: {}", driver.builds_run());
        Ok::<(), String>(())
    };
    let result = tokio::time::timeout(Duration::from_secs(600), run).await;
    clean_up(&docker, &id).await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e}"),
        Err(_) => panic!("the benchmark took longer than 10 minutes"),
    }
}
