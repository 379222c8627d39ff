//! `vpcgate explain FILE DST[:PORT]`: the verdict for one packet, offline.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use serde::Serialize;

use super::{EXIT_FAILED, EXIT_OK, Output, print_json};
use crate::policy::{
    self,
    compile::RuleKind,
    diag::escape_controls,
    explain::{self, SuggestionKind},
    model::{FlowTimeouts, HostEssential, ReservedSource},
    verdict::{Action, Basis, FlowFacts, Fragment, IpPacket, L4, Packet, verdict},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProtoArg {
    Tcp,
    Udp,
    /// An ICMP (ICMPv6 for IPv6 destinations) echo request.
    Icmp,
}

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    vpcgate explain examples/policy.toml 10.0.3.7:80\n  \
    vpcgate explain examples/policy.toml '[fd00:10::7]:8443'\n  \
    vpcgate explain examples/policy.toml 10.9.0.4:53 --proto udp --output json\n  \
    vpcgate explain examples/policy.toml 10.1.2.3 --proto icmp\n\n\
    Exit status: 0 the packet passes, 1 it is dropped, 2 invalid policy or usage.")]
pub struct Args {
    /// The policy file (TOML).
    pub file: PathBuf,
    /// Destination: IP:PORT, [IPv6]:PORT, or a bare IP with --proto icmp.
    pub destination: String,
    #[arg(long, value_enum, default_value = "tcp")]
    pub proto: ProtoArg,
    /// Source address (default: the policy's egress_ip). Informational: the verdict depends on the destination.
    #[arg(long)]
    pub src: Option<IpAddr>,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Serialize)]
struct RuleRef {
    id: u32,
    kind: RuleKind,
    name: String,
    file: String,
    line: usize,
    verdict_rule: u8,
}

/// The reserved block a `reserved_range` drop falls in (rule 4).
#[derive(Serialize)]
struct ReservedRef {
    cidr: String,
    /// `zone` (the provider's table for `zone`) or `explicit` (`reserved_cidrs`).
    source: &'static str,
    zone: Option<String>,
    file: String,
    /// The line of `zone` or of the `reserved_cidrs` entry.
    line: usize,
}

#[derive(Serialize)]
struct Report {
    source: Option<IpAddr>,
    destination: IpAddr,
    protocol: &'static str,
    port: Option<u16>,
    action: Action,
    reason: Option<&'static str>,
    audit: bool,
    rule: Option<RuleRef>,
    reserved_block: Option<ReservedRef>,
    detail: String,
    suggestion: Option<explain::Suggestion>,
    /// What passes whatever the policy says (verdict rule 1).
    host_essentials: Vec<HostEssential>,
    /// Idle timeouts of peer-initiated flows (rule 3), in seconds.
    flow_timeouts: FlowTimeouts,
}

/// Parses `DST[:PORT]`.
fn destination(s: &str, proto: ProtoArg) -> Result<(IpAddr, Option<u16>), String> {
    let (addr, port) = if let Ok(sa) = s.parse::<SocketAddr>() {
        (sa.ip(), Some(sa.port()))
    } else if let Ok(ip) = s.trim_matches(['[', ']']).parse::<IpAddr>() {
        (ip, None)
    } else {
        // Same rule as in policy files: octets with leading zeros are refused, with the plain form.
        let (host, port) = s.rsplit_once(':').unwrap_or((s, ""));
        if let Some(fixed) = crate::policy::parse::without_leading_zeros(host) {
            let port = if port.is_empty() {
                String::new()
            } else {
                format!(":{port}")
            };
            return Err(format!(
                "`{s}` has octets with leading zeros (some tools read those as octal): write {fixed}{port}"
            ));
        }
        return Err(format!("`{s}` is not IP, IP:PORT or [IPv6]:PORT"));
    };
    match (proto, port) {
        (ProtoArg::Icmp, Some(_)) => {
            Err("--proto icmp takes a bare address (ICMP has no ports)".into())
        }
        (ProtoArg::Tcp | ProtoArg::Udp, None) => Err(format!(
            "give a port: {}",
            match addr {
                IpAddr::V4(a) => format!("{a}:80"),
                IpAddr::V6(a) => format!("[{a}]:80"),
            }
        )),
        (_, Some(0)) => Err("port 0 is not a destination port".into()),
        _ => Ok((addr, port)),
    }
}

pub fn run(args: &Args) -> u8 {
    let (dst, port) = match destination(&args.destination, args.proto) {
        // The kernel sends an IPv4-mapped IPv6 destination as IPv4: evaluate it as that.
        Ok((dst, port)) => (dst.to_canonical(), port),
        Err(e) => return super::fail(args.output, "bad_destination", e),
    };
    let checked = match policy::load(&args.file) {
        Ok(c) => c,
        Err(e) => {
            return super::fail(
                args.output,
                "unreadable_file",
                format!("cannot read {}: {e}", args.file.display()),
            );
        }
    };
    let (Some(p), Some(compiled)) = (&checked.policy, &checked.compiled) else {
        for d in &checked.diagnostics {
            eprintln!("{d}");
        }
        return super::fail(
            args.output,
            "invalid_policy",
            format!(
                "{} is invalid ({} error{}): fix it first (`vpcgate check`)",
                checked.source.path,
                checked.errors(),
                if checked.errors() == 1 { "" } else { "s" }
            ),
        );
    };
    let l4 = match (args.proto, port) {
        (ProtoArg::Tcp, Some(dport)) => L4::Tcp { dport },
        (ProtoArg::Udp, Some(dport)) => L4::Udp { dport },
        _ if dst.is_ipv4() => L4::Icmp { kind: 8, code: 0 },
        _ => L4::Icmpv6 { kind: 128, code: 0 },
    };
    let src = args.src.or(p.instance.egress_ip);
    let pkt = Packet::Ip(IpPacket::new(
        src.unwrap_or(if dst.is_ipv4() {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from([0u16; 8])
        }),
        dst,
        l4,
        Fragment::None,
    ));
    // The gateway's own packet (locally generated), with no flow state.
    let v = verdict(
        compiled,
        &pkt,
        FlowFacts {
            local_origin: true,
            ..FlowFacts::default()
        },
    );
    let path = &checked.source.path;
    let rule = v.rule().and_then(|id| compiled.rule(id)).map(|r| RuleRef {
        id: r.id,
        kind: r.kind,
        name: r.name.clone(),
        file: path.clone(),
        line: r.pos.line,
        verdict_rule: r.kind.verdict_rule(),
    });
    let reserved_block = match v.basis {
        Basis::Reserved(i) => compiled.reserved.get(i).map(|r| ReservedRef {
            cidr: r.cidr.to_string(),
            source: match r.source {
                ReservedSource::Zone(_) => "zone",
                ReservedSource::Explicit => "explicit",
            },
            zone: match &r.source {
                ReservedSource::Zone(z) => Some(z.clone()),
                ReservedSource::Explicit => None,
            },
            file: path.clone(),
            line: r.pos.line,
        }),
        _ => None,
    };
    let report = Report {
        source: src,
        destination: dst,
        protocol: match args.proto {
            ProtoArg::Tcp => "tcp",
            ProtoArg::Udp => "udp",
            ProtoArg::Icmp => "icmp",
        },
        port,
        action: v.action,
        reason: v.reason.map(|r| r.name()),
        audit: v.audit,
        rule,
        reserved_block,
        detail: explain::detail(compiled, path, &pkt, &v),
        suggestion: explain::suggestion(p, compiled, &pkt, &v),
        host_essentials: compiled.host_essentials.clone(),
        flow_timeouts: compiled.flow_timeouts,
    };
    match args.output {
        Output::Json => {
            if let Err(code) = print_json(&report) {
                return code;
            }
        }
        Output::Text => {
            let target = match port {
                Some(port) => format!("{}/{}", SocketAddr::new(dst, port), report.protocol),
                None => format!("{dst}/{}", report.protocol),
            };
            let verdict = match (v.action, v.reason, v.audit) {
                (Action::Pass, _, true) => format!(
                    "pass (audit mode; enforce would drop: {})",
                    v.reason.map_or("", |r| r.name())
                ),
                (Action::Pass, _, false) => "pass".to_owned(),
                (Action::Drop, Some(r), _) => format!("drop ({})", r.name()),
                (Action::Drop, None, _) => "drop".to_owned(),
            };
            println!("{target} → {verdict}");
            // The detail and the suggestion echo the file's path (rule names are checked to a plain
            // charset, but the path is whatever the command line said).
            println!("  {}", escape_controls(&report.detail));
            if let Some(s) = &report.suggestion {
                println!(
                    "  {}",
                    match s.kind {
                        SuggestionKind::Change => "smallest change that allows it:",
                        SuggestionKind::Impossible => "no policy change can allow it:",
                    }
                );
                for line in s.text.lines() {
                    println!("    {}", escape_controls(line));
                }
            }
            println!(
                "  host essentials (rule 1): {}",
                explain::host_essentials(&report.host_essentials)
            );
        }
    }
    if v.action == Action::Pass {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}
