//! `POLICY_EPOCH` through a shared mapping of the map's value: one aligned 8-byte load or store, never a
//! torn value.
//!
//! The programs read the epoch with one 8-byte load and trust a memoized decision whose epoch equals it
//! (`VerdictMemo`). Written through `bpf_map_update_elem`, the kernel copies the value in with
//! `memcpy`, which promises no single store: a read racing it could see bytes of both epochs, a value
//! never written, and one that may equal an earlier epoch whose records are still cached. The map is
//! created `BPF_F_MMAPABLE`, so the agent writes the value in place, with one atomic store the programs'
//! load sees whole or not at all.
//!
//! The page is mapped once, when the datapath is loaded or adopted (`epoch_word`), so that writing an
//! epoch cannot fail half-way through an apply. Nothing else may write the map: an update through the
//! syscall (`bpftool map update` too) would be a `memcpy` again.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{Map, MapData, MapError};
use vpcgate_common::datapath::names;

use super::DatapathError;

/// Element 0 of `POLICY_EPOCH`, mapped read-write; unmapped on drop.
pub(crate) struct EpochWord {
    base: NonNull<libc::c_void>,
    len: usize,
}

impl EpochWord {
    /// Maps `map`'s value area (its first page: element 0 is at offset 0, page-aligned).
    fn map(map: &MapData) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let len = usize::try_from(page)
            .ok()
            .filter(|&p| p >= std::mem::size_of::<u64>())
            .ok_or_else(|| io::Error::other(format!("sysconf(_SC_PAGESIZE) returned {page}")))?;
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a new shared mapping of `len` bytes at an address the kernel picks; nothing else is
        // touched. A map not created mmapable is refused (EINVAL), never mapped.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base =
            NonNull::new(p).ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(Self { base, len })
    }

    fn word(&self) -> &AtomicU64 {
        // SAFETY: the mapping is page-aligned (so 8-byte aligned), at least 8 bytes long and lives as long
        // as `self`; the kernel's programs only read it, with aligned 8-byte loads.
        unsafe { &*self.base.as_ptr().cast::<AtomicU64>() }
    }

    pub(crate) fn load(&self) -> u64 {
        self.word().load(Ordering::SeqCst)
    }

    pub(crate) fn store(&self, epoch: u64) {
        self.word().store(epoch, Ordering::SeqCst)
    }
}

impl Drop for EpochWord {
    fn drop(&mut self) {
        // SAFETY: the mapping `map` made, not used after this.
        unsafe { libc::munmap(self.base.as_ptr(), self.len) };
    }
}

// SAFETY (Send, Sync): the mapping belongs to this value alone, and the word is only reached through
// atomic operations.
unsafe impl Send for EpochWord {}
unsafe impl Sync for EpochWord {}

fn map_err(source: MapError) -> DatapathError {
    DatapathError::Map {
        map: names::POLICY_EPOCH,
        source,
    }
}

/// `POLICY_EPOCH` of `ebpf`, and its flags as the kernel reports them.
pub(crate) fn epoch_map(ebpf: &aya::Ebpf) -> Result<(&MapData, u32), DatapathError> {
    let name = names::POLICY_EPOCH;
    let m = ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
    // The typed view checks the map's type and value size, as every other access does.
    aya::maps::Array::<_, u64>::try_from(m).map_err(map_err)?;
    let Map::Array(d) = m else {
        // Not reached: the view accepts arrays only.
        return Err(map_err(MapError::InvalidMapType { map_type: 0 }));
    };
    Ok((d, d.info().map_err(map_err)?.map_flags()))
}

/// Whether `flags` (a map's) include `BPF_F_MMAPABLE`.
pub(crate) fn mmapable(flags: u32) -> bool {
    flags & aya_obj::generated::BPF_F_MMAPABLE != 0
}

/// `POLICY_EPOCH` of `ebpf`, mapped: refused, before any map is written, when the map was not created
/// mmapable.
pub(crate) fn epoch_word(ebpf: &aya::Ebpf) -> Result<EpochWord, DatapathError> {
    let mmap_err = |io_error| {
        map_err(MapError::SyscallError(aya::sys::SyscallError {
            call: "mmap",
            io_error,
        }))
    };
    let (d, flags) = epoch_map(ebpf)?;
    if !mmapable(flags) {
        return Err(mmap_err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "created without BPF_F_MMAPABLE (flags {flags:#x}), so no epoch can be written in one store; these maps are not this build's: `vpcgate teardown` and start again"
            ),
        )));
    }
    EpochWord::map(d).map_err(mmap_err)
}
