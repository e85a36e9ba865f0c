//! `Request::Exec`: run a program in the guest and stream its I/O over one
//! protocol stream.
//!
//! ```text
//! -> Request(Exec)                         (already read by the dispatcher)
//! <- Started { pid }  | Error { code, message }
//! -> Stdin* StdinEof? Signal* Resize*      (any time)
//! -> Hangup                                (the client went away)
//! <- Stdout* Stderr*
//! <- Exit { code, signal }                 (last frame; the stream closes)
//! ```
//!
//! A `Hangup` is what a terminal hang-up is to a shell's job: `SIGHUP` and
//! `SIGCONT` to the command's process group, then, if the command itself
//! outlives [`HANGUP_GRACE`], `SIGKILL` to the group. Processes that left
//! the group (`setsid`) are not touched, and group members that ignore
//! `SIGHUP` (`nohup`) survive when the command itself ends on it. A stream
//! that just ends (the session was lost) closes stdin and nothing else.
//!
//! The child runs in a session (and process group) of its own; with `tty` a
//! fresh pty is its controlling terminal. Its exit status comes from the
//! global [`Reaper`]. Output is read in chunks of at most [`MAX_CHUNK`] and
//! written to the stream with its flow control, so a fast producer is slowed
//! down to the host's pace instead of being buffered.

use machinen_proto::timeouts;
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::time::Duration;

use machinen_proto::{
    read_frame, send, ExecRequest, ExitStatus, Frame, WinSize, WireError, MAX_CHUNK,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::fdio::FdIo;
use crate::log::{debug, error};
use crate::reaper::Reaper;

/// `PATH` of an exec unless the request sets one.
pub const DEFAULT_PATH: &str = machinen_proto::DEFAULT_PATH;

/// After the child exited, output still arriving is forwarded; once nothing
/// arrived for this long (a background grandchild holding the pipes), stop.
pub const DRAIN_IDLE: Duration = timeouts::DRAIN_IDLE;

/// How long a hung-up command has to end on `SIGHUP` before its process
/// group is killed.
pub const HANGUP_GRACE: Duration = timeouts::HANGUP_GRACE;

/// Error codes sent in `Frame::Error` by an exec.
pub mod code {
    pub const COMMAND_NOT_FOUND: &str = machinen_proto::ErrorCode::ExecCommandNotFound.as_str();
    pub const SPAWN_FAILED: &str = machinen_proto::ErrorCode::ExecSpawnFailed.as_str();
}

fn wire_error(code: &str, message: impl Into<String>) -> WireError {
    WireError {
        code: code.to_owned(),
        message: message.into(),
    }
}

/// The environment of an exec: defaults, then the request's variables.
pub fn build_env(
    req_env: &[(String, String)],
    hostname: &str,
    tty: bool,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_owned(), DEFAULT_PATH.to_owned());
    env.insert("HOME".to_owned(), "/root".to_owned());
    env.insert("USER".to_owned(), "root".to_owned());
    env.insert("LOGNAME".to_owned(), "root".to_owned());
    env.insert("HOSTNAME".to_owned(), hostname.to_owned());
    if tty {
        env.insert("TERM".to_owned(), "xterm-256color".to_owned());
    }
    for (k, v) in crate::egress::env() {
        env.insert(k, v);
    }
    for (k, v) in req_env {
        env.insert(k.clone(), v.clone());
    }
    env
}

/// Where `argv[0]` resolves to.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolved {
    /// An executable regular file (absolute path).
    Found(PathBuf),
    /// Nothing by that name.
    NotFound,
    /// Something by that name, but not an executable file.
    NotExecutable(PathBuf),
}

fn is_executable_file(p: &Path) -> Option<bool> {
    let m = std::fs::metadata(p).ok()?;
    Some(m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Resolve `argv0` like `execvp` does: a name with a slash is a path
/// (relative to `cwd`), anything else is looked up in `path_var`.
pub fn resolve_program(argv0: &str, path_var: &str, cwd: &Path) -> Resolved {
    if argv0.is_empty() {
        return Resolved::NotFound;
    }
    if argv0.contains('/') {
        let p = cwd.join(argv0);
        return match is_executable_file(&p) {
            None => Resolved::NotFound,
            Some(true) => Resolved::Found(p),
            Some(false) => Resolved::NotExecutable(p),
        };
    }
    let mut not_exec = None;
    for dir in path_var.split(':') {
        // An empty PATH entry means the current directory.
        let dir = if dir.is_empty() {
            cwd.to_path_buf()
        } else {
            cwd.join(dir)
        };
        let p = dir.join(argv0);
        match is_executable_file(&p) {
            Some(true) => return Resolved::Found(p),
            Some(false) if not_exec.is_none() => not_exec = Some(p),
            _ => {}
        }
    }
    match not_exec {
        Some(p) => Resolved::NotExecutable(p),
        None => Resolved::NotFound,
    }
}

pub(crate) type BoxRead = Pin<Box<dyn AsyncRead + Send>>;

/// Where the host's stdin goes.
pub(crate) enum StdinSink {
    Pipe(Option<pipe::Sender>),
    Pty(FdIo),
}

pub(crate) struct Spawned {
    pub(crate) pid: u32,
    pub(crate) exit: oneshot::Receiver<ExitStatus>,
    pub(crate) stdin: StdinSink,
    pub(crate) stdout: BoxRead,
    pub(crate) stderr: Option<BoxRead>,
    /// The pty master, for `Resize`.
    pty: Option<FdIo>,
}

fn set_winsize(fd: i32, ws: WinSize) -> io::Result<()> {
    let w = libc::winsize {
        ws_row: ws.rows,
        ws_col: ws.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which
    // points to a live, initialised local; `fd` is an open descriptor owned
    // by the caller for the duration of the call.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &w as *const libc::winsize) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A new pty pair, both ends close-on-exec (the child gets the slave through
/// `dup2`, which clears the flag on the copies).
fn open_pty(winsize: Option<WinSize>) -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::{open, OFlag};
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    use nix::sys::stat::Mode;
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname_r(&master)?;
    // SAFETY: `into_raw_fd` gives up ownership of an open descriptor, which
    // the new OwnedFd takes over; nothing else refers to it.
    let master = unsafe { OwnedFd::from_raw_fd(master.into_raw_fd()) };
    let raw = open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: `open` just returned this descriptor; we are its only owner.
    let slave = unsafe { OwnedFd::from_raw_fd(raw) };
    if let Some(ws) = winsize {
        set_winsize(master.as_raw_fd(), ws)?;
    }
    Ok((master, slave))
}

/// The lowest pid a process the agent starts gets, main command or exec
/// (or half the kernel's `pid_max`, if that is lower). CRIU gives a moved
/// tree its pids back, and the VM it moves into has used the low ones for
/// its own boot: more CPUs mean more per-CPU kernel threads, so a process
/// started right after boot would meet its pid taken there. From here, no
/// fresh VM of any shape has reached yet; the agent's own helpers in the
/// target have ended before CRIU restores.
pub const PID_FLOOR: u32 = 10_000;

/// The floor on a kernel whose pids end at `pid_max`.
fn pid_floor(pid_max: u32) -> u32 {
    PID_FLOOR.min(pid_max / 2)
}

fn read_u32(path: &str) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Makes the kernel hand out pids above `to` from now on, unless its
/// counter is past it already. Pids in use are skipped whatever the counter
/// says, so a race with another fork is harmless. Best effort: without the
/// knob, pids come as they come.
pub(crate) fn raise_pid_counter(to: u32) {
    const LAST_PID: &str = "/proc/sys/kernel/ns_last_pid";
    if read_u32(LAST_PID).is_some_and(|last| last < to) {
        if let Err(e) = std::fs::write(LAST_PID, to.to_string()) {
            debug!("{LAST_PID}: {e}");
        }
    }
}

pub(crate) fn spawn(req: &ExecRequest, hostname: &str) -> Result<Spawned, WireError> {
    let Some(argv0) = req.argv.first() else {
        return Err(wire_error(code::SPAWN_FAILED, "empty argv: nothing to run"));
    };
    let cwd = PathBuf::from(req.cwd.as_deref().filter(|c| !c.is_empty()).unwrap_or("/"));
    match std::fs::metadata(&cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(wire_error(
                code::SPAWN_FAILED,
                format!("cwd {}: not a directory", cwd.display()),
            ));
        }
        Err(e) => {
            return Err(wire_error(
                code::SPAWN_FAILED,
                format!("cwd {}: {e}", cwd.display()),
            ))
        }
    }
    let ident = match req.user.as_deref() {
        Some(u) => Some(crate::user::lookup(u).map_err(|e| wire_error(code::SPAWN_FAILED, e))?),
        None => None,
    };
    let mut env = build_env(&req.env, hostname, req.tty);
    if let Some(id) = &ident {
        // The user's own HOME and name, unless the caller set them.
        let given = |k: &str| req.env.iter().any(|(key, _)| key == k);
        if !given("HOME") {
            env.insert("HOME".into(), id.home.clone().unwrap_or_else(|| "/".into()));
        }
        let name = id.name.clone().unwrap_or_else(|| id.uid.to_string());
        for k in ["USER", "LOGNAME"] {
            if !given(k) {
                env.insert(k.into(), name.clone());
            }
        }
    }
    let path_var = env.get("PATH").map(String::as_str).unwrap_or("");
    let program = match resolve_program(argv0, path_var, &cwd) {
        Resolved::Found(p) => p,
        Resolved::NotFound if argv0.contains('/') => {
            return Err(wire_error(
                code::COMMAND_NOT_FOUND,
                format!("{argv0}: no such file or directory"),
            ));
        }
        Resolved::NotFound => {
            return Err(wire_error(
                code::COMMAND_NOT_FOUND,
                format!("{argv0}: command not found in PATH={path_var}"),
            ));
        }
        Resolved::NotExecutable(p) => {
            return Err(wire_error(
                code::SPAWN_FAILED,
                format!(
                    "{argv0}: {} is not an executable file (permission denied)",
                    p.display()
                ),
            ));
        }
    };

    let spawn_err = |e: io::Error| wire_error(code::SPAWN_FAILED, format!("{argv0}: {e}"));
    let mut cmd = Command::new(&program);
    cmd.arg0(argv0)
        .args(&req.argv[1..])
        .env_clear()
        .envs(&env)
        .current_dir(&cwd);

    let mut master = None;
    if req.tty {
        let (m, slave) = open_pty(req.winsize)
            .map_err(|e| spawn_err(io::Error::other(format!("openpty: {e}"))))?;
        let s2 = slave.try_clone().map_err(spawn_err)?;
        let s3 = slave.try_clone().map_err(spawn_err)?;
        cmd.stdin(Stdio::from(slave))
            .stdout(Stdio::from(s2))
            .stderr(Stdio::from(s3));
        // SAFETY: runs in the forked child before exec; it only makes
        // async-signal-safe system calls (setsid, ioctl) and allocates
        // nothing (io::Error from an errno is not boxed).
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                // stdin is the pty slave by now: make it the controlling
                // terminal of the new session.
                if libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        master = Some(m);
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: runs in the forked child before exec; setsid is
        // async-signal-safe and nothing is allocated.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                Ok(())
            });
        }
    }

    if !req.rlimits.is_empty() {
        let limits = rlimits(&req.rlimits)
            .map_err(|e| wire_error(code::SPAWN_FAILED, format!("{argv0}: {e}")))?;
        // SAFETY: runs in the forked child before exec, before the user
        // switch below (raising a hard limit needs root); setrlimit is
        // async-signal-safe and the list was built before the fork.
        unsafe {
            cmd.pre_exec(move || {
                for (res, soft, hard) in &limits {
                    nix::sys::resource::setrlimit(*res, *soft, *hard)?;
                }
                Ok(())
            });
        }
    }

    if let Some(id) = ident {
        let groups: Vec<libc::gid_t> = id.groups.clone();
        // SAFETY: runs in the forked child before exec, after the session
        // setup above; setgroups/setgid/setuid are async-signal-safe and the
        // group list was allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(id.gid) != 0
                    || libc::setuid(id.uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    if let Some(max) = read_u32("/proc/sys/kernel/pid_max") {
        raise_pid_counter(pid_floor(max));
    }
    let (mut child, exit) = Reaper::global().spawn(&mut cmd).map_err(spawn_err)?;
    // The Command still holds our copies of the pty slave: close them now, or
    // the master never sees the end of the child's output.
    drop(cmd);
    let pid = child.id();
    debug!("exec pid {pid}: {:?}", req.argv);

    let wrap_err = |e: io::Error| {
        wire_error(
            code::SPAWN_FAILED,
            format!("{argv0}: i/o setup after spawn: {e}"),
        )
    };
    if let Some(m) = master {
        let io = FdIo::pty_master(m).map_err(wrap_err)?;
        return Ok(Spawned {
            pid,
            exit,
            stdin: StdinSink::Pty(io.clone()),
            stdout: Box::pin(io.clone()),
            stderr: None,
            pty: Some(io),
        });
    }
    let (Some(sin), Some(sout), Some(serr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(wire_error(
            code::SPAWN_FAILED,
            "child pipes missing after spawn",
        ));
    };
    let sin = pipe::Sender::from_owned_fd(OwnedFd::from(sin)).map_err(wrap_err)?;
    let sout = pipe::Receiver::from_owned_fd(OwnedFd::from(sout)).map_err(wrap_err)?;
    let serr = pipe::Receiver::from_owned_fd(OwnedFd::from(serr)).map_err(wrap_err)?;
    Ok(Spawned {
        pid,
        exit,
        stdin: StdinSink::Pipe(Some(sin)),
        stdout: Box::pin(sout),
        stderr: Some(Box::pin(serr)),
        pty: None,
    })
}

/// Run one exec on `stream`. Never fails: errors go to the host as frames
/// where the stream still works, and to the console log.
pub async fn run<S>(stream: S, req: ExecRequest, hostname: &str)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The halves live in two tasks: split so that neither loses a wake-up.
    let (rd, mut wr) = machinen_proto::split::split(stream);
    let sp = match spawn(&req, hostname) {
        Ok(sp) => sp,
        Err(e) => {
            debug!("exec {:?} refused: {}: {}", req.argv, e.code, e.message);
            let _ = send(&mut wr, &Frame::Error(e)).await;
            let _ = wr.shutdown().await;
            return;
        }
    };
    let pid = sp.pid;
    let mut connected = true;
    if let Err(e) = send(&mut wr, &Frame::Started { pid }).await {
        debug!("exec pid {pid}: host went away before Started: {e}");
        connected = false;
    }
    let (hangup_tx, hangup_rx) = oneshot::channel();
    let input = tokio::spawn(input_loop(rd, sp.stdin, pid, sp.pty, hangup_tx));
    let outputs = Outputs {
        stdout: sp.stdout,
        stderr: sp.stderr,
    };
    let (status, connected) =
        pump_output(&mut wr, connected, pid, outputs, sp.exit, hangup_rx).await;
    input.abort();
    debug!("exec pid {pid}: done, {status:?}");
    if connected {
        if let Err(e) = send(&mut wr, &Frame::Exit(status)).await {
            debug!("exec pid {pid}: could not send Exit: {e}");
        }
        let _ = wr.shutdown().await;
    }
}

/// Frames from the host: stdin data, EOF, signals, resizes, a hang-up.
/// Ends when the stream does or the client hung up (then the child's stdin
/// is closed); a hang-up is passed on to the output pump, which knows
/// whether the command still runs.
async fn input_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    mut stdin: StdinSink,
    pid: u32,
    pty: Option<FdIo>,
    hangup: oneshot::Sender<()>,
) {
    loop {
        let frame = match read_frame(&mut rd).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                debug!("exec pid {pid}: input stream: {e}");
                break;
            }
        };
        match frame {
            Frame::Stdin(data) => match &mut stdin {
                StdinSink::Pipe(slot) => {
                    if let Some(w) = slot {
                        if let Err(e) = w.write_all(&data).await {
                            // The child closed its stdin (or exited): the
                            // rest of the host's input goes nowhere.
                            debug!("exec pid {pid}: stdin: {e}");
                            *slot = None;
                        }
                    }
                }
                StdinSink::Pty(m) => {
                    if let Err(e) = m.write_all(&data).await {
                        debug!("exec pid {pid}: pty input: {e}");
                    }
                }
            },
            Frame::StdinEof => match &mut stdin {
                StdinSink::Pipe(slot) => *slot = None,
                // A terminal has no half-close; send the EOF character (^D)
                // as a terminal user would.
                StdinSink::Pty(m) => {
                    let _ = m.write_all(&[0x04]).await;
                }
            },
            Frame::Signal(n) => signal_group(pid, n),
            Frame::Hangup => {
                debug!("exec pid {pid}: the client hung up");
                let _ = hangup.send(());
                break;
            }
            Frame::Resize(ws) => match &pty {
                Some(m) => {
                    if let Err(e) = set_winsize(m.raw_fd(), ws) {
                        error!("exec pid {pid}: resize: {e}");
                    }
                }
                None => debug!("exec pid {pid}: resize without a tty ignored"),
            },
            other => debug!(
                "exec pid {pid}: unexpected frame ignored: {}",
                frame_name(&other)
            ),
        }
    }
    // Dropping `stdin` closes the child's stdin pipe.
}

/// The resource limits of a request, checked and mapped before the fork.
fn rlimits(
    list: &[machinen_proto::Rlimit],
) -> Result<Vec<(nix::sys::resource::Resource, u64, u64)>, String> {
    use nix::sys::resource::Resource as R;
    list.iter()
        .map(|r| {
            if let Some(p) = r.problem() {
                return Err(p);
            }
            let res = match r.resource.as_str() {
                "RLIMIT_AS" => R::RLIMIT_AS,
                "RLIMIT_CORE" => R::RLIMIT_CORE,
                "RLIMIT_CPU" => R::RLIMIT_CPU,
                "RLIMIT_DATA" => R::RLIMIT_DATA,
                "RLIMIT_FSIZE" => R::RLIMIT_FSIZE,
                "RLIMIT_LOCKS" => R::RLIMIT_LOCKS,
                "RLIMIT_MEMLOCK" => R::RLIMIT_MEMLOCK,
                "RLIMIT_MSGQUEUE" => R::RLIMIT_MSGQUEUE,
                "RLIMIT_NICE" => R::RLIMIT_NICE,
                "RLIMIT_NOFILE" => R::RLIMIT_NOFILE,
                "RLIMIT_NPROC" => R::RLIMIT_NPROC,
                "RLIMIT_RSS" => R::RLIMIT_RSS,
                "RLIMIT_RTPRIO" => R::RLIMIT_RTPRIO,
                "RLIMIT_RTTIME" => R::RLIMIT_RTTIME,
                "RLIMIT_SIGPENDING" => R::RLIMIT_SIGPENDING,
                "RLIMIT_STACK" => R::RLIMIT_STACK,
                other => return Err(format!("unknown resource limit {other:?}")),
            };
            Ok((res, r.soft, r.hard))
        })
        .collect()
}

/// Send signal `n` to the child's process group (its pid: it ran `setsid`).
fn signal_group(pid: u32, n: i32) {
    let sig = match nix::sys::signal::Signal::try_from(n) {
        Ok(s) => s,
        Err(_) => {
            error!("exec pid {pid}: invalid signal {n} ignored");
            return;
        }
    };
    let pgid = nix::unistd::Pid::from_raw(pid as i32);
    if let Err(e) = nix::sys::signal::killpg(pgid, sig) {
        debug!("exec pid {pid}: killpg {sig}: {e}");
    }
}

pub fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "Hello",
        Frame::HelloAck(_) => "HelloAck",
        Frame::Request(_) => "Request",
        Frame::Response(_) => "Response",
        Frame::Started { .. } => "Started",
        Frame::Stdin(_) => "Stdin",
        Frame::StdinEof => "StdinEof",
        Frame::Stdout(_) => "Stdout",
        Frame::Stderr(_) => "Stderr",
        Frame::Exit(_) => "Exit",
        Frame::Error(_) => "Error",
        Frame::Resize(_) => "Resize",
        Frame::Signal(_) => "Signal",
        Frame::Data(_) => "Data",
        Frame::Eof => "Eof",
        Frame::Hangup => "Hangup",
    }
}

/// Read from an optional source; a missing one never yields.
pub(crate) async fn read_some(r: &mut Option<BoxRead>, buf: &mut [u8]) -> io::Result<usize> {
    match r {
        Some(r) => r.read(buf).await,
        None => std::future::pending().await,
    }
}

/// The child's output streams.
struct Outputs {
    stdout: BoxRead,
    stderr: Option<BoxRead>,
}

/// Forward the child's output until it exited and its output ended (or went
/// idle for [`DRAIN_IDLE`] after the exit). Returns the exit status, and
/// whether the stream still works.
///
/// When the stream fails (the host went away), the output is still read
/// and dropped: the command keeps running as if nothing happened, instead
/// of dying of SIGPIPE or blocking on a full pipe. When the client hung up,
/// the command's group is signalled (see the module documentation).
async fn pump_output<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut connected: bool,
    pid: u32,
    outputs: Outputs,
    mut exit: oneshot::Receiver<ExitStatus>,
    mut hangup: oneshot::Receiver<()>,
) -> (ExitStatus, bool) {
    let mut out = Some(outputs.stdout);
    let mut err = outputs.stderr;
    let mut status: Option<ExitStatus> = None;
    let mut idle_deadline: Option<Instant> = None;
    let mut hangup_open = true;
    let mut kill_deadline: Option<Instant> = None;
    let mut obuf = vec![0u8; MAX_CHUNK];
    let mut ebuf = vec![0u8; MAX_CHUNK];
    loop {
        if let Some(st) = status {
            if out.is_none() && err.is_none() {
                return (st, connected);
            }
        }
        let idle = async {
            match idle_deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let kill = async {
            match kill_deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        // Which output produced data, and how much.
        let got = tokio::select! {
            // The exit first: a command known to have ended (its pid maybe
            // reused) is never signalled.
            biased;
            r = &mut exit, if status.is_none() => {
                // The reaper never drops a registered sender; be safe anyway.
                status = Some(r.unwrap_or(ExitStatus { code: None, signal: None }));
                idle_deadline = Some(Instant::now() + DRAIN_IDLE);
                None
            }
            r = &mut hangup, if hangup_open => {
                hangup_open = false;
                // An error is the input loop ending without a hang-up.
                if r.is_ok() && status.is_none() {
                    debug!("exec pid {pid}: hung up; SIGHUP to its process group");
                    signal_group(pid, libc::SIGHUP);
                    signal_group(pid, libc::SIGCONT);
                    kill_deadline = Some(Instant::now() + HANGUP_GRACE);
                    // Nobody reads the output any more.
                    connected = false;
                }
                None
            }
            _ = kill, if status.is_none() => {
                kill_deadline = None;
                debug!("exec pid {pid}: still running {} ms after the hang-up; SIGKILL to its process group", HANGUP_GRACE.as_millis());
                signal_group(pid, libc::SIGKILL);
                None
            }
            r = read_some(&mut out, &mut obuf) => match r {
                Ok(0) => { out = None; None }
                Ok(n) => Some((true, n)),
                Err(e) => {
                    debug!("exec pid {pid}: stdout: {e}");
                    out = None;
                    None
                }
            },
            r = read_some(&mut err, &mut ebuf) => match r {
                Ok(0) => { err = None; None }
                Ok(n) => Some((false, n)),
                Err(e) => {
                    debug!("exec pid {pid}: stderr: {e}");
                    err = None;
                    None
                }
            },
            _ = idle => {
                if let Some(st) = status {
                    debug!("exec pid {pid}: output still open {} ms after the exit; not waiting for it", DRAIN_IDLE.as_millis());
                    return (st, connected);
                }
                None
            }
        };
        if let Some((is_stdout, n)) = got {
            if status.is_some() {
                idle_deadline = Some(Instant::now() + DRAIN_IDLE);
            }
            if connected {
                let frame = if is_stdout {
                    Frame::Stdout(obuf[..n].to_vec())
                } else {
                    Frame::Stderr(ebuf[..n].to_vec())
                };
                if let Err(e) = send(wr, &frame).await {
                    debug!("exec pid {pid}: the host went away ({e}); the command keeps running, its output is dropped");
                    connected = false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_floor_keeps_half_of_a_small_pid_range_for_the_vm() {
        assert_eq!(pid_floor(32_768), PID_FLOOR);
        assert_eq!(pid_floor(4_194_304), PID_FLOOR);
        assert_eq!(pid_floor(4_096), 2_048);
    }

    #[test]
    fn env_defaults_and_overrides() {
        let env = build_env(
            &[("PATH".into(), "/x".into()), ("FOO".into(), "a=b".into())],
            "box",
            false,
        );
        assert_eq!(env["PATH"], "/x");
        assert_eq!(env["FOO"], "a=b");
        assert_eq!(env["HOME"], "/root");
        assert_eq!(env["USER"], "root");
        assert_eq!(env["LOGNAME"], "root");
        assert_eq!(env["HOSTNAME"], "box");
        assert!(!env.contains_key("TERM"));
        let env = build_env(&[], "box", true);
        assert_eq!(env["TERM"], "xterm-256color");
        assert_eq!(env["PATH"], DEFAULT_PATH);
        let env = build_env(&[("TERM".into(), "dumb".into())], "box", true);
        assert_eq!(env["TERM"], "dumb");
    }

    #[test]
    fn resolves_like_execvp() {
        let root = Path::new("/");
        assert!(matches!(
            resolve_program("sh", DEFAULT_PATH, root),
            Resolved::Found(_)
        ));
        assert_eq!(
            resolve_program("no-such-command-xyz", DEFAULT_PATH, root),
            Resolved::NotFound
        );
        assert_eq!(
            resolve_program("sh", "", Path::new("/nonexistent")),
            Resolved::NotFound
        );
        assert_eq!(
            resolve_program("/bin/sh", "", root),
            Resolved::Found(PathBuf::from("/bin/sh"))
        );
        assert_eq!(
            resolve_program("./sh", "", Path::new("/bin")),
            Resolved::Found(PathBuf::from("/bin/./sh"))
        );
        assert_eq!(
            resolve_program("/nonexistent/x", DEFAULT_PATH, root),
            Resolved::NotFound
        );
        let dir =
            std::env::temp_dir().join(format!("machinen-agent-resolve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let plain = dir.join("plain");
        std::fs::write(&plain, "x").expect("write");
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(
            resolve_program(plain.to_str().expect("utf8"), "", root),
            Resolved::NotExecutable(plain.clone())
        );
        assert_eq!(
            resolve_program("plain", dir.to_str().expect("utf8"), root),
            Resolved::NotExecutable(plain)
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(
            resolve_program("/bin", "", root),
            Resolved::NotExecutable(_)
        ));
        assert_eq!(resolve_program("", DEFAULT_PATH, root), Resolved::NotFound);
    }
}
