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
