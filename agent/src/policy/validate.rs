//! Checks across fields: reserved blocks, accessible blocks, VPC ids, public backends.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{
    diag::{Diags, Severity},
    model::*,
    source::Pos,
};

/// Whether `net` lies entirely inside the union of `blocks`.
pub fn covered_by(net: &IpNet, blocks: &[IpNet]) -> bool {
    if blocks.iter().any(|b| b.contains(net)) {
        return true;
    }
    // Split and try the halves, as long as some block is strictly inside `net`.
    if !blocks
        .iter()
        .any(|b| net.contains(b) && b.prefix_len() > net.prefix_len())
    {
        return false;
    }
    match net.subnets(net.prefix_len() + 1) {
        Ok(halves) => halves.into_iter().all(|h| covered_by(&h, blocks)),
        Err(_) => false,
    }
}

pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Internal (VPC) addresses: RFC 1918, the shared/CGNAT block providers use internally, IPv6 ULA.
pub fn is_internal(net: &IpNet) -> bool {
    const INTERNAL: [&str; 5] = [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "fc00::/7",
    ];
    INTERNAL
        .iter()
        .any(|b| b.parse::<IpNet>().is_ok_and(|b| b.contains(net)))
}

/// Special-purpose ranges (RFC 6890 registries) that are never a VPC backend, with what they are.
pub const SPECIAL_PURPOSE: [(&str, &str); 16] = [
    ("0.0.0.0/8", "\"this network\" (0.0.0.0/8)"),
    ("127.0.0.0/8", "loopback (127.0.0.0/8)"),
    (
        "169.254.0.0/16",
        "link-local (169.254.0.0/16, incl. the cloud metadata service 169.254.169.254)",
    ),
    ("192.0.0.0/24", "IETF protocol assignments (192.0.0.0/24)"),
    ("192.0.2.0/24", "documentation (TEST-NET-1, 192.0.2.0/24)"),
    ("198.18.0.0/15", "benchmarking (198.18.0.0/15)"),
    (
        "198.51.100.0/24",
        "documentation (TEST-NET-2, 198.51.100.0/24)",
    ),
    (
        "203.0.113.0/24",
        "documentation (TEST-NET-3, 203.0.113.0/24)",
    ),
    ("224.0.0.0/4", "multicast (224.0.0.0/4)"),
    (
        "240.0.0.0/4",
        "reserved and broadcast (240.0.0.0/4, incl. 255.255.255.255)",
    ),
    ("::/127", "the unspecified and loopback addresses (::, ::1)"),
    ("::ffff:0:0/96", "IPv4-mapped (::ffff:0:0/96)"),
    ("100::/64", "discard-only (100::/64)"),
    ("2001:db8::/32", "documentation (2001:db8::/32)"),
    ("fe80::/10", "link-local (fe80::/10)"),
    ("ff00::/8", "multicast (ff00::/8)"),
];

/// The special-purpose range `net` lies inside (or, with `overlapping`, overlaps), described.
pub fn special_purpose(net: &IpNet, overlapping: bool) -> Option<&'static str> {
    SPECIAL_PURPOSE.iter().find_map(|(block, what)| {
        let b: IpNet = block.parse().expect("a valid block");
        let hit = if overlapping {
            overlaps(net, &b)
        } else {
            b.contains(net)
        };
        hit.then_some(*what)
    })
}

/// A backend to check: an authorization's address or an upstream node.
struct Backend<'a> {
    /// `authorization `orders-slb`` / `node 10.0.3.8:8080 of upstream `orders_pool``
    what: String,
    vpc_id: &'a str,
    net: IpNet,
    pos: Pos,
}

fn backends(p: &Policy) -> Vec<Backend<'_>> {
    let mut out: Vec<Backend> = p
        .authorizations
        .iter()
        .map(|a| Backend {
            what: format!("authorization `{}`", a.name),
            vpc_id: &a.vpc_id,
            net: a.address,
            pos: a.pos,
        })
        .collect();
    for u in &p.upstreams {
        for n in &u.nodes {
            out.push(Backend {
                what: format!(
                    "node {} of upstream `{}`",
                    std::net::SocketAddr::new(n.address, n.port),
                    u.name
                ),
                vpc_id: &u.vpc_id,
                net: IpNet::from(n.address),
                pos: n.pos,
            });
        }
    }
    out
}

fn show(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

/// Reserved blocks as merged address intervals per family, so that whether a block overlaps any of them
/// costs a binary search, however many there are.
struct ReservedSpans {
    v4: Vec<(u128, u128)>,
    v6: Vec<(u128, u128)>,
}

fn span(net: &IpNet) -> (u128, u128) {
    match net {
        IpNet::V4(n) => (
            u32::from(n.network()).into(),
            u32::from(n.broadcast()).into(),
        ),
        IpNet::V6(n) => (n.network().into(), n.broadcast().into()),
    }
}

impl ReservedSpans {
    fn new(reserved: &[Reserved]) -> Self {
        let merged = |v4: bool| {
            let mut spans: Vec<(u128, u128)> = reserved
                .iter()
                .filter(|r| r.cidr.addr().is_ipv4() == v4)
                .map(|r| span(&r.cidr))
                .collect();
            spans.sort_unstable();
            let mut out: Vec<(u128, u128)> = vec![];
            for (lo, hi) in spans {
                match out.last_mut() {
                    Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
                    _ => out.push((lo, hi)),
                }
            }
            out
        };
        Self {
            v4: merged(true),
            v6: merged(false),
        }
    }

    /// Whether `net` overlaps a reserved block.
    fn overlaps(&self, net: &IpNet) -> bool {
        let spans = if net.addr().is_ipv4() {
            &self.v4
        } else {
            &self.v6
        };
        let (lo, hi) = span(net);
        let i = spans.partition_point(|&(_, end)| end < lo);
        spans.get(i).is_some_and(|&(start, _)| start <= hi)
    }
}

/// A block to suggest for an address outside the accessible blocks: its /24 (IPv4) or /64 (IPv6), narrowed
/// (down to the backend itself) until it leaves every reserved block out; None when the backend itself
/// overlaps one, which no accessible block can help.
fn suggest_block(net: &IpNet, reserved: &ReservedSpans) -> Option<IpNet> {
    let widest = match net.addr() {
        IpAddr::V4(_) => 24,
        IpAddr::V6(_) => 64,
    }
    .min(net.prefix_len());
    (widest..=net.prefix_len())
        .map(|len| IpNet::new(net.addr(), len).map_or(*net, |n| n.trunc()))
        .find(|block| !reserved.overlaps(block))
}

/// The fix for a backend outside the accessible blocks.
fn outside_fix(net: &IpNet, reserved: &ReservedSpans) -> String {
    match suggest_block(net, reserved) {
        Some(block) => {
            format!("add an accessible block that contains it: [[accessible]] cidr = \"{block}\"")
        }
        None => format!(
            "no accessible block can make {} reachable while it overlaps a reserved block: move the backend to another block of the VPC",
            show(net)
        ),
    }
}

/// Checks `policy`'s authorizations and upstream nodes against `instance` (and the accessible blocks
/// `accessible`), reporting into `d` (whose source is the file the backends come from).
/// `accessible_known`: false when some accessible block failed to parse, so "outside the accessible
/// blocks" cannot be decided (and is not reported).
pub fn check_backends(
    d: &mut Diags,
    policy: &Policy,
    instance: &Instance,
    accessible: &[IpNet],
    accessible_known: bool,
) {
    let mut reserved_spans: Option<ReservedSpans> = None;
    for b in backends(policy) {
        for r in &instance.reserved {
            if overlaps(&b.net, &r.cidr) {
                d.push_at(
                    Severity::Error,
                    b.pos,
                    format!("{}: backend {} is inside reserved block {} ({})", b.what, show(&b.net), r.cidr, r.source),
                    Some("the gateway can never reach a reserved block: move the backend to another block of the VPC".into()),
                );
            }
        }
        if let Some(range) = special_purpose(&b.net, false) {
            d.push_at(
                Severity::Error,
                b.pos,
                format!(
                    "{}: backend {} is a special-purpose address: {range}",
                    b.what,
                    show(&b.net)
                ),
                Some("a VPC backend has an internal unicast address: use the backend's private address in the VPC".into()),
            );
        } else if let Some(range) = special_purpose(&b.net, true) {
            d.push_at(
                Severity::Warning,
                b.pos,
                format!(
                    "{}: block {} covers a special-purpose range: {range}",
                    b.what,
                    show(&b.net)
                ),
                Some("narrow the block to the backends' addresses".into()),
            );
        } else if !is_internal(&b.net) {
            d.push_at(
                Severity::Warning,
                b.pos,
                format!(
                    "{}: backend {} is a public address, but VPC backends are internal",
                    b.what,
                    show(&b.net)
                ),
                Some("reach public backends as plain HTTP backends, not through VPC access".into()),
            );
        }
        if instance.kind == Kind::VpcIntegration {
            if b.vpc_id != instance.vpc_id {
                d.push_at(
                    Severity::Error,
                    b.pos,
                    format!("{} is in VPC {}, but instance {} is attached to VPC {}", b.what, b.vpc_id, instance.name, instance.vpc_id),
                    Some(format!("a VPC integration instance reaches only its own VPC: set vpc_id = \"{}\", or use a dedicated instance", instance.vpc_id)),
                );
            }
            if accessible_known && !covered_by(&b.net, accessible) {
                let blocks: Vec<String> = accessible.iter().map(ToString::to_string).collect();
                d.push_at(
                    Severity::Error,
                    b.pos,
                    format!("instance cannot connect to the backend {}: outside accessible CIDR blocks {}", show(&b.net), blocks.join(", ")),
                    Some(outside_fix(&b.net, reserved_spans.get_or_insert_with(|| ReservedSpans::new(&instance.reserved)))),
                );
            }
        }
    }
}

/// Every cross-field check of one policy (`accessible_known` as for [`check_backends`]).
pub fn validate(d: &mut Diags, p: &Policy, accessible_known: bool) {
    let i = &p.instance;
    if let Some(vswitch) = &i.vswitch_cidr {
        for r in &i.reserved {
            if overlaps(vswitch, &r.cidr) {
                d.push_at(
                    Severity::Error,
                    i.vswitch_pos,
                    format!("vswitch_cidr {vswitch} overlaps reserved block {} ({})", r.cidr, r.source),
                    Some("the instance's vSwitch must not overlap the blocks the gateway reserves: use a vSwitch in another block".into()),
                );
            }
        }
        if let (Some(egress), Kind::VpcIntegration) = (i.egress_ip, i.kind)
            && !vswitch.contains(&egress)
        {
            d.push_at(
                Severity::Warning,
                i.egress_pos,
                format!("egress_ip {egress} is outside vswitch_cidr {vswitch}"),
                Some("a VPC integration instance's egress IP is an address of its vSwitch: check both".into()),
            );
        }
    }
    for a in &p.accessible {
        // What the block opens beyond the VPC.
        if a.cidr.prefix_len() == 0 {
            d.push_at(
                Severity::Warning,
                a.pos,
                format!(
                    "accessible block {} opens the whole {} address space, special-purpose ranges and the internet included",
                    a.cidr,
                    if a.cidr.addr().is_ipv4() { "IPv4" } else { "IPv6" }
                ),
                Some("list the VPC's blocks instead".into()),
            );
        } else if let Some(range) = special_purpose(&a.cidr, true) {
            d.push_at(
                Severity::Warning,
                a.pos,
                format!(
                    "accessible block {} covers a special-purpose range: {range}",
                    a.cidr
                ),
                Some("narrow it to the VPC's blocks".into()),
            );
        }
        if i.kind == Kind::Dedicated {
            d.push_at(
                Severity::Error,
                a.pos,
                format!("[[accessible]] {} on a dedicated instance: accessible blocks belong to vpc-integration instances", a.cidr),
                Some("remove it and authorize the backends with [[authorization]], or set kind = \"vpc-integration\"".into()),
            );
        }
        for r in &i.reserved {
            if overlaps(&a.cidr, &r.cidr) {
                d.push_at(
                    Severity::Warning,
                    a.pos,
                    format!("accessible block {} overlaps reserved block {} ({}): that part stays unreachable", a.cidr, r.cidr, r.source),
                    Some("narrow the accessible block so it leaves the reserved block out".into()),
                );
            }
        }
    }
    let accessible: Vec<IpNet> = p.accessible_blocks().collect();
    check_backends(d, p, i, &accessible, accessible_known);
}
