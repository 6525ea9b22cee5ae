//! Log lines of builds and replicas, where they go ([`LogSink`]), a bounded per-replica buffer, and the
//! log filter the agent binary must use.
//!
//! Build output reaches a sink line by line while the build runs, so the control plane can stream it and
//! keep it with the release. Replica output is kept in a bounded ring so memory does not grow with an app's
//! chattiness.
//!
//! What it must not do: hold a secret. Secrets never pass through here; and [`env_filter`] caps the Docker
//! client library's own debug output, which would otherwise print container create requests (and so the
//! decrypted env) when someone turns logging up.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

use tokio::sync::broadcast;

/// Where a line came from: the wire's vocabulary, which the control plane stores by the same names.
pub use cairn_proto::LogStream;

/// One line of output, without its line terminator.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogLine {
    pub stream: LogStream,
    pub text: String,
    pub at: SystemTime,
}

impl LogLine {
    pub fn new(stream: LogStream, text: impl Into<String>) -> Self {
        LogLine {
            stream,
            text: text.into(),
            at: SystemTime::now(),
        }
    }
}

/// Receives log lines as they happen. Implementations must not block for long: they are called from the
/// task that reads a build's or a replica's output.
pub trait LogSink: Send + Sync {
    fn line(&self, line: LogLine);

    /// The release's image is in the registry now, before the deploy ends: a task's sink tells the control
    /// plane at once, so other nodes' deploys of the release pull it while this one starts its replica.
    fn image_pushed(&self, image: &cairn_proto::DeployedImage) {
        let _ = image;
    }
}

/// Discards every line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Discard;

impl LogSink for Discard {
    fn line(&self, _: LogLine) {}
}

impl LogSink for tokio::sync::mpsc::UnboundedSender<LogLine> {
    fn line(&self, line: LogLine) {
        // A closed receiver means nobody listens any more; the build goes on regardless.
        let _ = self.send(line);
    }
}

impl LogSink for Mutex<Vec<LogLine>> {
    fn line(&self, line: LogLine) {
        self.lock().unwrap_or_else(|p| p.into_inner()).push(line);
    }
}

impl<S: LogSink + ?Sized> LogSink for std::sync::Arc<S> {
    fn line(&self, line: LogLine) {
        (**self).line(line)
    }
}

/// Splits a byte stream into lines, holding back an unfinished last line until more bytes arrive.
#[derive(Debug, Default)]
pub(crate) struct LineSplitter {
    partial: Vec<u8>,
}

/// The longest line kept whole; longer ones are cut so one runaway line cannot exhaust memory.
pub(crate) const MAX_LINE: usize = 16 * 1024;

impl LineSplitter {
    pub(crate) fn push(&mut self, bytes: &[u8], mut out: impl FnMut(String)) {
        for &b in bytes {
            if b == b'\n' {
                out(self.take());
            } else if self.partial.len() < MAX_LINE {
                self.partial.push(b);
            }
        }
    }

    pub(crate) fn finish(&mut self, mut out: impl FnMut(String)) {
        if !self.partial.is_empty() {
            out(self.take());
        }
    }

    fn take(&mut self) -> String {
        let mut line = std::mem::take(&mut self.partial);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        String::from_utf8_lossy(&line).into_owned()
    }
}

/// The last `capacity` lines of a replica's output, and a channel for followers.
#[derive(Debug)]
pub(crate) struct LogRing {
    lines: Mutex<VecDeque<LogLine>>,
    capacity: usize,
    follow: broadcast::Sender<LogLine>,
}

impl LogRing {
    pub(crate) fn new(capacity: usize) -> Self {
        LogRing {
            lines: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity,
            follow: broadcast::channel(256).0,
        }
    }

    pub(crate) fn tail(&self, n: usize) -> Vec<LogLine> {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines
            .iter()
            .skip(lines.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<LogLine> {
        self.follow.subscribe()
    }
}

impl LogSink for LogRing {
    fn line(&self, line: LogLine) {
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() == self.capacity {
            lines.pop_front();
        }
        lines.push_back(line.clone());
        drop(lines);
        let _ = self.follow.send(line);
    }
}

/// Targets whose debug output can contain secrets, and the most they may ever log.
///
/// bollard logs every request body it serializes (a container create request carries the decrypted env)
/// and every response it decodes at `debug`, through the `log` crate. An agent that bridges `log` into
/// `tracing` and turns logging up would print secrets; these caps keep that from happening whatever the
/// operator asks for.
pub const CAPPED_TARGETS: &[(&str, &str)] = &[("bollard", "info")];

/// The `tracing` filter the agent binary must use: the operator's directives (as in `RUST_LOG`), with the
/// targets in [`CAPPED_TARGETS`] capped whatever the directives say about them.
pub fn env_filter(directives: &str) -> tracing_subscriber::EnvFilter {
    let kept: Vec<&str> = directives
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .filter(|d| {
            // A directive is `target[span{field}]=level` or a bare level; drop any that names a capped
            // target (or a module under it), so it cannot override the cap below.
            let target = d.split(['[', '=']).next().unwrap_or("");
            !CAPPED_TARGETS
                .iter()
                .any(|(t, _)| target == *t || target.starts_with(&format!("{t}::")))
        })
        .collect();
    let mut filter = tracing_subscriber::EnvFilter::builder()
        .with_default_directive(tracing::Level::INFO.into())
        .parse_lossy(kept.join(","));
    for (target, level) in CAPPED_TARGETS {
        if let Ok(d) = format!("{target}={level}").parse() {
            filter = filter.add_directive(d);
        }
    }
    filter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitter_holds_back_partial_lines_and_cuts_runaways() {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        s.push(b"one\r\ntw", |l| out.push(l));
        assert_eq!(out, ["one"]);
        s.push(b"o\n", |l| out.push(l));
        s.push(&vec![b'x'; MAX_LINE + 10], |l| out.push(l));
        s.finish(|l| out.push(l));
        assert_eq!(out.len(), 3);
        assert_eq!(out[1], "two");
        assert_eq!(out[2].len(), MAX_LINE);
    }

    #[test]
    fn ring_keeps_the_last_lines() {
        let r = LogRing::new(3);
        for i in 0..5 {
            r.line(LogLine::new(LogStream::Stdout, i.to_string()));
        }
        let t: Vec<String> = r.tail(10).into_iter().map(|l| l.text).collect();
        assert_eq!(t, ["2", "3", "4"]);
        assert_eq!(r.tail(1)[0].text, "4");
    }

    #[test]
    fn filter_caps_bollard_whatever_the_directives_say() {
        for d in [
            "trace",
            "bollard=trace",
            "debug,bollard::docker=trace",
            "bollard[x]=debug",
        ] {
            let f = env_filter(d).to_string();
            assert!(f.contains("bollard=info"), "{d}: {f}");
            assert!(
                !f.contains("bollard=trace") && !f.contains("bollard::docker"),
                "{d}: {f}"
            );
        }
        assert!(
            env_filter("cairn_agent=debug")
                .to_string()
                .contains("cairn_agent=debug")
        );
    }
}
