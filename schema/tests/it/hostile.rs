//! Hostile input: deep nesting, huge files, random bytes. Errors, never crashes.

use proptest::prelude::*;

use crate::BASE;

#[test]
fn ten_thousand_brackets_is_an_error_not_a_stack_overflow() {
    let src = format!("x = {}", "[".repeat(10_000));
    let l = cairn_schema::load([
        ("apps/x.toml", src.as_str()),
        ("cairn.toml", "base_domain = \"a.com\""),
    ])
    .1;
    let text = l.diagnostics.to_string();
    assert!(text.starts_with("apps/x.toml:1:"), "{text}");
    assert!(text.contains("nesting deeper than 32 levels"), "{text}");
}

#[test]
fn deep_inline_tables_and_dotted_keys_are_errors() {
    for src in [
        format!("x = {}1{}", "{a = ".repeat(5000), "}".repeat(5000)),
        format!("[{}]", vec!["a"; 5000].join(".")),
        format!("{} = 1", vec!["a"; 5000].join(".")),
    ] {
        let l = cairn_schema::load([
            ("x.toml", src.as_str()),
            ("cairn.toml", "base_domain = \"a.com\""),
        ])
        .1;
        assert!(l.diagnostics.has_errors());
    }
}

#[test]
fn huge_files_are_refused_before_parsing() {
    let src = "# ".to_owned() + &"x".repeat(cairn_schema::parse::MAX_FILE_BYTES);
    let l = cairn_schema::load([
        ("x.toml", src.as_str()),
        ("cairn.toml", "base_domain = \"a.com\""),
    ])
    .1;
    assert!(
        l.diagnostics
            .to_string()
            .contains("manifests may be at most")
    );
}

#[test]
fn non_utf8_is_an_error_with_a_position() {
    let mut bytes = b"[app.web]\nplan = \"".to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe]);
    let l = cairn_schema::load([
        ("x.toml", bytes),
        ("cairn.toml", b"base_domain = \"a.com\"".to_vec()),
    ])
    .1;
    assert!(
        l.diagnostics
            .to_string()
            .contains("x.toml:2:9: error: file is not valid UTF-8"),
        "{}",
        l.diagnostics
    );
}

/// Mutates a valid manifest at random byte positions: the same entry point the fuzz target drives.
fn mutated(base: &str, edits: &[(usize, u8)]) -> Vec<u8> {
    let mut b = base.as_bytes().to_vec();
    for &(pos, byte) in edits {
        let i = pos % (b.len() + 1);
        match byte % 3 {
            0 if i < b.len() => b[i] = byte,
            1 => b.insert(i, byte),
            _ if i < b.len() => {
                b.remove(i);
            }
            _ => {}
        }
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn mutated_manifests_never_panic(edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..12)) {
        let bytes = mutated(BASE, &edits);
        let l = cairn_schema::load([("m.toml", bytes), ("cairn.toml", b"base_domain = \"a.com\"".to_vec())]).1;
        // Rendering must also be total.
        let _ = l.diagnostics.to_string();
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let l = cairn_schema::load([("m.toml", bytes.clone()), ("cairn.toml", bytes)]).1;
        let _ = l.diagnostics.to_string();
    }
}

// ---- Issue 12: untrusted text in every field ----

fn settings() -> (&'static str, &'static str) {
    ("cairn.toml", "base_domain = \"a.com\"")
}

/// A one-line TOML basic string holding exactly `s` (escapes for quotes, backslashes, control characters
/// and NUL), usable as a key too.
fn quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `path:line:col` of the first occurrence of `needle` in `src`.
fn position_of(path: &str, src: &str, needle: &str) -> String {
    let at = src.find(needle).expect("needle in src");
    let line_start = src[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = src[..at].matches('\n').count() + 1;
    format!("{path}:{line}:{}", src[line_start..at].chars().count() + 1)
}

fn web_app(body: &str) -> String {
    format!(
        "{BASE}\n[app.web]\nplan = \"small\"\nruntime = \"node\"\nsource = {{ url = \"git@github.com:acme/web.git\" }}\n{body}"
    )
}

#[test]
fn multibyte_url_host_is_an_error_not_a_panic() {
    // Panicked in schema/src/source.rs (a byte slice inside `€`): `cairn validate` exited 101.
    for url in [
        "https://€/x.git",
        "https://0€/x.git",
        "https://1.€/x.git",
        "git@€:x.git",
        "ssh://git@é€/x.git",
    ] {
        let src = format!(
            "{BASE}\n[app.web]\nplan = \"small\"\nruntime = \"node\"\nsource = {{ url = {} }}\n",
            quoted(url)
        );
        let l = cairn_schema::load([("m.toml", src.as_str()), settings()]).1;
        let text = l.diagnostics.to_string();
        assert!(text.contains("is not allowed"), "{url}: {text}");
        assert!(text.starts_with("m.toml:"), "{url}: {text}");
    }
}

#[test]
fn cpu_too_large_for_millicores_is_an_error_not_an_overflow_panic() {
    // `Decimal * 1000` panicked on overflow for a cpu near Decimal's maximum.
    for cpu in [
        "\"79228162514264337593543950335\"",
        "\"7922816251426433759354395033\"",
    ] {
        let src = BASE.replace("cpu = 0.5", &format!("cpu = {cpu}"));
        let l = cairn_schema::load([("m.toml", src.as_str()), settings()]).1;
        let text = l.diagnostics.to_string();
        assert!(text.contains("is too large"), "{cpu}: {text}");
    }
}

#[test]
fn nul_in_any_string_is_refused_with_its_position() {
    // PostgreSQL text cannot hold NUL: an env value with one left its release pending forever.
    for (body, needle) in [
        ("[app.web.env]\nA = \"x\\u0000y\"\n", "\"x\\u0000y\""),
        ("[app.web.env]\n\"A\\u0000\" = \"x\"\n", "\"A\\u0000\""),
        ("[app.web.health]\npath = \"/\\u0000\"\n", "\"/\\u0000\""),
        (
            "[app.web.placement.labels]\ndisk = \"s\\u0000\"\n",
            "\"s\\u0000\"",
        ),
    ] {
        let src = web_app(body);
        let at = position_of("m.toml", &src, needle);
        let l = cairn_schema::load([("m.toml", src.as_str()), settings()]).1;
        let text = l.diagnostics.to_string();
        assert!(l.desired.is_none(), "{body}");
        assert!(text.contains(&format!("{at}: error:")), "{body}: {text}");
        assert!(text.contains("NUL character"), "{body}: {text}");
        assert!(!text.contains('\0'), "{body}: {text:?}");
    }
    // In cairn.toml and in a build command too.
    let l = cairn_schema::load([(
        "cairn.toml",
        "base_domain = \"a.com\"\ncurrency = \"E\\u0000R\"\n",
    )])
    .1;
    assert!(
        l.diagnostics
            .to_string()
            .contains("cairn.toml:2:12: error: this string holds a NUL"),
        "{}",
        l.diagnostics
    );
    let src = BASE.replace("[\"npm ci\"]", "[\"npm\\u0000ci\"]");
    let l = cairn_schema::load([("m.toml", src.as_str()), settings()]).1;
    assert!(
        l.diagnostics.to_string().contains("holds a NUL character"),
        "{}",
        l.diagnostics
    );
}

#[test]
fn env_key_with_a_newline_cannot_forge_diagnostic_lines() {
    let src = web_app("[app.web.env]\n\"A\\nm.toml:1:1: error: forged\" = \"x\"\n");
    let l = cairn_schema::load([("m.toml", src.as_str()), settings()]).1;
    let text = l.diagnostics.to_string();
    assert_eq!(l.diagnostics.0.len(), 1, "{text}");
    assert!(
        text.contains(r"`A\nm.toml:1:1: error: forged` is not a valid environment variable name"),
        "{text}"
    );
    assert!(!text.lines().any(|l| l.starts_with("m.toml:1:1")), "{text}");
    // An escape sequence or a bidi override is shown, not sent to the terminal.
    let src = web_app("[app.web.env]\n\"A\\u001b[2J\\u202e\" = \"x\"\n");
    let text = cairn_schema::load([("m.toml", src.as_str()), settings()])
        .1
        .diagnostics
        .to_string();
    assert!(text.contains(r"`A\u{1b}[2J\u{202e}`"), "{text}");
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{202e}'),
        "{text:?}"
    );
}

#[test]
fn fifty_thousand_unknown_keys_are_reported_in_linear_time() {
    // 1 MB, 50,000 unknown keys: took 46 s (every position scanned from the file's start). Not timed here:
    // CI's run time shows a regression; the result is asserted.
    let mut src = web_app("");
    for i in 0..50_000 {
        src.push_str(&format!("unknown_key_{i:06} = 1\n"));
    }
    assert!(src.len() > 1_000_000);
    let l = cairn_schema::load([("m.toml", src.as_str()), settings()]).1;
    assert_eq!(l.diagnostics.0.len(), 50_000);
    let last = l.diagnostics.0.last().unwrap();
    assert_eq!(
        last.location(),
        position_of("m.toml", &src, "unknown_key_049999"),
        "{last}"
    );
    assert!(last.message.contains("unknown_key_049999"));
    // The same on one line (an inline table): columns count characters, and each diagnostic keeps only
    // what it shows of the line.
    let keys: Vec<String> = (0..50_000).map(|i| format!("\"é{i}\" = 1")).collect();
    let src = web_app(&format!("health = {{ {} }}\n", keys.join(", ")));
    let l = cairn_schema::load([("m.toml", src.as_str()), settings()]).1;
    assert_eq!(l.diagnostics.0.len(), 50_000);
    let d = l
        .diagnostics
        .0
        .iter()
        .find(|d| d.message.contains("`é49999`"))
        .unwrap();
    assert_eq!(
        d.location(),
        position_of("m.toml", &src, "\"é49999\""),
        "{d}"
    );
    let shown = d.to_string();
    assert!(shown.len() < 1_000, "{shown}");
    assert!(
        shown.contains("\"é49998\" = 1, \"é49999\" = 1 }\n"),
        "{shown}"
    );
    assert!(shown.contains("\n    ... "), "{shown}");
    let caret_line = shown.lines().nth(2).unwrap();
    let text_line = shown.lines().nth(1).unwrap();
    assert_eq!(
        caret_line.find('^').unwrap(),
        text_line[..text_line.find("\"é49999").unwrap()]
            .chars()
            .count(),
        "the caret is under the key:\n{shown}"
    );
}

/// Any Unicode scalar, weighted towards what breaks parsers: NUL, newlines, other controls, multibyte.
fn hostile_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => any::<char>(),
        2 => prop::sample::select(vec!['\0', '\n', '\r', '\t', '\u{1b}', '\u{7f}', '\u{85}', '\u{2028}', '\u{202e}', '\u{feff}']),
        2 => prop::sample::select(vec!['€', 'é', '𝄞', 'ß', '中', '\u{301}']),
        3 => prop::sample::select(vec!['a', '0', '.', ':', '/', '@', '[', ']', '-', 'x', '%', '"', '\\', '=', ' ']),
    ]
}

fn hostile_string() -> impl Strategy<Value = String> {
    prop::collection::vec(hostile_char(), 0..24).prop_map(String::from_iter)
}

/// Strings shaped like the values of a field (URLs, sizes, refs) with hostile text where it matters most.
fn field_value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => hostile_string(),
        1 => hostile_string().prop_map(|s| format!("https://{s}/x.git")),
        1 => (hostile_string(), hostile_string()).prop_map(|(a, b)| format!("https://{a}:{b}/x.git")),
        1 => hostile_string().prop_map(|s| format!("https://[{s}]/x.git")),
        1 => (hostile_string(), hostile_string()).prop_map(|(a, b)| format!("{a}@{b}:x.git")),
        1 => hostile_string().prop_map(|s| format!("ssh://git@{s}/x.git")),
        1 => hostile_string().prop_map(|s| format!("0x{s}")),
        1 => hostile_string().prop_map(|s| format!("1{s}MiB")),
        1 => hostile_string().prop_map(|s| format!("5{s}")),
        1 => hostile_string().prop_map(|s| format!("{s}.example.com")),
        1 => hostile_string().prop_map(|s| format!("release/{s}")),
        1 => hostile_string().prop_map(|s| format!("-----BEGIN AGE ENCRYPTED FILE-----{s}-----END AGE ENCRYPTED FILE-----")),
    ]
}

/// A repository whose every string field (keys, table names and values) is `v[i]`.
fn hostile_repo(v: &[String]) -> (String, String) {
    let q = |i: usize| quoted(&v[i % v.len()]);
    let settings = format!(
        "base_domain = {}\ncurrency = {}\n[secrets]\nrecipients = [{}]\n",
        q(0),
        q(1),
        q(2)
    );
    let manifest = format!(
        r#"[plan.small]
cpu = {}
memory = {}
disk = {}
price = {}
max_replicas = 3

[plan.{}]
cpu = 1

[runtime.node]
drivers = [{}]
image = {}
build = [{}, {}]
start = {}
port = 3000

[node.worker-1]
cpu = 4
memory = "8GiB"
disk = "100GiB"
region = {}
labels = {{ {} = {}, disk = {} }}
recipient = {}

[app.web]
plan = {}
runtime = {}
replicas = 1
domains = [{}, {}]
{} = {}
[app.web.source]
url = {}
branch = {}
rev = {}
[app.web.health]
path = {}
timeout = {}
[app.web.placement]
region = {}
labels = {{ {} = {} }}
[app.web.env]
{} = {}
PLAIN = {}
SECRET = {{ secret = {} }}
"#,
        q(3),
        q(4),
        q(5),
        q(6),
        q(7),
        q(8),
        q(9),
        q(10),
        q(11),
        q(12),
        q(13),
        q(14),
        q(15),
        q(16),
        q(17),
        q(18),
        q(19),
        q(20),
        q(21),
        q(22),
        q(23),
        q(24),
        q(25),
        q(26),
        q(27),
        q(28),
        q(29),
        q(30),
        q(31),
        q(32),
        q(33),
        q(34),
        q(35)
    );
    (settings, manifest)
}

/// A character that must never reach a terminal raw: controls, line separators, bidi overrides.
fn raw_control(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// How many lines a rendered diagnostic must take: its header, the quoted line and caret, the hint.
fn expected_lines(d: &cairn_schema::Diagnostic) -> usize {
    1 + if d.source_line.is_some() { 2 } else { 0 } + usize::from(d.hint.is_some())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, .. ProptestConfig::default() })]

    /// Arbitrary Unicode (multibyte, control characters, NUL) in every string field: never a panic, every
    /// rendered diagnostic keeps its shape (no forged line, no raw control character), a NUL anywhere is an
    /// error.
    #[test]
    fn arbitrary_unicode_in_every_string_field(v in prop::collection::vec(field_value(), 37)) {
        let (settings, manifest) = hostile_repo(&v);
        let l = cairn_schema::load([("cairn.toml", settings.as_str()), ("apps/web.toml", manifest.as_str())]).1;
        for d in &l.diagnostics.0 {
            let text = d.to_string();
            prop_assert_eq!(text.lines().count(), expected_lines(d), "{}", text);
            prop_assert!(!text.chars().any(|c| c != '\n' && raw_control(c)), "{:?}", text);
        }
        if v.iter().any(|s| s.contains('\0')) {
            prop_assert!(l.desired.is_none());
            prop_assert!(l.diagnostics.to_string().contains("NUL character"), "{}", l.diagnostics);
        }
    }

    /// The same values as raw text anywhere in a manifest (not only inside quotes).
    #[test]
    fn arbitrary_unicode_spliced_into_a_manifest(v in prop::collection::vec(field_value(), 1..6), at in prop::collection::vec(any::<prop::sample::Index>(), 1..6)) {
        let mut src = web_app("[app.web.env]\nA = \"1\"\n");
        for (s, i) in v.iter().zip(&at) {
            let mut pos = i.index(src.len() + 1);
            while !src.is_char_boundary(pos) {
                pos -= 1;
            }
            src.insert_str(pos, s);
        }
        let l = cairn_schema::load([("m.toml", src.as_str()), settings()]).1;
        for d in &l.diagnostics.0 {
            let text = d.to_string();
            prop_assert_eq!(text.lines().count(), expected_lines(d), "{}", text);
        }
    }
}

#[test]
fn extreme_numbers_in_units_are_errors_not_overflows() {
    // Every unit parser checks its arithmetic: a value at or past the edge of its type is an error at the
    // value, never an overflow (a panic with overflow checks, a wrong value without).
    for (from, to) in [
        ("cpu = 0.5", "cpu = \"79228162514264337593543950335\""),
        ("cpu = 0.5", "cpu = 1e300"),
        ("cpu = 0.5", "cpu = -79228162514264337593543950335"),
        (
            "memory = \"512MiB\"",
            "memory = \"79228162514264337593543950335PiB\"",
        ),
        (
            "memory = \"512MiB\"",
            "memory = \"18446744073709551615PiB\"",
        ),
        (
            "memory = \"512MiB\"",
            "memory = \"99999999999999999999999999999999B\"",
        ),
        (
            "price = \"5.00\"",
            "price = \"79228162514264337593543950335\"",
        ),
        (
            "price = \"5.00\"",
            "price = \"792281625142643375935439503350\"",
        ),
        ("max_replicas = 3", "max_replicas = 9223372036854775807"),
    ] {
        let src = BASE.replace(from, to);
        assert_ne!(src, BASE);
        let l = cairn_schema::load([("m.toml", src.as_str()), settings()]).1;
        let _ = l.diagnostics.to_string();
        // Decimal's maximum is a (very high) price, but nothing else here is valid.
        let valid = to == "price = \"79228162514264337593543950335\"";
        assert_eq!(
            l.diagnostics.has_errors(),
            !valid,
            "{to}: {}",
            l.diagnostics
        );
    }
    for timeout in [
        "18446744073709551615s 18446744073709551615s",
        "99999999999999999999999999h",
        "18446744073709551615ns 18446744073709551615us 18446744073709551615ms",
        "584542046091y",
    ] {
        let src = web_app(&format!("health = {{ timeout = {} }}\n", quoted(timeout)));
        let l = cairn_schema::load([("m.toml", src.as_str()), settings()]).1;
        assert!(l.diagnostics.has_errors(), "{timeout}");
        let _ = l.diagnostics.to_string();
    }
}
