//! The kernel's policy maps behind the executor's `Maps`: one plan operation, one map syscall (or one
//! iteration, for purges), and reading a generation back.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    Ebpf,
    maps::{
        Array, MapData, MapError, PerCpuHashMap,
        lpm_trie::{Key, LpmTrie},
    },
};
use ipnet::IpNet;
use vpcgate_common::datapath::{
    AddrV4, AddrV6, AddrValue, GEN_A, GEN_B, GEN_BITS, GenConfig, PORT_KEY_FIXED_BITS, PortData,
    RuleStats, RuleStatsKey, names,
};

use super::{
    DatapathError,
    barrier::Barrier,
    epoch::EpochWord,
    execute::Maps,
    plan::Op,
    state::{GenState, PortKey},
};

pub(crate) fn map_err(map: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

/// A delete of an entry that is not there (ENOENT), however aya reports it.
pub(crate) fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// A map of the loaded object, typed: `typed_map!(ebpf, Array<_, u32>, names::ACTIVE)`.
macro_rules! typed_map {
    ($ebpf:expr, $ty:ty, $name:expr) => {{
        let m = $ebpf
            .map_mut($name)
            .ok_or(DatapathError::MissingMap($name))?;
        <$ty>::try_from(m).map_err($crate::datapath::maps::map_err($name))?
    }};
}
pub(crate) use typed_map;

/// The policy epoch to write after `current`, read from the map: greater, so never one written before
/// while one process writes at a time (`vpcgate run` holds its instance's lock); and at least the boot clock's
/// nanoseconds (`now_ns`), so that two writers racing from the same value would still write different
/// ones. Never 0 (the programs memoize nothing under 0). Nanoseconds since boot stay below `u64::MAX` for
/// 584 years, and the map lasts until reboot at most: None after `u64::MAX`, which only a hand-written
/// value reaches, and past which no epoch is new (memoized decisions would never end).
pub(crate) fn next_epoch(current: u64, now_ns: u64) -> Option<u64> {
    Some(current.checked_add(1)?.max(now_ns))
}

/// `ACTIVE`: the active generation, or None when no policy was applied.
pub(crate) fn read_active(ebpf: &Ebpf) -> Result<Option<u8>, DatapathError> {
    let m = ebpf
        .map(names::ACTIVE)
        .ok_or(DatapathError::MissingMap(names::ACTIVE))?;
    let a = Array::<_, u32>::try_from(m).map_err(map_err(names::ACTIVE))?;
    let g = a.get(&0, 0).map_err(map_err(names::ACTIVE))?;
    Ok([GEN_A, GEN_B].into_iter().find(|&x| u32::from(x) == g))
}

/// The LPM key of an address prefix in one generation (IPv4 or IPv6 key data).
trait AddrKey: aya::Pod {
    fn key(generation: u8, net: &IpNet) -> Key<Self>;
    fn generation(&self) -> u8;
    fn net(key: &Key<Self>) -> IpNet;
}

/// `AddrKey` for one family's key data (`AddrV4` + `Ipv4Addr`, `AddrV6` + `Ipv6Addr`).
macro_rules! addr_key {
    ($data:ident, $variant:ident, $addr:ident) => {
        impl AddrKey for $data {
            fn key(generation: u8, net: &IpNet) -> Key<Self> {
                let IpAddr::$variant(a) = net.network() else {
                    unreachable!(
                        "{} prefix in an {} map",
                        stringify!($variant),
                        stringify!($data)
                    )
                };
                let data = $data {
                    generation,
                    addr: a.octets(),
                    _pad: [0; 3],
                };
                Key::new(GEN_BITS + u32::from(net.prefix_len()), data)
            }
            fn generation(&self) -> u8 {
                self.generation
            }
            fn net(key: &Key<Self>) -> IpNet {
                let len = (key.prefix_len() - GEN_BITS) as u8;
                IpNet::new($addr::from(key.data().addr).into(), len)
                    .expect("the kernel returns the prefix lengths it was given")
            }
        }
    };
}
addr_key!(AddrV4, V4, Ipv4Addr);
addr_key!(AddrV6, V6, Ipv6Addr);

fn port_key(generation: u8, k: &PortKey) -> Key<PortData> {
    let data = PortData {
        generation,
        table: k.table.to_be_bytes(),
        proto: k.proto,
        port: k.base.to_be_bytes(),
    };
    Key::new(PORT_KEY_FIXED_BITS + u32::from(k.len), data)
}

fn remove<K: aya::Pod, V: aya::Pod>(
    map: &mut LpmTrie<&mut MapData, K, V>,
    key: &Key<K>,
    name: &'static str,
) -> Result<(), DatapathError> {
    match map.remove(key) {
        Err(e) if !is_not_found(&e) => Err(map_err(name)(e)),
        _ => Ok(()),
    }
}

/// Keys of `generation` in an LPM trie whose key data starts with the generation byte.
fn keys_of<K: aya::Pod, V: aya::Pod>(
    map: &LpmTrie<&mut MapData, K, V>,
    generation: u8,
    gen_of: impl Fn(&K) -> u8,
    name: &'static str,
) -> Result<Vec<(Key<K>, V)>, DatapathError> {
    let mut out = vec![];
    for item in map.iter() {
        let (k, v) = item.map_err(map_err(name))?;
        if gen_of(&k.data()) == generation {
            out.push((k, v));
        }
    }
    Ok(out)
}

/// The policy maps of a loaded object, and the barrier.
pub(crate) struct KernelMaps<'a> {
    ebpf: &'a mut Ebpf,
    barrier: &'a Barrier,
    /// `POLICY_EPOCH`, mapped (`epoch`); None when the datapath was opened to inspect.
    epoch: Option<&'a EpochWord>,
    /// Counters read as they were deleted: (generation, rule, sum over CPUs).
    folded: Vec<(u8, u32, RuleStats)>,
    /// Rule ids below which the kernel may have counted (`Datapath::counted_below`; None: unknown).
    counted_below: Option<u32>,
}

impl<'a> KernelMaps<'a> {
    pub(crate) fn new(
        ebpf: &'a mut Ebpf,
        barrier: &'a Barrier,
        epoch: Option<&'a EpochWord>,
        counted_below: Option<u32>,
    ) -> Self {
        Self {
            ebpf,
            barrier,
            epoch,
            folded: vec![],
            counted_below,
        }
    }

    pub(crate) fn into_folded(self) -> Vec<(u8, u32, RuleStats)> {
        self.folded
    }

    fn put_addr<K: AddrKey, V: aya::Pod>(
        &mut self,
        name: &'static str,
        generation: u8,
        net: &IpNet,
        value: V,
    ) -> Result<(), DatapathError> {
        typed_map!(self.ebpf, LpmTrie<_, K, V>, name)
            .insert(&K::key(generation, net), value, 0)
            .map_err(map_err(name))
    }

    fn delete_addr<K: AddrKey, V: aya::Pod>(
        &mut self,
        name: &'static str,
        generation: u8,
        net: &IpNet,
    ) -> Result<(), DatapathError> {
        remove(
            &mut typed_map!(self.ebpf, LpmTrie<_, K, V>, name),
            &K::key(generation, net),
            name,
        )
    }

    fn read_addr<K: AddrKey, V: aya::Pod>(
        &mut self,
        name: &'static str,
        generation: u8,
        out: &mut std::collections::BTreeMap<IpNet, V>,
    ) -> Result<(), DatapathError> {
        let map = typed_map!(self.ebpf, LpmTrie<_, K, V>, name);
        for (k, v) in keys_of(&map, generation, K::generation, name)? {
            out.insert(K::net(&k), v);
        }
        Ok(())
    }

    fn purge_addr<K: AddrKey, V: aya::Pod>(
        &mut self,
        name: &'static str,
        generation: u8,
    ) -> Result<(), DatapathError> {
        let mut map = typed_map!(self.ebpf, LpmTrie<_, K, V>, name);
        for (k, _) in keys_of(&map, generation, K::generation, name)? {
            remove(&mut map, &k, name)?;
        }
        Ok(())
    }

    fn counter_map(
        &mut self,
    ) -> Result<PerCpuHashMap<&mut MapData, RuleStatsKey, RuleStats>, DatapathError> {
        Ok(typed_map!(self.ebpf, PerCpuHashMap<_, RuleStatsKey, RuleStats>, names::RULE_STATS))
    }

    fn delete_counters(
        &mut self,
        generation: u8,
        rules: impl Iterator<Item = u32>,
    ) -> Result<(), DatapathError> {
        let slots = super::rule_counters::slots(self.ebpf)?;
        for rule in rules {
            // Read, then zero (array) or delete (hash): what the rule counted is handed to the caller
            // (at once: an error on a later rule must not lose it), not lost.
            if let Some(sum) = super::rule_counters::take(self.ebpf, slots, generation, rule)? {
                self.fold(generation, rule, sum);
                continue;
            }
            let mut stats = self.counter_map()?;
            let key = RuleStatsKey {
                generation: u32::from(generation),
                rule,
            };
            let sum = match stats.get(&key, 0) {
                Ok(per_cpu) => Some(super::rule_counters::sum(per_cpu.iter().copied())),
                Err(e) if is_not_found(&e) => None,
                // Not read: not deleted either (its counts would be lost).
                Err(e) => return Err(map_err(names::RULE_STATS)(e)),
            };
            match stats.remove(&key) {
                Err(e) if !is_not_found(&e) => return Err(map_err(names::RULE_STATS)(e)),
                _ => {}
            }
            if let Some(sum) = sum {
                self.fold(generation, rule, sum);
            }
        }
        Ok(())
    }

    /// Hands a deleted counter's counts to the caller (none if it counted nothing).
    fn fold(&mut self, generation: u8, rule: u32, sum: RuleStats) {
        if super::rule_counters::counted(&sum) {
            self.folded.push((generation, rule, sum));
        }
    }

    /// Writes a new `POLICY_EPOCH` (`Op::NewEpoch`): past the one there, so never one written before; in
    /// place, with one 8-byte store (`epoch`), so that no program reads a mix of two epochs.
    fn new_epoch(&mut self) -> Result<(), DatapathError> {
        let refused = |io_error| {
            map_err(names::POLICY_EPOCH)(aya::maps::MapError::SyscallError(
                aya::sys::SyscallError {
                    call: "new epoch",
                    io_error,
                },
            ))
        };
        let word = self.epoch.ok_or_else(|| {
            refused(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the datapath was opened to inspect, which writes nothing",
            ))
        })?;
        let current = word.load();
        let next = next_epoch(current, super::flows::clock_ns(libc::CLOCK_BOOTTIME)).ok_or_else(|| {
            refused(std::io::Error::other(
                "the policy epoch is at its largest value (written by hand?): no new one can end the decisions the programs memoized; restart the datapath (`vpcgate teardown`) to start over",
            ))
        })?;
        word.store(next);
        Ok(())
    }

    fn set_config(&mut self, generation: u8, config: GenConfig) -> Result<(), DatapathError> {
        typed_map!(self.ebpf, Array<_, GenConfig>, names::GEN_CONFIG)
            .set(u32::from(generation), config, 0)
            .map_err(map_err(names::GEN_CONFIG))
    }
}

impl Maps for KernelMaps<'_> {
    fn run(&mut self, op: &Op) -> Result<(), DatapathError> {
        use names::*;
        match op {
            Op::SetConfig { generation, config } => self.set_config(*generation, *config),
            Op::PutAddr {
                generation,
                net,
                value,
            } => match net {
                IpNet::V4(_) => self.put_addr::<AddrV4, _>(ADDR_V4, *generation, net, *value),
                IpNet::V6(_) => self.put_addr::<AddrV6, _>(ADDR_V6, *generation, net, *value),
            },
            Op::DeleteAddr { generation, net } => match net {
                IpNet::V4(_) => self.delete_addr::<AddrV4, AddrValue>(ADDR_V4, *generation, net),
                IpNet::V6(_) => self.delete_addr::<AddrV6, AddrValue>(ADDR_V6, *generation, net),
            },
            Op::PutReserved {
                generation,
                net,
                index,
            } => match net {
                IpNet::V4(_) => self.put_addr::<AddrV4, _>(RESERVED_V4, *generation, net, *index),
                IpNet::V6(_) => self.put_addr::<AddrV6, _>(RESERVED_V6, *generation, net, *index),
            },
            Op::DeleteReserved { generation, net } => match net {
                IpNet::V4(_) => self.delete_addr::<AddrV4, u32>(RESERVED_V4, *generation, net),
                IpNet::V6(_) => self.delete_addr::<AddrV6, u32>(RESERVED_V6, *generation, net),
            },
            Op::PutPort {
                generation,
                key,
                rule,
            } => typed_map!(self.ebpf, LpmTrie<_, PortData, u32>, PORTS)
                .insert(&port_key(*generation, key), *rule, 0)
                .map_err(map_err(PORTS)),
            Op::DeletePort { generation, key } => remove(
                &mut typed_map!(self.ebpf, LpmTrie<_, PortData, u32>, PORTS),
                &port_key(*generation, key),
                PORTS,
            ),
            Op::DeleteCounters { generation, rules } => {
                self.delete_counters(*generation, rules.clone())
            }
            Op::PurgeCounters(generation) => {
                let rules = self.counters(*generation)?;
                self.delete_counters(*generation, rules.into_iter())
            }
            Op::Purge(g) => {
                self.purge_addr::<AddrV4, AddrValue>(ADDR_V4, *g)?;
                self.purge_addr::<AddrV6, AddrValue>(ADDR_V6, *g)?;
                self.purge_addr::<AddrV4, u32>(RESERVED_V4, *g)?;
                self.purge_addr::<AddrV6, u32>(RESERVED_V6, *g)?;
                let mut ports = typed_map!(self.ebpf, LpmTrie<_, PortData, u32>, PORTS);
                for (k, _) in keys_of(&ports, *g, |k| k.generation, PORTS)? {
                    remove(&mut ports, &k, PORTS)?;
                }
                let rules = self.counters(*g)?;
                self.delete_counters(*g, rules.into_iter())?;
                self.set_config(*g, GenConfig::default())
            }
            Op::SetActive(g) => typed_map!(self.ebpf, Array<_, u32>, ACTIVE)
                .set(0, u32::from(*g), 0)
                .map_err(map_err(ACTIVE)),
            Op::Barrier => self.barrier.wait(),
            Op::NewEpoch => self.new_epoch(),
        }
    }

    fn active(&self) -> Result<Option<u8>, DatapathError> {
        read_active(self.ebpf)
    }

    fn read_generation(&mut self, generation: u8) -> Result<GenState, DatapathError> {
        use names::*;
        let mut s = GenState {
            config: typed_map!(self.ebpf, Array<_, GenConfig>, GEN_CONFIG)
                .get(&u32::from(generation), 0)
                .map_err(map_err(GEN_CONFIG))?,
            ..GenState::default()
        };
        self.read_addr::<AddrV4, AddrValue>(ADDR_V4, generation, &mut s.addr)?;
        self.read_addr::<AddrV6, AddrValue>(ADDR_V6, generation, &mut s.addr)?;
        self.read_addr::<AddrV4, u32>(RESERVED_V4, generation, &mut s.reserved)?;
        self.read_addr::<AddrV6, u32>(RESERVED_V6, generation, &mut s.reserved)?;
        let ports = typed_map!(self.ebpf, LpmTrie<_, PortData, u32>, PORTS);
        for (k, rule) in keys_of(&ports, generation, |k| k.generation, PORTS)? {
            let d = k.data();
            let key = PortKey {
                table: u64::from_be_bytes(d.table),
                proto: d.proto,
                base: u16::from_be_bytes(d.port),
                len: (k.prefix_len() - PORT_KEY_FIXED_BITS) as u8,
            };
            s.ports.insert(key, rule);
        }
        Ok(s)
    }

    fn counters(&mut self, generation: u8) -> Result<Vec<u32>, DatapathError> {
        let mut out: Vec<u32> = super::rule_counters::read_all(self.ebpf, self.counted_below)?
            .into_iter()
            .filter(|&(g, _, _)| g == generation)
            .map(|(_, rule, _)| rule)
            .collect();
        let stats = self.counter_map()?;
        for k in stats.keys() {
            let k = k.map_err(map_err(names::RULE_STATS))?;
            if k.generation == u32::from(generation) {
                out.push(k.rule);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::next_epoch;

    #[test]
    fn the_next_epoch_is_past_the_current_one_and_the_clock_and_never_zero() {
        assert_eq!(next_epoch(0, 0), Some(1));
        assert_eq!(next_epoch(5, 3), Some(6));
        assert_eq!(next_epoch(5, 900), Some(900));
        assert_eq!(next_epoch(u64::MAX - 1, 7), Some(u64::MAX));
        assert_eq!(next_epoch(u64::MAX, 7), None);
        for (current, now) in [(0, 0), (1, 1), (41, 40), (41, 42), (u64::MAX - 1, 0)] {
            let next = next_epoch(current, now).unwrap();
            assert!(next != 0 && next >= now && next > current);
        }
    }
}
