//! Per-packet cost with BPF_PROG_TEST_RUN: vpcgate's TC egress and XDP forward beside the floor (an
//! empty program of the same type), a bare LPM lookup in a trie of the same entries, the minimal enforcer
//! (vpcgate's parser + that one lookup) and xdp-filter, on the same frames.
//!
//! Three regimes. *Hot*: one frame, `repeat` runs in one call; the kernel reports the mean, and every
//! lookup hits a warm cache. *Spread*: many distinct frames whose destinations are drawn across the
//! policy's prefixes, one run per call; the kernel times each run alone (its clock reads included), and
//! the syscall and skb set-up between runs evict much of the cache as real traffic does. Before each
//! program's pass over the spread frames, a sweep through twice the last-level cache evicts what the
//! previous pass left: programs that share a trie (the baselines' three, a hook's TC and XDP) would
//! otherwise find it warmed by the one before them, and a figure would depend on its place in the round.
//! vpcgate memoizes decisions per destination and CPU (`VERDICT_CACHE`; the bench stays on one CPU), so
//! spread frames after the first pass reuse those whose slot no other destination took. *Fresh*: the
//! spread frames again, each right after a new policy epoch (as after an apply), so no memoized decision
//! holds and vpcgate walks its tries for every packet, as for the first packet toward a destination.
//! Each figure is the median of several rounds; rounds cycle through the programs so noise spreads
//! evenly. `net_ns` subtracts the floor of the same hook, regime and frames.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, bail, ensure};
use aya::{
    Ebpf,
    maps::{LpmTrie, lpm_trie::Key},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use serde::Serialize;
use vpcgate::policy::model::Proto;
use vpcgate_common::datapath::{AddrV4, AddrV6, AddrValue, GEN_A, GEN_BITS};
use vpcgate_lab::{
    harness::{Harness, StayOnCpu, TC_PASS, TC_SHOT, XDP_DROP, XDP_PASS},
    packet::{Ext, Frame, Layer, build},
};

use crate::{
    Progress,
    policy::{self, Rule},
    profile,
    xdp_filter::{self, XdpFilter},
};

#[derive(Serialize, Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A packet a rule allows (64-byte UDP when hot; TCP ACK or UDP by the rule's protocol when spread).
    Allowed,
    /// To a rule's prefix on a port it does not allow: dropped `port_not_authorized` (with its event).
    Denied,
    /// The gateway's answer in a flow a peer opened, to a peer outside the policy: passes as a reply.
    Reply,
    /// A middle IPv4/IPv6 fragment of a datagram whose first fragment passed.
    Fragment,
}

pub const KINDS: [Kind; 4] = [Kind::Allowed, Kind::Denied, Kind::Reply, Kind::Fragment];

#[derive(Serialize, Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Regime {
    Hot,
    Spread,
    /// The spread frames, each right after a new policy epoch, as after an apply: no decision is
    /// memoized (`VerdictMemo`, `VERDICT_CACHE`), so vpcgate walks the tries for every packet, as it does
    /// for the first packet toward a destination.
    Fresh,
}

impl Regime {
    pub const ALL: [Regime; 3] = [Regime::Hot, Regime::Spread, Regime::Fresh];
}

#[derive(Serialize, Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Prog {
    VpcgateTcEgress,
    VpcgateXdpForward,
    /// The ENI's observe-only XDP, on the backend's answers (the allowed packet reversed).
    VpcgateXdpIngress,
    MinimalTc,
    MinimalXdp,
    TrieTc,
    TrieXdp,
    FloorTc,
    FloorXdp,
    XdpFilter,
}

#[derive(Serialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    Tc,
    Xdp,
}

impl Prog {
    pub const ALL: [Prog; 10] = [
        Prog::VpcgateTcEgress,
        Prog::VpcgateXdpForward,
        Prog::VpcgateXdpIngress,
        Prog::MinimalTc,
        Prog::MinimalXdp,
        Prog::TrieTc,
        Prog::TrieXdp,
        Prog::FloorTc,
        Prog::FloorXdp,
        Prog::XdpFilter,
    ];

    pub fn hook(self) -> Hook {
        match self {
            Prog::VpcgateTcEgress | Prog::MinimalTc | Prog::TrieTc | Prog::FloorTc => Hook::Tc,
            _ => Hook::Xdp,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Prog::VpcgateTcEgress => "vpcgate TC egress",
            Prog::VpcgateXdpForward => "vpcgate XDP forward",
            Prog::VpcgateXdpIngress => "vpcgate XDP ingress (observe)",
            Prog::MinimalTc => "minimal enforcer (TC)",
            Prog::MinimalXdp => "minimal enforcer (XDP)",
            Prog::TrieTc => "bare LPM trie (TC)",
            Prog::TrieXdp => "bare LPM trie (XDP)",
            Prog::FloorTc => "floor: empty TC",
            Prog::FloorXdp => "floor: empty XDP",
            Prog::XdpFilter => "xdp-filter (XDP)",
        }
    }

    fn floor(self) -> Prog {
        match self.hook() {
            Hook::Tc => Prog::FloorTc,
            Hook::Xdp => Prog::FloorXdp,
        }
    }

    /// The object's program name (baselines) or None (vpcgate's own, xdp-filter).
    fn baseline_name(self) -> Option<&'static str> {
        Some(match self {
            Prog::MinimalTc => "bench_tc_minimal",
            Prog::MinimalXdp => "bench_xdp_minimal",
            Prog::TrieTc => "bench_tc_trie",
            Prog::TrieXdp => "bench_xdp_trie",
            Prog::FloorTc => "bench_tc_empty",
            Prog::FloorXdp => "bench_xdp_empty",
            _ => return None,
        })
    }
}

/// One measurement: a program on one kind of packet, at one policy size, in one regime.
#[derive(Serialize, Clone, Debug)]
pub struct Row {
    pub program: Prog,
    pub hook: Hook,
    /// Rules in the policy (half IPv4, half IPv6); the tries hold one address entry per rule.
    pub entries: usize,
    pub kind: Kind,
    pub regime: Regime,
    /// Median over rounds of the mean ns per packet, as the kernel timed it.
    pub ns: f64,
    /// `ns` minus the floor (empty program of the hook, same regime and frames).
    pub net_ns: f64,
    /// Each round's mean.
    pub rounds: Vec<f64>,
    /// Distinct frames (1 when hot) and runs per frame per round.
    pub frames: usize,
    pub repeat: u32,
}

/// What was measured and what could not be.
#[derive(Serialize, Clone, Debug, Default)]
pub struct Section {
    pub rows: Vec<Row>,
    pub sizes: Vec<usize>,
    /// Address entries vpcgate's tries held at each size (v4 + v6).
    pub addr_entries: Vec<(usize, u32)>,
    pub xdp_filter_version: Option<String>,
    /// Where the time goes (perf samples per kernel symbol) for the allowed packet at `PROFILE_ENTRIES`.
    pub profiles: Vec<ProfileRow>,
    pub notes: Vec<String>,
}

#[derive(Serialize, Clone, Debug)]
pub struct ProfileRow {
    pub program: Prog,
    pub regime: Regime,
    pub entries: usize,
    pub symbols: Vec<profile::Symbol>,
}

/// The policy size profiled: the reference size.
pub const PROFILE_ENTRIES: usize = 100_000;
/// What is profiled there.
const PROFILED: [Prog; 4] = [
    Prog::VpcgateTcEgress,
    Prog::VpcgateXdpForward,
    Prog::VpcgateXdpIngress,
    Prog::MinimalTc,
];

pub struct Params {
    /// Seconds of perf samples per profiled program and regime.
    pub profile_seconds: u32,
    pub sizes: Vec<usize>,
    pub rounds: usize,
    pub hot_repeat: u32,
    pub spread_frames: usize,
}

impl Params {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                profile_seconds: 1,
                sizes: vec![10, 1_000, 100_000],
                rounds: 3,
                hot_repeat: 20_000,
                spread_frames: 512,
            }
        } else {
            Self {
                profile_seconds: 3,
                sizes: vec![10, 1_000, 100_000, 1_000_000],
                rounds: 7,
                hot_repeat: 200_000,
                spread_frames: 4096,
            }
        }
    }
}

/// The gateway's addresses in the frames (the egress IP of each family).
const GW_V4: [u8; 4] = [10, 77, 0, 5];
const GW_V6: [u8; 16] = [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
/// The gateway's port in flows peers opened (replies come from it).
const GW_PORT: u16 = 8443;
/// UDP payload of a 64-byte frame (60 bytes + FCS) over IPv4.
const SMALL_PAYLOAD: usize = 18;

fn ip_layer(src: IpAddr, dst: IpAddr, frag: Option<(u16, u32)>) -> Vec<Layer> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => vec![Layer::Ipv4 {
            src: s.octets(),
            dst: d.octets(),
            options: 0,
            frag_offset: frag.map_or(0, |f| f.0),
            more_fragments: frag.is_some(),
            id: frag.map_or(1, |f| f.1 as u16),
        }],
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut l = vec![Layer::Ipv6 {
                src: s.octets(),
                dst: d.octets(),
            }];
            if let Some((offset, id)) = frag {
                l.push(Layer::Ext(Ext::Fragment {
                    offset,
                    more: true,
                    id,
                }));
            }
            l
        }
        _ => unreachable!("one family per frame"),
    }
}

fn gateway(dst: IpAddr) -> IpAddr {
    match dst {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(GW_V4)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(GW_V6)),
    }
}

fn l4(proto: Proto, sport: u16, dport: u16, flags: u8) -> Layer {
    match proto {
        Proto::Tcp => Layer::Tcp {
            sport,
            dport,
            flags,
            options: 0,
        },
        Proto::Udp => Layer::Udp { sport, dport },
    }
}

/// A peer outside every benchmark rule (172.16.0.0/12, fd99::/16) that opened a flow to the gateway.
fn peer(i: usize, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(0xac10_0000 | (i as u32 & 0x000f_ffff)))
    } else {
        IpAddr::V6(Ipv6Addr::from((0xfd99u128 << 112) | i as u128))
    }
}

/// The frames of one kind: the "set-up" frames run once before timing (first fragments) and the timed
/// ones. `hot`: one frame (a 64-byte UDP packet where the kind allows).
struct Frames {
    setup: Vec<Frame>,
    timed: Vec<Frame>,
    /// The answers to `timed` (allowed packets only), for the ENI's ingress.
    answers: Vec<Frame>,
    /// Reply flows to record before timing.
    replies: Vec<Frame>,
}

impl Frames {
    /// What a program is timed on: the ENI's ingress sees the answers.
    fn for_program(&self, pr: Prog) -> &[Frame] {
        if pr == Prog::VpcgateXdpIngress {
            &self.answers
        } else {
            &self.timed
        }
    }
}

fn frames(rules: &[Rule], kind: Kind, count: usize, rng: &mut fastrand::Rng) -> Frames {
    let mut f = Frames {
        setup: vec![],
        timed: vec![],
        answers: vec![],
        replies: vec![],
    };
    // Hot: a UDP rule, IPv4 (xdp-filter's and the 64-byte packet); spread: any rule.
    let hot = count == 1;
    let udp4: Vec<&Rule> = rules
        .iter()
        .filter(|r| r.proto == Proto::Udp && r.net.addr().is_ipv4())
        .collect();
    for i in 0..count {
        let r = if hot && !udp4.is_empty() {
            udp4[0]
        } else {
            &rules[rng.usize(0..rules.len())]
        };
        let dst = r.host;
        let src = gateway(dst);
        let sport = 40_000 + (i % 20_000) as u16;
        let payload = if dst.is_ipv4() { SMALL_PAYLOAD } else { 0 };
        match kind {
            Kind::Allowed => {
                let mut layers = ip_layer(src, dst, None);
                layers.push(l4(r.proto, sport, r.inside, 0x10));
                f.timed.push(build("allowed", &layers, payload));
                let mut back = ip_layer(dst, src, None);
                back.push(l4(r.proto, r.inside, sport, 0x10));
                f.answers.push(build("answer", &back, payload));
            }
            Kind::Denied => {
                let mut layers = ip_layer(src, dst, None);
                layers.push(l4(r.proto, sport, r.outside, 0x10));
                f.timed.push(build("denied", &layers, payload));
            }
            Kind::Reply => {
                let p = peer(i, dst.is_ipv4());
                let mut layers = ip_layer(gateway(p), p, None);
                layers.push(l4(r.proto, GW_PORT, sport, 0x10));
                let frame = build("reply", &layers, payload);
                f.replies.push(frame.clone());
                f.timed.push(frame);
            }
            Kind::Fragment => {
                let id = 0x1000 + i as u32;
                let mut first = ip_layer(src, dst, Some((0, id)));
                // A first fragment: offset 0, more fragments.
                first.push(l4(r.proto, sport, r.inside, 0x10));
                f.setup.push(build("first fragment", &first, 64));
                let mut middle = ip_layer(src, dst, Some((8, id)));
                let proto = match r.proto {
                    Proto::Tcp => 6,
                    Proto::Udp => 17,
                };
                middle.push(Layer::Proto { proto, len: 64 });
                f.timed.push(build("middle fragment", &middle, 0));
            }
        }
    }
    f
}

/// This thread in a network namespace of its own until dropped, then back in the one it was in.
struct OwnNetns {
    previous: std::fs::File,
}

impl OwnNetns {
    fn enter() -> anyhow::Result<Self> {
        let previous = std::fs::File::open("/proc/thread-self/ns/net")
            .context("opening this thread's network namespace")?;
        // SAFETY: unshare affects only the calling thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        }
        Ok(Self { previous })
    }
}

impl Drop for OwnNetns {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace file this struct holds open.
        let rc = unsafe { libc::setns(self.previous.as_raw_fd(), libc::CLONE_NEWNET) };
        // Throughput and the control plane must not run in the private namespace.
        assert_eq!(
            rc,
            0,
            "setns back to the original network namespace: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Everything that runs: vpcgate's datapath (through the test harness, which applies policies as the
/// agent does), the baselines' object, and xdp-filter when the size fits it.
struct Programs {
    h: Harness,
    base: Ebpf,
    xdp_filter: Option<XdpFilter>,
}

fn run_one<P>(prog: &P, data: &[u8], repeat: u32) -> anyhow::Result<(u32, f64)>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
{
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(data),
            repeat,
            ..TestRunOptions::new()
        })
        .context("BPF_PROG_TEST_RUN")?;
    Ok((r.return_value, r.duration.as_nanos() as f64))
}

impl Programs {
    fn run(&mut self, prog: Prog, data: &[u8], repeat: u32) -> anyhow::Result<(u32, f64)> {
        match prog {
            Prog::VpcgateTcEgress => run_one(self.h.dp.tc_egress()?, data, repeat),
            Prog::VpcgateXdpForward => run_one(self.h.dp.xdp_forward()?, data, repeat),
            Prog::VpcgateXdpIngress => run_one(self.h.dp.xdp_ingress()?, data, repeat),
            Prog::XdpFilter => match &self.xdp_filter {
                Some(x) => run_one(&x.prog, data, repeat),
                None => bail!("xdp-filter is not loaded at this size"),
            },
            p => {
                let name = p.baseline_name().expect("a baseline");
                let prog = self.base.program(name).context(name)?;
                match p.hook() {
                    Hook::Tc => {
                        let tc: &SchedClassifier = prog.try_into()?;
                        run_one(tc, data, repeat)
                    }
                    Hook::Xdp => {
                        let xdp: &Xdp = prog.try_into()?;
                        run_one(xdp, data, repeat)
                    }
                }
            }
        }
    }

    fn passes(prog: Prog, rv: u32) -> Option<bool> {
        match (prog.hook(), rv) {
            (Hook::Tc, TC_PASS) | (Hook::Xdp, XDP_PASS) => Some(true),
            (Hook::Tc, TC_SHOT) | (Hook::Xdp, XDP_DROP) => Some(false),
            _ => None,
        }
    }
}

pub(crate) fn load_baselines() -> anyhow::Result<Ebpf> {
    let path = vpcgate::datapath::BENCH_OBJECT_PATH;
    let bytes = std::fs::read(path).with_context(|| {
        format!("reading the baselines' object {path} (built with vpcgate; absent when VPCGATE_EBPF_OBJ replaced the build)")
    })?;
    let mut ebpf = Ebpf::load(&bytes).context("loading the baselines' object")?;
    for p in Prog::ALL {
        let Some(name) = p.baseline_name() else {
            continue;
        };
        let prog = ebpf
            .program_mut(name)
            .with_context(|| format!("{name} is not in the object"))?;
        match p.hook() {
            Hook::Tc => {
                let tc: &mut SchedClassifier = prog.try_into()?;
                tc.load().with_context(|| format!("verifying {name}"))?;
            }
            Hook::Xdp => {
                let xdp: &mut Xdp = prog.try_into()?;
                xdp.load().with_context(|| format!("verifying {name}"))?;
            }
        }
    }
    Ok(ebpf)
}

/// Empties one of the baselines' tries and fills it with `keys`.
fn refill<K: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    keys: impl Iterator<Item = Key<K>>,
) -> anyhow::Result<()> {
    let mut trie: LpmTrie<_, K, AddrValue> =
        LpmTrie::try_from(ebpf.map_mut(name).context(name.to_owned())?)?;
    let old: Vec<_> = trie.keys().collect::<Result<_, _>>()?;
    for k in old {
        trie.remove(&k)?;
    }
    for k in keys {
        trie.insert(&k, AddrValue::default(), 0)?;
    }
    Ok(())
}

/// Replaces the baselines' tries with the policy's address prefixes (keyed as the datapath keys them).
pub(crate) fn fill_baseline_tries(
    ebpf: &mut Ebpf,
    prefixes: &[ipnet::IpNet],
) -> anyhow::Result<()> {
    let bits = |len: u8| GEN_BITS + u32::from(len);
    refill(
        ebpf,
        "BENCH_V4",
        prefixes.iter().filter_map(|n| match n {
            ipnet::IpNet::V4(n) => Some(Key::new(
                bits(n.prefix_len()),
                AddrV4 {
                    generation: GEN_A,
                    addr: n.network().octets(),
                    _pad: [0; 3],
                },
            )),
            ipnet::IpNet::V6(_) => None,
        }),
    )?;
    refill(
        ebpf,
        "BENCH_V6",
        prefixes.iter().filter_map(|n| match n {
            ipnet::IpNet::V6(n) => Some(Key::new(
                bits(n.prefix_len()),
                AddrV6 {
                    generation: GEN_A,
                    addr: n.network().octets(),
                    _pad: [0; 3],
                },
            )),
            ipnet::IpNet::V4(_) => None,
        }),
    )
}

/// The verdict each program must give a kind of packet before it is timed (None: not checked; the
/// baselines look at the address only).
fn expected(prog: Prog, kind: Kind) -> Option<bool> {
    match prog {
        Prog::VpcgateTcEgress | Prog::VpcgateXdpForward => Some(kind != Kind::Denied),
        Prog::VpcgateXdpIngress => Some(true),
        Prog::FloorTc | Prog::FloorXdp => Some(true),
        Prog::MinimalTc | Prog::MinimalXdp | Prog::TrieTc | Prog::TrieXdp => match kind {
            Kind::Allowed | Kind::Denied => Some(true),
            Kind::Reply => Some(false),
            Kind::Fragment => None,
        },
        Prog::XdpFilter => (kind == Kind::Allowed).then_some(true),
    }
}

/// Whether a program is measured on a kind of packet: xdp-filter on allowed packets only (when loaded);
/// XDP forward never on replies (a forwarded packet is never a reply in the gateway's own flows: rule 3
/// applies to packets this host generates).
fn applies(pr: Prog, kind: Kind, xdp_filter_loaded: bool) -> bool {
    match pr {
        Prog::XdpFilter => xdp_filter_loaded && kind == Kind::Allowed,
        Prog::VpcgateXdpForward => kind != Kind::Reply,
        Prog::VpcgateXdpIngress => kind == Kind::Allowed,
        _ => true,
    }
}

pub fn run(
    quick: bool,
    sizes: &[usize],
    seed: u64,
    out: &std::path::Path,
    p: &Progress,
) -> anyhow::Result<Section> {
    let mut params = Params::new(quick);
    let sweep = Sweep::new();
    if !sizes.is_empty() {
        anyhow::ensure!(
            sizes.iter().all(|&n| n > 0),
            "--sizes: a policy size is a number of rules, at least 1"
        );
        params.sizes = sizes.to_vec();
    }
    let mut section = Section {
        sizes: params.sizes.clone(),
        ..Section::default()
    };
    // The programs' socket lookups (XDP ingress, toward the gateway's addresses) see this thread's
    // namespace: a fresh one with no sockets, not the host's, whose sockets would change the path timed.
    let _ns = OwnNetns::enter()?;
    // Throughput and the control plane run after, on every CPU.
    let _cpu = StayOnCpu::here().context("keeping the per-packet bench on one CPU")?;
    p.say("per-packet: loading vpcgate's datapath and the baselines");
    let mut h = Harness::new();
    // The harness records every verdict for the differential test: not what production pays.
    h.dp.set_record_last(false)?;
    // The gateway's addresses are its own, as the agent registers them in production: the answers the
    // ENI's ingress observes go to them, and pay for what a packet toward a local address costs there.
    h.dp.set_local_addresses(&[
        IpAddr::V4(Ipv4Addr::from(GW_V4)),
        IpAddr::V6(Ipv6Addr::from(GW_V6)),
    ])?;
    let mut progs = Programs {
        h,
        base: load_baselines()?,
        xdp_filter: None,
    };
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x9e37_79b9);
    for &size in &params.sizes {
        p.say(&format!(
            "per-packet: {size} rules: generating, compiling and applying"
        ));
        let rules = policy::generate(size, seed)?;
        let pol = policy::policy(&rules, "bench", "eth1")?;
        let report = progs.h.apply(&pol);
        let entries = report.entries.addr_v4 + report.entries.addr_v6;
        section.addr_entries.push((size, entries));
        let prefixes: Vec<ipnet::IpNet> = rules.iter().map(|r| r.net).collect();
        fill_baseline_tries(&mut progs.base, &prefixes)?;
        // xdp-filter: an allowlist of each rule's host address (the frames' destinations), as many
        // entries as the policy has rules.
        progs.xdp_filter = None;
        if size.div_ceil(2) <= xdp_filter::CAPACITY_PER_FAMILY {
            let v4: Vec<Ipv4Addr> = rules
                .iter()
                .filter_map(|r| match r.host {
                    IpAddr::V4(a) => Some(a),
                    IpAddr::V6(_) => None,
                })
                .collect();
            let v6: Vec<Ipv6Addr> = rules
                .iter()
                .filter_map(|r| match r.host {
                    IpAddr::V6(a) => Some(a),
                    IpAddr::V4(_) => None,
                })
                .collect();
            let x = XdpFilter::load(&v4, &v6).context("xdp-filter")?;
            section
                .xdp_filter_version
                .get_or_insert_with(|| x.version.clone());
            progs.xdp_filter = Some(x);
        } else if !section.notes.iter().any(|n| n.contains("xdp-filter")) {
            section.notes.push(format!(
                "xdp-filter holds {} addresses per family (exact matches): not measured at {size} rules and above",
                xdp_filter::CAPACITY_PER_FAMILY
            ));
        }
        for kind in KINDS {
            for regime in Regime::ALL {
                let count = if regime == Regime::Hot {
                    1
                } else {
                    params.spread_frames
                };
                let f = frames(&rules, kind, count, &mut rng);
                progs.h.dp.clear_flow_state()?;
                for r in &f.replies {
                    ensure!(
                        progs.h.add_reply_flow(r, false, true, false),
                        "recording a reply flow"
                    );
                }
                let active: Vec<Prog> = Prog::ALL
                    .into_iter()
                    .filter(|&pr| applies(pr, kind, progs.xdp_filter.is_some()))
                    .collect();
                // Set-up frames (first fragments) and a check that each program does what it claims.
                for &pr in &active {
                    for s in &f.setup {
                        progs.run(pr, &s.bytes, 1)?;
                    }
                    for t in f.for_program(pr) {
                        let (rv, _) = progs.run(pr, &t.bytes, 1)?;
                        if let Some(want) = expected(pr, kind)
                            && Programs::passes(pr, rv) != Some(want)
                        {
                            bail!(
                                "{} returned {rv} for a {kind:?} frame ({}) at {size} rules: the benchmark would time the wrong path",
                                pr.label(),
                                t.name
                            );
                        }
                    }
                }
                let repeat = if regime == Regime::Hot {
                    params.hot_repeat
                } else {
                    1
                };
                let mut per: Vec<Vec<f64>> = vec![vec![]; active.len()];
                for _ in 0..params.rounds {
                    for (i, &pr) in active.iter().enumerate() {
                        if regime != Regime::Hot {
                            sweep.run();
                        }
                        let mut total = 0.0;
                        let frames = f.for_program(pr);
                        for t in frames {
                            // Frames repeat destinations (drawn with replacement from the rules): a
                            // new epoch before each, for every program alike (a map write between
                            // runs, outside the kernel's timing).
                            if regime == Regime::Fresh {
                                progs.h.dp.new_policy_epoch()?;
                            }
                            total += progs.run(pr, &t.bytes, repeat)?.1;
                        }
                        per[i].push(total / frames.len() as f64);
                    }
                }
                let floors: Vec<(Hook, f64)> = active
                    .iter()
                    .zip(&per)
                    .filter(|(pr, _)| matches!(pr, Prog::FloorTc | Prog::FloorXdp))
                    .map(|(pr, r)| (pr.hook(), crate::median(r)))
                    .collect();
                for (&pr, rounds) in active.iter().zip(per) {
                    let ns = crate::median(&rounds);
                    let floor = floors
                        .iter()
                        .find(|(hk, _)| *hk == pr.floor().hook())
                        .map_or(0.0, |f| f.1);
                    section.rows.push(Row {
                        program: pr,
                        hook: pr.hook(),
                        entries: size,
                        kind,
                        regime,
                        ns,
                        net_ns: ns - floor,
                        rounds,
                        frames: f.timed.len(),
                        repeat,
                    });
                }
                let vp = section
                    .rows
                    .iter()
                    .rev()
                    .find(|r| r.program == Prog::VpcgateTcEgress);
                p.say(&format!(
                    "per-packet: {size} rules, {kind:?} {regime:?}: vpcgate TC egress {:.0} ns",
                    vp.map_or(f64::NAN, |r| r.ns)
                ));
            }
        }
        if size == PROFILE_ENTRIES {
            std::fs::create_dir_all(out)?;
            let rows = profile_size(&mut progs, &rules, &params, out, &mut rng, p)?;
            section.profiles.extend(rows);
        }
    }
    progs.xdp_filter = None;
    Ok(section)
}

/// perf samples of each profiled program on allowed packets, hot and spread (spread after its first
/// pass: vpcgate's memoized decisions).
fn profile_size(
    progs: &mut Programs,
    rules: &[Rule],
    params: &Params,
    out: &std::path::Path,
    rng: &mut fastrand::Rng,
    p: &Progress,
) -> anyhow::Result<Vec<ProfileRow>> {
    if !profile::available() {
        bail!(
            "perf is not installed (Debian package linux-perf; `cargo xtask setup` installs it): the report's profile needs it"
        );
    }
    let mut rows = vec![];
    for regime in [Regime::Hot, Regime::Spread] {
        let count = if regime == Regime::Hot {
            1
        } else {
            params.spread_frames
        };
        let f = frames(rules, Kind::Allowed, count, rng);
        let repeat = if regime == Regime::Hot { 100_000 } else { 1 };
        for pr in PROFILED {
            p.say(&format!(
                "per-packet: profiling {} ({regime:?}, {} rules) with perf for {} s",
                pr.label(),
                rules.len(),
                params.profile_seconds
            ));
            let data = out.join(format!("perf-{pr:?}-{regime:?}.data"));
            let symbols = profile::record(&data, params.profile_seconds, 0.5, || {
                for t in f.for_program(pr) {
                    progs.run(pr, &t.bytes, repeat)?;
                }
                Ok(())
            })?;
            rows.push(ProfileRow {
                program: pr,
                regime,
                entries: rules.len(),
                symbols,
            });
        }
    }
    Ok(rows)
}

/// The row of one program, size, kind and regime.
pub fn find(
    s: &Section,
    program: Prog,
    entries: usize,
    kind: Kind,
    regime: Regime,
) -> Option<&Row> {
    s.rows.iter().find(|r| {
        r.program == program && r.entries == entries && r.kind == kind && r.regime == regime
    })
}

/// A buffer twice the size of the last-level cache, read through at one load per cache line: what was
/// cached before is evicted (`run`).
struct Sweep(Vec<u8>);

impl Sweep {
    fn new() -> Self {
        let llc = last_level_cache().unwrap_or(64 << 20);
        // Written once, so that every page is backed (not the shared zero page) and the reads below go
        // to memory.
        Self(vec![1u8; 2 * llc])
    }

    fn run(&self) {
        let mut sum = 0u8;
        // Opaque to the optimizer: the loads below cannot be folded from the buffer's known contents.
        for chunk in std::hint::black_box(self.0.as_slice()).chunks(64) {
            sum = sum.wrapping_add(chunk[0]);
        }
        std::hint::black_box(sum);
    }
}

/// The size of CPU 0's largest cache, from sysfs ("32768K").
fn last_level_cache() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.filter_map(|e| {
        let size = std::fs::read_to_string(e.ok()?.path().join("size")).ok()?;
        let size = size.trim();
        let (n, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit())?);
        let n: usize = n.parse().ok()?;
        Some(match unit {
            "K" => n << 10,
            "M" => n << 20,
            _ => return None,
        })
    })
    .max()
}
