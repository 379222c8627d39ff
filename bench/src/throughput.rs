//! Throughput over veth between the lab's two namespaces (iperf3, both ends on this machine): TCP bits/s
//! and 64-byte UDP packets/s from a client in the gateway namespace to a server at the lab's backend in
//! the VPC namespace, with no filter, with vpcgate (`vpcgate run` on the ENI), with nftables sets and
//! with linear iptables rules on the ENI's output path. Two baselines of vpcgate's own hook, attached to
//! the ENI's TC egress the way vpcgate attaches: an empty program (what the hook itself costs) and the
//! per-packet part's minimal enforcer (vpcgate's parser and one LPM lookup in a trie of the same
//! prefixes): what any enforcer of this design pays on the path, against which vpcgate's features are
//! measured. Spin loops (TC programs that only loop a set number of times) calibrate what run time
//! alone takes off the rate: the report sets vpcgate and the minimal enforcer against them. Setups are
//! measured in rounds that cycle through all of them, so drift on this shared machine hits each alike.
//!
//! A twin link (a second veth pair between the same namespaces, nothing attached, toward a second
//! iperf3 server) gives the setups that filter per device (no filter, and the BPF programs on the ENI)
//! a no-filter run a second away from each of theirs: their runs come in pairs, one through the ENI and
//! one through the twin, back to back in alternating order, and their ratio to no filter is the median
//! of the pairs' ratios, with a distribution-free 95% confidence interval. The no-filter setup's pairs
//! (ENI and twin both bare) show what the two links differ by: the method's resolution. Pairing cancels
//! drift over minutes; runs a second apart still differ by 5-20% here, which only the number of pairs
//! narrows. The interval takes the pairs as independent, though they come from a few installs of each
//! setup (five in a full run).
//! Netfilter's hooks are the namespace's, not a device's (the twin's packets would cross them too), so
//! nftables and iptables are compared with the no-filter setup's ENI runs instead.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use aya::{
    Ebpf,
    maps::Array,
    programs::{SchedClassifier, TcAttachType},
};
use serde::Serialize;
use vpcgate::policy::model::Proto;
use vpcgate_common::datapath::BENCH_SPIN_MAX;
use vpcgate_lab::lab::{self, Lab};

use crate::{
    control::{
        Daemon, PolicyShape, generated_fit, instance_name, new_lab, run_bounded, run_ok,
        shared_toml, spawn,
    },
    policy::{self, Rule},
};

/// One (setup, test) cell: medians over its runs.
#[derive(Serialize, Clone, Debug)]
pub struct Row {
    /// "no filter", "empty TC program", "minimal enforcer 1k", "vpcgate 1k", "nftables 1k",
    /// "iptables 10k", ...
    pub setup: String,
    /// "none", "empty", "parse", "lookup", "spin", "minimal", "vpcgate", "nftables" or "iptables".
    pub filter: String,
    /// Rules of the setup's policy (0 for no filter, the empty program, the parser and the spin loops;
    /// a spin loop's iterations are in its `setup` and `note`).
    pub rules: usize,
    /// "tcp" (bits/s, receiver) or "udp64" (64-byte frames, receiver's packets/s).
    pub test: String,
    pub unit: String,
    pub median: f64,
    pub samples: Vec<f64>,
    /// UDP: the receiver's loss (percent of datagrams sent), median.
    pub loss_percent: Option<f64>,
    /// Busy CPU time of the whole machine (user+nice+system+irq+softirq, /proc/stat) during a run,
    /// divided by the packets sent on the gateway's ENI (TCP: GSO super-packets, what TC egress sees).
    /// Both iperf3 ends run on this machine, and anything else running counts too.
    pub cpu_ns_per_packet: Option<f64>,
    /// How busy the machine was during the runs (percent of all CPUs, median): near 100, the runs are
    /// CPU-bound and `cpu_ns_per_packet` is about (CPUs / packet rate), not a filter's own cost.
    pub cpu_busy_percent: Option<f64>,
    /// Busy time of the CPU that was busiest during a run (/proc/stat, same fields), per packet sent on
    /// the ENI, median. When that CPU is near 100% busy it bounds the rate: a program's cost in situ takes
    /// about its share of this figure off the rate, however idle the other CPUs are.
    pub busiest_cpu_ns_per_packet: Option<f64>,
    /// How busy that CPU was (percent of its time), median.
    pub busiest_cpu_busy_percent: Option<f64>,
    /// CPU time of the two iperf3 processes (their own user+system accounting, as iperf3 reports it;
    /// with tick accounting it includes softirq work done in their context, not ksoftirqd's or other
    /// processes') per packet sent on the ENI, median.
    pub iperf3_cpu_ns_per_packet: Option<f64>,
    /// Packets sent on the gateway's ENI per run, median.
    pub packets_per_run: f64,
    pub runs: usize,
    pub seconds_per_run: u64,
    /// median / the no-filter median of the same test.
    pub ratio_to_no_filter: Option<f64>,
    /// vpcgate rows: median / the nftables median with the same number of rules, same test.
    pub ratio_to_nftables: Option<f64>,
    /// vpcgate rows: median / the minimal enforcer's median with the same number of rules, same test.
    pub ratio_to_minimal: Option<f64>,
    /// Setups that filter per device: their runs paired with runs through the twin link, and
    /// `ratio_to_no_filter` is these pairs' median ratio.
    pub paired: Option<Paired>,
    /// What the setup is exactly (tool versions, backend).
    pub note: String,
    /// Setups of BPF programs: each program's own cost under this test's traffic, from one extra run
    /// with the kernel's BPF statistics on (`BPF_ENABLE_STATS`), after the setup's last timed run.
    pub programs: Vec<ProgramCost>,
}

/// A setup's runs through the ENI, each paired with a run through the twin link (nothing attached) right
/// before or after it.
#[derive(Serialize, Clone, Debug)]
pub struct Paired {
    /// Each pair's ENI value / twin value, in the order measured.
    pub ratios: Vec<f64>,
    /// Their median.
    pub median: f64,
    /// A distribution-free 95% confidence interval of that median (order statistics of the ratios;
    /// none with fewer than 6 pairs).
    pub ci95: Option<[f64; 2]>,
    /// The median of the twin's runs.
    pub twin_median: f64,
}

/// One BPF program's runs and mean run time over a run (kernel BPF statistics: each run is timed by the
/// kernel with two clock reads, which the empty program's figure shows).
#[derive(Serialize, Clone, Debug)]
pub struct ProgramCost {
    /// The kernel's name of the program (15 characters at most).
    pub program: String,
    pub runs: u64,
    pub ns_per_run: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Filter {
    None,
    /// The empty TC program of the per-packet part, on the ENI's egress.
    EmptyTc,
    /// The minimal enforcer (TC) over the prefixes of the generated policy of that size.
    Minimal(usize),
    /// Its parser alone, passing everything (`--setups parse`).
    Parse,
    /// Its bare lookup alone (no parser), passing everything (`--setups lookup-1k`).
    Lookup(usize),
    /// A TC program that only loops this many times (`--setups spin-200`): a cost in situ and nothing
    /// else, to calibrate what a given cost takes off the rate.
    Spin(usize),
    Vpcgate(usize),
    Nftables(usize),
    Iptables(usize),
}

fn k(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

impl Filter {
    /// `none`, `empty`, `parse`, a kind and a rule count (`vpcgate-1k`, `minimal-100000`), or `spin`
    /// and a count of iterations (`spin-250`).
    fn parse(s: &str) -> anyhow::Result<Self> {
        let bad = || {
            anyhow::anyhow!(
                "throughput setup {s:?}: expected none, empty, parse, or lookup, minimal, vpcgate, \
                 nftables or iptables with a rule count (vpcgate-1k, iptables-10000), or spin with \
                 a count of loop iterations up to {BENCH_SPIN_MAX} (spin-200)"
            )
        };
        match s {
            "none" => return Ok(Filter::None),
            "empty" => return Ok(Filter::EmptyTc),
            "parse" => return Ok(Filter::Parse),
            _ => {}
        }
        let (kind, n) = s.split_once('-').ok_or_else(bad)?;
        let n: usize = match n.strip_suffix('k') {
            Some(k) => k.parse::<usize>().ok().and_then(|k| k.checked_mul(1000)),
            None => n.parse().ok(),
        }
        .ok_or_else(bad)?;
        ensure!(
            n > 0,
            "throughput setup {s:?}: the count must be at least 1"
        );
        Ok(match kind {
            "spin" if n <= BENCH_SPIN_MAX as usize => Filter::Spin(n),
            "minimal" => Filter::Minimal(n),
            "lookup" => Filter::Lookup(n),
            "vpcgate" => Filter::Vpcgate(n),
            "nftables" => Filter::Nftables(n),
            "iptables" => Filter::Iptables(n),
            _ => return Err(bad()),
        })
    }
    fn label(self) -> String {
        match self {
            Filter::None => "no filter".into(),
            Filter::EmptyTc => "empty TC program".into(),
            Filter::Minimal(n) => format!("minimal enforcer {}", k(n)),
            Filter::Parse => "parser alone".into(),
            Filter::Lookup(n) => format!("lookup alone {}", k(n)),
            Filter::Spin(n) => format!("spin loop {n}"),
            Filter::Vpcgate(n) => format!("vpcgate {}", k(n)),
            Filter::Nftables(n) => format!("nftables {}", k(n)),
            Filter::Iptables(n) => format!("iptables {}", k(n)),
        }
    }
    fn kind(self) -> &'static str {
        match self {
            Filter::None => "none",
            Filter::EmptyTc => "empty",
            Filter::Minimal(_) => "minimal",
            Filter::Parse => "parse",
            Filter::Lookup(_) => "lookup",
            Filter::Spin(_) => "spin",
            Filter::Vpcgate(_) => "vpcgate",
            Filter::Nftables(_) => "nftables",
            Filter::Iptables(_) => "iptables",
        }
    }
    fn rules(self) -> usize {
        match self {
            Filter::None | Filter::EmptyTc | Filter::Parse | Filter::Spin(_) => 0,
            Filter::Minimal(n)
            | Filter::Lookup(n)
            | Filter::Vpcgate(n)
            | Filter::Nftables(n)
            | Filter::Iptables(n) => n,
        }
    }
    /// Whether the setup drops what its policy does not allow (the probe datagram).
    fn filters(self) -> bool {
        !matches!(
            self,
            Filter::None | Filter::EmptyTc | Filter::Parse | Filter::Lookup(_) | Filter::Spin(_)
        )
    }
    /// Whether the setup leaves the twin link alone (its runs are then paired with the twin's): no
    /// filter, or BPF programs on the ENI. Netfilter's hooks see every device's packets.
    fn per_device(self) -> bool {
        !matches!(self, Filter::Nftables(_) | Filter::Iptables(_))
    }
    /// Whether the setup is BPF programs (whose own cost `program_costs` reads).
    fn bpf(self) -> bool {
        matches!(
            self,
            Filter::EmptyTc
                | Filter::Minimal(_)
                | Filter::Parse
                | Filter::Lookup(_)
                | Filter::Spin(_)
                | Filter::Vpcgate(_)
        )
    }
}

/// Seconds of each run with BPF statistics on.
const STATS_SECS: u64 = 2;

/// Run count and total run time of the BPF programs of vpcgate and of the baselines, by program id.
fn program_counters() -> anyhow::Result<BTreeMap<u32, (String, u64, Duration)>> {
    let mut out = BTreeMap::new();
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        let name = info.name_as_str().unwrap_or_default();
        if name.starts_with("vpcgate_") || name.starts_with("bench_tc_") {
            out.insert(
                info.id(),
                (name.to_owned(), info.run_count(), info.run_time()),
            );
        }
    }
    Ok(out)
}

/// What each program of the setup cost during one `test` run of `STATS_SECS` with the kernel's BPF
/// statistics on (they are off again when this returns): programs that ran, by name.
fn program_costs(lab: &Lab, test: Test, clk: u64, cpus: u64) -> anyhow::Result<Vec<ProgramCost>> {
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("BPF_ENABLE_STATS (the kernel's per-program run time)")?;
    let before = program_counters()?;
    measure(lab, Link::Eni, test, STATS_SECS, clk, cpus)?;
    let after = program_counters()?;
    drop(stats);
    let mut by_name: BTreeMap<String, (u64, Duration)> = BTreeMap::new();
    for (id, (name, runs, time)) in after {
        let (r0, t0) = before
            .get(&id)
            .map_or((0, Duration::ZERO), |(_, r, t)| (*r, *t));
        let e = by_name.entry(name).or_default();
        e.0 += runs.saturating_sub(r0);
        e.1 += time.saturating_sub(t0);
    }
    Ok(by_name
        .into_iter()
        .filter(|(_, (runs, _))| *runs > 0)
        .map(|(program, (runs, time))| ProgramCost {
            program,
            runs,
            ns_per_run: time.as_nanos() as f64 / runs as f64,
        })
        .collect())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Test {
    Tcp,
    Udp64,
}

impl Test {
    fn name(self) -> &'static str {
        match self {
            Test::Tcp => "tcp",
            Test::Udp64 => "udp64",
        }
    }
}

const IPERF_PORT: u16 = 5201;

/// The twin link: `TWIN_ENI` in the gateway namespace, its peer in the VPC namespace, on a prefix of its
/// own (no lab address and no generated policy is in 10.78.0.0/24).
const TWIN_ENI: &str = "eni1";
const TWIN_VPC_IF: &str = "vpc1";
const TWIN_EGRESS_V4: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 5);
const TWIN_BACKEND_V4: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 10);

/// Which link a run goes through: the ENI (where the setup is) toward the lab's backend, or the twin
/// toward the twin's server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    Eni,
    Twin,
}

impl Link {
    fn device(self) -> &'static str {
        match self {
            Link::Eni => lab::ENI,
            Link::Twin => TWIN_ENI,
        }
    }
    fn server(self) -> Ipv4Addr {
        match self {
            Link::Eni => lab::BACKEND_V4,
            Link::Twin => TWIN_BACKEND_V4,
        }
    }
}

/// Adds the twin link to the lab (removed with its namespaces): a veth pair like the ENI's, up, with one
/// address at each end.
fn add_twin(lab: &Lab) -> anyhow::Result<()> {
    let ip = |args: &[&str]| run_ok(None, "ip", args, None, Duration::from_secs(10));
    let (gw, vpc) = (lab.gw.name(), lab.vpc.name());
    ip(&[
        "-n",
        gw,
        "link",
        "add",
        TWIN_ENI,
        "type",
        "veth",
        "peer",
        "name",
        TWIN_VPC_IF,
        "netns",
        vpc,
    ])?;
    for (ns, dev, addr) in [
        (gw, TWIN_ENI, TWIN_EGRESS_V4),
        (vpc, TWIN_VPC_IF, TWIN_BACKEND_V4),
    ] {
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
        ip(&["-n", ns, "link", "set", dev, "up"])?;
    }
    Ok(())
}
/// Where the no-filter probe datagram goes: an address of the VPC namespace no policy here allows.
const PROBE_PORT: u16 = 9;

/// One iperf3 run.
#[derive(Clone, Debug)]
struct Sample {
    value: f64,
    loss: Option<f64>,
    packets: u64,
    cpu_ns_per_packet: Option<f64>,
    busy_percent: Option<f64>,
    busiest_ns_per_packet: Option<f64>,
    busiest_percent: Option<f64>,
    iperf3_ns_per_packet: Option<f64>,
}

/// Each vpcgate setup's ratio to a baseline with as many rules (`ratio`: which one) in `test`.
fn vpcgate_to(rows: &[Row], test: &str, ratio: fn(&Row) -> Option<f64>) -> Vec<(String, f64)> {
    rows.iter()
        .filter(|r| r.filter == "vpcgate" && r.test == test)
        .filter_map(|r| Some((r.setup.clone(), ratio(r)?)))
        .collect()
}

pub fn run(opts: &crate::Opts, seed: u64, p: &crate::Progress) -> anyhow::Result<Vec<Row>> {
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the throughput benchmark needs root (network namespaces, BPF, netfilter)"
    );
    // Runs of 1 s: iperf3 starts in milliseconds, and more, shorter runs give more pairs.
    let secs = 1;
    let (setups, rounds, per_round): (Vec<Filter>, usize, usize) = if opts.quick {
        (
            vec![
                Filter::None,
                Filter::EmptyTc,
                Filter::Spin(250),
                Filter::Minimal(1000),
                Filter::Vpcgate(1000),
                Filter::Nftables(1000),
                Filter::Iptables(1000),
            ],
            1,
            2,
        )
    } else {
        (
            vec![
                Filter::None,
                Filter::EmptyTc,
                // Programs that only spend time, about 100 and 210 ns in situ here (the empty program
                // about 56), around vpcgate's: the report's line of what run time alone costs.
                Filter::Spin(50),
                Filter::Spin(250),
                Filter::Minimal(1000),
                Filter::Vpcgate(1000),
                Filter::Minimal(100_000),
                Filter::Vpcgate(100_000),
                Filter::Nftables(1000),
                Filter::Iptables(1000),
                Filter::Iptables(10_000),
            ],
            // Five rounds of six pairs: 30 pairs per setup and test. A pair's ratio spreads by 5-20%
            // here (runs a second apart differ that much), so the median's 95% confidence interval is a
            // few percent wide; `--pairs` narrows it at the cost of time.
            5,
            6,
        )
    };
    let per_round = opts.pairs.unwrap_or(per_round);
    ensure!(per_round > 0, "--pairs must be at least 1");
    let setups = if opts.setups.is_empty() {
        setups
    } else {
        let chosen = opts
            .setups
            .iter()
            .map(|s| Filter::parse(s))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for (i, s) in chosen.iter().enumerate() {
            ensure!(
                !chosen[..i].contains(s),
                "--setups names {} twice",
                s.label()
            );
        }
        chosen
    };
    let tools = Tools::find()?;
    p.say(&format!(
        "throughput: {}; {}; {}",
        tools.iperf3, tools.nft, tools.iptables
    ));
    p.say("throughput: building the lab (gateway and VPC namespaces over veth)");
    let lab = new_lab()?;
    add_twin(&lab).context("adding the twin link to the lab")?;
    let mut servers = [
        IperfServer::start(&lab, Link::Eni)?,
        IperfServer::start(&lab, Link::Twin)?,
    ];
    let mut texts: BTreeMap<Filter, Texts> = BTreeMap::new();
    for &s in &setups {
        texts.insert(s, Texts::new(s, seed)?);
    }
    let clk = clock_ticks()?;
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as u64;
    let mut runs = Runs::default();
    let mut attach: BTreeMap<Filter, String> = BTreeMap::new();
    let mut costs: BTreeMap<(Filter, Test), Vec<ProgramCost>> = BTreeMap::new();
    let order: Vec<Filter> = (0..rounds).flat_map(|_| setups.clone()).collect();
    let last_round = (rounds - 1) * setups.len()..rounds * setups.len();
    for (i, &s) in order.iter().enumerate() {
        p.say(&format!(
            "throughput {}/{}: {}: setting up",
            i + 1,
            order.len(),
            s.label()
        ));
        let installed = install(&lab, opts, s, &texts[&s], &tools, p)?;
        if let Some(a) = &installed.attach {
            attach.insert(s, a.clone());
        }
        for test in [Test::Tcp, Test::Udp64] {
            for j in 0..per_round {
                // The twin first in every other pair, and the first pair of a visit starts with the
                // ENI in even rounds and the twin in odd ones: neither link is always the one measured
                // right after a setup change or the other link's run.
                let round = i / setups.len();
                let links: &[Link] = match (s.per_device(), (j + round) % 2 == 0) {
                    (false, _) => &[Link::Eni],
                    (true, true) => &[Link::Eni, Link::Twin],
                    (true, false) => &[Link::Twin, Link::Eni],
                };
                let mut eni = None;
                let mut twin = None;
                for &link in links {
                    for server in &mut servers {
                        server.alive()?;
                    }
                    let sample = measure(&lab, link, test, secs, clk, cpus).with_context(|| {
                        format!(
                            "{} under {} through {}",
                            test.name(),
                            s.label(),
                            link.device()
                        )
                    })?;
                    match link {
                        Link::Eni => eni = Some(sample),
                        Link::Twin => twin = Some(sample),
                    }
                }
                let eni = eni.expect("every pair has an ENI run");
                let paired = twin.map(|t| {
                    let ratio = eni.value / t.value;
                    runs.pairs
                        .entry((s, test))
                        .or_default()
                        .push((eni.value, t.value));
                    format!(" (twin {}: {ratio:.3}×)", value(test, t.value))
                });
                p.say(&format!(
                    "throughput {}/{}: {} {} {}/{per_round}: {}{}",
                    i + 1,
                    order.len(),
                    s.label(),
                    test.name(),
                    j + 1,
                    describe(test, &eni),
                    paired.unwrap_or_default()
                ));
                runs.eni.entry((s, test)).or_default().push(eni);
            }
        }
        // After the last timed runs of a BPF setup: its programs' own cost, with statistics on (they
        // add two clock reads per run, so no timed run has them).
        if s.bpf() && last_round.contains(&i) {
            for test in [Test::Tcp, Test::Udp64] {
                servers[0].alive()?;
                let c = program_costs(&lab, test, clk, cpus).with_context(|| {
                    format!("{} under {}, BPF statistics on", test.name(), s.label())
                })?;
                ensure!(
                    !c.is_empty(),
                    "{} is in place but none of its programs ran during a {} run",
                    s.label(),
                    test.name()
                );
                p.say(&format!(
                    "throughput {}/{}: {} {}, BPF statistics: {}",
                    i + 1,
                    order.len(),
                    s.label(),
                    test.name(),
                    c.iter()
                        .map(|c| format!(
                            "{} {:.0} ns/run ({} runs)",
                            c.program, c.ns_per_run, c.runs
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                costs.insert((s, test), c);
            }
        }
        remove(&lab, installed, &tools, p).with_context(|| format!("removing {}", s.label()))?;
    }
    drop(servers);
    drop(lab);
    Ok(rows(
        &setups, &runs, &mut costs, secs, &tools, &texts, &attach,
    ))
}

/// Every timed run, by setup and test.
#[derive(Default)]
struct Runs {
    /// The runs through the ENI.
    eni: BTreeMap<(Filter, Test), Vec<Sample>>,
    /// Per-device setups: each pair's (ENI, twin) values.
    pairs: BTreeMap<(Filter, Test), Vec<(f64, f64)>>,
}

/// A run's figure as `describe` writes it.
fn value(test: Test, v: f64) -> String {
    match test {
        Test::Tcp => format!("{:.2} Gbit/s", v / 1e9),
        Test::Udp64 => format!("{:.0} kpps", v / 1e3),
    }
}

/// The pairs' ratios, their median and its confidence interval.
fn paired(pairs: &[(f64, f64)]) -> Paired {
    let ratios: Vec<f64> = pairs.iter().map(|(e, t)| e / t).collect();
    Paired {
        median: crate::median(&ratios),
        ci95: crate::median_ci95(&ratios).map(|(lo, hi)| [lo, hi]),
        twin_median: crate::median(&pairs.iter().map(|p| p.1).collect::<Vec<_>>()),
        ratios,
    }
}

fn describe(test: Test, s: &Sample) -> String {
    let cpu = s
        .cpu_ns_per_packet
        .map(|c| {
            format!(
                ", {c:.0} ns CPU/packet (machine {:.0}% busy; busiest CPU {:.0} ns/packet, {:.0}% busy; iperf3 processes {:.0} ns/packet)",
                s.busy_percent.unwrap_or_default(),
                s.busiest_ns_per_packet.unwrap_or(f64::NAN),
                s.busiest_percent.unwrap_or(f64::NAN),
                s.iperf3_ns_per_packet.unwrap_or(f64::NAN)
            )
        })
        .unwrap_or_default();
    let v = value(test, s.value);
    match test {
        Test::Tcp => format!("{v}{cpu}"),
        Test::Udp64 => format!("{v} received, loss {:.1}%{cpu}", s.loss.unwrap_or_default()),
    }
}

fn rows(
    setups: &[Filter],
    runs: &Runs,
    costs: &mut BTreeMap<(Filter, Test), Vec<ProgramCost>>,
    secs: u64,
    tools: &Tools,
    texts: &BTreeMap<Filter, Texts>,
    attach: &BTreeMap<Filter, String>,
) -> Vec<Row> {
    let med = |s: Filter, t: Test| {
        runs.eni
            .get(&(s, t))
            .map(|v| crate::median(&v.iter().map(|x| x.value).collect::<Vec<_>>()))
    };
    let pairs: BTreeMap<(Filter, Test), Paired> =
        runs.pairs.iter().map(|(k, p)| (*k, paired(p))).collect();
    let mut out = vec![];
    for &s in setups {
        for t in [Test::Tcp, Test::Udp64] {
            let Some(v) = runs.eni.get(&(s, t)) else {
                continue;
            };
            let values: Vec<f64> = v.iter().map(|x| x.value).collect();
            let m = crate::median(&values);
            // The median of a figure over the runs that have it (None when none has).
            let med_of = |f: fn(&Sample) -> Option<f64>| {
                let x: Vec<f64> = v.iter().filter_map(f).collect();
                (!x.is_empty()).then(|| crate::median(&x))
            };
            let paired = pairs.get(&(s, t)).cloned();
            let (nft, minimal) = match s {
                Filter::Vpcgate(n) => (
                    med(Filter::Nftables(n), t).map(|x| m / x),
                    // Both paired: the quotient of their ratios to their own twin runs.
                    match (&paired, pairs.get(&(Filter::Minimal(n), t))) {
                        (Some(v), Some(p)) => Some(v.median / p.median),
                        _ => med(Filter::Minimal(n), t).map(|x| m / x),
                    },
                ),
                _ => (None, None),
            };
            out.push(Row {
                setup: s.label(),
                filter: s.kind().into(),
                rules: s.rules(),
                test: t.name().into(),
                unit: match t {
                    Test::Tcp => "bit/s",
                    Test::Udp64 => "packet/s",
                }
                .into(),
                median: m,
                samples: values,
                loss_percent: med_of(|x| x.loss),
                cpu_ns_per_packet: med_of(|x| x.cpu_ns_per_packet),
                cpu_busy_percent: med_of(|x| x.busy_percent),
                busiest_cpu_ns_per_packet: med_of(|x| x.busiest_ns_per_packet),
                busiest_cpu_busy_percent: med_of(|x| x.busiest_percent),
                iperf3_cpu_ns_per_packet: med_of(|x| x.iperf3_ns_per_packet),
                packets_per_run: crate::median(&v.iter().map(|x| x.packets as f64).collect::<Vec<_>>()),
                runs: v.len(),
                seconds_per_run: secs,
                ratio_to_no_filter: match &paired {
                    Some(p) => Some(p.median),
                    None => med(Filter::None, t).map(|x| m / x),
                },
                ratio_to_nftables: nft,
                ratio_to_minimal: minimal,
                paired,
                programs: costs.remove(&(s, t)).unwrap_or_default(),
                note: match s {
                    Filter::None => "no filter on the ENI".into(),
                    Filter::EmptyTc => "the per-packet part's empty TC program (passes everything) on the ENI's egress, attached as vpcgate attaches its TC program: what the hook itself costs".into(),
                    Filter::Parse => "the minimal enforcer's parser alone on the ENI's egress (vpcgate's parser; passes everything)".into(),
                    Filter::Spin(n) => format!("a TC program on the ENI's egress that loops {n} times and does nothing else (no packet read, no map but its count): a cost in situ alone, to calibrate what a program's cost takes off the rate"),
                    Filter::Lookup(_) => "the minimal enforcer's lookup alone on the ENI's egress (the destination at its fixed offset, looked up in the same trie; no parser; passes everything)".into(),
                    Filter::Minimal(_) => "the per-packet part's minimal enforcer on the ENI's egress (attached as vpcgate attaches its TC program): vpcgate's parser and one lookup of the destination in an LPM trie of the generated policy's prefixes and the iperf server's address; passes what it finds and what is not IP (as vpcgate's rule 1 does), no ports, counters or observations".into(),
                    Filter::Vpcgate(_) => format!(
                        "`vpcgate run`: TC egress + XDP ingress on the ENI ({}), the policy in LPM tries; {}",
                        attach.get(&s).map_or("", String::as_str),
                        match texts[&s].shape {
                            PolicyShape::Generated => "generated authorizations (a port table each)",
                            PolicyShape::Shared => "shared-table shape: the generated prefixes as accessible blocks under region-wide all-port authorizations (generated authorizations beyond about 19,000 do not fit the PORTS map)",
                        }
                    ),
                    Filter::Nftables(_) => format!(
                        "{}: inet table, output hook on the ENI: interval set of the prefixes, then concatenated address . port interval sets per protocol and family",
                        tools.nft
                    ),
                    Filter::Iptables(n) => format!(
                        "{}: OUTPUT -o eni0, {n} non-matching IPv4 rules before the iperf accept, then DROP ({n} IPv6 rules in ip6tables)",
                        tools.iptables
                    ),
                },
            });
        }
    }
    out
}

/// Tool versions, and the iptables backend.
struct Tools {
    iperf3: String,
    nft: String,
    iptables: String,
    /// iptables speaks nf_tables (iptables-nft) rather than the legacy xtables.
    iptables_nft: bool,
}

impl Tools {
    fn find() -> anyhow::Result<Self> {
        let first_line = |program: &str, arg: &str| -> anyhow::Result<String> {
            let out = run_ok(None, program, &[arg], None, Duration::from_secs(10))?;
            Ok(out.lines().next().unwrap_or_default().trim().to_owned())
        };
        let iptables = first_line("iptables", "--version")?;
        first_line("ip6tables", "--version")?;
        first_line("iptables-restore", "--version")?;
        first_line("ss", "--version")?;
        Ok(Self {
            iperf3: first_line("iperf3", "--version")?,
            nft: first_line("nft", "--version")?,
            iptables_nft: iptables.contains("nf_tables"),
            iptables,
        })
    }
}

/// An iperf3 server in the VPC namespace, on `link`'s server address (killed on drop).
struct IperfServer(crate::control::ChildGuard);

impl IperfServer {
    fn start(lab: &Lab, link: Link) -> anyhow::Result<Self> {
        let addr = link.server();
        let mut cmd = std::process::Command::new("iperf3");
        cmd.args([
            "-s",
            "-B",
            &addr.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            // A test whose client vanished ends after 5 s instead of holding the server.
            "--rcv-timeout",
            "5000",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        let mut s = Self(crate::control::ChildGuard::new(
            spawn(Some(&lab.vpc), &mut cmd)?,
            "iperf3 server",
        ));
        let filter = format!("src {addr}:{IPERF_PORT}");
        let t = Instant::now();
        loop {
            s.alive()?;
            let out = run_ok(
                Some(&lab.vpc),
                "ss",
                &["-Hltn", &filter],
                None,
                Duration::from_secs(5),
            )?;
            if !out.trim().is_empty() {
                return Ok(s);
            }
            ensure!(
                t.elapsed() < Duration::from_secs(5),
                "the iperf3 server does not listen on {addr}:{IPERF_PORT} after 5 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.0.exited() {
            bail!("the {} exited ({status})", self.0.what());
        }
        Ok(())
    }
}

/// Busy clock ticks (user+nice+system+irq+softirq) from /proc/stat.
struct BusyTicks {
    /// All CPUs.
    total: u64,
    /// Each CPU's, by its line (`cpuN`).
    per_cpu: BTreeMap<String, u64>,
}

impl BusyTicks {
    fn read() -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        Self::parse(&stat)
    }

    fn parse(stat: &str) -> anyhow::Result<Self> {
        let busy = |line: &str| -> anyhow::Result<u64> {
            let f = line
                .split_whitespace()
                .skip(1)
                .map(|x| x.parse::<u64>())
                .collect::<Result<Vec<u64>, _>>()
                .with_context(|| format!("a cpu line of /proc/stat that is not numbers: {line}"))?;
            ensure!(f.len() >= 7, "short cpu line in /proc/stat: {line}");
            Ok(f[0] + f[1] + f[2] + f[5] + f[6])
        };
        let mut total = None;
        let mut per_cpu = BTreeMap::new();
        for line in stat.lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            if name == "cpu" {
                total = Some(busy(line)?);
            } else if name.len() > 3
                && name.starts_with("cpu")
                && name[3..].bytes().all(|b| b.is_ascii_digit())
            {
                per_cpu.insert(name.to_string(), busy(line)?);
            }
        }
        let total = total.context("no cpu line in /proc/stat")?;
        ensure!(!per_cpu.is_empty(), "no cpuN lines in /proc/stat");
        Ok(BusyTicks { total, per_cpu })
    }

    /// The busy ticks of all CPUs and of the busiest one from `self` to `later` (a CPU not in both
    /// readings, hot-plugged in between, is not counted as the busiest).
    fn since(&self, later: &BusyTicks) -> (u64, u64) {
        let busiest = later
            .per_cpu
            .iter()
            .filter_map(|(cpu, t)| Some(t.saturating_sub(*self.per_cpu.get(cpu)?)))
            .max()
            .unwrap_or(0);
        (later.total.saturating_sub(self.total), busiest)
    }
}

fn clock_ticks() -> anyhow::Result<u64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(hz > 0, "sysconf(_SC_CLK_TCK) = {hz}");
    Ok(hz as u64)
}

/// Packets sent on `link` (gateway side) so far.
fn tx_packets(lab: &Lab, link: Link) -> anyhow::Result<u64> {
    let out = run_ok(
        None,
        "ip",
        &[
            "-n",
            lab.gw.name(),
            "-s",
            "-j",
            "link",
            "show",
            link.device(),
        ],
        None,
        Duration::from_secs(5),
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -s -j link: not JSON")?;
    v[0]["stats64"]["tx"]["packets"]
        .as_u64()
        .with_context(|| format!("no stats64.tx.packets in {out}"))
}

fn measure(
    lab: &Lab,
    link: Link,
    test: Test,
    secs: u64,
    clk: u64,
    cpus: u64,
) -> anyhow::Result<Sample> {
    let server = link.server().to_string();
    let port = IPERF_PORT.to_string();
    let t = secs.to_string();
    let mut args = vec![
        "-c",
        &server,
        "-p",
        &port,
        "-t",
        &t,
        "-J",
        "--connect-timeout",
        "3000",
    ];
    if test == Test::Udp64 {
        // 18 bytes of payload + 8 UDP + 20 IPv4 + 14 Ethernet + 4 FCS = 64-byte frames; no rate limit.
        args.extend(["-u", "-l", "18", "-b", "0"]);
    }
    let tx0 = tx_packets(lab, link)?;
    let busy0 = BusyTicks::read()?;
    let t0 = Instant::now();
    let out = run_bounded(
        Some(&lab.gw),
        "iperf3",
        &args,
        None,
        Duration::from_secs(secs + 20),
    )?;
    let busy1 = BusyTicks::read()?;
    let wall = t0.elapsed().as_secs_f64();
    let tx1 = tx_packets(lab, link)?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 {} printed no JSON ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = json.get("error") {
        bail!("iperf3 {}: {e}", args.join(" "));
    }
    ensure!(
        out.status.success(),
        "iperf3 {} exited with {}",
        args.join(" "),
        out.status
    );
    let rx = &json["end"]["sum_received"];
    let packets = tx1.saturating_sub(tx0);
    let (busy, busiest) = busy0.since(&busy1);
    let cpu_ns = busy as f64 * 1e9 / clk as f64;
    let cpu_ns_per_packet = (packets > 0 && busy > 0).then(|| cpu_ns / packets as f64);
    let busy_percent = Some(100.0 * cpu_ns / 1e9 / (wall * cpus as f64));
    let busiest_ns = busiest as f64 * 1e9 / clk as f64;
    let busiest_ns_per_packet = (packets > 0 && busiest > 0).then(|| busiest_ns / packets as f64);
    let busiest_percent = Some(100.0 * busiest_ns / 1e9 / wall);
    let util = &json["end"]["cpu_utilization_percent"];
    let test_seconds = json["end"]["sum_sent"]["seconds"].as_f64().unwrap_or(0.0);
    let iperf3_ns_per_packet = match (util["host_total"].as_f64(), util["remote_total"].as_f64()) {
        (Some(h), Some(r)) if packets > 0 && test_seconds > 0.0 => {
            Some((h + r) / 100.0 * test_seconds * 1e9 / packets as f64)
        }
        _ => None,
    };
    match test {
        Test::Tcp => {
            let bytes = rx["bytes"].as_u64().unwrap_or(0);
            ensure!(
                bytes > 0,
                "iperf3 TCP: the receiver got nothing: {}",
                json["end"]
            );
            Ok(Sample {
                value: rx["bits_per_second"]
                    .as_f64()
                    .context("no end.sum_received.bits_per_second")?,
                loss: None,
                packets,
                cpu_ns_per_packet,
                busy_percent,
                busiest_ns_per_packet,
                busiest_percent,
                iperf3_ns_per_packet,
            })
        }
        Test::Udp64 => {
            let sent = rx["packets"]
                .as_u64()
                .context("no end.sum_received.packets")?;
            let lost = rx["lost_packets"].as_u64().unwrap_or(0);
            let seconds = rx["seconds"].as_f64().unwrap_or(0.0);
            let got = sent.saturating_sub(lost);
            ensure!(
                got > 0 && seconds > 0.0,
                "iperf3 UDP: the receiver got nothing: {}",
                json["end"]
            );
            Ok(Sample {
                value: got as f64 / seconds,
                loss: rx["lost_percent"].as_f64(),
                packets,
                cpu_ns_per_packet,
                busy_percent,
                busiest_ns_per_packet,
                busiest_percent,
                iperf3_ns_per_packet,
            })
        }
    }
}

/// Whether a datagram from the gateway to an address of the VPC namespace that no setup allows
/// (`lab::UNLISTED_V4`) arrives.
fn probe_delivered(lab: &Lab) -> anyhow::Result<bool> {
    let rx = lab
        .vpc_run(|| UdpSocket::bind((lab::UNLISTED_V4, PROBE_PORT)))
        .with_context(|| {
            format!(
                "bind {}:{PROBE_PORT} in the VPC namespace",
                lab::UNLISTED_V4
            )
        })?;
    rx.set_read_timeout(Some(Duration::from_millis(500)))?;
    lab.gw_run(|| -> std::io::Result<()> {
        let s = UdpSocket::bind((lab::EGRESS_V4, 0))?;
        for _ in 0..3 {
            // Refused (EPERM) by netfilter, silently dropped by TC: either way it must not arrive.
            let _ = s.send_to(
                b"vpcgate-bench probe",
                SocketAddr::from((lab::UNLISTED_V4, PROBE_PORT)),
            );
        }
        Ok(())
    })
    .context("send the probe datagram from the gateway namespace")?;
    let mut buf = [0u8; 64];
    match rx.recv_from(&mut buf) {
        Ok(_) => Ok(true),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e).context("receive the probe datagram"),
    }
}

/// What each setup loads, prepared before any measurement.
struct Texts {
    /// vpcgate: the policy file without its [instance] table; nftables: the ruleset;
    /// iptables: the IPv4 and IPv6 restore files.
    main: String,
    v6: String,
    /// Entries the setup must have loaded: nft set elements per set; iptables rules per family.
    expect: BTreeMap<String, usize>,
    /// vpcgate: which kind of generated policy.
    shape: PolicyShape,
    /// The minimal enforcer: the prefixes its trie holds.
    prefixes: Vec<ipnet::IpNet>,
}

/// The instance name in a vpcgate setup's text, replaced by a fresh one at each start.
const INSTANCE: &str = "instance-placeholder";

fn iperf_authorizations() -> String {
    let mut t = String::new();
    for proto in ["tcp", "udp"] {
        t += &format!(
            "\n[[authorization]]\nname = \"iperf-{proto}\"\nvpc_id = \"vpc-bench\"\naddress = \"{}\"\nports = [\"{IPERF_PORT}\"]\nprotocol = \"{proto}\"\n",
            lab::BACKEND_V4
        );
    }
    t
}

/// Each port range as nft (`lo-hi`) or iptables (`lo:hi`) writes it.
fn port_expr(ranges: &[(u16, u16)], range: &str) -> Vec<String> {
    ranges
        .iter()
        .map(|&(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}{range}{hi}")
            }
        })
        .collect()
}

const NFT_TABLE: &str = "vpcgate_bench";

impl Texts {
    fn new(s: Filter, seed: u64) -> anyhow::Result<Self> {
        let mut expect = BTreeMap::new();
        Ok(match s {
            Filter::None | Filter::EmptyTc | Filter::Parse | Filter::Spin(_) => Self {
                main: String::new(),
                v6: String::new(),
                shape: PolicyShape::Generated,
                expect,
                prefixes: vec![],
            },
            // The generated policy's prefixes (those of vpcgate with as many rules, in either shape)
            // and the iperf server's address.
            Filter::Minimal(n) | Filter::Lookup(n) => {
                let mut prefixes: Vec<ipnet::IpNet> =
                    policy::generate(n, seed)?.iter().map(|r| r.net).collect();
                prefixes.push(IpAddr::V4(lab::BACKEND_V4).into());
                Self {
                    main: String::new(),
                    v6: String::new(),
                    shape: PolicyShape::Generated,
                    expect,
                    prefixes,
                }
            }
            Filter::Vpcgate(n) if n <= generated_fit(seed)? => Self {
                main: policy::instance_toml(INSTANCE, lab::ENI)
                    + &iperf_authorizations()
                    + &policy::authorizations_toml(&policy::generate(n, seed)?),
                v6: String::new(),
                shape: PolicyShape::Generated,
                expect,
                prefixes: vec![],
            },
            // Generated authorizations have a port table each and stop fitting PORTS near 19,000.
            Filter::Vpcgate(n) => Self {
                main: shared_toml(
                    INSTANCE,
                    lab::ENI,
                    n,
                    seed,
                    &(iperf_authorizations()
                        + &format!(
                            "\n[[accessible]]\ncidr = \"{}/32\"\nports = [\"{IPERF_PORT}\"]\n",
                            lab::BACKEND_V4
                        )),
                )?,
                v6: String::new(),
                shape: PolicyShape::Shared,
                expect,
                prefixes: vec![],
            },
            Filter::Nftables(n) => {
                let mut rules = policy::generate(n, seed)?;
                rules.push(Rule {
                    net: IpAddr::V4(lab::BACKEND_V4).into(),
                    proto: Proto::Tcp,
                    ranges: &[(IPERF_PORT, IPERF_PORT)],
                    inside: IPERF_PORT,
                    outside: IPERF_PORT + 1,
                    host: IpAddr::V4(lab::BACKEND_V4),
                });
                rules.push(Rule {
                    proto: Proto::Udp,
                    ..rules.last().expect("just pushed").clone()
                });
                let mut sets: BTreeMap<&str, Vec<String>> = BTreeMap::new();
                for r in &rules {
                    let v4 = r.net.addr().is_ipv4();
                    let net = r.net.to_string();
                    // One element per prefix (the iperf address comes twice in a row: TCP and UDP).
                    let nets = sets.entry(if v4 { "nets4" } else { "nets6" }).or_default();
                    if nets.last() != Some(&net) {
                        nets.push(net.clone());
                    }
                    let set = match (v4, r.proto) {
                        (true, Proto::Tcp) => "tcp4",
                        (true, Proto::Udp) => "udp4",
                        (false, Proto::Tcp) => "tcp6",
                        (false, Proto::Udp) => "udp6",
                    };
                    for p in port_expr(r.ranges, "-") {
                        sets.entry(set).or_default().push(format!("{net} . {p}"));
                    }
                }
                let mut t = format!("table inet {NFT_TABLE} {{\n");
                for (name, elems) in &sets {
                    let ty = match *name {
                        "nets4" => "ipv4_addr",
                        "nets6" => "ipv6_addr",
                        "tcp4" | "udp4" => "ipv4_addr . inet_service",
                        _ => "ipv6_addr . inet_service",
                    };
                    expect.insert((*name).to_owned(), elems.len());
                    t += &format!(
                        "  set {name} {{\n    type {ty}\n    flags interval\n    elements = {{\n      {}\n    }}\n  }}\n",
                        elems.join(",\n      ")
                    );
                }
                let has = |s: &str| sets.contains_key(s);
                t += &format!(
                    "  chain egress {{\n    type filter hook output priority filter; policy accept;\n    oifname != \"{}\" accept\n",
                    lab::ENI
                );
                // What vpcgate does per packet: the address's longest prefix, then its port table.
                for (set, rule) in [
                    ("nets4", "ip daddr != @nets4 drop"),
                    ("nets6", "ip6 daddr != @nets6 drop"),
                    ("tcp4", "ip daddr . tcp dport @tcp4 accept"),
                    ("udp4", "ip daddr . udp dport @udp4 accept"),
                    ("tcp6", "ip6 daddr . tcp dport @tcp6 accept"),
                    ("udp6", "ip6 daddr . udp dport @udp6 accept"),
                ] {
                    if has(set) {
                        t += &format!("    {rule}\n");
                    }
                }
                t += "    drop\n  }\n}\n";
                Self {
                    main: t,
                    v6: String::new(),
                    shape: PolicyShape::Generated,
                    expect,
                    prefixes: vec![],
                }
            }
            Filter::Iptables(n) => {
                // 2n generated rules: n of each family, so the IPv4 chain has n rules before the accept.
                let rules = policy::generate(2 * n, seed)?;
                let mut v4 = String::from(
                    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n",
                );
                let mut v6 = v4.clone();
                let (mut c4, mut c6) = (0, 0);
                for r in &rules {
                    let ports = port_expr(r.ranges, ":");
                    let m = if ports.len() == 1 {
                        format!("--dport {}", ports[0])
                    } else {
                        format!("-m multiport --dports {}", ports.join(","))
                    };
                    let line = format!(
                        "-A OUTPUT -o {} -d {} -p {} {m} -j ACCEPT\n",
                        lab::ENI,
                        r.net,
                        r.proto.name()
                    );
                    if r.net.addr().is_ipv4() {
                        v4 += &line;
                        c4 += 1;
                    } else {
                        v6 += &line;
                        c6 += 1;
                    }
                }
                for proto in ["tcp", "udp"] {
                    v4 += &format!(
                        "-A OUTPUT -o {} -d {}/32 -p {proto} --dport {IPERF_PORT} -j ACCEPT\n",
                        lab::ENI,
                        lab::BACKEND_V4
                    );
                }
                for t in [&mut v4, &mut v6] {
                    *t += &format!("-A OUTPUT -o {} -j DROP\nCOMMIT\n", lab::ENI);
                }
                expect.insert("iptables".into(), c4 + 3);
                expect.insert("ip6tables".into(), c6 + 1);
                Self {
                    main: v4,
                    v6,
                    shape: PolicyShape::Generated,
                    expect,
                    prefixes: vec![],
                }
            }
        })
    }
}

/// A setup in place: the agent when it is vpcgate, the baselines' object when it is one of them (its
/// program is attached while the object lives).
struct Installed<'a> {
    filter: Filter,
    daemon: Option<Daemon<'a>>,
    baseline: Option<Ebpf>,
    /// vpcgate: how its programs are attached (from the agent's "enforcing" line).
    attach: Option<String>,
}

fn install<'a>(
    lab: &'a Lab,
    opts: &crate::Opts,
    s: Filter,
    texts: &Texts,
    tools: &Tools,
    p: &crate::Progress,
) -> anyhow::Result<Installed<'a>> {
    let t = Instant::now();
    let mut daemon = None;
    let mut attach = None;
    let mut baseline = None;
    match s {
        Filter::None => {}
        Filter::EmptyTc
        | Filter::Minimal(_)
        | Filter::Parse
        | Filter::Lookup(_)
        | Filter::Spin(_) => {
            let mut ebpf = crate::perpkt::load_baselines()?;
            let name = match s {
                Filter::EmptyTc => "bench_tc_empty",
                Filter::Parse => "bench_tc_parse",
                Filter::Lookup(_) => "bench_tc_lookup",
                Filter::Spin(_) => "bench_tc_spin",
                _ => "bench_tc_minimal",
            };
            if !texts.prefixes.is_empty() {
                crate::perpkt::fill_baseline_tries(&mut ebpf, &texts.prefixes)?;
            }
            if let Filter::Spin(n) = s {
                let n = u32::try_from(n)?;
                let mut spin: Array<_, u32> = Array::try_from(
                    ebpf.map_mut("BENCH_SPIN")
                        .context("BENCH_SPIN is not in the baselines' object")?,
                )?;
                spin.set(0, n, 0)
                    .context("writing bench_tc_spin's iteration count")?;
                ensure!(
                    spin.get(&0, 0)? == n,
                    "BENCH_SPIN does not hold the count just written"
                );
            }
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("{name} is not in the baselines' object"))?
                .try_into()?;
            // The per-packet part loaded the empty program and the minimal enforcer already; the
            // others are loaded here.
            if prog.fd().is_err() {
                prog.load()
                    .map_err(|e| anyhow::anyhow!("verifying {name}: {e:?}"))?;
            }
            // In the gateway namespace, where the ENI is: the link stays attached while its program lives.
            lab.gw_run(|| prog.attach(lab::ENI, TcAttachType::Egress))
                .with_context(|| format!("attaching {name} to {}'s TC egress", lab::ENI))?;
            attach = Some(format!("{name} on TC egress"));
            baseline = Some(ebpf);
        }
        Filter::Vpcgate(_) => {
            let instance = instance_name("tp");
            let text = texts.main.replacen(
                &format!("name = \"{INSTANCE}\""),
                &format!("name = \"{instance}\""),
                1,
            );
            let d = Daemon::start(&lab.gw, &opts.vpcgate, &instance, &text)?;
            ensure!(
                lab.gw.ip(&["link", "show", lab::ENI]).contains("xdp"),
                "vpcgate run is ready but no XDP program is attached to {}",
                lab::ENI
            );
            let line = d
                .log_since(0)
                .into_iter()
                .find(|l| l.contains("enforcing"))
                .context("vpcgate run is ready but never logged \"enforcing\"")?;
            attach = Some(
                line.split_whitespace()
                    .filter(|w| w.starts_with("tc=") || w.starts_with("xdp="))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
            daemon = Some(d);
        }
        Filter::Nftables(_) => {
            run_ok(
                Some(&lab.gw),
                "nft",
                &["-f", "-"],
                Some(texts.main.as_bytes()),
                Duration::from_secs(120),
            )?;
            for (set, want) in &texts.expect {
                let out = run_ok(
                    Some(&lab.gw),
                    "nft",
                    &["-j", "list", "set", "inet", NFT_TABLE, set],
                    None,
                    Duration::from_secs(60),
                )?;
                let v: serde_json::Value =
                    serde_json::from_str(&out).context("nft -j list set: not JSON")?;
                let got = v["nftables"]
                    .as_array()
                    .and_then(|a| a.iter().find_map(|o| o.get("set")))
                    .and_then(|s| s["elem"].as_array())
                    .map_or(0, Vec::len);
                ensure!(
                    got == *want,
                    "nftables set {set} holds {got} elements, {want} were loaded"
                );
            }
        }
        Filter::Iptables(_) => {
            for (program, text, family) in [
                ("iptables-restore", &texts.main, "iptables"),
                ("ip6tables-restore", &texts.v6, "ip6tables"),
            ] {
                run_ok(
                    Some(&lab.gw),
                    program,
                    &[],
                    Some(text.as_bytes()),
                    Duration::from_secs(300),
                )?;
                let save = run_ok(
                    Some(&lab.gw),
                    &format!("{family}-save"),
                    &["-t", "filter"],
                    None,
                    Duration::from_secs(120),
                )?;
                let got = save.lines().filter(|l| l.starts_with("-A OUTPUT")).count();
                let want = texts.expect[family];
                ensure!(
                    got == want,
                    "{family} OUTPUT holds {got} rules, {want} were loaded ({})",
                    tools.iptables
                );
            }
        }
    }
    // The setup must do what it claims: without a filter (or with the empty program) the probe datagram
    // arrives, with one it is dropped (it goes to an address no policy here allows).
    let mut delivered = probe_delivered(lab)?;
    if !s.filters() && !delivered {
        // Late rather than lost? Once more before calling the lab broken.
        delivered = probe_delivered(lab)?;
    }
    match (s.filters(), delivered) {
        (false, false) => bail!(
            "with {} two datagrams from {} to {}:{PROBE_PORT} did not arrive; the gateway namespace:\n{}",
            s.label(),
            lab::EGRESS_V4,
            lab::UNLISTED_V4,
            diagnostics(lab)
        ),
        (false, true) => {}
        (true, true) => bail!(
            "{} is in place but a datagram to {}:{PROBE_PORT}, which it does not allow, arrived",
            s.label(),
            lab::UNLISTED_V4
        ),
        (true, false) => {}
    }
    if s.filters() {
        p.say(&format!(
            "{}: in place in {:.2} s (a datagram it does not allow is dropped)",
            s.label(),
            t.elapsed().as_secs_f64()
        ));
    } else if s != Filter::None {
        p.say(&format!(
            "{}: in place in {:.2} s (a datagram arrives)",
            s.label(),
            t.elapsed().as_secs_f64()
        ));
    }
    Ok(Installed {
        filter: s,
        daemon,
        baseline,
        attach,
    })
}

fn remove(lab: &Lab, i: Installed, tools: &Tools, p: &crate::Progress) -> anyhow::Result<()> {
    if let Some(d) = i.daemon {
        d.stop()?;
    }
    // Dropping the object detaches its program (the delivered probe below checks it).
    drop(i.baseline);
    match i.filter {
        Filter::Nftables(_) => {
            run_ok(
                Some(&lab.gw),
                "nft",
                &["delete", "table", "inet", NFT_TABLE],
                None,
                Duration::from_secs(60),
            )?;
        }
        Filter::Iptables(_) if tools.iptables_nft => {
            // iptables-nft made `ip filter` and `ip6 filter` tables: removed with their hooks.
            run_ok(
                Some(&lab.gw),
                "nft",
                &["flush", "ruleset"],
                None,
                Duration::from_secs(60),
            )?;
        }
        Filter::Iptables(_) => {
            for program in ["iptables", "ip6tables"] {
                run_ok(
                    Some(&lab.gw),
                    program,
                    &["-F", "OUTPUT"],
                    None,
                    Duration::from_secs(60),
                )?;
            }
        }
        _ => {}
    }
    if i.filter != Filter::None {
        let left = run_ok(
            Some(&lab.gw),
            "nft",
            &["list", "ruleset"],
            None,
            Duration::from_secs(30),
        )?;
        ensure!(
            left.trim().is_empty() || (!tools.iptables_nft && i.filter.kind() == "iptables"),
            "the gateway namespace still has nftables rules after removing {}:\n{left}",
            i.filter.label()
        );
        // `vpcgate teardown` returns a few milliseconds before the kernel has detached the programs
        // (seen on 6.18: datagrams sent in the first ~4 ms are still dropped), and a datagram can be
        // late on a loaded machine: up to 3 tries (500 ms each) before calling it dropped.
        let mut tries = 0;
        while !probe_delivered(lab)? {
            tries += 1;
            ensure!(
                tries < 3,
                "after removing {} three datagrams to {}:{PROBE_PORT} did not arrive; the gateway namespace:\n{}",
                i.filter.label(),
                lab::UNLISTED_V4,
                diagnostics(lab)
            );
            let neigh = lab.gw.ip(&["neigh", "show", &lab::UNLISTED_V4.to_string()]);
            p.say(&format!(
                "after removing {}: probe datagram {tries} did not arrive within 500 ms (neighbour: {}); trying again",
                i.filter.label(),
                neigh.trim()
            ));
        }
    }
    Ok(())
}

/// What the gateway namespace has on its ENI: links (XDP), tcx and clsact programs, neighbours.
fn diagnostics(lab: &Lab) -> String {
    let mut out = String::new();
    for (program, args) in [
        ("ip", &["-d", "link", "show", lab::ENI][..]),
        ("ip", &["neigh", "show"][..]),
        ("bpftool", &["net", "show", "dev", lab::ENI][..]),
        ("tc", &["filter", "show", "dev", lab::ENI, "egress"][..]),
        ("nft", &["list", "ruleset"][..]),
    ] {
        let r = run_bounded(Some(&lab.gw), program, args, None, Duration::from_secs(10));
        out += &format!("$ {program} {}\n", args.join(" "));
        match r {
            Ok(o) => {
                out += &String::from_utf8_lossy(&o.stdout);
                out += &String::from_utf8_lossy(&o.stderr);
            }
            Err(e) => out += &format!("{e:#}\n"),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------------

pub fn markdown(rows: &[Row]) -> String {
    let mut setups: Vec<&str> = vec![];
    for r in rows {
        if !setups.contains(&r.setup.as_str()) {
            setups.push(&r.setup);
        }
    }
    let cell = |setup: &str, test: &str| rows.iter().find(|r| r.setup == setup && r.test == test);
    // "(0.97× [0.95–0.99], paired)" or "(0.97×)".
    let ratio = |r: &Row| match (&r.paired, r.ratio_to_no_filter) {
        (Some(p), _) => format!(
            " ({:.3}×{}, paired)",
            p.median,
            p.ci95
                .map_or(String::new(), |[lo, hi]| format!(" [{lo:.3}–{hi:.3}]"))
        ),
        (None, Some(x)) => format!(" ({x:.2}×)"),
        (None, None) => String::new(),
    };
    // "machine / busiest CPU / iperf3 processes (machine busy %, busiest CPU busy %)"
    let cpu = |r: Option<&Row>| match r.and_then(|r| r.cpu_ns_per_packet.map(|c| (r, c))) {
        Some((r, c)) => {
            let n = |x: Option<f64>| x.map_or_else(|| "—".into(), |x| format!("{x:.0}"));
            format!(
                "{c:.0} / {} / {} ({}%, {}%)",
                n(r.busiest_cpu_ns_per_packet),
                n(r.iperf3_cpu_ns_per_packet),
                n(r.cpu_busy_percent),
                n(r.busiest_cpu_busy_percent),
            )
        }
        None => "—".into(),
    };
    let mut out = String::from(
        "### Throughput over veth (iperf3, gateway namespace → VPC namespace)\n\n\
         | setup | TCP Gbit/s (× no filter) | UDP 64 B kpps received (× no filter) | UDP loss | TCP CPU ns/packet: machine / busiest CPU / iperf3 (busy: machine, busiest CPU) | UDP CPU ns/packet: machine / busiest CPU / iperf3 (busy: machine, busiest CPU) |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for s in &setups {
        let tcp = cell(s, "tcp");
        let udp = cell(s, "udp64");
        out += &format!(
            "| {s} | {} | {} | {} | {} | {} |\n",
            tcp.map(|r| format!("{:.2}{}", r.median / 1e9, ratio(r)))
                .unwrap_or_else(|| "—".into()),
            udp.map(|r| format!("{:.0}{}", r.median / 1e3, ratio(r)))
                .unwrap_or_else(|| "—".into()),
            udp.and_then(|r| r.loss_percent)
                .map(|l| format!("{l:.1}%"))
                .unwrap_or_else(|| "—".into()),
            cpu(tcp),
            cpu(udp),
        );
    }
    for test in ["tcp", "udp64"] {
        for (setup, x) in vpcgate_to(rows, test, |r| r.ratio_to_minimal) {
            out +=
                &format!("\n{setup} vs the minimal enforcer with the same rules, {test}: {x:.2}×.");
        }
        for (setup, x) in vpcgate_to(rows, test, |r| r.ratio_to_nftables) {
            out += &format!("\n{setup} vs nftables with the same rules, {test}: {x:.2}×.");
        }
    }
    if let Some(r) = rows.first() {
        let pairs = rows
            .iter()
            .find_map(|r| r.paired.as_ref())
            .map_or(0, |p| p.ratios.len());
        out += &format!(
            "\n\nMedians of {} run(s) of {} s per setup and test. \
             No filter and the BPF setups (programs on the ENI only) ran in {pairs} pairs: a run through the \
             ENI and one through the twin link (a second veth pair between the same namespaces, nothing \
             attached, toward a second iperf3 server), back to back, the twin first in every other pair. \
             Their \"× no filter\" is the median of the pairs' ratios (ENI / twin), with its distribution-free \
             95% confidence interval in brackets (order statistics, the pairs taken as independent): \
             drift over minutes cancels within a pair, second-to-second variation only narrows with more \
             pairs. No filter's own pairs (both links bare) show how far the \
             two links differ. nftables and iptables hook the namespace, not a device (the twin's packets \
             would cross their rules too): theirs is the ratio of medians to no filter's ENI runs. vpcgate's \
             ratio to the minimal enforcer is the quotient of their paired ratios. \
             TCP: the receiver's bits/s; UDP: 18-byte payloads (64-byte frames) sent without a rate limit, the \
             receiver's packets/s and loss. CPU per packet, over the packets sent on the gateway's ENI (TCP: \
             GSO super-packets, what TC egress sees): \"machine\" is the busy time of all CPUs (/proc/stat \
             user+nice+system+irq+softirq) during the run, so it includes whatever else runs on this shared \
             machine; \"busiest CPU\" is the busy time of the one CPU that was busiest during the run; \
             \"iperf3\" is the two iperf3 processes' own CPU time as iperf3 reports it (with tick \
             accounting, softirq work done in their context included, ksoftirqd's not). Both iperf3 ends run \
             on this machine. When the machine is near 100% busy the runs are CPU-bound: the machine figure is \
             then about (CPUs / packet rate) and the throughput ratios say more than the CPU figures. When \
             one CPU is near 100% busy and the others are not, that CPU bounds the rate: a program's cost \
             per packet in situ (below) takes about its share of the busiest CPU's figure off the rate.\n",
            r.runs, r.seconds_per_run,
        );
    }
    if rows.iter().any(|r| !r.programs.is_empty()) {
        out += "\n#### BPF programs under this traffic (kernel statistics)\n\n\
                | setup | test | program | runs | ns per run |\n|---|---|---|---:|---:|\n";
        for r in rows {
            for c in &r.programs {
                out += &format!(
                    "| {} | {} | {} | {} | {:.0} |\n",
                    r.setup, r.test, c.program, c.runs, c.ns_per_run
                );
            }
        }
        out += &format!(
            "\nOne extra run of {STATS_SECS} s per test after each BPF setup's last timed run, with the kernel's BPF \
             statistics on (`BPF_ENABLE_STATS`): the kernel times every run of every program, with two clock \
             reads that the empty program's figure is mostly made of. No timed run above has them on. This is \
             what each program costs amid the network stack's own work, its caches shared with everything \
             else on the path.\n"
        );
    }
    let mut notes: Vec<String> = vec![];
    for r in rows {
        let n = format!("- {}: {}", r.setup, r.note);
        if !notes.contains(&n) {
            notes.push(n);
        }
    }
    out += &format!("\n{}\n", notes.join("\n"));
    out
}

/// Bars of each setup's median: TCP in Gbit/s, small-packet UDP in thousands of packets/s received.
pub fn plots(dir: &std::path::Path, rows: &[Row]) -> anyhow::Result<()> {
    for (test, file, title, unit, scale) in [
        (
            "tcp",
            "throughput_tcp.svg",
            "TCP over the lab's veth (iperf3)",
            "Gbit/s",
            1e-9,
        ),
        (
            "udp64",
            "throughput_udp64.svg",
            "64-byte UDP over the lab's veth (iperf3, received)",
            "thousand packets/s",
            1e-3,
        ),
    ] {
        let bars: Vec<(String, f64)> = rows
            .iter()
            .filter(|r| r.test == test)
            .map(|r| (r.setup.clone(), r.median * scale))
            .collect();
        if !bars.is_empty() {
            crate::plot::bars(&dir.join(file), title, unit, &bars)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{BusyTicks, Filter};

    #[test]
    fn busy_ticks_sum_the_busy_fields_and_find_the_busiest_cpu() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let before = BusyTicks::parse(
            "cpu  100 0 50 1000 7 0 10 3 0 0\n\
             cpu0 60 0 20 500 4 0 5 2 0 0\n\
             cpu1 40 0 30 500 3 0 5 1 0 0\n\
             intr 12345 0 0\n\
             cpus_allowed 3\n",
        )
        .unwrap();
        assert_eq!(before.total, 160);
        assert_eq!(before.per_cpu["cpu0"], 85);
        assert_eq!(before.per_cpu["cpu1"], 75);
        // Idle, iowait and steal are not busy; cpu1 did more in between though cpu0 did more overall.
        let after = BusyTicks::parse(
            "cpu  150 0 130 1100 9 2 30 4 0 0\n\
             cpu0 70 0 30 550 5 0 10 3 0 0\n\
             cpu1 80 0 100 550 4 2 20 1 0 0\n",
        )
        .unwrap();
        assert_eq!(before.since(&after), (152, 202 - 75));
        // A CPU that appears only later (hot-plugged) is not counted; the total still is.
        let plugged = BusyTicks::parse(
            "cpu  400 0 130 1100 9 2 30 4 0 0\n\
             cpu0 70 0 30 550 5 0 10 3 0 0\n\
             cpu1 80 0 100 550 4 2 20 1 0 0\n\
             cpu2 250 0 0 0 0 0 0 0 0 0\n",
        )
        .unwrap();
        assert_eq!(before.since(&plugged), (402, 202 - 75));
        for (bad, want) in [
            ("cpu0 1 2 3 4 5 6 7\n", "no cpu line"),
            ("cpu  1 2 3 4 5 6 7\n", "no cpuN lines"),
            ("cpu  1 2 3\ncpu0 1 2 3 4 5 6 7\n", "short cpu line"),
            ("cpu  1 2 3 4 5 6 x\ncpu0 1 2 3 4 5 6 7\n", "not numbers"),
        ] {
            let e = BusyTicks::parse(bad).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains(want)),
                "{bad:?}: {e:?}"
            );
        }
    }

    #[test]
    fn setups_parse_from_their_names_and_bad_names_are_errors() {
        for (name, want) in [
            ("none", Filter::None),
            ("empty", Filter::EmptyTc),
            ("parse", Filter::Parse),
            ("lookup-1k", Filter::Lookup(1000)),
            ("spin-200", Filter::Spin(200)),
            ("spin-2048", Filter::Spin(2048)),
            ("minimal-100k", Filter::Minimal(100_000)),
            ("vpcgate-1000", Filter::Vpcgate(1000)),
            ("nftables-1k", Filter::Nftables(1000)),
            ("iptables-10000", Filter::Iptables(10_000)),
        ] {
            assert_eq!(Filter::parse(name).unwrap(), want, "{name}");
        }
        for bad in [
            "",
            "vpcgate",
            "vpcgate-",
            "vpcgate-0",
            "vpcgate-k",
            "vpcgate-1m",
            "pf-1k",
            "none-1k",
            "minimal-1.5k",
            "spin-2049",
            "spin-0",
            "vpcgate-18446744073709552k",
        ] {
            let e = Filter::parse(bad).expect_err(bad).to_string();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        // Only netfilter's setups are not paired with the twin link.
        for f in [
            Filter::None,
            Filter::EmptyTc,
            Filter::Parse,
            Filter::Lookup(1),
            Filter::Spin(1),
            Filter::Minimal(1),
            Filter::Vpcgate(1),
        ] {
            assert!(f.per_device(), "{f:?}");
        }
        assert!(!Filter::Nftables(1).per_device() && !Filter::Iptables(1).per_device());
    }
}
