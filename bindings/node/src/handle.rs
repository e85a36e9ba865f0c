//! `VmHandle`: a VM booted, restored, forked or attached to from JS.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use machinen::{Vm, WriteFileOptions};
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::cancel::cancellable;
use crate::exec::{ExecStream, PtyStream};
use crate::options::{BootOpts, ExecOpts, ForkOpts, RestoreOpts};
use crate::{js_error, to_value};

/// VMs this process started in the foreground, by id, so that a handle
/// the JS garbage collector drops does not stop its VM: they run until
/// `kill()`, `detach()`, or this process's exit (as with the CLI).
fn owned() -> &'static Mutex<HashMap<String, Arc<Vm>>> {
    static OWNED: OnceLock<Mutex<HashMap<String, Arc<Vm>>>> = OnceLock::new();
    OWNED.get_or_init(Default::default)
}

fn owned_lock() -> std::sync::MutexGuard<'static, HashMap<String, Arc<Vm>>> {
    owned()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A VM. Methods are safe to call concurrently (20 `exec`s at once share
/// nothing but the supervisor's socket).
#[napi]
pub struct VmHandle {
    vm: Arc<Vm>,
    fork_report: Option<serde_json::Value>,
}

impl VmHandle {
    fn new(vm: Vm, keep: bool) -> VmHandle {
        let vm = Arc::new(vm);
        if keep {
            owned_lock().insert(vm.info().id.clone(), vm.clone());
        }
        VmHandle {
            vm,
            fork_report: None,
        }
    }

    pub(crate) fn attached(vm: Vm) -> VmHandle {
        VmHandle::new(vm, false)
    }

    fn release(&self) {
        owned_lock().remove(&self.vm.info().id);
    }
}

/// Boot a VM from an image (the installed Debian base by default).
#[napi]
pub async fn boot(opts: BootOpts, cancel: Option<u32>) -> Result<VmHandle> {
    let mut opts = opts.into_lib()?;
    apply_baked(&mut opts).await?;
    let keep = !opts.detached;
    let vm = cancellable(cancel, machinen::boot(opts)).await?;
    Ok(VmHandle::new(vm, keep))
}

/// An image made by `provision()` carries a default command, env and cwd:
/// without a `cmd`, the baked command becomes the VM's main command (as
/// `machinen boot IMAGE` runs it); the baked env and cwd apply under the
/// caller's.
async fn apply_baked(opts: &mut machinen::BootOptions) -> Result<()> {
    let Some(image) = opts.image.clone() else {
        return Ok(());
    };
    let config = crate::blocking(move || {
        machinen::provision::image_config(Some(&image), machinen::progress::ProgressMode::Quiet)
    })
    .await?;
    let Some(config) = config else {
        return Ok(());
    };
    let argv = (!opts.cmd.is_empty()).then(|| opts.cmd.clone());
    if argv.is_none() && config.cmd.as_ref().is_none_or(|c| c.is_empty()) {
        return Ok(());
    }
    let main = config
        .exec_options(argv, &opts.env, opts.cwd.clone())
        .map_err(|f| js_error(f.into()))?;
    opts.cmd = main.argv;
    opts.env = main.env;
    opts.cwd = main.cwd;
    Ok(())
}

/// Restore a snapshot bundle into a new VM.
#[napi]
pub async fn restore(opts: RestoreOpts, cancel: Option<u32>) -> Result<VmHandle> {
    let opts = opts.into_lib()?;
    let keep = !opts.detached;
    let vm = cancellable(cancel, machinen::restore(opts)).await?;
    Ok(VmHandle::new(vm, keep))
}

/// A live VM by name or supervisor pid (started by any process: the CLI,
/// another Node process).
#[napi]
pub async fn attach(target: String) -> Result<VmHandle> {
    let vm = machinen::attach(&target).await.map_err(js_error)?;
    Ok(VmHandle::new(vm, false))
}

/// What a collected `exec` returns.
#[napi(object)]
pub struct ExecOut {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub stdout: Buffer,
    pub stderr: Buffer,
}

#[napi]
impl VmHandle {
    #[napi(getter)]
    pub fn name(&self) -> String {
        self.vm.name().to_owned()
    }

    #[napi(getter)]
    pub fn id(&self) -> String {
        self.vm.info().id.clone()
    }

    /// The supervisor's pid (what `machinen ls` shows).
    #[napi(getter)]
    pub fn pid(&self) -> u32 {
        self.vm.pid()
    }

    /// What `machinen ls --json` shows of this VM, as of the handle's
    /// creation.
    #[napi]
    pub fn info(&self) -> Result<serde_json::Value> {
        to_value(self.vm.info())
    }

    /// Where the boot or restore spent its time (empty when attached).
    #[napi]
    pub fn phases(&self) -> Result<serde_json::Value> {
        to_value(&self.vm.phases())
    }

    /// For a handle `fork()` returned: the snapshot it was made from.
    #[napi]
    pub fn fork_report(&self) -> Option<serde_json::Value> {
        self.fork_report.clone()
    }

    /// The supervisor's view: state, pids, the agent's hello.
    #[napi]
    pub async fn status(&self) -> Result<serde_json::Value> {
        let s = self.vm.status().await.map_err(js_error)?;
        to_value(&s)
    }

    /// Capture process `pid` of the guest as a native process image in
    /// `out` (`machinen capture --json`).
    #[napi]
    pub async fn capture_process(
        &self,
        pid: u32,
        out: String,
        kill: bool,
        max_bytes: Option<i64>,
    ) -> Result<serde_json::Value> {
        let opts = machinen::procimage::CaptureOptions {
            kill,
            max_bytes: max_bytes.map(|b| b.max(0) as u64),
        };
        let r = machinen::procimage::capture(&self.vm, pid, std::path::Path::new(&out), opts)
            .await
            .map_err(js_error)?;
        to_value(&r)
    }

    /// Run CRIU in the guest (`machinen criu`): its exit status and output.
    #[napi]
    pub async fn criu(&self, args: Vec<String>) -> Result<serde_json::Value> {
        let paths = machinen::Paths::from_env().map_err(|e| js_error(e.into()))?;
        let r = machinen::criu::output(&self.vm, &paths, &args)
            .await
            .map_err(js_error)?;
        to_value(&r)
    }

    /// The VM's memory: ceiling, the guest's view, the host's cost.
    #[napi]
    pub async fn memory_stats(&self) -> Result<serde_json::Value> {
        let s = self.vm.memory_stats().await.map_err(js_error)?;
        to_value(&s)
    }

    /// The balloon: ceiling, last target, what the guest has now.
    #[napi]
    pub async fn balloon(&self) -> Result<serde_json::Value> {
        let r = self.vm.balloon().await.map_err(js_error)?;
        to_value(&r)
    }

    /// The egress policy and the traffic so far.
    #[napi]
    pub async fn network(&self) -> Result<serde_json::Value> {
        let r = self.vm.network().await.map_err(js_error)?;
        to_value(&r)
    }

    /// Change the egress policy; resolves to the policy now in force.
    #[napi]
    pub async fn set_network(
        &self,
        change: crate::options::NetChangeOpt,
    ) -> Result<serde_json::Value> {
        let change = change.into_lib()?;
        let r = self.vm.set_network(change).await.map_err(js_error)?;
        to_value(&r)
    }

    /// Let the guest use `target_bytes` of its ceiling; wait up to
    /// `wait_ms` for it to get there (0: do not wait).
    #[napi]
    pub async fn set_balloon(&self, target_bytes: f64, wait_ms: f64) -> Result<serde_json::Value> {
        if !(target_bytes.is_finite() && target_bytes >= 0.0) {
            return Err(js_error(
                machinen::error::fail(
                    machinen::ErrorCode::BalloonTargetInvalid,
                    format!("{target_bytes} is not a byte count"),
                )
                .into(),
            ));
        }
        let wait = (wait_ms > 0.0).then(|| std::time::Duration::from_millis(wait_ms as u64));
        let r = self
            .vm
            .set_balloon(target_bytes as u64, wait)
            .await
            .map_err(js_error)?;
        to_value(&r)
    }

    /// Run a command to its end, collecting its output.
    #[napi]
    pub async fn exec(&self, opts: ExecOpts, cancel: Option<u32>) -> Result<ExecOut> {
        let (opts, timeout) = opts.into_lib();
        let out = cancellable(cancel, self.vm.exec_timeout(opts, timeout)).await?;
        Ok(ExecOut {
            exit_code: out.status.shell_code(),
            signal: out.status.signal,
            stdout: out.stdout.into(),
            stderr: out.stderr.into(),
        })
    }

    /// Start a command whose output JS reads as it comes (`next()`) and
    /// whose stdin JS writes.
    #[napi]
    pub async fn exec_start(&self, opts: ExecOpts) -> Result<ExecStream> {
        let (opts, timeout) = opts.into_lib();
        Ok(ExecStream::start(self.vm.clone(), opts, timeout))
    }

    /// Start a command on a terminal of `rows` × `cols`.
    #[napi]
    pub async fn exec_pty(&self, opts: ExecOpts, rows: u32, cols: u32) -> Result<PtyStream> {
        let (opts, _) = opts.into_lib();
        let size = machinen_proto::WinSize {
            rows: rows.clamp(1, u16::MAX.into()) as u16,
            cols: cols.clamp(1, u16::MAX.into()) as u16,
        };
        let pty = self.vm.exec_pty(opts, size).await.map_err(js_error)?;
        Ok(PtyStream::new(pty))
    }

    /// Write a guest file (atomically, unless appending).
    #[napi]
    pub async fn write_file(
        &self,
        path: String,
        data: Buffer,
        mode: Option<u32>,
        append: Option<bool>,
    ) -> Result<()> {
        let opts = WriteFileOptions {
            mode,
            append: append.unwrap_or(false),
        };
        self.vm
            .write_file(&path, &data[..], opts)
            .await
            .map(|_| ())
            .map_err(js_error)
    }

    /// Read a guest file (up to 1 GiB).
    #[napi]
    pub async fn read_file(&self, path: String) -> Result<Buffer> {
        let (_, bytes) = self.vm.read_file(&path).await.map_err(js_error)?;
        Ok(bytes.into())
    }

    /// Write a snapshot bundle to `out`; the VM stops afterwards unless
    /// `keep_alive`. `full`: self-contained even when it could be a delta
    /// over the VM's last checkpoint.
    #[napi]
    pub async fn snapshot(
        &self,
        out: String,
        keep_alive: bool,
        timeout_ms: Option<u32>,
        cancel: Option<u32>,
        full: Option<bool>,
    ) -> Result<serde_json::Value> {
        let timeout = timeout_ms
            .map(|t| Duration::from_millis(t.into()))
            .unwrap_or(machinen::restore::DEFAULT_SNAPSHOT_TIMEOUT);
        let report = cancellable(
            cancel,
            self.vm.snapshot_full(
                std::path::Path::new(&out),
                keep_alive,
                timeout,
                full.unwrap_or(false),
            ),
        )
        .await?;
        if !keep_alive {
            self.release();
        }
        to_value(&report)
    }

    /// Write a CRIU bundle of the VM's process tree (the main command, or
    /// `pid`'s) and disk to `out`; the VM stops afterwards unless
    /// `keep_alive` (the tree is then restored in place).
    #[napi]
    pub async fn snapshot_criu(
        &self,
        out: String,
        keep_alive: bool,
        pid: Option<u32>,
        timeout_ms: Option<u32>,
        cancel: Option<u32>,
    ) -> Result<serde_json::Value> {
        let paths = machinen::Paths::from_env().map_err(|e| js_error(e.into()))?;
        let opts = machinen::criu::SnapshotOptions {
            out: out.into(),
            keep_alive,
            pid,
            timeout: timeout_ms
                .map(|t| Duration::from_millis(t.into()))
                .unwrap_or_default(),
        };
        let report = cancellable(cancel, machinen::criu::snapshot(&self.vm, &paths, &opts)).await?;
        if !keep_alive {
            self.release();
        }
        to_value(&report)
    }

    /// A sibling VM that shares this one's past (the source keeps running).
    #[napi]
    pub async fn fork(&self, opts: ForkOpts, cancel: Option<u32>) -> Result<VmHandle> {
        let opts = opts.into_lib()?;
        let keep = !opts.detached;
        let (vm, report) = cancellable(cancel, self.vm.fork(opts)).await?;
        let mut h = VmHandle::new(vm, keep);
        h.fork_report = Some(to_value(&report)?);
        Ok(h)
    }

    /// Stop the VM: the guest powers off, or is killed after `timeout_ms`
    /// (at once with `force`).
    #[napi]
    pub async fn kill(&self, force: bool, timeout_ms: Option<u32>) -> Result<serde_json::Value> {
        let timeout = timeout_ms
            .map(|t| Duration::from_millis(t.into()))
            .unwrap_or(machinen_proto::timeouts::STOP);
        let report = self.vm.shutdown(force, timeout).await.map_err(js_error);
        self.release();
        to_value(&report?)
    }

    /// Let the VM outlive this process (stop it later with `machinen stop`
    /// or `attach(...).kill()`).
    #[napi]
    pub async fn detach(&self) -> Result<()> {
        self.vm.detach().await.map_err(js_error)?;
        self.release();
        Ok(())
    }

    /// Wait for the VM's main command to end (service VMs), or the VM to.
    #[napi]
    pub async fn wait(
        &self,
        timeout_ms: Option<u32>,
        cancel: Option<u32>,
    ) -> Result<serde_json::Value> {
        let timeout = timeout_ms.map(|t| Duration::from_millis(t.into()));
        let outcome = cancellable(cancel, self.vm.wait(timeout)).await?;
        let mut v = to_value(&outcome)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("exit_code".into(), outcome.exit_code().into());
        }
        Ok(v)
    }
}
