//! Property tests: the compiled policy (LPM entries carrying covering-prefix ports, port tables resolved
//! to one rule per port) decides exactly what a naive reading of the rules decides, over random policies
//! (overlapping prefixes, port ranges, reserved blocks, both families, audit mode) and random packets.

use std::{
    cmp::Reverse,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use proptest::prelude::*;
use vpcgate::policy::{
    compile::{Compiled, Limits},
    model::*,
    ports::PortSet,
    source::Pos,
    verdict::{
        Action, Basis, FlowFacts, Fragment, HostEssentialKind, IpPacket, L4, Packet, Verdict,
        verdict,
    },
};
use vpcgate_common::verdict::DropReason;

// ---------- the naive evaluation: straight from the rules, no LPM, no port tables ----------

struct NaiveRule {
    id: u32,
    category: u8,
    prefix: IpNet,
    protocols: Vec<Proto>,
    ports: PortSet,
}

/// Rules in file order (ids 1..): authorizations, upstream nodes, the vSwitch block, accessible blocks.
fn naive_rules(p: &Policy) -> Vec<NaiveRule> {
    let mut out = vec![];
    let mut add = |category, prefix, protocols: Vec<Proto>, ports: PortSet| {
        out.push(NaiveRule {
            id: out.len() as u32 + 1,
            category,
            prefix,
            protocols,
            ports,
        })
    };
    for a in &p.authorizations {
        add(5, a.address, vec![a.protocol], a.ports.clone());
    }
    for u in &p.upstreams {
        for n in &u.nodes {
            add(
                5,
                IpNet::from(n.address),
                vec![Proto::Tcp],
                PortSet::single(n.port),
            );
        }
    }
    if let Some(v) = p.instance.vswitch_cidr {
        add(6, v, Proto::ALL.to_vec(), PortSet::all());
    }
    for a in &p.accessible {
        add(6, a.cidr, a.protocols.clone(), a.ports.clone());
    }
    out
}

fn naive(p: &Policy, pkt: &Packet, facts: FlowFacts) -> Verdict {
    let mode = p.instance.mode;
    let drop = |reason, basis| match mode {
        Mode::Enforce => Verdict {
            action: Action::Drop,
            reason: Some(reason),
            basis,
            audit: false,
        },
        Mode::Audit => Verdict {
            action: Action::Pass,
            reason: Some(reason),
            basis,
            audit: true,
        },
    };
    let pass = |basis| Verdict {
        action: Action::Pass,
        reason: None,
        basis,
        audit: false,
    };
    let ip = match pkt {
        Packet::NonIp => return pass(Basis::NotIp),
        Packet::Malformed => return drop(DropReason::Malformed, Basis::Malformed),
        Packet::Ip(ip) => ip,
    };
    if ip.source_routed {
        return drop(DropReason::SourceRouted, Basis::SourceRouted);
    }
    if let L4::Icmpv6 {
        kind: 133..=137, ..
    } = ip.l4
    {
        let link_scope = ["fe80::/10", "ff02::/16"]
            .iter()
            .any(|n| n.parse::<IpNet>().unwrap().contains(&ip.dst));
        let on_link =
            matches!(p.instance.vswitch_cidr, Some(v @ IpNet::V6(_)) if v.contains(&ip.dst));
        return if ip.fragment == Fragment::None
            && ip.hop_limit == 255
            && (link_scope || on_link || facts.on_link && ip.dst.is_ipv6())
        {
            pass(Basis::NeighbourDiscovery)
        } else {
            drop(DropReason::Malformed, Basis::Malformed)
        };
    }
    let essentials = &p.instance.host_essentials;
    if ip.fragment == Fragment::None && facts.local_origin {
        let essential = match ip.l4 {
            L4::Udp { dport: 67 }
                if ip.sport == 68
                    && ip.dst.is_ipv4()
                    && (ip.dst == "255.255.255.255".parse::<IpAddr>().unwrap()
                        || facts.on_link) =>
            {
                essentials
                    .contains(&HostEssential::Dhcp)
                    .then_some(HostEssentialKind::Dhcpv4)
            }
            L4::Udp { dport: 547 }
                if ip.sport == 546 && ip.dst == "ff02::1:2".parse::<IpAddr>().unwrap() =>
            {
                essentials
                    .contains(&HostEssential::Dhcp)
                    .then_some(HostEssentialKind::Dhcpv6)
            }
            L4::Icmpv6 { kind: 143, .. }
                if ip.hop_limit == 1 && ip.dst == "ff02::16".parse::<IpAddr>().unwrap() =>
            {
                essentials
                    .contains(&HostEssential::Mld)
                    .then_some(HostEssentialKind::Mld)
            }
            _ => None,
        };
        if let Some(e) = essential {
            return pass(Basis::HostEssential(e));
        }
    }
    let bare_syn = ip.tcp_flags & 0x12 == 0x02;
    let answers_half_open = ip.tcp_flags & 0x12 == 0x12 || ip.tcp_flags & 0x04 != 0;
    let reply = facts.local_origin
        && ip.fragment != Fragment::NonFirst
        && match ip.l4 {
            L4::Tcp { .. } => !bare_syn && (facts.reply || facts.half_open && answers_half_open),
            L4::Udp { .. } | L4::Icmp { kind: 0, .. } | L4::Icmpv6 { kind: 129, .. } => facts.reply,
            _ => false,
        };
    if reply {
        return pass(Basis::Reply);
    }
    // Longest reserved block; the first listed among equal ones.
    let reserved = p
        .instance
        .reserved
        .iter()
        .enumerate()
        .filter(|(_, r)| r.cidr.contains(&ip.dst))
        .min_by_key(|(i, r)| (Reverse(r.cidr.prefix_len()), *i));
    if let Some((i, _)) = reserved {
        return drop(DropReason::ReservedRange, Basis::Reserved(i));
    }
    let mut covering: Vec<NaiveRule> = naive_rules(p)
        .into_iter()
        .filter(|r| r.prefix.contains(&ip.dst))
        .collect();
    covering.sort_by_key(|r| (r.category, Reverse(r.prefix.prefix_len()), r.id));
    let not_allowed = || match covering.first() {
        Some(r) => drop(DropReason::PortNotAuthorized, Basis::Covered(r.id)),
        None => drop(DropReason::NotAuthorized, Basis::NoRule),
    };
    let winner = |proto: Proto, port: u16| {
        covering
            .iter()
            .find(|r| r.protocols.contains(&proto) && r.ports.contains(port))
            .map(|r| r.id)
    };
    if ip.fragment == Fragment::NonFirst {
        let proto = match ip.l4 {
            L4::Other { proto: 6 } => Some(Proto::Tcp),
            L4::Other { proto: 17 } => Some(Proto::Udp),
            _ => None,
        };
        if let Some(proto) = proto {
            // The winner is constant between range boundaries: checking the boundaries sees every winner.
            let mut points = vec![1u32];
            for r in covering.iter().filter(|r| r.protocols.contains(&proto)) {
                for &(lo, hi) in r.ports.ranges() {
                    points.extend([u32::from(lo), u32::from(hi) + 1]);
                }
            }
            points.retain(|&x| (1..=65535).contains(&x));
            let all = (1..=65535u16).all(|port| winner(proto, port).is_some());
            if all {
                let winners: Vec<u32> = points
                    .iter()
                    .filter_map(|&x| winner(proto, x as u16))
                    .collect();
                let first = covering
                    .iter()
                    .find(|r| winners.contains(&r.id))
                    .map(|r| r.id)
                    .unwrap();
                return pass(Basis::Rule(first));
            }
        }
        if facts.first_fragment_passed {
            return pass(Basis::FragmentOfPassedDatagram);
        }
        return drop(DropReason::FragmentUnverified, Basis::FragmentUnverified);
    }
    match ip.l4 {
        L4::Icmp {
            kind: 3 | 11 | 12, ..
        }
        | L4::Icmpv6 { kind: 1..=4, .. } => {
            if facts.local_origin
                && ip.fragment == Fragment::None
                && ip.quoted == Some((ip.dst, ip.src))
            {
                pass(Basis::IcmpError)
            } else {
                drop(DropReason::NotAuthorized, Basis::IcmpError)
            }
        }
        L4::Icmp { kind: 8, .. } | L4::Icmpv6 { kind: 128, .. } => match covering.first() {
            Some(r) => pass(Basis::Rule(r.id)),
            None => drop(DropReason::NotAuthorized, Basis::NoRule),
        },
        L4::Tcp { dport } => {
            winner(Proto::Tcp, dport).map_or_else(not_allowed, |id| pass(Basis::Rule(id)))
        }
        L4::Udp { dport } => {
            winner(Proto::Udp, dport).map_or_else(not_allowed, |id| pass(Basis::Rule(id)))
        }
        _ => not_allowed(),
    }
}

// ---------- generators: small address and port spaces, so rules overlap a lot ----------

fn v4_net() -> impl Strategy<Value = IpNet> {
    (0u32..1024, prop_oneof![22u8..=26, 27u8..=32]).prop_map(|(host, len)| {
        IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | host)), len)
            .unwrap()
            .trunc()
    })
}

fn v6_net() -> impl Strategy<Value = IpNet> {
    (0u128..1024, prop_oneof![118u8..=122, 123u8..=128]).prop_map(|(host, len)| {
        IpNet::new(IpAddr::V6(Ipv6Addr::from((0xfd00u128 << 112) | host)), len)
            .unwrap()
            .trunc()
    })
}

/// A few nested prefixes, so that several rules often share one prefix and chains of them nest.
fn nested_net() -> impl Strategy<Value = IpNet> {
    prop::sample::select(vec![
        "10.0.0.0/22",
        "10.0.0.0/24",
        "10.0.0.0/26",
        "10.0.0.0/30",
        "10.0.0.1/32",
        "fd00::/118",
        "fd00::/124",
    ])
    .prop_map(|n| n.parse().unwrap())
}

fn net() -> impl Strategy<Value = IpNet> {
    prop_oneof![2 => v4_net(), 2 => v6_net(), 1 => nested_net()]
}

fn ports() -> impl Strategy<Value = PortSet> {
    prop_oneof![
        1 => Just(PortSet::all()),
        4 => prop::collection::vec((1u16..200, 0u16..40), 1..4)
            .prop_map(|r| PortSet::from_ranges(r.into_iter().map(|(lo, w)| (lo, lo.saturating_add(w))).collect())),
        1 => prop::collection::vec((1u16..200, 0u16..40), 1..3)
            .prop_map(|r| PortSet::from_ranges(r.into_iter().map(|(lo, w)| (lo, lo.saturating_add(w))).chain([(150, 65535)]).collect())),
    ]
}

fn proto() -> impl Strategy<Value = Proto> {
    prop_oneof![Just(Proto::Tcp), Just(Proto::Udp)]
}

fn protocols() -> impl Strategy<Value = Vec<Proto>> {
    prop_oneof![
        Just(vec![Proto::Tcp]),
        Just(vec![Proto::Udp]),
        Just(vec![Proto::Tcp, Proto::Udp])
    ]
}

prop_compose! {
    fn policy()(
        auths in prop::collection::vec((net(), ports(), proto()), 0..8),
        nodes in prop::collection::vec((net(), 1u16..200), 0..4),
        vswitch in prop::option::of(net()),
        accessible in prop::collection::vec((net(), ports(), protocols()), 0..4),
        reserved in prop::collection::vec(net().prop_filter("narrow", |n| n.prefix_len() + 6 >= n.max_prefix_len()), 0..3),
        audit in any::<bool>(),
    ) -> Policy {
        let reserved = reserved.into_iter().map(|cidr| Reserved { cidr, source: ReservedSource::Explicit, pos: Pos::default() }).collect();
        let mode = if audit { Mode::Audit } else { Mode::Enforce };
        build(auths, nodes, vswitch, accessible, (reserved, mode, HostEssential::ALL.to_vec()))
    }
}

/// A vpc-integration policy of these rules (every position the default), with (reserved blocks, mode,
/// host essentials).
fn build(
    auths: Vec<(IpNet, PortSet, Proto)>,
    nodes: Vec<(IpNet, u16)>,
    vswitch: Option<IpNet>,
    accessible: Vec<(IpNet, PortSet, Vec<Proto>)>,
    (reserved, mode, host_essentials): (Vec<Reserved>, Mode, Vec<HostEssential>),
) -> Policy {
    let pos = Pos::default();
    Policy {
        instance: Instance {
            name: "gw".into(),
            kind: Kind::VpcIntegration,
            vpc_id: "vpc-1".into(),
            interface: "eth1".into(),
            egress_ip: None,
            vswitch_cidr: vswitch,
            vswitch_pos: pos,
            egress_pos: pos,
            zone: None,
            reserved,
            mode,
            forward_interfaces: vec![],
            host_essentials,
            flow_timeouts: FlowTimeouts::default(),
        },
        accessible: accessible
            .into_iter()
            .map(|(cidr, ports, protocols)| Accessible {
                cidr,
                ports,
                protocols,
                pos,
            })
            .collect(),
        authorizations: auths
            .into_iter()
            .enumerate()
            .map(|(i, (address, ports, protocol))| Authorization {
                name: format!("a{i}"),
                vpc_id: "vpc-1".into(),
                instance_id: None,
                instance_type: InstanceType::Ip,
                address,
                ports,
                protocol,
                pos,
            })
            .collect(),
        upstreams: vec![Upstream {
            name: "u".into(),
            description: None,
            vpc_id: "vpc-1".into(),
            protocol: UpstreamProtocol::Http,
            host_header: None,
            retries: 5,
            nodes: nodes
                .into_iter()
                .map(|(n, port)| Node {
                    address: n.addr(),
                    port,
                    weight: 1,
                    pos,
                })
                .collect(),
            pos,
        }],
    }
}

/// Addresses and ports where the policy's decisions change: rule and reserved prefixes (and just past
/// them), range boundaries (and just outside them).
fn interesting(p: &Policy) -> (Vec<IpAddr>, Vec<u16>) {
    let mut nets: Vec<IpNet> = p.authorizations.iter().map(|a| a.address).collect();
    nets.extend(p.accessible.iter().map(|a| a.cidr));
    nets.extend(p.instance.vswitch_cidr);
    nets.extend(p.instance.reserved.iter().map(|r| r.cidr));
    nets.extend(
        p.upstreams
            .iter()
            .flat_map(|u| u.nodes.iter().map(|n| IpNet::from(n.address))),
    );
    let mut addrs = vec![
        IpAddr::from([10, 0, 0, 1]),
        IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 1]),
    ];
    for n in nets {
        addrs.extend([n.network(), n.broadcast()]);
        addrs.extend(next_addr(n.broadcast()));
    }
    let mut ports = vec![1u16, 65535];
    let ranges = p
        .authorizations
        .iter()
        .map(|a| &a.ports)
        .chain(p.accessible.iter().map(|a| &a.ports))
        .flat_map(|ps| ps.ranges().to_vec())
        .chain(
            p.upstreams
                .iter()
                .flat_map(|u| u.nodes.iter().map(|n| (n.port, n.port))),
        );
    for (lo, hi) in ranges {
        ports.extend([lo, hi, lo.saturating_sub(1).max(1), hi.saturating_add(1)]);
    }
    (addrs, ports)
}

fn next_addr(a: IpAddr) -> Option<IpAddr> {
    match a {
        IpAddr::V4(a) => u32::from(a).checked_add(1).map(|x| IpAddr::V4(x.into())),
        IpAddr::V6(a) => u128::from(a).checked_add(1).map(|x| IpAddr::V6(x.into())),
    }
}

fn policy_and_packets() -> impl Strategy<Value = (Policy, Vec<(Packet, FlowFacts)>)> {
    policy().prop_flat_map(|p| {
        let (addrs, ports) = interesting(&p);
        (Just(p), prop::collection::vec(packet(addrs, ports), 1..60))
    })
}

fn packet(addrs: Vec<IpAddr>, ports: Vec<u16>) -> impl Strategy<Value = (Packet, FlowFacts)> {
    let dst = prop_oneof![
        3 => prop::sample::select(addrs),
        1 => (0u32..1100).prop_map(|h| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | h))),
        1 => (0u128..1100).prop_map(|h| IpAddr::V6(Ipv6Addr::from((0xfd00u128 << 112) | h))),
    ];
    let port = prop_oneof![3 => prop::sample::select(ports), 2 => 1u16..260, 1 => any::<u16>().prop_map(|p| p.max(1))];
    let l4 = prop_oneof![
        4 => port.clone().prop_map(|dport| L4::Tcp { dport }),
        4 => port.prop_map(|dport| L4::Udp { dport }),
        1 => prop_oneof![Just(67u16), Just(547)].prop_map(|dport| L4::Udp { dport }),
        1 => (prop_oneof![Just(8u8), Just(3), Just(11), Just(12), Just(0), Just(13)], any::<u8>()).prop_map(|(kind, code)| L4::Icmp { kind, code }),
        1 => (prop_oneof![Just(128u8), Just(1), Just(2), Just(3), Just(4), Just(135), Just(136), Just(129), Just(143)], any::<u8>()).prop_map(|(kind, code)| L4::Icmpv6 { kind, code }),
        1 => prop_oneof![Just(6u8), Just(17), Just(47), Just(1)].prop_map(|proto| L4::Other { proto }),
    ];
    let special_dst: Vec<IpAddr> = [
        "fe80::1",
        "ff02::1:ff00:7",
        "ff02::16",
        "255.255.255.255",
        "2001:db8::9",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    let dst = prop_oneof![8 => dst, 1 => prop::sample::select(special_dst)];
    let header = (
        prop_oneof![Just(64u8), Just(255), Just(1)],
        prop_oneof![3 => 30000u16..31000, 1 => prop_oneof![Just(68u16), Just(546)]],
        prop_oneof![Just(0x02u8), Just(0x12), Just(0x10), Just(0x04), Just(0x11)],
        prop::bool::weighted(0.05),
        prop_oneof![Just(0u8), Just(1), Just(2)],
    );
    (
        dst,
        l4,
        any::<bool>(),
        (
            prop::bool::weighted(0.05),
            prop::bool::weighted(0.05),
            prop::bool::weighted(0.2),
            prop::bool::weighted(0.8),
        ),
        any::<bool>(),
        prop::bool::weighted(0.02),
        header,
    )
        .prop_map(
            |(
                dst,
                l4,
                nonfirst,
                (reply, half_open, on_link, local_origin),
                first_passed,
                special,
                (hop_limit, sport, tcp_flags, source_routed, quote),
            )| {
                let src = if dst.is_ipv4() {
                    IpAddr::from([10, 0, 0, 5])
                } else {
                    IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 5])
                };
                let fragment = if nonfirst && matches!(l4, L4::Other { .. }) {
                    Fragment::NonFirst
                } else {
                    Fragment::None
                };
                let pkt = if special {
                    Packet::Malformed
                } else {
                    let mut ip = IpPacket::new(src, dst, l4, fragment);
                    ip.hop_limit = hop_limit;
                    ip.sport = if matches!(l4, L4::Tcp { .. } | L4::Udp { .. }) {
                        sport
                    } else {
                        0
                    };
                    ip.tcp_flags = if matches!(l4, L4::Tcp { .. }) {
                        tcp_flags
                    } else {
                        0
                    };
                    ip.source_routed = source_routed;
                    // ICMP errors quote a packet: the reverse of this one's addresses, or a foreign one.
                    ip.quoted = match quote {
                        0 => Some((dst, src)),
                        1 => Some((dst, dst)),
                        _ => None,
                    };
                    Packet::Ip(ip)
                };
                (
                    pkt,
                    FlowFacts {
                        reply,
                        half_open,
                        on_link,
                        local_origin,
                        first_fragment_passed: first_passed,
                    },
                )
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn compiled_verdict_equals_naive_reading_of_the_rules((p, pkts) in policy_and_packets()) {
        let c = Compiled::new(&p);
        for (pkt, facts) in &pkts {
            prop_assert_eq!(verdict(&c, pkt, *facts), naive(&p, pkt, *facts), "packet {:?} facts {:?}", pkt, facts);
        }
    }

    #[test]
    fn port_tables_are_disjoint_sorted_and_their_prefix_blocks_agree(p in policy(), probes in prop::collection::vec(any::<u16>(), 64)) {
        let c = Compiled::new(&p);
        for t in &c.port_tables {
            for w in t.intervals.windows(2) {
                prop_assert!(w[0].1 < w[1].0, "overlapping or unsorted {:?}", t.intervals);
            }
            let blocks = t.prefix_blocks();
            for &port in probes.iter().chain(t.intervals.iter().flat_map(|i| [&i.0, &i.1])) {
                let hits: Vec<u32> = blocks
                    .iter()
                    .filter(|&&(base, len, _)| {
                        let size = 1u32 << (16 - len);
                        u32::from(port) >= u32::from(base) && u32::from(port) < u32::from(base) + size
                    })
                    .map(|b| b.2)
                    .collect();
                prop_assert!(hits.len() <= 1);
                prop_assert_eq!(hits.first().copied(), t.lookup(port));
            }
        }
        // Every rule prefix has an address entry.
        for r in &c.rules {
            prop_assert!(c.addr_entry(r.prefix.addr()).is_some());
        }
        // The entries the compile counted as it went are those of its result, and the kernel limits
        // change nothing for a policy that fits them.
        prop_assert_eq!(&c.counts, &vpcgate::datapath::capacity::entry_counts(&c));
        let limited = Compiled::with_limits(&p, Limits::KERNEL).expect("a small policy fits");
        // The compile's cost is bounded by its input and output (see `Compiled::work`).
        let own: u64 = c.rules.iter().map(|r| (r.ports.ranges().len() * r.protocols.len()) as u64).sum();
        let intervals: u64 = c.port_tables.iter().map(|t| t.intervals.len() as u64).sum();
        prop_assert!(c.work <= 8 * (own + 2 * c.addr_entries.len() as u64 + intervals), "work {}", c.work);
        prop_assert_eq!(&limited.addr_entries, &c.addr_entries);
        prop_assert_eq!(&limited.port_tables, &c.port_tables);
    }
}

/// Compiling stays near-linear in the number of rules (a quadratic compile would take minutes here).
#[test]
fn compiles_a_large_policy() {
    let pos = Pos::default();
    let n = 20_000u32;
    let policy = Policy {
        instance: Instance {
            name: "big".into(),
            kind: Kind::Dedicated,
            vpc_id: "vpc-1".into(),
            interface: "eth1".into(),
            egress_ip: None,
            vswitch_cidr: None,
            vswitch_pos: pos,
            egress_pos: pos,
            zone: None,
            reserved: vec![],
            mode: Mode::Enforce,
            forward_interfaces: vec![],
            host_essentials: HostEssential::ALL.to_vec(),
            flow_timeouts: FlowTimeouts::default(),
        },
        accessible: vec![],
        authorizations: (0..n)
            .map(|i| Authorization {
                name: format!("a{i}"),
                vpc_id: "vpc-1".into(),
                instance_id: None,
                instance_type: InstanceType::Ip,
                address: IpNet::from(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i))),
                ports: PortSet::single(80),
                protocol: Proto::Tcp,
                pos,
            })
            .collect(),
        upstreams: vec![],
    };
    let c = Compiled::new(&policy);
    assert_eq!(c.addr_entries.len(), n as usize);
    assert_eq!(c.rules.len(), n as usize);
    let pkt = Packet::Ip(IpPacket::new(
        IpAddr::from([10, 0, 0, 5]),
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | 777)),
        L4::Tcp { dport: 80 },
        Fragment::None,
    ));
    assert_eq!(
        verdict(&c, &pkt, FlowFacts::default()).basis,
        Basis::Rule(778)
    );
}

// ---------- adversarial shapes (families with equal bits, /0s, ports at the edges) ----------

/// IPv4 and IPv6 prefixes whose address bits are equal as integers (0.0.0.x vs ::x), /0s of both
/// families, and deep chains.
fn mixed_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (0u32..16, 0u8..=32).prop_map(|(h, len)| IpNet::new(IpAddr::V4(Ipv4Addr::from(h)), len)
            .unwrap()
            .trunc()),
        (0u128..16, prop_oneof![0u8..=8, 96u8..=128]).prop_map(|(h, len)| IpNet::new(
            IpAddr::V6(Ipv6Addr::from(h)),
            len
        )
        .unwrap()
        .trunc()),
        (0u32..16, 28u8..=32).prop_map(|(h, len)| IpNet::new(
            IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | h)),
            len
        )
        .unwrap()
        .trunc()),
    ]
}

fn edge_ports() -> impl Strategy<Value = PortSet> {
    let edge = prop_oneof![
        Just(1u16),
        Just(2),
        Just(65534),
        Just(65535),
        Just(32767),
        Just(32768),
        1u16..=65535
    ];
    prop_oneof![
        1 => Just(PortSet::all()),
        4 => prop::collection::vec((edge.clone(), edge), 1..5)
            .prop_map(|r| PortSet::from_ranges(r.into_iter().map(|(a, b)| (a.min(b), a.max(b))).collect())),
    ]
}

prop_compose! {
    fn mixed_policy()(
        auths in prop::collection::vec((mixed_net(), edge_ports(), proto()), 0..10),
        nodes in prop::collection::vec((mixed_net(), prop_oneof![Just(1u16), Just(65535), 1u16..=65535]), 0..4),
        vswitch in prop::option::of(mixed_net()),
        accessible in prop::collection::vec((mixed_net(), edge_ports(), protocols()), 0..6),
    ) -> Policy {
        build(auths, nodes, vswitch, accessible, (vec![], Mode::Enforce, vec![]))
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 60, ..ProptestConfig::default() })]

    /// (Each case checks thousands of packets: 60 cases take about ten seconds in a debug build.)
    /// Every address that matters (each prefix's first/last address and the one past it, in both
    /// families), every port that matters (range ends and their neighbours, 1, 65535), every protocol,
    /// plus non-first fragments and echo requests.
    #[test]
    fn compiled_equals_naive_on_mixed_families_and_edge_ports(p in mixed_policy()) {
        let c = Compiled::new(&p);
        prop_assert_eq!(&c.counts, &vpcgate::datapath::capacity::entry_counts(&c));
        let (mut addrs, mut ports) = interesting(&p);
        addrs.extend(["0.0.0.0", "0.0.0.1", "255.255.255.255", "::", "::1", "::ffff:ffff", "ffff::1", "10.0.0.0", "::a00:0"]
            .iter().map(|a| a.parse::<IpAddr>().unwrap()));
        ports.extend([2, 65534, 32767, 32768]);
        ports.retain(|&p| p != 0);
        ports.sort(); ports.dedup();
        let facts = FlowFacts { local_origin: true, ..FlowFacts::default() };
        for &dst in &addrs {
            let src = if dst.is_ipv4() { IpAddr::from([10, 9, 9, 9]) } else { IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 5]) };
            let mut l4s: Vec<L4> = vec![L4::Other { proto: 6 }, L4::Other { proto: 17 }];
            l4s.push(if dst.is_ipv4() { L4::Icmp { kind: 8, code: 0 } } else { L4::Icmpv6 { kind: 128, code: 0 } });
            for &port in &ports {
                l4s.push(L4::Tcp { dport: port });
                l4s.push(L4::Udp { dport: port });
            }
            for l4 in l4s {
                let frag = if matches!(l4, L4::Other { .. }) { Fragment::NonFirst } else { Fragment::None };
                let mut ip = IpPacket::new(src, dst, l4, frag);
                ip.tcp_flags = 0x02;
                ip.sport = 40000;
                let pkt = Packet::Ip(ip);
                prop_assert_eq!(verdict(&c, &pkt, facts), naive(&p, &pkt, facts), "packet {:?}", pkt);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// The early refusal agrees with the full compile's counts (what apply's check_capacity computes):
    /// refused for a kernel map exactly when the unbounded compile needs more than it holds; never a
    /// panic in the error path.
    #[test]
    fn early_refusal_agrees_with_full_counts(
        p in prop_oneof![mixed_policy(), policy()],
        port_entries in 0u32..120,
        addr_entries in 0u32..12,
        rules in 0u32..16,
        reserved_entries in 0u32..3,
    ) {
        let full = Compiled::new(&p);
        let counts = vpcgate::datapath::capacity::entry_counts(&full);
        let limits = Limits { rules, addr_entries, reserved_entries, port_entries };
        let fits = counts.rules <= rules
            && counts.addr_v4.max(counts.addr_v6) <= addr_entries
            && counts.reserved_v4.max(counts.reserved_v6) <= reserved_entries
            && counts.ports <= port_entries;
        match Compiled::with_limits(&p, limits) {
            Ok(c) => {
                prop_assert!(fits, "accepted though {:?} exceeds {:?}", counts, limits);
                prop_assert_eq!(&c.counts, &counts);
            }
            Err(e) => {
                prop_assert!(!fits, "refused though {:?} fits {:?}: {}", counts, limits, e.message);
                if e.map == vpcgate_common::datapath::names::PORTS {
                    prop_assert!(counts.ports > port_entries);
                    prop_assert!(e.needed > u64::from(port_entries));
                }
            }
        }
    }
}

/// One chain of nested prefixes per family (with sibling /25s and /0s), many rules on each.
fn chain_net() -> impl Strategy<Value = IpNet> {
    prop::sample::select(vec![
        "0.0.0.0/0",
        "10.0.0.0/8",
        "10.0.0.0/16",
        "10.0.0.0/24",
        "10.0.0.0/25",
        "10.0.0.128/25",
        "10.0.0.1/32",
        "10.0.0.129/32",
        "::/0",
        "::/96",
        "::a00:0/120",
        "::a00:1/128",
    ])
    .prop_map(|n| n.parse().unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// Every port boundary at addresses in and between the chain's prefixes, both protocols, and the
    /// rule an echo request is attributed to: the winner is the first covering rule in precedence order.
    #[test]
    fn nested_chains_resolve_every_port_to_the_first_covering_rule(
        auths in prop::collection::vec((chain_net(), edge_ports(), proto()), 0..10),
        accessible in prop::collection::vec((chain_net(), edge_ports(), protocols()), 0..10),
    ) {
        let p = build(auths, vec![], None, accessible, (vec![], Mode::Enforce, vec![]));
        let c = Compiled::new(&p);
        let mut ports: Vec<u16> = vec![1, 2, 65534, 65535];
        for r in &c.rules {
            for &(lo, hi) in r.ports.ranges() {
                ports.extend([lo, hi, lo.saturating_sub(1).max(1), hi.saturating_add(1)]);
            }
        }
        let addrs: Vec<IpAddr> = [
            "10.0.0.1", "10.0.0.0", "10.0.0.129", "10.0.0.200", "10.0.1.0", "10.1.0.0", "11.0.0.0", "::a00:1",
            "::a00:0", "::a00:2", "::1:0", "::1:0:0", "::", "0.0.0.0",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        for &dst in &addrs {
            let mut covering: Vec<_> = c.rules.iter().filter(|r| r.prefix.contains(&dst)).collect();
            covering.sort_by_key(|r| (r.kind.verdict_rule(), Reverse(r.prefix.prefix_len()), r.id));
            let entry = c.addr_entry(dst);
            prop_assert_eq!(entry.map_or(0, |e| e.icmp_rule), covering.first().map_or(0, |r| r.id));
            for proto in Proto::ALL {
                for &port in &ports {
                    let want = covering
                        .iter()
                        .find(|r| r.protocols.contains(&proto) && r.ports.contains(port))
                        .map(|r| r.id);
                    let got = entry.and_then(|e| c.port_rule(e, proto, port));
                    prop_assert_eq!(got, want, "dst {} {:?} port {}", dst, proto, port);
                }
            }
        }
    }
}
