//! Parse + validate arbitrary bytes as a manifest and as cairn.toml; render every diagnostic.
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run parse_validate -- -max_total_time=60` (from the repo root).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (_, loaded) = cairn_schema::load([("m.toml", data), ("cairn.toml", data)]);
    let _ = loaded.diagnostics.to_string();
});
