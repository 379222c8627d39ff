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
        AUDIT_OFFSET, AddrV4, AddrV6, AddrValue, FlowKey, FlowValue, FragKey, GEN_A, GEN_B,
        GEN_BITS, GenConfig, LastVerdict, MODE_AUDIT, MODE_ENFORCE, PORT_KEY_FIXED_BITS, PortData,
        RuleStats, RuleStatsKey, limits, names,
    },
    verdict::DropReason,
};

use super::{Datapath, DatapathError};
use crate::policy::{
    compile::{AddrEntry, Compiled},
    model::{Mode, Proto},
};

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
}

impl GenerationState {
    pub(crate) fn fresh() -> Self {
        Self {
            clean: [true; 3],
            written: [None, None, None],
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
        port_table: e.port_table,
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
            cfg.set(u32::from(generation), GenConfig { mode, flags: 0 }, 0)
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
                    table: (table as u32).to_be_bytes(),
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

    /// Applies `c` atomically: capacity checked, new generation written, `ACTIVE` flipped, old generation
    /// removed. On any error before the flip the previous policy stays active and untouched.
    ///
    /// Cost: one map write per entry of the new policy and one delete per entry of the old one, whatever
    /// changed: every packet must see one whole generation, so a new generation is written in full.
    pub fn apply(&mut self, c: &Compiled) -> Result<ApplyReport, DatapathError> {
        let entries = entry_counts(c);
        check_capacity(&entries)?;
        let previous = self.active_generation()?;
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
        tracing::info!(generation = next, ?previous, "policy generation active");
        let (mut stale, mut stale_reason) = (0, None);
        if let Some(old) = previous {
            // A packet that read the old generation just before the flip finishes its few lookups within
            // microseconds (BPF programs run to completion); give it that before deleting what it reads.
            std::thread::sleep(Duration::from_millis(2));
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
            entries,
            stale_entries: stale,
            stale_reason,
        })
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
        cfg.set(0, GenConfig { mode: 0, flags }, 0)
            .map_err(map_err(names::GEN_CONFIG))
    }

    /// Forgets every recorded flow and first fragment (tests, and a policy reset).
    pub fn clear_flow_state(&mut self) -> Result<(), DatapathError> {
        let mut flows = typed_map!(self, aya::maps::HashMap<_, FlowKey, FlowValue>, names::FLOWS);
        let keys: Vec<FlowKey> = flows.keys().filter_map(Result::ok).collect();
        for k in keys {
            flows.remove(&k).map_err(map_err(names::FLOWS))?;
        }
        let mut frags = typed_map!(self, aya::maps::HashMap<_, FragKey, u32>, names::FRAGS);
        let keys: Vec<FragKey> = frags.keys().filter_map(Result::ok).collect();
        for k in keys {
            frags.remove(&k).map_err(map_err(names::FRAGS))?;
        }
        Ok(())
    }

    /// Records a peer-initiated flow (what the ENI ingress program does when its first packet arrives).
    pub fn insert_flow(&mut self, key: &FlowKey) -> Result<(), DatapathError> {
        let mut flows = typed_map!(self, aya::maps::HashMap<_, FlowKey, FlowValue>, names::FLOWS);
        flows
            .insert(key, FlowValue { last_seen_ns: 0 }, 0)
            .map_err(map_err(names::FLOWS))
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
