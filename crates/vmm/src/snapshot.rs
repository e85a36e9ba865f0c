//! Taking a snapshot of the running VM, and repairing a restored guest.
//!
//! Sequence: wipe secrets and flush filesystems in the guest → pause →
//! write the machine state (QEMU migration stream, devices + RAM) into the
//! bundle → copy the disk layer (sparse) → resume (keep-alive) → write meta
//! and manifest, sync, rename into place. The bundle is built in a hidden
//! temp directory and recorded in `<vm dir>/snapshot.partial`, so a crash at
//! any point leaves nothing that restore accepts and nothing `gc` cannot
//! find. Any failure resumes the source.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use machinen::bundle::{self, Builder, BundleMeta, ImageIdentity, KernelIdentity};
use machinen::registry;
use machinen::spec::VmSpec;
use machinen::ErrorCode;
use machinen_proto::{
    FixupReport, FixupRequest, Request, Response, SnapshotReport, SnapshotRequest,
};

use crate::agent::AgentSession;
use crate::control::Shared;
use crate::engine::qemu::QemuMachine;
use crate::engine::{Capabilities, Machine};
use crate::supervisor::StartError;

/// Default bound on a whole snapshot.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(90);

/// Marker naming the bundle being written, inside the VM's directory.
pub const PARTIAL_MARKER: &str = "snapshot.partial";

/// This VM's checkpoint chain: every snapshot of one running VM links to
/// the previous one.
pub struct Chain {
    id: String,
    seq: u32,
    parent: Option<String>,
    /// sha256 of the VM's kernel, hashed at the first snapshot (it does not
    /// change while the VM lives).
    kernel_sha: Option<String>,
}

impl Chain {
    pub fn new(spec: &VmSpec) -> Chain {
        Chain {
            id: format!("{}-{:x}", spec.id, spec.created_at_ms),
            seq: 0,
            parent: None,
            kernel_sha: None,
        }
    }
}

/// Remove a half-written bundle this VM left behind (called on exit; `gc`
/// does the same for a supervisor that died).
pub fn remove_partial(spec: &VmSpec) {
    let marker = spec.path_in(PARTIAL_MARKER);
    if let Ok(p) = std::fs::read_to_string(&marker) {
        let p = PathBuf::from(p.trim());
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().contains(".partial-"))
        {
            let _ = std::fs::remove_dir_all(&p);
        }
        let _ = std::fs::remove_file(&marker);
    }
}

pub(crate) fn err(code: ErrorCode, message: impl Into<String>) -> StartError {
    StartError {
        code,
        message: message.into(),
        hint: None,
    }
}

pub async fn take(
    machine: &QemuMachine,
    shared: &Shared,
    spec: &VmSpec,
    caps: &Capabilities,
    chain: &mut Chain,
    req: SnapshotRequest,
) -> Result<SnapshotReport, StartError> {
    let t0 = Instant::now();
    let timeout = if req.timeout_ms == 0 {
        DEFAULT_TIMEOUT
    } else {
        Duration::from_millis(req.timeout_ms)
    };
    let deadline = t0 + timeout;
    let out = PathBuf::from(&req.out);
    if !out.is_absolute() {
        return Err(err(
            ErrorCode::SnapshotDumpFailed,
            format!("snapshot destination {} is not absolute", out.display()),
        ));
    }
    let agent = shared.agent.lock().await.clone().ok_or_else(|| {
        err(
            ErrorCode::ExecVsockUnavailable,
            "the guest agent is not connected",
        )
    })?;
    // The marker names the temp bundle before it exists, so a crash at any
    // point leaves gc a way to find it.
    let marker = spec.path_in(PARTIAL_MARKER);
    let builder = Builder::new_recorded(&out, |tmp| {
        registry::write_atomic(&marker, tmp.display().to_string().as_bytes())
    })
    .map_err(|e| err(machinen::error::Coded::code(&e), e.to_string()))?;

    // Secrets must not reach the bundle; a guest that cannot wipe them is
    // not snapshotted.
    match agent
        .request(Request::WipeSecrets, Duration::from_secs(10))
        .await
    {
        Ok(Response::SecretsWiped { .. }) => {}
        Ok(other) => {
            return Err(err(
                ErrorCode::SnapshotDumpFailed,
                format!("wiping secrets: unexpected answer {other:?}"),
            ))
        }
        Err(e) => {
            return Err(err(
                ErrorCode::SnapshotDumpFailed,
                format!("wiping secrets in the guest failed: {e}"),
            ))
        }
    }
    if let Err(e) = agent
        .request(Request::Quiesce, Duration::from_secs(30))
        .await
    {
        return Err(err(
            ErrorCode::SnapshotDumpFailed,
            format!("flushing guest filesystems failed: {e}"),
        ));
    }

    machine
        .pause()
        .await
        .map_err(|e| err(ErrorCode::SnapshotDumpFailed, e.to_string()))?;
    let paused_at = Instant::now();
    let saved = async {
        // QEMU writes the state through `cat > file`, which keeps the mode
        // of a file that exists: 0600, like the rest of the bundle.
        let state_path = builder.path(bundle::STATE);
        machinen::vm::private_file(&state_path).map_err(|e| {
            err(
                ErrorCode::SnapshotDumpFailed,
                format!("cannot create {}: {e}", state_path.display()),
            )
        })?;
        machine
            .save_state(&state_path, deadline)
            .await
            .map_err(|e| match e {
                crate::engine::EngineError::Timeout { .. } => err(
                    ErrorCode::SnapshotTimeout,
                    format!(
                        "the snapshot did not complete within {} s",
                        timeout.as_secs()
                    ),
                ),
                e => err(
                    ErrorCode::SnapshotDumpFailed,
                    format!("saving the machine state failed: {e}"),
                ),
            })?;
        // The disk layer and, when RAM is a shared file (skipped by the
        // migration stream), the RAM: both copied sparse while paused.
        let mut copies = vec![(spec.disk.clone(), builder.path(bundle::DISK), "disk layer")];
        if let Some(ram) = &spec.ram_file {
            copies.push((ram.clone(), builder.path(bundle::RAM), "guest RAM"));
        }
        for (src, dst, what) in copies {
            tokio::task::spawn_blocking(move || bundle::sparse_copy(&src, &dst))
                .await
                .map_err(|e| err(ErrorCode::SnapshotDumpFailed, e.to_string()))?
                .map_err(|e| {
                    err(
                        ErrorCode::SnapshotDumpFailed,
                        format!("copying the {what} failed: {e}"),
                    )
                })?;
        }
        Ok::<(), StartError>(())
    }
    .await;
    if saved.is_err() || req.keep_alive {
        // Whatever happened, a keep-alive source and a failed snapshot's
        // source run on.
        if let Err(e) = machine.resume().await {
            tracing::error!("resuming after the snapshot failed: {e}");
        }
    }
    let paused_ms = paused_at.elapsed().as_millis() as u64;
    saved?;

    chain.seq += 1;
    let kernel_sha = match &chain.kernel_sha {
        Some(h) => h.clone(),
        None => {
            let k = spec.kernel.clone();
            let h = tokio::task::spawn_blocking(move || bundle::hash_file(&k))
                .await
                .ok()
                .and_then(|r| r.ok())
                .map(|(_, h)| h);
            chain.kernel_sha.clone_from(&h);
            h.unwrap_or_default()
        }
    };
    let meta = BundleMeta {
        format: bundle::FORMAT_NAME.into(),
        version: bundle::FORMAT_VERSION,
        engine: caps.engine.into(),
        source_name: spec.name.clone(),
        image: ImageIdentity {
            path: spec.image.clone().unwrap_or_default(),
            sha256: spec.image_sha256.clone().unwrap_or_default(),
        },
        snapped_at_ms: registry::now_ms(),
        guest_arch: machinen::paths::debian_arch().into(),
        accel: caps.accel.as_str().into(),
        cpu_model: caps.cpu_model.clone(),
        memory_mib: spec.memory_mib,
        cpus: spec.cpus,
        kernel: KernelIdentity {
            version: spec.kernel_version.clone(),
            sha256: kernel_sha,
        },
        disk_format: "qcow2".into(),
        chain_id: chain.id.clone(),
        chain_seq: chain.seq,
        chain_parent: chain.parent.clone(),
        network: spec.network,
    };
    let scratch = req.scratch;
    let finished = tokio::task::spawn_blocking(move || {
        if scratch {
            builder.finish_scratch(&meta)
        } else {
            builder.finish(&meta)
        }
    })
    .await
    .map_err(|e| err(ErrorCode::SnapshotDumpFailed, e.to_string()))?
    .map_err(|e| {
        err(
            ErrorCode::SnapshotDumpFailed,
            format!("writing the bundle failed: {e}"),
        )
    })?;
    let _ = std::fs::remove_file(&marker);
    chain.parent = Some(finished.display().to_string());
    let (bytes, disk_bytes) = bundle::dir_usage(&finished);
    let report = SnapshotReport {
        out: finished.display().to_string(),
        elapsed_ms: t0.elapsed().as_millis() as u64,
        paused_ms,
        bytes,
        disk_bytes,
    };
    tracing::info!("snapshot {report:?}; machine pid {}", machine.pid());
    Ok(report)
}

/// After a restore: set the clock, reseed the RNG with fresh host entropy,
/// reset inherited TCP connections when asked.
pub async fn fixup(agent: &AgentSession, reset_tcp: bool) -> Result<FixupReport, String> {
    let mut entropy = [0u8; 64];
    {
        use std::io::Read;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut entropy))
            .map_err(|e| format!("host entropy: {e}"))?;
    }
    let wall_clock_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let req = FixupRequest {
        wall_clock_ns,
        entropy_hex: entropy.iter().map(|b| format!("{b:02x}")).collect(),
        reset_tcp,
    };
    match agent
        .request(Request::Fixup(req), Duration::from_secs(20))
        .await?
    {
        Response::FixedUp(r) => Ok(r),
        other => Err(format!("unexpected answer {other:?}")),
    }
}
