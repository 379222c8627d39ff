//! `cargo xtask demo`: vpcgate in the lab (tests/src/lab.rs). Creates a gateway and a "VPC" network
//! namespace, runs `vpcgate run` with the lab's example policy on the gateway's ENI, shows `vpcgate probe
//! --all`, one probe with a contrast source, `vpcgate status` and a `vpcgate drops` excerpt, then removes
//! everything: the agent, its pins (`vpcgate teardown`), the namespaces. Ctrl-C removes everything too.
//!
//! Usage: VPCGATE_BIN=path/to/vpcgate vpcgate-demo [--instance NAME]   (root)

use std::{
    process::{Command, ExitCode, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use vpcgate_lab::{
    agent::Agent,
    lab::{self, Lab},
};

/// The running agent's pid (0: none), for the cleanup on a signal.
static AGENT: AtomicU32 = AtomicU32::new(0);

/// Stops the agent if it still runs (SIGTERM, reaped, bounded), then `vpcgate teardown`: the links,
/// pins and /run/vpcgate records go, under the instance's lock.
fn remove_instance(bin: &str, instance: &str) {
    let pid = AGENT.swap(0, Ordering::SeqCst);
    if pid != 0 {
        // SAFETY: signalling and reaping our own child.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) == 0 {
                if Instant::now() >= deadline {
                    libc::kill(pid as i32, libc::SIGKILL);
                    libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    if vpcgate::datapath::pin::instance_dir(instance).exists() {
        let _ = Command::new(bin)
            .args(["teardown", "--instance", instance])
            .stdout(Stdio::null())
            .status();
    }
}

fn banner(text: &str) {
    println!("\n\x1b[1m==> {text}\x1b[0m");
}

/// `vpcgate ARGS` in the gateway namespace, its output shown; its exit code.
fn show(lab: &Lab, bin: &str, args: &[&str]) -> Result<i32, String> {
    banner(&format!("vpcgate {}", args.join(" ")));
    let out = lab::spawn_in(&lab.gw, bin, args, Stdio::piped())
        .wait_with_output()
        .map_err(|e| format!("vpcgate {}: {e}", args.join(" ")))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let code = out.status.code().unwrap_or(-1);
    // 0 and 1 are answers (connected or not, valid or not); anything else is a failure of the demo.
    if code == 0 || code == 1 {
        Ok(code)
    } else {
        Err(format!(
            "vpcgate {} exited with {}",
            args.join(" "),
            out.status
        ))
    }
}

fn demo(bin: &str, instance: &str, dir: &std::path::Path) -> Result<(), String> {
    banner("creating the lab: namespaces, veth, security groups (nftables), an HTTP backend");
    let lab = Lab::new();
    println!(
        "gateway: ENI {} with egress IP {} (and {}), {} / {}\n\
         VPC:     backend {} (HTTP on {}, nothing on {}), security group dropping the egress IP at {},\n         \
         one rejecting it (ICMP admin-prohibited) at {}, an address nobody owns: {}",
        lab::ENI,
        lab::EGRESS_V4,
        lab::SECOND_V4,
        lab::EGRESS_V6,
        lab::SECOND_V6,
        lab::BACKEND_V4,
        lab::HTTP_PORT,
        lab::CLOSED_PORT,
        lab::SG_DROP_V4,
        lab::SG_REJECT_V4,
        lab::NOBODY_V4
    );
    let file = dir.join("policy.toml");
    std::fs::write(&file, lab::example_policy(instance)).map_err(|e| e.to_string())?;
    let file_s = file.to_string_lossy().into_owned();
    show(&lab, bin, &["check", &file_s])?;

    banner(&format!(
        "vpcgate run --config {file_s}   (the agent, in the background)"
    ));
    let agent = Agent::start(&lab.gw, bin, &[], &file);
    AGENT.store(agent.id(), Ordering::SeqCst);
    agent.wait_for("serving /metrics");

    let inst = ["--instance", instance];
    show(
        &lab,
        bin,
        &[&["probe", "--all", "--timeout", "2s"][..], &inst].concat(),
    )?;
    let sg = format!("{}:{}", lab::SG_DROP_V4, lab::HTTP_PORT);
    let second = lab::SECOND_V4.to_string();
    show(
        &lab,
        bin,
        &[
            &["probe", &sg, "--contrast-from", &second, "--evidence"][..],
            &inst,
        ]
        .concat(),
    )?;
    show(&lab, bin, &[&["status"][..], &inst].concat())?;
    // Something the policy does not allow, then the drop events it left.
    let unlisted = format!("{}:{}", lab::UNLISTED_V4, lab::HTTP_PORT);
    show(
        &lab,
        bin,
        &[&["probe", &unlisted, "--timeout", "1s"][..], &inst].concat(),
    )?;
    show(&lab, bin, &[&["drops"][..], &inst].concat())?;

    banner("removing everything: the agent, its pins, the namespaces");
    AGENT.store(0, Ordering::SeqCst);
    agent.stop();
    show(&lab, bin, &["teardown", "--instance", instance])?;
    drop(lab);
    println!("done: no namespace, pin or program of the demo is left");
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("vpcgate-demo: needs root (network namespaces, BPF): sudo cargo xtask demo");
        return ExitCode::from(2);
    }
    let Ok(bin) = std::env::var("VPCGATE_BIN") else {
        eprintln!("vpcgate-demo: set VPCGATE_BIN to the vpcgate binary (cargo xtask demo does)");
        return ExitCode::from(2);
    };
    let args: Vec<String> = std::env::args().collect();
    let instance = match args.as_slice() {
        [_] => "demo".to_owned(),
        [_, flag, name] if flag == "--instance" => name.clone(),
        _ => {
            eprintln!("usage: vpcgate-demo [--instance NAME]");
            return ExitCode::from(2);
        }
    };
    if vpcgate::datapath::pin::instance_dir(&instance).exists() {
        eprintln!(
            "vpcgate-demo: instance {instance} is pinned already (a previous demo?): `vpcgate teardown --instance {instance}` first"
        );
        return ExitCode::from(2);
    }
    let dir = std::env::temp_dir().join(format!("vpcgate-demo-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("vpcgate-demo: {}: {e}", dir.display());
        return ExitCode::from(2);
    }
    // Ctrl-C (or a failure) must not leave pins behind: the agent stops with the signal, this removes
    // its pins, then the lab's namespaces go.
    lab::remove_on_signal();
    let (b, inst, d) = (bin.clone(), instance.clone(), dir.clone());
    lab::on_signal_cleanup(Box::new(move || {
        remove_instance(&b, &inst);
        let _ = std::fs::remove_dir_all(&d);
    }));
    let result = std::panic::catch_unwind(|| demo(&bin, &instance, &dir));
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            remove_instance(&bin, &instance);
            eprintln!("vpcgate-demo: {e}");
            ExitCode::from(2)
        }
        Err(_) => {
            remove_instance(&bin, &instance);
            ExitCode::from(2)
        }
    }
}
