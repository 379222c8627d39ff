//! Pinned state: what keeps enforcement in the kernel when the agent exits, crashes or is upgraded.
//!
//! Layout, under bpffs (which holds only pinned objects and directories, no regular files):
//!
//! ```text
//! /sys/fs/bpf/vpcgate/<instance>/<build>/maps/<MAP>        every map of the object
//! /sys/fs/bpf/vpcgate/<instance>/<build>/progs/<program>   the three programs
//! /sys/fs/bpf/vpcgate/<instance>/<build>/links/<program>@<interface>
//!                                                           a tcx or XDP link (unpinning it detaches)
//! /sys/fs/bpf/vpcgate/<instance>/<build>/links/clsact@<interface>
//!                                                           on kernels without tcx: the TC program pinned
//!                                                           again, marking a cls_bpf filter to remove
//! ```
//!
//! `<build>` names the kernel object (a hash of its bytes): a restarted agent of the same build adopts
//! what it finds (same program ids, nothing detached); another build's state is refused, never mixed
//! with ours. A first start builds everything in `staging-<pid>` and renames it into place before
//! anything is attached, so an adopting agent only ever sees complete sets, and a staging directory
//! left by a crash has nothing attached and is removed.

use std::{
    collections::BTreeSet,
    ffi::CString,
    fs, io,
    path::{Path, PathBuf},
};

use object::{Object, ObjectSection, ObjectSymbol};

use super::DatapathError;

pub const BPFFS: &str = "/sys/fs/bpf";
pub const ROOT: &str = "/sys/fs/bpf/vpcgate";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// A cls_bpf filter handle of ours (with priority 1), so a filter can be found again and removed.
pub const CLSACT_HANDLE: u32 = 0x7667;

/// The name of the object's build: `b` and 16 hex digits of its FNV-1a 64 hash.
pub fn build_id(object: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in object {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("b{h:016x}")
}

/// The maps an object defines: the symbols of its `maps` section.
pub fn map_names(object: &[u8]) -> Result<BTreeSet<String>, DatapathError> {
    let bad = |e: object::Error| DatapathError::Pin {
        path: PathBuf::from("<kernel object>"),
        what: "read the object's map names",
        source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
    };
    let file = object::File::parse(object).map_err(bad)?;
    let Some(section) = file.section_by_name("maps") else {
        return Ok(BTreeSet::new());
    };
    Ok(file
        .symbols()
        .filter(|s| s.section_index() == Some(section.index()))
        .filter_map(|s| s.name().ok().map(str::to_owned))
        .filter(|n| !n.is_empty())
        .collect())
}

/// An instance name is one bpffs path component: letters, digits, `_`, `-` (bpffs refuses dots, which
/// it reserves for the kernel's own files).
pub fn check_instance(instance: &str) -> Result<(), DatapathError> {
    let ok = !instance.is_empty()
        && instance.len() <= 64
        && instance
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(DatapathError::InstanceName(instance.to_owned()))
    }
}

pub fn instance_dir(instance: &str) -> PathBuf {
    Path::new(ROOT).join(instance)
}

/// Whether bpffs is mounted at /sys/fs/bpf.
pub fn bpffs_mounted() -> bool {
    let path = c"/sys/fs/bpf";
    // SAFETY: statfs fills the zeroed struct for a NUL-terminated path.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Mounts bpffs at /sys/fs/bpf when it is not there (systemd mounts it; a bare container may not).
/// Returns whether it mounted.
pub fn ensure_bpffs() -> Result<bool, DatapathError> {
    if bpffs_mounted() {
        return Ok(false);
    }
    let err = |source| DatapathError::Pin {
        path: BPFFS.into(),
        what: "mount bpffs",
        source,
    };
    // A bpffs mounted in a private mount namespace (a container without the host's /sys/fs/bpf, `ip
    // netns exec`) dies with it, and every pin and link with it: enforcement would end with the agent.
    let ns = |p: &str| std::fs::read_link(p).ok();
    if ns("/proc/self/ns/mnt") != ns("/proc/1/ns/mnt") {
        return Err(err(io::Error::other(
            "bpffs is not mounted at /sys/fs/bpf and this is not the host's mount namespace: a bpffs \
             mounted here would vanish with the agent and take enforcement with it; mount the host's \
             /sys/fs/bpf into the container (Kubernetes: a hostPath volume)",
        )));
    }
    let (src, target, fstype, opts) = (c"bpf", c"/sys/fs/bpf", c"bpf", c"mode=0700");
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            opts.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(true)
}

/// One build's directory of pins.
#[derive(Clone, Debug)]
pub struct Pins {
    pub dir: PathBuf,
}

impl Pins {
    pub fn maps(&self) -> PathBuf {
        self.dir.join("maps")
    }
    pub fn progs(&self) -> PathBuf {
        self.dir.join("progs")
    }
    pub fn links(&self) -> PathBuf {
        self.dir.join("links")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }
    pub fn prog(&self, name: &str) -> PathBuf {
        self.progs().join(name)
    }
    /// A link of `program` on `interface` (or the clsact marker when `program` is `clsact`). bpffs
    /// refuses dots in names, and interface names may have them (`eth0.100`): written `%2E`.
    pub fn link(&self, program: &str, interface: &str) -> PathBuf {
        self.links()
            .join(format!("{program}@{}", escape(interface)))
    }
}

/// An interface name as a bpffs name: `%` and `.` (which bpffs refuses) written `%25` and `%2E`.
pub fn escape(interface: &str) -> String {
    interface.replace('%', "%25").replace('.', "%2E")
}

pub fn unescape(name: &str) -> String {
    name.replace("%2E", ".").replace("%25", "%")
}

/// What an instance's directory holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing pinned for this build (maybe a staging directory left by a crash: removed).
    Nothing,
    /// A complete set pinned by this build.
    Ours,
    /// Pins of other builds (their directory names).
    Others(Vec<String>),
}

/// Looks at `instance`'s directory for `build`. With `clean`, removes staging directories a crashed
/// first start left (nothing is ever attached from them); only the agent holding the instance lock may.
pub fn survey(instance: &str, build: &str, clean: bool) -> Result<Found, DatapathError> {
    let dir = instance_dir(instance);
    if dir.exists() {
        trusted_dir(&dir)?;
    }
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::Nothing),
        Err(source) => {
            return Err(DatapathError::Pin {
                path: dir,
                what: "list the instance's pins",
                source,
            });
        }
    };
    let mut ours = false;
    let mut others = vec![];
    for entry in entries {
        let entry = entry.map_err(|source| DatapathError::Pin {
            path: dir.clone(),
            what: "list the instance's pins",
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("staging-") {
            if clean {
                remove_tree(&entry.path())?;
            }
        } else if name == build {
            ours = true;
        } else {
            others.push(name);
        }
    }
    Ok(if !others.is_empty() {
        others.sort();
        Found::Others(others)
    } else if ours {
        Found::Ours
    } else {
        Found::Nothing
    })
}

/// Creates `dir` and its parents under bpffs 0700, and checks that every one from /sys/fs/bpf/vpcgate
/// down is a real directory (no symlink) owned by us and writable by nobody else: a bpffs root is
/// often world-writable (mode 1777), and a directory someone else planted could hold pins we would
/// adopt or links we would lose.
pub fn trusted_dir(dir: &Path) -> Result<(), DatapathError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| DatapathError::Pin {
            path: dir.to_owned(),
            what: "create the pin directory",
            source,
        })?;
    let mut p = dir.to_owned();
    loop {
        private_dir(&p).map_err(|source| DatapathError::Pin {
            path: p.clone(),
            what: "trust the pin directory",
            source,
        })?;
        if p == Path::new(ROOT) || !p.pop() || !p.starts_with(ROOT) {
            break;
        }
    }
    Ok(())
}

/// `dir` is a real directory (no symlink) owned by us and writable by nobody else: what vpcgate keeps
/// state in (pins, /run/vpcgate) must not be planted or swapped by another user.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let md = fs::symlink_metadata(dir)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !md.file_type().is_dir() || md.uid() != me || md.mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "not a directory owned by uid {me} and writable only by it (uid {}, mode {:o}): \
                 remove it (`vpcgate teardown`) or fix its owner and mode",
                md.uid(),
                md.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// A fresh staging directory for a first start (maps/ and progs/ created).
pub fn staging(instance: &str) -> Result<Pins, DatapathError> {
    let dir = instance_dir(instance).join(format!("staging-{}", std::process::id()));
    if dir.exists() {
        remove_tree(&dir)?;
    }
    let pins = Pins { dir };
    for d in [pins.maps(), pins.progs(), pins.links()] {
        trusted_dir(&d)?;
    }
    Ok(pins)
}

/// Moves a complete staging directory into place as `build`'s.
pub fn commit(staging: &Pins, instance: &str, build: &str) -> Result<Pins, DatapathError> {
    let dir = instance_dir(instance).join(build);
    fs::rename(&staging.dir, &dir).map_err(|source| DatapathError::Pin {
        path: dir.clone(),
        what: "move the staged pins into place",
        source,
    })?;
    Ok(Pins { dir })
}

/// Removes a directory of pins. Unpinning a link whose only reference is the pin detaches it.
pub fn remove_tree(dir: &Path) -> Result<(), DatapathError> {
    fs::remove_dir_all(dir).map_err(|source| DatapathError::Pin {
        path: dir.to_owned(),
        what: "remove pins",
        source,
    })
}

/// What the kernel says of a pinned tcx or XDP link (its fdinfo): the interface it is attached to (0
/// when it outlived its interface: defunct, it enforces nothing) and the program it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub ifindex: u32,
    pub prog_id: u32,
}

pub fn pinned_link_state(path: &Path) -> Result<LinkState, DatapathError> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let err = |what, source| DatapathError::Pin {
        path: path.to_owned(),
        what,
        source,
    };
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| {
        err(
            "open the pinned link",
            io::Error::new(io::ErrorKind::InvalidInput, e),
        )
    })?;
    /// The `BPF_OBJ_GET` part of `union bpf_attr`.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let attr = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    // SAFETY: BPF_OBJ_GET reads a NUL-terminated path that outlives the call from a valid attr prefix.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGet,
            std::mem::size_of::<ObjGet>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(err("open the pinned link", io::Error::last_os_error()));
    }
    // SAFETY: BPF_OBJ_GET returned a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .map_err(|e| err("read the link's fdinfo", e))?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse::<u32>()))
            .and_then(Result::ok)
    };
    match (field("ifindex:"), field("prog_id:")) {
        (Some(ifindex), Some(prog_id)) => Ok(LinkState { ifindex, prog_id }),
        _ => Err(err(
            "read the link's fdinfo",
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no ifindex/prog_id in {info:?}"),
            ),
        )),
    }
}

/// What `teardown` removed.
#[derive(Debug, Default, serde::Serialize)]
pub struct Teardown {
    /// Links unpinned (each detached), as `program@interface`.
    pub links: Vec<String>,
    /// cls_bpf filters removed, by interface.
    pub clsact: Vec<String>,
    /// Build directories removed.
    pub builds: Vec<String>,
}

/// Removes everything `instance` pinned, of any build: links first (enforcement ends there), clsact
/// filters (in the caller's network namespace), then programs and maps.
pub fn teardown(instance: &str) -> Result<Teardown, DatapathError> {
    check_instance(instance)?;
    let dir = instance_dir(instance);
    let mut report = Teardown::default();
    let builds = match fs::read_dir(&dir) {
        Ok(e) => e
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect::<Vec<_>>(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(DatapathError::NoInstance(instance.to_owned()));
        }
        Err(source) => {
            return Err(DatapathError::Pin {
                path: dir,
                what: "list the instance's pins",
                source,
            });
        }
    };
    for build in builds {
        let links = build.join("links");
        for entry in fs::read_dir(&links).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(interface) = name.strip_prefix("clsact@") {
                let interface = unescape(interface);
                detach_clsact(&interface)?;
                report.clsact.push(interface);
            } else {
                report.links.push(name);
            }
            fs::remove_file(entry.path()).map_err(|source| DatapathError::Pin {
                path: entry.path(),
                what: "unpin",
                source,
            })?;
        }
        remove_tree(&build)?;
        report.builds.push(
            build
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        );
    }
    fs::remove_dir(&dir).map_err(|source| DatapathError::Pin {
        path: dir,
        what: "remove the instance directory",
        source,
    })?;
    Ok(report)
}

/// Removes our cls_bpf filter (priority 1, our handle) from `interface`'s egress; gone already is fine.
pub fn detach_clsact(interface: &str) -> Result<(), DatapathError> {
    use aya::programs::{
        Link, TcAttachType,
        tc::{SchedClassifierLink, TcError},
    };
    if CString::new(interface).is_err() || super::ifindex(interface).is_err() {
        return Ok(()); // the interface is gone, and its qdisc and filters with it
    }
    let link = SchedClassifierLink::attached(
        interface,
        TcAttachType::Egress,
        1,
        CLSACT_HANDLE.into(),
        None,
    )
    .map_err(|e| DatapathError::Pin {
        path: interface.into(),
        what: "find the cls_bpf filter",
        source: io::Error::other(e.to_string()),
    })?;
    match link.detach() {
        Ok(()) => Ok(()),
        Err(aya::programs::ProgramError::TcError(TcError::NetlinkError(e)))
            if e.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(DatapathError::Pin {
            path: interface.into(),
            what: "remove the cls_bpf filter",
            source: io::Error::other(e.to_string()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_names_every_map_the_datapath_uses() {
        let names = map_names(super::super::EBPF_OBJECT).unwrap();
        for n in [
            vpcgate_common::datapath::names::ACTIVE,
            vpcgate_common::datapath::names::PORTS,
            vpcgate_common::datapath::names::EVENTS,
            vpcgate_common::datapath::names::SCRATCH,
        ] {
            assert!(names.contains(n), "{n} missing from {names:?}");
        }
        assert!(names.len() >= 20, "{names:?}");
    }

    #[test]
    fn interface_names_escape_reversibly() {
        for name in ["eth0", "eth0.100", "a%2Eb", "a.b", "%", "x%25.y"] {
            let e = escape(name);
            assert!(!e.contains('.'), "{e}");
            assert_eq!(unescape(&e), name);
        }
        assert_ne!(escape("a%2Eb"), escape("a.b"));
    }

    #[test]
    fn build_ids_differ_with_any_byte() {
        let a = build_id(b"object");
        assert_eq!(a, build_id(b"object"));
        assert_ne!(a, build_id(b"objecu"));
        assert_eq!(a.len(), 17);
    }

    #[test]
    fn instance_names_are_one_safe_path_component() {
        for ok in ["gw-hz-1", "a", "x_y-z"] {
            assert!(check_instance(ok).is_ok(), "{ok}");
        }
        for bad in ["", "..", ".hidden", "a.b", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_instance(bad).is_err(), "{bad:?}");
        }
    }
}
