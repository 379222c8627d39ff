//! `cargo xtask setup`: makes a Debian machine ready to build and test vpcgate, idempotently.
//!
//! The verified path (../shared/TOOLCHAIN.md): Debian's rustc (`rustc-web`) ships a prebuilt `core` for
//! bpfel-unknown-none (`libstd-rust-web-dev-bpf`); bpf-linker must be built against the same LLVM major
//! version as that rustc; rustup gets a `debian-bpf` name for it. Where a machine has nightly with rust-src
//! instead, the standard aya path (`-Z build-std=core`) is used and only bpf-linker is needed.

use std::{fs, path::Path};

use anyhow::{Result, bail};

use crate::run::{cmd, output, step};

/// Debian packages, and why each is needed.
pub const PACKAGES: &[(&str, &str)] = &[
    (
        "rustc-web",
        "Debian's rustc, whose sysroot has a core for bpfel-unknown-none",
    ),
    ("cargo-web", "cargo for Debian's rustc"),
    (
        "libstd-rust-web-dev-bpf",
        "the prebuilt core/alloc for bpfel-unknown-none",
    ),
    ("rust-web-clippy", "clippy for the kernel crate"),
    ("libzstd-dev", "bpf-linker's build"),
    ("zlib1g-dev", "bpf-linker's build"),
    ("iproute2", "network namespaces and veth pairs for the lab"),
    (
        "systemd",
        "systemd-analyze verify for deploy/systemd/vpcgate.service",
    ),
    (
        "python3-venv",
        "a virtualenv for kubernetes-validate (PyPI), which checks deploy/kubernetes",
    ),
    ("iputils-ping", "ICMP traffic in the lab"),
    (
        "nftables",
        "the lab's security groups: nft drops or rejects the gateway's SYNs in the VPC namespace",
    ),
    (
        "xdp-tools",
        "benchmarks: xdp-filter, the peer whose per-packet cost vpcgate is measured against",
    ),
    (
        "iperf3",
        "benchmarks: TCP and small-packet UDP throughput over the lab's veth",
    ),
    (
        "iptables",
        "benchmarks: linear iptables rule sets, a baseline for throughput",
    ),
    (
        "bpftool",
        "benchmarks: reading the programs' and maps' kernel state",
    ),
    (
        "linux-perf",
        "benchmarks: where each program's time goes (perf samples per kernel symbol)",
    ),
    (
        "qemu-system-x86",
        "the VM matrix: other kernels booted under QEMU (TCG)",
    ),
    (
        "busybox-static",
        "the VM matrix: the initramfs's shell and tools",
    ),
    (
        "binutils",
        "the VM matrix: objcopy strips debug info from the binaries packed into the initramfs",
    ),
    (
        "linux-image-cloud-amd64",
        "the VM matrix: Debian's 6.1 LTS cloud kernel (clsact instead of tcx, modules for veth/tc)",
    ),
    (
        "linux-image-rt-amd64",
        "the VM matrix: Debian's 6.1 LTS PREEMPT_RT kernel (BPF programs can be preempted)",
    ),
];

/// The toolchain name rustup gets for Debian's rustc.
pub const DEBIAN_TOOLCHAIN: &str = "debian-bpf";
const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn is_debian() -> bool {
    Path::new("/etc/debian_version").exists()
}

fn installed(package: &str) -> bool {
    output(cmd("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|s| s.contains("install ok installed"))
}

/// LLVM major version of a rustc, from its `-vV` output (`c` runs that rustc).
fn llvm_major(c: &mut std::process::Command) -> Option<u32> {
    let v = output(c.arg("-vV"))?;
    let line = v.lines().find_map(|l| l.strip_prefix("LLVM version: "))?;
    line.split('.').next()?.trim().parse().ok()
}

fn bpf_linker_path() -> Option<String> {
    output(cmd("sh").args(["-c", "command -v bpf-linker"])).map(|s| s.trim().to_owned())
}

/// LLVM major version bpf-linker is linked against (its libLLVM.so.N dependency).
fn bpf_linker_llvm_major(path: &str) -> Option<u32> {
    let ldd = output(cmd("ldd").arg(path))?;
    let lib = ldd
        .lines()
        .find_map(|l| l.trim().strip_prefix("libLLVM.so."))?;
    lib.split(['.', ' ']).next()?.parse().ok()
}

fn has_toolchain(name: &str) -> bool {
    output(cmd("rustup").args(["toolchain", "list"]))
        .is_some_and(|s| s.lines().any(|l| l.split_whitespace().next() == Some(name)))
}

fn nightly_has_rust_src() -> bool {
    output(cmd("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"])).is_some_and(|s| {
        Path::new(s.trim())
            .join("lib/rustlib/src/rust/library/core")
            .is_dir()
    })
}

fn mounted(fstype: &str, at: &str) -> bool {
    fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[1] == at && f[2] == fstype
        })
    })
}

/// What is missing, with the fix for each.
struct Missing {
    what: String,
    fix: Fix,
}

enum Fix {
    Apt(String),
    LinkToolchain,
    BpfLinker {
        llvm: u32,
        force: bool,
    },
    CargoFuzz,
    Mount {
        fstype: &'static str,
        at: &'static str,
    },
    /// Cannot be fixed here; the text says what to do.
    Manual(String),
}

fn survey() -> Vec<Missing> {
    let mut missing = vec![];
    let debian = is_debian();
    if debian {
        for (pkg, why) in PACKAGES {
            if !installed(pkg) {
                missing.push(Missing {
                    what: format!("Debian package {pkg} ({why})"),
                    fix: Fix::Apt((*pkg).into()),
                });
            }
        }
    }
    // The kernel-side compiler: Debian's rustc (needs its LLVM dev package for bpf-linker).
    let llvm = llvm_major(&mut cmd("/usr/bin/rustc"));
    if debian {
        if let Some(llvm) = llvm {
            for pkg in [format!("llvm-{llvm}-dev"), format!("libpolly-{llvm}-dev")] {
                if !installed(&pkg) {
                    missing.push(Missing {
                        what: format!(
                            "Debian package {pkg} (the LLVM of Debian's rustc, to build bpf-linker)"
                        ),
                        fix: Fix::Apt(pkg),
                    });
                }
            }
        }
        if !has_toolchain(DEBIAN_TOOLCHAIN) {
            missing.push(Missing {
                what: format!(
                    "rustup toolchain `{DEBIAN_TOOLCHAIN}` (a rustup name for Debian's rustc)"
                ),
                fix: Fix::LinkToolchain,
            });
        }
    } else if !nightly_has_rust_src() {
        missing.push(Missing {
            what: "a compiler with a core for bpfel-unknown-none".into(),
            fix: Fix::Manual(
                "this is not Debian: install a nightly toolchain with rust-src \
                 (`rustup toolchain install nightly --component rust-src`)"
                    .into(),
            ),
        });
    }
    // bpf-linker, on the same LLVM major version as the rustc that emits the bitcode it links.
    let want_llvm = if debian {
        llvm
    } else if nightly_has_rust_src() {
        llvm_major(cmd("rustup").args(["run", "nightly", "rustc"]))
    } else {
        None
    };
    match (bpf_linker_path(), want_llvm) {
        (None, Some(llvm)) => missing.push(Missing {
            what: format!("bpf-linker (built against LLVM {llvm})"),
            fix: Fix::BpfLinker { llvm, force: false },
        }),
        (Some(path), Some(llvm)) => match bpf_linker_llvm_major(&path) {
            Some(have) if have == llvm => {}
            have => missing.push(Missing {
                what: format!(
                    "bpf-linker at {path} uses LLVM {}, but the kernel-side rustc uses LLVM {llvm}",
                    have.map_or(
                        "(unknown: not dynamically linked to libLLVM)".to_owned(),
                        |h| h.to_string()
                    )
                ),
                fix: Fix::BpfLinker { llvm, force: true },
            }),
        },
        (_, None) if debian && !installed("rustc-web") => {} // rustc-web is in the apt list; re-surveyed after it
        (_, None) => missing.push(Missing {
            what: "the LLVM version of the kernel-side rustc".into(),
            fix: Fix::Manual("cannot run `/usr/bin/rustc -vV` (Debian) or nightly rustc".into()),
        }),
    }
    for (fstype, at) in [("bpf", "/sys/fs/bpf"), ("tracefs", "/sys/kernel/tracing")] {
        if !mounted(fstype, at) {
            missing.push(Missing {
                what: format!("{fstype} mounted at {at}"),
                fix: Fix::Mount { fstype, at },
            });
        }
    }
    // The policy fuzzer (cargo-fuzz builds with nightly's sanitizers; it needs no rust-src).
    if !output(cmd("rustup").args(["toolchain", "list"]))
        .is_some_and(|s| s.lines().any(|l| l.starts_with("nightly")))
    {
        missing.push(Missing {
            what: "a nightly toolchain (for cargo-fuzz)".into(),
            fix: Fix::Manual("`rustup toolchain install nightly`".into()),
        });
    }
    if output(crate::run::cargo().args(["fuzz", "--version"])).is_none() {
        missing.push(Missing {
            what: format!("cargo-fuzz {CARGO_FUZZ_VERSION}"),
            fix: Fix::CargoFuzz,
        });
    }
    for tool in ["fmt", "clippy"] {
        if output(crate::run::cargo().args([tool, "--version"])).is_none() {
            missing.push(Missing {
                what: format!("cargo {tool} for the userspace toolchain"),
                fix: Fix::Manual(format!(
                    "`rustup component add {}`",
                    if tool == "fmt" { "rustfmt" } else { "clippy" }
                )),
            });
        }
    }
    missing
}

fn apply(missing: &[Missing]) -> Result<()> {
    let apt: Vec<&str> = missing
        .iter()
        .filter_map(|m| {
            if let Fix::Apt(p) = &m.fix {
                Some(p.as_str())
            } else {
                None
            }
        })
        .collect();
    if !apt.is_empty() {
        step("apt-get update", cmd("apt-get").args(["update", "-q"]))?;
        step(
            &format!("apt-get install {}", apt.join(" ")),
            cmd("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&apt)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    for m in missing {
        match &m.fix {
            Fix::Apt(_) => {}
            Fix::LinkToolchain => step(
                &format!("rustup toolchain link {DEBIAN_TOOLCHAIN} /usr"),
                cmd("rustup").args(["toolchain", "link", DEBIAN_TOOLCHAIN, "/usr"]),
            )?,
            Fix::BpfLinker { llvm, force } => {
                let path = format!(
                    "/usr/lib/llvm-{llvm}/bin:{}",
                    std::env::var("PATH").unwrap_or_default()
                );
                let mut c = crate::run::cargo();
                c.args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                ])
                .args(["--features", &format!("llvm-{llvm}")])
                .env("PATH", path);
                if *force {
                    c.arg("--force");
                }
                step(
                    &format!(
                        "build bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm} (a few minutes)"
                    ),
                    &mut c,
                )?;
            }
            Fix::CargoFuzz => step(
                &format!("cargo install cargo-fuzz {CARGO_FUZZ_VERSION}"),
                crate::run::cargo().args([
                    "install",
                    "cargo-fuzz",
                    "--locked",
                    "--version",
                    CARGO_FUZZ_VERSION,
                ]),
            )?,
            Fix::Mount { fstype, at } => {
                fs::create_dir_all(at).ok();
                step(
                    &format!("mount {fstype} at {at}"),
                    cmd("mount").args(["-t", fstype, fstype, at]),
                )?;
            }
            Fix::Manual(how) => bail!("{} is missing and setup cannot install it: {how}", m.what),
        }
    }
    Ok(())
}

/// `cargo xtask setup [--check]`.
pub fn run(check_only: bool) -> Result<()> {
    // Two rounds: the LLVM version (and so bpf-linker's build) is only known once Debian's rustc is installed.
    for round in 0..3 {
        let missing = survey();
        if missing.is_empty() {
            eprintln!(
                "setup: ready (kernel-side toolchain: {})",
                if is_debian() {
                    DEBIAN_TOOLCHAIN
                } else {
                    "nightly + rust-src"
                }
            );
            return Ok(());
        }
        let list = missing
            .iter()
            .map(|m| format!("  - {}", m.what))
            .collect::<Vec<_>>()
            .join("\n");
        if check_only {
            bail!("not ready; missing:\n{list}\nrun `cargo xtask setup` as root to install them");
        }
        let needs_root = missing
            .iter()
            .any(|m| matches!(m.fix, Fix::Apt(_) | Fix::Mount { .. }));
        if needs_root && !is_root() {
            bail!(
                "setup needs root to install:\n{list}\nrerun as root: `sudo -E cargo xtask setup`"
            );
        }
        if round == 2 {
            bail!("setup did not converge; still missing:\n{list}");
        }
        eprintln!("setup: installing:\n{list}");
        apply(&missing)?;
    }
    Ok(())
}

/// Runs setup when something is missing (cheap when everything is present).
pub fn ensure() -> Result<()> {
    run(false)
}
