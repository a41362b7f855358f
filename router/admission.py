"""Admission when every engine is saturated: queue by priority class, share fairly among tenants,
shed the least important work first, and never hold a request past its deadline.
"""

import asyncio
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field


class ShedError(Exception):
    """The request was refused for load; `retry_after_s` is a hint for the caller."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(order=True)
class _Waiter:
    priority: int
    arrival: int
    tenant: str = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)


class AdmissionController:
    """Lets requests run while the engines have room; the rest wait per class and tenant.

    A request counts against `capacity` together with the running requests at least as
    important as itself: less important work never makes it wait, since engines preempt that
    work for it. Within a class, tenants take turns (each tenant's requests stay first come,
    first served), so one tenant's burst cannot starve another's. When the queue is full, the least
    important, latest waiter is shed — or the newcomer, if it is the least important.
    """

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.capacity = 0
        self.running_by_priority: dict[int, int] = {}
        # priority -> tenant -> waiters, tenants in turn order
        self._queues: dict[int, OrderedDict[str, deque[_Waiter]]] = {}
        self._arrivals = itertools.count()

    @property
    def running(self) -> int:
        return sum(self.running_by_priority.values())

    def _has_room(self, priority: int) -> bool:
        at_least_as_important = sum(n for p, n in self.running_by_priority.items() if p <= priority)
        return at_least_as_important < self.capacity

    def _start(self, priority: int) -> None:
        self.running_by_priority[priority] = self.running_by_priority.get(priority, 0) + 1

    @property
    def queued(self) -> int:
        return sum(len(q) for tenants in self._queues.values() for q in tenants.values())

    def queued_by_priority(self) -> dict[int, int]:
        return {p: sum(len(q) for q in t.values()) for p, t in self._queues.items()}

    def try_acquire(self, priority: int) -> bool:
        """Takes a slot if one is free and nobody as important waits; True if taken."""
        ahead = any(p <= priority and tenants for p, tenants in self._queues.items())
        if self._has_room(priority) and not ahead:
            self._start(priority)
            return True
        return False

    async def acquire(self, priority: int, tenant: str, timeout: float | None) -> None:
        """Waits for a slot; raises ShedError when shed, TimeoutError past the deadline."""
        if self.try_acquire(priority):
            return
        waiter = _Waiter(
            priority, next(self._arrivals), tenant, asyncio.get_running_loop().create_future()
        )
        if self.queued >= self.max_queue:
            victim = max(self._all_waiters(), default=None)
            if victim is None or victim < waiter:
                raise ShedError(f"overloaded: {self.queued} requests queued", self._retry_hint())
            self._remove(victim)
            victim.future.set_exception(
                ShedError("shed for more important work", self._retry_hint())
            )
        self._queues.setdefault(priority, OrderedDict()).setdefault(tenant, deque()).append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        except BaseException:
            if not waiter.future.done():
                self._remove(waiter)
            elif not waiter.future.cancelled() and waiter.future.exception() is None:
                self.release(priority)  # admitted just as we gave up: hand the slot on
            raise

    def release(self, priority: int) -> None:
        self.running_by_priority[priority] -= 1
        self.admit()

    def admit(self) -> None:
        """Starts waiters, most important class first, while each has room."""
        for priority in sorted(self._queues):
            while self._has_room(priority):
                waiter = self._next_waiter(priority)
                if waiter is None:
                    break
                self._start(priority)
                waiter.future.set_result(None)

    def _next_waiter(self, priority: int) -> _Waiter | None:
        tenants = self._queues.get(priority)
        if tenants is not None:
            while tenants:
                tenant, waiters = next(iter(tenants.items()))
                waiter = waiters.popleft()
                tenants.move_to_end(tenant)  # the next turn in this class is another tenant's
                if not waiters:
                    del tenants[tenant]
                if not waiter.future.done():
                    return waiter
        return None

    def _all_waiters(self) -> list[_Waiter]:
        return [w for t in self._queues.values() for q in t.values() for w in q]

    def _remove(self, waiter: _Waiter) -> None:
        tenants = self._queues.get(waiter.priority, OrderedDict())
        waiters = tenants.get(waiter.tenant)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del tenants[waiter.tenant]

    def _retry_hint(self) -> float:
        return 1.0 + self.queued / max(self.capacity, 1)
