"""The asyncio API: :func:`boot_async`, :func:`restore_async`,
:func:`attach_async` and :class:`AsyncVm`.

Every operation runs the synchronous one on a worker thread
(``asyncio.to_thread``), which waits with the GIL released: the event loop
never blocks, and many operations run at once.
"""

from __future__ import annotations

import asyncio
import functools
import os
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, TypeVar, Union

from . import _vm
from ._vm import Command, ExecResult, OutputChunk, Vm

T = TypeVar("T")


async def _thread(f: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.to_thread(functools.partial(f, *args, **kwargs))


class AsyncExecStream:
    """A running command (:meth:`AsyncVm.exec_stream`): ``async for`` over
    its output; :attr:`result` once that ended."""

    def __init__(self, stream: _vm.ExecStream) -> None:
        self._s = stream
        self._it = iter(stream)

    @property
    def result(self) -> Optional[ExecResult]:
        """The command's result, once the iteration ended."""
        return self._s.result

    def __aiter__(self) -> AsyncIterator[OutputChunk]:
        return self

    async def __anext__(self) -> OutputChunk:
        def step() -> Optional[OutputChunk]:
            return next(self._it, None)

        try:
            chunk = await asyncio.to_thread(step)
        except asyncio.CancelledError:
            self._s.close()
            raise
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def write(self, data: bytes) -> None:
        """Send bytes to the command's stdin."""
        await _thread(self._s.write, data)

    async def close_stdin(self) -> None:
        """Close the command's stdin."""
        await _thread(self._s.close_stdin)

    def close(self) -> None:
        """Give the command up (the guest ends it)."""
        self._s.close()

    async def __aenter__(self) -> "AsyncExecStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()


class AsyncVm:
    """:class:`Vm` for asyncio: the same methods, awaited. ``async with``
    stops the VM at the end unless it was booted ``detached``."""

    def __init__(self, vm: Vm) -> None:
        self.sync = vm
        """The synchronous handle of the same VM."""

    def __repr__(self) -> str:
        return f"AsyncVm(name={self.name!r}, pid={self.pid})"

    @property
    def name(self) -> str:
        """The VM's name."""
        return self.sync.name

    @property
    def pid(self) -> int:
        """Its supervisor's process id."""
        return self.sync.pid

    async def exec(self, cmd: Command, **kw: Any) -> ExecResult:
        """See :meth:`Vm.exec`. Cancelling the task ends the command in the
        guest."""
        s = self.sync.exec_stream(cmd, **{k: v for k, v in kw.items()
                                          if k in ("env", "cwd", "user", "timeout")})
        on_stdout = kw.get("on_stdout")
        on_stderr = kw.get("on_stderr")
        stream = AsyncExecStream(s)
        try:
            async for chunk in stream:
                cb = on_stdout if chunk.stream == "stdout" else on_stderr
                if cb is not None:
                    cb(chunk.data)
        finally:
            stream.close()
        assert stream.result is not None
        return stream.result.check() if kw.get("check") else stream.result

    def exec_stream(self, cmd: Command, **kw: Any) -> AsyncExecStream:
        """See :meth:`Vm.exec_stream`."""
        return AsyncExecStream(self.sync.exec_stream(cmd, **kw))

    async def write_file(self, path: str, data: Any, **kw: Any) -> int:
        """See :meth:`Vm.write_file`."""
        return await _thread(self.sync.write_file, path, data, **kw)

    async def read_file(self, path: str) -> bytes:
        """See :meth:`Vm.read_file`."""
        return await _thread(self.sync.read_file, path)

    async def push_dir(self, src: Any, dest: str, **kw: Any) -> Any:
        """See :meth:`Vm.push_dir`."""
        return await _thread(self.sync.push_dir, src, dest, **kw)

    async def pull_dir(self, src: str, dest: Any, **kw: Any) -> Any:
        """See :meth:`Vm.pull_dir`."""
        return await _thread(self.sync.pull_dir, src, dest, **kw)

    async def snapshot(self, out_dir: Any, **kw: Any) -> Dict[str, Any]:
        """See :meth:`Vm.snapshot`."""
        return await _thread(self.sync.snapshot, out_dir, **kw)

    async def fork(self, **kw: Any) -> "AsyncVm":
        """See :meth:`Vm.fork`."""
        return AsyncVm(await _thread(self.sync.fork, **kw))

    async def stop(self, **kw: Any) -> Dict[str, Any]:
        """See :meth:`Vm.stop`."""
        return await _thread(self.sync.stop, **kw)

    async def kill(self) -> Dict[str, Any]:
        """See :meth:`Vm.kill`."""
        return await _thread(self.sync.kill)

    async def detach(self) -> None:
        """See :meth:`Vm.detach`."""
        await _thread(self.sync.detach)

    async def wait(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """See :meth:`Vm.wait`."""
        return await _thread(self.sync.wait, timeout)

    async def capture_process(self, pid: int, out: Union[str, "os.PathLike[str]"], *,
                              kill: bool = False, max_bytes: Optional[int] = None) -> Dict[str, Any]:
        """See :meth:`Vm.capture_process`."""
        return await _thread(self.sync.capture_process, pid, out, kill=kill, max_bytes=max_bytes)

    async def criu(self, args: List[str]) -> Dict[str, Any]:
        """See :meth:`Vm.criu`."""
        return await _thread(self.sync.criu, args)

    async def memory_stats(self) -> Dict[str, Any]:
        """See :meth:`Vm.memory_stats`."""
        return await _thread(self.sync.memory_stats)

    async def balloon(self) -> Dict[str, Any]:
        """See :meth:`Vm.balloon`."""
        return await _thread(self.sync.balloon)

    async def set_balloon(self, target_bytes: int, **kw: Any) -> Dict[str, Any]:
        """See :meth:`Vm.set_balloon`."""
        return await _thread(self.sync.set_balloon, target_bytes, **kw)

    async def network(self) -> Dict[str, Any]:
        """See :meth:`Vm.network`."""
        return await _thread(self.sync.network)

    async def set_network(self, **kw: Any) -> Dict[str, Any]:
        """See :meth:`Vm.set_network`."""
        return await _thread(self.sync.set_network, **kw)

    async def __aenter__(self) -> "AsyncVm":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await _thread(self.sync.__exit__, *exc)


async def boot_async(image: Optional[str] = None, **kw: Any) -> AsyncVm:
    """:func:`machinen.boot`, awaited."""
    return AsyncVm(await _thread(_vm.boot, image, **kw))


async def restore_async(bundle: Any, **kw: Any) -> AsyncVm:
    """:func:`machinen.restore`, awaited."""
    return AsyncVm(await _thread(_vm.restore, bundle, **kw))


async def attach_async(target: Any) -> AsyncVm:
    """:func:`machinen.attach`, awaited."""
    return AsyncVm(await _thread(_vm.attach, target))
