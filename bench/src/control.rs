//! Control plane: how long a policy takes to compile and to reach the kernel (in-process, with the
//! library the agent uses), how long a one-rule change takes from a file write to the kernel through the
//! running daemon, how long `vpcgate check` takes on the overlap-heavy shapes of the policy issue, and
//! what the agent and its kernel maps cost in memory.
//!
//! Also the process plumbing the throughput part shares: commands run inside a namespace with a time
//! bound, children killed on drop, a `vpcgate run` whose pins and records are removed on drop or signal.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Arc, Mutex, Once},
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail, ensure};
use aya::programs::{TestRun, TestRunOptions};
use serde::Serialize;
use vpcgate::{
    datapath::{ApplyReport, Datapath, pin},
    policy::{
        Policy,
        compile::Compiled,
        model::{Accessible, Proto},
        ports::PortSet,
    },
};
use vpcgate_lab::{
    lab::{self, Lab},
    netns::Netns,
    packet::{Layer, build},
};

use crate::policy;

// ---------------------------------------------------------------------------------------------------
// Process plumbing (shared with throughput.rs)
// ---------------------------------------------------------------------------------------------------

/// The Debian package that ships `program`, for error messages.
pub(crate) fn package_of(program: &str) -> &'static str {
    match Path::new(program)
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or(program)
    {
        "iperf3" => "iperf3",
        "nft" => "nftables",
        p if p.starts_with("iptables") || p.starts_with("ip6tables") => "iptables",
        "bpftool" => "bpftool",
        "ip" | "ss" => "iproute2",
        _ => "(the package that provides it)",
    }
}

/// Children still running and instances still pinned, for the signal handler.
struct Live {
    pid: i32,
    instance: Option<String>,
}

static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());
/// Temporary directories still there (a signal ends the process without running drops).
static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static CLEANUP: Once = Once::new();

fn live() -> std::sync::MutexGuard<'static, Vec<Live>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Once per process: SIGINT/SIGTERM/SIGHUP kill the children this module started, remove the pins and
/// /run/vpcgate records of their instances, then the lab's namespaces (vpcgate_lab::cleanup).
pub(crate) fn cleanup_on_signal() {
    CLEANUP.call_once(|| {
        lab::remove_on_signal();
        lab::on_signal_cleanup(Box::new(|| {
            let entries: Vec<Live> = std::mem::take(&mut *live());
            for l in &entries {
                // SAFETY: our own children, not reaped yet (they are unregistered when reaped).
                unsafe {
                    libc::kill(l.pid, libc::SIGKILL);
                    libc::waitpid(l.pid, std::ptr::null_mut(), 0);
                }
            }
            for instance in entries.iter().filter_map(|l| l.instance.as_deref()) {
                remove_instance_state(instance);
            }
            let dirs = std::mem::take(&mut *DIRS.lock().unwrap_or_else(|e| e.into_inner()));
            for d in dirs {
                let _ = std::fs::remove_dir_all(d);
            }
        }));
    });
}

fn register(pid: u32, instance: Option<&str>) {
    live().push(Live {
        pid: pid as i32,
        instance: instance.map(str::to_owned),
    });
}

fn unregister(pid: u32) {
    live().retain(|l| l.pid != pid as i32);
}

/// In-process removal of an instance's pins and records (the agent is gone): the last resort of drops
/// and of the signal handler. `vpcgate teardown` is the normal way.
fn remove_instance_state(instance: &str) {
    if pin::instance_dir(instance).exists()
        && let Err(e) = pin::teardown(instance)
    {
        eprintln!("warning: could not remove the pins of instance {instance}: {e}");
    }
    for ext in ["json", "applied.toml", "sock", "lock", "drops.lock"] {
        let _ = std::fs::remove_file(format!("/run/vpcgate/{instance}.{ext}"));
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub(crate) struct ChildGuard {
    child: Child,
    what: String,
}

impl ChildGuard {
    pub(crate) fn new(child: Child, what: &str) -> Self {
        register(child.id(), None);
        Self {
            child,
            what: what.to_owned(),
        }
    }

    /// Whether it still runs; its exit status when it stopped.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub(crate) fn what(&self) -> &str {
        &self.what
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        unregister(self.child.id());
    }
}

/// Spawns `cmd` from a thread inside `ns` (no new mount namespace, unlike `ip netns exec`: bpffs stays
/// visible), or here when `ns` is None.
pub(crate) fn spawn(ns: Option<&Netns>, cmd: &mut Command) -> anyhow::Result<Child> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let r = match ns {
        Some(ns) => ns.run(|| cmd.spawn()),
        None => cmd.spawn(),
    };
    r.with_context(|| {
        format!(
            "cannot run {program} (is the {} package installed?)",
            package_of(&program)
        )
    })
}

/// Runs `program args` (inside `ns` when given) with `stdin` written to it, and waits at most `timeout`
/// (then kills it: an error). Returns its output whatever its exit status.
pub(crate) fn run_bounded(
    ns: Option<&Netns>,
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<Output> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ChildGuard::new(spawn(ns, &mut cmd)?, program);
    let writer = stdin.map(|data| {
        let mut pipe = child.child.stdin.take().expect("stdin piped");
        let data = data.to_vec();
        std::thread::spawn(move || pipe.write_all(&data))
    });
    let readers = [
        child
            .child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .map(|r| {
        r.map(|mut r| {
            std::thread::spawn(move || {
                let mut buf = vec![];
                let _ = r.read_to_end(&mut buf);
                buf
            })
        })
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.exited() {
            break s;
        }
        if start.elapsed() > timeout {
            // Dropping the guard kills and reaps it; the pipes then close and the readers end.
            drop(child);
            bail!(
                "{program} {} did not finish within {timeout:?}; killed",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let [out, err] = readers.map(|r| r.map(|h| h.join().unwrap_or_default()).unwrap_or_default());
    if let Some(w) = writer {
        // A program that exits without reading all of stdin breaks the pipe: its status says more.
        let _ = w.join();
    }
    Ok(Output {
        status,
        stdout: out,
        stderr: err,
    })
}

/// `run_bounded`, and an error with its output unless it exited 0; its stdout.
pub(crate) fn run_ok(
    ns: Option<&Netns>,
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<String> {
    let out = run_bounded(ns, program, args, stdin, timeout)?;
    ensure!(
        out.status.success(),
        "{program} {} failed ({}){}:\n{}{}",
        args.join(" "),
        out.status,
        ns.map(|n| format!(" in namespace {}", n.name()))
            .unwrap_or_default(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The lab (tests/src/lab.rs), whose constructor panics with the failing step: as an error.
pub(crate) fn new_lab() -> anyhow::Result<Lab> {
    cleanup_on_signal();
    std::panic::catch_unwind(Lab::new).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        anyhow!("cannot build the lab (network namespaces, veth, nftables security groups): {msg}")
    })
}

/// A fresh directory under the system's temporary directory, removed on drop.
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> anyhow::Result<Self> {
        cleanup_on_signal();
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("vpcgate-bench-{tag}-{}-{n}", std::process::id()));
        DIRS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(dir.clone());
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        DIRS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|d| d != &self.0);
    }
}

/// A unique instance name for a benchmark agent (`[a-z0-9-]{1,32}`).
pub(crate) fn instance_name(tag: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("bench-{tag}-{}-{n}", std::process::id())
}

/// `vpcgate run --config FILE` in a namespace. Dropped while running, it is stopped (SIGTERM, SIGKILL
/// after 5 s) and its instance removed (`vpcgate teardown`, else in-process); `stop` does the same and
/// reports any failure.
pub(crate) struct Daemon<'a> {
    ns: &'a Netns,
    bin: PathBuf,
    pub instance: String,
    _dir: TempDir,
    pub file: PathBuf,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
    /// From spawn until the agent logged that it serves (policy applied, programs attached, the file
    /// watched).
    pub startup: Duration,
}

/// The agent's last log line before it is ready.
const READY: &str = "serving /metrics";
const START_TIMEOUT: Duration = Duration::from_secs(120);

impl<'a> Daemon<'a> {
    /// Writes `policy_text` (whose `[instance]` names `instance`) and starts the agent on it; returns
    /// once it is ready.
    pub(crate) fn start(
        ns: &'a Netns,
        bin: &Path,
        instance: &str,
        policy_text: &str,
    ) -> anyhow::Result<Self> {
        cleanup_on_signal();
        ensure!(
            !pin::instance_dir(instance).exists(),
            "instance {instance} is pinned already ({}): `vpcgate teardown --instance {instance}` first",
            pin::instance_dir(instance).display()
        );
        let dir = TempDir::new(instance)?;
        let file = dir.0.join("policy.toml");
        std::fs::write(&file, policy_text).with_context(|| format!("write {}", file.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let t = Instant::now();
        let mut child =
            spawn(Some(ns), &mut cmd).with_context(|| format!("start {} run", bin.display()))?;
        register(child.id(), Some(instance));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        std::thread::spawn({
            let log = log.clone();
            move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            }
        });
        let mut d = Self {
            ns,
            bin: bin.to_owned(),
            instance: instance.to_owned(),
            _dir: dir,
            file,
            child: Some(child),
            log,
            startup: Duration::ZERO,
        };
        d.wait_for(READY, 0, START_TIMEOUT)
            .context("vpcgate run did not become ready")?;
        d.startup = t.elapsed();
        Ok(d)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// How many log lines the agent wrote so far.
    pub(crate) fn log_len(&self) -> usize {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The log lines from `from` on.
    pub(crate) fn log_since(&self, from: usize) -> Vec<String> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.get(from..).unwrap_or_default().to_vec()
    }

    pub(crate) fn tail(&self) -> String {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log[log.len().saturating_sub(15)..].join("\n")
    }

    /// Waits for a log line from index `from` on containing `needle`; (its index, the line).
    pub(crate) fn wait_for(
        &mut self,
        needle: &str,
        from: usize,
        timeout: Duration,
    ) -> anyhow::Result<(usize, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(i) = (from..log.len()).find(|&i| log[i].contains(needle)) {
                    return Ok((i, log[i].clone()));
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                // The reader may still hold the last lines.
                std::thread::sleep(Duration::from_millis(50));
                bail!(
                    "vpcgate run exited ({status}) before logging {needle:?}; its last lines:\n{}",
                    self.tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "vpcgate run did not log {needle:?} within {timeout:?}; its last lines:\n{}",
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, a clean exit within 10 s, `vpcgate teardown`, and nothing of the instance left (pins,
    /// /run/vpcgate records).
    pub(crate) fn stop(mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().expect("running");
        let pid = child.id();
        // SAFETY: signalling our own child, not reaped yet.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().context("wait for vpcgate run")? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                unregister(pid);
                remove_instance_state(&self.instance);
                bail!("vpcgate run did not exit within 10 s of SIGTERM; killed");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        unregister(pid);
        if !status.success() {
            remove_instance_state(&self.instance);
            bail!(
                "vpcgate run exited with {status}; its last lines:\n{}",
                self.tail()
            );
        }
        let bin = self.bin.to_string_lossy().into_owned();
        let out = run_bounded(
            Some(self.ns),
            &bin,
            &["teardown", "--instance", &self.instance],
            None,
            Duration::from_secs(30),
        );
        let left: Vec<String> = ["json", "applied.toml", "sock", "lock"]
            .iter()
            .map(|ext| format!("/run/vpcgate/{}.{ext}", self.instance))
            .filter(|p| Path::new(p).exists())
            .collect();
        let pinned = pin::instance_dir(&self.instance).exists();
        if !matches!(&out, Ok(o) if o.status.success()) || pinned || !left.is_empty() {
            remove_instance_state(&self.instance);
            bail!(
                "vpcgate teardown --instance {} did not remove everything (pins left: {pinned}, records left: {left:?}): {}",
                self.instance,
                match out {
                    Ok(o) => format!("{}; {}", o.status, String::from_utf8_lossy(&o.stderr)),
                    Err(e) => format!("{e:#}"),
                }
            );
        }
        Ok(())
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        // SAFETY: signalling our own child, not reaped yet.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.wait();
        unregister(pid);
        let bin = self.bin.to_string_lossy().into_owned();
        let _ = run_bounded(
            Some(self.ns),
            &bin,
            &["teardown", "--instance", &self.instance],
            None,
            Duration::from_secs(30),
        );
        remove_instance_state(&self.instance);
    }
}

/// A process's VmRSS and VmHWM (KiB), from /proc/<pid>/status.
pub(crate) fn rss_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in {path}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The BPF maps a process holds (deduplicated by map id): (name, memlock bytes), from
/// /proc/<pid>/fdinfo (the kernel's own accounting: LPM tries and unpreallocated hashes count the
/// entries they hold, preallocated maps their capacity).
pub(crate) fn bpf_maps_of(pid: &str) -> anyhow::Result<BTreeMap<u32, (String, u64)>> {
    let dir = format!("/proc/{pid}/fd");
    let mut maps = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("list {dir}"))? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target.to_string_lossy() != "anon_inode:bpf-map" {
            continue;
        }
        let fd = entry.file_name().to_string_lossy().into_owned();
        let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
            continue;
        };
        let field = |name: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) else {
            bail!("/proc/{pid}/fdinfo/{fd}: no map_id or memlock:\n{info}");
        };
        let name = aya::maps::MapInfo::from_id(id as u32)
            .ok()
            .and_then(|m| m.name_as_str().map(str::to_owned))
            .unwrap_or_default();
        maps.insert(id as u32, (name, memlock));
    }
    Ok(maps)
}

/// The policy maps (what grows with the policy).
const POLICY_MAPS: [&str; 7] = [
    "ADDR_V4",
    "ADDR_V6",
    "RESERVED_V4",
    "RESERVED_V6",
    "PORTS",
    "RULE_STATS",
    "RULE_COUNTERS",
];

/// Bytes per map name (summed over maps of one name), largest first.
fn by_map(maps: &BTreeMap<u32, (String, u64)>) -> Vec<(String, u64)> {
    let mut m: BTreeMap<&str, u64> = BTreeMap::new();
    for (name, b) in maps.values() {
        *m.entry(if name.is_empty() { "(unnamed)" } else { name })
            .or_default() += b;
    }
    let mut v: Vec<(String, u64)> = m.into_iter().map(|(n, b)| (n.to_owned(), b)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// (all maps, the policy maps) in bytes.
fn map_bytes(maps: &BTreeMap<u32, (String, u64)>) -> (u64, u64) {
    let total = maps.values().map(|(_, b)| b).sum();
    let policy = maps
        .values()
        .filter(|(n, _)| POLICY_MAPS.contains(&n.as_str()))
        .map(|(_, b)| b)
        .sum();
    (total, policy)
}

// ---------------------------------------------------------------------------------------------------
// Policies that fit at any size
// ---------------------------------------------------------------------------------------------------

/// Every generated authorization has a port table of its own (a table's intervals name their rules),
/// so `policy::generate(n)` needs about 3.4 PORTS entries per rule (2^20 rules: about 3.6 million of
/// the map's 2^22). The largest number of generated rules that fits: rules are drawn in order, so
/// `generate(n)` is a prefix of `generate(m)` for n < m.
pub(crate) fn generated_fit(seed: u64) -> anyhow::Result<usize> {
    generated_fit_within(vpcgate_common::datapath::limits::PORT_ENTRIES, seed)
}

/// `generated_fit` against `port_entries`.
fn generated_fit_within(port_entries: u32, seed: u64) -> anyhow::Result<usize> {
    use vpcgate::policy::compile::PortTable;
    let rules = policy::generate(1 << 20, seed)?;
    let mut sum = 0u32;
    for (i, r) in rules.iter().enumerate() {
        sum += r
            .ranges
            .iter()
            .map(|&(lo, hi)| PortTable::range_blocks(lo, hi))
            .sum::<u32>();
        if sum > port_entries {
            return Ok(i);
        }
    }
    Ok(rules.len())
}

/// Rules of the shared-table shape besides its accessible blocks: 4 authorizations, the vSwitch block,
/// 2 region blocks.
const SHARED_HEAD_RULES: usize = 7;

/// The `[instance]` table and the rules above the blocks of the shared-table shape: a vpc-integration
/// instance authorizing every port of 10.128.0.0/9 and fd00::/16 (TCP and UDP), both also accessible.
fn shared_head(instance: &str, interface: &str) -> String {
    let mut t = format!(
        "[instance]\nname = \"{instance}\"\nkind = \"vpc-integration\"\nvpc_id = \"vpc-bench\"\ninterface = \"{interface}\"\n\
         vswitch_cidr = \"10.127.255.0/24\"\n"
    );
    for (net, fam) in [("10.128.0.0/9", "4"), ("fd00::/16", "6")] {
        for proto in ["tcp", "udp"] {
            t += &format!(
                "\n[[authorization]]\nname = \"region{fam}-{proto}\"\nvpc_id = \"vpc-bench\"\naddress = \"{net}\"\nprotocol = \"{proto}\"\nports = [\"1-65535\"]\n"
            );
        }
    }
    for net in ["10.128.0.0/9", "fd00::/16"] {
        t += &format!("\n[[accessible]]\ncidr = \"{net}\"\n");
    }
    t
}

/// The shared-table shape with `n` rules in all: `n - 7` accessible blocks (the generated prefixes,
/// mixed lengths, half IPv6) under the region authorizations, which win every port, so every block is
/// an address entry sharing the region's port table: the most address entries and rules a policy can
/// have (up to 1<<20 rules) with a handful of PORTS entries. `extra` is appended as is (TOML).
pub(crate) fn shared_toml(
    instance: &str,
    interface: &str,
    n: usize,
    seed: u64,
    extra: &str,
) -> anyhow::Result<String> {
    let mut t = shared_head(instance, interface) + extra;
    for r in policy::generate(n.saturating_sub(SHARED_HEAD_RULES), seed)? {
        t += &format!("\n[[accessible]]\ncidr = \"{}\"\n", r.net);
    }
    Ok(t)
}

/// `shared_toml` as a parsed policy, built without parsing the blocks (a million of them parse
/// slowly; the compile is what is measured).
pub(crate) fn shared_policy(n: usize, seed: u64) -> anyhow::Result<(Policy, Vec<policy::Rule>)> {
    let head = shared_head("bench-apply", lab::ENI);
    let checked = vpcgate::policy::check_text("shared.toml", &head);
    let mut p = checked.policy.with_context(|| {
        format!(
            "the shared-table shape's head is invalid: {:?}",
            checked.diagnostics.first()
        )
    })?;
    let rules = policy::generate(n.saturating_sub(SHARED_HEAD_RULES), seed)?;
    p.accessible.extend(rules.iter().map(|r| Accessible {
        cidr: r.net,
        ports: PortSet::all(),
        protocols: Proto::ALL.to_vec(),
        pos: Default::default(),
    }));
    Ok((p, rules))
}

// ---------------------------------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------------------------------

/// One control-plane measurement.
#[derive(Serialize, Clone, Debug)]
#[serde(tag = "measure", rename_all = "snake_case")]
pub enum Row {
    Apply(ApplyRow),
    Reload(ReloadRow),
    Check(CheckRow),
    Agent(AgentRow),
}

/// Compile and apply of `rules` generated authorizations, in-process (`Compiled::new`, `Datapath::load`,
/// `Datapath::apply`), unpinned and unattached.
#[derive(Serialize, Clone, Debug, Default)]
pub struct ApplyRow {
    pub rules: usize,
    /// "generated" (`policy::generate`: disjoint authorizations, a port table each) or "shared-table"
    /// (accessible blocks under region-wide authorizations: one port table for all).
    pub shape: String,
    /// Why this size ("largest generated policy that fits", ...).
    pub note: String,
    /// Whether the first apply succeeded (a policy beyond a map's capacity is refused).
    pub fits: bool,
    /// Entries per kernel map (one generation).
    pub entries: Option<vpcgate::datapath::EntryCounts>,
    /// `Compiled::new` of the policy (already parsed: TOML parsing and validation are in the reload and
    /// check figures).
    pub compile_seconds: Option<f64>,
    /// `Datapath::load()`: the verifier and map creation, paid once per agent start, not per apply.
    pub load_seconds: Option<f64>,
    /// First apply into empty maps: a generation plan (every entry written under the inactive slot,
    /// ACTIVE flipped, a barrier, nothing old to delete).
    pub generation_seconds: Option<f64>,
    pub generation_writes: Option<u32>,
    /// The same policy with one rule's ports changed: planned in place (only what differs, in phases
    /// separated by barriers), since every rule keeps its id and the settings are unchanged.
    pub incremental_seconds: Option<f64>,
    pub incremental_writes: Option<u32>,
    /// Whether the datapath did take the in-place path for that change.
    pub incremental_in_place: Option<bool>,
    /// What the incremental apply changed.
    pub incremental_change: String,
    /// An authorization inserted in front and one generated rule removed (every rule id shifts): a new
    /// generation written beside the current one, flipped to, and the old one deleted.
    pub regeneration_seconds: Option<f64>,
    pub regeneration_writes: Option<u32>,
    /// Kernel memory of all the datapath's maps / of the policy maps (memlock, fdinfo) with the policy
    /// applied.
    pub kernel_map_bytes: Option<u64>,
    pub policy_map_bytes: Option<u64>,
    /// (map, bytes), largest first.
    pub by_map: Vec<(String, u64)>,
    /// What failed, and after how long (the largest size is reported, not hidden, when it fails).
    pub error: Option<String>,
}

/// File write to kernel through the daemon's reload: one authorization appended to the policy file
/// (temp file + rename), timed until BPF_PROG_TEST_RUN of the pinned TC egress program passes a packet
/// the new rule allows (and dropped it before).
#[derive(Serialize, Clone, Debug)]
pub struct ReloadRow {
    pub rules: usize,
    pub samples_seconds: Vec<f64>,
    pub median_seconds: f64,
    pub max_seconds: f64,
    /// Whether each reload was applied in place (from the agent's "policy applied" line).
    pub in_place: Vec<bool>,
    /// The agent's inotify debounce, part of every sample.
    pub debounce_seconds: f64,
}

/// `vpcgate check FILE --output json` wall time on a generated shape.
#[derive(Serialize, Clone, Debug)]
pub struct CheckRow {
    pub shape: String,
    pub description: String,
    pub authorizations: usize,
    pub accessible_blocks: usize,
    pub reserved_blocks: usize,
    pub file_bytes: u64,
    pub seconds: f64,
    pub valid: bool,
    /// (map, entries, capacity) when valid.
    pub capacity: Vec<(String, u64, u64)>,
    /// The first error when invalid (shortened).
    pub first_error: Option<String>,
}

/// `vpcgate run` on `rules` generated authorizations in the lab.
#[derive(Serialize, Clone, Debug)]
pub struct AgentRow {
    pub rules: usize,
    /// "generated" or "shared-table" (see ApplyRow).
    pub shape: String,
    /// Spawn until ready (policy parsed, compiled and applied, programs loaded and attached).
    pub startup_seconds: f64,
    pub vm_rss_kib: u64,
    pub vm_hwm_kib: u64,
    /// After the reload measurements, when they ran on this agent.
    pub after_reloads_vm_rss_kib: Option<u64>,
    pub after_reloads_vm_hwm_kib: Option<u64>,
    pub kernel_map_bytes: u64,
    pub policy_map_bytes: u64,
    pub maps: usize,
    /// (map, bytes), largest first.
    pub by_map: Vec<(String, u64)>,
}

/// For the headline: the in-process compile + apply rows (fields: `rules`, `shape`, `fits`,
/// `compile_seconds`, `generation_seconds`, `incremental_seconds`, ...).
pub fn applies(rows: &[Row]) -> Vec<&ApplyRow> {
    rows.iter()
        .filter_map(|r| match r {
            Row::Apply(a) => Some(a),
            _ => None,
        })
        .collect()
}

/// For the headline: the daemon's one-rule reload (`rules`, `median_seconds`, `max_seconds`).
pub fn reload(rows: &[Row]) -> Option<&ReloadRow> {
    rows.iter().find_map(|r| match r {
        Row::Reload(l) => Some(l),
        _ => None,
    })
}

// ---------------------------------------------------------------------------------------------------
// The measurements
// ---------------------------------------------------------------------------------------------------

pub fn run(opts: &crate::Opts, seed: u64, p: &crate::Progress) -> anyhow::Result<Vec<Row>> {
    let mut rows = vec![];
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the control-plane benchmark needs root (BPF maps, network namespaces)"
    );
    cleanup_on_signal();
    // Every generated rule has a port table of its own (about 3.4 PORTS entries each). A size that
    // would not fit is applied anyway and its refusal reported; the shared-table shape (one port table
    // for all) reaches the rule capacity whatever the ports.
    let fit = generated_fit(seed)?;
    let g = |rules, note| Case {
        shape: PolicyShape::Generated,
        rules,
        fits: rules <= fit,
        note,
    };
    let sh = |rules, note| Case {
        shape: PolicyShape::Shared,
        rules,
        fits: true,
        note,
    };
    let cases = if opts.quick {
        vec![g(10_000, ""), g(100_000, ""), sh(100_000, "")]
    } else {
        vec![
            g(10_000, ""),
            g(100_000, ""),
            g(fit, "the largest generated policy that fits"),
            sh(100_000, ""),
            sh(
                (1 << 20) - 1,
                "the largest policy that fits: 1<<20 - 1 rules, the rule capacity once one is added",
            ),
        ]
    };
    for case in cases {
        let row = apply(case, seed, p);
        match (&row.error, case.fits) {
            (Some(e), true) if case.rules >= (1 << 20) - 1 => {
                p.say(&format!(
                    "apply {} {}: FAILED (reported): {e}",
                    case.rules, row.shape
                ));
            }
            (Some(e), true) => bail!("compile + apply of {} {} rules: {e}", case.rules, row.shape),
            (Some(e), false) => p.say(&format!(
                "apply {} {}: refused as expected: {e}",
                case.rules, row.shape
            )),
            (None, false) => p.say(&format!(
                "apply {} {}: fits after all",
                case.rules, row.shape
            )),
            (None, true) => {}
        }
        rows.push(Row::Apply(row));
    }

    let (agent_sizes, reload_size, repeats): (&[usize], usize, usize) = if opts.quick {
        (&[1_000, 10_000], 1_000, 2)
    } else {
        (&[1_000, 10_000, 100_000], 10_000, 5)
    };
    p.say("control: building the lab for the agent runs");
    let lab = new_lab()?;
    for &n in agent_sizes {
        let (agent, reload) = agent_run(
            &lab,
            opts,
            n,
            seed,
            (n == reload_size).then_some(repeats),
            p,
        )?;
        rows.push(Row::Agent(agent));
        if let Some(r) = reload {
            rows.push(Row::Reload(r));
        }
    }
    drop(lab);

    let shapes: Vec<Shape> = if opts.quick {
        shapes().into_iter().take(1).collect()
    } else {
        shapes()
    };
    let dir = TempDir::new("check")?;
    for s in shapes {
        rows.push(Row::Check(check_shape(opts, &dir, &s, p)?));
    }
    Ok(rows)
}

/// `seconds` of a closure's run.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed().as_secs_f64())
}

fn apply(case: Case, seed: u64, p: &crate::Progress) -> ApplyRow {
    let mut row = ApplyRow {
        rules: case.rules,
        shape: case.shape.name().into(),
        note: case.note.into(),
        ..ApplyRow::default()
    };
    let start = Instant::now();
    if let Err(e) = apply_steps(case, seed, p, &mut row) {
        row.error = Some(format!(
            "{e:#} (after {:.1} s)",
            start.elapsed().as_secs_f64()
        ));
    }
    row
}

/// A UDP frame from the lab's egress IP to `dst:port` (for BPF_PROG_TEST_RUN).
fn udp_frame(dst: Ipv4Addr, port: u16) -> Vec<u8> {
    build(
        "bench probe",
        &[
            Layer::Ipv4 {
                src: lab::EGRESS_V4.octets(),
                dst: dst.octets(),
                options: 0,
                frag_offset: 0,
                more_fragments: false,
                id: 1,
            },
            Layer::Udp {
                sport: 40000,
                dport: port,
            },
        ],
        0,
    )
    .bytes
}

/// What the TC egress program returns for a frame: true pass, false drop.
fn tc_passes(dp: &mut Datapath, frame: &[u8]) -> anyhow::Result<bool> {
    let prog = dp.tc_egress()?;
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::new()
        })
        .map_err(|e| anyhow!("BPF_PROG_TEST_RUN of tc egress: {e:?}"))?;
    match r.return_value {
        u32::MAX => Ok(true), // TC_ACT_UNSPEC: on to the next program, i.e. pass
        2 => Ok(false),       // TC_ACT_SHOT
        other => bail!("tc egress returned {other} (neither pass nor drop)"),
    }
}

/// Packets the kernel must decide as the policy says. Generated shape: a rule's port passes, a port
/// outside it is dropped (IPv4 UDP rules: the frames are IPv4 UDP). Shared shape: any port of a block
/// passes. Both: an address no rule names is dropped.
fn verify_rules(
    dp: &mut Datapath,
    shape: PolicyShape,
    rules: &[policy::Rule],
    seed: u64,
) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
    let v4: Vec<&policy::Rule> = rules
        .iter()
        .filter(|r| {
            r.net.addr().is_ipv4() && (shape == PolicyShape::Shared || r.proto == Proto::Udp)
        })
        .collect();
    ensure!(!v4.is_empty(), "no IPv4 UDP rule to verify the apply with");
    for _ in 0..8 {
        let r = v4[rng.usize(0..v4.len())];
        let IpAddr::V4(a) = r.address(&mut rng) else {
            unreachable!("IPv4 rule")
        };
        let (inside, outside) = match shape {
            PolicyShape::Generated => (r.inside, Some(r.outside)),
            PolicyShape::Shared => (rng.u16(1..), None),
        };
        ensure!(
            tc_passes(dp, &udp_frame(a, inside))?,
            "the kernel drops {a}:{inside} udp, which {} allows",
            r.net
        );
        if let Some(outside) = outside {
            ensure!(
                !tc_passes(dp, &udp_frame(a, outside))?,
                "the kernel passes {a}:{outside} udp, which no rule allows"
            );
        }
    }
    ensure!(
        !tc_passes(dp, &udp_frame(UNNAMED, 80))?,
        "the kernel passes {UNNAMED}:80 udp, which no rule allows"
    );
    Ok(())
}

/// An address no benchmark policy names (the lab's, not the generated regions).
const UNNAMED: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 42);
/// What the incremental change and the regeneration add (checked to pass afterwards).
const CHANGED: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 77, 0, 40), 9999);
const FRONT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 77, 0, 41), 9998);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PolicyShape {
    /// `policy::generate`: disjoint authorizations, each with its own port table.
    Generated,
    /// `shared_toml`: accessible blocks sharing the region authorizations' port table.
    Shared,
}

impl PolicyShape {
    fn name(self) -> &'static str {
        match self {
            PolicyShape::Generated => "generated",
            PolicyShape::Shared => "shared-table",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    shape: PolicyShape,
    rules: usize,
    /// Whether the policy is expected to fit the kernel maps.
    fits: bool,
    note: &'static str,
}

fn apply_steps(
    case: Case,
    seed: u64,
    p: &crate::Progress,
    row: &mut ApplyRow,
) -> anyhow::Result<()> {
    let n = case.rules;
    let tag = format!("apply {n} {}", case.shape.name());
    p.say(&format!("{tag}: generating the policy"));
    let (mut pol, rules) = match case.shape {
        PolicyShape::Generated => {
            let rules = policy::generate(n, seed)?;
            (policy::policy(&rules, "bench-apply", lab::ENI)?, rules)
        }
        PolicyShape::Shared => shared_policy(n, seed)?,
    };
    let (c, secs) = timed(|| Compiled::new(&pol));
    row.compile_seconds = Some(secs);
    let counts = vpcgate::datapath::entry_counts(&c);
    ensure!(
        counts.rules as usize == n,
        "{n} rules compiled to {counts:?}"
    );
    row.entries = Some(counts.clone());
    p.say(&format!(
        "{tag}: compiled in {secs:.3} s ({} address entries, {} port entries); loading the programs (verifier)",
        counts.addr_v4 + counts.addr_v6,
        counts.ports
    ));
    let (dp, secs) = timed(Datapath::load);
    let mut dp = dp.context("Datapath::load")?;
    row.load_seconds = Some(secs);

    p.say(&format!("{tag}: first apply (generation)"));
    let (r, secs) = timed(|| dp.apply(&c));
    let r: ApplyReport = match r {
        Ok(r) => r,
        Err(e) => {
            // Reported as it happened: an apply that does not fit is refused before any write.
            row.generation_seconds = Some(secs);
            return Err(anyhow!(e).context("first apply"));
        }
    };
    ensure!(!r.incremental, "the first apply was planned in place");
    row.fits = true;
    row.generation_seconds = Some(secs);
    row.generation_writes = Some(r.map_writes);
    verify_rules(&mut dp, case.shape, &rules, seed).context("after the first apply")?;
    let maps = bpf_maps_of("self")?;
    let (total, policy_bytes) = map_bytes(&maps);
    row.by_map = by_map(&maps);
    row.kernel_map_bytes = Some(total);
    row.policy_map_bytes = Some(policy_bytes);
    p.say(&format!(
        "{tag}: generation {secs:.3} s ({} writes), kernel maps {:.1} MiB",
        r.map_writes,
        total as f64 / (1 << 20) as f64
    ));

    // One rule changed (generated: rule 0, IPv4, now allows udp 9999 only) or added at the end
    // (shared: one more accessible block, after which no rule id moves).
    match case.shape {
        PolicyShape::Generated => {
            pol.authorizations[0].ports = PortSet::single(CHANGED.1);
            pol.authorizations[0].protocol = Proto::Udp;
            pol.authorizations[0].address = IpAddr::V4(CHANGED.0).into();
            row.incremental_change = "rule 0's address and ports changed".into();
        }
        PolicyShape::Shared => {
            pol.accessible.push(Accessible {
                cidr: IpAddr::V4(CHANGED.0).into(),
                ports: PortSet::single(CHANGED.1),
                protocols: vec![Proto::Udp],
                pos: Default::default(),
            });
            row.incremental_change = "one accessible block added at the end".into();
        }
    }
    let c1 = Compiled::new(&pol);
    p.say(&format!("{tag}: {} (incremental)", row.incremental_change));
    let (r, secs) = timed(|| dp.apply(&c1));
    let r = r.context("apply of the policy with one rule changed")?;
    row.incremental_seconds = Some(secs);
    row.incremental_writes = Some(r.map_writes);
    row.incremental_in_place = Some(r.incremental);
    ensure!(
        tc_passes(&mut dp, &udp_frame(CHANGED.0, CHANGED.1))?,
        "after the one-rule change the kernel drops {}:{} udp",
        CHANGED.0,
        CHANGED.1
    );
    p.say(&format!(
        "{tag}: incremental {secs:.4} s ({} writes, in place: {})",
        r.map_writes, r.incremental
    ));

    // An authorization in front: every rule id shifts, a new generation replaces the current one.
    let mut front = pol.authorizations[0].clone();
    front.name = "front".into();
    front.address = IpAddr::V4(FRONT.0).into();
    front.ports = PortSet::single(FRONT.1);
    front.protocol = Proto::Udp;
    pol.authorizations.insert(0, front);
    // And one rule removed, so that the count stays (the largest policy is at the rule capacity): the
    // last generated authorization, or the first generated block.
    let verify_from = match case.shape {
        PolicyShape::Generated => {
            pol.authorizations.pop();
            1..rules.len() - 1
        }
        PolicyShape::Shared => {
            let first = pol.accessible.len() - rules.len() - 1;
            ensure!(
                pol.accessible[first].cidr == rules[0].net,
                "the shared shape's first generated block is not where expected"
            );
            pol.accessible.remove(first);
            1..rules.len()
        }
    };
    let c2 = Compiled::new(&pol);
    drop(c1);
    drop(c);
    p.say(&format!(
        "{tag}: an authorization inserted in front, one rule removed (a new generation over the current one)"
    ));
    let (r, secs) = timed(|| dp.apply(&c2));
    let r = r.context("apply of the policy with a rule inserted in front")?;
    ensure!(
        !r.incremental,
        "shifting every rule id was applied in place"
    );
    row.regeneration_seconds = Some(secs);
    row.regeneration_writes = Some(r.map_writes);
    for (a, port) in [FRONT, CHANGED] {
        ensure!(
            tc_passes(&mut dp, &udp_frame(a, port))?,
            "after the regeneration the kernel drops {a}:{port} udp"
        );
    }
    verify_rules(&mut dp, case.shape, &rules[verify_from], seed)
        .context("after the regeneration")?;
    p.say(&format!(
        "{tag}: regeneration {secs:.3} s ({} writes)",
        r.map_writes
    ));
    Ok(())
}

/// The agent's policy file for `rules` in the lab.
fn agent_policy(instance: &str, rules: &[policy::Rule], extra: &[(Ipv4Addr, u16)]) -> String {
    let mut text = policy::instance_toml(instance, lab::ENI) + &policy::authorizations_toml(rules);
    for (i, (a, port)) in extra.iter().enumerate() {
        text += &format!(
            "\n[[authorization]]\nname = \"added-{i}\"\nvpc_id = \"vpc-bench\"\naddress = \"{a}\"\nports = [\"{port}\"]\nprotocol = \"udp\"\n"
        );
    }
    text
}

/// Starts the agent on `n` rules; memory; with `repeats`, the one-rule reload latency.
fn agent_run(
    lab: &Lab,
    opts: &crate::Opts,
    n: usize,
    seed: u64,
    repeats: Option<usize>,
    p: &crate::Progress,
) -> anyhow::Result<(AgentRow, Option<ReloadRow>)> {
    let instance = instance_name("ctl");
    let (shape, rules, text) = if n <= generated_fit(seed)? {
        let rules = policy::generate(n, seed)?;
        let text = agent_policy(&instance, &rules, &[]);
        (PolicyShape::Generated, rules, text)
    } else {
        ensure!(
            repeats.is_none(),
            "the reload measurement runs on a generated policy"
        );
        let text = shared_toml(&instance, lab::ENI, n, seed, "")?;
        (PolicyShape::Shared, vec![], text)
    };
    p.say(&format!(
        "agent {n} {}: starting vpcgate run ({instance})",
        shape.name()
    ));
    let mut d = Daemon::start(&lab.gw, &opts.vpcgate, &instance, &text)?;
    let (rss, hwm) = rss_kib(d.pid())?;
    let maps = bpf_maps_of(&d.pid().to_string())?;
    let (total, policy_bytes) = map_bytes(&maps);
    ensure!(
        maps.values().any(|(name, _)| name == "ADDR_V4"),
        "the agent holds no ADDR_V4 map: {maps:?}"
    );
    p.say(&format!(
        "agent {n}: ready in {:.2} s, VmRSS {} MiB, VmHWM {} MiB, kernel maps {:.1} MiB",
        d.startup.as_secs_f64(),
        rss / 1024,
        hwm / 1024,
        total as f64 / (1 << 20) as f64
    ));
    let mut row = AgentRow {
        rules: n,
        shape: shape.name().into(),
        startup_seconds: d.startup.as_secs_f64(),
        vm_rss_kib: rss,
        vm_hwm_kib: hwm,
        after_reloads_vm_rss_kib: None,
        after_reloads_vm_hwm_kib: None,
        kernel_map_bytes: total,
        policy_map_bytes: policy_bytes,
        maps: maps.len(),
        by_map: by_map(&maps),
    };
    let reload = match repeats {
        Some(k) => {
            let r = reloads(&mut d, &rules, k, p)?;
            let (rss, hwm) = rss_kib(d.pid())?;
            row.after_reloads_vm_rss_kib = Some(rss);
            row.after_reloads_vm_hwm_kib = Some(hwm);
            Some(r)
        }
        None => None,
    };
    p.say(&format!("agent {n}: stopping and tearing down"));
    d.stop()?;
    Ok((row, reload))
}

/// The inotify debounce of the agent's watch (cli/run.rs: `daemon::watch(.., 200 ms, ..)`).
const DEBOUNCE: Duration = Duration::from_millis(200);

fn reloads(
    d: &mut Daemon,
    rules: &[policy::Rule],
    k: usize,
    p: &crate::Progress,
) -> anyhow::Result<ReloadRow> {
    let mut kernel = Datapath::inspect(&d.instance)
        .with_context(|| format!("open the pinned state of instance {}", d.instance))?;
    let mut added: Vec<(Ipv4Addr, u16)> = vec![];
    let mut samples = vec![];
    let mut in_place = vec![];
    for i in 0..k {
        let new = (lab::UNLISTED_V4, 7000 + i as u16);
        let frame = udp_frame(new.0, new.1);
        ensure!(
            !tc_passes(&mut kernel, &frame)?,
            "before reload {i}: the kernel already passes {}:{} udp",
            new.0,
            new.1
        );
        added.push(new);
        let text = agent_policy(&d.instance, rules, &added);
        let tmp = d.file.with_extension("toml.tmp");
        std::fs::write(&tmp, &text).with_context(|| format!("write {}", tmp.display()))?;
        let from = d.log_len();
        let t = Instant::now();
        std::fs::rename(&tmp, &d.file)
            .with_context(|| format!("rename {} to {}", tmp.display(), d.file.display()))?;
        loop {
            if tc_passes(&mut kernel, &frame)? {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!(
                    "60 s after the policy file was replaced the kernel still drops {}:{} udp; the agent's last lines:\n{}",
                    new.0,
                    new.1,
                    d.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let secs = t.elapsed().as_secs_f64();
        samples.push(secs);
        d.wait_for("policy reloaded", from, Duration::from_secs(30))?;
        let applied = d
            .log_since(from)
            .into_iter()
            .find(|l| l.contains("policy applied"))
            .with_context(|| format!("no \"policy applied\" line for reload {i}"))?;
        in_place.push(applied.contains("incremental=true"));
        p.say(&format!(
            "reload {}/{k} at {} rules: kernel has the new rule {:.0} ms after the rename (in place: {})",
            i + 1,
            rules.len(),
            secs * 1e3,
            in_place[i]
        ));
    }
    Ok(ReloadRow {
        rules: rules.len(),
        median_seconds: crate::median(&samples),
        max_seconds: samples.iter().copied().fold(0.0, f64::max),
        samples_seconds: samples,
        in_place,
        debounce_seconds: DEBOUNCE.as_secs_f64(),
    })
}

// ---------------------------------------------------------------------------------------------------
// `vpcgate check` on overlap-heavy shapes
// ---------------------------------------------------------------------------------------------------

struct Shape {
    name: &'static str,
    description: String,
    text: String,
    authorizations: usize,
    accessible: usize,
    reserved: usize,
    /// Whether the shape is meant to fit (check must then call it valid) or to be refused.
    fits: bool,
}

const DEDICATED: &str = "[instance]\nname = \"gw-shape\"\nkind = \"dedicated\"\nvpc_id = \"vpc-gw\"\ninterface = \"eth1\"\negress_ip = \"100.104.12.7\"\n";

fn auth(out: &mut String, name: &str, address: &str, ports: &[String]) {
    let ports: Vec<String> = ports.iter().map(|p| format!("\"{p}\"")).collect();
    out.push_str(&format!(
        "\n[[authorization]]\nname = \"{name}\"\nvpc_id = \"vpc-backend\"\naddress = \"{address}\"\nports = [{}]\n",
        ports.join(", ")
    ));
}

fn host(i: u32) -> String {
    Ipv4Addr::from(0x0a00_0000 | (i + 1)).to_string()
}

/// Issue 8's wide+host overlap: `wide` authorizations on 10.0.0.0/8, each with its own 5-port range
/// (3 port blocks), and `hosts` host authorizations under it: every host prefix repeats the wide rules'
/// ports in its own table.
fn nested(wide: u32, hosts: u32) -> String {
    let mut t = DEDICATED.to_owned();
    for w in 0..wide {
        let lo = 1000 + w * 8;
        auth(
            &mut t,
            &format!("wide-{w}"),
            "10.0.0.0/8",
            &[format!("{}-{}", lo + 1, lo + 5)],
        );
    }
    for h in 0..hosts {
        auth(
            &mut t,
            &format!("host-{h}"),
            &host(h),
            &[(80 + h % 5).to_string()],
        );
    }
    t
}

fn shapes() -> Vec<Shape> {
    let mut v = vec![];
    // Nested prefixes with differing ports, near the PORTS map's capacity: 20 wide rules (60 blocks)
    // repeated under each host, which adds one port of its own (61 entries per host).
    let (w, h) = (
        20,
        vpcgate_common::datapath::limits::PORT_ENTRIES * 98 / 100 / 61,
    );
    v.push(Shape {
        name: "nested-ports",
        description: format!(
            "{w} authorizations on 10.0.0.0/8 with a port range each, {h} host authorizations under it with a port each (every host's table repeats the wide ports): near the PORTS capacity"
        ),
        text: nested(w, h),
        authorizations: (w + h) as usize,
        accessible: 0,
        reserved: 0,
        fits: true,
    });
    // The issue's own size: 60 million port entries, refused early.
    let (w, h) = (2000, 10_000);
    v.push(Shape {
        name: "nested-ports-issue",
        description: format!(
            "the issue's size: {w} wide rules over {h} hosts (about 60 million port entries): refused, naming the rules"
        ),
        text: nested(w, h),
        authorizations: (w + h) as usize,
        accessible: 0,
        reserved: 0,
        fits: false,
    });
    // Many rules covering one block: 30,000 authorizations on 10.1.0.0/16 with overlapping port ranges
    // (rule i: 2i+1 .. 2i+40); first match wins, each rule keeps 2 ports.
    let r = 30_000u32;
    let mut t = DEDICATED.to_owned();
    for i in 0..r {
        let lo = 2 * i + 1;
        auth(
            &mut t,
            &format!("block-{i}"),
            "10.1.0.0/16",
            &[format!("{lo}-{}", (lo + 39).min(65535))],
        );
    }
    v.push(Shape {
        name: "one-block",
        description: format!(
            "{r} authorizations on one block (10.1.0.0/16) with overlapping port ranges (rule i: 2i+1..2i+40)"
        ),
        text: t,
        authorizations: r as usize,
        accessible: 0,
        reserved: 0,
        fits: true,
    });
    // Port tables hidden under authorizations, at the rule capacity: an accessible 10.0.0.0/8 with
    // 4,096 ports, all-port authorizations on it, and 1,000,000 accessible /32s under it.
    let hosts = 1_000_000u32;
    let ports: Vec<String> = (0..4096).map(|i| format!("\"{}\"", 1 + 2 * i)).collect();
    let mut t = format!(
        "[instance]\nname = \"gw-shape\"\nkind = \"vpc-integration\"\nvpc_id = \"vpc-gw\"\ninterface = \"eth1\"\n\
         vswitch_cidr = \"192.168.0.0/24\"\n\n[[accessible]]\ncidr = \"10.0.0.0/8\"\nports = [{}]\n",
        ports.join(", ")
    );
    for proto in ["tcp", "udp"] {
        t += &format!(
            "\n[[authorization]]\nname = \"all-{proto}\"\nvpc_id = \"vpc-gw\"\naddress = \"10.0.0.0/8\"\nprotocol = \"{proto}\"\nports = [\"1-65535\"]\n"
        );
    }
    for h in 0..hosts {
        t += &format!("\n[[accessible]]\ncidr = \"{}/32\"\n", host(h));
    }
    v.push(Shape {
        name: "hidden-tables",
        description: format!(
            "an accessible 10.0.0.0/8 with 4,096 ports hidden under all-port authorizations, and {hosts} accessible /32s under it: near the rule and address capacity"
        ),
        text: t,
        authorizations: 2,
        accessible: hosts as usize + 1,
        reserved: 0,
        fits: true,
    });
    // The many-reserved: 200,000 reserved blocks (capacity 1,024), refused.
    let blocks: Vec<String> = (0..200_000u32)
        .map(|i| format!("\"{}/32\"", Ipv4Addr::from(0x6440_0000 | i)))
        .collect();
    let mut t = format!(
        "[instance]\nname = \"gw-shape\"\nkind = \"vpc-integration\"\nvpc_id = \"vpc-gw\"\ninterface = \"eth1\"\n\
         egress_ip = \"10.0.0.5\"\nvswitch_cidr = \"10.0.0.0/20\"\nreserved_cidrs = [\n  {}\n]\n",
        blocks.join(",\n  ")
    );
    for i in 0..1000 {
        t += &format!(
            "\n[[authorization]]\nname = \"a-{i}\"\nvpc_id = \"vpc-gw\"\naddress = \"10.0.{}.{}\"\nports = [\"80\"]\n",
            i % 16,
            7 + i / 16
        );
    }
    v.push(Shape {
        name: "many-reserved-issue",
        description:
            "the issue's 200,000 reserved blocks (capacity 1,024) and 1,000 authorizations: refused"
                .into(),
        text: t,
        authorizations: 1000,
        accessible: 0,
        reserved: 200_000,
        fits: false,
    });
    v
}

fn check_shape(
    opts: &crate::Opts,
    dir: &TempDir,
    s: &Shape,
    p: &crate::Progress,
) -> anyhow::Result<CheckRow> {
    let file = dir.0.join(format!("{}.toml", s.name));
    std::fs::write(&file, &s.text).with_context(|| format!("write {}", file.display()))?;
    let bin = opts.vpcgate.to_string_lossy().into_owned();
    let path = file.to_string_lossy().into_owned();
    p.say(&format!(
        "check {}: {} ({:.1} MB)",
        s.name,
        s.description,
        s.text.len() as f64 / 1e6
    ));
    let (out, secs) = timed(|| {
        run_bounded(
            None,
            &bin,
            &["check", &path, "--output", "json"],
            None,
            Duration::from_secs(300),
        )
    });
    let out = out?;
    let code = out.status.code();
    ensure!(
        code == Some(0) || code == Some(1),
        "vpcgate check {path} exited with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("vpcgate check {path} --output json printed no JSON"))?;
    let valid = json["valid"]
        .as_bool()
        .context("no \"valid\" in check's JSON")?;
    let first_error = json["diagnostics"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["severity"] == "error"))
        .and_then(|d| d["message"].as_str())
        .map(|m| m.chars().take(300).collect::<String>());
    ensure!(
        valid == s.fits,
        "shape {} was meant to {} but check says valid = {valid}: {}",
        s.name,
        if s.fits { "fit" } else { "be refused" },
        first_error.as_deref().unwrap_or("")
    );
    let capacity = json["capacity"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    (
                        m["map"].as_str().unwrap_or_default().to_owned(),
                        m["entries"].as_u64().unwrap_or_default(),
                        m["capacity"].as_u64().unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    p.say(&format!("check {}: {:.2} s, valid {valid}", s.name, secs));
    let _ = std::fs::remove_file(&file);
    Ok(CheckRow {
        shape: s.name.to_owned(),
        description: s.description.clone(),
        authorizations: s.authorizations,
        accessible_blocks: s.accessible,
        reserved_blocks: s.reserved,
        file_bytes: s.text.len() as u64,
        seconds: secs,
        valid,
        capacity,
        first_error,
    })
}

// ---------------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------------

fn opt_s(v: Option<f64>) -> String {
    match v {
        Some(s) if s < 1.0 => format!("{:.1} ms", s * 1e3),
        Some(s) => format!("{s:.2} s"),
        None => "—".into(),
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::new();
    let apply: Vec<&ApplyRow> = rows
        .iter()
        .filter_map(|r| match r {
            Row::Apply(a) => Some(a),
            _ => None,
        })
        .collect();
    if !apply.is_empty() {
        out += "### Compile and apply (in-process, unattached datapath)\n\n";
        out += "| rules | shape | address / port entries | compile | load (verifier) | generation (first apply) | incremental | new generation over current | kernel maps (policy maps) |\n";
        out += "|---:|---|---:|---:|---:|---:|---:|---:|---:|\n";
        for a in &apply {
            let writes = |w: Option<u32>| w.map(|w| format!(", {w} writes")).unwrap_or_default();
            let generation = if a.fits {
                format!(
                    "{}{}",
                    opt_s(a.generation_seconds),
                    writes(a.generation_writes)
                )
            } else {
                format!("refused after {}", opt_s(a.generation_seconds))
            };
            out += &format!(
                "| {} | {}{} | {} | {} | {} | {} | {} | {} | {} |\n",
                a.rules,
                a.shape,
                if a.note.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", a.note)
                },
                a.entries
                    .as_ref()
                    .map(|e| format!("{} / {}", e.addr_v4 + e.addr_v6, e.ports))
                    .unwrap_or_else(|| "—".into()),
                opt_s(a.compile_seconds),
                opt_s(a.load_seconds),
                generation,
                match a.incremental_seconds {
                    Some(_) => format!(
                        "{}{}{}",
                        opt_s(a.incremental_seconds),
                        writes(a.incremental_writes),
                        match a.incremental_in_place {
                            Some(false) => " (not in place!)",
                            _ => "",
                        }
                    ),
                    None => "—".into(),
                },
                match a.regeneration_seconds {
                    Some(_) => format!(
                        "{}{}",
                        opt_s(a.regeneration_seconds),
                        writes(a.regeneration_writes)
                    ),
                    None => "—".into(),
                },
                match (a.kernel_map_bytes, a.policy_map_bytes) {
                    (Some(t), Some(p)) => format!("{} ({})", mib(t), mib(p)),
                    _ => "—".into(),
                }
            );
        }
        out += "\n";
        for a in apply.iter().filter(|a| a.error.is_some()) {
            out += &format!(
                "- {} {} rules: {}\n",
                a.rules,
                a.shape,
                a.error.as_deref().unwrap_or_default()
            );
        }
        let changes: Vec<String> = apply
            .iter()
            .filter(|a| !a.incremental_change.is_empty())
            .map(|a| format!("{}: {}", a.shape, a.incremental_change))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        out += &format!(
            "\nGenerated: `policy::generate`, disjoint authorizations with a port table each (about 3.4 PORTS \
             entries per rule). Shared-table: the generated \
             prefixes as accessible blocks under region-wide all-port authorizations (10.128.0.0/9, fd00::/16), \
             which win every port, so all blocks share one port table: address entries and rules up to \
             capacity. Compile is `Compiled::new` on an already parsed policy. Generation: every entry written \
             under the inactive slot, ACTIVE flipped, a barrier. Incremental ({}): the datapath's in-place plan \
             (every rule keeps its id): only what differs, in phases separated by barriers (each an RCU grace \
             period). New generation over current: an authorization inserted in front (and one rule removed, \
             so the largest policy stays within capacity) shifts every rule id: the policy is written beside the \
             current generation, flipped to, the old one deleted. Every apply \
             is checked with BPF_PROG_TEST_RUN packets.\n\n",
            changes.join("; ")
        );
    }
    if let Some(Row::Reload(r)) = rows.iter().find(|r| matches!(r, Row::Reload(_))) {
        out += &format!(
            "### One-rule change through the daemon ({} rules)\n\nFile replaced (write + rename) to kernel \
             (the pinned TC program passes the new rule's packet): median {}, max {} over {} changes \
             (samples: {}); applied in place: {:?}. Includes the agent's {} ms inotify debounce.\n\n",
            r.rules,
            opt_s(Some(r.median_seconds)),
            opt_s(Some(r.max_seconds)),
            r.samples_seconds.len(),
            r.samples_seconds
                .iter()
                .map(|s| format!("{:.0} ms", s * 1e3))
                .collect::<Vec<_>>()
                .join(", "),
            r.in_place,
            (r.debounce_seconds * 1e3).round()
        );
    }
    let agents: Vec<&AgentRow> = rows
        .iter()
        .filter_map(|r| match r {
            Row::Agent(a) => Some(a),
            _ => None,
        })
        .collect();
    if !agents.is_empty() {
        out += "### Agent memory (`vpcgate run` in the lab)\n\n";
        out += "| rules | shape | startup to ready | VmRSS | VmHWM | after reloads (RSS / HWM) | kernel maps | of which policy maps | largest maps |\n";
        out += "|---:|---|---:|---:|---:|---:|---:|---:|---|\n";
        for a in agents {
            out += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                a.rules,
                a.shape,
                opt_s(Some(a.startup_seconds)),
                mib(a.vm_rss_kib * 1024),
                mib(a.vm_hwm_kib * 1024),
                match (a.after_reloads_vm_rss_kib, a.after_reloads_vm_hwm_kib) {
                    (Some(r), Some(h)) => format!("{} / {}", mib(r * 1024), mib(h * 1024)),
                    _ => "—".into(),
                },
                mib(a.kernel_map_bytes),
                mib(a.policy_map_bytes),
                a.by_map
                    .iter()
                    .take(4)
                    .map(|(n, b)| format!("{n} {}", mib(*b)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        out += "\nKernel map memory is the kernel's `memlock` accounting of every map the agent holds \
                (/proc/PID/fdinfo): LPM tries count the entries they hold, preallocated maps their capacity.\n\n";
    }
    let checks: Vec<&CheckRow> = rows
        .iter()
        .filter_map(|r| match r {
            Row::Check(c) => Some(c),
            _ => None,
        })
        .collect();
    if !checks.is_empty() {
        out += "### `vpcgate check` on overlap-heavy shapes\n\n";
        out += "| shape | file | wall time | valid | entries (of capacity) / first error |\n";
        out += "|---|---:|---:|---|---|\n";
        for c in checks {
            let detail = if c.valid {
                c.capacity
                    .iter()
                    .filter(|(_, e, _)| *e > 0)
                    .map(|(m, e, cap)| format!("{m} {e}/{cap}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            } else {
                c.first_error
                    .as_deref()
                    .unwrap_or_default()
                    .replace('|', "\\|")
                    .replace('\n', " ")
            };
            out += &format!(
                "| {}: {} | {:.1} MB | {} | {} | {} |\n",
                c.shape,
                c.description,
                c.file_bytes as f64 / 1e6,
                opt_s(Some(c.seconds)),
                c.valid,
                detail
            );
        }
        out += "\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_fit_is_where_the_ports_map_fills() {
        let seed = 7;
        // At a small capacity (the kernel's, 2^22, holds every generated size).
        let limit = 20_000;
        let fit = generated_fit_within(limit, seed).unwrap();
        let ports = |n| {
            let rules = policy::generate(n, seed).unwrap();
            let c = Compiled::new(&policy::policy(&rules, "x", "eth1").unwrap());
            vpcgate::datapath::entry_counts(&c).ports
        };
        assert!(ports(fit) <= limit && ports(fit + 1) > limit, "{fit}");
    }

    #[test]
    fn the_shared_shape_is_valid_and_shares_one_port_table() {
        let text = shared_toml("x", "eth1", 1000, 3, "").unwrap();
        let checked = vpcgate::policy::check_text("s.toml", &text);
        let c = checked
            .compiled
            .unwrap_or_else(|| panic!("{:?}", checked.diagnostics.first()));
        assert_eq!(c.counts.rules, 1000);
        assert!(c.counts.ports < 100, "{:?}", c.counts);
        let (p, _) = shared_policy(1000, 3).unwrap();
        assert_eq!(
            vpcgate::datapath::entry_counts(&Compiled::new(&p)),
            c.counts
        );
    }
}
