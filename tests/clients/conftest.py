"""Fixtures for the client tests: a real gRPC server on a loopback port playing the router.

The server is a scripted stand-in for the router (the client under test is real); `connect`
runs each client test with both `LLMClient` and `AsyncLLMClient` behind one blocking interface.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmserve.clients import AsyncLLMClient, Chunk, LLMClient
from llmserve.v1 import common_pb2, generate_service_pb2, generate_service_pb2_grpc

pb = generate_service_pb2


def _logprob(
    token_id: int, logprob: float, *top: tuple[int, float, str]
) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=token_id,
        logprob=logprob,
        top_logprobs=[common_pb2.TopLogprob(token_id=t, logprob=lp, text=s) for t, lp, s in top],
    )


# Three responses spelling "Hello, world!"; the values are exact in float32.
SCRIPT = [
    pb.GenerateResponse(
        request_id="r-1",
        text="Hello",
        token_ids=[9707],
        logprobs=[_logprob(9707, -0.5, (9707, -0.5, "Hello"), (13048, -1.25, "Hi"))],
    ),
    pb.GenerateResponse(
        request_id="r-1",
        text=", world",
        token_ids=[11, 1879],
        logprobs=[_logprob(11, -0.25), _logprob(1879, -2.0, (1879, -2.0, " world"))],
    ),
    pb.GenerateResponse(
        request_id="r-1",
        text="!",
        token_ids=[0],
        logprobs=[_logprob(0, -0.125)],
        finish_reason=common_pb2.FINISH_REASON_STOP,
        usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=4, cached_prompt_tokens=2),
    ),
]


@dataclass
class Seen:
    """What the server saw of one call."""

    request: Any
    metadata: dict[str, str | bytes]
    time_remaining: float | None


class FakeRouter(generate_service_pb2_grpc.GenerateServiceServicer):
    """Answers from a script; tests set `responses`, `error`, `endless` before calling."""

    def __init__(self) -> None:
        self.target = ""
        self.port = 0
        self.seen: list[Seen] = []
        self.responses = list(SCRIPT)
        # (code, details): abort after `error_after` responses (Generate) or at once (unary).
        self.error: tuple[grpc.StatusCode, str] | None = None
        self.error_after = 0
        # Stream forever, so a stream that ends was ended by the client (cancel or deadline).
        self.endless = False
        self.stream_started = threading.Event()
        self.stream_ended = threading.Event()

    def _record(self, request: Any, context: grpc.ServicerContext) -> None:
        self.seen.append(
            Seen(request, dict(context.invocation_metadata()), context.time_remaining())
        )

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        self._record(request, context)
        context.add_callback(self.stream_ended.set)
        self.stream_started.set()
        if self.endless:
            for i in range(100_000):
                yield pb.GenerateResponse(text="x", token_ids=[i])
                time.sleep(0.01)
        elif self.error is None:
            yield from self.responses
        else:
            yield from self.responses[: self.error_after]
            context.abort(*self.error)

    def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.ServicerContext
    ) -> pb.TokenizeResponse:
        self._record(request, context)
        if self.error is not None:
            context.abort(*self.error)
        text = request.prompt or "".join(f"<{m.role}>{m.content}" for m in request.messages)
        return pb.TokenizeResponse(token_ids=[ord(c) for c in text], text=text)

    def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetModelInfoResponse:
        self._record(request, context)
        return pb.GetModelInfoResponse(
            model="tiny-qwen3",
            max_model_len=2048,
            vocab_size=151936,
            num_engines=2,
            max_tokens_default=256,
        )


@pytest.fixture
def router() -> Iterator[FakeRouter]:
    """A started server on 127.0.0.1 with the fake router and grpc.health.v1."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    fake = FakeRouter()
    generate_service_pb2_grpc.add_GenerateServiceServicer_to_server(fake, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("llmserve.v1.GenerateService", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    fake.port = server.add_insecure_port("127.0.0.1:0")
    fake.target = f"127.0.0.1:{fake.port}"
    server.start()
    yield fake
    server.stop(grace=None)


class SyncDriver:
    """`LLMClient` behind the driver interface."""

    def __init__(self, target: str, **options: Any) -> None:
        self.client = LLMClient(target, **options)

    def stream(self, *args: Any, **kwargs: Any) -> tuple[list[Chunk], grpc.RpcError | None]:
        """The chunks received, and the error that ended the stream if one did."""
        chunks: list[Chunk] = []
        try:
            for chunk in self.client.generate(*args, **kwargs):
                chunks.append(chunk)
        except grpc.RpcError as err:
            return chunks, err
        return chunks, None

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.client, method)(*args, **kwargs)

    def close(self) -> None:
        self.client.close()


class AsyncDriver:
    """`AsyncLLMClient` behind the driver interface, each call run on one private event loop."""

    def __init__(self, target: str, **options: Any) -> None:
        self._runner = asyncio.Runner()
        self.client: AsyncLLMClient = self._runner.run(self._open(target, options))

    @staticmethod
    async def _open(target: str, options: dict[str, Any]) -> AsyncLLMClient:
        return AsyncLLMClient(target, **options)

    async def _stream(self, *args: Any, **kwargs: Any) -> tuple[list[Chunk], grpc.RpcError | None]:
        chunks: list[Chunk] = []
        try:
            async for chunk in self.client.generate(*args, **kwargs):
                chunks.append(chunk)
        except grpc.RpcError as err:
            return chunks, err
        return chunks, None

    def stream(self, *args: Any, **kwargs: Any) -> tuple[list[Chunk], grpc.RpcError | None]:
        """The chunks received, and the error that ended the stream if one did."""
        return self._runner.run(self._stream(*args, **kwargs))

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._runner.run(getattr(self.client, method)(*args, **kwargs))

    def close(self) -> None:
        self._runner.run(self.client.close())
        self._runner.close()


@pytest.fixture(params=["sync", "async"])
def connect(request: pytest.FixtureRequest) -> Iterator[Callable[..., SyncDriver | AsyncDriver]]:
    """Opens a client of the kind under test: `connect(target, **LLMClient options)`."""
    driver_type = SyncDriver if request.param == "sync" else AsyncDriver
    opened: list[SyncDriver | AsyncDriver] = []

    def open_driver(target: str, **options: Any) -> SyncDriver | AsyncDriver:
        opened.append(driver_type(target, **options))
        return opened[-1]

    yield open_driver
    for driver in opened:
        driver.close()
