//! Model-based test of the apply plan: random policy sequences applied to a simulated kernel, checking
//! every state every plan passes through.
//!
//! A packet reads `ACTIVE`, `GEN_CONFIG[g]`, `ADDR_g`, then `RESERVED_g` (only without an entry or with a
//! flagged one) and `PORTS_g` (only for a table not held inline), in that order, each at most once, and may be delayed between reads: it can combine the states of a plan between two barriers
//! (a barrier returns only once every packet that started before it has finished). For every such
//! combination and every probe (destination, protocol, port), the decision must be the old policy's or
//! the new one's; after the plan the maps hold exactly `desired(new)` and nothing else. Failures are
//! injected at every operation of some plans: the old policy must stay or be restored exactly.
//!
//! `VPCGATE_PLAN_SEED` replays a run (the seed is printed); `VPCGATE_PLAN_SEQUENCES` sizes it.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{BuildHasher, Hasher},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use vpcgate_common::datapath::{
    ADDR_RESERVED_OVERLAP, AddrValue, GEN_A, GEN_B, GenConfig, INLINE_IN_PORTS,
};

use super::{
    DatapathError,
    apply::apply_to,
    execute::Maps,
    plan::{FENCE, Op, Plan, PlanKind, plan},
    sim::Sim,
    state::{Recorded, Slot, desired, gen_config, other},
};
use crate::policy::{
    compile::{Compiled, proto_index},
    model::*,
    ports::PortSet,
    source::Pos,
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
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

fn v4(host: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | host))
}

fn v6(host: u128) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from((0xfd00u128 << 112) | host))
}

/// A prefix in a small space (1024 hosts), so prefixes overlap.
fn random_net(r: &mut Rng) -> IpNet {
    if r.chance(50) {
        let len = if r.chance(50) {
            22 + r.below(5) as u8
        } else {
            27 + r.below(6) as u8
        };
        IpNet::new(v4(r.below(1024) as u32), len).unwrap().trunc()
    } else {
        let len = if r.chance(50) {
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
    let ranges = (0..1 + r.below(3))
        .map(|_| {
            let lo = 1 + r.below(300) as u16;
            (lo, lo + r.below(40) as u16)
        })
        .collect();
    PortSet::from_ranges(ranges)
}

fn proto(r: &mut Rng) -> Proto {
    if r.chance(50) { Proto::Tcp } else { Proto::Udp }
}

/// A reserved block; often nested in one of `existing` (so that the order of adds and removes matters).
fn reserved(r: &mut Rng, existing: &[Reserved]) -> Reserved {
    let n = match existing.get(r.below(2 * existing.len() as u64 + 1) as usize) {
        Some(e) => {
            let host =
                u128::from(r.below(1 << (e.cidr.max_prefix_len() - e.cidr.prefix_len()).min(10)));
            match e.cidr {
                IpNet::V4(n) => IpNet::from(IpAddr::V4(Ipv4Addr::from(
                    u32::from(n.network()) | host as u32,
                ))),
                IpNet::V6(n) => {
                    IpNet::from(IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | host)))
                }
            }
        }
        None => random_net(r),
    };
    // Narrow blocks, so they carve holes instead of covering everything.
    let len = n.max_prefix_len() - r.below(9) as u8;
    Reserved {
        cidr: IpNet::new(n.addr(), len).unwrap().trunc(),
        source: ReservedSource::Explicit,
        pos: Pos::default(),
    }
}

fn authorization(r: &mut Rng, name: String) -> Authorization {
    Authorization {
        name,
        vpc_id: "vpc-1".into(),
        instance_id: None,
        instance_type: InstanceType::Ip,
        address: random_net(r),
        ports: random_ports(r),
        protocol: proto(r),
        pos: Pos::default(),
    }
}

fn accessible(r: &mut Rng) -> Accessible {
    Accessible {
        cidr: random_net(r),
        ports: random_ports(r),
        protocols: match r.below(3) {
            0 => vec![Proto::Tcp],
            1 => vec![Proto::Udp],
            _ => vec![Proto::Tcp, Proto::Udp],
        },
        pos: Pos::default(),
    }
}

fn random_policy(r: &mut Rng) -> Policy {
    let pos = Pos::default();
    let nodes = (0..r.below(3))
        .map(|_| Node {
            address: random_net(r).addr(),
            port: 1 + r.below(300) as u16,
            weight: 1,
            pos,
        })
        .collect();
    Policy {
        instance: Instance {
            name: "model".into(),
            kind: Kind::VpcIntegration,
            vpc_id: "vpc-1".into(),
            interface: "eth1".into(),
            egress_ip: None,
            vswitch_cidr: r.chance(50).then(|| random_net(r)),
            vswitch_pos: pos,
            egress_pos: pos,
            zone: None,
            reserved: (0..r.below(4)).fold(vec![], |mut v, _| {
                v.push(reserved(r, &v));
                v
            }),
            mode: if r.chance(20) {
                Mode::Audit
            } else {
                Mode::Enforce
            },
            forward_interfaces: vec![],
            host_essentials: HostEssential::ALL.to_vec(),
            flow_timeouts: FlowTimeouts::default(),
        },
        accessible: (0..r.below(4)).map(|_| accessible(r)).collect(),
        authorizations: (0..r.below(7))
            .map(|i| authorization(r, format!("a{i}")))
            .collect(),
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

/// A policy edit: mostly in place (same rules, new addresses, ports, protocols; rules added or removed at
/// the end; reserved blocks added, removed, listed twice), sometimes one that forces a new generation
/// (a rename, a mode or host-essentials change).
fn mutate(prev: &Policy, r: &mut Rng) -> Policy {
    let mut p = prev.clone();
    for a in p.authorizations.iter_mut() {
        if r.chance(30) {
            a.address = random_net(r);
        }
        if r.chance(30) {
            a.ports = random_ports(r);
        }
        if r.chance(30) {
            // TCP <-> UDP: a port table shared by both protocols changes which protocol uses it.
            a.protocol = match a.protocol {
                Proto::Tcp => Proto::Udp,
                Proto::Udp => Proto::Tcp,
            };
        }
    }
    for n in p.upstreams.iter_mut().flat_map(|u| u.nodes.iter_mut()) {
        if r.chance(20) {
            n.port = 1 + r.below(300) as u16;
        }
    }
    match r.below(8) {
        0 => {
            let b = reserved(r, &p.instance.reserved);
            p.instance.reserved.push(b);
        }
        4 => p.instance.reserved.clear(),
        5 => {
            let b = reserved(r, &p.instance.reserved);
            p.instance.reserved.insert(0, b);
        }
        1 => {
            p.instance.reserved.pop();
        }
        2 => {
            if let Some(first) = p.instance.reserved.first().cloned() {
                p.instance.reserved.push(first);
            }
        }
        3 if !p.instance.reserved.is_empty() => {
            p.instance.reserved.remove(0);
        }
        _ => {}
    }
    match r.below(4) {
        0 => {
            p.accessible.pop();
        }
        1 => p.accessible.push(accessible(r)),
        2 => {
            // An accessible block is named by its CIDR: a new CIDR is a rename (a new generation).
            for a in p.accessible.iter_mut() {
                if r.chance(15) {
                    a.cidr = random_net(r);
                }
            }
        }
        _ => {}
    }
    if p.accessible.is_empty() {
        match r.below(3) {
            0 => {
                p.authorizations.pop();
            }
            1 => {
                let name = format!("a{}", p.authorizations.len());
                p.authorizations.push(authorization(r, name));
            }
            _ => {}
        }
    }
    if r.chance(8)
        && let Some(a) = p.authorizations.first_mut()
    {
        a.name.push('x');
    }
    if r.chance(6) {
        p.instance.mode = match p.instance.mode {
            Mode::Enforce => Mode::Audit,
            Mode::Audit => Mode::Enforce,
        };
    }
    if r.chance(4) {
        p.instance.host_essentials.pop();
    }
    p
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    NoPolicy,
    Reserved(u32),
    Rule(u32),
    Covered(u32),
    NoRule,
}

/// The generation's settings a packet read (none without a policy), and what decided it.
type Decision = (Option<GenConfig>, Outcome);

/// The reference: the compiled policy's own lookups.
fn reference(c: Option<&Compiled>, dst: IpAddr, proto: Proto, port: u16) -> Decision {
    let Some(c) = c else {
        return (None, Outcome::NoPolicy);
    };
    let outcome = if let Some(i) = c.reserved_for(dst) {
        Outcome::Reserved(i as u32)
    } else {
        match c.addr_entry(dst) {
            None => Outcome::NoRule,
            Some(e) => match c.port_rule(e, proto, port) {
                Some(rule) => Outcome::Rule(rule),
                None => Outcome::Covered(e.icmp_rule),
            },
        }
    };
    (Some(gen_config(c)), outcome)
}

/// What one destination's lookups return in one state (both slots).
#[derive(Clone, Debug, PartialEq, Eq)]
struct AddrObs {
    active: u32,
    config: [GenConfig; 2],
    reserved: [Option<u32>; 2],
    entry: [Option<AddrValue>; 2],
}

fn slot_index(g: u8) -> usize {
    usize::from(g == GEN_B)
}

fn addr_obs(sim: &Sim, dst: IpAddr) -> AddrObs {
    let g = [GEN_A, GEN_B];
    AddrObs {
        active: sim.active,
        config: g.map(|g| sim.config(g)),
        reserved: g.map(|g| sim.reserved(g, dst)),
        entry: g.map(|g| sim.addr(g, dst)),
    }
}

/// What one (protocol, port)'s lookups return in one state: (generation, table) -> rule, where found.
type PortObs = BTreeMap<(u8, u64), u32>;

fn port_obs(sim: &Sim, proto: Proto, port: u16) -> PortObs {
    let mut out = PortObs::new();
    for g in [GEN_A, GEN_B] {
        let tables: BTreeSet<u64> = sim
            .slot(g)
            .ports
            .keys()
            .filter(|k| k.proto == proto.number())
            .map(|k| k.table)
            .collect();
        for t in tables {
            if let Some(rule) = sim.port(g, t, proto.number(), port) {
                out.insert((g, t), rule);
            }
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Partial {
    Start,
    Gen(u8),
    Config(u8, GenConfig),
    /// The address entry read (or none), the reserved blocks still to read.
    Entry(u8, GenConfig, Option<AddrValue>),
    /// Not reserved; the port table to read in `PORTS`.
    Ports(u8, GenConfig, u64, u32),
    Done(Decision),
}

/// After the reserved blocks said no: the address entry's decision, from its inline intervals or, for a
/// table held in `PORTS` only, after reading it there.
fn entry_decision(g: u8, cfg: GenConfig, e: Option<AddrValue>, proto: Proto, port: u16) -> Partial {
    let Some(e) = e else {
        return Partial::Done((Some(cfg), Outcome::NoRule));
    };
    let i = proto_index(proto);
    let n = e.inline_len[i];
    if n == INLINE_IN_PORTS {
        return Partial::Ports(g, cfg, e.port_table[i], e.icmp_rule);
    }
    let rule = e.inline[i]
        .iter()
        .take(n as usize)
        .find(|iv| iv.lo <= port && port <= iv.hi)
        .map(|iv| iv.rule);
    Partial::Done((
        Some(cfg),
        rule.map_or(Outcome::Covered(e.icmp_rule), Outcome::Rule),
    ))
}

/// The next read of a packet in `p`, in a state where its lookups return `a` and `ports`: as the kernel
/// reads them (`ebpf/src/verdict.rs`): the address entry, the reserved blocks only when there is no entry
/// or it is flagged `ADDR_RESERVED_OVERLAP`, then `PORTS` only for a table not held inline.
fn read(p: Partial, a: &AddrObs, ports: &PortObs, proto: Proto, port: u16) -> Partial {
    match p {
        Partial::Start => match u8::try_from(a.active) {
            Ok(g @ (GEN_A | GEN_B)) => Partial::Gen(g),
            _ => Partial::Done((None, Outcome::NoPolicy)),
        },
        Partial::Gen(g) => Partial::Config(g, a.config[slot_index(g)]),
        Partial::Config(g, cfg) => match a.entry[slot_index(g)] {
            Some(e) if e.flags & ADDR_RESERVED_OVERLAP == 0 => {
                entry_decision(g, cfg, Some(e), proto, port)
            }
            e => Partial::Entry(g, cfg, e),
        },
        Partial::Entry(g, cfg, e) => match a.reserved[slot_index(g)] {
            Some(i) => Partial::Done((Some(cfg), Outcome::Reserved(i))),
            None => entry_decision(g, cfg, e, proto, port),
        },
        Partial::Ports(g, cfg, table, icmp) => {
            let rule = (table != 0).then(|| ports.get(&(g, table))).flatten();
            Partial::Done((
                Some(cfg),
                rule.map_or(Outcome::Covered(icmp), |&r| Outcome::Rule(r)),
            ))
        }
        done @ Partial::Done(_) => done,
    }
}

/// Every decision a packet can reach reading a timeline of states in order, possibly delayed between
/// reads. Keeps, per partial result, the earliest state it can be reached at (later reads only go forward).
fn decisions(timeline: &[(&AddrObs, &PortObs)], proto: Proto, port: u16) -> Vec<Decision> {
    let mut set: Vec<(Partial, usize)> = vec![(Partial::Start, 0)];
    for _ in 0..5 {
        let mut next: Vec<(Partial, usize)> = vec![];
        for &(p, t0) in &set {
            for (t, (a, ports)) in timeline.iter().enumerate().skip(t0) {
                let q = read(p, a, ports, proto, port);
                match next.iter_mut().find(|(x, _)| *x == q) {
                    Some(e) => e.1 = e.1.min(t),
                    None => next.push((q, t)),
                }
                if matches!(p, Partial::Done(_)) {
                    break;
                }
            }
        }
        set = next;
    }
    set.into_iter()
        .map(|(p, _)| match p {
            Partial::Done(d) => d,
            other => unreachable!("five reads decide: {other:?}"),
        })
        .collect()
}

struct Probes {
    dsts: Vec<IpAddr>,
    ports: Vec<(Proto, u16)>,
}

/// Every prefix's first and last address, every port-range boundary (and the ports beside it), per
/// protocol, of both policies.
fn probes(old: Option<&Compiled>, new: &Compiled) -> Probes {
    let mut dsts = BTreeSet::from([v4(2000), v6(2000)]);
    let mut ports = BTreeSet::from([1u16, 65535]);
    for c in old.into_iter().chain([new]) {
        let nets = c
            .addr_entries
            .iter()
            .map(|(n, _)| *n)
            .chain(c.reserved.iter().map(|r| r.cidr));
        for n in nets {
            dsts.extend([n.network(), n.broadcast()]);
        }
        for t in &c.port_tables {
            for &(lo, hi, _) in &t.intervals {
                ports.extend([lo, hi, lo.saturating_sub(1).max(1), hi.saturating_add(1)]);
            }
        }
    }
    Probes {
        dsts: dsts.into_iter().collect(),
        ports: ports
            .into_iter()
            .flat_map(|p| Proto::ALL.map(|proto| (proto, p)))
            .collect(),
    }
}

fn op_covers_port(op: &Op, proto: Proto, port: u16) -> bool {
    match op {
        Op::PutPort { key, .. } | Op::DeletePort { key, .. } => {
            let size = 1u32 << (16 - u32::from(key.len));
            key.proto == proto.number()
                && u32::from(port) >= u32::from(key.base)
                && u32::from(port) < u32::from(key.base) + size
        }
        Op::Purge(_) => true,
        _ => false,
    }
}

fn op_covers_addr(op: &Op, dst: IpAddr) -> bool {
    match op {
        Op::PutAddr { net, .. }
        | Op::DeleteAddr { net, .. }
        | Op::PutReserved { net, .. }
        | Op::DeleteReserved { net, .. } => net.contains(&dst),
        Op::SetActive(_) | Op::SetConfig { .. } | Op::Purge(_) => true,
        _ => false,
    }
}

/// Replays `trace` from `start` and checks, between every two barriers, every decision any packet can
/// reach: the old policy's or the new one's.
fn check_trace(start: &Sim, trace: &[Op], old: Option<&Compiled>, new: &Compiled, ctx: &str) {
    let probes = probes(old, new);
    let mut sim = start.clone();
    let mut addr_now: Vec<AddrObs> = probes.dsts.iter().map(|&d| addr_obs(&sim, d)).collect();
    let mut port_now: Vec<PortObs> = probes
        .ports
        .iter()
        .map(|&(p, port)| port_obs(&sim, p, port))
        .collect();
    // Per segment: per destination and per (protocol, port), the states it changed at (index, value).
    let new_segment = |addr_now: &[AddrObs], port_now: &[PortObs]| {
        (
            addr_now
                .iter()
                .map(|a| vec![(0, a.clone())])
                .collect::<Vec<_>>(),
            port_now
                .iter()
                .map(|p| vec![(0, p.clone())])
                .collect::<Vec<_>>(),
        )
    };
    let (mut addr_tl, mut port_tl) = new_segment(&addr_now, &port_now);
    let mut seg_start = 0;
    for (i, op) in trace.iter().enumerate() {
        if *op == Op::Barrier {
            check_segment(
                &probes,
                &addr_tl,
                &port_tl,
                old,
                new,
                &trace[seg_start..i],
                ctx,
            );
            (addr_tl, port_tl) = new_segment(&addr_now, &port_now);
            seg_start = i + 1;
            continue;
        }
        sim.run(op).expect("the simulation does not fail");
        let t = i + 1 - seg_start;
        for (d, &dst) in probes.dsts.iter().enumerate() {
            if op_covers_addr(op, dst) {
                let a = addr_obs(&sim, dst);
                if a != addr_now[d] {
                    addr_tl[d].push((t, a.clone()));
                    addr_now[d] = a;
                }
            }
        }
        for (q, &(proto, port)) in probes.ports.iter().enumerate() {
            if op_covers_port(op, proto, port) {
                let p = port_obs(&sim, proto, port);
                if p != port_now[q] {
                    port_tl[q].push((t, p.clone()));
                    port_now[q] = p;
                }
            }
        }
    }
    check_segment(
        &probes,
        &addr_tl,
        &port_tl,
        old,
        new,
        &trace[seg_start..],
        ctx,
    );
}

type Timeline<T> = Vec<(usize, T)>;

fn check_segment(
    probes: &Probes,
    addr_tl: &[Timeline<AddrObs>],
    port_tl: &[Timeline<PortObs>],
    old: Option<&Compiled>,
    new: &Compiled,
    ops: &[Op],
    ctx: &str,
) {
    for (d, &dst) in probes.dsts.iter().enumerate() {
        for (q, &(proto, port)) in probes.ports.iter().enumerate() {
            let (a, p) = (&addr_tl[d], &port_tl[q]);
            // Unchanged in this segment: its one state was checked as the end of the previous one.
            if a.len() == 1 && p.len() == 1 {
                continue;
            }
            let mut at: Vec<usize> = a.iter().map(|x| x.0).chain(p.iter().map(|x| x.0)).collect();
            at.sort_unstable();
            at.dedup();
            let timeline: Vec<(&AddrObs, &PortObs)> = at
                .iter()
                .map(|&t| {
                    let a = &a.iter().rfind(|x| x.0 <= t).expect("starts at 0").1;
                    let p = &p.iter().rfind(|x| x.0 <= t).expect("starts at 0").1;
                    (a, p)
                })
                .collect();
            let allowed = [
                reference(old, dst, proto, port),
                reference(Some(new), dst, proto, port),
            ];
            for got in decisions(&timeline, proto, port) {
                assert!(
                    allowed.contains(&got),
                    "{ctx}: a packet to {dst} {proto} port {port} can be decided {got:?}; the old policy \
                     decides {:?}, the new one {:?}. Operations between the barriers around it: {ops:#?}",
                    allowed[0],
                    allowed[1]
                );
            }
        }
    }
}

/// Every slot the record claims to know holds exactly that.
fn check_record(sim: &Sim, rec: &Recorded, ctx: &str) {
    for g in [GEN_A, GEN_B] {
        if let Slot::Known(s) = rec.slot(g) {
            let diff = sim.slot(g).differences(s, 5);
            assert!(
                diff.is_empty(),
                "{ctx}: the record of generation {g} is wrong: {diff:?}"
            );
        }
    }
}

/// After a successful apply of `c`: exactly `desired(c)` in the active slot, nothing anywhere else,
/// no counter of a rule the policy does not have.
fn check_final(sim: &Sim, rec: &Recorded, c: &Compiled, ctx: &str) {
    let g = rec.applied.as_ref().expect("applied").generation;
    assert_eq!(sim.active, u32::from(g), "{ctx}: ACTIVE");
    let want = desired(c);
    let diff = sim.slot(g).differences(&want, 8);
    assert!(
        diff.is_empty(),
        "{ctx}: generation {g} differs from a fresh apply: {diff:?}"
    );
    let stale: Vec<_> = sim.normalized().into_keys().filter(|&x| x != g).collect();
    assert!(
        stale.is_empty(),
        "{ctx}: generations {stale:?} still hold entries: {:?}",
        stale.iter().map(|&x| sim.slot(x)).collect::<Vec<_>>()
    );
    let rules = c.rules.len() as u32;
    let bad: Vec<_> = sim
        .counters
        .iter()
        .filter(|&&(cg, r)| cg != g || r > rules)
        .collect();
    assert!(bad.is_empty(), "{ctx}: stale rule counters {bad:?}");
    check_record(sim, rec, ctx);
}

/// Packets pass: the kernel creates a counter for every rule of the active generation.
fn traffic(sim: &mut Sim, c: &Compiled) {
    let g = sim.active as u8;
    for r in 1..=c.rules.len() as u32 {
        sim.counters.insert((g, r));
    }
}

fn op_generation(op: &Op) -> Option<u8> {
    match op {
        Op::SetConfig { generation, .. }
        | Op::PutReserved { generation, .. }
        | Op::PutPort { generation, .. }
        | Op::PutAddr { generation, .. }
        | Op::DeleteAddr { generation, .. }
        | Op::DeleteReserved { generation, .. }
        | Op::DeletePort { generation, .. }
        | Op::DeleteCounters { generation, .. } => Some(*generation),
        Op::PurgeCounters(g) | Op::Purge(g) | Op::SetActive(g) => Some(*g),
        Op::Barrier | Op::NewEpoch => None,
    }
}

/// Every barrier fenced by new epochs, a fence before every flip, and an in-place plan ending with one
/// (`plan::sealed`, `plan::FENCE`): no decision the programs memoized outlives the segment it was made
/// in, and none made under the epoch a plan ends with was made from a state before its last write.
fn check_epochs(ops: &[Op], in_place: bool, ctx: &str) {
    let fenced = |i: usize| i >= 1 && ops.get(i - 1..i + 2) == Some(&FENCE[..]);
    for (i, op) in ops.iter().enumerate() {
        let ok = match op {
            Op::Barrier => fenced(i),
            Op::SetActive(_) => i >= 2 && fenced(i - 2),
            _ => true,
        };
        assert!(
            ok,
            "{ctx}: operation {i} {op:?} not fenced by new epochs: {ops:#?}"
        );
    }
    if in_place && !ops.is_empty() {
        assert!(
            ops.ends_with(&FENCE),
            "{ctx}: the in-place plan does not end with a fence: {ops:#?}"
        );
    }
}

/// The shape every plan must have, whatever the policies: a generation plan empties its slot by reading
/// the maps first, and waits for a barrier between the flip and touching the old slot; an in-place plan
/// goes through its phases in order with a barrier between any two.
fn check_structure(p: &Plan, ctx: &str) {
    let g = p.generation;
    check_epochs(&p.ops, p.kind == PlanKind::Incremental, ctx);
    match p.kind {
        PlanKind::Generation => {
            // A slot that may hold leftovers a packet could still read is purged only after a barrier.
            let first = p
                .ops
                .iter()
                .position(|o| !matches!(o, Op::NewEpoch | Op::Barrier))
                .unwrap_or(0);
            assert!(first == 0 || p.ops[..first].contains(&Op::Barrier), "{ctx}");
            assert_eq!(p.ops.get(first), Some(&Op::Purge(g)), "{ctx}: {:#?}", p.ops);
            let flip = p.flip.expect("a generation plan flips");
            assert_eq!(p.ops[flip], Op::SetActive(g), "{ctx}");
            assert_eq!(
                p.ops[flip + 1..].iter().find(|o| **o != Op::NewEpoch),
                Some(&Op::Barrier),
                "{ctx}: {:#?}",
                p.ops
            );
            for (i, op) in p.ops.iter().enumerate() {
                let want = if i <= flip {
                    Some(g)
                } else {
                    Some(other(Some(g)))
                };
                if let Some(x) = op_generation(op) {
                    assert_eq!(
                        Some(x),
                        want,
                        "{ctx}: operation {i} {op:?} touches the wrong slot"
                    );
                }
            }
        }
        PlanKind::Incremental => {
            let phase = |op: &Op| match op {
                // In place only with the other slot empty: nothing touches it.
                _ if op_generation(op) != Some(g) => {
                    panic!("{ctx}: {op:?} touches the inactive slot in an in-place plan")
                }
                Op::SetConfig { .. } | Op::PutReserved { .. } => 1,
                Op::PutPort { .. } => 2,
                Op::PutAddr { .. } => 3,
                Op::DeleteAddr { .. } => 4,
                Op::DeleteReserved { .. } => 5,
                Op::DeletePort { .. } | Op::DeleteCounters { .. } => 6,
                other => panic!("{ctx}: {other:?} in an in-place plan"),
            };
            let (mut last, mut barrier) = (0, false);
            for (i, op) in p.ops.iter().enumerate() {
                if *op == Op::Barrier {
                    barrier = true;
                    continue;
                }
                if *op == Op::NewEpoch {
                    continue;
                }
                let ph = phase(op);
                assert!(
                    ph >= last,
                    "{ctx}: operation {i} {op:?} (phase {ph}) after phase {last}"
                );
                assert!(
                    ph == last || last == 0 || barrier,
                    "{ctx}: no barrier between phase {last} and phase {ph} (operation {i}): {:#?}",
                    p.ops
                );
                (last, barrier) = (ph, false);
            }
        }
    }
}

/// Injects a failure at operation `at` of `p` (on copies): the old policy must stay, or be restored
/// exactly (in place), and every state on the way decide like the old or the new policy; a failure after
/// the flip leaves the new policy whole, with the old slot's leftovers reported and removed by the next
/// apply.
fn check_failure_at(
    at: usize,
    p: &Plan,
    sim: &Sim,
    rec: &Recorded,
    old: Option<&Compiled>,
    c: &Compiled,
    ctx: &str,
) {
    let ctx = format!("{ctx}, failure injected at operation {at} {:?}", p.ops[at]);
    let (mut s, mut r) = (sim.clone(), rec.clone());
    let t0 = s.trace.len();
    let result = apply_to(&mut s, &mut r, c, Some(at));
    check_trace(sim, &s.trace[t0..], old, c, &ctx);
    check_record(&s, &r, &ctx);
    let before_flip = p.flip.is_none_or(|f| at <= f);
    if before_flip {
        match result {
            Err(DatapathError::ApplyFailed { at: got, .. }) => assert_eq!(got, at, "{ctx}"),
            other => panic!("{ctx}: expected ApplyFailed, got {other:?}"),
        }
        assert_eq!(s.active, sim.active, "{ctx}: ACTIVE changed");
        if let Some(g) = Maps::active(sim).unwrap() {
            let diff = s.slot(g).differences(&sim.slot(g), 8);
            assert!(
                diff.is_empty(),
                "{ctx}: the old policy was not kept exactly: {diff:?}"
            );
        }
        assert_eq!(r.applied, rec.applied, "{ctx}: the recorded policy changed");
        if p.kind == PlanKind::Generation {
            assert!(
                s.slot(p.generation).is_empty(),
                "{ctx}: the partial generation stayed"
            );
        }
    } else {
        let report = result.unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert!(report.stale_entries > 0, "{ctx}: {report:?}");
        assert!(report.stale_reason.is_some(), "{ctx}: {report:?}");
        assert_eq!(s.active, u32::from(p.generation), "{ctx}: not flipped");
        let diff = s.slot(p.generation).differences(&desired(c), 8);
        assert!(diff.is_empty(), "{ctx}: {diff:?}");
    }
    // Whatever the failure left, the next apply ends exactly like a fresh one.
    apply_to(&mut s, &mut r, c, None)
        .unwrap_or_else(|e| panic!("{ctx}: apply after the failure: {e}"));
    check_final(&s, &r, c, &format!("{ctx}, then applied again"));
}

fn run_sequence(r: &mut Rng, steps: usize, ctx: &str, kinds: &mut BTreeMap<&'static str, usize>) {
    let mut sim = Sim::default();
    let mut rec = Recorded::fresh();
    let mut policy: Option<Policy> = None;
    let mut active: Option<Compiled> = None;
    for step in 0..steps {
        let next = match &policy {
            Some(p) if r.chance(80) => mutate(p, r),
            _ => random_policy(r),
        };
        let c = Compiled::new(&next);
        let ctx = format!("{ctx}, step {step}");
        // Both ways the kernel reads an address entry's neighbours must be exercised.
        for v in desired(&c).addr.values() {
            if v.flags & ADDR_RESERVED_OVERLAP != 0 {
                *kinds
                    .entry("entries a reserved block overlaps")
                    .or_default() += 1;
            }
            if v.inline_len.contains(&INLINE_IN_PORTS) {
                *kinds
                    .entry("entries with a table in PORTS only")
                    .or_default() += 1;
            }
        }
        if r.chance(8) {
            // A restarted agent: it knows nothing of the maps it adopts.
            rec = Recorded::unknown();
            *kinds.entry("adopted").or_default() += 1;
        }
        let mut preview = rec.clone();
        preview.active = Maps::active(&sim).unwrap();
        let p = plan(&preview, &c).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        check_structure(&p, &ctx);
        if p.kind == PlanKind::Generation && r.chance(25) {
            // Entries nobody recorded in the slot about to be written (another process, a crash): the
            // plan must find them by reading the maps, not trust the record.
            let junk = desired(&Compiled::new(&random_policy(r)));
            sim.slots.insert(p.generation, junk);
            *kinds.entry("junk in the inactive slot").or_default() += 1;
        }
        if r.chance(15) && p.ops.len() <= 120 {
            for at in 0..p.ops.len() {
                check_failure_at(at, &p, &sim, &preview, active.as_ref(), &c, &ctx);
            }
            *kinds
                .entry("failures injected at every operation")
                .or_default() += 1;
        }
        let start = sim.clone();
        let t0 = sim.trace.len();
        let report =
            apply_to(&mut sim, &mut rec, &c, None).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert_eq!(report.incremental, p.kind == PlanKind::Incremental, "{ctx}");
        assert_eq!(
            &sim.trace[t0..],
            &p.ops[..],
            "{ctx}: apply ran another plan"
        );
        *kinds
            .entry(if report.incremental {
                "incremental"
            } else {
                "generation"
            })
            .or_default() += 1;
        check_trace(&start, &sim.trace[t0..], active.as_ref(), &c, &ctx);
        check_final(&sim, &rec, &c, &ctx);
        traffic(&mut sim, &c);
        policy = Some(next);
        active = Some(c);
    }
}

#[test]
fn every_state_of_every_plan_decides_like_the_old_or_the_new_policy_and_ends_exact() {
    let seed = env_u64("VPCGATE_PLAN_SEED").unwrap_or_else(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x5eed);
        h.finish() | 1
    });
    let sequences = env_u64("VPCGATE_PLAN_SEQUENCES").unwrap_or(12);
    eprintln!(
        "plan model: {sequences} sequences, seed {seed:#x} (replay: VPCGATE_PLAN_SEED={seed:#x})"
    );
    let mut r = Rng(seed);
    let mut kinds = BTreeMap::new();
    for s in 0..sequences {
        run_sequence(
            &mut r,
            12,
            &format!("seed {seed:#x}, sequence {s}"),
            &mut kinds,
        );
    }
    eprintln!("plan model: {kinds:?}");
    for k in [
        "incremental",
        "generation",
        "failures injected at every operation",
        "entries a reserved block overlaps",
        "entries with a table in PORTS only",
    ] {
        assert!(
            kinds.get(k).copied().unwrap_or(0) > 0,
            "no {k} apply in this run: {kinds:?}"
        );
    }
}

/// Applies each policy of `sequence` in turn with every check of the random run, and a failure injected
/// at every operation of every plan.
fn check_sequence(sequence: &[Policy], ctx: &str) {
    let (mut sim, mut rec) = (Sim::default(), Recorded::fresh());
    let mut active: Option<Compiled> = None;
    for (i, p) in sequence.iter().enumerate() {
        let ctx = format!("{ctx}, apply {i}");
        let c = Compiled::new(p);
        let mut preview = rec.clone();
        preview.active = Maps::active(&sim).unwrap();
        let plan = plan(&preview, &c).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        check_structure(&plan, &ctx);
        for at in 0..plan.ops.len() {
            check_failure_at(at, &plan, &sim, &preview, active.as_ref(), &c, &ctx);
        }
        let (start, t0) = (sim.clone(), sim.trace.len());
        apply_to(&mut sim, &mut rec, &c, None).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        check_trace(&start, &sim.trace[t0..], active.as_ref(), &c, &ctx);
        check_final(&sim, &rec, &c, &ctx);
        active = Some(c);
    }
}

fn with_reserved(p: &Policy, blocks: &[&str]) -> Policy {
    let mut p = p.clone();
    p.instance.reserved = blocks
        .iter()
        .map(|b| Reserved {
            cidr: b.parse().unwrap(),
            source: ReservedSource::Explicit,
            pos: Pos::default(),
        })
        .collect();
    p
}

/// A random policy (from `seed`) applied to a fresh simulation, and the plan to a mutation of it.
fn applied_then_planned(seed: u64) -> (Compiled, Compiled, Sim, Recorded, Plan) {
    let mut r = Rng(seed);
    let a = random_policy(&mut r);
    let b = mutate(&a, &mut r);
    let (ca, cb) = (Compiled::new(&a), Compiled::new(&b));
    let mut sim = Sim::default();
    let mut rec = Recorded::fresh();
    apply_to(&mut sim, &mut rec, &ca, None).expect("first apply");
    let p = plan(&rec, &cb).expect("plan");
    (ca, cb, sim, rec, p)
}

/// Every apply, in place or as a generation, and the undo of a failed one, fences its barriers and flips
/// with new policy epochs, and writes to the slot packets read only before a new epoch: what the programs
/// memoized never outlives a segment of a plan.
#[test]
fn every_plan_and_undo_fences_its_barriers_and_flips_with_new_epochs() {
    let (mut incremental, mut generation) = (0, 0);
    for seed in 1..120u64 {
        let (_, cb, sim, rec, p) = applied_then_planned(seed);
        assert!(sim.epoch > 0, "seed {seed}: the first apply wrote no epoch");
        check_epochs(
            &p.ops,
            p.kind == PlanKind::Incremental,
            &format!("seed {seed}"),
        );
        match p.kind {
            PlanKind::Incremental => incremental += 1,
            PlanKind::Generation => generation += 1,
        }
        // A failure at several points: of what ran (the failed plan's prefix, its undo), every write
        // to the slot packets read afterwards is followed by a barrier and then a new epoch, so no memo
        // under the epoch it ended with was made before that write. (A generation plan stopped while
        // emptying the old slot after its flip leaves writes to that slot, which no packet reads, after
        // its last epoch.)
        let n = p.ops.len();
        let mut points = vec![0, n / 4, n / 2, 3 * n / 4, n.saturating_sub(1)];
        points.dedup();
        for at in points {
            let (mut sim, mut rec) = (sim.clone(), rec.clone());
            let t0 = sim.trace.len();
            let _ = apply_to(&mut sim, &mut rec, &cb, Some(at));
            let ran = &sim.trace[t0..];
            let active = sim.active().expect("sim");
            // Whether a barrier, then a new epoch, follow operation `i`.
            let fenced = |i: usize| {
                ran[i..]
                    .iter()
                    .position(|o| *o == Op::Barrier)
                    .is_some_and(|b| ran[i + b..].contains(&Op::NewEpoch))
            };
            for (i, op) in ran.iter().enumerate() {
                if op.is_entry_write() && op_generation(op) == active {
                    assert!(
                        fenced(i),
                        "seed {seed}, failure at {at}: operation {i} {op:?} on the active slot is not fenced: {ran:#?}"
                    );
                }
            }
        }
    }
    assert!(
        incremental > 10 && generation > 10,
        "{incremental} / {generation}"
    );
}

/// Reserved blocks listed first shift every other block's index: a longer new block must be in place
/// before the shorter block around it is re-attributed, and removed after it.
#[test]
fn nested_reserved_blocks_are_added_longest_first_and_removed_shortest_first() {
    let mut base = random_policy(&mut Rng(7));
    base.instance.vswitch_cidr = Some("10.0.0.0/22".parse().unwrap());
    let outer = with_reserved(&base, &["10.0.1.0/24"]);
    let both = with_reserved(&base, &["10.0.1.16/28", "10.0.1.0/24"]);
    let none = with_reserved(&base, &[]);
    check_sequence(&[outer, both.clone(), none, both], "nested reserved blocks");
}

/// Nested address prefixes: new ones are written longest first, removed ones deleted shortest first; a
/// table shared by TCP and UDP survives when only one protocol stops using it.
#[test]
fn nested_prefixes_and_tables_shared_by_both_protocols() {
    let mut r = Rng(11);
    let mut base = random_policy(&mut r);
    base.instance.vswitch_cidr = None;
    base.instance.reserved.clear();
    base.upstreams[0].nodes.clear();
    let net = |s: &str| s.parse::<IpNet>().unwrap();
    let auth = |name: &str, address: &str, proto: Proto| Authorization {
        address: net(address),
        ports: PortSet::from_ranges(vec![(80, 90)]),
        protocol: proto,
        ..authorization(&mut Rng(3), name.into())
    };
    let block = |cidr: &str, protocols: Vec<Proto>| Accessible {
        cidr: net(cidr),
        ports: PortSet::from_ranges(vec![(80, 90)]),
        protocols,
        pos: Pos::default(),
    };
    let mut a = base.clone();
    a.authorizations = vec![
        auth("x", "10.0.1.0/24", Proto::Tcp),
        auth("y", "10.0.1.16/28", Proto::Udp),
    ];
    a.accessible = vec![block("10.0.0.0/22", vec![Proto::Tcp, Proto::Udp])];
    let mut b = a.clone();
    b.authorizations = vec![
        auth("x", "10.0.1.64/26", Proto::Udp),
        auth("y", "10.0.1.64/28", Proto::Tcp),
    ];
    let mut c = b.clone();
    c.accessible = vec![block("10.0.0.0/22", vec![Proto::Udp])];
    check_sequence(&[a.clone(), b, c, a], "nested prefixes");
}

/// An in-place apply fails, and so does undoing it in place: the previous policy comes back as a new
/// generation, verified; when that fails too the error is `RestoreFailed`, and the next apply still ends
/// exactly like a fresh one.
#[test]
fn a_failed_undo_in_place_falls_back_to_a_new_generation_then_to_restore_failed() {
    // A pair of policies the second of which applies in place with a few phases.
    let (ca, cb, sim, rec, p) = (1..200u64)
        .map(applied_then_planned)
        .find(|(.., p)| {
            // Barriers: one between phases, one last.
            let barriers = p.ops.iter().filter(|o| **o == Op::Barrier).count();
            p.kind == PlanKind::Incremental && barriers >= 3
        })
        .expect("an in-place pair");
    let (mut fell_back, mut gave_up) = (0, 0);
    for at in 0..p.ops.len() {
        for k in 0..2 {
            for twice in [false, true] {
                let ctx = format!("failure at {at}, undo failing at its op {k}, twice {twice}");
                let (mut s, mut rc) = (sim.clone(), rec.clone());
                // Operations run before the injected failure: `at`; the undo's k-th fails next.
                s.fail_ops = BTreeSet::from([s.ops_run + at + k]);
                if twice {
                    // ... and the first operation that follows it (the fallback's, or the undo's next).
                    s.fail_ops.insert(s.ops_run + at + k + 1);
                }
                let result = apply_to(&mut s, &mut rc, &cb, Some(at));
                match result {
                    Err(DatapathError::ApplyFailed { outcome, .. }) => {
                        if outcome.contains("as generation") {
                            fell_back += 1;
                        }
                        let g = rc.applied.as_ref().expect("restored").generation;
                        assert_eq!(s.active, u32::from(g), "{ctx}: ACTIVE");
                        let diff = s.slot(g).differences(&desired(&ca), 8);
                        assert!(diff.is_empty(), "{ctx}: not the previous policy: {diff:?}");
                    }
                    Err(DatapathError::RestoreFailed { .. }) => {
                        gave_up += 1;
                        assert!(
                            rc.applied.is_none(),
                            "{ctx}: a failed restore still records a policy"
                        );
                    }
                    other => panic!("{ctx}: {other:?}"),
                }
                s.fail_ops.clear();
                apply_to(&mut s, &mut rc, &cb, None)
                    .unwrap_or_else(|e| panic!("{ctx}: apply after the failures: {e}"));
                check_final(&s, &rc, &cb, &format!("{ctx}, then applied again"));
            }
        }
    }
    assert!(fell_back > 0, "the generation fallback never ran");
    assert!(gave_up > 0, "RestoreFailed never happened");
}
