//! Parse + validate arbitrary bytes as a repository; render every diagnostic.
//!
//! The input is split into files at each `\n#@file\n` line: the first part is `cairn.toml`, the others are
//! `m0.toml`, `m1.toml`, ... so cross-file checks (references, duplicates, domains) are reached too. The
//! seeds `scripts/test` writes (one per example repository) use the same separator. The whole input is also
//! loaded as a single manifest and as `cairn.toml`.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run parse_validate -- -max_total_time=60` (from the repo root).
#![no_main]

use libfuzzer_sys::fuzz_target;

const SEPARATOR: &[u8] = b"\n#@file\n";

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        parts.push(&rest[..i]);
        rest = &rest[i + SEPARATOR.len()..];
    }
    parts.push(rest);
    parts
}

fn check(loaded: &cairn_schema::Loaded) {
    let _ = loaded.diagnostics.to_string();
    for d in &loaded.diagnostics.0 {
        // Rendered diagnostics reach terminals and PR comments: no raw control character but newlines.
        let text = d.to_string();
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "a control character reached a rendered diagnostic: {text:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let (_, loaded) = cairn_schema::load([("m.toml", data), ("cairn.toml", data)]);
    check(&loaded);

    let parts = split(data);
    let mut files: Vec<(String, &[u8])> = vec![("cairn.toml".to_owned(), parts[0])];
    files.extend(
        parts[1..]
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("m{i}.toml"), *p)),
    );
    let (_, loaded) = cairn_schema::load(files);
    check(&loaded);
});
