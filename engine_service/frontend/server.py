"""The engine's gRPC server: `EngineService`, health and reflection on one port."""

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmserve.common import reflection
from llmserve.common.call_outcome import FAILED, ended_from_outside
from llmserve.common.stream_order import by_sample
from llmserve.common.wire import MalformedRequest, add_lenient_service, refuse_malformed
from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.frontend import metrics
from llmserve.engine_service.frontend.async_engine import AsyncEngine
from llmserve.engine_service.frontend.health_port import start_health_server
from llmserve.engine_service.frontend.messages import (
    info_to_proto,
    load_to_proto,
    response_from_outputs,
)
from llmserve.engine_service.frontend.request_stream import Deliver, RequestStream, StreamFailure
from llmserve.engine_service.frontend.stream_mux import StreamMux
from llmserve.engine_service.seam import EngineInfo, RequestOutput
from llmserve.v1 import engine_service_pb2, engine_service_pb2_grpc

log = structlog.get_logger(__name__)

SERVICE = engine_service_pb2.DESCRIPTOR.services_by_name["EngineService"]
SERVICE_NAME = SERVICE.full_name
# WatchLoad repeats an unchanged load this often: routers take an engine silent for a few beats
# as frozen (`--engine-silence-timeout-s`, 2 s at least).
LOAD_HEARTBEAT_S = 1.0
# The most often routers' HTTP/2 keepalive pings may come (their interval is 2 s at least); gRPC
# answers pings more frequent than its 5-minute default with GOAWAY too_many_pings.
MIN_PING_INTERVAL_MS = 500


class EngineServicer(engine_service_pb2_grpc.EngineServiceServicer):
    """Serves token-id generation from one engine core to many concurrent streams."""

    def __init__(self, engine: AsyncEngine, info: EngineInfo, config: EngineConfig) -> None:
        self.engine = engine
        self.info = info
        self.config = config
        self.draining = False

    def start(
        self,
        request: engine_service_pb2.EngineServiceGenerateRequest | MalformedRequest,
        deliver: Deliver,
    ) -> RequestStream:
        """Starts one request whose outputs go to `deliver`; raises StreamFailure."""
        return RequestStream(self.engine, self.info, request, deliver, self.draining)

    async def Generate(
        self,
        request: engine_service_pb2.EngineServiceGenerateRequest | MalformedRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[engine_service_pb2.EngineServiceGenerateResponse]:
        """Streams the request's tokens; several per response when this reader lags behind."""
        # None (an end with nothing to send) never comes: this call cannot cancel a sample.
        items: asyncio.Queue[RequestOutput | StreamFailure | None] = asyncio.Queue()
        try:
            stream = self.start(request, items.put_nowait)
        except StreamFailure as exc:
            await context.abort(exc.code, exc.details)
        try:
            finished = False
            while not finished:
                batch = [await items.get()]
                while not items.empty():
                    batch.append(items.get_nowait())
                if isinstance(batch[-1], StreamFailure):
                    failure = batch.pop()
                    for sample in by_sample(batch):
                        yield response_from_outputs(sample)
                    await context.abort(failure.code, failure.details)
                last = batch[-1]
                if last is None:
                    batch.pop()
                finished = last is None or last.request_finished
                for sample in by_sample(batch):
                    yield response_from_outputs(sample)
        except Exception:
            stream.cancel(FAILED)  # a no-op after a StreamFailure: the stream ended
            raise
        finally:
            # A no-op once the stream ended; else the call did (cancelled or past its deadline).
            stream.cancel(ended_from_outside(context))

    async def GenerateStreams(
        self,
        requests: AsyncIterator[engine_service_pb2.GenerateStreamsRequest | MalformedRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[engine_service_pb2.GenerateStreamsResponse]:
        """Runs many streams over one call; each message carries every stream's new output."""
        mux = StreamMux(self.start)
        reader = asyncio.create_task(mux.read_requests(requests))
        try:
            async for message in mux.responses():
                yield message
        except StreamFailure as exc:
            await context.abort(exc.code, exc.details)
        finally:
            reader.cancel()
            mux.close()

    async def GetInfo(
        self,
        request: engine_service_pb2.GetInfoRequest | MalformedRequest,
        context: grpc.aio.ServicerContext,
    ) -> engine_service_pb2.GetInfoResponse:
        """Describes the model, KV-cache geometry and block-hash scheme."""
        await refuse_malformed(request, context)
        return info_to_proto(self.info)

    async def WatchLoad(
        self,
        request: engine_service_pb2.WatchLoadRequest | MalformedRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[engine_service_pb2.WatchLoadResponse]:
        """Streams the engine's load: the current value at once, then every change, and the
        current value again each LOAD_HEARTBEAT_S without one (a sign of life)."""
        await refuse_malformed(request, context)
        async for load in self.engine.watch_load(LOAD_HEARTBEAT_S):
            yield load_to_proto(load)

    async def WatchKvEvents(self,
                            request: engine_service_pb2.WatchKvEventsRequest | MalformedRequest,
                            context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[engine_service_pb2.WatchKvEventsResponse]:
        """Streams the cached block hashes: a snapshot, then numbered batches of changes."""
        await refuse_malformed(request, context)
        if not self.config.kv_events:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                "this engine publishes no KV events (started with --no-kv-events)")
        async for change in self.engine.kv_events.subscribe():
            yield engine_service_pb2.WatchKvEventsResponse(
                sequence_number=change.sequence_number, snapshot=change.snapshot,
                block_hashes_stored=change.stored, block_hashes_removed=change.removed)


async def serve_engine(engine: AsyncEngine, info: EngineInfo, config: EngineConfig,
                       credentials: grpc.ServerCredentials | None = None) -> bool:
    """Serves on `config.port` until cancelled (a graceful drain) or until the core dies;
    False on the latter.

    Draining: health turns NOT_SERVING and new requests are refused at once, while requests in
    flight run to completion for up to `config.drain_timeout_s`. `credentials` secure the port
    (None = plaintext); `config.health_port` >= 0 also serves health alone, plaintext (see
    `health_port`).
    """
    host, port = config.host, config.port
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0),
                                      ("grpc.max_receive_message_length", 64 << 20),
                                      # Routers' keepalive pings, on idle connections too.
                                      ("grpc.keepalive_permit_without_calls", 1),
                                      ("grpc.http2.min_ping_interval_without_data_ms",
                                       MIN_PING_INTERVAL_MS)])
    servicer = EngineServicer(engine, info, config)
    # Lenient parsing: garbage gets INVALID_ARGUMENT, as at the router, not UNKNOWN.
    add_lenient_service(server, SERVICE, servicer)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    if credentials is None:
        bound_port = server.add_insecure_port(f"{host}:{port}")
    else:
        bound_port = server.add_secure_port(f"{host}:{port}", credentials)
    if bound_port == 0:
        raise OSError(f"cannot bind {host}:{port}")
    engine.on_step = metrics.record_step
    await server.start()
    health_server = (
        await start_health_server(health_servicer, host, config.health_port)
        if config.health_port >= 0 else None
    )

    async def set_health(status: int) -> None:
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, status)

    await set_health(health_pb2.HealthCheckResponse.SERVING)
    log.info("serving", service=SERVICE_NAME, host=host, port=bound_port,
             tls=credentials is not None)
    try:
        await engine.dead.wait()
        await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(grace=1)
        return False
    except asyncio.CancelledError:
        servicer.draining = True
        await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("draining", in_flight=engine.num_streams, timeout_s=config.drain_timeout_s)
        deadline = time.monotonic() + config.drain_timeout_s
        while engine.num_streams and time.monotonic() < deadline and not engine.dead.is_set():
            await asyncio.sleep(0.05)
        await server.stop(grace=1)
        engine.stop()
        return True
    finally:
        if health_server is not None:
            await health_server.stop(grace=None)
