//! A real ACME CA for one test: Debian's `pebble` (Let's Encrypt's test CA) with its own HTTPS
//! certificate made here, resolving names through `pebble-challtestsrv`, a DNS server the test scripts
//! (which name answers with which address).
//!
//! ```no_run
//! # async fn example(dir: &std::path::Path) {
//! let Some(ca) = cairn_testkit::pebble::Pebble::start("my_test", dir, 5002).await else { return };
//! ca.dns_a("shop.example.test", "127.0.0.1").await;
//! // ACME directory: ca.directory, trusted through ca.api_root_pem; issued chains verify against
//! // ca.issuer_root_pem().await.
//! # }
//! ```
//!
//! Pebble validates HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port` ([`Pebble::start_with`])
//! of whatever address the name resolves to, issues certificates for `validity` when given (pebble's
//! `certificateValidityPeriod`: a renewal in seconds, not years), with no sleeps before
//! validating, no nonces rejected at random, no authorization reuse), and logs every order it adds
//! ([`Pebble::orders`] counts them). Both processes listen on loopback ports of their own and are killed
//! when the [`Pebble`] is dropped.

use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;
use crate::skip::{missing, tail};

pub const PEBBLE: &str = "/usr/bin/pebble";
pub const CHALLTESTSRV: &str = "/usr/bin/pebble-challtestsrv";

/// How [`Pebble::start_with`] configures pebble.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Where pebble connects to validate HTTP-01 (on whatever address the name resolves to).
    pub http_port: u16,
    /// Where pebble connects to validate TLS-ALPN-01.
    pub tls_port: u16,
    /// How long the certificates it issues are valid; `None`: pebble's default (five years).
    pub validity: Option<Duration>,
}

/// A running pebble and its DNS server; dropping it kills both.
#[derive(Debug)]
pub struct Pebble {
    /// The ACME directory URL (`https://127.0.0.1:PORT/dir`).
    pub directory: String,
    /// The root that pebble's own HTTPS certificate (API and management) chains to: what an ACME client
    /// must trust to talk to it.
    pub api_root_pem: String,
    /// `127.0.0.1:PORT` of the DNS server pebble resolves names with.
    pub dns: String,
    management: String,
    dns_management: String,
    /// Pebble's log (its stdout and stderr).
    pub log: PathBuf,
    config: PathBuf,
    /// How many times pebble came up (its log is appended to across restarts).
    started: usize,
    pebble: Child,
    challtestsrv: Child,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in [&mut self.pebble, &mut self.challtestsrv] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_udp_port() -> u16 {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback UDP port")
}

impl Pebble {
    /// Starts pebble-challtestsrv and pebble (files and logs under `dir`); pebble validates HTTP-01 on
    /// `http_port`. `None` (after a `SKIPPED` message) when the `pebble` package is not installed; under
    /// CI or `CAIRN_TEST_REQUIRE_ALL` that panics instead. Installed but not coming up panics with the log.
    pub async fn start(test: &str, dir: &Path, http_port: u16) -> Option<Pebble> {
        Pebble::start_with(
            test,
            dir,
            Options {
                http_port,
                tls_port: free_port(),
                validity: None,
            },
        )
        .await
    }

    /// [`Pebble::start`] with every option: TLS-ALPN-01 validated on `tls_port` (pebble's `tlsPort`),
    /// certificates valid for `validity` (pebble's default is five years).
    pub async fn start_with(test: &str, dir: &Path, options: Options) -> Option<Pebble> {
        let Options {
            http_port,
            tls_port,
            validity,
        } = options;
        for bin in [PEBBLE, CHALLTESTSRV] {
            if !Path::new(bin).is_file() {
                missing(
                    test,
                    "pebble",
                    format!("{bin} is not installed (Debian package `pebble`)"),
                );
                return None;
            }
        }
        let root = dir.join(format!("pebble-{}", free_port()));
        std::fs::create_dir_all(&root).expect("pebble's directory");

        // Pebble's own HTTPS certificate: a throwaway CA and a leaf for 127.0.0.1 and localhost.
        let ca_key = rcgen::KeyPair::generate().expect("a key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cairn test: pebble's HTTPS root");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("a CA");
        let leaf_key = rcgen::KeyPair::generate().expect("a key");
        let leaf =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("params")
                .signed_by(&leaf_key, &ca)
                .expect("a leaf");
        let cert_path = root.join("cert.pem");
        let key_path = root.join("key.pem");
        std::fs::write(&cert_path, leaf.pem()).expect("write pebble's cert");
        std::fs::write(&key_path, leaf_key.serialize_pem()).expect("write pebble's key");

        let dns_port = free_udp_port();
        let dns = format!("127.0.0.1:{dns_port}");
        let dns_management = format!("127.0.0.1:{}", free_port());
        let cts_log = root.join("challtestsrv.log");
        let challtestsrv = Command::new(CHALLTESTSRV)
            .args(["-dns01", &dns, "-management", &dns_management])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(std::fs::File::create(&cts_log).expect("log"))
            .stderr(std::fs::File::create(root.join("challtestsrv.err")).expect("log"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{test}: cannot start {CHALLTESTSRV}: {e}"));

        let listen = format!("127.0.0.1:{}", free_port());
        let management = format!("127.0.0.1:{}", free_port());
        let config = root.join("pebble-config.json");
        let validity = validity
            .map(|v| format!(", \"certificateValidityPeriod\": {}", v.as_secs().max(1)))
            .unwrap_or_default();
        let json = format!(
            r#"{{"pebble": {{"listenAddress": "{listen}", "managementListenAddress": "{management}",
                "certificate": "{}", "privateKey": "{}", "httpPort": {http_port}, "tlsPort": {tls_port},
                "ocspResponderURL": "", "externalAccountBindingRequired": false{validity}}}}}"#,
            cert_path.display(),
            key_path.display(),
        );
        std::fs::write(&config, json).expect("write pebble's config");
        let log = root.join("pebble.log");
        let pebble = spawn_pebble(&config, &dns, &log);
        let mut p = Pebble {
            directory: format!("https://{listen}/dir"),
            api_root_pem: ca.pem(),
            dns,
            management,
            dns_management,
            log,
            config,
            started: 0,
            pebble,
            challtestsrv,
        };
        p.wait_up(test).await;
        Some(p)
    }

    /// Restarts pebble on the same ports (the DNS server keeps running): it forgets every account and
    /// order and makes a new root, as a CA that lost its state would.
    pub async fn restart(&mut self, test: &str) {
        let _ = self.pebble.kill();
        let _ = self.pebble.wait();
        // The log is appended to; the new process's readiness line is counted after the old ones.
        self.pebble = spawn_pebble(&self.config, &self.dns, &self.log);
        self.wait_up(test).await;
    }

    async fn wait_up(&mut self, test: &str) {
        let p = self;
        let ready_lines = |log: &Path| {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .matches("ACME directory available")
                .count()
        };
        let before = p.started;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let up = ready_lines(&p.log) > before
                && p.client().get(&p.directory).send().await.is_ok()
                && reqwest::Client::new()
                    .post(format!("http://{}/set-default-ipv4", p.dns_management))
                    .body(r#"{"ip":"127.0.0.1"}"#)
                    .send()
                    .await
                    .is_ok();
            if up {
                break;
            }
            for (what, child) in [
                ("pebble", &mut p.pebble),
                ("challtestsrv", &mut p.challtestsrv),
            ] {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("{test}: {what} exited ({status}):\n{}", tail(&p.log, 30));
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "{test}: pebble did not come up in 20 s:\n{}",
                    tail(&p.log, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        p.started += 1;
    }

    /// An HTTPS client trusting pebble's own certificate.
    fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.api_root_pem.as_bytes()).expect("our root"),
            )
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("a client")
    }

    /// The root every certificate pebble issues chains to (PEM, from its management interface).
    pub async fn issuer_root_pem(&self) -> String {
        self.management_get("/roots/0").await
    }

    /// The intermediate pebble issues with (PEM).
    pub async fn intermediate_pem(&self) -> String {
        self.management_get("/intermediates/0").await
    }

    async fn management_get(&self, path: &str) -> String {
        let url = format!("https://{}{path}", self.management);
        let rsp = self
            .client()
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert!(rsp.status().is_success(), "GET {url}: {}", rsp.status());
        rsp.text().await.expect("a PEM body")
    }

    /// Makes `name` resolve to `ipv4` (replacing what it resolved to).
    pub async fn dns_a(&self, name: &str, ipv4: &str) {
        self.dns_post("/clear-a", &format!(r#"{{"host":"{name}."}}"#))
            .await;
        self.dns_post(
            "/add-a",
            &format!(r#"{{"host":"{name}.","addresses":["{ipv4}"]}}"#),
        )
        .await;
    }

    async fn dns_post(&self, path: &str, body: &str) {
        let url = format!("http://{}{path}", self.dns_management);
        let rsp = reqwest::Client::new()
            .post(&url)
            .body(body.to_owned())
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"));
        assert!(rsp.status().is_success(), "POST {url}: {}", rsp.status());
    }

    /// How many orders pebble has accepted (it logs each one it adds).
    pub fn orders(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("Added order")
            .count()
    }

    /// The A records of `name` as pebble sees them (a DNS query to its DNS server).
    pub async fn resolve_a(&self, name: &str) -> std::io::Result<Vec<Ipv4Addr>> {
        resolve_a(&self.dns, name).await
    }
}

fn spawn_pebble(config: &Path, dns: &str, log: &Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("pebble's log");
    Command::new(PEBBLE)
        .arg("-config")
        .arg(config)
        .args(["-dnsserver", dns])
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .env("PEBBLE_AUTHZREUSE", "0")
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {PEBBLE}: {e}"))
}

/// One DNS A query for `name` to the server at `server` (UDP): the addresses answered.
pub async fn resolve_a(server: &str, name: &str) -> std::io::Result<Vec<Ipv4Addr>> {
    let id: u16 = rand::random();
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, one question
    for label in name.trim_end_matches('.').split('.') {
        q.push(u8::try_from(label.len()).expect("a label under 64 bytes"));
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    sock.send_to(&q, server).await?;
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(3), sock.recv(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no DNS answer"))??;
    let b = &buf[..n];
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "a malformed DNS answer");
    if n < 12 || b[..2] != id.to_be_bytes() {
        return Err(bad());
    }
    let answers = u16::from_be_bytes([b[6], b[7]]);
    let mut i = 12;
    // Skip the question: its name, type and class.
    while i < n && b[i] != 0 {
        i += 1 + usize::from(b[i]);
    }
    i += 5;
    let mut out = Vec::new();
    for _ in 0..answers {
        // A name: a pointer (two bytes) or labels.
        if i < n && b[i] & 0xc0 == 0xc0 {
            i += 2;
        } else {
            while i < n && b[i] != 0 {
                i += 1 + usize::from(b[i]);
            }
            i += 1;
        }
        if i + 10 > n {
            return Err(bad());
        }
        let kind = u16::from_be_bytes([b[i], b[i + 1]]);
        let len = usize::from(u16::from_be_bytes([b[i + 8], b[i + 9]]));
        i += 10;
        if i + len > n {
            return Err(bad());
        }
        if kind == 1 && len == 4 {
            out.push(Ipv4Addr::new(b[i], b[i + 1], b[i + 2], b[i + 3]));
        }
        i += len;
    }
    Ok(out)
}
