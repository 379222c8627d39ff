//! Explaining a verdict to an operator: the deciding rule, and for a drop the smallest policy change that
//! would allow the packet.

use std::net::IpAddr;

use ipnet::IpNet;
use vpcgate_common::verdict::DropReason;

use super::{
    compile::{Compiled, RuleKind},
    model::{HostEssential, Kind, Policy, ReservedSource},
    verdict::{Basis, L4, Packet, Verdict},
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

/// What would allow a dropped packet.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", content = "text", rename_all = "snake_case")]
pub enum Suggestion {
    /// The smallest policy change that allows it: policy lines to add, or an edit.
    Change(String),
    /// No policy change can (a provider-reserved block): what to do instead.
    Impossible(String),
}

/// The smallest policy change that would allow a dropped packet.
pub fn suggestion(p: &Policy, c: &Compiled, pkt: &Packet, v: &Verdict) -> Option<Suggestion> {
    // A special-purpose destination is no VPC backend: `check` refuses any rule that would allow it.
    if let Packet::Ip(ip) = pkt
        && v.reason.is_some()
        && !matches!(v.basis, Basis::Reserved(_))
        && let Some(range) = super::validate::special_purpose(&IpNet::from(ip.dst), false)
    {
        return Some(Suggestion::Impossible(format!(
            "{} is a special-purpose address ({range}), never a VPC backend: `vpcgate check` refuses a rule that allows it",
            ip.dst
        )));
    }
    suggest(p, c, pkt, v).map(|text| {
        if matches!(v.basis, Basis::Reserved(i) if matches!(c.reserved[i].source, ReservedSource::Zone(_))) {
            Suggestion::Impossible(text)
        } else {
            Suggestion::Change(text)
        }
    })
}

fn suggest(p: &Policy, c: &Compiled, pkt: &Packet, v: &Verdict) -> Option<String> {
    let Packet::Ip(ip) = pkt else { return None };
    let reason = v.reason?;
    let (proto, port) = match ip.l4 {
        L4::Tcp { dport } => ("tcp", Some(dport)),
        L4::Udp { dport } => ("udp", Some(dport)),
        L4::Icmp { .. } | L4::Icmpv6 { .. } => ("icmp", None),
        L4::Other { proto: 6 } => ("tcp", None),
        L4::Other { proto: 17 } => ("udp", None),
        L4::Other { .. } => ("other", None),
    };
    let integration = p.instance.kind == Kind::VpcIntegration;
    let new_block = |port: Option<u16>| {
        let ports = port.map_or(String::new(), |port| format!("\nports = [\"{port}\"]"));
        let protocols = if proto == "tcp" || proto == "udp" {
            format!("\nprotocols = [\"{proto}\"]")
        } else {
            String::new()
        };
        format!(
            "[[accessible]]\ncidr = \"{}\"{ports}{protocols}",
            host(ip.dst)
        )
    };
    let new_authorization = |port: u16| {
        format!(
            "[[authorization]]\nname = \"allow-{}-{port}\"\nvpc_id = \"{}\"\naddress = \"{}\"\nports = [\"{port}\"]\nprotocol = \"{proto}\"",
            ip.dst.to_string().replace([':', '.'], "-"),
            p.instance.vpc_id,
            ip.dst,
        )
    };
    match reason {
        DropReason::ReservedRange => {
            let Basis::Reserved(i) = v.basis else {
                return None;
            };
            let r = &c.reserved[i];
            Some(match &r.source {
                ReservedSource::Explicit => format!(
                    "{} is listed in reserved_cidrs (line {}): remove it there if the gateway may reach it",
                    r.cidr, r.pos.line
                ),
                ReservedSource::Zone(z) => format!(
                    "the provider reserves {} in zone {z} for the gateway itself; the backend must move to another block",
                    r.cidr
                ),
            })
        }
        DropReason::Malformed | DropReason::NoPolicy | DropReason::SourceRouted => None,
        DropReason::FragmentUnverified => Some(format!(
            "allow every {proto} port toward {}, e.g.\n{}",
            ip.dst,
            if integration {
                new_block(None)
            } else {
                "(dedicated instances allow listed ports only: avoid fragmentation toward this backend)".into()
            }
        )),
        DropReason::NotAuthorized => match (port, integration) {
            (_, true) => Some(new_block(port)),
            (Some(port), false) => Some(new_authorization(port)),
            (None, false) => None,
        },
        DropReason::PortNotAuthorized => {
            let Basis::Covered(id) = v.basis else {
                return None;
            };
            let r = c.rule(id)?;
            let port = port?;
            Some(match r.kind {
                RuleKind::Authorization if r.protocols.iter().any(|x| x.name() == proto) => {
                    format!(
                        "add \"{port}\" to `ports` of authorization {} (line {})",
                        r.name, r.pos.line
                    )
                }
                RuleKind::Accessible if r.protocols.iter().any(|x| x.name() == proto) => {
                    format!(
                        "add \"{port}\" to `ports` of accessible block {} (line {})",
                        r.prefix, r.pos.line
                    )
                }
                RuleKind::Accessible if r.ports.contains(port) => {
                    format!(
                        "add \"{proto}\" to `protocols` of accessible block {} (line {})",
                        r.prefix, r.pos.line
                    )
                }
                _ if integration => new_block(Some(port)),
                _ => new_authorization(port),
            })
        }
    }
}
