//! Reading counters of a loaded object (not policy entries: those go through `plan` and `execute`; flow
//! state is in `flows`). One small method per map.

use std::collections::HashMap;

use aya::maps::{Array, PerCpuArray, PerCpuHashMap};
use vpcgate_common::{
    datapath::{
        AUDIT_OFFSET, FLAG_RECORD_LAST, GenConfig, LastVerdict, RuleStats, RuleStatsKey, names,
    },
    verdict::DropReason,
};

use super::{
    Datapath, DatapathError,
    maps::{map_err, typed_map},
};

/// Drop counters summed over CPUs, by reason, enforced and audited.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DropCounts {
    pub dropped: HashMap<DropReason, u64>,
    pub audited: HashMap<DropReason, u64>,
}

impl Datapath {
    pub(crate) fn read_map(&self, name: &'static str) -> Result<&aya::maps::Map, DatapathError> {
        self.ebpf().map(name).ok_or(DatapathError::MissingMap(name))
    }

    /// Per-rule counters of the active generation, summed over CPUs: rule id -> (packets, bytes), from
    /// `RULE_COUNTERS` and, for rules past its slots, `RULE_STATS`.
    pub fn rule_stats(&self) -> Result<HashMap<u32, RuleStats>, DatapathError> {
        let active = self.active_generation()?;
        let generation = active.map_or(0, u32::from);
        let mut out: HashMap<u32, RuleStats> =
            super::rule_counters::read_all(self.ebpf(), self.counted_below)?
                .into_iter()
                .filter(|&(g, _, _)| Some(g) == active)
                .map(|(_, rule, s)| (rule, s))
                .collect();
        let stats = PerCpuHashMap::<_, RuleStatsKey, RuleStats>::try_from(
            self.read_map(names::RULE_STATS)?,
        )
        .map_err(map_err(names::RULE_STATS))?;
        for item in stats.iter() {
            let (k, per_cpu) = item.map_err(map_err(names::RULE_STATS))?;
            if k.generation != generation {
                continue;
            }
            // A rule is counted in one map or the other (by its slot); added, not replaced, all the same.
            let s = super::rule_counters::sum(per_cpu.iter().copied());
            let e = out.entry(k.rule).or_default();
            e.packets += s.packets;
            e.bytes += s.bytes;
        }
        Ok(out)
    }

    /// Slots per CPU of `RULE_COUNTERS` in the loaded object (rules past them are counted in
    /// `RULE_STATS`).
    pub fn rule_counter_slots(&self) -> Result<u32, DatapathError> {
        super::rule_counters::slots(self.ebpf())
    }

    /// Drop counters by reason, summed over CPUs.
    pub fn drop_counts(&self) -> Result<DropCounts, DatapathError> {
        let a = PerCpuArray::<_, u64>::try_from(self.read_map(names::DROP_STATS)?)
            .map_err(map_err(names::DROP_STATS))?;
        let sum = |i: u32| -> Result<u64, DatapathError> {
            Ok(a.get(&i, 0)
                .map_err(map_err(names::DROP_STATS))?
                .iter()
                .sum())
        };
        let mut out = DropCounts::default();
        for r in DropReason::ALL {
            out.dropped.insert(r, sum(r.code())?);
            out.audited.insert(r, sum(r.code() + AUDIT_OFFSET)?);
        }
        Ok(out)
    }

    /// Test hook: record every verdict in `LAST_VERDICT` (one shared cache line written per packet: never
    /// in production). `GEN_CONFIG[0]` holds global flags only, no policy.
    pub fn set_record_last(&mut self, on: bool) -> Result<(), DatapathError> {
        let flags = if on { FLAG_RECORD_LAST } else { 0 };
        typed_map!(self.ebpf_mut(), Array<_, GenConfig>, names::GEN_CONFIG)
            .set(
                0,
                GenConfig {
                    flags,
                    ..GenConfig::default()
                },
                0,
            )
            .map_err(map_err(names::GEN_CONFIG))
    }

    /// Test hook: writes `record` as record `index` (`verdict_cache_index`) of `VERDICT_CACHE` on every
    /// CPU, as if a run had memoized it there (the agent itself never writes the map). It writes the
    /// record's element back whole: call it with no traffic running.
    #[doc(hidden)]
    pub fn plant_verdict_memo(
        &mut self,
        index: u32,
        record: vpcgate_common::datapath::VerdictMemo,
    ) -> Result<(), DatapathError> {
        let name = vpcgate_common::datapath::names::VERDICT_CACHE;
        let block = vpcgate_common::datapath::limits::VERDICT_CACHE_BLOCK;
        let mut a = typed_map!(
            self.ebpf_mut(),
            PerCpuArray<_, vpcgate_common::datapath::VerdictBlock>,
            name
        );
        let elements: Vec<_> = a
            .get(&(index / block), 0)
            .map_err(map_err(name))?
            .iter()
            .map(|e| {
                let mut e = *e;
                e[(index % block) as usize] = record;
                e
            })
            .collect();
        let values =
            aya::maps::PerCpuValues::try_from(elements).map_err(|e| DatapathError::Map {
                map: name,
                source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "per-cpu values",
                    io_error: e,
                }),
            })?;
        a.set(index / block, values, 0).map_err(map_err(name))
    }

    /// Test hook: sets this hook's per-CPU scratch busy flag to `busy` on every CPU: nonzero marks the
    /// slot taken, as if a program run held it (a run that finds it taken must fail closed); 0 frees it.
    /// It writes every CPU's slot back whole (with the pending observations it read): call it with no
    /// traffic running.
    #[doc(hidden)]
    pub fn set_scratch_busy(
        &mut self,
        hook: vpcgate_common::parse_stats::Hook,
        busy: u64,
    ) -> Result<(), DatapathError> {
        let name = vpcgate_common::datapath::names::SCRATCH;
        let mut a = typed_map!(
            self.ebpf_mut(),
            PerCpuArray<_, [u8; vpcgate_common::datapath::SCRATCH_SIZE]>,
            name
        );
        // Only the busy flag changes: the slot also holds the hook's pending observations.
        let slots: Vec<_> = a
            .get(&(hook as u32), 0)
            .map_err(map_err(name))?
            .iter()
            .map(|s| {
                let mut s = *s;
                s[..8].copy_from_slice(&busy.to_ne_bytes());
                s
            })
            .collect();
        let values = aya::maps::PerCpuValues::try_from(slots).map_err(|e| DatapathError::Map {
            map: name,
            source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "per-cpu values",
                io_error: e,
            }),
        })?;
        a.set(hook as u32, values, 0).map_err(map_err(name))
    }

    pub fn last_verdict(&self) -> Result<LastVerdict, DatapathError> {
        let a = Array::<_, LastVerdict>::try_from(self.read_map(names::LAST_VERDICT)?)
            .map_err(map_err(names::LAST_VERDICT))?;
        a.get(&0, 0).map_err(map_err(names::LAST_VERDICT))
    }
}
