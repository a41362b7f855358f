"""A tiny positive temperature samples like greedy through a real engine (issue 25, item 4)."""

import grpc
import pytest

from llmserve.v1 import common_pb2, engine_service_pb2, engine_service_pb2_grpc


def generate(address: str, temperature: float) -> tuple[list[int], list[int]]:
    """The streamed tokens and, per token, the top alternative its logprobs name."""
    request = engine_service_pb2.EngineServiceGenerateRequest(
        prompt_token_ids=[5, 6, 7, 8],
        sampling=common_pb2.SamplingParams(temperature=temperature, seed=3, logprobs=1),
        stopping=common_pb2.StoppingCriteria(max_tokens=12),
    )
    with grpc.insecure_channel(address) as channel:
        responses = list(engine_service_pb2_grpc.EngineServiceStub(channel).Generate(
            request, timeout=60))
    tokens = [t for r in responses for t in r.token_ids]
    top = [lp.top_logprobs[0].token_id for r in responses for lp in r.logprobs]
    return tokens, top


@pytest.mark.parametrize("temperature", [1e-45, 1e-39, 1e-20])
def test_tiny_temperature_streams_the_greedy_tokens(qwen3_system, temperature: float) -> None:
    _, engine, _ = qwen3_system
    greedy, _ = generate(engine.address, 0.0)
    tokens, top = generate(engine.address, temperature)
    # Before the floor, 1e-45 and 1e-39 drew token 0 (NaN probabilities) and the stream ended.
    assert tokens == top
    assert tokens == greedy
    assert len(tokens) > 1
