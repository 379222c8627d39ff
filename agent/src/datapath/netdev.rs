//! What an interface's driver offers XDP, asked without attaching anything.
//!
//! Attaching a program is the only other way to find out, and on real NICs (ena, mlx5, ixgbe) attaching
//! native XDP reconfigures the queues and can flap the link: not something a preflight check may do to a
//! gateway in service. Kernels from 6.3 answer through the `netdev` generic-netlink family
//! (`NETDEV_CMD_DEV_GET`, attribute `xdp-features`); older kernels have no way to ask, and the answer is
//! then "decided at attach" (`run` tries native first and reports the mode it got).

use std::{ffi::CString, io, os::fd::AsRawFd};

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NLM_F_REQUEST, NetlinkDeserializable, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, NetlinkSerializable, Nla, NlasIterator, Parseable,
    ParseableParametrized,
};
use netlink_packet_generic::{
    GenlFamily, GenlHeader, GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};
pub use netlink_packet_route::link::InfoKind;
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkInfo, LinkMessage},
};
use netlink_sys::{
    Socket, SocketAddr,
    protocols::{NETLINK_GENERIC, NETLINK_ROUTE},
};

/// `NETDEV_CMD_DEV_GET` (include/uapi/linux/netdev.h).
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
/// `NETDEV_XDP_ACT_BASIC`: the driver runs XDP programs itself (XDP_PASS, XDP_DROP, XDP_ABORTED).
const NETDEV_XDP_ACT_BASIC: u64 = 1;

/// What the kernel says about native XDP on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NativeXdp {
    /// The driver advertises native XDP: `run` attaches in the driver.
    Supported,
    /// The driver does not: `run` attaches in the generic (skb) path.
    Unsupported,
    /// This kernel cannot tell (no `netdev` family before 6.3): decided at attach.
    Unknown,
}

/// Asks the kernel (in the calling thread's network namespace) whether `ifindex`'s driver runs XDP
/// natively. `Unknown` only when the kernel has no `netdev` family; any other failure is an error.
pub fn native_xdp(ifindex: u32) -> io::Result<NativeXdp> {
    let socket = NetlinkSocket::open()?;
    let Some(family) = socket.family_id("netdev")? else {
        return Ok(NativeXdp::Unknown);
    };
    let mut msg = GenlMessage::from_payload(NetdevMsg {
        cmd: NETDEV_CMD_DEV_GET,
        nlas: vec![DefaultNla::new(
            NETDEV_A_DEV_IFINDEX,
            ifindex.to_ne_bytes().to_vec(),
        )],
    });
    msg.set_resolved_family_id(family);
    let reply: GenlMessage<NetdevMsg> = socket.request(msg.into())?;
    let features = reply
        .payload
        .nlas
        .iter()
        .find(|a| a.kind() == NETDEV_A_DEV_XDP_FEATURES)
        .and_then(nla_u64)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "netdev dev-get reply without xdp-features",
            )
        })?;
    Ok(if features & NETDEV_XDP_ACT_BASIC != 0 {
        NativeXdp::Supported
    } else {
        NativeXdp::Unsupported
    })
}

/// Whether this kernel has the `netdev` generic-netlink family (6.3+), i.e. can report XDP features.
pub fn has_xdp_features() -> io::Result<bool> {
    Ok(NetlinkSocket::open()?.family_id("netdev")?.is_some())
}

fn nla_u64(a: &DefaultNla) -> Option<u64> {
    let mut buf = vec![0; a.value_len()];
    a.emit_value(&mut buf);
    Some(u64::from_ne_bytes(buf.try_into().ok()?))
}

/// A `netdev` family message: its command and attributes, kept raw.
#[derive(Debug)]
struct NetdevMsg {
    cmd: u8,
    nlas: Vec<DefaultNla>,
}

impl GenlFamily for NetdevMsg {
    fn family_name() -> &'static str {
        "netdev"
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        1
    }
}

impl Emitable for NetdevMsg {
    fn buffer_len(&self) -> usize {
        self.nlas.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.nlas.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for NetdevMsg {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        Ok(Self {
            cmd: header.cmd,
            nlas: NlasIterator::new(buf)
                .map(|nla| nla.and_then(|nla| DefaultNla::parse(&nla)))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// A netlink socket for one request at a time (the kernel answers synchronously; a receive timeout
/// bounds the wait anyway). Only the kernel can send to it: it is connected to port 0 and joins no group.
struct NetlinkSocket {
    socket: Socket,
    seq: std::cell::Cell<u32>,
}

impl NetlinkSocket {
    fn open() -> io::Result<Self> {
        Self::open_protocol(NETLINK_GENERIC)
    }

    fn open_protocol(protocol: isize) -> io::Result<Self> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: setsockopt on a socket we own with a valid timeval of the size given.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            socket,
            seq: std::cell::Cell::new(0),
        })
    }

    /// The id of generic-netlink family `name`, or None when this kernel has no such family.
    fn family_id(&self, name: &str) -> io::Result<Option<u16>> {
        let msg = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(name.to_owned())],
        });
        match self.request::<GenlMessage<GenlCtrl>>(msg.into()) {
            Ok(reply) => Ok(reply.payload.nlas.iter().find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends one request and returns its one reply (matched by sequence number; anything else is
    /// skipped); a netlink error comes back as its errno.
    fn request<M>(&self, payload: NetlinkPayload<M>) -> io::Result<M>
    where
        M: NetlinkSerializable + NetlinkDeserializable + std::fmt::Debug,
    {
        let seq = self.seq.get().wrapping_add(1);
        self.seq.set(seq);
        let mut nl = NetlinkMessage::new(NetlinkHeader::default(), payload);
        nl.header.flags = NLM_F_REQUEST;
        nl.header.sequence_number = seq;
        nl.finalize();
        let mut buf = vec![0; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
        // Bounded: a few stale datagrams at most, each wait bounded by the receive timeout.
        for _ in 0..8 {
            let mut rx = vec![0u8; 64 * 1024];
            let n = self.socket.recv(&mut &mut rx[..], 0)?;
            let reply =
                NetlinkMessage::<M>::deserialize(&rx[..n]).map_err(|e| invalid(e.to_string()))?;
            if reply.header.sequence_number != seq {
                continue;
            }
            return match reply.payload {
                NetlinkPayload::InnerMessage(m) => Ok(m),
                NetlinkPayload::Error(e) => Err(e.code.map_or_else(
                    || io::Error::other("netlink error without a code"),
                    |c| io::Error::from_raw_os_error(-c.get()),
                )),
                other => Err(invalid(format!("unexpected netlink reply {other:?}"))),
            };
        }
        Err(invalid("no reply to the netlink request".into()))
    }
}

/// The kind of link `ifindex` is (`IFLA_INFO_KIND`: veth, macvlan, vlan, ...), from RTM_GETLINK in the
/// calling thread's network namespace; None for a device without one (a physical NIC).
pub fn link_kind(ifindex: u32) -> io::Result<Option<InfoKind>> {
    let socket = NetlinkSocket::open_protocol(NETLINK_ROUTE)?;
    let mut msg = LinkMessage::default();
    msg.header.index = ifindex;
    let reply = socket.request(NetlinkPayload::from(RouteNetlinkMessage::GetLink(msg)))?;
    let RouteNetlinkMessage::NewLink(link) = reply else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected RTM_GETLINK reply {reply:?}"),
        ));
    };
    Ok(link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.clone()),
            _ => None,
        }),
        _ => None,
    }))
}

/// Devices stacked on a lower device of this host (macvlan, ipvlan, VLAN): frames addressed to the
/// lower device's own MAC reach the host without passing them, so XDP there cannot enforce everything
/// a pod behind them sends.
pub fn is_stacked(kind: &InfoKind) -> bool {
    matches!(
        kind,
        InfoKind::MacVlan
            | InfoKind::MacVtap
            | InfoKind::IpVlan
            | InfoKind::IpVtap
            | InfoKind::Vlan
    )
}

/// `struct ethtool_drvinfo` (include/uapi/linux/ethtool.h), for the driver's name.
#[allow(dead_code, reason = "the kernel's layout; only `driver` is read")]
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

const ETHTOOL_GDRVINFO: u32 = 3;

/// The name of `interface`'s driver (`ETHTOOL_GDRVINFO`, in the calling thread's network namespace), or
/// None when the driver does not answer.
pub fn driver(interface: &str) -> Option<String> {
    let name = CString::new(interface).ok()?;
    // SAFETY: zeroed C structs; the ifreq's name is copied within IFNAMSIZ - 1 bytes and its data
    // pointer points at `info`, which lives across the ioctl; the socket is closed before returning.
    unsafe {
        let mut info: EthtoolDrvinfo = std::mem::zeroed();
        info.cmd = ETHTOOL_GDRVINFO;
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req
            .ifr_name
            .iter_mut()
            .zip(name.as_bytes().iter().take(libc::IFNAMSIZ - 1))
        {
            *d = *s as libc::c_char;
        }
        req.ifr_ifru.ifru_data = (&mut info as *mut EthtoolDrvinfo).cast();
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let rc = libc::ioctl(fd, libc::SIOCETHTOOL, &mut req);
        libc::close(fd);
        if rc != 0 {
            return None;
        }
        let len = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
        Some(String::from_utf8_lossy(&info.driver[..len]).into_owned())
    }
}

/// Where the kernel would send a packet to `dst` from `src` (`ip route get`): the output interface and
/// the next hop (the gateway, or `dst` itself when it is on-link). An error is the kernel's: e.g.
/// ENETUNREACH when no route covers `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteTo {
    pub oif: u32,
    pub next_hop: std::net::IpAddr,
    /// The source address the kernel would pick (RTA_PREFSRC), if it says.
    pub source: Option<std::net::IpAddr>,
}

pub fn route_to(dst: std::net::IpAddr, src: Option<std::net::IpAddr>) -> io::Result<RouteTo> {
    use netlink_packet_route::{
        AddressFamily,
        route::{RouteAddress, RouteAttribute, RouteMessage},
    };
    let socket = NetlinkSocket::open_protocol(NETLINK_ROUTE)?;
    let mut msg = RouteMessage::default();
    msg.header.address_family = if dst.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    msg.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(dst)));
    if let Some(src) = src {
        msg.header.source_prefix_length = if src.is_ipv4() { 32 } else { 128 };
        msg.attributes
            .push(RouteAttribute::Source(RouteAddress::from(src)));
    }
    let reply = socket.request(NetlinkPayload::from(RouteNetlinkMessage::GetRoute(msg)))?;
    let RouteNetlinkMessage::NewRoute(route) = reply else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected RTM_GETROUTE reply {reply:?}"),
        ));
    };
    let mut out = RouteTo {
        oif: 0,
        next_hop: dst,
        source: None,
    };
    for a in &route.attributes {
        match a {
            RouteAttribute::Oif(i) => out.oif = *i,
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => out.next_hop = (*g).into(),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => out.next_hop = (*g).into(),
            RouteAttribute::PrefSource(RouteAddress::Inet(s)) => out.source = Some((*s).into()),
            RouteAttribute::PrefSource(RouteAddress::Inet6(s)) => out.source = Some((*s).into()),
            _ => {}
        }
    }
    Ok(out)
}

/// The neighbour table's state for `addr` on `ifindex` (`ip neigh get`): None when there is no entry.
pub fn neighbour_state(ifindex: u32, addr: std::net::IpAddr) -> io::Result<Option<String>> {
    use netlink_packet_route::{
        AddressFamily,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    };
    let socket = NetlinkSocket::open_protocol(NETLINK_ROUTE)?;
    let mut msg = NeighbourMessage::default();
    msg.header.family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    msg.header.ifindex = ifindex;
    msg.attributes
        .push(NeighbourAttribute::Destination(match addr {
            std::net::IpAddr::V4(a) => NeighbourAddress::Inet(a),
            std::net::IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
    match socket.request(NetlinkPayload::from(RouteNetlinkMessage::GetNeighbour(msg))) {
        Ok(RouteNetlinkMessage::NewNeighbour(n)) => Ok(Some(
            match n.header.state {
                NeighbourState::Incomplete => "INCOMPLETE",
                NeighbourState::Reachable => "REACHABLE",
                NeighbourState::Stale => "STALE",
                NeighbourState::Delay => "DELAY",
                NeighbourState::Probe => "PROBE",
                NeighbourState::Failed => "FAILED",
                NeighbourState::Noarp => "NOARP",
                NeighbourState::Permanent => "PERMANENT",
                NeighbourState::None => "NONE",
                NeighbourState::Other(_) => "OTHER",
                _ => "OTHER",
            }
            .to_owned(),
        )),
        Ok(other) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected RTM_GETNEIGH reply {other:?}"),
        )),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}
