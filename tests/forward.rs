//! XDP on a forward interface: gateway egress that arrives from a pod namespace and is routed by the
//! gateway namespace toward the VPC is enforced at the forward interface's ingress.

use std::{net::UdpSocket, time::Duration};

use vpcgate::{
    datapath::{Datapath, XdpAttachMode, XdpRole, ifindex},
    policy::{check_text, compile::Compiled},
};
use vpcgate_common::verdict::DropReason;
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

#[test]
fn forward_interface_ingress_is_enforced() {
    vpcgate_lab::require_root();
    let pair = Pair::new();
    let pod = Netns::new("pod");
    // pod (10.201.0.2) -- gw-pod (10.201.0.1) [gw routes] veth-gw (10.200.0.1) -- vpc (10.200.0.2)
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
    pair.gw
        .ip(&["addr", "add", "10.201.0.1/24", "dev", "gw-pod"]);
    pair.gw.ip(&["link", "set", "gw-pod", "up"]);
    pair.gw.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    pod.ip(&["addr", "add", "10.201.0.2/24", "dev", "pod0"]);
    pod.ip(&["link", "set", "pod0", "up"]);
    pod.ip(&["route", "add", "default", "via", "10.201.0.1"]);
    pair.vpc
        .ip(&["route", "add", "10.201.0.0/24", "via", "10.200.0.1"]);

    let checked = check_text("fwd.toml", POLICY);
    let policy = checked
        .policy
        .unwrap_or_else(|| panic!("{:?}", checked.diagnostics));
    let compiled = Compiled::new(&policy);
    let mut dp = Datapath::load().unwrap_or_else(|e| panic!("{e}"));
    dp.apply(&compiled).unwrap_or_else(|e| panic!("{e}"));
    // As `vpcgate run` sets it up: XDP on the forward interface, TC egress on the ENI, which decides again
    // what arrived on the forward interface but does not count it a second time.
    let mode = pair.gw.run(|| {
        let pod_if = ifindex("gw-pod").unwrap_or_else(|e| panic!("{e}"));
        dp.set_forward_interfaces(&[pod_if])
            .unwrap_or_else(|e| panic!("{e}"));
        dp.attach_tc_egress(GW_IF).unwrap_or_else(|e| panic!("{e}"));
        dp.attach_xdp("gw-pod", XdpRole::Forward)
            .unwrap_or_else(|e| panic!("{e}"))
    });
    assert_eq!(mode, XdpAttachMode::Native);

    let (allowed, denied) = pair.vpc.run(|| {
        let a = UdpSocket::bind("10.200.0.2:9000").unwrap();
        let d = UdpSocket::bind("10.200.0.2:9001").unwrap();
        for s in [&a, &d] {
            s.set_read_timeout(Some(Duration::from_millis(500)))
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
