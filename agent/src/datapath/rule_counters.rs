//! `RULE_COUNTERS`, the per-CPU array where the kernel counts each rule's packets at
//! `rule_counter_slot(generation, rule)`, sized at load to this host's CPUs; rules past its slots are
//! counted in `RULE_STATS` (`maps.rs`). Reading the whole array one syscall per slot would cost hundreds
//! of thousands of syscalls: it is read in batches (`BPF_MAP_LOOKUP_BATCH`, per-CPU arrays since Linux
//! 5.13), slot by slot only where the kernel has no batch reads.
//!
//! Which slots exist is always the kernel's answer (the map's `max_entries` as the kernel reports it),
//! never the size this agent would have chosen: the kernel counts a rule in the hash exactly when its slot
//! is past that end, and adopted pinned maps keep the size they were created with.

use std::os::fd::{AsFd, AsRawFd};

use aya::{
    Ebpf,
    maps::{Map, MapData, MapError, PerCpuArray, PerCpuValues},
};
use aya_obj::generated::{bpf_attr, bpf_attr__bindgen_ty_3, bpf_cmd};
use vpcgate_common::datapath::{GEN_A, GEN_B, RuleStats, names, rule_counter_slot};

use super::{DatapathError, maps::map_err};

const NAME: &str = names::RULE_COUNTERS;

fn syscall_err(call: &'static str, io_error: std::io::Error) -> DatapathError {
    DatapathError::Map {
        map: NAME,
        source: MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
    }
}

/// This host's possible CPUs (what per-CPU maps hold a copy for).
fn possible_cpus() -> Result<usize, DatapathError> {
    aya::util::nr_cpus().map_err(|(_, e)| syscall_err("nr_cpus", e))
}

/// The slots `RULE_COUNTERS` gets at load on this host.
pub(crate) fn rule_counter_slots() -> Result<u32, DatapathError> {
    Ok(vpcgate_common::datapath::rule_counter_slots(
        possible_cpus()? as u32,
    ))
}

/// The (generation, rule) a slot counts (the inverse of `rule_counter_slot`).
fn owner(slot: u32) -> (u8, u32) {
    let generation = if slot & 1 == u32::from(GEN_A) & 1 {
        GEN_A
    } else {
        GEN_B
    };
    debug_assert_eq!(rule_counter_slot(u32::from(generation), slot >> 1), slot);
    (generation, slot >> 1)
}

/// Whether a counter counted anything.
pub(crate) fn counted(s: &RuleStats) -> bool {
    s.packets != 0 || s.bytes != 0
}

pub(crate) fn sum(per_cpu: impl IntoIterator<Item = RuleStats>) -> RuleStats {
    per_cpu
        .into_iter()
        .fold(RuleStats::default(), |a, s| RuleStats {
            packets: a.packets + s.packets,
            bytes: a.bytes + s.bytes,
        })
}

fn map_data(ebpf: &Ebpf) -> Result<&MapData, DatapathError> {
    match ebpf.map(NAME).ok_or(DatapathError::MissingMap(NAME))? {
        Map::PerCpuArray(m) => Ok(m),
        _ => Err(map_err(NAME)(MapError::InvalidMapType { map_type: 0 })),
    }
}

/// The slots of the loaded `RULE_COUNTERS`, as the kernel has it.
pub(crate) fn slots(ebpf: &Ebpf) -> Result<u32, DatapathError> {
    Ok(map_data(ebpf)?.info().map_err(map_err(NAME))?.max_entries())
}

/// Bytes of values one `BPF_MAP_LOOKUP_BATCH` call copies at most.
pub const BATCH_BYTES: usize = 1 << 20;

/// The slots that can hold counters of rule ids below `rules`, in both generations.
fn slots_below(rules: u32) -> u32 {
    rule_counter_slot(u32::from(GEN_A), rules.saturating_sub(1))
        .max(rule_counter_slot(u32::from(GEN_B), rules.saturating_sub(1)))
        + 1
}

/// Every rule with a non-zero counter in `RULE_COUNTERS`, summed over CPUs: (generation, rule, counts).
/// `counted_below`: only rule ids below it can have counted (`Datapath::counted_below`; None: read
/// all). A new generation's apply reads twice (the slot it writes, the slot it empties): reading only
/// what the policies applied since the array was created could have used keeps that proportional to the
/// policy, not to the array.
pub(crate) fn read_all(
    ebpf: &Ebpf,
    counted_below: Option<u32>,
) -> Result<Vec<(u8, u32, RuleStats)>, DatapathError> {
    let slots = slots(ebpf)?.min(counted_below.map_or(u32::MAX, slots_below));
    let mut all = vec![];
    let mut keep = |slot: u32, s: RuleStats| {
        if counted(&s) {
            all.push((slot, s));
        }
    };
    match read_batched(map_data(ebpf)?, slots, &mut keep) {
        Ok(()) => {}
        // No batch reads of per-CPU arrays before Linux 5.13 (ENOTSUPP), none at all before 5.6
        // (EINVAL): slot by slot, from the start.
        Err(e) if e.raw_os_error() == Some(ENOTSUPP) || e.raw_os_error() == Some(libc::EINVAL) => {
            all.clear();
            let a = PerCpuArray::<_, RuleStats>::try_from(
                ebpf.map(NAME).ok_or(DatapathError::MissingMap(NAME))?,
            )
            .map_err(map_err(NAME))?;
            for slot in 0..slots {
                let s = sum(a.get(&slot, 0).map_err(map_err(NAME))?.iter().copied());
                if counted(&s) {
                    all.push((slot, s));
                }
            }
        }
        Err(e) => return Err(syscall_err("bpf_map_lookup_batch", e)),
    }
    Ok(all
        .into_iter()
        .map(|(slot, s)| {
            let (g, rule) = owner(slot);
            (g, rule, s)
        })
        .collect())
}

/// The kernel's ENOTSUPP (not in libc: it is no userspace errno).
const ENOTSUPP: i32 = 524;

/// Hands every slot of `map` (`slots` of them), summed over CPUs, to `each`, reading in batches.
fn read_batched(
    map: &MapData,
    slots: u32,
    each: &mut impl FnMut(u32, RuleStats),
) -> std::io::Result<()> {
    let fd = map.fd().as_fd().as_raw_fd();
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    // A per-CPU value is copied as one 8-byte-aligned copy per possible CPU.
    const STRIDE: usize = std::mem::size_of::<RuleStats>();
    const _: () = assert!(STRIDE.is_multiple_of(8));
    let batch = (BATCH_BYTES / (STRIDE * cpus)).clamp(1, slots.max(1) as usize);
    let mut keys = vec![0u32; batch];
    let mut values = vec![RuleStats::default(); batch * cpus];
    let slots = slots as usize;
    let mut token = 0u32;
    let mut first = true;
    let mut done = 0usize;
    while done < slots {
        // SAFETY: an all-zero bpf_attr is the documented "no options" value of every command.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.batch = bpf_attr__bindgen_ty_3 {
            in_batch: if first {
                0
            } else {
                &token as *const u32 as u64
            },
            out_batch: &mut token as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: batch.min(slots - done) as u32,
            map_fd: fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` points at buffers of `count` keys and `count × cpus` values, alive for the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                bpf_cmd::BPF_MAP_LOOKUP_BATCH as libc::c_long,
                &mut attr as *mut bpf_attr,
                std::mem::size_of::<bpf_attr>(),
            )
        };
        let end = if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
            true
        } else {
            false
        };
        // SAFETY: the kernel wrote back how many slots it copied.
        let n = (unsafe { attr.batch.count } as usize).min(batch);
        for (i, &slot) in keys[..n].iter().enumerate() {
            each(slot, sum(values[i * cpus..(i + 1) * cpus].iter().copied()));
        }
        done += n;
        first = false;
        if end || n == 0 {
            break;
        }
    }
    Ok(())
}

/// Reads and zeroes `rule`'s slot of `generation` (what it counted, summed over CPUs), or None when the
/// rule lies past the array's `slots` (`slots()`; its counter is in `RULE_STATS`). A packet counted between the read
/// and the zeroing is lost, as with a hash counter deleted after its read.
pub(crate) fn take(
    ebpf: &mut Ebpf,
    slots: u32,
    generation: u8,
    rule: u32,
) -> Result<Option<RuleStats>, DatapathError> {
    let slot = rule_counter_slot(u32::from(generation), rule);
    if slot >= slots {
        return Ok(None);
    }
    let m = ebpf.map_mut(NAME).ok_or(DatapathError::MissingMap(NAME))?;
    let mut a = PerCpuArray::<_, RuleStats>::try_from(m).map_err(map_err(NAME))?;
    let per_cpu = a.get(&slot, 0).map_err(map_err(NAME))?;
    let s = sum(per_cpu.iter().copied());
    if counted(&s) {
        let zero = PerCpuValues::try_from(vec![RuleStats::default(); per_cpu.len()])
            .map_err(|e| syscall_err("per-cpu values", e))?;
        a.set(slot, zero, 0).map_err(map_err(NAME))?;
    }
    Ok(Some(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpcgate_common::datapath::{limits, rule_counter_slots};

    #[test]
    fn slots_and_owners_are_inverse_and_generations_interleave() {
        for rule in [0, 1, 2, 1023, limits::RULES - 1] {
            for g in [GEN_A, GEN_B] {
                let slot = rule_counter_slot(u32::from(g), rule);
                assert_eq!(owner(slot), (g, rule));
                assert!(slot < 2 * limits::RULES);
            }
            assert_eq!(
                rule_counter_slot(u32::from(GEN_A), rule)
                    ^ rule_counter_slot(u32::from(GEN_B), rule),
                1,
                "both generations of a rule are neighbours"
            );
        }
    }

    #[test]
    fn the_array_stays_within_its_memory_budget_and_holds_every_rule_on_small_hosts() {
        let per_slot = std::mem::size_of::<RuleStats>() as u64;
        for cpus in [
            1u32, 2, 3, 4, 6, 8, 12, 16, 48, 64, 96, 128, 256, 1024, 8192,
        ] {
            let n = rule_counter_slots(cpus);
            assert!(n.is_power_of_two(), "{cpus} CPUs: {n}");
            assert!((limits::RULE_COUNTERS_MIN_SLOTS..=2 * limits::RULES).contains(&n));
            if n > limits::RULE_COUNTERS_MIN_SLOTS {
                assert!(u64::from(n) * per_slot * u64::from(cpus) <= limits::RULE_COUNTERS_BYTES);
            }
            // The largest power of two that fits: twice as many would not.
            if n < 2 * limits::RULES {
                assert!(
                    2 * u64::from(n) * per_slot * u64::from(cpus) > limits::RULE_COUNTERS_BYTES
                );
            }
        }
        assert_eq!(rule_counter_slots(1), 1 << 19);
        assert_eq!(rule_counter_slots(2), 1 << 18);
        assert_eq!(rule_counter_slots(64), 1 << 13);
        assert_eq!(rule_counter_slots(8192), limits::RULE_COUNTERS_MIN_SLOTS);
    }
}
