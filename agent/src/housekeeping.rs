//! What the agent does besides its tasks: it ships its replicas' output to the control plane, and it
//! removes old images.
//!
//! **Output**, for `cairn logs APP [--follow]`: the control plane cannot reach agents (they call it), so
//! every `every` the agent reads the last lines of each of its replicas from the driver and posts the
//! ones it has not sent yet (`POST /agent/v1/replica-logs`). Bounded: at most `tail` lines per replica per
//! round (a chattier replica loses lines, not the agent's memory), batches of at most
//! [`cairn_proto::MAX_LOG_LINES`], each line cut at [`cairn_proto::MAX_LOG_LINE_BYTES`]. Lines printed
//! before this process started are not sent (an earlier agent process sent them); a line is new when its
//! time is after the newest one sent for its replica. A round that cannot reach the control plane (or
//! that it answers 5xx or 429) is sent again next round; a batch it refuses as malformed (any other 4xx)
//! is dropped with a warning, never sent again (it would be refused for ever, and block every later
//! line). U+0000, which the control plane's database cannot store, is sent as U+FFFD.
//!
//! **Images** (`--keep-images N`): every few minutes, images of each app beyond its N newest (an image
//! is one build key: a source commit and recipe, shared by every release of the key) are removed, never
//! one a container of this installation uses, which is every image a placed release runs here (a
//! rollback to a release whose image went builds it again, or pulls it from the registry).
//!
//! What it must not do: log a line's text (it is the app's output), or touch a replica or an image of
//! another installation (the driver lists only this installation's).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cairn_proto::{MAX_LOG_LINE_BYTES, MAX_LOG_LINES, ReplicaLogBatch, ReplicaLogLine};
use cairn_schema::Name;
use tokio::sync::watch;

use crate::client::Client;
use crate::logs::LogStream;
use cairn_schema::error::chain;

pub use crate::runner::ReplicaOutput;
use crate::runner::Runner;

/// How often output is shipped, and how much per replica per round.
#[derive(Debug, Clone, Copy)]
pub struct ShipConfig {
    pub every: Duration,
    pub tail: usize,
}

impl Default for ShipConfig {
    fn default() -> Self {
        ShipConfig {
            every: Duration::from_secs(1),
            tail: 200,
        }
    }
}

/// The time of the newest line sent, per replica `(app, slot, release)`.
pub type Sent = HashMap<(Name, u32, u64), SystemTime>;

/// Which lines of each replica were sent.
#[derive(Debug)]
pub struct Cursor {
    started: SystemTime,
    sent: Sent,
}

impl Cursor {
    pub fn new(started: SystemTime) -> Self {
        Cursor {
            started,
            sent: HashMap::new(),
        }
    }

    /// The lines of `outputs` not sent yet, as wire lines, and the cursor to keep once they are sent.
    /// Replicas no longer listed are forgotten.
    pub fn unsent(&self, outputs: &[ReplicaOutput]) -> (Vec<ReplicaLogLine>, Sent) {
        let mut lines = Vec::new();
        let mut next = HashMap::new();
        for o in outputs {
            let key = (o.app.clone(), o.slot, o.release);
            let after = self.sent.get(&key).copied().unwrap_or(self.started);
            let mut newest = after;
            for l in o.lines.iter().filter(|l| l.at > after) {
                newest = newest.max(l.at);
                lines.push(ReplicaLogLine {
                    app: o.app.clone(),
                    slot: o.slot,
                    release: o.release,
                    stream: match l.stream {
                        LogStream::Stderr => LogStream::Stderr,
                        LogStream::Agent => LogStream::Agent,
                        // Build output is never a replica's; anything else is its standard output.
                        LogStream::Stdout | LogStream::Build => LogStream::Stdout,
                    },
                    text: cairn_proto::truncate(&l.text, MAX_LOG_LINE_BYTES)
                        .replace('\0', "\u{FFFD}"),
                    at: l.at.into(),
                });
            }
            next.insert(key, newest);
        }
        (lines, next)
    }

    pub fn advance(&mut self, next: Sent) {
        self.sent = next;
    }
}

/// Removes old images every `every` (the first time after one `every`) until `stop` turns true;
/// `keep` 0 keeps everything.
pub async fn prune_loop(
    runner: Arc<dyn Runner>,
    keep: usize,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    if keep == 0 {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = raised(&mut stop) => return,
        }
        match runner.prune_images(keep).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, keep, "old images removed"),
            Err(e) => tracing::warn!(error = %chain(&e), "cannot remove old images"),
        }
    }
}

/// Ships output every `cfg.every` until `stop` turns true.
pub async fn ship_loop(
    client: Client,
    runner: Arc<dyn Runner>,
    cfg: ShipConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut cursor = Cursor::new(SystemTime::now());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(cfg.every) => {}
            _ = raised(&mut stop) => return,
        }
        let outputs = match runner.recent_output(cfg.tail).await {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(error = %chain(&e), "cannot read replica output");
                continue;
            }
        };
        ship(&client, &mut cursor, &outputs).await;
    }
}

/// Ships the lines of `outputs` not sent yet; the cursor advances unless a batch is to be sent again.
/// Returns how many batches were dropped as refused.
pub async fn ship(client: &Client, cursor: &mut Cursor, outputs: &[ReplicaOutput]) -> usize {
    let (lines, next) = cursor.unsent(outputs);
    let mut dropped = 0;
    for chunk in lines.chunks(MAX_LOG_LINES) {
        let batch = ReplicaLogBatch {
            lines: chunk.to_vec(),
        };
        match client.replica_logs(&batch).await {
            Ok(_) => {}
            Err(e) if e.is_malformed() => {
                // Sending it again would be refused again, and hold back every later line.
                tracing::warn!(error = %chain(&e), lines = chunk.len(), "the control plane refused a batch of replica output; it is dropped");
                dropped += 1;
            }
            Err(e) => {
                tracing::debug!(error = %chain(&e), lines = chunk.len(), "cannot ship replica output; next round tries again");
                return dropped;
            }
        }
    }
    cursor.advance(next);
    dropped
}

/// Resolves when `stop` turns true; never, if its sender is gone without raising it.
async fn raised(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::LogLine;

    fn line(text: &str, at: SystemTime) -> LogLine {
        LogLine {
            stream: LogStream::Stdout,
            text: text.into(),
            at,
        }
    }

    #[test]
    fn only_lines_after_the_start_and_after_what_was_sent_go() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut c = Cursor::new(s(10));
        let web = Name::new("web").unwrap();
        let out = |lines: Vec<LogLine>| {
            vec![ReplicaOutput {
                app: web.clone(),
                slot: 1,
                release: 3,
                lines,
            }]
        };
        let (l, next) = c.unsent(&out(vec![line("old", s(5)), line("a", s(11))]));
        assert_eq!(l.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(), ["a"]);
        // Not sent (the control plane was down): the same lines come again.
        let (again, _) = c.unsent(&out(vec![line("old", s(5)), line("a", s(11))]));
        assert_eq!(again.len(), 1);
        c.advance(next);
        let (l, next) = c.unsent(&out(vec![
            line("a", s(11)),
            line("b", s(12)),
            line("c", s(13)),
        ]));
        assert_eq!(
            l.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
            ["b", "c"]
        );
        assert!(
            l.iter()
                .all(|l| l.app == web && l.slot == 1 && l.release == 3)
        );
        c.advance(next);
        let (l, next) = c.unsent(&[]);
        assert!(
            l.is_empty() && next.is_empty(),
            "a gone replica is forgotten"
        );
    }

    /// A control plane that answers every request with the status in `status`, counting requests.
    async fn answering(
        status: Arc<std::sync::atomic::AtomicU16>,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        tokio::spawn(async move {
            loop {
                let Ok((io, _)) = listener.accept().await else {
                    return;
                };
                let (status, counted) = (status.clone(), counted.clone());
                let svc = hyper::service::service_fn(move |_req| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let code = status.load(Ordering::SeqCst);
                    async move {
                        hyper::Response::builder()
                            .status(code)
                            .header("content-type", "application/json")
                            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                br#"{"error": "refused"}"#,
                            )))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(io), svc),
                );
            }
        });
        (format!("http://{addr}"), hits)
    }

    /// Regression (issue 12): a batch the control plane refused as malformed (a 5xx then, for a NUL) was
    /// sent again every round for ever, and no later line was shipped. A 4xx refusal (but 429) now drops
    /// the batch; a 5xx or 429 keeps it for the next round.
    #[tokio::test]
    async fn regression_a_batch_refused_as_malformed_is_dropped_not_sent_for_ever() {
        use std::sync::atomic::{AtomicU16, Ordering};
        let status = Arc::new(AtomicU16::new(503));
        let (url, hits) = answering(status.clone()).await;
        let client = Client::new(&url).unwrap().with_credential("c".into());
        let t0 = SystemTime::now();
        let mut cursor = Cursor::new(t0);
        let out = vec![ReplicaOutput {
            app: Name::new("web").unwrap(),
            slot: 0,
            release: 1,
            lines: vec![line("binary\0junk", t0 + Duration::from_secs(1))],
        }];
        // The control plane is unavailable, or asks to slow down: the batch is kept.
        for code in [503, 429] {
            status.store(code, Ordering::SeqCst);
            let before = hits.load(Ordering::SeqCst);
            assert_eq!(ship(&client, &mut cursor, &out).await, 0);
            assert_eq!(hits.load(Ordering::SeqCst), before + 1);
        }
        let before = hits.load(Ordering::SeqCst);
        assert_eq!(ship(&client, &mut cursor, &out).await, 0, "sent again");
        assert_eq!(hits.load(Ordering::SeqCst), before + 1);
        // Refused as malformed: dropped, and not sent again.
        status.store(400, Ordering::SeqCst);
        assert_eq!(ship(&client, &mut cursor, &out).await, 1);
        let after = hits.load(Ordering::SeqCst);
        assert_eq!(ship(&client, &mut cursor, &out).await, 0);
        assert_eq!(
            hits.load(Ordering::SeqCst),
            after,
            "the refused batch is not sent again"
        );
    }

    #[test]
    fn nul_in_replica_output_is_sent_as_a_replacement_character() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let c = Cursor::new(t0);
        let (l, _) = c.unsent(&[ReplicaOutput {
            app: Name::new("web").unwrap(),
            slot: 0,
            release: 1,
            lines: vec![line("a\0b", t0 + Duration::from_secs(1))],
        }]);
        assert_eq!(l[0].text, "a\u{FFFD}b");
    }
}
