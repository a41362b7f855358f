"""Shared fixtures: tiny real checkpoints and real engine/router processes on loopback ports."""

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from llmserve.engine_service.demo_model import build_tokenizer, write_tokenizer

STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A server process started by a test, with its address and log file."""

    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_events(self) -> list[dict]:
        events = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
        return events

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(module: str, args: list[str], workdir: Path, ready_event: str) -> Server:
    """Runs `python -m module args` (JSON logs) and waits for its `ready_event` log line."""
    port = free_port()
    log_path = workdir / f"{module.rsplit('.', 1)[-1]}-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log_file:
        # cwd is a scratch folder so the repository's top-level folders never shadow packages.
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                module,
                "--port",
                str(port),
                "--metrics-port",
                "-1",
                "--log-format",
                "json",
                *args,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
        )
    server = Server(process, port, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{module} exited {process.returncode}:\n{log_path.read_text()}")
        if any(e.get("event") == ready_event for e in server.log_events()):
            return server
        time.sleep(0.1)
    server.stop()
    raise TimeoutError(f"{module} not ready in {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()}")


@pytest.fixture
def unused_port() -> Callable[[], int]:
    """Returns a function that finds a free loopback port."""
    return free_port


@pytest.fixture(scope="session")
def start_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """Starts real engine processes; all are stopped at the end of the session."""
    started: list[Server] = []

    def start(model_dir: Path, *extra: str) -> Server:
        workdir = tmp_path_factory.mktemp("engine")
        server = start_server(
            "llmserve.engine_service",
            ["--model", str(model_dir), "--num-kv-blocks", "512", *extra],
            workdir,
            "serving",
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def start_router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """Starts real router processes in front of the given engines."""
    started: list[Server] = []

    def start(model_dir: Path, engines: list[Server], *extra: str) -> Server:
        workdir = tmp_path_factory.mktemp("router")
        server = start_server(
            "llmserve.router",
            ["--model", str(model_dir), "--engines", ",".join(e.address for e in engines), *extra],
            workdir,
            "ready",
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
    initializer_range=0.2,
    tie_word_embeddings=False,
)


def write_tiny_checkpoint(architecture: str, out_dir: Path) -> Path:
    """A random-weight Hugging Face checkpoint saved by transformers itself, plus our tokenizer."""
    import transformers

    tokenizer = build_tokenizer()
    im_end = tokenizer.token_to_id("<|im_end|>")
    config_cls, model_cls = {
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[architecture]
    extra = {"head_dim": 16} if architecture == "qwen3" else {}
    config = config_cls(
        vocab_size=tokenizer.get_vocab_size(),
        eos_token_id=im_end,
        bos_token_id=None,
        pad_token_id=tokenizer.token_to_id("<|endoftext|>"),
        **TINY_SHAPE,
        **extra,
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.save_pretrained(out_dir)
    write_tokenizer(tokenizer, out_dir, TINY_SHAPE["max_position_embeddings"])
    return out_dir


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Returns (and caches) a tiny checkpoint directory for 'qwen3', 'qwen2' or 'llama'."""
    made: dict[str, Path] = {}

    def get(architecture: str) -> Path:
        if architecture not in made:
            made[architecture] = write_tiny_checkpoint(
                architecture, tmp_path_factory.mktemp(f"tiny-{architecture}")
            )
        return made[architecture]

    return get


@pytest.fixture(scope="session")
def qwen3_system(
    tiny_checkpoint: Callable[[str], Path],
    start_engine: Callable[..., Server],
    start_router: Callable[..., Server],
) -> tuple[Path, Server, Server]:
    """One engine and one router on the tiny Qwen3 checkpoint, shared by the session."""
    model_dir = tiny_checkpoint("qwen3")
    engine = start_engine(model_dir)
    router = start_router(model_dir, [engine])
    return model_dir, engine, router


def wait_for_channel(address: str, timeout: float = 10.0) -> grpc.Channel:
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=timeout)
    return channel
