//! The one vocabulary of error codes, shared by the guest agent, the
//! supervisor, the library, the CLI and the bindings: an agent or
//! supervisor answers with [`ErrorCode::as_str`] on the wire and the
//! library parses it back with [`ErrorCode::from_wire`], so a code that
//! exists on one side exists on every side.

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
            pub const fn as_str(self) -> &'static str {
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
    ProtocolVersionMismatch = "PROTOCOL_VERSION_MISMATCH",
    PortForwardRefused = "PORT_FORWARD_REFUSED",
    FixupFailed = "FIXUP_FAILED",
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
    // added later; kept at the end so merges stay easy
    ExecTimeout = "EXEC_TIMEOUT",
    FilesPathEscape = "FILES_PATH_ESCAPE",
    FilesExists = "FILES_EXISTS",
    BootNestedVirtUnsupported = "BOOT_NESTED_VIRT_UNSUPPORTED",
    // the VM's main command (service VMs)
    MainAlreadyRunning = "MAIN_ALREADY_RUNNING",
    MainNotRunning = "MAIN_NOT_RUNNING",
    WaitTimeout = "WAIT_TIMEOUT",
    // a command the caller required to succeed exited non-zero (the Node
    // binding's throwing `exec`)
    ExecNonzeroExit = "EXEC_NONZERO_EXIT",
    // host directories in the VM (`--mount`)
    BootMountInvalid = "BOOT_MOUNT_INVALID",
    BootMountHostNotFound = "BOOT_MOUNT_HOST_NOT_FOUND",
    MountPathInvalid = "MOUNT_PATH_INVALID",
    // the host has no memory for more VMs (fork, restore)
    ForkMemoryBackpressure = "FORK_MEMORY_BACKPRESSURE",
    // the VM has no working balloon (none, or unbound in a private restore)
    BalloonUnavailable = "BALLOON_UNAVAILABLE",
    // a balloon target outside what the VM can take
    BalloonTargetInvalid = "BALLOON_TARGET_INVALID",
    // a live mount that would reach outside what it may share
    MountPathEscape = "MOUNT_PATH_ESCAPE",
    // `restore --mount-live` for a guest path the snapshot has no live mount at
    BootLiveMountOverrideUnknown = "BOOT_LIVE_MOUNT_OVERRIDE_UNKNOWN",
    // OCI/Docker images: damaged, hostile or unsupported; for another platform
    ImageInvalid = "IMAGE_INVALID",
    ImagePlatformMismatch = "IMAGE_PLATFORM_MISMATCH",
    // a registry image could not be fetched (address, credentials, network)
    ImagePullFailed = "IMAGE_PULL_FAILED",
    // a bundle could not be pushed to or pulled from a registry (address,
    // credentials, network; a rerun resumes)
    BundleTransferFailed = "BUNDLE_TRANSFER_FAILED",
    // an egress rule or policy change that cannot be applied
    NetworkPolicyInvalid = "NETWORK_POLICY_INVALID",
    // the VM has no filtered network (`--network none` or `nat-host`)
    NetworkUnavailable = "NETWORK_UNAVAILABLE",
    // a number that is no signal (kill of a main command or a process)
    SignalInvalid = "SIGNAL_INVALID",
    // the containerd shim: an OCI runtime spec or request it cannot run,
    // and a container or process it does not know
    ContainerSpecInvalid = "CONTAINER_SPEC_INVALID",
    ContainerNotFound = "CONTAINER_NOT_FOUND",
    // a baked image could not be pushed to a registry (address, credentials,
    // network)
    ImagePushFailed = "IMAGE_PUSH_FAILED",
    // `machinen build`: a Dockerfile that does not parse, an instruction or
    // flag outside the supported subset, a COPY/ADD source missing from the
    // build context or reaching outside it
    BuildDockerfileInvalid = "BUILD_DOCKERFILE_INVALID",
    BuildInstructionUnsupported = "BUILD_INSTRUCTION_UNSUPPORTED",
    BuildContextInvalid = "BUILD_CONTEXT_INVALID",
    // native process images (the portable engine): documents that are
    // missing, malformed or inconsistent; an image this host cannot
    // restore (the refusals say why, with the image vocabulary's codes)
    PortableImageInvalid = "PORTABLE_IMAGE_INVALID",
    BootPortableUnsupported = "BOOT_PORTABLE_UNSUPPORTED",
    // a process could not be captured (gone, a kernel thread, the agent,
    // not traceable, its memory unreadable)
    SnapshotPortableUnsupported = "SNAPSHOT_PORTABLE_UNSUPPORTED",
    // CRIU (the process-level engine) is not installed for this kernel, or
    // could not be staged in the guest
    SnapshotCriuUnavailable = "SNAPSHOT_CRIU_UNAVAILABLE",
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
                | WaitTimeout
                | ForkMemoryBackpressure
                | ImagePullFailed
                | ImagePushFailed
                | BundleTransferFailed
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
            // As timeout(1) reports a command it had to stop.
            ExecTimeout => 124,
            // As a shell reports a command ended by Ctrl-C.
            Interrupted => 130,
            ExecSpawnFailed => 126,
            BootArgsInvalid
            | BootMemoryInvalid
            | RegistryNameInvalid
            | ProvisionArgsInvalid
            | FilesPathInvalid
            | SecretsInvalid
            | BootMountInvalid
            | MountPathInvalid
            | BalloonTargetInvalid
            | BootLiveMountOverrideUnknown
            | NetworkPolicyInvalid
            | SignalInvalid
            | ContainerSpecInvalid
            | BuildDockerfileInvalid
            | BuildInstructionUnsupported
            | BuildContextInvalid
            | PortableImageInvalid
            | MountPathEscape => 2,
            _ => 125,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
