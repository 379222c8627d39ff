use aya::programs::ProgramError;

/// What can go wrong loading, attaching or reading the kernel side, with what an operator needs to act.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot load the vpcgate kernel object: {0} (is this root, with CAP_BPF and BTF?)")]
    Object(#[source] aya::EbpfError),

    #[error(
        "the kernel object has no program {0}: the agent and its embedded object disagree (rebuild)"
    )]
    MissingProgram(&'static str),

    #[error(
        "the kernel object has no map {0}: the agent and its embedded object disagree (rebuild)"
    )]
    MissingMap(&'static str),

    #[error("the kernel refused program {program}: {reason}\n--- verifier log ---\n{verifier_log}")]
    Verifier {
        program: &'static str,
        reason: String,
        verifier_log: String,
    },

    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },

    #[error("interface {0} not found (in this network namespace)")]
    InterfaceNotFound(String),

    #[error(
        "interface {0} is not an Ethernet interface: {1}; vpcgate parses frames from their Ethernet header and enforces only on Ethernet interfaces"
    )]
    NotEthernet(String, String),

    #[error("cannot attach {program} to {interface}: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        #[source]
        source: ProgramError,
    },

    #[error(
        "map {map} is full: {capacity} entries, the policy needs {needed}; the old policy stays active"
    )]
    MapFull {
        map: &'static str,
        capacity: u32,
        needed: u32,
    },

    #[error(transparent)]
    TableCollision(#[from] super::plan::TableCollision),

    #[error("policy barrier: cannot {what}: {source}")]
    Barrier {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("injected failure at operation {op} of the plan (test hook)")]
    Injected { op: usize },

    #[error("applying the policy failed at operation {at} ({op}): {source}; {outcome}")]
    ApplyFailed {
        at: usize,
        op: String,
        #[source]
        source: Box<DatapathError>,
        outcome: String,
    },

    #[error(
        "applying the policy failed at operation {at} ({op}): {apply}; restoring the previous policy \
         failed too: {restore}. The datapath is in an unknown state (possibly a mix of both policies): \
         the next apply rewrites it as a new generation"
    )]
    RestoreFailed {
        at: usize,
        op: String,
        apply: Box<DatapathError>,
        restore: String,
    },

    #[error("{what} at {}: {source}", path.display())]
    Pin {
        path: std::path::PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "instance name {0:?} cannot name a pin directory: use letters, digits, '_' and '-' (at most 64; bpffs refuses dots)"
    )]
    InstanceName(String),

    #[error("no pinned state for instance {0:?} (nothing under /sys/fs/bpf/vpcgate/{0})")]
    NoInstance(String),

    #[error(
        "instance {instance:?} is enforced by another vpcgate build (pinned under /sys/fs/bpf/vpcgate/{instance}/{}; this build is {ours}): \
         refusing to mix them. Run the build that pinned it, or `vpcgate teardown --instance {instance}` and start again \
         (egress is not enforced between the two)",
        found.join(", ")
    )]
    ForeignBuild {
        instance: String,
        found: Vec<String>,
        ours: String,
    },

    #[error(
        "the pinned state at {} is incomplete ({missing} missing): `vpcgate teardown --instance {instance}` and start again",
        dir.display()
    )]
    IncompletePins {
        instance: String,
        dir: std::path::PathBuf,
        missing: String,
    },

    #[error("interface {interface}: cannot {what}: {source}")]
    InterfaceQuery {
        interface: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "forward interface {interface} is a {kind} device stacked on another interface: frames addressed to \
         the lower interface's own MAC reach this host without passing {interface}, so XDP there cannot \
         enforce everything pods behind it send; list the lower interface in forward_interfaces instead"
    )]
    StackedForward { interface: String, kind: String },

    #[error(
        "cannot watch the kernel's own drops: {0} (the skb:kfree_skb tracepoint needs tracefs, BTF and CAP_PERFMON)"
    )]
    KernelTrace(String),

    #[error("map {map}: {}", chain(source))]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

impl DatapathError {
    /// A load error, with the verifier's log spelled out when the verifier is what refused.
    pub(crate) fn load(program: &'static str, e: ProgramError) -> Self {
        match e {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => DatapathError::Verifier {
                program,
                reason: io_error.to_string(),
                verifier_log: verifier_log.to_string(),
            },
            source => DatapathError::Program { program, source },
        }
    }
}

/// An error and its sources on one line ("bpf_map_delete_elem failed: No such file or directory").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}
