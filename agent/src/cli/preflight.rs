//! `vpcgate preflight`: can this host run vpcgate?

use std::path::Path;

use aya::programs::{TestRun, TestRunOptions};
use serde::Serialize;

use super::{EXIT_ERROR, EXIT_FAILED, EXIT_OK, Output};
use crate::datapath::Datapath;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Report format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Serialize)]
struct Check {
    check: &'static str,
    ok: bool,
    detail: String,
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

fn checks() -> Vec<Check> {
    let mut checks = Vec::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease");
    checks.push(Check {
        check: "kernel",
        ok: release.is_ok(),
        detail: match &release {
            Ok(v) => format!(
                "{}; tc programs attach via {}",
                v.trim(),
                if crate::datapath::has_tcx() {
                    "tcx"
                } else {
                    "clsact"
                }
            ),
            Err(e) => format!("cannot read /proc/sys/kernel/osrelease: {e}"),
        },
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
    });
    checks.push(bpffs());
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
            });
            let tc = dp.tc_egress().ok().map(|p| run_frame(p));
            let xdp = dp.xdp_ingress().ok().map(|p| run_frame(p));
            // No policy is applied to this fresh object: TC egress must fail closed (TC_ACT_SHOT, 2) and the
            // observing XDP program must pass (XDP_PASS, 2).
            let ok = matches!(tc, Some(Ok(2))) && matches!(xdp, Some(Ok(2)));
            let detail = if ok {
                "without a policy tc egress fails closed and xdp ingress passes a UDP test frame (BPF_PROG_TEST_RUN)"
                    .to_owned()
            } else {
                format!("unexpected result for a UDP test frame: tc egress {tc:?}, xdp {xdp:?}")
            };
            checks.push(Check {
                check: "test_run",
                ok,
                detail,
            });
        }
        Err(e) => checks.push(Check {
            check: "verifier",
            ok: false,
            detail: e.to_string(),
        }),
    }
    checks
}

/// Whether bpffs (where the daemon pins programs, links and maps) is mounted at /sys/fs/bpf.
fn bpffs() -> Check {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let path = c"/sys/fs/bpf";
    // SAFETY: statfs fills the zeroed struct for a NUL-terminated path.
    let mounted = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    };
    Check {
        check: "bpffs",
        ok: mounted,
        detail: if mounted {
            "mounted at /sys/fs/bpf".into()
        } else {
            "not mounted at /sys/fs/bpf (pinned state lives there): `mount -t bpf bpf /sys/fs/bpf`"
                .into()
        },
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
    let checks = checks();
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
                    "{} {:<10} {}",
                    if c.ok { "✓" } else { "✗" },
                    c.check,
                    c.detail
                );
            }
        }
    }
    if report.ok { EXIT_OK } else { EXIT_FAILED }
}
