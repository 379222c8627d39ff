//! The kernel's flow state (DESIGN.md verdict rule 3, fragments) and what the agent tells the kernel about
//! the host: its own addresses (flows are recorded only toward them) and the forward interfaces whose XDP
//! already enforced a packet (so TC egress counts it once).

use std::net::IpAddr;

use aya::maps::HashMap as BpfHashMap;
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use ipnet::{IpNet, Ipv6Net};
use vpcgate_common::datapath::{
    FlowKey, FlowValue, FragKey, FragValue, LocalAddr, Prefix6, limits, names, reply_port_slot,
};

use super::{
    Datapath, DatapathError,
    maps::{map_err, typed_map},
};

/// Which flow map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowMap {
    /// Established TCP flows a peer initiated.
    Established,
    /// TCP flows whose SYN reached a listener, not yet acknowledged.
    HalfOpen,
    /// UDP flows.
    Datagram,
    /// ICMP echo flows.
    Echo,
}

impl FlowMap {
    pub const ALL: [FlowMap; 4] = [
        FlowMap::Established,
        FlowMap::HalfOpen,
        FlowMap::Datagram,
        FlowMap::Echo,
    ];

    fn name(self) -> &'static str {
        match self {
            FlowMap::Established => names::FLOWS,
            FlowMap::HalfOpen => names::HALF_OPEN,
            FlowMap::Datagram => names::DGRAM_FLOWS,
            FlowMap::Echo => names::ECHO_FLOWS,
        }
    }
}

/// The kernel's clock for flow and fragment timestamps (`bpf_ktime_get_coarse_ns`: CLOCK_MONOTONIC, at
/// most a tick behind this reading).
pub fn kernel_now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// A clock's reading in nanoseconds.
pub(crate) fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn local_addr(a: IpAddr) -> LocalAddr {
    let mut addr = [0u8; 16];
    let family = match a {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            4
        }
        IpAddr::V6(v6) => {
            addr = v6.octets();
            6
        }
    };
    LocalAddr {
        family,
        _pad: [0; 3],
        addr,
    }
}

impl Datapath {
    fn hash_map<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<BpfHashMap<&mut aya::maps::MapData, K, V>, DatapathError> {
        Ok(typed_map!(self.ebpf_mut(), BpfHashMap<_, K, V>, name))
    }

    /// Removes every entry of a hash map.
    fn clear_map<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<(), DatapathError> {
        let mut m = self.hash_map::<K, V>(name)?;
        let keys: Vec<K> = m.keys().filter_map(Result::ok).collect();
        for k in keys {
            m.remove(&k).map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Forgets every recorded flow and first fragment (tests, and a policy reset).
    pub fn clear_flow_state(&mut self) -> Result<(), DatapathError> {
        for m in FlowMap::ALL {
            self.clear_map::<FlowKey, FlowValue>(m.name())?;
        }
        self.clear_map::<FragKey, FragValue>(names::FRAGS)
    }

    /// Records a flow as the ENI's ingress program would (tests: flows of every age and kind). It rewrites
    /// the local port's whole group of 64 `REPLY_PORTS` marks: a mark the kernel set in that group
    /// meanwhile would be lost, so it is for tests that insert flows while no traffic arrives.
    pub fn insert_flow(
        &mut self,
        map: FlowMap,
        key: &FlowKey,
        value: FlowValue,
    ) -> Result<(), DatapathError> {
        // The kernel marks a TCP or UDP flow's local port before it records the flow (egress looks a
        // packet up only when its source port is marked): so does this.
        let proto_index = match key.proto {
            6 => Some(0),
            17 => Some(1),
            _ => None,
        };
        if let Some(p) = proto_index {
            let (index, byte) = reply_port_slot(p, u16::from_be_bytes(key.local_port));
            let mut ports = typed_map!(
                self.ebpf_mut(),
                aya::maps::Array<_, [u8; 64]>,
                names::REPLY_PORTS
            );
            let mut marks = ports.get(&index, 0).map_err(map_err(names::REPLY_PORTS))?;
            marks[byte] = 1;
            ports
                .set(index, marks, 0)
                .map_err(map_err(names::REPLY_PORTS))?;
        }
        let name = map.name();
        self.hash_map::<FlowKey, FlowValue>(name)?
            .insert(key, value, 0)
            .map_err(map_err(name))
    }

    /// Every entry of a flow map.
    pub fn flows(&mut self, map: FlowMap) -> Result<Vec<(FlowKey, FlowValue)>, DatapathError> {
        let m = self.hash_map::<FlowKey, FlowValue>(map.name())?;
        m.iter().map(|r| r.map_err(map_err(map.name()))).collect()
    }

    /// Replaces the gateway's own addresses: peer-initiated flows are recorded only toward these.
    pub fn set_local_addresses(&mut self, addrs: &[IpAddr]) -> Result<(), DatapathError> {
        let mut want: Vec<LocalAddr> = addrs.iter().map(|&a| local_addr(a)).collect();
        want.sort_by_key(|l| (l.family, l.addr));
        want.dedup();
        self.replace_set(names::LOCAL_ADDRS, limits::LOCAL_ADDRS, &want)
    }

    /// Replaces the ENI's on-link prefixes (rule 1): neighbour discovery toward the IPv6 ones passes, and
    /// DHCPv4 renewals toward the IPv4 ones (kept as IPv4-mapped IPv6 prefixes in one trie).
    pub fn set_onlink_prefixes(&mut self, prefixes: &[IpNet]) -> Result<(), DatapathError> {
        let mut want: Vec<Ipv6Net> = prefixes.iter().map(mapped_prefix).collect();
        want.sort();
        want.dedup();
        if want.len() > limits::ONLINK6 as usize {
            return Err(DatapathError::MapFull {
                map: names::ONLINK6,
                capacity: limits::ONLINK6,
                needed: want.len() as u32,
            });
        }
        let key = |n: &Ipv6Net| {
            LpmKey::new(
                u32::from(n.prefix_len()),
                Prefix6 {
                    addr: n.network().octets(),
                },
            )
        };
        let m = self
            .ebpf_mut()
            .map_mut(names::ONLINK6)
            .ok_or(DatapathError::MissingMap(names::ONLINK6))?;
        let mut m: LpmTrie<_, Prefix6, u32> =
            LpmTrie::try_from(m).map_err(map_err(names::ONLINK6))?;
        for n in &want {
            m.insert(&key(n), 1, 0).map_err(map_err(names::ONLINK6))?;
        }
        let stale: Vec<LpmKey<Prefix6>> = m
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                !want.iter().any(|n| {
                    u32::from(n.prefix_len()) == k.prefix_len()
                        && n.network().octets() == k.data().addr
                })
            })
            .collect();
        for k in stale {
            m.remove(&k).map_err(map_err(names::ONLINK6))?;
        }
        Ok(())
    }

    /// Replaces the forward interfaces (ifindex) whose XDP enforces: TC egress does not count a packet
    /// again that arrived on one of them.
    pub fn set_forward_interfaces(&mut self, ifindexes: &[u32]) -> Result<(), DatapathError> {
        let mut want = ifindexes.to_vec();
        want.sort_unstable();
        want.dedup();
        self.replace_set(names::FORWARD_IFS, limits::FORWARD_IFS, &want)
    }

    /// Makes the keys of hash map `name` (values 1) exactly `want`, refused with the numbers when more
    /// than `capacity`. New keys are added first, then the rest removed: a key in both sets never
    /// disappears.
    fn replace_set<K: aya::Pod + PartialEq>(
        &mut self,
        name: &'static str,
        capacity: u32,
        want: &[K],
    ) -> Result<(), DatapathError> {
        if want.len() > capacity as usize {
            return Err(DatapathError::MapFull {
                map: name,
                capacity,
                needed: want.len() as u32,
            });
        }
        let mut m = self.hash_map::<K, u32>(name)?;
        for k in want {
            m.insert(k, 1, 0).map_err(map_err(name))?;
        }
        let stale: Vec<K> = m
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.contains(k))
            .collect();
        for k in stale {
            m.remove(&k).map_err(map_err(name))?;
        }
        Ok(())
    }
}

/// Every address configured on this network namespace's interfaces (the gateway's own addresses), but
/// loopback ones: nothing on the ENI is addressed to those.
pub fn host_addresses() -> std::io::Result<Vec<IpAddr>> {
    Ok(interface_addresses()?
        .into_iter()
        .map(|a| a.1)
        .filter(|a| !a.is_loopback())
        .collect())
}

/// An IPv4 prefix as the IPv4-mapped IPv6 prefix the kernel's `ONLINK6` trie keeps; IPv6 as is.
fn mapped_prefix(n: &IpNet) -> Ipv6Net {
    match n {
        IpNet::V4(v4) => Ipv6Net::new(v4.network().to_ipv6_mapped(), 96 + v4.prefix_len())
            .expect("a mapped prefix is at most 128 bits")
            .trunc(),
        IpNet::V6(v6) => v6.trunc(),
    }
}

/// The first address of the family asked for on `interface` (IPv6: not link-local), if any.
pub fn interface_address(interface: &str, v6: bool) -> std::io::Result<Option<IpAddr>> {
    Ok(interface_addresses()?
        .into_iter()
        .filter(|(name, _, _)| name == interface)
        .map(|(_, a, _)| a)
        .find(|a| match a {
            IpAddr::V4(_) => !v6,
            IpAddr::V6(a) => v6 && (a.segments()[0] & 0xffc0) != 0xfe80,
        }))
}

/// The on-link prefixes of `interface`'s addresses (IPv6 link-local ones are covered by fe80::/10).
pub fn onlink_prefixes(interface: &str) -> std::io::Result<Vec<IpNet>> {
    Ok(interface_addresses()?
        .into_iter()
        .filter(|(name, _, _)| name == interface)
        .filter_map(|(_, addr, len)| match addr {
            IpAddr::V6(a) if (a.segments()[0] & 0xffc0) == 0xfe80 => None,
            a => IpNet::new(a, len).ok().map(|n| n.trunc()),
        })
        .collect())
}

/// (interface, address, prefix length) of every address in this network namespace.
fn interface_addresses() -> std::io::Result<Vec<(String, IpAddr, u8)>> {
    let mut out = vec![];
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
                .to_string_lossy()
                .into_owned();
            // SAFETY: ifa_addr (and ifa_netmask, when set) point at sockaddrs whose family says their
            // real type.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    let len = if ifa.ifa_netmask.is_null() {
                        32
                    } else {
                        let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in) };
                        u32::from_be(m.sin_addr.s_addr).count_ones() as u8
                    };
                    let addr = IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes());
                    out.push((name, addr, len));
                }
                libc::AF_INET6 => {
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    let len = if ifa.ifa_netmask.is_null() {
                        128
                    } else {
                        let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in6) };
                        m.sin6_addr
                            .s6_addr
                            .iter()
                            .map(|b| b.count_ones())
                            .sum::<u32>() as u8
                    };
                    out.push((name, IpAddr::from(sin6.sin6_addr.s6_addr), len));
                }
                _ => {}
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list came from getifaddrs.
    unsafe { libc::freeifaddrs(ifap) };
    Ok(out)
}
