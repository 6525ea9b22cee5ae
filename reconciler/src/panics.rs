//! What a panic in a reconcile becomes: its one-line, bounded message for the history and commit
//! statuses, and (in test builds only) the manifest marker that makes a stage panic on purpose.
//!
//! What it must not do: catch anything itself (the controller and the config source decide where a
//! panic stops), or inject a panic outside builds with the `test-panic` feature.

use std::sync::Arc;

use cairn_schema::ParsedFile;

/// How a failure caused by a panic starts, in the history and the logs.
pub const PANIC_REASON: &str = "internal error (a panic in cairn; please report it)";

/// The text a panic carried (`panic!("...")` gives a `&str` or a `String`).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message");
    // Bounded and on one line: it goes into the history and commit statuses.
    let one_line = cairn_schema::diag::escape_control(text);
    one_line.chars().take(500).collect()
}

/// With the `test-panic` feature (only the test suite builds with it), a commit whose manifests hold the
/// line `# cairn-test-panic: STAGE` panics at that stage (`validate`, `apply`, `reconcile`), standing in
/// for a bug no known input reaches any more. Without the feature this is nothing.
#[cfg(feature = "test-panic")]
pub(crate) fn inject_panic(stage: &str, files: &[Arc<ParsedFile>]) {
    let marker = format!("# cairn-test-panic: {stage}\n");
    if files.iter().any(|f| f.src.contains(&marker)) {
        panic!("injected test panic at stage `{stage}`");
    }
}
#[cfg(not(feature = "test-panic"))]
pub(crate) fn inject_panic(_stage: &str, _files: &[Arc<ParsedFile>]) {}
