"""An agent tool: run untrusted code in a sandbox, one step at a time,
each step in a fork of the last good state, so a failed step is dropped
with everything it did.

    target/pyenv/bin/python examples/python/run_code.py

The sandbox is a machinen VM. Before each step it is forked: the fork (a
sibling sharing the sandbox's past, memory and files alike) runs the step.
A step that succeeds makes its fork the sandbox; a failed one (an error,
a non-zero exit, a timeout) is thrown away with its fork, and the next step
starts from the state before it. Boot an image with Python in it
(``Sandbox(image=...)``) to run Python steps; the Debian base runs shell.
"""

from __future__ import annotations

from typing import List, Optional

import machinen


class Sandbox:
    """A VM the agent's code runs in, forked before every step."""

    def __init__(self, image: Optional[str] = None, memory_mib: int = 512) -> None:
        self._vm: machinen.Vm = machinen.boot(image, memory_mib=memory_mib)
        self._step = 0
        self.log: List[str] = []

    def run_code(self, code: str, timeout: float = 30.0) -> str:
        """Run ``code`` (with ``python3`` when the sandbox has it, else
        ``sh``) and return its output; on failure drop the step and say so."""
        self._step += 1
        # The checkpoint: a sibling with the sandbox's whole state, and RAM
        # of its own, so it can be forked again as cheaply.
        trial = self._vm.fork(name=f"{self._vm.name}-step{self._step}", own_ram=True)
        path = f"/root/step-{self._step}"
        trial.write_file(path, code)
        interpreter = "python3" if trial.exec("command -v python3").ok else "sh"
        try:
            r = trial.exec([interpreter, path], timeout=timeout)
            failed = not r.ok
            out = r.text + r.error_text
        except machinen.MachinenError as e:
            failed, out = True, str(e)
        if failed:
            trial.kill()
            self.log.append(f"step {self._step}: rolled back")
            return f"error (the sandbox was rolled back):\n{out}"
        self._vm.kill()
        self._vm = trial
        self.log.append(f"step {self._step}: ok")
        return out

    def close(self) -> None:
        self._vm.kill()

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
