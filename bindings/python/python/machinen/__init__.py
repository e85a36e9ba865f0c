"""machinen: Linux microVMs that can be frozen, moved and forked, from Python.

    import machinen

    with machinen.boot(memory_mib=512) as vm:
        print(vm.exec("uname -a").text)
        vm.snapshot("./snap")          # the VM goes on
    again = machinen.restore("./snap")  # resumes where it was frozen

Every VM is the same as one started by the ``machinen`` CLI (``machinen
ls`` lists it, ``attach`` reaches one started by the CLI or Node). Errors
are :class:`MachinenError` with a stable :class:`ErrorCode`. The asyncio
twin: :func:`boot_async` and :class:`AsyncVm`.
"""

from __future__ import annotations

import os as _os

from . import _native
from ._aio import AsyncExecStream, AsyncVm, attach_async, boot_async, restore_async
from ._vm import (
    ExecResult,
    ExecStream,
    OutputChunk,
    PtySession,
    Vm,
    attach,
    boot,
    build,
    gc,
    inspect_image,
    check_process_image,
    list_vms,
    provision,
    push_image,
    restore,
)
from .errors import (
    BootError,
    ErrorCode,
    ExecError,
    FilesError,
    MachinenError,
    NetworkError,
    SecretsError,
    SnapshotError,
)

__version__: str = _native.version()

# The wheel carries the supervisor and the guest agent next to this file.
_bin = _os.path.join(_os.path.dirname(__file__), "bin")
if _os.path.isdir(_bin):
    _native.set_bin_dir(_bin)

__all__ = [
    "AsyncExecStream",
    "AsyncVm",
    "BootError",
    "ErrorCode",
    "ExecError",
    "ExecResult",
    "ExecStream",
    "FilesError",
    "MachinenError",
    "NetworkError",
    "OutputChunk",
    "PtySession",
    "SecretsError",
    "SnapshotError",
    "Vm",
    "attach",
    "attach_async",
    "boot",
    "boot_async",
    "build",
    "gc",
    "inspect_image",
    "check_process_image",
    "list_vms",
    "provision",
    "push_image",
    "restore",
    "restore_async",
]
