//! The kernel's own drops (`skb:kfree_skb`) of the gateway's packets: where the tracepoint program
//! reads its fields on the running kernel (tracefs for the tracepoint's record, BTF for `struct
//! sk_buff`), the kernel's names for its drop reasons (tracefs, so they are right on every kernel), and
//! attaching the program for as long as the caller keeps the `Datapath`.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use aya::{maps::Array, programs::TracePoint};
use vpcgate_common::{
    datapath::{KernelDrop, KtraceConfig, names},
    programs,
};

use super::{Datapath, DatapathError, btf::Btf, observe::address_of};

/// tracefs, where the kernel describes its tracepoints.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

fn format_path() -> Result<PathBuf, DatapathError> {
    TRACEFS
        .iter()
        .map(|d| PathBuf::from(d).join("events/skb/kfree_skb/format"))
        .find(|p| p.exists())
        .ok_or_else(|| {
            DatapathError::KernelTrace(
                "no events/skb/kfree_skb/format under /sys/kernel/tracing or /sys/kernel/debug/tracing \
                 (mount tracefs: mount -t tracefs nodev /sys/kernel/tracing)"
                    .into(),
            )
        })
}

/// The tracepoint's record layout and reason names, from its tracefs `format` file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Format {
    /// Field name → byte offset.
    pub fields: BTreeMap<String, u32>,
    /// `enum skb_drop_reason` value → the kernel's name for it (`NEIGH_FAILED`, ...).
    pub reasons: BTreeMap<u32, String>,
}

impl Format {
    pub fn parse(text: &str) -> Self {
        let mut f = Format::default();
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("field:") {
                let mut parts = rest.split(';');
                let decl = parts.next().unwrap_or_default();
                let name = decl
                    .rsplit([' ', '*'])
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let offset = parts
                    .find_map(|p| p.trim().strip_prefix("offset:"))
                    .and_then(|o| o.parse().ok());
                if let Some(offset) = offset
                    && !name.is_empty()
                {
                    f.fields.insert(name, offset);
                }
            } else if let Some(fmt) = line.strip_prefix("print fmt:")
                && let Some(at) = fmt.find("__print_symbolic(REC->reason")
            {
                // { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, ...
                for pair in fmt[at..].split('{').skip(1) {
                    let Some((num, rest)) = pair.split_once(',') else {
                        continue;
                    };
                    let name = rest.split('"').nth(1);
                    if let (Ok(n), Some(name)) = (num.trim().parse::<u32>(), name) {
                        f.reasons.insert(n, name.to_owned());
                    }
                }
            }
        }
        f
    }

    /// The running kernel's.
    pub fn read() -> Result<Self, DatapathError> {
        let path = format_path()?;
        let text = std::fs::read_to_string(&path)
            .map_err(|e| DatapathError::KernelTrace(format!("{}: {e}", path.display())))?;
        Ok(Self::parse(&text))
    }

    fn field(&self, name: &str) -> Result<u32, DatapathError> {
        self.fields.get(name).copied().ok_or_else(|| {
            DatapathError::KernelTrace(format!(
                "the skb:kfree_skb tracepoint of this kernel has no field {name}"
            ))
        })
    }

    /// The code of the reason this kernel calls `name`.
    pub fn code(&self, name: &str) -> Option<u32> {
        self.reasons
            .iter()
            .find_map(|(c, n)| (n == name).then_some(*c))
    }

    /// The kernel's name for a reason code (`reason_<code>` when this kernel does not name it).
    pub fn reason_name(&self, code: u32) -> String {
        self.reasons
            .get(&code)
            .cloned()
            .unwrap_or_else(|| format!("reason_{code}"))
    }
}

/// Where the program reads, on the running kernel.
pub fn config(format: &Format, btf: &Btf, netns_inum: u32) -> Result<KtraceConfig, DatapathError> {
    let member = |s: &str, m: &str| {
        btf.member_offset(s, m)
            .map_err(|e| DatapathError::KernelTrace(e.to_string()))
    };
    let path = |s: &str, p: &[&str]| {
        btf.path_offset(s, p)
            .map_err(|e| DatapathError::KernelTrace(e.to_string()))
    };
    Ok(KtraceConfig {
        skbaddr_off: format.field("skbaddr")?,
        protocol_off: format.field("protocol")?,
        reason_off: format.field("reason")?,
        location_off: format.field("location")?,
        skb_head_off: member("sk_buff", "head")?,
        skb_network_header_off: member("sk_buff", "network_header")?,
        skb_dev_off: member("sk_buff", "dev")?,
        dev_ifindex_off: member("net_device", "ifindex")?,
        dev_net_off: member("net_device", "nd_net")?,
        skb_sk_off: member("sk_buff", "sk")?,
        sk_net_off: path("sock", &["__sk_common", "skc_net"])?,
        net_inum_off: path("net", &["ns", "inum"])?,
        netns_inum,
        probe_ignore: ["NOT_SPECIFIED", "CONSUMED"].map(|n| format.code(n).unwrap_or(u32::MAX)),
    })
}

/// One drop by the kernel itself, decoded.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KernelDropEvent {
    pub timestamp_ns: u64,
    pub reason_code: u32,
    /// The running kernel's name for it.
    pub reason: String,
    pub ifindex: u32,
    pub protocol: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

impl KernelDropEvent {
    pub fn decode(e: &KernelDrop, format: &Format) -> Self {
        Self {
            timestamp_ns: e.timestamp_ns,
            reason_code: e.reason,
            reason: format.reason_name(e.reason),
            ifindex: e.ifindex,
            protocol: e.tuple.proto,
            src: address_of(e.tuple.family, &e.tuple.src),
            dst: address_of(e.tuple.family, &e.tuple.dst),
            sport: u16::from_be_bytes(e.tuple.sport),
            dport: u16::from_be_bytes(e.tuple.dport),
        }
    }
}

impl Datapath {
    /// Attaches the `skb:kfree_skb` program (loaded from this process's copy of the object, with the
    /// instance's maps) until this `Datapath` is dropped; returns the kernel's reason names.
    pub fn attach_kernel_drops(&mut self) -> Result<Format, DatapathError> {
        let format = self.load_kernel_drops()?;
        let prog: &mut TracePoint = super::program_mut(self.ebpf_mut(), programs::KFREE_SKB)?;
        prog.attach("skb", "kfree_skb")
            .map_err(|e| DatapathError::load(programs::KFREE_SKB, e))?;
        Ok(format)
    }

    /// Configures and loads (through the verifier) the `skb:kfree_skb` program without attaching it;
    /// the kernel's reason names.
    pub fn load_kernel_drops(&mut self) -> Result<Format, DatapathError> {
        let format = Format::read()?;
        let btf = Btf::vmlinux()
            .map_err(|e| DatapathError::KernelTrace(format!("/sys/kernel/btf/vmlinux: {e}")))?;
        use std::os::unix::fs::MetadataExt;
        let netns = std::fs::metadata("/proc/self/ns/net")
            .map_err(|e| DatapathError::KernelTrace(format!("/proc/self/ns/net: {e}")))?;
        let cfg = config(&format, &btf, netns.ino() as u32)?;
        {
            let m = self
                .ebpf_mut()
                .map_mut(names::KTRACE)
                .ok_or(DatapathError::MissingMap(names::KTRACE))?;
            let mut a =
                Array::<_, KtraceConfig>::try_from(m).map_err(|source| DatapathError::Map {
                    map: names::KTRACE,
                    source,
                })?;
            a.set(0, cfg, 0).map_err(|source| DatapathError::Map {
                map: names::KTRACE,
                source,
            })?;
        }
        let prog: &mut TracePoint = super::program_mut(self.ebpf_mut(), programs::KFREE_SKB)?;
        prog.load()
            .map_err(|e| DatapathError::load(programs::KFREE_SKB, e))?;
        Ok(format)
    }

    /// Instructions the verifier processed for the loaded `skb:kfree_skb` program.
    pub fn kernel_drops_instructions(&self) -> Option<u32> {
        self.ebpf()
            .program(programs::KFREE_SKB)
            .and_then(|p| p.info().ok())
            .and_then(|i| i.verified_instruction_count())
    }

    /// Takes up to `max` kernel drop events waiting in the ring buffer (never blocks).
    pub fn take_kernel_drops(&mut self, max: usize) -> Result<Vec<KernelDrop>, DatapathError> {
        super::observe::take_ring(self, names::KERNEL_EVENTS, max)
    }

    /// Kernel drop events suppressed by the rate limit or lost for lack of ring space.
    pub fn kernel_drop_loss(&self) -> Result<super::EventLoss, DatapathError> {
        super::observe::loss(self, names::KERNEL_BUDGET)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT_6_18: &str = "name: kfree_skb\nID: 2310\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;\n\
\tfield:void * rx_sk;\toffset:24;\tsize:8;\tsigned:0;\n\
\tfield:unsigned short protocol;\toffset:32;\tsize:2;\tsigned:0;\n\
\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;\n\n\
print fmt: \"skbaddr=%p rx_sk=%p protocol=%u location=%pS reason: %s\", REC->skbaddr, REC->rx_sk, REC->protocol, REC->location, __print_symbolic(REC->reason, { 2, \"NOT_SPECIFIED\" }, { 3, \"NO_SOCKET\" }, { 58, \"NEIGH_FAILED\" })\n";

    #[test]
    fn the_format_file_gives_offsets_and_reason_names() {
        let f = Format::parse(FORMAT_6_18);
        assert_eq!(f.fields["skbaddr"], 8);
        assert_eq!(f.fields["rx_sk"], 24);
        assert_eq!(f.fields["protocol"], 32);
        assert_eq!(f.fields["reason"], 36);
        assert_eq!(f.reason_name(58), "NEIGH_FAILED");
        assert_eq!(f.reason_name(3), "NO_SOCKET");
        assert_eq!(f.reason_name(999), "reason_999");
        assert_eq!(f.code("NOT_SPECIFIED"), Some(2));
        assert_eq!(f.code("CONSUMED"), None);
    }

    #[test]
    fn this_kernel_names_its_neighbour_failures() {
        // tracefs is mounted by `cargo xtask setup` and in the VMs; without it this test says so.
        let f = Format::read().unwrap();
        assert!(
            f.reasons.values().any(|n| n == "NEIGH_FAILED"),
            "{:?}",
            f.reasons
        );
        let cfg = config(&f, &Btf::vmlinux().unwrap(), 1).unwrap();
        assert!(cfg.skbaddr_off > 0 && cfg.skb_head_off > 0);
    }
}
