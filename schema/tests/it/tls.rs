//! `cairn.toml [tls]` and an app's `tls`: defaults, the three forms, and the name sets the control plane
//! orders certificates for.

use cairn_schema::secret::encrypt;
use cairn_schema::{AppTls, Challenge, Identity, TlsMode};

use crate::{BASE, load, rendered};

fn app(extra: &str) -> String {
    format!(
        "{BASE}\n[app.web]\nplan = \"small\"\nruntime = \"node\"\ndomains = [\"www.example.org\"]\n{extra}\n\
         [app.web.source]\nurl = \"https://github.com/acme/web.git\"\n\n\
         [app.api]\nplan = \"small\"\nruntime = \"node\"\n\n[app.api.source]\nurl = \"https://github.com/acme/api.git\"\n"
    )
}

const SETTINGS: &str =
    "base_domain = \"apps.example.com\"\n\n[tls]\ncontact = \"ops@example.com\"\n";

#[test]
fn tls_settings_have_their_defaults_and_apps_default_to_auto() {
    let m = app("");
    let loaded = load(&[("cairn.toml", SETTINGS), ("apps.toml", &m)]);
    let d = loaded.desired.expect("valid");
    let tls = d.settings.tls.clone().expect("[tls]");
    assert_eq!(
        tls.acme_directory.as_str(),
        "https://acme-v02.api.letsencrypt.org/directory"
    );
    assert_eq!(tls.contact.unwrap().as_str(), "ops@example.com");
    assert_eq!(tls.challenge, Challenge::Http01);
    assert!(tls.redirect_http);
    assert!(!tls.hsts);
    assert_eq!(tls.ca_roots, None);
    let web = cairn_schema::Name::new("web").unwrap();
    assert_eq!(d.tls(&web), Some(AppTls::Mode(TlsMode::Auto)));
    let sets = d.acme_name_sets();
    assert_eq!(
        sets.iter()
            .map(|(a, n)| (a.as_str(), n.clone()))
            .collect::<Vec<_>>(),
        [
            ("api", vec!["api.apps.example.com".to_owned()]),
            (
                "web",
                vec![
                    "web.apps.example.com".to_owned(),
                    "www.example.org".to_owned()
                ]
            ),
        ]
    );
}

#[test]
fn off_and_no_tls_settings_order_nothing() {
    let m = app("tls = \"off\"");
    let d = load(&[("cairn.toml", SETTINGS), ("apps.toml", &m)])
        .desired
        .expect("valid");
    assert_eq!(d.acme_name_sets().len(), 1, "only api: web is off");
    let d = load(&[("apps.toml", &app(""))]).desired.expect("valid");
    assert!(d.acme_name_sets().is_empty(), "no [tls], no orders");
}

#[test]
fn the_tls_alpn_01_challenge_is_accepted_and_dns_01_is_refused() {
    let with = |c: &str| format!("{SETTINGS}challenge = \"{c}\"\n");
    let d = load(&[
        ("cairn.toml", &with("tls-alpn-01")),
        ("apps.toml", &app("")),
    ])
    .desired
    .expect("tls-alpn-01 is valid");
    assert_eq!(d.settings.tls.unwrap().challenge, Challenge::TlsAlpn01);
    assert_eq!(Challenge::TlsAlpn01.as_str(), "tls-alpn-01");
    let out = rendered(&[("cairn.toml", &with("dns-01")), ("apps.toml", &app(""))]);
    assert!(
        out.contains("cairn.toml:5:13: error: challenge `dns-01` is not supported yet"),
        "{out}"
    );
    assert!(
        out.contains("`\"tls-alpn-01\"`"),
        "the hint names both: {out}"
    );
}

#[test]
fn every_tls_setting_is_read() {
    let settings = "base_domain = \"apps.example.com\"\n\n[tls]\nacme_directory = \"https://localhost:14000/dir\"\n\
                    ca_roots = \"certs/test-ca.pem\"\nchallenge = \"http-01\"\nredirect_http = false\nhsts = true\n";
    let d = load(&[("cairn.toml", settings), ("apps.toml", &app(""))])
        .desired
        .expect("valid");
    let tls = d.settings.tls.unwrap();
    assert_eq!(tls.acme_directory.as_str(), "https://localhost:14000/dir");
    assert_eq!(tls.ca_roots.unwrap().as_str(), "certs/test-ca.pem");
    assert!(!tls.redirect_http);
    assert!(tls.hsts);
    assert_eq!(tls.contact, None);
}

#[test]
fn an_own_certificate_is_parsed_and_its_key_stays_a_ciphertext() {
    let id = Identity::generate();
    let ct = encrypt(b"-----BEGIN PRIVATE KEY-----", &[id.recipient()]).unwrap();
    let m = app(&format!(
        "tls = {{ cert = \"certs/web.pem\", key = {{ secret = \"\"\"{}\"\"\" }} }}",
        ct.as_str()
    ));
    let d = load(&[("apps.toml", &m)]).desired.expect("valid");
    let web = cairn_schema::Name::new("web").unwrap();
    let Some(AppTls::Own(own)) = d.tls(&web) else {
        panic!("expected an own certificate")
    };
    assert_eq!(own.cert.as_str(), "certs/web.pem");
    assert_eq!(
        id.decrypt(&own.key.secret).unwrap().expose(),
        b"-----BEGIN PRIVATE KEY-----"
    );
    assert!(d.acme_name_sets().is_empty());
}

#[test]
fn broken_tls_values_point_at_the_value() {
    let cases = [
        ("tls = \"on\"", "invalid value for `tls`: `on`"),
        (
            "tls = 1",
            "wrong type for `tls`: expected a string or a table, found integer",
        ),
        (
            "tls = { cert = \"../x.pem\", key = { secret = \"x\" } }",
            "`../x.pem` is not a path in the repository: it leaves the repository (`..`)",
        ),
        (
            "tls = { cert = \"c.pem\" }",
            "`tls` of app `web` is missing `key`",
        ),
        (
            "tls = { cert = \"c.pem\", key = \"PLAINTEXT-KEY\" }",
            "wrong type for the `tls` key: expected `{ secret = \"...\" }`, found string",
        ),
        (
            "tls = { cert = \"c.pem\", chain = \"PLAINTEXT-KEY\", key = { secret = \"x\" } }",
            "unknown key `chain`",
        ),
    ];
    for (line, want) in cases {
        let out = rendered(&[("apps.toml", &app(line))]);
        assert!(out.contains(want), "{line}: expected {want:?} in\n{out}");
        assert!(out.contains("apps.toml:"), "{out}");
        assert!(
            !out.contains("PLAINTEXT-KEY"),
            "a key's text is never echoed:\n{out}"
        );
    }
    let settings = |tls: &str| format!("base_domain = \"apps.example.com\"\n\n[tls]\n{tls}\n");
    for (tls, want) in [
        (
            "contact = \"not-an-email\"",
            "`not-an-email` is not an email address",
        ),
        (
            "challenge = \"dns-01\"",
            "challenge `dns-01` is not supported yet",
        ),
        (
            "challenge = \"carrier-pigeon\"",
            "unknown challenge `carrier-pigeon`",
        ),
        ("hsts = \"yes\"", "wrong type for `hsts`"),
        (
            "ca_roots = \"/etc/ssl/ca.pem\"",
            "write it relative to the repository root",
        ),
    ] {
        let out = rendered(&[("cairn.toml", &settings(tls)), ("apps.toml", &app(""))]);
        assert!(out.contains(want), "{tls}: expected {want:?} in\n{out}");
        assert!(out.contains("cairn.toml:4:"), "{out}");
    }
}

#[test]
fn an_own_certificate_key_for_other_recipients_fails_the_identity_check() {
    let ours = Identity::generate();
    let theirs = Identity::generate();
    let ct = encrypt(b"-----BEGIN PRIVATE KEY-----", &[theirs.recipient()]).unwrap();
    let m = app(&format!(
        "tls = {{ cert = \"certs/web.pem\", key = {{ secret = \"\"\"{}\"\"\" }} }}",
        ct.as_str()
    ));
    let files = vec![
        cairn_schema::parse_file("apps.toml", m.as_bytes()),
        cairn_schema::parse_file("cairn.toml", b"base_domain = \"apps.example.com\"\n"),
    ];
    let loaded = cairn_schema::assemble(&files);
    assert!(loaded.desired.is_some(), "{}", loaded.diagnostics);
    let found = cairn_schema::check_secrets(&loaded, &files, &ours);
    assert_eq!(found.len(), 1, "{found:?}");
    let text = found[0].to_string();
    assert!(
        text.contains("apps.toml:")
            && text.contains("the certificate key of app `web` does not decrypt"),
        "{text}"
    );
    assert!(cairn_schema::check_secrets(&loaded, &files, &theirs).is_empty());
}
