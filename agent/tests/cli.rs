//! The command line's contract, checked without privileges.

use clap::{CommandFactory, Parser};
use vpcgate::cli::Cli;

#[test]
fn command_line_definition_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn help_names_every_command_and_the_exit_statuses() {
    let help = Cli::command().render_long_help().to_string();
    for needle in [
        "check",
        "explain",
        "preflight",
        "Exit status: 0 ok, 1",
        "2 usage or runtime error",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
}

#[test]
fn unknown_output_format_is_a_usage_error() {
    let err = Cli::try_parse_from(["vpcgate", "preflight", "--output", "yaml"]).unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(err.to_string().contains("yaml"));
}

fn vpcgate(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vpcgate"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("run vpcgate");
    (
        out.status.code().expect("exit code"),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn check_exit_statuses_and_text() {
    let (code, out, _) = vpcgate(&["check", "examples/policy.toml"]);
    assert_eq!(code, 0, "{out}");
    // The summary, then the entries the policy needs in each kernel map against capacity.
    assert_eq!(
        out.trim_end(),
        "examples/policy.toml: valid (0 warnings): instance gw-hz-1 (vpc-integration, enforce), 2 authorizations, 1 upstream (2 nodes), 3 accessible blocks, 4 reserved blocks\n  \
         kernel map   entries  capacity  holds\n  \
         ADDR_V4            5   1048576  IPv4 address prefixes\n  \
         ADDR_V6            2   1048576  IPv6 address prefixes\n  \
         RESERVED_V4        4      1024  IPv4 reserved blocks\n  \
         RESERVED_V6        0      1024  IPv6 reserved blocks\n  \
         PORTS            120   4194304  port blocks of the port tables\n  \
         RULE_STATS         7   1048576  rules (per-rule counters)"
    );
    let (code, out, _) = vpcgate(&["check", "examples/broken.toml"]);
    assert_eq!(code, 1, "{out}");
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("examples/")).collect();
    assert_eq!(
        lines,
        [
            "examples/broken.toml:7:16: error: vswitch_cidr 192.168.1.0/24 overlaps reserved block 192.168.0.0/20 (reserved for zone cn-hangzhou-b)",
            "examples/broken.toml:11:8: error: accessible block 10.1.0.1/16 has host bits set",
            "examples/broken.toml:12:17: error: `ports` in [[accessible]] #1: port range 9000-8000 is reversed",
            "examples/broken.toml:17:11: error: instance cannot connect to the backend 10.9.0.4: outside accessible CIDR blocks 192.168.1.0/24, 10.1.0.0/16",
            "examples/broken.toml:19:1: error: unknown field `protcol` in [[authorization]] #1",
            "examples/broken.toml: invalid: 5 errors, 0 warnings",
        ]
    );
    let (code, _, err) = vpcgate(&["check", "examples/nonexistent.toml"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot read examples/nonexistent.toml"),
        "{err}"
    );
}

#[test]
fn check_json_is_machine_readable() {
    let (code, out, _) = vpcgate(&["check", "examples/broken.toml", "--output", "json"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["valid"], false);
    assert_eq!(v["errors"], 5);
    assert_eq!(v["diagnostics"][1]["line"], 11);
    assert_eq!(v["diagnostics"][1]["column"], 8);
    assert_eq!(v["diagnostics"][1]["severity"], "error");
    assert_eq!(v["diagnostics"][1]["fix"], "write 10.1.0.0/16");
    // An invalid policy has no capacity report; a valid one lists every map the policy fills.
    assert!(v.get("capacity").is_none(), "{v}");
    let v = json(&["check", "examples/dedicated.toml"], 0);
    let maps: Vec<(&str, u64, u64)> = v["capacity"]
        .as_array()
        .expect("capacity")
        .iter()
        .map(|m| {
            assert!(m["holds"].as_str().is_some_and(|h| !h.is_empty()), "{m}");
            (
                m["map"].as_str().unwrap(),
                m["entries"].as_u64().unwrap(),
                m["capacity"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        maps,
        [
            ("ADDR_V4", 5, 1_048_576),
            ("ADDR_V6", 1, 1_048_576),
            ("RESERVED_V4", 1, 1024),
            ("RESERVED_V6", 0, 1024),
            ("PORTS", 7, 4_194_304),
            ("RULE_STATS", 6, 1_048_576)
        ]
    );
}

#[test]
fn check_migrate_to_lists_failing_backends() {
    let (code, out, _) = vpcgate(&[
        "check",
        "examples/dedicated.toml",
        "--migrate-to",
        "examples/policy.toml",
        "--output",
        "json",
    ]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    // Each of the 6 backends is in another VPC and outside gw-hz-1's accessible blocks (12 errors), and
    // 192.168.10.0/28 is inside cn-hangzhou-b's reserved 192.168.0.0/20 (1): 6 backends fail.
    assert_eq!(v["migration"]["failing"], 6, "{out}");
    assert_eq!(v["migration"]["errors"], 13, "{out}");
    // No suggested accessible block overlaps one of gw-hz-1's reserved blocks: 192.168.10.0/28 lies
    // inside cn-hangzhou-b's 192.168.0.0/20, so none can help it.
    let outside = v["migration"]["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| {
            d["message"]
                .as_str()
                .unwrap()
                .contains("backend 192.168.10.0/28: outside")
        })
        .expect("192.168.10.0/28 is outside the accessible blocks");
    assert_eq!(
        outside["fix"],
        "no accessible block can make 192.168.10.0/28 reachable while it overlaps a reserved block: move the backend to another block of the VPC"
    );
    let last = v["migration"]["diagnostics"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["severity"], "warning");
    assert_eq!(
        last["message"],
        "the egress IP changes from 100.104.12.7 (instance gw-sh-dedicated) to 10.0.0.5 (instance gw-hz-1)"
    );
}

/// The last line of `explain` with every host essential on.
const ESSENTIALS: &str = "  host essentials (rule 1): dhcp (DHCPv4 client traffic (UDP 68 -> 67) and DHCPv6 client traffic (UDP 546 -> 547)), mld (MLDv2 listener reports (ICMPv6 143 to ff02::16, hop limit 1))\n";

#[test]
fn explain_verdicts_rules_and_suggestions() {
    let (code, out, _) = vpcgate(&["explain", "examples/policy.toml", "10.0.3.7:80"]);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        format!(
            "10.0.3.7:80/tcp → pass\n  allowed by authorization orders-slb (examples/policy.toml:33, verdict rule 5)\n{ESSENTIALS}"
        )
    );
    let (code, out, _) = vpcgate(&["explain", "examples/policy.toml", "10.9.0.4:80"]);
    assert_eq!(code, 1);
    assert_eq!(
        out,
        format!(
            "10.9.0.4:80/tcp → drop (not_authorized)\n  no authorization, upstream node or accessible block covers 10.9.0.4 (rule 7)\n  smallest change that allows it:\n    [[accessible]]\n    cidr = \"10.9.0.4/32\"\n    ports = [\"80\"]\n    protocols = [\"tcp\"]\n{ESSENTIALS}"
        )
    );
    let (code, out, _) = vpcgate(&[
        "explain",
        "examples/dedicated.toml",
        "172.16.4.20:22",
        "--output",
        "json",
    ]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["action"], "drop");
    assert_eq!(v["reason"], "port_not_authorized");
    assert_eq!(v["rule"]["name"], "billing-ecs");
    assert_eq!(v["rule"]["line"], 16);
    assert_eq!(v["suggestion"]["kind"], "change");
    assert_eq!(
        v["suggestion"]["text"],
        "add \"22\" to `ports` of authorization billing-ecs (line 16)"
    );
    let (code, out, _) = vpcgate(&["explain", "examples/policy.toml", "172.20.1.1:80"]);
    assert_eq!(code, 1);
    assert_eq!(
        out,
        format!(
            "172.20.1.1:80/tcp → drop (reserved_range)\n  172.20.1.1 is inside reserved block 172.20.0.0/16 (reserved for zone cn-hangzhou-b, examples/policy.toml:11) (rule 4)\n  no policy change can allow it:\n    the provider reserves 172.20.0.0/16 in zone cn-hangzhou-b for the gateway itself; the backend must move to another block\n{ESSENTIALS}"
        )
    );
    // An IPv4-mapped IPv6 destination is what the kernel sends: IPv4.
    let (code, out, _) = vpcgate(&["explain", "examples/policy.toml", "[::ffff:172.20.1.1]:80"]);
    assert_eq!(
        (code, out.lines().next().unwrap()),
        (1, "172.20.1.1:80/tcp → drop (reserved_range)")
    );
    // A special-purpose destination: no rule may allow it, so no change is suggested.
    let (code, out, _) = vpcgate(&["explain", "examples/policy.toml", "169.254.169.254:80"]);
    assert_eq!(code, 1);
    assert!(
        out.contains("  no policy change can allow it:\n    169.254.169.254 is a special-purpose address (link-local (169.254.0.0/16, incl. the cloud metadata service 169.254.169.254)), never a VPC backend: `vpcgate check` refuses a backend there\n"),
        "{out}"
    );
    let (code, out, _) = vpcgate(&["explain", "examples/policy.toml", "[fd00:10::7]:8443"]);
    assert_eq!(
        (code, out.lines().next().unwrap()),
        (0, "[fd00:10::7]:8443/tcp → pass")
    );
}

#[test]
fn explain_usage_errors() {
    let (code, _, err) = vpcgate(&["explain", "examples/policy.toml", "10.0.3.7"]);
    assert_eq!(code, 2);
    assert!(err.contains("give a port: 10.0.3.7:80"), "{err}");
    let (code, _, err) = vpcgate(&[
        "explain",
        "examples/policy.toml",
        "10.0.3.7:80",
        "--proto",
        "icmp",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--proto icmp takes a bare address"), "{err}");
    let (code, _, err) = vpcgate(&["explain", "examples/broken.toml", "10.0.3.7:80"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("examples/broken.toml is invalid (5 errors)"),
        "{err}"
    );
}

/// `vpcgate ARGS --output json`: checks the exit status and parses the output.
fn json(args: &[&str], code: i32) -> serde_json::Value {
    let args: Vec<&str> = args.iter().copied().chain(["--output", "json"]).collect();
    let (status, out, err) = vpcgate(&args);
    assert_eq!(status, code, "{args:?}: {out}{err}");
    serde_json::from_str(&out).expect("json")
}

/// examples/policy.toml with its `host_essentials` and `flow_timeouts` lines replaced, written to a file
/// of its own; returns the path (absolute, as diagnostics and explanations name it).
fn example_with(name: &str, essentials: &str, timeouts: &str) -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let text = std::fs::read_to_string(format!("{root}/examples/policy.toml")).unwrap();
    let (a, b) = (
        "host_essentials = [\"dhcp\", \"mld\"]",
        "flow_timeouts = { tcp = \"1h\", tcp_closing = \"10s\", udp = \"60s\" }",
    );
    assert!(
        text.contains(a) && text.contains(b),
        "examples/policy.toml changed"
    );
    let path = std::env::temp_dir().join(format!("vpcgate-cli-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text.replace(a, essentials).replace(b, timeouts)).unwrap();
    path.display().to_string()
}

#[test]
fn check_says_when_host_essentials_are_off() {
    let summary = "valid (0 warnings): instance gw-hz-1 (vpc-integration, enforce), 2 authorizations, 1 upstream (2 nodes), 3 accessible blocks, 4 reserved blocks";
    let off = example_with("check-off", "host_essentials = []", "");
    let (code, out, _) = vpcgate(&["check", &off]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.lines().next().unwrap_or_default(),
        format!(
            "{off}: {summary}; host essentials: off (DHCP and MLD traffic is subject to the policy)"
        )
    );
    let v = json(&["check", &off], 0);
    assert_eq!(v["summary"]["host_essentials"], serde_json::json!([]));
    let mld = example_with("check-mld", "host_essentials = [\"mld\"]", "");
    let (code, out, _) = vpcgate(&["check", &mld]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.lines().next().unwrap_or_default(),
        format!("{mld}: {summary}; host essentials: mld (DHCP traffic is subject to the policy)")
    );
    let v = json(&["check", "examples/policy.toml"], 0);
    assert_eq!(
        v["summary"]["host_essentials"],
        serde_json::json!(["dhcp", "mld"])
    );
    for f in [off, mld] {
        std::fs::remove_file(f).unwrap();
    }
}

#[test]
fn explain_lists_host_essentials_and_flow_timeouts() {
    let v = json(&["explain", "examples/policy.toml", "10.0.3.7:80"], 0);
    assert_eq!(v["host_essentials"], serde_json::json!(["dhcp", "mld"]));
    assert_eq!(
        v["flow_timeouts"],
        serde_json::json!({"tcp": 3600, "tcp_closing": 10, "udp": 60})
    );
    let off = example_with(
        "explain-off",
        "host_essentials = []",
        "flow_timeouts = { tcp = \"2h\", udp = 30 }",
    );
    let (code, out, _) = vpcgate(&["explain", &off, "10.0.3.7:80"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.lines().last(),
        Some("  host essentials (rule 1): off (DHCP and MLD traffic is subject to the policy)")
    );
    let v = json(&["explain", &off, "10.0.3.7:80"], 0);
    assert_eq!(v["host_essentials"], serde_json::json!([]));
    assert_eq!(
        v["flow_timeouts"],
        serde_json::json!({"tcp": 7200, "tcp_closing": 10, "udp": 30})
    );
    let dhcp = example_with("explain-dhcp", "host_essentials = [\"dhcp\"]", "");
    let (code, out, _) = vpcgate(&["explain", &dhcp, "10.0.3.7:80"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.lines().last(),
        Some(
            "  host essentials (rule 1): dhcp (DHCPv4 client traffic (UDP 68 -> 67) and DHCPv6 client traffic (UDP 546 -> 547)); MLD traffic is subject to the policy"
        )
    );
    for f in [off, dhcp] {
        std::fs::remove_file(f).unwrap();
    }
}

#[test]
fn every_exit_2_path_prints_a_json_error_with_output_json() {
    let error = |args: &[&str], code_name: &str, message_part: &str| {
        let (code, out, err) = vpcgate(args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not JSON ({e}): {out:?}"));
        assert_eq!(v["error"]["code"], code_name, "{args:?}: {v}");
        let message = v["error"]["message"].as_str().expect("a message");
        assert!(message.contains(message_part), "{args:?}: {message}");
        // The same words on stderr for a human.
        assert!(err.contains(message), "{args:?}: {err}");
    };
    error(
        &["check", "no/such.toml", "--output", "json"],
        "unreadable_file",
        "cannot read no/such.toml",
    );
    error(
        &[
            "check",
            "examples/policy.toml",
            "--migrate-to",
            "no/other.toml",
            "--output",
            "json",
        ],
        "unreadable_file",
        "cannot read no/other.toml",
    );
    error(
        &["explain", "no/such.toml", "10.0.3.7:80", "--output", "json"],
        "unreadable_file",
        "cannot read no/such.toml",
    );
    error(
        &[
            "explain",
            "examples/broken.toml",
            "10.0.3.7:80",
            "--output",
            "json",
        ],
        "invalid_policy",
        "examples/broken.toml is invalid (5 errors)",
    );
    error(
        &[
            "explain",
            "examples/policy.toml",
            "10.0.3.7",
            "--output",
            "json",
        ],
        "bad_destination",
        "give a port: 10.0.3.7:80",
    );
    error(
        &[
            "explain",
            "examples/policy.toml",
            "010.000.003.007:80",
            "--output",
            "json",
        ],
        "bad_destination",
        "`010.000.003.007:80` has octets with leading zeros (some tools read those as octal): write 10.0.3.7:80",
    );
    // Text output keeps stdout empty on those paths.
    let (code, out, _) = vpcgate(&["check", "no/such.toml"]);
    assert_eq!((code, out.as_str()), (2, ""));
}

#[test]
fn control_characters_from_the_policy_are_escaped_in_text_output() {
    // A hostile value tries to clear the line and forge a "valid" verdict on a line of its own.
    let dir = std::env::temp_dir().join(format!("vpcgate-ctl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ctl.toml");
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/policy.toml"
    ))
    .unwrap()
    .replacen(
        "zone = \"cn-hangzhou-b\"",
        "zone = \"x\\u001b[2K\\rx.toml:1:1: valid\\nfake\"",
        1,
    );
    std::fs::write(&path, text).unwrap();
    let (code, out, _) = vpcgate(&["check", path.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(
        !out.chars().any(|c| c.is_control() && c != '\n'),
        "raw control characters in: {out:?}"
    );
    assert!(
        out.lines()
            .all(|l| !l.starts_with("x.toml:1:1: valid") && l != "fake"),
        "a forged line: {out}"
    );
    assert!(
        out.contains("\\u{1b}[2K\\rx.toml:1:1: valid\\nfake"),
        "{out}"
    );
}

#[test]
fn a_file_that_is_not_utf8_is_an_invalid_policy_with_a_position() {
    let dir = std::env::temp_dir().join(format!("vpcgate-utf8-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("latin1.toml");
    let text = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/policy.toml"
    ))
    .unwrap();
    // `name = "gw-hz-1"` on line 5, followed by a Latin-1 comment.
    let line = b"name = \"gw-hz-1\"";
    let at = text.windows(line.len()).position(|w| w == line).unwrap() + line.len();
    let mut bytes = text.clone();
    bytes.splice(at..at, *b" # caf\xe9");
    std::fs::write(&path, &bytes).unwrap();
    let path = path.to_str().unwrap().to_owned();
    let (code, out, _) = vpcgate(&["check", &path]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out,
        format!(
            "{path}:5:23: error: byte 0xe9 is not UTF-8: a policy file is UTF-8 text\n    fix: save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or remove the byte\n{path}: invalid: 1 error, 0 warnings\n"
        )
    );
    let v = json(&["check", &path], 1);
    assert_eq!(v["valid"], false);
    assert_eq!(v["errors"], 1);
    assert_eq!(
        (
            &v["diagnostics"][0]["line"],
            &v["diagnostics"][0]["column"],
            &v["diagnostics"][0]["severity"]
        ),
        (
            &serde_json::json!(5),
            &serde_json::json!(23),
            &serde_json::json!("error")
        )
    );
    // explain refuses it like any invalid policy.
    let v = json(&["explain", &path, "10.0.3.7:80"], 2);
    assert_eq!(v["error"]["code"], "invalid_policy");
    // A file that cannot be read at all stays a runtime error (exit 2), with the JSON error object.
    let unreadable = dir.join("a-directory.toml");
    std::fs::create_dir_all(&unreadable).unwrap();
    let v = json(&["check", unreadable.to_str().unwrap()], 2);
    assert_eq!(v["error"]["code"], "unreadable_file");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_help_lists_the_known_zones_by_region() {
    let (code, out, _) = vpcgate(&["check", "--help"]);
    assert_eq!(code, 0);
    for needle in [
        "Zones for `zone = \"...\"`",
        "  China (Hangzhou): cn-hangzhou-{b,d,e,f,g,h,i,j,k}\n",
        "  Japan (Tokyo): ap-northeast-1{a,b,c}\n",
        "  South Korea (Seoul): ap-northeast-2a\n",
        "Exit status: 0 valid",
    ] {
        assert!(
            out.contains(needle),
            "check --help lacks {needle:?}:\n{out}"
        );
    }
    // The unknown-zone error points there.
    let dir = std::env::temp_dir().join(format!("vpcgate-zone-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("zone.toml");
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/policy.toml"
    ))
    .unwrap()
    .replacen("zone = \"cn-hangzhou-b\"", "zone = \"ap-northeast-1d\"", 1);
    std::fs::write(&path, text).unwrap();
    let (code, out, _) = vpcgate(&["check", path.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("    fix: did you mean ap-northeast-1a, ap-northeast-1b, ap-northeast-1c? every known zone: `vpcgate check --help`"),
        "{out}"
    );
}

#[test]
fn explain_escapes_control_characters_it_echoes() {
    // Rule and upstream names are checked to plain characters, so the file's path is what can carry
    // control characters into explain's own lines (the detail names the rule's file:line).
    let dir = std::env::temp_dir().join(format!("vpcgate-ctl-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("x\u{1b}[2K\rok\nfake.toml");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/policy.toml"),
        &path,
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let (code, out, _) = vpcgate(&["explain", p, "10.0.3.7:80"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.chars().any(|c| c.is_control() && c != '\n'),
        "raw control characters in: {out:?}"
    );
    assert!(
        out.contains("x\\u{1b}[2K\\rok\\nfake.toml:33, verdict rule 5)"),
        "{out}"
    );
    assert_eq!(out.lines().count(), 3, "{out}");
    // A drop whose detail and suggestion name the file.
    let (code, out, _) = vpcgate(&["explain", p, "10.1.2.3:53", "--proto", "udp"]);
    assert_eq!(code, 1, "{out}");
    assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
    assert!(out.contains("\\nfake.toml:20, verdict rule 6)"), "{out}");
    // stderr of usage and runtime errors echoes arguments: escaped too (JSON is escaped by encoding).
    let (code, _, err) = vpcgate(&["explain", p, "10.0.3.7\u{1b}[2K:80"]);
    assert_eq!(code, 2);
    assert!(err.contains("`10.0.3.7\\u{1b}[2K:80` is not IP"), "{err:?}");
    let missing = dir.join("no\rsuch.toml");
    let (code, _, err) = vpcgate(&["check", missing.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("no\\rsuch.toml"), "{err:?}");
    assert!(!err.contains('\r'), "{err:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn explain_names_the_reserved_block_of_a_reserved_range_drop() {
    use serde_json::json;
    let v = json(&["explain", "examples/policy.toml", "172.20.1.1:80"], 1);
    assert_eq!(v["reason"], "reserved_range");
    assert_eq!(v["rule"], serde_json::Value::Null);
    assert_eq!(
        v["reserved_block"],
        json!({"cidr": "172.20.0.0/16", "source": "zone", "zone": "cn-hangzhou-b", "file": "examples/policy.toml", "line": 11})
    );
    assert_eq!(v["suggestion"]["kind"], "impossible");
    assert_eq!(v["suggestion"]["edits"], json!([]));
    let v = json(&["explain", "examples/policy.toml", "10.2.0.9:80"], 1);
    assert_eq!(
        v["reserved_block"],
        json!({"cidr": "10.2.0.0/16", "source": "explicit", "zone": null, "file": "examples/policy.toml", "line": 12})
    );
    // Other verdicts name no reserved block.
    let v = json(&["explain", "examples/policy.toml", "10.9.0.4:80"], 1);
    assert_eq!(v["reserved_block"], serde_json::Value::Null);
    let v = json(&["explain", "examples/policy.toml", "10.0.3.7:80"], 0);
    assert_eq!(v["reserved_block"], serde_json::Value::Null);
}

#[test]
fn explain_suggestions_are_edits_a_program_can_apply() {
    use serde_json::json;
    let suggestion = |args: &[&str]| json(args, 1)["suggestion"].clone();
    // An explicit reserved block: removing it is not enough, the rules must then allow the packet too.
    let s = suggestion(&["explain", "examples/policy.toml", "10.2.0.9:80"]);
    assert_eq!(s["kind"], "change");
    assert_eq!(
        s["edits"],
        json!([
            {"op": "remove_reserved", "cidr": "10.2.0.0/16", "line": 12},
            {"op": "add_accessible", "cidr": "10.2.0.9/32", "ports": ["80"], "protocols": ["tcp"], "to_fill": []},
        ])
    );
    assert_eq!(
        s["text"],
        "if the gateway may reach 10.2.0.9: remove the reserved block holding it, and allow it\nremove \"10.2.0.0/16\" from reserved_cidrs (line 12)\n[[accessible]]\ncidr = \"10.2.0.9/32\"\nports = [\"80\"]\nprotocols = [\"tcp\"]"
    );
    // Ping passes toward any address a rule covers: one port of one protocol, which the operator names.
    let s = suggestion(&[
        "explain",
        "examples/policy.toml",
        "10.9.0.4",
        "--proto",
        "icmp",
    ]);
    assert_eq!(
        s["edits"],
        json!([{"op": "add_accessible", "cidr": "10.9.0.4/32", "ports": ["<port>"], "protocols": ["tcp"], "to_fill": ["ports"]}])
    );
    // A port of a protocol the covering block lacks.
    let s = suggestion(&[
        "explain",
        "examples/policy.toml",
        "10.1.2.3:80",
        "--proto",
        "udp",
    ]);
    assert_eq!(
        s["edits"],
        json!([{"op": "add_protocol", "rule": {"kind": "accessible", "name": "10.1.0.0/16", "line": 20}, "protocol": "udp"}])
    );
    let s = suggestion(&["explain", "examples/dedicated.toml", "172.16.4.20:22"]);
    assert_eq!(
        s["edits"],
        json!([{"op": "add_port", "rule": {"kind": "authorization", "name": "billing-ecs", "line": 16}, "port": "22"}])
    );
    // Dedicated: the backend's VPC is the operator's to fill in, unless a rule covering it says.
    let s = suggestion(&["explain", "examples/dedicated.toml", "10.9.9.9:80"]);
    assert_eq!(
        s["edits"],
        json!([{"op": "add_authorization", "name": "allow-10-9-9-9-80", "vpc_id": "<VPC id of 10.9.9.9>", "address": "10.9.9.9", "ports": ["80"], "protocol": "tcp", "to_fill": ["vpc_id"]}])
    );
    let s = suggestion(&["explain", "examples/dedicated.toml", "172.16.4.21:8125"]);
    assert_eq!(
        s["edits"],
        json!([{"op": "add_authorization", "name": "allow-172-16-4-21-8125", "vpc_id": "vpc-uf6billing", "address": "172.16.4.21", "ports": ["8125"], "protocol": "tcp", "to_fill": []}])
    );
    let (_, out, _) = vpcgate(&["explain", "examples/dedicated.toml", "10.9.9.9:80"]);
    assert!(
        out.contains("\n    vpc_id = \"<VPC id of 10.9.9.9>\"   # fill in\n"),
        "{out}"
    );
}

#[test]
fn a_report_piped_into_a_reader_that_goes_away_ends_quietly() {
    use std::os::{
        fd::{FromRawFd, OwnedFd},
        unix::process::ExitStatusExt,
    };
    // A pipe whose reader is gone before vpcgate starts: its first write raises SIGPIPE, which ends the
    // process as it would `cat` (no panic, no stack trace).
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors were just created by pipe() and are owned here.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(reader);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vpcgate"))
        .args(["check", "examples/policy.toml"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .stdout(writer)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?} {err}",
        out.status
    );
}
