//! Every map of the enforcement datapath, defined once (layouts from `vpcgate_common::datapath`).

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_F_RDONLY_PROG},
    macros::map,
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, RingBuf,
    },
};
use vpcgate_common::parse_stats::HOOK_COUNT;

use crate::{parse::Packet, verdict::Outcome};

use vpcgate_common::datapath::{
    AddrV4, AddrV6, AddrValue, DROP_STATS_LEN, DestKey, DestObs, EventBudget, FlowKey, FlowValue,
    FragKey, FragValue, GenConfig, KtraceConfig, LastVerdict, LocalAddr, PendingObs, PortData,
    Prefix6, ProbeObs, RuleStats, RuleStatsKey, VerdictBlock, VerdictMemo, limits,
    verdict_cache_elements,
};

/// The active policy generation (`GEN_A` or `GEN_B`; anything else: no policy).
#[map(name = "ACTIVE")]
pub static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// Per-generation settings, indexed by generation.
#[map(name = "GEN_CONFIG")]
pub static GEN_CONFIG: Array<GenConfig> = Array::with_max_entries(3, 0);

/// The policy epoch: a value the agent writes on both sides of every barrier of an apply, before every
/// flip and after an in-place apply's last write (the agent's `plan::sealed`), never twice the same. A
/// destination's memoized decision (`VerdictMemo`) holds only while the epoch it was made in is current.
///
/// Mmapable: the agent writes the value in place with one 8-byte store, and the programs read it with one
/// 8-byte load, so no read sees a mix of two epochs (an update through the syscall is a `memcpy`).
#[map(name = "POLICY_EPOCH")]
pub static POLICY_EPOCH: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

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

/// Per-rule counters: `RULE_COUNTER_SLOTS` slots per CPU, a region per CPU; CPU `c` counts slot
/// `rule_counter_slot(generation, rule)` at `rule_counter_index(c, RULE_COUNTER_SLOTS, slot)`. An array
/// lookup the verifier inlines, whose address is computed from the index (a per-CPU array's lookup loads
/// a per-slot pointer first: one more dependent memory access per packet). The agent sizes it at load to
/// this host's CPU count (`vpcgate_common::datapath::rule_counter_slots` per CPU); a rule whose slot lies
/// past `RULE_COUNTER_SLOTS` is counted in `RULE_STATS`.
#[map(name = "RULE_COUNTERS")]
pub static RULE_COUNTERS: Array<RuleStats> =
    Array::with_max_entries(limits::RULE_COUNTERS_MIN_SLOTS, 0);

/// Slots per CPU of `RULE_COUNTERS`, set by the agent at load with the map's size (read-only data: a
/// constant to the verifier). Zero, as compiled: every rule is counted in `RULE_STATS`.
#[unsafe(no_mangle)]
pub static RULE_COUNTER_SLOTS: u32 = 0;

/// Rule counters past `RULE_COUNTERS`' slots. Not preallocated: a policy of a million rules would otherwise reserve two million per-CPU values up
/// front, whether or not its rules ever see a packet (the kernel still reserves the hash buckets, 16
/// bytes per slot). A counter that cannot be allocated is not counted; the verdict never depends on it.
#[map(name = "RULE_STATS")]
pub static RULE_STATS: PerCpuHashMap<RuleStatsKey, RuleStats> =
    PerCpuHashMap::with_max_entries(2 * limits::RULES, BPF_F_NO_PREALLOC);

/// Indexed by drop reason code (+ `AUDIT_OFFSET` for audited would-be drops).
#[map(name = "DROP_STATS")]
pub static DROP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_STATS_LEN, 0);

/// Established TCP flows peers initiated toward a gateway socket.
#[map(name = "FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(limits::FLOWS, 0);

/// TCP flows a peer opened toward a listener (SYN seen), until its ACK promotes them to `FLOWS`. A SYN
/// flood churns this map only.
#[map(name = "HALF_OPEN")]
pub static HALF_OPEN: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(limits::HALF_OPEN, 0);

/// ICMP echo flows peers initiated (a ping flood churns only this map).
#[map(name = "ECHO_FLOWS")]
pub static ECHO_FLOWS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(limits::ECHO_FLOWS, 0);

/// UDP flows peers initiated toward a bound socket.
#[map(name = "DGRAM_FLOWS")]
pub static DGRAM_FLOWS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(limits::DGRAM_FLOWS, 0);

#[map(name = "FRAGS")]
pub static FRAGS: LruHashMap<FragKey, FragValue> = LruHashMap::with_max_entries(limits::FRAGS, 0);

/// The gateway's own addresses, written by the agent.
#[map(name = "LOCAL_ADDRS")]
pub static LOCAL_ADDRS: HashMap<LocalAddr, u32> = HashMap::with_max_entries(limits::LOCAL_ADDRS, 0);

/// Local ports (TCP, then UDP) toward which a peer-initiated flow was recorded
/// (`vpcgate_common::datapath::reply_port_slot`): only a packet leaving from a marked port is looked up
/// in the flow maps (rule 3).
#[map(name = "REPLY_PORTS")]
pub static REPLY_PORTS: Array<[u8; 64]> = Array::with_max_entries(limits::REPLY_PORT_ENTRIES, 0);

/// The ENI's on-link IPv6 prefixes, written by the agent from the interface's addresses.
#[map(name = "ONLINK6")]
pub static ONLINK6: LpmTrie<Prefix6, u32> = LpmTrie::with_max_entries(limits::ONLINK6, 0);

/// Forward interfaces (ifindex) whose XDP enforces, written by the agent.
#[map(name = "FORWARD_IFS")]
pub static FORWARD_IFS: HashMap<u32, u32> = HashMap::with_max_entries(limits::FORWARD_IFS, 0);

/// What passed toward each destination, and what came back (DESIGN.md "Kernel observations").
#[map(name = "DEST_OBS")]
pub static DEST_OBS: LruPerCpuHashMap<DestKey, DestObs> =
    LruPerCpuHashMap::with_max_entries(limits::DESTINATIONS, 0);

/// A zero `DestObs` in map memory: the value a new observation entry is made from. On the stack it took
/// 96 bytes in each function that makes one, and the chain TC egress → `vpcgate_account_packet` →
/// `flush` went past the 512 bytes a call chain may use on Linux 6.1 (which rounds each frame up).
/// Read-only for the programs; nothing writes it.
#[map(name = "ZERO_OBS")]
pub static ZERO_OBS: Array<DestObs> = Array::with_max_entries(1, BPF_F_RDONLY_PROG);

/// Datagrams toward a local address that no socket takes as a new flow, remembered per CPU for the rest of
/// the jiffies tick (see `flows::udp_starts_flow`).
#[map(name = "NO_SOCKET")]
pub static NO_SOCKET: PerCpuArray<[NoSocket; NO_SOCKET_SLOTS]> =
    PerCpuArray::with_max_entries(1, 0);

/// Slots of `NO_SOCKET` (a power of two: a datagram's slot is a hash of its tuple, masked).
pub const NO_SOCKET_SLOTS: usize = 16;

/// One remembered datagram tuple (`flows::memo_key`) and the tick it was looked up in. A zero slot
/// matches no datagram (family 0).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NoSocket {
    pub key: [u32; 10],
    pub tick: u32,
    pub _pad: u32,
}

/// What was dropped toward each destination: a scan of ever-new ports churns this map only.
#[map(name = "DROP_OBS")]
pub static DROP_OBS: LruPerCpuHashMap<DestKey, DestObs> =
    LruPerCpuHashMap::with_max_entries(limits::DROP_DESTINATIONS, 0);

#[map(name = "LAST_VERDICT")]
pub static LAST_VERDICT: Array<LastVerdict> = Array::with_max_entries(1, 0);

/// Drop events for the agent (`vpcgate drops`), rate-limited by `EVENT_BUDGET`.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(limits::EVENTS_BYTES, 0);

#[map(name = "EVENT_BUDGET")]
pub static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(1, 0);

/// Probe connections (`vpcgate probe` inserts and removes them; programs only update them in place).
/// LRU: the record of a probe killed before it removed it is evicted by later probes, never fills it.
#[map(name = "PROBES")]
pub static PROBES: LruHashMap<FlowKey, ProbeObs> = LruHashMap::with_max_entries(limits::PROBES, 0);

/// Where the `skb:kfree_skb` tracepoint program reads its fields (written by the agent).
#[map(name = "KTRACE")]
pub static KTRACE: Array<KtraceConfig> = Array::with_max_entries(1, 0);

/// The kernel's own drops of the gateway's packets (`vpcgate drops --kernel`), rate-limited by
/// `KERNEL_BUDGET`.
#[map(name = "KERNEL_EVENTS")]
pub static KERNEL_EVENTS: RingBuf = RingBuf::with_byte_size(limits::KERNEL_EVENTS_BYTES, 0);

/// Per CPU, the (skb, location, time) the tracepoint program handled last: with two commands attached at once
/// (a probe and `drops --kernel`), the second run for the same drop finds it here and stops, so each
/// drop is counted and reported once.
#[map(name = "KTRACE_SEEN")]
pub static KTRACE_SEEN: PerCpuArray<[u64; 3]> = PerCpuArray::with_max_entries(1, 0);

/// Two buckets: drops of what the gateway sent (0) and of what it received (1), so a port scan of the
/// gateway (its NO_SOCKET drops) cannot crowd out the drops of its own traffic.
#[map(name = "KERNEL_BUDGET")]
pub static KERNEL_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(2, 0);

/// A hook's scratch slot on one CPU: the parsed packet, and whether a running program holds it.
/// The busy flag comes first: tests set and read it from userspace
/// (`vpcgate_common::datapath::SCRATCH_SIZE`).
#[repr(C)]
pub struct Scratch {
    /// 1 while a run holds the slot (`main::scratch`: an atomic exchange), 0 when free.
    pub busy: u64,
    pub pkt: Packet,
    pub key: KeyBuf,
}

/// Where the verdict assembles the LPM key of the packet's destination (prefix length, generation,
/// address, padding), by words. In map memory, not on the stack: the verifier does not track what is
/// stored there, and a key assembled on the stack either cost a call to a byte-wise `memset` per packet
/// (field by field) or multiplied the verifier's states past its limit (by words).
///
/// It also holds the verdict between `decide` and the accounting: read back from map memory, which the
/// verifier does not track, the verdict's many paths (every outcome constant a path produced) collapse
/// into one state before the accounting is verified, instead of the accounting being verified once per
/// path.
///
/// And the hook's run of passes toward one destination not yet added to `DEST_OBS` (see `PendingObs`),
/// at `SCRATCH_PENDING_OFFSET`, where the agent reads it.
#[repr(C, align(8))]
pub struct KeyBuf {
    pub key: [u32; 6],
    pub outcome: Outcome,
    pub pending: PendingObs,
    /// The destination `account::observe` records, and its `PASS_*` flags: in map memory for the same
    /// reason as the outcome (the verifier forgets what each packet kind stored, so its paths join).
    pub dest: DestKey,
    pub dest_flags: u32,
    /// The hook's last decision by rules 4-7 for a TCP or UDP packet (`verdict::decide`).
    pub memo: VerdictMemo,
}

const _: () = assert!(core::mem::size_of::<Scratch>() == vpcgate_common::datapath::SCRATCH_SIZE);
const _: () = assert!(
    core::mem::offset_of!(Scratch, key) + core::mem::offset_of!(KeyBuf, pending)
        == vpcgate_common::datapath::SCRATCH_PENDING_OFFSET
);
const _: () = assert!(
    core::mem::offset_of!(Scratch, key) + core::mem::offset_of!(KeyBuf, memo)
        == vpcgate_common::datapath::SCRATCH_MEMO_OFFSET
);

/// Zero when the two keys are equal, word by word without a branch per word (each would be a path for
/// the verifier).
#[inline(always)]
pub fn words_diff<const N: usize>(a: &[u32; N], b: &[u32; N]) -> u32 {
    let mut d = 0;
    for i in 0..N {
        d |= a[i] ^ b[i];
    }
    d
}

/// Per enforcing hook, this CPU's decisions by rules 4-7 beyond the last one (which the scratch slot
/// holds): `VerdictMemo`s, direct-mapped by `verdict_cache_index`, `VERDICT_CACHE_BLOCK` to an element.
/// A per-CPU array: no element is ever freed or reused, no other CPU writes this CPU's copy, and the
/// agent never writes it; within a CPU the hook's scratch slot serializes the runs that use the hook's
/// region (`verdict::memoized`). Zero at load, matching no packet. The agent sizes it at load to this
/// host's CPUs (`vpcgate_common::datapath::verdict_cache_bits`, `verdict_cache_elements`).
#[map(name = "VERDICT_CACHE")]
pub static VERDICT_CACHE: PerCpuArray<VerdictBlock> =
    PerCpuArray::with_max_entries(verdict_cache_elements(limits::VERDICT_CACHE_MAX_BITS), 0);

/// log2 of the records of each hook's region of `VERDICT_CACHE`, set by the agent at load with the map's
/// size (read-only data: a constant to the verifier). Zero, as compiled, or outside
/// `VERDICT_CACHE_MIN_BITS..=VERDICT_CACHE_MAX_BITS`: no decision is cached there.
#[unsafe(no_mangle)]
pub static VERDICT_CACHE_BITS: u32 = 0;

/// Per hook, this CPU's scratch slot (see `main::scratch`).
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(HOOK_COUNT, 0);
