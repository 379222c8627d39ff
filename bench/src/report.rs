//! The report: Markdown for people, JSON for machines, SVG plots; all under the output directory.

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::Context;
use serde::Serialize;

use crate::{
    control,
    perpkt::{self, Kind, Prog, Regime},
    plot::{self, Series},
    throughput,
};

#[derive(Serialize, Clone, Debug)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
    /// (tool, version) of everything measured.
    pub versions: Vec<(String, String)>,
}

#[derive(Serialize, Debug)]
pub struct Report {
    pub date: String,
    pub quick: bool,
    pub seed: String,
    pub machine: Machine,
    pub per_packet: Option<perpkt::Section>,
    pub throughput: Option<Vec<throughput::Row>>,
    pub control: Option<Vec<control::Row>>,
    /// The findings, as sentences computed from the measurements above.
    pub findings: Vec<String>,
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    match Command::new(cmd).args(args).output() {
        Ok(o) => {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        }
        Err(e) => format!("not available ({e})"),
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

pub fn machine(vpcgate: &Path) -> Machine {
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let memory_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let vpcgate = vpcgate.to_string_lossy().into_owned();
    let versions = [
        ("vpcgate", first_line(&vpcgate, &["--version"])),
        (
            "git",
            first_line("git", &["describe", "--always", "--dirty"]),
        ),
        (
            "xdp-tools (xdp-filter)",
            first_line("dpkg-query", &["-W", "-f", "${Version}", "xdp-tools"]),
        ),
        ("iperf3", first_line("iperf3", &["--version"])),
        ("nft", first_line("nft", &["--version"])),
        ("iptables", first_line("iptables", &["--version"])),
        ("bpftool", first_line("bpftool", &["--version"])),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b))
    .collect();
    Machine {
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        cpu,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib,
        versions,
    }
}

pub fn today() -> String {
    first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
}

fn fmt_entries(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

fn ns(r: Option<&perpkt::Row>) -> String {
    r.map_or("–".into(), |r| format!("{:.0}", r.ns))
}

fn ratio(a: Option<&perpkt::Row>, b: Option<&perpkt::Row>) -> Option<f64> {
    Some(a?.ns / b?.ns)
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("–".into(), |r| format!("{r:.2}×"))
}

/// The sentences the issue asks the report to state, from the per-packet rows.
fn per_packet_findings(s: &perpkt::Section) -> Vec<String> {
    let mut out = vec![];
    let find = |p, n, k, r| perpkt::find(s, p, n, k, r);
    for regime in Regime::ALL {
        let at: Vec<String> = s
            .sizes
            .iter()
            .map(|&n| {
                format!(
                    "{} rules: {} / {} ns",
                    fmt_entries(n),
                    ns(find(Prog::VpcgateTcEgress, n, Kind::Allowed, regime)),
                    ns(find(Prog::VpcgateXdpForward, n, Kind::Allowed, regime))
                )
            })
            .collect();
        out.push(format!(
            "vpcgate on an allowed packet, {regime:?} (TC egress / XDP forward): {}.",
            at.join("; ")
        ));
    }
    for &n in &s.sizes {
        for regime in Regime::ALL {
            let tc = find(Prog::VpcgateTcEgress, n, Kind::Allowed, regime);
            let xdp = find(Prog::VpcgateXdpForward, n, Kind::Allowed, regime);
            let mut parts = vec![
                format!(
                    "{} / {} the minimal enforcer",
                    fmt_ratio(ratio(tc, find(Prog::MinimalTc, n, Kind::Allowed, regime))),
                    fmt_ratio(ratio(xdp, find(Prog::MinimalXdp, n, Kind::Allowed, regime)))
                ),
                format!(
                    "{} / {} the bare trie",
                    fmt_ratio(ratio(tc, find(Prog::TrieTc, n, Kind::Allowed, regime))),
                    fmt_ratio(ratio(xdp, find(Prog::TrieXdp, n, Kind::Allowed, regime)))
                ),
            ];
            if let Some(xf) = find(Prog::XdpFilter, n, Kind::Allowed, regime) {
                parts.push(format!(
                    "{} / {} xdp-filter",
                    fmt_ratio(ratio(tc, Some(xf))),
                    fmt_ratio(ratio(xdp, Some(xf)))
                ));
            }
            out.push(format!(
                "At {} rules, {regime:?}, vpcgate TC egress / XDP forward cost {}.",
                fmt_entries(n),
                parts.join(", ")
            ));
        }
    }
    // Growth from the smallest to the largest policy, net of the floor: how much is the trie's own.
    if let (Some(&lo), Some(&hi)) = (s.sizes.first(), s.sizes.last())
        && lo != hi
    {
        for regime in Regime::ALL {
            for (ours, trie, minimal) in [
                (Prog::VpcgateTcEgress, Prog::TrieTc, Prog::MinimalTc),
                (Prog::VpcgateXdpForward, Prog::TrieXdp, Prog::MinimalXdp),
            ] {
                let g = |p| {
                    Some(
                        find(p, hi, Kind::Allowed, regime)?.net_ns
                            - find(p, lo, Kind::Allowed, regime)?.net_ns,
                    )
                };
                if let (Some(o), Some(t), Some(m)) = (g(ours), g(trie), g(minimal)) {
                    let over = |a: Prog, b: Prog, n| {
                        Some(
                            find(a, n, Kind::Allowed, regime)?.net_ns
                                - find(b, n, Kind::Allowed, regime)?.net_ns,
                        )
                    };
                    out.push(format!(
                        "{} grows by {o:.0} ns from {} to {} rules ({regime:?}); the bare trie grows by {t:.0} ns ({:.0}% of it) and the minimal enforcer by {m:.0} ns. Its overhead over the minimal enforcer goes from {:.0} to {:.0} ns.",
                        ours.label(),
                        fmt_entries(lo),
                        fmt_entries(hi),
                        if o.abs() > f64::EPSILON { 100.0 * t / o } else { 100.0 },
                        over(ours, minimal, lo).unwrap_or(f64::NAN),
                        over(ours, minimal, hi).unwrap_or(f64::NAN),
                    ));
                }
            }
        }
    }
    out
}

fn per_packet_markdown(s: &perpkt::Section, rounds: &str) -> String {
    let mut md = String::new();
    let find = |p, n, k, r| perpkt::find(s, p, n, k, r);
    let _ = writeln!(
        md,
        "### Per-packet cost (BPF_PROG_TEST_RUN)\n\n\
         ns per packet as the kernel timed each run, median of {rounds} rounds. *Hot*: one 64-byte UDP \
         packet repeated (warm caches). *Spread*: distinct packets to destinations drawn across the \
         policy's prefixes, one run per call (the syscall between runs evicts much of the cache, as \
         real traffic does); vpcgate reuses the decisions it memoized per destination in an earlier \
         pass (`VERDICT_CACHE`, on the CPU the bench stays on: those whose slot no other destination \
         of the pass took). *Fresh*: the spread packets, each right after a new policy epoch (as after \
         an apply), so vpcgate walks its tries for every packet, as for the first packet toward a \
         destination. \
         The floor is an empty program of the same hook; `net` columns subtract it. \
         Policies are half IPv4, half IPv6, mixed prefix lengths (/28–/32, /64–/128) and port shapes; \
         one address entry per rule.\n"
    );
    let cols = Prog::ALL;
    let _ = writeln!(md, "#### Allowed packet, every program\n");
    let _ = writeln!(
        md,
        "| rules | regime | {} |\n|---|---|{}",
        cols.iter()
            .map(|c| c.label())
            .collect::<Vec<_>>()
            .join(" | "),
        "---:|".repeat(cols.len())
    );
    for &n in &s.sizes {
        for regime in Regime::ALL {
            let _ = writeln!(
                md,
                "| {} | {regime:?} | {} |",
                fmt_entries(n),
                cols.iter()
                    .map(|&c| ns(find(c, n, Kind::Allowed, regime)))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
    }
    let _ = writeln!(
        md,
        "\n#### Ratios on the allowed packet (vpcgate TC egress / XDP forward against each baseline of its hook)\n"
    );
    let _ = writeln!(
        md,
        "| rules | regime | ÷ minimal enforcer | ÷ bare trie | ÷ xdp-filter |\n|---|---|---:|---:|---:|"
    );
    for &n in &s.sizes {
        for regime in Regime::ALL {
            let tc = find(Prog::VpcgateTcEgress, n, Kind::Allowed, regime);
            let xdp = find(Prog::VpcgateXdpForward, n, Kind::Allowed, regime);
            let xf = find(Prog::XdpFilter, n, Kind::Allowed, regime);
            let _ = writeln!(
                md,
                "| {} | {regime:?} | {} / {} | {} / {} | {} / {} |",
                fmt_entries(n),
                fmt_ratio(ratio(tc, find(Prog::MinimalTc, n, Kind::Allowed, regime))),
                fmt_ratio(ratio(xdp, find(Prog::MinimalXdp, n, Kind::Allowed, regime))),
                fmt_ratio(ratio(tc, find(Prog::TrieTc, n, Kind::Allowed, regime))),
                fmt_ratio(ratio(xdp, find(Prog::TrieXdp, n, Kind::Allowed, regime))),
                fmt_ratio(ratio(tc, xf)),
                fmt_ratio(ratio(xdp, xf)),
            );
        }
    }
    let _ = writeln!(
        md,
        "\n#### vpcgate by kind of packet (ns; net of the floor in brackets)\n"
    );
    let _ = writeln!(
        md,
        "| rules | regime | program | {} |\n|---|---|---|{}",
        perpkt::KINDS
            .iter()
            .map(|k| format!("{k:?}"))
            .collect::<Vec<_>>()
            .join(" | "),
        "---:|".repeat(perpkt::KINDS.len())
    );
    for &n in &s.sizes {
        for regime in Regime::ALL {
            for p in [
                Prog::VpcgateTcEgress,
                Prog::VpcgateXdpForward,
                Prog::VpcgateXdpIngress,
            ] {
                let cells: Vec<String> = perpkt::KINDS
                    .iter()
                    .map(|&k| {
                        find(p, n, k, regime)
                            .map_or("–".into(), |r| format!("{:.0} ({:.0})", r.ns, r.net_ns))
                    })
                    .collect();
                let _ = writeln!(
                    md,
                    "| {} | {regime:?} | {} | {} |",
                    fmt_entries(n),
                    p.label(),
                    cells.join(" | ")
                );
            }
        }
    }
    let _ = writeln!(
        md,
        "\nKinds: *Allowed* passes by a rule; *Denied* goes to a rule's prefix on a port it does not allow \
         (dropped, with its drop event); *Reply* answers a flow a peer opened, to a peer outside the policy \
         (TC egress only: rule 3 is for packets this host generates); *Fragment* is a middle fragment of a \
         datagram whose first fragment passed.\n"
    );
    for n in &s.notes {
        let _ = writeln!(md, "- {n}");
    }
    if !s.profiles.is_empty() {
        let _ = writeln!(
            md,
            "\n#### Where the time goes (perf cpu-clock samples of this process, allowed packet)\n\n\
             Share of samples per kernel symbol while one program ran in a loop. `bpf_prog_…` is the \
             program's own instructions (array lookups are inlined there); `trie_lookup_elem` is an LPM \
             lookup; `htab_*` hash and LRU lookups/updates; `bpf_ktime_get_ns`/`ktime_get*` the clock; \
             `bpf_ringbuf_*` events; the rest is BPF_PROG_TEST_RUN itself (see the floor).\n"
        );
        for pr in &s.profiles {
            let top: Vec<String> = pr
                .symbols
                .iter()
                .take(12)
                .map(|sym| format!("{:.1}% `{}`", sym.percent, sym.symbol))
                .collect();
            let _ = writeln!(
                md,
                "- **{}**, {:?}, {} rules: {}",
                pr.program.label(),
                pr.regime,
                fmt_entries(pr.entries),
                top.join(", ")
            );
        }
    }
    md
}

pub fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let m = &r.machine;
    let _ = writeln!(
        md,
        "# vpcgate benchmark report\n\n{} · {} run · seed `{}`\n\n\
         Machine: {} CPUs ({}), {:.0} GiB, kernel {}.\n",
        r.date,
        if r.quick { "quick" } else { "full" },
        r.seed,
        m.cpus,
        m.cpu,
        m.memory_gib,
        m.kernel
    );
    let _ = writeln!(md, "| tool | version |\n|---|---|");
    for (t, v) in &m.versions {
        let _ = writeln!(md, "| {t} | {v} |");
    }
    let _ = writeln!(
        md,
        "\nEvery figure below was measured in this run; ratios compare measurements of this run only. \
         The machine may be shared: read medians and ratios, not single numbers.\n\n## Findings\n"
    );
    for f in &r.findings {
        let _ = writeln!(md, "- {f}");
    }
    let _ = writeln!(md);
    if let Some(s) = &r.per_packet {
        md += &per_packet_markdown(s, if r.quick { "3" } else { "7" });
        let _ = writeln!(
            md,
            "\n![hot](per_packet_hot.svg)\n![spread](per_packet_spread.svg)\n![fresh](per_packet_fresh.svg)\n"
        );
    }
    if let Some(t) = &r.throughput {
        md += &throughput::markdown(t);
        let _ = writeln!(
            md,
            "\n![tcp](throughput_tcp.svg)\n![udp](throughput_udp64.svg)\n"
        );
    }
    if let Some(c) = &r.control {
        md += &control::markdown(c);
    }
    md
}

pub fn findings(r: &Report) -> Vec<String> {
    let mut out = vec![];
    if let Some(s) = &r.per_packet {
        out.extend(per_packet_findings(s));
    }
    if let Some(t) = &r.throughput {
        out.extend(throughput_findings(t));
    }
    if let Some(c) = &r.control {
        out.extend(control_findings(c));
    }
    out
}

fn throughput_findings(rows: &[throughput::Row]) -> Vec<String> {
    let mut setups: Vec<&str> = rows.iter().map(|r| r.setup.as_str()).collect();
    setups.dedup();
    setups
        .into_iter()
        .map(|setup| {
            let per_test: Vec<String> = [("tcp", "TCP"), ("udp64", "64-byte UDP")]
                .iter()
                .filter_map(|&(test, name)| {
                    let r = rows.iter().find(|r| r.setup == setup && r.test == test)?;
                    let vs_nft = r.ratio_to_nftables.map_or(String::new(), |n| {
                        format!(", {n:.2}× nftables with as many rules")
                    });
                    let vs_minimal = r.ratio_to_minimal.map_or(String::new(), |n| {
                        format!(", {n:.2}× the minimal enforcer with as many rules")
                    });
                    let no_filter = match (&r.paired, r.ratio_to_no_filter) {
                        (Some(p), _) => format!(
                            "{:.3}× no filter ({} pairs with the twin link{})",
                            p.median,
                            p.ratios.len(),
                            p.ci95.map_or(String::new(), |[lo, hi]| format!(
                                ", 95% confidence interval {lo:.3}–{hi:.3}"
                            ))
                        ),
                        (None, Some(x)) => format!("{x:.2}× no filter"),
                        (None, None) => "– × no filter".into(),
                    };
                    Some(format!("{name} {no_filter}{vs_minimal}{vs_nft}"))
                })
                .collect();
            if setup == "no filter" {
                format!(
                    "Throughput with no filter on either link (ENI against the twin: how far the links differ): {}.",
                    per_test.join("; ")
                )
            } else {
                format!("Throughput with {setup}: {}.", per_test.join("; "))
            }
        })
        .chain(program_findings(rows))
        .chain(calibration_findings(rows))
        .collect()
}

/// A TC program's own mean run time under a setup's traffic (kernel BPF statistics): vpcgate's TC egress
/// or the baseline on the ENI.
fn tc_ns(r: &throughput::Row) -> Option<f64> {
    tc_cost(r).map(|c| c.ns_per_run)
}

fn tc_cost(r: &throughput::Row) -> Option<&throughput::ProgramCost> {
    r.programs
        .iter()
        .find(|c| c.program.starts_with("vpcgate_tc_e") || c.program.starts_with("bench_tc_"))
}

/// The run time of all of a setup's programs (kernel BPF statistics) per run of its TC program: vpcgate's
/// XDP ingress included (under TCP it runs for each ACK), so that what the line sets vpcgate against is
/// all the time its programs spent.
fn programs_ns_per_packet(r: &throughput::Row) -> Option<f64> {
    let tc = tc_cost(r)?;
    if tc.runs == 0 {
        return None;
    }
    let total: f64 = r
        .programs
        .iter()
        .map(|c| c.runs as f64 * c.ns_per_run)
        .sum();
    Some(total / tc.runs as f64)
}

/// The throughput bar (× no filter), which the calibration translates into run time.
const THROUGHPUT_BAR: f64 = 0.97;

/// A straight line through points (x, y) by least squares: (intercept, slope). None with fewer than two
/// distinct x, or a point that is not finite.
fn fit_line(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    if points.len() < 2 || points.iter().any(|p| !p.0.is_finite() || !p.1.is_finite()) {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx <= f64::EPSILON {
        return None;
    }
    let slope = sxy / sxx;
    Some((my - slope * mx, slope))
}

/// What run time alone takes off the rate, per test: the empty program and the spin loops (programs that
/// only spend time) give a line of "× no filter" against their run time in situ; vpcgate and the
/// minimal enforcer are set against what that line gives a program of their own run time, so what their
/// work costs outside its own run time (the stack's cache refills after it, say) shows apart from the run
/// time itself. Where the line falls, the bar becomes the run time at which it crosses it.
fn calibration_findings(rows: &[throughput::Row]) -> Vec<String> {
    let mut tests: Vec<&str> = rows.iter().map(|r| r.test.as_str()).collect();
    tests.sort_unstable();
    tests.dedup();
    let point = |r: &throughput::Row| Some((programs_ns_per_packet(r)?, r.ratio_to_no_filter?));
    tests
        .into_iter()
        .filter_map(|test| {
            // The calibration's rows, each with its point, in order of run time.
            let mut calib_rows: Vec<(&throughput::Row, (f64, f64))> = rows
                .iter()
                .filter(|r| r.test == test && matches!(r.filter.as_str(), "empty" | "spin"))
                .filter_map(|r| Some((r, point(r)?)))
                .collect();
            calib_rows.sort_by(|a, b| a.1.0.total_cmp(&b.1.0));
            let calib: Vec<(f64, f64)> = calib_rows.iter().map(|(_, p)| *p).collect();
            let (a, b) = fit_line(&calib)?;
            let (lo, hi) = (calib[0].0, calib[calib.len() - 1].0);
            let pts = calib
                .iter()
                .map(|(ns, x)| format!("{ns:.0} ns {x:.3}×"))
                .collect::<Vec<_>>()
                .join(", ");
            // The widest 95% interval among the points, in percent of no filter, either side.
            let spread = calib_rows
                .iter()
                .filter_map(|(r, _)| r.paired.as_ref()?.ci95)
                .map(|[l, h]| (h - l) / 2.0 * 100.0)
                .fold(None, |m: Option<f64>, w| Some(m.map_or(w, |m| m.max(w))))
                .map_or(String::new(), |w| {
                    format!("; each point's 95% interval up to ±{w:.1}% wide")
                });
            let slope = if b < 0.0 {
                let budget = if a > THROUGHPUT_BAR {
                    format!(
                        "on that line {THROUGHPUT_BAR}× no filter leaves {:.0} ns in situ (clock reads included)",
                        (THROUGHPUT_BAR - a) / b
                    )
                } else {
                    format!(
                        "that line is at {a:.3}× at 0 ns in situ: under {THROUGHPUT_BAR}× no filter at any run time"
                    )
                };
                format!(
                    "lose {:.1}% of the rate per 100 ns in situ (least squares over {} setups{spread}); {budget}",
                    -b * 1e4,
                    calib.len(),
                )
            } else {
                format!(
                    "lose no rate with run time on these runs: their line does not fall ({:+.1}% per 100 ns in situ, least squares over {} setups{spread})",
                    b * 1e4,
                    calib.len()
                )
            };
            let set_against: Vec<String> = rows
                .iter()
                .filter(|r| r.test == test && matches!(r.filter.as_str(), "vpcgate" | "minimal"))
                .filter_map(|r| {
                    let (ns, x) = point(r)?;
                    let line = a + b * ns;
                    // Near 0 (far past the calibration points) the quotient says nothing.
                    if line < 0.1 {
                        return None;
                    }
                    let outside = if ns < lo || ns > hi {
                        ", extrapolated"
                    } else {
                        ""
                    };
                    Some(format!(
                        "{} {ns:.0} ns, {x:.3}× (the line at {ns:.0} ns: {line:.3}×{outside}; so {:.2}× what its run time alone explains)",
                        r.setup,
                        x / line
                    ))
                })
                .collect();
            Some(format!(
                "Run time alone under {test} traffic: programs that only spend time ({pts}) {slope}.{}",
                if set_against.is_empty() {
                    String::new()
                } else {
                    format!(
                        " Set against it, with all of each setup's programs' time per packet: {}.",
                        set_against.join("; ")
                    )
                }
            ))
        })
        .collect()
}

/// vpcgate's TC egress under each test's traffic, beside the minimal enforcer with as many rules and the
/// empty program (kernel BPF statistics), and each one's share of what the busiest CPU spent per packet
/// in its setup's runs.
fn program_findings(rows: &[throughput::Row]) -> Vec<String> {
    let find = |filter: &str, rules: usize, test: &str| {
        rows.iter()
            .find(|r| r.filter == filter && r.rules == rules && r.test == test)
    };
    // "3.0% of 4870 ns (99% busy)"
    let share = |r: &throughput::Row, ns: f64| match (
        r.busiest_cpu_ns_per_packet,
        r.busiest_cpu_busy_percent,
    ) {
        (Some(b), Some(p)) if b > 0.0 => {
            format!("{:.1}% of {b:.0} ns ({p:.0}% busy)", 100.0 * ns / b)
        }
        _ => "–".into(),
    };
    rows.iter()
        .filter(|r| r.filter == "vpcgate")
        .filter_map(|r| {
            let own = tc_ns(r)?;
            let mut shares = vec![format!("vpcgate {}", share(r, own))];
            let mut others = String::new();
            for (label, row) in [
                ("the minimal enforcer", find("minimal", r.rules, &r.test)),
                ("the empty program", find("empty", 0, &r.test)),
            ] {
                if let Some((row, ns)) = row.and_then(|row| Some((row, tc_ns(row)?))) {
                    others += &format!(", {label} {ns:.0} ns");
                    shares.push(format!("{label} {}", share(row, ns)));
                }
            }
            Some(format!(
                "Under {} traffic ({}), vpcgate's TC egress took {own:.0} ns per packet{others} (kernel BPF statistics, their clock reads included). Against what the busiest CPU spent per packet in each setup's timed runs: {}.",
                r.test,
                r.setup,
                shares.join(", ")
            ))
        })
        .collect()
}

fn ms(s: Option<f64>) -> String {
    s.map_or("–".into(), |s| format!("{:.0} ms", s * 1e3))
}

fn control_findings(rows: &[control::Row]) -> Vec<String> {
    let mut out: Vec<String> = control::applies(rows)
        .into_iter()
        .map(|a| match &a.error {
            Some(e) if !a.fits => format!("{} rules ({}): refused: {e}", fmt_entries(a.rules), a.shape),
            _ => format!(
                "{} rules ({}): compile {}, first apply {}, one-rule change {} ({}), a new generation {}; kernel maps {:.0} MiB.",
                fmt_entries(a.rules),
                a.shape,
                ms(a.compile_seconds),
                ms(a.generation_seconds),
                ms(a.incremental_seconds),
                match a.incremental_in_place {
                    Some(true) => "in place",
                    Some(false) => "new generation",
                    None => "not run",
                },
                ms(a.regeneration_seconds),
                a.kernel_map_bytes.unwrap_or(0) as f64 / (1 << 20) as f64
            ),
        })
        .collect();
    if let Some(l) = control::reload(rows) {
        out.push(format!(
            "One-rule change from file write to kernel through the daemon's reload, {} rules: median {:.0} ms, max {:.0} ms ({:.0} ms of it the agent's inotify debounce).",
            fmt_entries(l.rules),
            l.median_seconds * 1e3,
            l.max_seconds * 1e3,
            l.debounce_seconds * 1e3
        ));
    }
    out
}

fn per_packet_plots(dir: &Path, s: &perpkt::Section) -> anyhow::Result<()> {
    for (regime, file) in [
        (Regime::Hot, "per_packet_hot.svg"),
        (Regime::Spread, "per_packet_spread.svg"),
        (Regime::Fresh, "per_packet_fresh.svg"),
    ] {
        let series: Vec<Series> = Prog::ALL
            .iter()
            .map(|&p| Series {
                label: p.label().to_string(),
                points: s
                    .rows
                    .iter()
                    .filter(|r| r.program == p && r.kind == Kind::Allowed && r.regime == regime)
                    .map(|r| (r.entries as f64, r.ns))
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        plot::lines(
            &dir.join(file),
            &format!("allowed packet, {regime:?}: ns per packet"),
            "ns per packet",
            &series,
        )?;
    }
    Ok(())
}

/// Writes report.md, report.json and the plots into `dir`.
pub fn write(dir: &Path, r: &Report) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(s) = &r.per_packet {
        per_packet_plots(dir, s)?;
    }
    if let Some(t) = &r.throughput {
        throughput::plots(dir, t)?;
    }
    let json = serde_json::to_string_pretty(r)?;
    std::fs::write(dir.join("report.json"), json).context("writing report.json")?;
    std::fs::write(dir.join("report.md"), markdown(r)).context("writing report.md")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throughput row of `filter` under `test` whose TC program took `ns` per run and whose ratio to no
    /// filter is `ratio`.
    fn row(setup: &str, filter: &str, test: &str, ns: f64, ratio: f64) -> throughput::Row {
        throughput::Row {
            setup: setup.into(),
            filter: filter.into(),
            rules: 0,
            test: test.into(),
            unit: "packets/s".into(),
            median: 1.0,
            samples: vec![],
            loss_percent: None,
            cpu_ns_per_packet: None,
            cpu_busy_percent: None,
            busiest_cpu_ns_per_packet: None,
            busiest_cpu_busy_percent: None,
            iperf3_cpu_ns_per_packet: None,
            packets_per_run: 1.0,
            runs: 1,
            seconds_per_run: 1,
            ratio_to_no_filter: Some(ratio),
            ratio_to_nftables: None,
            ratio_to_minimal: None,
            paired: None,
            note: String::new(),
            programs: vec![throughput::ProgramCost {
                program: if filter == "vpcgate" {
                    "vpcgate_tc_egre".into()
                } else {
                    format!("bench_tc_{filter}")
                },
                runs: 1000,
                ns_per_run: ns,
            }],
        }
    }

    #[test]
    fn a_line_is_fitted_by_least_squares() {
        let (a, b) = fit_line(&[(0.0, 1.0), (100.0, 0.9), (200.0, 0.8)]).unwrap();
        assert!(
            (a - 1.0).abs() < 1e-12 && (b + 0.001).abs() < 1e-12,
            "{a} {b}"
        );
        // Scattered points: the slope is cov(x, y) / var(x).
        let (a, b) = fit_line(&[(0.0, 1.0), (0.0, 0.8), (100.0, 0.8), (100.0, 0.6)]).unwrap();
        assert!(
            (a - 0.9).abs() < 1e-12 && (b + 0.002).abs() < 1e-12,
            "{a} {b}"
        );
        assert!(fit_line(&[(50.0, 1.0)]).is_none());
        assert!(
            fit_line(&[(50.0, 1.0), (50.0, 0.9)]).is_none(),
            "one x: no slope"
        );
        assert!(fit_line(&[]).is_none());
        // A ratio over a twin run of 0 packets: no line rather than a NaN one.
        assert!(fit_line(&[(50.0, 1.0), (100.0, f64::INFINITY)]).is_none());
        assert!(fit_line(&[(f64::NAN, 1.0), (100.0, 0.9)]).is_none());
    }

    #[test]
    fn programs_are_set_against_what_their_run_time_alone_takes() {
        // Run time alone: 1.0 at 0 ns, 10% per 100 ns; vpcgate at 150 ns on the line, the minimal
        // enforcer at 100 ns 0.05 under it. The other test has a single calibration point: no line.
        let mut rows = vec![
            row("empty TC program", "empty", "udp64", 50.0, 0.95),
            row("spin loop 50", "spin", "udp64", 100.0, 0.90),
            row("spin loop 250", "spin", "udp64", 250.0, 0.75),
            row("minimal enforcer 1k", "minimal", "udp64", 100.0, 0.85),
            row("vpcgate 1k", "vpcgate", "udp64", 150.0, 0.85),
            row("empty TC program", "empty", "tcp", 50.0, 1.0),
            row("vpcgate 1k", "vpcgate", "tcp", 150.0, 1.0),
        ];
        rows[1].paired = Some(throughput::Paired {
            ratios: vec![],
            median: 0.90,
            ci95: Some([0.87, 0.93]),
            twin_median: 1.0,
        });
        let f = calibration_findings(&rows);
        assert_eq!(f.len(), 1, "{f:#?}");
        let f = &f[0];
        assert!(f.starts_with("Run time alone under udp64 traffic"), "{f}");
        assert!(
            f.contains("(50 ns 0.950×, 100 ns 0.900×, 250 ns 0.750×)"),
            "{f}"
        );
        assert!(f.contains("lose 10.0% of the rate per 100 ns"), "{f}");
        assert!(
            f.contains("over 3 setups; each point's 95% interval up to ±3.0% wide)"),
            "{f}"
        );
        // 1 - 0.001 x = 0.97 at x = 30.
        assert!(f.contains("0.97× no filter leaves 30 ns in situ"), "{f}");
        assert!(
            f.contains("vpcgate 1k 150 ns, 0.850× (the line at 150 ns: 0.850×; so 1.00×"),
            "{f}"
        );
        assert!(
            f.contains("minimal enforcer 1k 100 ns, 0.850× (the line at 100 ns: 0.900×; so 0.94×"),
            "{f}"
        );

        // All of a setup's programs count, per run of its TC program: XDP ingress's 500 runs of
        // 100 ns add 50 ns to each of TC egress's 1000 runs of 150 ns.
        let mut with_xdp = rows.clone();
        with_xdp[4].programs.push(throughput::ProgramCost {
            program: "vpcgate_xdp_ing".into(),
            runs: 500,
            ns_per_run: 100.0,
        });
        let f = calibration_findings(&with_xdp);
        assert!(
            f[0].contains("vpcgate 1k 200 ns, 0.850× (the line at 200 ns: 0.800×; so 1.06×"),
            "{}",
            f[0]
        );

        // Outside the calibration points' run times, the line is extrapolated, and says so.
        let mut far = rows.clone();
        far[4].programs[0].ns_per_run = 300.0;
        let f = calibration_findings(&far);
        assert!(
            f[0].contains("vpcgate 1k 300 ns, 0.850× (the line at 300 ns: 0.700×, extrapolated;"),
            "{}",
            f[0]
        );
        // Where the line reaches 0 no ratio to it is given.
        for ns in [950.0, 1000.0, 1100.0] {
            far[4].programs[0].ns_per_run = ns;
            let f = calibration_findings(&far);
            assert!(!f[0].contains("vpcgate 1k"), "{}", f[0]);
        }
        far[4].programs[0].ns_per_run = 1000.0;
        let f = calibration_findings(&far);
        assert!(!f[0].contains("vpcgate 1k"), "{}", f[0]);

        // Rows without the programs' statistics are left out, not guessed.
        let mut bare = rows.clone();
        bare[4].programs.clear();
        let f = calibration_findings(&bare);
        assert!(!f[0].contains("vpcgate 1k"), "{}", f[0]);

        // A line already under the bar at 0 ns leaves no run time.
        let low = [
            row("empty TC program", "empty", "udp64", 50.0, 0.94),
            row("spin loop 250", "spin", "udp64", 250.0, 0.90),
        ];
        let f = calibration_findings(&low);
        assert!(
            f[0].contains(
                "that line is at 0.950× at 0 ns in situ: under 0.97× no filter at any run time"
            ),
            "{}",
            f[0]
        );
        assert!(!f[0].contains("leaves"), "{}", f[0]);

        // A line that does not fall gives no budget.
        let flat = [
            row("empty TC program", "empty", "udp64", 50.0, 0.95),
            row("spin loop 50", "spin", "udp64", 100.0, 0.96),
        ];
        let f = calibration_findings(&flat);
        assert!(!f[0].contains("leaves"), "{}", f[0]);
        assert!(
            f[0].contains("lose no rate with run time on these runs: their line does not fall (+2.0% per 100 ns"),
            "{}",
            f[0]
        );
    }
}
