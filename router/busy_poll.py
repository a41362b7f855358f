"""Keeps the router's event loop polling, instead of sleeping, while requests are in flight.

Every message the router relays wakes two threads: gRPC's completion-queue thread, which then
pokes the event loop through a socket. A thread woken from sleep starts late and cold: a round
trip on an open stream at a decode step's pace is much faster when both event loops poll instead
of sleeping (`benchmarks/grpc_poller.py`). Polling saves the event loop's wake-up on each message
the router receives: a request's arrival and every engine response.

The price is one core, the event loop's, busy while any request is in flight; an idle router
sleeps as before. Under a CPU limit the polling spends the quota the rest of the process needs,
so give a router that polls two cores or more.
"""

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager


class BusyPoll:
    """Counts requests in flight and runs a task that yields to the loop while there are any.

    A task that only yields keeps a callback always ready, so each pass of the loop polls its
    sockets with a zero timeout rather than blocking in epoll until one is readable. Disabled,
    it marks nothing and the loop sleeps as usual.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._in_flight = 0
        self._spinner: asyncio.Task[None] | None = None

    @property
    def polling(self) -> bool:
        return self._spinner is not None

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        """Marks a request in flight for the duration of the block (on the event loop)."""
        if not self.enabled:
            yield
            return
        self._in_flight += 1
        if self._spinner is None:
            self._spinner = asyncio.get_running_loop().create_task(self._spin())
        try:
            yield
        finally:
            self._in_flight -= 1

    async def _spin(self) -> None:
        try:
            while self._in_flight:
                await asyncio.sleep(0)
        finally:
            self._spinner = None
