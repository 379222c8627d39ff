//! vpcgate: an eBPF egress enforcement agent for API-gateway hosts.
//!
//! The library is organised by what an operator does: [`datapath`] loads and attaches the kernel
//! programs and reads their maps; [`cli`] is the thin command-line layer over it.

pub mod cli;
pub mod datapath;
pub mod diagnose;
pub mod policy;
