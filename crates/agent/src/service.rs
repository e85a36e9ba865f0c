//! The VM's main command: `Request::StartMain` and `Request::AttachMain`.
//!
//! The main command is a guest process like an exec's, but the agent owns
//! it instead of a stream: its output goes into a bounded ring of
//! sequence-numbered records ([`RING_BYTES`]) and its exit status is kept
//! here. A host session reads them with `AttachMain { from_seq }`, and any
//! later session can do the same: after a snapshot and restore the process
//! runs on in the restored guest (with this ring, which is guest memory),
//! and the new supervisor re-attaches from the last record it logged. The
//! process never waits for the host: output the host does not collect in
//! time falls out of the ring (the host sees the gap in the numbering).
//!
//! ```text
//! -> Request(StartMain(ExecRequest))      <- Started { pid } | Error
//! -> Request(AttachMain { from_seq })     <- Response(MainAttached { pid, seq })
//!                                         <- Stdout | Stderr   (records seq, seq+1, …)
//!                                         <- Response(MainAttached { .. })  (after a gap)
//!                                         <- Exit { code, signal }  (ended, all sent)
//! ```

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use machinen_proto::{
    send, timeouts, ExecRequest, ExitStatus, Frame, MainRequest, Response, WireError, MAX_CHUNK,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::exec::{self, BoxRead};
use crate::log::debug;

/// Output the agent keeps for the host, in bytes (the newest records).
pub const RING_BYTES: usize = 1 << 20;

/// Most record bytes one attach turn takes out of the ring before writing
/// them (so the lock is never held across a write).
const BATCH_BYTES: usize = 256 * 1024;

pub mod code {
    pub const ALREADY_RUNNING: &str = machinen_proto::ErrorCode::MainAlreadyRunning.as_str();
    pub const NOT_RUNNING: &str = machinen_proto::ErrorCode::MainNotRunning.as_str();
}

/// One chunk of the main command's output.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    stdout: bool,
    data: Vec<u8>,
}

/// The main command of this guest.
#[derive(Debug)]
struct Main {
    pid: u32,
    /// The newest records; the first one is number `next_seq - len`.
    records: VecDeque<Record>,
    bytes: usize,
    next_seq: u64,
    /// Set once the process exited and its output ended (or went idle).
    exit: Option<ExitStatus>,
}

impl Main {
    fn first_seq(&self) -> u64 {
        self.next_seq - self.records.len() as u64
    }

    fn push(&mut self, stdout: bool, data: Vec<u8>) {
        self.bytes += data.len();
        self.records.push_back(Record { stdout, data });
        self.next_seq += 1;
        while self.bytes > RING_BYTES {
            match self.records.pop_front() {
                Some(r) => self.bytes -= r.data.len(),
                None => break,
            }
        }
    }

    /// Records from `from` on (at most about [`BATCH_BYTES`]), and the
    /// number of the first one returned.
    fn take_from(&self, from: u64) -> (u64, Vec<Record>) {
        let start = from.clamp(self.first_seq(), self.next_seq);
        let skip = (start - self.first_seq()) as usize;
        let mut out = Vec::new();
        let mut bytes = 0;
        for r in self.records.iter().skip(skip) {
            if bytes >= BATCH_BYTES {
                break;
            }
            bytes += r.data.len();
            out.push(r.clone());
        }
        (start, out)
    }
}

/// The agent's one main-command slot, shared by every session.
#[derive(Debug, Default)]
pub struct MainSlot {
    main: Mutex<Option<Main>>,
    changed: Notify,
    /// The main command's stdin, when it was started with one; one writer
    /// at a time holds the lock.
    stdin: Arc<tokio::sync::Mutex<Option<tokio::net::unix::pipe::Sender>>>,
    /// The host installed secrets (see `MainRequest::after_secrets`).
    secrets: std::sync::atomic::AtomicBool,
    secrets_set: Notify,
    /// The pid of a main command CRIU is dumping (0: none): its end is the
    /// dump's doing, not an exit to report; a restore adopts it again.
    checkpointing: std::sync::atomic::AtomicU32,
}

impl MainSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Main>> {
        // A panic while holding the lock leaves plain data behind.
        self.main.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The main command's pid while it runs.
    pub(crate) fn running_pid(&self) -> Option<u32> {
        self.lock()
            .as_ref()
            .filter(|m| m.exit.is_none())
            .map(|m| m.pid)
    }

    fn push(&self, stdout: bool, data: Vec<u8>) {
        if let Some(m) = self.lock().as_mut() {
            m.push(stdout, data);
        }
        self.changed.notify_waiters();
    }

    /// Called after a `Secrets` request was served.
    pub fn secrets_installed(&self) {
        self.secrets
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.secrets_set.notify_waiters();
    }

    async fn wait_for_secrets(&self) {
        let wait = async {
            loop {
                let notified = self.secrets_set.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.secrets.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(timeouts::MAIN_SECRETS_WAIT, wait)
            .await
            .is_err()
        {
            debug!("main command: no secrets arrived; starting it without them");
        }
    }

    fn finish(&self, pid: u32, status: ExitStatus) {
        if let Some(m) = self.lock().as_mut().filter(|m| m.pid == pid) {
            if self.checkpointing.load(std::sync::atomic::Ordering::SeqCst) == pid {
                debug!("main command pid {pid} ended by its CRIU dump; its output goes on after a restore");
                return;
            }
            m.exit = Some(status);
        }
        self.changed.notify_waiters();
    }

    /// CRIU is about to dump the main command `pid`: its end is not an exit.
    pub(crate) fn begin_checkpoint(&self, pid: u32) {
        self.checkpointing
            .store(pid, std::sync::atomic::Ordering::SeqCst);
    }

    /// The dump failed and the process runs on (CRIU resumed it), or it
    /// went on running (`--leave-running`).
    pub(crate) fn end_checkpoint(&self) {
        self.checkpointing
            .store(0, std::sync::atomic::Ordering::SeqCst);
    }

    /// Make the restored `pid` the main command. A main command this guest
    /// dumped keeps its ring and numbering (a keep-alive checkpoint); else
    /// the numbering starts at `first_seq` (the bundle's log ends there).
    /// `MAIN_ALREADY_RUNNING` when another one runs.
    pub(crate) fn adopt(
        self: &Arc<Self>,
        pid: u32,
        io: Adopted,
        first_seq: u64,
    ) -> Result<(), WireError> {
        {
            let mut guard = self.lock();
            let dumped = self.checkpointing.load(std::sync::atomic::Ordering::SeqCst);
            match guard.as_mut() {
                Some(m) if m.exit.is_none() && m.pid != dumped => {
                    return Err(WireError {
                        code: code::ALREADY_RUNNING.into(),
                        message: format!("this VM's main command already runs (pid {})", m.pid),
                    });
                }
                Some(m) if m.pid == dumped && m.exit.is_none() => m.pid = pid,
                _ => {
                    *guard = Some(Main {
                        pid,
                        records: VecDeque::new(),
                        bytes: 0,
                        next_seq: first_seq,
                        exit: None,
                    })
                }
            }
            self.checkpointing
                .store(0, std::sync::atomic::Ordering::SeqCst);
        }
        if let Ok(mut g) = self.stdin.try_lock() {
            *g = io.stdin;
        }
        tokio::spawn(collect(self.clone(), io.stdout, io.stderr, io.exit, pid));
        self.changed.notify_waiters();
        Ok(())
    }
}

/// A restored main command's ends, as the agent holds them.
pub(crate) struct Adopted {
    pub(crate) stdout: BoxRead,
    pub(crate) stderr: Option<BoxRead>,
    pub(crate) stdin: Option<tokio::net::unix::pipe::Sender>,
    pub(crate) exit: oneshot::Receiver<ExitStatus>,
}

fn wire_error(code: &str, message: impl Into<String>) -> Frame {
    Frame::Error(WireError {
        code: code.to_owned(),
        message: message.into(),
    })
}

/// `StartMain`: spawn the command and start collecting its output.
pub async fn start<S>(mut s: S, slot: Arc<MainSlot>, main: MainRequest, hostname: &str)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if main.after_secrets {
        slot.wait_for_secrets().await;
    }
    let keep_stdin = main.stdin;
    let req = ExecRequest {
        argv: main.argv,
        env: main.env,
        cwd: main.cwd,
        tty: false,
        winsize: None,
        user: main.user,
        rlimits: main.rlimits,
    };
    let reply = {
        match slot.running_pid() {
            Some(pid) => wire_error(
                code::ALREADY_RUNNING,
                format!("this VM's main command already runs (pid {pid})"),
            ),
            None => {
                match exec::spawn(&req, hostname) {
                    Err(e) => Frame::Error(e),
                    Ok(sp) => {
                        let pid = sp.pid;
                        debug!("main command pid {pid}: {:?}", req.argv);
                        *slot.lock() = Some(Main {
                            pid,
                            records: VecDeque::new(),
                            bytes: 0,
                            next_seq: 0,
                            exit: None,
                        });
                        // Kept for `MainStdin` writers when asked for; else
                        // the main command reads nothing: its stdin ends at once.
                        let keep = match sp.stdin {
                            exec::StdinSink::Pipe(w) if keep_stdin => w,
                            _ => None,
                        };
                        if let Ok(mut g) = slot.stdin.try_lock() {
                            *g = keep;
                        }
                        tokio::spawn(collect(slot.clone(), sp.stdout, sp.stderr, sp.exit, pid));
                        Frame::Started { pid }
                    }
                }
            }
        }
    };
    let _ = send(&mut s, &reply).await;
    let _ = s.shutdown().await;
}

/// Read the main command's output into the ring until it exited and its
/// output ended (or stayed idle for [`exec::DRAIN_IDLE`] after the exit: a
/// background child may hold the pipes), then record the exit status.
async fn collect(
    slot: Arc<MainSlot>,
    stdout: BoxRead,
    stderr: Option<BoxRead>,
    mut exit: oneshot::Receiver<ExitStatus>,
    pid: u32,
) {
    let mut out = Some(stdout);
    let mut err = stderr;
    let mut status: Option<ExitStatus> = None;
    let mut idle: Option<Instant> = None;
    let mut obuf = vec![0u8; MAX_CHUNK];
    let mut ebuf = vec![0u8; MAX_CHUNK];
    loop {
        if let Some(st) = status {
            if out.is_none() && err.is_none() {
                slot.finish(pid, st);
                return;
            }
        }
        let idle_wait = async {
            match idle {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = &mut exit, if status.is_none() => {
                status = Some(r.unwrap_or(ExitStatus { code: None, signal: None }));
                idle = Some(Instant::now() + exec::DRAIN_IDLE);
            }
            r = exec::read_some(&mut out, &mut obuf) => match r {
                Ok(n) if n > 0 => slot.push(true, obuf[..n].to_vec()),
                _ => out = None,
            },
            r = exec::read_some(&mut err, &mut ebuf) => match r {
                Ok(n) if n > 0 => slot.push(false, ebuf[..n].to_vec()),
                _ => err = None,
            },
            _ = idle_wait => {
                if let Some(st) = status {
                    debug!("main command pid {pid}: output still open after its exit; not waiting for it");
                    slot.finish(pid, st);
                    return;
                }
            }
        }
        if status.is_some() && (out.is_some() || err.is_some()) {
            idle = Some(Instant::now() + exec::DRAIN_IDLE);
        }
    }
}

/// `AttachMain`: send the records from `from_seq` on as they come, then the
/// exit status. Ends when the stream fails (the host went away; nothing
/// else changes) or after `Exit`.
pub async fn attach<S>(mut s: S, slot: Arc<MainSlot>, from_seq: u64)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(pid) = slot.lock().as_ref().map(|m| m.pid) else {
        let _ = send(
            &mut s,
            &wire_error(code::NOT_RUNNING, "no main command was started in this VM"),
        )
        .await;
        let _ = s.shutdown().await;
        return;
    };
    let mut from = from_seq;
    // The number the host expects next; `None` before the first answer.
    let mut expected: Option<u64> = None;
    loop {
        // Registered before looking, so a record pushed in between wakes us.
        let changed = slot.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let (start, batch, done) = {
            let guard = slot.lock();
            let Some(m) = guard.as_ref() else { return };
            let (start, batch) = m.take_from(from);
            let done = m.exit.filter(|_| start + batch.len() as u64 >= m.next_seq);
            (start, batch, done)
        };
        let attached = Frame::Response(Response::MainAttached { pid, seq: start });
        if expected != Some(start) && send(&mut s, &attached).await.is_err() {
            return;
        }
        for r in &batch {
            let frame = if r.stdout {
                Frame::Stdout(r.data.clone())
            } else {
                Frame::Stderr(r.data.clone())
            };
            if send(&mut s, &frame).await.is_err() {
                return;
            }
        }
        from = start + batch.len() as u64;
        expected = Some(from);
        if let Some(status) = done {
            let _ = send(&mut s, &Frame::Exit(status)).await;
            let _ = s.shutdown().await;
            return;
        }
        if batch.is_empty() {
            changed.await;
        }
    }
}

/// Answer a request with an error and end its stream.
async fn refuse<S>(mut s: S, code: &str, message: &str)
where
    S: AsyncWrite + Unpin,
{
    let _ = send(&mut s, &wire_error(code, message)).await;
    let _ = s.shutdown().await;
}

/// `MainStdin`: feed the main command's stdin from this stream.
pub async fn stdin<S>(mut s: S, slot: Arc<MainSlot>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let running = slot.running_pid();
    let Some(pid) = running else {
        return refuse(
            s,
            code::NOT_RUNNING,
            "this VM's main command is not running",
        )
        .await;
    };
    let lock = slot.stdin.clone();
    let Ok(mut w) = lock.try_lock() else {
        let msg = "another client writes to the main command's stdin";
        return refuse(s, code::ALREADY_RUNNING, msg).await;
    };
    if w.is_none() {
        let msg = "the main command's stdin is closed (or was never open)";
        return refuse(s, code::NOT_RUNNING, msg).await;
    }
    if send(&mut s, &Frame::Started { pid }).await.is_err() {
        return;
    }
    loop {
        match machinen_proto::read_frame(&mut s).await {
            Ok(Some(Frame::Stdin(data))) => {
                if let Some(pipe) = w.as_mut() {
                    if let Err(e) = pipe.write_all(&data).await {
                        // It closed its stdin, or ended.
                        debug!("main command pid {pid}: stdin: {e}");
                        *w = None;
                    }
                }
            }
            Ok(Some(Frame::StdinEof)) => {
                *w = None;
                return;
            }
            Ok(Some(_)) => {}
            // The writer went away: stdin stays open for the next one.
            Ok(None) | Err(_) => return,
        }
    }
}

/// `SignalMain`: `kill(2)` the main command's process (or its group) with
/// `signal`.
pub async fn signal<S>(mut s: S, slot: Arc<MainSlot>, signal: i32, group: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let running = slot.running_pid();
    let reply = match (running, nix::sys::signal::Signal::try_from(signal)) {
        (_, Err(_)) => wire_error(
            machinen_proto::ErrorCode::SignalInvalid.as_str(),
            format!("{signal} is not a signal number"),
        ),
        (None, _) => wire_error(code::NOT_RUNNING, "this VM's main command is not running"),
        (Some(pid), Ok(sig)) => {
            let target = nix::unistd::Pid::from_raw(pid as i32);
            let sent = if group {
                nix::sys::signal::killpg(target, sig)
            } else {
                nix::sys::signal::kill(target, sig)
            };
            match sent {
                Ok(()) => {
                    debug!("main command pid {pid}: sent {sig}");
                    Frame::Response(Response::MainSignalled { pid })
                }
                // Exited, its status not collected yet.
                Err(nix::errno::Errno::ESRCH) => {
                    wire_error(code::NOT_RUNNING, "this VM's main command has ended")
                }
                Err(e) => wire_error(
                    machinen_proto::ErrorCode::ExecFailed.as_str(),
                    format!("kill({pid}, {sig}): {e}"),
                ),
            }
        }
    };
    let _ = send(&mut s, &reply).await;
    let _ = s.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_records_and_numbers_them() {
        let mut m = Main {
            pid: 1,
            records: VecDeque::new(),
            bytes: 0,
            next_seq: 0,
            exit: None,
        };
        for i in 0..5u8 {
            m.push(i % 2 == 0, vec![i; RING_BYTES / 4]);
        }
        // Five quarter-rings do not fit: the first record went.
        assert_eq!(m.first_seq(), 1);
        assert_eq!(m.next_seq, 5);
        let (start, batch) = m.take_from(0);
        assert_eq!(
            start, 1,
            "a reader behind the ring resumes at its oldest record"
        );
        assert_eq!(batch[0].data[0], 1);
        assert!(!batch[0].stdout);
        let (start, batch) = m.take_from(4);
        assert_eq!((start, batch.len()), (4, 1));
        let (start, batch) = m.take_from(99);
        assert_eq!(
            (start, batch.len()),
            (5, 0),
            "a reader ahead waits for the next record"
        );
    }
}
