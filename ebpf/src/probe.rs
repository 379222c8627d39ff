//! Probe connections (DESIGN.md "Probe flows"): `vpcgate probe` registers its connection's 5-tuple in
//! `PROBES`; TC egress records the SYN (sequence number, verdict), the ENI's ingress what answers
//! exactly that SYN. A bare SYN of this host's is looked up (one lookup per new connection, none per
//! packet of a connection); no socket mark is needed, so none can clash with a CNI's or policy routing's. Entries are only ever updated in place here: a packet cannot
//! create one, so no traffic but a probe's can fill or churn the map.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use vpcgate_common::datapath::{ACTION_PASS, FlowKey};

use crate::{
    maps::PROBES,
    parse::{IPPROTO_TCP, L3, L4, Packet, Quote, TCP_ACK, TCP_SYN},
    verdict::Outcome,
};

const ANSWER_SYN_ACK: u32 = 1;
const ANSWER_RST: u32 = 2;
const ANSWER_ICMP: u32 = 3;

#[inline(always)]
pub fn key(
    family: u8,
    local: &[u8; 16],
    remote: &[u8; 16],
    local_port: u16,
    remote_port: u16,
) -> FlowKey {
    FlowKey {
        family,
        proto: IPPROTO_TCP,
        local_port: local_port.to_be_bytes(),
        remote_port: remote_port.to_be_bytes(),
        _pad: [0; 2],
        local: *local,
        remote: *remote,
    }
}

/// TC egress, a packet of this host: a bare SYN of a registered probe connection is recorded with its
/// verdict.
#[inline(always)]
pub fn egress(pkt: &Packet, o: &Outcome) {
    if let L4::Tcp {
        sport,
        dport,
        flags,
        seq,
        ..
    } = pkt.l4
        && flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    {
        let family = if pkt.l3 == L3::Ipv4 { 4 } else { 6 };
        let k = key(family, &pkt.src, &pkt.dst, sport, dport);
        let verdict = if o.action == ACTION_PASS {
            if o.audit { VERDICT_AUDIT } else { VERDICT_PASS }
        } else {
            VERDICT_DROP
        };
        record_syn(&k, seq, verdict, o.reason);
    }
}

const VERDICT_PASS: u32 = 0;
const VERDICT_DROP: u32 = 1;
const VERDICT_AUDIT: u32 = 2;

/// A separate BPF function taking plain values (see `account::record_destination`).
#[inline(never)]
fn record_syn(k: &FlowKey, seq: u32, verdict: u32, reason: u32) {
    let Some(p) = PROBES.get_ptr_mut(k) else {
        return;
    };
    // SAFETY: a live map value; only this probe's packets touch it.
    unsafe {
        // The first SYN's sequence number is the connection's (retransmissions repeat it); a later
        // SYN on the same 5-tuple (a raw socket's) cannot move what answers must match.
        if (*p).first_syn_ns == 0 {
            (*p).first_syn_ns = bpf_ktime_get_ns();
            (*p).syn_seq = seq;
        }
        match verdict {
            VERDICT_DROP => {
                (*p).dropped += 1;
                (*p).drop_reason = reason;
            }
            VERDICT_AUDIT => {
                (*p).syns += 1;
                (*p).audited += 1;
                (*p).audit_reason = reason;
            }
            _ => (*p).syns += 1,
        }
    }
}

/// The ENI's ingress: a SYN-ACK or RST (with ACK) toward the gateway. It answers a probe's SYN only when
/// it acknowledges exactly that SYN (ack = its sequence number + 1).
#[inline(always)]
pub fn tcp_answer(
    family: u8,
    pkt: &Packet,
    local_port: u16,
    remote_port: u16,
    ack: u32,
    rst: bool,
) {
    let k = key(family, &pkt.dst, &pkt.src, local_port, remote_port);
    let kind = if rst { ANSWER_RST } else { ANSWER_SYN_ACK };
    record_answer(&k, ack.wrapping_sub(1), kind, 0);
}

/// The ENI's ingress: an ICMP error quoting a TCP segment the gateway sent. It answers a probe's SYN
/// only when the quote is that SYN (its 5-tuple and sequence number).
#[inline(always)]
pub fn icmp_error(family: u8, q: &Quote, icmp_type: u8, icmp_code: u8) {
    let k = key(family, &q.src, &q.dst, q.sport, q.dport);
    let type_code = u32::from(icmp_type) | (u32::from(icmp_code) << 8);
    record_answer(&k, q.seq, ANSWER_ICMP, type_code);
}

/// A separate BPF function taking plain values. `seq`: the SYN sequence number the answer refers to.
#[inline(never)]
fn record_answer(k: &FlowKey, seq: u32, kind: u32, type_code: u32) {
    let Some(p) = PROBES.get_ptr_mut(k) else {
        return;
    };
    // SAFETY: a live map value; only answers to this probe's SYN are written.
    unsafe {
        if (*p).syns == 0 || (*p).syn_seq != seq {
            return;
        }
        (*p).answer_ns = bpf_ktime_get_ns();
        match kind {
            ANSWER_SYN_ACK => (*p).syn_ack += 1,
            ANSWER_RST => (*p).rst += 1,
            _ => {
                (*p).icmp += 1;
                (*p).icmp_type = type_code as u8;
                (*p).icmp_code = (type_code >> 8) as u8;
            }
        }
    }
}

/// The `skb:kfree_skb` tracepoint: the kernel dropped a packet of a registered probe connection.
#[inline(never)]
pub fn kernel_drop(k: &FlowKey, reason: u32) {
    let Some(p) = PROBES.get_ptr_mut(k) else {
        return;
    };
    // SAFETY: a live map value.
    unsafe {
        (*p).kernel_drops += 1;
        (*p).kernel_reason = reason;
    }
}
