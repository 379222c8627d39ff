//! The kernel parser on crafted frames, through BPF_PROG_TEST_RUN: every odd header the datapath must
//! understand, every truncation point, and deliberately inconsistent headers. For each frame every program
//! must count exactly the expected parse stats; the enforcing ones (TC egress, XDP forward) must decide
//! what the reference verdict decides (malformed: dropped), and XDP ingress must pass.

use aya::programs::{TestRun, TestRunOptions};
use vpcgate::{datapath::ParseStats, policy::check_text};
use vpcgate_common::parse_stats::{ALL_HOOKS, ALL_STATS, Hook, Stat};
use vpcgate_lab::{
    harness::{Enforcer, Harness, XDP_PASS},
    packet::{Ext, Frame, Layer, V4_DST, V4_SRC, V6_DST, V6_SRC, build, ipv4, ipv6, tcp, udp},
};

/// BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
const ETH_HLEN: usize = 14;

/// Allows every TCP and UDP port of the frames' destinations; everything else gets its verdict too.
const POLICY: &str = r#"
[instance]
name = "parser-test"
kind = "dedicated"
vpc_id = "vpc-1"
interface = "eth1"
[[authorization]]
name = "v4-tcp"
vpc_id = "vpc-1"
address = "10.0.3.7"
ports = ["1-65535"]
[[authorization]]
name = "v4-udp"
vpc_id = "vpc-1"
address = "10.0.3.7"
ports = ["1-65535"]
protocol = "udp"
[[authorization]]
name = "v6-tcp"
vpc_id = "vpc-1"
address = "fd00:0:0:3::7"
ports = ["1-65535"]
"#;

fn harness() -> Harness {
    let checked = check_text("parser-test.toml", POLICY);
    let policy = checked
        .policy
        .unwrap_or_else(|| panic!("{:?}", checked.diagnostics));
    let mut h = Harness::new();
    h.apply(&policy);
    h
}

/// For skb programs BPF_PROG_TEST_RUN (6.x) refuses, with EINVAL, a frame whose Ethernet type is IPv4 or
/// IPv6 but which is too short for the fixed IP header: the kernel reads it to set up the test socket.
/// Such frames can only reach the XDP programs here (which run the same parser). Returns whether the TC
/// program can be run on `frame`.
fn skb_test_run_accepts(frame: &Frame) -> bool {
    let ethertype = u16::from_be_bytes([frame.bytes[12], frame.bytes[13]]);
    let len = frame.bytes.len();
    match ethertype {
        0x0800 => len >= ETH_HLEN + 20,
        0x86dd => len >= ETH_HLEN + 40,
        _ => true,
    }
}

fn delta(before: &ParseStats, after: &ParseStats, hook: Hook) -> Vec<Stat> {
    let mut out = vec![];
    for s in ALL_STATS {
        let d = after.get(hook, s) - before.get(hook, s);
        out.extend(std::iter::repeat_n(s, d as usize));
    }
    out
}

/// Runs `frame` through all three programs: each must count exactly the expected parse stats (under its
/// own hook only); the enforcing ones must decide what the reference decides; XDP ingress always passes.
fn check(h: &mut Harness, frame: &Frame) -> Option<String> {
    let mut expect = if frame.malformed {
        vec![Stat::Malformed]
    } else {
        frame.stats.clone()
    };
    expect.sort_by_key(|s| *s as u32);
    let mut failures = vec![];
    for hook in ALL_HOOKS {
        if hook == Hook::TcEgress && !skb_test_run_accepts(frame) {
            let opts = TestRunOptions {
                data_in: Some(&frame.bytes),
                ..TestRunOptions::new()
            };
            let refused = h.dp.tc_egress().expect("tc program").test_run(opts);
            assert!(
                matches!(&refused, Err(aya::programs::ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EINVAL)),
                "{}: expected the kernel to refuse this skb test run with EINVAL, got {refused:?}",
                frame.name
            );
            continue;
        }
        let before = h.dp.parse_stats().expect("read stats");
        match hook {
            Hook::TcEgress => failures.extend(h.check(Enforcer::TcEgress, frame)),
            Hook::XdpForward => failures.extend(h.check(Enforcer::XdpForward, frame)),
            Hook::Xdp => {
                let opts = TestRunOptions {
                    data_in: Some(&frame.bytes),
                    ..TestRunOptions::new()
                };
                let rv =
                    h.dp.xdp_ingress()
                        .expect("xdp")
                        .test_run(opts)
                        .expect("test run")
                        .return_value;
                if rv != XDP_PASS {
                    failures.push(format!("xdp ingress returned {rv} (it must always pass)"));
                }
            }
        }
        let after = h.dp.parse_stats().expect("read stats");
        let got = delta(&before, &after, hook);
        if got != expect {
            failures.push(format!("{hook:?} counted {got:?} (want {expect:?})"));
        }
        for other in ALL_HOOKS.into_iter().filter(|&o| o != hook) {
            let leaked = delta(&before, &after, other);
            if !leaked.is_empty() {
                failures.push(format!("{hook:?} counted under {other:?}: {leaked:?}"));
            }
        }
    }
    (!failures.is_empty()).then(|| {
        format!(
            "{} ({} bytes): {}",
            frame.name,
            frame.bytes.len(),
            failures.join("; ")
        )
    })
}

fn well_formed() -> Vec<Frame> {
    let v4_frag = |offset, more| Layer::Ipv4 {
        src: V4_SRC,
        dst: V4_DST,
        options: 0,
        frag_offset: offset,
        more_fragments: more,
        id: 77,
    };
    let v4_opts = |options| Layer::Ipv4 {
        src: V4_SRC,
        dst: V4_DST,
        options,
        frag_offset: 0,
        more_fragments: false,
        id: 1,
    };
    let q = |vid| Layer::Vlan { tpid: 0x8100, vid };
    let ad = |vid| Layer::Vlan { tpid: 0x88a8, vid };
    let hbh = Layer::Ext(Ext::HopByHop { len8: 0 });
    let mut frames = vec![
        build("arp", &[Layer::Arp], 0),
        build("arp in vlan", &[q(10), Layer::Arp], 0),
        build("ipv4 tcp", &[ipv4(), tcp(80)], 32),
        build(
            "ipv4 tcp with options",
            &[
                ipv4(),
                Layer::Tcp {
                    sport: 1,
                    dport: 443,
                    flags: 0x02,
                    options: 10,
                },
            ],
            0,
        ),
        build("ipv4 udp", &[ipv4(), udp(53)], 12),
        build("ipv4 udp no payload", &[ipv4(), udp(53)], 0),
        build(
            "ipv4 icmp echo",
            &[ipv4(), Layer::Icmp { kind: 8, code: 0 }],
            56,
        ),
        build(
            "ipv4 icmp unreachable",
            &[
                ipv4(),
                Layer::Icmp { kind: 3, code: 13 },
                Layer::Quote {
                    src: V4_DST.into(),
                    dst: V4_SRC.into(),
                },
            ],
            0,
        ),
        // An error must quote an IP header: without one (or cut inside it) it cannot be verified.
        build(
            "ipv4 icmp unreachable quoting nothing",
            &[ipv4(), Layer::Icmp { kind: 3, code: 13 }],
            28,
        ),
        build(
            "ipv6 icmpv6 packet too big",
            &[
                ipv6(),
                Layer::Icmp { kind: 2, code: 0 },
                Layer::Quote {
                    src: V6_DST.into(),
                    dst: V6_SRC.into(),
                },
            ],
            0,
        ),
        build("ipv4 loose source route", &[v4_opts(2), udp(53)], 0).with_ipv4_option(0x83),
        build("ipv4 record route", &[v4_opts(2), udp(53)], 0).with_ipv4_option(0x07),
        build(
            "ipv6 routing header with segments left",
            &[ipv6(), Layer::Ext(Ext::Routing { len8: 2 }), tcp(443)],
            0,
        )
        .with_segments_left(1),
        build("ipv4 gre", &[ipv4(), Layer::Proto { proto: 47, len: 4 }], 0),
        build(
            "ipv4 sctp",
            &[
                ipv4(),
                Layer::Proto {
                    proto: 132,
                    len: 12,
                },
            ],
            0,
        ),
        build("ipv4 first fragment tcp", &[v4_frag(0, true), tcp(80)], 100),
        build(
            "ipv4 non-first fragment",
            &[v4_frag(185, true), Layer::Proto { proto: 6, len: 40 }],
            0,
        ),
        build(
            "ipv4 last fragment",
            &[v4_frag(370, false), Layer::Proto { proto: 17, len: 40 }],
            0,
        ),
        build("802.1q ipv4 udp", &[q(100), ipv4(), udp(53)], 4),
        build("qinq ipv4 tcp", &[ad(100), q(200), ipv4(), tcp(22)], 0),
        build("qinq 8100/8100 ipv6 udp", &[q(1), q(2), ipv6(), udp(53)], 0),
        build("ipv6 tcp", &[ipv6(), tcp(443)], 10),
        build("ipv6 udp", &[ipv6(), udp(8080)], 0),
        build(
            "ipv6 icmpv6 echo",
            &[ipv6(), Layer::Icmp { kind: 128, code: 0 }],
            8,
        ),
        build(
            "ipv6 neighbour solicitation",
            &[ipv6(), Layer::Icmp { kind: 135, code: 0 }],
            16,
        ),
        build("ipv6 no next header", &[ipv6()], 0),
        build(
            "ipv6 esp",
            &[ipv6(), Layer::Proto { proto: 50, len: 16 }],
            0,
        ),
        build("ipv6 hbh tcp", &[ipv6(), hbh, tcp(80)], 0),
        build(
            "ipv6 hbh(len 2) udp",
            &[ipv6(), Layer::Ext(Ext::HopByHop { len8: 2 }), udp(53)],
            0,
        ),
        build(
            "ipv6 routing dstopts tcp",
            &[
                ipv6(),
                Layer::Ext(Ext::Routing { len8: 2 }),
                Layer::Ext(Ext::DstOpts { len8: 1 }),
                tcp(80),
            ],
            0,
        ),
        build(
            "ipv6 ah udp",
            &[ipv6(), Layer::Ext(Ext::Ah { len4: 4 }), udp(53)],
            0,
        ),
        build(
            "ipv6 mobility",
            &[ipv6(), Layer::Ext(Ext::Mobility { len8: 1 })],
            0,
        ),
        build(
            "ipv6 first fragment udp",
            &[
                ipv6(),
                Layer::Ext(Ext::Fragment {
                    offset: 0,
                    more: true,
                    id: 9,
                }),
                udp(53),
            ],
            64,
        ),
        build(
            "ipv6 non-first fragment",
            &[
                ipv6(),
                Layer::Ext(Ext::Fragment {
                    offset: 100,
                    more: false,
                    id: 9,
                }),
                Layer::Proto { proto: 17, len: 64 },
            ],
            0,
        ),
        build(
            "ipv6 atomic fragment tcp",
            &[
                ipv6(),
                Layer::Ext(Ext::Fragment {
                    offset: 0,
                    more: false,
                    id: 9,
                }),
                tcp(80),
            ],
            0,
        ),
        build(
            "ipv6 hbh then fragment (first) icmpv6",
            &[
                ipv6(),
                hbh,
                Layer::Ext(Ext::Fragment {
                    offset: 0,
                    more: true,
                    id: 1,
                }),
                Layer::Icmp { kind: 128, code: 0 },
            ],
            0,
        ),
        build(
            "ipv6 chain of 6 extension headers",
            &[
                ipv6(),
                hbh,
                Layer::Ext(Ext::DstOpts { len8: 0 }),
                Layer::Ext(Ext::Routing { len8: 0 }),
                Layer::Ext(Ext::Fragment {
                    offset: 0,
                    more: true,
                    id: 3,
                }),
                Layer::Ext(Ext::Ah { len4: 1 }),
                Layer::Ext(Ext::DstOpts { len8: 0 }),
                udp(53),
            ],
            0,
        ),
    ];
    for options in 1..=10 {
        frames.push(build(
            &format!("ipv4 with {options} option words, udp"),
            &[v4_opts(options), udp(53)],
            0,
        ));
    }
    frames
}

#[test]
fn well_formed_frames_and_every_truncation() {
    vpcgate_lab::require_root();
    let mut h = harness();
    let mut failures = vec![];
    let mut checked = 0;
    for frame in well_formed() {
        failures.extend(check(&mut h, &frame));
        checked += 1;
        for len in ETH_HLEN..frame.bytes.len() {
            failures.extend(check(&mut h, &frame.truncated(len)));
            checked += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} frames wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked > 1000, "only {checked} frames checked");
}

#[test]
fn inconsistent_headers_fail_closed() {
    vpcgate_lab::require_root();
    let mut h = harness();
    let q = |vid| Layer::Vlan { tpid: 0x8100, vid };
    let v4_tcp = build("ipv4 tcp", &[ipv4(), tcp(80)], 8);
    let v4_udp = build("ipv4 udp", &[ipv4(), udp(53)], 0);
    let v6_udp = build("ipv6 udp", &[ipv6(), udp(53)], 0);
    let v6_hbh = build(
        "ipv6 hbh udp",
        &[ipv6(), Layer::Ext(Ext::HopByHop { len8: 1 }), udp(53)],
        0,
    );
    let ip_at = |o: &[usize]| o[0];
    let set16 =
        |b: &mut Vec<u8>, at: usize, v: u16| b[at..at + 2].copy_from_slice(&v.to_be_bytes());
    let seven_ext: Vec<Layer> = std::iter::once(ipv6())
        .chain(std::iter::repeat_n(Layer::Ext(Ext::DstOpts { len8: 0 }), 7))
        .chain([udp(53)])
        .collect();
    let frames = vec![
        build("three vlan tags", &[q(1), q(2), q(3), ipv4(), udp(53)], 0)
            .corrupted("more tags than VLAN_MAX_DEPTH", |_, _| {}),
        v4_tcp.corrupted("ipv4 version 6 under ethertype 0x0800", |b, o| {
            b[ip_at(o)] = 0x65
        }),
        v4_tcp.corrupted("ipv4 ihl 4", |b, o| b[ip_at(o)] = 0x44),
        v4_tcp.corrupted("ipv4 ihl 15 beyond the frame", |b, o| b[ip_at(o)] = 0x4f),
        v4_tcp.corrupted("ipv4 tot_len shorter than the header", |b, o| {
            set16(b, ip_at(o) + 2, 19)
        }),
        v4_tcp.corrupted(
            "ipv4 tot_len ends before the tcp header (ports would come from padding)",
            |b, o| set16(b, ip_at(o) + 2, 30),
        ),
        v4_udp.corrupted("ipv4 tot_len ends inside the udp header", |b, o| {
            set16(b, ip_at(o) + 2, 27)
        }),
        v4_tcp.corrupted("tcp data offset 4", |b, o| b[o[1] + 12] = 0x40),
        v4_tcp.corrupted("tcp data offset beyond the frame", |b, o| {
            b[o[1] + 12] = 0xf0
        }),
        v6_udp.corrupted("ipv6 version 4 under ethertype 0x86dd", |b, o| {
            b[ip_at(o)] = 0x45
        }),
        v6_udp.corrupted("ipv6 payload_len ends inside the udp header", |b, o| {
            set16(b, ip_at(o) + 4, 6)
        }),
        v6_hbh.corrupted(
            "ipv6 payload_len ends inside an extension header",
            |b, o| set16(b, ip_at(o) + 4, 12),
        ),
        v6_hbh.corrupted("ipv6 extension header longer than the frame", |b, o| {
            b[o[1] + 1] = 200
        }),
        build("ipv6 chain of 7 extension headers", &seven_ext, 0)
            .corrupted("longer than IPV6_EXT_MAX_CHAIN", |_, _| {}),
        // Receivers reassemble by the first fragment header; the parser would read ports by the second.
        build(
            "ipv6 two fragment headers",
            &[
                ipv6(),
                Layer::Ext(Ext::Fragment {
                    offset: 0,
                    more: true,
                    id: 7,
                }),
                Layer::Ext(Ext::Fragment {
                    offset: 0,
                    more: false,
                    id: 8,
                }),
                udp(53),
            ],
            0,
        )
        .corrupted("a second fragment header", |_, _| {}),
        v4_tcp.edited(
            "ipv4 tot_len 0 (BIG TCP GSO): extent is the frame's",
            &[Stat::Ipv4, Stat::Tcp],
            |b, o| set16(b, ip_at(o) + 2, 0),
        ),
        v6_udp.edited(
            "ipv6 payload_len 0 (jumbo / BIG TCP): extent is the frame's",
            &[Stat::Ipv6, Stat::Udp],
            |b, o| set16(b, ip_at(o) + 4, 0),
        ),
        build(
            "icmp in ipv6",
            &[ipv6(), Layer::Proto { proto: 1, len: 8 }],
            0,
        ),
        build(
            "icmpv6 in ipv4",
            &[ipv4(), Layer::Proto { proto: 58, len: 8 }],
            0,
        ),
    ];
    let failures: Vec<String> = frames.iter().filter_map(|f| check(&mut h, f)).collect();
    assert!(
        failures.is_empty(),
        "{} of {} frames wrong:\n{}",
        failures.len(),
        frames.len(),
        failures.join("\n")
    );
}
