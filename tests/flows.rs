//! Rules 1 and 3 with real sockets between the lab's namespaces: what a peer may and may not open by
//! sending first, flows that expire, a SYN flood that must not evict established flows, host essentials,
//! neighbour discovery as RFC 4861 sends it, and TC egress first in the tcx chain.
//!
//! The gateway (`gw`) has TC egress + XDP ingress on its veth and knows its own addresses; the VPC
//! (`vpc`) has an authorized backend (10.200.0.2) and a host nobody authorized (10.200.0.10).

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use aya::programs::TcAttachType;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use vpcgate::{
    datapath::{Datapath, FlowMap, has_tcx, ifindex},
    policy::{check_text, compile::Compiled},
};
use vpcgate_common::{
    datapath::limits,
    parse_stats::{Hook, Stat},
    verdict::DropReason,
};
use vpcgate_lab::netns::{GW_IF, GW_V4, GW_V6, Netns, Pair, VPC_IF, VPC_V4, VPC_V6, send_raw};

const POLICY: &str = r#"
[instance]
name = "flows"
kind = "dedicated"
vpc_id = "vpc-lab"
interface = "veth-gw"
egress_ip = "10.200.0.1"
EXTRA

[[authorization]]
name = "web"
vpc_id = "vpc-lab"
address = "10.200.0.2"
ports = ["8080"]

[[authorization]]
name = "web6"
vpc_id = "vpc-lab"
address = "fd00:200::2"
ports = ["8080"]

[[authorization]]
name = "echo"
vpc_id = "vpc-lab"
address = "10.200.0.2"
ports = ["9000"]
protocol = "udp"
"#;

/// A VPC host that no authorization names.
const ROGUE_V4: &str = "10.200.0.10";
const ROGUE_V6: &str = "fd00:200::10";

const SHORT: Duration = Duration::from_millis(500);
const LONG: Duration = Duration::from_secs(3);

fn compile(extra: &str) -> Compiled {
    let checked = check_text("flows.toml", &POLICY.replace("EXTRA", extra));
    let policy = checked
        .policy
        .unwrap_or_else(|| panic!("policy with {extra:?}: {:?}", checked.diagnostics));
    Compiled::new(&policy)
}

struct Lab {
    pair: Pair,
    dp: Datapath,
}

impl Lab {
    /// The lab with `extra` lines in the policy's `[instance]` table.
    fn new(extra: &str) -> Self {
        vpcgate_lab::require_root();
        let pair = Pair::new();
        pair.vpc
            .ip(&["addr", "add", &format!("{ROGUE_V4}/24"), "dev", VPC_IF]);
        pair.vpc.ip(&[
            "addr",
            "add",
            &format!("{ROGUE_V6}/64"),
            "dev",
            VPC_IF,
            "nodad",
        ]);
        let mut dp = Datapath::load().unwrap_or_else(|e| panic!("{e}"));
        dp.apply(&compile(extra)).unwrap_or_else(|e| panic!("{e}"));
        vpcgate_lab::netns::enforce_on_gateway(&mut dp, &pair);
        Self { pair, dp }
    }

    fn drops(&self, r: DropReason) -> u64 {
        self.dp
            .drop_counts()
            .unwrap_or_else(|e| panic!("drop counts: {e}"))
            .dropped[&r]
    }

    fn xdp_tcp(&self) -> u64 {
        self.dp
            .parse_stats()
            .unwrap_or_else(|e| panic!("parse stats: {e}"))
            .get(Hook::Xdp, Stat::Tcp)
    }

    fn flows(&mut self, map: FlowMap) -> Vec<vpcgate_common::datapath::FlowKey> {
        self.dp
            .flows(map)
            .unwrap_or_else(|e| panic!("flows {map:?}: {e}"))
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }
}

fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}")), port)
}

/// A UDP socket bound in the namespace `run` executes in, reading with a `SHORT` timeout.
fn udp(bind: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind(bind).unwrap_or_else(|e| panic!("bind udp {bind}: {e}"));
    s.set_read_timeout(Some(SHORT)).unwrap();
    s
}

/// The next datagram within the socket's read timeout.
fn recv(s: &UdpSocket) -> Option<Vec<u8>> {
    let mut buf = [0u8; 2048];
    s.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
}

/// A TCP socket bound to `local` (SO_REUSEADDR) that connects to `remote` within `timeout`.
fn connect_from(
    local: SocketAddr,
    remote: SocketAddr,
    timeout: Duration,
) -> std::io::Result<Socket> {
    let s = Socket::new(
        Domain::for_address(local),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    s.bind(&SockAddr::from(local))?;
    s.connect_timeout(&SockAddr::from(remote), timeout)?;
    Ok(s)
}

/// Whether a flow map holds the flow (local, remote) of protocol `proto`.
fn has_flow(
    keys: &[vpcgate_common::datapath::FlowKey],
    proto: u8,
    local: SocketAddr,
    remote: SocketAddr,
) -> bool {
    let bytes = |a: IpAddr| {
        let mut b = [0u8; 16];
        match a {
            IpAddr::V4(v4) => b[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => b = v6.octets(),
        }
        b
    };
    keys.iter().any(|k| {
        k.proto == proto
            && k.local == bytes(local.ip())
            && k.remote == bytes(remote.ip())
            && u16::from_be_bytes(k.local_port) == local.port()
            && u16::from_be_bytes(k.remote_port) == remote.port()
    })
}

#[test]
fn a_peer_cannot_open_the_gateway_egress_toward_itself_by_sending_first() {
    let mut lab = Lab::new("");
    // P on the rogue host, Q on the gateway, where nothing listens or is bound.
    const P: u16 = 40001;
    const Q: u16 = 40002;
    let rogue_p = sock(ROGUE_V4, P);
    let gw_q = sock(GW_V4, Q);

    // TCP: one SYN P -> Q. The gateway answers RST (dropped too: it replies in no recorded flow), so the
    // attempt times out; the socket is closed before its SYN is retransmitted (after 1 s).
    let attempt = lab
        .pair
        .vpc
        .run(|| connect_from(rogue_p, gw_q, Duration::from_millis(300)));
    assert!(
        attempt.is_err(),
        "the rogue host connected to a closed gateway port"
    );
    drop(attempt);
    assert!(
        !has_flow(&lab.flows(FlowMap::HalfOpen), 6, gw_q, rogue_p)
            && !has_flow(&lab.flows(FlowMap::Established), 6, gw_q, rogue_p),
        "a SYN toward a port nothing listens on was recorded as a flow"
    );
    // The host now listens on P; the gateway connects from Q to it.
    let listener = lab.pair.vpc.run(|| {
        let l = TcpListener::bind(rogue_p).unwrap_or_else(|e| panic!("listen {rogue_p}: {e}"));
        l.set_nonblocking(true).unwrap();
        l
    });
    let before = lab.drops(DropReason::NotAuthorized);
    let back = lab
        .pair
        .gw
        .run(|| connect_from(gw_q, rogue_p, Duration::from_millis(1500)));
    let err = back.expect_err("the gateway connected to a host no authorization names");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::TimedOut,
        "the gateway's SYN should vanish on egress: {err}"
    );
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the host accepted a connection from the gateway"
    );
    let tcp_drops = lab.drops(DropReason::NotAuthorized) - before;
    assert!(
        tcp_drops >= 1,
        "the gateway's SYN toward {rogue_p} was not counted not_authorized"
    );
    let d = lab
        .dp
        .destination(rogue_p.ip(), 6, P)
        .unwrap()
        .unwrap_or_else(|| panic!("no observation of {rogue_p}"));
    assert_eq!(
        (d.passed, d.syn_sent, d.last_reason),
        (0, 0, Some(DropReason::NotAuthorized)),
        "{d:?}"
    );

    // UDP: one datagram P -> Q (nothing bound on Q; the gateway's port unreachable answers it and
    // passes, quoting the host's datagram), then the gateway sends Q -> P.
    let host = lab.pair.vpc.run(|| udp(rogue_p));
    host.send_to(b"first", gw_q).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !has_flow(&lab.flows(FlowMap::Datagram), 17, gw_q, rogue_p),
        "a datagram toward a port nothing is bound on was recorded as a flow"
    );
    assert_sent_datagram_drops(&lab, &host, rogue_p, || {
        let _ = lab.pair.gw.run(|| udp(gw_q).send_to(b"sneaky", rogue_p));
    });
    let d = lab.dp.destination(rogue_p.ip(), 17, P).unwrap().unwrap();
    assert_eq!(
        (d.passed, d.dropped, d.last_reason),
        (0, 1, Some(DropReason::NotAuthorized)),
        "{d:?}"
    );
}

/// A gateway socket connected to a host no authorization names (its datagrams drop on egress): the host
/// sending to it first, from the port it is connected to, opens nothing. A datagram toward a socket
/// connected to its sender belongs to a flow the gateway started, which no peer initiated (rule 3); the
/// host knows the port it is connected to, and could try every ephemeral port.
#[test]
fn a_datagram_toward_a_connected_socket_opens_nothing() {
    let mut lab = Lab::new("");
    const P: u16 = 40021;
    const Q: u16 = 40022;
    let rogue_p = sock(ROGUE_V4, P);
    let gw_q = sock(GW_V4, Q);
    let host = lab.pair.vpc.run(|| udp(rogue_p));
    let gw = lab.pair.gw.run(|| {
        let s = udp(gw_q);
        s.connect(rogue_p).expect("connect the gateway's socket");
        s
    });
    host.send_to(b"first", gw_q).unwrap();
    assert_eq!(
        recv(&gw).as_deref(),
        Some(b"first".as_slice()),
        "the connected socket should receive its peer's datagram (ingress never drops)"
    );
    assert!(
        !has_flow(&lab.flows(FlowMap::Datagram), 17, gw_q, rogue_p),
        "a datagram toward a socket connected to its sender was recorded as a flow"
    );
    assert_sent_datagram_drops(&lab, &host, rogue_p, || {
        let _ = gw.send(b"sneaky");
    });
}

/// A datagram toward a port where nothing is bound opens nothing, and the kernel remembers that "no" for
/// a jiffies tick at most (`NO_SOCKET`): once a socket is bound there, the host's next datagram, a few
/// ticks later, opens its flow and the gateway's answer passes.
#[test]
fn a_datagram_before_the_socket_is_bound_does_not_keep_the_flow_from_opening() {
    let mut lab = Lab::new("");
    const P: u16 = 40031;
    const Q: u16 = 40032;
    let rogue_p = sock(ROGUE_V4, P);
    let gw_q = sock(GW_V4, Q);
    let host = lab.pair.vpc.run(|| udp(rogue_p));
    host.send_to(b"too early", gw_q).unwrap();
    // The ICMP port unreachable it earns (or nothing) tells the host nothing is bound yet.
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !has_flow(&lab.flows(FlowMap::Datagram), 17, gw_q, rogue_p),
        "a datagram toward a port where nothing is bound was recorded as a flow"
    );
    let gw = lab.pair.gw.run(|| udp(gw_q));
    // Well past any tick (HZ >= 100: 10 ms at most).
    std::thread::sleep(Duration::from_millis(100));
    host.send_to(b"now", gw_q).unwrap();
    assert_eq!(recv(&gw).as_deref(), Some(b"now".as_slice()));
    assert!(
        has_flow(&lab.flows(FlowMap::Datagram), 17, gw_q, rogue_p),
        "the datagram toward the socket bound since opened no flow: a remembered \"no socket\" outlived its tick"
    );
    gw.send_to(b"answer", rogue_p).unwrap();
    assert_eq!(
        recv(&host).as_deref(),
        Some(b"answer".as_slice()),
        "the gateway's answer in the flow the host opened should pass"
    );
}

/// `send` (the gateway sending one datagram to `host` at `to`; ENOBUFS or success, the drop is what
/// counts) drops `not_authorized`: the host that sent first receives nothing.
fn assert_sent_datagram_drops(lab: &Lab, host: &UdpSocket, to: SocketAddr, send: impl FnOnce()) {
    let before = lab.drops(DropReason::NotAuthorized);
    send();
    assert_eq!(
        recv(host),
        None,
        "the gateway's datagram reached the host that sent first"
    );
    assert_eq!(
        lab.drops(DropReason::NotAuthorized) - before,
        1,
        "the gateway's datagram toward {to}"
    );
}

/// A crossed SYN: the gateway connects from Q to a host no authorization names (its SYN drops on egress)
/// while that host sends its own SYN from P to Q. The gateway's connecting socket answers a SYN-ACK (a
/// simultaneous open), which must drop like any packet toward that host: nothing listens on Q, so the
/// host's SYN opened no flow, and the two sockets never connect.
#[test]
fn a_crossed_syn_toward_a_connecting_socket_opens_nothing() {
    let mut lab = Lab::new("");
    const P: u16 = 40011;
    const Q: u16 = 40012;
    let rogue_p = sock(ROGUE_V4, P);
    let gw_q = sock(GW_V4, Q);
    let before = lab.drops(DropReason::NotAuthorized);
    let (gateway, rogue) = std::thread::scope(|s| {
        let gateway = s.spawn(|| {
            lab.pair
                .gw
                .run(|| connect_from(gw_q, rogue_p, Duration::from_millis(2500)))
        });
        // The gateway's socket is in SYN_SENT (its SYN dropped) when the host's SYN reaches it.
        std::thread::sleep(Duration::from_millis(300));
        let rogue = lab
            .pair
            .vpc
            .run(|| connect_from(rogue_p, gw_q, Duration::from_millis(1500)));
        (gateway.join().expect("gateway thread"), rogue)
    });
    assert!(
        rogue.is_err(),
        "the host connected to the gateway's connecting socket by sending a crossed SYN"
    );
    assert!(
        gateway.is_err(),
        "the gateway connected to a host no authorization names after it sent a crossed SYN"
    );
    assert!(
        !has_flow(&lab.flows(FlowMap::HalfOpen), 6, gw_q, rogue_p)
            && !has_flow(&lab.flows(FlowMap::Established), 6, gw_q, rogue_p),
        "a SYN toward a connecting (not listening) socket was recorded as a flow"
    );
    assert!(
        lab.drops(DropReason::NotAuthorized) - before >= 2,
        "the gateway's SYN and its answer to the crossed SYN should both drop not_authorized"
    );
}

/// One TCP request/response from `client` to `server`, where the gateway echoes with a prefix.
fn tcp_exchange(lab: &Lab, server: SocketAddr, client_ip: &str) -> SocketAddr {
    let listener = lab
        .pair
        .gw
        .run(|| TcpListener::bind(server).unwrap_or_else(|e| panic!("listen {server}: {e}")));
    let handler = std::thread::spawn(move || {
        let (mut c, peer) = listener.accept().expect("accept");
        c.set_read_timeout(Some(LONG)).unwrap();
        let mut req = vec![];
        c.read_to_end(&mut req).expect("read request");
        c.write_all(&[b"re: ".as_slice(), &req].concat())
            .expect("write response");
        peer
    });
    let local = lab.pair.vpc.run(|| {
        let mut c = TcpStream::from(connect_from(sock(client_ip, 0), server, LONG)?);
        c.set_read_timeout(Some(LONG))?;
        c.write_all(b"hello")?;
        c.shutdown(Shutdown::Write)?;
        let mut back = vec![];
        c.read_to_end(&mut back)?;
        assert_eq!(back, b"re: hello", "response from {server}");
        c.local_addr()
    });
    let local = local.unwrap_or_else(|e| {
        panic!(
            "{client_ip} -> {server}: {e}; gateway drops: {:?}",
            lab.dp.drop_counts().map(|d| d.dropped)
        )
    });
    let peer = handler.join().expect("server thread");
    assert_eq!(peer, local);
    local
}

/// A TCP request/response and a UDP question/answer from `client` to servers on the gateway's `gw`
/// address; the flows are recorded as the peer's (the connection established).
fn serve_from_the_gateway(lab: &mut Lab, gw: &str, client: &str) {
    let server = sock(gw, 7000);
    let local = tcp_exchange(lab, server, client);
    assert!(
        has_flow(&lab.flows(FlowMap::Established), 6, server, local),
        "the connection {local} -> {server} was not recorded as established"
    );
    // UDP: an unconnected socket answering with send_to.
    let server = sock(gw, 7001);
    let srv = lab.pair.gw.run(|| udp(server));
    let cli = lab.pair.vpc.run(|| udp(sock(client, 0)));
    cli.send_to(b"ask", server).unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = srv
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("{server} received nothing: {e}"));
    assert_eq!(&buf[..n], b"ask");
    srv.send_to(b"answer", from).unwrap();
    assert_eq!(
        recv(&cli).as_deref(),
        Some(b"answer".as_slice()),
        "the gateway's UDP answer to {from}"
    );
    for r in [
        DropReason::NotAuthorized,
        DropReason::PortNotAuthorized,
        DropReason::Malformed,
    ] {
        assert_eq!(
            lab.drops(r),
            0,
            "{r:?}: a reply to {client} (or neighbour discovery) was dropped"
        );
    }
}

#[test]
fn servers_on_the_gateway_answer_clients_authorized_nowhere() {
    let mut lab = Lab::new("");
    serve_from_the_gateway(&mut lab, GW_V4, ROGUE_V4);
}

/// The VPC host speaks first, so the gateway's first IPv6 packet toward it is the neighbour
/// advertisement answering the host's solicitation: sent to the host's global address (RFC 4861
/// 7.2.4: the solicitation's source), which lies in the ENI's on-link prefix (DESIGN rule 1).
#[test]
fn vpc_hosts_reach_gateway_servers_over_ipv6_from_cold_neighbour_caches() {
    let mut lab = Lab::new("");
    serve_from_the_gateway(&mut lab, GW_V6, ROGUE_V6);
}

#[test]
fn an_expired_datagram_flow_no_longer_passes() {
    let lab = Lab::new("flow_timeouts = { udp = 1 }");
    let server = sock(GW_V4, 7001);
    let srv = lab.pair.gw.run(|| udp(server));
    let cli = lab.pair.vpc.run(|| udp(sock(ROGUE_V4, 0)));
    let ask = |what: &[u8]| {
        cli.send_to(what, server).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = srv
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("{server} received nothing: {e}"));
        assert_eq!(&buf[..n], what);
        from
    };
    let from = ask(b"one");
    srv.send_to(b"reply", from).unwrap();
    assert_eq!(
        recv(&cli).as_deref(),
        Some(b"reply".as_slice()),
        "reply within the flow"
    );

    // Idle for well over the 1 s timeout; the client sends nothing new.
    std::thread::sleep(Duration::from_millis(2500));
    let before = lab.drops(DropReason::NotAuthorized);
    // ENOBUFS or success: the drop is what counts.
    let _ = srv.send_to(b"late", from);
    assert_eq!(recv(&cli), None, "a reply in an expired flow arrived");
    assert_eq!(
        lab.drops(DropReason::NotAuthorized) - before,
        1,
        "the reply in the expired flow"
    );

    // The client speaking again opens a new flow: the expiry, not anything else, stopped the reply.
    let from = ask(b"two");
    srv.send_to(b"again", from).unwrap();
    assert_eq!(
        recv(&cli).as_deref(),
        Some(b"again".as_slice()),
        "reply in the renewed flow"
    );
}

const FLOOD: usize = 100_000;
const FLOOD_PORT: u16 = 7000;

/// Internet checksum (RFC 1071) of `data`, continuing from `sum`.
fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An interface's MAC address, from `ip -o link show` in its namespace.
fn mac(ns: &Netns, dev: &str) -> [u8; 6] {
    let shown = ns.ip(&["-o", "link", "show", dev]);
    let text = shown
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC address in {shown:?}"));
    let mut out = [0u8; 6];
    for (o, h) in out.iter_mut().zip(text.split(':')) {
        *o = u8::from_str_radix(h, 16).unwrap_or_else(|e| panic!("MAC {text}: {e}"));
    }
    out
}

/// An Ethernet + IPv4 + TCP SYN frame with valid checksums (the receiving stack answers it).
fn syn_frame(
    macs: ([u8; 6], [u8; 6]),
    src: [u8; 4],
    dst: [u8; 4],
    ports: (u16, u16),
    seq: u32,
) -> Vec<u8> {
    tcp_frame(macs, src, dst, ports, (seq, 0), 0x02)
}

/// A checksummed IPv4 TCP segment with `flags` and (sequence, acknowledgment) numbers.
fn tcp_frame(
    macs: ([u8; 6], [u8; 6]),
    src: [u8; 4],
    dst: [u8; 4],
    ports: (u16, u16),
    (seq, ack): (u32, u32),
    flags: u8,
) -> Vec<u8> {
    let (src_mac, dst_mac) = macs;
    let mut tcp = vec![];
    tcp.extend(ports.0.to_be_bytes());
    tcp.extend(ports.1.to_be_bytes());
    tcp.extend(seq.to_be_bytes());
    tcp.extend(ack.to_be_bytes());
    tcp.extend([5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    let mut pseudo = vec![];
    pseudo.extend(src);
    pseudo.extend(dst);
    pseudo.extend([0, 6, 0, tcp.len() as u8]);
    pseudo.extend(&tcp);
    let c = checksum(&pseudo, 0);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend(((20 + tcp.len()) as u16).to_be_bytes());
    ip.extend([0, 0, 0x40, 0, 64, 6, 0, 0]);
    ip.extend(src);
    ip.extend(dst);
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = dst_mac.to_vec();
    f.extend(src_mac);
    f.extend(0x0800u16.to_be_bytes());
    f.extend(ip);
    f.extend(tcp);
    f
}

/// xorshift64: reproducible spoofed sources without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn a_syn_and_blind_ack_flood_neither_evicts_nor_fakes_established_connections() {
    let mut lab = Lab::new("");
    let server = sock(GW_V4, FLOOD_PORT);
    let listener = lab
        .pair
        .gw
        .run(|| TcpListener::bind(server).unwrap_or_else(|e| panic!("listen {server}: {e}")));
    let mut client = lab.pair.vpc.run(|| {
        TcpStream::connect_timeout(&server, LONG)
            .unwrap_or_else(|e| panic!("connect {server}: {e}"))
    });
    client.set_read_timeout(Some(LONG)).unwrap();
    let (mut conn, peer) = listener.accept().expect("accept");
    let mut read = |n: usize| {
        let mut buf = vec![0u8; n];
        client
            .read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("client read: {e}"));
        buf
    };
    conn.write_all(b"before").unwrap();
    assert_eq!(read(6), b"before");
    assert!(
        has_flow(&lab.flows(FlowMap::Established), 6, server, peer),
        "the connection from {peer} is not recorded as established"
    );

    let not_authorized = lab.drops(DropReason::NotAuthorized);
    let tcp_seen = lab.xdp_tcp();
    // Spoofed SYNs from the VPC subnet toward the listener: never from an address that exists in the
    // lab (the gateway would answer those hosts, and the real client's flow must stay the only one).
    let macs = (mac(&lab.pair.vpc, VPC_IF), mac(&lab.pair.gw, GW_IF));
    let (sent, refused, elapsed) = lab.pair.vpc.run(|| {
        let mut rng = Rng(0x5eed_f100d);
        let start = Instant::now();
        let deadline = start + Duration::from_secs(60);
        let (mut sent, mut refused) = (0, 0);
        while sent < FLOOD && Instant::now() < deadline {
            let frames: Vec<Vec<u8>> = (0..FLOOD.min(sent + 256) - sent)
                .flat_map(|_| {
                    let r = rng.next();
                    let host = match (r % 251) as u8 + 3 {
                        10 | 20 => 30,
                        h => h,
                    };
                    let sport = 1024 + ((r >> 8) % 64000) as u16;
                    // A SYN, then a blind ACK from the same spoofed source: it cannot know the
                    // gateway's SYN-ACK sequence number, so the flow must stay half-open.
                    [
                        syn_frame(
                            macs,
                            [10, 200, 0, host],
                            [10, 200, 0, 1],
                            (sport, FLOOD_PORT),
                            (r >> 32) as u32,
                        ),
                        tcp_frame(
                            macs,
                            [10, 200, 0, host],
                            [10, 200, 0, 1],
                            (sport, FLOOD_PORT),
                            ((r >> 32) as u32 + 1, rng.next() as u32),
                            0x10,
                        ),
                    ]
                })
                .collect();
            let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
            refused += send_raw(VPC_IF, &refs);
            sent += frames.len() / 2;
        }
        (sent, refused, start.elapsed())
    });
    let seen = lab.xdp_tcp() - tcp_seen;
    let half_open = lab.flows(FlowMap::HalfOpen).len();
    eprintln!(
        "flood: {sent} SYNs sent in {elapsed:?} ({refused} refused by the veth), {seen} TCP segments at \
         the gateway's XDP, {half_open} half-open flows (capacity {})",
        limits::HALF_OPEN
    );
    assert_eq!(
        sent, FLOOD,
        "the flood did not finish within its time bound"
    );
    assert!(
        seen > u64::from(limits::HALF_OPEN),
        "only {seen} SYNs reached the gateway: too few to overflow the half-open map"
    );

    let established = lab.flows(FlowMap::Established);
    assert!(
        has_flow(&established, 6, server, peer),
        "the flood evicted the established connection from {peer}"
    );
    assert_eq!(
        established.len(),
        1,
        "blind ACKs established spoofed flows: {} established",
        established.len()
    );
    conn.write_all(b"after the flood").unwrap();
    assert_eq!(
        read(15),
        b"after the flood",
        "the gateway's data after the flood"
    );
    assert_eq!(
        lab.drops(DropReason::NotAuthorized),
        not_authorized,
        "a segment of the established connection was dropped as not authorized"
    );
}

/// The DHCP server's address and port in `dhcp_delivered`.
const DHCP_SERVER: (&str, u16) = (ROGUE_V4, 67);

/// Drops toward the DHCP server, and the last one's reason. (The global not_authorized counter is no
/// measure: with host essentials off, the gateway's own MLD reports drop too, whenever its interface
/// sends them.)
fn dhcp_drops(lab: &Lab) -> (u64, Option<DropReason>) {
    lab.dp
        .destination(DHCP_SERVER.0.parse().unwrap(), 17, DHCP_SERVER.1)
        .unwrap()
        .map_or((0, None), |d| (d.dropped, d.last_reason))
}

/// Sends one DHCP client datagram (gateway 68 -> rogue host 67); whether it arrived.
fn dhcp_delivered(lab: &Lab) -> bool {
    let server = sock(DHCP_SERVER.0, DHCP_SERVER.1);
    let dhcp_server = lab.pair.vpc.run(|| udp(server));
    let client = lab.pair.gw.run(|| udp(sock(GW_V4, 68)));
    // ENOBUFS or success: the outcome is what counts.
    let _ = client.send_to(b"discover", server);
    recv(&dhcp_server).is_some()
}

#[test]
fn dhcp_client_traffic_passes_only_with_host_essentials_on() {
    let lab = Lab::new("");
    assert!(
        dhcp_delivered(&lab),
        "DHCP client traffic dropped with host essentials on (the default)"
    );
    assert_eq!(lab.drops(DropReason::NotAuthorized), 0);

    let lab = Lab::new("host_essentials = []");
    assert!(
        !dhcp_delivered(&lab),
        "DHCP client traffic passed with host essentials off"
    );
    assert_eq!(dhcp_drops(&lab), (1, Some(DropReason::NotAuthorized)));
}

/// A reload that changes only `[instance]` settings the kernel reads per generation (host essentials
/// here; flow timeouts and the on-link prefix live beside them) takes effect like any other change.
#[test]
fn a_reload_that_turns_host_essentials_off_takes_effect() {
    let mut lab = Lab::new("");
    assert!(
        dhcp_delivered(&lab),
        "DHCP client traffic dropped before the reload"
    );
    let report = lab
        .dp
        .apply(&compile("host_essentials = []"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !dhcp_delivered(&lab),
        "DHCP client traffic passed after a reload turned host essentials off ({report:?})"
    );
    assert_eq!(dhcp_drops(&lab), (1, Some(DropReason::NotAuthorized)));
}

/// An Ethernet + IPv6 + ICMPv6 neighbour solicitation for `target`, sent to its solicited-node
/// multicast group with `hop_limit`, valid checksum, and a source link-layer address option.
fn neighbour_solicitation(
    src_mac: [u8; 6],
    src: Ipv6Addr,
    target: Ipv6Addr,
    hop_limit: u8,
) -> Vec<u8> {
    let t = target.octets();
    let dst = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    );
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend(t);
    icmp.extend([1, 1]);
    icmp.extend(src_mac);
    let mut pseudo = vec![];
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend((icmp.len() as u32).to_be_bytes());
    pseudo.extend([0, 0, 0, 58]);
    pseudo.extend(&icmp);
    let c = checksum(&pseudo, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let d = dst.octets();
    let mut f = vec![0x33, 0x33, d[12], d[13], d[14], d[15]];
    f.extend(src_mac);
    f.extend(0x86ddu16.to_be_bytes());
    f.extend([0x60, 0, 0, 0]);
    f.extend((icmp.len() as u16).to_be_bytes());
    f.extend([58, hop_limit]);
    f.extend(src.octets());
    f.extend(d);
    f.extend(icmp);
    f
}

/// A packet socket capturing every frame that arrives on `interface` (of the calling thread's
/// namespace), reading with a short timeout.
fn capture(interface: &str) -> OwnedFd {
    let index = ifindex(interface).unwrap_or_else(|e| panic!("{e}"));
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket syscalls on a fresh fd, owned by the returned OwnedFd.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let fd = OwnedFd::from_raw_fd(fd);
        let mut sa: libc::sockaddr_ll = std::mem::zeroed();
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = index as i32;
        let rc = libc::bind(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(
            rc,
            0,
            "bind packet socket to {interface}: {}",
            std::io::Error::last_os_error()
        );
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        let rc = libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        fd
    }
}

/// Every frame the capture socket receives within `within`.
fn captured(fd: &OwnedFd, within: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + within;
    let mut frames = vec![];
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 {
            frames.push(buf[..n as usize].to_vec());
        }
    }
    frames
}

#[test]
fn neighbour_discovery_with_a_wrong_hop_limit_drops_while_real_nd_works() {
    let lab = Lab::new("");
    let gw_mac = mac(&lab.pair.gw, GW_IF);
    let gw_link_local = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x1);
    // Targets nobody owns, so the solicitations are told apart from the kernel's own.
    let forged_target: Ipv6Addr = "fd00:200::99".parse().unwrap();
    let proper_target: Ipv6Addr = "fd00:200::98".parse().unwrap();
    let forged = neighbour_solicitation(gw_mac, gw_link_local, forged_target, 64);
    let proper = neighbour_solicitation(gw_mac, gw_link_local, proper_target, 255);
    let tap = lab.pair.vpc.run(|| capture(VPC_IF));
    let malformed = lab.drops(DropReason::Malformed);
    let refused = lab
        .pair
        .gw
        .run(|| (send_raw(GW_IF, &[&forged]), send_raw(GW_IF, &[&proper])));
    assert_eq!(
        refused,
        (1, 0),
        "which solicitation TC egress dropped (hop limit 64, 255)"
    );
    let frames = captured(&tap, SHORT);
    let carries = |target: Ipv6Addr| {
        let t = target.octets();
        frames.iter().any(|f| f.windows(16).any(|w| w == t))
    };
    assert!(
        carries(proper_target),
        "the hop-limit-255 solicitation never arrived: the capture saw {} frames",
        frames.len()
    );
    assert!(
        !carries(forged_target),
        "the hop-limit-64 solicitation reached the VPC"
    );
    assert_eq!(
        lab.drops(DropReason::Malformed) - malformed,
        1,
        "the hop-limit-64 solicitation"
    );

    // Ordinary neighbour discovery, from empty neighbour caches (the gateway speaks first; the other way
    // round is `vpc_hosts_reach_gateway_servers_over_ipv6_from_cold_neighbour_caches`).
    for ns in [&lab.pair.gw, &lab.pair.vpc] {
        ns.ip(&["-6", "neigh", "flush", "all"]);
    }
    let backend = sock(VPC_V6, 8080);
    let listener = lab
        .pair
        .vpc
        .run(|| TcpListener::bind(backend).unwrap_or_else(|e| panic!("listen {backend}: {e}")));
    let echo = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        c.set_read_timeout(Some(LONG)).unwrap();
        let mut data = vec![];
        c.read_to_end(&mut data).expect("read");
        c.write_all(&data).expect("echo");
    });
    lab.pair.gw.run(|| {
        let mut c = TcpStream::connect_timeout(&backend, LONG)
            .unwrap_or_else(|e| panic!("connect {backend}: {e}"));
        c.set_read_timeout(Some(LONG)).unwrap();
        c.write_all(b"v6").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut back = vec![];
        c.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"v6", "echo from {backend}");
    });
    echo.join().expect("echo server");
    assert_eq!(
        lab.drops(DropReason::Malformed) - malformed,
        1,
        "real neighbour discovery was dropped as malformed"
    );
}

#[test]
fn tc_egress_is_first_in_the_tcx_chain() {
    vpcgate_lab::require_root();
    assert!(has_tcx(), "this test needs tcx (kernel >= 6.6)");
    let pair = Pair::new();
    let mut ours = Datapath::load().unwrap_or_else(|e| panic!("{e}"));
    ours.apply(&compile("")).unwrap_or_else(|e| panic!("{e}"));
    // Another tcx program, attached first with aya's default order (last in the chain), and without a
    // policy: it drops every IP packet it sees as no_policy.
    let mut other = Datapath::load().unwrap_or_else(|e| panic!("{e}"));
    let position = pair.gw.run(|| {
        other
            .tc_egress()
            .unwrap_or_else(|e| panic!("{e}"))
            .attach(GW_IF, TcAttachType::Egress)
            .unwrap_or_else(|e| panic!("attach the other program: {e}"));
        ours.attach_tc_egress(GW_IF)
            .unwrap_or_else(|e| panic!("{e}"));
        ours.tc_chain_position(GW_IF)
            .unwrap_or_else(|e| panic!("{e}"))
    });
    assert_eq!(
        position,
        Some((0, 2)),
        "our position in {GW_IF}'s tcx egress chain"
    );

    // Ours decides first: a denied packet never reaches the other program, and one ours passes goes on
    // to it (TC_ACT_UNSPEC: next in the chain), which drops it for want of a policy. (Its drop counters
    // also move with the kernel's own IPv6 plumbing; its per-destination observations do not.)
    for port in [9001u16, 9000] {
        let rx = pair.vpc.run(|| udp(sock(VPC_V4, port)));
        pair.gw.run(|| {
            let _ = udp(sock(GW_V4, 0)).send_to(b"x", sock(VPC_V4, port));
        });
        assert_eq!(
            recv(&rx),
            None,
            "a datagram to port {port} got through both programs"
        );
    }
    let seen = |dp: &Datapath, port: u16| {
        dp.destination(VPC_V4.parse().unwrap(), 17, port)
            .unwrap_or_else(|e| panic!("{e}"))
            .map(|d| (d.passed, d.dropped, d.last_reason))
    };
    assert_eq!(
        seen(&ours, 9001),
        Some((0, 1, Some(DropReason::PortNotAuthorized))),
        "ours on the denied datagram"
    );
    assert_eq!(
        seen(&other, 9001),
        None,
        "the other program saw what ours dropped"
    );
    assert_eq!(
        seen(&ours, 9000),
        Some((1, 0, None)),
        "ours on the authorized datagram"
    );
    assert_eq!(
        seen(&other, 9000),
        Some((0, 1, Some(DropReason::NoPolicy))),
        "the other program, after ours, on the authorized datagram"
    );
}
