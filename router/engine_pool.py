"""The engines a router can send work to, kept current from their own streams.

Engines come from a static `host:port` list or from `dns:NAME:PORT` (a Kubernetes headless
Service), re-resolved periodically. For each engine the pool holds a `GetInfo`, a `WatchLoad`
subscription and a `WatchKvEvents` subscription feeding the prefix index and the hash self-check.
An engine whose streams break (it died, or is restarting) leaves the pool at once and rejoins
when they are back. Engines send their load at least every second even when it holds still: one
silent for longer than the silence timeout (frozen, or cut off without a reset) leaves too, and
its requests fail over as if it had died.
"""

import asyncio
import socket
import time
from dataclasses import dataclass

import grpc
import structlog

from llmserve.router import metrics
from llmserve.router.config import RouterConfig
from llmserve.router.engine_channel import LINK_STREAM_WINDOW_BYTES, open_engine_channel
from llmserve.router.engine_link import EngineLink
from llmserve.router.hash_check import HashSelfCheck
from llmserve.router.prefix_index import PrefixIndex
from llmserve.v1 import engine_service_pb2, engine_service_pb2_grpc

log = structlog.get_logger(__name__)
# Between attempts to subscribe to an engine. A dial waits for the connection (wait_for_ready),
# so these only pace failures of an engine that answers: short, so one back is found at once.
RETRY_MIN_S = 0.1
RETRY_MAX_S = 0.5
# How long GetInfo waits for a connection before the attempt starts over.
GET_INFO_TIMEOUT_S = 5.0
# After its first engine is ready, a starting router waits up to this long for the other engines
# it has found before it reports SERVING: a replica that joins a running fleet then routes its
# first requests with every engine's cached prefixes in its index, not only the first one's.
STARTUP_SYNC_S = 3.0


class EngineStreamError(RuntimeError):
    """A subscription ended or skipped a KV-event batch: resubscribe for a fresh snapshot."""


@dataclass
class Engine:
    """One engine endpoint, what it told us about itself, and this router's work on it."""

    address: str
    channel: grpc.aio.Channel  # GetInfo and the load and KV-event streams
    stub: engine_service_pb2_grpc.EngineServiceStub
    # Requests, over a connection of their own: tokens never queue behind a KV-event snapshot.
    link_channel: grpc.aio.Channel
    link: EngineLink
    info: engine_service_pb2.GetInfoResponse | None = None
    load: engine_service_pb2.WatchLoadResponse | None = None
    kv_synced: bool = False
    # Requests this router has in flight there, and the prompt tokens of those not yet started.
    inflight: int = 0
    inflight_prefill: int = 0
    task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.info is not None and self.load is not None and self.kv_synced

    def queued_prefill_tokens(self) -> int:
        reported = self.load.queued_prefill_tokens if self.load is not None else 0
        return max(reported, self.inflight_prefill)

    def num_running(self) -> int:
        reported = self.load.num_running + self.load.num_waiting if self.load is not None else 0
        return max(reported, self.inflight)


class EnginePool:
    """Keeps the engine set and each engine's state current."""

    def __init__(
        self,
        config: RouterConfig,
        index: PrefixIndex,
        hash_check: HashSelfCheck,
        refresh_s: float = 5.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """Follows `config`'s engines; an engine silent for its engine_silence_timeout_s
        leaves the pool."""
        self.config = config
        self.index = index
        self.hash_check = hash_check
        self.refresh_s = refresh_s
        # None = plaintext; otherwise mutual TLS to every engine.
        self.credentials = credentials
        # The DNS name each resolved address came from: what its TLS certificate names.
        self._server_names: dict[str, str] = {}
        self.engines: dict[str, Engine] = {}
        self._task: asyncio.Task[None] | None = None
        # Set whenever an engine becomes ready or stops being ready (router health follows it).
        self.changed = asyncio.Event()
        self._first_ready_at: float | None = None
        self._started = False  # SERVING once: from then on, while any engine is ready

    def ready_engines(self) -> list[Engine]:
        return [e for e in self.engines.values() if e.ready]

    def serving(self) -> bool:
        """Whether the router can serve: some engine is ready and, the first time, every engine
        found is, or STARTUP_SYNC_S has passed since the first was."""
        num_ready = len(self.ready_engines())
        if not self._started and self._first_ready_at is not None:
            self._started = (num_ready == len(self.engines)
                             or self.startup_sync_left_s() == 0)
        return self._started and num_ready > 0

    def startup_sync_left_s(self) -> float | None:
        """Seconds the start-up still waits for engines; None before any is ready or after."""
        if self._started or self._first_ready_at is None:
            return None
        return max(0.0, self._first_ready_at + STARTUP_SYNC_S - time.monotonic())

    @property
    def info(self) -> engine_service_pb2.GetInfoResponse | None:
        """Limits every ready engine honours (the tightest of them)."""
        ready = self.ready_engines()
        if not ready:
            return None
        info = engine_service_pb2.GetInfoResponse()
        info.CopyFrom(ready[0].info)
        info.max_model_len = min(e.info.max_model_len for e in ready if e.info)
        return info

    async def start(self) -> None:
        self._task = asyncio.create_task(self._maintain())

    async def close(self) -> None:
        tasks = [t for t in [self._task, *(e.task for e in self.engines.values())] if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for engine in self.engines.values():
            await self._close(engine)

    @staticmethod
    async def _close(engine: Engine) -> None:
        engine.link.close()
        await engine.link_channel.close()
        await engine.channel.close()

    async def _maintain(self) -> None:
        while True:
            addresses = await asyncio.to_thread(self._resolve)
            for address in addresses - self.engines.keys():
                server_name = self._server_names.get(address)
                # HTTP/2 pings at the silence timeout: the request connection to a frozen engine
                # fails even while its load stream's timer has not run out yet.
                keepalive_s = self.config.engine_silence_timeout_s
                channel = open_engine_channel(
                    address, self.credentials, server_name, keepalive_s=keepalive_s
                )
                link_channel = open_engine_channel(
                    address, self.credentials, server_name, LINK_STREAM_WINDOW_BYTES, keepalive_s
                )
                stub = engine_service_pb2_grpc.EngineServiceStub(channel)
                link = EngineLink(engine_service_pb2_grpc.EngineServiceStub(link_channel))
                engine = Engine(address, channel, stub, link_channel, link)
                engine.task = asyncio.create_task(self._follow(engine))
                self.engines[address] = engine
            for address in self.engines.keys() - addresses:
                engine = self.engines.pop(address)
                if engine.ready:
                    self.changed.set()
                if engine.task is not None:
                    engine.task.cancel()
                self._forget(address)
                metrics.PREFIX_INDEX_ENGINE_BLOCKS.remove(address)
                log.info("engine_removed", engine=address)
                await self._close(engine)
            await asyncio.sleep(self.refresh_s)

    async def _follow(self, engine: Engine) -> None:
        """Subscribes to the engine's streams, resubscribing with backoff whenever they break."""
        backoff = RETRY_MIN_S
        while True:
            try:
                # Waits for the connection: the call goes out the moment a (re)started engine
                # accepts it, not at the next retry.
                engine.info = await engine.stub.GetInfo(
                    engine_service_pb2.GetInfoRequest(),
                    timeout=GET_INFO_TIMEOUT_S,
                    wait_for_ready=True,
                )
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._follow_load(engine))
                    group.create_task(self._follow_kv_events(engine))
            except* (grpc.aio.AioRpcError, EngineStreamError) as failure:
                if self._leave(engine, failure.exceptions[0]):
                    backoff = RETRY_MIN_S
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)

    def _leave(self, engine: Engine, error: Exception) -> bool:
        """Takes the engine out of routing until it rejoins; True if it was ready."""
        was_ready = engine.ready
        engine.load, engine.kv_synced = None, False
        self._forget(engine.address)
        if was_ready:
            log.warning(
                "engine_left", engine=engine.address, error=str(error).splitlines()[0][:200]
            )
            self.changed.set()
        return was_ready

    def _forget(self, address: str) -> None:
        self.index.drop(address)
        self.hash_check.forget(address)
        self._index_changed(address)

    def _index_changed(self, address: str) -> None:
        metrics.PREFIX_INDEX_BLOCKS.set(len(self.index))
        metrics.PREFIX_INDEX_ENGINE_BLOCKS.labels(address).set(self.index.counts.get(address, 0))

    def _joined(self, engine: Engine) -> None:
        if engine.ready:
            if self._first_ready_at is None:
                self._first_ready_at = time.monotonic()
            log.info(
                "engine_joined",
                engine=engine.address,
                model=engine.info.model,
                cached_blocks=self.index.counts.get(engine.address, 0),
            )
            self.changed.set()

    async def _follow_load(self, engine: Engine) -> None:
        loads = engine.stub.WatchLoad(engine_service_pb2.WatchLoadRequest())
        while True:
            try:
                async with asyncio.timeout(self.config.engine_silence_timeout_s):
                    load = await loads.read()  # a cancelled read cancels the call
            except TimeoutError:
                error = EngineStreamError(
                    f"engine silent: no load message for {self.config.engine_silence_timeout_s:g} s"
                )
                # Out of routing first, so no request (nor a failed-over one) goes there; then
                # its streams fail over at once instead of hanging on a frozen engine.
                self._leave(engine, error)
                engine.link.close()
                raise error from None
            if load is grpc.aio.EOF:
                raise EngineStreamError("load stream ended")
            first = engine.load is None
            engine.load = load
            if first:
                self._joined(engine)

    async def _follow_kv_events(self, engine: Engine) -> None:
        try:
            await self._apply_kv_events(engine)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            # An engine without KV events: our own routing history stands in for its cache.
            assert engine.info is not None
            self.index.follow_history(engine.address, engine.info.num_blocks)
            log.info("engine_without_kv_events", engine=engine.address,
                     index="routing history", capacity_blocks=engine.info.num_blocks)
            engine.kv_synced = True
            self._joined(engine)

    async def _apply_kv_events(self, engine: Engine) -> None:
        expected = None
        async for batch in engine.stub.WatchKvEvents(engine_service_pb2.WatchKvEventsRequest()):
            if batch.snapshot:
                self.index.reset(engine.address, batch.block_hashes_stored)
                self.hash_check.resynced(engine.address)
                first = not engine.kv_synced
                engine.kv_synced = True
                if first:
                    self._joined(engine)
            elif batch.sequence_number != expected:
                raise EngineStreamError(f"expected batch {expected}, got {batch.sequence_number}")
            else:
                self.index.apply(
                    engine.address, batch.block_hashes_stored, batch.block_hashes_removed
                )
                self.hash_check.stored(engine.address, batch.block_hashes_stored)
            self._index_changed(engine.address)
            expected = batch.sequence_number + 1
        raise EngineStreamError("kv event stream ended")

    def _resolve(self) -> set[str]:
        addresses: set[str] = set()
        server_names: dict[str, str] = {}
        for target in self.config.engine_targets:
            if not target.startswith("dns:"):
                addresses.add(target)
                continue
            name, _, port = target.removeprefix("dns:").rpartition(":")
            try:
                infos = socket.getaddrinfo(name, int(port), type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                log.warning("dns_lookup_failed", name=name, error=str(exc))
                continue
            for family, _, _, _, sockaddr in infos:
                host = f"[{sockaddr[0]}]" if family == socket.AF_INET6 else sockaddr[0]
                addresses.add(f"{host}:{port}")
                server_names[f"{host}:{port}"] = name
        # Replaced, not extended: pod IPs come and go.
        self._server_names = server_names
        return addresses
