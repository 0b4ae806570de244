"""The prompt's KV on its way to decode while the prompt still runs.

A request's KV is one buffer in the wire layout ``[L, 2, H, positions, D]``, so layer ``i`` is one
contiguous range of its bytes. The model marks each layer computed as it writes the layer's last
position; ``stream_kv`` sends every chunk as soon as the layers under it are final, and the rest
follows as the later layers finish. By the first token only the last layers are left to send.
"""

from __future__ import annotations

import asyncio
import contextlib

from libs.bus import TransferError, send_blob
from libs.engine.prefill_kv import PrefillKV
from libs.kv.codec import tensor_bytes
from libs.protocol import CHUNK_DATA_BYTES

# Chunks a hand-off may have in flight before the receiver acks: a decode instance fed by eight
# prefill instances at once then has at most 32 MiB waiting for it at the NATS server, half the
# server's per-client limit past which it would cut the decode instance off as a slow consumer.
# A stream's chunks leave as fast as the layers finish, so a wider window would gain nothing.
HANDOFF_WINDOW_CHUNKS = 4


async def stream_kv(nc, subject: str, transfer_id: str, buf: PrefillKV, meta: bytes, *,
                    chunk_bytes: int = CHUNK_DATA_BYTES) -> None:
    """Send ``buf.kv`` to ``subject`` as a blob whose chunks leave as their layers become sendable
    (``PrefillKV.sendable_layers``: computed, over a verified past). Raises TransferError when the
    buffer fails (its pool past did not arrive) before all of it is sent; cancelling abandons the
    transfer, and the receiver forgets the half-sent blob."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def wake() -> None:  # on the model thread, or the loop's own
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
            loop.call_soon_threadsafe(changed.set)

    buf.watch(wake)
    layer_bytes = buf.kv[0].numel() * buf.kv.element_size()

    async def available(end: int) -> None:
        while buf.sendable_layers() * layer_bytes < end:
            if buf.failed is not None:
                raise TransferError(f"the prompt's KV was not computed: {buf.failed}")
            changed.clear()
            if buf.sendable_layers() * layer_bytes >= end:
                return
            await changed.wait()

    data = tensor_bytes(buf.kv)
    await send_blob(nc, subject, transfer_id, data, meta, chunk_bytes=chunk_bytes, available=available,
                    window=HANDOFF_WINDOW_CHUNKS)
