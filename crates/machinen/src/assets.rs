//! `machinen install`: the Debian kernel, its modules and the base rootfs.
//!
//! ```text
//! <assets>/                     ~/.machinen/<version>/bases/debian-<arch>/
//!   vmlinuz                     Debian's cloud kernel
//!   modules/lib/modules/<ver>/  its whole module tree (+ a generated modules.dep)
//!   kernel.json                 which kernel package those two came from
//!   rootfs.tar.gz               Debian <host suite> minbase, built by mmdebstrap
//!   installed.json              the marker, written last: all of the above is complete
//!   .install.lock               flock held by a running install
//! ```
//!
//! Everything comes through the machine's own apt configuration: the kernel
//! with `apt-get download` + `dpkg-deb -x`, the rootfs with mmdebstrap fed
//! the host's own sources. machinen names no archive host itself.

pub(crate) mod apt;
pub mod criu;
pub(crate) mod fsutil;
mod kernel;
mod rootfs;
pub(crate) mod tool;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Coded, ErrorCode};
use crate::paths::{debian_arch, Paths};
use crate::progress::ProgressMode;
use tool::{Tool, ToolError};

/// Version of the assets directory's layout and marker format. A marker of
/// another version is treated as "not installed".
pub const ASSETS_LAYOUT: u32 = 1;

const MARKER: &str = "installed.json";
const KERNEL_STAMP: &str = "kernel.json";
const KERNEL: &str = "vmlinuz";
const MODULES: &str = "modules";
const ROOTFS: &str = "rootfs.tar.gz";
const LOCK: &str = ".install.lock";

#[derive(Debug, Clone, Default)]
pub struct InstallOptions {
    pub force: bool,
    pub progress: ProgressMode,
}

/// Installed guest assets.
#[derive(Debug, Clone, Serialize)]
pub struct Assets {
    /// Kernel image (`vmlinuz`).
    pub kernel: PathBuf,
    /// `uname -r` of that kernel.
    pub kernel_version: String,
    /// Directory holding `lib/modules/<kernel_version>/`.
    pub modules_root: PathBuf,
    /// Base rootfs tarball (`rootfs.tar.gz`).
    pub rootfs: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstallReport {
    pub assets: Assets,
    pub rootfs_sha256: String,
    /// True when everything was already installed and nothing was done.
    pub already_installed: bool,
    pub elapsed_ms: u64,
    /// Debian package the kernel came from, and its version.
    pub kernel_package: String,
    pub kernel_package_version: String,
    /// Debian suite of the base rootfs.
    pub suite: String,
    /// Bytes of `rootfs.tar.gz`.
    pub rootfs_size: u64,
    /// Bytes of `vmlinuz`.
    pub kernel_size: u64,
    /// Time spent fetching the kernel (0 when it was already there).
    pub kernel_ms: u64,
    /// Time spent building the rootfs (0 when it was already there).
    pub rootfs_ms: u64,
    /// True when install ran `apt-get update` itself (root, no package lists).
    pub apt_updated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("kernel not installed at {path}")]
    KernelNotFound { path: PathBuf },
    #[error("base rootfs not installed at {path}")]
    BaseNotFound { path: PathBuf },
    #[error("`{tool}` is not installed")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    #[error("apt knows no package `{package}`; it has no package lists yet")]
    AptListsMissing { package: String },
    #[error("apt's sources have no package `{package}`")]
    PackageUnavailable { package: String },
    #[error("could not {what}")]
    FetchFailed {
        what: String,
        #[source]
        source: ToolError,
    },
    #[error("kernel package {package} is not laid out as expected: {reason}")]
    KernelPackageInvalid { package: String, reason: String },
    #[error("could not build the Debian {suite} base rootfs")]
    RootfsFailed {
        suite: String,
        #[source]
        source: ToolError,
    },
    #[error("could not {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("install marker {path} is unreadable")]
    MarkerInvalid {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl Coded for InstallError {
    fn code(&self) -> ErrorCode {
        use InstallError::*;
        match self {
            KernelNotFound { .. } => ErrorCode::ProvisionKernelNotFound,
            BaseNotFound { .. } => ErrorCode::ProvisionBaseNotFound,
            ToolMissing { .. } => ErrorCode::InstallToolMissing,
            AptListsMissing { .. }
            | PackageUnavailable { .. }
            | FetchFailed { .. }
            | KernelPackageInvalid { .. } => ErrorCode::InstallFetchFailed,
            RootfsFailed { .. } => ErrorCode::InstallRootfsFailed,
            Io { .. } => ErrorCode::Io,
            MarkerInvalid { .. } => ErrorCode::ProvisionAssetsDirInvalid,
        }
    }

    fn hint(&self) -> Option<String> {
        use InstallError::*;
        Some(match self {
            KernelNotFound { .. } | BaseNotFound { .. } => {
                "run `machinen install` to fetch the kernel and build the base rootfs".into()
            }
            ToolMissing { package, .. } => format!("install it: `apt-get install {package}`"),
            AptListsMissing { .. } => "run `apt-get update` as root, then `machinen install` again".into(),
            PackageUnavailable { .. } => {
                "machinen needs a Debian host whose apt sources include the release's `main` component; \
                 check /etc/apt/sources.list.d and run `apt-get update`"
                    .into()
            }
            FetchFailed { .. } => {
                "check that apt works on this machine (`apt-get update`, network and proxy settings), then try again"
                    .into()
            }
            KernelPackageInvalid { .. } => {
                "run `apt-get update` and `machinen install --force`; if it persists, report it".into()
            }
            RootfsFailed { .. } => {
                let mut h = "check that apt works on this machine (`apt-get update`), then `machinen install --force`"
                    .to_string();
                if !tool::is_root() {
                    h.push_str(
                        "; without root, mmdebstrap needs unprivileged user namespaces (or run install as root)",
                    );
                }
                h
            }
            Io { .. } => "check that the assets directory is writable and the disk has free space \
                          (MACHINEN_ASSETS_DIR overrides where it is)"
                .into(),
            MarkerInvalid { .. } => "run `machinen install --force` to rebuild the assets".into(),
        })
    }
}

pub(crate) fn need(t: Tool) -> Result<PathBuf, InstallError> {
    t.find().ok_or(InstallError::ToolMissing {
        tool: t.name,
        package: t.package,
    })
}

pub(crate) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io {
        action,
        path,
        source,
    }
}

/// `<assets>/installed.json`: what install put there, written last.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Marker {
    layout: u32,
    arch: String,
    suite: String,
    kernel_version: String,
    kernel_package: String,
    kernel_package_version: String,
    kernel_size: u64,
    rootfs_sha256: String,
    rootfs_size: u64,
    /// Seconds since the Unix epoch.
    created_at: u64,
}

/// `<assets>/kernel.json`: the kernel part of an install, so that an install
/// interrupted during the rootfs build does not fetch the kernel again.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct KernelStamp {
    layout: u32,
    kernel_version: String,
    kernel_package: String,
    kernel_package_version: String,
}

fn assets_at(dir: &Path, kernel_version: &str) -> Assets {
    Assets {
        kernel: dir.join(KERNEL),
        kernel_version: kernel_version.to_string(),
        modules_root: dir.join(MODULES),
        rootfs: dir.join(ROOTFS),
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, InstallError> {
    match fs::read(path) {
        Ok(b) => {
            serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| InstallError::MarkerInvalid {
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

fn remove_if_present(path: &Path) -> Result<(), InstallError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

/// The marker and every file it vouches for, or `None`.
fn installed(dir: &Path) -> Result<Option<(Marker, Assets)>, InstallError> {
    let Some(marker) = read_json::<Marker>(&dir.join(MARKER))? else {
        return Ok(None);
    };
    if marker.layout != ASSETS_LAYOUT || marker.arch != debian_arch() {
        return Ok(None);
    }
    let assets = assets_at(dir, &marker.kernel_version);
    let complete = assets.kernel.is_file()
        && assets.rootfs.is_file()
        && assets
            .modules_root
            .join("lib/modules")
            .join(&marker.kernel_version)
            .join("modules.dep")
            .is_file();
    Ok(complete.then_some((marker, assets)))
}

/// Like [`installed`], for install itself: a broken marker is no error
/// there, it is what install is about to replace.
fn installed_for_install(dir: &Path) -> Result<Option<(Marker, Assets)>, InstallError> {
    match installed(dir) {
        Err(InstallError::MarkerInvalid { path, source }) => {
            tracing::warn!(path = %path.display(), error = %source, "replacing an unreadable install marker");
            Ok(None)
        }
        other => other,
    }
}

/// Find the installed assets, or say to run `machinen install`. Cheap: reads
/// the marker and checks that the files exist, hashes nothing.
pub fn resolve(paths: &Paths) -> Result<Assets, InstallError> {
    if let Some((_, assets)) = installed(&paths.assets)? {
        return Ok(assets);
    }
    let kernel = paths.assets.join(KERNEL);
    if !kernel.is_file() {
        return Err(InstallError::KernelNotFound { path: kernel });
    }
    let rootfs = paths.assets.join(ROOTFS);
    if !rootfs.is_file() {
        return Err(InstallError::BaseNotFound { path: rootfs });
    }
    // Both files are there but the marker is not: an install was
    // interrupted, or the modules are gone. Either way the kernel part is
    // what cannot be trusted.
    Err(InstallError::KernelNotFound {
        path: paths.assets.join(MODULES),
    })
}

fn ms_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn report(
    marker: &Marker,
    assets: Assets,
    already_installed: bool,
    start: Instant,
) -> InstallReport {
    InstallReport {
        assets,
        rootfs_sha256: marker.rootfs_sha256.clone(),
        already_installed,
        elapsed_ms: ms_since(start),
        kernel_package: marker.kernel_package.clone(),
        kernel_package_version: marker.kernel_package_version.clone(),
        suite: marker.suite.clone(),
        rootfs_size: marker.rootfs_size,
        kernel_size: marker.kernel_size,
        kernel_ms: 0,
        rootfs_ms: 0,
        apt_updated: false,
    }
}

/// Fetch the kernel and build the base rootfs into `paths.assets`, unless
/// they are already there (`opts.force` rebuilds both).
pub fn install(paths: &Paths, opts: &InstallOptions) -> Result<InstallReport, InstallError> {
    let start = Instant::now();
    let dir = &paths.assets;
    if !opts.force {
        if let Some((marker, assets)) = installed_for_install(dir)? {
            return Ok(report(&marker, assets, true, start));
        }
    }

    // Every tool install or a later boot needs, checked up front so that a
    // missing one is reported before minutes of work, not after.
    let mut tools = vec![
        tool::APT_GET,
        tool::APT_CACHE,
        tool::DPKG_DEB,
        tool::MKFS_EXT4,
        tool::QEMU_IMG,
        tool::TAR,
    ];
    if tool::MMDEBSTRAP.find().is_none() {
        if tool::DEBOOTSTRAP.find().is_none() || !tool::is_root() {
            tools.push(tool::MMDEBSTRAP);
        } else {
            tools.push(tool::GZIP);
        }
    }
    if !tool::is_root() {
        tools.push(tool::FAKEROOT);
    }
    for t in tools {
        need(t)?;
    }

    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let lock_path = dir.join(LOCK);
    let _lock = fsutil::lock_exclusive(&lock_path).map_err(io_err("lock", &lock_path))?;
    // Another install may have finished while this one waited for the lock.
    if !opts.force {
        if let Some((marker, assets)) = installed_for_install(dir)? {
            return Ok(report(&marker, assets, true, start));
        }
    }
    // From here on the directory is being changed: no marker until it is
    // consistent again.
    remove_if_present(&dir.join(MARKER))?;

    let arch = debian_arch();
    let suite = apt::host_suite();
    let mut apt_updated = false;

    let kernel_start = Instant::now();
    let stamp = if opts.force {
        None
    } else {
        reusable_kernel(dir)?
    };
    let (stamp, kernel_ms) = match stamp {
        Some(s) => (s, 0),
        None => {
            remove_if_present(&dir.join(KERNEL_STAMP))?;
            let k = kernel::fetch(dir, arch, opts.progress, &mut apt_updated)?;
            let stamp = KernelStamp {
                layout: ASSETS_LAYOUT,
                kernel_version: k.version,
                kernel_package: k.package,
                kernel_package_version: k.package_version,
            };
            write_json(&dir.join(KERNEL_STAMP), &stamp)?;
            (stamp, ms_since(kernel_start))
        }
    };

    let rootfs_path = dir.join(ROOTFS);
    let rootfs_start = Instant::now();
    let rootfs_ms = if opts.force || !rootfs_path.is_file() {
        rootfs::build(dir, &rootfs_path, &suite, arch, opts.progress)?;
        ms_since(rootfs_start)
    } else {
        0
    };
    let step = opts.progress.step("Hashing the base rootfs");
    let (rootfs_sha256, rootfs_size) =
        fsutil::sha256_file(&rootfs_path).map_err(io_err("read", &rootfs_path))?;
    step.done("Hashed the base rootfs");

    let kernel_path = dir.join(KERNEL);
    let kernel_size = fs::metadata(&kernel_path)
        .map_err(io_err("read", &kernel_path))?
        .len();
    let marker = Marker {
        layout: ASSETS_LAYOUT,
        arch: arch.to_string(),
        suite,
        kernel_version: stamp.kernel_version.clone(),
        kernel_package: stamp.kernel_package,
        kernel_package_version: stamp.kernel_package_version,
        kernel_size,
        rootfs_sha256,
        rootfs_size,
        created_at: fsutil::unix_now(),
    };
    write_json(&dir.join(MARKER), &marker)?;
    let assets = assets_at(dir, &marker.kernel_version);
    let mut r = report(&marker, assets, false, start);
    r.kernel_ms = kernel_ms;
    r.rootfs_ms = rootfs_ms;
    r.apt_updated = apt_updated;
    Ok(r)
}

/// The kernel stamp when the kernel part of an earlier, interrupted
/// install is complete.
fn reusable_kernel(dir: &Path) -> Result<Option<KernelStamp>, InstallError> {
    // An unreadable stamp just means fetching again.
    let stamp = read_json::<KernelStamp>(&dir.join(KERNEL_STAMP))
        .ok()
        .flatten();
    Ok(stamp.filter(|s| {
        s.layout == ASSETS_LAYOUT
            && dir.join(KERNEL).is_file()
            && dir
                .join(MODULES)
                .join("lib/modules")
                .join(&s.kernel_version)
                .join("modules.dep")
                .is_file()
    }))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), InstallError> {
    let mut json = serde_json::to_vec_pretty(value)
        .map_err(|e| io_err("encode", path)(io::Error::other(e)))?;
    json.push(b'\n');
    fsutil::write_atomic(path, &json).map_err(io_err("write", path))
}

#[cfg(test)]
mod tests;
