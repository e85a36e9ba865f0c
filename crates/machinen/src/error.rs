//! One error type for the whole library, carrying a stable [`ErrorCode`].
//!
//! Each module has its own `thiserror` enum with named fields and a
//! `#[source]`; [`Error`] wraps them and answers `code()`, `retryable()` and
//! `hint()` so that callers (and the CLI) can act on any failure the same way.

use std::fmt;

use serde::Serialize;

/// Defines [`ErrorCode`], its wire spelling and [`ALL`] from one list, so
/// the three cannot drift apart.
macro_rules! error_codes {
    ($($variant:ident = $wire:literal,)*) => {
        /// Stable, machine-readable error codes. The names follow the original
        /// TypeScript runtime's `ErrorCode` where one exists; never rename one.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        #[non_exhaustive]
        pub enum ErrorCode {
            $($variant,)*
        }

        impl ErrorCode {
            /// The wire/JSON spelling, e.g. `"REGISTRY_NAME_IN_USE"`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $wire,)*
                }
            }
        }

        /// Every code, for docs and tests.
        pub const ALL: &[ErrorCode] = &[$(ErrorCode::$variant,)*];
    };
}

error_codes! {
    // boot
    BootTimeout = "BOOT_TIMEOUT",
    BootDetachedReadinessFailed = "BOOT_DETACHED_READINESS_FAILED",
    BootMemoryInvalid = "BOOT_MEMORY_INVALID",
    BootVmmMissing = "BOOT_VMM_MISSING",
    BootEngineMissing = "BOOT_ENGINE_MISSING",
    BootEngineFailed = "BOOT_ENGINE_FAILED",
    BootArgsInvalid = "BOOT_ARGS_INVALID",
    BootImageInvalid = "BOOT_IMAGE_INVALID",
    BootPortForwardInUse = "BOOT_PORT_FORWARD_IN_USE",
    BootPortForwardConflict = "BOOT_PORT_FORWARD_CONFLICT",
    BootRamDirFull = "BOOT_RAM_DIR_FULL",
    // assets and images
    ProvisionBaseNotFound = "PROVISION_BASE_NOT_FOUND",
    ProvisionKernelNotFound = "PROVISION_KERNEL_NOT_FOUND",
    ProvisionAssetsDirInvalid = "PROVISION_ASSETS_DIR_INVALID",
    ProvisionArgsInvalid = "PROVISION_ARGS_INVALID",
    ProvisionStepFailed = "PROVISION_STEP_FAILED",
    ProvisionCopyFailed = "PROVISION_COPY_FAILED",
    ProvisionExportFailed = "PROVISION_EXPORT_FAILED",
    ProvisionOutputFailed = "PROVISION_OUTPUT_FAILED",
    InstallToolMissing = "INSTALL_TOOL_MISSING",
    InstallFetchFailed = "INSTALL_FETCH_FAILED",
    InstallRootfsFailed = "INSTALL_ROOTFS_FAILED",
    CacheImageBuildFailed = "CACHE_IMAGE_BUILD_FAILED",
    CacheInitramfsBuildFailed = "CACHE_INITRAMFS_BUILD_FAILED",
    // exec and the agent channel
    ExecVsockUnavailable = "EXEC_VSOCK_UNAVAILABLE",
    ExecCommandNotFound = "EXEC_COMMAND_NOT_FOUND",
    ExecSpawnFailed = "EXEC_SPAWN_FAILED",
    ExecFailed = "EXEC_FAILED",
    ProtocolError = "PROTOCOL_ERROR",
    // registry and lifecycle
    RegistryNameInUse = "REGISTRY_NAME_IN_USE",
    RegistryNameInvalid = "REGISTRY_NAME_INVALID",
    RegistryNotFound = "REGISTRY_NOT_FOUND",
    RegistryIo = "REGISTRY_IO",
    ControlPermissionDenied = "CONTROL_PERMISSION_DENIED",
    StopTimeout = "STOP_TIMEOUT",
    StopFailed = "STOP_FAILED",
    GcFailed = "GC_FAILED",
    // snapshot, restore, fork
    SnapshotDumpFailed = "SNAPSHOT_DUMP_FAILED",
    SnapshotTimeout = "SNAPSHOT_TIMEOUT",
    SnapshotOutExists = "SNAPSHOT_OUT_EXISTS",
    SnapshotStateInvalid = "SNAPSHOT_STATE_INVALID",
    RestoreBundleInvalid = "RESTORE_BUNDLE_INVALID",
    RestoreBundleIncompatible = "RESTORE_BUNDLE_INCOMPATIBLE",
    RestoreImageMismatch = "RESTORE_IMAGE_MISMATCH",
    BootVmstateReseedFailed = "BOOT_VMSTATE_RESEED_FAILED",
    // files in and out of the guest
    FilesPathInvalid = "FILES_PATH_INVALID",
    FilesNotFound = "FILES_NOT_FOUND",
    FilesPermissionDenied = "FILES_PERMISSION_DENIED",
    FilesIsDirectory = "FILES_IS_DIRECTORY",
    FilesNotADirectory = "FILES_NOT_A_DIRECTORY",
    FilesNotRegular = "FILES_NOT_REGULAR",
    FilesNoSpace = "FILES_NO_SPACE",
    FilesIo = "FILES_IO",
    FilesTooLarge = "FILES_TOO_LARGE",
    FilesHostDiskReserve = "FILES_HOST_DISK_RESERVE",
    // secrets
    SecretsInvalid = "SECRETS_INVALID",
    SecretsFailed = "SECRETS_FAILED",
    // the user stopped the operation (Ctrl-C, SIGTERM, SIGHUP)
    Interrupted = "INTERRUPTED",
    // anything the host OS refused that fits nowhere else
    Io = "IO",
}

impl ErrorCode {
    /// Parse the wire spelling (used for errors the agent reports).
    pub fn from_wire(s: &str) -> Option<ErrorCode> {
        ALL.iter().copied().find(|c| c.as_str() == s)
    }

    /// Whether trying the same operation again may succeed without the
    /// caller changing anything.
    pub fn retryable(self) -> bool {
        use ErrorCode::*;
        matches!(
            self,
            BootTimeout
                | BootDetachedReadinessFailed
                | ExecVsockUnavailable
                | StopTimeout
                | InstallFetchFailed
                | SnapshotTimeout
                | BootRamDirFull
        )
    }

    /// The CLI's exit status for this error. Commands run in a VM pass their
    /// own status through, so machinen's own failures use the band
    /// 125 (machinen failed), 126 (command cannot run), 127 (command not found),
    /// and 2 for bad arguments, like `docker run` and `env` do.
    pub fn exit_code(self) -> i32 {
        use ErrorCode::*;
        match self {
            ExecCommandNotFound => 127,
            // As a shell reports a command ended by Ctrl-C.
            Interrupted => 130,
            ExecSpawnFailed => 126,
            BootArgsInvalid | BootMemoryInvalid | RegistryNameInvalid | ProvisionArgsInvalid
            | FilesPathInvalid | SecretsInvalid => 2,
            _ => 125,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error any module can raise directly: a code, what happened, and what
/// the user should do about it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
    pub hint: Option<String>,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
            hint: None,
            source: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Failure {
        self.hint = Some(hint.into());
        self
    }

    pub fn source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Failure {
        self.source = Some(Box::new(source));
        self
    }
}

/// Implemented by every module error so [`Error`] can answer uniformly.
pub trait Coded: std::error::Error {
    fn code(&self) -> ErrorCode;
    fn hint(&self) -> Option<String> {
        None
    }
}

impl Coded for Failure {
    fn code(&self) -> ErrorCode {
        self.code
    }
    fn hint(&self) -> Option<String> {
        self.hint.clone()
    }
}

/// The library's error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Failure(#[from] Failure),
    #[error(transparent)]
    Install(#[from] crate::assets::InstallError),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Provision(#[from] crate::provision::ProvisionError),
    #[error(transparent)]
    Bundle(#[from] crate::bundle::BundleError),
    #[error(transparent)]
    Ram(#[from] crate::ramdir::RamError),
}

impl Error {
    fn inner(&self) -> &dyn Coded {
        match self {
            Error::Failure(e) => e,
            Error::Install(e) => e,
            Error::Image(e) => e,
            Error::Registry(e) => e,
            Error::Provision(e) => e,
            Error::Bundle(e) => e,
            Error::Ram(e) => e,
        }
    }

    /// The stable code of this error.
    pub fn code(&self) -> ErrorCode {
        self.inner().code()
    }

    /// Whether retrying unchanged may succeed.
    pub fn retryable(&self) -> bool {
        self.code().retryable()
    }

    /// What the user should do, when there is something to say.
    pub fn hint(&self) -> Option<String> {
        self.inner().hint()
    }

    /// The chain of causes below this error's own message.
    pub fn causes(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = std::error::Error::source(self.inner());
        while let Some(e) = cur {
            out.push(e.to_string());
            cur = e.source();
        }
        out
    }

    /// JSON form, as printed by `--json` commands on failure.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "code": self.code().as_str(),
                "message": self.to_string(),
                "causes": self.causes(),
                "hint": self.hint(),
                "retryable": self.retryable(),
            }
        })
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Failure(Failure::new(ErrorCode::Io, "an operating-system call failed").source(e))
    }
}

/// Shorthand for a coded failure.
pub fn fail(code: ErrorCode, message: impl Into<String>) -> Failure {
    Failure::new(code, message)
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for c in ALL {
            assert!(seen.insert(c.as_str()), "duplicate {c}");
            assert_eq!(ErrorCode::from_wire(c.as_str()), Some(*c));
            let json = serde_json::to_string(c).expect("json");
            assert_eq!(json, format!("\"{}\"", c.as_str()));
        }
    }

    #[test]
    fn failure_carries_code_hint_and_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e: Error = fail(ErrorCode::RegistryNotFound, "no VM named x")
            .hint("see `machinen ls`")
            .source(io)
            .into();
        assert_eq!(e.code(), ErrorCode::RegistryNotFound);
        assert_eq!(e.to_string(), "no VM named x");
        assert_eq!(e.causes(), vec!["gone".to_string()]);
        assert_eq!(e.hint().as_deref(), Some("see `machinen ls`"));
        assert!(!e.retryable());
        assert_eq!(e.to_json()["error"]["code"], "REGISTRY_NOT_FOUND");
    }
}
