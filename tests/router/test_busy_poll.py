"""BusyPoll keeps a real uvloop event loop busy exactly while requests are in flight."""

import asyncio
import time

import uvloop

from llmserve.router.busy_poll import BusyPoll


async def _loop_cpu_s(wall_s: float) -> float:
    """CPU seconds the event loop's thread spends while this coroutine sleeps `wall_s`."""
    start = time.thread_time()
    await asyncio.sleep(wall_s)
    return time.thread_time() - start


async def _settle() -> None:
    for _ in range(3):  # the spinner notices the count reach zero within a pass or two
        await asyncio.sleep(0)


def test_the_loop_polls_only_while_requests_are_in_flight() -> None:
    async def scenario() -> dict[str, float | bool]:
        poll = BusyPoll()
        seen: dict[str, float | bool] = {"idle_s": await _loop_cpu_s(0.3)}
        with poll.in_flight():
            with poll.in_flight():
                seen["two_s"] = await _loop_cpu_s(0.3)
            seen["one_s"] = await _loop_cpu_s(0.3)
            seen["polling_with_one"] = poll.polling
        await _settle()
        seen["polling_after"] = poll.polling
        seen["after_s"] = await _loop_cpu_s(0.3)
        return seen

    seen = uvloop.run(scenario())
    # Sleeping costs the thread next to nothing; polling costs it most of the wall time (the
    # bound is loose for a loaded 2-core machine).
    assert seen["idle_s"] < 0.05 and seen["after_s"] < 0.05, seen
    assert seen["two_s"] > 0.1 and seen["one_s"] > 0.1, seen
    assert seen["polling_with_one"] is True and seen["polling_after"] is False, seen


def test_a_request_after_a_pause_starts_polling_again() -> None:
    async def scenario() -> list[bool]:
        poll = BusyPoll()
        states = []
        for _ in range(2):
            with poll.in_flight():
                await asyncio.sleep(0.01)
                states.append(poll.polling)
            await _settle()
            states.append(poll.polling)
        return states

    assert uvloop.run(scenario()) == [True, False, True, False]


def test_a_disabled_busy_poll_lets_the_loop_sleep() -> None:
    async def scenario() -> tuple[bool, float]:
        poll = BusyPoll(enabled=False)
        with poll.in_flight():
            return poll.polling, await _loop_cpu_s(0.3)

    polling, cpu_s = uvloop.run(scenario())
    assert polling is False and cpu_s < 0.05
