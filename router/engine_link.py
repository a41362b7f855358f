"""The router's requests to one engine, all over one GenerateStreams call.

A request costs one message on a call that is already open instead of a call of its own: that
saves the call set-up on both ends of the hop, which is most of what the hop adds to a request's
first token. The engine sends every stream's new tokens of a step in one message. When a request
has several responses queued here (the router fell behind), its reader gets them merged into one.

The call is opened at the first request and again after it breaks; a break ends every stream on
it with UNAVAILABLE, which the forwarder treats as an engine failure.
"""

import asyncio
import itertools
import operator
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import grpc

from llmserve.common.stream_order import by_sample, first_tokens_first
from llmserve.v1 import common_pb2, engine_service_pb2, engine_service_pb2_grpc

_Update = engine_service_pb2.StreamUpdate
_Message = engine_service_pb2.GenerateStreamsRequest
# A request, or its fields: from fields the message is built once, inside the one that carries it
# (a copy of a long prompt costs as much as building it).
_Request = engine_service_pb2.EngineServiceGenerateRequest | Mapping[str, object]


class StreamError(Exception):
    """A stream ended without its last response: the engine's status, or the call broke."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


_CODES = {code.value[0]: code for code in grpc.StatusCode}
_STREAM_ID = operator.attrgetter("stream_id")
# Readers woken per pass of the event loop: few enough, at the router's CPU cost per relayed
# response, that a pass stays short, so calls arriving while many streams run are accepted
# promptly (see hand_out).
WAKE_BATCH = 8


class SampleStops:
    """The samples of a request its reader has declared done before their end (a stop string
    ended them): the engine serving them is told to stop each (`StreamAction.cancel_sample`)."""

    __slots__ = ("done", "on_stop")

    def __init__(self) -> None:
        self.done: set[int] = set()
        # Set while an engine stream serves the samples under their own indices.
        self.on_stop: Callable[[int], None] | None = None

    def stop(self, index: int) -> None:
        if index not in self.done:
            self.done.add(index)
            if self.on_stop is not None:
                self.on_stop(index)


class StreamInbox:
    """A stream's updates not yet relayed, and its reader's wake-up when it waits for them.

    What an asyncio.Queue per stream did, for a fraction of its calls: the reader takes
    everything queued at once, and a put wakes it only if it waits.
    """

    __slots__ = ("_waiter", "items")

    def __init__(self) -> None:
        self.items: list[_Update | StreamError] = []
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: _Update | StreamError) -> None:
        self.items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[_Update | StreamError]:
        """Everything queued, in order, once there is at least one item."""
        if not self.items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        items, self.items = self.items, []
        return items


class _LinkCall:
    """One open GenerateStreams call and the streams running on it."""

    def __init__(self, stub: engine_service_pb2_grpc.EngineServiceStub) -> None:
        self.call = stub.GenerateStreams()
        self.streams: dict[int, StreamInbox] = {}
        self.unanswered: set[int] = set()  # streams the engine has sent nothing for yet
        self.broken: StreamError | None = None
        # The next message, built as actions queue: each is written once, into it.
        self._outbox = _Message()
        self._writing = False
        self._flushes: set[asyncio.Task[None]] = set()
        self._reader = asyncio.create_task(self._read())

    async def start(self, stream_id: int, request: _Request) -> None:
        """Queues a stream's start and writes the queue out unless another task already is.

        One write is in flight at a time; whatever queues meanwhile goes out in the next message,
        so a burst of requests costs a few writes, not one each.
        """
        self._outbox.actions.add(stream_id=stream_id, start=request)
        if not self._writing:
            self._writing = True
            await self._flush()

    def cancel_soon(self, stream_id: int) -> None:
        """Queues a stream's cancel without waiting: the write in flight takes it, or one here."""
        self._outbox.actions.add(stream_id=stream_id, cancel=True)
        if not self._writing:
            self._flush_in_background()

    def cancel_sample_soon(self, stream_id: int, index: int) -> None:
        """Queues the cancel of one sample of a stream, as `cancel_soon` does a stream's."""
        self._outbox.actions.add(stream_id=stream_id, cancel_sample=index)
        if not self._writing:
            self._flush_in_background()

    def _flush_in_background(self) -> None:
        self._writing = True
        # Held until done: the event loop keeps only a weak reference to a task.
        flush = asyncio.get_running_loop().create_task(self._flush())
        self._flushes.add(flush)
        flush.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        """Writes queued actions until none are left; the caller has set `_writing`."""
        try:
            while self._outbox.actions and self.broken is None:
                message, self._outbox = self._outbox, _Message()
                await self.call.write(message)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            self._break(StreamError(grpc.StatusCode.UNAVAILABLE, f"engine call broke: {exc}"))
        finally:
            self._writing = False
            if self._outbox.actions and self.broken is None:
                # The writing task was cancelled (its own request went away) with other
                # requests' actions still queued: they must not wait for the next send.
                self._flush_in_background()

    async def _read(self) -> None:
        try:
            async for message in self.call:
                await hand_out(message.updates, self.streams, self.unanswered)
            error = StreamError(grpc.StatusCode.UNAVAILABLE, "engine ended the stream call")
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            # The call's own end (the engine went away) is an engine failure for every stream.
            if code == grpc.StatusCode.CANCELLED:
                code = grpc.StatusCode.UNAVAILABLE
            error = StreamError(code, exc.details() or code.name)
        self._break(error)

    def _break(self, error: StreamError) -> None:
        if self.broken is not None:
            return
        self.broken = error
        for inbox in self.streams.values():
            inbox.put(error)
        self.streams.clear()
        self.call.cancel()

    def close(self) -> None:
        self._break(StreamError(grpc.StatusCode.UNAVAILABLE, "engine left the pool"))
        self._reader.cancel()


class EngineLink:
    """Streams requests to one engine over a shared GenerateStreams call."""

    def __init__(self, stub: engine_service_pb2_grpc.EngineServiceStub) -> None:
        self._stub = stub
        self._current: _LinkCall | None = None
        self._ids = itertools.count(1)

    def _open(self) -> _LinkCall:
        if self._current is None or self._current.broken is not None:
            self._current = _LinkCall(self._stub)
        return self._current

    async def stream(
        self,
        request: _Request,
        deadline: float | None,
        num_samples: int = 1,
        stops: SampleStops | None = None,
    ) -> AsyncIterator[engine_service_pb2.EngineServiceGenerateResponse]:
        """Yields the request's responses; raises StreamError if it ends otherwise.

        `deadline` is on the event loop's clock (None = none): past it the stream ends with
        DEADLINE_EXCEEDED, as a call with that deadline would. The stream ends once each of the
        request's `num_samples` samples (its n) has sent its last response or is in `stops`:
        a sample stopped there is cancelled on the engine, and no more of it is yielded.
        """
        link = self._open()
        stream_id = next(self._ids)
        inbox = StreamInbox()
        link.streams[stream_id] = inbox
        link.unanswered.add(stream_id)
        timer = None
        if deadline is not None:
            timer = asyncio.get_running_loop().call_at(
                deadline,
                inbox.put,
                StreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"),
            )
        unfinished = num_samples
        finished = False
        stopped: set[int] = set()  # samples cancelled
        ended: set[int] = set()  # samples that sent their last response (tracked with `stops`)
        if stops is not None:

            def stop(index: int) -> None:
                # Called by the reader between two responses: the loop below sees `finished`.
                nonlocal unfinished, finished
                if 0 <= index < num_samples and index not in ended and not finished:
                    stopped.add(index)
                    ended.add(index)
                    unfinished -= 1
                    finished = unfinished == 0
                    if finished:
                        link.cancel_soon(stream_id)  # it was the last: the whole stream ends
                    else:
                        link.cancel_sample_soon(stream_id, index)

            stops.on_stop = stop
        try:
            await link.start(stream_id, request)
            while not finished:
                responses, failure = _split(await inbox.take())
                for response in merge_per_sample(responses):
                    if stopped and response.index in stopped:
                        continue
                    if response.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                        unfinished -= 1
                        finished = unfinished == 0
                        if stops is not None:
                            ended.add(response.index)
                    yield response
                if failure is not None:
                    raise failure
        finally:
            if stops is not None:
                stops.on_stop = None
            if timer is not None:
                timer.cancel()
            link.unanswered.discard(stream_id)
            if link.streams.pop(stream_id, None) is not None and not finished:
                # Left early (an error here, the client went away): the engine stops the request.
                link.cancel_soon(stream_id)

    def close(self) -> None:
        """Ends the call; its streams fail with UNAVAILABLE."""
        if self._current is not None:
            self._current.close()


async def hand_out(
    updates: Sequence[_Update],
    streams: Mapping[int, StreamInbox],
    unanswered: set[int],
) -> None:
    """Queues each update for its stream's reader (first tokens first), yielding to the event
    loop after every WAKE_BATCH readers woken.

    The readers woken by one message all run in the loop's next pass, and gRPC accepts one new
    call per pass. A message for hundreds of streams made one long pass, so while a burst's
    first streams ran, the rest waited to be accepted (W2's all-at-once burst showed it).
    """
    woken = 0
    for update in first_tokens_first(updates, unanswered, _STREAM_ID):
        inbox = streams.get(update.stream_id)
        if inbox is not None:
            inbox.put(update)
            woken += 1
            if woken % WAKE_BATCH == 0:
                await asyncio.sleep(0)


def _split(
    updates: list[_Update | StreamError],
) -> tuple[list[engine_service_pb2.EngineServiceGenerateResponse], StreamError | None]:
    """The responses before the first failure, and that failure (None if there is none)."""
    responses = []
    for update in updates:
        if isinstance(update, StreamError):
            return responses, update
        if update.error_code:
            return responses, StreamError(_CODES[update.error_code], update.error_message)
        responses.append(update.response)
    return responses, None


def merge_per_sample(
    responses: list[engine_service_pb2.EngineServiceGenerateResponse],
) -> list[engine_service_pb2.EngineServiceGenerateResponse]:
    """`merge_responses` of each sample's responses, in the order each sample first appears:
    the tokens of two samples are never merged."""
    return [merge_responses(group) for group in by_sample(responses)]


def merge_responses(
    responses: list[engine_service_pb2.EngineServiceGenerateResponse],
) -> engine_service_pb2.EngineServiceGenerateResponse:
    """One response for several a reader found queued: their tokens and logprobs in order, the
    last one's finish reason and usage. The first becomes the merged one (no one else reads it).

    The engine sends the same for outputs that queued there (`response_from_outputs`).
    """
    merged = responses[0]
    if len(responses) == 1:
        return merged
    for response in responses[1:]:
        # Protobuf's merge (in C) costs a fraction of extending field by field into a new
        # message. Usage counts so far, taken whole from the newest: MergeFrom alone would keep
        # an older nonzero count where the newest has zero.
        merged.ClearField("usage")
        merged.MergeFrom(response)
    return merged
