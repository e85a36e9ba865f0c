//! Baking rootfs images from code: [`provision`] boots a base, runs an
//! install hook against the live [`Vm`] (commands, file copies), bakes a
//! default command, environment and working directory
//! ([`ImageConfig`], stored as `/etc/machinen/image.json`) and writes the
//! VM's root disk as a `.tar.gz` that `boot` (on any host) runs.
//!
//! ```no_run
//! # async fn f() -> machinen::Result<()> {
//! use machinen::provision::{provision, run_step, ProvisionOptions, Step, CopySpec};
//! let result = provision(ProvisionOptions {
//!     out: "app.tar.gz".into(),
//!     cmd: Some(vec!["/app/hello".into()]),
//!     env: vec![("MODE".into(), "prod".into())],
//!     cwd: Some("/app".into()),
//!     install: Some(Box::new(|vm, config| Box::pin(async move {
//!         let (mut out, mut err) = (tokio::io::stderr(), tokio::io::stderr());
//!         run_step(vm, config, &Step::Copy(CopySpec::new("./hello", "/app/hello")?), &mut out, &mut err).await?;
//!         run_step(vm, config, &Step::Run("chmod +x /app/hello".into()), &mut out, &mut err).await
//!     }))),
//!     ..Default::default()
//! }).await?;
//! println!("{} {} bytes sha256 {}", result.path.display(), result.size, result.sha256);
//! # Ok(()) }
//! ```

mod config;
pub(crate) mod copy;
mod export;

use machinen_proto::timeouts;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use machinen_proto::ExitStatus;
use serde::Serialize;
use tokio::io::AsyncWrite;

pub(crate) use config::tar_member as config_tar_member;
pub use config::{
    image_config, normalize_port, read_from_tarball, ImageConfig, IMAGE_CONFIG_PATH,
    IMAGE_CONFIG_VERSION,
};
pub use copy::{copy_into, CopySpec};
pub use export::EXCLUDES;

use crate::error::{Coded, ErrorCode, Failure, Result};
use crate::paths::Paths;
use crate::progress::ProgressMode;
use crate::vm::{boot, validate_exec, BootOptions, ExecOptions, Vm};

/// The install hook: gets the live VM and the config being baked (so that
/// commands can run with its env and cwd).
pub type InstallHook =
    Box<dyn for<'a> FnOnce(&'a Vm, &'a ImageConfig) -> BoxFuture<'a, Result<()>> + Send>;

/// Options for [`provision`].
pub struct ProvisionOptions {
    /// Rootfs tarball to start from; `None`: the installed Debian base.
    /// A provisioned image works too (layering): its baked config is
    /// inherited and the options below override it.
    pub base: Option<PathBuf>,
    /// Where to write the image (`.tar.gz`); replaced atomically.
    pub out: PathBuf,
    /// Runs against the live VM after the base booted.
    pub install: Option<InstallHook>,
    /// Default command (argv); `None` keeps the base's.
    pub cmd: Option<Vec<String>>,
    /// Environment to bake; overrides the base's keys one by one.
    pub env: Vec<(String, String)>,
    /// Working directory to bake (created in the image); `None` keeps the base's.
    pub cwd: Option<String>,
    /// The whole config to bake, in place of the base's merged with
    /// `cmd`/`env`/`cwd` (which are then ignored): how `build` bakes what a
    /// Dockerfile computed.
    pub config: Option<ImageConfig>,
    /// Guest RAM for the install VM; `None` = the boot default.
    pub memory_mib: Option<u32>,
    pub cpus: u32,
    /// The install VM's network (its steps reach the outside either way;
    /// `NatHost` also lets them reach services on the host's loopback,
    /// e.g. a package proxy there).
    pub network: crate::spec::NetworkMode,
    pub boot_timeout: Duration,
    pub progress: ProgressMode,
    /// Called with each phase as it ends: the install VM's boot phases,
    /// then `install` and `export`.
    pub on_phase: crate::phases::OnPhase,
}

impl Default for ProvisionOptions {
    fn default() -> Self {
        ProvisionOptions {
            base: None,
            out: PathBuf::new(),
            install: None,
            cmd: None,
            env: Vec::new(),
            cwd: None,
            config: None,
            memory_mib: None,
            cpus: 1,
            network: crate::spec::NetworkMode::default(),
            boot_timeout: timeouts::BOOT,
            progress: ProgressMode::Auto,
            on_phase: Default::default(),
        }
    }
}

impl fmt::Debug for ProvisionOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProvisionOptions")
            .field("base", &self.base)
            .field("out", &self.out)
            .field("install", &self.install.as_ref().map(|_| "<hook>"))
            .field("cmd", &self.cmd)
            .field("env", &self.env)
            .field("cwd", &self.cwd)
            .finish_non_exhaustive()
    }
}

/// What [`provision`] made.
#[derive(Debug, Clone, Serialize)]
pub struct ProvisionResult {
    /// The image written (`out`).
    pub path: PathBuf,
    /// sha256 of the file's bytes.
    pub sha256: String,
    /// Bytes of the file.
    pub size: u64,
    /// Bytes of the uncompressed tar.
    pub uncompressed_size: u64,
    /// The config baked into it.
    pub config: ImageConfig,
    /// The base it was made from.
    pub base: PathBuf,
    /// Whole bake, boot included.
    pub elapsed_ms: u64,
    pub boot_ms: u64,
    pub install_ms: u64,
    pub export_ms: u64,
    /// Where the time went: the install VM's boot phases, `install`,
    /// `export`.
    pub phases: Vec<crate::phases::Phase>,
}

/// An install step, as the CLI's `--run` and `--copy` express them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    /// A shell command (`sh -c`), run with the baked env and cwd.
    Run(String),
    /// A host file or directory copied in.
    Copy(CopySpec),
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Run(c) => write!(f, "run: {c}"),
            Step::Copy(c) => write!(f, "copy: {} -> {}", c.host.display(), c.guest),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("{message}")]
    InvalidArgs { message: String, hint: String },
    #[error("base image {path} not found")]
    BaseNotFound { path: PathBuf },
    #[error("install step failed with {} ({step})", describe_status(.status))]
    StepFailed { step: String, status: ExitStatus },
    #[error("cannot copy {path} into the guest")]
    CopySource {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("copying {host} to {guest} failed in the guest with {}: {stderr}", describe_status(.status))]
    CopyFailed {
        host: PathBuf,
        guest: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("preparing the guest for the install failed with {}: {stderr}", describe_status(.status))]
    Prepare { status: ExitStatus, stderr: String },
    #[error("reading the root filesystem out of the guest failed with {}: {stderr}", describe_status(.status))]
    ExportFailed { status: ExitStatus, stderr: String },
    #[error("could not {action} {path}")]
    Output {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn describe_status(s: &ExitStatus) -> String {
    match (s.code, s.signal) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("signal {sig} (exit code {})", 128 + sig),
        _ => "an unknown status".into(),
    }
}

impl ProvisionError {
    /// The exit status of the failed install step, when that is what failed.
    pub fn step_status(&self) -> Option<ExitStatus> {
        match self {
            ProvisionError::StepFailed { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl Coded for ProvisionError {
    fn code(&self) -> ErrorCode {
        use ProvisionError::*;
        match self {
            InvalidArgs { .. } => ErrorCode::ProvisionArgsInvalid,
            BaseNotFound { .. } => ErrorCode::ProvisionBaseNotFound,
            StepFailed { .. } => ErrorCode::ProvisionStepFailed,
            CopySource { .. } | CopyFailed { .. } => ErrorCode::ProvisionCopyFailed,
            Prepare { .. } | ExportFailed { .. } => ErrorCode::ProvisionExportFailed,
            Output { .. } => ErrorCode::ProvisionOutputFailed,
        }
    }

    fn hint(&self) -> Option<String> {
        use ProvisionError::*;
        Some(match self {
            InvalidArgs { hint, .. } => hint.clone(),
            BaseNotFound { .. } => "pass an existing rootfs tarball as --base, or leave it out to start from the installed Debian base".into(),
            StepFailed { .. } => "the step's output is above; fix the step and bake again (no image was written)".into(),
            CopySource { .. } => "check that the host path exists and is a readable file or directory".into(),
            CopyFailed { .. } => "check the guest destination (an existing non-directory in the way, or a full disk)".into(),
            Prepare { .. } | ExportFailed { .. } => "the guest may be out of disk space or memory; its console log is in the VM's registry directory".into(),
            Output { .. } => "check free space and permissions where the image is written".into(),
        })
    }
}

fn invalid(f: Failure) -> crate::Error {
    ProvisionError::InvalidArgs {
        message: f.message,
        hint: f.hint.unwrap_or_default(),
    }
    .into()
}

/// Run one install step in `vm` with the baked env and cwd of `config`,
/// streaming its output. A command that fails is a
/// [`ProvisionError::StepFailed`] carrying its exit status.
pub async fn run_step<O, E>(
    vm: &Vm,
    config: &ImageConfig,
    step: &Step,
    stdout: &mut O,
    stderr: &mut E,
) -> Result<()>
where
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    match step {
        Step::Copy(spec) => copy_into(vm, spec).await,
        Step::Run(cmd) => {
            let mut env: Vec<(String, String)> = config
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            // Package installs must not wait for answers nobody can give.
            if !config.env.contains_key("DEBIAN_FRONTEND") {
                env.push(("DEBIAN_FRONTEND".into(), "noninteractive".into()));
            }
            let opts = ExecOptions {
                rlimits: Vec::new(),
                argv: vec!["sh".into(), "-c".into(), cmd.clone()],
                env,
                cwd: config.cwd.clone(),
                // Install steps run as the image's user, as Docker's RUN does.
                user: config.user.clone(),
            };
            let status = vm
                .exec_stream(opts, tokio::io::empty(), stdout, stderr)
                .await?;
            if status.code == Some(0) {
                Ok(())
            } else {
                Err(ProvisionError::StepFailed {
                    step: step.to_string(),
                    status,
                }
                .into())
            }
        }
    }
}

/// Bake an image: boot `base`, run the install hook, write `out`.
pub async fn provision(opts: ProvisionOptions) -> Result<ProvisionResult> {
    let t0 = Instant::now();
    let paths = Paths::from_env()?;
    check_out(&opts.out)?;
    if matches!(&opts.cmd, Some(c) if c.is_empty()) {
        return Err(ProvisionError::InvalidArgs {
            message: "the command to bake is empty".into(),
            hint: "pass --cmd CMD, or leave it out".into(),
        }
        .into());
    }
    validate_exec(&ExecOptions {
        rlimits: Vec::new(),
        argv: vec!["true".into()],
        env: opts.env.clone(),
        cwd: opts.cwd.clone(),
        user: None,
    })
    .map_err(invalid)?;

    let base = match &opts.base {
        Some(b) if crate::oci::Source::parse(b).is_some() => {
            let (paths, b, progress) = (paths.clone(), b.clone(), opts.progress);
            crate::vm::blocking(move || Ok(crate::oci::resolve(&paths, &b, progress)?)).await?
        }
        Some(b) => {
            if !b.exists() {
                return Err(ProvisionError::BaseNotFound { path: b.clone() }.into());
            }
            b.clone()
        }
        None => crate::assets::resolve(&paths)?.rootfs,
    };
    let base_config = config::image_config_in(&paths, &base, opts.progress)?.unwrap_or_default();
    let baked = match opts.config.clone() {
        Some(c) => c,
        None => base_config.merged(opts.cmd.clone(), &opts.env, opts.cwd.clone()),
    };
    baked.validate().map_err(invalid)?;

    let name = format!("provision-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let vm = boot(BootOptions {
        image: Some(base.clone()),
        name: Some(name),
        memory_mib: opts.memory_mib,
        cpus: opts.cpus,
        network: opts.network,
        detached: false,
        boot_timeout: opts.boot_timeout,
        progress: opts.progress,
        on_phase: opts.on_phase.clone(),
        ..Default::default()
    })
    .await?;
    let boot_ms = vm.boot_ms().unwrap_or(0);
    let mut phases = vm.phases().to_vec();
    let mut timings = (0u64, 0u64);
    let baked_result = bake(
        &vm,
        &baked,
        opts.install,
        &opts.out,
        opts.progress,
        &mut timings,
    )
    .await;
    // The VM is disposable: its disk is in the image now (or the bake failed).
    if let Err(e) = vm.stop(true, timeouts::CLEANUP_STOP).await {
        tracing::warn!("stopping the install VM: {e}");
    }
    let written = baked_result?;
    let booted_at = (t0.elapsed().as_millis() as u64).saturating_sub(timings.0 + timings.1);
    for (name, at_ms, ms) in [
        ("install", booted_at + timings.0, timings.0),
        ("export", booted_at + timings.0 + timings.1, timings.1),
    ] {
        let p = crate::phases::Phase {
            name: name.into(),
            at_ms,
            ms,
        };
        opts.on_phase.emit(&p);
        phases.push(p);
    }
    config::remember(&paths, &written.sha256, &baked);
    Ok(ProvisionResult {
        path: opts.out,
        sha256: written.sha256,
        size: written.size,
        uncompressed_size: written.raw,
        config: baked,
        base,
        elapsed_ms: t0.elapsed().as_millis() as u64,
        boot_ms,
        install_ms: timings.0,
        export_ms: timings.1,
        phases,
    })
}

/// The baked config of the rootfs tarball `tarball` (cached by content).
pub(crate) fn config_of(
    paths: &Paths,
    tarball: &Path,
    progress: ProgressMode,
) -> Result<Option<ImageConfig>> {
    config::image_config_in(paths, tarball, progress)
}

/// OUT must name a file in an existing directory.
fn check_out(out: &Path) -> Result<()> {
    let bad = |m: String| -> crate::Error {
        ProvisionError::InvalidArgs {
            message: m,
            hint: "pass the image to write with -o, e.g. -o app.tar.gz".into(),
        }
        .into()
    };
    if out.as_os_str().is_empty() {
        return Err(bad("no output path given".into()));
    }
    if out.is_dir() {
        return Err(bad(format!("output {} is a directory", out.display())));
    }
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(bad(format!(
            "the directory of {} does not exist",
            out.display()
        )));
    }
    Ok(())
}

/// Guest preparation: the working directory exists, and services that
/// package installs would start stay stopped (`policy-rc.d`, as in Debian's
/// container images), only for the duration of the install.
const PREPARE: &str = r#"set -e
if [ -n "$1" ]; then mkdir -p -- "$1"; fi
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\n# machinen provision: no services start during the install\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod 0755 /usr/sbin/policy-rc.d
  echo machinen-created-policy-rc.d
fi"#;

async fn guest_sh(vm: &Vm, script: &str, args: &[&str]) -> Result<String> {
    let mut argv = vec!["sh".to_string(), "-c".into(), script.into(), "sh".into()];
    argv.extend(args.iter().map(|s| s.to_string()));
    let out = vm
        .exec(ExecOptions {
            argv,
            ..Default::default()
        })
        .await?;
    if out.status.code != Some(0) {
        return Err(ProvisionError::Prepare {
            status: out.status,
            stderr: crate::assets::tool::stderr_tail(&out.stderr),
        }
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn bake(
    vm: &Vm,
    baked: &ImageConfig,
    install: Option<InstallHook>,
    out: &Path,
    progress: ProgressMode,
    timings: &mut (u64, u64),
) -> Result<export::Written> {
    let t = Instant::now();
    let prepared = guest_sh(vm, PREPARE, &[baked.cwd.as_deref().unwrap_or("")]).await?;
    if let Some(hook) = install {
        hook(vm, baked).await?;
    }
    if prepared.contains("machinen-created-policy-rc.d") {
        guest_sh(vm, "rm -f /usr/sbin/policy-rc.d", &[]).await?;
    }
    timings.0 = t.elapsed().as_millis() as u64;
    let t = Instant::now();
    let written = export::export(vm, baked, out, progress).await?;
    timings.1 = t.elapsed().as_millis() as u64;
    Ok(written)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fuzz_tests;
