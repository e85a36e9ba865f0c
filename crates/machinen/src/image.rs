//! Rootfs images: a tarball becomes an ext4 image once, cached by content
//! hash; each VM gets its own copy-on-write qcow2 overlay on top.
//!
//! ```text
//! <cache>/images/<sha256>.ext4        raw ext4, read-only (0444), never written by VMs
//! <cache>/images/<sha256>.lock        flock held while that image is built
//! <cache>/images/hashes/<key>.json    (path, dev, inode, size, mtime, ctime) → sha256
//! ```
//!
//! The tarball is unpacked with the `tar` tool and the image made with
//! `mkfs.ext4 -d`, both under one `fakeroot` session when not root, so file
//! ownership, modes, device nodes and xattrs survive without privileges.

mod hashindex;

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::assets::fsutil;
use crate::assets::tool::{self, Tool, ToolError};
use crate::error::{Coded, ErrorCode};
use crate::paths::Paths;
use crate::progress::ProgressMode;

/// Filesystem label of every image (handy in the guest: `LABEL=machinen-root`).
pub const ROOT_LABEL: &str = "machinen-root";

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, Serialize)]
pub struct CachedImage {
    /// The cached raw ext4 image (never written by VMs).
    pub path: PathBuf,
    /// sha256 of the source tarball.
    pub sha256: String,
    /// Apparent size of the ext4 image.
    pub size: u64,
    /// True when this call converted the tarball (false: cache hit).
    pub built: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {path} not found")]
    NotFound { path: PathBuf },
    #[error("cannot read image {path}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {path} is not a rootfs tarball: {reason}")]
    NotATarball { path: PathBuf, reason: String },
    #[error("image {path} is an empty tarball")]
    Empty { path: PathBuf },
    #[error("image {path} is damaged")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: ToolError,
    },
    #[error("`{tool}` is not installed")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    #[error("could not {step} for {path}")]
    BuildFailed {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: ToolError,
    },
    #[error("could not {action} {path}")]
    CacheIo {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not create the overlay {overlay}")]
    OverlayFailed {
        overlay: PathBuf,
        #[source]
        source: ToolError,
    },
    #[error("guest agent {path} cannot be read")]
    AgentUnreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("kernel modules of {kernel_version} cannot be read at {path}")]
    ModulesUnreadable {
        kernel_version: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "kernel {kernel_version} has no `{module}` module, which the guest cannot boot without"
    )]
    RequiredModuleMissing {
        kernel_version: String,
        module: String,
    },
    #[error("could not {action} {path} for the initramfs")]
    InitramfsIo {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Coded for ImageError {
    fn code(&self) -> ErrorCode {
        use ImageError::*;
        match self {
            NotFound { .. }
            | Unreadable { .. }
            | NotATarball { .. }
            | Empty { .. }
            | Corrupt { .. } => ErrorCode::BootImageInvalid,
            ToolMissing { .. } => ErrorCode::InstallToolMissing,
            BuildFailed { .. } | CacheIo { .. } | OverlayFailed { .. } => {
                ErrorCode::CacheImageBuildFailed
            }
            AgentUnreadable { .. }
            | ModulesUnreadable { .. }
            | RequiredModuleMissing { .. }
            | InitramfsIo { .. } => ErrorCode::CacheInitramfsBuildFailed,
        }
    }

    fn hint(&self) -> Option<String> {
        use ImageError::*;
        Some(match self {
            NotFound { .. } | NotATarball { .. } | Empty { .. } => {
                "pass a rootfs tarball (.tar or .tar.gz), e.g. one written by `machinen provision`".into()
            }
            Unreadable { .. } => "check that the file exists and that you may read it".into(),
            Corrupt { .. } => "the tarball is truncated or damaged; rebuild or copy it again".into(),
            ToolMissing { package, .. } => format!("install it: `apt-get install {package}`"),
            BuildFailed { .. } | CacheIo { .. } => {
                "check free space and permissions in machinen's cache directory (MACHINEN_CACHE_DIR overrides it)"
                    .into()
            }
            OverlayFailed { .. } => "check free space and permissions where the VM's disk is written".into(),
            AgentUnreadable { .. } => "build the guest agent (a static binary for the guest architecture)".into(),
            ModulesUnreadable { .. } | RequiredModuleMissing { .. } => {
                "run `machinen install --force` to fetch the kernel and its modules again".into()
            }
            InitramfsIo { .. } => {
                "check free space and permissions in machinen's cache directory (MACHINEN_CACHE_DIR overrides it)"
                    .into()
            }
        })
    }
}

fn need(t: Tool) -> Result<PathBuf, ImageError> {
    t.find().ok_or(ImageError::ToolMissing {
        tool: t.name,
        package: t.package,
    })
}

pub(crate) fn cache_io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.to_path_buf();
    move |source| ImageError::CacheIo {
        action,
        path,
        source,
    }
}

/// What the first bytes of a file say about it being a tarball.
#[derive(Debug, PartialEq, Eq)]
enum TarKind {
    Plain,
    Gzip,
}

/// Check that `path` is a non-empty plain or gzip-compressed tar archive by
/// looking at its first header block (cheap: the whole archive is read by
/// `tar` later anyway).
fn validate_tarball(path: &Path) -> Result<TarKind, ImageError> {
    let not_tar = |reason: &str| ImageError::NotATarball {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ImageError::NotFound { path: path.into() })
        }
        Err(source) => {
            return Err(ImageError::Unreadable {
                path: path.into(),
                source,
            })
        }
    };
    if !meta.is_file() {
        return Err(not_tar("not a regular file"));
    }
    if meta.len() == 0 {
        return Err(ImageError::Empty { path: path.into() });
    }
    let unreadable = |source| ImageError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::File::open(path).map_err(unreadable)?;
    let mut magic = [0u8; 6];
    let n = read_full(&mut f, &mut magic).map_err(unreadable)?;
    let f = fs::File::open(path).map_err(unreadable)?;
    let (kind, mut reader): (TarKind, Box<dyn Read>) = match &magic[..n] {
        [0x1f, 0x8b, ..] => (TarKind::Gzip, Box::new(flate2::read::GzDecoder::new(f))),
        [0xfd, b'7', b'z', b'X', b'Z', 0x00] => {
            return Err(not_tar("xz-compressed; use .tar or .tar.gz"))
        }
        [0x28, 0xb5, 0x2f, 0xfd, ..] => {
            return Err(not_tar("zstd-compressed; use .tar or .tar.gz"))
        }
        [b'B', b'Z', b'h', ..] => return Err(not_tar("bzip2-compressed; use .tar or .tar.gz")),
        _ => (TarKind::Plain, Box::new(f)),
    };
    let mut block = [0u8; 512];
    let n = match read_full(&mut reader, &mut block) {
        Ok(n) => n,
        Err(_) if kind == TarKind::Gzip => return Err(not_tar("gzip data is damaged")),
        Err(source) => return Err(unreadable(source)),
    };
    if n == 0 && kind == TarKind::Gzip {
        return Err(ImageError::Empty { path: path.into() });
    }
    if n < 512 {
        return Err(not_tar("shorter than one tar header"));
    }
    if block.iter().all(|b| *b == 0) {
        return Err(ImageError::Empty { path: path.into() });
    }
    if &block[257..262] != b"ustar" && !tar_checksum_ok(&block) {
        return Err(not_tar("no tar header at the start"));
    }
    Ok(kind)
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Old (v7) tar headers have no magic; their checksum still identifies them.
fn tar_checksum_ok(block: &[u8; 512]) -> bool {
    let field = String::from_utf8_lossy(&block[148..156]);
    let Ok(want) = u32::from_str_radix(field.trim_matches(|c: char| c == '\0' || c == ' '), 8)
    else {
        return false;
    };
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(*b)
            }
        })
        .sum();
    sum == want
}

/// tar's complaints that mean the archive itself is bad, not the host.
fn tar_says_corrupt(stderr: &str) -> bool {
    [
        "Unexpected EOF",
        "unexpected end of file",
        "does not look like a tar archive",
        "invalid compressed data",
        "crc error",
        "Skipping to next header",
        "Damaged tar archive",
        "not in gzip format",
    ]
    .iter()
    .any(|s| stderr.contains(s))
}

/// Size of the image for `content` bytes of files: room for the guest to
/// write into (2× content + 1 GiB, at least 2 GiB), rounded to MiB. The file
/// is sparse, so unused room costs nothing on the host.
fn image_size(content: u64) -> u64 {
    // Capped far above any real image so the rounding cannot overflow.
    let size = content
        .saturating_mul(2)
        .saturating_add(GIB)
        .clamp(2 * GIB, 1 << 50);
    size.div_ceil(MIB) * MIB
}

/// Bytes the unpacked tree uses (whole 4 KiB blocks per file, plus an inode
/// each) and the number of inodes it needs.
fn tree_usage(root: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir)? {
            let e = e?;
            let m = e.metadata()?;
            inodes += 1;
            bytes += m.size().div_ceil(4096) * 4096 + 256;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, inodes + 1))
}

/// Convert `tarball` into a cached ext4 image (once per content hash).
pub fn ensure_rootfs_image(
    paths: &Paths,
    tarball: &Path,
    progress: ProgressMode,
) -> Result<CachedImage, ImageError> {
    validate_tarball(tarball)?;
    let images = paths.cache.join("images");
    // Private: an image built from the user's tarball may hold their data.
    fsutil::create_private_dir_all(&images).map_err(cache_io("create", &images))?;

    let sha256 = hashindex::content_sha256(&images.join("hashes"), tarball, progress)?;
    let dest = images.join(format!("{sha256}.ext4"));
    if let Some(img) = cached(&dest, &sha256)? {
        return Ok(img);
    }

    // Two boots of the same new image: the second waits here and then finds
    // the first one's result.
    let lock_path = images.join(format!("{sha256}.lock"));
    let _lock = fsutil::lock_exclusive(&lock_path).map_err(cache_io("lock", &lock_path))?;
    if let Some(img) = cached(&dest, &sha256)? {
        return Ok(img);
    }
    remove_abandoned_builds(&images, &sha256);
    let step = progress.step(format!("Converting {} to an ext4 image", tarball.display()));
    let size = build_image(tarball, &images, &dest, &sha256, &Layout::ROOTFS)?;
    step.done(format!(
        "Converted {} to an ext4 image ({} MiB, sparse)",
        tarball.display(),
        size / MIB
    ));
    Ok(CachedImage {
        path: dest,
        sha256,
        size,
        built: true,
    })
}

/// Check that `tarball` is a rootfs tarball and return its content sha256
/// (remembered in the hash index, like [`ensure_rootfs_image`] does).
pub fn tarball_sha256(
    paths: &Paths,
    tarball: &Path,
    progress: ProgressMode,
) -> Result<String, ImageError> {
    validate_tarball(tarball)?;
    hashindex::content_sha256(
        &paths.cache.join("images").join("hashes"),
        tarball,
        progress,
    )
}

pub(crate) fn cached(dest: &Path, sha256: &str) -> Result<Option<CachedImage>, ImageError> {
    match fs::metadata(dest) {
        Ok(m) => {
            // Its modification time says when it was last used: `images
            // prune` spares what a boot under way is about to use.
            let _ = fs::File::open(dest).and_then(|f| f.set_modified(std::time::SystemTime::now()));
            Ok(Some(CachedImage {
                path: dest.to_path_buf(),
                sha256: sha256.to_string(),
                size: m.len(),
                built: false,
            }))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(cache_io("read", dest)(e)),
    }
}

/// Remove the cached ext4 images (`<cache>/images/<sha256>.ext4`) that no
/// VM in `in_use` boots from and that were not used within `grace` (a boot
/// under way has just touched its image). A later boot or restore of the
/// same tarball converts it again. Returns the disk space freed.
pub fn prune_unused(
    paths: &Paths,
    in_use: &std::collections::BTreeSet<PathBuf>,
    grace: std::time::Duration,
) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let images = paths.cache.join("images");
    let mut freed = 0;
    for e in fs::read_dir(&images).into_iter().flatten().flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(sha) = name.strip_suffix(".ext4") else {
            continue;
        };
        if sha.len() != 64 || in_use.contains(&path) {
            continue;
        }
        let Ok(m) = e.metadata() else { continue };
        let recent = m
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age < grace);
        if recent {
            continue;
        }
        // Not while a conversion of the same content holds its lock.
        let lock_path = images.join(format!("{sha}.lock"));
        let Ok(Some(_lock)) = fsutil::try_lock_exclusive(&lock_path) else {
            continue;
        };
        if fs::remove_file(&path).is_ok() {
            freed += m.blocks() * 512;
        }
    }
    freed
}

/// What an ext4 image built from a tarball looks like.
pub(crate) struct Layout {
    /// The filesystem's label.
    pub label: &'static str,
    /// Room beyond the tree: `None` leaves the root disk's generous room
    /// ([`image_size`]); `Some` makes the filesystem just hold the tree
    /// (with ext4's own overhead), so that the guest's room is what the
    /// caller adds by growing the disk.
    pub tight: bool,
}

impl Layout {
    pub const ROOTFS: Layout = Layout {
        label: ROOT_LABEL,
        tight: false,
    };
}

/// Size of a filesystem that just holds `content` bytes (as [`tree_usage`]
/// counts them): ext4's metadata (inode tables, bitmaps, a journal of up to
/// 32 MiB at these sizes) on top, rounded to MiB. `attempt` doubles the
/// margin when mkfs found the previous size too small.
fn tight_size(content: u64, attempt: u32) -> u64 {
    let margin = (content / 8 + 40 * MIB).saturating_mul(1 << attempt);
    let size = content.saturating_add(margin).min(1 << 50);
    size.div_ceil(MIB) * MIB
}

/// Unpack and mkfs in a scratch directory next to `dest`, then rename the
/// finished image into place. Returns the image size.
pub(crate) fn build_image(
    tarball: &Path,
    images: &Path,
    dest: &Path,
    sha256: &str,
    layout: &Layout,
) -> Result<u64, ImageError> {
    let tar = need(tool::TAR)?;
    let mkfs = need(tool::MKFS_EXT4)?;
    // As root the tools can set ownership themselves; otherwise fakeroot
    // records it in a state file shared by the unpack and the mkfs.
    let fakeroot = if tool::is_root() {
        None
    } else {
        Some(need(tool::FAKEROOT)?)
    };

    let work = tempfile::Builder::new()
        .prefix(&build_prefix(sha256))
        .tempdir_in(images)
        .map_err(cache_io("create a scratch directory in", images))?;
    let root = work.path().join("root");
    fs::create_dir(&root).map_err(cache_io("create", &root))?;
    let state = work.path().join("fakeroot.state");
    let wrapped = |program: &Path, save: bool| -> Command {
        match &fakeroot {
            None => tool::command(program),
            Some(fr) => {
                let mut c = tool::command(fr);
                if save {
                    c.arg("-s").arg(&state);
                } else {
                    c.arg("-i").arg(&state).arg("-s").arg(&state);
                }
                c.arg("--").arg(program);
                c
            }
        }
    };

    let mut untar = wrapped(&tar, true);
    untar
        .args([
            "--extract",
            "--numeric-owner",
            "--same-owner",
            "--same-permissions",
        ])
        .args([
            "--xattrs",
            "--xattrs-include=*",
            "--delay-directory-restore",
        ])
        .arg("--file")
        .arg(tarball)
        .arg("--directory")
        .arg(&root);
    if let Err(e) = tool::run(&mut untar) {
        return Err(match &e {
            ToolError::Failed { stderr_tail, .. } if tar_says_corrupt(stderr_tail) => {
                ImageError::Corrupt {
                    path: tarball.to_path_buf(),
                    source: e,
                }
            }
            _ => ImageError::BuildFailed {
                step: "unpack the tarball",
                path: tarball.to_path_buf(),
                source: e,
            },
        });
    }

    let (content, inodes) = tree_usage(&root).map_err(cache_io("measure", &root))?;
    if inodes <= 1 {
        return Err(ImageError::Empty {
            path: tarball.to_path_buf(),
        });
    }
    let img = work.path().join("image.ext4");
    let mut attempt = 0;
    let size = loop {
        let size = if layout.tight {
            tight_size(content, attempt)
        } else {
            image_size(content)
        };
        // mke2fs's default of one inode per 16 KiB can be too few for trees
        // of many small files; ask for twice what the tree has in that case.
        let default_inodes = size / 16384;
        let _ = fs::remove_file(&img);
        let f = fs::File::create(&img).map_err(cache_io("create", &img))?;
        f.set_len(size).map_err(cache_io("size", &img))?;
        drop(f);

        let mut mkfs_cmd = wrapped(&mkfs, false);
        // lazy_journal_init: the journal of a fresh sparse file already reads
        // as zeros, so writing 64 MiB of them only un-sparses the image.
        mkfs_cmd.args(["-q", "-F", "-t", "ext4", "-L", layout.label, "-m", "0"]);
        mkfs_cmd.args(["-E", "root_owner=0:0,lazy_journal_init=1"]);
        if inodes * 2 > default_inodes {
            mkfs_cmd.arg("-N").arg((inodes * 2).to_string());
        }
        mkfs_cmd.arg("-d").arg(&root).arg(&img);
        match tool::run(&mut mkfs_cmd) {
            Ok(_) => break size,
            // A tight estimate that proved too small: more room, twice.
            Err(_) if layout.tight && attempt < 2 => attempt += 1,
            Err(source) => {
                return Err(ImageError::BuildFailed {
                    step: "make the ext4 image",
                    path: tarball.to_path_buf(),
                    source,
                })
            }
        }
    };

    // Read-only on the host (VMs only ever write to their own overlays), and
    // readable by its owner only: it holds whatever the user's tarball held.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&img, fs::Permissions::from_mode(0o400))
        .map_err(cache_io("protect", &img))?;
    fsutil::persist(&img, dest).map_err(cache_io("store", dest))?;
    if fakeroot.is_some() {
        // Unpacked without privileges, read-only directories (0555) are
        // really read-only to us and would stop the scratch tree's removal.
        make_removable(&root);
    }
    drop(work);
    Ok(size)
}

/// Scratch directories of builds of the image `sha256` start with this.
fn build_prefix(sha256: &str) -> String {
    format!(".build-{sha256}-")
}

/// Remove the scratch directories of earlier builds of `sha256` that were
/// interrupted (a killed `boot`: an unpacked rootfs and a partial image,
/// hundreds of MiB). Called with the image's build lock held, so none of
/// them is in use.
pub(crate) fn remove_abandoned_builds(images: &Path, sha256: &str) {
    let prefix = build_prefix(sha256);
    let Ok(rd) = fs::read_dir(images) else { return };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let dir = e.path();
            make_removable(&dir);
            match fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!(
                    "removed {}, left by an interrupted image build",
                    dir.display()
                ),
                Err(e) => tracing::warn!(
                    "cannot remove {}, left by an interrupted image build: {e}",
                    dir.display()
                ),
            }
        }
    }
}

/// Give the owner write and search permission on every directory under
/// `root`, so that the tree can be deleted; best effort.
fn make_removable(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(m) = fs::symlink_metadata(&dir) {
            let _ = fs::set_permissions(
                &dir,
                fs::Permissions::from_mode(m.permissions().mode() | 0o700),
            );
        }
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            }
        }
    }
}

/// Largest `--disk-size` accepted (qcow2 handles far more; this catches
/// typos such as a size in bytes given with a unit).
pub const MAX_DISK_SIZE: u64 = 64 << 40;

/// A root disk size must hold the image's filesystem (`image`: its size,
/// once known) and stay below [`MAX_DISK_SIZE`].
pub fn check_disk_size(size: u64, image: Option<u64>) -> Result<(), crate::Failure> {
    const MIB: u64 = 1 << 20;
    if !(64 * MIB..=MAX_DISK_SIZE).contains(&size) {
        return Err(crate::error::fail(
            crate::ErrorCode::BootArgsInvalid,
            format!("a root disk of {size} bytes is outside 64 MiB..64 TiB"),
        )
        .hint("e.g. --disk-size 8G or 20G"));
    }
    if let Some(img) = image.filter(|img| size < *img) {
        return Err(crate::error::fail(
            crate::ErrorCode::BootArgsInvalid,
            format!(
                "--disk-size {} MiB is smaller than the image's root filesystem ({} MiB); a disk cannot shrink it",
                size / MIB,
                img.div_ceil(MIB)
            ),
        )
        .hint(format!("give at least {} MiB, or leave --disk-size out", img.div_ceil(MIB))));
    }
    Ok(())
}

/// Create a qcow2 overlay at `overlay` backed by the raw image `base`.
pub fn create_overlay(base: &Path, overlay: &Path) -> Result<(), ImageError> {
    create_overlay_sized(base, overlay, None)
}

/// [`create_overlay`] with a virtual size of `size` bytes instead of the
/// base's (`boot --disk-size`; the guest agent grows its filesystem into
/// the rest). The caller checks that `size` is not below the base's.
pub fn create_overlay_sized(
    base: &Path,
    overlay: &Path,
    size: Option<u64>,
) -> Result<(), ImageError> {
    let qemu_img = need(tool::QEMU_IMG)?;
    let base = match fs::canonicalize(base) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ImageError::NotFound { path: base.into() })
        }
        Err(source) => {
            return Err(ImageError::Unreadable {
                path: base.into(),
                source,
            })
        }
    };
    let tmp = fsutil::temp_sibling(overlay, "tmp");
    // qemu-img keeps the mode of a file that exists: the layer is 0600 from
    // the start, whatever this process's umask.
    {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|source| ImageError::CacheIo {
                action: "create",
                path: tmp.clone(),
                source,
            })?;
    }
    let mut cmd = tool::command(qemu_img);
    cmd.args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&tmp);
    if let Some(size) = size {
        cmd.arg(size.to_string());
    }
    if let Err(source) = tool::run(&mut cmd) {
        let _ = fs::remove_file(&tmp);
        return Err(ImageError::OverlayFailed {
            overlay: overlay.to_path_buf(),
            source,
        });
    }
    fsutil::persist(&tmp, overlay).map_err(|source| {
        let _ = fs::remove_file(&tmp);
        ImageError::CacheIo {
            action: "store",
            path: overlay.to_path_buf(),
            source,
        }
    })
}

/// Create `layer`, an empty qcow2 layer of `size` bytes naming no backing
/// file (its backing is given to QEMU explicitly), mode 0600.
pub fn empty_layer(layer: &Path, size: u64) -> Result<(), ImageError> {
    let qemu_img = need(tool::QEMU_IMG)?;
    {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(layer)
            .map_err(cache_io("create", layer))?;
    }
    let mut cmd = tool::command(qemu_img);
    cmd.args(["create", "-q", "-f", "qcow2"])
        .arg(layer)
        .arg(size.to_string());
    tool::run(&mut cmd).map_err(|source| {
        let _ = fs::remove_file(layer);
        ImageError::OverlayFailed {
            overlay: layer.to_path_buf(),
            source,
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fuzz_tests;
