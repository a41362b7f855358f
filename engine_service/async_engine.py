"""The asyncio face of the engine core, which runs in its own process.

One reader thread receives the core's per-step results and hands each to the event loop in one
call; streams take their tokens from per-request queues, so a slow reader's tokens pile up (and
are coalesced into one response later) without ever holding up the core.
"""

import asyncio
import multiprocessing
import threading
import time
from collections.abc import AsyncIterator, Callable

import structlog

from llmserve.common.logs import LogFormat
from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.core_process import (
    AbortRequest,
    AddRequest,
    RejectedRequest,
    StepResult,
    core_process_main,
)
from llmserve.engine_service.engine_builder import EngineInfo
from llmserve.engine_service.engine_core import LoadSnapshot
from llmserve.engine_service.kv_event_feed import KvEventFeed
from llmserve.engine_service.request import EngineRequest, RequestOutput

log = structlog.get_logger(__name__)


class EngineDeadError(RuntimeError):
    """The engine core process is gone; no request can be served."""


class AsyncEngine:
    """Starts the core process and serves many concurrent streams from its step results."""

    def __init__(self, config: EngineConfig, log_format: LogFormat = "auto",
                 log_level: str = "info") -> None:
        self.config = config
        self.log_format, self.log_level = log_format, log_level
        self.info: EngineInfo | None = None
        self.kv_events = KvEventFeed()
        self.on_step: Callable[[StepResult], None] | None = None
        self.dead = asyncio.Event()
        self.error: str | None = None
        self._streams: dict[str, asyncio.Queue[RequestOutput | Exception]] = {}
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
            target=core_process_main, name="llmserve-engine-core", daemon=True,
            args=(self.config, child, self.log_format, self.log_level))
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

    async def generate(self, request: EngineRequest) -> AsyncIterator[list[RequestOutput]]:
        """Yields batches of outputs for one request; a batch holds all that arrived meanwhile.

        Leaving early (the client went away) aborts the request and frees its KV blocks.
        """
        if self.error is not None:
            raise EngineDeadError(self.error)
        outputs: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self._streams[request.request_id] = outputs
        self._send(AddRequest(request))
        finished = False
        try:
            while not finished:
                batch: list[RequestOutput] = []
                item = await outputs.get()
                while True:
                    if isinstance(item, Exception):
                        raise item
                    batch.append(item)
                    if outputs.empty():
                        break
                    item = outputs.get_nowait()
                finished = batch[-1].finish_reason is not None
                yield batch
        finally:
            self._streams.pop(request.request_id, None)
            if not finished and self.error is None:
                self._send(AbortRequest(request.request_id))

    async def watch_load(self) -> AsyncIterator[LoadSnapshot]:
        """Yields the current load, then each new value (intermediate ones may be skipped)."""
        updates: asyncio.Queue[LoadSnapshot] = asyncio.Queue(maxsize=1)
        self._load_watchers.add(updates)
        try:
            if self._last_load is not None:
                yield self._last_load
            while True:
                yield await updates.get()
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
            stream = self._streams.get(message.request_id)
            if stream is not None:
                stream.put_nowait(ValueError(message.reason))
            return
        now = time.monotonic()
        for output in message.outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                output.arrival = now
                stream.put_nowait(output)
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
        for stream in self._streams.values():
            stream.put_nowait(EngineDeadError(self.error))
        self.kv_events.close()
        self.dead.set()
