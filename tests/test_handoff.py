"""The KV hand-off while the prompt runs: layers become sendable as the model computes them, the
stream sends exactly the chunks whose layers are final (over a real nats-server), and both
engines mark their layers computed."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from libs.bus import BlobAssembler, TransferError, connect
from libs.engine.prefill_kv import PrefillKV
from libs.protocol import Chunk, decode
from services.prefill.handoff import stream_kv

LAYERS, HEADS, POSITIONS, DIM = 4, 1, 64, 32
LAYER_BYTES = 2 * HEADS * POSITIONS * DIM * 4  # float32: 16 KiB
CHUNK = 4096  # four chunks a layer


def test_layers_are_sendable_once_computed_over_a_verified_past():
    kv = torch.zeros(LAYERS, 2, HEADS, POSITIONS, DIM)
    changes = []
    cold = PrefillKV(kv, past_len=0)
    cold.watch(lambda: changes.append(cold.sendable_layers()))
    cold.layer_computed(0)
    cold.layer_computed(1)
    assert cold.sendable_layers() == 2 and changes == [0, 1, 2]

    # a pool past still arriving: nothing leaves until every layer's past is in and checked
    warm = PrefillKV(kv, past_len=16, ready=False)
    for i in range(LAYERS):
        warm.layer_computed(i)
    warm.layer_ready(LAYERS - 1)
    assert warm.sendable_layers() == 0
    warm.layer_ready(LAYERS)
    assert warm.sendable_layers() == LAYERS

    failed = PrefillKV(kv, past_len=16, ready=False)
    failed.layer_computed(0)
    failed.fail("pool load failed")
    assert failed.sendable_layers() == 0


async def _wait_for(cond, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_the_stream_sends_the_chunks_of_computed_layers_and_the_rest_as_they_finish(nats_server):
    nc = await connect(nats_server.url, "test-handoff")
    got: dict[str, bytes] = {}
    seen: list[tuple[str, int]] = []
    asm = BlobAssembler(nc, lambda tid, meta, data: got.__setitem__(tid, bytes(data)))

    async def handle(msg):
        c = decode(msg.data, Chunk)
        seen.append((c.transfer_id, c.index))
        await asm.handle(msg)

    sub = await nc.subscribe("test.kv", cb=handle)
    try:
        kv = torch.zeros(LAYERS, 2, HEADS, POSITIONS, DIM)
        final = torch.randn(LAYERS, 2, HEADS, POSITIONS, DIM)
        buf = PrefillKV(kv, past_len=0)
        send = asyncio.ensure_future(stream_kv(nc, "test.kv", "cold", buf, b"meta", chunk_bytes=CHUNK))
        await asyncio.sleep(0.2)
        assert seen == []  # nothing is computed yet

        def compute(layer: int) -> None:  # on another thread, as the model thread does it
            kv[layer] = final[layer]
            buf.layer_computed(layer)

        for layer in range(LAYERS - 1):
            t = threading.Thread(target=compute, args=(layer,))
            t.start()
            t.join()
            want = (layer + 1) * LAYER_BYTES // CHUNK
            await _wait_for(lambda: len(seen) >= want)
            await asyncio.sleep(0.1)
            assert len(seen) == want and not send.done()
        compute(LAYERS - 1)
        await asyncio.wait_for(send, 5)
        assert got["cold"] == final.numpy().tobytes()  # whole and checked by its last chunk's checksum

        # over a pool past: nothing leaves before the past has verified, then everything computed
        warm_kv = final.clone()
        warm = PrefillKV(warm_kv, past_len=16, ready=False)
        send = asyncio.ensure_future(stream_kv(nc, "test.kv", "warm", warm, b"meta", chunk_bytes=CHUNK))
        for layer in range(LAYERS):
            warm.layer_computed(layer)
        await asyncio.sleep(0.2)
        assert not [i for tid, i in seen if tid == "warm"]
        warm.layer_ready(LAYERS)
        await asyncio.wait_for(send, 5)
        assert got["warm"] == warm_kv.numpy().tobytes()

        # a past that never arrives fails the stream before any of its bytes leave
        lost = PrefillKV(final.clone(), past_len=16, ready=False)
        send = asyncio.ensure_future(stream_kv(nc, "test.kv", "lost", lost, b"meta", chunk_bytes=CHUNK))
        lost.layer_computed(0)
        lost.fail("pool load failed")
        with pytest.raises(TransferError, match="pool load failed"):
            await asyncio.wait_for(send, 5)
        assert not [i for tid, i in seen if tid == "lost"] and "lost" not in got
    finally:
        await sub.unsubscribe()
        await nc.close()


def _record_computed(buf: PrefillKV) -> list[int]:
    """The sendable layer count at every change, as the model thread makes them."""
    marks: list[int] = []
    buf.watch(lambda: marks.append(buf.sendable_layers()))
    return marks


def test_the_model_marks_each_layer_computed_in_the_last_chunk(tiny_dir):
    from libs.engine.runner import ModelRunner

    threads = torch.get_num_threads()
    runner = ModelRunner(tiny_dir, threads=1)
    torch.set_num_threads(threads)
    layers = runner.shape.num_layers
    prompt = list(range(10, 50))
    buf = runner.kv_buffer(len(prompt))
    marks = _record_computed(buf)
    _, kv = runner.prefill(prompt, chunk=16, buffer=buf)  # three chunks: layers complete in the last
    assert kv is buf.kv
    assert marks == list(range(layers + 1))  # 0 at the start, then one more each layer, in order
    # the bytes sent as each layer finished are the bytes of the finished prompt
    _, again = runner.prefill(prompt, chunk=64)
    assert torch.equal(kv, again)


def test_the_sim_engine_finishes_its_layers_one_after_another(tiny_dir):
    from libs.engine.costs import CostProfile
    from libs.engine.simengine import SimRunner

    threads = torch.get_num_threads()
    sim = SimRunner(tiny_dir, CostProfile(model="t", threads=1, prefill=(0.002, 2e-5, 1e-8),
                                          decode=(0.001, 1e-4, 1e-7)))
    torch.set_num_threads(threads)
    buf = sim.kv_buffer(12)
    marks = _record_computed(buf)
    sim.prefill(list(range(100, 112)), buffer=buf)
    assert marks == list(range(sim.shape.num_layers + 1))
