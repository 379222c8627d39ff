//! The policy: file model, validation, compilation into datapath entries, and the reference verdict.

pub mod compile;
pub mod diag;
pub mod explain;
pub mod model;
pub mod parse;
pub mod ports;
pub mod reserved;
pub mod source;
pub mod validate;
pub mod verdict;
mod walk;

use std::path::Path;

use diag::{Diagnostic, Diags, Severity};
use ipnet::IpNet;
pub use model::Policy;
use source::Source;

/// A policy file checked: every diagnostic, and when there is no error the policy and its compiled form
/// (which fits the kernel maps: `valid` means `run` applies it).
#[derive(Clone, Debug)]
pub struct Checked {
    pub source: Source,
    pub policy: Option<Policy>,
    pub compiled: Option<compile::Compiled>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Checked {
    pub fn errors(&self) -> usize {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count()
    }

    pub fn warnings(&self) -> usize {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Warning)
            .count()
    }
}

/// Parses and validates policy text; `path` names it in diagnostics. Capacity is the kernel maps'.
pub fn check_text(path: &str, text: &str) -> Checked {
    check_text_with_limits(path, text, compile::Limits::KERNEL)
}

/// `check_text` against other capacities: tests exercise the capacity rules at sizes that check in
/// milliseconds (the kernel's hold a million rules).
pub fn check_text_with_limits(path: &str, text: &str, limits: compile::Limits) -> Checked {
    let source = Source::new(path, text);
    let mut d = Diags::new(&source);
    // Field errors may have left entries out: still check what was read, and "outside the accessible
    // blocks" whenever every block was read. Any error at all and no policy comes back.
    let parse::Read {
        mut policy,
        accessible_known,
    } = parse::parse(&mut d, &source);
    if let Some(p) = &policy {
        validate::validate(&mut d, p, accessible_known);
    }
    // The compile `run` does, with the kernel maps' capacities: a policy that does not fit is invalid.
    let mut compiled = None;
    if let Some(p) = policy.as_ref().filter(|_| !d.has_errors()) {
        match compile::Compiled::with_limits(p, limits) {
            // Port tables are named in the kernel by a 64-bit hash of their content: two that collide
            // would be refused by `run`, so `check` refuses them too.
            Ok(c) => match crate::datapath::plan::check_table_ids(&c, None) {
                Ok(()) => compiled = Some(c),
                Err(e) => d.push_at(
                    Severity::Error,
                    source::Pos { line: 1, column: 1 },
                    e.to_string(),
                    Some("edit a port range of either table, or move one of their rules in the file (tables carry rule numbers): a 64-bit collision should practically never happen".into()),
                ),
            },
            Err(e) => d.push_at(Severity::Error, e.pos, e.message, Some(e.fix)),
        }
    }
    if d.has_errors() {
        policy = None;
    }
    let mut diagnostics = d.list;
    diagnostics.sort_by_key(|d| (d.line, d.column));
    Checked {
        source,
        policy,
        compiled,
        diagnostics,
    }
}

/// Reads and checks a policy file. Bytes that are not UTF-8 are a policy error at the first of them (the
/// rest of the file is still checked, each such sequence read as U+FFFD); only a file that cannot be
/// read at all is an I/O error.
pub fn load(path: &Path) -> std::io::Result<Checked> {
    let bytes = std::fs::read(path)?;
    Ok(check_bytes(&path.display().to_string(), &bytes))
}

/// [`check_text`] for a file's bytes.
pub fn check_bytes(path: &str, bytes: &[u8]) -> Checked {
    let e = match std::str::from_utf8(bytes) {
        Ok(text) => return check_text(path, text),
        Err(e) => e,
    };
    let text = String::from_utf8_lossy(bytes);
    let mut checked = check_text(path, &text);
    let at = e.valid_up_to();
    // The text before the first invalid byte is the same in `text`: so is the position.
    let (line, column) = checked.source.line_col(at);
    let more = match invalid_bytes(bytes) {
        0 | 1 => String::new(),
        2 => " (1 more invalid byte follows)".to_owned(),
        n => format!(" ({} more invalid bytes follow)", n - 1),
    };
    checked.diagnostics.push(Diagnostic {
        severity: Severity::Error,
        file: path.to_owned(),
        line,
        column,
        message: format!(
            "byte 0x{:02x} is not UTF-8{more}: a policy file is UTF-8 text",
            bytes[at]
        ),
        fix: Some(
            "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or remove the byte".into(),
        ),
    });
    checked.diagnostics.sort_by_key(|d| (d.line, d.column));
    checked.policy = None;
    checked.compiled = None;
    checked
}

/// How many bytes of `bytes` are in sequences that are not UTF-8.
fn invalid_bytes(mut bytes: &[u8]) -> usize {
    let mut n = 0;
    while let Err(e) = std::str::from_utf8(bytes) {
        let bad = e.error_len().unwrap_or(bytes.len() - e.valid_up_to());
        n += bad;
        bytes = &bytes[e.valid_up_to() + bad..];
    }
    n
}

/// The provider's "change the instance of an API group" check: `from`'s authorizations and upstreams
/// against `to`'s instance. Diagnostics point into `from`; the egress-IP reminder points into `to`.
pub fn migrate(
    from: &Checked,
    from_policy: &Policy,
    to: &Checked,
    to_policy: &Policy,
) -> Vec<Diagnostic> {
    let mut d = Diags::new(&from.source);
    let accessible: Vec<IpNet> = to_policy.accessible_blocks().collect();
    validate::check_backends(&mut d, from_policy, &to_policy.instance, &accessible, true);
    let mut out = d.list;
    let (a, b) = (&from_policy.instance, &to_policy.instance);
    let describe = |i: &model::Instance| match i.egress_ip {
        Some(ip) => ip.to_string(),
        None => format!("the primary address of {}", i.interface),
    };
    if a.egress_ip != b.egress_ip || a.interface != b.interface || a.kind != b.kind {
        let mut d = Diags::new(&to.source);
        d.push_at(
            Severity::Warning,
            if b.egress_ip.is_some() { b.egress_pos } else { source::Pos { line: 1, column: 1 } },
            format!(
                "the egress IP changes from {} (instance {}) to {} (instance {})",
                describe(a),
                a.name,
                describe(b),
                b.name
            ),
            Some(format!(
                "add {} to every backend's security group / access control allowlist before migrating, \
                 or connections from the new instance will time out",
                describe(b)
            )),
        );
        out.extend(d.list);
    }
    out
}
