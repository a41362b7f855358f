"""The prefix cache's content as a feed: a snapshot for each new subscriber, then numbered batches.

The frontend mirrors the set of cached block hashes from the core's per-step changes, so a
subscriber's snapshot and the batches after it agree exactly. A subscriber that falls too far
behind is sent a fresh snapshot instead of an unbounded backlog.
"""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

MAX_BACKLOG = 1024


@dataclass(frozen=True)
class KvCacheChange:
    """Batch `sequence_number`; a snapshot lists every cached hash in `stored`."""

    sequence_number: int
    snapshot: bool
    stored: list[int]
    removed: list[int]


class KvEventFeed:
    """Keeps the cached-hash set and fans changes out to subscribers."""

    def __init__(self) -> None:
        self.cached: set[int] = set()
        self.sequence_number = 0
        self._subscribers: dict[asyncio.Queue[KvCacheChange | None], bool] = {}

    def publish(self, stored: list[int], removed: list[int]) -> None:
        if not stored and not removed:
            return
        self.cached.difference_update(removed)
        self.cached.update(stored)
        self.sequence_number += 1
        change = KvCacheChange(self.sequence_number, False, stored, removed)
        for queue in self._subscribers:
            if queue.qsize() >= MAX_BACKLOG:
                self._resync(queue)
            else:
                queue.put_nowait(change)

    def _snapshot(self) -> KvCacheChange:
        return KvCacheChange(self.sequence_number, True, sorted(self.cached), [])

    def _resync(self, queue: asyncio.Queue[KvCacheChange | None]) -> None:
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(self._snapshot())

    def close(self) -> None:
        """Ends every subscription (the engine is going away)."""
        for queue in self._subscribers:
            queue.put_nowait(None)

    async def subscribe(self) -> AsyncIterator[KvCacheChange]:
        queue: asyncio.Queue[KvCacheChange | None] = asyncio.Queue()
        self._subscribers[queue] = True
        try:
            yield self._snapshot()
            while (change := await queue.get()) is not None:
                yield change
        finally:
            del self._subscribers[queue]
