"""The asyncio face of the engine core, which runs in its own process.

One reader thread receives the core's per-step results and hands each to the event loop in one
call, which passes every output straight to its stream's sink: a callback of the gRPC edge that
queues it for its reader, so a slow reader's tokens pile up (and are coalesced into one response
later) without ever holding up the core.
"""

import asyncio
import importlib
import multiprocessing
import operator
import threading
import time
from collections.abc import AsyncIterator, Callable

import structlog

from llmserve.common.stream_order import first_tokens_first
from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.frontend.kv_event_feed import KvEventFeed
from llmserve.engine_service.seam import (
    AbortRequest,
    AddRequest,
    EngineInfo,
    EngineRequest,
    LoadSnapshot,
    RejectedRequest,
    RequestOutput,
    StepResult,
)

log = structlog.get_logger(__name__)

_REQUEST_ID = operator.attrgetter("request_id")


# The core process's entry point, named rather than imported: only that process loads the core
# (and torch with it).
CORE_PROCESS_MAIN = "llmserve.engine_service.core.core_process", "core_process_main"


def _run_core_process(*args: object) -> None:
    module, name = CORE_PROCESS_MAIN
    getattr(importlib.import_module(module), name)(*args)


class EngineDeadError(RuntimeError):
    """The engine core process is gone; no request can be served."""


class RequestRejected(ValueError):
    """The core refused the request (or failed it); `status` names the gRPC status code."""

    def __init__(self, reason: str, status: str) -> None:
        super().__init__(reason)
        self.status = status


# Takes a stream's outputs in order; an exception (the core refused the request, or died) is the
# last thing it gets, as is an output that finishes the request (its last sample's last).
Sink = Callable[[RequestOutput | Exception], None]


class AsyncEngine:
    """Starts the core process and serves many concurrent streams from its step results."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.info: EngineInfo | None = None
        self.kv_events = KvEventFeed()
        self.on_step: Callable[[StepResult], None] | None = None
        self.dead = asyncio.Event()
        self.error: str | None = None
        self._streams: dict[str, Sink] = {}
        self._unanswered: set[str] = set()  # streams the core has sent nothing for yet
        self._load_watchers: set[asyncio.Queue[LoadSnapshot]] = set()
        self._last_load: LoadSnapshot | None = None
        self._stopping = False
        self._send_lock = threading.Lock()

    async def start(self) -> EngineInfo:
        """Spawns the core process and waits until it has loaded the model."""
        self._loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_run_core_process, name="llmserve-engine-core", daemon=True,
            args=(self.config, child))
        self._process.start()
        child.close()
        try:
            first = await asyncio.to_thread(self._conn.recv)
        except EOFError as exc:
            raise EngineDeadError(f"engine core exited during start-up "
                                  f"(code {self._process.exitcode})") from exc
        if isinstance(first, Exception):
            raise first
        self.info = first
        threading.Thread(target=self._read, name="engine-core-reader", daemon=True).start()
        return first

    def stop(self) -> None:
        """Asks the core to exit and waits for it."""
        self._stopping = True
        self._send(None)
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
        self.kv_events.close()

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def open_stream(self, request: EngineRequest, sink: Sink) -> None:
        """Sends the request to the core; its outputs go to `sink` as each step produces them.

        Raises EngineDeadError when the core is gone. A stream left before its end must be
        closed (`close_stream`), which aborts the request and frees its KV blocks.
        """
        if self.error is not None:
            raise EngineDeadError(self.error)
        self._streams[request.request_id] = sink
        self._unanswered.add(request.request_id)
        self._send(AddRequest(request))

    def close_stream(self, request_id: str) -> None:
        """Stops a stream that has not ended: its sink gets nothing more and the core aborts it."""
        self._unanswered.discard(request_id)
        if self._streams.pop(request_id, None) is not None and self.error is None:
            self._send(AbortRequest(request_id))

    def cancel_sample(self, request_id: str, index: int) -> None:
        """Asks the core to stop one sample of a running stream and free its KV blocks; the
        stream goes on until its other samples end. If the sample was the last one running, the
        stream's last output is one of no tokens under that index, with request_finished set."""
        if request_id in self._streams and self.error is None:
            self._send(AbortRequest(request_id, index))

    async def watch_load(self, heartbeat_s: float) -> AsyncIterator[LoadSnapshot]:
        """Yields the current load, then each new value (intermediate ones may be skipped), and
        the current one again after `heartbeat_s` without a change: a watcher tells an idle
        engine from a frozen one by the beat."""
        updates: asyncio.Queue[LoadSnapshot] = asyncio.Queue(maxsize=1)
        self._load_watchers.add(updates)
        try:
            if self._last_load is not None:
                yield self._last_load
            while True:
                try:
                    async with asyncio.timeout(heartbeat_s):
                        load = await updates.get()
                except TimeoutError:
                    if self._last_load is None:
                        continue
                    load = self._last_load
                yield load
        finally:
            self._load_watchers.discard(updates)

    def _send(self, command: object) -> None:
        try:
            with self._send_lock:
                self._conn.send(command)
        except (BrokenPipeError, OSError):
            if not self._stopping:
                self._loop.call_soon(self._core_died)

    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                self._loop.call_soon_threadsafe(self._dispatch, message)
        except (EOFError, OSError):
            if not self._stopping:
                self._loop.call_soon_threadsafe(self._core_died)

    def _dispatch(self, message: StepResult | RejectedRequest) -> None:
        if isinstance(message, RejectedRequest):
            self._unanswered.discard(message.request_id)
            sink = self._streams.pop(message.request_id, None)
            if sink is not None:
                sink(RequestRejected(message.reason, message.status))
            return
        now = time.monotonic()
        streams = self._streams
        for output in first_tokens_first(message.outputs, self._unanswered, _REQUEST_ID):
            sink = streams.get(output.request_id)
            if sink is not None:
                output.arrival = now
                if output.request_finished:
                    del streams[output.request_id]
                sink(output)
        self.kv_events.publish(message.stored_hashes, message.removed_hashes)
        if message.load != self._last_load:
            self._last_load = message.load
            for watcher in self._load_watchers:
                if watcher.full():
                    watcher.get_nowait()
                watcher.put_nowait(message.load)
        if self.on_step is not None:
            self.on_step(message)

    def _core_died(self) -> None:
        if self.error is not None:
            return
        self._process.join(timeout=1)
        self.error = f"engine core process exited (code {self._process.exitcode})"
        log.error("engine_core_died", exitcode=self._process.exitcode)
        streams, self._streams = self._streams, {}
        self._unanswered.clear()
        for sink in streams.values():
            sink(EngineDeadError(self.error))
        self.kv_events.close()
        self.dead.set()
