//! What the agent records about its instance for `status`: /run/vpcgate/<instance>.json, written
//! atomically (temp file + rename) after every apply or failed reload. The kernel maps are the truth
//! about enforcement; this record adds what only the agent knows (the policy file, rule names, when and
//! how long the apply took, the last reload error), and `status` checks it against the kernel.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::policy::compile::Compiled;

pub const RUN_DIR: &str = "/run/vpcgate";

/// The policy text the agent last applied (what `diff` compares with).
pub fn applied_path(instance: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{instance}.applied.toml"))
}

/// Writes `bytes` to `dest` atomically, mode 0600.
fn write_atomic(dest: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = dest.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dest)
}

pub fn write_applied(instance: &str, text: &[u8]) -> std::io::Result<()> {
    write_atomic(&applied_path(instance), text)
}

/// Removes the instance's files in /run/vpcgate (record, applied copy, stale socket, lock); best effort.
pub fn remove_all(instance: &str) {
    for ext in ["json", "applied.toml", "sock", "lock", "drops.lock"] {
        let _ = std::fs::remove_file(Path::new(RUN_DIR).join(format!("{instance}.{ext}")));
    }
}

pub fn path(instance: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{instance}.json"))
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RuleName {
    pub id: u32,
    pub kind: String,
    pub name: String,
    /// What carries a rule's counters across reloads (kind + name; an upstream node also its address).
    #[serde(default)]
    pub identity: String,
}

/// Counts of a rule's earlier generations, folded in when a reload deleted its kernel counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RuleTotal {
    pub kind: String,
    pub identity: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub instance: String,
    pub pid: u32,
    pub build: String,
    pub policy_file: String,
    /// The generation the last successful apply made active.
    pub generation: u8,
    pub applied_at_unix_ms: u64,
    pub apply_ms: f64,
    pub interface: String,
    /// `tcx` or `clsact`.
    pub tc_attach: String,
    /// (interface, role, mode) of each XDP attachment.
    pub xdp: Vec<(String, String, String)>,
    pub rules: Vec<RuleName>,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub last_reload_error: Option<String>,
    /// Per-rule history from generations whose counters are gone (see `RuleTotal`).
    #[serde(default)]
    pub totals: Vec<RuleTotal>,
}

impl Record {
    /// What `rule` counted in earlier generations.
    pub fn total(&self, rule: &RuleName) -> (u64, u64) {
        self.totals
            .iter()
            .find(|t| t.kind == rule.kind && t.identity == rule.identity)
            .map_or((0, 0), |t| (t.packets, t.bytes))
    }

    /// Adds what `rule` counted before its counters were deleted.
    pub fn fold(&mut self, rule: &RuleName, packets: u64, bytes: u64) {
        match self
            .totals
            .iter_mut()
            .find(|t| t.kind == rule.kind && t.identity == rule.identity)
        {
            Some(t) => {
                t.packets += packets;
                t.bytes += bytes;
            }
            None => self.totals.push(RuleTotal {
                kind: rule.kind.clone(),
                identity: rule.identity.clone(),
                packets,
                bytes,
            }),
        }
    }
}

/// Rule identities made unique within the policy: a repeat (two accessible blocks with the same CIDR)
/// gets ` #2`, ` #3`, ... in file order, so totals and diffs never merge two rules.
pub fn unique_identities(c: &Compiled) -> Vec<(String, String)> {
    let mut seen = std::collections::HashMap::<(String, String), u32>::new();
    crate::datapath::state::identities(c)
        .into_iter()
        .map(|(k, id)| {
            let kind = format!("{k:?}").to_lowercase();
            let n = seen.entry((kind.clone(), id.clone())).or_insert(0);
            *n += 1;
            let id = if *n == 1 { id } else { format!("{id} #{n}") };
            (kind, id)
        })
        .collect()
}

pub fn rule_names(c: &Compiled) -> Vec<RuleName> {
    c.rules
        .iter()
        .zip(unique_identities(c))
        .map(|(r, (_, identity))| RuleName {
            id: r.id,
            kind: format!("{:?}", r.kind).to_lowercase(),
            name: r.name.clone(),
            identity,
        })
        .collect()
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Writes the record atomically (readers see the old or the new one, never half).
pub fn write(r: &Record) -> std::io::Result<()> {
    let body = serde_json::to_vec_pretty(r).map_err(std::io::Error::other)?;
    write_atomic(&path(&r.instance), &body)
}

pub fn read(instance: &str) -> std::io::Result<Option<Record>> {
    match std::fs::read(path(instance)) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// An exclusive `flock` on /run/vpcgate/<instance>.lock, held while the returned file is open (the
/// kernel drops it when the process dies, however it dies). `run` holds it for its lifetime, `teardown`
/// while it removes pins: neither may work under the other. The directory must be ours and private and
/// the lock file is opened without following symlinks, so nobody else can hold it to keep the agent out.
pub fn lock_instance(instance: &str) -> Result<std::fs::File, String> {
    lock(
        instance,
        "lock",
        "a vpcgate agent runs instance {instance} (it holds {path}): stop it first",
    )
}

/// An exclusive `flock` on /run/vpcgate/<instance>.<ext> (see `lock_instance`); `busy` is the message
/// when someone holds it (`{instance}` and `{path}` filled in).
pub fn lock(instance: &str, ext: &str, busy: &str) -> Result<std::fs::File, String> {
    use std::os::{
        fd::AsRawFd,
        unix::fs::{DirBuilderExt, OpenOptionsExt},
    };
    crate::datapath::pin::check_instance(instance).map_err(|e| e.to_string())?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(RUN_DIR)
        .map_err(|e| format!("create {RUN_DIR}: {e}"))?;
    crate::datapath::pin::private_dir(Path::new(RUN_DIR)).map_err(|e| format!("{RUN_DIR}: {e}"))?;
    let path = Path::new(RUN_DIR).join(format!("{instance}.{ext}"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            busy.replace("{instance}", &format!("{instance:?}"))
                .replace("{path}", &path.display().to_string())
        } else {
            format!("flock {}: {e}", path.display())
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_identities_are_numbered() {
        let mut text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/policy.toml"
        ))
        .unwrap();
        text.push_str(
            "\n[[accessible]]\ncidr = \"10.1.0.0/16\"\nports = [\"22\"]\nprotocols = [\"tcp\"]\n",
        );
        let c = crate::policy::check_text("p.toml", &text)
            .compiled
            .expect("valid");
        let ids = unique_identities(&c);
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len(), "{ids:?}");
        assert!(ids.iter().any(|(_, i)| i.ends_with(" #2")), "{ids:?}");
    }
}
