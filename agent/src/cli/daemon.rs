//! The service side of `vpcgate run`: what the kernel counted, as a snapshot the agent loop takes on
//! request (the datapath has one owner); Prometheus exposition of it (`prometheus-client`); the HTTP
//! endpoints (`axum`); and the policy file watcher (`inotify`).

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use futures_util::StreamExt;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::sync::{mpsc, oneshot};
use vpcgate_common::verdict::DropReason;

use super::record::Record;
use crate::datapath::{Datapath, Destination, capacity, entry_counts};
use crate::policy::compile::Compiled;

/// What the kernel counted, plus what only the agent knows, at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub generation: Option<u8>,
    pub dropped: Vec<(&'static str, u64)>,
    pub audited: Vec<(&'static str, u64)>,
    /// (rule id, kind, name, packets, bytes)
    pub rules: Vec<(u32, String, String, u64, u64)>,
    pub destinations: Vec<Destination>,
    /// (map, entries, capacity)
    pub maps: Vec<(&'static str, u32, u32)>,
    pub events_suppressed: u64,
    pub events_lost: u64,
}

/// The busiest destinations a snapshot keeps (by packets passed and dropped).
pub const TOP_DESTINATIONS: usize = 20;

/// Reads the kernel's counters (errors become missing figures and a log line, never a failed scrape).
pub fn snapshot(dp: &Datapath, compiled: &Compiled, record: &Record) -> Snapshot {
    let mut s = Snapshot {
        generation: dp.active_generation().ok().flatten(),
        ..Snapshot::default()
    };
    match dp.drop_counts() {
        Ok(d) => {
            for r in DropReason::ALL {
                s.dropped
                    .push((r.name(), d.dropped.get(&r).copied().unwrap_or(0)));
                s.audited
                    .push((r.name(), d.audited.get(&r).copied().unwrap_or(0)));
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read drop counters"),
    }
    match dp.rule_stats() {
        Ok(stats) => {
            // The current generation's counters plus what earlier generations counted.
            for r in &record.rules {
                let st = stats.get(&r.id).copied().unwrap_or_default();
                let (p, b) = record.total(r);
                s.rules.push((
                    r.id,
                    r.kind.clone(),
                    r.name.clone(),
                    st.packets + p,
                    st.bytes + b,
                ));
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read rule counters"),
    }
    match dp.destinations() {
        Ok(mut d) => {
            d.sort_by_key(|d| std::cmp::Reverse(d.passed + d.dropped + d.audited));
            d.truncate(TOP_DESTINATIONS);
            s.destinations = d;
        }
        Err(e) => tracing::warn!(error = %e, "cannot read destinations"),
    }
    s.maps = capacity::usage(&entry_counts(compiled))
        .into_iter()
        .map(|(m, cap, n)| (m, n, cap))
        .collect();
    if let Ok(l) = dp.event_loss() {
        s.events_suppressed = l.suppressed;
        s.events_lost = l.lost;
    }
    s
}

/// Metrics the agent keeps itself (the kernel's are read per scrape).
#[derive(Clone)]
pub struct AgentMetrics {
    pub apply_seconds: Histogram,
    pub reloads: Family<ResultLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

impl AgentMetrics {
    pub fn new() -> Self {
        Self {
            apply_seconds: Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
            reloads: Family::default(),
        }
    }

    pub fn reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&ResultLabel {
                result: if ok { "success" } else { "failure" }.into(),
            })
            .inc();
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabel {
    rule: String,
    kind: String,
    id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestLabel {
    destination: String,
    protocol: String,
    port: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: String,
    build: String,
}

/// The Prometheus text exposition of a snapshot and the agent's own metrics.
pub fn exposition(s: &Snapshot, m: &AgentMetrics, record: &Record) -> String {
    let mut reg = Registry::with_prefix("vpcgate");
    let drops = Family::<ReasonLabel, Counter>::default();
    for (r, n) in &s.dropped {
        drops
            .get_or_create(&ReasonLabel {
                reason: (*r).into(),
            })
            .inc_by(*n);
    }
    reg.register(
        "drops",
        "Packets dropped, by reason (kernel counters since the maps were created)",
        drops,
    );
    let audited = Family::<ReasonLabel, Counter>::default();
    for (r, n) in &s.audited {
        audited
            .get_or_create(&ReasonLabel {
                reason: (*r).into(),
            })
            .inc_by(*n);
    }
    reg.register(
        "audited_drops",
        "Packets audit mode passed that enforce mode would drop, by reason",
        audited,
    );
    let packets = Family::<RuleLabel, Counter>::default();
    let bytes = Family::<RuleLabel, Counter>::default();
    for (id, kind, name, p, b) in &s.rules {
        let l = RuleLabel {
            rule: name.clone(),
            kind: kind.clone(),
            id: id.to_string(),
        };
        packets.get_or_create(&l).inc_by(*p);
        bytes.get_or_create(&l).inc_by(*b);
    }
    reg.register(
        "rule_packets",
        "Packets passed by each rule of the active policy generation",
        packets,
    );
    reg.register(
        "rule_bytes",
        "Bytes passed by each rule of the active policy generation",
        bytes,
    );
    let dest = Family::<DestLabel, Gauge>::default();
    for d in &s.destinations {
        for (outcome, n) in [
            ("passed", d.passed),
            ("dropped", d.dropped),
            ("syn_sent", d.syn_sent),
            ("syn_ack", d.syn_ack),
            ("rst", d.rst),
            ("icmp_error", d.icmp_errors),
        ] {
            dest.get_or_create(&DestLabel {
                destination: d.address.to_string(),
                protocol: d.protocol.to_string(),
                port: d.port.to_string(),
                outcome: outcome.into(),
            })
            .set(n as i64);
        }
    }
    reg.register(
        "destination_packets",
        "Per-destination observations of the busiest destinations (an LRU map: entries come and go)",
        dest,
    );
    let generation = Gauge::<i64>::default();
    generation.set(s.generation.map_or(0, i64::from));
    reg.register(
        "policy_generation",
        "Active policy generation slot (1 or 2; 0: none)",
        generation,
    );
    reg.register(
        "apply_duration_seconds",
        "Time to apply a policy to the kernel maps",
        m.apply_seconds.clone(),
    );
    reg.register("reloads", "Policy reloads, by result", m.reloads.clone());
    let entries = Family::<MapLabel, Gauge>::default();
    let capacity = Family::<MapLabel, Gauge>::default();
    for (map, n, cap) in &s.maps {
        let l = MapLabel { map: (*map).into() };
        entries.get_or_create(&l).set(i64::from(*n));
        capacity.get_or_create(&l).set(i64::from(*cap));
    }
    reg.register(
        "map_entries",
        "Entries the active policy holds in each kernel map",
        entries,
    );
    reg.register(
        "map_capacity",
        "Entries each kernel map can hold per generation",
        capacity,
    );
    let lost = Counter::<u64>::default();
    lost.inc_by(s.events_lost);
    reg.register(
        "events_lost",
        "Drop events the ring buffer had no room for",
        lost,
    );
    let suppressed = Counter::<u64>::default();
    suppressed.inc_by(s.events_suppressed);
    reg.register(
        "events_suppressed",
        "Drop events the per-CPU rate limit held back",
        suppressed,
    );
    let build = Family::<BuildLabel, Gauge>::default();
    build
        .get_or_create(&BuildLabel {
            version: env!("CARGO_PKG_VERSION").into(),
            build: record.build.clone(),
        })
        .set(1);
    reg.register(
        "build_info",
        "vpcgate version and kernel object build",
        build,
    );
    let mut out = String::new();
    if let Err(e) = encode(&mut out, &reg) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    out
}

/// A request from the HTTP side to the agent loop: the exposition text.
pub type ScrapeRequest = oneshot::Sender<String>;

#[derive(Clone)]
struct HttpState {
    scrape: mpsc::Sender<ScrapeRequest>,
    ready: Arc<AtomicBool>,
}

/// At most this many HTTP connections at once (each holds a descriptor; the agent's are needed for
/// reloads), and none lives longer than `HTTP_CONN_LIFETIME`.
const HTTP_MAX_CONNECTIONS: usize = 32;
const HTTP_CONN_LIFETIME: Duration = Duration::from_secs(30);

/// A TCP listener that admits `HTTP_MAX_CONNECTIONS` at a time (the next waits for a slot) and ends
/// each connection after `HTTP_CONN_LIFETIME`, so idle or slow clients cannot exhaust descriptors.
struct Limited {
    inner: tokio::net::TcpListener,
    slots: Arc<tokio::sync::Semaphore>,
}

/// A connection holding its slot, ending at its deadline.
struct LimitedIo {
    io: tokio::net::TcpStream,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl LimitedIo {
    fn expired(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn timed_out<T>() -> std::task::Poll<std::io::Result<T>> {
    std::task::Poll::Ready(Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "connection lifetime exceeded",
    )))
}

impl tokio::io::AsyncRead for LimitedIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.expired(cx) {
            return timed_out();
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for LimitedIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.expired(cx) {
            return timed_out();
        }
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl axum::serve::Listener for Limited {
    type Io = LimitedIo;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                std::future::pending::<()>().await;
                unreachable!();
            };
            match self.inner.accept().await {
                Ok((io, addr)) => {
                    return (
                        LimitedIo {
                            io,
                            deadline: Box::pin(tokio::time::sleep(HTTP_CONN_LIFETIME)),
                            _slot: slot,
                        },
                        addr,
                    );
                }
                // Out of descriptors or similar: back off instead of spinning.
                Err(e) => {
                    tracing::warn!(error = %e, "metrics server cannot accept");
                    drop(slot);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    scrape: mpsc::Sender<ScrapeRequest>,
    ready: Arc<AtomicBool>,
) {
    let listener = Limited {
        inner: listener,
        slots: Arc::new(tokio::sync::Semaphore::new(HTTP_MAX_CONNECTIONS)),
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(HttpState { scrape, ready });
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the metrics server stopped");
    }
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    let (tx, rx) = oneshot::channel();
    if s.scrape.send(tx).await.is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "agent stopping\n".to_owned(),
        )
            .into_response();
    }
    match tokio::time::timeout(Duration::from_secs(10), rx).await {
        Ok(Ok(text)) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "no snapshot\n".to_owned()).into_response(),
    }
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// The watch on the policy file's directory (an editor's rename-write replaces the file; a Kubernetes
/// ConfigMap swaps the `..data` symlink in the same directory).
pub fn open_watch(file: &Path) -> std::io::Result<inotify::EventStream<[u8; 4096]>> {
    use inotify::{Inotify, WatchMask};
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let inotify = Inotify::init()?;
    inotify.watches().add(
        &dir,
        WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::ATTRIB,
    )?;
    tracing::info!(dir = %dir.display(), "watching the policy file");
    inotify.into_event_stream([0u8; 4096])
}

/// Sends a unit on `changed` after each burst of events has been quiet for `debounce` (or has lasted
/// 2 s: a directory that never stops changing still gets checked). Events are only hints: the caller
/// compares contents.
pub async fn watch(
    mut stream: inotify::EventStream<[u8; 4096]>,
    debounce: Duration,
    changed: mpsc::Sender<()>,
) {
    loop {
        match stream.next().await {
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::error!(error = %e, "policy watch failed; reload with SIGHUP");
                return;
            }
            None => return,
        }
        let burst = tokio::time::Instant::now();
        loop {
            if burst.elapsed() > Duration::from_secs(2) {
                break;
            }
            match tokio::time::timeout(debounce, stream.next()).await {
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => {
                    tracing::error!(error = %e, "policy watch failed; reload with SIGHUP");
                    return;
                }
                Ok(None) => return,
                Err(_) => break,
            }
        }
        if changed.send(()).await.is_err() {
            return;
        }
    }
}

/// The policy file's content, following symlinks (what a reload would read).
pub fn content(file: &Path) -> Option<Vec<u8>> {
    std::fs::read(file).ok()
}

/// The control socket's protocol version: requests carry it, replies echo it.
pub const CONTROL_VERSION: u32 = 1;
/// Largest request accepted (one JSON object, newline-terminated or ended by the client's shutdown).
pub const CONTROL_MAX_REQUEST: usize = 64 * 1024;

pub fn control_path(instance: &str) -> PathBuf {
    Path::new(super::record::RUN_DIR).join(format!("{instance}.sock"))
}

/// A control request, as the agent loop receives it.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlRequest {
    pub version: u32,
    /// `status` (the agent's record) or `reload` (re-read the policy file now; the reply says how it went).
    pub command: String,
}

pub type ControlCall = (ControlRequest, oneshot::Sender<serde_json::Value>);

pub fn control_error(code: &str, message: impl Into<String>) -> serde_json::Value {
    serde_json::json!({
        "version": CONTROL_VERSION,
        "ok": false,
        "error": {"code": code, "message": message.into()},
    })
}

pub fn control_ok(result: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"version": CONTROL_VERSION, "ok": true, "result": result})
}

/// Serves the control socket (mode 0600 in the 0700 /run/vpcgate): one request per connection, bounded
/// in size and time, answered by the agent loop; every error is a JSON reply.
pub async fn serve_control(listener: tokio::net::UnixListener, calls: mpsc::Sender<ControlCall>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors or similar: back off instead of spinning the agent's thread.
                tracing::warn!(error = %e, "control socket cannot accept");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let calls = calls.clone();
        tokio::spawn(async move {
            if let Err(e) = control_connection(stream, calls).await {
                tracing::debug!(error = %e, "control connection");
            }
        });
    }
}

async fn control_connection(
    mut stream: tokio::net::UnixStream,
    calls: mpsc::Sender<ControlCall>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > CONTROL_MAX_REQUEST || buf.contains(&b'\n') {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let reply = match tokio::time::timeout(Duration::from_secs(5), read).await {
        Err(_) => control_error("timeout", "no complete request within 5 s"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(())) if buf.len() > CONTROL_MAX_REQUEST => control_error(
            "too_large",
            format!("a request is at most {CONTROL_MAX_REQUEST} bytes"),
        ),
        Ok(Ok(())) => {
            let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
            match serde_json::from_slice::<ControlRequest>(line) {
                Err(e) => control_error("bad_request", format!("not a control request: {e}")),
                Ok(r) if r.version != CONTROL_VERSION => control_error(
                    "unsupported_version",
                    format!(
                        "this agent speaks version {CONTROL_VERSION}, not {}",
                        r.version
                    ),
                ),
                Ok(r) => {
                    let (tx, rx) = oneshot::channel();
                    if calls.send((r, tx)).await.is_err() {
                        control_error("stopping", "the agent is stopping")
                    } else {
                        rx.await
                            .unwrap_or_else(|_| control_error("stopping", "the agent is stopping"))
                    }
                }
            }
        }
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    stream.write_all(&out).await?;
    stream.shutdown().await?;
    // Closing with unread input would reset the connection and lose the reply (an oversized request):
    // drain what the client still sends, bounded in bytes and time.
    let drain = async {
        let mut chunk = [0u8; 4096];
        let mut total = 0usize;
        while total < 1 << 20 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    Ok(())
}

/// Binds the control socket at `path` (a stale socket from a dead agent is replaced; the caller holds
/// the instance lock, so no live agent owns it) with mode 0600.
pub fn bind_control(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if !md.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// One request to an agent's control socket (blocking; for the CLI): the reply object.
pub fn control_call(instance: &str, command: &str) -> Result<serde_json::Value, String> {
    use std::io::{BufRead, Write};
    let path = control_path(instance);
    let mut s = std::os::unix::net::UnixStream::connect(&path)
        .map_err(|e| format!("no agent answers on {}: {e}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let req = serde_json::json!({"version": CONTROL_VERSION, "command": command});
    writeln!(s, "{req}").map_err(|e| format!("write {}: {e}", path.display()))?;
    let mut line = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("read {}: {e}", path.display()))?;
    serde_json::from_str(&line).map_err(|e| format!("bad reply from the agent ({e}): {line}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// /readyz answers 503 until the agent marks itself ready (policy applied, attachments holding),
    /// and again when it stops being ready.
    #[tokio::test]
    async fn readiness_follows_the_flag() {
        let (scrape, _rx) = mpsc::channel(1);
        let ready = Arc::new(AtomicBool::new(false));
        let state = || HttpState {
            scrape: scrape.clone(),
            ready: ready.clone(),
        };
        let code = |r: axum::response::Response| r.status();
        assert_eq!(
            code(readyz(State(state())).await.into_response()),
            StatusCode::SERVICE_UNAVAILABLE
        );
        ready.store(true, Ordering::Release);
        assert_eq!(
            code(readyz(State(state())).await.into_response()),
            StatusCode::OK
        );
        ready.store(false, Ordering::Release);
        assert_eq!(
            code(readyz(State(state())).await.into_response()),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    /// The exposition of a snapshot is Prometheus text with the documented names and labels.
    #[test]
    fn exposition_names_and_labels() {
        let s = Snapshot {
            generation: Some(2),
            dropped: vec![("port_not_authorized", 3)],
            rules: vec![(1, "authorization".into(), "orders".into(), 5, 400)],
            maps: vec![("PORTS", 7, 65536)],
            ..Snapshot::default()
        };
        let m = AgentMetrics::new();
        m.reload(false);
        let text = exposition(&s, &m, &super::super::record::Record::default());
        for line in [
            "vpcgate_drops_total{reason=\"port_not_authorized\"} 3",
            "vpcgate_rule_packets_total{rule=\"orders\",kind=\"authorization\",id=\"1\"} 5",
            "vpcgate_rule_bytes_total{rule=\"orders\",kind=\"authorization\",id=\"1\"} 400",
            "vpcgate_policy_generation 2",
            "vpcgate_map_entries{map=\"PORTS\"} 7",
            "vpcgate_map_capacity{map=\"PORTS\"} 65536",
            "vpcgate_reloads_total{result=\"failure\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }
}
