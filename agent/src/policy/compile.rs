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

    /// The intervals as (port, prefix length over 16 bits, rule) blocks, for a port LPM trie: a range
    /// needs at most 30 blocks, whatever its width.
    pub fn prefix_blocks(&self) -> Vec<(u16, u8, RuleId)> {
        let mut out = vec![];
        for &(lo, hi, rule) in &self.intervals {
            let (mut lo, hi) = (u32::from(lo), u32::from(hi));
            while lo <= hi {
                // Largest aligned block starting at lo that fits in [lo, hi].
                let mut size = if lo == 0 {
                    1 << 16
                } else {
                    1u32 << lo.trailing_zeros()
                };
                while lo + size - 1 > hi {
                    size >>= 1;
                }
                out.push((lo as u16, (16 - size.trailing_zeros()) as u8, rule));
                lo += size;
            }
        }
        out
    }
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
}

/// Precedence key: lower sorts first.
fn precedence(r: &Rule, order: usize) -> (u8, std::cmp::Reverse<u8>, usize) {
    (
        r.kind.verdict_rule(),
        std::cmp::Reverse(r.prefix.prefix_len()),
        order,
    )
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

fn port_table(covering: &[&Rule], proto: Proto) -> PortTable {
    // Paint each rule's ports, in precedence order, onto the ports no earlier rule took.
    let mut taken: Vec<(u16, u16, RuleId)> = vec![];
    for r in covering.iter().filter(|r| r.protocols.contains(&proto)) {
        for &(lo, hi) in r.ports.ranges() {
            let mut gaps = vec![(u32::from(lo), u32::from(hi))];
            for &(tlo, thi, _) in &taken {
                gaps = gaps
                    .into_iter()
                    .flat_map(|(glo, ghi)| {
                        let (tlo, thi) = (u32::from(tlo), u32::from(thi));
                        let mut parts = vec![];
                        if glo < tlo {
                            parts.push((glo, ghi.min(tlo - 1)));
                        }
                        if ghi > thi {
                            parts.push((glo.max(thi + 1), ghi));
                        }
                        if thi < glo || tlo > ghi {
                            vec![(glo, ghi)]
                        } else {
                            parts
                        }
                    })
                    .collect();
            }
            taken.extend(gaps.into_iter().map(|(a, b)| (a as u16, b as u16, r.id)));
        }
    }
    taken.sort_unstable();
    // Merge neighbours that the same rule wins.
    let mut intervals: Vec<(u16, u16, RuleId)> = vec![];
    for (lo, hi, r) in taken {
        match intervals.last_mut() {
            Some(last) if last.2 == r && u32::from(last.1) + 1 == u32::from(lo) => last.1 = hi,
            _ => intervals.push((lo, hi, r)),
        }
    }
    PortTable { intervals }
}

impl Compiled {
    pub fn new(p: &Policy) -> Self {
        let rules = rules(p);
        // Rules by exact prefix: the rules covering a prefix are found by walking its shorter prefixes
        // (at most 33 or 129 lookups), not by scanning every rule.
        let mut by_prefix: HashMap<IpNet, Vec<usize>> = HashMap::new();
        for (i, r) in rules.iter().enumerate() {
            by_prefix.entry(r.prefix).or_default().push(i);
        }

        let mut port_tables = vec![PortTable::default()];
        let mut table_ids: HashMap<PortTable, u32> = HashMap::from([(PortTable::default(), 0)]);
        let mut intern = |t: PortTable| -> u32 {
            *table_ids.entry(t.clone()).or_insert_with(|| {
                port_tables.push(t);
                (port_tables.len() - 1) as u32
            })
        };
        let mut prefixes: Vec<IpNet> = rules.iter().map(|r| r.prefix).collect();
        prefixes.sort();
        prefixes.dedup();
        let (mut addr_v4, mut addr_v6) = (Lpm::default(), Lpm::default());
        let mut addr_entries = vec![];
        for prefix in prefixes {
            let mut covering: Vec<(usize, &Rule)> = (0..=prefix.prefix_len())
                .filter_map(|len| IpNet::new(prefix.addr(), len).ok().map(|n| n.trunc()))
                .filter_map(|n| by_prefix.get(&n))
                .flatten()
                .map(|&i| (i, &rules[i]))
                .collect();
            covering.sort_by_key(|(i, r)| precedence(r, *i));
            let covering: Vec<&Rule> = covering.into_iter().map(|(_, r)| r).collect();
            let tables = Proto::ALL.map(|proto| port_table(&covering, proto));
            let all_ports_rule = tables.clone().map(|t| {
                if t.covers_all() {
                    // The highest-precedence rule that contributes to the table.
                    covering
                        .iter()
                        .find(|r| t.intervals.iter().any(|i| i.2 == r.id))
                        .map_or(0, |r| r.id)
                } else {
                    0
                }
            });
            let entry = AddrEntry {
                port_table: tables.map(&mut intern),
                icmp_rule: covering.first().map_or(0, |r| r.id),
                all_ports_rule,
            };
            match prefix {
                IpNet::V4(_) => addr_v4.insert(prefix, entry.clone()),
                IpNet::V6(_) => addr_v6.insert(prefix, entry.clone()),
            }
            addr_entries.push((prefix, entry));
        }
        let (mut reserved_v4, mut reserved_v6) = (Lpm::default(), Lpm::default());
        // The same block listed twice (by the zone and explicitly) is attributed to its first listing.
        for (i, r) in p.instance.reserved.iter().enumerate().rev() {
            match r.cidr {
                IpNet::V4(_) => reserved_v4.insert(r.cidr, i),
                IpNet::V6(_) => reserved_v6.insert(r.cidr, i),
            }
        }
        let mut host_essentials = p.instance.host_essentials.clone();
        host_essentials.sort();
        host_essentials.dedup();
        Compiled {
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
        }
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
