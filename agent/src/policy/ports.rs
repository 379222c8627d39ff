//! Port sets: sorted, merged, inclusive ranges within 1..=65535.

use std::fmt;

use serde::Serialize;

/// A set of ports as sorted, non-overlapping, non-adjacent inclusive ranges.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "Vec<String>")]
pub struct PortSet {
    ranges: Vec<(u16, u16)>,
}

impl PortSet {
    /// Every port, 1..=65535.
    pub fn all() -> Self {
        Self {
            ranges: vec![(1, 65535)],
        }
    }

    pub fn from_ranges(mut ranges: Vec<(u16, u16)>) -> Self {
        ranges.sort_unstable();
        let mut merged: Vec<(u16, u16)> = vec![];
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Self { ranges: merged }
    }

    pub fn single(port: u16) -> Self {
        Self {
            ranges: vec![(port, port)],
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        let i = self.ranges.partition_point(|&(_, hi)| hi < port);
        self.ranges.get(i).is_some_and(|&(lo, _)| lo <= port)
    }

    pub fn ranges(&self) -> &[(u16, u16)] {
        &self.ranges
    }

    pub fn is_all(&self) -> bool {
        self.ranges == [(1, 65535)]
    }

    /// Parses one `ports` item: `"80"` or `"8000-8100"`.
    pub fn parse_item(s: &str) -> Result<(u16, u16), PortError> {
        let port = |p: &str| -> Result<u16, PortError> {
            match p.trim().parse::<u32>() {
                Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
                Ok(n) => Err(PortError {
                    message: format!("port {n} is out of range 1..=65535"),
                    fix: RANGE_FIX.into(),
                }),
                Err(_) => Err(PortError {
                    message: format!("`{}` is not a port number", p.trim()),
                    fix: SYNTAX_FIX.into(),
                }),
            }
        };
        match s.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (port(lo)?, port(hi)?);
                if lo > hi {
                    return Err(PortError {
                        message: format!("port range {lo}-{hi} is reversed"),
                        fix: format!("write {hi}-{lo}"),
                    });
                }
                Ok((lo, hi))
            }
            None => port(s).map(|p| (p, p)),
        }
    }
}

/// The fix for a port outside 1..=65535.
pub const RANGE_FIX: &str = "ports are 1..=65535: write a port from 1 to 65535";
/// The fix for an item that is no port.
pub const SYNTAX_FIX: &str = "write a port such as \"80\" or a range such as \"8000-8100\"";

/// A `ports` item that is no port or range: what is wrong, and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortError {
    pub message: String,
    pub fix: String,
}

impl PortError {
    #[cfg(test)]
    fn new(message: &str, fix: &str) -> Self {
        Self {
            message: message.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_all() {
            return f.write_str("all ports");
        }
        let parts: Vec<String> = self.clone().into();
        f.write_str(&parts.join(", "))
    }
}

impl From<PortSet> for Vec<String> {
    fn from(p: PortSet) -> Self {
        p.ranges
            .iter()
            .map(|&(lo, hi)| {
                if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}-{hi}")
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_overlapping_and_adjacent_ranges() {
        let p = PortSet::from_ranges(vec![
            (443, 443),
            (80, 80),
            (81, 90),
            (85, 100),
            (8000, 8100),
        ]);
        assert_eq!(p.ranges(), &[(80, 100), (443, 443), (8000, 8100)]);
        assert!(p.contains(80) && p.contains(100) && p.contains(8050));
        assert!(!p.contains(79) && !p.contains(101) && !p.contains(444));
    }

    #[test]
    fn parses_items_with_precise_errors_and_fixes() {
        assert_eq!(PortSet::parse_item("8000-8100"), Ok((8000, 8100)));
        assert_eq!(
            PortSet::parse_item("0"),
            Err(PortError::new(
                "port 0 is out of range 1..=65535",
                RANGE_FIX
            ))
        );
        assert_eq!(
            PortSet::parse_item("70000"),
            Err(PortError::new(
                "port 70000 is out of range 1..=65535",
                RANGE_FIX
            ))
        );
        assert_eq!(
            PortSet::parse_item("90-80"),
            Err(PortError::new(
                "port range 90-80 is reversed",
                "write 80-90"
            ))
        );
        assert_eq!(
            PortSet::parse_item("http"),
            Err(PortError::new("`http` is not a port number", SYNTAX_FIX))
        );
    }
}
