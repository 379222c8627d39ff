//! `cargo xtask test`: everything CI checks, in order, with a timing per phase.

use anyhow::{Result, bail};

use crate::{
    run::{Timings, cargo, cmd, step},
    setup,
};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The kernel crate, checked by clippy with the toolchain that builds it.
fn kernel_clippy() -> Result<()> {
    let mut c = if std::path::Path::new("/etc/debian_version").exists() {
        let mut c = cmd("rustup");
        c.args(["run", setup::DEBIAN_TOOLCHAIN, "cargo", "clippy"]);
        // aya-ebpf and the programs (`vpcgate`, for the slot's atomic exchange) use
        // #![feature(asm_experimental_arch)]: unstable features for those crates only.
        c.env("RUSTC_BOOTSTRAP", "aya_ebpf,aya_log_ebpf,vpcgate");
        c
    } else {
        let mut c = cmd("rustup");
        c.args(["run", "nightly", "cargo", "clippy", "-Z", "build-std=core"]);
        c
    };
    c.args([
        "--release",
        "--target",
        "bpfel-unknown-none",
        "--manifest-path",
        "ebpf/Cargo.toml",
    ])
    .args(["--target-dir", "target/ebpf-clippy", "--", "-D", "warnings"])
    .env_remove("RUSTUP_TOOLCHAIN")
    .env_remove("RUSTC")
    .env_remove("RUSTC_WRAPPER")
    .env_remove("RUSTC_WORKSPACE_WRAPPER");
    step("clippy, kernel crate (ebpf/)", &mut c)
}

/// Packets of the differential test (kernel vs reference verdict) by default.
pub const DIFF_PACKETS: u64 = 200_000;

/// How long `cargo xtask test` fuzzes the policy parser (`--fuzz-seconds`).
pub const FUZZ_SECONDS: u32 = 30;

/// The policy parser/validator/compiler under libFuzzer for a bounded time (nightly, no rust-src needed).
fn fuzz(seconds: u32) -> Result<()> {
    std::fs::create_dir_all(crate::run::root().join("fuzz/corpus/policy"))?;
    step(
        &format!("fuzz the policy parser for {seconds} s"),
        cmd("rustup")
            .args([
                "run",
                "nightly",
                "cargo",
                "fuzz",
                "run",
                "policy",
                "fuzz/corpus/policy",
                "examples",
                "--",
            ])
            .arg(format!("-max_total_time={seconds}"))
            .args([
                "-max_len=8192",
                "-dict=fuzz/policy.dict",
                "-print_final_stats=1",
            ])
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTC_WORKSPACE_WRAPPER"),
    )
}

/// The privileged tier needs root (BPF, network namespaces). It never skips: without root it fails.
/// `only` names tests of the VM list (`preflight` and the lab's test targets); empty: all of the lab's.
pub fn privileged(diff_packets: u64, only: &[String]) -> Result<()> {
    if !is_root() {
        bail!(
            "the privileged tests (BPF_PROG_TEST_RUN, network namespaces) need root and were NOT run; \
             rerun as root: `sudo -E cargo xtask test`"
        );
    }
    let selected = crate::vm::select(only)?;
    let bin = crate::vm::build_vpcgate("build vpcgate (release) for the lab")?;
    if selected.iter().any(|t| t.name == "preflight") && !only.is_empty() {
        step("vpcgate preflight", cmd(&bin).arg("preflight"))?;
    }
    let mut c = cargo();
    // Release: the differential test runs hundreds of thousands of packets through both sides.
    c.args(["test", "--release", "--package", "vpcgate-lab"]);
    if !only.is_empty() {
        let lab: Vec<_> = selected.iter().filter(|t| t.name != "preflight").collect();
        if lab.is_empty() {
            return Ok(());
        }
        for t in lab {
            c.args(["--test", t.name]);
        }
    }
    step(
        "privileged tests: parser and differential tests (BPF_PROG_TEST_RUN), network-namespace lab",
        c.args(["--", "--test-threads=1", "--nocapture"])
            .env("VPCGATE_DIFF_PACKETS", diff_packets.to_string())
            .env("VPCGATE_BIN", bin),
    )
}

/// `vm`: the VM matrix's options when it runs after the host's tests (CI's default).
pub fn run(
    with_setup: bool,
    fuzz_seconds: u32,
    diff_packets: u64,
    vm: Option<crate::vm::Options>,
) -> Result<()> {
    let mut t = Timings::default();
    let result = (|| {
        if with_setup {
            t.phase("setup", setup::ensure)?;
        }
        t.phase("rustfmt", || {
            step(
                "rustfmt, workspace",
                cargo().args(["fmt", "--all", "--", "--check"]),
            )?;
            step(
                "rustfmt, kernel crate",
                cargo().args(["fmt", "--manifest-path", "ebpf/Cargo.toml", "--", "--check"]),
            )
        })?;
        t.phase("clippy (userspace)", || {
            step(
                "clippy, userspace crates",
                cargo().args([
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]),
            )
        })?;
        t.phase("clippy (kernel)", kernel_clippy)?;
        t.phase("unit tests", || {
            step(
                "unit tests",
                cargo().args(["test", "--workspace", "--exclude", "vpcgate-lab"]),
            )
        })?;
        t.phase("fuzz (policy)", || fuzz(fuzz_seconds))?;
        t.phase("deployment files", || {
            let bin =
                crate::vm::build_vpcgate("build vpcgate (release) for the deployment checks")?;
            crate::deploy::check(&bin)
        })?;
        t.phase("privileged tests", || privileged(diff_packets, &[]))?;
        match &vm {
            Some(opts) => t.phase("VM matrix (other kernels, QEMU)", || crate::vm::run(opts)),
            None => {
                eprintln!("\n==> VM matrix skipped (--no-vm)");
                Ok(())
            }
        }
    })();
    t.print();
    result
}
