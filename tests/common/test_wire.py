"""Malformed request bytes become an error naming the field, never an exception."""

from llmserve.common.wire import MalformedRequest, lenient_deserializer
from llmserve.v1 import generate_service_pb2 as pb


def test_valid_bytes_parse() -> None:
    msg = pb.GenerateRequest(prompt="hi", stop=["a"])
    assert lenient_deserializer(pb.GenerateRequest)(msg.SerializeToString()) == msg


def test_invalid_utf8_names_repeated_and_nested_fields() -> None:
    parse = lenient_deserializer(pb.GenerateRequest)
    raw = pb.GenerateRequest(prompt="hi", stop=["ok", "XY"]).SerializeToString()
    result = parse(raw.replace(b"XY", b"\xff\xfe"))
    assert isinstance(result, MalformedRequest) and result.message.startswith("stop[1]:")
    raw = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content="XY")]
    ).SerializeToString()
    result = parse(raw.replace(b"XY", b"\xc3\x28"))
    assert isinstance(result, MalformedRequest) and result.message.startswith(
        "messages[0].content:"
    )


def test_garbage_is_reported_not_raised() -> None:
    result = lenient_deserializer(pb.GenerateRequest)(b"\xff\xff\xff")
    assert isinstance(result, MalformedRequest)
    assert "llmserve.v1.GenerateRequest" in result.message
