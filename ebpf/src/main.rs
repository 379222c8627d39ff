//! vpcgate kernel programs. One small function per hook; parsing, the verdict, flow state and accounting
//! live in their modules.
#![no_std]
#![no_main]

mod account;
mod events;
mod flows;
mod maps;
mod parse;
mod stats;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use vpcgate_common::{
    datapath::ACTION_PASS,
    parse_stats::{Hook, Stat},
};

use crate::{
    parse::{Cursor, Fragment, Packet},
    verdict::Outcome,
};

/// Headers the parser may need in the linear part of an skb: Ethernet + 2 VLAN tags + IPv4 with options
/// or IPv6 with an extension chain + TCP with options. Longer chains are read if already linear.
const TC_PULL_LEN: u32 = 256;

/// Pass, letting any later TC program and the stack decide (TC_ACT_UNSPEC: "next" for tcx and clsact).
const TC_PASS: i32 = TC_ACT_UNSPEC;

/// Parses, decides, accounts: the enforcement path shared by TC egress and XDP forward.
#[inline(always)]
fn enforce(hook: Hook, ifindex: u32, cursor: &Cursor, bytes: u64) -> Outcome {
    let mut pkt = Packet::new();
    let outcome = match parse::parse(cursor, &mut pkt) {
        Ok(()) => {
            stats::count(hook, &pkt);
            let o = verdict::decide(&pkt);
            if o.action == ACTION_PASS && pkt.fragment == Fragment::First {
                flows::record_first_fragment(&pkt, o.id);
            }
            account::observe(&pkt, &o);
            if o.reason != 0 {
                events::drop_event(hook, ifindex, Some(&pkt), &o);
            }
            o
        }
        Err(_) => {
            stats::bump(hook, Stat::Malformed);
            let o = verdict::malformed();
            events::drop_event(hook, ifindex, None, &o);
            o
        }
    };
    account::account(&outcome, bytes);
    outcome
}

#[classifier]
pub fn vpcgate_tc_egress(ctx: TcContext) -> i32 {
    // Headers of a locally built skb may sit in paged fragments; make what we parse linear first.
    let want = core::cmp::min(ctx.len(), TC_PULL_LEN);
    if ((ctx.data_end() - ctx.data()) as u32) < want && ctx.pull_data(want).is_err() {
        stats::bump(Hook::TcEgress, Stat::Malformed);
        let o = verdict::malformed();
        account::account(&o, u64::from(ctx.len()));
        // SAFETY: the context pointer is valid for the program's run.
        events::drop_event(Hook::TcEgress, unsafe { (*ctx.skb.skb).ifindex }, None, &o);
        return if o.action == ACTION_PASS {
            TC_PASS
        } else {
            TC_ACT_SHOT
        };
    }
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let cursor = Cursor::new(ctx.data(), ctx.data_end());
    let o = enforce(Hook::TcEgress, ifindex, &cursor, u64::from(ctx.len()));
    if o.action == ACTION_PASS {
        TC_PASS
    } else {
        TC_ACT_SHOT
    }
}

#[xdp]
pub fn vpcgate_xdp_forward(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let ifindex = ctx.ingress_ifindex() as u32;
    let cursor = Cursor::new(ctx.data(), ctx.data_end());
    let o = enforce(Hook::XdpForward, ifindex, &cursor, bytes);
    if o.action == ACTION_PASS {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// The ENI's ingress: observe only. Records flows peers initiate (so the gateway's replies pass) and what
/// came back from destinations the gateway sent to (SYN-ACK, RST, ICMP errors); never drops (the stack
/// validates what it receives).
#[xdp]
pub fn vpcgate_xdp_ingress(ctx: XdpContext) -> u32 {
    let cursor = Cursor::new(ctx.data(), ctx.data_end());
    let mut pkt = Packet::new();
    match parse::parse(&cursor, &mut pkt) {
        Ok(()) => {
            stats::count(Hook::Xdp, &pkt);
            flows::record_inbound(&pkt);
            account::observe_reply(&cursor, &pkt);
        }
        Err(_) => stats::bump(Hook::Xdp, Stat::Malformed),
    }
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
