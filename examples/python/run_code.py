"""An agent tool: run untrusted Python in a sandbox, one step at a time,
with a checkpoint before each step and a rollback when a step fails.

    target/pyenv/bin/python examples/python/run_code.py

The sandbox is a machinen VM; a failed step (an exception, a non-zero
exit, a timeout) rolls the sandbox back to the checkpoint taken before it,
so the next step starts from the last good state, files and memory alike.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import List, Optional

import machinen


class Sandbox:
    """A VM the agent's code runs in, checkpointed before every step."""

    def __init__(self, memory_mib: int = 512) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="sandbox-"))
        self._vm: machinen.Vm = machinen.boot(memory_mib=memory_mib)
        self._step = 0
        self._checkpoint: Optional[Path] = None
        self.log: List[str] = []

    def run_code(self, code: str, timeout: float = 30.0) -> str:
        """Run ``code`` with the guest's Python (or sh when it has none) and
        return its output; on failure roll back and say so."""
        self._step += 1
        checkpoint = self._dir / f"step-{self._step}"
        self._vm.snapshot(checkpoint, keep_alive=True)
        self._vm.write_file(f"/root/step-{self._step}.py", code)
        interpreter = "python3" if self._vm.exec("command -v python3").ok else "sh"
        try:
            r = self._vm.exec([interpreter, f"/root/step-{self._step}.py"], timeout=timeout)
            failed = not r.ok
            out = r.text + r.error_text
        except machinen.MachinenError as e:
            failed, out = True, str(e)
        if failed:
            self._vm.kill()
            self._vm = machinen.restore(checkpoint)
            self.log.append(f"step {self._step}: rolled back")
            return f"error (the sandbox was rolled back):\n{out}"
        if self._checkpoint is not None:
            shutil.rmtree(self._checkpoint, ignore_errors=True)
        self._checkpoint = checkpoint
        self.log.append(f"step {self._step}: ok")
        return out

    def close(self) -> None:
        self._vm.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    with Sandbox() as box:
        print(box.run_code("echo 'state=1' > /root/state; cat /root/state"))
        # A step that breaks things and fails: rolled back.
        print(box.run_code("rm -f /root/state; exit 1"))
        # The state is back as it was before the failed step.
        print(box.run_code("cat /root/state"))
        print("\n".join(box.log))


if __name__ == "__main__":
    main()
