//! The verdict, rule by rule as DESIGN.md numbers them, with the names of the reference
//! (`agent/src/policy/verdict.rs`). A differential test runs both over the same packets.

use aya_ebpf::maps::{LpmTrie, lpm_trie::Key};
use vpcgate_common::{
    datapath::{
        ACTION_DROP, ACTION_PASS, ADDR_RESERVED_OVERLAP, AddrV4, AddrV6, AddrValue, ESSENTIAL_DHCP,
        ESSENTIAL_MLD, GEN_A, GEN_B, GEN_BITS, GenConfig, INLINE_IN_PORTS, INLINE_PORTS,
        MODE_AUDIT, PORT_KEY_FIXED_BITS, PortData, Prefix6, VerdictMemo, basis, essential, limits,
        verdict_cache_index, verdict_cache_region,
    },
    icmp::*,
    parse_stats::Hook,
    verdict::DropReason,
};

use crate::{
    flows,
    maps::{
        ACTIVE, ADDR_V4, ADDR_V6, GEN_CONFIG, KeyBuf, ONLINK6, POLICY_EPOCH, PORTS, RESERVED_V4,
        RESERVED_V6, VERDICT_CACHE, VERDICT_CACHE_BITS, words_diff,
    },
    parse::{Fragment, IPPROTO_TCP, IPPROTO_UDP, L3, L4, Packet},
};

/// What the datapath decided for one packet.
#[derive(Clone, Copy)]
pub struct Outcome {
    /// `ACTION_PASS` or `ACTION_DROP` (what the program returns; audit mode turns drops into passes).
    pub action: u32,
    /// Drop reason code (also set for audited would-be drops), 0 for none.
    pub reason: u32,
    pub basis: u32,
    /// Rule id or reserved-block index, by `basis`.
    pub id: u32,
    pub audit: bool,
    pub generation: u32,
}

pub struct Ctx {
    pub generation: u32,
    audit: bool,
    pub cfg: &'static GenConfig,
}

impl Ctx {
    #[inline(always)]
    fn pass(&self, basis: u32, id: u32) -> Outcome {
        Outcome {
            action: ACTION_PASS,
            reason: 0,
            basis,
            id,
            audit: false,
            generation: self.generation,
        }
    }

    #[inline(always)]
    fn drop(&self, reason: DropReason, basis: u32, id: u32) -> Outcome {
        self.dropped(reason.code(), basis, id)
    }

    #[inline(always)]
    fn dropped(&self, reason: u32, basis: u32, id: u32) -> Outcome {
        let action = if self.audit { ACTION_PASS } else { ACTION_DROP };
        Outcome {
            action,
            reason,
            basis,
            id,
            audit: self.audit,
            generation: self.generation,
        }
    }

    /// The outcome of a decision under this generation's mode.
    #[inline(always)]
    fn decided(&self, d: Decision) -> Outcome {
        if d.reason == 0 {
            self.pass(d.basis, d.id)
        } else {
            self.dropped(d.reason, d.basis, d.id)
        }
    }
}

// A decision's drop reason is never 0, which means a pass.
const _: () = assert!(
    DropReason::NotAuthorized.code() != 0
        && DropReason::PortNotAuthorized.code() != 0
        && DropReason::ReservedRange.code() != 0
);

/// What rules 4-7 decided for a packet, before the mode applies: a pass (`reason` 0) or a drop.
#[derive(Clone, Copy)]
struct Decision {
    basis: u32,
    id: u32,
    reason: u32,
}

impl Decision {
    #[inline(always)]
    fn pass(basis: u32, id: u32) -> Self {
        Decision {
            basis,
            id,
            reason: 0,
        }
    }

    #[inline(always)]
    fn drop(reason: DropReason, basis: u32, id: u32) -> Self {
        Decision {
            basis,
            id,
            reason: reason.code(),
        }
    }
}

/// The active generation and its settings; None when no policy is applied.
#[inline(always)]
pub fn active() -> Option<Ctx> {
    let generation = *ACTIVE.get(0)?;
    if generation != GEN_A as u32 && generation != GEN_B as u32 {
        return None;
    }
    let cfg = GEN_CONFIG.get(generation)?;
    Some(Ctx {
        generation,
        audit: cfg.mode == MODE_AUDIT,
        cfg,
    })
}

/// Rule 2 (a header the parser could not verify): drop `malformed`, or pass audited.
#[inline(always)]
pub fn malformed() -> Outcome {
    match active() {
        Some(ctx) => ctx.drop(DropReason::Malformed, basis::MALFORMED, 0),
        None => Outcome {
            action: ACTION_DROP,
            reason: DropReason::Malformed.code(),
            basis: basis::MALFORMED,
            id: 0,
            audit: false,
            generation: 0,
        },
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("`dst_key` assembles little-endian words");

/// Assembles in `kb` the LPM key of the packet's destination in `generation`: the prefix length, the
/// generation byte, the address, zero padding (`Key<AddrV4>` is 12 bytes, `Key<AddrV6>` 24).
#[inline(always)]
fn dst_key(kb: &mut KeyBuf, generation: u8, pkt: &Packet) {
    // SAFETY: `dst` is 16 bytes at offset 16 of a `repr(C, align(8))` struct: 4-aligned words.
    let d = unsafe { core::ptr::read(pkt.dst.as_ptr() as *const [u32; 4]) };
    let g = u32::from(generation);
    let k = &mut kb.key;
    if pkt.l3 == L3::Ipv4 {
        k[0] = GEN_BITS + 32;
        k[1] = g | (d[0] << 8);
        k[2] = d[0] >> 24;
        // Not part of the IPv4 key; zero, so that the key as a whole is the packet's (`VerdictMemo`).
        k[3] = 0;
        k[4] = 0;
        k[5] = 0;
    } else {
        k[0] = GEN_BITS + 128;
        k[1] = g | (d[0] << 8);
        k[2] = (d[0] >> 24) | (d[1] << 8);
        k[3] = (d[1] >> 24) | (d[2] << 8);
        k[4] = (d[2] >> 24) | (d[3] << 8);
        k[5] = d[3] >> 24;
    }
}

/// Longest-prefix lookup of the key `dst_key` assembled, in a per-family pair of tries.
#[inline(always)]
fn lookup_dst<V>(
    v4: &'static LpmTrie<AddrV4, V>,
    v6: &'static LpmTrie<AddrV6, V>,
    kb: &KeyBuf,
    pkt: &Packet,
) -> Option<&'static V> {
    let p = kb.key.as_ptr();
    // SAFETY: `KeyBuf::key` is 24 bytes, 8-aligned; `Key<AddrV4>` (12 bytes) and `Key<AddrV6>` (24) are
    // packed, and `dst_key` wrote every byte of the one the packet's family uses.
    unsafe {
        if pkt.l3 == L3::Ipv4 {
            // `black_box` (no instruction) keeps LLVM from merging the two lookups into one call whose
            // map is either trie: the verifier then calls the generic helper, which reaches the trie's
            // lookup through an indirect call (a retpoline here), instead of calling it directly.
            core::hint::black_box(v4.get(&*(p as *const Key<AddrV4>)))
        } else {
            v6.get(&*(p as *const Key<AddrV6>))
        }
    }
}

#[inline(always)]
fn addr_entry(kb: &KeyBuf, pkt: &Packet) -> Option<&'static AddrValue> {
    lookup_dst(&ADDR_V4, &ADDR_V6, kb, pkt)
}

#[inline(always)]
fn reserved_index(kb: &KeyBuf, pkt: &Packet) -> Option<u32> {
    lookup_dst(&RESERVED_V4, &RESERVED_V6, kb, pkt).copied()
}

/// The rule an address entry's port table (protocol index `i`) gives `port`: from the entry's inline
/// intervals, or, for a table too large to hold inline, from `PORTS`.
#[inline(always)]
fn port_rule(generation: u8, e: &AddrValue, i: usize, proto: u8, port: u16) -> Option<u32> {
    let n = e.inline_len[i];
    if n == INLINE_IN_PORTS {
        let data = PortData {
            generation,
            table: e.port_table[i].to_be_bytes(),
            proto,
            port: port.to_be_bytes(),
        };
        return PORTS.get(Key::new(PORT_KEY_FIXED_BITS + 16, data)).copied();
    }
    for k in 0..INLINE_PORTS {
        let iv = &e.inline[i][k];
        if (k as u32) < n && iv.lo <= port && port <= iv.hi {
            return Some(iv.rule);
        }
    }
    None
}

/// 0 for TCP, 1 for UDP (the `AddrValue` arrays' index), None otherwise.
#[inline(always)]
fn proto_index(proto: u8) -> Option<usize> {
    match proto {
        IPPROTO_TCP => Some(0),
        IPPROTO_UDP => Some(1),
        _ => None,
    }
}

/// The verdict for a parsed packet leaving through the ENI (TC egress) or entering a forward interface.
#[inline(always)]
///
/// `local`: the packet was generated on this host (TC egress, not forwarded). Only such packets can be
/// host essentials, replies of flows peers opened toward the host's sockets, or ICMP errors the host's
/// stack sends: a forwarded packet's addresses and ports are whatever its sender chose.
///
/// `hook`: the enforcing hook whose scratch slot this run holds (`kb` is in it), whose decisions it reuses.
pub fn decide(hook: Hook, pkt: &Packet, local: bool, kb: &mut KeyBuf) -> Outcome {
    // 1. Not IPv4/IPv6 -> pass.
    if pkt.l3 == L3::NonIp {
        return Outcome {
            action: ACTION_PASS,
            reason: 0,
            basis: basis::NOT_IP,
            id: 0,
            audit: false,
            generation: 0,
        };
    }
    // No policy applied: fail closed.
    let Some(ctx) = active() else {
        return Outcome {
            action: ACTION_DROP,
            reason: DropReason::NoPolicy.code(),
            basis: basis::NO_POLICY,
            id: 0,
            audit: false,
            generation: 0,
        };
    };
    let generation = ctx.generation as u8;
    // 2. Source-routed: the real destination is not the one checked.
    if pkt.source_routed {
        return ctx.drop(DropReason::SourceRouted, basis::SOURCE_ROUTED, 0);
    }
    // 1. ICMPv6 neighbour discovery: link plumbing, only as RFC 4861 allows it; anything else of those
    // types is malformed.
    if let L4::Icmpv6 { kind, .. } = pkt.l4
        && (ICMPV6_ND_FIRST..=ICMPV6_ND_LAST).contains(&kind)
    {
        return if nd_allowed(pkt, ctx.cfg) {
            ctx.pass(basis::NEIGHBOUR_DISCOVERY, 0)
        } else {
            ctx.drop(DropReason::Malformed, basis::MALFORMED, 0)
        };
    }
    // 1. Host essentials (DHCP, DHCPv6, MLD) -> pass.
    let essential = if local {
        host_essential(pkt, ctx.cfg.host_essentials)
    } else {
        0
    };
    if essential != 0 {
        return ctx.pass(basis::HOST_ESSENTIAL, essential);
    }
    // 3. Reply in a flow that a peer initiated toward a gateway socket -> pass.
    if local && flows::is_reply(pkt, ctx.cfg) {
        return ctx.pass(basis::REPLY, 0);
    }
    dst_key(kb, generation, pkt);
    // 4.-7. for TCP and UDP (but a non-first fragment, which has no ports): a function of the
    // destination, the protocol and the port, memoized per hook and CPU (`VerdictMemo`).
    if pkt.fragment != Fragment::NonFirst
        && let L4::Tcp { dport, .. } | L4::Udp { dport, .. } = pkt.l4
    {
        return ctx.decided(memoized(hook, kb, pkt, generation, dport));
    }
    let entry = addr_entry(kb, pkt);
    if let Some(d) = reserved(entry, kb, pkt) {
        return ctx.decided(d);
    }
    let covering = covering(entry);
    let not_allowed = |covering: u32| ctx.decided(not_allowed(covering));
    // Fragments: a non-first fragment has no ports.
    if pkt.fragment == Fragment::NonFirst {
        if let (Some(e), Some(i)) = (entry, proto_index(pkt.proto)) {
            let rule = e.all_ports_rule[i];
            if rule != 0 {
                return ctx.pass(basis::RULE, rule);
            }
        }
        if flows::first_fragment_passed(pkt) {
            return ctx.pass(basis::FRAGMENT_OF_PASSED, 0);
        }
        return ctx.drop(
            DropReason::FragmentUnverified,
            basis::FRAGMENT_UNVERIFIED,
            0,
        );
    }
    match pkt.l4 {
        // ICMP errors pass only as answers to a packet this host received; echo requests pass toward
        // addresses rule 5 or 6 covers.
        L4::Icmp {
            kind: ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM,
            ..
        }
        | L4::Icmpv6 {
            kind:
                ICMPV6_DEST_UNREACH
                | ICMPV6_PACKET_TOO_BIG
                | ICMPV6_TIME_EXCEEDED
                | ICMPV6_PARAMETER_PROBLEM,
            ..
        } => {
            if local && pkt.quote_matches && pkt.fragment == Fragment::None {
                ctx.pass(basis::ICMP_ERROR, 0)
            } else {
                ctx.drop(DropReason::NotAuthorized, basis::ICMP_ERROR, 0)
            }
        }
        L4::Icmp {
            kind: ICMP_ECHO_REQUEST,
            ..
        }
        | L4::Icmpv6 {
            kind: ICMPV6_ECHO_REQUEST,
            ..
        } => {
            if covering != 0 {
                ctx.pass(basis::RULE, covering)
            } else {
                not_allowed(0)
            }
        }
        _ => not_allowed(covering),
    }
}

/// Rule 4: the destination lies in a reserved block -> drop reserved_range. The one walk of the address
/// entries decides this and rules 5-7: the reserved blocks are walked only when no address entry matches
/// or the one that does says a reserved block overlaps it (`ADDR_RESERVED_OVERLAP`).
#[inline(always)]
fn reserved(entry: Option<&AddrValue>, kb: &KeyBuf, pkt: &Packet) -> Option<Decision> {
    let possible = match entry {
        Some(e) => e.flags & ADDR_RESERVED_OVERLAP != 0,
        None => true,
    };
    if possible && let Some(index) = reserved_index(kb, pkt) {
        return Some(Decision::drop(
            DropReason::ReservedRange,
            basis::RESERVED,
            index,
        ));
    }
    None
}

/// The rule whose prefix covers the destination (for ICMP echo and `port_not_authorized`), 0 if none.
#[inline(always)]
fn covering(entry: Option<&AddrValue>) -> u32 {
    match entry {
        Some(e) => e.icmp_rule,
        None => 0,
    }
}

/// Rule 7: covered by some rule but not this port/protocol, or by none.
#[inline(always)]
fn not_allowed(covering: u32) -> Decision {
    if covering != 0 {
        Decision::drop(DropReason::PortNotAuthorized, basis::COVERED, covering)
    } else {
        Decision::drop(DropReason::NotAuthorized, basis::NO_RULE, 0)
    }
}

/// Rules 4-7 for a TCP or UDP packet toward `dport` (not a non-first fragment), whose destination key
/// `dst_key` assembled: the hook's last decision (in its scratch slot) or the one its `VERDICT_CACHE`
/// slot holds on this CPU, when either is for this key and port in the current policy epoch; otherwise
/// looked up and memoized in both.
///
/// The epoch is read before the lookups: a decision is memoized under the epoch that was current before
/// any map it read, so the new epochs the agent fences a change with end it (`POLICY_EPOCH`). An epoch
/// of 0 (none written yet) memoizes nothing.
///
/// The cache slot is this CPU's copy, in `hook`'s region: only a run holding `hook`'s scratch slot on
/// this CPU (this one) reads or writes it, so a record is never read half-written. A record another key
/// left in the slot fails the key comparison, as a record of an earlier epoch fails the epoch's.
#[inline(always)]
fn memoized(hook: Hook, kb: &mut KeyBuf, pkt: &Packet, generation: u8, dport: u16) -> Decision {
    let port = (u32::from(pkt.proto) << 16) | u32::from(dport);
    let epoch = match POLICY_EPOCH.get(0) {
        // SAFETY: a map value, 8-byte aligned. One 8-byte load (volatile: never split or repeated); the
        // agent writes the value in place with one 8-byte store (the map is mmapable), so a read racing
        // it sees the old epoch or the new one, never a mix that might equal an earlier epoch's records.
        Some(e) => unsafe { core::ptr::read_volatile(e) },
        None => 0,
    };
    if epoch == 0 {
        return by_port(kb, pkt, generation, dport);
    }
    if holds(&kb.memo, epoch, &kb.key, port) {
        return recalled(&kb.memo);
    }
    // SAFETY: a read-only global the loader sets; volatile so that the compiled-in zero is not folded.
    let bits = unsafe { core::ptr::read_volatile(&raw const VERDICT_CACHE_BITS) };
    let cached = match verdict_cache_region(hook) {
        Some(r)
            if (limits::VERDICT_CACHE_MIN_BITS..=limits::VERDICT_CACHE_MAX_BITS)
                .contains(&bits) =>
        {
            let i = verdict_cache_index(r, bits, &kb.key, port);
            VERDICT_CACHE
                .get_ptr_mut(i / limits::VERDICT_CACHE_BLOCK)
                // SAFETY: a record within the element (`i % VERDICT_CACHE_BLOCK` of its records).
                .map(|b| unsafe {
                    (b as *mut VerdictMemo).add((i % limits::VERDICT_CACHE_BLOCK) as usize)
                })
        }
        _ => None,
    };
    if let Some(c) = cached {
        // SAFETY: this CPU's element of the hook's region, which only this run uses (see above).
        let c = unsafe { &*c };
        if holds(c, epoch, &kb.key, port) {
            kb.memo = *c;
            return recalled(c);
        }
    }
    let d = by_port(kb, pkt, generation, dport);
    kb.memo = VerdictMemo {
        epoch,
        key: kb.key,
        port,
        basis: d.basis,
        id: d.id,
        reason: d.reason,
    };
    if let Some(c) = cached {
        // SAFETY: as above.
        unsafe { *c = kb.memo };
    }
    d
}

/// Whether `m` is the decision for `key` and `port` in `epoch`.
#[inline(always)]
fn holds(m: &VerdictMemo, epoch: u64, key: &[u32; 6], port: u32) -> bool {
    (m.epoch ^ epoch) | u64::from(words_diff(&m.key, key) | (m.port ^ port)) == 0
}

#[inline(always)]
fn recalled(m: &VerdictMemo) -> Decision {
    Decision {
        basis: m.basis,
        id: m.id,
        reason: m.reason,
    }
}

/// Rules 4-7 for a TCP or UDP packet toward `dport`, looked up.
#[inline(always)]
fn by_port(kb: &KeyBuf, pkt: &Packet, generation: u8, dport: u16) -> Decision {
    let entry = addr_entry(kb, pkt);
    if let Some(d) = reserved(entry, kb, pkt) {
        return d;
    }
    // 5./6. (destination, protocol, port) matches a rule -> pass, attributed to it.
    let i = if pkt.proto == IPPROTO_TCP { 0 } else { 1 };
    let rule = match entry {
        Some(e) => port_rule(generation, e, i, pkt.proto, dport),
        None => None,
    };
    match rule {
        Some(rule) => Decision::pass(basis::RULE, rule),
        None => not_allowed(covering(entry)),
    }
}

/// Big-endian halves of an IPv6 address.
#[inline(always)]
fn halves(a: &[u8; 16]) -> (u64, u64) {
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(&a[..8]);
    lo.copy_from_slice(&a[8..]);
    (u64::from_be_bytes(hi), u64::from_be_bytes(lo))
}

/// Whether `addr` lies in the prefix `net`/`len` (len 1..=128; 0 means "no prefix").
#[inline(always)]
fn in_prefix6(addr: &[u8; 16], net: &[u8; 16], len: u32) -> bool {
    if len == 0 || len > 128 {
        return false;
    }
    let (ah, al) = halves(addr);
    let (nh, nl) = halves(net);
    if len <= 64 {
        let mask = u64::MAX << (64 - len);
        (ah ^ nh) & mask == 0
    } else {
        let mask = if len == 128 {
            u64::MAX
        } else {
            u64::MAX << (128 - len)
        };
        ah == nh && (al ^ nl) & mask == 0
    }
}

/// Rule 1: neighbour discovery as RFC 4861 sends it: unfragmented, hop limit 255, toward a link-scope
/// address (fe80::/10, ff02::/16) or an on-link prefix (the vSwitch block, or the ENI's own prefixes).
#[inline(always)]
fn nd_allowed(pkt: &Packet, cfg: &GenConfig) -> bool {
    let d = &pkt.dst;
    if pkt.fragment != Fragment::None || pkt.hop_limit != 255 {
        return false;
    }
    (d[0] == 0xfe && d[1] & 0xc0 == 0x80)
        || (d[0] == 0xff && d[1] == 0x02)
        || in_prefix6(d, &cfg.onlink6, cfg.onlink6_len)
        || ONLINK6.get(Key::new(128, Prefix6 { addr: *d })).is_some()
}

/// ff02::16, all MLDv2-capable routers.
const MLDV2_ROUTERS: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x16];
/// ff02::1:2, all DHCP relay agents and servers.
const DHCPV6_SERVERS: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2];

/// Whether an IPv4 destination lies in one of the ENI's on-link prefixes (kept as IPv4-mapped keys).
#[inline(always)]
fn on_link4(d: &[u8; 16]) -> bool {
    let mut mapped = [0u8; 16];
    mapped[10] = 0xff;
    mapped[11] = 0xff;
    mapped[12] = d[0];
    mapped[13] = d[1];
    mapped[14] = d[2];
    mapped[15] = d[3];
    ONLINK6
        .get(Key::new(128, Prefix6 { addr: mapped }))
        .is_some()
}

/// Rule 1: which host essential the packet is (`essential::*`), 0 for none or when it is turned off.
#[inline(always)]
fn host_essential(pkt: &Packet, on: u32) -> u32 {
    if on == 0 || pkt.fragment != Fragment::None {
        return 0;
    }
    let d = &pkt.dst;
    match pkt.l4 {
        // DHCPv4 goes to the broadcast address or, renewing, to the server on the link.
        L4::Udp {
            sport: 68,
            dport: 67,
        } if on & ESSENTIAL_DHCP != 0
            && pkt.l3 == L3::Ipv4
            && ((d[0] & d[1] & d[2] & d[3]) == 0xff || on_link4(d)) =>
        {
            essential::DHCPV4
        }
        // DHCPv6 clients send to ff02::1:2 (RFC 8415).
        L4::Udp {
            sport: 546,
            dport: 547,
        } if on & ESSENTIAL_DHCP != 0
            && pkt.l3 == L3::Ipv6
            && halves(d) == halves(&DHCPV6_SERVERS) =>
        {
            essential::DHCPV6
        }
        L4::Icmpv6 {
            kind: ICMPV6_MLD2_REPORT,
            ..
        } if on & ESSENTIAL_MLD != 0
            && pkt.hop_limit == 1
            && halves(&pkt.dst) == halves(&MLDV2_ROUTERS) =>
        {
            essential::MLD
        }
        _ => 0,
    }
}
