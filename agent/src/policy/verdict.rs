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
    /// IPv4 TTL or IPv6 hop limit.
    pub hop_limit: u8,
    /// TCP/UDP source port (0 when there is none).
    pub sport: u16,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
    /// IPv4 LSRR/SSRR option, or an IPv6 routing header with segments left (rule 2).
    pub source_routed: bool,
    /// ICMP errors: the (source, destination) of the packet they quote.
    pub quoted: Option<(IpAddr, IpAddr)>,
}

impl IpPacket {
    /// A plain packet: hop limit 64, no source port, a TCP SYN when it is TCP, not source-routed.
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4, fragment: Fragment) -> Self {
        Self {
            src,
            dst,
            l4,
            fragment,
            hop_limit: 64,
            sport: 0,
            tcp_flags: if matches!(l4, L4::Tcp { .. }) {
                TCP_SYN
            } else {
                0
            },
            source_routed: false,
            quoted: None,
        }
    }
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

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
    /// A live (not expired) flow a peer initiated toward a gateway socket matches this packet's reversed
    /// addresses and ports: established TCP, UDP or ICMP echo.
    pub reply: bool,
    /// A live half-open TCP flow (the peer's SYN reached a listener, not yet acknowledged) matches.
    pub half_open: bool,
    /// The destination lies in one of the ENI's on-link prefixes (host state the agent writes from the
    /// interface's addresses): neighbour discovery (IPv6) and DHCPv4 renewals toward it pass.
    pub on_link: bool,
    /// The packet was generated on this host (TC egress, not forwarded from another interface). Only
    /// such packets can be host essentials, replies (rule 3) or ICMP errors that pass: a forwarded
    /// packet's addresses and ports are whatever its sender chose.
    pub local_origin: bool,
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
    /// Rule 1: a host essential.
    HostEssential(HostEssentialKind),
    /// Rule 2.
    Malformed,
    /// Rule 2: source-routed.
    SourceRouted,
    /// Rule 3: reply in a flow a peer initiated.
    Reply,
    /// Rule 4: the reserved block (index into the policy's reserved list).
    Reserved(usize),
    /// Rules 5/6 (and ICMP echo, fragments allowed on all ports): the rule that allows it.
    Rule(RuleId),
    /// ICMP error (unreachable, time exceeded, packet too big, parameter problem): passes when it answers
    /// a packet this host received, else drops `not_authorized`.
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

/// Which host essential passed a packet (rule 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostEssentialKind {
    Dhcpv4,
    Dhcpv6,
    Mld,
}

impl HostEssentialKind {
    /// The kernel's `essential::*` id.
    pub fn id(self) -> u32 {
        match self {
            HostEssentialKind::Dhcpv4 => 1,
            HostEssentialKind::Dhcpv6 => 2,
            HostEssentialKind::Mld => 3,
        }
    }
}

fn is_icmp_error(l4: L4) -> bool {
    matches!(
        l4,
        L4::Icmp {
            kind: ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM,
            ..
        } | L4::Icmpv6 {
            kind: ICMPV6_DEST_UNREACH
                | ICMPV6_PACKET_TOO_BIG
                | ICMPV6_TIME_EXCEEDED
                | ICMPV6_PARAMETER_PROBLEM,
            ..
        }
    )
}

/// Rule 1: neighbour discovery as RFC 4861 sends it: unfragmented, hop limit 255, toward a link-scope
/// address (fe80::/10, ff02::/16) or an on-link prefix (the vSwitch block, or the ENI's own prefixes).
fn nd_allowed(c: &Compiled, ip: &IpPacket, on_link: bool) -> bool {
    let IpAddr::V6(d) = ip.dst else {
        return false;
    };
    let link_scope = (d.segments()[0] & 0xffc0) == 0xfe80 || d.segments()[0] == 0xff02;
    ip.fragment == Fragment::None
        && ip.hop_limit == 255
        && (link_scope || on_link || c.onlink6.is_some_and(|n| n.contains(&d)))
}

/// Rule 1: the host essential this packet is, when that essential is on: the host's own (locally
/// generated) DHCPv4 client traffic to the broadcast address or an on-link server, DHCPv6 client traffic
/// to ff02::1:2, MLDv2 reports to ff02::16 with hop limit 1; whole datagrams only.
fn host_essential(c: &Compiled, ip: &IpPacket, facts: FlowFacts) -> Option<HostEssentialKind> {
    use super::model::HostEssential;
    if ip.fragment != Fragment::None || !facts.local_origin {
        return None;
    }
    let on = |e| c.host_essentials.contains(&e);
    match (ip.l4, ip.dst) {
        (L4::Udp { dport: 67 }, IpAddr::V4(d))
            if ip.sport == 68
                && (d == std::net::Ipv4Addr::BROADCAST || facts.on_link)
                && on(HostEssential::Dhcp) =>
        {
            Some(HostEssentialKind::Dhcpv4)
        }
        (L4::Udp { dport: 547 }, IpAddr::V6(d))
            if ip.sport == 546
                && d == std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2)
                && on(HostEssential::Dhcp) =>
        {
            Some(HostEssentialKind::Dhcpv6)
        }
        (
            L4::Icmpv6 {
                kind: ICMPV6_MLD2_REPORT,
                ..
            },
            IpAddr::V6(d),
        ) if ip.hop_limit == 1
            && d == std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16)
            && on(HostEssential::Mld) =>
        {
            Some(HostEssentialKind::Mld)
        }
        _ => None,
    }
}

/// Rule 3: whether the packet (generated on this host) replies in a live flow a peer initiated. A bare
/// TCP SYN never does; a half-open flow is answered only by a SYN-ACK or RST; a non-first fragment has no
/// ports to match.
fn is_reply(ip: &IpPacket, facts: FlowFacts) -> bool {
    if ip.fragment == Fragment::NonFirst || !facts.local_origin {
        return false;
    }
    match ip.l4 {
        L4::Tcp { .. } => {
            let f = ip.tcp_flags;
            if f & (TCP_SYN | TCP_ACK) == TCP_SYN {
                return false;
            }
            facts.reply
                || (facts.half_open
                    && (f & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK || f & TCP_RST != 0))
        }
        L4::Udp { .. }
        | L4::Icmp {
            kind: ICMP_ECHO_REPLY,
            ..
        }
        | L4::Icmpv6 {
            kind: ICMPV6_ECHO_REPLY,
            ..
        } => facts.reply,
        _ => false,
    }
}

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
    // 2. Source-routed: the real destination is not the one checked.
    if ip.source_routed {
        return Verdict::drop(DropReason::SourceRouted, Basis::SourceRouted, mode);
    }
    // 1. ICMPv6 neighbour discovery, only as RFC 4861 sends it; other packets of those types are
    // malformed.
    if let L4::Icmpv6 { kind, .. } = ip.l4
        && ICMPV6_ND.contains(&kind)
    {
        return if nd_allowed(c, ip, facts.on_link) {
            Verdict::pass(Basis::NeighbourDiscovery)
        } else {
            Verdict::drop(DropReason::Malformed, Basis::Malformed, mode)
        };
    }
    // 1. Host essentials -> pass.
    if let Some(e) = host_essential(c, ip, facts) {
        return Verdict::pass(Basis::HostEssential(e));
    }
    // 3. Reply in a live flow a peer initiated toward a gateway socket -> pass.
    if is_reply(ip, facts) {
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
        // ICMP errors pass only as answers to a packet this host received: sent by this host's stack,
        // unfragmented, quoting a packet that came from this packet's destination to its source. Echo requests pass toward addresses rule 5 or 6 covers.
        l4 if is_icmp_error(l4) => {
            if facts.local_origin
                && ip.fragment == Fragment::None
                && ip.quoted == Some((ip.dst, ip.src))
            {
                Verdict::pass(Basis::IcmpError)
            } else {
                Verdict::drop(DropReason::NotAuthorized, Basis::IcmpError, mode)
            }
        }
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
