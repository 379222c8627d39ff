//! Per-protocol parse counters (`vpcgate_common::parse_stats`), one per-CPU slot per hook and stat.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use vpcgate_common::parse_stats::{Hook, PARSE_STATS_LEN, Stat, index};

use crate::parse::{Fragment, L3, L4, Packet};

#[map(name = "PARSE_STATS")]
static PARSE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PARSE_STATS_LEN, 0);

#[inline(always)]
pub fn bump(hook: Hook, stat: Stat) {
    if let Some(slot) = PARSE_STATS.get_ptr_mut(index(hook, stat)) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs (no preemption in BPF).
        unsafe { *slot += 1 };
    }
}

/// Counts what the parser saw of one packet.
#[inline(always)]
pub fn count(hook: Hook, pkt: &Packet) {
    match pkt.l3 {
        L3::NonIp => bump(hook, Stat::NonIp),
        L3::Ipv4 => bump(hook, Stat::Ipv4),
        L3::Ipv6 => bump(hook, Stat::Ipv6),
    }
    if pkt.vlan_tags != 0 {
        bump(hook, Stat::Vlan);
    }
    match pkt.fragment {
        Fragment::None => {}
        Fragment::First => bump(hook, Stat::FragmentFirst),
        Fragment::NonFirst => bump(hook, Stat::FragmentNonFirst),
    }
    match pkt.l4 {
        L4::None => {}
        L4::Tcp { .. } => bump(hook, Stat::Tcp),
        L4::Udp { .. } => bump(hook, Stat::Udp),
        L4::Icmp { .. } => bump(hook, Stat::Icmp),
        L4::Icmpv6 { .. } => bump(hook, Stat::Icmpv6),
        L4::Other => bump(hook, Stat::OtherL4),
    }
}
