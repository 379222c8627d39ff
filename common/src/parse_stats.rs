//! Per-protocol packet counters kept by the parser, per hook, in one per-CPU array: one row
//! (`ParseRow`) per hook, so that a packet's two to four counters cost one lookup.
//!
//! Row = `hook`, column = `stat`. Append-only: a retired stat keeps its number.

/// Which program counted the packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// TC egress classifier.
    TcEgress = 0,
    /// XDP on the ENI's ingress (observes replies and inbound flows; never drops).
    Xdp = 1,
    /// XDP on a forward interface (enforces gateway egress arriving from pods/VMs).
    XdpForward = 2,
}

pub const HOOK_COUNT: u32 = 3;

pub const ALL_HOOKS: [Hook; HOOK_COUNT as usize] = [Hook::TcEgress, Hook::Xdp, Hook::XdpForward];

/// What the parser saw. A packet increments one L3 stat and, when its L4 header was parsed, one L4 stat;
/// VLAN-tagged frames and fragments additionally increment their own stat.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Neither IPv4 nor IPv6 (ARP, LLDP, ...): passed, not evaluated.
    NonIp = 0,
    Ipv4 = 1,
    Ipv6 = 2,
    Tcp = 3,
    Udp = 4,
    Icmp = 5,
    Icmpv6 = 6,
    /// An IP protocol the parser does not look into (GRE, ESP, SCTP, no next header, ...).
    OtherL4 = 7,
    /// Carried at least one 802.1Q / 802.1ad tag.
    Vlan = 8,
    /// First fragment of a fragmented datagram (carries the L4 header).
    FragmentFirst = 9,
    /// Non-first fragment: no L4 header, ports unknown.
    FragmentNonFirst = 10,
    /// Truncated or inconsistent header: dropped (fail closed).
    Malformed = 11,
}

pub const STAT_COUNT: u32 = 12;

/// Every stat, in index order (for userspace reports).
pub const ALL_STATS: [Stat; STAT_COUNT as usize] = [
    Stat::NonIp,
    Stat::Ipv4,
    Stat::Ipv6,
    Stat::Tcp,
    Stat::Udp,
    Stat::Icmp,
    Stat::Icmpv6,
    Stat::OtherL4,
    Stat::Vlan,
    Stat::FragmentFirst,
    Stat::FragmentNonFirst,
    Stat::Malformed,
];

/// A `PARSE_STATS` value: one hook's counters, indexed by `Stat`.
pub type ParseRow = [u64; STAT_COUNT as usize];

/// Number of entries (rows, one per hook) of the `PARSE_STATS` array.
pub const PARSE_STATS_LEN: u32 = HOOK_COUNT;

impl Stat {
    /// Stable snake_case name used in CLI output, JSON and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::NonIp => "non_ip",
            Stat::Ipv4 => "ipv4",
            Stat::Ipv6 => "ipv6",
            Stat::Tcp => "tcp",
            Stat::Udp => "udp",
            Stat::Icmp => "icmp",
            Stat::Icmpv6 => "icmpv6",
            Stat::OtherL4 => "other_l4",
            Stat::Vlan => "vlan",
            Stat::FragmentFirst => "fragment_first",
            Stat::FragmentNonFirst => "fragment_non_first",
            Stat::Malformed => "malformed",
        }
    }
}

const _: () = assert!(ALL_STATS.len() == STAT_COUNT as usize);
const _: () = assert!(Hook::XdpForward as u32 == PARSE_STATS_LEN - 1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_stats_are_in_index_order_with_unique_names() {
        for (i, s) in ALL_STATS.iter().enumerate() {
            assert_eq!(*s as usize, i, "{s:?} out of order");
        }
        for a in ALL_STATS {
            assert_eq!(
                ALL_STATS.iter().filter(|b| b.name() == a.name()).count(),
                1,
                "{} twice",
                a.name()
            );
        }
    }

    #[test]
    fn hooks_are_the_rows_in_order() {
        for (i, h) in ALL_HOOKS.iter().enumerate() {
            assert_eq!(*h as usize, i, "{h:?} out of order");
        }
        assert_eq!(ALL_HOOKS.len(), PARSE_STATS_LEN as usize);
    }
}
