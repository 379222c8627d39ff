//! `vpcgate probe TARGET`: a connectivity test from the gateway's egress IP, diagnosed from what the
//! kernel saw of exactly this connection (DESIGN.md "Probe report", "Probe flows").
//!
//! The imperative shell: resolve the targets from the policy the agent applied, connect with a socket
//! whose 5-tuple is registered in the kernel's probe map, wait for the socket or the kernel's
//! record to settle, read the neighbour table, and hand the facts to `diagnose`.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use vpcgate_common::datapath::ProbeObs;

use super::{EXIT_ERROR, EXIT_FAILED, EXIT_OK, Output, print_json, record, status};
use crate::{
    datapath::{
        Datapath, interface_address,
        ktrace::Format,
        netdev::{neighbour_state, route_to},
        probe_key,
    },
    diagnose::{self, Connect, Control, Facts, Outcome, PolicyView, Step},
    policy::{
        self,
        compile::Compiled,
        diag::escape_controls,
        explain,
        model::{InstanceType, Policy, Proto, UpstreamProtocol},
        verdict::{Action, FlowFacts, Fragment, IpPacket, L4, Packet, verdict},
    },
};

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    vpcgate probe 10.0.3.7:80\n  \
    vpcgate probe authorization/orders-slb\n  \
    vpcgate probe upstream/orders_pool --output json\n  \
    vpcgate probe --all\n  \
    vpcgate probe 10.0.3.7:80 --contrast-from 10.0.0.6 --evidence\n\n\
    Connects from the gateway's egress IP (the policy's egress_ip, else the ENI's address) with a socket\n\
    whose 5-tuple it registers with the kernel, in this network namespace, and reads the kernel's record of exactly that connection: the\n\
    verdict on its SYN at the ENI's egress, the SYN-ACK or RST answering that SYN, an ICMP error quoting\n\
    it, or this host's own drop of it (skb:kfree_skb, with the kernel's reason name). Three steps:\n\
    1 authorization (the policy), 2 network (security group, allowlist, routes), 3 service (a listener).\n\
    Needs the instance's agent to have applied a policy (reads /run/vpcgate/<instance>.applied.toml).\n\n\
    Exit status: 0 every target connected, 1 some did not, 2 usage or runtime error.")]
pub struct Args {
    /// IP:PORT, [IPv6]:PORT, authorization/NAME or upstream/NAME (every node).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub target: Option<String>,
    /// Every authorization (each port) and every upstream node of the policy.
    #[arg(long)]
    pub all: bool,
    /// How long each attempt waits for an answer: 3s, 500ms, 1m.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Repeat a failed attempt from this other local address: when it connects and the egress IP
    /// does not, the backend's allowlist is the cause for certain.
    #[arg(long, value_name = "ADDR")]
    pub contrast_from: Option<IpAddr>,
    /// Also print the kernel's record (SYNs sent, SYN-ACKs, RSTs, ICMP errors, drops).
    #[arg(long)]
    pub evidence: bool,
    /// The instance ([instance].name); optional when only one is pinned.
    #[arg(long)]
    pub instance: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

/// `3s`, `500ms`, `2m`, or whole seconds; from 100 ms to 5 minutes.
pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (3s, 500ms, 1m)"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(format!("`{s}`: the unit is ms, s or m")),
    };
    if d < Duration::from_millis(100) || d > Duration::from_secs(300) {
        return Err(format!("`{s}`: give 100ms to 5m"));
    }
    Ok(d)
}

/// One thing to probe.
#[derive(Clone, Debug)]
struct Target {
    /// `authorization/NAME`, `upstream/NAME`, or the address itself.
    name: String,
    addr: SocketAddr,
    control: Control,
    /// For http/https upstream nodes: the protocol and the Host header.
    http: Option<(UpstreamProtocol, String)>,
    attempts: u32,
}

fn control_of(t: InstanceType) -> Control {
    match t {
        InstanceType::Ecs => Control::Ecs,
        InstanceType::Clb => Control::Clb,
        InstanceType::Nlb => Control::Nlb,
        InstanceType::Ip => Control::Host,
    }
}

/// The control that decides for an address: the authorization covering it, else a host's.
fn control_for(p: &Policy, addr: IpAddr) -> Control {
    p.authorizations
        .iter()
        .find(|a| a.address.contains(&addr))
        .map_or(Control::Host, |a| control_of(a.instance_type))
}

fn authorization_targets(p: &Policy, name: &str) -> Result<Vec<Target>, String> {
    let a = p
        .authorizations
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| {
            format!(
                "the applied policy has no authorization {name:?} (it has: {})",
                p.authorizations
                    .iter()
                    .map(|a| a.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    if a.protocol != Proto::Tcp {
        return Err(format!(
            "authorization {name} is {}: probe connects over TCP only",
            a.protocol
        ));
    }
    let single = a.address.prefix_len() == a.address.max_prefix_len();
    if !single {
        return Err(format!(
            "authorization {name} covers the block {}: probe one address of it as IP:PORT",
            a.address
        ));
    }
    // Each port, up to MAX_PORTS per authorization (a wide range is sampled at its first ports).
    let count: usize = a
        .ports
        .ranges()
        .iter()
        .map(|&(lo, hi)| usize::from(hi - lo) + 1)
        .sum();
    if count > MAX_PORTS {
        eprintln!(
            "vpcgate: authorization {name} allows {count} ports: probing the first {MAX_PORTS} (name one as IP:PORT for another)"
        );
    }
    Ok(a.ports
        .ranges()
        .iter()
        .flat_map(|&(lo, hi)| lo..=hi)
        .take(MAX_PORTS)
        .map(|port| Target {
            name: format!("authorization/{name}"),
            addr: SocketAddr::new(a.address.addr(), port),
            control: control_of(a.instance_type),
            http: None,
            attempts: 1,
        })
        .collect())
}

/// Ports probed per authorization.
const MAX_PORTS: usize = 16;

fn upstream_targets(p: &Policy, name: &str) -> Result<Vec<Target>, String> {
    let u = p.upstreams.iter().find(|u| u.name == name).ok_or_else(|| {
        format!(
            "the applied policy has no upstream {name:?} (it has: {})",
            p.upstreams
                .iter()
                .map(|u| u.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    Ok(u.nodes
        .iter()
        .map(|n| {
            let addr = SocketAddr::new(n.address, n.port);
            let host = u.host_header.clone().unwrap_or_else(|| addr.to_string());
            Target {
                name: format!("upstream/{name}"),
                addr,
                control: control_for(p, n.address),
                http: Some((u.protocol, host)),
                attempts: u.retries.max(1),
            }
        })
        .collect())
}

fn targets(args: &Args, p: &Policy) -> Result<Vec<Target>, String> {
    if args.all {
        let mut out = vec![];
        for a in p.authorizations.iter().filter(|a| {
            a.protocol == Proto::Tcp && a.address.prefix_len() == a.address.max_prefix_len()
        }) {
            out.extend(authorization_targets(p, &a.name)?);
        }
        for u in &p.upstreams {
            out.extend(upstream_targets(p, &u.name)?);
        }
        if out.is_empty() {
            return Err(
                "the applied policy names no single TCP backend (authorizations of one address, upstream nodes): give IP:PORT".into(),
            );
        }
        return Ok(out);
    }
    let t = args.target.as_deref().unwrap_or_default();
    if let Some(name) = t.strip_prefix("authorization/") {
        return authorization_targets(p, name);
    }
    if let Some(name) = t.strip_prefix("upstream/") {
        return upstream_targets(p, name);
    }
    let addr: SocketAddr = t.parse().map_err(|_| {
        format!("`{t}` is not IP:PORT, [IPv6]:PORT, authorization/NAME or upstream/NAME")
    })?;
    if addr.port() == 0 {
        return Err("port 0 is not a destination port".into());
    }
    let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
    Ok(vec![Target {
        name: addr.to_string(),
        addr,
        control: control_for(p, addr.ip()),
        http: None,
        attempts: 1,
    }])
}

/// The policy's verdict on the gateway's SYN to `addr` (the same code as `explain`).
fn policy_view(
    p: &Policy,
    c: &Compiled,
    path: &str,
    egress: IpAddr,
    addr: SocketAddr,
) -> PolicyView {
    let pkt = Packet::Ip(IpPacket::new(
        egress,
        addr.ip(),
        L4::Tcp { dport: addr.port() },
        Fragment::None,
    ));
    let v = verdict(
        c,
        &pkt,
        FlowFacts {
            local_origin: true,
            ..FlowFacts::default()
        },
    );
    let allowed = v.action == Action::Pass && v.reason.is_none();
    PolicyView {
        allowed,
        audit: v.audit,
        reason: v.reason,
        detail: explain::detail(c, path, &pkt, &v),
        change: if allowed {
            None
        } else {
            explain::suggestion(p, c, &pkt, &v).map(|s| s.text)
        },
    }
}

/// The kernel's record, as the report shows it.
#[derive(Clone, Debug, Serialize)]
struct Evidence {
    syn_sent: u32,
    syn_ack: u32,
    rst: u32,
    icmp_unreachable: u32,
    icmp_type: Option<u8>,
    icmp_code: Option<u8>,
    dropped: u32,
    drop_reason: Option<&'static str>,
    kernel_drops: u32,
    kernel_drop_reason: Option<String>,
    neighbour: Option<String>,
    neighbour_state: Option<String>,
}

impl Evidence {
    fn of(f: &Facts) -> Self {
        let k = &f.kernel;
        Self {
            syn_sent: k.syns,
            syn_ack: k.syn_ack,
            rst: k.rst,
            icmp_unreachable: k.icmp,
            icmp_type: (k.icmp > 0).then_some(k.icmp_type),
            icmp_code: (k.icmp > 0).then_some(k.icmp_code),
            dropped: k.dropped,
            drop_reason: vpcgate_common::verdict::DropReason::from_code(if k.dropped > 0 {
                k.drop_reason
            } else {
                k.audit_reason
            })
            .map(|r| r.name()),
            kernel_drops: k.kernel_drops,
            kernel_drop_reason: f.kernel_reason.clone(),
            neighbour: f.neighbour.as_ref().map(|n| n.0.to_string()),
            neighbour_state: f.neighbour.as_ref().and_then(|n| n.1.clone()),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
struct Contrast {
    source: IpAddr,
    outcome: Outcome,
    /// Whether the contrast settles the cause (the other source connects, the egress IP does not).
    certain: bool,
}

#[derive(Clone, Debug, Serialize)]
struct Http {
    scheme: &'static str,
    host: String,
    status: Option<u16>,
    time_ms: Option<u64>,
    error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
struct Report {
    target: String,
    name: String,
    protocol: &'static str,
    egress_ip: IpAddr,
    outcome: Outcome,
    steps: Vec<Step>,
    cause: String,
    action: Option<String>,
    kernel: Evidence,
    attempts: u32,
    contrast: Option<Contrast>,
    http: Option<Http>,
    elapsed_ms: u64,
}

/// Runs `f`, then removes the probe's record whatever happened.
struct Registered<'a> {
    dp: &'a mut Datapath,
    key: vpcgate_common::datapath::FlowKey,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.dp.forget_probe(&self.key) {
            eprintln!("vpcgate: warning: cannot remove the probe's kernel record: {e}");
        }
    }
}

/// The probe's kernel record; evicted (an LRU of `limits::PROBES`) only when that many other probes
/// registered since.
fn record_of(
    dp: &mut Datapath,
    key: &vpcgate_common::datapath::FlowKey,
) -> Result<ProbeObs, String> {
    dp.probe_record(key).map_err(|e| {
        format!(
            "the probe's kernel record is gone ({e}): more than {} probes registered meanwhile?",
            vpcgate_common::datapath::limits::PROBES
        )
    })
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Waits until `fd` is writable (connect finished) or `ms` passed.
fn writable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd on the stack, for an fd we own.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n > 0
}

/// The kernel's record alone ends the wait: our drop, an ICMP error (the socket may keep it as a soft
/// error until the next retransmission), or this host's drop of a SYN that never left. A SYN-ACK or RST
/// ends it through the socket, which alone says whether the connection was made.
fn settled(k: &ProbeObs) -> bool {
    k.dropped > 0 || k.icmp > 0 || (k.kernel_drops > 0 && k.syns == 0)
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// One connection attempt from `source` to `target`: the facts, and the connected stream if any.
fn attempt(
    dp: &mut Datapath,
    format: Option<&Format>,
    eni: &str,
    source: IpAddr,
    target: SocketAddr,
    timeout: Duration,
) -> Result<(Facts, Option<TcpStream>), String> {
    let start = Instant::now();
    let sock = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(|e| format!("socket: {e}"))?;
    sock.bind(&SocketAddr::new(source, 0).into()).map_err(|e| {
        format!(
            "cannot bind {source}: {e} (is it an address of this host, in this network namespace?)"
        )
    })?;
    let local = sock
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or("the socket has no local address")?;
    let key = probe_key(local, target);
    dp.register_probe(&key).map_err(|e| e.to_string())?;
    let reg = Registered { dp, key };
    sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut connect = match sock.connect(&target.into()) {
        Ok(()) => Some(Connect::Connected),
        Err(e) if errno_of(&e) == libc::EINPROGRESS => None,
        Err(e) => Some(Connect::Failed {
            errno: errno_of(&e),
            message: e.to_string(),
        }),
    };
    let fd = sock.as_raw_fd();
    let deadline = start + timeout;
    while connect.is_none() {
        if writable(fd, 10) {
            connect = Some(match sock.take_error() {
                Ok(None) => Connect::Connected,
                Ok(Some(e)) | Err(e) => Connect::Failed {
                    errno: errno_of(&e),
                    message: e.to_string(),
                },
            });
            break;
        }
        let r = record_of(reg.dp, &key)?;
        if settled(&r) || Instant::now() >= deadline {
            break;
        }
        if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("interrupted".into());
        }
    }
    let mut record = record_of(reg.dp, &key)?;
    // Nothing left this host and the neighbour is still being resolved: wait for the kernel's own
    // verdict on it (a neighbour fails after its probes, ~3 s by default), bounded.
    let route = route_to(target.ip(), Some(source)).ok();
    let mut neighbour = route.map(|r| {
        (
            r.next_hop,
            neighbour_state(r.oif, r.next_hop).ok().flatten(),
        )
    });
    let neighbour_now = || {
        route.map(|r| {
            (
                r.next_hop,
                neighbour_state(r.oif, r.next_hop).ok().flatten(),
            )
        })
    };
    // Nothing left this host and nothing is known yet (the socket may already have its EHOSTUNREACH:
    // the kernel reports the neighbour's failure to the socket before it frees the queued SYNs).
    let nothing_left = !matches!(connect, Some(Connect::Connected)) && record.syns == 0;
    if nothing_left && !settled(&record) {
        let extra = Instant::now() + Duration::from_secs(5);
        while Instant::now() < extra {
            let resolving = matches!(
                neighbour.as_ref().and_then(|n| n.1.as_deref()),
                Some("INCOMPLETE" | "PROBE")
            );
            if !resolving || settled(&record) {
                break;
            }
            if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
                return Err("interrupted".into());
            }
            std::thread::sleep(Duration::from_millis(50));
            record = record_of(reg.dp, &key)?;
            neighbour = neighbour_now();
        }
        // The neighbour failed: the kernel drops the queued SYNs right after it says so; give that
        // drop a bounded moment to be recorded (and the socket its error).
        if matches!(
            neighbour.as_ref().and_then(|n| n.1.as_deref()),
            Some("FAILED")
        ) {
            let settle = Instant::now() + Duration::from_secs(1);
            while record.kernel_drops == 0 && Instant::now() < settle {
                std::thread::sleep(Duration::from_millis(20));
                record = record_of(reg.dp, &key)?;
            }
        }
    }
    // What the socket says at the end: a connection completed between the last poll and the record
    // read is a connection (never "this host dropped the SYN-ACK"), an error is its errno.
    if connect.is_none() && writable(fd, 0) {
        connect = Some(match sock.take_error() {
            Ok(None) => Connect::Connected,
            Ok(Some(e)) | Err(e) => Connect::Failed {
                errno: errno_of(&e),
                message: e.to_string(),
            },
        });
    }
    let waited_ms = start.elapsed().as_millis() as u64;
    let routed_elsewhere = match (route, crate::datapath::ifindex(eni)) {
        (Some(r), Ok(i)) if r.oif != 0 && r.oif != i => {
            Some((super::drops::interface_name(r.oif), eni.to_owned()))
        }
        _ => None,
    };
    let facts = Facts {
        routed_elsewhere,
        connect: Some(connect.clone().unwrap_or(Connect::TimedOut)),
        kernel: record,
        kernel_reason: (record.kernel_drops > 0)
            .then(|| format.map(|f| f.reason_name(record.kernel_reason)))
            .flatten(),
        neighbour,
        waited_ms,
    };
    drop(reg);
    let stream = match connect {
        Some(Connect::Connected) => {
            sock.set_nonblocking(false).map_err(|e| e.to_string())?;
            Some(TcpStream::from(sock))
        }
        _ => None,
    };
    Ok((facts, stream))
}

/// A GET with the upstream's Host header over the probe's own connection (in TLS for https, verified
/// against this host's trust store): status and time, or what failed, named. One deadline for all of it.
fn http_request(
    stream: TcpStream,
    scheme: UpstreamProtocol,
    host: &str,
    timeout: Duration,
) -> Http {
    let mut out = Http {
        scheme: match scheme {
            UpstreamProtocol::Http => "http",
            UpstreamProtocol::Https => "https",
        },
        host: host.to_owned(),
        status: None,
        time_ms: None,
        error: None,
    };
    let start = Instant::now();
    let deadline = start + timeout;
    let result = match scheme {
        UpstreamProtocol::Http => exchange(false, &stream, &mut &stream, host, deadline, timeout),
        UpstreamProtocol::Https => tls(host).and_then(|(config, name)| {
            let mut conn =
                rustls::ClientConnection::new(config, name).map_err(|e| format!("TLS: {e}"))?;
            let mut sock = &stream;
            while conn.is_handshaking() {
                until(&stream, deadline, timeout, true, "the TLS handshake")?;
                conn.complete_io(&mut sock)
                    .map_err(|e| io_words(true, "the TLS handshake", &e, host, timeout))?;
            }
            let mut io = rustls::Stream::new(&mut conn, &mut sock);
            exchange(true, &stream, &mut io, host, deadline, timeout)
        }),
    };
    match result {
        Ok(code) => {
            out.status = Some(code);
            out.time_ms = Some(start.elapsed().as_millis() as u64);
        }
        Err(e) => out.error = Some(e),
    }
    out
}

/// Bounds the next socket operation by what is left until `deadline`; an error once it passed.
fn until(
    stream: &TcpStream,
    deadline: Instant,
    timeout: Duration,
    tls: bool,
    what: &str,
) -> Result<(), String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(format!(
            "{}no answer within {} ms during {what}",
            if tls { "TLS: " } else { "" },
            timeout.as_millis()
        ));
    }
    let _ = stream.set_read_timeout(Some(left));
    let _ = stream.set_write_timeout(Some(left));
    Ok(())
}

/// An I/O error of the exchange, in words (a TLS failure named).
fn io_words(tls: bool, what: &str, e: &std::io::Error, host: &str, timeout: Duration) -> String {
    if let Some(t) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return tls_words(t, host);
    }
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof if tls => format!(
            "TLS: the backend closed the connection during {what} (does it speak TLS on this port?)"
        ),
        std::io::ErrorKind::UnexpectedEof => {
            format!("{what}: the backend closed the connection (does it speak HTTP on this port?)")
        }
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
            "{}no answer within {} ms during {what}",
            if tls { "TLS: " } else { "" },
            timeout.as_millis()
        ),
        _ => format!("{what}: {e}"),
    }
}

/// The TLS client: this host's trust store, server name from the Host header (without a port).
fn tls(
    host: &str,
) -> Result<
    (
        std::sync::Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    ),
    String,
> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        let _ = roots.add(cert);
    }
    // Without any, the handshake still runs (a backend that does not speak TLS is still told apart);
    // a certificate then fails verification, and the failure says why.
    NO_ROOTS.store(roots.is_empty(), std::sync::atomic::Ordering::Relaxed);
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    // host, host:port, an address, [v6], [v6]:port
    let bare = if host.parse::<IpAddr>().is_ok() {
        host
    } else if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    let name = rustls::pki_types::ServerName::try_from(bare.to_owned())
        .map_err(|e| format!("TLS: {bare:?} is not a server name: {e}"))?;
    Ok((std::sync::Arc::new(config), name))
}

/// Whether this host's trust store had no CA certificate at all.
static NO_ROOTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What a TLS failure means, in words.
fn tls_words(e: &rustls::Error, host: &str) -> String {
    use rustls::{CertificateError, Error};
    match e {
        Error::InvalidCertificate(CertificateError::UnknownIssuer)
            if NO_ROOTS.load(std::sync::atomic::Ordering::Relaxed) =>
        {
            "TLS: this host has no trusted CA certificates to verify the backend's certificate with: install ca-certificates (or the backend's CA)".into()
        }
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "TLS: the backend's certificate is not signed by a CA this host trusts (unknown issuer); add its CA to the trust store".into()
        }
        Error::InvalidCertificate(CertificateError::NotValidForName)
        | Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => {
            format!("TLS: the backend's certificate is not valid for {host}")
        }
        Error::InvalidCertificate(CertificateError::Expired)
        | Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            "TLS: the backend's certificate has expired".into()
        }
        Error::InvalidCertificate(c) => format!("TLS: the backend's certificate is refused: {c:?}"),
        Error::AlertReceived(a) => format!("TLS: the backend ended the handshake with alert {a:?}"),
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => {
            "TLS: the backend does not speak TLS on this port (its answer is not a TLS record)".into()
        }
        other => format!("TLS: {other}"),
    }
}

/// Sends the request over `io` and reads the status line before `deadline`; `stream` is the socket
/// under `io`, whose timeouts bound each operation.
fn exchange<S: Read + Write>(
    tls: bool,
    stream: &TcpStream,
    io: &mut S,
    host: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<u16, String> {
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: vpcgate-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    until(stream, deadline, timeout, tls, "sending the request")?;
    io.write_all(req.as_bytes())
        .and_then(|()| io.flush())
        .map_err(|e| io_words(tls, "sending the request", &e, host, timeout))?;
    let mut buf = vec![0u8; 512];
    let mut got = 0;
    while got < buf.len() && !buf[..got].contains(&b'\n') {
        until(stream, deadline, timeout, tls, "reading the response")?;
        match io.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(io_words(tls, "reading the response", &e, host, timeout)),
        }
    }
    let line = String::from_utf8_lossy(&buf[..got]);
    let line = line.lines().next().unwrap_or_default();
    match line.split_whitespace().nth(1).and_then(|c| c.parse().ok()) {
        Some(code) if line.starts_with("HTTP/") && (100..=599).contains(&code) => Ok(code),
        _ => Err(format!(
            "not an HTTP response: {:?}",
            line.chars().take(60).collect::<String>()
        )),
    }
}

/// The egress IP for `target`'s family: the policy's, else the source the kernel picks toward it
/// through the ENI, else the ENI's first address of that family.
fn egress_for(p: &Policy, target: SocketAddr) -> Result<IpAddr, String> {
    if let Some(e) = p.instance.egress_ip
        && e.is_ipv4() == target.is_ipv4()
    {
        return Ok(e);
    }
    let eni = crate::datapath::ifindex(&p.instance.interface).ok();
    if let Ok(r) = route_to(target.ip(), None)
        && Some(r.oif) == eni
        && let Some(source) = r.source
    {
        return Ok(source);
    }
    interface_address(&p.instance.interface, target.is_ipv6())
        .map_err(|e| format!("addresses of {}: {e}", p.instance.interface))?
        .ok_or_else(|| {
            format!(
                "the ENI {} has no {} address to probe {target} from",
                p.instance.interface,
                if target.is_ipv6() { "IPv6" } else { "IPv4" }
            )
        })
}

struct Ctx<'a> {
    policy: &'a Policy,
    compiled: &'a Compiled,
    path: String,
    format: Option<Format>,
    timeout: Duration,
    contrast: Option<IpAddr>,
}

fn probe_one(dp: &mut Datapath, ctx: &Ctx, t: &Target) -> Result<Report, String> {
    let start = Instant::now();
    let egress = egress_for(ctx.policy, t.addr)?;
    let view = policy_view(ctx.policy, ctx.compiled, &ctx.path, egress, t.addr);
    let mut attempts = 0;
    let (facts, mut stream, d) = loop {
        attempts += 1;
        let (facts, stream) = attempt(
            dp,
            ctx.format.as_ref(),
            &ctx.policy.instance.interface,
            egress,
            t.addr,
            ctx.timeout,
        )?;
        let d = diagnose::diagnose(t.addr, egress, t.control, &view, &facts);
        // The upstream's retries: a silent attempt is tried again; an answer is an answer.
        if d.outcome != Outcome::NoReply || attempts >= t.attempts {
            break (facts, stream, d);
        }
    };
    let mut d = d;
    let contrast = match ctx.contrast {
        Some(source)
            if d.outcome != Outcome::Connected && d.outcome != Outcome::BlockedByPolicy =>
        {
            if source.is_ipv4() != t.addr.is_ipv4() {
                return Err(format!(
                    "--contrast-from {source} and {} are of different families",
                    t.addr
                ));
            }
            let (cf, _) = attempt(
                dp,
                ctx.format.as_ref(),
                &ctx.policy.instance.interface,
                source,
                t.addr,
                ctx.timeout,
            )?;
            let cd = diagnose::diagnose(t.addr, source, t.control, &view, &cf);
            let certain = cd.outcome == Outcome::Connected
                && matches!(d.outcome, Outcome::NoReply | Outcome::Unreachable);
            if certain {
                d.cause = format!(
                    "certain: {source} connects to {} and the egress IP {egress} does not: the backend admits one source and not the other",
                    t.addr
                );
                if let Some(s) = d.steps.iter_mut().find(|s| s.step == "network") {
                    s.detail
                        .push_str(&format!("; the same attempt from {source} connected"));
                }
            }
            Some(Contrast {
                source,
                outcome: cd.outcome,
                certain,
            })
        }
        _ => None,
    };
    let http = match (&t.http, stream.take()) {
        (Some((scheme, host)), Some(s)) => Some(http_request(s, *scheme, host, ctx.timeout)),
        _ => None,
    };
    Ok(Report {
        target: t.addr.to_string(),
        name: t.name.clone(),
        protocol: "tcp",
        egress_ip: egress,
        outcome: d.outcome,
        steps: d.steps,
        cause: d.cause,
        action: d.action,
        kernel: Evidence::of(&facts),
        attempts,
        contrast,
        http,
        elapsed_ms: start.elapsed().as_millis() as u64,
    })
}

fn mark(s: diagnose::StepStatus) -> &'static str {
    match s {
        diagnose::StepStatus::Pass => "✓",
        diagnose::StepStatus::Fail => "✗",
        diagnose::StepStatus::Skipped => "–",
    }
}

fn print_text(r: &Report, evidence: bool) {
    let name = if r.name == r.target {
        String::new()
    } else {
        format!(" ({})", r.name)
    };
    println!(
        "{}{name} tcp from {}: {}",
        r.target,
        r.egress_ip,
        r.outcome.name()
    );
    for (i, s) in r.steps.iter().enumerate() {
        println!(
            "  {} {} {:<13} {}",
            mark(s.status),
            i + 1,
            s.step,
            escape_controls(&s.detail)
        );
    }
    println!("  cause: {}", escape_controls(&r.cause));
    if let Some(a) = &r.action {
        for (i, line) in a.lines().enumerate() {
            println!(
                "  {} {}",
                if i == 0 { "do:   " } else { "      " },
                escape_controls(line)
            );
        }
    }
    if let Some(h) = &r.http {
        match (h.status, &h.error) {
            (Some(code), _) => println!(
                "  {}: GET / Host: {} → {code} in {} ms",
                h.scheme,
                escape_controls(&h.host),
                h.time_ms.unwrap_or(0)
            ),
            (None, Some(e)) => println!("  {}: {}", h.scheme, escape_controls(e)),
            _ => {}
        }
    }
    if let Some(c) = &r.contrast {
        println!(
            "  contrast: from {} → {}{}",
            c.source,
            c.outcome.name(),
            if c.certain {
                " (the cause is certain)"
            } else {
                ""
            }
        );
    }
    if r.attempts > 1 {
        println!("  attempts: {}", r.attempts);
    }
    if evidence {
        let k = &r.kernel;
        println!(
            "  kernel: syn_sent={} syn_ack={} rst={} icmp_unreachable={} dropped={}{} kernel_drops={}{}{}",
            k.syn_sent,
            k.syn_ack,
            k.rst,
            k.icmp_unreachable,
            k.dropped,
            k.drop_reason.map(|r| format!(" ({r})")).unwrap_or_default(),
            k.kernel_drops,
            k.kernel_drop_reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
            match (&k.neighbour, &k.neighbour_state) {
                (Some(n), Some(s)) => format!(" neighbour {n}={s}"),
                (Some(n), None) => format!(" neighbour {n}=none"),
                _ => String::new(),
            }
        );
    }
}

/// The instance's applied policy.
fn applied(instance: &str) -> Result<(String, Policy, Compiled), String> {
    let path = record::applied_path(instance);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "cannot read the policy the agent applied ({}): {e}; is `vpcgate run` running for instance {instance}?",
            path.display()
        )
    })?;
    let checked = policy::check_text(&path.display().to_string(), &text);
    match (checked.policy, checked.compiled) {
        (Some(p), Some(c)) => Ok((path.display().to_string(), p, c)),
        _ => Err(format!("{} is not a valid policy", path.display())),
    }
}

pub fn run(args: &Args) -> u8 {
    let instance = match args.instance.clone().map_or_else(status::only_instance, Ok) {
        Ok(i) => i,
        Err(e) => return super::fail(args.output, "no_instance", e),
    };
    let (path, policy, compiled) = match applied(&instance) {
        Ok(x) => x,
        Err(e) => return super::fail(args.output, "no_policy", e),
    };
    let targets = match targets(args, &policy) {
        Ok(t) => t,
        Err(e) => return super::fail(args.output, "bad_target", e),
    };
    let mut dp = match Datapath::inspect(&instance) {
        Ok(dp) => dp,
        Err(e) => return super::fail(args.output, "no_instance", e.to_string()),
    };
    // Ctrl-C ends the attempt in progress, whose kernel record is then removed (never left behind).
    // SAFETY: installing an async-signal-safe handler (one atomic store).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    // The kernel's own drops name local failures; without them, say so (never silently).
    let format = match dp.attach_kernel_drops() {
        Ok(f) => Some(f),
        Err(e) => {
            eprintln!(
                "vpcgate: warning: {e}; local drops will be reported without the kernel's reason"
            );
            None
        }
    };
    let ctx = Ctx {
        policy: &policy,
        compiled: &compiled,
        path,
        format,
        timeout: args.timeout,
        contrast: args.contrast_from,
    };
    let mut reports = vec![];
    // A target that cannot be probed (its family has no address here, ...) is reported and the others
    // still are; the exit status is then 2.
    let mut errors = vec![];
    for t in &targets {
        if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
            errors.push(serde_json::json!({"target": t.addr.to_string(), "error": "interrupted"}));
            break;
        }
        match probe_one(&mut dp, &ctx, t) {
            Ok(r) => {
                if args.output == Output::Text {
                    print_text(&r, args.evidence);
                }
                reports.push(r);
            }
            Err(e) if targets.len() == 1 => {
                return super::fail(args.output, "probe_failed", format!("{}: {e}", t.addr));
            }
            Err(e) => {
                eprintln!("vpcgate: {} ({}): cannot probe: {e}", t.addr, t.name);
                errors.push(
                    serde_json::json!({"target": t.addr.to_string(), "name": t.name, "error": e}),
                );
            }
        }
    }
    if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) && errors.is_empty() {
        errors.push(serde_json::json!({"error": "interrupted"}));
    }
    if args.output == Output::Json {
        let printed = if args
            .target
            .as_deref()
            .is_some_and(|t| t.parse::<SocketAddr>().is_ok())
        {
            print_json(&reports[0])
        } else {
            print_json(
                &serde_json::json!({ "instance": instance, "probes": reports, "errors": errors }),
            )
        };
        if let Err(code) = printed {
            return code;
        }
    } else if reports.len() > 1 {
        let ok = reports
            .iter()
            .filter(|r| r.outcome == Outcome::Connected)
            .count();
        println!("{ok} of {} connected", reports.len());
    }
    if reports.iter().all(|r| {
        r.outcome == Outcome::Connected && r.http.as_ref().is_none_or(|h| h.error.is_none())
    }) {
        EXIT_OK
    } else if reports.is_empty() {
        EXIT_ERROR
    } else {
        EXIT_FAILED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_bounds() {
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("4"), Ok(Duration::from_secs(4)));
        assert!(parse_duration("10ms").is_err());
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn targets_come_from_the_applied_policy() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/policy.toml"
        ))
        .unwrap();
        let c = policy::check_text("policy.toml", &text);
        let p = c.policy.unwrap();
        let args = |t: &str| Args {
            target: Some(t.into()),
            all: false,
            timeout: Duration::from_secs(3),
            contrast_from: None,
            evidence: false,
            instance: None,
            output: Output::Text,
        };
        let t = targets(&args("authorization/orders-slb"), &p).unwrap();
        assert!(t.iter().all(|t| t.name == "authorization/orders-slb"));
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].addr, "10.0.3.7:80".parse().unwrap());
        assert_eq!(t[0].control, Control::Clb);
        let t = targets(&args("upstream/orders_pool"), &p).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].attempts, 5);
        assert_eq!(
            t[0].http,
            Some((UpstreamProtocol::Http, "orders.internal".into()))
        );
        let t = targets(&args("10.0.3.7:80"), &p).unwrap();
        assert_eq!(t[0].control, Control::Clb);
        assert!(
            targets(&args("authorization/nope"), &p)
                .unwrap_err()
                .contains("orders-slb")
        );
        assert!(targets(&args("10.0.3.7"), &p).is_err());
        // A Host header that could smuggle header lines is refused by `check`, so never sent.
        let bad = text.replace("orders.internal", "orders.internal\\r\\nX-Injected: 1");
        let c = policy::check_text("policy.toml", &bad);
        assert!(c.policy.is_none());
        assert!(
            c.diagnostics
                .iter()
                .any(|d| d.to_string().contains("host_header")),
            "{:?}",
            c.diagnostics
        );
        assert!(targets(&args("10.0.3.7:0"), &p).is_err());
    }
}
