//! xdp-filter (Debian's xdp-tools) as a peer: loaded on a veth inside a namespace of our own, its address
//! maps filled to the benchmark's size, and its program run with BPF_PROG_TEST_RUN on the same frames.
//!
//! Its `deny` policy is an allowlist (a packet passes when any lookup hits: MAC, then address, then port;
//! otherwise it drops), loaded with every feature (ethernet, ipv4, ipv6, tcp, udp) and the rules' host
//! addresses as destination entries: vpcgate's allowed packets pass it on their address. Its address
//! maps are exact-match per-CPU hashes of 10,000 entries per family.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use aya::{
    maps::{Map, MapData, PerCpuHashMap, PerCpuValues},
    programs::Xdp,
    util::nr_cpus,
};
use aya_obj::programs::XdpAttachType;
use vpcgate_lab::netns::Netns;

/// Entries per family in xdp-filter's `filter_ipv4` / `filter_ipv6`.
pub const CAPACITY_PER_FAMILY: usize = 10_000;

const PIN_DIR: &str = "/sys/fs/bpf/xdp-filter";
/// `MAP_FLAG_DST` in xdp-filter's common_kern_user.h: match the destination.
const FLAG_DST: u64 = 2;

/// Unloads xdp-filter (removing its pins) when dropped; the namespace goes after it.
struct Loaded {
    ns: Netns,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if let Err(e) = nsenter(&self.ns, &["xdp-filter", "unload", "--all"]) {
            eprintln!("vpcgate-bench: unloading xdp-filter: {e:#}");
        }
    }
}

pub struct XdpFilter {
    pub prog: Xdp,
    pub version: String,
    _loaded: Loaded,
}

fn nsenter(ns: &Netns, args: &[&str]) -> anyhow::Result<String> {
    // nsenter, not `ip netns exec`: xdp-filter pins under the host's bpffs, which `ip netns exec` hides
    // behind a fresh /sys.
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .args(args)
        .output()
        .with_context(|| format!("running {args:?} (package xdp-tools)"))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn fill<K: aya::Pod>(map: &str, keys: impl Iterator<Item = K>) -> anyhow::Result<()> {
    let path = PathBuf::from(PIN_DIR).join(map);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut m: PerCpuHashMap<_, K, u64> = PerCpuHashMap::try_from(Map::PerCpuHashMap(data))
        .with_context(|| format!("{map} is not the per-CPU hash xdp-filter 1.x uses"))?;
    let cpus = nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
    for k in keys {
        let v = PerCpuValues::try_from(vec![FLAG_DST; cpus])?;
        m.insert(k, v, 0)
            .with_context(|| format!("filling {map}"))?;
    }
    Ok(())
}

impl XdpFilter {
    /// Loads xdp-filter allowing the destinations `v4` and `v6` (each at most `CAPACITY_PER_FAMILY`).
    pub fn load(v4: &[Ipv4Addr], v6: &[Ipv6Addr]) -> anyhow::Result<Self> {
        if v4.len() > CAPACITY_PER_FAMILY || v6.len() > CAPACITY_PER_FAMILY {
            bail!("xdp-filter holds {CAPACITY_PER_FAMILY} addresses per family");
        }
        if Path::new(PIN_DIR).exists() {
            bail!(
                "{PIN_DIR} exists: xdp-filter is loaded somewhere on this host (`xdp-filter status`); the benchmark needs it to itself"
            );
        }
        if Command::new("xdp-filter").arg("help").output().is_err() {
            bail!(
                "xdp-filter is not installed (Debian package xdp-tools; `cargo xtask setup` installs it)"
            );
        }
        let version = Command::new("dpkg-query")
            .args(["-W", "-f", "${Version}", "xdp-tools"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let ns = Netns::new("xdpf");
        ns.ip(&["link", "add", "xf0", "type", "veth", "peer", "name", "xf1"]);
        ns.ip(&["link", "set", "xf0", "up"]);
        ns.ip(&["link", "set", "xf1", "up"]);
        let loaded = Loaded { ns };
        nsenter(
            &loaded.ns,
            &[
                "xdp-filter",
                "load",
                "-p",
                "deny",
                "-f",
                "ipv4,ipv6,tcp,udp,ethernet",
                "-m",
                "skb",
                "xf0",
            ],
        )?;
        fill(
            "filter_ipv4",
            v4.iter().map(|a| u32::from_ne_bytes(a.octets())),
        )?;
        fill("filter_ipv6", v6.iter().map(|a| a.octets()))?;
        let dir = PathBuf::from(PIN_DIR).join("programs/xf0");
        let pin = std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("xdpfilt_"))
            })
            .with_context(|| format!("no xdpfilt_* program pinned in {}", dir.display()))?;
        let prog = Xdp::from_pin(&pin, XdpAttachType::Interface)
            .with_context(|| format!("opening {}", pin.display()))?;
        Ok(Self {
            prog,
            version,
            _loaded: loaded,
        })
    }
}
