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

/// The known zones closest to `zone` (fewest edits, ties all listed), for "did you mean"; none when
/// even the closest is far off.
pub fn closest_zones(zone: &str) -> Vec<&'static str> {
    let len = zone.chars().count();
    let within = 3.max(len / 3);
    // The distance is at least the difference in length: a zone that cannot be within reach is not
    // scored (a 1 MB value would otherwise cost 86 full distance computations).
    let scored: Vec<(usize, &str)> = zones()
        .filter(|z| z.chars().count().abs_diff(len) <= within)
        .map(|z| (super::walk::edit_distance(zone, z), z))
        .collect();
    let Some(best) = scored.iter().map(|s| s.0).min() else {
        return vec![];
    };
    if best > within {
        return vec![];
    }
    scored
        .into_iter()
        .filter(|s| s.0 == best)
        .map(|s| s.1)
        .collect()
}

/// Every known zone, one region a line, zones of a region written compactly:
/// `  China (Hangzhou): cn-hangzhou-{b,d,e,f,g,h,i,j,k}`.
pub fn zones_by_region() -> String {
    let mut regions: BTreeMap<&str, BTreeMap<&str, Vec<&str>>> = BTreeMap::new();
    for (zone, (region, _)) in TABLE.iter() {
        // A zone is its region id and a last letter: cn-hangzhou-b, ap-northeast-1a.
        let (id, letter) = zone.split_at(zone.len() - 1);
        regions
            .entry(region)
            .or_default()
            .entry(id)
            .or_default()
            .push(letter);
    }
    let mut out = String::new();
    for (region, ids) in regions {
        let parts: Vec<String> = ids
            .into_iter()
            .map(|(id, letters)| match letters.as_slice() {
                [one] => format!("{id}{one}"),
                _ => format!("{id}{{{}}}", letters.join(",")),
            })
            .collect();
        out.push_str(&format!("  {region}: {}\n", parts.join(" ")));
    }
    out
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
        assert_eq!(closest_zones("cn-hangzou-b"), ["cn-hangzhou-b"]);
        assert_eq!(closest_zones("us-east-1"), ["us-east-1a", "us-east-1b"]);
        assert_eq!(closest_zones("mars-north-1a"), Vec::<&str>::new());
        let help = zones_by_region();
        assert!(
            help.contains("  China (Hangzhou): cn-hangzhou-{b,d,e,f,g,h,i,j,k}\n"),
            "{help}"
        );
        // Every zone can be read back from the listing.
        let listed: usize = help
            .lines()
            .flat_map(|l| l.split_once(": ").unwrap().1.split(' '))
            .map(|part| match part.split_once('{') {
                Some((_, letters)) => letters.trim_end_matches('}').split(',').count(),
                None => 1,
            })
            .sum();
        assert_eq!(listed, zones().count());
        for z in zones() {
            for b in zone_blocks(z).unwrap() {
                assert_eq!(*b, b.trunc(), "{z}: {b} has host bits set");
            }
        }
    }
}
