"""Fixtures shared by the system tests."""

from collections.abc import Callable

import grpc
import pytest

from llmserve.v1 import common_pb2, engine_service_pb2, engine_service_pb2_grpc

LoadReader = Callable[[str], engine_service_pb2.WatchLoadResponse]
GreedyReader = Callable[[str, list[int], int], list[int]]


@pytest.fixture
def engine_load() -> LoadReader:
    """Reads an engine's load now: the first message of its WatchLoad stream."""

    def read(address: str) -> engine_service_pb2.WatchLoadResponse:
        with grpc.insecure_channel(address) as channel:
            stub = engine_service_pb2_grpc.EngineServiceStub(channel)
            stream = stub.WatchLoad(engine_service_pb2.WatchLoadRequest(), timeout=5)
            first = next(stream)
            stream.cancel()
            return first

    return read


@pytest.fixture
def engine_greedy() -> GreedyReader:
    """An engine's greedy tokens for a prompt, asked of it directly: what a stream that fails
    over must still deliver."""

    def read(address: str, prompt: list[int], max_tokens: int) -> list[int]:
        with grpc.insecure_channel(address) as channel:
            stub = engine_service_pb2_grpc.EngineServiceStub(channel)
            request = engine_service_pb2.EngineServiceGenerateRequest(
                prompt_token_ids=prompt,
                sampling=common_pb2.SamplingParams(temperature=0),
                stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True),
            )
            return [t for r in stub.Generate(request) for t in r.token_ids]

    return read
