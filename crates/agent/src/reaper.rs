//! The one and only child reaper.
//!
//! As PID 1 the agent inherits every orphan in the guest and must reap them
//! all, while the exit status of a command run by an exec must reach that
//! exec. So nothing else in the agent ever calls `waitpid`: one reaper thread
//! waits for `SIGCHLD` (and wakes up every second as a safety net), calls
//! `waitpid(-1, WNOHANG)` until nothing is left, and hands each status to the
//! exec that registered the pid; others (orphans) are dropped.
//!
//! Spawning and reaping are serialised by [`Reaper::spawn`]: `std` itself
//! calls `waitpid(pid)` on a child whose `exec` failed (and panics if that
//! child was already reaped), and a child can exit before its spawner
//! registers it. Holding the spawn lock across `Command::spawn` and the
//! registration rules both races out. Statuses nobody registered are still
//! kept for [`UNCLAIMED_TTL`] in case a pid is registered late (a spawner
//! that did not use [`Reaper::spawn`]).

use machinen_proto::timeouts;
use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use machinen_proto::ExitStatus;
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

use crate::log::{debug, error};

/// How long the status of an unregistered pid is kept.
pub const UNCLAIMED_TTL: Duration = timeouts::UNCLAIMED_TTL;
/// At most this many unclaimed statuses are kept (orphans can be many).
const UNCLAIMED_MAX: usize = 4096;

#[derive(Default)]
struct State {
    waiting: HashMap<i32, oneshot::Sender<ExitStatus>>,
    unclaimed: HashMap<i32, (ExitStatus, Instant)>,
}

pub struct Reaper {
    state: Mutex<State>,
    /// Held across spawn + register and across each reaping pass.
    spawn_lock: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent data here (plain maps),
    // so a poisoned lock is used as is.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Convert a wait status into the protocol's exit status; `None` for
/// stop/continue notifications (not requested, but harmless).
pub fn exit_status(ws: &WaitStatus) -> Option<(i32, ExitStatus)> {
    match *ws {
        WaitStatus::Exited(pid, code) => Some((
            pid.as_raw(),
            ExitStatus {
                code: Some(code),
                signal: None,
            },
        )),
        WaitStatus::Signaled(pid, sig, _core) => Some((
            pid.as_raw(),
            ExitStatus {
                code: None,
                signal: Some(sig as i32),
            },
        )),
        _ => None,
    }
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

impl Reaper {
    /// The process-wide reaper; its thread starts on first use.
    pub fn global() -> &'static Reaper {
        REAPER.get_or_init(|| {
            let r = Reaper {
                state: Mutex::new(State::default()),
                spawn_lock: Mutex::new(()),
            };
            start_thread();
            r
        })
    }

    /// Spawn `cmd` and register the child before any reaping pass can see it.
    /// The receiver yields the child's exit status.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, oneshot::Receiver<ExitStatus>)> {
        let _guard = lock(&self.spawn_lock);
        let child = cmd.spawn()?;
        let rx = self.register(child.id() as i32);
        Ok((child, rx))
    }

    /// Ask for the exit status of `pid`. If it was already reaped (and not
    /// expired), the receiver is ready at once.
    pub fn register(&self, pid: i32) -> oneshot::Receiver<ExitStatus> {
        let (tx, rx) = oneshot::channel();
        let mut st = lock(&self.state);
        if let Some((status, _)) = st.unclaimed.remove(&pid) {
            let _ = tx.send(status);
        } else {
            st.waiting.insert(pid, tx);
        }
        rx
    }

    /// Deliver one reaped status.
    fn deliver(&self, pid: i32, status: ExitStatus) {
        let mut st = lock(&self.state);
        if let Some(tx) = st.waiting.remove(&pid) {
            debug!("pid {pid} exited: {status:?}");
            // The exec may be gone (host disconnected); then nobody wants it.
            let _ = tx.send(status);
            return;
        }
        let now = Instant::now();
        st.unclaimed
            .retain(|_, (_, at)| now.duration_since(*at) < UNCLAIMED_TTL);
        if st.unclaimed.len() >= UNCLAIMED_MAX {
            // Drop the oldest to stay bounded.
            if let Some(oldest) = st
                .unclaimed
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(p, _)| *p)
            {
                st.unclaimed.remove(&oldest);
            }
        }
        st.unclaimed.insert(pid, (status, now));
    }

    /// Reap every child that has exited. Returns how many were reaped.
    pub fn reap_all(&self) -> usize {
        let _guard = lock(&self.spawn_lock);
        let mut n = 0;
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(ws) => {
                    if let Some((pid, status)) = exit_status(&ws) {
                        self.deliver(pid, status);
                        n += 1;
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => break,
                Err(e) => {
                    error!("waitpid: {e}");
                    break;
                }
            }
        }
        n
    }
}

/// The reaper thread: a tiny runtime of its own, so that it keeps running
/// whatever happens to the serving runtime (and, in tests, across the many
/// runtimes of the test harness).
fn start_thread() {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    error!("reaper: cannot build its runtime: {e}; falling back to polling");
                    let _ = ready_tx.send(());
                    loop {
                        std::thread::sleep(timeouts::REAPER_SWEEP_NO_RUNTIME);
                        Reaper::global().reap_all();
                    }
                }
            };
            rt.block_on(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let mut sigchld = match signal(SignalKind::child()) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        error!("reaper: cannot watch SIGCHLD: {e}; polling instead");
                        None
                    }
                };
                let _ = ready_tx.send(());
                let period = if sigchld.is_some() {
                    timeouts::REAPER_SWEEP
                } else {
                    timeouts::REAPER_SWEEP_NO_SIGCHLD
                };
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    match sigchld.as_mut() {
                        Some(s) => {
                            tokio::select! {
                                _ = s.recv() => {}
                                _ = tick.tick() => {}
                            }
                        }
                        None => {
                            tick.tick().await;
                        }
                    }
                    // `global()` is initialised: this thread is started from
                    // inside its initialiser, and only runs this after it returns
                    // (OnceLock blocks other callers until then).
                    Reaper::global().reap_all();
                }
            });
        });
    match spawned {
        // The SIGCHLD handler is installed before anything is spawned.
        Ok(_) => {
            let _ = ready_rx.recv_timeout(timeouts::REAPER_READY);
        }
        Err(e) => error!("cannot start the reaper thread: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    #[tokio::test]
    async fn delivers_exit_codes_and_signals() {
        let r = Reaper::global();
        let (_c, rx) = r
            .spawn(
                Command::new("sh")
                    .args(["-c", "exit 7"])
                    .stdin(Stdio::null()),
            )
            .expect("spawn");
        assert_eq!(
            rx.await.expect("status"),
            ExitStatus {
                code: Some(7),
                signal: None
            }
        );
        let (_c, rx) = r
            .spawn(
                Command::new("sh")
                    .args(["-c", "kill -9 $$"])
                    .stdin(Stdio::null()),
            )
            .expect("spawn");
        assert_eq!(
            rx.await.expect("status"),
            ExitStatus {
                code: None,
                signal: Some(9)
            }
        );
    }

    #[tokio::test]
    async fn status_before_registration_is_kept() {
        let r = Reaper::global();
        let pid = 0x3fff_fff0; // not a real pid
        r.deliver(
            pid,
            ExitStatus {
                code: Some(1),
                signal: None,
            },
        );
        let rx = r.register(pid);
        assert_eq!(
            rx.await.expect("status"),
            ExitStatus {
                code: Some(1),
                signal: None
            }
        );
    }

    #[tokio::test]
    async fn failed_exec_does_not_race_the_reaper() {
        // std reaps a child whose exec failed itself; the spawn lock keeps
        // the reaper from stealing it (std would panic otherwise).
        use std::os::unix::process::CommandExt;
        let r = Reaper::global();
        for _ in 0..50 {
            let mut cmd = Command::new("/nonexistent/program");
            // SAFETY: the closure calls nothing; a pre_exec hook forces the
            // fork path that reaps in-process.
            unsafe { cmd.pre_exec(|| Ok(())) };
            assert!(r.spawn(&mut cmd).is_err());
        }
    }
}
