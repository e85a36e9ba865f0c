//! The supervisor's side of a service VM's main command (see
//! `machinen::service` for the files and the agent's `service` module for
//! the guest side).
//!
//! Hooks in the supervisor, kept small on purpose: [`run`] is spawned once
//! the VM is running (it starts the command on a fresh boot, or re-attaches
//! to the one a restored guest already runs) and, when the command exits,
//! records the status and asks for a graceful stop through the ordinary
//! stop channel unless the VM is kept alive; [`keep_exited`] runs where the
//! supervisor would remove the VM's directory and keeps a small `exited`
//! record instead.

use std::path::PathBuf;
use std::sync::Arc;

use machinen::registry;
use machinen::service::{self as svc, LogRecord, LogStream, LogWriter, MainSpec};
use machinen::spec::{files, VmSpec};
use machinen_proto::{self as proto, timeouts, ExitStatus, Frame, MainRequest, Request, Response};
use machinen_proto::{ErrorCode, VmState};

use crate::control::Shared;

/// What a bundle records about the main command (its environment stays
/// out: it is not needed to re-attach, and may hold credentials).
pub fn bundle_main(spec: &VmSpec) -> Option<MainSpec> {
    spec.main.clone().map(|mut m| {
        m.env.clear();
        m.cwd = None;
        // A restored guest runs it already, however it got there.
        m.adopt = false;
        m
    })
}

/// The VM's main log, when there is one to copy into a bundle.
pub fn log_for_bundle(spec: &VmSpec) -> Option<PathBuf> {
    let p = spec.path_in(files::MAIN_LOG);
    p.is_file().then_some(p)
}

/// Appends records off the runtime's thread (file I/O).
struct Log {
    writer: Option<LogWriter>,
}

impl Log {
    async fn append(&mut self, rec: LogRecord) {
        let Some(mut w) = self.writer.take() else {
            return;
        };
        let back = tokio::task::spawn_blocking(move || {
            if let Err(e) = w.append(&rec) {
                tracing::warn!("main log: {e}");
            }
            w
        })
        .await;
        self.writer = back.ok();
    }
}

/// Start (on a fresh boot) or re-attach to (after a restore) the main
/// command, log its output until it exits, then record how it ended and,
/// unless the VM is kept alive, stop the VM.
pub async fn run(spec: VmSpec, shared: Arc<Shared>) {
    let Some(main) = spec.main.clone() else {
        return;
    };
    let mut log = Log {
        writer: Some(LogWriter::new(&spec.dir)),
    };
    let dir = spec.dir.clone();
    let mut next = tokio::task::spawn_blocking(move || svc::next_seq(&dir))
        .await
        .unwrap_or(0);
    let status = if main.adopt {
        // The host restores it with CRIU once the guest is ready.
        let until = tokio::time::Instant::now() + timeouts::MAIN_ADOPT;
        follow(&shared, &mut log, &mut next, Some(until)).await
    } else if spec.restore.is_none() {
        match start(&shared, &main).await {
            Ok(pid) => {
                tracing::info!("main command started, pid {pid}: {:?}", main.argv);
                follow(&shared, &mut log, &mut next, None).await
            }
            Err((code, message)) => {
                // As a shell reports it: 127 not found, 126 cannot run.
                let status = ExitStatus {
                    code: Some(if code == ErrorCode::ExecCommandNotFound.as_str() {
                        127
                    } else {
                        126
                    }),
                    signal: None,
                };
                let text =
                    format!("machinen: the main command could not start: {code}: {message}\n");
                tracing::error!("{}", text.trim_end());
                log.append(LogRecord::chunk(next, LogStream::Stderr, text.as_bytes()))
                    .await;
                next = next.saturating_add(1);
                Some(status)
            }
        }
    } else {
        follow(&shared, &mut log, &mut next, None).await
    };
    let Some(status) = status else {
        return;
    };
    log.append(LogRecord::exit(next, status)).await;
    tracing::info!("main command exited: {status:?}");
    if let Some((reg, id)) = shared.registry.clone() {
        let _ = tokio::task::spawn_blocking(move || {
            crate::supervisor::update_entry(&reg, &id, |e| {
                let m = e.main.get_or_insert_with(Default::default);
                m.exit = Some(status);
                m.exited_at_ms = Some(registry::now_ms());
            })
        })
        .await;
    }
    if !main.keep_alive_on_exit {
        // A graceful stop, as `machinen stop` asks; `keep_exited` then
        // keeps the record.
        let _ = shared.transition(VmState::Stopping, None, |_| {}).await;
        let _ = shared.stop_tx.send(false).await;
    }
}

/// `StartMain` on a fresh agent stream: the pid, or the agent's error.
async fn start(shared: &Shared, main: &MainSpec) -> Result<u32, (String, String)> {
    let agent = shared.agent.lock().await.clone().ok_or_else(|| {
        (
            ErrorCode::ExecVsockUnavailable.as_str().to_string(),
            "the guest agent is not connected".to_string(),
        )
    })?;
    let req = MainRequest {
        rlimits: main.rlimits.clone(),
        stdin: main.stdin,
        argv: main.argv.clone(),
        env: main.env.clone(),
        cwd: main.cwd.clone(),
        after_secrets: main.after_secrets,
        user: main.user.clone(),
    };
    let io_err = |e: String| (ErrorCode::ExecFailed.as_str().to_string(), e);
    let answer = async {
        let mut s = agent.open().await.map_err(|e| io_err(e.to_string()))?;
        proto::send(&mut s, &Frame::Request(Request::StartMain(req)))
            .await
            .map_err(|e| io_err(e.to_string()))?;
        match proto::read_frame(&mut s).await {
            Ok(Some(Frame::Started { pid })) => Ok(pid),
            Ok(Some(Frame::Error(e))) => Err((e.code, e.message)),
            other => Err(io_err(format!("unexpected answer {other:?}"))),
        }
    };
    // The agent answers once the secrets it waits for are installed.
    let bound = if main.after_secrets {
        timeouts::MAIN_SECRETS_WAIT + timeouts::MAIN_START
    } else {
        timeouts::MAIN_START
    };
    tokio::time::timeout(bound, answer)
        .await
        .map_err(|_| io_err("the guest agent did not answer in time".into()))?
}

/// Follow the main command, re-attaching after a lost session, until it
/// exits (its status) or the agent has none (`None`: a restored guest that
/// never ran one; with `adopt_until`, one that has none yet by then).
async fn follow(
    shared: &Shared,
    log: &mut Log,
    next: &mut u64,
    adopt_until: Option<tokio::time::Instant>,
) -> Option<ExitStatus> {
    loop {
        match attach_once(shared, log, next).await {
            Attach::Exited(st) => return Some(st),
            Attach::None if adopt_until.is_some_and(|t| tokio::time::Instant::now() < t) => {
                tokio::time::sleep(timeouts::MAIN_REATTACH).await;
            }
            Attach::None => return None,
            Attach::Lost(why) => {
                tracing::debug!("main command stream lost ({why}); re-attaching");
                tokio::time::sleep(timeouts::MAIN_REATTACH).await;
            }
        }
    }
}

enum Attach {
    Exited(ExitStatus),
    None,
    Lost(String),
}

async fn attach_once(shared: &Shared, log: &mut Log, next: &mut u64) -> Attach {
    let agent = shared.agent.lock().await.clone();
    let Some(agent) = agent else {
        return Attach::Lost("no agent session".into());
    };
    let mut s = match agent.open().await {
        Ok(s) => s,
        Err(e) => return Attach::Lost(e.to_string()),
    };
    let req = Frame::Request(Request::AttachMain { from_seq: *next });
    if let Err(e) = proto::send(&mut s, &req).await {
        return Attach::Lost(e.to_string());
    }
    loop {
        let frame = match proto::read_frame(&mut s).await {
            Ok(Some(f)) => f,
            Ok(None) => return Attach::Lost("the stream ended".into()),
            Err(e) => return Attach::Lost(e.to_string()),
        };
        match frame {
            Frame::Response(Response::MainAttached { seq, .. }) => {
                if seq > *next {
                    tracing::warn!(
                        "main command: records {}..{seq} fell out of the guest's ring before they were logged",
                        *next
                    );
                    log.append(LogRecord::chunk(seq, LogStream::Gap, b"")).await;
                }
                *next = seq;
            }
            Frame::Stdout(b) | Frame::Stderr(b) if b.len() > proto::MAX_CHUNK => {
                // The agent never sends one; a guest that does loses it
                // (skipped, not re-fetched: re-attaching would get it again).
                tracing::warn!(
                    "main command: a record of {} bytes is over the limit; skipped",
                    b.len()
                );
                *next = next.saturating_add(1);
                log.append(LogRecord::chunk(*next, LogStream::Gap, b""))
                    .await;
            }
            Frame::Stdout(b) => {
                log.append(LogRecord::chunk(*next, LogStream::Stdout, &b))
                    .await;
                *next = next.saturating_add(1);
            }
            Frame::Stderr(b) => {
                log.append(LogRecord::chunk(*next, LogStream::Stderr, &b))
                    .await;
                *next = next.saturating_add(1);
            }
            Frame::Exit(st) => return Attach::Exited(st),
            Frame::Error(e) if e.code == ErrorCode::MainNotRunning.as_str() => return Attach::None,
            other => return Attach::Lost(format!("unexpected frame {other:?}")),
        }
    }
}

/// Where the supervisor would remove the VM's directory: a VM that stopped
/// because its main command exited (and was not kept alive) keeps it, as
/// `exited`, with its entry (the exit status) and its logs, until `gc`; the
/// disk layer, RAM file and sockets go. True when it did.
pub async fn keep_exited(shared: &Shared, spec: &VmSpec) -> bool {
    let Some((reg, id)) = shared.registry.clone() else {
        return false;
    };
    let exited = tokio::task::spawn_blocking(move || {
        reg.entries()
            .ok()?
            .into_iter()
            .find(|e| e.id == id)?
            .main
            .filter(|m| m.exit.is_some() && !m.keep_alive_on_exit)
    })
    .await
    .ok()
    .flatten();
    if exited.is_none() {
        return false;
    }
    let spec2 = spec.clone();
    let _ = tokio::task::spawn_blocking(move || {
        crate::snapshot::remove_partial(&spec2);
        if let Some(ram) = &spec2.ram_file {
            let _ = std::fs::remove_file(ram);
        }
        for f in [files::CONTROL, files::QMP, files::AGENT, files::DISK] {
            let _ = std::fs::remove_file(spec2.path_in(f));
        }
    })
    .await;
    let recorded = shared
        .transition(VmState::Exited, None, |e| {
            e.ended_at_ms = Some(registry::now_ms());
            e.disk = None;
        })
        .await;
    if let Err(refused) = recorded {
        tracing::warn!("recording the main command's exit: {refused}");
    }
    true
}
