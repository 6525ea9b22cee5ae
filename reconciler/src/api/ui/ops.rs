//! The dashboard's managed databases and its actions on what is not an app: the databases page (each
//! database's node, availability and recovery point, red when its backups are failing or overdue), an
//! app's attached databases, "back up now" for a database and "send a test" for a notification sink.
//! Each action is a confirmation page, then a POST with the session's CSRF token, an operator's only,
//! like the app actions in [`super::pages`].

// A page's error is the response that shows it, as in `pages.rs`.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use askama::Template;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use cairn_schema::Name;
use chrono::Utc;
use serde::Deserialize;

use super::super::{Api, ApiError};
use super::pages::{
    ConfirmPage, Nav, NoticeQuery, Page, ago, error_page, refuse_forged, refuse_viewer, render,
};
use super::{PREFIX, Session};
use crate::databases::{DatabaseInfo, list_databases};

/// A database as the pages show it.
pub(super) struct DbRow {
    pub name: String,
    /// The env var an app receives its URL in (on an app's page), else empty.
    pub var: String,
    pub engine: String,
    pub node: String,
    pub available: bool,
    /// When the last good backup finished: `3 min ago`, `never`.
    pub recovery_point: String,
    /// Backups failing, or none good within two intervals: shown red.
    pub overdue: bool,
    /// When the latest verification restore finished (`never`), and whether it failed (red).
    pub verified: String,
    pub verify_failed: bool,
}

impl DbRow {
    fn of(d: &DatabaseInfo, var: String) -> DbRow {
        DbRow {
            name: d.name.clone(),
            var,
            engine: format!("{} {}", d.engine, d.version),
            node: d.node.clone(),
            available: d.available,
            recovery_point: ago(d.last_good_backup, Utc::now()),
            overdue: d.backup_overdue,
            verified: ago(d.last_verified, Utc::now()),
            verify_failed: d.verify_failed,
        }
    }
}

/// A database's name from the path (the admin API's check and message).
fn db_name(s: &str) -> Result<Name, Response> {
    super::super::databases::db_name(s).map_err(error_page)
}

/// The databases attached to `app` as applied, with the env var each arrives in.
pub(super) async fn attached(api: &Api, app: &Name) -> Result<Vec<DbRow>, Response> {
    let store_error = |e: crate::store::StoreError| error_page(e.into());
    let mut conn = api.pool.acquire().await.map_err(|source| {
        store_error(crate::store::StoreError::Query {
            op: "connect to read an app's databases",
            source,
        })
    })?;
    let Some(applied) = crate::store::state::applied_app(&mut conn, app)
        .await
        .map_err(store_error)?
    else {
        return Ok(Vec::new());
    };
    drop(conn);
    if applied.databases.is_empty() {
        return Ok(Vec::new());
    }
    let all = list_databases(&api.pool).await.map_err(store_error)?;
    Ok(applied
        .databases
        .iter()
        .filter_map(|(db, var)| {
            all.iter()
                .find(|d| d.name == db.as_str())
                .map(|d| DbRow::of(d, var.to_string()))
        })
        .collect())
}

#[derive(Template)]
#[template(path = "ui/databases.html")]
struct DatabasesPage {
    nav: Nav,
    databases: Vec<DbRow>,
    can_act: bool,
    notice: Option<&'static str>,
}

pub(super) async fn databases(
    State(api): State<Arc<Api>>,
    session: Session,
    Query(q): Query<NoticeQuery>,
) -> Page {
    let all = list_databases(&api.pool)
        .await
        .map_err(|e| error_page(e.into()))?;
    let page = DatabasesPage {
        nav: Nav::of(&session),
        databases: all.iter().map(|d| DbRow::of(d, String::new())).collect(),
        can_act: session.can_act(),
        notice: (q.done.as_deref() == Some("backup"))
            .then_some("Backup queued: its node runs it next; the ledger (cairn db backups) shows the outcome."),
    };
    Ok(render(StatusCode::OK, &page))
}

/// The one action on a database.
fn backup_action(action: &str) -> Result<(), Response> {
    if action == "backup" {
        Ok(())
    } else {
        Err(error_page(ApiError::NotFound(
            "there is no such action: backup is".into(),
        )))
    }
}

pub(super) async fn db_confirm(
    session: Session,
    Path((db, action)): Path<(String, String)>,
) -> Page {
    let name = db_name(&db)?;
    backup_action(&action)?;
    refuse_viewer(&session)?;
    Ok(ConfirmPage {
        nav: Nav::of(&session),
        subject: name.to_string(),
        back: format!("{PREFIX}/databases"),
        question: format!(
            "Back {name} up now? Its node dumps it to the declared target beside the scheduled backups."
        ),
        label: "Back up now",
        action_url: format!("{PREFIX}/databases/{name}/actions/backup"),
        release: None,
    }
    .render())
}

#[derive(Debug, Deserialize)]
pub(super) struct CsrfForm {
    csrf: String,
}

pub(super) async fn db_act(
    State(api): State<Arc<Api>>,
    session: Session,
    Path((db, action)): Path<(String, String)>,
    Form(f): Form<CsrfForm>,
) -> Page {
    let name = db_name(&db)?;
    backup_action(&action)?;
    refuse_viewer(&session)?;
    refuse_forged(&session, &f.csrf)?;
    let id = crate::databases::backup_now(&api.pool, &name, "manual")
        .await
        .map_err(|e| error_page(e.into()))?;
    tracing::info!(database = %name, backup = id, by = %session.token.name, "backup queued through the dashboard");
    let location = format!("{PREFIX}/databases?done=backup");
    Ok((StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response())
}

fn sink_name(s: &str) -> Result<Name, Response> {
    Name::new(s).map_err(|e| {
        error_page(ApiError::BadRequest(format!(
            "`{s}` is not a sink name: {e}"
        )))
    })
}

pub(super) async fn sink_confirm(session: Session, Path(sink): Path<String>) -> Page {
    let name = sink_name(&sink)?;
    refuse_viewer(&session)?;
    Ok(ConfirmPage {
        nav: Nav::of(&session),
        subject: name.to_string(),
        back: format!("{PREFIX}/deliveries"),
        question: format!(
            "Send a test message to {name} now? Its receiver gets a `test` event, signed like every \
             notification; nothing is queued or retried."
        ),
        label: "Send a test",
        action_url: format!("{PREFIX}/sinks/{name}/test"),
        release: None,
    }
    .render())
}

#[derive(Template)]
#[template(path = "ui/tested.html")]
struct TestedPage {
    nav: Nav,
    sink: String,
    answer: cairn_proto::admin::NotifyTestAnswer,
}

pub(super) async fn sink_act(
    State(api): State<Arc<Api>>,
    session: Session,
    Path(sink): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Page {
    let name = sink_name(&sink)?;
    refuse_viewer(&session)?;
    refuse_forged(&session, &f.csrf)?;
    let Some(ledger) = api.ledger.get() else {
        return Err(error_page(ApiError::NotFound(
            "this control plane does not send notifications".into(),
        )));
    };
    let answer = ledger
        .test(api.clone(), name.to_string())
        .await
        .map_err(error_page)?;
    tracing::info!(sink = %name, by = %session.token.name, status = ?answer.status_code, "test notification sent through the dashboard");
    let page = TestedPage {
        nav: Nav::of(&session),
        sink: name.to_string(),
        answer,
    };
    Ok(render(StatusCode::OK, &page))
}
