//! The probe's diagnosis (DESIGN.md "Probe report"): what one connection attempt's facts mean. Pure:
//! `cli::probe` gathers the facts (the policy's verdict, the socket's result, the kernel's record of
//! exactly this connection, the neighbour table), this decides, so every class is tested without a
//! network.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;
use vpcgate_common::{datapath::ProbeObs, verdict::DropReason};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Connected,
    BlockedByPolicy,
    NoReply,
    Refused,
    Unreachable,
    LocalDrop,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Connected => "connected",
            Outcome::BlockedByPolicy => "blocked_by_policy",
            Outcome::NoReply => "no_reply",
            Outcome::Refused => "refused",
            Outcome::Unreachable => "unreachable",
            Outcome::LocalDrop => "local_drop",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Pass,
    Fail,
    Skipped,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    /// `authorization`, `network` or `service`.
    pub step: &'static str,
    pub status: StepStatus,
    pub detail: String,
    pub remedy: Option<String>,
}

/// Who decides whether the backend admits the gateway (the policy's `instance_type`; upstream nodes
/// and accessible blocks are hosts whose firewall or security group is not named in the policy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    Ecs,
    Clb,
    Nlb,
    Host,
}

impl Control {
    /// What to change so that `egress` may reach `target`.
    fn admit(self, egress: IpAddr, target: SocketAddr) -> String {
        let (src, port) = (host_prefix(egress), target.port());
        match self {
            Control::Ecs => format!(
                "add an inbound rule to the backend ECS instance's security group: allow tcp/{port} from {src} (the gateway's egress IP)"
            ),
            Control::Clb => format!(
                "add {src} (the gateway's egress IP) to the CLB listener's access-control allowlist (or turn access control off for port {port})"
            ),
            Control::Nlb => format!(
                "allow tcp/{port} from {src} in the NLB's security group (or turn off the NLB's security-group evaluation for PrivateLink traffic)"
            ),
            Control::Host => format!(
                "allow tcp/{port} from {src} (the gateway's egress IP) in the backend's security group or host firewall"
            ),
        }
    }

    fn listener(self, target: SocketAddr) -> String {
        let port = target.port();
        match self {
            Control::Clb => format!(
                "check that the CLB has a listener on port {port} and that its backend servers pass the health check"
            ),
            Control::Nlb => format!(
                "check that the NLB has a listener on port {port} and healthy targets behind it"
            ),
            Control::Ecs | Control::Host => format!(
                "check that the service runs on {} and listens on port {port} on that address (ss -ltn)",
                target.ip()
            ),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Control::Ecs => "the ECS instance's security group",
            Control::Clb => "the CLB's access-control allowlist",
            Control::Nlb => "the NLB's security group",
            Control::Host => "the backend's security group or firewall",
        }
    }
}

fn host_prefix(a: IpAddr) -> String {
    match a {
        IpAddr::V4(_) => format!("{a}/32"),
        IpAddr::V6(_) => format!("{a}/128"),
    }
}

/// What the policy says about the target (from the same code as `explain`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyView {
    /// Whether the verdict passes the SYN (audit mode: would it, in enforce mode).
    pub allowed: bool,
    pub audit: bool,
    pub reason: Option<DropReason>,
    /// `explain`'s detail: the rule that decides, or why nothing does.
    pub detail: String,
    /// The policy change that would allow it (`explain`'s suggestion), for a drop.
    pub change: Option<String>,
}

/// What the socket reported for the attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum Connect {
    Connected,
    TimedOut,
    Failed { errno: i32, message: String },
}

/// Everything gathered for one attempt.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    pub connect: Option<Connect>,
    pub kernel: ProbeObs,
    /// The running kernel's name for `kernel.kernel_reason` (tracefs).
    pub kernel_reason: Option<String>,
    /// The next hop and its neighbour-table state (`INCOMPLETE`, `FAILED`, ...), if any.
    pub neighbour: Option<(IpAddr, Option<String>)>,
    /// How long the attempt waited.
    pub waited_ms: u64,
    /// The route toward the target leaves through this interface, not the ENI (named here).
    pub routed_elsewhere: Option<(String, String)>,
}

/// The diagnosis of one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnosis {
    pub outcome: Outcome,
    pub steps: Vec<Step>,
    /// One line: why.
    pub cause: String,
    /// One line: what to do (None when connected).
    pub action: Option<String>,
}

/// ICMP type and code in words (RFC 792 / RFC 4443).
pub fn icmp_words(v6: bool, t: u8, c: u8) -> String {
    let words = if !v6 {
        match (t, c) {
            (3, 0) => "net unreachable",
            (3, 1) => "host unreachable",
            (3, 2) => "protocol unreachable",
            (3, 3) => "port unreachable",
            (3, 4) => "fragmentation needed",
            (3, 5) => "source route failed",
            (3, 6) => "destination network unknown",
            (3, 7) => "destination host unknown",
            (3, 9) => "network administratively prohibited",
            (3, 10) => "host administratively prohibited",
            (3, 11) => "network unreachable for type of service",
            (3, 12) => "host unreachable for type of service",
            (3, 13) => "communication administratively prohibited",
            (3, 14) => "host precedence violation",
            (3, 15) => "precedence cutoff in effect",
            (11, _) => "time exceeded (TTL expired in transit)",
            _ => "",
        }
    } else {
        match (t, c) {
            (1, 0) => "no route to destination",
            (1, 1) => "communication administratively prohibited",
            (1, 2) => "beyond scope of source address",
            (1, 3) => "address unreachable",
            (1, 4) => "port unreachable",
            (1, 5) => "source address failed ingress/egress policy",
            (1, 6) => "reject route to destination",
            (2, _) => "packet too big",
            (3, _) => "time exceeded (hop limit expired in transit)",
            _ => "",
        }
    };
    let family = if v6 { "ICMPv6" } else { "ICMP" };
    if words.is_empty() {
        format!("{family} type {t} code {c}")
    } else {
        format!("{family} {words} (type {t} code {c})")
    }
}

fn administratively_prohibited(v6: bool, t: u8, c: u8) -> bool {
    if v6 {
        (t, c) == (1, 1) || (t, c) == (1, 5)
    } else {
        t == 3 && matches!(c, 9 | 10 | 13)
    }
}

/// What to do about a drop by this host's kernel, by the kernel's reason name.
fn local_remedy(reason: Option<&str>, next_hop: Option<IpAddr>, target: SocketAddr) -> String {
    let hop = next_hop.unwrap_or(target.ip());
    match reason {
        Some(r) if r.starts_with("NEIGH") => format!(
            "nothing on the link answers ARP/neighbour discovery for {hop}: check that {} is the backend's current address (the instance may be stopped or the address released) and that it is in this subnet",
            target.ip()
        ),
        Some(r) if r.contains("NOROUTE") || r.contains("NO_ROUTE") => format!(
            "add a route to {} on this host (ip route get {} fails)",
            target.ip(),
            target.ip()
        ),
        Some(r) if r.starts_with("NETFILTER") => {
            "a firewall rule on this host (nftables/iptables output or postrouting) drops it: list them with `nft list ruleset`".into()
        }
        Some(r) if r.starts_with("QDISC") || r.starts_with("TC_") => {
            "a queueing discipline or TC program on this host drops it: check `tc -s qdisc` and `tc filter` on the interface".into()
        }
        Some(r) if r.starts_with("IPV6DISABLED") => "IPv6 is disabled on the interface".into(),
        _ => format!(
            "check this host's route and neighbour entry for {} (ip route get {}; ip neigh)",
            target.ip(),
            target.ip()
        ),
    }
}

/// Step 2 failed (what the network did, and what to do), step 3 not reached.
fn network_fails(
    outcome: Outcome,
    auth: Step,
    detail: String,
    remedy: String,
    cause: String,
) -> Diagnosis {
    Diagnosis {
        outcome,
        steps: vec![
            auth,
            Step {
                step: "network",
                status: StepStatus::Fail,
                detail,
                remedy: Some(remedy.clone()),
            },
            Step {
                step: "service",
                status: StepStatus::Skipped,
                detail: "not reached".into(),
                remedy: None,
            },
        ],
        cause,
        action: Some(remedy),
    }
}

/// Decides one attempt.
pub fn diagnose(
    target: SocketAddr,
    egress: IpAddr,
    control: Control,
    policy: &PolicyView,
    f: &Facts,
) -> Diagnosis {
    let k = &f.kernel;
    let v6 = target.is_ipv6();
    let skipped = |step: &'static str, why: &str| Step {
        step,
        status: StepStatus::Skipped,
        detail: why.to_owned(),
        remedy: None,
    };
    let audit_note = if policy.audit && !policy.allowed {
        format!(
            " — audit mode passed it; enforce mode would drop it ({})",
            policy.reason.map_or("", |r| r.name())
        )
    } else if !policy.allowed {
        format!(
            " — yet the connection was made: vpcgate did not enforce this path ({})",
            match &f.routed_elsewhere {
                Some((via, eni)) => format!("the route leaves through {via}, not the ENI {eni}"),
                None => "are its programs attached to the ENI? see `vpcgate status`".to_owned(),
            }
        )
    } else {
        String::new()
    };
    let connected = matches!(f.connect, Some(Connect::Connected));
    // 1. The policy (the kernel's drop of this very SYN is the proof; the reference verdict explains it).
    // A connection the policy denies that was made anyway is not "blocked": it is a bypass, said below.
    if k.dropped > 0 || (!policy.allowed && !policy.audit && !connected) {
        let reason = DropReason::from_code(k.drop_reason)
            .or(policy.reason)
            .map_or("dropped", |r| r.name());
        let evidence = if k.dropped > 0 {
            format!(
                "; vpcgate dropped the SYN at the ENI's egress ({reason}, {} time{})",
                k.dropped,
                if k.dropped == 1 { "" } else { "s" }
            )
        } else {
            String::new()
        };
        let change = policy.change.clone();
        return Diagnosis {
            outcome: Outcome::BlockedByPolicy,
            steps: vec![
                Step {
                    step: "authorization",
                    status: StepStatus::Fail,
                    detail: format!("{}{evidence}", policy.detail),
                    remedy: change.clone(),
                },
                skipped("network", "not tried: the policy drops the connection"),
                skipped("service", "not tried: the policy drops the connection"),
            ],
            cause: format!(
                "the gateway's policy does not allow tcp/{} to {} ({reason})",
                target.port(),
                target.ip()
            ),
            action: Some(change.unwrap_or_else(|| {
                "no policy change can allow it (see the authorization step)".into()
            })),
        };
    }
    let auth = Step {
        step: "authorization",
        status: if policy.allowed {
            StepStatus::Pass
        } else {
            StepStatus::Fail
        },
        detail: format!("{}{audit_note}", policy.detail),
        remedy: if policy.allowed {
            None
        } else {
            policy.change.clone()
        },
    };
    let syns = if k.syns == 1 {
        "the SYN".to_owned()
    } else {
        format!("{} SYNs", k.syns)
    };
    if !connected && k.syn_ack > 0 {
        // The backend answered, yet the socket never connected: this host dropped the answer.
        let remedy = "a firewall rule on this host (nftables/iptables input, conntrack) drops the backend's SYN-ACK: list them with `nft list ruleset`".to_owned();
        return network_fails(
            Outcome::LocalDrop,
            auth,
            format!(
                "{} answered {egress}'s SYN with a SYN-ACK at the ENI, but the connection never completed: this host dropped the answer{}",
                target.ip(),
                f.kernel_reason
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ),
            remedy,
            format!("this host dropped {target}'s SYN-ACK"),
        );
    }
    if connected {
        return Diagnosis {
            outcome: Outcome::Connected,
            steps: vec![
                auth,
                Step {
                    step: "network",
                    status: StepStatus::Pass,
                    detail: format!("{} answered {egress}'s SYN with a SYN-ACK", target.ip()),
                    remedy: None,
                },
                Step {
                    step: "service",
                    status: StepStatus::Pass,
                    detail: format!("port {} accepts connections", target.port()),
                    remedy: None,
                },
            ],
            cause: format!("{target} accepts connections from {egress}"),
            action: None,
        };
    }
    if k.rst > 0 {
        let remedy = control.listener(target);
        return Diagnosis {
            outcome: Outcome::Refused,
            steps: vec![
                auth,
                Step {
                    step: "network",
                    status: StepStatus::Pass,
                    detail: format!(
                        "{} is reachable: it answered {egress}'s SYN with a RST",
                        target.ip()
                    ),
                    remedy: None,
                },
                Step {
                    step: "service",
                    status: StepStatus::Fail,
                    detail: format!("nothing listens on {target}"),
                    remedy: Some(remedy.clone()),
                },
            ],
            cause: format!("nothing listens on {target} (the backend answered with a RST)"),
            action: Some(remedy),
        };
    }
    if k.icmp > 0 {
        let words = icmp_words(v6, k.icmp_type, k.icmp_code);
        let remedy = if administratively_prohibited(v6, k.icmp_type, k.icmp_code) {
            format!(
                "{} rejects the gateway: {}",
                control.name(),
                control.admit(egress, target)
            )
        } else {
            format!(
                "check {}'s address and the VPC's routes toward it (the error came from the network, not from this host)",
                target.ip()
            )
        };
        return network_fails(
            Outcome::Unreachable,
            auth,
            format!("{syns} from {egress} drew {words}"),
            remedy,
            format!("the network answered {egress}'s SYN to {target} with {words}"),
        );
    }
    let local_error = match &f.connect {
        Some(Connect::Failed { errno, message })
            if matches!(
                *errno,
                libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EPERM | libc::EACCES
            ) =>
        {
            Some(message.clone())
        }
        _ => None,
    };
    if k.syns == 0
        && let Some((via, eni)) = &f.routed_elsewhere
    {
        let remedy = format!(
            "route {} through the ENI {eni} (ip route get {} says {via})",
            target.ip(),
            target.ip()
        );
        return network_fails(
            Outcome::LocalDrop,
            auth,
            format!(
                "the route to {} leaves through {via}, not the ENI {eni}: the SYN never passed the ENI",
                target.ip()
            ),
            remedy,
            format!("this host routes {target} through {via}, not the ENI"),
        );
    }
    if k.syns == 0 {
        let next_hop = f.neighbour.as_ref().map(|n| n.0);
        let reason = f.kernel_reason.as_deref();
        let mut detail = match reason {
            Some(r) => format!("the SYN never left this host: the kernel dropped it ({r})"),
            None => "the SYN never left this host".to_owned(),
        };
        if let Some((hop, state)) = &f.neighbour {
            detail.push_str(&format!(
                "; neighbour {hop}: {}",
                state.as_deref().unwrap_or("no entry")
            ));
        }
        if let Some(e) = &local_error {
            detail.push_str(&format!("; connect: {e}"));
        }
        let remedy = local_remedy(reason, next_hop, target);
        return network_fails(
            Outcome::LocalDrop,
            auth,
            detail,
            remedy,
            match reason {
                Some(r) => format!("this host dropped the SYN to {target} before it left ({r})"),
                None => format!("the SYN to {target} never left this host"),
            },
        );
    }
    let neighbour_failed = f
        .kernel_reason
        .as_deref()
        .is_some_and(|r| r.starts_with("NEIGH"))
        || matches!(
            f.neighbour.as_ref().and_then(|n| n.1.as_deref()),
            Some("FAILED" | "INCOMPLETE")
        );
    if neighbour_failed {
        let hop = f.neighbour.as_ref().map_or(target.ip(), |n| n.0);
        let remedy = local_remedy(Some("NEIGH_FAILED"), Some(hop), target);
        return network_fails(
            Outcome::LocalDrop,
            auth,
            format!(
                "{syns} left {egress} toward a cached link-layer address, nothing answered, and resolving {hop} again failed{}",
                f.kernel_reason
                    .as_ref()
                    .map(|r| format!(" (the kernel dropped the retransmissions: {r})"))
                    .unwrap_or_default()
            ),
            remedy,
            format!("nothing on the link answers for {hop} any more"),
        );
    }
    let remedy = control.admit(egress, target);
    network_fails(
        Outcome::NoReply,
        auth,
        format!(
            "{syns} left {egress} through the ENI and nothing came back in {} ms (no SYN-ACK, RST or ICMP error)",
            f.waited_ms
        ),
        remedy,
        format!(
            "{} most likely drops the gateway's egress IP {egress} silently",
            control.name()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> SocketAddr {
        "10.0.3.7:80".parse().unwrap()
    }
    fn egress() -> IpAddr {
        "10.0.0.5".parse().unwrap()
    }
    fn allowed() -> PolicyView {
        PolicyView {
            allowed: true,
            audit: false,
            reason: None,
            detail: "authorization orders-slb allows it".into(),
            change: None,
        }
    }
    fn facts(k: ProbeObs, connect: Connect) -> Facts {
        Facts {
            connect: Some(connect),
            kernel: k,
            waited_ms: 3000,
            ..Facts::default()
        }
    }
    /// The diagnosis of an attempt from the egress IP to the target.
    fn decide(c: Control, p: &PolicyView, f: &Facts) -> Diagnosis {
        diagnose(target(), egress(), c, p, f)
    }
    /// What the policy says of a packet it does not allow.
    fn denied(reason: DropReason, audit: bool, change: &str) -> PolicyView {
        PolicyView {
            allowed: false,
            audit,
            reason: Some(reason),
            detail: "no rule allows it".into(),
            change: Some(change.into()),
        }
    }
    fn statuses(d: &Diagnosis) -> Vec<StepStatus> {
        d.steps.iter().map(|s| s.status).collect()
    }
    use StepStatus::{Fail, Pass, Skipped};

    #[test]
    fn each_class_fails_its_own_step() {
        let sent = ProbeObs {
            syns: 1,
            ..ProbeObs::default()
        };
        // Connected.
        let d = decide(
            Control::Clb,
            &allowed(),
            &facts(ProbeObs { syn_ack: 1, ..sent }, Connect::Connected),
        );
        assert_eq!(
            (d.outcome, statuses(&d)),
            (Outcome::Connected, vec![Pass, Pass, Pass])
        );
        assert_eq!(d.action, None);
        // Refused: step 3, the CLB's listener and health check.
        let d = decide(
            Control::Clb,
            &allowed(),
            &facts(
                ProbeObs { rst: 1, ..sent },
                Connect::Failed {
                    errno: libc::ECONNREFUSED,
                    message: "refused".into(),
                },
            ),
        );
        assert_eq!(
            (d.outcome, statuses(&d)),
            (Outcome::Refused, vec![Pass, Pass, Fail])
        );
        assert!(d.action.unwrap().contains("listener on port 80"));
        // No reply: step 2, naming the egress IP and the control for the instance type.
        for (control, words) in [
            (Control::Ecs, "security group"),
            (Control::Clb, "allowlist"),
            (Control::Nlb, "PrivateLink"),
            (Control::Host, "firewall"),
        ] {
            let d = decide(control, &allowed(), &facts(sent, Connect::TimedOut));
            assert_eq!(
                (d.outcome, statuses(&d)),
                (Outcome::NoReply, vec![Pass, Fail, Skipped])
            );
            let action = d.action.unwrap();
            assert!(
                action.contains("10.0.0.5/32") && action.contains(words),
                "{action}"
            );
        }
        // Unreachable: ICMP admin prohibited, in words.
        let d = decide(
            Control::Ecs,
            &allowed(),
            &facts(
                ProbeObs {
                    icmp: 1,
                    icmp_type: 3,
                    icmp_code: 13,
                    ..sent
                },
                Connect::Failed {
                    errno: libc::EHOSTUNREACH,
                    message: "no route".into(),
                },
            ),
        );
        assert_eq!(
            (d.outcome, statuses(&d)),
            (Outcome::Unreachable, vec![Pass, Fail, Skipped])
        );
        assert!(
            d.steps[1]
                .detail
                .contains("communication administratively prohibited (type 3 code 13)")
        );
        assert!(d.action.unwrap().contains("security group"));
        // Local drop: the kernel's reason and the neighbour state.
        let mut f = facts(
            ProbeObs {
                kernel_drops: 1,
                kernel_reason: 58,
                ..ProbeObs::default()
            },
            Connect::TimedOut,
        );
        f.kernel_reason = Some("NEIGH_FAILED".into());
        f.neighbour = Some((target().ip(), Some("FAILED".into())));
        let d = decide(Control::Ecs, &allowed(), &f);
        assert_eq!(
            (d.outcome, statuses(&d)),
            (Outcome::LocalDrop, vec![Pass, Fail, Skipped])
        );
        assert!(d.steps[1].detail.contains("NEIGH_FAILED") && d.steps[1].detail.contains("FAILED"));
        assert!(d.action.unwrap().contains("ARP"));
        // Blocked by policy: step 1, with the change; the kernel's drop is the evidence.
        let blocked = denied(DropReason::PortNotAuthorized, false, "add \"81\" to ports");
        let d = decide(
            Control::Ecs,
            &blocked,
            &facts(
                ProbeObs {
                    dropped: 1,
                    drop_reason: DropReason::PortNotAuthorized as u32,
                    ..ProbeObs::default()
                },
                Connect::TimedOut,
            ),
        );
        assert_eq!(
            (d.outcome, statuses(&d)),
            (Outcome::BlockedByPolicy, vec![Fail, Skipped, Skipped])
        );
        assert!(d.steps[0].detail.contains("dropped the SYN"));
        assert_eq!(d.action.as_deref(), Some("add \"81\" to ports"));
    }

    #[test]
    fn the_kernel_record_outranks_the_socket_and_audit_mode_goes_on() {
        // The kernel dropped the SYN although the reference allowed it: the kernel is what happened.
        let d = decide(
            Control::Ecs,
            &allowed(),
            &Facts {
                kernel: ProbeObs {
                    dropped: 2,
                    drop_reason: DropReason::NoPolicy as u32,
                    ..ProbeObs::default()
                },
                ..Facts::default()
            },
        );
        assert_eq!(d.outcome, Outcome::BlockedByPolicy);
        assert!(d.steps[0].detail.contains("no_policy, 2 times"));
        // Audit mode: the would-be drop passed; the network outcome is reported, step 1 still fails.
        let audit = denied(DropReason::NotAuthorized, true, "add an authorization");
        let d = decide(
            Control::Ecs,
            &audit,
            &facts(
                ProbeObs {
                    syns: 1,
                    audited: 1,
                    syn_ack: 1,
                    ..ProbeObs::default()
                },
                Connect::Connected,
            ),
        );
        assert_eq!(
            (d.outcome, statuses(&d)),
            (Outcome::Connected, vec![Fail, Pass, Pass])
        );
        assert!(
            d.steps[0]
                .detail
                .contains("enforce mode would drop it (not_authorized)")
        );
    }

    #[test]
    fn only_the_socket_makes_a_connection() {
        // A SYN-ACK the ENI saw while the socket timed out: this host dropped it, not "connected".
        let d = decide(
            Control::Ecs,
            &allowed(),
            &facts(
                ProbeObs {
                    syns: 2,
                    syn_ack: 1,
                    ..ProbeObs::default()
                },
                Connect::TimedOut,
            ),
        );
        assert_eq!(
            (d.outcome, statuses(&d)),
            (Outcome::LocalDrop, vec![Pass, Fail, Skipped])
        );
        // SYNs left and a later kernel drop was recorded: still no reply, not "never left".
        let d = decide(
            Control::Ecs,
            &allowed(),
            &facts(
                ProbeObs {
                    syns: 2,
                    kernel_drops: 1,
                    kernel_reason: 58,
                    ..ProbeObs::default()
                },
                Connect::TimedOut,
            ),
        );
        assert_eq!(d.outcome, Outcome::NoReply);
        // Routed through another interface: named, not guessed as a drop.
        let mut f = facts(ProbeObs::default(), Connect::TimedOut);
        f.routed_elsewhere = Some(("eth0".into(), "eth1".into()));
        let d = decide(Control::Ecs, &allowed(), &f);
        assert_eq!(d.outcome, Outcome::LocalDrop);
        assert!(
            d.steps[1]
                .detail
                .contains("leaves through eth0, not the ENI eth1"),
            "{d:?}"
        );
    }

    #[test]
    fn icmp_codes_read_as_words() {
        assert_eq!(
            icmp_words(false, 3, 1),
            "ICMP host unreachable (type 3 code 1)"
        );
        assert_eq!(
            icmp_words(true, 1, 1),
            "ICMPv6 communication administratively prohibited (type 1 code 1)"
        );
        assert_eq!(
            icmp_words(true, 1, 3),
            "ICMPv6 address unreachable (type 1 code 3)"
        );
        assert_eq!(icmp_words(false, 42, 7), "ICMP type 42 code 7");
    }
}
