//! The command line: a thin clap layer, one module per subcommand.

mod check;
mod daemon;
mod diff;
mod drops;
mod explain;
mod preflight;
mod probe;
mod record;
mod reload;
mod run;
mod status;
mod teardown;

use clap::{Parser, Subcommand, ValueEnum};

/// Exit status: the checked thing is fine.
pub const EXIT_OK: u8 = 0;
/// Exit status: the checked thing failed (invalid policy, probe not connected, host not ready).
pub const EXIT_FAILED: u8 = 1;
/// Exit status: usage or runtime error.
pub const EXIT_ERROR: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "vpcgate",
    version,
    about = "eBPF egress enforcement for API-gateway hosts",
    long_about = "vpcgate enforces, in the kernel, which backends inside a VPC an API gateway may reach \
                  (VPC access authorizations, accessible CIDR blocks, reserved blocks, upstreams), counts \
                  every drop by reason and destination, and diagnoses failed connections from what the \
                  kernel saw.\n\n\
                  Exit status: 0 ok, 1 the checked thing failed, 2 usage or runtime error.",
    after_help = "Examples:\n  \
                  vpcgate check examples/policy.toml              validate a policy, every problem at once\n  \
                  vpcgate explain examples/policy.toml 10.0.3.7:80   would the gateway reach it, and why\n  \
                  vpcgate preflight --config policy.toml          can this host run vpcgate, on which paths?\n  \
                  vpcgate run --config /etc/vpcgate/policy.toml   enforce (pinned: survives the agent)\n  \
                  vpcgate status                                  what the kernel enforces right now\n  \
                  vpcgate diff new.toml                           what a reload would change, and cut"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Validate a policy file and print every problem (file:line:col, what is wrong, how to fix it).
    Check(check::Args),
    /// Offline: the verdict for one packet under a policy, the deciding rule, and for a drop the smallest
    /// policy change that would allow it.
    Explain(explain::Args),
    /// Enforce a policy: apply it, attach and pin the programs (enforcement outlives the agent; a restart
    /// adopts it), reload on SIGHUP.
    Run(run::Args),
    /// What the kernel enforces for an instance (pinned maps and links) and what its agent recorded;
    /// works while the agent is stopped.
    Status(status::Args),
    /// What a reload to NEW_FILE would change (rules, kernel entries), and which removed or narrowed
    /// permissions carried traffic.
    Diff(diff::Args),
    /// Ask the running agent to re-read its policy file now (control socket) and report the result.
    Reload(reload::Args),
    /// Remove everything an instance pinned: its links (enforcement ends), filters, programs and maps.
    Teardown(teardown::Args),
    /// Check that this host can run vpcgate and which paths it takes: tcx or clsact, ring buffer,
    /// map-in-map, socket lookups, the verifier, and native or generic XDP per interface.
    Preflight(preflight::Args),
    /// Connectivity test from the egress IP with the three-step diagnosis (authorization, network,
    /// service), from what the kernel saw of exactly this connection.
    Probe(probe::Args),
    /// Drop events: time, interface, src → dst:port, protocol, reason, and the change that would
    /// allow it; --kernel adds this host's own drops of the gateway's packets.
    Drops(drops::Args),
}

impl Cli {
    /// Whether logs go out as JSON lines (`run --log-format json`).
    pub fn log_json(&self) -> bool {
        matches!(&self.command, Command::Run(a) if a.log_format == run::LogFormat::Json)
    }
}

/// `--output` of every command that reports state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

/// Prints `value` as pretty JSON; on failure reports it and returns the exit status.
pub(crate) fn print_json(value: &impl serde::Serialize) -> Result<(), u8> {
    match serde_json::to_string_pretty(value) {
        Ok(s) => {
            println!("{s}");
            Ok(())
        }
        Err(e) => {
            eprintln!("vpcgate: cannot encode JSON: {e}");
            Err(EXIT_ERROR)
        }
    }
}

/// A usage or runtime error (exit status 2): the message on stderr, and with `--output json` also
/// `{"error": {"code": CODE, "message": MESSAGE}}` on stdout, so a script always gets JSON.
/// Codes: `unreadable_file`, `invalid_policy`, `bad_destination`.
/// The stderr line escapes control characters: messages echo paths and arguments.
pub(crate) fn fail(output: Output, code: &str, message: String) -> u8 {
    eprintln!(
        "vpcgate: {}",
        crate::policy::diag::escape_controls(&message)
    );
    if output == Output::Json {
        let body = serde_json::json!({ "error": { "code": code, "message": message } });
        println!("{body}");
    }
    EXIT_ERROR
}

/// Runs the parsed command line; returns the process exit status.
pub fn run(cli: Cli) -> u8 {
    if !matches!(cli.command, Command::Run(_)) {
        // A report piped into `head` ends quietly when the reader goes away, as other Unix tools do
        // (Rust ignores SIGPIPE, and `println!` then panics with a stack trace). `run` keeps it ignored.
        // SAFETY: restoring a signal's default disposition, before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match cli.command {
        Command::Check(args) => check::run(&args),
        Command::Explain(args) => explain::run(&args),
        Command::Preflight(args) => preflight::run(&args),
        Command::Run(args) => run::run(&args),
        Command::Teardown(args) => teardown::run(&args),
        Command::Status(args) => status::run(&args),
        Command::Reload(args) => reload::run(&args),
        Command::Diff(args) => diff::run(&args),
        Command::Probe(args) => probe::run(&args),
        Command::Drops(args) => drops::run(&args),
    }
}
