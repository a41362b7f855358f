"""Checks that the router hashes KV blocks exactly as each engine does.

Prefix routing rests on the router computing, from `GetInfo`'s block size and seed, the very
hashes an engine publishes in `WatchKvEvents`. Were they to differ (a wrong seed, a changed
algorithm), nothing would fail: the index would simply never match, and prefix routing would
silently turn into load balancing. So every routed request with a full block is a test: once the
engine has computed the prompt, its predicted hashes must show up, either already held by that
engine or among the blocks it stores next.

A request proves nothing either way while its blocks may still be on their way, so it is judged
`SETTLE_S` after its first token (the engine publishes a step's blocks together with the step's
tokens). It counts as a miss only if none of its hashes appeared although the engine did
publish stored blocks meanwhile (it was computing and publishing, just not our hashes); a slow
engine or an evicted block cannot cause that. `MISSES_TO_FLAG` misses in a row, with no
confirmation in between, mark the engine's prefix routing degraded: the router logs an error
(once per engine), counts `llmserve_router_prefix_hash_mismatch_total` and says so in its health
details. Any later confirmation clears it: a hash computed with the wrong seed cannot collide
with the engine's by chance.
"""

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import structlog

from llmserve.router import metrics
from llmserve.router.prefix_index import PrefixIndex

log = structlog.get_logger(__name__)

# After the first token, how long the engine's stored-block events get to reach us. They leave
# the engine with the step's tokens, so this is generous; a larger value only delays detection.
SETTLE_S = 2.0
# Consecutive misses before an engine is flagged: one miss can be a coincidence, eight are not.
MISSES_TO_FLAG = 8


class PrefixRouting(Enum):
    """Whether the router's block hashes are known to equal an engine's."""

    UNVERIFIED = "unverified"  # no routed request has shown it yet
    OK = "ok"
    DEGRADED = "degraded"


@dataclass
class _EngineState:
    """What the check knows about one engine since it (re)joined the pool."""

    # Hashes the engine reported stored, in batches (snapshots not included).
    stored: int = 0
    # predicted hash -> the pending checks that hash would confirm
    waiting: "dict[int, set[PendingCheck]]" = field(default_factory=dict)
    # Bumped when the event stream resynchronised: older checks may have missed their events.
    generation: int = 0
    misses: int = 0
    routed: int = 0
    status: PrefixRouting = PrefixRouting.UNVERIFIED


@dataclass(eq=False)
class PendingCheck:
    """One routed request's predicted hashes, waiting to be seen in its engine's events."""

    engine: str
    hashes: list[int]
    state: _EngineState
    generation: int
    # The engine's stored-block count when the request was routed.
    stored_before: int
    confirmed: bool = False


class HashSelfCheck:
    """Compares the hashes the router predicts for each engine with those the engine stores."""

    def __init__(self, index: PrefixIndex) -> None:
        self.index = index
        self._engines: dict[str, _EngineState] = {}
        # Engines already reported in the log: the error is logged once per engine.
        self._reported: set[str] = set()

    def _state(self, engine: str) -> _EngineState:
        return self._engines.setdefault(engine, _EngineState())

    def status(self, engine: str) -> PrefixRouting:
        state = self._engines.get(engine)
        return PrefixRouting.UNVERIFIED if state is None else state.status

    def routed(self, engine: str, hashes: list[int]) -> PendingCheck | None:
        """Starts checking a request routed to `engine`; None when there is nothing to check."""
        if not hashes:
            return None
        state = self._state(engine)
        state.routed += 1
        if any(engine in self.index.holders.get(h, ()) for h in hashes):
            self._confirm(engine, state)
            return None
        check = PendingCheck(engine, hashes, state, state.generation, state.stored)
        for block_hash in hashes:
            state.waiting.setdefault(block_hash, set()).add(check)
        return check

    def computed(self, check: PendingCheck | None) -> None:
        """The engine sent the request's first token: its prompt blocks are stored by now."""
        if check is not None:
            asyncio.get_running_loop().call_later(SETTLE_S, self._settle, check)

    def abandoned(self, check: PendingCheck | None) -> None:
        """The request ended before its first token: the engine may never have computed it."""
        if check is not None:
            self._unwatch(check)

    def stored(self, engine: str, hashes: Sequence[int]) -> None:
        """A batch of blocks `engine` stored, from its KV events."""
        state = self._state(engine)
        state.stored += len(hashes)
        for block_hash in hashes:
            checks = state.waiting.pop(block_hash, None)
            if checks:
                for check in checks:
                    check.confirmed = True
                self._confirm(engine, state)

    def resynced(self, engine: str) -> None:
        """The engine's event stream restarted from a snapshot: batches may have been skipped."""
        state = self._state(engine)
        state.generation += 1
        state.waiting.clear()

    def forget(self, engine: str) -> None:
        """The engine left the pool: when it is back, its `GetInfo` may report another seed."""
        self._engines.pop(engine, None)

    def _unwatch(self, check: PendingCheck) -> None:
        state = check.state
        for block_hash in check.hashes:
            checks = state.waiting.get(block_hash)
            if checks is not None:
                checks.discard(check)
                if not checks:
                    del state.waiting[block_hash]

    def _settle(self, check: PendingCheck) -> None:
        self._unwatch(check)
        state = check.state
        # A confirmed check counted when its hash arrived. One from before the engine left or
        # its events resynchronised cannot be judged: its blocks may be in what was skipped.
        current = self._engines.get(check.engine) is state and state.generation == check.generation
        if check.confirmed or not current or state.stored <= check.stored_before:
            return
        state.misses += 1
        if state.misses >= MISSES_TO_FLAG and state.status is not PrefixRouting.DEGRADED:
            self._flag(check.engine, state)

    def _confirm(self, engine: str, state: _EngineState) -> None:
        state.misses = 0
        if state.status is PrefixRouting.DEGRADED:
            log.info("prefix_hash_check_recovered", engine=engine)
        state.status = PrefixRouting.OK

    def _flag(self, engine: str, state: _EngineState) -> None:
        state.status = PrefixRouting.DEGRADED
        metrics.PREFIX_HASH_MISMATCH.labels(engine).inc()
        if engine not in self._reported:
            self._reported.add(engine)
            log.error(
                "prefix_hash_mismatch",
                engine=engine,
                routed_requests=state.routed,
                unconfirmed_requests=state.misses,
                detail="the blocks this engine stores never carry the hashes the router computes "
                "from its GetInfo (block size, seed): prefix routing to it is degraded",
            )
