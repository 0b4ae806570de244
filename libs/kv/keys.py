"""Block keys: the hash chain that names every full block of a prompt (docs/design.md, KV blocks).

Pure hashing, no torch and no bus: the gateway imports this to hash a prompt. Only full blocks of
``block_size`` tokens get a key::

    ns      = namespace_digest(model_id, dtype, block_size, layout_version)
    key_0   = blake2b(ns      || tokens_0 || ns, digest_size=16)
    key_i   = blake2b(key_i-1 || tokens_i || ns, digest_size=16)

where ``tokens_i`` are the block's token ids as little-endian int32. Equal prefixes therefore get
equal keys, and a key names its whole prefix, not just its own tokens.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import msgspec

KEY_BYTES = 16
LAYOUT_VERSION = 1


def namespace_digest(model_id: str, dtype: str, block_size: int, layout_version: int = LAYOUT_VERSION) -> bytes:
    """16-byte digest binding model identity, dtype, block size and KV layout version."""
    ident = msgspec.msgpack.encode(["yuebing-kv-namespace", model_id, dtype, int(block_size), int(layout_version)])
    return hashlib.blake2b(ident, digest_size=KEY_BYTES).digest()


def block_hashes(token_ids: Sequence[int], block_size: int, namespace: bytes, parent: bytes | None = None
                 ) -> list[bytes]:
    """One 16-byte key per full block of ``token_ids``; the tail that does not fill a block gets none.
    ``parent``: the key of the block before ``token_ids`` (they go on a chain already hashed)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    pack = struct.Struct(f"<{block_size}i").pack
    keys: list[bytes] = []
    parent = namespace if parent is None else parent
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        try:
            tokens = pack(*token_ids[start : start + block_size])
        except struct.error as e:
            raise ValueError(f"token ids must be int32: {e}") from e
        parent = hashlib.blake2b(parent + tokens + namespace, digest_size=KEY_BYTES).digest()
        keys.append(parent)
    return keys
