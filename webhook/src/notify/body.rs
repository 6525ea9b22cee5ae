//! What a notification says, per sink kind: a generic webhook gets the event as JSON (Standard Webhooks'
//! `{type, timestamp, data}`), Slack an incoming-webhook message (`text` and `blocks`, mrkdwn escaped),
//! Discord an execute-webhook message (one embed, mentions disabled).
//!
//! What it must not do: put anything in a message that the event does not hold (no sink URL, no
//! secret), or let event text (an error message, a commit subject) mention people or forge markup.

use cairn_proto::admin::EventInfo;
use cairn_schema::SinkKind;
use serde_json::{Value, json};

/// The body of a notification of `event` for a sink of `kind`.
pub fn body(kind: SinkKind, event: &EventInfo) -> Value {
    match kind {
        SinkKind::Webhook => webhook(event),
        SinkKind::Slack => slack(event),
        SinkKind::Discord => discord(event),
    }
}

/// `{"type": "deploy.failed", "timestamp": "...", "data": {...}}`.
fn webhook(e: &EventInfo) -> Value {
    json!({
        "type": e.kind,
        "timestamp": e.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "data": {
            "id": e.id,
            "severity": e.severity,
            "app": e.app,
            "node": e.node,
            "release": e.release,
            "commit": e.commit,
            "message": e.message,
            "detail": e.detail,
        }
    })
}

fn emoji(severity: &str) -> &'static str {
    match severity {
        "error" => ":red_circle:",
        "warning" => ":warning:",
        _ => ":large_green_circle:",
    }
}

/// Slack's mrkdwn treats `&`, `<` and `>` as markup (links, mentions): they are escaped.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The facts worth a field: app, release, commit, node.
fn facts(e: &EventInfo) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(a) = &e.app {
        out.push(("App", a.clone()));
    }
    if let Some(r) = e.release {
        out.push(("Release", format!("#{r}")));
    }
    if let Some(c) = &e.commit {
        out.push(("Commit", c.get(..12).unwrap_or(c).to_owned()));
    }
    if let Some(n) = &e.node {
        out.push(("Node", n.clone()));
    }
    out
}

fn slack(e: &EventInfo) -> Value {
    let title = format!("{} *{}*", emoji(&e.severity), e.kind);
    let text = format!("{}: {}", e.kind, slack_escape(&e.message));
    let mut blocks = vec![json!({
        "type": "section",
        "text": {
            "type": "mrkdwn",
            "text": format!("{title}\n{}", slack_escape(&e.message)),
        }
    })];
    let fields: Vec<Value> = facts(e)
        .into_iter()
        .map(|(k, v)| json!({"type": "mrkdwn", "text": format!("*{k}*\n{}", slack_escape(&v))}))
        .collect();
    if !fields.is_empty() {
        blocks.push(json!({"type": "section", "fields": fields}));
    }
    blocks.push(json!({
        "type": "context",
        "elements": [{
            "type": "mrkdwn",
            "text": format!("Cairn event {} · {} · {}", e.id, e.severity, e.at.format("%Y-%m-%d %H:%M:%S UTC")),
        }]
    }));
    json!({ "text": text, "blocks": blocks })
}

fn discord(e: &EventInfo) -> Value {
    let color = match e.severity.as_str() {
        "error" => 0xD7_3A_4A,
        "warning" => 0xE3_B3_41,
        _ => 0x2E_A0_43,
    };
    let fields: Vec<Value> = facts(e)
        .into_iter()
        .map(|(k, v)| json!({"name": k, "value": v, "inline": true}))
        .collect();
    json!({
        "embeds": [{
            "title": e.kind,
            "description": e.message,
            "color": color,
            "timestamp": e.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "fields": fields,
            "footer": {"text": format!("Cairn event {} · {}", e.id, e.severity)},
        }],
        // Event text (an agent's error, an app name) never pings anyone.
        "allowed_mentions": {"parse": []},
    })
}

/// A message for `cairn notify test`, shaped as an event.
pub fn test_event(sink: &str) -> EventInfo {
    EventInfo {
        id: 0,
        at: chrono::Utc::now(),
        kind: "notify.test".into(),
        severity: "info".into(),
        app: None,
        node: None,
        release: None,
        commit: None,
        message: format!("Test message from Cairn for sink `{sink}`: this sink works."),
        detail: json!({}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    fn failed() -> EventInfo {
        EventInfo {
            id: 42,
            at: chrono::Utc.with_ymd_and_hms(2026, 12, 6, 10, 0, 0).unwrap(),
            kind: "deploy.failed".into(),
            severity: "error".into(),
            app: Some("shop".into()),
            node: Some("node-1".into()),
            release: Some(7),
            commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
            message: "release #7 of shop (commit 0123456789ab) failed: health check <GET /healthz> answered 500 & @everyone".into(),
            detail: json!({"reason": "health check answered 500", "push_to_running_secs": null}),
        }
    }

    #[test]
    fn slack_gets_text_and_blocks_with_markup_escaped() {
        let b = body(SinkKind::Slack, &failed());
        insta::assert_json_snapshot!(b);
        // Slack's documented shape: `text` (the fallback) and `blocks` of sections and context.
        assert!(b["text"].is_string());
        for block in b["blocks"].as_array().unwrap() {
            assert!(["section", "context"].contains(&block["type"].as_str().unwrap()));
        }
        assert!(!b.to_string().contains("<GET"), "escaped: {b}");
    }

    #[test]
    fn discord_gets_one_embed_and_pings_nobody() {
        let b = body(SinkKind::Discord, &failed());
        insta::assert_json_snapshot!(b);
        // Discord's documented shape: `embeds` with title, description, color (an integer), fields
        // of name/value, and mentions off.
        let embed = &b["embeds"][0];
        assert!(embed["color"].is_u64());
        assert!(embed["description"].as_str().unwrap().len() <= 4096);
        assert_eq!(b["allowed_mentions"]["parse"], json!([]));
    }

    #[test]
    fn a_webhook_gets_the_event_as_type_timestamp_data() {
        insta::assert_json_snapshot!(body(SinkKind::Webhook, &failed()));
    }
}
