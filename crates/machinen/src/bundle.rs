//! Snapshot bundles: a directory holding everything needed to resume a VM.
//!
//! ```text
//! <bundle>/meta.json        BundleMeta: what was snapshotted, where, how
//! <bundle>/state.vmstate    machine state and guest RAM (QEMU migration stream)
//! <bundle>/rootdisk.qcow2   the VM's disk layer over its image (qcow2, sparse)
//! <bundle>/ram.img          guest RAM as a sparse file, when the VM's RAM was a
//!                           shared file (then `state.vmstate` holds devices only)
//! <bundle>/mounts.qcow2     the layer of the VM's copy-once mounts over their
//!                           lower (qcow2, sparse; only with `--mount`)
//! <bundle>/mounts-lower.ext4  that lower, as cached when the VM booted (a hard
//!                           link to the cache where the filesystem allows)
//! <bundle>/ram.pages        (delta checkpoints) the 4 KiB pages `ram.img` holds
//!                           over its parent's RAM (see [`crate::chain`])
//! <bundle>/manifest.json    size and digest of every other file
//! ```
//!
//! Since format 7 a bundle may be a delta checkpoint: `meta.json` names its
//! parent (a relative path and the digest of the parent's manifest), its
//! `rootdisk.qcow2` holds only the disk clusters written since the parent,
//! and with `ram_delta` its `ram.img` only the pages written since (listed
//! in `ram.pages`). See [`crate::chain`].
//!
//! `ram.img` is restored as a private (copy-on-write) mapping, so restore
//! does not read it all in and forks share its unchanged pages. Its digest
//! skips holes and zero chunks (see [`sparse_digest`]), so verifying it
//! costs the touched memory, not the memory ceiling.
//!
//! Digests are BLAKE3 since format 3 (several times faster than SHA-256,
//! and verification sits on the restore path); bundles of formats 1 and 2
//! carry SHA-256 digests, named per file in the manifest, and still verify.
//!
//! A bundle is built in a hidden temp directory next to its destination and
//! renamed into place only when complete and synced, so a crash never leaves
//! something that [`verify`] accepts. [`verify`] checks the manifest strictly:
//! any changed byte in any file — the manifest included — is refused with an
//! error naming the file.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Coded, ErrorCode};

/// Bundle format version; bumped on any incompatible change. Version 2
/// added `ram.img`, version 3 BLAKE3 digests, version 4 the network mode
/// in `meta.json`, version 5 copy-once mounts, version 6 live mounts,
/// version 7 delta checkpoints (a parent), version 8 the egress policy
/// (an older machinen must not restore a restricted VM unrestricted);
/// versions 1 (RAM inside the
/// state) to 3 still restore (with QEMU's user networking, which they were
/// made with).
pub const FORMAT_VERSION: u32 = 8;
/// Oldest version this machinen restores.
pub const MIN_FORMAT_VERSION: u32 = 1;
pub const FORMAT_NAME: &str = "machinen-bundle";

pub const META: &str = "meta.json";
pub const STATE: &str = "state.vmstate";
pub const DISK: &str = "rootdisk.qcow2";
pub const MANIFEST: &str = "manifest.json";
pub const RAM: &str = "ram.img";
/// A delta checkpoint's list of the RAM pages its `ram.img` holds.
pub const RAM_PAGES: &str = "ram.pages";
/// The copy-once mounts' layer and lower (see [`crate::mounts`]).
pub const MOUNTS_LAYER: &str = "mounts.qcow2";
pub const MOUNTS_LOWER: &str = "mounts-lower.ext4";
/// The main command's output log up to the snapshot (service VMs;
/// optional): a restored VM's `logs` starts with it.
pub const MAIN_LOG: &str = crate::service::MAIN_LOG;

/// How a manifest entry's `hash` was computed (its `digest` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Digest {
    /// SHA-256 of the bytes; formats 1 and 2, and entries naming no scheme.
    Sha256,
    /// [`sparse_digest`] with SHA-256 (`ram.img` of format 2).
    Sha256Sparse,
    /// BLAKE3 of the bytes (format 3).
    Blake3,
    /// [`sparse_digest`] with BLAKE3 (`ram.img` of format 3).
    Blake3Sparse,
}

impl Digest {
    pub fn name(self) -> &'static str {
        match self {
            Digest::Sha256 => "sha256",
            Digest::Sha256Sparse => "sha256-nonzero-64k",
            Digest::Blake3 => "blake3",
            Digest::Blake3Sparse => "blake3-nonzero-64k",
        }
    }

    pub fn parse(name: Option<&str>) -> Option<Digest> {
        let all = [
            Digest::Sha256,
            Digest::Sha256Sparse,
            Digest::Blake3,
            Digest::Blake3Sparse,
        ];
        match name {
            None => Some(Digest::Sha256),
            Some(n) => all.into_iter().find(|d| d.name() == n),
        }
    }

    /// (apparent size, hex digest) of the file at `path`.
    pub fn of_file(self, path: &Path) -> Result<(u64, String), BundleError> {
        self.of_file_until(path, None)
    }

    /// [`Digest::of_file`], giving up once `deadline` passes.
    pub fn of_file_until(
        self,
        path: &Path,
        deadline: Deadline,
    ) -> Result<(u64, String), BundleError> {
        match self {
            Digest::Sha256 => hash_file(path),
            Digest::Blake3 => blake3_file(path, deadline),
            Digest::Sha256Sparse => sparse_digest_until::<sha2::Sha256>(path, deadline),
            Digest::Blake3Sparse => sparse_digest_until::<Blake3>(path, deadline),
        }
    }
}

/// Largest meta/manifest file we parse (they are a few KiB).
const MAX_SMALL_FILE: u64 = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageIdentity {
    /// Path of the rootfs tarball on the snapshotting host.
    pub path: PathBuf,
    pub sha256: String,
    /// The container image the tarball was converted from (format 6):
    /// `oci:DIR[:TAG]`, `docker-archive:FILE` or a registry reference. A
    /// restore that does not find the tarball converts (or pulls) it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelIdentity {
    pub version: String,
    pub sha256: String,
}

/// `meta.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleMeta {
    pub format: String,
    pub version: u32,
    pub engine: String,
    pub source_name: String,
    pub image: ImageIdentity,
    /// Unix time in milliseconds.
    pub snapped_at_ms: u64,
    /// Debian spelling: `amd64`, `arm64`.
    pub guest_arch: String,
    pub accel: String,
    pub cpu_model: String,
    pub memory_mib: u32,
    pub cpus: u32,
    pub kernel: KernelIdentity,
    /// The disk layer's format and what it sits on.
    pub disk_format: String,
    /// Checkpoint chain this bundle belongs to and its place in it.
    pub chain_id: String,
    pub chain_seq: u32,
    #[serde(default)]
    pub chain_parent: Option<String>,
    /// The network backend the VM ran with (format 4); a restore uses the
    /// same, since QEMU's user networking keeps state in the stream.
    #[serde(default = "crate::spec::NetworkMode::legacy")]
    pub network: crate::spec::NetworkMode,
    /// The VM's egress policy when it was snapshotted (format 8); restores
    /// and forks keep it unless given another.
    #[serde(
        default,
        skip_serializing_if = "machinen_proto::netpolicy::NetPolicy::is_default"
    )]
    pub net_policy: machinen_proto::netpolicy::NetPolicy,
    /// The addresses allowed names resolved to (see `LearnedAddress`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net_learned: Vec<machinen_proto::netpolicy::LearnedAddress>,
    /// The VM's egress secrets without their values (restores keep the
    /// placeholders the guest holds and take the values again).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_secrets: Vec<machinen_proto::egress::EgressSecretSpec>,
    /// The main command the guest runs (service VMs; its environment is
    /// left out): a restored VM's supervisor re-attaches to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main: Option<crate::service::MainSpec>,
    /// The copy-once mounts (format 5): [`MOUNTS_LAYER`] over
    /// [`MOUNTS_LOWER`], mounted in the guest where these say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounts: Option<BundleMounts>,
    /// The VM had the free-page-reporting balloon (format 5; a restore
    /// must have the same devices).
    #[serde(default)]
    pub balloon: bool,
    /// The live mounts (format 6): a restore serves each guest path from
    /// the same host directory or the one `--mount-live` names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub live_mounts: Vec<crate::live_mounts::LiveMount>,
    /// The checkpoint this one holds the changes since (format 7): its
    /// disk layer sits on the parent's, and with `ram_delta` its RAM too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentLink>,
    /// `ram.img` holds only the pages `ram.pages` lists, over the parent's RAM.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ram_delta: bool,
    /// A fork's scratch bundle only: the disk layers below `rootdisk.qcow2`
    /// (files in the bundle, bottom first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk_below: Vec<String>,
}

/// Where a delta checkpoint's parent is, and what it must be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentLink {
    /// The parent bundle's directory, relative to this bundle's.
    pub path: String,
    /// BLAKE3 of the parent's `manifest.json`: the parent exactly as it
    /// was when this bundle was written (the manifest pins every file).
    pub manifest_blake3: String,
    /// The parent's place in the chain.
    pub chain_seq: u32,
}

/// `meta.json`'s copy-once mounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleMounts {
    /// Host directory (as it was on the snapshotting host) and guest path
    /// of each mount, in disk order.
    pub mounts: Vec<crate::mounts::Mount>,
    /// The lower's cache key (sha256 of the trees' tar stream): a restore
    /// on a host that has it cached uses that copy.
    pub lower_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    /// Hex digest (`sha256` in formats 1 and 2).
    #[serde(alias = "sha256")]
    pub hash: String,
    /// How `hash` was computed ([`Digest`]); absent means SHA-256 of the bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path} is not a snapshot bundle (no {MANIFEST})")]
    NotABundle { path: PathBuf },
    #[error("bundle file {file} is corrupt: {detail}")]
    Corrupt { file: PathBuf, detail: String },
    #[error("bundle file {file} is missing")]
    Missing { file: PathBuf },
    #[error(
        "bundle {path} has format version {found}; this machinen reads version {FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("bundle was made for {what} {found}, this host has {here}")]
    Foreign {
        what: &'static str,
        found: String,
        here: String,
    },
    #[error("bundle disk layer {file} is refused")]
    UnsafeDisk {
        file: PathBuf,
        #[source]
        source: crate::qcow2::Qcow2Error,
    },
    #[error("snapshot destination {path} already exists")]
    Exists { path: PathBuf },
    #[error("the deadline passed while {doing}")]
    Deadline { doing: &'static str },
    #[error("bundle i/o on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Coded for BundleError {
    fn code(&self) -> ErrorCode {
        match self {
            BundleError::NotABundle { .. }
            | BundleError::Missing { .. }
            | BundleError::Corrupt { .. }
            | BundleError::Version { .. }
            | BundleError::UnsafeDisk { .. } => ErrorCode::RestoreBundleInvalid,
            BundleError::Foreign { .. } => ErrorCode::RestoreBundleIncompatible,
            BundleError::Exists { .. } => ErrorCode::SnapshotOutExists,
            BundleError::Io { .. } => ErrorCode::SnapshotDumpFailed,
            BundleError::Deadline { .. } => ErrorCode::SnapshotTimeout,
        }
    }
    fn hint(&self) -> Option<String> {
        Some(match self {
            BundleError::NotABundle { .. } => "pass the directory that `machinen snapshot` wrote".into(),
            BundleError::Corrupt { .. } | BundleError::Missing { .. } => {
                "the bundle was damaged in transit or on disk; copy it again from its source".into()
            }
            BundleError::Version { .. } => "restore it with the machinen version that wrote it".into(),
            BundleError::UnsafeDisk { .. } => {
                "machinen never writes such a layer: the bundle was made or altered by someone else; do not restore it".into()
            }
            BundleError::Foreign { .. } => "restore it on a host with the same guest architecture and accelerator".into(),
            BundleError::Exists { .. } => "choose a new directory; machinen never overwrites a bundle".into(),
            BundleError::Deadline { .. } => {
                "the bundle was removed and the source runs on; give the snapshot a longer --timeout".into()
            }
            BundleError::Io { .. } => return None,
        })
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A point in time after which a long bundle operation gives up, checked
/// between chunks (`None`: no bound). Snapshots bound every phase with it,
/// so a late snapshot is abandoned rather than completed behind the back of
/// a client that has been told it failed.
pub type Deadline = Option<std::time::Instant>;

/// [`BundleError::Deadline`] once `deadline` has passed.
pub fn check_deadline(deadline: Deadline, doing: &'static str) -> Result<(), BundleError> {
    match deadline {
        Some(d) if std::time::Instant::now() >= d => Err(BundleError::Deadline { doing }),
        _ => Ok(()),
    }
}

/// A missing bundle file is its own error: restore names it.
fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            BundleError::Missing {
                file: path.to_path_buf(),
            }
        } else {
            BundleError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    }
}

/// Open a bundle file for reading, refusing anything but a regular file:
/// a bundle comes from elsewhere, and a symlink (to `/dev/zero`, to a host
/// file) or a fifo in it would make a restore read what the author chose,
/// or hang. The last path component is not followed (`O_NOFOLLOW`) and the
/// open does not wait for a fifo's writer (`O_NONBLOCK`, which a regular
/// file ignores).
pub fn open_regular(path: &Path) -> Result<fs::File, BundleError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => BundleError::Corrupt {
                file: path.to_path_buf(),
                detail: "is a symbolic link, not a regular file".into(),
            },
            _ => file_error(path)(e),
        })?;
    let m = f.metadata().map_err(io(path))?;
    if !m.is_file() {
        return Err(BundleError::Corrupt {
            file: path.to_path_buf(),
            detail: format!("is not a regular file ({})", file_kind(&m)),
        });
    }
    Ok(f)
}

fn file_kind(m: &fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    match () {
        _ if t.is_dir() => "a directory",
        _ if t.is_symlink() => "a symbolic link",
        _ if t.is_fifo() => "a fifo",
        _ if t.is_socket() => "a socket",
        _ if t.is_char_device() => "a character device",
        _ if t.is_block_device() => "a block device",
        _ => "a special file",
    }
}

/// sha256 and size of a file, reading it once.
pub fn hash_file(path: &Path) -> Result<(u64, String), BundleError> {
    let mut f = open_regular(path)?;
    let mut h = sha2::Sha256::default();
    let size = std::io::copy(&mut f, &mut h).map_err(io(path))?;
    Ok((size, hex::encode(sha2::Digest::finalize(h))))
}

/// BLAKE3 and size of a file, reading it once.
fn blake3_file(path: &Path, deadline: Deadline) -> Result<(u64, String), BundleError> {
    use std::io::Read;
    let mut f = open_regular(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        check_deadline(deadline, "hashing the bundle")?;
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(path)(e)),
        };
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, h.finalize().to_hex().to_string()))
}

/// The one hash interface [`sparse_digest`] needs from SHA-256 and BLAKE3.
pub trait ChunkHasher: Default {
    fn feed(&mut self, bytes: &[u8]);
    fn hex(self) -> String;
}

impl ChunkHasher for sha2::Sha256 {
    fn feed(&mut self, bytes: &[u8]) {
        sha2::Digest::update(self, bytes);
    }
    fn hex(self) -> String {
        hex::encode(sha2::Digest::finalize(self))
    }
}

/// BLAKE3 as a [`ChunkHasher`].
#[derive(Default)]
pub struct Blake3(blake3::Hasher);

impl ChunkHasher for Blake3 {
    fn feed(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn hex(self) -> String {
        self.0.finalize().to_hex().to_string()
    }
}

const CHUNK: u64 = 64 * 1024;

/// The data extents `(start, end)` of a file, found with SEEK_DATA and
/// SEEK_HOLE, so holes are never read. The extents are computed up front;
/// callers read them while the file does not change.
pub fn data_extents(f: &fs::File, len: u64) -> Vec<(u64, u64)> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(f);
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on a descriptor we own; no memory involved.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole remains
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 {
            len
        } else {
            (hole as u64).min(len)
        };
        out.push((data as u64, end));
        pos = end as i64;
    }
    out
}

/// The hash `H` over `offset (u64 BE) || bytes` of every 64 KiB chunk that
/// is not all zeros. Equal for a file and any copy of it, sparse or not, and
/// holes are skipped without being read, so the cost follows the data, not
/// the apparent size. Returns (apparent size, hex digest).
pub fn sparse_digest<H: ChunkHasher>(path: &Path) -> Result<(u64, String), BundleError> {
    sparse_digest_until::<H>(path, None)
}

/// [`sparse_digest`], giving up once `deadline` passes.
fn sparse_digest_until<H: ChunkHasher>(
    path: &Path,
    deadline: Deadline,
) -> Result<(u64, String), BundleError> {
    let f = open_regular(path)?;
    let len = f.metadata().map_err(io(path))?.len();
    let mut h = H::default();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut next_chunk = 0u64; // first chunk not yet digested
    for (data, end) in data_extents(&f, len) {
        let mut chunk = (data / CHUNK).max(next_chunk);
        while chunk * CHUNK < end {
            // Every 16 MiB: the clock is cheap next to that much hashing.
            if chunk.is_multiple_of(256) {
                check_deadline(deadline, "hashing the bundle")?;
            }
            let off = chunk * CHUNK;
            let want = CHUNK.min(len - off) as usize;
            f.read_exact_at(&mut buf[..want], off).map_err(io(path))?;
            if !is_zero(&buf[..want]) {
                h.feed(&off.to_be_bytes());
                h.feed(&buf[..want]);
            }
            chunk += 1;
        }
        next_chunk = chunk;
    }
    Ok((len, h.hex()))
}

/// Whether `b` is all zero bytes (word-wise: this runs over every page of
/// guest RAM on snapshot and restore).
pub fn is_zero(b: &[u8]) -> bool {
    // OR a 64-byte block together (the compiler turns this into a few SIMD
    // instructions), stopping at the first block with a set bit.
    let mut blocks = b.chunks_exact(64);
    blocks.all(|blk| blk.iter().fold(0u8, |acc, &x| acc | x) == 0)
        && blocks.remainder().iter().all(|&x| x == 0)
}

/// Granularity of the holes [`sparse_copy`] leaves for zero pages.
const PAGE: usize = 4096;

/// Copy a file keeping its holes, and making holes of its all-zero pages,
/// so sparse disk layers and RAM stay sparse in the bundle. Zero pages are
/// common in guest RAM (pages the guest freed or zeroed: a quarter of the
/// allocated RAM of an idle 4 GiB guest); a hole costs neither disk nor
/// the time to read and hash it on every restore. Both digests treat a hole
/// and zeros alike.
pub fn sparse_copy(src: &Path, dst: &Path) -> Result<u64, BundleError> {
    sparse_copy_until(src, dst, None)
}

/// [`sparse_copy`], giving up (leaving a partial `dst`) once `deadline`
/// passes.
pub fn sparse_copy_until(src: &Path, dst: &Path, deadline: Deadline) -> Result<u64, BundleError> {
    let to = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(io(dst))?;
    copy_extents(src, &to, dst, deadline)
}

/// [`sparse_copy`] into `dst`, a regular file that exists and holds no
/// data yet (a RAM file reserved at full size under the registry lock, so
/// that admissions count it before the copy fills it).
pub fn sparse_copy_into(src: &Path, dst: &Path) -> Result<u64, BundleError> {
    let to = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dst)
        .map_err(io(dst))?;
    copy_extents(src, &to, dst, None)
}

fn copy_extents(
    src: &Path,
    to: &fs::File,
    dst: &Path,
    deadline: Deadline,
) -> Result<u64, BundleError> {
    let from = open_regular(src)?;
    let len = from.metadata().map_err(io(src))?.len();
    to.set_len(len).map_err(io(dst))?;
    let mut buf = vec![0u8; 1 << 20];
    for (data, end) in data_extents(&from, len) {
        let mut off = data;
        while off < end {
            check_deadline(deadline, "copying into the bundle")?;
            let want = ((end - off) as usize).min(buf.len());
            from.read_exact_at(&mut buf[..want], off).map_err(io(src))?;
            // Write each run of non-zero pages with one call.
            let mut run: Option<usize> = None;
            let mut at = 0;
            while at < want {
                let next = (at + PAGE).min(want);
                match (is_zero(&buf[at..next]), run) {
                    (false, None) => run = Some(at),
                    (true, Some(start)) => {
                        to.write_all_at(&buf[start..at], off + start as u64)
                            .map_err(io(dst))?;
                        run = None;
                    }
                    _ => {}
                }
                at = next;
            }
            if let Some(start) = run {
                to.write_all_at(&buf[start..want], off + start as u64)
                    .map_err(io(dst))?;
            }
            off += want as u64;
        }
    }
    // No fsync here: snapshots copy while the guest is paused, and
    // `Builder::finish` syncs every file after it runs again.
    Ok(len)
}

/// Apparent and on-disk bytes of a directory tree (a bundle, a VM's
/// directory); unreadable entries count as nothing.
pub fn dir_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut apparent, mut on_disk) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                apparent += m.len();
                on_disk += m.blocks() * 512;
            }
        }
    }
    (apparent, on_disk)
}

/// A bundle being written: a hidden temp directory beside the destination.
pub struct Builder {
    pub tmp: PathBuf,
    pub dest: PathBuf,
    /// Renamed into place: nothing for `Drop` to remove.
    finished: bool,
}

impl Builder {
    /// Refuses an existing destination.
    pub fn new(dest: &Path) -> Result<Builder, BundleError> {
        Builder::new_recorded(dest, |_| Ok(()))
    }

    /// Like [`Builder::new`], but `record` learns the temp directory's path
    /// before the directory exists, so whoever cleans up after a crash (gc)
    /// can always find it.
    pub fn new_recorded(
        dest: &Path,
        record: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<Builder, BundleError> {
        let dest = if dest.is_absolute() {
            dest.to_path_buf()
        } else {
            std::env::current_dir().map_err(io(dest))?.join(dest)
        };
        if dest.exists() {
            return Err(BundleError::Exists { path: dest });
        }
        let parent = dest
            .parent()
            .ok_or_else(|| BundleError::Exists { path: dest.clone() })?;
        fs::create_dir_all(parent).map_err(io(parent))?;
        let base = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "bundle".into());
        let tmp = parent.join(format!(".{base}.partial-{:08x}", rand::random::<u32>()));
        record(&tmp).map_err(io(&tmp))?;
        // 0700 from the start: a bundle holds guest RAM and disk.
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io(&tmp))?;
        Ok(Builder {
            tmp,
            dest,
            finished: false,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }

    /// Write only `meta.json` and rename into place, unsynced: a fork's
    /// scratch bundle, restored right away on this host without
    /// verification and then removed. With no manifest, [`verify`] refuses
    /// it, so it cannot pass for a bundle that was checked.
    pub fn finish_scratch(self, meta: &BundleMeta) -> Result<PathBuf, BundleError> {
        self.finish_scratch_until(meta, None)
    }

    /// [`Builder::finish_scratch`], abandoned when `deadline` passes before
    /// the rename.
    pub fn finish_scratch_until(
        mut self,
        meta: &BundleMeta,
        deadline: Deadline,
    ) -> Result<PathBuf, BundleError> {
        let meta_path = self.path(META);
        let bytes = serde_json::to_vec_pretty(meta).map_err(|e| BundleError::Corrupt {
            file: meta_path.clone(),
            detail: e.to_string(),
        })?;
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&meta_path)
            .and_then(|mut f| f.write_all(&bytes))
            .map_err(io(&meta_path))?;
        check_deadline(deadline, "writing the bundle")?;
        fs::rename(&self.tmp, &self.dest).map_err(io(&self.dest))?;
        let dest = self.dest.clone();
        self.finished = true;
        Ok(dest)
    }

    /// Write meta and manifest, sync everything, and rename into place.
    pub fn finish(self, meta: &BundleMeta) -> Result<PathBuf, BundleError> {
        self.finish_until(meta, None)
    }

    /// [`Builder::finish`], abandoned (the temp directory removed) when
    /// `deadline` passes before the rename. The rename is the commit point:
    /// the deadline is checked right before it, so a bundle never appears
    /// after its deadline.
    pub fn finish_until(
        mut self,
        meta: &BundleMeta,
        deadline: Deadline,
    ) -> Result<PathBuf, BundleError> {
        let meta_path = self.path(META);
        let bytes = serde_json::to_vec_pretty(meta).map_err(|e| BundleError::Corrupt {
            file: meta_path.clone(),
            detail: e.to_string(),
        })?;
        write_synced(&meta_path, &bytes)?;
        let mut files = Vec::new();
        for name in [
            META,
            STATE,
            DISK,
            RAM,
            RAM_PAGES,
            MAIN_LOG,
            MOUNTS_LAYER,
            MOUNTS_LOWER,
        ] {
            let p = self.path(name);
            if ![META, STATE, DISK].contains(&name) && !p.exists() {
                continue;
            }
            let digest = if name == RAM {
                Digest::Blake3Sparse
            } else {
                Digest::Blake3
            };
            let (size, hash) = digest.of_file_until(&p, deadline)?;
            let f = fs::File::open(&p).map_err(io(&p))?;
            f.sync_all().map_err(io(&p))?;
            check_deadline(deadline, "syncing the bundle")?;
            files.push(FileEntry {
                name: name.into(),
                size,
                hash,
                digest: Some(digest.name().into()),
            });
        }
        let manifest = Manifest {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            files,
        };
        let mpath = self.path(MANIFEST);
        let bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| BundleError::Corrupt {
            file: mpath.clone(),
            detail: e.to_string(),
        })?;
        write_synced(&mpath, &bytes)?;
        fsync_dir(&self.tmp)?;
        check_deadline(deadline, "syncing the bundle")?;
        fs::rename(&self.tmp, &self.dest).map_err(io(&self.dest))?;
        self.finished = true;
        // Past the rename the bundle is complete and is reported as such;
        // a failed sync of its parent only risks the rename on power loss.
        if let Some(parent) = self.dest.parent() {
            if let Err(e) = fsync_dir(parent) {
                tracing::warn!("syncing {}: {e}", parent.display());
            }
        }
        Ok(self.dest.clone())
    }
}

impl Builder {
    /// Sync the files as they are (meta and manifest included, written by
    /// the caller: a pulled bundle keeps its own) and rename into place.
    pub fn finish_verbatim(mut self) -> Result<PathBuf, BundleError> {
        for e in fs::read_dir(&self.tmp).map_err(io(&self.tmp))? {
            let p = e.map_err(io(&self.tmp))?.path();
            fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(io(&p))?;
        }
        fsync_dir(&self.tmp)?;
        fs::rename(&self.tmp, &self.dest).map_err(io(&self.dest))?;
        self.finished = true;
        if let Some(parent) = self.dest.parent() {
            let _ = fsync_dir(parent);
        }
        Ok(self.dest.clone())
    }
}

impl Drop for Builder {
    fn drop(&mut self) {
        // An abandoned bundle leaves nothing behind.
        if !self.finished {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), BundleError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn fsync_dir(dir: &Path) -> Result<(), BundleError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

fn read_small(path: &Path) -> Result<Vec<u8>, BundleError> {
    let f = open_regular(path)?;
    let mut bytes = Vec::new();
    f.take(MAX_SMALL_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io(path))?;
    if bytes.len() as u64 > MAX_SMALL_FILE {
        return Err(BundleError::Corrupt {
            file: path.to_path_buf(),
            detail: "larger than 1 MiB".into(),
        });
    }
    Ok(bytes)
}

/// Check every file of the bundle at `dir` against its manifest and return
/// the parsed meta. Nothing in the bundle is modified.
/// The files [`verify_files`] checks after [`open_verified_meta`] (those a
/// bundle lacks are skipped).
pub const LARGE_FILES: &[&str] = &[STATE, DISK, RAM, RAM_PAGES, MOUNTS_LAYER, MOUNTS_LOWER];

pub fn verify(dir: &Path) -> Result<BundleMeta, BundleError> {
    let (manifest, meta) = open_verified_meta(dir)?;
    verify_files(dir, &manifest, LARGE_FILES)?;
    Ok(meta)
}

/// The first half of [`verify`]: the manifest's structure and `meta.json`
/// (what a restore needs to start QEMU), leaving the large files to
/// [`verify_files`], which a restore runs while QEMU loads (the guest stays
/// paused until they pass).
pub fn open_verified_meta(dir: &Path) -> Result<(Manifest, BundleMeta), BundleError> {
    let manifest = read_manifest(dir)?;
    check_file_kinds(dir, &manifest)?;
    // The main log is small and copied into the restored VM's directory
    // before the large files are checked: checked here.
    verify_files(dir, &manifest, &[META, MAIN_LOG])?;
    Ok((manifest, read_meta(dir)?))
}

/// Every file the manifest lists is a regular file (not a symlink, fifo or
/// device) of the listed size. Cheap (one `lstat` each), so a restore runs
/// it before QEMU is given any of them: QEMU reads the state and maps the
/// RAM file by path, and would hang on a fifo or read a device.
pub fn check_file_kinds(dir: &Path, manifest: &Manifest) -> Result<(), BundleError> {
    for e in &manifest.files {
        let p = dir.join(&e.name);
        let m = fs::symlink_metadata(&p).map_err(file_error(&p))?;
        if !m.file_type().is_file() {
            return Err(BundleError::Corrupt {
                file: p,
                detail: format!("is not a regular file ({})", file_kind(&m)),
            });
        }
        if m.len() != e.size {
            return Err(BundleError::Corrupt {
                file: p,
                detail: format!("size {}, manifest says {}", m.len(), e.size),
            });
        }
    }
    Ok(())
}

/// Check the files named in `names` (those the manifest lists) against the
/// manifest, each on its own thread: the RAM file dominates, the others
/// come for free beside it.
pub fn verify_files(dir: &Path, manifest: &Manifest, names: &[&str]) -> Result<(), BundleError> {
    let entries: Vec<&FileEntry> = manifest
        .files
        .iter()
        .filter(|f| names.contains(&f.name.as_str()))
        .collect();
    std::thread::scope(|s| {
        let checks: Vec<_> = entries
            .iter()
            .map(|e| s.spawn(move || verify_entry(dir, e)))
            .collect();
        // Report the first failure in manifest order, so the message does not
        // depend on which thread finished first.
        let mut first = Ok(());
        for c in checks {
            let r = c.join().unwrap_or_else(|_| {
                Err(BundleError::Corrupt {
                    file: dir.to_path_buf(),
                    detail: "a verification thread panicked".into(),
                })
            });
            if first.is_ok() {
                first = r;
            }
        }
        first
    })
}

fn verify_entry(dir: &Path, entry: &FileEntry) -> Result<(), BundleError> {
    let p = dir.join(&entry.name);
    let digest = Digest::parse(entry.digest.as_deref()).ok_or_else(|| BundleError::Corrupt {
        file: dir.join(MANIFEST),
        detail: format!(
            "unknown digest {:?}",
            entry.digest.as_deref().unwrap_or_default()
        ),
    })?;
    let (size, hash) = digest.of_file(&p)?;
    if size != entry.size {
        return Err(BundleError::Corrupt {
            file: p,
            detail: format!("size {size}, manifest says {}", entry.size),
        });
    }
    if hash != entry.hash {
        return Err(BundleError::Corrupt {
            file: p,
            detail: format!("{} digest does not match the manifest", digest.name()),
        });
    }
    Ok(())
}

/// `manifest.json`, checked for format, version and file list.
pub fn read_manifest(dir: &Path) -> Result<Manifest, BundleError> {
    let mpath = dir.join(MANIFEST);
    if !mpath.exists() {
        return Err(BundleError::NotABundle {
            path: dir.to_path_buf(),
        });
    }
    let manifest: Manifest =
        serde_json::from_slice(&read_small(&mpath)?).map_err(|e| BundleError::Corrupt {
            file: mpath.clone(),
            detail: e.to_string(),
        })?;
    if manifest.format != FORMAT_NAME {
        return Err(BundleError::Corrupt {
            file: mpath,
            detail: format!("format {:?}", manifest.format),
        });
    }
    if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&manifest.version) {
        return Err(BundleError::Version {
            path: dir.to_path_buf(),
            found: manifest.version,
        });
    }
    let mut names: Vec<&str> = manifest
        .files
        .iter()
        .map(|f| f.name.as_str())
        .filter(|n| *n != MAIN_LOG)
        .collect();
    names.sort_unstable();
    let mounts = names.contains(&MOUNTS_LAYER) || names.contains(&MOUNTS_LOWER);
    let both_mounts = names.contains(&MOUNTS_LAYER) && names.contains(&MOUNTS_LOWER);
    let core: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| *n != MOUNTS_LAYER && *n != MOUNTS_LOWER)
        .collect();
    if (core != [META, DISK, STATE]
        && core != [META, RAM, DISK, STATE]
        && core != [META, RAM, RAM_PAGES, DISK, STATE])
        || mounts != both_mounts
    {
        return Err(BundleError::Corrupt {
            file: mpath,
            detail: format!("unexpected file list {names:?}"),
        });
    }
    // Restore maps a `ram.img` it finds as guest RAM, and copies mount
    // files it finds: one the manifest does not list would go unverified.
    for f in [RAM, RAM_PAGES, MOUNTS_LAYER, MOUNTS_LOWER] {
        if !names.contains(&f) && fs::symlink_metadata(dir.join(f)).is_ok() {
            return Err(BundleError::Corrupt {
                file: mpath,
                detail: format!("{f} is in the bundle but not in the manifest"),
            });
        }
    }
    Ok(manifest)
}

/// Parse `meta.json` without checking the files against the manifest (for
/// a bundle this process has just written).
pub fn read_meta(dir: &Path) -> Result<BundleMeta, BundleError> {
    let meta_path = dir.join(META);
    let meta: BundleMeta =
        serde_json::from_slice(&read_small(&meta_path)?).map_err(|e| BundleError::Corrupt {
            file: meta_path.clone(),
            detail: e.to_string(),
        })?;
    if meta.format != FORMAT_NAME || !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&meta.version)
    {
        return Err(BundleError::Version {
            path: dir.to_path_buf(),
            found: meta.version,
        });
    }
    meta.validate().map_err(|detail| BundleError::Corrupt {
        file: meta_path,
        detail,
    })?;
    Ok(meta)
}

/// The longest `source_name` a bundle may carry: an anonymous restore is
/// named `<source>/<pid>`, which must still be a valid VM name.
pub const MAX_SOURCE_NAME: usize = crate::registry::MAX_NAME_LEN - 11;

impl BundleMeta {
    /// Values a restore acts on are within what `boot` itself accepts: a
    /// bundle's author controls every field.
    pub fn validate(&self) -> Result<(), String> {
        if self.engine != "qemu" {
            return Err(format!(
                "engine {:?} (this machinen restores \"qemu\" bundles)",
                short(&self.engine)
            ));
        }
        if let Err(e) = crate::registry::validate_name(&self.source_name) {
            return Err(format!("source_name: {e}"));
        }
        if self.source_name.len() > MAX_SOURCE_NAME {
            return Err(format!(
                "source_name is longer than {MAX_SOURCE_NAME} characters"
            ));
        }
        if !(1..=crate::vm::MAX_CPUS).contains(&self.cpus) {
            return Err(format!(
                "cpus {} (must be 1 to {})",
                self.cpus,
                crate::vm::MAX_CPUS
            ));
        }
        if crate::vm::validate_memory_mib(self.memory_mib).is_err() {
            return Err(format!(
                "memory_mib {} (must be {} to {})",
                self.memory_mib,
                crate::vm::MIN_MEMORY_MIB,
                crate::vm::MAX_MEMORY_MIB
            ));
        }
        if self.disk_format != "qcow2" {
            return Err(format!(
                "disk_format {:?} (must be \"qcow2\")",
                short(&self.disk_format)
            ));
        }
        let hex64 = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex64(&self.image.sha256) {
            return Err("image.sha256 is not a sha256 digest".into());
        }
        match &self.parent {
            Some(p) => {
                if !hex64(&p.manifest_blake3) {
                    return Err("parent.manifest_blake3 is not a BLAKE3 digest".into());
                }
                if p.path.is_empty() || p.path.len() > 4096 || p.path.contains('\0') {
                    return Err("parent.path is empty or longer than 4096 bytes".into());
                }
                // Relative, and only `..` and names: a bundle from elsewhere
                // cannot point its parent at an arbitrary host path.
                let relative = Path::new(&p.path).components().all(|c| {
                    matches!(
                        c,
                        std::path::Component::ParentDir | std::path::Component::Normal(_)
                    )
                });
                if !relative {
                    return Err("parent.path is not a relative path of `..` and names".into());
                }
            }
            None if self.ram_delta => {
                return Err("ram_delta without a parent".into());
            }
            None => {}
        }
        let word =
            |s: &str| !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_graphic());
        for (field, v) in [
            ("kernel.version", &self.kernel.version),
            ("guest_arch", &self.guest_arch),
            ("accel", &self.accel),
            ("cpu_model", &self.cpu_model),
        ] {
            if !word(v) {
                return Err(format!(
                    "{field} is empty, longer than 256 characters or not printable"
                ));
            }
        }
        Ok(())
    }
}

/// A field value cut short for an error message.
fn short(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Refuse a bundle this host cannot resume.
pub fn check_compatible(
    meta: &BundleMeta,
    guest_arch: &str,
    accel: &str,
    cpu_model: &str,
) -> Result<(), BundleError> {
    if meta.guest_arch != guest_arch {
        return Err(BundleError::Foreign {
            what: "guest architecture",
            found: meta.guest_arch.clone(),
            here: guest_arch.into(),
        });
    }
    if meta.cpu_model != cpu_model || (meta.accel == "tcg") != (accel == "tcg") {
        return Err(BundleError::Foreign {
            what: "accelerator/CPU model",
            found: format!("{}/{}", meta.accel, meta.cpu_model),
            here: format!("{accel}/{cpu_model}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn meta() -> BundleMeta {
        BundleMeta {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            engine: "qemu".into(),
            source_name: "web".into(),
            image: ImageIdentity {
                path: "/x/rootfs.tar.gz".into(),
                sha256: "ab".repeat(32),
                source: None,
            },
            snapped_at_ms: 1,
            guest_arch: "amd64".into(),
            accel: "tcg".into(),
            cpu_model: "max".into(),
            memory_mib: 512,
            cpus: 1,
            kernel: KernelIdentity {
                version: "6.1".into(),
                sha256: "cd".repeat(32),
            },
            disk_format: "qcow2".into(),
            chain_id: "c".into(),
            chain_seq: 1,
            chain_parent: None,
            network: crate::spec::NetworkMode::Nat,
            net_policy: Default::default(),
            net_learned: Vec::new(),
            egress_secrets: Vec::new(),
            main: None,
            mounts: None,
            live_mounts: Vec::new(),
            balloon: false,
            parent: None,
            ram_delta: false,
            disk_below: Vec::new(),
        }
    }

    fn make(dir: &Path) -> PathBuf {
        let dest = dir.join("b.snap");
        let b = Builder::new(&dest).expect("builder");
        fs::write(b.path(STATE), vec![7u8; 100_000]).expect("state");
        let disk = dir.join("disk.src");
        let f = fs::File::create(&disk).expect("disk");
        f.set_len(64 << 20).expect("len");
        f.write_all_at(b"data", 32 << 20).expect("write");
        sparse_copy(&disk, &b.path(DISK)).expect("copy");
        b.finish(&meta()).expect("finish")
    }

    #[test]
    fn bundle_round_trips_and_stays_sparse() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dest = make(tmp.path());
        assert_eq!(verify(&dest).expect("verify"), meta());
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(dest.join(DISK)).expect("meta");
        assert_eq!(m.len(), 64 << 20);
        assert!(
            m.blocks() * 512 < 4 << 20,
            "disk copy is sparse ({} blocks)",
            m.blocks()
        );
        let mut buf = [0u8; 4];
        fs::File::open(dest.join(DISK))
            .expect("open")
            .read_exact_at(&mut buf, 32 << 20)
            .expect("read");
        assert_eq!(&buf, b"data");
        assert!(fs::read_dir(tmp.path()).expect("ls").all(|e| !e
            .expect("e")
            .file_name()
            .to_string_lossy()
            .contains("partial")));
    }

    #[test]
    fn any_flipped_byte_is_refused_naming_the_file() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dest = make(tmp.path());
        for name in [META, STATE, DISK, MANIFEST] {
            let p = dest.join(name);
            let orig = fs::read(&p).expect("read");
            for at in [0, orig.len() / 2, orig.len() - 1] {
                let mut bad = orig.clone();
                bad[at] ^= 0x01;
                fs::write(&p, &bad).expect("write");
                let err = verify(&dest).expect_err("must refuse");
                assert_eq!(
                    err.code(),
                    ErrorCode::RestoreBundleInvalid,
                    "{name}@{at}: {err}"
                );
                assert!(
                    err.to_string().contains(name) || err.to_string().contains("b.snap"),
                    "{name}@{at}: {err}"
                );
            }
            fs::write(&p, &orig).expect("restore");
        }
        verify(&dest).expect("intact again");
    }

    /// Rewrite `meta.json` through `edit` and re-hash it in the manifest,
    /// as a bundle's author can.
    fn rehash_meta(dest: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
        let mut m: serde_json::Value =
            serde_json::from_slice(&fs::read(dest.join(META)).expect("read")).expect("json");
        edit(&mut m);
        fs::write(dest.join(META), serde_json::to_vec(&m).expect("json")).expect("write");
        let mut man: Manifest =
            serde_json::from_slice(&fs::read(dest.join(MANIFEST)).expect("read")).expect("json");
        let (size, hash) = Digest::Blake3.of_file(&dest.join(META)).expect("hash");
        let e = man
            .files
            .iter_mut()
            .find(|f| f.name == META)
            .expect("meta entry");
        e.size = size;
        e.hash = hash;
        fs::write(dest.join(MANIFEST), serde_json::to_vec(&man).expect("json")).expect("write");
    }

    #[test]
    fn hostile_meta_values_are_refused_even_when_rehashed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dest = make(tmp.path());
        let cases: Vec<(&str, serde_json::Value)> = vec![
            ("source_name", "../../../etc/evil".into()),
            ("source_name", "x".repeat(500_000).into()),
            ("source_name", "x".repeat(MAX_SOURCE_NAME + 1).into()),
            ("source_name", "".into()),
            ("cpus", 0.into()),
            ("cpus", 65.into()),
            ("memory_mib", 0.into()),
            ("engine", "firecracker".into()),
            ("disk_format", "raw".into()),
            ("guest_arch", "amd64 --evil".into()),
            (
                "parent",
                serde_json::json!({"path": "/home/u/private", "manifest_blake3": "a".repeat(64), "chain_seq": 1}),
            ),
            (
                "parent",
                serde_json::json!({"path": "../c1", "manifest_blake3": "short", "chain_seq": 1}),
            ),
            ("ram_delta", true.into()),
        ];
        for (field, value) in cases {
            let orig = fs::read(dest.join(META)).expect("read");
            let man = fs::read(dest.join(MANIFEST)).expect("read");
            rehash_meta(&dest, |m| m[field] = value.clone());
            let err = verify(&dest).expect_err(field);
            assert_eq!(
                err.code(),
                ErrorCode::RestoreBundleInvalid,
                "{field}: {err}"
            );
            assert!(
                err.to_string()
                    .contains(field.split('.').next().expect("field")),
                "{field}: {err}"
            );
            fs::write(dest.join(META), orig).expect("put back");
            fs::write(dest.join(MANIFEST), man).expect("put back");
        }
        rehash_meta(&dest, |m| m["source_name"] = "team/app/web-1".into());
        verify(&dest).expect("a path-shaped source name is fine");
    }

    #[test]
    fn special_files_are_refused_without_blocking() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().expect("tmp");
        let dest = make(tmp.path());
        let fifo = |p: &Path| {
            nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo")
        };
        for name in [META, MANIFEST, STATE, DISK] {
            let p = dest.join(name);
            let keep = tmp.path().join("keep");
            fs::rename(&p, &keep).expect("move aside");
            for (kind, make_it) in [
                ("fifo", &fifo as &dyn Fn(&Path)),
                ("symlink", &|p: &Path| {
                    symlink("/dev/zero", p).expect("symlink")
                }),
            ] {
                make_it(&p);
                // A hang here is the bug: run it on a thread with a bound.
                let d = dest.clone();
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let _ = tx.send(
                        verify(&d)
                            .map(|_| ())
                            .map_err(|e| (e.code(), e.to_string())),
                    );
                });
                let r = rx
                    .recv_timeout(std::time::Duration::from_secs(10))
                    .unwrap_or_else(|_| panic!("{name} as a {kind}: verify hung"));
                let (code, msg) = r.expect_err("must refuse");
                assert_eq!(
                    code,
                    ErrorCode::RestoreBundleInvalid,
                    "{name} as a {kind}: {msg}"
                );
                assert!(
                    msg.contains(name) || (name == MANIFEST && msg.contains("b.snap")),
                    "{name} as a {kind}: {msg}"
                );
                fs::remove_file(&p).expect("rm");
            }
            fs::rename(&keep, &p).expect("put back");
        }
        // Missing files are named.
        let man = read_manifest(&dest).expect("manifest");
        fs::rename(dest.join(DISK), tmp.path().join("disk")).expect("rm");
        let err = check_file_kinds(&dest, &man).expect_err("missing");
        assert!(
            matches!(err, BundleError::Missing { .. }) && err.to_string().contains(DISK),
            "{err}"
        );
        assert_eq!(err.code(), ErrorCode::RestoreBundleInvalid);
        fs::rename(tmp.path().join("disk"), dest.join(DISK)).expect("put back");
        // A file of the wrong size is refused before anything reads it.
        let f = fs::OpenOptions::new()
            .write(true)
            .open(dest.join(STATE))
            .expect("open");
        f.set_len(1).expect("truncate");
        let err = check_file_kinds(&dest, &man).expect_err("size");
        assert!(err.to_string().contains(STATE), "{err}");
    }

    #[test]
    fn newer_format_versions_are_refused_with_a_clear_message() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dest = make(tmp.path());
        let mpath = dest.join(MANIFEST);
        let mut m: serde_json::Value =
            serde_json::from_slice(&fs::read(&mpath).expect("read")).expect("json");
        m["version"] = (FORMAT_VERSION + 1).into();
        fs::write(&mpath, serde_json::to_vec(&m).expect("json")).expect("write");
        let err = verify(&dest).expect_err("newer format");
        assert!(
            matches!(err, BundleError::Version { found, .. } if found == FORMAT_VERSION + 1),
            "{err}"
        );
        assert_eq!(err.code(), ErrorCode::RestoreBundleInvalid);
        assert!(
            err.to_string()
                .contains(&format!("version {}", FORMAT_VERSION + 1)),
            "{err}"
        );
        assert!(err
            .hint()
            .is_some_and(|h| h.contains("machinen version that wrote it")));
    }

    #[test]
    fn missing_files_existing_destination_and_abandoned_builds() {
        let tmp = tempfile::tempdir().expect("tmp");
        assert!(matches!(
            verify(tmp.path()),
            Err(BundleError::NotABundle { .. })
        ));
        let dest = make(tmp.path());
        assert!(matches!(
            Builder::new(&dest),
            Err(BundleError::Exists { .. })
        ));
        fs::remove_file(dest.join(STATE)).expect("rm");
        let err = verify(&dest).expect_err("missing");
        assert!(err.to_string().contains(STATE), "{err}");
        let b = Builder::new(&tmp.path().join("other")).expect("builder");
        let t = b.tmp.clone();
        drop(b);
        assert!(!t.exists(), "abandoned temp dir removed");
    }

    fn sparse_digest_ignores_holes_and_zero_chunks_but_not_data<H: ChunkHasher>() {
        let tmp = tempfile::tempdir().expect("tmp");
        let sparse = tmp.path().join("sparse");
        let f = fs::File::create(&sparse).expect("create");
        f.set_len(8 << 20).expect("len");
        f.write_all_at(b"page", 3 << 20).expect("write");
        f.write_all_at(&[0u8; 4096], 5 << 20).expect("zeros");
        let dense = tmp.path().join("dense");
        let mut all = vec![0u8; 8 << 20];
        all[3 << 20..(3 << 20) + 4].copy_from_slice(b"page");
        fs::write(&dense, &all).expect("dense");
        let (len, a) = sparse_digest::<H>(&sparse).expect("sparse");
        let (_, b) = sparse_digest::<H>(&dense).expect("dense");
        assert_eq!(len, 8 << 20);
        assert_eq!(a, b, "a densified copy has the same digest");
        all[7 << 20] = 1;
        fs::write(&dense, &all).expect("dense");
        assert_ne!(sparse_digest::<H>(&dense).expect("changed").1, a);
        let copy = tmp.path().join("copy");
        sparse_copy(&sparse, &copy).expect("copy");
        assert_eq!(sparse_digest::<H>(&copy).expect("copy").1, a);
    }

    #[test]
    fn sparse_digests_ignore_holes_and_zero_chunks_but_not_data() {
        sparse_digest_ignores_holes_and_zero_chunks_but_not_data::<sha2::Sha256>();
        sparse_digest_ignores_holes_and_zero_chunks_but_not_data::<Blake3>();
    }

    /// A format 2 bundle (SHA-256 digests under the old `sha256` key) is
    /// still verified, and still refused when a byte changes.
    #[test]
    fn format_2_bundles_still_verify() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dest = tmp.path().join("v2.snap");
        let b = Builder::new(&dest).expect("builder");
        fs::write(b.path(STATE), b"devices").expect("state");
        fs::write(b.path(DISK), b"disk").expect("disk");
        let ram = fs::File::create(b.path(RAM)).expect("ram");
        ram.set_len(4 << 20).expect("len");
        ram.write_all_at(b"heap", 1 << 20).expect("write");
        let dest = b.finish(&meta()).expect("finish");
        let mut files = Vec::new();
        for name in [META, STATE, DISK, RAM] {
            let p = dest.join(name);
            let (size, sha) = if name == RAM {
                sparse_digest::<sha2::Sha256>(&p)
            } else {
                hash_file(&p)
            }
            .expect("hash");
            let mut e = serde_json::json!({"name": name, "size": size, "sha256": sha});
            if name == RAM {
                e["digest"] = "sha256-nonzero-64k".into();
            }
            files.push(e);
        }
        let m = serde_json::json!({"format": FORMAT_NAME, "version": 2, "files": files});
        fs::write(dest.join(MANIFEST), serde_json::to_vec(&m).expect("json")).expect("manifest");
        verify(&dest).expect("format 2 verifies");
        let f = fs::OpenOptions::new()
            .write(true)
            .open(dest.join(RAM))
            .expect("open");
        f.write_all_at(b"x", 3 << 20).expect("flip");
        let err = verify(&dest).expect_err("changed RAM");
        assert!(
            err.to_string().contains(RAM) && err.to_string().contains("sha256-nonzero-64k"),
            "{err}"
        );
    }

    #[test]
    fn sparse_copy_turns_zero_pages_into_holes_and_keeps_the_bytes() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().expect("tmp");
        let src = tmp.path().join("dense");
        // 64 pages of data with zero pages between, no holes in the source.
        let mut all = vec![0u8; 64 * PAGE + 100];
        for p in (0..64).step_by(3) {
            all[p * PAGE + 7] = p as u8 + 1;
        }
        *all.last_mut().expect("tail") = 9; // a partial last page with data
        fs::write(&src, &all).expect("write");
        let dst = tmp.path().join("copy");
        assert_eq!(sparse_copy(&src, &dst).expect("copy"), all.len() as u64);
        assert_eq!(fs::read(&dst).expect("read"), all, "same bytes");
        let data_pages = (0..64).step_by(3).count() as u64 + 1;
        let on_disk = fs::metadata(&dst).expect("meta").blocks() * 512;
        assert!(
            on_disk <= data_pages * PAGE as u64 + 64 * 1024,
            "zero pages left as holes: {on_disk} bytes on disk"
        );
        assert_eq!(
            sparse_digest::<Blake3>(&dst).expect("d").1,
            sparse_digest::<Blake3>(&src).expect("s").1
        );
    }

    #[test]
    fn scratch_bundles_carry_meta_but_never_verify() {
        let tmp = tempfile::tempdir().expect("tmp");
        let b = Builder::new(&tmp.path().join("s.snap")).expect("builder");
        fs::write(b.path(STATE), b"devices").expect("state");
        fs::write(b.path(DISK), b"disk").expect("disk");
        let dest = b.finish_scratch(&meta()).expect("finish");
        assert_eq!(read_meta(&dest).expect("meta"), meta());
        assert!(matches!(verify(&dest), Err(BundleError::NotABundle { .. })));
    }

    #[test]
    fn zero_check() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 13]));
        for i in 0..13 {
            let mut b = [0u8; 13];
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
        }
    }

    #[test]
    fn bundles_with_ram_verify_and_refuse_a_changed_ram_byte() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dest = tmp.path().join("r.snap");
        let b = Builder::new(&dest).expect("builder");
        fs::write(b.path(STATE), b"devices").expect("state");
        fs::write(b.path(DISK), b"disk").expect("disk");
        let ram = fs::File::create(b.path(RAM)).expect("ram");
        ram.set_len(16 << 20).expect("len");
        ram.write_all_at(b"heap", 9 << 20).expect("write");
        let dest = b.finish(&meta()).expect("finish");
        verify(&dest).expect("verify");
        let m: Manifest =
            serde_json::from_slice(&fs::read(dest.join(MANIFEST)).expect("m")).expect("json");
        assert_eq!(
            m.files
                .iter()
                .find(|f| f.name == RAM)
                .and_then(|f| f.digest.clone())
                .as_deref(),
            Some(Digest::Blake3Sparse.name())
        );
        assert_eq!(m.version, FORMAT_VERSION);
        let f = fs::OpenOptions::new()
            .write(true)
            .open(dest.join(RAM))
            .expect("open");
        f.write_all_at(b"x", 12 << 20).expect("flip");
        let err = verify(&dest).expect_err("changed RAM");
        assert!(err.to_string().contains(RAM), "{err}");
    }

    #[test]
    fn compatibility_checks() {
        let m = meta();
        check_compatible(&m, "amd64", "tcg", "max").expect("same");
        assert_eq!(
            check_compatible(&m, "arm64", "tcg", "max")
                .expect_err("arch")
                .code(),
            ErrorCode::RestoreBundleIncompatible
        );
        assert!(check_compatible(&m, "amd64", "kvm", "host").is_err());
    }
}

#[cfg(test)]
#[path = "bundle/deadline_tests.rs"]
mod deadline_tests;
#[cfg(test)]
#[path = "bundle/fuzz_tests.rs"]
mod fuzz_tests;
