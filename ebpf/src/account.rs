//! Every verdict goes through here once: drop counters, per-rule counters, per-destination observations,
//! the test hook.

use vpcgate_common::datapath::{
    ACTION_PASS, AUDIT_OFFSET, DestKey, DestObs, FLAG_RECORD_LAST, LastVerdict, PendingObs,
    RuleStats, RuleStatsKey, basis, rule_counter_index, rule_counter_slot,
};
use vpcgate_common::icmp::{
    ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED, ICMPV6_DEST_UNREACH, ICMPV6_PACKET_TOO_BIG,
    ICMPV6_TIME_EXCEEDED,
};

use aya_ebpf::maps::LruPerCpuHashMap;

use crate::{
    maps::{
        DEST_OBS, DROP_OBS, DROP_STATS, GEN_CONFIG, KeyBuf, LAST_VERDICT, RULE_COUNTER_SLOTS,
        RULE_COUNTERS, RULE_STATS, SCRATCH, ZERO_OBS, words_diff,
    },
    parse::{self, Cursor, IPPROTO_TCP, L3, L4, Packet, TCP_ACK, TCP_RST, TCP_SYN},
    verdict::Outcome,
};

/// Per-destination observations (DESIGN.md "Kernel observations"): what passed, what dropped and why,
/// SYNs sent. Per CPU (no shared cache line per packet); the agent sums the CPUs and takes the latest drop.
/// Replies in flows peers opened are not observations of a destination the gateway chose (a peer's
/// ever-new ports would churn the map); drops go to their own map (`DROP_OBS`) for the same reason.
///
/// `vpcgate_account_packet` counts the packet's parse stats (`stats::count`) and observes it.
///
/// The packet, its verdict and the hook's pending run are in `hook`'s scratch slot. A global BPF
/// function: the verifier checks it once, on its own, with an unknown `hook`, rather than once per path
/// of its caller; and its caller's paths are not multiplied by its own. It returns 0.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vpcgate_account_packet(hook: u32) -> i32 {
    let Some(s) = SCRATCH.get_ptr_mut(hook) else {
        return 0;
    };
    // SAFETY: this CPU's slot of `hook`, held by the running program (`main::scratch`), which parsed
    // the packet and decided it there.
    unsafe {
        crate::stats::count(hook, &(*s).pkt);
        let o = (*s).key.outcome;
        observe(&(*s).pkt, &o, &mut (*s).key);
    }
    0
}

#[inline(always)]
fn observe(pkt: &Packet, o: &Outcome, kb: &mut KeyBuf) {
    if o.basis == basis::REPLY {
        return;
    }
    let (port, syn) = match pkt.l4 {
        L4::Tcp { dport, flags, .. } => (dport, flags & (TCP_SYN | TCP_ACK) == TCP_SYN),
        L4::Udp { dport, .. } => (dport, false),
        L4::Icmp { .. } | L4::Icmpv6 { .. } => (0, false),
        _ => return,
    };
    kb.dest = DestKey {
        family: if pkt.l3 == L3::Ipv4 { 4 } else { 6 },
        proto: pkt.proto,
        port: port.to_be_bytes(),
        addr: pkt.dst,
    };
    kb.dest_flags = if syn { PASS_SYN } else { 0 } | if o.audit { PASS_AUDIT } else { 0 };
    if o.action == ACTION_PASS {
        record_passed(kb, o.reason);
    } else {
        record_dropped(&kb.dest, o.reason);
    }
}

/// This CPU's copy of `key`'s observation in `map`, created (zero) on the destination's first packet.
/// Inlined into one function per map: a lookup whose map is known at verification is a direct call,
/// one that could be either map goes through the generic helper's indirect call.
#[inline(always)]
fn observation(
    map: &'static LruPerCpuHashMap<DestKey, DestObs>,
    key: &DestKey,
) -> Option<*mut DestObs> {
    if let Some(p) = map.get_ptr_mut(key) {
        return Some(p);
    }
    // A read-only map value, handed to the helper as the new entry's value (no copy on the stack: see
    // `ZERO_OBS`).
    let zero: &DestObs = ZERO_OBS.get(0)?;
    let _ = map.insert(key, zero, 0);
    map.get_ptr_mut(key)
}

/// Zero when the two destination keys are equal (their five words: 4-aligned, 20 bytes).
#[inline(always)]
fn key_diff(a: &DestKey, b: &DestKey) -> u32 {
    const _: () = assert!(core::mem::size_of::<DestKey>() == 20);
    const _: () = assert!(core::mem::align_of::<DestKey>() >= 4);
    // SAFETY: 20 initialized, 4-aligned bytes each.
    unsafe {
        words_diff(
            &*(a as *const DestKey as *const [u32; 5]),
            &*(b as *const DestKey as *const [u32; 5]),
        )
    }
}

/// `jiffies`, low 32 bits: a load (the verifier inlines the helper), where the clock is a call.
#[inline(always)]
pub fn tick() -> u32 {
    // SAFETY: a helper without preconditions.
    unsafe { aya_ebpf::helpers::bpf_jiffies64() as u32 }
}

const PASS_SYN: u32 = 1;
const PASS_AUDIT: u32 = 2;

/// A packet that passed (or, audited, would have dropped) toward `kb.dest`, inlined into
/// `vpcgate_account_packet`.
///
/// A pass toward the destination of this hook's pending run, in the run's tick, is only added to the run
/// (`PendingObs`): no map lookup. Any other pass ends the run: its packets go to its entry, this packet to
/// its own (a lookup, which keeps the entry in the LRU and its time current), and it starts a new run.
/// So a destination's entry is looked up at least once per tick while it has traffic, and a run holds the
/// packets of one tick at most.
///
/// The run's part is branch-free but for its one test; `flush`, taken once per run, is a separate BPF
/// function.
#[inline(always)]
fn record_passed(kb: &mut KeyBuf, reason: u32) {
    // SAFETY: fields of this run's scratch slot, read volatile (see `KeyBuf::dest`).
    let flags = unsafe { core::ptr::read_volatile(&raw const kb.dest_flags) };
    let p = &mut kb.pending;
    if key_diff(&p.key, &kb.dest) | (p.tick ^ tick()) | (flags & PASS_AUDIT) == 0 {
        p.passed += 1;
        p.syn_sent += u64::from(flags & PASS_SYN);
        return;
    }
    start_run(kb, reason);
}

/// A pass that does not continue this hook's run: the run goes to its entry, this packet to its own, and
/// it starts the next run (`record_passed`).
#[inline(always)]
fn start_run(kb: &mut KeyBuf, reason: u32) {
    let flags = kb.dest_flags;
    let (syn, audit) = (flags & PASS_SYN != 0, flags & PASS_AUDIT != 0);
    let (key, pending) = (&kb.dest, &mut kb.pending);
    let tick = tick();
    let same = key_diff(&pending.key, key) == 0;
    if !same && (pending.passed | pending.syn_sent) != 0 {
        flush(pending);
    }
    let Some(obs) = observation(&DEST_OBS, key) else {
        // No entry could be made (the map could not allocate one): this pass stays in the run, which
        // the agent reads beside the entries, until an entry can be made. An audited would-be drop is
        // lost (its reason and time have no place in a run).
        if !audit {
            pending.key = *key;
            pending.tick = tick;
            pending.passed += 1;
            pending.syn_sent += u64::from(syn);
        }
        return;
    };
    // SAFETY: `obs` points at this CPU's copy of a live map value.
    unsafe {
        if same {
            (*obs).passed += pending.passed;
            (*obs).syn_sent += pending.syn_sent;
        }
        pending.passed = 0;
        pending.syn_sent = 0;
        if audit {
            // Audited would-be drops are no run (rare, and each carries its reason and time).
            pending.key.family = 0;
            let now = crate::flows::now();
            (*obs).audited += 1;
            (*obs).last_drop_ns = now;
            (*obs).last_reason = reason;
            (*obs).last_seen_ns = now;
            return;
        }
        (*obs).passed += 1;
        if syn {
            (*obs).syn_sent += 1;
        }
        // The coarse clock moves once per tick: read it once per tick per destination and CPU.
        if (*obs).seen_tick != tick || (*obs).last_seen_ns == 0 {
            (*obs).seen_tick = tick;
            (*obs).last_seen_ns = crate::flows::now();
        }
    }
    pending.key = *key;
    pending.tick = tick;
}

/// The packets of a pending run, added to its destination's entry. The entry has the time of the run's
/// first packet (a run holds one tick at most); one created again here (the LRU evicted it) gets the
/// time of now. If no entry can be made, the run is lost. A separate BPF function: taken once per run,
/// not per packet.
#[inline(never)]
fn flush(pending: &mut PendingObs) {
    if let Some(obs) = observation(&DEST_OBS, &pending.key) {
        // SAFETY: `obs` points at this CPU's copy of a live map value.
        unsafe {
            (*obs).passed += pending.passed;
            (*obs).syn_sent += pending.syn_sent;
            if (*obs).last_seen_ns == 0 {
                (*obs).seen_tick = pending.tick;
                (*obs).last_seen_ns = crate::flows::now();
            }
        }
    }
    pending.passed = 0;
    pending.syn_sent = 0;
}

/// A packet dropped toward `key`: a separate BPF function (drops are rarer; see `record_passed`).
#[inline(never)]
fn record_dropped(key: &DestKey, reason: u32) {
    let Some(obs) = observation(&DROP_OBS, key) else {
        return;
    };
    let now = crate::flows::now();
    // SAFETY: `obs` points at this CPU's copy of a live map value.
    unsafe {
        (*obs).dropped += 1;
        (*obs).last_seen_ns = now;
        (*obs).last_drop_ns = now;
        (*obs).last_reason = reason;
    }
}

/// This CPU's `DROP_STATS` counter of a drop's reason, or of an audited would-be drop's (None for a pass).
#[inline(always)]
fn drop_slot(o: &Outcome) -> Option<*mut u64> {
    if o.reason == 0 {
        return None;
    }
    DROP_STATS.get_ptr_mut(o.reason + if o.audit { AUDIT_OFFSET } else { 0 })
}

/// Counts the drop of a run that holds no scratch slot (it found its hook's taken: `main::slot_taken`),
/// in one atomic add: on PREEMPT_RT without the bottom-half lock, runs that find the slot taken may
/// interleave with each other and with the holder on this CPU. The holder's plain add can still lose
/// one count (see `account`), never add one.
#[inline(always)]
pub fn count_unslotted_drop(o: &Outcome) {
    if let Some(slot) = drop_slot(o) {
        // SAFETY: an 8-aligned u64 of this CPU's copy of a map value (BPF_ATOMIC add, any kernel with
        // BPF at all).
        unsafe {
            core::arch::asm!(
                "lock *(u64 *)({p} + 0) += {v}",
                p = in(reg) slot,
                v = in(reg) 1u64,
                options(nostack),
            );
        }
    }
}

#[inline(always)]
pub fn account(o: &Outcome, bytes: u64) {
    if let Some(slot) = drop_slot(o) {
        // SAFETY: per-CPU slot. On PREEMPT_RT without the bottom-half lock a run that preempts this one
        // between its load and store can lose a count, never more.
        unsafe { *slot += 1 };
    }
    if o.basis == basis::RULE {
        count_rule(o.generation, o.id, bytes);
    }
    record_last(o);
}

/// One packet of `bytes` for a rule: in this CPU's region of `RULE_COUNTERS` (an inlined array lookup),
/// or in `RULE_STATS` for a rule past this host's slots.
#[inline(always)]
fn count_rule(generation: u32, rule: u32, bytes: u64) {
    // SAFETY: a read-only global the loader sets; volatile so that the compiled-in zero is not folded.
    let slots = unsafe { core::ptr::read_volatile(&raw const RULE_COUNTER_SLOTS) };
    let slot = rule_counter_slot(generation, rule);
    let counter = if slot < slots {
        // SAFETY: a helper without preconditions (BPF programs run with migration disabled: the CPU
        // stays this one until the program returns).
        let cpu = unsafe { aya_ebpf::helpers::bpf_get_smp_processor_id() };
        match rule_counter_index(cpu, slots, slot) {
            Some(i) => RULE_COUNTERS.get_ptr_mut(i),
            None => None,
        }
    } else {
        None
    };
    let s = match counter {
        Some(s) => s,
        None => {
            let key = RuleStatsKey { generation, rule };
            match RULE_STATS.get_ptr_mut(key) {
                Some(s) => s,
                None => {
                    let _ = RULE_STATS.insert(key, RuleStats { packets: 1, bytes }, 0);
                    return;
                }
            }
        }
    };
    // SAFETY: a live map value only this CPU writes (its region of `RULE_COUNTERS`, or its copy of the
    // `RULE_STATS` entry).
    unsafe {
        (*s).packets += 1;
        (*s).bytes += bytes;
    }
}

/// The test hook: every verdict in `LAST_VERDICT` when `GEN_CONFIG[0]` (global flags) asks for it.
#[inline(always)]
pub fn record_last(o: &Outcome) {
    if let Some(cfg) = GEN_CONFIG.get(0)
        && cfg.flags & FLAG_RECORD_LAST != 0
        && let Some(last) = LAST_VERDICT.get_ptr_mut(0)
    {
        // SAFETY: test hook; tests run one packet at a time.
        unsafe {
            *last = LastVerdict {
                seq: (*last).seq + 1,
                action: o.action,
                reason: o.reason,
                basis: o.basis,
                id: o.id,
                audit: o.audit as u32,
                generation: o.generation,
            };
        }
    }
}

/// Whether `observe_reply` could find anything in the packet (a SYN-ACK, a RST, an ICMP error): tested
/// before the call, so that the data the gateway's connections receive costs no call.
#[inline(always)]
pub fn may_answer(pkt: &Packet) -> bool {
    match pkt.l4 {
        L4::Tcp { flags, .. } => flags & (TCP_SYN | TCP_RST) != 0,
        L4::Icmp { .. } | L4::Icmpv6 { .. } => true,
        _ => false,
    }
}

/// What came back: for a packet arriving on the ENI (XDP ingress), credit the destination the gateway
/// sent to. Only destinations already observed are updated (no entries for unsolicited traffic).
/// A separate BPF function (verified once per caller state instead of inlined into every path).
#[inline(never)]
pub fn observe_reply(c: &Cursor, pkt: &Packet) {
    let family = if pkt.l3 == L3::Ipv4 { 4 } else { 6 };
    match pkt.l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
            ack,
            ..
        } => {
            let kind = if flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
                REPLY_SYN_ACK
            } else if flags & TCP_RST != 0 {
                REPLY_RST
            } else {
                return;
            };
            let key = DestKey {
                family,
                proto: pkt.proto,
                port: sport.to_be_bytes(),
                addr: pkt.src,
            };
            record_reply(&key, kind, 0, 0);
            if flags & TCP_ACK != 0 {
                crate::probe::tcp_answer(family, pkt, dport, sport, ack, kind == REPLY_RST);
            }
        }
        L4::Icmp {
            kind: kind @ (ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED),
            code,
            ..
        }
        | L4::Icmpv6 {
            kind: kind @ (ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED),
            code,
            ..
        } => {
            if let Ok(q) = parse::quoted(c, pkt.l4_off as usize, family == 6) {
                let key = DestKey {
                    family,
                    proto: q.proto,
                    port: q.dport.to_be_bytes(),
                    addr: q.dst,
                };
                record_reply(&key, REPLY_ICMP, kind, code);
                if q.proto == IPPROTO_TCP {
                    crate::probe::icmp_error(family, &q, kind, code);
                }
            }
        }
        _ => {}
    }
}

const REPLY_SYN_ACK: u8 = 1;
const REPLY_RST: u8 = 2;
const REPLY_ICMP: u8 = 3;

/// A separate BPF function taking plain values (see `record_destination`).
#[inline(never)]
fn record_reply(key: &DestKey, kind: u8, icmp_type: u8, icmp_code: u8) {
    let Some(obs) = DEST_OBS.get_ptr_mut(key) else {
        return;
    };
    let now = crate::flows::now();
    // SAFETY: `obs` points at this CPU's copy of a live map value.
    unsafe {
        match kind {
            REPLY_SYN_ACK => (*obs).syn_ack += 1,
            REPLY_RST => (*obs).rst += 1,
            _ => {
                (*obs).icmp_errors += 1;
                (*obs).icmp_type = icmp_type;
                (*obs).icmp_code = icmp_code;
            }
        }
        (*obs).last_reply_ns = now;
    }
}
