"""The router's deliberate limits over loopback: message size and calls in flight."""

import grpc
import pytest
from launcher import ServerProcess

from llmserve.clients import LLMClient


@pytest.fixture(scope="module")
def small_router(tiny_checkpoint, start_engine, start_router) -> ServerProcess:
    model_dir = tiny_checkpoint("qwen3")
    engine = start_engine(model_dir)
    return start_router(model_dir, [engine], "--max-message-mb", "1", "--max-concurrent-rpcs", "2")


def test_oversized_request_is_resource_exhausted(small_router: ServerProcess) -> None:
    with LLMClient(small_router.address) as client, pytest.raises(grpc.RpcError) as refused:
        client.tokenize("x" * (2 << 20), timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_calls_beyond_the_concurrency_limit_are_refused_at_once(
    small_router: ServerProcess,
) -> None:
    with LLMClient(small_router.address) as client:
        streams = [
            client.generate("Hello", max_tokens=400, ignore_eos=True, timeout=60) for _ in range(2)
        ]
        for stream in streams:
            next(stream)
        with pytest.raises(grpc.RpcError) as refused:
            client.tokenize("Hello", timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for stream in streams:
            stream.close()
