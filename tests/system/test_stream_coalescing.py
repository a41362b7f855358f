"""A token stream its reader falls behind on arrives as a few merged messages, not a backlog.

Two places merge: the engine, for a GenerateStreams call whose messages cannot go out yet (flow
control), and the router's link, for responses queued while the request's reader was busy.
"""

import asyncio
import time
from collections.abc import Callable

import grpc

from llmserve.router.engine_channel import open_engine_channel
from llmserve.router.engine_link import EngineLink
from llmserve.v1 import common_pb2, engine_service_pb2, engine_service_pb2_grpc

MAX_TOKENS = 200
LoadReader = Callable[[str], engine_service_pb2.WatchLoadResponse]


def greedy_request(request_id: str) -> engine_service_pb2.EngineServiceGenerateRequest:
    return engine_service_pb2.EngineServiceGenerateRequest(
        request_id=request_id,
        prompt_token_ids=[5, 6, 7, 8, 9],
        sampling=common_pb2.SamplingParams(temperature=0),
        stopping=common_pb2.StoppingCriteria(max_tokens=MAX_TOKENS, ignore_eos=True),
    )


async def wait_until_idle(engine_load: LoadReader, address: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        load = await asyncio.to_thread(engine_load, address)
        if not load.num_running + load.num_waiting:
            return
        assert time.monotonic() < deadline, "the engine never finished the request"
        await asyncio.sleep(0.05)


def test_engine_merges_output_it_cannot_send_yet(qwen3_system, engine_load) -> None:
    _, engine, _ = qwen3_system
    # A ~128-byte receive window: after a message or two the engine must wait to send.
    options = [("grpc.http2.lookahead_bytes", 128), ("grpc.http2.bdp_probe", 0)]

    async def lagging_read() -> list[int]:
        async with grpc.aio.insecure_channel(engine.address, options=options) as channel:
            call = engine_service_pb2_grpc.EngineServiceStub(channel).GenerateStreams()
            start = engine_service_pb2.StreamAction(stream_id=1, start=greedy_request("lagging"))
            await call.write(engine_service_pb2.GenerateStreamsRequest(actions=[start]))
            await call.done_writing()
            first = await call.read()
            await wait_until_idle(engine_load, engine.address)
            messages = [first]
            while (message := await call.read()) is not grpc.aio.EOF:
                messages.append(message)
            sizes = []
            for message in messages:
                assert [u.stream_id for u in message.updates] == [1]
                sizes.append(len(message.updates[0].response.token_ids))
            return sizes

    sizes = asyncio.run(lagging_read())
    assert sum(sizes) == MAX_TOKENS
    assert len(sizes) < MAX_TOKENS // 4, sizes
    assert max(sizes) > MAX_TOKENS // 2, sizes


def test_link_merges_responses_queued_for_a_busy_reader(qwen3_system, engine_load) -> None:
    _, engine, _ = qwen3_system

    async def lagging_read() -> list[int]:
        async with open_engine_channel(engine.address, None) as channel:
            link = EngineLink(engine_service_pb2_grpc.EngineServiceStub(channel))
            responses = link.stream(greedy_request("busy"), None)
            sizes = [len((await anext(responses)).token_ids)]
            await wait_until_idle(engine_load, engine.address)
            async for response in responses:
                sizes.append(len(response.token_ids))
            link.close()
            return sizes

    sizes = asyncio.run(lagging_read())
    assert sum(sizes) == MAX_TOKENS
    # Every later response was queued by the time it was read: one merged response.
    assert len(sizes) == 2, sizes
