//! Where machinen keeps its files on the host.
//!
//! ```text
//! ~/.machinen/                      MACHINEN_HOME overrides
//!   <version>/bases/debian-<arch>/  installed kernel, modules, base rootfs
//!                                   (MACHINEN_ASSETS_DIR overrides)
//!   <version>/cache/                rootfs images and initramfs, by content hash
//!                                   (MACHINEN_CACHE_DIR overrides)
//!   vms/<id>/                       one directory per live VM
//!                                   (MACHINEN_REGISTRY_DIR overrides)
//! ```

use std::path::{Path, PathBuf};

use crate::error::{fail, ErrorCode, Failure};

/// The version directory name under the home: bumped when cached formats
/// change, so that old caches are never misread.
pub const LAYOUT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Guest architecture name as Debian spells it.
pub fn debian_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Resolved host paths.
#[derive(Debug, Clone)]
pub struct Paths {
    pub home: PathBuf,
    pub assets: PathBuf,
    pub cache: PathBuf,
    pub registry: PathBuf,
}

impl Paths {
    /// Resolve from the environment (`MACHINEN_HOME`, `MACHINEN_ASSETS_DIR`,
    /// `MACHINEN_CACHE_DIR`, `MACHINEN_REGISTRY_DIR`, `HOME`).
    pub fn from_env() -> Result<Paths, Failure> {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let home = match var(machinen_proto::env::HOME) {
            Some(h) => h,
            None => var("HOME")
                .ok_or_else(|| {
                    fail(
                        ErrorCode::ProvisionAssetsDirInvalid,
                        "neither MACHINEN_HOME nor HOME is set",
                    )
                    .hint("set MACHINEN_HOME to a directory machinen may write to")
                })?
                .join(".machinen"),
        };
        let versioned = home.join(LAYOUT_VERSION);
        let assets = var(machinen_proto::env::ASSETS_DIR).unwrap_or_else(|| {
            versioned
                .join("bases")
                .join(format!("debian-{}", debian_arch()))
        });
        let cache = var(machinen_proto::env::CACHE_DIR).unwrap_or_else(|| versioned.join("cache"));
        let registry = var(machinen_proto::env::REGISTRY_DIR).unwrap_or_else(|| home.join("vms"));
        for (what, p) in [
            (machinen_proto::env::ASSETS_DIR, &assets),
            (machinen_proto::env::REGISTRY_DIR, &registry),
        ] {
            if !p.is_absolute() {
                return Err(fail(
                    ErrorCode::ProvisionAssetsDirInvalid,
                    format!("{what} must be an absolute path, got {}", p.display()),
                ));
            }
        }
        Ok(Paths {
            home,
            assets,
            cache,
            registry,
        })
    }

    /// Paths rooted somewhere else entirely (tests).
    pub fn rooted(root: &Path) -> Paths {
        let versioned = root.join(LAYOUT_VERSION);
        Paths {
            home: root.to_path_buf(),
            assets: versioned
                .join("bases")
                .join(format!("debian-{}", debian_arch())),
            cache: versioned.join("cache"),
            registry: root.join("vms"),
        }
    }
}
