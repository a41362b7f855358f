"""Leaving a stream early cancels the call: the server sees its stream end within 2 s."""

from __future__ import annotations

import asyncio
import contextlib

from llmserve.clients import AsyncLLMClient, LLMClient


def test_sync_break_cancels_the_server_stream(router) -> None:
    router.endless = True
    with LLMClient(router.target) as client:
        for _ in client.generate("hi"):
            break
        assert router.stream_ended.wait(2)


def test_sync_close_on_a_kept_generator_cancels(router) -> None:
    router.endless = True
    with LLMClient(router.target) as client:
        stream = client.generate("hi")
        next(stream)
        assert not router.stream_ended.wait(0.3)  # control: a live stream keeps going
        stream.close()
        assert router.stream_ended.wait(2)


def test_sync_exception_in_the_loop_cancels(router) -> None:
    router.endless = True

    def consume(client: LLMClient) -> None:
        for _ in client.generate("hi"):
            raise LookupError("caller gave up")

    with LLMClient(router.target) as client:
        with contextlib.suppress(LookupError):
            consume(client)
        assert router.stream_ended.wait(2)


def test_sync_close_of_the_client_cancels_a_running_stream(router) -> None:
    router.endless = True
    client = LLMClient(router.target)
    stream = client.generate("hi")
    next(stream)
    client.close()
    assert router.stream_ended.wait(2)


def test_async_break_cancels_the_server_stream(router) -> None:
    router.endless = True

    async def scenario() -> bool:
        async with AsyncLLMClient(router.target) as client:
            async for _ in client.generate("hi"):
                break
            # The loop finalizes the abandoned generator, which cancels the call; keep it running.
            return await asyncio.to_thread(router.stream_ended.wait, 2)

    assert asyncio.run(scenario())


def test_async_aclosing_cancels_the_server_stream(router) -> None:
    router.endless = True

    async def scenario() -> bool:
        async with AsyncLLMClient(router.target) as client:
            async with contextlib.aclosing(client.generate("hi")) as stream:
                async for _ in stream:
                    break
            return await asyncio.to_thread(router.stream_ended.wait, 2)

    assert asyncio.run(scenario())


def test_async_task_cancellation_cancels_the_server_stream(router) -> None:
    router.endless = True

    async def scenario() -> bool:
        async with AsyncLLMClient(router.target) as client:

            async def consume() -> None:
                async for _ in client.generate("hi"):
                    pass

            task = asyncio.create_task(consume())
            await asyncio.to_thread(router.stream_started.wait, 2)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return await asyncio.to_thread(router.stream_ended.wait, 2)

    assert asyncio.run(scenario())
