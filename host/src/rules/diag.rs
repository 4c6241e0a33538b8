//! Mistakes found in rule files, each with the place and the fix.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use super::yaml::Span;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One mistake (or a warning) in a rule file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// What is wrong, naming the thing.
    pub message: String,
    /// How to fix it, when there is a clear fix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Diagnostic {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// `file:line:column`, the form editors and terminals link.
    pub fn location(&self) -> String {
        format!("{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}: {level}: {}", self.location(), self.message)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n  fix: {fix}")?;
        }
        Ok(())
    }
}

/// Collects the diagnostics of one file while it is decoded.
#[derive(Debug)]
pub struct Sink {
    pub file: PathBuf,
    pub diagnostics: Vec<Diagnostic>,
}

impl Sink {
    pub fn new(file: impl Into<PathBuf>) -> Self {
        Sink {
            file: file.into(),
            diagnostics: Vec::new(),
        }
    }

    pub fn error(&mut self, span: Span, message: impl Into<String>, fix: Option<String>) {
        self.push(Severity::Error, span, message.into(), fix);
    }

    pub fn warning(&mut self, span: Span, message: impl Into<String>, fix: Option<String>) {
        self.push(Severity::Warning, span, message.into(), fix);
    }

    fn push(&mut self, severity: Severity, span: Span, message: String, fix: Option<String>) {
        self.diagnostics.push(Diagnostic {
            severity,
            file: self.file.clone(),
            line: span.line,
            column: span.column,
            message,
            fix,
        });
    }

    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// The valid word nearest to a misspelt one, if it is close enough to be a
/// likely typo (`entity_type` → `entity_types`).
pub fn nearest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::nearest;

    #[test]
    fn nearest_suggests_close_words_only() {
        let keys = ["entity_types", "events", "scope", "webhook"];
        assert_eq!(nearest("entity_type", &keys), Some("entity_types"));
        assert_eq!(nearest("event", &keys), Some("events"));
        assert_eq!(nearest("webhok", &keys), Some("webhook"));
        assert_eq!(nearest("colour", &keys), None);
    }
}
