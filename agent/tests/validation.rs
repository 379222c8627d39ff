//! Every validation rule of DESIGN.md, with the exact text an operator sees.

use vpcgate::policy::{self, check_text};

/// A valid vpc-integration policy; tests replace parts of it.
const BASE: &str = r#"[instance]
name = "gw-hz-1"
kind = "vpc-integration"
vpc_id = "vpc-bp1example"
interface = "eth1"
egress_ip = "10.0.0.5"
vswitch_cidr = "10.0.0.0/24"
zone = "cn-hangzhou-b"

[[accessible]]
cidr = "10.1.0.0/16"
ports = ["80", "443", "8000-8100"]

[[authorization]]
name = "orders-slb"
vpc_id = "vpc-bp1example"
address = "10.0.0.7"
ports = ["80"]

[[upstream]]
name = "orders_pool"
vpc_id = "vpc-bp1example"
nodes = [ { address = "10.1.3.8", port = 8080, weight = 10 } ]
"#;

/// Diagnostics as `line:col: severity: message [| fix]`.
fn diags(text: &str) -> Vec<String> {
    check_text("p.toml", text)
        .diagnostics
        .iter()
        .map(|d| {
            let sev = match d.severity {
                policy::diag::Severity::Error => "error",
                policy::diag::Severity::Warning => "warning",
            };
            let fix = d.fix.as_ref().map_or(String::new(), |f| format!(" | {f}"));
            format!("{}:{}: {sev}: {}{fix}", d.line, d.column, d.message)
        })
        .collect()
}

fn with(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "BASE lacks {from:?}");
    BASE.replacen(from, to, 1)
}

#[test]
fn base_and_examples_are_valid() {
    assert_eq!(diags(BASE), Vec::<String>::new());
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    for f in ["policy.toml", "dedicated.toml"] {
        let c = policy::load(std::path::Path::new(&format!("{root}/{f}"))).unwrap();
        assert!(
            c.policy.is_some() && c.diagnostics.is_empty(),
            "{f}: {:?}",
            c.diagnostics
        );
    }
}

#[test]
fn cidr_with_host_bits_names_the_canonical_form() {
    assert_eq!(
        diags(&with(
            "vswitch_cidr = \"10.0.0.0/24\"",
            "vswitch_cidr = \"10.0.0.1/24\""
        )),
        ["7:16: error: vswitch_cidr 10.0.0.1/24 has host bits set | write 10.0.0.0/24"]
    );
    assert_eq!(
        diags(&with("cidr = \"10.1.0.0/16\"", "cidr = \"fd00:1::1/64\"")),
        [
            "11:8: error: accessible block fd00:1::1/64 has host bits set | write fd00:1::/64",
            // Checked as the block it must be: the upstream node in 10.1.0.0/16 is no longer covered.
            "23:23: error: instance cannot connect to the backend 10.1.3.8: outside accessible CIDR blocks 10.0.0.0/24, fd00:1::/64 | add an accessible block that contains it: [[accessible]] cidr = \"10.1.3.0/24\"",
        ]
    );
    assert_eq!(
        diags(&with("cidr = \"10.1.0.0/16\"", "cidr = \"10.1.0.0/33\"")),
        [
            "11:8: error: accessible block `10.1.0.0/33` is not a valid CIDR block | write a block such as 10.0.0.0/24 or fd00::/64"
        ]
    );
}

#[test]
fn ports_must_be_in_range_and_ordered() {
    assert_eq!(
        diags(&with(
            r#"ports = ["80", "443", "8000-8100"]"#,
            r#"ports = ["0", "70000", "90-80", "http", 22]"#
        )),
        [
            "12:10: error: `ports` in [[accessible]] #1: port 0 is out of range 1..=65535 | ports are 1..=65535: write a port from 1 to 65535",
            "12:15: error: `ports` in [[accessible]] #1: port 70000 is out of range 1..=65535 | ports are 1..=65535: write a port from 1 to 65535",
            "12:24: error: `ports` in [[accessible]] #1: port range 90-80 is reversed | write 80-90",
            "12:33: error: `ports` in [[accessible]] #1: `http` is not a port number | write a port such as \"80\" or a range such as \"8000-8100\"",
        ]
    );
    assert_eq!(
        diags(&with(r#"ports = ["80"]"#, "ports = []")),
        [
            "18:9: error: `ports` in [[authorization]] #1 is empty: nothing would be allowed | list ports such as [\"80\", \"8000-8100\"], or remove `ports` to allow all"
        ]
    );
}

#[test]
fn names_are_unique_and_well_formed() {
    assert_eq!(
        diags(&with("name = \"orders_pool\"", "name = \"orders-slb\"")),
        [
            "21:8: error: upstream name `orders-slb` must be 1 to 50 characters of A-Z, a-z, 0-9 and _ | rename it, e.g. `orders_slb`",
            "21:8: error: name `orders-slb` is already used at line 15 | authorization and upstream names must be unique: rename one",
        ]
    );
    let dup = BASE
        .replace("name = \"orders_pool\"", "name = \"orders\"")
        .replace("name = \"orders-slb\"", "name = \"orders\"");
    assert_eq!(
        diags(&dup),
        [
            "21:8: error: name `orders` is already used at line 15 | authorization and upstream names must be unique: rename one"
        ]
    );
    assert_eq!(
        diags(&with("name = \"gw-hz-1\"", "name = \"GW_1\"")),
        [
            "2:8: error: instance name `GW_1` must be 1 to 32 characters of a-z, 0-9 and - | rename it, e.g. `gw-1`"
        ]
    );
    let long = "u".repeat(51);
    assert_eq!(
        diags(&with(
            "name = \"orders_pool\"",
            &format!("name = \"{long}\"")
        )),
        [format!(
            "21:8: error: upstream name `{long}` must be 1 to 50 characters of A-Z, a-z, 0-9 and _ | rename it, e.g. `{}`",
            "u".repeat(50)
        )]
    );
}

#[test]
fn upstream_nodes_retries_and_weights_are_bounded() {
    assert_eq!(
        diags(&with(
            "nodes = [ { address = \"10.1.3.8\", port = 8080, weight = 10 } ]",
            "nodes = []\nretries = 0"
        )),
        [
            "23:9: error: [[upstream]] #1 has 0 nodes: an upstream has 1 to 200 | add at least one node",
            "24:11: error: retries 0 is out of range 1..=100 | write a number from 1 to 100 (default 5)",
        ]
    );
    let many: Vec<String> = (0..201)
        .map(|i| format!("{{ address = \"10.1.3.{}\", port = 80 }}", i % 250))
        .collect();
    let text = with(
        "nodes = [ { address = \"10.1.3.8\", port = 8080, weight = 10 } ]",
        &format!("nodes = [{}]", many.join(", ")),
    );
    assert_eq!(
        diags(&text),
        [
            "23:9: error: [[upstream]] #1 has 201 nodes: an upstream has 1 to 200 | split it into upstreams of at most 200 nodes"
        ]
    );
    assert_eq!(
        diags(&with("weight = 10 }", "weight = 101 }").replace(
            "name = \"orders_pool\"",
            "name = \"orders_pool\"\nretries = 101"
        )),
        [
            "22:11: error: retries 101 is out of range 1..=100 | write a number from 1 to 100 (default 5)",
            "24:57: error: weight 101 of node #1 of [[upstream]] #1 is out of range 1..=100 | write a weight from 1 to 100 (default 10)",
        ]
    );
    assert_eq!(
        diags(&with("port = 8080,", "port = 0,")),
        [
            "23:42: error: port 0 of node #1 of [[upstream]] #1 is out of range 1..=65535 | ports are 1..=65535: write a port from 1 to 65535"
        ]
    );
}

#[test]
fn vswitch_overlapping_a_reserved_block_names_the_block_and_its_source() {
    assert_eq!(
        diags(&with(
            "vswitch_cidr = \"10.0.0.0/24\"",
            "vswitch_cidr = \"192.168.0.0/16\""
        )),
        [
            "6:13: warning: egress_ip 10.0.0.5 is outside vswitch_cidr 192.168.0.0/16 | a VPC integration instance's egress IP is an address of its vSwitch: check both",
            "7:16: error: vswitch_cidr 192.168.0.0/16 overlaps reserved block 192.168.0.0/20 (reserved for zone cn-hangzhou-b) | the instance's vSwitch must not overlap the blocks the gateway reserves: use a vSwitch in another block",
            "17:11: error: instance cannot connect to the backend 10.0.0.7: outside accessible CIDR blocks 192.168.0.0/16, 10.1.0.0/16 | add an accessible block that contains it: [[accessible]] cidr = \"10.0.0.0/24\"",
        ]
    );
    let explicit = with(
        "zone = \"cn-hangzhou-b\"",
        "reserved_cidrs = [\"10.0.0.128/25\"]",
    );
    assert_eq!(
        diags(&explicit),
        [
            "7:16: error: vswitch_cidr 10.0.0.0/24 overlaps reserved block 10.0.0.128/25 (listed in reserved_cidrs) | the instance's vSwitch must not overlap the blocks the gateway reserves: use a vSwitch in another block"
        ]
    );
}

#[test]
fn backends_in_reserved_blocks_are_errors_and_public_ones_warnings() {
    let text = with("cidr = \"10.1.0.0/16\"", "cidr = \"172.16.0.0/12\"")
        .replace("10.1.3.8", "172.20.1.8");
    assert_eq!(
        diags(&text),
        [
            "11:8: warning: accessible block 172.16.0.0/12 overlaps reserved block 172.19.0.0/20 (reserved for zone cn-hangzhou-b): that part stays unreachable | narrow the accessible block so it leaves the reserved block out",
            "11:8: warning: accessible block 172.16.0.0/12 overlaps reserved block 172.20.0.0/16 (reserved for zone cn-hangzhou-b): that part stays unreachable | narrow the accessible block so it leaves the reserved block out",
            "23:23: error: node 172.20.1.8:8080 of upstream `orders_pool`: backend 172.20.1.8 is inside reserved block 172.20.0.0/16 (reserved for zone cn-hangzhou-b) | the gateway can never reach a reserved block: move the backend to another block of the VPC",
        ]
    );
    let public = BASE
        .replace("kind = \"vpc-integration\"", "kind = \"dedicated\"")
        .replace(
            "[[accessible]]\ncidr = \"10.1.0.0/16\"\nports = [\"80\", \"443\", \"8000-8100\"]\n",
            "",
        )
        .replace("10.0.0.7", "8.8.8.8");
    assert_eq!(
        diags(&public),
        [
            "14:11: warning: authorization `orders-slb`: backend 8.8.8.8 is a public address, but VPC backends are internal | reach public backends as plain HTTP backends, not through VPC access"
        ]
    );
}

#[test]
fn integration_backends_must_be_in_the_vpc_and_accessible_blocks() {
    assert_eq!(
        diags(&with("address = \"10.0.0.7\"", "address = \"10.9.0.4\"")),
        [
            "17:11: error: instance cannot connect to the backend 10.9.0.4: outside accessible CIDR blocks 10.0.0.0/24, 10.1.0.0/16 | add an accessible block that contains it: [[accessible]] cidr = \"10.9.0.0/24\""
        ]
    );
    assert_eq!(
        diags(&with("address = \"10.0.0.7\"", "address = \"fd00:9::4\"")),
        [
            "17:11: error: instance cannot connect to the backend fd00:9::4: outside accessible CIDR blocks 10.0.0.0/24, 10.1.0.0/16 | add an accessible block that contains it: [[accessible]] cidr = \"fd00:9::/64\""
        ]
    );
    // A block covered by the union of two accessible blocks is inside.
    let halves = with(
        "cidr = \"10.1.0.0/16\"",
        "cidr = \"10.1.0.0/17\"\n[[accessible]]\ncidr = \"10.1.128.0/17\"",
    )
    .replace("address = \"10.0.0.7\"", "address = \"10.1.0.0/16\"");
    assert_eq!(diags(&halves), Vec::<String>::new());
    assert_eq!(
        diags(&with(
            "vpc_id = \"vpc-bp1example\"\naddress",
            "vpc_id = \"vpc-other\"\naddress"
        )),
        [
            "17:11: error: authorization `orders-slb` is in VPC vpc-other, but instance gw-hz-1 is attached to VPC vpc-bp1example | a VPC integration instance reaches only its own VPC: set vpc_id = \"vpc-bp1example\", or use a dedicated instance"
        ]
    );
}

#[test]
fn suggested_accessible_blocks_leave_reserved_blocks_out() {
    // The /24 would overlap a reserved block: the suggestion narrows until it does not.
    let text = with(
        "zone = \"cn-hangzhou-b\"",
        "reserved_cidrs = [\"10.9.0.128/25\", \"10.9.0.32/27\"]",
    )
    .replace("address = \"10.0.0.7\"", "address = \"10.9.0.4\"");
    assert_eq!(
        diags(&text),
        [
            "17:11: error: instance cannot connect to the backend 10.9.0.4: outside accessible CIDR blocks 10.0.0.0/24, 10.1.0.0/16 | add an accessible block that contains it: [[accessible]] cidr = \"10.9.0.0/27\""
        ]
    );
    // Down to the backend itself.
    let text = text.replace("10.9.0.32/27", "10.9.0.8/29");
    assert!(
        diags(&text)[0].ends_with("[[accessible]] cidr = \"10.9.0.0/29\""),
        "{:?}",
        diags(&text)
    );
    let text = text.replace("10.9.0.8/29", "10.9.0.5/32");
    assert!(
        diags(&text)[0].ends_with("[[accessible]] cidr = \"10.9.0.4/32\""),
        "{:?}",
        diags(&text)
    );
    // A backend that overlaps a reserved block cannot be helped by any accessible block.
    let inside = with("address = \"10.0.0.7\"", "address = \"192.168.1.7\"");
    assert_eq!(
        diags(&inside),
        [
            "17:11: error: authorization `orders-slb`: backend 192.168.1.7 is inside reserved block 192.168.0.0/20 (reserved for zone cn-hangzhou-b) | the gateway can never reach a reserved block: move the backend to another block of the VPC",
            "17:11: error: instance cannot connect to the backend 192.168.1.7: outside accessible CIDR blocks 10.0.0.0/24, 10.1.0.0/16 | no accessible block can make 192.168.1.7 reachable while it overlaps a reserved block: move the backend to another block of the VPC",
        ]
    );
}

#[test]
fn dedicated_instances_take_several_vpcs_but_no_accessible_blocks() {
    let text = BASE
        .replace("kind = \"vpc-integration\"", "kind = \"dedicated\"")
        .replace(
            "vpc_id = \"vpc-bp1example\"\naddress",
            "vpc_id = \"vpc-other\"\naddress",
        );
    assert_eq!(
        diags(&text),
        [
            "11:8: error: [[accessible]] 10.1.0.0/16 on a dedicated instance: accessible blocks belong to vpc-integration instances | remove it and authorize the backends with [[authorization]], or set kind = \"vpc-integration\""
        ]
    );
}

#[test]
fn structure_errors_are_all_reported_with_positions() {
    let text = BASE
        .replace(
            "vswitch_cidr = \"10.0.0.0/24\"",
            "vswitch_cdr = \"10.0.0.0/24\"",
        )
        .replace("interface = \"eth1\"\n", "")
        .replace(
            "zone = \"cn-hangzhou-b\"",
            "zone = \"cn-hangzhou-q\"\nmode = 3",
        );
    assert_eq!(
        diags(&text),
        [
            "1:1: error: [instance] has no `interface` | add `interface = \"eth1\"`",
            "1:1: error: [instance] of kind vpc-integration has no `vswitch_cidr` | add the vSwitch block the instance was created in, e.g. `vswitch_cidr = \"10.0.0.0/24\"`",
            "6:1: error: unknown field `vswitch_cdr` in [instance] | did you mean `vswitch_cidr`? known fields: name, kind, vpc_id, interface, egress_ip, vswitch_cidr, zone, reserved_cidrs, mode, forward_interfaces, host_essentials, flow_timeouts",
            "7:8: error: unknown zone `cn-hangzhou-q`: the built-in reserved-block table has no such zone | did you mean cn-hangzhou-b, cn-hangzhou-d, cn-hangzhou-e, cn-hangzhou-f, cn-hangzhou-g, cn-hangzhou-h, cn-hangzhou-i, cn-hangzhou-j, cn-hangzhou-k? every known zone: `vpcgate check --help`; or list the zone's blocks in reserved_cidrs",
            "8:8: error: `mode` in [instance] must be a string, not an integer",
        ]
    );
    assert_eq!(
        diags(
            "[instance]\nname = \"x\"\nkind = \"vpc-integration\"\nvpc_id = \"v\"\ninterface = \"eth1\"\nvswitch_cidr = \"10.0.0.0/24\"\nkind2 = 1\n[[authorisation]]\n"
        ),
        [
            "7:1: error: unknown field `kind2` in [instance] | did you mean `kind`? known fields: name, kind, vpc_id, interface, egress_ip, vswitch_cidr, zone, reserved_cidrs, mode, forward_interfaces, host_essentials, flow_timeouts",
            "8:3: error: unknown field `authorisation` in the policy file | did you mean `authorization`? known fields: instance, accessible, authorization, upstream",
        ]
    );
}

#[test]
fn toml_syntax_errors_have_positions() {
    assert_eq!(
        diags("[instance]\nname = \"gw\nkind = 1\n"),
        ["2:11: error: not valid TOML: invalid basic string, expected `\"`"]
    );
}

#[test]
fn enums_list_the_allowed_values() {
    assert_eq!(
        diags(&with("kind = \"vpc-integration\"", "kind = \"shared\"")),
        [
            "3:8: error: kind `shared` is not one of vpc-integration, dedicated | write one of: vpc-integration, dedicated"
        ]
    );
    assert_eq!(
        diags(&with(
            "ports = [\"80\"]\n",
            "ports = [\"80\"]\nprotocol = \"sctp\"\ninstance_type = \"rds\"\n"
        )),
        [
            "19:12: error: protocol `sctp` is not one of tcp, udp | write one of: tcp, udp",
            "20:17: error: instance_type `rds` is not one of ecs, clb, nlb, ip | write one of: ecs, clb, nlb, ip",
        ]
    );
}

#[test]
fn migrate_lists_every_backend_that_would_fail_and_reminds_of_the_egress_ip() {
    let from = check_text("old.toml", BASE);
    let other = BASE
        .replace("name = \"gw-hz-1\"", "name = \"gw-hz-2\"")
        .replace("egress_ip = \"10.0.0.5\"", "egress_ip = \"10.5.0.5\"")
        .replace(
            "vswitch_cidr = \"10.0.0.0/24\"",
            "vswitch_cidr = \"10.5.0.0/24\"",
        )
        .replace("cidr = \"10.1.0.0/16\"", "cidr = \"10.5.128.0/17\"")
        .replace("10.0.0.7", "10.5.0.7")
        .replace("10.1.3.8", "10.5.200.8");
    let to = check_text("new.toml", &other);
    assert!(to.diagnostics.is_empty(), "{:?}", to.diagnostics);
    let out: Vec<String> = policy::migrate(
        &from,
        from.policy.as_ref().unwrap(),
        &to,
        to.policy.as_ref().unwrap(),
    )
    .iter()
    .map(ToString::to_string)
    .collect();
    assert_eq!(
        out,
        [
            "old.toml:17:11: error: instance cannot connect to the backend 10.0.0.7: outside accessible CIDR blocks 10.5.0.0/24, 10.5.128.0/17\n    fix: add an accessible block that contains it: [[accessible]] cidr = \"10.0.0.0/24\"",
            "old.toml:23:23: error: instance cannot connect to the backend 10.1.3.8: outside accessible CIDR blocks 10.5.0.0/24, 10.5.128.0/17\n    fix: add an accessible block that contains it: [[accessible]] cidr = \"10.1.3.0/24\"",
            "new.toml:6:13: warning: the egress IP changes from 10.0.0.5 (instance gw-hz-1) to 10.5.0.5 (instance gw-hz-2)\n    fix: add 10.5.0.5 to every backend's security group / access control allowlist before migrating, or connections from the new instance will time out",
        ]
    );
}

#[test]
fn instance_fields_are_checked_one_by_one() {
    let text = BASE
        .replace(
            "interface = \"eth1\"",
            "interface = \"eth1/2\"\nforward_interfaces = [\"veth0\", \"a very long name\"]",
        )
        .replace("egress_ip = \"10.0.0.5\"", "egress_ip = \"10.0.0\"")
        .replace(
            "vpc_id = \"vpc-bp1example\"\ninterface",
            "vpc_id = \"vpc bp1\"\ninterface",
        );
    assert_eq!(
        diags(&text),
        [
            "4:10: error: vpc_id `vpc bp1` is not a VPC id | copy the VPC id from the console, e.g. \"vpc-bp1example\"",
            "5:13: error: interface `eth1/2` is not a valid interface name | use the name `ip link` shows (at most 15 characters, no '/', ':' or spaces)",
            "6:32: error: forward interface `a very long name` is not a valid interface name | use the name `ip link` shows (at most 15 characters, no '/', ':' or spaces)",
            "7:13: error: egress_ip `10.0.0` is not an IP address | write an address such as 10.0.3.8 or fd00::8",
        ]
    );
}

#[test]
fn protocol_lists_and_upstream_protocols_are_checked() {
    let text = with("ports = [\"80\", \"443\", \"8000-8100\"]", "protocols = []")
        .replace(
            "vpc_id = \"vpc-bp1example\"\nnodes",
            "vpc_id = \"vpc-bp1example\"\nprotocol = \"grpc\"\nnodes",
        )
        .replace(
            "nodes = [ { address = \"10.1.3.8\", port = 8080, weight = 10 } ]",
            "nodes = [ \"10.1.3.8:8080\" ]",
        );
    assert_eq!(
        diags(&text),
        [
            "12:13: error: `protocols` is empty: nothing would be allowed | list [\"tcp\"], [\"udp\"] or both, or remove `protocols` to allow both",
            "23:12: error: upstream protocol `grpc` is not one of http, https | write one of: http, https",
            "24:11: error: node #1 of [[upstream]] #1 must be a table { address = ..., port = ..., weight = ... }",
        ]
    );
}

/// BASE with `lines` added to `[instance]` (from line 9 on).
fn instance_with(lines: &str) -> String {
    with(
        "zone = \"cn-hangzhou-b\"",
        &format!("zone = \"cn-hangzhou-b\"\n{lines}"),
    )
}

/// The `[instance]` of a valid policy text.
fn instance(text: &str) -> policy::model::Instance {
    let c = check_text("p.toml", text);
    assert!(c.diagnostics.is_empty(), "{:?}", c.diagnostics);
    c.policy.expect("valid").instance
}

const DHCP: &str =
    "`dhcp` (DHCPv4 client traffic (UDP 68 -> 67) and DHCPv6 client traffic (UDP 546 -> 547))";
const KNOWN_ESSENTIALS: &str =
    "known host essentials: dhcp, mld; `host_essentials = []` turns them off";

#[test]
fn host_essentials_default_to_all_and_can_be_turned_off() {
    use policy::model::HostEssential::{Dhcp, Mld};
    assert_eq!(instance(BASE).host_essentials, [Dhcp, Mld]);
    assert_eq!(
        instance(&instance_with("host_essentials = []")).host_essentials,
        []
    );
    assert_eq!(
        instance(&instance_with("host_essentials = [\"mld\"]")).host_essentials,
        [Mld]
    );
    // Listed in one order whatever the file's.
    assert_eq!(
        instance(&instance_with("host_essentials = [\"mld\", \"dhcp\"]")).host_essentials,
        [Dhcp, Mld]
    );
}

#[test]
fn host_essentials_are_known_names_listed_once() {
    assert_eq!(
        diags(&instance_with(
            r#"host_essentials = ["dhcpv6", "mld", "mld", "arp", "DHCP", "dchp", 3]"#
        )),
        [
            format!(
                "9:20: error: unknown host essential `dhcpv6` | did you mean {DHCP}? {KNOWN_ESSENTIALS}"
            ),
            "9:37: warning: host essential `mld` is listed twice | remove the repeated entry"
                .to_owned(),
            format!("9:44: error: unknown host essential `arp` | {KNOWN_ESSENTIALS}"),
            format!(
                "9:51: error: unknown host essential `DHCP` | did you mean {DHCP}? {KNOWN_ESSENTIALS}"
            ),
            format!(
                "9:59: error: unknown host essential `dchp` | did you mean {DHCP}? {KNOWN_ESSENTIALS}"
            ),
            "9:67: error: `host_essentials` in [instance] must hold strings, not an integer"
                .to_owned(),
        ]
    );
    assert_eq!(
        diags(&instance_with("host_essentials = [\"mldv2\"]")),
        [format!(
            "9:20: error: unknown host essential `mldv2` | did you mean `mld` (MLDv2 listener reports (ICMPv6 143 to ff02::16, hop limit 1))? {KNOWN_ESSENTIALS}"
        )]
    );
    assert_eq!(
        diags(&instance_with("host_essentials = \"dhcp\"")),
        ["9:19: error: `host_essentials` in [instance] must be an array, not a string"]
    );
    // A warning only: the policy is valid and holds each essential once.
    let c = check_text(
        "p.toml",
        &instance_with("host_essentials = [\"dhcp\", \"dhcp\"]"),
    );
    assert_eq!(
        c.policy.expect("valid").instance.host_essentials,
        [policy::model::HostEssential::Dhcp]
    );
}

#[test]
fn flow_timeouts_take_durations_or_seconds_and_default_each_entry() {
    use policy::model::FlowTimeouts;
    assert_eq!(
        instance(BASE).flow_timeouts,
        FlowTimeouts {
            tcp: 3600,
            tcp_closing: 10,
            udp: 60
        }
    );
    assert_eq!(
        instance(&instance_with(
            r#"flow_timeouts = { tcp = "2h", tcp_closing = "30s", udp = 90 }"#
        ))
        .flow_timeouts,
        FlowTimeouts {
            tcp: 7200,
            tcp_closing: 30,
            udp: 90
        }
    );
    assert_eq!(
        instance(&instance_with(r#"flow_timeouts = { udp = "5m" }"#)).flow_timeouts,
        FlowTimeouts {
            tcp: 3600,
            tcp_closing: 10,
            udp: 300
        }
    );
    // The bounds are inclusive, and a table header works like the inline table.
    assert_eq!(
        instance(&instance_with(
            "[instance.flow_timeouts]\ntcp = \"24h\"\ntcp_closing = \"1s\"\nudp = 86400"
        ))
        .flow_timeouts,
        FlowTimeouts {
            tcp: 86400,
            tcp_closing: 1,
            udp: 86400
        }
    );
    assert_eq!(
        instance(&instance_with("flow_timeouts = {}")).flow_timeouts,
        FlowTimeouts::default()
    );
}

#[test]
fn flow_timeouts_are_bounded_and_their_keys_known() {
    let fix = |default: &str| {
        format!(
            "write a duration from 1s to 24h with unit s, m or h, e.g. \"{default}\" (the default), or a whole number of seconds"
        )
    };
    assert_eq!(
        diags(&instance_with(
            r#"flow_timeouts = { tcp = "25h", tcp_closing = "1.5h", udp = 0, tpc = "1h" }"#
        )),
        [
            format!(
                "9:25: error: `tcp` in [instance] flow_timeouts: 25h is out of range 1s..=24h | {}",
                fix("1h")
            ),
            format!(
                "9:46: error: `tcp_closing` in [instance] flow_timeouts: `1.5h` is not a duration | {}",
                fix("10s")
            ),
            format!(
                "9:60: error: `udp` in [instance] flow_timeouts: 0s is out of range 1s..=24h | {}",
                fix("60s")
            ),
            "9:63: error: unknown field `tpc` in [instance] flow_timeouts | did you mean `tcp`? known fields: tcp, tcp_closing, udp".to_owned(),
        ]
    );
    assert_eq!(
        diags(&instance_with(
            r#"flow_timeouts = { tcp = "3600", tcp_closing = "0s", udp = 86401 }"#
        )),
        [
            format!(
                "9:25: error: `tcp` in [instance] flow_timeouts: `3600` is not a duration | {}",
                fix("1h")
            ),
            format!(
                "9:47: error: `tcp_closing` in [instance] flow_timeouts: 0s is out of range 1s..=24h | {}",
                fix("10s")
            ),
            format!(
                "9:59: error: `udp` in [instance] flow_timeouts: 86401s is out of range 1s..=24h | {}",
                fix("60s")
            ),
        ]
    );
    assert_eq!(
        diags(&instance_with(
            r#"flow_timeouts = { tcp = -5, tcp_closing = "99999999999999999999h", udp = true }"#
        )),
        [
            format!(
                "9:25: error: `tcp` in [instance] flow_timeouts: -5s is out of range 1s..=24h | {}",
                fix("1h")
            ),
            format!(
                "9:43: error: `tcp_closing` in [instance] flow_timeouts: 99999999999999999999h is out of range 1s..=24h | {}",
                fix("10s")
            ),
            format!(
                "9:74: error: `udp` in [instance] flow_timeouts must be a duration such as \"60s\" or a number of seconds, not a boolean | {}",
                fix("60s")
            ),
        ]
    );
    assert_eq!(
        diags(&instance_with("flow_timeouts = \"1h\"")),
        ["9:17: error: `flow_timeouts` in [instance] must be a table, not a string"]
    );
}

#[test]
fn flow_timeout_errors_keep_the_checks_across_fields() {
    // The wrong timeout is reported, and so is the backend inside a reserved block.
    assert_eq!(
        diags(
            &instance_with("flow_timeouts = { udp = \"1d\" }")
                .replace("address = \"10.0.0.7\"", "address = \"172.20.0.7\"")
        ),
        [
            "9:25: error: `udp` in [instance] flow_timeouts: `1d` is not a duration | write a duration from 1s to 24h with unit s, m or h, e.g. \"60s\" (the default), or a whole number of seconds",
            "18:11: error: authorization `orders-slb`: backend 172.20.0.7 is inside reserved block 172.20.0.0/16 (reserved for zone cn-hangzhou-b) | the gateway can never reach a reserved block: move the backend to another block of the VPC",
            "18:11: error: instance cannot connect to the backend 172.20.0.7: outside accessible CIDR blocks 10.0.0.0/24, 10.1.0.0/16 | no accessible block can make 172.20.0.7 reachable while it overlaps a reserved block: move the backend to another block of the VPC",
        ]
    );
}

#[test]
fn tcp_closing_longer_than_tcp_is_a_warning() {
    let warning = |pos: &str, closing: &str, tcp: &str| {
        format!(
            "{pos}: warning: `tcp_closing` in [instance] flow_timeouts ({closing}) is longer than `tcp` ({tcp}): a closing connection would outlive an idle established one | make tcp_closing shorter than tcp (defaults: tcp 1h, tcp_closing 10s)"
        )
    };
    assert_eq!(
        diags(&instance_with(
            r#"flow_timeouts = { tcp = "1m", tcp_closing = 120 }"#
        )),
        [warning("9:45", "2m", "60s")]
    );
    // Only `tcp` given: the default tcp_closing (10s) is longer; the warning points at `tcp`.
    assert_eq!(
        diags(&instance_with(r#"flow_timeouts = { tcp = "5s" }"#)),
        [warning("9:25", "10s", "5s")]
    );
    // Equal is fine, and so is the default pair.
    assert_eq!(
        diags(&instance_with(
            r#"flow_timeouts = { tcp = "10s", tcp_closing = "10s" }"#
        )),
        Vec::<String>::new()
    );
    // A wrong tcp is not compared (its default would stand in): the error alone.
    assert_eq!(
        diags(&instance_with(
            r#"flow_timeouts = { tcp = "x", tcp_closing = "2h" }"#
        )),
        [
            "9:25: error: `tcp` in [instance] flow_timeouts: `x` is not a duration | write a duration from 1s to 24h with unit s, m or h, e.g. \"1h\" (the default), or a whole number of seconds"
        ]
    );
}

/// A dedicated instance (no accessible blocks) whose authorization `orders-slb` has `address`.
fn dedicated_backend(address: &str) -> String {
    BASE.replace("kind = \"vpc-integration\"", "kind = \"dedicated\"")
        .replace(
            "[[accessible]]\ncidr = \"10.1.0.0/16\"\nports = [\"80\", \"443\", \"8000-8100\"]\n",
            "",
        )
        .replace(
            "address = \"10.0.0.7\"",
            &format!("address = \"{address}\""),
        )
}

#[test]
fn ipv4_mapped_ipv6_is_an_error_with_the_ipv4_form() {
    assert_eq!(
        diags(&dedicated_backend("::ffff:100.64.1.1")),
        [
            "14:11: error: address `::ffff:100.64.1.1` is an IPv4-mapped IPv6 address: the kernel sends such packets as IPv4, so it would never match | write the IPv4 form 100.64.1.1"
        ]
    );
    assert_eq!(
        diags(&with(
            "zone = \"cn-hangzhou-b\"",
            "zone = \"cn-hangzhou-b\"\nreserved_cidrs = [\"::ffff:100.64.0.0/112\"]"
        )),
        [
            "9:19: error: reserved block `::ffff:100.64.0.0/112` is an IPv4-mapped IPv6 address: the kernel sends such packets as IPv4, so it would never match | write the IPv4 form 100.64.0.0/16"
        ]
    );
    let node = with(
        "{ address = \"10.1.3.8\"",
        "{ address = \"::ffff:10.1.3.8\"",
    );
    let got = diags(&node);
    assert!(
        got.iter().any(
            |d| d.contains("`::ffff:10.1.3.8` is an IPv4-mapped IPv6 address")
                && d.ends_with("| write the IPv4 form 10.1.3.8")
        ),
        "{got:?}"
    );
}

#[test]
fn special_purpose_backends_are_errors_naming_the_range() {
    for (address, range) in [
        (
            "169.254.169.254",
            "link-local (169.254.0.0/16, incl. the cloud metadata service 169.254.169.254)",
        ),
        ("127.0.0.1", "loopback (127.0.0.0/8)"),
        ("0.0.0.0", "\"this network\" (0.0.0.0/8)"),
        ("224.0.0.1", "multicast (224.0.0.0/4)"),
        (
            "255.255.255.255",
            "reserved and broadcast (240.0.0.0/4, incl. 255.255.255.255)",
        ),
        ("192.0.2.10", "documentation (TEST-NET-1, 192.0.2.0/24)"),
        ("fe80::1", "link-local (fe80::/10)"),
        ("::1", "the unspecified and loopback addresses (::, ::1)"),
        ("ff02::1", "multicast (ff00::/8)"),
        ("2001:db8::7", "documentation (2001:db8::/32)"),
    ] {
        assert_eq!(
            diags(&dedicated_backend(address)),
            [format!(
                "14:11: error: authorization `orders-slb`: backend {address} is a special-purpose address: {range} | a VPC backend has an internal unicast address: use the backend's private address in the VPC"
            )],
            "{address}"
        );
    }
    // A block that only overlaps one is a warning; a global unicast address stays a "public" warning.
    assert_eq!(
        diags(&dedicated_backend("169.254.0.0/15")),
        [
            "14:11: warning: authorization `orders-slb`: block 169.254.0.0/15 covers a special-purpose range: link-local (169.254.0.0/16, incl. the cloud metadata service 169.254.169.254) | narrow the block to the backends' addresses"
        ]
    );
    assert_eq!(
        diags(&dedicated_backend("8.8.8.8")),
        [
            "14:11: warning: authorization `orders-slb`: backend 8.8.8.8 is a public address, but VPC backends are internal | reach public backends as plain HTTP backends, not through VPC access"
        ]
    );
}

#[test]
fn accessible_blocks_that_open_everything_or_special_ranges_are_warned() {
    // (The IPv4 node of the base policy is then outside every accessible block: reported too.)
    assert_eq!(
        diags(&with("cidr = \"10.1.0.0/16\"", "cidr = \"::/0\""))[0],
        "11:8: warning: accessible block ::/0 opens the whole IPv6 address space, special-purpose ranges and the internet included | list the VPC's blocks instead"
    );
    let got = diags(&with("cidr = \"10.1.0.0/16\"", "cidr = \"0.0.0.0/0\""));
    assert!(
        got.contains(&"11:8: warning: accessible block 0.0.0.0/0 opens the whole IPv4 address space, special-purpose ranges and the internet included | list the VPC's blocks instead".to_owned()),
        "{got:?}"
    );
    assert_eq!(
        diags(&with("cidr = \"10.1.0.0/16\"", "cidr = \"169.254.0.0/16\""))[0],
        "11:8: warning: accessible block 169.254.0.0/16 covers a special-purpose range: link-local (169.254.0.0/16, incl. the cloud metadata service 169.254.169.254) | narrow it to the VPC's blocks"
    );
}

#[test]
fn octets_with_leading_zeros_are_rejected_with_the_plain_form() {
    assert_eq!(
        diags(&with("cidr = \"10.1.0.0/16\"", "cidr = \"010.001.0.0/16\"")),
        [
            "11:8: error: accessible block `010.001.0.0/16` has octets with leading zeros (some tools read those as octal) | write 10.1.0.0/16"
        ]
    );
    let got = diags(&with("address = \"10.0.0.7\"", "address = \"10.0.0.07\""));
    assert_eq!(
        got[0],
        "17:11: error: address `10.0.0.07` has octets with leading zeros (some tools read those as octal) | write 10.0.0.7"
    );
    // Node addresses (plain addresses, not blocks) follow the same rule.
    let got = diags(&with(
        "{ address = \"10.1.3.8\"",
        "{ address = \"10.1.3.08\"",
    ));
    assert!(
        got.iter()
            .any(|d| d.contains("`10.1.3.08` has octets with leading zeros")
                && d.ends_with("| write 10.1.3.8")),
        "{got:?}"
    );
}

/// Only the errors' positions: what a fix may remove, and must not add.
fn error_positions(text: &str) -> Vec<(usize, usize)> {
    check_text("p.toml", text)
        .diagnostics
        .iter()
        .filter(|d| d.severity == policy::diag::Severity::Error)
        .map(|d| (d.line, d.column))
        .collect()
}

#[test]
fn errors_elsewhere_do_not_hide_the_accessible_blocks_check() {
    let outside = "17:11: error: instance cannot connect to the backend 10.9.0.4: outside accessible CIDR blocks 10.0.0.0/24, 10.1.0.0/16 | add an accessible block that contains it: [[accessible]] cidr = \"10.9.0.0/24\"";
    let far = with("address = \"10.0.0.7\"", "address = \"10.9.0.4\"");
    // An unknown field in another table.
    let text = far.replacen(
        "zone = \"cn-hangzhou-b\"",
        "zone = \"cn-hangzhou-b\"\nmod = \"audit\"",
        1,
    );
    let d = diags(&text);
    assert!(
        d[0].starts_with("9:1: error: unknown field `mod` in [instance]"),
        "{d:?}"
    );
    assert_eq!(d[1], outside.replacen("17:", "18:", 1));
    assert_eq!(d.len(), 2, "{d:?}");
    // Another entry's own errors: reported, and the entry itself still checked on what could be read.
    let text = format!(
        "{far}\n[[authorization]]\nname = \"bad name\"\nvpc_id = \"vpc-bp1example\"\ninstance_type = \"vm\"\naddress = \"172.20.0.9\"\nports = [\"90-80\"]\n"
    );
    assert_eq!(
        diags(&text),
        [
            outside,
            "26:8: error: authorization name `bad name` must be 1 to 64 characters of A-Z, a-z, 0-9, -, _ and . | rename it, e.g. `bad-name`",
            "28:17: error: instance_type `vm` is not one of ecs, clb, nlb, ip | write one of: ecs, clb, nlb, ip",
            "29:11: error: authorization `bad name`: backend 172.20.0.9 is inside reserved block 172.20.0.0/16 (reserved for zone cn-hangzhou-b) | the gateway can never reach a reserved block: move the backend to another block of the VPC",
            "29:11: error: instance cannot connect to the backend 172.20.0.9: outside accessible CIDR blocks 10.0.0.0/24, 10.1.0.0/16 | no accessible block can make 172.20.0.9 reachable while it overlaps a reserved block: move the backend to another block of the VPC",
            "30:10: error: `ports` in [[authorization]] #2: port range 90-80 is reversed | write 80-90",
        ]
    );
    // An accessible block with its own port error still counts as accessible.
    let text = far
        .replace(
            "ports = [\"80\", \"443\", \"8000-8100\"]",
            "ports = [\"0\"]\nprotocols = [\"sctp\"]",
        )
        .replace("address = \"10.9.0.4\"", "address = \"10.1.0.4\"");
    assert_eq!(
        error_positions(&text),
        [(12, 10), (13, 14)],
        "{:?}",
        diags(&text)
    );
}

#[test]
fn a_value_with_one_exact_fix_is_checked_as_that_fix() {
    // Host bits: the accessible block is checked as 10.1.0.0/16, which covers the node in 10.1.3.0/24.
    assert_eq!(
        diags(&with("cidr = \"10.1.0.0/16\"", "cidr = \"10.1.0.1/16\"")),
        ["11:8: error: accessible block 10.1.0.1/16 has host bits set | write 10.1.0.0/16"]
    );
    // Octets with leading zeros: the address is checked as its plain form.
    assert_eq!(
        diags(&with("address = \"10.0.0.7\"", "address = \"010.009.0.4\"")),
        [
            "17:11: error: address `010.009.0.4` has octets with leading zeros (some tools read those as octal) | write 10.9.0.4",
            "17:11: error: instance cannot connect to the backend 10.9.0.4: outside accessible CIDR blocks 10.0.0.0/24, 10.1.0.0/16 | add an accessible block that contains it: [[accessible]] cidr = \"10.9.0.0/24\"",
        ]
    );
    // ... and a plain form with host bits gets both errors at once.
    assert_eq!(
        diags(&with("cidr = \"10.1.0.0/16\"", "cidr = \"010.1.0.1/16\"")),
        [
            "11:8: error: accessible block `010.1.0.1/16` has octets with leading zeros (some tools read those as octal) | write 10.1.0.1/16",
            "11:8: error: accessible block 10.1.0.1/16 has host bits set | write 10.1.0.0/16",
        ]
    );
    // A vSwitch block with host bits is checked against the reserved blocks as its truncated form.
    assert_eq!(
        diags(&with(
            "vswitch_cidr = \"10.0.0.0/24\"",
            "vswitch_cidr = \"172.20.0.1/24\""
        )),
        [
            "6:13: warning: egress_ip 10.0.0.5 is outside vswitch_cidr 172.20.0.0/24 | a VPC integration instance's egress IP is an address of its vSwitch: check both",
            "7:16: error: vswitch_cidr 172.20.0.1/24 has host bits set | write 172.20.0.0/24",
            "7:16: error: vswitch_cidr 172.20.0.0/24 overlaps reserved block 172.20.0.0/16 (reserved for zone cn-hangzhou-b) | the instance's vSwitch must not overlap the blocks the gateway reserves: use a vSwitch in another block",
            "17:11: error: instance cannot connect to the backend 10.0.0.7: outside accessible CIDR blocks 172.20.0.0/24, 10.1.0.0/16 | add an accessible block that contains it: [[accessible]] cidr = \"10.0.0.0/24\"",
        ]
    );
}

#[test]
fn the_accessible_blocks_check_is_skipped_only_when_a_block_cannot_be_read() {
    let far = with("address = \"10.0.0.7\"", "address = \"10.9.0.4\"");
    for (from, to, error) in [
        (
            "cidr = \"10.1.0.0/16\"",
            "cidr = \"10.1.0.0/33\"",
            "11:8: error: accessible block `10.1.0.0/33` is not a valid CIDR block | write a block such as 10.0.0.0/24 or fd00::/64",
        ),
        (
            "cidr = \"10.1.0.0/16\"",
            "cidr = 10",
            "11:8: error: `cidr` in [[accessible]] #1 must be a string, not an integer",
        ),
        (
            "vswitch_cidr = \"10.0.0.0/24\"",
            "vswitch_cidr = \"10.0.0/24\"",
            "7:16: error: vswitch_cidr `10.0.0/24` is not a valid CIDR block | write a block such as 10.0.0.0/24 or fd00::/64",
        ),
    ] {
        assert!(far.contains(from));
        // The backend may well be inside the block meant: nothing to say about it until it can be read.
        assert_eq!(diags(&far.replacen(from, to, 1)), [error], "{to}");
    }
}

#[test]
fn fixing_broken_toml_one_error_at_a_time_reveals_nothing_new() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/broken.toml");
    let broken = std::fs::read_to_string(root).unwrap();
    // Each error's position, and the edit that fixes it (same line count, so positions stay put).
    let fixes = [
        (
            (7, 16),
            "vswitch_cidr = \"192.168.1.0/24\"",
            "vswitch_cidr = \"10.0.0.0/24\"",
        ),
        ((11, 8), "cidr = \"10.1.0.1/16\"", "cidr = \"10.1.0.0/16\""),
        ((12, 17), "\"9000-8000\"", "\"8000-9000\""),
        ((17, 11), "address = \"10.9.0.4\"", "address = \"10.1.0.4\""),
        ((19, 1), "protcol = \"tcp\"", "protocol = \"tcp\""),
    ];
    let all: Vec<(usize, usize)> = fixes.iter().map(|f| f.0).collect();
    assert_eq!(error_positions(&broken), all, "{:?}", diags(&broken));
    // Every subset of the fixes, applied in any combination: exactly the unfixed errors remain.
    for mask in 0u32..1 << fixes.len() {
        let mut text = broken.clone();
        let mut left = vec![];
        for (i, (pos, from, to)) in fixes.iter().enumerate() {
            if mask & 1 << i != 0 {
                assert!(text.contains(from), "{from}");
                text = text.replacen(from, to, 1);
            } else {
                left.push(*pos);
            }
        }
        assert_eq!(
            error_positions(&text),
            left,
            "fixes {mask:05b}: {:?}",
            diags(&text)
        );
    }
}

#[test]
fn duplicate_keys_name_the_key_and_its_first_definition() {
    assert_eq!(
        diags(&with(
            "interface = \"eth1\"",
            "interface = \"eth1\"\nname = \"gw-2\""
        )),
        [
            "6:1: error: not valid TOML: duplicate key `name`: already defined at line 2, column 1 | a key (and a [table]) is defined once per table: remove or merge one of the `name`"
        ]
    );
    // In an inline table: the first `port` of the same table, not one in a table inside it.
    assert_eq!(
        diags(&with("weight = 10 }", "weight = 10, port = 9090 }")),
        [
            "23:61: error: not valid TOML: duplicate key `port`: already defined at line 23, column 35 | a key (and a [table]) is defined once per table: remove or merge one of the `port`"
        ]
    );
    // A [table] defined twice.
    assert_eq!(
        diags(&format!("{BASE}\n[instance]\n")),
        [
            "25:2: error: not valid TOML: duplicate key `instance`: already defined at line 1, column 2 | a key (and a [table]) is defined once per table: remove or merge one of the `instance`"
        ]
    );
}

#[test]
fn bytes_that_are_not_utf8_are_a_policy_error_at_the_first_of_them() {
    let mut bytes = with(
        "zone = \"cn-hangzhou-b\"",
        "zone = \"cn-hangzhou-b\" # caf\u{e9}",
    )
    .into_bytes();
    // Latin-1 é (0xe9) instead of UTF-8's 0xc3 0xa9, twice.
    let at = bytes.windows(2).position(|w| w == [0xc3, 0xa9]).unwrap();
    bytes.splice(at..at + 2, [0xe9, b' ', 0xe9]);
    let c = policy::check_bytes("p.toml", &bytes);
    assert!(c.policy.is_none());
    let shown: Vec<String> = c.diagnostics.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            "p.toml:8:29: error: byte 0xe9 is not UTF-8 (1 more invalid byte follows): a policy file is UTF-8 text\n    fix: save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or remove the byte"
        ]
    );
    // The rest of the file is still checked.
    let at = bytes.windows(8).position(|w| w == b"10.0.0.7").unwrap();
    bytes.splice(at..at + 8, *b"10.0.0.7/24");
    let c = policy::check_bytes("p.toml", &bytes);
    assert_eq!(
        c.diagnostics
            .iter()
            .map(|d| (d.line, d.column))
            .collect::<Vec<_>>(),
        [(8, 29), (17, 11)],
        "{:?}",
        c.diagnostics
    );
}

#[test]
fn unknown_zones_name_the_closest_and_where_the_list_is() {
    assert_eq!(
        diags(&with("zone = \"cn-hangzhou-b\"", "zone = \"cn-hangzou-b\"")),
        [
            "8:8: error: unknown zone `cn-hangzou-b`: the built-in reserved-block table has no such zone | did you mean cn-hangzhou-b? every known zone: `vpcgate check --help`; or list the zone's blocks in reserved_cidrs"
        ]
    );
    assert_eq!(
        diags(&with(
            "zone = \"cn-hangzhou-b\"",
            "zone = \"mars-north-1a\""
        )),
        [
            "8:8: error: unknown zone `mars-north-1a`: the built-in reserved-block table has no such zone | every known zone: `vpcgate check --help`; or list the zone's blocks in reserved_cidrs"
        ]
    );
}

#[test]
fn a_long_invalid_value_is_not_repeated_into_megabytes_of_diagnostics() {
    // An upstream name of 100,000 characters (invalid), in another VPC, with 200 public nodes: every node's
    // messages quote the upstream's name and VPC id.
    let name = "x".repeat(100_000);
    let vpc = format!("vpc-{}", "y".repeat(100_000));
    let nodes: Vec<String> = (0..200)
        .map(|i| {
            format!(
                "{{ address = \"8.8.{}.{}\", port = 80 }}",
                i / 250,
                1 + i % 250
            )
        })
        .collect();
    let text = format!(
        "[instance]\nname = \"{}\"\nkind = \"dedicated\"\nvpc_id = \"vpc-a\"\ninterface = \"eth1\"\n\n\
         [[upstream]]\nname = \"{name}\"\nvpc_id = \"{vpc}\"\nprotocol = \"http\"\nnodes = [{}]\n",
        "z".repeat(100_000),
        nodes.join(", ")
    );
    let c = check_text("p.toml", &text);
    assert!(c.policy.is_none());
    let bytes: usize = c
        .diagnostics
        .iter()
        .map(|d| d.message.len() + d.fix.as_ref().map_or(0, String::len))
        .sum();
    // Each invalid value is reported once in full (bounded to 2,048 characters); elsewhere it is quoted
    // shortened. Well under the file's own size, not 200 times it.
    assert!(
        bytes < text.len(),
        "{bytes} bytes of diagnostics for a {} byte file",
        text.len()
    );
    let name_errors = c
        .diagnostics
        .iter()
        .filter(|d| d.message.starts_with("upstream name `xxx"))
        .count();
    assert_eq!(name_errors, 1);
    assert!(
        c.diagnostics
            .iter()
            .all(|d| d.message.chars().count() <= 2048 + 40),
        "a message was not bounded"
    );
}

#[test]
fn an_unknown_long_zone_or_field_gets_no_near_match_and_no_quadratic_search() {
    // The distance to a known name is at least the difference in length: nothing is scored.
    let text = format!(
        "[instance]\nname = \"gw\"\nkind = \"dedicated\"\nvpc_id = \"vpc-a\"\ninterface = \"eth1\"\nzone = \"{}\"\n{} = 1\n",
        "a".repeat(1_000_000),
        "b".repeat(200_000)
    );
    let c = check_text("p.toml", &text);
    let zone = c
        .diagnostics
        .iter()
        .find(|d| d.message.starts_with("unknown zone"))
        .expect("zone error");
    assert!(
        !zone
            .fix
            .as_deref()
            .unwrap_or_default()
            .contains("did you mean"),
        "{:?}",
        zone.fix
    );
    let field = c
        .diagnostics
        .iter()
        .find(|d| d.message.starts_with("unknown field"))
        .expect("field error");
    assert!(
        !field
            .fix
            .as_deref()
            .unwrap_or_default()
            .contains("did you mean"),
        "{:?}",
        field.fix
    );
}
