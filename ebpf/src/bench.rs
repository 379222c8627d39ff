//! The benchmark's baselines (`cargo xtask bench`), in their own object: never loaded by the agent.
//!
//! - `bench_*_empty`: the floor, what BPF_PROG_TEST_RUN costs around any program of the hook.
//! - `bench_*_trie`: a bare LPM lookup of the destination, read at a fixed offset (Ethernet + IPv4 or
//!   IPv6, nothing else checked), in tries the benchmark fills with the policy's own address keys: the
//!   kernel trie's cost at that size and key distribution.
//! - `bench_*_minimal`: the minimal enforcer, vpcgate's own parser plus exactly one lookup in the same
//!   tries: what one parse and one lookup cost, against which vpcgate's features are measured.
//! - `bench_tc_parse` and `bench_tc_lookup`: the minimal enforcer's two halves on their own (the parser;
//!   the bare lookup), passing everything: which of them a throughput difference comes from.
//! - `bench_tc_spin`: a loop of `BENCH_SPIN[0]` iterations and nothing else (no packet, no other map),
//!   passing everything: a program whose only cost is its run time, to calibrate how much of the rate a
//!   given cost in situ takes off.
#![no_std]
#![no_main]

#[allow(dead_code)]
mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, map, xdp},
    maps::{Array, LpmTrie, lpm_trie::Key},
    programs::{TcContext, XdpContext},
};
use vpcgate_common::datapath::{
    AddrV4, AddrV6, AddrValue, BENCH_SPIN_MAX, GEN_A, GEN_BITS, limits,
};

use crate::parse::{Cursor, L3, Packet};

/// Same key, value and capacity as the datapath's `ADDR_V4` / `ADDR_V6`.
#[map(name = "BENCH_V4")]
static BENCH_V4: LpmTrie<AddrV4, AddrValue> =
    LpmTrie::with_max_entries(2 * limits::ADDR_ENTRIES, 0);
#[map(name = "BENCH_V6")]
static BENCH_V6: LpmTrie<AddrV6, AddrValue> =
    LpmTrie::with_max_entries(2 * limits::ADDR_ENTRIES, 0);

/// `bench_tc_spin`'s iterations per run, set by the benchmark before it attaches the program.
#[map(name = "BENCH_SPIN")]
static BENCH_SPIN: Array<u32> = Array::with_max_entries(1, 0);

const ETH_LEN: usize = 14;

#[inline(always)]
fn lookup_v4(addr: [u8; 4]) -> bool {
    BENCH_V4
        .get(Key::new(
            GEN_BITS + 32,
            AddrV4 {
                generation: GEN_A,
                addr,
                _pad: [0; 3],
            },
        ))
        .is_some()
}

#[inline(always)]
fn lookup_v6(addr: [u8; 16]) -> bool {
    BENCH_V6
        .get(Key::new(
            GEN_BITS + 128,
            AddrV6 {
                generation: GEN_A,
                addr,
                _pad: [0; 3],
            },
        ))
        .is_some()
}

/// The destination at its fixed offset, looked up: no parser.
#[inline(always)]
fn bare(data: usize, end: usize) -> bool {
    if data + ETH_LEN > end {
        return false;
    }
    // SAFETY: bounds checked above and before each read.
    unsafe {
        let proto = *((data + 12) as *const [u8; 2]);
        match proto {
            [0x08, 0x00] => {
                if data + ETH_LEN + 20 > end {
                    return false;
                }
                lookup_v4(*((data + ETH_LEN + 16) as *const [u8; 4]))
            }
            [0x86, 0xdd] => {
                if data + ETH_LEN + 40 > end {
                    return false;
                }
                lookup_v6(*((data + ETH_LEN + 24) as *const [u8; 16]))
            }
            _ => false,
        }
    }
}

/// vpcgate's parser, then one lookup of the destination. What is not IP passes (vpcgate's rule 1): on an
/// interface (the throughput part attaches it to the lab's ENI), ARP must pass.
#[inline(always)]
fn minimal(data: usize, end: usize) -> bool {
    let mut pkt = Packet::new();
    if parse::parse(&Cursor::new(data, end), &mut pkt).is_err() {
        return false;
    }
    match pkt.l3 {
        L3::Ipv4 => {
            let mut addr = [0u8; 4];
            addr.copy_from_slice(&pkt.dst[..4]);
            lookup_v4(addr)
        }
        L3::Ipv6 => lookup_v6(pkt.dst),
        L3::NonIp => true,
    }
}

#[inline(always)]
fn xdp_verdict(pass: bool) -> u32 {
    if pass {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

#[inline(always)]
fn tc_verdict(pass: bool) -> i32 {
    if pass { TC_ACT_UNSPEC } else { TC_ACT_SHOT }
}

#[xdp]
pub fn bench_xdp_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[classifier]
pub fn bench_tc_empty(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[xdp]
pub fn bench_xdp_trie(ctx: XdpContext) -> u32 {
    xdp_verdict(bare(ctx.data(), ctx.data_end()))
}

#[classifier]
pub fn bench_tc_trie(ctx: TcContext) -> i32 {
    tc_verdict(bare(ctx.data(), ctx.data_end()))
}

#[xdp]
pub fn bench_xdp_minimal(ctx: XdpContext) -> u32 {
    xdp_verdict(minimal(ctx.data(), ctx.data_end()))
}

#[classifier]
pub fn bench_tc_minimal(ctx: TcContext) -> i32 {
    tc_verdict(minimal(ctx.data(), ctx.data_end()))
}

#[classifier]
pub fn bench_tc_parse(ctx: TcContext) -> i32 {
    let mut pkt = Packet::new();
    let parsed = parse::parse(&Cursor::new(ctx.data(), ctx.data_end()), &mut pkt);
    core::hint::black_box((parsed.is_ok(), &pkt));
    TC_ACT_UNSPEC
}

#[classifier]
pub fn bench_tc_lookup(ctx: TcContext) -> i32 {
    core::hint::black_box(bare(ctx.data(), ctx.data_end()));
    TC_ACT_UNSPEC
}

#[classifier]
pub fn bench_tc_spin(_ctx: TcContext) -> i32 {
    let n = BENCH_SPIN.get(0).copied().unwrap_or(0);
    let mut acc = 0u32;
    // The counter is a plain register bounded by a constant, which the verifier tracks exactly; the
    // accumulator goes through `black_box` (memory the compiler cannot see through), so the loop is kept.
    for i in 0..BENCH_SPIN_MAX {
        if i >= n {
            break;
        }
        acc = core::hint::black_box(acc ^ i);
    }
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
