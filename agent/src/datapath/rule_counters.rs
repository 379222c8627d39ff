//! `RULE_COUNTERS`, the array where the kernel counts each rule's packets: slot
//! `rule_counter_slot(generation, rule)` of the running CPU's region (`rule_counter_index`), `slots` per
//! CPU, sized at load to this host's CPUs (and the programs told the size: `RULE_COUNTER_SLOTS`); rules
//! past its slots are counted in `RULE_STATS` (`maps.rs`). Reading the whole array one syscall per slot
//! would cost hundreds of thousands of syscalls: it is read in batches (`BPF_MAP_LOOKUP_BATCH`, arrays
//! since Linux 5.6), slot by slot only where the kernel has no batch reads.
//!
//! Which slots exist is always the kernel's answer (the map's `max_entries` as the kernel reports it, over
//! this host's possible CPUs), never the size this agent would have chosen: the kernel counts a rule in
//! the hash exactly when its slot is past that end, and adopted pinned maps keep the size they were
//! created with.

use std::os::fd::{AsFd, AsRawFd};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, MapError},
};
use aya_obj::generated::{bpf_attr, bpf_attr__bindgen_ty_3, bpf_cmd};
use vpcgate_common::datapath::{
    GEN_A, GEN_B, RuleStats, names, rule_counter_index, rule_counter_slot,
};

use super::{DatapathError, maps::map_err};

const NAME: &str = names::RULE_COUNTERS;

fn syscall_err(call: &'static str, io_error: std::io::Error) -> DatapathError {
    DatapathError::Map {
        map: NAME,
        source: MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
    }
}

const POSSIBLE: &str = "/sys/devices/system/cpu/possible";

/// The regions `RULE_COUNTERS` has: one per CPU id a program can run on, the highest possible CPU's id
/// plus one (the number of possible CPUs, unless their ids have gaps).
/// Read once per process: the possible CPUs are fixed at boot.
pub(crate) fn cpu_regions() -> Result<usize, DatapathError> {
    static REGIONS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    if let Some(&n) = REGIONS.get() {
        return Ok(n);
    }
    let text = std::fs::read_to_string(POSSIBLE).map_err(|e| syscall_err("read", e))?;
    let n = highest_cpu(text.trim())
        .map(|h| h as usize + 1)
        .ok_or_else(|| {
            syscall_err(
                "read",
                std::io::Error::other(format!("{POSSIBLE}: {text:?} is no list of CPU ranges")),
            )
        })?;
    Ok(*REGIONS.get_or_init(|| n))
}

/// The highest CPU id of a kernel CPU list ("0-3,8-11"), None if it is not one.
fn highest_cpu(list: &str) -> Option<u32> {
    list.split([',', '-'])
        .map(|n| n.parse::<u32>().ok())
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .max()
}

/// The slots per CPU `RULE_COUNTERS` gets at load on this host.
pub(crate) fn rule_counter_slots() -> Result<u32, DatapathError> {
    Ok(vpcgate_common::datapath::rule_counter_slots(
        cpu_regions()? as u32
    ))
}

/// The programs' name of the slots per CPU (a read-only global the loader sets).
const SLOTS_GLOBAL: &str = "RULE_COUNTER_SLOTS";

/// Sizes `RULE_COUNTERS` at `slots` per CPU (a region per possible CPU) and tells the programs
/// (`RULE_COUNTER_SLOTS`): both from the one value, so that no program counts past its CPU's region.
pub(crate) fn size<'a>(l: &mut EbpfLoader<'a>, slots: &'a u32) -> Result<(), DatapathError> {
    let cpus = cpu_regions()? as u32;
    let entries = slots.checked_mul(cpus).ok_or_else(|| {
        syscall_err(
            "size",
            std::io::Error::other(format!(
                "{slots} slots for each of {cpus} CPUs exceed an array's elements"
            )),
        )
    })?;
    l.map_max_entries(NAME, entries);
    l.override_global(SLOTS_GLOBAL, slots, true);
    Ok(())
}

/// Slots per CPU of an array of `entries` elements (an adopted pinned one).
pub(crate) fn slots_of(entries: u32) -> Result<u32, DatapathError> {
    let cpus = cpu_regions()? as u32;
    if entries == 0 || !entries.is_multiple_of(cpus) {
        return Err(syscall_err(
            "size",
            std::io::Error::other(format!(
                "the pinned array holds {entries} elements, not a region for each of this host's {cpus} possible CPUs"
            )),
        ));
    }
    Ok(entries / cpus)
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
        Map::Array(m) => Ok(m),
        _ => Err(map_err(NAME)(MapError::InvalidMapType { map_type: 0 })),
    }
}

/// The slots per CPU of the loaded `RULE_COUNTERS`, as the kernel has it.
pub(crate) fn slots(ebpf: &Ebpf) -> Result<u32, DatapathError> {
    slots_of(map_data(ebpf)?.info().map_err(map_err(NAME))?.max_entries())
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
    let per_cpu = slots(ebpf)?;
    let n = per_cpu.min(counted_below.map_or(u32::MAX, slots_below));
    let mut sums = vec![RuleStats::default(); n as usize];
    let map = map_data(ebpf)?;
    for cpu in 0..cpu_regions()? as u32 {
        let start = rule_counter_index(cpu, per_cpu, 0).ok_or_else(|| {
            syscall_err(
                "index",
                std::io::Error::other("a CPU's region lies past u32"),
            )
        })?;
        let region = match read_range(map, start, n) {
            Ok(region) => region,
            // No batch reads of arrays before Linux 5.6 (EINVAL), or none for this map
            // (ENOTSUPP): element by element.
            Err(e)
                if e.raw_os_error() == Some(ENOTSUPP) || e.raw_os_error() == Some(libc::EINVAL) =>
            {
                let a = Array::<_, RuleStats>::try_from(
                    ebpf.map(NAME).ok_or(DatapathError::MissingMap(NAME))?,
                )
                .map_err(map_err(NAME))?;
                (start..start + n)
                    .map(|i| a.get(&i, 0))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(map_err(NAME))?
            }
            Err(e) => return Err(syscall_err("bpf_map_lookup_batch", e)),
        };
        for (total, s) in sums.iter_mut().zip(region) {
            *total = sum([*total, s]);
        }
    }
    Ok(sums
        .into_iter()
        .enumerate()
        .filter(|(_, s)| counted(s))
        .map(|(slot, s)| {
            let (g, rule) = owner(slot as u32);
            (g, rule, s)
        })
        .collect())
}

/// The kernel's ENOTSUPP (not in libc: it is no userspace errno).
const ENOTSUPP: i32 = 524;

/// The `count` elements of `map` from index `start`, read in batches.
fn read_range(map: &MapData, start: u32, count: u32) -> std::io::Result<Vec<RuleStats>> {
    let mut out = vec![RuleStats::default(); count as usize];
    let fd = map.fd().as_fd().as_raw_fd();
    const STRIDE: usize = std::mem::size_of::<RuleStats>();
    const _: () = assert!(STRIDE.is_multiple_of(8));
    let batch = (BATCH_BYTES / STRIDE).clamp(1, count.max(1) as usize);
    let mut keys = vec![0u32; batch];
    let mut values = vec![RuleStats::default(); batch];
    let end = start as usize + count as usize;
    let mut next = start as usize;
    while next < end {
        // The kernel resumes after the key `in_batch` points at (none: from the array's first element).
        let mut token = next.saturating_sub(1) as u32;
        // SAFETY: an all-zero bpf_attr is the documented "no options" value of every command.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.batch = bpf_attr__bindgen_ty_3 {
            in_batch: if next == 0 {
                0
            } else {
                &token as *const u32 as u64
            },
            out_batch: &mut token as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: batch.min(end - next) as u32,
            map_fd: fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` points at buffers of `count` keys and values, alive for the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                bpf_cmd::BPF_MAP_LOOKUP_BATCH as libc::c_long,
                &mut attr as *mut bpf_attr,
                std::mem::size_of::<bpf_attr>(),
            )
        };
        let last = if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
            true
        } else {
            false
        };
        // SAFETY: the kernel wrote back how many elements it copied.
        let n = (unsafe { attr.batch.count } as usize).min(batch);
        for (&index, &value) in keys[..n].iter().zip(&values[..n]) {
            if let Some(o) = (index as usize)
                .checked_sub(start as usize)
                .and_then(|i| out.get_mut(i))
            {
                *o = value;
            }
        }
        next += n;
        if last || n == 0 {
            break;
        }
    }
    Ok(out)
}

/// Reads and zeroes `rule`'s slot of `generation` in every CPU's region (what it counted, summed over
/// CPUs), or None when the rule lies past the array's `slots` per CPU (`slots()`; its counter is in
/// `RULE_STATS`). A packet counted between a region's read and its zeroing is lost, as with a hash counter
/// deleted after its read.
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
    let cpus = cpu_regions()? as u32;
    let m = ebpf.map_mut(NAME).ok_or(DatapathError::MissingMap(NAME))?;
    let mut a = Array::<_, RuleStats>::try_from(m).map_err(map_err(NAME))?;
    // Every region read before any is zeroed: a failed read loses nothing.
    let mut read = vec![];
    for cpu in 0..cpus {
        if let Some(i) = rule_counter_index(cpu, slots, slot) {
            read.push((i, a.get(&i, 0).map_err(map_err(NAME))?));
        }
    }
    let total = sum(read.iter().map(|&(_, s)| s));
    for (i, s) in read {
        if counted(&s) {
            a.set(i, RuleStats::default(), 0).map_err(map_err(NAME))?;
        }
    }
    Ok(Some(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpcgate_common::datapath::{limits, rule_counter_slots};

    #[test]
    fn regions_cover_every_possible_cpu_id() {
        assert_eq!(highest_cpu("0"), Some(0));
        assert_eq!(highest_cpu("0-1"), Some(1));
        assert_eq!(highest_cpu("0-3,8-11"), Some(11));
        assert_eq!(highest_cpu("0,2,4"), Some(4));
        assert_eq!(highest_cpu(""), None);
        assert_eq!(highest_cpu("0-x"), None);
        let regions = cpu_regions().unwrap();
        assert!(regions >= aya::util::nr_cpus().unwrap());
    }

    #[test]
    fn regions_never_overlap_and_never_pass_the_array() {
        for cpus in [1u32, 2, 3, 64, 8192] {
            let slots = rule_counter_slots(cpus);
            let entries = u64::from(slots) * u64::from(cpus);
            for cpu in [0, cpus / 2, cpus - 1] {
                for slot in [0, 1, slots - 1] {
                    let i = rule_counter_index(cpu, slots, slot).unwrap();
                    assert!(u64::from(i) < entries, "{cpus} CPUs: cpu {cpu} slot {slot}");
                    assert_eq!(i / slots, cpu, "the slot lies in its CPU's region");
                    assert_eq!(i % slots, slot);
                }
            }
        }
        assert_eq!(rule_counter_index(1 << 16, 1 << 16, 0), None);
    }

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
