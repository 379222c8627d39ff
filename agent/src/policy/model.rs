//! The policy, typed and validated. Every rule keeps its line in the file for attribution.

use std::{fmt, net::IpAddr};

use ipnet::IpNet;
use serde::Serialize;

use super::{ports::PortSet, source::Pos};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A VPC integration instance: its egress IP is inside the VPC; it reaches the vSwitch block and the
    /// accessible blocks added to it.
    VpcIntegration,
    /// A conventional dedicated instance: reaches only what authorizations and upstreams name, possibly in
    /// several VPCs.
    Dedicated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Enforce,
    /// Evaluate and count, but pass everything.
    Audit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub const ALL: [Proto; 2] = [Proto::Tcp, Proto::Udp];

    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceType {
    Ecs,
    Clb,
    Nlb,
    Ip,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    Http,
    Https,
}

/// Where a reserved block comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "source", content = "name")]
pub enum ReservedSource {
    /// The provider's table for a zone.
    Zone(String),
    /// `reserved_cidrs` in the policy.
    Explicit,
}

impl fmt::Display for ReservedSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReservedSource::Zone(z) => write!(f, "reserved for zone {z}"),
            ReservedSource::Explicit => f.write_str("listed in reserved_cidrs"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Reserved {
    pub cidr: IpNet,
    pub source: ReservedSource,
    /// Position of `zone` or of the `reserved_cidrs` entry.
    pub pos: Pos,
}

/// Traffic the host itself needs whatever the policy says (DESIGN.md verdict rule 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostEssential {
    /// DHCPv4 client traffic (UDP 68 -> 67) and DHCPv6 client traffic (UDP 546 -> 547).
    Dhcp,
    /// MLDv2 listener reports (ICMPv6 143 to ff02::16, hop limit 1).
    Mld,
}

impl HostEssential {
    pub const ALL: [HostEssential; 2] = [HostEssential::Dhcp, HostEssential::Mld];

    pub fn name(self) -> &'static str {
        match self {
            HostEssential::Dhcp => "dhcp",
            HostEssential::Mld => "mld",
        }
    }

    /// What it lets pass, for `explain` and `status`.
    pub fn describe(self) -> &'static str {
        match self {
            HostEssential::Dhcp => {
                "DHCPv4 client traffic (UDP 68 -> 67) and DHCPv6 client traffic (UDP 546 -> 547)"
            }
            HostEssential::Mld => "MLDv2 listener reports (ICMPv6 143 to ff02::16, hop limit 1)",
        }
    }
}

/// Idle timeouts of flows peers initiated toward the gateway (`[instance] flow_timeouts`), in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct FlowTimeouts {
    /// Established TCP.
    pub tcp: u32,
    /// TCP after a FIN or RST, and half-open TCP (SYN seen, not yet acknowledged).
    pub tcp_closing: u32,
    /// UDP and ICMP echo.
    pub udp: u32,
}

impl Default for FlowTimeouts {
    fn default() -> Self {
        Self {
            tcp: 3600,
            tcp_closing: 10,
            udp: 60,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Instance {
    pub name: String,
    pub kind: Kind,
    pub vpc_id: String,
    pub interface: String,
    pub egress_ip: Option<IpAddr>,
    pub vswitch_cidr: Option<IpNet>,
    pub vswitch_pos: Pos,
    pub egress_pos: Pos,
    pub zone: Option<String>,
    /// Zone blocks and explicit ones.
    pub reserved: Vec<Reserved>,
    pub mode: Mode,
    pub forward_interfaces: Vec<String>,
    /// Default: every essential (`["dhcp", "mld"]`); `[]` turns them off.
    pub host_essentials: Vec<HostEssential>,
    pub flow_timeouts: FlowTimeouts,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Accessible {
    pub cidr: IpNet,
    pub ports: PortSet,
    pub protocols: Vec<Proto>,
    pub pos: Pos,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Authorization {
    pub name: String,
    pub vpc_id: String,
    pub instance_id: Option<String>,
    pub instance_type: InstanceType,
    pub address: IpNet,
    pub ports: PortSet,
    pub protocol: Proto,
    pub pos: Pos,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Node {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub pos: Pos,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Upstream {
    pub name: String,
    pub description: Option<String>,
    pub vpc_id: String,
    pub protocol: UpstreamProtocol,
    pub host_header: Option<String>,
    pub retries: u32,
    pub nodes: Vec<Node>,
    pub pos: Pos,
}

/// A policy file, parsed and valid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub instance: Instance,
    pub accessible: Vec<Accessible>,
    pub authorizations: Vec<Authorization>,
    pub upstreams: Vec<Upstream>,
}

impl Policy {
    /// The blocks reachable by default (vpc-integration): the vSwitch block, then `[[accessible]]`.
    pub fn accessible_blocks(&self) -> impl Iterator<Item = IpNet> + '_ {
        let vswitch = match self.instance.kind {
            Kind::VpcIntegration => self.instance.vswitch_cidr,
            Kind::Dedicated => None,
        };
        vswitch
            .into_iter()
            .chain(self.accessible.iter().map(|a| a.cidr))
    }
}
