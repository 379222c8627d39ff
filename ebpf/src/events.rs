//! Drop events to the agent through a ring buffer, behind a per-CPU token bucket: a flood of drops costs
//! a counter increment per packet, never the agent's attention.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    maps::{PerCpuArray, RingBuf},
};
use vpcgate_common::{
    datapath::{DropEvent, EventBudget, Tuple, limits},
    parse_stats::Hook,
};

use crate::{
    maps::{EVENT_BUDGET, EVENTS},
    parse::{L3, L4, Packet},
    verdict::Outcome,
};

/// Emits a drop event for `o` (a drop or an audited would-be drop), if the budget allows.
#[inline(always)]
pub fn drop_event(hook: Hook, ifindex: u32, pkt: Option<&Packet>, o: &Outcome) {
    let mut e = DropEvent {
        timestamp_ns: 0,
        ifindex,
        reason: o.reason,
        basis: o.basis,
        id: o.id,
        audit: o.audit as u32,
        hook: hook as u32,
        tuple: Tuple {
            family: 0,
            proto: 0,
            sport: [0; 2],
            dport: [0; 2],
            _pad: [0; 2],
            src: [0; 16],
            dst: [0; 16],
        },
    };
    if let Some(p) = pkt {
        e.tuple.family = match p.l3 {
            L3::Ipv4 => 4,
            L3::Ipv6 => 6,
            L3::NonIp => 0,
        };
        e.tuple.proto = p.proto;
        e.tuple.src = p.src;
        e.tuple.dst = p.dst;
        if let L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } = p.l4 {
            e.tuple.sport = sport.to_be_bytes();
            e.tuple.dport = dport.to_be_bytes();
        }
    }
    emit(&mut e);
}

/// A separate BPF function taking one fully initialised struct (see `account::record_destination`).
#[inline(never)]
fn emit(e: &mut DropEvent) {
    send(&EVENTS, &EVENT_BUDGET, 0, e);
}

/// An event that carries the time it was sent (statically dispatched: BPF has no indirect calls).
pub trait Stamped {
    fn stamp(&mut self, now_ns: u64);
}

impl Stamped for DropEvent {
    #[inline(always)]
    fn stamp(&mut self, now_ns: u64) {
        self.timestamp_ns = now_ns;
    }
}

/// Sends `e`, time-stamped, to `ring` if bucket `bucket` of `budget` has a token; counts it lost when
/// the ring is full.
#[inline(always)]
pub fn send<T: Stamped>(ring: &RingBuf, budget: &PerCpuArray<EventBudget>, bucket: u32, e: &mut T) {
    let Some(b) = budget.get_ptr_mut(bucket) else {
        return;
    };
    let Some(now) = take_token(b) else {
        return;
    };
    e.stamp(now);
    if ring.output::<T>(&*e, 0).is_err() {
        // SAFETY: this CPU's slot.
        unsafe { (*b).lost += 1 };
    }
}

/// Takes one event's token from this CPU's bucket (refilled at `EVENTS_PER_SEC`, up to
/// `EVENTS_BURST`); the time now when there was one, None (counted as suppressed) when it was empty.
#[inline(always)]
pub fn take_token(budget: *mut EventBudget) -> Option<u64> {
    // SAFETY: a helper without preconditions; `budget` is this CPU's slot of a per-CPU array.
    unsafe {
        let now = bpf_ktime_get_ns();
        let b = &mut *budget;
        // Refill: EVENTS_PER_SEC events per second, i.e. EVENTS_PER_SEC milli-tokens per millisecond.
        // Saturating: on PREEMPT_RT a run of another hook, or one that found its scratch slot taken, can
        // preempt this one between the clock read and here and store a later `last_ns`; a wrapped
        // difference would refill the bucket to the full burst.
        let elapsed_ms = now.saturating_sub(b.last_ns) / 1_000_000;
        if elapsed_ms > 0 {
            let cap = limits::EVENTS_BURST * 1000;
            let refill = elapsed_ms.saturating_mul(limits::EVENTS_PER_SEC);
            b.milli_tokens = if refill >= cap || b.milli_tokens + refill >= cap {
                cap
            } else {
                b.milli_tokens + refill
            };
            b.last_ns = now;
        }
        if b.milli_tokens < 1000 {
            b.suppressed += 1;
            return None;
        }
        b.milli_tokens -= 1000;
        Some(now)
    }
}
