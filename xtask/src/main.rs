//! `cargo xtask`: the project's own automation (setup, build, test, demo). See README.md.

mod run;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "vpcgate's build, test and setup tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
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
    /// privileged network-namespace tests. Needs root; never skips the privileged tier.
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
    },
    /// Show vpcgate on this host: build it, check and explain the example policy, run its preflight checks.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup { check } => setup::run(check),
        Task::Build { release } => setup::ensure().and_then(|()| run::build(release).map(|_| ())),
        Task::Test {
            no_setup,
            fuzz_seconds,
            diff_packets,
        } => test::run(!no_setup, fuzz_seconds, diff_packets),
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

fn demo() -> anyhow::Result<()> {
    setup::ensure()?;
    let bin = run::build(false)?;
    run::step("vpcgate --help", run::cmd(&bin).arg("--help"))?;
    run::step(
        "vpcgate check examples/policy.toml",
        run::cmd(&bin).args(["check", "examples/policy.toml"]),
    )?;
    // Explain exits 1 for a drop: show both verdicts, and fail only on usage or runtime errors (2).
    for dst in ["10.0.3.7:80", "10.9.0.4:80", "172.20.1.1:80"] {
        eprintln!("\n==> vpcgate explain examples/policy.toml {dst}");
        let status = run::cmd(&bin)
            .args(["explain", "examples/policy.toml", dst])
            .status()?;
        anyhow::ensure!(
            status.code() != Some(2),
            "vpcgate explain failed ({status})"
        );
    }
    run::step("vpcgate preflight", run::cmd(&bin).arg("preflight"))?;
    Ok(())
}
