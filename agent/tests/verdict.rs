//! The reference verdict, rule by rule (DESIGN.md "Verdict"), for IPv4 and IPv6.

use std::net::IpAddr;

use vpcgate::policy::{
    check_text,
    compile::Compiled,
    verdict::{
        Action, Basis, FlowFacts, Fragment, HostEssentialKind, IpPacket, L4, Packet, Verdict,
        verdict,
    },
};
use vpcgate_common::verdict::DropReason;

const POLICY: &str = r#"[instance]
name = "gw"
kind = "vpc-integration"
vpc_id = "vpc-1"
interface = "eth1"
vswitch_cidr = "10.0.0.0/24"
zone = "cn-hangzhou-b"
reserved_cidrs = ["fd00:dead::/32"]
mode = "MODE"

[[accessible]]
cidr = "10.1.0.0/16"
ports = ["80", "8000-8100"]
protocols = ["tcp"]

[[accessible]]
cidr = "fd00:1::/48"
ports = ["443"]

[[accessible]]
cidr = "10.2.0.0/16"

[[accessible]]
cidr = "fd00:2::/48"

[[authorization]]
name = "broad"
vpc_id = "vpc-1"
address = "10.1.3.0/24"
ports = ["9000"]

[[authorization]]
name = "narrow"
vpc_id = "vpc-1"
address = "10.1.3.7"
ports = ["9001", "80"]

[[authorization]]
name = "v6-narrow"
vpc_id = "vpc-1"
address = "fd00:1::7"
ports = ["9443"]
protocol = "udp"

[[upstream]]
name = "pool"
vpc_id = "vpc-1"
nodes = [ { address = "10.1.3.8", port = 8080 }, { address = "fd00:1::8", port = 8080 } ]
"#;

fn compiled(mode: &str) -> Compiled {
    let c = check_text("v.toml", &POLICY.replace("MODE", mode));
    let p = c.policy.unwrap_or_else(|| panic!("{:?}", c.diagnostics));
    Compiled::new(&p)
}

fn rule_id(c: &Compiled, name: &str) -> u32 {
    c.rules
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no rule {name}"))
        .id
}

fn ip(dst: &str, l4: L4) -> Packet {
    let dst: IpAddr = dst.parse().unwrap();
    let src = if dst.is_ipv4() {
        "10.0.0.5".parse().unwrap()
    } else {
        "fd00::5".parse().unwrap()
    };
    Packet::Ip(IpPacket::new(src, dst, l4, Fragment::None))
}

fn frag(dst: &str, proto: u8) -> Packet {
    let Packet::Ip(mut p) = ip(dst, L4::Other { proto }) else {
        unreachable!()
    };
    p.fragment = Fragment::NonFirst;
    Packet::Ip(p)
}

fn tcp(dst: &str, dport: u16) -> Packet {
    ip(dst, L4::Tcp { dport })
}

fn udp(dst: &str, dport: u16) -> Packet {
    ip(dst, L4::Udp { dport })
}

/// The gateway's own packet (TC egress, not forwarded), with no flow state.
fn local() -> FlowFacts {
    FlowFacts {
        local_origin: true,
        ..FlowFacts::default()
    }
}

fn v(c: &Compiled, p: Packet) -> Verdict {
    verdict(c, &p, local())
}

fn pass(basis: Basis) -> Verdict {
    Verdict {
        action: Action::Pass,
        reason: None,
        basis,
        audit: false,
    }
}

fn drop(reason: DropReason, basis: Basis) -> Verdict {
    Verdict {
        action: Action::Drop,
        reason: Some(reason),
        basis,
        audit: false,
    }
}

/// `p` with its IP fields changed by `edit`.
fn with(p: Packet, edit: impl FnOnce(&mut IpPacket)) -> Packet {
    let Packet::Ip(mut ip) = p else {
        unreachable!()
    };
    edit(&mut ip);
    Packet::Ip(ip)
}

fn nd(dst: &str, kind: u8, hop_limit: u8) -> Packet {
    with(ip(dst, L4::Icmpv6 { kind, code: 0 }), |p| {
        p.hop_limit = hop_limit
    })
}

#[test]
fn rule_1_non_ip_and_neighbour_discovery_pass() {
    let c = compiled("enforce");
    assert_eq!(v(&c, Packet::NonIp), pass(Basis::NotIp));
    for kind in 133..=137 {
        // Even toward an address nothing allows: link-local, solicited-node multicast.
        for dst in ["ff02::1:ff00:7", "fe80::1", "ff02::2"] {
            assert_eq!(
                v(&c, nd(dst, kind, 255)),
                pass(Basis::NeighbourDiscovery),
                "{dst} {kind}"
            );
        }
    }
}

#[test]
fn rule_1_neighbour_discovery_only_as_rfc_4861_sends_it() {
    let c = compiled("enforce");
    let malformed = drop(DropReason::Malformed, Basis::Malformed);
    for kind in 133..=137 {
        // A router would forward a packet with a lower hop limit: it may come from off-link.
        assert_eq!(v(&c, nd("fe80::1", kind, 64)), malformed, "{kind}");
        assert_eq!(v(&c, nd("fe80::1", kind, 254)), malformed, "{kind}");
        // A global destination outside the on-link prefix: data to an arbitrary host.
        assert_eq!(v(&c, nd("2001:db8::9", kind, 255)), malformed, "{kind}");
        assert_eq!(v(&c, nd("ff05::2", kind, 255)), malformed, "{kind}");
        // Fragmented ND is invalid (RFC 6980).
        assert_eq!(
            v(
                &c,
                with(nd("fe80::1", kind, 255), |p| p.fragment = Fragment::First)
            ),
            malformed,
            "{kind}"
        );
    }
    // The on-link prefix is the vSwitch block when it is IPv6.
    let v6 = Compiled::new(
        &check_text(
            "v.toml",
            &POLICY
                .replace("MODE", "enforce")
                .replace("10.0.0.0/24", "fd00:7::/64"),
        )
        .policy
        .unwrap(),
    );
    assert_eq!(
        v(&v6, nd("fd00:7::9", 136, 255)),
        pass(Basis::NeighbourDiscovery)
    );
    assert_eq!(v(&v6, nd("fd00:8::9", 136, 255)), malformed);
    assert_eq!(v(&c, nd("fd00:7::9", 136, 255)), malformed);
    // ... and the ENI's own on-link prefixes, which the agent tells the kernel (a VPC host that spoke first
    // is answered at its global address).
    let on_link = FlowFacts {
        on_link: true,
        ..local()
    };
    assert_eq!(
        verdict(&c, &nd("fd00:7::9", 136, 255), on_link),
        pass(Basis::NeighbourDiscovery)
    );
    assert_eq!(verdict(&c, &nd("fd00:7::9", 136, 64), on_link), malformed);
}

#[test]
fn rule_1_host_essentials_pass_while_on() {
    let dhcp4 = with(udp("255.255.255.255", 67), |p| p.sport = 68);
    let dhcp4_unicast = with(udp("10.9.9.1", 67), |p| p.sport = 68);
    let on_link = FlowFacts {
        on_link: true,
        ..local()
    };
    let dhcp6 = with(udp("ff02::1:2", 547), |p| p.sport = 546);
    let mld = with(ip("ff02::16", L4::Icmpv6 { kind: 143, code: 0 }), |p| {
        p.hop_limit = 1
    });
    let c = compiled("enforce");
    assert_eq!(
        v(&c, dhcp4),
        pass(Basis::HostEssential(HostEssentialKind::Dhcpv4))
    );
    // A renewal goes to the server on the link; to an address off the link it is no DHCP.
    assert_eq!(
        verdict(&c, &dhcp4_unicast, on_link),
        pass(Basis::HostEssential(HostEssentialKind::Dhcpv4))
    );
    assert_eq!(
        v(&c, dhcp4_unicast),
        drop(DropReason::NotAuthorized, Basis::NoRule)
    );
    // DHCPv6 clients send to ff02::1:2 only.
    assert_ne!(
        v(&c, with(udp("fd00:1::9", 547), |p| p.sport = 546)).action,
        Action::Pass
    );
    assert_eq!(
        v(&c, dhcp6),
        pass(Basis::HostEssential(HostEssentialKind::Dhcpv6))
    );
    assert_eq!(
        v(&c, mld),
        pass(Basis::HostEssential(HostEssentialKind::Mld))
    );
    // Only the client's ports, only MLD reports with hop limit 1 to ff02::16, only whole datagrams.
    assert_ne!(
        v(&c, with(udp("10.9.9.1", 67), |p| p.sport = 67)).action,
        Action::Pass
    );
    assert_ne!(
        v(&c, with(udp("10.9.9.1", 68), |p| p.sport = 68)).action,
        Action::Pass
    );
    assert_ne!(v(&c, with(mld, |p| p.hop_limit = 2)).action, Action::Pass);
    assert_ne!(
        v(&c, with(mld, |p| p.dst = "ff02::1".parse().unwrap())).action,
        Action::Pass
    );
    assert_ne!(
        v(&c, with(dhcp4, |p| p.fragment = Fragment::First)).action,
        Action::Pass
    );
    // DHCPv4 ports over IPv6 (and DHCPv6 ports over IPv4) are not DHCP.
    assert_ne!(
        v(&c, with(udp("2001:db8::1", 67), |p| p.sport = 68)).action,
        Action::Pass
    );
    // `host_essentials = []` turns them off: the policy decides.
    let off = Compiled::new(
        &check_text(
            "v.toml",
            &POLICY
                .replace("MODE", "enforce")
                .replace("mode = ", "host_essentials = []\nmode = "),
        )
        .policy
        .unwrap(),
    );
    assert_eq!(
        v(&off, dhcp4),
        drop(DropReason::NotAuthorized, Basis::NoRule)
    );
    assert_eq!(
        v(&off, dhcp6),
        drop(DropReason::NotAuthorized, Basis::NoRule)
    );
    assert_eq!(v(&off, mld), drop(DropReason::NotAuthorized, Basis::NoRule));
}

#[test]
fn forwarded_packets_are_never_host_essentials_replies_or_icmp_errors() {
    let c = compiled("enforce");
    // A pod behind a forward interface chooses its addresses and ports: none of these may pass because
    // of what only the host itself sends.
    let forwarded = FlowFacts {
        reply: true,
        half_open: true,
        on_link: true,
        local_origin: false,
        first_fragment_passed: false,
    };
    let dhcp4 = with(udp("255.255.255.255", 67), |p| p.sport = 68);
    assert_eq!(
        verdict(&c, &dhcp4, forwarded),
        drop(DropReason::NotAuthorized, Basis::NoRule)
    );
    let mld = with(ip("ff02::16", L4::Icmpv6 { kind: 143, code: 0 }), |p| {
        p.hop_limit = 1
    });
    assert_eq!(verdict(&c, &mld, forwarded).action, Action::Drop);
    assert_eq!(
        verdict(
            &c,
            &with(tcp("10.9.9.9", 5000), |p| p.tcp_flags = 0x10),
            forwarded
        ),
        drop(DropReason::NotAuthorized, Basis::NoRule)
    );
    let error = with(ip("10.9.9.9", L4::Icmp { kind: 3, code: 3 }), |p| {
        p.quoted = Some((p.dst, p.src))
    });
    assert_eq!(
        verdict(&c, &error, forwarded),
        drop(DropReason::NotAuthorized, Basis::IcmpError)
    );
    // The host's own error passes, but never fragmented (the stack never fragments its errors).
    assert_eq!(v(&c, error), pass(Basis::IcmpError));
    assert_eq!(
        v(&c, with(error, |p| p.fragment = Fragment::First)),
        drop(DropReason::NotAuthorized, Basis::IcmpError)
    );
    // Neighbour discovery is link plumbing either way.
    assert_eq!(
        verdict(&c, &nd("fe80::1", 135, 255), forwarded),
        pass(Basis::NeighbourDiscovery)
    );
}

#[test]
fn rule_2_source_routed_drops_before_anything_passes() {
    let c = compiled("enforce");
    let routed = |p: Packet| with(p, |p| p.source_routed = true);
    let want = drop(DropReason::SourceRouted, Basis::SourceRouted);
    // Even what the policy allows, neighbour discovery, host essentials and replies.
    assert_eq!(v(&c, routed(tcp("10.1.3.7", 9001))), want);
    assert_eq!(v(&c, routed(nd("fe80::1", 135, 255))), want);
    assert_eq!(
        v(
            &c,
            routed(with(udp("255.255.255.255", 67), |p| p.sport = 68))
        ),
        want
    );
    let facts = FlowFacts {
        reply: true,
        ..local()
    };
    assert_eq!(
        verdict(
            &c,
            &routed(with(tcp("10.9.9.9", 5000), |p| p.tcp_flags = 0x10)),
            facts
        ),
        want
    );
    assert_eq!(
        v(&compiled("audit"), routed(tcp("10.1.3.7", 9001))).reason,
        Some(DropReason::SourceRouted)
    );
}

#[test]
fn rule_2_malformed_drops() {
    let c = compiled("enforce");
    assert_eq!(
        v(&c, Packet::Malformed),
        drop(DropReason::Malformed, Basis::Malformed)
    );
}

#[test]
fn rule_3_replies_of_inbound_flows_pass_before_anything_else() {
    let c = compiled("enforce");
    let facts = FlowFacts {
        reply: true,
        ..local()
    };
    for dst in ["203.0.113.9", "172.20.0.1", "2001:db8::9", "fd00:dead::1"] {
        for flags in [0x10, 0x18, 0x11, 0x04, 0x12] {
            assert_eq!(
                verdict(&c, &with(tcp(dst, 40000), |p| p.tcp_flags = flags), facts),
                pass(Basis::Reply),
                "{dst} {flags:#x}"
            );
        }
        assert_eq!(verdict(&c, &udp(dst, 40000), facts), pass(Basis::Reply));
        let echo_reply = if dst.contains(':') {
            L4::Icmpv6 { kind: 129, code: 0 }
        } else {
            L4::Icmp { kind: 0, code: 0 }
        };
        assert_eq!(verdict(&c, &ip(dst, echo_reply), facts), pass(Basis::Reply));
    }
}

#[test]
fn rule_3_a_peer_cannot_open_the_egress_by_sending_first() {
    let c = compiled("enforce");
    let flow = FlowFacts {
        reply: true,
        ..local()
    };
    let half_open = FlowFacts {
        half_open: true,
        ..local()
    };
    let denied = drop(DropReason::NotAuthorized, Basis::NoRule);
    // A bare SYN from the gateway is never a reply, whatever the flow state says.
    assert_eq!(verdict(&c, &tcp("10.9.9.9", 5000), flow), denied);
    assert_eq!(verdict(&c, &tcp("10.9.9.9", 5000), half_open), denied);
    // A half-open flow is answered by the gateway's SYN-ACK or RST only.
    for flags in [0x12, 0x04, 0x14] {
        assert_eq!(
            verdict(
                &c,
                &with(tcp("10.9.9.9", 5000), |p| p.tcp_flags = flags),
                half_open
            ),
            pass(Basis::Reply),
            "{flags:#x}"
        );
    }
    for flags in [0x10, 0x18, 0x11] {
        assert_eq!(
            verdict(
                &c,
                &with(tcp("10.9.9.9", 5000), |p| p.tcp_flags = flags),
                half_open
            ),
            denied,
            "{flags:#x}"
        );
    }
    // Datagrams and echo replies need an established (live) flow; a non-first fragment has no ports.
    assert_eq!(verdict(&c, &udp("10.9.9.9", 5000), half_open), denied);
    assert_eq!(verdict(&c, &udp("10.9.9.9", 5000), local()), denied);
    assert_eq!(
        verdict(&c, &frag("10.9.9.9", 17), flow).reason,
        Some(DropReason::FragmentUnverified)
    );
    // ICMP errors and echo requests are never replies.
    assert_eq!(
        verdict(&c, &ip("10.9.9.9", L4::Icmp { kind: 8, code: 0 }), flow),
        denied
    );
}

#[test]
fn rule_4_reserved_blocks_drop_zone_and_explicit() {
    let c = compiled("enforce");
    let zone = c
        .reserved
        .iter()
        .position(|r| r.cidr.to_string() == "172.20.0.0/16")
        .unwrap();
    let explicit = c
        .reserved
        .iter()
        .position(|r| r.cidr.to_string() == "fd00:dead::/32")
        .unwrap();
    assert_eq!(
        v(&c, tcp("172.20.9.9", 80)),
        drop(DropReason::ReservedRange, Basis::Reserved(zone))
    );
    assert_eq!(
        v(&c, udp("fd00:dead::1", 53)),
        drop(DropReason::ReservedRange, Basis::Reserved(explicit))
    );
    // Reserved wins over ICMP echo and fragments too.
    assert_eq!(
        v(&c, ip("172.20.9.9", L4::Icmp { kind: 8, code: 0 })).reason,
        Some(DropReason::ReservedRange)
    );
    assert_eq!(
        v(&c, frag("fd00:dead::1", 17)).reason,
        Some(DropReason::ReservedRange)
    );
}

#[test]
fn rule_5_authorizations_and_upstream_nodes_longest_prefix_first() {
    let c = compiled("enforce");
    // 10.1.3.7 is covered by `narrow` (/32), `broad` (/24) and accessible 10.1.0.0/16.
    assert_eq!(
        v(&c, tcp("10.1.3.7", 9001)),
        pass(Basis::Rule(rule_id(&c, "narrow")))
    );
    // Port 80 is in `narrow` and in the accessible block: rule 5 before rule 6.
    assert_eq!(
        v(&c, tcp("10.1.3.7", 80)),
        pass(Basis::Rule(rule_id(&c, "narrow")))
    );
    // Port 9000 only the covering /24 allows: the /32's LPM entry must carry it.
    assert_eq!(
        v(&c, tcp("10.1.3.7", 9000)),
        pass(Basis::Rule(rule_id(&c, "broad")))
    );
    assert_eq!(
        v(&c, tcp("10.1.3.8", 8080)),
        pass(Basis::Rule(rule_id(&c, "pool")))
    );
    assert_eq!(
        v(&c, tcp("fd00:1::8", 8080)),
        pass(Basis::Rule(rule_id(&c, "pool") + 1))
    );
    assert_eq!(
        v(&c, udp("fd00:1::7", 9443)),
        pass(Basis::Rule(rule_id(&c, "v6-narrow")))
    );
}

#[test]
fn rule_6_accessible_blocks_with_port_ranges_and_protocols() {
    let c = compiled("enforce");
    let a = |cidr: &str| rule_id(&c, cidr);
    assert_eq!(
        v(&c, tcp("10.1.200.1", 8000)),
        pass(Basis::Rule(a("10.1.0.0/16")))
    );
    assert_eq!(
        v(&c, tcp("10.1.200.1", 8100)),
        pass(Basis::Rule(a("10.1.0.0/16")))
    );
    assert_eq!(
        v(&c, tcp("10.1.200.1", 8101)).reason,
        Some(DropReason::PortNotAuthorized)
    );
    assert_eq!(
        v(&c, tcp("10.1.200.1", 7999)).reason,
        Some(DropReason::PortNotAuthorized)
    );
    // protocols = ["tcp"]
    assert_eq!(
        v(&c, udp("10.1.200.1", 80)),
        drop(
            DropReason::PortNotAuthorized,
            Basis::Covered(a("10.1.0.0/16"))
        )
    );
    // The vSwitch block: every port, both protocols.
    assert_eq!(
        v(&c, udp("10.0.0.77", 5353)),
        pass(Basis::Rule(a("10.0.0.0/24")))
    );
    assert_eq!(
        v(&c, tcp("fd00:1::99", 443)),
        pass(Basis::Rule(a("fd00:1::/48")))
    );
    assert_eq!(
        v(&c, udp("fd00:1::99", 443)),
        pass(Basis::Rule(a("fd00:1::/48")))
    );
    assert_eq!(
        v(&c, tcp("fd00:2:0:1::5", 1)),
        pass(Basis::Rule(a("fd00:2::/48")))
    );
}

#[test]
fn rule_7_port_not_authorized_versus_not_authorized() {
    let c = compiled("enforce");
    assert_eq!(
        v(&c, tcp("10.1.3.7", 22)),
        drop(
            DropReason::PortNotAuthorized,
            Basis::Covered(rule_id(&c, "narrow"))
        )
    );
    assert_eq!(
        v(&c, tcp("fd00:1::7", 22)),
        drop(
            DropReason::PortNotAuthorized,
            Basis::Covered(rule_id(&c, "v6-narrow"))
        )
    );
    assert_eq!(
        v(&c, tcp("10.9.0.4", 80)),
        drop(DropReason::NotAuthorized, Basis::NoRule)
    );
    assert_eq!(
        v(&c, udp("2001:db8::1", 53)),
        drop(DropReason::NotAuthorized, Basis::NoRule)
    );
    // A protocol without ports (GRE) toward a covered address.
    assert_eq!(
        v(&c, ip("10.0.0.9", L4::Other { proto: 47 })).reason,
        Some(DropReason::PortNotAuthorized)
    );
    assert_eq!(
        v(&c, ip("10.9.0.9", L4::Other { proto: 47 })).reason,
        Some(DropReason::NotAuthorized)
    );
}

#[test]
fn non_first_fragments_pass_only_toward_all_ports_or_after_their_first_fragment() {
    let c = compiled("enforce");
    // 10.2.0.0/16 and the vSwitch allow every port of both protocols.
    assert_eq!(
        v(&c, frag("10.2.3.4", 17)),
        pass(Basis::Rule(rule_id(&c, "10.2.0.0/16")))
    );
    assert_eq!(
        v(&c, frag("fd00:2::4", 6)),
        pass(Basis::Rule(rule_id(&c, "fd00:2::/48")))
    );
    // 10.1.0.0/16 is port-restricted: the fragment cannot be verified on its own.
    assert_eq!(
        v(&c, frag("10.1.3.7", 6)),
        drop(DropReason::FragmentUnverified, Basis::FragmentUnverified)
    );
    assert_eq!(
        v(&c, frag("fd00:1::7", 17)),
        drop(DropReason::FragmentUnverified, Basis::FragmentUnverified)
    );
    let first_passed = FlowFacts {
        first_fragment_passed: true,
        ..local()
    };
    assert_eq!(
        verdict(&c, &frag("10.1.3.7", 6), first_passed),
        pass(Basis::FragmentOfPassedDatagram)
    );
    // ICMP fragments (large pings) have no "all ports": only the first fragment vouches for them.
    assert_eq!(
        v(&c, frag("10.2.3.4", 1)).reason,
        Some(DropReason::FragmentUnverified)
    );
}

#[test]
fn icmp_echo_toward_covered_addresses_and_errors_pass() {
    let c = compiled("enforce");
    assert_eq!(
        v(&c, ip("10.1.3.7", L4::Icmp { kind: 8, code: 0 })),
        pass(Basis::Rule(rule_id(&c, "narrow")))
    );
    assert_eq!(
        v(&c, ip("fd00:1::99", L4::Icmpv6 { kind: 128, code: 0 })),
        pass(Basis::Rule(rule_id(&c, "fd00:1::/48")))
    );
    assert_eq!(
        v(&c, ip("10.9.9.9", L4::Icmp { kind: 8, code: 0 })),
        drop(DropReason::NotAuthorized, Basis::NoRule)
    );
    assert_eq!(
        v(&c, ip("2001:db8::1", L4::Icmpv6 { kind: 128, code: 0 })),
        drop(DropReason::NotAuthorized, Basis::NoRule)
    );
    for (dst, l4) in [
        ("10.9.9.9", L4::Icmp { kind: 3, code: 3 }),
        ("10.9.9.9", L4::Icmp { kind: 11, code: 0 }),
        ("2001:db8::1", L4::Icmpv6 { kind: 1, code: 4 }),
        ("2001:db8::1", L4::Icmpv6 { kind: 2, code: 0 }),
        ("2001:db8::1", L4::Icmpv6 { kind: 3, code: 0 }),
        ("10.9.9.9", L4::Icmp { kind: 12, code: 0 }),
        ("2001:db8::1", L4::Icmpv6 { kind: 4, code: 1 }),
    ] {
        // An error answering a packet this host received (it quotes that packet) passes, toward any
        // address; one quoting anything else would carry data to an arbitrary host.
        let answer = with(ip(dst, l4), |p| p.quoted = Some((p.dst, p.src)));
        assert_eq!(v(&c, answer), pass(Basis::IcmpError), "{l4:?}");
        let foreign = with(ip(dst, l4), |p| p.quoted = Some((p.dst, p.dst)));
        assert_eq!(
            v(&c, foreign),
            drop(DropReason::NotAuthorized, Basis::IcmpError),
            "{l4:?}"
        );
        let spoofed_source = with(ip(dst, l4), |p| p.quoted = Some((p.src, p.src)));
        assert_eq!(v(&c, spoofed_source).action, Action::Drop, "{l4:?}");
        assert_eq!(v(&c, ip(dst, l4)).action, Action::Drop, "{l4:?}");
    }
    // Other ICMP (timestamp) toward a covered address: not this protocol.
    assert_eq!(
        v(&c, ip("10.1.3.7", L4::Icmp { kind: 13, code: 0 })).reason,
        Some(DropReason::PortNotAuthorized)
    );
}

#[test]
fn audit_mode_passes_would_be_drops_with_their_reason() {
    let c = compiled("audit");
    let audit = |reason, basis| Verdict {
        action: Action::Pass,
        reason: Some(reason),
        basis,
        audit: true,
    };
    assert_eq!(
        v(&c, tcp("10.9.0.4", 80)),
        audit(DropReason::NotAuthorized, Basis::NoRule)
    );
    assert_eq!(
        v(&c, Packet::Malformed),
        audit(DropReason::Malformed, Basis::Malformed)
    );
    assert_eq!(
        v(&c, tcp("fd00:1::7", 22)),
        audit(
            DropReason::PortNotAuthorized,
            Basis::Covered(rule_id(&c, "v6-narrow"))
        )
    );
    // What enforce passes, audit passes unmarked.
    assert_eq!(
        v(&c, tcp("10.1.3.7", 9001)),
        pass(Basis::Rule(rule_id(&c, "narrow")))
    );
}
