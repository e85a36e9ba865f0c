//! Copy-once mounts at boot (`boot --mount HOST_DIR:GUEST_PATH`).
//!
//! The host attaches one virtio-blk disk for all of a VM's copy-once
//! mounts, with the serial [`MOUNTS_DISK_SERIAL`], holding mount `i` under
//! `/i`, and names the guest paths on the kernel command line
//! (`machinen.mount=i:/guest/path`). The agent mounts the disk on a
//! private mount point, grows its filesystem to fill the disk (the room the
//! host gave for the guest's writes), bind-mounts each `/i` where asked and
//! lets go of the private mount point. A restored guest has all of this in
//! its memory already.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use machinen_proto::MOUNTS_DISK_SERIAL;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::log::{debug, error};

/// Where the disk is mounted while the bind mounts are made.
const STAGING: &str = "/run/.machinen-mounts";

/// The block device whose virtio serial is `serial`, e.g. `/dev/vdb`.
fn find_disk(serial: &str) -> Option<String> {
    let rd = std::fs::read_dir("/sys/block").ok()?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let s = std::fs::read_to_string(e.path().join("serial")).unwrap_or_default();
        if s.trim() == serial {
            return Some(format!("/dev/{name}"));
        }
    }
    None
}

/// A guest path as the host sends it: absolute, without `.`/`..`.
fn plausible(path: &str) -> bool {
    path.starts_with('/')
        && path.len() > 1
        && path[1..]
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Mount the copy-once mounts `mounts` (disk index, guest path). Every one
/// is mounted or the error says which was not: a guest that lacks the
/// user's files must not look ready.
pub fn mount_all(mounts: &[(u32, String)], wait: Duration) -> Result<(), String> {
    if mounts.is_empty() {
        return Ok(());
    }
    let deadline = Instant::now() + wait;
    let dev = loop {
        if let Some(d) = find_disk(MOUNTS_DISK_SERIAL) {
            break d;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the copy-once mounts' disk (serial {MOUNTS_DISK_SERIAL}) did not appear within {} s",
                wait.as_secs()
            ));
        }
        std::thread::sleep(machinen_proto::timeouts::STATE_POLL);
    };
    // The device node may lag its sysfs entry by a moment.
    crate::init::wait_for(&dev, deadline.saturating_duration_since(Instant::now()));
    std::fs::create_dir_all(STAGING).map_err(|e| format!("mkdir {STAGING}: {e}"))?;
    mount(
        Some(dev.as_str()),
        STAGING,
        Some("ext4"),
        MsFlags::MS_NOATIME,
        // Deleted files give their blocks back to the host (the layer is
        // qcow2 with discard=unmap): a layer stays the size of what the
        // guest keeps, and snapshots, which copy it with the guest
        // paused, stay quick after a large file came and went.
        Some("discard"),
    )
    .map_err(|e| format!("cannot mount {dev} (copy-once mounts) as ext4: {e}"))?;
    debug!("mounted {dev} on {STAGING}");
    match crate::growfs::grow(&dev, STAGING) {
        Ok(Some((from, to))) => debug!("grew the mounts' filesystem from {from} to {to} bytes"),
        Ok(None) => {}
        Err(e) => error!("growing the mounts' filesystem: {e}"),
    }
    let result = bind_all(mounts);
    // The bind mounts keep the filesystem; its staging mount goes.
    if let Err(e) = umount2(STAGING, MntFlags::MNT_DETACH) {
        error!("umount {STAGING}: {e}");
    }
    let _ = std::fs::remove_dir(STAGING);
    result
}

fn bind_all(mounts: &[(u32, String)]) -> Result<(), String> {
    for (i, path) in mounts {
        if !plausible(path) {
            return Err(format!(
                "copy-once mount {i}: guest path {path:?} is not absolute and normalised"
            ));
        }
        let src = format!("{STAGING}/{i}");
        if !Path::new(&src).is_dir() {
            return Err(format!(
                "copy-once mount {i} is missing from the mounts' disk"
            ));
        }
        match std::fs::create_dir_all(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create the mount point {path}: {e}")),
        }
        if !Path::new(path).is_dir() {
            return Err(format!(
                "the mount point {path} is not a directory in the guest"
            ));
        }
        mount(
            Some(src.as_str()),
            path.as_str(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("cannot mount copy-once mount {i} on {path}: {e}"))?;
        debug!("copy-once mount {i} on {path}");
    }
    Ok(())
}

/// Mount the live mounts (`boot --mount-live`): virtio-fs shares served
/// by a virtiofsd on the host, found by their tag. The device may come up
/// a moment after its module loaded, so a missing tag is retried until
/// `wait` runs out.
pub fn mount_live(mounts: &[crate::cmdline::LiveMount], wait: Duration) -> Result<(), String> {
    let deadline = Instant::now() + wait;
    for m in mounts {
        if !plausible(&m.path) {
            return Err(format!(
                "live mount {}: guest path {:?} is not absolute and normalised",
                m.index, m.path
            ));
        }
        let tag = format!("{}{}", machinen_proto::LIVE_MOUNT_TAG_PREFIX, m.index);
        match std::fs::create_dir_all(&m.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create the mount point {}: {e}", m.path)),
        }
        let mut flags = MsFlags::MS_NOATIME;
        if m.readonly {
            flags |= MsFlags::MS_RDONLY;
        }
        loop {
            match mount(
                Some(tag.as_str()),
                m.path.as_str(),
                Some("virtiofs"),
                flags,
                None::<&str>,
            ) {
                Ok(()) => break,
                // No device with this tag yet.
                Err(nix::errno::Errno::ENOENT) if Instant::now() < deadline => {
                    std::thread::sleep(machinen_proto::timeouts::STATE_POLL);
                }
                Err(nix::errno::Errno::ENODEV) => {
                    return Err(format!(
                        "cannot mount live mount {} on {}: the guest kernel has no virtiofs",
                        m.index, m.path
                    ))
                }
                Err(e) => {
                    return Err(format!(
                        "cannot mount live mount {} ({tag}) on {}: {e}",
                        m.index, m.path
                    ))
                }
            }
        }
        debug!("live mount {} ({tag}) on {}", m.index, m.path);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_must_be_plain() {
        assert!(plausible("/work/src"));
        for bad in ["", "/", "work", "/a/../b", "/a//b", "/a/", "/./a"] {
            assert!(!plausible(bad), "{bad:?}");
        }
    }
}
