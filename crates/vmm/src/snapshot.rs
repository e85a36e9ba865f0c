//! Taking a snapshot of the running VM, and repairing a restored guest.
//!
//! Sequence: wipe secrets and flush filesystems in the guest → pause →
//! write the machine state (QEMU migration stream, devices + RAM) into the
//! bundle → copy the disk layer (sparse) → resume (keep-alive) → write meta
//! and manifest, sync, rename into place. A VM whose RAM is not a shared
//! file (a copy-on-write restore) is not paused first: its RAM goes into
//! the stream while it runs, and QEMU pauses it for the last pass. The bundle is built in a hidden
//! temp directory and recorded in `<vm dir>/snapshot.partial`, so a crash at
//! any point leaves nothing that restore accepts and nothing `gc` cannot
//! find. Any failure, the deadline passing in any phase included, removes
//! the temp directory and resumes the source.

use machinen_proto::{timeouts, PhaseClock};
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
use crate::engine::{Capabilities, Machine};
use crate::supervisor::StartError;

/// Default bound on a whole snapshot (shared with the client, which waits
/// longer).
const DEFAULT_TIMEOUT: Duration = machinen::restore::DEFAULT_SNAPSHOT_TIMEOUT;

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

/// The first QEMU that migrates a vhost-user-fs device's internal state.
const LIVE_MOUNT_MIGRATION: (u32, u32) = (8, 2);

pub(crate) fn err(code: ErrorCode, message: impl Into<String>) -> StartError {
    StartError {
        code,
        message: message.into(),
        hint: None,
    }
}

/// The snapshot's deadline passed during `doing`.
fn late(timeout: Duration, doing: &str) -> StartError {
    StartError {
        code: ErrorCode::SnapshotTimeout,
        message: format!(
            "the snapshot did not complete within {} s (it was {doing}); \
             no bundle was written and the source runs on",
            timeout.as_secs_f64()
        ),
        hint: Some("give the snapshot a longer --timeout".into()),
    }
}

/// A bundle error, as the snapshot's answer.
fn bundle_err(timeout: Duration, what: &str, e: bundle::BundleError) -> StartError {
    match e {
        bundle::BundleError::Deadline { doing } => late(timeout, doing),
        e => err(
            machinen::error::Coded::code(&e),
            format!("{what} failed: {e}"),
        ),
    }
}

/// What is left of the snapshot's time, capped at `cap` (a bound of a step's
/// own); `None` once the deadline has passed.
fn left(deadline: Instant, cap: Duration) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .map(|d| d.min(cap))
}

/// Take a snapshot into `req.out`. The deadline (`req.timeout_ms`) covers
/// every phase: the guest's wipe and flush, the machine state, the sparse
/// copies, the digests, the syncs and the rename that publishes the bundle
/// (checked between chunks, and last right before the rename). So the
/// outcome is one of two: `Ok`, the bundle is complete in place; or `Err`,
/// there is no bundle (its temp directory and marker removed) and the
/// source runs. Only the caller stops the source, and only after `Ok` of a
/// destructive snapshot: it does so whether or not the client is still
/// there to read the answer, since the bundle is complete.
pub async fn take<M: Machine>(
    machine: &M,
    shared: &Shared,
    spec: &VmSpec,
    caps: &Capabilities,
    chain: &mut Chain,
    req: SnapshotRequest,
) -> Result<SnapshotReport, StartError> {
    let t0 = Instant::now();
    let deadline = t0 + timeout_of(&req);
    let out = PathBuf::from(&req.out);
    if !out.is_absolute() {
        return Err(err(
            ErrorCode::SnapshotDumpFailed,
            format!("snapshot destination {} is not absolute", out.display()),
        ));
    }
    // Older QEMU cannot move a virtio-fs device's state: it would fail
    // mid-way with the guest paused.
    if spec.live_mounts.is_some()
        && !machinen::qemu_args::at_least(caps.version, LIVE_MOUNT_MIGRATION)
    {
        let mut e = err(
            ErrorCode::SnapshotDumpFailed,
            "a VM with live mounts can be snapshotted with QEMU 8.2 or later only",
        );
        e.hint = Some(
            "upgrade QEMU (Debian 12: from bookworm-backports; scripts/install-deps does it)"
                .into(),
        );
        return Err(e);
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
    let builder = tokio::task::spawn_blocking(move || {
        Builder::new_recorded(&out, |tmp| {
            registry::write_atomic(&marker, tmp.display().to_string().as_bytes())
        })
    })
    .await
    .map_err(|e| err(ErrorCode::SnapshotDumpFailed, e.to_string()))?
    .map_err(|e| err(machinen::error::Coded::code(&e), e.to_string()))?;

    let phases = Phases {
        machine,
        agent: &agent,
        spec,
        caps,
        req: &req,
        deadline,
    };
    let mut clock = PhaseClock::starting_at(t0);
    let result = phases.build(chain, builder, &mut clock).await;
    match result {
        Ok(mut report) => {
            report.elapsed_ms = t0.elapsed().as_millis() as u64;
            report.phases = clock.into_phases();
            tracing::info!("snapshot {report:?}; machine pid {}", machine.pid());
            Ok(report)
        }
        Err(e) => {
            // Whatever failed, the source runs on (a keep-alive source may
            // already run; `cont` on a running VM is harmless).
            if let Err(e) = machine.resume().await {
                tracing::error!("resuming after the snapshot failed: {e}");
            }
            // The builder was dropped (its temp directory removed) where
            // the failure happened; the marker goes too.
            let spec = spec.clone();
            let _ = tokio::task::spawn_blocking(move || remove_partial(&spec)).await;
            tracing::warn!("snapshot failed: {}", e.message);
            Err(e)
        }
    }
}

/// The snapshot's bound: `timeout_ms`, or the default for 0.
fn timeout_of(req: &SnapshotRequest) -> Duration {
    if req.timeout_ms == 0 {
        DEFAULT_TIMEOUT
    } else {
        Duration::from_millis(req.timeout_ms)
    }
}

/// What the snapshot's phases work with.
struct Phases<'a, M> {
    machine: &'a M,
    agent: &'a AgentSession,
    spec: &'a VmSpec,
    caps: &'a Capabilities,
    req: &'a SnapshotRequest,
    deadline: Instant,
}

impl<M: Machine> Phases<'_, M> {
    /// The snapshot's phases, each bounded by the deadline; on error the caller
    /// resumes the source and clears the marker.
    async fn build(
        &self,
        chain: &mut Chain,
        builder: Builder,
        clock: &mut PhaseClock,
    ) -> Result<SnapshotReport, StartError> {
        let Phases {
            machine,
            agent,
            spec,
            caps,
            req,
            deadline,
        } = *self;
        let timeout = timeout_of(req);
        // Dropping a builder removes its temp directory: file I/O, off the
        // runtime's thread.
        let abandon = |builder: Builder, e: StartError| async move {
            let _ = tokio::task::spawn_blocking(move || drop(builder)).await;
            Err::<SnapshotReport, StartError>(e)
        };

        // Secrets must not reach the bundle; a guest that cannot wipe them is
        // not snapshotted.
        let Some(wait) = left(deadline, timeouts::WIPE_SECRETS) else {
            return abandon(builder, late(timeout, "wiping secrets")).await;
        };
        match agent.request(Request::WipeSecrets, wait).await {
            Ok(Response::SecretsWiped { .. }) => {}
            Ok(other) => {
                let e = err(
                    ErrorCode::SnapshotDumpFailed,
                    format!("wiping secrets: unexpected answer {other:?}"),
                );
                return abandon(builder, e).await;
            }
            Err(_) if left(deadline, Duration::MAX).is_none() => {
                return abandon(builder, late(timeout, "wiping secrets")).await;
            }
            Err(e) => {
                let e = err(
                    ErrorCode::SnapshotDumpFailed,
                    format!("wiping secrets in the guest failed: {e}"),
                );
                return abandon(builder, e).await;
            }
        }
        clock.mark("wipe-secrets");
        let Some(wait) = left(deadline, timeouts::QUIESCE) else {
            return abandon(builder, late(timeout, "flushing guest filesystems")).await;
        };
        if let Err(e) = agent.request(Request::Quiesce, wait).await {
            let e = if left(deadline, Duration::MAX).is_none() {
                late(timeout, "flushing guest filesystems")
            } else {
                err(
                    ErrorCode::SnapshotDumpFailed,
                    format!("flushing guest filesystems failed: {e}"),
                )
            };
            return abandon(builder, e).await;
        }

        clock.mark("flush");
        // RAM in a shared file is copied as a file while the guest is
        // paused; other RAM (a copy-on-write mapping of a bundle's, or
        // anonymous) goes into the state, copied while the guest runs, so
        // the pause is only for what changed meanwhile, whatever the
        // memory ceiling or the VM's history.
        let live = spec.ram_file.is_none();
        if !live {
            if let Err(e) = machine.pause().await {
                return abandon(builder, err(ErrorCode::SnapshotDumpFailed, e.to_string())).await;
            }
            clock.mark("pause");
        }
        let mut paused_at = Instant::now();
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
            let as_start_error = |e| match e {
                crate::engine::EngineError::Timeout { .. } => {
                    late(timeout, "writing the machine state")
                }
                e => err(
                    ErrorCode::SnapshotDumpFailed,
                    format!("saving the machine state failed: {e}"),
                ),
            };
            if live {
                let paused = machine
                    .save_state_live(&state_path, deadline)
                    .await
                    .map_err(as_start_error)?;
                paused_at = Instant::now().checked_sub(paused).unwrap_or(paused_at);
            } else {
                machine
                    .save_state(&state_path, deadline)
                    .await
                    .map_err(as_start_error)?;
            }
            clock.mark("state");
            // The disk layer and, when RAM is a shared file (skipped by the
            // migration stream), the RAM: both copied sparse while paused.
            let mut copies = vec![(spec.disk.clone(), builder.path(bundle::DISK), "disk layer")];
            if let Some(ram) = &spec.ram_file {
                copies.push((ram.clone(), builder.path(bundle::RAM), "guest RAM"));
            }
            if let Some(m) = &spec.mounts {
                copies.push((
                    m.layer.clone(),
                    builder.path(bundle::MOUNTS_LAYER),
                    "copy-once mounts' layer",
                ));
            }
            // The main command's log so far (service VMs), for the
            // restored VM's `logs`; it re-attaches after its last record.
            if let Some(log) = crate::service::log_for_bundle(spec) {
                copies.push((log, builder.path(bundle::MAIN_LOG), "main command's log"));
            }
            for (src, dst, what) in copies {
                tokio::task::spawn_blocking(move || {
                    bundle::sparse_copy_until(&src, &dst, Some(deadline))
                })
                .await
                .map_err(|e| err(ErrorCode::SnapshotDumpFailed, e.to_string()))?
                .map_err(|e| bundle_err(timeout, &format!("copying the {what}"), e))?;
            }
            clock.mark("copies");
            Ok::<(), StartError>(())
        }
        .await;
        if let Err(e) = saved {
            return abandon(builder, e).await;
        }
        if req.keep_alive {
            // A keep-alive source runs on while the bundle is hashed and synced.
            if let Err(e) = machine.resume().await {
                tracing::error!("resuming after the snapshot failed: {e}");
            }
            clock.mark("resume");
        }
        let paused_ms = paused_at.elapsed().as_millis() as u64;
        // The mounts' lower never changes: linked (or copied) with the
        // guest running again.
        if let Some(m) = &spec.mounts {
            let (src, dst) = (m.lower.clone(), builder.path(bundle::MOUNTS_LOWER));
            let linked = tokio::task::spawn_blocking(move || {
                if std::fs::hard_link(&src, &dst).is_ok() {
                    return Ok(());
                }
                bundle::sparse_copy_until(&src, &dst, Some(deadline)).map(drop)
            })
            .await
            .map_err(|e| err(ErrorCode::SnapshotDumpFailed, e.to_string()))
            .and_then(|r| r.map_err(|e| bundle_err(timeout, "copying the mounts' lower", e)));
            if let Err(e) = linked {
                return abandon(builder, e).await;
            }
            clock.mark("mounts-lower");
        }

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
                source: spec.image_source.clone(),
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
            chain_seq: chain.seq + 1,
            chain_parent: chain.parent.clone(),
            network: spec.network,
            main: crate::service::bundle_main(spec),
            mounts: spec.mounts.as_ref().map(|m| bundle::BundleMounts {
                mounts: m.mounts.clone(),
                lower_sha256: m.lower_sha256.clone(),
            }),
            balloon: machinen::qemu_args::has_balloon(spec, caps.version),
            live_mounts: spec
                .live_mounts
                .as_ref()
                .map(|l| l.mounts.clone())
                .unwrap_or_default(),
        };
        let scratch = req.scratch;
        let marker = spec.path_in(PARTIAL_MARKER);
        // The digests, syncs and rename, bounded by the deadline; a failure
        // drops the builder (removing the temp directory) on the blocking task.
        let finished = tokio::task::spawn_blocking(move || {
            let done = if scratch {
                builder.finish_scratch_until(&meta, Some(deadline))
            } else {
                builder.finish_until(&meta, Some(deadline))
            }?;
            let _ = std::fs::remove_file(&marker);
            let usage = bundle::dir_usage(&done);
            Ok::<_, bundle::BundleError>((done, usage))
        })
        .await
        .map_err(|e| err(ErrorCode::SnapshotDumpFailed, e.to_string()))?
        .map_err(|e| bundle_err(timeout, "writing the bundle", e))?;
        clock.mark("finish");
        let (finished, (bytes, disk_bytes)) = finished;
        chain.seq += 1;
        chain.parent = Some(finished.display().to_string());
        Ok(SnapshotReport {
            out: finished.display().to_string(),
            elapsed_ms: 0,
            paused_ms,
            bytes,
            disk_bytes,
            phases: Vec::new(),
        })
    }
}

/// After a restore: set the clock, reseed the RNG with fresh host entropy,
/// reset inherited TCP connections when asked.
pub async fn fixup(
    agent: &AgentSession,
    reset_tcp: bool,
    stop_page_reporting: bool,
) -> Result<FixupReport, String> {
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
        stop_page_reporting,
    };
    match agent.request(Request::Fixup(req), timeouts::FIXUP).await? {
        Response::FixedUp(r) => Ok(r),
        other => Err(format!("unexpected answer {other:?}")),
    }
}
