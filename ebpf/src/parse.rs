//! Header parsing shared by every program: one cursor, one bounds check, one `parse_*` per header.
//!
//! Modelled on xdp-tools' `parsing_helpers.h`: every loop is bounded by a named constant so the verifier
//! can see its end, and every read goes through [`Cursor::ptr_at`]. Anything the parser cannot verify
//! (a header cut short, an inconsistent length field, more VLAN tags or IPv6 extension headers than it
//! walks) is [`Malformed`]: the caller fails closed.

use core::mem::size_of;

/// 802.1Q / 802.1ad tags walked before giving up (QinQ = 2).
pub const VLAN_MAX_DEPTH: usize = 2;
/// IPv6 extension headers walked before giving up.
pub const IPV6_EXT_MAX_CHAIN: usize = 6;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_DSTOPTS: u8 = 60;
pub const IPPROTO_MH: u8 = 135;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A header was cut short or is inconsistent.
#[derive(Clone, Copy)]
pub struct Malformed;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

#[repr(C)]
pub struct VlanHdr {
    pub tci: [u8; 2],
    pub proto: [u8; 2],
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub version_tc_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// The first two bytes every IPv6 extension header but the fragment header shares.
#[repr(C)]
pub struct Ipv6ExtHdr {
    pub next_hdr: u8,
    pub len: u8,
}

#[repr(C)]
pub struct Ipv6FragHdr {
    pub next_hdr: u8,
    pub reserved: u8,
    pub frag_off: [u8; 2],
    pub id: [u8; 4],
}

#[repr(C)]
pub struct TcpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    pub doff_res: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub check: [u8; 2],
    pub urg: [u8; 2],
}

#[repr(C)]
pub struct UdpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

impl UdpHdr {
    /// Bytes 4..8 of the transport header: a TCP header's sequence number when read as one.
    #[inline(always)]
    pub fn len_check(&self) -> [u8; 4] {
        [self.len[0], self.len[1], self.check[0], self.check[1]]
    }
}

/// ICMP and ICMPv6 share this 8-byte prefix (type, code, checksum, rest-of-header).
#[repr(C)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: [u8; 2],
    pub rest: [u8; 4],
}

/// The first four bytes of an IPv6 routing header (RFC 8200 4.4).
#[repr(C)]
pub struct Ipv6RoutingHdr {
    pub next_hdr: u8,
    pub len: u8,
    pub routing_type: u8,
    pub segments_left: u8,
}

/// IPv4 options that route the packet through listed hops (RFC 791): loose and strict source route.
pub const IPOPT_LSRR: u8 = 0x83;
pub const IPOPT_SSRR: u8 = 0x89;
/// Steps of the IPv4 options walk before giving up (malformed, like an over-long IPv6 extension chain).
/// A step reads two bytes: one option, or two NOPs. Real packets carry one or two options padded with a
/// few NOPs; a step per byte of the 40 would cost the verifier a path each.
pub const IPV4_OPTION_STEPS: usize = 12;

/// Bounds-checked view of a packet: `[start, end)` are the packet pointers the program got.
#[derive(Clone, Copy)]
pub struct Cursor {
    start: usize,
    end: usize,
}

/// Upper bound on any offset the parser computes; keeps offsets provably small for the verifier.
pub const MAX_PARSE_OFFSET: usize = 4096;

impl Cursor {
    #[inline(always)]
    pub fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    /// The one bounds check: a `T` at `offset` lies entirely inside the packet.
    #[inline(always)]
    pub fn ptr_at<T>(&self, offset: usize) -> Result<&T, Malformed> {
        // Opaque to the compiler, so this check stays in the program even where it can prove it:
        // older verifiers (Debian's 6.1) lose an offset's bounds on paths they cannot tell are
        // impossible, and refuse the pointer arithmetic below unless this check bounds it again.
        // SAFETY: reads a local.
        let offset = unsafe { core::ptr::read_volatile(&offset) };
        if offset > MAX_PARSE_OFFSET {
            return Err(Malformed);
        }
        let start = self.start + offset;
        if start + size_of::<T>() > self.end {
            return Err(Malformed);
        }
        // SAFETY: [start, start + size_of::<T>()) is inside the packet (checked above), and every header
        // type here is a `#[repr(C)]` struct of byte fields (alignment 1).
        Ok(unsafe { &*(start as *const T) })
    }

    /// Bytes from `offset` to the end of the packet.
    #[inline(always)]
    pub fn remaining(&self, offset: usize) -> usize {
        (self.end - self.start).saturating_sub(offset)
    }
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Network layer of a parsed packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L3 {
    /// Not IPv4/IPv6 (ARP, LLDP, ...).
    NonIp,
    Ipv4,
    Ipv6,
}

/// Fragment position of the datagram this packet belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    None,
    /// Offset 0, more fragments follow: carries the L4 header.
    First,
    /// Offset > 0: no L4 header; ports are unknown.
    NonFirst,
}

/// Transport layer of a parsed packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// No transport header to look at (non-first fragment, non-IP).
    None,
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
        ack: u32,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// `id`: the echo identifier (the two bytes after the checksum; meaningful for echo messages).
    Icmp {
        kind: u8,
        code: u8,
        id: u16,
    },
    Icmpv6 {
        kind: u8,
        code: u8,
        id: u16,
    },
    /// An IP protocol the parser does not look into.
    Other,
}

/// What the verdict needs of a packet. Addresses are in network byte order; IPv4 uses the first 4 bytes.
/// The addresses come first and 8-aligned: keys built from them are copied by words, not byte by byte.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Packet {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub l3: L3,
    pub vlan_tags: u8,
    pub proto: u8,
    pub fragment: Fragment,
    /// IPv4 identification or IPv6 fragment identification (fragments only).
    pub frag_id: u32,
    pub l4: L4,
    /// Offset of the transport header (0 when there is none).
    pub l4_off: u16,
    /// IPv4 TTL or IPv6 hop limit.
    pub hop_limit: u8,
    /// IPv4 LSRR/SSRR option, or an IPv6 routing header with segments left (rule 2).
    pub source_routed: bool,
    /// ICMP errors: the quoted packet's source is this packet's destination and its destination this
    /// packet's source (the error answers a packet this host received).
    pub quote_matches: bool,
}

/// Parses a frame starting with its Ethernet header.
#[inline(always)]
///
/// The caller owns `pkt` (start from [`Packet::new`]) and the parser fills it in place: returning the
/// packet by value made LLVM copy its enum's undefined payload bytes through registers that, on some
/// paths, held packet pointers, and the verifier rejected the program.
pub fn parse(c: &Cursor, pkt: &mut Packet) -> Result<(), Malformed> {
    let eth: &EthHdr = c.ptr_at(0)?;
    let mut ethertype = be16(eth.proto);
    let mut off = size_of::<EthHdr>();
    // Unrolled by the compiler: VLAN_MAX_DEPTH is a small constant.
    for _ in 0..VLAN_MAX_DEPTH {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let vlan: &VlanHdr = c.ptr_at(off)?;
        ethertype = be16(vlan.proto);
        off += size_of::<VlanHdr>();
        pkt.vlan_tags += 1;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(c, off, pkt),
        ETH_P_IPV6 => parse_ipv6(c, off, pkt),
        // More tags than we walk: we cannot see what is inside, so we cannot let it pass unexamined.
        ETH_P_8021Q | ETH_P_8021AD => Err(Malformed),
        _ => Ok(()),
    }
}

const _: () = assert!(
    core::mem::size_of::<Packet>().is_multiple_of(4) && core::mem::align_of::<Packet>() >= 4,
    "Packet::reset writes words"
);

impl Packet {
    /// Makes `*p` a [`Packet::new`] in place. A whole-struct store of `Packet::new()` became a call to a
    /// BPF `memset` subprogram (a tenth of the observe-only program's time); word stores do not.
    ///
    /// # Safety
    /// `p` is valid for writes and aligned, and no reference to `*p` is live.
    #[inline(always)]
    pub unsafe fn reset(p: *mut Packet) {
        let words = p as *mut u32;
        for i in 0..core::mem::size_of::<Packet>() / 4 {
            // SAFETY: within `*p` (the caller's promise); volatile keeps LLVM from merging the stores back
            // into a memset.
            unsafe { core::ptr::write_volatile(words.add(i), 0) };
        }
        // SAFETY: as above; every field is now written with a valid value (zero bytes are the integers'
        // and the bools', the enums get theirs).
        unsafe {
            (*p).l3 = L3::NonIp;
            (*p).fragment = Fragment::None;
            (*p).l4 = L4::None;
        }
    }

    /// A packet nothing is known of yet (non-IP until the parser says otherwise).
    #[inline(always)]
    #[allow(
        dead_code,
        reason = "the benchmark object's minimal enforcer uses it; vpcgate's programs reset in place"
    )]
    pub const fn new() -> Self {
        Packet {
            l3: L3::NonIp,
            vlan_tags: 0,
            proto: 0,
            src: [0; 16],
            dst: [0; 16],
            fragment: Fragment::None,
            frag_id: 0,
            l4: L4::None,
            l4_off: 0,
            hop_limit: 0,
            source_routed: false,
            quote_matches: false,
        }
    }
}

#[inline(always)]
fn parse_ipv4(c: &Cursor, off: usize, pkt: &mut Packet) -> Result<(), Malformed> {
    let ip: &Ipv4Hdr = c.ptr_at(off)?;
    if ip.version_ihl >> 4 != 4 {
        return Err(Malformed);
    }
    let hdr_len = ((ip.version_ihl & 0x0f) as usize) * 4;
    if hdr_len < size_of::<Ipv4Hdr>() {
        return Err(Malformed);
    }
    // Options must be present in full.
    if c.remaining(off) < hdr_len {
        return Err(Malformed);
    }
    let tot_len = be16(ip.tot_len) as usize;
    // tot_len 0 is how the kernel marks an IPv4 BIG TCP GSO packet (longer than 64 KiB) on egress:
    // its extent is the frame's. Otherwise the L4 header must lie inside the datagram, never in padding.
    let l3_len = if tot_len == 0 {
        c.remaining(off)
    } else {
        tot_len
    };
    if l3_len < hdr_len {
        return Err(Malformed);
    }
    pkt.l3 = L3::Ipv4;
    pkt.proto = ip.proto;
    pkt.hop_limit = ip.ttl;
    pkt.src[..4].copy_from_slice(&ip.src);
    pkt.dst[..4].copy_from_slice(&ip.dst);
    if hdr_len > size_of::<Ipv4Hdr>() {
        pkt.source_routed = ipv4_source_routed(c, off, hdr_len)?;
    }
    let frag = be16(ip.frag_off);
    let more_fragments = frag & 0x2000 != 0;
    let frag_offset = frag & 0x1fff;
    if frag_offset != 0 {
        pkt.fragment = Fragment::NonFirst;
        pkt.frag_id = be16(ip.id) as u32;
        return Ok(());
    }
    if more_fragments {
        pkt.fragment = Fragment::First;
        pkt.frag_id = be16(ip.id) as u32;
    }
    parse_l4(c, off + hdr_len, l3_len - hdr_len, ip.proto, pkt)
}

/// Walks the IPv4 options (present in full, checked by the caller): whether one is a source route.
/// An option whose length is inconsistent is malformed (the kernel's ip_options_compile drops it too).
#[inline(always)]
fn ipv4_source_routed(c: &Cursor, off: usize, hdr_len: usize) -> Result<bool, Malformed> {
    let mut o = size_of::<Ipv4Hdr>();
    for _ in 0..IPV4_OPTION_STEPS {
        if o >= hdr_len {
            return Ok(false);
        }
        // Two bytes at a time (type, length), inside the header: at its last byte, the pair that ends
        // there. (A one-byte read's bounds check is compiled into a form the verifier rejects.)
        let (kind, len) = if o + 2 <= hdr_len {
            let b: &[u8; 2] = c.ptr_at(off + o)?;
            (b[0], b[1] as usize)
        } else {
            let b: &[u8; 2] = c.ptr_at(off + o - 1)?;
            (b[1], 0)
        };
        match kind {
            // End of options list.
            0 => return Ok(false),
            // No operation (two at once when the next byte is one too).
            1 if len == 1 => o += 2,
            1 => o += 1,
            IPOPT_LSRR | IPOPT_SSRR => return Ok(true),
            _ => {
                if len < 2 || o + len > hdr_len {
                    return Err(Malformed);
                }
                o += len;
            }
        }
    }
    // More options than walked: not verified.
    if o >= hdr_len {
        Ok(false)
    } else {
        Err(Malformed)
    }
}

#[inline(always)]
fn parse_ipv6(c: &Cursor, off: usize, pkt: &mut Packet) -> Result<(), Malformed> {
    let ip: &Ipv6Hdr = c.ptr_at(off)?;
    if ip.version_tc_flow[0] >> 4 != 6 {
        return Err(Malformed);
    }
    pkt.l3 = L3::Ipv6;
    pkt.hop_limit = ip.hop_limit;
    pkt.src = ip.src;
    pkt.dst = ip.dst;
    let payload_len = be16(ip.payload_len) as usize;
    let mut next = ip.next_hdr;
    let mut off = off + size_of::<Ipv6Hdr>();
    // payload_len 0: a jumbogram / IPv6 BIG TCP GSO packet, whose extent is the frame's.
    let l3_end = if payload_len == 0 {
        off + c.remaining(off)
    } else {
        off + payload_len
    };
    let mut chain = 0;
    let mut frag_seen = false;
    loop {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_MH => {
                if chain == IPV6_EXT_MAX_CHAIN {
                    return Err(Malformed);
                }
                let ext: &Ipv6RoutingHdr = c.ptr_at(off)?;
                let len = (ext.len as usize + 1) * 8;
                if off + len > l3_end || c.remaining(off) < len {
                    return Err(Malformed);
                }
                // A routing header with segments left sends the packet on to other addresses.
                if next == IPPROTO_ROUTING && ext.segments_left != 0 {
                    pkt.source_routed = true;
                }
                next = ext.next_hdr;
                off += len;
            }
            IPPROTO_AH => {
                if chain == IPV6_EXT_MAX_CHAIN {
                    return Err(Malformed);
                }
                // RFC 4302: AH's length is in 4-octet units, minus 2.
                let ext: &Ipv6ExtHdr = c.ptr_at(off)?;
                let len = (ext.len as usize + 2) * 4;
                if off + len > l3_end || c.remaining(off) < len {
                    return Err(Malformed);
                }
                next = ext.next_hdr;
                off += len;
            }
            IPPROTO_FRAGMENT => {
                if chain == IPV6_EXT_MAX_CHAIN {
                    return Err(Malformed);
                }
                let frag: &Ipv6FragHdr = c.ptr_at(off)?;
                // A second fragment header: receivers reassemble by the first, we would check the
                // second.
                if off + size_of::<Ipv6FragHdr>() > l3_end || frag_seen {
                    return Err(Malformed);
                }
                frag_seen = true;
                let fo = be16(frag.frag_off);
                pkt.frag_id = u32::from_be_bytes(frag.id);
                next = frag.next_hdr;
                off += size_of::<Ipv6FragHdr>();
                if fo & 0xfff8 != 0 {
                    pkt.fragment = Fragment::NonFirst;
                    pkt.proto = next;
                    return Ok(());
                }
                if fo & 1 != 0 {
                    pkt.fragment = Fragment::First;
                }
                // An atomic fragment (offset 0, M clear, RFC 6946) is a whole datagram: treat it as such.
            }
            _ => break,
        }
        chain += 1;
    }
    pkt.proto = next;
    parse_l4(c, off, l3_end.saturating_sub(off), next, pkt)
}

/// Parses the transport header at `off`; `l3_room` is how many bytes of the IP datagram follow `off`.
#[inline(always)]
fn parse_l4(
    c: &Cursor,
    off: usize,
    l3_room: usize,
    proto: u8,
    pkt: &mut Packet,
) -> Result<(), Malformed> {
    pkt.l4_off = off as u16;
    match proto {
        IPPROTO_TCP => {
            let tcp: &TcpHdr = c.ptr_at(off)?;
            let doff = ((tcp.doff_res >> 4) as usize) * 4;
            if doff < size_of::<TcpHdr>() || l3_room < doff || c.remaining(off) < doff {
                return Err(Malformed);
            }
            pkt.l4 = L4::Tcp {
                sport: be16(tcp.sport),
                dport: be16(tcp.dport),
                flags: tcp.flags,
                seq: u32::from_be_bytes(tcp.seq),
                ack: u32::from_be_bytes(tcp.ack),
            };
        }
        IPPROTO_UDP => {
            let udp: &UdpHdr = c.ptr_at(off)?;
            if l3_room < size_of::<UdpHdr>() {
                return Err(Malformed);
            }
            pkt.l4 = L4::Udp {
                sport: be16(udp.sport),
                dport: be16(udp.dport),
            };
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let icmp: &IcmpHdr = c.ptr_at(off)?;
            if l3_room < size_of::<IcmpHdr>() {
                return Err(Malformed);
            }
            // ICMP inside IPv6 (or ICMPv6 inside IPv4) is no ICMP any stack would act on: an unknown protocol.
            let v6 = match (pkt.l3, proto) {
                (L3::Ipv4, IPPROTO_ICMP) => Some(false),
                (L3::Ipv6, IPPROTO_ICMPV6) => Some(true),
                _ => None,
            };
            if let Some(v6) = v6
                && is_icmp_error(icmp.kind, v6)
            {
                pkt.quote_matches = quote_matches(c, off, l3_room, v6, pkt)?;
            }
            pkt.l4 = match (pkt.l3, proto) {
                (L3::Ipv4, IPPROTO_ICMP) => L4::Icmp {
                    kind: icmp.kind,
                    code: icmp.code,
                    id: be16([icmp.rest[0], icmp.rest[1]]),
                },
                (L3::Ipv6, IPPROTO_ICMPV6) => L4::Icmpv6 {
                    kind: icmp.kind,
                    code: icmp.code,
                    id: be16([icmp.rest[0], icmp.rest[1]]),
                },
                _ => L4::Other,
            };
        }
        _ => pkt.l4 = L4::Other,
    }
    Ok(())
}

/// ICMP error messages (DESIGN.md "ICMP"): they quote the packet they answer.
#[inline(always)]
pub fn is_icmp_error(kind: u8, v6: bool) -> bool {
    use vpcgate_common::icmp::*;
    if v6 {
        matches!(
            kind,
            ICMPV6_DEST_UNREACH
                | ICMPV6_PACKET_TOO_BIG
                | ICMPV6_TIME_EXCEEDED
                | ICMPV6_PARAMETER_PROBLEM
        )
    } else {
        matches!(
            kind,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
        )
    }
}

#[inline(always)]
fn eq16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    u128::from_ne_bytes(*a) == u128::from_ne_bytes(*b)
}

/// The quoted IP header of an ICMP error at `icmp_off` (fixed part present inside the datagram, right
/// version, else malformed): whether it is the reverse of this packet's addresses.
#[inline(always)]
fn quote_matches(
    c: &Cursor,
    icmp_off: usize,
    l3_room: usize,
    v6: bool,
    pkt: &Packet,
) -> Result<bool, Malformed> {
    let inner = icmp_off + size_of::<IcmpHdr>();
    if v6 {
        let ip: &Ipv6Hdr = c.ptr_at(inner)?;
        if l3_room < size_of::<IcmpHdr>() + size_of::<Ipv6Hdr>() || ip.version_tc_flow[0] >> 4 != 6
        {
            return Err(Malformed);
        }
        let (src, dst) = (ip.src, ip.dst);
        Ok(eq16(&src, &pkt.dst) && eq16(&dst, &pkt.src))
    } else {
        let ip: &Ipv4Hdr = c.ptr_at(inner)?;
        if l3_room < size_of::<IcmpHdr>() + size_of::<Ipv4Hdr>()
            || ip.version_ihl >> 4 != 4
            || ip.version_ihl & 0x0f < 5
        {
            return Err(Malformed);
        }
        let (src, dst) = (u32::from_ne_bytes(ip.src), u32::from_ne_bytes(ip.dst));
        let mut ps = [0u8; 4];
        let mut pd = [0u8; 4];
        ps.copy_from_slice(&pkt.src[..4]);
        pd.copy_from_slice(&pkt.dst[..4]);
        Ok(src == u32::from_ne_bytes(pd) && dst == u32::from_ne_bytes(ps))
    }
}

/// Extension headers walked in a quoted IPv6 packet (an error quotes the gateway's own packet: a
/// fragment header at most, in practice).
const QUOTE_EXT_MAX_CHAIN: usize = 2;

/// What an ICMP error quotes: the packet it answers, as that packet left this host.
#[derive(Clone, Copy)]
pub struct Quote {
    pub proto: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// 0 when the quoted protocol has no ports, or for a non-first fragment.
    pub sport: u16,
    pub dport: u16,
    /// TCP only: the quoted segment's sequence number (RFC 792 quotes at least 8 transport bytes).
    pub seq: u32,
}

/// What an ICMP error quotes (the packet it answers), for the observers. Ports are read by the quoted
/// protocol's own layout: TCP and UDP only (an ICMP echo's identifier is not a port: 0); IPv6
/// extension headers in the quote are walked.
#[inline(always)]
pub fn quoted(c: &Cursor, icmp_off: usize, v6: bool) -> Result<Quote, Malformed> {
    let inner = icmp_off + size_of::<IcmpHdr>();
    let mut q = Quote {
        proto: 0,
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
        seq: 0,
    };
    let mut l4 = if v6 {
        let ip: &Ipv6Hdr = c.ptr_at(inner)?;
        q.src = ip.src;
        q.dst = ip.dst;
        q.proto = ip.next_hdr;
        inner + size_of::<Ipv6Hdr>()
    } else {
        let ip: &Ipv4Hdr = c.ptr_at(inner)?;
        let hdr_len = ((ip.version_ihl & 0x0f) as usize) * 4;
        if hdr_len < size_of::<Ipv4Hdr>() {
            return Err(Malformed);
        }
        q.src[..4].copy_from_slice(&ip.src);
        q.dst[..4].copy_from_slice(&ip.dst);
        q.proto = ip.proto;
        // A quoted non-first fragment carries no ports.
        if be16(ip.frag_off) & 0x1fff != 0 {
            return Ok(q);
        }
        inner + hdr_len
    };
    if v6 {
        for _ in 0..QUOTE_EXT_MAX_CHAIN {
            match q.proto {
                IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_MH => {
                    let ext: &Ipv6ExtHdr = c.ptr_at(l4)?;
                    q.proto = ext.next_hdr;
                    l4 += (ext.len as usize + 1) * 8;
                }
                IPPROTO_FRAGMENT => {
                    let frag: &Ipv6FragHdr = c.ptr_at(l4)?;
                    q.proto = frag.next_hdr;
                    l4 += size_of::<Ipv6FragHdr>();
                    if be16(frag.frag_off) & 0xfff8 != 0 {
                        return Ok(q);
                    }
                }
                _ => break,
            }
        }
    }
    match q.proto {
        // Both TCP and UDP start with the source and destination ports; RFC 792 quotes at least 8
        // bytes, so a TCP quote has its sequence number.
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports: &UdpHdr = c.ptr_at(l4)?;
            q.sport = be16(ports.sport);
            q.dport = be16(ports.dport);
            if q.proto == IPPROTO_TCP {
                q.seq = u32::from_be_bytes(ports.len_check());
            }
            Ok(q)
        }
        _ => Ok(q),
    }
}
