"""Bad input gets INVALID_ARGUMENT naming the field and the limit; the next request is served."""

import grpc
import pytest

from llmserve.clients import LLMClient
from llmserve.v1 import (
    common_pb2,
    engine_service_pb2,
    engine_service_pb2_grpc,
    generate_service_pb2,
)

MAX_MODEL_LEN = 512  # the tiny checkpoint's max_position_embeddings
VOCAB = 641

CASES = [
    ({"prompt": ""}, ["prompt", "empty"]),
    ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, ["prompt", "messages"]),
    ({"prompt": "hi", "temperature": -0.5}, ["sampling.temperature", ">= 0"]),
    ({"prompt": "hi", "top_p": 0.0}, ["sampling.top_p", "(0, 1]"]),
    ({"prompt": "hi", "top_p": 1.5}, ["sampling.top_p", "(0, 1]"]),
    ({"prompt": "hi", "max_tokens": 0}, ["stopping.max_tokens", ">= 1"]),
    ({"prompt": "hi", "max_tokens": -4}, ["stopping.max_tokens", ">= 1"]),
    ({"prompt": "hi", "max_tokens": 10_000}, ["stopping.max_tokens", "limit"]),
    ({"prompt": "hello " * 600}, ["prompt", f"limit is {MAX_MODEL_LEN - 1}"]),
    (
        {"prompt_token_ids": [1] * MAX_MODEL_LEN},
        ["prompt_token_ids", f"limit is {MAX_MODEL_LEN - 1}"],
    ),
    ({"prompt_token_ids": [5, VOCAB + 7]}, ["prompt_token_ids", str(VOCAB + 7), f"[0, {VOCAB})"]),
    ({"prompt_token_ids": [5, -1]}, ["prompt_token_ids", "-1"]),
    ({"prompt": "hi", "stop_token_ids": [VOCAB]}, ["stopping.stop_token_ids", f"[0, {VOCAB})"]),
    ({"prompt": "hi", "logprobs": 50}, ["sampling.logprobs", "20"]),
    ({"prompt": "hi", "messages": None, "stop": [""]}, ["stop[0]", "1..256"]),
]


@pytest.mark.parametrize(("params", "expected"), CASES, ids=[str(c[0])[:40] for c in CASES])
def test_bad_input_is_invalid_argument(qwen3_system, params: dict, expected: list[str]) -> None:
    _, _, router = qwen3_system
    with LLMClient(router.address) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.generate_text(**{k: v for k, v in params.items() if v is not None})
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for fragment in expected:
            assert fragment in caught.value.details()
        assert client.generate_text("still serving", max_tokens=2).usage.completion_tokens >= 1


def test_invalid_utf8_stop_string_names_the_field(qwen3_system) -> None:
    _, _, router = qwen3_system
    request = generate_service_pb2.GenerateRequest(prompt="hi", stop=["ok", "XY"])
    raw = request.SerializeToString().replace(b"XY", b"\xff\xfe")
    with grpc.insecure_channel(router.address) as channel:
        generate = channel.unary_stream(
            "/llmserve.v1.GenerateService/Generate",
            response_deserializer=generate_service_pb2.GenerateResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(generate(raw, timeout=10))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stop[1]" in caught.value.details() and "UTF-8" in caught.value.details()
    with LLMClient(router.address) as client:
        assert client.generate_text("next", max_tokens=2).token_ids


def test_engine_rejects_bad_input_directly(qwen3_system) -> None:
    _, engine, _ = qwen3_system
    with grpc.insecure_channel(engine.address) as channel:
        stub = engine_service_pb2_grpc.EngineServiceStub(channel)
        for request, field in [
            (engine_service_pb2.EngineServiceGenerateRequest(), "prompt_token_ids"),
            (
                engine_service_pb2.EngineServiceGenerateRequest(
                    prompt_token_ids=[1, 2], sampling=common_pb2.SamplingParams(min_p=2.0)
                ),
                "sampling.min_p",
            ),
            (
                engine_service_pb2.EngineServiceGenerateRequest(
                    prompt_token_ids=[1, 2], sampling=common_pb2.SamplingParams(top_k=-1)
                ),
                "sampling.top_k",
            ),
        ]:
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(request, timeout=10))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in caught.value.details()
