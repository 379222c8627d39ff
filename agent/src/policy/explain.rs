//! Explaining a verdict to an operator: the deciding rule, and for a drop the smallest policy change that
//! would allow the packet.

use std::{cmp::Reverse, net::IpAddr};

use ipnet::IpNet;
use serde::Serialize;
use vpcgate_common::{
    icmp::{ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST},
    verdict::DropReason,
};

use super::{
    compile::{Compiled, Rule, RuleKind, proto_index},
    model::{HostEssential, Kind, Policy, Proto, Reserved, ReservedSource},
    verdict::{Basis, Fragment, IpPacket, L4, Packet, Verdict},
};

fn host(addr: IpAddr) -> IpNet {
    IpNet::from(addr)
}

/// One sentence on why, naming the rule or block.
pub fn detail(c: &Compiled, path: &str, pkt: &Packet, v: &Verdict) -> String {
    let rule_at = |id| {
        c.rule(id).map_or_else(
            || format!("rule {id}"),
            |r| {
                format!(
                    "{} ({path}:{}, verdict rule {})",
                    r.describe(),
                    r.pos.line,
                    r.kind.verdict_rule()
                )
            },
        )
    };
    let dst = match pkt {
        Packet::Ip(ip) => ip.dst.to_string(),
        _ => String::new(),
    };
    match v.basis {
        Basis::NotIp => "not IPv4/IPv6: passes unevaluated (rule 1)".into(),
        Basis::NeighbourDiscovery => {
            "ICMPv6 neighbour discovery (hop limit 255, link-scope or on-link destination) passes (rule 1)"
                .into()
        }
        Basis::HostEssential(e) => format!(
            "host essential {} passes whatever the policy says (rule 1; `[instance] host_essentials`)",
            match e {
                crate::policy::verdict::HostEssentialKind::Dhcpv4 => "dhcp (DHCPv4 client traffic)",
                crate::policy::verdict::HostEssentialKind::Dhcpv6 => "dhcp (DHCPv6 client traffic)",
                crate::policy::verdict::HostEssentialKind::Mld => "mld (MLDv2 listener report)",
            }
        ),
        Basis::Malformed => "truncated or malformed header (rule 2)".into(),
        Basis::SourceRouted => {
            "source-routed (IPv4 LSRR/SSRR option or IPv6 routing header with segments left): its real destination is not the one checked (rule 2)".into()
        }
        Basis::Reply => "reply in a flow a peer initiated toward the gateway (rule 3)".into(),
        Basis::Reserved(i) => {
            let r = &c.reserved[i];
            format!(
                "{dst} is inside reserved block {} ({}, {path}:{}) (rule 4)",
                r.cidr, r.source, r.pos.line
            )
        }
        Basis::Rule(id) => format!("allowed by {}", rule_at(id)),
        Basis::IcmpError if v.reason.is_none() => {
            "an ICMP error answering a packet this host received (its quote is the reverse of its addresses) passes".into()
        }
        Basis::IcmpError => {
            "an ICMP error that answers no packet this host received (its quote is not the reverse of its addresses) carries data to an arbitrary host".into()
        }
        Basis::FragmentOfPassedDatagram => {
            "non-first fragment of a datagram whose first fragment passed".into()
        }
        Basis::FragmentUnverified => format!(
            "non-first fragment (no ports) toward {dst}, which is not allowed on all ports, and its first fragment was not seen passing"
        ),
        Basis::Covered(id) => format!(
            "{dst} is covered by {}, but not for this port/protocol (rule 7)",
            rule_at(id)
        ),
        Basis::NoRule => {
            format!("no authorization, upstream node or accessible block covers {dst} (rule 7)")
        }
    }
}

/// What the host essentials turned off mean, e.g. `DHCP and MLD traffic is subject to the policy`; None
/// when every essential is on.
fn essentials_off(on: &[HostEssential]) -> Option<String> {
    let off: Vec<String> = HostEssential::ALL
        .into_iter()
        .filter(|e| !on.contains(e))
        .map(|e| e.name().to_ascii_uppercase())
        .collect();
    (!off.is_empty()).then(|| format!("{} traffic is subject to the policy", off.join(" and ")))
}

/// The host essentials in force (rule 1), each with what it lets pass, and what the ones turned off
/// mean: `dhcp (DHCPv4 ...), mld (MLDv2 ...)`, `mld (MLDv2 ...); DHCP traffic is subject to the policy`,
/// `off (DHCP and MLD traffic is subject to the policy)`.
pub fn host_essentials(on: &[HostEssential]) -> String {
    let listed: Vec<String> = on
        .iter()
        .map(|e| format!("{} ({})", e.name(), e.describe()))
        .collect();
    match essentials_off(on) {
        None => listed.join(", "),
        Some(off) if on.is_empty() => format!("off ({off})"),
        Some(off) => format!("{}; {off}", listed.join(", ")),
    }
}

/// For summaries that list host essentials only when some are off: `off (DHCP and MLD traffic is
/// subject to the policy)`, `mld (DHCP traffic is subject to the policy)`.
pub fn host_essentials_off(on: &[HostEssential]) -> Option<String> {
    let off = essentials_off(on)?;
    let names: Vec<&str> = on.iter().map(|e| e.name()).collect();
    Some(if on.is_empty() {
        format!("off ({off})")
    } else {
        format!("{} ({off})", names.join(", "))
    })
}

/// A placeholder the operator must replace; `vpcgate check` refuses it as it is.
pub const PORT_PLACEHOLDER: &str = "<port>";

/// An existing rule that a suggested edit changes, named as `explain` names rules: its kind, its name (an
/// authorization's name, an accessible block's CIDR) and the line of its `address` or `cidr`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EditTarget {
    pub kind: RuleKind,
    pub name: String,
    pub line: usize,
}

/// One machine-applicable change to the policy file, with every value written as the file takes it. A
/// field named in `to_fill` holds a placeholder (`<...>`) that only the operator can replace (the backend's
/// VPC, the service's port); `vpcgate check` refuses the placeholder as it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Edit {
    /// Append an `[[accessible]]` table; `ports` / `protocols` None: leave the field out (every port;
    /// tcp and udp).
    AddAccessible {
        cidr: String,
        ports: Option<Vec<String>>,
        protocols: Option<Vec<Proto>>,
        to_fill: Vec<&'static str>,
    },
    /// Append an `[[authorization]]` table.
    AddAuthorization {
        name: String,
        vpc_id: String,
        address: String,
        ports: Vec<String>,
        protocol: Proto,
        to_fill: Vec<&'static str>,
    },
    /// Add an item to the `ports` of an authorization or accessible block.
    AddPort { rule: EditTarget, port: String },
    /// Add an item to the `protocols` of an accessible block.
    AddProtocol { rule: EditTarget, protocol: Proto },
    /// Remove the `reserved_cidrs` entry `cidr` written on `line`.
    RemoveReserved { cidr: String, line: usize },
}

fn quoted(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
    format!("[{}]", items.join(", "))
}

impl Edit {
    /// The edit as the text output shows it: TOML to append, or a sentence for an edit in place.
    pub fn render(&self) -> String {
        let fill = |to_fill: &[&str], field: &str| {
            if to_fill.contains(&field) {
                "   # fill in"
            } else {
                ""
            }
        };
        match self {
            Edit::AddAccessible {
                cidr,
                ports,
                protocols,
                to_fill,
            } => {
                let mut out = format!("[[accessible]]\ncidr = \"{cidr}\"");
                if let Some(ports) = ports {
                    out += &format!("\nports = {}{}", quoted(ports), fill(to_fill, "ports"));
                }
                if let Some(protocols) = protocols {
                    let names: Vec<String> = protocols.iter().map(|p| p.name().into()).collect();
                    out += &format!("\nprotocols = {}", quoted(&names));
                }
                out
            }
            Edit::AddAuthorization {
                name,
                vpc_id,
                address,
                ports,
                protocol,
                to_fill,
            } => format!(
                "[[authorization]]\nname = \"{name}\"\nvpc_id = \"{vpc_id}\"{}\naddress = \"{address}\"\nports = {}{}\nprotocol = \"{protocol}\"",
                fill(to_fill, "vpc_id"),
                quoted(ports),
                fill(to_fill, "ports"),
            ),
            Edit::AddPort { rule, port } => format!(
                "add \"{port}\" to `ports` of {} {} (line {})",
                target_kind(rule.kind),
                rule.name,
                rule.line
            ),
            Edit::AddProtocol { rule, protocol } => format!(
                "add \"{protocol}\" to `protocols` of {} {} (line {})",
                target_kind(rule.kind),
                rule.name,
                rule.line
            ),
            Edit::RemoveReserved { cidr, line } => {
                format!("remove \"{cidr}\" from reserved_cidrs (line {line})")
            }
        }
    }
}

fn target_kind(kind: RuleKind) -> &'static str {
    match kind {
        RuleKind::Authorization => "authorization",
        RuleKind::UpstreamNode => "upstream",
        RuleKind::Vswitch => "vswitch block",
        RuleKind::Accessible => "accessible block",
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SuggestionKind {
    /// The smallest policy change that allows the packet: `edits`, all of them.
    Change,
    /// No policy change can (a provider-reserved block, a special-purpose address): `text` says why and what
    /// to do instead; `edits` is empty.
    Impossible,
}

/// What would allow a dropped packet: `text` for people, the same change as `edits` for programs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Suggestion {
    pub kind: SuggestionKind,
    pub text: String,
    pub edits: Vec<Edit>,
}

impl Suggestion {
    fn impossible(text: String) -> Self {
        Self {
            kind: SuggestionKind::Impossible,
            text,
            edits: vec![],
        }
    }
}

/// The smallest policy change that would allow a dropped (or, in audit mode, would-be dropped) packet; None
/// when the drop is not the policy's to change (malformed, source-routed, ICMP errors, protocols other than
/// tcp, udp and ICMP echo).
pub fn suggestion(p: &Policy, c: &Compiled, pkt: &Packet, v: &Verdict) -> Option<Suggestion> {
    let Packet::Ip(ip) = pkt else { return None };
    match v.reason? {
        DropReason::Malformed | DropReason::NoPolicy | DropReason::SourceRouted => return None,
        DropReason::NotAuthorized
        | DropReason::PortNotAuthorized
        | DropReason::ReservedRange
        | DropReason::FragmentUnverified => {}
    }
    let dst = ip.dst;
    // Rule 4 drops the packet as long as one reserved block holds it, whichever the LPM names.
    let holding: Vec<&Reserved> = if matches!(v.basis, Basis::Reserved(_)) {
        c.reserved
            .iter()
            .filter(|r| r.cidr.contains(&dst))
            .collect()
    } else {
        vec![]
    };
    if let Some((r, z)) = holding.iter().find_map(|r| match &r.source {
        ReservedSource::Zone(z) => Some((r, z)),
        ReservedSource::Explicit => None,
    }) {
        return Some(Suggestion::impossible(format!(
            "the provider reserves {} in zone {z} for the gateway itself; the backend must move to another block",
            r.cidr
        )));
    }
    // A special-purpose destination is no VPC backend: `check` refuses a backend there.
    if let Some(range) = super::validate::special_purpose(&IpNet::from(dst), false) {
        return Some(Suggestion::impossible(format!(
            "{dst} is a special-purpose address ({range}), never a VPC backend: `vpcgate check` refuses a backend there"
        )));
    }
    let unreserve: Vec<Edit> = holding
        .iter()
        .map(|r| Edit::RemoveReserved {
            cidr: r.cidr.to_string(),
            line: r.pos.line,
        })
        .collect();
    let (intro, allow) = allow_by_rules(p, c, ip)?;
    let mut lines = vec![];
    if !unreserve.is_empty() {
        lines.push(format!(
            "if the gateway may reach {dst}: remove the reserved block{} holding it{}",
            if unreserve.len() == 1 { "" } else { "s" },
            if allow.is_empty() {
                ""
            } else {
                ", and allow it"
            }
        ));
        lines.extend(unreserve.iter().map(Edit::render));
    }
    lines.extend(intro);
    lines.extend(allow.iter().map(Edit::render));
    let edits: Vec<Edit> = unreserve.into_iter().chain(allow).collect();
    if edits.is_empty() {
        // The rules allow it already: the drop is not the policy's doing.
        return None;
    }
    Some(Suggestion {
        kind: SuggestionKind::Change,
        text: lines.join("\n"),
        edits,
    })
}

/// The smallest change to rules 5 and 6 that allows the packet (no edit when they already do), with a
/// sentence to introduce it when the edit alone would puzzle; None when no rule can allow it.
fn allow_by_rules(p: &Policy, c: &Compiled, ip: &IpPacket) -> Option<(Option<String>, Vec<Edit>)> {
    let dst = ip.dst;
    let entry = c.addr_entry(dst);
    // Every rule covering the destination, in verdict precedence (compile.rs): rules 5 before 6, the
    // longer prefix, file order.
    let mut covering: Vec<&Rule> = c.rules.iter().filter(|r| r.prefix.contains(&dst)).collect();
    covering.sort_by_key(|r| (r.kind.verdict_rule(), Reverse(r.prefix.prefix_len()), r.id));
    let mut intro = None;
    let new_rule = |ports: Option<Vec<String>>, proto: Proto, mut to_fill: Vec<&'static str>| {
        if p.instance.kind == Kind::VpcIntegration {
            return (
                None,
                Edit::AddAccessible {
                    cidr: host(dst).to_string(),
                    ports,
                    protocols: Some(vec![proto]),
                    to_fill,
                },
            );
        }
        // A dedicated instance reaches several VPCs, and which one holds the backend only the operator
        // knows, unless a rule covering the address already says.
        let known = covering.iter().find_map(|r| {
            let vpc = match r.kind {
                RuleKind::Authorization => p
                    .authorizations
                    .iter()
                    .find(|a| a.name == r.name)
                    .map(|a| &a.vpc_id),
                RuleKind::UpstreamNode => p
                    .upstreams
                    .iter()
                    .find(|u| u.name == r.name)
                    .map(|u| &u.vpc_id),
                RuleKind::Vswitch | RuleKind::Accessible => None,
            }?;
            Some((vpc.clone(), r.describe()))
        });
        let (vpc_id, note) = match known {
            Some((vpc, from)) => (
                vpc,
                Some(format!(
                    "assuming {dst} is in the VPC of {from}, which covers it:"
                )),
            ),
            None => {
                to_fill.insert(0, "vpc_id");
                (format!("<VPC id of {dst}>"), None)
            }
        };
        let ports = ports.unwrap_or_else(|| vec!["1-65535".into()]);
        (
            note,
            Edit::AddAuthorization {
                name: unique_name(p, dst, &ports[0], proto),
                vpc_id,
                address: dst.to_string(),
                ports,
                protocol: proto,
                to_fill,
            },
        )
    };
    let edit = match (ip.fragment, ip.l4) {
        // A non-first fragment has no ports: it passes when every port of its protocol is allowed.
        (Fragment::NonFirst, L4::Other { proto }) => {
            let proto = match proto {
                6 => Proto::Tcp,
                17 => Proto::Udp,
                _ => return None,
            };
            if entry.is_some_and(|e| e.all_ports_rule[proto_index(proto)] != 0) {
                return Some((None, vec![]));
            }
            intro = Some(format!(
                "a non-first fragment has no ports: allow every {proto} port toward {dst}, or avoid fragmentation toward it"
            ));
            new_rule(None, proto, vec![])
        }
        (Fragment::NonFirst, _) => return None,
        (_, L4::Tcp { dport: port } | L4::Udp { dport: port }) => {
            let proto = if matches!(ip.l4, L4::Tcp { .. }) {
                Proto::Tcp
            } else {
                Proto::Udp
            };
            if entry.is_some_and(|e| c.port_rule(e, proto, port).is_some()) {
                return Some((None, vec![]));
            }
            let target = |r: &Rule| EditTarget {
                kind: r.kind,
                name: r.name.clone(),
                line: r.pos.line,
            };
            // A port no covering rule takes goes to any covering rule of that protocol that gets it:
            // the one of highest precedence. Upstream nodes have one port each and the vSwitch block
            // all of them, so only authorizations and accessible blocks are edited.
            let editable =
                |r: &&&Rule| matches!(r.kind, RuleKind::Authorization | RuleKind::Accessible);
            if let Some(r) = covering
                .iter()
                .filter(editable)
                .find(|r| r.protocols.contains(&proto))
            {
                (
                    None,
                    Edit::AddPort {
                        rule: target(r),
                        port: port.to_string(),
                    },
                )
            } else if let Some(r) = covering
                .iter()
                .find(|r| r.kind == RuleKind::Accessible && r.ports.contains(port))
            {
                (
                    None,
                    Edit::AddProtocol {
                        rule: target(r),
                        protocol: proto,
                    },
                )
            } else {
                new_rule(Some(vec![port.to_string()]), proto, vec![])
            }
        }
        // Echo requests pass toward any address a rule covers, whatever its ports and protocols.
        (
            _,
            L4::Icmp {
                kind: ICMP_ECHO_REQUEST,
                ..
            }
            | L4::Icmpv6 {
                kind: ICMPV6_ECHO_REQUEST,
                ..
            },
        ) => {
            if entry.is_some_and(|e| e.icmp_rule != 0) {
                return Some((None, vec![]));
            }
            intro = Some(format!(
                "ping passes toward any address a rule covers: allow the service you will reach at {dst} (one port is enough)"
            ));
            new_rule(
                Some(vec![PORT_PLACEHOLDER.into()]),
                Proto::Tcp,
                vec!["ports"],
            )
        }
        // ICMP errors pass only as answers, and other protocols never.
        _ => return None,
    };
    let (note, edit) = edit;
    let intro = match (intro, note) {
        (Some(a), Some(b)) => Some(format!("{a}\n{b}")),
        (a, b) => a.or(b),
    };
    Some((intro, vec![edit]))
}

/// `allow-10-9-0-4-80`, made unique among authorization and upstream names.
fn unique_name(p: &Policy, dst: IpAddr, port: &str, proto: Proto) -> String {
    let port = if port == PORT_PLACEHOLDER {
        "ping"
    } else if port.contains('-') {
        "all"
    } else {
        port
    };
    let base = format!("allow-{}-{port}", dst.to_string().replace([':', '.'], "-"));
    let names: std::collections::HashSet<&str> = p
        .authorizations
        .iter()
        .map(|a| a.name.as_str())
        .chain(p.upstreams.iter().map(|u| u.name.as_str()))
        .collect();
    let taken = |n: &str| names.contains(n);
    std::iter::once(base.clone())
        .chain(std::iter::once(format!("{base}-{proto}")))
        .chain((2..).map(|i| format!("{base}-{i}")))
        .find(|n| !taken(n))
        .unwrap_or(base)
}
