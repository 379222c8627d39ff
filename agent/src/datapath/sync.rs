//! Applying a compiled policy to the kernel maps, atomically (DESIGN.md "Daemon behaviour").
//!
//! The new policy is written under the inactive generation; one write of `ACTIVE` switches every CPU to it;
//! then the old generation's entries are deleted. Anything failing before the switch leaves the old policy
//! active (and the partial new generation is removed); the capacity of every map is checked first.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use aya::maps::{
    Array, MapData, PerCpuArray, PerCpuHashMap,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::IpNet;
use vpcgate_common::{
    datapath::{
        AUDIT_OFFSET, AddrV4, AddrV6, AddrValue, GEN_A, GEN_B, GEN_BITS, GenConfig, LastVerdict,
        MODE_AUDIT, MODE_ENFORCE, PORT_KEY_FIXED_BITS, PortData, RuleStats, RuleStatsKey, limits,
        names,
    },
    verdict::DropReason,
};

use super::{Datapath, DatapathError};
use crate::policy::{
    compile::{AddrEntry, Compiled, PortTable, RuleKind},
    model::{Mode, Proto},
};

/// How long to wait before deleting entries a packet in flight may still be about to read. BPF programs
/// run to completion in microseconds; this is orders of magnitude more.
const GRACE: Duration = Duration::from_millis(2);

/// The keys one generation wrote, so it can be removed with exactly as many deletes.
#[derive(Default)]
pub(crate) struct WrittenKeys {
    v4: Vec<Key<AddrV4>>,
    v6: Vec<Key<AddrV6>>,
    reserved_v4: Vec<Key<AddrV4>>,
    reserved_v6: Vec<Key<AddrV6>>,
    ports: Vec<Key<PortData>>,
    rules: u32,
}

/// Per generation slot: known to hold nothing, or the keys it holds (when this process wrote them).
/// Anything else (maps adopted from an earlier process) is found by iterating the maps.
pub(crate) struct GenerationState {
    clean: [bool; 3],
    written: [Option<WrittenKeys>; 3],
    /// The active policy as written (when this process wrote it): what an incremental apply diffs against.
    active: Option<Active>,
}

/// The active generation's entries, with the kernel's port-table ids.
pub(crate) struct Active {
    generation: u8,
    mode: Mode,
    /// Rule identities in id order: an incremental apply needs every surviving rule to keep its id.
    identities: Vec<(RuleKind, String)>,
    addr: HashMap<IpNet, AddrValue>,
    reserved: HashMap<IpNet, u32>,
    /// (table content, protocol) -> kernel table id.
    tables: HashMap<(PortTable, Proto), u64>,
    next_table: u64,
    /// What to restore if an incremental apply fails half-way.
    compiled: Compiled,
}

impl GenerationState {
    pub(crate) fn fresh() -> Self {
        Self {
            clean: [true; 3],
            written: [None, None, None],
            active: None,
        }
    }
}

/// How many entries a compiled policy needs in each map.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EntryCounts {
    pub addr_v4: u32,
    pub addr_v6: u32,
    pub reserved_v4: u32,
    pub reserved_v6: u32,
    pub ports: u32,
    pub rules: u32,
}

/// What `apply` did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ApplyReport {
    pub generation: u8,
    pub previous_generation: Option<u8>,
    pub entries: EntryCounts,
    /// Old-generation entries that could not be deleted (they are removed by the next apply).
    pub stale_entries: u32,
    /// Why, when `stale_entries` is not 0.
    pub stale_reason: Option<String>,
    /// Applied in place in the active generation (only what changed), rather than as a new generation.
    pub incremental: bool,
    /// Map entries written or deleted in the policy maps.
    pub map_writes: u32,
}

fn entries_total(e: &EntryCounts) -> u32 {
    e.addr_v4 + e.addr_v6 + e.reserved_v4 + e.reserved_v6 + e.ports
}

/// Drop counters summed over CPUs, by reason, enforced and audited.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DropCounts {
    pub dropped: HashMap<DropReason, u64>,
    pub audited: HashMap<DropReason, u64>,
}

/// The (port table, protocol) pairs some address entry looks up: only those are written.
fn used_tables(c: &Compiled) -> Vec<(usize, Proto)> {
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

pub fn entry_counts(c: &Compiled) -> EntryCounts {
    let count = |v4: bool, nets: &mut dyn Iterator<Item = IpNet>| {
        nets.filter(|n| n.addr().is_ipv4() == v4).count() as u32
    };
    EntryCounts {
        addr_v4: count(true, &mut c.addr_entries.iter().map(|e| e.0)),
        addr_v6: count(false, &mut c.addr_entries.iter().map(|e| e.0)),
        reserved_v4: distinct_reserved(c, true),
        reserved_v6: distinct_reserved(c, false),
        ports: used_tables(c)
            .iter()
            .map(|&(t, _)| c.port_tables[t].prefix_blocks().len() as u32)
            .sum(),
        rules: c.rules.len() as u32,
    }
}

fn distinct_reserved(c: &Compiled, v4: bool) -> u32 {
    let mut nets: Vec<IpNet> = c
        .reserved
        .iter()
        .map(|r| r.cidr)
        .filter(|n| n.addr().is_ipv4() == v4)
        .collect();
    nets.sort();
    nets.dedup();
    nets.len() as u32
}

fn check_capacity(n: &EntryCounts) -> Result<(), DatapathError> {
    let checks = [
        (names::ADDR_V4, limits::ADDR_ENTRIES, n.addr_v4),
        (names::ADDR_V6, limits::ADDR_ENTRIES, n.addr_v6),
        (names::RESERVED_V4, limits::RESERVED_ENTRIES, n.reserved_v4),
        (names::RESERVED_V6, limits::RESERVED_ENTRIES, n.reserved_v6),
        (names::PORTS, limits::PORT_ENTRIES, n.ports),
        (names::RULE_STATS, limits::RULES, n.rules),
    ];
    for (map, capacity, needed) in checks {
        if needed > capacity {
            return Err(DatapathError::MapFull {
                map,
                capacity,
                needed,
            });
        }
    }
    Ok(())
}

/// The kernel's per-generation settings for a compiled policy.
pub(crate) fn gen_config(c: &Compiled) -> GenConfig {
    use crate::policy::model::HostEssential;
    use vpcgate_common::datapath::{ESSENTIAL_DHCP, ESSENTIAL_MLD};
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

fn v4_key(generation: u8, net: &IpNet) -> Key<AddrV4> {
    let IpAddr::V4(a) = net.network() else {
        unreachable!("IPv4 prefix")
    };
    Key::new(
        GEN_BITS + u32::from(net.prefix_len()),
        AddrV4 {
            generation,
            addr: a.octets(),
            _pad: [0; 3],
        },
    )
}

fn v6_key(generation: u8, net: &IpNet) -> Key<AddrV6> {
    let IpAddr::V6(a) = net.network() else {
        unreachable!("IPv6 prefix")
    };
    Key::new(
        GEN_BITS + u32::from(net.prefix_len()),
        AddrV6 {
            generation,
            addr: a.octets(),
            _pad: [0; 3],
        },
    )
}

fn addr_value(e: &AddrEntry) -> AddrValue {
    AddrValue {
        port_table: e.port_table.map(u64::from),
        icmp_rule: e.icmp_rule,
        all_ports_rule: e.all_ports_rule,
        _pad: 0,
    }
}

/// A delete of an entry that is not there (ENOENT), however aya reports it.
fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

macro_rules! typed_map {
    ($dp:expr, $ty:ty, $name:expr) => {{
        let m = $dp
            .ebpf_mut()
            .map_mut($name)
            .ok_or(DatapathError::MissingMap($name))?;
        <$ty>::try_from(m).map_err(map_err($name))?
    }};
}

/// Removes every entry of `generation` from an LPM trie whose key data starts with the generation byte.
fn purge<K: aya::Pod, V: aya::Pod>(
    map: &mut LpmTrie<&mut MapData, K, V>,
    generation: u8,
    gen_of: impl Fn(&K) -> u8,
    name: &'static str,
) -> Result<u32, DatapathError> {
    let keys: Vec<Key<K>> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| gen_of(&k.data()) == generation)
        .collect();
    let mut removed = 0;
    for k in keys {
        map.remove(&k).map_err(map_err(name))?;
        removed += 1;
    }
    Ok(removed)
}

fn identities(c: &Compiled) -> Vec<(RuleKind, String)> {
    c.rules.iter().map(|r| (r.kind, r.name.clone())).collect()
}

/// The state a full write of `c` under `generation` leaves (table ids are the compiled indices).
fn active_after_full_write(c: &Compiled, generation: u8) -> Active {
    let tables: HashMap<(PortTable, Proto), u64> = used_tables(c)
        .into_iter()
        .map(|(t, p)| ((c.port_tables[t].clone(), p), t as u64))
        .collect();
    Active {
        generation,
        mode: c.mode,
        identities: identities(c),
        addr: c
            .addr_entries
            .iter()
            .map(|(n, e)| (*n, addr_value(e)))
            .collect(),
        reserved: reserved_values(c),
        tables,
        next_table: c.port_tables.len() as u64,
        compiled: c.clone(),
    }
}

/// Reserved prefix -> index of its first listing.
fn reserved_values(c: &Compiled) -> HashMap<IpNet, u32> {
    let mut out = HashMap::new();
    for (i, r) in c.reserved.iter().enumerate() {
        out.entry(r.cidr).or_insert(i as u32);
    }
    out
}

/// The keys an `Active` state holds (to remove its generation exactly later).
fn keys_of(a: &Active, rules: u32) -> WrittenKeys {
    let g = a.generation;
    let mut k = WrittenKeys {
        rules,
        ..WrittenKeys::default()
    };
    for n in a.addr.keys() {
        match n {
            IpNet::V4(_) => k.v4.push(v4_key(g, n)),
            IpNet::V6(_) => k.v6.push(v6_key(g, n)),
        }
    }
    for n in a.reserved.keys() {
        match n {
            IpNet::V4(_) => k.reserved_v4.push(v4_key(g, n)),
            IpNet::V6(_) => k.reserved_v6.push(v6_key(g, n)),
        }
    }
    for ((t, p), id) in &a.tables {
        k.ports.extend(
            t.prefix_blocks()
                .into_iter()
                .map(|(base, len, _)| port_key(g, *id, *p, base, len)),
        );
    }
    k
}

fn port_key(generation: u8, table: u64, proto: Proto, base: u16, len: u8) -> Key<PortData> {
    let data = PortData {
        generation,
        table: table.to_be_bytes(),
        proto: proto.number(),
        port: base.to_be_bytes(),
    };
    Key::new(PORT_KEY_FIXED_BITS + u32::from(len), data)
}

impl Datapath {
    /// The active generation (`GEN_A`/`GEN_B`), or None when no policy was applied.
    pub fn active_generation(&self) -> Result<Option<u8>, DatapathError> {
        let m = self
            .ebpf()
            .map(names::ACTIVE)
            .ok_or(DatapathError::MissingMap(names::ACTIVE))?;
        let a = Array::<_, u32>::try_from(m).map_err(map_err(names::ACTIVE))?;
        let g = a.get(&0, 0).map_err(map_err(names::ACTIVE))?;
        Ok([GEN_A, GEN_B].into_iter().find(|&x| u32::from(x) == g))
    }

    /// Removes every policy entry of `generation` (all policy maps, its rule counters).
    fn purge_generation(&mut self, generation: u8) -> Result<u32, DatapathError> {
        let mut n = 0;
        n += purge(
            &mut typed_map!(self, LpmTrie<_, AddrV4, AddrValue>, names::ADDR_V4),
            generation,
            |k| k.generation,
            names::ADDR_V4,
        )?;
        n += purge(
            &mut typed_map!(self, LpmTrie<_, AddrV6, AddrValue>, names::ADDR_V6),
            generation,
            |k| k.generation,
            names::ADDR_V6,
        )?;
        n += purge(
            &mut typed_map!(self, LpmTrie<_, AddrV4, u32>, names::RESERVED_V4),
            generation,
            |k| k.generation,
            names::RESERVED_V4,
        )?;
        n += purge(
            &mut typed_map!(self, LpmTrie<_, AddrV6, u32>, names::RESERVED_V6),
            generation,
            |k| k.generation,
            names::RESERVED_V6,
        )?;
        n += purge(
            &mut typed_map!(self, LpmTrie<_, PortData, u32>, names::PORTS),
            generation,
            |k| k.generation,
            names::PORTS,
        )?;
        let mut stats =
            typed_map!(self, PerCpuHashMap<_, RuleStatsKey, RuleStats>, names::RULE_STATS);
        let keys: Vec<RuleStatsKey> = stats
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.generation == u32::from(generation))
            .collect();
        for k in keys {
            stats.remove(&k).map_err(map_err(names::RULE_STATS))?;
        }
        Ok(n)
    }

    /// Writes `c` under `generation`, recording every key in `keys` before it is written (so a failure
    /// half-way is undone exactly).
    fn write_generation(
        &mut self,
        c: &Compiled,
        generation: u8,
        keys: &mut WrittenKeys,
    ) -> Result<(), DatapathError> {
        keys.rules = c.rules.len() as u32;
        {
            let mut cfg = typed_map!(self, Array<_, GenConfig>, names::GEN_CONFIG);
            let mode = match c.mode {
                Mode::Enforce => MODE_ENFORCE,
                Mode::Audit => MODE_AUDIT,
            };
            let _ = mode;
            cfg.set(u32::from(generation), gen_config(c), 0)
                .map_err(map_err(names::GEN_CONFIG))?;
        }
        {
            let mut v4 = typed_map!(self, LpmTrie<_, AddrV4, AddrValue>, names::ADDR_V4);
            for (net, e) in c.addr_entries.iter().filter(|e| e.0.addr().is_ipv4()) {
                keys.v4.push(v4_key(generation, net));
                v4.insert(keys.v4.last().unwrap(), addr_value(e), 0)
                    .map_err(map_err(names::ADDR_V4))?;
            }
        }
        {
            let mut v6 = typed_map!(self, LpmTrie<_, AddrV6, AddrValue>, names::ADDR_V6);
            for (net, e) in c.addr_entries.iter().filter(|e| e.0.addr().is_ipv6()) {
                keys.v6.push(v6_key(generation, net));
                v6.insert(keys.v6.last().unwrap(), addr_value(e), 0)
                    .map_err(map_err(names::ADDR_V6))?;
            }
        }
        // The same block listed twice is attributed to its first listing (like the reference): write in
        // reverse so the first listing's index is the one that stays.
        let reserved: Vec<(usize, &IpNet)> = c
            .reserved
            .iter()
            .enumerate()
            .rev()
            .map(|(i, r)| (i, &r.cidr))
            .collect();
        {
            let mut r4 = typed_map!(self, LpmTrie<_, AddrV4, u32>, names::RESERVED_V4);
            for &(i, net) in reserved.iter().filter(|(_, n)| n.addr().is_ipv4()) {
                keys.reserved_v4.push(v4_key(generation, net));
                r4.insert(keys.reserved_v4.last().unwrap(), i as u32, 0)
                    .map_err(map_err(names::RESERVED_V4))?;
            }
        }
        {
            let mut r6 = typed_map!(self, LpmTrie<_, AddrV6, u32>, names::RESERVED_V6);
            for &(i, net) in reserved.iter().filter(|(_, n)| n.addr().is_ipv6()) {
                keys.reserved_v6.push(v6_key(generation, net));
                r6.insert(keys.reserved_v6.last().unwrap(), i as u32, 0)
                    .map_err(map_err(names::RESERVED_V6))?;
            }
        }
        let mut ports = typed_map!(self, LpmTrie<_, PortData, u32>, names::PORTS);
        for (table, proto) in used_tables(c) {
            for (base, len, rule) in c.port_tables[table].prefix_blocks() {
                let data = PortData {
                    generation,
                    table: (table as u64).to_be_bytes(),
                    proto: proto.number(),
                    port: base.to_be_bytes(),
                };
                keys.ports
                    .push(Key::new(PORT_KEY_FIXED_BITS + u32::from(len), data));
                ports
                    .insert(keys.ports.last().unwrap(), rule, 0)
                    .map_err(map_err(names::PORTS))?;
            }
        }
        Ok(())
    }

    /// Deletes exactly `keys` (entries already gone are fine) and the generation's rule counters.
    fn remove_written(&mut self, generation: u8, keys: &WrittenKeys) -> Result<u32, DatapathError> {
        fn remove_all<K: aya::Pod, V: aya::Pod>(
            map: &mut LpmTrie<&mut MapData, K, V>,
            keys: &[Key<K>],
            name: &'static str,
        ) -> Result<u32, DatapathError> {
            for k in keys {
                match map.remove(k) {
                    Ok(()) => {}
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(map_err(name)(e)),
                }
            }
            Ok(keys.len() as u32)
        }
        let mut n = 0;
        n += remove_all(
            &mut typed_map!(self, LpmTrie<_, AddrV4, AddrValue>, names::ADDR_V4),
            &keys.v4,
            names::ADDR_V4,
        )?;
        n += remove_all(
            &mut typed_map!(self, LpmTrie<_, AddrV6, AddrValue>, names::ADDR_V6),
            &keys.v6,
            names::ADDR_V6,
        )?;
        n += remove_all(
            &mut typed_map!(self, LpmTrie<_, AddrV4, u32>, names::RESERVED_V4),
            &keys.reserved_v4,
            names::RESERVED_V4,
        )?;
        n += remove_all(
            &mut typed_map!(self, LpmTrie<_, AddrV6, u32>, names::RESERVED_V6),
            &keys.reserved_v6,
            names::RESERVED_V6,
        )?;
        n += remove_all(
            &mut typed_map!(self, LpmTrie<_, PortData, u32>, names::PORTS),
            &keys.ports,
            names::PORTS,
        )?;
        let mut stats =
            typed_map!(self, PerCpuHashMap<_, RuleStatsKey, RuleStats>, names::RULE_STATS);
        for rule in 1..=keys.rules {
            match stats.remove(&RuleStatsKey {
                generation: u32::from(generation),
                rule,
            }) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err(names::RULE_STATS)(e)),
            }
        }
        Ok(n)
    }

    /// Empties a generation slot: by its recorded keys when this process wrote it, else by iterating the
    /// maps (state adopted from elsewhere, or a slot whose keys were lost).
    fn clear_generation(&mut self, generation: u8) -> Result<(), DatapathError> {
        let slot = usize::from(generation);
        if self.generations.clean[slot] {
            return Ok(());
        }
        match self.generations.written[slot].take() {
            Some(keys) => {
                if let Err(e) = self.remove_written(generation, &keys) {
                    self.generations.written[slot] = Some(keys);
                    return Err(e);
                }
            }
            None => {
                self.purge_generation(generation)?;
            }
        }
        self.generations.clean[slot] = true;
        Ok(())
    }

    fn set_active(&mut self, generation: u8) -> Result<(), DatapathError> {
        let mut a = typed_map!(self, Array<_, u32>, names::ACTIVE);
        a.set(0, u32::from(generation), 0)
            .map_err(map_err(names::ACTIVE))
    }

    /// Applies `c`: capacity checked, then either
    ///
    /// - incrementally, in the active generation, when every rule that stays keeps its id (rules edited in
    ///   place, added or removed at the end) and the mode is unchanged: only the entries that differ are
    ///   written, in an order that keeps each packet's decision either the old policy's or the new one's
    ///   for its destination (new prefixes longest first, then changed values, then removals shortest
    ///   first; reserved blocks added first and removed last; port tables written before and deleted after
    ///   the entries that name them). A failure half-way restores the old policy by a generation flip.
    /// - or as a new generation: written in full under the inactive generation, `ACTIVE` flipped, the old
    ///   generation deleted. A failure before the flip leaves the old policy active and untouched.
    pub fn apply(&mut self, c: &Compiled) -> Result<ApplyReport, DatapathError> {
        let entries = entry_counts(c);
        check_capacity(&entries)?;
        let previous = self.active_generation()?;
        let incremental = match &self.generations.active {
            Some(a) => {
                let old = &a.identities;
                let new = identities(c);
                Some(a.generation) == previous
                    && a.mode == c.mode
                    && old.iter().zip(new.iter()).all(|(x, y)| x == y)
            }
            None => false,
        };
        if incremental {
            return self.apply_incremental(c, entries);
        }
        self.apply_generation(c, entries, previous)
    }

    fn apply_generation(
        &mut self,
        c: &Compiled,
        entries: EntryCounts,
        previous: Option<u8>,
    ) -> Result<ApplyReport, DatapathError> {
        let next = if previous == Some(GEN_A) {
            GEN_B
        } else {
            GEN_A
        };
        // Leftovers of an earlier apply that failed half-way, or of another process.
        self.clear_generation(next)?;
        let mut keys = WrittenKeys::default();
        self.generations.clean[usize::from(next)] = false;
        let written = self.write_generation(c, next, &mut keys);
        self.generations.written[usize::from(next)] = Some(keys);
        if let Err(e) = written {
            if let Err(cleanup) = self.clear_generation(next) {
                tracing::warn!(error = %cleanup, generation = next, "partial generation not removed; the next apply removes it");
            }
            return Err(e);
        }
        self.set_active(next)?;
        self.generations.active = Some(active_after_full_write(c, next));
        tracing::info!(generation = next, ?previous, "policy generation active");
        let (mut stale, mut stale_reason) = (0, None);
        if let Some(old) = previous {
            // A packet that read the old generation just before the flip finishes its few lookups within
            // microseconds (BPF programs run to completion); give it that before deleting what it reads.
            std::thread::sleep(GRACE);
            self.generations.clean[usize::from(old)] = false;
            if let Err(e) = self.clear_generation(old) {
                tracing::warn!(error = %e, generation = old, "old generation not fully removed; the next apply removes it");
                stale = 1;
                stale_reason = Some(e.to_string());
            }
        }
        Ok(ApplyReport {
            generation: next,
            previous_generation: previous,
            map_writes: entries_total(&entries),
            entries,
            stale_entries: stale,
            stale_reason,
            incremental: false,
        })
    }

    fn apply_incremental(
        &mut self,
        c: &Compiled,
        entries: EntryCounts,
    ) -> Result<ApplyReport, DatapathError> {
        let old = self.generations.active.take().expect("checked by apply");
        match self.write_diff(&old, c) {
            Ok((new, writes)) => {
                let g = new.generation;
                self.generations.written[usize::from(g)] =
                    Some(keys_of(&new, c.rules.len() as u32));
                self.generations.active = Some(new);
                tracing::info!(generation = g, writes, "policy applied incrementally");
                Ok(ApplyReport {
                    generation: g,
                    previous_generation: Some(g),
                    entries,
                    stale_entries: 0,
                    stale_reason: None,
                    incremental: true,
                    map_writes: writes,
                })
            }
            Err(e) => {
                // The active generation now mixes both policies: restore the old one, whole, by a flip.
                tracing::error!(error = %e, "incremental apply failed; restoring the previous policy");
                self.generations.written[usize::from(old.generation)] = None;
                self.generations.clean[usize::from(old.generation)] = false;
                if let Err(restore) = self.apply_generation(
                    &old.compiled,
                    entry_counts(&old.compiled),
                    Some(old.generation),
                ) {
                    tracing::error!(error = %restore, "restoring the previous policy failed too");
                }
                Err(e)
            }
        }
    }

    /// Writes the difference between `old` (active) and `c` into the active generation; returns the new
    /// state and the number of map writes and deletes.
    fn write_diff(&mut self, old: &Active, c: &Compiled) -> Result<(Active, u32), DatapathError> {
        let g = old.generation;
        let mut writes = 0u32;
        // Port tables: reuse the kernel id of an identical table; write new ones before anything names them.
        let mut tables: HashMap<(PortTable, Proto), u64> = HashMap::new();
        let mut remap: HashMap<(u32, Proto), u64> = HashMap::new();
        let mut next_table = old.next_table;
        let mut fresh = vec![];
        for (t, p) in used_tables(c) {
            let key = (c.port_tables[t].clone(), p);
            let id = match old.tables.get(&key) {
                Some(&id) => id,
                None => {
                    let id = next_table;
                    next_table += 1;
                    fresh.push((key.clone(), id));
                    id
                }
            };
            tables.insert(key, id);
            remap.insert((t as u32, p), id);
        }
        {
            let mut ports = typed_map!(self, LpmTrie<_, PortData, u32>, names::PORTS);
            for ((t, p), id) in &fresh {
                for (base, len, rule) in t.prefix_blocks() {
                    ports
                        .insert(&port_key(g, *id, *p, base, len), rule, 0)
                        .map_err(map_err(names::PORTS))?;
                    writes += 1;
                }
            }
        }
        let kernel_value = |e: &AddrEntry| {
            let mut v = addr_value(e);
            for (i, p) in Proto::ALL.into_iter().enumerate() {
                v.port_table[i] = remap.get(&(e.port_table[i], p)).copied().unwrap_or(0);
            }
            v
        };
        let addr: HashMap<IpNet, AddrValue> = c
            .addr_entries
            .iter()
            .map(|(n, e)| (*n, kernel_value(e)))
            .collect();
        let reserved = reserved_values(c);
        // Reserved blocks: added (or re-attributed) first.
        for (n, &i) in &reserved {
            if old.reserved.get(n) != Some(&i) {
                self.put_reserved(g, n, i)?;
                writes += 1;
            }
        }
        // New prefixes, longest first; then changed values.
        let mut added: Vec<&IpNet> = addr.keys().filter(|n| !old.addr.contains_key(*n)).collect();
        added.sort_by_key(|n| std::cmp::Reverse(n.prefix_len()));
        let changed: Vec<&IpNet> = addr
            .keys()
            .filter(|n| old.addr.get(*n).is_some_and(|v| *v != addr[*n]))
            .collect();
        for n in added.into_iter().chain(changed) {
            self.put_addr(g, n, addr[n])?;
            writes += 1;
        }
        // Prefixes the new policy does not have, shortest first; then reserved blocks it does not have.
        let mut removed: Vec<&IpNet> = old.addr.keys().filter(|n| !addr.contains_key(*n)).collect();
        removed.sort_by_key(|n| n.prefix_len());
        for n in removed {
            self.remove_addr(g, n)?;
            writes += 1;
        }
        for n in old.reserved.keys().filter(|n| !reserved.contains_key(*n)) {
            self.remove_reserved(g, n)?;
            writes += 1;
        }
        // Port tables nothing names any more. A packet looks up its address entry, then the port table
        // that entry names: one that read an old entry just before it changed must still find that table,
        // so wait out in-flight packets (as between a generation flip and deleting the old generation).
        let kept: std::collections::HashSet<u64> = tables.values().copied().collect();
        if old.tables.values().any(|id| !kept.contains(id)) {
            std::thread::sleep(GRACE);
        }
        {
            let mut ports = typed_map!(self, LpmTrie<_, PortData, u32>, names::PORTS);
            for ((t, p), id) in old.tables.iter().filter(|(_, id)| !kept.contains(*id)) {
                for (base, len, _) in t.prefix_blocks() {
                    match ports.remove(&port_key(g, *id, *p, base, len)) {
                        Ok(()) => {}
                        Err(e) if is_not_found(&e) => {}
                        Err(e) => return Err(map_err(names::PORTS)(e)),
                    }
                    writes += 1;
                }
            }
        }
        // Counters of rules removed from the end.
        {
            let mut stats =
                typed_map!(self, PerCpuHashMap<_, RuleStatsKey, RuleStats>, names::RULE_STATS);
            for rule in c.rules.len() as u32 + 1..=old.identities.len() as u32 {
                match stats.remove(&RuleStatsKey {
                    generation: u32::from(g),
                    rule,
                }) {
                    Ok(()) => {}
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(map_err(names::RULE_STATS)(e)),
                }
            }
        }
        let new = Active {
            generation: g,
            mode: c.mode,
            identities: identities(c),
            addr,
            reserved,
            tables,
            next_table,
            compiled: c.clone(),
        };
        Ok((new, writes))
    }

    fn put_addr(&mut self, g: u8, n: &IpNet, v: AddrValue) -> Result<(), DatapathError> {
        match n {
            IpNet::V4(_) => typed_map!(self, LpmTrie<_, AddrV4, AddrValue>, names::ADDR_V4)
                .insert(&v4_key(g, n), v, 0)
                .map_err(map_err(names::ADDR_V4)),
            IpNet::V6(_) => typed_map!(self, LpmTrie<_, AddrV6, AddrValue>, names::ADDR_V6)
                .insert(&v6_key(g, n), v, 0)
                .map_err(map_err(names::ADDR_V6)),
        }
    }

    fn remove_addr(&mut self, g: u8, n: &IpNet) -> Result<(), DatapathError> {
        let r = match n {
            IpNet::V4(_) => typed_map!(self, LpmTrie<_, AddrV4, AddrValue>, names::ADDR_V4)
                .remove(&v4_key(g, n)),
            IpNet::V6(_) => typed_map!(self, LpmTrie<_, AddrV6, AddrValue>, names::ADDR_V6)
                .remove(&v6_key(g, n)),
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(map_err(if n.addr().is_ipv4() {
                names::ADDR_V4
            } else {
                names::ADDR_V6
            })(e)),
        }
    }

    fn put_reserved(&mut self, g: u8, n: &IpNet, index: u32) -> Result<(), DatapathError> {
        match n {
            IpNet::V4(_) => typed_map!(self, LpmTrie<_, AddrV4, u32>, names::RESERVED_V4)
                .insert(&v4_key(g, n), index, 0)
                .map_err(map_err(names::RESERVED_V4)),
            IpNet::V6(_) => typed_map!(self, LpmTrie<_, AddrV6, u32>, names::RESERVED_V6)
                .insert(&v6_key(g, n), index, 0)
                .map_err(map_err(names::RESERVED_V6)),
        }
    }

    fn remove_reserved(&mut self, g: u8, n: &IpNet) -> Result<(), DatapathError> {
        let r =
            match n {
                IpNet::V4(_) => typed_map!(self, LpmTrie<_, AddrV4, u32>, names::RESERVED_V4)
                    .remove(&v4_key(g, n)),
                IpNet::V6(_) => typed_map!(self, LpmTrie<_, AddrV6, u32>, names::RESERVED_V6)
                    .remove(&v6_key(g, n)),
            };
        match r {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(map_err(if n.addr().is_ipv4() {
                names::RESERVED_V4
            } else {
                names::RESERVED_V6
            })(e)),
        }
    }

    /// How many policy-map entries (addresses, reserved blocks, port blocks) `generation` holds, found by
    /// iterating the maps (for status and tests).
    pub fn stored_entries(&mut self, generation: u8) -> Result<u32, DatapathError> {
        fn count<K: aya::Pod, V: aya::Pod>(
            map: &LpmTrie<&mut MapData, K, V>,
            generation: u8,
            gen_of: impl Fn(&K) -> u8,
        ) -> u32 {
            map.keys()
                .filter_map(Result::ok)
                .filter(|k| gen_of(&k.data()) == generation)
                .count() as u32
        }
        let mut n = count(
            &typed_map!(self, LpmTrie<_, AddrV4, AddrValue>, names::ADDR_V4),
            generation,
            |k| k.generation,
        );
        n += count(
            &typed_map!(self, LpmTrie<_, AddrV6, AddrValue>, names::ADDR_V6),
            generation,
            |k| k.generation,
        );
        n += count(
            &typed_map!(self, LpmTrie<_, AddrV4, u32>, names::RESERVED_V4),
            generation,
            |k| k.generation,
        );
        n += count(
            &typed_map!(self, LpmTrie<_, AddrV6, u32>, names::RESERVED_V6),
            generation,
            |k| k.generation,
        );
        n += count(
            &typed_map!(self, LpmTrie<_, PortData, u32>, names::PORTS),
            generation,
            |k| k.generation,
        );
        Ok(n)
    }

    /// Per-rule counters of the active generation, summed over CPUs: rule id -> (packets, bytes).
    pub fn rule_stats(&self) -> Result<HashMap<u32, RuleStats>, DatapathError> {
        let generation = self.active_generation()?.map_or(0, u32::from);
        let m = self
            .ebpf()
            .map(names::RULE_STATS)
            .ok_or(DatapathError::MissingMap(names::RULE_STATS))?;
        let stats = PerCpuHashMap::<_, RuleStatsKey, RuleStats>::try_from(m)
            .map_err(map_err(names::RULE_STATS))?;
        let mut out = HashMap::new();
        for item in stats.iter() {
            let (k, per_cpu) = item.map_err(map_err(names::RULE_STATS))?;
            if k.generation != generation {
                continue;
            }
            let sum = per_cpu.iter().fold(RuleStats::default(), |a, s| RuleStats {
                packets: a.packets + s.packets,
                bytes: a.bytes + s.bytes,
            });
            out.insert(k.rule, sum);
        }
        Ok(out)
    }

    /// Drop counters by reason, summed over CPUs.
    pub fn drop_counts(&self) -> Result<DropCounts, DatapathError> {
        let m = self
            .ebpf()
            .map(names::DROP_STATS)
            .ok_or(DatapathError::MissingMap(names::DROP_STATS))?;
        let a = PerCpuArray::<_, u64>::try_from(m).map_err(map_err(names::DROP_STATS))?;
        let mut out = DropCounts::default();
        for r in DropReason::ALL {
            let sum = |i: u32| -> Result<u64, DatapathError> {
                Ok(a.get(&i, 0)
                    .map_err(map_err(names::DROP_STATS))?
                    .iter()
                    .sum())
            };
            out.dropped.insert(r, sum(r.code())?);
            out.audited.insert(r, sum(r.code() + AUDIT_OFFSET)?);
        }
        Ok(out)
    }

    /// Test hook: record every verdict in `LAST_VERDICT` (one shared cache line written per packet: never
    /// in production).
    pub fn set_record_last(&mut self, on: bool) -> Result<(), DatapathError> {
        let mut cfg = typed_map!(self, Array<_, GenConfig>, names::GEN_CONFIG);
        let flags = if on {
            vpcgate_common::datapath::FLAG_RECORD_LAST
        } else {
            0
        };
        cfg.set(
            0,
            GenConfig {
                flags,
                ..GenConfig::default()
            },
            0,
        )
        .map_err(map_err(names::GEN_CONFIG))
    }

    pub fn last_verdict(&self) -> Result<LastVerdict, DatapathError> {
        let m = self
            .ebpf()
            .map(names::LAST_VERDICT)
            .ok_or(DatapathError::MissingMap(names::LAST_VERDICT))?;
        let a = Array::<_, LastVerdict>::try_from(m).map_err(map_err(names::LAST_VERDICT))?;
        a.get(&0, 0).map_err(map_err(names::LAST_VERDICT))
    }
}
