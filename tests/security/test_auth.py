"""Bearer-token auth on the router, real processes over loopback: the tenant comes from the key.

What the engine logs for each request (`request_started` with its tenant) shows which tenant the
router forwarded.
"""

import json
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from launcher import ServerProcess
from prometheus_client.parser import text_string_to_metric_families

from llmserve.clients import LLMClient

KEYS = {"team-a": ["a-key-0123456789abcdef", "a-key-rotated-fedcba9876"], "team-b": ["b-key-42"]}


@pytest.fixture(scope="module")
def system(tiny_checkpoint, start_engine, start_router, tmp_path_factory):
    """One engine behind two routers: one with auth on, one with it off."""
    keys_file = tmp_path_factory.mktemp("auth") / "auth-keys.json"
    keys_file.write_text(json.dumps({"tenants": KEYS}))
    model_dir = tiny_checkpoint("qwen3")
    engine = start_engine(model_dir)
    with_auth = start_router(model_dir, [engine], "--auth-keys-file", str(keys_file))
    without_auth = start_router(model_dir, [engine])
    return engine, with_auth, without_auth


def tenant_seen_by_engine(engine: ServerProcess, request_id: str) -> str:
    (event,) = [
        e
        for e in engine.log_events()
        if e.get("event") == "request_started" and e["request_id"].startswith(request_id + "-")
    ]
    return event["tenant"]


def generate(router: ServerProcess, token: str | None, tenant: str = "") -> str:
    """Runs a 2-token completion; returns its request id."""
    request_id = uuid.uuid4().hex
    with LLMClient(router.address, token=token) as client:
        completion = client.generate_text(
            "Hello", max_tokens=2, ignore_eos=True, tenant=tenant, request_id=request_id, timeout=30
        )
    assert len(completion.token_ids) == 2
    return request_id


@pytest.mark.parametrize(
    ("key", "tenant"),
    [(KEYS["team-a"][0], "team-a"), (KEYS["team-a"][1], "team-a"), (KEYS["team-b"][0], "team-b")],
)
def test_right_key_is_served_as_its_tenant(system, key: str, tenant: str) -> None:
    engine, router, _ = system
    assert tenant_seen_by_engine(engine, generate(router, key)) == tenant
    # Naming one's own tenant is fine too.
    assert tenant_seen_by_engine(engine, generate(router, key, tenant)) == tenant


def test_request_naming_another_tenant_is_permission_denied(system) -> None:
    _, router, _ = system
    with pytest.raises(grpc.RpcError) as denied:
        generate(router, KEYS["team-a"][0], tenant="team-b")
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "team-b" in denied.value.details()


@pytest.mark.parametrize("token", [None, "not-a-key", KEYS["team-a"][0] + "x", "a-key"])
def test_wrong_or_missing_token_is_unauthenticated(system, token: str | None) -> None:
    _, router, _ = system
    with LLMClient(router.address, token=token) as client:
        calls = [
            lambda: client.generate_text("Hello", max_tokens=2, timeout=10),
            lambda: client.tokenize("Hello", timeout=10),
            lambda: client.model_info(timeout=10),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_other_schemes_are_unauthenticated(system) -> None:
    _, router, _ = system
    metadata = (("authorization", f"Basic {KEYS['team-a'][0]}"),)
    with LLMClient(router.address) as client, pytest.raises(grpc.RpcError) as refused:
        client.tokenize("Hello", metadata=metadata, timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tokenize_and_model_info_with_a_key(system) -> None:
    _, router, _ = system
    with LLMClient(router.address, token=KEYS["team-b"][0]) as client:
        assert client.tokenize("Hello", timeout=10)
        assert client.model_info(timeout=10)["num_engines"] == 1


def test_health_needs_no_key(system) -> None:
    _, router, _ = system
    with LLMClient(router.address) as client:
        assert client.health(timeout=10) == "SERVING"


def test_with_auth_off_the_request_tenant_is_used(system) -> None:
    engine, _, router = system
    request_id = generate(router, None, tenant="whoever-asks")
    assert tenant_seen_by_engine(engine, request_id) == "whoever-asks"


def test_cancelling_an_authenticated_stream_reaches_the_engine(system) -> None:
    engine, router, _ = system
    request_id = uuid.uuid4().hex
    with LLMClient(router.address, token=KEYS["team-b"][0]) as client:
        stream = client.generate(
            "Hello", max_tokens=400, ignore_eos=True, request_id=request_id, timeout=60
        )
        next(stream)
        stream.close()
    deadline = time.monotonic() + 10
    while not any(
        e.get("event") == "request_cancelled" and e["request_id"].startswith(request_id + "-")
        for e in engine.log_events()
    ):
        assert time.monotonic() < deadline, "the engine kept generating"
        time.sleep(0.05)


def test_no_key_reaches_the_logs(system) -> None:
    _, router, _ = system
    generate(router, KEYS["team-a"][0])
    with (
        LLMClient(router.address, token="a-wrong-key-for-the-log") as client,
        pytest.raises(grpc.RpcError),
    ):
        client.tokenize("Hello", timeout=10)
    log_text = Path(router.log_path).read_text()
    assert "auth_refused" in log_text
    for key in [*(k for keys in KEYS.values() for k in keys), "a-wrong-key-for-the-log"]:
        assert key not in log_text


def test_refused_generate_calls_are_counted_by_outcome(
    tiny_checkpoint, start_engine, start_router, tmp_path, unused_port
) -> None:
    """Calls the auth check refuses end before the handler, yet count like every other call."""
    keys_file = tmp_path / "auth-keys.json"
    keys_file.write_text(json.dumps({"tenants": KEYS}))
    model_dir = tiny_checkpoint("qwen3")
    metrics_port = unused_port()
    router = start_router(
        model_dir,
        [start_engine(model_dir)],
        "--auth-keys-file",
        str(keys_file),
        "--metrics-port",
        str(metrics_port),
    )
    calls = [(None, ""), ("wrong-key", ""), (KEYS["team-a"][0], "team-b")]
    for token, tenant in calls:
        with pytest.raises(grpc.RpcError):
            generate(router, token, tenant)
    generate(router, KEYS["team-b"][0])
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    counts = {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
        if sample.name == "llmserve_router_requests_total"
    }
    assert counts == {"unauthenticated": 2, "permission_denied": 1, "finished": 1}
