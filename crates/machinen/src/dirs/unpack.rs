//! Unpacking a tar stream that a guest sent into a host directory, confined
//! to it. The guest is untrusted: every entry's path must stay below the
//! destination (no `..`, no absolute path), nothing is written through a
//! symlink (a link the stream made earlier, pointing anywhere, is never a
//! parent of a later entry, and a later entry of the same name replaces the
//! link itself), hard links must name a regular file the stream already
//! unpacked, device nodes and FIFOs are skipped, and set-id bits are
//! dropped. The total is bounded: file data plus [`ENTRY_COST`] bytes an
//! entry, at most `max_bytes`.
//!
//! The destination is a fresh private directory ([`super::Vm::pull_dir`]
//! renames it into place when the stream is complete), so nothing else
//! writes into it meanwhile and its symlinks are the stream's own.

use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{fail, ErrorCode, Failure};

/// What an entry costs against the size bound beside its data: its header
/// (and the inode it takes), so a stream of millions of empty files is
/// bounded too.
pub const ENTRY_COST: u64 = 512;

/// What an unpack did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unpacked {
    /// Entries written (directories, files, symlinks, hard links).
    pub entries: u64,
    /// Regular-file bytes written.
    pub bytes: u64,
    /// Entries left out (devices, FIFOs, unknown kinds).
    pub skipped: u64,
    /// The mode the stream gave the root directory (a `.` entry), if any.
    pub root_mode: Option<u32>,
}

fn escape(rel: &Path, why: &str) -> Failure {
    fail(
        ErrorCode::FilesPathEscape,
        format!("the guest sent an entry {:?} that {why}; nothing was kept", rel.display().to_string()),
    )
    .hint("the tree in the guest has entries that would land outside the destination; copy a plainer tree, or pack it in the guest (`tar`) and copy the archive as one file")
}

fn io_fail(path: &Path, what: &str, e: io::Error) -> Failure {
    let code = match e.kind() {
        io::ErrorKind::PermissionDenied => ErrorCode::FilesPermissionDenied,
        _ if e.raw_os_error() == Some(libc::ENOSPC) => ErrorCode::FilesHostDiskReserve,
        _ => ErrorCode::FilesIo,
    };
    fail(code, format!("{}: {what}", path.display())).source(e)
}

/// A stream path as a relative path of plain names (`.` parts dropped), or
/// the reason it is refused.
pub fn confine(raw: &Path) -> Result<PathBuf, Failure> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(escape(raw, "climbs out with `..`")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(escape(raw, "is an absolute path"))
            }
        }
    }
    Ok(out)
}

/// Make sure every parent of `rel` below `root` is a real directory,
/// creating missing ones (0700 until the end); a symlink or a file in the
/// way is refused.
fn ensure_parents(root: &Path, rel: &Path) -> Result<(), Failure> {
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    let mut cur = root.to_path_buf();
    for c in parent.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(escape(rel, "would be written through a symlink"))
            }
            Ok(_) => return Err(escape(rel, "would be written below a file")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                mkdir_private(&cur)?;
            }
            Err(e) => return Err(io_fail(&cur, "cannot stat", e)),
        }
    }
    Ok(())
}

fn mkdir_private(p: &Path) -> Result<(), Failure> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(p)
        .map_err(|e| io_fail(p, "cannot create the directory", e))
}

/// Remove what is at `p` unless it is a directory (a later entry of the
/// same name wins, as in tar; a symlink is removed, never followed).
fn clear_slot(p: &Path, rel: &Path) -> Result<(), Failure> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_dir() => {
            Err(escape(rel, "would replace a directory the stream made"))
        }
        Ok(_) => fs::remove_file(p).map_err(|e| io_fail(p, "cannot replace", e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_fail(p, "cannot stat", e)),
    }
}

fn set_mtime(p: &Path, secs: u64) {
    let ts = nix::sys::time::TimeSpec::new(secs.min(i64::MAX as u64) as i64, 0);
    let _ = nix::sys::stat::utimensat(
        None,
        p,
        &ts,
        &ts,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    );
}

fn too_large(max_bytes: u64) -> Failure {
    match crate::hostfile::too_large("the directory", max_bytes, "holds more than") {
        crate::Error::Failure(f) => f,
        other => fail(ErrorCode::FilesTooLarge, other.to_string()),
    }
}

/// Unpack the tar stream `r` into the existing, empty directory `root`.
pub fn unpack_confined<R: Read>(r: R, root: &Path, max_bytes: u64) -> Result<Unpacked, Failure> {
    let mut ar = tar::Archive::new(r);
    let mut done = Unpacked::default();
    let mut budget = 0u64;
    // Modes and mtimes of directories, applied last (children first), so a
    // read-only directory does not stop its own entries.
    let mut dirs: Vec<(PathBuf, u32, u64)> = Vec::new();
    let bad =
        |e: io::Error| fail(ErrorCode::FilesIo, "the guest sent a malformed tar stream").source(e);
    for entry in ar.entries().map_err(bad)? {
        let mut e = entry.map_err(bad)?;
        let raw = e.path().map_err(bad)?.into_owned();
        let rel = confine(&raw)?;
        let kind = e.header().entry_type();
        let mode = e.header().mode().unwrap_or(0o644) & 0o777;
        let mtime = e.header().mtime().unwrap_or(0);
        budget = budget.saturating_add(ENTRY_COST);
        if budget > max_bytes {
            return Err(too_large(max_bytes));
        }
        if rel.as_os_str().is_empty() {
            if kind.is_dir() {
                done.root_mode = Some(mode);
                dirs.push((root.to_path_buf(), mode, mtime));
                continue;
            }
            return Err(escape(&raw, "names the destination itself"));
        }
        let dest = root.join(&rel);
        match kind {
            tar::EntryType::Directory => {
                ensure_parents(root, &rel)?;
                match fs::symlink_metadata(&dest) {
                    Ok(m) if m.file_type().is_dir() => {}
                    Ok(_) => {
                        clear_slot(&dest, &rel)?;
                        mkdir_private(&dest)?;
                    }
                    Err(_) => mkdir_private(&dest)?,
                }
                dirs.push((dest, mode, mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = e.header().size().map_err(bad)?;
                budget = budget.saturating_add(size);
                if budget > max_bytes {
                    return Err(too_large(max_bytes));
                }
                ensure_parents(root, &rel)?;
                clear_slot(&dest, &rel)?;
                // O_EXCL|O_NOFOLLOW: a name that appeared since (it cannot:
                // the directory is ours) is never followed.
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&dest)
                    .map_err(|x| io_fail(&dest, "cannot create", x))?;
                let n = io::copy(&mut (&mut e).take(size), &mut f)
                    .map_err(|x| io_fail(&dest, "write failed", x))?;
                if n != size {
                    return Err(fail(
                        ErrorCode::FilesIo,
                        format!("the tar stream ended inside {}", rel.display()),
                    ));
                }
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(|x| io_fail(&dest, "cannot set the mode", x))?;
                drop(f);
                set_mtime(&dest, mtime);
                done.bytes += n;
            }
            tar::EntryType::Symlink => {
                let target = e
                    .link_name()
                    .map_err(bad)?
                    .ok_or_else(|| escape(&raw, "is a symlink without a target"))?
                    .into_owned();
                ensure_parents(root, &rel)?;
                clear_slot(&dest, &rel)?;
                std::os::unix::fs::symlink(&target, &dest)
                    .map_err(|x| io_fail(&dest, "cannot create the symlink", x))?;
                set_mtime(&dest, mtime);
            }
            tar::EntryType::Link => {
                let target = e
                    .link_name()
                    .map_err(bad)?
                    .ok_or_else(|| escape(&raw, "is a hard link without a target"))?;
                let src_rel = confine(&target)?;
                if src_rel.as_os_str().is_empty() {
                    return Err(escape(&raw, "is a hard link to the destination itself"));
                }
                // The link's source: a regular file the stream made, reached
                // through real directories only.
                let mut cur = root.to_path_buf();
                let comps: Vec<_> = src_rel.components().collect();
                for (i, c) in comps.iter().enumerate() {
                    cur.push(c);
                    let m = fs::symlink_metadata(&cur)
                        .map_err(|_| escape(&raw, "is a hard link to nothing the stream made"))?;
                    let last = i + 1 == comps.len();
                    if (last && !m.file_type().is_file()) || (!last && !m.file_type().is_dir()) {
                        return Err(escape(
                            &raw,
                            "is a hard link to something other than a file of the stream",
                        ));
                    }
                }
                ensure_parents(root, &rel)?;
                clear_slot(&dest, &rel)?;
                fs::hard_link(&cur, &dest)
                    .map_err(|x| io_fail(&dest, "cannot create the hard link", x))?;
            }
            // Long names and pax headers are read by the tar crate itself;
            // anything else (devices, FIFOs) has no business on the host.
            _ => {
                done.skipped += 1;
                continue;
            }
        }
        done.entries += 1;
    }
    for (dir, mode, mtime) in dirs.into_iter().rev() {
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode))
            .map_err(|x| io_fail(&dir, "cannot set the mode", x))?;
        set_mtime(&dir, mtime);
    }
    Ok(done)
}
