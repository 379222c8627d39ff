//! `vpcgate preflight`: can this host run vpcgate?

use std::path::{Path, PathBuf};

use aya::{
    maps::MapType,
    programs::{ProgramType, TestRun, TestRunOptions},
    sys::{BpfHelper, is_helper_supported, is_map_supported},
};
use serde::Serialize;

use super::{EXIT_ERROR, EXIT_FAILED, EXIT_OK, Output};
use crate::datapath::{
    self, Datapath,
    netdev::{self, NativeXdp},
};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Checks, in order: kernel, BTF, bpffs, how TC programs attach (tcx from 6.6, clsact before), the map\n\
    types and helpers the programs use (ring buffer for drop events, map-in-map for the swap's wait, socket\n\
    lookups from XDP), every program through the verifier, a test frame through BPF_PROG_TEST_RUN, and with\n\
    --config how XDP will attach to each of the policy's interfaces (native in the driver, or generic).\n\
    Nothing is attached and nothing is changed.\n\n\
    Examples:\n  vpcgate preflight\n  vpcgate preflight --config /etc/vpcgate/policy.toml --output json\n\n\
    Exit status: 0 every check passed, 1 a check failed, 2 the report could not be written."
)]
pub struct Args {
    /// Also check the interfaces this policy names: they exist here, carry Ethernet, and whether XDP will
    /// run in their driver (native) or in the generic path.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Report format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Serialize, Default)]
struct Check {
    check: &'static str,
    ok: bool,
    detail: String,
    /// `xdp` checks with --config: the interface checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    interface: Option<String>,
    /// `xdp` checks with --config: where XDP will run there: `native`, `generic`, or `at_attach` (this
    /// kernel cannot tell before attaching).
    #[serde(skip_serializing_if = "Option::is_none")]
    xdp_mode: Option<&'static str>,
}

#[derive(Serialize)]
struct Report {
    ok: bool,
    checks: Vec<Check>,
}

/// A minimal Ethernet + IPv4 + UDP frame (10.0.0.1:1000 -> 10.0.0.2:53).
const TEST_FRAME: [u8; 42] = [
    0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00, // Ethernet
    0x45, 0, 0, 28, 0, 1, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2, // IPv4
    0x03, 0xe8, 0, 53, 0, 8, 0, 0, // UDP
];

fn checks(config: Option<&Path>) -> Vec<Check> {
    let mut checks = Vec::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease");
    checks.push(Check {
        check: "kernel",
        ok: release.is_ok(),
        detail: match &release {
            Ok(v) => v.trim().to_owned(),
            Err(e) => format!("cannot read /proc/sys/kernel/osrelease: {e}"),
        },
        ..Default::default()
    });
    checks.push(Check {
        check: "tc_attach",
        ok: true,
        detail: if datapath::has_tcx() {
            "tcx: TC egress is a link placed first in each interface's egress chain".into()
        } else {
            "clsact (no tcx before 6.6): TC egress is a direct-action cls_bpf filter at priority 1 on a \
             clsact qdisc, added when missing"
                .into()
        },
        ..Default::default()
    });
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    checks.push(Check {
        check: "btf",
        ok: btf,
        detail: if btf {
            "/sys/kernel/btf/vmlinux present".into()
        } else {
            "/sys/kernel/btf/vmlinux missing: the kernel lacks CONFIG_DEBUG_INFO_BTF".into()
        },
        ..Default::default()
    });
    checks.push(bpffs());
    checks.extend(features());
    match Datapath::load() {
        Ok(mut dp) => {
            checks.push(Check {
                check: "verifier",
                ok: true,
                detail: format!(
                    "tc egress, xdp ingress and xdp forward programs loaded (instructions verified: {}; limit 1000000)",
                    dp.verified_instructions()
                        .iter()
                        .map(|(name, n)| format!(
                            "{name} {}",
                            n.map_or("unknown".to_owned(), |n| n.to_string())
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                ..Default::default()
            });
            let tc = dp.tc_egress().ok().map(|p| run_frame(p));
            let xdp = dp.xdp_ingress().ok().map(|p| run_frame(p));
            let fwd = dp.xdp_forward().ok().map(|p| run_frame(p));
            // No policy is applied to this fresh object: the enforcing programs must fail closed
            // (TC_ACT_SHOT 2, XDP_DROP 1) and the observing XDP program must pass (XDP_PASS 2).
            let ok = matches!(tc, Some(Ok(2)))
                && matches!(xdp, Some(Ok(2)))
                && matches!(fwd, Some(Ok(1)));
            let detail = if ok {
                "without a policy tc egress and xdp forward fail closed and xdp ingress passes a UDP test \
                 frame (BPF_PROG_TEST_RUN)"
                    .to_owned()
            } else {
                format!(
                    "unexpected result for a UDP test frame without a policy: tc egress {tc:?} (want 2, \
                     shot), xdp forward {fwd:?} (want 1, drop), xdp ingress {xdp:?} (want 2, pass)"
                )
            };
            checks.push(Check {
                check: "test_run",
                ok,
                detail,
                ..Default::default()
            });
            // Diagnostics: the skb:kfree_skb program (probe, drops --kernel) with this kernel's layout.
            checks.push(match dp.load_kernel_drops() {
                Ok(format) => Check {
                    check: "kernel_drops",
                    ok: true,
                    detail: format!(
                        "skb:kfree_skb program loaded ({} instructions verified; sk_buff offsets from BTF): probe and drops --kernel name this host's drops with its {} reason names{}",
                        dp.kernel_drops_instructions()
                            .map_or("unknown".to_owned(), |n| n.to_string()),
                        format.reasons.len(),
                        format
                            .code("NEIGH_FAILED")
                            .map(|c| format!(" (e.g. NEIGH_FAILED = {c})"))
                            .unwrap_or_default()
                    ),
                    ..Default::default()
                },
                Err(e) => Check {
                    check: "kernel_drops",
                    ok: false,
                    detail: e.to_string(),
                    ..Default::default()
                },
            });
        }
        Err(e) => checks.push(Check {
            check: "verifier",
            ok: false,
            detail: e.to_string(),
            ..Default::default()
        }),
    }
    if let Some(path) = config {
        checks.extend(xdp_interfaces(path));
    } else {
        checks.push(Check {
            check: "xdp",
            ok: true,
            detail: "native in the driver where it supports XDP, generic otherwise; \
                     --config FILE tells for the policy's interfaces"
                .into(),
            ..Default::default()
        });
    }
    checks
}

/// The map types and helpers the programs rely on, each probed on its own (a minimal map or program per
/// probe) so a missing one is named rather than buried in a verifier log.
fn features() -> Vec<Check> {
    let map = |t: MapType| is_map_supported(t).map_err(|e| e.to_string());
    let mut checks = Vec::new();
    checks.push(match map(MapType::RingBuf) {
        Ok(true) => Check {
            check: "ring_buffer",
            ok: true,
            detail: "BPF_MAP_TYPE_RINGBUF: drop events reach the agent through a ring buffer"
                .into(),
            ..Default::default()
        },
        Ok(false) => Check {
            check: "ring_buffer",
            ok: false,
            detail:
                "BPF_MAP_TYPE_RINGBUF missing (Linux 5.8 added it): drop events cannot be reported"
                    .into(),
            ..Default::default()
        },
        Err(e) => Check {
            check: "ring_buffer",
            ok: false,
            detail: format!("probe failed: {e}"),
            ..Default::default()
        },
    });
    // The swap waits for packets in flight by updating a map-in-map slot (an RCU grace period): probe the
    // type, then do exactly that once.
    checks.push(match map(MapType::ArrayOfMaps) {
        Ok(true) => match datapath::barrier_probe() {
            Ok(took) => Check {
                check: "map_in_map",
                ok: true,
                detail: format!(
                    "BPF_MAP_TYPE_ARRAY_OF_MAPS: a policy swap waits out packets in flight by updating \
                     a slot (an RCU grace period; {} µs here)",
                    took.as_micros()
                ),
                ..Default::default()
            },
            Err(e) => Check {
                check: "map_in_map",
                ok: false,
                detail: format!("the swap's barrier failed: {e}"),
                ..Default::default()
            },
        },
        Ok(false) => Check {
            check: "map_in_map",
            ok: false,
            detail: "BPF_MAP_TYPE_ARRAY_OF_MAPS missing: a swap could not wait for packets in flight"
                .into(),
            ..Default::default()
        },
        Err(e) => Check {
            check: "map_in_map",
            ok: false,
            detail: format!("probe failed: {e}"),
            ..Default::default()
        },
    });
    let types = [
        (MapType::LpmTrie, "LPM_TRIE"),
        (MapType::Hash, "HASH"),
        (MapType::Array, "ARRAY"),
        (MapType::PerCpuArray, "PERCPU_ARRAY"),
        (MapType::PerCpuHash, "PERCPU_HASH"),
        (MapType::LruHash, "LRU_HASH"),
        (MapType::LruPerCpuHash, "LRU_PERCPU_HASH"),
    ];
    let missing: Vec<String> = types
        .iter()
        .filter_map(|&(t, name)| match map(t) {
            Ok(true) => None,
            Ok(false) => Some(format!("{name} missing")),
            Err(e) => Some(format!("{name}: probe failed: {e}")),
        })
        .collect();
    checks.push(Check {
        check: "map_types",
        ok: missing.is_empty(),
        detail: if missing.is_empty() {
            format!(
                "{} (policy tries, flows, counters)",
                types.map(|(_, n)| n).join(", ")
            )
        } else {
            missing.join("; ")
        },
        ..Default::default()
    });
    let helpers = [
        (BpfHelper::BPF_FUNC_skc_lookup_tcp, "bpf_skc_lookup_tcp"),
        (BpfHelper::BPF_FUNC_sk_lookup_udp, "bpf_sk_lookup_udp"),
        (BpfHelper::BPF_FUNC_sk_release, "bpf_sk_release"),
    ];
    let missing: Vec<String> = helpers
        .iter()
        .filter_map(
            |&(h, name)| match is_helper_supported(ProgramType::Xdp, h) {
                Ok(true) => None,
                Ok(false) => Some(format!("{name} missing from XDP")),
                Err(e) => Some(format!("{name}: probe failed: {e}")),
            },
        )
        .collect();
    checks.push(Check {
        check: "socket_lookup",
        ok: missing.is_empty(),
        detail: if missing.is_empty() {
            "bpf_skc_lookup_tcp, bpf_sk_lookup_udp and bpf_sk_release from XDP: inbound packets are \
             recorded as flows only when a local socket would take them"
                .into()
        } else {
            missing.join("; ")
        },
        ..Default::default()
    });
    checks
}

/// One check per interface the policy names (the ENI, then the forward interfaces): present in this
/// network namespace, Ethernet, and where XDP will run.
fn xdp_interfaces(path: &Path) -> Vec<Check> {
    let checked = match crate::policy::load(path) {
        Ok(c) => c,
        Err(e) => {
            return vec![Check {
                check: "policy",
                ok: false,
                detail: format!("cannot read {}: {e}", path.display()),
                ..Default::default()
            }];
        }
    };
    let (Some(policy), Some(_)) = (&checked.policy, &checked.compiled) else {
        return vec![Check {
            check: "policy",
            ok: false,
            detail: format!(
                "{} is invalid ({} errors): `vpcgate check {}` lists them",
                path.display(),
                checked.errors(),
                path.display()
            ),
            ..Default::default()
        }];
    };
    let instance = &policy.instance;
    std::iter::once((&instance.interface, "ENI, observe"))
        .chain(
            instance
                .forward_interfaces
                .iter()
                .map(|f| (f, "forward, enforce")),
        )
        .map(|(name, role)| xdp_interface(name, role, role.starts_with("forward")))
        .collect()
}

fn xdp_interface(name: &str, role: &str, forward: bool) -> Check {
    let check = |ok: bool, mode: Option<&'static str>, detail: String| Check {
        check: "xdp",
        ok,
        detail,
        interface: Some(name.to_owned()),
        xdp_mode: mode,
    };
    let index = match datapath::ifindex(name) {
        Ok(i) => i,
        Err(e) => return check(false, None, format!("{name} ({role}): {e}")),
    };
    if let Err(e) = datapath::require_ethernet(name) {
        return check(false, None, format!("{name} ({role}): {e}"));
    }
    if forward && let Err(e) = datapath::require_unstacked(name, index) {
        return check(false, None, format!("{name} ({role}): {e}"));
    }
    let driver = netdev::driver(name).unwrap_or_else(|| "unknown".into());
    let at = format!("{name} ({role}; driver {driver})");
    match netdev::native_xdp(index) {
        Ok(NativeXdp::Supported) => check(
            true,
            Some("native"),
            format!(
                "{at}: native XDP, advertised by the driver (an attach can still be refused, e.g. for an \
                 MTU the driver's XDP cannot take: run then uses generic XDP and logs why)"
            ),
        ),
        Ok(NativeXdp::Unsupported) => check(
            true,
            Some("generic"),
            format!(
                "{at}: generic XDP: the driver has no native XDP, so the program runs once the kernel \
                 has built the skb (same verdicts, more cost per packet)"
            ),
        ),
        Ok(NativeXdp::Unknown) => check(
            true,
            Some("at_attach"),
            format!(
                "{at}: decided at attach: this kernel cannot report XDP features (the netdev netlink \
                 family came in 6.3); `run` tries native first, falls back to generic and logs the mode"
            ),
        ),
        Err(e) => check(
            false,
            None,
            format!("{at}: cannot ask the kernel for its XDP features: {e}"),
        ),
    }
}

/// Whether bpffs (where the daemon pins programs, links and maps) is mounted at /sys/fs/bpf.
fn bpffs() -> Check {
    let mounted = datapath::pin::bpffs_mounted();
    Check {
        check: "bpffs",
        ok: mounted,
        detail: if mounted {
            "mounted at /sys/fs/bpf".into()
        } else {
            "not mounted at /sys/fs/bpf (pinned state lives there): `mount -t bpf bpf /sys/fs/bpf`"
                .into()
        },
        ..Default::default()
    }
}

fn run_frame<
    P: TestRun<Opts<'static> = TestRunOptions<'static>, Result = aya::programs::TestRunResult>,
>(
    prog: &P,
) -> Result<u32, String> {
    let opts = TestRunOptions {
        data_in: Some(&TEST_FRAME),
        ..TestRunOptions::new()
    };
    prog.test_run(opts)
        .map(|r| r.return_value)
        .map_err(|e| e.to_string())
}

pub fn run(args: &Args) -> u8 {
    if let Some(path) = &args.config
        && let Err(e) = std::fs::read(path)
    {
        return super::fail(
            args.output,
            "unreadable_file",
            format!("cannot read {}: {e}", path.display()),
        );
    }
    let checks = checks(args.config.as_deref());
    let report = Report {
        ok: checks.iter().all(|c| c.ok),
        checks,
    };
    match args.output {
        Output::Json => match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("vpcgate: {e}");
                return EXIT_ERROR;
            }
        },
        Output::Text => {
            for c in &report.checks {
                println!(
                    "{} {:<13} {}",
                    if c.ok { "✓" } else { "✗" },
                    c.check,
                    c.detail
                );
            }
        }
    }
    if report.ok { EXIT_OK } else { EXIT_FAILED }
}
