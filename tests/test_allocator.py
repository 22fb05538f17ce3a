"""vitlab.allocator: freed activations stay mapped, so a loop stops page-faulting them in again every step."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

_FAULTS_OF_A_LOOP = """
import resource, sys, torch
from vitlab.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():  # like a forward pass: 16-MiB activations alive together, then all freed
    alive = [torch.empty(4 << 20).fill_(1.0) for _ in range(4)]
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_LOOP, mode], capture_output=True, text=True,
                          check=True)
    return int(done.stdout.split()[-1])


def test_freed_blocks_are_reused_without_page_faults() -> None:
    pages = 10 * 4 * (16 << 20) // 4096
    assert _faults("default") > pages // 10  # glibc hands the freed blocks back, faults them in again
    assert _faults("keep") < pages // 20
