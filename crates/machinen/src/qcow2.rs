//! Checking qcow2 disk layers that come from elsewhere (a bundle's
//! `rootdisk.qcow2`) before QEMU opens them.
//!
//! A qcow2 header can name host files: an external data file (the
//! `data_file` image option, stored as a header extension and an
//! incompatible-feature bit), a backing file, and a LUKS header. QEMU opens
//! what the header names with the VM's privileges, so a layer written by a
//! bundle's author could hand the guest any host file the user can read or
//! write, and the bundle's digests do not help: the author re-hashes.
//!
//! So a layer from a bundle is accepted only if its header names nothing
//! outside the file: [`inspect`] refuses external data files, encryption,
//! internal snapshots and features this code does not know, and
//! [`neutralize_backing`] blanks the backing-file name in the VM's private
//! copy (QEMU is given the backing chain explicitly, so the name would never
//! be used, but a layer naming no host path cannot be talked into one by a
//! later tool either). The format is in QEMU's `docs/interop/qcow2.txt`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
const V2_HEADER_LEN: u64 = 72;
/// The most header (fixed part plus extensions) we read: QEMU itself keeps
/// the header and its extensions within the first cluster.
const MAX_HEADER: u64 = 2 << 20;

// Incompatible feature bits.
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
// Autoclear bit: the external data file holds a valid raw image.
const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Why a layer is refused.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("{path} is not a qcow2 image: {detail}")]
    NotQcow2 { path: PathBuf, detail: String },
    #[error("{path} names a host file or feature a disk layer from elsewhere may not use: {what}")]
    Refused { path: PathBuf, what: String },
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What [`inspect`] found in an accepted header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Where the backing-file name sits in the file, when there is one.
    pub backing: Option<(u64, u32)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// Check the header at the start of `bytes` (the first bytes of the file;
/// at least the whole header and its extensions, or all of a shorter file).
pub fn parse(bytes: &[u8], path: &Path) -> Result<Header, Qcow2Error> {
    let not = |detail: String| Qcow2Error::NotQcow2 {
        path: path.to_path_buf(),
        detail,
    };
    let refuse = |what: String| Qcow2Error::Refused {
        path: path.to_path_buf(),
        what,
    };
    if bytes.len() < V2_HEADER_LEN as usize {
        return Err(not(format!(
            "{} bytes, shorter than a qcow2 header",
            bytes.len()
        )));
    }
    if be32(bytes, 0) != MAGIC {
        return Err(not("bad magic".into()));
    }
    let version = be32(bytes, 4);
    if version != 2 && version != 3 {
        return Err(not(format!("version {version}")));
    }
    let backing_offset = be64(bytes, 8);
    let backing_len = be32(bytes, 16);
    let cluster_bits = be32(bytes, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(not(format!("cluster_bits {cluster_bits}")));
    }
    let size = be64(bytes, 24);
    let crypt = be32(bytes, 32);
    if crypt != 0 {
        return Err(refuse(format!("encryption method {crypt}")));
    }
    let nb_snapshots = be32(bytes, 60);
    if nb_snapshots != 0 {
        return Err(refuse(format!("{nb_snapshots} internal snapshot(s)")));
    }
    let (header_len, incompatible, autoclear) = if version == 3 {
        if bytes.len() < 104 {
            return Err(not("truncated version 3 header".into()));
        }
        (
            u64::from(be32(bytes, 100)),
            be64(bytes, 72),
            be64(bytes, 88),
        )
    } else {
        (V2_HEADER_LEN, 0, 0)
    };
    if header_len < if version == 3 { 104 } else { V2_HEADER_LEN }
        || header_len > bytes.len() as u64
    {
        return Err(not(format!("header length {header_len}")));
    }
    if incompatible & INCOMPAT_DATA_FILE != 0 {
        return Err(refuse("an external data file".into()));
    }
    if incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(refuse("the corrupt flag".into()));
    }
    let known = INCOMPAT_DIRTY | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
    if incompatible & !known != 0 {
        return Err(refuse(format!(
            "unknown incompatible features {:#x}",
            incompatible & !known
        )));
    }
    if autoclear & AUTOCLEAR_DATA_FILE_RAW != 0 {
        return Err(refuse("a raw external data file".into()));
    }
    // Header extensions follow the header, each padded to 8 bytes.
    let mut at = header_len as usize;
    loop {
        if at + 8 > bytes.len() {
            return Err(not("header extensions run past the header".into()));
        }
        let kind = be32(bytes, at);
        let len = be32(bytes, at + 4) as usize;
        let padded = len.div_ceil(8) * 8;
        let end = at
            .checked_add(8 + padded)
            .filter(|e| *e <= bytes.len())
            .ok_or_else(|| {
                not(format!(
                    "header extension {kind:#x} of {len} bytes runs past the header"
                ))
            })?;
        match kind {
            EXT_END => break,
            EXT_DATA_FILE => return Err(refuse("an external data file name".into())),
            EXT_CRYPTO => return Err(refuse("an encryption header".into())),
            // Harmless: describe the file itself; unknown ones QEMU ignores.
            EXT_BACKING_FORMAT | EXT_FEATURE_NAMES | EXT_BITMAPS => {}
            _ => {}
        }
        at = end;
    }
    let backing = if backing_offset != 0 && backing_len != 0 {
        if backing_len > 1023 {
            return Err(not(format!("backing file name of {backing_len} bytes")));
        }
        Some((backing_offset, backing_len))
    } else {
        None
    };
    Ok(Header {
        version,
        size,
        backing,
    })
}

fn read_head(f: &mut File, path: &Path) -> Result<Vec<u8>, Qcow2Error> {
    let io = |source| Qcow2Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    f.take(MAX_HEADER).read_to_end(&mut bytes).map_err(io)?;
    Ok(bytes)
}

/// Check the qcow2 layer at `path` (see the module docs).
pub fn inspect(path: &Path) -> Result<Header, Qcow2Error> {
    let mut f = File::open(path).map_err(|source| Qcow2Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&read_head(&mut f, path)?, path)
}

/// Check the layer at `path` and blank its backing-file name in place, so
/// the header names no host path at all. For the VM's own copy of a layer
/// from a bundle, never for the bundle itself.
pub fn sanitize_copy(path: &Path) -> Result<Header, Qcow2Error> {
    let io = |source| Qcow2Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io)?;
    let head = read_head(&mut f, path)?;
    let header = parse(&head, path)?;
    if header.backing.is_some() {
        neutralize_backing(&mut f).map_err(io)?;
    }
    Ok(header)
}

/// Zero the backing-file offset and length fields (bytes 8..20). QEMU is
/// handed the backing node explicitly (`-blockdev … backing=base`), which
/// does not depend on the header naming one.
fn neutralize_backing(f: &mut File) -> std::io::Result<()> {
    f.seek(SeekFrom::Start(8))?;
    f.write_all(&[0u8; 12])?;
    f.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal version 3 header with the given incompatible bits and
    /// extensions, padded to 512 bytes.
    fn v3(incompat: u64, autoclear: u64, exts: &[(u32, &[u8])], backing: Option<&str>) -> Vec<u8> {
        let mut b = vec![0u8; 104];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[72..80].copy_from_slice(&incompat.to_be_bytes());
        b[88..96].copy_from_slice(&autoclear.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        for (kind, data) in exts {
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        }
        b.extend_from_slice(&[0u8; 8]);
        if let Some(name) = backing {
            let off = b.len() as u64;
            b.extend_from_slice(name.as_bytes());
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        }
        b.resize(512, 0);
        b
    }

    #[test]
    fn plain_layers_pass() {
        let h = parse(
            &v3(0, 0, &[(EXT_BACKING_FORMAT, b"raw")], Some("/cache/x.ext4")),
            Path::new("l"),
        )
        .expect("ok");
        assert_eq!(h.version, 3);
        assert_eq!(h.size, 1 << 30);
        assert!(h.backing.is_some());
        assert!(parse(
            &v3(INCOMPAT_DIRTY | INCOMPAT_EXTL2, 0, &[], None),
            Path::new("l")
        )
        .expect("ok")
        .backing
        .is_none());
        assert!(
            parse(
                &v3(0, 0, &[(0x1234_5678, b"whatever")], None),
                Path::new("l")
            )
            .is_ok(),
            "unknown extensions are ignored, as QEMU does"
        );
    }

    #[test]
    fn host_file_options_are_refused() {
        let refused =
            |b: Vec<u8>| matches!(parse(&b, Path::new("l")), Err(Qcow2Error::Refused { .. }));
        assert!(refused(v3(INCOMPAT_DATA_FILE, 0, &[], None)));
        assert!(
            refused(v3(0, 0, &[(EXT_DATA_FILE, b"/etc/shadow")], None)),
            "a data file name without the bit"
        );
        assert!(refused(v3(0, AUTOCLEAR_DATA_FILE_RAW, &[], None)));
        assert!(refused(v3(0, 0, &[(EXT_CRYPTO, &[0u8; 16])], None)));
        assert!(
            refused(v3(1 << 9, 0, &[], None)),
            "unknown incompatible feature"
        );
        assert!(refused(v3(INCOMPAT_CORRUPT, 0, &[], None)));
        let mut enc = v3(0, 0, &[], None);
        enc[32..36].copy_from_slice(&1u32.to_be_bytes());
        assert!(refused(enc));
        let mut snaps = v3(0, 0, &[], None);
        snaps[60..64].copy_from_slice(&1u32.to_be_bytes());
        assert!(refused(snaps));
    }

    #[test]
    fn malformed_headers_are_not_qcow2() {
        let not = |b: &[u8]| matches!(parse(b, Path::new("l")), Err(Qcow2Error::NotQcow2 { .. }));
        assert!(not(b"QFI"));
        assert!(not(&[0u8; 512]));
        let mut v = v3(0, 0, &[], None);
        v[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert!(not(&v));
        let mut long_ext = v3(0, 0, &[], None);
        long_ext[104..108].copy_from_slice(&EXT_BITMAPS.to_be_bytes());
        long_ext[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(not(&long_ext), "an extension longer than the header");
        let mut hl = v3(0, 0, &[], None);
        hl[100..104].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(not(&hl));
        // Every truncation of a valid header is refused, never a panic.
        let full = v3(0, 0, &[(EXT_BACKING_FORMAT, b"raw")], Some("/b"));
        for n in 0..120 {
            assert!(
                parse(&full[..n], Path::new("l")).is_err(),
                "truncated to {n}"
            );
        }
    }

    #[test]
    fn sanitize_blanks_the_backing_name() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("l.qcow2");
        std::fs::write(&p, v3(0, 0, &[], Some("/etc/passwd"))).expect("write");
        assert!(sanitize_copy(&p).expect("ok").backing.is_some());
        assert_eq!(inspect(&p).expect("ok").backing, None);
    }
}
