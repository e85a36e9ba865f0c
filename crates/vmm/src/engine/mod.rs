//! The VM engine behind a small trait, so that a native VMM can be added
//! beside QEMU without touching the supervisor, the library or the CLI.
//!
//! `Engine` is what a host can run (probed once); `Machine` is one running VM.

#[cfg(test)]
pub mod fake;
pub mod qemu;
mod virtiofs;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use machinen::spec::VmSpec;
use serde::Serialize;
use tokio::net::UnixStream;

pub use machinen::accel::Accel;

/// What an engine can do on this host. Optional features are reported here,
/// never by methods that fail at run time.
#[derive(Debug, Clone, Serialize)]
pub struct Capabilities {
    pub engine: &'static str,
    pub accel: Accel,
    /// CPU model the guest sees (a named model keeps state portable).
    pub cpu_model: String,
    pub binary: PathBuf,
    /// The engine's (major, minor) version, when known.
    pub version: Option<(u32, u32)>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{binary} not found")]
    Missing { binary: String },
    #[error(transparent)]
    BadAccel(#[from] machinen::accel::BadAccel),
    #[error("could not start {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM engine exited during start-up: {detail}")]
    EarlyExit { detail: String },
    #[error("timed out waiting for {what}")]
    Timeout { what: &'static str },
    #[error("QMP command {command} failed: {detail}")]
    Qmp {
        command: &'static str,
        detail: String,
    },
}

/// A kind of VM engine.
pub trait Engine {
    type Machine: Machine;
    fn capabilities(&self) -> &Capabilities;
    /// Start the VM described by `spec`; returns once the engine process runs
    /// and its control channel is connected.
    fn launch(
        &self,
        spec: &VmSpec,
    ) -> impl std::future::Future<Output = Result<Self::Machine, EngineError>>;
}

/// One running VM: what the supervisor's controller does with it. The
/// controller (`controller.rs`, `supervisor.rs`, `snapshot.rs`) sees only
/// this trait, so a second engine plugs in beside QEMU, and the lifecycle
/// is unit-tested against a fake one (`engine::fake`).
pub trait Machine {
    fn pid(&self) -> u32;
    /// Stop the vCPUs (the guest's clocks stop with them).
    fn pause(&self) -> impl std::future::Future<Output = Result<(), EngineError>>;
    /// Run the vCPUs again.
    fn resume(&self) -> impl std::future::Future<Output = Result<(), EngineError>>;
    /// Ask the guest to keep `target` bytes of RAM, the balloon taking the
    /// rest (`None`: only read). Returns the bytes the guest has now; it
    /// moves toward a new target over the next moments. Only for a VM that
    /// has a balloon (`qemu_args::has_balloon`).
    fn balloon(
        &self,
        target: Option<u64>,
    ) -> impl std::future::Future<Output = Result<u64, EngineError>>;
    /// Write the machine state (devices, and RAM unless it lives in a
    /// shared file) to `path`. The VM must be paused and stays paused.
    /// Gives up with [`EngineError::Timeout`] at `deadline`.
    fn save_state(
        &self,
        path: &Path,
        deadline: Instant,
    ) -> impl std::future::Future<Output = Result<(), EngineError>>;
    /// Like [`Machine::save_state`], but for a running guest whose RAM is
    /// not a shared file: the RAM is copied while the guest runs, and the
    /// guest is paused only for what it changed meanwhile and the devices
    /// (it ends paused). Returns how long the guest has been paused.
    fn save_state_live(
        &self,
        path: &Path,
        deadline: Instant,
    ) -> impl std::future::Future<Output = Result<Duration, EngineError>>;
    /// Load the state written by `save_state` into a machine launched for
    /// a restore (`spec.restore`). `start`: run the guest once loaded;
    /// otherwise it stays paused until [`Machine::resume`].
    fn load_state(
        &self,
        path: &Path,
        deadline: Instant,
        start: bool,
    ) -> impl std::future::Future<Output = Result<(), EngineError>>;
    /// Put a new, empty qcow2 layer `file` (node `new_node`) on top of
    /// the disk's top node `top_node`: from now on the guest's writes go
    /// there and the old top is read-only. The VM should be paused.
    fn new_disk_layer(
        &self,
        top_node: &str,
        file: &Path,
        new_node: &str,
    ) -> impl std::future::Future<Output = Result<(), EngineError>>;
    /// The byte stream to the guest agent's port.
    fn connect_agent(
        &mut self,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<UnixStream, EngineError>>;
    /// Resolves when the engine process has exited; says how it ended.
    fn wait(&mut self) -> impl std::future::Future<Output = Exit>;
    /// Ask the engine to quit now (guest state is discarded).
    fn quit(&mut self) -> impl std::future::Future<Output = ()>;
    /// Kill the engine process.
    fn kill(&mut self);
}

/// How the engine process ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exit {
    /// Its exit status, when it exited by itself.
    pub code: Option<i32>,
    /// The signal that killed it.
    pub signal: Option<i32>,
    /// The end of its own log (QEMU's stderr), trimmed.
    pub log_tail: String,
    /// Set when waiting for it failed (then nothing else is known).
    pub wait_error: Option<String>,
}

impl Exit {
    /// "killed by signal 7 (SIGBUS)", "exited with status 1", …
    pub fn status(&self) -> String {
        match (self.signal, self.code, &self.wait_error) {
            (Some(sig), _, _) => {
                let name = nix::sys::signal::Signal::try_from(sig)
                    .map(|s| s.as_str())
                    .unwrap_or("unknown signal");
                format!("killed by signal {sig} ({name})")
            }
            (None, Some(code), _) => format!("exited with status {code}"),
            (None, None, Some(e)) => format!("could not be waited for: {e}"),
            (None, None, None) => "ended".into(),
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.status())?;
        if !self.log_tail.is_empty() {
            write!(f, ": {}", self.log_tail)?;
        }
        Ok(())
    }
}
