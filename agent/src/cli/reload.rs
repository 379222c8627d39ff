//! `vpcgate reload [--instance NAME]`: ask the running agent to re-read its policy file now, through
//! its control socket, and say how it went.

use super::{EXIT_FAILED, EXIT_OK, Output, daemon, fail, print_json};

#[derive(clap::Args, Debug)]
#[command(after_help = "Example:\n  vpcgate reload --instance gw-hz-1\n\n\
    The agent also reloads on its own when the file changes, and on SIGHUP; this waits for the result.\n\
    Exit 0: applied; 1: refused (the errors are in the reply and the agent's log; the previous policy\n\
    stays); 2: no agent answers on /run/vpcgate/<instance>.sock.")]
pub struct Args {
    /// The instance; optional when only one is pinned.
    #[arg(long, value_name = "NAME")]
    pub instance: Option<String>,
    /// Report format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

pub fn run(args: &Args) -> u8 {
    let instance = match args
        .instance
        .clone()
        .map_or_else(super::status::only_instance, Ok)
    {
        Ok(i) => i,
        Err(e) => return fail(args.output, "no_instance", e),
    };
    let reply = match daemon::control_call(&instance, "reload") {
        Ok(r) => r,
        Err(e) => return fail(args.output, "no_agent", e),
    };
    let ok = reply["ok"] == true;
    match args.output {
        Output::Json => {
            if let Err(code) = print_json(&reply) {
                return code;
            }
        }
        Output::Text if ok => println!(
            "instance {instance}: policy applied (generation {}, {:.1} ms)",
            reply["result"]["generation"],
            reply["result"]["apply_ms"].as_f64().unwrap_or(0.0)
        ),
        Output::Text => println!(
            "instance {instance}: reload refused: {}",
            reply["error"]["message"].as_str().unwrap_or("?")
        ),
    }
    if ok { EXIT_OK } else { EXIT_FAILED }
}
