//! Shared test machinery: a per-test installation (its own id, temp dirs, Docker clean-up of exactly what
//! carries its label), a local git remote made with the real `git` CLI, the busybox base image, a proxy on
//! a loopback port, a poller, and the process-wide log capture.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bollard::Docker;
use bytes::Bytes;
use cairn_agent::driver::docker::installation_containers;
use cairn_agent::driver::label;
use cairn_agent::proxy::ProxyConfig;
use cairn_agent::spec::IsolationRequest;
use cairn_agent::{
    BuildSpec, Deployer, DeployerConfig, Driver, HealthSpec, Limits, Proxy, ReplicaSpec, Rewrites,
    SourceSpec, Sources,
};
use cairn_schema::{Domain, GitUrl, Identity, Name};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::Rng;

pub use cairn_agent::logs::Discard;

pub use cairn_testkit::missing;

/// A connected Docker client, or `None` after [`missing`] said why.
pub async fn docker(test: &str) -> Option<Docker> {
    let connect = cairn_agent::driver::docker::connect_engine();
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(d)) => Some(d),
        Ok(Err(e)) => {
            missing(test, "the Docker engine", cairn_schema::error::chain(&e));
            None
        }
        Err(_) => {
            missing(test, "the Docker engine", "no answer within 10 s");
            None
        }
    }
}

/// Whether the `git` CLI and the static busybox are there.
pub fn tools(test: &str) -> bool {
    if let Err(e) = Command::new("git").arg("--version").output() {
        missing(test, "the git CLI", e);
        return false;
    }
    if !Path::new(BUSYBOX).is_file() {
        missing(
            test,
            BUSYBOX,
            "not installed (Debian package busybox-static)",
        );
        return false;
    }
    true
}

pub const BUSYBOX: &str = "/bin/busybox";

/// Runs `f` under a bound, so no test hangs.
pub async fn bounded<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("the test took longer than {secs} s"),
    }
}

fn random_label(prefix: &str) -> String {
    format!("{prefix}{:08x}", rand::thread_rng().r#gen::<u32>())
}

/// One test's installation: an id no other test shares, its temp dirs, and (when given a Docker client)
/// the clean-up of every container and image labelled with that id, even when the test panics.
pub struct Installation {
    pub id: Name,
    pub node: Name,
    pub dir: tempfile::TempDir,
    pub docker: Option<Docker>,
}

impl Installation {
    pub fn new(docker: Option<Docker>) -> Self {
        Installation {
            id: Name::new(&random_label("t")).unwrap(),
            node: Name::new("node-a").unwrap(),
            dir: tempfile::tempdir().unwrap(),
            docker,
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// A unique app name (image tags are `cairn/<app>:<release>`, shared by every test on the engine).
    pub fn app(&self) -> Name {
        Name::new(&random_label("w")).unwrap()
    }

    /// The busybox base image, built with the classic builder and no pull, labelled for clean-up.
    pub async fn busybox_image(&self) -> String {
        let docker = self.docker.as_ref().expect("a Docker test");
        let tag = format!("cairn-test/busybox:{}", self.id);
        let labels = HashMap::from([(label::INSTALLATION.to_owned(), self.id.to_string())]);
        cairn_agent::dev::build_busybox_image(docker, &tag, Path::new(BUSYBOX), &labels)
            .await
            .expect("the busybox base image builds");
        tag
    }

    /// Containers of this installation, whatever their state.
    pub async fn containers(&self) -> Vec<bollard::models::ContainerSummary> {
        let docker = self.docker.as_ref().expect("a Docker test");
        installation_containers(docker, &self.id).await.unwrap()
    }
}

impl Drop for Installation {
    fn drop(&mut self) {
        let Some(docker) = self.docker.clone() else {
            return;
        };
        let id = self.id.to_string();
        // Drop cannot await; clean up on a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(60), clean_up(&docker, &id)).await;
            });
        })
        .join();
    }
}

async fn clean_up(docker: &Docker, id: &str) {
    let installation = Name::new(id).expect("an installation id is a name");
    let gone = cairn_agent::dev::remove_containers(docker, &installation, Duration::ZERO).await;
    if let Err(e) = gone.and(cairn_agent::dev::remove_images(docker, &installation).await) {
        eprintln!("clean-up of {id} incomplete: {e}");
    }
}

/// The app's repository: a bare remote made with the real git CLI, and a work tree that pushes to it.
pub struct AppRepo {
    pub bare: PathBuf,
    work: PathBuf,
    /// The URL the manifests use; a rewrite points it at the bare repo.
    pub url: GitUrl,
}

use cairn_testkit::git;

impl AppRepo {
    pub fn new(root: &Path, name: &str) -> Self {
        let bare = root.join(format!("remote/{name}.git"));
        let work = root.join(format!("work/{name}"));
        std::fs::create_dir_all(&bare).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        git(&bare, &["init", "--bare", "-q"]);
        git(&work, &["init", "-q"]);
        let url = GitUrl::new(&format!("https://github.com/acme/{name}.git")).unwrap();
        AppRepo { bare, work, url }
    }

    /// Writes `files` (path, contents, executable), commits, pushes to `main`; returns the commit id.
    pub fn commit(&self, files: &[(&str, &str, bool)], message: &str) -> String {
        for (path, contents, exec) in files {
            let p = self.work.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, contents).unwrap();
            if *exec {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "-m", message]);
        let bare = self.bare.to_string_lossy().into_owned();
        git(&self.work, &["push", "-q", &bare, "HEAD:refs/heads/main"]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    /// The rewrite that sends this repo's https URL to the local bare repo.
    pub fn rewrites(&self) -> Rewrites {
        Rewrites::parse([format!("{}=file://{}", self.url, self.bare.display())]).unwrap()
    }

    /// A version of the test web app: `www/index.html` says `version`, `www/healthz` says ok.
    pub fn commit_version(&self, version: &str) -> String {
        self.commit(
            &[
                ("www/index.html", &format!("{version}\n"), false),
                ("www/healthz", "ok\n", false),
            ],
            version,
        )
    }
}

/// A replica spec for the test app at `commit`.
pub fn spec(
    inst: &Installation,
    app: &Name,
    repo: &AppRepo,
    release: u64,
    commit: &str,
    build: BuildSpec,
) -> ReplicaSpec {
    ReplicaSpec {
        installation: inst.id.clone(),
        app: app.clone(),
        release,
        slot: 0,
        config_commit: format!("cfg{release}"),
        source: SourceSpec {
            url: repo.url.clone(),
            commit: commit.to_owned(),
        },
        build,
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
            attempts: 40,
        },
        hostnames: vec![host(app)],
        isolation: IsolationRequest::default(),
    }
}

pub fn host(app: &Name) -> Domain {
    Domain::new(&format!("{app}.apps.test")).unwrap()
}

/// The Docker runtime of the test app: busybox httpd serving `www`, with a build command whose output
/// proves it ran.
pub fn docker_build(base: &str) -> BuildSpec {
    BuildSpec {
        dockerfile: false,
        base_image: Some(base.to_owned()),
        commands: vec!["echo built-$(cat www/index.html) > www/build.txt".into()],
        start: Some("exec httpd -f -p $PORT -h /app/www".into()),
        port: 8080,
    }
}

/// The process runtime of the test app.
pub fn process_build() -> BuildSpec {
    BuildSpec {
        dockerfile: false,
        base_image: None,
        commands: vec!["echo built-$(cat www/index.html) > www/build.txt".into()],
        start: Some(format!("exec {BUSYBOX} httpd -f -p 127.0.0.1:$PORT -h www")),
        port: 8080,
    }
}

/// A proxy on a loopback port Docker does not use, and a deployer around `driver`.
pub struct Node {
    pub deployer: Deployer,
    pub proxy: Arc<Proxy>,
    pub proxy_addr: SocketAddr,
    pub identity: Arc<Identity>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Node {
    pub async fn start(inst: &Installation, driver: Arc<dyn Driver>, rewrites: Rewrites) -> Node {
        Node::start_with(inst, driver, rewrites, "node").await
    }

    /// A node whose source cache and work dir are `<dirs>-sources` and `<dirs>-work`.
    pub async fn start_with(
        inst: &Installation,
        driver: Arc<dyn Driver>,
        rewrites: Rewrites,
        dirs: &str,
    ) -> Node {
        let proxy = Proxy::new(ProxyConfig {
            // A request for an app without a replica gets its 503 soon (tests check it).
            pending_timeout: Duration::from_millis(300),
            ..ProxyConfig::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(proxy.clone().serve(listener, async {
            let _ = stopped.await;
        }));
        let identity = Arc::new(Identity::generate());
        let sources = Sources::new(inst.path(&format!("{dirs}-sources")), rewrites);
        let mut cfg = DeployerConfig::new(inst.path(&format!("{dirs}-work")));
        cfg.drain_grace = Duration::from_millis(300);
        cfg.drain_max = Duration::from_secs(10);
        cfg.fetch_timeout = Duration::from_secs(60);
        let deployer = Deployer::new(driver, proxy.clone(), sources, identity.clone(), cfg);
        Node {
            deployer,
            proxy,
            proxy_addr,
            identity,
            stop: Some(stop),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// An HTTP client that keeps connections to the proxy alive, as browsers do.
pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// One GET through the proxy with `host` as the Host header: (status, body).
pub async fn get(
    client: &Client<HttpConnector, Empty<Bytes>>,
    proxy: SocketAddr,
    host: &str,
    path: &str,
) -> Result<(u16, String), String> {
    let req = hyper::Request::get(format!("http://{proxy}{path}"))
        .header(hyper::header::HOST, host)
        .body(Empty::new())
        .unwrap();
    let attempt = async {
        let res = client.request(req).await.map_err(|e| format!("{e:?}"))?;
        let status = res.status().as_u16();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{e:?}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .map_err(|_| "timed out".to_owned())?
}

pub use cairn_testkit::poll::{Poller, assert_steady, assert_switch};

/// A [`Poller`] of `GET /` through the proxy at `proxy` with `host` as the `Host` header, every `every`,
/// with keep-alive connections.
pub fn poll(proxy: SocketAddr, host: &str, every: Duration) -> Poller {
    let (c, host) = (client(), host.to_owned());
    Poller::start(every, move || {
        let (c, host) = (c.clone(), host.clone());
        async move { get(&c, proxy, &host, "/").await }
    })
}

/// Everything written by `tracing` (and the `log` crate, bridged) in this test binary, through the filter
/// the agent binary must use ([`cairn_agent::logs::env_filter`] at `trace`), and separately everything
/// bollard logs at every level without that cap.
pub struct Captured {
    pub agent: Arc<Mutex<Vec<u8>>>,
    pub bollard_uncapped: Arc<Mutex<Vec<u8>>>,
}

impl Captured {
    pub fn agent_text(&self) -> String {
        String::from_utf8_lossy(&self.agent.lock().unwrap()).into_owned()
    }
    pub fn bollard_text(&self) -> String {
        String::from_utf8_lossy(&self.bollard_uncapped.lock().unwrap()).into_owned()
    }
}

struct BufWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for BufWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn capture() -> &'static Captured {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    CAPTURED.get_or_init(|| {
        use tracing_subscriber::Layer;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let agent = Arc::new(Mutex::new(Vec::new()));
        let bollard = Arc::new(Mutex::new(Vec::new()));
        let (a, b) = (agent.clone(), bollard.clone());
        let agent_layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || BufWriter(a.clone()))
            .with_filter(cairn_agent::logs::env_filter("trace"));
        let bollard_layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || BufWriter(b.clone()))
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("bollard", tracing::Level::TRACE),
            );
        let _ = tracing_subscriber::registry()
            .with(agent_layer)
            .with(bollard_layer)
            .try_init();
        let _ = std::io::stderr().flush();
        Captured {
            agent,
            bollard_uncapped: bollard,
        }
    })
}
