"""GenerateStreams: many streams over one call, each ending as its own Generate call would."""

import asyncio
import time

import grpc
import pytest

from llmserve.v1 import (
    common_pb2,
    engine_service_pb2,
    engine_service_pb2_grpc,
    generate_service_pb2,
    generate_service_pb2_grpc,
)


def request(prompt: list[int], max_tokens: int) -> engine_service_pb2.EngineServiceGenerateRequest:
    return engine_service_pb2.EngineServiceGenerateRequest(
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(temperature=0),
        stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True),
    )


def start(stream_id: int, req: engine_service_pb2.EngineServiceGenerateRequest):
    action = engine_service_pb2.StreamAction(stream_id=stream_id, start=req)
    return engine_service_pb2.GenerateStreamsRequest(actions=[action])


def generate_direct(address: str, req: engine_service_pb2.EngineServiceGenerateRequest) -> list:
    with grpc.insecure_channel(address) as channel:
        stub = engine_service_pb2_grpc.EngineServiceStub(channel)
        return [t for r in stub.Generate(req, timeout=60) for t in r.token_ids]


def test_streams_finish_fail_and_cancel_independently(qwen3_system, engine_load) -> None:
    _, engine, _ = qwen3_system
    good, long_one = request([3, 4, 5, 6], 12), request([9, 10, 11], 400)
    long_one.request_id = "cancel-me"
    too_long = request(list(range(1, 10_000)), 4)
    expected = generate_direct(engine.address, good)

    async def run() -> dict[int, list]:
        async with grpc.aio.insecure_channel(engine.address) as channel:
            call = engine_service_pb2_grpc.EngineServiceStub(channel).GenerateStreams()
            for stream_id, req in ((7, long_one), (8, good), (9, too_long)):
                await call.write(start(stream_id, req))
            seen: dict[int, list] = {7: [], 8: [], 9: []}
            cancelled = False
            async for message in call:
                for update in message.updates:
                    seen[update.stream_id].append(update)
                if seen[8] and seen[8][-1].response.finish_reason and seen[9] and not cancelled:
                    cancel = engine_service_pb2.StreamAction(stream_id=7, cancel=True)
                    await call.write(engine_service_pb2.GenerateStreamsRequest(actions=[cancel]))
                    await call.done_writing()
                    cancelled = True
            return seen

    seen = asyncio.run(asyncio.wait_for(run(), 120))
    tokens = [t for u in seen[8] for t in u.response.token_ids]
    assert tokens == expected
    assert seen[8][-1].response.finish_reason == common_pb2.FINISH_REASON_LENGTH
    (failure,) = seen[9]
    assert failure.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "prompt_token_ids" in failure.error_message
    # The cancelled stream sent some tokens, never a last response, and the call ended.
    assert seen[7] and not any(u.response.finish_reason or u.error_code for u in seen[7])
    deadline = time.monotonic() + 10
    while (load := engine_load(engine.address)).num_running + load.num_waiting:
        assert time.monotonic() < deadline, "the cancelled stream still runs on the engine"
        time.sleep(0.05)
    events = engine.log_events()
    ends = [e["event"] for e in events if e.get("request_id", "").startswith("cancel-me")]
    assert ends == ["request_started", "request_cancelled"]


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (start(1, request([5, 6], 4)), "stream_id: 1 is already running"),
        (
            engine_service_pb2.GenerateStreamsRequest(
                actions=[engine_service_pb2.StreamAction(stream_id=2)]
            ),
            "actions: stream 2 has neither start nor cancel=true",
        ),
    ],
    ids=["reused stream_id", "empty action"],
)
def test_a_malformed_action_ends_the_call(qwen3_system, second, message) -> None:
    _, engine, _ = qwen3_system

    async def run() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(engine.address) as channel:
            call = engine_service_pb2_grpc.EngineServiceStub(channel).GenerateStreams()
            await call.write(start(1, request([3, 4], 400)))
            await call.write(second)
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                async for _ in call:
                    pass
            assert message in failure.value.details()
            return failure.value.code()

    assert asyncio.run(asyncio.wait_for(run(), 60)) == grpc.StatusCode.INVALID_ARGUMENT


def test_router_requests_sharing_a_request_id_stay_apart(qwen3_system) -> None:
    _, engine, router = qwen3_system
    prompts = [[20 + i, 21 + i, 22 + i] for i in range(6)]
    expected = [generate_direct(engine.address, request(p, 10)) for p in prompts]

    async def run() -> list[list[int]]:
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = generate_service_pb2_grpc.GenerateServiceStub(channel)

            async def one(prompt: list[int]) -> list[int]:
                req = generate_service_pb2.GenerateRequest(
                    request_id="same",
                    prompt_token_ids=prompt,
                    sampling=common_pb2.SamplingParams(temperature=0),
                    stopping=common_pb2.StoppingCriteria(max_tokens=10, ignore_eos=True),
                )
                return [t async for r in stub.Generate(req, timeout=60) for t in r.token_ids]

            return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(asyncio.wait_for(run(), 120)) == expected
