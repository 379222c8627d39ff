//! Differential test: the kernel programs (TC egress and XDP forward, through BPF_PROG_TEST_RUN) and the
//! reference verdict decide the same action, reason and attribution for random packets under random
//! policies applied in sequence (new generations and incremental applies, protocol flips of shared port
//! tables, host essentials on and off): valid and truncated frames, VLAN tags, IPv4 options incl. source
//! routes, IPv6 extension chains (longer than the walk limit, routing headers with segments left, headers
//! after the fragment header), zero length fields, fragments (first and non-first, of datagrams whose
//! first fragment passed, dropped or never came), ICMP/ICMPv6 incl. neighbour discovery with every hop
//! limit and scope, MLD, ICMP errors quoting this host's packets or foreign ones, DHCP/DHCPv6; replies of
//! flows peers opened through the ENI's XDP ingress (toward the gateway's sockets or forged toward
//! nothing), of live, expired, closing and half-open flows.
//!
//! Each run draws a fresh seed (printed); `VPCGATE_DIFF_SEED` replays one. `VPCGATE_DIFF_PACKETS`
//! (default 200000) and `VPCGATE_DIFF_POLICIES` (default 200) size the run.
//! `cargo xtask test --diff-packets 10000000` is the long run.

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

fn env(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    Some(
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => v.parse(),
        }
        .unwrap_or_else(|e| panic!("{name}={v}: {e}")),
    )
}

/// A fresh seed from the kernel's entropy.
fn fresh_seed() -> u64 {
    let mut b = [0u8; 8];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").expect("/dev/urandom"),
        &mut b,
    )
    .expect("read /dev/urandom");
    u64::from_le_bytes(b) | 1
}

/// The gateway's addresses and sockets in the test's own network namespace.
const GW_V4: u32 = 5;
const GW_TCP_PORT: u16 = 7000;
const GW_UDP_PORT: u16 = 7001;

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
            host_essentials: if r.chance(80) {
                HostEssential::ALL.to_vec()
            } else if r.chance(50) {
                vec![]
            } else {
                vec![r.pick(&HostEssential::ALL)]
            },
            // Short enough that an expired flow can be written on a machine booted minutes ago.
            flow_timeouts: FlowTimeouts {
                tcp: 30,
                tcp_closing: 5,
                udp: 10,
            },
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
        // TCP and UDP tables with equal contents share a compiled table: flipping a protocol moves it.
        if r.chance(20) {
            a.protocol = match a.protocol {
                Proto::Tcp => Proto::Udp,
                Proto::Udp => Proto::Tcp,
            };
        }
    }
    // Settings outside the tries change now and then (a new generation).
    if r.chance(5) {
        p.instance.host_essentials = if p.instance.host_essentials.is_empty() {
            HostEssential::ALL.to_vec()
        } else {
            vec![]
        };
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

/// Destinations the policy space does not hold but rules 1 and 3 care about.
fn special_dst(r: &mut Rng, v6: bool) -> IpAddr {
    if v6 {
        r.pick(&[
            "fe80::1",
            "ff02::1:ff00:7",
            "ff02::16",
            "ff02::1:2",
            "ff02::2",
            "ff05::2",
            "2001:db8::9",
        ])
        .parse()
        .unwrap()
    } else {
        r.pick(&["255.255.255.255", "10.0.0.1", "224.0.0.22"])
            .parse()
            .unwrap()
    }
}

/// What the random frame's L4 is.
struct L4Choice {
    sport: u16,
    layer: Layer,
}

fn random_l4(r: &mut Rng, v6: bool, port: u16, frag: u8, src: IpAddr, dst: IpAddr) -> Vec<Layer> {
    let sport = if r.chance(10) {
        r.pick(&[68, 546, 67, GW_TCP_PORT, GW_UDP_PORT])
    } else {
        30000 + r.below(1000) as u16
    };
    let dport = if r.chance(8) {
        r.pick(&[67, 547, 68])
    } else {
        port
    };
    let c = match r.below(14) {
        0..=4 => L4Choice {
            sport,
            layer: Layer::Tcp {
                sport,
                dport,
                flags: r.pick(&[0x02, 0x10, 0x18, 0x12, 0x04, 0x11, 0x14]),
                options: r.pick(&[0, 0, 3]),
            },
        },
        5..=7 => L4Choice {
            sport,
            layer: Layer::Udp { sport, dport },
        },
        8..=10 => L4Choice {
            sport,
            layer: Layer::Icmp {
                kind: if v6 {
                    r.pick(&[128, 129, 1, 2, 3, 4, 133, 134, 135, 136, 137, 143, 143])
                } else {
                    r.pick(&[8, 0, 3, 11, 12, 5, 13])
                },
                code: r.below(5) as u8,
            },
        },
        // A non-first fragment's payload is opaque whatever its protocol; a whole datagram of protocol 6
        // or 17 would be a TCP/UDP header, so those only follow fragment headers.
        _ if frag == 2 => L4Choice {
            sport,
            layer: Layer::Proto {
                proto: r.pick(&[6, 17, 1, 47]),
                len: 16,
            },
        },
        _ => L4Choice {
            sport,
            layer: Layer::Proto {
                proto: r.pick(&[47, 50, 132]),
                len: 16,
            },
        },
    };
    let _ = c.sport;
    let mut out = vec![c.layer];
    // ICMP errors quote a packet: mostly one this host received (the reverse of these addresses),
    // sometimes a foreign one, sometimes nothing (malformed).
    if let Layer::Icmp { kind, .. } = c.layer
        && vpcgate_lab::packet::is_icmp_error(kind, v6)
        && !r.chance(10)
    {
        out.push(match r.below(3) {
            0 | 1 => Layer::Quote { src: dst, dst: src },
            _ => Layer::Quote {
                src: dst,
                dst: if v6 { self::v6(77) } else { v4(77) },
            },
        });
    }
    out
}

/// A random frame from `src` toward `dst` (`frag_id` for fragments).
fn random_frame(r: &mut Rng, src: IpAddr, dst: IpAddr, port: u16, frag_id: u32) -> Frame {
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
    let mut routing = false;
    let mut ipv4_options = 0;
    if v6 {
        layers.push(Layer::Ipv6 {
            src: octets6(src),
            dst: octets6(dst),
        });
        // Mostly short chains; now and then longer than the parser walks.
        let chain = if r.chance(3) {
            7 + r.below(2)
        } else {
            r.pick(&[0, 0, 0, 1, 2, 3])
        };
        for _ in 0..chain {
            let ext = match r.below(4) {
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
            };
            routing |= matches!(ext, Ext::Routing { .. });
            layers.push(Layer::Ext(ext));
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
            // Headers after the fragment header belong to the fragmentable part (RFC 8200).
            if r.chance(30) {
                layers.push(Layer::Ext(if r.chance(70) {
                    Ext::DstOpts { len8: 0 }
                } else {
                    routing = true;
                    Ext::Routing { len8: 0 }
                }));
            }
        }
    } else {
        let (frag_offset, more_fragments) = match frag {
            1 => (0, true),
            2 => (1 + r.below(100) as u16, r.chance(50)),
            _ => (0, false),
        };
        ipv4_options = r.pick(&[0, 0, 0, 1, 2, 3, 10]);
        layers.push(Layer::Ipv4 {
            src: octets4(src),
            dst: octets4(dst),
            options: ipv4_options,
            frag_offset,
            more_fragments,
            id: frag_id as u16,
        });
    }
    layers.extend(random_l4(r, v6, port, frag, src, dst));
    let mut frame = build("random", &layers, r.below(40) as usize);
    if ipv4_options >= 2 && r.chance(40) {
        // Loose and strict source routes, record route, timestamp.
        frame = frame.with_ipv4_option(r.pick(&[0x83, 0x89, 0x07, 0x44]));
    }
    if routing && r.chance(50) {
        frame = frame.with_segments_left(r.below(3) as u8);
    }
    if v6 && r.chance(15) {
        frame = frame.with_hop_limit(r.pick(&[255, 64, 1, 254]));
    }
    if r.chance(4) {
        frame = frame.with_zero_length();
    }
    if r.chance(8) {
        let len = 14 + r.below((frame.bytes.len() - 14) as u64) as usize;
        return frame.truncated(len);
    }
    frame
}

fn gw(v6: bool) -> IpAddr {
    if v6 { v6_src() } else { v4(GW_V4) }
}

fn v6_src() -> IpAddr {
    v6(5)
}

/// A random address in the policy space (or outside it).
fn random_dst(r: &mut Rng, addrs: &[IpAddr]) -> IpAddr {
    if r.chance(75) {
        r.pick(addrs)
    } else if r.chance(10) {
        let six = r.chance(60);
        special_dst(r, six)
    } else if r.chance(50) {
        v4(r.below(1100) as u32)
    } else {
        v6(u128::from(r.below(1100)))
    }
}

/// A TCP segment with one of `flags`, a UDP datagram or an ICMP echo message (`echo`: IPv4 and IPv6
/// type) from `src` to `dst`.
fn exchange_frame(
    r: &mut Rng,
    name: &str,
    (src, sport): (IpAddr, u16),
    (dst, dport): (IpAddr, u16),
    flags: &[u8],
    echo: (u8, u8),
) -> Frame {
    let ip = if dst.is_ipv6() {
        Layer::Ipv6 {
            src: octets6(src),
            dst: octets6(dst),
        }
    } else {
        Layer::Ipv4 {
            src: octets4(src),
            dst: octets4(dst),
            options: 0,
            frag_offset: 0,
            more_fragments: false,
            id: 1,
        }
    };
    let l4 = match r.below(6) {
        0..=2 => Layer::Tcp {
            sport,
            dport,
            flags: r.pick(flags),
            options: 0,
        },
        3 | 4 => Layer::Udp { sport, dport },
        _ => Layer::Icmp {
            kind: if dst.is_ipv6() { echo.1 } else { echo.0 },
            code: 0,
        },
    };
    build(name, &[ip, l4], r.below(20) as usize)
}

/// A packet a peer sends toward the gateway (or toward an address that is not the gateway's):
/// TCP with any flags, UDP, or an echo request.
fn inbound_frame(
    r: &mut Rng,
    peer: IpAddr,
    local: IpAddr,
    peer_port: u16,
    local_port: u16,
) -> Frame {
    let frame = exchange_frame(
        r,
        "inbound",
        (peer, peer_port),
        (local, local_port),
        &[0x02, 0x02, 0x10, 0x18, 0x11, 0x04, 0x12],
        (8, 128),
    );
    // The builder's TCP sequence number is 1: an ACK of the gateway's SYN-ACK acknowledges 2.
    if frame.layers.iter().any(|l| matches!(l, Layer::Tcp { .. })) {
        let ack = r.pick(&[2, 2, 2, 0, 3, 0x8000_0002]);
        return frame.with_tcp_ack(ack);
    }
    frame
}

/// The gateway's packet toward a peer that sent something: a reply, or an attempt to use what the peer
/// sent as a reply (a bare SYN from the port the peer wrote to).
fn reply_frame(r: &mut Rng, local: IpAddr, peer: IpAddr, peer_port: u16, local_port: u16) -> Frame {
    exchange_frame(
        r,
        "reply",
        (local, local_port),
        (peer, peer_port),
        &[0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x14],
        (0, 129),
    )
}

/// Frames the differential keeps to send again (or toward their destination and port again).
const RECENT: usize = 64;

#[test]
fn kernel_and_reference_agree_on_random_packets_and_policies() {
    vpcgate_lab::require_root();
    let packets = env("VPCGATE_DIFF_PACKETS").unwrap_or(200_000);
    let policies = env("VPCGATE_DIFF_POLICIES").unwrap_or(200).max(1);
    let seed = env("VPCGATE_DIFF_SEED").unwrap_or_else(fresh_seed);
    eprintln!(
        "differential: {packets} packets over {policies} policies, seed {seed:#x} (replay with VPCGATE_DIFF_SEED={seed:#x}); the smallest verdict cache"
    );
    let mut r = Rng(seed);
    // The smallest verdict cache (512 decisions per hook and CPU): the destinations of a policy share
    // its slots often, so records are evicted and replaced, and records of earlier applies wait in many.
    let cache_bits = vpcgate_common::datapath::limits::VERDICT_CACHE_MIN_BITS;
    let mut h = Harness::with_cache_bits(cache_bits);
    assert_eq!(h.dp.verdict_cache_bits().unwrap(), cache_bits);
    h.isolate_with_sockets(&[gw(false), gw(true)], GW_TCP_PORT, GW_UDP_PORT);
    // The ENI's on-link prefixes cover part of the policy space: ND (and DHCPv4 renewals) toward them
    // pass, beyond them not.
    h.set_onlink_prefixes(&[
        "fd00::/120".parse().unwrap(),
        "10.0.0.0/26".parse().unwrap(),
    ]);
    let per_policy = packets.div_ceil(policies);
    let (mut ran, mut mismatches, mut replies, mut tc_runs) = (0u64, vec![], 0u64, 0u64);
    let (mut inbound, mut peer_replies, mut repeats) = (0u64, 0u64, 0u64);
    // The last frames drawn toward a destination and port, with them, newest last (kept across applies).
    let mut recent: std::collections::VecDeque<(vpcgate_lab::packet::Frame, IpAddr, u16)> =
        std::collections::VecDeque::with_capacity(RECENT);
    // Policies applied in place (same rule identities and settings as the one before): the final state
    // of an incremental apply must decide exactly like the reference too.
    let (mut incremental, mut generations) = (0u64, 0u64);
    let mut previous: Option<Policy> = None;
    let mut kinds = std::collections::BTreeMap::<String, u64>::new();
    for policy_no in 0..policies {
        let policy = match &previous {
            Some(prev) if r.chance(60) => mutate(prev, &mut r),
            _ => random_policy(&mut r),
        };
        previous = Some(policy.clone());
        if h.apply(&policy).incremental {
            incremental += 1;
        } else {
            generations += 1;
        }
        let (addrs, ports) = interesting(&policy);
        let mut pending_first: Vec<(IpAddr, u16, u32)> = vec![];
        // Peers that sent the gateway something: (local address, peer, peer port, local port).
        let mut peers: Vec<(IpAddr, IpAddr, u16, u16)> = vec![];
        for i in 0..per_policy {
            if ran >= packets {
                break;
            }
            if r.chance(10) {
                // Half the time a peer that already spoke speaks again (handshakes complete, flows
                // refresh, expire or close); otherwise a new one.
                let (local, peer, peer_port, local_port) = if !peers.is_empty() && r.chance(50) {
                    r.pick(&peers)
                } else {
                    let six = r.chance(50);
                    let peer = if six {
                        v6(u128::from(r.below(1100)))
                    } else {
                        v4(r.below(1100) as u32)
                    };
                    // Mostly toward the gateway; sometimes toward an address that is not its own.
                    let local = if r.chance(85) {
                        gw(six)
                    } else if six {
                        v6(6)
                    } else {
                        v4(6)
                    };
                    let other = 30000 + r.below(5) as u16;
                    let local_port = r.pick(&[GW_TCP_PORT, GW_UDP_PORT, other]);
                    (local, peer, 40000 + r.below(20) as u16, local_port)
                };
                h.inbound(&inbound_frame(&mut r, peer, local, peer_port, local_port));
                inbound += 1;
                peers.push((local, peer, peer_port, local_port));
            }
            let dst = random_dst(&mut r, &addrs);
            let port = if r.chance(70) {
                r.pick(&ports)
            } else {
                1 + r.below(65535) as u16
            };
            // Fragment ids cycle in a small range so non-first fragments meet their first fragments.
            let frag_id = (policy_no as u32) << 8 | (r.below(32) as u32);
            // Each enforcing hook memoizes its decisions by destination, protocol and port per CPU
            // (`VerdictMemo`): its last one, and more in `VERDICT_CACHE`. A packet sometimes goes again,
            // or another one to the same destination and port, right after it or some packets and
            // applies later, so that a memoized decision (or one an apply since ended) is checked too.
            let mut target = None;
            let again = if recent.is_empty() || !r.chance(20) {
                None
            } else if r.chance(50) {
                recent.back()
            } else {
                recent.get(r.below(recent.len() as u64) as usize)
            };
            let frame = if let Some((f, d, p)) = again {
                repeats += 1;
                target = Some((*d, *p));
                if r.chance(50) {
                    f.clone()
                } else {
                    random_frame(&mut r, gw(d.is_ipv6()), *d, *p, frag_id)
                }
            } else if !peers.is_empty() && r.chance(15) {
                let (local, peer, peer_port, local_port) = r.pick(&peers);
                peer_replies += 1;
                reply_frame(&mut r, local, peer, peer_port, local_port)
            } else if !pending_first.is_empty() && r.chance(20) {
                let (d, p, id) = pending_first.swap_remove(0);
                random_frame(&mut r, gw(d.is_ipv6()), d, p, id)
            } else {
                target = Some((dst, port));
                random_frame(&mut r, gw(dst.is_ipv6()), dst, port, frag_id)
            };
            if r.chance(4) && h.add_reply_flow(&frame, r.chance(20), r.chance(70), r.chance(20)) {
                replies += 1;
            }
            if frame.describe().frag_id.is_some() {
                pending_first.push((dst, port, frag_id));
            }
            if let Some((d, p)) = target {
                if recent.len() == RECENT {
                    recent.pop_front();
                }
                recent.push_back((frame.clone(), d, p));
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
        "differential: {ran} packets ({tc_runs} through TC too, {repeats} again or toward a recent one's destination and port), {replies} flows recorded directly, {inbound} inbound packets through XDP ingress, {peer_replies} packets toward those peers; {incremental} incremental and {generations} generation applies; verdict bases: {kinds:?}"
    );
    assert!(
        mismatches.is_empty(),
        "{} mismatches (seed {seed:#x}, replay with VPCGATE_DIFF_SEED={seed:#x}):\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    assert_eq!(ran, packets, "ran fewer packets than asked");
    let fe = h.flow_events;
    eprintln!("differential: flow state: {fe:?}");
    assert!(
        policies < 10 || fe.established > 0 && fe.wrong_acks > 0 && fe.refused > 0,
        "the flow state machine went unexercised: {fe:?}"
    );
    assert!(
        policies < 10 || incremental > 0 && generations > 1,
        "applies were not mixed ({incremental} incremental, {generations} generations): a path went untested"
    );
    // The run must have exercised every kind of decision, or it proves less than it claims.
    for basis in [
        "NotIp",
        "NeighbourDiscovery",
        "HostEssential",
        "Malformed",
        "SourceRouted",
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
