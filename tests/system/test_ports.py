"""Server ports: default ports step to the next free one, a taken port given outright fails
start-up with a message naming it."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from launcher import STARTUP_TIMEOUT_S

from llmserve.v1 import common_pb2, engine_service_pb2, engine_service_pb2_grpc


def events(log: Path) -> list[dict]:
    """Every line of a JSON-logging server's output, each of which must be one JSON object."""
    return [json.loads(line) for line in log.read_text().splitlines()]


def start(module: str, args: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        # cwd: the repository's top-level folders must not shadow installed packages.
        return subprocess.Popen(
            [sys.executable, "-m", module, "--log-format", "json", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=log.parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def wait_for(process: subprocess.Popen, log: Path, event: str) -> dict:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        found = [e for e in events(log) if e["event"] == event]
        if found:
            return found[0]
        assert process.poll() is None, log.read_text()
        time.sleep(0.1)
    raise TimeoutError(log.read_text())


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        process.terminate()
    for process in started:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def generate_and_health(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        call = engine_service_pb2_grpc.EngineServiceStub(channel).Generate(
            engine_service_pb2.EngineServiceGenerateRequest(
                prompt_token_ids=[7, 8, 9],
                sampling=common_pb2.SamplingParams(temperature=0.0),
                stopping=common_pb2.StoppingCriteria(max_tokens=3, ignore_eos=True),
            ),
            timeout=30,
        )
        assert sum(len(r.token_ids) for r in call) == 3


def test_second_engine_without_ports_takes_the_next_free_ones(
    tiny_checkpoint, tmp_path, processes
) -> None:
    """No --port or --metrics-port: 50052 and 9401 unless taken (by the first engine, or by
    anything else on this machine), then the next free ports, and the log says which."""
    args = ["--model", str(tiny_checkpoint("qwen3")), "--num-kv-blocks", "64"]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    serving = []
    for log in logs:
        processes.append(start("llmserve.engine_service", args, log))
        serving.append(wait_for(processes[-1], log, "serving"))
    first, second = (
        {e["event"]: e for e in events(log) if e["event"] in ("serving", "metrics_serving")}
        for log in logs
    )
    assert first["serving"]["port"] >= 50052 and first["metrics_serving"]["port"] >= 9401
    assert second["serving"]["port"] > first["serving"]["port"]
    assert second["metrics_serving"]["port"] > first["metrics_serving"]["port"]
    taken = {e["option"]: e for e in events(logs[1]) if e["event"] == "default_port_taken"}
    assert first["serving"]["port"] in taken["--port"]["taken"]
    assert taken["--port"]["port"] == second["serving"]["port"]
    assert first["metrics_serving"]["port"] in taken["--metrics-port"]["taken"]
    assert taken["--metrics-port"]["port"] == second["metrics_serving"]["port"]
    for ports in (first, second):
        generate_and_health(f"127.0.0.1:{ports['serving']['port']}")
        metrics = f"http://127.0.0.1:{ports['metrics_serving']['port']}/metrics"
        with urllib.request.urlopen(metrics, timeout=10) as response:
            assert response.status == 200


@pytest.mark.parametrize(
    ("module", "flag"),
    [
        ("llmserve.engine_service", "--port"),
        ("llmserve.engine_service", "--metrics-port"),
        ("llmserve.router", "--port"),
        ("llmserve.router", "--metrics-port"),
    ],
)
def test_a_taken_port_given_outright_fails_naming_it(
    tiny_checkpoint, tmp_path, processes, module: str, flag: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The other ports: any free one, so only `flag`'s is taken.
        args = {"--port": "0", "--metrics-port": "0", flag: str(port)}
        log = tmp_path / "server.log"
        started = time.monotonic()
        processes.append(
            start(
                module,
                ["--model", str(tiny_checkpoint("qwen3")), *(x for kv in args.items() for x in kv)],
                log,
            )
        )
        assert processes[-1].wait(timeout=60) == 1
    # Before the model loads: in seconds, whatever the model.
    assert time.monotonic() - started < 30
    (failed,) = [e for e in events(log) if e["event"] == "startup_failed"]
    assert failed["error"].startswith(f"{flag} {port}: cannot listen on 127.0.0.1:{port}")
    assert "already in use" in failed["error"]
