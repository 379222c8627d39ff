//! XDP on a forward interface: gateway egress that arrives from a pod namespace and is routed by the
//! gateway namespace toward the VPC is enforced at the forward interface's ingress.

use std::{net::UdpSocket, time::Duration};

use vpcgate::{
    datapath::{Datapath, DatapathError, XdpAttachMode, XdpRole, ifindex, netdev},
    policy::{check_text, compile::Compiled},
};
use vpcgate_common::{
    parse_stats::{Hook, Stat},
    verdict::DropReason,
};
use vpcgate_lab::netns::{GW_IF, Netns, Pair};

const POLICY: &str = r#"
[instance]
name = "fwd"
kind = "dedicated"
vpc_id = "vpc-lab"
interface = "veth-gw"
forward_interfaces = ["gw-pod"]
[[authorization]]
name = "echo"
vpc_id = "vpc-lab"
address = "10.200.0.2"
ports = ["9000"]
protocol = "udp"
"#;

/// The link between the gateway and the pod namespace, as the forward interface sees it.
#[derive(Clone, Copy, PartialEq)]
enum PodLink {
    /// `gw-pod` is a veth (native XDP).
    Veth,
    /// `gw-pod` is a VXLAN device (an overlay such as flannel's) over a veth underlay: VXLAN has no
    /// native XDP, so the forward program attaches in generic mode.
    Vxlan,
    /// `gw-pod` is a macvlan on the gateway's end of a veth: a stacked device, refused as a forward
    /// interface.
    Macvlan,
}

/// pod (10.201.0.2) -- gw-pod (10.201.0.1) [gw routes] veth-gw (10.200.0.1) -- vpc (10.200.0.2)
fn topology(link: PodLink) -> (Pair, Netns) {
    let pair = Pair::new();
    let pod = Netns::new("pod");
    let (gw_end, pod_end) = match link {
        PodLink::Veth => ("gw-pod", "pod0"),
        PodLink::Vxlan => ("gw-ul", "pod-ul"),
        PodLink::Macvlan => ("gw-ul", "pod0"),
    };
    pair.gw.ip(&[
        "link",
        "add",
        gw_end,
        "type",
        "veth",
        "peer",
        "name",
        pod_end,
        "netns",
        pod.name(),
    ]);
    pair.gw.ip(&["link", "set", gw_end, "up"]);
    pod.ip(&["link", "set", pod_end, "up"]);
    match link {
        PodLink::Veth => {}
        PodLink::Vxlan => {
            // The underlay: 10.202.0.0/24 on the veth pair; the overlay: VNI 42 between the two.
            pair.gw.ip(&["addr", "add", "10.202.0.1/24", "dev", gw_end]);
            pod.ip(&["addr", "add", "10.202.0.2/24", "dev", pod_end]);
            for (ns, local, remote, dev, name) in [
                (&pair.gw, "10.202.0.1", "10.202.0.2", gw_end, "gw-pod"),
                (&pod, "10.202.0.2", "10.202.0.1", pod_end, "pod0"),
            ] {
                ns.ip(&[
                    "link", "add", name, "type", "vxlan", "id", "42", "local", local, "remote",
                    remote, "dstport", "4789", "dev", dev,
                ]);
                ns.ip(&["link", "set", name, "up"]);
            }
        }
        PodLink::Macvlan => {
            pair.gw.ip(&[
                "link", "add", "link", gw_end, "name", "gw-pod", "type", "macvlan", "mode",
                "bridge",
            ]);
            pair.gw.ip(&["link", "set", "gw-pod", "up"]);
        }
    }
    pair.gw
        .ip(&["addr", "add", "10.201.0.1/24", "dev", "gw-pod"]);
    pair.gw.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    pod.ip(&["addr", "add", "10.201.0.2/24", "dev", "pod0"]);
    pod.ip(&["link", "set", "pod0", "up"]);
    pod.ip(&["route", "add", "default", "via", "10.201.0.1"]);
    pair.vpc
        .ip(&["route", "add", "10.201.0.0/24", "via", "10.200.0.1"]);
    // Resolved neighbours, so no datagram of the test waits on ARP (slow under TCG).
    let mac = |ns: &Netns, dev: &str| {
        let out = ns.ip(&["-br", "link", "show", "dev", dev]);
        out.split_whitespace()
            .nth(2)
            .unwrap_or_else(|| panic!("no MAC for {dev}: {out}"))
            .to_owned()
    };
    let (gw_mac, pod_mac) = (mac(&pair.gw, "gw-pod"), mac(&pod, "pod0"));
    pod.ip(&[
        "neigh",
        "replace",
        "10.201.0.1",
        "lladdr",
        &gw_mac,
        "dev",
        "pod0",
        "nud",
        "permanent",
    ]);
    pair.gw.ip(&[
        "neigh",
        "replace",
        "10.201.0.2",
        "lladdr",
        &pod_mac,
        "dev",
        "gw-pod",
        "nud",
        "permanent",
    ]);
    (pair, pod)
}

fn compiled() -> Compiled {
    let checked = check_text("fwd.toml", POLICY);
    let policy = checked
        .policy
        .unwrap_or_else(|| panic!("{:?}", checked.diagnostics));
    Compiled::new(&policy)
}

/// Five datagrams from the pod, three to the authorized port and two to another: the authorized ones
/// arrive, the others do not, and the forward interface counted each once.
fn assert_enforced(pair: &Pair, pod: &Netns, dp: &mut Datapath, compiled: &Compiled) {
    let (allowed, denied) = pair.vpc.run(|| {
        let a = UdpSocket::bind("10.200.0.2:9000").unwrap();
        let d = UdpSocket::bind("10.200.0.2:9001").unwrap();
        for s in [&a, &d] {
            s.set_read_timeout(Some(Duration::from_millis(1500)))
                .unwrap();
        }
        (a, d)
    });
    pod.run(|| {
        let s = UdpSocket::bind("10.201.0.2:0").unwrap();
        for port in [9000u16, 9001, 9000, 9001, 9000] {
            s.send_to(b"from-pod", ("10.200.0.2", port)).unwrap();
        }
    });
    let count = |s: &UdpSocket| {
        let mut buf = [0u8; 16];
        let mut n = 0;
        while s.recv_from(&mut buf).is_ok() {
            n += 1;
        }
        n
    };
    assert_eq!(
        count(&allowed),
        3,
        "authorized datagrams routed from the pod did not all arrive"
    );
    assert_eq!(
        count(&denied),
        0,
        "unauthorized datagrams from the pod arrived"
    );
    assert_eq!(
        dp.drop_counts().unwrap().dropped[&DropReason::PortNotAuthorized],
        2
    );
    let udp = dp.parse_stats().unwrap().get(Hook::XdpForward, Stat::Udp);
    assert!(
        udp >= 5,
        "the forward XDP program parsed {udp} UDP datagrams, not the pod's five"
    );
    let echo = compiled
        .rules
        .iter()
        .find(|r| r.name == "echo")
        .expect("rule echo")
        .id;
    assert_eq!(
        dp.rule_stats().unwrap()[&echo].packets,
        3,
        "forwarded datagrams counted once (at the forward interface, not again at the ENI's TC egress)"
    );
    let d = dp
        .destination("10.200.0.2".parse().unwrap(), 17, 9001)
        .unwrap()
        .expect("observed");
    assert_eq!(
        (d.dropped, d.last_reason),
        (2, Some(DropReason::PortNotAuthorized))
    );
}

/// Loads the datapath, applies the policy, lists `gw-pod` as the forward interface and attaches XDP
/// there (and TC egress on the ENI when `tc`): the policy, the datapath and the XDP mode it got.
fn enforce_forward(pair: &Pair, tc: bool) -> (Compiled, Datapath, XdpAttachMode) {
    let compiled = compiled();
    let mut dp = Datapath::load().unwrap_or_else(|e| panic!("{e}"));
    dp.apply(&compiled).unwrap_or_else(|e| panic!("{e}"));
    let mode = pair.gw.run(|| {
        let pod_if = ifindex("gw-pod").unwrap_or_else(|e| panic!("{e}"));
        dp.set_forward_interfaces(&[pod_if])
            .unwrap_or_else(|e| panic!("{e}"));
        if tc {
            dp.attach_tc_egress(GW_IF).unwrap_or_else(|e| panic!("{e}"));
        }
        dp.attach_xdp("gw-pod", XdpRole::Forward)
            .unwrap_or_else(|e| panic!("{e}"))
    });
    (compiled, dp, mode)
}

#[test]
fn forward_interface_ingress_is_enforced() {
    vpcgate_lab::require_root();
    let (pair, pod) = topology(PodLink::Veth);
    // As `vpcgate run` sets it up: XDP on the forward interface, TC egress on the ENI, which decides again
    // what arrived on the forward interface but does not count it a second time.
    let (compiled, mut dp, mode) = enforce_forward(&pair, true);
    assert_eq!(mode, XdpAttachMode::Native);
    assert_enforced(&pair, &pod, &mut dp, &compiled);
}

/// A forward interface whose driver has no native XDP (VXLAN) gets the program in generic mode, and
/// enforcement there is the same: no TC egress is attached here, so every drop is the generic XDP's.
/// `preflight --config` predicts the mode for each interface before anything is attached.
#[test]
fn a_forward_interface_without_native_xdp_is_enforced_by_generic_xdp() {
    vpcgate_lab::require_root();
    let (pair, pod) = topology(PodLink::Vxlan);
    let checks = preflight_xdp_checks(&pair);
    // The netdev netlink family (xdp-features, 6.3+) lets preflight tell; before, it says "at attach".
    let features = pair
        .gw
        .run(netdev::has_xdp_features)
        .expect("ask for the netdev family");
    let (eni, fwd) = if features {
        ("native", "generic")
    } else {
        ("at_attach", "at_attach")
    };
    assert_eq!(
        checks,
        vec![
            (GW_IF.to_owned(), true, Some(eni.to_owned())),
            ("gw-pod".to_owned(), true, Some(fwd.to_owned()))
        ],
        "preflight's XDP checks for the ENI and the forward interface"
    );

    let (compiled, mut dp, mode) = enforce_forward(&pair, false);
    assert_eq!(mode, XdpAttachMode::Generic, "VXLAN has no native XDP");
    let attached = pair.gw.ip(&["-d", "link", "show", "dev", "gw-pod"]);
    assert!(
        attached.contains("xdpgeneric"),
        "the kernel does not show a generic XDP program on gw-pod:\n{attached}"
    );
    assert_enforced(&pair, &pod, &mut dp, &compiled);
}

/// A macvlan (or VLAN, ipvlan) forward interface is refused, by `run`'s attach and by preflight: frames
/// a pod addresses to the lower device's own MAC reach the host without passing the macvlan.
#[test]
fn a_stacked_forward_interface_is_refused() {
    vpcgate_lab::require_root();
    let (pair, _pod) = topology(PodLink::Macvlan);
    let checks = preflight_xdp_checks(&pair);
    assert_eq!(checks[1].0, "gw-pod");
    assert!(
        !checks[1].1,
        "preflight accepted a macvlan forward interface"
    );
    let mut dp = Datapath::load().unwrap_or_else(|e| panic!("{e}"));
    let err = pair
        .gw
        .run(|| dp.attach_xdp("gw-pod", XdpRole::Forward))
        .expect_err("a macvlan forward interface was attached");
    assert!(
        matches!(&err, DatapathError::StackedForward { interface, .. } if interface == "gw-pod"),
        "{err}"
    );
    assert!(
        err.to_string().contains("list the lower interface"),
        "{err}"
    );
    let shown = pair.gw.ip(&["link", "show", "dev", "gw-pod"]);
    assert!(!shown.contains("xdp"), "something was attached: {shown}");
}

/// Runs `vpcgate preflight --config` in the gateway namespace: (interface, ok, xdp_mode) of its xdp
/// checks. Only those are asserted: the rest of the report is preflight's own test.
fn preflight_xdp_checks(pair: &Pair) -> Vec<(String, bool, Option<String>)> {
    let bin = std::env::var("VPCGATE_BIN").unwrap_or_else(|_| {
        panic!("VPCGATE_BIN is not set: run through `cargo xtask test`, which builds vpcgate and points it here")
    });
    // One directory per call: the tests of this file run in parallel in one process, and one's cleanup
    // removed the other's file when they shared it.
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("vpcgate-fwd-{}-{call}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("fwd.toml");
    std::fs::write(&file, POLICY).unwrap();
    // Started from a thread inside the namespace (the child inherits it); `ip netns exec` would remount
    // /sys and hide bpffs from the child.
    let out = pair
        .gw
        .run(|| {
            std::process::Command::new(&bin)
                .args(["preflight", "--output", "json", "--config"])
                .arg(&file)
                .output()
        })
        .expect("run vpcgate preflight");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "preflight ({}) printed no JSON report ({e}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["check"] == "xdp")
        .map(|c| {
            (
                c["interface"].as_str().expect("interface").to_owned(),
                c["ok"].as_bool().expect("ok"),
                c["xdp_mode"].as_str().map(str::to_owned),
            )
        })
        .collect()
}
