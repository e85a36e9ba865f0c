"""The synchronous API: :func:`boot`, :func:`restore`, :func:`attach` and :class:`Vm`."""

from __future__ import annotations

import functools
import json
import os
import shlex
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

from . import _native
from .errors import ErrorCode, ExecError, MachinenError, from_native

T = TypeVar("T")
Command = Union[str, Sequence[str]]
OnOutput = Callable[[bytes], None]


def _native_call(f: Callable[..., T]) -> Callable[..., T]:
    """Turn the native module's errors into :class:`MachinenError`."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return f(*args, **kwargs)
        except _native.NativeError as e:
            raise from_native(e) from None

    return wrapper


def _argv(cmd: Command) -> List[str]:
    """A shell string runs under ``sh -c``; a sequence is the argv itself."""
    if isinstance(cmd, str):
        return ["sh", "-c", cmd]
    argv = [str(a) for a in cmd]
    if not argv:
        raise MachinenError(ErrorCode.BOOT_ARGS_INVALID, "no command given", "e.g. vm.exec(['ls', '/'])")
    return argv


def _env(env: Optional[Mapping[str, str]]) -> List[Tuple[str, str]]:
    return sorted((str(k), str(v)) for k, v in (env or {}).items())


def _opts(**kw: Any) -> str:
    """Options as the native module takes them: JSON, ``None``s left out."""
    return json.dumps({k: v for k, v in kw.items() if v is not None})


@dataclass(frozen=True)
class ExecResult:
    """What a command did: its exit code (128+N when killed by signal N),
    the signal, and its output."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    signal: Optional[int] = None
    argv: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether it exited 0."""
        return self.exit_code == 0

    @property
    def text(self) -> str:
        """stdout as text (UTF-8, undecodable bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")

    @property
    def error_text(self) -> str:
        """stderr as text."""
        return self.stderr.decode("utf-8", "replace")

    def check(self) -> "ExecResult":
        """Raise :class:`ExecError` (``EXEC_NONZERO_EXIT``) unless it exited 0."""
        if self.exit_code != 0:
            raise ExecError(
                ErrorCode.EXEC_NONZERO_EXIT,
                f"{shlex.join(self.argv)} exited with {self.exit_code}: {self.error_text.strip()[-500:]}",
                "the command's stderr is in the message; check=False returns the result instead",
            )
        return self


@dataclass(frozen=True)
class OutputChunk:
    """A piece of a streaming command's output (``stream`` is ``"stdout"``
    or ``"stderr"``)."""

    stream: str
    data: bytes


class ExecStream:
    """A running command (:meth:`Vm.exec_stream`): iterate for its output
    chunks; :attr:`result` once the iteration ended. Closing it (or leaving
    a ``with`` block) before the end gives the command up: the guest ends
    it."""

    def __init__(self, native: Any, argv: List[str]) -> None:
        self._n = native
        self._argv = argv
        self._stdout: List[bytes] = []
        self._stderr: List[bytes] = []
        self.result: Optional[ExecResult] = None

    def __iter__(self) -> Iterator[OutputChunk]:
        while True:
            try:
                ev = self._n.next()
            except _native.NativeError as e:
                raise from_native(e) from None
            except BaseException:
                self._n.cancel()
                raise
            if ev is None:
                return
            kind, data, code, sig = ev
            if kind == "exit":
                self.result = ExecResult(
                    int(code), b"".join(self._stdout), b"".join(self._stderr), sig, self._argv
                )
                continue
            (self._stdout if kind == "stdout" else self._stderr).append(data)
            yield OutputChunk(kind, data)

    @_native_call
    def write(self, data: Union[bytes, str]) -> None:
        """Send bytes to the command's stdin."""
        self._n.write(data.encode() if isinstance(data, str) else bytes(data))

    @_native_call
    def close_stdin(self) -> None:
        """Close the command's stdin (it sees end of file)."""
        self._n.close_stdin()

    def close(self) -> None:
        """Give the command up (the guest ends it) if it still runs."""
        self._n.cancel()

    def wait(self) -> ExecResult:
        """Read the rest of the output and return the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    def __enter__(self) -> "ExecStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PtySession:
    """A command on a terminal (:meth:`Vm.exec_pty`): :meth:`read` its
    output (stdout and stderr merged, as a terminal shows them), :meth:`write`
    keystrokes; :attr:`exit_code` once :meth:`read` returned ``None``."""

    def __init__(self, native: Any) -> None:
        self._n = native
        self.exit_code: Optional[int] = None
        self.signal: Optional[int] = None

    @property
    def pid(self) -> int:
        """The command's pid in the guest."""
        return int(self._n.pid)

    @_native_call
    def read(self) -> Optional[bytes]:
        """The next output, or ``None`` once the command exited."""
        ev = self._n.next()
        if ev is None:
            return None
        kind, data, code, sig = ev
        if kind == "exit":
            self.exit_code, self.signal = code, sig
            return None
        return bytes(data)

    def read_all(self) -> bytes:
        """Everything up to the exit."""
        out = []
        while (chunk := self.read()) is not None:
            out.append(chunk)
        return b"".join(out)

    @_native_call
    def write(self, data: Union[bytes, str]) -> None:
        """Keystrokes."""
        self._n.write(data.encode() if isinstance(data, str) else bytes(data))

    @_native_call
    def resize(self, rows: int, cols: int) -> None:
        """The terminal's new size."""
        self._n.resize(rows, cols)

    @_native_call
    def send_signal(self, signal: int) -> None:
        """Send a signal (a number, e.g. ``signal.SIGINT``) to the command."""
        self._n.signal(int(signal))

    @_native_call
    def eof(self) -> None:
        """End of input (as Ctrl-D on an empty line)."""
        self._n.eof()


class Vm:
    """A running VM. Methods may be called from several threads at once
    (each waits with the GIL released). As a context manager, the VM
    stops when the block ends, unless it was booted ``detached`` or
    :meth:`detach` was called."""

    def __init__(self, native: Any, detached: bool = False) -> None:
        self._n = native
        self._detached = detached

    def __repr__(self) -> str:
        return f"Vm(name={self.name!r}, pid={self.pid})"

    @property
    def name(self) -> str:
        """The VM's name (unique among live VMs)."""
        return str(self._n.name)

    @property
    def id(self) -> str:
        """Its registry id."""
        return str(self._n.id)

    @property
    def pid(self) -> int:
        """Its supervisor's process id (``machinen ls`` shows it)."""
        return int(self._n.pid)

    def info(self) -> Dict[str, Any]:
        """What ``machinen ls --json`` shows of it."""
        return dict(json.loads(self._n.info()))

    @_native_call
    def exec(
        self,
        cmd: Command,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        timeout: Optional[float] = None,
        on_stdout: Optional[OnOutput] = None,
        on_stderr: Optional[OnOutput] = None,
        check: bool = False,
    ) -> ExecResult:
        """Run a command to its end. ``cmd`` is an argv list, or a string
        run by ``sh -c``. With ``on_stdout``/``on_stderr`` the output is
        also handed over as it comes. ``timeout`` (seconds) ends the command
        (``EXEC_TIMEOUT``); ``check=True`` raises :class:`ExecError` on a
        non-zero exit. Ctrl-C ends the command in the guest, too."""
        argv = _argv(cmd)
        if on_stdout is None and on_stderr is None:
            code, sig, out, err = self._n.exec(argv, _env(env), cwd, user, timeout)
            r = ExecResult(int(code), bytes(out), bytes(err), sig, argv)
        else:
            with self.exec_stream(cmd, env=env, cwd=cwd, user=user, timeout=timeout) as s:
                for chunk in s:
                    cb = on_stdout if chunk.stream == "stdout" else on_stderr
                    if cb is not None:
                        cb(chunk.data)
                assert s.result is not None
                r = s.result
        return r.check() if check else r

    def exec_stream(
        self,
        cmd: Command,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> ExecStream:
        """Start a command and iterate over its output as it comes::

            with vm.exec_stream("make") as s:
                for chunk in s:
                    print(chunk.data.decode(), end="")
            print(s.result.exit_code)
        """
        argv = _argv(cmd)
        return ExecStream(self._n.exec_start(argv, _env(env), cwd, user, timeout), argv)

    @_native_call
    def exec_pty(self, cmd: Command = "bash -l -i 2>/dev/null || sh -i", *, rows: int = 24,
                 cols: int = 80, env: Optional[Mapping[str, str]] = None,
                 cwd: Optional[str] = None, user: Optional[str] = None) -> PtySession:
        """Start a command on a terminal of ``rows`` x ``cols`` (default: a
        login shell)."""
        return PtySession(self._n.exec_pty(_argv(cmd), _env(env), rows, cols, cwd, user))

    @_native_call
    def write_file(self, path: str, data: Union[bytes, str], *, mode: Optional[int] = None,
                   append: bool = False) -> int:
        """Write a guest file (absolute path; parents made; atomic unless
        ``append``). Returns the bytes written."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        return int(self._n.write_file(path, raw, mode, append))

    @_native_call
    def read_file(self, path: str) -> bytes:
        """A guest file's bytes (up to 1 GiB)."""
        return bytes(self._n.read_file(path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """A guest file as text."""
        return self.read_file(path).decode(encoding)

    @_native_call
    def push_dir(self, src: Union[str, "os.PathLike[str]"], dest: str, *,
                 exclude: Sequence[str] = ()) -> Tuple[int, int]:
        """Copy a host directory tree into the guest directory ``dest``
        (created; ``exclude``: glob patterns). Returns ``(entries, bytes)``."""
        e, b = self._n.push_dir(os.fspath(src), dest, list(exclude))
        return int(e), int(b)

    @_native_call
    def pull_dir(self, src: str, dest: Union[str, "os.PathLike[str]"], *,
                 exclude: Sequence[str] = ()) -> Tuple[int, int]:
        """Copy a guest directory tree to the host path ``dest`` (which must
        not exist; symlinks and paths stay inside it). Returns ``(entries, bytes)``."""
        e, b = self._n.pull_dir(src, os.fspath(dest), list(exclude))
        return int(e), int(b)

    @_native_call
    def snapshot(self, out_dir: Union[str, "os.PathLike[str]"], *,
                 keep_alive: Optional[bool] = None, full: bool = False,
                 timeout: Optional[float] = None, engine: Optional[str] = None,
                 pid: Optional[int] = None) -> Dict[str, Any]:
        """Freeze the VM into a bundle directory (which must not exist).
        With ``keep_alive`` (the default here for the whole-VM engine) the
        VM goes on afterwards; otherwise it stops once the bundle is
        complete. A VM with a checkpoint writes a delta over it unless
        ``full``. ``engine="criu"`` (default: ``$MACHINEN_SNAPSHOT_ENGINE``,
        else ``"vmstate"``) writes the VM's process tree (the main command,
        or ``pid``'s) and disk instead, which ``restore`` resumes in a fresh
        VM of the same image; it stops the VM unless ``keep_alive=True``
        (the tree is then restored in place)."""
        engine = engine or os.environ.get("MACHINEN_SNAPSHOT_ENGINE") or "vmstate"
        if engine == "portable":
            raise MachinenError(ErrorCode.SNAPSHOT_PORTABLE_UNSUPPORTED,
                                "the portable engine captures one process: use capture_process")
        if engine not in ("vmstate", "criu"):
            raise ValueError(f"engine {engine!r} is not 'vmstate' or 'criu'")
        if pid is not None and (engine != "criu" or isinstance(pid, bool)
                                or not isinstance(pid, int) or pid < 1):
            raise ValueError("pid names the process tree of a criu snapshot (a positive int)")
        if engine == "criu":
            if full:
                raise ValueError("full is for vmstate snapshots: a criu bundle is self-contained")
            keep = bool(keep_alive) if keep_alive is not None else False
            return dict(json.loads(self._n.snapshot_criu(os.fspath(out_dir), keep, pid, timeout)))
        keep = True if keep_alive is None else bool(keep_alive)
        return dict(json.loads(self._n.snapshot(os.fspath(out_dir), keep, full, timeout)))

    @_native_call
    def fork(self, *, name: Optional[str] = None, out_dir: Optional[str] = None,
             detached: bool = False, tcp_keep: bool = False, own_ram: bool = False,
             ports: Optional[Sequence[str]] = None,
             net_policy: Optional[Mapping[str, Any]] = None,
             egress_secrets: Optional[Sequence[Mapping[str, Any]]] = None) -> "Vm":
        """A sibling VM that shares this one's past; this one keeps running."""
        n = self._n.fork(_opts(name=name, out_dir=out_dir, detached=detached, tcp_keep=tcp_keep,
                               own_ram=own_ram, ports=list(ports or []),
                               net_policy=dict(net_policy) if net_policy else None,
                               egress_secrets=[dict(e) for e in egress_secrets or []]))
        return Vm(n, detached)

    @_native_call
    def stop(self, *, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Power the guest off (killed after ``timeout`` seconds)."""
        return dict(json.loads(self._n.kill(False, timeout)))

    @_native_call
    def kill(self) -> Dict[str, Any]:
        """Stop the VM at once."""
        return dict(json.loads(self._n.kill(True, None)))

    @_native_call
    def detach(self) -> None:
        """Let the VM outlive this process (and this object's ``with``)."""
        self._n.detach()
        self._detached = True

    @_native_call
    def wait(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Wait for the VM's main command to end (or the VM to stop)."""
        return dict(json.loads(self._n.wait(timeout)))

    @_native_call
    def capture_process(self, pid: int, out: Union[str, "os.PathLike[str]"], *,
                        kill: bool = False, max_bytes: Optional[int] = None) -> Dict[str, Any]:
        """Capture process ``pid`` of the guest as a native process image in
        the new directory ``out`` (``machinen capture``): ``dir``, ``pid``,
        ``threads``, ``mappings``, ``memory_bytes``, ``killed`` and ``plan``
        (how this host would restore it: ``steps``, or ``refusals`` with the
        image vocabulary's codes). The process goes on unless ``kill``."""
        return dict(json.loads(self._n.capture_process(pid, os.fspath(out), kill, max_bytes)))

    @_native_call
    def criu(self, args: List[str]) -> Dict[str, Any]:
        """Run CRIU in the guest (``machinen criu``; needs ``machinen install
        --criu``), e.g. ``["dump", "-t", "214", "-D", "/var/tmp/ck"]``:
        ``exit_code``, ``stdout``, ``stderr``. CRIU's failures are its exit
        code; ``SNAPSHOT_CRIU_UNAVAILABLE`` when CRIU is not installed."""
        if isinstance(args, str) or not all(isinstance(a, str) for a in args) or not args:
            raise TypeError("criu needs CRIU's arguments as a list of strings")
        return dict(json.loads(self._n.criu(list(args))))

    @_native_call
    def memory_stats(self) -> Dict[str, Any]:
        """Its memory: ceiling, the guest's view, the host's cost, traffic."""
        return dict(json.loads(self._n.memory_stats()))

    @_native_call
    def balloon(self) -> Dict[str, Any]:
        """Its balloon: the ceiling, the target, what the guest can use now."""
        return dict(json.loads(self._n.balloon()))

    @_native_call
    def set_balloon(self, target_bytes: int, *, wait: Optional[float] = None) -> Dict[str, Any]:
        """Let the guest use ``target_bytes`` of its memory ceiling (the
        ceiling: all of it); the rest goes back to the host. Waits up to
        ``wait`` seconds (default: a bounded while) for the guest to get there."""
        return dict(json.loads(self._n.set_balloon(int(target_bytes), wait)))

    @_native_call
    def network(self) -> Dict[str, Any]:
        """Its egress policy and traffic counters."""
        return dict(json.loads(self._n.network()))

    @_native_call
    def set_network(self, *, allow: Sequence[str] = (), deny: Sequence[str] = (),
                    remove: Sequence[str] = (), egress: Optional[str] = None,
                    clear: bool = False) -> Dict[str, Any]:
        """Change its egress policy (from the next packet on)."""
        change = _opts(allow=list(allow), deny=list(deny), remove=list(remove), egress=egress,
                       clear=clear)
        return dict(json.loads(self._n.set_network(change)))

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._detached:
            try:
                self._n.kill(True, None)
            except _native.NativeError:
                pass


def _boot_opts(kw: Dict[str, Any]) -> str:
    if isinstance(kw.get("cmd"), str):
        kw["cmd"] = ["sh", "-c", kw["cmd"]]
    for k in ("ports", "cmd"):
        if kw.get(k) is not None:
            kw[k] = [str(x) for x in kw[k]]
    for k in ("env", "secrets"):
        if kw.get(k) is not None:
            kw[k] = {str(a): str(b) for a, b in kw[k].items()}
    if kw.get("egress_secrets") is not None:
        kw["egress_secrets"] = [
            {"name": e["name"], "hosts": [e["hosts"]] if isinstance(e["hosts"], str) else list(e["hosts"]),
             "value": e["value"]}
            for e in kw["egress_secrets"]
        ]
    return _opts(**kw)


@_native_call
def boot(
    image: Optional[str] = None,
    *,
    name: Optional[str] = None,
    hostname: Optional[str] = None,
    memory_mib: Optional[int] = None,
    cpus: Optional[int] = None,
    cpu_model: Optional[str] = None,
    network: Optional[str] = None,
    detached: bool = False,
    boot_timeout: Optional[float] = None,
    ports: Optional[Sequence[str]] = None,
    secrets: Optional[Mapping[str, str]] = None,
    cmd: Optional[Command] = None,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
    user: Optional[str] = None,
    keep_alive_on_exit: bool = False,
    disk_size: Optional[str] = None,
    net_policy: Optional[Mapping[str, Any]] = None,
    egress_secrets: Optional[Sequence[Mapping[str, Any]]] = None,
    mounts: Optional[Sequence[str]] = None,
    live_mounts: Optional[Sequence[str]] = None,
) -> Vm:
    """Boot a VM from a rootfs tarball (default: the installed Debian base)
    and return once its agent answers. ``cmd`` makes it a service VM (its
    output in ``machinen logs``); ``detached`` lets it outlive this process.
    ``mounts`` (``"HOST_DIR:GUEST_PATH"``) copies host directories in;
    ``live_mounts`` (``"HOST_DIR:GUEST_PATH[:ro|rw]"``) shares them.
    The options are the CLI's ``boot`` flags (see ``machinen boot --help``)."""
    opts = _boot_opts(dict(
        image=image, name=name, hostname=hostname, memory_mib=memory_mib, cpus=cpus,
        cpu_model=cpu_model, network=network,
        detached=detached, boot_timeout=boot_timeout, ports=ports, secrets=secrets,
        cmd=cmd, env=env, cwd=cwd, user=user, keep_alive_on_exit=keep_alive_on_exit,
        disk_size=disk_size, net_policy=dict(net_policy) if net_policy else None,
        egress_secrets=egress_secrets,
        mounts=[str(m) for m in mounts] if mounts else None,
        live_mounts=[str(m) for m in live_mounts] if live_mounts else None,
    ))
    return Vm(_native.boot(opts), detached)


@_native_call
def restore(
    bundle: Union[str, "os.PathLike[str]"],
    *,
    name: Optional[str] = None,
    detached: bool = False,
    ports: Optional[Sequence[str]] = None,
    boot_timeout: Optional[float] = None,
    reset_tcp: bool = False,
    own_ram: bool = False,
    net_policy: Optional[Mapping[str, Any]] = None,
    egress_secrets: Optional[Sequence[Mapping[str, Any]]] = None,
    memory_mib: Optional[int] = None,
    cpus: Optional[int] = None,
    cpu_model: Optional[str] = None,
) -> Vm:
    """Resume a snapshot bundle (a directory, or a registry reference)
    where it was frozen. A CRIU bundle (``snapshot(engine="criu")``) is
    resumed in a fresh VM of its image, with ``memory_mib``, ``cpus`` and
    ``cpu_model`` if given (a whole-VM bundle refuses them)."""
    opts = _boot_opts(dict(
        bundle=os.fspath(bundle), name=name, detached=detached, ports=ports,
        boot_timeout=boot_timeout, reset_tcp=reset_tcp, own_ram=own_ram,
        net_policy=dict(net_policy) if net_policy else None, egress_secrets=egress_secrets,
        memory_mib=memory_mib, cpus=cpus, cpu_model=cpu_model,
    ))
    return Vm(_native.restore(opts), detached)


@_native_call
def provision(
    out: Union[str, "os.PathLike[str]"],
    *,
    base: Optional[str] = None,
    run: Sequence[str] = (),
    cmd: Optional[Command] = None,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
    memory_mib: Optional[int] = None,
    network: Optional[str] = None,
) -> Dict[str, Any]:
    """Bake an image (a rootfs tarball) at ``out``: boot ``base`` (default:
    the installed Debian base; a baked image layers), run each ``run`` step
    with ``sh -c`` (a failing step is ``PROVISION_STEP_FAILED`` with its
    stderr), and bake ``cmd``, ``env`` and ``cwd`` in. ``boot(out)`` then
    runs the baked command. Returns what was written (path, sha256, sizes,
    config)."""
    opts = _boot_opts(dict(
        out=os.fspath(out), base=base, run=[str(s) for s in run], cmd=cmd, env=env, cwd=cwd,
        memory_mib=memory_mib, network=network,
    ))
    return dict(json.loads(_native.provision(opts)))


@_native_call
def build(
    context: Union[str, "os.PathLike[str]"] = ".",
    *,
    out: Union[str, "os.PathLike[str]"],
    dockerfile: Optional[Union[str, "os.PathLike[str]"]] = None,
    build_args: Optional[Mapping[str, str]] = None,
    no_cache: bool = False,
    memory_mib: Optional[int] = None,
    network: Optional[str] = None,
) -> Dict[str, Any]:
    """Bake the Dockerfile in ``context`` (or ``dockerfile``) into a rootfs
    tarball at ``out``, as ``machinen build`` does: every RUN, COPY, ADD and
    WORKDIR runs in one real VM; the image's settings come from CMD,
    ENTRYPOINT, ENV, WORKDIR, USER, EXPOSE and LABEL. Unchanged inputs come
    from the build cache (``"cached": True``) unless ``no_cache``. Raises
    ``BUILD_*`` codes naming the Dockerfile line, ``PROVISION_STEP_FAILED``
    for a failing RUN. Returns the result as ``machinen build --json``
    prints it."""
    opts = json.dumps(dict(
        context=os.fspath(context), out=os.fspath(out),
        dockerfile=None if dockerfile is None else os.fspath(dockerfile),
        build_args={str(k): str(v) for k, v in (build_args or {}).items()},
        no_cache=no_cache, memory_mib=memory_mib, network=network,
    ))
    return dict(json.loads(_native.build(opts)))


@_native_call
def check_process_image(dir: Union[str, "os.PathLike[str]"], *,
                        target_arch: Optional[str] = None) -> Dict[str, Any]:
    """How this host (or ``target_arch``: ``"arm64"``, ``"amd64"``) would
    restore the native process image in ``dir``: ``steps``, or ``refusals``
    (``machinen image check --json``). Raises ``MachinenError`` with
    ``PORTABLE_IMAGE_INVALID`` for documents that are missing, malformed or
    inconsistent."""
    return dict(json.loads(_native.check_process_image(os.fspath(dir), target_arch)))


@_native_call
def inspect_image(image: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]:
    """An image's settings (command, entrypoint, env, cwd, user, exposed
    ports, labels) and where it came from, as ``machinen images inspect
    --json`` prints them."""
    return dict(json.loads(_native.inspect_image(os.fspath(image))))


@_native_call
def push_image(image: Union[str, "os.PathLike[str]"], reference: str) -> Dict[str, Any]:
    """Push ``image`` to a registry as a container image
    (``HOST[:PORT]/REPO[:TAG]``); ``IMAGE_PUSH_FAILED`` when it cannot."""
    return dict(json.loads(_native.push_image(os.fspath(image), reference)))


@_native_call
def attach(target: Union[str, int]) -> Vm:
    """A live VM by name or supervisor pid, started by anyone (CLI, Node,
    another Python process). Leaving its ``with`` block does not stop it."""
    return Vm(_native.attach(str(target)), True)


@_native_call
def list_vms(all: bool = False) -> List[Dict[str, Any]]:
    """Live VMs as ``machinen ls --json`` shows them (``all``: also those
    that ended without being stopped, until :func:`gc`)."""
    return list(json.loads(_native.list_vms(all)))


@_native_call
def gc(dry_run: bool = False) -> Dict[str, Any]:
    """Clean up after VMs that crashed or whose supervisor died."""
    return dict(json.loads(_native.gc(dry_run)))
