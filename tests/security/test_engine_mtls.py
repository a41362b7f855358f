"""Mutual TLS between router and engine, real processes over loopback, plus the engine's
plaintext health-only port for kubelet probes."""

import asyncio
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from launcher import ServerProcess

from llmserve.clients import LLMClient
from llmserve.common.ports import ephemeral_port
from llmserve.router.engine_channel import open_engine_channel
from llmserve.v1 import common_pb2, engine_service_pb2, engine_service_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
# The engine's certificate names `localhost` only, as the chart's name the headless Service.
SERVER_NAME = (("grpc.ssl_target_name_override", "localhost"),)


def engine_tls_args(pki, health_port: int) -> list[str]:
    return [
        "--tls-cert", str(pki.engine.cert),
        "--tls-key", str(pki.engine.key),
        "--tls-client-ca", str(pki.ca),
        "--health-port", str(health_port),
    ]  # fmt: skip


def router_tls_args(pki) -> list[str]:
    return [
        "--engine-tls-ca", str(pki.ca),
        "--engine-tls-cert", str(pki.client.cert),
        "--engine-tls-key", str(pki.client.key),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def mtls_system(pki, tiny_checkpoint, start_engine, start_router):
    """An mTLS engine and a router that finds it as the chart does: through a DNS name."""
    model_dir = tiny_checkpoint("qwen3")
    health_port = ephemeral_port()
    engine = start_engine(model_dir, *engine_tls_args(pki, health_port))
    # argparse keeps the last --engines: the DNS target replaces the launcher's 127.0.0.1 one.
    router = start_router(
        model_dir, [engine], "--engines", f"dns:localhost:{engine.port}", *router_tls_args(pki)
    )
    return engine, router, health_port


def get_info(engine: ServerProcess, credentials: grpc.ChannelCredentials | None) -> None:
    """GetInfo straight to the engine, plaintext when `credentials` is None."""
    if credentials is None:
        channel = grpc.insecure_channel(engine.address)
    else:
        channel = grpc.secure_channel(engine.address, credentials, options=SERVER_NAME)
    with channel:
        stub = engine_service_pb2_grpc.EngineServiceStub(channel)
        stub.GetInfo(engine_service_pb2.GetInfoRequest(), timeout=10)


def credentials(ca, client=None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=None if client is None else client.key.read_bytes(),
        certificate_chain=None if client is None else client.cert.read_bytes(),
    )


def test_router_with_client_certificate_is_served_end_to_end(mtls_system) -> None:
    engine, router, _ = mtls_system
    with LLMClient(router.address) as client:
        completion = client.generate_text("Hello", max_tokens=5, ignore_eos=True, timeout=30)
        assert client.model_info(timeout=10)["num_engines"] == 1
    assert len(completion.token_ids) == 5
    assert any(e.get("event") == "request_finished" for e in engine.log_events())


def test_engine_serves_a_client_with_the_right_certificate(pki, mtls_system) -> None:
    get_info(mtls_system[0], credentials(pki.ca, pki.client))


@pytest.mark.parametrize(
    "case",
    ["plaintext", "no client certificate", "client certificate of another CA", "trusts another CA"],
)
def test_engine_refuses(pki, mtls_system, case: str) -> None:
    creds = {
        "plaintext": None,
        "no client certificate": credentials(pki.ca),
        "client certificate of another CA": credentials(pki.ca, pki.other_client),
        "trusts another CA": credentials(pki.other_ca, pki.client),
    }[case]
    with pytest.raises(grpc.RpcError) as refused:
        get_info(mtls_system[0], creds)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_is_checked_against_the_dns_name_not_the_ip(pki, mtls_system) -> None:
    """The router dials a resolved IP; the engine certificate names the DNS name it came from."""
    engine = mtls_system[0]

    async def get_info_via(server_name: str | None) -> None:
        channel = open_engine_channel(engine.address, credentials(pki.ca, pki.client), server_name)
        async with channel:
            stub = engine_service_pb2_grpc.EngineServiceStub(channel)
            await stub.GetInfo(engine_service_pb2.GetInfoRequest(), timeout=10)

    asyncio.run(get_info_via("localhost"))
    with pytest.raises(grpc.RpcError) as refused:
        asyncio.run(get_info_via(None))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_port_is_plaintext_and_serves_health_only(mtls_system) -> None:
    _, _, health_port = mtls_system
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "llmserve.v1.EngineService"):
            request = health_pb2.HealthCheckRequest(service=service)
            assert health.Check(request, timeout=10).status == SERVING
        stub = engine_service_pb2_grpc.EngineServiceStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetInfo(engine_service_pb2.GetInfoRequest(), timeout=10)
    assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_health_port_mirrors_the_drain(pki, tiny_checkpoint, start_engine, unused_port) -> None:
    """SIGTERM turns the main port's health NOT_SERVING while a stream drains: so does this one."""
    health_port = unused_port()
    engine = start_engine(tiny_checkpoint("qwen3"), *engine_tls_args(pki, health_port))
    secure = grpc.secure_channel(engine.address, credentials(pki.ca, pki.client), SERVER_NAME)
    with secure, grpc.insecure_channel(f"127.0.0.1:{health_port}") as plain:
        call = engine_service_pb2_grpc.EngineServiceStub(secure).Generate(
            engine_service_pb2.EngineServiceGenerateRequest(
                prompt_token_ids=[7, 8, 9],
                stopping=common_pb2.StoppingCriteria(max_tokens=200, ignore_eos=True),
            )
        )
        next(call)
        health = health_pb2_grpc.HealthStub(plain)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
        engine.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING:
            assert time.monotonic() < deadline, "the health port still says SERVING"
            time.sleep(0.02)
        assert list(call)[-1].usage.completion_tokens == 200
    assert engine.process.wait(timeout=20) == 0
