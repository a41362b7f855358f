"""Runs the engine core on its own thread and fans its per-step outputs out to asyncio streams.

The core never waits on a reader: each step's outputs are handed to the event loop in one call,
and a slow stream's tokens pile up in its queue, to be coalesced into one response later.
"""

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog

from llmserve.engine_service.engine_core import EngineCore, LoadSnapshot
from llmserve.engine_service.request import EngineRequest, RequestOutput

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class _Add:
    request: EngineRequest


@dataclass(frozen=True)
class _Abort:
    request_id: str


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; no request can be served."""


class AsyncEngine:
    """The asyncio face of an `EngineCore` running in a background thread."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._inbox: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[RequestOutput | Exception]] = {}
        self._load_watchers: set[asyncio.Queue[LoadSnapshot]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._last_load: LoadSnapshot = core.load()
        self._published_load = self._last_load  # touched by the core thread only
        self.error: BaseException | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)

    async def generate(self, request: EngineRequest) -> AsyncIterator[list[RequestOutput]]:
        """Yields batches of outputs for one request; a batch holds all that arrived meanwhile.

        Leaving early (the client went away) aborts the request and frees its KV blocks.
        """
        if self.error is not None:
            raise EngineDeadError(f"engine loop failed: {self.error}")
        outputs: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self._streams[request.request_id] = outputs
        self._inbox.put(_Add(request))
        finished = False
        try:
            while not finished:
                batch = [await outputs.get()]
                while not outputs.empty():
                    batch.append(outputs.get_nowait())
                for item in batch:
                    if isinstance(item, Exception):
                        raise item
                finished = batch[-1].finish_reason is not None  # type: ignore[union-attr]
                yield batch  # type: ignore[misc]
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                self._inbox.put(_Abort(request.request_id))

    async def watch_load(self) -> AsyncIterator[LoadSnapshot]:
        """Yields the current load, then each new value (intermediate ones may be skipped)."""
        updates: asyncio.Queue[LoadSnapshot] = asyncio.Queue(maxsize=1)
        self._load_watchers.add(updates)
        try:
            yield self._last_load
            while True:
                yield await updates.get()
        finally:
            self._load_watchers.discard(updates)

    def _run(self) -> None:
        try:
            while True:
                if not self._drain_inbox(block=not self.core.has_work):
                    return
                outputs = self.core.step() if self.core.has_work else []
                self._publish(outputs, self.core.load())
        except BaseException as exc:  # the loop must report any failure to every stream
            log.exception("engine_loop_failed")
            self.error = exc
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._fail_all, exc)

    def _drain_inbox(self, block: bool) -> bool:
        """Applies queued adds and aborts; returns False when asked to stop."""
        while True:
            try:
                command = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if command is None:
                return False
            if isinstance(command, _Add):
                try:
                    self.core.add_request(command.request)
                except ValueError as exc:
                    self._publish_error(command.request.request_id, exc)
            else:
                self.core.abort_request(command.request_id)

    def _publish(self, outputs: list[RequestOutput], load: LoadSnapshot) -> None:
        if outputs or load != self._published_load:
            self._published_load = load
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._dispatch, outputs, load)

    def _publish_error(self, request_id: str, exc: Exception) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._dispatch_error, request_id, exc)

    def _dispatch(self, outputs: list[RequestOutput], load: LoadSnapshot) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put_nowait(output)
        if load != self._last_load:
            self._last_load = load
            for watcher in self._load_watchers:
                if watcher.full():
                    watcher.get_nowait()
                watcher.put_nowait(load)

    def _dispatch_error(self, request_id: str, exc: Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for stream in self._streams.values():
            stream.put_nowait(EngineDeadError(f"engine loop failed: {exc}"))
