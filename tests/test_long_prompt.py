"""A prompt that runs longer than its task's ack wait stays in progress: JetStream does not hand
the task out again while the prefill instance works on it, and it runs once."""

import asyncio

import nats
import pytest

from conftest import start_cluster
from helpers import log_events, post, wait_until
from libs.engine.costs import CostProfile
from libs.protocol import Subjects

ACK_WAIT = 1.0
PREFILL_SECONDS = 3.5  # the simulated engine's time for any prompt: three and a half ack waits


@pytest.fixture
def slow_prefill_cluster(tiny_dir, tmp_path):
    profile = CostProfile(model="slow", threads=1, prefill=(PREFILL_SECONDS, 0.0, 0.0), decode=(0.001, 0.0, 0.0))
    path = profile.save(tmp_path / "slow.json")
    cluster = start_cluster(tiny_dir, tmp_path / "data", engine="sim", calibration=str(path),
                            task_ack_wait=ACK_WAIT, admission="none")
    yield cluster
    cluster.stop()


async def test_a_prompt_longer_than_the_ack_wait_runs_once(slow_prefill_cluster, tiny_dir):
    cluster = slow_prefill_cluster
    send = asyncio.ensure_future(post(cluster.url + "/v1/completions",
                                      {"model": tiny_dir.name, "prompt": list(range(500, 540)), "max_tokens": 2}))
    log = cluster.log_dir / "prefill-0.log"
    admin = await nats.connect(cluster.nats.url)
    try:
        js = admin.jetstream()

        async def taken():
            info = await js.consumer_info(Subjects.PREFILL_STREAM, "prefill-0")
            return info.num_ack_pending == 1

        assert await wait_until(taken, timeout=30)  # the prefill instance holds the task
        await asyncio.sleep(2 * ACK_WAIT)  # its ack wait has passed twice since
        # another puller on the same consumer (a second process under the same id) gets nothing:
        # the task is still in progress, not waiting for redelivery
        thief = await js.pull_subscribe(Subjects.prefill_task("prefill-0"), durable="prefill-0",
                                        stream=Subjects.PREFILL_STREAM)
        with pytest.raises((nats.errors.TimeoutError, asyncio.TimeoutError)):
            await thief.fetch(1, timeout=ACK_WAIT)
        status, body, _ = await send
        assert status == 200, body
        info = await js.consumer_info(Subjects.PREFILL_STREAM, "prefill-0")
        assert info.delivered.consumer_seq == 1 and info.num_redelivered == 0 and info.num_ack_pending == 0
    finally:
        await admin.close()
    runs = log_events(log, "prefilled")
    assert len(runs) == 1 and runs[0]["compute_s"] >= PREFILL_SECONDS
