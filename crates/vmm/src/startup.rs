//! Bringing a VM up: launch the engine, load a restore's state behind the
//! launcher's verdict (the gate), connect the guest agent, repair a
//! restored guest. Generic over the engine, so the races of start-up are
//! unit-tested against a fake one (`controller::tests`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use machinen::spec::VmSpec;
use machinen::ErrorCode;
use machinen_proto::{timeouts, PhaseClock};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::oneshot;

use crate::agent::{self, AgentError, AgentSession};
use crate::control::Shared;
use crate::engine::{Engine, Machine};
use crate::snapshot;
use crate::supervisor::{console_tail, StartError};

/// The launcher's verdict on a restore's bundle, one line on our stdin:
/// `go` lets the guest run; anything else, or end of file (the launcher
/// died or found the bundle corrupt), does not. Read a byte at a time so
/// nothing after the line is taken from the foreground lifeline reader.
async fn await_gate<G: AsyncRead + Unpin>(mut stdin: G) -> std::io::Result<bool> {
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
/// agent session. `gate` is where a restore's verdict comes from (the
/// launcher's end of the supervisor's stdin).
pub async fn start<E: Engine, G: AsyncRead + Unpin + Send + 'static>(
    engine: &E,
    spec: &VmSpec,
    shared: &Arc<Shared>,
    started: Instant,
    gate: G,
    clock: &mut PhaseClock,
) -> Result<(E::Machine, oneshot::Receiver<()>), StartError> {
    // The launcher's verdict can come at any time, and its end of our stdin
    // closing means it is gone: read it from the start, so a launcher that
    // dies while QEMU loads the state does not leave us (and a paused QEMU)
    // waiting for the whole boot timeout.
    let mut verdict = spec.restore.as_ref().filter(|r| r.gate).map(|_| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _ = tx.send(await_gate(gate).await);
        });
        rx
    });
    let caps = engine.capabilities();
    tracing::info!(
        "engine {} accel {} cpu {}",
        caps.engine,
        caps.accel.as_str(),
        caps.cpu_model
    );
    let mut machine = engine.launch(spec).await?;
    clock.mark("engine-start");
    shared.status.lock().await.qemu_pid = Some(machine.pid());
    let budget = Duration::from_millis(spec.boot_timeout_ms);
    let deadline = started + budget;
    if let Some(r) = &spec.restore {
        let state = r.bundle.join(machinen::bundle::STATE);
        // `Some(go)`: the verdict came while the state was loading.
        let mut early: Option<bool> = None;
        let engine_failed = |e: crate::engine::EngineError| StartError {
            code: ErrorCode::RestoreBundleInvalid,
            message: format!("{} could not load {}: {e}", caps.engine, state.display()),
            hint: Some(
                "the bundle may come from an incompatible engine version; see the VM's qemu.log"
                    .into(),
            ),
        };
        let loaded = match verdict.as_mut() {
            Some(v) => {
                let load = machine.load_state(&state, deadline, false);
                tokio::pin!(load);
                tokio::select! {
                    r = &mut load => r.map_err(engine_failed),
                    go = v => {
                        let go = matches!(go, Ok(Ok(true)));
                        early = Some(go);
                        if go {
                            load.await.map_err(engine_failed)
                        } else {
                            Err(StartError {
                                code: ErrorCode::RestoreBundleInvalid,
                                message: "the launcher stopped the restore before the guest ran (it went away or refused the bundle while the state was loading)".into(),
                                hint: None,
                            })
                        }
                    }
                }
            }
            None => machine
                .load_state(&state, deadline, true)
                .await
                .map_err(engine_failed),
        };
        if let Err(e) = loaded {
            machine.kill();
            return Err(e);
        }
        clock.mark("state-load");
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
            clock.mark("bundle-verify");
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
    clock.mark(if spec.restore.is_some() {
        "agent-reconnect"
    } else {
        "guest-boot"
    });
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
    clock.mark("agent-ready");
    tracing::info!("agent {} on kernel {}", ack.agent_version, ack.kernel);
    if let Some(r) = &spec.restore {
        // A private mapping of the bundle's RAM file: QEMU cannot hand the
        // guest's freed pages back (the file is read-only), so the guest
        // stops offering them.
        let private_ram = crate::balloon::private_ram(spec);
        match snapshot::fixup(&session, r.reset_tcp, private_ram).await {
            Ok(report) => {
                clock.mark("guest-repair");
                tracing::info!("fixup: {report:?}")
            }
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
    // Before anything runs in the guest (the main command, the first
    // exec): its commands get the proxy's variables.
    if let Some(egress) = &shared.egress {
        if let Err(e) = crate::egress::set_up(egress, &session).await {
            machine.kill();
            return Err(StartError {
                code: ErrorCode::NetworkUnavailable,
                message: format!("setting up the egress proxy in the guest failed: {e}"),
                hint: Some("see the VM's console.log".into()),
            });
        }
        clock.mark("egress-setup");
    }
    shared.status.lock().await.agent = Some(ack);
    *shared.agent.lock().await = Some(session);
    Ok((machine, done))
}
