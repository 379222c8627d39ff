//! Checks across fields: reserved blocks, accessible blocks, VPC ids, public backends.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{
    diag::{Diags, Severity},
    model::*,
    source::Pos,
};

/// The union of some blocks as merged address ranges per family: whether a block lies inside the union
/// is one binary search, however many blocks there are.
pub struct Union {
    /// (IPv6, first, last), sorted, disjoint, neighbours merged.
    runs: Vec<(bool, u128, u128)>,
}

impl Union {
    pub fn new(blocks: &[IpNet]) -> Self {
        let mut spans: Vec<(bool, u128, u128)> = blocks.iter().map(span).collect();
        spans.sort_unstable();
        let mut runs: Vec<(bool, u128, u128)> = vec![];
        for (v6, first, last) in spans {
            match runs.last_mut() {
                Some(r) if r.0 == v6 && r.2.checked_add(1).is_none_or(|next| first <= next) => {
                    r.2 = r.2.max(last)
                }
                _ => runs.push((v6, first, last)),
            }
        }
        Self { runs }
    }

    /// Whether `net` lies entirely inside the union.
    pub fn covers(&self, net: &IpNet) -> bool {
        let (v6, first, last) = span(net);
        let i = self.runs.partition_point(|&(f, _, l)| (f, l) < (v6, first));
        self.runs
            .get(i)
            .is_some_and(|&(f, lo, hi)| f == v6 && lo <= first && last <= hi)
    }
}

/// Whether `net` lies entirely inside the union of `blocks`.
pub fn covered_by(net: &IpNet, blocks: &[IpNet]) -> bool {
    Union::new(blocks).covers(net)
}

pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn span(net: &IpNet) -> (bool, u128, u128) {
    match net.trunc() {
        IpNet::V4(n) => (
            false,
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
        ),
        IpNet::V6(n) => (true, u128::from(n.network()), u128::from(n.broadcast())),
    }
}

/// Reserved blocks indexed for overlap queries: O(prefix length + log n) per query (plus the blocks it
/// names) instead of a scan, so checking every backend and block against 200,000 reserved blocks stays
/// O(n log n). A block listed more than once (by the zone and explicitly) counts once, as in the kernel,
/// attributed to its first listing.
pub struct ReservedIndex<'a> {
    reserved: &'a [Reserved],
    /// Distinct blocks: (IPv6, first address, prefix length, first listing), sorted.
    starts: Vec<(bool, u128, u8, usize)>,
    /// Distinct block -> its first listing.
    by_block: std::collections::HashMap<IpNet, usize>,
    /// The distinct prefix lengths of the blocks, per family (IPv4, IPv6), ascending.
    lengths: [Vec<u8>; 2],
}

/// The reserved blocks overlapping a value: the first few, and how many in all.
pub struct Overlaps<'a> {
    /// Those containing it (widest first), then those inside it (by address), at most the limit asked.
    pub named: Vec<&'a Reserved>,
    pub total: usize,
}

impl<'a> ReservedIndex<'a> {
    pub fn new(reserved: &'a [Reserved]) -> Self {
        let mut by_block: std::collections::HashMap<IpNet, usize> = Default::default();
        for (i, r) in reserved.iter().enumerate() {
            by_block.entry(r.cidr.trunc()).or_insert(i);
        }
        let mut starts: Vec<(bool, u128, u8, usize)> = by_block
            .iter()
            .map(|(n, &i)| {
                let (v6, first, _) = span(n);
                (v6, first, n.prefix_len(), i)
            })
            .collect();
        starts.sort_unstable();
        let mut lengths: [Vec<u8>; 2] = Default::default();
        for n in by_block.keys() {
            lengths[usize::from(matches!(n, IpNet::V6(_)))].push(n.prefix_len());
        }
        for l in &mut lengths {
            l.sort_unstable();
            l.dedup();
        }
        Self {
            reserved,
            starts,
            by_block,
            lengths,
        }
    }

    /// Distinct blocks strictly containing `net` (found by its shorter prefixes of the lengths blocks
    /// have), widest first.
    fn containing(&self, net: &IpNet) -> Vec<usize> {
        self.lengths[usize::from(matches!(net, IpNet::V6(_)))]
            .iter()
            .take_while(|&&len| len < net.prefix_len())
            .filter_map(|&len| IpNet::new(net.addr(), len).ok())
            .filter_map(|n| self.by_block.get(&n.trunc()).copied())
            .collect()
    }

    /// The range of `starts` holding the distinct blocks inside `net` (itself included).
    fn inside(&self, net: &IpNet) -> std::ops::Range<usize> {
        let (v6, first, last) = span(net);
        let len = net.prefix_len();
        let lo = self
            .starts
            .partition_point(|&(f, a, l, _)| (f, a, l) < (v6, first, len));
        let hi = self
            .starts
            .partition_point(|&(f, a, _, _)| (f, a) <= (v6, last));
        lo..hi.max(lo)
    }

    /// Whether `net` overlaps some reserved block.
    pub fn overlaps_any(&self, net: &IpNet) -> bool {
        !self.inside(net).is_empty() || !self.containing(net).is_empty()
    }

    /// The reserved blocks overlapping `net`: at most `limit` named, and the total.
    pub fn overlapping(&self, net: &IpNet, limit: usize) -> Overlaps<'a> {
        let containing = self.containing(net);
        let inside = self.inside(net);
        let total = containing.len() + inside.len();
        let named = containing
            .into_iter()
            .chain(self.starts[inside].iter().map(|s| s.3))
            .take(limit)
            .map(|i| &self.reserved[i])
            .collect();
        Overlaps { named, total }
    }
}

/// At most this many accessible blocks are listed in a message.
const NAMED_BLOCKS: usize = 5;

/// At most this many overlapping reserved blocks are named one by one for one value; the rest are
/// counted in one more diagnostic.
const NAMED_OVERLAPS: usize = 3;

/// Reports `what` (at `pos`) overlapping the reserved blocks `index` finds for `net`, via `one`: the
/// first few by name, the rest counted.
fn report_overlaps(
    d: &mut Diags,
    severity: Severity,
    pos: Pos,
    (what, net): (&str, &IpNet),
    index: &ReservedIndex,
    one: impl Fn(&Reserved) -> (String, String),
) {
    let hits = index.overlapping(net, NAMED_OVERLAPS + 1);
    for r in hits.named.iter().take(NAMED_OVERLAPS) {
        let (message, fix) = one(r);
        d.push_at(severity, pos, message, Some(fix));
    }
    if let Some(next) = hits.named.get(NAMED_OVERLAPS) {
        let (_, fix) = one(next);
        d.push_at(
            severity,
            pos,
            format!(
                "{what} overlaps {} more reserved blocks (the next: {})",
                hits.total - NAMED_OVERLAPS,
                next.cidr
            ),
            Some(fix),
        );
    }
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

/// A block to suggest for an address outside the accessible blocks: its /24 (IPv4) or /64 (IPv6), narrowed
/// (down to the backend itself) until it leaves every reserved block out; None when the backend itself
/// overlaps one, which no accessible block can help.
fn suggest_block(net: &IpNet, reserved: &ReservedIndex) -> Option<IpNet> {
    let widest = match net.addr() {
        IpAddr::V4(_) => 24,
        IpAddr::V6(_) => 64,
    }
    .min(net.prefix_len());
    (widest..=net.prefix_len())
        .map(|len| IpNet::new(net.addr(), len).map_or(*net, |n| n.trunc()))
        .find(|block| !reserved.overlaps_any(block))
}

/// The fix for a backend outside the accessible blocks.
fn outside_fix(net: &IpNet, reserved: &ReservedIndex) -> String {
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
    let reserved = ReservedIndex::new(&instance.reserved);
    let reachable = Union::new(accessible);
    // The blocks, as the provider's message lists them: the first few and how many more.
    let listed = {
        let mut shown: Vec<String> = accessible
            .iter()
            .take(NAMED_BLOCKS)
            .map(ToString::to_string)
            .collect();
        if accessible.len() > NAMED_BLOCKS {
            shown.push(format!("and {} more", accessible.len() - NAMED_BLOCKS));
        }
        shown.join(", ")
    };
    for b in backends(policy) {
        report_overlaps(
            d,
            Severity::Error,
            b.pos,
            (&format!("{}: backend {}", b.what, show(&b.net)), &b.net),
            &reserved,
            |r| {
                (
            format!("{}: backend {} is inside reserved block {} ({})", b.what, show(&b.net), r.cidr, r.source),
            "the gateway can never reach a reserved block: move the backend to another block of the VPC".into(),
        )
            },
        );
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
            // An instance VPC id that is no VPC id is already an error: comparing with it says nothing.
            if b.vpc_id != instance.vpc_id && super::parse::is_vpc_id(&instance.vpc_id) {
                d.push_at(
                    Severity::Error,
                    b.pos,
                    format!("{} is in VPC {}, but instance {} is attached to VPC {}", b.what, b.vpc_id, instance.name, instance.vpc_id),
                    Some(format!("a VPC integration instance reaches only its own VPC: set vpc_id = \"{}\", or use a dedicated instance", instance.vpc_id)),
                );
            }
            if accessible_known && !reachable.covers(&b.net) {
                d.push_at(
                    Severity::Error,
                    b.pos,
                    format!("instance cannot connect to the backend {}: outside accessible CIDR blocks {}", show(&b.net), listed),
                    Some(outside_fix(&b.net, &reserved)),
                );
            }
        }
    }
}

/// Every cross-field check of one policy (`accessible_known` as for [`check_backends`]).
pub fn validate(d: &mut Diags, p: &Policy, accessible_known: bool) {
    let i = &p.instance;
    let reserved = ReservedIndex::new(&i.reserved);
    if let Some(vswitch) = &i.vswitch_cidr {
        report_overlaps(
            d,
            Severity::Error,
            i.vswitch_pos,
            (&format!("vswitch_cidr {vswitch}"), vswitch),
            &reserved,
            |r| {
                (
            format!("vswitch_cidr {vswitch} overlaps reserved block {} ({})", r.cidr, r.source),
            "the instance's vSwitch must not overlap the blocks the gateway reserves: use a vSwitch in another block".into(),
        )
            },
        );
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
        report_overlaps(
            d,
            Severity::Warning,
            a.pos,
            (&format!("accessible block {}", a.cidr), &a.cidr),
            &reserved,
            |r| {
                (
                    format!(
                        "accessible block {} overlaps reserved block {} ({}): that part stays unreachable",
                        a.cidr, r.cidr, r.source
                    ),
                    "narrow the accessible block so it leaves the reserved block out".into(),
                )
            },
        );
    }
    let accessible: Vec<IpNet> = p.accessible_blocks().collect();
    check_backends(d, p, i, &accessible, accessible_known);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (0u32..256, 20u8..=32).prop_map(|(h, len)| IpNet::new(
                IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 | (h << 4))),
                len
            )
            .unwrap()
            .trunc()),
            (0u128..256, 116u8..=128).prop_map(|(h, len)| IpNet::new(
                IpAddr::from(std::net::Ipv6Addr::from((0xfd00u128 << 112) | (h << 4))),
                len
            )
            .unwrap()
            .trunc()),
        ]
    }

    proptest! {
        /// The index finds exactly the distinct blocks a scan finds (each at its first listing),
        /// containing ones widest first then the rest by address, and a limit keeps a prefix of them.
        #[test]
        fn reserved_index_finds_what_a_scan_finds(
            blocks in prop::collection::vec(net(), 0..40),
            queries in prop::collection::vec(net(), 1..20),
            limit in 0usize..6,
        ) {
            let reserved: Vec<Reserved> = blocks
                .into_iter()
                .map(|cidr| Reserved { cidr, source: ReservedSource::Explicit, pos: Pos::default() })
                .collect();
            let index = ReservedIndex::new(&reserved);
            for q in &queries {
                let mut scan: Vec<(bool, u128, u8, usize)> = vec![];
                for (i, r) in reserved.iter().enumerate() {
                    if overlaps(q, &r.cidr) && !scan.iter().any(|s| reserved[s.3].cidr == r.cidr) {
                        let (_, first, _) = span(&r.cidr);
                        // Containing ones first (widest first), then the rest by address.
                        let inside = r.cidr.prefix_len() >= q.prefix_len();
                        scan.push((inside, if inside { first } else { 0 }, r.cidr.prefix_len(), i));
                    }
                }
                scan.sort_unstable();
                let want: Vec<*const Reserved> = scan.iter().map(|s| &reserved[s.3] as *const _).collect();
                let all = index.overlapping(q, usize::MAX);
                prop_assert_eq!(all.total, want.len(), "query {}", q);
                let found: Vec<*const Reserved> = all.named.into_iter().map(|r| r as *const _).collect();
                prop_assert_eq!(&found, &want, "query {}", q);
                let some = index.overlapping(q, limit);
                prop_assert_eq!(some.total, want.len());
                let found: Vec<*const Reserved> = some.named.into_iter().map(|r| r as *const _).collect();
                prop_assert_eq!(&found[..], &want[..limit.min(want.len())]);
                prop_assert_eq!(index.overlaps_any(q), !want.is_empty(), "query {}", q);
            }
        }

        /// The union of blocks covers exactly what splitting into single addresses would say.
        #[test]
        fn union_covers_what_its_blocks_cover(
            blocks in prop::collection::vec(net(), 0..30),
            queries in prop::collection::vec(net(), 1..20),
        ) {
            let union = Union::new(&blocks);
            for q in &queries {
                // A query is covered when each of its addresses is in some block: check every address
                // of a query of at most 4096 of them.
                let (_, first, last) = span(q);
                prop_assume!(last - first < 4096);
                let every = (first..=last).all(|a| blocks.iter().any(|b| {
                    let (v6, lo, hi) = span(b);
                    v6 == q.addr().is_ipv6() && lo <= a && a <= hi
                }));
                prop_assert_eq!(union.covers(q), every, "query {}", q);
            }
        }
    }
}
