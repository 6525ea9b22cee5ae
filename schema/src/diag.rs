//! Diagnostics: errors and warnings that point at `path:line:col`, show the offending line with a caret,
//! and carry a hint where one helps.
//!
//! Diagnostics echo user text (keys, values, file names) into terminals, logs, commit statuses and PR
//! comments, so control characters in a message, hint or path are escaped when the diagnostic is built
//! (`\n`, `\u{0}`), and the quoted source line shows them as U+FFFD: a key holding a newline can never
//! forge a line of output. Positions resolve through a [`LineIndex`] in time independent of where in the
//! file they are, and a diagnostic keeps only the part of a long line it shows, so the cost of many
//! diagnostics is linear in their number.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::ops::Range;

use serde::Serialize;

/// How bad a diagnostic is. Errors make a repository invalid; warnings do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One finding about one place in one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Repository-relative path with `/` separators.
    pub path: String,
    /// 1-based line; 0 when the finding concerns the whole file.
    pub line: usize,
    /// 1-based column in characters; 0 when the finding concerns the whole file.
    pub col: usize,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// The part of the offending source line a rendering shows (the whole line unless it is long),
    /// without its newline. Raw text: [`Display`](fmt::Display) masks its control characters.
    #[serde(skip)]
    pub source_line: Option<String>,
    /// How many characters of the line come before `source_line` (0 unless the line was cut).
    #[serde(skip)]
    pub shown_from: usize,
    /// Width of the caret underline in characters.
    #[serde(skip)]
    pub width: usize,
}

impl Diagnostic {
    /// A diagnostic at a byte span of `src`.
    pub fn at(
        severity: Severity,
        path: &str,
        src: &str,
        span: Range<usize>,
        message: impl Into<String>,
    ) -> Self {
        Self::at_position(
            severity,
            path,
            src,
            Position::of(src, span.start),
            span,
            message,
        )
    }

    /// As [`Diagnostic::at`], with the position already resolved (through a [`LineIndex`]).
    pub fn at_position(
        severity: Severity,
        path: &str,
        src: &str,
        pos: Position,
        span: Range<usize>,
        message: impl Into<String>,
    ) -> Self {
        let line_start = pos.line_start.min(src.len());
        let rest = src.get(line_start..).unwrap_or("");
        let line_text = rest
            .find('\n')
            .map_or(rest, |i| &rest[..i])
            .trim_end_matches('\r');
        let start = span.start.clamp(line_start, line_start + line_text.len());
        let end = span.end.min(line_start + line_text.len()).max(start);
        // Only what Display can show is kept (and counted): a diagnostic on a megabyte-long line must not
        // copy or scan the whole line, or many of them cost the square of the file's size.
        let width = src
            .get(start..end)
            .map_or(1, |s| s.chars().take(MAX_SHOWN + 1).count())
            .max(1);
        let (shown_from, source_line) = window(line_text, start - line_start, pos.col);
        Diagnostic {
            severity,
            path: escape_control(path).into_owned(),
            line: pos.line,
            col: pos.col,
            message: escape_control(&message.into()).into_owned(),
            hint: None,
            source_line: Some(source_line),
            shown_from,
            width,
        }
    }

    /// An error at a byte span of `src`.
    pub fn error(path: &str, src: &str, span: Range<usize>, message: impl Into<String>) -> Self {
        Self::at(Severity::Error, path, src, span, message)
    }

    /// A finding about a whole file (no line to point at).
    pub fn file(severity: Severity, path: &str, message: impl Into<String>) -> Self {
        Diagnostic {
            severity,
            path: escape_control(path).into_owned(),
            line: 0,
            col: 0,
            message: escape_control(&message.into()).into_owned(),
            hint: None,
            source_line: None,
            shown_from: 0,
            width: 0,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(escape_control(&hint.into()).into_owned());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// `path:line:col` (or just `path` for whole-file findings).
    pub fn location(&self) -> String {
        if self.line == 0 {
            self.path.clone()
        } else {
            format!("{}:{}:{}", self.path, self.line, self.col)
        }
    }
}

impl fmt::Display for Diagnostic {
    /// ```text
    /// apps/web.toml:3:8: error: unknown plan `smal`
    ///     plan = "smal"
    ///            ^^^^^^
    ///   hint: did you mean `small`?
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}: {sev}: {}", self.location(), self.message)?;
        if let Some(line) = &self.source_line {
            // Tabs would misalign the caret; show them as one space each, as the column counts them. Other
            // control characters (a newline inside a key, NUL, escape sequences) show as one U+FFFD each, so
            // the quoted line can neither forge lines nor drive a terminal, and the caret stays aligned.
            // Very long lines (a one-line ciphertext) are cut so the caret stays readable.
            let caret = self.col.saturating_sub(1).saturating_sub(self.shown_from);
            let keep = caret + MAX_SHOWN;
            let mut shown = String::new();
            if self.shown_from > 0 {
                shown.push_str("... ");
            }
            let mut chars = line.chars();
            shown.extend(chars.by_ref().take(keep).map(|c| match c {
                '\t' => ' ',
                c if needs_escape(c) => '\u{FFFD}',
                c => c,
            }));
            if chars.next().is_some() {
                shown.push_str(" ...");
            }
            let pad = caret + if self.shown_from > 0 { 4 } else { 0 };
            let width = self.width.min(MAX_SHOWN);
            write!(
                f,
                "\n    {shown}\n    {}{}",
                " ".repeat(pad),
                "^".repeat(width)
            )?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// How many characters of a source line are shown after the column a diagnostic points at.
const MAX_SHOWN: usize = 60;
/// How many characters before the column are shown at most; a line cut there starts with `... `.
const MAX_BEFORE: usize = 60;

/// The part of `line` a rendering shows around byte `at` (character column `col`, 1-based): at most
/// [`MAX_BEFORE`] characters before it and [`MAX_SHOWN`] after, plus one so Display knows the line goes on.
/// Returns how many characters were skipped at the start, and the kept text. Bounded work, whatever the
/// length of the line.
fn window(line: &str, at: usize, col: usize) -> (usize, String) {
    let mut at = at.min(line.len());
    while !line.is_char_boundary(at) {
        at -= 1;
    }
    let before = col.saturating_sub(1);
    let (skip, from) = if before > MAX_BEFORE {
        // Walk back MAX_BEFORE characters from the column (bounded), not forward from the line's start.
        let from = line[..at]
            .char_indices()
            .rev()
            .nth(MAX_BEFORE - 1)
            .map_or(0, |(i, _)| i);
        (before.saturating_sub(line[from..at].chars().count()), from)
    } else {
        (0, 0)
    };
    let kept: String = line[from..]
        .chars()
        .take(before - skip + MAX_SHOWN + 1)
        .collect();
    (skip, kept)
}

/// Whether a character must not reach a terminal or a rendered comment as it is: control characters
/// (C0, DEL, C1), line and paragraph separators, and the bidirectional overrides that reorder what a reader
/// sees.
pub fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        )
}

/// `s` with every character [`needs_escape`] names written as an escape (`\n`, `\t`, `\u{1b}`), so user
/// text echoed in a diagnostic stays on its line and shows what it really holds.
pub fn escape_control(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A resolved line/column position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub col: usize,
    pub line_start: usize,
}

impl Position {
    /// Line and character column (both 1-based) of byte `offset` in `src`.
    pub fn of(src: &str, offset: usize) -> Position {
        let mut offset = offset.min(src.len());
        while !src.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &src[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
        let col = src[line_start..offset].chars().count() + 1;
        Position {
            line,
            col,
            line_start,
        }
    }
}

/// Line starts of a file, and character counts at every `BLOCK` bytes, so a position resolves in
/// O(log lines + BLOCK) instead of rescanning the file or its line: many diagnostics on one long line (a
/// generated inline table) stay linear.
#[derive(Debug, Clone)]
pub struct LineIndex {
    starts: Vec<usize>,
    /// `chars[k]`: how many characters start before byte `k * BLOCK`.
    chars: Vec<usize>,
}

const BLOCK: usize = 256;

impl Default for LineIndex {
    /// The index of an empty file (one line starting at 0), so a position is always defined.
    fn default() -> Self {
        LineIndex::new("")
    }
}

impl LineIndex {
    pub fn new(src: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(
            src.bytes()
                .enumerate()
                .filter(|&(_, b)| b == b'\n')
                .map(|(i, _)| i + 1),
        );
        let mut chars = Vec::with_capacity(src.len() / BLOCK + 2);
        let mut n = 0;
        for block in src.as_bytes().chunks(BLOCK) {
            chars.push(n);
            n += char_starts(block);
        }
        chars.push(n);
        LineIndex { starts, chars }
    }

    /// How many characters start before byte `offset` (at most `src.len()`).
    fn chars_before(&self, src: &str, offset: usize) -> usize {
        let bytes = src.as_bytes();
        let block = offset / BLOCK;
        match self.chars.get(block) {
            Some(&base) if block * BLOCK <= offset => {
                base + char_starts(&bytes[block * BLOCK..offset])
            }
            // An index built for another text: still an answer, by scanning.
            _ => char_starts(&bytes[..offset]),
        }
    }

    pub fn position(&self, src: &str, offset: usize) -> Position {
        let mut offset = offset.min(src.len());
        while !src.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        let line_start = self.starts.get(line - 1).copied().unwrap_or(0).min(offset);
        let col = self.chars_before(src, offset) - self.chars_before(src, line_start) + 1;
        Position {
            line,
            col,
            line_start,
        }
    }
}

/// How many characters start in `bytes` (bytes that are not UTF-8 continuation bytes).
fn char_starts(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b & 0xC0 != 0x80).count()
}

/// Every finding of a load, errors first within each file, files in path order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn has_errors(&self) -> bool {
        self.0.iter().any(Diagnostic::is_error)
    }

    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter().filter(|d| d.is_error())
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter().filter(|d| !d.is_error())
    }

    pub(crate) fn sort(&mut self) {
        self.0.sort_by(|a, b| {
            (&a.path, a.line, a.col, a.severity, &a.message)
                .cmp(&(&b.path, b.line, b.col, b.severity, &b.message))
        });
        self.0.dedup();
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            writeln!(f, "{d}")?;
        }
        Ok(())
    }
}

/// The closest candidate to `word`, if one is close enough to be a plausible typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    // Candidates are short keys and names; a long word is no typo of one, and comparing it would cost its
    // length times theirs in time and memory.
    if word.len() > 100 {
        return None;
    }
    let len = word.chars().count();
    candidates
        .into_iter()
        // The distance is at least the difference in length: skip what cannot pass the filter below
        // without computing it (one unknown key is cheap; 50,000 of them should be too).
        .filter(|c| len.abs_diff(c.chars().count()) <= 2.max(c.len() / 3))
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|&(d, c)| d <= 2.max(c.len() / 3) && d < c.len().max(word.len()))
        .min_by_key(|&(d, c)| (d, c))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_counts_characters_not_bytes() {
        let src = "a = 1\nnamé = \"x\"\n";
        let off = src.find('=').unwrap();
        assert_eq!(Position::of(src, off).line, 1);
        let off = src.rfind('=').unwrap();
        let p = Position::of(src, off);
        assert_eq!((p.line, p.col), (2, 6));
    }

    #[test]
    fn line_index_agrees_with_a_scan() {
        let src = "a\nbé\n\nccc\n";
        let idx = LineIndex::new(src);
        for off in 0..=src.len() {
            if src.is_char_boundary(off) {
                assert_eq!(
                    idx.position(src, off),
                    Position::of(src, off),
                    "offset {off}"
                );
            }
        }
    }

    #[test]
    fn did_you_mean_finds_typos_only() {
        assert_eq!(
            did_you_mean("smal", ["small", "medium", "large"]),
            Some("small")
        );
        assert_eq!(did_you_mean("xyz", ["small", "medium", "large"]), None);
        assert_eq!(
            did_you_mean("replica", ["replicas", "plan"]),
            Some("replicas")
        );
    }
}
