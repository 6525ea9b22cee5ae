//! Hosts with their own addresses on one machine: a private bridge and network namespaces joined to it by
//! veth pairs, for tests of what crosses between nodes (ingress forwarding, partitions, HA).
//!
//! A [`Net`] claims a free `/24` in `10.234.0.0/16` by creating its bridge `cnbN` (creation is atomic,
//! so concurrent test processes never share a subnet); the machine itself is `10.234.N.1` on the bridge
//! (where a test runs the control plane and its client), and each [`Host`] is a namespace `cnN-<name>`
//! with `10.234.N.k`. Traffic between the namespaces crosses the bridge; because Docker's `FORWARD`
//! policy drops bridged packets when `br_netfilter` is loaded, the net inserts one `ACCEPT` rule for its
//! own bridge and removes it again. Nothing is routed beyond the bridge.
//!
//! Dropping the net kills every process still inside its namespaces, deletes them, the bridge and the
//! rule. A net a killed test left behind is found by the pid in the bridge's alias and removed when its
//! number is claimed again.
//!
//! Needs root and `ip` (iproute2); [`Net::create`] says what is missing instead of panicking, for
//! [`crate::missing`].

use std::net::Ipv4Addr;
use std::process::Command;

const ALIAS_PREFIX: &str = "cairn-test pid=";

/// A private bridge and the namespaces on it, removed on drop.
#[derive(Debug)]
pub struct Net {
    n: u8,
    hosts: Vec<String>,
    rule: bool,
}

/// One namespace on a [`Net`]: a host with its own address.
#[derive(Debug, Clone)]
pub struct Host {
    /// The namespace's name (for `ip netns exec`).
    pub netns: String,
    pub addr: Ipv4Addr,
}

impl Net {
    /// Claims a free subnet and creates its bridge, with the machine at `.1`.
    pub fn create() -> Result<Net, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("network namespaces need root".into());
        }
        ip(&["-V"]).map_err(|e| format!("iproute2 `ip` is not usable: {e}"))?;
        for n in 1..=250u8 {
            let bridge = bridge_name(n);
            match ip(&["link", "add", &bridge, "type", "bridge"]) {
                Ok(_) => {}
                Err(e) if e.contains("File exists") => {
                    if !reclaim_stale(n) {
                        continue;
                    }
                    ip(&["link", "add", &bridge, "type", "bridge"])?;
                }
                Err(e) => return Err(format!("cannot create a bridge: {e}")),
            }
            let mut net = Net {
                n,
                hosts: Vec::new(),
                rule: false,
            };
            let alias = format!("{ALIAS_PREFIX}{}", std::process::id());
            ip(&["link", "set", &bridge, "alias", &alias])?;
            ip(&[
                "addr",
                "add",
                &format!("{}/24", net.gateway()),
                "dev",
                &bridge,
            ])?;
            ip(&["link", "set", &bridge, "up"])?;
            net.rule = iptables_forward("-I", &bridge).is_ok();
            return Ok(net);
        }
        Err("no free subnet in 10.234.0.0/16 (250 test nets exist)".into())
    }

    /// The machine's own address on the bridge: where a test's control plane and client live.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 234, self.n, 1)
    }

    /// A new namespace `name` (a short label, at most 6 characters) on the bridge, with the next address.
    pub fn host(&mut self, name: &str) -> Result<Host, String> {
        assert!(
            name.len() <= 6 && name.bytes().all(|b| b.is_ascii_alphanumeric()),
            "a host label is at most 6 ASCII letters or digits"
        );
        let k = self.hosts.len() as u8 + 2;
        let netns = format!("cn{}-{name}", self.n);
        let (outer, inner) = (format!("cnv{}x{k}", self.n), format!("cnv{}y{k}", self.n));
        ip(&["netns", "add", &netns])?;
        self.hosts.push(netns.clone());
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ])?;
        ip(&["link", "set", &inner, "netns", &netns])?;
        ip(&["link", "set", &outer, "master", &bridge_name(self.n)])?;
        ip(&["link", "set", &outer, "up"])?;
        let addr = Ipv4Addr::new(10, 234, self.n, k);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", netns.as_str(), "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{addr}/24"), "dev", &inner])?;
        inside(&["link", "set", &inner, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(Host { netns, addr })
    }
}

impl Host {
    /// `program` run inside this host's namespace (`ip netns exec`); the rest of the command is the caller's.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(program);
        cmd
    }

    /// The same as a tokio command.
    pub fn tokio_command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        tokio::process::Command::from(self.command(program))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        remove(self.n, &self.hosts, self.rule);
    }
}

fn bridge_name(n: u8) -> String {
    format!("cnb{n}")
}

/// Kills what runs in the namespaces, deletes them, the rule and the bridge; every step best effort.
fn remove(n: u8, hosts: &[String], rule: bool) {
    for netns in hosts {
        if let Ok(pids) = ip(&["netns", "pids", netns]) {
            for pid in pids.split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let _ = ip(&["netns", "del", netns]);
    }
    let bridge = bridge_name(n);
    if rule {
        while iptables_forward("-D", &bridge).is_ok() {}
    }
    let _ = ip(&["link", "del", &bridge]);
}

/// A bridge `cnbN` whose creating process is gone: remove its net and say it may be claimed.
fn reclaim_stale(n: u8) -> bool {
    let Ok(show) = ip(&["-o", "link", "show", &bridge_name(n)]) else {
        return false;
    };
    let Some(pid) = show
        .split(ALIAS_PREFIX)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return false;
    };
    if std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return false;
    }
    let prefix = format!("cn{n}-");
    let hosts: Vec<String> = ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    remove(n, &hosts, true);
    true
}

fn iptables_forward(op: &str, bridge: &str) -> Result<(), String> {
    let out = Command::new("iptables")
        .args([op, "FORWARD"])
        .args(if op == "-I" { &["1"][..] } else { &[][..] })
        .args(["-i", bridge, "-o", bridge, "-j", "ACCEPT"])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::{Duration, Instant};

    use super::*;

    /// Connects until something listens at `addr` and answers, for at most five seconds.
    fn read_from(addr: SocketAddr) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(mut s) => {
                    let mut text = String::new();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    s.read_to_string(&mut text).unwrap();
                    return text;
                }
                Err(e) if Instant::now() > deadline => panic!("nothing answers at {addr}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    #[test]
    fn hosts_reach_each_other_and_the_machine_and_are_removed_on_drop() {
        let mut net = match Net::create() {
            Ok(net) => net,
            Err(why) => return crate::missing(&crate::current_test(), "network namespaces", why),
        };
        let a = net.host("a").unwrap();
        let b = net.host("b").unwrap();
        assert_ne!(a.addr, b.addr);

        // B serves a line; the machine reaches it, and so does a process inside A.
        let mut server = b
            .command("busybox")
            .args(["nc", "-ll", "-p", "9000", "-e", "echo", "from-b"])
            .spawn()
            .unwrap();
        let text = read_from(SocketAddr::new(b.addr.into(), 9000));
        assert_eq!(text.trim(), "from-b");
        let out = a
            .command("busybox")
            .args(["nc", "-w", "3", &b.addr.to_string(), "9000"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "from-b");

        // A process inside A reaches a listener on the machine's gateway address.
        let listener = std::net::TcpListener::bind((net.gateway(), 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let accept = std::thread::spawn(move || {
            let (mut s, peer) = listener.accept().unwrap();
            s.write_all(b"from-machine\n").unwrap();
            peer
        });
        let out = a
            .command("busybox")
            .args([
                "nc",
                "-w",
                "3",
                &net.gateway().to_string(),
                &port.to_string(),
            ])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "from-machine");
        assert_eq!(accept.join().unwrap().ip(), std::net::IpAddr::from(a.addr));

        // Dropping the net kills B's server and removes the namespaces and the bridge.
        let bridge = bridge_name(net.n);
        drop(net);
        assert!(server.wait().is_ok());
        let list = ip(&["netns", "list"]).unwrap();
        assert!(
            !list.contains(&a.netns) && !list.contains(&b.netns),
            "{list}"
        );
        assert!(ip(&["link", "show", &bridge]).is_err());
    }
}
