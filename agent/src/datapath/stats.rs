use aya::{Ebpf, maps::PerCpuArray};
use vpcgate_common::{
    maps,
    parse_stats::{ALL_HOOKS, ALL_STATS, HOOK_COUNT, Hook, ParseRow, STAT_COUNT, Stat},
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
    let array = PerCpuArray::<_, ParseRow>::try_from(map).map_err(|source| DatapathError::Map {
        map: maps::PARSE_STATS,
        source,
    })?;
    let mut stats = ParseStats::default();
    for hook in ALL_HOOKS {
        let per_cpu = array
            .get(&(hook as u32), 0)
            .map_err(|source| DatapathError::Map {
                map: maps::PARSE_STATS,
                source,
            })?;
        for stat in ALL_STATS {
            stats.counts[hook as usize][stat as usize] =
                per_cpu.iter().map(|row| row[stat as usize]).sum();
        }
    }
    Ok(stats)
}
