"""The KV cache's blocks: reference counts, content addresses and least-recently-used eviction."""

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class KvEvent:
    """A block that entered (`stored=True`) or left the prefix cache, by hash."""

    stored: bool
    block_hash: int


class BlockPool:
    """Fixed-size KV blocks shared by reference count and found by the hash of their content.

    A full block that has been computed is registered under its chained hash; when its last owner
    lets go it stays cached (free, but findable) until allocation needs the space, oldest first.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block id
        # Blocks nobody holds, least recently released first; cached ones among them are evictable.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.pending: list[KvEvent] = []

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def lookup(self, block_hashes: list[int]) -> list[int]:
        """Block ids of the longest run of leading hashes present in the cache."""
        found = []
        for block_hash in block_hashes:
            block = self.cached.get(block_hash)
            if block is None:
                break
            found.append(block)
        return found

    def acquire(self, block_ids: list[int]) -> None:
        """Takes a reference on cached blocks (a prefix-cache hit)."""
        for block in block_ids:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1

    def allocate(self, count: int) -> list[int] | None:
        """Takes `count` free blocks, evicting cached ones; None if too few are free."""
        if count > len(self.free):
            return None
        blocks = []
        for _ in range(count):
            block, _ = self.free.popitem(last=False)
            self._evict(block)
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def release(self, block_ids: list[int]) -> None:
        """Drops a reference from each block; the tail goes first, so it is evicted first."""
        for block in reversed(block_ids):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} released more often than taken"
            if self.ref_counts[block] == 0:
                self.free[block] = None

    def register(self, block: int, block_hash: int) -> None:
        """Publishes a freshly computed full block under its hash (first writer wins)."""
        if block_hash in self.cached or self.block_hash[block] is not None:
            return
        self.block_hash[block] = block_hash
        self.cached[block_hash] = block
        self.pending.append(KvEvent(True, block_hash))

    def _evict(self, block: int) -> None:
        block_hash = self.block_hash[block]
        if block_hash is not None:
            self.block_hash[block] = None
            del self.cached[block_hash]
            self.pending.append(KvEvent(False, block_hash))

    def take_events(self) -> list[KvEvent]:
        """Returns and clears the cache changes since the last call, in order."""
        events, self.pending = self.pending, []
        return events
