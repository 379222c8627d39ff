//! The lab: helpers for vpcgate's privileged tests (crafted packets run through BPF_PROG_TEST_RUN, and
//! network namespaces joined by veth pairs). Everything here panics with context on failure: these are
//! test fixtures, and a stack trace at the failing step is what the reader needs.

pub mod agent;
pub mod cleanup;
pub mod harness;
pub mod lab;
pub mod netns;
pub mod packet;

/// Panics unless the test can do what it needs: root (for BPF, namespaces and veth). The privileged tier
/// never skips itself: a run that cannot execute it fails and says why.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "vpcgate's privileged tests need root (BPF, network namespaces, veth); run `sudo cargo xtask test`"
    );
}
