"""The structured output bounds both tiers check: at the limit a constraint passes, past it the
error names the field and the limit; the proto comments quote every bound."""

from pathlib import Path

import pytest

from llmserve.common import request_limits as limits
from llmserve.common.request_limits import InvalidRequestError
from llmserve.v1 import common_pb2, engine_service_pb2, generate_service_pb2

PROTO = Path(__file__).resolve().parents[2] / "proto" / "llmserve" / "v1" / "common.proto"
S = common_pb2.StructuredOutput
CHOICES = common_pb2.ChoiceList
TEXT = limits.MAX_STRUCTURED_SPEC_CHARS

WITHIN = [
    S(json_schema="x" * TEXT),
    S(regex="r" * TEXT),
    S(grammar="g" * TEXT),
    S(json_object=True),
    S(choice=CHOICES(choices=["c" * limits.MAX_CHOICE_CHARS] * limits.MAX_CHOICES)),
]
BEYOND = [
    (S(json_schema="x" * (TEXT + 1)), ["structured_output.json_schema", f"limit is {TEXT}"]),
    (S(regex="r" * (TEXT + 1)), ["structured_output.regex", f"limit is {TEXT}"]),
    (S(grammar="g" * (TEXT + 1)), ["structured_output.grammar", f"limit is {TEXT}"]),
    (S(json_schema=""), ["structured_output.json_schema: must not be empty"]),
    (S(json_object=False), ["structured_output.json_object: must be true"]),
    (S(), ["structured_output: set one of"]),
    (S(choice=CHOICES(choices=[])), ["choice.choices: must not be empty"]),
    (S(choice=CHOICES(choices=["c"] * (limits.MAX_CHOICES + 1))),
     ["choice.choices", f"limit is {limits.MAX_CHOICES}"]),
    (S(choice=CHOICES(choices=["ok", "c" * (limits.MAX_CHOICE_CHARS + 1)])),
     ["choice.choices[1]", f"1..{limits.MAX_CHOICE_CHARS}"]),
    (S(choice=CHOICES(choices=["ok", ""])), ["choice.choices[1]"]),
]


def _requests(structured: common_pb2.StructuredOutput) -> list:
    sampling = common_pb2.SamplingParams(structured_output=structured)
    return [generate_service_pb2.GenerateRequest(prompt="hi", sampling=sampling),
            engine_service_pb2.EngineServiceGenerateRequest(prompt_token_ids=[1],
                                                            sampling=sampling)]


@pytest.mark.parametrize("structured", WITHIN, ids=lambda s: s.WhichOneof("kind"))
def test_constraints_at_their_limits_pass_in_both_apis(structured) -> None:
    for request in _requests(structured):
        limits.check_shared_fields(request)


@pytest.mark.parametrize(("structured", "expected"), BEYOND, ids=lambda c: str(c)[:30])
def test_constraints_past_their_limits_are_refused_in_both_apis(structured, expected) -> None:
    for request in _requests(structured):
        with pytest.raises(InvalidRequestError) as refused:
            limits.check_shared_fields(request)
        assert str(refused.value).startswith("sampling.structured_output")
        for fragment in expected:
            assert fragment in str(refused.value)


def test_the_proto_quotes_the_bounds() -> None:
    text = PROTO.read_text()
    for bound in (limits.MAX_STRUCTURED_SPEC_CHARS, limits.MAX_CHOICES, limits.MAX_CHOICE_CHARS):
        assert f"{bound:,}" in text
