//! The lab (DESIGN.md, "The lab"): a gateway namespace whose ENI has the egress IP, and a VPC namespace
//! with a backend of every kind a diagnosis must tell apart, all on one link so the gateway resolves each
//! directly (ARP, neighbour discovery):
//!
//! | address                   | what a TCP SYN from the egress IP gets                               |
//! |---------------------------|----------------------------------------------------------------------|
//! | `BACKEND_*`:`HTTP_PORT`   | an HTTP server (this process), status 200 unless `set_http_status`   |
//! | `BACKEND_*`:`CLOSED_PORT` | a RST: nothing listens                                               |
//! | `SG_DROP_*`:`HTTP_PORT`   | nothing: the "security group" drops it (from `SECOND_*` it connects) |
//! | `SG_REJECT_*`:`HTTP_PORT` | ICMP / ICMPv6 destination unreachable, administratively prohibited   |
//! | `NOBODY_*`                | nothing: no one owns the address, neighbour resolution fails         |
//!
//! What a connect() from the gateway reports for each, as seen on Linux 6.18 (tests/lab.rs checks it):
//! ECONNREFUSED for the closed port; a timeout for the drop and for nobody (the neighbour entry is then
//! INCOMPLETE or FAILED); for the reject EHOSTUNREACH at once in IPv4, but EACCES in IPv6, and only
//! after the SYN's first retransmission (about 1 s): the veth round trip is so short that the first
//! ICMPv6 error arrives while connect() still holds the socket lock, which keeps it as a soft error.
//!
//! The security groups are one nftables table (`inet lab_sg`) in the VPC namespace. ICMP rate limiting is
//! off there, so every rejected SYN gets its ICMP error. `Lab::new` attaches nothing of vpcgate's; drop
//! removes everything (and `remove_on_signal` makes an interrupt do the same).

use std::{
    fs::File,
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::netns::Netns;
pub use crate::{
    cleanup::{on_signal_cleanup, remove_on_signal},
    netns::{spawn_command_in, spawn_in},
};

/// The gateway's ENI (in the gateway namespace).
pub const ENI: &str = "eni0";
/// Its veth peer, holding the backends' addresses (in the VPC namespace).
pub const VPC_IF: &str = "vpc0";
/// The link's prefixes: every address below is on `PREFIX_V4` / `PREFIX_V6`.
pub const PREFIX_V4: &str = "10.77.0.0/24";
pub const PREFIX_V6: &str = "fd77::/64";

/// The egress IP: the gateway's primary address, the default source toward the link.
pub const EGRESS_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 5);
pub const EGRESS_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 5);
/// A second local address of the gateway (used only when bound explicitly).
pub const SECOND_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 6);
pub const SECOND_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 6);
/// Listens on `HTTP_PORT` (the lab's HTTP server); nothing on `CLOSED_PORT`.
pub const BACKEND_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 10);
pub const BACKEND_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x10);
/// Listens on `HTTP_PORT`; the security group silently drops TCP from the egress IP, admits `SECOND_*`.
pub const SG_DROP_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 20);
pub const SG_DROP_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x20);
/// Listens on `HTTP_PORT`; the security group rejects TCP from the egress IP with ICMP (v6) destination
/// unreachable, administratively prohibited.
pub const SG_REJECT_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 30);
pub const SG_REJECT_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x30);
/// Owned by the VPC namespace (so neighbour resolution succeeds) but named by no rule of
/// `example_policy`: the policy's drop is what stops a SYN there.
pub const UNLISTED_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 40);
/// Owned by the VPC namespace, inside `example_policy`'s reserved block 10.77.0.128/25.
pub const RESERVED_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 200);
/// On the link's prefix, owned by no one: the gateway's neighbour resolution fails.
pub const NOBODY_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 99);
pub const NOBODY_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x99);

/// Where the HTTP server answers (every backend address).
pub const HTTP_PORT: u16 = 80;
/// Where nothing listens (on every backend address): a SYN gets a RST.
pub const CLOSED_PORT: u16 = 81;

/// The server's response body.
pub const HTTP_BODY: &str = "vpcgate lab backend\n";

/// The security groups, applied with `nft -f -` in the VPC namespace.
fn security_groups() -> String {
    format!(
        "table inet lab_sg {{
    chain input {{
        type filter hook input priority filter; policy accept;
        ip daddr {SG_DROP_V4} ip saddr {SECOND_V4} accept
        ip6 daddr {SG_DROP_V6} ip6 saddr {SECOND_V6} accept
        ip daddr {SG_DROP_V4} ip saddr {EGRESS_V4} meta l4proto tcp drop
        ip6 daddr {SG_DROP_V6} ip6 saddr {EGRESS_V6} meta l4proto tcp drop
        ip daddr {SG_REJECT_V4} ip saddr {EGRESS_V4} meta l4proto tcp reject with icmp type admin-prohibited
        ip6 daddr {SG_REJECT_V6} ip6 saddr {EGRESS_V6} meta l4proto tcp reject with icmpv6 type admin-prohibited
    }}
}}
"
    )
}

/// The two namespaces, the security groups and the HTTP server; all removed on drop.
pub struct Lab {
    /// The gateway namespace: `ENI` with the egress and second addresses.
    pub gw: Netns,
    /// The VPC namespace: `VPC_IF` with the backends' addresses, the security groups, the HTTP server.
    pub vpc: Netns,
    server: Option<Server>,
}

impl Lab {
    /// Builds the lab; panics with the failing step's output when it cannot.
    pub fn new() -> Self {
        let gw = Netns::new("gw");
        let vpc = Netns::new("vpc");
        gw.ip(&[
            "link",
            "add",
            ENI,
            "type",
            "veth",
            "peer",
            "name",
            VPC_IF,
            "netns",
            vpc.name(),
        ]);
        let gw_addrs = [EGRESS_V4, SECOND_V4].map(IpAddr::from);
        let gw_addrs6 = [EGRESS_V6, SECOND_V6].map(IpAddr::from);
        let vpc_addrs = [
            BACKEND_V4,
            SG_DROP_V4,
            SG_REJECT_V4,
            UNLISTED_V4,
            RESERVED_V4,
        ]
        .map(IpAddr::from);
        let vpc_addrs6 = [BACKEND_V6, SG_DROP_V6, SG_REJECT_V6].map(IpAddr::from);
        for (ns, dev, addrs) in [
            (&gw, ENI, [&gw_addrs[..], &gw_addrs6[..]].concat()),
            (&vpc, VPC_IF, [&vpc_addrs[..], &vpc_addrs6[..]].concat()),
        ] {
            // No DAD: the addresses are usable at once, without waiting for duplicate detection.
            ns.exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{dev}.accept_dad=0"),
            ]);
            // In the order given: the first IPv4 address is the primary one (the default source).
            for a in addrs {
                let cidr = match a {
                    IpAddr::V4(_) => format!("{a}/24"),
                    IpAddr::V6(_) => format!("{a}/64"),
                };
                let mut args = vec!["addr", "add", &cidr, "dev", dev];
                if a.is_ipv6() {
                    args.push("nodad");
                }
                ns.ip(&args);
            }
            ns.ip(&["link", "set", dev, "up"]);
        }
        // IPv6 has no primary address: among equals the kernel prefers the newest (SECOND_V6). The prefix
        // route's preferred source makes the egress IP the default, as in IPv4.
        gw.ip(&[
            "-6",
            "route",
            "replace",
            PREFIX_V6,
            "dev",
            ENI,
            "proto",
            "kernel",
            "metric",
            "256",
            "src",
            &EGRESS_V6.to_string(),
        ]);
        // Every rejected SYN gets its ICMP error, however many a test sends in a second.
        vpc.exec(&["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"]);
        vpc.exec(&["sysctl", "-qw", "net.ipv6.icmp.ratelimit=0"]);
        nft(&vpc, &security_groups());
        let server = Server::start(&vpc);
        Self {
            gw,
            vpc,
            server: Some(server),
        }
    }

    /// Runs `f` on a thread inside the gateway namespace.
    pub fn gw_run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.gw.run(f)
    }

    /// Runs `f` on a thread inside the VPC namespace.
    pub fn vpc_run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.vpc.run(f)
    }

    fn http(&self) -> &HttpState {
        &self
            .server
            .as_ref()
            .expect("the server runs until drop")
            .state
    }

    /// How many requests the HTTP server answered (on any backend address).
    pub fn http_requests(&self) -> u64 {
        self.http().requests.load(Ordering::SeqCst)
    }

    /// The Host header of the last request that had one.
    pub fn last_host(&self) -> Option<String> {
        self.http().last_host.lock().unwrap().clone()
    }

    /// The status code the HTTP server answers with from now on (200 at first).
    pub fn set_http_status(&self, code: u16) {
        assert!((100..1000).contains(&code), "HTTP status {code}");
        self.http().status.store(code, Ordering::SeqCst);
    }

    pub fn http_status(&self) -> u16 {
        self.http().status.load(Ordering::SeqCst)
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The server's threads live in the VPC namespace and would keep it (and the veth) alive past
        // `ip netns del`: they stop first, then the fields drop the namespaces.
        if let Some(server) = self.server.take() {
            server.stop();
        }
    }
}

/// `nft -f -` with `rules` on stdin, in `ns` (a new mount namespace is harmless for nft).
fn nft(ns: &Netns, rules: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name(), "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run nft (is the nftables package installed?): {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap_or_else(|e| panic!("write to nft: {e}"));
    let out = child.wait_with_output().expect("wait for nft");
    assert!(
        out.status.success(),
        "nft -f - in {} failed ({}):\n{}{}\nrules:\n{rules}",
        ns.name(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the HTTP server shares with the `Lab`.
struct HttpState {
    requests: AtomicU64,
    last_host: Mutex<Option<String>>,
    status: AtomicU16,
}

/// The HTTP server: a thread inside the VPC namespace accepting on `[::]:HTTP_PORT` (both families),
/// one thread per connection.
struct Server {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
    state: Arc<HttpState>,
}

/// How often the accept loop looks at the stop flag.
const POLL: Duration = Duration::from_millis(20);
/// Per connection, for each read and write.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest request head read.
const MAX_HEAD: usize = 16 * 1024;

impl Server {
    /// Starts the server; returns once it listens.
    fn start(vpc: &Netns) -> Self {
        let path = format!("/run/netns/{}", vpc.name());
        let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(HttpState {
            requests: AtomicU64::new(0),
            last_host: Mutex::new(None),
            status: AtomicU16::new(200),
        });
        let (ready_tx, ready) = mpsc::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name("lab-http".into())
            .spawn({
                let (stop, state) = (stop.clone(), state.clone());
                move || {
                    // SAFETY: setns on a namespace fd only changes this thread's network namespace (and
                    // that of the threads it spawns); it lives until the Lab stops it.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        let e = std::io::Error::last_os_error();
                        let _ = ready_tx.send(Err(format!("setns({path}): {e}")));
                        return;
                    }
                    drop(ns);
                    match listen() {
                        Ok(listener) => {
                            let _ = ready_tx.send(Ok(()));
                            serve(listener, &stop, &state);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("listen on [::]:{HTTP_PORT}: {e}")));
                        }
                    }
                }
            })
            .expect("spawn the lab's HTTP server");
        match ready.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("the lab's HTTP server: {e}"),
            Err(_) => panic!("the lab's HTTP server thread died before listening"),
        }
        Self {
            stop,
            thread,
            state,
        }
    }

    /// Stops accepting, ends open connections, joins every thread.
    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        if self.thread.join().is_err() {
            eprintln!("warning: the lab's HTTP server thread panicked");
        }
    }
}

/// `[::]:HTTP_PORT`, dual-stack, nonblocking.
fn listen() -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    s.set_only_v6(false)?;
    s.set_reuse_address(true)?;
    s.bind(&SockAddr::from(SocketAddr::from((
        Ipv6Addr::UNSPECIFIED,
        HTTP_PORT,
    ))))?;
    s.listen(128)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// The accept loop, until `stop`.
fn serve(listener: TcpListener, stop: &AtomicBool, state: &Arc<HttpState>) {
    // Each connection's thread, and a handle on its socket to cut it short at stop.
    let mut conns: Vec<(JoinHandle<()>, TcpStream)> = vec![];
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let Ok(handle) = stream.try_clone() else {
                    continue;
                };
                let state = state.clone();
                match std::thread::Builder::new()
                    .name("lab-http-conn".into())
                    .spawn(move || handle_connection(stream, &state))
                {
                    Ok(t) => conns.push((t, handle)),
                    Err(e) => eprintln!("lab: HTTP server: spawn a connection thread: {e}"),
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                // E.g. ECONNABORTED (a peer gone before accept) or EMFILE: keep serving.
                eprintln!("lab: HTTP server: accept: {e}");
                std::thread::sleep(POLL);
            }
        }
        conns.retain(|(t, _)| !t.is_finished());
    }
    for (t, s) in conns {
        let _ = s.shutdown(std::net::Shutdown::Both);
        let _ = t.join();
    }
}

/// Reads one request head, answers it, closes. Gives up silently on a client that is slow or gone.
fn handle_connection(mut stream: TcpStream, state: &HttpState) {
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(Some(IO_TIMEOUT)).is_err()
        || stream.set_write_timeout(Some(IO_TIMEOUT)).is_err()
    {
        return;
    }
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > MAX_HEAD {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head);
    let host = head
        .split("\r\n")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("host")
                .then(|| value.trim().to_owned())
        });
    let code = state.status.load(Ordering::SeqCst);
    let response = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\
         X-Lab-Host: {}\r\n\r\n{HTTP_BODY}",
        reason(code),
        HTTP_BODY.len(),
        host.as_deref().unwrap_or_default(),
    );
    if let Some(h) = host {
        *state.last_host.lock().unwrap() = Some(h);
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    let _ = stream.write_all(response.as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Lab Status",
    }
}

/// A TCP connection from `source` (port chosen by the kernel) to `dest`, given up after `timeout`.
/// Call it inside a namespace (`Lab::gw_run`). The error is the kernel's: `TimedOut` when nothing
/// answered, `ConnectionRefused` for a RST, the ICMP error's errno otherwise.
pub fn connect_from(
    source: IpAddr,
    dest: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(dest), Type::STREAM, Some(Protocol::TCP))?;
    s.bind(&SockAddr::from(SocketAddr::new(source, 0)))?;
    s.connect_timeout(&SockAddr::from(dest), timeout)?;
    Ok(s.into())
}

/// `GET path` with `Host: host` on a connected stream, the whole response read (2 s timeouts): the status
/// code and the raw response.
pub fn http_get(stream: &mut TcpStream, host: &str, path: &str) -> std::io::Result<(u16, String)> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: vpcgate-lab\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                ErrorKind::InvalidData,
                format!("not an HTTP response: {response:?}"),
            )
        })?;
    Ok((code, response))
}

/// The example policy of the diagnostics tests and the demo, for instance `instance`: a dedicated
/// instance on `ENI` (so addresses the policy does not name are dropped), one authorization per kind of
/// backend, a reserved block on the link (10.77.0.128/25), and an HTTP upstream on the backend.
pub fn example_policy(instance: &str) -> String {
    format!(
        r#"# The lab's gateway: what it may reach in the "VPC" namespace.
[instance]
name = "{instance}"
kind = "dedicated"
vpc_id = "vpc-lab"
interface = "{ENI}"
egress_ip = "{EGRESS_V4}"
reserved_cidrs = ["10.77.0.128/25"]

[[authorization]]
name = "backend"
vpc_id = "vpc-lab"
instance_id = "lb-lab"
instance_type = "clb"
address = "{BACKEND_V4}"
ports = ["{HTTP_PORT}", "{CLOSED_PORT}"]
protocol = "tcp"

[[authorization]]
name = "sg-drop"
vpc_id = "vpc-lab"
instance_id = "i-sgdrop"
instance_type = "ecs"
address = "{SG_DROP_V4}"
ports = ["{HTTP_PORT}"]
protocol = "tcp"

[[authorization]]
name = "sg-reject"
vpc_id = "vpc-lab"
instance_id = "nlb-lab"
instance_type = "nlb"
address = "{SG_REJECT_V4}"
ports = ["{HTTP_PORT}"]
protocol = "tcp"

[[authorization]]
name = "nobody"
vpc_id = "vpc-lab"
instance_id = "i-gone"
instance_type = "ecs"
address = "{NOBODY_V4}"
ports = ["{HTTP_PORT}"]
protocol = "tcp"

[[authorization]]
name = "backend-v6"
vpc_id = "vpc-lab"
instance_type = "ecs"
address = "{BACKEND_V6}"
ports = ["{HTTP_PORT}", "{CLOSED_PORT}"]
protocol = "tcp"

[[authorization]]
name = "sg-drop-v6"
vpc_id = "vpc-lab"
instance_type = "ecs"
address = "{SG_DROP_V6}"
ports = ["{HTTP_PORT}"]
protocol = "tcp"

[[upstream]]
name = "web"
vpc_id = "vpc-lab"
protocol = "http"
host_header = "web.internal"
retries = 2
nodes = [{{ address = "{BACKEND_V4}", port = {HTTP_PORT}, weight = 10 }}]

# The same backend as https: it speaks plain HTTP, so the TLS handshake fails (named by the probe).
[[upstream]]
name = "web_tls"
vpc_id = "vpc-lab"
protocol = "https"
host_header = "web.internal"
retries = 1
nodes = [{{ address = "{BACKEND_V4}", port = {HTTP_PORT}, weight = 10 }}]
"#
    )
}
