//! Applying policies to the kernel maps: generations alternate, a policy that does not fit is refused with
//! the numbers and changes nothing, and counters are kept per rule and per reason.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use vpcgate::{
    datapath::DatapathError,
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

fn huge(v4_prefixes: u32) -> Policy {
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
        h.dp.apply(&Compiled::new(&huge(limits::ADDR_ENTRIES + 1)))
            .unwrap_err();
    assert!(
        matches!(
            err,
            DatapathError::MapFull {
                map: "ADDR_V4",
                capacity: 16384,
                needed: 16385
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "map ADDR_V4 is full: 16384 entries, the policy needs 16385; the old policy stays active"
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
        h.dp.apply(&Compiled::new(&huge(limits::ADDR_ENTRIES)))
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.entries.addr_v4, limits::ADDR_ENTRIES);
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
    let policies = [small(), huge(300), small(), huge(5)];
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

#[test]
fn drop_events_carry_the_packet_and_a_flood_is_rate_limited() {
    use aya::programs::{TestRun, TestRunOptions};
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
        (e.reason, e.basis, e.audit, e.family, e.proto),
        (
            DropReason::PortNotAuthorized.code(),
            basis::COVERED,
            0,
            4,
            6
        )
    );
    assert_eq!(
        (u16::from_be_bytes(e.sport), u16::from_be_bytes(e.dport)),
        (40000, 22)
    );
    assert_eq!(&e.dst[..4], &[10, 0, 3, 7]);
    assert!(e.timestamp_ns > 0);

    // A flood: the kernel runs the program many times in a tight loop; the bucket holds EVENTS_BURST
    // events and refills EVENTS_PER_SEC per second, so most are counted as suppressed, none lost.
    let flood = 20_000u32;
    let before = h.dp.event_loss().unwrap();
    let opts = TestRunOptions {
        data_in: Some(&wrong_port.bytes),
        repeat: flood,
        ..TestRunOptions::new()
    };
    h.dp.tc_egress().unwrap().test_run(opts).unwrap();
    let emitted = h.dp.take_events(flood as usize + 1).unwrap().len() as u64;
    let loss = h.dp.event_loss().unwrap();
    let suppressed = loss.suppressed - before.suppressed;
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
