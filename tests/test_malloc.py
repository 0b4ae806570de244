"""A block cache that keeps some blocks and drops others must not grow the process beyond its
capacity (glibc's sliding mmap threshold otherwise leaves the heap full of holes)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from yuebing.libs.proc import fix_mmap_threshold

CHURN = textwrap.dedent("""
    import random, sys
    from collections import OrderedDict
    import torch
    from yuebing.libs.proc import fix_mmap_threshold
    if sys.argv[1] == "fixed":
        assert fix_mmap_threshold()
    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
    cap, used, cache, rng = 96 << 20, 0, OrderedDict(), random.Random(0)
    base = rss_mb()
    for i in range(150):  # prompts' KV (1-20 MB, freed after) cut into 0.7 MB blocks, kept LRU
        kv = torch.ones(30, 2, 3, rng.choice([28, 100, 300, 700, 1200, 2500]), 64, dtype=torch.float16)
        for b in range(kv.shape[3] // 16):
            cache[(i, b)] = kv[:, :, :, b * 16:(b + 1) * 16].clone()
            used += cache[(i, b)].nbytes
            while used > cap:
                used -= cache.popitem(last=False)[1].nbytes
        del kv
    print(rss_mb() - base, used >> 20)
""")


def _growth(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, timeout=120, check=True)
    grown, held = map(int, out.stdout.split())
    return grown, held


@pytest.mark.skipif(not sys.platform.startswith("linux") or not fix_mmap_threshold(), reason="glibc only")
def test_a_churning_block_cache_stays_near_its_capacity_with_the_threshold_fixed():
    grown, held = _growth("fixed")
    assert held >= 90
    assert grown <= 1.25 * held, f"the process grew {grown} MB for {held} MB of blocks"
