//! What the control plane counts and times, served at `/metrics` by `cairn serve` in the OpenMetrics text
//! format (which Prometheus scrapes natively).
//!
//! Events are recorded where they happen, into one process-wide [`Metrics`] ([`global`]):
//! reconciles and the plans they applied (`controller.rs`), leases (`queue.rs`), webhook deliveries
//! (`cairn-webhook`'s receiver and worker), and releases going live (the agent API). What is state
//! rather than an event (the queue's depth, nodes by state) is read from Postgres when scraped: two
//! small queries, bounded by [`SCRAPE_TIMEOUT`]; when they fail, those gauges are left out and
//! `cairn_metrics_database_up` is 0.
//!
//! | series | type | labels |
//! |---|---|---|
//! | `cairn_reconcile_duration_seconds` | histogram | `result`: applied, noop, unchanged (nothing new: not planned), invalid, behind, error |
//! | `cairn_reconciles_total` | counter | `result` |
//! | `cairn_plan_changes_total` | counter | `kind` (plan, runtime, node, app), `action` (create, update, delete) |
//! | `cairn_plan_tasks_total` | counter | `kind` (deploy, start, restart, stop, remove) |
//! | `cairn_plan_placement_changes_total` | counter | |
//! | `cairn_tasks` | gauge | `status` (queued, leased, failed), `kind` |
//! | `cairn_task_lease_latency_seconds` | histogram | `kind`: from when a task could run (enqueued, or its backoff or expired lease ended) to its lease |
//! | `cairn_webhook_deliveries_total` | counter | `outcome`: received, duplicate, rejected, unrecorded (at the endpoint); handled, ignored, retry, failed (by the worker) |
//! | `cairn_nodes` | gauge | `state`: pending, online, offline |
//! | `cairn_push_to_running_seconds` | histogram | `stage`: the agents' deploy stages (fetch, build, pull, push, start, healthy, switch, drain; the slowest replica's), and `release` (from the release's creation to its last replica running) |
//! | `cairn_certificates` | gauge | `state`: pending, waiting_dns, ordering, issued, renewing, failed (declared name sets, read from Postgres when scraped) |
//! | `cairn_certificate_soonest_expiry_days` | gauge | | (the soonest expiry among declared certificates, in days; absent without one) |
//! | `cairn_usage_month_to_date_minor` | gauge | | (metered usage of the current UTC month in minor units of the currency, as last rolled up; read from Postgres when scraped) |
//! | `cairn_metrics_database_up` | gauge | |
//! | `cairn_database_primary` | gauge | `host`: each PostgreSQL `host:port` `cairn serve` was given (operator configuration, never a password); 1 for the one in use |
//! | `cairn_database_failovers_total` | counter | | (moves to another primary) |
//!
//! What it must not do: put anything unbounded or private in a label (an app or node name, a commit, an
//! error, a secret): every label value comes from a fixed set, and a value from outside it (a stage an
//! agent made up) is dropped. Nor may a scrape wait on the database longer than [`SCRAPE_TIMEOUT`].

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use sqlx::PgPool;
use tokio::sync::OnceCell;

use crate::queue::{TaskKind, TaskStatus};
use crate::store::StoreError;
use crate::store::certs::CertState;
use cairn_plan::observed::NodeState;
use cairn_plan::{Action, Plan};
use cairn_proto::DeployStage;
use cairn_schema::error::chain as error_chain;
use std::sync::atomic::AtomicU64;

/// The longest a scrape waits for its Postgres reads.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The deploy stages an agent reports the time of ([`cairn_proto::DeployStage::TIMED`]), and `release`.
pub const STAGES: [&str; 9] = {
    let t = DeployStage::TIMED;
    [
        t[0].as_str(),
        t[1].as_str(),
        t[2].as_str(),
        t[3].as_str(),
        t[4].as_str(),
        t[5].as_str(),
        t[6].as_str(),
        t[7].as_str(),
        "release",
    ]
};

/// How a reconcile ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconcileResult {
    /// A non-empty plan was applied.
    Applied,
    /// Nothing to change.
    Noop,
    /// Nothing the planner reads changed since the last empty plan: not planned.
    Unchanged,
    /// The commit is invalid.
    Invalid,
    /// The source is behind the applied commit.
    Behind,
    /// The source could not be read, or the apply failed.
    Error,
}

impl ReconcileResult {
    fn as_str(self) -> &'static str {
        match self {
            ReconcileResult::Applied => "applied",
            ReconcileResult::Noop => "noop",
            ReconcileResult::Unchanged => "unchanged",
            ReconcileResult::Invalid => "invalid",
            ReconcileResult::Behind => "behind",
            ReconcileResult::Error => "error",
        }
    }
}

/// What became of a webhook delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Recorded by the endpoint (pings included).
    Received,
    /// A redelivery of one already recorded.
    Duplicate,
    /// Refused by the endpoint: bad signature, too large, malformed.
    Rejected,
    /// The endpoint could not record it (the database); GitHub shows the failure.
    Unrecorded,
    /// Processed: it changed something or woke someone.
    Handled,
    /// Processed: it needed nothing.
    Ignored,
    /// Its handler failed; it will be tried again.
    Retry,
    /// Given up on.
    Failed,
}

impl DeliveryOutcome {
    fn as_str(self) -> &'static str {
        match self {
            DeliveryOutcome::Received => "received",
            DeliveryOutcome::Duplicate => "duplicate",
            DeliveryOutcome::Rejected => "rejected",
            DeliveryOutcome::Unrecorded => "unrecorded",
            DeliveryOutcome::Handled => "handled",
            DeliveryOutcome::Ignored => "ignored",
            DeliveryOutcome::Retry => "retry",
            DeliveryOutcome::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChangeLabels {
    kind: &'static str,
    action: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    status: &'static str,
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// The control plane's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconcile_duration: Histograms<ResultLabel>,
    reconciles: Family<ResultLabel, Counter>,
    plan_changes: Family<ChangeLabels, Counter>,
    plan_tasks: Family<KindLabel, Counter>,
    plan_placement_changes: Counter,
    tasks: Family<TaskLabels, Gauge>,
    lease_latency: Histograms<KindLabel>,
    deliveries: Family<OutcomeLabel, Counter>,
    nodes: Family<StateLabel, Gauge>,
    certificates: Family<StateLabel, Gauge>,
    /// One series without labels, or none when no certificate was issued.
    soonest_expiry: Family<Vec<(String, String)>, Gauge<f64, AtomicU64>>,
    push_to_running: Histograms<StageLabel>,
    usage_month_to_date: Gauge,
    database_up: Gauge,
    /// 1 for the database host in use, 0 for the others (`host:port` as the operator gave them).
    database_primary: Family<Vec<(String, String)>, Gauge>,
    database_failovers: Counter,
    /// One scrape at a time: a scrape clears and refills the gauges it reads from Postgres.
    scraping: tokio::sync::Mutex<()>,
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &GLOBAL
}

fn reconcile_buckets() -> Histogram {
    // 5 ms to 82 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

fn lease_buckets() -> Histogram {
    // 1 ms to 131 s; a task for a node that is offline waits longer (+Inf).
    Histogram::new(exponential_buckets(0.001, 2.0, 18))
}

fn stage_buckets() -> Histogram {
    // 50 ms to 27 min.
    Histogram::new(exponential_buckets(0.05, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh set of metrics, all zero (tests make their own; the process uses [`global`]).
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cairn");
        let m = Metrics {
            registry: Registry::default(),
            reconcile_duration: Family::new_with_constructor(reconcile_buckets),
            reconciles: Family::default(),
            plan_changes: Family::default(),
            plan_tasks: Family::default(),
            plan_placement_changes: Counter::default(),
            tasks: Family::default(),
            lease_latency: Family::new_with_constructor(lease_buckets),
            deliveries: Family::default(),
            nodes: Family::default(),
            certificates: Family::default(),
            soonest_expiry: Family::default(),
            push_to_running: Family::new_with_constructor(stage_buckets),
            usage_month_to_date: Gauge::default(),
            database_up: Gauge::default(),
            database_primary: Family::default(),
            database_failovers: Counter::default(),
            scraping: tokio::sync::Mutex::new(()),
        };
        registry.register_with_unit(
            "reconcile_duration",
            "How long a reconcile took (read, plan, apply), by how it ended",
            Unit::Seconds,
            m.reconcile_duration.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciles by how they ended",
            m.reconciles.clone(),
        );
        registry.register(
            "plan_changes",
            "Resource changes in applied plans, by resource kind and action",
            m.plan_changes.clone(),
        );
        registry.register(
            "plan_tasks",
            "Agent tasks in applied plans, by kind",
            m.plan_tasks.clone(),
        );
        registry.register(
            "plan_placement_changes",
            "Replica slots that appeared, moved or went away in applied plans",
            m.plan_placement_changes.clone(),
        );
        registry.register(
            "tasks",
            "Tasks waiting or in flight, by status and kind (read from Postgres when scraped)",
            m.tasks.clone(),
        );
        registry.register_with_unit(
            "task_lease_latency",
            "From when a task could run (enqueued, or its backoff or expired lease ended) to its lease",
            Unit::Seconds,
            m.lease_latency.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "GitHub webhook deliveries by outcome (at the endpoint, then by the worker)",
            m.deliveries.clone(),
        );
        registry.register(
            "nodes",
            "Declared nodes by state (read from Postgres when scraped)",
            m.nodes.clone(),
        );
        registry.register(
            "certificates",
            "Declared name sets' certificates by state (read from Postgres when scraped)",
            m.certificates.clone(),
        );
        registry.register(
            "certificate_soonest_expiry_days",
            "Days until the soonest expiry among the declared certificates (read from Postgres when scraped)",
            m.soonest_expiry.clone(),
        );
        registry.register_with_unit(
            "push_to_running",
            "Time per stage of the releases that went live: the agents' deploy stages (the slowest \
             replica's) and `release` (from the release's creation to its last replica running)",
            Unit::Seconds,
            m.push_to_running.clone(),
        );
        registry.register(
            "usage_month_to_date_minor",
            "Metered usage of the current UTC month in minor units of the currency, as last rolled up \
             (read from Postgres when scraped)",
            m.usage_month_to_date.clone(),
        );
        registry.register(
            "metrics_database_up",
            "Whether this scrape could read the gauges it takes from Postgres",
            m.database_up.clone(),
        );
        registry.register(
            "database_primary",
            "1 for the PostgreSQL host the control plane writes to, 0 for the other hosts it was given \
             (all 0 while none is writable)",
            m.database_primary.clone(),
        );
        registry.register(
            "database_failovers",
            "Times the control plane moved to another PostgreSQL primary",
            m.database_failovers.clone(),
        );
        m.zero();
        Metrics { registry, ..m }
    }

    /// Creates every series of the fixed label sets at zero: a series that appears only with its first
    /// event is missing from the scrapes before it, so `rate()` and alerts on it start late.
    fn zero(&self) {
        const RESULTS: [ReconcileResult; 6] = [
            ReconcileResult::Applied,
            ReconcileResult::Noop,
            ReconcileResult::Unchanged,
            ReconcileResult::Invalid,
            ReconcileResult::Behind,
            ReconcileResult::Error,
        ];
        for r in RESULTS {
            let l = ResultLabel { result: r.as_str() };
            drop(self.reconcile_duration.get_or_create(&l));
            drop(self.reconciles.get_or_create(&l));
        }
        for kind in cairn_schema::Kind::ALL {
            for action in ["create", "update", "delete"] {
                drop(self.plan_changes.get_or_create(&ChangeLabels {
                    kind: kind.as_str(),
                    action,
                }));
            }
        }
        for kind in TaskKind::ALL {
            let l = KindLabel {
                kind: kind.as_str(),
            };
            drop(self.plan_tasks.get_or_create(&l));
            drop(self.lease_latency.get_or_create(&l));
        }
        for outcome in [
            DeliveryOutcome::Received,
            DeliveryOutcome::Duplicate,
            DeliveryOutcome::Rejected,
            DeliveryOutcome::Unrecorded,
            DeliveryOutcome::Handled,
            DeliveryOutcome::Ignored,
            DeliveryOutcome::Retry,
            DeliveryOutcome::Failed,
        ] {
            drop(self.deliveries.get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            }));
        }
        for stage in STAGES {
            drop(self.push_to_running.get_or_create(&StageLabel { stage }));
        }
    }

    /// The database hosts and which of them is the primary in use (`store::failover`).
    fn database_primary(&self, hosts: &[String], primary: Option<usize>) {
        for (i, host) in hosts.iter().enumerate() {
            self.database_primary
                .get_or_create(&vec![("host".to_owned(), host.clone())])
                .set(i64::from(primary == Some(i)));
        }
    }

    /// The primary and the moves to another as `store::failover` last saw them.
    fn show_failover(&self) {
        let (hosts, failovers) = crate::store::failover::seen();
        if let Some((names, primary)) = hosts {
            self.database_primary(&names, primary);
        }
        let counted = self.database_failovers.get();
        if failovers > counted {
            self.database_failovers.inc_by(failovers - counted);
        }
    }

    /// A reconcile ended.
    pub fn reconciled(&self, result: ReconcileResult, took: Duration) {
        let l = ResultLabel {
            result: result.as_str(),
        };
        self.reconcile_duration
            .get_or_create(&l)
            .observe(took.as_secs_f64());
        self.reconciles.get_or_create(&l).inc();
    }

    /// A non-empty plan was applied.
    pub fn plan_applied(&self, plan: &Plan) {
        for c in &plan.changes {
            let action = match c.action {
                Action::Create => "create",
                Action::Update => "update",
                Action::Delete => "delete",
            };
            self.plan_changes
                .get_or_create(&ChangeLabels {
                    kind: c.kind.as_str(),
                    action,
                })
                .inc();
        }
        for t in &plan.tasks {
            let kind = crate::queue::task_kind(t.action);
            self.plan_tasks
                .get_or_create(&KindLabel {
                    kind: kind.as_str(),
                })
                .inc();
        }
        self.plan_placement_changes
            .inc_by(plan.placement_changes.len() as u64);
    }

    /// An agent leased a task that had been due for `waited`.
    pub fn task_leased(&self, kind: TaskKind, waited: Duration) {
        self.lease_latency
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .observe(waited.as_secs_f64());
    }

    /// A webhook delivery reached `outcome`.
    pub fn webhook_delivery(&self, outcome: DeliveryOutcome) {
        self.deliveries
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// A release went live: `stage_timings` as the release records them (milliseconds by stage) and the
    /// seconds from its creation to now. Stages outside [`STAGES`] are ignored.
    pub fn release_live(&self, stage_timings: &serde_json::Value, release_secs: Option<f64>) {
        let observe = |stage: &str, secs: f64| {
            if let Some(stage) = STAGES.iter().find(|s| **s == stage)
                && secs.is_finite()
                && secs >= 0.0
            {
                self.push_to_running
                    .get_or_create(&StageLabel { stage })
                    .observe(secs);
            }
        };
        if let Some(stages) = stage_timings.as_object() {
            for (stage, ms) in stages {
                if stage != "release"
                    && let Some(ms) = ms.as_f64()
                {
                    observe(stage, ms / 1000.0);
                }
            }
        }
        if let Some(secs) = release_secs {
            observe("release", secs);
        }
    }

    /// The exposition: reads the gauges that come from Postgres (when `pool` is given), then encodes
    /// every series.
    pub async fn render(&self, pool: Option<&PgPool>) -> String {
        let _one = self.scraping.lock().await;
        let read = match pool {
            None => false,
            Some(pool) => match tokio::time::timeout(SCRAPE_TIMEOUT, self.read_state(pool)).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    tracing::warn!(error = %error_chain(&e), "metrics: cannot read the queue and nodes");
                    false
                }
                Err(_) => {
                    tracing::warn!(timeout = ?SCRAPE_TIMEOUT, "metrics: reading the queue and nodes timed out");
                    false
                }
            },
        };
        if !read {
            self.tasks.clear();
            self.nodes.clear();
            self.certificates.clear();
            self.soonest_expiry.clear();
        }
        self.database_up.set(i64::from(read));
        self.show_failover();
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("encoding into a String cannot fail");
        out
    }

    async fn read_state(&self, pool: &PgPool) -> Result<(), StoreError> {
        let tasks = crate::store::metrics::open_tasks(pool).await?;
        let nodes = crate::store::metrics::nodes_by_state(pool).await?;
        let (certs, soonest) = crate::store::certs::summary(pool).await?;
        let usage = crate::store::usage::month_to_date_minor(
            pool,
            crate::store::usage::db_now(pool).await?,
        )
        .await?;
        self.usage_month_to_date.set(usage);
        self.certificates.clear();
        for state in CertState::ALL {
            let n = certs
                .iter()
                .find(|(s, _)| *s == state)
                .map_or(0, |(_, n)| *n);
            self.certificates
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.soonest_expiry.clear();
        if let Some(t) = soonest {
            let days = (t - chrono::Utc::now()).as_seconds_f64() / 86_400.0;
            self.soonest_expiry.get_or_create(&Vec::new()).set(days);
        }
        self.tasks.clear();
        // Every series is present (zero when empty), so a query for one never finds nothing.
        for status in [TaskStatus::Queued, TaskStatus::Leased, TaskStatus::Failed] {
            for kind in TaskKind::ALL {
                self.tasks
                    .get_or_create(&TaskLabels {
                        status: status.as_str(),
                        kind: kind.as_str(),
                    })
                    .set(0);
            }
        }
        for (status, kind, n) in tasks {
            let (Some(status), Some(kind)) = (TaskStatus::parse(&status), TaskKind::parse(&kind))
            else {
                continue;
            };
            self.tasks
                .get_or_create(&TaskLabels {
                    status: status.as_str(),
                    kind: kind.as_str(),
                })
                .set(n);
        }
        self.nodes.clear();
        for state in [NodeState::Pending, NodeState::Online, NodeState::Offline] {
            self.nodes
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(0);
        }
        for (state, n) in nodes {
            let state = [NodeState::Pending, NodeState::Online, NodeState::Offline]
                .into_iter()
                .find(|s| s.as_str() == state);
            if let Some(state) = state {
                self.nodes
                    .get_or_create(&StateLabel {
                        state: state.as_str(),
                    })
                    .set(n);
            }
        }
        Ok(())
    }
}

/// `GET /metrics`, unauthenticated: the series carry counts and timings, never a name, a commit or a
/// secret. The gauges read from Postgres are left out until `pool` is set (the database reachable).
pub fn router(pool: Arc<OnceCell<PgPool>>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(pool)
}

async fn scrape(State(pool): State<Arc<OnceCell<PgPool>>>) -> Response {
    let body = global().render(pool.get()).await;
    (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_show_up_in_the_exposition_with_fixed_labels() {
        let m = Metrics::new();
        m.reconciled(ReconcileResult::Applied, Duration::from_millis(30));
        m.task_leased(TaskKind::Deploy, Duration::from_millis(4));
        m.webhook_delivery(DeliveryOutcome::Received);
        m.release_live(
            &serde_json::json!({"build": 41000, "start": 2100, "made-up": 5, "release": 1}),
            Some(50.0),
        );
        let text = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(m.render(None));
        for line in [
            "cairn_reconciles_total{result=\"applied\"} 1",
            "cairn_reconcile_duration_seconds_count{result=\"applied\"} 1",
            "cairn_task_lease_latency_seconds_count{kind=\"deploy\"} 1",
            "cairn_webhook_deliveries_total{outcome=\"received\"} 1",
            "cairn_push_to_running_seconds_sum{stage=\"build\"} 41.0",
            "cairn_push_to_running_seconds_sum{stage=\"release\"} 50.0",
            "cairn_metrics_database_up 0",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
        assert!(!text.contains("made-up"), "{text}");
    }
}
