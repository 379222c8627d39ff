//! `vpcgate run --config FILE`: load (or adopt what this build pinned), apply, attach, and enforce.
//!
//! Programs, maps and links are pinned under /sys/fs/bpf/vpcgate/<instance>/: when the agent exits,
//! crashes or is restarted, enforcement stays in the kernel and the next agent adopts it without a
//! window. `vpcgate teardown --instance NAME` removes it. The policy file is watched (inotify, surviving
//! rename-writes and the Kubernetes ConfigMap symlink swap) and re-read on SIGHUP; `/metrics`, `/healthz`
//! and `/readyz` are served on `--metrics-addr`; systemd is told when the agent is ready.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use super::{
    EXIT_ERROR, EXIT_FAILED, EXIT_OK,
    daemon::{self, AgentMetrics},
    record::{self, Record},
};
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
    --instance NAME` removes it. The file is also watched: a change (an editor's rename-write, a\n\
    Kubernetes ConfigMap update) is applied within a second. /metrics (Prometheus text), /healthz and\n\
    /readyz (200 once the policy is applied and while the kernel state is known good) are served on\n\
    --metrics-addr. Exit 1: the policy is invalid; 2: load, attach or serve failed."
)]
pub struct Args {
    /// The policy file (TOML).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Where to serve /metrics, /healthz and /readyz (port 0: any free port, logged).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Reads, validates and compiles the policy; prints diagnostics when it is invalid.
/// Validates and compiles exactly `bytes` (read once: what is applied is what was checked).
fn compile_bytes(path: &Path, bytes: &[u8]) -> Result<(policy::Policy, Compiled), u8> {
    let checked = policy::check_bytes(&path.display().to_string(), bytes);
    for d in &checked.diagnostics {
        tracing::warn!(file = %path.display(), "{d}");
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
    let onlink = datapath::onlink_prefixes(&policy.instance.interface)
        .map_err(|e| format!("cannot list {}'s addresses: {e}", policy.instance.interface))?;
    dp.set_onlink_prefixes(&onlink).map_err(|e| e.to_string())?;
    Ok(addrs.len())
}

/// The running agent: the datapath (single owner), the policy in force, what it records for `status`.
struct Agent {
    config: PathBuf,
    dp: Datapath,
    policy: Policy,
    compiled: Compiled,
    /// The policy file's bytes as last applied (watch events are hints; only a change reloads).
    applied_text: Option<Vec<u8>>,
    record: Record,
    metrics: AgentMetrics,
    /// Ready: the policy is applied and the kernel state is known good.
    ready: Arc<AtomicBool>,
    /// The last exposition and when it was built.
    scrape_cache: Option<(Instant, String)>,
    /// How TC egress is attached (None before the first attach).
    attached: Option<datapath::TcAttachMode>,
    /// The index of each attached interface when it was attached.
    attached_ifindex: std::collections::BTreeMap<String, u32>,
    /// An apply failed and could not restore: the kernel state is unknown until a good apply.
    restore_failed: bool,
    /// The rules each generation slot holds (to name the counters an apply deletes).
    gen_rules: std::collections::HashMap<u8, Vec<record::RuleName>>,
}

impl Agent {
    /// Applies `compiled` and records it; the apply's duration goes to the histogram.
    fn apply(
        &mut self,
        compiled: &Compiled,
    ) -> Result<crate::datapath::ApplyReport, DatapathError> {
        // Whatever the outcome, the next scrape shows the kernel after this apply.
        self.scrape_cache = None;
        let start = Instant::now();
        let r = self.dp.apply(compiled);
        let took = start.elapsed();
        self.metrics.apply_seconds.observe(took.as_secs_f64());
        // Counters the apply deleted (the old generation's, removed rules') go into the totals.
        for (g, id, st) in self.dp.take_folded_counters() {
            match self
                .gen_rules
                .get(&g)
                .and_then(|rules| rules.iter().find(|r| r.id == id))
            {
                Some(rule) => self.record.fold(&rule.clone(), st.packets, st.bytes),
                None => tracing::warn!(
                    generation = g,
                    rule = id,
                    packets = st.packets,
                    "counters of a rule this agent cannot name were deleted"
                ),
            }
        }
        if let Ok(report) = &r {
            self.gen_rules
                .insert(report.generation, record::rule_names(compiled));
            self.record.generation = report.generation;
            self.record.applied_at_unix_ms = record::now_unix_ms();
            self.record.apply_ms = took.as_secs_f64() * 1000.0;
            self.record.rules = record::rule_names(compiled);
        }
        r
    }

    /// Keeps a copy of the policy text in force (`diff` compares with it).
    fn save_applied(&self) {
        if let Some(text) = &self.applied_text
            && let Err(e) = record::write_applied(&self.record.instance, text)
        {
            tracing::warn!(error = %e, "cannot keep a copy of the applied policy (diff needs --current)");
        }
    }

    fn save_record(&self) {
        if let Err(e) = record::write(&self.record) {
            tracing::warn!(error = %e, path = %record::path(&self.record.instance).display(), "cannot write the agent record (status works from the kernel maps alone)");
        }
    }

    /// Re-reads the policy file; `only_if_changed` skips a file whose bytes are what was applied.
    fn reload(&mut self, trigger: &str, only_if_changed: bool) -> Result<(), String> {
        let text = daemon::content(&self.config);
        if only_if_changed && text.is_some() && text == self.applied_text {
            tracing::debug!(trigger, "policy file unchanged");
            return Ok(());
        }
        let compiled = match &text {
            Some(bytes) => compile_bytes(&self.config, bytes),
            None => {
                tracing::error!(file = %self.config.display(), "cannot read the policy");
                Err(EXIT_ERROR)
            }
        };
        let result = match compiled {
            Ok((p, _)) if p.instance.interface != self.policy.instance.interface => Err(
                "reload changes [instance].interface: restart the agent instead; the previous policy stays active".to_owned(),
            ),
            Ok((p, _)) if p.instance.name != self.policy.instance.name => Err(
                "reload changes [instance].name: restart the agent instead; the previous policy stays active".to_owned(),
            ),
            Ok((p, c)) => match self.apply(&c) {
                Ok(r) => {
                    tracing::info!(trigger, generation = r.generation, entries = ?r.entries, "policy reloaded");
                    if let Err(e) = sync_local_addresses(&mut self.dp, &p) {
                        tracing::error!(error = %e, "cannot refresh the host's addresses");
                    }
                    let forward_changed =
                        p.instance.forward_interfaces != self.policy.instance.forward_interfaces;
                    self.restore_failed = false;
                    self.policy = p;
                    self.compiled = c;
                    self.applied_text = text;
                    self.save_applied();
                    if forward_changed {
                        // New forward interfaces attached, dropped ones detached (the policy is
                        // already in the maps, so whatever attaches enforces it).
                        if let Err(e) = self.attach_all() {
                            self.ready.store(false, Ordering::Release);
                            return self.reload_done(trigger, Err(format!(
                                "the policy is applied but forward_interfaces could not be attached: {e}"
                            )));
                        }
                    }
                    Ok(())
                }
                Err(e @ DatapathError::RestoreFailed { .. }) => {
                    self.restore_failed = true;
                    self.ready.store(false, Ordering::Release);
                    Err(format!("{e}: the datapath is in an unknown state; restart the agent"))
                }
                Err(e) => {
                    self.resync_generation();
                    Err(format!("{e}; the previous policy stays active"))
                }
            },
            Err(_) => Err("the policy file is invalid or unreadable (see the errors above); the previous policy stays active".to_owned()),
        };
        self.reload_done(trigger, result)
    }

    /// After a failed apply the previous policy may have been restored under the other slot: follow
    /// the kernel, so the next apply's deleted counters are credited to the rules that slot holds.
    fn resync_generation(&mut self) {
        if let Ok(Some(active)) = self.dp.active_generation()
            && active != self.record.generation
        {
            if let Some(rules) = self.gen_rules.get(&self.record.generation).cloned() {
                self.gen_rules.insert(active, rules);
            }
            self.record.generation = active;
        }
    }

    fn reload_done(&mut self, trigger: &str, result: Result<(), String>) -> Result<(), String> {
        self.scrape_cache = None;
        match &result {
            Ok(()) => {
                self.metrics.reload(true);
                self.record.reloads_ok += 1;
                self.record.last_reload_error = None;
            }
            Err(e) => {
                tracing::error!(trigger, error = %e, "reload failed");
                self.metrics.reload(false);
                self.record.reloads_failed += 1;
                self.record.last_reload_error = Some(e.clone());
            }
        }
        self.save_record();
        result
    }

    /// What the policy attaches: (program, or `clsact` for a cls_bpf filter, and interface).
    fn wanted(&self, tc: datapath::TcAttachMode) -> Vec<(&'static str, String)> {
        let iface = self.policy.instance.interface.clone();
        let tc_name = if tc == datapath::TcAttachMode::Tcx {
            vpcgate_common::programs::TC_EGRESS
        } else {
            "clsact"
        };
        let mut wanted = vec![
            (tc_name, iface.clone()),
            (vpcgate_common::programs::XDP_INGRESS, iface),
        ];
        wanted.extend(
            self.policy
                .instance
                .forward_interfaces
                .iter()
                .map(|f| (vpcgate_common::programs::XDP_FORWARD, f.clone())),
        );
        wanted
    }

    /// Attaches (or adopts) everything the policy names, records how, and removes what it no longer
    /// names. Idempotent: it is also how a lost attachment is restored.
    fn attach_all(&mut self) -> Result<(), DatapathError> {
        let iface = self.policy.instance.interface.clone();
        let forward_ifs = self.policy.instance.forward_interfaces.clone();
        let dp = &mut self.dp;
        let tc = dp.attach_tc_egress(&iface)?;
        let xdp = dp.attach_xdp(&iface, XdpRole::EniIngress)?;
        let mut forward = vec![];
        let mut modes = vec![];
        for f in &forward_ifs {
            let mode = dp.attach_xdp(f, XdpRole::Forward)?;
            forward.push(datapath::ifindex(f)?);
            tracing::info!(interface = %f, ?mode, "forward interface enforced");
            modes.push((
                f.clone(),
                "forward".to_owned(),
                format!("{mode:?}").to_lowercase(),
            ));
        }
        // Packets enforced (and counted) at a forward interface's XDP are counted once.
        dp.set_forward_interfaces(&forward)?;
        // What the policy no longer names goes, once what it names is attached.
        let wanted = self.wanted(tc);
        let wanted: Vec<(&str, &str)> = wanted.iter().map(|(p, i)| (*p, i.as_str())).collect();
        self.dp.prune_links(&wanted)?;
        let position = match self.dp.tc_chain_position(&iface) {
            Ok(Some((i, n))) => format!("tcx egress position {} of {n}", i + 1),
            Ok(None) => "clsact egress priority 1".to_owned(),
            Err(e) => format!("tcx chain position unknown: {e}"),
        };
        self.record.tc_attach = format!("{tc:?}").to_lowercase();
        self.record.xdp = std::iter::once((
            iface.clone(),
            "eni".to_owned(),
            format!("{xdp:?}").to_lowercase(),
        ))
        .chain(modes)
        .collect();
        self.attached = Some(tc);
        // The interfaces as attached: one deleted and re-created gets a new index (and, on clsact
        // kernels, no filter: nothing in the pins would show it).
        self.attached_ifindex = self
            .wanted(tc)
            .iter()
            .filter_map(|(_, i)| datapath::ifindex(i).ok().map(|x| (i.clone(), x)))
            .collect();
        tracing::info!(interface = %iface, tc = ?tc, %position, xdp = ?xdp, mode = ?self.policy.instance.mode, "enforcing");
        Ok(())
    }

    /// Checks every attachment against the kernel (a link whose interface was deleted and re-created
    /// holds nothing); re-attaches what was lost. Readiness follows: ready only while all hold.
    fn check_attachments(&mut self) {
        let Some(tc) = self.attached else {
            return;
        };
        let wanted = self.wanted(tc);
        let wanted: Vec<(&str, &str)> = wanted.iter().map(|(p, i)| (*p, i.as_str())).collect();
        let mut problems = match self.dp.attachment_problems(&wanted) {
            Ok(p) => p,
            Err(e) => vec![e.to_string()],
        };
        for (iface, index) in &self.attached_ifindex {
            if datapath::ifindex(iface).is_ok_and(|now| now != *index) {
                problems.push(format!(
                    "interface {iface} was re-created (index {index} before)"
                ));
            }
        }
        if problems.is_empty() {
            if !self.restore_failed {
                self.ready.store(true, Ordering::Release);
            }
            return;
        }
        tracing::error!(?problems, "attachments lost; re-attaching");
        self.ready.store(false, Ordering::Release);
        match self.attach_all() {
            Ok(()) => {
                self.save_record();
                if !self.restore_failed {
                    self.ready.store(true, Ordering::Release);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot re-attach: not ready; egress there is not enforced by vpcgate")
            }
        }
    }

    /// Answers a control-socket request.
    fn control(&mut self, req: &daemon::ControlRequest) -> serde_json::Value {
        match req.command.as_str() {
            "status" => match serde_json::to_value(&self.record) {
                Ok(mut v) => {
                    v["ready"] = self.ready.load(Ordering::Acquire).into();
                    daemon::control_ok(v)
                }
                Err(e) => daemon::control_error("internal", e.to_string()),
            },
            "reload" => match self.reload("control socket", false) {
                Ok(()) => daemon::control_ok(serde_json::json!({
                    "generation": self.record.generation,
                    "apply_ms": self.record.apply_ms,
                })),
                Err(e) => daemon::control_error("reload_failed", e),
            },
            other => daemon::control_error(
                "unknown_command",
                format!("unknown command {other:?}: status, reload"),
            ),
        }
    }

    /// The exposition, rebuilt at most once a second (a snapshot walks the destination map: scrapes in
    /// a burst share one walk instead of queueing behind each other in the agent's loop).
    fn exposition(&mut self) -> String {
        if let Some((at, text)) = &self.scrape_cache
            && at.elapsed() < Duration::from_secs(1)
        {
            return text.clone();
        }
        let s = daemon::snapshot(&self.dp, &self.compiled, &self.record);
        let text = daemon::exposition(&s, &self.metrics, &self.record);
        self.scrape_cache = Some((Instant::now(), text.clone()));
        text
    }
}

/// Blocks or unblocks SIGTERM and SIGINT for the calling thread (`how`: SIG_BLOCK or SIG_UNBLOCK).
///
/// # Safety
/// Changes the thread's signal mask; threads started meanwhile inherit it.
unsafe fn shutdown_signals(how: libc::c_int) {
    // SAFETY: a zeroed sigset_t is then initialised by sigemptyset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

pub fn run(args: &Args) -> u8 {
    // A SIGHUP before the handlers exist would end the process (and systemd counts that a clean
    // exit): ignore it until then; the first loop turn checks the file anyway.
    // A SIGTERM or SIGINT in that window (systemd stopping the agent right after start) is held
    // pending, not acted on by default, and reaches the shutdown handler once it exists.
    // SAFETY: setting a signal disposition and this thread's mask, before any thread is started.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        shutdown_signals(libc::SIG_BLOCK);
    }
    let bytes = match std::fs::read(&args.config) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(file = %args.config.display(), error = %e, "cannot read the policy");
            return EXIT_ERROR;
        }
    };
    let (policy, compiled) = match compile_bytes(&args.config, &bytes) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let instance = policy.instance.name.clone();
    // One agent per instance: two would race on the same maps.
    let _lock = match record::lock_instance(&instance) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%instance, error = %e, "cannot take the instance lock");
            return EXIT_ERROR;
        }
    };
    // The metrics address is bound before anything is attached: a port in use fails the start cleanly.
    let listener = match std::net::TcpListener::bind(args.metrics_addr) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(addr = %args.metrics_addr, error = %e, "cannot serve metrics");
            return EXIT_ERROR;
        }
    };
    let dp = match Datapath::open(&instance) {
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
    // What a previous agent of this instance recorded: which rules its generation held, and the totals.
    let previous = record::read(&instance).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the previous agent's record; per-rule history restarts");
        None
    });
    let mut gen_rules = std::collections::HashMap::new();
    if let Some(p) = &previous
        && p.instance == instance
    {
        gen_rules.insert(p.generation, p.rules.clone());
    }
    let mut agent = Agent {
        scrape_cache: None,
        attached: None,
        attached_ifindex: Default::default(),
        restore_failed: false,
        gen_rules,
        config: args.config.clone(),
        dp,
        applied_text: Some(bytes),
        record: Record {
            instance: instance.clone(),
            pid: std::process::id(),
            build: crate::datapath::pin::build_id(crate::datapath::EBPF_OBJECT),
            policy_file: args.config.display().to_string(),
            interface: policy.instance.interface.clone(),
            totals: previous
                .as_ref()
                .filter(|p| p.instance == instance)
                .map(|p| p.totals.clone())
                .unwrap_or_default(),
            ..Record::default()
        },
        policy,
        compiled: compiled.clone(),
        metrics: AgentMetrics::new(),
        ready: Arc::new(AtomicBool::new(false)),
    };
    // Policy first, then attach: the programs never see traffic without a policy.
    match agent.apply(&compiled) {
        Ok(r) => tracing::info!(generation = r.generation, entries = ?r.entries, "policy applied"),
        Err(e) => {
            tracing::error!(error = %e, "cannot apply the policy");
            return EXIT_ERROR;
        }
    }
    if let Err(e) = sync_local_addresses(&mut agent.dp, &agent.policy) {
        tracing::error!(error = %e, "cannot record the host's addresses");
        return EXIT_ERROR;
    }
    if let Err(e) = agent.attach_all() {
        tracing::error!(error = %e, %instance, "cannot attach; what was attached stays pinned (`vpcgate teardown --instance` removes it)");
        return EXIT_ERROR;
    }
    agent.save_record();
    agent.save_applied();
    agent.ready.store(true, Ordering::Release);
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
    rt.block_on(async move {
        let (Ok(mut hup), Ok(mut term), Ok(mut int)) =
            (signal(SignalKind::hangup()), signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            tracing::error!("cannot install signal handlers");
            return EXIT_ERROR;
        };
        // The handlers exist: a SIGTERM held since start is delivered now.
        // SAFETY: changing this thread's signal mask.
        unsafe { shutdown_signals(libc::SIG_UNBLOCK) };
        let listener = match listener.set_nonblocking(true).and_then(|()| tokio::net::TcpListener::from_std(listener)) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot serve metrics");
                return EXIT_ERROR;
            }
        };
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let (scrape_tx, mut scrape_rx) = mpsc::channel::<daemon::ScrapeRequest>(8);
        let server = tokio::spawn(daemon::serve(listener, scrape_tx, agent.ready.clone()));
        let control_path = daemon::control_path(&instance);
        let control = match daemon::bind_control(&control_path) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(path = %control_path.display(), error = %e, "cannot open the control socket");
                return EXIT_ERROR;
            }
        };
        let (control_tx, mut control_rx) = mpsc::channel::<daemon::ControlCall>(8);
        let control_task = tokio::spawn(daemon::serve_control(control, control_tx));
        let (changed_tx, mut changed_rx) = mpsc::channel::<()>(1);
        // The watch exists before the first check below, so no change can fall between the two.
        let watcher = match daemon::open_watch(&agent.config) {
            Ok(stream) => Some(tokio::spawn(daemon::watch(stream, Duration::from_millis(200), changed_tx.clone()))),
            Err(e) => {
                tracing::error!(file = %agent.config.display(), error = %e, "cannot watch the policy file; reload with SIGHUP or `vpcgate reload`");
                None
            }
        };
        // A change that landed while the agent started (before the watch existed) is applied now.
        let _ = changed_tx.try_send(());
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
        let mut health = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = health.tick() => agent.check_attachments(),
                _ = hup.recv() => { let _ = agent.reload("SIGHUP", false); }
                Some(()) = changed_rx.recv() => { let _ = agent.reload("file change", true); }
                Some((req, reply)) = control_rx.recv() => {
                    let _ = reply.send(agent.control(&req));
                }
                Some(reply) = scrape_rx.recv() => {
                    let _ = reply.send(agent.exposition());
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        server.abort();
        if let Some(w) = watcher {
            w.abort();
        }
        control_task.abort();
        let _ = std::fs::remove_file(&control_path);
        tracing::info!(%instance, "stopping; enforcement stays in the kernel (`vpcgate teardown --instance {instance}` removes it)");
        EXIT_OK
    })
}
