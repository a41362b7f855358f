"""The hash self-check's judgement: what counts as a miss, what does not, and recovery.

The engine side is played by calling the check the way the engine pool does with a real
engine's KV events; the end-to-end case with real processes is in tests/system.
"""

import asyncio

import pytest

from llmserve.router import hash_check
from llmserve.router.hash_check import MISSES_TO_FLAG, HashSelfCheck, PrefixRouting
from llmserve.router.prefix_index import PrefixIndex

ENGINE = "10.0.0.1:50052"


@pytest.fixture(autouse=True)
def quick_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hash_check, "SETTLE_S", 0.01)


async def settle() -> None:
    await asyncio.sleep(0.05)


def request(check: HashSelfCheck, hashes: list[int], engine_stores: list[int]) -> None:
    """One request routed, prefilled (its blocks stored under `engine_stores`), first token."""
    pending = check.routed(ENGINE, hashes)
    check.stored(ENGINE, engine_stores)
    check.computed(pending)


def test_engine_storing_other_hashes_is_flagged_once_then_recovers() -> None:
    async def scenario() -> None:
        check = HashSelfCheck(PrefixIndex())
        for i in range(MISSES_TO_FLAG - 1):
            request(check, [i, i + 1000], [i + 5000])
        await settle()
        assert check.status(ENGINE) is PrefixRouting.UNVERIFIED
        request(check, [99, 1099], [5099])
        await settle()
        assert check.status(ENGINE) is PrefixRouting.DEGRADED
        request(check, [7, 8], [7, 8])  # the engine's hashes agree again (e.g. restarted)
        await settle()
        assert check.status(ENGINE) is PrefixRouting.OK

    asyncio.run(scenario())


def test_slow_or_evicting_engines_are_not_flagged() -> None:
    async def scenario() -> None:
        index = PrefixIndex()
        check = HashSelfCheck(index)
        # Stored nothing meanwhile (nothing computed, or events not yet sent): no evidence.
        for i in range(3 * MISSES_TO_FLAG):
            check.computed(check.routed(ENGINE, [i]))
        await settle()
        assert check.status(ENGINE) is PrefixRouting.UNVERIFIED
        # Stored and evicted again before the request was judged: it was seen, so it counts.
        for i in range(3 * MISSES_TO_FLAG):
            pending = check.routed(ENGINE, [100 + i])
            index.apply(ENGINE, [100 + i], [])
            check.stored(ENGINE, [100 + i])
            index.apply(ENGINE, [], [100 + i])
            check.computed(pending)
        await settle()
        assert check.status(ENGINE) is PrefixRouting.OK
        # Already held when routed: nothing new is stored, and none is needed.
        index.apply(ENGINE, [500], [])
        assert check.routed(ENGINE, [500, 501]) is None

    asyncio.run(scenario())


def test_requests_cut_off_by_a_resync_or_cancelled_prove_nothing() -> None:
    async def scenario() -> None:
        check = HashSelfCheck(PrefixIndex())
        pending = [check.routed(ENGINE, [i]) for i in range(2 * MISSES_TO_FLAG)]
        check.resynced(ENGINE)  # the batches carrying them may have been skipped
        check.stored(ENGINE, [9999])
        for p in pending:
            check.computed(p)
        for i in range(2 * MISSES_TO_FLAG):
            check.abandoned(check.routed(ENGINE, [100 + i]))
        check.stored(ENGINE, [9998])
        await settle()
        assert check.status(ENGINE) is PrefixRouting.UNVERIFIED

    asyncio.run(scenario())
