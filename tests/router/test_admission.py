"""Admission: priority order, tenant turns, shedding the least important, deadlines."""

import asyncio

import pytest

from llmserve.router.admission import AdmissionController, ShedError


def run(coro):
    return asyncio.run(coro)


def test_waiters_start_by_priority_then_tenant_turns() -> None:
    async def scenario() -> None:
        admission = AdmissionController(max_queue=10)
        admission.capacity = 1
        await admission.acquire(1, "a", None)  # fills the only slot
        order: list[str] = []

        async def wait(name: str, priority: int, tenant: str) -> None:
            await admission.acquire(priority, tenant, None)
            order.append(name)

        waiting = [("batch", 2, "a"), ("std-a1", 1, "a"), ("std-a2", 1, "a"), ("std-b1", 1, "b")]
        tasks = [asyncio.create_task(wait(*w)) for w in waiting]
        await asyncio.sleep(0)
        assert order == [] and admission.queued == 4
        # Less important running work never holds a critical request back: engines preempt it.
        await asyncio.wait_for(admission.acquire(0, "c", None), 1)
        admission.release(0)
        for priority in (1, 1, 1, 1):
            admission.release(priority)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert order == ["std-a1", "std-b1", "std-a2", "batch"]

    run(scenario())


def test_full_queue_sheds_least_important_first() -> None:
    async def scenario() -> None:
        admission = AdmissionController(max_queue=2)
        admission.capacity = 1
        await admission.acquire(1, "", None)
        batch = asyncio.create_task(admission.acquire(2, "", None))
        std = asyncio.create_task(admission.acquire(1, "", None))
        await asyncio.sleep(0)
        later_std = asyncio.create_task(admission.acquire(1, "", None))
        await asyncio.sleep(0)
        with pytest.raises(ShedError) as shed:
            await batch
        assert shed.value.retry_after_s > 0
        with pytest.raises(ShedError):  # the queue is full of more important work
            await admission.acquire(2, "", None)
        admission.release(1)
        await std
        admission.release(1)
        await later_std

    run(scenario())


def test_deadline_passes_while_queued() -> None:
    async def scenario() -> None:
        admission = AdmissionController(max_queue=4)
        admission.capacity = 1
        await admission.acquire(0, "", None)
        with pytest.raises(TimeoutError):
            await admission.acquire(1, "", 0.05)
        assert admission.queued == 0
        admission.release(0)
        assert admission.running == 0

    run(scenario())
