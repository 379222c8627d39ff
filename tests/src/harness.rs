//! Runs crafted frames through the kernel programs (BPF_PROG_TEST_RUN) and through the reference verdict
//! with the same flow state, and compares action, reason and attribution.

use std::collections::HashSet;

use aya::programs::{TestRun, TestRunOptions, TestRunResult};
use vpcgate::{
    datapath::Datapath,
    policy::{
        Policy,
        compile::Compiled,
        verdict::{Action, Basis, FlowFacts, Fragment, L4, Packet, Verdict, verdict},
    },
};
use vpcgate_common::datapath::{ACTION_DROP, ACTION_PASS, FlowKey, LastVerdict, basis};

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

/// A datagram whose first fragment passed: (IPv4?, protocol, identification, source, destination).
type DatagramId = (bool, u8, u32, std::net::IpAddr, std::net::IpAddr);

pub struct Harness {
    pub dp: Datapath,
    pub compiled: Option<Compiled>,
    /// Flows recorded as peer-initiated (outbound keys, from the gateway's side).
    flows: HashSet<FlowKey>,
    first_fragments: HashSet<DatagramId>,
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
        Basis::Malformed => (basis::MALFORMED, 0),
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
    let bytes = |a: std::net::IpAddr| match a {
        std::net::IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        std::net::IpAddr::V6(a) => a.octets(),
    };
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

fn run_prog<P>(prog: &P, bytes: &[u8]) -> u32
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

impl Harness {
    /// Loads the programs and turns on the verdict-recording test hook.
    pub fn new() -> Self {
        let mut dp = Datapath::load().unwrap_or_else(|e| panic!("{e}"));
        dp.set_record_last(true).expect("set record-last flag");
        Self {
            dp,
            compiled: None,
            flows: HashSet::new(),
            first_fragments: HashSet::new(),
        }
    }

    /// Applies `policy` and forgets all flow state (kernel and reference).
    pub fn apply(&mut self, policy: &Policy) -> vpcgate::datapath::ApplyReport {
        let c = Compiled::new(policy);
        let report = self.dp.apply(&c).unwrap_or_else(|e| panic!("apply: {e}"));
        self.dp.clear_flow_state().expect("clear flow state");
        self.flows.clear();
        self.first_fragments.clear();
        self.compiled = Some(c);
        report
    }

    /// Records a flow a peer initiated, whose outbound replies look like `reply` (kernel and reference).
    pub fn add_reply_flow(&mut self, reply: &Frame) -> bool {
        let Some(key) = outbound_flow_key(&reply.describe()) else {
            return false;
        };
        self.dp.insert_flow(&key).expect("insert flow");
        self.flows.insert(key);
        true
    }

    /// The reference verdict for `frame` under the current state.
    pub fn reference(&self, frame: &Frame) -> Verdict {
        let d = frame.describe();
        let c = self.compiled.as_ref().expect("a policy is applied");
        let reply = outbound_flow_key(&d).is_some_and(|k| self.flows.contains(&k));
        let first_fragment_passed = match (d.packet, d.frag_id) {
            (Packet::Ip(ip), Some(id)) if ip.fragment == Fragment::NonFirst => self
                .first_fragments
                .contains(&(ip.dst.is_ipv4(), d.proto, id, ip.src, ip.dst)),
            _ => false,
        };
        verdict(
            c,
            &d.packet,
            FlowFacts {
                reply,
                first_fragment_passed,
            },
        )
    }

    /// Runs `frame` through `enforcer` and the reference; returns a description of any disagreement.
    pub fn check(&mut self, enforcer: Enforcer, frame: &Frame) -> Option<String> {
        let want = self.reference(frame);
        let before = self.dp.last_verdict().expect("read LAST_VERDICT").seq;
        let rv = match enforcer {
            Enforcer::TcEgress => run_prog(self.dp.tc_egress().expect("tc"), &frame.bytes),
            Enforcer::XdpForward => run_prog(self.dp.xdp_forward().expect("xdp"), &frame.bytes),
        };
        let got = self.dp.last_verdict().expect("read LAST_VERDICT");
        // The kernel remembers first fragments that passed; so does the reference side.
        let d = frame.describe();
        if let (Packet::Ip(ip), Some(id)) = (d.packet, d.frag_id)
            && ip.fragment == Fragment::First
            && want.action == Action::Pass
        {
            self.first_fragments
                .insert((ip.dst.is_ipv4(), d.proto, id, ip.src, ip.dst));
        }
        let want_rv = match (enforcer, want.action) {
            (Enforcer::TcEgress, Action::Pass) => TC_PASS,
            (Enforcer::TcEgress, Action::Drop) => TC_SHOT,
            (Enforcer::XdpForward, Action::Pass) => XDP_PASS,
            (Enforcer::XdpForward, Action::Drop) => XDP_DROP,
        };
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

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}
