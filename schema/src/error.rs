//! The one formatter of an error with its causes, for every crate above this one: errors keep their
//! source out of their `Display` text and chain it instead, and a log line, a recorded failure or a
//! commit status wants the whole chain on one line.
//!
//! What it must not do: add anything the errors do not say (no `Debug` output, no backtraces), so a
//! chain holds no more than its parts, which never carry a secret's plaintext.

use std::error::Error;
use std::fmt::Write as _;

/// `error` and its sources, `: `-separated, on one line as far as the messages are.
pub fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let _ = write!(text, ": {e}");
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn every_source_follows_its_error() {
        let e = Outer(Inner(std::io::Error::other("root")));
        assert_eq!(super::chain(&e), "outer: inner: root");
        assert_eq!(super::chain(&std::io::Error::other("alone")), "alone");
    }
}
