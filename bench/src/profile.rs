//! Where the time goes: `perf record` (cpu-clock samples, this process only) while one program runs one
//! kind of packet in a loop, then the share of samples per kernel symbol: the program's own instructions
//! (`bpf_prog_<tag>_<name>`), each map helper (`trie_lookup_elem`, `htab_*`, ...), the clock, the ring
//! buffer, and BPF_PROG_TEST_RUN's own set-up (which the floor measures).

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::Serialize;

#[derive(Serialize, Clone, Debug)]
pub struct Symbol {
    pub symbol: String,
    /// Share of this process's samples, in percent.
    pub percent: f64,
}

pub fn available() -> bool {
    Command::new("perf")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

struct Recording {
    child: Child,
}

impl Drop for Recording {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Samples this process for `seconds` while `work` runs (called until the recording ends), then
/// returns the symbols above `min_percent`.
pub fn record(
    data: &Path,
    seconds: u32,
    min_percent: f64,
    mut work: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Symbol>> {
    let child = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "4999", "-p"])
        .arg(std::process::id().to_string())
        .arg("-o")
        .arg(data)
        .args(["--", "sleep", &seconds.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running perf (Debian package linux-perf)")?;
    let mut rec = Recording { child };
    // Let perf attach before the loop starts; stop at its end (bounded by twice the time asked).
    std::thread::sleep(Duration::from_millis(300));
    let deadline = Instant::now() + Duration::from_secs(2 * u64::from(seconds) + 5);
    loop {
        if rec.child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            bail!("perf record did not end within {}s", 2 * seconds + 5);
        }
        work()?;
    }
    let status = rec.child.wait()?;
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = rec.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        bail!("perf record failed ({status}): {err}");
    }
    let out = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "-q",
            "--no-children",
            "--sort",
            "symbol",
            "-i",
        ])
        .arg(data)
        .output()
        .context("perf report")?;
    if !out.status.success() {
        bail!(
            "perf report failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Kept on request, for `perf annotate -i FILE --stdio -s bpf_prog_…` (which instructions of a
    // program take the time).
    if std::env::var_os("VPCGATE_BENCH_KEEP_PERF").is_none() {
        let _ = std::fs::remove_file(data);
    }
    Ok(parse_report(
        &String::from_utf8_lossy(&out.stdout),
        min_percent,
    ))
}

/// `perf report --stdio -q --sort symbol` lines: `  12.34%  [k] trie_lookup_elem`.
pub fn parse_report(text: &str, min_percent: f64) -> Vec<Symbol> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let (pct, rest) = l.split_once('%')?;
            let percent: f64 = pct.trim().parse().ok()?;
            let rest = rest.trim();
            // `[k] name` (kernel) or `[.] name` (user), then perf's padding columns.
            let symbol = rest
                .strip_prefix("[k]")
                .or_else(|| rest.strip_prefix("[.]"))
                .unwrap_or(rest)
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_string();
            (percent >= min_percent && !symbol.is_empty()).then_some(Symbol { symbol, percent })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_become_symbols_above_the_cut() {
        let text = "\n    41.20%  [k] bpf_prog_0123456789abcdef_vpcgate_tc_egress\n     20.05%  [k] trie_lookup_elem                     -      -\n     0.30%  [k] rcu_read_unlock\n     3.00%  [.] main\n# comment\n";
        let s = parse_report(text, 1.0);
        let got: Vec<(&str, f64)> = s.iter().map(|s| (s.symbol.as_str(), s.percent)).collect();
        assert_eq!(
            got,
            [
                ("bpf_prog_0123456789abcdef_vpcgate_tc_egress", 41.2),
                ("trie_lookup_elem", 20.05),
                ("main", 3.0)
            ]
        );
    }
}
