//! `cargo xtask integration-test --vm`: the privileged tests on other kernels, each booted under QEMU.
//!
//! For each kernel: an initramfs (written here as a newc cpio, uncompressed) with static busybox, `vpcgate`,
//! the lab's test binaries, the host programs they run (iproute2's `ip`, iputils' `ping`) with the shared
//! libraries `ldd` resolves for all of them, and the kernel modules the tests need, taken from that kernel's
//! modules.dep. A generated `/init` mounts proc/sys/devtmpfs/bpffs/tracefs, loads the modules, brings up lo
//! and runs each test between markers; the host streams the console with a per-kernel prefix and decides
//! from those markers alone, with a time budget per phase (QEMU is killed past it).
//!
//! TCG only: KVM acceleration crashes guests on the machines this project runs on (../shared/TOOLCHAIN.md).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{cpio::Archive, run::cargo};

/// The kernels of the matrix when none is named: Debian 12's 6.1 LTS, as the cloud build and as the
/// PREEMPT_RT build (where BPF programs run with migration disabled but can be preempted).
pub const DEFAULT_KERNELS: &[&str] = &["linux-image-cloud-amd64", "linux-image-rt-amd64"];

/// Packets of the differential test in a VM: as on the host (its coverage checks need every verdict
/// basis to occur; the rarest, host essentials, comes about 7 times in 200,000), about 90 s under TCG.
pub const VM_DIFF_PACKETS: u64 = 200_000;

/// Printed by the generated /init; the host decides from these lines only.
const BOOT: &str = "VPCGATE-VM-BOOT";
const TEST: &str = "VPCGATE-VM-TEST";
const RESULT: &str = "VPCGATE-VM-RESULT";

/// Time from QEMU's start to the first test (boot, unpacking the initramfs, loading modules), and between
/// the end of one test and the next marker (plus, before a test that needs the kernel clock to have run
/// for a while, that wait: the `wait` marker says how long at most).
const BOOT_BUDGET: Duration = Duration::from_secs(120);
const GAP_BUDGET: Duration = Duration::from_secs(30);

/// How a test runs in the VM.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `vpcgate preflight`: kernel, BTF, bpffs, every program through the verifier, BPF_PROG_TEST_RUN.
    Preflight,
    /// A test target of the `vpcgate-lab` package (tests/Cargo.toml), run with `--test-threads=1`.
    Lab,
}

/// A test that cannot run on some kernels: which, below which version, and why.
struct NotApplicable {
    /// A test function of the binary (libtest name), or None for the whole binary.
    test: Option<&'static str>,
    /// Not applicable on kernels older than this (major, minor).
    below: (u32, u32),
    reason: &'static str,
}

/// One entry of the VM's test list.
pub struct LabTest {
    pub name: &'static str,
    kind: Kind,
    /// How long it may take under TCG (2 vCPUs) before QEMU is killed.
    budget: Duration,
    /// Kernel modules it needs; those a kernel builds in are skipped.
    modules: &'static [&'static str],
    /// Programs it runs besides busybox's applets: copied from the host with their libraries.
    tools: &'static [&'static str],
    not_applicable: &'static [NotApplicable],
    /// Seconds since boot the kernel clock must show before it starts: the differential writes flows
    /// that expired a flow timeout (up to 30 s) plus 10 s ago, which a clock younger than that cannot
    /// express.
    min_uptime_s: u32,
}

/// Modules for the network-namespace lab: veth pairs; TC egress on kernels without tcx (< 6.6) goes
/// through a clsact qdisc (sch_ingress) and a direct-action cls_bpf filter. XDP on veth is part of veth;
/// VXLAN is the forward interface without native XDP (the generic XDP fallback); macvlan the stacked
/// forward interface that is refused.
const LAB_MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf", "vxlan", "macvlan"];

/// `ip netns`: busybox's `ip` has no netns support, so iproute2's runs in the VM.
const LAB_TOOLS: &[&str] = &["ip"];

/// The `lab` fixture's test: veth, and nftables for its security groups (an inet table whose input chain
/// drops, and rejects with ICMP / ICMPv6 administratively prohibited).
/// crc32c_generic first: nf_tables needs libcrc32c, whose soft dependency on crc32c modules.dep does not
/// list (built in on the cloud kernel, a module on the RT one).
const FIXTURE_MODULES: &[&str] = &["veth", "crc32c_generic", "nf_tables", "nft_reject_inet"];

/// The diagnostics tests: the lab fixture (nftables) under an enforcing agent (clsact before 6.6).
const DIAGNOSE_MODULES: &[&str] = &[
    "veth",
    "sch_ingress",
    "cls_bpf",
    "crc32c_generic",
    "nf_tables",
    "nft_reject_inet",
];

/// The `run` tests also start the agent with only the systemd unit's capabilities (util-linux setpriv).
const RUN_TOOLS: &[&str] = &["ip", "setpriv"];

/// The VM's tests, in the order they run. Every test target of tests/Cargo.toml is here (checked against
/// cargo's list of executables when the tests are built).
pub const TESTS: &[LabTest] = &[
    LabTest {
        name: "preflight",
        kind: Kind::Preflight,
        budget: Duration::from_secs(120),
        modules: &[],
        tools: &[],
        not_applicable: &[],
        min_uptime_s: 0,
    },
    LabTest {
        name: "parser",
        kind: Kind::Lab,
        budget: Duration::from_secs(300),
        modules: &[],
        tools: &[],
        not_applicable: &[],
        min_uptime_s: 0,
    },
    LabTest {
        name: "differential",
        kind: Kind::Lab,
        budget: Duration::from_secs(600),
        modules: &[],
        tools: &[],
        not_applicable: &[],
        min_uptime_s: 45,
    },
    LabTest {
        name: "datapath",
        kind: Kind::Lab,
        budget: Duration::from_secs(300),
        modules: &[],
        tools: &[],
        not_applicable: &[],
        min_uptime_s: 0,
    },
    LabTest {
        name: "diagnose",
        kind: Kind::Lab,
        budget: Duration::from_secs(400),
        modules: DIAGNOSE_MODULES,
        tools: &["ip", "nft"],
        not_applicable: &[],
        min_uptime_s: 0,
    },
    LabTest {
        name: "demo",
        kind: Kind::Lab,
        budget: Duration::from_secs(60),
        modules: &[],
        tools: &[],
        not_applicable: &[NotApplicable {
            test: None,
            below: (u32::MAX, 0),
            reason: "runs the demo binary (tests/bin/demo.rs), which the VM image does not carry; `diagnose` runs the same probes there",
        }],
        min_uptime_s: 0,
    },
    LabTest {
        name: "lab",
        kind: Kind::Lab,
        budget: Duration::from_secs(300),
        modules: FIXTURE_MODULES,
        tools: &["ip", "nft"],
        not_applicable: &[],
        min_uptime_s: 0,
    },
    LabTest {
        name: "netns",
        kind: Kind::Lab,
        budget: Duration::from_secs(300),
        modules: LAB_MODULES,
        // ICMP echo through the enforced veth, with iputils' options (-W is a per-reply timeout there).
        tools: &["ip", "ping"],
        not_applicable: &[],
        min_uptime_s: 0,
    },
    LabTest {
        name: "enforce",
        kind: Kind::Lab,
        budget: Duration::from_secs(300),
        modules: LAB_MODULES,
        tools: LAB_TOOLS,
        not_applicable: &[],
        min_uptime_s: 0,
    },
    LabTest {
        name: "swap",
        kind: Kind::Lab,
        budget: Duration::from_secs(600),
        modules: LAB_MODULES,
        tools: LAB_TOOLS,
        not_applicable: &[],
        min_uptime_s: 0,
    },
    LabTest {
        name: "run",
        kind: Kind::Lab,
        budget: Duration::from_secs(300),
        modules: LAB_MODULES,
        tools: RUN_TOOLS,
        not_applicable: &[],
        min_uptime_s: 0,
    },
    LabTest {
        name: "forward",
        kind: Kind::Lab,
        budget: Duration::from_secs(300),
        modules: LAB_MODULES,
        tools: LAB_TOOLS,
        not_applicable: &[],
        min_uptime_s: 0,
    },
    LabTest {
        name: "flows",
        kind: Kind::Lab,
        budget: Duration::from_secs(600),
        modules: LAB_MODULES,
        tools: LAB_TOOLS,
        not_applicable: &[NotApplicable {
            test: Some("tc_egress_is_first_in_the_tcx_chain"),
            below: (6, 6),
            reason: "tcx links exist from kernel 6.6; older kernels attach TC egress through a clsact qdisc, \
                     which has no chain order to check",
        }],
        min_uptime_s: 0,
    },
];

/// What `--only` selects; all tests when empty.
pub fn select(only: &[String]) -> Result<Vec<&'static LabTest>> {
    for name in only {
        ensure!(
            TESTS.iter().any(|t| t.name == name),
            "no test named `{name}`; the tests are: {}",
            TESTS.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(TESTS
        .iter()
        .filter(|t| only.is_empty() || only.iter().any(|o| o == t.name))
        .collect())
}

/// `cargo xtask integration-test --vm` options.
pub struct Options {
    pub kernels: Vec<String>,
    pub modules: Option<PathBuf>,
    pub only: Vec<String>,
    pub diff_packets: u64,
    pub memory_mib: u32,
    pub timeout_factor: f64,
}

/// A kernel to boot: its image and the modules built for it.
struct Kernel {
    /// Its release (`uname -r`), the name of its modules directory.
    release: String,
    image: PathBuf,
    modules: PathBuf,
    version: (u32, u32),
}

impl Kernel {
    fn not_applicable<'a>(
        &self,
        test: &'a LabTest,
    ) -> impl Iterator<Item = &'a NotApplicable> + use<'a, '_> {
        test.not_applicable
            .iter()
            .filter(move |n| self.version < n.below)
    }
}

/// `6.1.0-56-cloud-amd64` -> (6, 1).
fn major_minor(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(['.', '-']);
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn dpkg_installed(package: &str) -> bool {
    crate::run::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|s| s.contains("install ok installed"))
}

/// The /boot/vmlinuz-* a Debian package installs, following a metapackage's linux-image-* dependencies.
fn image_of_package(package: &str, depth: u32) -> Result<PathBuf> {
    ensure!(
        dpkg_installed(package),
        "kernel package {package} is not installed: `cargo xtask setup` installs the default matrix's \
         kernels, or `apt-get install {package}`"
    );
    let files =
        crate::run::output(Command::new("dpkg-query").args(["-L", package])).unwrap_or_default();
    if let Some(image) = files.lines().find(|l| l.starts_with("/boot/vmlinuz-")) {
        return Ok(PathBuf::from(image));
    }
    ensure!(depth < 3, "{package}: no /boot/vmlinuz-* found");
    let depends =
        crate::run::output(Command::new("dpkg-query").args(["-W", "-f=${Depends}", package]))
            .unwrap_or_default();
    for dep in depends.split([',', '|']) {
        let Some(dep) = dep.split_whitespace().next() else {
            continue;
        };
        if !dep.starts_with("linux-image-") {
            continue;
        }
        for candidate in [dep.to_owned(), format!("{dep}-unsigned")] {
            if dpkg_installed(&candidate) {
                return image_of_package(&candidate, depth + 1);
            }
        }
    }
    bail!("{package} installs no /boot/vmlinuz-* and depends on no installed linux-image-* package")
}

/// A kernel named as a vmlinuz path or a Debian package; its modules from `modules` or
/// /lib/modules/<release>, the release being the image's file name without `vmlinuz-`.
fn resolve_kernel(spec: &str, modules: Option<&Path>) -> Result<Kernel> {
    let image = if spec.contains('/') || Path::new(spec).is_file() {
        let p = PathBuf::from(spec);
        ensure!(p.is_file(), "kernel image {spec} does not exist");
        p
    } else {
        image_of_package(spec, 0)?
    };
    let modules = match modules {
        Some(m) => m.to_path_buf(),
        None => {
            let name = image.file_name().unwrap_or_default().to_string_lossy();
            let Some(release) = name.strip_prefix("vmlinuz-") else {
                bail!(
                    "cannot tell the release of {} from its name (expected vmlinuz-<release>): \
                     pass its modules directory with --modules DIR",
                    image.display()
                );
            };
            Path::new("/lib/modules").join(release)
        }
    };
    ensure!(
        modules.join("modules.dep").is_file(),
        "{}: no modules.dep (the modules of kernel {}); pass --modules DIR",
        modules.display(),
        image.display()
    );
    let release = modules
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let version = major_minor(&release)
        .with_context(|| format!("cannot read a kernel version from {release}"))?;
    Ok(Kernel {
        release,
        image,
        modules,
        version,
    })
}

/// A module's name as modprobe compares them: file stem without `.ko*`, `-` as `_`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// The modules to insmod, dependencies first, as paths relative to the modules directory; modules the
/// kernel builds in are left out.
fn resolve_modules(kernel: &Kernel, wanted: &BTreeSet<&str>) -> Result<Vec<String>> {
    let dep = fs::read_to_string(kernel.modules.join("modules.dep"))?;
    let builtin = fs::read_to_string(kernel.modules.join("modules.builtin")).unwrap_or_default();
    let builtin: BTreeSet<String> = builtin.lines().map(module_name).collect();
    let mut table: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in dep.lines() {
        let Some((module, deps)) = line.split_once(':') else {
            continue;
        };
        table.insert(
            module_name(module),
            (
                module.to_owned(),
                deps.split_whitespace().map(str::to_owned).collect(),
            ),
        );
    }
    fn visit(
        name: &str,
        table: &HashMap<String, (String, Vec<String>)>,
        order: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        if let Some((path, deps)) = table.get(name) {
            // modules.dep lists every (transitive) dependency, the deepest last: load from the end.
            for d in deps.iter().rev() {
                visit(&module_name(d), table, order, seen);
            }
            order.push(path.clone());
        }
    }
    let mut order = vec![];
    let mut seen = BTreeSet::new();
    for name in wanted {
        let name = name.replace('-', "_");
        if builtin.contains(&name) {
            continue;
        }
        ensure!(
            table.contains_key(&name),
            "kernel {} has no module {name} (not in {}/modules.dep nor modules.builtin): \
             is it configured out? see /boot/config-{}",
            kernel.release,
            kernel.modules.display(),
            kernel.release
        );
        visit(&name, &table, &mut order, &mut seen);
    }
    Ok(order)
}

/// A module file's contents, decompressed on the host (busybox's insmod reads plain .ko files only).
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko") {
        return fs::read(path).with_context(|| format!("read {name}"));
    } else if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else if name.ends_with(".ko.gz") {
        "gzip"
    } else {
        bail!("{name}: not a .ko, .ko.xz, .ko.zst or .ko.gz module");
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("cannot run `{tool}` to decompress {name}"))?;
    ensure!(
        out.status.success(),
        "`{tool} -dc {name}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// Where a program is on the host (PATH, then the sbin directories, which a non-root PATH may lack).
fn find_program(name: &str) -> Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("`{name}` is not installed on this host: run `cargo xtask setup`"))
}

/// Shared libraries of a dynamically linked ELF, including the dynamic loader, as `ldd` resolves them.
fn shared_libraries(elf: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(elf)
        .output()
        .context("cannot run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not a dynamic executable") {
        return Ok(vec![]); // static
    }
    let mut libs = vec![];
    for line in text.lines() {
        let line = line.trim();
        if line.contains("=> not found") {
            bail!("{}: library not found: {line}", elf.display());
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// The executables a cargo command builds, by target name and kind (`bin`, `test`).
fn cargo_executables(c: &mut Command, what: &str) -> Result<Vec<(String, String, PathBuf)>> {
    c.arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!("\n==> {what}");
    let out = c.output().with_context(|| format!("cannot run {c:?}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}): {c:?}",
        out.status
    );
    let mut exes = vec![];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let name = msg["target"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let kind = msg["target"]["kind"][0]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        exes.push((name, kind, PathBuf::from(exe)));
    }
    Ok(exes)
}

/// What goes into every kernel's initramfs: vpcgate and the selected test binaries.
struct Binaries {
    vpcgate: PathBuf,
    tests: BTreeMap<&'static str, PathBuf>,
}

/// Builds the release `vpcgate` binary; returns its path (wherever the target directory is).
pub fn build_vpcgate(what: &str) -> Result<PathBuf> {
    build_bin("vpcgate", "vpcgate", what)
}

/// Builds binary `bin` of `package` (release); its path.
pub fn build_bin(package: &str, bin: &str, what: &str) -> Result<PathBuf> {
    let built = cargo_executables(
        cargo().args(["build", "--release", "--package", package, "--bin", bin]),
        what,
    )?;
    built
        .into_iter()
        .find(|(n, k, _)| n == bin && k == "bin")
        .map(|(_, _, p)| p)
        .with_context(|| format!("cargo built no {bin} executable"))
}

fn build(tests: &[&'static LabTest]) -> Result<Binaries> {
    // Release, as on the host: the differential and swap tests push many packets through both sides.
    let vpcgate = build_vpcgate("build vpcgate (release) for the VMs")?;
    let mut found = BTreeMap::new();
    if tests.iter().any(|t| t.kind == Kind::Lab) {
        let built = cargo_executables(
            cargo().args(["test", "--release", "--package", "vpcgate-lab", "--no-run"]),
            "build the lab's test binaries (release)",
        )?;
        let lab: BTreeMap<String, PathBuf> = built
            .into_iter()
            .filter(|(_, k, _)| k == "test")
            .map(|(n, _, p)| (n, p))
            .collect();
        for name in lab.keys() {
            ensure!(
                TESTS.iter().any(|t| t.name == name),
                "tests/Cargo.toml has a test target `{name}` that the VM list (xtask/src/vm.rs TESTS) \
                 does not know: add it there, with the modules and programs it needs"
            );
        }
        for t in tests.iter().filter(|t| t.kind == Kind::Lab) {
            let p = lab
                .get(t.name)
                .with_context(|| format!("cargo built no test executable `{}`", t.name))?;
            found.insert(t.name, p.clone());
        }
    }
    Ok(Binaries {
        vpcgate,
        tests: found,
    })
}

/// Single-quoted for the init script.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The generated /init: mounts, modules, lo, then each test between markers, then power off.
fn init_script(
    kernel: &Kernel,
    tests: &[&LabTest],
    modules: &[String],
    diff_packets: u64,
) -> String {
    let mut s = String::from(
        "#!/bin/sh\n\
         # Generated by `cargo xtask integration-test --vm` (xtask/src/vm.rs); the host reads the markers.\n\
         # Debian's static busybox runs its own applets before PATH inside sh (`ip` here is busybox's); the\n\
         # tests exec programs directly, so they get /bin/ip (iproute2) and /bin/ping (iputils).\n\
         export PATH=/bin\n\
         setup_failed=''\n\
         m() { mount -t \"$1\" \"$1\" \"$2\" || { echo \"@BOOT@ mount $1 on $2 failed\"; setup_failed=\"$setup_failed mount-$1\"; }; }\n\
         m proc /proc\nm sysfs /sys\nm devtmpfs /dev\nm bpf /sys/fs/bpf\nm tracefs /sys/kernel/tracing\nm tmpfs /run\n",
    )
    .replace("@BOOT@", BOOT);
    s += &format!("echo \"{BOOT} $(uname -r)\"\n");
    for m in modules {
        let path = format!("/lib/modules/{}/{}", kernel.release, strip_compression(m));
        s += &format!(
            "insmod {p} || {{ echo \"{BOOT} insmod {p} failed\"; setup_failed=\"$setup_failed insmod-{n}\"; }}\n",
            p = sh_quote(&path),
            n = module_name(m)
        );
    }
    s += "ip link set lo up || setup_failed=\"$setup_failed lo\"\n";
    s += &format!(
        "export VPCGATE_BIN=/bin/vpcgate VPCGATE_DIFF_PACKETS={diff_packets} RUST_BACKTRACE=1 HOME=/root\n\
         failed=''\n\
         t() {{ name=$1; shift; echo \"{TEST} begin $name\"; \"$@\"; rc=$?; echo \"{TEST} end $name rc=$rc\"; \
         [ \"$rc\" = 0 ] || failed=\"$failed $name\"; }}\n"
    );
    for t in tests {
        let mut cmd = match t.kind {
            Kind::Preflight => "/bin/vpcgate preflight".to_owned(),
            Kind::Lab => format!("/tests/{} --test-threads=1 --nocapture", t.name),
        };
        let skipped: Vec<_> = kernel.not_applicable(t).collect();
        if skipped.iter().any(|n| n.test.is_none()) {
            continue; // not run at all; the host reports it
        }
        if !skipped.is_empty() {
            cmd += " --exact";
            for n in skipped {
                cmd += &format!(" --skip {}", n.test.unwrap_or_default());
            }
        }
        if t.min_uptime_s > 0 {
            s += &format!(
                "echo \"{TEST} wait {name} {up}\"\n\
                 while [ \"$(cut -d. -f1 /proc/uptime)\" -lt {up} ]; do sleep 1; done\n",
                name = t.name,
                up = t.min_uptime_s
            );
        }
        s += &format!("t {} {cmd}\n", t.name);
    }
    s += &format!(
        "if [ -z \"$failed$setup_failed\" ]; then echo \"{RESULT} pass rc=0\"; \
         else echo \"{RESULT} fail rc=1 failed:$failed setup:$setup_failed\"; fi\n\
         poweroff -f\n"
    );
    s
}

fn strip_compression(module: &str) -> &str {
    [".xz", ".zst", ".gz"]
        .iter()
        .find_map(|ext| module.strip_suffix(ext))
        .unwrap_or(module)
}

/// Writes the kernel's initramfs; returns its size and the modules it loads.
fn write_initramfs(
    path: &Path,
    kernel: &Kernel,
    tests: &[&LabTest],
    bins: &Binaries,
    diff_packets: u64,
) -> Result<(u64, Vec<String>)> {
    let wanted: BTreeSet<&str> = tests
        .iter()
        .flat_map(|t| t.modules.iter().copied())
        .collect();
    let modules = resolve_modules(kernel, &wanted)?;
    let tools: BTreeSet<&str> = tests.iter().flat_map(|t| t.tools.iter().copied()).collect();

    let file = fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut a = Archive::new(std::io::BufWriter::new(file));
    for d in ["dev", "proc", "sys", "run", "tmp", "root", "tests"] {
        a.dir(d)?;
    }
    a.char_dev("dev/console", 5, 1)?;
    a.char_dev("dev/null", 1, 3)?;

    let busybox = Path::new("/bin/busybox");
    ensure!(
        busybox.is_file() && shared_libraries(busybox)?.is_empty(),
        "/bin/busybox is missing or not static: `cargo xtask setup` installs busybox-static"
    );
    a.file("bin/busybox", 0o755, &fs::read(busybox)?)?;

    let mut elves: Vec<(String, PathBuf)> = vec![("bin/vpcgate".into(), bins.vpcgate.clone())];
    for tool in &tools {
        elves.push((format!("bin/{tool}"), find_program(tool)?));
    }
    for (name, p) in &bins.tests {
        elves.push((format!("tests/{name}"), p.clone()));
    }
    let mut libs = BTreeSet::new();
    // Our own binaries without their debug info: the initramfs is unpacked into the VM's RAM, and with
    // it every test binary weighs ~60 MB instead of ~10 (symbols stay, so backtraces keep names).
    let ours: BTreeSet<&Path> = std::iter::once(bins.vpcgate.as_path())
        .chain(bins.tests.values().map(PathBuf::as_path))
        .collect();
    let stripped_dir = path.with_extension("stripped");
    fs::create_dir_all(&stripped_dir)?;
    for (at, host) in &elves {
        let bytes = if ours.contains(host.as_path()) {
            let out = stripped_dir.join(at.replace('/', "_"));
            let status = Command::new("objcopy")
                .arg("--strip-debug")
                .arg(host)
                .arg(&out)
                .status()
                .context("objcopy (binutils; `cargo xtask setup` installs it)")?;
            ensure!(
                status.success(),
                "objcopy --strip-debug {}: {status}",
                host.display()
            );
            fs::read(&out).with_context(|| format!("read {}", out.display()))?
        } else {
            fs::read(host).with_context(|| format!("read {}", host.display()))?
        };
        a.file(at, 0o755, &bytes)?;
        libs.extend(shared_libraries(host)?);
    }
    for lib in &libs {
        let at = lib.to_string_lossy();
        a.file(
            &at,
            0o755,
            &fs::read(lib).with_context(|| format!("read {at}"))?,
        )?;
    }
    // busybox's applets, except where a host program stands in (`ip`: busybox's has no netns).
    let list = crate::run::output(Command::new(busybox).arg("--list")).unwrap_or_default();
    for applet in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let at = format!("bin/{applet}");
        if applet != "busybox" && !a.contains(&at) {
            a.symlink(&at, "busybox")?;
        }
    }
    for m in &modules {
        let at = format!("lib/modules/{}/{}", kernel.release, strip_compression(m));
        a.file(&at, 0o644, &module_bytes(&kernel.modules.join(m))?)?;
    }
    a.file(
        "init",
        0o755,
        init_script(kernel, tests, &modules, diff_packets).as_bytes(),
    )?;
    let (_, size) = a.finish()?;
    Ok((size, modules.iter().map(|m| module_name(m)).collect()))
}

/// How one test went.
struct TestRun {
    name: String,
    rc: Option<i32>,
    secs: f64,
    /// What the verifier said when it rejected a program: the tests and preflight print "the kernel refused
    /// program NAME" and the verifier's log, whose last message before "verification time" is the reason.
    verifier: Option<String>,
}

/// How one kernel went.
struct KernelRun {
    release: String,
    /// From QEMU's start to init's first line.
    boot_secs: Option<f64>,
    /// Everything for this kernel: writing its initramfs, boot, tests, power-off.
    total_secs: f64,
    tests: Vec<TestRun>,
    /// None: no result marker.
    passed: Option<bool>,
    /// Why the run ended without a verdict, or what else went wrong (panic, oops, setup).
    problems: Vec<String>,
    not_applicable: Vec<String>,
}

/// The test running in the VM.
struct Current {
    name: String,
    start: Instant,
    /// The first program the kernel refused, and the verifier's reason.
    program: Option<String>,
    reason: Option<String>,
}

impl Current {
    fn watch_verifier(&mut self, line: &str, previous: &str) {
        if self.program.is_none()
            && let Some((_, rest)) = line.split_once("refused program ")
        {
            self.program = Some(rest.split(':').next().unwrap_or(rest).trim().to_owned());
        }
        // A test may prefix a child's lines (`vpcgate: ...`): the reason line has the same prefix.
        if self.program.is_some()
            && self.reason.is_none()
            && let Some(at) = line.find("verification time")
        {
            let reason = previous.strip_prefix(&line[..at]).unwrap_or(previous);
            self.reason = Some(reason.trim().to_owned());
        }
    }

    fn verifier(&self) -> Option<String> {
        let program = self.program.as_ref()?;
        Some(format!(
            "the verifier rejected {program}: {}",
            self.reason
                .as_deref()
                .unwrap_or("(reason not found in the log)")
        ))
    }
}

enum Event {
    Console(String),
    Qemu(String),
    ConsoleClosed,
}

fn spawn_lines(r: impl Read + Send + 'static, tx: mpsc::Sender<Event>, console: bool) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = vec![];
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\r', '\n'])
                        .to_owned();
                    let ev = if console {
                        Event::Console(line)
                    } else {
                        Event::Qemu(line)
                    };
                    if tx.send(ev).is_err() {
                        return;
                    }
                }
            }
        }
        if console {
            let _ = tx.send(Event::ConsoleClosed);
        }
    });
}

fn run_kernel(
    kernel: &Kernel,
    tests: &[&LabTest],
    bins: &Binaries,
    opts: &Options,
    dir: &Path,
) -> Result<KernelRun> {
    let start = Instant::now();
    let label = kernel.release.as_str();
    fs::create_dir_all(dir)?;
    let initramfs = dir.join("initramfs.cpio");
    let (size, modules) = write_initramfs(&initramfs, kernel, tests, bins, opts.diff_packets)?;
    eprintln!(
        "[{label}] initramfs {} ({} MiB; modules: {})",
        initramfs.display(),
        size >> 20,
        if modules.is_empty() {
            "none needed".to_owned()
        } else {
            modules.join(", ")
        }
    );
    let mut not_applicable = vec![];
    for t in tests {
        for n in kernel.not_applicable(t) {
            let what = match n.test {
                Some(f) => format!("{}::{f}", t.name),
                None => t.name.to_owned(),
            };
            let when = if n.below.0 == u32::MAX {
                "in any VM".to_owned()
            } else {
                format!("kernel < {}.{}", n.below.0, n.below.1)
            };
            not_applicable.push(format!("{what} ({when}): {}", n.reason));
        }
    }
    for n in &not_applicable {
        eprintln!("[{label}] not applicable: {n}");
    }

    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-accel", "tcg", "-m"])
        .arg(opts.memory_mib.to_string())
        .args([
            "-smp",
            "2",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
        ])
        .args(["-serial", "stdio", "-no-reboot", "-kernel"])
        .arg(&kernel.image)
        .arg("-initrd")
        .arg(&initramfs)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("[{label}] boot: {c:?}");
    let mut child = c
        .spawn()
        .context("cannot run qemu-system-x86_64: `cargo xtask setup` installs qemu-system-x86")?;
    let spawned = Instant::now();
    let (tx, rx) = mpsc::channel();
    spawn_lines(child.stdout.take().expect("piped"), tx.clone(), true);
    spawn_lines(child.stderr.take().expect("piped"), tx, false);

    let scale = |d: Duration| d.mul_f64(opts.timeout_factor);
    let mut log = String::new();
    let mut run = KernelRun {
        release: kernel.release.clone(),
        boot_secs: None,
        total_secs: 0.0,
        tests: vec![],
        passed: None,
        problems: vec![],
        not_applicable,
    };
    let mut budget = scale(BOOT_BUDGET);
    let mut deadline = Instant::now() + budget;
    let mut phase = "boot (kernel, initramfs, modules)".to_owned();
    let mut current: Option<Current> = None;
    let mut previous = String::new();
    loop {
        let now = Instant::now();
        let ev = match rx.recv_timeout(deadline.saturating_duration_since(now)) {
            Ok(ev) => ev,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                if run.passed.is_none() {
                    run.problems.push(format!(
                        "timeout: {phase} took longer than its budget of {:.0}s; QEMU killed",
                        budget.as_secs_f64()
                    ));
                }
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let line = match ev {
            Event::ConsoleClosed => break,
            Event::Qemu(line) => {
                eprintln!("[{label}] qemu: {line}");
                log += &format!("qemu: {line}\n");
                continue;
            }
            Event::Console(line) => line,
        };
        eprintln!("[{label}] {line}");
        log += &line;
        log.push('\n');
        if let Some(cur) = &mut current {
            cur.watch_verifier(&line, &previous);
        }
        previous.clone_from(&line);
        if let Some(rest) = line.strip_prefix(BOOT) {
            if rest.contains("failed") {
                run.problems.push(format!("setup:{rest}"));
            } else if run.boot_secs.is_none() {
                run.boot_secs = Some(spawned.elapsed().as_secs_f64());
            }
        } else if let Some(rest) = line.strip_prefix(TEST) {
            let words: Vec<&str> = rest.split_whitespace().collect();
            match words.as_slice() {
                ["begin", name] => {
                    let t = tests.iter().find(|t| t.name == *name);
                    budget = scale(t.map_or(BOOT_BUDGET, |t| t.budget));
                    deadline = Instant::now() + budget;
                    phase = format!("test {name}");
                    current = Some(Current {
                        name: (*name).to_owned(),
                        start: Instant::now(),
                        program: None,
                        reason: None,
                    });
                }
                ["end", name, rc] => {
                    let rc = rc.strip_prefix("rc=").and_then(|r| r.parse().ok());
                    let (secs, verifier) = match current.take() {
                        Some(c) if c.name == *name => {
                            (c.start.elapsed().as_secs_f64(), c.verifier())
                        }
                        _ => (0.0, None),
                    };
                    run.tests.push(TestRun {
                        name: (*name).to_owned(),
                        rc,
                        secs,
                        verifier,
                    });
                    budget = scale(GAP_BUDGET);
                    deadline = Instant::now() + budget;
                    phase = format!("the step after test {name}");
                }
                // The guest waits until its clock has run `secs` since boot before test `name`: fast
                // earlier tests must not turn that wait into a timeout.
                ["wait", name, secs] => {
                    let secs: u64 = secs.parse().unwrap_or(0);
                    budget = scale(GAP_BUDGET) + Duration::from_secs(secs);
                    deadline = Instant::now() + budget;
                    phase = format!("the wait for {secs}s of uptime before test {name}");
                }
                _ => {}
            }
        } else if let Some(rest) = line.strip_prefix(RESULT) {
            run.passed = Some(rest.trim_start().starts_with("pass"));
            budget = scale(GAP_BUDGET);
            deadline = Instant::now() + budget;
            phase = "power-off".into();
        } else if line.contains("Kernel panic") {
            run.problems.push(format!("kernel panic: {line}"));
        } else if line.contains("BUG:") || line.contains("Oops:") || line.contains("WARNING: CPU") {
            run.problems.push(format!("kernel: {line}"));
        }
    }
    // The console closed (QEMU exited: power-off, or reboot after a panic with -no-reboot) or was killed.
    let status = child.wait()?;
    if let Some(c) = current {
        run.problems.push(format!(
            "test {} did not finish (ran {:.1}s){}",
            c.name,
            c.start.elapsed().as_secs_f64(),
            c.verifier().map_or(String::new(), |v| format!("; {v}"))
        ));
    }
    if run.passed.is_none() && run.problems.is_empty() {
        run.problems.push(format!(
            "QEMU exited ({status}) without the {RESULT} marker: see the console above"
        ));
    }
    run.total_secs = start.elapsed().as_secs_f64();
    let log_path = dir.join("console.log");
    fs::write(&log_path, log)?;
    eprintln!(
        "[{label}] console log: {} ({:.1}s)",
        log_path.display(),
        run.total_secs
    );
    Ok(run)
}

fn report(runs: &[KernelRun], tests: &[&LabTest]) -> bool {
    eprintln!("\n==> VM matrix");
    let mut all_ok = true;
    for r in runs {
        let ok = r.passed == Some(true) && r.problems.is_empty();
        all_ok &= ok;
        eprintln!(
            "  {}: {} in {:.1}s (boot {})",
            r.release,
            if ok { "pass" } else { "FAIL" },
            r.total_secs,
            r.boot_secs.map_or("-".to_owned(), |b| format!("{b:.1}s"))
        );
        for t in tests {
            match r.tests.iter().find(|x| x.name == t.name) {
                Some(x) => eprintln!(
                    "    {:<14} {:<6} {:>8.1}s{}",
                    x.name,
                    if x.rc == Some(0) { "pass" } else { "FAIL" },
                    x.secs,
                    match (x.rc, &x.verifier) {
                        (Some(0), _) => String::new(),
                        (rc, v) => format!(
                            "  rc={}{}",
                            rc.map_or("?".into(), |r| r.to_string()),
                            v.as_ref()
                                .map_or(String::new(), |v| format!("; {v} (log above)"))
                        ),
                    }
                ),
                None => eprintln!("    {:<14} not run", t.name),
            }
        }
        for n in &r.not_applicable {
            eprintln!("    not applicable: {n}");
        }
        for p in &r.problems {
            eprintln!("    {p}");
        }
    }
    all_ok
}

/// `cargo xtask integration-test --vm`.
pub fn run(opts: &Options) -> Result<()> {
    let tests = select(&opts.only)?;
    let specs: Vec<String> = if opts.kernels.is_empty() {
        DEFAULT_KERNELS.iter().map(|s| (*s).to_owned()).collect()
    } else {
        opts.kernels.clone()
    };
    ensure!(
        opts.modules.is_none() || specs.len() == 1,
        "--modules DIR names the modules of one kernel: give exactly one --kernel with it"
    );
    let kernels = specs
        .iter()
        .map(|s| resolve_kernel(s, opts.modules.as_deref()))
        .collect::<Result<Vec<_>>>()?;
    let bins = build(&tests)?;
    let vm_dir = bins
        .vpcgate
        .parent()
        .and_then(Path::parent)
        .context("vpcgate's target directory")?
        .join("vm");
    let mut runs = vec![];
    for k in &kernels {
        eprintln!(
            "\n==> {}: {} (modules {})",
            k.release,
            k.image.display(),
            k.modules.display()
        );
        // One kernel that cannot be prepared (a module missing, say) does not hide the others' results.
        let run =
            run_kernel(k, &tests, &bins, opts, &vm_dir.join(&k.release)).unwrap_or_else(|e| {
                eprintln!("[{}] error: {e:#}", k.release);
                KernelRun {
                    release: k.release.clone(),
                    boot_secs: None,
                    total_secs: 0.0,
                    tests: vec![],
                    passed: None,
                    problems: vec![format!("not run: {e:#}")],
                    not_applicable: vec![],
                }
            });
        runs.push(run);
    }
    if !report(&runs, &tests) {
        bail!("the VM matrix failed (per kernel and test above)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_compare_like_modprobe() {
        assert_eq!(
            module_name("kernel/net/sched/sch_ingress.ko.zst"),
            "sch_ingress"
        );
        assert_eq!(module_name("kernel/drivers/net/veth.ko"), "veth");
        assert_eq!(module_name("x/nf-conntrack.ko.xz"), "nf_conntrack");
        assert_eq!(strip_compression("a/b.ko.xz"), "a/b.ko");
    }

    #[test]
    fn versions_come_from_the_release() {
        assert_eq!(major_minor("6.1.0-56-cloud-amd64"), Some((6, 1)));
        assert_eq!(major_minor("6.18.44-fc"), Some((6, 18)));
        assert_eq!(major_minor("vmlinuz"), None);
    }

    #[test]
    fn the_init_script_skips_what_a_kernel_cannot_run_and_loads_modules_first() {
        let kernel = |release: &str| Kernel {
            release: release.into(),
            image: "/boot/vmlinuz".into(),
            modules: "/lib/modules/x".into(),
            version: major_minor(release).unwrap(),
        };
        let tests = select(&["preflight".into(), "flows".into()]).unwrap();
        let modules = ["kernel/drivers/net/veth.ko.xz".to_owned()];
        let old = init_script(&kernel("6.1.0-56-cloud-amd64"), &tests, &modules, 7);
        assert!(
            old.contains("--exact --skip tc_egress_is_first_in_the_tcx_chain"),
            "{old}"
        );
        assert!(
            old.contains("insmod '/lib/modules/6.1.0-56-cloud-amd64/kernel/drivers/net/veth.ko'")
        );
        assert!(old.find("insmod").unwrap() < old.find("t preflight").unwrap());
        assert!(old.contains("VPCGATE_DIFF_PACKETS=7"));
        assert!(
            old.contains("echo \"VPCGATE-VM-BOOT mount $1 on $2 failed\""),
            "{old}"
        );
        let new = init_script(&kernel("6.6.0"), &tests, &[], 7);
        assert!(!new.contains("--skip"), "{new}");
        // A test that needs uptime announces the wait (the host extends its gap budget by it) before it.
        let diff = init_script(
            &kernel("6.6.0"),
            &select(&["parser".into(), "differential".into()]).unwrap(),
            &[],
            7,
        );
        let wait = diff
            .find("echo \"VPCGATE-VM-TEST wait differential 45\"")
            .unwrap_or_else(|| panic!("{diff}"));
        assert!(wait < diff.find("/proc/uptime").unwrap(), "{diff}");
        assert!(diff.find("/proc/uptime").unwrap() < diff.find("\nt differential ").unwrap());
    }

    #[test]
    fn the_verifier_reason_is_the_line_before_its_timing_whatever_the_prefix() {
        let mut c = Current {
            name: "run".into(),
            start: Instant::now(),
            program: None,
            reason: None,
        };
        let lines = [
            "vpcgate: ERROR cannot load error=the kernel refused program vpcgate_tc_egress: Invalid argument",
            "vpcgate: --- verifier log ---",
            "vpcgate: back-edge from insn 1014 to 1015",
            "vpcgate: verification time 1349 usec",
            "vpcgate: R1 later",
            "vpcgate: verification time 1 usec",
        ];
        let mut previous = "";
        for l in lines {
            c.watch_verifier(l, previous);
            previous = l;
        }
        assert_eq!(
            c.verifier().as_deref(),
            Some("the verifier rejected vpcgate_tc_egress: back-edge from insn 1014 to 1015")
        );
    }

    #[test]
    fn setup_installs_the_default_matrix() {
        for k in DEFAULT_KERNELS.iter().chain(&[
            "qemu-system-x86",
            "busybox-static",
            "iproute2",
            "iputils-ping",
        ]) {
            assert!(
                crate::setup::PACKAGES.iter().any(|(p, _)| p == k),
                "setup does not install {k}"
            );
        }
    }

    #[test]
    fn every_test_is_listed_once_with_a_reason_for_what_is_not_applicable() {
        let names: BTreeSet<_> = TESTS.iter().map(|t| t.name).collect();
        assert_eq!(names.len(), TESTS.len());
        for t in TESTS {
            for n in t.not_applicable {
                assert!(!n.reason.is_empty(), "{}", t.name);
            }
        }
    }
}
