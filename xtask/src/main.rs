//! `cargo xtask`: the project's own automation (setup, build, test, demo). See README.md.

mod cpio;
mod deploy;
mod run;
mod setup;
mod test;
mod vm;

use std::process::ExitCode;

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
