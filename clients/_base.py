"""Channel set-up and per-call options shared by both clients."""

from __future__ import annotations

import json
from collections.abc import Sequence
from types import ModuleType
from typing import Any, ClassVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmserve.v1 import generate_service_pb2, generate_service_pb2_grpc

DEFAULT_TARGET = "localhost:50051"


def channel_options(
    options: Sequence[tuple[str, Any]], load_balancing: str | None
) -> list[tuple[str, Any]]:
    """The channel arguments: the caller's, plus a service config naming the LB policy if asked."""
    merged = list(options)
    if load_balancing:
        config = {"loadBalancingConfig": [{load_balancing: {}}]}
        merged.append(("grpc.service_config", json.dumps(config)))
    return merged


def health_request(service: str) -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=service)


def health_status_name(response: health_pb2.HealthCheckResponse) -> str:
    """ "SERVING", "NOT_SERVING", ...; a status newer than this client keeps its number."""
    status = response.status
    names = health_pb2.HealthCheckResponse.ServingStatus
    return names.Name(status) if status in names.values() else f"UNKNOWN_STATUS_{status}"


class ClientBase:
    """What `LLMClient` and `AsyncLLMClient` share: the channel, the stub and call options.

    Subclasses name the gRPC flavour in `_grpc` (`grpc` or `grpc.aio`, whose channel factories
    take the same arguments).
    """

    _grpc: ClassVar[ModuleType]

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        channel_credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
        load_balancing: str | None = None,
    ) -> None:
        merged = channel_options(options, load_balancing)
        if channel_credentials is None:
            self._channel = self._grpc.insecure_channel(target, options=merged)
        else:
            self._channel = self._grpc.secure_channel(target, channel_credentials, options=merged)
        self._stub = generate_service_pb2_grpc.GenerateServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        # Sent as plain metadata rather than call credentials, which gRPC refuses on an
        # insecure channel (the local demo has no TLS).
        self._auth: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )

    def _call_options(
        self, timeout: float | None, metadata: Sequence[tuple[str, str]]
    ) -> dict[str, Any]:
        return {"timeout": timeout, "metadata": (*self._auth, *metadata)}


def model_info_to_dict(response: generate_service_pb2.GetModelInfoResponse) -> dict[str, Any]:
    """Every field of `GetModelInfoResponse` by name, zero values included."""
    return {f.name: getattr(response, f.name) for f in response.DESCRIPTOR.fields}
