//! Atomic policy swaps under traffic: while the gateway streams UDP, policies A and B are applied
//! alternately 1000 times. Destinations both allow (through different entries) must never see a drop;
//! destinations both deny (each policy has entries near them) must never see a packet pass.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use vpcgate::{
    datapath::{Datapath, XdpRole},
    policy::{check_text, compile::Compiled},
};
use vpcgate_lab::netns::{GW_IF, Pair, VPC_IF};

const SWAPS: usize = 1000;
/// Upper bound on datagrams per destination, whatever the speed of the machine.
const MAX_PER_DEST: u64 = 2_000_000;
/// Upper bound on the whole test's streaming time.
const MAX_STREAM: Duration = Duration::from_secs(120);

const HEAD: &str = r#"
[instance]
name = "swap"
kind = "dedicated"
vpc_id = "vpc-lab"
interface = "veth-gw"
"#;

/// A: exact host entries.
const A: &str = r#"
[[authorization]]
name = "a-host"
vpc_id = "vpc-lab"
address = "10.200.0.2"
ports = ["9000"]
protocol = "udp"
[[authorization]]
name = "a-host6"
vpc_id = "vpc-lab"
address = "fd00:200::2"
ports = ["9000"]
protocol = "udp"
"#;

/// B: small blocks with a port range, covering the same hosts through different entries.
const B: &str = r#"
[[authorization]]
name = "b-block"
vpc_id = "vpc-lab"
address = "10.200.0.0/30"
ports = ["8999-9001"]
protocol = "udp"
[[authorization]]
name = "b-block6"
vpc_id = "vpc-lab"
address = "fd00:200::/126"
ports = ["9000-9001"]
protocol = "udp"
"#;

const ALLOWED: [&str; 2] = ["10.200.0.2:9000", "[fd00:200::2]:9000"];
/// Next to A's and B's entries, allowed by neither: another port of the same host, a host beside the block.
const DENIED: [&str; 3] = ["10.200.0.2:9002", "10.200.0.10:9000", "[fd00:200::2]:9002"];

fn compiled(extra: &str) -> Compiled {
    let c = check_text("swap.toml", &format!("{HEAD}{extra}"));
    Compiled::new(&c.policy.unwrap_or_else(|| panic!("{:?}", c.diagnostics)))
}

#[test]
fn a_thousand_swaps_under_traffic_never_drop_what_both_allow_nor_pass_what_both_deny() {
    vpcgate_lab::require_root();
    let pair = Pair::new();
    pair.vpc
        .ip(&["addr", "add", "10.200.0.10/24", "dev", VPC_IF]);
    let (a, b) = (compiled(A), compiled(B));
    let mut dp = Datapath::load().unwrap_or_else(|e| panic!("{e}"));
    dp.apply(&a).unwrap_or_else(|e| panic!("{e}"));
    pair.gw.run(|| {
        dp.attach_tc_egress(GW_IF).unwrap_or_else(|e| panic!("{e}"));
        dp.attach_xdp(GW_IF, XdpRole::EniIngress)
            .unwrap_or_else(|e| panic!("{e}"));
    });
    // Receivers exist so nothing answers with ICMP port unreachable; what they get is not the measure.
    let _receivers: Vec<UdpSocket> = pair.vpc.run(|| {
        ALLOWED
            .iter()
            .chain(DENIED.iter())
            .map(|d| UdpSocket::bind(d.parse::<SocketAddr>().unwrap()).unwrap())
            .collect()
    });
    let sock = pair.gw.run(|| UdpSocket::bind("0.0.0.0:0").unwrap());
    let sock6 = pair.gw.run(|| UdpSocket::bind("[::]:0").unwrap());

    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let targets: Vec<SocketAddr> = ALLOWED
                .iter()
                .chain(DENIED.iter())
                .map(|d| d.parse().unwrap())
                .collect();
            let mut sent_ok = vec![0u64; targets.len()];
            let mut sent_err = vec![0u64; targets.len()];
            let start = Instant::now();
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed)
                && round < MAX_PER_DEST
                && start.elapsed() < MAX_STREAM
            {
                for (i, t) in targets.iter().enumerate() {
                    let s = if t.is_ipv4() { &sock } else { &sock6 };
                    match s.send_to(&round.to_be_bytes(), t) {
                        Ok(_) => sent_ok[i] += 1,
                        Err(_) => sent_err[i] += 1,
                    }
                }
                round += 1;
            }
            (sent_ok, sent_err)
        })
    };
    let start = Instant::now();
    let mut generations = vec![];
    for i in 0..SWAPS {
        let report = dp
            .apply(if i % 2 == 0 { &b } else { &a })
            .unwrap_or_else(|e| panic!("swap {i}: {e}"));
        assert_eq!(report.stale_entries, 0);
        generations.push(report.generation);
    }
    let swap_time = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (sent_ok, sent_err) = sender.join().unwrap();
    generations.dedup();
    assert_eq!(generations.len(), SWAPS, "generations did not alternate");

    let observed = |d: &str| {
        let sa: SocketAddr = d.parse().unwrap();
        dp.destination(sa.ip(), 17, sa.port())
            .unwrap()
            .unwrap_or_else(|| panic!("no observation of {d}"))
    };
    let mut total = 0;
    for (i, d) in ALLOWED.iter().enumerate() {
        let o = observed(d);
        total += o.passed + o.dropped;
        assert_eq!(
            o.dropped, 0,
            "{d}: {} packets dropped during swaps (allowed by both policies)",
            o.dropped
        );
        assert_eq!(
            sent_err[i], 0,
            "{d}: the sender saw {} sends fail",
            sent_err[i]
        );
        assert_eq!(o.passed, sent_ok[i], "{d}: passed vs sent");
        assert!(o.passed > 0);
    }
    for (j, d) in DENIED.iter().enumerate() {
        let i = ALLOWED.len() + j;
        let o = observed(d);
        total += o.passed + o.dropped;
        assert_eq!(
            o.passed, 0,
            "{d}: {} packets passed during swaps (denied by both policies)",
            o.passed
        );
        assert_eq!(o.dropped, sent_ok[i] + sent_err[i], "{d}: dropped vs sent");
        assert!(o.dropped > 0);
    }
    eprintln!(
        "swap: {SWAPS} policy swaps in {swap_time:?} while {total} packets crossed the filter ({} allowed, none dropped; {} denied, none passed)",
        ALLOWED.iter().map(|d| observed(d).passed).sum::<u64>(),
        DENIED.iter().map(|d| observed(d).dropped).sum::<u64>(),
    );
}
