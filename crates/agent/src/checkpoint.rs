//! The CRIU engine's guest side: `Request::CriuDump` and
//! `Request::CriuRestore`.
//!
//! Both run CRIU through the agent's CRIU mode (`/proc/self/exe --criu DIR`,
//! see [`crate::criu`]) from the tree the host staged. A dump of the main
//! command marks it as being dumped first, so that its end (CRIU kills the
//! tree it dumped) is not reported as an exit: the host then either powers
//! the VM off or restores the tree in place. A restore that adopts the
//! tree as the main command hands CRIU fresh pipes for the descriptors that
//! were the main command's pipes (`--inherit-fd`), so its output goes on
//! into the agent's ring; the restored process is the agent's orphan (CRIU
//! detaches), reaped like any other and claimed here by its pid.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use machinen_proto::{
    send, timeouts, CriuDumpRequest, CriuDumped, CriuRestoreRequest, ErrorCode, Frame, Response,
    WireError,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;

use crate::log::debug;
use crate::reaper::Reaper;
use crate::service::{Adopted, MainSlot};

/// Most of CRIU's error lines kept in an error message (the last ones:
/// the earlier are often its probes of the kernel, which it survives).
const REASON_LINES: usize = 2;

fn wire(code: ErrorCode, message: impl Into<String>) -> WireError {
    WireError {
        code: code.as_str().into(),
        message: message.into(),
    }
}

async fn answer<S>(mut s: S, frame: Frame)
where
    S: AsyncWrite + Unpin,
{
    let _ = send(&mut s, &frame).await;
    let _ = s.shutdown().await;
}

/// CRIU's own account of a failure: the error lines of its log (the last
/// few), else the tail of what it printed.
fn reason(log: &Path, printed: &str) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error (") || l.contains("Error:"))
        .filter(|l| !l.contains("FAILED."))
        .map(|l| {
            // CRIU's timestamp, "(00.468144) ", says nothing here.
            let l = l.trim();
            match l.strip_prefix('(').and_then(|r| r.split_once(") ")) {
                Some((t, rest)) if t.bytes().all(|b| b.is_ascii_digit() || b == b'.') => rest,
                _ => l,
            }
        })
        .collect();
    if errors.is_empty() {
        errors = printed
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
    }
    let skip = errors.len().saturating_sub(REASON_LINES);
    let r = errors[skip..].join("; ");
    if r.is_empty() {
        "CRIU gave no reason".into()
    } else {
        r
    }
}

/// Run CRIU (through the agent's CRIU mode) with `fds` as its descriptors
/// 3, 4, …; on failure, why (from its `log`, else what it printed).
async fn run_criu(
    criu_dir: &str,
    args: Vec<String>,
    fds: Vec<OwnedFd>,
    bound: std::time::Duration,
    log: &Path,
) -> Result<(), String> {
    match run_criu_status(criu_dir, args, fds, bound).await? {
        (0, _) => Ok(()),
        (code, printed) => Err(format!(
            "{} (CRIU exit status {code})",
            reason(log, &printed)
        )),
    }
}

/// [`run_criu`]'s exit status and output, or why CRIU did not run.
async fn run_criu_status(
    criu_dir: &str,
    args: Vec<String>,
    fds: Vec<OwnedFd>,
    bound: std::time::Duration,
) -> Result<(i32, String), String> {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg("--criu")
        .arg(criu_dir)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // At most three, in a fixed array: the child must not allocate.
    let n = fds.len().min(3);
    let mut raw = [-1i32; 3];
    for (r, fd) in raw.iter_mut().zip(&fds) {
        *r = fd.as_raw_fd();
    }
    if n > 0 {
        // SAFETY: runs in the forked child before exec; fcntl and dup2 are
        // async-signal-safe and nothing is allocated (the array is copied
        // into the closure). The copies dup2 makes (3, 4, 5) are not
        // close-on-exec; a source below 6 is moved to a spare first so
        // that no dup2 overwrites a source still to be copied.
        unsafe {
            cmd.pre_exec(move || {
                let mut src = raw;
                for s in src.iter_mut().take(n) {
                    if *s < 6 {
                        let spare = libc::fcntl(*s, libc::F_DUPFD_CLOEXEC, 64);
                        if spare == -1 {
                            return Err(std::io::Error::last_os_error());
                        }
                        *s = spare;
                    }
                }
                for (i, s) in src.iter().take(n).enumerate() {
                    if libc::dup2(*s, 3 + i as i32) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    let (mut child, exit) = Reaper::global()
        .spawn(&mut cmd)
        .map_err(|e| format!("cannot run CRIU: {e}"))?;
    drop(cmd);
    // The child holds its copies now.
    drop(fds);
    let out = child.stdout.take();
    let err = child.stderr.take();
    let printed = async move {
        let mut text = Vec::new();
        for p in [out.map(OwnedFd::from), err.map(OwnedFd::from)]
            .into_iter()
            .flatten()
        {
            if let Ok(mut r) = pipe::Receiver::from_owned_fd(p) {
                let mut buf = Vec::new();
                let _ = (&mut r).take(64 * 1024).read_to_end(&mut buf).await;
                text.extend_from_slice(&buf);
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    };
    let pid = child.id() as i32;
    match tokio::time::timeout(bound, async { tokio::join!(exit, printed) }).await {
        Ok((status, printed)) => {
            let code = status.map(|s| s.shell_code()).unwrap_or(-1);
            Ok((code, printed))
        }
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            Err(format!("CRIU did not finish within {} s", bound.as_secs()))
        }
    }
}

fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// A descriptor's target as `/proc` shows it (`pipe:[123]`, a path), or "".
fn fd_target(pid: u32, fd: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// `pipe:[DIGITS]`: the only kind of key a restore hands to CRIU.
fn is_pipe_key(k: &str) -> bool {
    k.strip_prefix("pipe:[")
        .and_then(|r| r.strip_suffix(']'))
        .is_some_and(|n| !n.is_empty() && n.len() <= 20 && n.bytes().all(|b| b.is_ascii_digit()))
}

fn images_dir(path: &str) -> Result<&Path, WireError> {
    let p = Path::new(path);
    if !p.is_absolute() || p.components().any(|c| c.as_os_str() == "..") {
        return Err(wire(
            ErrorCode::FilesPathInvalid,
            format!("{path}: not an absolute guest path"),
        ));
    }
    Ok(p)
}

pub async fn serve_dump<S>(s: S, slot: Arc<MainSlot>, req: CriuDumpRequest)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let frame = match dump(&slot, req).await {
        Ok(d) => Frame::Response(Response::CriuDumped(d)),
        Err(e) => Frame::Error(e),
    };
    answer(s, frame).await;
}

async fn dump(slot: &MainSlot, req: CriuDumpRequest) -> Result<CriuDumped, WireError> {
    let main_pid = slot.running_pid();
    let pid = match req.pid.or(main_pid) {
        Some(p) => p,
        None => {
            return Err(wire(
                ErrorCode::MainNotRunning,
                "this VM runs no main command: name the process tree to dump by its pid",
            ))
        }
    };
    if pid <= 1 || pid == std::process::id() {
        return Err(wire(
            ErrorCode::SnapshotDumpFailed,
            format!(
                "pid {pid} is the guest's init (the agent): only its descendants can be dumped"
            ),
        ));
    }
    let Some(name) = comm(pid) else {
        return Err(wire(
            ErrorCode::SnapshotDumpFailed,
            format!("no process {pid} runs in the guest"),
        ));
    };
    let dir = images_dir(&req.images)?;
    std::fs::create_dir_all(dir).map_err(|e| {
        wire(
            ErrorCode::SnapshotDumpFailed,
            format!("cannot create {}: {e}", dir.display()),
        )
    })?;
    let is_main = main_pid == Some(pid);
    let stdio: Vec<String> = (0..3).map(|fd| fd_target(pid, fd)).collect();
    let mut args: Vec<String> = ["dump", "-t", &pid.to_string(), "-D", &req.images]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // Connections are dumped with their state; the restore decides whether
    // they come back repaired or closed.
    args.extend(["-o", "dump.log", "-v4", "--tcp-established", "--file-locks"].map(String::from));
    if req.leave_running {
        args.push("--leave-running".into());
    }
    if is_main {
        slot.begin_checkpoint(pid);
    }
    debug!("criu dump of pid {pid} ({name}) into {}", req.images);
    let ran = run_criu(
        &req.criu,
        args,
        Vec::new(),
        timeouts::CRIU_DUMP,
        &dir.join("dump.log"),
    )
    .await;
    if let Err(why) = ran {
        // CRIU resumes the tree when a dump fails.
        slot.end_checkpoint();
        return Err(wire(
            ErrorCode::SnapshotDumpFailed,
            format!("CRIU cannot dump process {pid} ({name}): {why}"),
        ));
    }
    if req.leave_running {
        slot.end_checkpoint();
    }
    Ok(CriuDumped {
        pid,
        comm: name,
        main: is_main,
        stdio,
    })
}

pub async fn serve_restore<S>(s: S, slot: Arc<MainSlot>, req: CriuRestoreRequest)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let frame = match restore(&slot, req).await {
        Ok(pid) => Frame::Response(Response::CriuRestored { pid }),
        Err(e) => Frame::Error(e),
    };
    answer(s, frame).await;
}

use machinen_proto::criu_top_pid_in as top_pid;

/// CRIU gives every process its dumped pid back: make the kernel hand out
/// pids above them from now on, so that nothing started meanwhile (CRIU
/// itself, the agent's threads) takes one.
fn reserve_pids(images: &Path) {
    crate::exec::raise_pid_counter(top_pid(images));
}

fn pipe_pair() -> Result<(OwnedFd, OwnedFd), WireError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| wire(ErrorCode::RestoreBundleIncompatible, format!("pipe: {e}")))
}

async fn restore(slot: &Arc<MainSlot>, req: CriuRestoreRequest) -> Result<u32, WireError> {
    let dir = images_dir(&req.images)?;
    if let (Some(_), Some(pid)) = (&req.main, slot.running_pid()) {
        if comm(pid).is_some() {
            return Err(wire(
                ErrorCode::MainAlreadyRunning,
                format!("this VM's main command already runs (pid {pid})"),
            ));
        }
    }
    let pidfile = dir.join("restore.pid");
    let _ = std::fs::remove_file(&pidfile);
    let mut args: Vec<String> = vec![
        "restore".into(),
        "-D".into(),
        req.images.clone(),
        "-d".into(),
        "--pidfile".into(),
        pidfile.display().to_string(),
        "-o".into(),
        "restore.log".into(),
        "-v4".into(),
        "--file-locks".into(),
    ];
    if req.tcp_close {
        args.push("--tcp-close".into());
    }
    // The main command's pipes: CRIU's 3, 4, 5 stand for its 0, 1, 2.
    let mut fds = Vec::new();
    let mut ours: (Option<OwnedFd>, Option<OwnedFd>, Option<OwnedFd>) = (None, None, None);
    if let Some(stdio) = &req.main {
        let (in_r, in_w) = pipe_pair()?;
        let (out_r, out_w) = pipe_pair()?;
        let (err_r, err_w) = pipe_pair()?;
        let mut given: Vec<&str> = Vec::new();
        for (i, key) in stdio.iter().take(3).enumerate() {
            if !is_pipe_key(key) || given.contains(&key.as_str()) {
                continue;
            }
            given.push(key);
            args.push("--inherit-fd".into());
            args.push(format!("fd[{}]:{key}", 3 + i));
        }
        fds = vec![in_r, out_w, err_w];
        ours = (Some(in_w), Some(out_r), Some(err_r));
    }
    reserve_pids(dir);
    debug!("criu restore from {}", req.images);
    let log = dir.join("restore.log");
    if let Err(why) = run_criu(&req.criu, args, fds, timeouts::CRIU_RESTORE, &log).await {
        return Err(wire(
            ErrorCode::RestoreBundleIncompatible,
            format!("CRIU could not restore the process tree here: {why}"),
        ));
    }
    let pid = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .ok_or_else(|| {
            wire(
                ErrorCode::RestoreBundleIncompatible,
                format!(
                    "CRIU restored the tree but wrote no pid to {}",
                    pidfile.display()
                ),
            )
        })?;
    let exit = Reaper::global().register(pid as i32);
    if let (Some(in_w), Some(out_r), Some(err_r)) = ours {
        let io_err = |e: std::io::Error| {
            wire(
                ErrorCode::RestoreBundleIncompatible,
                format!("restored pid {pid}: i/o setup: {e}"),
            )
        };
        let stdin = if req.stdin {
            Some(pipe::Sender::from_owned_fd(in_w).map_err(io_err)?)
        } else {
            None
        };
        let io = Adopted {
            stdout: Box::pin(pipe::Receiver::from_owned_fd(out_r).map_err(io_err)?),
            stderr: Some(Box::pin(
                pipe::Receiver::from_owned_fd(err_r).map_err(io_err)?,
            )),
            stdin,
            exit,
        };
        slot.adopt(pid, io, req.first_seq)?;
        debug!("main command pid {pid} restored by CRIU");
    }
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pipe_keys_reach_criu() {
        assert!(is_pipe_key("pipe:[10270]"));
        for bad in [
            "pipe:[]",
            "pipe:[12a]",
            "/dev/null",
            "pipe:[1] --evil",
            "socket:[5]",
            "pipe:[123456789012345678901]",
        ] {
            assert!(!is_pipe_key(bad), "{bad}");
        }
    }

    #[test]
    fn the_top_pid_is_read_from_the_core_images() {
        let d = std::env::temp_dir().join(format!("ckpt-pids-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("test io");
        assert_eq!(top_pid(&d), 0);
        for f in [
            "core-84.img",
            "core-118.img",
            "core-x.img",
            "mm-900.img",
            "core-7.img",
        ] {
            std::fs::write(d.join(f), b"").expect("test io");
        }
        assert_eq!(top_pid(&d), 118);
        std::fs::remove_dir_all(&d).expect("test io");
    }

    #[test]
    fn images_must_be_absolute_and_plain() {
        assert!(images_dir("/run/x").is_ok());
        assert!(images_dir("run/x").is_err());
        assert!(images_dir("/run/../etc").is_err());
    }

    #[test]
    fn the_reason_is_criu_s_error_lines() {
        let d = std::env::temp_dir().join(format!("ckpt-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("test io");
        let log = d.join("dump.log");
        std::fs::write(
            &log,
            "(00.1) Error (criu/tun.c:85): probe\n(00.1) Error (criu/net.c:1): veth\n(00.2) Error (criu/sk-unix.c:1): unix: Can't dump\n(00.3) Error (criu/cr-dump.c:2053): Dumping FAILED.\nok\n",
        )
        .expect("test io");
        assert_eq!(
            reason(&log, "ignored"),
            "Error (criu/net.c:1): veth; Error (criu/sk-unix.c:1): unix: Can't dump"
        );
        assert_eq!(reason(&d.join("none"), "\nboom\n"), "boom");
        assert_eq!(reason(&d.join("none"), ""), "CRIU gave no reason");
        std::fs::remove_dir_all(&d).expect("test io");
    }
}
