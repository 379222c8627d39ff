//! Every verdict goes through here once: drop counters, per-rule counters, per-destination observations,
//! the test hook.

use vpcgate_common::datapath::{
    ACTION_PASS, AUDIT_OFFSET, DestKey, DestObs, FLAG_RECORD_LAST, LastVerdict, RuleStats,
    RuleStatsKey, basis, rule_counter_slot,
};
use vpcgate_common::icmp::{
    ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED, ICMPV6_DEST_UNREACH, ICMPV6_PACKET_TOO_BIG,
    ICMPV6_TIME_EXCEEDED,
};

use aya_ebpf::maps::LruPerCpuHashMap;

use crate::{
    maps::{DEST_OBS, DROP_OBS, DROP_STATS, GEN_CONFIG, LAST_VERDICT, RULE_COUNTERS, RULE_STATS},
    parse::{self, Cursor, IPPROTO_TCP, L3, L4, Packet, TCP_ACK, TCP_RST, TCP_SYN},
    verdict::Outcome,
};

/// Per-destination observations (DESIGN.md "Kernel observations"): what passed, what dropped and why,
/// SYNs sent. Per CPU (no shared cache line per packet); the agent sums the CPUs and takes the latest drop.
/// Replies in flows peers opened are not observations of a destination the gateway chose (a peer's
/// ever-new ports would churn the map); drops go to their own map (`DROP_OBS`) for the same reason.
#[inline(always)]
pub fn observe(pkt: &Packet, o: &Outcome) {
    if o.basis == basis::REPLY {
        return;
    }
    let (port, syn) = match pkt.l4 {
        L4::Tcp { dport, flags, .. } => (dport, flags & (TCP_SYN | TCP_ACK) == TCP_SYN),
        L4::Udp { dport, .. } => (dport, false),
        L4::Icmp { .. } | L4::Icmpv6 { .. } => (0, false),
        _ => return,
    };
    let key = DestKey {
        family: if pkt.l3 == L3::Ipv4 { 4 } else { 6 },
        proto: pkt.proto,
        port: port.to_be_bytes(),
        addr: pkt.dst,
    };
    if o.action == ACTION_PASS {
        record_passed(&key, syn, o.audit, o.reason);
    } else {
        record_dropped(&key, o.reason);
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
    let _ = map.insert(key, DestObs::default(), 0);
    map.get_ptr_mut(key)
}

/// A packet that passed (or, audited, would have dropped) toward `key`: on every allowed packet, so
/// inlined (a BPF-to-BPF call and its return cost more than its body). It takes plain values only: handed
/// the parsed packet, whose enum payloads are partly undefined, LLVM once produced register uses the
/// verifier rejects ("bitwise operator on pointer", "!read_ok").
#[inline(always)]
fn record_passed(key: &DestKey, syn: bool, audit: bool, reason: u32) {
    let Some(obs) = observation(&DEST_OBS, key) else {
        return;
    };
    // SAFETY: `obs` points at this CPU's copy of a live map value.
    unsafe {
        if audit {
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
        // `jiffies` itself is a load (the verifier inlines the helper), the clock is a call.
        // SAFETY: a helper without preconditions.
        let tick = aya_ebpf::helpers::bpf_jiffies64() as u32;
        if (*obs).seen_tick != tick || (*obs).last_seen_ns == 0 {
            (*obs).seen_tick = tick;
            (*obs).last_seen_ns = crate::flows::now();
        }
    }
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

#[inline(always)]
pub fn account(o: &Outcome, bytes: u64) {
    if o.reason != 0 {
        let index = o.reason + if o.audit { AUDIT_OFFSET } else { 0 };
        if let Some(slot) = DROP_STATS.get_ptr_mut(index) {
            // SAFETY: per-CPU slot; BPF programs are not preempted by others on this CPU for this map.
            unsafe { *slot += 1 };
        }
    }
    if o.basis == basis::RULE {
        count_rule(o.generation, o.id, bytes);
    }
    record_last(o);
}

/// One packet of `bytes` for a rule: in `RULE_COUNTERS` (an inlined array lookup), or in `RULE_STATS`
/// for a rule past this host's slots.
#[inline(always)]
fn count_rule(generation: u32, rule: u32, bytes: u64) {
    let s = match RULE_COUNTERS.get_ptr_mut(rule_counter_slot(generation, rule)) {
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
    // SAFETY: this CPU's copy of a live map value.
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
