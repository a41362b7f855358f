"""Request decoding that turns malformed bytes into an error naming the field, not a crash.

grpcio answers a request it cannot parse with a bare INTERNAL (UNKNOWN from an asyncio server);
invalid UTF-8 in a string field is the common case (protobuf refuses it), and a caller deserves
to know which field it was. Both tiers serve through `add_lenient_service`: a handler receives a
MalformedRequest instead of a request that could not be parsed, and answers INVALID_ARGUMENT
with its message.
"""

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf import empty_pb2, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

_LENGTH_DELIMITED = 2


@dataclass(frozen=True)
class MalformedRequest:
    """Stands in for a request that could not be parsed; `message` says what was wrong."""

    message: str


async def refuse_malformed(request: object, context: grpc.aio.ServicerContext) -> None:
    """Ends the call with INVALID_ARGUMENT, naming what was wrong, if `request` is malformed."""
    if isinstance(request, MalformedRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def _find_bad_utf8(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """Walks the raw fields and names the first string field that is not valid UTF-8."""
    raw = empty_pb2.Empty()
    raw.ParseFromString(data)
    counts: dict[int, int] = {}
    for field in UnknownFieldSet(raw):
        fd = descriptor.fields_by_number.get(field.field_number)
        if fd is None or field.wire_type != _LENGTH_DELIMITED:
            continue
        index = counts.get(fd.number, 0)
        counts[fd.number] = index + 1
        name = f"{prefix}{fd.name}" + (f"[{index}]" if fd.is_repeated else "")
        if fd.type == FieldDescriptor.TYPE_STRING:
            try:
                field.data.decode("utf-8")
            except UnicodeDecodeError:
                return name
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            found = _find_bad_utf8(fd.message_type, field.data, name + ".")
            if found:
                return found
    return None


def lenient_deserializer(
    message_cls: type[Message],
) -> Callable[[bytes], Message | MalformedRequest]:
    """A request deserializer that returns MalformedRequest instead of raising."""

    def deserialize(data: bytes) -> Message | MalformedRequest:
        try:
            return message_cls.FromString(data)
        except DecodeError:
            try:
                field = _find_bad_utf8(message_cls.DESCRIPTOR, data)
            except DecodeError:
                field = None
            if field:
                return MalformedRequest(f"{field}: not valid UTF-8 (string fields must be UTF-8)")
            return MalformedRequest(f"request is not a valid {message_cls.DESCRIPTOR.full_name}")

    return deserialize


_HANDLER_FACTORIES = {
    # (client streaming, server streaming)
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_lenient_service(
    server: grpc.aio.Server, service: ServiceDescriptor, servicer: object
) -> None:
    """Serves `service` from `servicer` (a method per RPC) with lenient request parsing."""
    handlers = {}
    for method in service.methods:
        factory = _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=lenient_deserializer(
                message_factory.GetMessageClass(method.input_type)
            ),
            response_serializer=message_factory.GetMessageClass(
                method.output_type
            ).SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    # As generated code registers its handlers: looked up by exact method name first.
    server.add_registered_method_handlers(service.full_name, handlers)
