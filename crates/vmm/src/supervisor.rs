//! The per-VM supervisor: starts the engine, brings up the agent session,
//! reports readiness to the launcher, serves the control socket, and tears
//! everything down (registry entry included) when the VM ends.
//!
//! State machine: `starting` → `running` → `stopping` → (process exits).
//! Every control operation checks the state first (see `control.rs`).

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
use tokio::sync::{mpsc, Mutex};

use crate::agent::AgentSession;
use crate::control::{self, Shared};
use crate::engine::qemu::QemuEngine;
use crate::engine::{Engine, EngineError, Machine};

/// How long a graceful stop may take before QEMU is told to quit.
const GRACEFUL_STOP: Duration = Duration::from_secs(10);

/// A start-up failure, reported on the ready line.
struct StartError {
    code: ErrorCode,
    message: String,
    hint: Option<String>,
}

impl From<EngineError> for StartError {
    fn from(e: EngineError) -> StartError {
        let (code, hint) = match &e {
            EngineError::Missing { .. } => (
                ErrorCode::BootEngineMissing,
                Some("install QEMU: `apt-get install qemu-system-x86` (Debian/Ubuntu), `brew install qemu` (macOS)".to_string()),
            ),
            EngineError::BadAccel { .. } => (ErrorCode::BootArgsInvalid, Some("unset MACHINEN_ACCEL or set it to kvm, hvf or tcg".into())),
            EngineError::Timeout { .. } => (ErrorCode::BootTimeout, None),
            _ => (ErrorCode::BootEngineFailed, Some("see the VM's qemu.log and console.log".into())),
        };
        StartError { code, message: e.to_string(), hint }
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
    let s = std::fs::read_to_string(spec.path_in(files::CONSOLE)).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn update_entry(reg: &Registry, id: &str, f: impl FnOnce(&mut registry::RegistryEntry)) {
    let res = (|| -> Result<(), registry::RegistryError> {
        let _lock = reg.lock()?;
        let mut entry = reg.entries()?.into_iter().find(|e| e.id == id).ok_or(registry::RegistryError::NotFound { target: id.into() })?;
        f(&mut entry);
        reg.write(&entry)
    })();
    if let Err(e) = res {
        tracing::warn!("registry update failed: {e}");
    }
}

pub async fn run(spec: VmSpec) -> i32 {
    let started = Instant::now();
    let reg = Registry::new(spec.dir.parent().map(|p| p.to_path_buf()).unwrap_or_default());
    let control_path = spec.path_in(files::CONTROL);
    let _ = std::fs::remove_file(&control_path);
    let listener = match UnixListener::bind(&control_path) {
        Ok(l) => l,
        Err(e) => {
            emit_ready(&ReadyLine::Failed {
                code: ErrorCode::Io.as_str().into(),
                message: format!("cannot listen on {}: {e}", control_path.display()),
                hint: Some("unix socket paths are limited to 107 bytes; use a shorter MACHINEN_REGISTRY_DIR".into()),
            });
            cleanup(&reg, &spec);
            return 1;
        }
    };
    let (stop_tx, mut stop_rx) = mpsc::channel::<bool>(4);
    let shared = Arc::new(Shared {
        status: Mutex::new(VmStatus { state: "starting".into(), supervisor_pid: std::process::id(), qemu_pid: None, agent: None }),
        agent: Mutex::new(None),
        stop_tx: stop_tx.clone(),
    });
    tokio::spawn(control::serve(listener, shared.clone()));

    let (mut machine, engine_accel, session_done) = match start(&spec, &shared, started).await {
        Ok(v) => v,
        Err(e) => {
            tracing::error!("start failed: {}", e.message);
            emit_ready(&ReadyLine::Failed { code: e.code.as_str().into(), message: e.message, hint: e.hint });
            cleanup(&reg, &spec);
            return 1;
        }
    };
    let qemu_pid = machine.pid();
    update_entry(&reg, &spec.id, |e| {
        e.state = "running".into();
        e.qemu_pid = Some(qemu_pid);
        e.qemu_start = registry::process_start_time(qemu_pid);
        e.accel = engine_accel.clone();
    });
    shared.status.lock().await.state = "running".into();
    let boot_ms = started.elapsed().as_millis() as u64;
    tracing::info!("ready after {boot_ms} ms");
    emit_ready(&ReadyLine::Ready { supervisor_pid: std::process::id(), qemu_pid, accel: engine_accel, boot_ms });

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
    // The agent session ending (guest crashed, port reset) does not end the
    // VM: QEMU exiting does, and execs report the agent as unavailable.
    drop(session_done);
    let outcome = tokio::select! {
        detail = machine.wait() => { tracing::info!("VM exited: {detail}"); None }
        force = stop_rx.recv() => Some(force.unwrap_or(true)),
        _ = launcher_gone => { tracing::info!("launcher went away"); Some(true) }
        _ = term => Some(false),
    };
    if let Some(force) = outcome {
        shared.status.lock().await.state = "stopping".into();
        update_entry(&reg, &spec.id, |e| e.state = "stopping".into());
        let agent = shared.agent.lock().await.take();
        stop(&mut machine, agent, force).await;
    }
    cleanup(&reg, &spec);
    0
}

/// Launch the engine and bring up the agent session.
async fn start(
    spec: &VmSpec,
    shared: &Arc<Shared>,
    started: Instant,
) -> Result<(crate::engine::qemu::QemuMachine, String, tokio::sync::oneshot::Receiver<()>), StartError> {
    let engine = QemuEngine::probe(spec)?;
    let caps = engine.capabilities().clone();
    tracing::info!("engine {} accel {} cpu {}", caps.engine, caps.accel.as_str(), caps.cpu_model);
    let mut machine = engine.launch(spec).await?;
    shared.status.lock().await.qemu_pid = Some(machine.pid());
    let budget = Duration::from_millis(spec.boot_timeout_ms);
    let sock = machine.connect_agent(Duration::from_secs(20)).await?;
    let (session, done) = AgentSession::start(sock);
    let remaining = budget.saturating_sub(started.elapsed());
    let ack = tokio::select! {
        r = tokio::time::timeout(remaining, session.handshake()) => match r {
            Ok(Ok(ack)) => ack,
            Ok(Err(e)) => {
                machine.kill();
                return Err(StartError {
                    code: ErrorCode::BootDetachedReadinessFailed,
                    message: format!("guest agent handshake failed: {e}\n--- console (last lines) ---\n{}", console_tail(spec)),
                    hint: Some("see the VM's console.log".into()),
                });
            }
            Err(_) => {
                machine.kill();
                return Err(StartError {
                    code: ErrorCode::BootTimeout,
                    message: format!(
                        "the guest agent did not answer within {} ms\n--- console (last lines) ---\n{}",
                        spec.boot_timeout_ms,
                        console_tail(spec)
                    ),
                    hint: Some("a loaded host boots slowly under TCG: raise --boot-timeout".into()),
                });
            }
        },
        detail = machine.wait() => {
            return Err(StartError {
                code: ErrorCode::BootEngineFailed,
                message: format!("QEMU exited before the guest was ready ({detail})\n--- console (last lines) ---\n{}", console_tail(spec)),
                hint: Some("see the VM's qemu.log and console.log".into()),
            });
        }
    };
    tracing::info!("agent {} on kernel {}", ack.agent_version, ack.kernel);
    shared.status.lock().await.agent = Some(ack);
    *shared.agent.lock().await = Some(session);
    Ok((machine, caps.accel.as_str().to_string(), done))
}

/// Stop the VM: graceful (guest powers off) unless `force`, escalating to
/// QMP `quit` and finally SIGKILL.
async fn stop<M: Machine>(machine: &mut M, agent: Option<AgentSession>, force: bool) {
    if !force {
        if let Some(agent) = agent {
            if agent.poweroff(Duration::from_secs(3)).await
                && tokio::time::timeout(GRACEFUL_STOP, machine.wait()).await.is_ok()
            {
                tracing::info!("guest powered off");
                return;
            }
        }
    }
    machine.quit().await;
}

fn cleanup(reg: &Registry, spec: &VmSpec) {
    let _lock = reg.lock();
    if let Err(e) = reg.remove(&spec.id) {
        tracing::warn!("cleanup: {e}");
    }
}
