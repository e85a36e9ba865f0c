//! The per-VM supervisor process: binds its control socket and host ports,
//! probes the engine, wires the launcher (stdin, the ready line on stdout,
//! signals) and hands the VM to the lifecycle controller (`controller`).
//!
//! The states and their moves are `machinen_proto::VmState`; the one
//! writer is `lifecycle`.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use machinen::registry::{self, Registry};
use machinen::spec::{files, ReadyLine, VmSpec};
use machinen::ErrorCode;
use machinen_proto::{VmState, VmStatus};
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, Mutex};

use crate::control::{self, Shared, SnapshotCmd};
use crate::controller::{self, Channels, Launcher};
use crate::engine::qemu::QemuEngine;
use crate::engine::EngineError;
use crate::{console, ports};

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
        // The ready line carries text only: the causes go into it.
        let mut message = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            message = format!("{message}: {c}");
            cause = c.source();
        }
        StartError {
            code,
            message,
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

pub(crate) fn console_tail(spec: &VmSpec) -> String {
    console_lines(spec, 15)
}

/// The last `n` lines of the console log, reading at most its last 256 KiB
/// (a guest may have written gigabytes to it).
pub(crate) fn console_lines(spec: &VmSpec, n: usize) -> String {
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
    let entry = (reg.clone(), spec.id.clone());
    let fail_start =
        |e: StartError| controller::fail_start(&mut emit_ready, Some(&entry), &spec, e);
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
    let (stop_tx, stop_rx) = mpsc::channel::<bool>(4);
    let (snap_tx, snap_rx) = mpsc::channel::<SnapshotCmd>(4);
    let (balloon_tx, balloon_rx) = mpsc::channel(4);
    let net = (spec.network == machinen::spec::NetworkMode::Nat)
        .then(|| crate::netfilter::Net::new(spec.net_policy.clone(), &spec.net_learned));
    let egress = match (&net, spec.egress_secrets.is_empty()) {
        (_, true) => None,
        (Some(net), false) => {
            match crate::egress::Egress::new(&spec.name, spec.egress_secrets.clone(), net.clone()) {
                Ok(e) => Some(e),
                Err(e) => {
                    let cause = std::error::Error::source(&e)
                        .map(|c| format!(": {c}"))
                        .unwrap_or_default();
                    return fail_start(StartError {
                        code: ErrorCode::NetworkUnavailable,
                        message: format!("{e}{cause}"),
                        hint: Some(
                            "the egress proxy could not start; boot without --egress-secret".into(),
                        ),
                    });
                }
            }
        }
        (None, false) => {
            return fail_start(StartError {
                code: ErrorCode::BootArgsInvalid,
                message: "egress secrets need --network nat".into(),
                hint: None,
            })
        }
    };
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
        balloon_tx,
        balloon_target: Mutex::new(None),
        pausing: std::sync::atomic::AtomicBool::new(false),
        registry: Some((reg.clone(), spec.id.clone())),
        net: net.clone(),
        egress: egress.clone(),
    });
    if let Some(e) = egress {
        tokio::spawn(crate::egress::run(e, shared.clone()));
    }
    tokio::spawn(control::serve(listener, shared.clone()));
    tokio::spawn(console::cap(
        spec.path_in(files::CONSOLE),
        console::max_from_env(),
    ));

    let engine = match QemuEngine::probe(&spec) {
        Ok(e) => e.with_net(shared.net.clone()),
        Err(e) => {
            let reg = shared.registry.clone();
            return controller::fail_start(&mut emit_ready, reg.as_ref(), &spec, e.into());
        }
    };
    // A foreground VM lives as long as its launcher holds our stdin open
    // (after the restore gate's line, read a byte at a time from the same
    // stdin).
    let detached = spec.detached;
    let gone = async move {
        if detached {
            std::future::pending::<()>().await;
        }
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        // Only the tail matters: the detach line may arrive split.
        let mut seen: Vec<u8> = Vec::new();
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if seen
                .windows(machinen_proto::DETACH_LINE.len())
                .any(|w| w == machinen_proto::DETACH_LINE)
            {
                tracing::info!("the launcher detached: the VM outlives it");
                std::future::pending::<()>().await;
            }
            let keep = seen.len().saturating_sub(machinen_proto::DETACH_LINE.len());
            seen.drain(..keep);
        }
    };
    let mut sigterm = signal(SignalKind::terminate()).ok();
    let mut sigint = signal(SignalKind::interrupt()).ok();
    let term = async move {
        match (&mut sigterm, &mut sigint) {
            (Some(t), Some(i)) => {
                tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
            }
            _ => std::future::pending::<()>().await,
        }
    };
    let launcher = Launcher {
        gate: tokio::io::stdin(),
        gone: Box::pin(gone),
        term: Box::pin(term),
        ready: Box::new(emit_ready),
    };
    let channels = Channels {
        stop_rx,
        snap_rx,
        balloon_rx,
    };
    controller::run(
        &engine, &spec, &shared, channels, forwards, launcher, started,
    )
    .await
}
