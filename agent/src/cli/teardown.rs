//! `vpcgate teardown --instance NAME`: remove what an instance pinned.

use super::{EXIT_OK, Output, fail, print_json};
use crate::datapath::{DatapathError, pin};

#[derive(clap::Args, Debug)]
#[command(after_help = "Example:\n  vpcgate teardown --instance gw-hz-1\n\n\
    Unpins the instance's links (each detaches: egress through that interface is no longer enforced),\n\
    removes its cls_bpf filters on kernels without tcx (run it in the agent's network namespace), then its\n\
    programs and maps, of any build. Refused while an agent runs the instance: stop it first.\n\
    Exit 0: removed; 2: nothing pinned for that instance, or a removal failed (what was removed stays removed).")]
pub struct Args {
    /// The instance ([instance].name of its policy).
    #[arg(long, value_name = "NAME")]
    pub instance: String,
    /// Report format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

pub fn run(args: &Args) -> u8 {
    // Never under a running agent: it would go on believing it enforces, and a starting one could
    // adopt programs whose maps are half removed.
    let _lock = match super::record::lock_instance(&args.instance) {
        Ok(l) => l,
        Err(e) => return fail(args.output, "agent_running", e),
    };
    let report = match pin::teardown(&args.instance) {
        Ok(r) => r,
        Err(e @ DatapathError::NoInstance(_)) => {
            return fail(args.output, "no_instance", e.to_string());
        }
        Err(e) => return fail(args.output, "teardown_failed", e.to_string()),
    };
    // The agent's records go with the pins (the lock file too: we hold it while it is unlinked).
    super::record::remove_all(&args.instance);
    match args.output {
        Output::Json => {
            if let Err(code) = print_json(&report) {
                return code;
            }
        }
        Output::Text => {
            println!(
                "instance {}: removed {} link(s){}{}, build(s) {}",
                args.instance,
                report.links.len(),
                if report.links.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", report.links.join(", "))
                },
                if report.clsact.is_empty() {
                    String::new()
                } else {
                    format!(", clsact filters on {}", report.clsact.join(", "))
                },
                report.builds.join(", ")
            );
        }
    }
    EXIT_OK
}
