"""Every string and repeated field is bounded, in both tiers: one past a bound gets
INVALID_ARGUMENT naming the field and its limit, and garbage gets INVALID_ARGUMENT too."""

from pathlib import Path

import grpc
import pytest
from tokenizers import Tokenizer

from llmserve.clients import LLMClient
from llmserve.common import request_limits as limits
from llmserve.router.tokenizer import max_chars_per_token
from llmserve.v1 import common_pb2, engine_service_pb2, engine_service_pb2_grpc

MAX_MODEL_LEN = 512  # the tiny checkpoint's max_position_embeddings
TOO_LONG_ID = "r" * (limits.MAX_ID_CHARS + 1)
TOO_LONG_TENANT = "t" * (limits.MAX_TENANT_CHARS + 1)
TOO_MANY_STOP_IDS = [1] * (limits.MAX_STOP_TOKEN_IDS + 1)
ID_LIMIT = f"limit is {limits.MAX_ID_CHARS}"
VOCAB_SIZE = 641  # the tiny checkpoint's tokenizer
TOO_MANY_BIASES = {token: 1.0 for token in range(limits.MAX_LOGIT_BIAS + 1)}

# Penalties, logit_bias and min_tokens past each bound, as client keyword arguments (with
# max_tokens=2), and what the error must say: the router and the engine check them alike.
SAMPLING_CASES: list[tuple[dict, list[str]]] = [
    ({"presence_penalty": 2.5}, ["sampling.presence_penalty", "[-2, 2]"]),
    ({"presence_penalty": -2.5}, ["sampling.presence_penalty", "[-2, 2]"]),
    ({"frequency_penalty": 2.5}, ["sampling.frequency_penalty", "[-2, 2]"]),
    ({"frequency_penalty": -2.5}, ["sampling.frequency_penalty", "[-2, 2]"]),
    ({"repetition_penalty": 0.0}, ["sampling.repetition_penalty", "(0, 2]"]),
    ({"repetition_penalty": 2.5}, ["sampling.repetition_penalty", "(0, 2]"]),
    ({"logit_bias": TOO_MANY_BIASES}, ["sampling.logit_bias", "limit is 300"]),
    ({"logit_bias": {5: 100.5}}, ["sampling.logit_bias[0].bias", "[-100, 100]"]),
    ({"logit_bias": {5: 1.0, 6: -101.0}}, ["sampling.logit_bias[1].bias", "[-100, 100]"]),
    ({"logit_bias": {-1: 1.0}}, ["sampling.logit_bias[0].token_id", ">= 0"]),
    # Past the vocabulary: the engine's check, which a router passes on.
    ({"logit_bias": {VOCAB_SIZE: 1.0}}, ["sampling.logit_bias", f"[0, {VOCAB_SIZE})"]),
    ({"min_tokens": -1}, ["stopping.min_tokens", ">= 0"]),
    ({"min_tokens": 3}, ["stopping.min_tokens", "exceeds max_tokens 2"]),
    ({"logit_bias": {token: 1.0 for token in range(10_000)}},
     ["sampling.logit_bias", "10000 entries", "limit is 300"]),
    ({"n": 0}, ["sampling.n", f"[1, {limits.MAX_N}]"]),
    ({"n": limits.MAX_N + 1}, ["sampling.n", f"[1, {limits.MAX_N}]"]),
    ({"prompt_logprobs": limits.MAX_PROMPT_LOGPROBS + 1},
     ["sampling.prompt_logprobs", f"[0, {limits.MAX_PROMPT_LOGPROBS}]"]),
    ({"prompt_logprobs": -1}, ["sampling.prompt_logprobs", f"[0, {limits.MAX_PROMPT_LOGPROBS}]"]),
    ({"speculative_tokens": limits.MAX_SPECULATIVE_TOKENS + 1},
     ["sampling.speculative_tokens", f"[0, {limits.MAX_SPECULATIVE_TOKENS}]"]),
    ({"speculative_tokens": -1},
     ["sampling.speculative_tokens", f"[0, {limits.MAX_SPECULATIVE_TOKENS}]"]),
]
SAMPLING_IDS = [
    "presence_high", "presence_low", "frequency_high", "frequency_low", "repetition_zero",
    "repetition_high", "logit_bias_count", "bias_high", "bias_low", "bias_negative_id",
    "bias_vocab", "min_tokens_negative", "min_tokens_over_max", "logit_bias_10000", "n_zero",
    "n_over", "prompt_logprobs_over", "prompt_logprobs_negative", "speculative_tokens_over",
    "speculative_tokens_negative",
]


def prompt_char_limit(model_dir: Path) -> int:
    per_token = max_chars_per_token(Tokenizer.from_file(str(model_dir / "tokenizer.json")))
    assert per_token is not None
    return int((MAX_MODEL_LEN - 1) * per_token)


def user(content: str, role: str = "user") -> dict[str, str]:
    return {"role": role, "content": content}


# Keyword arguments of LLMClient.generate_text and what the error must say.
ROUTER_CASES: list[tuple[dict, list[str]]] = [
    ({"request_id": TOO_LONG_ID}, ["request_id", ID_LIMIT]),
    ({"tenant": TOO_LONG_TENANT}, ["tenant", f"limit is {limits.MAX_TENANT_CHARS}"]),
    (
        {"stop_token_ids": TOO_MANY_STOP_IDS},
        ["stopping.stop_token_ids", f"limit is {limits.MAX_STOP_TOKEN_IDS}"],
    ),
    ({"stop": ["x"] * (limits.MAX_STOP_STRINGS + 1)}, ["stop:", "limit is 16"]),
    ({"stop": ["x" * (limits.MAX_STOP_CHARS + 1)]}, ["stop[0]", "1..256"]),
    ({"messages": [user("hi")] * (limits.MAX_MESSAGES + 1)}, ["messages:", "limit is 2048"]),
    ({"messages": [user("hi", role="r" * 65)]}, ["messages[0].role", "1..64"]),
    ({"messages": [user("hi"), user("hi", role="")]}, ["messages[1].role", "1..64"]),
    ({"logprobs": limits.MAX_LOGPROBS + 1}, ["sampling.logprobs", "20"]),
    *SAMPLING_CASES,
]


@pytest.mark.parametrize(("params", "expected"), ROUTER_CASES, ids=lambda v: str(v)[:30])
def test_router_refuses_each_oversized_field(qwen3_system, params: dict, expected: list) -> None:
    _, _, router = qwen3_system
    if "messages" not in params:
        params = {"prompt": "hi", **params}
    with LLMClient(router.address) as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.generate_text(**params, max_tokens=2, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert all(fragment in refused.value.details() for fragment in expected)


def test_router_refuses_an_oversized_request_id_in_metadata(qwen3_system) -> None:
    _, _, router = qwen3_system
    with LLMClient(router.address) as client, pytest.raises(grpc.RpcError) as refused:
        client.generate_text("hi", max_tokens=2, metadata=[("x-request-id", TOO_LONG_ID)])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-request-id" in refused.value.details() and ID_LIMIT in refused.value.details()


def test_router_refuses_text_too_long_to_fit_before_tokenizing(qwen3_system) -> None:
    model_dir, _, router = qwen3_system
    limit = prompt_char_limit(model_dir)
    too_long = "a" * (limit + 1)
    with LLMClient(router.address) as client:
        for call in (
            lambda: client.generate_text(too_long, timeout=30),
            lambda: client.tokenize(too_long, timeout=30),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"prompt: {limit + 1} characters; the limit is {limit}" in (
                refused.value.details()
            )
        # The rendered conversation is bounded the same way.
        with pytest.raises(grpc.RpcError) as refused:
            client.tokenize(messages=[user(too_long)], timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "messages:" in refused.value.details()
        assert f"the limit is {limit}" in refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            client.tokenize(messages=[user("hi")] * (limits.MAX_MESSAGES + 1), timeout=30)
        assert "limit is 2048" in refused.value.details()


def engine_fields(params: dict) -> dict:
    """Client keyword arguments of SAMPLING_CASES as an engine request's fields."""
    params = dict(params)
    stopping = common_pb2.StoppingCriteria(max_tokens=2, min_tokens=params.pop("min_tokens", 0))
    bias = params.pop("logit_bias", {})
    sampling = common_pb2.SamplingParams(
        logit_bias=[common_pb2.LogitBias(token_id=t, bias=b) for t, b in bias.items()], **params
    )
    return {"sampling": sampling, "stopping": stopping}


def test_values_at_every_bound_are_served(qwen3_system) -> None:
    _, engine, router = qwen3_system
    at_bounds = {
        "presence_penalty": -2.0, "frequency_penalty": 2.0, "repetition_penalty": 2.0,
        "logit_bias": {token: (100.0 if token % 2 else -100.0)
                       for token in range(VOCAB_SIZE - limits.MAX_LOGIT_BIAS, VOCAB_SIZE)},
        "min_tokens": 2,
        # Accepted (and ignored) by an engine that does not speculate.
        "speculative_tokens": limits.MAX_SPECULATIVE_TOKENS,
    }
    with LLMClient(router.address) as client:
        completion = client.generate_text(prompt_token_ids=[5, 6, 7], max_tokens=2, **at_bounds)
    assert completion.usage is not None and completion.usage.completion_tokens == 2
    with grpc.insecure_channel(engine.address) as channel:
        stub = engine_service_pb2_grpc.EngineServiceStub(channel)
        responses = list(stub.Generate(engine_request(**engine_fields(at_bounds)), timeout=30))
    assert responses[-1].usage.completion_tokens == 2


def engine_request(**fields: object) -> engine_service_pb2.EngineServiceGenerateRequest:
    return engine_service_pb2.EngineServiceGenerateRequest(
        prompt_token_ids=fields.pop("prompt_token_ids", [5, 6, 7]),
        stopping=fields.pop("stopping", common_pb2.StoppingCriteria(max_tokens=2)),
        **fields,
    )


ENGINE_CASES: list[tuple[engine_service_pb2.EngineServiceGenerateRequest, list[str]]] = [
    (engine_request(request_id=TOO_LONG_ID), ["request_id", ID_LIMIT]),
    (engine_request(tenant=TOO_LONG_TENANT), ["tenant", f"limit is {limits.MAX_TENANT_CHARS}"]),
    (
        engine_request(stopping=common_pb2.StoppingCriteria(stop_token_ids=TOO_MANY_STOP_IDS)),
        ["stopping.stop_token_ids", f"limit is {limits.MAX_STOP_TOKEN_IDS}"],
    ),
    (
        engine_request(prompt_token_ids=[1] * MAX_MODEL_LEN),
        ["prompt_token_ids", f"limit is {MAX_MODEL_LEN - 1}"],
    ),
    (engine_request(prompt_token_ids=[]), ["prompt_token_ids", "empty"]),
    (
        engine_request(sampling=common_pb2.SamplingParams(logprobs=limits.MAX_LOGPROBS + 1)),
        ["sampling.logprobs", "20"],
    ),
    (engine_request(priority=9), ["priority", "9"]),
    *[(engine_request(**engine_fields(params)), expected) for params, expected in SAMPLING_CASES],
    (
        engine_request(sampling=common_pb2.SamplingParams(logit_bias=[
            common_pb2.LogitBias(token_id=5, bias=1.0), common_pb2.LogitBias(token_id=5, bias=2.0)
        ])),
        ["sampling.logit_bias[1].token_id", "5 appears more than once"],
    ),
    (
        # With max_tokens unset, min_tokens is bounded by the default max_tokens that applies.
        engine_request(stopping=common_pb2.StoppingCriteria(min_tokens=MAX_MODEL_LEN)),
        ["stopping.min_tokens", "exceeds max_tokens", "default"],
    ),
]
ENGINE_IDS = [
    "request_id",
    "tenant",
    "stop_token_ids",
    "prompt_token_ids",
    "empty",
    "logprobs",
    "priority",
    *SAMPLING_IDS,
    "bias_duplicate",
    "min_tokens_over_default",
]


@pytest.mark.parametrize(("request_", "expected"), ENGINE_CASES, ids=ENGINE_IDS)
def test_engine_generate_refuses_each_oversized_field(
    qwen3_system, request_: engine_service_pb2.EngineServiceGenerateRequest, expected: list[str]
) -> None:
    _, engine, _ = qwen3_system
    with grpc.insecure_channel(engine.address) as channel:
        stub = engine_service_pb2_grpc.EngineServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(request_, timeout=30))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert all(fragment in refused.value.details() for fragment in expected)


def test_engine_generate_streams_refuses_each_oversized_field(qwen3_system) -> None:
    """Each bad stream ends alone, with INVALID_ARGUMENT; a good one on the call still runs."""
    _, engine, _ = qwen3_system
    actions = [
        engine_service_pb2.StreamAction(stream_id=i, start=request_)
        for i, (request_, _) in enumerate(ENGINE_CASES)
    ]
    good_id = len(actions)
    actions.append(engine_service_pb2.StreamAction(stream_id=good_id, start=engine_request()))
    errors: dict[int, engine_service_pb2.StreamUpdate] = {}
    finished = False
    with grpc.insecure_channel(engine.address) as channel:
        stub = engine_service_pb2_grpc.EngineServiceStub(channel)
        call = stub.GenerateStreams(
            iter([engine_service_pb2.GenerateStreamsRequest(actions=actions)]), timeout=30
        )
        for message in call:
            for update in message.updates:
                if update.error_code:
                    errors[update.stream_id] = update
                elif update.stream_id == good_id:
                    finished = finished or bool(update.response.finish_reason)
    assert finished
    assert sorted(errors) == list(range(len(ENGINE_CASES)))
    for stream_id, (_, expected) in enumerate(ENGINE_CASES):
        update = errors[stream_id]
        assert update.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert all(fragment in update.error_message for fragment in expected)


def raw_call(channel: grpc.Channel, path: str, data: bytes, kind: str) -> grpc.RpcError:
    """Sends `data` as is (identity serializers) to a method of `kind` "unary", "stream" (a
    response stream) or "bidi"; returns the error the call ends with."""
    with pytest.raises(grpc.RpcError) as refused:
        if kind == "unary":
            channel.unary_unary(path)(data, timeout=10)
        elif kind == "stream":
            list(channel.unary_stream(path)(data, timeout=10))
        else:
            list(channel.stream_stream(path)(iter([data]), timeout=10))
    return refused.value


def test_engine_answers_garbage_with_invalid_argument(qwen3_system) -> None:
    _, engine, _ = qwen3_system
    bad_utf8 = engine_request(request_id="XY").SerializeToString().replace(b"XY", b"\xff\xfe")
    garbage = b"\xff\xff\xff"
    with grpc.insecure_channel(engine.address) as channel:
        for method, kind, data, named in [
            ("Generate", "stream", garbage, "llmserve.v1.EngineServiceGenerateRequest"),
            ("Generate", "stream", bad_utf8, "request_id: not valid UTF-8"),
            ("GenerateStreams", "bidi", garbage, "llmserve.v1.GenerateStreamsRequest"),
            ("GetInfo", "unary", garbage, "llmserve.v1.GetInfoRequest"),
            ("WatchLoad", "stream", garbage, "llmserve.v1.WatchLoadRequest"),
            ("WatchKvEvents", "stream", garbage, "llmserve.v1.WatchKvEventsRequest"),
        ]:
            error = raw_call(channel, f"/llmserve.v1.EngineService/{method}", data, kind)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert named in error.details(), method
        stub = engine_service_pb2_grpc.EngineServiceStub(channel)
        assert list(stub.Generate(engine_request(), timeout=30))[-1].finish_reason


def test_router_answers_garbage_with_invalid_argument(qwen3_system) -> None:
    _, _, router = qwen3_system
    with grpc.insecure_channel(router.address) as channel:
        for method, kind in [
            ("Generate", "stream"),
            ("Tokenize", "unary"),
            ("GetModelInfo", "unary"),
        ]:
            error = raw_call(
                channel, f"/llmserve.v1.GenerateService/{method}", b"\xff\xff\xff", kind
            )
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, method
    with LLMClient(router.address) as client:
        assert client.generate_text("still serving", max_tokens=2).token_ids
