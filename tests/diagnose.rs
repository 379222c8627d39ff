//! `vpcgate probe` and `vpcgate drops` in the lab (tests/src/lab.rs), against a running agent: each
//! outcome class with its failing step and evidence, IPv4 and IPv6, a probe racing other connections
//! to the same backend, and the kernel's own drop reasons.

use std::{
    net::{IpAddr, SocketAddr},
    process::{Child, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use serde_json::Value;
use vpcgate::datapath::pin;
use vpcgate_lab::{
    agent::Agent,
    lab::{self, Lab},
    require_root,
};

fn binary() -> String {
    std::env::var("VPCGATE_BIN").unwrap_or_else(|_| {
        panic!("VPCGATE_BIN is not set: run through `cargo xtask test`, which builds vpcgate and points it here")
    })
}

/// The lab with `vpcgate run` enforcing the example policy.
struct Setup {
    lab: Lab,
    agent: Option<Agent>,
    instance: String,
    dir: std::path::PathBuf,
}

impl Setup {
    fn new(test: &str) -> Self {
        require_root();
        let lab = Lab::new();
        let instance = format!("{test}-{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("vpcgate-{instance}"));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("policy.toml");
        std::fs::write(&file, lab::example_policy(&instance)).unwrap();
        let agent = Agent::start(&lab.gw, &binary(), &[], &file);
        agent.wait_for("serving /metrics");
        Self {
            lab,
            agent: Some(agent),
            instance,
            dir,
        }
    }

    fn spawn(&self, args: &[&str]) -> Child {
        let mut full = args.to_vec();
        full.extend(["--instance", &self.instance]);
        lab::spawn_in(&self.lab.gw, &binary(), &full, Stdio::piped())
    }

    /// `vpcgate probe ARGS --output json`: (exit code, report).
    fn probe(&self, args: &[&str]) -> (i32, Value) {
        let mut full = vec!["probe", "--output", "json"];
        if !args.contains(&"--timeout") {
            full.extend(["--timeout", "2s"]);
        }
        full.extend_from_slice(args);
        let out = self.spawn(&full).wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "probe {args:?}: not JSON ({e}): {}\n{stderr}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        eprintln!("probe {args:?} → {}", v["outcome"]);
        (out.status.code().unwrap_or(-1), v)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Stop the agent and clean up first; judge its exit last, and never while already unwinding
        // (a panic in a drop during a panic aborts, and nothing would be removed).
        let status = self.agent.take().map(|mut a| {
            a.signal(libc::SIGTERM);
            a.wait()
        });
        let _ = pin::teardown(&self.instance);
        let _ = std::fs::remove_dir_all(&self.dir);
        for ext in ["json", "applied.toml", "sock", "lock", "drops.lock"] {
            let _ = std::fs::remove_file(format!("/run/vpcgate/{}.{ext}", self.instance));
        }
        if let Some(status) = status
            && !std::thread::panicking()
        {
            assert!(status.success(), "vpcgate run exited with {status}");
        }
    }
}

/// The status of each step, in order.
fn steps(v: &Value) -> Vec<String> {
    v["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("no steps: {v}"))
        .iter()
        .map(|s| s["status"].as_str().unwrap().to_owned())
        .collect()
}

fn target(a: impl Into<IpAddr>, port: u16) -> String {
    SocketAddr::new(a.into(), port).to_string()
}

fn assert_class(v: &Value, outcome: &str, statuses: [&str; 3]) {
    assert_eq!(v["outcome"], outcome, "{v:#}");
    assert_eq!(steps(v), statuses, "{v:#}");
}

#[test]
fn each_outcome_is_diagnosed_from_the_kernels_record() {
    let s = Setup::new("diag");
    let egress = lab::EGRESS_V4.to_string();

    // Connected, exit 0.
    let (rc, v) = s.probe(&[&target(lab::BACKEND_V4, lab::HTTP_PORT)]);
    assert_class(&v, "connected", ["pass", "pass", "pass"]);
    assert_eq!(rc, 0);
    assert_eq!(v["egress_ip"], egress);
    assert_eq!(v["kernel"]["syn_sent"], 1);
    assert_eq!(v["kernel"]["syn_ack"], 1);

    // Closed port: RST, step 3, the CLB's listener.
    let (rc, v) = s.probe(&[&target(lab::BACKEND_V4, lab::CLOSED_PORT)]);
    assert_class(&v, "refused", ["pass", "pass", "fail"]);
    assert_eq!(rc, 1);
    assert_eq!(v["kernel"]["rst"], 1);
    assert!(
        v["action"].as_str().unwrap().contains("CLB has a listener"),
        "{v:#}"
    );

    // Not authorized, wrong port, reserved block: step 1, the kernel dropped the SYN.
    for (dst, port, reason) in [
        (lab::UNLISTED_V4, 80, "not_authorized"),
        (lab::BACKEND_V4, 82, "port_not_authorized"),
        (lab::RESERVED_V4, 80, "reserved_range"),
    ] {
        let (rc, v) = s.probe(&[&target(dst, port)]);
        assert_class(&v, "blocked_by_policy", ["fail", "skipped", "skipped"]);
        assert_eq!(rc, 1);
        assert!(v["kernel"]["dropped"].as_u64().unwrap() >= 1, "{v:#}");
        assert_eq!(v["kernel"]["drop_reason"], reason, "{v:#}");
        assert_eq!(v["kernel"]["syn_sent"], 0);
    }
    // The wrong port's remedy is the policy line that allows it; the reserved block's says none can.
    let (_, v) = s.probe(&["10.77.0.10:82"]);
    assert!(
        v["steps"][0]["remedy"].as_str().unwrap().contains("82"),
        "{v:#}"
    );

    // The security group silently drops the egress IP: no reply, step 2, the remedy names the egress IP
    // and the ECS security group; the contrast from the second address connects: certain.
    let (rc, v) = s.probe(&[
        &target(lab::SG_DROP_V4, lab::HTTP_PORT),
        "--contrast-from",
        &lab::SECOND_V4.to_string(),
    ]);
    assert_class(&v, "no_reply", ["pass", "fail", "skipped"]);
    assert_eq!(rc, 1);
    let action = v["action"].as_str().unwrap();
    assert!(
        action.contains(&format!("{egress}/32")) && action.contains("security group"),
        "{action}"
    );
    assert!(v["kernel"]["syn_sent"].as_u64().unwrap() >= 1);
    assert_eq!(v["contrast"]["source"], lab::SECOND_V4.to_string());
    assert_eq!(v["contrast"]["outcome"], "connected");
    assert_eq!(v["contrast"]["certain"], true);
    assert!(v["cause"].as_str().unwrap().starts_with("certain"), "{v:#}");

    // ICMP administratively prohibited: unreachable, step 2, in words; the NLB's security group.
    let (_, v) = s.probe(&[&target(lab::SG_REJECT_V4, lab::HTTP_PORT)]);
    assert_class(&v, "unreachable", ["pass", "fail", "skipped"]);
    assert_eq!(
        (
            v["kernel"]["icmp_type"].as_u64(),
            v["kernel"]["icmp_code"].as_u64()
        ),
        (Some(3), Some(13))
    );
    assert!(
        v["steps"][1]["detail"]
            .as_str()
            .unwrap()
            .contains("administratively prohibited"),
        "{v:#}"
    );
    assert!(v["action"].as_str().unwrap().contains("NLB"), "{v:#}");

    // Nobody owns the address: the SYN never leaves; the kernel's own reason, from kfree_skb, and the
    // neighbour table. `drops --kernel` sees the same drop meanwhile.
    let drops = s.spawn(&["drops", "--kernel", "--for", "12s", "--output", "json"]);
    std::thread::sleep(Duration::from_millis(500));
    let (_, v) = s.probe(&[&target(lab::NOBODY_V4, lab::HTTP_PORT)]);
    assert_class(&v, "local_drop", ["pass", "fail", "skipped"]);
    assert_eq!(v["kernel"]["syn_sent"], 0);
    assert_eq!(v["kernel"]["kernel_drop_reason"], "NEIGH_FAILED", "{v:#}");
    assert_eq!(v["kernel"]["neighbour"], lab::NOBODY_V4.to_string());
    assert!(
        matches!(
            v["kernel"]["neighbour_state"].as_str(),
            Some("FAILED" | "INCOMPLETE")
        ),
        "{v:#}"
    );
    let out = drops.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let neigh = lines
        .iter()
        .find(|l| l["type"] == "kernel_drop" && l["dst"] == lab::NOBODY_V4.to_string())
        .unwrap_or_else(|| panic!("no kernel drop toward {}: {lines:#?}", lab::NOBODY_V4));
    assert_eq!(neigh["reason"], "NEIGH_FAILED");
    assert_eq!(neigh["src"], egress);
    assert_eq!(neigh["dport"], 80);
    assert_eq!(neigh["interface"], lab::ENI);
    assert!(lines.last().unwrap()["type"] == "loss", "{lines:#?}");

    // vpcgate's own drops of the blocked probes (waiting in the ring, read by the same command), with
    // the change that allows them.
    let d = lines
        .iter()
        .find(|d| d["type"] == "drop" && d["dst"] == "10.77.0.10" && d["dport"] == 82)
        .unwrap_or_else(|| panic!("no drop event toward 10.77.0.10:82: {lines:#?}"));
    assert_eq!(d["reason"], "port_not_authorized");
    assert_eq!(d["interface"], lab::ENI);
    assert!(d["change"].as_str().unwrap().contains("82"), "{d:#}");

    // The HTTP upstream: connected, and a request with its Host header.
    s.lab.set_http_status(503);
    let (rc, v) = s.probe(&["upstream/web"]);
    let node = &v["probes"][0];
    assert_class(node, "connected", ["pass", "pass", "pass"]);
    assert_eq!(node["http"]["status"], 503);
    assert_eq!(s.lab.last_host().as_deref(), Some("web.internal"));
    assert_eq!(rc, 0);

    // An https upstream whose backend speaks plain HTTP: connected at TCP, the TLS failure named,
    // and not counted as connected (exit 1).
    let (rc, v) = s.probe(&["upstream/web_tls", "--timeout", "3s"]);
    let node = &v["probes"][0];
    assert_class(node, "connected", ["pass", "pass", "pass"]);
    assert_eq!(node["http"]["scheme"], "https");
    let error = node["http"]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{v:#}"));
    assert!(
        error.starts_with("TLS") && error.contains("TLS on this port"),
        "{error}"
    );
    assert_eq!(rc, 1);
}

#[test]
fn ipv6_connected_refused_and_no_reply() {
    let s = Setup::new("diag6");
    let (rc, v) = s.probe(&[&target(lab::BACKEND_V6, lab::HTTP_PORT)]);
    assert_class(&v, "connected", ["pass", "pass", "pass"]);
    assert_eq!(rc, 0);
    assert_eq!(v["egress_ip"], lab::EGRESS_V6.to_string());
    let (_, v) = s.probe(&[&target(lab::BACKEND_V6, lab::CLOSED_PORT)]);
    assert_class(&v, "refused", ["pass", "pass", "fail"]);
    assert_eq!(v["kernel"]["rst"], 1);
    let (_, v) = s.probe(&[
        &target(lab::SG_DROP_V6, lab::HTTP_PORT),
        "--contrast-from",
        &lab::SECOND_V6.to_string(),
    ]);
    assert_class(&v, "no_reply", ["pass", "fail", "skipped"]);
    assert!(
        v["action"]
            .as_str()
            .unwrap()
            .contains(&format!("{}/128", lab::EGRESS_V6))
    );
    assert_eq!(v["contrast"]["outcome"], "connected");
}

/// Connects from the egress IP to `port` of the backend, again and again, until `stop` (bounded).
fn hammer(lab: &Lab, port: u16, stop: &AtomicBool) -> u32 {
    lab.gw_run(|| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && n < 20_000 {
            let _ = lab::connect_from(
                lab::EGRESS_V4.into(),
                SocketAddr::new(lab::BACKEND_V4.into(), port),
                Duration::from_millis(500),
            );
            n += 1;
        }
        n
    })
}

#[test]
fn a_probe_racing_other_connections_reports_its_own() {
    let s = Setup::new("diagrace");
    for (probe_port, other_port, outcome, statuses) in [
        (
            lab::HTTP_PORT,
            lab::CLOSED_PORT,
            "connected",
            ["pass", "pass", "pass"],
        ),
        (
            lab::CLOSED_PORT,
            lab::HTTP_PORT,
            "refused",
            ["pass", "pass", "fail"],
        ),
    ] {
        let stop = AtomicBool::new(false);
        let (n, v) = std::thread::scope(|sc| {
            let lab = &s.lab;
            let other = sc.spawn(|| hammer(lab, other_port, &stop));
            std::thread::sleep(Duration::from_millis(200));
            let mut results = vec![];
            for _ in 0..5 {
                results.push(s.probe(&[&target(lab::BACKEND_V4, probe_port)]).1);
            }
            stop.store(true, Ordering::Relaxed);
            (other.join().unwrap(), results)
        });
        assert!(n > 5, "the other socket connected only {n} times");
        for v in v {
            assert_class(&v, outcome, statuses);
            // Only this connection's answer: exactly one SYN-ACK or RST, none of the other socket's.
            let k = &v["kernel"];
            if outcome == "connected" {
                assert_eq!(
                    (k["syn_ack"].as_u64(), k["rst"].as_u64()),
                    (Some(1), Some(0)),
                    "{v:#}"
                );
            } else {
                assert_eq!(
                    (k["syn_ack"].as_u64(), k["rst"].as_u64()),
                    (Some(0), Some(1)),
                    "{v:#}"
                );
            }
        }
    }
}
