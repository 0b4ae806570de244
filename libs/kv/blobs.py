"""How many blocks travel in one blob between a cachestore client and the store: the limits
both ends keep, and the grouping of a run of blocks into blobs."""

from __future__ import annotations

from collections.abc import Sequence

# Blocks per get or put blob: bounds the meta (it travels in chunk 0's header room) and the sender's buffer.
GET_BLOB_MAX_BLOCKS = PUT_BLOB_MAX_BLOCKS = 64
# Bytes per put blob: a prompt's new blocks for one owner go in a few blobs, one transaction each.
PUT_BLOB_MAX_BYTES = 8 << 20


def blob_groups(sizes: Sequence[int], max_blocks: int, max_bytes: int) -> list[tuple[int, int]]:
    """Consecutive runs ``[start, end)`` of blocks of ``sizes`` to send as one blob each: at most
    ``max_blocks`` blocks and ``max_bytes`` bytes per run, a larger block alone."""
    runs: list[tuple[int, int]] = []
    size = 0
    for i, n in enumerate(sizes):
        if runs and runs[-1][1] - runs[-1][0] < max_blocks and size + n <= max_bytes:
            runs[-1] = (runs[-1][0], i + 1)
            size += n
        else:
            runs.append((i, i + 1))
            size = n
    return runs
