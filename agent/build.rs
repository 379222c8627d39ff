//! Builds the kernel programs (`ebpf/`) for `bpfel-unknown-none` and leaves the object in `OUT_DIR`,
//! where `src/datapath` embeds it. See ../shared/TOOLCHAIN.md for why this is not a plain dependency:
//! the kernel side needs a `core` for the BPF target, which this machine kind gets from Debian's rustc
//! (`rustup toolchain link debian-bpf /usr`), while a laptop with nightly + rust-src uses `-Z build-std`.
//!
//! `VPCGATE_EBPF_OBJ=/path/to/object` skips the build and embeds that object instead.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, exit},
};

const SETUP_HINT: &str = "run `cargo xtask setup` (as root, on Debian) to install the kernel-side toolchain, \
     or set VPCGATE_EBPF_OBJ to a prebuilt object";

/// The toolchain is missing: say how to install it.
fn fail(msg: &str) -> ! {
    println!("cargo::error=vpcgate: cannot build the kernel programs: {msg}; {SETUP_HINT}");
    exit(1)
}

/// The toolchain is there but the kernel crate did not build: its errors are above.
fn build_failed(msg: &str) -> ! {
    println!(
        "cargo::error=vpcgate: the kernel crate (ebpf/) failed to build: {msg}; its compiler errors are above"
    );
    exit(1)
}

/// How the kernel crate gets its `core` for bpfel-unknown-none.
enum Toolchain {
    /// Debian's rustc (linked into rustup as `debian-bpf`) ships a prebuilt bpf `core`.
    DebianBpf,
    /// A nightly with rust-src builds `core` itself.
    NightlyBuildStd,
}

fn rustup_sysroot(toolchain: &str) -> Option<PathBuf> {
    let out = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn detect() -> Result<Toolchain, String> {
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err("bpf-linker is not on PATH".into());
    }
    if let Some(sysroot) = rustup_sysroot("debian-bpf")
        && sysroot.join("lib/rustlib/bpfel-unknown-none/lib").is_dir()
    {
        return Ok(Toolchain::DebianBpf);
    }
    if let Some(sysroot) = rustup_sysroot("nightly")
        && sysroot.join("lib/rustlib/src/rust/library/core").is_dir()
    {
        return Ok(Toolchain::NightlyBuildStd);
    }
    Err(
        "neither the `debian-bpf` rustup toolchain with a prebuilt bpfel-unknown-none core \
         (Debian package libstd-rust-web-dev-bpf) nor a nightly toolchain with rust-src was found"
            .into(),
    )
}

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let root = manifest_dir
        .parent()
        .unwrap_or(Path::new(".."))
        .to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default());
    let dest = out_dir.join("vpcgate.bpf.o");

    println!("cargo::rerun-if-env-changed=VPCGATE_EBPF_OBJ");
    if let Some(obj) = env::var_os("VPCGATE_EBPF_OBJ") {
        println!("cargo::rerun-if-changed={}", Path::new(&obj).display());
        if let Err(e) = std::fs::copy(&obj, &dest) {
            fail(&format!(
                "VPCGATE_EBPF_OBJ={}: {e}",
                Path::new(&obj).display()
            ));
        }
        return;
    }
    for dir in [
        "ebpf/src",
        "ebpf/Cargo.toml",
        "ebpf/Cargo.lock",
        "common/src",
        "common/Cargo.toml",
    ] {
        println!("cargo::rerun-if-changed={}", root.join(dir).display());
    }

    let toolchain = detect().unwrap_or_else(|e| fail(&e));
    let target_dir = root.join("target/ebpf");
    let mut cmd = Command::new("rustup");
    // Start from a clean slate: cargo exports variables for *this* build (RUSTC, wrappers such as
    // clippy-driver, host RUSTFLAGS, the rustup toolchain) that must not leak into the BPF build.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || key == "RUSTFLAGS"
            || key == "RUSTDOC"
            || key == "RUSTUP_TOOLCHAIN"
        {
            cmd.env_remove(&*key);
        }
    }
    match toolchain {
        Toolchain::DebianBpf => {
            cmd.args(["run", "debian-bpf", "cargo", "build"]);
            // aya-ebpf and the programs (the `vpcgate` crate, for the scratch slot's atomic exchange) use
            // #![feature(asm_experimental_arch)]: allow unstable features for those crates only.
            cmd.env("RUSTC_BOOTSTRAP", "aya_ebpf,aya_log_ebpf,vpcgate");
        }
        Toolchain::NightlyBuildStd => {
            cmd.args(["run", "nightly", "cargo", "build", "-Z", "build-std=core"]);
        }
    }
    cmd.args([
        "--release",
        "--target",
        "bpfel-unknown-none",
        "--manifest-path",
    ])
    .arg(root.join("ebpf/Cargo.toml"))
    .arg("--target-dir")
    .arg(&target_dir)
    // BTF gives the verifier log source lines and lets the loader describe maps.
    // -disable-block-placement: LLVM otherwise lays a loop's latch out just before its header and
    // enters the loop by a jump to the header, so the back-edge is a plain fall-through, which
    // older kernels refuse ("back-edge from insn N to N+1" on Debian's 6.1; 6.18 accepts it).
    // This is the only place the flag is set; tests/cfg61.rs replays 6.1's check on the embedded
    // object, so losing it fails `cargo test` without a 6.1 VM.
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        "-Cdebuginfo=2\x1f-Clink-arg=--btf\x1f-Clink-arg=--llvm-args=-disable-block-placement",
    );
    // Build-script stdout is parsed for cargo directives: keep the nested build's output on stderr.
    cmd.stdout(std::io::stderr());
    let status = cmd
        .status()
        .unwrap_or_else(|e| fail(&format!("cannot run rustup: {e}")));
    if !status.success() {
        build_failed(&format!(
            "cargo build --target bpfel-unknown-none exited with {status}"
        ));
    }
    // The datapath (embedded) and the benchmark's baselines (`BENCH_OBJECT_PATH`, read at run time).
    for (bin, to) in [
        ("vpcgate", dest.clone()),
        ("vpcgate-bench", out_dir.join("vpcgate-bench.bpf.o")),
    ] {
        let built = target_dir.join("bpfel-unknown-none/release").join(bin);
        if let Err(e) = std::fs::copy(&built, &to) {
            fail(&format!("copying {}: {e}", built.display()));
        }
    }
}
