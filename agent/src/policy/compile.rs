//! The compiled policy: exactly the entries the datapath holds, and the lookups the reference verdict
//! makes over them.
//!
//! An LPM lookup returns only the longest matching prefix, so every address prefix carries everything the
//! rules *covering* it allow (compiled here, once): a port table per protocol, already resolved to the
//! single rule that wins each port. Per packet that leaves two lookups (address prefix, then port), whatever
//! the number of rules.
//!
//! Precedence (DESIGN.md "Verdict" rules 5 then 6): authorizations and upstream nodes before accessible
//! blocks; within each, the longer prefix first; then the order in the file (authorizations before
//! upstream nodes, the vSwitch block before `[[accessible]]`).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use ipnet::IpNet;
use serde::Serialize;

use vpcgate_common::datapath::{limits, names};

use super::{
    model::{FlowTimeouts, HostEssential, Kind, Mode, Policy, Proto, Reserved},
    ports::PortSet,
    source::Pos,
};

/// Rule ids start at 1; 0 means "no rule" in kernel maps.
pub type RuleId = u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    Authorization,
    UpstreamNode,
    Vswitch,
    Accessible,
}

impl RuleKind {
    /// Verdict rule number in DESIGN.md: 5 (authorizations, upstreams) or 6 (accessible blocks).
    pub fn verdict_rule(self) -> u8 {
        match self {
            RuleKind::Authorization | RuleKind::UpstreamNode => 5,
            RuleKind::Vswitch | RuleKind::Accessible => 6,
        }
    }
}

/// One rule of the policy as the datapath sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub id: RuleId,
    pub kind: RuleKind,
    /// The authorization or upstream name; for accessible blocks their CIDR.
    pub name: String,
    pub prefix: IpNet,
    pub protocols: Vec<Proto>,
    pub ports: PortSet,
    pub pos: Pos,
}

impl Rule {
    /// `authorization orders-slb`, `upstream orders_pool node 10.0.3.8:8080`, `accessible 10.1.0.0/16`.
    pub fn describe(&self) -> String {
        match self.kind {
            RuleKind::Authorization => format!("authorization {}", self.name),
            RuleKind::UpstreamNode => format!("upstream {} node {}", self.name, node_addr(self)),
            RuleKind::Vswitch => format!("vswitch block {}", self.prefix),
            RuleKind::Accessible => format!("accessible block {}", self.prefix),
        }
    }
}

fn node_addr(r: &Rule) -> String {
    let port = r.ports.ranges().first().map_or(0, |p| p.0);
    std::net::SocketAddr::new(r.prefix.addr(), port).to_string()
}

/// Ports of one protocol, resolved to the winning rule: sorted, disjoint, inclusive intervals.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct PortTable {
    pub intervals: Vec<(u16, u16, RuleId)>,
}

impl PortTable {
    pub fn lookup(&self, port: u16) -> Option<RuleId> {
        let i = self.intervals.partition_point(|&(_, hi, _)| hi < port);
        self.intervals
            .get(i)
            .filter(|&&(lo, _, _)| lo <= port)
            .map(|&(_, _, r)| r)
    }

    /// Whether every port 1..=65535 is allowed.
    pub fn covers_all(&self) -> bool {
        let mut next = 1u32;
        for &(lo, hi, _) in &self.intervals {
            if u32::from(lo) > next {
                return false;
            }
            next = next.max(u32::from(hi) + 1);
        }
        next > 65535
    }

    /// Kernel port entries this table needs (its prefix blocks).
    pub fn block_count(&self) -> u32 {
        self.intervals
            .iter()
            .map(|&(lo, hi, _)| Self::range_blocks(lo, hi))
            .sum()
    }

    /// How many aligned blocks `lo..=hi` takes.
    pub fn range_blocks(lo: u16, hi: u16) -> u32 {
        let (mut lo, hi) = (u32::from(lo), u32::from(hi));
        let mut n = 0;
        while lo <= hi {
            lo += block_size(lo, hi);
            n += 1;
        }
        n
    }

    /// When every port is allowed: the highest-precedence rule in the table (verdict rule 5 before 6,
    /// then the longer prefix, then file order), which a non-first fragment is attributed to; else 0.
    fn all_ports_rule(&self, rules: &[Rule]) -> RuleId {
        if !self.covers_all() {
            return 0;
        }
        self.intervals
            .iter()
            .map(|&(_, _, id)| {
                let r = &rules[id as usize - 1];
                (
                    r.kind.verdict_rule(),
                    std::cmp::Reverse(r.prefix.prefix_len()),
                    id,
                )
            })
            .min()
            .map_or(0, |k| k.2)
    }

    /// The intervals as (port, prefix length over 16 bits, rule) blocks, for a port LPM trie: a range
    /// needs at most 30 blocks, whatever its width.
    pub fn prefix_blocks(&self) -> Vec<(u16, u8, RuleId)> {
        let mut out = vec![];
        for &(lo, hi, rule) in &self.intervals {
            let (mut lo, hi) = (u32::from(lo), u32::from(hi));
            while lo <= hi {
                let size = block_size(lo, hi);
                out.push((lo as u16, (16 - size.trailing_zeros()) as u8, rule));
                lo += size;
            }
        }
        out
    }
}

/// The largest aligned block starting at `lo` that fits in `lo..=hi`.
fn block_size(lo: u32, hi: u32) -> u32 {
    let mut size = if lo == 0 {
        1 << 16
    } else {
        1u32 << lo.trailing_zeros()
    };
    while lo + size - 1 > hi {
        size >>= 1;
    }
    size
}

/// What an address prefix allows (the value of the address LPM trie).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AddrEntry {
    /// Index into [`Compiled::port_tables`], per protocol (tcp, udp).
    pub port_table: [u32; 2],
    /// The highest-precedence rule covering the address at all: ICMP echo requests are attributed to it.
    pub icmp_rule: RuleId,
    /// Per protocol (tcp, udp): the rule a non-first fragment is attributed to when every port is
    /// allowed (0 when not every port is).
    pub all_ports_rule: [RuleId; 2],
}

/// A longest-prefix-match table over one address family.
#[derive(Clone, Debug)]
pub struct Lpm<T> {
    /// prefix length -> (masked address -> value)
    by_len: BTreeMap<u8, HashMap<u128, T>>,
}

impl<T> Default for Lpm<T> {
    fn default() -> Self {
        Self {
            by_len: BTreeMap::new(),
        }
    }
}

fn bits(addr: IpAddr) -> (u128, u8) {
    match addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

fn mask(value: u128, len: u8, width: u8) -> u128 {
    if len == 0 {
        0
    } else {
        value & (u128::MAX << (width - len)) & (u128::MAX >> (128 - width))
    }
}

impl<T> Lpm<T> {
    pub fn insert(&mut self, net: IpNet, value: T) {
        let (v, width) = bits(net.addr());
        self.by_len
            .entry(net.prefix_len())
            .or_default()
            .insert(mask(v, net.prefix_len(), width), value);
    }

    /// The longest prefix containing `addr` (of this table's family), and its value.
    pub fn lookup(&self, addr: IpAddr) -> Option<(u8, &T)> {
        let (v, width) = bits(addr);
        self.by_len
            .iter()
            .rev()
            .find_map(|(&len, m)| m.get(&mask(v, len, width)).map(|t| (len, t)))
    }

    pub fn len(&self) -> usize {
        self.by_len.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The policy as the datapath holds it.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub mode: Mode,
    /// Host essentials that pass (rule 1).
    pub host_essentials: Vec<HostEssential>,
    pub flow_timeouts: FlowTimeouts,
    /// The ENI's on-link IPv6 prefix (the vSwitch block when it is IPv6): neighbour discovery toward it
    /// passes (rule 1).
    pub onlink6: Option<ipnet::Ipv6Net>,
    pub rules: Vec<Rule>,
    pub reserved: Vec<Reserved>,
    /// Reserved blocks: value is the index into `reserved`.
    pub reserved_v4: Lpm<usize>,
    pub reserved_v6: Lpm<usize>,
    pub addr_v4: Lpm<AddrEntry>,
    pub addr_v6: Lpm<AddrEntry>,
    /// The address entries, as (prefix, entry), for loading into kernel maps.
    pub addr_entries: Vec<(IpNet, AddrEntry)>,
    /// Deduplicated port tables; index 0 is the empty table.
    pub port_tables: Vec<PortTable>,
    /// Entries per kernel map.
    pub counts: EntryCounts,
    /// Steps the compile took building port tables: binary searches, intervals painted, copied and
    /// interned. Bounded by the rules' own port ranges, the prefixes, and the port entries the
    /// kernel holds (each prefix that builds a table builds a new one); tests check that bound.
    pub work: u64,
}

/// The rules of a policy in file order, with ids.
pub fn rules(p: &Policy) -> Vec<Rule> {
    let mut out = vec![];
    let mut push = |kind, name: String, prefix, protocols: Vec<Proto>, ports, pos| {
        let id = out.len() as RuleId + 1;
        out.push(Rule {
            id,
            kind,
            name,
            prefix,
            protocols,
            ports,
            pos,
        });
    };
    for a in &p.authorizations {
        push(
            RuleKind::Authorization,
            a.name.clone(),
            a.address,
            vec![a.protocol],
            a.ports.clone(),
            a.pos,
        );
    }
    for u in &p.upstreams {
        for n in &u.nodes {
            // Upstreams speak HTTP(S): TCP to the node's port.
            push(
                RuleKind::UpstreamNode,
                u.name.clone(),
                IpNet::from(n.address),
                vec![Proto::Tcp],
                PortSet::single(n.port),
                n.pos,
            );
        }
    }
    if p.instance.kind == Kind::VpcIntegration
        && let Some(v) = p.instance.vswitch_cidr
    {
        push(
            RuleKind::Vswitch,
            v.to_string(),
            v,
            Proto::ALL.to_vec(),
            PortSet::all(),
            p.instance.vswitch_pos,
        );
    }
    for a in &p.accessible {
        push(
            RuleKind::Accessible,
            a.cidr.to_string(),
            a.cidr,
            a.protocols.clone(),
            a.ports.clone(),
            a.pos,
        );
    }
    out
}

/// Port intervals resolved to one rule each: sorted, disjoint, inclusive.
type Intervals = Vec<(u16, u16, RuleId)>;

/// The ports of `rules` (one protocol, all at one prefix and of one verdict rule), the first rule in
/// the list winning where they overlap: a sweep over the range ends, O(k log k) for k ranges.
fn paint(rules: &[&Rule], proto: Proto) -> Intervals {
    let rules: Vec<&Rule> = rules
        .iter()
        .copied()
        .filter(|r| r.protocols.contains(&proto))
        .collect();
    if let [r] = rules.as_slice() {
        return r
            .ports
            .ranges()
            .iter()
            .map(|&(lo, hi)| (lo, hi, r.id))
            .collect();
    }
    // (port, starts, rank): ends sort before starts at the same port.
    let mut events: Vec<(u32, bool, usize)> = vec![];
    for (rank, r) in rules.iter().enumerate() {
        for &(lo, hi) in r.ports.ranges() {
            events.push((u32::from(lo), true, rank));
            events.push((u32::from(hi) + 1, false, rank));
        }
    }
    events.sort_unstable();
    let mut active = std::collections::BTreeMap::<usize, u32>::new();
    let mut out: Intervals = vec![];
    let mut i = 0;
    while i < events.len() {
        let at = events[i].0;
        while i < events.len() && events[i].0 == at {
            let (_, start, rank) = events[i];
            if start {
                *active.entry(rank).or_default() += 1;
            } else if let Some(n) = active.get_mut(&rank) {
                *n -= 1;
                if *n == 0 {
                    active.remove(&rank);
                }
            }
            i += 1;
        }
        if let (Some((&rank, _)), Some(&(next, _, _))) = (active.first_key_value(), events.get(i)) {
            push_merged(&mut out, (at as u16, (next - 1) as u16, rules[rank].id));
        }
    }
    out
}

/// Appends an interval, merging it into the last one when the same rule wins both and they touch.
fn push_merged(out: &mut Intervals, (lo, hi, rule): (u16, u16, RuleId)) {
    match out.last_mut() {
        Some(last) if last.2 == rule && u32::from(last.1) + 1 == u32::from(lo) => last.1 = hi,
        _ => out.push((lo, hi, rule)),
    }
}

/// Free port ranges (inclusive, sorted, disjoint) as u32, so that `hi + 1` never overflows.
type Gaps = Vec<(u32, u32)>;

/// Lays `layer` under what `out` already holds: appends the parts of `layer` inside `gaps` to `out`,
/// and returns what stays free, with the steps taken. Each gap costs one binary search, each part one
/// step: the cost is that of the gaps and the output, never of the parts of `layer` that lie under
/// something already taken.
fn fill(gaps: &[(u32, u32)], layer: &[(u16, u16, RuleId)], out: &mut Intervals) -> (Gaps, u64) {
    let mut rest = Gaps::new();
    let mut steps = 0;
    for &(glo, ghi) in gaps {
        let mut i = layer.partition_point(|&(_, hi, _)| u32::from(hi) < glo);
        let mut lo = glo;
        steps += 1;
        while lo <= ghi {
            match layer.get(i) {
                Some(&(l, h, rule)) if u32::from(l) <= ghi => {
                    let (l, h) = (u32::from(l).max(lo), u32::from(h).min(ghi));
                    if l > lo {
                        rest.push((lo, l - 1));
                    }
                    out.push((l as u16, h as u16, rule));
                    lo = h + 1;
                    i += 1;
                    steps += 1;
                }
                _ => {
                    rest.push((lo, ghi));
                    break;
                }
            }
        }
    }
    (rest, steps)
}

/// Whether `runs` (sorted, disjoint, merged) cover all of `lo..=hi`.
fn covers(runs: &[(u32, u32)], lo: u16, hi: u16) -> bool {
    let i = runs.partition_point(|&(_, h)| h < u32::from(lo));
    runs.get(i)
        .is_some_and(|&(l, h)| l <= u32::from(lo) && h >= u32::from(hi))
}

/// A final table split by verdict rule, for building the tables of the prefixes under it.
#[derive(Default)]
struct Split {
    /// Intervals won by authorizations and upstream nodes (verdict rule 5).
    five: Intervals,
    /// Intervals won by accessible blocks (verdict rule 6).
    six: Intervals,
    /// The ports `five` covers, merged into runs.
    five_runs: Gaps,
}

impl Split {
    fn new(t: &PortTable, rules: &[Rule]) -> Self {
        let mut s = Split::default();
        for &iv in &t.intervals {
            if rules[iv.2 as usize - 1].kind.verdict_rule() == 5 {
                s.five.push(iv);
                match s.five_runs.last_mut() {
                    Some(last) if last.1 + 1 == u32::from(iv.0) => last.1 = u32::from(iv.1),
                    _ => s.five_runs.push((u32::from(iv.0), u32::from(iv.1))),
                }
            } else {
                s.six.push(iv);
            }
        }
        s
    }
}

/// The kernel maps' capacities a compile must respect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub rules: u32,
    pub addr_entries: u32,
    pub reserved_entries: u32,
    pub port_entries: u32,
}

impl Limits {
    /// The kernel maps of `vpcgate_common::datapath::limits`.
    pub const KERNEL: Limits = Limits {
        rules: limits::RULES,
        addr_entries: limits::ADDR_ENTRIES,
        reserved_entries: limits::RESERVED_ENTRIES,
        port_entries: limits::PORT_ENTRIES,
    };
    /// No limit: for tests and tools that must build an oversized policy on purpose.
    pub const NONE: Limits = Limits {
        rules: u32::MAX,
        addr_entries: u32::MAX,
        reserved_entries: u32::MAX,
        port_entries: u32::MAX,
    };
}

/// How many entries a compiled policy needs in each kernel map (per generation slot).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EntryCounts {
    pub addr_v4: u32,
    pub addr_v6: u32,
    pub reserved_v4: u32,
    pub reserved_v6: u32,
    pub ports: u32,
    pub rules: u32,
}

impl EntryCounts {
    /// (kernel map, what it holds, entries, capacity) for each map a policy fills.
    pub fn report(&self) -> [(&'static str, &'static str, u32, u32); 6] {
        [
            (
                names::ADDR_V4,
                "IPv4 address prefixes",
                self.addr_v4,
                limits::ADDR_ENTRIES,
            ),
            (
                names::ADDR_V6,
                "IPv6 address prefixes",
                self.addr_v6,
                limits::ADDR_ENTRIES,
            ),
            (
                names::RESERVED_V4,
                "IPv4 reserved blocks",
                self.reserved_v4,
                limits::RESERVED_ENTRIES,
            ),
            (
                names::RESERVED_V6,
                "IPv6 reserved blocks",
                self.reserved_v6,
                limits::RESERVED_ENTRIES,
            ),
            (
                names::PORTS,
                "port blocks of the port tables",
                self.ports,
                limits::PORT_ENTRIES,
            ),
            (
                names::RULE_STATS,
                "rules (per-rule counters)",
                self.rules,
                limits::RULES,
            ),
        ]
    }
}

/// A policy that the kernel maps cannot hold: which map, where in the file, and what to change.
/// Nothing of it is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapacityError {
    /// The kernel map (`names::*`).
    pub map: &'static str,
    pub capacity: u64,
    /// Entries needed; with `at_least`, the compile stopped there.
    pub needed: u64,
    pub at_least: bool,
    pub pos: Pos,
    pub message: String,
    pub fix: String,
}

/// The address prefixes of the rules as a forest (each prefix under the longest other one containing it),
/// parents before children: (prefix, parent index).
fn prefix_forest(rules: &[Rule]) -> Vec<(IpNet, Option<usize>)> {
    let mut prefixes: Vec<IpNet> = rules.iter().map(|r| r.prefix).collect();
    let key = |n: &IpNet| (n.addr().is_ipv6(), bits(n.network()).0, n.prefix_len());
    prefixes.sort_by_key(key);
    prefixes.dedup();
    let mut out: Vec<(IpNet, Option<usize>)> = Vec::with_capacity(prefixes.len());
    let mut stack: Vec<usize> = vec![];
    for (i, p) in prefixes.into_iter().enumerate() {
        while let Some(&top) = stack.last() {
            let q: &IpNet = &out[top].0;
            if q.contains(&p) && q.addr().is_ipv4() == p.addr().is_ipv4() {
                break;
            }
            stack.pop();
        }
        out.push((p, stack.last().copied()));
        stack.push(i);
    }
    out
}

/// The compile's state while it walks the forest: port tables built so far, the work done, entries
/// counted against the limits, and who they are owed to.
struct Builder<'a> {
    rules: &'a [Rule],
    limits: Limits,
    /// Steps taken building port tables (see [`Compiled::work`]).
    work: u64,
    port_tables: Vec<PortTable>,
    /// Each final table split by verdict rule, computed once.
    splits: Vec<Split>,
    table_ids: HashMap<PortTable, u32>,
    /// Kernel port entries of each final table, computed once.
    blocks: Vec<u32>,
    /// (final table, protocol) pairs already counted.
    counted: std::collections::HashSet<(u32, usize)>,
    port_entries: u64,
    /// Per prefix compiled so far: the kernel port entries its own rules take in its tables.
    own_entries: Vec<u64>,
    forest: &'a [(IpNet, Option<usize>)],
    /// Per prefix: how many longer prefixes lie under it.
    under: Vec<usize>,
    /// Prefixes compiled so far.
    done: usize,
}

impl Builder<'_> {
    /// The final table `t` for protocol `proto`, deduplicated, counted against the port capacity.
    fn intern(&mut self, t: Intervals, proto: usize) -> Result<u32, CapacityError> {
        self.work += t.len() as u64;
        let table = PortTable { intervals: t };
        let id = match self.table_ids.get(&table) {
            Some(&id) => id,
            None => {
                let id = self.port_tables.len() as u32;
                self.blocks.push(table.block_count());
                self.splits.push(Split::new(&table, self.rules));
                self.table_ids.insert(table.clone(), id);
                self.port_tables.push(table);
                id
            }
        };
        if id != 0 && self.counted.insert((id, proto)) {
            self.port_entries += u64::from(self.blocks[id as usize]);
            if self.port_entries > u64::from(self.limits.port_entries) {
                return Err(self.overflow(u64::from(self.limits.port_entries), self.port_entries));
            }
        }
        Ok(id)
    }

    /// The error for a compile stopped at `needed` (> `capacity`) port entries, naming the prefixes
    /// whose rules own the most entries, and how many longer prefixes under them repeat their ports.
    fn overflow(&self, capacity: u64, needed: u64) -> CapacityError {
        // The prefixes compiled so far, by the entries their rules cost: their own, times the longer
        // prefixes under them that repeat them.
        let cost = |i: usize| self.own_entries[i] * (1 + self.under[i] as u64);
        let mut top: Vec<usize> = (0..self.own_entries.len())
            .filter(|&i| self.own_entries[i] > 0)
            .collect();
        top.sort_by_key(|&i| (std::cmp::Reverse(cost(i)), i));
        let multiplies = top.first().is_some_and(|&i| self.under[i] > 0);
        if multiplies {
            top.retain(|&i| self.under[i] > 0);
        }
        top.truncate(3);
        // Each named prefix's first rule (file order) and how many rules it has.
        let at = |i: usize| {
            let mut rules = self.rules.iter().filter(|r| r.prefix == self.forest[i].0);
            let first = rules.next().expect("a prefix of the forest has a rule");
            (first, 1 + rules.count())
        };
        let named: Vec<String> = top
            .iter()
            .map(|&i| {
                let (r, count) = at(i);
                let net = self.forest[i].0;
                let rules = if count == 1 {
                    format!("{} (line {})", r.describe(), r.pos.line)
                } else {
                    format!(
                        "{count} rules ({}, line {}, and {} more)",
                        r.describe(),
                        r.pos.line,
                        count - 1
                    )
                };
                format!(
                    "{net}: {rules} whose ports take {} entries, repeated for each of the {} longer \
                     prefixes under {net} (about {} entries)",
                    self.own_entries[i],
                    self.under[i],
                    cost(i)
                )
            })
            .collect();
        let what = format!(
            "the policy needs more than {capacity} entries in kernel map {} (port tables): the \
             compile stopped at {needed}, {} of {} address prefixes in",
            names::PORTS,
            self.done,
            self.forest.len()
        );
        let fix = if multiplies {
            "each address prefix carries the ports of every rule covering it, so the port ranges of \
             a wide block are repeated for each longer prefix under it: give the wide rules fewer port \
             ranges (one range instead of many), fold the longer prefixes' ports into the wide rules, \
             or move those rules out from under the wide block"
        } else {
            "each rule's port ranges take up to 30 entries (ranges aligned to powers of two take \
             fewest; single ports take 1): use fewer or wider port ranges, or merge neighbouring \
             addresses into one block"
        };
        CapacityError {
            map: names::PORTS,
            capacity,
            needed,
            at_least: true,
            pos: top
                .first()
                .map_or(Pos { line: 1, column: 1 }, |&i| at(i).0.pos),
            message: if multiplies {
                format!("{what}; most entries come from {}", named.join("; "))
            } else {
                let per = self.port_entries as f64 / self.done.max(1) as f64;
                format!(
                    "{what}; each prefix has its own port table, {per:.1} entries on average so far, \
                     about {:.0} for all {} prefixes (first: {})",
                    per * self.forest.len() as f64,
                    self.forest.len(),
                    top.first().map_or_else(String::new, |&i| {
                        let r = at(i).0;
                        format!("{}, line {}", r.describe(), r.pos.line)
                    })
                )
            },
            fix: fix.into(),
        }
    }
}

/// A policy with more `what` than `map` holds; `pos` is where the first one beyond capacity is.
fn too_many(what: &str, map: &'static str, limit: u32, needed: usize, pos: Pos) -> CapacityError {
    CapacityError {
        map,
        capacity: u64::from(limit),
        needed: needed as u64,
        at_least: false,
        pos,
        message: format!(
            "the policy has {needed} {what}, but kernel map {map} holds {limit} (this is entry {})",
            u64::from(limit) + 1
        ),
        fix: format!("at most {limit} {what} fit: merge neighbouring ones into wider blocks"),
    }
}

impl Compiled {
    /// The policy compiled without capacity limits (tests and tools; the datapath still refuses what
    /// does not fit).
    pub fn new(p: &Policy) -> Self {
        Self::with_limits(p, Limits::NONE).expect("no limits")
    }

    /// The policy compiled as `run` applies it: refused, early and with the rules to change, when it
    /// would not fit the kernel maps. Time and memory are bounded by the input and the output.
    pub fn with_limits(p: &Policy, limits: Limits) -> Result<Self, CapacityError> {
        let rules = rules(p);
        if rules.len() > limits.rules as usize {
            let first_over = &rules[limits.rules as usize];
            return Err(too_many(
                "rules (authorizations, upstream nodes, vSwitch and accessible blocks)",
                names::RULE_STATS,
                limits.rules,
                rules.len(),
                first_over.pos,
            ));
        }
        let (mut reserved_v4, mut reserved_v6) = (Lpm::default(), Lpm::default());
        // The same block listed twice (by the zone and explicitly) is attributed to its first listing.
        for (i, r) in p.instance.reserved.iter().enumerate().rev() {
            match r.cidr {
                IpNet::V4(_) => reserved_v4.insert(r.cidr, i),
                IpNet::V6(_) => reserved_v6.insert(r.cidr, i),
            }
        }
        for (lpm, map) in [
            (&reserved_v4, names::RESERVED_V4),
            (&reserved_v6, names::RESERVED_V6),
        ] {
            if lpm.len() > limits.reserved_entries as usize {
                // The listing that holds the first block beyond capacity (in file order).
                let mut seen = std::collections::HashSet::new();
                let over = p
                    .instance
                    .reserved
                    .iter()
                    .filter(|r| (map == names::RESERVED_V4) == r.cidr.addr().is_ipv4())
                    .filter(|r| seen.insert(r.cidr))
                    .nth(limits.reserved_entries as usize)
                    .map_or(Pos { line: 1, column: 1 }, |r| r.pos);
                let what = if map == names::RESERVED_V4 {
                    "distinct IPv4 reserved blocks"
                } else {
                    "distinct IPv6 reserved blocks"
                };
                return Err(too_many(
                    what,
                    map,
                    limits.reserved_entries,
                    lpm.len(),
                    over,
                ));
            }
        }

        let forest = prefix_forest(&rules);
        let mut own: Vec<[Vec<&Rule>; 2]> = vec![[vec![], vec![]]; forest.len()];
        {
            let index: HashMap<IpNet, usize> = forest
                .iter()
                .enumerate()
                .map(|(i, (n, _))| (*n, i))
                .collect();
            for r in &rules {
                own[index[&r.prefix]][usize::from(r.kind.verdict_rule() == 6)].push(r);
            }
        }
        let mut b = Builder {
            rules: &rules,
            limits,
            work: 0,
            port_tables: vec![PortTable::default()],
            splits: vec![Split::default()],
            table_ids: HashMap::from([(PortTable::default(), 0)]),
            blocks: vec![0],
            counted: Default::default(),
            port_entries: 0,
            own_entries: Vec::with_capacity(forest.len()),
            forest: &forest,
            under: {
                let mut under = vec![0usize; forest.len()];
                for (i, &(_, parent)) in forest.iter().enumerate().rev() {
                    if let Some(j) = parent {
                        under[j] += under[i] + 1;
                    }
                }
                under
            },
            done: 0,
        };
        // Per prefix: its final table per protocol, and the highest-precedence rule of each verdict
        // rule covering it (for ICMP).
        struct Node {
            table: [u32; 2],
            best: [RuleId; 2],
        }
        let mut nodes: Vec<Node> = Vec::with_capacity(forest.len());
        let (mut addr_v4, mut addr_v6) = (Lpm::default(), Lpm::default());
        let mut addr_entries = Vec::with_capacity(forest.len());
        let mut all_ports: HashMap<(u32, usize), RuleId> = HashMap::new();
        for (i, &(prefix, parent)) in forest.iter().enumerate() {
            b.done = i;
            let up = parent.map(|j| &nodes[j]);
            let mut node = Node {
                table: [0; 2],
                best: [0; 2],
            };
            for (class, mine) in own[i].iter().enumerate() {
                let inherited = up.map_or(0, |u| u.best[class]);
                node.best[class] = mine.first().map_or(inherited, |r| r.id);
            }
            for proto in Proto::ALL {
                let pi = proto_index(proto);
                let [five, six] = [&own[i][0], &own[i][1]].map(|r| paint(r, proto));
                b.work += (five.len() + six.len()) as u64;
                let above = up.map_or(0, |u| u.table[pi]) as usize;
                let split = &b.splits[above];
                // This prefix's rules win no port here (none of this protocol, or accessible blocks
                // entirely under authorizations above): the same table as the prefix above. Otherwise
                // the table is new (it holds a rule of this prefix), so building it costs what the
                // kernel will hold. Precedence: this prefix's authorizations, those above, this
                // prefix's accessible blocks, those above.
                if five.is_empty()
                    && six
                        .iter()
                        .all(|&(lo, hi, _)| covers(&split.five_runs, lo, hi))
                {
                    node.table[pi] = above as u32;
                    continue;
                }
                let mut table = Intervals::new();
                let mut gaps: Gaps = vec![(0, 65535)];
                for layer in [&five, &split.five, &six, &split.six] {
                    if gaps.is_empty() {
                        break;
                    }
                    let (rest, steps) = fill(&gaps, layer, &mut table);
                    b.work += steps;
                    gaps = rest;
                }
                table.sort_unstable();
                let mut merged = Intervals::with_capacity(table.len());
                for iv in table {
                    push_merged(&mut merged, iv);
                }
                node.table[pi] = b.intern(merged, pi)?;
            }
            // What this prefix's own rules cost in its tables (for naming them if the policy does not fit).
            let own_entries: u64 = node
                .table
                .iter()
                .filter(|&&t| up.is_none_or(|u| !u.table.contains(&t)))
                .flat_map(|&t| &b.port_tables[t as usize].intervals)
                .filter(|&&(_, _, id)| rules[id as usize - 1].prefix == prefix)
                .map(|&(lo, hi, _)| u64::from(PortTable::range_blocks(lo, hi)))
                .sum();
            b.own_entries.push(own_entries);
            let all_ports_rule = [0, 1].map(|pi| {
                let t = node.table[pi];
                *all_ports
                    .entry((t, pi))
                    .or_insert_with(|| b.port_tables[t as usize].all_ports_rule(&rules))
            });
            let entry = AddrEntry {
                port_table: node.table,
                icmp_rule: if node.best[0] != 0 {
                    node.best[0]
                } else {
                    node.best[1]
                },
                all_ports_rule,
            };
            match prefix {
                IpNet::V4(_) => addr_v4.insert(prefix, entry.clone()),
                IpNet::V6(_) => addr_v6.insert(prefix, entry.clone()),
            }
            addr_entries.push((prefix, entry));
            nodes.push(node);
        }
        for (lpm, map) in [
            (addr_v4.len(), names::ADDR_V4),
            (addr_v6.len(), names::ADDR_V6),
        ] {
            if lpm > limits.addr_entries as usize {
                return Err(too_many(
                    "distinct address prefixes",
                    map,
                    limits.addr_entries,
                    lpm,
                    Pos { line: 1, column: 1 },
                ));
            }
        }
        let counts = EntryCounts {
            addr_v4: addr_v4.len() as u32,
            addr_v6: addr_v6.len() as u32,
            reserved_v4: reserved_v4.len() as u32,
            reserved_v6: reserved_v6.len() as u32,
            ports: b.port_entries as u32,
            rules: rules.len() as u32,
        };
        let (port_tables, work) = (b.port_tables, b.work);
        let mut host_essentials = p.instance.host_essentials.clone();
        host_essentials.sort();
        host_essentials.dedup();
        Ok(Compiled {
            mode: p.instance.mode,
            host_essentials,
            flow_timeouts: p.instance.flow_timeouts,
            onlink6: match p.instance.vswitch_cidr {
                Some(IpNet::V6(n)) => Some(n),
                _ => None,
            },
            rules,
            reserved: p.instance.reserved.clone(),
            reserved_v4,
            reserved_v6,
            addr_v4,
            addr_v6,
            addr_entries,
            port_tables,
            counts,
            work,
        })
    }

    pub fn rule(&self, id: RuleId) -> Option<&Rule> {
        id.checked_sub(1).and_then(|i| self.rules.get(i as usize))
    }

    /// Index into `reserved` of the longest reserved block containing `dst`.
    pub fn reserved_for(&self, dst: IpAddr) -> Option<usize> {
        let lpm = if dst.is_ipv4() {
            &self.reserved_v4
        } else {
            &self.reserved_v6
        };
        lpm.lookup(dst).map(|(_, &i)| i)
    }

    pub fn addr_entry(&self, dst: IpAddr) -> Option<&AddrEntry> {
        let lpm = if dst.is_ipv4() {
            &self.addr_v4
        } else {
            &self.addr_v6
        };
        lpm.lookup(dst).map(|(_, e)| e)
    }

    pub fn port_rule(&self, entry: &AddrEntry, proto: Proto, port: u16) -> Option<RuleId> {
        let t = entry.port_table[proto_index(proto)] as usize;
        self.port_tables[t].lookup(port)
    }
}

pub fn proto_index(p: Proto) -> usize {
    match p {
        Proto::Tcp => 0,
        Proto::Udp => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_blocks_cover_exactly_the_intervals() {
        let t = PortTable {
            intervals: vec![
                (1, 1, 1),
                (80, 80, 2),
                (1024, 7999, 4),
                (8000, 8100, 3),
                (8101, 65535, 4),
            ],
        };
        let blocks = t.prefix_blocks();
        for port in 0..=65535u16 {
            // The block containing `port`, if any (blocks are disjoint).
            let hit: Vec<RuleId> = blocks
                .iter()
                .filter(|&&(base, len, _)| {
                    let size = 1u32 << (16 - len);
                    u32::from(port) >= u32::from(base) && u32::from(port) < u32::from(base) + size
                })
                .map(|b| b.2)
                .collect();
            let want = t.lookup(port);
            assert_eq!(hit.first().copied(), want, "port {port}");
            assert!(hit.len() <= 1, "port {port} in {} blocks", hit.len());
        }
        // A range needs at most 2 * 15 aligned blocks.
        assert!(blocks.len() <= 2 + 3 * 30, "{blocks:?}");
    }

    #[test]
    fn covers_all_needs_every_port() {
        assert!(
            PortTable {
                intervals: vec![(1, 100, 1), (101, 65535, 2)]
            }
            .covers_all()
        );
        assert!(
            !PortTable {
                intervals: vec![(1, 100, 1), (102, 65535, 2)]
            }
            .covers_all()
        );
        assert!(
            !PortTable {
                intervals: vec![(2, 65535, 1)]
            }
            .covers_all()
        );
        assert!(!PortTable::default().covers_all());
    }

    #[test]
    fn lpm_returns_the_longest_prefix() {
        let mut l = Lpm::default();
        l.insert("10.0.0.0/8".parse().unwrap(), 'a');
        l.insert("10.1.0.0/16".parse().unwrap(), 'b');
        l.insert("0.0.0.0/0".parse().unwrap(), 'z');
        assert_eq!(l.lookup("10.1.2.3".parse().unwrap()), Some((16, &'b')));
        assert_eq!(l.lookup("10.2.2.3".parse().unwrap()), Some((8, &'a')));
        assert_eq!(l.lookup("11.0.0.1".parse().unwrap()), Some((0, &'z')));
        let mut l6 = Lpm::default();
        l6.insert("fd00::/8".parse().unwrap(), 1);
        l6.insert("fd00:1::7/128".parse().unwrap(), 2);
        assert_eq!(l6.lookup("fd00:1::7".parse().unwrap()), Some((128, &2)));
        assert_eq!(l6.lookup("fd00:1::8".parse().unwrap()), Some((8, &1)));
        assert_eq!(l6.lookup("fe80::1".parse().unwrap()), None);
    }
}
