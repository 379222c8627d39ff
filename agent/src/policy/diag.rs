//! Diagnostics: every problem found in a policy, with its position, what is wrong, and how to fix it.

use std::{fmt, ops::Range};

use serde::Serialize;

use super::source::{Pos, Source};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
    /// How to fix it, when there is a specific fix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// `s` with every control character (ESC, CR, LF, ...) written as an escape (`\u{1b}`, `\r`, `\n`):
/// text output echoes values from the policy file and the command line, which must not be able to move
/// the cursor or forge a line such as `x.toml:1:1: valid`.
pub fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}:{}: {sev}: {}",
            escape_controls(&self.file),
            self.line,
            self.column,
            escape_controls(&self.message)
        )?;
        if let Some(fix) = &self.fix {
            write!(f, "\n    fix: {}", escape_controls(fix))?;
        }
        Ok(())
    }
}

/// At most this many characters of a message or fix: one echoing a value of a megabyte would otherwise
/// be a megabyte (and values are echoed in several messages).
pub const MAX_MESSAGE: usize = 2048;

fn bounded(s: String) -> String {
    match s.char_indices().nth(MAX_MESSAGE) {
        None => s,
        Some((cut, _)) => {
            let rest = s[cut..].chars().count();
            format!("{}… ({rest} more characters)", &s[..cut])
        }
    }
}

/// Collects diagnostics against one source.
pub struct Diags<'s> {
    pub source: &'s Source,
    pub list: Vec<Diagnostic>,
}

impl<'s> Diags<'s> {
    pub fn new(source: &'s Source) -> Self {
        Self {
            source,
            list: vec![],
        }
    }

    fn push(
        &mut self,
        severity: Severity,
        span: &Range<usize>,
        message: String,
        fix: Option<String>,
    ) {
        let pos = self.source.pos(span);
        self.push_at(severity, pos, message, fix);
    }

    pub fn push_at(&mut self, severity: Severity, pos: Pos, message: String, fix: Option<String>) {
        self.list.push(Diagnostic {
            severity,
            file: self.source.path.clone(),
            line: pos.line,
            column: pos.column,
            message: bounded(message),
            fix: fix.map(bounded),
        });
    }

    pub fn error(&mut self, span: &Range<usize>, message: impl Into<String>) {
        self.push(Severity::Error, span, message.into(), None);
    }

    pub fn error_fix(
        &mut self,
        span: &Range<usize>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.push(Severity::Error, span, message.into(), Some(fix.into()));
    }

    pub fn warning_fix(
        &mut self,
        span: &Range<usize>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.push(Severity::Warning, span, message.into(), Some(fix.into()));
    }

    pub fn has_errors(&self) -> bool {
        self.list.iter().any(|d| d.severity == Severity::Error)
    }
}
