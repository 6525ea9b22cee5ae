//! Live output as server-sent events: a release's build output and an app's replica output, woken in
//! memory when the app's lines are stored (`Api::build_output`, `Api::replica_output`, per app: the same
//! wake-ups as `cairn logs --follow`; lines another control plane stored arrive as notifications). An
//! idle stream reads nothing.
//!
//! Each event (`lines`) carries one batch as a JSON array and, as its id, the cursor after the batch: a
//! browser that reconnects sends it back as `Last-Event-ID` and gets exactly the lines after it (a batch
//! is one event, so a connection lost mid-way never leaves half a batch seen). The first connection
//! names its cursor with `?after=` (the page's own lines end there); `Last-Event-ID` wins over it.
//!
//! A stream ends after `ApiConfig::ui_stream_lifetime`: the browser reconnects by itself with
//! `Last-Event-ID` (after the `retry` the first event names), so its session is checked again and a
//! long-lived connection moves to another control plane behind a load balancer.
//!
//! What it must not do: hold a database connection while waiting, or log a line's text.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use cairn_schema::Name;
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::super::apps::app_name;
use super::super::{Api, ApiError};
use super::Session;
use super::pages::error_page;
use crate::releases;
use crate::store::releases::{BuildLine, build_lines_after};

/// The most lines one event carries.
const BATCH: u32 = 500;
/// The most tasks a build cursor may name (a release has one deploy task per replica and attempt).
const MAX_CURSOR_TASKS: usize = 1000;

/// Where a follower of a release's build output is: the last sequence number seen of each deploy task.
/// Written `task.seq~task.seq` (empty: nothing seen).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildCursor(BTreeMap<i64, i32>);

impl BuildCursor {
    /// The cursor after `lines`.
    pub fn after(lines: &[BuildLine]) -> BuildCursor {
        let mut c = BuildCursor::default();
        c.advance(lines);
        c
    }

    fn advance(&mut self, lines: &[BuildLine]) {
        for l in lines {
            let seen = self.0.entry(l.task).or_insert(l.seq);
            *seen = (*seen).max(l.seq);
        }
    }

    pub fn parse(s: &str) -> Result<BuildCursor, ApiError> {
        let bad = || ApiError::BadRequest(format!("`{s}` is not a build output cursor"));
        let mut c = BuildCursor::default();
        for part in s.split('~').filter(|p| !p.is_empty()) {
            let (t, q) = part.split_once('.').ok_or_else(bad)?;
            let (t, q) = (
                t.parse::<i64>().map_err(|_| bad())?,
                q.parse::<i32>().map_err(|_| bad())?,
            );
            if t < 0 || q < 0 {
                return Err(bad());
            }
            c.0.insert(t, q);
        }
        if c.0.len() > MAX_CURSOR_TASKS {
            return Err(bad());
        }
        Ok(c)
    }

    fn pairs(&self) -> Vec<(i64, i32)> {
        self.0.iter().map(|(t, s)| (*t, *s)).collect()
    }
}

impl fmt::Display for BuildCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (t, s) in &self.0 {
            if !first {
                f.write_str("~")?;
            }
            first = false;
            write!(f, "{t}.{s}")?;
        }
        Ok(())
    }
}

/// One line as the script shows it.
#[derive(Debug, Serialize)]
struct Shown {
    stream: String,
    text: String,
    origin: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct After {
    after: Option<String>,
}

/// The cursor a request resumes from: `Last-Event-ID`, else `?after=`.
fn resume_from<'a>(headers: &'a HeaderMap, q: &'a After) -> Option<&'a str> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(q.after.as_deref())
        .map(str::trim)
}

/// How long a browser waits before reconnecting a stream that ended.
const RETRY: Duration = Duration::from_millis(500);

fn event(cursor: String, lines: Vec<Shown>) -> Event {
    Event::default()
        .event("lines")
        .id(cursor)
        .retry(RETRY)
        .json_data(lines)
        .unwrap_or_else(|_| Event::default().comment("unencodable"))
}

/// Waits for the app's next lines; false when the stream is to end (shutdown, or its lifetime is over).
async fn wait(api: &Api, tick: &mut watch::Receiver<u64>, ends: tokio::time::Instant) -> bool {
    tokio::select! {
        changed = tick.changed() => changed.is_ok(),
        _ = tokio::time::sleep_until(ends) => false,
        _ = api.stopped() => false,
    }
}

/// The end of a stream opened now.
fn lifetime(api: &Api) -> tokio::time::Instant {
    tokio::time::Instant::now() + api.cfg.ui_stream_lifetime
}

fn sse(stream: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// `GET /ui/apps/{app}/releases/{n}/stream`: the release's build output after the cursor.
pub(super) async fn build(
    State(api): State<Arc<Api>>,
    _: Session,
    Path((app, release)): Path<(String, u64)>,
    Query(q): Query<After>,
    headers: HeaderMap,
) -> Response {
    let name = match app_name(&app) {
        Ok(n) => n,
        Err(e) => return error_page(e),
    };
    let cursor = match BuildCursor::parse(resume_from(&headers, &q).unwrap_or("")) {
        Ok(c) => c,
        Err(e) => return error_page(e),
    };
    if i64::try_from(release).is_err() {
        return error_page(ApiError::NotFound(format!(
            "app `{name}` has no release {release}"
        )));
    }
    if let Err(e) = releases::list(&api.pool, &name).await.and_then(|r| {
        r.releases
            .iter()
            .any(|x| x.number == release)
            .then_some(())
            .ok_or(releases::OpsError::UnknownRelease {
                app: name.clone(),
                release,
            })
    }) {
        return error_page(e.into());
    }
    let tick = api.build_output.subscribe(name.as_str());
    sse(build_stream(api, name, release, cursor, tick))
}

fn build_stream(
    api: Arc<Api>,
    app: Name,
    release: u64,
    cursor: BuildCursor,
    tick: watch::Receiver<u64>,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let ends = lifetime(&api);
    futures_util::stream::unfold((api, cursor, tick), move |(api, mut cursor, mut tick)| {
        let app = app.clone();
        async move {
            loop {
                // Marked seen before the read: a line stored after it wakes the next wait.
                tick.mark_unchanged();
                let rows = match build_lines_after(
                    &api.pool,
                    &app,
                    release,
                    &cursor.pairs(),
                    i64::from(BATCH),
                )
                .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(%app, error = %cairn_schema::error::chain(&e), "a build output stream ended");
                        return None;
                    }
                };
                if !rows.is_empty() {
                    cursor.advance(&rows);
                    let shown = rows
                        .into_iter()
                        .map(|l| Shown {
                            origin: match l.slot {
                                Some(s) => format!("{} · {s}", l.node),
                                None => l.node,
                            },
                            stream: l.stream,
                            text: l.line,
                        })
                        .collect();
                    let ev = event(cursor.to_string(), shown);
                    return Some((Ok(ev), (api, cursor, tick)));
                }
                if !wait(&api, &mut tick, ends).await {
                    return None;
                }
            }
        }
    })
}

/// `GET /ui/apps/{app}/logs/stream`: the app's replica output after the cursor (a line id).
pub(super) async fn logs(
    State(api): State<Arc<Api>>,
    _: Session,
    Path(app): Path<String>,
    Query(q): Query<After>,
    headers: HeaderMap,
) -> Response {
    let name = match app_name(&app) {
        Ok(n) => n,
        Err(e) => return error_page(e),
    };
    let cursor = match resume_from(&headers, &q) {
        None | Some("") => None,
        Some(s) => match s.parse::<i64>() {
            Ok(n) if n >= 0 => Some(n),
            _ => {
                return error_page(ApiError::BadRequest(format!(
                    "`{s}` is not a replica output cursor"
                )));
            }
        },
    };
    // Without a cursor: from now on (the page shows what came before).
    let cursor = match cursor {
        Some(c) => c,
        None => match releases::app_logs(&api.pool, &name, None, 1).await {
            Ok(p) => p.cursor,
            Err(e) => return error_page(e.into()),
        },
    };
    let tick = api.replica_output.subscribe(name.as_str());
    sse(logs_stream(api, name, cursor, tick))
}

fn logs_stream(
    api: Arc<Api>,
    app: Name,
    cursor: i64,
    tick: watch::Receiver<u64>,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let ends = lifetime(&api);
    futures_util::stream::unfold((api, cursor, tick), move |(api, cursor, mut tick)| {
        let app = app.clone();
        async move {
            loop {
                tick.mark_unchanged();
                let page = match releases::app_logs(&api.pool, &app, Some(cursor), BATCH).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(%app, error = %e, "a replica output stream ended");
                        return None;
                    }
                };
                if !page.lines.is_empty() {
                    let shown = page
                        .lines
                        .into_iter()
                        .map(|l| Shown {
                            origin: super::pages::replica_origin(&l),
                            stream: l.line.stream,
                            text: l.line.text,
                        })
                        .collect();
                    let ev = event(page.cursor.to_string(), shown);
                    return Some((Ok(ev), (api, page.cursor, tick)));
                }
                if !wait(&api, &mut tick, ends).await {
                    return None;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_cursors_round_trip_and_refuse_garbage() {
        let c = BuildCursor::parse("3.7~12.0").unwrap();
        assert_eq!(c.to_string(), "3.7~12.0");
        assert_eq!(BuildCursor::parse("").unwrap(), BuildCursor::default());
        for bad in ["x", "3", "3.x", "-1.2", "1.-2", "1.2~", "1.2;DROP"] {
            if bad == "1.2~" {
                // A trailing separator is harmless.
                assert!(BuildCursor::parse(bad).is_ok());
                continue;
            }
            assert!(BuildCursor::parse(bad).is_err(), "{bad}");
        }
    }
}
