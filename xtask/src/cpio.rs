//! A writer for the "newc" cpio format, the one the kernel unpacks as an initramfs
//! (Documentation/driver-api/early-userspace/buffer-format.rst). The kernel also takes the archive
//! uncompressed, so building one needs neither `cpio` nor `gzip` on the host.

use std::{collections::BTreeSet, io::Write};

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// An archive being written: every parent directory is added before the entries inside it.
pub struct Archive<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    dirs: BTreeSet<String>,
    names: BTreeSet<String>,
}

impl<W: Write> Archive<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
            dirs: BTreeSet::new(),
            names: BTreeSet::new(),
        }
    }

    /// A directory (and its parents), mode 0755. Adding one twice is a no-op.
    pub fn dir(&mut self, path: &str) -> std::io::Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.dirs.insert(path.to_owned());
        self.entry(path, S_IFDIR | 0o755, 0, &[])
    }

    /// A regular file with `mode`'s permission bits.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> std::io::Result<()> {
        let path = self.parent_of(path)?;
        self.entry(&path, S_IFREG | (mode & 0o7777), 0, data)
    }

    /// A symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> std::io::Result<()> {
        let path = self.parent_of(path)?;
        self.entry(&path, S_IFLNK | 0o777, 0, target.as_bytes())
    }

    /// A character device node (e.g. /dev/console, which the kernel opens for init before devtmpfs is mounted).
    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) -> std::io::Result<()> {
        let path = self.parent_of(path)?;
        self.entry(&path, S_IFCHR | 0o600, (major << 8) | minor, &[])
    }

    /// Whether an entry with this path was added already.
    pub fn contains(&self, path: &str) -> bool {
        let path = path.trim_matches('/');
        self.names.contains(path) || self.dirs.contains(path)
    }

    /// Writes the trailer; returns the output and the archive's size in bytes.
    pub fn finish(mut self) -> std::io::Result<(W, u64)> {
        self.header("TRAILER!!!", 0, 0, 0, 0)?;
        self.out.flush()?;
        Ok((self.out, self.written))
    }

    fn parent_of(&mut self, path: &str) -> std::io::Result<String> {
        let path = path.trim_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        Ok(path.to_owned())
    }

    /// `rdev` packs major << 8 | minor (small numbers only, which is all an initramfs needs).
    fn entry(&mut self, path: &str, mode: u32, rdev: u32, data: &[u8]) -> std::io::Result<()> {
        if mode & S_IFDIR != S_IFDIR && !self.names.insert(path.to_owned()) {
            return Err(std::io::Error::other(format!(
                "initramfs: {path} added twice"
            )));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let size = u32::try_from(data.len())
            .map_err(|_| std::io::Error::other(format!("initramfs: {path} is over 4 GiB")))?;
        self.header(path, ino, mode, size, rdev)?;
        self.write(data)?;
        self.pad()
    }

    fn header(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        size: u32,
        rdev: u32,
    ) -> std::io::Result<()> {
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor,
        // namesize (with its NUL), check: each field 8 hex digits.
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            0,
            0,
            0,
            rdev >> 8,
            rdev & 0xff,
            name.len() + 1,
            0
        );
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        // The header plus name is padded to a multiple of 4, and so is the data.
        self.pad()
    }

    fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> std::io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0; 3][..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_parents_come_first() {
        let mut a = Archive::new(Vec::new());
        a.file("/bin/x", 0o755, b"hello").unwrap();
        a.symlink("bin/sh", "busybox").unwrap();
        let (out, size) = a.finish().unwrap();
        assert_eq!(out.len() as u64, size);
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        let names: Vec<&str> = ["bin\0", "bin/x\0", "bin/sh\0", "TRAILER!!!\0"]
            .into_iter()
            .collect();
        let mut at = 0;
        for n in names {
            let pos = text[at..].find(n).expect(n) + at;
            // Every name follows a 110-byte header that starts 4-aligned.
            assert_eq!((pos - 110) % 4, 0, "{n}");
            assert_eq!(&text[pos - 110..pos - 104], "070701");
            at = pos;
        }
        assert!(Archive::new(Vec::new()).file("a", 0o644, b"").is_ok());
    }

    #[test]
    fn a_file_added_twice_is_an_error() {
        let mut a = Archive::new(Vec::new());
        a.file("a/b", 0o644, b"1").unwrap();
        assert!(a.file("a/b", 0o644, b"2").is_err());
        a.dir("a").unwrap();
    }
}
