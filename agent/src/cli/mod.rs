//! The command line: a thin clap layer, one module per subcommand.

mod preflight;

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
    after_help = "Examples:\n  vpcgate preflight                 can this host run vpcgate?\n  \
                  vpcgate preflight --output json   the same, for automation"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check that this host can run vpcgate: kernel, BTF, bpffs, and the kernel programs pass the verifier
    /// and classify a test packet.
    Preflight(preflight::Args),
}

/// `--output` of every command that reports state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

/// Runs the parsed command line; returns the process exit status.
pub fn run(cli: Cli) -> u8 {
    match cli.command {
        Command::Preflight(args) => preflight::run(&args),
    }
}
