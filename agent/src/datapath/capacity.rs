//! Entry counts of a compiled policy against the capacity of each kernel map, checked before any write.

use ipnet::IpNet;
use vpcgate_common::datapath::{limits, names};

use super::{DatapathError, state::used_tables};
use crate::policy::compile::Compiled;
pub use crate::policy::compile::EntryCounts;

/// How many entries a compiled policy needs in each map, recounted from the compiled entries (the compile
/// counts as it goes, to stop early; the two must agree).
pub fn entry_counts(c: &Compiled) -> EntryCounts {
    let addr = |v4: bool| {
        c.addr_entries
            .iter()
            .filter(|(n, _)| n.addr().is_ipv4() == v4)
            .count() as u32
    };
    EntryCounts {
        addr_v4: addr(true),
        addr_v6: addr(false),
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

/// `MapFull` naming the first map the policy does not fit in.
/// (map, capacity per generation, entries the policy needs) for every capacity-bound kernel map.
pub fn usage(n: &EntryCounts) -> [(&'static str, u32, u32); 6] {
    [
        (names::ADDR_V4, limits::ADDR_ENTRIES, n.addr_v4),
        (names::ADDR_V6, limits::ADDR_ENTRIES, n.addr_v6),
        (names::RESERVED_V4, limits::RESERVED_ENTRIES, n.reserved_v4),
        (names::RESERVED_V6, limits::RESERVED_ENTRIES, n.reserved_v6),
        (names::PORTS, limits::PORT_ENTRIES, n.ports),
        (names::RULE_STATS, limits::RULES, n.rules),
    ]
}

pub(crate) fn check_capacity(n: &EntryCounts) -> Result<(), DatapathError> {
    for (map, capacity, needed) in usage(n) {
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

#[cfg(test)]
mod object_tests {
    use vpcgate_common::datapath::{limits, names};

    /// The capacities `check` and `apply` count against are the maps the embedded object creates: room
    /// for two generations of each, and rule counters allocated per rule rather than preallocated.
    #[test]
    fn the_objects_policy_maps_hold_two_generations_of_each_limit() {
        let obj =
            aya_obj::Object::parse(super::super::EBPF_OBJECT).expect("the embedded object parses");
        let map = |name: &str| {
            obj.maps
                .get(name)
                .unwrap_or_else(|| panic!("{name} is not in the object"))
        };
        for (name, limit) in [
            (names::ADDR_V4, limits::ADDR_ENTRIES),
            (names::ADDR_V6, limits::ADDR_ENTRIES),
            (names::RESERVED_V4, limits::RESERVED_ENTRIES),
            (names::RESERVED_V6, limits::RESERVED_ENTRIES),
            (names::PORTS, limits::PORT_ENTRIES),
            (names::RULE_STATS, limits::RULES),
        ] {
            assert_eq!(map(name).max_entries(), 2 * limit, "{name}");
        }
        // BPF_F_NO_PREALLOC: two million preallocated per-CPU counters would cost memory whether or not
        // the policy has that many rules.
        assert_eq!(map(names::RULE_STATS).map_flags() & 1, 1);
    }
}
