//! Snapshot, restore and fork.
//!
//! `Vm::snapshot` asks the supervisor to write a bundle (see `bundle.rs` for
//! the format and `machinen-vmm`'s snapshot module for the sequence).
//! [`restore`] verifies a bundle, checks that this host can resume it, and
//! starts a new supervisor that loads the saved state into a fresh QEMU, on
//! a private copy of the bundle's disk layer (the bundle is never written,
//! so one bundle restores any number of times). `Vm::fork` is a keep-alive
//! snapshot plus a restore under a new name; `Vm::fork_many` restores one
//! snapshot several times, so the siblings share its RAM pages.

use machinen_proto::timeouts;
use std::path::{Path, PathBuf};
use std::time::Duration;

use machinen_proto::{self as proto, Frame, Request, Response, SnapshotReport, SnapshotRequest};
use serde::Serialize;

use crate::bundle::{self, BundleMeta};
use crate::error::{fail, ErrorCode, Result};
use crate::paths::Paths;
use crate::progress::ProgressMode;
use crate::registry::{self, PortForward, Registry};
use crate::spec::{files, RestoreSpec, VmSpec};
use crate::vm::{blocking, hold_claim, launch_vm, lock_registry, Launch, Vm};
use crate::{accel, assets, binaries};

/// Options for [`restore`].
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub bundle: PathBuf,
    /// `None`: named `<source>/<pid>`.
    pub name: Option<String>,
    /// The rootfs tarball, when not at the path the bundle recorded; its
    /// sha256 must match.
    pub image: Option<PathBuf>,
    pub ports: Vec<PortForward>,
    pub detached: bool,
    pub boot_timeout: Duration,
    /// Reset TCP connections inherited from the snapshot.
    pub reset_tcp: bool,
    pub progress: ProgressMode,
    /// Shown by `ls` as FORKED-FROM; defaults to the bundle path.
    pub forked_from: Option<String>,
    /// Check every file against the manifest first (always, except for the
    /// bundle a fork has just written itself).
    pub verify: bool,
    /// Give the VM its own copy of the bundle's RAM (a shared file in tmpfs,
    /// like a booted VM's) instead of mapping the bundle's `ram.img`
    /// copy-on-write. The restore then copies the memory the guest used and
    /// shares nothing with other restores of the bundle, but snapshots and
    /// forks *of this VM* are as quick as of a booted one: QEMU cannot
    /// leave a copy-on-write mapping out of its migration stream, and reads
    /// the whole memory ceiling instead. For VMs that will be checkpointed
    /// again. Needs a bundle with `ram.img` (one of a VM whose RAM was a
    /// file of its own: booted, or restored or forked with `own_ram`);
    /// refused for a bundle that carries RAM inside the state.
    pub own_ram: bool,
    /// Serve the bundle's live mounts at these guest paths from other host
    /// directories (and, if given, in another mode); the rest from the
    /// recorded ones. A guest path the bundle has no live mount at is
    /// `BOOT_LIVE_MOUNT_OVERRIDE_UNKNOWN`. A VM with live mounts always
    /// gets RAM of its own (vhost-user needs it shared).
    pub live_mounts: Vec<crate::live_mounts::LiveMountArg>,
    /// Refuse the restore (`FORK_MEMORY_BACKPRESSURE`) when the host would
    /// keep less memory available than this (see [`crate::backpressure`]).
    pub free_memory_threshold: crate::backpressure::Threshold,
    /// Called with each phase of the restore as it ends (bundle check,
    /// image, copies, the supervisor's engine start, state load, bundle
    /// verification, agent, guest repair, …); [`Vm::phases`] has them all.
    pub on_phase: crate::phases::OnPhase,
    /// The bundle stays (the user's): the VM's next checkpoint may be a
    /// delta over it. Off for a fork's scratch bundle.
    pub chain_link: bool,
    /// Replace the bundle's egress policy (`None`: keep it).
    pub net_policy: Option<machinen_proto::netpolicy::NetPolicy>,
    /// Values for the bundle's egress secrets (which a bundle never holds),
    /// and new ones. A secret of the bundle left out keeps its placeholder
    /// in the guest, and requests that need it are refused.
    pub egress_secrets: Vec<crate::network::EgressSecret>,
    /// CRIU bundles only (a whole-VM bundle resumes the machine it holds):
    /// the new VM's memory ceiling, CPU count and CPU model instead of the
    /// source's (memory and CPUs) and the accelerator's own model.
    pub memory_mib: Option<u32>,
    pub cpus: Option<u32>,
    pub cpu_model: Option<String>,
}

impl RestoreOptions {
    pub fn new(bundle: impl Into<PathBuf>) -> RestoreOptions {
        RestoreOptions {
            bundle: bundle.into(),
            name: None,
            image: None,
            ports: Vec::new(),
            detached: false,
            boot_timeout: timeouts::BOOT,
            reset_tcp: false,
            progress: ProgressMode::Auto,
            forked_from: None,
            verify: true,
            own_ram: false,
            live_mounts: Vec::new(),
            free_memory_threshold: Default::default(),
            on_phase: Default::default(),
            chain_link: true,
            net_policy: None,
            egress_secrets: Vec::new(),
            memory_mib: None,
            cpus: None,
            cpu_model: None,
        }
    }
}

/// The CPU model a whole-VM bundle resumes on: the one its VM was booted
/// with (`boot --cpu-model`), which QEMU can show under any accelerator of
/// the same kind; else the accelerator's own, which is all a bundle of a
/// VM that named none can be checked against.
fn cpu_model_for(meta: &bundle::BundleMeta, accel: accel::Accel) -> String {
    let chosen = !["max", "host"].contains(&meta.cpu_model.as_str())
        && accel::check_cpu_model(&meta.cpu_model).is_ok();
    if chosen {
        meta.cpu_model.clone()
    } else {
        accel.cpu_model().to_string()
    }
}

/// Options for `Vm::fork`.
#[derive(Debug, Clone, Default)]
pub struct ForkOptions {
    pub new_name: Option<String>,
    /// Keep the intermediate bundle here (default: a temp dir, removed).
    pub out_dir: Option<PathBuf>,
    /// Keep TCP connections inherited from the source.
    pub tcp_keep: bool,
    pub detached: bool,
    /// Port forwards of the fork (the source's are not inherited).
    pub ports: Vec<PortForward>,
    /// Give each fork its own copy of the RAM (see
    /// [`RestoreOptions::own_ram`]): no sharing, but the fork can be
    /// snapshotted or forked again as quickly as a booted VM.
    pub own_ram: bool,
    /// Serve the fork's live mounts at these guest paths from other host
    /// directories (see [`RestoreOptions::live_mounts`]); by default a fork
    /// shares the source's.
    pub live_mounts: Vec<crate::live_mounts::LiveMountArg>,
    /// Refuse the fork (`FORK_MEMORY_BACKPRESSURE`), before the source is
    /// paused, when the host would keep less memory available than this
    /// (see [`crate::backpressure`]).
    pub free_memory_threshold: crate::backpressure::Threshold,
    /// Called with each phase as it ends: the snapshot's (named
    /// `snapshot-wipe-secrets`, `snapshot-state`, …), then each fork's
    /// restore phases (see [`RestoreOptions::on_phase`]).
    pub on_phase: crate::phases::OnPhase,
    /// The forks' egress policy (`None`: the source's, as it is now).
    pub net_policy: Option<machinen_proto::netpolicy::NetPolicy>,
    /// Values for the source's egress secrets (see
    /// [`RestoreOptions::egress_secrets`]).
    pub egress_secrets: Vec<crate::network::EgressSecret>,
}

/// What `fork` did.
#[derive(Debug, Clone, Serialize)]
pub struct ForkReport {
    pub snapshot: SnapshotReport,
    pub bundle_kept: bool,
}

/// The bound on a snapshot when none is given (a zero timeout).
pub const DEFAULT_SNAPSHOT_TIMEOUT: Duration = machinen_proto::timeouts::SNAPSHOT;

/// How much longer than the snapshot's own bound the client waits for the
/// answer. The supervisor enforces the bound over every phase and never
/// publishes a bundle after it, then resumes the source, removes the temp
/// bundle and answers; the margin covers that, so the client does not give
/// up on a snapshot the supervisor could still complete.
pub const SNAPSHOT_REPLY_MARGIN: Duration = machinen_proto::timeouts::SNAPSHOT_REPLY_SLACK;

impl Vm {
    /// Write a snapshot bundle to `out` (which must not exist). Unless
    /// `keep_alive`, the VM stops once the bundle is complete.
    pub async fn snapshot(
        &self,
        out: &Path,
        keep_alive: bool,
        timeout: Duration,
    ) -> Result<SnapshotReport> {
        self.snapshot_to(out, keep_alive, timeout, false, false, false)
            .await
    }

    /// [`Vm::snapshot`]; with `full`, a self-contained bundle even when
    /// the VM has a checkpoint (or the bundle it was restored from) that
    /// the snapshot would otherwise be a delta over (see [`crate::chain`]).
    pub async fn snapshot_full(
        &self,
        out: &Path,
        keep_alive: bool,
        timeout: Duration,
        full: bool,
    ) -> Result<SnapshotReport> {
        self.snapshot_to(out, keep_alive, timeout, false, full, false)
            .await
    }

    /// [`Vm::snapshot`], or with `scratch` a fork's temporary bundle (see
    /// `SnapshotRequest::scratch`), or with `disk_only` the CRIU engine's
    /// disk and log into the existing directory `out`.
    pub(crate) async fn snapshot_to(
        &self,
        out: &Path,
        keep_alive: bool,
        timeout: Duration,
        scratch: bool,
        full: bool,
        disk_only: bool,
    ) -> Result<SnapshotReport> {
        let out = if out.is_absolute() {
            out.to_path_buf()
        } else {
            std::env::current_dir()?.join(out)
        };
        if out.exists() && !disk_only {
            return Err(bundle::BundleError::Exists { path: out }.into());
        }
        let timeout = if timeout.is_zero() {
            DEFAULT_SNAPSHOT_TIMEOUT
        } else {
            timeout
        };
        let req = SnapshotRequest {
            out: out.display().to_string(),
            keep_alive,
            timeout_ms: timeout.as_millis() as u64,
            scratch,
            full,
            disk_only,
        };
        let mut s = self.connect().await?;
        proto::send(&mut s, &Frame::Request(Request::Snapshot(req)))
            .await
            .map_err(|e| {
                fail(
                    ErrorCode::SnapshotDumpFailed,
                    "asking the supervisor for a snapshot failed",
                )
                .source(e)
            })?;
        let wait = timeout + SNAPSHOT_REPLY_MARGIN;
        let answer = tokio::time::timeout(wait, proto::read_frame(&mut s))
            .await
            .map_err(|_| {
                fail(
                    ErrorCode::SnapshotTimeout,
                    format!("no answer to the snapshot within {} s", wait.as_secs()),
                )
                .hint("past its deadline the supervisor publishes no bundle and resumes the source; `machinen ls` shows it")
            })?
                .map_err(|e| {
                    fail(
                        ErrorCode::SnapshotDumpFailed,
                        "reading the snapshot answer failed",
                    )
                    .source(e)
                })?;
        match answer {
            Some(Frame::Response(Response::Snapshotted(r))) => {
                if !keep_alive {
                    // The bundle holds the VM now and its supervisor is on
                    // its way out: return once it is gone, so its name and
                    // host ports are free for the restore that usually follows.
                    crate::vm::stop_entry(self.info(), true, timeouts::SNAPSHOT_SOURCE_EXIT)
                        .await?;
                }
                Ok(r)
            }
            Some(Frame::Error(e)) => {
                let code = ErrorCode::from_wire(&e.code).unwrap_or(ErrorCode::SnapshotDumpFailed);
                Err(fail(code, e.message)
                    .hint("the source VM keeps running; `machinen ls` shows it")
                    .into())
            }
            Some(other) => Err(fail(
                ErrorCode::ProtocolError,
                format!("unexpected answer {other:?}"),
            )
            .into()),
            None => Err(fail(
                ErrorCode::SnapshotDumpFailed,
                "the supervisor closed the connection during the snapshot",
            )
            .into()),
        }
    }

    /// What one fork of this VM holds from its start (see
    /// [`crate::backpressure`]): with its own RAM, or when this VM's RAM is
    /// not a file (then the snapshot carries it in the machine state), what
    /// this VM's RAM holds now; else only its own processes.
    fn fork_cost(&self, own_ram: bool) -> u64 {
        let held = match crate::ramdir::ram_file_of(&self.info().id) {
            Some(f) if own_ram => crate::backpressure::allocated(&f),
            Some(_) => 0,
            None => self
                .info()
                .qemu_pid
                .and_then(|pid| crate::stats::rss_pss(pid).0)
                .unwrap_or(0),
        };
        crate::backpressure::VM_OVERHEAD + held
    }

    /// Clone this VM: a keep-alive snapshot restored as a new VM that starts
    /// from the same memory and disk. The source keeps running.
    pub async fn fork(&self, opts: ForkOptions) -> Result<(Vm, ForkReport)> {
        let (mut vms, report) = self.fork_many(opts, 1).await?;
        let vm = vms
            .pop()
            .ok_or_else(|| fail(ErrorCode::Io, "the fork produced no VM"))?;
        Ok((vm, report))
    }

    /// Clone this VM `count` times (1..=[`MAX_FORKS`]) from one instant: ONE
    /// keep-alive snapshot, restored `count` times (one after the other).
    ///
    /// The siblings share that one bundle: each fork's QEMU maps the
    /// bundle's RAM file copy-on-write (a private mapping), so the guest
    /// pages none of them has written are the same page-cache pages in all
    /// of them, held once on the host; a page becomes private to a fork only
    /// when that fork writes it. Separate `fork` calls write one bundle each
    /// and share nothing. The temporary bundle (unless `opts.out_dir`) is
    /// removed once every fork has started: the forks keep the RAM file
    /// mapped.
    ///
    /// Names: `opts.new_name` `n` names the forks `n-1` … `n-count`
    /// (exactly `n` when `count` is 1); `None` names them `<source>/<pid>`.
    /// `opts.ports` is refused when `count > 1` (each fork would need host
    /// ports of its own). If one restore fails, the forks already started
    /// are stopped and the error is returned.
    pub async fn fork_many(
        &self,
        opts: ForkOptions,
        count: usize,
    ) -> Result<(Vec<Vm>, ForkReport)> {
        check_fork_many(&opts, count)?;
        let names: Vec<Option<String>> = match &opts.new_name {
            Some(n) if count == 1 => vec![Some(n.clone())],
            Some(n) => (1..=count).map(|i| Some(format!("{n}-{i}"))).collect(),
            None => vec![None; count],
        };
        // Refuse a bad name, or forks the host has no memory for, before
        // pausing the source for a snapshot.
        for n in names.iter().flatten() {
            registry::validate_name(n)?;
        }
        crate::backpressure::check_now(
            "fork",
            count,
            self.fork_cost(opts.own_ram || !self.info().live_mounts.is_empty()),
            opts.free_memory_threshold,
        )?;
        let tmp;
        let (bundle_dir, kept) = match &opts.out_dir {
            Some(d) => (d.clone(), true),
            None => {
                // On disk, not tmpfs: the forks keep the bundle's RAM file
                // mapped after the directory is gone, and page cache of a
                // disk file (what the siblings share) can be reclaimed where
                // tmpfs pages could not.
                tmp = tempfile::Builder::new()
                    .prefix("machinen-fork-")
                    .tempdir()?;
                (tmp.path().join("bundle"), false)
            }
        };
        // A kept bundle (`out_dir`) is a real one; a temporary one is read
        // once, here, and needs no digests or fsync.
        let snap = self
            .snapshot_to(
                &bundle_dir,
                true,
                DEFAULT_SNAPSHOT_TIMEOUT,
                !kept,
                false,
                false,
            )
            .await?;
        for p in &snap.phases {
            opts.on_phase.emit(&crate::phases::Phase {
                name: format!("snapshot-{}", p.name),
                ..p.clone()
            });
        }
        let mut vms: Vec<Vm> = Vec::with_capacity(count);
        for name in names {
            let mut r = RestoreOptions::new(&bundle_dir);
            r.name = name;
            r.ports = opts.ports.clone();
            r.detached = opts.detached;
            r.reset_tcp = !opts.tcp_keep;
            r.progress = ProgressMode::Quiet;
            r.forked_from = Some(self.name().to_string());
            // Written by our own supervisor a moment ago, never left our
            // hands: hashing it again would only add to the fork's latency.
            // Each fork copies the disk layer out of the bundle and has its
            // state loaded before `restore` returns, so a temporary bundle
            // can go once the last one is up.
            r.verify = false;
            r.own_ram = opts.own_ram;
            r.chain_link = kept;
            r.live_mounts = opts.live_mounts.clone();
            r.free_memory_threshold = opts.free_memory_threshold;
            r.on_phase = opts.on_phase.clone();
            r.net_policy = opts.net_policy.clone();
            r.egress_secrets = opts.egress_secrets.clone();
            match restore(r).await {
                Ok(vm) => vms.push(vm),
                Err(e) => {
                    for vm in vms {
                        let _ = vm.stop(true, timeouts::CLEANUP_STOP).await;
                    }
                    return Err(e);
                }
            }
        }
        Ok((
            vms,
            ForkReport {
                snapshot: snap,
                bundle_kept: kept,
            },
        ))
    }
}

/// Bytes (allocated) of a restore's copies from which the registry lock is
/// released while they run (see `vm::hold_claim`).
const HOLD_CLAIM_ABOVE: u64 = 64 << 20;

/// The most forks one `Vm::fork_many` call makes.
pub const MAX_FORKS: usize = 64;

/// What `Vm::fork_many` refuses before touching the source: a count outside
/// 1..=[`MAX_FORKS`], and port forwards for more than one fork.
pub fn check_fork_many(
    opts: &ForkOptions,
    count: usize,
) -> std::result::Result<(), crate::error::Failure> {
    if !(1..=MAX_FORKS).contains(&count) {
        return Err(fail(ErrorCode::BootArgsInvalid, format!("the number of forks must be between 1 and {MAX_FORKS}, got {count}"))
            .hint(format!("pass a count from 1 to {MAX_FORKS}; for more, fork again from the source or from a fork")));
    }
    if count > 1 && !opts.ports.is_empty() {
        return Err(fail(ErrorCode::BootArgsInvalid, format!("port forwards cannot be given to {count} forks at once: each fork would need host ports of its own"))
            .hint("fork one at a time with its own -p, or fork without -p and reach the forks with `machinen exec`"));
    }
    Ok(())
}

/// Verify a bundle and check this host can resume it, without starting
/// anything (`restore --dry-run`).
pub async fn check_bundle(path: &Path) -> Result<BundleMeta> {
    let d = path.to_path_buf();
    let meta = blocking(move || {
        let meta = bundle::verify(&d)?;
        let mounts = meta.mounts.as_ref().map(|_| bundle::MOUNTS_LAYER);
        for layer in std::iter::once(bundle::DISK).chain(mounts) {
            let disk = d.join(layer);
            crate::qcow2::inspect(&disk)
                .map_err(|source| bundle::BundleError::UnsafeDisk { file: disk, source })?;
        }
        Ok(meta)
    })
    .await?;
    let accel = accel::probe(None).map_err(|e| fail(ErrorCode::BootArgsInvalid, e.to_string()))?;
    bundle::check_compatible(
        &meta,
        crate::paths::debian_arch(),
        accel.as_str(),
        &cpu_model_for(&meta, accel),
    )?;
    Ok(meta)
}

/// Resume a VM from a bundle.
pub async fn restore(opts: RestoreOptions) -> Result<Vm> {
    let t0 = std::time::Instant::now();
    let mut timeline = crate::phases::Timeline::new(t0, opts.on_phase.clone());
    let paths = Paths::from_env()?;
    // A registry reference: pulled into the cache first (once per digest).
    let pulled = match opts.bundle.to_str() {
        Some(r) if crate::transport::is_reference(r) => {
            let (paths, r, progress) = (paths.clone(), r.to_string(), opts.progress);
            let dir =
                blocking(move || crate::transport::pull_for_restore(&paths, &r, progress)).await?;
            timeline.mark("pull");
            Some(dir)
        }
        _ => None,
    };
    let bundle_path = pulled.as_ref().unwrap_or(&opts.bundle);
    let bundle_dir = std::fs::canonicalize(bundle_path).map_err(|e| {
        fail(
            ErrorCode::RestoreBundleInvalid,
            format!("cannot open bundle {}", opts.bundle.display()),
        )
        .source(e)
        .hint("pass the directory that `machinen snapshot` wrote")
    })?;
    if crate::criu::is_bundle(&bundle_dir) {
        return crate::criu::restore(opts, bundle_dir).await;
    }
    if opts.memory_mib.is_some() || opts.cpus.is_some() || opts.cpu_model.is_some() {
        return Err(fail(
            ErrorCode::RestoreBundleIncompatible,
            format!(
                "{} is a whole-VM bundle: it resumes with the memory, CPUs and CPU model it was taken with",
                bundle_dir.display()
            ),
        )
        .hint("drop --memory/--cpus/--cpu-model, or snapshot with --engine criu to move the workload into a VM of another shape")
        .into());
    }
    // meta.json is checked now (QEMU is started from it); the large files
    // are checked below while QEMU loads the state, the guest paused.
    let (manifest, meta) = if opts.verify {
        let d = bundle_dir.clone();
        let (m, meta) = blocking(move || Ok(bundle::open_verified_meta(&d)?)).await?;
        (Some(m), meta)
    } else {
        (None, bundle::read_meta(&bundle_dir)?)
    };
    timeline.mark("bundle-meta");
    let net_policy = opts
        .net_policy
        .clone()
        .unwrap_or_else(|| meta.net_policy.clone());
    crate::vm::validate_net_policy(meta.network, &net_policy)?;
    let egress_secrets =
        crate::network::egress_specs(meta.network, &meta.egress_secrets, &opts.egress_secrets)?;
    let accel = accel::probe(None).map_err(|e| fail(ErrorCode::BootArgsInvalid, e.to_string()))?;
    bundle::check_compatible(
        &meta,
        crate::paths::debian_arch(),
        accel.as_str(),
        &cpu_model_for(&meta, accel),
    )?;
    let assets = assets::resolve(&paths)?;
    if assets.kernel_version != meta.kernel.version {
        return Err(bundle::BundleError::Foreign {
            what: "kernel",
            found: meta.kernel.version.clone(),
            here: assets.kernel_version.clone(),
        }
        .into());
    }
    // The container image behind the tarball: given with --image, or the
    // one the bundle recorded, converted (or pulled) again when the
    // recorded tarball is not on this host.
    let image_source = match &opts.image {
        Some(i) => crate::oci::source_of(i)?,
        None => meta.image.source.clone(),
    };
    let from_source = match (&opts.image, &meta.image.source) {
        (Some(i), _) => Some(i.clone()),
        (None, Some(src)) if !meta.image.path.exists() => Some(PathBuf::from(src)),
        _ => None,
    };
    let tarball = match from_source {
        Some(i) => {
            let (paths, progress) = (paths.clone(), opts.progress);
            blocking(move || Ok(crate::oci::resolve(&paths, &i, progress)?)).await?
        }
        None => meta.image.path.clone(),
    };
    if !tarball.exists() {
        return Err(fail(
            ErrorCode::RestoreImageMismatch,
            format!(
                "the bundle's image {} is not on this host",
                tarball.display()
            ),
        )
        .hint("copy the image too and pass it with --image PATH")
        .into());
    }
    let gate = manifest.map(|m| {
        let d = bundle_dir.clone();
        let step = opts.progress.step(format!("verifying {}", d.display()));
        let check =
            tokio::task::spawn_blocking(move || bundle::verify_files(&d, &m, bundle::LARGE_FILES));
        Box::pin(async move {
            let r = check.await.map_err(|e| {
                fail(ErrorCode::Io, "the bundle verification task failed").source(e)
            })?;
            r?;
            step.done("bundle verified");
            Ok(())
        }) as crate::vm::Gate
    });
    // The restored kernel is in the bundle's RAM: no initramfs needed.
    let img = crate::vm::prepare_disk(&paths, &tarball, opts.progress).await?;
    timeline.mark("image");
    if img.sha256 != meta.image.sha256 {
        return Err(fail(
            ErrorCode::RestoreImageMismatch,
            format!(
                "image {} has sha256 {}, the bundle was taken on {}",
                tarball.display(),
                img.sha256,
                meta.image.sha256
            ),
        )
        .hint("pass the exact image the VM was booted from with --image")
        .into());
    }
    if let Some(n) = &opts.name {
        registry::validate_name(n)?;
    }
    let live_mounts =
        crate::live_mounts::for_restore(&meta.live_mounts, &opts.live_mounts, &paths)?;
    // A delta checkpoint: its parents, each checked against the digest its
    // child recorded, and the tip's disk and RAM built once from them (after
    // every parent's files were verified) into the cache.
    let (links, chain_ram, chain_disk) = {
        let (d, verify, paths) = (bundle_dir.clone(), opts.verify, paths.clone());
        blocking(move || {
            if bundle::read_meta(&d)?.parent.is_none() {
                return Ok((Vec::new(), None, None));
            }
            let links = crate::chain::resolve(&d)?;
            if verify && !crate::chain::is_materialized(&paths, &links) {
                crate::chain::verify_links(&links)?;
            }
            let ram = crate::chain::materialize_ram(&paths, &links)?;
            let disk = crate::chain::materialize_disk(&paths, &links)?;
            Ok((links, ram, Some(disk)))
        })
        .await?
    };
    if !links.is_empty() {
        timeline.mark("chain");
    }
    let bundle_ram =
        chain_ram.or_else(|| Some(bundle_dir.join(bundle::RAM)).filter(|p| p.exists()));
    // vhost-user maps the guest's RAM: it must be a shared file, never a
    // private mapping of the bundle's.
    let own_ram_wanted = opts.own_ram || (live_mounts.is_some() && bundle_ram.is_some());
    let held = match &bundle_ram {
        Some(ram) if own_ram_wanted => crate::backpressure::allocated(ram),
        Some(_) => 0,
        None => crate::backpressure::allocated(&bundle_dir.join(bundle::STATE)),
    };
    crate::backpressure::check_now(
        "restore",
        1,
        crate::backpressure::VM_OVERHEAD + held,
        opts.free_memory_threshold,
    )?;
    // The copy-once mounts' lower, from this host's cache or (checked
    // first) from the bundle.
    let mounts_lower = match &meta.mounts {
        None => None,
        Some(bm) => {
            let (paths, d, bm) = (paths.clone(), bundle_dir.clone(), bm.clone());
            let lower = blocking(move || crate::mounts::lower_from_bundle(&paths, &d, &bm)).await?;
            timeline.mark("mounts");
            Some(lower)
        }
    };
    let vmm = binaries::vmm()?;
    let reg = Registry::new(&paths.registry);
    let lock = lock_registry(&reg).await?;
    if bundle_ram.is_none() && opts.own_ram {
        return Err(fail(ErrorCode::BootArgsInvalid, "the snapshot carries the guest's RAM inside the machine state, not as ram.img: --own-ram needs the latter")
            .hint("snapshots of booted VMs, and of VMs restored or forked with --own-ram, have ram.img; go without --own-ram here")
            .into());
    }
    let (claim, own_ram, lock) = {
        let (reg, ports, name) = (reg.clone(), opts.ports.clone(), opts.name.clone());
        let own_ram = own_ram_wanted;
        let memory_mib = meta.memory_mib;
        blocking(move || {
            crate::ports::check(&ports, &reg.live()?)?;
            let claim = match &name {
                Some(n) => reg.claim(&lock, n)?,
                None => reg.claim_anonymous(&lock)?,
            };
            // The VM's own RAM file is admitted and created at full size
            // under the lock, so later admissions count it; the copy below
            // fills it.
            let ram = if own_ram {
                match crate::ramdir::reserve(&claim.id, memory_mib) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        let _ = reg.remove(&claim.id);
                        return Err(e.into());
                    }
                }
            } else {
                None
            };
            Ok((claim, ram, lock))
        })
        .await?
    };
    // A dropped restore (the caller gave up) removes the RAM copy; once the
    // supervisor runs, it owns the file.
    let mut ram_guard = RemoveOnDrop(own_ram.clone());
    let held_name = opts
        .name
        .clone()
        .unwrap_or_else(|| format!("{}/{}", meta.source_name, std::process::id()));
    let disk = claim.dir.join(files::DISK);
    let mounts_layer = claim.dir.join(crate::mounts::LAYER);
    let mut copies = Vec::new();
    let mut disk_below = Vec::new();
    if !opts.chain_link {
        let layer = chain_disk
            .clone()
            .unwrap_or_else(|| bundle_dir.join(bundle::DISK));
        copies.push((layer, disk.clone()));
        // A fork's scratch bundle: the layers under its disk, as they are.
        for (i, name) in meta.disk_below.iter().enumerate() {
            let dst = claim.dir.join(format!("disk-below{i}.qcow2"));
            copies.push((bundle_dir.join(name), dst.clone()));
            disk_below.push(dst);
        }
    }
    if mounts_lower.is_some() {
        copies.push((bundle_dir.join(bundle::MOUNTS_LAYER), mounts_layer.clone()));
    }
    if let (Some(src), Some(dst)) = (&bundle_ram, &own_ram) {
        copies.push((src.clone(), dst.clone()));
    }
    // Large copies run without the registry lock (a placeholder entry
    // holds the claim); small ones (a fork's disk layer, mostly) are
    // quicker than the placeholder's synced write, and keep the lock.
    let flattened = (opts.chain_link && chain_disk.is_none() && !meta.disk_below.is_empty())
        .then(|| bundle_dir.join(bundle::DISK));
    let to_copy: u64 = copies
        .iter()
        .map(|(src, _)| src.clone())
        .chain(flattened)
        .filter_map(|src| std::fs::metadata(src).ok())
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m).saturating_mul(512))
        .sum();
    let mut lock = Some(lock);
    if to_copy >= HOLD_CLAIM_ABOVE {
        if let Some(l) = lock.take() {
            hold_claim(&reg, l, &claim, held_name, opts.ports.clone()).await?;
        }
    }
    timeline.mark("claim");
    for (src, dst) in copies {
        let is_disk = dst == disk || dst == mounts_layer || disk_below.contains(&dst);
        let copied = blocking(move || {
            if !is_disk {
                bundle::sparse_copy_into(&src, &dst)?;
                return Ok(());
            }
            bundle::sparse_copy(&src, &dst)?;
            // The layer comes from the bundle's author: QEMU must not be
            // handed one whose header names host files.
            crate::qcow2::sanitize_copy(&dst).map_err(|source| {
                bundle::BundleError::UnsafeDisk {
                    file: src.clone(),
                    source,
                }
            })?;
            Ok(())
        });
        if let Err(e) = copied.await {
            let _ = reg.remove(&claim.id);
            return Err(e);
        }
    }
    // A kept bundle's disk (the chain's layers, merged) becomes one
    // read-only layer under an empty one the VM writes, so its next
    // checkpoint holds only its own writes.
    if opts.chain_link {
        // A chain's merged layer is used from the cache; a full bundle's
        // layer is linked into the VM's directory (the VM never writes it,
        // and the bundle is never written), or copied across filesystems.
        let (layers, cached) = match &chain_disk {
            Some(d) => (vec![d.clone()], true),
            None => (
                meta.disk_below
                    .iter()
                    .map(|n| bundle_dir.join(n))
                    .chain([bundle_dir.join(bundle::DISK)])
                    .collect::<Vec<_>>(),
                false,
            ),
        };
        let below = match &chain_disk {
            Some(d) => d.clone(),
            None => claim.dir.join("disk-below0.qcow2"),
        };
        let (b, top) = (below.clone(), disk.clone());
        let made = blocking(move || {
            let linked = !cached && layers.len() == 1 && std::fs::hard_link(&layers[0], &b).is_ok();
            if !cached && !linked {
                crate::chain::flatten_disk(&layers, &b)?;
            }
            let size = crate::qcow2::inspect(&b)
                .map_err(|source| bundle::BundleError::UnsafeDisk {
                    file: b.clone(),
                    source,
                })?
                .size;
            crate::image::empty_layer(&top, size)?;
            Ok(())
        })
        .await;
        if let Err(e) = made {
            let _ = reg.remove(&claim.id);
            return Err(e);
        }
        disk_below.push(below);
    }
    timeline.mark("copies");
    let lock = match lock {
        Some(l) => l,
        None => match lock_registry(&reg).await {
            Ok(l) => l,
            Err(e) => {
                let _ = reg.remove(&claim.id);
                return Err(e);
            }
        },
    };
    // The main command's log up to the snapshot (checked against the
    // manifest with meta.json): the restored VM's log continues it.
    {
        let (src, dst) = (
            bundle_dir.join(bundle::MAIN_LOG),
            claim.dir.join(crate::service::MAIN_LOG),
        );
        if let Err(e) = blocking(move || {
            if src.is_file() {
                std::fs::copy(&src, &dst).map_err(|e| {
                    fail(ErrorCode::Io, format!("copying {}", src.display())).source(e)
                })?;
            }
            Ok(())
        })
        .await
        {
            let _ = reg.remove(&claim.id);
            return Err(e);
        }
    }
    let spec = VmSpec {
        id: claim.id.clone(),
        // The guest keeps the hostname it had (its state is restored).
        hostname: None,
        // Anonymous restores are named after the source (plus the pid).
        name: opts
            .name
            .clone()
            .unwrap_or_else(|| meta.source_name.clone()),
        dir: claim.dir.clone(),
        kernel: assets.kernel.clone(),
        initrd: PathBuf::new(),
        disk,
        base_image: img.path.clone(),
        image_sha256: Some(img.sha256.clone()),
        kernel_version: assets.kernel_version.clone(),
        image: Some(tarball.clone()),
        image_source,
        memory_mib: meta.memory_mib,
        cpus: meta.cpus,
        accel: Some(meta.accel.clone()),
        qemu: std::env::var_os(machinen_proto::env::QEMU).map(PathBuf::from),
        boot_timeout_ms: opts.boot_timeout.as_millis() as u64,
        detached: opts.detached,
        debug: false,
        created_at_ms: registry::now_ms(),
        ports: opts.ports.clone(),
        // The restored kernel keeps the command line it booted with.
        zero_freed_memory: false,
        // Restored RAM is a private mapping of the bundle's RAM file, or
        // with `own_ram` the VM's own copy of it.
        restore: Some(RestoreSpec {
            ram: bundle_ram.filter(|_| own_ram.is_none()),
            bundle: bundle_dir.clone(),
            reset_tcp: opts.reset_tcp,
            gate: gate.is_some(),
            disk_below,
            link: link_of(&bundle_dir, &meta, opts.chain_link),
        }),
        ram_file: own_ram,
        // The bundle's migration stream matches its network device's
        // backend (QEMU's user networking has state of its own in it).
        network: meta.network,
        net_policy,
        net_learned: meta.net_learned.clone(),
        egress_secrets,
        main: meta.main.clone(),
        mounts: meta.mounts.as_ref().zip(mounts_lower).map(|(bm, lower)| {
            crate::mounts::MountsDisk {
                mounts: bm.mounts.clone(),
                lower,
                lower_sha256: bm.lower_sha256.clone(),
                layer: mounts_layer.clone(),
            }
        }),
        live_mounts,
        balloon: meta.balloon,
        cpu_model: Some(cpu_model_for(&meta, accel)).filter(|m| m != accel.cpu_model()),
    };
    let launch = Launch {
        name: opts.name.clone(),
        image: Some(tarball),
        forked_from: Some(
            opts.forked_from
                .clone()
                .unwrap_or_else(|| bundle_dir.display().to_string()),
        ),
        ports: opts.ports.clone(),
        timeout: opts.boot_timeout,
        gate,
    };
    ram_guard.0 = None;
    let vm = launch_vm(&reg, lock, &claim.id, &vmm, &spec, launch, timeline).await?;
    // The values, or word that none come (so the proxy refuses at once
    // rather than waiting for them).
    if !spec.egress_secrets.is_empty() {
        if let Err(e) = vm.set_egress_secrets(&opts.egress_secrets).await {
            let _ = vm.stop(true, timeouts::CLEANUP_STOP).await;
            return Err(e);
        }
    }
    Ok(vm)
}

/// The restored bundle as the parent of the VM's next checkpoint.
fn link_of(dir: &Path, meta: &BundleMeta, kept: bool) -> Option<crate::spec::ChainLink> {
    if !kept {
        return None;
    }
    Some(crate::spec::ChainLink {
        dir: dir.to_path_buf(),
        manifest_blake3: crate::chain::manifest_digest(dir).ok()?,
        chain_id: meta.chain_id.clone(),
        chain_seq: meta.chain_seq,
    })
}

/// Removes a file when dropped.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}
