//! `VERDICT_CACHE`, where each enforcing hook keeps decisions by rules 4-7 per CPU
//! (`vpcgate_common::datapath::VerdictMemo`): sized at load to this host's CPUs, within
//! `limits::VERDICT_CACHE_BYTES`, and the programs told the size (`VERDICT_CACHE_BITS`). The agent never
//! writes it: a record holds only while the policy epoch it was made in is current.

use aya::{EbpfLoader, maps::MapError};
use vpcgate_common::datapath::{limits, names, verdict_cache_bits, verdict_cache_elements};

use super::{DatapathError, rule_counters::cpu_regions};

const NAME: &str = names::VERDICT_CACHE;

/// The programs' name of the region size (a read-only global the loader sets).
const BITS_GLOBAL: &str = "VERDICT_CACHE_BITS";

fn size_err(message: String) -> DatapathError {
    DatapathError::Map {
        map: NAME,
        source: MapError::SyscallError(aya::sys::SyscallError {
            call: "size",
            io_error: std::io::Error::other(message),
        }),
    }
}

/// log2 of the records each hook gets per CPU on this host.
pub(crate) fn host_bits() -> Result<u32, DatapathError> {
    Ok(verdict_cache_bits(cpu_regions()? as u32))
}

/// Sizes `VERDICT_CACHE` at `bits` and tells the programs (`VERDICT_CACHE_BITS`): both from the one
/// value, so that no program indexes past the map.
pub(crate) fn size<'a>(l: &mut EbpfLoader<'a>, bits: &'a u32) {
    l.map_max_entries(NAME, verdict_cache_elements(*bits));
    l.override_global(BITS_GLOBAL, bits, true);
}

/// The `bits` an array of `elements` elements was sized at (an adopted pinned one).
pub(crate) fn bits_of(elements: u32) -> Result<u32, DatapathError> {
    (limits::VERDICT_CACHE_MIN_BITS..=limits::VERDICT_CACHE_MAX_BITS)
        .find(|&b| verdict_cache_elements(b) == elements)
        .ok_or_else(|| {
            size_err(format!(
                "the pinned array holds {elements} elements, not a size this agent makes ({} to {})",
                verdict_cache_elements(limits::VERDICT_CACHE_MIN_BITS),
                verdict_cache_elements(limits::VERDICT_CACHE_MAX_BITS)
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_size_made_is_recognized_when_adopted_and_no_other() {
        for cpus in [1, 2, 3, 8, 11, 64, 192, 4096] {
            let bits = verdict_cache_bits(cpus);
            assert!(
                (limits::VERDICT_CACHE_MIN_BITS..=limits::VERDICT_CACHE_MAX_BITS).contains(&bits),
                "{cpus} CPUs: {bits}"
            );
            assert_eq!(bits_of(verdict_cache_elements(bits)).unwrap(), bits);
            // Within the budget whenever the smallest size is.
            let bytes = u64::from(cpus)
                * u64::from(verdict_cache_elements(bits))
                * size_of::<vpcgate_common::datapath::VerdictBlock>() as u64;
            assert!(
                bytes <= limits::VERDICT_CACHE_BYTES || bits == limits::VERDICT_CACHE_MIN_BITS,
                "{cpus} CPUs: {bytes} bytes"
            );
        }
        assert_eq!(verdict_cache_bits(2), limits::VERDICT_CACHE_MAX_BITS);
        assert_eq!(verdict_cache_bits(64), 12);
        for bad in [0, 1, 3, 65, 1 << 20] {
            assert!(bits_of(bad).is_err(), "{bad}");
        }
    }
}
