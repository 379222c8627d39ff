//! Policies of any size for the benchmark: authorizations of mixed prefix lengths, port shapes and
//! protocols, half IPv4 and half IPv6, in disjoint regions (so `n` rules compile to `n` address entries)
//! that stay clear of the lab's 10.77.0.0/24 and fd77::/64.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, bail};
use ipnet::IpNet;
use vpcgate::policy::{
    Policy, check_text,
    model::{Authorization, InstanceType, Proto},
    ports::PortSet,
    source::Pos,
};

/// A port shape: the ranges a rule allows, one port inside them and one outside.
struct Shape {
    ranges: &'static [(u16, u16)],
    inside: u16,
    outside: u16,
}

const SHAPES: &[Shape] = &[
    Shape {
        ranges: &[(80, 80)],
        inside: 80,
        outside: 81,
    },
    Shape {
        ranges: &[(443, 443)],
        inside: 443,
        outside: 444,
    },
    Shape {
        ranges: &[(8000, 8100)],
        inside: 8042,
        outside: 8101,
    },
    Shape {
        ranges: &[(80, 80), (443, 443), (8080, 8090)],
        inside: 8085,
        outside: 8091,
    },
    Shape {
        ranges: &[(1024, 65535)],
        inside: 40000,
        outside: 1023,
    },
];

/// IPv4 rules live in 10.128.0.0/9, one /28 each; IPv6 rules in fd00:0:0:<index>::/64.
const V4_REGION: u32 = 0x0a80_0000;
const V4_SLOT_BITS: u32 = 4;
pub const V4_MAX_RULES: usize = 1 << (23 - V4_SLOT_BITS);

/// One generated authorization, with what a packet needs to hit it.
#[derive(Clone, Debug)]
pub struct Rule {
    pub net: IpNet,
    pub proto: Proto,
    pub ranges: &'static [(u16, u16)],
    /// A port the rule allows and one it does not.
    pub inside: u16,
    pub outside: u16,
    /// The one address inside the prefix that benchmark packets go to (exact-match peers such as
    /// xdp-filter can then hold exactly one entry per rule).
    pub host: IpAddr,
}

impl Rule {
    /// An address inside the rule's prefix, drawn with `rng`.
    pub fn address(&self, rng: &mut fastrand::Rng) -> IpAddr {
        match self.net {
            IpNet::V4(n) => {
                let host = 32 - u32::from(n.prefix_len());
                let off = if host == 0 {
                    0
                } else {
                    rng.u32(0..(1 << host))
                };
                IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | off))
            }
            IpNet::V6(n) => {
                let host = 128 - u32::from(n.prefix_len());
                let off = if host == 0 {
                    0
                } else {
                    rng.u128(..) & ((1u128 << host) - 1)
                };
                IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | off))
            }
        }
    }

    pub fn ports(&self) -> PortSet {
        PortSet::from_ranges(self.ranges.to_vec())
    }
}

/// `n` rules drawn from `seed`: even indexes IPv4, odd IPv6.
pub fn generate(n: usize, seed: u64) -> anyhow::Result<Vec<Rule>> {
    if n.div_ceil(2) > V4_MAX_RULES {
        bail!("{n} rules: the IPv4 region holds {V4_MAX_RULES} (half the rules are IPv4)");
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    Ok((0..n)
        .map(|i| {
            let slot = (i / 2) as u32;
            let net = if i % 2 == 0 {
                let len = rng.u8(28..=32);
                let base = V4_REGION | (slot << V4_SLOT_BITS);
                IpNet::new(IpAddr::V4(Ipv4Addr::from(base)), len).expect("valid prefix")
            } else {
                let len = [64u8, 80, 96, 112, 120, 128][rng.usize(0..6)];
                let base = (0xfd00u128 << 112) | (u128::from(slot) << 64);
                IpNet::new(IpAddr::V6(Ipv6Addr::from(base)), len).expect("valid prefix")
            };
            let shape = &SHAPES[rng.usize(0..SHAPES.len())];
            let mut r = Rule {
                net,
                proto: if rng.bool() { Proto::Tcp } else { Proto::Udp },
                ranges: shape.ranges,
                inside: shape.inside,
                outside: shape.outside,
                host: net.addr(),
            };
            r.host = r.address(&mut rng);
            r
        })
        .collect())
}

/// The `[instance]` table of every benchmark policy.
pub fn instance_toml(name: &str, interface: &str) -> String {
    format!(
        "[instance]\nname = \"{name}\"\nkind = \"dedicated\"\nvpc_id = \"vpc-bench\"\ninterface = \"{interface}\"\n"
    )
}

/// The rules as `[[authorization]]` tables.
pub fn authorizations_toml(rules: &[Rule]) -> String {
    let mut out = String::with_capacity(rules.len() * 110);
    for (i, r) in rules.iter().enumerate() {
        let ports: Vec<String> = r
            .ranges
            .iter()
            .map(|&(lo, hi)| {
                if lo == hi {
                    format!("\"{lo}\"")
                } else {
                    format!("\"{lo}-{hi}\"")
                }
            })
            .collect();
        out.push_str(&format!(
            "\n[[authorization]]\nname = \"r{i}\"\nvpc_id = \"vpc-bench\"\naddress = \"{}\"\nports = [{}]\nprotocol = \"{}\"\n",
            r.net,
            ports.join(", "),
            r.proto.name()
        ));
    }
    out
}

/// The rules as a parsed policy (without going through TOML: a million rules parse slowly, and the
/// per-packet benchmark measures the datapath, not the parser).
pub fn policy(rules: &[Rule], name: &str, interface: &str) -> anyhow::Result<Policy> {
    let text = instance_toml(name, interface);
    let mut p = check_text("bench.toml", &text)
        .policy
        .context("the benchmark's [instance] table is invalid")?;
    p.authorizations = rules
        .iter()
        .enumerate()
        .map(|(i, r)| Authorization {
            name: format!("r{i}"),
            vpc_id: "vpc-bench".into(),
            instance_id: None,
            instance_type: InstanceType::Ip,
            address: r.net,
            ports: r.ports(),
            protocol: r.proto,
            pos: Pos::default(),
        })
        .collect();
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_disjoint_mixed_and_their_toml_is_a_valid_policy_with_the_same_rules() {
        let rules = generate(200, 7).unwrap();
        assert_eq!(rules.iter().filter(|r| r.net.addr().is_ipv4()).count(), 100);
        for (i, a) in rules.iter().enumerate() {
            for b in &rules[i + 1..] {
                assert!(
                    !a.net.contains(&b.net) && !b.net.contains(&a.net),
                    "{} {}",
                    a.net,
                    b.net
                );
            }
            let mut rng = fastrand::Rng::with_seed(i as u64);
            assert!(a.net.contains(&a.address(&mut rng)) && a.net.contains(&a.host));
            assert!(a.ports().contains(a.inside) && !a.ports().contains(a.outside));
            assert!(
                !IpNet::from(ipnet::Ipv4Net::new(Ipv4Addr::new(10, 77, 0, 0), 24).unwrap())
                    .contains(&a.net)
            );
        }
        let text = instance_toml("b", "eth1") + &authorizations_toml(&rules);
        let checked = check_text("b.toml", &text);
        let parsed = checked.policy.expect("valid policy");
        let built = policy(&rules, "b", "eth1").unwrap();
        assert_eq!(parsed.authorizations.len(), built.authorizations.len());
        for (p, b) in parsed.authorizations.iter().zip(&built.authorizations) {
            assert_eq!(
                (p.address, &p.ports, p.protocol),
                (b.address, &b.ports, b.protocol)
            );
        }
    }

    #[test]
    fn too_many_rules_for_the_ipv4_region_is_an_error() {
        assert!(generate(2 * V4_MAX_RULES + 2, 1).is_err());
        assert!(generate(2 * V4_MAX_RULES, 1).is_ok());
    }
}
