"""Fixtures shared by the system tests."""

from collections.abc import Callable

import grpc
import pytest

from llmserve.v1 import engine_service_pb2, engine_service_pb2_grpc

LoadReader = Callable[[str], engine_service_pb2.WatchLoadResponse]


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
