//! Incremental assembly: [`Assembler`] keeps the assembled desired state and the cross-file indexes
//! between commits, so a commit re-checks only what its changed files touch. The result is the one
//! [`crate::validate::assemble_refs`] gives for the same files: the same desired state and the same
//! diagnostics in the same order (`tests/it/incremental.rs` proves it on random commit sequences).
//!
//! How a change stays O(changed): every declaration site is indexed by `(kind, name)`, so a changed file
//! re-decides only the names it declared or declares; the checks between resources are indexed by what
//! they read (apps by the plan, runtime, region and labels they name; domains by their claimants; node
//! addresses by endpoint; sinks by the apps they list), and each finding is kept with the thing that
//! produced it, so re-checking one replaces only its findings. Only a change of `cairn.toml` (its base
//! domain and `[tls]` reach every app) re-checks every app.
//!
//! Pure, like the rest of the crate: no IO.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;

use crate::diag::{Diagnostic, Diagnostics, Severity};
use crate::model::{App, Database, Desired, Kind, Node, Origin, Plan, Runtime, Settings, Sink};
use crate::parse::{Declared, ParsedFile, Resource, SETTINGS_FILE};
use crate::units::{EnvName, Name};
use crate::validate::{Loaded, Revision, SecretSite, TlsKeySite, diag};

type Key = (Kind, Name);
/// A declaration: its file's path and its index in that file's `declared`.
type Site = (String, usize);

/// The assembled resources, owned here between commits or lent to the last valid [`Loaded`].
#[derive(Debug, Default)]
struct Maps {
    plans: BTreeMap<Name, Plan>,
    runtimes: BTreeMap<Name, Runtime>,
    nodes: BTreeMap<Name, Node>,
    apps: BTreeMap<Name, App>,
    notify: BTreeMap<Name, Sink>,
    databases: BTreeMap<Name, Database>,
    origins: BTreeMap<Key, Origin>,
}

/// A node's contribution to the placement indexes and its address claim, to take back when it changes.
#[derive(Debug, Default)]
struct NodeMark {
    region: Option<Name>,
    labels: Vec<(Name, String)>,
    endpoint: Option<String>,
}

/// What an app's checks indexed, to take back when it is checked again.
#[derive(Debug, Default)]
struct AppMark {
    plan: Option<Name>,
    runtime: Option<Name>,
    region: Option<Name>,
    labels: Vec<(Name, String)>,
    domains: Vec<String>,
    databases: Vec<Name>,
}

/// One claim of a domain: the app, the domain's position in its list; where it is.
type DomainClaims = BTreeMap<(Name, usize), (String, Range<usize>)>;
/// The nodes claiming one endpoint: by site, the node, the address as written and its span.
type AddressClaims = BTreeMap<Site, (Name, String, Range<usize>)>;
/// Where an app's secrets are: its own certificate key's (path, span), then each secret's.
type SecretSites = (
    Option<(String, Range<usize>)>,
    Vec<(EnvName, String, Range<usize>)>,
);

/// How many assemblies' changed apps an [`Assembler`] remembers, and how many names in all: a caller
/// whose last revision is older asks in vain and compares every app itself.
const JOURNAL_REVISIONS: usize = 256;
const JOURNAL_NAMES: usize = 200_000;

/// The apps each recent assembly changed, by revision number.
#[derive(Debug, Default)]
struct Journal {
    /// Every revision after `from` is here (those that changed no app with an empty list).
    from: u64,
    changed: std::collections::VecDeque<(u64, Vec<Name>)>,
    names: usize,
}

impl Journal {
    fn record(&mut self, number: u64, apps: Vec<Name>) {
        self.names += apps.len();
        self.changed.push_back((number, apps));
        while self.changed.len() > JOURNAL_REVISIONS || self.names > JOURNAL_NAMES {
            let Some((n, apps)) = self.changed.pop_front() else {
                break;
            };
            self.names -= apps.len();
            self.from = n;
        }
    }
}

/// The assembled state of the last commit and the indexes that make the next one incremental.
#[derive(Debug, Default)]
pub struct Assembler {
    files: BTreeMap<String, Arc<ParsedFile>>,
    sites: BTreeMap<Key, BTreeSet<Site>>,
    names: BTreeMap<Kind, BTreeSet<Name>>,
    maps: Maps,
    /// The maps went out in the last `Loaded`'s desired state and must come back (or be rebuilt).
    lent: bool,
    /// Set while an update runs: a panic in one leaves it set, and the next update starts afresh.
    busy: bool,
    /// How many updates started afresh (the first one included).
    fresh: u64,
    /// This start's lineage (0 until its first update), the last update's number, and the apps recent
    /// updates changed.
    lineage: u64,
    revision: u64,
    journal: Journal,
    /// The apps the running update changed (their manifest, or whether they are declared).
    changing: BTreeSet<Name>,
    settings: Option<Settings>,
    // Findings, by what produced them (only non-empty entries are kept).
    dup_diags: BTreeMap<Key, Vec<Diagnostic>>,
    addr_diags: BTreeMap<String, Vec<Diagnostic>>,
    ref_diags: BTreeMap<Name, Vec<Diagnostic>>,
    app_diags: BTreeMap<Name, Vec<Diagnostic>>,
    domain_diags: BTreeMap<String, Vec<Diagnostic>>,
    sink_diags: BTreeMap<Name, Vec<Diagnostic>>,
    db_diags: BTreeMap<Name, Vec<Diagnostic>>,
    // Indexes.
    plan_users: BTreeMap<Name, BTreeSet<Name>>,
    runtime_users: BTreeMap<Name, BTreeSet<Name>>,
    unknown_plan: BTreeSet<Name>,
    unknown_runtime: BTreeSet<Name>,
    region_count: BTreeMap<Name, usize>,
    label_count: BTreeMap<(Name, String), usize>,
    region_users: BTreeMap<Name, BTreeSet<Name>>,
    label_users: BTreeMap<(Name, String), BTreeSet<Name>>,
    node_marks: BTreeMap<Name, NodeMark>,
    app_marks: BTreeMap<Name, AppMark>,
    /// Endpoint to the nodes claiming it: site, node, the address as written, its span.
    addr_claims: BTreeMap<String, AddressClaims>,
    domain_claims: BTreeMap<String, DomainClaims>,
    /// Per app (in the apps map) with any: its own certificate key's site, then its secrets'.
    secret_sites: BTreeMap<Name, SecretSites>,
    sink_lists: BTreeMap<Name, Vec<Name>>,
    listing_sinks: BTreeMap<Name, BTreeSet<Name>>,
    unknown_sinks: BTreeSet<Name>,
    /// Databases by the plan and node they name (`(Kind::Plan | Kind::Node, name)`), and what each
    /// database named when it was last checked.
    db_users: BTreeMap<Key, BTreeSet<Name>>,
    db_marks: BTreeMap<Name, Vec<Key>>,
    /// Databases naming an undeclared plan or node (their hints list the declared names).
    unknown_db_refs: BTreeSet<Name>,
    /// Apps by the databases they attach, and the apps attaching an undeclared one.
    database_users: BTreeMap<Name, BTreeSet<Name>>,
    unknown_database: BTreeSet<Name>,
}

/// What one update must re-check.
#[derive(Default)]
struct Dirty {
    apps: BTreeSet<Name>,
    domains: BTreeSet<String>,
    sinks: BTreeSet<Name>,
    endpoints: BTreeSet<String>,
    databases: BTreeSet<Name>,
}

/// A lineage no assembler in this process had.
fn new_lineage() -> u64 {
    static LINEAGES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    LINEAGES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Assembler {
    pub fn new() -> Self {
        Assembler::default()
    }

    /// The apps whose manifest may differ between the desired states of revisions `since` and `to` of
    /// this assembler (an app added or removed counts), or `None` when it cannot tell: another
    /// assembler's or an earlier start's revision, one older than it remembers, or `to` before `since`.
    pub fn apps_changed(&self, since: Revision, to: Revision) -> Option<BTreeSet<Name>> {
        if since.lineage != self.lineage
            || to.lineage != self.lineage
            || since.number > to.number
            || to.number > self.revision
            || since.number < self.journal.from
        {
            return None;
        }
        let mut out = BTreeSet::new();
        for (n, apps) in &self.journal.changed {
            if *n > since.number && *n <= to.number {
                out.extend(apps.iter().cloned());
            }
        }
        Some(out)
    }

    /// Assembles `files` (unique paths, any order), re-checking only what changed since the last call.
    /// `returned` is the desired state of the last `Loaded` this gave out, unmodified, when the caller
    /// still has it: the assembler keeps its maps there instead of copying them. Without it (or after a
    /// panic in an update) the assembly starts afresh; the result is the same, only slower.
    pub fn assemble(&mut self, files: &[Arc<ParsedFile>], returned: Option<Desired>) -> Loaded {
        if self.busy {
            self.restart();
        }
        if self.lent {
            match returned {
                Some(d) => {
                    self.maps = Maps {
                        plans: d.plans,
                        runtimes: d.runtimes,
                        nodes: d.nodes,
                        apps: d.apps,
                        notify: d.notify,
                        databases: d.databases,
                        origins: d.origins,
                    };
                    self.lent = false;
                }
                None => self.restart(),
            }
        }
        if self.files.is_empty() && self.sites.is_empty() {
            self.fresh += 1;
        }
        if self.lineage == 0 {
            // New, or started afresh above.
            self.lineage = new_lineage();
        }
        self.busy = true;
        self.changing.clear();
        let mut loaded = self.update(files);
        self.revision += 1;
        let changed = std::mem::take(&mut self.changing).into_iter().collect();
        self.journal.record(self.revision, changed);
        loaded.revision = Some(Revision {
            lineage: self.lineage,
            number: self.revision,
        });
        self.busy = false;
        loaded
    }

    /// How many assemblies started from nothing: the first, and any after the last desired state was
    /// not handed back or an update panicked.
    pub fn fresh_starts(&self) -> u64 {
        self.fresh
    }

    /// Starts from nothing, as a new lineage: no revision before this is comparable with the next.
    fn restart(&mut self) {
        let fresh = self.fresh;
        *self = Assembler::new();
        self.fresh = fresh;
    }

    fn update(&mut self, files: &[Arc<ParsedFile>]) -> Loaded {
        let mut dirty_keys: BTreeSet<Key> = BTreeSet::new();
        let mut settings_changed = false;
        let new: BTreeMap<&str, &Arc<ParsedFile>> =
            files.iter().map(|f| (f.path.as_str(), f)).collect();
        debug_assert_eq!(new.len(), files.len(), "paths are unique");
        let gone: Vec<String> = self
            .files
            .keys()
            .filter(|p| !new.contains_key(p.as_str()))
            .cloned()
            .collect();
        let mut changed: Vec<(String, Option<Arc<ParsedFile>>)> =
            gone.into_iter().map(|p| (p, None)).collect();
        for (p, f) in &new {
            match self.files.get(*p) {
                Some(old) if Arc::ptr_eq(old, f) => {}
                _ => changed.push(((*p).to_owned(), Some((*f).clone()))),
            }
        }
        for (path, f) in changed {
            if path == SETTINGS_FILE {
                settings_changed = true;
            }
            if let Some(old) = self.files.remove(&path) {
                for (i, d) in old.declared.iter().enumerate() {
                    let key = (d.kind, d.name.clone());
                    if let Some(s) = self.sites.get_mut(&key) {
                        s.remove(&(path.clone(), i));
                        if s.is_empty() {
                            self.sites.remove(&key);
                            if let Some(n) = self.names.get_mut(&d.kind) {
                                n.remove(&d.name);
                            }
                        }
                    }
                    dirty_keys.insert(key);
                }
            }
            if let Some(f) = f {
                for (i, d) in f.declared.iter().enumerate() {
                    let key = (d.kind, d.name.clone());
                    self.sites
                        .entry(key.clone())
                        .or_default()
                        .insert((path.clone(), i));
                    self.names.entry(d.kind).or_default().insert(d.name.clone());
                    dirty_keys.insert(key);
                }
                self.files.insert(path, f);
            }
        }

        let mut dirty = Dirty::default();
        let mut names_changed: BTreeSet<Kind> = BTreeSet::new();
        if settings_changed {
            self.settings = self
                .files
                .get(SETTINGS_FILE)
                .and_then(|f| f.settings.as_ref().map(|s| s.value.clone()));
        }
        for key in &dirty_keys {
            self.redecide(key, &mut dirty, &mut names_changed);
        }
        if settings_changed {
            // The base domain and `[tls]` reach every app; re-checking an app re-checks its domains.
            dirty
                .apps
                .extend(self.names.get(&Kind::App).into_iter().flatten().cloned());
        }
        if names_changed.contains(&Kind::Plan) {
            dirty.apps.extend(self.unknown_plan.iter().cloned());
        }
        if names_changed.contains(&Kind::Runtime) {
            dirty.apps.extend(self.unknown_runtime.iter().cloned());
        }
        if names_changed.contains(&Kind::App) {
            dirty.sinks.extend(self.unknown_sinks.iter().cloned());
        }
        if names_changed.contains(&Kind::Plan) || names_changed.contains(&Kind::Node) {
            dirty.databases.extend(self.unknown_db_refs.iter().cloned());
        }
        if names_changed.contains(&Kind::Database) {
            dirty.apps.extend(self.unknown_database.iter().cloned());
        }
        for app in std::mem::take(&mut dirty.apps) {
            self.recheck_app(&app, &mut dirty);
        }
        for d in std::mem::take(&mut dirty.domains) {
            self.recheck_domain(&d);
        }
        for s in std::mem::take(&mut dirty.sinks) {
            self.recheck_sink(&s);
        }
        for e in std::mem::take(&mut dirty.endpoints) {
            self.recheck_endpoint(&e);
        }
        for db in std::mem::take(&mut dirty.databases) {
            self.recheck_database(&db);
        }
        self.output(files)
    }

    /// The declaration of `key` that counts (the first by path, then place in its file): its file and
    /// index there.
    fn winner(&self, key: &Key) -> Option<(Arc<ParsedFile>, usize)> {
        let (path, i) = self.sites.get(key)?.first()?;
        Some((self.files[path].clone(), *i))
    }

    /// Decides again which declaration of `key` counts, its duplicates' errors, its origin and its
    /// resource, and marks what reads it.
    fn redecide(&mut self, key: &Key, dirty: &mut Dirty, names_changed: &mut BTreeSet<Kind>) {
        let (kind, name) = key;
        // Duplicates: every declaration after the first.
        let mut dups = Vec::new();
        if let Some(sites) = self.sites.get(key)
            && sites.len() > 1
        {
            let mut it = sites.iter();
            let (fp, fi) = it.next().expect("non-empty");
            let ff = &self.files[fp];
            let first = ff.diag(Severity::Error, ff.declared[*fi].span.clone(), "");
            for (p, i) in it {
                let f = &self.files[p];
                let d = &f.declared[*i];
                dups.push(
                    f.diag(
                        Severity::Error,
                        d.span.clone(),
                        format!("duplicate {} `{}`", d.kind.as_str(), d.name),
                    )
                    .with_hint(format!("it is already declared at {}", first.location())),
                );
            }
        }
        set_group(&mut self.dup_diags, key.clone(), dups);

        let declared_before = self.maps.origins.contains_key(key);
        let winner = self.winner(key);
        let winner = winner.as_ref().map(|(f, i)| (f, &f.declared[*i]));
        match &winner {
            Some((f, d)) => {
                let at = f.position(d.span.start);
                self.maps.origins.insert(
                    key.clone(),
                    Origin {
                        path: f.path.clone(),
                        line: at.line,
                        col: at.col,
                    },
                );
            }
            None => {
                self.maps.origins.remove(key);
            }
        }
        if declared_before != winner.is_some() {
            names_changed.insert(*kind);
        }
        let resource = winner.as_ref().and_then(|(_, d)| d.resource.as_ref());
        if matches!(kind, Kind::Plan | Kind::Node) {
            dirty
                .databases
                .extend(self.db_users.get(key).into_iter().flatten().cloned());
        }
        match kind {
            Kind::Plan => {
                match resource {
                    Some(Resource::Plan(p)) => self.maps.plans.insert(name.clone(), p.clone()),
                    _ => self.maps.plans.remove(name),
                };
                dirty
                    .apps
                    .extend(self.plan_users.get(name).into_iter().flatten().cloned());
            }
            Kind::Runtime => {
                match resource {
                    Some(Resource::Runtime(r)) => {
                        self.maps.runtimes.insert(name.clone(), r.clone())
                    }
                    _ => self.maps.runtimes.remove(name),
                };
                dirty
                    .apps
                    .extend(self.runtime_users.get(name).into_iter().flatten().cloned());
            }
            Kind::Node => {
                self.unmark_node(name, dirty);
                match resource {
                    Some(Resource::Node(n)) => {
                        let (f, d) = winner.expect("a resource has a winner");
                        self.mark_node(name, n, f, d, dirty);
                        self.maps.nodes.insert(name.clone(), n.clone());
                    }
                    _ => {
                        self.maps.nodes.remove(name);
                    }
                }
            }
            Kind::App => {
                let was = self.maps.apps.contains_key(name);
                let before = match resource {
                    Some(Resource::App(a)) => self.maps.apps.insert(name.clone(), (**a).clone()),
                    _ => self.maps.apps.remove(name),
                };
                if before.as_ref() != self.maps.apps.get(name) {
                    self.changing.insert(name.clone());
                }
                if was != self.maps.apps.contains_key(name)
                    && let Some(s) = &self.settings
                {
                    dirty.domains.insert(format!("{name}.{}", s.base_domain));
                }
                if declared_before != winner.is_some() {
                    dirty
                        .sinks
                        .extend(self.listing_sinks.get(name).into_iter().flatten().cloned());
                }
                dirty.apps.insert(name.clone());
            }
            Kind::Notify => {
                match resource {
                    Some(Resource::Sink(s)) => self.maps.notify.insert(name.clone(), (**s).clone()),
                    _ => self.maps.notify.remove(name),
                };
                dirty.sinks.insert(name.clone());
            }
            Kind::Database => {
                match resource {
                    Some(Resource::Database(d)) => {
                        self.maps.databases.insert(name.clone(), (**d).clone())
                    }
                    _ => self.maps.databases.remove(name),
                };
                if declared_before != winner.is_some() {
                    dirty
                        .apps
                        .extend(self.database_users.get(name).into_iter().flatten().cloned());
                }
                dirty.databases.insert(name.clone());
            }
        }
    }

    /// Checks one database's references again: its plan and node.
    fn recheck_database(&mut self, name: &Name) {
        for key in self.db_marks.remove(name).into_iter().flatten() {
            remove_user(&mut self.db_users, &key, name);
        }
        self.unknown_db_refs.remove(name);
        let mut out = Vec::new();
        let mut marks = Vec::new();
        if let Some((f, i)) = self.winner(&(Kind::Database, name.clone()))
            && let Some(refs) = &f.declared[i].db_refs
        {
            for (kind, named) in [(Kind::Plan, &refs.plan), (Kind::Node, &refs.node)] {
                let Some(named) = named else { continue };
                let key = (kind, named.value.clone());
                if !self.sites.contains_key(&key) {
                    let names = self.names_of(kind);
                    out.push(diag::unknown(&f, kind, named, &names));
                }
                marks.push(key);
            }
        }
        if !out.is_empty() {
            self.unknown_db_refs.insert(name.clone());
        }
        for key in &marks {
            self.db_users
                .entry(key.clone())
                .or_default()
                .insert(name.clone());
        }
        if !marks.is_empty() {
            self.db_marks.insert(name.clone(), marks);
        }
        set_group(&mut self.db_diags, name.clone(), out);
    }

    fn unmark_node(&mut self, name: &Name, dirty: &mut Dirty) {
        let Some(mark) = self.node_marks.remove(name) else {
            return;
        };
        if let Some(r) = mark.region
            && dec(&mut self.region_count, &r)
        {
            dirty
                .apps
                .extend(self.region_users.get(&r).into_iter().flatten().cloned());
        }
        for l in mark.labels {
            if dec(&mut self.label_count, &l) {
                dirty
                    .apps
                    .extend(self.label_users.get(&l).into_iter().flatten().cloned());
            }
        }
        if let Some(e) = mark.endpoint {
            if let Some(c) = self.addr_claims.get_mut(&e) {
                c.retain(|_, (n, _, _)| n != name);
                if c.is_empty() {
                    self.addr_claims.remove(&e);
                }
            }
            dirty.endpoints.insert(e);
        }
    }

    fn mark_node(
        &mut self,
        name: &Name,
        n: &Node,
        f: &ParsedFile,
        d: &Declared,
        dirty: &mut Dirty,
    ) {
        let mut mark = NodeMark::default();
        if let Some(r) = &n.region {
            if inc(&mut self.region_count, r) {
                dirty
                    .apps
                    .extend(self.region_users.get(r).into_iter().flatten().cloned());
            }
            mark.region = Some(r.clone());
        }
        for (k, v) in &n.labels {
            let l = (k.clone(), v.clone());
            if inc(&mut self.label_count, &l) {
                dirty
                    .apps
                    .extend(self.label_users.get(&l).into_iter().flatten().cloned());
            }
            mark.labels.push(l);
        }
        if let (Some(a), Some(span)) = (&n.address, &d.address) {
            let e = a.endpoint();
            let i = f
                .declared
                .iter()
                .position(|x| std::ptr::eq(x, d))
                .expect("the declaration is in its file");
            self.addr_claims.entry(e.clone()).or_default().insert(
                (f.path.clone(), i),
                (name.clone(), a.to_string(), span.clone()),
            );
            dirty.endpoints.insert(e.clone());
            mark.endpoint = Some(e);
        }
        self.node_marks.insert(name.clone(), mark);
    }

    /// Checks one app again: its references, placement, `tls`, domains and secret sites.
    fn recheck_app(&mut self, name: &Name, dirty: &mut Dirty) {
        if let Some(m) = self.app_marks.remove(name) {
            if let Some(p) = m.plan {
                remove_user(&mut self.plan_users, &p, name);
            }
            if let Some(r) = m.runtime {
                remove_user(&mut self.runtime_users, &r, name);
            }
            if let Some(r) = m.region {
                remove_user(&mut self.region_users, &r, name);
            }
            for l in m.labels {
                remove_user(&mut self.label_users, &l, name);
            }
            for db in m.databases {
                remove_user(&mut self.database_users, &db, name);
            }
            for d in m.domains {
                if let Some(c) = self.domain_claims.get_mut(&d) {
                    c.retain(|(a, _), _| a != name);
                    if c.is_empty() {
                        self.domain_claims.remove(&d);
                    }
                }
                dirty.domains.insert(d);
            }
        }
        self.unknown_plan.remove(name);
        self.unknown_runtime.remove(name);
        self.unknown_database.remove(name);
        self.secret_sites.remove(name);
        let mut mark = AppMark::default();
        let mut ref_diags = Vec::new();
        let mut app_diags = Vec::new();
        let key = (Kind::App, name.clone());
        let winner = self.winner(&key);
        if let Some((f, i)) = &winner
            && let Some(refs) = &f.declared[*i].refs
        {
            let d = &f.declared[*i];
            if let Some(plan) = &refs.plan {
                mark.plan = Some(plan.value.clone());
                if !self.sites.contains_key(&(Kind::Plan, plan.value.clone())) {
                    self.unknown_plan.insert(name.clone());
                    let names = self.names_of(Kind::Plan);
                    ref_diags.push(diag::unknown(f, Kind::Plan, plan, &names));
                }
            }
            if let Some(rt) = &refs.runtime {
                mark.runtime = Some(rt.value.clone());
                if !self.sites.contains_key(&(Kind::Runtime, rt.value.clone())) {
                    self.unknown_runtime.insert(name.clone());
                    let names = self.names_of(Kind::Runtime);
                    ref_diags.push(diag::unknown(f, Kind::Runtime, rt, &names));
                }
            }
            if let Some(plan) = &refs.plan
                && let Some(x) = diag::too_many_replicas(f, refs, self.maps.plans.get(&plan.value))
            {
                ref_diags.push(x);
            }
            if let Some(x) = diag::default_domain_too_long(f, name, &d.span, self.settings.as_ref())
            {
                ref_diags.push(x);
            }
            for db in &refs.databases {
                mark.databases.push(db.value.clone());
                if !self.sites.contains_key(&(Kind::Database, db.value.clone())) {
                    self.unknown_database.insert(name.clone());
                    let names = self.names_of(Kind::Database);
                    ref_diags.push(diag::unknown(f, Kind::Database, db, &names));
                }
            }
            if let Some(app) = self.maps.apps.get(name) {
                let spans = refs;
                if let Some(x) = diag::tls_auto_without_tls(f, name, spans, self.settings.as_ref())
                {
                    app_diags.push(x);
                }
                if let Some(region) = &app.placement.region {
                    mark.region = Some(region.clone());
                    if let Some(span) = &spans.region
                        && !self.region_count.contains_key(region)
                    {
                        app_diags.push(diag::no_region(f, span, region));
                    }
                }
                for (k, v) in &app.placement.labels {
                    let l = (k.clone(), v.clone());
                    if !self.label_count.contains_key(&l) {
                        app_diags.push(diag::no_label(f, spans, k, v));
                    }
                    mark.labels.push(l);
                }
                for (pos, (dom, span)) in app.domains.iter().zip(&spans.domains).enumerate() {
                    let dk = dom.to_string();
                    self.domain_claims
                        .entry(dk.clone())
                        .or_default()
                        .insert((name.clone(), pos), (f.path.clone(), span.clone()));
                    dirty.domains.insert(dk.clone());
                    mark.domains.push(dk);
                }
                let tls_key = spans.tls_key.as_ref().map(|s| (f.path.clone(), s.clone()));
                let secrets: Vec<_> = spans
                    .secrets
                    .iter()
                    .map(|(k, s)| (k.clone(), f.path.clone(), s.clone()))
                    .collect();
                if tls_key.is_some() || !secrets.is_empty() {
                    self.secret_sites.insert(name.clone(), (tls_key, secrets));
                }
            }
        }
        if let Some(p) = &mark.plan {
            self.plan_users
                .entry(p.clone())
                .or_default()
                .insert(name.clone());
        }
        if let Some(r) = &mark.runtime {
            self.runtime_users
                .entry(r.clone())
                .or_default()
                .insert(name.clone());
        }
        if let Some(r) = &mark.region {
            self.region_users
                .entry(r.clone())
                .or_default()
                .insert(name.clone());
        }
        for l in &mark.labels {
            self.label_users
                .entry(l.clone())
                .or_default()
                .insert(name.clone());
        }
        for db in &mark.databases {
            self.database_users
                .entry(db.clone())
                .or_default()
                .insert(name.clone());
        }
        set_group(&mut self.ref_diags, name.clone(), ref_diags);
        set_group(&mut self.app_diags, name.clone(), app_diags);
        self.app_marks.insert(name.clone(), mark);
    }

    fn names_of(&self, kind: Kind) -> Vec<&str> {
        self.names
            .get(&kind)
            .into_iter()
            .flatten()
            .map(|n| n.as_str())
            .collect()
    }

    /// A domain's claimants (apps in name order, each app's list in order): the first owns it, the
    /// others are errors; the owner must not take another app's generated domain.
    fn recheck_domain(&mut self, domain: &str) {
        let mut out = Vec::new();
        if let Some(claims) = self.domain_claims.get(domain) {
            let mut it = claims.iter();
            let ((owner, _), (op, ospan)) = it.next().expect("non-empty claims");
            let of = &self.files[op];
            let first = of.diag(Severity::Error, ospan.clone(), "");
            for (_, (p, span)) in it {
                out.push(
                    self.files[p]
                        .diag(
                            Severity::Error,
                            span.clone(),
                            format!("domain `{domain}` is also used by app `{owner}`"),
                        )
                        .with_hint(format!("see {}", first.location())),
                );
            }
            if let Some(s) = &self.settings
                && let Some(app) = domain.strip_suffix(&format!(".{}", s.base_domain))
                && app != owner.as_str()
                && self.maps.apps.keys().any(|a| a.as_str() == app)
            {
                out.push(of.diag(
                    Severity::Error,
                    ospan.clone(),
                    format!("domain `{domain}` is app `{app}`'s generated domain"),
                ));
            }
        }
        set_group(&mut self.domain_diags, domain.to_owned(), out);
    }

    fn recheck_sink(&mut self, sink: &Name) {
        if let Some(old) = self.sink_lists.remove(sink) {
            for a in old {
                remove_user(&mut self.listing_sinks, &a, sink);
            }
        }
        self.unknown_sinks.remove(sink);
        let mut out = Vec::new();
        let mut listed = Vec::new();
        if let Some((f, i)) = self.winner(&(Kind::Notify, sink.clone())) {
            let d = &f.declared[i];
            let app_names = self.names_of(Kind::App);
            for app in &d.sink_apps {
                listed.push(app.value.clone());
                if !self.sites.contains_key(&(Kind::App, app.value.clone())) {
                    out.push(diag::unknown_sink_app(&f, sink, app, &app_names));
                }
            }
        }
        if !out.is_empty() {
            self.unknown_sinks.insert(sink.clone());
        }
        for a in &listed {
            self.listing_sinks
                .entry(a.clone())
                .or_default()
                .insert(sink.clone());
        }
        if !listed.is_empty() {
            self.sink_lists.insert(sink.clone(), listed);
        }
        set_group(&mut self.sink_diags, sink.clone(), out);
    }

    fn recheck_endpoint(&mut self, endpoint: &str) {
        let mut out = Vec::new();
        if let Some(claims) = self.addr_claims.get(endpoint) {
            let mut it = claims.iter();
            let ((fp, _), (other, _, ospan)) = it.next().expect("non-empty claims");
            let first = self.files[fp].diag(Severity::Error, ospan.clone(), "");
            for ((p, _), (_, written, span)) in it {
                out.push(
                    self.files[p]
                        .diag(
                            Severity::Error,
                            span.clone(),
                            format!("address `{written}` is also node `{other}`'s"),
                        )
                        .with_hint(format!(
                            "each node needs its own address (host and port); see {}",
                            first.location()
                        )),
                );
            }
        }
        set_group(&mut self.addr_diags, endpoint.to_owned(), out);
    }

    fn output(&mut self, files: &[Arc<ParsedFile>]) -> Loaded {
        let mut diags: Vec<Diagnostic> = Vec::new();
        for f in self.files.values() {
            diags.extend(f.diagnostics.iter().cloned());
        }
        diags.extend(self.dup_diags.values().flatten().cloned());
        diags.extend(self.addr_diags.values().flatten().cloned());
        if !self.files.contains_key(SETTINGS_FILE) {
            diags.push(
                Diagnostic::file(Severity::Error, SETTINGS_FILE, "the repository has no cairn.toml")
                    .with_hint("create cairn.toml at the repository root with at least `base_domain = \"apps.example.com\"`"),
            );
        }
        diags.extend(self.ref_diags.values().flatten().cloned());
        diags.extend(self.app_diags.values().flatten().cloned());
        diags.extend(self.domain_diags.values().flatten().cloned());
        diags.extend(self.sink_diags.values().flatten().cloned());
        diags.extend(self.db_diags.values().flatten().cloned());
        let mut diagnostics = Diagnostics(diags);
        diagnostics.sort();

        let index: BTreeMap<&str, usize> = files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.path.as_str(), i))
            .collect();
        let mut secrets = Vec::new();
        let mut tls_keys = Vec::new();
        for (app, (key, sites)) in &self.secret_sites {
            if let Some((p, span)) = key {
                tls_keys.push(TlsKeySite {
                    app: app.clone(),
                    file: index[p.as_str()],
                    span: span.clone(),
                });
            }
            for (k, p, span) in sites {
                secrets.push(SecretSite {
                    app: app.clone(),
                    key: k.clone(),
                    file: index[p.as_str()],
                    span: span.clone(),
                });
            }
        }
        let desired = match &self.settings {
            Some(settings) if !diagnostics.has_errors() => {
                let m = std::mem::take(&mut self.maps);
                self.lent = true;
                Some(Desired {
                    settings: settings.clone(),
                    plans: m.plans,
                    runtimes: m.runtimes,
                    nodes: m.nodes,
                    apps: m.apps,
                    notify: m.notify,
                    databases: m.databases,
                    origins: m.origins,
                })
            }
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
}

/// Replaces one producer's findings, keeping only non-empty groups.
fn set_group<K: Ord>(groups: &mut BTreeMap<K, Vec<Diagnostic>>, key: K, diags: Vec<Diagnostic>) {
    if diags.is_empty() {
        groups.remove(&key);
    } else {
        groups.insert(key, diags);
    }
}

fn remove_user<K: Ord>(index: &mut BTreeMap<K, BTreeSet<Name>>, key: &K, user: &Name) {
    if let Some(s) = index.get_mut(key) {
        s.remove(user);
        if s.is_empty() {
            index.remove(key);
        }
    }
}

/// Counts one more; whether the count left zero.
fn inc<K: Ord + Clone>(counts: &mut BTreeMap<K, usize>, key: &K) -> bool {
    let c = counts.entry(key.clone()).or_insert(0);
    *c += 1;
    *c == 1
}

/// Counts one less; whether the count reached zero.
fn dec<K: Ord>(counts: &mut BTreeMap<K, usize>, key: &K) -> bool {
    match counts.get_mut(key) {
        Some(c) if *c > 1 => {
            *c -= 1;
            false
        }
        Some(_) => {
            counts.remove(key);
            true
        }
        None => false,
    }
}
