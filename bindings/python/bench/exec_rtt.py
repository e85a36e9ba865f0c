"""Exec round-trip from Python (sync and asyncio) next to the Rust library,
in one run: medians and ratios.

    target/pyenv/bin/python bindings/python/bench/exec_rtt.py [REPS]

The Rust figure is the benchmark's own `exec.latency_ms` (the library's
`Vm::exec` of `true` on a VM of its own), run by this script after the
Python measurements (build it first: `cargo build --release -p machinen-bench`).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import machinen

ROOT = Path(__file__).resolve().parents[3]


def sync_rtts(vm: machinen.Vm, reps: int) -> List[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        vm.exec(["true"], check=True)
        out.append((time.perf_counter() - t) * 1000)
    return out


def async_rtts(vm: machinen.Vm, reps: int) -> List[float]:
    async def main() -> List[float]:
        a = await machinen.attach_async(vm.name)
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            await a.exec(["true"], check=True)
            out.append((time.perf_counter() - t) * 1000)
        return out

    return asyncio.run(main())


def rust_median(reps: int) -> float:
    bench = ROOT / "target" / "release" / "machinen-bench"
    subprocess.run([str(bench), "--only", "exec", "--reps", str(reps), "--runs", "1"],
                   check=True, stdout=subprocess.DEVNULL)
    report = json.loads((ROOT / "target" / "bench" / "bench.json").read_text())
    for row in report["rows"]:
        if row["key"] == "exec.latency_ms":
            return float(row["median"])
    raise SystemExit("no exec.latency_ms in bench.json")


def main() -> None:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    with machinen.boot(memory_mib=256) as vm:
        sync_rtts(vm, 5)  # warm-up
        s = statistics.median(sync_rtts(vm, reps))
        a = statistics.median(async_rtts(vm, reps))
    r = rust_median(reps)
    print(f"exec round-trip of `true`, median of {reps}:")
    print(f"  Rust library  {r:8.2f} ms")
    print(f"  Python sync   {s:8.2f} ms  ({s / r:.2f}x)")
    print(f"  Python async  {a:8.2f} ms  ({a / r:.2f}x)")
    wheels = sorted((ROOT / "target" / "wheels").glob("machinen-*.whl"))
    if wheels:
        print(f"wheel: {wheels[-1].name}, {os.path.getsize(wheels[-1]) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
