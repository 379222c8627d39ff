//! Crafted frames for BPF_PROG_TEST_RUN: a list of layers serialised with consistent lengths and
//! next-header fields, plus what the parser must report for the frame (derived from how it was built,
//! not by parsing it) and how many bytes the parser needs (every shorter truncation is malformed).

use std::net::IpAddr;

use vpcgate::policy::verdict::{Fragment, IpPacket, L4, Packet};
use vpcgate_common::parse_stats::Stat;

/// An IPv6 extension header.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    /// Hop-by-hop options, `len8` 8-octet units beyond the first.
    HopByHop {
        len8: u8,
    },
    Routing {
        len8: u8,
    },
    DstOpts {
        len8: u8,
    },
    /// Mobility header (parsed as an extension header, like the kernel's ipv6_ext_hdr()).
    Mobility {
        len8: u8,
    },
    /// Authentication header, `len4` = length in 4-octet units minus 2 (RFC 4302).
    Ah {
        len4: u8,
    },
    Fragment {
        offset: u16,
        more: bool,
        id: u32,
    },
}

#[derive(Clone, Copy, Debug)]
pub enum Layer {
    /// An 802.1Q (0x8100) or 802.1ad (0x88a8) tag.
    Vlan {
        tpid: u16,
        vid: u16,
    },
    Arp,
    Ipv4 {
        src: [u8; 4],
        dst: [u8; 4],
        options: u8,
        frag_offset: u16,
        more_fragments: bool,
        id: u16,
    },
    Ipv6 {
        src: [u8; 16],
        dst: [u8; 16],
    },
    Ext(Ext),
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        options: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP in IPv4, ICMPv6 in IPv6.
    Icmp {
        kind: u8,
        code: u8,
    },
    /// An IP protocol the parser does not look into, followed by `len` opaque bytes.
    Proto {
        proto: u8,
        len: usize,
    },
    /// After an ICMP error: the packet it quotes (an IP header of the outer family, UDP from `src` to
    /// `dst`, and the UDP header).
    Quote {
        src: IpAddr,
        dst: IpAddr,
    },
}

/// ICMP (IPv4) and ICMPv6 error types: they quote the packet they answer (DESIGN.md "ICMP").
pub fn is_icmp_error(kind: u8, v6: bool) -> bool {
    if v6 {
        (1..=4).contains(&kind)
    } else {
        matches!(kind, 3 | 11 | 12)
    }
}

/// Steps of the kernel's IPv4 options walk (`ebpf/src/parse.rs`): an option or two NOPs per step.
pub const IPV4_OPTION_STEPS: usize = 12;

/// What the kernel's walk makes of IPv4 options (the bytes after the fixed header): whether one is a
/// source route (LSRR 0x83, SSRR 0x89), or None when it cannot verify them (inconsistent length, more
/// steps than it walks).
pub fn ipv4_options(opts: &[u8]) -> Option<bool> {
    let mut o = 0;
    for _ in 0..IPV4_OPTION_STEPS {
        let Some(&kind) = opts.get(o) else {
            return Some(false);
        };
        match kind {
            0 => return Some(false),
            1 if opts.get(o + 1) == Some(&1) => o += 2,
            1 => o += 1,
            0x83 | 0x89 => return Some(true),
            _ => {
                let len = *opts.get(o + 1)? as usize;
                if len < 2 || o + len > opts.len() {
                    return None;
                }
                o += len;
            }
        }
    }
    (o >= opts.len()).then_some(false)
}

/// A serialised frame and what the parser must make of it.
#[derive(Clone, Debug)]
pub struct Frame {
    pub name: String,
    pub bytes: Vec<u8>,
    /// Start offset of each layer (parallel to the layers it was built from; Ethernet is at 0).
    pub offsets: Vec<usize>,
    /// Bytes the parser must see: every truncation shorter than this is malformed.
    pub required: usize,
    /// Stats the parser increments for the whole frame (empty with `malformed`).
    pub stats: Vec<Stat>,
    pub malformed: bool,
    /// What the frame was built from.
    pub layers: Vec<Layer>,
    /// IPv4 TTL or IPv6 hop limit written.
    pub hop_limit: u8,
    /// An IPv4 source-route option or an IPv6 routing header with segments left.
    pub source_routed: bool,
    /// Malformed for a reason other than its IPv4 options (which edits may change).
    malformed_besides_options: bool,
}

fn ethertype_of(layer: Option<&Layer>) -> u16 {
    match layer {
        Some(Layer::Vlan { tpid, .. }) => *tpid,
        Some(Layer::Arp) => 0x0806,
        Some(Layer::Ipv4 { .. }) => 0x0800,
        Some(Layer::Ipv6 { .. }) => 0x86dd,
        _ => 0x88b5, // IEEE local experimental
    }
}

fn proto_of(layer: Option<&Layer>, v6: bool) -> u8 {
    match layer {
        Some(Layer::Ext(Ext::HopByHop { .. })) => 0,
        Some(Layer::Ext(Ext::Routing { .. })) => 43,
        Some(Layer::Ext(Ext::Fragment { .. })) => 44,
        Some(Layer::Ext(Ext::Ah { .. })) => 51,
        Some(Layer::Ext(Ext::DstOpts { .. })) => 60,
        Some(Layer::Ext(Ext::Mobility { .. })) => 135,
        Some(Layer::Tcp { .. }) => 6,
        Some(Layer::Udp { .. }) => 17,
        Some(Layer::Icmp { .. }) => {
            if v6 {
                58
            } else {
                1
            }
        }
        Some(Layer::Proto { proto, .. }) => *proto,
        Some(Layer::Quote { .. }) => 59,
        _ => 59, // IPv6 "no next header"
    }
}

/// Serialises `layers` (after an Ethernet header) followed by `payload` bytes.
pub fn build(name: &str, layers: &[Layer], payload: usize) -> Frame {
    let mut b = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    b.extend(ethertype_of(layers.first()).to_be_bytes());
    let mut offsets = vec![];
    let mut required = b.len();
    let mut stats = vec![];
    let mut v6 = false;
    // Where the L3 length field lives and where the length it holds counts from, fixed up at the end.
    let mut l3_len_fixup: Option<(usize, usize)> = None;
    let mut parsing = true; // the parser still reads headers (false after a non-first fragment)
    let mut vlan = false;
    let mut malformed = false;
    let mut hop_limit = 64;
    let mut ip_start = 0;
    let mut chain = 0;
    for (i, layer) in layers.iter().enumerate() {
        let next = layers.get(i + 1);
        offsets.push(b.len());
        match *layer {
            Layer::Vlan { vid, .. } => {
                vlan = true;
                b.extend(vid.to_be_bytes());
                b.extend(ethertype_of(next).to_be_bytes());
                required = b.len();
            }
            Layer::Arp => {
                stats.push(Stat::NonIp);
                b.extend([0u8; 28]);
            }
            Layer::Ipv4 {
                src,
                dst,
                options,
                frag_offset,
                more_fragments,
                id,
            } => {
                stats.push(Stat::Ipv4);
                let start = b.len();
                let ihl = 5 + options;
                let frag = (frag_offset & 0x1fff) | if more_fragments { 0x2000 } else { 0 };
                b.extend([0x40 | ihl, 0, 0, 0]);
                b.extend(id.to_be_bytes());
                b.extend(frag.to_be_bytes());
                ip_start = start;
                b.extend([64, proto_of(next, false), 0, 0]);
                b.extend(src);
                b.extend(dst);
                // Options: NOPs then End of Options.
                for k in 0..options as usize * 4 {
                    b.push(if k + 1 == options as usize * 4 { 0 } else { 1 });
                }
                l3_len_fixup = Some((start + 2, start));
                required = b.len();
                if frag_offset != 0 {
                    stats.push(Stat::FragmentNonFirst);
                    parsing = false;
                } else if more_fragments {
                    stats.push(Stat::FragmentFirst);
                }
            }
            Layer::Ipv6 { src, dst } => {
                v6 = true;
                stats.push(Stat::Ipv6);
                let start = b.len();
                ip_start = start;
                // Hop limits as senders use them: 255 for neighbour discovery, 1 for MLD reports.
                hop_limit = match layers.last() {
                    Some(Layer::Icmp {
                        kind: 133..=137, ..
                    }) => 255,
                    Some(Layer::Icmp { kind: 143, .. }) => 1,
                    _ => 64,
                };
                b.extend([0x60, 0, 0, 0, 0, 0, proto_of(next, true), hop_limit]);
                b.extend(src);
                b.extend(dst);
                l3_len_fixup = Some((start + 4, start + 40));
                required = b.len();
            }
            Layer::Ext(ext) => {
                let nh = proto_of(next, true);
                // The parser walks at most IPV6_EXT_MAX_CHAIN (6) extension headers.
                if parsing {
                    chain += 1;
                    if chain > 6 {
                        malformed = true;
                    }
                }
                match ext {
                    Ext::HopByHop { len8 }
                    | Ext::Routing { len8 }
                    | Ext::DstOpts { len8 }
                    | Ext::Mobility { len8 } => {
                        b.extend([nh, len8]);
                        b.extend(vec![0u8; (len8 as usize + 1) * 8 - 2]);
                    }
                    Ext::Ah { len4 } => {
                        b.extend([nh, len4]);
                        b.extend(vec![0u8; (len4 as usize + 2) * 4 - 2]);
                    }
                    Ext::Fragment { offset, more, id } => {
                        let fo = (offset << 3) | u16::from(more);
                        b.extend([nh, 0]);
                        b.extend(fo.to_be_bytes());
                        b.extend(id.to_be_bytes());
                        if offset != 0 {
                            stats.push(Stat::FragmentNonFirst);
                            required = b.len();
                            parsing = false;
                        } else if more {
                            stats.push(Stat::FragmentFirst);
                        }
                    }
                }
                if parsing {
                    required = b.len();
                }
            }
            Layer::Tcp {
                sport,
                dport,
                flags,
                options,
            } => {
                b.extend(sport.to_be_bytes());
                b.extend(dport.to_be_bytes());
                b.extend([0, 0, 0, 1, 0, 0, 0, 0]);
                b.extend([(5 + options) << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
                b.extend(vec![1u8; options as usize * 4]);
                if parsing {
                    stats.push(Stat::Tcp);
                    required = b.len();
                }
            }
            Layer::Udp { sport, dport } => {
                b.extend(sport.to_be_bytes());
                b.extend(dport.to_be_bytes());
                b.extend([0, 0, 0, 0]); // length fixed up below
                if parsing {
                    stats.push(Stat::Udp);
                    required = b.len();
                }
            }
            Layer::Icmp { kind, code } => {
                b.extend([kind, code, 0, 0, 0, 1, 0, 1]);
                if parsing {
                    stats.push(if v6 { Stat::Icmpv6 } else { Stat::Icmp });
                    required = b.len();
                    // An error must quote an IP header: without one the parser cannot verify it.
                    if is_icmp_error(kind, v6) && !matches!(next, Some(Layer::Quote { .. })) {
                        malformed = true;
                    }
                }
            }
            Layer::Quote { src, dst } => {
                let octets = |a: IpAddr| match a {
                    IpAddr::V4(a) => a.octets().to_vec(),
                    IpAddr::V6(a) => a.octets().to_vec(),
                };
                if v6 {
                    b.extend([0x60, 0, 0, 0, 0, 8, 17, 64]);
                } else {
                    b.extend([0x45, 0, 0, 28, 0, 1, 0, 0, 64, 17, 0, 0]);
                }
                b.extend(octets(src));
                b.extend(octets(dst));
                if parsing {
                    required = b.len();
                }
                b.extend([0x9c, 0x40, 0x00, 0x35, 0, 8, 0, 0]);
            }
            Layer::Proto { len, .. } => {
                b.extend(vec![0xabu8; len]);
                if parsing {
                    stats.push(Stat::OtherL4);
                }
            }
        }
    }
    // An IP header whose payload names no L4 layer ("no next header" / unknown): other L4.
    if parsing
        && matches!(
            layers.last(),
            Some(Layer::Ipv4 { .. } | Layer::Ipv6 { .. } | Layer::Ext(_))
        )
    {
        stats.push(Stat::OtherL4);
    }
    if vlan {
        stats.push(Stat::Vlan);
    }
    b.extend((0..payload).map(|i| i as u8));
    // IPv4 tot_len counts from the IP header, IPv6 payload_len from after the fixed header.
    if let Some((field, counted_from)) = l3_len_fixup {
        let len = (b.len() - counted_from) as u16;
        b[field..field + 2].copy_from_slice(&len.to_be_bytes());
    }
    if let Some(i) = layers.iter().position(|l| matches!(l, Layer::Udp { .. })) {
        let start = offsets[i];
        let len = (b.len() - start) as u16;
        b[start + 4..start + 6].copy_from_slice(&len.to_be_bytes());
    }
    let mut frame = Frame {
        name: name.to_owned(),
        bytes: b,
        offsets,
        required,
        stats,
        malformed,
        layers: layers.to_vec(),
        hop_limit,
        source_routed: false,
        malformed_besides_options: malformed,
    };
    if let Some(i) = layers.iter().position(|l| matches!(l, Layer::Ipv4 { .. })) {
        debug_assert_eq!(frame.offsets[i], ip_start);
        frame.recheck_ipv4_options();
    }
    frame.finish();
    frame
}

impl Frame {
    /// Offset of the IP header, if any.
    fn ip_offset(&self) -> Option<(usize, bool)> {
        self.layers.iter().enumerate().find_map(|(i, l)| match l {
            Layer::Ipv4 { .. } => Some((self.offsets[i], false)),
            Layer::Ipv6 { .. } => Some((self.offsets[i], true)),
            _ => None,
        })
    }

    /// Applies what the IPv4 options say (source route, or unverifiable: malformed).
    fn recheck_ipv4_options(&mut self) {
        let Some((at, false)) = self.ip_offset() else {
            return;
        };
        let ihl = usize::from(self.bytes[at] & 0x0f) * 4;
        let walk = ipv4_options(&self.bytes[at + 20..at + ihl]);
        self.source_routed = walk == Some(true);
        self.malformed = self.malformed_besides_options || walk.is_none();
    }

    /// Malformed frames count nothing but `Malformed`.
    fn finish(&mut self) {
        if self.malformed {
            self.stats.clear();
        }
    }

    /// Writes an option (`kind`, 7 bytes: an LSRR/SSRR/record-route with one address) at the start of
    /// the IPv4 options (the frame needs at least 2 option words).
    pub fn with_ipv4_option(mut self, kind: u8) -> Frame {
        let (at, v6) = self.ip_offset().expect("an IP frame");
        assert!(!v6, "IPv4 options in an IPv6 frame");
        assert!(
            usize::from(self.bytes[at] & 0x0f) >= 7,
            "needs 2 option words"
        );
        self.bytes[at + 20..at + 27].copy_from_slice(&[kind, 7, 4, 10, 9, 9, 9]);
        self.name = format!("{} with ipv4 option {kind:#x}", self.name);
        self.recheck_ipv4_options();
        self.finish();
        self
    }

    /// Sets `segments_left` of the first IPv6 routing header (> 0: source-routed).
    pub fn with_segments_left(mut self, n: u8) -> Frame {
        let i = self
            .layers
            .iter()
            .position(|l| matches!(l, Layer::Ext(Ext::Routing { .. })))
            .expect("a routing header");
        let at = self.offsets[i];
        self.bytes[at + 3] = n;
        // A routing header after a non-first fragment's fragment header is payload.
        let after_nonfirst = self.layers[..i]
            .iter()
            .any(|l| matches!(l, Layer::Ext(Ext::Fragment { offset, .. }) if *offset != 0));
        self.source_routed = n != 0 && !after_nonfirst;
        self.name = format!("{} with {n} segments left", self.name);
        self
    }

    /// The TCP header's (sequence, acknowledgment) numbers, when the frame holds a whole TCP header.
    pub fn tcp_seq_ack(&self) -> Option<(u32, u32)> {
        let i = self
            .layers
            .iter()
            .position(|l| matches!(l, Layer::Tcp { .. }))?;
        let at = self.offsets[i];
        let b = self.bytes.get(at + 4..at + 12)?;
        Some((
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        ))
    }

    /// Sets the TCP acknowledgment number.
    pub fn with_tcp_ack(mut self, ack: u32) -> Frame {
        let i = self
            .layers
            .iter()
            .position(|l| matches!(l, Layer::Tcp { .. }))
            .expect("a TCP frame");
        let at = self.offsets[i];
        self.bytes[at + 8..at + 12].copy_from_slice(&ack.to_be_bytes());
        self
    }

    /// Sets the IPv4 TTL or IPv6 hop limit.
    pub fn with_hop_limit(mut self, h: u8) -> Frame {
        let (at, v6) = self.ip_offset().expect("an IP frame");
        self.bytes[at + if v6 { 7 } else { 8 }] = h;
        self.hop_limit = h;
        self.name = format!("{} with hop limit {h}", self.name);
        self
    }

    /// Zeroes the IPv4 total length / IPv6 payload length (what the kernel writes for BIG TCP GSO
    /// packets): the datagram then extends to the end of the frame.
    pub fn with_zero_length(mut self) -> Frame {
        let (at, v6) = self.ip_offset().expect("an IP frame");
        let field = at + if v6 { 4 } else { 2 };
        self.bytes[field..field + 2].copy_from_slice(&[0, 0]);
        self.name = format!("{} with length 0", self.name);
        self
    }

    /// This frame cut to `len` bytes: malformed when the parser needs more than that.
    pub fn truncated(&self, len: usize) -> Frame {
        let malformed = len < self.required || self.malformed;
        Frame {
            name: format!("{} truncated to {len}", self.name),
            bytes: self.bytes[..len].to_vec(),
            offsets: self.offsets.clone(),
            layers: self.layers.clone(),
            required: self.required,
            stats: if malformed {
                vec![]
            } else {
                self.stats.clone()
            },
            malformed,
            hop_limit: self.hop_limit,
            source_routed: self.source_routed,
            malformed_besides_options: self.malformed_besides_options || malformed,
        }
    }

    /// This frame with bytes changed by `edit`, expected to be malformed.
    pub fn corrupted(&self, why: &str, edit: impl FnOnce(&mut Vec<u8>, &[usize])) -> Frame {
        let mut f = self.clone();
        edit(&mut f.bytes, &self.offsets);
        f.name = format!("{}: {why}", self.name);
        f.stats = vec![];
        f.malformed = true;
        f.malformed_besides_options = true;
        f
    }

    /// This frame with bytes changed by `edit`, expected to count `stats`.
    pub fn edited(
        &self,
        why: &str,
        stats: &[Stat],
        edit: impl FnOnce(&mut Vec<u8>, &[usize]),
    ) -> Frame {
        let mut f = self.clone();
        edit(&mut f.bytes, &self.offsets);
        f.name = format!("{}: {why}", self.name);
        f.stats = stats.to_vec();
        f
    }
}

pub const V4_SRC: [u8; 4] = [10, 0, 0, 5];
pub const V4_DST: [u8; 4] = [10, 0, 3, 7];
pub const V6_SRC: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
pub const V6_DST: [u8; 16] = [0xfd, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];

/// A plain IPv4 header layer.
pub fn ipv4() -> Layer {
    Layer::Ipv4 {
        src: V4_SRC,
        dst: V4_DST,
        options: 0,
        frag_offset: 0,
        more_fragments: false,
        id: 1,
    }
}

/// A plain IPv6 header layer.
pub fn ipv6() -> Layer {
    Layer::Ipv6 {
        src: V6_SRC,
        dst: V6_DST,
    }
}

pub fn tcp(dport: u16) -> Layer {
    Layer::Tcp {
        sport: 40000,
        dport,
        flags: 0x02,
        options: 0,
    }
}

pub fn udp(dport: u16) -> Layer {
    Layer::Udp {
        sport: 40000,
        dport,
    }
}

/// What the verdict sees of a frame, derived from how it was built (not by parsing it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Described {
    pub packet: Packet,
    pub src_port: Option<u16>,
    /// ICMP echo identifier (echo request/reply frames).
    pub echo_id: Option<u16>,
    pub proto: u8,
    /// Fragment identification (fragments).
    pub frag_id: Option<u32>,
}

impl Frame {
    /// The reference verdict's view of this frame.
    pub fn describe(&self) -> Described {
        let none = Described {
            packet: Packet::NonIp,
            src_port: None,
            echo_id: None,
            proto: 0,
            frag_id: None,
        };
        if self.malformed {
            return Described {
                packet: Packet::Malformed,
                ..none
            };
        }
        let Some(ip_at) = self
            .layers
            .iter()
            .position(|l| matches!(l, Layer::Ipv4 { .. } | Layer::Ipv6 { .. }))
        else {
            return none;
        };
        let (src, dst, mut fragment, mut frag_id): (IpAddr, IpAddr, Fragment, Option<u32>) =
            match self.layers[ip_at] {
                Layer::Ipv4 {
                    src,
                    dst,
                    frag_offset,
                    more_fragments,
                    id,
                    ..
                } => (
                    src.into(),
                    dst.into(),
                    match (frag_offset, more_fragments) {
                        (0, false) => Fragment::None,
                        (0, true) => Fragment::First,
                        _ => Fragment::NonFirst,
                    },
                    (frag_offset != 0 || more_fragments).then_some(u32::from(id)),
                ),
                Layer::Ipv6 { src, dst } => (src.into(), dst.into(), Fragment::None, None),
                _ => unreachable!(),
            };
        let v6 = dst.is_ipv6();
        let mut rest = self.layers[ip_at + 1..].iter();
        let mut l4 = None;
        let mut proto = 59;
        let (mut src_port, mut echo_id) = (None, None);
        for layer in rest.by_ref() {
            proto = proto_of(Some(layer), v6);
            match *layer {
                Layer::Ext(Ext::Fragment { offset, more, id }) => {
                    frag_id = Some(id);
                    if offset != 0 {
                        fragment = Fragment::NonFirst;
                    } else if more {
                        fragment = Fragment::First;
                    } else {
                        frag_id = None; // an atomic fragment is a whole datagram
                    }
                    if fragment == Fragment::NonFirst {
                        break;
                    }
                }
                Layer::Ext(_) => {}
                _ => {
                    l4 = Some(*layer);
                    break;
                }
            }
        }
        if fragment == Fragment::NonFirst {
            // The protocol the fragment header (or IPv4 header) names: the next layer's.
            let proto =
                match self.layers.iter().rposition(|l| {
                    matches!(l, Layer::Ext(Ext::Fragment { .. }) | Layer::Ipv4 { .. })
                }) {
                    Some(i) => proto_of(self.layers.get(i + 1), v6),
                    None => 59,
                };
            let mut ip = IpPacket::new(src, dst, L4::Other { proto }, fragment);
            ip.hop_limit = self.hop_limit;
            ip.source_routed = self.source_routed;
            return Described {
                packet: Packet::Ip(ip),
                src_port: None,
                echo_id: None,
                proto,
                frag_id,
            };
        }
        let mut tcp_flags = 0;
        let l4 = match l4 {
            None => {
                proto = 59;
                L4::Other { proto: 59 }
            }
            Some(Layer::Tcp {
                sport,
                dport,
                flags,
                ..
            }) => {
                src_port = Some(sport);
                tcp_flags = flags;
                L4::Tcp { dport }
            }
            Some(Layer::Udp { sport, dport }) => {
                src_port = Some(sport);
                L4::Udp { dport }
            }
            // The builder writes identifier 1 into every ICMP header.
            Some(Layer::Icmp { kind, code }) => {
                echo_id = Some(1);
                if v6 {
                    L4::Icmpv6 { kind, code }
                } else {
                    L4::Icmp { kind, code }
                }
            }
            Some(Layer::Proto { proto, .. }) => L4::Other { proto },
            Some(other) => unreachable!("{other:?} after an IP header"),
        };
        let mut ip = IpPacket::new(src, dst, l4, fragment);
        ip.hop_limit = self.hop_limit;
        ip.source_routed = self.source_routed;
        ip.sport = src_port.unwrap_or(0);
        ip.tcp_flags = tcp_flags;
        ip.quoted = rest.next().and_then(|l| match *l {
            Layer::Quote { src, dst } => Some((src, dst)),
            _ => None,
        });
        Described {
            packet: Packet::Ip(ip),
            src_port,
            echo_id,
            proto,
            frag_id,
        }
    }
}
