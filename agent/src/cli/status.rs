//! `vpcgate status [--instance NAME]`: what the kernel enforces for an instance, read from its pinned
//! maps and links (so it works whether the agent runs or not), with what the agent recorded.

use std::collections::BTreeMap;

use serde::Serialize;
use vpcgate_common::datapath::{MODE_AUDIT, MODE_ENFORCE};

use super::{EXIT_OK, Output, daemon, fail, print_json, record};
use crate::datapath::{Datapath, Destination, pin};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  vpcgate status\n  vpcgate status --instance gw-hz-1 --output json\n\n\
    Reads the instance's pinned maps and links under /sys/fs/bpf/vpcgate/<instance>/ (the kernel's truth)\n\
    and the agent's record in /run/vpcgate/<instance>.json (policy file, rule names, apply time), and says\n\
    when the two disagree. Works while the agent is stopped. Without --instance, the only instance pinned.\n\
    Exit 0: reported; 1: the kernel state disagrees with the agent's record or an attachment is defunct;\n\
    2: nothing pinned, or the maps cannot be read."
)]
pub struct Args {
    /// The instance ([instance].name of its policy); optional when only one is pinned.
    #[arg(long, value_name = "NAME")]
    pub instance: Option<String>,
    /// Report format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Serialize)]
struct Attachment {
    interface: String,
    program: String,
    /// `tcx`, `clsact` or `xdp`.
    hook: String,
    /// For XDP: `native` or `generic`, as the agent recorded it.
    #[serde(skip_serializing_if = "Option::is_none")]
    xdp_mode: Option<String>,
    /// The link holds our program on that interface (false: defunct, its interface went away).
    attached: bool,
    /// tcx: our place in the interface's egress chain, "1 of N" (first is what DESIGN asks).
    #[serde(skip_serializing_if = "Option::is_none")]
    chain_position: Option<String>,
}

#[derive(Serialize)]
struct RuleRow {
    id: u32,
    kind: String,
    name: String,
    packets: u64,
    bytes: u64,
}

#[derive(Serialize)]
struct MapRow {
    map: &'static str,
    entries: u32,
    capacity: u32,
}

#[derive(Serialize)]
struct Status {
    instance: String,
    pins: String,
    agent_running: bool,
    agent_pid: Option<u32>,
    /// The running agent's readiness, from its control socket (None: not running or not answering).
    agent_ready: Option<bool>,
    /// `enforce`, `audit` or `none` (no policy applied).
    mode: &'static str,
    /// Host essentials the active generation lets pass (`dhcp`, `mld`).
    host_essentials: Vec<&'static str>,
    active_generation: Option<u8>,
    policy_file: Option<String>,
    recorded_generation: Option<u8>,
    applied_at_unix_ms: Option<u64>,
    apply_ms: Option<f64>,
    reloads_ok: u64,
    reloads_failed: u64,
    last_reload_error: Option<String>,
    /// Problems found comparing the record with the kernel (empty: consistent).
    problems: Vec<String>,
    programs: Vec<(String, u32)>,
    attachments: Vec<Attachment>,
    drops: BTreeMap<&'static str, u64>,
    audited: BTreeMap<&'static str, u64>,
    rules: Vec<RuleRow>,
    destinations: Vec<Destination>,
    maps: Vec<MapRow>,
}

pub(super) fn only_instance() -> Result<String, String> {
    let names: Vec<String> = std::fs::read_dir(pin::ROOT)
        .map_err(|e| format!("nothing pinned under {}: {e}", pin::ROOT))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(format!("no instance pinned under {}", pin::ROOT)),
        many => Err(format!(
            "several instances are pinned ({}): name one with --instance",
            many.join(", ")
        )),
    }
}

/// Whether an agent serves the instance: its control socket accepts a connection (never the lock:
/// trying it could make a starting agent or a teardown fail).
fn agent_running(instance: &str) -> bool {
    std::os::unix::net::UnixStream::connect(daemon::control_path(instance)).is_ok()
}

fn gather(instance: &str) -> Result<Status, String> {
    let mut dp = Datapath::inspect(instance).map_err(|e| e.to_string())?;
    let running = agent_running(instance);
    // A running agent answers with its live record (and readiness); else the last one it wrote.
    let live = running
        .then(|| daemon::control_call(instance, "status").ok())
        .flatten()
        .filter(|r| r["ok"] == true)
        .map(|r| r["result"].clone());
    let ready = live.as_ref().and_then(|r| r["ready"].as_bool());
    let rec = match live.and_then(|r| serde_json::from_value::<record::Record>(r).ok()) {
        Some(r) => Some(r),
        None => record::read(instance).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the agent record");
            None
        }),
    };
    let active = dp.active_generation().map_err(|e| e.to_string())?;
    let gen_state = match active {
        Some(g) => Some(dp.read_generation(g).map_err(|e| e.to_string())?),
        None => None,
    };
    let mode = match gen_state.as_ref().map(|s| s.config.mode) {
        Some(MODE_ENFORCE) => "enforce",
        Some(MODE_AUDIT) => "audit",
        Some(_) => "unknown",
        None => "none",
    };
    let mut problems = vec![];
    if let Some(r) = &rec
        && Some(r.generation) != active
    {
        problems.push(format!(
            "the agent recorded generation {} active, the kernel has {active:?}",
            r.generation
        ));
    }
    if active.is_none() {
        problems.push("no policy is active: the enforcing programs drop all IP traffic".into());
    }
    let pins_dir = dp
        .pin_dir()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let programs: Vec<(String, u32)> = dp
        .program_ids()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(n, id)| (n.to_owned(), id))
        .collect();
    let mut attachments = vec![];
    let links = std::path::Path::new(&pins_dir).join("links");
    for entry in std::fs::read_dir(&links).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((program, interface)) = name.split_once('@') else {
            continue;
        };
        let interface = pin::unescape(interface);
        if program == "clsact" {
            attachments.push(Attachment {
                interface,
                program: vpcgate_common::programs::TC_EGRESS.into(),
                hook: "clsact".into(),
                xdp_mode: None,
                attached: true,
                chain_position: Some("priority 1".into()),
            });
            continue;
        }
        let state = pin::pinned_link_state(&entry.path()).map_err(|e| e.to_string())?;
        let ours = programs
            .iter()
            .any(|(n, id)| n == program && *id == state.prog_id);
        let attached = state.ifindex != 0 && ours;
        if !attached {
            problems.push(format!(
                "{program} on {interface} is defunct (its interface went away or the link holds another program)"
            ));
        }
        let is_tc = program == vpcgate_common::programs::TC_EGRESS;
        let chain_position = if is_tc && attached {
            match dp.tc_chain_position(&interface) {
                Ok(Some((i, n))) => {
                    if i != 0 {
                        problems.push(format!(
                            "{program} on {interface} is at position {} of {n} in the egress chain, not first",
                            i + 1
                        ));
                    }
                    Some(format!("{} of {n}", i + 1))
                }
                Ok(None) => None,
                Err(e) => Some(format!("unknown: {e}")),
            }
        } else {
            None
        };
        attachments.push(Attachment {
            chain_position,
            xdp_mode: if is_tc {
                None
            } else {
                rec.as_ref().and_then(|r| {
                    r.xdp
                        .iter()
                        .find(|(i, _, _)| *i == interface)
                        .map(|(_, _, m)| m.clone())
                })
            },
            interface,
            program: program.to_owned(),
            hook: if is_tc { "tcx" } else { "xdp" }.into(),
            attached,
        });
    }
    attachments.sort_by(|a, b| (&a.interface, &a.program).cmp(&(&b.interface, &b.program)));
    let d = dp.drop_counts().map_err(|e| e.to_string())?;
    let reasons = vpcgate_common::verdict::DropReason::ALL;
    let drops = reasons
        .iter()
        .map(|r| (r.name(), d.dropped.get(r).copied().unwrap_or(0)))
        .collect();
    let audited = reasons
        .iter()
        .map(|r| (r.name(), d.audited.get(r).copied().unwrap_or(0)))
        .collect();
    let stats = dp.rule_stats().map_err(|e| e.to_string())?;
    // Rule names and earlier generations' totals come from the record of the generation now active.
    let names: BTreeMap<u32, (String, String, u64, u64)> = rec
        .iter()
        .filter(|r| Some(r.generation) == active)
        .flat_map(|r| {
            r.rules.iter().map(move |n| {
                let (p, b) = r.total(n);
                (n.id, (n.kind.clone(), n.name.clone(), p, b))
            })
        })
        .collect();
    let mut ids: Vec<u32> = stats.keys().chain(names.keys()).copied().collect();
    ids.sort();
    ids.dedup();
    let rules = ids
        .into_iter()
        .map(|id| {
            let (kind, name, p, b) = names
                .get(&id)
                .cloned()
                .unwrap_or_else(|| ("unknown".into(), format!("rule {id}"), 0, 0));
            let st = stats.get(&id).copied().unwrap_or_default();
            RuleRow {
                id,
                kind,
                name,
                packets: st.packets + p,
                bytes: st.bytes + b,
            }
        })
        .collect();
    let mut destinations = dp.destinations().map_err(|e| e.to_string())?;
    destinations.sort_by_key(|d| std::cmp::Reverse(d.passed + d.dropped + d.audited));
    destinations.truncate(daemon::TOP_DESTINATIONS);
    let maps = match &gen_state {
        Some(s) => {
            use vpcgate_common::datapath::{limits, names};
            let count = |m: Vec<&ipnet::IpNet>, v4: bool| {
                m.into_iter().filter(|n| n.addr().is_ipv4() == v4).count() as u32
            };
            [
                (
                    names::ADDR_V4,
                    count(s.addr.keys().collect(), true),
                    limits::ADDR_ENTRIES,
                ),
                (
                    names::ADDR_V6,
                    count(s.addr.keys().collect(), false),
                    limits::ADDR_ENTRIES,
                ),
                (
                    names::RESERVED_V4,
                    count(s.reserved.keys().collect(), true),
                    limits::RESERVED_ENTRIES,
                ),
                (
                    names::RESERVED_V6,
                    count(s.reserved.keys().collect(), false),
                    limits::RESERVED_ENTRIES,
                ),
                (names::PORTS, s.ports.len() as u32, limits::PORT_ENTRIES),
            ]
            .into_iter()
            .map(|(map, entries, capacity)| MapRow {
                map,
                entries,
                capacity,
            })
            .collect()
        }
        None => vec![],
    };
    Ok(Status {
        instance: instance.to_owned(),
        pins: pins_dir,
        agent_running: running,
        agent_ready: ready,
        agent_pid: rec.as_ref().filter(|_| running).map(|r| r.pid),
        mode,
        host_essentials: gen_state
            .as_ref()
            .map(|g| {
                use vpcgate_common::datapath::{ESSENTIAL_DHCP, ESSENTIAL_MLD};
                [(ESSENTIAL_DHCP, "dhcp"), (ESSENTIAL_MLD, "mld")]
                    .into_iter()
                    .filter(|(bit, _)| g.config.host_essentials & bit != 0)
                    .map(|(_, n)| n)
                    .collect()
            })
            .unwrap_or_default(),
        active_generation: active,
        policy_file: rec.as_ref().map(|r| r.policy_file.clone()),
        recorded_generation: rec.as_ref().map(|r| r.generation),
        applied_at_unix_ms: rec.as_ref().map(|r| r.applied_at_unix_ms),
        apply_ms: rec.as_ref().map(|r| r.apply_ms),
        reloads_ok: rec.as_ref().map_or(0, |r| r.reloads_ok),
        reloads_failed: rec.as_ref().map_or(0, |r| r.reloads_failed),
        last_reload_error: rec.as_ref().and_then(|r| r.last_reload_error.clone()),
        problems,
        programs,
        attachments,
        drops,
        audited,
        rules,
        destinations,
        maps,
    })
}

pub fn run(args: &Args) -> u8 {
    let instance = match args.instance.clone().map_or_else(only_instance, Ok) {
        Ok(i) => i,
        Err(e) => return fail(args.output, "no_instance", e),
    };
    let status = match gather(&instance) {
        Ok(s) => s,
        Err(e) => return fail(args.output, "unreadable_state", e),
    };
    match args.output {
        Output::Json => {
            if let Err(code) = print_json(&status) {
                return code;
            }
        }
        Output::Text => print_text(&status),
    }
    if status.problems.is_empty() {
        EXIT_OK
    } else {
        super::EXIT_FAILED
    }
}

fn print_text(s: &Status) {
    println!(
        "instance {} ({}), mode {}{}, generation {}; agent {}",
        s.instance,
        s.pins,
        s.mode,
        if s.host_essentials.is_empty() {
            String::new()
        } else {
            format!(" (host essentials: {})", s.host_essentials.join(", "))
        },
        s.active_generation
            .map_or("none".to_owned(), |g| g.to_string()),
        if s.agent_running {
            format!("running (pid {})", s.agent_pid.unwrap_or(0))
        } else {
            "not running (enforcement continues from the pinned state)".to_owned()
        }
    );
    if let Some(f) = &s.policy_file {
        println!(
            "policy {f}: applied in {:.1} ms; reloads {} ok, {} failed{}",
            s.apply_ms.unwrap_or(0.0),
            s.reloads_ok,
            s.reloads_failed,
            s.last_reload_error
                .as_ref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        );
    }
    for p in &s.problems {
        println!("✗ {p}");
    }
    println!("attachments:");
    for a in &s.attachments {
        println!(
            "  {} {:<20} {}{}{} {}",
            if a.attached { "✓" } else { "✗" },
            a.interface,
            a.hook,
            a.xdp_mode
                .as_ref()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default(),
            a.chain_position
                .as_ref()
                .map(|p| format!(" [{p}]"))
                .unwrap_or_default(),
            a.program
        );
    }
    println!(
        "programs: {}",
        s.programs
            .iter()
            .map(|(n, id)| format!("{n} #{id}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let drops: Vec<String> = s
        .drops
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    println!(
        "drops: {}",
        if drops.is_empty() {
            "none".to_owned()
        } else {
            drops.join(", ")
        }
    );
    println!("rules:");
    for r in &s.rules {
        println!(
            "  {:<28} {:<13} {:>12} packets {:>14} bytes",
            r.name, r.kind, r.packets, r.bytes
        );
    }
    if !s.destinations.is_empty() {
        println!("busiest destinations:");
        for d in &s.destinations {
            println!(
                "  {} proto {}: passed {}, dropped {}{}, syn {} syn-ack {} rst {} icmp {}",
                std::net::SocketAddr::new(d.address, d.port),
                d.protocol,
                d.passed,
                d.dropped,
                d.last_reason
                    .map(|r| format!(" ({})", r.name()))
                    .unwrap_or_default(),
                d.syn_sent,
                d.syn_ack,
                d.rst,
                d.icmp_errors
            );
        }
    }
    println!("kernel maps:");
    for m in &s.maps {
        println!("  {:<12} {:>7} / {}", m.map, m.entries, m.capacity);
    }
}
