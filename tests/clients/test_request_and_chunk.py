"""Request building, response conversion, channel options and the hand-written health codec."""

from __future__ import annotations

import json

import pytest
from grpc_health.v1 import health_pb2

from llmserve.clients import Chunk, Completion, TokenLogprob, TopLogprob, Usage
from llmserve.clients._base import (
    channel_options,
    health_status_name,
    model_info_to_dict,
)
from llmserve.clients.chunk import chunk_from_proto
from llmserve.clients.request import build_generate_request, build_tokenize_request
from llmserve.v1 import common_pb2, generate_service_pb2


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("critical", common_pb2.PRIORITY_CRITICAL),
        ("standard", common_pb2.PRIORITY_STANDARD),
        ("batch", common_pb2.PRIORITY_BATCH),
        ("BATCH", common_pb2.PRIORITY_BATCH),
    ],
)
def test_priority_names_map_to_the_enum(name: str, value: int) -> None:
    assert build_generate_request("x", priority=name).priority == value


def test_unknown_priority_is_a_value_error_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="critical, standard, batch"):
        build_generate_request("x", priority="urgent")


def test_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        build_generate_request("x", temprature=0.5)  # type: ignore[call-arg]


def test_zero_values_given_explicitly_are_sent() -> None:
    request = build_generate_request("x", temperature=0.0, seed=0, logprobs=0, max_tokens=0)
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0.0
    assert request.sampling.HasField("seed") and request.sampling.HasField("logprobs")
    assert request.stopping.HasField("max_tokens")


def test_penalties_logit_bias_and_min_tokens() -> None:
    request = build_generate_request(
        "x", presence_penalty=-0.5, frequency_penalty=1.0, repetition_penalty=1.1,
        logit_bias={5: 100.0, 9: -2.5}, min_tokens=4,
    )
    sampling = request.sampling
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (-0.5, 1.0)
    assert sampling.HasField("repetition_penalty")
    assert {b.token_id: b.bias for b in sampling.logit_bias} == {5: 100.0, 9: -2.5}
    assert request.stopping.min_tokens == 4
    plain = build_generate_request("x")
    assert not plain.sampling.HasField("repetition_penalty") and not plain.sampling.logit_bias


def test_tokenize_request() -> None:
    assert build_tokenize_request("hi") == generate_service_pb2.TokenizeRequest(prompt="hi")
    request = build_tokenize_request(messages=[{"role": "user", "content": "yo"}])
    assert request.prompt == "" and request.messages[0].content == "yo"


def test_response_without_finish_or_usage() -> None:
    chunk = chunk_from_proto(generate_service_pb2.GenerateResponse(text="a", token_ids=[7]))
    assert chunk == Chunk("a", [7], [], None, None, "")


def test_a_finish_reason_newer_than_the_client_still_ends_the_stream() -> None:
    response = generate_service_pb2.GenerateResponse(finish_reason=7)
    assert chunk_from_proto(response).finish_reason == "unknown_7"


def test_usage_with_all_zero_counts_is_still_usage() -> None:
    response = generate_service_pb2.GenerateResponse(usage=common_pb2.Usage())
    assert chunk_from_proto(response).usage == Usage(0, 0, 0)


def test_prompt_logprobs_are_asked_for_and_read_from_the_first_chunk() -> None:
    assert build_generate_request("x", prompt_logprobs=3).sampling.prompt_logprobs == 3
    assert not build_generate_request("x").sampling.HasField("prompt_logprobs")
    first = generate_service_pb2.GenerateResponse(
        text="a", token_ids=[7],
        prompt_logprobs=[common_pb2.TokenLogprob(
            token_id=5, logprob=-1.5,
            top_logprobs=[common_pb2.TopLogprob(token_id=9, logprob=-0.5, text="nine")])])
    chunks = [chunk_from_proto(first),
              chunk_from_proto(generate_service_pb2.GenerateResponse(text="b", token_ids=[8]))]
    expected = [TokenLogprob(5, -1.5, [TopLogprob(9, -0.5, "nine")])]
    assert chunks[0].prompt_logprobs == expected and chunks[1].prompt_logprobs == []
    assert Completion.from_chunks(chunks).prompt_logprobs == expected


def test_speculative_tokens_are_sent_only_when_given_and_usage_reads_the_counts() -> None:
    assert build_generate_request("x", speculative_tokens=4).sampling.speculative_tokens == 4
    zero = build_generate_request("x", speculative_tokens=0).sampling
    assert zero.HasField("speculative_tokens") and zero.speculative_tokens == 0
    assert not build_generate_request("x").sampling.HasField("speculative_tokens")
    response = generate_service_pb2.GenerateResponse(usage=common_pb2.Usage(
        prompt_tokens=2, completion_tokens=9, speculative_proposed_tokens=12,
        speculative_accepted_tokens=7))
    usage = chunk_from_proto(response).usage
    assert usage == Usage(2, 9, 0, speculative_proposed_tokens=12, speculative_accepted_tokens=7)
    # Without speculation both are 0, and Usage built from the first three counts says so.
    assert Usage(1, 2, 3) == Usage(1, 2, 3, 0, 0)


def test_completion_from_no_chunks() -> None:
    assert Completion.from_chunks([]) == Completion("", [], None, None, [], "")


def test_completion_takes_finish_and_usage_from_the_last_chunk_that_has_them() -> None:
    lp = TokenLogprob(1, -0.5)
    chunks = [
        Chunk("a", [1], [lp], None, None, "id"),
        Chunk("b", [2], [], "length", Usage(1, 2, 0), "id"),
    ]
    assert Completion.from_chunks(chunks) == Completion(
        "ab", [1, 2], "length", Usage(1, 2, 0), [lp], "id"
    )


def test_n_is_sent_only_when_given_and_each_chunk_names_its_sample() -> None:
    assert build_generate_request("x", n=3).sampling.n == 3
    assert not build_generate_request("x").sampling.HasField("n")
    response = generate_service_pb2.GenerateResponse(text="a", token_ids=[1], index=2)
    assert chunk_from_proto(response).index == 2


def test_completion_joins_each_sample_on_its_own() -> None:
    usage = Usage(3, 5, 0)
    chunks = [
        Chunk("a", [1], [], None, None, "id"),
        Chunk("x", [7], [], None, None, "id", index=1),
        Chunk("b", [2], [], "length", None, "id"),
        Chunk("yz", [8, 9], [], "stop", usage, "id", index=1),
    ]
    first = Completion.from_chunks(chunks)
    assert [(s.index, s.text, s.token_ids, s.finish_reason) for s in first.samples] == [
        (0, "ab", [1, 2], "length"), (1, "xyz", [7, 8, 9], "stop")]
    assert first is first.samples[0] and all(s.usage == usage for s in first.samples)
    assert len(Completion.from_chunks(chunks[::2]).samples) == 1


def test_channel_options_add_a_round_robin_service_config() -> None:
    base = [("grpc.max_receive_message_length", -1)]
    assert channel_options(base, None) == base
    merged = channel_options(base, "round_robin")
    assert merged[0] == base[0]
    key, value = merged[1]
    assert key == "grpc.service_config"
    assert json.loads(value) == {"loadBalancingConfig": [{"round_robin": {}}]}


@pytest.mark.parametrize(
    ("status", "name"),
    [(0, "UNKNOWN"), (1, "SERVING"), (2, "NOT_SERVING"), (3, "SERVICE_UNKNOWN"), (200, None)],
)
def test_health_status_names(status: int, name: str | None) -> None:
    response = health_pb2.HealthCheckResponse(status=status)
    assert health_status_name(response) == (name or f"UNKNOWN_STATUS_{status}")


def test_model_info_dict_keeps_zero_fields() -> None:
    info = model_info_to_dict(generate_service_pb2.GetModelInfoResponse(model="m"))
    assert info == {
        "model": "m",
        "max_model_len": 0,
        "vocab_size": 0,
        "num_engines": 0,
        "max_tokens_default": 0,
    }
