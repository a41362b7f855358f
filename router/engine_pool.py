"""The engines a router can send work to: addresses, channels, their `GetInfo`, and the pick.

Engines come from a static `host:port` list or from `dns:NAME:PORT` (a Kubernetes headless
Service), re-resolved periodically. An engine joins once its `GetInfo` answers.
"""

import asyncio
import contextlib
import itertools
import socket
from dataclasses import dataclass

import grpc
import structlog

from llmserve.v1 import engine_service_pb2, engine_service_pb2_grpc

log = structlog.get_logger(__name__)


@dataclass
class Engine:
    """One engine endpoint and what it told us about itself."""

    address: str
    channel: grpc.aio.Channel
    stub: engine_service_pb2_grpc.EngineServiceStub
    info: engine_service_pb2.GetInfoResponse | None = None


class EnginePool:
    """Keeps the engine set current and picks one per request (round-robin for now)."""

    def __init__(self, targets: list[str], refresh_s: float = 5.0) -> None:
        if not targets:
            raise ValueError("--engines: give at least one host:port or dns:NAME:PORT")
        self.targets = targets
        self.refresh_s = refresh_s
        self.engines: dict[str, Engine] = {}
        self._counter = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    def ready_engines(self) -> list[Engine]:
        return [e for e in self.engines.values() if e.info is not None]

    def pick(self) -> Engine | None:
        ready = self.ready_engines()
        if not ready:
            return None
        return ready[next(self._counter) % len(ready)]

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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for engine in self.engines.values():
            await engine.channel.close()

    async def _maintain(self) -> None:
        while True:
            addresses = await asyncio.to_thread(self._resolve)
            for address in addresses - self.engines.keys():
                channel = grpc.aio.insecure_channel(address)
                self.engines[address] = Engine(
                    address, channel, engine_service_pb2_grpc.EngineServiceStub(channel)
                )
            for address in self.engines.keys() - addresses:
                engine = self.engines.pop(address)
                log.info("engine_left", engine=address)
                await engine.channel.close()
            for engine in self.engines.values():
                if engine.info is None:
                    await self._describe(engine)
            if self.ready_engines():
                self.ready.set()
            await asyncio.sleep(self.refresh_s if self.ready.is_set() else 0.2)

    async def _describe(self, engine: Engine) -> None:
        try:
            engine.info = await engine.stub.GetInfo(engine_service_pb2.GetInfoRequest(), timeout=2)
        except grpc.aio.AioRpcError as exc:
            log.debug("engine_not_ready", engine=engine.address, code=exc.code().name)
            return
        log.info(
            "engine_joined",
            engine=engine.address,
            model=engine.info.model,
            max_model_len=engine.info.max_model_len,
        )

    def _resolve(self) -> set[str]:
        addresses: set[str] = set()
        for target in self.targets:
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
        return addresses
