//! Rootfs images: a tarball becomes an ext4 image once, cached by content
//! hash; each VM gets its own copy-on-write qcow2 overlay on top.
//!
//! CONTRACT (to be implemented).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Coded, ErrorCode};
use crate::paths::Paths;
use crate::progress::ProgressMode;

#[derive(Debug, Clone, Serialize)]
pub struct CachedImage {
    /// The cached raw ext4 image (never written by VMs).
    pub path: PathBuf,
    /// sha256 of the source tarball.
    pub sha256: String,
    /// Apparent size of the ext4 image.
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {path} not found")]
    NotFound { path: PathBuf },
}

impl Coded for ImageError {
    fn code(&self) -> ErrorCode {
        match self {
            ImageError::NotFound { .. } => ErrorCode::BootImageInvalid,
        }
    }
}

/// Convert `tarball` into a cached ext4 image (once per content hash).
pub fn ensure_rootfs_image(_paths: &Paths, _tarball: &Path, _progress: ProgressMode) -> Result<CachedImage, ImageError> {
    unimplemented!("image::ensure_rootfs_image")
}

/// Create a qcow2 overlay at `overlay` backed by the raw image `base`.
pub fn create_overlay(_base: &Path, _overlay: &Path) -> Result<(), ImageError> {
    unimplemented!("image::create_overlay")
}
