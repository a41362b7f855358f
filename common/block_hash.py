"""The content address of a full KV block, computed identically by engines and routers.

hash = xxh3_64(parent hash as 8 little-endian bytes + token ids as little-endian uint32, seed);
the first block's parent is 0. Anything that changes KV content (model, adapter) goes into the seed.
"""

import struct
from collections.abc import Sequence

import xxhash

ALGORITHM = "xxh3_64"
_PARENT = struct.Struct("<Q")


def hash_full_blocks(
    token_ids: Sequence[int], block_size: int, seed: int, known: Sequence[int] = ()
) -> list[int]:
    """Chained hashes of every full block of `token_ids`, reusing the `known` leading hashes."""
    hashes = list(known)
    start, end = len(hashes) * block_size, len(token_ids) // block_size * block_size
    if end <= start:
        return hashes
    # One pack for all the blocks: a router hashes every prompt before it can route it.
    data = struct.pack(f"<{end - start}I", *token_ids[start:end])
    parent = hashes[-1] if hashes else 0
    step = 4 * block_size
    for offset in range(0, len(data), step):
        parent = xxhash.xxh3_64_intdigest(_PARENT.pack(parent) + data[offset : offset + step], seed)
        hashes.append(parent)
    return hashes
