//! The dashboard's pages and actions: each handler reads what the CLI's commands read (the status, the
//! releases, the events, the certificates, the ledgers) and renders a template; the view models here
//! hold plain strings, so the templates only lay them out (and escape them).

// A page's error is the response that shows it: handlers return it at once, it is not carried around.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use askama::Template;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use cairn_plan::observed::NodeState;
use cairn_proto::ADMIN_TOKEN_PREFIX;
use cairn_schema::Kind;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::super::apps::{app_name, deploy_now};
use super::super::auth::{hash, well_formed};
use super::super::{Api, ApiError};
use super::{LedgerRow, PREFIX, Session, cookie, open_session, over_https};
use crate::releases;
use crate::status::{self, AppStatus, NodeView, StatusQuery};
use crate::store::{self, Op as _, tokens};

/// Renders `t`, or a plain 500 when a template fails (it cannot, short of a bug).
pub(super) fn render(status: StatusCode, t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "a dashboard template failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be made",
            )
                .into_response()
        }
    }
}

#[derive(Template)]
#[template(path = "ui/error.html")]
struct ErrorPage {
    title: String,
    message: String,
    signed_in: bool,
}

/// An error as a page with its status (the message is the API's, which leaks nothing internal).
pub(super) fn error_page(e: ApiError) -> Response {
    if let ApiError::Store(s) = &e {
        tracing::error!(error = %cairn_schema::error::chain(s), "a dashboard page failed");
    }
    let status = e.status();
    render(
        status,
        &ErrorPage {
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            message: e.to_string(),
            signed_in: true,
        },
    )
}

/// What a page handler returns.
pub(super) type Page = Result<Response, Response>;

trait OrPage<T> {
    fn page(self) -> Result<T, Response>;
}

impl<T, E: Into<ApiError>> OrPage<T> for Result<T, E> {
    fn page(self) -> Result<T, Response> {
        self.map_err(|e| error_page(e.into()))
    }
}

/// What every signed-in page's header shows.
pub(super) struct Nav {
    pub user: String,
    pub role: &'static str,
    pub csrf: String,
}

impl Nav {
    pub(super) fn of(s: &Session) -> Nav {
        Nav {
            user: s.token.name.clone(),
            role: s.token.role.as_str(),
            csrf: s.csrf().to_owned(),
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Formatting.

/// How long ago `t` was, coarsely: `12 s ago`, `3 min ago`, `2 h ago`, `4 d ago`.
pub(super) fn ago(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    let Some(t) = t else {
        return "never".to_owned();
    };
    let s = (now - t).num_seconds().max(0);
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86400),
    }
}

pub(super) fn bytes(b: u64) -> String {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    if b >= GIB {
        format!("{:.1} GiB", b as f64 / GIB as f64)
    } else {
        format!("{} MiB", b / MIB)
    }
}

pub(super) fn millis(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn short(commit: &str) -> String {
    commit.chars().take(10).collect()
}

// ---------------------------------------------------------------------------------------------------
// Sign-in.

#[derive(Template)]
#[template(path = "ui/login.html")]
struct LoginPage {
    error: Option<String>,
}

pub(super) async fn login_form() -> Response {
    render(StatusCode::OK, &LoginPage { error: None })
}

#[derive(Debug, Deserialize)]
pub(super) struct LoginForm {
    token: String,
}

/// Exchanges an admin token for a session; failures count against the client's address like the
/// API's (the same back-off).
pub(super) async fn login(
    State(api): State<Arc<Api>>,
    parts: axum::http::request::Parts,
    Form(f): Form<LoginForm>,
) -> Response {
    let client = api.client(&parts);
    let token = f.token.trim();
    let token_hash = well_formed(token, ADMIN_TOKEN_PREFIX).then(|| hash(token));
    let refused = |status: StatusCode, msg: &str| {
        render(
            status,
            &LoginPage {
                error: Some(msg.to_owned()),
            },
        )
    };
    if let Err(e) = api.admit(&client, token_hash.as_deref()) {
        return refused(e.status(), &e.to_string());
    }
    let found = match &token_hash {
        Some(h) => match tokens::admin_by_token(&api.pool, h).await {
            Ok(t) => t,
            Err(e) => return error_page(ApiError::Store(e)),
        },
        None => None,
    };
    let Some(token) = found else {
        let _ = api.failed(&client);
        return refused(
            StatusCode::UNAUTHORIZED,
            "That is not an admin token this control plane knows (or it was revoked).",
        );
    };
    if let Some(h) = &token_hash {
        api.authenticated(h);
    }
    match open_session(&api, &token, over_https(&api, &parts)).await {
        Ok(set_cookie) => (
            StatusCode::SEE_OTHER,
            [
                (header::SET_COOKIE, set_cookie),
                (header::LOCATION, format!("{PREFIX}/")),
            ],
        )
            .into_response(),
        Err(e) => error_page(e),
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct CsrfForm {
    csrf: String,
}

pub(super) async fn logout(
    State(api): State<Arc<Api>>,
    session: Session,
    Form(f): Form<CsrfForm>,
) -> Page {
    if !session.csrf_ok(&f.csrf) {
        return Err(error_page(ApiError::Forbidden(
            "this form is stale or was not made by this dashboard: reload the page and try again"
                .into(),
        )));
    }
    tokens::delete_session(&api.pool, &session.id_hash)
        .await
        .page()?;
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, cookie("", 0, false)),
            (header::LOCATION, format!("{PREFIX}/login")),
        ],
    )
        .into_response())
}

// ---------------------------------------------------------------------------------------------------
// Overview.

pub(super) struct AppRow {
    pub name: String,
    pub health: &'static str,
    pub release: String,
    pub pinned: bool,
    pub replicas: String,
    pub url: Option<String>,
}

pub(super) struct NodeRow {
    pub name: String,
    pub state: &'static str,
    pub heartbeat: String,
    pub cpu_used: u64,
    pub cpu_total: u64,
    pub cpu: String,
    pub mem_used: u64,
    pub mem_total: u64,
    pub mem: String,
    pub replicas: u32,
}

/// An app's health from its replicas: `down`, `degraded`, `deploying`, `healthy` or `suspended`.
fn health(a: &AppStatus) -> &'static str {
    if a.suspended {
        return "suspended";
    }
    let healthy = a
        .replicas
        .iter()
        .filter(|r| r.actual.as_ref().is_some_and(|x| x.healthy))
        .count() as u32;
    if a.desired_replicas == 0 {
        "healthy"
    } else if healthy == 0 {
        if a.latest_release.is_none() || a.replicas.iter().all(|r| r.actual.is_none()) {
            "deploying"
        } else {
            "down"
        }
    } else if healthy < a.desired_replicas {
        "degraded"
    } else {
        "healthy"
    }
}

/// Failing first.
fn health_rank(h: &str) -> u8 {
    match h {
        "down" => 0,
        "degraded" => 1,
        "deploying" => 2,
        "suspended" => 3,
        _ => 4,
    }
}

fn app_row(a: &AppStatus) -> AppRow {
    let healthy = a
        .replicas
        .iter()
        .filter(|r| r.actual.as_ref().is_some_and(|x| x.healthy))
        .count();
    AppRow {
        name: a.name.clone(),
        health: health(a),
        release: a
            .pinned_release
            .or(a.latest_release)
            .map_or("none".to_owned(), |n| format!("#{n}")),
        pinned: a.pinned_release.is_some(),
        replicas: format!("{healthy}/{} healthy", a.desired_replicas),
        url: a.hosts.first().map(|h| format!("http://{h}/")),
    }
}

fn node_row(n: &NodeView, now: DateTime<Utc>) -> NodeRow {
    NodeRow {
        name: n.name.clone(),
        state: n.state.as_str(),
        heartbeat: ago(n.last_heartbeat, now),
        cpu_used: u64::from(n.used_cpu_millis),
        cpu_total: u64::from(n.cpu_millis).max(1),
        cpu: format!(
            "{:.1} / {:.1} CPU",
            f64::from(n.used_cpu_millis) / 1000.0,
            f64::from(n.cpu_millis) / 1000.0
        ),
        mem_used: n.used_memory_bytes >> 20,
        mem_total: (n.memory_bytes >> 20).max(1),
        mem: format!("{} / {}", bytes(n.used_memory_bytes), bytes(n.memory_bytes)),
        replicas: n.replicas,
    }
}

#[derive(Template)]
#[template(path = "ui/overview.html")]
struct Overview {
    nav: Nav,
    problems: Vec<String>,
    apps: Vec<AppRow>,
    apps_total: u64,
    next_after: Option<String>,
    nodes: Vec<NodeRow>,
    applied: String,
    last_run: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct OverviewQuery {
    after: Option<String>,
}

pub(super) async fn overview(
    State(api): State<Arc<Api>>,
    session: Session,
    Query(q): Query<OverviewQuery>,
) -> Page {
    if let Some(a) = &q.after {
        cairn_schema::Name::new(a).map_err(|e| {
            error_page(ApiError::BadRequest(format!(
                "`{a}` is not an app name to list after: {e}"
            )))
        })?;
    }
    let st = status::load(
        &api.pool,
        api.cfg.offline_after,
        &StatusQuery {
            app: None,
            after: q.after,
            limit: Some(status::MAX_APPS),
        },
    )
    .await
    .page()?;
    let now = Utc::now();
    let mut problems = Vec::new();
    if let Some(r) = &st.last_reconciliation
        && r.status == store::ReconcileStatus::Failed
    {
        let first = r.errors.first().map_or(String::new(), |e| {
            let at = match (&e.path, e.line, e.col) {
                (Some(p), Some(l), Some(c)) => format!("{p}:{l}:{c}: "),
                (Some(p), _, _) => format!("{p}: "),
                _ => String::new(),
            };
            format!(": {at}{}", e.message)
        });
        problems.push(format!("The last reconciliation failed{first}"));
    }
    for n in &st.nodes {
        if n.state == NodeState::Offline {
            problems.push(format!(
                "Node {} is offline (last heartbeat {}).",
                n.name,
                ago(n.last_heartbeat, now)
            ));
        }
    }
    problems.extend(st.certificate_warnings.iter().cloned());
    problems.extend(st.database_warnings.iter().cloned());
    let mut apps: Vec<AppRow> = st.apps.iter().map(app_row).collect();
    apps.sort_by(|a, b| {
        health_rank(a.health)
            .cmp(&health_rank(b.health))
            .then_with(|| a.name.cmp(&b.name))
    });
    let mut nodes: Vec<NodeRow> = st.nodes.iter().map(|n| node_row(n, now)).collect();
    nodes.sort_by_key(|n| (n.state != "offline", n.name.clone()));
    let page = Overview {
        nav: Nav::of(&session),
        problems,
        apps_total: st.apps_total.unwrap_or(apps.len() as u64),
        apps,
        next_after: st.next_after,
        nodes,
        applied: st
            .applied_commit
            .as_deref()
            .map_or("nothing yet".into(), |c| {
                format!("{} (generation {})", short(c), st.generation)
            }),
        last_run: st
            .last_reconciliation
            .as_ref()
            .map(|r| format!("{} {}", r.status.as_str(), ago(Some(r.finished_at), now))),
    };
    Ok(render(StatusCode::OK, &page))
}

// ---------------------------------------------------------------------------------------------------
// An app.

pub(super) struct ReleaseRow {
    pub number: u64,
    pub status: String,
    pub commit: String,
    pub config: String,
    pub created: String,
    pub stages: String,
    pub error: Option<String>,
    pub placement: String,
    pub pinned: bool,
    pub current: bool,
}

pub(super) struct ReplicaRow {
    pub slot: u32,
    pub node: String,
    pub release: u64,
    pub state: String,
    pub actual: String,
}

pub(super) struct CertRow {
    pub names: String,
    pub state: String,
    pub expires: String,
    pub error: Option<String>,
}

pub(super) struct EventRow {
    pub at: String,
    pub severity: String,
    pub kind: String,
    pub message: String,
}

/// The line saying where a page's resource is declared (`ui/declared.html`): what to change instead of
/// editing here.
struct DeclaredLine {
    /// `app`, `node`: the manifest's table.
    kind: &'static str,
    name: String,
    /// Where the applied commit declares it (`apps/web.toml:3`, linked to the repository's page of
    /// that line when it has one); `None` before this control plane applied anything.
    origin: Option<crate::declared::Declared>,
    /// The applied commit, short.
    applied: String,
}

impl DeclaredLine {
    async fn of(
        api: &Api,
        applied: Option<&str>,
        kind: Kind,
        name: &cairn_schema::Name,
    ) -> Result<DeclaredLine, Response> {
        let origin =
            crate::declared::lookup(&api.pool, kind, name, api.cfg.config_browse.as_deref())
                .await
                .page()?;
        Ok(DeclaredLine {
            kind: match kind {
                Kind::Node => "node",
                _ => "app",
            },
            name: name.to_string(),
            origin,
            applied: applied.map_or("—".into(), short),
        })
    }
}

#[derive(Template)]
#[template(path = "ui/app.html")]
struct AppPage {
    nav: Nav,
    name: String,
    health: &'static str,
    declared: bool,
    pinned: Option<u64>,
    hosts: Vec<String>,
    replicas: Vec<ReplicaRow>,
    releases: Vec<ReleaseRow>,
    certs: Vec<CertRow>,
    databases: Vec<super::ops::DbRow>,
    events: Vec<EventRow>,
    can_act: bool,
    notice: Option<String>,
    declaration: DeclaredLine,
    /// Month to date, from the hours rolled up so far: `12.34 EUR`.
    cost: String,
}

/// What an action's redirect says was done: one of the actions, never text from the URL (a link with a
/// message of its own would put someone else's words on this page).
#[derive(Debug, Deserialize)]
pub(super) struct NoticeQuery {
    pub done: Option<String>,
}

/// Releases shown on an app's page.
const RELEASES_SHOWN: usize = 20;

pub(super) async fn app(
    State(api): State<Arc<Api>>,
    session: Session,
    Path(app): Path<String>,
    Query(q): Query<NoticeQuery>,
) -> Page {
    let name = app_name(&app).map_err(error_page)?;
    let rel = releases::list(&api.pool, &name)
        .await
        .map_err(|e| error_page(e.into()))?;
    let st = status::load(
        &api.pool,
        api.cfg.offline_after,
        &StatusQuery {
            app: Some(name.to_string()),
            after: None,
            limit: Some(1),
        },
    )
    .await
    .page()?;
    let a = st.apps.iter().find(|a| a.name == name.as_str());
    let certs = crate::certs::list(&api.pool).await.page()?;
    let events = crate::events::list(
        &api.pool,
        &crate::events::Filter {
            app: Some(name.to_string()),
            after: None,
            limit: 20,
        },
    )
    .await
    .page()?;
    let now = Utc::now();
    let cost = crate::store::usage::app_month_to_date_minor(&api.pool, name.as_str(), now)
        .await
        .page()?;
    let currency = crate::store::usage::currency(&api.pool).await.page()?;
    let cost = format!(
        "{}{}",
        crate::store::usage::decimal(cost),
        currency.map_or(String::new(), |c| format!(" {c}"))
    );
    let live = rel
        .releases
        .iter()
        .find(|r| r.status == "live")
        .map(|r| r.number);
    let current = rel.pinned_release.or(live);
    let releases = rel
        .releases
        .iter()
        .take(RELEASES_SHOWN)
        .map(|r| ReleaseRow {
            number: r.number,
            status: r.status.clone(),
            commit: short(&r.source_commit),
            config: short(&r.config_commit),
            created: ago(Some(r.created_at), now),
            stages: r
                .stage_timings
                .iter()
                // Non-breaking: a stage and its time stay on one line.
                .map(|(k, v)| format!("{k}\u{a0}{}", millis(*v).replace(' ', "\u{a0}")))
                .collect::<Vec<_>>()
                .join(" · "),
            error: r.error.clone(),
            placement: r
                .placement
                .iter()
                .map(|p| format!("{}→{} ({})", p.slot, p.node, p.state))
                .collect::<Vec<_>>()
                .join(", "),
            pinned: rel.pinned_release == Some(r.number),
            current: current == Some(r.number),
        })
        .collect();
    let page = AppPage {
        nav: Nav::of(&session),
        health: a.map_or("unknown", health),
        name: name.to_string(),
        declared: rel.declared,
        pinned: rel.pinned_release,
        hosts: a.map(|a| a.hosts.clone()).unwrap_or_default(),
        replicas: a
            .map(|a| {
                a.replicas
                    .iter()
                    .map(|r| ReplicaRow {
                        slot: r.slot,
                        node: r.node.clone(),
                        release: r.release,
                        state: r.state.clone(),
                        actual: r.actual.as_ref().map_or("not reported".into(), |x| {
                            format!(
                                "#{} {}{}",
                                x.release,
                                x.state,
                                if x.healthy { ", healthy" } else { "" }
                            )
                        }),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        releases,
        certs: certs
            .into_iter()
            .filter(|c| c.app == name.as_str())
            .map(|c| CertRow {
                names: c.names.join(", "),
                state: c.state,
                expires: c.not_after.map_or("—".into(), time),
                error: c.last_error,
            })
            .collect(),
        databases: super::ops::attached(&api, &name).await?,
        events: events
            .into_iter()
            .rev()
            .map(|e| EventRow {
                at: ago(Some(e.at), now),
                severity: e.severity,
                kind: e.kind,
                message: e.message,
            })
            .collect(),
        can_act: session.can_act(),
        notice: q.done.as_deref().and_then(|d| match d {
            "rollback" => Some(match rel.pinned_release {
                Some(n) => format!("Rolled back: pinned to release #{n}."),
                None => "Rolled back.".to_owned(),
            }),
            "unpin" => Some("Unpinned.".to_owned()),
            "restart" => Some("Restart requested.".to_owned()),
            "deploy" => {
                Some("Deploy requested: the branch head was read and is deployed next.".to_owned())
            }
            "renew" => Some(
                "Renewal requested: the certificates are ordered again now; the current ones serve until the new ones replace them."
                    .to_owned(),
            ),
            _ => None,
        }),
        declaration: DeclaredLine::of(&api, st.applied_commit.as_deref(), Kind::App, &name).await?,
        cost,
    };
    Ok(render(StatusCode::OK, &page))
}

// ---------------------------------------------------------------------------------------------------
// Output.

/// Where a replica's line came from: `#<release> <node> · <slot>`.
pub(super) fn replica_origin(l: &cairn_proto::admin::AppLogLine) -> String {
    format!(
        "#{} {}{}",
        l.release,
        l.line.node,
        l.line.slot.map_or(String::new(), |s| format!(" · {s}"))
    )
}

pub(super) struct Line {
    pub stream: String,
    pub text: String,
    pub origin: String,
}

#[derive(Template)]
#[template(path = "ui/output.html")]
struct OutputPage {
    nav: Nav,
    app: String,
    title: String,
    lines: Vec<Line>,
    stream_url: String,
    cursor: String,
}

pub(super) async fn build(
    State(api): State<Arc<Api>>,
    session: Session,
    Path((app, release)): Path<(String, u64)>,
) -> Page {
    let name = app_name(&app).map_err(error_page)?;
    if i64::try_from(release).is_err() {
        return Err(error_page(ApiError::NotFound(format!(
            "app `{name}` has no release {release}"
        ))));
    }
    // The release must exist (a 404 otherwise), then its lines are read with their cursor.
    releases::build_logs(&api.pool, &name, Some(release))
        .await
        .map_err(|e| error_page(e.into()))?;
    let rows = store::releases::build_lines_after(
        &api.pool,
        &name,
        release,
        &[],
        store::releases::MAX_BUILD_LINES,
    )
    .await
    .page()?;
    let cursor = super::live::BuildCursor::after(&rows);
    let page = OutputPage {
        nav: Nav::of(&session),
        title: format!("Release #{release}: build output"),
        lines: rows
            .into_iter()
            .map(|l| Line {
                origin: match l.slot {
                    Some(s) => format!("{} · {s}", l.node),
                    None => l.node,
                },
                stream: l.stream,
                text: l.line,
            })
            .collect(),
        stream_url: format!("{PREFIX}/apps/{name}/releases/{release}/stream"),
        cursor: cursor.to_string(),
        app: name.to_string(),
    };
    Ok(render(StatusCode::OK, &page))
}

pub(super) async fn logs(
    State(api): State<Arc<Api>>,
    session: Session,
    Path(app): Path<String>,
) -> Page {
    let name = app_name(&app).map_err(error_page)?;
    let page = releases::app_logs(&api.pool, &name, None, 500)
        .await
        .map_err(|e| error_page(e.into()))?;
    let out = OutputPage {
        nav: Nav::of(&session),
        title: "Replica output".into(),
        lines: page
            .lines
            .into_iter()
            .map(|l| Line {
                origin: replica_origin(&l),
                stream: l.line.stream,
                text: l.line.text,
            })
            .collect(),
        stream_url: format!("{PREFIX}/apps/{name}/logs/stream"),
        cursor: page.cursor.to_string(),
        app: name.to_string(),
    };
    Ok(render(StatusCode::OK, &out))
}

// ---------------------------------------------------------------------------------------------------
// A node.

pub(super) struct ActualRow {
    pub app: String,
    pub slot: u32,
    pub release: u64,
    pub state: &'static str,
    pub healthy: bool,
}

#[derive(Template)]
#[template(path = "ui/node.html")]
struct NodePage {
    nav: Nav,
    node: NodeRow,
    region: String,
    address: String,
    ingress: bool,
    drain: bool,
    agent: String,
    joined: String,
    disk: String,
    actual: Vec<ActualRow>,
    declaration: DeclaredLine,
}

pub(super) async fn node(
    State(api): State<Arc<Api>>,
    session: Session,
    Path(node): Path<String>,
) -> Page {
    let st = status::load(
        &api.pool,
        api.cfg.offline_after,
        &StatusQuery {
            app: None,
            after: None,
            limit: Some(1),
        },
    )
    .await
    .page()?;
    let Some(n) = st.nodes.iter().find(|n| n.name == node) else {
        return Err(error_page(ApiError::NotFound(format!(
            "there is no node `{node}` in the applied configuration"
        ))));
    };
    let rows = store::nodes::nodes(&api.pool).await.page()?;
    let row = rows.iter().find(|r| r.name.as_str() == node);
    let now = Utc::now();
    let name = cairn_schema::Name::new(&node).map_err(|e| {
        error_page(ApiError::BadRequest(format!(
            "`{node}` is not a node name: {e}"
        )))
    })?;
    let page = NodePage {
        declaration: DeclaredLine::of(&api, st.applied_commit.as_deref(), Kind::Node, &name)
            .await?,
        nav: Nav::of(&session),
        node: node_row(n, now),
        region: n.region.clone().unwrap_or_else(|| "—".into()),
        address: n.address.clone().unwrap_or_else(|| "—".into()),
        ingress: n.ingress,
        drain: n.drain,
        agent: row
            .and_then(|r| r.agent_version.clone())
            .unwrap_or_else(|| "—".into()),
        joined: row
            .and_then(|r| r.joined_at)
            .map_or("never".into(), |t| ago(Some(t), now)),
        disk: format!("{} / {}", bytes(n.used_disk_bytes), bytes(n.disk_bytes)),
        actual: row
            .map(|r| {
                r.replicas
                    .iter()
                    .map(|x| ActualRow {
                        app: x.app.to_string(),
                        slot: x.slot,
                        release: x.release,
                        state: match x.state {
                            cairn_proto::RunState::Running => "running",
                            cairn_proto::RunState::Stopped => "stopped",
                        },
                        healthy: x.healthy,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    };
    Ok(render(StatusCode::OK, &page))
}

// ---------------------------------------------------------------------------------------------------
// Reconciliations and deliveries.

pub(super) struct RunRow {
    pub status: &'static str,
    pub commit: String,
    pub trigger: String,
    pub summary: String,
    pub finished: String,
    pub duration: String,
    pub repeats: u32,
    pub errors: Vec<String>,
    pub more_errors: u64,
}

#[derive(Template)]
#[template(path = "ui/reconciliations.html")]
struct RunsPage {
    nav: Nav,
    runs: Vec<RunRow>,
}

pub(super) async fn reconciliations(State(api): State<Arc<Api>>, session: Session) -> Page {
    let mut conn = api.pool.acquire().await.op("read reconciliations").page()?;
    let runs = store::history::recent_reconciliations(&mut conn, 50)
        .await
        .page()?;
    drop(conn);
    let now = Utc::now();
    let page = RunsPage {
        nav: Nav::of(&session),
        runs: runs
            .into_iter()
            .map(|r| RunRow {
                status: r.status.as_str(),
                commit: r.commit.as_deref().map_or("—".into(), short),
                trigger: r.trigger,
                summary: r.summary,
                finished: ago(Some(r.last_at.unwrap_or(r.finished_at)), now),
                duration: millis(r.duration_ms),
                repeats: r.repeats,
                more_errors: r.errors_total.saturating_sub(r.errors.len() as u64),
                errors: r
                    .errors
                    .into_iter()
                    .map(|e| match (e.path, e.line, e.col) {
                        (Some(p), Some(l), Some(c)) => format!("{p}:{l}:{c}: {}", e.message),
                        (Some(p), _, _) => format!("{p}: {}", e.message),
                        _ => e.message,
                    })
                    .collect(),
            })
            .collect(),
    };
    Ok(render(StatusCode::OK, &page))
}

#[derive(Template)]
#[template(path = "ui/deliveries.html")]
struct DeliveriesPage {
    nav: Nav,
    available: bool,
    /// The notification sinks, each with a test button for an operator.
    sinks: Vec<String>,
    can_act: bool,
    webhooks: Vec<(String, LedgerRow)>,
    notifications: Vec<(String, LedgerRow)>,
}

pub(super) async fn deliveries(State(api): State<Arc<Api>>, session: Session) -> Page {
    let now = Utc::now();
    let shown = |rows: Vec<LedgerRow>| {
        rows.into_iter()
            .map(|r| (ago(Some(r.at), now), r))
            .collect::<Vec<_>>()
    };
    let (available, webhooks, notifications, sinks) = match api.ledger.get() {
        Some(l) => (
            true,
            shown(l.webhooks(api.pool.clone(), 50).await.page()?),
            shown(l.notifications(api.pool.clone(), 50).await.page()?),
            l.sinks(api.pool.clone()).await.page()?,
        ),
        None => (false, Vec::new(), Vec::new(), Vec::new()),
    };
    let page = DeliveriesPage {
        nav: Nav::of(&session),
        available,
        sinks,
        can_act: session.can_act(),
        webhooks,
        notifications,
    };
    Ok(render(StatusCode::OK, &page))
}

// ---------------------------------------------------------------------------------------------------
// Actions.

/// The actions git does not own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Rollback,
    Unpin,
    Restart,
    Deploy,
    Renew,
}

impl Action {
    fn parse(s: &str) -> Result<Action, Response> {
        Ok(match s {
            "rollback" => Action::Rollback,
            "unpin" => Action::Unpin,
            "restart" => Action::Restart,
            "deploy" => Action::Deploy,
            "renew" => Action::Renew,
            _ => {
                return Err(error_page(ApiError::NotFound(
                    "there is no such action: rollback, unpin, restart, deploy and renew are"
                        .into(),
                )));
            }
        })
    }

    fn question(self, app: &str, release: Option<u64>) -> String {
        match (self, release) {
            (Action::Rollback, Some(n)) => format!(
                "Roll {app} back to release #{n}? It stays pinned there until you unpin it or its manifest changes."
            ),
            (Action::Rollback, None) => format!(
                "Roll {app} back to the release before the current one? It stays pinned there until you unpin it or its manifest changes."
            ),
            (Action::Unpin, _) => {
                format!("Unpin {app}? It goes back to the release its manifest and branch say.")
            }
            (Action::Restart, _) => format!("Restart every replica of {app}?"),
            (Action::Deploy, _) => format!(
                "Deploy {app} now? Its branch head is read from its repository and deployed."
            ),
            (Action::Renew, _) => format!(
                "Renew the certificates of {app} now? They are ordered from the CA again at once; \
                 the current ones keep serving until the new ones replace them."
            ),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Action::Rollback => "Roll back",
            Action::Unpin => "Unpin",
            Action::Restart => "Restart",
            Action::Deploy => "Deploy now",
            Action::Renew => "Renew certificates",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Action::Rollback => "rollback",
            Action::Unpin => "unpin",
            Action::Restart => "restart",
            Action::Deploy => "deploy",
            Action::Renew => "renew",
        }
    }
}

/// The confirmation every action asks for: its question, and a form that POSTs it with the CSRF token.
#[derive(Template)]
#[template(path = "ui/confirm.html")]
pub(super) struct ConfirmPage {
    pub nav: Nav,
    /// What it acts on (an app, a database, a sink) and the page it came from.
    pub subject: String,
    pub back: String,
    pub question: String,
    pub label: &'static str,
    pub action_url: String,
    pub release: Option<u64>,
}

impl ConfirmPage {
    pub fn render(&self) -> Response {
        render(StatusCode::OK, self)
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct ActionQuery {
    release: Option<u64>,
}

pub(super) fn refuse_viewer(session: &Session) -> Result<(), Response> {
    super::super::admin::require_operator(session.token.role).map_err(error_page)
}

/// Refuses a POST whose CSRF token is not the session's.
pub(super) fn refuse_forged(session: &Session, csrf: &str) -> Result<(), Response> {
    if session.csrf_ok(csrf) {
        Ok(())
    } else {
        Err(error_page(ApiError::Forbidden(
            "this form is stale or was not made by this dashboard: reload the page and try again"
                .into(),
        )))
    }
}

pub(super) async fn confirm(
    session: Session,
    Path((app, action)): Path<(String, String)>,
    Query(q): Query<ActionQuery>,
) -> Page {
    let name = app_name(&app).map_err(error_page)?;
    let action = Action::parse(&action)?;
    refuse_viewer(&session)?;
    let page = ConfirmPage {
        nav: Nav::of(&session),
        question: action.question(name.as_str(), q.release),
        label: action.label(),
        action_url: format!("{PREFIX}/apps/{name}/actions/{}", action.slug()),
        release: q.release,
        back: format!("{PREFIX}/apps/{name}"),
        subject: name.to_string(),
    };
    Ok(page.render())
}

#[derive(Debug, Deserialize)]
pub(super) struct ActionForm {
    csrf: String,
    release: Option<u64>,
}

pub(super) async fn act(
    State(api): State<Arc<Api>>,
    session: Session,
    Path((app, action)): Path<(String, String)>,
    Form(f): Form<ActionForm>,
) -> Page {
    let name = app_name(&app).map_err(error_page)?;
    let action = Action::parse(&action)?;
    refuse_viewer(&session)?;
    refuse_forged(&session, &f.csrf)?;
    let by = &session.token.name;
    match action {
        Action::Rollback => {
            let p = releases::rollback(&api.pool, &name, f.release)
                .await
                .map_err(|e| error_page(e.into()))?;
            tracing::info!(app = %name, release = ?p.pinned_release, %by, "rollback through the dashboard");
        }
        Action::Unpin => {
            releases::unpin(&api.pool, &name)
                .await
                .map_err(|e| error_page(e.into()))?;
            tracing::info!(app = %name, %by, "unpin through the dashboard");
        }
        Action::Restart => {
            let r = releases::restart(&api.pool, &name)
                .await
                .map_err(|e| error_page(e.into()))?;
            tracing::info!(app = %name, count = r.count, %by, "restart through the dashboard");
        }
        Action::Deploy => {
            let d = deploy_now(&api, &name).await.map_err(error_page)?;
            tracing::info!(app = %name, commit = %d.commit, %by, "deploy through the dashboard");
        }
        Action::Renew => {
            let n = store::certs::renew_now(&api.pool, name.as_str())
                .await
                .page()?;
            if n == 0 {
                return Err(error_page(ApiError::Conflict(format!(
                    "{name} has no certificate from the CA to renew, or one is being ordered right now"
                ))));
            }
            api.routes.certs_wake.notify_one();
            tracing::info!(app = %name, certificates = n, %by, "certificate renewal through the dashboard");
        }
    }
    api.wake.notify_one();
    let location = format!("{PREFIX}/apps/{name}?done={}", action.slug());
    Ok((StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response())
}
