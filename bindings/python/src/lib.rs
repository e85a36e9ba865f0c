//! The native half of the `machinen` Python package (`machinen._native`).
//!
//! Thin by design, like the Node binding: options arrive as JSON (the
//! Python layer builds them from keyword arguments), each operation runs on
//! one tokio runtime with the GIL released, and a library error becomes
//! `NativeError(json)`, which `machinen/errors.py` turns into a
//! `MachinenError` with its code, hint, retryability and causes.
//!
//! Waits wake every [`SIGNAL_POLL`] to let Python see a signal: Ctrl-C
//! (`KeyboardInterrupt`) drops the operation's future, which cancels it
//! (an exec's stream closes, and the guest agent ends the command's
//! process group).

mod options;

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use machinen::exec_events::{ExecEvent, ExecEvents};
use machinen::{Vm, WriteFileOptions};
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

pyo3::create_exception!(_native, NativeError, PyException);

/// How often a wait lets Python check for signals.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("machinen")
            .enable_all()
            .build()
            .unwrap_or_else(|e| {
                // No runtime: nothing in this module can work; say so on
                // every call rather than abort the interpreter.
                eprintln!("machinen: cannot start its runtime: {e}");
                std::process::abort()
            })
    })
}

pub(crate) fn err(e: machinen::Error) -> PyErr {
    NativeError::new_err(e.to_json()["error"].to_string())
}

pub(crate) fn invalid(code: machinen::ErrorCode, msg: String, hint: &str) -> PyErr {
    err(machinen::error::fail(code, msg).hint(hint).into())
}

/// Run `fut` to its end with the GIL released; a pending signal (Ctrl-C)
/// raises in Python and drops the future.
fn run<T, F>(py: Python<'_>, fut: F) -> PyResult<T>
where
    F: Future<Output = machinen::Result<T>> + Send,
    T: Send,
{
    let mut fut = Box::pin(fut);
    loop {
        let step = py.allow_threads(|| {
            rt().block_on(async { tokio::time::timeout(SIGNAL_POLL, &mut fut).await })
        });
        match step {
            Ok(r) => return r.map_err(err),
            Err(_) => py.check_signals()?,
        }
    }
}

fn json<T: serde::Serialize>(v: &T) -> PyResult<String> {
    serde_json::to_string(v).map_err(|e| NativeError::new_err(e.to_string()))
}

/// Every error code: `(code, retryable)`, so the Python `ErrorCode` is
/// checked against the library's own list.
#[pyfunction]
fn error_codes() -> Vec<(String, bool)> {
    machinen::error::ALL
        .iter()
        .map(|c| (c.as_str().to_owned(), c.retryable()))
        .collect()
}

/// Where the wheel keeps `machinen-vmm` and `machinen-agent`.
#[pyfunction]
fn set_bin_dir(dir: String) {
    machinen::binaries::set_search_dir(dir);
}

#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Boot a VM (options as JSON, see `options::BootArgs`).
#[pyfunction]
fn boot(py: Python<'_>, opts: &str) -> PyResult<NativeVm> {
    let opts = options::boot(opts)?;
    let keep = !opts.detached;
    let vm = run(py, machinen::boot(opts))?;
    Ok(NativeVm::new(vm, keep))
}

#[pyfunction]
fn restore(py: Python<'_>, opts: &str) -> PyResult<NativeVm> {
    let opts = options::restore(opts)?;
    let keep = !opts.detached;
    let vm = run(py, machinen::restore(opts))?;
    Ok(NativeVm::new(vm, keep))
}

/// Bake an image (options as JSON, see `options::provision`); the result
/// as JSON.
#[pyfunction]
fn provision(py: Python<'_>, opts: &str) -> PyResult<String> {
    let opts = options::provision(opts)?;
    json(&run(py, machinen::provision(opts))?)
}

/// Bake a Dockerfile (options as JSON, see `options::build`); the result
/// as JSON (`machinen build --json`).
#[pyfunction]
fn build(py: Python<'_>, opts: &str) -> PyResult<String> {
    let opts = options::build(opts)?;
    json(&run(py, machinen::build::build(opts))?)
}

/// An image's settings and origin as JSON (`machinen images inspect --json`).
#[pyfunction]
fn inspect_image(py: Python<'_>, image: String) -> PyResult<String> {
    let r = py
        .allow_threads(|| {
            let paths = machinen::Paths::from_env()?;
            machinen::oci::inspect(
                &paths,
                std::path::Path::new(&image),
                machinen::progress::ProgressMode::Quiet,
            )
        })
        .map_err(err)?;
    json(&r)
}

/// How this host (or `target_arch`) would restore the native process image
/// in `dir`, as JSON (`machinen image check --json`; refusals are data).
#[pyfunction]
#[pyo3(signature = (dir, target_arch=None))]
fn check_process_image(
    py: Python<'_>,
    dir: String,
    target_arch: Option<String>,
) -> PyResult<String> {
    let r = py
        .allow_threads(|| {
            machinen::procimage::check_named(std::path::Path::new(&dir), target_arch.as_deref())
        })
        .map_err(|e| err(e.into()))?;
    json(&r)
}

/// Push an image to a registry; what was pushed as JSON.
#[pyfunction]
fn push_image(py: Python<'_>, image: String, reference: String) -> PyResult<String> {
    let r = py
        .allow_threads(|| -> machinen::Result<_> {
            let paths = machinen::Paths::from_env()?;
            Ok(machinen::oci::push::push(
                &paths,
                std::path::Path::new(&image),
                &reference,
                machinen::progress::ProgressMode::Quiet,
            )?)
        })
        .map_err(err)?;
    json(&r)
}

#[pyfunction]
fn attach(py: Python<'_>, target: String) -> PyResult<NativeVm> {
    let vm = run(py, async move { machinen::attach(&target).await })?;
    Ok(NativeVm::new(vm, false))
}

/// Live VMs (with `all`, also those that ended without being stopped), as
/// JSON (`machinen ls --json`).
#[pyfunction]
fn list_vms(py: Python<'_>, all: bool) -> PyResult<String> {
    let vms = py.allow_threads(|| {
        if all {
            machinen::list_all()
        } else {
            machinen::list()
        }
    });
    json(&vms.map_err(err)?)
}

#[pyfunction]
fn gc(py: Python<'_>, dry_run: bool) -> PyResult<String> {
    let r = py.allow_threads(|| machinen::gc(dry_run)).map_err(err)?;
    json(&r)
}

/// What a collected exec returns: `(exit_code, signal, stdout, stderr)`.
type ExecOut<'py> = (i32, Option<i32>, Bound<'py, PyBytes>, Bound<'py, PyBytes>);

/// A VM. Safe to share between threads: concurrent execs share nothing
/// but the supervisor's socket.
#[pyclass(frozen)]
struct NativeVm {
    vm: Arc<Vm>,
    /// A VM this process started in the foreground: kept until `kill` or
    /// `detach` (it ends with this process otherwise).
    owned: Mutex<Option<Arc<Vm>>>,
    fork_report: Option<String>,
}

impl NativeVm {
    fn new(vm: Vm, keep: bool) -> NativeVm {
        let vm = Arc::new(vm);
        NativeVm {
            owned: Mutex::new(keep.then(|| vm.clone())),
            vm,
            fork_report: None,
        }
    }

    fn release(&self) {
        self.owned.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

#[pymethods]
impl NativeVm {
    #[getter]
    fn name(&self) -> String {
        self.vm.name().to_string()
    }

    #[getter]
    fn id(&self) -> String {
        self.vm.info().id.clone()
    }

    #[getter]
    fn pid(&self) -> u32 {
        self.vm.info().pid
    }

    fn info(&self) -> PyResult<String> {
        json(self.vm.info())
    }

    fn fork_report(&self) -> Option<String> {
        self.fork_report.clone()
    }

    /// Run a command to its end: `(exit_code, signal, stdout, stderr)`.
    #[pyo3(signature = (argv, env, cwd=None, user=None, timeout=None))]
    fn exec<'py>(
        &self,
        py: Python<'py>,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        user: Option<String>,
        timeout: Option<f64>,
    ) -> PyResult<ExecOut<'py>> {
        let opts = machinen::ExecOptions {
            rlimits: Vec::new(),
            argv,
            env,
            cwd,
            user,
        };
        let timeout = options::secs(timeout)?;
        let vm = self.vm.clone();
        let out = run(py, async move { vm.exec_timeout(opts, timeout).await })?;
        Ok((
            out.status.shell_code(),
            out.status.signal,
            PyBytes::new(py, &out.stdout),
            PyBytes::new(py, &out.stderr),
        ))
    }

    /// Start a command whose output is read as it comes.
    #[pyo3(signature = (argv, env, cwd=None, user=None, timeout=None))]
    fn exec_start(
        &self,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        user: Option<String>,
        timeout: Option<f64>,
    ) -> PyResult<NativeExec> {
        let opts = machinen::ExecOptions {
            rlimits: Vec::new(),
            argv,
            env,
            cwd,
            user,
        };
        Ok(NativeExec::start(
            self.vm.clone(),
            opts,
            options::secs(timeout)?,
        ))
    }

    #[pyo3(signature = (path, data, mode=None, append=false))]
    fn write_file(
        &self,
        py: Python<'_>,
        path: String,
        data: Vec<u8>,
        mode: Option<u32>,
        append: bool,
    ) -> PyResult<u64> {
        let vm = self.vm.clone();
        run(py, async move {
            vm.write_file(&path, &data, WriteFileOptions { mode, append })
                .await
        })
    }

    fn read_file<'py>(&self, py: Python<'py>, path: String) -> PyResult<Bound<'py, PyBytes>> {
        let vm = self.vm.clone();
        let (_, bytes) = run(py, async move { vm.read_file(&path).await })?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// Start a command on a terminal of `rows` x `cols`.
    #[pyo3(signature = (argv, env, rows, cols, cwd=None, user=None))]
    #[allow(clippy::too_many_arguments)]
    fn exec_pty(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        rows: u16,
        cols: u16,
        cwd: Option<String>,
        user: Option<String>,
    ) -> PyResult<NativePty> {
        let opts = machinen::ExecOptions {
            rlimits: Vec::new(),
            argv,
            env,
            cwd,
            user,
        };
        let size = machinen_proto::WinSize {
            rows: rows.max(1),
            cols: cols.max(1),
        };
        let vm = self.vm.clone();
        let pty = run(py, async move { vm.exec_pty(opts, size).await })?;
        Ok(NativePty {
            pid: pty.pid(),
            input: pty.input(),
            exec: Arc::new(tokio::sync::Mutex::new(Some(pty))),
        })
    }

    /// Copy a host directory tree into the guest: `(entries, bytes)`.
    fn push_dir(
        &self,
        py: Python<'_>,
        src: String,
        dest: String,
        exclude: Vec<String>,
    ) -> PyResult<(u64, u64)> {
        let vm = self.vm.clone();
        let r = run(py, async move {
            vm.push_dir(
                std::path::Path::new(&src),
                &dest,
                machinen::PushDirOptions { exclude },
            )
            .await
        })?;
        Ok((r.entries, r.bytes))
    }

    /// Copy a guest directory tree to the host (`dest` must not exist).
    fn pull_dir(
        &self,
        py: Python<'_>,
        src: String,
        dest: String,
        exclude: Vec<String>,
    ) -> PyResult<(u64, u64)> {
        let vm = self.vm.clone();
        let r = run(py, async move {
            let opts = machinen::PullDirOptions {
                exclude,
                ..Default::default()
            };
            vm.pull_dir(&src, std::path::Path::new(&dest), opts).await
        })?;
        Ok((r.entries, r.bytes))
    }

    #[pyo3(signature = (out, keep_alive, full=false, timeout=None))]
    fn snapshot(
        &self,
        py: Python<'_>,
        out: String,
        keep_alive: bool,
        full: bool,
        timeout: Option<f64>,
    ) -> PyResult<String> {
        let timeout =
            options::secs(timeout)?.unwrap_or(machinen::restore::DEFAULT_SNAPSHOT_TIMEOUT);
        let vm = self.vm.clone();
        let report = run(py, async move {
            vm.snapshot_full(std::path::Path::new(&out), keep_alive, timeout, full)
                .await
        })?;
        if !keep_alive {
            self.release();
        }
        json(&report)
    }

    /// The CRIU engine's snapshot (see `machinen::criu::snapshot`).
    #[pyo3(signature = (out, keep_alive, pid=None, timeout=None))]
    fn snapshot_criu(
        &self,
        py: Python<'_>,
        out: String,
        keep_alive: bool,
        pid: Option<u32>,
        timeout: Option<f64>,
    ) -> PyResult<String> {
        let opts = machinen::criu::SnapshotOptions {
            out: out.into(),
            keep_alive,
            pid,
            timeout: options::secs(timeout)?.unwrap_or_default(),
        };
        let vm = self.vm.clone();
        let report = run(py, async move {
            let paths = machinen::Paths::from_env()?;
            machinen::criu::snapshot(&vm, &paths, &opts).await
        })?;
        if !keep_alive {
            self.release();
        }
        json(&report)
    }

    fn fork(&self, py: Python<'_>, opts: &str) -> PyResult<NativeVm> {
        let opts = options::fork(opts)?;
        let keep = !opts.detached;
        let vm = self.vm.clone();
        let (new, report) = run(py, async move { vm.fork(opts).await })?;
        let mut h = NativeVm::new(new, keep);
        h.fork_report = Some(json(&report)?);
        Ok(h)
    }

    /// Stop the VM (at once with `force`); the report as JSON.
    #[pyo3(signature = (force, timeout=None))]
    fn kill(&self, py: Python<'_>, force: bool, timeout: Option<f64>) -> PyResult<String> {
        let timeout = options::secs(timeout)?.unwrap_or(machinen_proto::timeouts::STOP);
        let vm = self.vm.clone();
        let r = run(py, async move { vm.shutdown(force, timeout).await });
        self.release();
        json(&r?)
    }

    fn detach(&self, py: Python<'_>) -> PyResult<()> {
        let vm = self.vm.clone();
        run(py, async move { vm.detach().await })?;
        self.release();
        Ok(())
    }

    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<String> {
        let timeout = options::secs(timeout)?;
        let vm = self.vm.clone();
        let outcome = run(py, async move { vm.wait(timeout).await })?;
        let mut v =
            serde_json::to_value(&outcome).map_err(|e| NativeError::new_err(e.to_string()))?;
        if let Some(o) = v.as_object_mut() {
            o.insert("exit_code".into(), outcome.exit_code().into());
        }
        Ok(v.to_string())
    }

    /// Capture process `pid` of the guest as a native process image in
    /// `out`; the report as JSON (`machinen capture --json`).
    #[pyo3(signature = (pid, out, kill=false, max_bytes=None))]
    fn capture_process(
        &self,
        py: Python<'_>,
        pid: u32,
        out: String,
        kill: bool,
        max_bytes: Option<u64>,
    ) -> PyResult<String> {
        let vm = self.vm.clone();
        let opts = machinen::procimage::CaptureOptions { kill, max_bytes };
        json(&run(py, async move {
            machinen::procimage::capture(&vm, pid, std::path::Path::new(&out), opts).await
        })?)
    }

    /// Run CRIU in the guest (`machinen criu`); exit code and output as JSON.
    fn criu(&self, py: Python<'_>, args: Vec<String>) -> PyResult<String> {
        let vm = self.vm.clone();
        json(&run(py, async move {
            let paths = machinen::Paths::from_env()?;
            machinen::criu::output(&vm, &paths, &args).await
        })?)
    }

    fn memory_stats(&self, py: Python<'_>) -> PyResult<String> {
        let vm = self.vm.clone();
        json(&run(py, async move { vm.memory_stats().await })?)
    }

    fn balloon(&self, py: Python<'_>) -> PyResult<String> {
        let vm = self.vm.clone();
        json(&run(py, async move { vm.balloon().await })?)
    }

    /// Let the guest use `target_bytes` of its ceiling, waiting up to
    /// `wait` seconds for it to get there.
    #[pyo3(signature = (target_bytes, wait=None))]
    fn set_balloon(
        &self,
        py: Python<'_>,
        target_bytes: u64,
        wait: Option<f64>,
    ) -> PyResult<String> {
        let wait = options::secs(wait)?;
        let vm = self.vm.clone();
        json(&run(py, async move {
            vm.set_balloon(target_bytes, wait).await
        })?)
    }

    fn network(&self, py: Python<'_>) -> PyResult<String> {
        let vm = self.vm.clone();
        json(&run(py, async move { vm.network().await })?)
    }

    fn set_network(&self, py: Python<'_>, change: &str) -> PyResult<String> {
        let change = options::policy_change(change)?;
        let vm = self.vm.clone();
        json(&run(py, async move { vm.set_network(change).await })?)
    }
}

/// A command started by `NativeVm.exec_start`: `next()` returns its
/// events one at a time (a slow reader holds the guest back instead of
/// growing a queue). Dropping it gives the command up.
#[pyclass(frozen)]
struct NativeExec {
    inner: Arc<ExecEvents>,
}

impl NativeExec {
    fn start(vm: Arc<Vm>, opts: machinen::ExecOptions, timeout: Option<Duration>) -> NativeExec {
        let _rt = rt().enter();
        NativeExec {
            inner: Arc::new(ExecEvents::start(vm, opts, timeout)),
        }
    }
}

/// One event: `("stdout" | "stderr", data, None, None)` or
/// `("exit", None, exit_code, signal)`.
type PyEvent<'py> = (
    &'static str,
    Option<Bound<'py, PyBytes>>,
    Option<i32>,
    Option<i32>,
);

#[pymethods]
impl NativeExec {
    /// The next event; `None` after the exit.
    fn next<'py>(&self, py: Python<'py>) -> PyResult<Option<PyEvent<'py>>> {
        let inner = self.inner.clone();
        let ev = run(py, async move { Ok(inner.next().await) })?;
        Ok(match ev {
            None => None,
            Some(ExecEvent::Stdout(d)) => Some(("stdout", Some(PyBytes::new(py, &d)), None, None)),
            Some(ExecEvent::Stderr(d)) => Some(("stderr", Some(PyBytes::new(py, &d)), None, None)),
            Some(ExecEvent::Exit(s)) => Some(("exit", None, Some(s.shell_code()), s.signal)),
            Some(ExecEvent::Failed(e)) => return Err(err(e)),
        })
    }

    /// Bytes for the command's stdin (dropped if it no longer reads).
    fn write(&self, py: Python<'_>, data: Vec<u8>) -> PyResult<()> {
        let inner = self.inner.clone();
        run(py, async move {
            inner.write(&data).await;
            Ok(())
        })
    }

    fn close_stdin(&self, py: Python<'_>) -> PyResult<()> {
        let inner = self.inner.clone();
        run(py, async move {
            inner.close_stdin().await;
            Ok(())
        })
    }

    /// Give the command up: its stream closes and the guest ends it.
    fn cancel(&self) {
        self.inner.abort();
    }
}

/// A command on a terminal (`NativeVm.exec_pty`).
#[pyclass(frozen)]
struct NativePty {
    pid: u32,
    /// The command, until it exited.
    exec: Arc<tokio::sync::Mutex<Option<machinen::PtyExec>>>,
    input: machinen::PtyInput,
}

#[pymethods]
impl NativePty {
    #[getter]
    fn pid(&self) -> u32 {
        self.pid
    }

    /// `("output", data, None, None)`, then `("exit", None, code, signal)`;
    /// `None` after that.
    fn next<'py>(&self, py: Python<'py>) -> PyResult<Option<PyEvent<'py>>> {
        let exec = self.exec.clone();
        let ev = run(py, async move {
            let mut g = exec.lock().await;
            let Some(e) = g.as_mut() else {
                return Ok(None);
            };
            let r = e.next().await;
            if !matches!(r, Ok(machinen::PtyEvent::Output(_))) {
                *g = None;
            }
            r.map(Some)
        })?;
        Ok(match ev {
            None => None,
            Some(machinen::PtyEvent::Output(d)) => {
                Some(("output", Some(PyBytes::new(py, &d)), None, None))
            }
            Some(machinen::PtyEvent::Exit(s)) => {
                Some(("exit", None, Some(s.shell_code()), s.signal))
            }
        })
    }

    /// Keystrokes.
    fn write(&self, py: Python<'_>, data: Vec<u8>) -> PyResult<()> {
        let input = self.input.clone();
        run(py, async move { input.write(&data).await })
    }

    fn resize(&self, py: Python<'_>, rows: u16, cols: u16) -> PyResult<()> {
        let input = self.input.clone();
        let size = machinen_proto::WinSize {
            rows: rows.max(1),
            cols: cols.max(1),
        };
        run(py, async move { input.resize(size).await })
    }

    /// Send signal number `signal` to the command.
    fn signal(&self, py: Python<'_>, signal: i32) -> PyResult<()> {
        let input = self.input.clone();
        run(py, async move { input.signal(signal).await })
    }

    /// End of input (as Ctrl-D on an empty line).
    fn eof(&self, py: Python<'_>) -> PyResult<()> {
        let input = self.input.clone();
        run(py, async move { input.eof().await })
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("NativeError", m.py().get_type::<NativeError>())?;
    m.add_function(wrap_pyfunction!(error_codes, m)?)?;
    m.add_function(wrap_pyfunction!(set_bin_dir, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(boot, m)?)?;
    m.add_function(wrap_pyfunction!(restore, m)?)?;
    m.add_function(wrap_pyfunction!(attach, m)?)?;
    m.add_function(wrap_pyfunction!(provision, m)?)?;
    m.add_function(wrap_pyfunction!(build, m)?)?;
    m.add_function(wrap_pyfunction!(inspect_image, m)?)?;
    m.add_function(wrap_pyfunction!(check_process_image, m)?)?;
    m.add_function(wrap_pyfunction!(push_image, m)?)?;
    m.add_function(wrap_pyfunction!(list_vms, m)?)?;
    m.add_function(wrap_pyfunction!(gc, m)?)?;
    m.add_class::<NativeVm>()?;
    m.add_class::<NativeExec>()?;
    m.add_class::<NativePty>()?;
    Ok(())
}
