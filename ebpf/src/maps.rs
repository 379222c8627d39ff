//! Every map of the enforcement datapath, defined once (layouts from `vpcgate_common::datapath`).

use aya_ebpf::{
    macros::map,
    maps::{Array, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use vpcgate_common::datapath::{
    AddrV4, AddrV6, AddrValue, DROP_STATS_LEN, DestKey, DestObs, EventBudget, FlowKey, FlowValue,
    FragKey, GenConfig, LastVerdict, PortData, RuleStats, RuleStatsKey, limits,
};

/// The active policy generation (`GEN_A` or `GEN_B`; anything else: no policy).
#[map(name = "ACTIVE")]
pub static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// Per-generation settings, indexed by generation.
#[map(name = "GEN_CONFIG")]
pub static GEN_CONFIG: Array<GenConfig> = Array::with_max_entries(3, 0);

#[map(name = "ADDR_V4")]
pub static ADDR_V4: LpmTrie<AddrV4, AddrValue> =
    LpmTrie::with_max_entries(2 * limits::ADDR_ENTRIES, 0);

#[map(name = "ADDR_V6")]
pub static ADDR_V6: LpmTrie<AddrV6, AddrValue> =
    LpmTrie::with_max_entries(2 * limits::ADDR_ENTRIES, 0);

/// Value: index of the reserved block in the policy.
#[map(name = "RESERVED_V4")]
pub static RESERVED_V4: LpmTrie<AddrV4, u32> =
    LpmTrie::with_max_entries(2 * limits::RESERVED_ENTRIES, 0);

#[map(name = "RESERVED_V6")]
pub static RESERVED_V6: LpmTrie<AddrV6, u32> =
    LpmTrie::with_max_entries(2 * limits::RESERVED_ENTRIES, 0);

/// Value: the rule that wins the port block.
#[map(name = "PORTS")]
pub static PORTS: LpmTrie<PortData, u32> = LpmTrie::with_max_entries(2 * limits::PORT_ENTRIES, 0);

#[map(name = "RULE_STATS")]
pub static RULE_STATS: PerCpuHashMap<RuleStatsKey, RuleStats> =
    PerCpuHashMap::with_max_entries(2 * limits::RULES, 0);

/// Indexed by drop reason code (+ `AUDIT_OFFSET` for audited would-be drops).
#[map(name = "DROP_STATS")]
pub static DROP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_STATS_LEN, 0);

#[map(name = "FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(limits::FLOWS, 0);

/// Value: the rule (or 0) the first fragment passed with.
#[map(name = "FRAGS")]
pub static FRAGS: LruHashMap<FragKey, u32> = LruHashMap::with_max_entries(limits::FRAGS, 0);

#[map(name = "DEST_OBS")]
pub static DEST_OBS: LruPerCpuHashMap<DestKey, DestObs> =
    LruPerCpuHashMap::with_max_entries(limits::DESTINATIONS, 0);

#[map(name = "LAST_VERDICT")]
pub static LAST_VERDICT: Array<LastVerdict> = Array::with_max_entries(1, 0);

/// Drop events for the agent (`vpcgate drops`), rate-limited by `EVENT_BUDGET`.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(limits::EVENTS_BYTES, 0);

#[map(name = "EVENT_BUDGET")]
pub static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(1, 0);
