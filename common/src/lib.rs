//! Layouts shared by the vpcgate kernel programs (`vpcgate-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` (or a plain constant) and defined exactly once: the kernel side and
//! userspace import it from here, so the two can never disagree about a map's key, value or index.
#![no_std]

pub mod datapath;
pub mod icmp;
pub mod parse_stats;
pub mod verdict;

/// Names of the maps in the kernel object, as the loader looks them up.
pub mod maps {
    /// Per-CPU array of [`crate::parse_stats::ParseRow`], one per hook.
    pub const PARSE_STATS: &str = "PARSE_STATS";
}

/// Names of the programs in the kernel object.
pub mod programs {
    /// TC classifier on the ENI's egress.
    pub const TC_EGRESS: &str = "vpcgate_tc_egress";
    /// XDP on the ENI's ingress: observes (records inbound flows), always passes.
    pub const XDP_INGRESS: &str = "vpcgate_xdp_ingress";
    /// XDP on forward interfaces: enforces the same verdict as TC egress.
    pub const XDP_FORWARD: &str = "vpcgate_xdp_forward";
    /// The `skb:kfree_skb` tracepoint program (attached only while `drops --kernel` or `probe` runs).
    pub const KFREE_SKB: &str = "vpcgate_kfree_skb";
}
