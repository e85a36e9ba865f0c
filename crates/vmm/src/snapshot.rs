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
use machinen::spec::{ChainLink, VmSpec};
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
/// the previous one, and is a delta over it (see [`machinen::chain`]).
pub struct Chain {
    id: String,
    seq: u32,
    parent: Option<String>,
    /// sha256 of the VM's kernel, hashed at the first snapshot (it does not
    /// change while the VM lives).
    kernel_sha: Option<String>,
    /// The bundle the next snapshot can be a delta over: the last
    /// checkpoint, or the bundle the VM was restored from.
    link: Option<ChainLink>,
    /// The RAM file's pages as they were at `link` (see [`crate::dirty`]).
    ram_record: Option<crate::dirty::PageHashes>,
    /// The disk: read-only layers (bottom first) under `top`, the one the
    /// guest writes, which holds exactly what it wrote since `link`.
    below: Vec<PathBuf>,
    top: PathBuf,
    top_node: String,
    layers_made: u32,
}

impl Chain {
    pub fn new(spec: &VmSpec) -> Chain {
        let link = spec.restore.as_ref().and_then(|r| r.link.clone());
        Chain {
            id: link
                .as_ref()
                .map(|l| l.chain_id.clone())
                .unwrap_or_else(|| format!("{}-{:x}", spec.id, spec.created_at_ms)),
            seq: link.as_ref().map(|l| l.chain_seq).unwrap_or(0),
            parent: link.as_ref().map(|l| l.dir.display().to_string()),
            kernel_sha: None,
            link,
            ram_record: None,
            below: spec
                .restore
                .as_ref()
                .map(|r| r.disk_below.clone())
                .unwrap_or_default(),
            top: spec.disk.clone(),
            top_node: "root".into(),
            layers_made: 0,
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
    if req.disk_only {
        return take_disk(machine, &agent, spec, chain, &out, t0, deadline).await;
    }
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
        net_policy: shared
            .net
            .as_ref()
            .map_or_else(|| spec.net_policy.clone(), |n| n.policy()),
        net_learned: shared
            .net
            .as_ref()
            .map_or_else(|| spec.net_learned.clone(), |n| n.learned()),
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

/// The CRIU engine's share of a snapshot (`SnapshotRequest::disk_only`):
/// the guest's filesystems flushed, then, with the guest paused for the
/// copies only, the disk's top layer and the main command's log copied
/// into `out` (the client's bundle being built); layers below the top are
/// merged with it after the guest runs again (they are read-only). The
/// client removes `out` on failure; the guest always runs on here.
async fn take_disk<M: Machine>(
    machine: &M,
    agent: &AgentSession,
    spec: &VmSpec,
    chain: &Chain,
    out: &std::path::Path,
    t0: Instant,
    deadline: Instant,
) -> Result<SnapshotReport, StartError> {
    let timeout = deadline.saturating_duration_since(t0);
    if !out.is_dir() {
        return Err(err(
            ErrorCode::SnapshotDumpFailed,
            format!("{} is not a directory", out.display()),
        ));
    }
    let Some(wait) = left(deadline, timeouts::QUIESCE) else {
        return Err(late(timeout, "flushing guest filesystems"));
    };
    agent.request(Request::Quiesce, wait).await.map_err(|e| {
        err(
            ErrorCode::SnapshotDumpFailed,
            format!("flushing guest filesystems failed: {e}"),
        )
    })?;
    machine
        .pause()
        .await
        .map_err(|e| err(ErrorCode::SnapshotDumpFailed, e.to_string()))?;
    let paused_at = Instant::now();
    let merge = !chain.below.is_empty();
    let top_dst = out.join(if merge { TOP_PARTIAL } else { bundle::DISK });
    let mut copies = vec![(chain.top.clone(), top_dst.clone(), "disk layer")];
    if let Some(log) = crate::service::log_for_bundle(spec) {
        copies.push((log, out.join(bundle::MAIN_LOG), "main command's log"));
    }
    let copied = copy_all(copies, deadline, timeout).await;
    if let Err(e) = machine.resume().await {
        tracing::error!("resuming after the disk copy failed: {e}");
    }
    let paused_ms = paused_at.elapsed().as_millis() as u64;
    copied?;
    if merge {
        let mut layers = chain.below.clone();
        layers.push(top_dst.clone());
        let dst = out.join(bundle::DISK);
        tokio::task::spawn_blocking(move || {
            let r = machinen::chain::flatten_disk(&layers, &dst);
            let _ = std::fs::remove_file(&top_dst);
            r.map(drop)
        })
        .await
        .map_err(|e| err(ErrorCode::SnapshotDumpFailed, e.to_string()))?
        .map_err(|e| {
            err(
                ErrorCode::SnapshotDumpFailed,
                format!("merging the disk layers failed: {e}"),
            )
        })?;
    }
    let dir = out.to_path_buf();
    let (bytes, disk_bytes) = tokio::task::spawn_blocking(move || bundle::dir_usage(&dir))
        .await
        .unwrap_or_default();
    Ok(SnapshotReport {
        out: out.display().to_string(),
        elapsed_ms: t0.elapsed().as_millis() as u64,
        paused_ms,
        bytes,
        disk_bytes,
        phases: Vec::new(),
    })
}

/// Sparse copies of `(source, destination, what)`, in order, off the
/// runtime's threads, bounded by `deadline`.
async fn copy_all(
    copies: Vec<(PathBuf, PathBuf, &'static str)>,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), StartError> {
    for (src, dst, what) in copies {
        tokio::task::spawn_blocking(move || bundle::sparse_copy_until(&src, &dst, Some(deadline)))
            .await
            .map_err(|e| err(ErrorCode::SnapshotDumpFailed, e.to_string()))?
            .map_err(|e| bundle_err(timeout, &format!("copying the {what}"), e))?;
    }
    Ok(())
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
    /// The egress policy in force now (`machinen network` may have changed
    /// it since boot).
    net_policy: machinen_proto::netpolicy::NetPolicy,
    net_learned: Vec<machinen_proto::netpolicy::LearnedAddress>,
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
            ..
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
        let plan = Plan::make(spec, chain, req).await;
        // RAM in a shared file is copied as a file while the guest is
        // paused; other RAM (a copy-on-write mapping of a bundle's, or
        // anonymous) goes into the state, copied while the guest runs, so
        // the pause is only for what changed meanwhile, whatever the
        // memory ceiling or the VM's history.
        let live = spec.ram_file.is_none();
        // A delta's scan of the RAM, readied while the guest still runs.
        if let (true, Some(ram), Some(mut record)) = (
            plan.ram_delta,
            spec.ram_file.clone(),
            chain.ram_record.take(),
        ) {
            let back = tokio::task::spawn_blocking(move || {
                record.prepare(&ram);
                record
            })
            .await;
            chain.ram_record = back.ok();
            clock.mark("ram-map");
        }
        if !live {
            if let Err(e) = machine.pause().await {
                return abandon(builder, err(ErrorCode::SnapshotDumpFailed, e.to_string())).await;
            }
            clock.mark("pause");
        }
        let mut paused_at = Instant::now();
        // A delta's RAM scan is the pause's longest part and touches only
        // the RAM file, which nothing writes while the guest is paused:
        // it runs on its own threads beside the state and the copies.
        let ram_scan = if plan.ram_delta {
            let ram = spec.ram_file.clone().unwrap_or_default();
            let (dst, list) = (builder.path(bundle::RAM), builder.path(bundle::RAM_PAGES));
            let bytes = u64::from(spec.memory_mib) << 20;
            // The record changes with the pages it finds: it is kept only
            // once the bundle is complete.
            let record = chain.ram_record.take();
            Some(tokio::task::spawn_blocking(move || {
                let mut record = record;
                let r = match record.as_mut() {
                    Some(rec) => ram_delta(rec, &ram, bytes, &dst, &list),
                    None => Err(std::io::Error::other("no record of the RAM")),
                };
                (record, r)
            }))
        } else {
            None
        };
        let mut updated_record = None;
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
            let top_dst = if plan.flatten_later {
                builder.path(TOP_PARTIAL)
            } else {
                builder.path(bundle::DISK)
            };
            let mut copies = vec![(chain.top.clone(), top_dst, "disk layer")];
            if let Some(ram) = spec.ram_file.as_ref().filter(|_| !plan.ram_delta) {
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
            copy_all(copies, deadline, timeout).await?;
            clock.mark("copies");
            Ok::<(), StartError>(())
        }
        .await;
        // Joined even when the rest failed: the bundle is abandoned only
        // once nothing writes into it.
        if let Some(scan) = ram_scan {
            let scanned = match scan.await {
                Ok((record, Ok(()))) => {
                    updated_record = record;
                    clock.mark("ram-delta");
                    Ok(())
                }
                Ok((_, Err(e))) => Err(err(
                    ErrorCode::SnapshotDumpFailed,
                    format!("copying the RAM pages changed since the last checkpoint failed: {e}"),
                )),
                Err(e) => Err(err(ErrorCode::SnapshotDumpFailed, e.to_string())),
            };
            if let (Ok(()), Err(e)) = (&saved, scanned) {
                return abandon(builder, e).await;
            }
        }
        if let Err(e) = saved {
            return abandon(builder, e).await;
        }
        // Still paused: a checkpoint the VM runs on from starts a new disk
        // layer and the RAM's record of written pages.
        let below_then = chain.below.clone();
        if !req.scratch && req.keep_alive {
            // Until this bundle is complete, nothing is known to be a parent.
            chain.link = None;
            chain.ram_record = None;
            if let Some(file) = &plan.next_layer {
                let node = format!("layer{}", chain.layers_made);
                match machine.new_disk_layer(&chain.top_node, file, &node).await {
                    Ok(()) => {
                        chain
                            .below
                            .push(std::mem::replace(&mut chain.top, file.clone()));
                        chain.top_node = node;
                    }
                    Err(e) => {
                        tracing::warn!("starting a new disk layer failed: {e}");
                        let _ = std::fs::remove_file(file);
                    }
                }
            }
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

        // A self-contained bundle of a VM with several disk layers merges
        // them (the guest runs meanwhile: all but the top are read-only, and
        // the top was copied); a scratch bundle carries them as they are.
        let mut disk_below = Vec::new();
        if plan.flatten_later || (req.scratch && !below_then.is_empty()) {
            let (tmp, scratch) = (builder.tmp.clone(), req.scratch);
            let layers = below_then.clone();
            let r = tokio::task::spawn_blocking(move || {
                if scratch {
                    let mut names = Vec::new();
                    for (i, l) in layers.iter().enumerate() {
                        let name = format!("disk-below{i}.qcow2");
                        let dst = tmp.join(&name);
                        if std::fs::hard_link(l, &dst).is_err() {
                            bundle::sparse_copy(l, &dst).map_err(|e| e.to_string())?;
                        }
                        names.push(name);
                    }
                    return Ok(names);
                }
                let mut all = layers;
                all.push(tmp.join(TOP_PARTIAL));
                let r = machinen::chain::flatten_disk(&all, &tmp.join(bundle::DISK));
                let _ = std::fs::remove_file(tmp.join(TOP_PARTIAL));
                r.map(|_| Vec::new()).map_err(|e| {
                    let mut m = e.to_string();
                    let mut src = std::error::Error::source(&e);
                    while let Some(c) = src {
                        m.push_str(&format!(": {c}"));
                        src = c.source();
                    }
                    m
                })
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
            match r {
                Ok(names) => disk_below = names,
                Err(e) => {
                    let e = err(
                        ErrorCode::SnapshotDumpFailed,
                        format!("merging the disk layers failed: {e}"),
                    );
                    return abandon(builder, e).await;
                }
            }
            clock.mark("disk-layers");
        }
        let parent = match &plan.delta_over {
            Some(l) => {
                let dest = builder.dest.clone();
                let to = l.dir.clone();
                let rel = tokio::task::spawn_blocking(move || {
                    let base = dest
                        .parent()
                        .and_then(|p| std::fs::canonicalize(p).ok())
                        .zip(dest.file_name())
                        .map(|(p, n)| p.join(n))
                        .unwrap_or(dest);
                    machinen::chain::relative(&base, &to)
                })
                .await
                .unwrap_or_default();
                Some(bundle::ParentLink {
                    path: rel.display().to_string(),
                    manifest_blake3: l.manifest_blake3.clone(),
                    chain_seq: l.chain_seq,
                })
            }
            None => None,
        };
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
            cpu_model: spec
                .cpu_model
                .clone()
                .unwrap_or_else(|| caps.cpu_model.clone()),
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
            net_policy: self.net_policy.clone(),
            net_learned: self.net_learned.clone(),
            egress_secrets: self.spec.egress_secrets.clone(),
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
            parent,
            ram_delta: plan.ram_delta,
            disk_below,
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
        if !req.scratch {
            let d = finished.clone();
            let link = tokio::task::spawn_blocking(move || {
                let dir = std::fs::canonicalize(&d).ok()?;
                let digest = machinen::chain::manifest_digest(&dir).ok()?;
                Some((dir, digest))
            })
            .await
            .ok()
            .flatten();
            chain.link = link.map(|(dir, manifest_blake3)| ChainLink {
                dir,
                manifest_blake3,
                chain_id: chain.id.clone(),
                chain_seq: chain.seq,
            });
            // What the next checkpoint compares the RAM with: the record
            // this one updated, or one made from the bundle's whole RAM.
            let record = match (updated_record, &spec.ram_file) {
                (Some(r), _) => Some(r),
                (None, Some(_)) if req.keep_alive && chain.link.is_some() => {
                    let (ram, bytes) =
                        (finished.join(bundle::RAM), u64::from(spec.memory_mib) << 20);
                    let r = tokio::task::spawn_blocking(move || {
                        crate::dirty::PageHashes::of_file(&ram, bytes)
                    })
                    .await
                    .ok()
                    .and_then(|r| {
                        r.map_err(|e| tracing::warn!("recording the RAM's pages failed: {e}"))
                            .ok()
                    });
                    clock.mark("ram-record");
                    r
                }
                _ => None,
            };
            chain.ram_record = record.filter(|_| req.keep_alive && chain.link.is_some());
        }
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

/// The top disk layer's copy in a bundle whose layers are merged after the
/// guest runs again.
const TOP_PARTIAL: &str = "top.partial";

/// What kind of bundle a snapshot writes.
struct Plan {
    /// The bundle this one is a delta over (still as it was).
    delta_over: Option<ChainLink>,
    /// The RAM, too, holds only the pages written since `delta_over`.
    ram_delta: bool,
    /// A self-contained bundle of a VM with several disk layers.
    flatten_later: bool,
    /// The empty layer a keep-alive checkpoint puts on top of the disk.
    next_layer: Option<PathBuf>,
}

impl Plan {
    async fn make(spec: &VmSpec, chain: &mut Chain, req: &SnapshotRequest) -> Plan {
        let real = !req.scratch;
        let delta_over = match chain.link.clone().filter(|_| real && !req.full) {
            Some(l) => {
                let d = l.dir.clone();
                let found =
                    tokio::task::spawn_blocking(move || machinen::chain::manifest_digest(&d).ok())
                        .await
                        .ok()
                        .flatten();
                if found.as_deref() == Some(l.manifest_blake3.as_str()) {
                    Some(l)
                } else {
                    tracing::info!(
                        "{} is gone or changed: this snapshot is self-contained",
                        l.dir.display()
                    );
                    None
                }
            }
            None => None,
        };
        let ram_delta =
            delta_over.is_some() && chain.ram_record.is_some() && spec.ram_file.is_some();
        let next_layer = if real && req.keep_alive {
            chain.layers_made += 1;
            let file = spec.path_in(&format!("disk-{}.qcow2", chain.layers_made));
            let (top, f) = (chain.top.clone(), file.clone());
            let made = tokio::task::spawn_blocking(move || {
                let size = machinen::qcow2::inspect(&top)
                    .map_err(|e| e.to_string())?
                    .size;
                let _ = std::fs::remove_file(&f);
                machinen::image::empty_layer(&f, size).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
            match made {
                Ok(()) => Some(file),
                Err(e) => {
                    tracing::warn!("creating the next disk layer failed: {e}");
                    None
                }
            }
        } else {
            None
        };
        Plan {
            flatten_later: delta_over.is_none() && !req.scratch && !chain.below.is_empty(),
            delta_over,
            ram_delta,
            next_layer,
        }
    }
}

/// Write the pages of `ram` that changed since `record` to `dst` (at their
/// offsets) and their list to `list`.
fn ram_delta(
    record: &mut crate::dirty::PageHashes,
    ram: &std::path::Path,
    bytes: u64,
    dst: &std::path::Path,
    list: &std::path::Path,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)?;
    out.set_len(bytes)?;
    let ranges = record.changed(ram, &out)?;
    machinen::chain::write_pages(list, &ranges)
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
