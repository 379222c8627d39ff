//! Loading the kernel programs, attaching them to interfaces, and reading their maps.

mod apply;
mod barrier;
pub mod btf;
pub mod capacity;
mod counters;
mod epoch;
mod error;
mod execute;
mod flows;
pub mod ktrace;
mod maps;
pub mod netdev;
mod observe;
pub mod pin;
pub mod plan;
#[cfg(test)]
mod plan_model;
mod probe;
mod rule_counters;
#[cfg(test)]
mod sim;
pub mod state;
mod stats;
mod verdict_cache;

use std::ffi::CString;

pub use apply::ApplyReport;
use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, TcAttachOptions},
    },
};
use aya_obj::programs::XdpAttachType;
pub use capacity::{EntryCounts, entry_counts};
pub use counters::DropCounts;
pub use error::DatapathError;
pub use flows::{FlowMap, host_addresses, interface_address, kernel_now_ns, onlink_prefixes};
pub use observe::{Destination, EventLoss, address_of};
pub use probe::probe_key;
#[doc(hidden)]
pub use rule_counters::BATCH_BYTES as RULE_COUNTER_BATCH_BYTES;
pub use state::GenState;
pub use stats::{ParseStats, read_parse_stats};
use vpcgate_common::programs;

/// The kernel object built from `ebpf/` by `build.rs`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vpcgate.bpf.o"));

/// Where the build left the benchmark's baseline programs (ebpf/src/bench.rs): `cargo xtask bench` loads
/// them from there. Not embedded (the agent never loads them); absent when `VPCGATE_EBPF_OBJ` replaced
/// the build.
pub const BENCH_OBJECT_PATH: &str = concat!(env!("OUT_DIR"), "/vpcgate-bench.bpf.o");

/// How the XDP program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum XdpAttachMode {
    /// In the driver (native XDP).
    Native,
    /// In the generic (skb) path.
    Generic,
    /// An adopted link whose mode could not be read back (`ip` missing).
    Unknown,
}

/// Which XDP program to attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpRole {
    /// The ENI's ingress: observe replies and inbound flows.
    EniIngress,
    /// A forward interface: enforce gateway egress arriving from pods/VMs.
    Forward,
}

impl XdpRole {
    pub fn program(self) -> &'static str {
        match self {
            XdpRole::EniIngress => programs::XDP_INGRESS,
            XdpRole::Forward => programs::XDP_FORWARD,
        }
    }
}

/// How the TC program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TcAttachMode {
    /// A tcx link (kernel >= 6.6).
    Tcx,
    /// A cls_bpf filter on a clsact qdisc (older kernels).
    Clsact,
}

/// How `open` came by the instance's kernel state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Opened {
    /// Nothing was pinned: programs loaded, maps created, all pinned.
    Loaded,
    /// This build's pinned programs and maps were adopted: same program ids, nothing detached.
    Adopted,
}

/// Programs opened from their pins (an adopting agent never loads its own).
struct AdoptedPrograms {
    tc_egress: SchedClassifier,
    xdp_ingress: Xdp,
    xdp_forward: Xdp,
}

/// The loaded kernel object: programs verified and loaded, maps created. Unpinned (`load`), dropping it
/// detaches every link it made; pinned (`open`), links, programs and maps stay in the kernel when it is
/// dropped or the process dies, until `pin::teardown`.
pub struct Datapath {
    ebpf: Ebpf,
    /// What `apply` knows of the policy maps, so it touches only the entries it must.
    recorded: state::Recorded,
    /// Waits out packets in flight between the phases of an apply.
    barrier: barrier::Barrier,
    /// `POLICY_EPOCH`, mapped for one-store writes (`epoch`): mapped at load or adoption, so that an
    /// apply's epochs cannot fail to be written half-way. None when opened to inspect (nothing written).
    epoch: Option<epoch::EpochWord>,
    /// Test hook: the next apply fails at this operation of its plan.
    fail_at: Option<usize>,
    /// Set when the programs were adopted from pins (the object's own are then never loaded).
    adopted: Option<AdoptedPrograms>,
    /// Where this instance's state is pinned; None for an unpinned load.
    pins: Option<pin::Pins>,
    /// Rule counters applies deleted, for the caller to fold into totals.
    folded: Vec<(u8, u32, vpcgate_common::datapath::RuleStats)>,
    /// Rule ids below which `RULE_COUNTERS` may count, in any generation: the largest policy applied
    /// since the array was created (empty). None when the array was adopted (its history is unknown):
    /// then it is read whole.
    counted_below: Option<u32>,
}

const PROGRAMS: [&str; 3] = [
    programs::TC_EGRESS,
    programs::XDP_INGRESS,
    programs::XDP_FORWARD,
];

fn load_programs(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    {
        let prog: &mut SchedClassifier = program_mut(ebpf, programs::TC_EGRESS)?;
        prog.load()
            .map_err(|e| DatapathError::load(programs::TC_EGRESS, e))?;
    }
    for name in [programs::XDP_INGRESS, programs::XDP_FORWARD] {
        let prog: &mut Xdp = program_mut(ebpf, name)?;
        prog.load().map_err(|e| DatapathError::load(name, e))?;
    }
    Ok(())
}

/// The loader, with `RULE_COUNTERS` sized at `counter_slots` per CPU (`rule_counters::size`) and
/// `VERDICT_CACHE` at `cache_bits` (`verdict_cache::size`).
fn loader<'a>(
    counter_slots: &'a u32,
    cache_bits: &'a u32,
) -> Result<EbpfLoader<'a>, DatapathError> {
    let mut l = EbpfLoader::new();
    l.verifier_log_level(VerifierLogLevel::DEBUG | VerifierLogLevel::STATS);
    rule_counters::size(&mut l, counter_slots)?;
    verdict_cache::size(&mut l, cache_bits);
    Ok(l)
}

/// The `max_entries` of map `name` pinned at `pins`, None when it is not pinned.
fn pinned_entries(pins: &pin::Pins, name: &'static str) -> Result<Option<u32>, DatapathError> {
    let path = pins.map(name);
    if !path.exists() {
        return Ok(None);
    }
    aya::maps::MapInfo::from_pin(&path)
        .map(|info| Some(info.max_entries()))
        .map_err(|source| DatapathError::Map { map: name, source })
}

/// Loads `object` with every map pinned at (or opened from) `pins`.
fn load_pinned(
    object: &[u8],
    names: &std::collections::BTreeSet<String>,
    pins: &pin::Pins,
) -> Result<Ebpf, DatapathError> {
    use vpcgate_common::datapath::names::{RULE_COUNTERS, VERDICT_CACHE};
    // A pinned counter array keeps the size it was created with (an agent that sized it otherwise may
    // have pinned it): the loader takes that size, so that every bounds check agrees with the kernel's.
    // So does the verdict cache.
    let slots = match pinned_entries(pins, RULE_COUNTERS)? {
        Some(n) => rule_counters::slots_of(n)?,
        None => rule_counters::rule_counter_slots()?,
    };
    let bits = match pinned_entries(pins, VERDICT_CACHE)? {
        Some(n) => verdict_cache::bits_of(n)?,
        None => verdict_cache::host_bits()?,
    };
    let mut l = loader(&slots, &bits)?;
    for n in names {
        l.map_pin_path(n.as_str(), pins.map(n));
    }
    let ebpf = l.load(object).map_err(DatapathError::Object)?;
    // Every map of the object is one of the pinned ones (a map the loader created on its own would be
    // state no restart could find). The programs' read-only data (`.rodata`: the counter array's slots
    // per CPU, the verdict cache's region size) is no state: it is frozen at load, set from the pinned
    // arrays' own sizes, and held by the programs that read it (bpffs names cannot start with a dot).
    if let Some((extra, _)) = ebpf
        .maps()
        .find(|(n, _)| !n.starts_with('.') && !names.contains(*n))
    {
        return Err(DatapathError::Pin {
            path: pins.maps(),
            what: "pin every map",
            source: std::io::Error::other(format!("map {extra} is not among the object's maps")),
        });
    }
    Ok(ebpf)
}

impl Datapath {
    /// Loads the embedded object and both programs into the kernel.
    pub fn load() -> Result<Self, DatapathError> {
        Self::load_object(EBPF_OBJECT)
    }

    /// Loads `object` (an ELF built from `ebpf/`) and both programs into the kernel, pinning nothing.
    pub fn load_object(object: &[u8]) -> Result<Self, DatapathError> {
        let slots = rule_counters::rule_counter_slots()?;
        let bits = verdict_cache::host_bits()?;
        Self::load_with(object, loader(&slots, &bits)?)
    }

    /// Test hook: the embedded object with `slots` slots in `RULE_COUNTERS` (instead of this host's
    /// share), so that tests reach the rules counted in `RULE_STATS` with a small policy.
    #[doc(hidden)]
    pub fn load_with_counter_slots(slots: u32) -> Result<Self, DatapathError> {
        let bits = verdict_cache::host_bits()?;
        Self::load_with(EBPF_OBJECT, loader(&slots, &bits)?)
    }

    /// Test hook: the embedded object with `1 << bits` records per hook and CPU in `VERDICT_CACHE`
    /// (instead of this host's share), so that tests make destinations share slots often.
    #[doc(hidden)]
    pub fn load_with_cache_bits(bits: u32) -> Result<Self, DatapathError> {
        let bits = verdict_cache::bits_of(vpcgate_common::datapath::verdict_cache_elements(bits))?;
        let slots = rule_counters::rule_counter_slots()?;
        Self::load_with(EBPF_OBJECT, loader(&slots, &bits)?)
    }

    fn load_with(object: &[u8], mut loader: EbpfLoader<'_>) -> Result<Self, DatapathError> {
        let mut ebpf = loader.load(object).map_err(DatapathError::Object)?;
        load_programs(&mut ebpf)?;
        // Maps created by this load are empty: both generation slots are known to be.
        Ok(Self {
            epoch: Some(epoch::epoch_word(&ebpf)?),
            ebpf,
            recorded: state::Recorded::fresh(),
            barrier: barrier::Barrier::new()?,
            fail_at: None,
            adopted: None,
            pins: None,
            folded: vec![],
            counted_below: Some(0),
        })
    }

    /// The embedded object for `instance`, pinned under /sys/fs/bpf/vpcgate/<instance>/: adopted when
    /// this build pinned it before (what the kernel holds is then read back, not assumed), loaded and
    /// pinned when nothing is pinned, refused when another build's state is there. Mounts bpffs if needed.
    pub fn open(instance: &str) -> Result<(Self, Opened), DatapathError> {
        Self::open_object(instance, EBPF_OBJECT)
    }

    pub fn open_object(instance: &str, object: &[u8]) -> Result<(Self, Opened), DatapathError> {
        Self::open_with(instance, object, true)
    }

    /// The instance's pinned maps and programs, read-only in spirit: nothing is loaded, created, removed
    /// or attached (`status` uses it, with or without a running agent). Fails when nothing of this build
    /// is pinned.
    pub fn inspect(instance: &str) -> Result<Self, DatapathError> {
        match Self::open_with(instance, EBPF_OBJECT, false)? {
            (dp, Opened::Adopted) => Ok(dp),
            (_, Opened::Loaded) => unreachable!("inspect never loads"),
        }
    }

    fn open_with(
        instance: &str,
        object: &[u8],
        owner: bool,
    ) -> Result<(Self, Opened), DatapathError> {
        pin::check_instance(instance)?;
        if owner {
            pin::ensure_bpffs()?;
        }
        let build = pin::build_id(object);
        let names = pin::map_names(object)?;
        match pin::survey(instance, &build, owner)? {
            pin::Found::Others(found) => Err(DatapathError::ForeignBuild {
                instance: instance.to_owned(),
                found,
                ours: build,
            }),
            pin::Found::Ours => {
                let pins = pin::Pins {
                    dir: pin::instance_dir(instance).join(&build),
                };
                let missing: Vec<String> = names
                    .iter()
                    .map(|n| pins.map(n))
                    .chain(PROGRAMS.iter().map(|p| pins.prog(p)))
                    .filter(|p| !p.exists())
                    .map(|p| p.display().to_string())
                    .collect();
                if !missing.is_empty() {
                    return Err(DatapathError::IncompletePins {
                        instance: instance.to_owned(),
                        dir: pins.dir.clone(),
                        missing: missing.join(", "),
                    });
                }
                for d in [pins.maps(), pins.progs(), pins.links()] {
                    if d.exists() {
                        pin::trusted_dir(&d)?;
                    }
                }
                let ebpf = load_pinned(object, &names, &pins)?;
                let prog_err = |name| move |e| DatapathError::load(name, e);
                let adopted = AdoptedPrograms {
                    tc_egress: SchedClassifier::from_pin(pins.prog(programs::TC_EGRESS))
                        .map_err(prog_err(programs::TC_EGRESS))?,
                    xdp_ingress: Xdp::from_pin(
                        pins.prog(programs::XDP_INGRESS),
                        XdpAttachType::Interface,
                    )
                    .map_err(prog_err(programs::XDP_INGRESS))?,
                    xdp_forward: Xdp::from_pin(
                        pins.prog(programs::XDP_FORWARD),
                        XdpAttachType::Interface,
                    )
                    .map_err(prog_err(programs::XDP_FORWARD))?,
                };
                // Each pinned program is the one it is named after (the kernel keeps 15 bytes of a name).
                for (name, info) in [
                    (programs::TC_EGRESS, adopted.tc_egress.info()),
                    (programs::XDP_INGRESS, adopted.xdp_ingress.info()),
                    (programs::XDP_FORWARD, adopted.xdp_forward.info()),
                ] {
                    let info = info.map_err(prog_err(name))?;
                    let got = info.name_as_str().unwrap_or_default().to_owned();
                    if got.is_empty() || !name.starts_with(&got) {
                        return Err(DatapathError::IncompletePins {
                            instance: instance.to_owned(),
                            dir: pins.progs(),
                            missing: format!("{name} (the pin holds a program named {got:?})"),
                        });
                    }
                }
                let mut dp = Self {
                    // Only the owner writes epochs (`inspect` maps nothing writable).
                    epoch: if owner {
                        Some(epoch::epoch_word(&ebpf)?)
                    } else {
                        None
                    },
                    ebpf,
                    // Another process wrote these maps: found by reading them.
                    recorded: state::Recorded::unknown(),
                    barrier: barrier::Barrier::new()?,
                    fail_at: None,
                    adopted: Some(adopted),
                    pins: Some(pins),
                    folded: vec![],
                    counted_below: None,
                };
                if owner {
                    // The agent before may have stopped between a map write and its new epoch.
                    dp.fence_memos()?;
                }
                Ok((dp, Opened::Adopted))
            }
            pin::Found::Nothing if !owner => Err(DatapathError::NoInstance(instance.to_owned())),
            pin::Found::Nothing => {
                let staging = pin::staging(instance)?;
                let staged = (|| {
                    let mut ebpf = load_pinned(object, &names, &staging)?;
                    load_programs(&mut ebpf)?;
                    for name in PROGRAMS {
                        let prog = ebpf
                            .program_mut(name)
                            .ok_or(DatapathError::MissingProgram(name))?;
                        prog.pin(staging.prog(name))
                            .map_err(|e| DatapathError::Pin {
                                path: staging.prog(name),
                                what: "pin the program",
                                source: std::io::Error::other(e.to_string()),
                            })?;
                    }
                    // What could still fail is done before the commit: a failure leaves no pins.
                    let epoch = epoch::epoch_word(&ebpf)?;
                    let barrier = barrier::Barrier::new()?;
                    Ok((ebpf, epoch, barrier))
                })();
                let (ebpf, epoch, barrier) = match staged {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = pin::remove_tree(&staging.dir);
                        return Err(e);
                    }
                };
                // Complete: move it into place before anything is attached.
                let pins = pin::commit(&staging, instance, &build)?;
                Ok((
                    Self {
                        epoch: Some(epoch),
                        ebpf,
                        recorded: state::Recorded::fresh(),
                        barrier,
                        fail_at: None,
                        adopted: None,
                        pins: Some(pins),
                        folded: vec![],
                        counted_below: Some(0),
                    },
                    Opened::Loaded,
                ))
            }
        }
    }

    /// Where this instance is pinned (None for an unpinned load).
    pub fn pin_dir(&self) -> Option<&std::path::Path> {
        self.pins.as_ref().map(|p| p.dir.as_path())
    }

    /// The kernel's id of each program: (name, id).
    pub fn program_ids(&mut self) -> Result<Vec<(&'static str, u32)>, DatapathError> {
        let tc = self
            .tc_egress()?
            .info()
            .map_err(|e| DatapathError::load(programs::TC_EGRESS, e))?
            .id();
        let xi = self
            .xdp_ingress()?
            .info()
            .map_err(|e| DatapathError::load(programs::XDP_INGRESS, e))?
            .id();
        let xf = self
            .xdp_forward()?
            .info()
            .map_err(|e| DatapathError::load(programs::XDP_FORWARD, e))?
            .id();
        Ok(vec![
            (programs::TC_EGRESS, tc),
            (programs::XDP_INGRESS, xi),
            (programs::XDP_FORWARD, xf),
        ])
    }

    /// The loaded TC egress classifier.
    pub fn tc_egress(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        match &mut self.adopted {
            Some(a) => Ok(&mut a.tc_egress),
            None => program_mut(&mut self.ebpf, programs::TC_EGRESS),
        }
    }

    /// The loaded XDP program for the ENI's ingress (observe: records inbound flows, never drops).
    pub fn xdp_ingress(&mut self) -> Result<&mut Xdp, DatapathError> {
        match &mut self.adopted {
            Some(a) => Ok(&mut a.xdp_ingress),
            None => program_mut(&mut self.ebpf, programs::XDP_INGRESS),
        }
    }

    /// The loaded XDP program for forward interfaces (enforces like TC egress).
    pub fn xdp_forward(&mut self) -> Result<&mut Xdp, DatapathError> {
        match &mut self.adopted {
            Some(a) => Ok(&mut a.xdp_forward),
            None => program_mut(&mut self.ebpf, programs::XDP_FORWARD),
        }
    }

    pub(crate) fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub(crate) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Attaches the TC egress classifier to `interface` (in the caller's network namespace): a tcx link
    /// where the kernel has tcx, else a filter on a clsact qdisc (added when missing). Pinned, the link
    /// (or, for clsact, a marker naming the filter) is pinned too; an attachment this instance pinned
    /// before and that still holds our program on this interface is adopted as it is.
    pub fn attach_tc_egress(&mut self, interface: &str) -> Result<TcAttachMode, DatapathError> {
        let index = ifindex(interface)?;
        require_ethernet(interface)?;
        let tcx = has_tcx();
        let attach_err = |source| DatapathError::Attach {
            program: programs::TC_EGRESS,
            interface: interface.to_owned(),
            source,
        };
        let pins = self.pins.clone();
        // A pinned tcx link that still runs our program on this interface is adopted as it is. One that
        // does not (its interface went away, or another program) is replaced after the new link is
        // attached: the new one is pinned beside it and renamed over it, so there is no gap.
        if tcx && let Some(p) = &pins {
            let path = p.link(programs::TC_EGRESS, interface);
            if path.exists() {
                let ours = self.program_id(programs::TC_EGRESS)?;
                let state = pin::pinned_link_state(&path)?;
                if state.ifindex == index && state.prog_id == ours {
                    return Ok(TcAttachMode::Tcx);
                }
                tracing::warn!(
                    interface,
                    ?state,
                    "pinned tc link does not hold our program here; attaching anew"
                );
            }
        }
        if !tcx {
            // EEXIST just means the qdisc is there already.
            if let Err(e) = tc::qdisc_add_clsact(interface)
                && !matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
            {
                return Err(attach_err(ProgramError::from(e)));
            }
            // The marker first: a crash after the filter is added leaves a filter teardown can find.
            if let Some(p) = &pins {
                let marker = p.link("clsact", interface);
                if !marker.exists() {
                    let prog = self.tc_egress()?;
                    prog.pin(&marker).map_err(|e| DatapathError::Pin {
                        path: marker.clone(),
                        what: "pin the clsact marker",
                        source: std::io::Error::other(e.to_string()),
                    })?;
                }
            }
        }
        // First in the chain (tcx) or at the highest priority (clsact): a program before ours could
        // otherwise end the chain with a verdict and skip enforcement.
        let options = if tcx {
            TcAttachOptions::TcxOrder(LinkOrder::first())
        } else {
            TcAttachOptions::Netlink(NlOptions {
                priority: 1,
                handle: pin::CLSACT_HANDLE.into(),
                ..NlOptions::default()
            })
        };
        let prog = self.tc_egress()?;
        let id = match prog.attach_with_options(interface, TcAttachType::Egress, options) {
            Ok(id) => id,
            // A filter at our priority and handle is there already (a previous agent's, whatever
            // program it runs): replace its program with ours in place (cls_bpf swaps atomically).
            Err(ProgramError::TcError(tc::TcError::NetlinkError(e)))
                if !tcx && pins.is_some() && e.raw_os_error() == Some(libc::EEXIST) =>
            {
                let existing = tc::SchedClassifierLink::attached(
                    interface,
                    TcAttachType::Egress,
                    1,
                    pin::CLSACT_HANDLE.into(),
                    None,
                )
                .map_err(|source| DatapathError::InterfaceQuery {
                    interface: interface.to_owned(),
                    what: "name its cls_bpf filter",
                    source,
                })?;
                prog.attach_to_link(existing).map_err(attach_err)?
            }
            Err(e) => return Err(attach_err(e)),
        };
        if let Some(p) = &pins {
            let link = prog.take_link(id).map_err(attach_err)?;
            if tcx {
                let path = p.link(programs::TC_EGRESS, interface);
                let fd: FdLink = link.try_into().map_err(link_err(&path))?;
                pin_link_over(fd, &path)?;
            } else {
                // A cls_bpf filter is no bpf link: it stays until removed (the marker names it).
                std::mem::forget(link);
            }
        }
        Ok(if tcx {
            TcAttachMode::Tcx
        } else {
            TcAttachMode::Clsact
        })
    }

    /// Removes every pinned attachment of this instance that is not in `wanted` ((program or `clsact`,
    /// interface)): a forward interface dropped from the policy, an ENI renamed. Call it after the
    /// wanted ones are attached. Returns what it removed.
    pub fn prune_links(&mut self, wanted: &[(&str, &str)]) -> Result<Vec<String>, DatapathError> {
        let Some(p) = self.pins.clone() else {
            return Ok(vec![]);
        };
        let keep: std::collections::BTreeSet<std::path::PathBuf> =
            wanted.iter().map(|(prog, i)| p.link(prog, i)).collect();
        let links = p.links();
        let entries = std::fs::read_dir(&links).map_err(|source| DatapathError::Pin {
            path: links.clone(),
            what: "list the link pins",
            source,
        })?;
        let mut removed = vec![];
        for entry in entries {
            let entry = entry.map_err(|source| DatapathError::Pin {
                path: links.clone(),
                what: "list the link pins",
                source,
            })?;
            let path = entry.path();
            if keep.contains(&path) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(interface) = name.strip_prefix("clsact@") {
                pin::detach_clsact(&pin::unescape(interface))?;
            }
            remove_pin(&path)?;
            tracing::info!(link = %name, "removed an attachment the policy no longer names");
            removed.push(name);
        }
        Ok(removed)
    }

    /// What is wrong with the pinned attachments `wanted` ((program or `clsact`, interface)), checked
    /// against the kernel: a pin missing, a link defunct or on another interface or running another
    /// program, an interface gone. Empty: all hold.
    pub fn attachment_problems(
        &mut self,
        wanted: &[(&str, &str)],
    ) -> Result<Vec<String>, DatapathError> {
        let Some(p) = self.pins.clone() else {
            return Ok(vec![]);
        };
        let mut problems = vec![];
        for &(program, interface) in wanted {
            let path = p.link(program, interface);
            let index = match ifindex(interface) {
                Ok(i) => i,
                Err(_) => {
                    problems.push(format!("interface {interface} is gone"));
                    continue;
                }
            };
            if !path.exists() {
                problems.push(format!("{program}@{interface} is not pinned"));
                continue;
            }
            if program == "clsact" {
                continue;
            }
            let state = pin::pinned_link_state(&path)?;
            let ours = self.program_id(program)?;
            if state.ifindex != index || state.prog_id != ours {
                problems.push(format!(
                    "{program}@{interface} holds program {} on ifindex {} (want {ours} on {index})",
                    state.prog_id, state.ifindex
                ));
            }
        }
        Ok(problems)
    }

    fn program_id(&mut self, name: &str) -> Result<u32, DatapathError> {
        let (name, info) = match name {
            programs::TC_EGRESS => (programs::TC_EGRESS, self.tc_egress()?.info()),
            programs::XDP_INGRESS => (programs::XDP_INGRESS, self.xdp_ingress()?.info()),
            programs::XDP_FORWARD => (programs::XDP_FORWARD, self.xdp_forward()?.info()),
            _ => return Err(DatapathError::MissingProgram("(unknown program name)")),
        };
        Ok(info.map_err(|e| DatapathError::load(name, e))?.id())
    }

    /// Where the TC egress program sits in `interface`'s tcx egress chain: (position from 0, programs in
    /// the chain); None when it is not attached there (or the kernel has no tcx).
    pub fn tc_chain_position(
        &mut self,
        interface: &str,
    ) -> Result<Option<(usize, usize)>, DatapathError> {
        if !has_tcx() {
            return Ok(None);
        }
        let ours = self
            .tc_egress()?
            .info()
            .map_err(|e| DatapathError::load(programs::TC_EGRESS, e))?
            .id();
        let (_, chain) = SchedClassifier::query_tcx(interface, TcAttachType::Egress)
            .map_err(|e| DatapathError::load(programs::TC_EGRESS, e))?;
        Ok(chain
            .iter()
            .position(|p| p.id() == ours)
            .map(|i| (i, chain.len())))
    }

    /// Attaches an XDP program (`XdpRole`) to `interface`: native (driver) mode where the driver supports
    /// it, generic mode otherwise. The mode actually used is returned, never silently assumed. Pinned,
    /// the link is pinned, and a link pinned before that still holds our program here is adopted.
    pub fn attach_xdp(
        &mut self,
        interface: &str,
        role: XdpRole,
    ) -> Result<XdpAttachMode, DatapathError> {
        let index = ifindex(interface)?;
        require_ethernet(interface)?;
        if role == XdpRole::Forward {
            require_unstacked(interface, index)?;
        }
        let name = role.program();
        let pins = self.pins.clone();
        if let Some(p) = &pins {
            let path = p.link(name, interface);
            if path.exists() {
                let ours = self.program_id(name)?;
                let state = pin::pinned_link_state(&path)?;
                if state.ifindex == index && state.prog_id == ours {
                    return Ok(xdp_mode_of(interface).unwrap_or(XdpAttachMode::Unknown));
                }
                if state.ifindex == index {
                    // Our link on this interface runs another program: swap the program in the link
                    // (atomic; the pin keeps naming the same link).
                    tracing::warn!(
                        interface,
                        program = name,
                        ?state,
                        "pinned XDP link runs another program; replacing it in place"
                    );
                    let link = PinnedLink::from_pin(&path).map_err(link_err(&path))?;
                    let link: aya::programs::xdp::XdpLink =
                        FdLink::from(link).try_into().map_err(link_err(&path))?;
                    let prog: &mut Xdp = match role {
                        XdpRole::EniIngress => self.xdp_ingress()?,
                        XdpRole::Forward => self.xdp_forward()?,
                    };
                    let id = prog
                        .attach_to_link(link)
                        .map_err(|source| DatapathError::Attach {
                            program: name,
                            interface: interface.to_owned(),
                            source,
                        })?;
                    // Dropping our handle closes a descriptor; the pin keeps the link attached.
                    let taken = prog.take_link(id).map_err(|source| DatapathError::Attach {
                        program: name,
                        interface: interface.to_owned(),
                        source,
                    })?;
                    let fd: FdLink = taken.try_into().map_err(link_err(&path))?;
                    drop(fd);
                    return Ok(xdp_mode_of(interface).unwrap_or(XdpAttachMode::Unknown));
                }
                // Defunct (its interface went away): a new link replaces the pin below.
                tracing::warn!(
                    interface,
                    program = name,
                    ?state,
                    "pinned XDP link is defunct; attaching anew"
                );
            }
        }
        // Where the kernel can tell (xdp-features, 6.3+) that the driver has no native XDP, go straight
        // to generic; otherwise try the driver first.
        let native = netdev::native_xdp(index).unwrap_or_else(|e| {
            tracing::warn!(interface, error = %e, "cannot read the interface's XDP features; trying native XDP first");
            netdev::NativeXdp::Unknown
        });
        let prog: &mut Xdp = match role {
            XdpRole::EniIngress => self.xdp_ingress()?,
            XdpRole::Forward => self.xdp_forward()?,
        };
        let attach_err = |source| DatapathError::Attach {
            program: name,
            interface: interface.to_owned(),
            source,
        };
        let mut attached = None;
        let refused = if native == netdev::NativeXdp::Unsupported {
            "the driver has no native XDP (xdp-features)".to_owned()
        } else {
            match prog.attach(interface, XdpMode::Driver) {
                Ok(id) => {
                    attached = Some((id, XdpAttachMode::Native));
                    String::new()
                }
                Err(e) => format!("native XDP refused: {e}"),
            }
        };
        let (id, mode) = match attached {
            Some(a) => a,
            None => {
                tracing::info!(interface, program = name, reason = %refused, "attaching XDP in generic mode");
                let id = prog.attach(interface, XdpMode::Skb).map_err(attach_err)?;
                (id, XdpAttachMode::Generic)
            }
        };
        if let Some(p) = &pins {
            let link = prog.take_link(id).map_err(attach_err)?;
            let path = p.link(name, interface);
            let fd: FdLink = link.try_into().map_err(link_err(&path))?;
            pin_link_over(fd, &path)?;
        }
        Ok(mode)
    }

    /// How many instructions the verifier processed for each program (kernel >= 5.16 reports it): the
    /// headroom below the verifier's 1,000,000 limit.
    pub fn verified_instructions(&self) -> Vec<(&'static str, Option<u32>)> {
        [
            programs::TC_EGRESS,
            programs::XDP_INGRESS,
            programs::XDP_FORWARD,
        ]
        .into_iter()
        .map(|name| {
            let n = self
                .ebpf
                .program(name)
                .and_then(|p| p.info().ok())
                .and_then(|i| i.verified_instruction_count());
            (name, n)
        })
        .collect()
    }

    /// Sums the per-CPU parse counters.
    pub fn parse_stats(&self) -> Result<ParseStats, DatapathError> {
        read_parse_stats(&self.ebpf)
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?;
    prog.try_into().map_err(|e| DatapathError::load(name, e))
}

/// Creates the swap's barrier and waits once, as every apply does: how long that RCU grace period took.
pub fn barrier_probe() -> Result<std::time::Duration, DatapathError> {
    let barrier = barrier::Barrier::new()?;
    let start = std::time::Instant::now();
    barrier.wait()?;
    Ok(start.elapsed())
}

/// Refuses a forward interface stacked on a lower device (see `netdev::is_stacked`).
pub fn require_unstacked(interface: &str, index: u32) -> Result<(), DatapathError> {
    let kind = netdev::link_kind(index).map_err(|source| DatapathError::InterfaceQuery {
        interface: interface.to_owned(),
        what: "read its kind (RTM_GETLINK)",
        source,
    })?;
    match kind {
        Some(k) if netdev::is_stacked(&k) => Err(DatapathError::StackedForward {
            interface: interface.to_owned(),
            kind: format!("{k}"),
        }),
        _ => Ok(()),
    }
}

fn link_err(
    path: &std::path::Path,
) -> impl Fn(aya::programs::links::LinkError) -> DatapathError + '_ {
    move |e| DatapathError::Pin {
        path: path.to_owned(),
        what: "make the attachment a pinnable link (needs a bpf_link: tcx, or XDP on 5.9+)",
        source: std::io::Error::other(e.to_string()),
    }
}

/// Pins `link` at `path`, replacing (and so releasing) a link pinned there before: pinned beside it
/// first and renamed over it, so `path` always names an attached link.
fn pin_link_over(link: FdLink, path: &std::path::Path) -> Result<(), DatapathError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push("-new");
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let pinned: PinnedLink = link.pin(&tmp).map_err(|e| DatapathError::Pin {
        path: tmp.clone(),
        what: "pin the link",
        source: std::io::Error::other(e.to_string()),
    })?;
    std::fs::rename(&tmp, path).map_err(|source| DatapathError::Pin {
        path: path.to_owned(),
        what: "move the link pin into place",
        source,
    })?;
    // Closing our descriptor leaves the pin holding the link.
    drop(pinned);
    Ok(())
}

fn remove_pin(path: &std::path::Path) -> Result<(), DatapathError> {
    std::fs::remove_file(path).map_err(|source| DatapathError::Pin {
        path: path.to_owned(),
        what: "unpin",
        source,
    })
}

/// The mode XDP runs in on `interface` as `ip link` shows it (generic programs are `xdpgeneric`);
/// None when it cannot tell.
fn xdp_mode_of(interface: &str) -> Option<XdpAttachMode> {
    let out = std::process::Command::new("ip")
        .args(["-d", "link", "show", "dev", interface])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("xdpgeneric") {
        Some(XdpAttachMode::Generic)
    } else if text.contains("xdp") {
        Some(XdpAttachMode::Native)
    } else {
        None
    }
}

/// Whether TC programs attach as tcx links (kernel >= 6.6) rather than clsact filters.
pub fn has_tcx() -> bool {
    use aya::util::KernelVersion;
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// The programs parse frames from their Ethernet header: on an interface without one (tun, wireguard,
/// ipip: ARPHRD other than ETHER) the IP header would be read as an Ethernet header and most packets would
/// look like non-IP frames, which pass. Refuse those interfaces.
pub fn require_ethernet(interface: &str) -> Result<(), DatapathError> {
    let fail = |why: String| DatapathError::NotEthernet(interface.to_owned(), why);
    // SIOCGIFHWADDR on a socket of this thread's network namespace (sysfs may show another one).
    // SAFETY: plain syscalls on a socket we own and a zeroed ifreq we fill within its bounds.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(fail(format!("socket: {}", std::io::Error::last_os_error())));
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req
            .ifr_name
            .iter_mut()
            .zip(interface.bytes().take(libc::IFNAMSIZ - 1))
        {
            *d = s as libc::c_char;
        }
        let rc = libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            return Err(fail(format!("SIOCGIFHWADDR: {err}")));
        }
        match req.ifr_ifru.ifru_hwaddr.sa_family {
            libc::ARPHRD_ETHER => Ok(()),
            other => Err(fail(format!(
                "its link type is {other} (ARPHRD_ETHER is 1)"
            ))),
        }
    }
}

/// The interface's index in the caller's network namespace.
pub fn ifindex(interface: &str) -> Result<u32, DatapathError> {
    let missing = || DatapathError::InterfaceNotFound(interface.to_owned());
    let name = CString::new(interface).map_err(|_| missing())?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        Err(missing())
    } else {
        Ok(index)
    }
}
