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
    pub fn parse_item(s: &str) -> Result<(u16, u16), String> {
        let port = |p: &str| -> Result<u16, String> {
            match p.trim().parse::<u32>() {
                Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
                Ok(n) => Err(format!("port {n} is out of range 1..=65535")),
                Err(_) => Err(format!("`{}` is not a port number", p.trim())),
            }
        };
        match s.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (port(lo)?, port(hi)?);
                if lo > hi {
                    return Err(format!("port range {lo}-{hi} is reversed: write {hi}-{lo}"));
                }
                Ok((lo, hi))
            }
            None => port(s).map(|p| (p, p)),
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
    fn parses_items_with_precise_errors() {
        assert_eq!(PortSet::parse_item("8000-8100"), Ok((8000, 8100)));
        assert_eq!(
            PortSet::parse_item("0"),
            Err("port 0 is out of range 1..=65535".into())
        );
        assert_eq!(
            PortSet::parse_item("70000"),
            Err("port 70000 is out of range 1..=65535".into())
        );
        assert_eq!(
            PortSet::parse_item("90-80"),
            Err("port range 90-80 is reversed: write 80-90".into())
        );
        assert_eq!(
            PortSet::parse_item("http"),
            Err("`http` is not a port number".into())
        );
    }
}
