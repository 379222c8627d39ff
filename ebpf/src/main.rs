//! vpcgate kernel programs. One small function per hook; parsing and counting live in their modules.
#![no_std]
#![no_main]

mod parse;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use vpcgate_common::parse_stats::{Hook, Stat};

use crate::parse::Cursor;

/// Headers the parser may need in the linear part of an skb: Ethernet + 2 VLAN tags + IPv4 with options
/// or IPv6 with an extension chain + TCP with options. Longer chains are read if already linear.
const TC_PULL_LEN: u32 = 256;

/// Pass, letting any later TC program and the stack decide (TC_ACT_UNSPEC: "next" for tcx and clsact).
const TC_PASS: i32 = TC_ACT_UNSPEC;

#[classifier]
pub fn vpcgate_tc_egress(ctx: TcContext) -> i32 {
    match try_tc_egress(&ctx) {
        Ok(action) => action,
        Err(()) => TC_ACT_SHOT,
    }
}

fn try_tc_egress(ctx: &TcContext) -> Result<i32, ()> {
    // Headers of a locally built skb may sit in paged fragments; make what we parse linear first.
    let want = core::cmp::min(ctx.len(), TC_PULL_LEN);
    if ((ctx.data_end() - ctx.data()) as u32) < want && ctx.pull_data(want).is_err() {
        stats::bump(Hook::TcEgress, Stat::Malformed);
        return Err(());
    }
    let cursor = Cursor::new(ctx.data(), ctx.data_end());
    match parse::parse(&cursor) {
        Ok(pkt) => {
            stats::count(Hook::TcEgress, &pkt);
            Ok(TC_PASS)
        }
        Err(_) => {
            stats::bump(Hook::TcEgress, Stat::Malformed);
            Err(())
        }
    }
}

#[xdp]
pub fn vpcgate_xdp(ctx: XdpContext) -> u32 {
    let cursor = Cursor::new(ctx.data(), ctx.data_end());
    match parse::parse(&cursor) {
        Ok(pkt) => {
            stats::count(Hook::Xdp, &pkt);
            xdp_action::XDP_PASS
        }
        Err(_) => {
            stats::bump(Hook::Xdp, Stat::Malformed);
            xdp_action::XDP_DROP
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
