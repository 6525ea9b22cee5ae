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
