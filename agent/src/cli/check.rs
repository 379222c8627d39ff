//! `vpcgate check FILE [--migrate-to OTHER]`: validate, print every problem.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{EXIT_FAILED, EXIT_OK, Output, print_json};
use crate::policy::{
    self, Checked, Policy,
    diag::{Diagnostic, Severity},
    explain,
    model::HostEssential,
};

/// `check --help`'s closing text: examples, the zones `zone = "..."` takes, exit statuses.
fn after_help() -> String {
    format!(
        "Examples:\n  \
         vpcgate check examples/policy.toml\n  \
         vpcgate check examples/policy.toml --output json\n  \
         vpcgate check old.toml --migrate-to new.toml   would old.toml's backends work on new.toml's instance?\n\n\
         Zones for `zone = \"...\"` (the provider's reserved-block table; another zone: list its blocks in \
         reserved_cidrs):\n{}\n\
         Exit status: 0 valid, 1 invalid (or a backend would fail after migration), 2 unreadable file or usage.",
        policy::reserved::zones_by_region()
    )
}

#[derive(clap::Args, Debug)]
#[command(after_help = after_help())]
pub struct Args {
    /// The policy file (TOML).
    pub file: PathBuf,
    /// Check FILE's authorizations and upstreams against OTHER's [instance] (VPC id, accessible and
    /// reserved blocks) and list every one that would fail there.
    #[arg(long, value_name = "OTHER")]
    pub migrate_to: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Serialize)]
struct Summary {
    instance: String,
    kind: policy::model::Kind,
    mode: policy::model::Mode,
    authorizations: usize,
    upstreams: usize,
    upstream_nodes: usize,
    accessible_blocks: usize,
    reserved_blocks: usize,
    /// Empty when `host_essentials = []`: DHCP and MLD are then subject to the policy.
    host_essentials: Vec<HostEssential>,
}

/// One kernel map: how many entries the policy needs of its capacity.
#[derive(Serialize)]
struct MapUse {
    map: &'static str,
    holds: &'static str,
    entries: u32,
    capacity: u32,
}

#[derive(Serialize)]
struct FileReport {
    file: String,
    valid: bool,
    errors: usize,
    warnings: usize,
    diagnostics: Vec<Diagnostic>,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<Summary>,
    /// Entries per kernel map against capacity (per generation), when the policy is valid.
    #[serde(skip_serializing_if = "Option::is_none")]
    capacity: Option<Vec<MapUse>>,
}

#[derive(Serialize)]
struct MigrateReport {
    to: String,
    /// Backends (authorizations, upstream nodes) that would fail on the new instance.
    failing: usize,
    /// Errors about them (a backend can fail for several reasons).
    errors: usize,
    diagnostics: Vec<Diagnostic>,
}

#[derive(Serialize)]
struct Report {
    #[serde(flatten)]
    file: FileReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    migrate_to: Option<FileReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    migration: Option<MigrateReport>,
}

fn summary(p: &Policy) -> Summary {
    Summary {
        instance: p.instance.name.clone(),
        kind: p.instance.kind,
        mode: p.instance.mode,
        authorizations: p.authorizations.len(),
        upstreams: p.upstreams.len(),
        upstream_nodes: p.upstreams.iter().map(|u| u.nodes.len()).sum(),
        accessible_blocks: p.accessible_blocks().count(),
        reserved_blocks: p.instance.reserved.len(),
        host_essentials: p.instance.host_essentials.clone(),
    }
}

fn file_report(c: &Checked) -> FileReport {
    FileReport {
        file: c.source.path.clone(),
        valid: c.policy.is_some(),
        errors: c.errors(),
        warnings: c.warnings(),
        diagnostics: c.diagnostics.clone(),
        summary: c.policy.as_ref().map(summary),
        capacity: c.compiled.as_ref().map(|c| {
            c.counts
                .report()
                .into_iter()
                .map(|(map, holds, entries, capacity)| MapUse {
                    map,
                    holds,
                    entries,
                    capacity,
                })
                .collect()
        }),
    }
}

fn print_file(r: &FileReport) {
    for d in &r.diagnostics {
        println!("{d}");
    }
    if let Some(s) = &r.summary {
        println!(
            "{}: valid ({} warning{}): instance {} ({}, {}), {} authorization{}, {} upstream{} ({} node{}), {} accessible block{}, {} reserved block{}{}",
            policy::diag::escape_controls(&r.file),
            r.warnings,
            plural(r.warnings),
            s.instance,
            match s.kind {
                policy::model::Kind::VpcIntegration => "vpc-integration",
                policy::model::Kind::Dedicated => "dedicated",
            },
            match s.mode {
                policy::model::Mode::Enforce => "enforce",
                policy::model::Mode::Audit => "audit",
            },
            s.authorizations,
            plural(s.authorizations),
            s.upstreams,
            plural(s.upstreams),
            s.upstream_nodes,
            plural(s.upstream_nodes),
            s.accessible_blocks,
            plural(s.accessible_blocks),
            s.reserved_blocks,
            plural(s.reserved_blocks),
            // Said only when some are off: an operator must notice that DHCP then needs a rule.
            explain::host_essentials_off(&s.host_essentials)
                .map_or(String::new(), |off| format!("; host essentials: {off}")),
        );
    }
    if let Some(maps) = &r.capacity {
        println!(
            "  {:<12} {:>7} {:>9}  holds",
            "kernel map", "entries", "capacity"
        );
        for m in maps {
            println!(
                "  {:<12} {:>7} {:>9}  {}",
                m.map, m.entries, m.capacity, m.holds
            );
        }
    }
    if r.summary.is_none() {
        println!(
            "{}: invalid: {} error{}, {} warning{}",
            policy::diag::escape_controls(&r.file),
            r.errors,
            plural(r.errors),
            r.warnings,
            plural(r.warnings)
        );
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn load(path: &Path, output: Output) -> Result<Checked, u8> {
    policy::load(path).map_err(|e| {
        super::fail(
            output,
            "unreadable_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })
}

pub fn run(args: &Args) -> u8 {
    let checked = match load(&args.file, args.output) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut report = Report {
        file: file_report(&checked),
        migrate_to: None,
        migration: None,
    };
    let mut ok = checked.policy.is_some();
    if let Some(other) = &args.migrate_to {
        let to = match load(other, args.output) {
            Ok(c) => c,
            Err(code) => return code,
        };
        if let (Some(from_p), Some(to_p)) = (&checked.policy, &to.policy) {
            let diagnostics = policy::migrate(&checked, from_p, &to, to_p);
            // Each backend's errors are positioned at the backend: count backends, not errors.
            let errors: Vec<(usize, usize)> = diagnostics
                .iter()
                .filter(|d| d.severity == Severity::Error && d.file == checked.source.path)
                .map(|d| (d.line, d.column))
                .collect();
            let failing = errors
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len();
            ok &= failing == 0;
            report.migration = Some(MigrateReport {
                to: to.source.path.clone(),
                failing,
                errors: errors.len(),
                diagnostics,
            });
        } else {
            ok = false;
        }
        report.migrate_to = Some(file_report(&to));
    }
    match args.output {
        Output::Json => {
            if let Err(code) = print_json(&report) {
                return code;
            }
        }
        Output::Text => {
            print_file(&report.file);
            if let Some(to) = &report.migrate_to {
                print_file(to);
            }
            if let Some(m) = &report.migration {
                println!("\nmigration to {}:", policy::diag::escape_controls(&m.to));
                for d in &m.diagnostics {
                    println!("{d}");
                }
                if m.failing == 0 {
                    println!("every authorization and upstream node works on the new instance");
                } else {
                    println!(
                        "{} authorization{}/upstream node{} would fail on the new instance",
                        m.failing,
                        plural(m.failing),
                        plural(m.failing)
                    );
                }
            } else if args.migrate_to.is_some() {
                println!("\nmigration not checked: both files must be valid first");
            }
        }
    }
    if ok { EXIT_OK } else { EXIT_FAILED }
}
