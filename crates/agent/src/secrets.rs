//! Secrets: small named values the host hands over after boot, kept as
//! files (mode 0400) in a tmpfs at [`SECRETS_DIR`]. They never touch the
//! guest disk, the kernel command line or the console log.
//!
//! Before a snapshot the host asks for [`wipe`]: every secret file is
//! overwritten with zeros in place (the tmpfs pages that held it), removed,
//! and the tmpfs is unmounted. A VM booted with secrets runs its kernel with `init_on_free=1`, so any
//! other page that held a copy (pipe and serial buffers, the memory of a
//! program that read the file and exited) is zeroed when freed, and the
//! agent's own heap is zeroed on free by its allocator ([`crate::zalloc`]).
//! A copy a guest program still holds in its memory is that program's.

use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use machinen_proto::{send, Frame, Response, Secret, WireError};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::log::{debug, error};

/// Where secrets live in the guest.
pub const SECRETS_DIR: &str = "/run/machinen/secrets";

/// Largest total size of the secrets of one request.
pub const MAX_TOTAL: usize = 512 * 1024;

pub mod code {
    pub const INVALID: &str = machinen_proto::ErrorCode::SecretsInvalid.as_str();
    pub const FAILED: &str = machinen_proto::ErrorCode::SecretsFailed.as_str();
}

/// Whether this agent mounted the tmpfs (as PID 1 in a guest).
static MOUNTED: Mutex<bool> = Mutex::new(false);

fn err(code: &str, message: impl Into<String>) -> WireError {
    WireError {
        code: code.to_owned(),
        message: message.into(),
    }
}

/// A secret name is a file name: `[A-Za-z0-9_.-]`, 1 to 128 bytes, not
/// starting with a dot.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Overwrite a file's contents with zeros, in place.
fn zero_file(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let len = f.metadata()?.len() as usize;
    let zeros = vec![0u8; len.min(64 * 1024)];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len());
        f.write_all(&zeros[..n])?;
        left -= n;
    }
    f.sync_all()
}

fn ensure_tmpfs(dir: &Path, mount: bool) -> io::Result<()> {
    let mut mounted = MOUNTED.lock().unwrap_or_else(|p| p.into_inner());
    std::fs::create_dir_all(dir)?;
    if mount && !*mounted {
        use nix::mount::MsFlags;
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        nix::mount::mount(
            Some("machinen-secrets"),
            dir,
            Some("tmpfs"),
            flags,
            Some("mode=0700,size=1m"),
        )
        .map_err(|e| io::Error::other(format!("mount tmpfs on {}: {e}", dir.display())))?;
        *mounted = true;
    }
    Ok(())
}

/// Install `secrets` in `dir` (mounting a tmpfs there when `mount`).
/// Returns how many were written.
pub fn install(dir: &Path, secrets: &[Secret], mount: bool) -> Result<u32, WireError> {
    let mut total = 0usize;
    for s in secrets {
        if !valid_name(&s.name) {
            return Err(err(
                code::INVALID,
                format!(
                    "secret name {:?} is not valid: use letters, digits, '_', '-', '.'",
                    s.name
                ),
            ));
        }
        total += s.value.0.len();
    }
    if total > MAX_TOTAL {
        return Err(err(
            code::INVALID,
            format!("secrets total {total} bytes; at most {MAX_TOTAL} are accepted"),
        ));
    }
    ensure_tmpfs(dir, mount).map_err(|e| err(code::FAILED, format!("{}: {e}", dir.display())))?;
    for s in secrets {
        let target = dir.join(&s.name);
        let tmp = dir.join(format!(".{}.tmp", s.name));
        let _ = std::fs::remove_file(&tmp);
        let write = || -> io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .custom_flags(libc::O_CLOEXEC)
                .open(&tmp)?;
            f.write_all(&s.value.0)?;
            // Replacing a secret: zero the old value's pages first.
            if target.exists() {
                zero_file(&target)?;
            }
            std::fs::rename(&tmp, &target)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(err(code::FAILED, format!("{}: {e}", target.display())));
        }
    }
    Ok(secrets.len() as u32)
}

/// Zero, remove and (when this agent mounted it) unmount. Returns how many
/// secret files were removed.
pub fn wipe(dir: &Path) -> Result<u32, WireError> {
    let mut count = 0;
    let entries: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(err(code::FAILED, format!("{}: {e}", dir.display()))),
    };
    for p in entries {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_file() && m.nlink() >= 1 {
            if let Err(e) = zero_file(&p) {
                error!("secrets: cannot zero {}: {e}", p.display());
            }
        }
        let res = if m.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        match res {
            Ok(()) => {
                count += u32::from(
                    !p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.')),
                )
            }
            Err(e) => return Err(err(code::FAILED, format!("{}: {e}", p.display()))),
        }
    }
    let mut mounted = MOUNTED.lock().unwrap_or_else(|p| p.into_inner());
    if *mounted {
        match nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => *mounted = false,
            Err(e) => error!("secrets: umount {}: {e}", dir.display()),
        }
    }
    debug!("secrets: wiped {count}");
    Ok(count)
}

fn is_pid1() -> bool {
    nix::unistd::getpid().as_raw() == 1
}

/// The directory used: [`SECRETS_DIR`] in a guest; in host test mode
/// `MACHINEN_AGENT_SECRETS_DIR` or a directory under the temp dir.
pub fn dir() -> PathBuf {
    if is_pid1() {
        return PathBuf::from(SECRETS_DIR);
    }
    std::env::var_os(machinen_proto::env::AGENT_SECRETS_DIR)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("machinen-agent-secrets-{}", std::process::id()))
        })
}

/// Serve `Request::Secrets`.
pub async fn serve_install<W: AsyncWrite + Unpin>(wr: &mut W, secrets: Vec<Secret>) {
    let d = dir();
    let reply = match install(&d, &secrets, is_pid1()) {
        Ok(count) => Frame::Response(Response::SecretsSet {
            count,
            dir: d.to_string_lossy().into_owned(),
        }),
        Err(e) => Frame::Error(e),
    };
    drop(secrets);
    let _ = send(wr, &reply).await;
    let _ = wr.shutdown().await;
}

/// Serve `Request::WipeSecrets`.
pub async fn serve_wipe<W: AsyncWrite + Unpin>(wr: &mut W) {
    let reply = match wipe(&dir()) {
        Ok(count) => Frame::Response(Response::SecretsWiped { count }),
        Err(e) => Frame::Error(e),
    };
    let _ = send(wr, &reply).await;
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use machinen_proto::SecretValue;

    #[test]
    fn names() {
        assert!(valid_name("API_TOKEN") && valid_name("a.b-c"));
        assert!(
            !valid_name("")
                && !valid_name(".x")
                && !valid_name("a/b")
                && !valid_name("../x")
                && !valid_name(&"x".repeat(129))
        );
    }

    #[test]
    fn install_replace_and_wipe() {
        let dir = std::env::temp_dir().join(format!(
            "machinen-agent-secrets-test-{}",
            std::process::id()
        ));
        let s = |n: &str, v: &str| Secret {
            name: n.into(),
            value: SecretValue(v.as_bytes().to_vec()),
        };
        assert_eq!(
            install(&dir, &[s("A", "one"), s("B", "two")], false).expect("install"),
            2
        );
        assert_eq!(std::fs::read(dir.join("A")).expect("A"), b"one");
        assert_eq!(
            std::fs::metadata(dir.join("A")).expect("meta").mode() & 0o777,
            0o400
        );
        assert_eq!(install(&dir, &[s("A", "uno")], false).expect("replace"), 1);
        assert_eq!(std::fs::read(dir.join("A")).expect("A"), b"uno");
        assert!(install(&dir, &[s("../x", "v")], false).is_err());
        assert_eq!(wipe(&dir).expect("wipe"), 2);
        assert_eq!(std::fs::read_dir(&dir).expect("ls").count(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
