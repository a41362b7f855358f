"""The streams of one GenerateStreams call: many requests over one gRPC call.

A router sends every request to an engine over one such call, so a request costs it one message,
not a call set-up on both sides, and each message back carries the new output of every stream
that has some: a step's tokens for N streams go out as one message, not N. A stream whose output
arrives while the previous message is still being sent has it merged into the next one.

No task runs per stream: a start action sends its request to the core as the message is read,
and outputs land in the outbox straight from the step's dispatch, so the hop through the mux
costs no event-loop iteration of its own either way.
"""

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc

from llmserve.common.stream_order import by_sample
from llmserve.common.wire import MalformedRequest
from llmserve.engine_service.frontend.messages import response_from_outputs
from llmserve.engine_service.frontend.request_stream import Deliver, RequestStream, StreamFailure
from llmserve.engine_service.seam import RequestOutput
from llmserve.v1 import engine_service_pb2

# Starts one request whose outputs go to the given callback; raises StreamFailure if it cannot.
Start = Callable[[engine_service_pb2.EngineServiceGenerateRequest, Deliver], RequestStream]


class StreamMux:
    """Runs the streams a GenerateStreams call starts and batches their output into messages."""

    def __init__(self, start: Start) -> None:
        self._start = start
        self._streams: dict[int, RequestStream] = {}
        # Output and failures not yet sent, per stream, in arrival order.
        self._outputs: dict[int, list[RequestOutput]] = {}
        self._failures: dict[int, StreamFailure] = {}
        self._ready = asyncio.Event()
        self._requests_ended = False
        self._protocol_error: StreamFailure | None = None

    async def read_requests(
        self,
        requests: AsyncIterator[engine_service_pb2.GenerateStreamsRequest | MalformedRequest],
    ) -> None:
        """Starts and cancels streams (or samples of them) as the caller asks, until it closes
        its side."""
        try:
            async for message in requests:
                if isinstance(message, MalformedRequest):
                    # Its stream ids are unknown too: the call cannot go on.
                    raise StreamFailure(grpc.StatusCode.INVALID_ARGUMENT, message.message)
                for action in message.actions:
                    self._handle(action)
        except StreamFailure as exc:
            self._protocol_error = exc
        self._requests_ended = True
        self._ready.set()

    def _handle(self, message: engine_service_pb2.StreamAction) -> None:
        stream_id = message.stream_id
        if message.HasField("start"):
            if stream_id in self._streams:
                raise StreamFailure(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"stream_id: {stream_id} is already running on this call",
                )
            try:
                self._streams[stream_id] = self._start(
                    message.start, lambda item: self._deliver(stream_id, item)
                )
            except StreamFailure as exc:
                self._failures[stream_id] = exc
                self._ready.set()
        elif message.HasField("cancel_sample"):
            # Of a stream unknown here (ended already): ignored, as its cancel would be.
            running = self._streams.get(stream_id)
            if running is not None:
                running.cancel_sample(message.cancel_sample)
        elif not message.cancel:
            raise StreamFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"actions: stream {stream_id} has neither start nor cancel=true",
            )
        else:
            stream = self._streams.pop(stream_id, None)
            if stream is not None:
                stream.cancel()
            self._outputs.pop(stream_id, None)
            self._failures.pop(stream_id, None)

    def _deliver(self, stream_id: int, item: RequestOutput | StreamFailure | None) -> None:
        if item is None:  # ended with nothing more to send (its last sample was cancelled)
            self._streams.pop(stream_id, None)
        elif isinstance(item, StreamFailure):
            self._failures[stream_id] = item
            self._streams.pop(stream_id, None)
        else:
            self._outputs.setdefault(stream_id, []).append(item)
            if item.request_finished:
                self._streams.pop(stream_id, None)
        self._ready.set()

    async def responses(self) -> AsyncIterator[engine_service_pb2.GenerateStreamsResponse]:
        """Messages to send, each with all output gathered since the last; ends with the call.

        Raises StreamFailure when the caller broke the protocol.
        """
        while True:
            if self._protocol_error is not None:
                raise self._protocol_error
            if self._outputs or self._failures:
                yield self._take()
                continue
            if self._requests_ended and not self._streams:
                return
            await self._ready.wait()
            self._ready.clear()

    def _take(self) -> engine_service_pb2.GenerateStreamsResponse:
        message = engine_service_pb2.GenerateStreamsResponse()
        for stream_id, outputs in self._outputs.items():
            for sample in by_sample(outputs):
                message.updates.add(stream_id=stream_id, response=response_from_outputs(sample))
        for stream_id, failure in self._failures.items():
            message.updates.add(
                stream_id=stream_id,
                error_code=failure.code.value[0],
                error_message=failure.details,
            )
        self._outputs, self._failures = {}, {}
        return message

    def close(self) -> None:
        """Cancels every stream still running (the call ended): each aborts its request."""
        for stream in self._streams.values():
            stream.cancel()
        self._streams.clear()
