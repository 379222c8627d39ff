//! `valid` means `run` applies it: `check` compiles the policy with the kernel maps' capacities, refuses
//! what does not fit (early, naming the rules that multiply entries) and reports the entries per map.

use vpcgate::policy::{
    Checked, check_text_with_limits,
    compile::{Compiled, Limits},
    diag::Severity,
};
use vpcgate_common::datapath::{limits, names};

/// The capacity rules at the sizes the kernel maps had before they grew to a million rules (testing at
/// the kernel's edge would take a million-rule file); `check_text` uses `Limits::KERNEL`, the same code
/// with the kernel's numbers.
const LIMITS: Limits = Limits {
    rules: 16_384,
    addr_entries: 16_384,
    reserved_entries: limits::RESERVED_ENTRIES,
    port_entries: 65_536,
};

fn check_text(path: &str, text: &str) -> Checked {
    check_text_with_limits(path, text, LIMITS)
}

const DEDICATED: &str =
    "[instance]\nname = \"gw\"\nkind = \"dedicated\"\nvpc_id = \"vpc-gw\"\ninterface = \"eth1\"\n";

fn auth(name: &str, address: &str, ports: &[String]) -> String {
    let ports: Vec<String> = ports.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "\n[[authorization]]\nname = \"{name}\"\nvpc_id = \"vpc-b\"\naddress = \"{address}\"\nports = [{}]\n",
        ports.join(", ")
    )
}

fn host(i: u32) -> String {
    std::net::Ipv4Addr::from(0x0a00_0000 | (i + 1)).to_string()
}

/// The line of the first occurrence of `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .expect("in the text")
        + 1
}

fn errors(text: &str) -> Vec<vpcgate::policy::diag::Diagnostic> {
    check_text("p.toml", text)
        .diagnostics
        .into_iter()
        .filter(|d| d.severity == Severity::Error)
        .collect()
}

#[test]
fn rules_beyond_the_rule_map_are_refused_at_the_first_one_beyond() {
    let mut text = DEDICATED.to_owned();
    for i in 0..LIMITS.rules {
        text += &auth(&format!("h{i}"), &host(i), &["80".into()]);
    }
    let fits = check_text("p.toml", &text);
    assert!(fits.policy.is_some(), "{:?}", fits.diagnostics.first());
    assert_eq!(fits.compiled.as_ref().unwrap().counts.rules, LIMITS.rules);

    text += &auth("one-too-many", &host(LIMITS.rules), &["80".into()]);
    let checked = check_text("p.toml", &text);
    assert!(checked.policy.is_none() && checked.compiled.is_none());
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    // At the rule's address, the first one beyond capacity.
    assert_eq!(
        e[0].line,
        line_of(&text, &format!("address = \"{}\"", host(LIMITS.rules)))
    );
    assert!(e[0].message.contains(names::RULE_STATS), "{}", e[0].message);
    assert!(
        e[0].message
            .contains(&format!("{} rules", LIMITS.rules + 1)),
        "{}",
        e[0].message
    );
}

#[test]
fn reserved_blocks_beyond_the_map_are_refused_and_duplicates_count_once() {
    let blocks = |n: u32| -> Vec<String> {
        (0..n)
            .map(|i| format!("\"{}/32\"", std::net::Ipv4Addr::from(0x6440_0000 | i)))
            .collect()
    };
    let policy = |list: &[String]| {
        format!("{DEDICATED}reserved_cidrs = [\n{}\n]\n", list.join(",\n"))
            + &auth("a", "10.0.0.7", &["80".into()])
    };
    let mut at_capacity = blocks(limits::RESERVED_ENTRIES);
    at_capacity.push(at_capacity[0].clone());
    let c = check_text("p.toml", &policy(&at_capacity));
    assert!(c.policy.is_some(), "{:?}", c.diagnostics);
    assert_eq!(
        c.compiled.unwrap().counts.reserved_v4,
        limits::RESERVED_ENTRIES
    );

    let over = blocks(limits::RESERVED_ENTRIES + 1);
    let text = policy(&over);
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].message.contains(names::RESERVED_V4),
        "{}",
        e[0].message
    );
    // Positioned at the first block beyond capacity.
    assert_eq!(e[0].line, line_of(&text, over.last().unwrap()));
}

/// `wide` authorizations on 10.0.0.0/8 with `ranges` port ranges each, and `hosts` host authorizations
/// under them: every host prefix repeats the wide rules' ports.
fn wide_and_hosts(wide: u32, ranges: u32, hosts: u32) -> String {
    let mut text = DEDICATED.to_owned();
    for w in 0..wide {
        let ports: Vec<String> = (0..ranges)
            .map(|r| {
                let lo = 1000 + (w * ranges + r) * 8;
                format!("{}-{}", lo + 1, lo + 5)
            })
            .collect();
        text += &auth(&format!("wide-{w}"), "10.0.0.0/8", &ports);
    }
    for h in 0..hosts {
        text += &auth(&format!("host-{h}"), &host(h), &[(80 + h % 5).to_string()]);
    }
    text
}

#[test]
fn overlapping_rules_that_multiply_port_entries_are_named_and_the_compile_stops_early() {
    // 2,000 wide rules (3 blocks each: 6,000 entries per table) over 10,000 hosts need 60 million port
    // entries: refused after a handful of prefixes, not computed.
    let text = wide_and_hosts(2000, 1, 10_000);
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    let m = &e[0].message;
    assert!(m.contains(names::PORTS), "{m}");
    assert!(
        m.contains("10.0.0.0/8: 2000 rules (authorization wide-0"),
        "{m}"
    );
    assert!(
        // 2,000 ranges of 5 ports (1001-1005, 1009-1013, ...) take 3 blocks each, in every table.
        m.contains(
            "whose ports take 6000 entries, repeated for each of the 10000 longer prefixes under \
             10.0.0.0/8 (about 60006000 entries)"
        ),
        "{m}"
    );
    assert_eq!(e[0].line, line_of(&text, "address = \"10.0.0.0/8\""));
    assert!(e[0].fix.as_deref().unwrap().contains("fewer port ranges"));
    // How far it got: "N of 10001 address prefixes in", with N about capacity / 6,000.
    let done: usize = m
        .split(" of 10001 address prefixes")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{m}"));
    assert!(done <= 1 + (LIMITS.port_entries as usize / 6000), "{m}");

    // The same shape, small enough, fits, and the report's count is what the tables need.
    let fits = check_text("p.toml", &wide_and_hosts(20, 1, 100));
    let c = fits.compiled.expect("fits");
    assert_eq!(c.counts, vpcgate::datapath::capacity::entry_counts(&c));
    assert!(c.counts.ports > 20 * 3 * 100, "{:?}", c.counts);
}

#[test]
fn many_small_tables_that_do_not_fit_say_so_without_blaming_a_wide_rule() {
    // Each host its own table of 7 blocks (80, 443, 8000-8100 = 4 blocks, 9000): 10,000 * 7 > 65,536.
    let mut text = DEDICATED.to_owned();
    for h in 0..10_000 {
        text += &auth(
            &format!("h{h}"),
            &host(h),
            &["80".into(), "443".into(), "8000-8100".into(), "9000".into()],
        );
    }
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].message
            .contains("each prefix has its own port table, 7.0 entries on average"),
        "{}",
        e[0].message
    );
    assert!(
        e[0].message
            .contains(" for all 10000 prefixes (first: authorization h0"),
        "{}",
        e[0].message
    );
    assert!(
        !e[0].message.contains("longer prefixes under"),
        "{}",
        e[0].message
    );
}

/// The steps a compile may take: a few per port range of the rules, per prefix, and per interval of the
/// tables the kernel holds (the compile's cost is bounded by its input and output).
pub fn work_bound(c: &Compiled) -> u64 {
    let own: u64 = c
        .rules
        .iter()
        .map(|r| (r.ports.ranges().len() * r.protocols.len()) as u64)
        .sum();
    let intervals: u64 = c.port_tables.iter().map(|t| t.intervals.len() as u64).sum();
    8 * (own + 2 * c.addr_entries.len() as u64 + intervals)
}

#[test]
fn tables_hidden_under_authorizations_cost_nothing_and_fit() {
    // A wide accessible block with 4,096 single ports, hidden on every port by all-ports
    // authorizations on the same block (verdict rule 5 wins), and 2,000 accessible /32s under it: every
    // prefix's table is the wide block's, and the kernel holds a handful of entries. Building the
    // hidden tables would take 2 x 2,000 x 4,096 steps; the compile must not.
    let ports: Vec<String> = (0..4096).map(|i| format!("\"{}\"", 1 + 2 * i)).collect();
    let mut text = format!(
        "[instance]\nname = \"gw\"\nkind = \"vpc-integration\"\nvpc_id = \"vpc-gw\"\ninterface = \"eth1\"\n\
         vswitch_cidr = \"192.168.0.0/24\"\n\n[[accessible]]\ncidr = \"10.0.0.0/8\"\nports = [{}]\n",
        ports.join(", ")
    );
    for proto in ["tcp", "udp"] {
        text += &format!(
            "\n[[authorization]]\nname = \"all-{proto}\"\nvpc_id = \"vpc-gw\"\naddress = \"10.0.0.0/8\"\nprotocol = \"{proto}\"\nports = [\"1-65535\"]\n"
        );
    }
    for h in 0..2000 {
        text += &format!("\n[[accessible]]\ncidr = \"{}/32\"\n", host(h));
    }
    let checked = check_text("p.toml", &text);
    let c = checked
        .compiled
        .unwrap_or_else(|| panic!("{:?}", checked.diagnostics.first()));
    // The wide block's table per protocol (1-65535 is 16 aligned blocks), shared by every /32 under it,
    // and the vSwitch block's.
    assert_eq!(c.counts.ports, 2 * 16 + 2 * 16, "{:?}", c.counts);
    assert!(
        c.work <= work_bound(&c),
        "work {} > {}",
        c.work,
        work_bound(&c)
    );
    assert!(c.work < 2 * 2000 * 4096 / 10, "work {}", c.work);
}

#[test]
fn check_and_run_share_one_compile() {
    // What `check` calls valid carries the compiled policy `run` applies, with the counts it reports.
    let c = check_text("p.toml", &wide_and_hosts(3, 2, 10));
    let compiled = c.compiled.expect("valid");
    let again = Compiled::new(c.policy.as_ref().unwrap());
    assert_eq!(compiled.addr_entries, again.addr_entries);
    assert_eq!(compiled.port_tables, again.port_tables);
    assert_eq!(compiled.counts, again.counts);
}

#[test]
fn a_block_overlapping_many_reserved_blocks_names_three_and_counts_the_rest() {
    let reserved: Vec<String> = (0..500)
        .map(|i| format!("\"10.1.{}.{}/30\"", i / 64, (i % 64) * 4))
        .collect();
    let text = format!(
        "[instance]\nname = \"gw\"\nkind = \"vpc-integration\"\nvpc_id = \"vpc-gw\"\ninterface = \"eth1\"\n\
         vswitch_cidr = \"10.0.0.0/24\"\nreserved_cidrs = [{}]\n\n[[accessible]]\ncidr = \"10.1.0.0/16\"\n",
        reserved.join(", ")
    );
    let d = check_text("p.toml", &text).diagnostics;
    let about: Vec<&str> = d
        .iter()
        .filter(|d| {
            d.message
                .starts_with("accessible block 10.1.0.0/16 overlaps")
        })
        .map(|d| d.message.as_str())
        .collect();
    assert_eq!(about.len(), 4, "{about:#?}");
    assert!(
        about[0].contains("reserved block 10.1.0.0/30"),
        "{}",
        about[0]
    );
    assert!(
        about[2].contains("reserved block 10.1.0.8/30"),
        "{}",
        about[2]
    );
    assert!(
        about[3].contains("overlaps 497 more reserved blocks (the next: 10.1.0.12/30)"),
        "{}",
        about[3]
    );
}

#[test]
fn a_reserved_block_listed_many_times_counts_once() {
    // 100,000 explicit copies of one block: the kernel holds it once, and each value under it gets one
    // diagnostic about it, not one per copy.
    let copies = vec!["\"10.0.0.0/8\""; 100_000].join(",");
    let mut text = format!(
        "[instance]\nname = \"gw\"\nkind = \"vpc-integration\"\nvpc_id = \"vpc-gw\"\ninterface = \"eth1\"\n\
         vswitch_cidr = \"192.168.0.0/24\"\nreserved_cidrs = [{copies}]\n"
    );
    for h in 0..50 {
        text += &format!("\n[[accessible]]\ncidr = \"{}/32\"\n", host(h));
    }
    let c = check_text("p.toml", &text);
    let compiled = c.compiled.expect("valid, with warnings");
    assert_eq!(compiled.counts.reserved_v4, 1);
    let overlapping: Vec<_> = c
        .diagnostics
        .iter()
        .filter(|d| d.message.contains("overlaps"))
        .collect();
    assert_eq!(
        overlapping.len(),
        50,
        "{:#?}",
        &overlapping[..3.min(overlapping.len())]
    );
}

#[test]
fn outside_the_accessible_blocks_lists_the_first_five_and_counts_the_rest() {
    let mut text = "[instance]\nname = \"gw\"\nkind = \"vpc-integration\"\nvpc_id = \"vpc-gw\"\n\
                    interface = \"eth1\"\nvswitch_cidr = \"192.168.0.0/24\"\n"
        .to_owned();
    for h in 0..20 {
        text += &format!("\n[[accessible]]\ncidr = \"{}/32\"\n", host(h));
    }
    text += "\n[[authorization]]\nname = \"far\"\nvpc_id = \"vpc-gw\"\naddress = \"10.9.0.4\"\nports = [\"80\"]\n";
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(
        e[0].message,
        "instance cannot connect to the backend 10.9.0.4: outside accessible CIDR blocks 192.168.0.0/24, \
         10.0.0.1/32, 10.0.0.2/32, 10.0.0.3/32, 10.0.0.4/32, and 16 more"
    );
}

#[test]
fn check_uses_the_kernel_maps_capacities() {
    assert_eq!(
        Limits::KERNEL,
        Limits {
            rules: limits::RULES,
            addr_entries: limits::ADDR_ENTRIES,
            reserved_entries: limits::RESERVED_ENTRIES,
            port_entries: limits::PORT_ENTRIES,
        }
    );
    // A policy over the test limits but within the kernel's is valid for `check`.
    let mut text = DEDICATED.to_owned();
    for i in 0..=LIMITS.rules {
        text += &auth(&format!("h{i}"), &host(i), &["80".into()]);
    }
    assert!(check_text("p.toml", &text).policy.is_none());
    let checked = vpcgate::policy::check_text("p.toml", &text);
    assert!(
        checked.policy.is_some(),
        "{:?}",
        checked.diagnostics.first()
    );
}
