"""How fast a router sees engines die, come back and freeze, on real processes.

Router health follows its engines (NOT_SERVING while none is ready, in step with `/healthz`); an
engine frozen with SIGSTOP falls silent and leaves the pool, its streams failing over exactly as
after a crash; an engine back on its port is routed to within two seconds of serving.
"""

import asyncio
import contextlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from launcher import ServerProcess

from llmserve.clients import LLMClient
from llmserve.router.engine_channel import open_engine_channel
from llmserve.router.server import LIVENESS_NAME
from llmserve.v1 import engine_service_pb2, engine_service_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READINESS_NAMES = ("", "llmserve.v1.GenerateService")


def health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def healthz(metrics_port: int) -> tuple[int, dict]:
    """`/healthz`: its HTTP status and body."""
    url = f"http://127.0.0.1:{metrics_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def ready_in_healthz(metrics_port: int) -> dict[str, bool]:
    return {e["address"]: e["ready"] for e in healthz(metrics_port)[1]["engines"]}


def wait_for(condition, timeout_s: float, what: str) -> float:
    """Polls `condition` every 20 ms; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what} not within {timeout_s} s"
        time.sleep(0.02)
    return time.monotonic() - started


def logged_at(event: dict) -> datetime:
    return datetime.fromisoformat(event["timestamp"])


def events(server: ServerProcess, name: str) -> list[dict]:
    return [e for e in server.log_events() if e.get("event") == name]


def process_tree(pid: int) -> list[int]:
    """`pid` and every process under it (the engine's core, tensor-parallel ranks), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # The command name may hold spaces or parentheses: the fields follow the last ')'.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


@contextlib.contextmanager
def frozen(engine: ServerProcess) -> Iterator[list[int]]:
    """SIGSTOPs the engine's processes; at the end resumes and kills them all, so no stopped
    process outlives the test whatever happens in it."""
    pids = process_tree(engine.process.pid)
    assert len(pids) >= 2, "the engine has no core process to freeze"
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        yield pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        engine.process.wait(timeout=10)


def test_router_health_follows_its_only_engine_down_and_back(
    tiny_checkpoint, start_engine, start_router, unused_port
) -> None:
    model = tiny_checkpoint("qwen3")
    engine = start_engine(model)
    # A second engine address, started only later: its router dials a closed port meanwhile.
    late_port = unused_port()
    metrics_port = unused_port()
    router = start_router(
        model,
        [engine],
        "--metrics-port",
        str(metrics_port),
        "--engines",
        f"{engine.address},127.0.0.1:{late_port}",
    )
    for name in (*READINESS_NAMES, LIVENESS_NAME):
        assert health(router.address, name) == SERVING, name
    assert healthz(metrics_port)[0] == 200

    engine.process.kill()
    took = wait_for(
        lambda: health(router.address, "") == NOT_SERVING, 5, "NOT_SERVING after the kill"
    )
    print(f"NOT_SERVING {took:.2f} s after the kill")
    assert health(router.address, READINESS_NAMES[1]) == NOT_SERVING
    # The process itself is fine: a liveness probe must not restart it.
    assert health(router.address, LIVENESS_NAME) == SERVING
    status, body = healthz(metrics_port)
    assert (status, body["status"]) == (503, "NOT_SERVING")
    with LLMClient(router.address) as client, pytest.raises(grpc.RpcError) as refused:
        client.generate_text(prompt_token_ids=[5, 6, 7], max_tokens=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    # Back on the same port after a start-up of seconds: the router's dials failed meanwhile.
    restarted = start_engine(model, "--port", str(engine.port))
    took = wait_for(
        lambda: health(router.address, "") == SERVING, 5, "SERVING after the restart"
    )
    print(f"SERVING {took:.2f} s after the restarted engine logged serving")
    assert health(router.address, READINESS_NAMES[1]) == SERVING
    assert healthz(metrics_port)[0] == 200

    late = start_engine(model, "--port", str(late_port))
    wait_for(lambda: all(ready_in_healthz(metrics_port).values()), 5, "the late engine ready")
    # Within 2 s of each engine's own health turning SERVING (it logs `serving` right after).
    joined = {e["engine"]: logged_at(e) for e in events(router, "engine_joined")}
    for server, port in ((restarted, engine.port), (late, late_port)):
        (serving,) = events(server, "serving")
        delay = (joined[f"127.0.0.1:{port}"] - logged_at(serving)).total_seconds()
        print(f"engine on {port} joined {delay:.2f} s after serving")
        assert 0 <= delay < 2, f"the engine on {port} joined {delay:.2f} s after serving"
    health_changes = [e["status"] for e in events(router, "health_changed")]
    assert health_changes == ["NOT_SERVING", "SERVING"]


def test_frozen_engine_is_left_and_its_stream_continues_exactly(
    tiny_checkpoint, start_engine, start_router, unused_port, engine_greedy
) -> None:
    model = tiny_checkpoint("qwen3")
    engines = [start_engine(model) for _ in range(2)]
    metrics_port = unused_port()
    router = start_router(model, engines, "--metrics-port", str(metrics_port))
    prompt = [7, 8, 9, 10, 11]
    max_tokens = 200
    undisturbed = engine_greedy(engines[0].address, prompt, max_tokens)
    with LLMClient(router.address) as client:
        received: list[int] = []
        prompt_logprobs = []
        with contextlib.ExitStack() as stack:
            victim = None
            for chunk in client.generate(
                prompt_token_ids=prompt,
                temperature=0.0,
                max_tokens=max_tokens,
                ignore_eos=True,
                # Resubmitted with what is left of it (no token to hold off here: ignore_eos).
                min_tokens=max_tokens,
                # Delivered on the first response: not asked of the second engine again.
                prompt_logprobs=1,
                request_id="frozen-victim",
                timeout=60,
            ):
                received.extend(chunk.token_ids)
                if chunk.prompt_logprobs:
                    prompt_logprobs.append([lp.token_id for lp in chunk.prompt_logprobs])
                if victim is None and len(received) >= 20:
                    victim = next(
                        e for e in engines if e.address == routed_engine(router, "frozen-victim")
                    )
                    stack.enter_context(frozen(victim))
                    frozen_at = time.monotonic()
            assert victim is not None
            finished_in = time.monotonic() - frozen_at
            print(f"stream finished {finished_in:.2f} s after the freeze")
            assert received == undisturbed  # nothing duplicated, nothing lost
            assert prompt_logprobs == [prompt[1:]]
            assert chunk.finish_reason == "length"
            assert chunk.usage.completion_tokens == max_tokens
            assert finished_in < 10

            (left,) = [e for e in events(router, "engine_left") if e["engine"] == victim.address]
            assert "silent" in left["error"]
            (failover,) = events(router, "engine_failed_over")
            assert failover["stage"] == "mid_stream"
            assert failover["engine"] == victim.address
            assert ready_in_healthz(metrics_port)[victim.address] is False
            # Nothing new goes to the frozen engine: every request lands on the other one, fast.
            for i in range(6):
                started = time.monotonic()
                client.generate_text(
                    prompt_token_ids=[100 + i] * (20 + 16 * i),
                    max_tokens=4,
                    request_id=f"after-{i}",
                    timeout=10,
                )
                assert time.monotonic() - started < 5
                assert routed_engine(router, f"after-{i}") != victim.address
            assert healthz(metrics_port)[0] == 200

            for pid in process_tree(victim.process.pid):
                os.kill(pid, signal.SIGCONT)
            took = wait_for(
                lambda: ready_in_healthz(metrics_port)[victim.address], 10, "rejoin after SIGCONT"
            )
            print(f"rejoined {took:.2f} s after SIGCONT")


def test_engine_permits_routers_keepalive_pings(qwen3_system) -> None:
    # gRPC servers answer pings more frequent than every 5 minutes with GOAWAY too_many_pings
    # after two strikes: at 2 s (the shortest a router sends) a quiet request connection would
    # break within about 8 s.
    _, engine, _ = qwen3_system

    async def hold_a_quiet_call() -> None:
        async with open_engine_channel(engine.address, None, keepalive_s=2.0) as channel:
            stub = engine_service_pb2_grpc.EngineServiceStub(channel)
            await stub.GetInfo(engine_service_pb2.GetInfoRequest(), timeout=5)
            quiet = stub.GenerateStreams()  # open, carrying nothing: a router's idle link
            for _ in range(50):
                await asyncio.sleep(0.2)
                assert channel.get_state() == grpc.ChannelConnectivity.READY
            assert not quiet.done()
            quiet.cancel()

    asyncio.run(hold_a_quiet_call())


def routed_engine(router: ServerProcess, request_id: str) -> str:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for event in events(router, "request_routed"):
            if event["request_id"] == request_id:
                return event["engine"]
        time.sleep(0.05)
    raise AssertionError(f"{request_id} was never routed")
