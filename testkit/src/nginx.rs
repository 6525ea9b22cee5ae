//! Debian's nginx as an HTTP/1.1 reverse proxy in front of a server under test: what many operators put
//! before a control plane, and a peer that speaks neither h2c nor anything but HTTP/1.1 to its upstream.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::skip::missing;

const NGINX: &str = "/usr/sbin/nginx";

/// A running nginx, stopped when dropped.
#[derive(Debug)]
pub struct Nginx {
    child: Child,
    root: std::path::PathBuf,
    /// `127.0.0.1:PORT`
    pub addr: SocketAddr,
}

impl Nginx {
    /// Starts nginx on a free loopback port proxying every request to `upstream` over HTTP/1.1 with
    /// keep-alive, unbuffered (long-polls and streams pass as they come), its files under `dir`. `None`
    /// (after a `SKIPPED` message) when nginx is not installed; under CI or `CAIRN_TEST_REQUIRE_ALL`
    /// that panics instead. Installed but not answering within 10 s panics with its log.
    pub fn start(test: &str, dir: &Path, upstream: SocketAddr) -> Option<Nginx> {
        if !Path::new(NGINX).is_file() {
            missing(
                test,
                "nginx",
                format!("{NGINX} is not installed (Debian package `nginx`)"),
            );
            return None;
        }
        let port = crate::free_port();
        let root = dir.join(format!("nginx-{port}"));
        std::fs::create_dir_all(root.join("tmp")).expect("nginx's directory");
        let d = root.display();
        // As root, nginx's workers would otherwise run as `nobody`, who cannot write under `dir`.
        let user = if rustix::process::getuid().is_root() {
            "user root;"
        } else {
            ""
        };
        let conf = format!(
            "{user}
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 1024; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  upstream backend {{ server {upstream}; keepalive 16; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 120s;
    }}
  }}
}}
"
        );
        let conf_path = root.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("nginx.conf");
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(&root)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(root.join("error.log"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let started = Instant::now();
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if started.elapsed() > Duration::from_secs(10) {
                let log = std::fs::read_to_string(root.join("error.log")).unwrap_or_default();
                panic!("nginx did not listen on {addr} within 10 s: {log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Nginx { child, root, addr })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The access log so far (nginx's `combined` format: one line per request).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.root.join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
