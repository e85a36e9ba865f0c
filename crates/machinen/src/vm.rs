//! Booting VMs and talking to them: [`boot`], [`attach`], [`Vm`].
//!
//! A VM is a supervisor process (`machinen-vmm`) plus its QEMU child. The
//! library starts the supervisor, waits for its ready line, and afterwards
//! talks to it over the VM's control socket. A foreground VM (not
//! `detached`) lives as long as its [`Vm`] handle: the supervisor watches the
//! pipe the handle holds and stops the VM when it closes, even if this
//! process is killed.

use machinen_proto::timeouts;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use machinen_proto::{self as proto, ExecRequest, ExitStatus, Frame, Request, Response};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::error::{fail, Error, ErrorCode, Failure, Result};
use crate::paths::Paths;
use crate::phases::Timeline;
use crate::progress::ProgressMode;
use crate::registry::{self, Registry, RegistryEntry};
use crate::spec::{files, ReadyLine, VmSpec};
use crate::{assets, binaries, image, initramfs};

/// Smallest and largest accepted guest memory, MiB.
pub const MIN_MEMORY_MIB: u32 = 128;
pub const MAX_MEMORY_MIB: u32 = 1024 * 1024;
/// How long a status request may take (the supervisor answers from memory).
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// The most vCPUs a VM may have.
pub const MAX_CPUS: u32 = 64;

/// Options for [`boot`].
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// Rootfs tarball; `None` boots the installed Debian base.
    pub image: Option<PathBuf>,
    /// Unique among live VMs; generated when `None`.
    pub name: Option<String>,
    /// The guest's hostname (`None`: the name's last segment, made valid);
    /// RFC 1123, at most 64 bytes, else `BOOT_ARGS_INVALID`.
    pub hostname: Option<String>,
    /// Guest RAM ceiling in MiB; `None` = [`default_memory_mib`].
    pub memory_mib: Option<u32>,
    pub cpus: u32,
    /// How the guest reaches the network (see [`NetworkMode`]).
    pub network: crate::spec::NetworkMode,
    /// What the guest may reach (`--network nat` only).
    pub net_policy: machinen_proto::netpolicy::NetPolicy,
    /// Credentials the guest never holds (`--network nat` only; see
    /// [`crate::network::EgressSecret`]).
    pub egress_secrets: Vec<crate::network::EgressSecret>,
    /// Keep running after this process exits.
    pub detached: bool,
    /// Upper bound on boot-to-agent-ready.
    pub boot_timeout: Duration,
    /// `kvm`, `hvf`, `tcg`; `None` = probe (`MACHINEN_ACCEL` also overrides).
    pub accel: Option<String>,
    /// Verbose guest agent logging on the console.
    pub debug: bool,
    pub progress: ProgressMode,
    /// Host port forwards (`-p`).
    pub ports: Vec<registry::PortForward>,
    /// Secrets installed in the guest's tmpfs once it is ready (see
    /// [`crate::secrets`]); never written anywhere on the host or guest disk.
    pub secrets: Vec<crate::secrets::Secret>,
    /// Size of the root disk in bytes (`None`: the image's filesystem
    /// size). Larger than the image: the guest grows its root filesystem to
    /// fill it at boot. Sparse on the host: unused room costs nothing.
    pub disk_size: Option<u64>,
    /// Expose hardware virtualisation to the guest (nested VMs). Needs KVM
    /// with nested support; refused with `BOOT_NESTED_VIRT_UNSUPPORTED`
    /// naming what the host lacks (see [`crate::accel::nested_support`]).
    pub nested: bool,
    /// The VM's main command (service VMs; empty: none). It starts once the
    /// guest is ready, its output goes to the VM's log ([`Vm::follow_logs`],
    /// `machinen logs`), and when it exits the VM stops, its status kept
    /// for [`Vm::wait`], unless `keep_alive_on_exit`.
    pub cmd: Vec<String>,
    /// Environment of the main command (over the agent's defaults).
    pub env: Vec<(String, String)>,
    /// Working directory of the main command (absolute; `/` when `None`).
    pub cwd: Option<String>,
    /// Who the main command runs as (`NAME`, `UID`, `NAME:GROUP`,
    /// `UID:GID`; root when `None`).
    pub user: Option<String>,
    /// Resource limits of the main command (see [`ExecOptions::rlimits`]).
    pub rlimits: Vec<machinen_proto::Rlimit>,
    /// Keep the main command's stdin open for [`Vm::main_stdin`] writers
    /// (else it reads `/dev/null`).
    pub main_stdin: bool,
    /// Keep the VM running after its main command exited.
    pub keep_alive_on_exit: bool,
    /// Called with each phase of the boot as it ends (image, initramfs,
    /// engine start, guest boot, agent ready, …); [`Vm::phases`] has them
    /// all afterwards.
    pub on_phase: crate::phases::OnPhase,
    /// Host directories copied into the VM at boot (see [`crate::mounts`]):
    /// the guest may change its copy; the host never sees those changes.
    pub mounts: Vec<crate::mounts::Mount>,
    /// Room for the guest's writes to its copy-once mounts, all of them
    /// together (`None`: [`crate::mounts::DEFAULT_UPPER_SIZE`]).
    pub mount_upper_size: Option<u64>,
    /// Host directories shared with the VM (see [`crate::live_mounts`]):
    /// host and guest see each other's changes.
    pub live_mounts: Vec<crate::live_mounts::LiveMountArg>,
    /// A balloon with free page reporting (default): memory the guest
    /// frees goes back to the host, and [`Vm::set_balloon`] works. Off, the
    /// guest's touched pages stay the host's until the VM ends (and its
    /// page allocator does no reporting work).
    pub balloon: bool,
    /// The CPU model QEMU shows the guest (`-cpu`, e.g. `Nehalem`,
    /// `qemu64`), instead of the accelerator's own (`max` under TCG,
    /// `host` under KVM/HVF).
    pub cpu_model: Option<String>,
    /// Resume a CRIU bundle's workload (set by [`crate::criu::restore`]).
    pub criu_resume: Option<crate::criu::Resume>,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            image: None,
            name: None,
            hostname: None,
            memory_mib: None,
            cpus: 1,
            network: crate::spec::NetworkMode::default(),
            net_policy: Default::default(),
            egress_secrets: Vec::new(),
            detached: false,
            boot_timeout: timeouts::BOOT,
            accel: None,
            debug: false,
            progress: ProgressMode::Auto,
            ports: Vec::new(),
            secrets: Vec::new(),
            disk_size: None,
            nested: false,
            cmd: Vec::new(),
            env: Vec::new(),
            cwd: None,
            user: None,
            rlimits: Vec::new(),
            main_stdin: false,
            keep_alive_on_exit: false,
            on_phase: Default::default(),
            mounts: Vec::new(),
            mount_upper_size: None,
            live_mounts: Vec::new(),
            balloon: true,
            cpu_model: None,
            criu_resume: None,
        }
    }
}

/// `min(host RAM / 2, 4096)` with a floor of 512, like the original runtime.
/// The ceiling costs little until the guest touches pages.
pub fn default_memory_mib() -> u32 {
    let host_mib = crate::backpressure::HostMemory::read()
        .map(|m| (m.total >> 20) as u32)
        .unwrap_or(1024);
    (host_mib / 2).clamp(512, 4096)
}

/// QEMU 10.0's microvm damages the end of the initramfs when the guest has
/// exactly 2048 MiB (2047 and 2049 boot; QEMU 7.2 was not affected): the
/// guest then gets 2049 MiB. A restore keeps its bundle's size (its RAM
/// comes from the bundle, not from a fresh initramfs).
pub fn bootable_memory_mib(mib: u32) -> u32 {
    if mib == 2048 {
        tracing::info!("booting with 2049 MiB: QEMU damages the initramfs at exactly 2048");
        2049
    } else {
        mib
    }
}

/// Check a memory size.
pub fn validate_memory_mib(mib: u32) -> Result<u32, Failure> {
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
        return Err(fail(
            ErrorCode::BootMemoryInvalid,
            format!("memory must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, got {mib}"),
        )
        .hint("pass --memory as a whole number of MiB, e.g. --memory 1024"));
    }
    Ok(mib)
}

/// What `boot` and `ls` report about a VM.
#[derive(Debug, Clone, Serialize)]
pub struct VmInfo {
    pub name: String,
    pub id: String,
    pub pid: u32,
    pub qemu_pid: Option<u32>,
    pub state: machinen_proto::VmState,
    /// Why the VM is `recovering` or `unhealthy` (see [`RegistryEntry::state`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub image: Option<PathBuf>,
    pub ports: Vec<registry::PortForward>,
    pub forked_from: Option<String>,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: String,
    pub created_at_ms: u64,
    pub uptime_ms: u64,
    pub control_socket: PathBuf,
    pub console_log: Option<PathBuf>,
    /// Why a `crashed` VM ended (QEMU's exit status or signal and its last
    /// words); `None` for a live one.
    pub cause: Option<String>,
    /// The VM's main command and, once it exited, its status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub main: Option<crate::service::MainRecord>,
    /// Its copy-once mounts (`boot --mount`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<crate::mounts::Mount>,
    /// Its live mounts (`boot --mount-live`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub live_mounts: Vec<crate::live_mounts::LiveMount>,
    /// What a live VM costs the host (`list`, `machinen ls --json`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_memory: Option<crate::stats::HostCost>,
    /// How it reaches the network (`nat`, `nat-host`, `none`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::spec::NetworkMode>,
    /// What it may reach (`None`: everything).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net_policy: Option<machinen_proto::netpolicy::NetPolicy>,
    /// Its egress secrets: names, hosts, placeholders (never values).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub egress_secrets: Vec<machinen_proto::egress::EgressSecretSpec>,
}

impl From<&RegistryEntry> for VmInfo {
    fn from(e: &RegistryEntry) -> VmInfo {
        VmInfo {
            name: e.name.clone(),
            id: e.id.clone(),
            pid: e.supervisor_pid,
            qemu_pid: e.qemu_pid,
            state: e.state,
            reason: e.reason.clone(),
            image: e.image.clone(),
            ports: e.ports.clone(),
            forked_from: e.forked_from.clone(),
            memory_mib: e.memory_mib,
            cpus: e.cpus,
            accel: e.accel.clone(),
            created_at_ms: e.created_at_ms,
            uptime_ms: registry::now_ms().saturating_sub(e.created_at_ms),
            control_socket: e.control_socket.clone(),
            console_log: e.console_log.clone(),
            cause: e.cause.clone(),
            main: e.main.clone(),
            mounts: e.mounts.clone(),
            live_mounts: e.live_mounts.clone(),
            host_memory: None,
            network: e.network,
            net_policy: e.net_policy.clone(),
            egress_secrets: e.egress_secrets.clone(),
        }
    }
}

/// A handle to a running VM.
#[derive(Debug)]
pub struct Vm {
    info: VmInfo,
    /// Foreground VMs: the supervisor and the pipe that keeps it alive
    /// (behind a lock so that a shared handle can still detach).
    owned: std::sync::Mutex<Option<tokio::process::Child>>,
    /// Milliseconds from `boot()` entry to agent-ready, when booted here.
    boot_ms: Option<u64>,
    /// Where that time went, when booted or restored here.
    phases: Vec<crate::phases::Phase>,
}

/// Output of [`Vm::exec`].
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Options for one command run in the guest.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// Run as this user instead of root: `NAME`, `UID`, `NAME:GROUP` or
    /// `UID:GID` (names from the guest's `/etc/passwd` and `/etc/group`).
    pub user: Option<String>,
    /// Resource limits set before it starts (names from
    /// [`machinen_proto::RLIMITS`]; an unknown one or a soft limit above
    /// its hard one is `BOOT_ARGS_INVALID`).
    pub rlimits: Vec<machinen_proto::Rlimit>,
}

/// Check a `--user` value: `NAME`, `UID`, `NAME:GROUP` or `UID:GID` (the
/// guest resolves names; this refuses what cannot be one).
pub fn check_user(u: &str) -> Result<(), Failure> {
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.len() <= 64
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-$".contains(&b))
    };
    let valid = match u.split_once(':') {
        Some((a, b)) => ok_part(a) && ok_part(b),
        None => ok_part(u),
    };
    if valid {
        Ok(())
    } else {
        Err(fail(
            ErrorCode::BootArgsInvalid,
            format!("user {u:?} is not NAME, UID, NAME:GROUP or UID:GID"),
        )
        .hint("e.g. --user 1000, --user app, --user app:staff"))
    }
}

/// Check an egress policy. A policy other than the open default needs
/// `--network nat`: the filter sits between QEMU and passt.
pub fn validate_net_policy(
    network: crate::spec::NetworkMode,
    policy: &machinen_proto::netpolicy::NetPolicy,
) -> Result<(), Failure> {
    policy
        .check()
        .map_err(|e| fail(ErrorCode::BootArgsInvalid, e))?;
    if !policy.is_default() && network != crate::spec::NetworkMode::Nat {
        return Err(fail(
            ErrorCode::BootArgsInvalid,
            format!("an egress policy needs --network nat (this VM's network is {network})"),
        )
        .hint(if network == crate::spec::NetworkMode::None {
            "with --network none the guest reaches nothing already; drop the policy"
        } else {
            "boot with --network nat (the default)"
        }));
    }
    Ok(())
}

/// Check `KEY=VALUE` environment pairs and a working directory.
pub fn validate_exec(opts: &ExecOptions) -> Result<(), Failure> {
    if opts.argv.is_empty() {
        return Err(fail(ErrorCode::BootArgsInvalid, "no command given")
            .hint("put the command after `--`, e.g. `-- uname -a`"));
    }
    for (k, _) in &opts.env {
        let ok = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(fail(
                ErrorCode::BootArgsInvalid,
                format!("invalid environment variable name {k:?}"),
            )
            .hint(
                "names are letters, digits and '_', not starting with a digit (--env KEY=VALUE)",
            ));
        }
    }
    if let Some(u) = &opts.user {
        check_user(u)?;
    }
    if let Some(p) = opts.rlimits.iter().find_map(|r| r.problem()) {
        return Err(fail(ErrorCode::BootArgsInvalid, p).hint(format!(
            "resource limits are {}",
            machinen_proto::RLIMITS.join(", ")
        )));
    }
    if let Some(cwd) = &opts.cwd {
        if !cwd.starts_with('/') {
            return Err(fail(
                ErrorCode::BootArgsInvalid,
                format!("working directory {cwd:?} is not absolute"),
            )
            .hint("pass --cwd as an absolute guest path, e.g. --cwd /root"));
        }
    }
    Ok(())
}

/// Parse `KEY=VALUE`.
pub fn parse_env_pair(s: &str) -> Result<(String, String), Failure> {
    match s.split_once('=') {
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None => Err(fail(
            ErrorCode::BootArgsInvalid,
            format!("--env {s:?} is not KEY=VALUE"),
        )),
    }
}

fn generated_name() -> String {
    use rand::Rng;
    let n: u32 = rand::thread_rng().gen();
    format!("vm-{:06x}", n & 0xff_ffff)
}

/// Boot a VM and wait until its guest agent answers.
pub async fn boot(opts: BootOptions) -> Result<Vm> {
    let t0 = std::time::Instant::now();
    let mut timeline = Timeline::new(t0, opts.on_phase.clone());
    let paths = Paths::from_env()?;
    let memory_mib = bootable_memory_mib(validate_memory_mib(
        opts.memory_mib.unwrap_or_else(default_memory_mib),
    )?);
    if let Some(h) = opts.hostname.as_deref() {
        if !machinen_proto::valid_hostname(h) {
            return Err(fail(
                ErrorCode::BootArgsInvalid,
                format!("{h:?} is not a hostname"),
            )
            .hint("letters, digits and '-' in dot-separated labels, at most 64 bytes")
            .into());
        }
    }
    if opts.cpus == 0 || opts.cpus > MAX_CPUS {
        return Err(fail(
            ErrorCode::BootArgsInvalid,
            format!("cpus must be between 1 and {MAX_CPUS}, got {}", opts.cpus),
        )
        .into());
    }
    let name = opts.name.clone().unwrap_or_else(generated_name);
    registry::validate_name(&name)?;
    crate::secrets::validate(&opts.secrets)?;
    validate_net_policy(opts.network, &opts.net_policy)?;
    let egress_secrets = crate::network::egress_specs(opts.network, &[], &opts.egress_secrets)?;
    if opts.nested {
        crate::accel::check_nested(opts.accel.as_deref())?;
    }
    if let Some(size) = opts.disk_size {
        image::check_disk_size(size, None)?;
    }
    if let Some(m) = &opts.cpu_model {
        crate::accel::check_cpu_model(m)?;
    }
    if !opts.cmd.is_empty() {
        validate_exec(&ExecOptions {
            rlimits: opts.rlimits.clone(),
            argv: opts.cmd.clone(),
            env: opts.env.clone(),
            cwd: opts.cwd.clone(),
            user: opts.user.clone(),
        })?;
    }
    let mounts = crate::mounts::check(&opts.mounts)?;
    let upper_size = match opts.mount_upper_size {
        Some(_) if mounts.is_empty() => {
            return Err(fail(
                ErrorCode::BootMountInvalid,
                "a mount upper size without a copy-once mount",
            )
            .hint("add --mount HOST_DIR:GUEST_PATH, or drop --mount-upper-size")
            .into())
        }
        Some(size) => crate::mounts::check_upper_size(size)?,
        None => crate::mounts::DEFAULT_UPPER_SIZE,
    };
    let live_mounts = crate::live_mounts::for_boot(&opts.live_mounts, &mounts, &paths)?;
    let assets = assets::resolve(&paths)?;
    let progress = opts.progress;
    let image_source = match &opts.image {
        Some(i) => crate::oci::source_of(i)?,
        None => None,
    };
    let tarball = match opts.image.clone() {
        // `oci:DIR[:TAG]`, `docker-archive:FILE`: its flattened tarball.
        Some(i) => {
            let paths = paths.clone();
            blocking(move || Ok(crate::oci::resolve(&paths, &i, progress)?)).await?
        }
        None => assets.rootfs.clone(),
    };
    let img = prepare_disk(&paths, &tarball, progress).await?;
    timeline.mark("image");
    let lower = if mounts.is_empty() {
        None
    } else {
        let (paths, mounts) = (paths.clone(), mounts.clone());
        let lower =
            blocking(move || Ok(crate::mounts::ensure_lower(&paths, &mounts, progress)?)).await?;
        timeline.mark("mounts");
        Some(lower)
    };
    if let Some(size) = opts.disk_size {
        image::check_disk_size(size, Some(img.size))?;
    }
    if let Some(r) = opts
        .criu_resume
        .as_ref()
        .filter(|r| r.image_sha256 != img.sha256)
    {
        return Err(fail(
            ErrorCode::RestoreImageMismatch,
            format!(
                "the bundle's disk was made over image {}; {} is {}",
                r.image_sha256,
                tarball.display(),
                img.sha256
            ),
        )
        .hint("pass the image the snapshotted VM booted (--image)")
        .into());
    }
    let initrd = {
        let (paths, assets, agent) = (paths.clone(), assets.clone(), binaries::agent()?);
        tokio::task::spawn_blocking(move || initramfs::ensure_initramfs(&paths, &assets, &agent))
            .await
            .map_err(|e| fail(ErrorCode::Io, "initramfs preparation task failed").source(e))??
    };
    timeline.mark("initramfs");
    let vmm = binaries::vmm()?;
    let reg = Registry::new(&paths.registry);

    let lock = lock_registry(&reg).await?;
    let (claim, ram_file, lock) = {
        let (reg, ports, name) = (reg.clone(), opts.ports.clone(), name.clone());
        blocking(move || {
            crate::ports::check(&ports, &reg.live()?)?;
            let claim = reg.claim(&lock, &name)?;
            // Admitted under the lock, created at full size: later
            // admissions count it.
            let ram = boot_ram_file(&claim.id, memory_mib);
            Ok((claim, ram, lock))
        })
        .await?
    };
    if let Err(e) = hold_claim(&reg, lock, &claim, name.clone(), opts.ports.clone()).await {
        if let Some(r) = &ram_file {
            let _ = std::fs::remove_file(r);
        }
        return Err(e);
    }
    timeline.mark("claim");
    let spec = VmSpec {
        id: claim.id.clone(),
        name: name.clone(),
        hostname: opts.hostname.clone(),
        dir: claim.dir.clone(),
        kernel: assets.kernel.clone(),
        initrd,
        disk: claim.dir.join(files::DISK),
        base_image: img.path.clone(),
        image_sha256: Some(img.sha256.clone()),
        kernel_version: assets.kernel_version.clone(),
        image: Some(tarball.clone()),
        image_source,
        memory_mib,
        cpus: opts.cpus,
        accel: opts.accel.clone(),
        qemu: std::env::var_os(machinen_proto::env::QEMU).map(PathBuf::from),
        boot_timeout_ms: opts.boot_timeout.as_millis() as u64,
        detached: opts.detached,
        debug: opts.debug,
        created_at_ms: registry::now_ms(),
        ports: opts.ports.clone(),
        zero_freed_memory: !opts.secrets.is_empty(),
        ram_file: None,
        restore: None,
        network: opts.network,
        net_policy: opts.net_policy.clone(),
        net_learned: Vec::new(),
        egress_secrets,
        main: (!opts.cmd.is_empty()).then(|| crate::service::MainSpec {
            argv: opts.cmd.clone(),
            env: opts.env.clone(),
            cwd: opts.cwd.clone(),
            user: opts.user.clone(),
            keep_alive_on_exit: opts.keep_alive_on_exit,
            after_secrets: !opts.secrets.is_empty(),
            rlimits: opts.rlimits.clone(),
            stdin: opts.main_stdin,
            adopt: opts.criu_resume.is_some(),
        }),
        mounts: lower.as_ref().map(|l| crate::mounts::MountsDisk {
            mounts: mounts.clone(),
            lower: l.path.clone(),
            lower_sha256: l.sha256.clone(),
            layer: claim.dir.join(crate::mounts::LAYER),
        }),
        live_mounts,
        balloon: opts.balloon,
        cpu_model: opts.cpu_model.clone(),
    };
    // Child processes (qemu-img): on the blocking pool.
    let overlay = {
        let (base, disk, size) = (img.path.clone(), spec.disk.clone(), opts.disk_size);
        let resume = opts.criu_resume.clone();
        let log = spec.path_in(files::MAIN_LOG);
        let layer = spec
            .mounts
            .as_ref()
            .zip(lower.as_ref())
            .map(|(m, l)| (l.path.clone(), m.layer.clone(), l.size + upper_size));
        blocking(move || {
            match &resume {
                Some(r) => crate::criu::resume_disk(r, &disk, &log)?,
                None => image::create_overlay_sized(&base, &disk, size)?,
            }
            if let Some((lower, layer, size)) = layer {
                image::create_overlay_sized(&lower, &layer, Some(size))?;
            }
            Ok(())
        })
        .await
    };
    let spec = VmSpec { ram_file, ..spec };
    let lock = match overlay {
        Ok(()) => lock_registry(&reg).await,
        Err(e) => Err(e),
    };
    let lock = match lock {
        Ok(l) => l,
        Err(e) => {
            if let Some(r) = &spec.ram_file {
                let _ = std::fs::remove_file(r);
            }
            let _ = reg.remove(&claim.id);
            return Err(e);
        }
    };
    timeline.mark("disk");
    let launch = Launch {
        name: Some(name),
        image: Some(tarball),
        forked_from: None,
        ports: opts.ports.clone(),
        timeout: opts.boot_timeout,
        gate: None,
    };
    let vm = launch_vm(&reg, lock, &claim.id, &vmm, &spec, launch, timeline).await?;
    if !opts.secrets.is_empty() {
        if let Err(e) = vm.set_secrets(&opts.secrets).await {
            let _ = vm.stop(true, timeouts::CLEANUP_STOP).await;
            return Err(e);
        }
    }
    if !opts.egress_secrets.is_empty() {
        if let Err(e) = vm.set_egress_secrets(&opts.egress_secrets).await {
            let _ = vm.stop(true, timeouts::CLEANUP_STOP).await;
            return Err(e);
        }
    }
    Ok(vm)
}

/// A booted VM's RAM: a file in the RAM directory when the directory
/// admits it (see [`crate::ramdir`]; under the registry lock), else
/// anonymous memory, which works as well but makes its snapshots carry the
/// RAM in the migration stream (slower). A VM is never given a RAM file the
/// directory cannot hold once every VM there has touched all its memory.
fn boot_ram_file(id: &str, memory_mib: u32) -> Option<PathBuf> {
    match crate::ramdir::reserve(id, memory_mib) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::info!("guest RAM of {id} is anonymous memory: {e}");
            None
        }
    }
}

/// The cached ext4 image of `tarball`, built once and reused (blocking file
/// work, so off the async threads); boot and restore both start from it.
pub(crate) async fn prepare_disk(
    paths: &Paths,
    tarball: &Path,
    progress: ProgressMode,
) -> Result<image::CachedImage> {
    let (paths, tarball) = (paths.clone(), tarball.to_path_buf());
    tokio::task::spawn_blocking(move || image::ensure_rootfs_image(&paths, &tarball, progress))
        .await
        .map_err(|e| fail(ErrorCode::Io, "image preparation task failed").source(e))?
        .map_err(Into::into)
}

/// What the registry entry of a VM being started says beyond its spec.
pub(crate) struct Launch {
    /// `None`: anonymous restore, named `<source>/<pid>` once the pid is known.
    pub name: Option<String>,
    pub image: Option<PathBuf>,
    pub forked_from: Option<String>,
    pub ports: Vec<registry::PortForward>,
    pub timeout: Duration,
    /// Checks that must pass before the guest may run (a restore's bundle
    /// verification); the supervisor holds the guest paused until then.
    pub gate: Option<Gate>,
}

/// Run `f` on the blocking pool: file I/O, child processes and the registry
/// lock (whose holder may be another process copying GiBs) must not hold a
/// runtime thread that also drives sockets and timers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| fail(ErrorCode::Io, "a background task failed").source(e))?
}

/// Take the registry lock without blocking the runtime while another
/// process holds it.
pub(crate) async fn lock_registry(reg: &Registry) -> Result<registry::RegistryLock> {
    let reg = reg.clone();
    blocking(move || Ok(reg.lock()?)).await
}

/// Record `claim` (made under `lock`) as a VM this process is starting,
/// then release the lock: the slow preparation that follows (a `qemu-img`
/// child, multi-GB sparse copies) then holds up no other VM's start, stop
/// or `ls`. While this process lives, the entry (state `starting`, this
/// process as its supervisor) takes `name` and `ports` for `claim` and
/// `live()`; should it die, the entry is dead and `gc` removes the
/// directory. [`launch_vm`] replaces the entry under the lock again.
pub(crate) async fn hold_claim(
    reg: &Registry,
    lock: registry::RegistryLock,
    claim: &registry::Claim,
    name: String,
    ports: Vec<crate::registry::PortForward>,
) -> Result<()> {
    let me = std::process::id();
    let entry = RegistryEntry {
        id: claim.id.clone(),
        name,
        state: machinen_proto::VmState::Starting,
        reason: Some("preparing the VM's disk".into()),
        supervisor_pid: me,
        supervisor_start: registry::process_start_time(me).unwrap_or(0),
        qemu_pid: None,
        qemu_start: None,
        control_socket: claim.dir.join(files::CONTROL),
        console_log: None,
        image: None,
        disk: None,
        ports,
        forked_from: None,
        memory_mib: 0,
        cpus: 0,
        accel: String::new(),
        detached: false,
        created_at_ms: registry::now_ms(),
        cause: None,
        ended_at_ms: None,
        preparing: true,
        main: None,
        mounts: Vec::new(),
        live_mounts: Vec::new(),
        network: None,
        net_policy: None,
        egress_secrets: Vec::new(),
    };
    let reg = reg.clone();
    let id = claim.id.clone();
    blocking(move || {
        let _lock = lock;
        reg.write(&entry).inspect_err(|_| {
            let _ = reg.remove(&id);
        })?;
        Ok(())
    })
    .await
}

/// See [`Launch::gate`].
pub(crate) type Gate = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

/// Start the supervisor for `spec` (its directory claimed under `lock`, its
/// disk in place), register it, release the lock, and wait until it is ready.
/// On any failure the claimed directory is removed.
pub(crate) async fn launch_vm(
    reg: &Registry,
    lock: registry::RegistryLock,
    id: &str,
    vmm: &Path,
    spec: &VmSpec,
    launch: Launch,
    mut timeline: Timeline,
) -> Result<Vm> {
    // On failure: the claimed directory goes, and the RAM file a dead
    // supervisor did not get to remove (the registry entry that would let
    // gc find it goes with the directory).
    let abandon = || {
        if let Some(r) = &spec.ram_file {
            let _ = std::fs::remove_file(r);
        }
        let _ = reg.remove(id);
    };
    let control = spec.path_in(files::CONTROL);
    if control.as_os_str().len() > 107 {
        abandon();
        return Err(fail(
            ErrorCode::RegistryIo,
            format!(
                "socket path {} is longer than unix sockets allow",
                control.display()
            ),
        )
        .hint("use a shorter MACHINEN_REGISTRY_DIR")
        .into());
    }
    // The supervisor's phases are timed from its own start, a little
    // after this (an estimate that never puts them after our later marks).
    let spawned_ms = timeline.elapsed_ms();
    let child = match spawn_supervisor(vmm, spec) {
        Ok(c) => c,
        Err(e) => {
            abandon();
            return Err(e);
        }
    };
    let pid = child.id().unwrap_or(0);
    let name = launch
        .name
        .unwrap_or_else(|| format!("{}/{pid}", spec.name));
    let entry = RegistryEntry {
        id: spec.id.clone(),
        name,
        state: machinen_proto::VmState::Starting,
        reason: None,
        supervisor_pid: pid,
        supervisor_start: registry::process_start_time(pid).unwrap_or(0),
        qemu_pid: None,
        qemu_start: None,
        control_socket: control,
        console_log: Some(spec.path_in(files::CONSOLE)),
        image: launch.image,
        disk: Some(spec.disk.clone()),
        ports: launch.ports,
        forked_from: launch.forked_from,
        memory_mib: spec.memory_mib,
        cpus: spec.cpus,
        accel: String::new(),
        detached: spec.detached,
        created_at_ms: spec.created_at_ms,
        cause: None,
        ended_at_ms: None,
        preparing: false,
        main: spec.main.as_ref().map(|m| crate::service::MainRecord {
            argv: m.argv.clone(),
            keep_alive_on_exit: m.keep_alive_on_exit,
            exit: None,
            exited_at_ms: None,
        }),
        mounts: spec
            .mounts
            .as_ref()
            .map(|m| m.mounts.clone())
            .unwrap_or_default(),
        live_mounts: spec
            .live_mounts
            .as_ref()
            .map(|l| l.mounts.clone())
            .unwrap_or_default(),
        network: Some(spec.network),
        net_policy: (!spec.net_policy.is_default()).then(|| spec.net_policy.clone()),
        egress_secrets: spec.egress_secrets.clone(),
    };
    // An atomic write with fsyncs; the lock goes with it, released once the
    // entry is on disk.
    let written = {
        let (reg, entry) = (reg.clone(), entry.clone());
        blocking(move || {
            let _lock = lock;
            Ok(reg.write(&entry)?)
        })
        .await
    };
    if let Err(e) = written {
        drop(child);
        abandon();
        return Err(e);
    }

    let mut child = child;
    if let Some(gate) = launch.gate {
        if let Err(e) = open_gate(&mut child, gate, spec.detached).await {
            let _ = child.start_kill();
            let _ = child.wait().await;
            abandon();
            return Err(e);
        }
    }
    let ready = wait_ready(
        &mut child,
        spec,
        launch.timeout + timeouts::READY_LINE_SLACK,
    )
    .await;
    match ready {
        Ok(ReadyLine::Ready {
            qemu_pid,
            accel,
            phases,
            ..
        }) => {
            timeline.merge(spawned_ms, &phases);
            timeline.mark("ready");
            let boot_ms = timeline.elapsed_ms();
            let mut info = VmInfo::from(&entry);
            info.qemu_pid = Some(qemu_pid);
            info.accel = accel;
            info.state = machinen_proto::VmState::Running;
            let owned = if spec.detached { None } else { Some(child) };
            Ok(Vm {
                info,
                owned: std::sync::Mutex::new(owned),
                boot_ms: Some(boot_ms),
                phases: timeline.into_phases(),
            })
        }
        Ok(ReadyLine::Failed {
            code,
            message,
            hint,
        }) => {
            let _ = child.wait().await;
            abandon();
            let code = ErrorCode::from_wire(&code).unwrap_or(ErrorCode::BootEngineFailed);
            let mut f = fail(code, message);
            f.hint = hint;
            Err(f.into())
        }
        Err(e) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            abandon();
            Err(e)
        }
    }
}

/// Wait for `gate`, then let the supervisor start the guest: `go` on its
/// stdin. A detached VM's stdin is closed after that (it does not watch it);
/// a foreground VM's stays open, as its lifeline.
async fn open_gate(child: &mut tokio::process::Child, gate: Gate, detached: bool) -> Result<()> {
    gate.await?;
    let stdin = child
        .stdin
        .as_mut()
        .ok_or_else(|| fail(ErrorCode::Io, "supervisor stdin is not a pipe"))?;
    // A supervisor that already failed (its error is on stdout) has closed
    // its end: `wait_ready` reports that error.
    let _ = stdin.write_all(b"go\n").await;
    let _ = stdin.flush().await;
    if detached {
        drop(child.stdin.take());
    }
    Ok(())
}

/// Create (or truncate) a file only its owner can read: logs of a VM may
/// show what ran in it.
pub fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

fn spawn_supervisor(vmm: &Path, spec: &VmSpec) -> Result<tokio::process::Child> {
    let spec_path = spec.path_in(files::SPEC);
    let bytes = serde_json::to_vec_pretty(spec)
        .map_err(|e| fail(ErrorCode::Io, "cannot encode the VM spec").source(e))?;
    registry::write_atomic(&spec_path, &bytes).map_err(|e| {
        fail(
            ErrorCode::RegistryIo,
            format!("cannot write {}", spec_path.display()),
        )
        .source(e)
    })?;
    let log = private_file(&spec.path_in(files::VMM_LOG))
        .map_err(|e| fail(ErrorCode::RegistryIo, "cannot create the supervisor log").source(e))?;
    let mut cmd = std::process::Command::new(vmm);
    cmd.arg("--spec")
        .arg(&spec_path)
        .stdin(
            if spec.detached && !spec.restore.as_ref().is_some_and(|r| r.gate) {
                Stdio::null()
            } else {
                Stdio::piped()
            },
        )
        .stdout(Stdio::piped())
        .stderr(log);
    // SAFETY: setsid() is async-signal-safe; it detaches the supervisor from
    // our terminal so a Ctrl-C aimed at the CLI does not hit it directly (a
    // foreground VM still stops through the stdin pipe).
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    tokio::process::Command::from(cmd)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| {
            fail(
                ErrorCode::BootVmmMissing,
                format!("cannot start {}", vmm.display()),
            )
            .source(e)
            .into()
        })
}

async fn wait_ready(
    child: &mut tokio::process::Child,
    spec: &VmSpec,
    timeout: Duration,
) -> Result<ReadyLine> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| fail(ErrorCode::Io, "supervisor stdout is not a pipe"))?;
    let mut lines = BufReader::new(stdout).lines();
    match tokio::time::timeout(timeout, lines.next_line()).await {
        Ok(Ok(Some(line))) => serde_json::from_str(&line).map_err(|e| {
            fail(
                ErrorCode::BootEngineFailed,
                format!("unreadable ready line from the supervisor: {line:?}"),
            )
            .source(e)
            .into()
        }),
        Ok(_) => {
            let log = std::fs::read_to_string(spec.path_in(files::VMM_LOG)).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(fail(
                ErrorCode::BootEngineFailed,
                format!("the supervisor exited during start-up\n{}", tail.join("\n")),
            )
            .into())
        }
        Err(_) => Err(fail(
            ErrorCode::BootTimeout,
            format!("the VM was not ready within {} s", timeout.as_secs()),
        )
        .hint("a loaded host boots slowly under TCG: raise --boot-timeout")
        .into()),
    }
}

/// Connect to a live VM by name or pid.
pub async fn attach(target: &str) -> Result<Vm> {
    let paths = Paths::from_env()?;
    let entry = Registry::new(&paths.registry).find(target)?;
    Ok(Vm {
        info: VmInfo::from(&entry),
        owned: Default::default(),
        boot_ms: None,
        phases: Vec::new(),
    })
}

/// Map an error frame from the agent or supervisor to a library error.
pub(crate) fn wire_error(e: proto::WireError) -> Error {
    let code = ErrorCode::from_wire(&e.code).unwrap_or(ErrorCode::ExecFailed);
    let hint = match code {
        ErrorCode::ExecCommandNotFound => {
            Some("check the command name, or install it in the image".to_string())
        }
        ErrorCode::ExecVsockUnavailable => Some(
            "the VM may be starting, stopping or re-establishing its agent session; `machinen ls` shows its state and why"
                .into(),
        ),
        ErrorCode::ControlPermissionDenied => Some(
            "only the user who started a VM (or root) may control it; run machinen as that user"
                .into(),
        ),
        _ => None,
    };
    let mut f = fail(code, e.message);
    f.hint = hint;
    f.into()
}

pub(crate) fn protocol_error(
    what: &str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    fail(
        ErrorCode::ProtocolError,
        format!("talking to the VM failed while {what}"),
    )
    .source(e)
    .into()
}

impl Vm {
    pub fn info(&self) -> &VmInfo {
        &self.info
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// Supervisor pid (what `ls` shows as PID).
    pub fn pid(&self) -> u32 {
        self.info.pid
    }

    /// Time from `boot()` entry to agent-ready, when this handle booted the VM.
    pub fn boot_ms(&self) -> Option<u64> {
        self.boot_ms
    }

    /// The phases of this VM's boot or restore (empty for a VM found by
    /// name): image, initramfs, disk, the supervisor's engine start, state
    /// load, guest boot, agent ready, …, each with its duration and end.
    pub fn phases(&self) -> &[crate::phases::Phase] {
        &self.phases
    }

    pub(crate) async fn connect(&self) -> Result<UnixStream> {
        UnixStream::connect(&self.info.control_socket)
            .await
            .map_err(|e| self.unreachable(e).into())
    }

    fn unreachable(&self, e: std::io::Error) -> Failure {
        fail(
            ErrorCode::ExecVsockUnavailable,
            format!("cannot reach the supervisor of VM {:?}", self.info.name),
        )
        .source(e)
        .hint("the VM may have stopped; `machinen ls` lists live VMs")
    }

    /// Supervisor status.
    pub async fn status(&self) -> Result<proto::VmStatus> {
        self.call(
            proto::exchange::GetStatus,
            STATUS_TIMEOUT,
            ErrorCode::ExecVsockUnavailable,
        )
        .await
    }

    /// One typed request on the control socket and its one answer: an
    /// `Error` frame becomes the error it names, another kind of answer a
    /// `PROTOCOL_ERROR`, no answer within `timeout` an error with
    /// `timeout_code`.
    pub(crate) async fn call<E: proto::exchange::Exchange>(
        &self,
        exchange: E,
        timeout: Duration,
        timeout_code: ErrorCode,
    ) -> Result<E::Reply> {
        let what = E::WHAT;
        let call = async {
            let mut conn = self.connect().await?;
            proto::send(&mut conn, &Frame::Request(exchange.request()))
                .await
                .map_err(|e| protocol_error(what, e))?;
            match proto::read_frame(&mut conn)
                .await
                .map_err(|e| protocol_error(what, e))?
            {
                Some(Frame::Response(r)) => E::reply(r).map_err(|other| {
                    fail(
                        ErrorCode::ProtocolError,
                        format!("unexpected answer while {what}: {other:?}"),
                    )
                    .into()
                }),
                Some(Frame::Error(e)) => Err(wire_error(e)),
                Some(other) => Err(fail(
                    ErrorCode::ProtocolError,
                    format!("unexpected answer while {what}: {other:?}"),
                )
                .into()),
                None => Err(fail(
                    ErrorCode::ExecVsockUnavailable,
                    format!("the VM closed the connection while {what}"),
                )
                .into()),
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(fail(
                timeout_code,
                format!("no answer within {} s while {what}", timeout.as_secs()),
            )
            .into()),
        }
    }

    /// Run a command, collecting its output.
    pub async fn exec(&self, opts: ExecOptions) -> Result<ExecOutput> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let status = self
            .exec_stream(opts, tokio::io::empty(), &mut stdout, &mut stderr)
            .await?;
        Ok(ExecOutput {
            status,
            stdout,
            stderr,
        })
    }

    /// Run a command with streaming I/O: `stdin` is forwarded until EOF,
    /// output is written as it arrives (never held whole in memory).
    pub async fn exec_stream<I, O, E>(
        &self,
        opts: ExecOptions,
        stdin: I,
        stdout: &mut O,
        stderr: &mut E,
    ) -> Result<ExitStatus>
    where
        I: AsyncRead + Unpin + Send + 'static,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        self.exec_stream_timeout(opts, None, stdin, stdout, stderr)
            .await
    }

    /// [`Vm::exec`] with a time limit: see [`Vm::exec_stream_timeout`].
    pub async fn exec_timeout(
        &self,
        opts: ExecOptions,
        timeout: Option<Duration>,
    ) -> Result<ExecOutput> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let status = self
            .exec_stream_timeout(opts, timeout, tokio::io::empty(), &mut stdout, &mut stderr)
            .await?;
        Ok(ExecOutput {
            status,
            stdout,
            stderr,
        })
    }

    /// [`Vm::exec_stream`], and when the command runs longer than
    /// `timeout`, its process group in the guest gets `SIGKILL` and the
    /// call fails with `EXEC_TIMEOUT` once the guest confirmed its end (the
    /// output it wrote until then has been passed on).
    pub async fn exec_stream_timeout<I, O, E>(
        &self,
        opts: ExecOptions,
        timeout: Option<Duration>,
        stdin: I,
        stdout: &mut O,
        stderr: &mut E,
    ) -> Result<ExitStatus>
    where
        I: AsyncRead + Unpin + Send + 'static,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        validate_exec(&opts)?;
        let program = opts.argv.first().cloned().unwrap_or_default();
        let conn = self.connect().await?;
        let (mut rd, mut wr) = conn.into_split();
        let req = ExecRequest {
            argv: opts.argv,
            env: opts.env,
            cwd: opts.cwd,
            tty: false,
            winsize: None,
            user: opts.user,
            rlimits: opts.rlimits,
        };
        proto::send(&mut wr, &Frame::Request(Request::Exec(req)))
            .await
            .map_err(|e| protocol_error("starting the command", e))?;
        match proto::read_frame(&mut rd)
            .await
            .map_err(|e| protocol_error("starting the command", e))?
        {
            Some(Frame::Started { .. }) => {}
            Some(Frame::Error(e)) => return Err(wire_error(e)),
            Some(other) => {
                return Err(fail(
                    ErrorCode::ProtocolError,
                    format!("unexpected answer {other:?}"),
                )
                .into())
            }
            None => {
                return Err(fail(
                    ErrorCode::ExecVsockUnavailable,
                    "the VM closed the connection before the command started",
                )
                .into())
            }
        }
        // Aborted when this future ends or is dropped: the task holds the
        // connection's write half, and the supervisor hangs the command up
        // only once the whole connection is closed.
        // The pump owns the write half; a timeout asks it to send the kill.
        let (kill_tx, mut kill_rx) = tokio::sync::oneshot::channel::<()>();
        let pump = AbortOnDrop(tokio::spawn(async move {
            let mut stdin = stdin;
            let mut buf = vec![0u8; proto::MAX_CHUNK];
            let mut stdin_open = true;
            loop {
                tokio::select! {
                    r = stdin.read(&mut buf), if stdin_open => match r {
                        Ok(0) | Err(_) => {
                            stdin_open = false;
                            let _ = proto::send(&mut wr, &Frame::StdinEof).await;
                        }
                        Ok(n) => {
                            if proto::send(&mut wr, &Frame::Stdin(buf[..n].to_vec()))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    },
                    r = &mut kill_rx => {
                        if r.is_ok() {
                            let _ = proto::send(&mut wr, &Frame::Signal(libc::SIGKILL)).await;
                        }
                        break;
                    }
                }
            }
            // Keep the write half open until the exec ends: dropping it would
            // half-close the control connection.
            std::future::pending::<()>().await;
        }));
        let mut kill_tx = Some(kill_tx);
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        // Set once the kill went out: then only the guest's confirmation counts.
        let mut killed_at: Option<tokio::time::Instant> = None;
        let result = loop {
            let wait_until = match (killed_at, deadline) {
                (Some(k), _) => Some(k + timeouts::EXEC_KILL_CONFIRM),
                (None, d) => d,
            };
            let next = async {
                match wait_until {
                    Some(t) => tokio::time::timeout_at(t, proto::read_frame(&mut rd))
                        .await
                        .ok(),
                    None => Some(proto::read_frame(&mut rd).await),
                }
            };
            let Some(frame) = next.await else {
                if killed_at.is_some() {
                    break Err(crate::terminal::exec_timeout_error(
                        &program, timeout, false,
                    ));
                }
                if let Some(k) = kill_tx.take() {
                    let _ = k.send(());
                }
                killed_at = Some(tokio::time::Instant::now());
                continue;
            };
            if killed_at.is_some() {
                match &frame {
                    Ok(Some(Frame::Exit(_))) => {
                        break Err(crate::terminal::exec_timeout_error(&program, timeout, true))
                    }
                    Ok(None) | Err(_) => {
                        break Err(crate::terminal::exec_timeout_error(
                            &program, timeout, false,
                        ))
                    }
                    // Output written before the kill is still passed on.
                    Ok(Some(_)) => {}
                }
            }
            match frame {
                Ok(Some(Frame::Stdout(b))) => {
                    if let Err(e) = stdout.write_all(&b).await {
                        break Err(fail(ErrorCode::Io, "writing the command's stdout failed")
                            .source(e)
                            .into());
                    }
                }
                Ok(Some(Frame::Stderr(b))) => {
                    if let Err(e) = stderr.write_all(&b).await {
                        break Err(fail(ErrorCode::Io, "writing the command's stderr failed")
                            .source(e)
                            .into());
                    }
                }
                Ok(Some(Frame::Exit(st))) => break Ok(st),
                Ok(Some(Frame::Error(e))) => break Err(wire_error(e)),
                Ok(Some(_)) => continue,
                Ok(None) => {
                    let mut message =
                        "the connection to the VM closed before the command finished".to_string();
                    if let Some(cause) = self.crash_cause().await {
                        message.push_str(&format!(": the VM crashed: {cause}"));
                    }
                    break Err(fail(ErrorCode::ExecVsockUnavailable, message)
                        .hint(format!("the VM may have stopped; `machinen ls` lists VMs, `machinen logs {}` shows its console", self.info.name))
                        .into());
                }
                Err(e) => break Err(protocol_error("reading the command's output", e)),
            }
        };
        drop(pump);
        let _ = stdout.flush().await;
        let _ = stderr.flush().await;
        result
    }

    /// Why this VM ended, when it crashed: its supervisor records that right
    /// after QEMU's exit, which a client sees first as a closed connection,
    /// so wait a little for it. `None` if it is running or was stopped.
    async fn crash_cause(&self) -> Option<String> {
        let reg = Registry::new(Paths::from_env().ok()?.registry);
        let deadline = tokio::time::Instant::now() + timeouts::CRASH_CAUSE;
        let read = || {
            let (reg, id) = (reg.clone(), self.info.id.clone());
            async move {
                tokio::task::spawn_blocking(move || {
                    reg.entries().ok()?.into_iter().find(|e| e.id == id)
                })
                .await
                .ok()?
            }
        };
        loop {
            let entry = read().await?;
            if entry.state == machinen_proto::VmState::Crashed {
                return Some(entry.death_cause());
            }
            if !entry.is_live() {
                // It may have recorded its cause and exited between the
                // read and the liveness check: what it wrote before dying
                // is in the entry now.
                let last = read().await.unwrap_or(entry);
                return Some(last.death_cause());
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(timeouts::SLOW_POLL).await;
        }
    }

    /// Stop the VM: graceful (guest powers off) unless `force`, escalating
    /// to killing the supervisor after `timeout`.
    pub async fn stop(self, force: bool, timeout: Duration) -> Result<StopReport> {
        let report = stop_entry(&self.info, force, timeout).await;
        if let Some(mut child) = self.take_owned() {
            let _ = child.wait().await;
        }
        report
    }

    /// [`Vm::stop`] through a shared handle: the handle stays usable for
    /// reading its info (its operations then fail: the VM is gone).
    pub async fn shutdown(&self, force: bool, timeout: Duration) -> Result<StopReport> {
        let report = stop_entry(&self.info, force, timeout).await;
        if let Some(mut child) = self.take_owned() {
            let _ = child.wait().await;
        }
        report
    }

    /// Let a VM started in the foreground outlive this process, as if it
    /// had been booted `detached`: it runs until `machinen stop` (or
    /// [`Vm::stop`] through [`attach`]). Nothing to do for a VM that is
    /// already detached or was attached to.
    pub async fn detach(&self) -> Result<()> {
        let Some(mut child) = self.take_owned() else {
            return Ok(());
        };
        let Some(mut stdin) = child.stdin.take() else {
            return Ok(());
        };
        stdin
            .write_all(proto::DETACH_LINE)
            .await
            .and(stdin.flush().await)
            .map_err(|e| self.unreachable(e))?;
        // The supervisor reads the line before it sees the pipe close.
        drop(stdin);
        Ok(())
    }

    fn take_owned(&self) -> Option<tokio::process::Child> {
        self.owned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Give up ownership: a foreground VM then stops, as when this process
    /// exits (use [`Vm::detach`] to keep it running).
    pub fn into_info(self) -> VmInfo {
        drop(self.take_owned());
        self.info.clone()
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What `stop` did.
#[derive(Debug, Clone, Serialize)]
pub struct StopReport {
    pub name: String,
    pub pid: u32,
    /// True when the supervisor had to be killed.
    pub killed: bool,
    pub elapsed_ms: u64,
}

fn kill_pid(pid: u32, start: Option<u64>, sig: nix::sys::signal::Signal) {
    let alive = match start {
        Some(s) => registry::is_alive(pid, s),
        None => registry::process_start_time(pid).is_some(),
    };
    if alive && pid > 1 {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
}

async fn wait_gone(pid: u32, start: u64, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while registry::is_alive(pid, start) {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(timeouts::EXIT_POLL).await;
    }
    true
}

pub(crate) async fn stop_entry(
    info: &VmInfo,
    force: bool,
    timeout: Duration,
) -> Result<StopReport> {
    let t0 = std::time::Instant::now();
    let paths = Paths::from_env()?;
    let reg = Registry::new(&paths.registry);
    let entry = reg.entries()?.into_iter().find(|e| e.id == info.id);
    let Some(entry) = entry else {
        return Ok(StopReport {
            name: info.name.clone(),
            pid: info.pid,
            killed: false,
            elapsed_ms: 0,
        });
    };
    if entry.preparing && registry::is_alive(entry.supervisor_pid, entry.supervisor_start) {
        // Its "supervisor" is the program starting it (maybe a library
        // user's process): not something to signal.
        return Err(fail(
            ErrorCode::StopFailed,
            format!(
                "VM {:?} is still being prepared by process {}; it has no supervisor to stop yet",
                entry.name, entry.supervisor_pid
            ),
        )
        .hint("stop it once it is running (retry in a moment), or stop the process that starts it")
        .into());
    }
    let asked = async {
        let mut s = UnixStream::connect(&entry.control_socket).await.ok()?;
        proto::send(&mut s, &Frame::Request(Request::Stop { force }))
            .await
            .ok()?;
        proto::read_frame(&mut s).await.ok()?
    };
    let answer = tokio::time::timeout(timeouts::CONTROL_ANSWER, asked).await;
    if let Ok(Some(Frame::Error(e))) = answer {
        // Refused (another user's VM): signals would be refused as well.
        return Err(wire_error(e));
    }
    let acknowledged = matches!(answer, Ok(Some(Frame::Response(Response::Stopping))));
    if !acknowledged {
        kill_pid(
            entry.supervisor_pid,
            Some(entry.supervisor_start),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let mut killed = false;
    if !wait_gone(entry.supervisor_pid, entry.supervisor_start, timeout).await {
        kill_pid(
            entry.supervisor_pid,
            Some(entry.supervisor_start),
            nix::sys::signal::Signal::SIGKILL,
        );
        if let (Some(q), Some(qs)) = (entry.qemu_pid, entry.qemu_start) {
            kill_pid(q, Some(qs), nix::sys::signal::Signal::SIGKILL);
        }
        killed = true;
        if !wait_gone(
            entry.supervisor_pid,
            entry.supervisor_start,
            timeouts::SUPERVISOR_EXIT,
        )
        .await
        {
            return Err(fail(
                ErrorCode::StopTimeout,
                format!(
                    "VM {:?} (pid {}) did not stop",
                    entry.name, entry.supervisor_pid
                ),
            )
            .hint("try `machinen stop --force`, then `machinen gc`")
            .into());
        }
    }
    // The supervisor removes its own directory; after a kill we do. One
    // whose VM crashed keeps it (its logs and cause) for `ls`, `logs`, `gc`.
    let lock = lock_registry(&reg).await?;
    {
        // Removing the directory deletes the VM's disk layer: GiBs, maybe.
        let (reg, id) = (reg.clone(), entry.id.clone());
        blocking(move || {
            let _lock = lock;
            let crashed = reg
                .entries()?
                .iter()
                .any(|e| e.id == id && e.state == machinen_proto::VmState::Crashed);
            if !crashed {
                reg.remove(&id)?;
            }
            Ok(())
        })
        .await?;
    }
    Ok(StopReport {
        name: entry.name,
        pid: entry.supervisor_pid,
        killed,
        elapsed_ms: t0.elapsed().as_millis() as u64,
    })
}

/// Live VMs.
pub fn list() -> Result<Vec<VmInfo>> {
    let paths = Paths::from_env()?;
    Ok(Registry::new(&paths.registry)
        .live()?
        .iter()
        .map(VmInfo::from)
        .collect())
}

/// Live VMs, then the VMs that ended without being stopped (state
/// `crashed`, with their cause) until `gc` removes them (`machinen ls`).
pub fn list_all() -> Result<Vec<VmInfo>> {
    let paths = Paths::from_env()?;
    let (live, dead): (Vec<RegistryEntry>, Vec<RegistryEntry>) = Registry::new(&paths.registry)
        .entries()?
        .into_iter()
        .partition(|e| e.is_live());
    let dead = dead.iter().map(|e| {
        let mut info = VmInfo::from(e);
        if e.state == machinen_proto::VmState::Exited {
            // Its main command ended it: the status is the cause.
            info.cause = e.main.as_ref().and_then(|m| m.status_text());
        } else {
            info.state = machinen_proto::VmState::Crashed;
            info.cause = Some(e.death_cause());
        }
        info.uptime_ms = e
            .ended_at_ms
            .map_or(0, |end| end.saturating_sub(e.created_at_ms));
        info
    });
    let live = live.iter().map(|e| {
        let mut info = VmInfo::from(e);
        info.host_memory = Some(crate::stats::host_cost(&info));
        info
    });
    Ok(live.chain(dead).collect())
}

/// Where a VM's logs are (`machinen logs`).
#[derive(Debug, Clone, Serialize)]
pub struct VmLogs {
    pub name: String,
    pub id: String,
    pub state: machinen_proto::VmState,
    pub cause: Option<String>,
    /// The guest's serial console.
    pub console: PathBuf,
    /// The supervisor's log.
    pub vmm: PathBuf,
    /// QEMU's stderr.
    pub qemu: PathBuf,
    /// The VM's directory (its main command's log is `main.log` there).
    pub dir: PathBuf,
    /// The registry entry, for following the logs of a live VM.
    #[serde(skip)]
    pub entry: Option<RegistryEntry>,
}

/// The logs of a VM, live or crashed, by name, pid or id.
pub fn logs(target: &str) -> Result<VmLogs> {
    let paths = Paths::from_env()?;
    let reg = Registry::new(&paths.registry);
    let e = reg.find_any(target)?;
    let dir = reg.dir(&e.id);
    let (state, cause) = if e.is_live() {
        (e.state, None)
    } else if e.state == machinen_proto::VmState::Exited {
        (e.state, e.main.as_ref().and_then(|m| m.status_text()))
    } else {
        (machinen_proto::VmState::Crashed, Some(e.death_cause()))
    };
    Ok(VmLogs {
        console: e
            .console_log
            .clone()
            .unwrap_or_else(|| dir.join(files::CONSOLE)),
        vmm: dir.join(files::VMM_LOG),
        qemu: dir.join(files::QEMU_LOG),
        dir: dir.clone(),
        entry: Some(e.clone()),
        name: e.name,
        id: e.id,
        state,
        cause,
    })
}

/// What `gc` removed (or would remove).
#[derive(Debug, Clone, Serialize)]
pub struct GcItem {
    pub id: String,
    pub name: Option<String>,
    pub pid: Option<u32>,
    pub reason: String,
    /// Why the VM ended, when there was an entry to say.
    pub cause: Option<String>,
    pub dir: PathBuf,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub removed: Vec<GcItem>,
    pub bytes: u64,
}

/// Remove what dead VMs left behind: registry entries, sockets, logs, disk
/// overlays, and any QEMU still running for them.
pub fn gc(dry_run: bool) -> Result<GcReport> {
    let paths = Paths::from_env()?;
    let reg = Registry::new(&paths.registry);
    let _lock = reg.lock()?;
    let mut removed = Vec::new();
    for s in reg.stale()? {
        let (_, bytes) = crate::bundle::dir_usage(&s.dir);
        // A snapshot the dead VM was writing: its hidden temp bundle.
        let partial = std::fs::read_to_string(s.dir.join("snapshot.partial"))
            .ok()
            .map(|p| PathBuf::from(p.trim()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains(".partial-"))
            });
        // Its RAM file on tmpfs (named in its spec; a restore interrupted
        // while copying its own RAM had not written a spec yet).
        let ram = VmSpec::load(&s.dir.join(files::SPEC))
            .ok()
            .and_then(|sp| sp.ram_file)
            .or_else(|| crate::ramdir::ram_file_of(&s.id));
        if !dry_run {
            if let Some(p) = &partial {
                let _ = std::fs::remove_dir_all(p);
            }
            if let Some(r) = &ram {
                let _ = std::fs::remove_file(r);
            }
            if let Some(e) = &s.entry {
                if let (Some(q), Some(qs)) = (e.qemu_pid, e.qemu_start) {
                    kill_pid(q, Some(qs), nix::sys::signal::Signal::SIGKILL);
                }
            }
            reg.remove(&s.id)?;
        }
        removed.push(GcItem {
            id: s.id.clone(),
            name: s.entry.as_ref().map(|e| e.name.clone()),
            pid: s.entry.as_ref().map(|e| e.supervisor_pid),
            reason: s.reason.to_string(),
            cause: s.entry.as_ref().map(RegistryEntry::death_cause),
            dir: s.dir.clone(),
            bytes,
        });
    }
    // RAM files whose VM and registry entry are both gone (a VM killed with
    // its supervisor, from a registry since removed): no process uses them.
    if let Some(dir) = crate::ramdir::ram_dir() {
        let live: Vec<String> = reg.entries()?.into_iter().map(|e| e.id).collect();
        for o in crate::ramdir::orphans(&dir, &live, crate::ramdir::ORPHAN_GRACE) {
            if !dry_run {
                let _ = std::fs::remove_file(&o.path);
            }
            removed.push(GcItem {
                id: o.id,
                name: None,
                pid: None,
                reason: "orphaned RAM file (no process uses it)".into(),
                cause: None,
                dir: o.path,
                bytes: o.bytes,
            });
        }
    }
    // What restores of checkpoint chains built (RAM, merged disk) that no
    // live VM uses any more (a restore of the same tip builds it again).
    let mapped: Vec<PathBuf> = reg
        .entries()?
        .iter()
        .filter_map(|e| VmSpec::load(&reg.dir(&e.id).join(files::SPEC)).ok())
        .filter_map(|sp| sp.restore)
        .flat_map(|r| r.ram.into_iter().chain(r.disk_below))
        .collect();
    for (path, bytes) in crate::chain::unused(&paths, &mapped, crate::ramdir::ORPHAN_GRACE) {
        if !dry_run {
            let _ = std::fs::remove_file(&path);
        }
        removed.push(GcItem {
            id: String::new(),
            name: None,
            pid: None,
            reason: "checkpoint chain's RAM or disk no running VM uses".into(),
            cause: None,
            dir: path,
            bytes,
        });
    }
    let bytes = removed.iter().map(|i| i.bytes).sum();
    Ok(GcReport {
        dry_run,
        removed,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_two_gib_boots_as_one_mib_more() {
        assert_eq!(bootable_memory_mib(2048), 2049);
        for m in [512, 2047, 2049, 4096] {
            assert_eq!(bootable_memory_mib(m), m);
        }
    }

    #[test]
    fn memory_bounds() {
        assert!(validate_memory_mib(127).is_err());
        assert_eq!(validate_memory_mib(512).expect("ok"), 512);
        let d = default_memory_mib();
        assert!((512..=4096).contains(&d));
    }

    #[test]
    fn env_and_cwd_validation() {
        let ok = ExecOptions {
            rlimits: Vec::new(),
            argv: vec!["true".into()],
            env: vec![("A_1".into(), "x=y".into())],
            cwd: Some("/tmp".into()),
            user: Some("app:staff".into()),
        };
        validate_exec(&ok).expect("valid");
        for u in ["", "a b", ":x", "x:", "a:b:c", "x/y"] {
            let bad = ExecOptions {
                user: Some(u.into()),
                ..ok.clone()
            };
            assert_eq!(
                validate_exec(&bad).expect_err(u).code,
                ErrorCode::BootArgsInvalid,
                "{u:?}"
            );
        }
        let mut bad = ok.clone();
        bad.env = vec![("1A".into(), "x".into())];
        assert_eq!(
            validate_exec(&bad).expect_err("bad env").code,
            ErrorCode::BootArgsInvalid
        );
        let mut bad = ok.clone();
        bad.cwd = Some("tmp".into());
        assert!(validate_exec(&bad).is_err());
        let mut bad = ok;
        bad.argv.clear();
        assert!(validate_exec(&bad).is_err());
        assert_eq!(
            parse_env_pair("A=b=c").expect("pair"),
            ("A".into(), "b=c".into())
        );
        assert!(parse_env_pair("A").is_err());
    }

    /// A claim held while its disk is prepared keeps its name taken
    /// without the registry lock, and is gc's once its holder is gone.
    #[tokio::test]
    async fn a_held_claim_keeps_its_name_without_the_lock() {
        let dir = tempfile::tempdir().expect("tmp");
        let reg = Registry::new(dir.path());
        let lock = lock_registry(&reg).await.expect("lock");
        let claim = reg.claim(&lock, "held").expect("claim");
        hold_claim(&reg, lock, &claim, "held".into(), Vec::new())
            .await
            .expect("hold");
        // The lock is free again; the name is not.
        let lock = reg.lock().expect("the lock is released");
        assert!(matches!(
            reg.claim(&lock, "held"),
            Err(registry::RegistryError::NameInUse { .. })
        ));
        let mut entry = reg
            .entries()
            .expect("entries")
            .into_iter()
            .find(|e| e.id == claim.id)
            .expect("the placeholder");
        assert!(entry.preparing && entry.state == machinen_proto::VmState::Starting);
        assert!(reg.stale().expect("stale").is_empty(), "its holder lives");
        // The holder dies before the supervisor took over.
        entry.supervisor_start = 1;
        reg.write(&entry).expect("write");
        let stale = reg.stale().expect("stale");
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].id, claim.id);
        assert_eq!(stale[0].reason, "its launcher died while preparing it");
        reg.claim(&lock, "held").expect("the name is free again");
    }

    /// A caller that drops a running exec closes its connection, so that
    /// the supervisor sees the hang-up (the stdin task must not keep it).
    #[tokio::test]
    async fn a_dropped_exec_closes_its_connection() {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = dir.path().join("control.sock");
        let listener = tokio::net::UnixListener::bind(&sock).expect("bind");
        let entry = RegistryEntry {
            id: "x".into(),
            name: "x".into(),
            state: machinen_proto::VmState::Running,
            reason: None,
            supervisor_pid: 1,
            supervisor_start: 0,
            qemu_pid: None,
            qemu_start: None,
            control_socket: sock.clone(),
            console_log: None,
            image: None,
            disk: None,
            ports: Vec::new(),
            forked_from: None,
            memory_mib: 0,
            cpus: 1,
            accel: String::new(),
            detached: true,
            created_at_ms: 0,
            cause: None,
            ended_at_ms: None,
            preparing: false,
            main: None,
            mounts: Vec::new(),
            live_mounts: Vec::new(),
            network: None,
            net_policy: None,
            egress_secrets: Vec::new(),
        };
        let vm = Vm {
            info: VmInfo::from(&entry),
            owned: Default::default(),
            boot_ms: None,
            phases: Vec::new(),
        };
        let supervisor = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.expect("accept");
            assert!(matches!(
                proto::read_frame(&mut conn).await,
                Ok(Some(Frame::Request(Request::Exec(_))))
            ));
            proto::send(&mut conn, &Frame::Started { pid: 7 })
                .await
                .expect("started");
            // StdinEof (the stdin below is empty), then nothing until the end.
            let mut frames = Vec::new();
            while let Some(f) = proto::read_frame(&mut conn).await.expect("frame") {
                frames.push(f);
            }
            frames
        });
        let opts = ExecOptions {
            argv: vec!["sleep".into(), "300".into()],
            ..Default::default()
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let exec = vm.exec_stream(opts, tokio::io::empty(), &mut out, &mut err);
        // Started, and the stdin task had its time: then the caller gives up.
        assert!(tokio::time::timeout(Duration::from_millis(500), exec)
            .await
            .is_err());
        let frames = tokio::time::timeout(Duration::from_secs(5), supervisor)
            .await
            .expect("the connection closed")
            .expect("join");
        assert_eq!(frames, vec![Frame::StdinEof]);
    }

    #[test]
    fn generated_names_are_valid() {
        for _ in 0..100 {
            registry::validate_name(&generated_name()).expect("valid");
        }
    }
}
