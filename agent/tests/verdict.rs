//! The reference verdict, rule by rule (DESIGN.md "Verdict"), for IPv4 and IPv6.

use std::net::IpAddr;

use vpcgate::policy::{
    check_text,
    compile::Compiled,
    verdict::{Action, Basis, FlowFacts, Fragment, IpPacket, L4, Packet, Verdict, verdict},
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
    Packet::Ip(IpPacket {
        src,
        dst,
        l4,
        fragment: Fragment::None,
    })
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

fn v(c: &Compiled, p: Packet) -> Verdict {
    verdict(c, &p, FlowFacts::default())
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

#[test]
fn rule_1_non_ip_and_neighbour_discovery_pass() {
    let c = compiled("enforce");
    assert_eq!(v(&c, Packet::NonIp), pass(Basis::NotIp));
    for kind in 133..=137 {
        // Even toward an address nothing allows (solicited-node multicast).
        assert_eq!(
            v(&c, ip("ff02::1:ff00:7", L4::Icmpv6 { kind, code: 0 })),
            pass(Basis::NeighbourDiscovery)
        );
    }
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
        first_fragment_passed: false,
    };
    for dst in ["203.0.113.9", "172.20.0.1", "2001:db8::9", "fd00:dead::1"] {
        assert_eq!(
            verdict(&c, &tcp(dst, 40000), facts),
            pass(Basis::Reply),
            "{dst}"
        );
    }
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
        reply: false,
        first_fragment_passed: true,
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
    ] {
        assert_eq!(v(&c, ip(dst, l4)), pass(Basis::IcmpError), "{l4:?}");
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
