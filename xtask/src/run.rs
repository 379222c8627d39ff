//! Running commands with their output visible and failures explained.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// A command run from the workspace root.
pub fn cmd(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    c.current_dir(root());
    c
}

/// The cargo that runs this xtask (rustup's toolchain, for userspace).
pub fn cargo() -> Command {
    cmd(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Runs `c` with inherited output; fails with the command line when it fails.
pub fn step(what: &str, c: &mut Command) -> Result<()> {
    eprintln!("\n==> {what}");
    let status = c.status().with_context(|| format!("cannot run {c:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status}): {c:?}");
    }
    Ok(())
}

/// Runs `c` and returns its stdout, or None when it cannot run or fails.
pub fn output(c: &mut Command) -> Option<String> {
    let out = c.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds the agent (whose build script builds the kernel object); returns the binary's path.
pub fn build(release: bool) -> Result<PathBuf> {
    let mut c = cargo();
    c.args(["build", "--package", "vpcgate"]);
    if release {
        c.arg("--release");
    }
    step("build the kernel object and the vpcgate binary", &mut c)?;
    let bin = root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("vpcgate");
    eprintln!("built {}", bin.display());
    Ok(bin)
}

/// Wall-clock timings of named phases, printed as a table.
#[derive(Default)]
pub struct Timings(Vec<(String, f64, bool)>);

impl Timings {
    pub fn phase(&mut self, name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let start = Instant::now();
        let result = f();
        self.0.push((
            name.to_owned(),
            start.elapsed().as_secs_f64(),
            result.is_ok(),
        ));
        result.with_context(|| format!("phase `{name}`"))
    }

    pub fn print(&self) {
        eprintln!("\n==> timings");
        for (name, secs, ok) in &self.0 {
            eprintln!(
                "  {:<40} {:>8.1}s  {}",
                name,
                secs,
                if *ok { "ok" } else { "FAILED" }
            );
        }
        let total: f64 = self.0.iter().map(|p| p.1).sum();
        eprintln!("  {:<40} {:>8.1}s", "total", total);
    }
}
