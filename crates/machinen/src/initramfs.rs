//! The initramfs: the guest agent as `/init` plus the kernel modules it loads.
//!
//! CONTRACT (to be implemented).

use std::path::{Path, PathBuf};

use crate::assets::Assets;
use crate::image::ImageError;
use crate::paths::Paths;

/// Build (or reuse from the cache) the initramfs for `assets` with
/// `agent` as `/init`. Returns the cpio path.
pub fn ensure_initramfs(_paths: &Paths, _assets: &Assets, _agent: &Path) -> Result<PathBuf, ImageError> {
    unimplemented!("initramfs::ensure_initramfs")
}
