//! Reading what the kernel observed per destination (DESIGN.md "Kernel observations").

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{PerCpuArray, PerCpuHashMap};
use vpcgate_common::{
    datapath::{
        DestKey, DestObs, DropEvent, EventBudget, PendingObs, SCRATCH_MEMO_OFFSET,
        SCRATCH_PENDING_OFFSET, SCRATCH_SIZE, VerdictBlock, VerdictMemo, limits, names,
        verdict_cache_region,
    },
    verdict::DropReason,
};

use super::{Datapath, DatapathError};

/// One destination (address, protocol, port), summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Destination {
    pub address: IpAddr,
    pub protocol: u8,
    pub port: u16,
    pub passed: u64,
    pub dropped: u64,
    pub audited: u64,
    pub syn_sent: u64,
    /// The reason of the most recent (would-be) drop on any CPU.
    #[serde(serialize_with = "reason_name")]
    pub last_reason: Option<DropReason>,
    pub last_seen_ns: u64,
    pub last_drop_ns: u64,
    /// What came back on the ENI's ingress.
    pub syn_ack: u64,
    pub rst: u64,
    pub icmp_errors: u64,
    /// Type and code of the most recent ICMP error.
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
    pub last_reply_ns: u64,
}

fn reason_name<S: serde::Serializer>(r: &Option<DropReason>, s: S) -> Result<S::Ok, S::Error> {
    match r {
        Some(r) => s.serialize_str(r.name()),
        None => s.serialize_none(),
    }
}

fn address(k: &DestKey) -> IpAddr {
    address_of(k.family, &k.addr)
}

/// An address as the kernel's keys hold it (family 4: the first four bytes).
pub fn address_of(family: u8, addr: &[u8; 16]) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*addr))
    }
}

impl Datapath {
    /// Every destination the kernel has observed (an LRU: the least recently used are evicted first).
    pub fn destinations(&self) -> Result<Vec<Destination>, DatapathError> {
        // Passes and replies (DEST_OBS) and drops (DROP_OBS) of one destination are summed.
        let mut all: std::collections::BTreeMap<[u8; 20], (DestKey, Vec<DestObs>)> =
            std::collections::BTreeMap::new();
        for name in [names::DEST_OBS, names::DROP_OBS] {
            let m = self
                .ebpf()
                .map(name)
                .ok_or(DatapathError::MissingMap(name))?;
            let map = PerCpuHashMap::<_, DestKey, DestObs>::try_from(m)
                .map_err(|source| DatapathError::Map { map: name, source })?;
            for item in map.iter() {
                let (k, per_cpu) =
                    item.map_err(|source| DatapathError::Map { map: name, source })?;
                let entry = all.entry(bytemuck::cast(k)).or_insert_with(|| (k, vec![]));
                entry.1.extend(per_cpu.iter().copied());
            }
        }
        // Passes each CPU's hooks counted in a run not yet added to the entry (`PendingObs`). Read after
        // the entries and without a lock: a run handed over to its entry while this reads can be missed
        // (or, in a window of a few instructions, seen in both) for this read.
        for p in self.pending_observations()? {
            let entry = all
                .entry(bytemuck::cast(p.key))
                .or_insert_with(|| (p.key, vec![]));
            entry.1.push(DestObs {
                passed: p.passed,
                syn_sent: p.syn_sent,
                ..DestObs::default()
            });
        }
        let mut out = vec![];
        for (k, per_cpu) in all.into_values() {
            let mut d = Destination {
                address: address(&k),
                protocol: k.proto,
                port: u16::from_be_bytes(k.port),
                passed: 0,
                dropped: 0,
                audited: 0,
                syn_sent: 0,
                last_reason: None,
                last_seen_ns: 0,
                last_drop_ns: 0,
                syn_ack: 0,
                rst: 0,
                icmp_errors: 0,
                icmp_type: None,
                icmp_code: None,
                last_reply_ns: 0,
            };
            let mut last_icmp_ns = 0;
            for o in per_cpu.iter() {
                d.passed += o.passed;
                d.dropped += o.dropped;
                d.audited += o.audited;
                d.syn_sent += o.syn_sent;
                d.last_seen_ns = d.last_seen_ns.max(o.last_seen_ns);
                if o.last_reason != 0 && o.last_drop_ns >= d.last_drop_ns {
                    d.last_drop_ns = o.last_drop_ns;
                    d.last_reason = DropReason::from_code(o.last_reason);
                }
                d.syn_ack += o.syn_ack;
                d.rst += o.rst;
                d.icmp_errors += o.icmp_errors;
                d.last_reply_ns = d.last_reply_ns.max(o.last_reply_ns);
                if o.icmp_errors != 0 && o.last_reply_ns >= last_icmp_ns {
                    last_icmp_ns = o.last_reply_ns;
                    d.icmp_type = Some(o.icmp_type);
                    d.icmp_code = Some(o.icmp_code);
                }
            }
            out.push(d);
        }
        out.sort_by_key(|d| (d.address, d.protocol, d.port));
        Ok(out)
    }

    /// Every hook's pending run on every CPU that holds passes (`PendingObs`, in the `SCRATCH` slots).
    /// Public for tests, which check that runs are combined; `destinations` includes them.
    #[doc(hidden)]
    pub fn pending_observations(&self) -> Result<Vec<PendingObs>, DatapathError> {
        let mut out = vec![];
        for hook in 0..vpcgate_common::parse_stats::HOOK_COUNT {
            for slot in self.scratch_slots(hook)? {
                let p: PendingObs = bytemuck::pod_read_unaligned(
                    &slot[SCRATCH_PENDING_OFFSET..SCRATCH_PENDING_OFFSET + size_of::<PendingObs>()],
                );
                if p.key.family != 0 && (p.passed != 0 || p.syn_sent != 0) {
                    out.push(p);
                }
            }
        }
        Ok(out)
    }

    /// Test hook: per CPU, the policy epoch `hook`'s memoized decision was made in (0: none yet).
    #[doc(hidden)]
    pub fn memo_epochs(
        &self,
        hook: vpcgate_common::parse_stats::Hook,
    ) -> Result<Vec<u64>, DatapathError> {
        self.scratch_words(hook, SCRATCH_MEMO_OFFSET)
    }

    /// log2 of the records each enforcing hook keeps per CPU in the loaded `VERDICT_CACHE`, as the
    /// kernel sized it.
    pub fn verdict_cache_bits(&self) -> Result<u32, DatapathError> {
        let name = names::VERDICT_CACHE;
        let elements = match self.read_map(name)? {
            aya::maps::Map::PerCpuArray(d) => d
                .info()
                .map_err(|source| DatapathError::Map { map: name, source })?
                .max_entries(),
            _ => return Err(DatapathError::MissingMap(name)),
        };
        super::verdict_cache::bits_of(elements)
    }

    /// Test hook: every record of `hook`'s `VERDICT_CACHE` region that a run wrote, as (CPU, index of the
    /// record in the map: `verdict_cache_index`, record). XDP ingress has no region: none.
    #[doc(hidden)]
    pub fn verdict_cache(
        &self,
        hook: vpcgate_common::parse_stats::Hook,
    ) -> Result<Vec<(usize, u32, VerdictMemo)>, DatapathError> {
        let Some(region) = verdict_cache_region(hook) else {
            return Ok(vec![]);
        };
        let name = names::VERDICT_CACHE;
        let a = PerCpuArray::<_, VerdictBlock>::try_from(self.read_map(name)?)
            .map_err(|source| DatapathError::Map { map: name, source })?;
        let mut out = vec![];
        let block = limits::VERDICT_CACHE_BLOCK;
        let per_region = (1 << self.verdict_cache_bits()?) / block;
        for element in region * per_region..(region + 1) * per_region {
            let per_cpu = a
                .get(&element, 0)
                .map_err(|source| DatapathError::Map { map: name, source })?;
            for (cpu, records) in per_cpu.iter().enumerate() {
                for (j, r) in (0..).zip(records.iter()) {
                    if r.epoch != 0 {
                        out.push((cpu, element * block + j, *r));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Test hook: `POLICY_EPOCH`, the epoch the last apply ended with (0 before any).
    #[doc(hidden)]
    pub fn policy_epoch(&self) -> Result<u64, DatapathError> {
        let name = names::POLICY_EPOCH;
        let m = self
            .ebpf()
            .map(name)
            .ok_or(DatapathError::MissingMap(name))?;
        aya::maps::Array::<_, u64>::try_from(m)
            .and_then(|a| a.get(&0, 0))
            .map_err(|source| DatapathError::Map { map: name, source })
    }

    /// Test hook: whether the kernel reports `POLICY_EPOCH` created `BPF_F_MMAPABLE` (which lets the agent
    /// write the epoch in place, with one 8-byte store).
    #[doc(hidden)]
    pub fn policy_epoch_is_mmapable(&self) -> Result<bool, DatapathError> {
        super::epoch::epoch_map(self.ebpf()).map(|(_, flags)| super::epoch::mmapable(flags))
    }

    /// Test hook: every CPU's busy flag of `hook`'s scratch slot (nonzero while taken: a run writes 1,
    /// `set_scratch_busy` any value; 0 when free).
    #[doc(hidden)]
    pub fn scratch_busy(
        &self,
        hook: vpcgate_common::parse_stats::Hook,
    ) -> Result<Vec<u64>, DatapathError> {
        self.scratch_words(hook, 0)
    }

    /// Per CPU, the u64 at `offset` of `hook`'s scratch slot.
    fn scratch_words(
        &self,
        hook: vpcgate_common::parse_stats::Hook,
        offset: usize,
    ) -> Result<Vec<u64>, DatapathError> {
        Ok(self
            .scratch_slots(hook as u32)?
            .iter()
            .map(|s| bytemuck::pod_read_unaligned(&s[offset..offset + 8]))
            .collect())
    }

    /// Every CPU's `SCRATCH` slot of `hook`, as bytes.
    fn scratch_slots(&self, hook: u32) -> Result<Vec<[u8; SCRATCH_SIZE]>, DatapathError> {
        let name = names::SCRATCH;
        let m = self
            .ebpf()
            .map(name)
            .ok_or(DatapathError::MissingMap(name))?;
        let a = PerCpuArray::<_, [u8; SCRATCH_SIZE]>::try_from(m)
            .map_err(|source| DatapathError::Map { map: name, source })?;
        let per_cpu = a
            .get(&hook, 0)
            .map_err(|source| DatapathError::Map { map: name, source })?;
        Ok(per_cpu.iter().copied().collect())
    }

    /// The observations of one destination, if the kernel has any.
    pub fn destination(
        &self,
        address: IpAddr,
        protocol: u8,
        port: u16,
    ) -> Result<Option<Destination>, DatapathError> {
        Ok(self
            .destinations()?
            .into_iter()
            .find(|d| d.address == address && d.protocol == protocol && d.port == port))
    }
}

/// Events suppressed by the rate limit and lost for lack of ring space, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EventLoss {
    pub suppressed: u64,
    pub lost: u64,
}

/// Takes up to `max` records of type `T` waiting in ring buffer `name` (never blocks).
pub(super) fn take_ring<T: bytemuck::Pod>(
    dp: &mut Datapath,
    name: &'static str,
    max: usize,
) -> Result<Vec<T>, DatapathError> {
    let m = dp
        .ebpf_mut()
        .map_mut(name)
        .ok_or(DatapathError::MissingMap(name))?;
    let mut ring = aya::maps::RingBuf::try_from(m)
        .map_err(|source| DatapathError::Map { map: name, source })?;
    let mut out = vec![];
    while out.len() < max {
        let Some(item) = ring.next() else { break };
        if item.len() >= std::mem::size_of::<T>() {
            out.push(bytemuck::pod_read_unaligned::<T>(
                &item[..std::mem::size_of::<T>()],
            ));
        }
    }
    Ok(out)
}

/// The event budget `name`'s suppressed and lost counts, summed over CPUs and buckets.
pub(super) fn loss(dp: &Datapath, name: &'static str) -> Result<EventLoss, DatapathError> {
    let m = dp.ebpf().map(name).ok_or(DatapathError::MissingMap(name))?;
    let a = aya::maps::PerCpuArray::<_, EventBudget>::try_from(m)
        .map_err(|source| DatapathError::Map { map: name, source })?;
    // Every bucket of the map (the kernel drops' has one per direction).
    let mut total = EventLoss::default();
    for i in 0..a.len() {
        let per_cpu = a
            .get(&i, 0)
            .map_err(|source| DatapathError::Map { map: name, source })?;
        for b in per_cpu.iter() {
            total.suppressed += b.suppressed;
            total.lost += b.lost;
        }
    }
    Ok(total)
}

impl Datapath {
    /// Takes up to `max` drop events waiting in the ring buffer (never blocks).
    pub fn take_events(&mut self, max: usize) -> Result<Vec<DropEvent>, DatapathError> {
        take_ring(self, names::EVENTS, max)
    }

    pub fn event_loss(&self) -> Result<EventLoss, DatapathError> {
        loss(self, names::EVENT_BUDGET)
    }
}
