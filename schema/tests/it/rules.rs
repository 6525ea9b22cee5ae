//! One test per validation rule, each snapshotting exactly what the user sees.

use insta::assert_snapshot;

use crate::{BASE, load, rendered};

fn app(body: &str) -> String {
    format!(
        "[app.web]\nplan = \"small\"\nruntime = \"node\"\n{body}\n[app.web.source]\nurl = \"https://github.com/acme/web.git\"\n"
    )
}

#[test]
fn base_is_valid() {
    let l = load(&[("base.toml", BASE), ("apps/web.toml", &app(""))]);
    assert!(l.diagnostics.0.is_empty(), "{}", l.diagnostics);
    let d = l.desired.expect("valid");
    assert_eq!(d.apps.len(), 1);
    assert_eq!(
        d.default_domain(&"web".parse().unwrap()),
        "web.apps.example.com"
    );
}

#[test]
fn toml_syntax_errors_are_all_reported() {
    assert_snapshot!(rendered(&[
        ("base.toml", BASE),
        ("apps/web.toml", "[app.web\nplan = \"small\"\n"),
        ("apps/b.toml", "x = = 1\n")
    ]));
}

#[test]
fn unknown_keys_suggest_the_closest() {
    assert_snapshot!(rendered(&[
        ("base.toml", BASE),
        ("apps/web.toml", &app("replica = 2\nhelth = 1"))
    ]));
}

#[test]
fn unknown_top_level_kind() {
    assert_snapshot!(rendered(&[
        ("base.toml", BASE),
        ("apps/web.toml", "[apps.web]\nplan = \"small\"\n")
    ]));
}

#[test]
fn wrong_types() {
    assert_snapshot!(rendered(&[
        ("base.toml", BASE),
        (
            "apps/web.toml",
            &app("replicas = \"two\"\nsuspended = 1\ndomains = \"x.com\"")
        )
    ]));
}

#[test]
fn names_must_be_dns_labels() {
    assert_snapshot!(rendered(&[
        ("base.toml", BASE),
        (
            "apps/web.toml",
            &app("")
                .replace("[app.web]", "[app.Web_1]")
                .replace("[app.web.source]", "[app.Web_1.source]")
        )
    ]));
}

#[test]
fn bad_units() {
    let plans =
        "[plan.big]\ncpu = 0.0001\nmemory = \"512MB\"\ndisk = 20\nprice = -1\nmax_replicas = 0\n";
    assert_snapshot!(rendered(&[("plans.toml", plans)]));
}

#[test]
fn bad_durations() {
    assert_snapshot!(rendered(&[
        ("base.toml", BASE),
        (
            "apps/web.toml",
            &(app("") + "[app.web.health]\npath = \"healthz\"\ntimeout = \"5\"\n")
        )
    ]));
}

#[test]
fn duplicate_names_across_files() {
    assert_snapshot!(rendered(&[
        ("base.toml", BASE),
        ("apps/a.toml", &app("")),
        ("apps/b.toml", &app(""))
    ]));
}

#[test]
fn unknown_references_suggest_names() {
    let a = app("")
        .replace("plan = \"small\"", "plan = \"smal\"")
        .replace("runtime = \"node\"", "runtime = \"python\"");
    assert_snapshot!(rendered(&[("base.toml", BASE), ("apps/web.toml", &a)]));
}

#[test]
fn replicas_above_plan_max() {
    assert_snapshot!(rendered(&[
        ("base.toml", BASE),
        ("apps/web.toml", &app("replicas = 5"))
    ]));
}

#[test]
fn env_names_must_be_posix() {
    assert_snapshot!(rendered(&[
        ("base.toml", BASE),
        (
            "apps/web.toml",
            &(app("") + "[app.web.env]\n\"MY-VAR\" = \"x\"\n1ST = \"y\"\nOK = 1\n")
        )
    ]));
}

#[test]
fn invalid_domains() {
    assert_snapshot!(rendered(&[
        ("base.toml", BASE),
        (
            "apps/web.toml",
            &app("domains = [\"localhost\", \"a..b.com\", \"1.2.3.4\"]")
        )
    ]));
}

#[test]
fn duplicate_domains_and_generated_domains() {
    let b = app("domains = [\"shop.example.com\"]").replace("web", "shop");
    assert_snapshot!(rendered(&[
        ("base.toml", BASE),
        (
            "apps/web.toml",
            &app("domains = [\"shop.example.com\", \"shop.apps.example.com\"]")
        ),
        ("apps/shop.toml", &b),
    ]));
}

#[test]
fn source_urls_refuse_local_and_metadata_addresses() {
    let mut out = String::new();
    for url in [
        "http://github.com/acme/web.git",
        "file:///srv/git/web.git",
        "ext::sh -c id",
        "ext::ssh",
        "https://[::1]/x.git",
        "https://[::ffff:127.0.0.1]/x.git",
        "https://2130706433/x.git",
        "https://0x7f.1/x.git",
        "https://169.254.169.254/latest",
        "git@127.0.0.1:x",
    ] {
        let a = app("").replace("https://github.com/acme/web.git", url);
        let l = load(&[("base.toml", BASE), ("apps/web.toml", &a)]);
        assert!(l.desired.is_none(), "{url} accepted");
        out.push_str(&l.diagnostics.to_string());
    }
    assert_snapshot!(out);
}

#[test]
fn git_refs_are_data_not_options() {
    let a = app("") + "branch = \"--upload-pack=touch /tmp/x\"\nrev = \"a..b\"\n";
    assert_snapshot!(rendered(&[("base.toml", BASE), ("apps/web.toml", &a)]));
}

#[test]
fn isolation_weakening_keys_are_refused() {
    assert_snapshot!(rendered(&[
        ("base.toml", BASE),
        (
            "apps/web.toml",
            &app("privileged = true\nnetwork_mode = \"host\"\nvolumes = [\"/:/host\"]")
        )
    ]));
}

#[test]
fn secrets_must_be_armored() {
    assert_snapshot!(rendered(&[
        ("base.toml", BASE),
        (
            "apps/web.toml",
            &(app("") + "[app.web.env]\nDB = { secret = \"hunter2\" }\n")
        )
    ]));
}

#[test]
fn secret_that_does_not_decrypt_is_located_without_its_value() {
    let id = cairn_schema::Identity::generate();
    let other = cairn_schema::Identity::generate();
    let ct = cairn_schema::secret::encrypt(b"canary-7f3a", &[other.recipient()]).unwrap();
    let env = format!("[app.web.env]\nDB = {{ secret = {:?} }}\n", ct.as_str());
    let files = [
        ("base.toml", BASE.to_owned()),
        ("apps/web.toml", app("") + &env),
    ];
    let (parsed, loaded) = cairn_schema::load(
        files
            .iter()
            .map(|(p, t)| (p.to_string(), t.clone()))
            .chain([(
                "cairn.toml".to_owned(),
                "base_domain = \"apps.example.com\"\n".to_owned(),
            )]),
    );
    assert!(loaded.desired.is_some());
    let errs = cairn_schema::check_secrets(&loaded, &parsed, &id);
    assert_eq!(errs.len(), 1);
    let text = errs[0].to_string();
    assert!(
        text.starts_with("apps/web.toml:8:17: error: secret `DB` of app `web` does not decrypt"),
        "{text}"
    );
    assert!(!text.contains("canary"));
    assert!(cairn_schema::check_secrets(&loaded, &parsed, &other).is_empty());
}

#[test]
fn regions_and_labels_no_node_has_are_warnings() {
    let a = app("") + "[app.web.placement]\nregion = \"us-east\"\nlabels = { gpu = \"yes\" }\n";
    let l = load(&[("base.toml", BASE), ("apps/web.toml", &a)]);
    assert!(
        l.desired.is_some(),
        "warnings must not block: {}",
        l.diagnostics
    );
    assert_snapshot!(l.diagnostics.to_string());
}

#[test]
fn runtime_rules() {
    let rts = "[runtime.a]\nport = 80\n\n[runtime.b]\ndockerfile = true\nimage = \"x\"\ndrivers = [\"process\"]\nport = 80\n\n[runtime.c]\ndrivers = [\"podman\"]\nstart = \"x\"\nport = 0\n";
    assert_snapshot!(rendered(&[("runtimes.toml", rts)]));
}

#[test]
fn settings_rules() {
    let s = "base_domain = \"apps\"\ncurrency = \"euro\"\n[secrets]\nrecipients = [\"age1nope\"]\n";
    assert_snapshot!(rendered(&[("cairn.toml", s)]));
    assert_snapshot!(
        "missing_settings",
        cairn_schema::load([("a.toml", "")])
            .1
            .diagnostics
            .to_string()
    );
}

#[test]
fn settings_keys_in_a_manifest_point_to_cairn_toml() {
    assert_snapshot!(rendered(&[("base.toml", "base_domain = \"x.com\"\n")]));
}

#[test]
fn paths_leaving_the_repo_are_refused() {
    let l = cairn_schema::load([("../outside.toml", "")]).1;
    assert!(
        l.diagnostics
            .to_string()
            .contains("../outside.toml: error: path leaves the repository")
    );
}

#[test]
fn errors_in_one_app_do_not_hide_its_reference_errors() {
    let a = app("replica = 2").replace("plan = \"small\"", "plan = \"smal\"");
    let out = rendered(&[("base.toml", BASE), ("apps/web.toml", &a)]);
    assert!(
        out.contains("unknown key `replica`") && out.contains("unknown plan `smal`"),
        "{out}"
    );
}

/// A database's `version` is a known series, or one with a pinned release after it (an upgrade to the
/// exact release the node's binaries report); anything else is refused at the value.
#[test]
fn a_database_version_may_pin_a_release_of_a_known_series() {
    let db = |version: &str| {
        format!(
            "[database.main]\nengine = \"postgres\"\nversion = \"{version}\"\nplan = \"small\"\n"
        )
    };
    for ok in ["15", "15.18", "16.4"] {
        let l = load(&[("base.toml", BASE), ("db.toml", &db(ok))]);
        assert!(l.diagnostics.0.is_empty(), "{ok}: {}", l.diagnostics);
    }
    for bad in ["15.", "15.x", "150", "15..2", "9.6"] {
        let text = rendered(&[("base.toml", BASE), ("db.toml", &db(bad))]);
        assert!(
            text.contains(&format!("postgres has no version `{bad}` here")),
            "{bad}: {text}"
        );
    }
}
