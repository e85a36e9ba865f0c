//! Copy-once mounts: host directories copied into the VM at boot
//! (`boot --mount HOST_DIR:GUEST_PATH`).
//!
//! All of a VM's copy-once mounts share one disk:
//!
//! ```text
//! <cache>/mounts/<sha256>.ext4   the lower: an ext4 image holding each host
//!                                tree under /0, /1, … (read-only, cached by
//!                                the sha256 of the tar stream of the trees)
//! <vm>/mounts.qcow2              the VM's writable layer over the lower,
//!                                larger than it by the upper size
//! ```
//!
//! The guest agent mounts the disk (found by its serial, [`DISK_SERIAL`]),
//! grows its filesystem to fill the layer, bind-mounts `/N` at each guest
//! path and unmounts the disk's own mount point. Guest writes land in the
//! VM's layer: the host tree and the cached lower never change, and a change
//! on the host after the boot never reaches the VM. The layer is
//! copy-on-write at the block level like the root disk, so snapshots carry
//! it as a delta, restores and forks copy it, and a fork's writes stay its
//! own.
//!
//! The trees are read once into a tar stream with every file owned by root
//! (a repository owned by another uid makes the guest's `git` refuse it),
//! keeping modes, modification times and symlinks as they are (a symlink is
//! never followed, so nothing outside HOST_DIR is copied). Sockets, FIFOs
//! and device nodes are left out; hard links become separate files.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::assets::fsutil;
use crate::error::{fail, Coded, ErrorCode, Failure};
use crate::image::{self, cache_io, ImageError};
use crate::paths::Paths;
use crate::progress::ProgressMode;

/// Serial of the mounts disk (virtio-blk), by which the agent finds it.
pub const DISK_SERIAL: &str = machinen_proto::MOUNTS_DISK_SERIAL;
/// Label of the lower's filesystem.
pub const LABEL: &str = "machinen-mounts";
/// The VM's layer in its registry directory.
pub const LAYER: &str = "mounts.qcow2";
/// Copy-once mounts per VM. They share one disk; the limit keeps the guest
/// kernel's command line (which names the guest paths) within its 2 KiB.
pub const MAX_MOUNTS: usize = 8;
/// Longest guest path (bytes).
pub const MAX_GUEST_PATH: usize = 128;
/// Room for the guest's writes when `--mount-upper-size` is not given.
/// Sparse: unused room costs the host nothing.
pub const DEFAULT_UPPER_SIZE: u64 = 1 << 30;
/// Largest `--mount-upper-size` (catches a size given in the wrong unit).
pub const MAX_UPPER_SIZE: u64 = 16 << 40;

/// Why a copy-once mount's lower could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot read {path} in the mount source {dir}")]
    Unreadable {
        path: PathBuf,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
}

impl Coded for MountError {
    fn code(&self) -> ErrorCode {
        match self {
            MountError::Unreadable { .. } => ErrorCode::BootMountInvalid,
            MountError::Image(e) => e.code(),
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            MountError::Unreadable { .. } => {
                Some("make it readable to you, or mount a directory that does not hold it".into())
            }
            MountError::Image(e) => e.hint(),
        }
    }
}

/// One copy-once mount as asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// The host directory (absolute once checked).
    pub host: PathBuf,
    /// Where the guest sees it.
    pub guest: String,
}

impl std::str::FromStr for Mount {
    type Err = Failure;

    /// `HOST_DIR:GUEST_PATH`, split at the last `:` (a host path may hold
    /// colons; a guest path may not).
    fn from_str(s: &str) -> Result<Mount, Failure> {
        let bad = || {
            fail(
                ErrorCode::BootMountInvalid,
                format!("mount {s:?} is not HOST_DIR:GUEST_PATH"),
            )
            .hint("e.g. --mount ./src:/work/src (the guest path is absolute)")
        };
        let (host, guest) = s.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || guest.is_empty() {
            return Err(bad());
        }
        Ok(Mount {
            host: PathBuf::from(host),
            guest: guest.to_string(),
        })
    }
}

/// Top-level directories of the guest's system: a mount there would hide
/// what the guest needs to run.
const SYSTEM_DIRS: &[&str] = &[
    "bin", "boot", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "run", "sbin", "sys",
    "usr", "var",
];
/// Trees that belong to the kernel and the agent: nothing is mounted
/// anywhere below them.
const KERNEL_TREES: &[&str] = &["dev", "proc", "run", "sys"];

/// Check a guest mount path: absolute, normalised, of plain characters
/// (the kernel command line carries it), and not over the guest's system.
pub fn validate_guest_path(p: &str) -> Result<(), Failure> {
    let bad = |why: &str| {
        fail(
            ErrorCode::MountPathInvalid,
            format!("guest mount path {p:?} {why}"),
        )
        .hint("use an absolute path of its own, e.g. /work/src or /mnt/data")
    };
    if !p.starts_with('/') {
        return Err(bad("is not absolute"));
    }
    if p.len() > MAX_GUEST_PATH {
        return Err(bad(&format!("is longer than {MAX_GUEST_PATH} bytes")));
    }
    if let Some(c) = p
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "/._-+@".contains(*c)))
    {
        return Err(bad(&format!(
            "holds {c:?} (letters, digits and / . _ - + @ only)"
        )));
    }
    let parts: Vec<&str> = p[1..].split('/').collect();
    if p == "/"
        || parts
            .iter()
            .any(|c| c.is_empty() || *c == "." || *c == "..")
    {
        return Err(bad("is not a normalised path below /"));
    }
    if parts.len() == 1 && SYSTEM_DIRS.contains(&parts[0]) {
        return Err(bad("would hide a directory the guest's system needs"));
    }
    if KERNEL_TREES.contains(&parts[0]) {
        return Err(bad(&format!(
            "is under /{}, which is the kernel's",
            parts[0]
        )));
    }
    Ok(())
}

/// Check `mounts` and make their host paths absolute: each host directory
/// exists, each guest path is valid, no guest path is another's or below it.
pub fn check(mounts: &[Mount]) -> Result<Vec<Mount>, Failure> {
    if mounts.len() > MAX_MOUNTS {
        return Err(fail(
            ErrorCode::BootMountInvalid,
            format!(
                "{} copy-once mounts asked for; a VM has at most {MAX_MOUNTS}",
                mounts.len()
            ),
        )
        .hint("mount a common parent directory instead"));
    }
    let mut out: Vec<Mount> = Vec::with_capacity(mounts.len());
    for m in mounts {
        validate_guest_path(&m.guest)?;
        let host = host_dir(&m.host, "mount source", "")?;
        for other in &out {
            if nested(&other.guest, &m.guest) || nested(&m.guest, &other.guest) {
                return Err(fail(
                    ErrorCode::BootMountInvalid,
                    format!("guest mount paths {} and {} overlap", other.guest, m.guest),
                )
                .hint("give each mount a guest path of its own, none inside another"));
            }
        }
        out.push(Mount {
            host,
            guest: m.guest.clone(),
        });
    }
    Ok(out)
}

/// `host` made absolute, checked to be an existing directory
/// (`BOOT_MOUNT_HOST_NOT_FOUND` naming it, or `BOOT_MOUNT_INVALID` for
/// something else); `what` and `note` go before and after it in the
/// message.
pub(crate) fn host_dir(host: &Path, what: &str, note: &str) -> Result<PathBuf, Failure> {
    match fs::metadata(host) {
        Ok(md) if md.is_dir() => fs::canonicalize(host).map_err(|e| {
            fail(
                ErrorCode::BootMountHostNotFound,
                format!("cannot resolve {what} {}", host.display()),
            )
            .source(e)
        }),
        Ok(_) => Err(fail(
            ErrorCode::BootMountInvalid,
            format!("{what} {}{note} is not a directory", host.display()),
        )
        .hint("give the directory that holds it")),
        Err(e) => Err(fail(
            ErrorCode::BootMountHostNotFound,
            format!("{what} {}{note} not found", host.display()),
        )
        .hint("give an existing host directory (relative paths are from the current directory)")
        .source(e)),
    }
}

/// Whether guest path `inner` is `outer` or below it.
pub(crate) fn nested(outer: &str, inner: &str) -> bool {
    inner == outer
        || inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Check an upper size (`--mount-upper-size`).
pub fn check_upper_size(size: u64) -> Result<u64, Failure> {
    if size > MAX_UPPER_SIZE {
        return Err(fail(
            ErrorCode::BootMountInvalid,
            format!(
                "mount upper size {size} is more than {} TiB",
                MAX_UPPER_SIZE >> 40
            ),
        )
        .hint("give the size with a unit, e.g. --mount-upper-size 2G"));
    }
    Ok(size)
}

/// The copy-once mounts of a VM as its supervisor and bundles see them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountsDisk {
    /// The mounts, in disk order: mount `i` is the lower's `/i`.
    pub mounts: Vec<Mount>,
    /// The cached lower image.
    pub lower: PathBuf,
    /// Its cache key: sha256 of the trees' tar stream.
    pub lower_sha256: String,
    /// The VM's layer over it.
    pub layer: PathBuf,
}

/// The cached lower image of `mounts` (checked by [`check`]), built when
/// the cache does not have it. Blocking.
pub fn ensure_lower(
    paths: &Paths,
    mounts: &[Mount],
    progress: ProgressMode,
) -> Result<image::CachedImage, MountError> {
    let dir = cache_dir(paths);
    fsutil::create_private_dir_all(&dir).map_err(cache_io("create", &dir))?;
    let what = mounts
        .iter()
        .map(|m| m.host.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let step = progress.step(format!("Reading {what}"));
    let tar = tempfile::Builder::new()
        .prefix(".tree-")
        .suffix(".tar")
        .tempfile_in(&dir)
        .map_err(cache_io("create a scratch file in", &dir))?;
    let sha256 = write_tar(mounts, tar.as_file())?;
    let dest = dir.join(format!("{sha256}.ext4"));
    if let Some(img) = image::cached(&dest, &sha256)? {
        step.done(format!("{what}: unchanged since last copied"));
        return Ok(img);
    }
    let lock_path = dir.join(format!("{sha256}.lock"));
    let _lock = fsutil::lock_exclusive(&lock_path).map_err(cache_io("lock", &lock_path))?;
    if let Some(img) = image::cached(&dest, &sha256)? {
        step.done(format!("{what}: unchanged since last copied"));
        return Ok(img);
    }
    image::remove_abandoned_builds(&dir, &sha256);
    step.message(format!("Copying {what} into an image"));
    let layout = image::Layout {
        label: LABEL,
        tight: true,
    };
    let size = image::build_image(tar.path(), &dir, &dest, &sha256, &layout)?;
    step.done(format!("Copied {what} ({} MiB image)", size >> 20));
    Ok(image::CachedImage {
        path: dest,
        sha256,
        size,
        built: true,
    })
}

/// The lower of a bundle's copy-once mounts on this host: the cached copy
/// when this host has one, else the bundle's, checked against the bundle's
/// manifest and then copied into the cache (the cache is never handed a
/// file it has not checked, and never shares an inode with a bundle a user
/// may change). Blocking.
pub fn lower_from_bundle(
    paths: &Paths,
    bundle_dir: &Path,
    mounts: &crate::bundle::BundleMounts,
) -> crate::Result<PathBuf> {
    use crate::bundle::{self, BundleError};
    let sha = &mounts.lower_sha256;
    // From meta.json, so from the bundle's author: it names a cache file.
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(BundleError::Corrupt {
            file: bundle_dir.join(bundle::META),
            detail: format!("mounts.lower_sha256 {sha:?} is not a sha256"),
        }
        .into());
    }
    let dir = cache_dir(paths);
    fsutil::create_private_dir_all(&dir).map_err(cache_io("create", &dir))?;
    let dest = dir.join(format!("{sha}.ext4"));
    if dest.is_file() {
        return Ok(dest);
    }
    let src = bundle_dir.join(bundle::MOUNTS_LOWER);
    if !src.is_file() {
        return Err(BundleError::Missing { file: src }.into());
    }
    let manifest = bundle::read_manifest(bundle_dir)?;
    bundle::verify_files(bundle_dir, &manifest, &[bundle::MOUNTS_LOWER])?;
    let lock_path = dir.join(format!("{sha}.lock"));
    let _lock = fsutil::lock_exclusive(&lock_path).map_err(cache_io("lock", &lock_path))?;
    if dest.is_file() {
        return Ok(dest);
    }
    let tmp = fsutil::temp_sibling(&dest, "tmp");
    let copied = bundle::sparse_copy(&src, &tmp)
        .map_err(crate::Error::from)
        .and_then(|_| {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o400))
                .and_then(|()| fsutil::persist(&tmp, &dest))
                .map_err(|e| cache_io("store", &dest)(e).into())
        });
    if let Err(e) = copied {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(dest)
}

/// Where lowers are cached.
pub fn cache_dir(paths: &Paths) -> PathBuf {
    paths.cache.join("mounts")
}

/// Writes through to `inner` and hashes what passes.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads exactly `left` bytes of a file or fails: a file that shrinks while
/// it is copied would otherwise leave a tar entry shorter than its header.
struct Exact<R> {
    inner: R,
    left: u64,
    path: PathBuf,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let max = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while it was copied", self.path.display()),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Write the tar stream of `mounts` (mount `i` under `i/`) to `out`;
/// returns its sha256.
fn write_tar(mounts: &[Mount], out: &fs::File) -> Result<String, MountError> {
    use std::os::unix::fs::MetadataExt;
    let none = machinen_proto::exclude::Excludes::default();
    let mut b = tar::Builder::new(Hashing {
        inner: io::BufWriter::with_capacity(1 << 20, out),
        hash: Sha256::new(),
    });
    let header = |kind: tar::EntryType, md: &fs::Metadata, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(md.mode() & 0o7777);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(md.mtime().max(0) as u64);
        h.set_size(size);
        h
    };
    for (i, m) in mounts.iter().enumerate() {
        let read_err = |path: &Path| {
            let (path, dir) = (path.to_path_buf(), m.host.clone());
            move |source: io::Error| MountError::Unreadable { path, dir, source }
        };
        let tree = machinen_proto::tree::walk(&m.host, &none).map_err(read_err(&m.host))?;
        let root_md = fs::metadata(&m.host).map_err(read_err(&m.host))?;
        let top = PathBuf::from(i.to_string());
        let mut h = header(tar::EntryType::Directory, &root_md, 0);
        b.append_data(&mut h, &top, io::empty())
            .map_err(write_err)?;
        for e in &tree.entries {
            let name = top.join(&e.rel);
            let md = match fs::symlink_metadata(&e.full) {
                Ok(md) => md,
                // Removed since the walk: as if it had never been there.
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(read_err(&e.full)(err)),
            };
            match e.kind {
                machinen_proto::tree::Kind::Dir if md.is_dir() => {
                    let mut h = header(tar::EntryType::Directory, &md, 0);
                    b.append_data(&mut h, &name, io::empty())
                        .map_err(write_err)?;
                }
                machinen_proto::tree::Kind::File if md.is_file() => {
                    let f = fs::File::open(&e.full).map_err(read_err(&e.full))?;
                    let size = f.metadata().map_err(read_err(&e.full))?.len();
                    let mut h = header(tar::EntryType::Regular, &md, size);
                    let data = Exact {
                        inner: f,
                        left: size,
                        path: e.full.clone(),
                    };
                    b.append_data(&mut h, &name, data).map_err(|err| {
                        if err.kind() == io::ErrorKind::UnexpectedEof {
                            read_err(&e.full)(err)
                        } else {
                            write_err(err).into()
                        }
                    })?;
                }
                machinen_proto::tree::Kind::Symlink if md.is_symlink() => {
                    let target = fs::read_link(&e.full).map_err(read_err(&e.full))?;
                    let mut h = header(tar::EntryType::Symlink, &md, 0);
                    b.append_link(&mut h, &name, &target).map_err(write_err)?;
                }
                // Changed kind since the walk: left out, like a vanished entry.
                _ => continue,
            }
        }
    }
    let mut w = b.into_inner().map_err(write_err)?;
    w.flush().map_err(write_err)?;
    Ok(hex(&w.hash.finalize()))
}

fn write_err(source: io::Error) -> ImageError {
    ImageError::CacheIo {
        action: "write the copy of the trees to",
        path: PathBuf::from("machinen's cache"),
        source,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The kernel command line's words naming the mounts: `machinen.mount=I:PATH`.
pub fn cmdline_words(mounts: &[Mount]) -> Vec<String> {
    mounts
        .iter()
        .enumerate()
        .map(|(i, m)| format!("machinen.mount={i}:{}", m.guest))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_and_guest_at_the_last_colon() {
        let m: Mount = "/a:b/c:/work/src".parse().expect("parse");
        assert_eq!(m.host, PathBuf::from("/a:b/c"));
        assert_eq!(m.guest, "/work/src");
        for bad in ["", "/a", ":/x", "/a:", "nocolon"] {
            let e = bad.parse::<Mount>().expect_err(bad);
            assert_eq!(e.code, ErrorCode::BootMountInvalid, "{bad}");
        }
    }

    #[test]
    fn guest_paths() {
        for ok in [
            "/work",
            "/work/src",
            "/mnt/data",
            "/usr/src/app",
            "/srv/a-b_c.d+e@f",
        ] {
            validate_guest_path(ok).expect(ok);
        }
        for bad in [
            "work",
            "/",
            "/work/",
            "/work//src",
            "/work/../etc",
            "/work/./x",
            "/etc",
            "/usr",
            "/proc/x",
            "/dev",
            "/sys/fs/x",
            "/run/x",
            "/work src",
            "/work\n",
            "/wörk",
        ] {
            let e = validate_guest_path(bad).expect_err(bad);
            assert_eq!(e.code, ErrorCode::MountPathInvalid, "{bad:?}");
        }
        let long = format!("/{}", "a".repeat(MAX_GUEST_PATH));
        assert!(validate_guest_path(&long).is_err());
    }

    #[test]
    fn check_resolves_hosts_and_refuses_overlaps_and_missing_dirs() {
        let d = tempfile::tempdir().expect("tmp");
        let a = d.path().join("a");
        fs::create_dir(&a).expect("a");
        fs::write(d.path().join("f"), b"x").expect("f");
        let m = |h: &Path, g: &str| Mount {
            host: h.to_path_buf(),
            guest: g.into(),
        };
        let ok = check(&[m(&a, "/x"), m(&a, "/y")]).expect("ok");
        assert!(ok[0].host.is_absolute());
        for (mounts, code) in [
            (
                vec![m(&a, "/x"), m(&a, "/x/y")],
                ErrorCode::BootMountInvalid,
            ),
            (vec![m(&a, "/x"), m(&a, "/x")], ErrorCode::BootMountInvalid),
            (
                vec![m(&d.path().join("f"), "/x")],
                ErrorCode::BootMountInvalid,
            ),
            (
                vec![m(&d.path().join("nope"), "/x")],
                ErrorCode::BootMountHostNotFound,
            ),
            (vec![m(&a, "x")], ErrorCode::MountPathInvalid),
        ] {
            assert_eq!(check(&mounts).expect_err("refused").code, code);
        }
        // /x and /xy do not overlap.
        check(&[m(&a, "/x"), m(&a, "/xy")]).expect("siblings");
        let many: Vec<Mount> = (0..=MAX_MOUNTS).map(|i| m(&a, &format!("/m{i}"))).collect();
        assert_eq!(
            check(&many).expect_err("too many").code,
            ErrorCode::BootMountInvalid
        );
    }

    #[test]
    fn tar_stream_is_root_owned_keeps_links_and_hashes_stably() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tmp");
        let src = d.path().join("src");
        fs::create_dir_all(src.join("sub")).expect("dirs");
        fs::write(src.join("a.txt"), b"hello").expect("a");
        fs::write(src.join("sub/run.sh"), b"#!/bin/sh\n").expect("run");
        fs::set_permissions(src.join("sub/run.sh"), fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::os::unix::fs::symlink("/etc/passwd", src.join("escape")).expect("link");
        let mounts = [Mount {
            host: src.clone(),
            guest: "/w".into(),
        }];
        let out = d.path().join("t.tar");
        let h1 = write_tar(&mounts, &fs::File::create(&out).expect("out")).expect("tar");
        let mut names = Vec::new();
        let mut ar = tar::Archive::new(fs::File::open(&out).expect("open"));
        for e in ar.entries().expect("entries") {
            let e = e.expect("entry");
            let h = e.header();
            assert_eq!((h.uid().expect("uid"), h.gid().expect("gid")), (0, 0));
            let name = e.path().expect("path").display().to_string();
            if name == "0/escape" {
                assert_eq!(
                    e.link_name().expect("link").expect("target"),
                    Path::new("/etc/passwd")
                );
            }
            if name == "0/sub/run.sh" {
                assert_eq!(h.mode().expect("mode"), 0o755);
            }
            names.push(name);
        }
        assert_eq!(names, ["0", "0/a.txt", "0/escape", "0/sub", "0/sub/run.sh"]);
        let h2 = write_tar(&mounts, &fs::File::create(&out).expect("out")).expect("tar");
        assert_eq!(h1, h2, "the same tree hashes the same");
        fs::write(src.join("a.txt"), b"hellO").expect("edit");
        let h3 = write_tar(&mounts, &fs::File::create(&out).expect("out")).expect("tar");
        assert_ne!(h1, h3, "an edit changes the key");
    }

    #[test]
    fn a_file_that_shrinks_while_copied_is_an_error_not_a_short_entry() {
        let mut r = Exact {
            inner: &b"abc"[..],
            left: 5,
            path: "/h/f".into(),
        };
        let mut out = Vec::new();
        let e = io::copy(&mut r, &mut out).expect_err("short");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("/h/f"));
        let mut r = Exact {
            inner: &b"abcdef"[..],
            left: 4,
            path: "/h/g".into(),
        };
        out.clear();
        io::copy(&mut r, &mut out).expect("grown: the first 4 bytes");
        assert_eq!(out, b"abcd");
    }

    #[test]
    fn cmdline_names_each_mount_by_index() {
        let m = |g: &str| Mount {
            host: "/h".into(),
            guest: g.into(),
        };
        assert_eq!(
            cmdline_words(&[m("/a"), m("/b/c")]),
            ["machinen.mount=0:/a", "machinen.mount=1:/b/c"]
        );
    }
}
