"""Shared fixtures: one VM for the checks that do not interfere (booting
costs seconds under TCG), each in a registry of the test run's own."""

from __future__ import annotations

import os
import tempfile
from typing import Iterator

import pytest

# A registry of our own before the package is imported, so nothing here
# sees or touches other VMs of the machine.
_REGISTRY = tempfile.mkdtemp(prefix="mnpy-", dir="/tmp")
os.environ.setdefault("MACHINEN_REGISTRY_DIR", _REGISTRY)

import machinen  # noqa: E402


@pytest.fixture(scope="session")
def vm() -> Iterator[machinen.Vm]:
    with machinen.boot(name="py-shared", memory_mib=256) as v:
        yield v


def pytest_sessionfinish(session: object, exitstatus: int) -> None:
    # Never leave VMs behind, whatever a test did.
    for v in machinen.list_vms():
        try:
            machinen.attach(v["name"]).kill()
        except machinen.MachinenError:
            pass
    machinen.gc()
