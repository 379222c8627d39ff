//! What the process created that must not outlive it, even when it is interrupted: the network namespaces
//! it still holds (every `Netns` registers itself) and cleanup steps its users add (e.g. a demo's `vpcgate
//! teardown`). `remove_on_signal` makes SIGINT, SIGTERM and SIGHUP remove them before the process exits;
//! without it the registry is only bookkeeping and `Drop` does the work.

use std::{
    collections::BTreeSet,
    process::Command,
    sync::{Mutex, MutexGuard, Once},
};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

type Cleanup = Box<dyn Fn() + Send + Sync>;

static NAMESPACES: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
static CLEANUPS: Mutex<Vec<Cleanup>> = Mutex::new(Vec::new());
static INSTALL: Once = Once::new();

/// The lock even when a panicking thread poisoned it: the data (names, closures) stays valid.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Notes a network namespace this process is about to create (before `ip netns add`, so a signal in
/// between cannot leak it).
pub(crate) fn register_netns(name: &str) {
    lock(&NAMESPACES).insert(name.to_owned());
}

/// Forgets a namespace this process deleted.
pub(crate) fn unregister_netns(name: &str) {
    lock(&NAMESPACES).remove(name);
}

/// The namespaces this process created and has not deleted yet.
pub fn live_namespaces() -> Vec<String> {
    lock(&NAMESPACES).iter().cloned().collect()
}

/// Adds a step that runs when a signal ends the process (after `remove_on_signal`), before the namespaces
/// are deleted, so a step may still run something inside them. Steps run in the order they were added;
/// one that panics does not stop the others. Nothing removes a step: make it harmless when its work was
/// already done (a `vpcgate teardown` of an instance already torn down fails and changes nothing).
pub fn on_signal_cleanup(f: Cleanup) {
    lock(&CLEANUPS).push(f);
}

/// Installs, once per process, a thread that on SIGINT, SIGTERM or SIGHUP runs the `on_signal_cleanup`
/// steps, deletes every namespace this process created and still holds, and exits with 128 + the signal.
/// Those signals no longer end the process by themselves once this ran.
pub fn remove_on_signal() {
    INSTALL.call_once(|| {
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
            .unwrap_or_else(|e| panic!("install signal handlers: {e}"));
        std::thread::Builder::new()
            .name("lab-cleanup-on-signal".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    eprintln!("lab: signal {sig}: removing what this process created");
                    cleanup_now();
                    std::process::exit(128 + sig);
                }
            })
            .unwrap_or_else(|e| panic!("spawn the signal thread: {e}"));
    });
}

/// What the signal thread does before exiting: the cleanup steps, then the namespaces. Never panics.
fn cleanup_now() {
    // Taken out of the registry, so a step may register another without deadlocking.
    let steps = std::mem::take(&mut *lock(&CLEANUPS));
    for step in &steps {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)).is_err() {
            eprintln!("lab: a cleanup step panicked; going on");
        }
    }
    for name in live_namespaces() {
        match Command::new("ip").args(["netns", "del", &name]).output() {
            Ok(o) if o.status.success() => unregister_netns(&name),
            other => eprintln!("lab: could not delete network namespace {name}: {other:?}"),
        }
    }
}
