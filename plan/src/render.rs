//! Renders a [`Plan`] three ways: terminal text (terraform-style `+`/`~`/`-` markers, optionally
//! coloured), JSON (serde, fields in declaration order, for `cairn plan --json` and tools), and Markdown for
//! the pull-request comment (summary, changes with field diffs, which ingress nodes serve new hosts, where
//! each replica runs, node headroom, monthly cost).
//!
//! What it must not do: decide anything (every fact comes from the plan), or print a secret: the plan holds
//! none, and values from manifests are escaped so that they cannot break out of their Markdown context.

use std::fmt::Write as _;

use cairn_schema::Price;
use rust_decimal::Decimal;
use serde::Serialize;

use super::{Action, FieldDiff, NodeHeadroom, PlacementReason, Plan, Task, Usage};
use crate::observed::{NodeState, ReplicaState};
use crate::scheduler::Condition;

/// The version of the JSON document's shape; bumped on incompatible changes.
pub const JSON_FORMAT: u32 = 1;

/// The plan as pretty JSON: `format`, `summary`, `empty`, then every field of [`Plan`].
pub fn json(plan: &Plan) -> String {
    #[derive(Serialize)]
    struct Doc<'a> {
        format: u32,
        summary: String,
        empty: bool,
        #[serde(flatten)]
        plan: &'a Plan,
    }
    let doc = Doc {
        format: JSON_FORMAT,
        summary: plan.summary(),
        empty: plan.is_empty(),
        plan,
    };
    serde_json::to_string_pretty(&doc).expect("a plan serializes")
}

/// Replaces control characters in text from manifests (a file name, a branch in a message), so that it
/// cannot move the cursor or recolour a terminal.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

struct Style {
    color: bool,
}

impl Style {
    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    }
    fn add(&self, s: &str) -> String {
        self.paint("32", s)
    }
    fn change(&self, s: &str) -> String {
        self.paint("33", s)
    }
    fn del(&self, s: &str) -> String {
        self.paint("31", s)
    }
    fn bold(&self, s: &str) -> String {
        self.paint("1", s)
    }
    fn dim(&self, s: &str) -> String {
        self.paint("2", s)
    }
}

fn marker(a: Action) -> &'static str {
    match a {
        Action::Create => "+",
        Action::Update => "~",
        Action::Delete => "-",
    }
}

/// One field diff as `path: before → after`, with its marker (`+`, `~`, `-`).
pub(crate) fn field_line(f: &FieldDiff) -> (&'static str, String) {
    match (&f.before, &f.after) {
        (None, Some(a)) => ("+", format!("{}: {a}", f.path)),
        (Some(b), None) => ("-", format!("{}: {b}", f.path)),
        (Some(b), Some(a)) if b.is_secret() && a.is_secret() => {
            let note = if f.unverified { " (unverified)" } else { "" };
            ("~", format!("{}: (secret) changed{note}", f.path))
        }
        (Some(b), Some(a)) => ("~", format!("{}: {b} → {a}", f.path)),
        (None, None) => ("~", f.path.clone()),
    }
}

fn commit_short(c: &Option<crate::observed::CommitId>) -> String {
    c.as_ref()
        .map_or_else(|| "(none)".to_owned(), |c| c.short().to_owned())
}

fn task_line(t: &Task) -> String {
    let mut s = format!(
        "{:<8} {} #{} replica {} on {}",
        t.action.as_str(),
        t.app,
        t.release,
        t.slot,
        t.node
    );
    match t.waits_for {
        Some(NodeState::Pending) => s.push_str(" (waits: node not joined yet)"),
        Some(NodeState::Offline) => s.push_str(" (waits: node offline)"),
        _ => {}
    }
    s
}

fn task_summary(plan: &Plan) -> String {
    let parts: Vec<String> = plan
        .task_counts()
        .iter()
        .map(|(a, n)| format!("{n} {}", a.as_str()))
        .collect();
    parts.join(", ")
}

/// Bytes for people: whole units when exact, else one decimal (`3.5GiB`).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (u, m) in UNITS {
        if b >= m {
            return if b.is_multiple_of(m) {
                format!("{}{u}", b / m)
            } else {
                let tenths = (u128::from(b) * 10 + u128::from(m) / 2) / u128::from(m);
                format!("{}.{}{u}", tenths / 10, tenths % 10)
            };
        }
    }
    format!("{b}B")
}

fn state_label(n: &NodeHeadroom) -> String {
    let base = n.state.as_str();
    match (n.condition, &n.after) {
        (_, None) => format!("{base}, removed"),
        (None, _) => base.to_owned(),
        (Some(c), _) => match c {
            Condition::Draining => format!("{base}, draining"),
            Condition::Unusable => format!("{base}, unusable"),
            _ => base.to_owned(),
        },
    }
}

/// `before → after` of one column of the headroom table.
fn span_cell(
    before: Option<&Usage>,
    after: Option<&Usage>,
    f: impl Fn(&Usage) -> String,
) -> String {
    match (before, after) {
        (Some(b), Some(a)) => {
            let (x, y) = (f(b), f(a));
            if x == y { x } else { format!("{x} → {y}") }
        }
        (None, Some(a)) => format!("+ {}", f(a)),
        (Some(b), None) => format!("{} → -", f(b)),
        (None, None) => String::new(),
    }
}

fn headroom_rows(plan: &Plan) -> Vec<[String; 6]> {
    plan.nodes
        .iter()
        .map(|n| {
            let (b, a) = (n.before.as_ref(), n.after.as_ref());
            let free = |u: &Usage| u.free();
            [
                n.node.to_string(),
                state_label(n),
                span_cell(b, a, |u| format!("{}/{}", free(u).cpu, u.capacity.cpu)),
                span_cell(b, a, |u| {
                    format!(
                        "{}/{}",
                        human_bytes(free(u).memory.0),
                        human_bytes(u.capacity.memory.0)
                    )
                }),
                span_cell(b, a, |u| {
                    format!(
                        "{}/{}",
                        human_bytes(free(u).disk.0),
                        human_bytes(u.capacity.disk.0)
                    )
                }),
                span_cell(b, a, |u| u.replicas.to_string()),
            ]
        })
        .collect()
}

const HEADROOM_HEAD: [&str; 6] = [
    "NODE",
    "STATE",
    "CPU FREE",
    "MEMORY FREE",
    "DISK FREE",
    "REPLICAS",
];

fn signed(d: Decimal) -> String {
    let p = Price::new(d.abs())
        .map(|p| p.to_string())
        .unwrap_or_else(|_| d.abs().to_string());
    if d.is_sign_negative() && !d.is_zero() {
        format!("-{p}")
    } else {
        format!("+{p}")
    }
}

fn cost_line(plan: &Plan) -> String {
    let c = &plan.cost;
    if c.before == c.after {
        format!("{} {} (unchanged)", c.after, c.currency)
    } else {
        format!(
            "{} {cur} → {} {cur} ({} {cur})",
            c.before,
            c.after,
            signed(c.delta()),
            cur = c.currency
        )
    }
}

fn header(plan: &Plan) -> String {
    let commits = if plan.target_commit == plan.applied_commit {
        format!("config {}", commit_short(&plan.target_commit))
    } else {
        format!(
            "config {} → {}",
            commit_short(&plan.applied_commit),
            commit_short(&plan.target_commit)
        )
    };
    format!(
        "generation {} (from {}), {commits}",
        plan.generation, plan.based_on
    )
}

/// The plan for a terminal. With `color`, markers and headings carry ANSI colours.
pub fn text(plan: &Plan, color: bool) -> String {
    let st = Style { color };
    let mut o = String::new();
    let _ = writeln!(o, "{}", st.bold(&format!("Cairn plan: {}", header(plan))));
    if plan.is_empty() {
        let _ = writeln!(o, "\nNo changes: the applied state is up to date.");
    }
    if !plan.changes.is_empty() {
        let _ = writeln!(o, "\n{}", st.bold("Resources:"));
        for c in &plan.changes {
            let head = format!("{} {} {}", marker(c.action), c.kind.as_str(), c.name);
            let painted = match c.action {
                Action::Create => st.add(&head),
                Action::Update => st.change(&head),
                Action::Delete => st.del(&head),
            };
            let origin = c
                .origin
                .as_ref()
                .map(|o| st.dim(&format!("  ({}:{})", clean(&o.path), o.line)))
                .unwrap_or_default();
            let _ = writeln!(o, "  {painted}{origin}");
            for f in &c.fields {
                let (m, line) = field_line(f);
                let line = format!("{m} {line}");
                let line = match m {
                    "+" => st.add(&line),
                    "-" => st.del(&line),
                    _ => st.change(&line),
                };
                let _ = writeln!(o, "      {line}");
            }
        }
    }
    if !plan.releases.is_empty() {
        let _ = writeln!(o, "\n{}", st.bold("Releases:"));
        for r in &plan.releases {
            let mut why = Vec::new();
            match (&r.previous, &r.source_was) {
                (None, _) => why.push("first release".to_owned()),
                (Some(_), Some(was)) => why.push(format!(
                    "source {} → {}",
                    was.short(),
                    r.source_commit.short()
                )),
                _ => {}
            }
            if r.config_changed {
                why.push("config changed".to_owned());
            }
            let line = format!(
                "+ {} #{}  source {}",
                r.app,
                r.number,
                r.source_commit.short()
            );
            let _ = writeln!(o, "  {}  ({})", st.add(&line), why.join(", "));
        }
    }
    if !plan.pins.is_empty() {
        let _ = writeln!(o, "\n{}", st.bold("Pinned by rollback:"));
        for p in &plan.pins {
            if p.lifted {
                let _ = writeln!(
                    o,
                    "  ~ {} was pinned to release #{}: its manifest changed, so the pin is lifted",
                    p.app, p.release
                );
                continue;
            }
            let note = if p.holding_back {
                "; a newer source or config waits until it is unpinned"
            } else {
                ""
            };
            let _ = writeln!(o, "  = {} stays on release #{}{note}", p.app, p.release);
        }
    }
    if !plan.placement_changes.is_empty() {
        let _ = writeln!(o, "\n{}", st.bold("Placement:"));
        for p in &plan.placement_changes {
            let why = p.reason.describe();
            let line = match (&p.from, &p.to) {
                (None, Some(to)) => st.add(&format!("+ {} replica {} on {to}", p.app, p.slot)),
                (Some(from), Some(to)) => {
                    st.change(&format!("~ {} replica {}: {from} → {to}", p.app, p.slot))
                }
                (Some(from), None) => st.del(&format!("- {} replica {} on {from}", p.app, p.slot)),
                (None, None) => format!("  {} replica {}", p.app, p.slot),
            };
            let _ = writeln!(o, "  {line} ({why})");
        }
    }
    if plan.ingress.changes() {
        let _ = writeln!(o, "\n{}", st.bold("Ingress:"));
        let ing = &plan.ingress;
        let line = match (ing.nodes_before.is_empty(), ing.nodes.is_empty()) {
            _ if ing.nodes == ing.nodes_before => None,
            (true, _) => Some(st.add(&format!("+ ingress nodes: {}", names(&ing.nodes)))),
            (false, true) => Some(st.del(&format!(
                "- ingress nodes: {} (none left)",
                names(&ing.nodes_before)
            ))),
            (false, false) => Some(st.change(&format!(
                "~ ingress nodes: {} → {}",
                names(&ing.nodes_before),
                names(&ing.nodes)
            ))),
        };
        if let Some(line) = line {
            let _ = writeln!(o, "  {line} (each serves every app)");
        }
        for h in &ing.new_hosts {
            let line = st.add(&format!("+ app {} answers {}", h.app, h.hosts.join(", ")));
            let _ = writeln!(o, "  {line}: {}", served_by(&ing.nodes));
        }
    }
    if !plan.ingress.certificates.is_empty() {
        let _ = writeln!(o, "\n{}", st.bold("Certificates:"));
        for c in &plan.ingress.certificates {
            let what = clean(&https_state(&c.https));
            let what = if c.https.needs_attention() {
                st.change(&what)
            } else {
                what
            };
            let _ = writeln!(o, "  {} ({}): {what}", c.names.join(", "), c.app);
        }
    }
    if !plan.tasks.is_empty() {
        let _ = writeln!(
            o,
            "\n{}",
            st.bold(&format!("Tasks ({}):", task_summary(plan)))
        );
        for t in &plan.tasks {
            let _ = writeln!(o, "  {}", task_line(t));
        }
    }
    if !plan.databases.is_empty() {
        let _ = writeln!(o, "\n{}", st.bold("Databases:"));
        for r in database_rows(plan) {
            let change = match plan.databases.iter().find(|d| d.name.as_str() == r[0]) {
                Some(d) if matches!(d.change, crate::DatabaseChange::Keep) => r[3].clone(),
                Some(d) if matches!(d.change, crate::DatabaseChange::Create) => st.add(&r[3]),
                _ => st.change(&r[3]),
            };
            let _ = writeln!(
                o,
                "  {} ({}) on {}: {change}; disk {}; {}/month; backups {}; last good backup {}",
                r[0], r[1], r[2], r[4], r[5], r[6], r[7]
            );
        }
    }
    if !plan.warnings.is_empty() {
        let _ = writeln!(o, "\n{}", st.bold("Warnings:"));
        for w in &plan.warnings {
            let _ = writeln!(o, "  {} {}", st.change("!"), clean(&w.message));
        }
    }
    if !plan.nodes.is_empty() && !plan.is_empty() {
        let _ = writeln!(o, "\n{}", st.bold("Nodes (free/capacity):"));
        let rows = headroom_rows(plan);
        let mut widths = HEADROOM_HEAD.map(str::len);
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: [&str; 6]| {
            let mut s = String::from(" ");
            for (c, w) in cells.iter().zip(widths) {
                let _ = write!(
                    s,
                    " {c}{}",
                    " ".repeat(w.saturating_sub(c.chars().count()) + 1)
                );
            }
            s.trim_end().to_owned()
        };
        let _ = writeln!(o, "{}", st.dim(&line(HEADROOM_HEAD)));
        for r in &rows {
            let _ = writeln!(
                o,
                "{}",
                line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]].map(|s| s.as_str()))
            );
        }
    }
    if !plan.is_empty() {
        let _ = writeln!(o, "\nMonthly cost: {}", cost_line(plan));
    }
    if !plan.secrets_verified {
        let _ = writeln!(o, "\n{}", st.change("This plan compared secrets without the control plane's identity; it cannot be applied."));
    }
    let _ = writeln!(o, "\n{}", st.bold(&plan.summary()));
    let extra = work_line(plan);
    if !extra.is_empty() {
        let _ = writeln!(o, "{extra}");
    }
    o
}

/// Node names, comma-separated.
fn names(nodes: &[cairn_schema::Name]) -> String {
    nodes
        .iter()
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// How an app's hosts are served over HTTPS, in words: for an automatic certificate its state, and why it
/// waits.
fn https_state(h: &crate::Https) -> String {
    use crate::observed::CertState;
    let day = |t: &Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.format("%Y-%m-%d").to_string())
            .unwrap_or_else(|| "?".to_owned())
    };
    let why = |e: &Option<String>| e.clone().unwrap_or_else(|| "no reason recorded".to_owned());
    match h {
        crate::Https::Off => "HTTP only (tls = \"off\")".to_owned(),
        crate::Https::Own => "its own certificate from the repository".to_owned(),
        crate::Https::Auto {
            state,
            not_after,
            last_error,
        } => match state {
            None => "certificate ordered once applied, after a self-probe finds every name reaching an ingress node".to_owned(),
            Some(CertState::Pending) => "certificate pending: ordered soon".to_owned(),
            Some(CertState::Ordering) => "certificate being ordered".to_owned(),
            Some(CertState::Issued) => format!("certificate issued, expires {}", day(not_after)),
            Some(CertState::Renewing) => format!(
                "certificate renewing (the current one expires {})",
                day(not_after)
            ),
            Some(CertState::WaitingDns) => format!(
                "waiting for DNS, nothing asked of the CA: {}",
                why(last_error)
            ),
            Some(CertState::Failed) => {
                format!("certificate failed, retried with backoff: {}", why(last_error))
            }
        },
    }
}

/// Which nodes serve an app's hosts.
fn served_by(ingress: &[cairn_schema::Name]) -> String {
    if ingress.is_empty() {
        "no ingress node serves every app (see the warnings)".to_owned()
    } else {
        format!("served by ingress nodes {}", names(ingress))
    }
}

/// `1 new release, 4 tasks (3 deploy, 1 remove).`, or empty when there is neither.
fn work_line(plan: &Plan) -> String {
    let mut parts = Vec::new();
    match plan.releases.len() {
        0 => {}
        1 => parts.push("1 new release".to_owned()),
        n => parts.push(format!("{n} new releases")),
    }
    match plan.tasks.len() {
        0 => {}
        n => parts.push(format!(
            "{n} task{} ({})",
            if n == 1 { "" } else { "s" },
            task_summary(plan)
        )),
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{}.", parts.join(", "))
    }
}

/// Options for the pull-request comment.
#[derive(Debug, Clone)]
pub struct MarkdownOptions {
    /// Links each resource to its declaration: `{blob_url}{path}#L{line}`, e.g.
    /// `https://github.com/acme/config/blob/<sha>/`.
    pub blob_url: Option<String>,
    /// At most this many lines of field differences; the rest is counted, not shown. GitHub refuses
    /// comments over 65,536 characters, and the defaults keep a large plan well under that.
    pub max_diff_lines: usize,
    /// At most this many rows per table (replicas, nodes) and resource links.
    pub max_rows: usize,
}

impl Default for MarkdownOptions {
    fn default() -> Self {
        MarkdownOptions {
            blob_url: None,
            max_diff_lines: 300,
            max_rows: 150,
        }
    }
}

/// `… and N more <what>` when `total` exceeds what was shown.
fn more(shown: usize, total: usize, what: &str) -> Option<String> {
    (total > shown).then(|| {
        format!(
            "*… and {} more {what}; run `cairn plan` for the whole plan.*",
            total - shown
        )
    })
}

/// Escapes text for Markdown prose and table cells (manifest values can hold anything).
fn md(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '|' | '#' | '~' => {
                o.push('\\');
                o.push(c);
            }
            '@' => o.push_str("&#64;"),
            c if c.is_control() => o.push(' '),
            _ => o.push(c),
        }
    }
    o
}

/// A code fence longer than any backtick run in `body`, so the body cannot close it.
fn fence(body: &str) -> String {
    let mut longest = 0;
    let mut run = 0;
    for c in body.chars() {
        if c == '`' {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    "`".repeat((longest + 1).max(3))
}

fn md_table(o: &mut String, head: &[&str], rows: &[Vec<String>], max: usize, what: &str) {
    let _ = writeln!(o, "| {} |", head.join(" | "));
    let _ = writeln!(o, "|{}", head.iter().map(|_| "---|").collect::<String>());
    for r in rows.iter().take(max) {
        let _ = writeln!(o, "| {} |", r.join(" | "));
    }
    if let Some(m) = more(max, rows.len(), what) {
        let _ = writeln!(o, "\n{m}");
    }
}

/// The plan as a pull-request comment.
pub fn markdown(plan: &Plan, opts: &MarkdownOptions) -> String {
    let mut o = String::new();
    let target = commit_short(&plan.target_commit);
    let _ = writeln!(o, "### Cairn plan for `{}`\n", md(&target).replace('`', ""));
    let work = work_line(plan);
    if plan.is_empty() {
        let _ = writeln!(o, "**No changes.** The applied state is up to date.\n");
    } else {
        let _ = writeln!(o, "**{}** {}\n", plan.summary(), md(&work));
    }
    if !plan.secrets_verified {
        let _ = writeln!(
            o,
            "> [!NOTE]\n> Secrets were compared without the control plane's identity (a fork's pull request): a secret shown as *changed (unverified)* may only have been re-encrypted.\n"
        );
    }
    if !plan.warnings.is_empty() {
        let _ = writeln!(o, "> [!WARNING]");
        for w in plan.warnings.iter().take(opts.max_rows) {
            let _ = writeln!(o, "> - {}", md(&w.message));
        }
        if let Some(m) = more(opts.max_rows, plan.warnings.len(), "warnings") {
            let _ = writeln!(o, "> - {m}");
        }
        o.push('\n');
    }

    if !plan.changes.is_empty() {
        let _ = writeln!(o, "#### Changes\n");
        let mut body = String::new();
        for c in &plan.changes {
            // GitHub colours `+` green, `-` red and `!` orange in a diff block.
            let m = match c.action {
                Action::Create => "+",
                Action::Update => "!",
                Action::Delete => "-",
            };
            let _ = writeln!(body, "{m} {} {}", c.kind.as_str(), c.name);
            for f in &c.fields {
                let (fm, line) = field_line(f);
                let fm = if fm == "~" { "!" } else { fm };
                let _ = writeln!(body, "{fm}     {}", line.replace(['\n', '\r'], " "));
            }
        }
        let total = body.lines().count();
        if total > opts.max_diff_lines {
            body = body
                .lines()
                .take(opts.max_diff_lines)
                .fold(String::new(), |mut b, l| {
                    b.push_str(l);
                    b.push('\n');
                    b
                });
        }
        let fe = fence(&body);
        let _ = writeln!(o, "{fe}diff\n{body}{fe}\n");
        if let Some(m) = more(opts.max_diff_lines, total, "lines") {
            let _ = writeln!(o, "{m}\n");
        }
        let declared: Vec<String> = plan
            .changes
            .iter()
            .filter_map(|c| {
                let org = c.origin.as_ref()?;
                let at = format!("{}:{}", md(&org.path), org.line);
                let link = match &opts.blob_url {
                    Some(base) => format!(
                        "[{at}]({base}{}#L{})",
                        org.path.replace(' ', "%20").replace(')', "%29"),
                        org.line
                    ),
                    None => format!("`{}:{}`", org.path.replace('`', ""), org.line),
                };
                Some(format!("`{} {}` {link}", c.kind.as_str(), c.name))
            })
            .collect();
        if !declared.is_empty() {
            let shown = &declared[..declared.len().min(opts.max_rows)];
            let rest = declared.len() - shown.len();
            let tail = if rest > 0 {
                format!(" · and {rest} more")
            } else {
                String::new()
            };
            let _ = writeln!(o, "<sub>Declared in: {}{tail}</sub>\n", shown.join(" · "));
        }
    }

    if !plan.releases.is_empty() {
        let _ = writeln!(o, "#### Releases\n");
        let rows: Vec<Vec<String>> = plan
            .releases
            .iter()
            .map(|r| {
                let source = match &r.source_was {
                    Some(was) => format!(
                        "`{}` → `{}`",
                        md_code(was.short()),
                        md_code(r.source_commit.short())
                    ),
                    None => format!("`{}`", md_code(r.source_commit.short())),
                };
                let why = match (r.previous, r.config_changed, &r.source_was) {
                    (None, _, _) => "first release".to_owned(),
                    (Some(_), true, Some(_)) => "new source and config".to_owned(),
                    (Some(_), true, None) => "config changed".to_owned(),
                    _ => "new source".to_owned(),
                };
                vec![r.app.to_string(), format!("#{}", r.number), source, why]
            })
            .collect();
        md_table(
            &mut o,
            &["App", "Release", "Source", "Why"],
            &rows,
            opts.max_rows,
            "releases",
        );
        o.push('\n');
    }
    if !plan.pins.is_empty() {
        for p in &plan.pins {
            if p.lifted {
                let _ = writeln!(
                    o,
                    "- `{}` was pinned to release #{} by a rollback; its manifest changed, so this \
                     plan lifts the pin.",
                    p.app, p.release
                );
                continue;
            }
            let note = if p.holding_back {
                " A newer source or config waits until it is unpinned."
            } else {
                ""
            };
            let _ = writeln!(
                o,
                "- `{}` is pinned to release #{} by a rollback.{note}",
                p.app, p.release
            );
        }
        o.push('\n');
    }

    if plan.ingress.changes() {
        let ing = &plan.ingress;
        let code = |nodes: &[cairn_schema::Name]| {
            if nodes.is_empty() {
                "none".to_owned()
            } else {
                nodes
                    .iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let _ = writeln!(o, "#### Ingress\n");
        if ing.nodes != ing.nodes_before {
            let _ = writeln!(
                o,
                "- Ingress nodes (each serves every app; DNS points at them): {} → **{}**",
                code(&ing.nodes_before),
                code(&ing.nodes)
            );
        }
        for h in ing.new_hosts.iter().take(opts.max_rows) {
            let hosts: Vec<String> = h
                .hosts
                .iter()
                .map(|x| format!("`{}`", md_code(x)))
                .collect();
            let by = if ing.nodes.is_empty() {
                "no ingress node serves every app (see the warnings)".to_owned()
            } else {
                format!("served by ingress nodes {}", code(&ing.nodes))
            };
            let _ = writeln!(o, "- `{}` answers {}: {by}", h.app, hosts.join(", "));
        }
        if let Some(m) = more(opts.max_rows, ing.new_hosts.len(), "apps") {
            let _ = writeln!(o, "- {m}");
        }
        o.push('\n');
    }

    let certs = &plan.ingress.certificates;
    if !certs.is_empty() {
        let _ = writeln!(o, "#### Certificates\n");
        for c in certs.iter().take(opts.max_rows) {
            let names: Vec<String> = c
                .names
                .iter()
                .map(|x| format!("`{}`", md_code(x)))
                .collect();
            let mark = if c.https.needs_attention() {
                "⚠️ "
            } else {
                ""
            };
            let _ = writeln!(
                o,
                "- {mark}`{}` ({}): {}",
                c.app,
                names.join(", "),
                md(&https_state(&c.https))
            );
        }
        if let Some(m) = more(opts.max_rows, certs.len(), "apps") {
            let _ = writeln!(o, "- {m}");
        }
        o.push('\n');
    }

    if !plan.databases.is_empty() {
        let _ = writeln!(o, "#### Databases\n");
        let rows: Vec<Vec<String>> = database_rows(plan)
            .into_iter()
            .map(|r| r.into_iter().map(|c| md(&c)).collect())
            .collect();
        md_table(
            &mut o,
            &[
                "Database",
                "Engine",
                "Node",
                "Change",
                "Disk (node free)",
                "Monthly",
                "Backups",
                "Last good backup",
            ],
            &rows,
            opts.max_rows,
            "databases",
        );
        o.push('\n');
    }

    let replicas = replica_rows(plan);
    if !replicas.is_empty() {
        let _ = writeln!(o, "#### Where replicas run\n");
        md_table(
            &mut o,
            &["App", "Replica", "Node", "Release", "Change"],
            &replicas,
            opts.max_rows,
            "replicas",
        );
        o.push('\n');
    }

    if !plan.nodes.is_empty() && !plan.is_empty() {
        let _ = writeln!(o, "#### Node headroom (free / capacity)\n");
        let rows: Vec<Vec<String>> = headroom_rows(plan)
            .into_iter()
            .map(|r| r.into_iter().collect())
            .collect();
        md_table(
            &mut o,
            &["Node", "State", "CPU", "Memory", "Disk", "Replicas"],
            &rows,
            opts.max_rows,
            "nodes",
        );
        o.push('\n');
    }

    if !plan.is_empty() {
        let c = &plan.cost;
        let line = if c.before == c.after {
            format!("**{} {}** (unchanged)", c.after, c.currency)
        } else {
            format!(
                "{} {cur} → **{} {cur}** ({} {cur})",
                c.before,
                c.after,
                signed(c.delta()),
                cur = c.currency
            )
        };
        let _ = writeln!(o, "#### Monthly cost\n\n{line}\n");
    }
    let _ = writeln!(
        o,
        "<sub>Cairn · {} · seed {} · planned at {}</sub>",
        md(&header(plan)),
        plan.seed,
        plan.planned_at.format("%Y-%m-%d %H:%M:%S UTC")
    );
    o
}

/// One row per database: name, engine, node, change, disk, monthly price, backups, last good backup.
fn database_rows(plan: &Plan) -> Vec<[String; 8]> {
    use crate::DatabaseChange;
    plan.databases
        .iter()
        .map(|d| {
            let node = match (&d.node, d.port) {
                (Some(n), Some(p)) => format!("{n}:{p}"),
                _ => "none".to_owned(),
            };
            let change = match &d.change {
                DatabaseChange::Create => "create (empty)".to_owned(),
                DatabaseChange::Keep => "stays".to_owned(),
                DatabaseChange::Move { from } => {
                    format!(
                        "MOVE from {from}: starts empty, needs `cairn db restore {} --latest`",
                        d.name
                    )
                }
                DatabaseChange::Unavailable { why } => format!("UNAVAILABLE ({why})"),
                DatabaseChange::Unplaced { why } => format!("UNPLACED ({why})"),
                DatabaseChange::Delete => "stop (data kept until dropped)".to_owned(),
                DatabaseChange::Upgrade { from } => format!(
                    "upgrade {} {from} -> {}: dump and restore into a new instance beside the old one",
                    d.engine, d.version
                ),
                DatabaseChange::Refused { why } => format!("REFUSED ({why})"),
            };
            let disk = match d.node_disk_free {
                Some(free) => format!("{} ({} free)", human_bytes(d.disk.0), human_bytes(free.0)),
                None => human_bytes(d.disk.0),
            };
            let backups = match (&d.backup_schedule, &d.backup_to) {
                (Some(s), Some(t)) => format!("{s} to {t}"),
                _ => "NONE".to_owned(),
            };
            let last = match d.last_good_backup {
                Some(t) => {
                    let age = plan.planned_at.signed_duration_since(t);
                    let age = if age.num_hours() >= 48 {
                        format!("{} days ago", age.num_days())
                    } else if age.num_minutes() >= 120 {
                        format!("{} hours ago", age.num_hours())
                    } else {
                        format!("{} min ago", age.num_minutes().max(0))
                    };
                    format!("{} ({age})", t.format("%Y-%m-%d %H:%M UTC"))
                }
                None => "none yet".to_owned(),
            };
            [
                d.name.to_string(),
                format!("{} {}", d.engine, d.version),
                node,
                change,
                disk,
                d.monthly.to_string(),
                backups,
                last,
            ]
        })
        .collect()
}

fn md_code(s: &str) -> String {
    s.replace('`', "'")
}

/// One row per replica slot of every app the plan touches: where it runs after the plan and what changes.
fn replica_rows(plan: &Plan) -> Vec<Vec<String>> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut touched: BTreeSet<&cairn_schema::Name> = BTreeSet::new();
    touched.extend(
        plan.changes
            .iter()
            .filter(|c| c.kind == cairn_schema::Kind::App)
            .map(|c| &c.name),
    );
    touched.extend(plan.releases.iter().map(|r| &r.app));
    touched.extend(plan.tasks.iter().map(|t| &t.app));
    touched.extend(plan.placement_changes.iter().map(|p| &p.app));
    touched.extend(plan.warnings.iter().filter_map(|w| w.app.as_ref()));

    // (app, slot) → cells
    let mut rows: BTreeMap<(&cairn_schema::Name, u32), Vec<String>> = BTreeMap::new();
    for p in plan.placements.iter().filter(|p| touched.contains(&p.app)) {
        let mut what: Vec<String> = plan
            .tasks
            .iter()
            .filter(|t| t.app == p.app && t.slot == p.slot && t.node == p.node)
            .map(|t| t.action.as_str().to_owned())
            .collect();
        if let Some(pc) = plan
            .placement_changes
            .iter()
            .find(|c| c.app == p.app && c.slot == p.slot && c.to.is_some())
        {
            match (&pc.from, pc.reason) {
                (Some(from), PlacementReason::Moved { why }) => {
                    what.push(format!("moved from {from} ({why})"))
                }
                (Some(from), _) => what.push(format!("moved from {from}")),
                (None, _) => what.push("new".to_owned()),
            }
        }
        if p.state == ReplicaState::Stopped && !what.iter().any(|w| w == "stop") {
            what.push("stopped".to_owned());
        }
        if what.is_empty() {
            what.push("unchanged".to_owned());
        }
        let node = match plan
            .nodes
            .iter()
            .find(|n| n.node == p.node)
            .map(|n| n.state)
        {
            Some(NodeState::Pending) => format!("{} (not joined yet)", p.node),
            Some(NodeState::Offline) => format!("{} (offline)", p.node),
            _ => p.node.to_string(),
        };
        rows.insert(
            (&p.app, p.slot),
            vec![
                p.app.to_string(),
                p.slot.to_string(),
                node,
                format!("#{}", p.release),
                what.join(", "),
            ],
        );
    }
    for pc in plan.placement_changes.iter().filter(|c| c.to.is_none()) {
        rows.entry((&pc.app, pc.slot)).or_insert_with(|| {
            let from = pc.from.as_ref().map(|f| f.to_string()).unwrap_or_default();
            vec![
                pc.app.to_string(),
                pc.slot.to_string(),
                "—".to_owned(),
                "—".to_owned(),
                format!("removed from {from} ({})", pc.reason.describe()),
            ]
        });
    }
    for w in plan
        .warnings
        .iter()
        .filter(|w| w.kind == super::WarningKind::Unplaced)
    {
        if let (Some(app), Some(slot)) = (&w.app, w.slot) {
            rows.entry((app, slot)).or_insert_with(|| {
                vec![
                    app.to_string(),
                    slot.to_string(),
                    "—".to_owned(),
                    "—".to_owned(),
                    "**unplaced**".to_owned(),
                ]
            });
        }
    }
    rows.into_values().collect()
}
