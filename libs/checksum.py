"""The checksum of KV bytes: XXH3-64, for whole blobs on the bus and for every stored block.

Each KV byte is summed several times on its way (by the sender of a hand-off or a pool write, by
the pool on a put and on a disk read, by the reader of a load), on the same cores as the
instances' event loops. XXH3 sums about ten times faster than zlib's CRC32 on this machine
(~10-20 GB/s against ~1.5), detects the corruption a transfer or a disk can cause as well, and,
like zlib, lets go of the GIL while it sums a large buffer.
"""

from __future__ import annotations

import xxhash

# one buffer's sum at once, and a running sum over consecutive pieces (``update``, ``intdigest``):
# summing a buffer piece by piece in order gives the sum of the whole
checksum = xxhash.xxh3_64_intdigest
Running = xxhash.xxh3_64
