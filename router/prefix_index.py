"""Which engine holds which KV blocks: exact from engines' KV events, predicted from our routing.

Engines publish every block they store or evict; the index mirrors that per engine. Between
routing a request and the engine publishing its blocks, the router predicts them (the engine
will store the prompt's full blocks), so a burst of requests sharing a new prefix follows the
first one instead of spreading out. Predictions expire once events had time to confirm them.
For an engine that publishes no events, the router's own routing history stands in: the blocks
it sent there, most recent kept, at most as many as the engine's pool holds (an estimate, as
SGLang's router keeps one).
"""

import time
from collections import OrderedDict
from collections.abc import Iterable

PREDICTION_TTL_S = 5.0
MAX_PREDICTIONS = 200_000


class PrefixIndex:
    """block hash → engines holding it (exact), plus short-lived predictions per engine."""

    def __init__(self) -> None:
        self.holders: dict[int, set[str]] = {}
        self.counts: dict[str, int] = {}
        # (engine, hash) -> expiry time, oldest first.
        self.predicted: OrderedDict[tuple[str, int], float] = OrderedDict()
        # Engines without KV events: hashes routed there, least recently routed first.
        self.history: dict[str, OrderedDict[int, None]] = {}
        self.history_capacity: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.holders)

    def reset(self, engine: str, hashes: Iterable[int]) -> None:
        """Replaces everything known about `engine` with a snapshot."""
        self.drop(engine)
        self.apply(engine, hashes, ())

    def apply(self, engine: str, stored: Iterable[int], removed: Iterable[int]) -> None:
        count = self.counts.get(engine, 0)
        for block_hash in removed:
            holders = self.holders.get(block_hash)
            if holders is not None and engine in holders:
                holders.discard(engine)
                count -= 1
                if not holders:
                    del self.holders[block_hash]
        for block_hash in stored:
            holders = self.holders.setdefault(block_hash, set())
            if engine not in holders:
                holders.add(engine)
                count += 1
        self.counts[engine] = count

    def held_blocks(self) -> dict[str, int]:
        """Blocks each engine holds as far as we know: exact counts, or the history's size."""
        held = dict(self.counts)
        for engine, history in self.history.items():
            held[engine] = held.get(engine, 0) + len(history)
        return held

    def follow_history(self, engine: str, capacity: int) -> None:
        """Indexes `engine` (which publishes no KV events) by what is routed to it."""
        self.drop(engine)
        self.history[engine] = OrderedDict()
        self.history_capacity[engine] = capacity

    def drop(self, engine: str) -> None:
        """Forgets an engine (it left the pool or resubscribes)."""
        self.history.pop(engine, None)
        self.history_capacity.pop(engine, None)
        if not self.counts.pop(engine, 0):
            return
        for block_hash in [h for h, e in self.holders.items() if engine in e]:
            holders = self.holders[block_hash]
            holders.discard(engine)
            if not holders:
                del self.holders[block_hash]

    def predict(self, engine: str, hashes: list[int], now: float | None = None) -> None:
        """Records that `engine` is about to compute (and cache) these blocks."""
        history = self.history.get(engine)
        if history is not None:
            for block_hash in hashes:
                history.pop(block_hash, None)
                history[block_hash] = None
            while len(history) > self.history_capacity[engine]:
                history.popitem(last=False)
            return
        expiry = (time.monotonic() if now is None else now) + PREDICTION_TTL_S
        for block_hash in hashes:
            key = (engine, block_hash)
            self.predicted.pop(key, None)
            self.predicted[key] = expiry
        while len(self.predicted) > MAX_PREDICTIONS:
            self.predicted.popitem(last=False)

    def match(
        self, hashes: list[int], engines: Iterable[str], now: float | None = None
    ) -> dict[str, int]:
        """The number of leading blocks of `hashes` each engine holds (or is about to)."""
        now = time.monotonic() if now is None else now
        while self.predicted and next(iter(self.predicted.values())) < now:
            self.predicted.popitem(last=False)
        matched: dict[str, int] = {}
        for engine in engines:
            history = self.history.get(engine, ())
            run = 0
            for block_hash in hashes:
                holders = self.holders.get(block_hash)
                if (
                    (holders is None or engine not in holders)
                    and (engine, block_hash) not in self.predicted
                    and block_hash not in history
                ):
                    break
                run += 1
            matched[engine] = run
        return matched
