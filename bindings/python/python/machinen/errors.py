"""Errors: every failure is a :class:`MachinenError` with a stable ``code``.

The codes are the Rust library's ``ErrorCode`` (the same names the CLI
prints and the Node package uses); ``tests/test_api.py`` checks this list
against the native module's, so the two cannot drift. Regenerate it with
``python3 scripts/gen_codes.py`` after adding a code.
"""

from __future__ import annotations

import enum
import json
from typing import Dict, List, Optional, Type


class ErrorCode(str, enum.Enum):
    """A stable error code (compare with ``==`` or use as a ``str``)."""

    BOOT_TIMEOUT = "BOOT_TIMEOUT"
    BOOT_DETACHED_READINESS_FAILED = "BOOT_DETACHED_READINESS_FAILED"
    BOOT_MEMORY_INVALID = "BOOT_MEMORY_INVALID"
    BOOT_VMM_MISSING = "BOOT_VMM_MISSING"
    BOOT_ENGINE_MISSING = "BOOT_ENGINE_MISSING"
    BOOT_ENGINE_FAILED = "BOOT_ENGINE_FAILED"
    BOOT_ARGS_INVALID = "BOOT_ARGS_INVALID"
    BOOT_IMAGE_INVALID = "BOOT_IMAGE_INVALID"
    BOOT_PORT_FORWARD_IN_USE = "BOOT_PORT_FORWARD_IN_USE"
    BOOT_PORT_FORWARD_CONFLICT = "BOOT_PORT_FORWARD_CONFLICT"
    BOOT_RAM_DIR_FULL = "BOOT_RAM_DIR_FULL"
    PROVISION_BASE_NOT_FOUND = "PROVISION_BASE_NOT_FOUND"
    PROVISION_KERNEL_NOT_FOUND = "PROVISION_KERNEL_NOT_FOUND"
    PROVISION_ASSETS_DIR_INVALID = "PROVISION_ASSETS_DIR_INVALID"
    PROVISION_ARGS_INVALID = "PROVISION_ARGS_INVALID"
    PROVISION_STEP_FAILED = "PROVISION_STEP_FAILED"
    PROVISION_COPY_FAILED = "PROVISION_COPY_FAILED"
    PROVISION_EXPORT_FAILED = "PROVISION_EXPORT_FAILED"
    PROVISION_OUTPUT_FAILED = "PROVISION_OUTPUT_FAILED"
    INSTALL_TOOL_MISSING = "INSTALL_TOOL_MISSING"
    INSTALL_FETCH_FAILED = "INSTALL_FETCH_FAILED"
    INSTALL_ROOTFS_FAILED = "INSTALL_ROOTFS_FAILED"
    CACHE_IMAGE_BUILD_FAILED = "CACHE_IMAGE_BUILD_FAILED"
    CACHE_INITRAMFS_BUILD_FAILED = "CACHE_INITRAMFS_BUILD_FAILED"
    EXEC_VSOCK_UNAVAILABLE = "EXEC_VSOCK_UNAVAILABLE"
    EXEC_COMMAND_NOT_FOUND = "EXEC_COMMAND_NOT_FOUND"
    EXEC_SPAWN_FAILED = "EXEC_SPAWN_FAILED"
    EXEC_FAILED = "EXEC_FAILED"
    PROTOCOL_ERROR = "PROTOCOL_ERROR"
    PROTOCOL_VERSION_MISMATCH = "PROTOCOL_VERSION_MISMATCH"
    PORT_FORWARD_REFUSED = "PORT_FORWARD_REFUSED"
    FIXUP_FAILED = "FIXUP_FAILED"
    REGISTRY_NAME_IN_USE = "REGISTRY_NAME_IN_USE"
    REGISTRY_NAME_INVALID = "REGISTRY_NAME_INVALID"
    REGISTRY_NOT_FOUND = "REGISTRY_NOT_FOUND"
    REGISTRY_IO = "REGISTRY_IO"
    CONTROL_PERMISSION_DENIED = "CONTROL_PERMISSION_DENIED"
    STOP_TIMEOUT = "STOP_TIMEOUT"
    STOP_FAILED = "STOP_FAILED"
    GC_FAILED = "GC_FAILED"
    SNAPSHOT_DUMP_FAILED = "SNAPSHOT_DUMP_FAILED"
    SNAPSHOT_TIMEOUT = "SNAPSHOT_TIMEOUT"
    SNAPSHOT_OUT_EXISTS = "SNAPSHOT_OUT_EXISTS"
    SNAPSHOT_STATE_INVALID = "SNAPSHOT_STATE_INVALID"
    RESTORE_BUNDLE_INVALID = "RESTORE_BUNDLE_INVALID"
    RESTORE_BUNDLE_INCOMPATIBLE = "RESTORE_BUNDLE_INCOMPATIBLE"
    RESTORE_IMAGE_MISMATCH = "RESTORE_IMAGE_MISMATCH"
    BOOT_VMSTATE_RESEED_FAILED = "BOOT_VMSTATE_RESEED_FAILED"
    FILES_PATH_INVALID = "FILES_PATH_INVALID"
    FILES_NOT_FOUND = "FILES_NOT_FOUND"
    FILES_PERMISSION_DENIED = "FILES_PERMISSION_DENIED"
    FILES_IS_DIRECTORY = "FILES_IS_DIRECTORY"
    FILES_NOT_A_DIRECTORY = "FILES_NOT_A_DIRECTORY"
    FILES_NOT_REGULAR = "FILES_NOT_REGULAR"
    FILES_NO_SPACE = "FILES_NO_SPACE"
    FILES_IO = "FILES_IO"
    FILES_TOO_LARGE = "FILES_TOO_LARGE"
    FILES_HOST_DISK_RESERVE = "FILES_HOST_DISK_RESERVE"
    SECRETS_INVALID = "SECRETS_INVALID"
    SECRETS_FAILED = "SECRETS_FAILED"
    INTERRUPTED = "INTERRUPTED"
    IO = "IO"
    EXEC_TIMEOUT = "EXEC_TIMEOUT"
    FILES_PATH_ESCAPE = "FILES_PATH_ESCAPE"
    FILES_EXISTS = "FILES_EXISTS"
    BOOT_NESTED_VIRT_UNSUPPORTED = "BOOT_NESTED_VIRT_UNSUPPORTED"
    MAIN_ALREADY_RUNNING = "MAIN_ALREADY_RUNNING"
    MAIN_NOT_RUNNING = "MAIN_NOT_RUNNING"
    WAIT_TIMEOUT = "WAIT_TIMEOUT"
    EXEC_NONZERO_EXIT = "EXEC_NONZERO_EXIT"
    BOOT_MOUNT_INVALID = "BOOT_MOUNT_INVALID"
    BOOT_MOUNT_HOST_NOT_FOUND = "BOOT_MOUNT_HOST_NOT_FOUND"
    MOUNT_PATH_INVALID = "MOUNT_PATH_INVALID"
    FORK_MEMORY_BACKPRESSURE = "FORK_MEMORY_BACKPRESSURE"
    BALLOON_UNAVAILABLE = "BALLOON_UNAVAILABLE"
    BALLOON_TARGET_INVALID = "BALLOON_TARGET_INVALID"
    MOUNT_PATH_ESCAPE = "MOUNT_PATH_ESCAPE"
    BOOT_LIVE_MOUNT_OVERRIDE_UNKNOWN = "BOOT_LIVE_MOUNT_OVERRIDE_UNKNOWN"
    IMAGE_INVALID = "IMAGE_INVALID"
    IMAGE_PLATFORM_MISMATCH = "IMAGE_PLATFORM_MISMATCH"
    IMAGE_PULL_FAILED = "IMAGE_PULL_FAILED"
    BUNDLE_TRANSFER_FAILED = "BUNDLE_TRANSFER_FAILED"
    NETWORK_POLICY_INVALID = "NETWORK_POLICY_INVALID"
    NETWORK_UNAVAILABLE = "NETWORK_UNAVAILABLE"
    SIGNAL_INVALID = "SIGNAL_INVALID"
    CONTAINER_SPEC_INVALID = "CONTAINER_SPEC_INVALID"
    CONTAINER_NOT_FOUND = "CONTAINER_NOT_FOUND"
    IMAGE_PUSH_FAILED = "IMAGE_PUSH_FAILED"
    BUILD_DOCKERFILE_INVALID = "BUILD_DOCKERFILE_INVALID"
    BUILD_INSTRUCTION_UNSUPPORTED = "BUILD_INSTRUCTION_UNSUPPORTED"
    BUILD_CONTEXT_INVALID = "BUILD_CONTEXT_INVALID"
    PORTABLE_IMAGE_INVALID = "PORTABLE_IMAGE_INVALID"
    BOOT_PORTABLE_UNSUPPORTED = "BOOT_PORTABLE_UNSUPPORTED"
    SNAPSHOT_PORTABLE_UNSUPPORTED = "SNAPSHOT_PORTABLE_UNSUPPORTED"
    SNAPSHOT_CRIU_UNAVAILABLE = "SNAPSHOT_CRIU_UNAVAILABLE"


class MachinenError(Exception):
    """An operation failed.

    ``code`` says what failed (an :class:`ErrorCode`), ``hint`` what to do,
    ``retryable`` whether trying again may succeed, and ``causes`` the
    underlying errors, outermost first.
    """

    code: ErrorCode
    hint: Optional[str]
    retryable: bool
    causes: List[str]

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        hint: Optional[str] = None,
        retryable: bool = False,
        causes: Optional[List[str]] = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.retryable = retryable
        self.causes = list(causes or [])

    def __str__(self) -> str:
        text = f"[{self.code.value}] {self.message}"
        for c in self.causes:
            text += f"\n  caused by: {c}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class BootError(MachinenError):
    """A VM could not start (``BOOT_*``)."""


class ExecError(MachinenError):
    """A command could not run, or (``check=True``) exited non-zero (``EXEC_*``)."""


class FilesError(MachinenError):
    """A guest file operation failed (``FILES_*``)."""


class SnapshotError(MachinenError):
    """A snapshot, restore or fork failed (``SNAPSHOT_*``, ``RESTORE_*``, ``FORK_*``)."""


class NetworkError(MachinenError):
    """An egress policy or network request failed (``NETWORK_*``)."""


class SecretsError(MachinenError):
    """A secret could not be set (``SECRETS_*``)."""


_FAMILIES: Dict[str, Type[MachinenError]] = {
    "BOOT": BootError,
    "EXEC": ExecError,
    "FILES": FilesError,
    "SNAPSHOT": SnapshotError,
    "RESTORE": SnapshotError,
    "FORK": SnapshotError,
    "NETWORK": NetworkError,
    "SECRETS": SecretsError,
}


def error_class(code: ErrorCode) -> Type[MachinenError]:
    """The exception class raised for ``code``."""
    return _FAMILIES.get(code.value.split("_")[0], MachinenError)


def make_error(code: str, message: str, hint: Optional[str] = None, retryable: bool = False,
               causes: Optional[List[str]] = None) -> MachinenError:
    """A :class:`MachinenError` of the right family for ``code``."""
    c = ErrorCode(code)
    return error_class(c)(c, message, hint, retryable, causes)


def from_native(e: BaseException) -> MachinenError:
    """The :class:`MachinenError` a native error carries (as JSON)."""
    try:
        d = json.loads(str(e))
        return make_error(
            d["code"], d.get("message", ""), d.get("hint"), bool(d.get("retryable")),
            [str(c) for c in d.get("causes") or []],
        )
    except (ValueError, KeyError, TypeError):
        return MachinenError(ErrorCode.IO, str(e))
