//! What applying a plan must leave behind, as data: the executor's contract, and the simulator tests use
//! to check that a second plan after an apply is empty.

use super::planner::Target;
use super::{Plan, PlanInput};
use crate::observed::{Observed, ReleaseRecord};

/// Why a plan cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotApplicable {
    #[error(
        "the plan was made from generation {planned_from}, but the applied state is at generation {current}: plan again"
    )]
    Stale { planned_from: u64, current: u64 },
    #[error(
        "{count} secret(s) could not be verified without the control plane's identity: plan with it to apply"
    )]
    SecretsUnverified { count: usize },
}

/// The observed state after `plan` (made from `input`) is applied: what the executor's transaction must
/// write, so that the store loads exactly this afterwards.
///
/// - an empty plan writes nothing (the generation stays);
/// - otherwise: `generation` becomes `plan.generation`, `applied_commit` the target commit, the applied
///   plans, runtimes, nodes, apps (env via [`crate::observed::AppliedApp::from_desired`]), currency and
///   base domain become the desired ones, placements become `plan.placements`, each new release is recorded as its
///   app's latest, node status and rollback pins of removed nodes and apps are deleted, and so are the pins the plan
///   lifts; source heads and
///   restart requests are left alone.
pub fn next_observed(input: &PlanInput<'_>, plan: &Plan) -> Result<Observed, NotApplicable> {
    let obs = input.observed;
    if plan.based_on != obs.generation {
        return Err(NotApplicable::Stale {
            planned_from: plan.based_on,
            current: obs.generation,
        });
    }
    let target = Target::new(input, &super::planner::Scope::all(obs));
    if !target.unverified.is_empty() {
        return Err(NotApplicable::SecretsUnverified {
            count: target.unverified.len(),
        });
    }
    if plan.is_empty() {
        return Ok(obs.clone());
    }
    let mut next = obs.clone();
    next.generation = plan.generation;
    next.applied_commit = target.commit.clone();
    next.currency = Some(target.currency.clone());
    next.base_domain = target.base_domain.clone();
    next.plans = target.plans.clone();
    next.runtimes = target.runtimes.clone();
    next.nodes = target.nodes.clone();
    next.node_status.retain(|n, _| target.nodes.contains_key(n));
    next.rollback_pins.retain(|a, _| {
        target.apps.contains_key(a) && !plan.pins.iter().any(|p| &p.app == a && p.lifted)
    });
    next.apps = target.apps;
    if let Some(d) = input.desired {
        next.notify = d
            .state
            .notify
            .iter()
            .map(|(n, s)| (n.clone(), crate::observed::AppliedSink::from_desired(s)))
            .collect();
    }
    next.databases = next_databases(obs, &target.databases, &plan.databases);
    next.placements = plan.placements.to_vec();
    for r in &plan.releases {
        next.releases.insert(
            r.app.clone(),
            ReleaseRecord {
                number: r.number,
                config_commit: r.config_commit.clone(),
                source_commit: r.source_commit.clone(),
                spec_hash: r.spec_hash.clone(),
                failed: false,
                fallback: None,
            },
        );
    }
    Ok(next)
}

/// The databases after a plan: each placed one where the plan put it, its instance and credentials
/// kept while it stays, a fresh instance under its own name where it is created or moved; removed ones
/// gone (their data stays on the node until dropped explicitly).
pub fn next_databases(
    obs: &Observed,
    specs: &std::collections::BTreeMap<cairn_schema::Name, crate::observed::AppliedDatabase>,
    planned: &[crate::DatabasePlan],
) -> std::collections::BTreeMap<cairn_schema::Name, crate::observed::ObservedDatabase> {
    use crate::DatabaseChange;
    let mut out = std::collections::BTreeMap::new();
    for d in planned {
        let o = obs.databases.get(&d.name);
        let Some(spec) = specs.get(&d.name) else {
            continue;
        };
        let next = match (&d.change, o, &d.node, d.port) {
            (DatabaseChange::Delete, ..) => continue,
            (DatabaseChange::Keep | DatabaseChange::Upgrade { .. }, Some(o), ..) => {
                crate::observed::ObservedDatabase {
                    spec: spec.clone(),
                    ..o.clone()
                }
            }
            // The running engine and version are kept: an upgrade waits for the node to be back.
            (DatabaseChange::Unavailable { .. }, Some(o), ..) => {
                crate::observed::ObservedDatabase {
                    spec: crate::observed::AppliedDatabase {
                        engine: o.spec.engine,
                        version: o.spec.version.clone(),
                        ..spec.clone()
                    },
                    ..o.clone()
                }
            }
            (DatabaseChange::Refused { .. }, Some(o), ..) => o.clone(),
            (DatabaseChange::Unplaced { .. }, Some(o), ..) => o.clone(),
            (_, o, Some(node), Some(port)) => crate::observed::ObservedDatabase {
                spec: spec.clone(),
                node: node.clone(),
                port,
                instance: d.name.clone(),
                credential: o.map_or(0, |o| o.credential),
                last_good_backup: o.and_then(|o| o.last_good_backup),
            },
            _ => continue,
        };
        out.insert(d.name.clone(), next);
    }
    out
}
