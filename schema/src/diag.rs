//! Diagnostics: errors and warnings that point at `path:line:col`, show the offending line with a caret,
//! and carry a hint where one helps.

use std::fmt;
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
    /// The offending source line, without its newline.
    #[serde(skip)]
    pub source_line: Option<String>,
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
        let line_text = src[pos.line_start..]
            .lines()
            .next()
            .unwrap_or("")
            .trim_end_matches('\r');
        let end = span
            .end
            .min(pos.line_start + line_text.len())
            .max(span.start);
        let width = src
            .get(span.start..end)
            .map_or(1, |s| s.chars().count())
            .max(1);
        Diagnostic {
            severity,
            path: path.to_owned(),
            line: pos.line,
            col: pos.col,
            message: message.into(),
            hint: None,
            source_line: Some(line_text.to_owned()),
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
            path: path.to_owned(),
            line: 0,
            col: 0,
            message: message.into(),
            hint: None,
            source_line: None,
            width: 0,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
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
            // Tabs would misalign the caret; show them as one space each, as the column counts them.
            // Very long lines (a one-line ciphertext) are cut so the caret stays readable.
            let keep = self.col.saturating_sub(1) + MAX_SHOWN;
            let mut shown: String = line
                .chars()
                .take(keep)
                .map(|c| if c == '\t' { ' ' } else { c })
                .collect();
            if line.chars().count() > keep {
                shown.push_str(" ...");
            }
            let width = self.width.min(MAX_SHOWN);
            write!(
                f,
                "\n    {shown}\n    {}{}",
                " ".repeat(self.col.saturating_sub(1)),
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

/// Line starts of a file, so positions resolve in O(log lines) instead of rescanning the file.
#[derive(Debug, Clone, Default)]
pub struct LineIndex(Vec<usize>);

impl LineIndex {
    pub fn new(src: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(
            src.bytes()
                .enumerate()
                .filter(|&(_, b)| b == b'\n')
                .map(|(i, _)| i + 1),
        );
        LineIndex(starts)
    }

    pub fn position(&self, src: &str, offset: usize) -> Position {
        let mut offset = offset.min(src.len());
        while !src.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.0.partition_point(|&s| s <= offset).max(1);
        let line_start = self.0[line - 1];
        let col = src[line_start..offset].chars().count() + 1;
        Position {
            line,
            col,
            line_start,
        }
    }
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
    candidates
        .into_iter()
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
