"""The streams of one GenerateStreams call: many requests over one gRPC call.

A router sends every request to an engine over one such call, so a request costs it one message,
not a call set-up on both sides, and each message back carries the new output of every stream
that has some: a step's tokens for N streams go out as one message, not N. A stream whose output
arrives while the previous message is still being sent has it merged into the next one.
"""

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import grpc

from llmserve.engine_service.messages import response_from_outputs
from llmserve.engine_service.request import RequestOutput
from llmserve.v1 import engine_service_pb2

Run = Callable[
    [engine_service_pb2.EngineServiceGenerateRequest], AsyncIterator[list[RequestOutput]]
]


class StreamFailure(Exception):
    """A request ended with a gRPC status instead of its last output."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class StreamMux:
    """Runs the streams a GenerateStreams call starts and batches their output into messages."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self._tasks: dict[int, asyncio.Task[None]] = {}
        # Output and failures not yet sent, per stream, in arrival order.
        self._outputs: dict[int, list[RequestOutput]] = {}
        self._failures: dict[int, StreamFailure] = {}
        self._ready = asyncio.Event()
        self._requests_ended = False
        self._protocol_error: StreamFailure | None = None

    async def read_requests(
        self, requests: AsyncIterator[engine_service_pb2.GenerateStreamsRequest]
    ) -> None:
        """Starts and cancels streams as the caller asks, until it closes its side."""
        try:
            async for message in requests:
                for action in message.actions:
                    self._handle(action)
        except StreamFailure as exc:
            self._protocol_error = exc
        self._requests_ended = True
        self._ready.set()

    def _handle(self, message: engine_service_pb2.StreamAction) -> None:
        stream_id = message.stream_id
        if message.HasField("start"):
            if stream_id in self._tasks:
                raise StreamFailure(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"stream_id: {stream_id} is already running on this call",
                )
            self._tasks[stream_id] = asyncio.create_task(self._stream(stream_id, message.start))
        elif not message.cancel:
            raise StreamFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"actions: stream {stream_id} has neither start nor cancel=true",
            )
        else:
            task = self._tasks.pop(stream_id, None)
            if task is not None:
                task.cancel()
            self._outputs.pop(stream_id, None)
            self._failures.pop(stream_id, None)

    async def _stream(
        self, stream_id: int, request: engine_service_pb2.EngineServiceGenerateRequest
    ) -> None:
        try:
            async with aclosing(self._run(request)) as batches:
                async for outputs in batches:
                    self._outputs.setdefault(stream_id, []).extend(outputs)
                    self._ready.set()
        except StreamFailure as exc:
            self._failures[stream_id] = exc
            self._ready.set()
        finally:
            if self._tasks.get(stream_id) is asyncio.current_task():
                del self._tasks[stream_id]
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
            if self._requests_ended and not self._tasks:
                return
            await self._ready.wait()
            self._ready.clear()

    def _take(self) -> engine_service_pb2.GenerateStreamsResponse:
        message = engine_service_pb2.GenerateStreamsResponse()
        for stream_id, outputs in self._outputs.items():
            message.updates.add(stream_id=stream_id, response=response_from_outputs(outputs))
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
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
