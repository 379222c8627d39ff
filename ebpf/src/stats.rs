//! Per-protocol parse counters (`vpcgate_common::parse_stats`): per CPU, one row per hook, one
//! column per stat.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use vpcgate_common::parse_stats::{Hook, PARSE_STATS_LEN, ParseRow, Stat};

use crate::parse::{Fragment, L3, L4, Packet};

#[map(name = "PARSE_STATS")]
static PARSE_STATS: PerCpuArray<ParseRow> = PerCpuArray::with_max_entries(PARSE_STATS_LEN, 0);

/// Row `hook` (a `Hook`) on this CPU.
#[inline(always)]
fn row(hook: u32) -> Option<&'static mut ParseRow> {
    // SAFETY: per-CPU row of this hook, written only by runs that hold the hook's scratch slot on this
    // CPU (`main::scratch`): one at a time.
    PARSE_STATS.get_ptr_mut(hook).map(|r| unsafe { &mut *r })
}

#[inline(always)]
pub fn bump(hook: Hook, stat: Stat) {
    if let Some(r) = row(hook as u32) {
        r[stat as usize] += 1;
    }
}

/// Counts what the parser saw of one packet: its two to four stats in one lookup. `hook`: a `Hook`.
/// Inlined into the global `account::vpcgate_account_packet` (verified once) and into XDP ingress;
/// inlined into TC egress's many paths, its branches multiplied the verifier's states past its limit.
#[inline(always)]
pub fn count(hook: u32, pkt: &Packet) {
    let Some(r) = row(hook) else {
        return;
    };
    match pkt.l3 {
        L3::NonIp => r[Stat::NonIp as usize] += 1,
        L3::Ipv4 => r[Stat::Ipv4 as usize] += 1,
        L3::Ipv6 => r[Stat::Ipv6 as usize] += 1,
    }
    if pkt.vlan_tags != 0 {
        r[Stat::Vlan as usize] += 1;
    }
    match pkt.fragment {
        Fragment::None => {}
        Fragment::First => r[Stat::FragmentFirst as usize] += 1,
        Fragment::NonFirst => r[Stat::FragmentNonFirst as usize] += 1,
    }
    match pkt.l4 {
        L4::None => {}
        L4::Tcp { .. } => r[Stat::Tcp as usize] += 1,
        L4::Udp { .. } => r[Stat::Udp as usize] += 1,
        L4::Icmp { .. } => r[Stat::Icmp as usize] += 1,
        L4::Icmpv6 { .. } => r[Stat::Icmpv6 as usize] += 1,
        L4::Other => r[Stat::OtherL4 as usize] += 1,
    }
}
