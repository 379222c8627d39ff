//! Network namespaces that a test creates and always removes (RAII), and a way to run code inside one.
//!
//! Nothing here touches the root namespace: addresses, routes and links live inside the namespaces.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

/// Runs `cmd` to completion, panicking with its output when it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace, deleted (with everything in it: veths, addresses, routes) on drop.
pub struct Netns {
    name: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Netns {
    /// Creates a namespace named `vg-<role>-<pid>-<n>` with its loopback up.
    pub fn new(role: &str) -> Self {
        let name = format!(
            "vg-{role}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // Registered first: a signal between the two cannot leak it (see `crate::cleanup`).
        crate::cleanup::register_netns(&name);
        let out = Command::new("ip").args(["netns", "add", &name]).output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            crate::cleanup::unregister_netns(&name);
            panic!("ip netns add {name}: {out:?}");
        }
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> args...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// `ip netns exec <ns> args...`
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Runs `f` on a thread that has entered this namespace (sockets it opens and interfaces it names are
    /// this namespace's); the calling thread is never moved.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a namespace fd only changes this (scoped, short-lived) thread's namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

/// Starts `program args...` from a thread inside `ns`: the child inherits that network namespace but not
/// a new mount namespace (`ip netns exec` would remount /sys and hide the host's bpffs, so a BPF program's
/// pins would die with the process). Its stdin is inherited, its stderr piped.
pub fn spawn_in(ns: &Netns, program: &str, args: &[&str], stdout: Stdio) -> Child {
    let mut c = Command::new(program);
    c.args(args).stdout(stdout).stderr(Stdio::piped());
    spawn_command_in(ns, &mut c)
}

/// `spawn_in` for a command the caller built (environment, working directory, its own stdio).
pub fn spawn_command_in(ns: &Netns, command: &mut Command) -> Child {
    ns.run(|| {
        command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?} in {}: {e}", ns.name()))
    })
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Best effort, never panicking in drop (a test may already be unwinding).
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        if matches!(&out, Ok(o) if o.status.success()) {
            crate::cleanup::unregister_netns(&self.name);
        } else {
            eprintln!(
                "warning: could not delete network namespace {}: {out:?}",
                self.name
            );
        }
    }
}

/// Two namespaces joined by a veth pair, with IPv4 and IPv6 addresses:
/// `gw` (`veth-gw`, 10.200.0.1/24, fd00:200::1/64) and `vpc` (`veth-vpc`, 10.200.0.2/24, fd00:200::2/64).
pub struct Pair {
    pub gw: Netns,
    pub vpc: Netns,
}

pub const GW_IF: &str = "veth-gw";
pub const VPC_IF: &str = "veth-vpc";
pub const GW_V4: &str = "10.200.0.1";
pub const VPC_V4: &str = "10.200.0.2";
pub const GW_V6: &str = "fd00:200::1";
pub const VPC_V6: &str = "fd00:200::2";

impl Pair {
    pub fn new() -> Self {
        let pair = Self {
            gw: Netns::new("gw"),
            vpc: Netns::new("vpc"),
        };
        pair.connect();
        pair
    }

    /// Creates the veth pair between the namespaces with its addresses (again, after `GW_IF` was
    /// deleted: an ENI re-created).
    pub fn connect(&self) {
        let (gw, vpc) = (&self.gw, &self.vpc);
        gw.ip(&[
            "link",
            "add",
            GW_IF,
            "type",
            "veth",
            "peer",
            "name",
            VPC_IF,
            "netns",
            vpc.name(),
        ]);
        for (ns, dev, v4, v6) in [(gw, GW_IF, GW_V4, GW_V6), (vpc, VPC_IF, VPC_V4, VPC_V6)] {
            // No DAD: the addresses are usable at once, without waiting for duplicate detection.
            ns.exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{dev}.accept_dad=0"),
            ]);
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev]);
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"]);
            ns.ip(&["link", "set", dev, "up"]);
        }
    }
}

impl Default for Pair {
    fn default() -> Self {
        Self::new()
    }
}

/// Sends raw frames through a packet socket on `interface` (of the calling thread's namespace). Packet
/// sockets go through the qdisc layer, so TC egress sees them; a frame dropped on the egress path comes
/// back to the sender as ENOBUFS. Returns how many were reported dropped.
pub fn send_raw(interface: &str, frames: &[&[u8]]) -> usize {
    let ifindex = vpcgate::datapath::ifindex(interface).unwrap_or_else(|e| panic!("{e}"));
    let mut dropped = 0;
    // SAFETY: plain socket syscalls on a fresh fd, closed below.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let mut sa: libc::sockaddr_ll = std::mem::zeroed();
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = ifindex as i32;
        sa.sll_halen = 6;
        for f in frames {
            let n = libc::sendto(
                fd,
                f.as_ptr().cast(),
                f.len(),
                0,
                (&raw const sa).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            if n < 0 {
                let err = std::io::Error::last_os_error();
                assert_eq!(
                    err.raw_os_error(),
                    Some(libc::ENOBUFS),
                    "sendto on {interface}: {err}"
                );
                dropped += 1;
            }
        }
        libc::close(fd);
    }
    dropped
}

/// What `vpcgate run` does on the gateway, in the gateway namespace: tells the kernel the host's own
/// addresses (flows peers initiate are recorded only toward them) and the ENI's on-link prefixes, then
/// attaches TC egress and XDP ingress to the ENI.
pub fn enforce_on_gateway(dp: &mut vpcgate::datapath::Datapath, pair: &Pair) {
    use vpcgate::datapath::{XdpRole, host_addresses, onlink_prefixes};
    pair.gw.run(|| {
        let own = host_addresses().unwrap_or_else(|e| panic!("gateway addresses: {e}"));
        dp.set_local_addresses(&own)
            .unwrap_or_else(|e| panic!("{e}"));
        let onlink = onlink_prefixes(GW_IF).unwrap_or_else(|e| panic!("on-link prefixes: {e}"));
        dp.set_onlink_prefixes(&onlink)
            .unwrap_or_else(|e| panic!("{e}"));
        dp.attach_tc_egress(GW_IF).unwrap_or_else(|e| panic!("{e}"));
        dp.attach_xdp(GW_IF, XdpRole::EniIngress)
            .unwrap_or_else(|e| panic!("{e}"));
    });
}
