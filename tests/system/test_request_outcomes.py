"""Both tiers count every request exactly once, under its outcome, refused ones included.

Requests of every outcome go through a real router and engine; afterwards their
`*_requests_total{outcome}` counters, read over HTTP, have moved by exactly the calls made.
"""

import time
import urllib.request
from collections import Counter
from collections.abc import Callable

import grpc
import pytest
from launcher import ServerProcess
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

from llmserve.clients import LLMClient
from llmserve.common import request_limits as limits
from llmserve.router.tokenizer import max_chars_per_token
from llmserve.v1 import (
    common_pb2,
    engine_service_pb2,
    engine_service_pb2_grpc,
    generate_service_pb2,
    generate_service_pb2_grpc,
)

MAX_MODEL_LEN = 512  # the tiny checkpoint's max_position_embeddings
VOCAB = 641
# Cancellations that land while the router writes a response (a fifth of them, with logprobs'
# heavier responses) reach its handler as GeneratorExit, not CancelledError: with this many,
# some surely do.
CANCELS = 30


def outcome_counts(port: int, metric: str) -> Counter[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return Counter(
        {
            sample.labels["outcome"]: int(sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == metric
        }
    )


class Tier:
    """A server's request counter: what it read at the start, and what calls should add."""

    def __init__(self, port: int, metric: str) -> None:
        self.port, self.metric = port, metric
        self.start = outcome_counts(port, metric)
        self.expected: Counter[str] = Counter()

    def moved(self) -> Counter[str]:
        now = outcome_counts(self.port, self.metric)
        return Counter({k: now[k] - self.start[k] for k in now if now[k] != self.start[k]})

    def settled(self, timeout: float = 10) -> Counter[str]:
        """What moved, once it is what was expected or at the timeout: cancellations reach the
        counters a moment after the client has moved on."""
        deadline = time.monotonic() + timeout
        while (moved := self.moved()) != self.expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return moved


@pytest.fixture
def servers(
    tiny_checkpoint, start_engine, start_router, unused_port
) -> tuple[ServerProcess, ServerProcess, int, int, int]:
    """An engine running one sequence at a time, behind a router that queues nothing: with two
    streams admitted, a third is shed. Both serve /metrics (argparse keeps the last port)."""
    model_dir = tiny_checkpoint("qwen3")
    engine_metrics, router_metrics = unused_port(), unused_port()
    engine = start_engine(model_dir, "--max-num-seqs", "1", "--metrics-port", str(engine_metrics))
    router = start_router(
        model_dir, [engine], "--max-queue", "0", "--metrics-port", str(router_metrics)
    )
    per_token = max_chars_per_token(Tokenizer.from_file(str(model_dir / "tokenizer.json")))
    assert per_token is not None
    prompt_char_limit = int((MAX_MODEL_LEN - 1) * per_token)
    return engine, router, engine_metrics, router_metrics, prompt_char_limit


def refused(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code()


def long_request(**fields: object) -> generate_service_pb2.GenerateRequest:
    return generate_service_pb2.GenerateRequest(
        prompt="Hello",
        stopping=common_pb2.StoppingCriteria(max_tokens=400, ignore_eos=True),
        **fields,
    )


def engine_request(**fields: object) -> engine_service_pb2.EngineServiceGenerateRequest:
    fields.setdefault("prompt_token_ids", [5, 6, 7])
    return engine_service_pb2.EngineServiceGenerateRequest(
        stopping=common_pb2.StoppingCriteria(max_tokens=450, ignore_eos=True), **fields
    )


def test_every_request_counts_once_under_its_outcome(servers, engine_load) -> None:
    engine, router, engine_metrics, router_metrics, prompt_char_limit = servers
    at_router = Tier(router_metrics, "llmserve_router_requests_total")
    at_engine = Tier(engine_metrics, "llmserve_engine_requests_total")
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    with LLMClient(router.address) as client, grpc.insecure_channel(router.address) as channel:
        stub = generate_service_pb2_grpc.GenerateServiceStub(channel)
        for prompt in ("Hello", "Hi there", "Count"):
            client.generate_text(prompt, max_tokens=4, ignore_eos=True, timeout=30)
        at_router.expected["finished"] += 3
        at_engine.expected["finished"] += 3

        for _ in range(CANCELS):
            stream = client.generate(
                "cancel me", max_tokens=400, ignore_eos=True, logprobs=20, timeout=30
            )
            next(stream)
            stream.close()
        at_router.expected["cancelled"] += CANCELS
        at_engine.expected["cancelled"] += CANCELS

        # Refused by the router: the engine never sees them.
        bad_utf8 = long_request(stop=["XY"]).SerializeToString().replace(b"XY", b"\xff\xfe")
        raw_generate = channel.unary_stream("/llmserve.v1.GenerateService/Generate")
        router_refusals: list[Callable[[], object]] = [
            lambda: client.generate_text("", timeout=30),
            lambda: client.generate_text("hi", stop=[""], timeout=30),
            lambda: client.generate_text("a" * (prompt_char_limit + 1), timeout=30),
            lambda: client.generate_text(prompt_token_ids=[1] * MAX_MODEL_LEN, timeout=30),
            lambda: list(raw_generate(bad_utf8, timeout=30)),
            lambda: list(raw_generate(b"\xff\xff\xff", timeout=30)),
            lambda: client.generate_text("hi", request_id="r" * 129, timeout=30),
            lambda: client.generate_text("hi", tenant="t" * 129, timeout=30),
            lambda: client.generate_text("hi", stop_token_ids=[1] * 129, timeout=30),
            lambda: client.generate_text(
                messages=[{"role": "user", "content": "hi"}] * (limits.MAX_MESSAGES + 1), timeout=30
            ),
            lambda: client.generate_text("hi", temperature=-1.0, timeout=30),
            lambda: client.generate_text("hi", max_tokens=0, timeout=30),
            lambda: client.generate_text("hi", logprobs=21, timeout=30),
            lambda: list(stub.Generate(long_request(priority=9), timeout=30)),
        ]
        assert [refused(call) for call in router_refusals] == [invalid] * len(router_refusals)
        at_router.expected["invalid_argument"] += len(router_refusals)

        # Refused by the engine (a token id outside its vocabulary): both count it.
        assert refused(lambda: client.generate_text(prompt_token_ids=[5, VOCAB + 7])) == invalid
        at_router.expected["invalid_argument"] += 1
        at_engine.expected["invalid_argument"] += 1

        # Past its deadline: the router cancels the engine's stream.
        assert refused(
            lambda: client.generate_text("slow " * 10, max_tokens=450, ignore_eos=True, timeout=0.3)
        ) == (grpc.StatusCode.DEADLINE_EXCEEDED)
        at_router.expected["deadline_exceeded"] += 1
        at_engine.expected["cancelled"] += 1

        # Two streams fill the engine (one runs, one waits there); the third is shed.
        running = stub.Generate(long_request(), timeout=60)
        next(running)
        waiting = stub.Generate(long_request(), timeout=60)
        wait_until(lambda: engine_load(engine.address).num_waiting == 1)
        assert refused(lambda: client.generate_text("shed me", timeout=30)) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        running.cancel()
        waiting.cancel()
        at_router.expected["resource_exhausted"] += 1
        at_router.expected["cancelled"] += 2
        at_engine.expected["cancelled"] += 2

    with grpc.insecure_channel(engine.address) as channel:
        stub = engine_service_pb2_grpc.EngineServiceStub(channel)
        raw_generate = channel.unary_stream("/llmserve.v1.EngineService/Generate")
        engine_refusals: list[Callable[[], object]] = [
            lambda: list(raw_generate(b"\xff\xff\xff", timeout=30)),
            lambda: list(stub.Generate(engine_request(request_id="r" * 129), timeout=30)),
            lambda: list(stub.Generate(engine_request(prompt_token_ids=[]), timeout=30)),
        ]
        assert [refused(call) for call in engine_refusals] == [invalid] * len(engine_refusals)
        at_engine.expected["invalid_argument"] += len(engine_refusals)
        wait_until(lambda: engine_load(engine.address).num_running == 0)
        assert refused(lambda: list(stub.Generate(engine_request(), timeout=0.3))) == (
            grpc.StatusCode.DEADLINE_EXCEEDED
        )
        at_engine.expected["deadline_exceeded"] += 1
        call = stub.Generate(engine_request(), timeout=30)
        next(call)
        call.cancel()
        at_engine.expected["cancelled"] += 1

    assert at_router.settled() == at_router.expected
    assert at_engine.settled() == at_engine.expected


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
