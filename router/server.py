"""The router's gRPC server: the public `GenerateService`, health and reflection.

With a metrics port, the router also serves `/metrics` and `/healthz` (its health details) over
HTTP there (see `ops_http`).
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmserve.common import reflection, tls
from llmserve.common.call_outcome import (
    DEADLINE_EXCEEDED,
    FAILED,
    FINISHED,
    ended_from_outside,
    status_outcome,
)
from llmserve.common.priority import PRIORITY_CLASS
from llmserve.common.request_limits import (
    MAX_ID_CHARS,
    InvalidRequestError,
    check_length,
    check_shared_fields,
    check_stop_strings,
    resolve_max_tokens,
)
from llmserve.common.startup_heap import freeze_startup_heap
from llmserve.common.wire import MalformedRequest, add_lenient_service, refuse_malformed
from llmserve.router import metrics
from llmserve.router.admission import AdmissionController, ShedError
from llmserve.router.auth import BearerAuthInterceptor, TenantKeys
from llmserve.router.balancer import Balancer
from llmserve.router.busy_poll import BusyPoll
from llmserve.router.config import RouterConfig
from llmserve.router.engine_link import StreamError
from llmserve.router.engine_pool import EnginePool
from llmserve.router.forwarding import ForwardedRequest, Forwarder, NoEngineError
from llmserve.router.hash_check import HashSelfCheck
from llmserve.router.ops_http import OpsHttpServer
from llmserve.router.prefix_index import PrefixIndex
from llmserve.router.request_input import prompt_input
from llmserve.router.sample_responses import SampleResponses
from llmserve.router.tokenizer import TextTokenizer
from llmserve.v1 import common_pb2, engine_service_pb2, generate_service_pb2

log = structlog.get_logger(__name__)

SERVICE = generate_service_pb2.DESCRIPTOR.services_by_name["GenerateService"]
# Health names that say whether the router can serve (some engine is ready), as `/healthz` does.
READINESS_NAMES = ("", SERVICE.full_name)
# A health name that is SERVING while the process serves gRPC at all, engines or not: what a
# liveness probe asks, so engines being down never gets routers restarted.
LIVENESS_NAME = "liveness"


class GenerateServicer:
    """Serves text generation by tokenizing, forwarding to an engine and detokenizing."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        pool: EnginePool,
        forwarder: Forwarder,
        admission: AdmissionController,
        busy_poll: BusyPoll,
    ) -> None:
        self.tokenizer = tokenizer
        self.pool = pool
        self.forwarder = forwarder
        self.admission = admission
        self.busy_poll = busy_poll

    async def _require_info(
        self, context: grpc.aio.ServicerContext
    ) -> engine_service_pb2.GetInfoResponse:
        info = self.pool.info
        if info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no engine is ready to serve")
        return info

    async def Generate(
        self,
        request: generate_service_pb2.GenerateRequest | MalformedRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[generate_service_pb2.GenerateResponse]:
        """Streams a completion; each response carries new text and the tokens behind it.

        Each call counts once in `llmserve_router_requests_total`, refused ones included, under
        its outcome (see `call_outcome`).
        """
        outcome = FAILED
        try:
            await refuse_malformed(request, context)
            info = await self._require_info(context)
            try:
                check_shared_fields(request)
                check_stop_strings(request.stop)
                request_id = request.request_id or _metadata_request_id(context) or uuid.uuid4().hex
                prompt = await prompt_input(request, self.tokenizer, info.max_model_len)
                max_tokens = resolve_max_tokens(
                    request.stopping,
                    info.max_model_len,
                    len(prompt.token_ids),
                    info.max_tokens_default,
                )
            except InvalidRequestError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            priority = PRIORITY_CLASS[request.priority]
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            self.admission.capacity = self._capacity()
            if self.admission.try_acquire(priority):
                metrics.QUEUE_WAIT.labels(str(priority)).observe(0.0)
            else:
                await self._wait_for_admission(priority, request.tenant, remaining, context)
            forwarded = ForwardedRequest(
                request_id=request_id,
                prompt_token_ids=prompt.token_ids,
                sampling=request.sampling,
                max_tokens=max_tokens,
                stopping=request.stopping,
                priority=request.priority,
                tenant=request.tenant,
            )
            responses = SampleResponses(request, request_id, len(prompt.token_ids),
                                        self.tokenizer)
            with self.busy_poll.in_flight():
                try:
                    # The per-message path: one response per engine response, whatever it holds
                    # (the engine and the link merge the tokens of a lagging stream), and no
                    # more work.
                    async for chunk in self.forwarder.stream(forwarded, deadline,
                                                             responses.stops):
                        response = await responses.respond(chunk)
                        if response is None:
                            continue
                        if responses.done:
                            outcome = FINISHED
                            log.info(
                                "request_finished",
                                request_id=request_id,
                                completion_tokens=response.usage.completion_tokens,
                                finish_reason=common_pb2.FinishReason.Name(response.finish_reason),
                            )
                            yield response
                            return
                        yield response
                except StreamError as exc:
                    await context.abort(exc.code, exc.details or exc.code.name)
                except NoEngineError as exc:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
                finally:
                    self.admission.release(priority)
        except grpc.aio.AbortError:
            outcome = status_outcome(context.code())
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # GeneratorExit: gRPC stopped iterating this stream, as it does when the call is
            # cancelled while it writes a response (no CancelledError reaches us then).
            outcome = ended_from_outside(context)
            raise
        except Exception:
            # Past its deadline the caller has DEADLINE_EXCEEDED, whatever failed here after
            # (seen once in a loaded test run: the call counted as failed).
            if context.time_remaining() == 0:
                outcome = DEADLINE_EXCEEDED
            raise
        finally:
            metrics.REQUESTS.labels(outcome).inc()

    async def _wait_for_admission(
        self, priority: int, tenant: str, remaining: float | None, context: grpc.aio.ServicerContext
    ) -> None:
        """Queues for a slot; a request shed or out of time ends its call here."""
        queued_at = time.monotonic()
        try:
            metrics.QUEUED.set(self.admission.queued + 1)
            await self.admission.acquire(priority, tenant, remaining)
        except ShedError as exc:
            metrics.SHED.labels(str(priority)).inc()
            await context.send_initial_metadata(
                (("retry-after-ms", str(int(exc.retry_after_s * 1000))),)
            )
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry in {exc.retry_after_s:.1f} s"
            )
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while queued")
        finally:
            metrics.QUEUED.set(self.admission.queued)
        metrics.QUEUE_WAIT.labels(str(priority)).observe(time.monotonic() - queued_at)

    def _capacity(self) -> int:
        """Requests the ready engines can run at once (their batches plus as much queued)."""
        return 2 * sum(e.info.max_num_seqs for e in self.pool.ready_engines() if e.info)

    async def Tokenize(
        self,
        request: generate_service_pb2.TokenizeRequest | MalformedRequest,
        context: grpc.aio.ServicerContext,
    ) -> generate_service_pb2.TokenizeResponse:
        """Returns the token ids a Generate call with this input would send to an engine."""
        await refuse_malformed(request, context)
        info = await self._require_info(context)
        try:
            prompt = await prompt_input(request, self.tokenizer, info.max_model_len)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return generate_service_pb2.TokenizeResponse(token_ids=prompt.token_ids, text=prompt.text)

    async def GetModelInfo(
        self,
        request: generate_service_pb2.GetModelInfoRequest | MalformedRequest,
        context: grpc.aio.ServicerContext,
    ) -> generate_service_pb2.GetModelInfoResponse:
        """Describes the served model and its limits."""
        await refuse_malformed(request, context)
        info = await self._require_info(context)
        return generate_service_pb2.GetModelInfoResponse(
            model=info.model,
            max_model_len=info.max_model_len,
            vocab_size=info.vocab_size,
            num_engines=len(self.pool.ready_engines()),
            max_tokens_default=info.max_tokens_default,
        )


def health_details(pool: EnginePool, hash_check: HashSelfCheck) -> dict[str, Any]:
    """The router's health, engine by engine: the body of `/healthz`."""
    engines = sorted(pool.engines.values(), key=lambda e: e.address)
    return {
        "status": "SERVING" if pool.serving() else "NOT_SERVING",
        "engines": [
            {
                "address": e.address,
                "ready": e.ready,
                "prefix_routing": hash_check.status(e.address).value,
            }
            for e in engines
        ],
    }


async def _follow_readiness(pool: EnginePool, health_servicer: health.aio.HealthServicer) -> None:
    """Keeps the readiness health names in step with `health_details` (`EnginePool.serving`).
    Logs `ready` when it first turns SERVING."""
    serving = False
    first = True
    while True:
        pool.changed.clear()
        ready = [e.address for e in pool.ready_engines()]
        if pool.serving() != serving:
            serving = not serving
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in READINESS_NAMES:
                await health_servicer.set(name, status)
            if first:
                first = False
                log.info("ready", engines=ready)
                freeze_startup_heap()
            else:
                (log.info if serving else log.warning)(
                    "health_changed",
                    status=health_pb2.HealthCheckResponse.ServingStatus.Name(status),
                    engines=ready,
                )
        try:  # during the start-up sync, wake when it runs out too
            async with asyncio.timeout(pool.startup_sync_left_s()):
                await pool.changed.wait()
        except TimeoutError:
            pass


def _metadata_request_id(context: grpc.aio.ServicerContext) -> str | None:
    request_id = dict(context.invocation_metadata() or ()).get("x-request-id")
    if request_id is not None:
        check_length("x-request-id metadata", request_id, MAX_ID_CHARS, "characters")
    return request_id


async def serve_router(config: RouterConfig, tokenizer: TextTokenizer) -> None:
    """Serves until cancelled; health is SERVING while an engine is ready (`_follow_readiness`).

    `config.metrics_port` is resolved (None is not): >= 0 serves `/metrics` and `/healthz`
    over HTTP on the config's host (0 = any free port). Its TLS settings put TLS on the public
    port and mutual TLS on the engine channels (none = plaintext); with an auth keys file,
    every GenerateService call needs a bearer key and runs as the key's tenant (see `auth`).
    `busy_poll` keeps the event loop polling while requests are in flight (see `busy_poll`).
    """
    # Credentials and keys first: a bad path fails start-up before anything is bound.
    server_credentials = tls.server_credentials(config.tls_cert, config.tls_key)
    engine_credentials = tls.channel_credentials(
        config.engine_tls_ca, config.engine_tls_cert, config.engine_tls_key
    )
    auth = None if config.auth_keys_file is None else TenantKeys.from_file(config.auth_keys_file)
    if auth is not None:
        log.info("auth_enabled", tenants=auth.tenants, keys=auth.num_keys)
    index = PrefixIndex()
    hash_check = HashSelfCheck(index)
    pool = EnginePool(config, index, hash_check, credentials=engine_credentials)
    forwarder = Forwarder(pool, index, Balancer(config.policy), hash_check)
    servicer = GenerateServicer(
        tokenizer,
        pool,
        forwarder,
        AdmissionController(config.max_queue),
        BusyPoll(enabled=config.busy_poll),
    )
    ops = None
    assert config.metrics_port is not None
    if config.metrics_port >= 0:
        ops = OpsHttpServer(
            config.host, config.metrics_port, asyncio.get_running_loop(),
            lambda: health_details(pool, hash_check),
        )
        log.info("metrics_serving", port=ops.port, path="/metrics", health_path="/healthz")
    interceptors = [] if auth is None else [BearerAuthInterceptor(auth, f"/{SERVICE.full_name}/")]
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.so_reuseport", 0),
            # Clients reconnect and spread over router replicas added by an autoscaler.
            ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", 30_000),
            # A request holds one prompt, a response a few tokens: bounded both ways, so one
            # caller cannot make the router buffer an arbitrary amount.
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ],
        # Beyond this many calls in flight gRPC answers RESOURCE_EXHAUSTED at once: a memory
        # bound for the process, set above what admission queues and engines run.
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    add_lenient_service(server, SERVICE, servicer)
    health_servicer = health.aio.HealthServicer()
    # The servicer reports the server ("") SERVING by default: not until an engine is ready.
    for name in READINESS_NAMES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await health_servicer.set(LIVENESS_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE.full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{config.host}:{config.port}"
    if server_credentials is None:
        bound_port = server.add_insecure_port(address)
    else:
        bound_port = server.add_secure_port(address, server_credentials)
    await server.start()
    log.info(
        "serving",
        service=SERVICE.full_name,
        host=config.host,
        port=bound_port,
        tls=server_credentials is not None,
        engine_tls=engine_credentials is not None,
        auth=auth is not None,
        busy_poll=config.busy_poll,
    )
    await pool.start()
    readiness = asyncio.create_task(_follow_readiness(pool, health_servicer))
    try:
        await server.wait_for_termination()
    finally:
        readiness.cancel()
        await asyncio.gather(readiness, return_exceptions=True)
        for name in (*READINESS_NAMES, LIVENESS_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(grace=5)
        await pool.close()
        if ops is not None:
            ops.close()
        await asyncio.sleep(0)
