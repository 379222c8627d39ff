//! Loading the kernel programs, attaching them to interfaces, and reading their maps.

mod apply;
mod barrier;
pub mod capacity;
mod counters;
mod error;
mod execute;
mod flows;
mod maps;
pub mod netdev;
mod observe;
pub mod plan;
#[cfg(test)]
mod plan_model;
#[cfg(test)]
mod sim;
pub mod state;
mod stats;

use std::ffi::CString;

pub use apply::ApplyReport;
use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        tc::{self, NlOptions, TcAttachOptions},
    },
};
pub use capacity::{EntryCounts, entry_counts};
pub use counters::DropCounts;
pub use error::DatapathError;
pub use flows::{FlowMap, host_addresses, kernel_now_ns, onlink_prefixes};
pub use observe::{Destination, EventLoss};
pub use state::GenState;
pub use stats::{ParseStats, read_parse_stats};
use vpcgate_common::programs;

/// The kernel object built from `ebpf/` by `build.rs`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vpcgate.bpf.o"));

/// How the XDP program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum XdpAttachMode {
    /// In the driver (native XDP).
    Native,
    /// In the generic (skb) path.
    Generic,
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

/// The loaded kernel object: programs verified and loaded, maps created. Dropping it detaches every
/// link it made (pinning, which keeps them past the agent's exit, comes with the daemon).
pub struct Datapath {
    ebpf: Ebpf,
    /// What `apply` knows of the policy maps, so it touches only the entries it must.
    recorded: state::Recorded,
    /// Waits out packets in flight between the phases of an apply.
    barrier: barrier::Barrier,
    /// Test hook: the next apply fails at this operation of its plan.
    fail_at: Option<usize>,
}

impl Datapath {
    /// Loads the embedded object and both programs into the kernel.
    pub fn load() -> Result<Self, DatapathError> {
        Self::load_object(EBPF_OBJECT)
    }

    /// Loads `object` (an ELF built from `ebpf/`) and both programs into the kernel.
    pub fn load_object(object: &[u8]) -> Result<Self, DatapathError> {
        let mut ebpf = EbpfLoader::new()
            .verifier_log_level(VerifierLogLevel::DEBUG | VerifierLogLevel::STATS)
            .load(object)
            .map_err(DatapathError::Object)?;
        {
            let prog: &mut SchedClassifier = program_mut(&mut ebpf, programs::TC_EGRESS)?;
            prog.load()
                .map_err(|e| DatapathError::load(programs::TC_EGRESS, e))?;
        }
        for name in [programs::XDP_INGRESS, programs::XDP_FORWARD] {
            let prog: &mut Xdp = program_mut(&mut ebpf, name)?;
            prog.load().map_err(|e| DatapathError::load(name, e))?;
        }
        // Maps created by this load are empty: both generation slots are known to be.
        Ok(Self {
            ebpf,
            recorded: state::Recorded::fresh(),
            barrier: barrier::Barrier::new()?,
            fail_at: None,
        })
    }

    /// The loaded TC egress classifier.
    pub fn tc_egress(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        program_mut(&mut self.ebpf, programs::TC_EGRESS)
    }

    /// The loaded XDP program for the ENI's ingress (observe: records inbound flows, never drops).
    pub fn xdp_ingress(&mut self) -> Result<&mut Xdp, DatapathError> {
        program_mut(&mut self.ebpf, programs::XDP_INGRESS)
    }

    /// The loaded XDP program for forward interfaces (enforces like TC egress).
    pub fn xdp_forward(&mut self) -> Result<&mut Xdp, DatapathError> {
        program_mut(&mut self.ebpf, programs::XDP_FORWARD)
    }

    pub(crate) fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub(crate) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Attaches the TC egress classifier to `interface` (in the caller's network namespace): a tcx link
    /// where the kernel has tcx, else a filter on a clsact qdisc (added when missing).
    pub fn attach_tc_egress(&mut self, interface: &str) -> Result<TcAttachMode, DatapathError> {
        ifindex(interface)?;
        require_ethernet(interface)?;
        let tcx = has_tcx();
        if !tcx {
            // EEXIST just means the qdisc is there already.
            if let Err(e) = tc::qdisc_add_clsact(interface)
                && !matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
            {
                return Err(DatapathError::Attach {
                    program: programs::TC_EGRESS,
                    interface: interface.to_owned(),
                    source: ProgramError::from(e),
                });
            }
        }
        // First in the chain (tcx) or at the highest priority (clsact): a program before ours could
        // otherwise end the chain with a verdict and skip enforcement.
        let options = if tcx {
            TcAttachOptions::TcxOrder(LinkOrder::first())
        } else {
            TcAttachOptions::Netlink(NlOptions {
                priority: 1,
                ..NlOptions::default()
            })
        };
        self.tc_egress()?
            .attach_with_options(interface, TcAttachType::Egress, options)
            .map_err(|source| DatapathError::Attach {
                program: programs::TC_EGRESS,
                interface: interface.to_owned(),
                source,
            })?;
        Ok(if tcx {
            TcAttachMode::Tcx
        } else {
            TcAttachMode::Clsact
        })
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
    /// it, generic mode otherwise. The mode actually used is returned, never silently assumed.
    pub fn attach_xdp(
        &mut self,
        interface: &str,
        role: XdpRole,
    ) -> Result<XdpAttachMode, DatapathError> {
        let index = ifindex(interface)?;
        require_ethernet(interface)?;
        let name = role.program();
        // Where the kernel can tell (xdp-features, 6.3+) that the driver has no native XDP, go straight
        // to generic; otherwise try the driver first.
        let native = netdev::native_xdp(index).unwrap_or_else(|e| {
            tracing::debug!(interface, error = %e, "cannot read the interface's XDP features");
            netdev::NativeXdp::Unknown
        });
        let prog: &mut Xdp = program_mut(&mut self.ebpf, name)?;
        let refused = if native == netdev::NativeXdp::Unsupported {
            "the driver has no native XDP (xdp-features)".to_owned()
        } else {
            match prog.attach(interface, XdpMode::Driver) {
                Ok(_) => return Ok(XdpAttachMode::Native),
                Err(e) => format!("native XDP refused: {e}"),
            }
        };
        tracing::info!(interface, program = name, reason = %refused, "attaching XDP in generic mode");
        prog.attach(interface, XdpMode::Skb)
            .map_err(|source| DatapathError::Attach {
                program: name,
                interface: interface.to_owned(),
                source,
            })?;
        Ok(XdpAttachMode::Generic)
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
