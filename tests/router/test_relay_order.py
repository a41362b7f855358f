"""How the router hands an engine message to its streams' readers: a new stream's first token
before running streams' next ones, and a big message in batches, letting the loop run between
them so that work ready meanwhile (gRPC accepting a new call) waits for one batch, not all."""

import asyncio

import uvloop

from llmserve.router.engine_link import WAKE_BATCH, StreamError, first_tokens_first, hand_out
from llmserve.v1 import engine_service_pb2 as pb


def _message(*stream_ids: int) -> pb.GenerateStreamsResponse:
    message = pb.GenerateStreamsResponse()
    for stream_id in stream_ids:
        message.updates.add(stream_id=stream_id).response.token_ids.append(100 + stream_id)
    return message


def test_unanswered_streams_go_first_in_their_own_order() -> None:
    unanswered = {4, 2, 9}
    updates = first_tokens_first(_message(1, 2, 3, 4, 5).updates, unanswered)
    assert [u.stream_id for u in updates] == [2, 4, 1, 3, 5]
    assert [u.response.token_ids[0] for u in updates] == [102, 104, 101, 103, 105]
    assert unanswered == {9}  # answered streams leave the set; 9 is still waiting


def test_nothing_moves_once_every_stream_was_answered() -> None:
    message = _message(3, 1, 2)
    unanswered = {1}
    assert [u.stream_id for u in first_tokens_first(message.updates, unanswered)] == [1, 3, 2]
    assert [u.stream_id for u in first_tokens_first(message.updates, unanswered)] == [3, 1, 2]
    assert unanswered == set()


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
