//! The live view of `cairn dev`: apps (replicas running of those placed, release, URL through a node's
//! proxy with a `curl` line), nodes (state, agent, proxy), work in progress, and the last reconciliation.
//! Rendered from the same status `cairn status` shows; a terminal gets the whole view redrawn, anything
//! else a line for each line of the view that changed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use cairn_reconciler::status::Status;
use cairn_reconciler::store::ReconcileStatus;

/// One node's local agent, as `cairn dev` started it.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    pub proxy_port: u16,
    pub pid: u32,
    /// `None` while it runs; else how it ended.
    pub exited: Option<String>,
    pub log: String,
}

/// Everything one frame shows.
#[derive(Debug)]
pub struct Frame<'a> {
    pub status: &'a Status,
    /// Each app's hostnames, the generated one first.
    pub hostnames: &'a BTreeMap<String, Vec<String>>,
    pub agents: &'a BTreeMap<String, AgentInfo>,
    /// Tasks being worked on, one line each.
    pub work: &'a [String],
    /// What `cairn dev` itself has to say (a source committed, an agent that exited).
    pub notes: &'a [String],
    /// Show times (a redrawn screen); a log leaves them out, so that a line changes only when the
    /// state does.
    pub clock: bool,
}

/// The view's lines, without anything that changes by itself (no clock), so that an unchanged state
/// renders the same.
pub fn lines(f: &Frame<'_>) -> Vec<String> {
    let s = f.status;
    let mut out = Vec::new();
    match &s.last_reconciliation {
        Some(r) if r.status == ReconcileStatus::Noop => out.push(format!(
            "config: generation {}, up to date{}",
            s.generation,
            if f.clock {
                format!(
                    " (checked {})",
                    r.finished_at
                        .with_timezone(&chrono::Local)
                        .format("%H:%M:%S")
                )
            } else {
                String::new()
            }
        )),
        Some(r) => {
            out.push(format!(
                "config: generation {}, {} at {} ({}): {}",
                s.generation,
                r.status.as_str(),
                r.finished_at
                    .with_timezone(&chrono::Local)
                    .format("%H:%M:%S"),
                r.trigger,
                r.summary
            ));
            out.extend(r.errors.iter().map(|e| format!("  {e}")));
        }
        None => out.push(format!("config: generation {}", s.generation)),
    }
    out.push(String::new());
    out.push(format!(
        "{:<16} {:>9} {:>8}  URL",
        "APP", "REPLICAS", "RELEASE"
    ));
    for a in &s.apps {
        let running = a
            .replicas
            .iter()
            .filter(|r| {
                r.state == "running"
                    && r.actual.as_ref().is_some_and(|x| {
                        x.state == "running" && x.healthy && x.release == r.release
                    })
            })
            .count();
        let replicas = if a.suspended {
            "suspended".to_owned()
        } else {
            format!("{running}/{}", a.placed_replicas)
        };
        let release = a.latest_release.map_or("-".to_owned(), |r| format!("r{r}"));
        let port = a
            .replicas
            .iter()
            .filter(|r| r.state == "running")
            .find_map(|r| f.agents.get(&r.node))
            .map(|ag| ag.proxy_port);
        let host = f.hostnames.get(&a.name).and_then(|h| h.first());
        let url = match (host, port) {
            (Some(h), Some(p)) => format!("http://{h}:{p}/"),
            _ => "-".to_owned(),
        };
        out.push(format!("{:<16} {replicas:>9} {release:>8}  {url}", a.name));
        if let (Some(h), Some(p)) = (host, port) {
            out.push(format!(
                "{:<16} {:>9} {:>8}  curl -H 'Host: {h}' http://127.0.0.1:{p}/",
                "", "", ""
            ));
        }
    }
    out.push(String::new());
    out.push(format!(
        "{:<16} {:<8} {:>8}  {:<16} AGENT",
        "NODE", "STATE", "REPLICAS", "PROXY"
    ));
    for n in &s.nodes {
        let (proxy, agent) = match f.agents.get(&n.name) {
            Some(a) => (
                format!("127.0.0.1:{}", a.proxy_port),
                match &a.exited {
                    None => format!("pid {}", a.pid),
                    Some(how) => format!("exited ({how}); see {}", a.log),
                },
            ),
            None => ("-".to_owned(), "not started".to_owned()),
        };
        let running = n.agent.as_ref().map_or(0, |a| a.running);
        out.push(format!(
            "{:<16} {:<8} {:>8}  {proxy:<16} {agent}",
            n.name,
            n.state.as_str(),
            format!("{running}/{}", n.replicas),
        ));
    }
    if !f.work.is_empty() {
        out.push(String::new());
        out.push("WORKING".to_owned());
        out.extend(f.work.iter().map(|w| format!("  {w}")));
    }
    if !f.notes.is_empty() {
        out.push(String::new());
        out.extend(f.notes.iter().cloned());
    }
    out
}

/// What a terminal shows: the screen cleared, a header, the view, a footer.
pub fn screen(header: &[String], view: &[String]) -> String {
    let mut s = String::from("\x1b[H\x1b[2J");
    for l in header.iter().chain([&String::new()]).chain(view) {
        let _ = writeln!(s, "{l}");
    }
    let _ = writeln!(s, "\nCtrl-C stops everything.");
    s
}

/// For a log: the lines of `view` that `before` did not have, timestamped.
pub fn changed(before: &[String], view: &[String], now: &str) -> String {
    let old: BTreeSet<&String> = before.iter().collect();
    let mut s = String::new();
    for l in view
        .iter()
        .filter(|l| !l.trim().is_empty() && !old.contains(l))
    {
        let _ = writeln!(s, "[{now}] {l}");
    }
    s
}

#[cfg(test)]
mod tests {
    use cairn_plan::observed::NodeState;
    use cairn_reconciler::status::{ActualView, AppStatus, NodeView, ReplicaView};

    use super::*;

    fn status() -> Status {
        Status {
            generation: 3,
            applied_commit: None,
            apps: vec![AppStatus {
                name: "hello".into(),
                desired_replicas: 2,
                placed_replicas: 2,
                suspended: false,
                replicas: vec![
                    ReplicaView {
                        slot: 1,
                        node: "local-1".into(),
                        release: 2,
                        state: "running".into(),
                        actual: Some(ActualView {
                            release: 2,
                            state: "running".into(),
                            healthy: true,
                        }),
                    },
                    ReplicaView {
                        slot: 2,
                        node: "local-2".into(),
                        release: 2,
                        state: "running".into(),
                        // Still runs the previous release: not counted.
                        actual: Some(ActualView {
                            release: 1,
                            state: "running".into(),
                            healthy: true,
                        }),
                    },
                ],
                latest_release: Some(2),
                source_commit: None,
                pinned_release: None,
                hosts: vec!["hello.apps.localhost".into()],
                healthy_nodes: vec!["local-1".into()],
                ingress_nodes: vec!["local-1".into()],
            }],
            nodes: vec![NodeView {
                name: "local-1".into(),
                state: NodeState::Online,
                last_heartbeat: None,
                region: None,
                drain: false,
                cpu_millis: 1000,
                memory_bytes: 1 << 29,
                disk_bytes: 1 << 31,
                used_cpu_millis: 100,
                used_memory_bytes: 1 << 26,
                used_disk_bytes: 1 << 28,
                replicas: 1,
                agent: None,
                address: None,
                ingress: true,
            }],
            last_reconciliation: None,
            certificate_warnings: Vec::new(),
            database_warnings: Vec::new(),
            apps_total: None,
            next_after: None,
            control_planes: None,
        }
    }

    #[test]
    fn apps_show_running_replicas_their_url_and_a_curl_line() {
        let s = status();
        let hostnames =
            BTreeMap::from([("hello".to_owned(), vec!["hello.apps.localhost".to_owned()])]);
        let agents = BTreeMap::from([(
            "local-1".to_owned(),
            AgentInfo {
                proxy_port: 8001,
                pid: 42,
                exited: None,
                log: "agent.log".into(),
            },
        )]);
        let view = lines(&Frame {
            status: &s,
            hostnames: &hostnames,
            agents: &agents,
            work: &["deploy hello r2 slot 2 on local-2: building".to_owned()],
            notes: &[],
            clock: false,
        });
        let text = view.join("\n");
        assert!(
            text.contains("hello                  1/2       r2  http://hello.apps.localhost:8001/"),
            "{text}"
        );
        assert!(
            text.contains("curl -H 'Host: hello.apps.localhost' http://127.0.0.1:8001/"),
            "{text}"
        );
        assert!(text.contains("127.0.0.1:8001   pid 42"), "{text}");
        assert!(text.contains("WORKING\n  deploy hello r2"), "{text}");

        // A log gets only what changed.
        let mut later = view.clone();
        later[3] = "hello                  2/2       r2  http://hello.apps.localhost:8001/".into();
        let log = changed(&view, &later, "12:00:00");
        assert_eq!(
            log,
            "[12:00:00] hello                  2/2       r2  http://hello.apps.localhost:8001/\n"
        );
    }
}
