//! The provider's table of CIDR blocks that VPC integration instances reserve, per zone
//! (../shared/data/reserved_cidr_blocks.csv, from the provider's documentation).

use std::{collections::BTreeMap, sync::LazyLock};

use ipnet::IpNet;

static CSV: &str = include_str!("../../data/reserved_cidr_blocks.csv");

/// zone -> (region, reserved blocks), parsed once.
static TABLE: LazyLock<BTreeMap<&'static str, (&'static str, Vec<IpNet>)>> = LazyLock::new(|| {
    let mut table: BTreeMap<&str, (&str, Vec<IpNet>)> = BTreeMap::new();
    for line in CSV.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        // region may be quoted and contain commas; zone and block never do.
        let mut fields = line.rsplitn(3, ',');
        let cidr = fields.next().unwrap_or_default().trim();
        let zone = fields.next().unwrap_or_default().trim();
        let region = fields.next().unwrap_or_default().trim().trim_matches('"');
        let cidr: IpNet = cidr.parse().unwrap_or_else(|e| {
            panic!("built-in reserved table: bad block {cidr:?} for {zone}: {e}")
        });
        table
            .entry(zone)
            .or_insert_with(|| (region, vec![]))
            .1
            .push(cidr);
    }
    table
});

/// The reserved blocks of `zone`, or None for a zone the table does not know.
pub fn zone_blocks(zone: &str) -> Option<&'static [IpNet]> {
    TABLE.get(zone).map(|(_, blocks)| blocks.as_slice())
}

/// The region a zone belongs to.
pub fn zone_region(zone: &str) -> Option<&'static str> {
    TABLE.get(zone).map(|(region, _)| *region)
}

/// Every zone the table knows, sorted.
pub fn zones() -> impl Iterator<Item = &'static str> {
    TABLE.keys().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_every_zone_of_the_provider_document() {
        assert_eq!(zones().count(), 86);
        assert_eq!(
            zone_blocks("cn-hangzhou-b").unwrap(),
            &[
                "192.168.0.0/20".parse::<IpNet>().unwrap(),
                "172.19.0.0/20".parse().unwrap(),
                "172.20.0.0/16".parse().unwrap()
            ]
        );
        assert_eq!(zone_region("cn-hangzhou-b"), Some("China (Hangzhou)"));
        assert!(zone_blocks("mars-north-1a").is_none());
        for z in zones() {
            for b in zone_blocks(z).unwrap() {
                assert_eq!(*b, b.trunc(), "{z}: {b} has host bits set");
            }
        }
    }
}
