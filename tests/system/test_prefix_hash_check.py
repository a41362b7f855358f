"""The router notices an engine whose KV events do not carry the hashes its GetInfo implies.

The misreporting engine is a real engine behind a real gRPC pass-through that rewrites one
field of GetInfo: the engine itself has no way to lie.
"""

import asyncio
import json
import random
import threading
import time
import urllib.request
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from prometheus_client.parser import text_string_to_metric_families

from llmserve.clients import LLMClient
from llmserve.engine_service.frontend.server import MIN_PING_INTERVAL_MS, SERVICE
from llmserve.router.hash_check import MISSES_TO_FLAG, SETTLE_S
from llmserve.v1 import engine_service_pb2

ROUTED_REQUESTS = 20
REPORTED_SEED = 12345
T = TypeVar("T")


class SeedRewritingProxy:
    """Forwards every EngineService call to `upstream` as raw bytes, except that GetInfo's
    answer reports `seed` as the block-hash seed. Serves on its own event loop thread."""

    def __init__(self, upstream: str, seed: int) -> None:
        self.upstream, self.seed = upstream, seed
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self._call(self._start())

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    async def _start(self) -> int:
        self.channel = grpc.aio.insecure_channel(self.upstream)
        # As the engine's server: routers ping idle connections every few seconds.
        self.server = grpc.aio.server(options=[
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS)])
        handlers = {method.name: self._handler(method) for method in SERVICE.methods}
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)])
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def _handler(self, method: MethodDescriptor) -> grpc.RpcMethodHandler:
        path = f"/{SERVICE.full_name}/{method.name}"
        if method.name == "GetInfo":
            return grpc.unary_unary_rpc_method_handler(self._get_info(path))
        if method.client_streaming:
            relay = self._stream(self.channel.stream_stream(path))
            return grpc.stream_stream_rpc_method_handler(relay)
        return grpc.unary_stream_rpc_method_handler(self._stream(self.channel.unary_stream(path)))

    def _get_info(self, path: str) -> Callable[[bytes, grpc.aio.ServicerContext],
                                                Awaitable[bytes]]:
        call = self.channel.unary_unary(path)

        async def get_info(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            info = engine_service_pb2.GetInfoResponse.FromString(await call(request))
            info.block_hash_seed = self.seed
            return info.SerializeToString()

        return get_info

    @staticmethod
    def _stream(open_call: Callable[[Any], AsyncIterable[bytes]]) -> Callable[
            [Any, grpc.aio.ServicerContext], AsyncIterator[bytes]]:
        async def relay(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            try:
                async for response in open_call(request):
                    yield response
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")

        return relay

    def stop(self) -> None:
        async def close() -> None:
            await self.server.stop(grace=None)
            await self.channel.close()

        self._call(close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def seed_rewriting_proxy() -> Iterator[Callable[[str, int], SeedRewritingProxy]]:
    started: list[SeedRewritingProxy] = []

    def start(upstream: str, seed: int) -> SeedRewritingProxy:
        started.append(SeedRewritingProxy(upstream, seed))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()


def mismatches(metrics_port: int) -> dict[str, float]:
    """llmserve_router_prefix_hash_mismatch_total by engine."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        sample.labels["engine"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "llmserve_router_prefix_hash_mismatch_total"
    }


def health_details(metrics_port: int) -> dict:
    url = f"http://127.0.0.1:{metrics_port}/healthz"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_engine_misreporting_its_hash_seed_is_flagged_within_20_requests(
    tiny_checkpoint, start_engine, start_router, unused_port, seed_rewriting_proxy
) -> None:
    model = tiny_checkpoint("qwen3")
    good = start_engine(model)
    # Hashes its blocks with seed 0 but tells routers another.
    liar = seed_rewriting_proxy(start_engine(model).address, REPORTED_SEED)
    metrics_port = unused_port()
    router = start_router(model, [good, liar], "--metrics-port", str(metrics_port))
    rng = random.Random(12)
    with LLMClient(router.address) as client:
        for i in range(ROUTED_REQUESTS):
            # Three full blocks (block size 16) no earlier prompt shares.
            prompt = [rng.randrange(10, 600) for _ in range(50)]
            client.generate_text(prompt_token_ids=prompt, max_tokens=1, request_id=f"h{i}")

    deadline = time.monotonic() + SETTLE_S + 10
    while not mismatches(metrics_port).get(liar.address):
        assert time.monotonic() < deadline, f"{liar.address} was not flagged"
        time.sleep(0.2)
    assert mismatches(metrics_port) == {liar.address: 1}

    flagged = [e for e in router.log_events() if e.get("event") == "prefix_hash_mismatch"]
    assert len(flagged) == 1, flagged
    assert flagged[0]["level"] == "error" and flagged[0]["engine"] == liar.address
    # Flagged on the evidence of its first requests, not after everything was sent.
    assert MISSES_TO_FLAG <= flagged[0]["routed_requests"] <= ROUTED_REQUESTS

    details = health_details(metrics_port)
    assert details["status"] == "SERVING"
    assert {e["address"]: e["prefix_routing"] for e in details["engines"]} == {
        good.address: "ok",
        liar.address: "degraded",
    }
