//! Maps of the enforcement datapath: keys, values and limits, shared by the kernel programs and the agent.
//!
//! Policy entries carry a generation byte in front of their key data. The agent writes a new policy under the
//! inactive generation, flips `ACTIVE` (one u32 whose two possible values, 1 and 2, differ in one byte, so
//! even a torn read sees one of them), then deletes the old generation. A packet reads `ACTIVE` once and
//! looks up only that generation: it never sees half of an old and half of a new policy.

use bytemuck::{Pod, Zeroable};

/// Generation slots. Any other `ACTIVE` value (0: no policy applied yet) fails closed: IP packets drop
/// with `no_policy` (the agent applies a policy before it attaches the programs).
pub const GEN_A: u8 = 1;
pub const GEN_B: u8 = 2;

/// Map names, as the loader finds them in the object.
pub mod names {
    pub const ACTIVE: &str = "ACTIVE";
    pub const POLICY_EPOCH: &str = "POLICY_EPOCH";
    pub const GEN_CONFIG: &str = "GEN_CONFIG";
    pub const ADDR_V4: &str = "ADDR_V4";
    pub const ADDR_V6: &str = "ADDR_V6";
    pub const RESERVED_V4: &str = "RESERVED_V4";
    pub const RESERVED_V6: &str = "RESERVED_V6";
    pub const PORTS: &str = "PORTS";
    pub const RULE_STATS: &str = "RULE_STATS";
    pub const RULE_COUNTERS: &str = "RULE_COUNTERS";
    pub const DROP_STATS: &str = "DROP_STATS";
    pub const FLOWS: &str = "FLOWS";
    pub const HALF_OPEN: &str = "HALF_OPEN";
    pub const DGRAM_FLOWS: &str = "DGRAM_FLOWS";
    pub const ECHO_FLOWS: &str = "ECHO_FLOWS";
    pub const FRAGS: &str = "FRAGS";
    pub const LOCAL_ADDRS: &str = "LOCAL_ADDRS";
    pub const REPLY_PORTS: &str = "REPLY_PORTS";
    pub const ONLINK6: &str = "ONLINK6";
    pub const FORWARD_IFS: &str = "FORWARD_IFS";
    pub const LAST_VERDICT: &str = "LAST_VERDICT";
    pub const DEST_OBS: &str = "DEST_OBS";
    pub const DROP_OBS: &str = "DROP_OBS";
    pub const EVENTS: &str = "EVENTS";
    pub const EVENT_BUDGET: &str = "EVENT_BUDGET";
    pub const PROBES: &str = "PROBES";
    pub const KTRACE: &str = "KTRACE";
    pub const KERNEL_EVENTS: &str = "KERNEL_EVENTS";
    pub const KERNEL_BUDGET: &str = "KERNEL_BUDGET";
    pub const KTRACE_SEEN: &str = "KTRACE_SEEN";
    /// Per hook and CPU, the running program's parsed packet, verdict and pending observations
    /// (`SCRATCH_SIZE`, `PendingObs`).
    pub const SCRATCH: &str = "SCRATCH";
    /// Per enforcing hook and CPU, decisions by rules 4-7 (`VerdictMemo`, `verdict_cache_index`).
    pub const VERDICT_CACHE: &str = "VERDICT_CACHE";
}

/// The most iterations the benchmark's `bench_tc_spin` makes per run (its object is never loaded by the
/// agent): the benchmark refuses a larger count, the program clamps to it, the verifier walks each.
pub const BENCH_SPIN_MAX: u32 = 2048;

/// Capacities (Katran style: every tunable in one place). Policy maps are checked against these before
/// apply. Policy maps hold two generations during an apply: their `max_entries` are twice these.
pub mod limits {
    /// Address prefixes per family, per generation. LPM tries allocate per entry, so the capacity costs
    /// nothing until a policy uses it.
    pub const ADDR_ENTRIES: u32 = 1 << 20;
    pub const RESERVED_ENTRIES: u32 = 1024;
    /// Port blocks (a range is at most 30) over all port tables, per generation.
    /// A port table holds the rule that wins each block, so rules with the same ports still have tables
    /// of their own: a million rules with a few ranges each need a few million blocks.
    pub const PORT_ENTRIES: u32 = 1 << 22;
    /// Rules per generation (authorizations + upstream nodes + accessible blocks).
    /// `RULE_STATS` is not preallocated: a counter exists once its rule matched a packet (its hash
    /// buckets, 16 bytes per slot, are: 32 MiB for two generations).
    pub const RULES: u32 = 1 << 20;
    /// What `RULE_COUNTERS` (per-rule counters in an array of per-CPU regions, `rule_counter_index`) may
    /// take in total over all CPUs: the agent sizes it at load (`rule_counter_slots` per CPU), and rules
    /// beyond its slots are counted in `RULE_STATS`. Preallocated, so it costs the same with ten rules as
    /// with a million: 8 MiB.
    pub const RULE_COUNTERS_BYTES: u64 = 8 << 20;
    /// Slots per CPU of `RULE_COUNTERS` at least, whatever the CPU count (rule ids 1 to 1023 of each generation;
    /// past 256 possible CPUs this exceeds `RULE_COUNTERS_BYTES`).
    pub const RULE_COUNTERS_MIN_SLOTS: u32 = 2 * 1024;
    /// Established TCP flows peers initiated (replies pass); separate from half-open ones, so a SYN
    /// flood cannot evict them.
    pub const FLOWS: u32 = 65536;
    /// TCP flows a peer opened (SYN seen toward a listener), not yet acknowledged.
    pub const HALF_OPEN: u32 = 16384;
    /// UDP flows peers initiated toward a bound socket.
    pub const DGRAM_FLOWS: u32 = 65536;
    /// ICMP echo flows (the kernel answers pings itself, no socket to check): their own map, so a ping
    /// flood cannot evict UDP flows.
    pub const ECHO_FLOWS: u32 = 4096;
    pub const FRAGS: u32 = 8192;
    /// The gateway's own addresses (flows are recorded only toward these).
    pub const LOCAL_ADDRS: u32 = 1024;
    /// `REPLY_PORTS` entries: TCP then UDP, 64 local ports per entry, one byte per port.
    pub const REPLY_PORT_ENTRIES: u32 = 2 * 1024;
    /// The ENI's on-link IPv6 prefixes (from its addresses): neighbour discovery toward them passes.
    pub const ONLINK6: u32 = 64;
    /// Forward interfaces whose XDP enforces (a packet from one is not counted again at TC egress).
    pub const FORWARD_IFS: u32 = 256;
    /// How long a non-first fragment may follow its first fragment (the kernel's reassembly timeout).
    pub const FRAG_TIMEOUT_NS: u64 = 30_000_000_000;
    /// Destinations (address, protocol, port) observed.
    pub const DESTINATIONS: u32 = 65536;
    /// What `VERDICT_CACHE` may take in total over all CPUs: the agent sizes it at load
    /// (`verdict_cache_bits`). Preallocated: 3 MiB on two CPUs, 16,384 records per hook up to 21 CPUs;
    /// past 682 CPUs the fewest records (512 per hook, 48 KiB per CPU) take more than this.
    pub const VERDICT_CACHE_BYTES: u64 = 32 << 20;
    /// log2 of the decisions each enforcing hook keeps per CPU in `VERDICT_CACHE` at most (16,384).
    pub const VERDICT_CACHE_MAX_BITS: u32 = 14;
    /// log2 of `VERDICT_CACHE_BLOCK`: the fewest decisions per hook and CPU (512).
    pub const VERDICT_CACHE_MIN_BITS: u32 = 9;
    /// Records per element of `VERDICT_CACHE` (24 KiB: a per-CPU value may take 32 KiB). Few, large
    /// elements: the kernel finds a per-CPU element through a table of pointers, one per element, and a
    /// table of 64 stays in the cache where one per record (256 KiB) would cost a miss of its own.
    pub const VERDICT_CACHE_BLOCK: u32 = 512;
    /// Destinations only dropped: their own map, so drops toward ever-new ports churn it and never
    /// evict the backends the gateway reaches.
    pub const DROP_DESTINATIONS: u32 = 16384;
    /// Ring buffer for drop events, in bytes.
    pub const EVENTS_BYTES: u32 = 256 * 1024;
    /// Drop events per second per CPU, and the burst allowed above that rate; beyond, events are only
    /// counted (`EventBudget::suppressed`), so a flood cannot starve the agent.
    pub const EVENTS_PER_SEC: u64 = 1000;
    pub const EVENTS_BURST: u64 = 200;
    /// Probe connections in flight (`vpcgate probe` inserts one entry per attempt; the kernel never
    /// inserts, so nothing but a probe can fill it).
    pub const PROBES: u32 = 1024;
    /// Ring buffer for the kernel's own drops (`skb:kfree_skb`), in bytes.
    pub const KERNEL_EVENTS_BYTES: u32 = 64 * 1024;
}

/// `GEN_CONFIG[gen].mode`.
pub const MODE_ENFORCE: u32 = 0;
pub const MODE_AUDIT: u32 = 1;

/// `GEN_CONFIG[0].flags`: write every verdict to `LAST_VERDICT` (tests only: one shared cache line per packet).
pub const FLAG_RECORD_LAST: u32 = 1;

/// `GenConfig::host_essentials` bits (DESIGN.md rule 1).
pub const ESSENTIAL_DHCP: u32 = 1;
pub const ESSENTIAL_MLD: u32 = 2;

/// `basis::HOST_ESSENTIAL` ids: which essential passed the packet.
pub mod essential {
    pub const DHCPV4: u32 = 1;
    pub const DHCPV6: u32 = 2;
    pub const MLD: u32 = 3;
}

/// Per-generation settings; indexed by generation (slot 0: global test flags only). Everything a packet's
/// verdict reads besides the policy tries lives here, so a generation flip switches it atomically.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct GenConfig {
    pub mode: u32,
    pub flags: u32,
    /// `ESSENTIAL_*` bits.
    pub host_essentials: u32,
    /// Idle timeouts of peer-initiated flows, in seconds: established TCP, TCP after FIN/RST (and
    /// half-open), UDP and ICMP echo.
    pub tcp_timeout_s: u32,
    pub tcp_closing_timeout_s: u32,
    pub udp_timeout_s: u32,
    /// The ENI's on-link IPv6 prefix (neighbour discovery toward it passes); `onlink6_len` 0: none.
    pub onlink6: [u8; 16],
    pub onlink6_len: u32,
    pub _pad: u32,
}

/// LPM key data of an IPv4 prefix in one generation (the key's prefix length, kept beside it by the
/// LPM key type of aya and aya-ebpf, is 8 for the generation + the address bits).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AddrV4 {
    pub generation: u8,
    pub addr: [u8; 4],
    pub _pad: [u8; 3],
}

/// LPM key data of an IPv6 prefix in one generation (prefix length: 8 + address bits).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AddrV6 {
    pub generation: u8,
    pub addr: [u8; 16],
    pub _pad: [u8; 3],
}

/// Prefix length of the generation byte in every policy LPM key.
pub const GEN_BITS: u32 = 8;

/// What an address prefix allows (compiled: covering prefixes' rules included).
///
/// Ordered by use: what every TCP or UDP packet reads first (flags, covering rule, inline intervals), so
/// that a packet whose entry is not in cache reads as few of its lines as it can; the fragment and
/// large-table fields last.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AddrValue {
    /// `ADDR_RESERVED_OVERLAP`.
    pub flags: u32,
    /// The highest-precedence rule covering the address (ICMP echo requests, `port_not_authorized`).
    pub icmp_rule: u32,
    /// Per protocol, how many of `inline`'s intervals hold the port table, or `INLINE_IN_PORTS`: the
    /// table has more intervals than fit, look the port up in `PORTS` under `port_table`.
    pub inline_len: [u32; 2],
    /// Per protocol, the port table itself when it is small (almost always): sorted, disjoint
    /// intervals, so the port's rule comes with the address entry, without a second trie walk.
    pub inline: [[PortInterval; INLINE_PORTS]; 2],
    /// Per protocol, the rule a non-first fragment is attributed to when every port is allowed; 0 if not.
    pub all_ports_rule: [u32; 2],
    /// Port table id per protocol (0 tcp, 1 udp); 0 is the empty table. Ids are a hash of the table's
    /// content, so an id never names two different tables (the agent refuses a colliding policy).
    pub port_table: [u64; 2],
}

/// Port intervals an address entry holds inline, per protocol.
pub const INLINE_PORTS: usize = 4;

/// `AddrValue::inline_len`: the table is in `PORTS` only.
pub const INLINE_IN_PORTS: u32 = u32::MAX;

/// `AddrValue::flags`: a reserved block overlaps this prefix, so a destination matching it must be looked
/// up among the reserved blocks (rule 4). Without the flag no reserved block contains any address the
/// entry matches (the address would lie in both prefixes, so one would contain the other), and the
/// second walk is skipped.
pub const ADDR_RESERVED_OVERLAP: u32 = 1;

/// Inclusive port interval allowed to a rule, inline in an address entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PortInterval {
    pub lo: u16,
    pub hi: u16,
    pub rule: u32,
}

/// LPM key data of a port block: generation, table, protocol, then the port's high bits.
/// Prefix length: `PORT_KEY_FIXED_BITS` + port prefix bits (0..=16).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PortData {
    pub generation: u8,
    /// Big-endian table id (LPM compares bytes in order).
    pub table: [u8; 8],
    pub proto: u8,
    pub port: [u8; 2],
}

pub const PORT_KEY_FIXED_BITS: u32 = GEN_BITS + 64 + 8;

/// Per-rule counters key: a rule id is only meaningful within its generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct RuleStatsKey {
    pub generation: u32,
    pub rule: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RuleStats {
    pub packets: u64,
    pub bytes: u64,
}

/// Where `RULE_COUNTERS` counts `rule` of `generation` (`GEN_A` or `GEN_B`): the two generations
/// interleaved, so the first slots hold the first rules of both. A slot past the array's end (a rule id
/// too large for this host's array) is counted in `RULE_STATS` instead, under `RuleStatsKey`.
pub const fn rule_counter_slot(generation: u32, rule: u32) -> u32 {
    (rule << 1) | (generation & 1)
}

/// The element of `RULE_COUNTERS` where `cpu` counts `slot`, for an array of `slots` slots per CPU: each
/// CPU has a region of its own (`slots` consecutive elements), so no two CPUs write one cache line but at
/// a region's edge, and the address is computed, not loaded (a per-CPU array first loads the slot's
/// per-CPU pointer, a second dependent memory access per packet). None past `u32`.
pub const fn rule_counter_index(cpu: u32, slots: u32, slot: u32) -> Option<u32> {
    let i = cpu as u64 * slots as u64 + slot as u64;
    if i > u32::MAX as u64 {
        None
    } else {
        Some(i as u32)
    }
}

/// `RULE_COUNTERS` slots per CPU for a host with `cpus` possible CPUs: the largest power of two whose
/// copies, one per CPU, fit in `limits::RULE_COUNTERS_BYTES`, between `limits::RULE_COUNTERS_MIN_SLOTS` and two
/// generations of `limits::RULES`: a two-CPU host counts rule ids below 131,072 of each generation
/// there, a 64-CPU host those below 4,096.
pub const fn rule_counter_slots(cpus: u32) -> u32 {
    let per_slot =
        core::mem::size_of::<RuleStats>() as u64 * if cpus == 0 { 1 } else { cpus as u64 };
    let fit = limits::RULE_COUNTERS_BYTES / per_slot;
    let max = 2 * limits::RULES as u64;
    let n = if fit >= max {
        max
    } else if fit == 0 {
        1
    } else {
        1 << (63 - fit.leading_zeros())
    };
    if n < limits::RULE_COUNTERS_MIN_SLOTS as u64 {
        limits::RULE_COUNTERS_MIN_SLOTS
    } else {
        n as u32
    }
}

/// `DROP_STATS` index: reason code, plus `AUDIT_OFFSET` for would-be drops that audit mode passed.
pub const DROP_STATS_LEN: u32 = 16;
pub const AUDIT_OFFSET: u32 = 8;

/// A flow a peer initiated toward the gateway, as the gateway's replies see it (local = the gateway).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    /// 4 or 6.
    pub family: u8,
    pub proto: u8,
    /// Big-endian ports (ICMP echo: the identifier in both).
    pub local_port: [u8; 2],
    pub remote_port: [u8; 2],
    pub _pad: [u8; 2],
    pub local: [u8; 16],
    pub remote: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowValue {
    /// bpf_ktime_get_ns of the last inbound packet.
    pub last_seen_ns: u64,
    /// `FLOW_*` bits.
    pub state: u32,
    /// Half-open TCP: the acknowledgment number that completes the handshake (the gateway's SYN-ACK
    /// sequence number + 1), valid with `FLOW_SYNACK_SENT`.
    pub expect_ack: u32,
}

/// `FlowValue::state`: a FIN or RST was seen (the flow then expires after `tcp_closing_timeout_s`).
pub const FLOW_CLOSING: u32 = 1;
/// `FlowValue::state` of a half-open flow: the gateway's SYN-ACK passed; only an ACK of it establishes.
pub const FLOW_SYNACK_SENT: u32 = 2;

/// The first fragment of a datagram passed: its non-first fragments may follow. The identity is the
/// kernel reassembly's: IPv4 (src, dst, id, protocol); IPv6 (src, dst, id), `proto` 0, since the headers
/// after an IPv6 fragment header belong to the fragmentable part.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragKey {
    pub family: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
    pub id: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragValue {
    /// The rule the first fragment passed with (0 for other bases).
    pub rule: u32,
    pub _pad: u32,
    /// bpf_ktime_get_ns of the first fragment; entries older than `limits::FRAG_TIMEOUT_NS` are ignored.
    pub first_seen_ns: u64,
}

/// LPM key data of one of the ENI's on-link IPv6 prefixes (prefix length: the address bits).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Prefix6 {
    pub addr: [u8; 16],
}

/// One of the gateway's own addresses (flows are recorded only toward these).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct LocalAddr {
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

/// A destination the gateway sent to: (address, protocol, port). ICMP uses port 0.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct DestKey {
    /// 4 or 6.
    pub family: u8,
    pub proto: u8,
    /// Big-endian destination port.
    pub port: [u8; 2],
    pub addr: [u8; 16],
}

/// What the kernel saw toward one destination, per CPU (the agent sums CPUs, latest drop wins).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DestObs {
    pub passed: u64,
    pub dropped: u64,
    /// Would-be drops that audit mode passed.
    pub audited: u64,
    /// TCP SYNs (without ACK) that passed.
    pub syn_sent: u64,
    /// Monotonic time (`bpf_ktime_get_coarse_ns`: CLOCK_MONOTONIC within a tick) of the last packet,
    /// and of the last drop.
    pub last_seen_ns: u64,
    pub last_drop_ns: u64,
    /// Drop reason code of the last (would-be) drop, 0 if none.
    pub last_reason: u32,
    /// The kernel's bookkeeping: the tick (`jiffies`, low 32 bits) at which `last_seen_ns` was last
    /// written, so that further packets in the same tick do not read the clock again.
    pub seen_tick: u32,
    /// What came back on the ENI's ingress (XDP ingress): TCP SYN-ACKs and RSTs from the destination,
    /// ICMP destination-unreachable (and packet-too-big, time-exceeded) errors quoting a packet to it.
    pub syn_ack: u64,
    pub rst: u64,
    pub icmp_errors: u64,
    /// Monotonic time (coarse, as `last_seen_ns`) of the last of those.
    pub last_reply_ns: u64,
    /// Type and code of the last ICMP error.
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub _pad2: [u8; 6],
}

/// One (would-be) drop, as the agent reads it from `EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DropEvent {
    pub timestamp_ns: u64,
    /// Interface the packet was leaving (TC egress) or arriving on (XDP forward).
    pub ifindex: u32,
    /// Drop reason code.
    pub reason: u32,
    /// How the kernel decided (`basis`), and the rule or reserved block it names.
    pub basis: u32,
    pub id: u32,
    /// 1 when audit mode passed it.
    pub audit: u32,
    /// `parse_stats::Hook` that saw it.
    pub hook: u32,
    /// The packet's addresses and ports (family 0 when it was malformed before they were read).
    pub tuple: Tuple,
}

/// A packet's addresses, protocol and ports, as the events carry them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Tuple {
    /// 4 or 6 (0: unknown).
    pub family: u8,
    pub proto: u8,
    /// Big-endian ports (0 when there are none or they were not read).
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub _pad: [u8; 2],
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// Per-CPU token bucket for drop events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct EventBudget {
    /// Tokens, in units of 1/1000 event (so refill stays integral at sub-event rates).
    pub milli_tokens: u64,
    pub last_ns: u64,
    /// Events not emitted because the budget was empty.
    pub suppressed: u64,
    /// Events the ring buffer had no room for.
    pub lost: u64,
}

/// What the kernel saw of one probe connection (`PROBES`, keyed by the connection's `FlowKey` as it
/// leaves: local = the gateway's source). The probe inserts it zeroed before connecting; TC egress
/// records the SYN (its sequence number and verdict), the ENI's ingress what answers exactly that SYN
/// (SYN-ACK or RST whose ack is the SYN's sequence number + 1, ICMP errors quoting the 5-tuple and
/// that sequence number), the `skb:kfree_skb` tracepoint (while a probe has it attached) the kernel's
/// own drop of the connection's packets on this host.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ProbeObs {
    /// Sequence number of the SYN (valid when `syns` or `dropped` is not 0).
    pub syn_seq: u32,
    /// Marked SYNs that passed TC egress (retransmissions included).
    pub syns: u32,
    /// Marked SYNs TC egress dropped, and the reason of the last one.
    pub dropped: u32,
    pub drop_reason: u32,
    /// Audited would-be drops (audit mode passed them), and the reason of the last one.
    pub audited: u32,
    pub audit_reason: u32,
    pub syn_ack: u32,
    pub rst: u32,
    pub icmp: u32,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub _pad: [u8; 2],
    /// Drops of the connection's packets by the kernel itself (`skb:kfree_skb`), and the kernel's
    /// reason code of the last one (its name is per kernel: tracefs has the table).
    pub kernel_drops: u32,
    pub kernel_reason: u32,
    /// bpf_ktime_get_ns of the first SYN seen, and of the last answer.
    pub first_syn_ns: u64,
    pub answer_ns: u64,
}

/// Where the `skb:kfree_skb` tracepoint program finds what it reads, written by the agent before it
/// attaches: the tracepoint's field offsets (from tracefs, per kernel) and `struct sk_buff`'s member
/// offsets (from the kernel's BTF). `skbaddr_off` 0: not configured, the program does nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct KtraceConfig {
    pub skbaddr_off: u32,
    pub protocol_off: u32,
    pub reason_off: u32,
    pub location_off: u32,
    /// `sk_buff.head` (a pointer) and `sk_buff.network_header` (a u16 offset from head).
    pub skb_head_off: u32,
    pub skb_network_header_off: u32,
    /// `sk_buff.dev` (a pointer) and `net_device.ifindex` (an int).
    pub skb_dev_off: u32,
    pub dev_ifindex_off: u32,
    /// The network namespace a drop happened in, to keep only the gateway's own: `sk_buff.dev` then
    /// `net_device.nd_net`, else `sk_buff.sk` then `sock.__sk_common.skc_net`, then `net.ns.inum`,
    /// compared with `netns_inum` (the inode of the gateway's /proc/self/ns/net).
    pub dev_net_off: u32,
    pub skb_sk_off: u32,
    pub sk_net_off: u32,
    pub net_inum_off: u32,
    pub netns_inum: u32,
    /// Reason codes never credited to a probe (this kernel's NOT_SPECIFIED and CONSUMED; u32::MAX:
    /// none).
    pub probe_ignore: [u32; 2],
}

/// One drop by the kernel itself (`skb:kfree_skb`) of a packet from or to one of the gateway's
/// addresses, as the agent reads it from `KERNEL_EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct KernelDrop {
    pub timestamp_ns: u64,
    /// The kernel's `enum skb_drop_reason` value (names: tracefs, per kernel).
    pub reason: u32,
    /// The skb's device when it was dropped (0: none or unknown).
    pub ifindex: u32,
    /// Code address of the drop (`location`), for `/proc/kallsyms`.
    pub location: u64,
    pub tuple: Tuple,
}

/// How the kernel decided (`LAST_VERDICT`, and later drop events); mirrors the reference verdict's basis.
pub mod basis {
    pub const NOT_IP: u32 = 1;
    pub const NEIGHBOUR_DISCOVERY: u32 = 2;
    pub const MALFORMED: u32 = 3;
    pub const REPLY: u32 = 4;
    /// `id` = index of the reserved block.
    pub const RESERVED: u32 = 5;
    /// `id` = rule.
    pub const RULE: u32 = 6;
    pub const ICMP_ERROR: u32 = 7;
    pub const FRAGMENT_OF_PASSED: u32 = 8;
    pub const FRAGMENT_UNVERIFIED: u32 = 9;
    /// `id` = covering rule.
    pub const COVERED: u32 = 10;
    pub const NO_RULE: u32 = 11;
    /// No policy applied yet: dropped (`no_policy`).
    pub const NO_POLICY: u32 = 12;
    /// Rule 1: a host essential (`id`: `essential::*`).
    pub const HOST_ESSENTIAL: u32 = 13;
    /// Rule 2: source-routed.
    pub const SOURCE_ROUTED: u32 = 14;
    /// Rule 2, `malformed`: the run found its CPU's scratch slot taken (by a run of the same hook it
    /// preempted, on PREEMPT_RT), so it never read the packet's headers.
    pub const SLOT_TAKEN: u32 = 15;
}

/// The last verdict (tests, with `FLAG_RECORD_LAST`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LastVerdict {
    /// Incremented per recorded verdict, so a reader can tell a fresh record from a stale one.
    pub seq: u64,
    /// 1 pass, 2 drop.
    pub action: u32,
    /// Drop reason code, 0 for none.
    pub reason: u32,
    pub basis: u32,
    pub id: u32,
    pub audit: u32,
    pub generation: u32,
}

pub const ACTION_PASS: u32 = 1;
pub const ACTION_DROP: u32 = 2;

const _: () = assert!(core::mem::size_of::<AddrV4>() == 8);
const _: () = assert!(core::mem::size_of::<AddrV6>() == 20);
const _: () = assert!(core::mem::size_of::<AddrValue>() == 104);
const _: () = assert!(core::mem::size_of::<PortData>() == 12);
const _: () = assert!(core::mem::size_of::<GenConfig>() == 48);
const _: () = assert!(core::mem::size_of::<FlowValue>() == 16);
const _: () = assert!(core::mem::size_of::<FragValue>() == 16);
const _: () = assert!(core::mem::size_of::<LocalAddr>() == 20);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);
const _: () = assert!(core::mem::size_of::<LastVerdict>() == 32);
const _: () = assert!(core::mem::size_of::<DestKey>() == 20);
const _: () = assert!(core::mem::size_of::<DropEvent>() == 72);
const _: () = assert!(core::mem::size_of::<EventBudget>() == 32);
const _: () = assert!(core::mem::size_of::<DestObs>() == 96);
const _: () = assert!(core::mem::size_of::<ProbeObs>() == 64);
const _: () = assert!(core::mem::size_of::<KtraceConfig>() == 60);
const _: () = assert!(core::mem::size_of::<KernelDrop>() == 64);
const _: () = assert!(core::mem::size_of::<Tuple>() == 40);
const _: () = assert!(core::mem::size_of::<VerdictMemo>() == 48);

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain-old-data, `#[repr(C)]`, explicit padding (checked by bytemuck's derive).
    unsafe impl aya::Pod for GenConfig {}
    unsafe impl aya::Pod for AddrV4 {}
    unsafe impl aya::Pod for AddrV6 {}
    unsafe impl aya::Pod for AddrValue {}
    unsafe impl aya::Pod for PortData {}
    unsafe impl aya::Pod for RuleStatsKey {}
    unsafe impl aya::Pod for RuleStats {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for LocalAddr {}
    unsafe impl aya::Pod for Prefix6 {}
    unsafe impl aya::Pod for LastVerdict {}
    unsafe impl aya::Pod for DestKey {}
    unsafe impl aya::Pod for VerdictMemo {}
    unsafe impl aya::Pod for DestObs {}
    unsafe impl aya::Pod for DropEvent {}
    unsafe impl aya::Pod for EventBudget {}
    unsafe impl aya::Pod for ProbeObs {}
    unsafe impl aya::Pod for KtraceConfig {}
    unsafe impl aya::Pod for KernelDrop {}
}

/// Size of a `SCRATCH` value (a kernel-private parsed packet), whose first u64 (native-endian) is 1
/// while a running program holds it and 0 when it is free: tests mark it taken and read it from
/// userspace.
pub const SCRATCH_SIZE: usize = 232;

/// Where a `SCRATCH` value holds its hook's `PendingObs` (the agent reads it beside `DEST_OBS`).
pub const SCRATCH_PENDING_OFFSET: usize = 120;

/// Where a `SCRATCH` value holds its hook's memoized decision, whose first field is the policy epoch it
/// was made in (u64; tests read it).
pub const SCRATCH_MEMO_OFFSET: usize = 184;

/// One decision by rules 4-7 (reserved blocks, authorizations) for a TCP or UDP packet that is not a
/// non-first fragment: a function of the active generation's policy maps, the destination address, the
/// protocol and the destination port only. Reused for the next packets with the same key while
/// `POLICY_EPOCH` still holds `epoch`; the agent fences every change to those maps with new epochs, so a
/// decision never outlives the maps it was read from. Each enforcing hook keeps its last one in its
/// scratch slot and more in `VERDICT_CACHE`.
///
/// `key` is the LPM key of the destination (`Key<AddrV4>` or `Key<AddrV6>` by words: prefix length, so
/// the family, the generation and the address; an IPv4 key's unused words zero), `port` the protocol
/// (high half) and port. Zero (as at load) it matches no packet: a key's prefix length is never 0.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct VerdictMemo {
    pub epoch: u64,
    pub key: [u32; 6],
    pub port: u32,
    /// The decision: `basis::*`, the rule id or reserved-block index, the drop reason (0: a pass).
    pub basis: u32,
    pub id: u32,
    pub reason: u32,
}

/// Enforcing hooks with a region of `VERDICT_CACHE`: TC egress, XDP forward (XDP ingress decides nothing).
pub const VERDICT_CACHE_HOOKS: u32 = 2;

/// One element of `VERDICT_CACHE`: `limits::VERDICT_CACHE_BLOCK` records.
pub type VerdictBlock = [VerdictMemo; limits::VERDICT_CACHE_BLOCK as usize];

const _: () = assert!(
    limits::VERDICT_CACHE_BLOCK == 1 << limits::VERDICT_CACHE_MIN_BITS
        && core::mem::size_of::<VerdictBlock>() <= 32 * 1024
);

/// log2 of the decisions each enforcing hook keeps per CPU in `VERDICT_CACHE` on a host with `cpus`
/// possible CPUs: the most whose copies, one per CPU, fit in `limits::VERDICT_CACHE_BYTES`, between
/// `VERDICT_CACHE_MIN_BITS` and `VERDICT_CACHE_MAX_BITS`: 16,384 on two CPUs, 4,096 on 64.
pub const fn verdict_cache_bits(cpus: u32) -> u32 {
    let cpus = if cpus == 0 { 1 } else { cpus as u64 };
    let mut bits = limits::VERDICT_CACHE_MAX_BITS;
    while bits > limits::VERDICT_CACHE_MIN_BITS
        && cpus
            * VERDICT_CACHE_HOOKS as u64
            * (1u64 << bits)
            * core::mem::size_of::<VerdictMemo>() as u64
            > limits::VERDICT_CACHE_BYTES
    {
        bits -= 1;
    }
    bits
}

/// Elements of `VERDICT_CACHE` for `bits` (`verdict_cache_bits`).
pub const fn verdict_cache_elements(bits: u32) -> u32 {
    (VERDICT_CACHE_HOOKS << bits) / limits::VERDICT_CACHE_BLOCK
}

/// A hook's region of `VERDICT_CACHE` (`verdict_cache_index`); None for XDP ingress, which decides nothing.
#[inline(always)]
pub fn verdict_cache_region(hook: crate::parse_stats::Hook) -> Option<u32> {
    match hook {
        crate::parse_stats::Hook::TcEgress => Some(0),
        crate::parse_stats::Hook::XdpForward => Some(1),
        crate::parse_stats::Hook::Xdp => None,
    }
}

/// Where in `VERDICT_CACHE` an enforcing hook keeps the decision for a destination key and port (see
/// `VerdictMemo`): its region (`verdict_cache_region`) of `1 << bits` records, at a multiplicative hash
/// of the key and port. Record `i` of the map is record `i % VERDICT_CACHE_BLOCK` of element
/// `i / VERDICT_CACHE_BLOCK`. A record is reused for its own key alone: destinations that share a slot
/// (by chance, or a flood that evicts others) are walked again, as before any cache, never misdecided.
/// `bits` must lie in `VERDICT_CACHE_MIN_BITS..=VERDICT_CACHE_MAX_BITS`. Each CPU has its own copy of the map, and only the run that holds the hook's scratch slot on
/// that CPU reads or writes the hook's region there: one writer, and no reader while it writes.
#[inline(always)]
pub fn verdict_cache_index(region: u32, bits: u32, key: &[u32; 6], port: u32) -> u32 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = u64::from(port);
    let mut i = 0;
    while i < 6 {
        h = (h ^ (u64::from(key[i]) | u64::from(key[i + 1]) << 32)).wrapping_mul(K);
        // A product's bits depend only on the factor's bits below them: fold the high half down, so
        // that the next word's product (and the index, the top bits) depends on every bit so far.
        h ^= h >> 32;
        i += 2;
    }
    (region << bits) | (h >> (64 - bits)) as u32
}

/// Passes toward one destination that this CPU's hook has counted but not yet added to the destination's
/// `DEST_OBS` entry: the packets after the first of a run toward one destination within one tick
/// (`jiffies`). The first packet of a run goes to the entry (creating it, refreshing it in the LRU and
/// setting its time); the run's later packets only add here, and the next packet toward another
/// destination, or in a later tick, adds them to the entry. The agent adds what is pending to what the
/// entry holds (`destinations`), so its figures are whole, but for a run handed over to its entry while the
/// agent reads: missed by that read, or, rarely (the program stalled for the agent's whole read between
/// adding the run to the entry and clearing it: an interrupt, a preemption on PREEMPT_RT), seen twice.
/// A per-destination figure may so dip by one run between two reads.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PendingObs {
    /// The run's destination (`family` 0: none yet).
    pub key: DestKey,
    /// `jiffies` (low 32 bits) of the run's first packet.
    pub tick: u32,
    pub passed: u64,
    pub syn_sent: u64,
}

/// Where `REPLY_PORTS` marks a local port of a protocol (0 TCP, 1 UDP): (entry, byte). A peer-initiated
/// flow is recorded only after its local port is marked; a packet leaving from an unmarked port cannot be
/// a reply, and its flow lookup is skipped. Marks are never cleared (a stale one costs a lookup).
pub const fn reply_port_slot(proto_index: u32, port: u16) -> (u32, usize) {
    (
        proto_index * 1024 + (port / 64) as u32,
        (port % 64) as usize,
    )
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    /// `Key<AddrV4>` by words, as the programs assemble it (`verdict::dst_key`).
    fn v4_key(generation: u8, a: [u8; 4]) -> [u32; 6] {
        [
            GEN_BITS + 32,
            u32::from(generation) | u32::from_le_bytes([0, a[0], a[1], a[2]]),
            u32::from(a[3]),
            0,
            0,
            0,
        ]
    }

    #[test]
    fn verdict_cache_indexes_stay_in_their_region_and_spread_over_it() {
        let bits = limits::VERDICT_CACHE_MAX_BITS;
        let slots = 1 << bits;
        // 4,096 destinations (consecutive addresses and ports, as backends often are) over 16,384
        // slots: a uniform hash leaves 16384 * (1 - e^-0.25), about 3,620 slots, taken.
        let mut taken = std::collections::BTreeSet::new();
        for i in 0..4096u32 {
            let key = v4_key(GEN_A, [10, 0, (i >> 8) as u8, i as u8]);
            let port = 6 << 16 | (8000 + i % 4);
            let tc = verdict_cache_index(0, bits, &key, port);
            let forward = verdict_cache_index(1, bits, &key, port);
            assert!(tc < slots, "{tc}");
            assert_eq!(forward, tc + slots);
            assert!(forward < verdict_cache_elements(bits) * limits::VERDICT_CACHE_BLOCK);
            // The smallest regions: the same hash, fewer of its bits.
            let small = limits::VERDICT_CACHE_MIN_BITS;
            assert_eq!(
                verdict_cache_index(1, small, &key, port),
                (1 << small) + (tc >> (bits - small))
            );
            taken.insert(tc);
        }
        assert!(taken.len() > 3400, "{} slots taken", taken.len());
        // Every word of the key and the port count: the generation, each address byte, the protocol.
        let key = v4_key(GEN_A, [10, 0, 3, 7]);
        let base = verdict_cache_index(0, bits, &key, 6 << 16 | 80);
        let moved = |k: [u32; 6], p: u32| verdict_cache_index(0, bits, &k, p) != base;
        assert!(moved(v4_key(GEN_B, [10, 0, 3, 7]), 6 << 16 | 80));
        for byte in 0..4 {
            let mut a = [10, 0, 3, 7];
            a[byte] ^= 1;
            assert!(moved(v4_key(GEN_A, a), 6 << 16 | 80), "byte {byte}");
        }
        assert!(moved(key, 17 << 16 | 80));
        assert!(moved(key, 6 << 16 | 81));
    }
}
