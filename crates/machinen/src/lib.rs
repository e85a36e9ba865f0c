//! machinen: Linux microVMs that can be frozen, moved, resumed and forked.
//!
//! The library drives one supervisor process (`machinen-vmm`) per VM over a
//! unix control socket; the supervisor owns QEMU and the session with the
//! guest agent. See `docs/architecture.md` in the repository.

pub mod accel;
pub mod assets;
pub mod backpressure;
pub mod balloon;
pub mod binaries;
pub mod build;
pub mod bundle;
pub mod chain;
pub mod criu;
pub mod dirs;
pub mod error;
pub mod exec_events;
pub mod feedback;
pub mod files;
#[cfg(test)]
mod fuzzing;
pub mod hostfile;
pub mod image;
pub mod initramfs;
pub mod live_mounts;
pub mod mounts;
pub mod network;
pub mod oci;
pub mod paths;
pub mod phases;
pub mod ports;
pub mod procimage;
pub mod progress;
pub mod provision;
pub mod pty;
pub mod qcow2;
pub mod qemu_args;
pub mod ramdir;
pub mod registry;
pub mod restore;
pub mod sandboxes;
pub mod secrets;
pub mod service;
pub mod spec;
pub mod stats;
pub mod terminal;
pub mod transport;
pub mod vm;

pub use dirs::{DirReport, PullDirOptions, PushDirOptions};
pub use error::{Error, ErrorCode, Failure, Result};
pub use files::WriteFileOptions;
pub use hostfile::{DiskReserve, ReadFileOptions};
pub use paths::Paths;
pub use provision::{provision, ImageConfig, ProvisionOptions, ProvisionResult};
pub use pty::{PtyEvent, PtyExec, PtyInput};
pub use restore::{restore, ForkOptions, ForkReport, RestoreOptions};
pub use secrets::{Secret, SecretValue};
pub use vm::{
    attach, boot, gc, list, list_all, logs, BootOptions, ExecOptions, ExecOutput, GcReport,
    StopReport, Vm, VmInfo, VmLogs,
};
