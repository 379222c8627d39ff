//! `cargo xtask bench`: vpcgate's per-packet cost, veth throughput and control-plane speed, each beside
//! baselines measured in the same run. Writes `report.md`, `report.json` and SVG plots to the output
//! directory (default target/bench/). Needs root. See README.md "Benchmarks".

mod control;
mod perpkt;
mod plot;
mod policy;
mod profile;
mod report;
mod throughput;
mod xdp_filter;

use std::{path::PathBuf, time::Instant};

use clap::Parser;

#[derive(Parser, Clone)]
#[command(
    name = "vpcgate-bench",
    about = "vpcgate's benchmarks (run through `cargo xtask bench`)",
    after_help = "With VPCGATE_BENCH_KEEP_PERF set, the profiles' perf data files stay in the output \
directory (perf-<program>-<regime>.data), for `perf annotate -i FILE --stdio -s <symbol>`."
)]
pub struct Opts {
    /// Fewer sizes, shorter runs: finishes in under 3 minutes.
    #[arg(long)]
    pub quick: bool,
    /// Where report.md, report.json and the plots go.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// The vpcgate binary the throughput and control-plane runs start (`vpcgate run`, `vpcgate check`).
    #[arg(long, env = "VPCGATE_BIN")]
    pub vpcgate: PathBuf,
    /// Seed of the generated policies and packet draws [default: a fresh one, printed].
    #[arg(long, value_parser = parse_seed)]
    pub seed: Option<u64>,
    /// Run only these parts (repeatable or comma-separated) [default: all].
    #[arg(long, value_delimiter = ',', value_enum)]
    pub only: Vec<Part>,
    /// Per-packet cost at these policy sizes only (rules, comma-separated), with the run's other
    /// parameters (rounds, repeats, spread frames) [default: 10,1000,100000 with --quick, and 1000000 too
    /// without]. For comparing two builds at one size without the whole run.
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<usize>,
    /// Throughput: runs per setup, test and round (for no filter and the BPF setups, pairs of runs: one
    /// through the ENI, one through the twin link) [default: 2 with --quick, 6 without (five rounds)].
    #[arg(long)]
    pub pairs: Option<usize>,
    /// Throughput: only these setups (comma-separated), in this order: none, empty, parse,
    /// lookup-<rules>, spin-<iterations>, minimal-<rules>, vpcgate-<rules>, nftables-<rules>,
    /// iptables-<rules> (rules such as 1000 or 1k; parse and lookup are the minimal enforcer's halves;
    /// spin is a program that only loops, up to 2048 times, to calibrate what run time alone costs)
    /// [default: the run's own list]. For comparing two builds without the whole run.
    #[arg(long, value_delimiter = ',')]
    pub setups: Vec<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Part {
    /// Per-packet cost with BPF_PROG_TEST_RUN.
    PerPacket,
    /// veth throughput with iperf3.
    Throughput,
    /// Apply, reload, check, memory.
    Control,
}

/// The median of `v` (the mean of the middle two for an even count; NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// A distribution-free 95% confidence interval of the median of `v`: the order statistics `k` and
/// `n + 1 - k` (1-based) of its `n` values, for the largest `k` whose lower tail P(Binomial(n, 1/2) < k)
/// is at most 2.5%. None for fewer than 6 values (no such `k`) or any NaN.
pub fn median_ci95(v: &[f64]) -> Option<(f64, f64)> {
    let n = v.len();
    if v.iter().any(|x| x.is_nan()) {
        return None;
    }
    // ln P(X = i) = ln C(n, i) - n ln 2, summed in linear space (at most 2.5% of 1: no underflow that
    // matters; terms below f64's range are 0 and add nothing).
    let ln2n = n as f64 * std::f64::consts::LN_2;
    let mut ln_choose = 0.0;
    let mut tail = 0.0;
    let mut k = 0;
    for i in 0..n.div_ceil(2) {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_choose - ln2n).exp();
        if tail > 0.025 {
            break;
        }
        // P(X <= i) <= 2.5%: k = i + 1 qualifies.
        k = i + 1;
    }
    if k == 0 {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Some((s[k - 1], s[n - k]))
}

fn parse_seed(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s}: {e} (decimal or 0x-prefixed hex)"))
}

/// Progress on the terminal: elapsed time and what runs now.
pub struct Progress {
    start: Instant,
}

impl Progress {
    fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }

    pub fn say(&self, msg: &str) {
        eprintln!("[{:>6.1}s] {msg}", self.start.elapsed().as_secs_f64());
    }
}

fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "the benchmarks load BPF programs and create network namespaces: run as root (`sudo -E cargo xtask bench`)"
        );
    }
    let progress = Progress::new();
    let seed = opts.seed.unwrap_or_else(|| fastrand::u64(..));
    progress.say(&format!(
        "{} run, seed {seed:#x} (repeat with --seed {seed:#x}), output in {}",
        if opts.quick { "quick" } else { "full" },
        opts.out.display()
    ));
    let wants = |p: Part| opts.only.is_empty() || opts.only.contains(&p);
    let mut r = report::Report {
        date: report::today(),
        quick: opts.quick,
        seed: format!("{seed:#x}"),
        machine: report::machine(&opts.vpcgate),
        per_packet: None,
        throughput: None,
        control: None,
        findings: vec![],
    };
    if wants(Part::PerPacket) {
        r.per_packet = Some(perpkt::run(
            opts.quick,
            &opts.sizes,
            seed,
            &opts.out,
            &progress,
        )?);
    }
    if wants(Part::Throughput) {
        r.throughput = Some(throughput::run(&opts, seed, &progress)?);
    }
    if wants(Part::Control) {
        r.control = Some(control::run(&opts, seed, &progress)?);
    }
    r.findings = report::findings(&r);
    report::write(&opts.out, &r)?;
    progress.say(&format!(
        "done: {} ({} and plots beside it)",
        opts.out.join("report.md").display(),
        opts.out.join("report.json").display()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::median_ci95;

    /// P(Binomial(n, 1/2) <= i), exactly, in integers.
    fn lower_tail(n: u32, i: u32) -> f64 {
        let mut c: u128 = 1;
        let mut sum: u128 = 1;
        for j in 1..=i {
            c = c * u128::from(n - j + 1) / u128::from(j);
            sum += c;
        }
        sum as f64 / 2f64.powi(n as i32)
    }

    #[test]
    fn the_interval_is_the_widest_order_statistic_pair_the_binomial_tail_allows() {
        // Values 0..n shuffled: the interval's ends are the order statistics themselves.
        let mut rng = fastrand::Rng::with_seed(7);
        for n in 0..=120u32 {
            let mut v: Vec<f64> = (0..n).map(f64::from).collect();
            rng.shuffle(&mut v);
            // The k of the definition, from exact integer tails.
            let k = (0..n.div_ceil(2))
                .take_while(|&i| lower_tail(n, i) <= 0.025)
                .count() as u32;
            match median_ci95(&v) {
                None => assert_eq!(k, 0, "n = {n}: no interval, but k = {k}"),
                Some((lo, hi)) => {
                    assert!(k > 0, "n = {n}: an interval without a k");
                    assert_eq!((lo, hi), (f64::from(k - 1), f64::from(n - k)), "n = {n}");
                }
            }
        }
    }

    #[test]
    fn known_intervals() {
        let v = |n: u32| (0..n).map(f64::from).collect::<Vec<_>>();
        assert_eq!(median_ci95(&v(5)), None, "P(X = 0) = 1/32 > 2.5%");
        assert_eq!(median_ci95(&v(6)), Some((0.0, 5.0)), "1/64 <= 2.5% < 7/64");
        assert_eq!(median_ci95(&v(10)), Some((1.0, 8.0)));
        assert_eq!(median_ci95(&v(20)), Some((5.0, 14.0)));
        assert_eq!(median_ci95(&v(30)), Some((9.0, 20.0)));
        assert_eq!(median_ci95(&[1.0, f64::NAN, 2.0, 3.0, 4.0, 5.0, 6.0]), None);
    }
}
