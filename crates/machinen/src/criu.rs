//! CRIU inside a VM (`machinen criu TARGET -- ARGS…`): the tree `machinen
//! install --criu` fetched ([`crate::assets::criu`]) is staged once per VM
//! in `/run/machinen-criu` (the guest's tmpfs: nothing lands on its disk),
//! and the agent's CRIU mode (`/proc/1/exe --criu`) loads the kernel
//! modules CRIU probes for and runs it. This is the process-level engine's
//! foundation: a process tree dumped in one VM can be restored in another
//! VM of the same image, whatever its CPU count, memory or accelerator.

use std::path::Path;

use crate::error::{fail, ErrorCode, Result};

mod engine;
pub(crate) use engine::resume_disk;
pub use engine::{
    check_bundle, is_bundle, restore, snapshot, CriuMeta, CriuReport, Resume, SnapshotOptions,
};

/// Where the tree is staged in the guest.
pub const GUEST_DIR: &str = "/run/machinen-criu";

/// The installed CRIU for this host's assets, or `SNAPSHOT_CRIU_UNAVAILABLE`.
pub fn installed(paths: &crate::Paths) -> Result<crate::assets::criu::CriuInstall> {
    let assets = crate::assets::resolve(paths)?;
    crate::assets::criu::installed(&paths.assets, &assets).ok_or_else(|| {
        fail(
            ErrorCode::SnapshotCriuUnavailable,
            format!(
                "CRIU is not installed for kernel {} in {}",
                assets.kernel_version,
                paths.assets.display()
            ),
        )
        .hint("run `machinen install --criu` (fetches Debian's criu package through apt)")
        .into()
    })
}

async fn guest_marker(vm: &crate::vm::Vm) -> Option<Vec<u8>> {
    let out = vm
        .exec(crate::vm::ExecOptions {
            argv: vec![
                "cat".into(),
                format!("{GUEST_DIR}/{}", crate::assets::criu::MARKER),
            ],
            ..Default::default()
        })
        .await
        .ok()?;
    (out.status.code == Some(0)).then_some(out.stdout)
}

/// Stage the CRIU tree in the VM unless the same one is there.
pub async fn stage(vm: &crate::vm::Vm, dir: &Path) -> Result<()> {
    let marker = dir.join(crate::assets::criu::MARKER);
    let want = tokio::fs::read(&marker)
        .await
        .map_err(|e| fail(ErrorCode::Io, format!("cannot read {}", marker.display())).source(e))?;
    if guest_marker(vm).await.as_deref() == Some(want.as_slice()) {
        return Ok(());
    }
    // A name of its own: two stagings at once do not share a scratch tree.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tmp = format!("{GUEST_DIR}.new-{nanos}");
    let sh = |script: String| crate::vm::ExecOptions {
        argv: vec!["sh".into(), "-c".into(), script],
        ..Default::default()
    };
    vm.push_dir(dir, &tmp, crate::dirs::PushDirOptions::default())
        .await?;
    let done = vm
        .exec(sh(format!("rm -rf {GUEST_DIR} && mv {tmp} {GUEST_DIR}")))
        .await?;
    if done.status.code != Some(0) {
        return Err(fail(
            ErrorCode::SnapshotCriuUnavailable,
            format!(
                "could not stage CRIU in the guest: {}",
                String::from_utf8_lossy(&done.stderr).trim()
            ),
        )
        .into());
    }
    Ok(())
}

/// Run `criu ARGS…` in the VM (staging it first); its output streams to
/// `stdout`/`stderr` and its exit status is returned, as for an exec.
pub async fn run<O, E>(
    vm: &crate::vm::Vm,
    paths: &crate::Paths,
    args: &[String],
    stdout: &mut O,
    stderr: &mut E,
) -> Result<machinen_proto::ExitStatus>
where
    O: tokio::io::AsyncWrite + Unpin,
    E: tokio::io::AsyncWrite + Unpin,
{
    let criu = installed(paths)?;
    stage(vm, &criu.dir).await?;
    let mut argv = vec!["/proc/1/exe".to_string(), "--criu".into(), GUEST_DIR.into()];
    argv.extend(args.iter().cloned());
    vm.exec_stream(
        crate::vm::ExecOptions {
            argv,
            ..Default::default()
        },
        tokio::io::empty(),
        stdout,
        stderr,
    )
    .await
}

/// What [`output`] collected: CRIU's exit status (128 + N when killed by
/// signal N) and its output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CriuOutput {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// [`run`], collecting the output (for the bindings).
pub async fn output(
    vm: &crate::vm::Vm,
    paths: &crate::Paths,
    args: &[String],
) -> Result<CriuOutput> {
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let status = run(vm, paths, args, &mut stdout, &mut stderr).await?;
    Ok(CriuOutput {
        exit_code: status.shell_code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}
