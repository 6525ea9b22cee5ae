//! Field-level differences between an applied resource and its desired form.
//!
//! Each resource is flattened into `(path, leaf)` pairs in the manifest's field order (map keys sorted),
//! and the two lists are compared path by path. A secret leaf holds its fingerprint only for the
//! comparison; what leaves this module shows a secret as [`Shown::Secret`], never a value.

use std::collections::BTreeMap;

use cairn_schema::{EnvName, Node, Plan, Runtime};
use serde::Serialize;
use serde_json::Value;

use super::{FieldDiff, Shown};
use crate::observed::{AppliedApp, AppliedDatabase, AppliedEnv, AppliedSink};

/// A flattened field's value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Leaf {
    Value(Value),
    /// A secret, compared by `key` (its fingerprint, or a stand-in when it could not be verified).
    Secret {
        key: String,
        unverified: bool,
    },
}

/// Fields in display order: `(rank of the top-level field, path, value)`.
pub(crate) type Flat = Vec<(u16, String, Leaf)>;

fn val<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

struct Builder(Flat);

impl Builder {
    fn put<T: Serialize>(&mut self, rank: u16, path: &str, v: &T) {
        self.0.push((rank, path.to_owned(), Leaf::Value(val(v))));
    }
    fn opt<T: Serialize>(&mut self, rank: u16, path: &str, v: Option<&T>) {
        if let Some(v) = v {
            self.put(rank, path, v);
        }
    }
    fn list<T: Serialize>(&mut self, rank: u16, path: &str, v: &[T]) {
        if !v.is_empty() {
            self.put(rank, path, &v);
        }
    }
    fn map<K: std::fmt::Display, V: Serialize>(
        &mut self,
        rank: u16,
        prefix: &str,
        m: &BTreeMap<K, V>,
    ) {
        for (k, v) in m {
            self.put(rank, &format!("{prefix}.{k}"), v);
        }
    }
}

pub(crate) fn flat_plan(p: &Plan) -> Flat {
    let mut b = Builder(Vec::new());
    b.put(0, "cpu", &p.cpu);
    b.put(1, "memory", &p.memory);
    b.put(2, "disk", &p.disk);
    b.put(3, "price", &p.price);
    b.put(4, "max_replicas", &p.max_replicas);
    b.0
}

pub(crate) fn flat_runtime(r: &Runtime) -> Flat {
    let mut b = Builder(Vec::new());
    b.put(0, "drivers", &r.drivers);
    b.put(1, "dockerfile", &r.dockerfile);
    b.opt(2, "image", r.image.as_ref());
    b.list(3, "build", &r.build);
    b.opt(4, "start", r.start.as_ref());
    b.put(5, "port", &r.port);
    b.0
}

pub(crate) fn flat_node(n: &Node) -> Flat {
    let mut b = Builder(Vec::new());
    b.put(0, "cpu", &n.cpu);
    b.put(1, "memory", &n.memory);
    b.put(2, "disk", &n.disk);
    b.opt(3, "region", n.region.as_ref());
    b.map(4, "labels", &n.labels);
    b.put(5, "drain", &n.drain);
    b.opt(6, "recipient", n.recipient.as_ref());
    b.opt(7, "address", n.address.as_ref());
    b.put(8, "ingress", &n.ingress);
    b.0
}

/// A sink's URL and signing secret are shown as secrets, compared by their ciphertexts' digests.
pub(crate) fn flat_sink(s: &AppliedSink) -> Flat {
    let mut b = Builder(Vec::new());
    b.put(0, "kind", &s.kind);
    b.0.push((
        1,
        "url".to_owned(),
        Leaf::Secret {
            key: s.url_sha256.clone(),
            unverified: false,
        },
    ));
    if let Some(d) = &s.signing_secret_sha256 {
        b.0.push((
            2,
            "signing_secret".to_owned(),
            Leaf::Secret {
                key: d.clone(),
                unverified: false,
            },
        ));
    }
    b.put(3, "events", &s.events);
    b.put(4, "apps", &s.apps);
    b.put(5, "severity", &s.severity);
    b.put(6, "max_per_hour", &s.max_per_hour);
    b.0
}

/// `unverified(key)` says whether a secret's fingerprint is a stand-in.
pub(crate) fn flat_app(a: &AppliedApp, unverified: impl Fn(&EnvName) -> bool) -> Flat {
    let mut b = Builder(Vec::new());
    b.put(0, "plan", &a.plan);
    b.put(1, "runtime", &a.runtime);
    b.put(2, "source.url", &a.source.url);
    b.put(3, "source.branch", &a.source.branch);
    b.opt(4, "source.rev", a.source.rev.as_ref());
    b.put(5, "replicas", &a.replicas);
    b.opt(6, "port", a.port.as_ref());
    b.list(7, "domains", &a.domains);
    b.put(8, "health.path", &a.health.path);
    b.put(9, "health.timeout", &a.health.timeout);
    b.opt(10, "placement.region", a.placement.region.as_ref());
    b.map(11, "placement.labels", &a.placement.labels);
    b.put(12, "suspended", &a.suspended);
    b.opt(13, "http.max_body", a.http.max_body.as_ref());
    for (k, v) in &a.env {
        let leaf = match v {
            AppliedEnv::Plain { value } => Leaf::Value(Value::String(value.clone())),
            AppliedEnv::Secret { fingerprint, .. } => Leaf::Secret {
                key: fingerprint.clone(),
                unverified: unverified(k),
            },
        };
        b.0.push((14, format!("env.{k}"), leaf));
    }
    b.map(15, "databases", &a.databases);
    b.0
}

/// A database's S3 keys are shown as secrets, compared by their ciphertexts' digests.
pub(crate) fn flat_database(d: &AppliedDatabase) -> Flat {
    let mut b = Builder(Vec::new());
    b.put(0, "engine", &d.engine);
    b.put(1, "version", &d.version);
    b.put(2, "plan", &d.plan);
    b.opt(3, "node", d.node.as_ref());
    if let Some(k) = &d.backup {
        b.put(4, "backup.schedule", &k.schedule);
        b.put(4, "backup.keep", &k.keep);
        b.put(4, "backup.to", &k.to);
        b.opt(4, "backup.endpoint", k.endpoint.as_ref());
        b.opt(4, "backup.region", k.region.as_ref());
        for (path, digest) in [
            ("backup.access_key_id", &k.access_key_id_sha256),
            ("backup.secret_access_key", &k.secret_access_key_sha256),
        ] {
            if let Some(key) = digest {
                b.0.push((
                    4,
                    path.to_owned(),
                    Leaf::Secret {
                        key: key.clone(),
                        unverified: false,
                    },
                ));
            }
        }
    }
    b.put(5, "verify", &d.verify);
    b.0
}

fn shown(l: &Leaf) -> Shown {
    match l {
        Leaf::Value(v) => Shown::Value(v.clone()),
        Leaf::Secret { .. } => Shown::secret(),
    }
}

/// Fields a create does not list when they hold their default (the manifest most likely left them out).
const CREATE_DEFAULTS: [(&str, &str); 2] = [("health.path", "/"), ("health.timeout", "5s")];
/// Flags that default to true (every other flag defaults to false).
const TRUE_BY_DEFAULT: [&str; 1] = ["ingress"];

fn is_create_default(path: &str, l: &Leaf) -> bool {
    match l {
        Leaf::Value(Value::Bool(b)) => *b == TRUE_BY_DEFAULT.contains(&path),
        Leaf::Value(Value::String(s)) => CREATE_DEFAULTS.iter().any(|(p, d)| *p == path && d == s),
        _ => false,
    }
}

/// The differences from `before` to `after`. With no `before` (a create) every field is listed except
/// flags at their default and default health checks; with no `after` (a delete) nothing is.
pub(crate) fn diff(before: Option<&Flat>, after: Option<&Flat>) -> Vec<FieldDiff> {
    let Some(after) = after else {
        return Vec::new();
    };
    let Some(before) = before else {
        return after
            .iter()
            .filter(|(_, path, l)| !is_create_default(path, l))
            .map(|(_, path, l)| FieldDiff {
                path: path.clone(),
                before: None,
                after: Some(shown(l)),
                unverified: false,
            })
            .collect();
    };
    type Sides<'l> = (Option<&'l Leaf>, Option<&'l Leaf>);
    let mut merged: BTreeMap<(u16, &str), Sides<'_>> = BTreeMap::new();
    for (rank, path, l) in before {
        merged.entry((*rank, path)).or_default().0 = Some(l);
    }
    for (rank, path, l) in after {
        merged.entry((*rank, path)).or_default().1 = Some(l);
    }
    let mut out = Vec::new();
    for ((_, path), (b, a)) in merged {
        let unverified = match (b, a) {
            (Some(x), Some(y)) if x == y => continue,
            (
                Some(Leaf::Secret { key: kb, .. }),
                Some(Leaf::Secret {
                    key: ka,
                    unverified: ua,
                }),
            ) if kb == ka && !ua => {
                continue;
            }
            (
                Some(Leaf::Secret { unverified: ub, .. }),
                Some(Leaf::Secret { unverified: ua, .. }),
            ) => *ub || *ua,
            _ => false,
        };
        out.push(FieldDiff {
            path: path.to_owned(),
            before: b.map(shown),
            after: a.map(shown),
            unverified,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Leaf {
        Leaf::Value(Value::String(s.into()))
    }

    #[test]
    fn orders_by_field_then_path_and_hides_secrets() {
        let before: Flat = vec![
            (0, "plan".into(), v("small")),
            (
                13,
                "env.A".into(),
                Leaf::Secret {
                    key: "f1".into(),
                    unverified: false,
                },
            ),
            (13, "env.B".into(), v("x")),
        ];
        let after: Flat = vec![
            (0, "plan".into(), v("large")),
            (
                13,
                "env.A".into(),
                Leaf::Secret {
                    key: "f2".into(),
                    unverified: false,
                },
            ),
            (13, "env.C".into(), v("y")),
        ];
        let d = diff(Some(&before), Some(&after));
        let paths: Vec<&str> = d.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["plan", "env.A", "env.B", "env.C"]);
        assert_eq!(d[1].before, Some(Shown::secret()));
        assert_eq!(d[1].after, Some(Shown::secret()));
        assert!(!d[1].unverified);
        assert_eq!(d[2].after, None);
        let json = serde_json::to_string(&d).unwrap();
        assert!(!json.contains("f1") && !json.contains("f2"), "{json}");
    }

    #[test]
    fn same_fingerprint_is_no_change_and_unverified_is_flagged() {
        let s = |k: &str, u: bool| {
            vec![(
                13u16,
                "env.A".to_owned(),
                Leaf::Secret {
                    key: k.into(),
                    unverified: u,
                },
            )]
        };
        assert!(diff(Some(&s("f", false)), Some(&s("f", false))).is_empty());
        let d = diff(Some(&s("f", false)), Some(&s("unverified:ct", true)));
        assert_eq!(d.len(), 1);
        assert!(d[0].unverified);
    }
}
