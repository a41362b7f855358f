"""How the router hands an engine message to its streams' readers: a new stream's first token
before running streams' next ones, and a big message in batches, letting the loop run between
them so that work ready meanwhile (gRPC accepting a new call) waits for one batch, not all."""

import asyncio

import grpc
import uvloop

from llmserve.router.engine_link import WAKE_BATCH, StreamError, StreamInbox, hand_out
from llmserve.v1 import engine_service_pb2 as pb


def _message(*stream_ids: int) -> pb.GenerateStreamsResponse:
    message = pb.GenerateStreamsResponse()
    for stream_id in stream_ids:
        message.updates.add(stream_id=stream_id).response.token_ids.append(100 + stream_id)
    return message


def test_ready_work_runs_after_one_batch_of_readers() -> None:
    async def scenario() -> tuple[list[int], dict[int, list[int]], set[int]]:
        streams = {i: StreamInbox() for i in range(1, 4 * WAKE_BATCH + 1)}
        queued_when_it_ran: list[int] = []
        asyncio.get_running_loop().call_soon(
            lambda: queued_when_it_ran.extend(i for i, inbox in streams.items() if inbox.items)
        )
        unanswered = {5, 30}
        message = _message(*streams, 99)  # 99: a stream that already ended here
        await hand_out(message.updates, streams, unanswered)
        tokens = {}
        for i, inbox in streams.items():
            [update] = await inbox.take()
            assert isinstance(update, pb.StreamUpdate)
            tokens[i] = list(update.response.token_ids)
        return queued_when_it_ran, tokens, unanswered

    queued_when_it_ran, tokens, unanswered = uvloop.run(scenario())
    # The first batch: the two unanswered streams, then the others in message order.
    others = [i for i in range(1, 4 * WAKE_BATCH + 1) if i not in (5, 30)]
    assert queued_when_it_ran == sorted([5, 30, *others[: WAKE_BATCH - 2]])
    assert tokens == {i: [100 + i] for i in range(1, 4 * WAKE_BATCH + 1)}
    assert unanswered == set()


def test_a_small_message_is_handed_out_without_yielding() -> None:
    async def scenario() -> list[int]:
        streams = {i: StreamInbox() for i in range(1, WAKE_BATCH)}
        ran: list[int] = []
        asyncio.get_running_loop().call_soon(ran.append, 1)
        await hand_out(_message(*streams).updates, streams, set())
        return ran.copy()  # the callback still runs as the loop winds down

    assert uvloop.run(scenario()) == []


def test_an_inbox_wakes_its_reader_with_everything_queued_in_order() -> None:
    async def scenario() -> tuple[list[object], list[object], list[object]]:
        inbox = StreamInbox()
        waiting = asyncio.ensure_future(inbox.take())
        await asyncio.sleep(0)
        assert not waiting.done()  # nothing queued: the reader waits
        first = _message(1, 2).updates
        inbox.put(first[0])
        inbox.put(first[1])
        woken = await waiting
        # A reader cancelled while it waits loses nothing put afterwards.
        cancelled = asyncio.ensure_future(inbox.take())
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.sleep(0)
        error = StreamError(grpc.StatusCode.UNAVAILABLE, "engine call broke")
        inbox.put(error)
        return woken, await inbox.take(), [cancelled.cancelled()]

    woken, after_cancel, cancelled = uvloop.run(scenario())
    assert [u.stream_id for u in woken] == [1, 2]  # type: ignore[attr-defined]
    assert len(after_cancel) == 1 and isinstance(after_cancel[0], StreamError)
    assert cancelled == [True]
