//! Differential test: the kernel programs (TC egress and XDP forward, through BPF_PROG_TEST_RUN) and the
//! reference verdict decide the same action, reason and attribution for random packets under random
//! policies: valid and truncated frames, VLAN tags, IPv4 options, IPv6 extension chains, fragments (first
//! and non-first, of datagrams whose first fragment passed or not), ICMP/ICMPv6 incl. neighbour discovery,
//! replies of recorded flows; IPv4+IPv6 policies with overlapping prefixes, port ranges, reserved blocks,
//! audit mode.
//!
//! `VPCGATE_DIFF_PACKETS` (default 200000) and `VPCGATE_DIFF_POLICIES` (default 50) size the run;
//! `VPCGATE_DIFF_SEED` replays one. `cargo xtask test --diff-packets 10000000` is the long run.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use vpcgate::policy::{model::*, ports::PortSet, source::Pos};
use vpcgate_lab::{
    harness::{Enforcer, Harness},
    packet::{Ext, Frame, Layer, build},
};

/// xorshift64*: small, seedable, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const V4_BASE: u32 = 0x0a00_0000; // 10.0.0.0
const V6_BASE: u128 = 0xfd00u128 << 112; // fd00::

fn v4(host: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(V4_BASE | host))
}

fn v6(host: u128) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(V6_BASE | host))
}

/// A prefix in a small space (1024 hosts), so rules overlap.
fn random_net(r: &mut Rng) -> IpNet {
    if r.chance(50) {
        let len = if r.chance(60) {
            22 + r.below(5) as u8
        } else {
            27 + r.below(6) as u8
        };
        IpNet::new(v4(r.below(1024) as u32), len).unwrap().trunc()
    } else {
        let len = if r.chance(60) {
            118 + r.below(5) as u8
        } else {
            123 + r.below(6) as u8
        };
        IpNet::new(v6(u128::from(r.below(1024))), len)
            .unwrap()
            .trunc()
    }
}

fn random_ports(r: &mut Rng) -> PortSet {
    if r.chance(15) {
        return PortSet::all();
    }
    let mut ranges = vec![];
    for _ in 0..1 + r.below(3) {
        let lo = 1 + r.below(300) as u16;
        let hi = lo.saturating_add(r.below(60) as u16);
        ranges.push((lo, hi));
    }
    if r.chance(10) {
        ranges.push((1000, 65535));
    }
    PortSet::from_ranges(ranges)
}

fn random_policy(r: &mut Rng) -> Policy {
    let pos = Pos::default();
    let auths = (0..r.below(8))
        .map(|i| Authorization {
            name: format!("a{i}"),
            vpc_id: "vpc-1".into(),
            instance_id: None,
            instance_type: InstanceType::Ip,
            address: random_net(r),
            ports: random_ports(r),
            protocol: if r.chance(60) { Proto::Tcp } else { Proto::Udp },
            pos,
        })
        .collect();
    let nodes = (0..r.below(4))
        .map(|_| Node {
            address: random_net(r).addr(),
            port: 1 + r.below(300) as u16,
            weight: 1,
            pos,
        })
        .collect();
    let accessible = (0..r.below(5))
        .map(|_| Accessible {
            cidr: random_net(r),
            ports: random_ports(r),
            protocols: match r.below(3) {
                0 => vec![Proto::Tcp],
                1 => vec![Proto::Udp],
                _ => vec![Proto::Tcp, Proto::Udp],
            },
            pos,
        })
        .collect();
    let reserved = (0..r.below(3))
        .map(|_| {
            let n = random_net(r);
            // Narrow reserved blocks, so they carve holes instead of covering everything.
            let len = n.max_prefix_len() - r.below(5) as u8;
            Reserved {
                cidr: IpNet::new(n.addr(), len).unwrap().trunc(),
                source: ReservedSource::Explicit,
                pos,
            }
        })
        .collect();
    Policy {
        instance: Instance {
            name: "diff".into(),
            kind: Kind::VpcIntegration,
            vpc_id: "vpc-1".into(),
            interface: "eth1".into(),
            egress_ip: None,
            vswitch_cidr: r.chance(50).then(|| random_net(r)),
            vswitch_pos: pos,
            egress_pos: pos,
            zone: None,
            reserved,
            mode: if r.chance(20) {
                Mode::Audit
            } else {
                Mode::Enforce
            },
            forward_interfaces: vec![],
            host_essentials: HostEssential::ALL.to_vec(),
            flow_timeouts: FlowTimeouts::default(),
        },
        accessible,
        authorizations: auths,
        upstreams: vec![Upstream {
            name: "u".into(),
            description: None,
            vpc_id: "vpc-1".into(),
            protocol: UpstreamProtocol::Http,
            host_header: None,
            retries: 5,
            nodes,
            pos,
        }],
    }
}

/// `prev` edited in place (same rules, same mode): addresses, ports and protocols change, accessible
/// blocks are added or removed at the end. Applying it exercises the incremental path.
fn mutate(prev: &Policy, r: &mut Rng) -> Policy {
    let mut p = prev.clone();
    for a in p.authorizations.iter_mut() {
        if r.chance(40) {
            a.address = random_net(r);
        }
        if r.chance(40) {
            a.ports = random_ports(r);
        }
    }
    for n in p.upstreams.iter_mut().flat_map(|u| u.nodes.iter_mut()) {
        if r.chance(30) {
            n.port = 1 + r.below(300) as u16;
        }
    }
    if r.chance(50) {
        p.instance.reserved = (0..r.below(3))
            .map(|_| {
                p.instance.reserved.first().cloned().unwrap_or(Reserved {
                    cidr: random_net(r),
                    source: ReservedSource::Explicit,
                    pos: Pos::default(),
                })
            })
            .collect();
    }
    match r.below(3) {
        0 if !p.accessible.is_empty() => {
            p.accessible.pop();
        }
        1 => p.accessible.push(Accessible {
            cidr: random_net(r),
            ports: random_ports(r),
            protocols: vec![Proto::Tcp],
            pos: Pos::default(),
        }),
        _ => {
            for a in p.accessible.iter_mut() {
                a.cidr = random_net(r);
            }
        }
    }
    p
}

/// Addresses and ports where the policy's decisions change.
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
    let mut addrs = vec![v4(1), v6(1)];
    for n in nets {
        addrs.extend([n.network(), n.broadcast()]);
    }
    let mut ports = vec![1, 65535];
    for ps in p
        .authorizations
        .iter()
        .map(|a| &a.ports)
        .chain(p.accessible.iter().map(|a| &a.ports))
    {
        for &(lo, hi) in ps.ranges() {
            ports.extend([lo, hi, lo.saturating_sub(1).max(1), hi.saturating_add(1)]);
        }
    }
    ports.extend(
        p.upstreams
            .iter()
            .flat_map(|u| u.nodes.iter().map(|n| n.port)),
    );
    (addrs, ports)
}

fn octets4(a: IpAddr) -> [u8; 4] {
    match a {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => unreachable!(),
    }
}

fn octets6(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(_) => unreachable!(),
    }
}

/// A random frame toward `dst` (`frag_id` for fragments).
fn random_frame(r: &mut Rng, dst: IpAddr, port: u16, frag_id: u32) -> Frame {
    let mut layers = vec![];
    for _ in 0..r.pick(&[0, 0, 0, 0, 1, 2]) {
        layers.push(Layer::Vlan {
            tpid: r.pick(&[0x8100, 0x88a8]),
            vid: r.below(4095) as u16,
        });
    }
    if r.chance(2) {
        layers.push(Layer::Arp);
        return build("arp", &layers, 0);
    }
    let v6 = dst.is_ipv6();
    // Fragment position: mostly whole datagrams.
    let frag = r.pick(&[0u8, 0, 0, 0, 0, 0, 1, 2]); // 1 first, 2 non-first
    if v6 {
        layers.push(Layer::Ipv6 {
            src: octets6(v6_src()),
            dst: octets6(dst),
        });
        for _ in 0..r.pick(&[0, 0, 0, 1, 2, 3]) {
            layers.push(Layer::Ext(match r.below(4) {
                0 => Ext::HopByHop {
                    len8: r.below(2) as u8,
                },
                1 => Ext::DstOpts {
                    len8: r.below(2) as u8,
                },
                2 => Ext::Routing {
                    len8: r.below(2) as u8,
                },
                _ => Ext::Ah {
                    len4: 1 + r.below(3) as u8,
                },
            }));
        }
        if frag != 0 {
            let offset = if frag == 1 {
                0
            } else {
                1 + r.below(100) as u16
            };
            layers.push(Layer::Ext(Ext::Fragment {
                offset,
                more: frag == 1 || r.chance(50),
                id: frag_id,
            }));
        }
    } else {
        let (frag_offset, more_fragments) = match frag {
            1 => (0, true),
            2 => (1 + r.below(100) as u16, r.chance(50)),
            _ => (0, false),
        };
        layers.push(Layer::Ipv4 {
            src: [10, 0, 0, 5],
            dst: octets4(dst),
            options: r.pick(&[0, 0, 0, 1, 3]),
            frag_offset,
            more_fragments,
            id: frag_id as u16,
        });
    }
    let sport = 30000 + r.below(1000) as u16;
    layers.push(match r.below(12) {
        0..=4 => Layer::Tcp {
            sport,
            dport: port,
            flags: r.pick(&[0x02, 0x10, 0x18, 0x12, 0x04]),
            options: r.pick(&[0, 0, 3]),
        },
        5..=7 => Layer::Udp { sport, dport: port },
        8 | 9 => Layer::Icmp {
            kind: if v6 {
                r.pick(&[128, 129, 1, 2, 3, 4, 133, 134, 135, 136, 137, 143])
            } else {
                r.pick(&[8, 0, 3, 11, 5, 13, 12])
            },
            code: r.below(5) as u8,
        },
        // A non-first fragment's payload is opaque whatever its protocol; a whole datagram of protocol 6 or
        // 17 would be a TCP/UDP header, so those only follow fragment headers.
        _ if frag == 2 => Layer::Proto {
            proto: r.pick(&[6, 17, 1, 47]),
            len: 16,
        },
        _ => Layer::Proto {
            proto: r.pick(&[47, 50, 132]),
            len: 16,
        },
    });
    let frame = build("random", &layers, r.below(40) as usize);
    if r.chance(8) {
        let len = 14 + r.below((frame.bytes.len() - 14) as u64) as usize;
        return frame.truncated(len);
    }
    frame
}

fn v6_src() -> IpAddr {
    v6(5)
}

#[test]
fn kernel_and_reference_agree_on_random_packets_and_policies() {
    vpcgate_lab::require_root();
    let packets = env("VPCGATE_DIFF_PACKETS", 200_000);
    let policies = env("VPCGATE_DIFF_POLICIES", 50).max(1);
    let seed = env("VPCGATE_DIFF_SEED", 0x5eed_1234_abcd_0001);
    eprintln!(
        "differential: {packets} packets over {policies} policies, seed {seed:#x} (VPCGATE_DIFF_SEED)"
    );
    let mut r = Rng(seed);
    let mut h = Harness::new();
    let per_policy = packets.div_ceil(policies);
    let (mut ran, mut mismatches, mut replies, mut tc_runs) = (0u64, vec![], 0u64, 0u64);
    // Policies applied in place (same rule identities and mode as the one before): the final state of an
    // incremental apply must decide exactly like the reference too.
    let mut incremental = 0u64;
    let mut previous: Option<Policy> = None;
    let mut kinds = std::collections::BTreeMap::<String, u64>::new();
    for policy_no in 0..policies {
        let policy = match &previous {
            Some(prev) if r.chance(50) => mutate(prev, &mut r),
            _ => random_policy(&mut r),
        };
        previous = Some(policy.clone());
        if h.apply(&policy).incremental {
            incremental += 1;
        }
        let (addrs, ports) = interesting(&policy);
        let mut pending_first: Vec<(IpAddr, u16, u32)> = vec![];
        for i in 0..per_policy {
            if ran >= packets {
                break;
            }
            let dst = if r.chance(75) {
                r.pick(&addrs)
            } else if r.chance(50) {
                v4(r.below(1100) as u32)
            } else {
                v6(u128::from(r.below(1100)))
            };
            let port = if r.chance(70) {
                r.pick(&ports)
            } else {
                1 + r.below(65535) as u16
            };
            // Fragment ids cycle in a small range so non-first fragments meet their first fragments.
            let frag_id = (policy_no as u32) << 8 | (r.below(32) as u32);
            let frame = if !pending_first.is_empty() && r.chance(20) {
                let (d, p, id) = pending_first.swap_remove(0);
                random_frame(&mut r, d, p, id)
            } else {
                random_frame(&mut r, dst, port, frag_id)
            };
            if r.chance(4) && h.add_reply_flow(&frame) {
                replies += 1;
            }
            if frame.describe().frag_id.is_some() {
                pending_first.push((dst, port, frag_id));
            }
            let accepts_skb = {
                let et = u16::from_be_bytes([frame.bytes[12], frame.bytes[13]]);
                let len = frame.bytes.len();
                !(et == 0x0800 && len < 34 || et == 0x86dd && len < 54)
            };
            for enforcer in [Enforcer::TcEgress, Enforcer::XdpForward] {
                if enforcer == Enforcer::TcEgress {
                    if !accepts_skb {
                        continue;
                    }
                    tc_runs += 1;
                }
                if let Some(m) = h.check(enforcer, &frame) {
                    mismatches.push(format!("policy {policy_no} packet {i}: {m}"));
                }
            }
            *kinds
                .entry(
                    format!("{:?}", h.reference(&frame).basis)
                        .split('(')
                        .next()
                        .unwrap()
                        .to_owned(),
                )
                .or_default() += 1;
            ran += 1;
            if mismatches.len() > 20 {
                break;
            }
        }
        if mismatches.len() > 20 {
            break;
        }
    }
    eprintln!(
        "differential: {ran} packets ({tc_runs} through TC too), {replies} recorded reply flows, {incremental} of {policies} policies applied incrementally; verdict bases: {kinds:?}"
    );
    assert!(
        mismatches.is_empty(),
        "{} mismatches (seed {seed:#x}):\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    assert_eq!(ran, packets, "ran fewer packets than asked");
    assert!(
        policies < 10 || incremental > 0,
        "no policy was applied incrementally: that path went untested"
    );
    // The run must have exercised every kind of decision, or it proves less than it claims.
    for basis in [
        "NotIp",
        "NeighbourDiscovery",
        "Malformed",
        "Reply",
        "Reserved",
        "Rule",
        "IcmpError",
        "FragmentOfPassedDatagram",
        "FragmentUnverified",
        "Covered",
        "NoRule",
    ] {
        assert!(
            kinds.get(basis).copied().unwrap_or(0) > 0,
            "no packet was decided by {basis}: {kinds:?}"
        );
    }
}
