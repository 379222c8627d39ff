//! The kernel state of a policy generation, as data: what a compiled policy should leave in one generation
//! slot (`desired`), and what this process knows each slot holds (`Recorded`).
//!
//! Keys carry no generation byte here: a `GenState` describes one slot, whichever it is.

use std::collections::BTreeMap;

use ipnet::IpNet;
use vpcgate_common::datapath::{
    ADDR_RESERVED_OVERLAP, AddrValue, ESSENTIAL_DHCP, ESSENTIAL_MLD, GEN_A, GEN_B, GenConfig,
    INLINE_IN_PORTS, INLINE_PORTS, MODE_AUDIT, MODE_ENFORCE, PortInterval,
};

use crate::policy::{
    compile::{Compiled, PortTable, RuleId, RuleKind},
    model::{HostEssential, Mode, Proto},
    validate::ReservedIndex,
};

/// One block of a port table in the `PORTS` trie: table id, IP protocol number, port prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    pub table: u64,
    pub proto: u8,
    pub base: u16,
    /// Port prefix bits, 0..=16.
    pub len: u8,
}

/// Everything one generation slot holds in the policy maps.
///
/// Rule counters (`RULE_COUNTERS`, `RULE_STATS`) are not part of it: the kernel counts as packets pass.
/// A slot's counters are valid when no rule id above its policy's rule count has a non-zero one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GenState {
    /// `GEN_CONFIG[generation]` (all zero in an empty slot).
    pub config: GenConfig,
    /// `ADDR_V4` / `ADDR_V6`.
    pub addr: BTreeMap<IpNet, AddrValue>,
    /// `RESERVED_V4` / `RESERVED_V6`: index of the reserved block's first listing.
    pub reserved: BTreeMap<IpNet, u32>,
    /// `PORTS`: the rule each block resolves to.
    pub ports: BTreeMap<PortKey, RuleId>,
}

impl GenState {
    /// Policy-map entries (addresses, reserved blocks, port blocks).
    pub fn entries(&self) -> u32 {
        (self.addr.len() + self.reserved.len() + self.ports.len()) as u32
    }

    pub fn is_empty(&self) -> bool {
        *self == GenState::default()
    }

    /// The first differences between `self` (what is) and `want`, for errors and test failures.
    pub fn differences(&self, want: &GenState, limit: usize) -> Vec<String> {
        let mut out = vec![];
        if self.config != want.config {
            out.push(format!(
                "GEN_CONFIG is {:?}, expected {:?}",
                self.config, want.config
            ));
        }
        diff_maps(&mut out, "address", &self.addr, &want.addr);
        diff_maps(&mut out, "reserved", &self.reserved, &want.reserved);
        diff_maps(&mut out, "port block", &self.ports, &want.ports);
        out.truncate(limit);
        out
    }
}

fn diff_maps<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
    out: &mut Vec<String>,
    what: &str,
    is: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
) {
    for (k, v) in is {
        match want.get(k) {
            None => out.push(format!("{what} {k:?} = {v:?} should not be there")),
            Some(w) if w != v => out.push(format!("{what} {k:?} is {v:?}, expected {w:?}")),
            Some(_) => {}
        }
    }
    for (k, w) in want {
        if !is.contains_key(k) {
            out.push(format!("{what} {k:?} = {w:?} is missing"));
        }
    }
}

/// What this process knows one slot holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Exactly these entries (every write and delete since they were known went through the executor).
    Known(GenState),
    /// Not known (maps adopted from another process, or an operation failed in a way that leaves doubt):
    /// found by iterating the maps.
    Unknown,
}

/// The policy this process applied, active in `generation`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub generation: u8,
    /// Rule identities in id order: an incremental apply needs every surviving rule to keep its id.
    pub identities: Vec<(RuleKind, String)>,
    /// What the slot holds when the policy is applied (what a failed incremental apply restores).
    pub target: GenState,
}

/// What this process believes about the policy maps. Every change goes through the executor, which
/// updates it operation by operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    slots: [Slot; 2],
    /// `ACTIVE`, as last read or written.
    pub active: Option<u8>,
    pub applied: Option<Applied>,
}

impl Recorded {
    /// Maps just created by a load: both slots empty, no policy.
    pub fn fresh() -> Self {
        Self {
            slots: [
                Slot::Known(GenState::default()),
                Slot::Known(GenState::default()),
            ],
            active: None,
            applied: None,
        }
    }

    /// Maps of unknown content (adopted): everything is found by reading them.
    pub fn unknown() -> Self {
        Self {
            slots: [Slot::Unknown, Slot::Unknown],
            active: None,
            applied: None,
        }
    }

    pub fn slot(&self, generation: u8) -> &Slot {
        &self.slots[slot_index(generation)]
    }

    pub fn slot_mut(&mut self, generation: u8) -> &mut Slot {
        &mut self.slots[slot_index(generation)]
    }
}

fn slot_index(generation: u8) -> usize {
    match generation {
        GEN_A => 0,
        GEN_B => 1,
        g => unreachable!("generation {g} is not a slot"),
    }
}

/// The slot that is not `generation` (with no active generation, `GEN_A` is written first).
pub fn other(generation: Option<u8>) -> u8 {
    if generation == Some(GEN_A) {
        GEN_B
    } else {
        GEN_A
    }
}

/// Rule identities of a compiled policy, in id order: kind and name; an upstream node also by its
/// address and port (every node of an upstream shares the name, and its counters must not pass to
/// another node).
pub fn identities(c: &Compiled) -> Vec<(RuleKind, String)> {
    c.rules
        .iter()
        .map(|r| match r.kind {
            RuleKind::UpstreamNode => (r.kind, r.describe()),
            _ => (r.kind, r.name.clone()),
        })
        .collect()
}

/// The kernel's per-generation settings for a compiled policy.
pub fn gen_config(c: &Compiled) -> GenConfig {
    let host_essentials = c
        .host_essentials
        .iter()
        .map(|e| match e {
            HostEssential::Dhcp => ESSENTIAL_DHCP,
            HostEssential::Mld => ESSENTIAL_MLD,
        })
        .fold(0, |a, b| a | b);
    let (onlink6, onlink6_len) = match c.onlink6 {
        Some(n) => (n.network().octets(), u32::from(n.prefix_len())),
        None => ([0; 16], 0),
    };
    GenConfig {
        mode: match c.mode {
            Mode::Enforce => MODE_ENFORCE,
            Mode::Audit => MODE_AUDIT,
        },
        flags: 0,
        host_essentials,
        tcp_timeout_s: c.flow_timeouts.tcp,
        tcp_closing_timeout_s: c.flow_timeouts.tcp_closing,
        udp_timeout_s: c.flow_timeouts.udp,
        onlink6,
        onlink6_len,
        _pad: 0,
    }
}

/// The kernel id of a port table: FNV-1a (64 bit) over its intervals, so equal contents get equal ids in
/// every policy and an id never names two contents (`plan` refuses a collision). 0 is the empty table.
pub fn table_id(t: &PortTable) -> u64 {
    if t.intervals.is_empty() {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &(lo, hi, rule) in &t.intervals {
        for b in lo
            .to_be_bytes()
            .into_iter()
            .chain(hi.to_be_bytes())
            .chain(rule.to_be_bytes())
        {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    // 0 means "no table" in an address entry.
    h.max(1)
}

/// The (port table index, protocol) pairs some address entry looks up: only those are written.
pub fn used_tables(c: &Compiled) -> Vec<(usize, Proto)> {
    let mut used: Vec<(usize, Proto)> = c
        .addr_entries
        .iter()
        .flat_map(|(_, e)| {
            [
                (e.port_table[0] as usize, Proto::Tcp),
                (e.port_table[1] as usize, Proto::Udp),
            ]
        })
        .filter(|(t, _)| *t != 0)
        .collect();
    used.sort();
    used.dedup();
    used
}

/// A port table as an address entry holds it inline: (`inline_len`, intervals), or `INLINE_IN_PORTS`
/// when it has more intervals than fit.
fn inline_table(t: &PortTable) -> (u32, [PortInterval; INLINE_PORTS]) {
    let mut out = [PortInterval::default(); INLINE_PORTS];
    if t.intervals.len() > INLINE_PORTS {
        return (INLINE_IN_PORTS, out);
    }
    for (slot, &(lo, hi, rule)) in out.iter_mut().zip(&t.intervals) {
        *slot = PortInterval { lo, hi, rule };
    }
    (t.intervals.len() as u32, out)
}

/// Exactly what a generation slot holds once `c` is applied in it: `GEN_CONFIG`, every address entry
/// (port tables named by their content ids, small ones also inline, flagged when a reserved block
/// overlaps it), every distinct reserved block (attributed to its first listing), and every (table,
/// protocol) some address entry uses with all its blocks.
pub fn desired(c: &Compiled) -> GenState {
    let ids: Vec<u64> = c.port_tables.iter().map(table_id).collect();
    let inline: Vec<(u32, [PortInterval; INLINE_PORTS])> =
        c.port_tables.iter().map(inline_table).collect();
    let reserved_index = ReservedIndex::new(&c.reserved);
    let addr = c
        .addr_entries
        .iter()
        .map(|(n, e)| {
            let tables = e.port_table.map(|t| inline[t as usize]);
            (
                *n,
                AddrValue {
                    port_table: e.port_table.map(|t| ids[t as usize]),
                    icmp_rule: e.icmp_rule,
                    all_ports_rule: e.all_ports_rule,
                    flags: if reserved_index.overlaps_any(n) {
                        ADDR_RESERVED_OVERLAP
                    } else {
                        0
                    },
                    inline_len: tables.map(|t| t.0),
                    inline: tables.map(|t| t.1),
                },
            )
        })
        .collect();
    let mut reserved = BTreeMap::new();
    for (i, r) in c.reserved.iter().enumerate() {
        reserved.entry(r.cidr).or_insert(i as u32);
    }
    let mut ports = BTreeMap::new();
    for (t, proto) in used_tables(c) {
        for (base, len, rule) in c.port_tables[t].prefix_blocks() {
            let key = PortKey {
                table: ids[t],
                proto: proto.number(),
                base,
                len,
            };
            ports.insert(key, rule);
        }
    }
    GenState {
        config: gen_config(c),
        addr,
        reserved,
        ports,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_ids_depend_on_content_only_and_are_never_zero() {
        let a = PortTable {
            intervals: vec![(80, 80, 1), (443, 443, 2)],
        };
        let b = PortTable {
            intervals: vec![(80, 80, 1), (443, 443, 3)],
        };
        assert_eq!(table_id(&a), table_id(&a.clone()));
        assert_ne!(table_id(&a), table_id(&b));
        assert_ne!(table_id(&a), 0);
        assert_eq!(table_id(&PortTable::default()), 0);
        // FNV-1a of the 8 bytes of (80, 80, 1): pinned, so ids stay stable across releases.
        let one = PortTable {
            intervals: vec![(80, 80, 1)],
        };
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in [0, 80, 0, 80, 0, 0, 0, 1] {
            h = (h ^ b).wrapping_mul(0x0000_0100_0000_01b3);
        }
        assert_eq!(table_id(&one), h);
    }
}
