"""One request served to a gRPC stream: validated, sent to the core, counted and logged.

Both ways of asking an engine for tokens (a `Generate` call per request, or a stream on a
`GenerateStreams` call) serve each request through one of these. Outputs are handed to the
caller's `deliver` callback from the event loop's dispatch of a step, with no task in between:
the request's first token reaches its gRPC writer one loop iteration after the core sent it.
"""

import time
from collections.abc import Callable

import grpc
import structlog

from llmserve.common.call_outcome import CANCELLED, FINISHED, status_outcome
from llmserve.common.request_limits import InvalidRequestError
from llmserve.common.wire import MalformedRequest
from llmserve.engine_service.frontend import metrics
from llmserve.engine_service.frontend.async_engine import (
    AsyncEngine,
    EngineDeadError,
    RequestRejected,
)
from llmserve.engine_service.frontend.messages import request_from_proto
from llmserve.engine_service.seam import EngineInfo, RequestOutput
from llmserve.v1 import engine_service_pb2

log = structlog.get_logger(__name__)


class StreamFailure(Exception):
    """A request ended with a gRPC status instead of its last output."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


# Gets each output in order; a StreamFailure, or the output that finishes the request (every
# sample has), is the last. None is a last item too: the request ended with nothing more to send
# (its last running sample was cancelled).
Deliver = Callable[[RequestOutput | StreamFailure | None], None]


def _refusal(code: grpc.StatusCode, details: str) -> StreamFailure:
    """The failure of a request that cannot start, counted under its status."""
    metrics.REQUESTS.labels(status_outcome(code)).inc()
    return StreamFailure(code, details)


class RequestStream:
    """A started request: its outputs go to `deliver` until it ends or `cancel()` is called.

    Each request counts once in `llmserve_engine_requests_total`, refused ones included, under
    its outcome (see `call_outcome`).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        info: EngineInfo,
        message: engine_service_pb2.EngineServiceGenerateRequest | MalformedRequest,
        deliver: Deliver,
        draining: bool = False,
    ) -> None:
        """Validates and starts the request; raises StreamFailure when it cannot start."""
        if isinstance(message, MalformedRequest):
            raise _refusal(grpc.StatusCode.INVALID_ARGUMENT, message.message)
        try:
            self.request = request_from_proto(message, info)
        except InvalidRequestError as exc:
            raise _refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        if draining:
            raise _refusal(grpc.StatusCode.UNAVAILABLE, "engine is shutting down")
        self._engine = engine
        self._deliver = deliver
        self._latency = metrics.StreamLatency(time.monotonic())
        self.ended = False
        self._cancelled: set[int] = set()  # samples stopped by `cancel_sample`
        try:
            engine.open_stream(self.request, self._on_output)
        except EngineDeadError as exc:
            raise _refusal(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        # Logged once the request is on its way to the core: the log line costs no latency.
        request = self.request
        log.info(
            "request_started",
            request_id=request.request_id,
            prompt_tokens=len(request.prompt_token_ids),
            max_tokens=request.sampling.max_tokens,
            priority=request.priority,
            tenant=request.tenant,
        )

    def cancel(self, outcome: str = CANCELLED) -> None:
        """The caller went away: the core aborts the request (nothing happens once it ended).

        `outcome` says why: "cancelled", or "deadline_exceeded" for a call past its deadline.
        """
        if not self.ended:
            self._engine.close_stream(self.request.request_id)
            self._end(outcome)

    def cancel_sample(self, index: int) -> None:
        """Stops one sample (0 to n - 1): the core frees its sequence and blocks, and nothing
        more of it is delivered. An index out of range, or a request that ended, is ignored; so
        is a sample that has finished (the core ignores it too)."""
        if self.ended or not 0 <= index < self.request.sampling.n or index in self._cancelled:
            return
        self._cancelled.add(index)
        self._engine.cancel_sample(self.request.request_id, index)

    def _on_output(self, item: RequestOutput | Exception) -> None:
        if isinstance(item, Exception):
            if isinstance(item, EngineDeadError):
                code = grpc.StatusCode.UNAVAILABLE
            elif isinstance(item, RequestRejected):
                code = getattr(grpc.StatusCode, item.status, grpc.StatusCode.INTERNAL)
            else:
                code = grpc.StatusCode.INVALID_ARGUMENT
            self._end(status_outcome(code))
            self._deliver(StreamFailure(code, str(item)))
            return
        if self._cancelled and item.index in self._cancelled:
            # Output the core sent before it stopped the sample, or the end of a request whose
            # last running sample it was: no more of it goes out.
            if item.request_finished:
                self._end(FINISHED)
                self._deliver(None)
            return
        self._latency.record(item)
        if item.request_finished:
            self._end(FINISHED)
        self._deliver(item)

    def _end(self, outcome: str) -> None:
        self.ended = True
        metrics.REQUESTS.labels(outcome).inc()
        log.info("request_" + outcome, request_id=self.request.request_id)
