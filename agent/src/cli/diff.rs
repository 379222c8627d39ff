//! `vpcgate diff NEW_FILE [--instance NAME]`: what a reload to NEW_FILE would change, rule by rule and in
//! kernel entries, and which of the removed or narrowed permissions carried traffic: the providers' "remove
//! the APIs that use an upstream before deleting it", as a warning with evidence.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
};

use serde::Serialize;

use super::{EXIT_FAILED, EXIT_OK, Output, fail, print_json, record};
use crate::{
    datapath::{Datapath, kernel_now_ns, state},
    policy::{
        check_text,
        compile::{Compiled, Rule},
        verdict::{Action, FlowFacts, Fragment, IpPacket, L4, Packet, verdict},
    },
};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  vpcgate diff /etc/vpcgate/policy.new.toml --instance gw-hz-1\n\n\
    Compares NEW_FILE with the policy the agent applied (the copy it keeps in\n\
    /run/vpcgate/<instance>.applied.toml, or --current FILE): rules added, removed and changed (by\n\
    identity: kind and name, an upstream node also by address), the kernel entries the reload would add\n\
    and remove per map, and the evidence against removals: the packets each removed or changed rule\n\
    passed (kernel counters plus earlier generations), and every observed destination the current policy\n\
    passes and NEW_FILE would drop. Changes nothing.\n\
    Exit 0: no warnings; 1: NEW_FILE is invalid, or a change would cut traffic that flowed; 2: error."
)]
pub struct Args {
    /// The policy a reload would apply.
    pub new_file: PathBuf,
    /// The instance; optional when only one is pinned.
    #[arg(long, value_name = "NAME")]
    pub instance: Option<String>,
    /// Compare with this file instead of the agent's applied copy (no traffic evidence without an
    /// instance).
    #[arg(long, value_name = "FILE")]
    pub current: Option<PathBuf>,
    /// Report format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Serialize, Clone)]
struct RuleChange {
    /// `added`, `removed` or `changed`.
    change: &'static str,
    kind: String,
    name: String,
    before: Option<String>,
    after: Option<String>,
    /// Packets the rule passed (live counters plus earlier generations), when known.
    packets: Option<u64>,
}

#[derive(Serialize)]
struct MapChange {
    map: &'static str,
    added: usize,
    removed: usize,
}

#[derive(Serialize)]
struct Warning {
    message: String,
    /// `rule` or `destination`.
    evidence: &'static str,
    packets: u64,
}

#[derive(Serialize)]
struct Diff {
    current: String,
    new: String,
    /// Changed settings (`mode: enforce -> audit`, ...).
    settings: Vec<String>,
    rules: Vec<RuleChange>,
    kernel: Vec<MapChange>,
    warnings: Vec<Warning>,
}

/// What a rule allows, in words (prefix, protocols, ports).
fn scope(r: &Rule) -> String {
    let ports: Vec<String> = r
        .ports
        .ranges()
        .iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    let protos: Vec<String> = r
        .protocols
        .iter()
        .map(|p| format!("{p:?}").to_lowercase())
        .collect();
    format!(
        "{} {} ports {}",
        r.prefix,
        protos.join("/"),
        ports.join(",")
    )
}

fn by_identity(c: &Compiled) -> BTreeMap<(String, String), &Rule> {
    c.rules
        .iter()
        .zip(record::unique_identities(c))
        .map(|(r, key)| (key, r))
        .collect()
}

fn load(path: &std::path::Path) -> Result<(Option<IpAddr>, Compiled), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let checked = check_text(&path.display().to_string(), &text);
    for d in &checked.diagnostics {
        eprintln!("{d}");
    }
    let errors = checked.errors();
    let egress = checked.policy.as_ref().and_then(|p| p.instance.egress_ip);
    checked.compiled.map(|c| (egress, c)).ok_or_else(|| {
        format!(
            "{} is invalid ({errors} error{}): `vpcgate check {}`",
            path.display(),
            if errors == 1 { "" } else { "s" },
            path.display()
        )
    })
}

/// Rule counters by identity (live, active generation) plus the record's totals.
fn rule_traffic(dp: &Datapath, rec: &record::Record) -> BTreeMap<(String, String), u64> {
    let live = dp.rule_stats().unwrap_or_default();
    rec.rules
        .iter()
        .map(|r| {
            let (p, _) = rec.total(r);
            let now = live.get(&r.id).map_or(0, |s| s.packets);
            ((r.kind.clone(), r.identity.clone()), now + p)
        })
        .collect()
}

fn probe(dst: IpAddr, proto: u8, port: u16, src: Option<IpAddr>) -> Option<Packet> {
    let l4 = match proto {
        6 => L4::Tcp { dport: port },
        17 => L4::Udp { dport: port },
        1 => L4::Icmp { kind: 8, code: 0 },
        58 => L4::Icmpv6 { kind: 128, code: 0 },
        _ => return None,
    };
    let src = src
        .filter(|s| s.is_ipv4() == dst.is_ipv4())
        .unwrap_or(if dst.is_ipv4() {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from([0u16; 8])
        });
    Some(Packet::Ip(IpPacket::new(src, dst, l4, Fragment::None)))
}

pub fn run(args: &Args) -> u8 {
    let instance = match (&args.instance, &args.current) {
        (Some(i), _) => Some(i.clone()),
        (None, Some(_)) => None,
        (None, None) => match super::status::only_instance() {
            Ok(i) => Some(i),
            Err(e) => return fail(args.output, "no_instance", e),
        },
    };
    let current_path = match (&args.current, &instance) {
        (Some(p), _) => p.clone(),
        (None, Some(i)) => record::applied_path(i),
        (None, None) => unreachable!("an instance or --current"),
    };
    let (egress_ip, old) = match load(&current_path) {
        Ok(c) => c,
        Err(e) => return fail(args.output, "unreadable_file", e),
    };
    let new = match load(&args.new_file) {
        Ok((_, c)) => c,
        Err(e) => {
            eprintln!("vpcgate: {e}");
            return EXIT_FAILED;
        }
    };
    // Evidence from the kernel, when the instance is pinned here.
    let evidence = instance.as_deref().and_then(|i| {
        let dp = Datapath::inspect(i).ok()?;
        let rec = record::read(i).ok().flatten()?;
        Some((
            rule_traffic(&dp, &rec),
            dp.destinations().unwrap_or_default(),
        ))
    });
    let (old_rules, new_rules) = (by_identity(&old), by_identity(&new));
    let mut rules = vec![];
    let keys: BTreeSet<_> = old_rules.keys().chain(new_rules.keys()).cloned().collect();
    for key in keys {
        let (o, n) = (old_rules.get(&key), new_rules.get(&key));
        let change = match (o, n) {
            (Some(_), None) => "removed",
            (None, Some(_)) => "added",
            (Some(a), Some(b)) if scope(a) != scope(b) => "changed",
            _ => continue,
        };
        let r = o.or(n).expect("one side");
        rules.push(RuleChange {
            change,
            kind: key.0.clone(),
            name: r.name.clone(),
            before: o.map(|r| scope(r)),
            after: n.map(|r| scope(r)),
            packets: evidence
                .as_ref()
                .and_then(|(t, _)| t.get(&key).copied())
                .filter(|_| o.is_some()),
        });
    }
    let (a, b) = (state::desired(&old), state::desired(&new));
    let diff_set = |x: &BTreeSet<String>, y: &BTreeSet<String>| {
        (y.difference(x).count(), x.difference(y).count())
    };
    // Entries as "key=value" strings per family: a changed value is one removed and one added.
    fn entries<V: std::fmt::Debug>(m: &BTreeMap<ipnet::IpNet, V>, v4: bool) -> BTreeSet<String> {
        m.iter()
            .filter(|(n, _)| n.addr().is_ipv4() == v4)
            .map(|(n, v)| format!("{n}={v:?}"))
            .collect()
    }
    let mut kernel = vec![];
    for (map, v4) in [("ADDR_V4", true), ("ADDR_V6", false)] {
        let (added, removed) = diff_set(&entries(&a.addr, v4), &entries(&b.addr, v4));
        kernel.push(MapChange {
            map,
            added,
            removed,
        });
    }
    for (map, v4) in [("RESERVED_V4", true), ("RESERVED_V6", false)] {
        let (added, removed) = diff_set(&entries(&a.reserved, v4), &entries(&b.reserved, v4));
        kernel.push(MapChange {
            map,
            added,
            removed,
        });
    }
    let ports = |s: &state::GenState| -> BTreeSet<String> {
        s.ports.iter().map(|(k, r)| format!("{k:?}{r}")).collect()
    };
    let (added, removed) = diff_set(&ports(&a), &ports(&b));
    kernel.push(MapChange {
        map: "PORTS",
        added,
        removed,
    });

    // Settings every packet sees (mode, host essentials, flow timeouts).
    let (ca, cb) = (state::gen_config(&old), state::gen_config(&new));
    let mut settings = vec![];
    for (what, x, y) in [
        ("mode", ca.mode, cb.mode),
        ("host_essentials", ca.host_essentials, cb.host_essentials),
        ("tcp_timeout_s", ca.tcp_timeout_s, cb.tcp_timeout_s),
        (
            "tcp_closing_timeout_s",
            ca.tcp_closing_timeout_s,
            cb.tcp_closing_timeout_s,
        ),
        ("udp_timeout_s", ca.udp_timeout_s, cb.udp_timeout_s),
    ] {
        if x != y {
            settings.push(format!(
                "{what}: {} -> {}",
                setting(what, x),
                setting(what, y)
            ));
        }
    }

    let mut warnings = vec![];
    for r in &rules {
        if r.change != "added"
            && let Some(p) = r.packets.filter(|&p| p > 0)
        {
            warnings.push(Warning {
                message: format!(
                    "{} {} {} but passed {p} packets: {}",
                    r.kind,
                    r.name,
                    if r.change == "removed" {
                        "is removed"
                    } else {
                        "changes"
                    },
                    match (&r.before, &r.after) {
                        (Some(b), Some(a)) => format!("{b} -> {a}"),
                        (Some(b), None) => format!("it allowed {b}"),
                        _ => String::new(),
                    }
                ),
                evidence: "rule",
                packets: p,
            });
        }
    }
    if let Some((_, dests)) = &evidence {
        let now = kernel_now_ns();
        let src = egress_ip;
        for d in dests.iter().filter(|d| d.passed > 0) {
            let Some(pkt) = probe(d.address, d.protocol, d.port, src) else {
                continue;
            };
            let facts = FlowFacts {
                local_origin: true,
                ..FlowFacts::default()
            };
            let (before, after) = (verdict(&old, &pkt, facts), verdict(&new, &pkt, facts));
            if before.action == Action::Pass && after.action == Action::Drop {
                let ago = now.saturating_sub(d.last_seen_ns) / 1_000_000_000;
                warnings.push(Warning {
                    message: format!(
                        "{} (protocol {}) passed {} packets, the last {ago} s ago; NEW_FILE drops it ({})",
                        std::net::SocketAddr::new(d.address, d.port),
                        d.protocol,
                        d.passed,
                        after.reason.map_or("dropped", |r| r.name())
                    ),
                    evidence: "destination",
                    packets: d.passed,
                });
            }
        }
    }
    let report = Diff {
        current: current_path.display().to_string(),
        new: args.new_file.display().to_string(),
        settings,
        rules,
        kernel,
        warnings,
    };
    match args.output {
        Output::Json => {
            if let Err(code) = print_json(&report) {
                return code;
            }
        }
        Output::Text => print_text(&report, evidence.is_some()),
    }
    if report.warnings.is_empty() {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}

fn setting(what: &str, v: u32) -> String {
    use vpcgate_common::datapath::{MODE_AUDIT, MODE_ENFORCE};
    match (what, v) {
        ("mode", MODE_ENFORCE) => "enforce".into(),
        ("mode", MODE_AUDIT) => "audit".into(),
        ("host_essentials", v) => format!("{v:#x}"),
        (_, v) => v.to_string(),
    }
}

fn print_text(d: &Diff, evidence: bool) {
    println!("{} -> {}", d.current, d.new);
    for s in &d.settings {
        println!("~ {s}");
    }
    if d.rules.is_empty() {
        println!("rules: no change");
    }
    for r in &d.rules {
        let sign = match r.change {
            "added" => "+",
            "removed" => "-",
            _ => "~",
        };
        println!(
            "{sign} {} {}: {}{}",
            r.kind,
            r.name,
            match (&r.before, &r.after) {
                (Some(b), Some(a)) => format!("{b} -> {a}"),
                (Some(b), None) => b.clone(),
                (None, Some(a)) => a.clone(),
                _ => String::new(),
            },
            r.packets
                .map(|p| format!(" ({p} packets so far)"))
                .unwrap_or_default()
        );
    }
    let entries: Vec<String> = d
        .kernel
        .iter()
        .filter(|m| m.added + m.removed > 0)
        .map(|m| format!("{} +{} -{}", m.map, m.added, m.removed))
        .collect();
    println!(
        "kernel entries: {}",
        if entries.is_empty() {
            "no change".to_owned()
        } else {
            entries.join(", ")
        }
    );
    if !evidence {
        println!("(no traffic evidence: no pinned instance with an agent record here)");
    }
    for w in &d.warnings {
        println!("⚠ {}", w.message);
    }
}
