use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;

fn main() -> ExitCode {
    let cli = vpcgate::cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("VPCGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json() {
        fmt.json().init();
    } else {
        fmt.with_ansi(std::io::stderr().is_terminal()).init();
    }
    ExitCode::from(vpcgate::cli::run(cli))
}
