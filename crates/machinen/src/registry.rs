//! The VM registry: one directory per VM under [`Paths::registry`].
//!
//! ```text
//! <registry>/.lock          flock held while names are checked and claimed
//! <registry>/<id>/meta.json  RegistryEntry (atomic writes)
//! <registry>/<id>/…          sockets, console log, disk overlay of that VM
//! ```
//!
//! Directories are keyed by a short random id, not by name: names may be
//! path-shaped (`a/b/c`), and unix socket paths must stay short. A VM is
//! *live* while its supervisor process runs; a pid is only trusted together
//! with the process start time recorded next to it, so a recycled pid is
//! never mistaken for our supervisor.

use machinen_proto::timeouts;
use machinen_proto::VmState;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Coded, ErrorCode};

/// Longest accepted VM name.
pub const MAX_NAME_LEN: usize = 128;

/// A directory without `meta.json` younger than this is a VM being created.
const CLAIM_GRACE: Duration = timeouts::REGISTRY_CLAIM_GRACE;

/// One port forward, as recorded for `ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForward {
    pub host_addr: String,
    pub host_port: u16,
    pub guest_port: u16,
}

/// What `meta.json` holds about one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryEntry {
    pub id: String,
    pub name: String,
    /// `starting`, `running`, `recovering` (the agent session is being
    /// re-established), `unhealthy` (it could not be), `stopping`;
    /// `crashed` once the VM ended without being asked to (see `cause`).
    pub state: VmState,
    /// Why the VM is `recovering` or `unhealthy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub supervisor_pid: u32,
    /// Start time of the supervisor process (clock ticks after boot, from
    /// `/proc/<pid>/stat`), to detect pid reuse.
    pub supervisor_start: u64,
    #[serde(default)]
    pub qemu_pid: Option<u32>,
    #[serde(default)]
    pub qemu_start: Option<u64>,
    pub control_socket: PathBuf,
    #[serde(default)]
    pub console_log: Option<PathBuf>,
    #[serde(default)]
    pub image: Option<PathBuf>,
    #[serde(default)]
    pub disk: Option<PathBuf>,
    #[serde(default)]
    pub ports: Vec<PortForward>,
    #[serde(default)]
    pub forked_from: Option<String>,
    #[serde(default)]
    pub memory_mib: u32,
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub accel: String,
    #[serde(default)]
    pub detached: bool,
    /// Unix time in milliseconds.
    pub created_at_ms: u64,
    /// Why a `crashed` VM ended: QEMU's exit status or signal and its last
    /// words. The entry and the VM's logs stay until `gc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// When a `crashed` VM ended (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at_ms: Option<u64>,
    /// A placeholder: the directory is claimed and its disk being prepared
    /// by `supervisor_pid`, the launching process (no supervisor yet, so
    /// nothing to stop; see `vm::hold_claim`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preparing: bool,
    /// The VM's main command and, once it exited, how (service VMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main: Option<crate::service::MainRecord>,
    /// The VM's copy-once mounts (host directory as copied, guest path).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<crate::mounts::Mount>,
    /// The VM's live mounts (host directory, guest path, mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub live_mounts: Vec<crate::live_mounts::LiveMount>,
    /// How it reaches the network (entries of older versions: unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::spec::NetworkMode>,
    /// Its egress policy, as the supervisor last set it (`None`: open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_policy: Option<machinen_proto::netpolicy::NetPolicy>,
    /// Its egress secrets: names, hosts, placeholders (never values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_secrets: Vec<machinen_proto::egress::EgressSecretSpec>,
}

impl RegistryEntry {
    /// Whether its supervisor still runs.
    pub fn is_live(&self) -> bool {
        is_alive(self.supervisor_pid, self.supervisor_start)
    }

    /// Why a VM that is not live ended: the cause its supervisor recorded,
    /// or, when the supervisor itself died first, that.
    pub fn death_cause(&self) -> String {
        if self.state == VmState::Exited {
            if let Some(text) = self.main.as_ref().and_then(|m| m.status_text()) {
                return format!("its main command {text}");
            }
        }
        match &self.cause {
            Some(c) => c.clone(),
            None => format!("its supervisor (pid {}) died without recording why (killed, or the host restarted)", self.supervisor_pid),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid VM name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("a live VM is already named {name:?} (pid {pid})")]
    NameInUse { name: String, pid: u32 },
    #[error("no live VM matches {target:?}")]
    NotFound { target: String },
    #[error("registry i/o on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unreadable registry entry {path}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl Coded for RegistryError {
    fn code(&self) -> ErrorCode {
        match self {
            RegistryError::InvalidName { .. } => ErrorCode::RegistryNameInvalid,
            RegistryError::NameInUse { .. } => ErrorCode::RegistryNameInUse,
            RegistryError::NotFound { .. } => ErrorCode::RegistryNotFound,
            RegistryError::Io { .. } | RegistryError::Corrupt { .. } => ErrorCode::RegistryIo,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            RegistryError::InvalidName { .. } => Some(
                "names are 1-128 characters of letters, digits, '.', '_', '-', \
                 optionally in '/'-separated segments, and not all digits"
                    .into(),
            ),
            RegistryError::NameInUse { name, .. } => {
                Some(format!("pick another --name, or `machinen stop {name}` first"))
            }
            RegistryError::NotFound { .. } => Some("`machinen ls` lists the live VMs".into()),
            RegistryError::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => Some(
                "a registry is private to the user who owns it: use your own (MACHINEN_REGISTRY_DIR), or run as its owner".into(),
            ),
            RegistryError::Io { .. } => Some("check permissions of the registry directory (MACHINEN_REGISTRY_DIR)".into()),
            RegistryError::Corrupt { .. } => Some("`machinen gc` removes entries of dead VMs".into()),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Check a VM name. Path-shaped names (`team/app/web`) are fine.
pub fn validate_name(name: &str) -> Result<(), RegistryError> {
    let bad = |reason| {
        Err(RegistryError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 128 characters");
    }
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return bad("all digits (it would read as a pid)");
    }
    for seg in name.split('/') {
        if seg.is_empty() {
            return bad("empty path segment");
        }
        if seg == "." || seg == ".." {
            return bad("'.' and '..' segments are not allowed");
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        {
            return bad("only letters, digits, '.', '_', '-' and '/' are allowed");
        }
    }
    Ok(())
}

/// The contents of a small regular file, refusing (not blocking on) a fifo,
/// a device or a symlink put where an entry's `meta.json` belongs.
fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    let mut bytes = Vec::new();
    f.take(1 << 20).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Start time of a process (field 22 of `/proc/<pid>/stat`), or `None`
/// when no such process exists (or it is a zombie).
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is parenthesised and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(22 - 3)?.parse().ok()
}

/// Whether `pid` still runs the process that started at `start`.
pub fn is_alive(pid: u32, start: u64) -> bool {
    pid != 0 && process_start_time(pid) == Some(start)
}

/// Unix time now, in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Write `bytes` to `path` atomically: temp file (0600), fsync, rename,
/// fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::assets::fsutil::write_atomic(path, bytes)
}

/// An exclusive lock on the registry, released on drop.
pub struct RegistryLock {
    _file: fs::File,
}

/// The registry rooted at one directory.
#[derive(Debug, Clone)]
pub struct Registry {
    root: PathBuf,
}

/// A VM directory that has been claimed under the lock but whose entry is
/// not written yet.
#[derive(Debug)]
pub struct Claim {
    pub id: String,
    pub dir: PathBuf,
}

impl Registry {
    pub fn new(root: impl Into<PathBuf>) -> Registry {
        Registry { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The root is private to the user who owns the registry (0700): other
    /// users cannot list, read or connect to anything in it. A root made by
    /// an older version with 0755 is tightened here.
    fn ensure_root(&self) -> Result<(), RegistryError> {
        crate::assets::fsutil::create_private_dir_all(&self.root).map_err(io_err(&self.root))
    }

    /// Take the registry lock (blocking; held only for short critical sections).
    pub fn lock(&self) -> Result<RegistryLock, RegistryError> {
        self.ensure_root()?;
        let path = self.root.join(".lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(RegistryError::Io {
                path,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(RegistryLock { _file: file })
    }

    /// Directory of the VM with this id.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    fn read_entry(&self, dir: &Path) -> Result<Option<RegistryEntry>, RegistryError> {
        let path = dir.join("meta.json");
        match read_regular(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| RegistryError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RegistryError::Io { path, source: e }),
        }
    }

    /// The per-VM directories (a missing registry has none).
    fn vm_dirs(&self) -> Result<Vec<fs::DirEntry>, RegistryError> {
        crate::assets::fsutil::tighten_dir(&self.root);
        match fs::read_dir(&self.root) {
            Ok(rd) => Ok(rd
                .flatten()
                .filter(|de| de.file_type().is_ok_and(|t| t.is_dir()))
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(RegistryError::Io {
                path: self.root.clone(),
                source: e,
            }),
        }
    }

    /// Every entry with a readable `meta.json`, live or not.
    pub fn entries(&self) -> Result<Vec<RegistryEntry>, RegistryError> {
        let mut out = Vec::new();
        for de in self.vm_dirs()? {
            // A corrupt entry must not hide the others; gc removes it.
            if let Ok(Some(e)) = self.read_entry(&de.path()) {
                out.push(e);
            }
        }
        out.sort_by(|a, b| {
            a.created_at_ms
                .cmp(&b.created_at_ms)
                .then(a.name.cmp(&b.name))
        });
        Ok(out)
    }

    /// Live entries only.
    pub fn live(&self) -> Result<Vec<RegistryEntry>, RegistryError> {
        Ok(self
            .entries()?
            .into_iter()
            .filter(|e| is_alive(e.supervisor_pid, e.supervisor_start))
            .collect())
    }

    /// Under the lock: check that `name` is free among live VMs and create a
    /// fresh VM directory for it. Directories of dead VMs with that name are
    /// left for `gc`.
    pub fn claim(&self, _lock: &RegistryLock, name: &str) -> Result<Claim, RegistryError> {
        validate_name(name)?;
        if let Some(e) = self.live()?.into_iter().find(|e| e.name == name) {
            return Err(RegistryError::NameInUse {
                name: name.to_string(),
                pid: e.supervisor_pid,
            });
        }
        self.fresh_dir()
    }

    /// A new, empty VM directory under a random id.
    fn fresh_dir(&self) -> Result<Claim, RegistryError> {
        self.ensure_root()?;
        loop {
            let id = random_id();
            let dir = self.dir(&id);
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(Claim { id, dir }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(RegistryError::Io {
                        path: dir,
                        source: e,
                    })
                }
            }
        }
    }

    /// Under the lock: a fresh VM directory for a VM whose name is only
    /// known once its supervisor runs (`<source>/<pid>`, unique by pid).
    pub fn claim_anonymous(&self, _lock: &RegistryLock) -> Result<Claim, RegistryError> {
        self.fresh_dir()
    }

    /// Write (create or replace) an entry atomically.
    pub fn write(&self, entry: &RegistryEntry) -> Result<(), RegistryError> {
        let path = self.dir(&entry.id).join("meta.json");
        let bytes = serde_json::to_vec_pretty(entry).map_err(|source| RegistryError::Corrupt {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &bytes).map_err(io_err(&path))
    }

    /// Find a VM, live or not (for its logs): a live one by name or pid
    /// first, else the newest dead one with that name, pid or id.
    pub fn find_any(&self, target: &str) -> Result<RegistryEntry, RegistryError> {
        if let Ok(e) = self.find(target) {
            return Ok(e);
        }
        let pid: Option<u32> = if target.bytes().all(|b| b.is_ascii_digit()) {
            target.parse().ok()
        } else {
            None
        };
        let mut hits: Vec<RegistryEntry> = self
            .entries()?
            .into_iter()
            .filter(|e| {
                e.name == target
                    || e.id == target
                    || pid.is_some_and(|p| e.supervisor_pid == p || e.qemu_pid == Some(p))
            })
            .collect();
        hits.sort_by_key(|e| e.created_at_ms);
        hits.pop().ok_or_else(|| RegistryError::NotFound {
            target: target.to_string(),
        })
    }

    /// Find a live VM by name, id (as `ls --json` shows it), or supervisor
    /// or QEMU pid. A name wins over another VM's id.
    pub fn find(&self, target: &str) -> Result<RegistryEntry, RegistryError> {
        let mut live = self.live()?;
        let pid: Option<u32> = if target.bytes().all(|b| b.is_ascii_digit()) {
            target.parse().ok()
        } else {
            None
        };
        let hit = match pid {
            Some(p) => live
                .into_iter()
                .find(|e| e.supervisor_pid == p || e.qemu_pid == Some(p)),
            None => {
                let by_name = live.iter().position(|e| e.name == target);
                let at = by_name.or_else(|| live.iter().position(|e| e.id == target));
                at.map(|i| live.swap_remove(i))
            }
        };
        hit.ok_or_else(|| RegistryError::NotFound {
            target: target.to_string(),
        })
    }

    /// Remove one VM directory and everything in it.
    pub fn remove(&self, id: &str) -> Result<(), RegistryError> {
        let dir = self.dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RegistryError::Io {
                path: dir,
                source: e,
            }),
        }
    }

    /// Directories that belong to no live VM: dead supervisors, unreadable
    /// entries, and claims abandoned for longer than a grace period.
    pub fn stale(&self) -> Result<Vec<Stale>, RegistryError> {
        let mut out = Vec::new();
        for de in self.vm_dirs()? {
            let dir = de.path();
            let id = de.file_name().to_string_lossy().into_owned();
            match self.read_entry(&dir) {
                Ok(Some(e)) => {
                    if !e.is_live() {
                        let reason = if e.state == VmState::Crashed {
                            "crashed"
                        } else if e.preparing {
                            "its launcher died while preparing it"
                        } else if e.state == VmState::Exited {
                            "exited"
                        } else {
                            "supervisor is gone"
                        };
                        out.push(Stale {
                            id,
                            dir,
                            entry: Some(e),
                            reason,
                        });
                    }
                }
                Ok(None) => {
                    let age = de
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .unwrap_or(Duration::MAX);
                    if age > CLAIM_GRACE {
                        out.push(Stale {
                            id,
                            dir,
                            entry: None,
                            reason: "abandoned before it started",
                        });
                    }
                }
                Err(_) => out.push(Stale {
                    id,
                    dir,
                    entry: None,
                    reason: "unreadable meta.json",
                }),
            }
        }
        Ok(out)
    }
}

/// A registry directory that no live VM owns.
#[derive(Debug, Clone)]
pub struct Stale {
    pub id: String,
    pub dir: PathBuf,
    pub entry: Option<RegistryEntry>,
    pub reason: &'static str,
}

fn random_id() -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().gen();
    format!("{:012x}", n & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(reg: &Registry, claim: &Claim, name: &str, pid: u32, start: u64) -> RegistryEntry {
        RegistryEntry {
            id: claim.id.clone(),
            name: name.into(),
            state: VmState::Running,
            reason: None,
            supervisor_pid: pid,
            supervisor_start: start,
            qemu_pid: None,
            qemu_start: None,
            control_socket: reg.dir(&claim.id).join("control.sock"),
            console_log: None,
            image: None,
            disk: None,
            ports: vec![],
            forked_from: None,
            memory_mib: 512,
            cpus: 1,
            accel: "tcg".into(),
            detached: true,
            created_at_ms: now_ms(),
            cause: None,
            ended_at_ms: None,
            preparing: false,
            main: None,
            mounts: vec![],
            live_mounts: vec![],
            network: None,
            net_policy: None,
            egress_secrets: vec![],
        }
    }

    #[test]
    fn names() {
        for ok in ["web", "a/b/c", "my-vm_1.2", "x1"] {
            validate_name(ok).expect(ok);
        }
        for bad in [
            "",
            "123",
            "a//b",
            "/a",
            "a/",
            "a/../b",
            ".",
            "a b",
            "a\nb",
            &"x".repeat(129),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn own_process_is_alive_and_recycled_pid_is_not() {
        let me = std::process::id();
        let start = process_start_time(me).expect("own start time");
        assert!(is_alive(me, start));
        assert!(
            !is_alive(me, start + 1),
            "a different start time means a recycled pid"
        );
        assert!(!is_alive(0, 0));
        assert!(process_start_time(u32::MAX).is_none());
    }

    #[test]
    fn claim_find_and_name_conflicts() {
        let tmp = tempfile::tempdir().expect("tmp");
        let reg = Registry::new(tmp.path().join("vms"));
        let me = std::process::id();
        let start = process_start_time(me).expect("start");
        let lock = reg.lock().expect("lock");
        let c = reg.claim(&lock, "team/web").expect("claim");
        reg.write(&entry(&reg, &c, "team/web", me, start))
            .expect("write");
        let err = reg.claim(&lock, "team/web").expect_err("taken");
        assert_eq!(err.code(), ErrorCode::RegistryNameInUse);
        assert_eq!(reg.find("team/web").expect("by name").id, c.id);
        assert_eq!(reg.find(&me.to_string()).expect("by pid").id, c.id);
        assert_eq!(reg.find(&c.id).expect("by id").id, c.id);
        assert_eq!(
            reg.find("nope").expect_err("missing").code(),
            ErrorCode::RegistryNotFound
        );
        assert!(reg.stale().expect("stale").is_empty());
    }

    #[test]
    fn dead_entries_free_the_name_and_are_stale() {
        let tmp = tempfile::tempdir().expect("tmp");
        let reg = Registry::new(tmp.path().join("vms"));
        let lock = reg.lock().expect("lock");
        let c = reg.claim(&lock, "web").expect("claim");
        // pid 1's real start time is never u64::MAX: a dead (recycled) entry.
        reg.write(&entry(&reg, &c, "web", 1, u64::MAX))
            .expect("write");
        assert!(reg.live().expect("live").is_empty());
        assert_eq!(reg.entries().expect("all").len(), 1);
        let c2 = reg.claim(&lock, "web").expect("name is free again");
        assert_ne!(c.id, c2.id);
        let stale = reg.stale().expect("stale");
        assert_eq!(
            stale.len(),
            1,
            "fresh claim without meta is in grace, dead one is stale"
        );
        assert_eq!(stale[0].id, c.id);
        reg.remove(&c.id).expect("remove");
        assert!(!reg.dir(&c.id).exists());
    }

    #[test]
    fn crashed_entries_keep_their_cause_and_are_found_by_name_id_or_pid() {
        let tmp = tempfile::tempdir().expect("tmp");
        let reg = Registry::new(tmp.path().join("vms"));
        let lock = reg.lock().expect("lock");
        let c = reg.claim(&lock, "web").expect("claim");
        let mut e = entry(&reg, &c, "web", 1, u64::MAX);
        e.qemu_pid = Some(4242);
        reg.write(&e).expect("write");
        assert!(reg
            .find_any("web")
            .expect("dead")
            .death_cause()
            .contains("died without recording why"));
        e.state = VmState::Crashed;
        e.cause = Some("QEMU was killed by signal 9 (SIGKILL)".into());
        reg.write(&e).expect("write");
        assert_eq!(
            reg.find("web").expect_err("not live").code(),
            ErrorCode::RegistryNotFound
        );
        for t in ["web", c.id.as_str(), "4242"] {
            assert_eq!(reg.find_any(t).expect(t).id, c.id);
        }
        assert!(reg.find_any("nope").is_err());
        let stale = reg.stale().expect("stale");
        assert_eq!(
            (
                stale[0].reason,
                stale[0].entry.as_ref().map(|e| e.death_cause())
            ),
            ("crashed", e.cause.clone())
        );
        // Entries written before `cause` existed still read.
        let old = serde_json::to_value(entry(&reg, &c, "web", 1, u64::MAX)).expect("json");
        assert!(
            old.get("cause").is_none(),
            "absent, not null, when there is none"
        );
        let back: RegistryEntry = serde_json::from_value(old).expect("old entry");
        assert_eq!(back.cause, None);
        assert_eq!(back.main, None, "entries from before service VMs read");
    }

    #[test]
    fn exited_entries_say_how_their_main_command_ended() {
        let tmp = tempfile::tempdir().expect("tmp");
        let reg = Registry::new(tmp.path().join("vms"));
        let lock = reg.lock().expect("lock");
        let c = reg.claim(&lock, "job").expect("claim");
        let mut e = entry(&reg, &c, "job", 1, u64::MAX);
        e.state = VmState::Exited;
        e.main = Some(crate::service::MainRecord {
            argv: vec!["make".into()],
            keep_alive_on_exit: false,
            exit: Some(machinen_proto::ExitStatus {
                code: Some(7),
                signal: None,
            }),
            exited_at_ms: Some(2),
        });
        reg.write(&e).expect("write");
        let stale = reg.stale().expect("stale");
        assert_eq!(
            (
                stale[0].reason,
                stale[0].entry.as_ref().map(|e| e.death_cause())
            ),
            ("exited", Some("its main command exited 7".to_string()))
        );
        assert_eq!(reg.find_any("job").expect("ended").main, e.main);
    }

    #[test]
    fn the_root_and_vm_dirs_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("a/vms");
        let reg = Registry::new(&root);
        let lock = reg.lock().expect("lock");
        let c = reg.claim(&lock, "web").expect("claim");
        reg.write(&entry(&reg, &c, "web", 1, u64::MAX))
            .expect("write");
        let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&c.dir), 0o700);
        assert_eq!(mode(&c.dir.join("meta.json")), 0o600);
        assert_eq!(mode(&root.join(".lock")), 0o600);
        // A registry made by an older version is tightened when read.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).expect("chmod");
        reg.entries().expect("entries");
        assert_eq!(mode(&root), 0o700);
    }

    #[test]
    fn corrupt_entry_is_stale_not_fatal() {
        let tmp = tempfile::tempdir().expect("tmp");
        let reg = Registry::new(tmp.path());
        fs::create_dir_all(reg.dir("abc")).expect("mkdir");
        fs::write(reg.dir("abc").join("meta.json"), b"{not json").expect("write");
        assert!(reg.entries().expect("entries").is_empty());
        assert_eq!(
            reg.stale().expect("stale")[0].reason,
            "unreadable meta.json"
        );
    }

    #[test]
    fn atomic_write_replaces() {
        let tmp = tempfile::tempdir().expect("tmp");
        let p = tmp.path().join("f");
        write_atomic(&p, b"one").expect("w1");
        write_atomic(&p, b"two").expect("w2");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        assert_eq!(
            fs::read_dir(tmp.path()).expect("ls").count(),
            1,
            "no temp files left"
        );
    }
}
