//! A running `vpcgate run`, started inside a namespace, whose log lines a test can wait for.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::netns::{Netns, spawn_in};

/// How long `wait_for` waits for a log line.
const LOG_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `vpcgate run` and its log lines (its stderr, also echoed to the test's stderr prefixed with
/// `vpcgate: `). Dropped while still running (a test that panicked), it is sent SIGTERM, then SIGKILL if
/// it has not exited 5 s later, and reaped: no agent outlives its test.
pub struct Agent {
    child: Child,
    log: mpsc::Receiver<String>,
}

impl Agent {
    /// `bin run --config config` started from a thread inside `ns` (see `spawn_in`), run by `wrapper`
    /// (e.g. setpriv and its options) when not empty. Its stdout is the test's.
    pub fn start(ns: &Netns, bin: &str, wrapper: &[&str], config: &Path) -> Self {
        let config = config
            .to_str()
            .unwrap_or_else(|| panic!("config path {config:?} is not UTF-8"));
        let run = [bin, "run", "--config", config];
        let mut child = match wrapper.split_first() {
            Some((first, rest)) => {
                let args: Vec<&str> = rest.iter().copied().chain(run).collect();
                spawn_in(ns, first, &args, Stdio::inherit())
            }
            None => spawn_in(ns, bin, &run[1..], Stdio::inherit()),
        };
        let (tx, log) = mpsc::channel::<String>();
        let stderr = child.stderr.take().expect("spawn_in pipes stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("vpcgate: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, log }
    }

    /// Waits (up to 30 s) for a log line containing `needle`; returns it. Lines before it are consumed.
    pub fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + LOG_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("vpcgate run never logged {needle:?}: {e}"),
            }
        }
    }

    /// The agent's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to the agent.
    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child, which is not reaped while `self` holds it unless `wait` ran.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Waits for the agent to exit (after a signal it was sent).
    pub fn wait(&mut self) -> ExitStatus {
        self.child.wait().expect("wait for vpcgate run")
    }

    /// SIGTERM, and asserts the agent exited successfully.
    pub fn stop(mut self) {
        self.signal(libc::SIGTERM);
        let status = self.wait();
        assert!(status.success(), "vpcgate run exited with {status}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return; // Exited (and reaped) already.
        }
        // SAFETY: signalling our own child, not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
