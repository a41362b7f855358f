"""TLS on the router's public port, real processes over loopback: the right CA is served,
plaintext and another CA are refused."""

from pathlib import Path

import grpc
import pytest
from launcher import ServerProcess

from llmserve.clients import LLMClient
from llmserve.clients import cli as client_cli


@pytest.fixture(scope="module")
def tls_router(pki, tiny_checkpoint, start_engine, start_router) -> ServerProcess:
    model_dir = tiny_checkpoint("qwen3")
    engine = start_engine(model_dir)
    return start_router(
        model_dir, [engine], "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)
    )


def trusting(ca: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_client_trusting_the_ca_is_served(pki, tls_router: ServerProcess, host: str) -> None:
    target = f"{host}:{tls_router.port}"
    with LLMClient(target, channel_credentials=trusting(pki.ca)) as client:
        assert client.health(timeout=10) == "SERVING"
        completion = client.generate_text("Hello", max_tokens=4, ignore_eos=True, timeout=30)
    assert len(completion.token_ids) == 4


def test_plaintext_client_is_refused(tls_router: ServerProcess) -> None:
    with LLMClient(tls_router.address) as client, pytest.raises(grpc.RpcError) as refused:
        client.generate_text("Hello", max_tokens=4, timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_trusting_another_ca_is_refused(pki, tls_router: ServerProcess) -> None:
    with (
        LLMClient(tls_router.address, channel_credentials=trusting(pki.other_ca)) as client,
        pytest.raises(grpc.RpcError) as refused,
    ):
        client.health(timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_cli_speaks_tls_with_tls_ca(pki, tls_router: ServerProcess, capsys) -> None:
    target = ["--target", tls_router.address]
    assert client_cli.main(["health", *target, "--tls-ca", str(pki.ca)]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    code = client_cli.main(
        ["generate", *target, "--tls-ca", str(pki.ca), "--max-tokens", "3", "--json", "Hi"]
    )
    assert code == 0
    assert '"finish_reason": "length"' in capsys.readouterr().out
    assert client_cli.main(["health", *target]) == 1
    assert "error: UNAVAILABLE" in capsys.readouterr().err
