"""One huge request never stalls the router for everyone else.

While a stream runs through the router and a client polls its gRPC health, requests with
megabytes of prompt or messages are refused with INVALID_ARGUMENT; the stream's largest gap
between tokens and the slowest health check stay under STALL_LIMIT_S. Refused before
tokenizing where the prompt's length alone rules it out; where it cannot (a tokenizer without a
bound), tokenized off the event loop.
"""

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from launcher import ServerProcess
from tokenizers import normalizers

from llmserve.clients import LLMClient
from llmserve.engine_service.demo_model import build_tokenizer, write_tokenizer

STALL_LIMIT_S = 0.25
CALL_TIMEOUT_S = 60


class Watch:
    """Gaps between a running stream's tokens and the latency of health checks, over time."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.token_times: list[float] = []
        self.stream_gaps: list[float] = []
        self.health_latencies: list[float] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._stream, daemon=True),
            threading.Thread(target=self._check_health, daemon=True),
        ]

    def _stream(self) -> None:
        with LLMClient(self.address) as client:
            while not self.stop.is_set():
                last = None
                for _ in client.generate(
                    "Hello", max_tokens=500, ignore_eos=True, timeout=CALL_TIMEOUT_S
                ):
                    now = time.monotonic()
                    self.token_times.append(now)
                    if last is not None:
                        self.stream_gaps.append(now - last)
                    last = now
                    if self.stop.is_set():
                        break

    def _check_health(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while not self.stop.is_set():
                started = time.monotonic()
                health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
                self.health_latencies.append(time.monotonic() - started)
                time.sleep(0.01)

    def tokens_between(self, start: float, end: float) -> int:
        return sum(start <= t <= end for t in self.token_times)


@contextmanager
def watching(address: str) -> Iterator[Watch]:
    watch = Watch(address)
    for thread in watch.threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(watch.token_times) < 5 or not watch.health_latencies:
        assert time.monotonic() < deadline, "the watched stream never started"
        time.sleep(0.01)
    try:
        yield watch
    finally:
        watch.stop.set()
        for thread in watch.threads:
            thread.join(timeout=CALL_TIMEOUT_S)


def refused_while_watched(address: str, calls: list[Callable[[LLMClient], object]]) -> list[str]:
    """Makes each call while a stream and health checks run; returns each refusal's details,
    after checking that the watched calls went on throughout."""
    details = []
    with watching(address) as watch, LLMClient(address) as client:
        for call in calls:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                call(client)
            ended = time.monotonic()
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details.append(refused.value.details())
            time.sleep(0.05)  # the stream's next token, unless the router is stalled
            assert watch.tokens_between(started, time.monotonic()) > 0
            assert ended - started < CALL_TIMEOUT_S
    assert max(watch.stream_gaps) < STALL_LIMIT_S, sorted(watch.stream_gaps)[-5:]
    assert max(watch.health_latencies) < STALL_LIMIT_S, sorted(watch.health_latencies)[-5:]
    return details


def messages_of(total_chars: int, count: int = 1000) -> list[dict[str, str]]:
    return [{"role": "user", "content": "w" * (total_chars // count)}] * count


def test_huge_inputs_are_refused_untokenized_without_stalling(qwen3_system) -> None:
    _, _, router = qwen3_system
    details = refused_while_watched(
        router.address,
        [
            # 15 MB: under the router's 16 MiB message limit.
            lambda client: client.generate_text("a" * 15_000_000, timeout=CALL_TIMEOUT_S),
            lambda client: client.tokenize("a" * 5_000_000, timeout=CALL_TIMEOUT_S),
            lambda client: client.generate_text(
                messages=messages_of(5_000_000), timeout=CALL_TIMEOUT_S
            ),
            lambda client: client.tokenize(messages=messages_of(5_000_000), timeout=CALL_TIMEOUT_S),
        ],
    )
    assert [d.split(":")[0] for d in details] == ["prompt", "prompt", "messages", "messages"]
    assert all("characters; the limit is" in d for d in details)


@pytest.fixture(scope="module")
def unbounded_router(
    qwen3_system, start_router, tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    """A router whose tokenizer's normalizer strips text, so no prompt length rules a prompt
    out untokenized: every one gets tokenized."""
    _, engine, _ = qwen3_system
    tokenizer_dir: Path = tmp_path_factory.mktemp("unbounded-tokenizer")
    tokenizer = build_tokenizer()
    tokenizer.normalizer = normalizers.Strip()
    write_tokenizer(tokenizer, tokenizer_dir, 512)
    router = start_router(tokenizer_dir, [engine])
    loaded = [e for e in router.log_events() if e.get("event") == "tokenizer_loaded"]
    assert loaded[0]["chars_per_token"] is None
    return router


def test_tokenizing_huge_inputs_leaves_the_event_loop(unbounded_router: ServerProcess) -> None:
    # ~1 s of tokenizing each on this CPU: stalls far past the limit if done in place.
    size = 3_000_000
    details = refused_while_watched(
        unbounded_router.address,
        [
            lambda client: client.generate_text("a b " * (size // 4), timeout=CALL_TIMEOUT_S),
            lambda client: client.tokenize("a b " * (size // 4), timeout=CALL_TIMEOUT_S),
            lambda client: client.tokenize(messages=messages_of(size), timeout=CALL_TIMEOUT_S),
        ],
    )
    assert [d.split(":")[0] for d in details] == ["prompt", "prompt", "messages"]
    assert all("tokens; the limit is 511" in d for d in details)
