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
from grpc_reflection.v1alpha import reflection

from llmserve.common.priority import PRIORITY_CLASS
from llmserve.common.startup_heap import freeze_startup_heap
from llmserve.router import metrics
from llmserve.router.admission import AdmissionController, ShedError
from llmserve.router.auth import BearerAuthInterceptor, TenantKeys
from llmserve.router.balancer import Balancer, Policy
from llmserve.router.busy_poll import BusyPoll
from llmserve.router.detokenizer import IncrementalDetokenizer
from llmserve.router.engine_link import StreamError
from llmserve.router.engine_pool import EnginePool
from llmserve.router.forwarding import ForwardedRequest, Forwarder, NoEngineError
from llmserve.router.hash_check import HashSelfCheck
from llmserve.router.ops_http import OpsHttpServer
from llmserve.router.prefix_index import PrefixIndex
from llmserve.router.request_input import (
    InvalidInputError,
    check_max_tokens,
    check_stop_strings,
    prompt_input,
)
from llmserve.router.tokenizer import TextTokenizer
from llmserve.router.wire import MalformedRequest, lenient_deserializer
from llmserve.v1 import common_pb2, engine_service_pb2, generate_service_pb2

log = structlog.get_logger(__name__)

SERVICE = generate_service_pb2.DESCRIPTOR.services_by_name["GenerateService"]


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
        """Streams a completion; each response carries new text and the tokens behind it."""
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        info = await self._require_info(context)
        request_id = request.request_id or _metadata_request_id(context) or uuid.uuid4().hex
        try:
            check_stop_strings(list(request.stop))
            prompt = prompt_input(request, self.tokenizer, info.max_model_len)
            room = info.max_model_len - len(prompt.token_ids)
            max_tokens = check_max_tokens(request.stopping, room, info.max_tokens_default)
        except InvalidInputError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        priority = PRIORITY_CLASS.get(request.priority, 1)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        outcome = "failed"
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
        detokenizer = IncrementalDetokenizer(self.tokenizer, list(request.stop))
        with self.busy_poll.in_flight():
            try:
                # The per-message path: one response per engine response, whatever it holds (the
                # engine and the link merge the tokens of a lagging stream), and no more work.
                async for chunk in self.forwarder.stream(forwarded, deadline):
                    token_ids = chunk.token_ids
                    metrics.GENERATED_TOKENS.inc(len(token_ids))
                    final = chunk.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
                    response = generate_service_pb2.GenerateResponse(
                        request_id=request_id,
                        text=detokenizer.push(token_ids, final),
                        token_ids=token_ids,
                    )
                    if chunk.logprobs:
                        response.logprobs.extend(self._with_text(chunk.logprobs))
                    if detokenizer.stopped or final:
                        response.finish_reason = (
                            common_pb2.FINISH_REASON_STOP
                            if detokenizer.stopped
                            else chunk.finish_reason
                        )
                        response.usage.CopyFrom(chunk.usage)
                        outcome = "finished"
                        log.info(
                            "request_finished",
                            request_id=request_id,
                            completion_tokens=chunk.usage.completion_tokens,
                            finish_reason=common_pb2.FinishReason.Name(response.finish_reason),
                        )
                        yield response
                        return
                    yield response
            except StreamError as exc:
                outcome = exc.code.name.lower()
                await context.abort(exc.code, exc.details or exc.code.name)
            except NoEngineError as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            except asyncio.CancelledError:
                outcome = "cancelled"
                raise
            finally:
                metrics.REQUESTS.labels(outcome).inc()
                self.admission.release(priority)

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

    def _with_text(self, logprobs: list[common_pb2.TokenLogprob]) -> list[common_pb2.TokenLogprob]:
        for entry in logprobs:
            for alternative in entry.top_logprobs:
                alternative.text = self.tokenizer.token_text(alternative.token_id)
        return logprobs

    async def Tokenize(
        self,
        request: generate_service_pb2.TokenizeRequest | MalformedRequest,
        context: grpc.aio.ServicerContext,
    ) -> generate_service_pb2.TokenizeResponse:
        """Returns the token ids a Generate call with this input would send to an engine."""
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        info = await self._require_info(context)
        try:
            prompt = prompt_input(request, self.tokenizer, info.max_model_len)
        except InvalidInputError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return generate_service_pb2.TokenizeResponse(token_ids=prompt.token_ids, text=prompt.text)

    async def GetModelInfo(
        self,
        request: generate_service_pb2.GetModelInfoRequest | MalformedRequest,
        context: grpc.aio.ServicerContext,
    ) -> generate_service_pb2.GetModelInfoResponse:
        """Describes the served model and its limits."""
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
        "status": "SERVING" if any(e.ready for e in engines) else "NOT_SERVING",
        "engines": [
            {
                "address": e.address,
                "ready": e.ready,
                "prefix_routing": hash_check.status(e.address).value,
            }
            for e in engines
        ],
    }


def _metadata_request_id(context: grpc.aio.ServicerContext) -> str | None:
    return dict(context.invocation_metadata() or ()).get("x-request-id")


def _generic_handler(servicer: GenerateServicer) -> grpc.GenericRpcHandler:
    """Registers the servicer with lenient request parsing (see `wire`)."""
    methods = {}
    for method in SERVICE.methods:
        request_cls = getattr(generate_service_pb2, method.input_type.name)
        response_cls = getattr(generate_service_pb2, method.output_type.name)
        factory = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        methods[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=lenient_deserializer(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, methods)


async def serve_router(
    tokenizer: TextTokenizer,
    engines: list[str],
    host: str,
    port: int,
    policy: Policy = Policy.PREFIX,
    max_connection_age_s: float = 300.0,
    max_queue: int = 1024,
    *,
    server_credentials: grpc.ServerCredentials | None = None,
    engine_credentials: grpc.ChannelCredentials | None = None,
    auth: TenantKeys | None = None,
    max_message_bytes: int = 16 << 20,
    max_concurrent_rpcs: int = 4096,
    metrics_port: int = -1,
    busy_poll: bool = False,
) -> None:
    """Serves until cancelled; health turns SERVING once an engine is ready.

    `server_credentials` puts TLS on the public port, `engine_credentials` mutual TLS on the
    engine channels (None = plaintext). With `auth`, every GenerateService call needs a bearer
    key and runs as the key's tenant (see `auth`). `metrics_port` >= 0 serves `/metrics` and
    `/healthz` over HTTP on `host` (0 = any free port). `busy_poll` keeps the event loop polling
    while requests are in flight (see `busy_poll`).
    """
    index = PrefixIndex()
    hash_check = HashSelfCheck(index)
    pool = EnginePool(engines, index, hash_check, credentials=engine_credentials)
    forwarder = Forwarder(pool, index, Balancer(policy), hash_check)
    servicer = GenerateServicer(
        tokenizer,
        pool,
        forwarder,
        AdmissionController(max_queue),
        BusyPoll(enabled=busy_poll),
    )
    ops = None
    if metrics_port >= 0:
        ops = OpsHttpServer(
            host, metrics_port, asyncio.get_running_loop(), lambda: health_details(pool, hash_check)
        )
        log.info("metrics_serving", port=ops.port, path="/metrics", health_path="/healthz")
    interceptors = [] if auth is None else [BearerAuthInterceptor(auth, f"/{SERVICE.full_name}/")]
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.so_reuseport", 0),
            # Clients reconnect and spread over router replicas added by an autoscaler.
            ("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", 30_000),
            # A request holds one prompt, a response a few tokens: bounded both ways, so one
            # caller cannot make the router buffer an arbitrary amount.
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
        # Beyond this many calls in flight gRPC answers RESOURCE_EXHAUSTED at once: a memory
        # bound for the process, set above what admission queues and engines run.
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    server.add_generic_rpc_handlers((_generic_handler(servicer),))
    health_servicer = health.aio.HealthServicer()
    # The servicer reports the server ("") SERVING by default: not until an engine is ready.
    for name in ("", SERVICE.full_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE.full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{host}:{port}"
    if server_credentials is None:
        bound_port = server.add_insecure_port(address)
    else:
        bound_port = server.add_secure_port(address, server_credentials)
    await server.start()
    log.info(
        "serving",
        service=SERVICE.full_name,
        host=host,
        port=bound_port,
        tls=server_credentials is not None,
        engine_tls=engine_credentials is not None,
        auth=auth is not None,
        busy_poll=busy_poll,
    )
    await pool.start()
    try:
        await pool.ready.wait()
        for name in ("", SERVICE.full_name):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("ready", engines=[e.address for e in pool.ready_engines()])
        freeze_startup_heap()
        await server.wait_for_termination()
    finally:
        for name in ("", SERVICE.full_name):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(grace=5)
        await pool.close()
        if ops is not None:
            ops.close()
        await asyncio.sleep(0)
