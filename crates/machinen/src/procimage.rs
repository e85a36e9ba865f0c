//! Native process images (the portable engine's format): reading one from
//! a directory and deciding whether this host can restore it. The format,
//! its documents, schemas and refusal vocabulary live in the
//! `machinen-procimage` crate, re-exported here as [`format`].

use std::path::Path;

pub use machinen_procimage as format;
use machinen_procimage::{CheckOptions, Plan};

use crate::error::{fail, ErrorCode, Failure};

/// Read the image in `dir` and check it against `opts`: the plan, whether
/// it is restorable or not (its `refusals` say). An image whose documents
/// are missing, malformed or inconsistent is `PORTABLE_IMAGE_INVALID`,
/// naming every problem.
pub fn check(dir: &Path, opts: CheckOptions) -> Result<Plan, Failure> {
    if !dir.is_dir() {
        return Err(fail(
            ErrorCode::PortableImageInvalid,
            format!("{} is not a directory", dir.display()),
        )
        .hint("give the directory that holds native-process.json and its companions"));
    }
    let image = machinen_procimage::read_dir(dir).map_err(|e| {
        fail(
            ErrorCode::PortableImageInvalid,
            format!(
                "{} is not a valid native process image ({} problems)",
                dir.display(),
                e.errors.len()
            ),
        )
        .hint(e.errors.join("\n"))
    })?;
    Ok(machinen_procimage::check(&image, opts))
}

/// [`check`] for `target_arch` given by name (`arm64`, `amd64`; `None`:
/// this host's), the default wait policies: what the bindings offer. An
/// unknown name is `BOOT_ARGS_INVALID`.
pub fn check_named(dir: &Path, target_arch: Option<&str>) -> Result<Plan, Failure> {
    let target_arch = match target_arch {
        None => None,
        Some(a) => Some(
            a.parse::<format::Arch>()
                .map_err(|e| fail(ErrorCode::BootArgsInvalid, e).hint("arm64 or amd64"))?,
        ),
    };
    check(
        dir,
        CheckOptions {
            target_arch,
            ..Default::default()
        },
    )
}

/// The error for a plan with refusals: `BOOT_PORTABLE_UNSUPPORTED`, its
/// codes in the message, each refusal in the hint.
pub fn unsupported(dir: &Path, plan: &Plan) -> Failure {
    let mut codes: Vec<&str> = plan.refusals.iter().map(|r| r.code.as_str()).collect();
    codes.dedup();
    fail(
        ErrorCode::BootPortableUnsupported,
        format!(
            "{} cannot be restored on {}: {}",
            dir.display(),
            plan.target_arch,
            codes.join(", ")
        ),
    )
    .hint(
        plan.refusals
            .iter()
            .map(|r| format!("{}: {}", r.code, r.message))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// A fresh scratch path in the guest for `what` (`/var/tmp/.machinen-…`):
/// the image is there only while the agent writes or reads it.
fn guest_scratch(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("/var/tmp/.machinen-{what}-{nanos}")
}

/// Remove a scratch path in the guest (best effort: the guest's `/var/tmp`
/// is its own).
async fn remove_in_guest(vm: &crate::vm::Vm, path: &str) {
    let _ = vm
        .exec(crate::vm::ExecOptions {
            argv: vec!["rm".into(), "-rf".into(), path.to_string()],
            ..Default::default()
        })
        .await;
}

/// Options of [`capture`].
#[derive(Debug, Clone, Default)]
pub struct CaptureOptions {
    /// Kill the process once captured (to move it); by default it goes on.
    pub kill: bool,
    /// Bound on the captured memory (default 1 GiB): larger mappings are
    /// recorded as refused (`mapping-unreadable`).
    pub max_bytes: Option<u64>,
}

/// What [`capture`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaptureReport {
    pub dir: std::path::PathBuf,
    pub pid: u32,
    pub threads: u64,
    pub mappings: u64,
    pub memory_bytes: u64,
    pub killed: bool,
    /// The restore plan for this host (its refusals say what stops it).
    pub plan: Plan,
}

/// Capture process `pid` of the VM as a native process image into `out`
/// (a new directory): the guest agent traces it from outside (ptrace,
/// procfs) into a scratch directory of the guest, which is copied out
/// (confined and bounded like `cp`), removed, and validated here — the
/// documents come from the guest and are not trusted.
pub async fn capture(
    vm: &crate::vm::Vm,
    pid: u32,
    out: &Path,
    opts: CaptureOptions,
) -> crate::error::Result<CaptureReport> {
    if pid <= 1 {
        return Err(fail(
            ErrorCode::SnapshotPortableUnsupported,
            format!("process {pid} is the guest's init (the agent); it cannot be captured"),
        )
        .into());
    }
    if std::fs::symlink_metadata(out).is_ok() {
        return Err(fail(
            ErrorCode::FilesExists,
            format!("{} exists; a capture writes a new directory", out.display()),
        )
        .hint("remove it first, or name a new destination")
        .into());
    }
    let scratch = guest_scratch(&format!("capture-{pid}"));
    let mut argv = vec![
        "/proc/1/exe".to_string(),
        "--capture".into(),
        pid.to_string(),
        scratch.clone(),
    ];
    if opts.kill {
        argv.push("--kill".into());
    }
    if let Some(m) = opts.max_bytes {
        argv.extend(["--max-bytes".into(), m.to_string()]);
    }
    let cleanup = || remove_in_guest(vm, &scratch);
    let done = vm
        .exec(crate::vm::ExecOptions {
            argv,
            ..Default::default()
        })
        .await?;
    if done.status.code != Some(0) {
        cleanup().await;
        let why = String::from_utf8_lossy(&done.stderr).trim().to_string();
        return Err(fail(
            ErrorCode::SnapshotPortableUnsupported,
            format!("process {pid} could not be captured: {why}"),
        )
        .hint("`machinen exec VM -- ls /proc` lists the guest's processes")
        .into());
    }
    let summary: serde_json::Value = serde_json::from_slice(&done.stdout).unwrap_or_default();
    let pulled = vm
        .pull_dir(&scratch, out, crate::dirs::PullDirOptions::default())
        .await;
    cleanup().await;
    pulled?;
    let dir = out.to_path_buf();
    let plan = crate::vm::blocking(move || Ok(check(&dir, CheckOptions::default())?)).await;
    let plan = match plan {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_dir_all(out);
            return Err(e);
        }
    };
    let n = |k: &str| summary[k].as_u64().unwrap_or(0);
    Ok(CaptureReport {
        dir: out.to_path_buf(),
        pid,
        threads: n("threads"),
        mappings: n("mappings"),
        memory_bytes: n("memoryBytes"),
        killed: opts.kill,
        plan,
    })
}

/// Bring the native process image in `dir` back as a process of the VM
/// (same instruction set, the plan's subset): the image is checked here,
/// copied into a scratch directory of the guest, where the agent's
/// restorer rebuilds the process under ptrace (its memory, registers, a
/// sleep or poll entered again for the time it asked for) and waits for
/// it; its output streams to `stdout`/`stderr` and its exit status is
/// returned, as for an exec. Refused with `BOOT_PORTABLE_UNSUPPORTED` (each
/// refusal named) before anything is copied when the plan says no.
pub async fn materialize<O, E>(
    vm: &crate::vm::Vm,
    dir: &Path,
    stdout: &mut O,
    stderr: &mut E,
) -> crate::error::Result<machinen_proto::ExitStatus>
where
    O: tokio::io::AsyncWrite + Unpin,
    E: tokio::io::AsyncWrite + Unpin,
{
    let d = dir.to_path_buf();
    let plan = crate::vm::blocking(move || Ok(check(&d, CheckOptions::default())?)).await?;
    if !plan.restorable() {
        return Err(unsupported(dir, &plan).into());
    }
    let scratch = guest_scratch("materialize");
    let cleanup = || remove_in_guest(vm, &scratch);
    if let Err(e) = vm
        .push_dir(dir, &scratch, crate::dirs::PushDirOptions::default())
        .await
    {
        cleanup().await;
        return Err(e);
    }
    let status = vm
        .exec_stream(
            crate::vm::ExecOptions {
                argv: vec![
                    "/proc/1/exe".into(),
                    "--materialize".into(),
                    scratch.clone(),
                ],
                ..Default::default()
            },
            tokio::io::empty(),
            stdout,
            stderr,
        )
        .await;
    cleanup().await;
    status
}
