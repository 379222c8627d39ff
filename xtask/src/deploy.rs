//! `cargo xtask check-deploy`: the deployment files, validated offline. The systemd unit goes through
//! `systemd-analyze verify` (pointed at a built binary; any warning fails, since unknown keys are only
//! warnings there), the Kubernetes manifests through `kubernetes-validate --strict` (PyPI, installed in a
//! virtualenv under target/).

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::run::{cmd, root, step};

/// The kubernetes-validate release the manifests are checked with (its newest schema: 1.37).
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

pub fn check(vpcgate: &Path) -> Result<()> {
    let dir = root().join("target/deploy-check");
    std::fs::create_dir_all(&dir)?;
    let unit = std::fs::read_to_string(root().join("deploy/systemd/vpcgate.service"))
        .context("read deploy/systemd/vpcgate.service")?;
    let unit_copy = dir.join("vpcgate.service");
    std::fs::write(
        &unit_copy,
        unit.replace("/usr/local/bin/vpcgate", &vpcgate.display().to_string()),
    )?;
    eprintln!("\n==> systemd-analyze verify deploy/systemd/vpcgate.service");
    let out = cmd("systemd-analyze")
        .arg("verify")
        .arg(&unit_copy)
        .output()
        .context("run systemd-analyze (Debian package systemd)")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Warnings about other units on this machine are not ours; any line about this unit is.
    let ours: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("vpcgate.service"))
        .collect();
    if !out.status.success() || !ours.is_empty() {
        bail!(
            "systemd-analyze verify refused deploy/systemd/vpcgate.service ({}):\n{}",
            out.status,
            ours.join("\n")
        );
    }
    let venv = dir.join("venv");
    let bin = venv.join("bin/kubernetes-validate");
    if !bin.exists() {
        step(
            "python3 -m venv target/deploy-check/venv",
            cmd("python3").args(["-m", "venv"]).arg(&venv),
        )?;
        step(
            &format!("pip install {KUBERNETES_VALIDATE}"),
            cmd(venv.join("bin/pip")).args(["install", "--quiet", KUBERNETES_VALIDATE]),
        )?;
    }
    let mut manifests: Vec<_> = std::fs::read_dir(root().join("deploy/kubernetes"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    manifests.sort();
    if manifests.is_empty() {
        bail!("no manifests under deploy/kubernetes");
    }
    step(
        "kubernetes-validate --strict deploy/kubernetes/*.yaml",
        cmd(&bin).arg("--strict").args(&manifests),
    )
}
