//! What every section shares: the configuration, a scratch directory, and
//! helpers to boot, drive and stop VMs.

use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use machinen::progress::ProgressMode;
use machinen::{BootOptions, ExecOptions, Vm};

/// Sizes and repetition counts of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    pub quick: bool,
    /// Repetitions of expensive measurements (boots, snapshots, restores).
    pub runs: usize,
    /// Repetitions of cheap ones (exec and request latency).
    pub reps: usize,
    /// Guest RAM of every VM, MiB (the touched-memory VM gets more if needed).
    pub memory_mib: u32,
    /// How much guest memory the "touched" VMs fill (the snapshot
    /// section's and the memory section's source), MiB.
    pub touched_mib: u32,
    /// Bytes streamed by the throughput measurements, MiB.
    pub stream_mib: u32,
    /// Forks next to the source in the memory section: once as siblings of
    /// one snapshot (`fork_many`), once as separate `fork` calls.
    pub forks: usize,
}

pub struct Ctx {
    pub cfg: Config,
    /// Scratch space for bundles, images, qcow2 files; removed at the end.
    pub work: PathBuf,
    /// A real VM's QEMU command line, captured once for the baselines.
    pub guest: tokio::sync::OnceCell<crate::qemu::Guest>,
}

impl Ctx {
    pub fn boot_options(&self, name: &str) -> BootOptions {
        BootOptions {
            name: Some(name.to_string()),
            memory_mib: Some(self.cfg.memory_mib),
            // Foreground: if the bench dies, the supervisor sees its pipe
            // close and stops the VM.
            detached: false,
            progress: ProgressMode::Quiet,
            boot_timeout: BOOT_TIMEOUT,
            ..Default::default()
        }
    }

    /// Restore `bundle` as `name`, quietly, with the boot timeout of
    /// [`Ctx::boot_options`].
    pub async fn restore(&self, bundle: &std::path::Path, name: &str) -> Result<Vm> {
        let mut opts = machinen::RestoreOptions::new(bundle);
        opts.name = Some(name.to_string());
        opts.progress = ProgressMode::Quiet;
        opts.boot_timeout = self.boot_options(name).boot_timeout;
        machinen::restore(opts)
            .await
            .with_context(|| format!("restoring {}", bundle.display()))
    }

    pub async fn boot(&self, name: &str) -> Result<Vm> {
        machinen::boot(self.boot_options(name))
            .await
            .with_context(|| format!("booting {name}"))
    }

    /// The QEMU command line of a machinen VM with this run's settings.
    pub async fn guest(&self) -> Result<&crate::qemu::Guest> {
        self.guest
            .get_or_try_init(|| crate::qemu::Guest::capture(self))
            .await
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }
}

// The benchmark's own bounds, looser than the product's defaults
// (`machinen_proto::timeouts`): it runs large guests, many at once, under TCG
// on a loaded host, and a slow run is a result, not a failure.

/// Upper bound on one boot or restore (a large guest, a busy host).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// Upper bound on one snapshot, or one QMP `savevm`/`loadvm` (a large, busy
/// guest).
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);

/// Bound on a forced stop.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Pause before a measurement so the host's accounting (PSS, dirty pages)
/// settles after the guest's last command.
pub const SETTLE: Duration = Duration::from_secs(1);

/// Bound on a guest service (perl listeners, a download) starting up under
/// TCG, and the pauses between tries.
pub const SERVICE_START: Duration = Duration::from_secs(60);
/// See [`SERVICE_START`]: the pause between port-forward tries.
pub const SERVICE_POLL: Duration = Duration::from_millis(100);
/// See [`SERVICE_START`]: the pause between download tries.
pub const FETCH_RETRY: Duration = Duration::from_millis(200);

/// Bound on one request through a port forward, and on connecting to a
/// plain QEMU's sockets.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound on one read of a bulk transfer going idle.
pub const TRANSFER_IDLE: Duration = Duration::from_secs(120);

/// Bound on a plain QEMU (no machinen) printing its boot marker, and on it
/// exiting afterwards.
pub const PLAIN_BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// See [`PLAIN_BOOT_TIMEOUT`].
pub const PLAIN_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on QMP `quit` of a plain QEMU.
pub const QUIT_TIMEOUT: Duration = Duration::from_secs(3);

/// Stop at once (no data to keep).
pub async fn stop(vm: Vm) -> Result<()> {
    let name = vm.name().to_string();
    vm.stop(true, STOP_TIMEOUT)
        .await
        .with_context(|| format!("stopping {name}"))?;
    Ok(())
}

/// Run `sh -c script`; fail unless it exits 0. Returns stdout.
pub async fn sh(vm: &Vm, script: &str) -> Result<String> {
    let out = vm
        .exec(ExecOptions {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        })
        .await?;
    if out.status.code != Some(0) {
        bail!(
            "`{script}` in {} failed ({:?}): {}",
            vm.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Write `data` to a guest file (through `cat`, as a user would pipe it).
pub async fn put(vm: &Vm, path: &str, data: &[u8]) -> Result<()> {
    let opts = ExecOptions {
        argv: vec!["sh".into(), "-c".into(), format!("cat > {path}")],
        ..Default::default()
    };
    let (mut o, mut e) = (Vec::new(), Vec::new());
    let st = vm
        .exec_stream(opts, std::io::Cursor::new(data.to_vec()), &mut o, &mut e)
        .await?;
    if st.code != Some(0) {
        bail!(
            "writing {path} in {} failed: {}",
            vm.name(),
            String::from_utf8_lossy(&e)
        );
    }
    Ok(())
}

/// An `AsyncWrite` that only counts.
#[derive(Default)]
pub struct Counter(pub u64);

impl tokio::io::AsyncWrite for Counter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0 += buf.len() as u64;
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Proportional set size of a process, KiB (`Pss:` of `smaps_rollup`).
pub fn pss_kib(pid: u32) -> Result<u64> {
    machinen::stats::rss_pss(pid)
        .1
        .map(|b| b >> 10)
        .with_context(|| format!("no Pss in /proc/{pid}/smaps_rollup"))
}

/// PSS of a VM's supervisor and QEMU, KiB: (supervisor, qemu).
pub fn vm_pss_kib(vm: &Vm) -> Result<(u64, u64)> {
    let qemu = vm.info().qemu_pid.context("the VM has no QEMU pid")?;
    Ok((pss_kib(vm.pid())?, pss_kib(qemu)?))
}

/// A free host port (bound and released).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The QEMU binary the VMs use.
pub fn qemu_binary() -> String {
    std::env::var(machinen_proto::env::QEMU)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("qemu-system-{}", std::env::consts::ARCH))
}

#[cfg(test)]
mod tests {
    use super::*;
    use machinen_proto::timeouts;

    /// The benchmark only ever waits longer than the product would, so a
    /// slow run is measured rather than failed.
    #[test]
    fn bounds_are_at_least_the_products() {
        assert!(BOOT_TIMEOUT >= timeouts::BOOT);
        assert!(SNAPSHOT_TIMEOUT >= timeouts::SNAPSHOT);
        assert!(STOP_TIMEOUT >= timeouts::CLEANUP_STOP);
    }
}
