//! `vpcgate run`: the binary enforces a policy file in a namespace, reloads on SIGHUP (keeping the old
//! policy when the new file is invalid), leaves enforcement pinned when it exits, is adopted by the next
//! agent after a `kill -9` without a window, and `teardown` removes it.

use std::{
    net::UdpSocket,
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use vpcgate::{
    datapath::{Datapath, pin, state},
    policy::{check_text, compile::Compiled},
};
use vpcgate_lab::{
    agent::Agent,
    netns::{GW_IF, Pair, spawn_in},
};

const POLICY: &str = r#"
[instance]
name = "INSTANCE"
kind = "dedicated"
vpc_id = "vpc-lab"
interface = "veth-gw"
FORWARD
[[authorization]]
name = "echo"
vpc_id = "vpc-lab"
address = "10.200.0.2"
ports = ["PORTS"]
protocol = "udp"
"#;

fn binary() -> String {
    std::env::var("VPCGATE_BIN").unwrap_or_else(|_| {
        panic!("VPCGATE_BIN is not set: run through `cargo xtask test`, which builds vpcgate and points it here")
    })
}

/// A policy file in a temporary directory, for an instance named after this test and process.
struct PolicyFile {
    dir: PathBuf,
    file: PathBuf,
    instance: String,
}

impl PolicyFile {
    fn new(test: &str, ports: &str) -> Self {
        let instance = format!("{test}-{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("vpcgate-{instance}"));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("policy.toml");
        let p = Self {
            dir,
            file,
            instance,
        };
        p.write(ports);
        p
    }

    fn text(&self, ports: &str) -> String {
        self.text_with(ports, "")
    }

    /// With `forward` in place of the forward_interfaces line.
    fn text_with(&self, ports: &str, forward: &str) -> String {
        POLICY
            .replace("INSTANCE", &self.instance)
            .replace("PORTS", ports)
            .replace("FORWARD", forward)
    }

    fn write(&self, ports: &str) {
        std::fs::write(&self.file, self.text(ports)).unwrap();
    }
}

impl Drop for PolicyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        // Whatever a failed test left pinned (best effort; the test itself asserts teardown).
        let dir = pin::instance_dir(&self.instance);
        if dir.exists() {
            let _ = pin::teardown(&self.instance);
        }
        for ext in ["json", "applied.toml", "sock", "lock"] {
            let _ = std::fs::remove_file(format!("/run/vpcgate/{}.{ext}", self.instance));
        }
    }
}

/// `vpcgate ARGS` started from a thread inside the gateway namespace (see `spawn_in`).
fn spawn_in_gw(pair: &Pair, args: &[&str], stdout: Stdio) -> Child {
    spawn_in(&pair.gw, &binary(), args, stdout)
}

fn output_in_gw(pair: &Pair, args: &[&str]) -> Output {
    spawn_in_gw(pair, args, Stdio::piped())
        .wait_with_output()
        .expect("vpcgate output")
}

/// `vpcgate run --config file` in the gateway namespace.
fn start_agent(pair: &Pair, file: &Path) -> Agent {
    start_agent_under(pair, &[], file)
}

/// `start_agent`, run by `wrapper` (e.g. setpriv and its options).
fn start_agent_under(pair: &Pair, wrapper: &[&str], file: &Path) -> Agent {
    Agent::start(&pair.gw, &binary(), wrapper, file)
}

/// Sends one datagram from the gateway to 10.200.0.2:`port`; whether it arrived.
fn delivered(pair: &Pair, port: u16) -> bool {
    let rx = pair
        .vpc
        .run(|| UdpSocket::bind(("10.200.0.2", port)).unwrap());
    rx.set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    pair.gw.run(|| {
        let s = UdpSocket::bind("10.200.0.1:0").unwrap();
        let _ = s.send_to(b"x", ("10.200.0.2", port));
    });
    let mut buf = [0u8; 8];
    rx.recv_from(&mut buf).is_ok()
}

fn xdp_attached(pair: &Pair) -> bool {
    pair.gw.ip(&["link", "show", GW_IF]).contains("xdp")
}

/// The ids of the programs the instance pinned (one build directory).
fn pinned_program_ids(instance: &str) -> Vec<(String, u32)> {
    let builds: Vec<_> = std::fs::read_dir(pin::instance_dir(instance))
        .expect("instance pinned")
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(builds.len(), 1, "one build pinned: {builds:?}");
    let mut ids: Vec<_> = std::fs::read_dir(builds[0].join("progs"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let info = aya::programs::ProgramInfo::from_pin(e.path()).expect("pinned program");
            (e.file_name().to_string_lossy().into_owned(), info.id())
        })
        .collect();
    ids.sort();
    ids
}

#[test]
fn run_enforces_reloads_and_leaves_enforcement_pinned_until_teardown() {
    vpcgate_lab::require_root();
    let pair = Pair::new();
    let policy = PolicyFile::new("run", "9000");
    let agent = start_agent(&pair, &policy.file);
    agent.wait_for("enforcing");
    assert!(delivered(&pair, 9000), "authorized port blocked");
    assert!(!delivered(&pair, 9001), "unauthorized port delivered");
    // A second agent for the same instance is refused while the first runs.
    let second = output_in_gw(&pair, &["run", "--config", policy.file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{err}");
    assert!(err.contains("a vpcgate agent runs instance"), "{err}");

    policy.write("9000-9001");
    agent.signal(libc::SIGHUP);
    agent.wait_for("policy reloaded");
    assert!(delivered(&pair, 9001), "reloaded policy not enforced");

    std::fs::write(&policy.file, "[instance]\nname = \"broken\"\n").unwrap();
    agent.signal(libc::SIGHUP);
    agent.wait_for("reload failed");
    assert!(
        delivered(&pair, 9001),
        "an invalid reload changed the policy"
    );
    assert!(!delivered(&pair, 9002), "an invalid reload opened traffic");

    // The control socket: `vpcgate reload` waits for the result (refused: the file is still broken).
    let reload = output_in_gw(
        &pair,
        &["reload", "--instance", &policy.instance, "--output", "json"],
    );
    assert_eq!(reload.status.code(), Some(1), "reload of a broken file");
    let reply: serde_json::Value = serde_json::from_slice(&reload.stdout).unwrap();
    assert_eq!(reply["error"]["code"], "reload_failed", "{reply}");
    control_socket_refuses_bad_requests(&policy.instance);
    policy.write("9000-9001");
    let reload = output_in_gw(&pair, &["reload", "--instance", &policy.instance]);
    assert_eq!(
        reload.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&reload.stderr)
    );

    let running = status(&pair, &policy.instance);
    assert_eq!(running["agent_running"], true, "{running}");
    assert_eq!(running["agent_ready"], true, "{running}");
    let refused = output_in_gw(&pair, &["teardown", "--instance", &policy.instance]);
    assert_eq!(
        refused.status.code(),
        Some(2),
        "teardown under a running agent"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("a vpcgate agent runs instance"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(xdp_attached(&pair), "a refused teardown detached something");

    agent.stop();
    // The agent is gone; the kernel still enforces the last policy, and status reads it.
    let st = status(&pair, &policy.instance);
    assert_eq!(st["agent_running"], false, "{st}");
    assert_eq!(st["mode"], "enforce", "{st}");
    assert_eq!(st["problems"].as_array().map(Vec::len), Some(0), "{st}");
    // The file watch and SIGHUP both react to each write: at least one of each.
    assert!(st["reloads_ok"].as_u64().unwrap() >= 1, "{st}");
    assert!(st["reloads_failed"].as_u64().unwrap() >= 1, "{st}");
    let attached: Vec<_> = st["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["attached"] == true && a["interface"] == GW_IF)
        .collect();
    assert_eq!(
        attached.len(),
        2,
        "TC egress and XDP ingress on the ENI: {st}"
    );
    let tc = attached
        .iter()
        .find(|a| a["hook"] == "tcx" || a["hook"] == "clsact")
        .unwrap_or_else(|| panic!("no TC attachment: {st}"));
    // First in the egress chain (tcx), or the highest clsact priority.
    assert!(
        tc["chain_position"] == "1 of 1" || tc["chain_position"] == "priority 1",
        "{tc}"
    );
    let echo = st["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "echo")
        .unwrap_or_else(|| panic!("no rule echo in {st}"))
        .clone();
    assert!(echo["packets"].as_u64().unwrap() >= 2, "{echo}");
    assert!(
        st["drops"]["port_not_authorized"].as_u64().unwrap() >= 2,
        "{st}"
    );
    assert!(xdp_attached(&pair), "XDP detached when the agent exited");
    assert!(delivered(&pair, 9001), "allowed traffic blocked after exit");
    assert!(
        !delivered(&pair, 9002),
        "unauthorized traffic passed after the agent exited"
    );

    let out = output_in_gw(&pair, &["teardown", "--instance", &policy.instance]);
    assert!(
        out.status.success(),
        "teardown failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!xdp_attached(&pair), "XDP still attached after teardown");
    assert!(
        delivered(&pair, 9002),
        "still enforced after teardown (the link or filter stayed)"
    );
    assert!(
        !pin::instance_dir(&policy.instance).exists(),
        "pins left after teardown"
    );
    assert!(
        !std::path::Path::new(&format!("/run/vpcgate/{}.json", policy.instance)).exists(),
        "the agent record outlived teardown"
    );
    let again = output_in_gw(&pair, &["teardown", "--instance", &policy.instance]);
    assert_eq!(
        again.status.code(),
        Some(2),
        "a second teardown has nothing to remove"
    );
}

/// The control socket is private (0600) and answers malformed, oversized and other-version requests
/// with JSON errors.
fn control_socket_refuses_bad_requests(instance: &str) {
    use std::{
        io::{Read, Write},
        os::unix::{fs::PermissionsExt, net::UnixStream},
    };
    let path = format!("/run/vpcgate/{instance}.sock");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode {mode:o}");
    let ask = |body: &[u8]| -> serde_json::Value {
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The agent may answer (and close) before an oversized body is all written.
        let _ = s.write_all(body);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
    };
    for (body, code) in [
        (
            b"hello
"
            .to_vec(),
            "bad_request",
        ),
        (
            br#"{"version": 99, "command": "status"}"#.to_vec(),
            "unsupported_version",
        ),
        (
            br#"{"version": 1, "command": "format-disk"}"#.to_vec(),
            "unknown_command",
        ),
        (vec![b'x'; 70 * 1024], "too_large"),
    ] {
        let reply = ask(&body);
        assert_eq!(reply["ok"], false, "{reply}");
        assert_eq!(reply["version"], 1, "{reply}");
        assert_eq!(reply["error"]["code"], code, "{reply}");
    }
    let reply = ask(b"{\"version\": 1, \"command\": \"status\"}\n");
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["result"]["instance"], instance, "{reply}");
}

/// `vpcgate status --instance NAME --output json` in the gateway namespace, parsed.
fn status(pair: &Pair, instance: &str) -> serde_json::Value {
    let out = output_in_gw(
        pair,
        &["status", "--instance", instance, "--output", "json"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "status ({}) printed no JSON ({e}): {text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// GET http://127.0.0.1:9464`path` from inside the gateway namespace: (status, body).
fn http_get(pair: &Pair, path: &str) -> (u16, String) {
    pair.gw.run(|| {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .new_agent();
        let mut resp = agent
            .get(&format!("http://127.0.0.1:9464{path}"))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_to_string().unwrap())
    })
}

/// The value of the sample `name` whose labels include every (label, value) of `labels`.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let s = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"));
    match &s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        other => panic!("{name}: unexpected {other:?}"),
    }
}

fn scrape(pair: &Pair) -> prometheus_parse::Scrape {
    let (code, body) = http_get(pair, "/metrics");
    assert_eq!(code, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("unparsable exposition ({e}):\n{body}"))
}

/// Kubernetes' ConfigMap layout: `policy.toml -> ..data/policy.toml`, `..data -> ..<version>`; an
/// update writes a new version directory and renames a new `..data` symlink over the old one.
fn configmap_publish(dir: &Path, version: &str, text: &str) {
    let v = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&v).unwrap();
    std::fs::write(v.join("policy.toml"), text).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let link = dir.join("policy.toml");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("..data/policy.toml", &link).unwrap();
    }
}

/// An editor's save: write a temporary file, rename it over the policy.
fn rename_write(file: &Path, text: &str) {
    let tmp = file.with_extension("toml.swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

#[test]
fn file_changes_reload_and_metrics_report_them() {
    vpcgate_lab::require_root();
    let pair = Pair::new();
    let policy = PolicyFile::new("reload", "9000");
    let cm = policy.dir.join("configmap");
    std::fs::create_dir_all(&cm).unwrap();
    configmap_publish(&cm, "v1", &policy.text("9000"));
    let file = cm.join("policy.toml");
    let agent = start_agent(&pair, &file);
    agent.wait_for("enforcing");
    agent.wait_for("watching the policy file");
    assert_eq!(http_get(&pair, "/readyz").0, 200, "not ready after apply");
    assert_eq!(http_get(&pair, "/healthz").0, 200);
    assert!(delivered(&pair, ALLOWED), "authorized port blocked");
    assert!(!delivered(&pair, DENIED), "unauthorized port delivered");
    let generation = || sample(&scrape(&pair), "vpcgate_policy_generation", &[]);
    let first_generation = generation();

    // A ConfigMap update (the ..data symlink swap) opens 9001.
    let t = Instant::now();
    // A rule added before echo shifts echo's id: the reload must be a new generation.
    let shifted = policy.text("9000-9001").replacen(
        "[[authorization]]",
        "[[authorization]]\nname = \"other\"\nvpc_id = \"vpc-lab\"\naddress = \"10.200.0.3\"\nports = [\"1\"]\nprotocol = \"udp\"\n\n[[authorization]]",
        1,
    );
    configmap_publish(&cm, "v2", &shifted);
    agent.wait_for("policy reloaded");
    eprintln!("ConfigMap swap applied after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(
        delivered(&pair, DENIED),
        "the ConfigMap change is not in effect"
    );
    let swap_generation = generation();

    // An editor's rename-write closes it again.
    let t = Instant::now();
    rename_write(&file, &policy.text("9000"));
    agent.wait_for("policy reloaded");
    eprintln!("rename-write applied after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(
        !delivered(&pair, DENIED),
        "the rename-write is not in effect"
    );
    let rename_generation = generation();
    // Each of these reloads shifts echo's id, so it is a new generation and the old one's counters are
    // deleted (and must be folded into the totals, as checked below).
    assert_ne!(first_generation, swap_generation, "the swap did not flip");
    assert_ne!(
        swap_generation, rename_generation,
        "the rename-write did not flip"
    );

    // An invalid change is refused and counted; the policy stays.
    rename_write(&file, "[instance]\nname = \"broken\"\n");
    agent.wait_for("reload failed");
    assert!(
        delivered(&pair, ALLOWED),
        "an invalid change closed traffic"
    );
    assert!(
        !delivered(&pair, DENIED),
        "an invalid change opened traffic"
    );
    assert_eq!(
        http_get(&pair, "/readyz").0,
        200,
        "an invalid file is not a kernel problem"
    );

    let m = scrape(&pair);
    assert_eq!(
        sample(&m, "vpcgate_reloads_total", &[("result", "success")]),
        2.0
    );
    assert_eq!(
        sample(&m, "vpcgate_reloads_total", &[("result", "failure")]),
        1.0
    );
    assert!(
        sample(
            &m,
            "vpcgate_drops_total",
            &[("reason", "port_not_authorized")]
        ) >= 2.0
    );
    // Every datagram rule echo passed, across all the reloads (two to 9000, one to 9001 while it
    // was open): counters of replaced generations are folded in, not lost.
    assert_eq!(
        sample(&m, "vpcgate_rule_packets_total", &[("rule", "echo")]),
        3.0
    );
    let generation = sample(&m, "vpcgate_policy_generation", &[]);
    assert!(generation == 1.0 || generation == 2.0, "{generation}");
    assert_eq!(
        sample(&m, "vpcgate_map_capacity", &[("map", "PORTS")]),
        f64::from(vpcgate_common::datapath::limits::PORT_ENTRIES)
    );
    assert_eq!(
        sample(&m, "vpcgate_map_entries", &[("map", "ADDR_V4")]),
        1.0
    );
    assert!(sample(&m, "vpcgate_apply_duration_seconds_count", &[]) >= 3.0);
    assert_eq!(sample(&m, "vpcgate_build_info", &[]), 1.0);
    agent.stop();
    let out = output_in_gw(&pair, &["teardown", "--instance", &policy.instance]);
    assert!(out.status.success(), "teardown failed");
}

/// Datagrams toward one allowed and one denied port, every 2 ms until stopped (at most 20 s): what was
/// sent and what arrived, per port.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<[AtomicU32; 2]>,
    received: Arc<[AtomicU32; 2]>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

const ALLOWED: u16 = 9000;
const DENIED: u16 = 9001;

impl Traffic {
    fn start(pair: &Pair) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
        let received = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
        let mut threads = vec![];
        for (i, port) in [ALLOWED, DENIED].into_iter().enumerate() {
            let rx = pair
                .vpc
                .run(|| UdpSocket::bind(("10.200.0.2", port)).unwrap());
            rx.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            // Room for every datagram of the run even if this thread is starved on a loaded machine:
            // a loss must be the datapath's, never the socket buffer's.
            socket2::SockRef::from(&rx)
                .set_recv_buffer_size(4 << 20)
                .unwrap();
            let (stop, received) = (stop.clone(), received.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 16];
                let deadline = Instant::now() + Duration::from_secs(25);
                // Drain until stopped and quiet, bounded in time.
                loop {
                    match rx.recv_from(&mut buf) {
                        Ok(_) => {
                            received[i].fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) if stop.load(Ordering::Relaxed) => break,
                        Err(_) => {}
                    }
                    if Instant::now() > deadline {
                        break;
                    }
                }
            }));
        }
        let tx = pair.gw.run(|| UdpSocket::bind("10.200.0.1:0").unwrap());
        let (stop2, sent2) = (stop.clone(), sent.clone());
        threads.push(std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                for (i, port) in [ALLOWED, DENIED].into_iter().enumerate() {
                    if tx.send_to(b"probe", ("10.200.0.2", port)).is_ok() {
                        sent2[i].fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }));
        Self {
            stop,
            sent,
            received,
            threads,
        }
    }

    /// Stops sending, waits for the receivers: (sent, received) for the allowed and the denied port.
    fn finish(self) -> [(u32, u32); 2] {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        [0, 1].map(|i| {
            (
                self.sent[i].load(Ordering::Relaxed),
                self.received[i].load(Ordering::Relaxed),
            )
        })
    }
}

#[test]
fn a_killed_agent_is_adopted_by_the_next_without_a_window() {
    vpcgate_lab::require_root();
    let pair = Pair::new();
    let policy = PolicyFile::new("restart", "9000");
    let agent = start_agent(&pair, &policy.file);
    assert!(agent.wait_for("kernel programs ready").contains("Loaded"));
    agent.wait_for("enforcing");
    let ids = pinned_program_ids(&policy.instance);
    // Warm the neighbour entry so no datagram of the measured run waits on ARP.
    assert!(delivered(&pair, ALLOWED), "authorized port blocked");

    let traffic = Traffic::start(&pair);
    std::thread::sleep(Duration::from_millis(300));
    let mut agent = agent;
    agent.signal(libc::SIGKILL);
    agent.wait();
    assert!(
        xdp_attached(&pair),
        "XDP detached when the agent was killed"
    );
    std::thread::sleep(Duration::from_millis(300));
    let agent = start_agent(&pair, &policy.file);
    let ready = agent.wait_for("kernel programs ready");
    assert!(
        ready.contains("Adopted"),
        "the restarted agent did not adopt: {ready}"
    );
    agent.wait_for("enforcing");
    std::thread::sleep(Duration::from_millis(300));
    let [(allowed_sent, allowed_got), (denied_sent, denied_got)] = traffic.finish();
    eprintln!(
        "allowed {allowed_got}/{allowed_sent} arrived, denied {denied_got}/{denied_sent} arrived"
    );
    assert!(
        denied_sent > 100 && allowed_sent > 100,
        "too little traffic"
    );
    assert_eq!(denied_got, 0, "denied datagrams passed during the restart");
    assert_eq!(
        allowed_got, allowed_sent,
        "allowed datagrams were lost during the restart"
    );
    assert_eq!(
        pinned_program_ids(&policy.instance),
        ids,
        "program ids changed across the restart"
    );

    // A reload right after adoption leaves exactly what a fresh apply of the new policy writes.
    policy.write("9000-9001");
    agent.signal(libc::SIGHUP);
    agent.wait_for("policy reloaded");
    let checked = check_text("policy.toml", &policy.text("9000-9001"));
    let compiled = Compiled::new(&checked.policy.expect("valid policy"));
    let mut dp = Datapath::inspect(&policy.instance).expect("inspect the pinned instance");
    let active = dp.active_generation().unwrap().expect("a policy is active");
    let is = dp.read_generation(active).unwrap();
    let want = state::desired(&compiled);
    assert_eq!(is, want, "{:?}", is.differences(&want, 10));
    let other = state::other(Some(active));
    assert!(
        dp.read_generation(other).unwrap().is_empty(),
        "the old generation was not removed"
    );
    drop(dp);
    assert!(
        delivered(&pair, DENIED),
        "the reloaded policy is not enforced"
    );

    // `diff`: the applied policy against itself changes nothing; against one that closes 9000 it names
    // the rule that carried the traffic and the destination it would cut, with the counts.
    let diff = |text: &str| {
        let file = policy.dir.join("new.toml");
        std::fs::write(&file, text).unwrap();
        let out = output_in_gw(
            &pair,
            &[
                "diff",
                file.to_str().unwrap(),
                "--instance",
                &policy.instance,
                "--output",
                "json",
            ],
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "diff printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code(), v)
    };
    let (code, same) = diff(&policy.text("9000-9001"));
    assert_eq!(code, Some(0), "{same}");
    assert_eq!(same["rules"].as_array().map(Vec::len), Some(0), "{same}");
    assert_eq!(same["warnings"].as_array().map(Vec::len), Some(0), "{same}");
    let (code, cut) = diff(&policy.text("9001"));
    assert_eq!(code, Some(1), "{cut}");
    let rule = &cut["rules"][0];
    assert_eq!(
        (rule["change"].as_str(), rule["name"].as_str()),
        (Some("changed"), Some("echo")),
        "{cut}"
    );
    assert!(
        rule["packets"].as_u64().unwrap() >= allowed_got as u64,
        "{cut}"
    );
    let warnings = cut["warnings"].as_array().unwrap();
    assert!(
        warnings.iter().any(|w| w["evidence"] == "rule"),
        "no rule warning: {cut}"
    );
    assert!(
        warnings.iter().any(|w| w["evidence"] == "destination"
            && w["message"]
                .as_str()
                .unwrap()
                .starts_with("10.200.0.2:9000 ")),
        "no destination warning for 10.200.0.2:9000: {cut}"
    );
    let ports = cut["kernel"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["map"] == "PORTS")
        .unwrap()
        .clone();
    assert!(
        ports["added"].as_u64().unwrap() >= 1 && ports["removed"].as_u64().unwrap() >= 1,
        "{cut}"
    );

    agent.stop();
    let out = output_in_gw(&pair, &["teardown", "--instance", &policy.instance]);
    assert!(out.status.success(), "teardown failed");
    assert!(!xdp_attached(&pair), "XDP still attached after teardown");
}

/// A restart with a policy that no longer names a forward interface removes that interface's pinned
/// XDP link (and keeps the others): nothing the policy dropped keeps enforcing or counting.
#[test]
fn a_restart_removes_attachments_the_policy_no_longer_names() {
    vpcgate_lab::require_root();
    let pair = Pair::new();
    let pod = vpcgate_lab::netns::Netns::new("pod");
    pair.gw.ip(&[
        "link",
        "add",
        "gw-pod",
        "type",
        "veth",
        "peer",
        "name",
        "pod0",
        "netns",
        pod.name(),
    ]);
    pair.gw.ip(&["link", "set", "gw-pod", "up"]);
    let policy = PolicyFile::new("prune", "9000");
    std::fs::write(
        &policy.file,
        policy.text_with("9000", "forward_interfaces = [\"gw-pod\"]"),
    )
    .unwrap();
    let agent = start_agent(&pair, &policy.file);
    agent.wait_for("enforcing");
    let pod_link = || pair.gw.ip(&["link", "show", "dev", "gw-pod"]);
    assert!(pod_link().contains("xdp"), "forward XDP not attached");
    agent.stop();

    policy.write("9000");
    let agent = start_agent(&pair, &policy.file);
    assert!(agent.wait_for("kernel programs ready").contains("Adopted"));
    agent.wait_for("enforcing");
    assert!(
        !pod_link().contains("xdp"),
        "the dropped forward interface is still enforced: {}",
        pod_link()
    );
    assert!(xdp_attached(&pair), "the ENI's XDP went with it");
    let st = status(&pair, &policy.instance);
    assert!(
        st["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["interface"] == GW_IF),
        "{st}"
    );
    agent.stop();
    let out = output_in_gw(&pair, &["teardown", "--instance", &policy.instance]);
    assert!(out.status.success(), "teardown failed");
}

/// The ENI deleted and re-created (a hot-replug): its links are left holding nothing, so the agent
/// notices (readiness drops), attaches again, and enforcement is back without a restart.
#[test]
fn a_recreated_interface_is_enforced_again() {
    vpcgate_lab::require_root();
    let pair = Pair::new();
    let policy = PolicyFile::new("replug", "9000");
    let agent = start_agent(&pair, &policy.file);
    agent.wait_for("enforcing");
    assert!(!delivered(&pair, DENIED), "unauthorized port delivered");

    pair.gw.ip(&["link", "del", GW_IF]);
    pair.connect();
    assert!(!xdp_attached(&pair), "a fresh interface came with XDP");
    agent.wait_for("attachments lost; re-attaching");
    agent.wait_for("enforcing");
    assert!(xdp_attached(&pair), "XDP not attached again");
    assert_eq!(
        http_get(&pair, "/readyz").0,
        200,
        "not ready after re-attaching"
    );
    assert!(
        delivered(&pair, ALLOWED),
        "authorized port blocked after re-attaching"
    );
    assert!(
        !delivered(&pair, DENIED),
        "the re-created interface is not enforced"
    );
    agent.stop();
    let out = output_in_gw(&pair, &["teardown", "--instance", &policy.instance]);
    assert!(out.status.success(), "teardown failed");
}

/// The systemd unit and the DaemonSet grant CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON and nothing else:
/// the agent loads, pins, applies, enforces, reloads and serves with exactly those.
#[test]
fn the_agent_runs_with_only_the_capabilities_the_deployments_grant() {
    vpcgate_lab::require_root();
    let pair = Pair::new();
    let policy = PolicyFile::new("caps", "9000");
    let caps = "-all,+bpf,+net_admin,+perfmon";
    let agent = start_agent_under(
        &pair,
        &[
            "setpriv",
            &format!("--inh-caps={caps}"),
            &format!("--ambient-caps={caps}"),
            &format!("--bounding-set={caps}"),
            "--no-new-privs",
        ],
        &policy.file,
    );
    agent.wait_for("enforcing");
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.id())).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim)
        .unwrap_or_default()
        .to_owned();
    // CAP_NET_ADMIN 12, CAP_PERFMON 38, CAP_BPF 39.
    assert_eq!(
        eff,
        format!("{:016x}", (1u64 << 12) | (1 << 38) | (1 << 39))
    );
    assert!(delivered(&pair, ALLOWED), "authorized port blocked");
    assert!(!delivered(&pair, DENIED), "unauthorized port delivered");
    policy.write("9000-9001");
    let reload = output_in_gw(&pair, &["reload", "--instance", &policy.instance]);
    assert_eq!(
        reload.status.code(),
        Some(0),
        "reload under the reduced capabilities"
    );
    assert!(delivered(&pair, DENIED), "the reload is not in effect");
    assert_eq!(http_get(&pair, "/readyz").0, 200);
    agent.stop();
    let out = output_in_gw(&pair, &["teardown", "--instance", &policy.instance]);
    assert!(out.status.success(), "teardown failed");
}
