//! `vpcgate run`: the binary enforces a policy file in a namespace, reloads on SIGHUP (keeping the old
//! policy when the new file is invalid), and detaches on SIGTERM.

use std::{
    io::{BufRead, BufReader},
    net::UdpSocket,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use vpcgate_lab::netns::{GW_IF, Pair};

const POLICY: &str = r#"
[instance]
name = "run-test"
kind = "dedicated"
vpc_id = "vpc-lab"
interface = "veth-gw"
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

#[test]
fn run_enforces_reloads_and_detaches() {
    vpcgate_lab::require_root();
    let bin = binary();
    let pair = Pair::new();
    let dir = std::env::temp_dir().join(format!("vpcgate-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("policy.toml");
    std::fs::write(&file, POLICY.replace("PORTS", "9000")).unwrap();

    let mut child = Command::new("ip")
        .args(["netns", "exec", pair.gw.name(), &bin, "run", "--config"])
        .arg(&file)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vpcgate run");
    let (tx, log) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("vpcgate: {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |needle: &str| loop {
        match log.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line.contains(needle) => break,
            Ok(_) => {}
            Err(e) => panic!("vpcgate run never logged {needle:?}: {e}"),
        }
    };
    wait_for("enforcing");
    assert!(delivered(&pair, 9000), "authorized port blocked");
    assert!(!delivered(&pair, 9001), "unauthorized port delivered");

    std::fs::write(&file, POLICY.replace("PORTS", "9000-9001")).unwrap();
    let hup = |pid: u32, sig| {
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
    };
    hup(child.id(), libc::SIGHUP);
    wait_for("policy reloaded");
    assert!(delivered(&pair, 9001), "reloaded policy not enforced");

    std::fs::write(&file, "[instance]\nname = \"broken\"\n").unwrap();
    hup(child.id(), libc::SIGHUP);
    wait_for("reload failed");
    assert!(
        delivered(&pair, 9001),
        "an invalid reload changed the policy"
    );
    assert!(!delivered(&pair, 9002), "an invalid reload opened traffic");

    hup(child.id(), libc::SIGTERM);
    let status = child.wait().unwrap();
    assert!(status.success(), "vpcgate run exited with {status}");
    let shown = pair.gw.ip(&["link", "show", GW_IF]);
    assert!(
        !shown.contains("xdp"),
        "XDP still attached after exit:\n{shown}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
