//! vpcgate kernel programs. One small function per hook; parsing, the verdict, flow state and accounting
//! live in their modules.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod account;
mod events;
mod flows;
mod ktrace;
mod maps;
mod parse;
mod probe;
mod stats;
mod verdict;

use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action, xdp_md},
    macros::{classifier, tracepoint, xdp},
    programs::{TcContext, TracePointContext, XdpContext},
};
use vpcgate_common::{
    datapath::{ACTION_PASS, basis},
    parse_stats::{Hook, Stat},
};

use crate::{
    maps::{FORWARD_IFS, KeyBuf, SCRATCH, Scratch},
    parse::{Cursor, Fragment, Packet},
    verdict::Outcome,
};

/// Headers the parser may need in the linear part of an skb: Ethernet + 2 VLAN tags + IPv4 with options
/// or IPv6 with an extension chain + TCP with options. Longer chains are read if already linear.
const TC_PULL_LEN: u32 = 256;

/// Pass, letting any later TC program and the stack decide (TC_ACT_UNSPEC: "next" for tcx and clsact).
const TC_PASS: i32 = TC_ACT_UNSPEC;

/// Parses, decides, accounts: the enforcement path shared by TC egress and XDP forward. `local`: the
/// packet was generated on this host. `account` false: the packet was enforced and counted already (at a
/// forward interface's XDP); its passes are not counted again, a drop here is (XDP passed it).
///
/// Eight plain arguments: passing the packet as `Result<&Packet, _>` changed LLVM's code enough that
/// the verifier's state count on TC egress went past its limit.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn enforce(
    hook: Hook,
    ifindex: u32,
    parsed: Result<(), parse::Malformed>,
    pkt: &Packet,
    key: &mut KeyBuf,
    bytes: u64,
    local: bool,
    account: bool,
) -> Outcome {
    let outcome = match parsed {
        Ok(()) => {
            key.outcome = verdict::decide(hook, pkt, local, key);
            // SAFETY: a field of this run's scratch slot (see `KeyBuf`: volatile, so that LLVM does not
            // forward the constants each path of `decide` stored).
            let o = unsafe { core::ptr::read_volatile(&raw const key.outcome) };
            // Remember a first fragment only when it passed outright: an audited would-be drop must not
            // vouch for its datagram's later fragments once the mode is enforce.
            if pkt.fragment == Fragment::First {
                if o.action == ACTION_PASS && o.reason == 0 {
                    flows::record_first_fragment(pkt, o.id);
                } else {
                    flows::forget_first_fragment(pkt);
                }
            }
            let account = account || o.reason != 0;
            if account {
                account::vpcgate_account_packet(hook as u32);
                if o.reason != 0 {
                    events::drop_event(hook, ifindex, Some(pkt), &o);
                }
            }
            o
        }
        Err(_) => {
            let o = verdict::malformed();
            if account || o.reason != 0 {
                stats::bump(hook, Stat::Malformed);
                events::drop_event(hook, ifindex, None, &o);
            }
            o
        }
    };
    if account || outcome.reason != 0 {
        account::account(&outcome, bytes);
    } else {
        account::record_last(&outcome);
    }
    outcome
}

#[inline(always)]
fn xdp_verdict(o: &Outcome) -> u32 {
    if o.action == ACTION_PASS {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

#[inline(always)]
fn tc_action(o: &Outcome) -> i32 {
    if o.action == ACTION_PASS {
        TC_PASS
    } else {
        TC_ACT_SHOT
    }
}

/// This hook's scratch packet: the parser writes into a map value, whose contents the verifier does not
/// track, so the states of the parser's many paths (VLAN tags, options, extension chains) collapse into
/// one before the verdict and accounting are verified, instead of multiplying with them.
///
/// Taken for the program's run and given back by `release`. Two runs of one hook can interleave on a
/// CPU wherever a run can be preempted: on PREEMPT_RT without `CONFIG_PREEMPT_RT_NEEDS_BH_LOCK` (off by
/// default) bottom-half sections only disable migration. The slot is taken in one atomic exchange: a
/// run that finds it taken gets None and its caller fails closed. A load, a test and a store could be
/// preempted between the load and the store; both runs would then parse into one slot, and one packet
/// could be decided on the other's headers. Returns the slot: the parser (`vpcgate_parse_*`) fills its
/// packet, then `parsed` lends it out.
#[inline(always)]
fn scratch(hook: Hook) -> Option<*mut Scratch> {
    let s = SCRATCH.get_ptr_mut(hook as u32)?;
    // SAFETY: this CPU's slot of a per-CPU array, held by this run until `release`.
    if unsafe { test_and_set(&raw mut (*s).busy) } != 0 {
        return None;
    }
    Some(s)
}

/// The verdict of an enforcing run that found its hook's scratch slot taken (`scratch`): its headers
/// are never read, so it fails closed as a malformed packet does (dropped, or passed audited under an
/// audit policy), and is counted and reported as such (`account::count_unslotted_drop`, a drop event
/// without the packet's addresses).
#[inline(always)]
fn slot_taken(hook: Hook, ifindex: u32) -> Outcome {
    let mut o = verdict::malformed();
    o.basis = basis::SLOT_TAKEN;
    account::count_unslotted_drop(&o);
    events::drop_event(hook, ifindex, None, &o);
    o
}

/// Sets `*flag` to 1 and returns what it held, in one atomic exchange (BPF_XCHG, Linux 5.12+; the
/// target's `core` has no atomic read-modify-write).
///
/// # Safety
/// `flag` points at an 8-aligned u64 in map memory.
#[inline(always)]
unsafe fn test_and_set(flag: *mut u64) -> u64 {
    let mut v: u64 = 1;
    // SAFETY: by the caller.
    unsafe {
        core::arch::asm!(
            "{v} = xchg_64({p} + 0, {v})",
            p = in(reg) flag,
            v = inout(reg) v,
            options(nostack),
        );
    }
    v
}

/// The parsed packet and the key buffer of a slot `scratch` took, once the parser is done with it (no
/// reference to the packet lives while the parser writes it through its own lookup).
#[inline(always)]
fn parsed(s: *mut Scratch) -> (&'static mut Packet, &'static mut KeyBuf) {
    // SAFETY: this run's slot (`scratch`), valid until `release`.
    unsafe { (&mut (*s).pkt, &mut (*s).key) }
}

/// Parses the packet of `skb` into `hook`'s scratch slot (held by the caller: `scratch`): 0 when it
/// parsed, 1 when it is malformed (or the slot is missing).
///
/// A global BPF function: the verifier checks the parser once, on its own, instead of inlined into
/// each program (twice into TC egress, which parses again after a pull). Inlined, the parser's paths (VLAN
/// tags, IPv4 options, IPv6 extension chains) made the programs' verification cost swing by hundreds of
/// thousands of instructions with unrelated changes to the code after it.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vpcgate_parse_skb(skb: *mut __sk_buff, hook: u32) -> i32 {
    let ctx = TcContext::new(skb);
    parse_into(hook, ctx.data(), ctx.data_end())
}

/// `vpcgate_parse_skb` for XDP.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vpcgate_parse_xdp(md: *mut xdp_md, hook: u32) -> i32 {
    let ctx = XdpContext::new(md);
    parse_into(hook, ctx.data(), ctx.data_end())
}

#[inline(always)]
fn parse_into(hook: u32, data: usize, data_end: usize) -> i32 {
    let Some(s) = SCRATCH.get_ptr_mut(hook) else {
        return 1;
    };
    // SAFETY: this CPU's slot of `hook`, held by the running program (`scratch`), which holds no
    // reference to its packet while this runs. Reset first: nothing of an earlier packet (or of a first
    // parse before a pull) survives into this one.
    unsafe {
        Packet::reset(&raw mut (*s).pkt);
        match parse::parse(&Cursor::new(data, data_end), &mut (*s).pkt) {
            Ok(()) => 0,
            Err(_) => 1,
        }
    }
}

/// What `vpcgate_parse_*` returned, as the parser's result.
#[inline(always)]
fn parse_result(r: i32) -> Result<(), parse::Malformed> {
    if r == 0 {
        Ok(())
    } else {
        Err(parse::Malformed)
    }
}

/// Gives the hook's scratch slot back (see `scratch`). Every read and write of this run in the slot
/// comes before it in the program: a run that preempts this one and takes the slot neither has a write
/// of this run's land in its packet nor lends this run its verdict. The other run is on this CPU, which
/// sees its own accesses in program order; the store is inline assembly that may touch any memory, so
/// the compiler moves no access to the slot past it.
#[inline(always)]
fn release(s: *mut Scratch) {
    // SAFETY: this run's slot (8-aligned `busy` at offset 0); no reference into it is used after this.
    unsafe {
        core::arch::asm!(
            "*(u64 *)({p} + 0) = {z}",
            p = in(reg) &raw mut (*s).busy,
            z = in(reg) 0u64,
            options(nostack),
        );
    }
}

#[classifier]
pub fn vpcgate_tc_egress(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let (ifindex, ingress_ifindex) =
        unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).ingress_ifindex) };
    // Forwarded from a forward interface whose XDP enforced and counted it: decide again (fail closed
    // if that program is gone), count once.
    // SAFETY: the value is only tested for presence.
    let account = ingress_ifindex == 0 || unsafe { FORWARD_IFS.get(ingress_ifindex) }.is_none();
    let len = ctx.len();
    // Parse what is linear; only a packet whose headers are not all linear is pulled (a TCP segment's
    // headers almost always are: no copy per segment).
    let Some(s) = scratch(Hook::TcEgress) else {
        return tc_action(&slot_taken(Hook::TcEgress, ifindex));
    };
    let linear = (ctx.data_end() - ctx.data()) as u32;
    let mut parsed_ok = parse_result(vpcgate_parse_skb(ctx.skb.skb, Hook::TcEgress as u32));
    if parsed_ok.is_err() && linear < len {
        // Parse again from the start over the pulled headers (a failed pull leaves the first result:
        // malformed, dropped).
        if ctx.pull_data(core::cmp::min(len, TC_PULL_LEN)).is_ok() {
            parsed_ok = parse_result(vpcgate_parse_skb(ctx.skb.skb, Hook::TcEgress as u32));
        }
    }
    let (pkt, key) = parsed(s);
    let local = ingress_ifindex == 0;
    // A bare SYN of this host's may open a probe's connection (`probe::egress` looks it up).
    let probe = local && parsed_ok.is_ok();
    let o = enforce(
        Hook::TcEgress,
        ifindex,
        parsed_ok,
        pkt,
        key,
        u64::from(len),
        local,
        account,
    );
    if probe {
        probe::egress(pkt, &o);
    }
    release(s);
    tc_action(&o)
}

#[xdp]
pub fn vpcgate_xdp_forward(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let ifindex = ctx.ingress_ifindex() as u32;
    let Some(s) = scratch(Hook::XdpForward) else {
        return xdp_verdict(&slot_taken(Hook::XdpForward, ifindex));
    };
    let parsed_ok = parse_result(vpcgate_parse_xdp(ctx.ctx, Hook::XdpForward as u32));
    let (pkt, key) = parsed(s);
    let o = enforce(
        Hook::XdpForward,
        ifindex,
        parsed_ok,
        pkt,
        key,
        bytes,
        false,
        true,
    );
    release(s);
    xdp_verdict(&o)
}

/// The ENI's ingress: observe only. Records flows peers initiate (so the gateway's replies pass) and what
/// came back from destinations the gateway sent to (SYN-ACK, RST, ICMP errors); never drops (the stack
/// validates what it receives).
#[xdp]
pub fn vpcgate_xdp_ingress(ctx: XdpContext) -> u32 {
    let cursor = Cursor::new(ctx.data(), ctx.data_end());
    let Some(s) = scratch(Hook::Xdp) else {
        return xdp_action::XDP_PASS;
    };
    let parsed_ok = parse_result(vpcgate_parse_xdp(ctx.ctx, Hook::Xdp as u32));
    let (pkt, _) = parsed(s);
    match parsed_ok {
        Ok(()) => {
            stats::count(Hook::Xdp as u32, pkt);
            flows::record_inbound(&ctx, pkt);
            if account::may_answer(pkt) {
                account::observe_reply(&cursor, pkt);
            }
        }
        Err(_) => stats::bump(Hook::Xdp, Stat::Malformed),
    }
    release(s);
    xdp_action::XDP_PASS
}

/// `skb:kfree_skb`: the kernel's own drops of the gateway's packets (see `ktrace`). Never attached by
/// `run`; `vpcgate drops --kernel` and `vpcgate probe` attach it while they run.
#[tracepoint]
pub fn vpcgate_kfree_skb(ctx: TracePointContext) -> u32 {
    let _ = ktrace::kfree_skb(&ctx);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
