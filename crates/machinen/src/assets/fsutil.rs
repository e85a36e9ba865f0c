//! Crash-safe file operations shared by install, the image cache and the
//! initramfs cache: whatever a reader finds under a final name is complete,
//! because it only ever appears there through a rename after an fsync.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

/// Flush a directory's entries (a rename is durable only after this).
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A temporary sibling name for `dest` (same directory, so the final rename
/// never crosses filesystems), unique per process and call.
pub(crate) fn temp_sibling(dest: &Path, tag: &str) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nonce: u32 = rand::random();
    parent_of(dest).join(format!(".{name}.{tag}-{}-{nonce:08x}", std::process::id()))
}

/// Write `bytes` to `dest` atomically: temp file beside it, fsync, rename,
/// fsync the directory. The file is private to its owner (0600): what
/// machinen writes describes the user's VMs.
pub(crate) fn write_atomic(dest: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(dest, |f| f.write_all(bytes))
}

/// Like [`write_atomic`], with the content produced by `fill` into the open
/// temp file (for content too big to build in memory).
pub(crate) fn write_atomic_with(
    dest: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = temp_sibling(dest, "tmp");
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, dest)?;
        fsync_dir(parent_of(dest))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Move an already written file at `tmp` to `dest` durably (fsync, rename,
/// fsync the directory). Both must be on the same filesystem.
pub(crate) fn persist(tmp: &Path, dest: &Path) -> io::Result<()> {
    File::open(tmp)?.sync_all()?;
    fs::rename(tmp, dest)?;
    fsync_dir(parent_of(dest))
}

/// Put the directory `new` at `dest`, replacing whatever directory was there.
/// There is a moment where `dest` is absent; callers guard against readers
/// with a marker written afterwards (a plain rename cannot replace a
/// non-empty directory).
pub(crate) fn replace_dir(new: &Path, dest: &Path) -> io::Result<()> {
    let old = temp_sibling(dest, "old");
    let had_old = match fs::rename(dest, &old) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    fs::rename(new, dest)?;
    fsync_dir(parent_of(dest))?;
    if had_old {
        if let Err(e) = fs::remove_dir_all(&old) {
            tracing::warn!(path = %old.display(), error = %e, "could not remove the replaced directory");
        }
    }
    Ok(())
}

/// Create `dir` and any missing parents as 0700 (from the start: no window
/// in which another user could open them), and tighten `dir` itself to
/// 0700 when it already existed with a looser mode.
pub(crate) fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    tighten_dir(dir);
    Ok(())
}

/// Best effort: take group and other permissions off a directory of ours
/// (one created by an older machinen with 0755). Someone else's directory
/// is left alone.
pub(crate) fn tighten_dir(dir: &Path) {
    let Ok(m) = fs::metadata(dir) else { return };
    if m.is_dir() && m.uid() == nix::unistd::geteuid().as_raw() && m.mode() & 0o077 != 0 {
        if let Err(e) = fs::set_permissions(dir, fs::Permissions::from_mode(m.mode() & 0o700)) {
            tracing::warn!(path = %dir.display(), error = %e, "could not make the directory private");
        }
    }
}

/// Flush every pending write of the filesystem holding `path` (cheaper and
/// simpler than an fsync per file for a freshly unpacked tree).
pub(crate) fn syncfs(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    nix::unistd::syncfs(f.as_raw_fd()).map_err(io::Error::from)
}

/// An exclusive `flock` on a lock file, released on drop. Lock files are
/// never deleted: deleting one while another process waits on it would let
/// a third process lock a fresh inode and run concurrently.
pub(crate) struct FileLock {
    _lock: Flock<File>,
}

pub(crate) fn lock_exclusive(path: &Path) -> io::Result<FileLock> {
    let f = open_lock_file(path)?;
    let lock =
        Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, errno)| io::Error::from(errno))?;
    Ok(FileLock { _lock: lock })
}

/// A lock file, created when missing (its content is never used).
fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// [`lock_exclusive`] without waiting: `None` when another holds it.
pub(crate) fn try_lock_exclusive(path: &Path) -> io::Result<Option<FileLock>> {
    let f = open_lock_file(path)?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(FileLock { _lock: lock })),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(io::Error::from(errno)),
    }
}

/// sha256 (hex) and byte length of a file's content.
pub(crate) fn sha256_file(path: &Path) -> io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hex::encode(h.finalize()), len))
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.json");
        write_atomic(&p, b"one").expect("write");
        write_atomic(&p, b"two").expect("rewrite");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.json")]);
    }

    #[test]
    fn private_files_and_dirs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.json");
        write_atomic(&p, b"x").expect("write");
        assert_eq!(fs::metadata(&p).expect("meta").mode() & 0o777, 0o600);
        let deep = dir.path().join("x/y");
        create_private_dir_all(&deep).expect("mkdir");
        for d in [dir.path().join("x"), deep.clone()] {
            assert_eq!(
                fs::metadata(&d).expect("meta").mode() & 0o777,
                0o700,
                "{}",
                d.display()
            );
        }
        // One made by an older version: tightened when used again.
        fs::set_permissions(&deep, fs::Permissions::from_mode(0o755)).expect("chmod");
        create_private_dir_all(&deep).expect("again");
        assert_eq!(fs::metadata(&deep).expect("meta").mode() & 0o777, 0o700);
    }

    #[test]
    fn replace_dir_swaps_whole_trees() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("modules");
        for (i, content) in ["old", "new"].iter().enumerate() {
            let staged = dir.path().join(format!("staged{i}"));
            fs::create_dir_all(staged.join("sub")).expect("mkdir");
            fs::write(staged.join("sub/f"), content).expect("write");
            replace_dir(&staged, &dest).expect("replace");
        }
        assert_eq!(fs::read_to_string(dest.join("sub/f")).expect("read"), "new");
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn sha256_of_known_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        fs::write(&p, b"abc").expect("write");
        let (h, n) = sha256_file(&p).expect("hash");
        assert_eq!(n, 3);
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
