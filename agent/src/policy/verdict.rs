//! The reference verdict: DESIGN.md "Verdict", rule by rule, over the compiled policy. The kernel's
//! `ebpf/src/verdict.rs` implements the same numbered rules and a differential test keeps the two equal.

use std::net::IpAddr;

use serde::Serialize;
use vpcgate_common::{icmp::*, verdict::DropReason};

use super::{
    compile::{Compiled, RuleId, proto_index},
    model::{Mode, Proto},
};

/// Transport header of a packet, as far as the verdict looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        dport: u16,
    },
    Udp {
        dport: u16,
    },
    Icmp {
        kind: u8,
        code: u8,
    },
    Icmpv6 {
        kind: u8,
        code: u8,
    },
    /// Another IP protocol (GRE, ESP, SCTP, ...), or ICMP of the wrong family.
    Other {
        proto: u8,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    None,
    First,
    /// No L4 header: `l4` of such a packet is `Other { proto }` with its IP protocol.
    NonFirst,
}

/// An IP packet leaving through the ENI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpPacket {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    pub fragment: Fragment,
}

/// A frame, as the parser classified it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packet {
    /// Neither IPv4 nor IPv6 (ARP, ...).
    NonIp,
    /// A truncated or inconsistent header.
    Malformed,
    Ip(IpPacket),
}

/// What the kernel's flow state knows about a packet (inputs of the verdict, like the packet itself).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowFacts {
    /// The packet is a reply in a flow a peer initiated toward the gateway.
    pub reply: bool,
    /// (Non-first fragments) the first fragment of the same datagram passed.
    pub first_fragment_passed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Pass,
    Drop,
}

/// Why the verdict is what it is: the DESIGN.md rule that decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "basis", content = "id")]
pub enum Basis {
    /// Rule 1: not IPv4/IPv6.
    NotIp,
    /// Rule 1: ICMPv6 neighbour discovery.
    NeighbourDiscovery,
    /// Rule 2.
    Malformed,
    /// Rule 3: reply in a flow a peer initiated.
    Reply,
    /// Rule 4: the reserved block (index into the policy's reserved list).
    Reserved(usize),
    /// Rules 5/6 (and ICMP echo, fragments allowed on all ports): the rule that allows it.
    Rule(RuleId),
    /// ICMP error (unreachable, time exceeded, packet too big).
    IcmpError,
    /// A non-first fragment whose first fragment passed.
    FragmentOfPassedDatagram,
    /// A non-first fragment that cannot be verified.
    FragmentUnverified,
    /// Rule 7: the address is covered by a rule, but not this port/protocol (the covering rule).
    Covered(RuleId),
    /// Rule 7: nothing covers the address.
    NoRule,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub action: Action,
    /// Set for drops, and for would-be drops that audit mode passed.
    #[serde(serialize_with = "reason_name")]
    pub reason: Option<DropReason>,
    pub basis: Basis,
    /// Audit mode passed a would-be drop.
    pub audit: bool,
}

fn reason_name<S: serde::Serializer>(r: &Option<DropReason>, s: S) -> Result<S::Ok, S::Error> {
    match r {
        Some(r) => s.serialize_str(r.name()),
        None => s.serialize_none(),
    }
}

impl Verdict {
    fn pass(basis: Basis) -> Self {
        Self {
            action: Action::Pass,
            reason: None,
            basis,
            audit: false,
        }
    }

    fn drop(reason: DropReason, basis: Basis, mode: Mode) -> Self {
        match mode {
            Mode::Enforce => Self {
                action: Action::Drop,
                reason: Some(reason),
                basis,
                audit: false,
            },
            Mode::Audit => Self {
                action: Action::Pass,
                reason: Some(reason),
                basis,
                audit: true,
            },
        }
    }

    /// The rule the verdict is attributed to, if a policy rule decided.
    pub fn rule(&self) -> Option<RuleId> {
        match self.basis {
            Basis::Rule(id) | Basis::Covered(id) => Some(id),
            _ => None,
        }
    }
}

const ICMPV6_ND: std::ops::RangeInclusive<u8> = ICMPV6_ND_FIRST..=ICMPV6_ND_LAST;

/// The verdict for one packet. `c` is the compiled policy; `facts` what flow state knows.
pub fn verdict(c: &Compiled, pkt: &Packet, facts: FlowFacts) -> Verdict {
    let mode = c.mode;
    // 1. Not IPv4/IPv6 -> pass, uncounted.
    let ip = match pkt {
        Packet::NonIp => return Verdict::pass(Basis::NotIp),
        // 2. Truncated or malformed header -> drop malformed.
        Packet::Malformed => return Verdict::drop(DropReason::Malformed, Basis::Malformed, mode),
        Packet::Ip(ip) => ip,
    };
    // 1. ICMPv6 neighbour discovery -> pass.
    if let L4::Icmpv6 { kind, .. } = ip.l4
        && ICMPV6_ND.contains(&kind)
    {
        return Verdict::pass(Basis::NeighbourDiscovery);
    }
    // 3. Reply in a flow that a peer initiated toward the gateway -> pass.
    if facts.reply {
        return Verdict::pass(Basis::Reply);
    }
    // 4. Destination in a reserved block -> drop reserved_range.
    if let Some(i) = c.reserved_for(ip.dst) {
        return Verdict::drop(DropReason::ReservedRange, Basis::Reserved(i), mode);
    }
    let entry = c.addr_entry(ip.dst);
    let not_allowed = |covering: Option<RuleId>| match covering {
        // 7. Covered by some rule, but not this port/protocol.
        Some(id) if id != 0 => {
            Verdict::drop(DropReason::PortNotAuthorized, Basis::Covered(id), mode)
        }
        // 7. Nothing covers it.
        _ => Verdict::drop(DropReason::NotAuthorized, Basis::NoRule, mode),
    };
    let covering = entry.map(|e| e.icmp_rule);
    // Fragments: a non-first fragment has no ports.
    if ip.fragment == Fragment::NonFirst {
        let proto = match ip.l4 {
            L4::Other { proto: 6 } => Some(Proto::Tcp),
            L4::Other { proto: 17 } => Some(Proto::Udp),
            _ => None,
        };
        if let (Some(e), Some(p)) = (entry, proto) {
            let rule = e.all_ports_rule[proto_index(p)];
            if rule != 0 {
                return Verdict::pass(Basis::Rule(rule));
            }
        }
        if facts.first_fragment_passed {
            return Verdict::pass(Basis::FragmentOfPassedDatagram);
        }
        return Verdict::drop(
            DropReason::FragmentUnverified,
            Basis::FragmentUnverified,
            mode,
        );
    }
    match ip.l4 {
        // ICMP errors pass; echo requests pass toward addresses rule 5 or 6 covers.
        L4::Icmp {
            kind: ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED,
            ..
        }
        | L4::Icmpv6 {
            kind: ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED,
            ..
        } => Verdict::pass(Basis::IcmpError),
        L4::Icmp {
            kind: ICMP_ECHO_REQUEST,
            ..
        }
        | L4::Icmpv6 {
            kind: ICMPV6_ECHO_REQUEST,
            ..
        } => match covering {
            Some(id) if id != 0 => Verdict::pass(Basis::Rule(id)),
            _ => not_allowed(None),
        },
        // 5./6. (destination, protocol, port) matches a rule -> pass, attributed to it.
        L4::Tcp { dport } | L4::Udp { dport } => {
            let proto = if matches!(ip.l4, L4::Tcp { .. }) {
                Proto::Tcp
            } else {
                Proto::Udp
            };
            match entry.and_then(|e| c.port_rule(e, proto, dport)) {
                Some(rule) => Verdict::pass(Basis::Rule(rule)),
                None => not_allowed(covering),
            }
        }
        L4::Icmp { .. } | L4::Icmpv6 { .. } | L4::Other { .. } => not_allowed(covering),
    }
}
