//! Enforcement with real sockets between two network namespaces: the gateway (`gw`, TC egress + XDP
//! ingress on its veth, the policy applied) and a VPC (`vpc`) with backends.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use vpcgate::{
    datapath::Datapath,
    policy::{check_text, compile::Compiled},
};
use vpcgate_common::verdict::DropReason;
use vpcgate_lab::{
    netns::{GW_IF, Pair, VPC_IF, send_raw},
    packet::{Layer, build},
};

const POLICY: &str = r#"
[instance]
name = "lab"
kind = "dedicated"
vpc_id = "vpc-lab"
interface = "veth-gw"
egress_ip = "10.200.0.1"
reserved_cidrs = ["10.200.0.16/28"]
mode = "MODE"

[[authorization]]
name = "web"
vpc_id = "vpc-lab"
address = "10.200.0.2"
ports = ["8080"]

[[authorization]]
name = "echo"
vpc_id = "vpc-lab"
address = "10.200.0.2"
ports = ["9000"]
protocol = "udp"

[[authorization]]
name = "closed"
vpc_id = "vpc-lab"
address = "10.200.0.2"
ports = ["8082"]

[[authorization]]
name = "nobody-listens"
vpc_id = "vpc-lab"
address = "10.200.0.2"
ports = ["9003"]
protocol = "udp"

[[authorization]]
name = "web6"
vpc_id = "vpc-lab"
address = "fd00:200::2"
ports = ["8080"]
"#;

const SHORT: Duration = Duration::from_millis(400);
const LONG: Duration = Duration::from_secs(3);

struct Lab {
    pair: Pair,
    dp: Datapath,
    compiled: Compiled,
}

impl Lab {
    fn new(mode: &str) -> Self {
        vpcgate_lab::require_root();
        let pair = Pair::new();
        // More backends in the VPC: one nobody authorized, one inside the reserved block.
        pair.vpc
            .ip(&["addr", "add", "10.200.0.10/24", "dev", VPC_IF]);
        pair.vpc
            .ip(&["addr", "add", "10.200.0.20/24", "dev", VPC_IF]);
        let checked = check_text("lab.toml", &POLICY.replace("MODE", mode));
        let policy = checked
            .policy
            .unwrap_or_else(|| panic!("{:?}", checked.diagnostics));
        let compiled = Compiled::new(&policy);
        let mut dp = Datapath::load().unwrap_or_else(|e| panic!("{e}"));
        dp.apply(&compiled).unwrap_or_else(|e| panic!("{e}"));
        vpcgate_lab::netns::enforce_on_gateway(&mut dp, &pair);
        Self { pair, dp, compiled }
    }

    fn rule(&self, name: &str) -> u32 {
        self.compiled
            .rules
            .iter()
            .find(|r| r.name == name)
            .unwrap()
            .id
    }

    fn drops(&self, r: DropReason) -> u64 {
        self.dp.drop_counts().unwrap().dropped[&r]
    }

    fn audited(&self, r: DropReason) -> u64 {
        self.dp.drop_counts().unwrap().audited[&r]
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A UDP socket bound in the namespace `run` executes in.
fn udp(bind: &str) -> UdpSocket {
    let s = UdpSocket::bind(addr(bind)).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
    s.set_read_timeout(Some(SHORT)).unwrap();
    s
}

fn received(s: &UdpSocket, max: usize) -> Vec<usize> {
    let mut buf = vec![0u8; 65536];
    let mut got = vec![];
    while got.len() < max {
        match s.recv_from(&mut buf) {
            Ok((n, _)) => got.push(n),
            Err(_) => break,
        }
    }
    got
}

/// Connects within `SHORT`; a dropped SYN times out.
fn connect(to: &str) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr(to), SHORT)
}

fn tcp_echo_once(listener: TcpListener) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        listener.set_nonblocking(false).unwrap();
        if let Ok((mut c, _)) = listener.accept() {
            c.set_read_timeout(Some(LONG)).unwrap();
            let mut data = vec![];
            let _ = c.read_to_end(&mut data);
            let _ = c.write_all(&data);
        }
    })
}

#[test]
fn allowed_traffic_passes_and_denied_traffic_drops_with_its_reason() {
    let lab = Lab::new("enforce");
    let (web, web_other_port, web6, reserved, echo, nobody) = lab.pair.vpc.run(|| {
        (
            TcpListener::bind(addr("10.200.0.2:8080")).unwrap(),
            TcpListener::bind(addr("10.200.0.2:8081")).unwrap(),
            TcpListener::bind(addr("[fd00:200::2]:8080")).unwrap(),
            TcpListener::bind(addr("10.200.0.20:8080")).unwrap(),
            udp("10.200.0.2:9000"),
            udp("10.200.0.10:9000"),
        )
    });
    let servers = [tcp_echo_once(web), tcp_echo_once(web6)];
    lab.pair.gw.run(|| {
        // Allowed TCP, both families (IPv6 needs neighbour discovery to work through the filter).
        for to in ["10.200.0.2:8080", "[fd00:200::2]:8080"] {
            let mut c = TcpStream::connect_timeout(&addr(to), LONG)
                .unwrap_or_else(|e| panic!("connect {to}: {e}"));
            c.set_read_timeout(Some(LONG)).unwrap();
            c.write_all(b"hello").unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            let mut back = vec![];
            c.read_to_end(&mut back).unwrap();
            assert_eq!(back, b"hello", "echo from {to}");
        }
        // Wrong port of an authorized address, and an address in a reserved block: SYNs never leave.
        assert!(
            connect("10.200.0.2:8081").is_err(),
            "connected to a port no authorization names"
        );
        assert!(
            connect("10.200.0.20:8080").is_err(),
            "connected into a reserved block"
        );
        // Authorized, but nothing listens: the backend answers RST (TCP) and port unreachable (UDP).
        let refused = connect("10.200.0.2:8082").expect_err("connected to a closed port");
        assert_eq!(
            refused.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{refused}"
        );
        let s = udp("10.200.0.1:0");
        s.send_to(b"?", addr("10.200.0.2:9003")).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let s = udp("10.200.0.1:0");
        for i in 0..5u8 {
            s.send_to(&[i; 32], addr("10.200.0.2:9000")).unwrap();
        }
        for i in 0..3u8 {
            // ENOBUFS or success: the drop is what counts, asserted below.
            let _ = s.send_to(&[i; 32], addr("10.200.0.10:9000"));
        }
    });
    for h in servers {
        h.join().unwrap();
    }
    assert_eq!(
        received(&echo, 5),
        [32; 5],
        "authorized UDP did not all arrive"
    );
    assert_eq!(
        received(&nobody, 3),
        Vec::<usize>::new(),
        "unauthorized UDP arrived"
    );
    drop((web_other_port, reserved));

    // Per reason.
    assert_eq!(lab.drops(DropReason::NotAuthorized), 3);
    assert!(lab.drops(DropReason::PortNotAuthorized) >= 1);
    assert!(lab.drops(DropReason::ReservedRange) >= 1);
    assert_eq!(lab.drops(DropReason::Malformed), 0);
    // Per rule.
    let rules = lab.dp.rule_stats().unwrap();
    assert_eq!(rules[&lab.rule("echo")].packets, 5);
    assert_eq!(rules[&lab.rule("echo")].bytes, 5 * (14 + 20 + 8 + 32));
    assert!(rules[&lab.rule("web")].packets >= 4, "{rules:?}");
    assert!(rules[&lab.rule("web6")].packets >= 4, "{rules:?}");
    // Per destination.
    let d = |a: &str, proto, port| {
        lab.dp
            .destination(a.parse().unwrap(), proto, port)
            .unwrap()
            .unwrap_or_else(|| panic!("no observation of {a}:{port}: {:?}", lab.dp.destinations()))
    };
    let echo_dst = d("10.200.0.2", 17, 9000);
    assert_eq!(
        (echo_dst.passed, echo_dst.dropped, echo_dst.last_reason),
        (5, 0, None)
    );
    let nobody_dst = d("10.200.0.10", 17, 9000);
    assert_eq!(
        (
            nobody_dst.passed,
            nobody_dst.dropped,
            nobody_dst.last_reason
        ),
        (0, 3, Some(DropReason::NotAuthorized))
    );
    let wrong_port = d("10.200.0.2", 6, 8081);
    assert_eq!(
        (
            wrong_port.passed,
            wrong_port.syn_sent,
            wrong_port.last_reason
        ),
        (0, 0, Some(DropReason::PortNotAuthorized))
    );
    assert!(wrong_port.dropped >= 1);
    assert_eq!(
        d("10.200.0.20", 6, 8080).last_reason,
        Some(DropReason::ReservedRange)
    );
    let web_dst = d("10.200.0.2", 6, 8080);
    assert_eq!(
        (
            web_dst.syn_sent,
            web_dst.dropped,
            web_dst.syn_ack,
            web_dst.rst
        ),
        (1, 0, 1, 0)
    );
    // What came back, matched to the destination the gateway sent to.
    let closed = d("10.200.0.2", 6, 8082);
    assert_eq!((closed.syn_sent, closed.syn_ack, closed.rst), (1, 0, 1));
    let unreachable = d("10.200.0.2", 17, 9003);
    assert_eq!((unreachable.passed, unreachable.icmp_errors), (1, 1));
    assert_eq!(
        (unreachable.icmp_type, unreachable.icmp_code),
        (Some(3), Some(3)),
        "ICMP port unreachable"
    );
    assert_eq!(
        wrong_port.syn_ack + wrong_port.rst + wrong_port.icmp_errors,
        0,
        "a dropped SYN got an answer"
    );
}

#[test]
fn replies_to_flows_the_vpc_initiated_pass() {
    let lab = Lab::new("enforce");
    // Servers on the gateway: the policy authorizes nothing toward the VPC client's ephemeral ports.
    let (listener, usock) = lab.pair.gw.run(|| {
        (
            TcpListener::bind(addr("10.200.0.1:7000")).unwrap(),
            udp("10.200.0.1:7001"),
        )
    });
    let server = tcp_echo_once(listener);
    let udp_server = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        if let Ok((n, from)) = usock.recv_from(&mut buf) {
            usock.send_to(&buf[..n], from).unwrap();
        }
    });
    lab.pair.vpc.run(|| {
        let mut c = TcpStream::connect_timeout(&addr("10.200.0.1:7000"), LONG)
            .expect("connect to the gateway");
        c.set_read_timeout(Some(LONG)).unwrap();
        c.write_all(b"ping").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut back = vec![];
        c.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"ping");
        let s = udp("10.200.0.2:0");
        s.set_read_timeout(Some(LONG)).unwrap();
        s.send_to(b"u", addr("10.200.0.1:7001")).unwrap();
        let mut buf = [0u8; 8];
        let (n, _) = s.recv_from(&mut buf).expect("the gateway's UDP reply");
        assert_eq!(&buf[..n], b"u");
    });
    server.join().unwrap();
    udp_server.join().unwrap();
    assert_eq!(
        lab.drops(DropReason::NotAuthorized),
        0,
        "a reply was dropped"
    );
    assert_eq!(
        lab.drops(DropReason::PortNotAuthorized),
        0,
        "a reply was dropped"
    );
    // Gateway-initiated traffic to the same peer is still policed.
    lab.pair
        .gw
        .run(|| assert!(connect("10.200.0.2:22").is_err()));
    assert!(lab.drops(DropReason::PortNotAuthorized) >= 1);
}

#[test]
fn audit_mode_passes_everything_and_counts_would_be_drops() {
    let lab = Lab::new("audit");
    let nobody = lab.pair.vpc.run(|| udp("10.200.0.10:9000"));
    lab.pair.gw.run(|| {
        let s = udp("10.200.0.1:0");
        for i in 0..3u8 {
            s.send_to(&[i; 16], addr("10.200.0.10:9000")).unwrap();
        }
    });
    assert_eq!(received(&nobody, 3), [16; 3], "audit mode dropped traffic");
    assert_eq!(lab.drops(DropReason::NotAuthorized), 0);
    assert_eq!(lab.audited(DropReason::NotAuthorized), 3);
    let d = lab
        .dp
        .destination("10.200.0.10".parse().unwrap(), 17, 9000)
        .unwrap()
        .unwrap();
    assert_eq!(
        (d.passed, d.dropped, d.audited, d.last_reason),
        (0, 0, 3, Some(DropReason::NotAuthorized))
    );
}

#[test]
fn fragments_pass_only_with_their_verified_first_fragment() {
    let lab = Lab::new("enforce");
    let (echo, other) = lab
        .pair
        .vpc
        .run(|| (udp("10.200.0.2:9000"), udp("10.200.0.2:9001")));
    lab.pair.gw.run(|| {
        let s = udp("10.200.0.1:0");
        // 4000 bytes over a 1500-byte MTU: three fragments; the first carries the authorized port.
        s.send_to(&[7u8; 4000], addr("10.200.0.2:9000")).unwrap();
        // Toward a port no authorization names: the first fragment drops, so must the others.
        let _ = s.send_to(&[8u8; 4000], addr("10.200.0.2:9001"));
    });
    assert_eq!(
        received(&echo, 1),
        [4000],
        "the fragmented authorized datagram did not arrive whole"
    );
    assert_eq!(received(&other, 1), Vec::<usize>::new());
    assert_eq!(
        lab.drops(DropReason::PortNotAuthorized),
        1,
        "first fragment toward the wrong port"
    );
    // Linux stops fragmenting a datagram once a fragment fails to go out (ip_do_fragment frees the rest),
    // so its non-first fragments never reach TC egress: the orphans below exercise that path instead.
    assert_eq!(lab.drops(DropReason::FragmentUnverified), 0);
    // Non-first fragments whose first fragment never passed: dropped, whatever they claim.
    let orphans: Vec<Vec<u8>> = (0..4u16)
        .map(|i| {
            build(
                "orphan fragment",
                &[
                    Layer::Ipv4 {
                        src: [10, 200, 0, 1],
                        dst: [10, 200, 0, 2],
                        options: 0,
                        frag_offset: 185,
                        more_fragments: false,
                        id: 4242 + i,
                    },
                    Layer::Proto { proto: 17, len: 64 },
                ],
                0,
            )
            .bytes
        })
        .collect();
    let orphans: Vec<&[u8]> = orphans.iter().map(Vec::as_slice).collect();
    let reported = lab.pair.gw.run(|| send_raw(GW_IF, &orphans));
    assert_eq!(
        reported, 4,
        "the kernel did not report the orphan fragments dropped"
    );
    assert_eq!(lab.drops(DropReason::FragmentUnverified), 4);
}
