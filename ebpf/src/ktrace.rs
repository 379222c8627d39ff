//! The kernel's own drops (`skb:kfree_skb`), for `vpcgate drops --kernel` and `vpcgate probe`: a packet
//! from or to one of the gateway's addresses that the host dropped (no route, neighbour failure,
//! netfilter, qdisc, ...) becomes an event, with the kernel's reason code, and is credited to the probe
//! connection it belongs to. Attached only while such a command runs; `KTRACE` says where the fields
//! are on the running kernel (the agent reads tracefs and BTF), so nothing here assumes a layout.

use aya_ebpf::{helpers::bpf_probe_read_kernel, programs::TracePointContext};
use vpcgate_common::datapath::{KernelDrop, LocalAddr, Tuple};

use crate::{
    events::{Stamped, send},
    maps::{KERNEL_BUDGET, KERNEL_EVENTS, KTRACE, KTRACE_SEEN, LOCAL_ADDRS},
    parse::{IPPROTO_TCP, IPPROTO_UDP},
    probe,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// Reads a `T` at a kernel address (None when the address is not readable).
#[inline(always)]
fn read<T>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address; a fault returns an error, never a crash.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

#[inline(always)]
fn local(family: u8, addr: &[u8; 16]) -> bool {
    // Loopback is the host talking to itself, not the gateway's traffic.
    if (family == 4 && addr[0] == 127) || (family == 6 && *addr == LOOPBACK6) {
        return false;
    }
    let k = LocalAddr {
        family,
        _pad: [0; 3],
        addr: *addr,
    };
    // SAFETY: the value is only tested for presence.
    unsafe { LOCAL_ADDRS.get(k) }.is_some()
}

const LOOPBACK6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

pub fn kfree_skb(ctx: &TracePointContext) -> Option<()> {
    let cfg = *KTRACE.get(0)?;
    if cfg.skbaddr_off == 0 {
        return None;
    }
    // SAFETY: offsets within the tracepoint's record, read with bpf_probe_read_kernel.
    let (skb, protocol, reason, location) = unsafe {
        (
            ctx.read_at::<u64>(cfg.skbaddr_off as usize).ok()?,
            ctx.read_at::<u16>(cfg.protocol_off as usize).ok()?,
            ctx.read_at::<u32>(cfg.reason_off as usize).ok()?,
            ctx.read_at::<u64>(cfg.location_off as usize).ok()?,
        )
    };
    // The same drop seen by a second attachment of this program (see `KTRACE_SEEN`).
    let seen = KTRACE_SEEN.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; tracepoint programs of one event run one after the other on a CPU.
    // Within a millisecond: a later drop of a recycled skb at the same place is a new drop.
    unsafe {
        let now = aya_ebpf::helpers::bpf_ktime_get_ns();
        if (*seen)[0] == skb && (*seen)[1] == location && now.saturating_sub((*seen)[2]) < 1_000_000
        {
            return None;
        }
        *seen = [skb, location, now];
    }
    let family = match protocol {
        ETH_P_IP => 4u8,
        ETH_P_IPV6 => 6u8,
        _ => return None,
    };
    let head: u64 = read(skb + u64::from(cfg.skb_head_off))?;
    let nh: u16 = read(skb + u64::from(cfg.skb_network_header_off))?;
    if head == 0 || nh == u16::MAX {
        return None;
    }
    // Only the gateway's network namespace (the tracepoint fires for every namespace of the host).
    let dev: u64 = read(skb + u64::from(cfg.skb_dev_off)).unwrap_or(0);
    let net: u64 = if dev != 0 {
        read(dev + u64::from(cfg.dev_net_off))?
    } else {
        let sk: u64 = read(skb + u64::from(cfg.skb_sk_off))?;
        if sk == 0 {
            return None;
        }
        read(sk + u64::from(cfg.sk_net_off))?
    };
    let inum: u32 = read(net + u64::from(cfg.net_inum_off))?;
    if net == 0 || inum != cfg.netns_inum {
        return None;
    }
    // Loopback (ifindex 1 in every namespace) is the host talking to itself: route lookups' dummy
    // packets, ICMP errors it reports to its own sockets.
    let ifindex: u32 = if dev != 0 {
        read(dev + u64::from(cfg.dev_ifindex_off)).unwrap_or(0)
    } else {
        0
    };
    if ifindex == 1 {
        return None;
    }
    let ip = head + u64::from(nh);
    let mut e = KernelDrop {
        timestamp_ns: 0,
        reason,
        ifindex,
        location,
        tuple: Tuple {
            family,
            ..Tuple::default()
        },
    };
    let t = &mut e.tuple;
    let l4 = if family == 4 {
        let h: [u8; 20] = read(ip)?;
        if h[0] >> 4 != 4 {
            return None;
        }
        t.proto = h[9];
        t.src[..4].copy_from_slice(&h[12..16]);
        t.dst[..4].copy_from_slice(&h[16..20]);
        // A non-first fragment has no ports.
        if (u16::from(h[6] & 0x1f) << 8 | u16::from(h[7])) != 0 {
            0
        } else {
            ip + u64::from(h[0] & 0x0f) * 4
        }
    } else {
        let h: [u8; 40] = read(ip)?;
        if h[0] >> 4 != 6 {
            return None;
        }
        // Ports only when the transport header follows at once (no extension headers walked here).
        t.proto = h[6];
        t.src.copy_from_slice(&h[8..24]);
        t.dst.copy_from_slice(&h[24..40]);
        ip + 40
    };
    let from_local = local(family, &t.src);
    if !from_local && !local(family, &t.dst) {
        return None;
    }
    if l4 != 0
        && (t.proto == IPPROTO_TCP || t.proto == IPPROTO_UDP)
        && let Some(ports) = read::<[u8; 4]>(l4)
    {
        t.sport = [ports[0], ports[1]];
        t.dport = [ports[2], ports[3]];
    }
    // A probe is credited only with drops of what it sent, for a reason that names one (a driver
    // freeing a sent packet says NOT_SPECIFIED; an inbound segment on its 4-tuple is anyone's).
    if t.proto == IPPROTO_TCP
        && from_local
        && reason != cfg.probe_ignore[0]
        && reason != cfg.probe_ignore[1]
    {
        let (sport, dport) = (u16::from_be_bytes(t.sport), u16::from_be_bytes(t.dport));
        probe::kernel_drop(&probe::key(family, &t.src, &t.dst, sport, dport), reason);
    }
    emit(&mut e, if from_local { 0 } else { 1 });
    Some(())
}

#[inline(never)]
fn emit(e: &mut KernelDrop, bucket: u32) {
    send(&KERNEL_EVENTS, &KERNEL_BUDGET, bucket, e);
}

impl Stamped for KernelDrop {
    #[inline(always)]
    fn stamp(&mut self, now_ns: u64) {
        self.timestamp_ns = now_ns;
    }
}
