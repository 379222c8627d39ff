//! The kernel programs attached to a real veth pair between two network namespaces, with real sockets.
//!
//! `gw` plays the gateway (TC egress + XDP on its veth), `vpc` a backend (XDP on its veth, to see what
//! arrived). Every counter that only our traffic can move is asserted exactly against what was sent.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::mpsc,
    time::Duration,
};

use vpcgate::{
    datapath::{Datapath, ParseStats, XdpAttachMode, XdpRole},
    policy::{check_text, compile::Compiled},
};
use vpcgate_common::parse_stats::{Hook, Stat};
use vpcgate_lab::{
    netns::{GW_IF, GW_V4, GW_V6, Pair, VPC_IF, VPC_V4, VPC_V6, send_raw},
    packet::{build, ipv4, udp},
};

const ALLOW_LAB: &str = r#"
[instance]
name = "lab"
kind = "vpc-integration"
vpc_id = "vpc-lab"
interface = "veth-gw"
vswitch_cidr = "10.200.0.0/24"
[[accessible]]
cidr = "fd00:200::/64"
"#;

const UDP_PORT: u16 = 9000;
const TCP_PORT: u16 = 9001;
/// Datagrams per address family.
const UDP_COUNT: u64 = 40;
/// Datagrams per family large enough to be fragmented (1500-byte MTU): 3 fragments each.
const BIG_COUNT: u64 = 5;
const BIG_LEN: usize = 4000;
const BIG_FRAGMENTS: u64 = 3;
const TCP_CONNECTIONS: usize = 10;
const PINGS: u64 = 5;
const MALFORMED: u64 = 7;
const IO_TIMEOUT: Duration = Duration::from_secs(2);

fn vpc_addrs() -> [SocketAddr; 2] {
    [
        SocketAddr::new(VPC_V4.parse::<Ipv4Addr>().unwrap().into(), 0),
        SocketAddr::new(VPC_V6.parse::<Ipv6Addr>().unwrap().into(), 0),
    ]
}

/// Echo servers in the vpc namespace: UDP (one datagram back per datagram) and TCP (echo until EOF).
/// They stop after serving `udp_total` datagrams and `tcp_total` connections, or after a timeout.
fn start_servers(pair: &Pair, udp_total: u64, tcp_total: usize) -> mpsc::Receiver<()> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let vpc = pair.vpc.name().to_owned();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/run/netns/{vpc}")).expect("open vpc netns");
        // SAFETY: this thread is dedicated to the servers; it moves itself into the vpc namespace.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns vpc"
        );
        let mut udps = vec![];
        let mut tcps = vec![];
        for mut addr in vpc_addrs() {
            addr.set_port(UDP_PORT);
            let s = UdpSocket::bind(addr).expect("bind udp");
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            udps.push(s);
            addr.set_port(TCP_PORT);
            let l = TcpListener::bind(addr).expect("bind tcp");
            l.set_nonblocking(true).unwrap();
            tcps.push(l);
        }
        ready_tx.send(()).unwrap();
        let (mut served_udp, mut served_tcp) = (0, 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut buf = vec![0u8; 65536];
        while (served_udp < udp_total || served_tcp < tcp_total)
            && std::time::Instant::now() < deadline
        {
            for s in &udps {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    s.send_to(&buf[..n], from).expect("udp echo");
                    served_udp += 1;
                }
            }
            for l in &tcps {
                if let Ok((mut c, _)) = l.accept() {
                    c.set_nonblocking(false).unwrap();
                    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                    let mut data = vec![];
                    c.read_to_end(&mut data).expect("tcp read");
                    c.write_all(&data).expect("tcp echo");
                    served_tcp += 1;
                }
            }
        }
        done_tx.send(()).unwrap();
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("servers ready");
    done_rx
}

/// Segments a finished TCP socket sent and received (tcp_info), counted per wire segment.
fn tcp_segments(s: &TcpStream) -> (u64, u64) {
    // SAFETY: tcp_info is plain old data; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    assert_eq!(
        info.tcpi_total_retrans, 0,
        "a retransmission would make segment counts ambiguous"
    );
    (u64::from(info.tcpi_segs_out), u64::from(info.tcpi_segs_in))
}

/// Sends `MALFORMED` IPv4 frames whose header length field points past the frame, through a packet socket
/// on the gateway's veth (packet sockets go through the qdisc layer, so TC egress sees them), and checks
/// that the kernel reports each one dropped.
fn send_malformed() {
    let mut frame = build("malformed", &[ipv4(), udp(UDP_PORT)], 0);
    let ip = frame.offsets[0];
    frame.bytes[ip] = 0x4f; // IHL 15: 60 bytes of header that the frame does not have
    let frames = vec![frame.bytes.as_slice(); MALFORMED as usize];
    assert_eq!(
        send_raw(GW_IF, &frames),
        MALFORMED as usize,
        "malformed frames not dropped on egress"
    );
}

fn ping(pair: &Pair, args: &[&str]) {
    let count = PINGS.to_string();
    let mut cmd = vec!["ping", "-q", "-c", &count, "-i", "0.05", "-W", "2"];
    cmd.extend_from_slice(args);
    pair.gw.exec(&cmd);
}

/// Every IP packet counts exactly one L4 stat or is a non-first fragment.
fn assert_consistent(stats: &ParseStats, hook: Hook) {
    let ip = stats.get(hook, Stat::Ipv4) + stats.get(hook, Stat::Ipv6);
    let l4: u64 = [
        Stat::Tcp,
        Stat::Udp,
        Stat::Icmp,
        Stat::Icmpv6,
        Stat::OtherL4,
        Stat::FragmentNonFirst,
    ]
    .iter()
    .map(|&s| stats.get(hook, s))
    .sum();
    assert_eq!(
        ip,
        l4,
        "{hook:?}: IP packets vs L4 + non-first fragments: {:?}",
        stats.by_name(hook).collect::<Vec<_>>()
    );
}

#[test]
fn counts_real_traffic_between_namespaces() {
    vpcgate_lab::require_root();
    let pair = Pair::new();
    let mut gw_dp = Datapath::load().unwrap_or_else(|e| panic!("{e}"));
    let mut vpc_dp = Datapath::load().unwrap_or_else(|e| panic!("{e}"));
    // The gateway may reach its whole vSwitch block (both families): this test is about counting.
    let checked = check_text("lab.toml", ALLOW_LAB);
    let policy = checked
        .policy
        .unwrap_or_else(|| panic!("{:?}", checked.diagnostics));
    gw_dp
        .apply(&Compiled::new(&policy))
        .unwrap_or_else(|e| panic!("{e}"));
    let (tc_mode, xdp_mode) = pair.gw.run(|| {
        let tc = gw_dp
            .attach_tc_egress(GW_IF)
            .unwrap_or_else(|e| panic!("{e}"));
        let xdp = gw_dp
            .attach_xdp(GW_IF, XdpRole::EniIngress)
            .unwrap_or_else(|e| panic!("{e}"));
        (tc, xdp)
    });
    pair.vpc.run(|| {
        vpc_dp
            .attach_xdp(VPC_IF, XdpRole::EniIngress)
            .unwrap_or_else(|e| panic!("{e}"))
    });
    eprintln!("attached: tc egress via {tc_mode:?}, xdp {xdp_mode:?}");
    assert_eq!(xdp_mode, XdpAttachMode::Native, "veth supports native XDP");
    let shown = pair.gw.ip(&["link", "show", GW_IF]);
    assert!(
        shown.contains("xdp"),
        "ip link shows no XDP program on {GW_IF}:\n{shown}"
    );

    let udp_total = 2 * (UDP_COUNT + BIG_COUNT);
    let done = start_servers(&pair, udp_total, 2 * TCP_CONNECTIONS);

    // UDP, both families, small and fragmented, each echoed back.
    pair.gw.run(|| {
        for target in vpc_addrs() {
            let bind = if target.is_ipv4() {
                format!("{GW_V4}:0")
            } else {
                format!("[{GW_V6}]:0")
            };
            let s = UdpSocket::bind(bind).expect("bind client");
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let mut to = target;
            to.set_port(UDP_PORT);
            let mut buf = vec![0u8; 65536];
            for i in 0..UDP_COUNT + BIG_COUNT {
                let len = if i < UDP_COUNT { 64 } else { BIG_LEN };
                s.send_to(&vec![i as u8; len], to).expect("udp send");
                let (n, _) = s
                    .recv_from(&mut buf)
                    .unwrap_or_else(|e| panic!("echo {i} from {to}: {e}"));
                assert_eq!(n, len);
            }
        }
    });

    // TCP: connect, send, half-close, read the echo; count segments from tcp_info.
    let (tcp_out, tcp_in) = pair.gw.run(|| {
        let (mut out, mut inn) = (0, 0);
        for i in 0..TCP_CONNECTIONS {
            for mut to in vpc_addrs() {
                to.set_port(TCP_PORT);
                let mut c = TcpStream::connect_timeout(&to, IO_TIMEOUT).expect("connect");
                c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                c.write_all(&[i as u8; 100]).unwrap();
                c.shutdown(Shutdown::Write).unwrap();
                let mut back = vec![];
                c.read_to_end(&mut back).unwrap();
                assert_eq!(back.len(), 100);
                // Let the final ACK of the server's FIN leave before reading the counters.
                std::thread::sleep(Duration::from_millis(20));
                let (o, n) = tcp_segments(&c);
                out += o;
                inn += n;
            }
        }
        (out, inn)
    });
    done.recv_timeout(Duration::from_secs(30))
        .expect("servers finished");

    ping(&pair, &[VPC_V4]);
    ping(&pair, &["-6", VPC_V6]);
    pair.gw.run(send_malformed);
    std::thread::sleep(Duration::from_millis(200));

    let gw = gw_dp.parse_stats().unwrap();
    let vpc = vpc_dp.parse_stats().unwrap();
    let report = |s: &ParseStats, h| format!("{:?}", s.by_name(h).collect::<Vec<_>>());
    eprintln!("gw tc egress: {}", report(&gw, Hook::TcEgress));
    eprintln!("gw xdp:       {}", report(&gw, Hook::Xdp));
    eprintln!("vpc xdp:      {}", report(&vpc, Hook::Xdp));

    let udp_datagrams = 2 * (UDP_COUNT + BIG_COUNT);
    let non_first = 2 * BIG_COUNT * (BIG_FRAGMENTS - 1);
    let first = 2 * BIG_COUNT;
    // What the gateway sent: on its TC egress, and arriving on the backend's XDP.
    for (stats, hook, side) in [
        (&gw, Hook::TcEgress, "gw tc egress"),
        (&vpc, Hook::Xdp, "vpc xdp"),
    ] {
        assert_eq!(stats.get(hook, Stat::Udp), udp_datagrams, "{side}: udp");
        assert_eq!(
            stats.get(hook, Stat::FragmentFirst),
            first,
            "{side}: first fragments"
        );
        assert_eq!(
            stats.get(hook, Stat::FragmentNonFirst),
            non_first,
            "{side}: non-first fragments"
        );
        assert_eq!(
            stats.get(hook, Stat::Tcp),
            tcp_out,
            "{side}: tcp segments (tcp_info segs_out)"
        );
        assert_eq!(
            stats.get(hook, Stat::Icmp),
            PINGS,
            "{side}: icmp echo requests"
        );
        assert!(
            stats.get(hook, Stat::Icmpv6) >= PINGS,
            "{side}: icmpv6 echo requests (+ neighbour discovery)"
        );
        assert!(stats.get(hook, Stat::NonIp) >= 1, "{side}: ARP");
        assert_consistent(stats, hook);
    }
    // What came back to the gateway.
    assert_eq!(
        gw.get(Hook::Xdp, Stat::Udp),
        udp_datagrams,
        "gw xdp: udp echoes"
    );
    assert_eq!(
        gw.get(Hook::Xdp, Stat::FragmentNonFirst),
        non_first,
        "gw xdp: non-first fragments"
    );
    assert_eq!(
        gw.get(Hook::Xdp, Stat::Tcp),
        tcp_in,
        "gw xdp: tcp segments (tcp_info segs_in)"
    );
    assert_eq!(
        gw.get(Hook::Xdp, Stat::Icmp),
        PINGS,
        "gw xdp: icmp echo replies"
    );
    assert_consistent(&gw, Hook::Xdp);
    // Malformed frames: dropped on the gateway's egress, never seen by the backend.
    assert_eq!(
        gw.get(Hook::TcEgress, Stat::Malformed),
        MALFORMED,
        "gw tc egress: malformed dropped"
    );
    assert_eq!(
        vpc.get(Hook::Xdp, Stat::Malformed),
        0,
        "vpc xdp: a malformed frame got through"
    );
    assert_eq!(
        gw.get(Hook::Xdp, Stat::Malformed),
        0,
        "gw xdp: nothing malformed came back"
    );

    // Dropping the datapath detaches everything it attached.
    drop(gw_dp);
    let shown = pair.gw.ip(&["link", "show", GW_IF]);
    assert!(
        !shown.contains("xdp"),
        "XDP still attached after drop:\n{shown}"
    );
}
