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
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    assert keep_freed_memory()
else:  # every 16-MiB block mmapped and unmapped, as glibc does before its threshold adapts
    import ctypes
    assert ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20) == 1  # M_MMAP_THRESHOLD
def step():  # like a forward pass: 16-MiB activations alive together, then all freed
    alive = [torch.empty(4 << 20).fill_(1.0) for _ in range(4)]
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_LOOP, mode], capture_output=True, text=True,
                          check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.slow
def test_freed_blocks_are_reused_without_page_faults() -> None:
    pages = 20 * 4 * (16 << 20) // 4096
    assert _faults("mmap") > pages // 2  # the count sees blocks handed back and faulted in again
    # glibc's own default lies in between and varies from run to run (20k to 327k faults here)
    assert _faults("keep") < pages // 20


_RSS_AFTER_FREEING = """
import sys, torch
from vitlab.allocator import keep_freed_memory, release_freed_memory
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
assert keep_freed_memory()
held = [torch.ones(1 << 18) for _ in range(256)]  # 256 blocks of 1 MiB, under the mmap threshold: on the heap
del held[:-1]  # all freed but the last, which pins the heap's top
before = rss_mib()
if sys.argv[1] == "release":
    assert release_freed_memory()
print(before - rss_mib())
"""


def _released_mib(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", _RSS_AFTER_FREEING, mode], capture_output=True, text=True,
                          check=True)
    return float(done.stdout.split()[-1])


def test_release_hands_freed_heap_pages_back() -> None:
    """With freed memory kept (as every vitlab command sets), only an explicit release gives it back: what the
    server does after each batch."""
    assert _released_mib("keep") < 16
    assert _released_mib("release") > 200
