"""The router hands a big engine message to its readers in batches, letting the loop run between
them: work that is ready meanwhile (gRPC accepting a new call) waits for one batch, not all."""

import asyncio

import uvloop

from llmserve.router.engine_link import WAKE_BATCH, StreamError, hand_out
from llmserve.v1 import engine_service_pb2 as pb


def _message(*stream_ids: int) -> pb.GenerateStreamsResponse:
    message = pb.GenerateStreamsResponse()
    for stream_id in stream_ids:
        message.updates.add(stream_id=stream_id).response.token_ids.append(100 + stream_id)
    return message


def test_ready_work_runs_after_one_batch_of_readers() -> None:
    async def scenario() -> tuple[list[int], dict[int, list[int]], set[int]]:
        streams: dict[int, asyncio.Queue[pb.StreamUpdate | StreamError]] = {
            i: asyncio.Queue() for i in range(1, 4 * WAKE_BATCH + 1)
        }
        queued_when_it_ran: list[int] = []
        asyncio.get_running_loop().call_soon(
            lambda: queued_when_it_ran.append(sum(q.qsize() for q in streams.values()))
        )
        unanswered = {5, 30}
        message = _message(*streams, 99)  # 99: a stream that already ended here
        await hand_out(message.updates, streams, unanswered)
        tokens = {}
        for i, queue in streams.items():
            update = queue.get_nowait()
            assert isinstance(update, pb.StreamUpdate) and queue.empty()
            tokens[i] = list(update.response.token_ids)
        return queued_when_it_ran, tokens, unanswered

    queued_when_it_ran, tokens, unanswered = uvloop.run(scenario())
    assert queued_when_it_ran == [WAKE_BATCH]
    assert tokens == {i: [100 + i] for i in range(1, 4 * WAKE_BATCH + 1)}
    assert unanswered == set()


def test_a_small_message_is_handed_out_without_yielding() -> None:
    async def scenario() -> list[int]:
        streams: dict[int, asyncio.Queue[pb.StreamUpdate | StreamError]] = {
            i: asyncio.Queue() for i in range(1, WAKE_BATCH)
        }
        ran: list[int] = []
        asyncio.get_running_loop().call_soon(ran.append, 1)
        await hand_out(_message(*streams).updates, streams, set())
        return ran.copy()  # the callback still runs as the loop winds down

    assert uvloop.run(scenario()) == []
