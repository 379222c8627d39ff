//! Flow state the verdict reads: flows peers initiated toward the gateway (rule 3), and datagrams whose
//! first fragment passed.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use vpcgate_common::{
    datapath::{FlowKey, FlowValue, FragKey, FragValue},
    icmp::{ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST},
};

use crate::{
    maps::{FLOWS, FRAGS},
    parse::{
        IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, L3, L4, Packet, TCP_ACK, TCP_SYN,
    },
};

fn family(pkt: &Packet) -> u8 {
    if pkt.l3 == L3::Ipv4 { 4 } else { 6 }
}

/// The flow key of an outbound packet, from the gateway's side (local = source). None for packets that
/// cannot be replies (no ports, or not an echo reply).
#[inline(always)]
pub fn outbound_key(pkt: &Packet) -> Option<FlowKey> {
    let (proto, local_port, remote_port) = match pkt.l4 {
        L4::Tcp { sport, dport, .. } => (IPPROTO_TCP, sport, dport),
        L4::Udp { sport, dport } => (IPPROTO_UDP, sport, dport),
        L4::Icmp {
            kind: ICMP_ECHO_REPLY,
            id,
            ..
        } => (IPPROTO_ICMP, id, id),
        L4::Icmpv6 {
            kind: ICMPV6_ECHO_REPLY,
            id,
            ..
        } => (IPPROTO_ICMPV6, id, id),
        _ => return None,
    };
    Some(FlowKey {
        family: family(pkt),
        proto,
        local_port: local_port.to_be_bytes(),
        remote_port: remote_port.to_be_bytes(),
        _pad: [0; 2],
        local: pkt.src,
        remote: pkt.dst,
    })
}

/// Rule 3: the packet replies in a flow a peer initiated toward the gateway.
#[inline(always)]
pub fn is_reply(pkt: &Packet) -> bool {
    match outbound_key(pkt) {
        // SAFETY: the value is only tested for presence.
        Some(key) => unsafe { FLOWS.get(key) }.is_some(),
        None => false,
    }
}

/// Records an inbound packet that initiates a flow toward the gateway (ENI ingress): a TCP SYN, any UDP
/// datagram, an ICMP echo request. The gateway's replies then pass by rule 3.
#[inline(always)]
pub fn record_inbound(pkt: &Packet) {
    let (proto, remote_port, local_port) = match pkt.l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
        } if flags & (TCP_SYN | TCP_ACK) == TCP_SYN => (IPPROTO_TCP, sport, dport),
        L4::Udp { sport, dport } => (IPPROTO_UDP, sport, dport),
        L4::Icmp {
            kind: ICMP_ECHO_REQUEST,
            id,
            ..
        } => (IPPROTO_ICMP, id, id),
        L4::Icmpv6 {
            kind: ICMPV6_ECHO_REQUEST,
            id,
            ..
        } => (IPPROTO_ICMPV6, id, id),
        _ => return,
    };
    let key = FlowKey {
        family: family(pkt),
        proto,
        local_port: local_port.to_be_bytes(),
        remote_port: remote_port.to_be_bytes(),
        _pad: [0; 2],
        local: pkt.dst,
        remote: pkt.src,
    };
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // A full LRU evicts the oldest flow; an error here only means a reply may be evaluated by policy.
    let _ = FLOWS.insert(key, FlowValue { last_seen_ns: now, closing: 0, _pad: 0 }, 0);
}

#[inline(always)]
fn frag_key(pkt: &Packet) -> FragKey {
    FragKey {
        family: family(pkt),
        proto: pkt.proto,
        _pad: [0; 2],
        id: pkt.frag_id,
        src: pkt.src,
        dst: pkt.dst,
    }
}

/// The first fragment of a datagram passed: remember it (with its rule) for the non-first fragments.
#[inline(always)]
pub fn record_first_fragment(pkt: &Packet, rule: u32) {
    let _ = FRAGS.insert(frag_key(pkt), FragValue { rule, _pad: 0, first_seen_ns: 0 }, 0);
}

/// Whether the first fragment of this non-first fragment's datagram passed.
#[inline(always)]
pub fn first_fragment_passed(pkt: &Packet) -> bool {
    // SAFETY: the value is only tested for presence.
    unsafe { FRAGS.get(frag_key(pkt)) }.is_some()
}
