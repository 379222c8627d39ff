//! Waiting out packets in flight with a kernel guarantee instead of a sleep.
//!
//! BPF programs run to completion inside an RCU read-side critical section (TC and XDP run with
//! preemption or bottom halves disabled, which RCU treats as a read-side section since Linux 4.20). An
//! update of a map-in-map slot from userspace ends in `maybe_wait_bpf_programs()`, which calls
//! `synchronize_rcu()` for `BPF_MAP_TYPE_ARRAY_OF_MAPS` and `HASH_OF_MAPS`: the syscall returns only after
//! every program run that started before it has finished. `Barrier::wait` is that update, on a private
//! one-slot array of maps no program uses. aya 0.14 has no API to create a map-in-map on its own, so this
//! speaks bpf(2) directly.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use super::DatapathError;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// The `BPF_MAP_CREATE` part of `union bpf_attr` (fields up to `inner_map_fd`, then the map name; the
/// kernel zero-extends a shorter attr).
#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// The `BPF_MAP_*_ELEM` part of `union bpf_attr`.
#[repr(C)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid `#[repr(C)]` prefix of `union bpf_attr` for `cmd`, readable for
    // `size_of::<T>()` bytes; pointers inside it are valid for the duration of the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn create(attr: &MapCreate) -> io::Result<OwnedFd> {
    let fd = bpf(BPF_MAP_CREATE, attr)?;
    // SAFETY: BPF_MAP_CREATE returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn name(s: &str) -> [u8; 16] {
    let mut out = [0; 16];
    out[..s.len()].copy_from_slice(s.as_bytes());
    out
}

/// A one-slot `BPF_MAP_TYPE_ARRAY_OF_MAPS` and the array it holds; both file descriptors close on drop.
#[derive(Debug)]
pub(crate) struct Barrier {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl Barrier {
    pub(crate) fn new() -> Result<Self, DatapathError> {
        let err = |what| move |source| DatapathError::Barrier { what, source };
        let inner = create(&MapCreate {
            map_type: BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            map_name: name("vpcgate_bar_in"),
            ..MapCreate::default()
        })
        .map_err(err("create the barrier's inner array map"))?;
        let outer = create(&MapCreate {
            map_type: BPF_MAP_TYPE_ARRAY_OF_MAPS,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            inner_map_fd: inner.as_raw_fd() as u32,
            map_name: name("vpcgate_barrier"),
            ..MapCreate::default()
        })
        .map_err(err("create the barrier's array-of-maps"))?;
        Ok(Self { outer, inner })
    }

    /// Returns once every BPF program run that started before the call has finished.
    pub(crate) fn wait(&self) -> Result<(), DatapathError> {
        let key: u32 = 0;
        let value: u32 = self.inner.as_raw_fd() as u32;
        let attr = MapElem {
            map_fd: self.outer.as_raw_fd() as u32,
            _pad: 0,
            key: &key as *const u32 as u64,
            value: &value as *const u32 as u64,
            flags: 0, // BPF_ANY
        };
        bpf(BPF_MAP_UPDATE_ELEM, &attr)
            .map(drop)
            .map_err(|source| DatapathError::Barrier {
                what: "update the barrier's array-of-maps slot (synchronize_rcu)",
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs CAP_BPF: skipped (with the reason) when creating BPF maps is not permitted.
    #[test]
    fn the_barrier_map_is_created_and_waits() {
        let b = match Barrier::new() {
            Ok(b) => b,
            Err(DatapathError::Barrier { source, .. })
                if source.raw_os_error() == Some(libc::EPERM) =>
            {
                eprintln!("skipped: creating BPF maps needs CAP_BPF ({source})");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        for _ in 0..3 {
            b.wait().unwrap_or_else(|e| panic!("{e}"));
        }
        assert_ne!(b.outer.as_raw_fd(), b.inner.as_raw_fd());
    }
}
