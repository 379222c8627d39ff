//! Property tests: every change `explain` suggests is correct by construction. Over random valid policy
//! files (both kinds, both families, overlapping prefixes, port ranges, explicit reserved blocks and a
//! zone's) and random dropped packets (tcp, udp, ICMP echo, non-first fragments; IPv4 and IPv6), each
//! suggested edit is applied to the policy *text* as its JSON gives it; the file then checks valid and the
//! reference verdict passes the packet. Placeholders left unfilled are refused by `check`. A suggestion
//! that no change can allow the packet is made only for a zone's reserved block or a special-purpose
//! address. The same for `check`: the accessible blocks it suggests leave every reserved block out and,
//! added, make the policy valid.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use proptest::{
    prelude::*,
    test_runner::{Config, TestCaseError, TestRunner},
};
use vpcgate::policy::{
    self,
    compile::{Compiled, RuleKind},
    explain::{Edit, EditTarget, PORT_PLACEHOLDER, SuggestionKind, suggestion},
    model::ReservedSource,
    reserved::zone_blocks,
    validate::{covered_by, overlaps, special_purpose},
    verdict::{FlowFacts, Fragment, IpPacket, L4, Packet, verdict},
};

const ZONE: &str = "cn-hangzhou-b";

// ---------- the policy file, as text the test renders and edits ----------

#[derive(Clone, Debug)]
struct AccessibleSpec {
    cidr: String,
    ports: Option<Vec<String>>,
    protocols: Option<Vec<String>>,
}

#[derive(Clone, Debug)]
struct AuthSpec {
    name: String,
    vpc_id: String,
    address: String,
    ports: Vec<String>,
    protocol: Option<String>,
}

#[derive(Clone, Debug)]
struct UpstreamSpec {
    name: String,
    vpc_id: String,
    nodes: Vec<(IpAddr, u16)>,
}

#[derive(Clone, Debug)]
struct Spec {
    dedicated: bool,
    audit: bool,
    zone: bool,
    vswitch: Option<IpNet>,
    reserved: Vec<String>,
    accessible: Vec<AccessibleSpec>,
    auths: Vec<AuthSpec>,
    upstreams: Vec<UpstreamSpec>,
}

/// The text, and the line of each entry that edits name: reserved entries, accessible blocks' `cidr`,
/// authorizations' `address`.
struct Rendered {
    text: String,
    reserved_lines: Vec<usize>,
    accessible_lines: Vec<usize>,
    auth_lines: Vec<usize>,
}

fn quoted(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
    format!("[{}]", items.join(", "))
}

impl Spec {
    fn vpc_id(&self) -> &'static str {
        "vpc-gw"
    }

    fn render(&self) -> Rendered {
        let mut lines: Vec<String> = vec![
            "[instance]".into(),
            "name = \"gw\"".into(),
            format!(
                "kind = \"{}\"",
                if self.dedicated {
                    "dedicated"
                } else {
                    "vpc-integration"
                }
            ),
            format!("vpc_id = \"{}\"", self.vpc_id()),
            "interface = \"eth1\"".into(),
            format!(
                "mode = \"{}\"",
                if self.audit { "audit" } else { "enforce" }
            ),
        ];
        if let Some(v) = self.vswitch {
            lines.push(format!("vswitch_cidr = \"{v}\""));
        }
        if self.zone {
            lines.push(format!("zone = \"{ZONE}\""));
        }
        let mut reserved_lines = vec![];
        lines.push("reserved_cidrs = [".into());
        for r in &self.reserved {
            lines.push(format!("  \"{r}\","));
            reserved_lines.push(lines.len());
        }
        lines.push("]".into());
        let mut accessible_lines = vec![];
        for a in &self.accessible {
            lines.push(String::new());
            lines.push("[[accessible]]".into());
            lines.push(format!("cidr = \"{}\"", a.cidr));
            accessible_lines.push(lines.len());
            if let Some(p) = &a.ports {
                lines.push(format!("ports = {}", quoted(p)));
            }
            if let Some(p) = &a.protocols {
                lines.push(format!("protocols = {}", quoted(p)));
            }
        }
        let mut auth_lines = vec![];
        for a in &self.auths {
            lines.push(String::new());
            lines.push("[[authorization]]".into());
            lines.push(format!("name = \"{}\"", a.name));
            lines.push(format!("vpc_id = \"{}\"", a.vpc_id));
            lines.push(format!("address = \"{}\"", a.address));
            auth_lines.push(lines.len());
            lines.push(format!("ports = {}", quoted(&a.ports)));
            if let Some(p) = &a.protocol {
                lines.push(format!("protocol = \"{p}\""));
            }
        }
        for u in &self.upstreams {
            lines.push(String::new());
            lines.push("[[upstream]]".into());
            lines.push(format!("name = \"{}\"", u.name));
            lines.push(format!("vpc_id = \"{}\"", u.vpc_id));
            lines.push("protocol = \"http\"".into());
            let nodes: Vec<String> = u
                .nodes
                .iter()
                .map(|(a, p)| format!("{{ address = \"{a}\", port = {p} }}"))
                .collect();
            lines.push(format!("nodes = [{}]", nodes.join(", ")));
        }
        let mut text = lines.join("\n");
        text.push('\n');
        Rendered {
            text,
            reserved_lines,
            accessible_lines,
            auth_lines,
        }
    }

    /// Every reserved block: explicit and the zone's.
    fn reserved_blocks(&self) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = self.reserved.iter().map(|r| r.parse().unwrap()).collect();
        if self.zone {
            out.extend(zone_blocks(ZONE).unwrap());
        }
        out
    }

    /// Drops what would make the policy invalid: a vSwitch or backends overlapping reserved blocks,
    /// backends outside the accessible blocks (vpc-integration), accessible blocks (dedicated).
    fn repaired(mut self) -> Self {
        let reserved = self.reserved_blocks();
        let clear = |n: &IpNet| !reserved.iter().any(|r| overlaps(n, r));
        if self.vswitch.is_some_and(|v| !clear(&v)) {
            self.vswitch = if self.dedicated {
                None
            } else {
                Some("10.0.0.0/24".parse().unwrap())
            };
        }
        if self.dedicated {
            self.accessible.clear();
        } else if self.vswitch.is_none() {
            self.vswitch = Some("10.0.0.0/24".parse().unwrap());
        }
        let mut reachable: Vec<IpNet> = self.vswitch.into_iter().collect();
        reachable.extend(
            self.accessible
                .iter()
                .map(|a| a.cidr.parse::<IpNet>().unwrap()),
        );
        let dedicated = self.dedicated;
        let ok = |n: &IpNet| clear(n) && (dedicated || covered_by(n, &reachable));
        self.auths.retain(|a| ok(&a.address.parse().unwrap()));
        for u in &mut self.upstreams {
            u.nodes.retain(|(a, _)| ok(&IpNet::from(*a)));
        }
        self.upstreams.retain(|u| !u.nodes.is_empty());
        if !self.dedicated {
            let vpc = self.vpc_id();
            for a in &mut self.auths {
                a.vpc_id = vpc.into();
            }
            for u in &mut self.upstreams {
                u.vpc_id = vpc.into();
            }
        }
        self
    }

    /// Applies every edit, with placeholders replaced by `fill` (field name -> value) when given; edits
    /// name entries by their line in the text they were suggested for.
    fn apply(&self, r: &Rendered, edits: &[Edit], fill: Option<&BTreeMap<&str, String>>) -> Spec {
        let filled = |field: &str, to_fill: &[&str], value: String| match fill {
            Some(f) if to_fill.contains(&field) => f[field].clone(),
            _ => value,
        };
        let mut out = self.clone();
        // The accessible block an edit names, checked to be the one at that line.
        let accessible_at = |rule: &EditTarget| {
            let i = r
                .accessible_lines
                .iter()
                .position(|&l| l == rule.line)
                .unwrap();
            assert_eq!(self.accessible[i].cidr, rule.name);
            i
        };
        let mut removed = vec![];
        for e in edits {
            match e {
                Edit::AddAccessible {
                    cidr,
                    ports,
                    protocols,
                    to_fill,
                } => out.accessible.push(AccessibleSpec {
                    cidr: cidr.clone(),
                    ports: ports.as_ref().map(|p| {
                        p.iter()
                            .map(|p| filled("ports", to_fill, p.clone()))
                            .collect()
                    }),
                    protocols: protocols
                        .as_ref()
                        .map(|p| p.iter().map(|p| p.name().into()).collect()),
                }),
                Edit::AddAuthorization {
                    name,
                    vpc_id,
                    address,
                    ports,
                    protocol,
                    to_fill,
                } => out.auths.push(AuthSpec {
                    name: name.clone(),
                    vpc_id: filled("vpc_id", to_fill, vpc_id.clone()),
                    address: address.clone(),
                    ports: ports
                        .iter()
                        .map(|p| filled("ports", to_fill, p.clone()))
                        .collect(),
                    protocol: Some(protocol.name().into()),
                }),
                Edit::AddPort { rule, port } => match rule.kind {
                    RuleKind::Authorization => {
                        let i = r.auth_lines.iter().position(|&l| l == rule.line).unwrap();
                        assert_eq!(out.auths[i].name, rule.name);
                        out.auths[i].ports.push(port.clone());
                    }
                    RuleKind::Accessible => {
                        let i = accessible_at(rule);
                        out.accessible[i]
                            .ports
                            .as_mut()
                            .expect("a block with all ports lacks none")
                            .push(port.clone());
                    }
                    k => panic!("add_port to {k:?}"),
                },
                Edit::AddProtocol { rule, protocol } => {
                    assert_eq!(rule.kind, RuleKind::Accessible);
                    let i = accessible_at(rule);
                    out.accessible[i]
                        .protocols
                        .as_mut()
                        .expect("a block of both protocols lacks none")
                        .push(protocol.name().into());
                }
                Edit::RemoveReserved { cidr, line } => {
                    let i = r.reserved_lines.iter().position(|l| l == line).unwrap();
                    assert_eq!(
                        self.reserved[i].parse::<IpNet>().unwrap(),
                        cidr.parse::<IpNet>().unwrap()
                    );
                    removed.push(i);
                }
            }
        }
        removed.sort_unstable();
        for i in removed.into_iter().rev() {
            out.reserved.remove(i);
        }
        out
    }
}

// ---------- generators: small address spaces, so rules, reserved blocks and packets meet ----------

/// 172.19.12.0 - 172.19.19.255: its lower half lies in cn-hangzhou-b's reserved 172.19.0.0/20.
const V4_BASE: u32 = 0xac13_0c00;
const V6_BASE: u128 = 0xfd00 << 112;

fn v4_net() -> impl Strategy<Value = IpNet> {
    (0u32..2048, prop_oneof![21u8..=26, 27u8..=32]).prop_map(|(h, len)| {
        IpNet::new(IpAddr::V4(Ipv4Addr::from(V4_BASE + h)), len)
            .unwrap()
            .trunc()
    })
}

fn v6_net() -> impl Strategy<Value = IpNet> {
    (0u128..1024, prop_oneof![117u8..=122, 123u8..=128]).prop_map(|(h, len)| {
        IpNet::new(IpAddr::V6(Ipv6Addr::from(V6_BASE + h)), len)
            .unwrap()
            .trunc()
    })
}

fn net() -> impl Strategy<Value = IpNet> {
    prop_oneof![v4_net(), v6_net()]
}

fn host() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0u32..2048).prop_map(|h| IpAddr::V4(Ipv4Addr::from(V4_BASE + h))),
        (0u128..1024).prop_map(|h| IpAddr::V6(Ipv6Addr::from(V6_BASE + h))),
    ]
}

fn ports() -> impl Strategy<Value = Vec<String>> {
    let item = (1u16..200, prop_oneof![3 => Just(0u16), 1 => 1u16..40]).prop_map(|(lo, w)| {
        if w == 0 {
            lo.to_string()
        } else {
            format!("{lo}-{}", lo + w)
        }
    });
    prop_oneof![
        5 => prop::collection::vec(item.clone(), 1..4),
        1 => prop::collection::vec(item, 0..2).prop_map(|mut v| { v.push("150-65535".into()); v }),
    ]
}

fn protocols() -> impl Strategy<Value = Option<Vec<String>>> {
    prop_oneof![
        Just(None),
        Just(Some(vec!["tcp".to_owned()])),
        Just(Some(vec!["udp".to_owned()])),
        Just(Some(vec!["tcp".to_owned(), "udp".to_owned()])),
    ]
}

fn dashed(a: IpAddr) -> String {
    a.to_string().replace([':', '.'], "-")
}

prop_compose! {
    fn spec()(
        dedicated in any::<bool>(),
        audit in prop::bool::weighted(0.2),
        zone in prop::bool::weighted(0.4),
        vswitch in prop::option::weighted(0.7, net()),
        reserved in prop::collection::vec(net().prop_filter("narrow", |n| n.prefix_len() + 6 >= n.max_prefix_len()), 0..4),
        accessible in prop::collection::vec((net(), prop::option::weighted(0.7, ports()), protocols()), 0..4),
        auths in prop::collection::vec((net(), ports(), prop_oneof![Just(None), Just(Some("tcp")), Just(Some("udp"))], 0u8..6, any::<bool>()), 0..6),
        upstreams in prop::collection::vec((prop::collection::vec((host(), 1u16..200), 1..4), any::<bool>()), 0..3),
    ) -> Spec {
        let mut names = vec![];
        let auths = auths.into_iter().enumerate().map(|(i, (address, ports, protocol, name, other_vpc))| {
            // Some named as a suggestion would name a new authorization for their address and port
            // (another protocol's): names must stay unique.
            let address = if name == 0 { IpNet::from(address.addr()) } else { address };
            let mut name = if name == 0 {
                format!("allow-{}-{}", dashed(address.addr()), ports[0].split('-').next().unwrap())
            } else {
                format!("a{i}")
            };
            if names.contains(&name) {
                name = format!("a{i}");
            }
            names.push(name.clone());
            AuthSpec {
                name,
                vpc_id: if other_vpc { "vpc-b".into() } else { "vpc-a".into() },
                address: address.to_string(),
                ports,
                protocol: protocol.map(Into::into),
            }
        }).collect();
        Spec {
            dedicated,
            audit,
            zone,
            vswitch,
            reserved: reserved.iter().map(ToString::to_string).collect(),
            accessible: accessible.into_iter().map(|(cidr, ports, protocols)| AccessibleSpec { cidr: cidr.to_string(), ports, protocols }).collect(),
            auths,
            upstreams: upstreams.into_iter().enumerate().map(|(i, (nodes, other_vpc))| UpstreamSpec {
                name: format!("u{i}"),
                vpc_id: if other_vpc { "vpc-b".into() } else { "vpc-c".into() },
                nodes,
            }).collect(),
        }.repaired()
    }
}

/// Addresses where the policy's decisions change: each block's first and last address and the one past it.
fn interesting(s: &Spec) -> Vec<IpAddr> {
    let mut nets: Vec<IpNet> = s.reserved_blocks();
    nets.extend(s.vswitch);
    nets.extend(
        s.accessible
            .iter()
            .map(|a| a.cidr.parse::<IpNet>().unwrap()),
    );
    nets.extend(s.auths.iter().map(|a| a.address.parse::<IpNet>().unwrap()));
    nets.extend(
        s.upstreams
            .iter()
            .flat_map(|u| u.nodes.iter().map(|n| IpNet::from(n.0))),
    );
    let mut out = vec![];
    for n in nets {
        out.extend([n.network(), n.broadcast()]);
        out.extend(match n.broadcast() {
            IpAddr::V4(a) => u32::from(a)
                .checked_add(1)
                .map(|x| IpAddr::from(Ipv4Addr::from(x))),
            IpAddr::V6(a) => u128::from(a)
                .checked_add(1)
                .map(|x| IpAddr::from(Ipv6Addr::from(x))),
        });
    }
    out
}

/// Ports where the policy's decisions change: range boundaries and just outside them.
fn interesting_ports(s: &Spec) -> Vec<u16> {
    let mut out = vec![1u16, 65535];
    let items = s
        .auths
        .iter()
        .flat_map(|a| a.ports.iter())
        .chain(s.accessible.iter().flat_map(|a| a.ports.iter().flatten()));
    for item in items {
        let (lo, hi) = item.split_once('-').unwrap_or((item, item));
        let (lo, hi): (u16, u16) = (lo.parse().unwrap(), hi.parse().unwrap());
        out.extend([lo, hi, lo.saturating_sub(1).max(1), hi.saturating_add(1)]);
    }
    out.extend(s.upstreams.iter().flat_map(|u| u.nodes.iter().map(|n| n.1)));
    out
}

/// Packets as `explain` builds them (the gateway's own, no flow state), and non-first fragments.
/// A packet's transport, before its destination's family decides ICMP or ICMPv6.
#[derive(Clone, Copy, Debug)]
enum Transport {
    Tcp(u16),
    Udp(u16),
    Echo,
    Fragment(u8),
}

/// Packets as `explain` builds them (the gateway's own, no flow state), and non-first fragments; some
/// aimed at a rule's own address and port (with either protocol).
fn packet(
    addrs: Vec<IpAddr>,
    ports: Vec<u16>,
    aimed: Vec<(IpAddr, u16)>,
) -> impl Strategy<Value = Packet> {
    let special: Vec<IpAddr> = [
        "169.254.169.254",
        "127.0.0.1",
        "224.0.0.5",
        "192.0.2.7",
        "fe80::1",
        "2001:db8::9",
        "ff0e::1",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    let dst = prop_oneof![
        6 => prop::sample::select(addrs),
        3 => host(),
        1 => prop::sample::select(special),
    ];
    let port = prop_oneof![
        3 => prop::sample::select(ports),
        2 => 1u16..210,
        1 => any::<u16>().prop_map(|p| p.max(1)),
    ];
    let transport = prop_oneof![
        4 => port.clone().prop_map(Transport::Tcp),
        4 => port.prop_map(Transport::Udp),
        2 => Just(Transport::Echo),
        1 => prop_oneof![Just(6u8), Just(17)].prop_map(Transport::Fragment),
    ];
    let aimed = (prop::sample::select(aimed), any::<bool>()).prop_map(|((dst, port), tcp)| {
        (
            dst,
            if tcp {
                Transport::Tcp(port)
            } else {
                Transport::Udp(port)
            },
        )
    });
    prop_oneof![4 => (dst, transport), 1 => aimed].prop_map(|(dst, transport)| {
        let src = if dst.is_ipv4() {
            IpAddr::from([172, 19, 30, 5])
        } else {
            IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 5])
        };
        let (l4, fragment) = match transport {
            Transport::Tcp(dport) => (L4::Tcp { dport }, Fragment::None),
            Transport::Udp(dport) => (L4::Udp { dport }, Fragment::None),
            Transport::Echo if dst.is_ipv4() => (L4::Icmp { kind: 8, code: 0 }, Fragment::None),
            Transport::Echo => (L4::Icmpv6 { kind: 128, code: 0 }, Fragment::None),
            Transport::Fragment(proto) => (L4::Other { proto }, Fragment::NonFirst),
        };
        Packet::Ip(IpPacket::new(src, dst, l4, fragment))
    })
}

/// Each authorization's address with its first port, each upstream node's.
fn aimed(s: &Spec) -> Vec<(IpAddr, u16)> {
    let mut out: Vec<(IpAddr, u16)> = s
        .auths
        .iter()
        .map(|a| {
            let first = a.ports[0].split('-').next().unwrap();
            (
                a.address.parse::<IpNet>().unwrap().addr(),
                first.parse().unwrap(),
            )
        })
        .collect();
    out.extend(s.upstreams.iter().flat_map(|u| u.nodes.iter().copied()));
    if out.is_empty() {
        out.push((IpAddr::from(Ipv4Addr::from(V4_BASE)), 80));
    }
    out
}

fn spec_and_packets() -> impl Strategy<Value = (Spec, Vec<Packet>, u16)> {
    spec().prop_flat_map(|s| {
        let addrs = interesting(&s);
        let ports = interesting_ports(&s);
        let aimed = aimed(&s);
        let addrs = if addrs.is_empty() {
            vec![IpAddr::from(Ipv4Addr::from(V4_BASE))]
        } else {
            addrs
        };
        (
            Just(s),
            prop::collection::vec(packet(addrs, ports, aimed), 1..40),
            1u16..=65535,
        )
    })
}

fn facts() -> FlowFacts {
    FlowFacts {
        local_origin: true,
        ..FlowFacts::default()
    }
}

fn describe(c: &policy::Checked) -> String {
    let mut out = String::new();
    for d in &c.diagnostics {
        let _ = writeln!(out, "{}:{}: {} ({:?})", d.line, d.column, d.message, d.fix);
    }
    out
}

fn config() -> Config {
    Config {
        cases: 300,
        source_file: Some(file!()),
        ..Config::default()
    }
}

/// What the generator produced, so that the test can insist it saw every kind of drop and suggestion.
type Seen = RefCell<BTreeMap<&'static str, usize>>;

fn see(seen: &Seen, what: &'static str) {
    *seen.borrow_mut().entry(what).or_default() += 1;
}

/// Checks one spec and its packets; counts what it saw.
fn check_suggestions(
    seen: &Seen,
    spec: &Spec,
    pkts: &[Packet],
    fill_port: u16,
) -> Result<(), TestCaseError> {
    let rendered = spec.render();
    let checked = policy::check_text("p.toml", &rendered.text);
    let Some(p) = &checked.policy else {
        return Err(TestCaseError::fail(format!(
            "the generator made an invalid policy:\n{}\n{}",
            rendered.text,
            describe(&checked)
        )));
    };
    let c = Compiled::new(p);
    let fill = BTreeMap::from([
        ("vpc_id", "vpc-filled".to_owned()),
        ("ports", fill_port.to_string()),
    ]);
    for pkt in pkts {
        let v = verdict(&c, pkt, facts());
        let Some(reason) = v.reason else { continue };
        let Packet::Ip(ip) = pkt else { unreachable!() };
        see(seen, reason.name());
        if v.audit {
            see(seen, "audit");
        }
        let context = || format!("{}\npacket {pkt:?}\nverdict {v:?}", rendered.text);
        let Some(s) = suggestion(p, &c, pkt, &v) else {
            return Err(TestCaseError::fail(format!(
                "no suggestion for a drop\n{}",
                context()
            )));
        };
        prop_assert!(!s.text.is_empty());
        if s.kind == SuggestionKind::Impossible {
            prop_assert!(s.edits.is_empty(), "{:?}\n{}", s, context());
            let zone =
                p.instance.reserved.iter().any(|r| {
                    matches!(r.source, ReservedSource::Zone(_)) && r.cidr.contains(&ip.dst)
                });
            let special = special_purpose(&IpNet::from(ip.dst), false).is_some();
            prop_assert!(zone || special, "impossible for {}?\n{}", ip.dst, context());
            see(
                seen,
                if zone {
                    "impossible: zone"
                } else {
                    "impossible: special-purpose"
                },
            );
            continue;
        }
        prop_assert!(!s.edits.is_empty(), "a change without edits\n{}", context());
        for e in &s.edits {
            prop_assert!(
                s.text.contains(&e.render()),
                "{:?} not in text {:?}",
                e,
                s.text
            );
            see(
                seen,
                match e {
                    Edit::AddAccessible { .. } => "add_accessible",
                    Edit::AddAuthorization { .. } => "add_authorization",
                    Edit::AddPort { .. } => "add_port",
                    Edit::AddProtocol { .. } => "add_protocol",
                    Edit::RemoveReserved { .. } => "remove_reserved",
                },
            );
            match e {
                Edit::AddAccessible { to_fill, .. } | Edit::AddAuthorization { to_fill, .. } => {
                    for f in to_fill {
                        see(
                            seen,
                            if *f == "vpc_id" {
                                "fill: vpc_id"
                            } else {
                                "fill: ports"
                            },
                        );
                    }
                }
                _ => {}
            }
            if let Edit::AddAuthorization { to_fill, name, .. } = e {
                if !to_fill.contains(&"vpc_id") {
                    see(seen, "vpc_id of a covering rule");
                }
                if p.authorizations
                    .iter()
                    .any(|a| name.starts_with(&format!("{}-", a.name)))
                {
                    see(seen, "name made unique");
                }
            }
        }
        let unreserve = s
            .edits
            .iter()
            .filter(|e| matches!(e, Edit::RemoveReserved { .. }))
            .count();
        if unreserve > 0 && unreserve < s.edits.len() {
            see(seen, "remove_reserved and allow");
        }
        let placeholders = s.edits.iter().any(|e| match e {
            Edit::AddAccessible { to_fill, .. } | Edit::AddAuthorization { to_fill, .. } => {
                !to_fill.is_empty()
            }
            _ => false,
        });
        if placeholders {
            // As it is, the change cannot be applied by mistake.
            let raw = spec.apply(&rendered, &s.edits, None).render();
            let rc = policy::check_text("p.toml", &raw.text);
            prop_assert!(
                rc.errors() > 0,
                "an unfilled placeholder checked valid\n{}",
                raw.text
            );
            prop_assert!(
                raw.text.contains(PORT_PLACEHOLDER) || raw.text.contains("<VPC id of"),
                "{}",
                raw.text
            );
        }
        let after = spec.apply(&rendered, &s.edits, Some(&fill)).render();
        let ac = policy::check_text("p.toml", &after.text);
        let Some(ap) = &ac.policy else {
            return Err(TestCaseError::fail(format!(
                "the suggested change makes the policy invalid\n{}\nsuggestion {s:#?}\nafter:\n{}\n{}",
                context(),
                after.text,
                describe(&ac)
            )));
        };
        let av = verdict(&Compiled::new(ap), pkt, facts());
        prop_assert!(
            av.reason.is_none(),
            "the packet still drops: {:?}\n{}\nsuggestion {:#?}\nafter:\n{}",
            av,
            context(),
            s,
            after.text
        );
    }
    Ok(())
}

#[test]
fn every_suggested_change_is_valid_and_allows_the_packet() {
    let seen = Seen::default();
    let mut runner = TestRunner::new(config());
    if let Err(e) = runner.run(&spec_and_packets(), |(spec, pkts, port)| {
        check_suggestions(&seen, &spec, &pkts, port)
    }) {
        panic!("{e}");
    }
    let seen = seen.into_inner();
    eprintln!("seen: {seen:?}");
    for what in [
        "not_authorized",
        "port_not_authorized",
        "reserved_range",
        "fragment_unverified",
        "audit",
        "impossible: zone",
        "impossible: special-purpose",
        "add_accessible",
        "add_authorization",
        "add_port",
        "add_protocol",
        "remove_reserved",
        "remove_reserved and allow",
        "fill: vpc_id",
        "fill: ports",
        "vpc_id of a covering rule",
        "name made unique",
    ] {
        assert!(
            seen.get(what).is_some_and(|&n| n > 0),
            "the generator never produced {what}: {seen:?}"
        );
    }
}

/// `check`'s fix for a backend outside the accessible blocks: a block that leaves every reserved block out
/// and contains the backend; added as suggested, the policy is valid.
#[test]
fn every_accessible_block_check_suggests_is_clear_of_reserved_blocks() {
    let seen = Seen::default();
    let mut runner = TestRunner::new(config());
    let strategy = spec().prop_filter("vpc-integration with backends", |s| {
        !s.dedicated && (!s.auths.is_empty() || !s.upstreams.is_empty())
    });
    if let Err(e) = runner.run(&strategy, |spec| {
        // Without accessible blocks, backends outside the vSwitch block are reported, each with a fix.
        let mut bare = spec.clone();
        bare.accessible.clear();
        let rendered = bare.render();
        let checked = policy::check_text("p.toml", &rendered.text);
        let reserved = spec.reserved_blocks();
        let mut fixed = bare.clone();
        for d in &checked.diagnostics {
            prop_assert!(
                d.severity != policy::diag::Severity::Error
                    || d.message.contains("outside accessible CIDR blocks"),
                "{}",
                describe(&checked)
            );
            let Some(fix) = &d.fix else { continue };
            let Some(at) = fix.find("cidr = \"") else {
                continue;
            };
            see(&seen, "suggested block");
            let block: IpNet = fix[at + 8..fix.len() - 1].parse().unwrap();
            prop_assert!(
                !reserved.iter().any(|r| overlaps(&block, r)),
                "{block} overlaps a reserved block\n{}",
                rendered.text
            );
            if block.prefix_len() > if block.addr().is_ipv4() { 24 } else { 64 } {
                see(&seen, "narrowed");
            }
            fixed.accessible.push(AccessibleSpec {
                cidr: block.to_string(),
                ports: None,
                protocols: None,
            });
        }
        let after = policy::check_text("p.toml", &fixed.render().text);
        prop_assert_eq!(after.errors(), 0, "{}", describe(&after));
        Ok(())
    }) {
        panic!("{e}");
    }
    let seen = seen.into_inner();
    assert!(seen.get("narrowed").is_some_and(|&n| n > 0), "{seen:?}");
}
