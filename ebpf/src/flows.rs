//! Flow state the verdict reads: flows peers initiated toward a gateway socket (rule 3), and datagrams
//! whose first fragment passed (DESIGN.md "Fragments").
//!
//! Rule 3 is written so that a peer cannot open the gateway's egress toward itself by sending first:
//! a flow is recorded at the ENI's ingress only toward one of the gateway's own addresses (`LOCAL_ADDRS`)
//! and only when the kernel's socket lookup finds a socket that would receive the packet; a TCP flow is
//! half-open (only the gateway's SYN-ACK or RST answers it) until the peer acknowledges that SYN-ACK (ack
//! = its sequence number + 1), and only then established; a bare SYN from the gateway is never a reply; flows expire when idle. Half-open flows
//! live in their own map, so a SYN flood churns that map and never evicts established flows.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_CURRENT_NETNS, BPF_TCP_ESTABLISHED, BPF_TCP_LISTEN, bpf_sock_tuple},
    helpers::{bpf_ktime_get_coarse_ns, bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release},
    maps::LruHashMap,
    programs::XdpContext,
};
use vpcgate_common::{
    datapath::{
        FLOW_CLOSING, FLOW_SYNACK_SENT, FlowKey, FlowValue, FragKey, FragValue, GenConfig,
        LocalAddr, limits, reply_port_slot,
    },
    icmp::{ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST},
};

use crate::{
    maps::{
        DGRAM_FLOWS, ECHO_FLOWS, FLOWS, FRAGS, HALF_OPEN, LOCAL_ADDRS, NO_SOCKET, NO_SOCKET_SLOTS,
        NoSocket, REPLY_PORTS, words_diff,
    },
    parse::{
        Fragment, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, L3, L4, Packet, TCP_ACK,
        TCP_FIN, TCP_RST, TCP_SYN,
    },
};

const NS_PER_S: u64 = 1_000_000_000;

/// A flow's last-seen time is rewritten at most this often (one shared cache line per flow, not per
/// packet).
const REFRESH_NS: u64 = NS_PER_S;

fn family(pkt: &Packet) -> u8 {
    if pkt.l3 == L3::Ipv4 { 4 } else { 6 }
}

/// Flow and fragment times: the coarse monotonic clock (updated every tick, a few ms at most behind
/// `bpf_ktime_get_ns`, without reading the TSC), which serves timeouts counted in seconds. The agent
/// reads them against CLOCK_MONOTONIC.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// `REPLY_PORTS` index of a protocol.
const TCP_PORTS: u32 = 0;
const UDP_PORTS: u32 = 1;

/// Marks `port` of a protocol as one toward which a peer-initiated flow exists: done before the flow is
/// recorded, so a reply never finds its port unmarked while its flow is there.
#[inline(always)]
fn mark_reply_port(proto: u32, port: u16) {
    let (index, byte) = reply_port_slot(proto, port);
    if let Some(p) = REPLY_PORTS.get_ptr_mut(index) {
        // SAFETY: a map value; racing writers store the same byte.
        unsafe { (*p)[byte] = 1 };
    }
}

/// Whether a packet leaving from local `port` may be a reply: false only when no flow was ever recorded
/// toward that port.
#[inline(always)]
fn may_be_reply(proto: u32, port: u16) -> bool {
    let (index, byte) = reply_port_slot(proto, port);
    match REPLY_PORTS.get(index) {
        Some(p) => p[byte] != 0,
        None => true,
    }
}

/// Whether a flow last seen at `last` is still live at `now` under `timeout_s`.
#[inline(always)]
fn live(now: u64, last: u64, timeout_s: u32) -> bool {
    now.saturating_sub(last) < u64::from(timeout_s) * NS_PER_S
}

#[inline(always)]
fn key(pkt: &Packet, proto: u8, local_port: u16, remote_port: u16, outbound: bool) -> FlowKey {
    let (local, remote) = if outbound {
        (pkt.src, pkt.dst)
    } else {
        (pkt.dst, pkt.src)
    };
    FlowKey {
        family: family(pkt),
        proto,
        local_port: local_port.to_be_bytes(),
        remote_port: remote_port.to_be_bytes(),
        _pad: [0; 2],
        local,
        remote,
    }
}

/// Rule 3: the packet (leaving the gateway) replies in a live flow a peer initiated toward it.
#[inline(always)]
pub fn is_reply(pkt: &Packet, cfg: &GenConfig) -> bool {
    if pkt.fragment == Fragment::NonFirst {
        return false;
    }
    match pkt.l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
            seq,
            ..
        } => {
            // A bare SYN opens a connection: never a reply, whatever a peer sent before.
            if flags & (TCP_SYN | TCP_ACK) == TCP_SYN || !may_be_reply(TCP_PORTS, sport) {
                return false;
            }
            let t = now();
            let k = key(pkt, IPPROTO_TCP, sport, dport, true);
            // SAFETY: the value is copied out at once.
            if let Some(v) = unsafe { FLOWS.get(k) } {
                let timeout = if v.state & FLOW_CLOSING != 0 {
                    cfg.tcp_closing_timeout_s
                } else {
                    cfg.tcp_timeout_s
                };
                // An expired flow is no flow: a half-open one of the same 4-tuple may still answer.
                if live(t, v.last_seen_ns, timeout) {
                    return true;
                }
            }
            // A half-open flow is answered only by the gateway's SYN-ACK or RST. The SYN-ACK's sequence
            // number is remembered: only the peer's ACK of it establishes the flow (a blind spoofer's
            // SYN + ACK pair does not).
            let syn_ack = flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
            if (syn_ack || flags & TCP_RST != 0)
                && let Some(v) = HALF_OPEN.get_ptr_mut(k)
            {
                // SAFETY: a map value; a racing writer stores the same kind of fields.
                unsafe {
                    if !live(t, (*v).last_seen_ns, cfg.tcp_closing_timeout_s) {
                        return false;
                    }
                    if syn_ack {
                        (*v).expect_ack = seq.wrapping_add(1);
                        (*v).state |= FLOW_SYNACK_SENT;
                    }
                }
                return true;
            }
            false
        }
        L4::Udp { sport, dport } => {
            may_be_reply(UDP_PORTS, sport)
                && dgram_live(
                    &DGRAM_FLOWS,
                    &key(pkt, IPPROTO_UDP, sport, dport, true),
                    cfg,
                )
        }
        L4::Icmp {
            kind: ICMP_ECHO_REPLY,
            id,
            ..
        } => dgram_live(&ECHO_FLOWS, &key(pkt, IPPROTO_ICMP, id, id, true), cfg),
        L4::Icmpv6 {
            kind: ICMPV6_ECHO_REPLY,
            id,
            ..
        } => dgram_live(&ECHO_FLOWS, &key(pkt, IPPROTO_ICMPV6, id, id, true), cfg),
        _ => false,
    }
}

type FlowMap = LruHashMap<FlowKey, FlowValue>;

#[inline(always)]
fn dgram_live(map: &'static FlowMap, k: &FlowKey, cfg: &GenConfig) -> bool {
    // SAFETY: the value is copied out at once.
    match unsafe { map.get(k) } {
        Some(v) => live(now(), v.last_seen_ns, cfg.udp_timeout_s),
        None => false,
    }
}

/// Whether the packet's destination is one of the gateway's own addresses.
#[inline(always)]
fn to_local(pkt: &Packet) -> bool {
    let k = LocalAddr {
        family: family(pkt),
        _pad: [0; 3],
        addr: pkt.dst,
    };
    // SAFETY: the value is only tested for presence.
    unsafe { LOCAL_ADDRS.get(k) }.is_some()
}

/// `struct bpf_sock_tuple` for IPv6 (the IPv4 form is its first 12 bytes with 4-byte addresses).
#[repr(C)]
struct Tuple6 {
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: [u8; 2],
    dport: [u8; 2],
}

#[repr(C)]
struct Tuple4 {
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
}

/// Whether the kernel has a socket that would receive this inbound packet as a new flow, in the receiving
/// device's network namespace: for a TCP SYN a listener, for UDP a bound socket not connected to a peer.
///
/// The socket the 4-tuple finds must itself be listening: a SYN toward a socket that is connecting from
/// that port (SYN_SENT: the gateway tried to reach the peer, and its SYN was dropped) makes a simultaneous
/// open, whose SYN-ACK would otherwise pass as a reply: the peer would open the gateway's egress toward
/// itself by sending first (DESIGN.md rule 3). Likewise a datagram that finds a UDP socket connected to
/// its sender (the lookup prefers the socket connected to the 4-tuple) belongs to the gateway's own flow,
/// which no peer initiated: the peer knows the port the gateway connected to and could try every
/// ephemeral port; its datagrams are delivered, and open nothing.
/// A separate BPF function taking plain values (see `account::record_passed`).
#[inline(never)]
fn socket_exists(ctx: *mut core::ffi::c_void, v6: bool, tcp: bool, t: &mut Tuple6) -> bool {
    let mut t4 = Tuple4 {
        saddr: [t.saddr[0], t.saddr[1], t.saddr[2], t.saddr[3]],
        daddr: [t.daddr[0], t.daddr[1], t.daddr[2], t.daddr[3]],
        sport: t.sport,
        dport: t.dport,
    };
    let (tuple, size) = if v6 {
        (
            t as *mut Tuple6 as *mut bpf_sock_tuple,
            core::mem::size_of::<Tuple6>() as u32,
        )
    } else {
        (
            &mut t4 as *mut Tuple4 as *mut bpf_sock_tuple,
            core::mem::size_of::<Tuple4>() as u32,
        )
    };
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: `tuple` points at `size` bytes of stack memory; a socket found is released at once.
    unsafe {
        let sk = if tcp {
            bpf_sk_lookup_tcp(ctx, tuple, size, netns, 0)
        } else {
            bpf_sk_lookup_udp(ctx, tuple, size, netns, 0)
        };
        if sk.is_null() {
            return false;
        }
        // A connected UDP socket is in TCP_ESTABLISHED (the kernel's UDP sockets borrow TCP's states).
        let receives = if tcp {
            (*sk).state == BPF_TCP_LISTEN
        } else {
            (*sk).state != BPF_TCP_ESTABLISHED
        };
        bpf_sk_release(sk as *mut core::ffi::c_void);
        receives
    }
}

/// Whether an inbound datagram (not in a live flow) starts a flow: it goes to one of the gateway's own
/// addresses (`to_local`) and a socket there would take it as new (`socket_exists`). A "no" is remembered
/// per CPU for the rest of the jiffies tick: most datagrams toward the gateway's addresses answer its own
/// UDP clients, whose sockets are connected (no flow, see `socket_exists`), and each would otherwise cost
/// a hash lookup and a socket lookup.
///
/// Only a "no" is remembered, for one tuple (addresses, ports, family, protocol) and one tick (one jiffy:
/// 4 ms at HZ=250, 10 ms at most):
/// a socket bound or an address added within that tick misses its first datagrams, whose flow is then
/// not recorded (the gateway's answers drop, as for any packet that is not a reply: stricter, never
/// looser). A slot is a hash of the tuple: a peer choosing its port to collide only evicts, which costs
/// lookups. Only XDP ingress reads and writes the memo, while it holds its scratch slot: one run per CPU.
#[inline(always)]
fn udp_starts_flow(ctx: &XdpContext, pkt: &Packet, sport: u16, dport: u16) -> bool {
    let k = memo_key(pkt, sport, dport);
    let slot = memo_slot(&k);
    let tick = crate::account::tick();
    let memo = NO_SOCKET.get_ptr_mut(0);
    if let Some(m) = memo {
        // SAFETY: this CPU's copy of the map's one value; `slot` is masked below its length.
        let s = unsafe { &(*m)[slot] };
        if words_diff(&s.key, &k) | (s.tick ^ tick) == 0 {
            return false;
        }
    }
    let v6 = pkt.l3 == L3::Ipv6;
    if to_local(pkt) && socket_exists(ctx.as_ptr(), v6, false, &mut tuple(pkt, sport, dport)) {
        return true;
    }
    if let Some(m) = memo {
        // SAFETY: as above.
        unsafe {
            (*m)[slot] = NoSocket {
                key: k,
                tick,
                _pad: 0,
            }
        };
    }
    false
}

/// A datagram's tuple as words: source, destination, ports, family and protocol.
#[inline(always)]
fn memo_key(pkt: &Packet, sport: u16, dport: u16) -> [u32; 10] {
    // SAFETY: `src` and `dst` are 16 bytes at offsets 0 and 16 of an 8-aligned struct.
    let (s, d) = unsafe {
        (
            core::ptr::read(pkt.src.as_ptr() as *const [u32; 4]),
            core::ptr::read(pkt.dst.as_ptr() as *const [u32; 4]),
        )
    };
    [
        s[0],
        s[1],
        s[2],
        s[3],
        d[0],
        d[1],
        d[2],
        d[3],
        (u32::from(sport) << 16) | u32::from(dport),
        u32::from(family(pkt)) | (u32::from(pkt.proto) << 8),
    ]
}

/// The slot of a key: its words folded (XOR) and mixed once (a multiplicative hash's top bits). Cheap, and
/// no secret: a sender that chooses its tuples to share a slot only evicts (see `udp_starts_flow`).
#[inline(always)]
fn memo_slot(k: &[u32; 10]) -> usize {
    let mut h = 0u32;
    for w in k {
        h ^= w;
    }
    (h.wrapping_mul(0x9e37_79b1) >> 28) as usize & (NO_SOCKET_SLOTS - 1)
}

#[inline(always)]
fn tuple(pkt: &Packet, sport: u16, dport: u16) -> Tuple6 {
    Tuple6 {
        saddr: pkt.src,
        daddr: pkt.dst,
        sport: sport.to_be_bytes(),
        dport: dport.to_be_bytes(),
    }
}

/// Refreshes a live flow's last-seen time (at most every `REFRESH_NS`), marking it closing on FIN/RST.
#[inline(always)]
fn refresh(v: *mut FlowValue, now: u64, closing: bool) {
    // SAFETY: `v` points at a live map value; racing writers only store timestamps and a flag.
    unsafe {
        if now.saturating_sub((*v).last_seen_ns) >= REFRESH_NS {
            (*v).last_seen_ns = now;
        }
        if closing && (*v).state & FLOW_CLOSING == 0 {
            (*v).state |= FLOW_CLOSING;
            (*v).last_seen_ns = now;
        }
    }
}

/// The ENI's ingress: records and refreshes flows peers initiate toward a gateway socket. Inlined into
/// XDP ingress, its one caller: the parser is a global function, so the caller reaches it in one
/// state, and the call and return it saves were about a tenth of the program's time on a datagram
/// (83 against 69 ns for the minimal enforcer before, within 10% of it after: issue 13).
///
/// Most TCP segments that arrive answer the gateway's own connections, toward its ephemeral ports, where
/// no flow was ever recorded: the local port's `REPLY_PORTS` mark (set before any flow or half-open entry
/// toward it, never cleared) says so without a hash lookup, and such a segment costs no flow lookup, no
/// clock read and no policy read. A UDP datagram toward an unmarked port is checked by `udp_starts_flow`,
/// which remembers a "no" for the tick.
#[inline(always)]
pub fn record_inbound(ctx: &XdpContext, pkt: &Packet) {
    if pkt.fragment == Fragment::NonFirst || pkt.l3 == L3::NonIp {
        return;
    }
    // Flows follow the active policy's timeouts (`active`); with no policy nothing is recorded (all
    // drops anyway).
    let v6 = pkt.l3 == L3::Ipv6;
    match pkt.l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
            ack,
            ..
        } => {
            let syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            // Toward an unmarked port there is no flow to refresh and no half-open entry to complete:
            // only a SYN can start something.
            let marked = may_be_reply(TCP_PORTS, dport);
            if !marked && !syn {
                return;
            }
            let Some(active) = crate::verdict::active() else {
                return;
            };
            let cfg = active.cfg;
            let t = now();
            let k = key(pkt, IPPROTO_TCP, dport, sport, false);
            let closing = flags & (TCP_FIN | TCP_RST) != 0;
            if marked && let Some(v) = FLOWS.get_ptr_mut(k) {
                // SAFETY: a map value, read at once.
                let (was_closing, last) =
                    unsafe { ((*v).state & FLOW_CLOSING != 0, (*v).last_seen_ns) };
                let timeout = if was_closing {
                    cfg.tcp_closing_timeout_s
                } else {
                    cfg.tcp_timeout_s
                };
                // An expired flow is never revived by a peer's packet; a SYN on the 4-tuple of a closed
                // connection starts a new one: both go through the checks below again.
                if live(t, last, timeout) && !(syn && was_closing) {
                    refresh(v, t, closing);
                    return;
                }
                let _ = FLOWS.remove(k);
            }
            if syn {
                if to_local(pkt)
                    && socket_exists(ctx.as_ptr(), v6, true, &mut tuple(pkt, sport, dport))
                {
                    mark_reply_port(TCP_PORTS, dport);
                    let _ = HALF_OPEN.insert(
                        k,
                        FlowValue {
                            last_seen_ns: t,
                            state: 0,
                            expect_ack: 0,
                        },
                        0,
                    );
                }
                return;
            }
            // SAFETY: the value is copied out at once.
            let Some(h) = (unsafe { HALF_OPEN.get(k) }) else {
                return;
            };
            let h = *h;
            if !live(t, h.last_seen_ns, cfg.tcp_closing_timeout_s) || flags & TCP_RST != 0 {
                let _ = HALF_OPEN.remove(k);
                return;
            }
            // The peer acknowledged the gateway's SYN-ACK: established. Any other packet (a guessed or
            // junk ACK) changes nothing.
            if flags & TCP_ACK != 0 && h.state & FLOW_SYNACK_SENT != 0 && ack == h.expect_ack {
                mark_reply_port(TCP_PORTS, dport);
                let _ = FLOWS.insert(
                    k,
                    FlowValue {
                        last_seen_ns: t,
                        state: if closing { FLOW_CLOSING } else { 0 },
                        expect_ack: 0,
                    },
                    0,
                );
                let _ = HALF_OPEN.remove(k);
            }
        }
        L4::Udp { sport, dport } => {
            // Toward an unmarked port there is no flow to refresh: only a datagram to a local socket
            // starts one (with a policy applied: without one nothing is recorded, all drops anyway).
            if !may_be_reply(UDP_PORTS, dport) {
                if udp_starts_flow(ctx, pkt, sport, dport) && crate::verdict::active().is_some() {
                    mark_reply_port(UDP_PORTS, dport);
                    insert_dgram(
                        &DGRAM_FLOWS,
                        &key(pkt, IPPROTO_UDP, dport, sport, false),
                        now(),
                    );
                }
                return;
            }
            let Some(active) = crate::verdict::active() else {
                return;
            };
            let t = now();
            let k = key(pkt, IPPROTO_UDP, dport, sport, false);
            if refresh_dgram(&DGRAM_FLOWS, &k, t, active.cfg) {
                return;
            }
            if udp_starts_flow(ctx, pkt, sport, dport) {
                mark_reply_port(UDP_PORTS, dport);
                insert_dgram(&DGRAM_FLOWS, &k, t);
            }
        }
        // The kernel answers echo requests to its own addresses itself.
        L4::Icmp {
            kind: ICMP_ECHO_REQUEST,
            id,
            ..
        } => echo_request(pkt, IPPROTO_ICMP, id),
        L4::Icmpv6 {
            kind: ICMPV6_ECHO_REQUEST,
            id,
            ..
        } => echo_request(pkt, IPPROTO_ICMPV6, id),
        _ => {}
    }
}

/// Refreshes a live datagram flow; an expired one is removed (never revived by the peer). Whether the
/// flow was live.
#[inline(always)]
fn refresh_dgram(map: &'static FlowMap, k: &FlowKey, t: u64, cfg: &GenConfig) -> bool {
    let Some(v) = map.get_ptr_mut(k) else {
        return false;
    };
    // SAFETY: a map value, read at once.
    if live(t, unsafe { (*v).last_seen_ns }, cfg.udp_timeout_s) {
        refresh(v, t, false);
        return true;
    }
    let _ = map.remove(k);
    false
}

#[inline(always)]
fn echo_request(pkt: &Packet, proto: u8, id: u16) {
    let Some(active) = crate::verdict::active() else {
        return;
    };
    let t = now();
    let k = key(pkt, proto, id, id, false);
    if !refresh_dgram(&ECHO_FLOWS, &k, t, active.cfg) && to_local(pkt) {
        insert_dgram(&ECHO_FLOWS, &k, t);
    }
}

#[inline(always)]
fn insert_dgram(map: &'static FlowMap, k: &FlowKey, t: u64) {
    let _ = map.insert(
        k,
        FlowValue {
            last_seen_ns: t,
            state: 0,
            expect_ack: 0,
        },
        0,
    );
}

/// A datagram's identity as the kernel's reassembly has it: IPv4 (src, dst, id, protocol); IPv6
/// (src, dst, id): the headers after an IPv6 fragment header are part of the fragmentable payload, so a
/// first fragment's upper-layer protocol is not its later fragments' next header.
#[inline(always)]
fn frag_key(pkt: &Packet) -> FragKey {
    FragKey {
        family: family(pkt),
        proto: if pkt.l3 == L3::Ipv4 { pkt.proto } else { 0 },
        _pad: [0; 2],
        id: pkt.frag_id,
        src: pkt.src,
        dst: pkt.dst,
    }
}

/// The first fragment of a datagram passed: remember it (with its rule) for the non-first fragments.
#[inline(always)]
pub fn record_first_fragment(pkt: &Packet, rule: u32) {
    let v = FragValue {
        rule,
        _pad: 0,
        first_seen_ns: now(),
    };
    let _ = FRAGS.insert(frag_key(pkt), v, 0);
}

/// The first fragment of a datagram dropped: its later fragments must not follow an earlier one's entry.
#[inline(always)]
pub fn forget_first_fragment(pkt: &Packet) {
    let _ = FRAGS.remove(frag_key(pkt));
}

/// Whether the first fragment of this non-first fragment's datagram passed, within the reassembly
/// timeout.
#[inline(always)]
pub fn first_fragment_passed(pkt: &Packet) -> bool {
    // SAFETY: the value is copied out at once.
    match unsafe { FRAGS.get(frag_key(pkt)) } {
        Some(v) => now().saturating_sub(v.first_seen_ns) < limits::FRAG_TIMEOUT_NS,
        None => false,
    }
}
