//! A writer for the "newc" cpio format, the one the kernel unpacks as an
//! initramfs. Written here rather than by the `cpio` tool so that device
//! nodes (`/dev/console`) can go into the archive without root.
//!
//! Format: each entry is a 110-byte ASCII header (`070701` and 13 eight-digit
//! hex fields), the NUL-terminated name padded to 4 bytes, then the data
//! padded to 4 bytes; the archive ends with an entry named `TRAILER!!!`.

use std::io::{self, Write};

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";

pub(crate) const S_IFDIR: u32 = 0o040000;
pub(crate) const S_IFREG: u32 = 0o100000;
pub(crate) const S_IFCHR: u32 = 0o020000;

/// Streams entries into `W`. All entries are owned by root with mtime 0 so
/// that the same inputs always give the same bytes (and the same cache key).
pub(crate) struct CpioWriter<W: Write> {
    w: W,
    next_ino: u32,
    offset: u64,
}

struct Header<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
}

impl<W: Write> CpioWriter<W> {
    pub fn new(w: W) -> CpioWriter<W> {
        // Inode 0 is avoided: some unpackers treat it as "no inode".
        CpioWriter {
            w,
            next_ino: 1,
            offset: 0,
        }
    }

    fn header(&mut self, h: Header<'_>) -> io::Result<()> {
        if h.name.is_empty() || h.name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio entry name {:?}", h.name),
            ));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let namesize = h.name.len() as u32 + 1;
        let fields = [
            ino, h.mode, 0, 0, h.nlink, 0, h.size, 0, 0, h.rdev.0, h.rdev.1, namesize, 0,
        ];
        let mut buf = Vec::with_capacity(110 + h.name.len() + 4);
        buf.extend_from_slice(MAGIC);
        for f in fields {
            buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        buf.extend_from_slice(h.name.as_bytes());
        buf.push(0);
        self.w.write_all(&buf)?;
        self.offset += buf.len() as u64;
        self.pad()
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (4 - (self.offset % 4) as usize) % 4;
        self.w.write_all(&[0u8; 3][..rem])?;
        self.offset += rem as u64;
        Ok(())
    }

    fn data(&mut self, data: &[u8]) -> io::Result<()> {
        self.w.write_all(data)?;
        self.offset += data.len() as u64;
        self.pad()
    }

    fn size_of(data: &[u8]) -> io::Result<u32> {
        u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "cpio newc entries are limited to 4 GiB",
            )
        })
    }

    /// A directory; `mode` holds the permission bits only.
    pub fn dir(&mut self, name: &str, mode: u32) -> io::Result<()> {
        self.header(Header {
            name,
            mode: S_IFDIR | (mode & 0o7777),
            nlink: 2,
            size: 0,
            rdev: (0, 0),
        })
    }

    /// A regular file with the given content and permission bits.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let size = Self::size_of(data)?;
        self.header(Header {
            name,
            mode: S_IFREG | (mode & 0o7777),
            nlink: 1,
            size,
            rdev: (0, 0),
        })?;
        self.data(data)
    }

    /// A character device node.
    pub fn char_dev(&mut self, name: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.header(Header {
            name,
            mode: S_IFCHR | (mode & 0o7777),
            nlink: 1,
            size: 0,
            rdev: (major, minor),
        })
    }

    /// Write the trailer and hand back the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.header(Header {
            name: TRAILER,
            mode: 0,
            nlink: 1,
            size: 0,
            rdev: (0, 0),
        })?;
        self.w.flush()?;
        Ok(self.w)
    }
}

/// One parsed entry (tests and self-checks).
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub name: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

/// Parse a newc archive up to its trailer.
#[cfg(test)]
pub(crate) fn parse(mut buf: &[u8]) -> Result<Vec<Entry>, String> {
    fn field(h: &[u8], i: usize) -> Result<u32, String> {
        let s = std::str::from_utf8(&h[6 + i * 8..6 + (i + 1) * 8]).map_err(|e| e.to_string())?;
        u32::from_str_radix(s, 16).map_err(|e| format!("field {i}: {e}"))
    }
    let pad4 = |n: usize| (n + 3) & !3;
    let mut out = Vec::new();
    loop {
        if buf.len() < 110 || &buf[..6] != MAGIC {
            return Err("bad header".into());
        }
        let h = &buf[..110];
        let (mode, uid, gid, size) = (
            field(h, 1)?,
            field(h, 2)?,
            field(h, 3)?,
            field(h, 6)? as usize,
        );
        let rdev = (field(h, 9)?, field(h, 10)?);
        let namesize = field(h, 11)? as usize;
        let name_end = 110 + namesize;
        if buf.len() < name_end {
            return Err("truncated name".into());
        }
        let name = String::from_utf8(buf[110..name_end - 1].to_vec()).map_err(|e| e.to_string())?;
        let data_start = pad4(name_end);
        let data_end = data_start + size;
        if buf.len() < data_end {
            return Err(format!("truncated data of {name}"));
        }
        let data = buf[data_start..data_end].to_vec();
        buf = &buf[pad4(data_end).min(buf.len())..];
        if name == TRAILER {
            return Ok(out);
        }
        out.push(Entry {
            name,
            mode,
            uid,
            gid,
            rdev,
            data,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("dev", 0o755).expect("dir");
        w.char_dev("dev/console", 0o600, 5, 1).expect("dev");
        w.file("init", 0o755, b"#!/bin/sh\necho hi\n")
            .expect("file");
        w.file("empty", 0o644, b"").expect("file");
        w.finish().expect("finish")
    }

    #[test]
    fn round_trips_through_own_parser() {
        let bytes = sample();
        assert_eq!(bytes.len() % 4, 0);
        let e = parse(&bytes).expect("parse");
        let names: Vec<_> = e.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "empty"]);
        assert_eq!(e[0].mode, S_IFDIR | 0o755);
        assert_eq!((e[1].mode, e[1].rdev), (S_IFCHR | 0o600, (5, 1)));
        assert_eq!(e[2].mode, S_IFREG | 0o755);
        assert_eq!(e[2].data, b"#!/bin/sh\necho hi\n");
        assert_eq!((e[2].uid, e[2].gid), (0, 0));
        assert!(e[3].data.is_empty());
    }

    #[test]
    fn same_input_same_bytes() {
        assert_eq!(sample(), sample());
    }

    #[test]
    fn rejects_bad_names() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("a\0b", 0o644, b"").is_err());
        assert!(w.dir("", 0o755).is_err());
    }

    /// The OS's own cpio reads what we write (when installed).
    #[test]
    fn os_cpio_lists_it() {
        let Some(cpio) = crate::assets::tool::Tool {
            name: "cpio",
            package: "cpio",
        }
        .find() else {
            eprintln!("cpio not installed; skipped");
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.cpio");
        std::fs::write(&path, sample()).expect("write");
        let out = std::process::Command::new(cpio)
            .args(["-itv", "--quiet", "-F"])
            .arg(&path)
            .env("LC_ALL", "C")
            .output()
            .expect("run cpio");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 4, "{listing}");
        assert!(
            lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" dev"),
            "{listing}"
        );
        assert!(
            lines[1].starts_with("crw-------")
                && lines[1].contains("5,")
                && lines[1].ends_with(" dev/console")
        );
        assert!(
            lines[2].starts_with("-rwxr-xr-x")
                && lines[2].contains(" 18 ")
                && lines[2].ends_with(" init")
        );
        assert!(
            lines[3].starts_with("-rw-r--r--") && lines[3].ends_with(" empty"),
            "{listing}"
        );
    }
}
