//! The virtiofsd servers of a VM's live mounts (see
//! `machinen::live_mounts`): one per mount, started before QEMU on a
//! listening socket made here, so QEMU's `vhost-user-fs-device` connects
//! without waiting for the server to come up, and the server needs no
//! write access to the VM's directory (it may run as another user).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::process::Stdio;

use machinen::live_mounts::{self, LiveShares};
use machinen::spec::VmSpec;
use tokio::process::{Child, Command};

use super::EngineError;

/// The descriptor virtiofsd finds its listening socket on (`--fd`).
const LISTEN_FD: i32 = 3;

fn spawn_err(binary: String) -> impl FnOnce(std::io::Error) -> EngineError {
    move |source| EngineError::Spawn { binary, source }
}

/// Start a virtiofsd for each live mount of `spec`.
pub fn spawn_all(spec: &VmSpec) -> Result<Vec<Child>, EngineError> {
    let Some(shares) = &spec.live_mounts else {
        return Ok(Vec::new());
    };
    let restoring = spec.restore.is_some();
    let mut children = Vec::with_capacity(shares.mounts.len());
    for i in 0..shares.mounts.len() {
        children.push(spawn_one(spec, shares, i, restoring)?);
    }
    Ok(children)
}

fn spawn_one(
    spec: &VmSpec,
    shares: &LiveShares,
    i: usize,
    restoring: bool,
) -> Result<Child, EngineError> {
    let m = &shares.mounts[i];
    let sock = spec.path_in(&live_mounts::socket_name(i));
    // A socket left by a supervisor that died: the name is ours.
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).map_err(spawn_err(sock.display().to_string()))?;
    let listener = OwnedFd::from(listener);
    let log_path = spec.path_in(&live_mounts::log_name(i));
    let log =
        machinen::vm::private_file(&log_path).map_err(spawn_err(log_path.display().to_string()))?;
    let who = live_mounts::identity(&m.host).map_err(spawn_err(m.host.display().to_string()))?;
    let switch = who.uid != nix::unistd::geteuid().as_raw();
    // Run as another user, it is executed through a descriptor opened
    // here: that user may not be able to reach the program's path (say,
    // root's ~/.cargo/bin), only to execute the file. (A script would not
    // run that way; as ourselves, the path is used.)
    let program = if switch {
        Some(
            std::fs::File::open(&shares.virtiofsd)
                .map_err(spawn_err(shares.virtiofsd.display().to_string()))?,
        )
    } else {
        None
    };
    let mut cmd = match &program {
        Some(f) => std::process::Command::new(format!("/proc/self/fd/{}", f.as_raw_fd())),
        None => std::process::Command::new(&shares.virtiofsd),
    };
    cmd.arg0("virtiofsd")
        .args(live_mounts::virtiofsd_args(m, LISTEN_FD, restoring, who))
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(spawn_err(log_path.display().to_string()))?,
        )
        .stderr(log);
    if switch {
        // Root shares another user's directory as that user (std drops the
        // supplementary groups too).
        cmd.uid(who.uid).gid(who.gid);
    }
    let fd = listener.as_raw_fd();
    // SAFETY: only async-signal-safe calls (prctl, dup2, fcntl) between
    // fork and exec, on descriptors valid in the child. They run after
    // std's setuid, which would clear PDEATHSIG: virtiofsd dies with the
    // supervisor, like QEMU.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if fd == LISTEN_FD {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, LISTEN_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_err(shares.virtiofsd.display().to_string()))?;
    drop((listener, program));
    Ok(child)
}

/// What the servers logged, for an engine that failed to start.
pub fn log_tails(spec: &VmSpec) -> String {
    let Some(shares) = &spec.live_mounts else {
        return String::new();
    };
    (0..shares.mounts.len())
        .filter_map(|i| {
            let t = super::qemu::tail(&spec.path_in(&live_mounts::log_name(i)), 600);
            (!t.is_empty()).then(|| format!(" [virtiofsd of {}: {t}]", shares.mounts[i].guest))
        })
        .collect()
}
