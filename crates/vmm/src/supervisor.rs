//! The per-VM supervisor: starts the engine, brings up the agent session,
//! reports readiness to the launcher, serves the control socket, and tears
//! everything down (registry entry included) when the VM ends.
//!
//! State machine: `starting` → `running` → `stopping` → (process exits).
//! Every control operation checks the state first (see `control.rs`).

use machinen_proto::timeouts;
use machinen_proto::VmState;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use machinen::registry::{self, Registry};
use machinen::spec::{files, ReadyLine, VmSpec};
use machinen::ErrorCode;
use machinen_proto::VmStatus;
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, Mutex};

use machinen_proto::{Frame, Response, WireError};

use crate::agent::{self, AgentError, AgentSession};
use crate::control::{self, Shared, SnapshotCmd};
use crate::engine::qemu::{QemuEngine, QemuMachine};
use crate::engine::{Capabilities, Engine, EngineError, Exit, Machine};
use crate::{console, keeper, ports, snapshot};

/// How long a graceful stop may take before QEMU is told to quit.
const GRACEFUL_STOP: Duration = timeouts::GRACEFUL_STOP;

/// A start-up failure, reported on the ready line.
pub struct StartError {
    pub code: ErrorCode,
    pub message: String,
    pub hint: Option<String>,
}

impl From<EngineError> for StartError {
    fn from(e: EngineError) -> StartError {
        let (code, hint) = match &e {
            EngineError::Missing { binary } if binary == "passt" => (
                ErrorCode::BootEngineMissing,
                Some("install passt (`apt-get install passt`), or boot with --network nat-host (the guest then also reaches the host's loopback)".to_string()),
            ),
            EngineError::Missing { .. } => (
                ErrorCode::BootEngineMissing,
                Some("install QEMU: `apt-get install qemu-system-x86` (Debian/Ubuntu), `brew install qemu` (macOS)".to_string()),
            ),
            EngineError::BadAccel { .. } => (ErrorCode::BootArgsInvalid, Some("unset MACHINEN_ACCEL or set it to kvm, hvf or tcg".into())),
            EngineError::Timeout { .. } => (ErrorCode::BootTimeout, None),
            _ => (ErrorCode::BootEngineFailed, Some("see the VM's qemu.log and console.log".into())),
        };
        StartError {
            code,
            message: e.to_string(),
            hint,
        }
    }
}

fn emit_ready(line: &ReadyLine) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, line);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
    drop(out);
    // The launcher stops reading after this line; a detached launcher is
    // gone entirely. Point stdout at /dev/null so later writes cannot fail.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto fd 1 with a valid open descriptor; no Rust object
        // owns fd 1 in a way that this invalidates.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
}

fn console_tail(spec: &VmSpec) -> String {
    console_lines(spec, 15)
}

/// The last `n` lines of the console log, reading at most its last 256 KiB
/// (a guest may have written gigabytes to it).
fn console_lines(spec: &VmSpec, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(spec.path_in(files::CONSOLE)) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if f.seek(SeekFrom::Start(len.saturating_sub(256 * 1024)))
            .is_ok()
        {
            let _ = f.take(256 * 1024).read_to_end(&mut bytes);
        }
    }
    let s = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub(crate) fn update_entry(reg: &Registry, id: &str, f: impl FnOnce(&mut registry::RegistryEntry)) {
    let res = (|| -> Result<(), registry::RegistryError> {
        let _lock = reg.lock()?;
        let mut entry = reg
            .entries()?
            .into_iter()
            .find(|e| e.id == id)
            .ok_or(registry::RegistryError::NotFound { target: id.into() })?;
        f(&mut entry);
        reg.write(&entry)
    })();
    if let Err(e) = res {
        tracing::warn!("registry update failed: {e}");
    }
}

pub async fn run(spec: VmSpec) -> i32 {
    let started = Instant::now();
    let reg = Registry::new(
        spec.dir
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_default(),
    );
    let control_path = spec.path_in(files::CONTROL);
    let _ = std::fs::remove_file(&control_path);
    let fail_start = |e: StartError| {
        tracing::error!("start failed: {}", e.message);
        emit_ready(&ReadyLine::Failed {
            code: e.code.as_str().into(),
            message: e.message,
            hint: e.hint,
        });
        cleanup(&reg, &spec);
        1
    };
    let listener = match UnixListener::bind(&control_path) {
        Ok(l) => l,
        Err(e) => return fail_start(StartError {
            code: ErrorCode::Io,
            message: format!("cannot listen on {}: {e}", control_path.display()),
            hint: Some(
                "unix socket paths are limited to 107 bytes; use a shorter MACHINEN_REGISTRY_DIR"
                    .into(),
            ),
        }),
    };
    // Host ports before the engine: a taken port fails fast and cheaply.
    let forwards = match ports::bind_all(&spec.ports).await {
        Ok(l) => l,
        Err((p, e)) => {
            let in_use = e.kind() == std::io::ErrorKind::AddrInUse;
            return fail_start(StartError {
                code: if in_use {
                    ErrorCode::BootPortForwardInUse
                } else {
                    ErrorCode::BootArgsInvalid
                },
                message: format!(
                    "cannot listen on host port {}:{} (for guest port {}): {e}",
                    p.host_addr, p.host_port, p.guest_port
                ),
                hint: Some(if in_use {
                    "another program holds that port; pick another host port".into()
                } else {
                    "check the -p address".into()
                }),
            });
        }
    };
    let (stop_tx, mut stop_rx) = mpsc::channel::<bool>(4);
    let (snap_tx, mut snap_rx) = mpsc::channel::<SnapshotCmd>(4);
    let shared = Arc::new(Shared {
        status: Mutex::new(VmStatus {
            state: VmState::Starting,
            reason: None,
            supervisor_pid: std::process::id(),
            qemu_pid: None,
            agent: None,
        }),
        agent: Mutex::new(None),
        stop_tx: stop_tx.clone(),
        snap_tx,
        pausing: std::sync::atomic::AtomicBool::new(false),
        registry: Some((reg.clone(), spec.id.clone())),
    });
    tokio::spawn(control::serve(listener, shared.clone()));
    tokio::spawn(console::cap(
        spec.path_in(files::CONSOLE),
        console::max_from_env(),
    ));

    let (mut machine, caps, session_done) = match start(&spec, &shared, started).await {
        Ok(v) => v,
        Err(e) => return fail_start(e),
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
    let boot_ms = started.elapsed().as_millis() as u64;
    tracing::info!("ready after {boot_ms} ms");
    emit_ready(&ReadyLine::Ready {
        supervisor_pid: std::process::id(),
        qemu_pid,
        accel: engine_accel,
        boot_ms,
    });

    // A foreground VM lives as long as its launcher holds our stdin open.
    let detached = spec.detached;
    let launcher_gone = async move {
        if detached {
            std::future::pending::<()>().await;
        }
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    let mut sigterm = signal(SignalKind::terminate()).ok();
    let mut sigint = signal(SignalKind::interrupt()).ok();
    let term = async {
        match (&mut sigterm, &mut sigint) {
            (Some(t), Some(i)) => {
                tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
            }
            _ => std::future::pending::<()>().await,
        }
    };
    tokio::pin!(launcher_gone);
    tokio::pin!(term);
    let mut chain = snapshot::Chain::new(&spec);
    let outcome = loop {
        let cmd = tokio::select! {
            exit = machine.wait() => { tracing::info!("VM exited: {exit}"); break Err(exit) }
            force = stop_rx.recv() => break Ok(force.unwrap_or(true)),
            _ = &mut launcher_gone => { tracing::info!("launcher went away"); break Ok(true) }
            _ = &mut term => break Ok(false),
            Some(cmd) = snap_rx.recv() => cmd,
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
                let r = snapshot::take(&machine, &shared, &spec, &caps, &mut chain, cmd.req).await;
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
        let _ = cmd.reply.send(match result {
            Ok(report) => Frame::Response(Response::Snapshotted(report)),
            Err(e) => Frame::Error(WireError {
                code: e.code.as_str().into(),
                message: e.message,
            }),
        });
        if done {
            // A destructive snapshot: the bundle holds the VM now.
            tracing::info!("snapshot complete; stopping the source");
            break Ok(true);
        }
    };
    match outcome {
        Ok(force) => {
            let _ = shared.transition(VmState::Stopping, None, |_| {}).await;
            let agent = shared.agent.lock().await.take();
            stop(&mut machine, agent, force).await;
        }
        Err(exit) => {
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
    // Removes a partial bundle (possibly GiBs) and takes the registry lock.
    let (reg2, spec2) = (reg.clone(), spec.clone());
    if let Err(e) = tokio::task::spawn_blocking(move || cleanup(&reg2, &spec2)).await {
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

/// The launcher's verdict on a restore's bundle, one line on our stdin:
/// `go` lets the guest run; anything else, or end of file (the launcher
/// died or found the bundle corrupt), does not. Read a byte at a time so
/// nothing after the line is taken from the foreground lifeline reader.
async fn await_gate() -> std::io::Result<bool> {
    let mut stdin = tokio::io::stdin();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 16 {
        if stdin.read(&mut b).await? == 0 {
            return Ok(false);
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    Ok(line == b"go")
}

/// Launch the engine (loading saved state when restoring) and bring up the
/// agent session.
async fn start(
    spec: &VmSpec,
    shared: &Arc<Shared>,
    started: Instant,
) -> Result<(QemuMachine, Capabilities, oneshot::Receiver<()>), StartError> {
    // The launcher's verdict can come at any time, and its end of our stdin
    // closing means it is gone: read it from the start, so a launcher that
    // dies while QEMU loads the state does not leave us (and a paused QEMU)
    // waiting for the whole boot timeout.
    let mut verdict = spec.restore.as_ref().filter(|r| r.gate).map(|_| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _ = tx.send(await_gate().await);
        });
        rx
    });
    let engine = QemuEngine::probe(spec)?;
    let caps = engine.capabilities().clone();
    tracing::info!(
        "engine {} accel {} cpu {}",
        caps.engine,
        caps.accel.as_str(),
        caps.cpu_model
    );
    let mut machine = engine.launch(spec).await?;
    shared.status.lock().await.qemu_pid = Some(machine.pid());
    let budget = Duration::from_millis(spec.boot_timeout_ms);
    let deadline = started + budget;
    if let Some(r) = &spec.restore {
        let state = r.bundle.join(machinen::bundle::STATE);
        // `Some(go)`: the verdict came while the state was loading.
        let mut early: Option<bool> = None;
        let loaded = match verdict.as_mut() {
            Some(v) => {
                let load = machine.load_state(&state, deadline, false);
                tokio::pin!(load);
                tokio::select! {
                    r = &mut load => r.map_err(|e| e.to_string()),
                    go = v => {
                        let go = matches!(go, Ok(Ok(true)));
                        early = Some(go);
                        if go {
                            load.await.map_err(|e| e.to_string())
                        } else {
                            Err("the launcher went away or refused the bundle while the state was loading".into())
                        }
                    }
                }
            }
            None => machine
                .load_state(&state, deadline, true)
                .await
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = loaded {
            machine.kill();
            return Err(StartError {
                code: ErrorCode::RestoreBundleInvalid,
                message: format!("QEMU could not load {}: {e}", state.display()),
                hint: Some(
                    "the bundle may come from an incompatible QEMU; see the VM's qemu.log".into(),
                ),
            });
        }
        tracing::info!("state loaded after {} ms", started.elapsed().as_millis());
        if r.gate {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let pending = verdict.take().filter(|_| early.is_none());
            let gate = async move {
                match (early, pending) {
                    (Some(go), _) => Ok(go),
                    (None, Some(v)) => v.await.unwrap_or(Ok(false)),
                    (None, None) => Ok(false),
                }
            };
            let opened = match tokio::time::timeout(remaining, gate).await {
                Ok(Ok(true)) => machine
                    .resume()
                    .await
                    .map_err(|e| format!("resuming the guest failed: {e}")),
                Ok(Ok(false)) => {
                    Err("the launcher stopped the restore before the guest ran".to_string())
                }
                Ok(Err(e)) => Err(format!("reading the launcher's go-ahead failed: {e}")),
                Err(_) => Err(format!(
                    "no go-ahead from the launcher within {} ms",
                    spec.boot_timeout_ms
                )),
            };
            if let Err(message) = opened {
                machine.kill();
                return Err(StartError {
                    code: ErrorCode::RestoreBundleInvalid,
                    message,
                    hint: None,
                });
            }
            tracing::info!(
                "bundle verified; guest running after {} ms",
                started.elapsed().as_millis()
            );
        }
    }
    let mut sock = machine.connect_agent(timeouts::AGENT_CONNECT).await?;
    let console_err = |code, what: String, hint: &str| StartError {
        code,
        message: format!(
            "{what}\n--- console (last lines) ---\n{}",
            console_tail(spec)
        ),
        hint: Some(hint.to_string()),
    };
    let remaining = budget.saturating_sub(started.elapsed());
    let hello = async {
        agent::preamble(&mut sock, remaining, spec.restore.is_some()).await?;
        Ok::<_, AgentError>(())
    };
    tokio::select! {
        r = tokio::time::timeout(remaining, hello) => match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                machine.kill();
                return Err(console_err(ErrorCode::BootDetachedReadinessFailed, format!("guest agent session failed: {e}"), "see the VM's console.log"));
            }
            Err(_) => {
                machine.kill();
                return Err(console_err(
                    ErrorCode::BootTimeout,
                    format!("the guest agent did not answer within {} ms", spec.boot_timeout_ms),
                    "a loaded host boots slowly under TCG: raise --boot-timeout",
                ));
            }
        },
        exit = machine.wait() => {
            return Err(console_err(ErrorCode::BootEngineFailed, format!("QEMU exited before the guest was ready ({exit})"), "see the VM's qemu.log and console.log"));
        }
    }
    let (session, done) = AgentSession::start(sock);
    let ack = match tokio::time::timeout(timeouts::AGENT_HANDSHAKE, session.handshake()).await {
        Ok(Ok(ack)) => ack,
        Ok(Err(e)) => {
            machine.kill();
            return Err(console_err(
                ErrorCode::BootDetachedReadinessFailed,
                format!("guest agent handshake failed: {e}"),
                "see the VM's console.log",
            ));
        }
        Err(_) => {
            machine.kill();
            return Err(console_err(
                ErrorCode::BootTimeout,
                "the guest agent did not answer its handshake".into(),
                "see the VM's console.log",
            ));
        }
    };
    tracing::info!("agent {} on kernel {}", ack.agent_version, ack.kernel);
    if let Some(r) = &spec.restore {
        match snapshot::fixup(&session, r.reset_tcp).await {
            Ok(report) => tracing::info!("fixup: {report:?}"),
            Err(e) => {
                machine.kill();
                return Err(StartError {
                    code: ErrorCode::BootVmstateReseedFailed,
                    message: format!("repairing the restored guest failed: {e}"),
                    hint: Some("see the VM's console.log".into()),
                });
            }
        }
    }
    shared.status.lock().await.agent = Some(ack);
    *shared.agent.lock().await = Some(session);
    Ok((machine, caps, done))
}

/// Stop the VM: graceful (guest powers off) unless `force`, escalating to
/// QMP `quit` and finally SIGKILL.
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

fn cleanup(reg: &Registry, spec: &VmSpec) {
    snapshot::remove_partial(spec);
    if let Some(ram) = &spec.ram_file {
        let _ = std::fs::remove_file(ram);
    }
    let _lock = reg.lock();
    if let Err(e) = reg.remove(&spec.id) {
        tracing::warn!("cleanup: {e}");
    }
}

#[cfg(test)]
mod tests {
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
