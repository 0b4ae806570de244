"""Faults: an instance killed with SIGKILL costs time, not accepted requests."""

import asyncio
import signal

import pytest

from conftest import reference_greedy, start_cluster
from helpers import post

pytestmark = pytest.mark.slow


async def test_kill_one_of_two_prefill_instances_under_load(tiny_dir, tiny_model, tmp_path):
    model, tok = tiny_model
    cluster = start_cluster(tiny_dir, tmp_path / "c", prefill=2, policy="least_loaded")
    try:
        prompts = [[(31 * r + 7 * i) % 40000 + 50 for i in range(600 + 13 * r)] for r in range(50)]

        async def one(p):
            return await post(cluster.url + "/v1/completions",
                              {"model": tiny_dir.name, "prompt": p, "max_tokens": 12, "temperature": 0},
                              timeout=120)

        tasks = [asyncio.create_task(one(p)) for p in prompts]
        await asyncio.sleep(0.5)  # requests are queued on both prefill instances by now
        await asyncio.to_thread(cluster.kill, "prefill-1", signal.SIGKILL)
        results = await asyncio.gather(*tasks)
        assert [status for status, _, _ in results] == [200] * 50, [b for s, b, _ in results if s != 200][:3]
        for p, (_, body, _) in list(zip(prompts, results))[::10]:
            ref = reference_greedy(model, p, 12)
            assert body["choices"][0]["text"] == tok.decode(ref, skip_special_tokens=True,
                                                            clean_up_tokenization_spaces=False)
    finally:
        cluster.stop()
