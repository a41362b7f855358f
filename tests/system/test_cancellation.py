"""A client that cancels mid-stream frees the engine's sequence and its KV blocks at once."""

import time
from collections.abc import Callable

import grpc

from llmserve.clients import LLMClient
from llmserve.v1 import engine_service_pb2

LoadReader = Callable[[str], engine_service_pb2.WatchLoadResponse]


def wait_for_idle(
    engine_load: LoadReader, address: str, timeout: float = 5.0
) -> engine_service_pb2.WatchLoadResponse:
    deadline = time.monotonic() + timeout
    while True:
        load = engine_load(address)
        idle = load.num_running == 0 and load.num_waiting == 0
        if (idle and load.num_free_blocks == load.num_total_blocks) or time.monotonic() > deadline:
            return load
        time.sleep(0.05)


def test_cancel_mid_stream_frees_sequence_and_blocks(qwen3_system, engine_load) -> None:
    _, engine, router = qwen3_system
    assert wait_for_idle(engine_load, engine.address).num_running == 0
    with LLMClient(router.address) as client:
        stream = client.generate("cancel me " * 20, max_tokens=380, ignore_eos=True)
        received = 0
        for chunk in stream:
            received += len(chunk.token_ids)
            if received >= 3:
                break
        busy = engine_load(engine.address)
        assert busy.num_running == 1
        assert busy.num_free_blocks < busy.num_total_blocks
        stream.close()
    load = wait_for_idle(engine_load, engine.address)
    assert (load.num_running, load.num_waiting) == (0, 0)
    assert load.num_free_blocks == load.num_total_blocks


def test_deadline_ends_stream_and_frees_blocks(qwen3_system, engine_load) -> None:
    _, engine, router = qwen3_system
    with LLMClient(router.address) as client:
        try:
            for _ in client.generate("slow " * 10, max_tokens=450, ignore_eos=True, timeout=0.3):
                pass
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            raise AssertionError("450 tokens finished inside 0.3 s: the deadline was not tested")
    load = wait_for_idle(engine_load, engine.address)
    assert (load.num_running, load.num_waiting, load.num_free_blocks) == (
        0,
        0,
        load.num_total_blocks,
    )
