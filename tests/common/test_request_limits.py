"""The shared request bounds: at the limit a field passes, one past it the error names both."""

import dataclasses
import re
from pathlib import Path

import pytest

from llmserve.common import request_limits as limits
from llmserve.common.request_limits import InvalidRequestError
from llmserve.engine_service.config import EngineConfig
from llmserve.v1 import common_pb2, engine_service_pb2, generate_service_pb2

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto" / "llmserve" / "v1"
MAX_MODEL_LEN = 512


def public(**fields: object) -> generate_service_pb2.GenerateRequest:
    return generate_service_pb2.GenerateRequest(prompt="hi", **fields)


def engine(**fields: object) -> engine_service_pb2.EngineServiceGenerateRequest:
    return engine_service_pb2.EngineServiceGenerateRequest(prompt_token_ids=[1], **fields)


# (fields at the limit, fields one past it, what the error must say)
SHARED_CASES = {
    "request_id": (
        {"request_id": "r" * limits.MAX_ID_CHARS},
        {"request_id": "r" * (limits.MAX_ID_CHARS + 1)},
        ["request_id", f"{limits.MAX_ID_CHARS + 1} characters", f"limit is {limits.MAX_ID_CHARS}"],
    ),
    "tenant": (
        {"tenant": "t" * limits.MAX_TENANT_CHARS},
        {"tenant": "t" * (limits.MAX_TENANT_CHARS + 1)},
        ["tenant", f"limit is {limits.MAX_TENANT_CHARS}"],
    ),
    "stop_token_ids": (
        {"stopping": common_pb2.StoppingCriteria(stop_token_ids=[1] * limits.MAX_STOP_TOKEN_IDS)},
        {"stopping": common_pb2.StoppingCriteria(stop_token_ids=[1] * 3_000_000)},
        ["stopping.stop_token_ids", "3000000 ids", f"limit is {limits.MAX_STOP_TOKEN_IDS}"],
    ),
    "logprobs": (
        {"sampling": common_pb2.SamplingParams(logprobs=limits.MAX_LOGPROBS)},
        {"sampling": common_pb2.SamplingParams(logprobs=limits.MAX_LOGPROBS + 1)},
        ["sampling.logprobs", f"[0, {limits.MAX_LOGPROBS}]"],
    ),
    "temperature": (
        {"sampling": common_pb2.SamplingParams(temperature=0.0)},
        {"sampling": common_pb2.SamplingParams(temperature=-0.5)},
        ["sampling.temperature", ">= 0"],
    ),
    "top_p": (
        {"sampling": common_pb2.SamplingParams(top_p=1.0)},
        {"sampling": common_pb2.SamplingParams(top_p=0.0)},
        ["sampling.top_p", "(0, 1]"],
    ),
    "top_k": (
        {"sampling": common_pb2.SamplingParams(top_k=0)},
        {"sampling": common_pb2.SamplingParams(top_k=-1)},
        ["sampling.top_k", ">= 0"],
    ),
    "min_p": (
        {"sampling": common_pb2.SamplingParams(min_p=1.0)},
        {"sampling": common_pb2.SamplingParams(min_p=1.5)},
        ["sampling.min_p", "[0, 1]"],
    ),
    "speculative_tokens": (
        {"sampling": common_pb2.SamplingParams(speculative_tokens=limits.MAX_SPECULATIVE_TOKENS)},
        {"sampling": common_pb2.SamplingParams(
            speculative_tokens=limits.MAX_SPECULATIVE_TOKENS + 1)},
        ["sampling.speculative_tokens", "17", f"[0, {limits.MAX_SPECULATIVE_TOKENS}]"],
    ),
    "speculative_tokens_negative": (
        {"sampling": common_pb2.SamplingParams(speculative_tokens=0)},
        {"sampling": common_pb2.SamplingParams(speculative_tokens=-1)},
        ["sampling.speculative_tokens", "-1", f"[0, {limits.MAX_SPECULATIVE_TOKENS}]"],
    ),
    "priority": (
        {"priority": common_pb2.PRIORITY_BATCH},
        {"priority": 9},
        ["priority", "9"],
    ),
}


@pytest.mark.parametrize("make", [public, engine], ids=["GenerateRequest", "EngineService"])
@pytest.mark.parametrize("case", sorted(SHARED_CASES))
def test_shared_fields_are_bounded_in_both_apis(make, case: str) -> None:
    within, beyond, expected = SHARED_CASES[case]
    limits.check_shared_fields(make(**within))
    with pytest.raises(InvalidRequestError) as refused:
        limits.check_shared_fields(make(**beyond))
    for fragment in expected:
        assert fragment in str(refused.value)


def test_stop_strings_are_bounded_in_number_and_length() -> None:
    limits.check_stop_strings(["s" * limits.MAX_STOP_CHARS] * limits.MAX_STOP_STRINGS)
    for stop, expected in [
        (["x"] * (limits.MAX_STOP_STRINGS + 1), ["stop:", f"limit is {limits.MAX_STOP_STRINGS}"]),
        (["ok", "s" * (limits.MAX_STOP_CHARS + 1)], ["stop[1]", f"1..{limits.MAX_STOP_CHARS}"]),
        (["ok", ""], ["stop[1]", f"1..{limits.MAX_STOP_CHARS}"]),
    ]:
        with pytest.raises(InvalidRequestError) as refused:
            limits.check_stop_strings(stop)
        assert all(fragment in str(refused.value) for fragment in expected)


def test_messages_are_bounded_in_number_and_roles() -> None:
    message = generate_service_pb2.ChatMessage
    limits.check_messages([message(role="r" * limits.MAX_ROLE_CHARS)] * limits.MAX_MESSAGES)
    for messages, expected in [
        ([message(role="user")] * (limits.MAX_MESSAGES + 1), ["messages:", "limit is 2048"]),
        ([message(role="user"), message(role="")], ["messages[1].role", "1..64"]),
        ([message(role="r" * (limits.MAX_ROLE_CHARS + 1))], ["messages[0].role", "1..64"]),
    ]:
        with pytest.raises(InvalidRequestError) as refused:
            limits.check_messages(messages)
        assert all(fragment in str(refused.value) for fragment in expected)


def test_prompt_chars_are_refused_only_past_what_max_model_len_tokens_cover() -> None:
    fits = (MAX_MODEL_LEN - 1) * 13
    limits.check_prompt_chars("prompt", fits, MAX_MODEL_LEN, 13.0)
    with pytest.raises(InvalidRequestError) as refused:
        limits.check_prompt_chars("prompt", fits + 1, MAX_MODEL_LEN, 13.0)
    assert f"prompt: {fits + 1} characters; the limit is {fits}" in str(refused.value)
    # A tokenizer without a bound refuses nothing untokenized.
    limits.check_prompt_chars("prompt", 15_000_000, MAX_MODEL_LEN, None)


def test_prompt_tokens_leave_room_for_one_generated_token() -> None:
    limits.check_prompt_tokens("prompt_token_ids", MAX_MODEL_LEN - 1, MAX_MODEL_LEN)
    for num_tokens, expected in [(MAX_MODEL_LEN, f"limit is {MAX_MODEL_LEN - 1}"), (0, "empty")]:
        with pytest.raises(InvalidRequestError) as refused:
            limits.check_prompt_tokens("prompt_token_ids", num_tokens, MAX_MODEL_LEN)
        assert "prompt_token_ids" in str(refused.value) and expected in str(refused.value)


def test_max_tokens_defaults_and_limits() -> None:
    stopping = common_pb2.StoppingCriteria
    assert limits.resolve_max_tokens(stopping(), MAX_MODEL_LEN, 500, 256) == 12
    assert limits.resolve_max_tokens(stopping(max_tokens=12), MAX_MODEL_LEN, 500, 256) == 12
    for max_tokens, expected in [(13, "exceeds the limit 12"), (0, ">= 1")]:
        with pytest.raises(InvalidRequestError) as refused:
            limits.resolve_max_tokens(stopping(max_tokens=max_tokens), MAX_MODEL_LEN, 500, 256)
        assert "stopping.max_tokens" in str(refused.value) and expected in str(refused.value)


def field_comment(proto: str, message: str, field: str) -> str:
    """The comment lines right above `field` in `message` of a .proto file."""
    text = (PROTO_DIR / proto).read_text()
    body = re.search(rf"\nmessage {message} {{\n(.*?)\n}}", text, re.S)
    assert body, f"{message} not in {proto}"
    lines = body.group(1).splitlines()
    (at,) = [i for i, line in enumerate(lines) if re.search(rf"\b{field} = \d+;", line)]
    comment = []
    while at > 0 and lines[at - 1].strip().startswith("//"):
        at -= 1
        comment.insert(0, lines[at].strip().removeprefix("//"))
    return " ".join(comment)


@pytest.mark.parametrize(
    ("proto", "message", "field", "bound"),
    [
        ("generate_service.proto", "GenerateRequest", "prompt", "max_model_len - 1"),
        ("generate_service.proto", "GenerateRequest", "messages", str(limits.MAX_MESSAGES)),
        ("generate_service.proto", "GenerateRequest", "prompt_token_ids", "max_model_len - 1"),
        ("generate_service.proto", "GenerateRequest", "stop", str(limits.MAX_STOP_STRINGS)),
        ("generate_service.proto", "GenerateRequest", "stop", str(limits.MAX_STOP_CHARS)),
        ("generate_service.proto", "GenerateRequest", "tenant", str(limits.MAX_TENANT_CHARS)),
        ("generate_service.proto", "GenerateRequest", "request_id", str(limits.MAX_ID_CHARS)),
        ("generate_service.proto", "ChatMessage", "role", str(limits.MAX_ROLE_CHARS)),
        ("generate_service.proto", "ChatMessage", "content", "GenerateRequest.messages"),
        ("generate_service.proto", "TokenizeRequest", "prompt", "max_model_len - 1"),
        ("generate_service.proto", "TokenizeRequest", "messages", str(limits.MAX_MESSAGES)),
        ("common.proto", "StoppingCriteria", "stop_token_ids", str(limits.MAX_STOP_TOKEN_IDS)),
        ("common.proto", "SamplingParams", "logprobs", str(limits.MAX_LOGPROBS)),
        ("common.proto", "SamplingParams", "speculative_tokens",
         f"0..{limits.MAX_SPECULATIVE_TOKENS}"),
        (
            "engine_service.proto",
            "EngineServiceGenerateRequest",
            "request_id",
            str(limits.MAX_ID_CHARS),
        ),
        (
            "engine_service.proto",
            "EngineServiceGenerateRequest",
            "tenant",
            str(limits.MAX_TENANT_CHARS),
        ),
        ("engine_service.proto", "EngineServiceGenerateRequest", "prompt_token_ids", "vocab_size"),
    ],
)
def test_proto_comments_state_every_bound(proto: str, message: str, field: str, bound: str) -> None:
    assert bound in field_comment(proto, message, field)


def test_the_engine_flag_and_the_request_share_the_speculative_tokens_ceiling() -> None:
    (flag,) = [f for f in dataclasses.fields(EngineConfig) if f.name == "num_speculative_tokens"]
    assert flag.metadata["setting"].high == limits.MAX_SPECULATIVE_TOKENS == 16
