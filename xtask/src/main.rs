//! `cargo xtask`: the project's own automation (setup, build, test, demo). See README.md.

mod cpio;
mod deploy;
mod run;
mod setup;
mod test;
mod vm;

use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "vpcgate's build, test and setup tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

/// Options of the VM matrix.
#[derive(clap::Args)]
struct VmArgs {
    /// A kernel of the matrix (repeatable): a Debian package name (linux-image-cloud-amd64) or a vmlinuz
    /// path whose modules are /lib/modules/<release> [default: linux-image-cloud-amd64,
    /// linux-image-rt-amd64].
    #[arg(long = "kernel", value_name = "NAME|PATH")]
    kernels: Vec<String>,
    /// The modules directory of the (single) kernel given as a path, when its file name does not tell.
    #[arg(long, value_name = "DIR")]
    modules: Option<std::path::PathBuf>,
    /// Guest memory in MiB (the initramfs holds every test binary, unpacked in RAM).
    #[arg(long, default_value_t = 2048)]
    vm_memory: u32,
    /// Multiplies every time budget (boot, each test) for slower machines.
    #[arg(long, default_value_t = 1.0)]
    timeout_factor: f64,
}

impl VmArgs {
    fn options(self, only: Vec<String>, diff_packets: u64) -> vm::Options {
        vm::Options {
            kernels: self.kernels,
            modules: self.modules,
            only,
            diff_packets,
            memory_mib: self.vm_memory,
            timeout_factor: self.timeout_factor,
        }
    }
}

#[derive(Subcommand)]
enum Task {
    /// Make this (Debian) machine ready to build and test vpcgate: Debian packages, bpf-linker built against
    /// the LLVM of Debian's rustc, the `debian-bpf` rustup toolchain, bpffs and tracefs. Idempotent.
    Setup {
        /// Only report what is missing; change nothing (exit 1 if anything is).
        #[arg(long)]
        check: bool,
    },
    /// Build the kernel object and the `vpcgate` binary that embeds it.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Formatting, clippy (userspace and kernel crates), unit tests, BPF_PROG_TEST_RUN tests and the
    /// privileged network-namespace tests, then the same privileged tests on each kernel of the VM matrix
    /// (unless --no-vm). Needs root; never skips the privileged tier.
    Test {
        /// Do not run `setup` first.
        #[arg(long)]
        no_setup: bool,
        /// How long to fuzz the policy parser.
        #[arg(long, default_value_t = test::FUZZ_SECONDS)]
        fuzz_seconds: u32,
        /// Packets for the kernel-vs-reference differential test (e.g. 10000000 for the long run).
        #[arg(long, default_value_t = test::DIFF_PACKETS)]
        diff_packets: u64,
        /// Skip the VM matrix (the privileged tests on other kernels under QEMU); CI runs it.
        #[arg(long)]
        no_vm: bool,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// The privileged tests only: on this host's kernel, or with --vm on each kernel of the matrix under
    /// QEMU (TCG). Needs root.
    IntegrationTest {
        /// Boot each kernel under QEMU and run the tests there, instead of on this host's kernel.
        #[arg(long)]
        vm: bool,
        /// Run only these tests (repeatable or comma-separated): `preflight` (vpcgate preflight) and the
        /// test targets of tests/Cargo.toml.
        #[arg(long, value_name = "TEST", value_delimiter = ',')]
        only: Vec<String>,
        /// Packets for the differential test [default: 200000, on the host and in a VM].
        #[arg(long)]
        diff_packets: Option<u64>,
        /// Do not run `setup` first.
        #[arg(long)]
        no_setup: bool,
        #[command(flatten)]
        vm_args: VmArgs,
    },
    /// Show vpcgate on this host: build it, check and explain the example policy, run its preflight checks.
    Demo,
    /// Benchmarks: per-packet cost (BPF_PROG_TEST_RUN, hot and spread, 10 to 1M rules) beside the floor,
    /// a bare LPM trie, the minimal enforcer and xdp-filter; veth throughput (iperf3) beside no filter,
    /// nftables and iptables; apply, reload and check times and memory. Writes report.md, report.json and
    /// SVG plots to target/bench/. Needs root. The full run takes about 25 minutes, --quick under 3.
    Bench {
        #[command(flatten)]
        args: BenchArgs,
        /// Do not run `setup` first.
        #[arg(long)]
        no_setup: bool,
    },
    /// Validate the deployment files offline: the systemd unit (`systemd-analyze verify`) and the
    /// Kubernetes manifests (`kubernetes-validate --strict`, from PyPI into target/deploy-check/venv).
    CheckDeploy,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup { check } => setup::run(check),
        Task::Build { release } => setup::ensure().and_then(|()| run::build(release).map(|_| ())),
        Task::CheckDeploy => {
            vm::build_vpcgate("build vpcgate (release)").and_then(|b| deploy::check(&b))
        }
        Task::Test {
            no_setup,
            fuzz_seconds,
            diff_packets,
            no_vm,
            vm,
        } => test::run(
            !no_setup,
            fuzz_seconds,
            diff_packets,
            (!no_vm).then(|| vm.options(vec![], vm::VM_DIFF_PACKETS)),
        ),
        Task::IntegrationTest {
            vm,
            only,
            diff_packets,
            no_setup,
            vm_args,
        } => (if no_setup { Ok(()) } else { setup::ensure() }).and_then(|()| {
            if !vm && (!vm_args.kernels.is_empty() || vm_args.modules.is_some()) {
                anyhow::bail!("--kernel and --modules choose the kernels of --vm: add --vm");
            }
            if vm {
                vm::run(&vm_args.options(only, diff_packets.unwrap_or(vm::VM_DIFF_PACKETS)))
            } else {
                test::privileged(diff_packets.unwrap_or(test::DIFF_PACKETS), &only)
            }
        }),
        Task::Demo => demo(),
        Task::Bench { args, no_setup } => bench(&args, no_setup),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The lab demo (tests/bin/demo.rs): builds vpcgate and the demo, runs it as root.
fn demo() -> anyhow::Result<()> {
    setup::ensure()?;
    let bin = vm::build_vpcgate("build vpcgate (release)")?;
    let demo = vm::build_bin("vpcgate-lab", "vpcgate-demo", "build the demo (release)")?;
    run::step(
        "vpcgate-demo: the lab, the agent, probe --all, status, drops, then everything removed",
        run::cmd(&demo).env("VPCGATE_BIN", &bin),
    )
}

/// What `cargo xtask bench` hands to vpcgate-bench (which checks it).
#[derive(clap::Args)]
struct BenchArgs {
    /// Fewer sizes and shorter runs (under 3 minutes).
    #[arg(long)]
    quick: bool,
    /// Seed of the generated policies and packet draws (decimal or 0x hex) [default: fresh, printed].
    #[arg(long)]
    seed: Option<String>,
    /// Only these parts (comma-separated): per-packet, throughput, control.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Per-packet cost at these policy sizes only (rules, comma-separated), e.g. 100000.
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<String>,
    /// Throughput: runs per setup, test and round (pairs with the twin link for per-device setups).
    #[arg(long)]
    pairs: Option<String>,
    /// Throughput: only these setups, in this order (comma-separated), e.g.
    /// none,empty,minimal-1k,vpcgate-1k (`vpcgate-bench --help` lists them).
    #[arg(long, value_delimiter = ',')]
    setups: Vec<String>,
    /// Where the report goes [default: target/bench, which the README's report is taken from: give
    /// partial runs their own directory].
    #[arg(long)]
    out: Option<PathBuf>,
}

impl BenchArgs {
    /// vpcgate-bench's arguments besides `--vpcgate` (it runs in the workspace root: a relative `--out`
    /// is made absolute against this process's directory first).
    fn args(&self) -> Vec<OsString> {
        let out = match &self.out {
            Some(o) => std::path::absolute(o).unwrap_or_else(|_| o.clone()),
            None => run::root().join("target/bench"),
        };
        let mut a: Vec<OsString> = vec!["--out".into(), out.into()];
        if self.quick {
            a.push("--quick".into());
        }
        for (flag, value) in [
            ("--seed", self.seed.clone()),
            ("--pairs", self.pairs.clone()),
            ("--only", list(&self.only)),
            ("--sizes", list(&self.sizes)),
            ("--setups", list(&self.setups)),
        ] {
            if let Some(v) = value {
                a.push(flag.into());
                a.push(v.into());
            }
        }
        a
    }
}

/// A comma-separated list, None when empty.
fn list(v: &[String]) -> Option<String> {
    (!v.is_empty()).then(|| v.join(","))
}

/// `cargo xtask bench`: builds vpcgate and vpcgate-bench, runs the benchmarks as root.
fn bench(args: &BenchArgs, no_setup: bool) -> anyhow::Result<()> {
    let quick = args.quick;
    if !no_setup {
        setup::ensure()?;
    }
    let bin = vm::build_vpcgate("build vpcgate (release)")?;
    let bench = vm::build_bin(
        "vpcgate-bench",
        "vpcgate-bench",
        "build the benchmarks (release)",
    )?;
    let mut c = run::cmd(&bench);
    c.arg("--vpcgate").arg(&bin).args(args.args());
    run::step(
        if quick {
            "vpcgate-bench --quick: per-packet cost, throughput, control plane"
        } else {
            "vpcgate-bench: per-packet cost, throughput, control plane"
        },
        &mut c,
    )
}

#[cfg(test)]
mod tests {
    use super::BenchArgs;

    #[test]
    fn bench_hands_every_given_option_to_vpcgate_bench_and_nothing_else() {
        let args = |b: &BenchArgs| -> Vec<String> {
            b.args()
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect()
        };
        let bare = BenchArgs {
            quick: false,
            seed: None,
            only: vec![],
            sizes: vec![],
            pairs: None,
            setups: vec![],
            out: None,
        };
        let a = args(&bare);
        assert_eq!(a.len(), 2, "{a:?}");
        assert_eq!(a[0], "--out");
        assert!(a[1].ends_with("target/bench"), "{a:?}");
        let full = BenchArgs {
            quick: true,
            seed: Some("0x2a".into()),
            only: vec!["per-packet".into(), "throughput".into()],
            sizes: vec!["10".into(), "100000".into()],
            pairs: Some("3".into()),
            setups: vec!["none".into(), "vpcgate-1k".into()],
            out: Some("/tmp/b".into()),
        };
        assert_eq!(
            args(&full),
            [
                "--out",
                "/tmp/b",
                "--quick",
                "--seed",
                "0x2a",
                "--pairs",
                "3",
                "--only",
                "per-packet,throughput",
                "--sizes",
                "10,100000",
                "--setups",
                "none,vpcgate-1k",
            ]
        );
    }
}
