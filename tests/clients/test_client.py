"""LLMClient and AsyncLLMClient against a real gRPC server on loopback (each test runs for both)."""

from __future__ import annotations

import socket

import grpc
import pytest

from llmserve.clients import Completion, TokenLogprob, TopLogprob, Usage
from llmserve.v1 import common_pb2, generate_service_pb2


def test_request_fields_arrive_as_set(router, connect) -> None:
    client = connect(router.target)
    _, err = client.stream(
        "Once upon a time",
        max_tokens=17,
        temperature=0.5,
        top_p=0.75,
        top_k=40,
        min_p=0.125,
        seed=1234,
        stop=["\n\n", "END"],
        stop_token_ids=[2, 3],
        ignore_eos=True,
        logprobs=5,
        priority="batch",
        tenant="team-a",
        request_id="req-42",
    )
    assert err is None
    request = router.seen[-1].request
    assert request.prompt == "Once upon a time"
    assert (request.sampling.temperature, request.sampling.top_p) == (0.5, 0.75)
    assert (request.sampling.top_k, request.sampling.min_p) == (40, 0.125)
    assert (request.sampling.seed, request.sampling.logprobs) == (1234, 5)
    assert request.stopping.max_tokens == 17
    assert list(request.stopping.stop_token_ids) == [2, 3]
    assert request.stopping.ignore_eos is True
    assert list(request.stop) == ["\n\n", "END"]
    assert request.priority == common_pb2.PRIORITY_BATCH
    assert (request.tenant, request.request_id) == ("team-a", "req-42")


def test_messages_and_token_ids_arrive(router, connect) -> None:
    client = connect(router.target)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    client.stream(messages=messages, priority="critical")
    client.stream(prompt_token_ids=[1, 2, 3])
    chat, ids = router.seen[-2].request, router.seen[-1].request
    assert [(m.role, m.content) for m in chat.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert chat.prompt == "" and not chat.prompt_token_ids
    assert chat.priority == common_pb2.PRIORITY_CRITICAL
    assert list(ids.prompt_token_ids) == [1, 2, 3]
    assert ids.prompt == "" and not ids.messages


def test_unset_arguments_stay_unset_so_the_server_applies_its_defaults(router, connect) -> None:
    connect(router.target).stream("hi")
    request = router.seen[-1].request
    for name in ("temperature", "top_p", "seed", "logprobs"):
        assert not request.sampling.HasField(name), name
    assert not request.stopping.HasField("max_tokens")
    assert request.priority == common_pb2.PRIORITY_STANDARD
    assert (request.tenant, request.request_id) == ("", "")


def test_text_and_truncation_options_arrive(router, connect) -> None:
    client = connect(router.target)
    client.stream("hi", include_stop_str_in_output=True, skip_special_tokens=False,
                  truncate_prompt_tokens=3)
    client.call("generate_text", "hi", skip_special_tokens=True, truncate_prompt_tokens=1)
    streamed, joined = router.seen[-2].request, router.seen[-1].request
    assert streamed.include_stop_str_in_output and not joined.include_stop_str_in_output
    assert streamed.HasField("skip_special_tokens") and not streamed.skip_special_tokens
    assert joined.HasField("skip_special_tokens") and joined.skip_special_tokens
    assert (streamed.truncate_prompt_tokens, joined.truncate_prompt_tokens) == (3, 1)
    client.stream("hi")
    for name in ("skip_special_tokens", "truncate_prompt_tokens"):
        assert not router.seen[-1].request.HasField(name), name


def test_speculative_tokens_arrive_and_usage_carries_the_speculative_counts(
    router, connect
) -> None:
    client = connect(router.target)
    router.responses = [
        generate_service_pb2.GenerateResponse(
            text="ab", token_ids=[1, 2], finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=2,
                                   speculative_proposed_tokens=8, speculative_accepted_tokens=5),
        )
    ]
    completion = client.call("generate_text", "hi", speculative_tokens=0)
    sent = router.seen[-1].request.sampling
    assert sent.HasField("speculative_tokens") and sent.speculative_tokens == 0
    assert completion.usage == Usage(3, 2, 0, speculative_proposed_tokens=8,
                                     speculative_accepted_tokens=5)
    client.stream("hi", speculative_tokens=16)
    assert router.seen[-1].request.sampling.speculative_tokens == 16
    client.stream("hi")
    assert not router.seen[-1].request.sampling.HasField("speculative_tokens")


def test_out_of_range_values_reach_the_server_unchanged(router, connect) -> None:
    router.error = (grpc.StatusCode.INVALID_ARGUMENT, "temperature must be >= 0, got -1")
    chunks, err = connect(router.target).stream("hi", temperature=-1, top_p=2.0, max_tokens=0)
    request = router.seen[-1].request
    assert (request.sampling.temperature, request.sampling.top_p) == (-1, 2.0)
    assert request.stopping.HasField("max_tokens") and request.stopping.max_tokens == 0
    assert chunks == []
    assert isinstance(err, grpc.RpcError)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "temperature must be >= 0, got -1"


def test_bearer_token_and_metadata_arrive(router, connect) -> None:
    client = connect(router.target, token="s3cret")
    client.stream("hi", metadata=[("x-trace-id", "abc")])
    client.call("tokenize", "hi", metadata=[("x-trace-id", "def")])
    client.call("model_info")
    generate_md, tokenize_md, info_md = (seen.metadata for seen in router.seen)
    assert generate_md["authorization"] == "Bearer s3cret"
    assert generate_md["x-trace-id"] == "abc"
    assert tokenize_md["authorization"] == "Bearer s3cret"
    assert tokenize_md["x-trace-id"] == "def"
    assert info_md["authorization"] == "Bearer s3cret"


def test_no_token_sends_no_authorization(router, connect) -> None:
    connect(router.target).stream("hi")
    assert "authorization" not in router.seen[-1].metadata


def test_deadline_reaches_the_server(router, connect) -> None:
    client = connect(router.target)
    client.stream("hi", timeout=5.0)
    client.call("tokenize", "hi", timeout=3.0)
    client.call("model_info")
    generate_left, tokenize_left, info_left = (seen.time_remaining for seen in router.seen)
    # gRPC rounds the deadline it sends up a little, hence the slack above the timeout.
    assert generate_left is not None and 3.0 < generate_left < 5.1
    assert tokenize_left is not None and 1.0 < tokenize_left < 3.1
    assert info_left is None or info_left > 3600  # no timeout: no deadline


def test_deadline_ends_a_long_stream(router, connect) -> None:
    router.endless = True
    chunks, err = connect(router.target).stream("hi", timeout=0.3)
    assert chunks  # some arrived before the deadline
    assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert router.stream_ended.wait(2)


def test_chunks_convert_text_ids_logprobs_finish_and_usage(router, connect) -> None:
    chunks, err = connect(router.target).stream("hi", logprobs=2)
    assert err is None
    assert [c.text for c in chunks] == ["Hello", ", world", "!"]
    assert [c.token_ids for c in chunks] == [[9707], [11, 1879], [0]]
    assert chunks[0].logprobs == [
        TokenLogprob(9707, -0.5, [TopLogprob(9707, -0.5, "Hello"), TopLogprob(13048, -1.25, "Hi")])
    ]
    assert chunks[1].logprobs == [
        TokenLogprob(11, -0.25, []),
        TokenLogprob(1879, -2.0, [TopLogprob(1879, -2.0, " world")]),
    ]
    assert [c.finish_reason for c in chunks] == [None, None, "stop"]
    assert [c.usage for c in chunks] == [None, None, Usage(3, 4, 2)]
    assert {c.request_id for c in chunks} == {"r-1"}


def test_generate_text_joins_the_stream(router, connect) -> None:
    completion = connect(router.target).call("generate_text", "hi", max_tokens=4)
    assert isinstance(completion, Completion)
    assert completion.text == "Hello, world!"
    assert completion.token_ids == [9707, 11, 1879, 0]
    assert completion.finish_reason == "stop"
    assert completion.usage == Usage(prompt_tokens=3, completion_tokens=4, cached_prompt_tokens=2)
    assert [lp.token_id for lp in completion.logprobs] == [9707, 11, 1879, 0]
    assert completion.request_id == "r-1"
    assert router.seen[-1].request.stopping.max_tokens == 4


def test_length_finish_reason(router, connect) -> None:
    router.responses = [
        generate_service_pb2.GenerateResponse(
            text="ab",
            token_ids=[64, 65],
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=1, completion_tokens=2),
        )
    ]
    completion = connect(router.target).call("generate_text", "hi", max_tokens=2)
    assert (completion.text, completion.finish_reason) == ("ab", "length")
    assert completion.usage == Usage(1, 2, 0)


def test_error_mid_stream_keeps_earlier_chunks_and_raises_the_servers_code(router, connect) -> None:
    router.error = (grpc.StatusCode.RESOURCE_EXHAUSTED, "shed: batch class over its share")
    router.error_after = 1
    chunks, err = connect(router.target).stream("hi")
    assert [c.text for c in chunks] == ["Hello"]
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details() == "shed: batch class over its share"


def test_generate_text_raises_rpc_error(router, connect) -> None:
    router.error = (grpc.StatusCode.UNAVAILABLE, "no engine can serve")
    with pytest.raises(grpc.RpcError) as info:
        connect(router.target).call("generate_text", "hi")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tokenize_prompt_and_messages(router, connect) -> None:
    client = connect(router.target)
    assert client.call("tokenize", "hi") == [ord("h"), ord("i")]
    ids = client.call("tokenize", messages=[{"role": "user", "content": "yo"}])
    assert ids == [ord(c) for c in "<user>yo"]
    assert [(m.role, m.content) for m in router.seen[-1].request.messages] == [("user", "yo")]


def test_unary_error_propagates(router, connect) -> None:
    router.error = (grpc.StatusCode.INVALID_ARGUMENT, "give prompt or messages, not both")
    with pytest.raises(grpc.RpcError) as info:
        connect(router.target).call("tokenize", "a", messages=[{"role": "user", "content": "b"}])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "give prompt or messages, not both"


def test_model_info(router, connect) -> None:
    assert connect(router.target).call("model_info") == {
        "model": "tiny-qwen3",
        "max_model_len": 2048,
        "vocab_size": 151936,
        "num_engines": 2,
        "max_tokens_default": 256,
    }


def test_health(router, connect) -> None:
    client = connect(router.target)
    assert client.call("health") == "SERVING"
    assert client.call("health", "llmserve.v1.GenerateService") == "NOT_SERVING"
    with pytest.raises(grpc.RpcError) as info:
        client.call("health", "no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_unreachable_target_raises_unavailable(connect) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago, now closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(grpc.RpcError) as info:
        connect(f"127.0.0.1:{port}").call("health", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_round_robin_over_a_resolved_address_list(router, connect) -> None:
    # `ipv4:` resolves to an address list like `dns:///` does, without depending on DNS here.
    client = connect(
        f"ipv4:127.0.0.1:{router.port},127.0.0.1:{router.port}", load_balancing="round_robin"
    )
    assert client.call("health") == "SERVING"
    assert client.call("generate_text", "hi").text == "Hello, world!"
