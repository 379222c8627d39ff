//! ICMP and ICMPv6 message types the verdict and the observers act on (one list for kernel and reference).

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;

pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub const ICMPV6_PARAMETER_PROBLEM: u8 = 4;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
/// Neighbour discovery (RFC 4861): router solicitation .. redirect.
pub const ICMPV6_ND_FIRST: u8 = 133;
pub const ICMPV6_ND_LAST: u8 = 137;
/// MLDv2 listener report (RFC 3810), sent to ff02::16 with hop limit 1.
pub const ICMPV6_MLD2_REPORT: u8 = 143;
