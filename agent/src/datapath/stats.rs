use aya::{Ebpf, maps::PerCpuArray};
use vpcgate_common::{
    maps,
    parse_stats::{ALL_HOOKS, ALL_STATS, HOOK_COUNT, Hook, STAT_COUNT, Stat, index},
};

use super::DatapathError;

/// Parse counters summed over CPUs, per hook.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParseStats {
    counts: [[u64; STAT_COUNT as usize]; HOOK_COUNT as usize],
}

impl ParseStats {
    pub fn get(&self, hook: Hook, stat: Stat) -> u64 {
        self.counts[hook as usize][stat as usize]
    }

    /// `(name, count)` for every stat of `hook`, in index order.
    pub fn by_name(&self, hook: Hook) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        ALL_STATS
            .iter()
            .map(move |&s| (s.name(), self.get(hook, s)))
    }
}

/// Reads and sums the per-CPU `PARSE_STATS` array of a loaded object.
pub fn read_parse_stats(ebpf: &Ebpf) -> Result<ParseStats, DatapathError> {
    let map = ebpf
        .map(maps::PARSE_STATS)
        .ok_or(DatapathError::MissingMap(maps::PARSE_STATS))?;
    let array = PerCpuArray::<_, u64>::try_from(map).map_err(|source| DatapathError::Map {
        map: maps::PARSE_STATS,
        source,
    })?;
    let mut stats = ParseStats::default();
    for hook in ALL_HOOKS {
        for stat in ALL_STATS {
            let per_cpu =
                array
                    .get(&index(hook, stat), 0)
                    .map_err(|source| DatapathError::Map {
                        map: maps::PARSE_STATS,
                        source,
                    })?;
            stats.counts[hook as usize][stat as usize] = per_cpu.iter().sum();
        }
    }
    Ok(stats)
}
