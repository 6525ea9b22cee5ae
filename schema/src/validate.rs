//! Cross-file validation: assembles parsed files into one desired state, checking what no single file can
//! (duplicate names, references between resources, replicas against plans, domains between apps).

use std::collections::{BTreeMap, BTreeSet};

use crate::diag::{Diagnostic, Diagnostics, Severity};
use crate::model::{App, Desired, Kind, Origin, Settings};
use crate::parse::{AppRefs, ParsedFile, Resource, SETTINGS_FILE};
use crate::secret::Identity;
use crate::units::{EnvName, Name};

/// The outcome of loading a repository: the desired state when it is valid, and every finding.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub desired: Option<Desired>,
    pub diagnostics: Diagnostics,
    /// Where every secret is, so an identity check can point at it.
    pub secrets: Vec<SecretSite>,
    /// Where every own certificate's key is (an app's `tls = { key = { secret = ... } }`).
    pub tls_keys: Vec<TlsKeySite>,
    /// The [`crate::Assembler`] revision this is, when one assembled it.
    pub revision: Option<Revision>,
}

/// Which assembly of which [`crate::Assembler`] a [`Loaded`] came from: between two revisions of one
/// assembler, [`crate::Assembler::apps_changed`] names the apps whose manifest may differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Revision {
    /// One per start from nothing, unique in the process.
    pub lineage: u64,
    pub number: u64,
}

/// One app's own certificate key and where it is declared.
#[derive(Debug, Clone)]
pub struct TlsKeySite {
    pub app: Name,
    pub file: usize,
    pub span: std::ops::Range<usize>,
}

/// One secret env value and where it is declared.
#[derive(Debug, Clone)]
pub struct SecretSite {
    pub app: Name,
    pub key: EnvName,
    pub file: usize,
    pub span: std::ops::Range<usize>,
}

/// Assembles parsed files (in any order) into a desired state, collecting every error.
pub fn assemble(files: &[ParsedFile]) -> Loaded {
    assemble_refs(&files.iter().collect::<Vec<_>>())
}

/// As [`assemble`], over borrowed files (for callers that cache them).
pub fn assemble_refs(files: &[&ParsedFile]) -> Loaded {
    let mut order: Vec<usize> = (0..files.len()).collect();
    order.sort_by(|&a, &b| files[a].path.cmp(&files[b].path));
    let mut diags: Vec<Diagnostic> = Vec::new();
    let mut settings: Option<Settings> = None;
    let mut settings_seen = false;
    let mut declared: BTreeMap<(Kind, Name), (usize, std::ops::Range<usize>)> = BTreeMap::new();
    let mut plans = BTreeMap::new();
    let mut runtimes = BTreeMap::new();
    let mut nodes = BTreeMap::new();
    let mut apps: BTreeMap<Name, (Box<App>, usize, &AppRefs)> = BTreeMap::new();
    let mut app_refs: Vec<(Name, &AppRefs, usize, std::ops::Range<usize>)> = Vec::new();
    let mut origins = BTreeMap::new();
    let mut sinks = BTreeMap::new();
    let mut sink_apps: Vec<(Name, &crate::parse::Located<Name>, usize)> = Vec::new();
    let mut databases = BTreeMap::new();
    let mut db_refs: Vec<(&crate::parse::DbRefs, usize)> = Vec::new();
    let mut node_addresses: BTreeMap<String, (Name, usize, std::ops::Range<usize>)> =
        BTreeMap::new();

    for &i in &order {
        let f = files[i];
        diags.extend(f.diagnostics.iter().cloned());
        if f.path == SETTINGS_FILE {
            settings_seen = true;
            settings = f.settings.as_ref().map(|s| s.value.clone());
        }
        for d in &f.declared {
            let key = (d.kind, d.name.clone());
            if let Some((other, other_span)) = declared.get(&key) {
                let first = files[*other].diag(Severity::Error, other_span.clone(), "");
                diags.push(
                    f.diag(
                        Severity::Error,
                        d.span.clone(),
                        format!("duplicate {} `{}`", d.kind.as_str(), d.name),
                    )
                    .with_hint(format!("it is already declared at {}", first.location())),
                );
                continue;
            }
            declared.insert(key.clone(), (i, d.span.clone()));
            let at = f.position(d.span.start);
            origins.insert(
                key,
                Origin {
                    path: f.path.clone(),
                    line: at.line,
                    col: at.col,
                },
            );
            if let Some(r) = &d.refs {
                app_refs.push((d.name.clone(), r, i, d.span.clone()));
            }
            for a in &d.sink_apps {
                sink_apps.push((d.name.clone(), a, i));
            }
            if let Some(r) = &d.db_refs {
                db_refs.push((r, i));
            }
            match &d.resource {
                Some(Resource::Plan(p)) => {
                    plans.insert(d.name.clone(), p.clone());
                }
                Some(Resource::Runtime(r)) => {
                    runtimes.insert(d.name.clone(), r.clone());
                }
                Some(Resource::Node(n)) => {
                    if let (Some(a), Some(span)) = (&n.address, &d.address) {
                        let site = (d.name.clone(), i, span.clone());
                        if let Some((other, ofi, ospan)) = node_addresses.get(&a.endpoint()) {
                            let first = files[*ofi].diag(Severity::Error, ospan.clone(), "");
                            diags.push(
                                f.diag(
                                    Severity::Error,
                                    span.clone(),
                                    format!("address `{a}` is also node `{other}`'s"),
                                )
                                .with_hint(format!(
                                    "each node needs its own address (host and port); see {}",
                                    first.location()
                                )),
                            );
                        } else {
                            node_addresses.insert(a.endpoint(), site);
                        }
                    }
                    nodes.insert(d.name.clone(), n.clone());
                }
                Some(Resource::App(a)) => {
                    let refs = d.refs.as_ref().expect("a parsed app has refs");
                    apps.insert(d.name.clone(), (a.clone(), i, refs));
                }
                Some(Resource::Sink(s)) => {
                    sinks.insert(d.name.clone(), (**s).clone());
                }
                Some(Resource::Database(db)) => {
                    databases.insert(d.name.clone(), (**db).clone());
                }
                None => {}
            }
        }
    }
    if !settings_seen {
        diags.push(
            Diagnostic::file(Severity::Error, SETTINGS_FILE, "the repository has no cairn.toml")
                .with_hint("create cairn.toml at the repository root with at least `base_domain = \"apps.example.com\"`"),
        );
    }

    let declared_names = |kind: Kind| -> Vec<&str> {
        declared
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, n)| n.as_str())
            .collect()
    };
    let plan_names = declared_names(Kind::Plan);
    let runtime_names = declared_names(Kind::Runtime);
    let node_names = declared_names(Kind::Node);
    let database_names = declared_names(Kind::Database);
    let regions: BTreeSet<&Name> = nodes.values().filter_map(|n| n.region.as_ref()).collect();
    let mut domain_owner: BTreeMap<String, (Name, usize, std::ops::Range<usize>)> = BTreeMap::new();
    let mut secrets = Vec::new();
    let mut tls_keys = Vec::new();

    for (name, refs, fi, name_span) in &app_refs {
        let f = files[*fi];
        if let Some(plan) = &refs.plan
            && !declared.contains_key(&(Kind::Plan, plan.value.clone()))
        {
            diags.push(diag::unknown(f, Kind::Plan, plan, &plan_names));
        }
        if let Some(rt) = &refs.runtime
            && !declared.contains_key(&(Kind::Runtime, rt.value.clone()))
        {
            diags.push(diag::unknown(f, Kind::Runtime, rt, &runtime_names));
        }
        if let Some(plan) = &refs.plan
            && let Some(d) = diag::too_many_replicas(f, refs, plans.get(&plan.value))
        {
            diags.push(d);
        }
        if let Some(d) = diag::default_domain_too_long(f, name, name_span, settings.as_ref()) {
            diags.push(d);
        }
        for db in &refs.databases {
            if !declared.contains_key(&(Kind::Database, db.value.clone())) {
                diags.push(diag::unknown(f, Kind::Database, db, &database_names));
            }
        }
    }

    for (refs, fi) in &db_refs {
        let f = files[*fi];
        if let Some(plan) = &refs.plan
            && !declared.contains_key(&(Kind::Plan, plan.value.clone()))
        {
            diags.push(diag::unknown(f, Kind::Plan, plan, &plan_names));
        }
        if let Some(node) = &refs.node
            && !declared.contains_key(&(Kind::Node, node.value.clone()))
        {
            diags.push(diag::unknown(f, Kind::Node, node, &node_names));
        }
    }

    for (name, (app, fi, spans)) in &apps {
        let f = files[*fi];
        if let Some(d) = diag::tls_auto_without_tls(f, name, spans, settings.as_ref()) {
            diags.push(d);
        }
        if let (Some(region), Some(span)) = (&app.placement.region, &spans.region)
            && !regions.contains(region)
        {
            diags.push(diag::no_region(f, span, region));
        }
        for (k, v) in &app.placement.labels {
            if !nodes.values().any(|n| n.labels.get(k) == Some(v)) {
                diags.push(diag::no_label(f, spans, k, v));
            }
        }
        for (d, span) in app.domains.iter().zip(&spans.domains) {
            let key = d.to_string();
            if let Some((other, ofi, ospan)) = domain_owner.get(&key) {
                let first = files[*ofi].diag(Severity::Error, ospan.clone(), "");
                diags.push(
                    f.diag(
                        Severity::Error,
                        span.clone(),
                        format!("domain `{d}` is also used by app `{other}`"),
                    )
                    .with_hint(format!("see {}", first.location())),
                );
            } else {
                domain_owner.insert(key, (name.clone(), *fi, span.clone()));
            }
        }
        if let Some(span) = &spans.tls_key {
            tls_keys.push(TlsKeySite {
                app: name.clone(),
                file: *fi,
                span: span.clone(),
            });
        }
        for (key, span) in &spans.secrets {
            secrets.push(SecretSite {
                app: name.clone(),
                key: key.clone(),
                file: *fi,
                span: span.clone(),
            });
        }
    }
    // A custom domain must not shadow another app's generated one.
    if let Some(s) = &settings {
        for (domain, (owner, fi, span)) in &domain_owner {
            if let Some(app) = domain.strip_suffix(&format!(".{}", s.base_domain))
                && app != owner.as_str()
                && apps.keys().any(|a| a.as_str() == app)
            {
                diags.push(files[*fi].diag(
                    Severity::Error,
                    span.clone(),
                    format!("domain `{domain}` is app `{app}`'s generated domain"),
                ));
            }
        }
    }

    let app_names = declared_names(Kind::App);
    for (sink, app, fi) in &sink_apps {
        if !declared.contains_key(&(Kind::App, app.value.clone())) {
            diags.push(diag::unknown_sink_app(files[*fi], sink, app, &app_names));
        }
    }

    let mut diagnostics = Diagnostics(diags);
    diagnostics.sort();
    let desired = match settings {
        Some(settings) if !diagnostics.has_errors() => Some(Desired {
            settings,
            plans,
            runtimes,
            nodes,
            apps: apps.into_iter().map(|(k, (a, _, _))| (k, *a)).collect(),
            notify: sinks,
            databases,
            origins,
        }),
        _ => None,
    };
    Loaded {
        desired,
        diagnostics,
        secrets,
        tls_keys,
        revision: None,
    }
}

/// The cross-file diagnostics a full assembly and the incremental one ([`crate::Assembler`]) both
/// make: one wording, so the two cannot drift apart.
pub(crate) mod diag {
    use std::ops::Range;

    use crate::diag::{Diagnostic, Severity, did_you_mean};
    use crate::model::{Kind, Plan, Settings};
    use crate::parse::{AppRefs, Located, ParsedFile};
    use crate::units::Name;

    const UNPLACEABLE: &str =
        "the plan will report this app's replicas as unplaceable until such a node exists";

    /// An app or database names a plan, runtime, node or database no file declares; `names` are the
    /// declared ones.
    pub(crate) fn unknown(
        f: &ParsedFile,
        kind: Kind,
        named: &Located<Name>,
        names: &[&str],
    ) -> Diagnostic {
        let what = kind.as_str();
        let d = f.diag(
            Severity::Error,
            named.span.clone(),
            format!("unknown {what} `{}`", named.value),
        );
        if let Some(s) = did_you_mean(named.value.as_str(), names.iter().copied()) {
            d.with_hint(format!("did you mean `{s}`?"))
        } else if !names.is_empty() {
            d.with_hint(format!("{}: {}", kind.plural(), names.join(", ")))
        } else {
            d
        }
    }

    /// More replicas than the app's plan (when it is declared) allows.
    pub(crate) fn too_many_replicas(
        f: &ParsedFile,
        refs: &AppRefs,
        plan: Option<&Plan>,
    ) -> Option<Diagnostic> {
        let (named, plan) = (refs.plan.as_ref()?, plan?);
        let replicas = refs.replicas.as_ref().map_or(1, |r| r.value);
        if replicas <= plan.max_replicas {
            return None;
        }
        let span = refs
            .replicas
            .as_ref()
            .map_or(named.span.clone(), |r| r.span.clone());
        Some(
            f.diag(
                Severity::Error,
                span,
                format!(
                    "{replicas} replicas exceed plan `{}`'s maximum of {}",
                    named.value, plan.max_replicas
                ),
            )
            .with_hint("lower `replicas`, or choose a plan with a higher `max_replicas`"),
        )
    }

    /// `<app>.<base_domain>` longer than a DNS name may be.
    pub(crate) fn default_domain_too_long(
        f: &ParsedFile,
        name: &Name,
        name_span: &Range<usize>,
        settings: Option<&Settings>,
    ) -> Option<Diagnostic> {
        let default = format!("{name}.{}", settings?.base_domain);
        (default.len() > 253).then(|| {
            f.diag(
                Severity::Error,
                name_span.clone(),
                format!("app `{name}`'s default domain `{default}` is longer than 253 characters"),
            )
            .with_hint("shorten the app's name or cairn.toml's `base_domain`")
        })
    }

    /// `tls = "auto"` without `[tls]` in cairn.toml.
    pub(crate) fn tls_auto_without_tls(
        f: &ParsedFile,
        name: &Name,
        refs: &AppRefs,
        settings: Option<&Settings>,
    ) -> Option<Diagnostic> {
        let span = refs.tls_auto.as_ref()?;
        settings.filter(|s| s.tls.is_none()).map(|_| {
            f.diag(
                Severity::Error,
                span.clone(),
                format!("app `{name}` asks for `tls = \"auto\"` but cairn.toml has no `[tls]`"),
            )
            .with_hint("add `[tls]` with `contact = \"you@example.com\"` to cairn.toml: it says which ACME CA issues the certificates")
        })
    }

    /// No node is in the region an app asks for.
    pub(crate) fn no_region(f: &ParsedFile, span: &Range<usize>, region: &Name) -> Diagnostic {
        f.diag(
            Severity::Warning,
            span.clone(),
            format!("no node is in region `{region}`"),
        )
        .with_hint(UNPLACEABLE)
    }

    /// No node has a label an app asks for.
    pub(crate) fn no_label(f: &ParsedFile, refs: &AppRefs, k: &Name, v: &str) -> Diagnostic {
        let span = refs.labels.get(k).cloned().unwrap_or(0..0);
        f.diag(
            Severity::Warning,
            span,
            format!("no node has label `{k} = \"{v}\"`"),
        )
        .with_hint(UNPLACEABLE)
    }

    /// A sink lists an app no file declares; `apps` are the declared ones.
    pub(crate) fn unknown_sink_app(
        f: &ParsedFile,
        sink: &Name,
        app: &Located<Name>,
        apps: &[&str],
    ) -> Diagnostic {
        let d = f.diag(
            Severity::Error,
            app.span.clone(),
            format!("notify `{sink}` lists unknown app `{}`", app.value),
        );
        match did_you_mean(app.value.as_str(), apps.iter().copied()) {
            Some(s) => d.with_hint(format!("did you mean `{s}`?")),
            None => d.with_hint("list declared apps, or `*` for every app"),
        }
    }
}

/// The most bytes a file a manifest names (a PEM bundle) may have.
pub const MAX_REFERENCED_BYTES: usize = 1 << 20;

/// Checks the files the manifests name (`ca_roots`, own certificates) with what the source read for
/// each (`read`: its bytes, or why it could not be read): each must exist in the repository and hold PEM
/// certificates. Every problem is an error at the name; `loaded.desired` is cleared when there is one.
/// Returns the contents by path, for the control plane.
pub fn check_referenced(
    loaded: &mut Loaded,
    files: &[&ParsedFile],
    mut read: impl FnMut(&str) -> Result<Vec<u8>, String>,
) -> BTreeMap<String, std::sync::Arc<[u8]>> {
    let mut out = BTreeMap::new();
    let mut diags = Vec::new();
    for f in files {
        for r in &f.file_refs {
            let path = r.path.as_str();
            let why = match out.get(path) {
                Some(_) => None,
                None => match read(path) {
                    Err(why) => Some(why),
                    Ok(b) if b.len() > MAX_REFERENCED_BYTES => Some(format!(
                        "is {} bytes; at most {MAX_REFERENCED_BYTES} are read",
                        b.len()
                    )),
                    Ok(b) if !holds_pem_certificate(&b) => {
                        Some("holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)".to_owned())
                    }
                    Ok(b) => {
                        out.insert(path.to_owned(), std::sync::Arc::from(b));
                        None
                    }
                },
            };
            if let Some(why) = why {
                let mut d = f
                    .diag(
                        Severity::Error,
                        r.span.clone(),
                        format!("{} names `{path}`, which {why}", r.what),
                    )
                    .with_hint(
                        "name a PEM file committed to this repository, relative to its root",
                    );
                if r.hide_line {
                    d.source_line = None;
                }
                diags.push(d);
            }
        }
    }
    if !diags.is_empty() {
        loaded.diagnostics.0.extend(diags);
        loaded.diagnostics.sort();
        loaded.desired = None;
    }
    out
}

fn holds_pem_certificate(b: &[u8]) -> bool {
    std::str::from_utf8(b).is_ok_and(|s| s.contains("-----BEGIN CERTIFICATE-----"))
}

/// Checks that every secret decrypts with `identity`, naming `path:line:col` of each that does not.
/// Never puts a value into a diagnostic.
pub fn check_secrets(
    loaded: &Loaded,
    files: &[ParsedFile],
    identity: &Identity,
) -> Vec<Diagnostic> {
    let Some(desired) = &loaded.desired else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for site in &loaded.secrets {
        let Some(crate::model::EnvValue::Secret { secret }) = desired
            .apps
            .get(&site.app)
            .and_then(|a| a.env.get(&site.key))
        else {
            continue;
        };
        if let Err(e) = identity.decrypt(secret) {
            out.push(
                files[site.file]
                    .diag(Severity::Error, site.span.clone(), format!("secret `{}` of app `{}` does not decrypt: {e}", site.key, site.app))
                    .with_hint(format!(
                        "re-encrypt it to the current recipients with `cairn secret rotate`, or check that {} is in cairn.toml",
                        identity.recipient()
                    )),
            );
        }
    }
    for site in &loaded.tls_keys {
        let Some(crate::model::AppTls::Own(own)) =
            desired.apps.get(&site.app).and_then(|a| a.tls.as_ref())
        else {
            continue;
        };
        if let Err(e) = identity.decrypt(&own.key.secret) {
            out.push(
                files[site.file]
                    .diag(
                        Severity::Error,
                        site.span.clone(),
                        format!("the certificate key of app `{}` does not decrypt: {e}", site.app),
                    )
                    .with_hint(format!(
                        "encrypt it again with `cairn secret encrypt`, for recipients that include {}",
                        identity.recipient()
                    )),
            );
        }
    }
    out
}
