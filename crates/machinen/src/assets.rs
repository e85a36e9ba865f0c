//! `machinen install`: the Debian kernel, its modules and the base rootfs.
//!
//! CONTRACT (to be implemented):
//! - `install(paths, opts)` fetches `linux-image-cloud-<arch>`'s real kernel
//!   package through the machine's own apt configuration (`apt-get download`
//!   + `dpkg-deb -x`, no host names in code), keeps `vmlinuz`, `modules/`,
//!   and builds `rootfs.tar.gz` with mmdebstrap (debootstrap fallback).
//!   Idempotent; `force` rebuilds. Atomic writes.
//! - `resolve(paths)` finds installed assets or says to run `machinen install`.

use std::path::PathBuf;

use serde::Serialize;

use crate::error::{Coded, ErrorCode};
use crate::paths::Paths;
use crate::progress::ProgressMode;

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
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("kernel not installed at {path}")]
    KernelNotFound { path: PathBuf },
    #[error("base rootfs not installed at {path}")]
    BaseNotFound { path: PathBuf },
}

impl Coded for InstallError {
    fn code(&self) -> ErrorCode {
        match self {
            InstallError::KernelNotFound { .. } => ErrorCode::ProvisionKernelNotFound,
            InstallError::BaseNotFound { .. } => ErrorCode::ProvisionBaseNotFound,
        }
    }
    fn hint(&self) -> Option<String> {
        Some("run `machinen install` to fetch the kernel and build the base rootfs".into())
    }
}

pub fn install(_paths: &Paths, _opts: &InstallOptions) -> Result<InstallReport, InstallError> {
    unimplemented!("assets::install")
}

pub fn resolve(_paths: &Paths) -> Result<Assets, InstallError> {
    unimplemented!("assets::resolve")
}
