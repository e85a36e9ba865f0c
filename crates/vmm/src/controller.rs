//! The VM lifecycle controller: from a launched engine to the VM's end.
//!
//! `run` starts the machine (`startup::start`), reports readiness, then
//! `drive`s it: one loop owns the machine and takes, one at a time, a stop,
//! a snapshot, the launcher going away, a signal, or the machine's own exit;
//! `conclude` then stops it and leaves state `gc` understands. Every state
//! change goes through `Shared::transition` (see `lifecycle`). The
//! controller sees the engine only through `engine::{Engine, Machine}`, so
//! its races are unit-tested against `engine::fake` (see `tests`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use machinen::registry::{self, Registry};
use machinen::spec::{files, ReadyLine, VmSpec};
use machinen::ErrorCode;
use machinen_proto::{timeouts, Frame, PhaseClock, Response, VmState, WireError};
use tokio::io::AsyncRead;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::agent::AgentSession;
use crate::control::{BalloonCmd, Shared, SnapshotCmd};
use crate::engine::{Capabilities, Engine, Exit, Machine};
use crate::supervisor::{console_lines, StartError};
use crate::{balloon, keeper, ports, snapshot, startup};

/// How long a graceful stop may take before the engine is told to quit.
const GRACEFUL_STOP: std::time::Duration = timeouts::GRACEFUL_STOP;

/// The controller's side of the process that launched the VM.
pub struct Launcher<G> {
    /// Where a restore's go-ahead comes from (the launcher's end of stdin).
    pub gate: G,
    /// Resolves when a foreground launcher is gone (never, detached).
    pub gone: Pin<Box<dyn Future<Output = ()>>>,
    /// Resolves on SIGTERM or SIGINT.
    pub term: Pin<Box<dyn Future<Output = ()>>>,
    /// Reports the start's outcome, once.
    pub ready: Box<dyn FnMut(&ReadyLine)>,
}

/// The requests that the control socket hands to the loop that owns the
/// machine.
pub struct Channels {
    /// A stop (`true`: forced).
    pub stop_rx: mpsc::Receiver<bool>,
    pub snap_rx: mpsc::Receiver<SnapshotCmd>,
    pub balloon_rx: mpsc::Receiver<BalloonCmd>,
}

/// Why the loop ended.
#[derive(Debug)]
pub enum End {
    /// Asked to stop (by a client, a destructive snapshot, the launcher
    /// going away, a signal); `force` skips the guest's poweroff.
    Stop { force: bool },
    /// The engine exited by itself.
    Exited(Exit),
}

/// Report a start-up failure and clean up; the supervisor's exit status.
pub fn fail_start(
    ready: &mut dyn FnMut(&ReadyLine),
    registry: Option<&(Registry, String)>,
    spec: &VmSpec,
    e: StartError,
) -> i32 {
    tracing::error!("start failed: {}", e.message);
    ready(&ReadyLine::Failed {
        code: e.code.as_str().into(),
        message: e.message,
        hint: e.hint,
    });
    cleanup(registry, spec);
    1
}

/// Run one VM from launch to end; returns the supervisor's exit status
/// (0: stopped or powered off; 1: failed to start or crashed).
pub async fn run<E: Engine, G: AsyncRead + Unpin + Send + 'static>(
    engine: &E,
    spec: &VmSpec,
    shared: &Arc<Shared>,
    mut channels: Channels,
    forwards: Vec<(machinen::registry::PortForward, TcpListener)>,
    mut launcher: Launcher<G>,
    started: Instant,
) -> i32 {
    let caps = engine.capabilities().clone();
    let mut clock = PhaseClock::starting_at(started);
    let (mut machine, session_done) =
        match startup::start(engine, spec, shared, started, launcher.gate, &mut clock).await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!("start failed: {}", e.message);
                (launcher.ready)(&ReadyLine::Failed {
                    code: e.code.as_str().into(),
                    message: e.message,
                    hint: e.hint,
                });
                // The cleanup takes the registry lock: off the runtime's thread.
                let (reg, spec2) = (shared.registry.clone(), spec.clone());
                let _ = tokio::task::spawn_blocking(move || cleanup(reg.as_ref(), &spec2)).await;
                return 1;
            }
        };
    let keeper = keeper::Keeper {
        shared: shared.clone(),
        agent_path: spec.path_in(files::AGENT),
        pace: keeper::Pace::default(),
    };
    tokio::spawn(keeper::run(keeper, session_done));
    for (forward, listener) in forwards {
        tokio::spawn(ports::serve(forward, listener, shared.clone()));
    }
    let engine_accel = caps.accel.as_str().to_string();
    let qemu_pid = machine.pid();
    let accel = engine_accel.clone();
    let up = shared
        .transition(VmState::Running, None, move |e| {
            e.qemu_pid = Some(qemu_pid);
            e.qemu_start = registry::process_start_time(qemu_pid);
            e.accel = accel;
        })
        .await;
    if let Err(refused) = up {
        // A stop arrived during start-up: it is waiting in `stop_rx`.
        tracing::info!("not marking the VM running: {refused}");
    }
    // Service VMs: start (or, restored, re-attach to) the main command.
    tokio::spawn(crate::service::run(spec.clone(), shared.clone()));
    let boot_ms = started.elapsed().as_millis() as u64;
    tracing::info!("ready after {boot_ms} ms");
    (launcher.ready)(&ReadyLine::Ready {
        supervisor_pid: std::process::id(),
        qemu_pid,
        accel: engine_accel,
        boot_ms,
        phases: clock.into_phases(),
    });
    let ends = async {
        tokio::select! {
            _ = launcher.gone => { tracing::info!("launcher went away"); true }
            _ = launcher.term => false,
        }
    };
    let end = drive(&mut machine, shared, spec, &caps, &mut channels, ends).await;
    conclude(&mut machine, shared, spec, end).await
}

/// The loop that owns the machine: serves snapshots until a stop, the end
/// of `ends` (its value: whether to force the stop), or the machine's exit.
pub async fn drive<M: Machine>(
    machine: &mut M,
    shared: &Shared,
    spec: &VmSpec,
    caps: &Capabilities,
    channels: &mut Channels,
    ends: impl Future<Output = bool>,
) -> End {
    tokio::pin!(ends);
    let mut chain = snapshot::Chain::new(spec);
    let end = loop {
        // Biased: an exit is a fact, and a stop wins over a snapshot that
        // is still queued (which is then refused, below).
        let cmd = tokio::select! {
            biased;
            exit = machine.wait() => { tracing::info!("VM exited: {exit}"); break End::Exited(exit) }
            force = channels.stop_rx.recv() => break End::Stop { force: force.unwrap_or(true) },
            force = &mut ends => break End::Stop { force },
            Some(cmd) = channels.balloon_rx.recv() => {
                // Two quick engine commands: served in place, between snapshots.
                let answer = balloon::serve(&*machine, shared, spec, caps, cmd.target_bytes).await;
                let _ = cmd.reply.send(answer);
                continue;
            }
            Some(cmd) = channels.snap_rx.recv() => cmd,
        };
        let keep_alive = cmd.req.keep_alive;
        // Only a running VM is snapshotted; a stop during the snapshot wins
        // over its return to running (see `lifecycle`).
        let entered = shared.transition(VmState::Snapshotting, None, |_| {}).await;
        let result = match entered {
            Err(refused) => Err(snapshot::err(
                ErrorCode::SnapshotStateInvalid,
                format!("the VM is {}, not running", refused.from),
            )),
            Ok(_) => {
                shared
                    .pausing
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                let r = snapshot::take(&*machine, shared, spec, caps, &mut chain, cmd.req).await;
                shared
                    .pausing
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                r
            }
        };
        let done = result.is_ok() && !keep_alive;
        if entered.is_ok() {
            let next = if done {
                VmState::Stopping
            } else {
                VmState::Running
            };
            let _ = shared.transition(next, None, |_| {}).await;
        }
        // The client may be gone (it gave up, or was killed): the outcome
        // stands either way, and a complete destructive snapshot still ends
        // the source (the bundle holds the VM now).
        let _ = cmd.reply.send(match result {
            Ok(report) => Frame::Response(Response::Snapshotted(report)),
            Err(e) => Frame::Error(WireError {
                code: e.code.as_str().into(),
                message: e.message,
            }),
        });
        if done {
            tracing::info!("snapshot complete; stopping the source");
            break End::Stop { force: true };
        }
    };
    // Snapshots asked for from here on are refused at once by the control
    // socket; those already queued are answered here.
    channels.snap_rx.close();
    channels.balloon_rx.close();
    while let Ok(cmd) = channels.balloon_rx.try_recv() {
        let _ = cmd.reply.send(Frame::Error(WireError {
            code: ErrorCode::BalloonUnavailable.as_str().into(),
            message: "the VM is stopping".into(),
        }));
    }
    while let Ok(cmd) = channels.snap_rx.try_recv() {
        let _ = cmd.reply.send(Frame::Error(WireError {
            code: ErrorCode::SnapshotStateInvalid.as_str().into(),
            message: "the VM is stopping; it was not snapshotted".into(),
        }));
    }
    end
}

/// End the VM after `drive`: stop it, or record a crash. Returns the
/// supervisor's exit status.
pub async fn conclude<M: Machine>(
    machine: &mut M,
    shared: &Shared,
    spec: &VmSpec,
    end: End,
) -> i32 {
    match end {
        End::Stop { force } => {
            let _ = shared.transition(VmState::Stopping, None, |_| {}).await;
            let agent = shared.agent.lock().await.take();
            stop(machine, agent, force).await;
        }
        End::Exited(exit) => {
            // File reads and removals: off the runtime's thread.
            let spec2 = spec.clone();
            let crashed = tokio::task::spawn_blocking(move || {
                // A panic's own line comes before its call trace: look further back.
                let cause = crash_cause(
                    &exit,
                    &console_lines(&spec2, 200),
                    spec2.ram_file.as_deref(),
                )?;
                tracing::error!("the VM crashed: {cause}");
                keep_crashed(&spec2);
                Some(cause)
            })
            .await;
            if let Ok(Some(cause)) = crashed {
                let recorded = shared
                    .transition(VmState::Crashed, None, move |e| {
                        e.cause = Some(cause);
                        e.ended_at_ms = Some(registry::now_ms());
                    })
                    .await;
                if let Err(refused) = recorded {
                    tracing::warn!("recording the crash: {refused}");
                }
                return 1;
            }
        }
    }
    // A VM stopped by its main command's exit keeps an `exited` record.
    if crate::service::keep_exited(shared, spec).await {
        return 0;
    }
    // Removes a partial bundle (possibly GiBs) and takes the registry lock.
    let (reg, spec2) = (shared.registry.clone(), spec.clone());
    if let Err(e) = tokio::task::spawn_blocking(move || cleanup(reg.as_ref(), &spec2)).await {
        tracing::warn!("cleanup task failed: {e}");
    }
    0
}

/// Why QEMU's exit was a crash, or `None` when the guest shut itself down
/// (QEMU exits 0 on a guest poweroff or, with `-no-reboot`, a reboot).
/// A guest kernel panic also ends in a reboot (`panic=-1`), so the console
/// tells it apart. A signal or an error status is always a crash.
pub(crate) fn crash_cause(
    exit: &Exit,
    console: &str,
    ram_file: Option<&std::path::Path>,
) -> Option<String> {
    let panic_line = console
        .lines()
        .rev()
        .find(|l| l.contains("Kernel panic - not syncing"));
    let mut cause = match (exit.signal, exit.code, panic_line) {
        (None, Some(0), None) => return None,
        (None, Some(0), Some(line)) => format!("the guest kernel panicked: {}", line.trim()),
        _ => format!("QEMU {}", exit.status()),
    };
    if exit.signal == Some(libc::SIGBUS) {
        // The kernel sends SIGBUS when a page of a shared file mapping
        // cannot be allocated: the RAM file's filesystem is full.
        if let Some(ram) = ram_file {
            let dir = ram.parent().unwrap_or(ram);
            cause.push_str(&format!(
                " (the guest touched RAM its file could not get: is {} full?)",
                dir.display()
            ));
        }
    }
    if let Some(last) = exit.log_tail.lines().rev().find(|l| !l.trim().is_empty()) {
        cause.push_str(&format!("; qemu.log: {}", last.trim()));
    }
    Some(cause)
}

/// A crashed VM keeps its directory (logs, disk layer, spec); its entry
/// records the cause (state `crashed`, written by the caller) for `ls`,
/// `logs` and `gc`. Its RAM file goes: it is useless now and holds tmpfs
/// memory.
fn keep_crashed(spec: &VmSpec) {
    snapshot::remove_partial(spec);
    if let Some(ram) = &spec.ram_file {
        let _ = std::fs::remove_file(ram);
    }
    for sock in [files::CONTROL, files::QMP, files::AGENT] {
        let _ = std::fs::remove_file(spec.path_in(sock));
    }
}

/// Stop the VM: graceful (guest powers off) unless `force`, escalating to
/// the engine's quit and finally a kill.
async fn stop<M: Machine>(machine: &mut M, agent: Option<AgentSession>, force: bool) {
    if !force {
        if let Some(agent) = agent {
            if agent.poweroff(timeouts::POWEROFF_REQUEST).await
                && tokio::time::timeout(GRACEFUL_STOP, machine.wait())
                    .await
                    .is_ok()
            {
                tracing::info!("guest powered off");
                return;
            }
        }
    }
    machine.quit().await;
}

/// Remove what a VM that ended (not crashed) leaves: a partial bundle, its
/// RAM file, its registry entry. File I/O and the registry lock: run it
/// off the runtime's thread.
pub fn cleanup(registry: Option<&(Registry, String)>, spec: &VmSpec) {
    snapshot::remove_partial(spec);
    if let Some(ram) = &spec.ram_file {
        let _ = std::fs::remove_file(ram);
    }
    if let Some((reg, id)) = registry {
        let _lock = reg.lock();
        if let Err(e) = reg.remove(id) {
            tracing::warn!("cleanup: {e}");
        }
    }
}

#[cfg(test)]
mod crash_tests {
    use super::*;

    fn exit(code: Option<i32>, signal: Option<i32>, log: &str) -> Exit {
        Exit {
            code,
            signal,
            log_tail: log.into(),
            wait_error: None,
        }
    }

    #[test]
    fn crashes_are_told_from_guest_shutdowns() {
        let ram = std::path::Path::new("/dev/shm/machinen-x.ram");
        assert_eq!(
            crash_cause(&exit(Some(0), None, ""), "reboot: Power down", Some(ram)),
            None,
            "guest poweroff"
        );
        let killed = crash_cause(&exit(None, Some(9), ""), "", Some(ram)).expect("crash");
        assert_eq!(killed, "QEMU killed by signal 9 (SIGKILL)");
        let bus = crash_cause(&exit(None, Some(libc::SIGBUS), ""), "", Some(ram)).expect("crash");
        assert!(
            bus.starts_with("QEMU killed by signal 7 (SIGBUS)")
                && bus.contains("is /dev/shm full?"),
            "{bus}"
        );
        let failed = crash_cause(
            &exit(Some(1), None, "qemu: warning\nqemu: fatal: oops\n"),
            "",
            None,
        )
        .expect("crash");
        assert_eq!(
            failed,
            "QEMU exited with status 1; qemu.log: qemu: fatal: oops"
        );
        let console = "[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n[ 1.1] Rebooting in 1 seconds..";
        let panic = crash_cause(&exit(Some(0), None, ""), console, None).expect("panic");
        assert_eq!(
            panic,
            "the guest kernel panicked: [ 1.0] Kernel panic - not syncing: Attempted to kill init!"
        );
    }
}

#[cfg(test)]
mod tests;
