//! The container's root filesystem, as containerd's snapshotter prepared
//! it, made into a machinen image.
//!
//! containerd hands the shim the snapshot's mounts (an overlay of the
//! image's layers and a writable layer); the shim mounts them at
//! `<bundle>/rootfs`, as runc's shim does, and packs that tree into a
//! tarball with GNU tar in a fixed order, numeric owners and extended
//! attributes. machinen turns the tarball into its cached ext4 image (by
//! content: the same image's containers share one) and each VM writes to
//! its own copy-on-write layer over it. So the guest's writes stay in the
//! VM (and in its checkpoints), not in containerd's snapshot.

use std::path::{Path, PathBuf};
use std::process::Command;

use machinen::{ErrorCode, Failure};

pub type Mount = containerd_shim_protos::types::mount::Mount;

/// Mount containerd's `mounts` at `<bundle>/rootfs` (nothing to do when
/// containerd mounted it already: no mounts given).
pub async fn mount(mounts: &[Mount], bundle: &Path) -> Result<PathBuf, Failure> {
    let target = bundle.join("rootfs");
    std::fs::create_dir_all(&target).map_err(|e| {
        Failure::new(ErrorCode::Io, format!("cannot create {}", target.display())).source(e)
    })?;
    for m in mounts {
        containerd_shim::asynchronous::util::mount_rootfs(m, &target)
            .await
            .map_err(|e| {
                Failure::new(
                    ErrorCode::ContainerSpecInvalid,
                    format!(
                        "cannot mount the container's rootfs ({} {}): {e}",
                        m.type_, m.source
                    ),
                )
            })?;
    }
    Ok(target)
}

/// Undo [`mount`] (lazily: a copy still reading it finishes).
pub fn unmount(bundle: &Path) {
    let target = bundle.join("rootfs");
    match nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => log::warn!("unmount {}: {e}", target.display()),
    }
}

/// Pack `root` into the tarball `out` (written to a temp file, synced,
/// renamed): blocking.
pub fn pack(root: &Path, out: &Path) -> Result<(), Failure> {
    let tmp = out.with_extension("tar.tmp");
    let st = Command::new("tar")
        .args([
            "--sort=name",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
        ])
        .args(["--one-file-system", "-C"])
        .arg(root)
        .arg("-cf")
        .arg(&tmp)
        .arg(".")
        .output()
        .map_err(|e| {
            Failure::new(ErrorCode::InstallToolMissing, "cannot run tar")
                .hint("install GNU tar")
                .source(e)
        })?;
    if !st.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Failure::new(
            ErrorCode::CacheImageBuildFailed,
            format!(
                "packing the container's rootfs failed: {}",
                String::from_utf8_lossy(&st.stderr).trim()
            ),
        ));
    }
    let io = |e: std::io::Error| {
        Failure::new(ErrorCode::Io, format!("cannot write {}", out.display())).source(e)
    };
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, out).map_err(io)
}
