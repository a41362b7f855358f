"""A token stream the router falls behind on arrives as a few merged messages, not a backlog.

The router's engine channel keeps each stream's receive window small, so an engine whose reader
lags stops sending after a few messages and merges what its stream queued meanwhile into the
next one: a busy router then pays per-message costs for fewer, larger messages.
"""

import asyncio
import time

import grpc

from llmserve.router.engine_channel import open_engine_channel
from llmserve.v1 import common_pb2, engine_service_pb2, engine_service_pb2_grpc

MAX_TOKENS = 200


def engine_running(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = engine_service_pb2_grpc.EngineServiceStub(channel)
        stream = stub.WatchLoad(engine_service_pb2.WatchLoadRequest(), timeout=5)
        load = next(stream)
        stream.cancel()
        return load.num_running + load.num_waiting


def test_lagging_reader_gets_tokens_merged_into_few_messages(qwen3_system) -> None:
    _, engine, _ = qwen3_system

    async def lagging_read() -> list[int]:
        async with open_engine_channel(engine.address, None) as channel:
            stub = engine_service_pb2_grpc.EngineServiceStub(channel)
            call = stub.Generate(
                engine_service_pb2.EngineServiceGenerateRequest(
                    request_id="lagging",
                    prompt_token_ids=[5, 6, 7, 8, 9],
                    sampling=common_pb2.SamplingParams(temperature=0),
                    stopping=common_pb2.StoppingCriteria(max_tokens=MAX_TOKENS, ignore_eos=True),
                ),
                timeout=60,
            )
            sizes = [len((await call.read()).token_ids)]
            # Read nothing until the engine has generated every token.
            deadline = time.monotonic() + 30
            while await asyncio.to_thread(engine_running, engine.address):
                assert time.monotonic() < deadline, "the engine never finished the request"
                await asyncio.sleep(0.05)
            while (response := await call.read()) is not grpc.aio.EOF:
                sizes.append(len(response.token_ids))
            return sizes

    sizes = asyncio.run(lagging_read())
    assert sum(sizes) == MAX_TOKENS
    # Without the small window the engine would have sent MAX_TOKENS one-token messages ahead.
    assert len(sizes) < MAX_TOKENS // 4, sizes
    assert max(sizes) > MAX_TOKENS // 2, sizes
