//! A writer for the "newc" cpio format (magic `070701`), the one format Linux unpacks
//! as an initramfs (Documentation/driver-api/early-userspace/buffer-format.rst), and
//! a reader used by the tests to check what the writer produced.
//!
//! Each entry is a 110-byte ASCII header (the magic and 13 fields of 8 hex digits:
//! ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
//! rdevminor, namesize, check), the name with its NUL, padding to a multiple of 4,
//! the data, padding to a multiple of 4. The archive ends with an entry named
//! `TRAILER!!!`. Names are relative (`bin/sh`), parents come before their children,
//! and every time stamp is 0, so the same inputs always give the same bytes.
//!
//! Not a general cpio tool: no hard links, no other formats, no CRC (`070702`).

/// File type bits of `st_mode` (`<sys/stat.h>`).
pub const S_IFDIR: u32 = 0o040_000;
/// See [`S_IFDIR`].
pub const S_IFREG: u32 = 0o100_000;
/// See [`S_IFDIR`].
pub const S_IFLNK: u32 = 0o120_000;
/// See [`S_IFDIR`].
pub const S_IFCHR: u32 = 0o020_000;
/// The mask of the file type bits.
#[cfg(test)]
pub const S_IFMT: u32 = 0o170_000;

const MAGIC: &[u8; 6] = b"070701";
#[cfg(test)]
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

/// A newc archive being built in memory (an initramfs is a few MB).
#[derive(Debug, Default)]
pub struct Writer {
    out: Vec<u8>,
    next_ino: u32,
}

impl Writer {
    /// An empty archive.
    pub fn new() -> Self {
        Self { out: Vec::new(), next_ino: 1 }
    }

    /// A directory with permissions `perm` (e.g. 0o755).
    pub fn dir(&mut self, name: &str, perm: u32) {
        self.entry(name, S_IFDIR | perm, 2, (0, 0), &[]);
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, S_IFREG | perm, 1, (0, 0), data);
    }

    /// A symbolic link to `target` (its data is the target path, without a NUL).
    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes());
    }

    /// A character device node `major:minor`, e.g. /dev/console 5:1.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | perm, 1, (major, minor), &[]);
    }

    /// Append the trailer and return the archive.
    pub fn finish(mut self) -> Vec<u8> {
        // The trailer has inode 0 and nlink 1, as GNU cpio writes it.
        self.header(TRAILER, 0, 0, 1, (0, 0), 0);
        self.out
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(name, ino, mode, nlink, rdev, data.len());
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn header(&mut self, name: &str, ino: u32, mode: u32, nlink: u32, rdev: (u32, u32), size: usize) {
        // The format has 32-bit sizes; an initramfs file is far below 4 GiB.
        let size = u32::try_from(size).unwrap_or(u32::MAX);
        let namesize = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
        let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0];
        self.out.extend_from_slice(MAGIC);
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
}

/// One entry read back from an archive.
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the archive.
    pub name: String,
    /// Inode number.
    pub ino: u32,
    /// `st_mode`: type and permission bits.
    pub mode: u32,
    /// Link count.
    pub nlink: u32,
    /// Modification time.
    pub mtime: u32,
    /// Device number of a device node.
    pub rdev: (u32, u32),
    /// Contents (a symlink's target).
    pub data: Vec<u8>,
}

/// Parse a newc archive up to its trailer, checking the magic, the hex fields and the
/// 4-byte alignment of every header and every data part.
#[cfg(test)]
pub fn read(bytes: &[u8]) -> Result<Vec<Entry>, String> {
    let mut at = 0usize;
    let mut entries = Vec::new();
    loop {
        if !at.is_multiple_of(4) {
            return Err(format!("header at offset {at} is not 4-byte aligned"));
        }
        let header = bytes.get(at..at + HEADER_LEN).ok_or_else(|| format!("archive ends inside a header at {at}"))?;
        if &header[..6] != MAGIC {
            return Err(format!("bad magic at offset {at}: {:?}", String::from_utf8_lossy(&header[..6])));
        }
        let mut fields = [0u32; 13];
        for (i, f) in fields.iter_mut().enumerate() {
            let hex = std::str::from_utf8(&header[6 + 8 * i..14 + 8 * i]).map_err(|e| format!("field {i}: {e}"))?;
            *f = u32::from_str_radix(hex, 16).map_err(|e| format!("field {i} at offset {at} ({hex:?}): {e}"))?;
        }
        let [ino, mode, _uid, _gid, nlink, mtime, size, _, _, rmaj, rmin, namesize, _check] = fields;
        let name_start = at + HEADER_LEN;
        let name_end = name_start + namesize as usize;
        let name = bytes.get(name_start..name_end).ok_or("archive ends inside a name")?;
        let name = name.strip_suffix(&[0]).ok_or_else(|| format!("name at offset {name_start} has no NUL"))?;
        let name = String::from_utf8(name.to_vec()).map_err(|e| format!("name at offset {name_start}: {e}"))?;
        let data_start = name_end.next_multiple_of(4);
        let data_end = data_start + size as usize;
        let data = bytes.get(data_start..data_end).ok_or_else(|| format!("{name}: archive ends inside its data"))?;
        at = data_end.next_multiple_of(4);
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(Entry { name, ino, mode, nlink, mtime, rdev: (rmaj, rmin), data: data.to_vec() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_entry_has_the_exact_newc_layout() {
        let mut w = Writer::new();
        w.file("init", 0o755, b"#!/bin/sh\n");
        let bytes = w.finish();
        // 110-byte header, "init\0" (5 bytes) padded to 116, 10 data bytes padded to 128.
        let header = std::str::from_utf8(&bytes[..110]).unwrap();
        assert_eq!(
            header,
            concat!(
                "070701", "00000001", "000081ed", "00000000", "00000000", "00000001", "00000000", "0000000a",
                "00000000", "00000000", "00000000", "00000000", "00000005", "00000000"
            )
        );
        assert_eq!(&bytes[110..116], b"init\0\0");
        assert_eq!(&bytes[116..126], b"#!/bin/sh\n");
        assert_eq!(&bytes[126..128], &[0, 0]);
        // Then the trailer: header, "TRAILER!!!\0" (11 bytes) padded to a multiple of 4.
        assert_eq!(&bytes[128..134], b"070701");
        assert_eq!(&bytes[128 + 110..128 + 121], b"TRAILER!!!\0");
        assert_eq!(bytes.len(), 128 + 124);
        assert!(bytes.len().is_multiple_of(4));
    }

    #[test]
    fn every_kind_of_entry_reads_back() {
        let mut w = Writer::new();
        w.dir("bin", 0o755);
        w.file("bin/busybox", 0o755, &[0x7f, b'E', b'L', b'F', 1, 2, 3]);
        w.symlink("bin/sh", "busybox");
        w.dir("dev", 0o755);
        w.char_dev("dev/console", 0o600, 5, 1);
        w.char_dev("dev/ttyS0", 0o660, 4, 64);
        let entries = read(&w.finish()).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["bin", "bin/busybox", "bin/sh", "dev", "dev/console", "dev/ttyS0"]);
        let by = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(by("bin").mode, S_IFDIR | 0o755);
        assert_eq!(by("bin").nlink, 2);
        assert_eq!(by("bin/busybox").mode & S_IFMT, S_IFREG);
        assert_eq!(by("bin/busybox").data, [0x7f, b'E', b'L', b'F', 1, 2, 3]);
        assert_eq!(by("bin/sh").mode, S_IFLNK | 0o777);
        assert_eq!(by("bin/sh").data, b"busybox");
        assert_eq!(by("dev/console").mode, S_IFCHR | 0o600);
        assert_eq!(by("dev/console").rdev, (5, 1));
        assert_eq!(by("dev/ttyS0").rdev, (4, 64));
        // Distinct inodes (the kernel links entries with equal ino and nlink > 1), no
        // time stamps.
        let mut inos: Vec<u32> = entries.iter().map(|e| e.ino).collect();
        inos.dedup();
        assert_eq!(inos.len(), entries.len());
        assert!(entries.iter().all(|e| e.mtime == 0));
    }

    #[test]
    fn data_of_every_length_stays_aligned() {
        for len in 0..9 {
            let mut w = Writer::new();
            let data: Vec<u8> = (0..len).map(|i| b'a' + i as u8).collect();
            w.file("f", 0o644, &data);
            w.file("name-of-other-length", 0o644, b"z");
            let entries = read(&w.finish()).unwrap();
            assert_eq!(entries[0].data, data, "length {len}");
            assert_eq!(entries[1].data, b"z", "after a file of length {len}");
        }
    }

    #[test]
    fn reader_rejects_damage() {
        let mut w = Writer::new();
        w.file("x", 0o644, b"data");
        let good = w.finish();
        assert!(read(&good[..good.len() - 8]).is_err(), "a truncated archive has no trailer");
        let mut bad = good.clone();
        bad[0] = b'1';
        assert!(read(&bad).unwrap_err().contains("bad magic"));
        let mut bad = good;
        bad[6 + 8 * 6] = b'g'; // filesize field
        assert!(read(&bad).unwrap_err().contains("field 6"));
    }

    /// When GNU cpio is installed, it lists what we wrote (a second opinion on the
    /// format; the layout tests above do not depend on it).
    #[test]
    fn gnu_cpio_lists_the_archive_when_installed() {
        let Ok(mut child) = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            return;
        };
        let mut w = Writer::new();
        w.dir("etc", 0o755);
        w.file("etc/hostname", 0o644, b"hv\n");
        w.symlink("sh", "etc/hostname");
        w.char_dev("null", 0o666, 1, 3);
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&w.finish()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "etc\netc/hostname\nsh\nnull\n");
    }
}
