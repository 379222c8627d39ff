//! `cargo xtask demo` (tests/bin/demo.rs) shows the diagnosis and leaves nothing behind: no namespace,
//! pin, record or program.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use vpcgate::datapath::pin;
use vpcgate_lab::require_root;

fn binary() -> String {
    std::env::var("VPCGATE_BIN").unwrap_or_else(|_| {
        panic!("VPCGATE_BIN is not set: run through `cargo xtask test`, which builds vpcgate and points it here")
    })
}

/// Ids of the vpcgate programs loaded in the kernel now.
fn vpcgate_programs() -> std::collections::BTreeSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("vpcgate")))
        .map(|p| p.id())
        .collect()
}

#[test]
fn the_demo_shows_the_diagnosis_and_leaves_nothing_behind() {
    require_root();
    let before = vpcgate_programs();
    let instance = format!("demo-test-{}", std::process::id());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_vpcgate-demo"))
        .args(["--instance", &instance])
        .env("VPCGATE_BIN", binary())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The report: every class of the lab, the contrast, status and a drop with its remedy.
    for needle in [
        "10.77.0.10:80 (authorization/backend) tcp from 10.77.0.5: connected",
        "10.77.0.10:81 (authorization/backend) tcp from 10.77.0.5: refused",
        "10.77.0.20:80 (authorization/sg-drop) tcp from 10.77.0.5: no_reply",
        "10.77.0.30:80 (authorization/sg-reject) tcp from 10.77.0.5: unreachable",
        "10.77.0.99:80 (authorization/nobody) tcp from 10.77.0.5: local_drop",
        "(the cause is certain)",
        "http: GET / Host: web.internal → 200",
        "10.77.0.40:80 tcp from 10.77.0.5: blocked_by_policy",
        "→ 10.77.0.40:80 tcp not_authorized",
        "done: no namespace, pin or program of the demo is left",
    ] {
        assert!(
            stdout.contains(needle),
            "demo output lacks {needle:?}:\n{stdout}"
        );
    }
    // Nothing left: namespaces (named after the demo's pid), pins, records, programs.
    let netns = vpcgate_lab::netns::sh(&["ip", "netns", "list"]);
    assert!(
        !netns.contains(&format!("-{pid}-")),
        "the demo left namespaces: {netns}"
    );
    assert!(!pin::instance_dir(&instance).exists(), "the demo left pins");
    for ext in ["json", "applied.toml", "sock"] {
        let f = format!("/run/vpcgate/{instance}.{ext}");
        assert!(!std::path::Path::new(&f).exists(), "the demo left {f}");
    }
    // The kernel frees a program after its last reference goes, deferred past an RCU grace period:
    // give it a bounded moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = vpcgate_programs();
    while !after.is_subset(&before) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = vpcgate_programs();
    }
    assert!(
        after.is_subset(&before),
        "the demo left programs: {:?}",
        after.difference(&before).collect::<Vec<_>>()
    );
}
