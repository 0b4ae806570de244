"""A service process keeps freed C heap for reuse (glibc) instead of faulting it in anew."""

import os
import subprocess
import sys

import pytest

from libs.heap import keep_freed_heap

# Bursts of 4 MB buffers, as a service sending a blob of KV in chunks makes: the page faults the
# third burst takes, once the first two have set the heap up.
_BURSTS = """
import resource, sys
from libs.heap import keep_freed_heap
keep_freed_heap(int(sys.argv[1]))
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [b"x" * (4 << 20) for _ in range(8)]
    del held
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[-1])
"""


def _third_burst_faults(keep_bytes: int) -> int:
    out = subprocess.run([sys.executable, "-c", _BURSTS, str(keep_bytes)], capture_output=True, text=True,
                         check=True, env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")})
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_heap_is_kept_and_reused():
    pages = (8 * (4 << 20)) // 4096
    assert _third_burst_faults(0) > pages // 2  # the C library's defaults: handed back, faulted in again
    assert _third_burst_faults(256 << 20) < pages // 20  # kept: the burst reuses the same pages


def test_off_or_left_to_glibcs_own_variables(monkeypatch):
    assert not keep_freed_heap(0)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert not keep_freed_heap(256 << 20)
