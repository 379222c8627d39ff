//! Drop reasons: stable numeric codes shared by the kernel, the CLI, JSON and metrics.
//!
//! Append-only (like Cilium's drop_reasons.h): a new reason gets a new code; a retired code keeps its number.

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// The destination is covered by no authorization, upstream node or accessible block.
    NotAuthorized = 1,
    /// The destination is covered by some rule, but not for this port or protocol.
    PortNotAuthorized = 2,
    /// The destination is inside a reserved block.
    ReservedRange = 3,
    /// A truncated or inconsistent header.
    Malformed = 4,
    /// A non-first fragment whose datagram could not be verified.
    FragmentUnverified = 5,
    /// The programs run but no policy generation is active (fail closed).
    NoPolicy = 6,
    /// IPv4 LSRR/SSRR options or an IPv6 routing header with segments left: the real destination is not
    /// the one checked.
    SourceRouted = 7,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::NotAuthorized,
        DropReason::PortNotAuthorized,
        DropReason::ReservedRange,
        DropReason::Malformed,
        DropReason::FragmentUnverified,
        DropReason::NoPolicy,
        DropReason::SourceRouted,
    ];

    /// Highest code in use (per-reason counter arrays have `MAX_CODE + 1` slots; slot 0 is unused).
    pub const MAX_CODE: u32 = 7;

    pub const fn code(self) -> u32 {
        self as u32
    }

    pub const fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(DropReason::NotAuthorized),
            2 => Some(DropReason::PortNotAuthorized),
            3 => Some(DropReason::ReservedRange),
            4 => Some(DropReason::Malformed),
            5 => Some(DropReason::FragmentUnverified),
            6 => Some(DropReason::NoPolicy),
            7 => Some(DropReason::SourceRouted),
            _ => None,
        }
    }

    /// Stable snake_case name used in CLI output, JSON and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::NotAuthorized => "not_authorized",
            DropReason::PortNotAuthorized => "port_not_authorized",
            DropReason::ReservedRange => "reserved_range",
            DropReason::Malformed => "malformed",
            DropReason::FragmentUnverified => "fragment_unverified",
            DropReason::NoPolicy => "no_policy",
            DropReason::SourceRouted => "source_routed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_and_round_trip() {
        let expected = [
            (1, "not_authorized"),
            (2, "port_not_authorized"),
            (3, "reserved_range"),
            (4, "malformed"),
            (5, "fragment_unverified"),
            (6, "no_policy"),
            (7, "source_routed"),
        ];
        for (r, (code, name)) in DropReason::ALL.iter().zip(expected) {
            assert_eq!((r.code(), r.name()), (code, name));
            assert_eq!(DropReason::from_code(code), Some(*r));
        }
        assert_eq!(DropReason::from_code(0), None);
        assert_eq!(DropReason::ALL.len() as u32, DropReason::MAX_CODE);
    }
}
