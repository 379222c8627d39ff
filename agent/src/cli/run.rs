//! `vpcgate run --config FILE`: load, apply, attach, and enforce in the foreground.
//!
//! This is the minimal form: the programs are detached when it exits. Pinning (enforcement that outlives
//! the agent), the control socket, metrics and file watching come with the daemon.

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
    forward interface. SIGHUP re-reads the file (an invalid file is reported and the current policy stays).\n\
    SIGINT/SIGTERM detach everything and exit 0. Exit 1: the policy is invalid; 2: load or attach failed."
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

pub fn run(args: &Args) -> u8 {
    let (policy, compiled) = match compile(&args.config) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let mut dp = match Datapath::load() {
        Ok(dp) => dp,
        Err(e) => {
            tracing::error!(error = %e, "cannot load the kernel programs");
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
            tracing::error!(error = %e, "cannot attach; detaching what was attached");
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
        tracing::info!("stopping: detaching the programs");
        EXIT_OK
    })
}
