//! Applying policies to the kernel maps: generations alternate, a policy that does not fit is refused with
//! the numbers and changes nothing, and counters are kept per rule and per reason.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use vpcgate::{
    datapath::{DatapathError, state::desired},
    policy::{Policy, check_text, compile::Compiled, model::*, ports::PortSet, source::Pos},
};
use vpcgate_common::{
    datapath::{GEN_A, GEN_B, limits},
    verdict::DropReason,
};
use vpcgate_lab::{
    harness::{Enforcer, Harness},
    packet::{Layer, build, ipv4, tcp},
};

const SMALL: &str = r#"
[instance]
name = "cap"
kind = "dedicated"
vpc_id = "vpc-1"
interface = "eth1"
[[authorization]]
name = "web"
vpc_id = "vpc-1"
address = "10.0.3.7"
ports = ["80"]
"#;

fn small() -> Policy {
    check_text("small.toml", SMALL).policy.expect("valid")
}

/// A frame from 10.0.0.5 to host `i` of `hosts` (11.0.0.0 + i) carrying `l4` and `payload` bytes.
fn to_host(i: u32, l4: Layer, payload: usize) -> vpcgate_lab::packet::Frame {
    build(
        "to a host",
        &[
            Layer::Ipv4 {
                src: [10, 0, 0, 5],
                dst: Ipv4Addr::from(0x0b00_0000 | i).octets(),
                options: 0,
                frag_offset: 0,
                more_fragments: false,
                id: 1,
            },
            l4,
        ],
        payload,
    )
}

/// `small()` with `v4_prefixes` more authorizations (host addresses in 11.0.0.0/8).
fn hosts(v4_prefixes: u32) -> Policy {
    let mut p = small();
    let pos = Pos::default();
    p.authorizations = (0..v4_prefixes)
        .map(|i| Authorization {
            name: format!("a{i}"),
            vpc_id: "vpc-1".into(),
            instance_id: None,
            instance_type: InstanceType::Ip,
            address: IpNet::from(IpAddr::V4(Ipv4Addr::from(0x0b00_0000 | i))),
            ports: PortSet::single(80),
            protocol: Proto::Tcp,
            pos,
        })
        .collect();
    p
}

/// `blocks` reserved IPv4 blocks (one per /24 in 11.0.0.0/8): the smallest kernel map, so its edge is
/// reached in a fraction of a second (the address maps hold a million prefixes).
fn reserved_blocks(blocks: u32) -> Policy {
    let mut p = small();
    p.instance.reserved = (0..blocks)
        .map(|i| Reserved {
            cidr: IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0b00_0000 | (i << 8))), 24).unwrap(),
            source: ReservedSource::Explicit,
            pos: Pos::default(),
        })
        .collect();
    p
}

#[test]
fn a_policy_that_does_not_fit_is_refused_and_the_old_one_stays() {
    vpcgate_lab::require_root();
    let mut h = Harness::new();
    h.apply(&small());
    let gen_before = h.dp.active_generation().unwrap();
    let web = build("to web:80", &[ipv4(), tcp(80)], 0);
    assert_eq!(h.check(Enforcer::TcEgress, &web), None);
    assert_eq!(
        h.dp.last_verdict().unwrap().action,
        vpcgate_common::datapath::ACTION_PASS
    );

    let err =
        h.dp.apply(&Compiled::new(&reserved_blocks(
            limits::RESERVED_ENTRIES + 1,
        )))
        .unwrap_err();
    assert!(
        matches!(
            err,
            DatapathError::MapFull {
                map: "RESERVED_V4",
                capacity: 1024,
                needed: 1025
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "map RESERVED_V4 is full: 1024 entries, the policy needs 1025; the old policy stays active"
    );
    assert_eq!(
        h.dp.active_generation().unwrap(),
        gen_before,
        "generation changed after a refused apply"
    );
    assert_eq!(
        h.check(Enforcer::TcEgress, &web),
        None,
        "the old policy no longer decides"
    );

    // The largest policy that fits is applied (and replaced) like any other.
    let report =
        h.dp.apply(&Compiled::new(&reserved_blocks(limits::RESERVED_ENTRIES)))
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.entries.reserved_v4, limits::RESERVED_ENTRIES);
    h.apply(&small());
    assert_eq!(h.check(Enforcer::TcEgress, &web), None);
}

#[test]
fn generations_alternate_and_old_entries_are_removed() {
    vpcgate_lab::require_root();
    let mut h = Harness::new();
    assert_eq!(
        h.dp.active_generation().unwrap(),
        None,
        "a fresh object has no policy"
    );
    let policies = [small(), hosts(300), small(), hosts(5)];
    let mut seen = vec![];
    for p in &policies {
        let c = Compiled::new(p);
        let report = h.dp.apply(&c).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.stale_entries, 0, "{:?}", report.stale_reason);
        let e = &report.entries;
        let total = e.addr_v4 + e.addr_v6 + e.reserved_v4 + e.reserved_v6 + e.ports;
        let active = report.generation;
        let other = if active == GEN_A { GEN_B } else { GEN_A };
        assert_eq!(
            h.dp.stored_entries(active).unwrap(),
            total,
            "entries of the active generation"
        );
        assert_eq!(
            h.dp.stored_entries(other).unwrap(),
            0,
            "the old generation was not removed"
        );
        seen.push(active);
    }
    assert_eq!(seen, [GEN_A, GEN_B, GEN_A, GEN_B]);
}

#[test]
fn drops_and_passes_are_counted_per_reason_and_per_rule() {
    vpcgate_lab::require_root();
    let mut h = Harness::new();
    let policy = small();
    h.apply(&policy);
    let web_rule = h
        .compiled
        .as_ref()
        .unwrap()
        .rules
        .iter()
        .find(|r| r.name == "web")
        .unwrap()
        .id;
    let pass = build("to web:80", &[ipv4(), tcp(80)], 100);
    let wrong_port = build("to web:22", &[ipv4(), tcp(22)], 0);
    let nobody = build(
        "to 10.9.9.9:80",
        &[
            Layer::Ipv4 {
                src: [10, 0, 0, 5],
                dst: [10, 9, 9, 9],
                options: 0,
                frag_offset: 0,
                more_fragments: false,
                id: 1,
            },
            tcp(80),
        ],
        0,
    );
    for (frame, times) in [(&pass, 3), (&wrong_port, 2), (&nobody, 5)] {
        for _ in 0..times {
            for e in [Enforcer::TcEgress, Enforcer::XdpForward] {
                assert_eq!(h.check(e, frame), None);
            }
        }
    }
    let drops = h.dp.drop_counts().unwrap();
    assert_eq!(drops.dropped[&DropReason::PortNotAuthorized], 4);
    assert_eq!(drops.dropped[&DropReason::NotAuthorized], 10);
    assert_eq!(drops.dropped[&DropReason::ReservedRange], 0);
    let rules = h.dp.rule_stats().unwrap();
    assert_eq!(rules[&web_rule].packets, 6);
    assert_eq!(rules[&web_rule].bytes, 6 * pass.bytes.len() as u64);
}

/// Rules in `RULE_COUNTERS` (the array of per-CPU regions, the first slots) and past it (the `RULE_STATS` hash) are
/// counted alike, read together, and folded and emptied when their generation is replaced, so a reused
/// generation starts from zero in both.
#[test]
fn rule_counters_in_the_array_and_past_it_are_counted_read_and_folded_alike() {
    use vpcgate_common::datapath::rule_counter_slot;
    vpcgate_lab::require_root();
    // One region per possible CPU id (the highest id + 1), as the agent sizes it.
    let possible = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    let cpus = possible
        .trim()
        .split([',', '-'])
        .map(|n| n.parse::<u32>().unwrap())
        .max()
        .unwrap()
        + 1;
    assert_eq!(
        Harness::new().dp.rule_counter_slots().unwrap(),
        vpcgate_common::datapath::rule_counter_slots(cpus),
        "a default load sizes the array to this host's CPUs"
    );
    const SLOTS: u32 = 8;
    const HOSTS: u32 = 8;
    let mut h = Harness::with_counter_slots(SLOTS);
    assert_eq!(h.dp.rule_counter_slots().unwrap(), SLOTS);
    let frame_with = |i: u32, payload: usize| to_host(i, tcp(80), payload);
    let frame = |i: u32| frame_with(i, 10 * i as usize);
    // hosts, small, hosts, small, ...: the hosts policy comes back to the same generation each round.
    let mut generations = vec![];
    for round in 0..3 {
        let generation = h.apply(&hosts(HOSTS)).generation;
        generations.push(generation);
        assert!(
            h.dp.take_folded_counters().is_empty(),
            "round {round}: small() carried no traffic"
        );
        assert!(
            h.dp.rule_stats().unwrap().is_empty(),
            "round {round}: a new generation starts from zero (array slots zeroed, hash entries gone)"
        );
        let ids: Vec<u32> = (0..HOSTS)
            .map(|i| {
                let c = h.compiled.as_ref().unwrap();
                c.rules
                    .iter()
                    .find(|r| r.name == format!("a{i}"))
                    .unwrap()
                    .id
            })
            .collect();
        let slots: Vec<u32> = ids
            .iter()
            .map(|&id| rule_counter_slot(u32::from(generation), id))
            .collect();
        assert!(
            slots.iter().any(|&s| s < SLOTS) && slots.iter().any(|&s| s >= SLOTS),
            "round {round}: rules on both sides of the array's end: {slots:?}"
        );
        let mut counted = vec![];
        for (i, &id) in ids.iter().enumerate() {
            let f = frame(i as u32);
            for _ in 0..=i {
                assert_eq!(h.check(Enforcer::TcEgress, &f), None);
            }
            counted.push((id, i as u64 + 1, (i as u64 + 1) * f.bytes.len() as u64));
        }
        counted.sort();
        let stats = h.dp.rule_stats().unwrap();
        let mut got: Vec<_> = stats
            .iter()
            .map(|(&rule, s)| (rule, s.packets, s.bytes))
            .collect();
        got.sort();
        assert_eq!(got, counted, "round {round}: per-rule counters");
        // Replaced by a policy of another shape (a new generation): what this one counted is folded,
        // with the counts the kernel had, from both maps.
        assert_ne!(h.apply(&small()).generation, generation);
        let mut folded: Vec<_> =
            h.dp.take_folded_counters()
                .iter()
                .map(|&(g, rule, s)| (g, rule, s.packets, s.bytes))
                .collect();
        folded.sort();
        let want: Vec<_> = counted
            .iter()
            .map(|&(rule, p, b)| (generation, rule, p, b))
            .collect();
        assert_eq!(folded, want, "round {round}: folded counters");
    }
    assert_eq!(
        generations, [generations[0]; 3],
        "the same generation was reused"
    );

    // The first and the last slot of an array read in more than one batch count: each CPU's region is a
    // read of its own, every region after the first resumed after the element before it, as a second
    // batch is (the whole array of a default load holds 2^18 slots per CPU here, a policy too slow to
    // apply in the VMs).
    let batch = vpcgate::datapath::RULE_COUNTER_BATCH_BYTES
        / (size_of::<vpcgate_common::datapath::RuleStats>() * cpus as usize);
    let slots = batch as u32 + 64;
    let mut h = Harness::with_counter_slots(slots);
    let generation = h.apply(&hosts(slots / 2)).generation;
    let ids: std::collections::HashMap<&str, u32> = h
        .compiled
        .as_ref()
        .unwrap()
        .rules
        .iter()
        .map(|r| (r.name.as_str(), r.id))
        .collect();
    // (host index, rule id, slot) of every host whose slot is in the array.
    let in_array: Vec<(u32, u32, u32)> = (0..slots / 2)
        .map(|i| {
            let id = ids[format!("a{i}").as_str()];
            (i, id, rule_counter_slot(u32::from(generation), id))
        })
        .filter(|&(_, _, s)| s < slots)
        .collect();
    let first = *in_array.iter().min_by_key(|x| x.2).unwrap();
    let last = *in_array.iter().max_by_key(|x| x.2).unwrap();
    assert!(
        last.2 >= slots - 2,
        "a rule at the array's end: {last:?} of {slots}"
    );
    for (i, _, _) in [first, last] {
        assert_eq!(h.check(Enforcer::TcEgress, &frame_with(i, 0)), None);
    }
    let stats = h.dp.rule_stats().unwrap();
    assert_eq!(
        (stats.len(), stats[&first.1].packets, stats[&last.1].packets),
        (2, 1, 1),
        "{stats:?}"
    );
}

#[test]
fn drop_events_carry_the_packet_and_a_flood_is_rate_limited() {
    use vpcgate_common::datapath::{basis, limits};
    vpcgate_lab::require_root();
    let mut h = Harness::new();
    h.apply(&small());
    let wrong_port = build("to web:22", &[ipv4(), tcp(22)], 0);
    assert_eq!(h.check(Enforcer::TcEgress, &wrong_port), None);
    let events = h.dp.take_events(10).unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = events[0];
    assert_eq!(
        (e.reason, e.basis, e.audit, e.tuple.family, e.tuple.proto),
        (
            DropReason::PortNotAuthorized.code(),
            basis::COVERED,
            0,
            4,
            6
        )
    );
    assert_eq!(
        (
            u16::from_be_bytes(e.tuple.sport),
            u16::from_be_bytes(e.tuple.dport)
        ),
        (40000, 22)
    );
    assert_eq!(&e.tuple.dst[..4], &[10, 0, 3, 7]);
    assert!(e.timestamp_ns > 0);

    // A flood: the kernel runs the program many times in a tight loop; the bucket holds EVENTS_BURST
    // events and refills EVENTS_PER_SEC per second, so most are counted as suppressed, none lost.
    let flood = 20_000u32;
    let f = flood_tc_egress(&mut h, &wrong_port.bytes, flood);
    let (emitted, loss) = (f.events.len() as u64, f.after);
    let suppressed = loss.suppressed - f.before.suppressed;
    assert_eq!(
        emitted + suppressed,
        u64::from(flood),
        "every drop is either an event or counted as suppressed"
    );
    assert_eq!(loss.lost, 0);
    assert!(
        suppressed > 0,
        "a flood of {flood} drops was not rate limited"
    );
    assert!(
        emitted >= 1 && emitted < u64::from(flood),
        "{emitted} events"
    );
    eprintln!(
        "flood of {flood} drops: {emitted} events (burst {}), {suppressed} suppressed",
        limits::EVENTS_BURST
    );
}

/// What a flood of TC egress runs did: `repeat` runs of `bytes` in one BPF_PROG_TEST_RUN.
struct Flood {
    /// The runs' verdict (the kernel reports the last run's).
    verdict: u32,
    /// The drop events they emitted.
    events: Vec<vpcgate_common::datapath::DropEvent>,
    /// Event loss (suppressed, lost) before and after.
    before: vpcgate::datapath::EventLoss,
    after: vpcgate::datapath::EventLoss,
}

fn flood_tc_egress(h: &mut Harness, bytes: &[u8], repeat: u32) -> Flood {
    use aya::programs::{TestRun, TestRunOptions};
    let before = h.dp.event_loss().unwrap();
    let opts = TestRunOptions {
        data_in: Some(bytes),
        repeat,
        ..TestRunOptions::new()
    };
    let verdict =
        h.dp.tc_egress()
            .unwrap()
            .test_run(opts)
            .unwrap()
            .return_value;
    Flood {
        verdict,
        events: h.dp.take_events(repeat as usize + 1).unwrap(),
        before,
        after: h.dp.event_loss().unwrap(),
    }
}

const EXACT: &str = r#"
[instance]
name = "exact"
kind = "vpc-integration"
vpc_id = "vpc-1"
interface = "eth1"
vswitch_cidr = "10.0.0.0/24"
reserved_cidrs = ["10.1.9.0/24"]
[[accessible]]
cidr = "10.1.0.0/16"
ports = ["80", "443"]
protocols = ["tcp", "udp"]
[[accessible]]
cidr = "fd00:1::/64"
[[authorization]]
name = "web"
vpc_id = "vpc-1"
address = "10.1.3.7"
ports = ["80"]
protocol = "tcp"
[[authorization]]
name = "dns"
vpc_id = "vpc-1"
address = "fd00:1::53"
ports = ["53"]
protocol = "udp"
"#;

/// `EXACT` with `edit` applied to its text.
fn exact(edit: impl Fn(&str) -> String) -> Compiled {
    let text = edit(EXACT);
    let c = check_text("exact.toml", &text);
    Compiled::new(&c.policy.unwrap_or_else(|| panic!("{:#?}", c.diagnostics)))
}

/// A sequence of in-place and generation applies: TCP/UDP flips (so tables shared by both protocols
/// change hands), port edits, reserved blocks added and removed, a rule added and removed at the end, a rename.
fn exact_sequence() -> Vec<Compiled> {
    vec![
        exact(|t| t.to_owned()),
        exact(|t| t.replace(r#"protocol = "tcp""#, r#"protocol = "udp""#)),
        exact(|t| t.replace(r#"ports = ["80", "443"]"#, r#"ports = ["80", "8000-8100"]"#)),
        exact(|t| {
            t.replace(
                r#"["10.1.9.0/24"]"#,
                r#"["10.1.9.0/24", "10.1.9.128/25", "fd00:1::1:0/112"]"#,
            )
        }),
        exact(|t| t.replace(r#"protocols = ["tcp", "udp"]"#, r#"protocols = ["udp"]"#)),
        exact(|t| t.replace(r#"name = "dns""#, r#"name = "resolver""#)),
        exact(|t| format!("{t}[[accessible]]\ncidr = \"10.2.0.0/16\"\nports = [\"22\"]\n")),
        exact(|t| t.to_owned()),
    ]
}

fn other(g: u8) -> u8 {
    if g == GEN_A { GEN_B } else { GEN_A }
}

/// The active generation holds exactly `desired(c)`, the other nothing.
fn assert_exact(dp: &mut vpcgate::datapath::Datapath, c: &Compiled, what: &str) {
    let g = dp.active_generation().unwrap().expect("a policy is active");
    let diff = dp.read_generation(g).unwrap().differences(&desired(c), 8);
    assert!(diff.is_empty(), "{what}: generation {g}: {diff:#?}");
    let rest = dp.read_generation(other(g)).unwrap();
    assert!(
        rest.is_empty(),
        "{what}: the inactive generation holds {rest:?}"
    );
}

#[test]
fn after_any_sequence_of_applies_the_kernel_holds_exactly_what_a_fresh_apply_writes() {
    vpcgate_lab::require_root();
    let mut h = Harness::new();
    let sequence = exact_sequence();
    let mut incremental = 0;
    for (i, c) in sequence.iter().enumerate() {
        let report = h.dp.apply(c).unwrap_or_else(|e| panic!("apply {i}: {e}"));
        incremental += usize::from(report.incremental);
        assert_exact(&mut h.dp, c, &format!("after apply {i}"));
    }
    assert!(incremental >= 4, "{incremental} in-place applies");
    let last = sequence.last().unwrap();
    let mut fresh = Harness::new();
    fresh.dp.apply(last).unwrap_or_else(|e| panic!("{e}"));
    let (g, fg) = (
        h.dp.active_generation().unwrap().unwrap(),
        fresh.dp.active_generation().unwrap().unwrap(),
    );
    assert_eq!(
        h.dp.read_generation(g).unwrap(),
        fresh.dp.read_generation(fg).unwrap(),
        "a fresh apply of the last policy writes other entries"
    );
    h.dp.barrier().unwrap_or_else(|e| panic!("{e}"));
}

/// Fails `from` -> `to` at every operation of its plan in turn: before the flip (or anywhere in place)
/// the previous policy stays, read back entry for entry; after the flip the new one is whole and the old
/// generation's leftovers are reported, then removed by the next apply.
fn fail_at_every_operation(h: &mut Harness, from: &Compiled, to: &Compiled) -> (usize, usize) {
    let (mut kept, mut stale) = (0, 0);
    for at in 0.. {
        assert!(at < 10_000, "the plan never completed");
        h.dp.apply(from).unwrap_or_else(|e| panic!("{e}"));
        let before = h.dp.active_generation().unwrap();
        h.dp.fail_next_apply_at(at);
        match h.dp.apply(to) {
            Err(e @ DatapathError::ApplyFailed { .. }) => {
                assert!(e.to_string().contains("injected failure"), "{e}");
                assert_eq!(h.dp.active_generation().unwrap(), before, "{e}");
                assert_exact(&mut h.dp, from, &format!("failure at {at}: {e}"));
                kept += 1;
            }
            Err(e) => panic!("failure at {at}: {e}"),
            Ok(r) if r.stale_entries > 0 => {
                assert!(!r.incremental, "{r:?}");
                let g = h.dp.active_generation().unwrap().unwrap();
                let diff =
                    h.dp.read_generation(g)
                        .unwrap()
                        .differences(&desired(to), 8);
                assert!(diff.is_empty(), "failure at {at}: {diff:?}");
                stale += 1;
            }
            Ok(_) => {
                assert_exact(&mut h.dp, to, "no failure");
                return (kept, stale);
            }
        }
    }
    unreachable!()
}

#[test]
fn a_failed_apply_keeps_or_restores_the_previous_policy_exactly() {
    vpcgate_lab::require_root();
    let mut h = Harness::new();
    let s = exact_sequence();
    // In place: TCP -> UDP of "web".
    let (kept, stale) = fail_at_every_operation(&mut h, &s[0], &s[1]);
    assert!(
        kept > 3 && stale == 0,
        "in place: {kept} restored, {stale} stale"
    );
    // A new generation: "dns" renamed.
    let (kept, stale) = fail_at_every_operation(&mut h, &s[4], &s[5]);
    assert!(
        kept > 3 && stale > 3,
        "generation: {kept} kept, {stale} stale"
    );
    // The leftovers of the last stale run are gone after one more apply.
    h.dp.apply(&s[6]).unwrap_or_else(|e| panic!("{e}"));
    assert_exact(&mut h.dp, &s[6], "after the failures");
}

#[test]
fn icmp_errors_credit_the_quoted_destination_read_by_its_own_protocol() {
    vpcgate_lab::require_root();
    let mut h = Harness::new();
    let policy = check_text(
        "quote.toml",
        &format!(
            "{SMALL}\n[[authorization]]\nname = \"dns\"\nvpc_id = \"vpc-1\"\naddress = \"10.0.3.7\"\nports = [\"53\"]\nprotocol = \"udp\"\n"
        ),
    )
    .policy
    .expect("valid");
    h.apply(&policy);
    let backend: IpAddr = "10.0.3.7".parse().unwrap();
    let gateway: IpAddr = "10.0.0.5".parse().unwrap();
    // The gateway sends a UDP datagram to dns:53 and an echo request to the same host.
    for frame in [
        build("to dns:53", &[ipv4(), vpcgate_lab::packet::udp(53)], 8),
        build("ping", &[ipv4(), Layer::Icmp { kind: 8, code: 0 }], 8),
    ] {
        assert_eq!(h.check(Enforcer::TcEgress, &frame), None);
    }
    let error = |name: &str, quoted_proto: u8| {
        let mut f = build(
            name,
            &[
                Layer::Ipv4 {
                    src: [10, 0, 3, 7],
                    dst: [10, 0, 0, 5],
                    options: 0,
                    frag_offset: 0,
                    more_fragments: false,
                    id: 1,
                },
                Layer::Icmp { kind: 3, code: 3 },
                Layer::Quote {
                    src: gateway,
                    dst: backend,
                },
            ],
            0,
        );
        // The quoted header's protocol (the quote is the datagram's IP header + 8 bytes).
        let q = f.offsets[2];
        f.bytes[q + 9] = quoted_proto;
        f
    };
    // Port unreachable quoting the UDP datagram: credited to (10.0.3.7, udp, 53).
    h.inbound(&error("port unreachable", 17));
    // The same bytes quoting an echo request: the 8 bytes after its header are type, code, checksum and
    // identifier, not ports: credited to (10.0.3.7, icmp, 0), never to a port named by those bytes.
    h.inbound(&error("unreachable quoting a ping", 1));
    let udp =
        h.dp.destination(backend, 17, 53)
            .unwrap()
            .expect("udp 53 observed");
    assert_eq!(
        (udp.icmp_errors, udp.icmp_type, udp.icmp_code),
        (1, Some(3), Some(3))
    );
    let icmp =
        h.dp.destination(backend, 1, 0)
            .unwrap()
            .expect("icmp observed");
    assert_eq!(icmp.icmp_errors, 1);
    assert_eq!(h.dp.destination(backend, 1, 53).unwrap(), None);
}

/// Passes toward a destination are counted exactly, whether a hook combined them in its pending run or
/// added them to the destination's entry: runs of one destination, a drop in the middle of a run,
/// alternating destinations, a run across ticks (whose entry gets the new time), two hooks, SYNs among
/// them.
#[test]
fn passes_are_observed_exactly_whether_combined_in_a_run_or_not() {
    vpcgate_lab::require_root();
    // One CPU: the runs are this CPU's, so the test knows which it combined.
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(libc::sched_getcpu().max(0) as usize, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
    let mut h = Harness::new();
    h.apply(&hosts(2));
    let to = |i: u32, syn: bool, dport: u16| {
        let l4 = Layer::Tcp {
            sport: 40000,
            dport,
            flags: if syn { 0x02 } else { 0x10 },
            options: 0,
        };
        to_host(i, l4, 0)
    };
    let addr = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0b00_0000 | i));
    let dest = |h: &Harness, i: u32, port: u16| h.dp.destination(addr(i), 6, port).unwrap();
    let seen = |h: &Harness, i: u32| dest(h, i, 80).map_or((0, 0), |d| (d.passed, d.syn_sent));
    let pending = |h: &Harness, i: u32| -> u64 {
        h.dp.pending_observations()
            .unwrap()
            .iter()
            .filter(|p| p.key.addr[..4] == Ipv4Addr::from(0x0b00_0000 | i).octets())
            .map(|p| p.passed)
            .sum()
    };
    // A run toward host 0 on TC egress: a SYN, then ACKs, in bursts of ten until a burst ends inside a
    // run (a tick boundary just before a burst's last packet leaves nothing pending; under emulation a
    // tick is a few checks long).
    let mut sent = 0;
    for _ in 0..20 {
        for _ in 0..10 {
            assert_eq!(h.check(Enforcer::TcEgress, &to(0, sent == 0, 80)), None);
            sent += 1;
        }
        if pending(&h, 0) >= 1 {
            break;
        }
    }
    assert!(
        pending(&h, 0) >= 1,
        "{sent} passes in bursts of ten were all looked up: nothing combined"
    );
    assert_eq!(seen(&h, 0), (sent, 1));
    // A drop in the middle of a run is its own observation; the run's count stays whole.
    for k in 0..5 {
        let port = if k == 2 { 81 } else { 80 };
        assert_eq!(h.check(Enforcer::TcEgress, &to(0, false, port)), None);
    }
    assert_eq!(seen(&h, 0), (sent + 4, 1));
    let denied = dest(&h, 0, 81).expect("the drop is observed");
    assert_eq!((denied.passed, denied.dropped), (0, 1));
    // Alternating destinations: every pass ends the other's run.
    for k in 0..6 {
        assert_eq!(h.check(Enforcer::TcEgress, &to(k % 2, k == 1, 80)), None);
    }
    assert_eq!((seen(&h, 0), seen(&h, 1)), ((sent + 7, 1), (3, 1)));
    // The same destination in a later tick (a tick is at most 10 ms), and on the other hook: the entry
    // gets the later time.
    let before = dest(&h, 1, 80).unwrap().last_seen_ns;
    std::thread::sleep(std::time::Duration::from_millis(25));
    for k in 0..4 {
        assert_eq!(h.check(Enforcer::TcEgress, &to(1, k == 3, 80)), None);
        assert_eq!(h.check(Enforcer::XdpForward, &to(1, false, 80)), None);
    }
    assert_eq!((seen(&h, 0), seen(&h, 1)), ((sent + 7, 1), (11, 2)));
    let after = dest(&h, 1, 80).unwrap().last_seen_ns;
    assert!(
        after >= before + 10_000_000,
        "last seen {before} then {after} ns: the run in a later tick kept the old time"
    );
    // Another destination ends host 1's runs: the counts stay whole.
    assert_eq!(h.check(Enforcer::TcEgress, &to(0, false, 80)), None);
    assert_eq!(h.check(Enforcer::XdpForward, &to(0, false, 80)), None);
    assert_eq!((seen(&h, 0), seen(&h, 1)), ((sent + 9, 1), (11, 2)));
}

/// A run takes its hook's scratch slot in one atomic exchange and gives it back when done, whatever it
/// decided; a run that finds it taken fails closed (passes under an audit policy, as any fail-closed
/// verdict) and leaves it to its holder (`main::scratch`).
#[test]
fn a_run_that_finds_its_scratch_packet_taken_fails_closed() {
    use vpcgate_common::parse_stats::Hook;
    use vpcgate_lab::harness::run_prog;
    vpcgate_lab::require_root();
    const HOOKS: [Hook; 3] = [Hook::TcEgress, Hook::XdpForward, Hook::Xdp];
    let mut h = Harness::new();
    h.apply(&small());
    let pass = build("to web:80", &[ipv4(), tcp(80)], 0);
    let denied = build("to web:81", &[ipv4(), tcp(81)], 0);
    // An IPv4 header length of 16 bytes (IHL 4), less than the header's own: malformed.
    let mut malformed = pass.bytes.clone();
    assert_eq!(malformed[14], 0x45, "an IPv4 header after Ethernet");
    malformed[14] = 0x44;
    // (TC egress, XDP forward, XDP ingress) return values for one frame.
    let run = |h: &mut Harness, b: &[u8]| {
        (
            run_prog(h.dp.tc_egress().unwrap(), b),
            run_prog(h.dp.xdp_forward().unwrap(), b),
            run_prog(h.dp.xdp_ingress().unwrap(), b),
        )
    };
    let flags = |h: &Harness, hook: Hook| h.dp.scratch_busy(hook).unwrap();
    let all_free = |h: &Harness| {
        for hook in HOOKS {
            assert!(
                flags(h, hook).iter().all(|&b| b == 0),
                "{hook:?}: a finished run left its slot taken: {:?}",
                flags(h, hook)
            );
        }
    };
    use vpcgate_lab::harness::{TC_PASS, TC_SHOT, XDP_DROP, XDP_PASS};
    // Free: each program decides, and each run gives its slot back, whatever it decided (or the
    // second round would fail closed).
    for _ in 0..2 {
        assert_eq!(run(&mut h, &pass.bytes), (TC_PASS, XDP_PASS, XDP_PASS));
        assert_eq!(run(&mut h, &denied.bytes), (TC_SHOT, XDP_DROP, XDP_PASS));
        assert_eq!(run(&mut h, &malformed), (TC_SHOT, XDP_DROP, XDP_PASS));
        all_free(&h);
    }
    // Taken (as by a run another task interleaved on this CPU), here with a value no run writes: the
    // allowed packet drops (the observing program passes it), and each run's exchange wrote 1 over it.
    // This rules out the former load-test-store, which left a taken slot as it found it.
    for hook in HOOKS {
        h.dp.set_scratch_busy(hook, 2).unwrap();
    }
    // Each enforcing run that finds its slot taken counts a `malformed` drop (or, under audit, an
    // audited one) and reports it, without the packet's addresses it never read.
    let malformed_counts = |h: &Harness| {
        let d = h.dp.drop_counts().unwrap();
        (
            d.dropped[&DropReason::Malformed],
            d.audited[&DropReason::Malformed],
        )
    };
    let reported = |h: &mut Harness, audit: u32| {
        let events = h.dp.take_events(100).unwrap();
        assert_eq!(events.len(), 2, "one event per enforcing hook: {events:?}");
        for e in events {
            assert_eq!(
                (e.reason, e.basis, e.audit, e.tuple.family, e.tuple.dst),
                (
                    DropReason::Malformed.code(),
                    vpcgate_common::datapath::basis::SLOT_TAKEN,
                    audit,
                    0,
                    [0; 16]
                ),
                "{e:?}"
            );
        }
    };
    h.dp.take_events(100).unwrap();
    let before = malformed_counts(&h);
    assert_eq!(run(&mut h, &pass.bytes), (TC_SHOT, XDP_DROP, XDP_PASS));
    assert_eq!(malformed_counts(&h), (before.0 + 2, before.1));
    reported(&mut h, 0);
    let cpu = |h: &Harness, hook: Hook| {
        let f = flags(h, hook);
        (
            f.iter().filter(|&&b| b == 1).count(),
            f.iter().filter(|&&b| b == 2).count(),
            f.len(),
        )
    };
    for hook in HOOKS {
        let (ones, twos, n) = cpu(&h, hook);
        assert!(
            ones >= 1 && ones + twos == n,
            "{hook:?}: the run's exchange should have left 1 on its CPU and 2 elsewhere: {:?}",
            flags(&h, hook)
        );
    }
    // Still taken (the failed runs did not free the holder's slot): it still drops.
    assert_eq!(run(&mut h, &pass.bytes), (TC_SHOT, XDP_DROP, XDP_PASS));
    assert_eq!(malformed_counts(&h), (before.0 + 4, before.1));
    reported(&mut h, 0);
    // A flood of runs that find the slot taken: every one counted, and reported within the event
    // budget like any drop (the rest counted as suppressed, none lost).
    {
        let flood = 20_000u32;
        let f = flood_tc_egress(&mut h, &pass.bytes, flood);
        assert_eq!(f.verdict, TC_SHOT);
        assert_eq!(
            malformed_counts(&h),
            (before.0 + 4 + u64::from(flood), before.1)
        );
        let (events, loss, after) = (f.events, f.before, f.after);
        assert!(
            events
                .iter()
                .all(|e| e.basis == vpcgate_common::datapath::basis::SLOT_TAKEN),
            "{events:?}"
        );
        let suppressed = after.suppressed - loss.suppressed;
        assert_eq!(events.len() as u64 + suppressed, u64::from(flood));
        assert!(suppressed > 0, "a flood of {flood} was not rate limited");
        assert_eq!(after.lost, loss.lost);
    }
    // Under an audit policy a taken slot passes, as TC egress's and XDP forward's fail-closed verdicts do.
    let mut audit = small();
    audit.instance.mode = Mode::Audit;
    h.apply(&audit);
    let dropped = malformed_counts(&h).0;
    for (i, frame) in [&pass.bytes, &denied.bytes, &malformed]
        .into_iter()
        .enumerate()
    {
        assert_eq!(run(&mut h, frame), (TC_PASS, XDP_PASS, XDP_PASS));
        assert_eq!(
            malformed_counts(&h),
            (dropped, before.1 + 2 * (i as u64 + 1))
        );
        reported(&mut h, 1);
    }
    for hook in HOOKS {
        assert!(
            flags(&h, hook).iter().all(|&b| b != 0),
            "{hook:?}: a run under audit freed a slot it found taken: {:?}",
            flags(&h, hook)
        );
    }
    // Given back, the slots serve again.
    h.apply(&small());
    for hook in HOOKS {
        h.dp.set_scratch_busy(hook, 0).unwrap();
    }
    assert_eq!(run(&mut h, &pass.bytes), (TC_PASS, XDP_PASS, XDP_PASS));
    all_free(&h);
}

/// Rules 4-7 decide a TCP or UDP packet from its destination, protocol and port only, and each hook
/// memoizes its last such decision per CPU while the policy epoch stays (`VerdictMemo`). Every apply
/// fences its writes with new epochs: the first packet after it is decided by the new policy, in place or
/// as a new generation, whether the decision flips to a drop or back to a pass. The thread stays on one CPU, and
/// each round first shows the packet's decision memoized there under the current epoch.
///
/// A packet toward another port follows each round's checks, so the next round's first packet finds
/// its hook's last decision for another key, and its own in the hook's `VERDICT_CACHE`: from the epoch
/// before the apply, which must not be reused either.
#[test]
fn a_memoized_decision_never_outlives_an_apply() {
    use vpcgate::policy::verdict::Action;
    use vpcgate_common::parse_stats::Hook;
    vpcgate_lab::require_root();
    let pinned = stay_on_this_cpu();
    let cpu = pinned.cpu;
    let with_port = |name: &str, port: u16| {
        let mut p = small();
        p.authorizations[0].name = name.into();
        p.authorizations[0].ports = PortSet::from_ranges(vec![(port, port)]);
        p
    };
    // Allowed, then not (another port of the same rule: in place), allowed again (in place), not
    // allowed by a renamed rule (a new generation), allowed again (a new generation).
    let steps = [
        (with_port("web", 80), None),
        (with_port("web", 81), Some(true)),
        (with_port("web", 80), Some(true)),
        (with_port("web2", 81), Some(false)),
        (with_port("web", 80), Some(false)),
    ];
    let frame = build("to web:80", &[ipv4(), tcp(80)], 0);
    let elsewhere = build("to web:22", &[ipv4(), tcp(22)], 0);
    let mut h = Harness::new();
    // The agent writes the epoch in place with one 8-byte store, which needs an mmapable map: a write
    // through the syscall is a `memcpy`, and a read racing it could see a mix of two epochs.
    assert!(
        h.dp.policy_epoch_is_mmapable().unwrap(),
        "POLICY_EPOCH must be mmapable"
    );
    let mut last_epoch = 0;
    for round in 0..20 {
        for (i, (policy, incremental)) in steps.iter().enumerate() {
            let report = h.apply(policy);
            if let Some(incremental) = incremental {
                assert_eq!(report.incremental, *incremental, "round {round} step {i}");
            }
            // (A round's first step applies what its last one did: nothing changes, nor the epoch.)
            let epoch = h.dp.policy_epoch().unwrap();
            assert!(
                epoch > last_epoch || (i == 0 && round > 0 && epoch == last_epoch),
                "round {round} step {i}: epoch {epoch} after {last_epoch}"
            );
            last_epoch = epoch;
            for (enforcer, hook) in [
                (Enforcer::TcEgress, Hook::TcEgress),
                (Enforcer::XdpForward, Hook::XdpForward),
            ] {
                // The first run decides (and memoizes); the next ones reuse it. The reference says which
                // policy holds: port 80 passes under the first, third and fifth step only.
                for run in 0..3 {
                    if let Some(m) = h.check(enforcer, &frame) {
                        panic!("round {round} step {i} run {run}: {m}");
                    }
                }
                let want = if i % 2 == 0 {
                    Action::Pass
                } else {
                    Action::Drop
                };
                assert_eq!(h.reference(&frame).action, want, "step {i}");
                let memos = h.dp.memo_epochs(hook).unwrap();
                assert!(
                    memos.contains(&epoch),
                    "round {round} step {i}: no {hook:?} memo of epoch {epoch} on this CPU: {memos:?}"
                );
                if let Some(m) = h.check(enforcer, &elsewhere) {
                    panic!("round {round} step {i}, toward port 22: {m}");
                }
                assert!(
                    cached(&h, hook, cpu, TCP_PORT_80)
                        .iter()
                        .any(|(_, r)| r.epoch == epoch),
                    "round {round} step {i}: no {hook:?} cache record for port 80 of epoch {epoch} on CPU {cpu}"
                );
            }
        }
    }
}

/// Keeps the calling thread on the CPU it runs on (each CPU has its own memoized decisions).
fn stay_on_this_cpu() -> vpcgate_lab::harness::StayOnCpu {
    vpcgate_lab::harness::StayOnCpu::here().unwrap_or_else(|e| panic!("pinning to one CPU: {e}"))
}

/// A `VerdictMemo`'s `port`: TCP toward port 80.
const TCP_PORT_80: u32 = 6 << 16 | 80;

/// The records `hook`'s region of `VERDICT_CACHE` holds on `cpu` for `port` (protocol and port), with
/// their index in the map (the policies here authorize one address: the port and the generation name
/// the key).
fn cached(
    h: &Harness,
    hook: vpcgate_common::parse_stats::Hook,
    cpu: usize,
    port: u32,
) -> Vec<(u32, vpcgate_common::datapath::VerdictMemo)> {
    h.dp.verdict_cache(hook)
        .unwrap()
        .into_iter()
        .filter(|&(c, _, r)| c == cpu && r.port == port)
        .map(|(_, i, r)| (i, r))
        .collect()
}

/// The one record for `port` (`cached`), after one apply.
fn cached_once(
    h: &Harness,
    hook: vpcgate_common::parse_stats::Hook,
    cpu: usize,
    port: u32,
) -> (u32, vpcgate_common::datapath::VerdictMemo) {
    let found = cached(h, hook, cpu, port);
    assert_eq!(found.len(), 1, "{hook:?} records for {port:#x}: {found:?}");
    found[0]
}

/// Each enforcing hook keeps decisions per CPU in `VERDICT_CACHE`, direct-mapped: two destinations whose
/// keys share a slot take it from each other, and neither is ever decided by the other's record. Here a
/// port the rule authorizes and one it does not, then an address it does not cover, alternate in one
/// slot; every packet's verdict is the reference's, and the slot always holds the last one's record.
#[test]
fn destinations_that_share_a_cache_slot_are_never_confused() {
    use vpcgate_common::{datapath::verdict_cache_index, parse_stats::Hook};
    vpcgate_lab::require_root();
    let pinned = stay_on_this_cpu();
    let cpu = pinned.cpu;
    let mut h = Harness::new();
    h.apply(&small());
    let to = |dst: [u8; 4], port: u16| {
        let Layer::Ipv4 { src, .. } = ipv4() else {
            unreachable!()
        };
        build(
            "to a destination",
            &[
                Layer::Ipv4 {
                    src,
                    dst,
                    options: 0,
                    frag_offset: 0,
                    more_fragments: false,
                    id: 1,
                },
                tcp(port),
            ],
            0,
        )
    };
    let bits = h.dp.verdict_cache_bits().unwrap();
    let web = [10, 0, 3, 7];
    assert!(h.check(Enforcer::TcEgress, &to(web, 80)).is_none());
    let (slot, record) = cached_once(&h, Hook::TcEgress, cpu, TCP_PORT_80);
    // Another port of web in the same slot (the policy authorizes port 80 only).
    let port = (1..=u16::MAX)
        .find(|&p| {
            p != 80 && verdict_cache_index(0, bits, &record.key, 6 << 16 | u32::from(p)) == slot
        })
        .expect("a port whose key shares the slot");
    // Another address in the same slot, toward port 80: its key is web's with another last two bytes
    // (`Key<AddrV4>` by words: prefix length, then generation and the first three bytes, then the last).
    let key_of = |c: u8, d: u8| {
        let mut k = record.key;
        k[1] = (k[1] & 0x00ff_ffff) | u32::from(c) << 24;
        k[2] = u32::from(d);
        k
    };
    let other = (0..=u16::MAX)
        .map(|x| [(x >> 8) as u8, x as u8])
        .find(|&[c, d]| {
            [c, d] != [3, 7] && verdict_cache_index(0, bits, &key_of(c, d), TCP_PORT_80) == slot
        })
        .expect("an address whose key shares the slot");
    let other_addr = [10, 0, other[0], other[1]];
    let frames = [
        (to(web, 80), record.key, TCP_PORT_80),
        (to(web, port), record.key, 6 << 16 | u32::from(port)),
        (to(other_addr, 80), key_of(other[0], other[1]), TCP_PORT_80),
    ];
    assert_eq!(
        frames
            .iter()
            .map(|(f, ..)| h.reference(f).action)
            .collect::<Vec<_>>(),
        [
            vpcgate::policy::verdict::Action::Pass,
            vpcgate::policy::verdict::Action::Drop,
            vpcgate::policy::verdict::Action::Drop
        ],
        "the three destinations must be decided differently"
    );
    let epoch = h.dp.policy_epoch().unwrap();
    for round in 0..30 {
        for (i, (frame, key, port)) in frames.iter().enumerate() {
            for (enforcer, hook) in [
                (Enforcer::TcEgress, Hook::TcEgress),
                (Enforcer::XdpForward, Hook::XdpForward),
            ] {
                if let Some(m) = h.check(enforcer, frame) {
                    panic!("round {round} destination {i}: {m}");
                }
                let region = vpcgate_common::datapath::verdict_cache_region(hook).unwrap();
                let records: Vec<_> =
                    h.dp.verdict_cache(hook)
                        .unwrap()
                        .into_iter()
                        .filter(|&(c, ..)| c == cpu)
                        .collect();
                assert_eq!(
                    records.len(),
                    1,
                    "round {round} destination {i}: {hook:?} holds {records:?}"
                );
                let (_, index, r) = records[0];
                assert_eq!(
                    (index, r.key, r.port, r.epoch),
                    (slot + (region << bits), *key, *port, epoch),
                    "round {round} destination {i}: {hook:?}'s record"
                );
            }
        }
    }
}

/// A record of `VERDICT_CACHE` decides a packet exactly when its key, port and epoch are the packet's
/// and the current one: planted with a drop for a destination the policy authorizes, it is obeyed (so the
/// programs read the cache), and with any of the three changed it is ignored.
#[test]
fn a_cached_decision_is_reused_only_for_its_own_key_port_and_epoch() {
    use vpcgate_common::{
        datapath::{VerdictMemo, verdict_cache_index},
        parse_stats::Hook,
    };
    use vpcgate_lab::harness::{TC_PASS, TC_SHOT, XDP_DROP, XDP_PASS, run_prog};
    vpcgate_lab::require_root();
    let pinned = stay_on_this_cpu();
    let cpu = pinned.cpu;
    let mut h = Harness::new();
    h.apply(&small());
    let bits = h.dp.verdict_cache_bits().unwrap();
    let web = build("to web:80", &[ipv4(), tcp(80)], 0);
    assert_eq!(run_prog(h.dp.tc_egress().unwrap(), &web.bytes), TC_PASS);
    let (slot, record) = cached_once(&h, Hook::TcEgress, cpu, TCP_PORT_80);
    // A port of web the rule does not authorize, whose record lies in another slot.
    let port = (22..)
        .find(|&p| verdict_cache_index(0, bits, &record.key, 6 << 16 | u32::from(p)) != slot)
        .unwrap();
    let elsewhere = build("to web, another port", &[ipv4(), tcp(port)], 0);
    // (TC egress, XDP forward) for `web` after `elsewhere` took each hook's last decision.
    let run = |h: &mut Harness| {
        for prog in [
            run_prog(h.dp.tc_egress().unwrap(), &elsewhere.bytes),
            run_prog(h.dp.xdp_forward().unwrap(), &elsewhere.bytes),
        ] {
            assert!(prog == TC_SHOT || prog == XDP_DROP, "web:{port} passed");
        }
        (
            run_prog(h.dp.tc_egress().unwrap(), &web.bytes),
            run_prog(h.dp.xdp_forward().unwrap(), &web.bytes),
        )
    };
    assert_eq!(run(&mut h), (TC_PASS, XDP_PASS));
    let drop = VerdictMemo {
        basis: vpcgate_common::datapath::basis::NO_RULE,
        id: 0,
        reason: DropReason::NotAuthorized.code(),
        ..record
    };
    let plant = |h: &mut Harness, r| {
        for region in 0..2 {
            h.dp.plant_verdict_memo(slot + (region << bits), r).unwrap();
        }
    };
    plant(&mut h, drop);
    assert_eq!(
        run(&mut h),
        (TC_SHOT, XDP_DROP),
        "the planted drop was not used"
    );
    // Another key: each word in turn (prefix length, generation and address bytes, the rest of the
    // address an IPv6 key would hold).
    let other_keys = (0..6).map(|w| {
        let mut key = drop.key;
        key[w] ^= 1;
        (
            format!("another key (word {w})"),
            VerdictMemo { key, ..drop },
        )
    });
    for (what, r) in [
        (
            "an earlier epoch".to_string(),
            VerdictMemo {
                epoch: drop.epoch - 1,
                ..drop
            },
        ),
        (
            "a later epoch".to_string(),
            VerdictMemo {
                epoch: drop.epoch + 1,
                ..drop
            },
        ),
        (
            "another port".to_string(),
            VerdictMemo {
                port: drop.port ^ 1,
                ..drop
            },
        ),
        (
            "another protocol".to_string(),
            VerdictMemo {
                port: 17 << 16 | 80,
                ..drop
            },
        ),
    ]
    .into_iter()
    .chain(other_keys)
    {
        plant(&mut h, r);
        assert_eq!(
            run(&mut h),
            (TC_PASS, XDP_PASS),
            "a record of {what} was used"
        );
        // The pass was looked up and memoized over the planted record.
        assert_eq!(
            cached_once(&h, Hook::TcEgress, cpu, TCP_PORT_80),
            (slot, record),
            "after a record of {what}"
        );
    }
}

/// The verifier's headroom: each program must verify within 70% of the 1,000,000-instruction limit on
/// kernels from 6.6 (this host's generation), and within 90% on older ones, whose verifiers prune less
/// (Debian's 6.1 has needed from 0.83 to 1.26 times this host's count, 1.62 times for TC egress with the
/// verdict cache, and more when a change pruned badly there): a margin kept on the newest kernel is what
/// keeps the older ones loading, and the VM matrix checks them for real. The counts are printed.
#[test]
fn every_program_verifies_well_below_the_instruction_limit() {
    vpcgate_lab::require_root();
    const LIMIT: u32 = 1_000_000;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("kernel release");
    let mut numbers = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    let percent = if version >= (6, 6) { 70 } else { 90 };
    let budget = LIMIT / 100 * percent;
    let h = Harness::new();
    let counts = h.dp.verified_instructions();
    for (name, n) in &counts {
        let n = n.unwrap_or_else(|| {
            panic!("{name}: the kernel did not report its verified instructions")
        });
        println!(
            "verifier on {}: {name} {n} instructions ({}% of the limit, budget {percent}%)",
            release.trim(),
            n / (LIMIT / 100)
        );
        assert!(
            n <= budget,
            "{name} verifies in {n} instructions on {}, over the budget of {budget} ({percent}% of \
             {LIMIT}): a kernel whose verifier prunes less would refuse it",
            release.trim()
        );
    }
    assert_eq!(counts.len(), 3);
}
