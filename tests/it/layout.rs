//! The layout ARCHITECTURE.md describes, checked: within every crate, no top-level module imports another
//! that imports it back (a `crate::b` path in module `a`'s files and a `crate::a` path in `b`'s), so each
//! crate's modules form layers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const CRATES: [&str; 10] = [
    "schema/src",
    "proto/src",
    "plan/src",
    "reconciler/src",
    "webhook/src",
    "server/src",
    "agent/src",
    "testkit/src",
    "pgdev/src",
    "src",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The modules a file names through `crate::x` or `crate::{x, y::z}` paths, comments left out.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let (mut depth, mut part) = (0usize, String::new());
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(&part));
                        part.clear();
                        continue;
                    }
                    _ => {}
                }
                part.push(c);
            }
            out.insert(ident(&part));
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|m| !m.is_empty() && m != "self" && m != "super");
    out
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cycles = Vec::new();
    for krate in CRATES {
        let src = root.join(krate);
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        assert!(!files.is_empty(), "{krate} has no source files");
        // module -> (module it names -> the first file that does)
        let mut edges: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for file in &files {
            let rel = file.strip_prefix(&src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            let top = top.trim_end_matches(".rs").to_owned();
            if top == "lib" || top == "main" {
                continue;
            }
            let text = std::fs::read_to_string(file).unwrap();
            for m in crate_paths(&text) {
                if m != top {
                    edges
                        .entry(top.clone())
                        .or_default()
                        .entry(m)
                        .or_insert_with(|| rel.display().to_string());
                }
            }
        }
        for (a, names) in &edges {
            for (b, file) in names {
                if a < b
                    && let Some(back) = edges.get(b).and_then(|n| n.get(a))
                {
                    cycles.push(format!(
                        "{krate}: {a} -> {b} ({file}) and {b} -> {a} ({back})"
                    ));
                }
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "modules importing each other:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn crate_paths_reads_single_and_grouped_imports() {
    let text = "use crate::a::X;\nuse crate::{b, c::{D, E}, self};\n// crate::commented\nlet x = crate::f::g();";
    let got: Vec<_> = crate_paths(text).into_iter().collect();
    assert_eq!(got, ["a", "b", "c", "f"]);
}
