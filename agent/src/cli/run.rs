//! `vpcgate run --config FILE`: load (or adopt what this build pinned), apply, attach, and enforce.
//!
//! Programs, maps and links are pinned under /sys/fs/bpf/vpcgate/<instance>/: when the agent exits,
//! crashes or is restarted, enforcement stays in the kernel and the next agent adopts it without a
//! window. `vpcgate teardown --instance NAME` removes it. The control socket, metrics and file watching
//! come with the rest of the daemon.

use std::path::{Path, PathBuf};

use tokio::signal::unix::{SignalKind, signal};

use super::{EXIT_ERROR, EXIT_FAILED, EXIT_OK};
use crate::{
    datapath::{self, Datapath, DatapathError, XdpRole},
    policy::{self, Policy, compile::Compiled},
};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  vpcgate run --config /etc/vpcgate/policy.toml\n\n\
    Applies the policy, then attaches TC egress and XDP ingress to [instance].interface and XDP to each\n\
    forward interface, all pinned under /sys/fs/bpf/vpcgate/<instance>/ (bpffs is mounted if missing).\n\
    A restarted agent of the same build adopts what is pinned: same programs, nothing detached, the maps\n\
    read back; another build's pins are refused. SIGHUP re-reads the file (an invalid file is reported and\n\
    the current policy stays). SIGINT/SIGTERM exit 0 and leave enforcement in place: `vpcgate teardown\n\
    --instance NAME` removes it. Exit 1: the policy is invalid; 2: load or attach failed."
)]
pub struct Args {
    /// The policy file (TOML).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Reads, validates and compiles the policy; prints diagnostics when it is invalid.
fn compile(path: &Path) -> Result<(policy::Policy, Compiled), u8> {
    let checked = policy::load(path).map_err(|e| {
        tracing::error!(file = %path.display(), error = %e, "cannot read the policy");
        EXIT_ERROR
    })?;
    for d in &checked.diagnostics {
        eprintln!("{d}");
    }
    let errors = checked.errors();
    match (checked.policy, checked.compiled) {
        (Some(p), Some(c)) => Ok((p, c)),
        _ => {
            tracing::error!(file = %path.display(), errors, "invalid policy: nothing applied");
            Err(EXIT_FAILED)
        }
    }
}

/// Tells the kernel the host's own addresses (flows are recorded only toward them: the interfaces'
/// addresses now, loopback excluded) and the ENI's on-link prefixes.
fn sync_local_addresses(dp: &mut Datapath, policy: &Policy) -> Result<usize, String> {
    let mut addrs =
        datapath::host_addresses().map_err(|e| format!("cannot list addresses: {e}"))?;
    addrs.extend(policy.instance.egress_ip);
    dp.set_local_addresses(&addrs).map_err(|e| e.to_string())?;
    Ok(addrs.len())
}

/// Where the per-instance lock (and, with the daemon, the control socket) lives.
const RUN_DIR: &str = "/run/vpcgate";

/// An exclusive `flock` on /run/vpcgate/<instance>.lock, held while the returned file is open (the
/// kernel drops it when the process dies, however it dies).
fn lock_instance(instance: &str) -> Result<std::fs::File, String> {
    use std::os::{fd::AsRawFd, unix::fs::DirBuilderExt};
    datapath::pin::check_instance(instance).map_err(|e| e.to_string())?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(RUN_DIR)
        .map_err(|e| format!("create {RUN_DIR}: {e}"))?;
    let path = Path::new(RUN_DIR).join(format!("{instance}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            format!(
                "another vpcgate agent runs instance {instance:?} (it holds {}); stop it first",
                path.display()
            )
        } else {
            format!("flock {}: {e}", path.display())
        });
    }
    Ok(file)
}

pub fn run(args: &Args) -> u8 {
    let (policy, compiled) = match compile(&args.config) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let instance = policy.instance.name.clone();
    // One agent per instance: two would race on the same maps.
    let _lock = match lock_instance(&instance) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%instance, error = %e, "cannot take the instance lock");
            return EXIT_ERROR;
        }
    };
    let mut dp = match Datapath::open(&instance) {
        Ok((mut dp, opened)) => {
            let ids = dp.program_ids().unwrap_or_default();
            tracing::info!(%instance, ?opened, pins = %dp.pin_dir().map(|p| p.display().to_string()).unwrap_or_default(), programs = ?ids, "kernel programs ready");
            dp
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot load or adopt the kernel programs");
            return EXIT_ERROR;
        }
    };
    // Policy first, then attach: the programs never see traffic without a policy.
    match dp.apply(&compiled) {
        Ok(r) => tracing::info!(generation = r.generation, entries = ?r.entries, "policy applied"),
        Err(e) => {
            tracing::error!(error = %e, "cannot apply the policy");
            return EXIT_ERROR;
        }
    }
    if let Err(e) = sync_local_addresses(&mut dp, &policy) {
        tracing::error!(error = %e, "cannot record the host's addresses");
        return EXIT_ERROR;
    }
    let iface = &policy.instance.interface;
    let attached = dp
        .attach_tc_egress(iface)
        .and_then(|tc| Ok((tc, dp.attach_xdp(iface, XdpRole::EniIngress)?)))
        .and_then(|(tc, xdp)| {
            let mut forward = vec![];
            for f in &policy.instance.forward_interfaces {
                let mode = dp.attach_xdp(f, XdpRole::Forward)?;
                forward.push(datapath::ifindex(f)?);
                tracing::info!(interface = %f, ?mode, "forward interface enforced");
            }
            // Packets enforced (and counted) at a forward interface's XDP are counted once.
            dp.set_forward_interfaces(&forward)?;
            Ok((tc, xdp))
        });
    match attached {
        Ok((tc, xdp)) => {
            let position = match dp.tc_chain_position(iface) {
                Ok(Some((i, n))) => format!("tcx egress position {} of {n}", i + 1),
                Ok(None) => "clsact egress priority 1".to_owned(),
                Err(e) => format!("tcx chain position unknown: {e}"),
            };
            tracing::info!(interface = %iface, tc = ?tc, %position, xdp = ?xdp, mode = ?policy.instance.mode, "enforcing")
        }
        Err(e) => {
            tracing::error!(error = %e, %instance, "cannot attach; what was attached stays pinned (`vpcgate teardown --instance` removes it)");
            return EXIT_ERROR;
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return EXIT_ERROR;
        }
    };
    rt.block_on(async {
        let (Ok(mut hup), Ok(mut term), Ok(mut int)) =
            (signal(SignalKind::hangup()), signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            tracing::error!("cannot install signal handlers");
            return EXIT_ERROR;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => match compile(&args.config) {
                    Ok((p, c)) if p.instance.interface == policy.instance.interface => {
                        match dp.apply(&c) {
                            Ok(r) => {
                                tracing::info!(generation = r.generation, entries = ?r.entries, "policy reloaded");
                                if let Err(e) = sync_local_addresses(&mut dp, &p) {
                                    tracing::error!(error = %e, "cannot refresh the host's addresses");
                                }
                                if p.instance.forward_interfaces != policy.instance.forward_interfaces {
                                    tracing::warn!(now = ?policy.instance.forward_interfaces, file = ?p.instance.forward_interfaces, "forward_interfaces changed: restart the agent to attach to the new set; enforcement stays on the old one");
                                }
                            }
                            Err(e @ DatapathError::RestoreFailed { .. }) => tracing::error!(error = %e, "reload failed and the previous policy could not be restored: the datapath is in an unknown state; restart the agent"),
                            Err(e) => tracing::error!(error = %e, "reload failed; the previous policy stays active"),
                        }
                    }
                    Ok(_) => tracing::error!("reload changes [instance].interface: restart the agent instead; the previous policy stays active"),
                    Err(_) => tracing::error!("reload failed; the previous policy stays active"),
                },
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        tracing::info!(%instance, "stopping; enforcement stays in the kernel (`vpcgate teardown --instance {instance}` removes it)");
        EXIT_OK
    })
}
