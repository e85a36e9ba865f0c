//! Admission of guest RAM files to the RAM directory (tmpfs, `/dev/shm` or
//! `MACHINEN_RAM_DIR`).
//!
//! A RAM file is sparse: it occupies only the pages the guest has touched,
//! but the guest may touch all of them later, and a write fault QEMU cannot
//! back (the tmpfs is full) kills it with SIGBUS. So the free space alone
//! says nothing: every RAM file already in the directory can still grow to
//! its apparent size. A new file is admitted only when the free space covers
//! what all existing files can still claim plus the new one's ceiling.
//!
//! The files are counted by name (`machinen-*.ram`), not through a registry:
//! VMs of other registries (other users, other `MACHINEN_REGISTRY_DIR`s)
//! share the directory, and `stat` of their files works without being able
//! to read them. An admitted file is created at once at its full apparent
//! size (holes only), so the next admission, even from another registry,
//! counts it. Admission runs under the registry lock, so two boots of one
//! registry cannot both pass on the same free space.

use std::fs;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Coded, ErrorCode};

/// Prefix and suffix of RAM file names in the RAM directory.
const PREFIX: &str = "machinen-";
const SUFFIX: &str = ".ram";

/// The RAM directory, or `None` when RAM files are turned off
/// (`MACHINEN_RAM_DIR` set and empty).
pub fn ram_dir() -> Option<PathBuf> {
    match std::env::var_os(machinen_proto::env::RAM_DIR) {
        Some(v) if v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => Some(PathBuf::from("/dev/shm")),
    }
}

/// The RAM file name of VM `id` in `dir`.
pub fn ram_file_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{PREFIX}{id}{SUFFIX}"))
}

/// The RAM file of VM `id`, when it has one.
pub fn ram_file_of(id: &str) -> Option<PathBuf> {
    ram_dir()
        .map(|dir| ram_file_path(&dir, id))
        .filter(|p| p.exists())
}

/// What the RAM directory holds and owes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes an unprivileged writer can still allocate (`f_bavail`).
    pub available: u64,
    /// Bytes existing RAM files can still claim: their apparent size minus
    /// what they occupy.
    pub claimed: u64,
}

impl Usage {
    /// Whether a RAM file of `need` bytes fits beside every existing one
    /// growing to its full size.
    pub fn admits(&self, need: u64) -> bool {
        self.claimed
            .checked_add(need)
            .is_some_and(|total| total <= self.available)
    }
}

/// What one RAM file can still claim: its ceiling minus what it holds.
pub fn unclaimed(apparent: u64, allocated_blocks: u64) -> u64 {
    apparent.saturating_sub(allocated_blocks.saturating_mul(512))
}

/// Measure `dir`: free space and the outstanding claims of its RAM files.
pub fn usage(dir: &Path) -> std::io::Result<Usage> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    let available = (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64);
    let mut claimed = 0u64;
    for e in fs::read_dir(dir)?.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(PREFIX) && name.ends_with(SUFFIX)) {
            continue;
        }
        // Not following links: a RAM file is always a regular file.
        let Ok(m) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        if m.is_file() {
            claimed = claimed.saturating_add(unclaimed(m.len(), m.blocks()));
        }
    }
    Ok(Usage { available, claimed })
}

/// A RAM file no process uses: its VM was killed with its supervisor
/// (nothing was left to remove it) and its registry entry is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub path: PathBuf,
    /// The VM id in its name.
    pub id: String,
    /// Bytes it holds.
    pub bytes: u64,
}

/// How old an unused RAM file must be to count as an orphan: a boot creates
/// its file (admission) a moment before QEMU maps it.
pub const ORPHAN_GRACE: std::time::Duration = std::time::Duration::from_secs(120);

/// The RAM files in `dir` of our own user that no process maps or holds
/// open, last changed more than `grace` ago, and whose id is not in `keep`.
/// Only our own processes' maps are readable (all of them for root), which
/// is enough: only we can use a file of our own mode-0600.
pub fn orphans(dir: &Path, keep: &[String], grace: std::time::Duration) -> Vec<Orphan> {
    let uid = nix::unistd::getuid().as_raw();
    let now = std::time::SystemTime::now();
    let candidates: Vec<Orphan> = fs::read_dir(dir)
        .map(|rd| rd.flatten().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?.to_string();
            let m = fs::symlink_metadata(e.path()).ok()?;
            let old = m
                .modified()
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > grace);
            (m.is_file() && m.uid() == uid && old && !keep.contains(&id)).then(|| Orphan {
                path: e.path(),
                id,
                bytes: m.blocks().saturating_mul(512),
            })
        })
        .collect();
    if candidates.is_empty() {
        return candidates;
    }
    let used = files_in_use();
    candidates
        .into_iter()
        .filter(|o| !used.contains(&o.path))
        .collect()
}

/// Every file some process we can see maps or holds open.
fn files_in_use() -> std::collections::HashSet<PathBuf> {
    let mut used = std::collections::HashSet::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return used;
    };
    for p in procs.flatten() {
        if !p
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        if let Ok(maps) = fs::read_to_string(p.path().join("maps")) {
            for line in maps.lines() {
                // The path is the sixth field and may hold spaces.
                if let Some(i) = line.find('/') {
                    used.insert(PathBuf::from(line[i..].trim_end_matches(" (deleted)")));
                }
            }
        }
        if let Ok(fds) = fs::read_dir(p.path().join("fd")) {
            for fd in fds.flatten() {
                if let Ok(target) = fs::read_link(fd.path()) {
                    used.insert(target);
                }
            }
        }
    }
    used
}

/// Why a VM gets no RAM file.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    #[error("RAM files are turned off (MACHINEN_RAM_DIR is empty)")]
    Disabled,
    #[error(
        "no room for a {need_mib} MiB RAM file in {dir}: {available_mib} MiB free, of which the RAM files of running VMs can still claim {claimed_mib} MiB"
    )]
    Full {
        dir: PathBuf,
        need_mib: u64,
        available_mib: u64,
        claimed_mib: u64,
    },
    #[error("cannot use the RAM directory {dir}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Coded for RamError {
    fn code(&self) -> ErrorCode {
        match self {
            RamError::Disabled => ErrorCode::BootArgsInvalid,
            RamError::Full { .. } => ErrorCode::BootRamDirFull,
            RamError::Io { .. } => ErrorCode::Io,
        }
    }
    fn hint(&self) -> Option<String> {
        Some(match self {
            RamError::Disabled => "unset MACHINEN_RAM_DIR (or point it at a tmpfs) to use RAM files".into(),
            RamError::Full { dir, .. } => format!(
                "stop VMs or free space in {}, lower --memory, or point MACHINEN_RAM_DIR at a larger tmpfs",
                dir.display()
            ),
            RamError::Io { dir, .. } => format!("check that {} exists and is writable, or set MACHINEN_RAM_DIR", dir.display()),
        })
    }
}

/// Admit a RAM file of `memory_mib` for VM `id` and create it (mode 0600,
/// full apparent size, no pages), so that later admissions count it. Call
/// under the registry lock. QEMU opens the existing file.
pub fn reserve(id: &str, memory_mib: u32) -> Result<PathBuf, RamError> {
    let dir = ram_dir().ok_or(RamError::Disabled)?;
    let path = admit(&dir, id, memory_mib)?;
    create_sized(&path, (memory_mib as u64) << 20)
        .map_err(|source| RamError::Io { dir, source })?;
    Ok(path)
}

/// Admit a RAM file of `memory_mib` for VM `id` without creating it (the
/// caller creates it at once: a restore's copy of a bundle's RAM).
pub fn admit_path(id: &str, memory_mib: u32) -> Result<PathBuf, RamError> {
    let dir = ram_dir().ok_or(RamError::Disabled)?;
    admit(&dir, id, memory_mib)
}

fn admit(dir: &Path, id: &str, memory_mib: u32) -> Result<PathBuf, RamError> {
    let need = (memory_mib as u64) << 20;
    let u = usage(dir).map_err(|source| RamError::Io {
        dir: dir.to_path_buf(),
        source,
    })?;
    if !u.admits(need) {
        return Err(RamError::Full {
            dir: dir.to_path_buf(),
            need_mib: need >> 20,
            available_mib: u.available >> 20,
            claimed_mib: u.claimed >> 20,
        });
    }
    Ok(ram_file_path(dir, id))
}

fn create_sized(path: &Path, len: u64) -> std::io::Result<()> {
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    if let Err(e) = f.set_len(len) {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const MIB: u64 = 1 << 20;

    #[test]
    fn orphans_are_old_unused_files_of_ours_not_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        let mk = |id: &str| {
            let p = ram_file_path(dir.path(), id);
            fs::write(&p, vec![1u8; 8192]).expect("write");
            p
        };
        let (gone, kept, open, young) = (mk("aaaa"), mk("bbbb"), mk("cccc"), mk("dddd"));
        fs::write(dir.path().join("other.ram"), b"x").expect("write");
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(600);
        for p in [&gone, &kept, &open] {
            fs::File::options()
                .write(true)
                .open(p)
                .and_then(|f| f.set_modified(old))
                .expect("age");
        }
        let _held = fs::File::open(&open).expect("open");
        let found = orphans(dir.path(), &["bbbb".to_string()], ORPHAN_GRACE);
        assert_eq!(
            found.iter().map(|o| o.path.clone()).collect::<Vec<_>>(),
            vec![gone],
            "{found:?}"
        );
        assert!(found[0].bytes >= 8192);
        drop(young);
    }

    #[test]
    fn admission_counts_what_existing_files_can_still_claim() {
        // 700 MiB free, one 512 MiB VM that touched 20 MiB: 492 MiB owed.
        let u = Usage {
            available: 700 * MIB,
            claimed: unclaimed(512 * MIB, 20 * MIB / 512),
        };
        assert_eq!(u.claimed, 492 * MIB);
        assert!(!u.admits(512 * MIB), "a second 512 MiB VM would overcommit");
        assert!(u.admits(208 * MIB), "exactly what is left fits");
        assert!(!u.admits(209 * MIB));
        // A fully touched file owes nothing more; blocks beyond the size
        // (filesystem rounding) never make a negative claim.
        assert_eq!(unclaimed(512 * MIB, 512 * MIB / 512), 0);
        assert_eq!(unclaimed(4096, 16), 0);
        assert!(
            !Usage {
                available: u64::MAX,
                claimed: u64::MAX
            }
            .admits(1),
            "no overflow"
        );
        assert!(Usage {
            available: 512 * MIB,
            claimed: 0
        }
        .admits(512 * MIB));
    }

    #[test]
    fn usage_counts_only_ram_files_and_their_holes() {
        let tmp = tempfile::tempdir().expect("tmp");
        let a = ram_file_path(tmp.path(), "a");
        create_sized(&a, 64 * MIB).expect("create");
        assert_eq!(
            fs::metadata(&a).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        // The guest touched 1 MiB of it.
        {
            use std::os::unix::fs::FileExt;
            let f = fs::OpenOptions::new().write(true).open(&a).expect("open");
            f.write_all_at(&vec![1u8; MIB as usize], 0).expect("write");
            f.sync_all().expect("sync");
        }
        // Not RAM files: another program's file, a directory.
        fs::write(tmp.path().join("other.ram"), vec![0u8; 4096]).expect("other");
        fs::create_dir(tmp.path().join("machinen-dir.ram")).expect("dir");
        let u = usage(tmp.path()).expect("usage");
        assert!(
            u.claimed <= 63 * MIB && u.claimed >= 62 * MIB,
            "claimed {} MiB",
            u.claimed / MIB
        );
        assert!(u.available > 0);
        assert!(
            create_sized(&a, MIB).is_err(),
            "an existing RAM file is never reused"
        );
    }

    #[test]
    fn a_full_dir_is_refused_with_its_code_and_a_hint() {
        let tmp = tempfile::tempdir().expect("tmp");
        let err = admit(tmp.path(), "x", u32::MAX).expect_err("4 PiB do not fit");
        assert_eq!(err.code(), ErrorCode::BootRamDirFull);
        assert!(err.code().retryable());
        assert!(err.to_string().contains("can still claim"), "{err}");
        assert!(err.hint().is_some_and(|h| h.contains("MACHINEN_RAM_DIR")));
        let ok = admit(tmp.path(), "x", 1).expect("1 MiB fits");
        assert_eq!(ok, tmp.path().join("machinen-x.ram"));
        assert!(!ok.exists(), "admission alone creates nothing");
    }
}
