//! Runs crafted frames through the kernel programs (BPF_PROG_TEST_RUN) and through the reference verdict
//! with the same flow state, and compares action, reason and attribution.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use aya::programs::{TestRun, TestRunOptions, TestRunResult};
use vpcgate::{
    datapath::{Datapath, FlowMap, kernel_now_ns},
    policy::{
        Policy,
        compile::Compiled,
        verdict::{Action, Basis, FlowFacts, Fragment, L4, Packet, Verdict, verdict},
    },
};
use vpcgate_common::datapath::{
    ACTION_DROP, ACTION_PASS, FLOW_CLOSING, FlowKey, FlowValue, LastVerdict, basis,
};

use crate::packet::{Described, Frame};

/// Which enforcing program runs the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcer {
    TcEgress,
    XdpForward,
}

pub const TC_PASS: u32 = u32::MAX; // TC_ACT_UNSPEC (-1)
pub const TC_SHOT: u32 = 2;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// A datagram whose first fragment passed, as the kernel's reassembly identifies it: (IPv4?, protocol
/// (IPv4 only; 0 for IPv6), identification, source, destination).
type DatagramId = (bool, u8, u32, IpAddr, IpAddr);

/// A recorded flow in the model of the kernel's flow maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FlowState {
    live: bool,
    closing: bool,
    /// Half-open: the acknowledgment that establishes it (the gateway's SYN-ACK passed).
    expect_ack: Option<u32>,
}

/// The harness's model of the kernel's flow state (DESIGN.md rule 3), keyed as the gateway's outbound
/// packets see flows (local = the gateway).
#[derive(Default)]
struct FlowModel {
    established: HashMap<FlowKey, FlowState>,
    half_open: HashMap<FlowKey, FlowState>,
    dgram: HashMap<FlowKey, FlowState>,
}

/// How often the modelled flow state changed kind (so a test can tell it exercised each).
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowEvents {
    /// Half-open flows the peer's ACK of the gateway's SYN-ACK established.
    pub established: u64,
    /// ACKs toward a half-open flow that did not acknowledge the SYN-ACK (ignored).
    pub wrong_acks: u64,
    /// Inbound packets toward the gateway that recorded nothing (no socket, not the gateway's address).
    pub refused: u64,
}

/// What the gateway side of the model owns: its addresses and the ports its sockets listen on.
#[derive(Default)]
pub struct LocalHost {
    pub addrs: HashSet<IpAddr>,
    /// The ENI's on-link prefixes.
    pub onlink: Vec<ipnet::IpNet>,
    pub tcp_ports: HashSet<u16>,
    pub udp_ports: HashSet<u16>,
    /// The sockets themselves (kept open).
    _sockets: Vec<Box<dyn std::any::Any>>,
}

pub struct Harness {
    pub dp: Datapath,
    pub compiled: Option<Compiled>,
    flows: FlowModel,
    first_fragments: HashSet<DatagramId>,
    pub local: LocalHost,
    pub flow_events: FlowEvents,
}

/// The kernel's verdict in the reference's terms.
pub fn kernel_view(l: &LastVerdict) -> (u32, u32, u32, u32, u32) {
    (l.action, l.reason, l.basis, l.id, l.audit)
}

/// The reference verdict in the kernel's terms.
pub fn reference_view(v: &Verdict) -> (u32, u32, u32, u32, u32) {
    let (b, id) = match v.basis {
        Basis::NotIp => (basis::NOT_IP, 0),
        Basis::NeighbourDiscovery => (basis::NEIGHBOUR_DISCOVERY, 0),
        Basis::HostEssential(e) => (basis::HOST_ESSENTIAL, e.id()),
        Basis::Malformed => (basis::MALFORMED, 0),
        Basis::SourceRouted => (basis::SOURCE_ROUTED, 0),
        Basis::Reply => (basis::REPLY, 0),
        Basis::Reserved(i) => (basis::RESERVED, i as u32),
        Basis::Rule(id) => (basis::RULE, id),
        Basis::IcmpError => (basis::ICMP_ERROR, 0),
        Basis::FragmentOfPassedDatagram => (basis::FRAGMENT_OF_PASSED, 0),
        Basis::FragmentUnverified => (basis::FRAGMENT_UNVERIFIED, 0),
        Basis::Covered(id) => (basis::COVERED, id),
        Basis::NoRule => (basis::NO_RULE, 0),
    };
    let action = match v.action {
        Action::Pass => ACTION_PASS,
        Action::Drop => ACTION_DROP,
    };
    (
        action,
        v.reason.map_or(0, |r| r.code()),
        b,
        id,
        u32::from(v.audit),
    )
}

fn ip_bytes(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    }
}

/// The flow an inbound packet (peer -> gateway) opens or belongs to, keyed from the gateway's side, and
/// which kind of packet it is.
fn inbound_flow_key(d: &Described) -> Option<(FlowKey, Inbound)> {
    let Packet::Ip(ip) = d.packet else {
        return None;
    };
    if ip.fragment == Fragment::NonFirst {
        return None;
    }
    let (proto, local_port, remote_port, kind) = match (ip.l4, d.src_port, d.echo_id) {
        (L4::Tcp { dport }, Some(sport), _) => (6, dport, sport, Inbound::Tcp(ip.tcp_flags)),
        (L4::Udp { dport }, Some(sport), _) => (17, dport, sport, Inbound::Udp),
        (L4::Icmp { kind: 8, .. }, _, Some(id)) => (1, id, id, Inbound::Echo),
        (L4::Icmpv6 { kind: 128, .. }, _, Some(id)) => (58, id, id, Inbound::Echo),
        _ => return None,
    };
    Some((
        FlowKey {
            family: if ip.dst.is_ipv4() { 4 } else { 6 },
            proto,
            local_port: local_port.to_be_bytes(),
            remote_port: remote_port.to_be_bytes(),
            _pad: [0; 2],
            local: ip_bytes(ip.dst),
            remote: ip_bytes(ip.src),
        },
        kind,
    ))
}

#[derive(Clone, Copy)]
enum Inbound {
    Tcp(u8),
    Udp,
    Echo,
}

fn outbound_flow_key(d: &Described) -> Option<FlowKey> {
    let Packet::Ip(ip) = d.packet else {
        return None;
    };
    let (proto, local_port, remote_port) = match (ip.l4, d.src_port, d.echo_id) {
        (L4::Tcp { dport }, Some(sport), _) => (6, sport, dport),
        (L4::Udp { dport }, Some(sport), _) => (17, sport, dport),
        (L4::Icmp { kind: 0, .. }, _, Some(id)) => (1, id, id),
        (L4::Icmpv6 { kind: 129, .. }, _, Some(id)) => (58, id, id),
        _ => return None,
    };
    let bytes = ip_bytes;
    Some(FlowKey {
        family: if ip.dst.is_ipv4() { 4 } else { 6 },
        proto,
        local_port: local_port.to_be_bytes(),
        remote_port: remote_port.to_be_bytes(),
        _pad: [0; 2],
        local: bytes(ip.src),
        remote: bytes(ip.dst),
    })
}

/// One BPF_PROG_TEST_RUN of `prog` on `bytes`: its return value (panics if the kernel refuses the run).
pub fn run_prog<P>(prog: &P, bytes: &[u8]) -> u32
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let opts = TestRunOptions {
        data_in: Some(bytes),
        ..TestRunOptions::new()
    };
    prog.test_run(opts)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e:?}"))
        .return_value
}

/// The calling thread kept on the CPU it runs on until dropped, then given back the CPUs it had: the
/// programs memoize decisions per CPU (`VerdictMemo`, `VERDICT_CACHE`), and a thread that moved between
/// runs would find none of the ones it made.
pub struct StayOnCpu {
    /// The CPU the thread stays on.
    pub cpu: usize,
    previous: libc::cpu_set_t,
}

impl StayOnCpu {
    pub fn here() -> std::io::Result<Self> {
        let size = size_of::<libc::cpu_set_t>();
        // SAFETY: plain syscalls on this thread's own affinity, with zeroed sets of their own size.
        unsafe {
            let mut previous: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, size, &mut previous) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let cpu = libc::sched_getcpu();
            if cpu < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu as usize, &mut one);
            if libc::sched_setaffinity(0, size, &one) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(Self {
                cpu: cpu as usize,
                previous,
            })
        }
    }
}

impl Drop for StayOnCpu {
    fn drop(&mut self) {
        // SAFETY: as in `here`, with the set it read.
        let rc =
            unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &self.previous) };
        assert_eq!(
            rc,
            0,
            "sched_setaffinity back to this thread's CPUs: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Harness {
    /// Loads the programs and turns on the verdict-recording test hook.
    pub fn new() -> Self {
        Self::with(Datapath::load().unwrap_or_else(|e| panic!("{e}")))
    }

    /// `new`, with `slots` rule counters per CPU in the counter array (the rest counted in the overflow
    /// hash).
    pub fn with_counter_slots(slots: u32) -> Self {
        Self::with(Datapath::load_with_counter_slots(slots).unwrap_or_else(|e| panic!("{e}")))
    }

    /// `new`, with `1 << bits` decisions per hook and CPU in the verdict cache.
    pub fn with_cache_bits(bits: u32) -> Self {
        Self::with(Datapath::load_with_cache_bits(bits).unwrap_or_else(|e| panic!("{e}")))
    }

    fn with(mut dp: Datapath) -> Self {
        dp.set_record_last(true).expect("set record-last flag");
        Self {
            dp,
            compiled: None,
            flows: FlowModel::default(),
            first_fragments: HashSet::new(),
            local: LocalHost::default(),
            flow_events: FlowEvents::default(),
        }
    }

    /// Moves this thread into a network namespace of its own (BPF_PROG_TEST_RUN's socket lookups then
    /// see only the sockets opened here), and makes `addrs` the gateway's addresses with a TCP listener
    /// on `tcp_port` and a UDP socket on `udp_port` (wildcard, both families). The namespace has no
    /// interfaces up and sends nothing: the sockets only answer the kernel's lookups.
    pub fn isolate_with_sockets(&mut self, addrs: &[IpAddr], tcp_port: u16, udp_port: u16) {
        // SAFETY: unshare affects only this thread's network namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        // Dual-stack sockets (IPV6_V6ONLY off, Linux's default): the kernel's IPv4 lookups find them too.
        self.local._sockets.push(Box::new(
            std::net::TcpListener::bind(("::", tcp_port)).expect("tcp listener"),
        ));
        self.local._sockets.push(Box::new(
            std::net::UdpSocket::bind(("::", udp_port)).expect("udp socket"),
        ));
        self.local.addrs = addrs.iter().copied().collect();
        self.local.tcp_ports = HashSet::from([tcp_port]);
        self.local.udp_ports = HashSet::from([udp_port]);
        self.dp
            .set_local_addresses(addrs)
            .expect("set local addresses");
    }

    /// Makes `prefixes` the ENI's on-link prefixes (kernel and reference).
    pub fn set_onlink_prefixes(&mut self, prefixes: &[ipnet::IpNet]) {
        self.dp
            .set_onlink_prefixes(prefixes)
            .expect("set on-link prefixes");
        self.local.onlink = prefixes.to_vec();
    }

    /// Applies `policy` and forgets all flow state (kernel and reference).
    pub fn apply(&mut self, policy: &Policy) -> vpcgate::datapath::ApplyReport {
        let c = Compiled::new(policy);
        let report = self.dp.apply(&c).unwrap_or_else(|e| panic!("apply: {e}"));
        self.dp.clear_flow_state().expect("clear flow state");
        self.flows = FlowModel::default();
        self.first_fragments.clear();
        self.compiled = Some(c);
        report
    }

    /// Records a flow a peer initiated, whose outbound replies look like `reply` (kernel and model):
    /// established TCP (or half-open with `half_open`), UDP or ICMP echo; `live` false: idle for longer
    /// than any timeout (expired).
    pub fn add_reply_flow(
        &mut self,
        reply: &Frame,
        half_open: bool,
        live: bool,
        closing: bool,
    ) -> bool {
        let d = reply.describe();
        let Some(key) = outbound_flow_key(&d) else {
            return false;
        };
        let c = self.compiled.as_ref().expect("a policy is applied");
        let t = c.flow_timeouts;
        let idle = u64::from(t.tcp.max(t.tcp_closing).max(t.udp)) + 10;
        let now = kernel_now_ns();
        let idle_ns = idle * 1_000_000_000;
        // Only an expired flow needs a clock older than the longest timeout: a live one is stamped now.
        assert!(
            live || now > idle_ns,
            "the kernel clock ({now} ns since boot) is younger than a flow timeout ({idle} s): an expired flow cannot be written; use shorter flow_timeouts in the test policy"
        );
        let last_seen_ns = if live { now } else { now - idle_ns };
        let (map, model) = match key.proto {
            6 if half_open => (FlowMap::HalfOpen, &mut self.flows.half_open),
            6 => (FlowMap::Established, &mut self.flows.established),
            17 => (FlowMap::Datagram, &mut self.flows.dgram),
            _ => (FlowMap::Echo, &mut self.flows.dgram),
        };
        let closing = closing && map == FlowMap::Established;
        self.dp
            .insert_flow(
                map,
                &key,
                FlowValue {
                    last_seen_ns,
                    state: if closing { FLOW_CLOSING } else { 0 },
                    expect_ack: 0,
                },
            )
            .expect("insert flow");
        model.insert(
            key,
            FlowState {
                live,
                closing,
                expect_ack: None,
            },
        );
        true
    }

    /// Runs an inbound frame (peer -> gateway) through the ENI's XDP ingress and updates the model of
    /// the flow state the way DESIGN.md rule 3 says the kernel must: flows only toward the gateway's
    /// addresses and sockets, TCP half-open until acknowledged, expired entries never revived.
    pub fn inbound(&mut self, frame: &Frame) {
        let rv = run_prog(self.dp.xdp_ingress().expect("xdp ingress"), &frame.bytes);
        assert_eq!(
            rv, XDP_PASS,
            "{}: the ENI's XDP ingress must never drop",
            frame.name
        );
        let d = frame.describe();
        let Some((key, kind)) = inbound_flow_key(&d) else {
            return;
        };
        let Packet::Ip(ip) = d.packet else {
            return;
        };
        let local = self.local.addrs.contains(&ip.dst);
        let port = u16::from_be_bytes(key.local_port);
        let f = &mut self.flows;
        let live = FlowState {
            live: true,
            closing: false,
            expect_ack: None,
        };
        let ack = frame.tcp_seq_ack().map_or(0, |(_, ack)| ack);
        match kind {
            Inbound::Tcp(flags) => {
                let syn = flags & 0x12 == 0x02;
                let closing = flags & 0x05 != 0;
                if let Some(e) = f.established.get_mut(&key) {
                    if e.live && !(syn && e.closing) {
                        e.closing |= closing;
                        return;
                    }
                    f.established.remove(&key);
                }
                if syn {
                    if local && self.local.tcp_ports.contains(&port) {
                        f.half_open.insert(key, live);
                    } else {
                        self.flow_events.refused += 1;
                    }
                    return;
                }
                // A half-open flow: a RST (or its expiry) ends it; only the ACK of the gateway's SYN-ACK
                // establishes it; anything else changes nothing.
                if let Some(h) = f.half_open.get(&key).copied() {
                    if !h.live || flags & 0x04 != 0 {
                        f.half_open.remove(&key);
                    } else if flags & 0x10 != 0 && h.expect_ack == Some(ack) {
                        self.flow_events.established += 1;
                        f.half_open.remove(&key);
                        f.established.insert(
                            key,
                            FlowState {
                                live: true,
                                closing: flags & 0x01 != 0,
                                expect_ack: None,
                            },
                        );
                    } else if flags & 0x10 != 0 {
                        self.flow_events.wrong_acks += 1;
                    }
                }
            }
            Inbound::Udp | Inbound::Echo => {
                if let Some(e) = f.dgram.get(&key) {
                    if e.live {
                        return;
                    }
                    f.dgram.remove(&key);
                }
                let socket = matches!(kind, Inbound::Echo) || self.local.udp_ports.contains(&port);
                if local && socket {
                    f.dgram.insert(key, live);
                }
            }
        }
    }

    /// The reference verdict for `frame` under the current state, as the gateway's own packet (TC
    /// egress).
    pub fn reference(&self, frame: &Frame) -> Verdict {
        self.reference_at(Enforcer::TcEgress, frame)
    }

    /// The reference verdict for `frame` where `enforcer` sees it: TC egress sees the gateway's own
    /// packets (BPF_PROG_TEST_RUN gives them no ingress interface), XDP forward forwarded ones.
    pub fn reference_at(&self, enforcer: Enforcer, frame: &Frame) -> Verdict {
        let d = frame.describe();
        let c = self.compiled.as_ref().expect("a policy is applied");
        let (reply, half_open) = match outbound_flow_key(&d) {
            Some(k) => {
                let live = |m: &HashMap<FlowKey, FlowState>| m.get(&k).is_some_and(|s| s.live);
                (
                    live(&self.flows.established) || live(&self.flows.dgram),
                    live(&self.flows.half_open),
                )
            }
            None => (false, false),
        };
        let first_fragment_passed = match (d.packet, d.frag_id) {
            (Packet::Ip(ip), Some(id)) if ip.fragment == Fragment::NonFirst => self
                .first_fragments
                .contains(&datagram_id(&d, ip.src, ip.dst, id)),
            _ => false,
        };
        let on_link = match d.packet {
            Packet::Ip(ip) => self.local.onlink.iter().any(|n| n.contains(&ip.dst)),
            _ => false,
        };
        verdict(
            c,
            &d.packet,
            FlowFacts {
                reply,
                half_open,
                on_link,
                local_origin: enforcer == Enforcer::TcEgress,
                first_fragment_passed,
            },
        )
    }

    /// Runs `frame` through `enforcer` and the reference; returns a description of any disagreement.
    pub fn check(&mut self, enforcer: Enforcer, frame: &Frame) -> Option<String> {
        let want = self.reference_at(enforcer, frame);
        let before = self.dp.last_verdict().expect("read LAST_VERDICT").seq;
        let rv = match enforcer {
            Enforcer::TcEgress => run_prog(self.dp.tc_egress().expect("tc"), &frame.bytes),
            Enforcer::XdpForward => run_prog(self.dp.xdp_forward().expect("xdp"), &frame.bytes),
        };
        let got = self.dp.last_verdict().expect("read LAST_VERDICT");
        // The kernel remembers first fragments that passed and forgets those that dropped; so does the
        // reference side.
        let d = frame.describe();
        if let (Packet::Ip(ip), Some(id)) = (d.packet, d.frag_id)
            && ip.fragment == Fragment::First
        {
            let dgram = datagram_id(&d, ip.src, ip.dst, id);
            // Only a first fragment that passed outright vouches (not an audited would-be drop).
            if want.action == Action::Pass && want.reason.is_none() {
                self.first_fragments.insert(dgram);
            } else {
                self.first_fragments.remove(&dgram);
            }
        }
        let want_rv = match (enforcer, want.action) {
            (Enforcer::TcEgress, Action::Pass) => TC_PASS,
            (Enforcer::TcEgress, Action::Drop) => TC_SHOT,
            (Enforcer::XdpForward, Action::Pass) => XDP_PASS,
            (Enforcer::XdpForward, Action::Drop) => XDP_DROP,
        };
        // The gateway's SYN-ACK answering a half-open flow (and no live established one): the kernel
        // remembers what acknowledges it.
        if enforcer == Enforcer::TcEgress
            && want.basis == Basis::Reply
            && let Some(k) = outbound_flow_key(&d)
            && let Packet::Ip(ip) = d.packet
            && ip.tcp_flags & 0x12 == 0x12
            && !self.flows.established.get(&k).is_some_and(|s| s.live)
            && let Some(h) = self.flows.half_open.get_mut(&k)
            && h.live
        {
            let seq = frame.tcp_seq_ack().map_or(0, |(seq, _)| seq);
            h.expect_ack = Some(seq.wrapping_add(1));
        }
        if got.seq != before + 1 {
            return Some(format!("{}: {enforcer:?} recorded no verdict", frame.name));
        }
        let (k, r) = (kernel_view(&got), reference_view(&want));
        (k != r || rv != want_rv).then(|| {
            format!(
                "{} ({:?}): {enforcer:?} returned {rv:#x} (want {want_rv:#x}); kernel (action, reason, basis, id, audit) = {k:?}, reference = {r:?} {want:?}",
                frame.name,
                frame.describe().packet
            )
        })
    }
}

/// A datagram's identity as the kernel's reassembly has it (IPv6: no protocol).
fn datagram_id(d: &Described, src: IpAddr, dst: IpAddr, id: u32) -> DatagramId {
    let v4 = dst.is_ipv4();
    (v4, if v4 { d.proto } else { 0 }, id, src, dst)
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}
